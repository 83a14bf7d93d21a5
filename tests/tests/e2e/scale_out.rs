//! Scale-out: three cloud-sync replicas on one Postgres, device traffic through Mosquitto's
//! shared subscriptions. Twenty gateways drain their offline backlogs while a replica is
//! SIGKILLed and Postgres restarts: every (device, seq) is stored once, in order; commands
//! queued while the gateways were offline are applied once each; every replica answers.

use std::time::Duration;

use outpost_cloud_sync::testing::TestPostgres;
use outpost_tests::cloud::{Cloud, Proxy, http_text, stored, ticking_workflow};
use outpost_tests::{Agent, Mosquitto, eventually, write};
use serde_json::json;

const GATEWAYS: usize = 20;
const RUNS: usize = 8;

#[test]
fn three_replicas_store_every_event_once_through_a_replica_kill_and_a_postgres_restart() {
    let dir = tempfile::tempdir().unwrap();
    let pg = TestPostgres::start().expect("Postgres (apt-get install postgresql)");
    let url = pg.create_database("fleet").unwrap();
    let broker = Mosquitto::start();
    let mut replicas: Vec<Cloud> = (0..3)
        .map(|n| Cloud::replica(&dir.path().join(format!("cloud-{n}")), broker.port, &url, n))
        .collect();
    for r in &replicas {
        let h = r.get("/v1/health");
        assert!(h["store_backend"].as_str().unwrap().starts_with("postgres "), "{h}");
        eventually(Duration::from_secs(20), "each replica's broker link", || {
            (r.get("/v1/health")["broker"] == "connected").then_some(())
        });
    }

    // Twenty gateways come online, then lose their link and pile up a backlog.
    let proxy = Proxy::start(broker.port);
    let ticks = write(dir.path(), "ticks.yaml", &ticking_workflow("ticks", 28));
    let mut agents = Vec::new();
    for i in 0..GATEWAYS {
        let id = format!("gw{i:02}");
        // Paced so that the fleet's 4,960-event backlog takes about ten seconds to drain: the
        // kill below must land mid-drain however fast the replicas ingest (a 2,000/s pace let a
        // quick run finish before it).
        let flags = ["--broker", &proxy.url(), "--device-id", &id, "--drain-rate", "25"];
        let agent = Agent::start(&dir.path().join(&id), &flags);
        agent.json(&["apply", &ticks]);
        agents.push((id, agent));
    }
    for (id, _) in &agents {
        replicas[0].wait_presence(id, true, Duration::from_secs(30));
    }
    proxy.cut();
    for (_, agent) in &agents {
        for r in 0..RUNS {
            agent.json(&["start", "ticks", "--id", &format!("t{r}")]);
        }
    }
    let mut totals = Vec::new();
    for (id, agent) in &agents {
        let total = eventually(Duration::from_secs(120), "the runs to complete offline", || {
            let done = agent.json(&["list", "--status", "completed", "--limit", "100"]);
            (done.as_array().unwrap().len() == RUNS)
                .then(|| agent.json(&["status"])["journal"]["next_seq"].as_u64().unwrap() - 1)
        });
        assert!(stored(&replicas[1], id) < total, "{id}: nothing crosses a cut link");
        totals.push(total);
    }
    // Commands queued on different replicas while the gateways are offline.
    for (i, (id, _)) in agents.iter().enumerate() {
        let via = &replicas[i % 3];
        let (code, c) = via.send(
            "POST",
            &format!("/v1/devices/{id}/commands"),
            &json!({"type": "start", "workflow": "ticks", "id": "queued-1", "run_id": "queued"}),
        );
        assert_eq!(code, 202, "{c}");
    }

    // The link returns. Mid-drain a replica is SIGKILLed and Postgres restarts.
    proxy.restore();
    let all: u64 = totals.iter().sum();
    let stored_all = |c: &Cloud| agents.iter().map(|(id, _)| stored(c, id)).sum::<u64>();
    eventually(Duration::from_secs(120), "the drain to get going", || {
        (stored_all(&replicas[1]) > all / 5).then_some(())
    });
    // Each replica takes a share of the traffic (the shared subscription at work).
    let ingested = |c: &Cloud| -> u64 {
        let text = http_text(c.api, "/metrics");
        text.lines()
            .find_map(|l| l.strip_prefix("outpost_cloud_events_ingested_total "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    };
    eventually(Duration::from_secs(60), "every replica to ingest a share", || {
        replicas.iter().all(|r| ingested(r) > 0).then_some(())
    });
    let before_kill = stored_all(&replicas[1]);
    replicas[0].kill9();
    eventually(Duration::from_secs(120), "the drain to go on without it", || {
        (stored_all(&replicas[1]) > all / 2).then_some(())
    });
    assert!(before_kill < all, "the kill came mid-drain");
    pg.stop().unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    pg.start_again().unwrap();
    replicas[0].restart();
    eventually(Duration::from_secs(180), "every event to arrive", || {
        (stored_all(&replicas[2]) >= all + 31 * GATEWAYS as u64).then_some(())
    });

    // Exactly once, in order: each device's mirror has what its journal has, no more.
    for ((id, agent), total) in agents.iter().zip(&totals) {
        let end = agent.json(&["status"])["journal"]["next_seq"].as_u64().unwrap() - 1;
        assert!(end > *total, "{id}: the queued command's run was journaled too");
        assert_eq!(stored(&replicas[0], id), end, "{id}: stored up to the journal's end");
        let runs = replicas[1].get(&format!("/v1/devices/{id}/runs"));
        let runs = runs.as_array().unwrap();
        let sum: u64 = runs.iter().map(|r| r["events"].as_u64().unwrap()).sum();
        assert_eq!(sum, end, "{id}: each event stored once");
        for r in runs {
            let local = agent.json(&["show", r["run_id"].as_str().unwrap()]);
            assert_eq!(r["events"], local["events"], "{id} run {}", r["run_id"]);
        }
        let h = replicas[2].get(&format!("/v1/devices/{id}/runs/t3"));
        let h = h["history"].as_array().unwrap();
        assert!(h.windows(2).all(|w| w[0]["seq"].as_u64() < w[1]["seq"].as_u64()));
        // The queued command: applied once, one run.
        let c = replicas[2].get(&format!("/v1/devices/{id}/commands/queued-1"));
        assert_eq!(c["state"], "applied", "{id}: {c}");
        let queued: Vec<_> = runs.iter().filter(|r| r["run_id"] == "queued").collect();
        assert_eq!(queued.len(), 1, "{id}");
    }

    // A change made through one replica refreshes a console open on another (NOTIFY/LISTEN):
    // gw19 is gone, so nothing of it reaches replica 2 over MQTT meanwhile.
    let (last_id, last) = agents.last_mut().unwrap();
    last.kill9();
    let last_id = last_id.clone();
    replicas[1].wait_presence(&last_id, false, Duration::from_secs(60));
    std::thread::sleep(Duration::from_millis(1000));
    let live = LiveStream::open(replicas[2].api);
    let (code, c) = replicas[1].send(
        "POST",
        &format!("/v1/devices/{last_id}/commands"),
        &json!({"type": "cancel", "run_id": "queued", "id": "late-1"}),
    );
    assert_eq!(code, 202, "{c}");
    assert!(
        live.saw_change(Duration::from_secs(10)),
        "a console on replica 2 hears of a command queued on replica 1"
    );

    // Every replica answers the API and the console with the whole fleet.
    for r in &replicas {
        let devices = r.get("/v1/devices");
        assert_eq!(devices.as_array().unwrap().len(), GATEWAYS, "{devices}");
        let page = http_text(r.api, "/");
        assert!(
            page.contains("gw00") && page.contains("gw19"),
            "the fleet page on every replica"
        );
        assert_eq!(r.get("/v1/health")["ok"], true);
    }
}

#[test]
fn replicas_as_shipped_each_with_its_own_certificate_behind_mosquittos_tls_and_acl() {
    let dir = tempfile::tempdir().unwrap();
    let pg = TestPostgres::start().expect("Postgres (apt-get install postgresql)");
    let url = pg.create_database("fleet").unwrap();
    // The PKI (in replica 1's directory, shared), a certificate per replica, the broker's ACL.
    let first = dir.path().join("cloud-1");
    let pki = first.join("pki");
    let acl_dir = dir.path().to_str().unwrap().to_string();
    for args in [
        &["pki", "init"][..],
        &["pki", "replica", "outpost-cloud-1"][..],
        &["pki", "replica", "outpost-cloud-2"][..],
        &[
            "pki",
            "mosquitto",
            "--out-dir",
            &acl_dir,
            "--replica",
            "outpost-cloud-1",
            "--replica",
            "outpost-cloud-2",
        ][..],
    ] {
        let out = outpost_tests::cloud::admin(&first, args);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let broker = Mosquitto::start_shipped("outpost-replicas.conf", &pki, &dir.path().join("outpost.acl"));
    let mqtts = format!("mqtts://127.0.0.1:{}", broker.port);
    let replicas: Vec<Cloud> = (1..=2)
        .map(|n| {
            Cloud::secure_replica(
                &dir.path().join(format!("cloud-{n}")),
                &mqtts,
                broker.port,
                &url,
                n,
                &pki,
            )
        })
        .collect();
    for r in &replicas {
        eventually(
            Duration::from_secs(20),
            "each replica on the broker with its own identity",
            || {
                let h = r.get("/v1/health");
                (h["broker"] == "connected").then_some(())
            },
        );
    }
    // A gateway enrolled once is known to both; its runs are mirrored exactly.
    let agent_dir = dir.path().join("gw1");
    replicas[0].enroll(&agent_dir, "gw1");
    let agent = Agent::start(&agent_dir, &["--broker", &mqtts, "--device-id", "gw1"]);
    agent.json(&["apply", &write(dir.path(), "short.yaml", SHORT)]);
    for i in 0..20 {
        agent.json(&["start", "short", "--id", &format!("s{i:02}")]);
    }
    let end = eventually(Duration::from_secs(30), "the runs to end", || {
        let done = agent.json(&["list", "--status", "completed", "--limit", "100"]);
        (done.as_array().unwrap().len() == 20)
            .then(|| agent.json(&["status"])["journal"]["next_seq"].as_u64().unwrap() - 1)
    });
    eventually(Duration::from_secs(30), "every event on both replicas", || {
        replicas.iter().all(|r| stored(r, "gw1") == end).then_some(())
    });
    // A command through replica 2 reaches the gateway, signed with the fleet key.
    let (code, c) = replicas[1].send(
        "POST",
        "/v1/devices/gw1/commands",
        &json!({"type": "start", "workflow": "short", "id": "via-2", "run_id": "via-2"}),
    );
    assert_eq!(code, 202, "{c}");
    eventually(Duration::from_secs(20), "the command to be applied", || {
        (replicas[0].get("/v1/devices/gw1/commands/via-2")["state"] == "applied").then_some(())
    });
    assert!(
        broker.log().contains("outpost-cloud-2"),
        "replica 2 connected under its own name"
    );
}

/// Two short steps: four events a run.
const SHORT: &str = "name: short\nversion: 1\nsteps:\n  - {id: a, action: set, args: {x: 1}}\n";

#[test]
fn cloud_side_retention_forgets_the_oldest_ended_runs_and_never_a_running_one() {
    let dir = tempfile::tempdir().unwrap();
    let cloud = Cloud::embedded_with(
        &dir.path().join("cloud"),
        &["--keep-events-per-device", "20"],
        &[("OUTPOST_CLOUD_RETENTION_EVERY_MS", "300")],
    );
    let flags = ["--broker", &cloud.mqtt_url(), "--device-id", "gw1"];
    let agent = Agent::start(&dir.path().join("agent"), &flags);
    agent.json(&["apply", &write(dir.path(), "short.yaml", SHORT)]);
    let wait = "name: waits\nversion: 1\nsteps:\n  - {id: w, action: wait_signal, args: {signal: go}}\n";
    agent.json(&["apply", &write(dir.path(), "waits.yaml", wait)]);
    agent.json(&["start", "waits", "--id", "waiting"]);
    for i in 0..12 {
        agent.json(&["start", "short", "--id", &format!("s{i:02}")]);
    }
    let end = eventually(Duration::from_secs(30), "the runs to end", || {
        let done = agent.json(&["list", "--status", "completed", "--limit", "100"]);
        (done.as_array().unwrap().len() == 12)
            .then(|| agent.json(&["status"])["journal"]["next_seq"].as_u64().unwrap() - 1)
    });
    eventually(Duration::from_secs(30), "everything to sync", || {
        (stored(&cloud, "gw1") >= end).then_some(())
    });
    let runs = eventually(Duration::from_secs(30), "retention to forget old runs", || {
        let runs = cloud.get("/v1/devices/gw1/runs");
        let events: u64 = runs
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["events"].as_u64().unwrap())
            .sum();
        (events <= 20).then_some(runs)
    });
    let ids: Vec<&str> = runs
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["run_id"].as_str().unwrap())
        .collect();
    assert!(ids.contains(&"waiting"), "a running run stays: {ids:?}");
    assert!(
        !ids.contains(&"s00") && ids.contains(&"s11"),
        "the oldest go first: {ids:?}"
    );
    assert_eq!(
        cloud.device("gw1").unwrap()["runs"].as_u64().unwrap() as usize,
        ids.len()
    );
    // The gateway keeps its own history.
    assert_eq!(agent.json(&["show", "s00"])["status"], "completed");
}

/// A console's live stream (`/console/live`, server-sent events) on one replica.
struct LiveStream(std::net::TcpStream);

impl LiveStream {
    fn open(port: u16) -> LiveStream {
        use std::io::Write;
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        let token = outpost_tests::cloud::token_for(port).unwrap();
        write!(
            s,
            "GET /console/live HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n\r\n"
        )
        .unwrap();
        LiveStream(s)
    }

    /// True when an `event: change` arrives within `wait`.
    fn saw_change(mut self, wait: Duration) -> bool {
        use std::io::Read;
        let deadline = std::time::Instant::now() + wait;
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        while std::time::Instant::now() < deadline {
            self.0.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
            match self.0.read(&mut buf) {
                Ok(0) => return false,
                Ok(n) => seen.extend_from_slice(&buf[..n]),
                Err(_) => {}
            }
            if String::from_utf8_lossy(&seen).contains("event: change") {
                return true;
            }
        }
        false
    }
}
