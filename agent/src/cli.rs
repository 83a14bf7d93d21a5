//! The `outpost` command line: the daemon (`outpost run`) and the commands that talk to it.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use hyper::{Method, StatusCode};
use outpost_shared::run::{CompensationStatus, StepRow};
use serde_json::{Value, json};
use tracing::{error, info, warn};

use crate::actions::Registry;
use crate::client::{Client, ClientError};
use crate::journal::JournalConfig;
use crate::limits::{LimitsConfig, WhenFull};
use crate::runtime::{Runtime, RuntimeConfig, StartRequest};

/// Exit codes scripts can rely on.
pub mod exit {
    /// Success.
    pub const OK: u8 = 0;
    /// An unexpected error (storage, I/O).
    pub const FAILURE: u8 = 1;
    /// Bad command-line usage (clap).
    pub const USAGE: u8 = 2;
    /// Invalid input: a definition, JSON input, a run id.
    pub const INVALID: u8 = 3;
    /// No such workflow or run.
    pub const NOT_FOUND: u8 = 4;
    /// The agent is not reachable.
    pub const UNREACHABLE: u8 = 5;
    /// The run ended failed or cancelled (with --wait / wait).
    pub const RUN_UNSUCCESSFUL: u8 = 6;
    /// Conflict: a definition version with other content, or the run already finished.
    pub const CONFLICT: u8 = 7;
    /// Waited and the run is still running.
    pub const STILL_RUNNING: u8 = 8;
    /// The start was rejected: run limits and the admission queue are full.
    pub const BUSY: u8 = 9;
}

const EXIT_CODES_HELP: &str = "Exit codes: 0 ok, 1 error, 2 usage, 3 invalid input, 4 not found, \
5 agent unreachable, 6 run did not complete, 7 conflict, 8 still running after --timeout, \
9 start rejected by run limits.";

const RUN_EXAMPLES: &str = "Examples:
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
struct Cli {
    /// Data directory of the agent: the journal and the API socket live here.
    #[arg(long, global = true, env = "OUTPOST_DATA_DIR", default_value = "outpost-data")]
    data_dir: PathBuf,
    /// Path of the running agent's API socket, for the commands that talk to it (`bench`
    /// starts its own agent and ignores it) [default: DATA_DIR/outpost.sock].
    #[arg(long, global = true, env = "OUTPOST_SOCKET")]
    socket: Option<PathBuf>,
    /// Print JSON instead of tables and text (for scripts); `bench` prints its figures as one
    /// JSON object. Same as `-o json`.
    #[arg(long, global = true)]
    json: bool,
    /// Output format: `table` (cells cut at 80 characters on a terminal), `wide` (nothing cut),
    /// `json`. Piped output is never cut.
    #[arg(long, short = 'o', global = true, value_enum, default_value_t = Output::Table)]
    output: Output,
    #[command(subcommand)]
    command: Cmd,
}

/// How commands print what they get.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Output {
    /// Tables and text for a person.
    Table,
    /// Tables with nothing cut.
    Wide,
    /// JSON for scripts.
    Json,
}

/// Set once at start: tables cut long cells only for a person at a terminal with `-o table`.
static CUT_CELLS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

#[derive(Subcommand)]
enum Cmd {
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
struct ModbusSimArgs {
    /// Address to listen on (Modbus TCP).
    #[arg(long, default_value = "127.0.0.1:5020")]
    listen: String,
    /// Serve Modbus RTU on this serial device instead of TCP.
    #[arg(long, value_name = "DEVICE")]
    rtu: Option<String>,
    /// Baud rate with --rtu.
    #[arg(long, default_value_t = 9600)]
    baud: u32,
    /// Answer the first N requests with exception 0x06 (server device busy).
    #[arg(long, default_value_t = 0)]
    busy_first: u32,
    /// Delay every answer by this many milliseconds.
    #[arg(long, default_value_t = 0)]
    delay_ms: u64,
    /// Addresses at or above this are illegal (exception 0x02) [default: every address is legal].
    #[arg(long)]
    limit: Option<u16>,
    /// Clamp writes to a holding register: ADDRESS=MAX (a PLC enforcing a limit).
    #[arg(long, value_name = "ADDRESS=MAX")]
    clamp: Vec<String>,
    /// Answer register reads with one register fewer than asked (a faulty unit).
    #[arg(long)]
    short_reads: bool,
}

#[cfg(feature = "opcua-sim")]
#[derive(Args)]
struct OpcuaSimArgs {
    /// Address to listen on (OPC UA binary, opc.tcp).
    #[arg(long, default_value = "127.0.0.1:4840")]
    listen: String,
    /// A node: NAME=TYPE[=VALUE], e.g. `Speed=UInt16=900`, `Setpoint=Float=72.5`, `Mode=String=auto`;
    /// its node id is `ns=2;s=NAME`. Repeat for more.
    #[arg(long, value_name = "NAME=TYPE[=VALUE]")]
    node: Vec<String>,
    /// Cap writes to a numeric node: NAME=MAX (a PLC enforcing a limit).
    #[arg(long, value_name = "NAME=MAX")]
    clamp: Vec<String>,
    /// Require this user (NAME:PASSWORD) instead of anonymous sessions. Repeat for more.
    #[arg(long, value_name = "NAME:PASSWORD")]
    user: Vec<String>,
    /// Offer only Basic256Sha256 with SignAndEncrypt (no unsecured endpoint).
    #[arg(long)]
    only_secure: bool,
    /// Require a user who signs in with this certificate (NAME:CERT_FILE, DER or PEM) instead of
    /// anonymous sessions. Repeat for more.
    #[arg(long, value_name = "NAME:CERT_FILE")]
    user_cert: Vec<String>,
    /// A method `ns=2;s=NAME` on the `ns=2;s=outpost-sim` object taking inputs of these types,
    /// e.g. `StartJob=String,UInt32`: logs each call and returns one UInt32 (the number of calls
    /// so far). Repeat for more.
    #[arg(long, value_name = "NAME[=TYPE,...]")]
    method: Vec<String>,
    /// Count a numeric node up by one every interval, as a PLC's part counter does:
    /// NAME=DURATION, e.g. `Parts=2s`. Its source timestamp is when it last changed.
    #[arg(long, value_name = "NAME=DURATION")]
    tick: Vec<String>,
    /// Take this long over each node written (a slow PLC).
    #[arg(long, value_name = "MS", default_value_t = 0)]
    delay_ms: u64,
    /// The server's certificate, key and trusted client certificates [default: a temporary directory].
    #[arg(long, value_name = "DIR")]
    pki_dir: Option<PathBuf>,
}

#[derive(Args)]
struct RunArgs {
    /// Activities that may run at once, agent-wide.
    #[arg(
        long,
        default_value_t = 32,
        env = "OUTPOST_MAX_ACTIVITIES",
        help_heading = "Run limits"
    )]
    max_activities: usize,
    /// Runs active at once, agent-wide (0: no limit); more wait in the admission queue.
    #[arg(long, default_value_t = 0, env = "OUTPOST_MAX_RUNS", help_heading = "Run limits")]
    max_runs: usize,
    /// Runs that may wait for a run slot before starts are rejected.
    #[arg(long, default_value_t = 1000, env = "OUTPOST_QUEUE", help_heading = "Run limits")]
    queue: usize,
    /// When no run slot is free: queue the start, or reject it at once.
    #[arg(long, value_enum, default_value_t = WhenFull::Queue, env = "OUTPOST_WHEN_FULL", help_heading = "Run limits")]
    when_full: WhenFull,
    /// Activities at once for one action kind, e.g. `--limit exec=4 --limit modbus.write=1`.
    #[arg(long, value_name = "ACTION=N", value_parser = crate::limits::parse_pair, help_heading = "Run limits")]
    limit: Vec<(String, usize)>,
    /// Activities at once for a named resource that steps declare with `resource: NAME`,
    /// e.g. `--resource rs485=1` (an undeclared resource allows 1).
    #[arg(long, value_name = "NAME=N", value_parser = crate::limits::parse_pair, help_heading = "Run limits")]
    resource: Vec<(String, usize)>,
    /// Sync with cloud-sync through this MQTT broker, e.g. `mqtt://cloud.example:1883`
    /// (the agent works the same without it, and while it is unreachable).
    #[arg(long, env = "OUTPOST_BROKER", value_name = "URL", help_heading = "Cloud sync")]
    broker: Option<String>,
    /// This gateway's id in the fleet [default: the host name].
    #[arg(long, env = "OUTPOST_DEVICE_ID", help_heading = "Cloud sync")]
    device_id: Option<String>,
    /// CA certificate (PEM) that signs the broker's certificate [default: DATA_DIR/identity/ca.crt].
    #[arg(long, env = "OUTPOST_CA", value_name = "FILE", help_heading = "Security")]
    ca: Option<PathBuf>,
    /// This gateway's certificate (PEM) [default: DATA_DIR/identity/device.crt].
    #[arg(long, env = "OUTPOST_CERT", value_name = "FILE", help_heading = "Security")]
    cert: Option<PathBuf>,
    /// This gateway's Ed25519 private key (PEM); it also signs every message to the cloud
    /// [default: DATA_DIR/identity/device.key].
    #[arg(long, env = "OUTPOST_KEY", value_name = "FILE", help_heading = "Security")]
    key: Option<PathBuf>,
    /// The fleet's public signing key (PEM); every order from the cloud must carry its
    /// signature [default: DATA_DIR/identity/fleet.pub].
    #[arg(long, env = "OUTPOST_FLEET_KEY", value_name = "FILE", help_heading = "Security")]
    fleet_key: Option<PathBuf>,
    /// What definitions deployed from the cloud may do: allowed exec commands, http hosts and
    /// equipment writes (YAML; see docs). Without it, deployed definitions may not use exec.
    /// Definitions applied locally are not checked.
    #[arg(long, env = "OUTPOST_POLICY", value_name = "FILE", help_heading = "Security")]
    policy: Option<PathBuf>,
    /// INSECURE: allow plain-text mqtt:// to a broker on another machine.
    #[arg(long, help_heading = "Security")]
    insecure_plaintext: bool,
    /// INSECURE: neither sign nor check messages (protocol v1); anyone who can publish on the
    /// broker can then command this gateway. For tests and old fleets only.
    #[arg(long, help_heading = "Security")]
    insecure_unsigned: bool,
    /// A label deployments can target, e.g. `--label line=3` (repeatable).
    #[arg(long, value_name = "KEY=VALUE", value_parser = parse_label, help_heading = "Cloud sync")]
    label: Vec<(String, String)>,
    /// Topic prefix shared with cloud-sync.
    #[arg(long, default_value = outpost_shared::protocol::DEFAULT_PREFIX, env = "OUTPOST_SYNC_PREFIX", help_heading = "Cloud sync")]
    sync_prefix: String,
    /// Events not yet acknowledged by the cloud beyond which new runs are refused (nothing is dropped).
    #[arg(
        long,
        default_value_t = 2_000_000,
        env = "OUTPOST_OUTBOX_MAX_EVENTS",
        help_heading = "Cloud sync"
    )]
    outbox_max_events: u64,
    /// Workflow that brings the device to the cloud's desired state; it gets `desired` as input and
    /// must output the state it verified (compared exactly before "in sync" is reported).
    #[arg(
        long,
        env = "OUTPOST_REMEDIATION",
        value_name = "WORKFLOW",
        help_heading = "Cloud sync"
    )]
    remediation: Option<String>,
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
    verify_every: Duration,
    /// What a drift from a verified desired state leads to: `report` it, or also `remediate`
    /// (the remediation workflow runs again, once per drift).
    #[arg(
        long,
        value_enum,
        default_value = "report",
        env = "OUTPOST_ON_DRIFT",
        help_heading = "Cloud sync"
    )]
    on_drift: crate::desired::OnDrift,
    /// Backlog drain limit in events per second.
    #[arg(
        long,
        default_value_t = 100_000,
        env = "OUTPOST_DRAIN_RATE",
        help_heading = "Cloud sync"
    )]
    drain_rate: u64,
    /// Local MQTT broker for `mqtt` triggers, e.g. `mqtt://127.0.0.1:1883`.
    #[arg(
        long,
        env = "OUTPOST_MQTT_BROKER",
        value_name = "URL",
        help_heading = "Triggers and equipment"
    )]
    mqtt_broker: Option<String>,
    /// MQTT client id for triggers; fixed so the broker keeps the session [default: outpost-HOSTNAME].
    #[arg(long, env = "OUTPOST_MQTT_CLIENT_ID", help_heading = "Triggers and equipment")]
    mqtt_client_id: Option<String>,
    /// Finished runs are deleted this long after they end (journal retention).
    #[arg(
        long,
        default_value = "7d",
        env = "OUTPOST_RETENTION",
        help_heading = "Journal and retention"
    )]
    retention: humantime::Duration,
    /// Sooner, oldest first, while the journal holds more than this many MiB.
    #[arg(
        long,
        default_value_t = 64,
        env = "OUTPOST_RETENTION_MAX_MB",
        help_heading = "Journal and retention"
    )]
    retention_max_mb: u64,
    /// How often retention runs.
    #[arg(
        long,
        default_value = "60s",
        env = "OUTPOST_PRUNE_INTERVAL",
        help_heading = "Journal and retention"
    )]
    prune_interval: humantime::Duration,
    /// Consecutive retryable failures against one target (host, device, resource) that open
    /// its circuit breaker.
    #[arg(
        long,
        default_value_t = 5,
        env = "OUTPOST_BREAKER_THRESHOLD",
        help_heading = "Resilience"
    )]
    breaker_threshold: u32,
    /// How long an open breaker holds attempts before one probes (doubles per failed probe, up to 5m).
    #[arg(
        long,
        default_value = "5s",
        env = "OUTPOST_BREAKER_COOLDOWN",
        help_heading = "Resilience"
    )]
    breaker_cooldown: humantime::Duration,
    /// Also serve Prometheus metrics over TCP here, e.g. `127.0.0.1:9464` (always on the
    /// socket's `/metrics`).
    #[arg(long, env = "OUTPOST_METRICS_LISTEN", value_name = "ADDR", help_heading = "Process")]
    metrics_listen: Option<std::net::SocketAddr>,
    /// Journal page cache in MiB.
    #[arg(
        long,
        default_value_t = 4,
        env = "OUTPOST_CACHE_MB",
        help_heading = "Journal and retention"
    )]
    cache_mb: usize,
    /// Tokio worker threads.
    #[arg(long, default_value_t = 2, env = "OUTPOST_WORKER_THREADS", help_heading = "Process")]
    worker_threads: usize,
    /// Apply these definition files at start-up (fails on an invalid one).
    #[arg(
        long = "apply",
        value_name = "FILE",
        help_heading = "Start-up (for demos and one-shot jobs)"
    )]
    apply: Vec<PathBuf>,
    /// Start a run of this workflow once the agent is up, and print its result.
    #[arg(
        long = "start",
        value_name = "WORKFLOW",
        help_heading = "Start-up (for demos and one-shot jobs)"
    )]
    start: Option<String>,
    /// Input (JSON) for --start.
    #[arg(long, requires = "start", help_heading = "Start-up (for demos and one-shot jobs)")]
    input: Option<String>,
    /// Exit when the --start run finishes (exit code 0 if it completed, 6 otherwise).
    #[arg(long, requires = "start", help_heading = "Start-up (for demos and one-shot jobs)")]
    once: bool,
    /// Equipment file: devices for the gpio/sensor/adc/modbus actions.
    #[arg(long, env = "OUTPOST_EQUIPMENT", help_heading = "Triggers and equipment")]
    equipment: Option<PathBuf>,
}

#[derive(Args)]
struct StartArgs {
    /// Workflow name.
    workflow: String,
    /// Input as JSON text.
    #[arg(long, conflicts_with = "input_file")]
    input: Option<String>,
    /// Input read from a JSON file.
    #[arg(long, value_name = "FILE")]
    input_file: Option<PathBuf>,
    /// Run id, to make the start safe to repeat: the same id and input again returns that run
    /// instead of starting another; the same id with another input is refused (exit code 7).
    #[arg(long)]
    id: Option<String>,
    /// Definition version [default: latest].
    #[arg(long)]
    version: Option<u32>,
    /// Wait for the run to finish and print its result.
    #[arg(long)]
    wait: bool,
    /// With --wait: give up after this long (exit code 8): `90s`, `5m`, or plain seconds.
    #[arg(long, default_value = "1h", value_parser = seconds_arg)]
    timeout: f64,
}

/// A failed command: what to print and which exit code to use.
struct Failure {
    code: u8,
    message: String,
}

impl Failure {
    fn new(code: u8, message: impl Into<String>) -> Self {
        Failure {
            code,
            message: message.into(),
        }
    }
}

impl From<ClientError> for Failure {
    fn from(e: ClientError) -> Self {
        let code = if matches!(e, ClientError::Connect { .. }) {
            exit::UNREACHABLE
        } else {
            exit::FAILURE
        };
        Failure::new(code, e.to_string())
    }
}

impl From<anyhow::Error> for Failure {
    fn from(e: anyhow::Error) -> Self {
        Failure::new(exit::FAILURE, format!("{e:#}"))
    }
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    let mut cli = Cli::parse();
    cli.json |= cli.output == Output::Json;
    CUT_CELLS.store(
        cli.output == Output::Table && std::io::stdout().is_terminal(),
        std::sync::atomic::Ordering::Relaxed,
    );
    let socket = cli.socket.clone().unwrap_or_else(|| cli.data_dir.join("outpost.sock"));
    let result = match cli.command {
        Cmd::Run(args) => run_daemon(&cli.data_dir, &socket, *args),
        Cmd::Validate { files, equipment } => validate(&files, equipment.as_deref(), cli.json),
        Cmd::ModbusSim(args) => run_modbus_sim(args),
        #[cfg(feature = "opcua-sim")]
        Cmd::OpcuaSim(args) => run_opcua_sim(args),
        Cmd::JournalCheck { file } => {
            journal_check(&file.unwrap_or_else(|| cli.data_dir.join("journal.redb")), cli.json)
        }
        Cmd::Bench(args) => block_on(async { crate::bench::run(args, cli.json).await.map_err(Failure::from) }),
        Cmd::Keygen { device_id, rotate } => keygen(&cli.data_dir, &device_id, rotate),
        Cmd::Enroll { cert, ca, fleet_key } => {
            match crate::identity::enroll(&cli.data_dir, &cert, ca.as_deref(), fleet_key.as_deref()) {
                Ok(done) => {
                    for line in done {
                        println!("{line}");
                    }
                    // A running agent switches now; none running: it uses them when it starts.
                    let asked = block_on(async {
                        Client::new(socket.clone())
                            .request(Method::POST, "/v1/sync/reconnect", None)
                            .await
                            .map_err(Failure::from)
                    });
                    if let Ok((_, v)) = asked
                        && v["reconnecting"] == true
                    {
                        println!("the running agent reconnects with them now");
                    }
                    Ok(exit::OK)
                }
                Err(e) => Err(Failure::new(exit::INVALID, e)),
            }
        }
        other => block_on(remote(Client::new(socket), other, cli.json, &cli.data_dir)),
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(f) => {
            eprintln!("error: {}", f.message);
            ExitCode::from(f.code)
        }
    }
}

fn block_on<T>(fut: impl std::future::Future<Output = Result<T, Failure>>) -> Result<T, Failure> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Failure::new(exit::FAILURE, format!("cannot start the async runtime: {e}")))?
        .block_on(fut)
}

fn init_tracing() {
    use tracing_subscriber::filter::Targets;
    use tracing_subscriber::prelude::*;
    let filter = match std::env::var("RUST_LOG") {
        Ok(s) if !s.trim().is_empty() => s.parse::<Targets>().unwrap_or_else(|e| {
            eprintln!("warning: RUST_LOG='{s}' is not a valid filter ({e}); using info");
            Targets::new().with_default(tracing::Level::INFO)
        }),
        _ => Targets::new().with_default(tracing::Level::INFO),
    };
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    let _ = tracing_subscriber::registry().with(filter).with(fmt).try_init();
}

fn read_document(path: &Path) -> Result<String, Failure> {
    let meta = std::fs::metadata(path).map_err(|e| Failure::new(exit::INVALID, format!("{}: {e}", path.display())))?;
    let limit = outpost_shared::definition::MAX_DOCUMENT_BYTES as u64;
    if meta.len() > limit {
        return Err(Failure::new(
            exit::INVALID,
            format!(
                "{}: {} bytes; a definition may be at most {limit} bytes",
                path.display(),
                meta.len()
            ),
        ));
    }
    std::fs::read_to_string(path).map_err(|e| Failure::new(exit::INVALID, format!("{}: {e}", path.display())))
}

/// Loads an equipment file.
fn load_equipment(path: &Path) -> Result<Arc<crate::equipment::Equipment>, Failure> {
    let text =
        std::fs::read_to_string(path).map_err(|e| Failure::new(exit::INVALID, format!("{}: {e}", path.display())))?;
    crate::equipment::Equipment::from_yaml(&text)
        .map(Arc::new)
        .map_err(|e| Failure::new(exit::INVALID, format!("{}: {e}", path.display())))
}

fn validate(files: &[PathBuf], equipment: Option<&Path>, as_json: bool) -> Result<u8, Failure> {
    let equipment = equipment.map(load_equipment).transpose()?;
    let registry = Registry::builtin().with_equipment(equipment);
    let mut code = exit::OK;
    let mut results = Vec::new();
    for f in files {
        let outcome = read_document(f).and_then(|text| {
            outpost_shared::definition::parse(&text, &registry)
                .map_err(|e| Failure::new(exit::INVALID, format!("{}: {e}", f.display())))
        });
        match outcome {
            Ok(def) => {
                if !as_json {
                    println!(
                        "ok: {} defines {} v{} ({}, {})",
                        f.display(),
                        def.name(),
                        def.version(),
                        outpost_shared::count(def.doc.steps.len() as u64, "step"),
                        match def.doc.kind {
                            outpost_shared::definition::Kind::Dag => "dag",
                            outpost_shared::definition::Kind::StateMachine => "state machine",
                        }
                    );
                }
                results.push(json!({"file": f, "ok": true, "name": def.name(), "version": def.version()}));
            }
            Err(e) => {
                code = code.max(e.code);
                if !as_json {
                    eprintln!("error: {}", e.message);
                }
                results.push(json!({"file": f, "ok": false, "error": e.message}));
            }
        }
    }
    if as_json {
        println!("{}", serde_json::to_string_pretty(&results).unwrap_or_default());
    }
    Ok(code)
}

/// Turns an error answer of the API into a failure with the matching exit code.
fn api_failure(status: StatusCode, body: &Value) -> Failure {
    let code = match status.as_u16() {
        400 | 413 | 422 => exit::INVALID,
        404 => exit::NOT_FOUND,
        409 => exit::CONFLICT,
        429 => exit::BUSY,
        _ => exit::FAILURE,
    };
    let err = &body["error"];
    let mut msg = err["message"]
        .as_str()
        .map(str::to_string)
        .unwrap_or_else(|| format!("{status}: {body}"));
    if let Some(problems) = err["problems"].as_array() {
        for p in problems {
            msg.push_str(&format!("\n  - {}", p.as_str().unwrap_or_default()));
        }
    }
    Failure::new(code, msg)
}

async fn call(client: &Client, method: Method, path: &str, body: Option<String>) -> Result<Value, Failure> {
    let (status, v) = client.request(method, path, body).await?;
    if status.is_success() {
        Ok(v)
    } else {
        Err(api_failure(status, &v))
    }
}

fn parse_input(text: &str, what: &str) -> Result<Value, Failure> {
    serde_json::from_str(text).map_err(|e| Failure::new(exit::INVALID, format!("{what} is not valid JSON: {e}")))
}

/// A broker address from an option.
fn broker_url(url: &str, option: &str) -> Result<outpost_shared::broker::BrokerUrl, Failure> {
    outpost_shared::broker::BrokerUrl::parse(url, option).map_err(|e| Failure::new(exit::INVALID, e))
}

/// `outpost keygen`: the key stays here; the request goes to stdout (and next to the key).
fn keygen(data_dir: &Path, device_id: &str, rotate: bool) -> Result<u8, Failure> {
    let out = crate::identity::keygen(data_dir, device_id, rotate).map_err(|e| Failure::new(exit::INVALID, e))?;
    eprintln!(
        "key written to {} (keep it here; it never needs to leave this gateway)
         signing request written to {}; have the fleet sign it:
           outpost-cloud pki sign {} --out {device_id}.crt
         then install the certificate here:
           outpost enroll --cert {device_id}.crt --ca ca.crt --fleet-key fleet.pub",
        out.key.display(),
        out.csr_path.display(),
        out.csr_path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("device.csr"),
    );
    print!("{}", out.csr);
    Ok(exit::OK)
}

fn host_name() -> String {
    let host = std::fs::read_to_string("/etc/hostname").unwrap_or_default();
    let host = host.trim();
    if host.is_empty() {
        "agent".into()
    } else {
        host.to_string()
    }
}

/// `outpost-HOSTNAME`: stable across restarts, distinct per gateway.
fn default_client_id() -> String {
    format!("outpost-{}", host_name())
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    let (k, v) = s.split_once('=').ok_or_else(|| format!("'{s}' is not KEY=VALUE"))?;
    if k.is_empty() {
        return Err(format!("'{s}' has an empty key"));
    }
    Ok((k.to_string(), v.to_string()))
}

/// The local user's name, recorded as who approved or retried.
fn current_user() -> String {
    std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .unwrap_or_else(|_| "operator".into())
}

fn show(v: &Value, as_json: bool, human: impl FnOnce(&Value)) {
    if as_json { print_json(v) } else { human(v) }
}

fn print_json(v: &Value) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

/// Exit code for a finished (or not) run.
fn run_exit(status: &str) -> u8 {
    match status {
        "completed" => exit::OK,
        "running" | "queued" => exit::STILL_RUNNING,
        _ => exit::RUN_UNSUCCESSFUL,
    }
}

/// Hands each of `run`'s events after `after` to `emit` as it is journaled, until the run ends
/// (or `deadline`).
async fn follow_run(
    client: &Client,
    run: &str,
    mut after: u64,
    deadline: Option<tokio::time::Instant>,
    emit: &mut dyn FnMut(&Value),
) -> Result<(), Failure> {
    loop {
        let wait = match deadline {
            Some(d) => d
                .saturating_duration_since(tokio::time::Instant::now())
                .min(Duration::from_secs(30)),
            None => Duration::from_secs(30),
        };
        let path = format!(
            "/v1/runs/{run}/events?after={after}&wait={}",
            wait.as_secs_f64().max(0.001)
        );
        let v = call(client, Method::GET, &path, None).await?;
        for e in v["events"].as_array().into_iter().flatten() {
            emit(e);
        }
        after = v["last_seq"].as_u64().unwrap_or(after);
        let ended = !matches!(v["status"].as_str(), Some("running" | "queued"));
        if ended || deadline.is_some_and(|d| tokio::time::Instant::now() >= d) {
            return Ok(());
        }
    }
}

/// The sync subsystem in one line: the link, the acknowledged sequence, the backlog, the last error.
fn sync_line(sync: &Value) -> String {
    if sync.is_null() {
        return "off (no --broker; runs are kept only here)".into();
    }
    let link = if sync["connected"] == true {
        format!("connected to {}", s(&sync["broker"]))
    } else {
        format!("DISCONNECTED from {} (retrying)", s(&sync["broker"]))
    };
    let mut line = format!(
        "{link}, acknowledged through seq {}, backlog {}",
        sync["acked_seq"],
        outpost_shared::count(sync["backlog_events"].as_u64().unwrap_or(0), "event")
    );
    if let Some(e) = sync["last_error"].as_object() {
        line.push_str(&format!(
            "; last error {}: {}",
            e.get("at").map(s).unwrap_or_default(),
            e.get("error").map(s).unwrap_or_default()
        ));
    }
    line
}

/// One line for a human following a run, or `None` for events the final result covers.
fn progress_line(e: &Value) -> Option<String> {
    let step = s(&e["step"]);
    let what = match s(&e["type"]).as_str() {
        "attempt_started" => match e["attempt"].as_u64() {
            Some(n) if n > 1 => format!("step {step} retrying (attempt {n})"),
            _ => format!("step {step} started"),
        },
        "attempt_failed" => format!(
            "step {step} attempt {} failed: {}",
            e["attempt"],
            s(&e["error"]["message"])
        ),
        "attempt_deferred" => format!("step {step} held back: {} is failing (circuit open)", s(&e["target"])),
        "step_completed" => format!("step {step} completed"),
        "step_failed" => format!("step {step} failed: {}", s(&e["error"]["message"])),
        "step_skipped" => format!("step {step} skipped"),
        "timer_set" => format!("step {step} sleeping"),
        "wait_started" => match s(&e["signal"]) {
            sig if sig.starts_with("approval:") => format!("step {step} waits for approval"),
            sig => format!("step {step} waits for signal '{sig}'"),
        },
        "signal_received" => format!("signal '{}' received", s(&e["name"])),
        "compensation_started" => format!("compensating: {}", s(&e["error"]["message"])),
        "step_compensated" => format!("step {step} compensated"),
        "compensation_failed" => format!("step {step} compensation failed"),
        "run_retried" => format!("retried by {}", s(&e["by"])),
        _ => return None,
    };
    // `at` is RFC 3339; the time of day is what a person following along wants.
    let at = s(&e["at"]);
    let clock = at.get(11..19).unwrap_or(&at);
    Some(format!("{clock}  {what}"))
}

fn print_result(v: &Value) {
    println!("run {} {}", s(&v["run_id"]), s(&v["status"]));
    if !v["waiting"].is_null() {
        println!("waiting: {}", s(&v["waiting"]));
    }
    if !v["output"].is_null() {
        println!("output: {}", v["output"]);
    }
    if !v["error"].is_null() {
        println!("error: {}: {}", s(&v["error"]["kind"]), s(&v["error"]["message"]));
    }
}

/// The journal of `data_dir`, opened read-only for `--offline`.
fn open_offline(data_dir: &Path) -> Result<crate::offline::Offline, Failure> {
    let path = data_dir.join("journal.redb");
    let note = || {
        eprintln!(
            "note: {} was not closed cleanly (the agent was killed or lost power); reading a repaired copy, the file itself is untouched",
            path.display()
        )
    };
    crate::offline::Offline::open(&path, note).map_err(|e| match e {
        crate::journal::JournalError::Locked(_) => Failure::new(
            exit::BUSY,
            format!(
                "{} is open in the running agent: ask it instead (drop --offline)",
                path.display()
            ),
        ),
        other => Failure::new(exit::FAILURE, format!("cannot read {}: {other}", path.display())),
    })
}

/// An offline read's error, with the exit code the agent's API answer would give.
fn offline_failure(e: crate::api::ApiError) -> Failure {
    let (status, body) = e.answer();
    api_failure(status, &body)
}

async fn remote(client: Client, cmd: Cmd, as_json: bool, data_dir: &Path) -> Result<u8, Failure> {
    match cmd {
        Cmd::Apply { files } => {
            // Every file is tried, as `validate` does, so one run reports every bad file.
            let mut out = Vec::new();
            let mut code = exit::OK;
            for f in &files {
                let answer = match read_document(f) {
                    Ok(text) => match client.request(Method::POST, "/v1/definitions", Some(text)).await {
                        Ok((status, v)) if status.is_success() => Ok(v),
                        Ok((status, v)) => {
                            let problems = v["error"]["problems"].clone();
                            let e = api_failure(status, &v);
                            Err((
                                Failure::new(e.code, format!("{}: {}", f.display(), e.message)),
                                problems,
                            ))
                        }
                        Err(e) => return Err(e.into()),
                    },
                    Err(e) => Err((e, Value::Array(Vec::new()))),
                };
                let v = match answer {
                    Ok(v) => v,
                    Err((e, problems)) => {
                        code = code.max(e.code);
                        if as_json {
                            let message = e.message.lines().next().unwrap_or_default().to_string();
                            out.push(json!({"file": f, "ok": false, "error": message, "problems": problems}));
                        } else {
                            eprintln!("error: {}", e.message);
                        }
                        continue;
                    }
                };
                if !as_json {
                    let what = if v["created"].as_bool() == Some(true) {
                        "applied"
                    } else {
                        "unchanged"
                    };
                    println!(
                        "{what}: {} v{} ({}) from {}",
                        s(&v["name"]),
                        v["version"],
                        outpost_shared::count(v["steps"].as_u64().unwrap_or(0), "step"),
                        f.display()
                    );
                }
                let mut v = v;
                v["file"] = json!(f);
                v["ok"] = json!(true);
                out.push(v);
            }
            if as_json {
                print_json(&Value::Array(out));
            }
            Ok(code)
        }
        Cmd::Start(a) => {
            let input = match (&a.input, &a.input_file) {
                (Some(t), _) => Some(parse_input(t, "--input")?),
                (None, Some(f)) => {
                    let text = std::fs::read_to_string(f)
                        .map_err(|e| Failure::new(exit::INVALID, format!("{}: {e}", f.display())))?;
                    Some(parse_input(&text, &f.display().to_string())?)
                }
                (None, None) => None,
            };
            let body = json!({"workflow": a.workflow, "version": a.version, "input": input, "id": a.id});
            let path = if a.wait && as_json {
                format!("/v1/runs?wait={}", a.timeout)
            } else {
                "/v1/runs".into()
            };
            let v = call(&client, Method::POST, &path, Some(body.to_string())).await?;
            if as_json {
                print_json(&v);
            } else if a.wait {
                // The id at once, then each step as it goes (on stderr: stdout keeps the result
                // scripts read), as `temporal workflow execute` does.
                let id = s(&v["run_id"]).to_string();
                eprintln!("run {id} started ({} v{})", s(&v["workflow"]), v["version"]);
                // Bounded, so no --timeout can overflow the clock's arithmetic.
                let longest = Duration::from_secs(10 * 365 * 86_400);
                let limit = Duration::try_from_secs_f64(a.timeout).map_or(longest, |d| d.min(longest));
                let deadline = tokio::time::Instant::now() + limit;
                let mut print = |e: &Value| {
                    if let Some(line) = progress_line(e) {
                        eprintln!("{line}");
                    }
                };
                follow_run(&client, &id, 0, Some(deadline), &mut print).await?;
                let v = call(&client, Method::GET, &format!("/v1/runs/{id}/wait?timeout=0.001"), None).await?;
                print_result(&v);
                return Ok(run_exit(v["status"].as_str().unwrap_or("")));
            } else {
                let note = match (v["created"].as_bool(), v["same_input"].as_bool()) {
                    (Some(false), Some(true)) => " (already existed, same input; nothing new started)",
                    (Some(false), _) => " (already existed; nothing new started)",
                    _ => "",
                };
                println!("{}{note}", s(&v["run_id"]));
            }
            Ok(if a.wait {
                run_exit(v["status"].as_str().unwrap_or(""))
            } else {
                exit::OK
            })
        }
        Cmd::List { status, limit, offline } => {
            let v = if offline {
                open_offline(data_dir)?
                    .list(status.as_deref(), limit)
                    .map_err(offline_failure)?
            } else {
                let mut path = format!("/v1/runs?limit={limit}");
                if let Some(st) = status {
                    path.push_str(&format!("&status={st}"));
                }
                call(&client, Method::GET, &path, None).await?
            };
            show(&v, as_json, |v| {
                let rows = rows_of(v, |r| {
                    vec![
                        s(&r["run_id"]),
                        format!("{}@{}", s(&r["workflow"]), r["version"]),
                        s(&r["status"]),
                        s(&r["created_at"]),
                        ms(&r["duration_ms"]),
                        s(&r["waiting"]),
                    ]
                });
                table(
                    &["RUN", "WORKFLOW", "STATUS", "STARTED", "DURATION", "WAITING ON"],
                    &rows,
                );
            });
            Ok(exit::OK)
        }
        Cmd::Show {
            run,
            history,
            follow,
            offline,
        } => {
            let v = if offline {
                open_offline(data_dir)?.show(&run).map_err(offline_failure)?
            } else {
                call(&client, Method::GET, &format!("/v1/runs/{run}"), None).await?
            };
            let last_seq = v["history"]
                .as_array()
                .and_then(|h| h.iter().filter_map(|e| e["seq"].as_u64()).max())
                .unwrap_or(0);
            if as_json {
                print_json(&v);
                if follow {
                    follow_run(&client, &run, last_seq, None, &mut |e| println!("{e}")).await?;
                }
                return Ok(exit::OK);
            }
            println!("run:       {}", s(&v["run_id"]));
            println!("workflow:  {} v{}", s(&v["workflow"]), v["version"]);
            println!("status:    {}", s(&v["status"]));
            println!("started:   {}", s(&v["created_at"]));
            if !v["finished_at"].is_null() {
                println!("finished:  {}", s(&v["finished_at"]));
            }
            println!(
                "duration:  {} ({})",
                ms(&v["duration_ms"]),
                outpost_shared::count(v["events"].as_u64().unwrap_or(0), "event")
            );
            println!("input:     {}", v["input"]);
            if !v["waiting"].is_null() {
                println!("waiting:   {}", s(&v["waiting"]));
            }
            if !v["output"].is_null() {
                println!("output:    {}", v["output"]);
            }
            if !v["error"].is_null() {
                println!("error:     {}: {}", s(&v["error"]["kind"]), s(&v["error"]["message"]));
            }
            println!();
            let steps: Vec<StepRow> = serde_json::from_value(v["steps"].clone()).unwrap_or_default();
            let rows: Vec<Vec<String>> = steps.iter().map(step_line).collect();
            table(
                &["STEP", "ACTION", "STATUS", "ATTEMPTS", "DURATION", "OUTPUT / ERROR"],
                &rows,
            );
            if history {
                println!();
                let rows = rows_of(&v["history"], |e| {
                    let mut rest = e.clone();
                    if let Some(o) = rest.as_object_mut() {
                        for k in ["seq", "at", "type", "step"] {
                            o.remove(k);
                        }
                    }
                    vec![
                        e["seq"].to_string(),
                        s(&e["at"]),
                        s(&e["type"]),
                        s(&e["step"]),
                        rest.to_string(),
                    ]
                });
                table(&["SEQ", "AT", "EVENT", "STEP", "DETAIL"], &rows);
            }
            if follow && matches!(v["status"].as_str(), Some("running" | "queued")) {
                println!("\nfollowing run {run} (Ctrl-C stops)…");
                let mut print = |e: &Value| {
                    if let Some(line) = progress_line(e) {
                        println!("{line}");
                    }
                };
                follow_run(&client, &run, last_seq, None, &mut print).await?;
                let v = call(
                    &client,
                    Method::GET,
                    &format!("/v1/runs/{run}/wait?timeout=0.001"),
                    None,
                )
                .await?;
                print_result(&v);
            }
            Ok(exit::OK)
        }
        Cmd::Wait { run, timeout } => {
            let v = call(
                &client,
                Method::GET,
                &format!("/v1/runs/{run}/wait?timeout={timeout}"),
                None,
            )
            .await?;
            show(&v, as_json, |v| {
                print_result(v);
            });
            Ok(run_exit(v["status"].as_str().unwrap_or("")))
        }
        Cmd::Cancel { run, reason } => {
            let body = json!({"reason": reason}).to_string();
            let v = call(&client, Method::POST, &format!("/v1/runs/{run}/cancel"), Some(body)).await?;
            show(&v, as_json, |v| {
                println!("run {} {}", s(&v["run_id"]), s(&v["status"]));
            });
            Ok(exit::OK)
        }
        Cmd::Terminate { run, reason } => {
            let body = json!({"reason": reason}).to_string();
            let v = call(&client, Method::POST, &format!("/v1/runs/{run}/terminate"), Some(body)).await?;
            show(&v, as_json, |v| println!("run {} {}", s(&v["run_id"]), s(&v["status"])));
            Ok(exit::OK)
        }
        Cmd::Retry { run, by } => {
            let body = json!({"by": by.unwrap_or_else(current_user)}).to_string();
            let v = call(&client, Method::POST, &format!("/v1/runs/{run}/retry"), Some(body)).await?;
            show(&v, as_json, |v| {
                println!("run {} {} (retried)", s(&v["run_id"]), s(&v["status"]))
            });
            Ok(exit::OK)
        }
        Cmd::Signal {
            run,
            name,
            payload,
            id,
            strict,
        } => {
            let payload: Value = serde_json::from_str(&payload)
                .map_err(|e| Failure::new(exit::INVALID, format!("--payload is not JSON: {e}")))?;
            let body = json!({"name": name, "payload": payload, "id": id, "strict": strict}).to_string();
            let v = call(&client, Method::POST, &format!("/v1/runs/{run}/signal"), Some(body)).await?;
            if v["awaited"] == false {
                let names: Vec<&str> = v["receivable"]
                    .as_array()
                    .map(|a| a.iter().filter_map(Value::as_str).collect())
                    .unwrap_or_default();
                let can = if names.is_empty() {
                    "no signals".to_string()
                } else {
                    names.join(", ")
                };
                eprintln!(
                    "warning: no step of run {run} waits for signal '{name}' (it can receive: {can}); \
                     it is kept in case one does. Use --strict to refuse such signals."
                );
            }
            show(&v, as_json, |v| {
                let what = if v["accepted"] == true {
                    "delivered"
                } else {
                    "already received (ignored)"
                };
                println!("signal '{}' to run {}: {what}", s(&v["signal"]), s(&v["run_id"]));
            });
            Ok(exit::OK)
        }
        Cmd::Approve {
            run,
            step,
            reject,
            comment,
            id,
        } => {
            // The agent records the decision as local:<the Unix user calling its socket>.
            let body = json!({"step": step, "approved": !reject, "comment": comment, "id": id}).to_string();
            let v = call(&client, Method::POST, &format!("/v1/runs/{run}/approve"), Some(body)).await?;
            show(&v, as_json, |v| {
                let what = if v["approved"] == true { "approved" } else { "rejected" };
                let dup = if v["duplicate"] == true {
                    " (repeat ignored)"
                } else {
                    ""
                };
                println!("step '{}' of run {}: {what}{dup}", s(&v["step"]), s(&v["run_id"]));
            });
            Ok(exit::OK)
        }
        Cmd::Status => {
            let v = call(&client, Method::GET, "/v1/status", None).await?;
            show(&v, as_json, |v| {
                println!("agent:       outpost {} (pid {})", s(&v["version"]), v["pid"]);
                let runs = &v["limits"]["runs"];
                println!(
                    "runs:        {} active (limit {}), {} queued (queue {}, when full: {})",
                    v["active_runs"],
                    runs["limit"]
                        .as_u64()
                        .map(|n| n.to_string())
                        .unwrap_or_else(|| "none".into()),
                    runs["queued"],
                    runs["queue_limit"],
                    s(&runs["when_full"])
                );
                println!(
                    "activities:  {} running, limit {}",
                    v["activities"]["running"], v["activities"]["limit"]
                );
                for (what, key) in [
                    ("workflow", "workflows"),
                    ("action", "actions"),
                    ("resource", "resources"),
                ] {
                    for l in v["limits"][key].as_array().into_iter().flatten() {
                        println!(
                            "  {what} {}: {} of {} in use, {} waiting",
                            s(&l["name"]),
                            l["in_use"],
                            l["limit"],
                            l["waiting"]
                        );
                    }
                }
                let j = &v["journal"];
                println!(
                    "journal:     {:.1} MB file, next seq {}, {} commits, {} events, {} appends since start",
                    j["file_bytes"].as_f64().unwrap_or(0.0) / 1e6,
                    j["next_seq"],
                    j["commits"],
                    j["events"],
                    j["ops"]
                );
                let e = &j["storage_error"];
                if !e.is_null() {
                    println!(
                        "journal:     CANNOT WRITE since {}: {} ({} runs blocked; they go on once the journal can be written — free disk space)",
                        s(&e["since"]),
                        s(&e["error"]),
                        e["blocked_runs"]
                    );
                }
                println!("sync:        {}", sync_line(&v["sync"]));
                let t = &v["triggers"];
                let n = |k: &str| t[k].as_u64().unwrap_or(0);
                if n("schedules") + n("mqtt") + n("directories") == 0 {
                    println!("triggers:    none (definitions declare schedules and triggers)");
                } else {
                    println!(
                        "triggers:    {}, {}, {}",
                        outpost_shared::count(n("schedules"), "schedule"),
                        outpost_shared::count(n("mqtt"), "MQTT trigger"),
                        outpost_shared::count(n("directories"), "watched directory")
                    );
                }
                let devices: Vec<String> = v["equipment"]["devices"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|d| format!("{} ({})", s(&d["name"]), s(&d["kind"])))
                    .collect();
                if devices.is_empty() {
                    println!("equipment:   none (--equipment FILE configures devices)");
                } else {
                    println!(
                        "equipment:   {}: {}",
                        outpost_shared::count(devices.len() as u64, "device"),
                        devices.join(", ")
                    );
                }
                for b in v["breakers"].as_array().into_iter().flatten() {
                    println!(
                        "breaker:     {} {}{} ({} consecutive failures{})",
                        s(&b["target"]),
                        s(&b["state"]),
                        b["open_until"]
                            .as_str()
                            .map(|t| format!(" until {t}"))
                            .unwrap_or_default(),
                        b["consecutive_failures"],
                        b["last_error"]
                            .as_str()
                            .map(|e| format!("; last: {e}"))
                            .unwrap_or_default()
                    );
                }
                if let Some(r) = v["retention"].as_object() {
                    println!(
                        "retention:   last pass {}, deleted {} ({})",
                        s(&r["last_at"]),
                        outpost_shared::count(r["runs_deleted"].as_u64().unwrap_or(0), "run"),
                        outpost_shared::count(r["events_deleted"].as_u64().unwrap_or(0), "event")
                    );
                }
                println!(
                    "timers:      {} pending{}",
                    v["timers"]["pending"],
                    v["timers"]["next_at"]
                        .as_str()
                        .map(|t| format!(", next at {t}"))
                        .unwrap_or_default()
                );
            });
            Ok(exit::OK)
        }
        Cmd::Definitions => {
            let v = call(&client, Method::GET, "/v1/definitions", None).await?;
            show(&v, as_json, |v| {
                let rows = rows_of(v, |d| {
                    vec![
                        s(&d["name"]),
                        d["version"].to_string(),
                        d["steps"].to_string(),
                        s(&d["applied_at"]),
                    ]
                });
                table(&["NAME", "VERSION", "STEPS", "APPLIED"], &rows);
            });
            Ok(exit::OK)
        }
        Cmd::Run(_)
        | Cmd::Validate { .. }
        | Cmd::Bench(_)
        | Cmd::ModbusSim(_)
        | Cmd::JournalCheck { .. }
        | Cmd::Keygen { .. }
        | Cmd::Enroll { .. } => Ok(exit::OK),
        #[cfg(feature = "opcua-sim")]
        Cmd::OpcuaSim(_) => Ok(exit::OK),
    }
}

/// One table row per element of a JSON array.
/// A duration option in seconds: `5s`, `2m`, `1h30m` like every other duration, or a plain number.
fn seconds_arg(text: &str) -> Result<f64, String> {
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
fn verify_every_arg(text: &str) -> Result<Duration, String> {
    if matches!(text.trim(), "off" | "0") {
        return Ok(Duration::ZERO);
    }
    outpost_shared::definition::parse_duration(text).map_err(|e| format!("{e} (try 30s, 5m, 1h or off)"))
}

/// One row of `show`'s step table.
fn step_line(st: &StepRow) -> Vec<String> {
    let detail = match (&st.error, &st.output) {
        (Some(e), _) => format!("{}: {}", e.kind, e.message),
        (None, Value::Null) => String::new(),
        (None, out) => out.to_string(),
    };
    let detail = match &st.next_retry_at {
        Some(t) => format!("retry at {t}; {detail}"),
        None => detail,
    };
    let status = match st.compensation {
        Some(CompensationStatus::Compensated) => format!("{}, compensated", st.status.as_str()),
        Some(CompensationStatus::Compensating) => format!("{}, compensating", st.status.as_str()),
        Some(c) => format!("{}, compensation {}", st.status.as_str(), c.as_str()),
        None => st.status.as_str().to_string(),
    };
    let duration = st.duration_ms.map(|d| ms(&Value::from(d))).unwrap_or_default();
    vec![
        st.id.clone(),
        st.action.clone(),
        status,
        st.attempts.to_string(),
        duration,
        detail,
    ]
}

fn rows_of(v: &Value, row: impl Fn(&Value) -> Vec<String>) -> Vec<Vec<String>> {
    v.as_array().map(|a| a.iter().map(row).collect()).unwrap_or_default()
}

/// A JSON string's text, or its JSON form; null is empty.
fn s(v: &Value) -> String {
    match v {
        Value::Null => String::new(),
        Value::String(t) => t.clone(),
        other => other.to_string(),
    }
}

fn ms(v: &Value) -> String {
    match v.as_u64() {
        Some(n) if n < 10_000 => format!("{n}ms"),
        Some(n) => humantime::format_duration(Duration::from_secs(n / 1000)).to_string(),
        None => String::new(),
    }
}

/// Prints an aligned table; long cells are cut so rows stay on one line.
fn table(headers: &[&str], rows: &[Vec<String>]) {
    const MAX_CELL: usize = 80;
    let cut_cells = CUT_CELLS.load(std::sync::atomic::Ordering::Relaxed);
    let cut = |c: &str| -> String {
        let one_line = c.replace('\n', " ");
        if cut_cells && one_line.chars().count() > MAX_CELL {
            one_line.chars().take(MAX_CELL - 1).collect::<String>() + "…"
        } else {
            one_line
        }
    };
    let rows: Vec<Vec<String>> = rows.iter().map(|r| r.iter().map(|c| cut(c)).collect()).collect();
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut out = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                out.push_str(c);
            } else {
                out.push_str(&format!("{c:<w$}  ", w = widths[i]));
            }
        }
        println!("{}", out.trim_end());
    };
    line(headers.to_vec());
    for r in &rows {
        line(r.iter().map(String::as_str).collect());
    }
    if rows.is_empty() {
        println!("(none)");
    }
}

fn journal_check(file: &Path, as_json: bool) -> Result<u8, Failure> {
    if !file.exists() {
        return Err(Failure::new(
            exit::INVALID,
            format!("{}: no such journal file", file.display()),
        ));
    }
    let v = crate::journal::verify(file)
        .map_err(|e| Failure::new(exit::FAILURE, format!("journal {} is damaged: {e}", file.display())))?;
    if as_json {
        print_json(&json!({
            "file": file.display().to_string(), "ok": true, "rows": v.rows, "bytes": v.bytes, "repaired": v.repaired,
        }));
    } else {
        let how = if v.repaired {
            "; it was not closed cleanly and has been repaired"
        } else {
            ""
        };
        println!(
            "journal {}: whole ({} rows, {} bytes of values){how}",
            file.display(),
            v.rows,
            v.bytes
        );
    }
    Ok(exit::OK)
}

/// Checks the journal in a child process (`outpost journal-check`) before this process opens it:
/// redb panics on some damaged files, and with `panic = "abort"` that would be a crash loop under
/// systemd. Falls back to checking in-process when the binary cannot run itself (qemu-user).
fn check_journal_first(file: &Path) -> Result<(), String> {
    if !file.exists() {
        return Ok(());
    }
    let out = std::env::current_exe().and_then(|exe| {
        std::process::Command::new(exe)
            .arg("journal-check")
            .arg("--file")
            .arg(file)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .output()
    });
    match out {
        Ok(o) if o.status.success() => Ok(()),
        Ok(o) => {
            use std::os::unix::process::ExitStatusExt;
            let text = String::from_utf8_lossy(&o.stderr);
            let said = text.lines().find_map(|l| l.strip_prefix("error: ")).map(str::trim);
            match (o.status.signal(), said) {
                (Some(sig), _) => Err(format!("reading it crashed the check (signal {sig})")),
                (None, Some(said)) => Err(format!("the check said: {}", outpost_shared::protocol::clip(said, 300))),
                (None, None) if text.contains("panicked") => {
                    Err(format!("reading it crashed the check ({})", o.status))
                }
                // Neither an answer nor a crash: the check did not run (an emulator's binfmt
                // without the target's libraries exits 127). Check here instead.
                (None, None) => {
                    warn!(status = %o.status, "the journal check could not run in a child process; checking here");
                    crate::journal::verify(file).map(drop).map_err(|e| e.to_string())
                }
            }
        }
        Err(e) => {
            warn!(error = %e, "cannot run the journal check in a child process; checking here");
            crate::journal::verify(file).map(drop).map_err(|e| e.to_string())
        }
    }
}

fn identity_options(args: &RunArgs) -> crate::identity::IdentityOptions {
    crate::identity::IdentityOptions {
        ca: args.ca.clone(),
        cert: args.cert.clone(),
        key: args.key.clone(),
        fleet_key: args.fleet_key.clone(),
        insecure_plaintext: args.insecure_plaintext,
        insecure_unsigned: args.insecure_unsigned,
    }
}

fn run_daemon(data_dir: &Path, socket: &Path, args: RunArgs) -> Result<u8, Failure> {
    init_tracing();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.worker_threads.max(1))
        .max_blocking_threads(8)
        .enable_all()
        .build()
        .map_err(|e| Failure::new(exit::FAILURE, format!("cannot start the async runtime: {e}")))?;
    rt.block_on(daemon(data_dir, socket, args))
}

async fn daemon(data_dir: &Path, socket: &Path, args: RunArgs) -> Result<u8, Failure> {
    let config = RuntimeConfig {
        max_activities: args.max_activities,
        journal: JournalConfig {
            cache_bytes: args.cache_mb.max(1) * 1024 * 1024,
        },
        limits: LimitsConfig {
            max_runs: args.max_runs,
            queue: args.queue,
            when_full: args.when_full,
            actions: args.limit.iter().cloned().collect(),
            resources: args.resource.iter().cloned().collect(),
        },
        breakers: crate::breaker::BreakerConfig {
            threshold: args.breaker_threshold.max(1),
            cooldown: args.breaker_cooldown.into(),
            ..crate::breaker::BreakerConfig::default()
        },
    };
    let equipment = args.equipment.as_deref().map(load_equipment).transpose()?;
    if let Some(eq) = &equipment {
        info!(devices = ?eq.names(), "equipment ready");
    }
    let equipment_list: Vec<(String, String)> = equipment
        .as_ref()
        .map(|eq| {
            eq.names()
                .into_iter()
                .map(|n| {
                    let kind = eq.kind_of(&n).unwrap_or("device").to_string();
                    (n, kind)
                })
                .collect()
        })
        .unwrap_or_default();
    let registry = Registry::builtin().with_equipment(equipment.clone());
    // Tests reset a running agent's wall clock through this file (see `FileOffsetClock`).
    #[cfg(feature = "test-clock")]
    let clock: Arc<dyn crate::clock::Clock> = match std::env::var_os("OUTPOST_CLOCK_OFFSET_FILE") {
        Some(path) => Arc::new(crate::clock::FileOffsetClock::watch(path.into())),
        None => Arc::new(crate::clock::SystemClock),
    };
    #[cfg(not(feature = "test-clock"))]
    let clock: Arc<dyn crate::clock::Clock> = Arc::new(crate::clock::SystemClock);
    let journal_file = data_dir.join("journal.redb");
    if let Err(why) = check_journal_first(&journal_file) {
        return Err(Failure::new(
            exit::FAILURE,
            format!(
                "the journal {0} is damaged: {why}\n  stop every outpost using it, move it aside (mv {0} {0}.damaged; keep it \
                 for forensics) and start again with an empty journal; runs and events not yet synced to the cloud are \
                 only in the damaged file (`outpost journal-check --file FILE` checks a file)",
                journal_file.display()
            ),
        ));
    }
    let runtime = Runtime::open_with(data_dir, config, registry, clock).map_err(|e| {
        let file = data_dir.join("journal.redb");
        Failure::new(
            exit::FAILURE,
            format!(
                "cannot open the journal {}: {e}\n  if the file is damaged: stop every outpost using it, move it aside \
                 (mv {0} {0}.damaged) and start again with an empty journal; runs and events not yet synced to \
                 the cloud are only in the damaged file",
                file.display()
            ),
        )
    })?;
    // Whatever way this ends (a SIGTERM, --once, an error such as a bad --apply file), the journal
    // is closed before the process exits: its writer is a detached thread, and an exit that
    // races its close can stop redb in the middle of writing the clean-shutdown header, leaving
    // the recovery (two-phase-commit) flag set or a torn header that made redb panic on the next
    // open. Which won the race depended on the build's timing, which is why only some builds
    // (`cargo build --release -p outpost-agent`) showed it. In-flight runs resume on next start.
    let journal = runtime.journal().clone();
    let outcome = async move {
        for f in &args.apply {
            let text = read_document(f)?;
            let (def, applied) = runtime
                .apply(&text)
                .await
                .map_err(|e| Failure::new(exit::INVALID, format!("{}: {e}", f.display())))?;
            info!(file = %f.display(), workflow = def.name(), version = def.version(), ?applied, "definition applied");
        }
        let start_input = match &args.input {
            Some(t) => Some(parse_input(t, "--input")?),
            None => None,
        };
        let resumed = runtime
            .resume_all()
            .await
            .map_err(|e| Failure::new(exit::FAILURE, e.to_string()))?;
        tokio::spawn(crate::schedule::run(runtime.clone(), runtime.definitions_changed()));
        if let Some(addr) = args.metrics_listen {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| Failure::new(exit::FAILURE, format!("--metrics-listen {addr}: {e}")))?;
            let app = axum::Router::new()
                .route("/metrics", axum::routing::get(crate::api::metrics))
                .with_state(Arc::new(runtime.clone()));
            info!(%addr, "metrics on http://{addr}/metrics");
            tokio::spawn(async move {
                if let Err(e) = axum::serve(listener, app).await {
                    tracing::error!(error = %e, "metrics server stopped");
                }
            });
        }
        let retention = crate::retention::RetentionConfig {
            keep_for: args.retention.into(),
            max_bytes: args.retention_max_mb.saturating_mul(1024 * 1024),
            every: args.prune_interval.into(),
        };
        tokio::spawn(crate::retention::run(runtime.clone(), retention));
        tokio::spawn(crate::trigger::run_directories(
            runtime.clone(),
            runtime.definitions_changed(),
        ));
        #[cfg(feature = "opcua")]
        tokio::spawn(crate::trigger::opcua::run(
            runtime.clone(),
            runtime.definitions_changed(),
            equipment.clone(),
        ));
        if let Some(url) = &args.broker {
            let device = args.device_id.clone().unwrap_or_else(host_name);
            if !outpost_shared::protocol::valid_device_id(&device) {
                return Err(Failure::new(
                    exit::INVALID,
                    format!("device id '{device}' must be 1-64 letters, digits, '-', '_' or '.' (--device-id)"),
                ));
            }
            let broker = broker_url(url, "--broker")?;
            let security =
                crate::identity::Security::resolve(data_dir, &identity_options(&args), &broker, runtime.clock())
                    .map_err(|e| Failure::new(exit::INVALID, e))?;
            let mut config = crate::sync::SyncConfig::new(broker.host, broker.port, device);
            config.security = Arc::new(security);
            if let Some(p) = &args.policy {
                let policy = crate::policy::Policy::load(p).map_err(|e| Failure::new(exit::INVALID, e))?;
                info!(policy = %p.display(), exec_rules = policy.exec.len(), "policy for deployed definitions loaded");
                config.policy = Arc::new(policy);
            }
            config.prefix = args.sync_prefix.clone();
            config.labels = args.label.clone();
            config.outbox_max_events = args.outbox_max_events;
            config.drain_rate = args.drain_rate;
            config.desired = crate::desired::DesiredConfig {
                remediation: args.remediation.clone(),
                equipment: equipment.clone(),
                verify_every: Some(args.verify_every).filter(|d| !d.is_zero()),
                on_drift: args.on_drift,
            };
            config.equipment = equipment_list;
            crate::sync::start(runtime.clone(), config)
                .await
                .map_err(|e| Failure::new(exit::FAILURE, format!("cannot start sync: {e}")))?;
        }
        if let Some(url) = &args.mqtt_broker {
            let id = args.mqtt_client_id.clone().unwrap_or_else(default_client_id);
            let b = broker_url(url, "--mqtt-broker")?;
            outpost_shared::tls::check_plaintext(&b, args.insecure_plaintext, "--mqtt-broker")
                .map_err(|e| Failure::new(exit::INVALID, e))?;
            let tls = if b.tls {
                let ident = crate::identity::identity_dir(data_dir);
                let files = outpost_shared::tls::TlsFiles {
                    ca: args.ca.clone().unwrap_or_else(|| ident.join("ca.crt")),
                    cert: args
                        .cert
                        .clone()
                        .or_else(|| Some(ident.join("device.crt")).filter(|p| p.exists())),
                    key: args
                        .key
                        .clone()
                        .or_else(|| Some(ident.join("device.key")).filter(|p| p.exists())),
                };
                Some(
                    outpost_shared::tls::client_config(&files)
                        .map_err(|e| Failure::new(exit::INVALID, format!("--mqtt-broker: {e}")))?,
                )
            } else {
                None
            };
            let config = crate::trigger::MqttTriggerConfig {
                host: b.host,
                port: b.port,
                client_id: id,
                tls,
            };
            tokio::spawn(crate::trigger::run_mqtt(
                runtime.clone(),
                runtime.definitions_changed(),
                config,
            ));
        }
        let listener = bind_socket(socket)?;
        info!(socket = %socket.display(), data_dir = %data_dir.display(), resumed, "outpost agent ready");

        let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(None::<u8>);
        if let Some(workflow) = args.start.clone() {
            let runtime = runtime.clone();
            let once = args.once;
            let stop_tx = stop_tx.clone();
            tokio::spawn(async move {
                let code = match runtime
                    .start(StartRequest {
                        workflow,
                        input: start_input,
                        ..Default::default()
                    })
                    .await
                {
                    Ok(r) => {
                        info!(run_id = %r.run_id, "started run; follow it with `outpost show {}`", r.run_id);
                        match runtime.wait(&r.run_id, None).await {
                            Ok((rec, _)) => {
                                let detail = crate::api::run_detail(&runtime, &r.run_id, &rec).ok();
                                let out = json!({
                                    "run_id": r.run_id,
                                    "status": rec.status.as_str(),
                                    "output": detail.as_ref().map(|d| d["output"].clone()),
                                    "error": detail.as_ref().map(|d| d["error"].clone()),
                                });
                                println!("{out}");
                                run_exit(rec.status.as_str())
                            }
                            Err(e) => {
                                error!(error = %e, "waiting for the run");
                                exit::FAILURE
                            }
                        }
                    }
                    Err(e) => {
                        error!(error = %e, "cannot start the --start run; stopping");
                        // Keeping a daemon up whose one asked-for run never started would hide
                        // the mistake behind a healthy-looking service.
                        let _ = stop_tx.send(Some(start_error_exit(&e)));
                        return;
                    }
                };
                if once {
                    let _ = stop_tx.send(Some(code));
                }
            });
        }

        let shutdown = async move {
            let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(e) => {
                    warn!(error = %e, "cannot listen for SIGTERM");
                    return;
                }
            };
            tokio::select! {
                _ = tokio::signal::ctrl_c() => info!("interrupted; stopping (unfinished runs resume on next start)"),
                _ = term.recv() => info!("terminated; stopping (unfinished runs resume on next start)"),
                _ = stop_rx.wait_for(|c| c.is_some()) => {}
            }
        };
        axum::serve(
            listener,
            crate::api::router(runtime).into_make_service_with_connect_info::<crate::api::Peer>(),
        )
        .with_graceful_shutdown(shutdown)
        .await
        .map_err(|e| Failure::new(exit::FAILURE, format!("API server: {e}")))?;
        let _ = std::fs::remove_file(socket);
        let code = *stop_tx.borrow();
        Ok(code.unwrap_or(exit::OK))
    }
    .await;
    if let Err(e) = journal.close().await {
        warn!(error = %e, "cannot close the journal cleanly");
    }
    outcome
}

/// The exit code for a start the runtime refused: the same code `outpost start` gives when the
/// API refuses it for that reason.
fn start_error_exit(e: &crate::runtime::RuntimeError) -> u8 {
    use crate::runtime::RuntimeError as E;
    match e {
        E::NoSuchWorkflow { .. } | E::NoSuchRun(_) => exit::NOT_FOUND,
        E::Invalid(_) | E::Definition(_) => exit::INVALID,
        E::Busy(_) => exit::BUSY,
        E::Finished { .. } | E::WrongState(_) => exit::CONFLICT,
        E::Journal(_) | E::DataDir { .. } => exit::FAILURE,
    }
}

fn run_modbus_sim(args: ModbusSimArgs) -> Result<u8, Failure> {
    init_tracing();
    let mut clamps = std::collections::HashMap::new();
    for c in &args.clamp {
        let parsed = c
            .split_once('=')
            .and_then(|(a, m)| Some((a.trim().parse::<u16>().ok()?, m.trim().parse::<u16>().ok()?)));
        let (a, m) = parsed.ok_or_else(|| Failure::new(exit::INVALID, format!("--clamp '{c}' is not ADDRESS=MAX")))?;
        clamps.insert(a, m);
    }
    let faults = crate::equipment::modbus::SimFaults {
        busy_first: args.busy_first,
        delay: Duration::from_millis(args.delay_ms),
        limit: args.limit.unwrap_or(0),
        clamps,
        short_reads: args.short_reads,
    };
    let log: Arc<dyn Fn(Value) + Send + Sync> = Arc::new(|v: Value| {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{v}");
        let _ = out.flush();
    });
    if let Some(port) = args.rtu.clone() {
        return block_on(async move {
            let sim = crate::equipment::modbus::Simulator::new(faults, log.clone());
            log(json!({"listening": port}));
            sim.serve_rtu(&port, args.baud)
                .await
                .map_err(|e| Failure::new(exit::FAILURE, format!("modbus simulator on {port}: {e}")))?;
            Ok(exit::OK)
        });
    }
    block_on(async move {
        let listener = tokio::net::TcpListener::bind(&args.listen)
            .await
            .map_err(|e| Failure::new(exit::FAILURE, format!("binding {}: {e}", args.listen)))?;
        let addr = listener
            .local_addr()
            .map_err(|e| Failure::new(exit::FAILURE, e.to_string()))?;
        log(json!({"listening": addr.to_string()}));
        crate::equipment::modbus::Simulator::new(faults, log)
            .serve(listener)
            .await
            .map_err(|e| Failure::new(exit::FAILURE, format!("modbus simulator: {e}")))?;
        Ok(exit::OK)
    })
}

#[cfg(feature = "opcua-sim")]
fn run_opcua_sim(args: OpcuaSimArgs) -> Result<u8, Failure> {
    use crate::equipment::opcua_sim;
    let invalid = |m: String| Failure::new(exit::INVALID, m);
    let nodes = args
        .node
        .iter()
        .map(|n| opcua_sim::SimNode::parse(n))
        .collect::<Result<Vec<_>, _>>()
        .map_err(invalid)?;
    if nodes.is_empty() {
        return Err(invalid("give at least one --node NAME=TYPE[=VALUE]".into()));
    }
    let mut clamps = std::collections::HashMap::new();
    for c in &args.clamp {
        let parsed = c
            .split_once('=')
            .and_then(|(n, m)| Some((n.trim().to_string(), m.trim().parse::<f64>().ok()?)));
        let (n, m) = parsed.ok_or_else(|| invalid(format!("--clamp '{c}' is not NAME=MAX")))?;
        clamps.insert(n, m);
    }
    // `NAME:VALUE` options, refused by flag and form.
    let named = |list: &[String], flag: &str, form: &str| {
        list.iter()
            .map(|u| {
                u.split_once(':')
                    .map(|(n, v)| (n.to_string(), v.to_string()))
                    .ok_or_else(|| invalid(format!("{flag} '{u}' is not {form}")))
            })
            .collect::<Result<Vec<_>, _>>()
    };
    let users = named(&args.user, "--user", "NAME:PASSWORD")?;
    let cert_users = named(&args.user_cert, "--user-cert", "NAME:CERT_FILE")?
        .into_iter()
        .map(|(n, f)| (n, PathBuf::from(f)))
        .collect();
    let ticks = args
        .tick
        .iter()
        .map(|t| {
            t.split_once('=')
                .and_then(|(n, d)| Some((n.to_string(), outpost_shared::definition::parse_duration(d).ok()?)))
                .filter(|(_, d)| !d.is_zero())
                .ok_or_else(|| invalid(format!("--tick '{t}' is not NAME=DURATION (e.g. Parts=2s)")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let scratch = tempfile::tempdir().map_err(|e| Failure::new(exit::FAILURE, e.to_string()))?;
    let pki_dir = args.pki_dir.clone().unwrap_or_else(|| scratch.path().to_path_buf());
    let log: Arc<dyn Fn(Value) + Send + Sync> = Arc::new(|v: Value| {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{v}");
        let _ = out.flush();
    });
    block_on(async move {
        let listener = tokio::net::TcpListener::bind(&args.listen)
            .await
            .map_err(|e| Failure::new(exit::FAILURE, format!("binding {}: {e}", args.listen)))?;
        let opts = opcua_sim::SimOptions {
            nodes,
            clamps,
            users,
            only_secure: args.only_secure,
            cert_users,
            pki_dir,
            methods: args
                .method
                .iter()
                .map(|m| opcua_sim::SimMethod::parse(m))
                .collect::<Result<Vec<_>, _>>()
                .map_err(invalid)?,
            write_delay: std::time::Duration::from_millis(args.delay_ms),
            ticks,
        };
        opcua_sim::serve(listener, opts, log)
            .await
            .map_err(|e| Failure::new(exit::FAILURE, format!("opcua simulator: {e}")))?;
        Ok(exit::OK)
    })
}

/// Binds the API socket, replacing a stale socket file but never a live agent's.
fn bind_socket(socket: &Path) -> Result<tokio::net::UnixListener, Failure> {
    if socket.exists() {
        if std::os::unix::net::UnixStream::connect(socket).is_ok() {
            return Err(Failure::new(
                exit::CONFLICT,
                format!("another agent is already listening on {}", socket.display()),
            ));
        }
        std::fs::remove_file(socket)
            .with_context(|| format!("removing stale socket {}", socket.display()))
            .map_err(Failure::from)?;
    }
    if let Some(parent) = socket.parent()
        && !parent.as_os_str().is_empty()
    {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))
            .map_err(Failure::from)?;
    }
    // Owner and group only, from the first moment: the socket drives actuators. It is bound
    // inside a fresh 0700 directory, made 0660 there, and renamed into place, so there is no
    // window in which it exists at its path with looser permissions (a umask change would be
    // process-wide and race the journal's own files).
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let parent = socket
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let staging = parent.join(format!(".outpost-sock-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&staging)
        .with_context(|| format!("creating {}", staging.display()))
        .map_err(Failure::from)?;
    let staged = staging.join("s");
    let bound = tokio::net::UnixListener::bind(&staged)
        .with_context(|| format!("binding {}", socket.display()))
        .and_then(|l| {
            std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(0o660))
                .context("setting the socket's permissions")?;
            std::fs::rename(&staged, socket).with_context(|| format!("moving the socket to {}", socket.display()))?;
            Ok(l)
        });
    let _ = std::fs::remove_dir_all(&staging);
    bound.map_err(Failure::from)
}
