//! Crash recovery: SIGKILL the agent at random moments while 200 runs execute side effects.

use std::collections::HashMap;
use std::time::Duration;

use outpost_tests::{Agent, events, eventually, write};
use serde_json::Value;

const RUNS: usize = 200;
const STEPS: [&str; 3] = ["a", "b", "c"];

#[test]
fn sigkill_at_random_moments_loses_nothing_and_repeats_only_in_flight_steps() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("effects.log");
    let step = |id: &str, dep: Option<&str>| {
        format!(
            "  - id: {id}\n    action: exec\n{}    args:\n      command: sh\n      args: ['-c', 'echo \"$OUTPOST_RUN_ID,$OUTPOST_STEP,$OUTPOST_IDEMPOTENCY_KEY\" >> {}; sleep 0.2']\n",
            dep.map(|d| format!("    depends_on: [{d}]\n")).unwrap_or_default(),
            log.display()
        )
    };
    let def = format!(
        "name: effects\nversion: 1\nsteps:\n{}{}{}",
        step("a", None),
        step("b", Some("a")),
        step("c", Some("b"))
    );
    let file = write(dir.path(), "effects.yaml", &def);
    let data = dir.path().join("data");
    let mut agent = Agent::start(&data, &[]);
    agent.json(&["apply", &file]);

    // Start every run; a start interrupted by a kill is simply repeated (same id → same run).
    let mut started = 0;
    let mut kills = Vec::new();
    let mut rng = fastrand::Rng::with_seed(7);
    let mut next_kill = rng.usize(20..120);
    while started < RUNS {
        let id = format!("run-{started:03}");
        if agent.cli(&["start", "effects", "--id", &id]).status.success() {
            started += 1;
        }
        if started == next_kill {
            kills.push(count_lines(&log));
            agent.kill9();
            agent.restart();
            next_kill = started + rng.usize(40..120);
        }
    }
    // Kill again while the runs execute.
    for _ in 0..3 {
        std::thread::sleep(Duration::from_millis(rng.u64(100..600)));
        kills.push(count_lines(&log));
        agent.kill9();
        agent.restart();
    }
    assert!(
        kills.iter().any(|&lines| lines > 0 && lines < RUNS * STEPS.len()),
        "no kill landed while steps were running ({kills:?}); the test proved nothing"
    );

    eventually(Duration::from_secs(120), "all runs to finish", || {
        let running = agent.json(&["list", "--status", "running", "--limit", "1000"]);
        running.as_array().is_some_and(|a| a.is_empty()).then_some(())
    });

    let lines = std::fs::read_to_string(&log).unwrap();
    let mut seen: HashMap<(String, String), Vec<String>> = HashMap::new();
    for line in lines.lines() {
        let parts: Vec<&str> = line.split(',').collect();
        assert_eq!(parts.len(), 3, "malformed effect line {line:?}");
        seen.entry((parts[0].into(), parts[1].into()))
            .or_default()
            .push(parts[2].into());
    }
    let mut reruns = 0;
    for i in 0..RUNS {
        let id = format!("run-{i:03}");
        let run: Value = agent.json(&["show", &id]);
        assert_eq!(run["status"], "completed", "run {id}: {run}");
        for s in STEPS {
            let completed = events(&run, "step_completed", s);
            assert_eq!(
                completed.len(),
                1,
                "run {id} step {s} completed {} times",
                completed.len()
            );
            let completed_seq = completed[0]["seq"].as_u64().unwrap();
            let starts = events(&run, "attempt_started", s);
            assert!(
                starts.iter().all(|e| e["seq"].as_u64().unwrap() < completed_seq),
                "run {id} step {s} started again after its completion was committed"
            );
            let key = format!("{id}/{s}/1");
            assert!(
                starts.iter().all(|e| e["key"] == key.as_str()),
                "run {id} step {s}: keys {starts:?}"
            );
            let effects = seen.get(&(id.clone(), s.to_string())).cloned().unwrap_or_default();
            assert!(!effects.is_empty(), "run {id} step {s} completed without running");
            // Every execution was journaled first: more effects than journaled starts would be a
            // run that bypassed the journal.
            assert!(
                effects.len() <= starts.len(),
                "run {id} step {s} ran {} times but only {} attempts were journaled",
                effects.len(),
                starts.len()
            );
            assert!(
                effects.iter().all(|k| *k == key),
                "run {id} step {s} re-ran with another key: {effects:?}"
            );
            reruns += effects.len() - 1;
        }
    }
    eprintln!("kills at effect counts {kills:?}; {reruns} in-flight steps re-ran with the same key");
}

fn count_lines(p: &std::path::Path) -> usize {
    std::fs::read_to_string(p).map(|s| s.lines().count()).unwrap_or(0)
}
