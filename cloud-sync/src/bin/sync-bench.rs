//! Sync benchmarks: wire bytes per event, drain rate of a 100,000-event backlog (real agent and
//! real cloud-sync processes over the embedded broker), cloud-sync ingest with 100 simulated
//! devices publishing at once, and MQTT connection set-up. Each runs twice in one run: plain
//! (no TLS, unsigned: the `--insecure-*` flags) and as shipped (mutual TLS, every message
//! signed). Prints figures; asserts nothing.
//!
//!   cargo build --release && ./target/release/outpost-sync-bench [--operators | --ingest: only those figures]
//!   outpost-sync-bench --store postgres [--replicas 1,2,3] [--devices 10000] [--events-per-device 20]:
//!   only the scale-out figures (replicas on Postgres behind Mosquitto's shared subscriptions)
//!   outpost-sync-bench --connect [--client qemu-aarch64 -L /usr/aarch64-linux-gnu BIN]: only
//!   connection set-up, also with the connecting side run by that command (BIN: this bench
//!   built for the gateway's target), as a gateway on that CPU pays it

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use outpost_cloud_sync::pki::Pki;
use outpost_shared::journal::{self, ErrorInfo, Event, Record};
use outpost_shared::protocol::{self, Body, Channel, Seal, Topics};
use outpost_shared::signing::SigningKey;
use outpost_shared::tls::TlsFiles;

/// Plain (the `--insecure-*` flags) or as shipped.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Plain,
    Secure,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Plain => "plain (no TLS, unsigned)",
            Mode::Secure => "mutual TLS + signatures",
        }
    }
}
use serde_json::Value;

#[path = "sync_bench/scale.rs"]
mod scale;

/// A typical mix: runs of three steps, a timed-out attempt now and then.
fn sample_events(n: usize) -> Vec<Record> {
    let mut out = Vec::with_capacity(n);
    let mut i = 0u64;
    while out.len() < n {
        let run = format!("1a2b3c4d{i:08x}");
        let at = 1_790_000_000_000 + i * 40;
        let ev = |e: Event, k: u64| Record {
            run_id: run.clone(),
            at_ms: at + k,
            event: e,
        };
        out.push(ev(
            Event::RunStarted {
                workflow: "oven-cooling".into(),
                version: 3,
                input: r#"{"start_celsius":110}"#.into(),
            },
            0,
        ));
        for (k, step) in ["read_temp", "open_vent", "confirm"].iter().enumerate() {
            let k = k as u64 * 3;
            out.push(ev(
                Event::AttemptStarted {
                    step: step.to_string(),
                    visit: 1,
                    attempt: 1,
                    key: format!("{run}/{step}/1"),
                },
                k + 1,
            ));
            if i.is_multiple_of(10) && *step == "open_vent" {
                out.push(ev(
                    Event::AttemptFailed {
                        step: step.to_string(),
                        visit: 1,
                        attempt: 1,
                        error: ErrorInfo::new("timeout", "attempt took longer than 2s"),
                        retry_at_ms: Some(at + 2000),
                    },
                    k + 2,
                ));
            }
            out.push(ev(
                Event::StepCompleted {
                    step: step.to_string(),
                    visit: 1,
                    output: format!(r#"{{"celsius":{}}}"#, 70 + i % 30),
                },
                k + 3,
            ));
        }
        out.push(ev(
            Event::RunCompleted {
                output: r#"{"vents":1}"#.into(),
            },
            12,
        ));
        i += 1;
    }
    out.truncate(n);
    out
}

fn wire_bytes() {
    let events = sample_events(100_000);
    let records: Vec<Vec<u8>> = events.iter().map(journal::encode).collect();
    let mut wire = 0usize;
    let mut signed = 0usize;
    let key = SigningKey::generate_pkcs8()
        .and_then(|d| SigningKey::from_pkcs8(&d, "bench"))
        .map(|k| Seal::Signed(std::sync::Arc::new(k)));
    let topic = Topics::new(protocol::DEFAULT_PREFIX).topic("bench-gw", Channel::Events);
    for (i, chunk) in records.chunks(500).enumerate() {
        let body = Body::Events(protocol::pack(1, 1 + i as u64 * 500, chunk));
        wire += protocol::encode(&body).len();
        if let Ok(seal) = &key {
            signed += seal.encode(&topic, &body).map(|b| b.len()).unwrap_or(0);
        }
    }
    let json: usize = events
        .iter()
        .map(|r| {
            serde_json::json!({"seq": 1, "run_id": r.run_id, "at_ms": r.at_ms, "event": r.event})
                .to_string()
                .len()
                + 1
        })
        .sum();
    let raw: usize = records.iter().map(Vec::len).sum();
    println!("wire format (100,000 typical events, batches of 500)");
    println!(
        "  postcard records, uncompressed   {:6.1} bytes/event",
        raw as f64 / 1e5
    );
    println!(
        "  batched + deflated on the wire   {:6.1} bytes/event",
        wire as f64 / 1e5
    );
    println!(
        "  ... signed (protocol v2)         {:6.2} bytes/event (+{:.2})",
        signed as f64 / 1e5,
        (signed as f64 - wire as f64) / 1e5
    );
    println!(
        "  the same events as JSON lines    {:6.1} bytes/event",
        json as f64 / 1e5
    );
}

fn bin(name: &str) -> anyhow::Result<PathBuf> {
    let p = std::env::current_exe()?.with_file_name(name);
    if !p.exists() {
        bail!("{} is missing: cargo build --release first", p.display());
    }
    Ok(p)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(18830)
}

/// The body of a 200 answer to `GET path` (cloud-sync closes after each answer).
/// The admin token of the cloud the bench runs now (made in its store before it starts).
static TOKEN: std::sync::Mutex<String> = std::sync::Mutex::new(String::new());

/// An API token with `role`, made in `store` as `outpost-cloud tokens create` would.
fn new_token(store: &outpost_cloud_sync::Store, name: &str, role: &str) -> anyhow::Result<String> {
    use outpost_cloud_sync::operators::admin;
    let req = admin::AdminRequest::TokensCreate {
        name: name.into(),
        roles: vec![role.into()],
        expires_ms: None,
    };
    let reply = admin::execute(store, &req, "sync-bench", "local", 0)?;
    let token = reply.text.lines().find(|l| l.starts_with("opt_"));
    Ok(token.unwrap_or_default().to_string())
}

fn http_body(port: u16, path: &str) -> Option<Vec<u8>> {
    use std::io::{Read, Write};
    let token = TOKEN.lock().map(|t| t.clone()).unwrap_or_default();
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).ok()?;
    let head = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    raw.starts_with(b"HTTP/1.1 200").then(|| raw.split_off(head + 4))
}

fn http_get(port: u16, path: &str) -> Option<Value> {
    serde_json::from_slice(&http_body(port, path)?).ok()
}

fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) -> anyhow::Result<()> {
    let t = Instant::now();
    while !f() {
        if t.elapsed() > timeout {
            bail!("timed out waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

fn cloud(dir: &std::path::Path, api: u16, mqtt: u16, mode: Mode) -> anyhow::Result<std::process::Child> {
    std::fs::create_dir_all(dir)?;
    {
        let store = outpost_cloud_sync::Store::open(&dir.join("cloud.redb"))?;
        let token = new_token(&store, &format!("bench-{}", fastrand::u32(..)), "admin")?;
        if let Ok(mut t) = TOKEN.lock() {
            *t = token;
        }
    }
    let mut cmd = Command::new(bin("outpost-cloud")?);
    cmd.arg("--data-dir")
        .arg(dir)
        .arg("--plain-http")
        .args(["--listen", &format!("127.0.0.1:{api}")])
        .args(["--mqtt-listen", &format!("127.0.0.1:{mqtt}")]);
    if mode == Mode::Plain {
        cmd.args(["--insecure-plaintext", "--insecure-unsigned"]);
    }
    Ok(cmd.stdout(Stdio::null()).stderr(Stdio::null()).spawn()?)
}

/// The fleet PKI of a cloud data directory, made now (as the first start would).
fn pki(cloud_dir: &std::path::Path) -> anyhow::Result<Pki> {
    let pki = Pki::new(cloud_dir.join("pki"));
    if !pki.exists() {
        pki.init(&[])?;
    }
    Ok(pki)
}

/// A device identity signed by the fleet: its TLS files (written under `dir`) and its seal.
fn device_identity(pki: &Pki, dir: &std::path::Path, id: &str) -> anyhow::Result<(TlsFiles, Seal)> {
    let der = SigningKey::generate_pkcs8()?;
    let pkcs8 = rustls::pki_types::PrivatePkcs8KeyDer::from(der.clone());
    let pair = rcgen::KeyPair::from_pkcs8_der_and_sign_algo(&pkcs8, &rcgen::PKCS_ED25519)?;
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name.push(rcgen::DnType::CommonName, id);
    let csr = params.serialize_request(&pair)?.pem()?;
    let (_, cert) = pki.sign(&csr, 30)?;
    std::fs::create_dir_all(dir)?;
    let (cert_path, key_path) = (dir.join(format!("{id}.crt")), dir.join(format!("{id}.key")));
    std::fs::write(&cert_path, cert)?;
    std::fs::write(&key_path, outpost_shared::signing::pem_block("PRIVATE KEY", &der))?;
    let files = TlsFiles {
        ca: pki.file("ca.crt"),
        cert: Some(cert_path),
        key: Some(key_path),
    };
    Ok((
        files,
        Seal::Signed(std::sync::Arc::new(SigningKey::from_pkcs8(&der, id)?)),
    ))
}

/// A real agent builds a 100k-event backlog offline; then cloud-sync comes up and it drains.
fn drain(mode: Mode) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (api, mqtt) = (free_port(), free_port());
    let outpost = bin("outpost")?;
    let flow = "name: burst\nversion: 1\nkind: state_machine\nsteps:\n  - id: tick\n    action: set\n    args: {n: \"{{ steps.tick.visits }}\"}\n    choices:\n      - when: steps.tick.visits >= 497\n        next: done\n    default: tick\n  - id: done\n    action: set\n    args: {}\n    end: succeed\n";
    std::fs::write(dir.path().join("burst.yaml"), flow)?;
    let data = dir.path().join("agent");
    let url = match mode {
        Mode::Plain => format!("mqtt://127.0.0.1:{mqtt}"),
        Mode::Secure => {
            let pki = pki(&dir.path().join("cloud"))?;
            pki.enroll_local(&outpost, &data, "bench-gw")?;
            format!("mqtts://127.0.0.1:{mqtt}")
        }
    };
    let mut agent = Command::new(&outpost);
    agent.arg("run");
    if mode == Mode::Plain {
        agent.arg("--insecure-unsigned");
    }
    let mut agent = agent
        .arg("--data-dir")
        .arg(&data)
        .args(["--broker", &url, "--device-id", "bench-gw"])
        .args(["--drain-rate", "100000000"])
        .arg("--apply")
        .arg(dir.path().join("burst.yaml"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let cli = |args: &[&str]| Command::new(&outpost).arg("--data-dir").arg(&data).args(args).output();
    wait_for("the agent", Duration::from_secs(20), || {
        cli(&["status"]).is_ok_and(|o| o.status.success())
    })?;
    for i in 0..200 {
        cli(&["start", "burst", "--id", &format!("r{i:03}")])?;
    }
    let next_seq = || -> u64 {
        cli(&["status", "--json"])
            .ok()
            .and_then(|o| serde_json::from_slice::<Value>(&o.stdout).ok())
            .and_then(|v| v["journal"]["next_seq"].as_u64())
            .unwrap_or(0)
    };
    wait_for("the backlog", Duration::from_secs(300), || next_seq() > 100_000)?;
    std::thread::sleep(Duration::from_millis(500));
    let total = next_seq() - 1;
    let mut cloud = cloud(&dir.path().join("cloud"), api, mqtt, mode)?;
    let t0 = Instant::now();
    let stored = || {
        http_get(api, "/v1/devices/bench-gw")
            .and_then(|d| d["stored_seq"].as_u64())
            .unwrap_or(0)
    };
    // The agent reconnects on its own backoff; the drain starts with the first stored event.
    let first = wait_for("the first batch", Duration::from_secs(120), || stored() > 0);
    let (connected, t1) = (t0.elapsed(), Instant::now());
    let res = first.and_then(|_| wait_for("the drain", Duration::from_secs(300), || stored() >= total));
    let took = t1.elapsed();
    let _ = agent.kill();
    let _ = cloud.kill();
    res?;
    println!(
        "backlog drain, {} (real agent -> embedded broker -> real cloud-sync, fsync'd at both ends)",
        mode.name()
    );
    println!(
        "  {total} events in {:.2} s after the first batch: {:.0} events/s (reconnect took {:.1} s)",
        took.as_secs_f64(),
        total as f64 / took.as_secs_f64(),
        connected.as_secs_f64()
    );
    Ok(())
}

/// 100 simulated devices publish at once into one cloud-sync.
fn ingest(mode: Mode) -> anyhow::Result<()> {
    const DEVICES: usize = 100;
    const BATCHES: usize = 10;
    const PER_BATCH: usize = 500;
    let dir = tempfile::tempdir()?;
    let (api, mqtt) = (free_port(), free_port());
    let identities: Vec<Option<(TlsFiles, Seal)>> = match mode {
        Mode::Plain => (0..DEVICES).map(|_| None).collect(),
        Mode::Secure => {
            let pki = pki(dir.path())?;
            (0..DEVICES)
                .map(|d| device_identity(&pki, &dir.path().join("sims"), &format!("sim-{d:03}")).map(Some))
                .collect::<anyhow::Result<_>>()?
        }
    };
    let mut cloud = cloud(dir.path(), api, mqtt, mode)?;
    wait_for("cloud-sync", Duration::from_secs(20), || {
        http_get(api, "/v1/health").is_some()
    })?;
    std::thread::sleep(Duration::from_millis(500));
    let records: Vec<Vec<u8>> = sample_events(BATCHES * PER_BATCH).iter().map(journal::encode).collect();
    let bodies: Vec<Body> = records
        .chunks(PER_BATCH)
        .enumerate()
        .map(|(i, c)| Body::Events(protocol::pack(1, 1 + (i * PER_BATCH) as u64, c)))
        .collect();
    let topics = Topics::new(protocol::DEFAULT_PREFIX);
    // Each device's batches sealed up front (signing is the device's cost, not the cloud's).
    let sealed: Vec<Vec<Vec<u8>>> = (0..DEVICES)
        .map(|d| {
            let topic = topics.topic(&format!("sim-{d:03}"), Channel::Events);
            let seal = identities[d].as_ref().map_or(Seal::Unsigned, |(_, s)| s.clone());
            bodies.iter().filter_map(|b| seal.encode(&topic, b).ok()).collect()
        })
        .collect();
    let t0 = Instant::now();
    let handles: Vec<_> = sealed
        .into_iter()
        .enumerate()
        .map(|(d, batches)| {
            let topic = topics.topic(&format!("sim-{d:03}"), Channel::Events);
            let tls = identities[d]
                .as_ref()
                .and_then(|(files, _)| outpost_shared::tls::client_config(files).ok());
            std::thread::spawn(move || {
                let mut opts = rumqttc::MqttOptions::new(format!("sim-{d:03}"), "127.0.0.1", mqtt);
                opts.set_max_packet_size(2 << 20, 2 << 20);
                if let Some(tls) = tls {
                    opts.set_transport(rumqttc::Transport::tls_with_config(rumqttc::TlsConfiguration::Rustls(
                        tls,
                    )));
                }
                let (client, mut conn) = rumqttc::Client::new(opts, 16);
                let n = batches.len();
                std::thread::spawn(move || {
                    for b in batches {
                        let _ = client.publish(topic.clone(), rumqttc::QoS::AtLeastOnce, false, b);
                    }
                });
                let mut acked = 0;
                for ev in conn.iter() {
                    match ev {
                        Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_))) => {
                            acked += 1;
                            if acked == n {
                                break;
                            }
                        }
                        Ok(_) => {}
                        Err(_) => std::thread::sleep(Duration::from_millis(50)),
                    }
                }
            })
        })
        .collect();
    for h in handles {
        let _ = h.join();
    }
    let total = (DEVICES * BATCHES * PER_BATCH) as u64;
    let events = || {
        http_get(api, "/v1/stats")
            .and_then(|s| s["events_stored"].as_u64())
            .unwrap_or(0)
    };
    let res = wait_for("the ingest", Duration::from_secs(600), || events() >= total);
    let took = t0.elapsed();
    if res.is_err() {
        let _ = cloud.kill();
    }
    res.context("ingest")?;
    println!(
        "cloud-sync ingest, {} ({DEVICES} simulated devices at once, {BATCHES} batches of {PER_BATCH} events each)",
        mode.name()
    );
    println!(
        "  {total} events in {:.2} s: {:.0} events/s, each batch fsync'd before its ack",
        took.as_secs_f64(),
        total as f64 / took.as_secs_f64()
    );
    let pages = if mode == Mode::Plain {
        console_pages(api, DEVICES, BATCHES * PER_BATCH)
    } else {
        Ok(())
    };
    let _ = cloud.kill();
    pages
}

/// Connection set-up: from TCP connect to CONNACK, mean of `n` fresh connections of one
/// device to the embedded broker. With `client` (a runner and an `outpost-sync-bench` built for
/// another target, e.g. `qemu-aarch64 -L /usr/aarch64-linux-gnu target/aarch64-…/release/outpost-sync-bench`),
/// the connecting side runs there (`--connect-client`), as a gateway's does.
fn connect_setup(mode: Mode, n: u32, client: Option<&[String]>) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (api, mqtt) = (free_port(), free_port());
    let identity = match mode {
        Mode::Plain => None,
        Mode::Secure => Some(device_identity(
            &pki(dir.path())?,
            &dir.path().join("sims"),
            "conn-bench",
        )?),
    };
    let mut cloud = cloud(dir.path(), api, mqtt, mode)?;
    wait_for("cloud-sync", Duration::from_secs(20), || {
        http_get(api, "/v1/health").is_some()
    })?;
    std::thread::sleep(Duration::from_millis(300));
    let files = identity.as_ref().map(|(f, _)| f);
    let mean = match client {
        None => connect_client(mqtt, files, n),
        Some(cmd) => remote_connect_client(cmd, mqtt, files, n),
    };
    let _ = cloud.kill();
    let where_ = client.map_or_else(|| "this machine".to_string(), |c| c.join(" "));
    println!(
        "connection set-up, {}, client on {where_}: {:.2} ms from connect to CONNACK (mean of {n})",
        mode.name(),
        mean?.as_secs_f64() * 1000.0
    );
    Ok(())
}

/// The client side of [`connect_setup`]: mean time from connect to CONNACK.
fn connect_client(port: u16, files: Option<&TlsFiles>, n: u32) -> anyhow::Result<Duration> {
    let tls = files.map(outpost_shared::tls::client_config).transpose()?;
    let mut total = Duration::ZERO;
    for _ in 0..n {
        let mut opts = rumqttc::MqttOptions::new("conn-bench", "127.0.0.1", port);
        if let Some(tls) = &tls {
            opts.set_transport(rumqttc::Transport::tls_with_config(rumqttc::TlsConfiguration::Rustls(
                tls.clone(),
            )));
        }
        let (client, mut conn) = rumqttc::Client::new(opts, 4);
        let t = Instant::now();
        loop {
            match conn.recv_timeout(Duration::from_secs(30)) {
                Ok(Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_)))) => break,
                Ok(Ok(_)) => {}
                other => bail!("no CONNACK: {other:?}"),
            }
        }
        total += t.elapsed();
        let _ = client.disconnect();
        let _ = conn.recv_timeout(Duration::from_millis(50));
    }
    Ok(total / n.max(1))
}

/// Runs [`connect_client`] in `cmd` (`--connect-client PORT N [CA CERT KEY]`), which prints
/// the mean in microseconds.
fn remote_connect_client(cmd: &[String], port: u16, files: Option<&TlsFiles>, n: u32) -> anyhow::Result<Duration> {
    let (program, pre) = cmd.split_first().context("--client needs a command")?;
    let mut c = Command::new(program);
    c.args(pre)
        .arg("--connect-client")
        .arg(port.to_string())
        .arg(n.to_string());
    if let Some(f) = files {
        c.arg(&f.ca);
        c.args(f.cert.iter().chain(f.key.iter()));
    }
    let out = c
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| program.to_string())?;
    anyhow::ensure!(out.status.success(), "{program}: {}", out.status);
    let us: u64 = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .context("--connect-client printed no figure")?;
    Ok(Duration::from_micros(us))
}

/// `--connect-client PORT N [CA CERT KEY]`: the remote side of [`remote_connect_client`].
fn connect_client_main(args: &[String]) -> anyhow::Result<()> {
    let port: u16 = args.first().context("PORT")?.parse()?;
    let n: u32 = args.get(1).context("N")?.parse()?;
    let files = match args.get(2..5) {
        Some([ca, cert, key]) => Some(TlsFiles {
            ca: ca.into(),
            cert: Some(cert.into()),
            key: Some(key.into()),
        }),
        _ => None,
    };
    let mean = connect_client(port, files.as_ref(), n)?;
    println!("{}", mean.as_micros());
    Ok(())
}

/// Console page latency over the store the ingest left (what an operator's browser pays on
/// every live refresh).
fn console_pages(api: u16, devices: usize, per_device: usize) -> anyhow::Result<()> {
    const ROUNDS: u32 = 20;
    println!(
        "console pages over that store ({devices} devices, {per_device} events each; mean of {ROUNDS} sequential GETs)"
    );
    let run = "/devices/sim-000/runs/1a2b3c4d00000000";
    for (name, path) in [("fleet", "/"), ("device", "/devices/sim-000"), ("run", run)] {
        let t = Instant::now();
        let mut bytes = 0;
        for _ in 0..ROUNDS {
            bytes = http_body(api, path).with_context(|| format!("GET {path}"))?.len();
        }
        let ms = t.elapsed().as_secs_f64() * 1000.0 / f64::from(ROUNDS);
        println!("  {name:<6} {path:<40} {ms:>7.1} ms  {:>7} bytes", bytes);
    }
    Ok(())
}

/// What an operator's request costs: a sign-in (argon2id hash and verify) and the bearer-token
/// check every API call makes, beside the plain store read it guards.
fn operators() -> anyhow::Result<()> {
    use outpost_cloud_sync::operators;
    let dir = tempfile::tempdir()?;
    let store = outpost_cloud_sync::Store::open(&dir.path().join("cloud.redb"))?;
    let t = Instant::now();
    let rounds = 5;
    let mut hash = String::new();
    for _ in 0..rounds {
        hash = operators::hash_password("correct horse battery staple")?;
    }
    let hash_ms = t.elapsed().as_secs_f64() * 1000.0 / f64::from(rounds);
    let t = Instant::now();
    for _ in 0..rounds {
        anyhow::ensure!(operators::verify_password("correct horse battery staple", &hash));
    }
    let verify_ms = t.elapsed().as_secs_f64() * 1000.0 / f64::from(rounds);
    let token = new_token(&store, "bench", "viewer")?;
    let n = 20_000u32;
    let t = Instant::now();
    for _ in 0..n {
        let _ = store.device("bench-gw")?;
    }
    let read_us = t.elapsed().as_secs_f64() * 1e6 / f64::from(n);
    let t = Instant::now();
    for _ in 0..n {
        anyhow::ensure!(operators::token_principal(&store, &token, 1).is_ok());
    }
    let token_us = t.elapsed().as_secs_f64() * 1e6 / f64::from(n);
    println!("operators: sign-in hash {hash_ms:.1} ms, verify {verify_ms:.1} ms (argon2id, 19 MiB, 2 passes)");
    println!(
        "operators: per API call, bearer-token check {token_us:.2} us vs a plain store read {read_us:.2} us ({n} each)"
    );
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("--connect-client") {
        return connect_client_main(args.get(1..).unwrap_or_default());
    }
    if args.iter().any(|a| a == "--operators") {
        return operators();
    }
    if args.iter().any(|a| a == "--ingest") {
        return ingest(Mode::Plain);
    }
    if let Some(i) = args.iter().position(|a| a == "--store") {
        match args.get(i + 1).map(String::as_str) {
            Some("postgres") => return scale::run(&scale::Plan::parse(&args)?),
            Some("redb") | None => {}
            Some(other) => bail!("--store {other}: redb (the default runs) or postgres"),
        }
    }
    // `--connect [--client RUNNER… BIN]`: only the connection set-up figures.
    let client = args
        .iter()
        .position(|a| a == "--client")
        .map(|i| args.get(i + 1..).unwrap_or_default().to_vec());
    if args.iter().any(|a| a == "--connect") {
        for mode in [Mode::Plain, Mode::Secure] {
            connect_setup(mode, 50, None)?;
            if let Some(c) = &client {
                connect_setup(mode, 20, Some(c))?;
            }
        }
        return Ok(());
    }
    operators()?;
    wire_bytes();
    for mode in [Mode::Plain, Mode::Secure] {
        connect_setup(mode, 50, None)?;
    }
    for mode in [Mode::Plain, Mode::Secure] {
        drain(mode)?;
    }
    for mode in [Mode::Plain, Mode::Secure] {
        ingest(mode)?;
    }
    Ok(())
}
