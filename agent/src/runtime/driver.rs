//! The per-run driver: one task per active run owns the run's folded state, asks the engine what
//! to do, journals pure decisions and spawns activity and timer tasks, and answers the requests
//! that reach the run over its control channel (stop, signal, approve).
//!
//! Order within one step of the driver: fold the batch and chain the pure decisions that follow
//! from it (the look-ahead needs the folded state), append the whole batch durably, and only then
//! act — spawn tasks, answer requests, start the next run of a chain. The fold is the driver's
//! private state; nothing outside sees it before the append returned. The one thing done before
//! the append is stopping what still runs when the batch ends the run (or turns it to undoing):
//! tasks are aborted and child runs cancelled first, so a crash in between re-runs an aborted
//! attempt with the same key rather than leaving a child running under an ended parent.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use outpost_shared::definition::{Definition, StepKind};
use outpost_shared::{ErrorInfo, Event};
use serde_json::Value;
use tokio::sync::{OwnedSemaphorePermit, mpsc, oneshot};
use tokio::task::JoinSet;
use tracing::{Instrument, error, info, info_span, warn};

use super::activity::{self, append_durably};
use super::park::{self, Awaiting, Park};
use super::{Inner, MAX_INPUT_BYTES, MAX_PENDING_SIGNALS, MAX_SIGNALS_PER_RUN, Runtime, RuntimeError, max_runs};
use crate::clock::remaining_ms;
use crate::engine::{self, Command, FailedAttempt, RunState, RunStatus};

/// Identifies an activity or timer task: (step, visit, attempt, compensation); timers use attempt 0.
pub(super) type Slot = (usize, u32, u32, bool);

/// What a finished task hands back: events already journaled, then events to journal.
pub(super) struct TaskResult {
    pub(super) journaled: Vec<Event>,
    pub(super) to_journal: Vec<Event>,
}

impl TaskResult {
    /// A task whose run ended before it could finish: only what it journaled itself.
    pub(super) fn ended(journaled: Vec<Event>) -> TaskResult {
        TaskResult {
            journaled,
            to_journal: Vec::new(),
        }
    }
}

/// A request to a run's driver from outside: operators, the API, parent runs.
pub(crate) enum Control {
    /// Stop the run: cancel (`terminate` false) or terminate.
    Stop {
        /// Why.
        reason: String,
        /// Record `RunTerminated` instead of `RunCancelled`.
        terminate: bool,
        /// Answered once the end is durable.
        reply: oneshot::Sender<Result<bool, RuntimeError>>,
    },
    /// Deliver a signal; the reply says whether it was new (false: a repeated id).
    Signal {
        /// The signal as it will be journaled.
        name: String,
        /// Sender's id.
        id: String,
        /// Payload.
        payload: Value,
        /// Who sent it, when known.
        by: Option<String>,
        /// Whether it was new, once durable.
        reply: oneshot::Sender<Result<bool, RuntimeError>>,
    },
    /// Decide an approval step that is waiting.
    Approve {
        /// The approval step.
        step: String,
        /// Decision.
        approved: bool,
        /// Who decided.
        by: String,
        /// The fleet vouches that `by` may decide.
        vouched: bool,
        /// Free text.
        comment: String,
        /// Request id (repeats are ignored).
        id: String,
        /// Whether it was new, once durable.
        reply: oneshot::Sender<Result<bool, RuntimeError>>,
    },
}

/// How a driver's turn ended.
pub(super) enum Outcome {
    /// The run ended with this event (journaled).
    Ended(Event),
    /// The run only waits: the driver stopped, handing back its state ([`park`]).
    Parked(Park, Box<RunState>),
}

/// A run's admission slots (`None` until admitted; a child run needs none). Kept by the run's
/// task across parks, so a parked run still counts against `--max-runs` as it did in memory.
pub(super) type Admission = Option<Vec<OwnedSemaphorePermit>>;

/// The timer tasks a driver awaits: when each fires (wall ms) and its full length.
type Timers = HashMap<tokio::task::Id, (u64, u64)>;

pub(super) struct Driver {
    inner: Arc<Inner>,
    def: Arc<Definition>,
    st: RunState,
    /// Decisions already made for the current state (by the look-ahead in `journal`).
    next: Option<Vec<Command>>,
    /// The run's final event, once journaled.
    end: Option<Event>,
    /// Woken by its park's sleep: do not park on a timer again until one fires. A wall clock
    /// that lags the monotonic one (or a test's clock that stands still) would otherwise park
    /// the run for the timer's whole length again at every wake.
    hold_timers: bool,
    /// Attempts whose start went into the last commit ([`Driver::start_attempts`]), to spawn.
    prepared: Vec<Prepared>,
    /// The run holds its admission slots: only then may an attempt start.
    admitted: bool,
    /// The slot of each activity and timer task running: a decision for one of them again
    /// (the fold learns of an attempt only when it ends) starts nothing new.
    in_flight: HashMap<tokio::task::Id, Slot>,
}

/// An attempt whose gates were open and whose start the driver journaled itself.
struct Prepared {
    slot: Slot,
    args: Value,
    key: String,
    held: activity::Held,
}

impl Driver {
    /// A driver for a run whose history folds to `st`.
    pub(super) fn new(inner: Arc<Inner>, def: Arc<Definition>, st: RunState) -> Driver {
        Driver {
            inner,
            def,
            st,
            next: None,
            end: None,
            hold_timers: false,
            prepared: Vec::new(),
            admitted: false,
            in_flight: HashMap::new(),
        }
    }

    /// This driver's run was woken by its park's sleep: its timer is due.
    pub(super) fn woken_for_timer(mut self) -> Driver {
        self.hold_timers = true;
        self
    }
}

impl Driver {
    /// Drives the run until it ends or parks. A run that is not a child first waits for its run
    /// slots (answering stop and signal requests meanwhile), unless `admission` holds them from
    /// before a park.
    pub(super) async fn run(
        mut self,
        control: &mut mpsc::Receiver<Box<Control>>,
        admission: &mut Admission,
    ) -> Outcome {
        let mut tasks: JoinSet<TaskResult> = JoinSet::new();
        let inner = self.inner.clone();
        if admission.is_none() && !self.st.status.is_terminal() {
            let (run_id, def) = (self.st.run_id.clone(), self.def.clone());
            let admit = inner.limits.admit(&run_id, def.name(), max_runs(&def));
            tokio::pin!(admit);
            loop {
                tokio::select! {
                    permits = &mut admit => {
                        *admission = Some(permits);
                        break;
                    }
                    msg = control.recv() => {
                        self.control(msg, &mut tasks).await;
                        if self.st.status.is_terminal() {
                            break;
                        }
                    }
                }
            }
        }
        let mut timers: Timers = HashMap::new();
        self.admitted = admission.is_some();
        while !self.st.status.is_terminal() {
            self.spawn_prepared(&mut tasks);
            let mut records = Vec::new();
            let decided = self.next.take().unwrap_or_else(|| engine::decide(&self.def, &self.st));
            for cmd in decided {
                self.command(cmd, &mut records, &mut tasks, &mut timers);
            }
            if !records.is_empty() {
                self.journal(records, &mut tasks).await;
                continue;
            }
            if tasks.is_empty() && !self.st.is_waiting() {
                // Nothing to run, nothing running, nothing awaited: the run cannot make progress.
                let err = ErrorInfo::new("engine.stuck", "no step can run and none is running");
                self.journal(vec![Event::RunFailed { error: err }], &mut tasks).await;
                break;
            }
            if let Some(p) = self.park(&tasks, &timers)
                && control.is_empty()
            {
                // Dropping the task set aborts the timer tasks; the fold sets them again.
                return Outcome::Parked(p, Box::new(self.st));
            }
            tokio::select! {
                Some(joined) = tasks.join_next_with_id(), if !tasks.is_empty() => match joined {
                    Ok((id, res)) => {
                        self.in_flight.remove(&id);
                        if timers.remove(&id).is_some() {
                            self.hold_timers = false;
                        }
                        self.absorb(res.journaled);
                        if !res.to_journal.is_empty() {
                            self.journal(res.to_journal, &mut tasks).await;
                        }
                    }
                    Err(e) => {
                        timers.remove(&e.id());
                        let slot = self.in_flight.remove(&e.id());
                        if e.is_panic() {
                            error!(?slot, "activity task panicked");
                            if let Some((step, visit, attempt, compensation)) = slot {
                                let id = self.def.doc.steps[step].id.clone();
                                let failed = FailedAttempt {
                                    step: &id,
                                    visit,
                                    attempt,
                                    error: ErrorInfo::new("internal", "the action panicked"),
                                    retryable: false,
                                    compensation,
                                };
                                let events = engine::attempt_failed(
                                    &self.def.plans[step],
                                    failed,
                                    self.inner.clock.now_ms(),
                                    0.0,
                                );
                                self.journal(events, &mut tasks).await;
                            }
                        }
                    }
                },
                msg = control.recv() => self.control(msg, &mut tasks).await,
            }
        }
        match self.st.status {
            RunStatus::Completed => info!("run completed"),
            RunStatus::Continued => info!("run continued as new"),
            status => {
                let error = self.st.error.as_ref().map(|e| e.to_string()).unwrap_or_default();
                warn!(status = status.as_str(), %error, "run ended");
            }
        }
        Outcome::Ended(self.end.take().unwrap_or_else(|| Event::RunCancelled {
            reason: "the driver stopped".into(),
        }))
    }

    /// Whether the run may let go of its memory now, and until when ([`park::decide`]).
    fn park(&self, tasks: &JoinSet<TaskResult>, timers: &Timers) -> Option<Park> {
        let now = self.inner.clock.now_ms();
        let timers_ms: Vec<u64> = timers
            .values()
            .map(|&(fire_at, duration)| remaining_ms(now, fire_at, duration))
            .collect();
        let awaiting = Awaiting {
            tasks: tasks.len(),
            timers_ms: &timers_ms,
            waiting: self.st.is_waiting(),
        };
        match park::decide(self.inner.config.park_after, awaiting) {
            Park::No => None,
            Park::For(_) if self.hold_timers => None,
            p => Some(p),
        }
    }

    /// Spawns the attempts whose start the last commit journaled.
    fn spawn_prepared(&mut self, tasks: &mut JoinSet<TaskResult>) {
        for p in std::mem::take(&mut self.prepared) {
            let (inner, def, run_id) = (self.inner.clone(), self.def.clone(), self.st.run_id.clone());
            let fut = activity::run_started(inner, def, run_id, p.slot, p.args, p.key, p.held);
            self.spawn_attempt(tasks, p.slot, fut);
        }
    }

    /// Whether a task for this slot is running.
    fn running(&self, slot: Slot) -> bool {
        self.in_flight.values().any(|s| *s == slot)
    }

    /// Spawns an attempt's task in its `step` span and notes its slot as running.
    fn spawn_attempt(
        &mut self,
        tasks: &mut JoinSet<TaskResult>,
        slot: Slot,
        fut: impl std::future::Future<Output = TaskResult> + Send + 'static,
    ) {
        let (step, _, attempt, compensation) = slot;
        let span = info_span!("step", step = %self.def.doc.steps[step].id, attempt, compensation);
        let h = tasks.spawn(fut.instrument(span));
        self.in_flight.insert(h.id(), slot);
    }

    /// Turns one decision into records to journal or a task to run.
    fn command(
        &mut self,
        cmd: Command,
        records: &mut Vec<Event>,
        tasks: &mut JoinSet<TaskResult>,
        timers: &mut Timers,
    ) {
        let cmd = match cmd.into_record(&self.def, self.inner.clock.now_ms()) {
            Ok(record) => return records.push(record),
            Err(cmd) => cmd,
        };
        match cmd {
            Command::Record(_) | Command::StartTimer { .. } | Command::StartWait { .. } => {
                error!("a journal record came back from into_record");
            }
            Command::AwaitTimer {
                step,
                visit,
                fire_at_ms,
                duration_ms,
                completes,
            } => {
                let slot = (step, visit, 0, false);
                if self.running(slot) {
                    return;
                }
                let clock = self.inner.clock.clone();
                let id = self.def.doc.steps[step].id.clone();
                let h = tasks.spawn(
                    async move {
                        let wait = remaining_ms(clock.now_ms(), fire_at_ms, duration_ms);
                        tokio::time::sleep(Duration::from_millis(wait)).await;
                        TaskResult {
                            journaled: Vec::new(),
                            to_journal: engine::timer_fired(&id, visit, fire_at_ms, completes),
                        }
                    }
                    .in_current_span(),
                );
                self.in_flight.insert(h.id(), slot);
                timers.insert(h.id(), (fire_at_ms, duration_ms));
            }
            Command::RunActivity {
                step,
                visit,
                attempt,
                args,
                key,
                not_before_ms,
                compensation,
            } => {
                let slot = (step, visit, attempt, compensation);
                if self.running(slot) {
                    return;
                }
                let (inner, def, run_id) = (self.inner.clone(), self.def.clone(), self.st.run_id.clone());
                let fut = activity::run(inner, def, run_id, slot, args, key, not_before_ms);
                self.spawn_attempt(tasks, slot, fut);
            }
        }
    }

    /// Handles a request from outside the run.
    async fn control(&mut self, msg: Option<Box<Control>>, tasks: &mut JoinSet<TaskResult>) {
        match msg.map(|m| *m) {
            None => {}
            Some(Control::Stop {
                reason,
                terminate,
                reply,
            }) => {
                tasks.abort_all();
                self.stop_children().await;
                info!(%reason, terminate, "run stopped by request");
                let end = if terminate {
                    Event::RunTerminated { reason }
                } else {
                    Event::RunCancelled { reason }
                };
                self.journal(vec![end], tasks).await;
                let _ = reply.send(Ok(true));
            }
            Some(Control::Signal {
                name,
                id,
                payload,
                by,
                reply,
            }) => {
                let res = self.signal(name, id, payload, by, tasks).await;
                let _ = reply.send(res);
            }
            Some(Control::Approve {
                step,
                approved,
                by,
                vouched,
                comment,
                id,
                reply,
            }) => {
                let res = match self.check_approval(&step, &by, vouched) {
                    Ok(visit) => {
                        let payload = serde_json::json!({
                            "approved": approved, "by": by, "comment": comment, "visit": visit,
                        });
                        self.signal(engine::approval_signal(&step), id, payload, None, tasks)
                            .await
                    }
                    Err(e) => Err(e),
                };
                let _ = reply.send(res);
            }
        }
    }

    /// Journals a signal unless its id was seen before; true when it was new.
    async fn signal(
        &mut self,
        name: String,
        id: String,
        payload: Value,
        by: Option<String>,
        tasks: &mut JoinSet<TaskResult>,
    ) -> Result<bool, RuntimeError> {
        if self.st.signals.iter().any(|s| s.id == id) {
            info!(signal = %name, id = %id, "repeated signal ignored");
            return Ok(false);
        }
        let payload = payload.to_string();
        if payload.len() > MAX_INPUT_BYTES {
            return Err(RuntimeError::Invalid(format!(
                "signal payload is {} bytes; the limit is {MAX_INPUT_BYTES} bytes",
                payload.len()
            )));
        }
        // Every signal is journaled and kept (for dedupe) for the run's life: bound both what
        // waits unconsumed and what one run can ever take, or a sender in a loop fills the disk.
        let pending = self.st.signals.iter().filter(|s| !s.consumed).count();
        if pending >= MAX_PENDING_SIGNALS {
            return Err(RuntimeError::Invalid(format!(
                "run '{}' already holds {pending} signals no step has taken (the limit is {MAX_PENDING_SIGNALS}); signal '{name}' refused",
                self.st.run_id
            )));
        }
        if self.st.signals.len() >= MAX_SIGNALS_PER_RUN {
            return Err(RuntimeError::Invalid(format!(
                "run '{}' has received {MAX_SIGNALS_PER_RUN} signals, the most one run takes; signal '{name}' refused (continue as new to reset)",
                self.st.run_id
            )));
        }
        info!(signal = %name, id = %id, "signal received");
        let mut events = vec![Event::SignalReceived {
            name,
            id: id.clone(),
            payload,
        }];
        if let Some(by) = by {
            events.push(Event::SignalFrom { id, by });
        }
        self.journal(events, tasks).await;
        Ok(true)
    }

    /// The visit of approval step `step` that is waiting for a decision `by` may make.
    fn check_approval(&self, step: &str, by: &str, vouched: bool) -> Result<u32, RuntimeError> {
        let Some((i, s)) = self.def.step(step) else {
            return Err(RuntimeError::Invalid(format!(
                "workflow {} has no step '{step}'",
                self.def.name()
            )));
        };
        if self.def.plans[i].kind != StepKind::Approval {
            return Err(RuntimeError::Invalid(format!(
                "step '{step}' is a {} step, not an approval",
                s.action
            )));
        }
        let state = &self.st.steps[i];
        if !matches!(state.phase, engine::Phase::Waiting { .. }) {
            return Err(RuntimeError::Invalid(format!(
                "step '{step}' is not waiting for approval (it is {})",
                engine::phase_name(&state.phase)
            )));
        }
        if let Some(list) = s.args.get("approvers").and_then(Value::as_array)
            && !vouched
            && !list.iter().any(|a| a.as_str() == Some(by))
        {
            let names: Vec<String> = list
                .iter()
                .map(|a| a.as_str().unwrap_or_default().to_string())
                .collect();
            return Err(RuntimeError::Invalid(format!(
                "'{by}' may not decide step '{step}' (approvers: {})",
                names.join(", ")
            )));
        }
        Ok(state.visits)
    }

    /// Cancels the child runs of steps in flight (a parent's cancel reaches its children).
    async fn stop_children(&self) {
        let rt = Runtime {
            inner: self.inner.clone(),
        };
        for (i, s) in self.st.steps.iter().enumerate() {
            let step = &self.def.doc.steps[i];
            if !self.def.plans[i].kind.starts_children() {
                continue;
            }
            // An attempt in flight may not be folded in yet: its visit is the current or the next.
            for visit in [s.visits, s.visits + 1] {
                let base = super::children::child_id(&self.st.run_id, &step.id, visit);
                for id in rt.children_of(&base) {
                    if let Err(e) = rt.stop(&id, "parent run stopped", false).await {
                        warn!(child = %id, error = %e, "cannot cancel child run");
                    }
                }
            }
        }
    }

    fn absorb(&mut self, events: Vec<Event>) {
        self.next = None;
        for e in events {
            if let Err(err) = self.st.apply(&self.def, &e) {
                error!(error = %err, "journaled event does not fit the definition");
            }
            if e.is_terminal() {
                self.end = Some(e);
            }
        }
    }

    /// Journals events (retrying while storage fails: nothing is lost, the run just waits) and
    /// folds them into the state. When these events make the run's end certain, the end is
    /// journaled in the same commit: it is a pure consequence, so no effect depends on it early.
    async fn journal(&mut self, mut events: Vec<Event>, tasks: &mut JoinSet<TaskResult>) {
        let was_compensating = self.st.status == RunStatus::Compensating;
        self.absorb(events.clone());
        self.chain_pure(&mut events);
        self.start_attempts(&mut events);
        let starts_compensating = !was_compensating && self.st.status == RunStatus::Compensating;
        if self.st.status.is_terminal() || starts_compensating {
            // The run ends (or turns to undoing) with this commit: what still runs must stop first.
            tasks.abort_all();
            self.stop_children().await;
        }
        if events.iter().any(|e| matches!(e, Event::RunContinued { .. })) {
            // The next run is a new run in the sync outbox like any start: wait for room (this
            // run waits with it) rather than slip past the cap.
            let rt = Runtime {
                inner: self.inner.clone(),
            };
            // Only `exists` can fail, and there is none here.
            let _ = rt.wait_for_outbox_room("continue-as-new", || Ok(false)).await;
        }
        if !append_durably(&self.inner, &self.st.run_id, events).await {
            // Finished elsewhere (cannot happen with one driver per run); stop deciding.
            self.st.status = RunStatus::Cancelled;
            self.next = None;
            self.prepared.clear();
            return;
        }
        if let Some(Event::RunContinued { next_run, .. }) = &self.end {
            // The next run was created in the same commit; give it a driver.
            let rt = Runtime {
                inner: self.inner.clone(),
            };
            if let Err(e) = rt.resume(next_run) {
                error!(next_run = %next_run, error = %e, "cannot start the continued run; it resumes at restart");
            } else {
                info!(next_run = %next_run, "continued as new");
            }
        }
    }

    /// Chains onto `events` (already folded) the decisions that are only records (a `set`, a
    /// skip, a choice, the run's end): they follow purely from what is folded and have no
    /// effect, so they join the same commit, and a loop of pure steps costs one fsync per batch
    /// instead of one per step. The first decision that is not pure is kept for the next turn.
    fn chain_pure(&mut self, events: &mut Vec<Event>) {
        while !self.st.status.is_terminal() {
            let next = engine::decide(&self.def, &self.st);
            let pure = !next.is_empty() && next.iter().all(|c| matches!(c, Command::Record(_)));
            if !pure || events.len() >= MAX_PURE_BATCH {
                // The state will not change before the driver decides again: keep the decision.
                self.next = Some(next);
                break;
            }
            let records: Vec<Event> = next
                .into_iter()
                .filter_map(|c| match c {
                    Command::Record(e) => Some(e),
                    _ => None,
                })
                .collect();
            self.absorb(records.clone());
            events.extend(records);
        }
    }

    /// Journals with `events` the start of each attempt the kept decision runs whose gates are
    /// all open now ([`activity::gates_open`]): the start is durable in the same commit as what
    /// led to it, instead of in a commit of its own, and the attempt is spawned after it
    /// (`spawn_prepared`). Attempts that would wait at a gate go the usual way.
    fn start_attempts(&mut self, events: &mut Vec<Event>) {
        if !self.admitted {
            return;
        }
        let Some(next) = self.next.take() else { return };
        let mut rest = Vec::with_capacity(next.len());
        let mut started = Vec::new();
        for cmd in next {
            let held = match &cmd {
                Command::RunActivity {
                    step,
                    visit,
                    attempt,
                    args,
                    not_before_ms,
                    compensation,
                    ..
                } => {
                    let slot = (*step, *visit, *attempt, *compensation);
                    (!self.running(slot))
                        .then(|| activity::gates_open(&self.inner, &self.def, slot, args, *not_before_ms))
                        .flatten()
                }
                _ => None,
            };
            match (cmd, held) {
                (
                    Command::RunActivity {
                        step,
                        visit,
                        attempt,
                        args,
                        key,
                        compensation,
                        ..
                    },
                    Some(held),
                ) => {
                    let id = &self.def.doc.steps[step].id;
                    started.push(engine::attempt_started(id, visit, attempt, key.clone(), compensation));
                    let slot = (step, visit, attempt, compensation);
                    self.prepared.push(Prepared { slot, args, key, held });
                }
                (cmd, _) => rest.push(cmd),
            }
        }
        // The kept decision stays right for the other steps: these starts change only their own.
        self.next = Some(rest);
        if !started.is_empty() {
            let next = self.next.take();
            self.absorb(started.clone());
            self.next = next;
            events.extend(started);
        }
    }

    /// The records a new run begins with, folded: its first decisions when they are pure and
    /// the starts of the attempts that follow when their gates are open, to be journaled in the
    /// commit that starts the run (`Journal::start_run_with`). Empty for a workflow that may
    /// continue as new (that needs the outbox check and the next run's driver that only
    /// `journal` does). Only for a run that holds its admission slots.
    pub(super) fn first_records(&mut self) -> Vec<Event> {
        self.admitted = true;
        let mut events = Vec::new();
        if !self.def.plans.iter().any(|p| p.kind == StepKind::ContinueAsNew) {
            self.chain_pure(&mut events);
            self.start_attempts(&mut events);
        }
        events
    }
}

/// Most events one driver journals in a single commit when it chains pure decisions.
const MAX_PURE_BATCH: usize = 512;
