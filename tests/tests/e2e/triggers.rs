//! Triggers: MQTT messages (Mosquitto, persistent session, ack after start) and files dropped in a
//! watched directory start runs; each maps to a dedupe key, so a redelivery starts nothing new.

use std::time::Duration;

use outpost_tests::{Agent, Mosquitto, eventually, write};
use serde_json::Value;

fn runs(agent: &Agent, prefix: &str) -> Vec<Value> {
    agent
        .json(&["list", "--limit", "1000"])
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["run_id"].as_str().unwrap().starts_with(prefix))
        .cloned()
        .collect()
}

fn completed(agent: &Agent, prefix: &str, n: usize) -> Vec<Value> {
    eventually(
        Duration::from_secs(15),
        &format!("{n} completed runs {prefix}*"),
        || {
            let r = runs(agent, prefix);
            (r.len() >= n && r.iter().all(|r| r["status"] == "completed")).then_some(r)
        },
    )
}

#[test]
fn mqtt_messages_start_runs_once_even_when_redelivered_or_sent_while_the_agent_is_down() {
    let broker = Mosquitto::start();
    let dir = tempfile::tempdir().unwrap();
    let def = r#"
name: lot
version: 1
triggers:
  - mqtt: plant/+/lot
steps:
  - id: record
    action: set
    args: {kg: "{{ input.kg }}"}
"#;
    let flags = ["--mqtt-broker", &broker.url(), "--mqtt-client-id", "outpost-test-gw"];
    let mut agent = Agent::start(&dir.path().join("data"), &flags);
    agent.json(&["apply", &write(dir.path(), "lot.yaml", def)]);
    eventually(Duration::from_secs(10), "the trigger to subscribe", || {
        agent.log().contains("MQTT trigger connected").then_some(())
    });
    std::thread::sleep(Duration::from_millis(300));

    broker.publish("plant/line1/lot", r#"{"id": "lot-1", "kg": 5}"#);
    broker.publish("plant/line1/lot", r#"{"id": "lot-1", "kg": 5}"#);
    broker.publish("plant/line2/lot", r#"{"kg": 7}"#);
    broker.publish("plant/line2/lot", r#"{"kg": 7}"#);
    broker.publish("plant/line2/other", r#"{"kg": 9}"#);
    let r = completed(&agent, "mqtt:lot:", 2);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(runs(&agent, "mqtt:lot:").len(), 2, "redeliveries start nothing: {r:?}");
    let one = agent.json(&["show", "mqtt:lot:lot-1"]);
    assert_eq!(one["output"], serde_json::json!({"kg": 5}));

    // Sent while the agent is down: the broker keeps it for our persistent session.
    agent.kill9();
    broker.publish("plant/line3/lot", r#"{"id": "lot-2", "kg": 11}"#);
    agent.restart();
    completed(&agent, "mqtt:lot:lot-2", 1);
    assert_eq!(runs(&agent, "mqtt:lot:").len(), 3);

    // Over rumqttc's default 10 KiB limit, a message used to drop the connection and come back
    // on every reconnect, stopping every trigger. Now: a 50 KiB one starts its run, one larger
    // than a run input is refused by name, and the next small one still starts.
    let pad = "p".repeat(50 * 1024);
    broker.publish(
        "plant/line4/lot",
        &format!(r#"{{"id": "lot-3", "kg": 1, "pad": "{pad}"}}"#),
    );
    completed(&agent, "mqtt:lot:lot-3", 1);
    let big = "b".repeat(600 * 1024);
    broker.publish(
        "plant/line4/lot",
        &format!(r#"{{"id": "lot-4", "kg": 1, "pad": "{big}"}}"#),
    );
    broker.publish("plant/line4/lot", r#"{"id": "lot-5", "kg": 2}"#);
    completed(&agent, "mqtt:lot:lot-5", 1);
    assert!(agent.log().contains("trigger message larger than a run input"));
    assert_eq!(runs(&agent, "mqtt:lot:").len(), 5, "lot-4 started nothing");
}

#[test]
fn files_dropped_in_a_watched_directory_start_one_run_each_and_bad_ones_are_set_aside() {
    let dir = tempfile::tempdir().unwrap();
    let inbox = dir.path().join("inbox");
    let def = format!(
        "name: drop\nversion: 1\ntriggers:\n  - directory: {}\nsteps:\n  - {{id: s, action: set, args: {{kg: \"{{{{ input.kg }}}}\"}}}}\n",
        inbox.display()
    );
    let mut agent = Agent::start(&dir.path().join("data"), &[]);
    agent.json(&["apply", &write(dir.path(), "drop.yaml", &def)]);
    let drop_file = |name: &str, text: &str| {
        // Write then rename, as producers should, so a half-written file is never read.
        std::fs::create_dir_all(&inbox).unwrap();
        let tmp = inbox.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, inbox.join(name)).unwrap();
    };
    drop_file("a.json", r#"{"kg": 3}"#);
    drop_file("bad.json", "{not json");
    let r = completed(&agent, "file:drop:", 1);
    assert_eq!(r[0]["status"], "completed");
    eventually(Duration::from_secs(5), "files to be set aside", || {
        (inbox.join(".done/a.json").exists() && inbox.join(".failed/bad.json").exists()).then_some(())
    });
    let why = std::fs::read_to_string(inbox.join(".failed/bad.json.error")).unwrap();
    assert!(why.contains("not JSON"), "{why}");

    // The same file again is the same run; a file dropped while the agent is down is picked up.
    drop_file("a.json", r#"{"kg": 3}"#);
    agent.kill9();
    drop_file("b.json", r#"{"kg": 4}"#);
    agent.restart();
    eventually(Duration::from_secs(10), "the inbox to empty", || {
        (!inbox.join("a.json").exists() && !inbox.join("b.json").exists()).then_some(())
    });
    let r = completed(&agent, "file:drop:", 2);
    assert_eq!(r.len(), 2, "{r:?}");
}

#[test]
fn an_mqtt_trigger_refused_by_a_full_limit_is_retried_while_connected() {
    let broker = Mosquitto::start();
    let dir = tempfile::tempdir().unwrap();
    let def = "name: one\nversion: 1\nlimits: {max_runs: 1}\ntriggers:\n  - mqtt: plant/one\nsteps:\n  - {id: s, action: exec, args: {command: sleep, args: ['0.7']}}\n";
    let flags = [
        "--mqtt-broker",
        &broker.url(),
        "--mqtt-client-id",
        "outpost-test-limit",
        "--when-full",
        "reject",
    ];
    let agent = Agent::start(&dir.path().join("data"), &flags);
    agent.json(&["apply", &write(dir.path(), "one.yaml", def)]);
    eventually(Duration::from_secs(10), "the trigger to subscribe", || {
        agent.log().contains("MQTT trigger connected").then_some(())
    });
    std::thread::sleep(Duration::from_millis(300));
    for i in 0..3 {
        broker.publish("plant/one", &format!(r#"{{"id": "m{i}"}}"#));
    }
    let r = completed(&agent, "mqtt:one:", 3);
    assert_eq!(r.len(), 3, "{r:?}");
    assert!(
        agent.log().contains("trigger deferred"),
        "no start was refused; the test proved nothing"
    );
}
