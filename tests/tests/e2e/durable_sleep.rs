//! A durable timer survives SIGKILL, fires on time, and the idle agent burns no CPU meanwhile.

use std::time::{Duration, Instant};

use outpost_tests::{Agent, events, eventually, ts_ms, write};

#[test]
fn sleep_survives_sigkill_completes_on_time_and_idles_without_cpu() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(
        dir.path(),
        "nap.yaml",
        "name: nap\nversion: 1\nsteps:\n  - {id: nap, action: sleep, args: {duration: 6s}}\n  - {id: after, action: set, depends_on: [nap], args: {done: true}}\n",
    );
    let data = dir.path().join("data");
    let mut agent = Agent::start(&data, &[]);
    agent.json(&["apply", &file]);
    agent.json(&["start", "nap", "--id", "nap-1"]);
    std::thread::sleep(Duration::from_millis(1000));
    agent.kill9();
    agent.restart();

    // Let start-up settle, then measure CPU over 3 s of the remaining wait.
    std::thread::sleep(Duration::from_millis(500));
    let before = agent.cpu_ticks();
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs(3));
    let used = agent.cpu_ticks() - before;
    let window = t0.elapsed();
    let run = agent.json(&["show", "nap-1"]);
    assert_eq!(run["status"], "running", "the timer fired early: {run}");
    assert!(
        used <= 3,
        "idle agent used {used} clock ticks of CPU in {window:?} while waiting for a timer"
    );

    let run = eventually(Duration::from_secs(10), "the run to complete", || {
        let r = agent.json(&["show", "nap-1"]);
        (r["status"] == "completed").then_some(r)
    });
    let set = events(&run, "timer_set", "nap");
    let fired = events(&run, "timer_fired", "nap");
    assert_eq!(
        (set.len(), fired.len()),
        (1, 1),
        "one timer, set once, fired once: {run}"
    );
    let late = ts_ms(&fired[0]["at"]) as i64 - ts_ms(&set[0]["fire_at"]) as i64;
    assert!((0..1500).contains(&late), "timer fired {late} ms after its deadline");
}
