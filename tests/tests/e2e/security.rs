//! The zero-trust fleet, end to end: enrolled gateways over mutual TLS, the embedded broker's
//! topic rules per certificate identity, refused certificates (plain text, another CA,
//! expired, revoked), and signatures that hold where a broker checks nothing (Mosquitto
//! without an ACL): forged messages are refused and counted on the side that receives them,
//! and replayed ones have no second effect.

use std::path::Path;
use std::time::Duration;

use outpost_shared::protocol::{Body, Channel, Command, CommandKind, Seal, Topics};
use outpost_shared::signing::SigningKey;
use outpost_shared::tls::TlsFiles;
use outpost_tests::cloud::{Cloud, stored};
use outpost_tests::{Agent, Mosquitto, eventually, mqtt_connects, mqtt_session, mqtt_session_publish, write};
use serde_json::{Value, json};

const HELLO: &str = r#"
name: hello
version: 1
steps:
  - id: greet
    action: set
    args: {message: "hello"}
"#;

fn identity(agent_dir: &Path) -> TlsFiles {
    TlsFiles {
        ca: agent_dir.join("identity/ca.crt"),
        cert: Some(agent_dir.join("identity/device.crt")),
        key: Some(agent_dir.join("identity/device.key")),
    }
}

fn counter(cloud: &Cloud, name: &str) -> u64 {
    cloud.get("/v1/stats")["counters"][name].as_u64().unwrap_or(0)
}

/// A gateway enrolled in `cloud` and connected to `url`, with one completed run mirrored.
fn gateway(cloud: &Cloud, dir: &Path, id: &str, url: &str) -> Agent {
    cloud.enroll(dir, id);
    let agent = Agent::start(dir, &["--broker", url, "--device-id", id]);
    cloud.wait_presence(id, true, Duration::from_secs(20));
    agent.json(&["apply", &write(dir, "hello.yaml", HELLO)]);
    agent.json(&["start", "hello", "--id", "first", "--wait"]);
    eventually(Duration::from_secs(20), "the first run to be mirrored", || {
        let runs = cloud.get(&format!("/v1/devices/{id}/runs"));
        runs.as_array()?
            .iter()
            .any(|r| r["run_id"] == "first" && r["status"] == "completed")
            .then_some(())
    });
    agent
}

#[test]
fn the_embedded_broker_holds_each_certificate_to_its_own_subtree_and_refuses_bad_ones() {
    let dir = tempfile::tempdir().unwrap();
    let cloud = Cloud::secure(&dir.path().join("cloud"));
    let url = cloud.mqtts_url();
    let (a_dir, b_dir) = (dir.path().join("a"), dir.path().join("b"));
    cloud.enroll(&a_dir, "gw-a");
    let _b = gateway(&cloud, &b_dir, "gw-b", &url);
    let b_before = stored(&cloud, "gw-b");
    let topics = Topics::new("outpost");
    let a = identity(&a_dir);
    let security = &cloud.get("/v1/devices/gw-b")["security"];
    assert_eq!(security["warnings"], json!([]), "{security}");
    assert!(
        security["certificate_expires"].as_str().is_some_and(|t| t > "2027"),
        "{security}"
    );
    let page = outpost_tests::cloud::http_text(cloud.api, "/devices/gw-b");
    assert!(
        page.contains("certificate: ") && !page.contains("Insecure link"),
        "{page}"
    );

    // A's own certificate and client id connect; B's topics close the connection.
    for ch in [
        Channel::Events,
        Channel::Birth,
        Channel::CommandResult,
        Channel::Inventory,
        Channel::Reported,
    ] {
        let (client, mut conn) = mqtt_session(cloud.mqtt, "gw-a", Some(&a)).unwrap();
        mqtt_connects(&mut conn, Duration::from_secs(10)).expect("A connects as itself");
        let topic = topics.topic("gw-b", ch);
        let sent = mqtt_session_publish(&client, &mut conn, &topic, b"forged".to_vec());
        assert!(sent.is_err(), "the broker let A publish on {topic}");
    }
    for ch in [Channel::Command, Channel::Desired, Channel::Ack] {
        let (client, mut conn) = mqtt_session(cloud.mqtt, "gw-a", Some(&a)).unwrap();
        mqtt_connects(&mut conn, Duration::from_secs(10)).unwrap();
        let topic = topics.topic("gw-b", ch);
        client.subscribe(&topic, rumqttc::QoS::AtLeastOnce).unwrap();
        let end = mqtt_connects(&mut conn, Duration::from_secs(5));
        assert!(end.is_err(), "A subscribed to {topic}");
        // Nor may A publish on its own down channels (orders come only from the cloud).
        let (client, mut conn) = mqtt_session(cloud.mqtt, "gw-a", Some(&a)).unwrap();
        mqtt_connects(&mut conn, Duration::from_secs(10)).unwrap();
        let own = topics.topic("gw-a", ch);
        assert!(
            mqtt_session_publish(&client, &mut conn, &own, b"x".to_vec()).is_err(),
            "{own}"
        );
    }
    // A's certificate under B's client id: no session takeover.
    let (_c, mut conn) = mqtt_session(cloud.mqtt, "gw-b", Some(&a)).unwrap();
    assert!(
        mqtt_connects(&mut conn, Duration::from_secs(5)).is_err(),
        "A connected as gw-b"
    );
    let denied = counter(&cloud, "broker.denied_connections");
    assert!(denied >= 12, "{denied} connections closed by the rules");
    let log = cloud.log();
    assert!(
        log.contains("device gw-a may not publish on 'outpost/v1/gw-b/events'"),
        "{log}"
    );
    assert!(
        log.contains("client id 'gw-b' is not this certificate's identity 'gw-a'"),
        "{log}"
    );

    // Plain text, a certificate of another fleet, an expired certificate: no handshake.
    let (_c, mut conn) = mqtt_session(cloud.mqtt, "gw-a", None).unwrap();
    assert!(
        mqtt_connects(&mut conn, Duration::from_secs(5)).is_err(),
        "plain text connected"
    );
    let other = Cloud::secure(&dir.path().join("other-fleet"));
    let stranger = dir.path().join("stranger");
    other.enroll(&stranger, "gw-a");
    let mut foreign = identity(&stranger);
    foreign.ca = a.ca.clone();
    let (_c, mut conn) = mqtt_session(cloud.mqtt, "gw-a", Some(&foreign)).unwrap();
    assert!(
        mqtt_connects(&mut conn, Duration::from_secs(5)).is_err(),
        "another fleet's certificate connected"
    );
    let expired_dir = dir.path().join("expired");
    let out = outpost_tests::cli(&expired_dir, &["keygen", "--device-id", "gw-old"]);
    assert!(out.status.success());
    let crt = expired_dir.join("old.crt");
    let csr = expired_dir.join("identity/device.csr");
    let out = cloud.admin(&[
        "pki",
        "sign",
        csr.to_str().unwrap(),
        "--out",
        crt.to_str().unwrap(),
        "--days",
        "0",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    std::thread::sleep(Duration::from_millis(1100));
    let old = TlsFiles {
        ca: a.ca.clone(),
        cert: Some(crt),
        key: Some(expired_dir.join("identity/device.key")),
    };
    let (_c, mut conn) = mqtt_session(cloud.mqtt, "gw-old", Some(&old)).unwrap();
    assert!(
        mqtt_connects(&mut conn, Duration::from_secs(5)).is_err(),
        "an expired certificate connected"
    );
    eventually(Duration::from_secs(5), "the refused handshakes counted", || {
        (counter(&cloud, "broker.refused_handshakes") >= 3).then_some(())
    });
    let log = cloud.log();
    assert!(log.contains("TLS handshake failed"), "{log}");
    assert!(
        log.to_lowercase().contains("expired"),
        "the expired certificate is named: {log}"
    );
    assert_eq!(stored(&cloud, "gw-b"), b_before, "B's state changed");

    // A revoked gateway: cloud-sync refuses what it sends from then on.
    let out = cloud.admin(&["devices", "revoke", "gw-a"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let _a = Agent::start(&a_dir, &["--broker", &url, "--device-id", "gw-a"]);
    eventually(Duration::from_secs(20), "the revoked gateway's birth refused", || {
        (counter(&cloud, "rejected.revoked") >= 1).then_some(())
    });
    assert!(
        cloud.device("gw-a").is_none(),
        "a revoked gateway appeared in the fleet"
    );
}

/// Everything published on `topic` within `wait`, as the broker delivers it to a spy.
fn capture(port: u16, topic: &str, wait: Duration, during: impl FnOnce()) -> Vec<Vec<u8>> {
    let (client, mut conn) = mqtt_session(port, &format!("spy-{}", fastrand::u32(..)), None).unwrap();
    mqtt_connects(&mut conn, Duration::from_secs(10)).unwrap();
    client.subscribe(topic, rumqttc::QoS::AtLeastOnce).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        let deadline = std::time::Instant::now() + wait;
        let mut got = Vec::new();
        while std::time::Instant::now() < deadline {
            if let Ok(Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p)))) =
                conn.recv_timeout(Duration::from_millis(100))
            {
                got.push(p.payload.to_vec());
            }
            if rx.try_recv().is_ok() {
                break;
            }
        }
        got
    });
    std::thread::sleep(Duration::from_millis(300));
    during();
    std::thread::sleep(Duration::from_millis(1500));
    let _ = tx.send(());
    reader.join().unwrap()
}

#[test]
fn signatures_hold_where_the_broker_checks_nothing_and_replays_have_no_second_effect() {
    let dir = tempfile::tempdir().unwrap();
    let mosquitto = Mosquitto::start(); // no ACL, anyone may publish anywhere
    let cloud = Cloud::secure_external(&dir.path().join("cloud"), &mosquitto.url(), mosquitto.port);
    let (a_dir, b_dir) = (dir.path().join("a"), dir.path().join("b"));
    let _a = gateway(&cloud, &a_dir, "gw-a", &mosquitto.url());
    let b = gateway(&cloud, &b_dir, "gw-b", &mosquitto.url());
    let topics = Topics::new("outpost");
    let a_key = std::sync::Arc::new(SigningKey::load(&a_dir.join("identity/device.key")).unwrap());
    let a_seal = Seal::Signed(a_key);
    let b_before = stored(&cloud, "gw-b");
    let b_runs = cloud.get("/v1/devices/gw-b/runs");
    // Signed, but over plain text on loopback: the fleet view says so.
    let warnings = cloud.get("/v1/devices/gw-b")["security"]["warnings"].to_string();
    assert!(warnings.contains("plain-text MQTT link"), "{warnings}");
    let fleet = outpost_tests::cloud::http_text(cloud.api, "/");
    assert!(
        fleet.contains("insecure"),
        "the fleet page marks the plain-text gateways"
    );

    // Device → cloud: unsigned, and signed by A, on B's topics.
    let birth = Body::Birth(outpost_shared::protocol::Birth {
        epoch: u64::MAX,
        last_seq: 0,
        agent_version: "evil".into(),
        labels: vec![],
        journal_id: 1,
        announcement: 1,
        resend_from: 1,
        storage_error: String::new(),
        blocked_runs: vec![],
        insecure: vec![],
        refused: vec![],
    });
    let rejected_before = (
        counter(&cloud, "rejected.unsigned"),
        counter(&cloud, "rejected.bad_signature"),
    );
    for ch in [
        Channel::Birth,
        Channel::Events,
        Channel::CommandResult,
        Channel::Inventory,
        Channel::Reported,
    ] {
        let topic = topics.topic("gw-b", ch);
        outpost_tests::mqtt_publish(mosquitto.port, &topic, Seal::Unsigned.encode(&topic, &birth).unwrap());
        outpost_tests::mqtt_publish(mosquitto.port, &topic, a_seal.encode(&topic, &birth).unwrap());
    }
    // A's own signature, replayed onto B's topic, is as bad as a forgery.
    let a_topic = topics.topic("gw-a", Channel::Birth);
    outpost_tests::mqtt_publish(
        mosquitto.port,
        &topics.topic("gw-b", Channel::Birth),
        a_seal.encode(&a_topic, &birth).unwrap(),
    );
    eventually(Duration::from_secs(10), "every forgery refused and counted", || {
        let unsigned = counter(&cloud, "rejected.unsigned") - rejected_before.0;
        let bad = counter(&cloud, "rejected.bad_signature") - rejected_before.1;
        (unsigned >= 5 && bad >= 6).then_some(())
    });
    assert_eq!(stored(&cloud, "gw-b"), b_before, "B's mirror changed");
    assert_eq!(cloud.get("/v1/devices/gw-b/runs"), b_runs);
    assert_ne!(cloud.device("gw-b").unwrap()["agent_version"], "evil");

    // Cloud → device: an unsigned order and one signed by a gateway's key, to B.
    let cmd_topic = topics.topic("gw-b", Channel::Command);
    let start = |id: &str| {
        Body::Command(Command {
            id: id.into(),
            kind: CommandKind::Start {
                workflow: "hello".into(),
                version: None,
                input: "{}".into(),
                run_id: Some(id.into()),
            },
        })
    };
    outpost_tests::mqtt_publish(
        mosquitto.port,
        &cmd_topic,
        Seal::Unsigned.encode(&cmd_topic, &start("forged-1")).unwrap(),
    );
    outpost_tests::mqtt_publish(
        mosquitto.port,
        &cmd_topic,
        a_seal.encode(&cmd_topic, &start("forged-2")).unwrap(),
    );
    let ack_topic = topics.topic("gw-b", Channel::Ack);
    let ack = Body::Ack(outpost_shared::protocol::Ack { next_seq: u64::MAX });
    outpost_tests::mqtt_publish(
        mosquitto.port,
        &ack_topic,
        Seal::Unsigned.encode(&ack_topic, &ack).unwrap(),
    );
    let desired_topic = topics.topic("gw-b", Channel::Desired);
    let desired = Body::Desired(outpost_shared::protocol::Desired {
        version: u64::MAX,
        document: r#"{"valve": "open"}"#.into(),
    });
    outpost_tests::mqtt_publish(
        mosquitto.port,
        &desired_topic,
        a_seal.encode(&desired_topic, &desired).unwrap(),
    );
    eventually(Duration::from_secs(10), "B to refuse the four forgeries", || {
        let s = b.json(&["status"]);
        (s["sync"]["bad_signatures"].as_u64()? >= 4).then_some(())
    });
    let runs = b.json(&["list"]);
    assert!(
        !runs.to_string().contains("forged"),
        "a forged command started a run: {runs}"
    );
    assert!(
        b.log().contains("bad signature: not signed by the fleet key"),
        "{}",
        b.log()
    );
    // The fleet hears of it: the refusals are in B's next birth, on the API and the console.
    let refused = eventually(Duration::from_secs(15), "B's refusals in the fleet view", || {
        let r = cloud.get("/v1/devices/gw-b")["security"]["refused"].clone();
        (r.as_array()?.len() >= 4).then_some(r)
    });
    let text = refused.to_string();
    assert!(
        text.contains("cmd: unsigned message") && text.contains("desired: bad signature"),
        "{text}"
    );
    let page = outpost_tests::cloud::http_text(cloud.api, "/devices/gw-b");
    assert!(
        page.contains("rejected: ") && page.contains("refused messages sent to it as orders"),
        "{page}"
    );

    // Replays of real, signed orders: a command, the desired state and an ack.
    let captured = capture(mosquitto.port, &cmd_topic, Duration::from_secs(20), || {
        let (code, body) = cloud.send(
            "POST",
            "/v1/devices/gw-b/commands",
            &json!({"type": "start", "workflow": "hello", "run_id": "real-1"}),
        );
        assert_eq!(code, 202, "{body}");
    });
    assert!(!captured.is_empty(), "the spy saw the real command");
    eventually(Duration::from_secs(10), "the real command's run", || {
        b.json(&["list"]).to_string().contains("real-1").then_some(())
    });
    let dup_before = b.json(&["status"])["sync"]["duplicate_commands"].as_u64().unwrap();
    let list_before: Value = b.json(&["list", "--limit", "100"]);
    for bytes in &captured {
        outpost_tests::mqtt_publish(mosquitto.port, &cmd_topic, bytes.clone());
    }
    eventually(Duration::from_secs(10), "the replay seen as a repeat", || {
        let d = b.json(&["status"])["sync"]["duplicate_commands"].as_u64()?;
        (d > dup_before).then_some(())
    });
    assert_eq!(
        b.json(&["list", "--limit", "100"]).as_array().unwrap().len(),
        list_before.as_array().unwrap().len(),
        "a replayed command started another run"
    );

    // A replayed deployment: version 2 is captured, version 3 deployed after it, then the
    // captured order sent again. It is the same signed command (same id), so the gateway
    // reports its first result again and does not go back to version 2.
    let deploy = |version: u32| {
        let doc = HELLO.replace("version: 1", &format!("version: {version}"));
        let (code, body) = cloud.send(
            "POST",
            "/v1/deployments",
            &json!({"document": doc, "devices": ["gw-b"]}),
        );
        assert_eq!(code, 201, "{body}");
        let id = body["id"].as_str().unwrap().to_string();
        eventually(Duration::from_secs(20), "the deployment to be applied", || {
            let d = cloud.get(&format!("/v1/deployments/{id}"));
            (d["devices"][0]["state"] == "applied").then_some(())
        });
    };
    let captured = capture(mosquitto.port, &cmd_topic, Duration::from_secs(30), || deploy(2));
    assert!(!captured.is_empty(), "the spy saw the deployment");
    deploy(3);
    let defs = b.json(&["definitions"]);
    let dup_before = b.json(&["status"])["sync"]["duplicate_commands"].as_u64().unwrap();
    for bytes in &captured {
        outpost_tests::mqtt_publish(mosquitto.port, &cmd_topic, bytes.clone());
    }
    eventually(
        Duration::from_secs(10),
        "the replayed deployment seen as a repeat",
        || {
            let d = b.json(&["status"])["sync"]["duplicate_commands"].as_u64()?;
            (d > dup_before).then_some(())
        },
    );
    assert_eq!(
        b.json(&["definitions"]),
        defs,
        "a replayed deployment changed the definitions"
    );
    let run = b.json(&["start", "hello", "--id", "after-deploy-replay", "--wait"]);
    assert_eq!(run["version"], 3, "{run}");

    let captured = capture(mosquitto.port, &desired_topic, Duration::from_secs(20), || {
        let (code, body) = cloud.send(
            "PUT",
            "/v1/devices/gw-b/desired",
            &json!({"document": {"setpoint": 80}}),
        );
        assert!(code == 200 || code == 202, "{code} {body}");
    });
    assert!(!captured.is_empty(), "the spy saw the desired state");
    eventually(Duration::from_secs(10), "the desired state to be reported", || {
        let s = cloud.get("/v1/devices/gw-b/state");
        (s["reported"]["desired_version"] == 1).then_some(())
    });
    let report = cloud.get("/v1/devices/gw-b/state")["reported"].clone();
    for bytes in &captured {
        outpost_tests::mqtt_publish(mosquitto.port, &desired_topic, bytes.clone());
    }
    std::thread::sleep(Duration::from_secs(1));
    assert!(b.log().contains("desired state not newer; ignored"), "{}", b.log());
    assert_eq!(
        cloud.get("/v1/devices/gw-b/state")["reported"]["desired_version"],
        report["desired_version"]
    );

    let acks = capture(mosquitto.port, &ack_topic, Duration::from_secs(20), || {
        b.json(&["start", "hello", "--id", "after-acks", "--wait"]);
    });
    assert!(!acks.is_empty(), "the spy saw acknowledgements");
    let acked = b.json(&["status"])["sync"]["acked_seq"].as_u64().unwrap();
    for bytes in &acks {
        outpost_tests::mqtt_publish(mosquitto.port, &ack_topic, bytes.clone());
    }
    std::thread::sleep(Duration::from_secs(1));
    let now = b.json(&["status"])["sync"]["acked_seq"].as_u64().unwrap();
    assert!(now >= acked, "a replayed ack moved the cursor back ({acked} → {now})");
}

#[test]
fn the_api_socket_is_owner_and_group_only_from_the_start() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(&dir.path().join("agent"), &[]);
    use std::os::unix::fs::PermissionsExt;
    let sock = agent.dir.join("outpost.sock");
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o660, "{sock:?}");
    let left: Vec<_> = std::fs::read_dir(&agent.dir)
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with(".outpost-sock"))
        .collect();
    assert!(left.is_empty(), "the staging directory was left behind");
}

#[test]
fn mosquitto_with_the_shipped_tls_config_and_acl_keeps_each_gateway_in_its_subtree() {
    let dir = tempfile::tempdir().unwrap();
    let cloud_dir = dir.path().join("cloud");
    for args in [
        &["pki", "init"][..],
        &["pki", "mosquitto", "--out-dir", cloud_dir.to_str().unwrap()][..],
    ] {
        let out = outpost_tests::cloud::admin(&cloud_dir, args);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let mut mosquitto = Mosquitto::start_tls(&cloud_dir.join("pki"), &cloud_dir.join("outpost.acl"));
    let url = format!("mqtts://127.0.0.1:{}", mosquitto.port);
    let cloud = Cloud::secure_external(&cloud_dir, &url, mosquitto.port);
    let (a_dir, b_dir) = (dir.path().join("a"), dir.path().join("b"));
    let b = gateway(&cloud, &b_dir, "gw-b", &url);
    cloud.enroll(&a_dir, "gw-a");
    let a = identity(&a_dir);
    let topics = Topics::new("outpost");
    let b_before = stored(&cloud, "gw-b");
    let rejected_before = cloud.get("/v1/stats")["rejected"].as_u64().unwrap();

    // A publishes on every one of B's up channels: Mosquitto drops them (MQTT 3.1.1 still
    // acknowledges), so nothing reaches cloud-sync at all.
    let (client, mut conn) = mqtt_session(mosquitto.port, "gw-a", Some(&a)).unwrap();
    mqtt_connects(&mut conn, Duration::from_secs(10)).expect("A connects");
    for ch in [
        Channel::Events,
        Channel::Birth,
        Channel::CommandResult,
        Channel::Inventory,
        Channel::Reported,
    ] {
        let _ = mqtt_session_publish(&client, &mut conn, &topics.topic("gw-b", ch), b"forged".to_vec());
    }
    // A subscribes to B's commands under B's client id: the broker makes it gw-a (B keeps its
    // session) and refuses the subscription, so B's next command reaches only B.
    let (spy, mut spy_conn) = mqtt_session(mosquitto.port, "gw-b", Some(&a)).unwrap();
    mqtt_connects(&mut spy_conn, Duration::from_secs(10)).expect("A connects (as itself)");
    spy.subscribe(topics.topic("gw-b", Channel::Command), rumqttc::QoS::AtLeastOnce)
        .unwrap();
    let (code, body) = cloud.send(
        "POST",
        "/v1/devices/gw-b/commands",
        &json!({"type": "start", "workflow": "hello", "run_id": "after-spy"}),
    );
    assert_eq!(code, 202, "{body}");
    eventually(Duration::from_secs(20), "B to run the command", || {
        b.json(&["list"]).to_string().contains("after-spy").then_some(())
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    while std::time::Instant::now() < deadline {
        if let Ok(Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p)))) =
            spy_conn.recv_timeout(Duration::from_millis(100))
        {
            panic!("A read B's command on {}", p.topic);
        }
    }
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        cloud.get("/v1/stats")["rejected"].as_u64().unwrap(),
        rejected_before,
        "a forgery reached cloud-sync"
    );
    assert!(stored(&cloud, "gw-b") > b_before, "B's own events still arrive");
    assert_eq!(cloud.device("gw-b").unwrap()["online"], true, "B lost its session");
    // Plain text is refused by the TLS listener.
    let (_c, mut conn) = mqtt_session(mosquitto.port, "gw-a", None).unwrap();
    assert!(
        mqtt_connects(&mut conn, Duration::from_secs(5)).is_err(),
        "plain text connected"
    );

    // Revoked: `devices revoke` rewrites crl.pem; Mosquitto, restarted on it, refuses A's
    // certificate in the handshake with a certificate_revoked alert. B reconnects as before.
    let out = outpost_tests::cloud::admin(&cloud_dir, &["devices", "revoke", "gw-a"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    drop((client, spy));
    mosquitto.stop();
    mosquitto.restart();
    let (_c, mut conn) = mqtt_session(mosquitto.port, "gw-a", Some(&a)).unwrap();
    let refused = mqtt_connects(&mut conn, Duration::from_secs(10)).expect_err("a revoked certificate connected");
    // Mosquitto 2.0 logs nothing for it; the alert it sends is the message.
    assert!(refused.contains("CertificateRevoked"), "{refused}");
    cloud.wait_presence("gw-b", true, Duration::from_secs(30));
}

#[test]
fn a_gateway_booted_at_1970_runs_offline_and_connects_once_its_clock_is_set() {
    let dir = tempfile::tempdir().unwrap();
    let cloud = Cloud::secure(&dir.path().join("cloud"));
    let gw = dir.path().join("gw");
    cloud.enroll(&gw, "gw-1970");
    // A board without a battery: its clock reads 1970-01-02 at boot.
    let offset = dir.path().join("clock-offset");
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    std::fs::write(&offset, (86_400_000 - now_ms).to_string()).unwrap();
    let agent = Agent::start_with_env(
        &gw,
        &["--broker", &cloud.mqtts_url(), "--device-id", "gw-1970"],
        &[("OUTPOST_CLOCK_OFFSET_FILE", offset.to_str().unwrap())],
    );
    agent.json(&["apply", &write(&gw, "hello.yaml", HELLO)]);
    agent.json(&["start", "hello", "--id", "at-1970", "--wait"]);
    eventually(Duration::from_secs(10), "the gateway to say why it waits", || {
        agent
            .log()
            .contains("the wall clock is before 2026-01-01: not connecting")
            .then_some(())
    });
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        cloud.device("gw-1970").is_none_or(|d| d["online"] != true),
        "connected with a 1970 clock"
    );
    let sync = agent.json(&["status"])["sync"].clone();
    assert_eq!(sync["connected"], false, "{sync}");
    assert!(
        sync["last_error"]["error"].to_string().contains("before 2026-01-01"),
        "status says why: {sync}"
    );

    // NTP answers: the gateway connects (its certificates are checked against this clock
    // now) and its run from 1970 is mirrored.
    std::fs::write(&offset, "0").unwrap();
    cloud.wait_presence("gw-1970", true, Duration::from_secs(30));
    eventually(Duration::from_secs(20), "the 1970 run mirrored", || {
        let runs = cloud.get("/v1/devices/gw-1970/runs");
        runs.as_array()?
            .iter()
            .any(|r| r["run_id"] == "at-1970" && r["status"] == "completed")
            .then_some(())
    });
}

#[test]
fn deployed_exec_runs_only_as_the_gateway_policy_allows() {
    let dir = tempfile::tempdir().unwrap();
    let cloud = Cloud::secure(&dir.path().join("cloud"));
    let gw = dir.path().join("gw");
    cloud.enroll(&gw, "gw-p");
    let policy = write(dir.path(), "policy.yaml", "exec:\n  - /bin/echo *\n");
    let agent = Agent::start(
        &gw,
        &[
            "--broker",
            &cloud.mqtts_url(),
            "--device-id",
            "gw-p",
            "--policy",
            &policy,
        ],
    );
    cloud.wait_presence("gw-p", true, Duration::from_secs(20));
    let deploy = |doc: &str| {
        let (code, body) = cloud.send(
            "POST",
            "/v1/deployments",
            &json!({"document": doc, "devices": ["gw-p"]}),
        );
        assert_eq!(code, 201, "{body}");
        let id = body["id"].as_str().unwrap().to_string();
        eventually(Duration::from_secs(20), "the deployment to be answered", || {
            let d = cloud.get(&format!("/v1/deployments/{id}"));
            let state = d["devices"][0]["state"].as_str()?.to_string();
            (state != "pending").then_some(d["devices"][0].clone())
        })
    };
    let evil = "name: shell\nversion: 1\nsteps:\n  - id: pwn\n    action: exec\n    args: {command: /bin/sh, args: ['-c', 'id > /tmp/pwned']}\n";
    let refused = deploy(evil);
    assert_eq!(refused["state"], "rejected", "{refused}");
    let reason = refused["reason"].as_str().unwrap();
    assert!(
        reason.contains("refused by the gateway's policy")
            && reason.contains("step 'pwn'")
            && reason.contains("no exec rule matches"),
        "{reason}"
    );
    let defs = agent.json(&["definitions"]).to_string();
    assert!(!defs.contains("shell"), "a refused definition was stored: {defs}");

    let fine = "name: report\nversion: 1\nsteps:\n  - id: say\n    action: exec\n    args: {command: /bin/echo, args: [line-3]}\n";
    assert_eq!(deploy(fine)["state"], "applied");
    let run = agent.json(&["start", "report", "--wait"]);
    assert_eq!(run["status"], "completed", "{run}");
    // The local operator's own definitions are not the cloud's to police.
    agent.json(&[
        "apply",
        &write(
            dir.path(),
            "local.yaml",
            &evil.replace("shell", "local-shell").replace("id > /tmp/pwned", "true"),
        ),
    ]);
}

#[test]
fn a_gateway_rotates_its_certificate_while_its_backlog_drains_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let cloud = Cloud::secure(&dir.path().join("cloud"));
    let gw = dir.path().join("gw");
    let proxy = outpost_tests::cloud::Proxy::start(cloud.mqtt);
    let url = proxy.url().replace("mqtt://", "mqtts://");
    cloud.enroll(&gw, "gw-r");
    let agent = Agent::start(&gw, &["--broker", &url, "--device-id", "gw-r", "--drain-rate", "150"]);
    cloud.wait_presence("gw-r", true, Duration::from_secs(20));
    proxy.cut();
    agent.json(&["apply", &write(dir.path(), "hello.yaml", HELLO)]);
    for i in 0..300 {
        agent.json(&["start", "hello", "--id", &format!("h{i:03}")]);
    }
    let total = agent.json(&["status"])["journal"]["next_seq"].as_u64().unwrap() - 1;
    assert!(total >= 900, "{total}");
    proxy.restore();
    eventually(Duration::from_secs(30), "the drain to get going", || {
        (stored(&cloud, "gw-r") > 100).then_some(())
    });
    // Rotation, as the README says: a new key here, signed there, installed here.
    let out = outpost_tests::cli(&gw, &["keygen", "--device-id", "gw-r", "--rotate"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let (csr, crt) = (gw.join("identity/device.next.csr"), gw.join("identity/next.crt"));
    let out = cloud.admin(&["pki", "sign", csr.to_str().unwrap(), "--out", crt.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let old_key = std::fs::read(gw.join("identity/device.key")).unwrap();
    let out = outpost_tests::cli(&gw, &["enroll", "--cert", crt.to_str().unwrap()]);
    let said = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success() && said.contains("rotated"), "{said}");
    assert!(said.contains("reconnects with them now"), "{said}");
    assert_ne!(std::fs::read(gw.join("identity/device.key")).unwrap(), old_key);
    let partway = stored(&cloud, "gw-r");
    assert!(
        partway < total,
        "the drain finished before the rotation ({partway} of {total})"
    );
    eventually(Duration::from_secs(60), "every event to arrive", || {
        (stored(&cloud, "gw-r") >= total).then_some(())
    });
    assert_eq!(stored(&cloud, "gw-r"), total, "exactly every event");
    assert!(
        agent
            .log()
            .contains("new certificate and key installed: connecting with them (rotation)"),
        "{}",
        agent.log()
    );
    let runs = cloud.get("/v1/devices/gw-r/runs");
    let completed = runs
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["status"] == "completed")
        .count();
    assert_eq!(completed, 300);
    // The old key now only covers what was in flight; the device's key file lists both.
    assert_eq!(
        std::fs::read_to_string(cloud.pki().join("devices/gw-r.pub"))
            .unwrap()
            .matches("BEGIN PUBLIC KEY")
            .count(),
        2
    );
}
