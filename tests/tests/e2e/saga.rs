//! Sagas: a failed run undoes its completed steps newest first, durably across SIGKILL.

use std::time::Duration;

use outpost_tests::{Agent, events, eventually, write};

#[test]
fn compensations_run_newest_first_and_survive_sigkill_mid_compensation() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("effects.log");
    let log = log.display();
    // Every effect appends "what,key" to the log; undoing the hotel takes 1.5 s so the kill lands in it.
    let effect = |what: &str, extra: &str| {
        format!(
            "{{action: exec, args: {{command: sh, args: ['-c', 'echo \"{what},$OUTPOST_IDEMPOTENCY_KEY\" >> {log}{extra}']}}}}"
        )
    };
    let flight = format!(
        "  - id: flight\n    action: exec\n    args: {{command: sh, args: ['-c', 'echo book-flight >> {log}']}}\n    compensate: {}\n    next: hotel\n",
        effect("undo-flight", "")
    );
    let hotel = format!(
        "  - id: hotel\n    action: exec\n    args: {{command: sh, args: ['-c', 'echo book-hotel >> {log}']}}\n    compensate: {}\n    next: card\n",
        effect(
            "undo-hotel-start",
            &format!("; sleep 1.5; echo undo-hotel-done >> {log}")
        )
    );
    let card = "  - id: card\n    action: exec\n    args: {command: sh, args: ['-c', 'echo declined >&2; exit 3']}\n    end: succeed\n";
    let def = format!("name: trip\nversion: 1\nkind: state_machine\nsteps:\n{flight}{hotel}{card}");
    let file = write(dir.path(), "trip.yaml", &def);
    let data = dir.path().join("data");
    let mut agent = Agent::start(&data, &[]);
    agent.json(&["apply", &file]);
    agent.json(&["start", "trip", "--id", "trip-1"]);

    let read = || std::fs::read_to_string(dir.path().join("effects.log")).unwrap_or_default();
    eventually(Duration::from_secs(10), "the hotel's compensation to start", || {
        read().contains("undo-hotel-start").then_some(())
    });
    agent.kill9();
    assert!(
        !read().contains("undo-hotel-done"),
        "the kill landed after the compensation finished"
    );
    agent.restart();

    let run = eventually(Duration::from_secs(15), "the run to end", || {
        let r = agent.json(&["show", "trip-1"]);
        (r["status"] != "running").then_some(r)
    });
    assert_eq!(run["status"], "compensated", "{run}");
    assert!(run["error"]["message"].as_str().unwrap().contains("declined"), "{run}");

    let lines: Vec<String> = read().lines().map(str::to_string).collect();
    let pos = |p: &str| {
        lines
            .iter()
            .position(|l| l.starts_with(p))
            .unwrap_or_else(|| panic!("{p} missing: {lines:?}"))
    };
    // Newest first: the hotel is undone (completely) before the flight.
    assert!(pos("book-flight") < pos("book-hotel"));
    assert!(pos("undo-hotel-done") < pos("undo-flight"), "{lines:?}");
    // The interrupted compensation ran again under the same key; the flight's ran once.
    let hotel_keys: Vec<&String> = lines.iter().filter(|l| l.starts_with("undo-hotel-start")).collect();
    assert_eq!(hotel_keys.len(), 2, "{lines:?}");
    assert!(
        hotel_keys.iter().all(|l| l.ends_with("trip-1/hotel/1/compensate")),
        "{lines:?}"
    );
    assert_eq!(lines.iter().filter(|l| l.starts_with("undo-flight")).count(), 1);

    assert_eq!(events(&run, "step_compensated", "hotel").len(), 1, "{run}");
    assert_eq!(events(&run, "step_compensated", "flight").len(), 1, "{run}");
    assert_eq!(events(&run, "compensation_attempt_started", "hotel").len(), 2, "{run}");
    let steps = run["steps"].as_array().unwrap();
    assert_eq!(steps[0]["compensation"], "compensated");
    assert_eq!(steps[1]["compensation"], "compensated");
}

#[test]
fn a_compensation_that_keeps_failing_ends_the_run_compensation_failed() {
    let dir = tempfile::tempdir().unwrap();
    let def = concat!(
        "name: t\nversion: 1\nkind: state_machine\nsteps:\n",
        "  - id: a\n    action: exec\n    args: {command: 'true'}\n",
        "    compensate: {action: exec, args: {command: sh, args: ['-c', 'echo refund service down >&2; exit 1']}, retry: {max_attempts: 2, initial_interval: 100ms}}\n",
        "    next: b\n",
        "  - id: b\n    action: fail\n    args: {error: order.rejected, message: out of stock}\n    end: succeed\n",
    );
    let file = write(dir.path(), "t.yaml", def);
    let agent = Agent::start(&dir.path().join("data"), &[]);
    agent.json(&["apply", &file]);
    let out = agent.cli(&["start", "t", "--id", "t-1", "--wait"]);
    assert_eq!(out.status.code(), Some(6), "{}", String::from_utf8_lossy(&out.stdout));
    let run = agent.json(&["show", "t-1"]);
    assert_eq!(run["status"], "compensation_failed", "{run}");
    let msg = run["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("compensation of step 'a' failed") && msg.contains("refund service down"),
        "{msg}"
    );
    assert_eq!(events(&run, "compensation_attempt_failed", "a").len(), 2, "{run}");
}
