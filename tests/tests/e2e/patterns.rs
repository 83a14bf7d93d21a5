//! Engine behaviour through the real binary: DAG order, choice and loops, retries with backoff,
//! non-retryable errors and timeouts.

use outpost_tests::{Agent, events, ts_ms, write};
use serde_json::Value;

fn run(agent: &Agent, workflow: &str, input: &str) -> Value {
    let out = agent.cli(&[
        "start",
        workflow,
        "--input",
        input,
        "--wait",
        "--timeout",
        "60",
        "--json",
    ]);
    let v: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    agent.json(&["show", v["run_id"].as_str().unwrap()])
}

#[test]
fn dag_choice_loop_retries_and_timeouts() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display().to_string();
    let files = [
        write(
            dir.path(),
            "fan.yaml",
            "name: fan\nversion: 1\nsteps:\n  - {id: a, action: exec, args: {command: sh, args: ['-c', 'sleep 0.1']}}\n  - {id: b, action: exec, depends_on: [a], args: {command: sh, args: ['-c', 'sleep 0.3; echo 2']}}\n  - {id: c, action: exec, depends_on: [a], args: {command: sh, args: ['-c', 'sleep 0.3; echo 3']}}\n  - {id: d, action: set, depends_on: [b, c], args: {sum: '{{ steps.b.output.json + steps.c.output.json }}'}}\n",
        ),
        write(
            dir.path(),
            "flaky.yaml",
            &format!(
                "name: flaky\nversion: 1\nsteps:\n  - id: f\n    action: exec\n    args: {{command: sh, args: ['-c', 'n=$(cat {d}/count 2>/dev/null || echo 0); n=$((n+1)); echo $n > {d}/count; [ $n -ge 3 ]']}}\n    retry: {{max_attempts: 5, initial_interval: 300ms, backoff: 2, jitter: 0}}\n"
            ),
        ),
        write(
            dir.path(),
            "fatal.yaml",
            "name: fatal\nversion: 1\nsteps:\n  - id: f\n    action: exec\n    args: {command: sh, args: ['-c', 'exit 3']}\n    retry: {max_attempts: 5, initial_interval: 100ms, non_retryable: [exec.nonzero_exit]}\n",
        ),
        write(
            dir.path(),
            "slow.yaml",
            "name: slow\nversion: 1\nsteps:\n  - id: s\n    action: exec\n    args: {command: sleep, args: ['30']}\n    timeout: 300ms\n    retry: {max_attempts: 2, initial_interval: 100ms}\n",
        ),
        write(
            dir.path(),
            "poll.yaml",
            &format!(
                "name: poll\nversion: 1\nkind: state_machine\nstart: read\nsteps:\n  - id: read\n    action: exec\n    args: {{command: sh, args: ['-c', 'n=$(cat {d}/level 2>/dev/null || echo 0); n=$((n+1)); echo $n > {d}/level; echo $n']}}\n    choices:\n      - {{when: 'steps.read.output.json >= input.target', next: done}}\n    default: pause\n  - {{id: pause, action: sleep, args: {{duration: 50ms}}, next: read}}\n  - {{id: done, action: set, args: {{level: '{{{{ steps.read.output.json }}}}', reads: '{{{{ steps.read.visits }}}}'}}, end: succeed}}\n"
            ),
        ),
    ];
    let agent = Agent::start(&dir.path().join("data"), &[]);
    for f in &files {
        agent.json(&["apply", f]);
    }

    let fan = run(&agent, "fan", "{}");
    assert_eq!(fan["status"], "completed");
    assert_eq!(fan["output"], serde_json::json!({"sum": 5}));
    let starts = |s: &str| ts_ms(&events(&fan, "attempt_started", s)[0]["at"]);
    let ends = |s: &str| ts_ms(&events(&fan, "step_completed", s)[0]["at"]);
    assert!(
        starts("b") >= ends("a") && starts("c") >= ends("a"),
        "b and c start after a"
    );
    assert!(
        starts("c") < ends("b") && starts("b") < ends("c"),
        "b and c ran in parallel"
    );
    assert!(ends("d") >= ends("b").max(ends("c")), "d after both");

    let flaky = run(&agent, "flaky", "{}");
    assert_eq!(flaky["status"], "completed", "{flaky}");
    let failed = events(&flaky, "attempt_failed", "f");
    assert_eq!(failed.len(), 2);
    let started = events(&flaky, "attempt_started", "f");
    assert_eq!(started.len(), 3);
    for (k, backoff) in [(0usize, 300u64), (1, 600)] {
        let retry_at = ts_ms(&failed[k]["retry_at"]);
        // The failure came after its attempt started; records are stamped when committed.
        assert!(
            retry_at >= ts_ms(&started[k]["at"]) + backoff,
            "backoff {k} recorded in history"
        );
        assert!(
            ts_ms(&started[k + 1]["at"]) + 5 >= retry_at,
            "attempt {} waited for its backoff",
            k + 2
        );
    }

    let fatal = run(&agent, "fatal", "{}");
    assert_eq!(fatal["status"], "failed");
    assert_eq!(
        events(&fatal, "attempt_started", "f").len(),
        1,
        "non-retryable: one attempt"
    );
    assert_eq!(fatal["error"]["kind"], "step_failed");

    let slow = run(&agent, "slow", "{}");
    assert_eq!(slow["status"], "failed");
    assert_eq!(slow["steps"][0]["error"]["kind"], "timeout");
    assert_eq!(events(&slow, "attempt_started", "s").len(), 2);
    assert!(
        slow["duration_ms"].as_u64().unwrap() < 5000,
        "timeouts cut the 30 s command short"
    );

    let poll = run(&agent, "poll", r#"{"target": 3}"#);
    assert_eq!(poll["status"], "completed", "{poll}");
    assert_eq!(poll["output"], serde_json::json!({"level": 3, "reads": 3}));
    assert_eq!(events(&poll, "step_completed", "pause").len(), 2);
}

#[test]
fn cancel_stops_the_running_command_and_records_why() {
    let dir = tempfile::tempdir().unwrap();
    let pidfile = dir.path().join("pid");
    let f = write(
        dir.path(),
        "long.yaml",
        &format!(
            "name: long\nversion: 1\nsteps:\n  - id: work\n    action: exec\n    args: {{command: sh, args: ['-c', 'echo $$ > {}; exec sleep 60']}}\n",
            pidfile.display()
        ),
    );
    let agent = Agent::start(&dir.path().join("data"), &[]);
    agent.json(&["apply", &f]);
    agent.json(&["start", "long", "--id", "long-1"]);
    let pid: u32 = outpost_tests::eventually(std::time::Duration::from_secs(10), "the command to start", || {
        std::fs::read_to_string(&pidfile)
            .ok()
            .and_then(|s| s.trim().parse().ok())
    });
    let out = agent.cli(&["cancel", "long-1", "--reason", "line stopped"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let run = agent.json(&["show", "long-1"]);
    assert_eq!(run["status"], "cancelled");
    assert_eq!(run["error"]["message"], "line stopped");
    outpost_tests::eventually(std::time::Duration::from_secs(5), "the command to be killed", || {
        let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // Gone, or a zombie waiting to be reaped.
        (state.is_empty() || state.contains(") Z")).then_some(())
    });
    let again = agent.cli(&["cancel", "long-1"]);
    assert_eq!(again.status.code(), Some(7), "cancelling a finished run is a conflict");
}
