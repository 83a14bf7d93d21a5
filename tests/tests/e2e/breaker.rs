//! Circuit breakers: runs sharing a failing target stop hammering it while its breaker is open;
//! the hold is visible in status, in `show` and in history; runs finish once it recovers, also
//! across a SIGKILL.

use std::time::Duration;

use outpost_tests::{Agent, events, eventually, write};

#[test]
fn an_open_breaker_holds_every_run_using_the_target_and_recovery_completes_them() {
    let dir = tempfile::tempdir().unwrap();
    let (flag, log) = (dir.path().join("plc-down"), dir.path().join("attempts.log"));
    let def = format!(
        r#"
name: plc
version: 1
steps:
  - id: write
    action: exec
    resource: plc-1
    args:
      command: sh
      args: ["-c", "echo $OUTPOST_RUN_ID >> {log}; if [ -f {flag} ]; then echo 'PLC not answering' >&2; exit 1; fi"]
    retry: {{max_attempts: 100, initial_interval: 100ms, backoff: 1.0, max_interval: 100ms, jitter: 0}}
"#,
        log = log.display(),
        flag = flag.display()
    );
    std::fs::write(&flag, "").unwrap();
    let flags = [
        "--breaker-threshold",
        "3",
        "--breaker-cooldown",
        "1s",
        "--resource",
        "plc-1=3",
    ];
    let mut agent = Agent::start(&dir.path().join("data"), &flags);
    agent.json(&["apply", &write(dir.path(), "plc.yaml", &def)]);
    for i in 0..3 {
        agent.json(&["start", "plc", "--id", &format!("p{i}")]);
    }
    std::thread::sleep(Duration::from_millis(3000));
    // Without the breaker: 3 runs × 10 attempts/s × 3 s = 90 attempts.
    let attempts = std::fs::read_to_string(&log).unwrap().lines().count();
    assert!(
        (3..=12).contains(&attempts),
        "{attempts} attempts in 3 s against a dead target"
    );

    let status = agent.json(&["status"]);
    let b = &status["breakers"][0];
    assert_eq!(b["target"], "plc-1", "{status}");
    assert!(b["state"] == "open" || b["state"] == "half_open", "{b}");
    assert!(b["last_error"].as_str().unwrap().contains("PLC not answering"), "{b}");
    let run = eventually(Duration::from_secs(5), "a held run", || {
        let r = agent.json(&["show", "p0"]);
        r["waiting"]
            .as_str()
            .is_some_and(|w| w.contains("by the open circuit breaker of 'plc-1'"))
            .then_some(r)
    });
    let deferred = events(&run, "attempt_deferred", "write");
    assert!(!deferred.is_empty() && deferred[0]["target"] == "plc-1", "{run}");

    agent.kill9();
    std::fs::remove_file(&flag).unwrap();
    agent.restart();
    for i in 0..3 {
        eventually(Duration::from_secs(20), "the runs to complete", || {
            (agent.json(&["show", &format!("p{i}")])["status"] == "completed").then_some(())
        });
    }
    let status = agent.json(&["status"]);
    assert_eq!(status["breakers"][0]["state"], "closed", "{status}");
}
