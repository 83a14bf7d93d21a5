//! The in-process tier: a real runtime on a temporary journal with a fake action registry and a
//! manual wall clock, between the engine's pure unit tests and the process-level e2e tests.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use outpost_shared::Event;
use outpost_shared::definition::Signature;
use serde_json::{Value, json};

use super::{Runtime, RuntimeConfig, StartRequest};
use crate::actions::{Action, ActionError, ActionFuture, Call, Registry};
use crate::clock::Clock;
use crate::engine::RunStatus;

/// A wall clock that moves only when the test moves it.
struct ManualClock(AtomicU64);

impl Clock for ManualClock {
    fn now_ms(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// 2026-12-01T00:00:00Z.
const NOW_MS: u64 = 1_796_083_200_000;

/// Every call it gets, as (attempt, idempotency key).
type Calls = Arc<Mutex<Vec<(u32, String)>>>;

/// Fails (retryably) until attempt `fails + 1`, then answers its attempt number; `fails:
/// u32::MAX` never answers at all (an attempt still in flight when the process dies).
struct Fake {
    fails: u32,
    calls: Calls,
}

impl Action for Fake {
    fn signature(&self) -> Signature {
        Signature {
            required: &[],
            optional: &["x"],
        }
    }

    fn execute(&self, call: Call) -> ActionFuture {
        self.calls
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((call.attempt, call.key.clone()));
        let fails = self.fails;
        Box::pin(async move {
            if fails == u32::MAX {
                std::future::pending::<()>().await;
            }
            if call.attempt <= fails {
                return Err(ActionError::retryable(
                    "fake.flaky",
                    format!("attempt {}", call.attempt),
                ));
            }
            Ok(json!({"attempt": call.attempt}))
        })
    }
}

struct Harness {
    rt: Runtime,
    clock: Arc<ManualClock>,
    calls: Calls,
}

fn open(dir: &Path, fails: u32) -> Harness {
    open_with(dir, fails, RuntimeConfig::default())
}

fn open_with(dir: &Path, fails: u32, config: RuntimeConfig) -> Harness {
    let clock = Arc::new(ManualClock(AtomicU64::new(NOW_MS)));
    let calls = Calls::default();
    let mut registry = Registry::default();
    registry.register(
        "fake",
        Fake {
            fails,
            calls: calls.clone(),
        },
    );
    let rt = Runtime::open_with(dir, config, registry, clock.clone()).expect("open runtime");
    Harness { rt, clock, calls }
}

impl Harness {
    async fn start(&self, workflow: &str, id: &str) {
        let req = StartRequest {
            workflow: workflow.into(),
            id: Some(id.into()),
            ..StartRequest::default()
        };
        self.rt.start(req).await.expect("start");
    }

    async fn ended(&self, id: &str) -> (RunStatus, Option<Event>) {
        let (rec, end) = self.rt.wait(id, Some(Duration::from_secs(20))).await.expect("wait");
        (rec.status, end)
    }

    fn history(&self, id: &str) -> Vec<Event> {
        let h = self.rt.journal().history(id).expect("history");
        h.into_iter().map(|(_, r)| r.event).collect()
    }

    fn calls(&self) -> Vec<(u32, String)> {
        self.calls.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

fn output(end: Option<Event>) -> Value {
    match end {
        Some(Event::RunCompleted { output }) => serde_json::from_str(&output).unwrap_or(Value::Null),
        other => panic!("the run did not complete: {other:?}"),
    }
}

#[tokio::test]
async fn a_retried_activity_keeps_its_key_and_each_attempt_is_journaled_before_it_runs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let h = open(dir.path(), 2);
    let def =
        "name: w\nversion: 1\nsteps:\n  - {id: a, action: fake, retry: {max_attempts: 3, initial_interval: 10ms}}\n";
    h.rt.apply(def).await.expect("apply");
    h.start("w", "r1").await;
    let (status, end) = h.ended("r1").await;
    assert_eq!(status, RunStatus::Completed);
    assert_eq!(
        output(end),
        json!({"attempt": 3}),
        "the run's output is its last step's"
    );
    let calls = h.calls();
    assert_eq!(calls.iter().map(|(a, _)| *a).collect::<Vec<_>>(), [1, 2, 3]);
    assert!(calls.iter().all(|(_, k)| k == "r1/a/1"), "{calls:?}");
    let started: Vec<u32> = h
        .history("r1")
        .iter()
        .filter_map(|e| match e {
            Event::AttemptStarted { attempt, key, .. } if key == "r1/a/1" => Some(*attempt),
            _ => None,
        })
        .collect();
    assert_eq!(started, [1, 2, 3]);
}

#[tokio::test]
async fn a_durable_sleep_takes_its_deadline_from_the_injected_clock() {
    let dir = tempfile::tempdir().expect("tempdir");
    let h = open(dir.path(), 0);
    let def = "name: nap\nversion: 1\nsteps:\n  - {id: z, action: sleep, args: {duration: 50ms}}\n  - {id: b, action: set, args: {done: true}, depends_on: [z]}\n";
    h.rt.apply(def).await.expect("apply");
    h.start("nap", "n1").await;
    for _ in 0..200 {
        if h.history("n1").iter().any(|e| matches!(e, Event::TimerSet { .. })) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // The wall clock jumps a year ahead while the timer runs: it fires (once), it is not lost.
    h.clock.0.fetch_add(365 * 86_400_000, Ordering::Relaxed);
    let (status, _) = h.ended("n1").await;
    assert_eq!(status, RunStatus::Completed);
    let history = h.history("n1");
    let set = history.iter().find_map(|e| match e {
        Event::TimerSet {
            fire_at_ms,
            duration_ms,
            ..
        } => Some((*fire_at_ms, *duration_ms)),
        _ => None,
    });
    assert_eq!(set, Some((NOW_MS + 50, 50)));
    assert!(history.iter().any(|e| matches!(e, Event::TimerFired { .. })));
}

#[tokio::test]
async fn a_signal_is_taken_once_and_a_cancel_ends_a_waiting_run() {
    let dir = tempfile::tempdir().expect("tempdir");
    let h = open(dir.path(), 0);
    let def = "name: gate\nversion: 1\nkind: state_machine\nsteps:\n  - {id: first, action: wait_signal, args: {signal: go}, next: second}\n  - {id: second, action: wait_signal, args: {signal: never}, end: succeed}\n";
    h.rt.apply(def).await.expect("apply");
    h.start("gate", "g1").await;
    assert!(
        h.rt.signal("g1", "go", Some("s1".into()), json!({"n": 1}))
            .await
            .expect("signal")
    );
    assert!(
        !h.rt
            .signal("g1", "go", Some("s1".into()), json!({"n": 2}))
            .await
            .expect("repeat")
    );
    let rec = h.rt.cancel("g1", "operator").await.expect("cancel");
    assert_eq!(rec.status, RunStatus::Cancelled);
    let history = h.history("g1");
    let received = history
        .iter()
        .filter(|e| matches!(e, Event::SignalReceived { .. }))
        .count();
    assert_eq!(received, 1, "the repeated signal id is not journaled again");
    assert!(matches!(history.last(), Some(Event::RunCancelled { .. })));
}

#[tokio::test]
async fn a_workflow_step_runs_its_child_through_the_action_pipeline() {
    let dir = tempfile::tempdir().expect("tempdir");
    let h = open(dir.path(), 0);
    h.rt.apply("name: child\nversion: 1\nsteps:\n  - {id: c, action: fake}\n")
        .await
        .expect("apply child");
    h.rt.apply("name: parent\nversion: 1\nsteps:\n  - {id: p, action: workflow, args: {workflow: child}}\n")
        .await
        .expect("apply parent");
    h.start("parent", "p1").await;
    let (status, end) = h.ended("p1").await;
    assert_eq!(status, RunStatus::Completed);
    assert_eq!(output(end), json!({"attempt": 1}), "the child's output is the step's");
    // The child's id derives from the parent's step visit, so a re-run finds it again.
    let child = super::children::child_id("p1", "p", 1);
    assert_eq!(h.calls(), [(1, format!("{child}/c/1"))]);
    assert!(
        h.history("p1")
            .iter()
            .any(|e| matches!(e, Event::AttemptStarted { step, .. } if step == "p")),
        "the child step is written ahead like any attempt"
    );
}

#[tokio::test]
async fn a_reopened_journal_resumes_the_attempt_in_flight_with_the_same_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let def = "name: w\nversion: 1\nsteps:\n  - {id: a, action: fake}\n";
    let first = open(dir.path(), u32::MAX);
    first.rt.apply(def).await.expect("apply");
    first.start("w", "r1").await;
    for _ in 0..200 {
        if !first.calls().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(first.calls(), [(1, "r1/a/1".to_string())]);
    // The process "dies" with the attempt in flight: the journal closes under the run.
    first.rt.journal().close().await.expect("close");

    let second = open(dir.path(), 0);
    assert_eq!(second.rt.resume_all().await.expect("resume"), 1);
    let (status, end) = second.ended("r1").await;
    assert_eq!(status, RunStatus::Completed);
    assert_eq!(output(end), json!({"attempt": 1}));
    // Re-run as the same attempt with the same key (at-least-once, effectively once).
    assert_eq!(second.calls(), [(1, "r1/a/1".to_string())]);
    let history = second.history("r1");
    assert!(history.iter().any(|e| matches!(e, Event::RunResumed { .. })));
}

impl Harness {
    /// Waits until `n` runs are parked.
    async fn parked(&self, n: usize) {
        for _ in 0..400 {
            if self.rt.parked_count() == n {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        panic!("{} runs parked, not {n}", self.rt.parked_count());
    }
}

#[tokio::test]
async fn a_parked_run_wakes_for_each_request_with_its_state_read_back_from_the_journal() {
    let dir = tempfile::tempdir().expect("tempdir");
    let h = open(dir.path(), 0);
    let def = "name: gate\nversion: 1\nkind: state_machine\nsteps:\n  - {id: first, action: wait_signal, args: {signal: go}, next: second}\n  - {id: second, action: approval, next: third}\n  - {id: third, action: wait_signal, args: {signal: never}, end: succeed}\n";
    h.rt.apply(def).await.expect("apply");
    h.start("gate", "g1").await;
    h.parked(1).await;
    assert_eq!(h.rt.active_count(), 1, "a parked run is still active");
    assert!(
        h.rt.signal("g1", "go", Some("s1".into()), json!({}))
            .await
            .expect("signal")
    );
    h.parked(1).await;
    // The repeat reaches a run folded again from the journal: it still knows the id.
    assert!(
        !h.rt
            .signal("g1", "go", Some("s1".into()), json!({}))
            .await
            .expect("repeat")
    );
    h.parked(1).await;
    let decision = super::Decision {
        step: "second".into(),
        approved: true,
        by: "ops".into(),
        ..super::Decision::default()
    };
    assert!(h.rt.approve("g1", decision).await.expect("approve"));
    h.parked(1).await;
    let rec = h.rt.cancel("g1", "operator").await.expect("cancel");
    assert_eq!(rec.status, RunStatus::Cancelled);
    assert_eq!(h.rt.parked_count(), 0);
    assert_eq!(h.rt.active_count(), 0);
    let history = h.history("g1");
    assert_eq!(
        history
            .iter()
            .filter(|e| matches!(e, Event::SignalReceived { .. }))
            .count(),
        2,
        "the signal and the approval, each once: {history:?}"
    );
}

#[tokio::test]
async fn a_run_parked_on_a_timer_wakes_when_it_is_due_and_its_timer_fires_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = RuntimeConfig {
        park_after: Some(Duration::from_millis(50)),
        ..RuntimeConfig::default()
    };
    let h = open_with(dir.path(), 0, config);
    let def = "name: nap\nversion: 1\nsteps:\n  - {id: z, action: sleep, args: {duration: 300ms}}\n  - {id: b, action: set, args: {done: true}, depends_on: [z]}\n";
    h.rt.apply(def).await.expect("apply");
    h.start("nap", "n1").await;
    h.parked(1).await;
    // The manual wall clock stands still: the woken run waits out its timer in memory rather
    // than parking for the whole length again.
    let (status, _) = h.ended("n1").await;
    assert_eq!(status, RunStatus::Completed);
    let history = h.history("n1");
    let count = |f: fn(&Event) -> bool| history.iter().filter(|e| f(e)).count();
    assert_eq!(count(|e| matches!(e, Event::TimerSet { .. })), 1, "{history:?}");
    assert_eq!(count(|e| matches!(e, Event::TimerFired { .. })), 1, "{history:?}");
    assert_eq!(h.rt.parked_count(), 0);
}

#[tokio::test]
async fn with_parking_off_a_waiting_run_stays_in_memory() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = RuntimeConfig {
        park_after: None,
        ..RuntimeConfig::default()
    };
    let h = open_with(dir.path(), 0, config);
    h.rt.apply("name: w\nversion: 1\nsteps:\n  - {id: s, action: wait_signal, args: {signal: go}}\n")
        .await
        .expect("apply");
    h.start("w", "w1").await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!((h.rt.active_count(), h.rt.parked_count()), (1, 0));
    assert!(h.rt.signal("w1", "go", None, json!({})).await.expect("signal"));
    assert_eq!(h.ended("w1").await.0, RunStatus::Completed);
}

#[tokio::test]
async fn ids_made_in_one_millisecond_never_repeat() {
    let dir = tempfile::tempdir().expect("tempdir");
    let h = open(dir.path(), 0);
    // The manual clock stands still: every id comes from the same millisecond.
    let ids: std::collections::HashSet<String> = (0..100_000).map(|_| h.rt.new_run_id()).collect();
    assert_eq!(ids.len(), 100_000);
    assert!(ids.iter().all(|id| id.len() == 16));
}

/// Two `set` steps, the second reading the first: a run of pure decisions.
const PURE_STEPS: &str = "name: w\nversion: 1\nsteps:\n  - {id: a, action: set, args: {n: 1}}\n  - {id: b, action: set, args: {n: '{{ steps.a.output.n + 1 }}'}, depends_on: [a]}\n";

#[tokio::test]
async fn a_run_of_pure_steps_starts_and_ends_in_one_commit() {
    let dir = tempfile::tempdir().expect("tempdir");
    let h = open(dir.path(), 0);
    h.rt.apply(PURE_STEPS).await.expect("apply");
    let commits = || h.rt.journal().stats().commits.load(Ordering::Relaxed);
    let before = commits();
    h.start("w", "p1").await;
    let (status, end) = h.ended("p1").await;
    assert_eq!(status, RunStatus::Completed);
    assert_eq!(output(end), json!({"n": 2}));
    assert_eq!(
        commits() - before,
        1,
        "RunStarted, both steps and the end share one commit"
    );
    assert!(matches!(
        h.history("p1").as_slice(),
        [Event::RunStarted { .. }, .., Event::RunCompleted { .. }]
    ));
    // A repeated start of the same id journals nothing, the first records included.
    let before = commits();
    h.start("w", "p1").await;
    assert_eq!(h.history("p1").len(), 4);
    assert!(commits() - before <= 1);
}

#[tokio::test]
async fn a_run_that_queues_for_its_slot_journals_no_decision_before_it_has_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = RuntimeConfig::default();
    config.limits.max_runs = 1;
    let h = open_with(dir.path(), 0, config);
    h.rt.apply("name: gate\nversion: 1\nsteps:\n  - {id: s, action: wait_signal, args: {signal: go}}\n")
        .await
        .expect("apply gate");
    h.rt.apply(PURE_STEPS).await.expect("apply w");
    h.start("gate", "g1").await;
    h.start("w", "q1").await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        matches!(h.history("q1").as_slice(), [Event::RunStarted { .. }]),
        "a queued run decides nothing: {:?}",
        h.history("q1")
    );
    assert!(h.rt.signal("g1", "go", None, json!({})).await.expect("signal"));
    assert_eq!(h.ended("g1").await.0, RunStatus::Completed);
    let (status, end) = h.ended("q1").await;
    assert_eq!(status, RunStatus::Completed);
    assert_eq!(output(end), json!({"n": 2}));
}

#[tokio::test]
async fn an_attempt_whose_gates_are_open_starts_in_the_commit_that_decided_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let h = open(dir.path(), 0);
    h.rt.apply("name: w\nversion: 1\nsteps:\n  - {id: a, action: set, args: {n: 1}}\n  - {id: b, action: fake, depends_on: [a]}\n")
        .await
        .expect("apply");
    let commits = || h.rt.journal().stats().commits.load(Ordering::Relaxed);
    let before = commits();
    h.start("w", "f1").await;
    assert_eq!(h.ended("f1").await.0, RunStatus::Completed);
    // RunStarted, a's completion and b's start in one commit; b's end and the run's in another.
    assert_eq!(commits() - before, 2);
    let kinds: Vec<&str> = h
        .history("f1")
        .iter()
        .map(|e| match e {
            Event::RunStarted { .. } => "run_started",
            Event::StepCompleted { .. } => "step_completed",
            Event::AttemptStarted { .. } => "attempt_started",
            Event::RunCompleted { .. } => "run_completed",
            _ => "other",
        })
        .collect();
    assert_eq!(
        kinds,
        [
            "run_started",
            "step_completed",
            "attempt_started",
            "step_completed",
            "run_completed"
        ]
    );
    assert_eq!(h.calls().len(), 1, "the attempt ran once");
}

#[tokio::test]
async fn an_attempt_that_must_wait_for_its_action_slot_still_starts_durably_and_runs_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = RuntimeConfig::default();
    config.limits.actions.insert("fake".into(), 1);
    let h = open_with(dir.path(), 0, config);
    h.rt.apply("name: w\nversion: 1\nsteps:\n  - {id: a, action: fake}\n  - {id: b, action: fake}\n  - {id: c, action: fake}\n")
        .await
        .expect("apply");
    h.start("w", "s1").await;
    assert_eq!(h.ended("s1").await.0, RunStatus::Completed);
    let history = h.history("s1");
    for step in ["a", "b", "c"] {
        let started = history
            .iter()
            .position(|e| matches!(e, Event::AttemptStarted { step: s, .. } if s == step));
        let done = history
            .iter()
            .position(|e| matches!(e, Event::StepCompleted { step: s, .. } if s == step));
        assert!(
            matches!((started, done), (Some(s), Some(d)) if s < d),
            "{step}: {history:?}"
        );
    }
    assert_eq!(h.calls().len(), 3, "each attempt ran once");
}
