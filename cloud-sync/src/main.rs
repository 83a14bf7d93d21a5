//! `outpost-cloud`: the fleet service (MQTT ingest, store, HTTP API), with an embedded broker
//! by default and an optional demo agent.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use outpost_cloud_sync::pki::{Keyring, Pki};
use outpost_cloud_sync::{Link, Security, Service, Store, api};
use outpost_shared::protocol::CommandKind;
use outpost_shared::tls::TlsFiles;
use tracing::info;

#[derive(Parser)]
#[command(
    name = "outpost-cloud",
    version,
    about = "Outpost cloud-sync: the fleet's state, run histories, deployments, commands",
    long_about = "Outpost cloud-sync receives every event of every gateway over MQTT, stores it, and serves the \
fleet's state over an HTTP JSON API. With no --broker it starts an embedded MQTT broker on --mqtt-listen, so \
nothing needs installing; in production point it at Mosquitto or another broker.\n\n\
Secure by default: on first start it makes the fleet PKI in DATA_DIR/pki (CA, broker and service \
certificates, the fleet signing key); the embedded broker takes only TLS clients with a certificate from that \
CA, and every message is signed end to end. Enrol a gateway with `outpost keygen` there and `outpost-cloud pki \
sign` here.\n\n\
Try it: outpost-cloud --demo (starts an enrolled demo gateway running the oven example against this service)."
)]
struct Cli {
    /// Where the store (cloud.redb) lives.
    #[arg(long, global = true, env = "OUTPOST_CLOUD_DATA_DIR", default_value = "cloud-data")]
    data_dir: PathBuf,
    /// The fleet PKI directory [default: DATA_DIR/pki].
    #[arg(long, global = true, env = "OUTPOST_CLOUD_PKI", value_name = "DIR")]
    pki: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<CloudCmd>,
    #[command(flatten)]
    serve: Args,
}

#[derive(clap::Subcommand)]
enum CloudCmd {
    /// The fleet PKI: CA, broker certificate, fleet signing key, gateway certificates.
    Pki {
        #[command(subcommand)]
        command: PkiCmd,
    },
    /// Enrolled gateways.
    Devices {
        #[command(subcommand)]
        command: DevicesCmd,
    },
}

#[derive(clap::Subcommand)]
enum PkiCmd {
    /// Make the fleet CA, the broker's and this service's certificates and the fleet signing key
    /// (the first start does this too).
    Init {
        /// Host names and addresses the broker is reached by (repeatable; localhost and
        /// 127.0.0.1 are always included).
        #[arg(long = "broker-name", value_name = "NAME")]
        broker_names: Vec<String>,
    },
    /// Sign a gateway's certificate request (from `outpost keygen`); its subject is the device id.
    Sign {
        /// The request (PEM).
        csr: PathBuf,
        /// Where to write the certificate [default: DEVICE_ID.crt].
        #[arg(long)]
        out: Option<PathBuf>,
        /// Days the certificate is valid.
        #[arg(long, default_value_t = 730)]
        days: u32,
    },
    /// Write the Mosquitto files for this fleet: the topic ACL (and print the listener settings).
    Mosquitto {
        /// Directory to write `outpost.acl` to.
        #[arg(long, default_value = ".")]
        out_dir: PathBuf,
        /// Topic prefix shared with the agents.
        #[arg(long, default_value = outpost_shared::protocol::DEFAULT_PREFIX)]
        prefix: String,
    },
}

#[derive(clap::Subcommand)]
enum DevicesCmd {
    /// Revoke a gateway: cloud-sync refuses its messages from now on, and the CRL (pki/crl.pem)
    /// lists its certificates for the broker.
    Revoke {
        /// Device id.
        id: String,
    },
}

#[derive(clap::Args)]
struct Args {
    /// HTTP API address.
    #[arg(long, env = "OUTPOST_CLOUD_LISTEN", default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// External MQTT broker, e.g. mqtts://broker.plant:8883 [default: start an embedded one].
    #[arg(long, env = "OUTPOST_CLOUD_BROKER", value_name = "URL")]
    broker: Option<String>,
    /// Address of the embedded broker (without --broker); TLS with client certificates.
    #[arg(long, env = "OUTPOST_CLOUD_MQTT_LISTEN", default_value = "127.0.0.1:8883")]
    mqtt_listen: SocketAddr,
    /// CA of the external broker's certificate [default: PKI/ca.crt].
    #[arg(long, value_name = "FILE")]
    ca: Option<PathBuf>,
    /// This service's client certificate for the external broker [default: PKI/cloud.crt].
    #[arg(long, value_name = "FILE")]
    cert: Option<PathBuf>,
    /// Its key [default: PKI/cloud.key].
    #[arg(long, value_name = "FILE")]
    key: Option<PathBuf>,
    /// INSECURE: the embedded broker listens in plain text and takes anyone; plain mqtt:// to
    /// another machine is allowed.
    #[arg(long)]
    insecure_plaintext: bool,
    /// INSECURE: neither sign nor check messages (protocol v1): any client of the broker can
    /// forge any gateway and command every one. For tests and old fleets only.
    #[arg(long)]
    insecure_unsigned: bool,
    /// Topic prefix shared with the agents.
    #[arg(long, env = "OUTPOST_SYNC_PREFIX", default_value = outpost_shared::protocol::DEFAULT_PREFIX)]
    prefix: String,
    /// MQTT client id (fixed, so the broker keeps this service's session); also the identity
    /// in this service's certificate.
    #[arg(long, default_value = outpost_cloud_sync::pki::CLOUD_IDENTITY)]
    client_id: String,
    /// Most devices the store takes; births and events of further new device ids are refused
    /// (counted as rejected.device_limit).
    #[arg(long, env = "OUTPOST_CLOUD_MAX_DEVICES", default_value_t = outpost_cloud_sync::store::DEFAULT_MAX_DEVICES)]
    max_devices: u64,
    /// Also start a demo gateway: the `outpost` agent next to this binary, device `demo-gw`,
    /// enrolled in this fleet, running the oven example on the simulated plant.
    #[arg(long)]
    demo: bool,
}

/// The `pki` and `devices` commands.
fn admin(pki: &Pki, command: CloudCmd) -> anyhow::Result<()> {
    match command {
        CloudCmd::Pki {
            command: PkiCmd::Init { broker_names },
        } => {
            let report = pki.init(&broker_names)?;
            println!("fleet PKI created in {}:", pki.dir().display());
            for f in report.files {
                println!("  {}", f.display());
            }
            println!("keep ca.key and fleet.key secret and backed up: they are the fleet's authority");
        }
        CloudCmd::Pki {
            command: PkiCmd::Sign { csr, out, days },
        } => {
            let text = std::fs::read_to_string(&csr).with_context(|| format!("cannot read {}", csr.display()))?;
            let (id, cert) = pki.sign(&text, days)?;
            let out = out.unwrap_or_else(|| PathBuf::from(format!("{id}.crt")));
            std::fs::write(&out, cert).with_context(|| format!("cannot write {}", out.display()))?;
            println!(
                "signed: {} is device {id}'s certificate for {days} days; its messages are accepted from now on.\n\
                 on the gateway: outpost enroll --cert {} --ca {} --fleet-key {}",
                out.display(),
                out.display(),
                pki.file("ca.crt").display(),
                pki.file("fleet.pub").display()
            );
        }
        CloudCmd::Pki {
            command: PkiCmd::Mosquitto { out_dir, prefix },
        } => {
            let acl =
                outpost_cloud_sync::acl::Rules::new(&prefix).mosquitto_acl(outpost_cloud_sync::pki::CLOUD_IDENTITY);
            let path = out_dir.join("outpost.acl");
            std::fs::write(&path, acl).with_context(|| format!("cannot write {}", path.display()))?;
            println!(
                "wrote {}; listener settings (packaging/mosquitto/outpost-tls.conf):\n  \
                 cafile {}\n  certfile {}\n  keyfile {}\n  crlfile {}\n  require_certificate true\n  \
                 use_identity_as_username true\n  use_username_as_clientid true\n  acl_file {}",
                path.display(),
                pki.file("ca.crt").display(),
                pki.file("broker.crt").display(),
                pki.file("broker.key").display(),
                pki.file("crl.pem").display(),
                path.display()
            );
        }
        CloudCmd::Devices {
            command: DevicesCmd::Revoke { id },
        } => {
            pki.revoke(&id)?;
            println!(
                "device {id} revoked: cloud-sync refuses its messages from now on; {} lists its certificates \
                 (reload the broker to refuse its connections too)",
                pki.file("crl.pem").display()
            );
        }
    }
    Ok(())
}

async fn run(data_dir: PathBuf, pki: Pki, args: Args) -> anyhow::Result<()> {
    std::fs::create_dir_all(&data_dir).with_context(|| format!("data directory {}", data_dir.display()))?;
    let store_path = data_dir.join("cloud.redb");
    let store = open_store(&store_path).map_err(|e| {
        anyhow::anyhow!(
            "cannot open the store {}: {e}\n  if the file is damaged, move it aside (keep it for forensics) and start \
             with an empty store, or restore it from a backup",
            store_path.display()
        )
    })?;
    store.set_max_devices(args.max_devices);
    let external = args
        .broker
        .as_deref()
        .map(|url| outpost_shared::broker::BrokerUrl::parse(url, "--broker").map_err(anyhow::Error::msg))
        .transpose()?;
    if let Some(url) = &external {
        outpost_shared::tls::check_plaintext(url, args.insecure_plaintext, "--broker").map_err(anyhow::Error::msg)?;
    }
    let needs_pki = !args.insecure_unsigned
        || external
            .as_ref()
            .map_or(!args.insecure_plaintext, |u| u.tls && args.ca.is_none());
    if needs_pki && !pki.exists() {
        let report = pki.init(&[host_name()])?;
        println!(
            "first start: fleet PKI created in {} ({} files; keep ca.key and fleet.key secret and backed up)",
            pki.dir().display(),
            report.files.len()
        );
    }
    if args.insecure_unsigned {
        tracing::warn!(
            "INSECURE: --insecure-unsigned: messages are neither signed nor checked; any client of the broker can forge any gateway and command every one"
        );
    }
    #[allow(unused_mut)]
    let mut gate: Option<std::sync::Arc<outpost_cloud_sync::acl::GateStats>> = None;
    let (host, port, tls) = match &external {
        Some(url) => {
            let tls = if url.tls {
                let files = TlsFiles {
                    ca: args.ca.clone().unwrap_or_else(|| pki.file("ca.crt")),
                    cert: Some(args.cert.clone().unwrap_or_else(|| pki.file("cloud.crt"))),
                    key: Some(args.key.clone().unwrap_or_else(|| pki.file("cloud.key"))),
                };
                Some(outpost_shared::tls::client_config(&files)?)
            } else {
                tracing::warn!(broker = %url.url(), "INSECURE: plain-text MQTT to the broker");
                None
            };
            (url.host.clone(), url.port, tls)
        }
        #[cfg(feature = "embedded-broker")]
        None => {
            let (host, port, tls, stats) = start_embedded(&pki, &args).await?;
            gate = stats;
            (host, port, tls)
        }
        #[cfg(not(feature = "embedded-broker"))]
        None => anyhow::bail!("this build has no embedded broker: give --broker mqtts://HOST:PORT"),
    };
    let security = if args.insecure_unsigned {
        Security::Unsigned
    } else {
        Security::Signed {
            fleet: std::sync::Arc::new(pki.fleet_key()?),
            keyring: std::sync::Arc::new(Keyring::new(pki.clone())),
        }
    };
    let scheme = if tls.is_some() { "mqtts" } else { "mqtt" };
    let link = Link {
        host: host.clone(),
        port,
        prefix: args.prefix.clone(),
        client_id: args.client_id.clone(),
        tls,
        security,
    };
    let service = Service::start(store, link);
    if let Some(stats) = gate {
        service.attach_gate(stats);
    }
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let mqtt_url = format!("{scheme}://{host}:{port}");
    println!(
        "outpost-cloud: API on http://{}/v1/devices, MQTT at {mqtt_url}, store {}",
        args.listen,
        store_path.display()
    );
    println!("console: http://{}/", args.listen);
    let mut demo = None;
    if args.demo {
        demo = Some(start_demo(&data_dir, &pki, &args, &mqtt_url)?);
        queue_demo_lot(&service).await?;
    }
    let serve = axum::serve(listener, api::router(service.clone()));
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("cannot watch for SIGTERM")?;
    let served = tokio::select! {
        r = serve => r.context("HTTP server"),
        _ = tokio::signal::ctrl_c() => { info!("interrupted; stopping"); Ok(()) }
        _ = term.recv() => { info!("SIGTERM; stopping"); Ok(()) }
    };
    // The demo gateway goes with us, whichever way we stop (it would otherwise hold the data
    // directory and keep reconnecting to a broker that is gone).
    if let Some(mut child) = demo {
        stop_child(&mut child);
    }
    service.save_counts().await;
    served
}

/// Starts the embedded broker: TLS with client certificates through the gate, or plain under
/// --insecure-plaintext. Returns where this service connects.
#[cfg(feature = "embedded-broker")]
async fn start_embedded(
    pki: &Pki,
    args: &Args,
) -> anyhow::Result<(
    String,
    u16,
    Option<std::sync::Arc<rustls::ClientConfig>>,
    Option<std::sync::Arc<outpost_cloud_sync::acl::GateStats>>,
)> {
    use outpost_cloud_sync::broker::{Listen, start};
    let addr = args.mqtt_listen;
    let host = if addr.ip().is_unspecified() {
        "127.0.0.1".to_string()
    } else {
        addr.ip().to_string()
    };
    if args.insecure_plaintext {
        start(Listen::Plain(addr)).await.map_err(anyhow::Error::msg)?;
        tracing::warn!(mqtt = %addr, "INSECURE: --insecure-plaintext: the embedded broker takes anyone in plain text, and any client may publish on any topic");
        return Ok((host, addr.port(), None, None));
    }
    let config = outpost_shared::tls::server_config(
        &pki.file("ca.crt"),
        &pki.file("broker.crt"),
        &pki.file("broker.key"),
        Some(&pki.file("crl.pem")),
    )?;
    let running = start(Listen::Tls {
        addr,
        config,
        prefix: args.prefix.clone(),
        service: args.client_id.clone(),
    })
    .await
    .map_err(anyhow::Error::msg)?;
    info!(mqtt = %addr, "embedded MQTT broker started: TLS, client certificates from the fleet CA, topic rules per identity (in-memory; use --broker for production)");
    let files = TlsFiles {
        ca: pki.file("ca.crt"),
        cert: Some(pki.file("cloud.crt")),
        key: Some(pki.file("cloud.key")),
    };
    Ok((
        host,
        addr.port(),
        Some(outpost_shared::tls::client_config(&files)?),
        Some(running.stats),
    ))
}

fn host_name() -> String {
    let host = std::fs::read_to_string("/etc/hostname").unwrap_or_default();
    let host = host.trim();
    if host.is_empty() {
        "localhost".into()
    } else {
        host.to_string()
    }
}

/// Opens the store; test builds can put it on a backend that fails like a full disk.
fn open_store(path: &std::path::Path) -> Result<Store, outpost_cloud_sync::store::StoreError> {
    #[cfg(feature = "fault-injection")]
    if let Some(marker) = std::env::var_os("OUTPOST_CLOUD_FULL_DISK_MARKER") {
        tracing::warn!(marker = ?marker, "fault injection: the store fails like a full disk while the marker file exists");
        let (path, marker) = (path.to_path_buf(), PathBuf::from(marker));
        return Store::open_with(Box::new(move || {
            let backend = outpost_shared::fault::FullDiskWhenMarked::open(&path, &marker)
                .map_err(|e| outpost_cloud_sync::store::StoreError::Storage(redb::StorageError::Io(e).into()))?;
            Ok(redb::Database::builder().create_with_backend(backend)?)
        }));
    }
    Store::open(path)
}

/// Asks a child to stop (SIGTERM), and kills it if it has not within 5 s.
fn stop_child(child: &mut std::process::Child) {
    if let Ok(pid) = libc::pid_t::try_from(child.id()) {
        // SAFETY: kill only sends a signal, to our own child, which we have not reaped yet.
        unsafe {
            libc::kill(pid, libc::SIGTERM);
        }
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while std::time::Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Queues a quality-gate run with its lot signal for the demo gateway, so the console has a gate
/// to approve. Fixed command ids: a second `--demo` start queues nothing new.
async fn queue_demo_lot(service: &Service) -> anyhow::Result<()> {
    let start = CommandKind::Start {
        workflow: "quality-gate".into(),
        version: None,
        input: "{}".into(),
        run_id: Some("lot-7".into()),
    };
    let signal = CommandKind::Signal {
        run_id: "lot-7".into(),
        name: "lot-ready".into(),
        payload: r#"{"lot": 7, "kg": 120}"#.into(),
    };
    service
        .command("demo-gw", Some("demo-lot-7-start".into()), start)
        .await?;
    service
        .command("demo-gw", Some("demo-lot-7-ready".into()), signal)
        .await?;
    println!("  approve:  open the console, run lot-7 waits for your approval at step 'release'");
    Ok(())
}

/// Starts the demo gateway and prints how to look at it.
fn start_demo(
    data_dir: &std::path::Path,
    pki: &Pki,
    args: &Args,
    mqtt_url: &str,
) -> anyhow::Result<std::process::Child> {
    let exe = std::env::var_os("OUTPOST_BIN")
        .map(PathBuf::from)
        .or_else(|| std::env::current_exe().ok().map(|p| p.with_file_name("outpost")))
        .filter(|p| p.exists())
        .context(
            "the demo needs the `outpost` agent binary next to outpost-cloud (cargo build --release) or $OUTPOST_BIN",
        )?;
    let examples = ["examples", concat!(env!("CARGO_MANIFEST_DIR"), "/../examples")]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.join("oven-plant.yaml").exists())
        .context("the demo needs the examples/ directory of the source tree")?;
    let agent_dir = data_dir.join("demo-agent");
    if (!args.insecure_unsigned || !args.insecure_plaintext) && pki.enroll_local(&exe, &agent_dir, "demo-gw")? {
        println!(
            "demo gateway 'demo-gw' enrolled: its key in {}, its certificate signed by this fleet",
            agent_dir.join("identity").display()
        );
    }
    let mut cmd = std::process::Command::new(&exe);
    cmd.arg("run")
        .arg("--data-dir")
        .arg(&agent_dir)
        .args(["--cloud", mqtt_url, "--device-id", "demo-gw", "--label", "site=demo"])
        .arg("--equipment")
        .arg(examples.join("equipment/sim.yaml"))
        .arg("--apply")
        .arg(examples.join("oven-plant.yaml"))
        .arg("--apply")
        .arg(examples.join("quality-gate.yaml"))
        .args(["--start", "oven-plant", "--input", r#"{"limit_celsius": 80}"#]);
    if args.insecure_unsigned {
        cmd.arg("--insecure-unsigned");
    }
    let child = cmd.spawn().with_context(|| format!("cannot start {}", exe.display()))?;
    let api = args.listen;
    println!(
        "demo gateway 'demo-gw' started (agent data in {}).\n  devices:  curl http://{api}/v1/devices\n  runs:     curl http://{api}/v1/devices/demo-gw/runs\n  command:  curl -X POST http://{api}/v1/devices/demo-gw/commands -d '{{\"type\":\"start\",\"workflow\":\"oven-plant\",\"input\":{{\"limit_celsius\":80}}}}'",
        agent_dir.display()
    );
    Ok(child)
}

fn main() -> ExitCode {
    let filter = tracing_subscriber::filter::Targets::new()
        .with_default(tracing::Level::WARN)
        .with_target("outpost_cloud_sync", tracing::Level::INFO)
        .with_target("outpost_cloud", tracing::Level::INFO);
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    tracing_subscriber::registry()
        .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
        .with(filter)
        .init();
    let cli = Cli::parse();
    let pki = Pki::new(cli.pki.clone().unwrap_or_else(|| cli.data_dir.join("pki")));
    if let Some(command) = cli.command {
        return match admin(&pki, command) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli.data_dir, pki, cli.serve)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
