//! Backpressure: run limits with a bounded, durable admission queue; activity limits per resource.

use std::time::Duration;

use outpost_tests::{Agent, eventually, write};
use serde_json::Value;

/// Most lines of "start" not yet matched by "end" at any point of the log after line `from`.
fn max_overlap(log: &std::path::Path, from: usize) -> i64 {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let mut cur = 0i64;
    let mut max = 0;
    for l in text.lines().skip(from) {
        cur += if l.starts_with("start") { 1 } else { -1 };
        max = max.max(cur);
    }
    max
}

fn work(name: &str, log: &std::path::Path, extra: &str) -> String {
    format!(
        "name: {name}\nversion: 1\n{extra}steps:\n  - id: work\n    action: exec\n    args: {{command: sh, args: ['-c', 'echo start >> {log}; sleep 1; echo end >> {log}']}}\n",
        log = log.display()
    )
}

#[test]
fn run_limit_queues_durably_rejects_beyond_the_queue_and_shows_why() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("runs.log");
    let flags = ["--max-runs", "2", "--queue", "3"];
    let mut agent = Agent::start(&dir.path().join("data"), &flags);
    agent.json(&["apply", &write(dir.path(), "w.yaml", &work("w", &log, ""))]);
    for i in 0..5 {
        agent.json(&["start", "w", "--id", &format!("r{i}")]);
    }
    let out = agent.cli(&["start", "w", "--id", "r5"]);
    assert_eq!(out.status.code(), Some(9), "{}", String::from_utf8_lossy(&out.stderr));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("limit of 2 concurrent runs") && err.contains("admission queue is full"),
        "{err}"
    );
    assert!(
        agent.cli(&["show", "r5"]).status.code() == Some(4),
        "a rejected start journals nothing"
    );

    let status = agent.json(&["status"]);
    assert_eq!(status["limits"]["runs"]["queued"], 3, "{status}");
    assert_eq!(status["limits"]["runs"]["active"], 2, "{status}");
    let list = agent.json(&["list"]);
    let queued = list
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| {
            r["status"] == "queued"
                && r["waiting"]
                    .as_str()
                    .is_some_and(|w| w.starts_with("queued: the agent is at its limit"))
        })
        .count();
    assert_eq!(queued, 3, "{list}");
    let running = list
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["status"] == "running")
        .count();
    assert_eq!(running, 2, "a queued run is not listed as running: {list}");

    // Queued runs are journaled: a SIGKILL loses none of them, and the limit holds after restart.
    assert_eq!(max_overlap(&log, 0), 2);
    agent.kill9();
    // Killed with the agent, the running commands never log their end.
    let at_kill = std::fs::read_to_string(&log).unwrap_or_default().lines().count();
    agent.restart();
    for i in 0..5 {
        eventually(Duration::from_secs(30), "every run to complete", || {
            let r: Value = agent.json(&["show", &format!("r{i}")]);
            (r["status"] == "completed").then_some(())
        });
    }
    let lines = std::fs::read_to_string(&log).unwrap();
    assert_eq!(lines.lines().filter(|l| *l == "end").count(), 5, "{lines}");
    assert!(
        max_overlap(&log, at_kill) <= 2,
        "more than 2 runs ran at once: {}",
        std::fs::read_to_string(&log).unwrap()
    );
}

#[test]
fn workflow_and_resource_limits_serialise_their_work() {
    let dir = tempfile::tempdir().unwrap();
    let (wlog, rlog) = (dir.path().join("wf.log"), dir.path().join("res.log"));
    let agent = Agent::start(
        &dir.path().join("data"),
        &["--resource", "rs485=1", "--when-full", "reject"],
    );
    agent.json(&[
        "apply",
        &write(dir.path(), "one.yaml", &work("one", &wlog, "limits: {max_runs: 1}\n")),
    ]);
    let bus = work("bus", &rlog, "").replace("    action: exec\n", "    action: exec\n    resource: rs485\n");
    agent.json(&["apply", &write(dir.path(), "bus.yaml", &bus)]);

    agent.json(&["start", "one", "--id", "o1"]);
    let out = agent.cli(&["start", "one", "--id", "o2"]);
    assert_eq!(out.status.code(), Some(9));
    assert!(String::from_utf8_lossy(&out.stderr).contains("workflow 'one' is at its limit of 1 concurrent runs"));

    for i in 0..3 {
        agent.json(&["start", "bus", "--id", &format!("b{i}")]);
    }
    let held = eventually(Duration::from_secs(5), "a step to queue behind the resource", || {
        let list = agent.json(&["list"]);
        list.as_array().unwrap().iter().find_map(|r| {
            r["waiting"]
                .as_str()
                .filter(|w| w.contains("resource 'rs485' (1 at once)"))
                .map(str::to_string)
        })
    });
    assert!(held.starts_with("work: queued behind the limit"), "{held}");
    let status = agent.json(&["status"]);
    let res = &status["limits"]["resources"][0];
    assert_eq!(
        (res["name"].as_str(), res["limit"].as_u64()),
        (Some("rs485"), Some(1)),
        "{status}"
    );
    for i in 0..3 {
        eventually(Duration::from_secs(20), "the bus runs to complete", || {
            (agent.json(&["show", &format!("b{i}")])["status"] == "completed").then_some(())
        });
    }
    assert_eq!(max_overlap(&rlog, 0), 1, "{}", std::fs::read_to_string(&rlog).unwrap());
}
