//! `outpost-cloud`: the fleet service (MQTT ingest, store, HTTP API), with an embedded broker
//! by default and an optional demo agent.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::Parser;
use outpost_cloud_sync::{Service, Store, api};
use outpost_shared::protocol::CommandKind;
use tracing::info;

#[derive(Parser)]
#[command(
    name = "outpost-cloud",
    version,
    about = "Outpost cloud-sync: the fleet's state, run histories, deployments, commands",
    long_about = "Outpost cloud-sync receives every event of every gateway over MQTT, stores it, and serves the \
fleet's state over an HTTP JSON API. With no --broker it starts an embedded MQTT broker on --mqtt-listen, so \
nothing needs installing; in production point it at Mosquitto or another broker.\n\n\
Try it: outpost-cloud --demo (starts a demo gateway running the oven example against this service)."
)]
struct Args {
    /// Where the store (cloud.redb) lives.
    #[arg(long, env = "OUTPOST_CLOUD_DATA_DIR", default_value = "cloud-data")]
    data_dir: PathBuf,
    /// HTTP API address.
    #[arg(long, env = "OUTPOST_CLOUD_LISTEN", default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// External MQTT broker, e.g. mqtt://127.0.0.1:1883 [default: start an embedded one].
    #[arg(long, env = "OUTPOST_CLOUD_BROKER", value_name = "URL")]
    broker: Option<String>,
    /// Address of the embedded broker (without --broker).
    #[arg(long, env = "OUTPOST_CLOUD_MQTT_LISTEN", default_value = "127.0.0.1:1883")]
    mqtt_listen: SocketAddr,
    /// Topic prefix shared with the agents.
    #[arg(long, env = "OUTPOST_SYNC_PREFIX", default_value = outpost_shared::protocol::DEFAULT_PREFIX)]
    prefix: String,
    /// MQTT client id (fixed, so the broker keeps this service's session).
    #[arg(long, default_value = "outpost-cloud")]
    client_id: String,
    /// Most devices the store takes; births and events of further new device ids are refused
    /// (counted as rejected.device_limit).
    #[arg(long, env = "OUTPOST_CLOUD_MAX_DEVICES", default_value_t = outpost_cloud_sync::store::DEFAULT_MAX_DEVICES)]
    max_devices: u64,
    /// Also start a demo gateway: the `outpost` agent next to this binary, device `demo-gw`,
    /// running the oven example on the simulated plant.
    #[arg(long)]
    demo: bool,
}

fn parse_broker(url: &str) -> anyhow::Result<(String, u16)> {
    let b = outpost_shared::broker::BrokerUrl::parse(url, "--broker").map_err(anyhow::Error::msg)?;
    if b.tls {
        bail!("--broker {url}: TLS brokers (mqtts://) are not supported by this build yet; use mqtt://");
    }
    Ok((b.host, b.port))
}

async fn run(args: Args) -> anyhow::Result<()> {
    std::fs::create_dir_all(&args.data_dir).with_context(|| format!("data directory {}", args.data_dir.display()))?;
    let store_path = args.data_dir.join("cloud.redb");
    let store = open_store(&store_path).map_err(|e| {
        anyhow::anyhow!(
            "cannot open the store {}: {e}\n  if the file is damaged, move it aside (keep it for forensics) and start \
             with an empty store, or restore it from a backup",
            store_path.display()
        )
    })?;
    store.set_max_devices(args.max_devices);
    let (host, port) = match &args.broker {
        Some(url) => parse_broker(url)?,
        #[cfg(feature = "embedded-broker")]
        None => {
            outpost_cloud_sync::broker::start(args.mqtt_listen).map_err(anyhow::Error::msg)?;
            info!(mqtt = %args.mqtt_listen, "embedded MQTT broker started (in-memory; use --broker for production)");
            (args.mqtt_listen.ip().to_string(), args.mqtt_listen.port())
        }
        #[cfg(not(feature = "embedded-broker"))]
        None => bail!("this build has no embedded broker: give --broker mqtt://HOST:PORT"),
    };
    let service = Service::start(store, &host, port, &args.prefix, &args.client_id);
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let mqtt_url = format!("mqtt://{host}:{port}");
    println!(
        "outpost-cloud: API on http://{}/v1/devices, MQTT at {mqtt_url}, store {}",
        args.listen,
        store_path.display()
    );
    println!("console: http://{}/", args.listen);
    let mut demo = None;
    if args.demo {
        demo = Some(start_demo(&args, &mqtt_url)?);
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
fn start_demo(args: &Args, mqtt_url: &str) -> anyhow::Result<std::process::Child> {
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
    let agent_dir = args.data_dir.join("demo-agent");
    let child = std::process::Command::new(&exe)
        .arg("run")
        .arg("--data-dir")
        .arg(&agent_dir)
        .args(["--cloud", mqtt_url, "--device-id", "demo-gw", "--label", "site=demo"])
        .arg("--equipment")
        .arg(examples.join("equipment/sim.yaml"))
        .arg("--apply")
        .arg(examples.join("oven-plant.yaml"))
        .arg("--apply")
        .arg(examples.join("quality-gate.yaml"))
        .args(["--start", "oven-plant", "--input", r#"{"limit_celsius": 80}"#])
        .spawn()
        .with_context(|| format!("cannot start {}", exe.display()))?;
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
    let args = Args::parse();
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
    match rt.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
