-- Schema 2: per-device run counts (runs, still going, ended badly), kept with the run mirrors so
-- the fleet page reads no runs. cloud-sync fills it from `runs` on its first start after this.
CREATE TABLE device_counts (device text COLLATE "C" NOT NULL, value bytea NOT NULL, PRIMARY KEY (device));
