//! Offline-first sync with cloud-sync, against the embedded broker and against Mosquitto:
//! a partitioned link piles up 10,000 events that then arrive exactly once, in order, through
//! SIGKILLs of the agent and of cloud-sync and a broker restart; offline commands; deployments;
//! bad messages.

use std::time::Duration;

use outpost_shared::protocol::{self, Body, Command, CommandKind, CommandResult, Outcome};
use outpost_tests::cloud::{Cloud, Proxy, stored, ticking_workflow};
use outpost_tests::{Agent, Mosquitto, eventually, mqtt_publish, write};
use serde_json::{Value, json};

const RUNS: usize = 40;

fn online(cloud: &Cloud, device: &str) {
    cloud.wait_presence(device, true, Duration::from_secs(20));
}

fn agent_seq(agent: &Agent) -> u64 {
    agent.json(&["status"])["journal"]["next_seq"].as_u64().unwrap() - 1
}

enum Broker {
    Embedded,
    Mosquitto(Mosquitto),
    /// The embedded broker as shipped: mutual TLS, topic rules, every message signed.
    Secure,
}

fn partition_scenario(mut broker: Broker) {
    let dir = tempfile::tempdir().unwrap();
    let mut cloud = match &broker {
        Broker::Embedded => Cloud::embedded(&dir.path().join("cloud")),
        Broker::Mosquitto(m) => Cloud::external(&dir.path().join("cloud"), m.port),
        Broker::Secure => Cloud::secure(&dir.path().join("cloud")),
    };
    let proxy = Proxy::start(cloud.mqtt);
    let url = match &broker {
        Broker::Secure => {
            cloud.enroll(&dir.path().join("agent"), "gw1");
            proxy.url().replace("mqtt://", "mqtts://")
        }
        _ => proxy.url(),
    };
    let flags = ["--broker", &url, "--device-id", "gw1", "--drain-rate", "2500"];
    let mut agent = Agent::start(&dir.path().join("agent"), &flags);
    online(&cloud, "gw1");

    // The link goes down; the agent keeps working.
    proxy.cut();
    // 40 runs × 253 events = 10,120 events.
    agent.json(&[
        "apply",
        &write(dir.path(), "burst.yaml", &ticking_workflow("burst", 250)),
    ]);
    for i in 0..RUNS {
        agent.json(&["start", "burst", "--id", &format!("b{i:02}")]);
    }
    eventually(Duration::from_secs(60), "every run to complete offline", || {
        let done = agent.json(&["list", "--status", "completed", "--limit", "100"]);
        (done.as_array().unwrap().len() == RUNS).then_some(())
    });
    let total = agent_seq(&agent);
    assert!(total >= 10_000, "{total} events piled up");
    assert!(stored(&cloud, "gw1") < 100, "nothing crosses a cut link");
    let status = agent.json(&["status"]);
    assert!(status["sync"]["backlog_events"].as_u64().unwrap() >= 10_000, "{status}");

    // The link returns; kill the agent during the drain, then cloud-sync during ingest, then
    // restart the broker.
    proxy.restore();
    let t0 = std::time::Instant::now();
    eventually(Duration::from_secs(60), "the drain to get going", || {
        (stored(&cloud, "gw1") > total / 4).then_some(())
    });
    agent.kill9();
    agent.restart();
    eventually(Duration::from_secs(60), "the drain to resume", || {
        (stored(&cloud, "gw1") > total / 2).then_some(())
    });
    cloud.kill9();
    cloud.restart();
    if let Broker::Mosquitto(m) = &mut broker {
        eventually(Duration::from_secs(60), "more to arrive", || {
            (stored(&cloud, "gw1") > total * 3 / 4).then_some(())
        });
        m.stop();
        std::thread::sleep(Duration::from_millis(500));
        m.restart();
    }
    eventually(Duration::from_secs(90), "every event to arrive", || {
        (stored(&cloud, "gw1") >= total).then_some(())
    });
    eprintln!("{total} events drained in {:?} through the kills", t0.elapsed());

    // Exactly every event: per run, the cloud's mirror has what the agent journaled.
    assert_eq!(
        stored(&cloud, "gw1"),
        total,
        "no duplicates past the agent's last event"
    );
    let runs = cloud.get("/v1/devices/gw1/runs");
    let runs = runs.as_array().unwrap();
    let bursts: Vec<&Value> = runs.iter().filter(|r| r["workflow"] == "burst").collect();
    assert_eq!(bursts.len(), RUNS);
    let sum: u64 = runs.iter().map(|r| r["events"].as_u64().unwrap()).sum();
    assert_eq!(sum, total, "each event stored once");
    for r in bursts {
        assert_eq!(r["status"], "completed", "{r}");
        let local = agent.json(&["show", r["run_id"].as_str().unwrap()]);
        assert_eq!(r["events"], local["events"], "run {}", r["run_id"]);
    }
    let one = cloud.get("/v1/devices/gw1/runs/b07");
    let h = one["history"].as_array().unwrap();
    assert!(
        h.windows(2).all(|w| w[0]["seq"].as_u64() < w[1]["seq"].as_u64()),
        "history in order"
    );
    assert_eq!(h.last().unwrap()["type"], "run_completed");
    // The outbox is trimmed: everything acknowledged.
    eventually(Duration::from_secs(10), "the acknowledgement", || {
        let s = agent.json(&["status"]);
        (s["sync"]["backlog_events"] == 0).then_some(())
    });
}

#[test]
fn partition_then_drain_exactly_once_through_kills_over_mutual_tls_with_signatures() {
    partition_scenario(Broker::Secure);
}

#[test]
fn partition_then_drain_exactly_once_through_kills_embedded_broker() {
    partition_scenario(Broker::Embedded);
}

#[test]
fn partition_then_drain_exactly_once_through_kills_and_a_broker_restart_mosquitto() {
    partition_scenario(Broker::Mosquitto(Mosquitto::start()));
}

#[test]
fn commands_issued_offline_are_applied_once_and_redeliveries_ignored() {
    let dir = tempfile::tempdir().unwrap();
    // Pre-provisioning: commands for a device that has not connected yet are queued.
    let cloud = Cloud::embedded_with_args(&dir.path().join("cloud"), &["--allow-unknown-devices"]);
    let def = "name: hello\nversion: 1\nsteps:\n  - {id: s, action: set, args: {hi: \"{{ input.who }}\"}}\n";
    // The device is offline (never connected yet): the commands wait in the store.
    let deploy = cloud.send("POST", "/v1/deployments", &json!({"document": def, "devices": ["gw2"]}));
    assert_eq!(deploy.0, 201, "{}", deploy.1);
    let (code, c) = cloud.send(
        "POST",
        "/v1/devices/gw2/commands",
        &json!({"type": "start", "workflow": "hello", "input": {"who": "plant"}, "id": "start-1", "run_id": "hello-1"}),
    );
    assert_eq!(code, 202, "{c}");
    assert_eq!(cloud.get("/v1/devices/gw2/commands/start-1")["state"], "pending");
    // The gauge counts them although the device was never seen (deployment + start).
    let (_, text) = outpost_tests::cloud::http("GET", cloud.api, "/metrics", None).unwrap();
    let text = text.as_str().unwrap_or_default().to_string();
    assert!(
        text.lines().any(|l| l == "outpost_cloud_pending_commands 2"),
        "pending commands for a never-seen device are counted:\n{text}"
    );

    let metrics_port = outpost_tests::cloud::free_port();
    let metrics_addr = format!("127.0.0.1:{metrics_port}");
    let flags = [
        "--broker",
        &cloud.mqtt_url(),
        "--device-id",
        "gw2",
        "--metrics-listen",
        &metrics_addr,
    ];
    let agent = Agent::start(&dir.path().join("agent"), &flags);
    let done = eventually(Duration::from_secs(20), "the command to be applied", || {
        let c = cloud.get("/v1/devices/gw2/commands/start-1");
        (c["state"] == "applied").then_some(c)
    });
    assert_eq!(done["detail"]["run_id"], "hello-1", "{done}");
    eventually(Duration::from_secs(10), "the run", || {
        (agent.json(&["show", "hello-1"])["output"] == json!({"hi": "plant"})).then_some(())
    });
    let dep = cloud.get(&format!("/v1/deployments/{}", deploy.1["id"].as_str().unwrap()));
    assert_eq!(dep["devices"][0]["state"], "applied", "{dep}");

    // The broker redelivers the same command: the agent ignores it.
    let again = Body::Command(Command {
        id: "start-1".into(),
        kind: CommandKind::Start {
            workflow: "hello".into(),
            version: None,
            input: r#"{"who": "twice"}"#.into(),
            run_id: Some("hello-2".into()),
        },
    });
    mqtt_publish(cloud.mqtt, "outpost/v1/gw2/cmd", protocol::encode(&again));
    eventually(Duration::from_secs(10), "the repeat to be counted", || {
        (agent.json(&["status"])["sync"]["duplicate_commands"] == 1).then_some(())
    });
    assert_eq!(
        agent.cli(&["show", "hello-2"]).status.code(),
        Some(4),
        "a repeated command starts nothing"
    );
    // The agent's Prometheus metrics.
    let (_, text) = outpost_tests::cloud::http("GET", metrics_port, "/metrics", None).unwrap();
    let text = text.as_str().unwrap_or_default().to_string();
    assert!(
        text.lines().any(|l| l == "outpost_runs{status=\"completed\"} 1"),
        "{text}"
    );
    assert!(text.lines().any(|l| l.starts_with("outpost_outbox_events ")), "{text}");
    assert!(
        text.contains("# TYPE outpost_step_duration_seconds histogram"),
        "{text}"
    );
    // A command for an unknown run is rejected with the reason.
    let (_, c) = cloud.send(
        "POST",
        "/v1/devices/gw2/commands",
        &json!({"type": "cancel", "run_id": "nope"}),
    );
    let id = c["id"].as_str().unwrap().to_string();
    let r = eventually(Duration::from_secs(10), "the rejection", || {
        let r = cloud.get(&format!("/v1/devices/gw2/commands/{id}"));
        (r["state"] == "rejected").then_some(r)
    });
    assert!(
        r["message"].as_str().unwrap().contains("run 'nope' does not exist"),
        "{r}"
    );
}

#[test]
fn a_deployment_reaches_online_devices_now_and_an_offline_one_on_return() {
    let dir = tempfile::tempdir().unwrap();
    let cloud = Cloud::embedded(&dir.path().join("cloud"));
    let mut agents: Vec<Agent> = (1..=3)
        .map(|i| {
            let flags = [
                "--broker",
                &cloud.mqtt_url(),
                "--device-id",
                &format!("line1-gw{i}"),
                "--label",
                "line=1",
            ];
            Agent::start(&dir.path().join(format!("agent{i}")), &flags)
        })
        .collect();
    for i in 1..=3 {
        online(&cloud, &format!("line1-gw{i}"));
    }
    agents[2].kill9();
    // The Last Will marks it offline.
    cloud.wait_presence("line1-gw3", false, Duration::from_secs(60));
    let v1 = "name: recipe\nversion: 1\nsteps:\n  - {id: s, action: set, args: {v: 1}}\n";
    let v2 = v1.replace("version: 1", "version: 2").replace("v: 1", "v: 2");
    let (_, d1) = cloud.send(
        "POST",
        "/v1/deployments",
        &json!({"document": v1, "labels": {"line": "1"}}),
    );
    let d1 = d1["id"].as_str().unwrap().to_string();
    let status = eventually(Duration::from_secs(20), "the online devices to apply", || {
        let s = cloud.get(&format!("/v1/deployments/{d1}"));
        let states: Vec<&str> = s["devices"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["state"].as_str().unwrap())
            .collect();
        (states.iter().filter(|s| **s == "applied").count() == 2).then_some(s)
    });
    let gw3 = status["devices"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["device"] == "line1-gw3")
        .unwrap();
    assert_eq!(gw3["state"], "pending", "{status}");

    // A newer deployment supersedes the older one that is still pending.
    let (_, d2) = cloud.send(
        "POST",
        "/v1/deployments",
        &json!({"document": v2, "labels": {"line": "1"}}),
    );
    let d2 = d2["id"].as_str().unwrap().to_string();
    let old = cloud.get(&format!("/v1/deployments/{d1}"));
    let gw3 = old["devices"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["device"] == "line1-gw3")
        .unwrap();
    assert_eq!(gw3["state"], "superseded", "{old}");

    agents[2].restart();
    eventually(Duration::from_secs(20), "gw3 to apply the newer deployment", || {
        let s = cloud.get(&format!("/v1/deployments/{d2}"));
        s["devices"]
            .as_array()
            .unwrap()
            .iter()
            .all(|d| d["state"] == "applied")
            .then_some(())
    });
    let defs = agents[2].json(&["definitions"]);
    let versions: Vec<u64> = defs
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["version"].as_u64().unwrap())
        .collect();
    assert_eq!(versions, [2], "the superseded v1 never reached gw3");
}

#[test]
fn malformed_unknown_version_and_wrong_device_messages_are_rejected_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let cloud = Cloud::embedded(&dir.path().join("cloud"));
    let agent = Agent::start(
        &dir.path().join("agent"),
        &["--broker", &cloud.mqtt_url(), "--device-id", "gw4"],
    );
    online(&cloud, "gw4");
    let p = cloud.mqtt;
    mqtt_publish(p, "outpost/v1/gw9/events", vec![9, 1, 2, 3]);
    mqtt_publish(p, "outpost/v1/gw9/events", vec![1, 0xff, 0xff, 0xff, 0xff]);
    let birth_on_events = protocol::encode(&Body::Death(protocol::Death { epoch: 1 }));
    mqtt_publish(p, "outpost/v1/gw9/events", birth_on_events);
    let stray = CommandResult {
        id: "not-mine".into(),
        outcome: Outcome::Applied,
        message: String::new(),
        detail: "{}".into(),
    };
    mqtt_publish(
        p,
        "outpost/v1/gw4/cmd-result",
        protocol::encode(&Body::CommandResult(stray)),
    );
    // And to the agent: garbage where commands arrive.
    mqtt_publish(p, "outpost/v1/gw4/cmd", b"not a command".to_vec());

    // The live counter and the stored per-reason counters (written just after) must agree.
    let reasons = ["unknown_version", "malformed", "wrong_channel", "unknown_command"];
    eventually(Duration::from_secs(10), "four rejections, one per reason", || {
        let s = cloud.get("/v1/stats");
        let each = reasons.iter().all(|r| s["counters"][format!("rejected.{r}")] == 1);
        (s["rejected"] == 4 && each).then_some(s)
    });
    eventually(Duration::from_secs(10), "the agent to count the bad command", || {
        (agent.json(&["status"])["sync"]["bad_messages"] == 1).then_some(())
    });
    // Prometheus metrics say the same.
    let (code, text) = outpost_tests::cloud::http("GET", cloud.api, "/metrics", None).unwrap();
    let text = text.as_str().unwrap_or_default().to_string();
    assert_eq!(code, 200);
    for line in [
        "outpost_cloud_devices{state=\"online\"} 1",
        "outpost_cloud_rejected_messages_total{reason=\"unknown_version\"} 1",
        "# TYPE outpost_cloud_pending_commands gauge",
    ] {
        assert!(text.lines().any(|l| l == line), "missing {line}:\n{text}");
    }
    // Both still work.
    assert_eq!(cloud.get("/v1/devices/gw4")["online"], true);
    assert!(agent.cli(&["status"]).status.success());
    assert!(
        cloud.log().contains("unknown protocol version 9"),
        "the reason is logged"
    );
}

#[test]
fn desired_state_is_remediated_and_reported_in_sync_only_on_an_exact_match() {
    let dir = tempfile::tempdir().unwrap();
    let cloud = Cloud::embedded(&dir.path().join("cloud"));
    let controller = dir.path().join("controller.json");
    // The "controller" clamps setpoints above 250, so a desired 999 reads back as 250.
    let def = format!(
        r#"
name: apply
version: 1
steps:
  - id: write
    action: exec
    args: {{command: sh, args: ["-c", "sed 's/999/250/' > {c}"], stdin: "{{{{ input.desired }}}}"}}
  - id: read_back
    action: exec
    depends_on: [write]
    args: {{command: cat, args: ["{c}"]}}
output: "{{{{ steps.read_back.output.json }}}}"
"#,
        c = controller.display()
    );
    let file = write(dir.path(), "apply.yaml", &def);
    // Set before the device ever connects: it is retained, so the device gets it on connect.
    let (code, v) = cloud.send("PUT", "/v1/devices/gw6/desired", &json!({"document": {"setpoint": 42}}));
    assert_eq!((code, v["version"].as_u64()), (200, Some(1)), "{v}");
    let flags = [
        "--broker",
        &cloud.mqtt_url(),
        "--device-id",
        "gw6",
        "--remediation",
        "apply",
        "--apply",
        &file,
    ];
    let mut agent = Agent::start(&dir.path().join("agent"), &flags);
    let state = eventually(Duration::from_secs(20), "the device to report in sync", || {
        let s = cloud.get("/v1/devices/gw6/state");
        (s["reported"]["desired_version"] == 1).then_some(s)
    });
    assert_eq!(state["reported"]["in_sync"], true, "{state}");
    assert_eq!(state["reported"]["document"], json!({"setpoint": 42}));

    // Changed while the device is down; the controller cannot reach it: reported, not in sync.
    agent.kill9();
    cloud.send(
        "PUT",
        "/v1/devices/gw6/desired",
        &json!({"document": {"setpoint": 999}}),
    );
    agent.restart();
    let state = eventually(Duration::from_secs(20), "the second report", || {
        let s = cloud.get("/v1/devices/gw6/state");
        (s["reported"]["desired_version"] == 2).then_some(s)
    });
    assert_eq!(state["reported"]["in_sync"], false, "{state}");
    assert_eq!(
        state["reported"]["document"],
        json!({"setpoint": 250}),
        "the state actually found"
    );
    assert!(
        state["reported"]["message"].as_str().unwrap().contains("differs"),
        "{state}"
    );

    // An older desired version (a late redelivery) is ignored.
    let old = Body::Desired(protocol::Desired {
        version: 1,
        document: r#"{"setpoint": 1}"#.into(),
    });
    mqtt_publish(cloud.mqtt, "outpost/v1/gw6/desired", protocol::encode(&old));
    eventually(Duration::from_secs(10), "the stale desired state to be ignored", || {
        agent.log().contains("desired state not newer; ignored").then_some(())
    });
    assert!(agent.cli(&["show", "remediate-1"]).status.success());
    assert_eq!(
        agent.json(&["list", "--limit", "10"]).as_array().unwrap().len(),
        2,
        "no third remediation"
    );
}

#[test]
fn the_readme_demo_starts_cloud_sync_and_a_gateway_whose_run_is_mirrored() {
    let dir = tempfile::tempdir().unwrap();
    let (api, mqtt) = (outpost_tests::cloud::free_port(), outpost_tests::cloud::free_port());
    let exe = outpost_tests::outpost_bin().with_file_name("outpost-cloud");
    // As the demo's own hint says: a token from `tokens create` for the API.
    let token = outpost_tests::cloud::create_token(dir.path(), "readme", &["viewer", "operator"]);
    let auth = format!("Authorization: Bearer {token}\r\n");
    let get = |path: &str| outpost_tests::cloud::http_raw("GET", api, path, None, &auth, "application/json");
    let demo = || {
        std::process::Command::new(&exe)
            .arg("--data-dir")
            .arg(dir.path())
            .args([
                "--listen",
                &format!("127.0.0.1:{api}"),
                "--mqtt-listen",
                &format!("127.0.0.1:{mqtt}"),
                "--plain-http",
                "--demo",
            ])
            .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap()
    };
    let mut child = demo();
    // The oven run completes; the quality-gate lot the demo queues waits for an approval.
    eventually(Duration::from_secs(60), "the demo runs to be mirrored", || {
        let (code, runs) = get("/v1/devices/demo-gw/runs").ok()?;
        let runs = runs.as_array()?.clone();
        let oven = runs
            .iter()
            .any(|r| r["workflow"] == "oven-plant" && r["status"] == "completed");
        let lot = runs.iter().any(|r| r["run_id"] == "lot-7" && r["status"] == "running");
        (code == 200 && oven && lot).then_some(())
    });
    let (_, lot) = get("/v1/devices/demo-gw/runs/lot-7").unwrap();
    assert!(
        lot["history"].to_string().contains("approval:release"),
        "lot-7 waits at the approval: {lot}"
    );
    // SIGTERM stops cloud-sync and its demo gateway with it (the gateway used to keep running).
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let status = child.wait().unwrap();
    assert!(status.success(), "{status}");
    let agent_dir = dir.path().join("demo-agent").display().to_string();
    let left = std::process::Command::new("pgrep")
        .args(["-f", &agent_dir])
        .output()
        .unwrap();
    assert!(left.stdout.is_empty(), "the demo gateway outlived outpost-cloud");
    let mut out = String::new();
    use std::io::Read;
    child.stdout.take().unwrap().read_to_string(&mut out).unwrap();
    assert!(
        out.contains(&format!("API on http://127.0.0.1:{api}/v1/devices")),
        "{out}"
    );
    assert!(out.contains(&format!("console: http://127.0.0.1:{api}/")), "{out}");
    assert!(out.contains("lot-7 waits for your approval"), "{out}");

    // lot-7 finished: a second demo start says so instead of "waits".
    let mut child = demo();
    // Cancelled (as an operator may, where approving needs one of the gate's approvers).
    let cancel = r#"{"type": "cancel", "run_id": "lot-7", "id": "demo-cancel"}"#;
    let (code, v) = eventually(Duration::from_secs(60), "the cancel to be queued", || {
        outpost_tests::cloud::http_raw(
            "POST",
            api,
            "/v1/devices/demo-gw/commands",
            Some(cancel),
            &auth,
            "application/json",
        )
        .ok()
    });
    assert_eq!(code, 202, "{v}");
    eventually(Duration::from_secs(60), "lot-7 to be cancelled", || {
        let (_, lot) = get("/v1/devices/demo-gw/runs/lot-7").ok()?;
        (lot["status"] == "cancelled").then_some(())
    });
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    child.wait().unwrap();
    let mut third = demo();
    eventually(Duration::from_secs(60), "the demo API", || get("/v1/health").ok());
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &third.id().to_string()])
        .status();
    third.wait().unwrap();
    let mut out = String::new();
    third.stdout.take().unwrap().read_to_string(&mut out).unwrap();
    assert!(out.contains("lot-7:    already cancelled"), "{out}");
    assert!(!out.contains("waits for your approval"), "{out}");
}

#[test]
fn a_full_outbox_refuses_new_runs_and_retention_waits_for_the_cloud() {
    let dir = tempfile::tempdir().unwrap();
    let cloud_dir = dir.path().join("cloud");
    let port = outpost_tests::cloud::free_port();
    // No cloud yet: everything stays in the outbox. Retention would delete finished runs at once,
    // but not before the cloud has them.
    let flags = [
        "--broker",
        &format!("mqtt://127.0.0.1:{port}"),
        "--device-id",
        "gw7",
        "--outbox-max-events",
        "40",
        "--retention",
        "0s",
        "--prune-interval",
        "200ms",
    ];
    let agent = Agent::start(&dir.path().join("agent"), &flags);
    let def = "name: hello\nversion: 1\nsteps:\n  - {id: s, action: set, args: {hi: 1}}\n";
    agent.json(&["apply", &write(dir.path(), "hello.yaml", def)]);
    let mut started = 0;
    let refused = loop {
        let out = agent.cli(&["start", "hello", "--id", &format!("h{started}")]);
        if !out.status.success() {
            break out;
        }
        started += 1;
        assert!(started < 100, "the outbox cap never refused a start");
    };
    assert_eq!(refused.status.code(), Some(9));
    let why = String::from_utf8_lossy(&refused.stderr);
    assert!(
        why.contains("sync outbox holds") && why.contains("--outbox-max-events"),
        "{why}"
    );
    let status = agent.json(&["status"]);
    assert_eq!(status["sync"]["refused_starts"], 1, "{status}");
    std::thread::sleep(Duration::from_millis(600));
    let kept = agent.json(&["list", "--limit", "1000"]).as_array().unwrap().len();
    assert_eq!(kept, started, "unacknowledged runs are not pruned");

    // The cloud comes up on that port: the outbox drains, retention then prunes, starts work again.
    let cloud = Cloud::start_on(&cloud_dir, port);
    let deadline = std::time::Instant::now() + Duration::from_secs(40);
    loop {
        let s = agent.json(&["status"]);
        let runs = agent.json(&["list", "--limit", "1000"]);
        if s["sync"]["backlog_events"] == 0 && runs.as_array().unwrap().is_empty() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "backlog not acknowledged and pruned: {} {} runs left\n{}",
            s["sync"],
            runs.as_array().unwrap().len(),
            agent.log().lines().rev().take(12).collect::<Vec<_>>().join("\n")
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        cloud.get("/v1/devices/gw7/runs").as_array().unwrap().len(),
        started,
        "the cloud has every run"
    );
    assert!(agent.cli(&["start", "hello", "--id", "after"]).status.success());
}

#[test]
fn a_command_the_gateway_could_not_record_is_sent_again_without_a_reconnect() {
    let dir = tempfile::tempdir().unwrap();
    let cloud = Cloud::embedded_with_env(
        &dir.path().join("cloud"),
        &[("OUTPOST_CLOUD_COMMAND_RESEND_MS", "1000")],
    );
    let marker = dir.path().join("disk-full");
    let marker_s = marker.display().to_string();
    let agent = Agent::start_with_env(
        &dir.path().join("agent"),
        &["--broker", &cloud.mqtt_url(), "--device-id", "gw3"],
        &[("OUTPOST_JOURNAL_FULL_DISK_MARKER", &marker_s)],
    );
    online(&cloud, "gw3");
    let def = "name: hello\nversion: 1\nsteps:\n  - {id: s, action: set, args: {hi: 1}}\n";
    agent.json(&["apply", &write(dir.path(), "hello.yaml", def)]);
    // The gateway's disk is full when the command arrives: it cannot try it, records nothing and
    // reports nothing, so the command stays pending (it used to be answered `rejected` for good
    // when a retry found the journal still reopening).
    std::fs::write(&marker, b"").unwrap();
    let (code, c) = cloud.send(
        "POST",
        "/v1/devices/gw3/commands",
        &json!({"type": "start", "workflow": "hello", "id": "start-full", "run_id": "hello-full"}),
    );
    assert_eq!(code, 202, "{c}");
    // Twice: the birth that announces the storage error brings the command again, and the disk
    // must still be full for that delivery too (the journal is writable again the moment the
    // marker goes), or the resend below would never be needed.
    eventually(Duration::from_secs(10), "the gateway to put it off", || {
        (agent
            .log()
            .matches("the journal cannot be written; it stays pending")
            .count()
            >= 2)
            .then_some(())
    });
    assert_eq!(cloud.get("/v1/devices/gw3/commands/start-full")["state"], "pending");
    std::fs::remove_file(&marker).unwrap();
    // Still connected, no new birth: the cloud sends it again by itself.
    let done = eventually(Duration::from_secs(20), "the command to be applied", || {
        let c = cloud.get("/v1/devices/gw3/commands/start-full");
        (c["state"] == "applied").then_some(c)
    });
    assert_eq!(done["detail"]["run_id"], "hello-full", "{done}");
    assert!(cloud.log().contains("sending unanswered commands again"));
}

#[test]
fn resend_requests_do_not_resend_the_inventory_and_a_new_definition_goes_alone() {
    let dir = tempfile::tempdir().unwrap();
    let cloud = Cloud::embedded(&dir.path().join("cloud"));
    let agent = Agent::start(
        &dir.path().join("agent"),
        &["--broker", &cloud.mqtt_url(), "--device-id", "gw4"],
    );
    online(&cloud, "gw4");
    let def = |v: u32| format!("name: inv\nversion: {v}\nsteps:\n  - {{id: s, action: set, args: {{v: {v}}}}}\n");
    agent.json(&["apply", &write(dir.path(), "inv1.yaml", &def(1))]);
    let count = || agent.json(&["status"])["sync"]["inventory_messages"].as_u64().unwrap();
    let settled = eventually(Duration::from_secs(10), "the inventory to go out", || {
        let n = count();
        std::thread::sleep(Duration::from_millis(1200));
        (n > 0 && count() == n).then_some(n)
    });
    for _ in 0..5 {
        let resend = protocol::encode(&Body::Resend(protocol::Resend { from_seq: 1 }));
        mqtt_publish(cloud.mqtt, "outpost/v1/gw4/ack", resend);
    }
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(count(), settled, "resend requests sent the inventory again");
    agent.json(&["apply", &write(dir.path(), "inv2.yaml", &def(2))]);
    eventually(Duration::from_secs(10), "the new definition to go out alone", || {
        (count() == settled + 1).then_some(())
    });
    eventually(Duration::from_secs(10), "the cloud to hold both versions", || {
        let page = outpost_tests::cloud::http("GET", cloud.api, "/devices/gw4", None)
            .ok()?
            .1
            .to_string();
        page.contains("inv").then_some(())
    });
}

#[test]
fn cloud_sync_connects_to_its_embedded_broker_only_once_it_listens() {
    let dir = tempfile::tempdir().unwrap();
    let cloud = Cloud::embedded(&dir.path().join("cloud"));
    eventually(Duration::from_secs(20), "cloud-sync to connect to its broker", || {
        cloud.log().contains("connected to the broker").then_some(())
    });
    let log = cloud.log();
    assert!(
        !log.contains("broker connection lost"),
        "a clean start logged a lost connection:\n{log}"
    );
    // Nor an error from the readiness probe (a bare TCP connect, or a DISCONNECT before the
    // close, is logged by rumqttd as an ERROR).
    assert!(!log.contains(" ERROR "), "a clean start logged an error:\n{log}");
}

/// Voluntary context switches of every thread of `pid` (each is a wake-up after sleeping) and
/// the CPU time it used, in clock ticks.
fn wakeups_and_cpu(pid: u32) -> (u64, u64) {
    let mut switches = 0;
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap().flatten() {
        let status = std::fs::read_to_string(task.path().join("status")).unwrap_or_default();
        switches += status
            .lines()
            .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0);
    }
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which may hold spaces): utime and stime are 14 and 15.
    let rest = stat.rsplit_once(") ").map(|(_, r)| r).unwrap_or_default();
    let fields: Vec<&str> = rest.split(' ').collect();
    let tick = |i: usize| fields.get(i - 3).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    (switches, tick(14) + tick(15))
}

#[test]
fn an_idle_agent_connected_to_cloud_sync_does_not_wake_itself() {
    let dir = tempfile::tempdir().unwrap();
    let cloud = Cloud::embedded(&dir.path().join("cloud"));
    let agent = Agent::start(
        &dir.path().join("agent"),
        &["--broker", &cloud.mqtt_url(), "--device-id", "gw-idle"],
    );
    cloud.wait_presence("gw-idle", true, Duration::from_secs(30));
    // Its birth and inventory are acknowledged, then nothing happens.
    eventually(Duration::from_secs(20), "the backlog to drain", || {
        (agent.json(&["status"])["sync"]["backlog_events"] == 0).then_some(())
    });
    std::thread::sleep(Duration::from_secs(2));
    let (w0, c0) = wakeups_and_cpu(agent.pid());
    std::thread::sleep(Duration::from_secs(30));
    let (w1, c1) = wakeups_and_cpu(agent.pid());
    let (wakeups, ticks) = (w1 - w0, c1 - c0);
    eprintln!("idle 30 s, connected: {wakeups} wake-ups, {ticks} CPU ticks");
    // What is left is the MQTT keepalive (every 15 s) and retention's once-a-minute look; a
    // 50 ms poll alone was 600.
    assert!(wakeups <= 60, "{wakeups} wake-ups in 30 s of idling");
    // 0.1 % of one CPU over 30 s is 3 ticks at 100 Hz.
    assert!(ticks <= 3, "{ticks} CPU ticks in 30 s of idling");
}
