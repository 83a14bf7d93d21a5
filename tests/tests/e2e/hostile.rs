//! Hostile input on the broker and faults on the link: each message is refused by name and
//! counted, outpost-cloud keeps its process id, and the real agent's runs still sync exactly.

use std::time::Duration;

use outpost_shared::journal;
use outpost_shared::protocol::{self, Body, EventBatch};
use outpost_tests::cloud::{Cloud, Proxy};
use outpost_tests::{Agent, eventually, mqtt_publish, mqtt_try_publish, write};
use serde_json::json;

const ECHO: &str = "name: echo\nversion: 1\nsteps:\n  - {id: a, action: set, args: {x: '{{ input.x }}'}}\n";

fn events(batch: EventBatch) -> Vec<u8> {
    protocol::encode(&Body::Events(batch))
}

fn synced(cloud: &Cloud, agent: &Agent, device: &str) {
    eventually(Duration::from_secs(30), "the agent's journal to be stored", || {
        let ours = agent.json(&["status"])["journal"]["next_seq"].as_u64()? - 1;
        let theirs = cloud.device(device)?["stored_seq"].as_u64()?;
        (ours == theirs && theirs > 0).then_some(())
    });
}

#[test]
fn hostile_messages_are_refused_by_name_and_the_fleet_keeps_syncing() {
    let dir = tempfile::tempdir().unwrap();
    let mut cloud = Cloud::embedded(&dir.path().join("cloud"));
    let pid = cloud.pid();
    let proxy = Proxy::start(cloud.mqtt);
    let agent = Agent::start(
        &dir.path().join("agent"),
        &["--broker", &proxy.url(), "--device-id", "gw1"],
    );
    cloud.wait_presence("gw1", true, Duration::from_secs(20));
    let def = write(dir.path(), "echo.yaml", ECHO);
    agent.json(&["apply", &def]);
    let p = cloud.mqtt;
    let topic = "outpost/v1/gw9/events";

    // The 12-byte batch that aborted outpost-cloud (count = u32::MAX, redelivered after restart).
    let count_bomb = EventBatch {
        epoch: 1,
        first_seq: 1,
        count: u32::MAX,
        compressed: miniz_oxide::deflate::compress_to_vec(&[1, 7], 6),
    };
    mqtt_publish(p, topic, events(count_bomb));
    // A deflate bomb: 64 MiB of zeros in ~65 KB; it once wrote a 50-million-character log line.
    let deflate_bomb = EventBatch {
        epoch: 1,
        first_seq: 1,
        count: 1,
        compressed: miniz_oxide::deflate::compress_to_vec(&vec![0u8; 64 << 20], 10),
    };
    mqtt_publish(p, topic, events(deflate_bomb));
    // Sequences that overflow a u64.
    let mut overflow = protocol::pack(1, u64::MAX, &[b"a".to_vec(), b"b".to_vec()]);
    overflow.epoch = 1;
    mqtt_publish(p, topic, events(overflow));
    // One undecodable record followed by a good one: quarantined, and sync goes on past it.
    let good = journal::encode(&journal::Record {
        run_id: "r1".into(),
        at_ms: 1,
        event: journal::Event::RunCancelled { reason: "x".into() },
    });
    mqtt_publish(p, topic, events(protocol::pack(1, 1, &[vec![0xee; 40], good])));
    // Over the packet limit: the broker refuses it at the door and nothing downstream sees it.
    let huge = mqtt_try_publish(p, topic, vec![1u8; 2 << 20]);
    assert!(huge.is_err(), "the broker accepted a 2 MiB packet");

    eventually(Duration::from_secs(15), "every rejection counted by reason", || {
        let s = cloud.get("/v1/stats");
        let c = &s["counters"];
        (c["rejected.malformed"] == 3 && c["rejected.undecodable_event"] == 1).then_some(())
    });
    assert_eq!(
        cloud.get("/v1/devices/gw9")["stored_seq"],
        2,
        "the quarantined record is not a gap"
    );
    let log = cloud.log();
    assert!(
        log.len() < 64 * 1024,
        "{} bytes of log for a handful of messages",
        log.len()
    );
    assert!(log.contains("4294967295 events"), "the count bomb is named:\n{log}");
    assert!(log.contains("do not inflate"), "the deflate bomb is named:\n{log}");

    // A desired document that could never be sent is refused before it is stored.
    let big = json!({"document": {"recipe": "x".repeat(1536 * 1024)}});
    let (code, body) = cloud.send("PUT", "/v1/devices/gw1/desired", &big);
    assert_eq!(code, 400, "{body}");
    assert!(body.to_string().contains("exceeds the 1048576-byte limit"), "{body}");

    // The real agent still syncs exactly, and the process is the same one.
    for i in 0..5 {
        agent.json(&["start", "echo", "--input", &format!(r#"{{"x": {i}}}"#), "--wait"]);
    }
    // A valid definition whose timer is due after the year 9999: every view of it still works
    // (RFC 3339 has four-digit years; formatting it used to panic in show, the API, the console).
    let far = write(
        dir.path(),
        "far.yaml",
        "name: far\nversion: 1\nsteps:\n  - {id: nap, action: sleep, args: {duration: 8000y}}\n",
    );
    agent.json(&["apply", &far]);
    agent.json(&["start", "far", "--id", "far-1"]);
    eventually(Duration::from_secs(10), "the timer to be set", || {
        let r = agent.json(&["show", "far-1"]);
        (r["steps"][0]["status"] != "pending").then_some(())
    });
    assert!(agent.cli(&["show", "far-1"]).status.success());
    assert!(agent.cli(&["show", "far-1", "--history"]).status.success());
    assert!(agent.cli(&["list"]).status.success());
    synced(&cloud, &agent, "gw1");
    let run = cloud.get("/v1/devices/gw1/runs/far-1");
    assert_eq!(run["status"], "running", "{run}");
    let (code, page) = outpost_tests::cloud::http("GET", cloud.api, "/devices/gw1/runs/far-1", None).unwrap();
    assert_eq!(code, 200);
    assert!(
        page.to_string().contains("9999-12-31T23:59:59.999Z"),
        "the console shows the deadline"
    );
    assert!(cloud.alive() && cloud.pid() == pid, "outpost-cloud restarted");
}

#[test]
fn large_outputs_sync_in_batches_sized_by_bytes_and_presence_survives_reconnects() {
    let dir = tempfile::tempdir().unwrap();
    let cloud = Cloud::embedded(&dir.path().join("cloud"));
    let proxy = Proxy::start(cloud.mqtt);
    let agent = Agent::start(
        &dir.path().join("agent"),
        &["--broker", &proxy.url(), "--device-id", "gw2"],
    );
    cloud.wait_presence("gw2", true, Duration::from_secs(20));
    let def = write(dir.path(), "echo.yaml", ECHO);
    agent.json(&["apply", &def]);

    // Offline, 12 runs whose input and output are ~200 KiB each: ~4.8 MB the cloud gets only in
    // batches under the message limit (batches of 500 events never fit and were resent forever).
    proxy.cut();
    cloud.wait_presence("gw2", false, Duration::from_secs(60));
    let input = write(
        dir.path(),
        "big.json",
        &json!({"x": "y".repeat(200 * 1024)}).to_string(),
    );
    for _ in 0..12 {
        agent.json(&["start", "echo", "--input-file", &input, "--wait"]);
    }
    proxy.restore();
    cloud.wait_presence("gw2", true, Duration::from_secs(30));
    synced(&cloud, &agent, "gw2");

    // Reconnects inside one agent process: the old connection's will must not mark the new
    // connection offline (birth and will used to share the epoch).
    for _ in 0..3 {
        proxy.cut();
        cloud.wait_presence("gw2", false, Duration::from_secs(60));
        proxy.restore();
        cloud.wait_presence("gw2", true, Duration::from_secs(30));
    }
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        cloud.get("/v1/devices/gw2")["online"],
        true,
        "shown offline while connected"
    );
    assert_eq!(agent.json(&["status"])["sync"]["oversized_messages"], 0);
}
