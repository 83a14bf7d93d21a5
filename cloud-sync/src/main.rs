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
    /// Also start a demo gateway: the `outpost` agent next to this binary, device `demo-gw`,
    /// running the oven example on the simulated plant.
    #[arg(long)]
    demo: bool,
}

fn parse_broker(url: &str) -> anyhow::Result<(String, u16)> {
    let rest = match url.split_once("://") {
        Some(("mqtt" | "tcp", rest)) => rest,
        Some((scheme, _)) => bail!("--broker {url}: scheme '{scheme}' is not supported (use mqtt://HOST:PORT)"),
        None => url,
    };
    let (host, port) = rest.rsplit_once(':').unwrap_or((rest, "1883"));
    let port: u16 = port
        .parse()
        .with_context(|| format!("'{port}' in --broker {url} is not a port"))?;
    if host.is_empty() {
        bail!("--broker {url} names no host");
    }
    Ok((host.to_string(), port))
}

async fn run(args: Args) -> anyhow::Result<()> {
    std::fs::create_dir_all(&args.data_dir).with_context(|| format!("data directory {}", args.data_dir.display()))?;
    let store_path = args.data_dir.join("cloud.redb");
    let store = Store::open(&store_path).with_context(|| format!("store {}", store_path.display()))?;
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
    let serve = axum::serve(listener, api::router(service));
    tokio::select! {
        r = serve => r.context("HTTP server")?,
        _ = tokio::signal::ctrl_c() => info!("interrupted; stopping"),
    }
    if let Some(mut child) = demo {
        let _ = child.kill();
    }
    Ok(())
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
