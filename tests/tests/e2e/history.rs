//! Bounded history: a loop of 100,000 iterations continues as new every 500, survives SIGKILL
//! in the middle, ends with the exact total, and retention keeps the journal file bounded.

use std::time::Duration;

use outpost_tests::{Agent, eventually, write};
use serde_json::{Value, json};

const LOOP: &str = r#"
name: poll
version: 1
kind: state_machine
steps:
  - id: read
    action: set
    args: {reading: "{{ steps.read.visits % 7 }}"}
    choices:
      - when: input.done + steps.read.visits >= input.target
        next: finish
      - when: steps.read.visits >= 500
        next: pause
    default: read
  - id: pause
    action: sleep
    args: {duration: 30ms}
    next: again
  - id: again
    action: continue_as_new
    args:
      input: {done: "{{ input.done + steps.read.visits }}", target: "{{ input.target }}"}
    end: succeed
  - id: finish
    action: set
    args: {total: "{{ input.done + steps.read.visits }}"}
    end: succeed
"#;

/// The journal file stays under this after 100,000 iterations (about 101,000 events; measured
/// 2.2 MB with a 1 MiB retention budget).
const BOUND_BYTES: u64 = 4 * 1024 * 1024;

#[test]
fn a_hundred_thousand_iterations_keep_the_journal_bounded_across_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let flags = ["--retention-max-mb", "1", "--prune-interval", "200ms"];
    let mut agent = Agent::start(&data, &flags);
    agent.json(&["apply", &write(dir.path(), "poll.yaml", LOOP)]);
    agent.json(&[
        "start",
        "poll",
        "--id",
        "poll",
        "--input",
        r#"{"done": 0, "target": 100000}"#,
    ]);

    // Kill in the middle of the chain.
    eventually(Duration::from_secs(60), "the chain to reach its 60th link", || {
        let list = agent.json(&["list", "--status", "running"]);
        list.as_array()
            .unwrap()
            .iter()
            .filter_map(|r| r["run_id"].as_str()?.strip_prefix("poll~")?.parse::<u32>().ok())
            .find(|n| *n >= 60)
    });
    agent.kill9();
    agent.restart();

    let last = eventually(Duration::from_secs(120), "the chain to finish", || {
        let list = agent.json(&["list", "--status", "completed", "--limit", "5"]);
        list.as_array()
            .unwrap()
            .iter()
            .find(|r| r["workflow"] == "poll")
            .cloned()
    });
    let id = last["run_id"].as_str().unwrap().to_string();
    assert_eq!(id, "poll~200", "100,000 / 500 links");
    let run: Value = agent.json(&["show", &id, "--history"]);
    assert_eq!(run["output"], json!({"total": 100000}), "{}", run["output"]);
    assert_eq!(run["input"], json!({"done": 99500, "target": 100000}));
    // The last link's own history: start, 500 readings, finish, end.
    let types: Vec<&str> = run["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["type"].as_str().unwrap())
        .collect();
    assert_eq!(types.len(), 503, "{types:?}");
    assert_eq!(types.iter().filter(|t| **t == "step_completed").count(), 501);
    assert_eq!(run["steps"][0]["visits"], 500);

    // Every earlier link ended `continued`; retention deleted most of them.
    let all = agent.json(&["list", "--limit", "1000"]);
    let links: Vec<&Value> = all
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["workflow"] == "poll")
        .collect();
    assert!(
        links
            .iter()
            .all(|r| r["status"] == "continued" || r["run_id"] == "poll~200"),
        "{all}"
    );
    assert!(links.len() < 100, "retention kept {} of 200 links", links.len());
    let status = agent.json(&["status"]);
    let bytes = status["journal"]["file_bytes"].as_u64().unwrap();
    assert!(
        bytes < BOUND_BYTES,
        "journal file is {bytes} bytes after 100,000 iterations"
    );
    eprintln!(
        "journal file after 100,000 iterations: {bytes} bytes; {} links kept",
        links.len()
    );
}
