//! `outpost`'s arguments: the clap types, their help texts and value parsers.

use super::*;

pub(super) const EXIT_CODES_HELP: &str = "Exit codes: 0 ok, 1 error, 2 usage, 3 invalid input, 4 not found, \
5 agent unreachable, 6 run did not complete, 7 conflict, 8 still running after --timeout, \
9 start rejected by run limits.";

pub(super) const RUN_EXAMPLES: &str = "Examples:
  # try a workflow once, then exit with its result (0 completed, 6 otherwise)
  outpost run --data-dir ./outpost-data --apply examples/oven-cooling.yaml \\
    --start oven-cooling --input '{\"start_celsius\": 110}' --once
  # the agent on a gateway, enrolled in a fleet (see `outpost keygen` and `outpost enroll`)
  outpost run --data-dir /var/lib/outpost --broker mqtts://broker.plant:8883 --device-id line3-gw1 \\
    --label line=3 --equipment /etc/outpost/equipment.yaml --policy /etc/outpost/policy.yaml
  # at most 4 runs at once, one Modbus write at a time
  outpost run --max-runs 4 --limit modbus.write=1

An option shown with [env: NAME] can also be set by that environment variable.";

#[derive(Parser)]
#[command(
    name = "outpost",
    version,
    about = "Durable workflows for edge gateways",
    long_about = "Outpost runs workflows (DAGs and state machines written in YAML or JSON) and journals \
every step to a local redb database, so a run resumes exactly where it stopped after a crash or reboot.\n\n\
Start the agent with `outpost run`; the other commands talk to it over a Unix socket in its data directory.",
    after_help = EXIT_CODES_HELP
)]
pub(super) struct Cli {
    /// Data directory of the agent: the journal and the API socket live here.
    #[arg(long, global = true, env = "OUTPOST_DATA_DIR", default_value = "outpost-data")]
    pub(super) data_dir: PathBuf,
    /// Path of the running agent's API socket, for the commands that talk to it (`bench`
    /// starts its own agent and ignores it) [default: DATA_DIR/outpost.sock].
    #[arg(long, global = true, env = "OUTPOST_SOCKET")]
    pub(super) socket: Option<PathBuf>,
    /// Print JSON instead of tables and text (for scripts); `bench` prints its figures as one
    /// JSON object. Same as `-o json`.
    #[arg(long, global = true)]
    pub(super) json: bool,
    /// Output format: `table` (cells cut at 80 characters on a terminal), `wide` (nothing cut),
    /// `json`. Piped output is never cut.
    #[arg(long, short = 'o', global = true, value_enum, default_value_t = Output::Table)]
    pub(super) output: Output,
    #[command(subcommand)]
    pub(super) command: Cmd,
}

/// How commands print what they get.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(super) enum Output {
    /// Tables and text for a person.
    Table,
    /// Tables with nothing cut.
    Wide,
    /// JSON for scripts.
    Json,
}

#[derive(Subcommand)]
pub(super) enum Cmd {
    /// Run the agent (the daemon that owns the journal and runs workflows).
    #[command(after_help = RUN_EXAMPLES)]
    Run(Box<RunArgs>),
    /// Check workflow definition files without an agent; prints every problem with its place.
    Validate {
        /// YAML or JSON files.
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Also check device names against this equipment file.
        #[arg(long, env = "OUTPOST_EQUIPMENT")]
        equipment: Option<PathBuf>,
    },
    /// Store workflow definitions in the agent (a new version of a name, or the same content again).
    Apply {
        /// YAML or JSON files.
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Start a run of a workflow.
    Start(StartArgs),
    /// List runs, newest first.
    List {
        /// Only runs with this status: running, completed, failed, cancelled, compensated,
        /// compensation_failed, terminated, continued.
        #[arg(long)]
        status: Option<String>,
        /// At most this many.
        #[arg(long, default_value_t = 50)]
        limit: usize,
        /// Read the journal file itself (read-only) instead of asking the agent: for a gateway
        /// whose agent is stopped or will not start.
        #[arg(long)]
        offline: bool,
    },
    /// Show one run: status, each step with attempts, errors, outputs and timings.
    Show {
        /// Run id.
        run: String,
        /// Also print the run's full event history.
        #[arg(long)]
        history: bool,
        /// Then keep printing the run's new events as they happen, until it ends (Ctrl-C stops).
        #[arg(long, short = 'f')]
        follow: bool,
        /// Read the journal file itself (read-only) instead of asking the agent: for a gateway
        /// whose agent is stopped or will not start.
        #[arg(long, conflicts_with = "follow")]
        offline: bool,
    },
    /// Wait for a run to finish.
    Wait {
        /// Run id.
        run: String,
        /// Give up after this long (exit code 8): `90s`, `5m`, or plain seconds.
        #[arg(long, default_value = "1h", value_parser = seconds_arg)]
        timeout: f64,
    },
    /// Cancel a running run: stops its activities and records the cancellation.
    Cancel {
        /// Run id.
        run: String,
        /// Why (recorded in the history).
        #[arg(long, default_value = "cancelled by operator")]
        reason: String,
    },
    /// Stop a run without compensation (also one that is compensating).
    Terminate {
        /// Run id.
        run: String,
        /// Why (recorded in the history).
        #[arg(long, default_value = "terminated by operator")]
        reason: String,
    },
    /// Resume a failed run from its failed step (a fresh visit with a fresh retry budget).
    Retry {
        /// Run id.
        run: String,
        /// Who asked (recorded in the history) [default: $USER].
        #[arg(long)]
        by: Option<String>,
    },
    /// Send a signal to a run; a step waiting for it (now or later) receives the payload.
    Signal {
        /// Run id.
        run: String,
        /// Signal name, as in the step's `signal` argument.
        name: String,
        /// Payload as JSON.
        #[arg(long, default_value = "null")]
        payload: String,
        /// Signal id; a repeated id is ignored (safe to resend) [default: generated].
        #[arg(long)]
        id: Option<String>,
        /// Refuse the signal (exit code 3, nothing recorded) when no step of the run waits for
        /// this name; without it such a signal is kept, with a warning.
        #[arg(long)]
        strict: bool,
    },
    /// Approve (or reject with --reject) an approval step that is waiting.
    Approve {
        /// Run id.
        run: String,
        /// The approval step's id.
        step: String,
        /// Reject instead of approve.
        #[arg(long)]
        reject: bool,
        /// Comment recorded in the history.
        #[arg(long, default_value = "")]
        comment: String,
        /// Decision id; a repeated id is ignored [default: generated].
        #[arg(long)]
        id: Option<String>,
    },
    /// Show the agent's state: active runs, activity slots, journal counters, timers.
    Status,
    /// List stored workflow definitions.
    Definitions,
    /// Benchmark W1: many short runs through the local API against a fresh agent process.
    Bench(crate::bench::BenchArgs),
    /// Run a Modbus TCP simulator (an in-memory PLC) for recipes and tests; logs writes as JSON.
    ModbusSim(ModbusSimArgs),
    /// Run an OPC UA server simulator (nodes from --node) for recipes and tests; logs writes as JSON.
    #[cfg(feature = "opcua-sim")]
    OpcuaSim(OpcuaSimArgs),
    /// Read every row of the journal file (DATA_DIR/journal.redb) and say whether it is whole.
    /// `outpost run` does this in a child process before it opens the journal, so a damaged
    /// file is refused by name instead of crashing the agent.
    JournalCheck {
        /// The journal file [default: DATA_DIR/journal.redb].
        #[arg(long)]
        file: Option<PathBuf>,
    },
    /// Make this gateway's private key (it never leaves DATA_DIR/identity/) and print a
    /// certificate signing request for the fleet: `outpost-cloud pki sign` answers it.
    Keygen {
        /// The gateway's id in the fleet (the certificate's subject and its MQTT identity).
        #[arg(long, env = "OUTPOST_DEVICE_ID")]
        device_id: String,
        /// Make the next key for a certificate rotation; the current one stays in use until
        /// `outpost enroll` installs the new certificate.
        #[arg(long)]
        rotate: bool,
    },
    /// Install what the fleet sent back: this gateway's certificate and, on first enrollment,
    /// the fleet CA and the fleet's public signing key. A running agent switches on its next
    /// connect.
    Enroll {
        /// The certificate `outpost-cloud pki sign` made.
        #[arg(long)]
        cert: PathBuf,
        /// The fleet CA certificate (ca.crt).
        #[arg(long)]
        ca: Option<PathBuf>,
        /// The fleet's public signing key (fleet.pub).
        #[arg(long)]
        fleet_key: Option<PathBuf>,
    },
}

#[derive(Args)]
pub(super) struct ModbusSimArgs {
    /// Address to listen on (Modbus TCP).
    #[arg(long, default_value = "127.0.0.1:5020")]
    pub(super) listen: String,
    /// Serve Modbus RTU on this serial device instead of TCP.
    #[arg(long, value_name = "DEVICE")]
    pub(super) rtu: Option<String>,
    /// Baud rate with --rtu.
    #[arg(long, default_value_t = 9600)]
    pub(super) baud: u32,
    /// Answer the first N requests with exception 0x06 (server device busy).
    #[arg(long, default_value_t = 0)]
    pub(super) busy_first: u32,
    /// Delay every answer by this many milliseconds.
    #[arg(long, default_value_t = 0)]
    pub(super) delay_ms: u64,
    /// Addresses at or above this are illegal (exception 0x02) [default: every address is legal].
    #[arg(long)]
    pub(super) limit: Option<u16>,
    /// Clamp writes to a holding register: ADDRESS=MAX (a PLC enforcing a limit).
    #[arg(long, value_name = "ADDRESS=MAX")]
    pub(super) clamp: Vec<String>,
    /// Answer register reads with one register fewer than asked (a faulty unit).
    #[arg(long)]
    pub(super) short_reads: bool,
}

#[cfg(feature = "opcua-sim")]
#[derive(Args)]
pub(super) struct OpcuaSimArgs {
    /// Address to listen on (OPC UA binary, opc.tcp).
    #[arg(long, default_value = "127.0.0.1:4840")]
    pub(super) listen: String,
    /// A node: NAME=TYPE[=VALUE], e.g. `Speed=UInt16=900`, `Setpoint=Float=72.5`, `Mode=String=auto`;
    /// its node id is `ns=2;s=NAME`. Repeat for more.
    #[arg(long, value_name = "NAME=TYPE[=VALUE]")]
    pub(super) node: Vec<String>,
    /// Cap writes to a numeric node: NAME=MAX (a PLC enforcing a limit).
    #[arg(long, value_name = "NAME=MAX")]
    pub(super) clamp: Vec<String>,
    /// Require this user (NAME:PASSWORD) instead of anonymous sessions. Repeat for more.
    #[arg(long, value_name = "NAME:PASSWORD")]
    pub(super) user: Vec<String>,
    /// Offer only Basic256Sha256 with SignAndEncrypt (no unsecured endpoint).
    #[arg(long)]
    pub(super) only_secure: bool,
    /// Require a user who signs in with this certificate (NAME:CERT_FILE, DER or PEM) instead of
    /// anonymous sessions. Repeat for more.
    #[arg(long, value_name = "NAME:CERT_FILE")]
    pub(super) user_cert: Vec<String>,
    /// A method `ns=2;s=NAME` on the `ns=2;s=outpost-sim` object taking inputs of these types,
    /// e.g. `StartJob=String,UInt32`: logs each call and returns one UInt32 (the number of calls
    /// so far). Repeat for more.
    #[arg(long, value_name = "NAME[=TYPE,...]")]
    pub(super) method: Vec<String>,
    /// Count a numeric node up by one every interval, as a PLC's part counter does:
    /// NAME=DURATION, e.g. `Parts=2s`. Its source timestamp is when it last changed.
    #[arg(long, value_name = "NAME=DURATION")]
    pub(super) tick: Vec<String>,
    /// Take this long over each node written (a slow PLC).
    #[arg(long, value_name = "MS", default_value_t = 0)]
    pub(super) delay_ms: u64,
    /// The server's certificate, key and trusted client certificates [default: a temporary directory].
    #[arg(long, value_name = "DIR")]
    pub(super) pki_dir: Option<PathBuf>,
}

#[derive(Args)]
pub(super) struct RunArgs {
    /// Activities that may run at once, agent-wide.
    #[arg(
        long,
        default_value_t = 32,
        env = "OUTPOST_MAX_ACTIVITIES",
        help_heading = "Run limits"
    )]
    pub(super) max_activities: usize,
    /// Runs active at once, agent-wide (0: no limit); more wait in the admission queue.
    #[arg(long, default_value_t = 0, env = "OUTPOST_MAX_RUNS", help_heading = "Run limits")]
    pub(super) max_runs: usize,
    /// Runs that may wait for a run slot before starts are rejected.
    #[arg(long, default_value_t = 1000, env = "OUTPOST_QUEUE", help_heading = "Run limits")]
    pub(super) queue: usize,
    /// When no run slot is free: queue the start, or reject it at once.
    #[arg(long, value_enum, default_value_t = WhenFull::Queue, env = "OUTPOST_WHEN_FULL", help_heading = "Run limits")]
    pub(super) when_full: WhenFull,
    /// Activities at once for one action kind, e.g. `--limit exec=4 --limit modbus.write=1`.
    #[arg(long, value_name = "ACTION=N", value_parser = crate::limits::parse_pair, help_heading = "Run limits")]
    pub(super) limit: Vec<(String, usize)>,
    /// Activities at once for a named resource that steps declare with `resource: NAME`,
    /// e.g. `--resource rs485=1` (an undeclared resource allows 1).
    #[arg(long, value_name = "NAME=N", value_parser = crate::limits::parse_pair, help_heading = "Run limits")]
    pub(super) resource: Vec<(String, usize)>,
    /// Sync with cloud-sync through this MQTT broker, e.g. `mqtt://cloud.example:1883`
    /// (the agent works the same without it, and while it is unreachable).
    #[arg(long, env = "OUTPOST_BROKER", value_name = "URL", help_heading = "Cloud sync")]
    pub(super) broker: Option<String>,
    /// This gateway's id in the fleet [default: the host name].
    #[arg(long, env = "OUTPOST_DEVICE_ID", help_heading = "Cloud sync")]
    pub(super) device_id: Option<String>,
    /// CA certificate (PEM) that signs the broker's certificate [default: DATA_DIR/identity/ca.crt].
    #[arg(long, env = "OUTPOST_CA", value_name = "FILE", help_heading = "Security")]
    pub(super) ca: Option<PathBuf>,
    /// This gateway's certificate (PEM) [default: DATA_DIR/identity/device.crt].
    #[arg(long, env = "OUTPOST_CERT", value_name = "FILE", help_heading = "Security")]
    pub(super) cert: Option<PathBuf>,
    /// This gateway's Ed25519 private key (PEM); it also signs every message to the cloud
    /// [default: DATA_DIR/identity/device.key].
    #[arg(long, env = "OUTPOST_KEY", value_name = "FILE", help_heading = "Security")]
    pub(super) key: Option<PathBuf>,
    /// The fleet's public signing key (PEM); every order from the cloud must carry its
    /// signature [default: DATA_DIR/identity/fleet.pub].
    #[arg(long, env = "OUTPOST_FLEET_KEY", value_name = "FILE", help_heading = "Security")]
    pub(super) fleet_key: Option<PathBuf>,
    /// What definitions deployed from the cloud may do: allowed exec commands, http hosts and
    /// equipment writes (YAML; see docs). Without it, deployed definitions may not use exec.
    /// Definitions applied locally are not checked.
    #[arg(long, env = "OUTPOST_POLICY", value_name = "FILE", help_heading = "Security")]
    pub(super) policy: Option<PathBuf>,
    /// INSECURE: allow plain-text mqtt:// to a broker on another machine.
    #[arg(long, help_heading = "Security")]
    pub(super) insecure_plaintext: bool,
    /// INSECURE: neither sign nor check messages (protocol v1); anyone who can publish on the
    /// broker can then command this gateway. For tests and old fleets only.
    #[arg(long, help_heading = "Security")]
    pub(super) insecure_unsigned: bool,
    /// A label deployments can target, e.g. `--label line=3` (repeatable).
    #[arg(long, value_name = "KEY=VALUE", value_parser = parse_label, help_heading = "Cloud sync")]
    pub(super) label: Vec<(String, String)>,
    /// Topic prefix shared with cloud-sync.
    #[arg(long, default_value = outpost_shared::protocol::DEFAULT_PREFIX, env = "OUTPOST_SYNC_PREFIX", help_heading = "Cloud sync")]
    pub(super) sync_prefix: String,
    /// Events not yet acknowledged by the cloud beyond which new runs are refused (nothing is dropped).
    #[arg(
        long,
        default_value_t = 2_000_000,
        env = "OUTPOST_OUTBOX_MAX_EVENTS",
        help_heading = "Cloud sync"
    )]
    pub(super) outbox_max_events: u64,
    /// Workflow that brings the device to the cloud's desired state; it gets `desired` as input and
    /// must output the state it verified (compared exactly before "in sync" is reported).
    #[arg(
        long,
        env = "OUTPOST_REMEDIATION",
        value_name = "WORKFLOW",
        help_heading = "Cloud sync"
    )]
    pub(super) remediation: Option<String>,
    /// Re-read the equipment points the desired document sets this often, and on every
    /// reconnect, reporting drift as soon as it is seen (`off`: only on reconnect).
    #[arg(
        long,
        default_value = "5m",
        env = "OUTPOST_VERIFY_EVERY",
        value_name = "DURATION|off",
        value_parser = verify_every_arg,
        help_heading = "Cloud sync"
    )]
    pub(super) verify_every: Duration,
    /// What a drift from a verified desired state leads to: `report` it, or also `remediate`
    /// (the remediation workflow runs again, once per drift).
    #[arg(
        long,
        value_enum,
        default_value = "report",
        env = "OUTPOST_ON_DRIFT",
        help_heading = "Cloud sync"
    )]
    pub(super) on_drift: crate::desired::OnDrift,
    /// Backlog drain limit in events per second.
    #[arg(
        long,
        default_value_t = 100_000,
        env = "OUTPOST_DRAIN_RATE",
        help_heading = "Cloud sync"
    )]
    pub(super) drain_rate: u64,
    /// Local MQTT broker for `mqtt` triggers, e.g. `mqtt://127.0.0.1:1883`.
    #[arg(
        long,
        env = "OUTPOST_MQTT_BROKER",
        value_name = "URL",
        help_heading = "Triggers and equipment"
    )]
    pub(super) mqtt_broker: Option<String>,
    /// MQTT client id for triggers; fixed so the broker keeps the session [default: outpost-HOSTNAME].
    #[arg(long, env = "OUTPOST_MQTT_CLIENT_ID", help_heading = "Triggers and equipment")]
    pub(super) mqtt_client_id: Option<String>,
    /// Finished runs are deleted this long after they end (journal retention).
    #[arg(
        long,
        default_value = "7d",
        env = "OUTPOST_RETENTION",
        help_heading = "Journal and retention"
    )]
    pub(super) retention: humantime::Duration,
    /// Sooner, oldest first, while the journal holds more than this many MiB.
    #[arg(
        long,
        default_value_t = 64,
        env = "OUTPOST_RETENTION_MAX_MB",
        help_heading = "Journal and retention"
    )]
    pub(super) retention_max_mb: u64,
    /// How often retention runs.
    #[arg(
        long,
        default_value = "60s",
        env = "OUTPOST_PRUNE_INTERVAL",
        help_heading = "Journal and retention"
    )]
    pub(super) prune_interval: humantime::Duration,
    /// Consecutive retryable failures against one target (host, device, resource) that open
    /// its circuit breaker.
    #[arg(
        long,
        default_value_t = 5,
        env = "OUTPOST_BREAKER_THRESHOLD",
        help_heading = "Resilience"
    )]
    pub(super) breaker_threshold: u32,
    /// How long an open breaker holds attempts before one probes (doubles per failed probe, up to 5m).
    #[arg(
        long,
        default_value = "5s",
        env = "OUTPOST_BREAKER_COOLDOWN",
        help_heading = "Resilience"
    )]
    pub(super) breaker_cooldown: humantime::Duration,
    /// Also serve Prometheus metrics over TCP here, e.g. `127.0.0.1:9464` (always on the
    /// socket's `/metrics`).
    #[arg(long, env = "OUTPOST_METRICS_LISTEN", value_name = "ADDR", help_heading = "Process")]
    pub(super) metrics_listen: Option<std::net::SocketAddr>,
    /// Park a run whose next timer is at least this far off, or that waits only for a signal
    /// or an approval: its state leaves memory until the timer or a request wakes it, then is
    /// read back from the journal. `0` keeps every run in memory.
    #[arg(
        long,
        default_value = "5s",
        env = "OUTPOST_PARK_AFTER",
        value_name = "DURATION",
        help_heading = "Run limits"
    )]
    pub(super) park_after: humantime::Duration,
    /// How long a group commit may wait for more writes while they keep coming: fewer, fuller
    /// commits write less to flash (SD cards and eMMC wear out) at some latency; `0` commits at
    /// once (docs/journal.md has the figures).
    #[arg(
        long,
        default_value = "1ms",
        env = "OUTPOST_COMMIT_LINGER",
        value_name = "DURATION",
        help_heading = "Journal and retention"
    )]
    pub(super) commit_linger: humantime::Duration,
    /// Size in KiB of the segment log beside the journal (`journal.log`, written once with zeros
    /// and then reused): group commits append one block there, a page or two, instead of
    /// rewriting redb's pages; a checkpoint moves them into the journal. `0` turns it off and
    /// commits every group to the journal file directly (docs/journal.md has the figures).
    #[arg(
        long,
        default_value_t = 4096,
        env = "OUTPOST_JOURNAL_LOG_KB",
        value_name = "KIB",
        help_heading = "Journal and retention"
    )]
    pub(super) journal_log_kb: u64,
    /// Journal page cache in MiB.
    #[arg(
        long,
        default_value_t = 2,
        env = "OUTPOST_CACHE_MB",
        help_heading = "Journal and retention"
    )]
    pub(super) cache_mb: usize,
    /// Tokio worker threads.
    #[arg(long, default_value_t = 2, env = "OUTPOST_WORKER_THREADS", help_heading = "Process")]
    pub(super) worker_threads: usize,
    /// Apply these definition files at start-up (fails on an invalid one).
    #[arg(
        long = "apply",
        value_name = "FILE",
        help_heading = "Start-up (for demos and one-shot jobs)"
    )]
    pub(super) apply: Vec<PathBuf>,
    /// Start a run of this workflow once the agent is up, and print its result.
    #[arg(
        long = "start",
        value_name = "WORKFLOW",
        help_heading = "Start-up (for demos and one-shot jobs)"
    )]
    pub(super) start: Option<String>,
    /// Input (JSON) for --start.
    #[arg(long, requires = "start", help_heading = "Start-up (for demos and one-shot jobs)")]
    pub(super) input: Option<String>,
    /// Exit when the --start run finishes (exit code 0 if it completed, 6 otherwise).
    #[arg(long, requires = "start", help_heading = "Start-up (for demos and one-shot jobs)")]
    pub(super) once: bool,
    /// Equipment file: devices for the gpio/sensor/adc/modbus actions.
    #[arg(long, env = "OUTPOST_EQUIPMENT", help_heading = "Triggers and equipment")]
    pub(super) equipment: Option<PathBuf>,
}

#[derive(Args)]
pub(super) struct StartArgs {
    /// Workflow name.
    pub(super) workflow: String,
    /// Input as JSON text.
    #[arg(long, conflicts_with = "input_file")]
    pub(super) input: Option<String>,
    /// Input read from a JSON file.
    #[arg(long, value_name = "FILE")]
    pub(super) input_file: Option<PathBuf>,
    /// Run id, to make the start safe to repeat: the same id and input again returns that run
    /// instead of starting another; the same id with another input is refused (exit code 7).
    #[arg(long)]
    pub(super) id: Option<String>,
    /// Definition version [default: latest].
    #[arg(long)]
    pub(super) version: Option<u32>,
    /// Wait for the run to finish and print its result.
    #[arg(long)]
    pub(super) wait: bool,
    /// With --wait: give up after this long (exit code 8): `90s`, `5m`, or plain seconds.
    #[arg(long, default_value = "1h", value_parser = seconds_arg)]
    pub(super) timeout: f64,
}

pub(super) fn parse_label(s: &str) -> Result<(String, String), String> {
    let (k, v) = s.split_once('=').ok_or_else(|| format!("'{s}' is not KEY=VALUE"))?;
    if k.is_empty() {
        return Err(format!("'{s}' has an empty key"));
    }
    Ok((k.to_string(), v.to_string()))
}

/// One table row per element of a JSON array.
/// A duration option in seconds: `5s`, `2m`, `1h30m` like every other duration, or a plain number.
pub(super) fn seconds_arg(text: &str) -> Result<f64, String> {
    if let Ok(secs) = text.trim().parse::<f64>() {
        return if secs.is_finite() && secs >= 0.0 {
            Ok(secs)
        } else {
            Err(format!("'{text}' is not a duration (try 30s, 5m or 1h)"))
        };
    }
    outpost_shared::definition::parse_duration(text)
        .map(|d| d.as_secs_f64())
        .map_err(|e| format!("{e} (try 30s, 5m or 1h)"))
}

/// `--verify-every`: a duration, or `off` (zero).
pub(super) fn verify_every_arg(text: &str) -> Result<Duration, String> {
    if matches!(text.trim(), "off" | "0") {
        return Ok(Duration::ZERO);
    }
    outpost_shared::definition::parse_duration(text).map_err(|e| format!("{e} (try 30s, 5m, 1h or off)"))
}
