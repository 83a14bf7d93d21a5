-- Outpost cloud-sync on Postgres, schema 1: the redb store's tables, one for one.
-- Key columns are typed (text in byte order, bigint); each row's value is the bytes the redb
-- store keeps (a versioned postcard row, UTF-8 text, or an 8-byte little-endian counter).
CREATE TABLE devices (device text COLLATE "C" NOT NULL, value bytea NOT NULL, PRIMARY KEY (device));
CREATE TABLE events (device text COLLATE "C" NOT NULL, seq bigint NOT NULL, value bytea NOT NULL, PRIMARY KEY (device, seq));
CREATE TABLE run_events (device text COLLATE "C" NOT NULL, run text COLLATE "C" NOT NULL, seq bigint NOT NULL, value bytea NOT NULL, PRIMARY KEY (device, run, seq));
CREATE TABLE runs (device text COLLATE "C" NOT NULL, run text COLLATE "C" NOT NULL, value bytea NOT NULL, PRIMARY KEY (device, run));
CREATE TABLE commands (device text COLLATE "C" NOT NULL, id text COLLATE "C" NOT NULL, value bytea NOT NULL, PRIMARY KEY (device, id));
CREATE TABLE command_outbox (device text COLLATE "C" NOT NULL, command_order bigint NOT NULL, value bytea NOT NULL, PRIMARY KEY (device, command_order));
CREATE TABLE deployments (id text COLLATE "C" NOT NULL, value bytea NOT NULL, PRIMARY KEY (id));
CREATE TABLE rollouts (id text COLLATE "C" NOT NULL, value bytea NOT NULL, PRIMARY KEY (id));
CREATE TABLE active_rollouts (id text COLLATE "C" NOT NULL, value bytea NOT NULL, PRIMARY KEY (id));
CREATE TABLE desired (device text COLLATE "C" NOT NULL, value bytea NOT NULL, PRIMARY KEY (device));
CREATE TABLE reported (device text COLLATE "C" NOT NULL, value bytea NOT NULL, PRIMARY KEY (device));
CREATE TABLE counters (name text COLLATE "C" NOT NULL, value bytea NOT NULL, PRIMARY KEY (name));
CREATE TABLE definitions (device text COLLATE "C" NOT NULL, workflow text COLLATE "C" NOT NULL, version bigint NOT NULL, value bytea NOT NULL, PRIMARY KEY (device, workflow, version));
CREATE TABLE quarantine (device text COLLATE "C" NOT NULL, seq bigint NOT NULL, value bytea NOT NULL, PRIMARY KEY (device, seq));
CREATE TABLE equipment (device text COLLATE "C" NOT NULL, value bytea NOT NULL, PRIMARY KEY (device));
CREATE TABLE lineage (device text COLLATE "C" NOT NULL, value bytea NOT NULL, PRIMARY KEY (device));
CREATE TABLE archive (device text COLLATE "C" NOT NULL, archive bigint NOT NULL, seq bigint NOT NULL, value bytea NOT NULL, PRIMARY KEY (device, archive, seq));
CREATE TABLE gateway_security (device text COLLATE "C" NOT NULL, value bytea NOT NULL, PRIMARY KEY (device));
CREATE TABLE gateway_health (device text COLLATE "C" NOT NULL, value bytea NOT NULL, PRIMARY KEY (device));
CREATE TABLE users (name text COLLATE "C" NOT NULL, value bytea NOT NULL, PRIMARY KEY (name));
CREATE TABLE api_tokens (id text COLLATE "C" NOT NULL, value bytea NOT NULL, PRIMARY KEY (id));
CREATE TABLE audit (n bigint NOT NULL, value bytea NOT NULL, PRIMARY KEY (n));
