//! `outpost bench`: workloads against a fresh agent process, through the same local API the CLI
//! uses, so the figures include that path.
//!
//! - W1 (default): many short runs of sequential `set` steps, then W2: the same with `http`
//!   steps against a local HTTP server the bench starts (user code outside the engine); for
//!   each, throughput, latency, commit batching, bytes the daemon wrote to disk per durable step
//!   (`/proc/PID/io` `write_bytes`), the daemon's CPU and memory.
//! - `--footprint`: the gateway budget: binary size, idle RSS, RSS with many active runs, CPU
//!   while idle with timers pending, start-up time with a large journal, and idle RSS, CPU and
//!   context switches while connected to a local cloud-sync (`outpost-cloud` next to this
//!   binary, started with its embedded broker and TLS; skipped, and said so, when it is absent).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use hyper::Method;
use serde_json::json;

use crate::api::types::StatusView;
use crate::client::{Client, Connection};

/// Options of `outpost bench`.
#[derive(Args, Debug, Clone)]
pub struct BenchArgs {
    /// Runs to start.
    #[arg(long, default_value_t = 2000)]
    runs: usize,
    /// Runs in flight at a time.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Sequential steps per run.
    #[arg(long, default_value_t = 3)]
    steps: usize,
    /// Workloads to run, in order: `set` (W1: engine-only steps) and `http` (W2: each step an
    /// HTTP call to a local server the bench starts).
    #[arg(long, value_delimiter = ',', default_value = "set,http")]
    workloads: Vec<Workload>,
    /// Directory for the benchmark agent's data [default: a fresh temporary directory].
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Keep the data directory afterwards.
    #[arg(long)]
    keep: bool,
    /// Measure the footprint instead of W1.
    #[arg(long)]
    footprint: bool,
    /// Footprint: runs kept active (each waiting on a durable timer).
    #[arg(long, default_value_t = 1000)]
    active_runs: usize,
    /// Footprint: seconds of idle CPU measurement.
    #[arg(long, default_value_t = 60)]
    idle_secs: u64,
    /// Footprint: journal size, in events, for the start-up measurement.
    #[arg(long, default_value_t = 100_000)]
    journal_events: u64,
    /// Instead of W1 and W2: journal about this many events (W1 runs) while cloud sync is
    /// configured and its broker unreachable, so everything stays in the outbox; prints the
    /// agent's RSS as the journal grows and the journal's bytes per event.
    #[arg(long, value_name = "EVENTS")]
    offline: Option<u64>,
    /// The agent binary to measure [default: this one]: an older build, for before and after
    /// figures from one command on one machine.
    #[arg(long, value_name = "PATH")]
    agent_bin: Option<PathBuf>,
}

/// The agent binary the bench starts (`--agent-bin`, or this one).
static AGENT_BIN: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();

/// A benchmark workload: what each step of the runs does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Workload {
    /// `set` steps: the engine and the journal alone.
    Set,
    /// `http` steps against a local HTTP server.
    Http,
}

/// The journal's size on disk: the redb file and its segment log (if any).
fn journal_bytes(dir: &Path) -> std::io::Result<u64> {
    Ok(journal_sizes(dir)?.0)
}

/// The journal's and its log's length, and the bytes the file system holds for them: redb grows
/// its file ahead of use (doubling while it is small) and the ahead part is a hole, so the
/// second is what the data takes on the card.
fn journal_sizes(dir: &Path) -> std::io::Result<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let (mut len, mut held) = (0, 0);
    for (name, required) in [("journal.redb", true), ("journal.log", false)] {
        match std::fs::metadata(dir.join(name)) {
            Ok(m) => {
                len += m.len();
                held += m.blocks() * 512;
            }
            Err(e) if required => return Err(e),
            Err(_) => {}
        }
    }
    Ok((len, held))
}

/// Bytes the process caused to be written to storage (`/proc/PID/io` `write_bytes`).
fn write_bytes(pid: u32) -> Option<u64> {
    let io = std::fs::read_to_string(format!("/proc/{pid}/io")).ok()?;
    io.lines()
        .find_map(|l| l.strip_prefix("write_bytes:"))?
        .trim()
        .parse()
        .ok()
}

fn rss_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with(field))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// CPU time (user + system) a process has used, in seconds.
fn cpu_secs(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    let Some(end) = stat.rfind(')') else { return 0.0 };
    let f: Vec<&str> = stat[end + 1..].split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime are fields 14 and 15 of /proc/PID/stat; the kernel's USER_HZ is 100.
    (ticks(11) + ticks(12)) / 100.0
}

/// W2: `steps` sequential `http` calls to `port` on loopback.
fn w2_definition(steps: usize, port: u16) -> String {
    let mut doc = String::from("name: bench-w2\nversion: 1\nsteps:\n");
    for i in 1..=steps {
        doc.push_str(&format!(
            "  - id: s{i}\n    action: http\n    args: {{url: 'http://127.0.0.1:{port}/step/{i}?run={{{{ run.id }}}}'}}\n"
        ));
        if i > 1 {
            doc.push_str(&format!("    depends_on: [s{}]\n", i - 1));
        }
    }
    doc
}

/// A minimal HTTP/1.1 server on loopback answering every request `200 {"ok":true}`: W2's
/// "user code outside the engine". Runs until the bench ends.
async fn http_server() -> anyhow::Result<u16> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                let mut have = 0;
                loop {
                    let Ok(n) = sock.read(&mut buf[have..]).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    have += n;
                    // Requests have no body here: answer at the end of each header block.
                    while let Some(end) = buf[..have].windows(4).position(|w| w == b"\r\n\r\n") {
                        let reply = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 11\r\n\r\n{\"ok\":true}";
                        if sock.write_all(reply).await.is_err() {
                            return;
                        }
                        buf.copy_within(end + 4..have, 0);
                        have -= end + 4;
                    }
                    if have == buf.len() {
                        return;
                    }
                }
            });
        }
    });
    Ok(port)
}

fn w1_definition(steps: usize) -> String {
    let mut doc = String::from("name: bench-w1\nversion: 1\nsteps:\n");
    for i in 1..=steps {
        doc.push_str(&format!("  - id: s{i}\n    action: set\n"));
        if i == 1 {
            doc.push_str("    args: {n: '{{ input.i }}'}\n");
        } else {
            doc.push_str(&format!(
                "    depends_on: [s{}]\n    args: {{n: '{{{{ steps.s{}.output.n + 1 }}}}'}}\n",
                i - 1,
                i - 1
            ));
        }
    }
    doc
}

async fn wait_for_socket(socket: &Path, child: &mut tokio::process::Child) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(mut c) = Connection::open(socket).await
            && c.request(Method::GET, "/v1/health", None).await.is_ok()
        {
            return Ok(());
        }
        if let Some(status) = child.try_wait()? {
            bail!("the benchmark agent exited early with {status}");
        }
        if Instant::now() > deadline {
            bail!("the benchmark agent did not come up within 20s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

/// Runs the benchmark and prints its figures.
pub async fn run(args: BenchArgs, json: bool) -> anyhow::Result<u8> {
    if let Some(bin) = &args.agent_bin {
        let bin = std::fs::canonicalize(bin).with_context(|| format!("--agent-bin {}", bin.display()))?;
        let _ = AGENT_BIN.set(bin);
    }
    let mut report = Report {
        json,
        figures: serde_json::Map::new(),
    };
    let tmp;
    let dir = match &args.dir {
        Some(d) => d.clone(),
        None => {
            tmp = std::env::temp_dir().join(format!("outpost-bench-{}-{}", std::process::id(), fastrand::u32(..)));
            tmp.clone()
        }
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    // Sync configured against a port nothing listens on: the agent stays offline.
    let dead = format!("mqtt://127.0.0.1:{}", free_port()?);
    let offline = ["--broker", &dead, "--device-id", "bench-offline", "--insecure-unsigned"];
    let mut child = match args.offline {
        Some(_) => spawn_agent_with(&dir, &offline)?,
        None => spawn_agent(&dir)?,
    };
    let result = if let Some(events) = args.offline {
        offline_growth(&args, events, &dir, &mut child, &mut report).await
    } else if args.footprint {
        footprint(&args, &dir, &mut child, &mut report).await
    } else {
        measure(&args, &dir.join("outpost.sock"), &mut child, &mut report).await
    };
    if json && result.is_ok() {
        println!("{}", serde_json::Value::Object(report.figures));
    }
    let _ = child.kill().await;
    if !args.keep && args.dir.is_none() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    result.map(|_| 0)
}

/// The agent binary the bench starts.
fn agent_bin() -> anyhow::Result<PathBuf> {
    match AGENT_BIN.get() {
        Some(p) => Ok(p.clone()),
        None => std::env::current_exe().context("locating the outpost binary"),
    }
}

/// Starts `outpost run` on `dir` as a child process (this same binary).
fn spawn_agent(dir: &Path) -> anyhow::Result<tokio::process::Child> {
    spawn_agent_with(dir, &[])
}

/// `spawn_agent` with more `outpost run` arguments.
fn spawn_agent_with(dir: &Path, extra: &[&str]) -> anyhow::Result<tokio::process::Child> {
    let exe = agent_bin()?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("agent.log"))?;
    tokio::process::Command::new(exe)
        .args(["run", "--data-dir"])
        .arg(dir)
        .args(extra)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .context("starting the benchmark agent")
}

/// Waits for the agent started on `dir` to answer: its socket, a client on it, and its pid.
async fn attach(dir: &Path, child: &mut tokio::process::Child) -> anyhow::Result<(PathBuf, Client, u32)> {
    let socket = dir.join("outpost.sock");
    wait_for_socket(&socket, child).await?;
    let client = Client::new(&socket);
    let pid = child.id().context("agent pid")?;
    Ok((socket, client, pid))
}

/// The agent's `status`.
async fn status(client: &Client) -> anyhow::Result<StatusView> {
    let (_, v) = client.request(Method::GET, "/v1/status", None).await?;
    Ok(serde_json::from_value(v)?)
}

/// Has the agent write its pending index rows now.
async fn checkpoint(client: &Client) -> anyhow::Result<()> {
    let (st, v) = client.request(Method::POST, "/v1/journal/checkpoint", None).await?;
    if !st.is_success() {
        bail!("the journal checkpoint failed: {v}");
    }
    Ok(())
}

async fn apply(client: &Client, doc: String) -> anyhow::Result<()> {
    let (st, v) = client.request(Method::POST, "/v1/definitions", Some(doc)).await?;
    if !st.is_success() {
        bail!("applying a benchmark definition failed: {v}");
    }
    Ok(())
}

/// Starts `runs` runs of `workflow` with `concurrency` clients; with `wait`, each request waits
/// for its run to complete. Returns each request's latency.
async fn drive(
    socket: &Path,
    workflow: &'static str,
    runs: usize,
    concurrency: usize,
    wait: bool,
) -> anyhow::Result<Vec<Duration>> {
    let next = Arc::new(AtomicUsize::new(0));
    let mut workers = Vec::new();
    for _ in 0..concurrency.max(1) {
        let next = next.clone();
        let socket = socket.to_path_buf();
        workers.push(tokio::spawn(async move {
            let mut conn = Connection::open(&socket).await?;
            let mut latencies = Vec::new();
            let path = if wait { "/v1/runs?wait=60" } else { "/v1/runs" };
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= runs {
                    break;
                }
                let body = json!({"workflow": workflow, "input": {"i": i}}).to_string();
                let t0 = Instant::now();
                let (st, v) = conn.request(Method::POST, path, Some(body)).await?;
                latencies.push(t0.elapsed());
                if !st.is_success() || (wait && v["status"] != "completed") {
                    bail!("run {i} of {workflow} failed: {st} {v}");
                }
            }
            anyhow::Ok(latencies)
        }));
    }
    let mut latencies = Vec::with_capacity(runs);
    for w in workers {
        latencies.extend(w.await??);
    }
    Ok(latencies)
}

/// The figures of one benchmark: printed as they come, or as one JSON object with `--json`.
struct Report {
    json: bool,
    figures: serde_json::Map<String, serde_json::Value>,
}

impl Report {
    fn fig(&mut self, name: &str, value: String) {
        if self.json {
            self.figures.insert(name.to_string(), value.into());
        } else {
            println!("  {name:<34}{value}");
        }
    }

    /// A line of context (a heading, progress); on stderr with `--json`, so stdout stays JSON.
    fn say(&self, line: String) {
        if self.json {
            eprintln!("{line}");
        } else {
            println!("{line}");
        }
    }
}

/// RSS, and how much of it is the process's own memory and how much mapped files (the binary's
/// code, which this kernel maps in large folios: nearly all of it once touched).
fn rss_parts(pid: u32) -> String {
    format!(
        "{} ({} heap and stacks, {} code and files)",
        mb(rss_kib(pid, "VmRSS:").unwrap_or(0)),
        mb(rss_kib(pid, "RssAnon:").unwrap_or(0)),
        mb(rss_kib(pid, "RssFile:").unwrap_or(0)),
    )
}

fn mb(kib: u64) -> String {
    format!("{:.1} MB", kib as f64 / 1024.0)
}

async fn footprint(
    args: &BenchArgs,
    dir: &Path,
    child: &mut tokio::process::Child,
    r: &mut Report,
) -> anyhow::Result<()> {
    let (socket, client, pid) = attach(dir, child).await?;
    let exe = agent_bin()?;
    r.say(format!("Footprint of {} ({})", exe.display(), std::env::consts::ARCH));
    r.fig(
        "binary size",
        format!("{:.2} MB", std::fs::metadata(&exe)?.len() as f64 / 1e6),
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    r.fig("idle RSS after start", rss_parts(pid));
    r.fig("  after a status request", rss_after_request(&client, pid).await?);

    apply(
        &client,
        "name: footprint-wait\nversion: 1\nsteps:\n  - {id: wait, action: sleep, args: {duration: 24h}}\n".into(),
    )
    .await?;
    drive(&socket, "footprint-wait", args.active_runs, args.concurrency, false).await?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let pending = status(&client).await?.timers.pending;
        if pending >= args.active_runs {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "the {} runs did not all reach their timer ({pending} did)",
                args.active_runs
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    r.fig(
        &format!("RSS with {} active runs", args.active_runs),
        format!("{}, peak {}", rss_parts(pid), mb(rss_kib(pid, "VmHWM:").unwrap_or(0))),
    );
    r.fig("  after a status request", rss_after_request(&client, pid).await?);

    let cpu0 = cpu_secs(pid);
    tokio::time::sleep(Duration::from_secs(args.idle_secs)).await;
    let cpu = cpu_secs(pid) - cpu0;
    r.fig(
        &format!("CPU over {} s idle ({} timers)", args.idle_secs, args.active_runs),
        format!("{:.3} s = {:.3} %", cpu, 100.0 * cpu / args.idle_secs as f64),
    );

    apply(&client, w1_definition(3)).await?;
    let have = status(&client).await?.journal.next_seq.saturating_sub(1);
    // W1 runs journal 5 events each.
    let runs = args.journal_events.saturating_sub(have).div_ceil(5) as usize;
    let t0 = Instant::now();
    drive(&socket, "bench-w1", runs, args.concurrency, true).await?;
    // These W1 runs end while the waiting runs' timers are pending: a run's end must not cost a
    // pass over every pending timer (docs/journal.md, "the index tables").
    let secs = t0.elapsed().as_secs_f64();
    r.say(format!(
        "  (filled the journal with {runs} runs in {secs:.1} s, {:.0} runs/s with {} timers pending)",
        runs as f64 / secs.max(1e-9),
        args.active_runs
    ));
    let events = status(&client).await?.journal.next_seq.saturating_sub(1);

    child.kill().await?;
    let t0 = Instant::now();
    *child = spawn_agent(dir)?;
    wait_for_socket(&socket, child).await?;
    let startup = t0.elapsed();
    let size = journal_bytes(dir)?;
    r.fig(
        &format!("start-up with {events} events"),
        format!(
            "{:.0} ms to a ready API, {} runs resumed (journal file {:.1} MB)",
            startup.as_secs_f64() * 1000.0,
            args.active_runs,
            size as f64 / 1e6
        ),
    );
    let pid = child.id().context("agent pid")?;
    r.fig("RSS after that start-up", mb(rss_kib(pid, "VmRSS:").unwrap_or(0)));
    sync_footprint(args, dir, r).await
}

/// RSS once a `status` request has run: an idle agent maps only the code it ran since its last
/// trim (`memory`), and a request maps what it needs back in.
async fn rss_after_request(client: &Client, pid: u32) -> anyhow::Result<String> {
    status(client).await?;
    Ok(rss_parts(pid))
}

/// Footprint of an agent connected to cloud-sync and idle: RSS, CPU and wake-ups. cloud-sync is
/// `outpost-cloud` next to this binary, started as the README's quickstart starts it (embedded
/// broker, TLS, client certificates, signatures), and the gateway is enrolled as the README
/// says (`outpost keygen`, `outpost-cloud pki sign`, `outpost enroll`).
async fn sync_footprint(args: &BenchArgs, dir: &Path, r: &mut Report) -> anyhow::Result<()> {
    let exe = agent_bin()?;
    let cloud = std::env::current_exe()?.with_file_name("outpost-cloud");
    if !cloud.exists() {
        r.say(format!(
            "  (idle with sync: skipped, no {} next to this binary; cargo build --release -p outpost-cloud-sync)",
            cloud.display()
        ));
        return Ok(());
    }
    let (cloud_dir, agent_dir) = (dir.join("cloud"), dir.join("sync-agent"));
    std::fs::create_dir_all(&agent_dir)?;
    let (api, mqtt) = (free_port()?, free_port()?);
    let log = std::fs::File::create(dir.join("cloud.log"))?;
    let mut cloud_child = tokio::process::Command::new(&cloud)
        .arg("--data-dir")
        .arg(&cloud_dir)
        .args(["--listen", &format!("127.0.0.1:{api}")])
        .args(["--mqtt-listen", &format!("127.0.0.1:{mqtt}")])
        .stdout(Stdio::null())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .context("starting outpost-cloud")?;
    let deadline = Instant::now() + Duration::from_secs(60);
    // A probe that connected to itself (TCP simultaneous open) found nobody listening.
    let listening = || async {
        let s = tokio::net::TcpStream::connect(("127.0.0.1", mqtt)).await.ok()?;
        (s.local_addr().ok()? != s.peer_addr().ok()?).then_some(())
    };
    while listening().await.is_none() {
        if Instant::now() > deadline || cloud_child.try_wait()?.is_some() {
            bail!(
                "outpost-cloud did not come up (see {})",
                dir.join("cloud.log").display()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let pki = cloud_dir.join("pki");
    let csr = agent_dir.join("identity/device.csr");
    let cert = agent_dir.join("identity/bench-gw.crt");
    let (ca, fleet) = (pki.join("ca.crt"), pki.join("fleet.pub"));
    let steps: [(&Path, Vec<&std::ffi::OsStr>); 3] = [
        (
            &exe,
            vec!["keygen".as_ref(), "--device-id".as_ref(), "bench-gw".as_ref()],
        ),
        (
            &cloud,
            vec![
                "pki".as_ref(),
                "sign".as_ref(),
                csr.as_os_str(),
                "--out".as_ref(),
                cert.as_os_str(),
            ],
        ),
        (
            &exe,
            vec![
                "enroll".as_ref(),
                "--cert".as_ref(),
                cert.as_os_str(),
                "--ca".as_ref(),
                ca.as_os_str(),
                "--fleet-key".as_ref(),
                fleet.as_os_str(),
            ],
        ),
    ];
    for (bin, step) in steps {
        let data_dir = if bin == cloud.as_path() { &cloud_dir } else { &agent_dir };
        let out = tokio::process::Command::new(bin)
            .arg("--data-dir")
            .arg(data_dir)
            .args(&step)
            .output()
            .await?;
        if !out.status.success() {
            bail!(
                "enrolling the bench gateway: {:?}: {}",
                step,
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    let broker = format!("mqtts://127.0.0.1:{mqtt}");
    let mut agent = spawn_agent_with(&agent_dir, &["--broker", &broker, "--device-id", "bench-gw"])?;
    let socket = agent_dir.join("outpost.sock");
    wait_for_socket(&socket, &mut agent).await?;
    let client = Client::new(&socket);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !status(&client).await?.sync.is_some_and(|s| s.connected) {
        if Instant::now() > deadline {
            bail!("the bench gateway did not connect to cloud-sync");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Let the first exchange (hello, inventory, desired state) settle before measuring idle.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let pid = agent.id().context("agent pid")?;
    let (cpu0, switches0) = (cpu_secs(pid), context_switches(pid));
    tokio::time::sleep(Duration::from_secs(args.idle_secs)).await;
    let (cpu, switches) = (cpu_secs(pid) - cpu0, context_switches(pid).saturating_sub(switches0));
    r.fig("idle RSS with sync connected", rss_parts(pid));
    r.fig(
        &format!("CPU, {} s idle with sync", args.idle_secs),
        format!(
            "{:.3} s = {:.3} %, {switches} context switches",
            cpu,
            100.0 * cpu / args.idle_secs as f64
        ),
    );
    r.fig("  after a status request", rss_after_request(&client, pid).await?);
    let _ = agent.kill().await;
    let _ = cloud_child.kill().await;
    Ok(())
}

/// `--offline`: W1 runs until the journal holds `events` events, none of them acknowledged.
async fn offline_growth(
    args: &BenchArgs,
    events: u64,
    dir: &Path,
    child: &mut tokio::process::Child,
    r: &mut Report,
) -> anyhow::Result<()> {
    let (socket, client, pid) = attach(dir, child).await?;
    apply(&client, w1_definition(args.steps)).await?;
    r.say(format!(
        "Offline: W1 runs ({} set steps) with cloud sync configured and unreachable, {} in flight",
        args.steps, args.concurrency
    ));
    r.fig("RSS at start", mb(rss_kib(pid, "VmRSS:").unwrap_or(0)));
    // W1 runs journal steps + 2 events each; five stages, each a fifth of the events.
    let per_run = args.steps as u64 + 2;
    let t0 = Instant::now();
    for stage in 1..=5u64 {
        let runs = (events / 5).div_ceil(per_run) as usize;
        drive(&socket, "bench-w1", runs, args.concurrency, true).await?;
        let st = status(&client).await?;
        let journaled = st.journal.next_seq.saturating_sub(1);
        let backlog = st.sync.as_ref().map(|s| s.backlog_events).unwrap_or(0);
        r.fig(
            &format!("after {journaled} events"),
            format!(
                "RSS {} (peak {}), outbox {backlog} events, {:.0} s",
                mb(rss_kib(pid, "VmRSS:").unwrap_or(0)),
                mb(rss_kib(pid, "VmHWM:").unwrap_or(0)),
                t0.elapsed().as_secs_f64()
            ),
        );
        if stage == 5 {
            checkpoint(&client).await?;
            let (len, held) = journal_sizes(dir)?;
            let per_event = |b: u64| b as f64 / journaled.max(1) as f64;
            r.fig(
                "journal on disk",
                format!(
                    "{:.1} MB with its log, {:.0} bytes per event; {:.1} MB allocated, {:.0} bytes per event",
                    len as f64 / 1e6,
                    per_event(len),
                    held as f64 / 1e6,
                    per_event(held)
                ),
            );
        }
    }
    Ok(())
}

/// A TCP port free on 127.0.0.1 just now.
fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Voluntary and involuntary context switches of a process: how often it woke up.
fn context_switches(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .filter(|l| l.starts_with("voluntary_ctxt_switches:") || l.starts_with("nonvoluntary_ctxt_switches:"))
        .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        .sum()
}

async fn measure(
    args: &BenchArgs,
    socket: &Path,
    child: &mut tokio::process::Child,
    r: &mut Report,
) -> anyhow::Result<()> {
    wait_for_socket(socket, child).await?;
    let pid = child.id().context("agent pid")?;
    let client = Client::new(socket);
    apply(&client, w1_definition(args.steps)).await?;
    if args.workloads.contains(&Workload::Http) {
        apply(&client, w2_definition(args.steps, http_server().await?)).await?;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    r.fig(
        "idle RSS (daemon)",
        format!("{:.1} MB", rss_kib(pid, "VmRSS:").unwrap_or(0) as f64 / 1024.0),
    );
    for w in &args.workloads {
        let (name, workflow, what) = match w {
            Workload::Set => ("W1", "bench-w1", "sequential set steps"),
            Workload::Http => ("W2", "bench-w2", "sequential http steps against a local server"),
        };
        r.say(format!(
            "{name}: {} runs x {} {what}, {} in flight, durable commits, through the local API",
            args.runs, args.steps, args.concurrency
        ));
        workload(args, socket, &client, pid, name, workflow, r).await?;
    }
    Ok(())
}

/// One workload's runs and its figures, each named `NAME figure`.
async fn workload(
    args: &BenchArgs,
    socket: &Path,
    client: &Client,
    pid: u32,
    name: &str,
    workflow: &'static str,
    r: &mut Report,
) -> anyhow::Result<()> {
    // Index rows wait in memory for a checkpoint (docs/journal.md): one before and one after,
    // so the figures hold every byte this workload causes and none of the one before.
    checkpoint(client).await?;
    let before = status(client).await?.journal;
    let cpu_before = cpu_secs(pid);
    let written_before = write_bytes(pid);
    let started = Instant::now();
    let mut latencies = drive(socket, workflow, args.runs, args.concurrency, true).await?;
    let elapsed = started.elapsed();
    checkpoint(client).await?;
    let after = status(client).await?.journal;
    let cpu = cpu_secs(pid) - cpu_before;
    let written = write_bytes(pid).zip(written_before).map(|(a, b)| a.saturating_sub(b));
    let peak_rss = rss_kib(pid, "VmHWM:").unwrap_or(0);
    let rss_after = rss_kib(pid, "VmRSS:").unwrap_or(0);

    latencies.sort();
    let (commits, ops, events) = (
        after.commits - before.commits,
        after.ops - before.ops,
        after.events - before.events,
    );
    let secs = elapsed.as_secs_f64();
    let steps = (args.runs * args.steps) as f64;
    let mut fig = |what: &str, value: String| r.fig(&format!("{name} {what}"), value);
    fig("elapsed", format!("{secs:.2} s"));
    fig("runs/s", format!("{:.0}", args.runs as f64 / secs));
    fig("durable steps/s", format!("{:.0}", steps / secs));
    fig(
        "run latency p50",
        format!("{:.2} ms", percentile(&latencies, 0.50).as_secs_f64() * 1000.0),
    );
    fig(
        "run latency p99",
        format!("{:.2} ms", percentile(&latencies, 0.99).as_secs_f64() * 1000.0),
    );
    fig("commits/s", format!("{:.0}", commits as f64 / secs));
    fig(
        "appends per commit",
        format!("{:.1}", ops as f64 / commits.max(1) as f64),
    );
    fig(
        "events per commit",
        format!("{:.1}", events as f64 / commits.max(1) as f64),
    );
    fig(
        "bytes written per durable step",
        match written {
            Some(b) => format!(
                "{:.0} B ({:.1} MB in all, {:.0} B per commit)",
                b as f64 / steps,
                b as f64 / 1e6,
                b as f64 / commits.max(1) as f64
            ),
            None => "unknown (no /proc/PID/io)".into(),
        },
    );
    fig(
        "daemon CPU",
        format!(
            "{:.0}% of one core, {:.0} us per step",
            100.0 * cpu / secs,
            1e6 * cpu / steps
        ),
    );
    fig("peak RSS (daemon)", format!("{:.1} MB", peak_rss as f64 / 1024.0));
    fig("RSS after run (daemon)", format!("{:.1} MB", rss_after as f64 / 1024.0));
    Ok(())
}
