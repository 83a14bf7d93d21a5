//! One model of a run: the agent's `show`, cloud-sync's API and the console's graph fold the same
//! history the same way, for a run with retries, a loop, an approval and a compensation, and for
//! a failed run that was retried.

use std::time::Duration;

use outpost_tests::cloud::Cloud;
use outpost_tests::{Agent, eventually, write};
use serde_json::Value;

const SAGA: &str = r#"
name: lot
version: 1
kind: state_machine
steps:
  - id: book
    action: exec
    args: {command: 'true'}
    compensate: {action: exec, args: {command: 'true'}}
    next: flaky
  - id: flaky
    action: exec
    args: {command: sh, args: ['-c', 'test -f MARK || { touch MARK; exit 1; }']}
    retry: {max_attempts: 3, initial_interval: 100ms}
    next: count
  - id: count
    action: set
    args: {n: "{{ steps.count.visits }}"}
    choices:
      - when: steps.count.visits >= 3
        next: qa
    default: count
  - id: qa
    action: approval
    next: boom
  - id: boom
    action: fail
    args: {error: lot.rejected, message: out of spec}
    end: succeed
"#;

const ONCE: &str = r#"
name: once
version: 1
steps:
  - id: first
    action: exec
    args: {command: sh, args: ['-c', 'test -f MARK2 || { touch MARK2; exit 1; }']}
  - id: untaken
    action: set
    args: {x: 1}
    when: "false"
  - id: last
    action: set
    args: {ok: true}
    depends_on: [first]
"#;

/// The agent's run and cloud-sync's mirror of it, once the mirror holds every event.
fn both(agent: &Agent, cloud: &Cloud, run: &str, status: &str) -> (Value, Value) {
    let local = eventually(Duration::from_secs(20), "the run to end", || {
        let r = agent.json(&["show", run]);
        (r["status"] == status).then_some(r)
    });
    let mirror = eventually(Duration::from_secs(20), "the mirror to catch up", || {
        let (code, m) =
            outpost_tests::cloud::http("GET", cloud.api, &format!("/v1/devices/gw/runs/{run}"), None).ok()?;
        // The definition travels apart from the events; the graph waits for it too.
        let defined = m["steps"][0]["action"] == local["steps"][0]["action"];
        (code == 200 && m["events"] == local["events"] && m["status"] == status && defined).then_some(m)
    });
    (local, mirror)
}

#[test]
fn the_agent_the_api_and_the_console_graph_show_the_same_steps() {
    let dir = tempfile::tempdir().unwrap();
    let cloud = Cloud::embedded(&dir.path().join("cloud"));
    let work = dir.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    let saga = write(
        dir.path(),
        "lot.yaml",
        &SAGA.replace("MARK", &work.join("mark").display().to_string()),
    );
    let once = write(
        dir.path(),
        "once.yaml",
        &ONCE.replace("MARK2", &work.join("mark2").display().to_string()),
    );
    let agent = Agent::start(
        &dir.path().join("agent"),
        &["--broker", &cloud.mqtt_url(), "--device-id", "gw"],
    );
    agent.json(&["apply", &saga]);
    agent.json(&["apply", &once]);

    agent.json(&["start", "lot", "--id", "lot-1"]);
    eventually(Duration::from_secs(20), "the approval to be asked", || {
        let r = agent.json(&["show", "lot-1"]);
        r["waiting"]
            .as_str()
            .is_some_and(|w| w.contains("waiting for approval"))
            .then_some(())
    });
    let out = agent.cli(&["approve", "lot-1", "qa"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let (local, mirror) = both(&agent, &cloud, "lot-1", "compensated");
    assert_eq!(local["steps"], mirror["steps"], "agent {local}\ncloud {mirror}");
    let steps = local["steps"].as_array().unwrap();
    let step = |id: &str| steps.iter().find(|s| s["id"] == id).unwrap();
    // The retried step shows its output, not its first failure, and its two attempts.
    assert_eq!(
        (step("flaky")["status"].as_str(), step("flaky")["attempts"].as_u64()),
        (Some("completed"), Some(2))
    );
    assert!(step("flaky")["error"].is_null(), "{}", step("flaky"));
    // A loop counts visits, not attempts; a step without attempts has one.
    assert_eq!(
        (step("count")["visits"].as_u64(), step("count")["attempts"].as_u64()),
        (Some(3), Some(1))
    );
    assert_eq!(step("qa")["attempts"], 1);
    assert_eq!(step("book")["compensation"], "compensated");

    let (code, page) = outpost_tests::cloud::http("GET", cloud.api, "/devices/gw/runs/lot-1", None).unwrap();
    assert_eq!(code, 200);
    let page = page.as_str().map(str::to_string).unwrap_or_else(|| page.to_string());
    for (id, state) in [
        ("book", "compensated"),
        ("flaky", "completed"),
        ("count", "completed"),
        ("qa", "completed"),
        ("boom", "failed"),
    ] {
        assert!(
            page.contains(&format!(r#"data-step="{id}" data-state="{state}""#)),
            "graph: {id} should be {state}: {page}"
        );
    }

    // A failed run, retried: the failed step's new visit completes, the untaken branch is skipped.
    agent.cli(&["start", "once", "--id", "once-1"]);
    both(&agent, &cloud, "once-1", "failed");
    let out = agent.cli(&["retry", "once-1"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let (local, mirror) = both(&agent, &cloud, "once-1", "completed");
    assert_eq!(local["steps"], mirror["steps"], "agent {local}\ncloud {mirror}");
    let states: Vec<(&str, &str)> = local["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s["id"].as_str().unwrap(), s["status"].as_str().unwrap()))
        .collect();
    assert_eq!(
        states,
        [("first", "completed"), ("untaken", "skipped"), ("last", "completed")]
    );
}

#[test]
fn a_restart_leaves_a_marker_in_the_history_of_every_run_it_resumed() {
    let dir = tempfile::tempdir().unwrap();
    let mut agent = Agent::start(dir.path(), &[]);
    let def = "name: gate\nversion: 1\nsteps:\n  - {id: lot, action: wait_signal, args: {signal: lot-ready}}\n";
    agent.json(&["apply", &write(dir.path(), "gate.yaml", def)]);
    agent.json(&["start", "gate", "--id", "g-1"]);
    eventually(Duration::from_secs(10), "the run to wait", || {
        (agent.json(&["show", "g-1"])["steps"][0]["status"] == "waiting").then_some(())
    });
    // A power cut, then the agent comes back and resumes the run.
    agent.kill9();
    agent.restart();
    let history = eventually(Duration::from_secs(10), "the resume marker", || {
        let h = agent.json(&["show", "g-1"])["history"].clone();
        h.as_array()?.iter().any(|e| e["type"] == "run_resumed").then_some(h)
    });
    let marker = history
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["type"] == "run_resumed")
        .unwrap();
    assert!(marker["replayed"].as_u64().is_some_and(|n| n >= 2), "{marker}");
    let human = agent.cli(&["show", "g-1", "--history"]);
    assert!(String::from_utf8_lossy(&human.stdout).contains("run_resumed"));
    // The marker changes nothing: the run still waits, and the signal completes it.
    agent.json(&["signal", "g-1", "lot-ready"]);
    eventually(Duration::from_secs(10), "the run to complete", || {
        (agent.json(&["show", "g-1"])["status"] == "completed").then_some(())
    });
}
