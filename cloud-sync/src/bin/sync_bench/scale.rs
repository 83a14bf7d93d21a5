//! `outpost-sync-bench --store postgres --replicas 1,2,3 --devices 10000`: cloud-sync replicas on
//! one Postgres behind Mosquitto's shared subscriptions, fed by simulated devices over real MQTT.
//! Prints ingest events/s, publish-to-ack latency, Postgres bytes per event and console page
//! times over that fleet. Asserts nothing.

use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use outpost_cloud_sync::testing::TestPostgres;
use outpost_shared::journal;
use outpost_shared::protocol::{self, Body, Channel, Topics};

use super::{TOKEN, bin, free_port, http_body, http_get, new_token, sample_events, wait_for};

/// Simulated devices share this many MQTT connections (one per device would measure the
/// broker's connection handling, not ingest).
const CONNECTIONS: usize = 20;

/// What the command line asks for.
pub struct Plan {
    /// Replica counts to run, one fleet each.
    pub replicas: Vec<usize>,
    /// Simulated devices.
    pub devices: usize,
    /// Events each device sends, in one batch.
    pub events: usize,
}

impl Plan {
    /// Reads `--replicas 1,2,3 --devices N --events-per-device N`.
    pub fn parse(args: &[String]) -> anyhow::Result<Plan> {
        let value = |flag: &str| args.iter().position(|a| a == flag).and_then(|i| args.get(i + 1));
        let replicas = match value("--replicas") {
            Some(v) => v
                .split(',')
                .map(|n| n.trim().parse::<usize>().context("--replicas takes counts like 1,2,3"))
                .collect::<anyhow::Result<Vec<_>>>()?,
            None => vec![1, 2, 3],
        };
        let num = |flag: &str, default: usize| -> anyhow::Result<usize> {
            value(flag).map_or(Ok(default), |v| {
                v.parse().with_context(|| format!("{flag} takes a number"))
            })
        };
        let plan = Plan {
            replicas,
            devices: num("--devices", 10_000)?,
            events: num("--events-per-device", 20)?,
        };
        if plan.devices == 0 || plan.events == 0 || plan.replicas.contains(&0) {
            bail!("--devices, --events-per-device and every --replicas count must be at least 1");
        }
        Ok(plan)
    }
}

/// Mosquitto on a free port, stopped when dropped.
struct Broker {
    port: u16,
    child: std::process::Child,
    _dir: tempfile::TempDir,
}

impl Broker {
    fn start() -> anyhow::Result<Broker> {
        let exe = ["/usr/sbin/mosquitto", "/usr/bin/mosquitto"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists())
            .context("mosquitto is needed: apt-get install mosquitto")?;
        let dir = tempfile::tempdir()?;
        let port = free_port();
        let conf = dir.path().join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!(
                "listener {port} 127.0.0.1\nallow_anonymous true\nmax_packet_size 1052672\npersistence false\n\
                 max_inflight_messages 100\nmax_queued_messages 1000000\n"
            ),
        )?;
        let child = Command::new(exe)
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        wait_for("mosquitto", Duration::from_secs(10), || {
            // A probe that connected to itself (TCP simultaneous open) found nobody listening.
            std::net::TcpStream::connect(("127.0.0.1", port))
                .and_then(|s| Ok(s.local_addr()? != s.peer_addr()?))
                .unwrap_or(false)
        })?;
        Ok(Broker { port, child, _dir: dir })
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Running replicas, killed when dropped.
struct Replicas(Vec<(std::process::Child, u16)>);

impl Drop for Replicas {
    fn drop(&mut self) {
        for (c, _) in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Size of the database and the WAL position, in bytes.
fn pg_bytes(url: &str) -> anyhow::Result<(i64, i64)> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async {
        let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
        let driver = tokio::spawn(conn);
        let row = client
            .query_one(
                "SELECT pg_database_size(current_database()), pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::bigint",
                &[],
            )
            .await?;
        drop(client);
        let _ = driver.await;
        Ok::<_, anyhow::Error>((row.get(0), row.get(1)))
    })
}

/// Runs every replica count of `plan`.
pub fn run(plan: &Plan) -> anyhow::Result<()> {
    let pg = TestPostgres::start_with(true).map_err(anyhow::Error::msg)?;
    println!(
        "scale-out: cloud-sync replicas on one Postgres (fsync on) behind Mosquitto's shared subscriptions; \
         {} simulated devices over {CONNECTIONS} MQTT connections, one batch of {} events each",
        plan.devices, plan.events
    );
    for &n in &plan.replicas {
        one(&pg, n, plan)?;
    }
    Ok(())
}

fn one(pg: &TestPostgres, n: usize, plan: &Plan) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let url = pg
        .create_database(&format!("bench_{n}_{}", fastrand::u32(..)))
        .map_err(anyhow::Error::msg)?;
    {
        let store = outpost_cloud_sync::Store::connect(&url)?;
        let token = new_token(&store, "bench", "admin")?;
        if let Ok(mut t) = TOKEN.lock() {
            *t = token;
        }
    }
    let broker = Broker::start()?;
    let mut replicas = Replicas(Vec::new());
    for i in 1..=n {
        let api = free_port();
        let log = std::fs::File::create(dir.path().join(format!("replica-{i}.log")))?;
        let child = Command::new(bin("outpost-cloud")?)
            .arg("--data-dir")
            .arg(dir.path().join(format!("replica-{i}")))
            .args(["--store", &url])
            .args(["--broker", &format!("mqtt://127.0.0.1:{}", broker.port)])
            .args([
                "--shared-group",
                "outpost-cloud",
                "--client-id",
                &format!("outpost-cloud-{i}"),
            ])
            .args(["--listen", &format!("127.0.0.1:{api}"), "--plain-http"])
            .args(["--insecure-plaintext", "--insecure-unsigned"])
            .args(["--max-devices", &(plan.devices * 2).to_string()])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()?;
        replicas.0.push((child, api));
    }
    for (i, (_, api)) in replicas.0.iter().enumerate() {
        let api = *api;
        let up = wait_for("a replica's broker link", Duration::from_secs(30), || {
            http_get(api, "/v1/health").is_some_and(|h| h["broker"] == "connected")
        });
        if up.is_err() {
            let log = std::fs::read_to_string(dir.path().join(format!("replica-{}.log", i + 1))).unwrap_or_default();
            bail!("replica {} did not come up:\n{log}", i + 1);
        }
    }
    let records: Vec<Vec<u8>> = sample_events(plan.events).iter().map(journal::encode).collect();
    let body = Body::Events(protocol::pack(1, 1, &records));
    let payload = protocol::encode(&body);
    let topics = Topics::new(protocol::DEFAULT_PREFIX);
    let (size0, wal0) = pg_bytes(&url)?;

    // Each connection publishes its devices' batches and waits for their acks.
    let latencies: Arc<Mutex<Vec<Duration>>> = Arc::new(Mutex::new(Vec::with_capacity(plan.devices)));
    let t0 = Instant::now();
    let threads: Vec<_> = (0..CONNECTIONS)
        .map(|c| {
            let devices: Vec<String> = (c..plan.devices)
                .step_by(CONNECTIONS)
                .map(|d| format!("sim-{d:05}"))
                .collect();
            let (topics, payload, latencies, port) = (topics.clone(), payload.clone(), latencies.clone(), broker.port);
            let want = plan.events as u64 + 1;
            std::thread::spawn(move || -> anyhow::Result<()> {
                let mut opts = rumqttc::MqttOptions::new(format!("bench-sim-{c}"), "127.0.0.1", port);
                opts.set_max_packet_size(2 << 20, 2 << 20);
                opts.set_inflight(100);
                let (client, mut conn) = rumqttc::Client::new(opts, 1024);
                let sent: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
                let (s2, c2) = (sent.clone(), client.clone());
                let ack_topics: Vec<String> = devices.iter().map(|d| topics.topic(d, Channel::Ack)).collect();
                let publisher = std::thread::spawn(move || {
                    for (d, ack) in devices.iter().zip(&ack_topics) {
                        let _ = c2.subscribe(ack.clone(), rumqttc::QoS::AtMostOnce);
                        if let Ok(mut s) = s2.lock() {
                            s.insert(d.clone(), Instant::now());
                        }
                        let _ = c2.publish(
                            topics.topic(d, Channel::Events),
                            rumqttc::QoS::AtLeastOnce,
                            false,
                            payload.clone(),
                        );
                    }
                });
                let mut waiting = usize::MAX;
                let mut acked = 0usize;
                for ev in conn.iter() {
                    match ev {
                        Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) => {
                            let device = p.topic.split('/').nth(2).unwrap_or_default().to_string();
                            if let Ok(Body::Ack(a)) = protocol::decode(&p.payload)
                                && a.next_seq >= want
                                && let Some(at) = sent.lock().ok().and_then(|mut s| s.remove(&device))
                            {
                                if let Ok(mut l) = latencies.lock() {
                                    l.push(at.elapsed());
                                }
                                acked += 1;
                            }
                        }
                        Ok(_) => {}
                        Err(_) => std::thread::sleep(Duration::from_millis(50)),
                    }
                    if waiting == usize::MAX && publisher.is_finished() {
                        waiting = sent.lock().map(|s| s.len()).unwrap_or(0) + acked;
                    }
                    if acked >= waiting {
                        break;
                    }
                }
                Ok(())
            })
        })
        .collect();
    for t in threads {
        t.join()
            .map_err(|_| anyhow::anyhow!("a simulated connection panicked"))??;
    }
    let took = t0.elapsed();
    let (size1, wal1) = pg_bytes(&url)?;
    let total = (plan.devices * plan.events) as f64;
    let mut lat = latencies.lock().map(|l| l.clone()).unwrap_or_default();
    lat.sort_unstable();
    let pct = |p: f64| {
        lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1)))
            .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
    };
    println!("{n} replica(s)");
    println!(
        "  ingest: {total:.0} events in {:.2} s: {:.0} events/s; publish-to-ack p50 {:.0} ms, p99 {:.0} ms ({} acks)",
        took.as_secs_f64(),
        total / took.as_secs_f64(),
        pct(0.50),
        pct(0.99),
        lat.len()
    );
    println!(
        "  Postgres: {:.0} bytes of database and {:.0} bytes of WAL per event",
        (size1 - size0) as f64 / total,
        (wal1 - wal0) as f64 / total
    );
    let api = replicas.0.first().map(|r| r.1).unwrap_or_default();
    pages(api, plan.devices)?;
    Ok(())
}

/// Console page times over the fleet just ingested (mean of 10 sequential GETs).
fn pages(api: u16, devices: usize) -> anyhow::Result<()> {
    const ROUNDS: u32 = 10;
    let last = format!("sim-{:05}", devices - 1);
    let run = "/devices/sim-00000/runs/1a2b3c4d00000000".to_string();
    for (name, path) in [
        ("fleet", "/".to_string()),
        ("search", format!("/?q={last}")),
        ("page 50", "/?page=50".to_string()),
        ("device", "/devices/sim-00000".to_string()),
        ("run", run),
    ] {
        let t = Instant::now();
        let mut bytes = 0;
        for _ in 0..ROUNDS {
            bytes = http_body(api, &path).with_context(|| format!("GET {path}"))?.len();
        }
        let ms = t.elapsed().as_secs_f64() * 1000.0 / f64::from(ROUNDS);
        println!("  console {name:<8} {path:<44} {ms:>7.1} ms  {bytes:>7} bytes");
    }
    Ok(())
}
