//! Child workflows and parallel map: deterministic child ids, exactly one child per step visit
//! across SIGKILL, cancellation reaching children, outputs in input order, failure tolerance.

use std::time::Duration;

use outpost_tests::{Agent, eventually, write};
use serde_json::{Value, json};

/// Polls `show RUN` until `f` holds; a run that does not exist yet (a child about to start) is
/// polled again.
fn until(agent: &Agent, run: &str, what: &str, f: impl Fn(&Value) -> bool) -> Value {
    eventually(Duration::from_secs(30), what, || {
        let out = agent.cli(&["show", run, "--json"]);
        let r: Value = serde_json::from_slice(&out.stdout)
            .ok()
            .filter(|_| out.status.success())?;
        f(&r).then_some(r)
    })
}

fn runs(agent: &Agent) -> Vec<Value> {
    agent.json(&["list", "--limit", "1000"]).as_array().unwrap().clone()
}

#[test]
fn a_child_workflow_starts_once_across_sigkill_and_returns_its_output() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("child.log");
    let defs = format!(
        r#"
name: batch
version: 1
steps:
  - id: cook
    action: exec
    args:
      command: sh
      args: ["-c", "echo \"$OUTPOST_RUN_ID\" >> {}; sleep 1.5; echo '{{\"kg\": {{{{ input.kg }}}}}}'"]
output: "{{{{ steps.cook.output.json }}}}"
"#,
        log.display()
    );
    let parent = r#"
name: plant
version: 1
steps:
  - id: batch
    action: workflow
    args: {workflow: batch, input: {kg: "{{ input.kg }}"}}
  - id: report
    action: set
    depends_on: [batch]
    args: {made: "{{ steps.batch.output.kg }}"}
"#;
    let mut agent = Agent::start(&dir.path().join("data"), &[]);
    agent.json(&["apply", &write(dir.path(), "batch.yaml", &defs)]);
    agent.json(&["apply", &write(dir.path(), "plant.yaml", parent)]);
    agent.json(&["start", "plant", "--id", "p1", "--input", r#"{"kg": 12}"#]);
    eventually(Duration::from_secs(10), "the child to run", || {
        std::fs::read_to_string(&log).ok().filter(|s| !s.is_empty())
    });
    agent.kill9();
    agent.restart();
    let run = until(&agent, "p1", "the parent to finish", |r| r["status"] != "running");
    assert_eq!(run["status"], "completed", "{run}");
    assert_eq!(run["output"], json!({"made": 12}));
    let all = runs(&agent);
    let ids: Vec<&str> = all.iter().map(|r| r["run_id"].as_str().unwrap()).collect();
    assert_eq!(ids.len(), 2, "exactly one child run: {ids:?}");
    assert!(ids.contains(&"p1:batch:1"), "deterministic child id: {ids:?}");
    // The child's interrupted step re-ran inside the same child run.
    let lines = std::fs::read_to_string(&log).unwrap();
    assert!(lines.lines().all(|l| l == "p1:batch:1"), "{lines}");
}

#[test]
fn cancelling_the_parent_cancels_its_child() {
    let dir = tempfile::tempdir().unwrap();
    let child = "name: slow\nversion: 1\nsteps:\n  - {id: nap, action: sleep, args: {duration: 1h}}\n";
    let parent = "name: p\nversion: 1\nsteps:\n  - {id: c, action: workflow, args: {workflow: slow}}\n";
    let agent = Agent::start(&dir.path().join("data"), &[]);
    agent.json(&["apply", &write(dir.path(), "slow.yaml", child)]);
    agent.json(&["apply", &write(dir.path(), "p.yaml", parent)]);
    agent.json(&["start", "p", "--id", "p2"]);
    until(&agent, "p2:c:1", "the child to sleep", |r| {
        r["waiting"].as_str().is_some_and(|w| w.contains("sleeping"))
    });
    agent.json(&["cancel", "p2"]);
    let child = until(&agent, "p2:c:1", "the child to stop", |r| r["status"] != "running");
    assert_eq!(child["status"], "cancelled", "{child}");
}

const ITEM: &str = r#"
name: item
version: 1
steps:
  - id: work
    action: exec
    args:
      command: sh
      args: ["-c", "echo start >> LOG; sleep 0.4; echo end >> LOG; [ {{ input.item }} -ne {{ input.bad | default(-1) }} ] || exit 1"]
output: "{{ input.item * 10 }}"
"#;

/// Applies the `item` workflow, logging to `log`.
fn apply_item(agent: &Agent, dir: &std::path::Path, log: &std::path::Path) {
    let text = ITEM.replace("LOG", &log.display().to_string());
    agent.json(&["apply", &write(dir, "item.yaml", &text)]);
}

fn map_parent(tolerate: u32) -> String {
    format!(
        r#"
name: fan
version: 1
steps:
  - id: each
    action: map
    args: {{items: "{{{{ input.items }}}}", workflow: item, concurrency: 3, tolerate: {tolerate}, input: {{bad: "{{{{ input.bad }}}}"}}}}
"#
    )
}

#[test]
fn map_caps_concurrency_keeps_order_and_starts_each_item_once_across_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("map.log");
    let mut agent = Agent::start(&dir.path().join("data"), &[]);
    apply_item(&agent, dir.path(), &log);
    agent.json(&["apply", &write(dir.path(), "fan.yaml", &map_parent(0))]);
    let items: Vec<u32> = (0..12).collect();
    let input = json!({"items": items, "bad": -1}).to_string();
    agent.json(&["start", "fan", "--id", "m1", "--input", &input]);

    // Concurrency: never more than 3 items in flight (before any kill).
    let mut max = 0;
    let t0 = std::time::Instant::now();
    while t0.elapsed() < Duration::from_millis(1200) {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let started = text.lines().filter(|l| *l == "start").count() as i64;
        let ended = text.lines().filter(|l| *l == "end").count() as i64;
        max = max.max(started - ended);
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!((1..=3).contains(&max), "in flight at once: {max}");
    agent.kill9();
    agent.restart();

    let run = until(&agent, "m1", "the map to finish", |r| r["status"] != "running");
    assert_eq!(run["status"], "completed", "{run}");
    let expected: Vec<u32> = items.iter().map(|i| i * 10).collect();
    assert_eq!(
        run["output"]["results"],
        json!(expected),
        "outputs in input order: {run}"
    );
    assert_eq!(run["output"]["failed"], json!([]));
    let children: Vec<String> = runs(&agent)
        .iter()
        .map(|r| r["run_id"].as_str().unwrap().to_string())
        .filter(|id| id.starts_with("m1:each:1:"))
        .collect();
    assert_eq!(children.len(), items.len(), "one child per item: {children:?}");
}

#[test]
fn map_tolerates_up_to_n_failures_and_fails_fast_beyond() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("map.log");
    let agent = Agent::start(&dir.path().join("data"), &[]);
    apply_item(&agent, dir.path(), &log);
    agent.json(&["apply", &write(dir.path(), "fan1.yaml", &map_parent(1))]);
    let input = json!({"items": [1, 2, 3, 4], "bad": 3}).to_string();
    let out = agent.cli(&["start", "fan", "--id", "tol", "--input", &input, "--wait"]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stdout));
    let run = agent.json(&["show", "tol"]);
    assert_eq!(run["output"]["results"], json!([10, 20, null, 40]), "{run}");
    assert_eq!(run["output"]["failed"][0]["index"], 2);

    let strict = map_parent(0).replace("version: 1", "version: 2");
    agent.json(&["apply", &write(dir.path(), "fan2.yaml", &strict)]);
    let input = json!({"items": [3, 1, 2, 4, 5, 6, 7, 8], "bad": 3}).to_string();
    let out = agent.cli(&["start", "fan", "--id", "strict", "--input", &input, "--wait"]);
    assert_eq!(out.status.code(), Some(6));
    let run = agent.json(&["show", "strict"]);
    let msg = run["error"]["message"].as_str().unwrap();
    assert!(msg.contains("map.failed") && msg.contains("item 0"), "{msg}");
    // Fail fast: not every item was started.
    let started = runs(&agent)
        .iter()
        .filter(|r| r["run_id"].as_str().unwrap().starts_with("strict:"))
        .count();
    assert!(started < 8, "{started} of 8 items started after the first failure");
}

/// A syncing agent with a 20-event outbox cap, through a proxy the test can cut.
fn capped(dir: &std::path::Path, device: &str) -> (outpost_tests::cloud::Cloud, outpost_tests::cloud::Proxy, Agent) {
    let cloud = outpost_tests::cloud::Cloud::embedded(&dir.join("cloud"));
    let proxy = outpost_tests::cloud::Proxy::start(cloud.mqtt);
    let flags = [
        "--broker",
        &proxy.url(),
        "--device-id",
        device,
        "--outbox-max-events",
        "20",
    ];
    let agent = Agent::start(&dir.join("data"), &flags);
    cloud.wait_presence(device, true, Duration::from_secs(20));
    (cloud, proxy, agent)
}

/// Starts `leaf` runs until the outbox cap refuses one (the link must be cut).
fn fill_outbox(agent: &Agent) {
    let filled = (0..20).any(|_| !agent.cli(&["start", "leaf"]).status.success());
    assert!(filled, "the outbox never filled");
}

#[test]
fn a_child_run_waits_for_room_in_the_sync_outbox() {
    let dir = tempfile::tempdir().unwrap();
    let (_cloud, proxy, agent) = capped(dir.path(), "gw-cap");
    let child = "name: leaf\nversion: 1\nsteps:\n  - {id: a, action: set, args: {ok: true}}\n";
    let parent = "name: tree\nversion: 1\nsteps:\n  - {id: nap, action: sleep, args: {duration: 1s}}\n  - {id: kid, action: workflow, depends_on: [nap], args: {workflow: leaf}}\n";
    agent.json(&["apply", &write(dir.path(), "leaf.yaml", child)]);
    agent.json(&["apply", &write(dir.path(), "tree.yaml", parent)]);
    proxy.cut();
    agent.json(&["start", "tree", "--id", "t1"]);
    // Fill the outbox past its cap while the parent sleeps.
    fill_outbox(&agent);
    std::thread::sleep(Duration::from_secs(3));
    let ids: Vec<String> = runs(&agent)
        .iter()
        .map(|r| r["run_id"].as_str().unwrap().to_string())
        .collect();
    assert!(
        !ids.iter().any(|i| i == "t1:kid:1"),
        "the child started past the outbox cap: {ids:?}"
    );
    assert_eq!(agent.json(&["show", "t1"])["status"], "running");
    // The link returns, the cloud acknowledges, the child starts and the parent finishes.
    proxy.restore();
    let run = until(&agent, "t1", "the parent to finish", |r| r["status"] != "running");
    assert_eq!(run["status"], "completed", "{run}");
}

#[test]
fn continue_as_new_waits_for_room_in_the_sync_outbox() {
    let dir = tempfile::tempdir().unwrap();
    let (_cloud, proxy, agent) = capped(dir.path(), "gw-can");
    let looped = r#"
name: again
version: 1
kind: state_machine
steps:
  - id: nap
    action: sleep
    args: {duration: 1s}
    choices:
      - when: input.n >= 1
        next: done
    default: next
  - id: next
    action: continue_as_new
    args: {input: {n: "{{ input.n + 1 }}"}}
    end: succeed
  - id: done
    action: set
    args: {n: "{{ input.n }}"}
    end: succeed
"#;
    let leaf = "name: leaf\nversion: 1\nsteps:\n  - {id: a, action: set, args: {ok: true}}\n";
    agent.json(&["apply", &write(dir.path(), "again.yaml", looped)]);
    agent.json(&["apply", &write(dir.path(), "leaf.yaml", leaf)]);
    proxy.cut();
    agent.json(&["start", "again", "--id", "g1", "--input", r#"{"n": 0}"#]);
    fill_outbox(&agent);
    std::thread::sleep(Duration::from_secs(3));
    let again: Vec<Value> = runs(&agent).into_iter().filter(|r| r["workflow"] == "again").collect();
    assert_eq!(again.len(), 1, "the next run started past the outbox cap: {again:?}");
    assert_eq!(again[0]["status"], "running");
    proxy.restore();
    eventually(Duration::from_secs(40), "the continued run to finish", || {
        let again: Vec<Value> = runs(&agent).into_iter().filter(|r| r["workflow"] == "again").collect();
        (again.len() == 2
            && again
                .iter()
                .all(|r| r["status"] == "completed" || r["status"] == "continued"))
        .then_some(())
    });
}
