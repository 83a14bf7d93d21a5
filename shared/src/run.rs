//! The one model of a run: a run's history folded into where it and each of its steps stand.
//! The agent's engine decides from it, the agent's API and CLI show it, and cloud-sync's API
//! and console show the same fold of the mirrored journal, so every view of a run agrees.
//! Pure: a definition and events in, state out; no clock (times come from the records).

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use crate::definition::Definition;
use crate::journal::{ErrorInfo, Event, Record, rfc3339};

/// Where a run stands.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunStatus {
    /// Still going.
    #[default]
    Running,
    /// Finished successfully.
    Completed,
    /// Finished with an error.
    Failed,
    /// Stopped by a cancel request.
    Cancelled,
    /// Failed, and every compensation succeeded.
    Compensated,
    /// Failed, and a compensation failed too.
    CompensationFailed,
    /// Stopped by an operator without compensation.
    Terminated,
    /// Ended by continuing as a new run.
    Continued,
    /// Failed and running its compensations.
    Compensating,
}

impl RunStatus {
    /// Every status, for parsing.
    pub const ALL: [RunStatus; 9] = [
        RunStatus::Running,
        RunStatus::Completed,
        RunStatus::Failed,
        RunStatus::Cancelled,
        RunStatus::Compensated,
        RunStatus::CompensationFailed,
        RunStatus::Terminated,
        RunStatus::Continued,
        RunStatus::Compensating,
    ];
    /// True once the run can no longer change.
    pub fn is_terminal(self) -> bool {
        !matches!(self, RunStatus::Running | RunStatus::Compensating)
    }
    /// Lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            RunStatus::Running => "running",
            RunStatus::Completed => "completed",
            RunStatus::Failed => "failed",
            RunStatus::Cancelled => "cancelled",
            RunStatus::Compensated => "compensated",
            RunStatus::CompensationFailed => "compensation_failed",
            RunStatus::Terminated => "terminated",
            RunStatus::Continued => "continued",
            RunStatus::Compensating => "compensating",
        }
    }
    /// The status named `name` (as [`RunStatus::as_str`] spells it).
    pub fn parse(name: &str) -> Option<RunStatus> {
        RunStatus::ALL.into_iter().find(|s| s.as_str() == name)
    }
    /// The status a run has after event `e`, when `e` changes it.
    pub fn after(e: &Event) -> Option<RunStatus> {
        match e {
            Event::CompensationStarted { .. } => Some(RunStatus::Compensating),
            Event::RunRetried { .. } => Some(RunStatus::Running),
            e => RunStatus::of_terminal(e),
        }
    }
    /// The status a terminal event gives a run.
    pub fn of_terminal(e: &Event) -> Option<RunStatus> {
        Some(match e {
            Event::RunCompleted { .. } => RunStatus::Completed,
            Event::RunFailed { .. } => RunStatus::Failed,
            Event::RunCancelled { .. } => RunStatus::Cancelled,
            Event::RunCompensated { .. } => RunStatus::Compensated,
            Event::RunCompensationFailed { .. } => RunStatus::CompensationFailed,
            Event::RunTerminated { .. } => RunStatus::Terminated,
            Event::RunContinued { .. } => RunStatus::Continued,
            _ => return None,
        })
    }
}

/// Where one step stands within its current visit.
#[derive(Debug, Clone, PartialEq)]
pub enum Phase {
    /// Not started in this run (or not yet revisited).
    Idle,
    /// An attempt was started and has no result yet.
    Running {
        /// The attempt in flight.
        attempt: u32,
    },
    /// The last attempt failed; the next one is due at `retry_at_ms`.
    Backoff {
        /// The attempt that failed.
        attempt: u32,
        /// When the next attempt is due.
        retry_at_ms: u64,
    },
    /// Waiting for a signal or an approval.
    Waiting {
        /// The signal awaited: an approval step's decision or a user's signal.
        signal: SignalName,
        /// Deadline, if the wait has a timeout.
        fire_at_ms: Option<u64>,
        /// Timeout length.
        duration_ms: u64,
    },
    /// The wait's timeout fired before the signal came.
    TimedOut,
    /// A durable timer is pending.
    Timer {
        /// Wall-clock deadline.
        fire_at_ms: u64,
        /// Requested length.
        duration_ms: u64,
    },
    /// Finished with an output.
    Completed,
    /// Failed for good.
    Failed,
    /// Skipped (DAG).
    Skipped,
}

/// One step's folded history.
#[derive(Debug, Clone)]
pub struct StepState {
    /// Visits started so far (loops revisit steps).
    pub visits: u32,
    /// State of the current visit.
    pub phase: Phase,
    /// Latest output.
    pub output: Option<Value>,
    /// Latest error.
    pub error: Option<ErrorInfo>,
    /// The circuit breaker holding the next attempt back, and until when.
    pub deferred: Option<(String, u64)>,
    /// Attempts of the current visit: the activity's attempts, or 1 once a step without
    /// attempts (`set`, `sleep`, a wait, an approval) has begun.
    pub attempts: u32,
    /// When the current visit began (only when folded from records, which carry times).
    pub started_ms: Option<u64>,
    /// When the current visit ended.
    pub finished_ms: Option<u64>,
    /// The idempotency key of the current visit's attempts.
    pub key: Option<String>,
}

impl StepState {
    fn fresh() -> Self {
        StepState {
            visits: 0,
            phase: Phase::Idle,
            output: None,
            error: None,
            deferred: None,
            attempts: 0,
            started_ms: None,
            finished_ms: None,
            key: None,
        }
    }
}

/// One completed visit that has a compensation, and where that compensation stands.
#[derive(Debug, Clone)]
pub struct Compensation {
    /// Step index.
    pub step: usize,
    /// The visit it compensates.
    pub visit: u32,
    /// Idle, Running, Backoff, Completed or Failed.
    pub phase: Phase,
    /// The compensation's latest error.
    pub error: Option<ErrorInfo>,
}

/// A signal kept in a run's state until a step consumes it.
#[derive(Debug, Clone)]
pub struct Signal {
    /// Name.
    pub name: String,
    /// Sender's id.
    pub id: String,
    /// Payload.
    pub payload: Value,
    /// True once a step consumed it.
    pub consumed: bool,
}

/// A run's history folded into the state the decisions need.
#[derive(Debug, Clone)]
pub struct RunState {
    /// Run id.
    pub run_id: String,
    /// Run input.
    pub input: Value,
    /// Overall status.
    pub status: RunStatus,
    /// Per step, same order as the definition.
    pub steps: Vec<StepState>,
    /// State machine: the step of the current visit.
    pub cursor: Option<usize>,
    /// Output once completed.
    pub output: Option<Value>,
    /// Error once failed (while compensating: the failure being compensated).
    pub error: Option<ErrorInfo>,
    /// Completed visits with a compensation, in completion order.
    pub compensations: Vec<Compensation>,
    /// Signals received, in arrival order.
    pub signals: Vec<Signal>,
}

/// Errors that a history inconsistent with its definition produces (a corrupt or foreign journal).
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    /// The history names a step the definition does not have.
    #[error("history of run {run} names step '{step}', which definition {workflow} v{version} does not have")]
    UnknownStep {
        /// Run.
        run: String,
        /// Step.
        step: String,
        /// Workflow.
        workflow: String,
        /// Version.
        version: u32,
    },
    /// The first event is not `RunStarted`.
    #[error("history of run {0} does not begin with run_started")]
    NoStart(String),
}

impl RunState {
    /// A fresh state for a run that has just started.
    pub fn new(def: &Definition, run_id: &str, input: Value) -> Self {
        RunState {
            run_id: run_id.to_string(),
            input,
            status: RunStatus::Running,
            steps: vec![StepState::fresh(); def.doc.steps.len()],
            cursor: None,
            output: None,
            error: None,
            compensations: Vec::new(),
            signals: Vec::new(),
        }
    }

    /// True while a step waits for a signal or approval with nothing else to do.
    pub fn is_waiting(&self) -> bool {
        self.steps.iter().any(|s| matches!(s.phase, Phase::Waiting { .. }))
    }

    /// The first signal named `name` that no step has consumed yet.
    pub fn pending_signal(&self, name: &str) -> Option<&Signal> {
        self.signals.iter().find(|s| !s.consumed && s.name == name)
    }

    fn compensation_mut(&mut self, step: usize, visit: u32) -> Option<&mut Compensation> {
        // A history read without its definition (the cloud may not hold that version) learns of
        // a compensation only from its own events.
        if !self.compensations.iter().any(|c| c.step == step && c.visit == visit) {
            self.compensations.push(Compensation {
                step,
                visit,
                phase: Phase::Idle,
                error: None,
            });
        }
        self.compensations
            .iter_mut()
            .find(|c| c.step == step && c.visit == visit)
    }

    /// Folds a whole history (which must begin with `RunStarted`).
    pub fn replay<'a>(
        def: &Definition,
        run_id: &str,
        events: impl IntoIterator<Item = &'a Event>,
    ) -> Result<Self, ReplayError> {
        let mut it = events.into_iter();
        let input = match it.next() {
            Some(Event::RunStarted { input, .. }) => serde_json::from_str(input).unwrap_or(Value::Null),
            _ => return Err(ReplayError::NoStart(run_id.to_string())),
        };
        let mut st = RunState::new(def, run_id, input);
        for e in it {
            st.apply(def, e)?;
        }
        Ok(st)
    }

    /// Folds a whole history of records (which carry times, so each step gets its start and end).
    pub fn replay_records(def: &Definition, run_id: &str, history: &[(u64, Record)]) -> Result<Self, ReplayError> {
        let mut it = history.iter();
        let input = match it.next() {
            Some((_, r)) => match &r.event {
                Event::RunStarted { input, .. } => serde_json::from_str(input).unwrap_or(Value::Null),
                _ => return Err(ReplayError::NoStart(run_id.to_string())),
            },
            None => return Err(ReplayError::NoStart(run_id.to_string())),
        };
        let mut st = RunState::new(def, run_id, input);
        for (_, r) in it {
            st.fold(def, Some(r.at_ms), &r.event)?;
        }
        Ok(st)
    }

    /// Applies one event (without its time: what the engine needs).
    pub fn apply(&mut self, def: &Definition, e: &Event) -> Result<(), ReplayError> {
        self.fold(def, None, e)
    }

    /// Applies one event recorded at `at_ms`.
    pub fn apply_at(&mut self, def: &Definition, at_ms: u64, e: &Event) -> Result<(), ReplayError> {
        self.fold(def, Some(at_ms), e)
    }

    fn fold(&mut self, def: &Definition, at_ms: Option<u64>, e: &Event) -> Result<(), ReplayError> {
        let idx = match e.step() {
            Some(id) => Some(def.index.get(id).copied().ok_or_else(|| ReplayError::UnknownStep {
                run: self.run_id.clone(),
                step: id.to_string(),
                workflow: def.name().to_string(),
                version: def.version(),
            })?),
            None => None,
        };
        // Every step event first makes its visit the current one (a new visit starts clean).
        let i = idx.unwrap_or_default();
        if let (Some(i), Some(visit)) = (idx, e.visit()) {
            let s = &mut self.steps[i];
            if visit > s.visits {
                s.visits = visit;
                s.output = None;
                s.error = None;
                s.attempts = 0;
                s.started_ms = None;
                s.finished_ms = None;
                s.key = None;
            }
            if s.started_ms.is_none() {
                s.started_ms = at_ms;
            }
            if s.attempts == 0 && !matches!(e, Event::AttemptStarted { .. } | Event::AttemptDeferred { .. }) {
                // A step without attempts (`set`, `sleep`, a wait) has begun its only one.
                s.attempts = 1;
            }
            self.cursor = Some(i);
        }
        match e {
            Event::RunStarted { .. } => {}
            Event::AttemptStarted { attempt, key, .. } => {
                let s = &mut self.steps[i];
                s.phase = Phase::Running { attempt: *attempt };
                s.deferred = None;
                s.attempts = s.attempts.max(*attempt);
                s.key = Some(key.clone());
            }
            Event::AttemptFailed {
                attempt,
                error,
                retry_at_ms,
                ..
            } => {
                let s = &mut self.steps[i];
                s.error = Some(error.clone());
                if let Some(at) = retry_at_ms {
                    s.phase = Phase::Backoff {
                        attempt: *attempt,
                        retry_at_ms: *at,
                    };
                }
            }
            Event::StepCompleted { output, visit, .. } => {
                let s = &mut self.steps[i];
                s.phase = Phase::Completed;
                // The step succeeded: an earlier attempt's failure is history, not its result.
                s.error = None;
                s.finished_ms = at_ms;
                let output: Value = serde_json::from_str(output).unwrap_or(Value::Null);
                // A wait_signal step's output names the signal it consumed.
                if def.plans[i].kind == crate::definition::StepKind::WaitSignal
                    && let Some(id) = output.get("signal_id").and_then(Value::as_str)
                    && let Some(sig) = self.signals.iter_mut().find(|s| s.id == id)
                {
                    sig.consumed = true;
                }
                s.output = Some(output);
                if def.plans[i].compensate.is_some() {
                    self.compensations.push(Compensation {
                        step: i,
                        visit: *visit,
                        phase: Phase::Idle,
                        error: None,
                    });
                }
            }
            Event::StepFailed { error, .. } => {
                let s = &mut self.steps[i];
                s.phase = Phase::Failed;
                s.error = Some(error.clone());
                s.finished_ms = at_ms;
            }
            Event::StepSkipped { .. } => {
                let s = &mut self.steps[i];
                s.phase = Phase::Skipped;
                s.started_ms = s.started_ms.or(at_ms);
                s.finished_ms = at_ms;
            }
            Event::TimerSet {
                fire_at_ms,
                duration_ms,
                ..
            } => {
                self.steps[i].phase = Phase::Timer {
                    fire_at_ms: *fire_at_ms,
                    duration_ms: *duration_ms,
                };
            }
            Event::TimerFired { .. } => {
                // A sleep completes in the same batch; a wait's timeout is decided next.
                if matches!(self.steps[i].phase, Phase::Waiting { .. }) {
                    self.steps[i].phase = Phase::TimedOut;
                }
            }
            Event::RunCompleted { output } => {
                self.status = RunStatus::Completed;
                self.output = Some(serde_json::from_str(output).unwrap_or(Value::Null));
            }
            Event::RunFailed { error } => {
                self.status = RunStatus::Failed;
                self.error = Some(error.clone());
            }
            Event::RunCancelled { reason } => {
                self.status = RunStatus::Cancelled;
                self.error = Some(ErrorInfo::new("cancelled", reason.clone()));
            }
            Event::CompensationStarted { error } => {
                self.status = RunStatus::Compensating;
                self.error = Some(error.clone());
            }
            Event::CompensationAttemptStarted { visit, attempt, .. } => {
                if let Some(c) = self.compensation_mut(i, *visit) {
                    c.phase = Phase::Running { attempt: *attempt };
                }
            }
            Event::CompensationAttemptFailed {
                visit,
                attempt,
                error,
                retry_at_ms,
                ..
            } => {
                if let Some(c) = self.compensation_mut(i, *visit) {
                    c.error = Some(error.clone());
                    if let Some(at) = retry_at_ms {
                        c.phase = Phase::Backoff {
                            attempt: *attempt,
                            retry_at_ms: *at,
                        };
                    }
                }
            }
            Event::StepCompensated { visit, .. } => {
                if let Some(c) = self.compensation_mut(i, *visit) {
                    c.phase = Phase::Completed;
                }
            }
            Event::CompensationFailed { visit, error, .. } => {
                if let Some(c) = self.compensation_mut(i, *visit) {
                    c.phase = Phase::Failed;
                    c.error = Some(error.clone());
                }
            }
            Event::RunCompensated { .. } => self.status = RunStatus::Compensated,
            Event::RunCompensationFailed { step, error } => {
                self.status = RunStatus::CompensationFailed;
                self.error = Some(ErrorInfo::new(
                    error.kind.clone(),
                    format!("compensation of step '{step}' failed: {}", error.message),
                ));
            }
            Event::SignalReceived { name, id, payload } => {
                if !self.signals.iter().any(|s| s.id == *id) {
                    self.signals.push(Signal {
                        name: name.clone(),
                        id: id.clone(),
                        payload: serde_json::from_str(payload).unwrap_or(Value::Null),
                        consumed: false,
                    });
                }
            }
            Event::WaitStarted {
                signal,
                fire_at_ms,
                duration_ms,
                ..
            } => {
                self.steps[i].phase = Phase::Waiting {
                    signal: SignalName::parse(signal),
                    fire_at_ms: *fire_at_ms,
                    duration_ms: *duration_ms,
                };
            }
            Event::RunRetried { .. } => {
                self.status = RunStatus::Running;
                self.error = None;
                self.output = None;
                for s in &mut self.steps {
                    if s.phase == Phase::Failed {
                        // The next visit starts afresh with its own key and attempt budget.
                        s.phase = Phase::Idle;
                    }
                }
            }
            Event::RunTerminated { reason } => {
                self.status = RunStatus::Terminated;
                self.error = Some(ErrorInfo::new("terminated", reason.clone()));
            }
            Event::RunContinued { next_run, .. } => {
                self.status = RunStatus::Continued;
                self.output = Some(json!({ "continued_as": next_run }));
            }
            // Who sent a signal, and restarts: for people reading the history, no effect on the run.
            Event::SignalFrom { .. } | Event::RunResumed { .. } => {}
            Event::AttemptDeferred {
                attempt,
                target,
                until_ms,
                ..
            } => {
                let s = &mut self.steps[i];
                s.phase = Phase::Backoff {
                    attempt: attempt.saturating_sub(1),
                    retry_at_ms: *until_ms,
                };
                s.deferred = Some((target.clone(), *until_ms));
            }
        }
        Ok(())
    }

    /// The variables conditions and templates see: `input`, `steps.<id>.{status, output,
    /// error, visits}` and `run.{id, workflow, version}`.
    pub fn scope(&self, def: &Definition) -> crate::expr::Scope {
        let steps = self
            .steps
            .iter()
            .zip(&def.doc.steps)
            .map(|(s, d)| crate::expr::StepScope {
                id: &d.id,
                status: phase_name(&s.phase),
                output: s.output.as_ref(),
                error: s.error.as_ref().map(|e| (e.kind.as_str(), e.message.as_str())),
                visits: s.visits,
            });
        crate::expr::scope(&self.input, steps, (&self.run_id, def.name(), def.version()))
    }
}

/// Lower-case name of a phase, as shown to users and templates.
pub fn phase_name(p: &Phase) -> &'static str {
    match p {
        Phase::Idle => "pending",
        Phase::Running { .. } => "running",
        Phase::Backoff { .. } => "retrying",
        Phase::Timer { .. } => "sleeping",
        Phase::Waiting { .. } => "waiting",
        Phase::TimedOut => "timed_out",
        Phase::Completed => "completed",
        Phase::Failed => "failed",
        Phase::Skipped => "skipped",
    }
}

/// The wire prefix of the signals that carry approval decisions.
const APPROVAL_PREFIX: &str = "approval:";

/// A signal's name, typed: the decision for an approval step, or a signal a user sends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SignalName {
    /// The decision for approval step `0` (`approval:STEP` on the wire).
    Approval(String),
    /// A user's signal, by the name a `wait_signal` step waits for.
    User(String),
}

impl SignalName {
    /// Reads a name as journaled.
    pub fn parse(wire: &str) -> SignalName {
        match wire.strip_prefix(APPROVAL_PREFIX) {
            Some(step) => SignalName::Approval(step.to_string()),
            None => SignalName::User(wire.to_string()),
        }
    }
    /// The wire name of the decision for approval step `step`.
    pub fn approval_of(step: &str) -> String {
        format!("{APPROVAL_PREFIX}{step}")
    }
    /// True when users may not send a signal of this name (it is reserved for decisions).
    pub fn is_reserved(wire: &str) -> bool {
        wire.starts_with(APPROVAL_PREFIX)
    }
    /// The name as journaled.
    pub fn wire(&self) -> String {
        match self {
            SignalName::Approval(step) => Self::approval_of(step),
            SignalName::User(name) => name.clone(),
        }
    }
}

/// Where a step stands as people see it: the engine's phase, read in the light of the run's
/// status (a step still sleeping in a cancelled run was stopped, not asleep).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepStatus {
    /// Not reached yet.
    Pending,
    /// An attempt is running.
    Running,
    /// An attempt failed (or a circuit breaker holds it back); the next one is due.
    Retrying,
    /// A `sleep` step's timer is pending.
    Sleeping,
    /// Waiting for a signal or an approval.
    Waiting,
    /// The wait's timeout fired; what follows is being decided.
    TimedOut,
    /// Succeeded.
    Completed,
    /// Failed for good.
    Failed,
    /// Skipped: its condition was false, or the run completed without reaching it.
    Skipped,
    /// Under way when the run ended (cancelled, terminated, or another step failed it).
    Cancelled,
    /// Never reached: the run ended otherwise than by completing.
    NotRun,
}

impl StepStatus {
    /// Every status, in the order a legend shows them.
    pub const ALL: [StepStatus; 11] = [
        StepStatus::Pending,
        StepStatus::Running,
        StepStatus::Retrying,
        StepStatus::Sleeping,
        StepStatus::Waiting,
        StepStatus::TimedOut,
        StepStatus::Completed,
        StepStatus::Failed,
        StepStatus::Skipped,
        StepStatus::Cancelled,
        StepStatus::NotRun,
    ];
    /// Lower-case name, as the API, the CLI and the console's CSS classes spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            StepStatus::Pending => "pending",
            StepStatus::Running => "running",
            StepStatus::Retrying => "retrying",
            StepStatus::Sleeping => "sleeping",
            StepStatus::Waiting => "waiting",
            StepStatus::TimedOut => "timed_out",
            StepStatus::Completed => "completed",
            StepStatus::Failed => "failed",
            StepStatus::Skipped => "skipped",
            StepStatus::Cancelled => "cancelled",
            StepStatus::NotRun => "not_run",
        }
    }
}

/// Where a step's compensation stands, once the run has begun undoing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CompensationStatus {
    /// Due, not started yet.
    Pending,
    /// Running or backing off.
    Compensating,
    /// Undone.
    Compensated,
    /// The compensation failed for good.
    Failed,
}

impl CompensationStatus {
    /// Lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            CompensationStatus::Pending => "pending",
            CompensationStatus::Compensating => "compensating",
            CompensationStatus::Compensated => "compensated",
            CompensationStatus::Failed => "failed",
        }
    }
}

/// One step as every view shows it (the agent's `show`, both APIs, the console's graph).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepRow {
    /// Step id.
    pub id: String,
    /// Action name.
    pub action: String,
    /// Where it stands.
    pub status: StepStatus,
    /// Visits so far (loops revisit steps).
    pub visits: u32,
    /// Attempts of the current visit.
    pub attempts: u32,
    /// When the current visit began (RFC 3339).
    pub started_at: Option<String>,
    /// When it ended.
    pub finished_at: Option<String>,
    /// From start to end, or to now while under way.
    pub duration_ms: Option<u64>,
    /// When the next attempt is due, while retrying.
    pub next_retry_at: Option<String>,
    /// The current visit's idempotency key.
    pub idempotency_key: Option<String>,
    /// The current visit's output.
    pub output: Value,
    /// The current visit's error (none once it succeeded).
    pub error: Option<ErrorInfo>,
    /// Its compensation, once the run is undoing or has undone it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compensation: Option<CompensationStatus>,
    /// The compensation's latest error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compensation_error: Option<ErrorInfo>,
}

impl RunState {
    /// Where step `i` stands as people see it.
    pub fn step_status(&self, i: usize) -> StepStatus {
        let Some(s) = self.steps.get(i) else {
            return StepStatus::Pending;
        };
        let ended = self.status.is_terminal();
        match &s.phase {
            Phase::Idle if ended && self.status == RunStatus::Completed => StepStatus::Skipped,
            Phase::Idle if ended => StepStatus::NotRun,
            Phase::Idle => StepStatus::Pending,
            Phase::Completed => StepStatus::Completed,
            Phase::Failed => StepStatus::Failed,
            Phase::Skipped => StepStatus::Skipped,
            _ if ended => StepStatus::Cancelled,
            Phase::Running { .. } => StepStatus::Running,
            Phase::Backoff { .. } => StepStatus::Retrying,
            Phase::Timer { .. } => StepStatus::Sleeping,
            Phase::Waiting { .. } => StepStatus::Waiting,
            Phase::TimedOut => StepStatus::TimedOut,
        }
    }

    /// Where step `i`'s latest compensation stands, once there is one to show.
    pub fn compensation_status(&self, i: usize) -> Option<(CompensationStatus, Option<&ErrorInfo>)> {
        let c = self.compensations.iter().rev().find(|c| c.step == i)?;
        let status = match c.phase {
            Phase::Completed => CompensationStatus::Compensated,
            Phase::Failed => CompensationStatus::Failed,
            Phase::Idle if self.status == RunStatus::Compensating => CompensationStatus::Pending,
            Phase::Idle => return None,
            _ => CompensationStatus::Compensating,
        };
        Some((status, c.error.as_ref()))
    }

    /// Every step as shown; `now_ms` gives the duration of what is still under way.
    pub fn step_rows(&self, def: &Definition, now_ms: u64) -> Vec<StepRow> {
        def.doc
            .steps
            .iter()
            .zip(&self.steps)
            .enumerate()
            .map(|(i, (step, s))| {
                let comp = self.compensation_status(i);
                let next_retry = match s.phase {
                    Phase::Backoff { retry_at_ms, .. } if !self.status.is_terminal() => Some(retry_at_ms),
                    _ => None,
                };
                let end = s.finished_ms.unwrap_or(now_ms);
                StepRow {
                    id: step.id.clone(),
                    action: step.action.clone(),
                    status: self.step_status(i),
                    visits: s.visits,
                    attempts: s.attempts,
                    started_at: s.started_ms.map(rfc3339),
                    finished_at: s.finished_ms.map(rfc3339),
                    duration_ms: s.started_ms.map(|t| end.saturating_sub(t)),
                    next_retry_at: next_retry.map(rfc3339),
                    idempotency_key: s.key.clone(),
                    output: s.output.clone().unwrap_or(Value::Null),
                    error: s.error.clone(),
                    compensation: comp.map(|(c, _)| c),
                    compensation_error: comp.and_then(|(_, e)| e.cloned()),
                }
            })
            .collect()
    }

    /// The signals the run's steps wait for now, by step id.
    pub fn open_waits<'a>(&self, def: &'a Definition) -> Vec<(&'a str, SignalName)> {
        if self.status.is_terminal() {
            return Vec::new();
        }
        self.steps
            .iter()
            .zip(&def.doc.steps)
            .filter_map(|(s, step)| match &s.phase {
                Phase::Waiting { signal, .. } => Some((step.id.as_str(), signal.clone())),
                _ => None,
            })
            .collect()
    }

    /// Why a run that is still going is not progressing, in words (empty once it ended).
    pub fn waiting_reasons(&self, def: &Definition) -> Vec<String> {
        if self.status.is_terminal() {
            return Vec::new();
        }
        let mut reasons = Vec::new();
        if self.status == RunStatus::Compensating
            && let Some(c) = self.compensations.iter().rev().find(|c| c.phase != Phase::Completed)
            && let Some(step) = def.doc.steps.get(c.step)
        {
            reasons.push(format!("compensating {}: {}", step.id, phase_name(&c.phase)));
        }
        for (s, step) in self.steps.iter().zip(&def.doc.steps) {
            let id = &step.id;
            match &s.phase {
                Phase::Running { attempt } => reasons.push(format!("{id}: attempt {attempt} running")),
                Phase::Backoff { .. } if s.deferred.is_some() => {
                    if let Some((target, until)) = &s.deferred {
                        reasons.push(format!(
                            "{id}: held until {} by the open circuit breaker of '{target}'",
                            rfc3339(*until)
                        ));
                    }
                }
                Phase::Backoff { attempt, retry_at_ms } => reasons.push(format!(
                    "{id}: backing off until {} after {attempt} failed attempt(s){}",
                    rfc3339(*retry_at_ms),
                    s.error
                        .as_ref()
                        .map(|e| format!(" (last error: {e})"))
                        .unwrap_or_default()
                )),
                Phase::Timer { fire_at_ms, .. } => {
                    reasons.push(format!("{id}: sleeping until {}", rfc3339(*fire_at_ms)))
                }
                Phase::Waiting { signal, fire_at_ms, .. } => {
                    let what = match signal {
                        SignalName::Approval(_) => "waiting for approval".to_string(),
                        SignalName::User(name) => format!("waiting for signal '{name}'"),
                    };
                    let until = fire_at_ms
                        .map(|t| format!(" (times out at {})", rfc3339(t)))
                        .unwrap_or_default();
                    reasons.push(format!("{id}: {what}{until}"));
                }
                _ => {}
            }
        }
        reasons
    }
}

impl Definition {
    /// A stand-in definition for a history whose definition is not at hand: one step per step
    /// the history names, in order of first mention, so the fold can still place every event.
    pub fn outline(workflow: &str, version: u32, history: &[(u64, Record)]) -> Definition {
        let mut steps: Vec<crate::definition::Step> = Vec::new();
        let mut index = std::collections::HashMap::new();
        for (_, r) in history {
            if let Some(id) = r.event.step()
                && !index.contains_key(id)
            {
                index.insert(id.to_string(), steps.len());
                steps.push(crate::definition::Step::outline(id));
            }
        }
        Definition::from_parts(workflow, version, steps, index)
    }
}

/// Serde as text (`"completed"`), for stores that kept the status as a string before it was
/// typed: the bytes on disk stay the same.
pub mod status_text {
    use super::RunStatus;
    use serde::{Deserialize, Deserializer, Serializer};

    /// Writes the status's name.
    pub fn serialize<S: Serializer>(s: &RunStatus, ser: S) -> Result<S::Ok, S::Error> {
        ser.serialize_str(s.as_str())
    }
    /// Reads a status's name; an unknown one is an error naming it.
    pub fn deserialize<'de, D: Deserializer<'de>>(de: D) -> Result<RunStatus, D::Error> {
        let name = String::deserialize(de)?;
        RunStatus::parse(&name).ok_or_else(|| serde::de::Error::custom(format!("unknown run status '{name}'")))
    }
}

/// Accepts every action: the cloud reads definitions to show runs, it never runs them.
struct AnyAction;

impl crate::definition::ActionCatalog for AnyAction {
    fn names(&self) -> Vec<String> {
        Vec::new()
    }
    fn check(&self, _action: &str, _args: &Map<String, Value>) -> Option<Vec<String>> {
        Some(Vec::new())
    }
}

/// The fold of a mirrored history (the cloud's view of a run): with its definition when the
/// document is at hand, else with an outline of the steps the history names. `None` when the
/// history does not begin with the run's start.
pub fn fold_mirrored(
    workflow: &str,
    version: u32,
    document: Option<&crate::definition::Document>,
    run_id: &str,
    history: &[(u64, Record)],
) -> Option<(Definition, RunState)> {
    if let Some(def) = document.and_then(|d| crate::definition::validate(d.clone(), &AnyAction).ok())
        && let Ok(st) = RunState::replay_records(&def, run_id, history)
    {
        return Some((def, st));
    }
    let def = Definition::outline(workflow, version, history);
    let st = RunState::replay_records(&def, run_id, history).ok()?;
    Some((def, st))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(at_ms: u64, event: Event) -> (u64, Record) {
        (
            at_ms,
            Record {
                run_id: "r".into(),
                at_ms,
                event,
            },
        )
    }

    fn start() -> (u64, Record) {
        rec(
            0,
            Event::RunStarted {
                workflow: "w".into(),
                version: 1,
                input: "{}".into(),
            },
        )
    }

    #[test]
    fn a_retried_step_that_succeeded_shows_its_output_and_its_attempts() {
        let h = vec![
            start(),
            rec(
                1,
                Event::AttemptStarted {
                    step: "a".into(),
                    visit: 1,
                    attempt: 1,
                    key: "k".into(),
                },
            ),
            rec(
                2,
                Event::AttemptFailed {
                    step: "a".into(),
                    visit: 1,
                    attempt: 1,
                    error: ErrorInfo::new("x", "boom"),
                    retry_at_ms: Some(5),
                },
            ),
            rec(
                5,
                Event::AttemptStarted {
                    step: "a".into(),
                    visit: 1,
                    attempt: 2,
                    key: "k".into(),
                },
            ),
            rec(
                9,
                Event::StepCompleted {
                    step: "a".into(),
                    visit: 1,
                    output: "7".into(),
                },
            ),
        ];
        let def = Definition::outline("w", 1, &h);
        let st = RunState::replay_records(&def, "r", &h).unwrap();
        let rows = st.step_rows(&def, 100);
        assert_eq!(rows[0].status, StepStatus::Completed);
        assert_eq!(
            (rows[0].attempts, rows[0].error.clone(), rows[0].output.clone()),
            (2, None, Value::from(7))
        );
        assert_eq!(rows[0].duration_ms, Some(8));
    }

    #[test]
    fn a_wait_counts_one_attempt_and_its_whole_duration_and_a_loop_does_not_add_up_visits() {
        let h = vec![
            start(),
            rec(
                10,
                Event::WaitStarted {
                    step: "gate".into(),
                    visit: 1,
                    signal: SignalName::approval_of("gate"),
                    fire_at_ms: None,
                    duration_ms: 0,
                },
            ),
            rec(
                48_010,
                Event::StepCompleted {
                    step: "gate".into(),
                    visit: 1,
                    output: "{}".into(),
                },
            ),
            rec(
                48_020,
                Event::AttemptStarted {
                    step: "gate".into(),
                    visit: 2,
                    attempt: 1,
                    key: "k".into(),
                },
            ),
        ];
        let def = Definition::outline("w", 1, &h);
        let st = RunState::replay_records(&def, "r", &h[..3]).unwrap();
        let row = &st.step_rows(&def, 0)[0];
        assert_eq!((row.attempts, row.duration_ms), (1, Some(48_000)));
        let st = RunState::replay_records(&def, "r", &h).unwrap();
        let row = &st.step_rows(&def, 48_020)[0];
        assert_eq!((row.visits, row.attempts, row.status), (2, 1, StepStatus::Running));
    }

    #[test]
    fn a_cancelled_run_stops_its_waits_and_a_completed_run_skips_what_it_never_reached() {
        let wait = rec(
            1,
            Event::WaitStarted {
                step: "gate".into(),
                visit: 1,
                signal: "lot-ready".into(),
                fire_at_ms: None,
                duration_ms: 0,
            },
        );
        let other = rec(
            2,
            Event::StepSkipped {
                step: "b".into(),
                reason: "x".into(),
            },
        );
        let h = vec![start(), wait.clone(), other.clone()];
        let def = Definition::outline("w", 1, &h);
        let st = RunState::replay_records(&def, "r", &h).unwrap();
        assert_eq!(st.step_status(0), StepStatus::Waiting);
        assert_eq!(
            st.open_waits(&def),
            vec![("gate", SignalName::User("lot-ready".into()))]
        );
        let mut cancelled = h.clone();
        cancelled.push(rec(3, Event::RunCancelled { reason: "stop".into() }));
        let st = RunState::replay_records(&def, "r", &cancelled).unwrap();
        assert_eq!(st.step_status(0), StepStatus::Cancelled);
        assert!(st.open_waits(&def).is_empty() && st.waiting_reasons(&def).is_empty());
        let mut done = vec![start(), other];
        done.push(rec(3, Event::RunCompleted { output: "null".into() }));
        let st = RunState::replay_records(&def, "r", &done).unwrap();
        assert_eq!(
            (st.step_status(0), st.step_status(1)),
            (StepStatus::Skipped, StepStatus::Skipped)
        );
    }

    #[test]
    fn signal_names_read_back_as_written() {
        assert_eq!(SignalName::parse("approval:qa"), SignalName::Approval("qa".into()));
        assert_eq!(SignalName::parse("lot-ready").wire(), "lot-ready");
        assert_eq!(SignalName::Approval("qa".into()).wire(), "approval:qa");
        assert!(SignalName::is_reserved("approval:x") && !SignalName::is_reserved("approve"));
    }

    #[test]
    fn a_status_keeps_its_text_form_on_disk() {
        #[derive(Serialize, Deserialize)]
        struct M {
            #[serde(with = "status_text")]
            s: RunStatus,
        }
        #[derive(Serialize)]
        struct Old {
            s: String,
        }
        let old = postcard::to_allocvec(&Old {
            s: "compensation_failed".into(),
        })
        .unwrap();
        let m: M = postcard::from_bytes(&old).unwrap();
        assert_eq!(m.s, RunStatus::CompensationFailed);
        assert_eq!(postcard::to_allocvec(&m).unwrap(), old);
    }
}
