//! Schedules: deterministic slot ids, catch-up policies after downtime (SIGKILL), overlap
//! policy, and a wall clock that jumps from 1970 to today.

use std::collections::BTreeSet;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use outpost_tests::{Agent, ts_ms, write};
use serde_json::Value;

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as u64
}

fn tick(name: &str, policy: &str, extra: &str) -> String {
    format!(
        "name: {name}\nversion: 1\nschedules:\n  - {{id: t, every: 1s, catch_up: {policy}, max_catch_up: 3, overlap: allow{extra}}}\nsteps:\n  - {{id: s, action: set, args: {{slot: \"{{{{ input.slot }}}}\"}}}}\n"
    )
}

/// Slot times (ms) of the scheduled runs of `workflow`, parsed from their ids.
fn slots(agent: &Agent, workflow: &str) -> BTreeSet<u64> {
    started(agent, workflow).into_keys().collect()
}

/// Slot time → time the run was created, for the scheduled runs of `workflow`.
fn started(agent: &Agent, workflow: &str) -> std::collections::BTreeMap<u64, u64> {
    let prefix = format!("sched:{workflow}:t:");
    agent
        .json(&["list", "--limit", "10000"])
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|r| {
            let slot = r["run_id"].as_str()?.strip_prefix(&prefix)?.parse().ok()?;
            Some((slot, ts_ms(&r["created_at"])))
        })
        .collect()
}

#[test]
fn catch_up_after_sigkill_follows_each_policy_and_no_slot_runs_twice() {
    let dir = tempfile::tempdir().unwrap();
    let mut agent = Agent::start(&dir.path().join("data"), &[]);
    for (name, policy) in [("all", "run_all"), ("once", "run_once"), ("skip", "skip")] {
        agent.json(&[
            "apply",
            &write(dir.path(), &format!("{name}.yaml"), &tick(name, policy, "")),
        ]);
    }
    std::thread::sleep(Duration::from_millis(3500));
    let before: Vec<BTreeSet<u64>> = ["all", "once", "skip"].iter().map(|w| slots(&agent, w)).collect();
    for (w, b) in ["all", "once", "skip"].iter().zip(&before) {
        assert!(b.len() >= 2, "{w} ran {} slots in 3.5 s before the kill", b.len());
        assert!(b.iter().all(|s| s % 1000 == 0), "slots fall on whole seconds: {b:?}");
        // A scheduled run's input names its slot.
        let first = *b.iter().next().unwrap();
        let run: Value = agent.json(&["show", &format!("sched:{w}:t:{first}")]);
        assert_eq!(ts_ms(&run["output"]["slot"]), first);
    }
    agent.kill9();
    let killed = now_ms();
    std::thread::sleep(Duration::from_millis(5000));
    agent.restart();
    std::thread::sleep(Duration::from_millis(2500));
    for (w, b) in ["all", "once", "skip"].iter().zip(&before) {
        let after = started(&agent, w);
        assert!(
            b.iter().all(|s| after.contains_key(s)),
            "{w}: runs from before the kill are kept"
        );
        // Each run's input says whether it made up for downtime.
        let new: Vec<u64> = after.keys().copied().filter(|s| *s > killed).collect();
        let caught_up: Vec<u64> = new
            .iter()
            .copied()
            .filter(|s| agent.json(&["show", &format!("sched:{w}:t:{s}")])["input"]["catch_up"] == true)
            .collect();
        match *w {
            "all" => assert_eq!(caught_up.len(), 3, "run_all catches up its bound of 3: {caught_up:?}"),
            "once" => assert_eq!(caught_up.len(), 1, "run_once catches up one slot: {caught_up:?}"),
            _ => assert!(caught_up.is_empty(), "skip catches up nothing: {caught_up:?}"),
        }
        let live = new.len() - caught_up.len();
        assert!(live >= 1, "{w}: the schedule keeps firing after restart");
    }
}

/// Every run's (created, finished) time, ordered; an unfinished run ends at `u64::MAX`.
fn run_spans(agent: &Agent) -> (Value, Vec<(u64, u64)>) {
    let runs = agent.json(&["list", "--limit", "100"]);
    let mut spans: Vec<(u64, u64)> = runs
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let end = r["finished_at"]
                .as_str()
                .map(|_| ts_ms(&r["finished_at"]))
                .unwrap_or(u64::MAX);
            (ts_ms(&r["created_at"]), end)
        })
        .collect();
    spans.sort();
    (runs, spans)
}

#[test]
fn overlap_skip_never_runs_two_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(&dir.path().join("data"), &[]);
    let def = "name: long\nversion: 1\nschedules:\n  - {id: t, every: 1s, overlap: skip}\nsteps:\n  - {id: s, action: sleep, args: {duration: 2500ms}}\n";
    agent.json(&["apply", &write(dir.path(), "long.yaml", def)]);
    std::thread::sleep(Duration::from_millis(7000));
    let (runs, spans) = run_spans(&agent);
    assert!(spans.len() >= 2, "{runs}");
    for w in spans.windows(2) {
        assert!(w[1].0 >= w[0].1, "runs overlapped: {spans:?}");
    }
}

#[test]
fn overlap_queue_one_starts_the_waiting_slot_when_the_previous_run_ends() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(&dir.path().join("data"), &[]);
    let def = "name: q\nversion: 1\nschedules:\n  - {id: t, every: 1s, overlap: queue_one}\nsteps:\n  - {id: s, action: sleep, args: {duration: 2200ms}}\n";
    agent.json(&["apply", &write(dir.path(), "q.yaml", def)]);
    std::thread::sleep(Duration::from_millis(7500));
    let (runs, spans) = run_spans(&agent);
    assert!(spans.len() >= 3, "{runs}");
    for w in spans.windows(2) {
        // Never two at once, and the queued slot starts as soon as the previous run ends.
        assert!(w[1].0 >= w[0].1, "runs overlapped: {spans:?}");
        assert!(w[1].0 - w[0].1 < 900, "the queued slot waited too long: {spans:?}");
    }
}

#[test]
fn a_clock_reset_to_1970_pauses_schedules_and_the_jump_back_fires_no_backlog() {
    let dir = tempfile::tempdir().unwrap();
    let offset = dir.path().join("clock-offset");
    let to_1970 = -(now_ms() as i64) + 10_000;
    std::fs::write(&offset, to_1970.to_string()).unwrap();
    let agent = Agent::start_with_env(
        &dir.path().join("data"),
        &[],
        &[("OUTPOST_CLOCK_OFFSET_FILE", offset.to_str().unwrap())],
    );
    agent.json(&["apply", &write(dir.path(), "all.yaml", &tick("all", "run_all", ""))]);
    std::thread::sleep(Duration::from_millis(2500));
    assert!(
        slots(&agent, "all").is_empty(),
        "nothing fires while the clock reads 1970"
    );
    assert!(
        agent.log().contains("schedules wait until it is set"),
        "{}",
        agent.log()
    );

    // NTP answers: the clock jumps ~57 years forward. No back-fill of decades of slots.
    std::fs::write(&offset, "0").unwrap();
    std::thread::sleep(Duration::from_millis(3500));
    let s = slots(&agent, "all");
    assert!((1..=5).contains(&s.len()), "after the jump: {s:?}");
    assert!(
        s.iter().all(|t| *t > now_ms() - 10_000),
        "only slots since the jump: {s:?}"
    );

    // Reset again: the schedule pauses; when the clock returns, the catch-up is bounded.
    std::fs::write(&offset, to_1970.to_string()).unwrap();
    std::thread::sleep(Duration::from_millis(4000));
    let paused = slots(&agent, "all");
    std::fs::write(&offset, "0").unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let resumed = slots(&agent, "all");
    let caught_up = resumed.difference(&paused).count();
    assert!((1..=5).contains(&caught_up), "{caught_up} slots after the second jump");
}

#[test]
fn a_slot_refused_by_a_full_limit_is_tried_again_not_lost() {
    let dir = tempfile::tempdir().unwrap();
    // One run at a time, each longer than the schedule's period; a start over the limit is
    // refused (--when-full reject). Every slot must still run, one after another.
    let def = "name: long\nversion: 1\nlimits: {max_runs: 1}\nschedules:\n  - {id: t, every: 1s, catch_up: run_all, max_catch_up: 100, overlap: allow}\nsteps:\n  - {id: s, action: exec, args: {command: sleep, args: ['1.3']}}\n";
    let agent = Agent::start(&dir.path().join("data"), &["--when-full", "reject"]);
    agent.json(&["apply", &write(dir.path(), "long.yaml", def)]);
    std::thread::sleep(Duration::from_secs(8));
    let got = slots(&agent, "long");
    assert!(got.len() >= 3, "only {} slots ran in 8 s: {got:?}", got.len());
    let first = *got.iter().next().unwrap();
    let last = *got.iter().last().unwrap();
    let missing: Vec<u64> = (first / 1000..=last / 1000)
        .map(|s| s * 1000)
        .filter(|s| !got.contains(s))
        .collect();
    assert!(
        missing.is_empty(),
        "slots lost to refused starts: {missing:?} (ran {got:?})"
    );
    assert!(
        agent.log().contains("refused for now"),
        "no start was refused; the test proved nothing"
    );
}

#[test]
fn a_clock_that_jumped_ahead_and_was_corrected_pauses_schedules_only_for_the_grace() {
    let dir = tempfile::tempdir().unwrap();
    let offset = dir.path().join("offset");
    // The clock runs a day ahead while the schedule records events, then NTP corrects it.
    std::fs::write(&offset, (24 * 3600 * 1000).to_string()).unwrap();
    let agent = Agent::start_with_env(
        &dir.path().join("data"),
        &[],
        &[
            ("OUTPOST_CLOCK_OFFSET_FILE", offset.to_str().unwrap()),
            ("OUTPOST_CLOCK_GRACE_MS", "2000"),
        ],
    );
    agent.json(&["apply", &write(dir.path(), "all.yaml", &tick("all", "run_all", ""))]);
    std::thread::sleep(Duration::from_millis(2500));
    assert!(
        !slots(&agent, "all").is_empty(),
        "nothing ran while the clock was ahead"
    );
    std::fs::write(&offset, "0").unwrap();
    let corrected = now_ms();
    std::thread::sleep(Duration::from_millis(5000));
    let after: Vec<u64> = slots(&agent, "all")
        .into_iter()
        .filter(|s| *s < corrected + 10_000)
        .collect();
    assert!(
        !after.is_empty(),
        "schedules still paused 5 s after the correction (they would wait a day): {:?}",
        slots(&agent, "all")
    );
    assert!(agent.log().contains("trusting it"), "{}", agent.log());
}
