//! Signals, approval gates and operator controls, each surviving SIGKILL of the agent.

use std::time::Duration;

use outpost_tests::{Agent, events, eventually, write};
use serde_json::Value;

/// `local:<the Unix user running the tests>`: how the agent records a decision made through
/// its socket.
fn local_me() -> String {
    let out = std::process::Command::new("id").arg("-un").output().expect("id -un");
    format!("local:{}", String::from_utf8_lossy(&out.stdout).trim())
}

/// The gate workflow; its release step may be decided by `approvers`.
fn gate(approvers: &str) -> String {
    GATE.replace("APPROVERS", approvers)
}

const GATE: &str = r#"
name: gate
version: 1
kind: state_machine
steps:
  - id: prepare
    action: sleep
    args: {duration: 2s}
    next: lot
  - id: lot
    action: wait_signal
    args: {signal: lot-ready}
    next: release
  - id: release
    action: approval
    args: {approvers: [APPROVERS]}
    next: done
  - id: done
    action: set
    args:
      lot: "{{ steps.lot.output.payload.lot }}"
      by: "{{ steps.release.output.by }}"
    end: succeed
"#;

fn show(agent: &Agent, run: &str) -> Value {
    agent.json(&["show", run])
}

fn until(agent: &Agent, run: &str, what: &str, f: impl Fn(&Value) -> bool) -> Value {
    eventually(Duration::from_secs(20), what, || {
        let r = show(agent, run);
        f(&r).then_some(r)
    })
}

fn code(out: &std::process::Output) -> Option<i32> {
    out.status.code()
}

#[test]
fn early_signal_and_approval_survive_sigkill_and_repeats_are_ignored() {
    let dir = tempfile::tempdir().unwrap();
    let me = local_me();
    let file = write(dir.path(), "gate.yaml", &gate(&format!("alice, \"{me}\"")));
    let mut agent = Agent::start(&dir.path().join("data"), &[]);
    agent.json(&["apply", &file]);
    agent.json(&["start", "gate", "--id", "g1"]);

    // The signal arrives while the run still sleeps: it is kept, durably, across a SIGKILL.
    let sent = agent.json(&[
        "signal",
        "g1",
        "lot-ready",
        "--payload",
        r#"{"lot": 42}"#,
        "--id",
        "s-1",
    ]);
    assert_eq!(sent["accepted"], true, "{sent}");
    agent.kill9();
    agent.restart();
    let again = agent.json(&[
        "signal",
        "g1",
        "lot-ready",
        "--payload",
        r#"{"lot": 99}"#,
        "--id",
        "s-1",
    ]);
    assert_eq!(
        again["accepted"], false,
        "a repeated signal id must be ignored: {again}"
    );

    let run = until(&agent, "g1", "the approval gate", |r| {
        r["waiting"]
            .as_str()
            .is_some_and(|w| w.contains("release: waiting for approval"))
    });
    assert_eq!(events(&run, "step_completed", "lot").len(), 1, "{run}");

    // Nobody names themselves: the socket's caller decides as local:<user>.
    let out = agent.cli(&["approve", "g1", "release", "--by", "alice"]);
    assert_eq!(
        code(&out),
        Some(2),
        "--by is gone: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Approving a step that is not an approval is refused.
    let out = agent.cli(&["approve", "g1", "lot"]);
    assert_eq!(code(&out), Some(3));

    agent.kill9();
    agent.restart();
    let ok = agent.json(&["approve", "g1", "release", "--comment", "lot looks fine", "--id", "a-1"]);
    assert_eq!(ok["accepted"], true, "{ok}");
    let run = until(&agent, "g1", "the run to complete", |r| r["status"] == "completed");
    assert_eq!(run["output"], serde_json::json!({"lot": 42, "by": me}), "{run}");
    let signals = outpost_tests::events_of(&run, "signal_received");
    assert_eq!(signals.len(), 2, "one lot signal and one decision: {run}");
    assert_eq!(signals[1]["payload"]["comment"], "lot looks fine");
    assert_eq!(signals[1]["payload"]["by"], me.as_str());
    // Signals sent through the socket name their sender too (one per distinct signal id).
    let from = outpost_tests::events_of(&run, "signal_from");
    assert_eq!(from.len(), 1, "{run}");
    assert_eq!(from[0]["by"], me.as_str(), "{run}");
    // A finished run takes no more signals.
    let out = agent.cli(&["signal", "g1", "lot-ready"]);
    assert_eq!(code(&out), Some(7), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn rejection_fails_the_run_and_retry_resumes_it_from_the_failed_step() {
    let dir = tempfile::tempdir().unwrap();
    let me = local_me();
    let file = write(dir.path(), "gate.yaml", &gate(&format!("\"{me}\"")));
    let mut agent = Agent::start(&dir.path().join("data"), &[]);
    agent.json(&["apply", &file]);
    // A gate only alice may pass: a local decision is refused, saying who may decide.
    let strict = write(
        dir.path(),
        "strict.yaml",
        &gate("alice").replace("name: gate", "name: strict-gate"),
    );
    agent.json(&["apply", &strict]);
    agent.json(&["start", "strict-gate", "--id", "g3"]);
    agent.json(&["signal", "g3", "lot-ready", "--payload", r#"{"lot": 3}"#]);
    until(&agent, "g3", "the strict gate", |r| {
        r["waiting"]
            .as_str()
            .is_some_and(|w| w.contains("waiting for approval"))
    });
    let out = agent.cli(&["approve", "g3", "release"]);
    assert_eq!(code(&out), Some(3), "{}", String::from_utf8_lossy(&out.stderr));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("'{me}' may not decide step 'release' (approvers: alice)")),
        "{err}"
    );
    agent.json(&["start", "gate", "--id", "g2"]);
    agent.json(&["signal", "g2", "lot-ready", "--payload", r#"{"lot": 7}"#]);
    until(&agent, "g2", "the approval gate", |r| {
        r["waiting"]
            .as_str()
            .is_some_and(|w| w.contains("waiting for approval"))
    });
    agent.json(&["approve", "g2", "release", "--reject", "--comment", "wrong colour"]);
    let run = until(&agent, "g2", "the run to fail", |r| r["status"] == "failed");
    assert_eq!(
        run["error"]["message"],
        format!("step 'release' failed: approval.rejected: rejected by {me}: wrong colour")
    );

    // Retry: the failed approval gets a fresh visit (the old rejection does not decide it).
    let out = agent.cli(&["retry", "g2", "--by", "bob"]);
    assert_eq!(code(&out), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let run = until(&agent, "g2", "the gate to wait again", |r| {
        r["waiting"]
            .as_str()
            .is_some_and(|w| w.contains("waiting for approval"))
    });
    assert_eq!(run["status"], "running");
    agent.kill9();
    agent.restart();
    agent.json(&["approve", "g2", "release"]);
    let run = until(&agent, "g2", "the run to complete", |r| r["status"] == "completed");
    assert_eq!(run["output"]["lot"], 7);
    assert_eq!(events(&run, "wait_started", "release").len(), 2, "{run}");
    assert_eq!(
        events(&run, "step_completed", "lot").len(),
        1,
        "completed steps do not re-run: {run}"
    );
    // Only failed runs can be retried.
    let out = agent.cli(&["retry", "g2"]);
    assert_eq!(
        code(&out),
        Some(7),
        "a run that did not fail is a conflict, as approving a finished run is"
    );
}

#[test]
fn a_wait_times_out_across_sigkill_and_terminate_skips_compensation() {
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("compensated-");
    let def = format!(
        r#"
name: timeout
version: 1
kind: state_machine
steps:
  - id: reserve
    action: set
    compensate: {{action: exec, args: {{command: touch, args: ["{}{{{{ run.id }}}}"]}}}}
    next: wait
  - id: wait
    action: wait_signal
    args: {{signal: go, timeout: 3s}}
    end: succeed
"#,
        marker.display()
    );
    let file = write(dir.path(), "t.yaml", &def);
    let mut agent = Agent::start(&dir.path().join("data"), &[]);
    agent.json(&["apply", &file]);
    agent.json(&["start", "timeout", "--id", "t1"]);
    agent.json(&["start", "timeout", "--id", "t2"]);
    until(&agent, "t1", "the wait", |r| {
        r["waiting"]
            .as_str()
            .is_some_and(|w| w.contains("waiting for signal 'go' (times out at"))
    });
    agent.kill9();
    agent.restart();
    // Terminate t2 while it waits: no compensation.
    let out = agent.json(&["terminate", "t2", "--reason", "line stopped"]);
    assert_eq!(out["status"], "terminated", "{out}");
    // t1 times out, fails with signal.timeout and compensates `reserve`.
    let run = until(&agent, "t1", "the timeout", |r| r["status"] != "running");
    assert_eq!(run["status"], "compensated", "{run}");
    assert!(
        run["error"]["message"].as_str().unwrap().contains("signal.timeout"),
        "{run}"
    );
    assert_eq!(events(&run, "timer_fired", "wait").len(), 1, "{run}");
    assert!(dir.path().join("compensated-t1").exists());
    let t2 = show(&agent, "t2");
    let types: Vec<&str> = t2["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["type"].as_str().unwrap())
        .collect();
    assert_eq!(types.last(), Some(&"run_terminated"), "{t2}");
    assert!(!types.iter().any(|t| t.starts_with("compensation")), "{t2}");
    assert!(!dir.path().join("compensated-t2").exists());
}

#[test]
fn a_backing_off_run_says_until_when_and_why_and_keeps_waiting_across_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let def = r#"
name: flaky
version: 1
steps:
  - id: call
    action: exec
    args: {command: sh, args: ["-c", "echo 'PLC busy' >&2; exit 1"]}
    retry: {max_attempts: 3, initial_interval: 30s, jitter: 0}
"#;
    let mut agent = Agent::start(&dir.path().join("data"), &[]);
    agent.json(&["apply", &write(dir.path(), "flaky.yaml", def)]);
    agent.json(&["start", "flaky", "--id", "f1"]);
    let why = |agent: &Agent| {
        until(agent, "f1", "the backoff", |r| {
            r["waiting"].as_str().is_some_and(|w| w.contains("backing off"))
        })["waiting"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let before = why(&agent);
    assert!(
        before.starts_with("call: backing off until ")
            && before.contains("after 1 failed attempt(s)")
            && before.contains("PLC busy"),
        "{before}"
    );
    // The same reason, with the same deadline, after a SIGKILL: the backoff is journaled.
    agent.kill9();
    agent.restart();
    assert_eq!(why(&agent), before);
    let list = agent.json(&["list"]);
    assert_eq!(list[0]["waiting"], before, "list says it too");
}

#[test]
fn signals_nobody_takes_are_bounded_per_run() {
    let dir = tempfile::tempdir().unwrap();
    let def = "name: nap\nversion: 1\nsteps:\n  - {id: z, action: sleep, args: {duration: 1h}}\n";
    let agent = Agent::start(&dir.path().join("data"), &[]);
    agent.json(&["apply", &write(dir.path(), "nap.yaml", def)]);
    agent.json(&["start", "nap", "--id", "n1"]);
    let limit = 256;
    for i in 0..limit {
        let out = agent.cli(&["signal", "n1", "spam", "--id", &format!("s{i}")]);
        assert!(
            out.status.success(),
            "signal {i}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let out = agent.cli(&["signal", "n1", "spam", "--id", "one-too-many"]);
    assert!(!out.status.success(), "signal {limit} was taken");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("already holds 256 signals"), "{err}");
    // A repeat of one it holds is still just a repeat, and the run is unharmed.
    assert!(agent.cli(&["signal", "n1", "spam", "--id", "s0"]).status.success());
    assert_eq!(show(&agent, "n1")["status"], "running");
}
