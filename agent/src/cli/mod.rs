//! The `outpost` command line: the daemon (`outpost run`) and the commands that talk to it.

mod args;
mod remote;
mod run;
mod sims;
mod table;

use args::*;
use remote::*;
use run::*;
use sims::*;
use table::*;

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use hyper::{Method, StatusCode};
use outpost_shared::run::{CompensationStatus, StepRow};
use serde_json::{Value, json};
use tracing::{error, info, warn};

use crate::actions::Registry;
use crate::client::{Client, ClientError};
use crate::journal::JournalConfig;
use crate::limits::{LimitsConfig, WhenFull};
use crate::runtime::{RuntimeConfig, StartRequest};

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
                    let reply = asked
                        .ok()
                        .and_then(|(_, v)| serde_json::from_value::<crate::api::types::ReconnectReply>(v).ok());
                    if reply.is_some_and(|r| r.reconnecting) {
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

/// The local user's name, recorded as who approved or retried.
fn current_user() -> String {
    std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .unwrap_or_else(|_| "operator".into())
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
