//! One attempt of an activity (or of a compensation) as a pipeline of small stages:
//! back off → breaker gate → admission → write ahead → execute → report.
//!
//! Only the write-ahead stage lets an effect happen: nothing past it runs before the attempt's
//! `AttemptStarted` is durable, and the report is handed back to the driver, which journals it
//! before deciding again.

use std::sync::Arc;
use std::time::{Duration, Instant};

use outpost_shared::definition::{Definition, RetryPolicy, Step, StepKind, StepPlan};
use outpost_shared::journal::rfc3339;
use outpost_shared::{ErrorInfo, Event};
use serde_json::Value;
use tokio::sync::OwnedSemaphorePermit;
use tracing::{error, info, warn};

use super::children::ChildRuns;
use super::driver::{Slot, TaskResult};
use super::{Inner, MAX_OUTPUT_BYTES, Runtime};
use crate::actions::{Action, ActionError, Call};
use crate::breaker::{self, Gate};
use crate::clock::remaining_ms;
use crate::engine::{self, FailedAttempt};
use crate::journal::JournalError;

/// One attempt, resolved: which action with which policy, for which step visit.
struct Attempt<'a> {
    run_id: &'a str,
    slot: Slot,
    step: &'a Step,
    plan: &'a StepPlan,
    kind: StepKind,
    action: &'a str,
    policy: &'a RetryPolicy,
    timeout: Option<Duration>,
    compensation: bool,
}

/// Runs one attempt through every stage; what it journaled itself and what the driver is to
/// journal come back in the [`TaskResult`].
pub(super) async fn run(
    inner: Arc<Inner>,
    def: Arc<Definition>,
    run_id: String,
    slot: Slot,
    args: Value,
    key: String,
    not_before_ms: Option<u64>,
) -> TaskResult {
    let a = Attempt::resolve(&def, &run_id, slot);
    let mut journaled = Vec::new();
    a.back_off(&inner, not_before_ms).await;
    let target = breaker::target_of(a.action, &args, a.step.resource.as_deref());
    if let Some(t) = &target
        && !a.breaker_gate(&inner, t, &mut journaled).await
    {
        return TaskResult::ended(journaled);
    }
    let _permit = inner.activities.clone().acquire_owned().await;
    let _limits = inner
        .limits
        .activity(a.run_id, &a.step.id, a.action, a.step.resource.as_deref())
        .await;
    let Some(started) = a.write_ahead(&inner, key.clone()).await else {
        return TaskResult::ended(journaled);
    };
    journaled.push(started);
    TaskResult {
        journaled,
        to_journal: a.effect(&inner, target.as_deref(), key, args).await,
    }
}

/// The slots an attempt holds while its effect runs: the agent's activity slot and its
/// action's and resource's.
pub(super) struct Held {
    _activity: OwnedSemaphorePermit,
    _limits: Vec<OwnedSemaphorePermit>,
}

/// Every gate of an attempt at once, when each is open now (no back-off left, its breaker
/// closed, its slots free): the slots it then holds. `None` sends it through [`run`], which
/// waits at the gate that is shut. Waits for nothing and journals nothing.
pub(super) fn gates_open(
    inner: &Inner,
    def: &Definition,
    slot: Slot,
    args: &Value,
    not_before_ms: Option<u64>,
) -> Option<Held> {
    if not_before_ms.is_some_and(|at| at > inner.clock.now_ms()) {
        return None;
    }
    let a = Attempt::resolve(def, "", slot);
    if let Some(t) = breaker::target_of(a.action, args, a.step.resource.as_deref())
        && !inner.breakers.is_closed(&t)
    {
        return None;
    }
    let activity = inner.activities.clone().try_acquire_owned().ok()?;
    let limits = inner.limits.try_activity(a.action, a.step.resource.as_deref())?;
    Some(Held {
        _activity: activity,
        _limits: limits,
    })
}

/// An attempt whose gates were open ([`gates_open`]) and whose start the driver journaled in
/// its own commit: only the effect and its report are left.
pub(super) async fn run_started(
    inner: Arc<Inner>,
    def: Arc<Definition>,
    run_id: String,
    slot: Slot,
    args: Value,
    key: String,
    held: Held,
) -> TaskResult {
    let a = Attempt::resolve(&def, &run_id, slot);
    let target = breaker::target_of(a.action, &args, a.step.resource.as_deref());
    let to_journal = a.effect(&inner, target.as_deref(), key, args).await;
    drop(held);
    TaskResult {
        journaled: Vec::new(),
        to_journal,
    }
}

impl<'a> Attempt<'a> {
    fn resolve(def: &'a Definition, run_id: &'a str, slot: Slot) -> Attempt<'a> {
        let (step, _, _, compensation) = slot;
        let plan = &def.plans[step];
        let step_def = &def.doc.steps[step];
        let (kind, action, policy, timeout) = match (compensation, &step_def.compensate, &plan.compensate) {
            (true, Some(call), Some(cp)) => (cp.kind, call.action.as_str(), &cp.retry, cp.timeout),
            _ => (plan.kind, step_def.action.as_str(), &plan.retry, plan.timeout),
        };
        Attempt {
            run_id,
            slot,
            step: step_def,
            plan,
            kind,
            action,
            policy,
            timeout,
            compensation,
        }
    }

    fn visit(&self) -> u32 {
        self.slot.1
    }

    fn attempt(&self) -> u32 {
        self.slot.2
    }

    /// A retry waits for its backed-off time; the wait never exceeds the policy's longest
    /// interval, whatever the clock does.
    async fn back_off(&self, inner: &Inner, not_before_ms: Option<u64>) {
        if let Some(at) = not_before_ms {
            let cap = u64::try_from(self.policy.max_interval.as_millis()).unwrap_or(u64::MAX);
            tokio::time::sleep(Duration::from_millis(remaining_ms(inner.clock.now_ms(), at, cap))).await;
        }
    }

    /// An open breaker holds the attempt back before it takes any slot; each new hold is
    /// journaled (`AttemptDeferred`) so `show` can say why the step waits. False when the run
    /// ended meanwhile.
    async fn breaker_gate(&self, inner: &Inner, target: &str, journaled: &mut Vec<Event>) -> bool {
        let mut held_until = None;
        loop {
            let until = match inner.breakers.gate(target, inner.clock.now_ms()) {
                Gate::Pass | Gate::Probe => return true,
                Gate::Wait(until) => until,
            };
            if !self.compensation && held_until != Some(until) {
                let deferred = Event::AttemptDeferred {
                    step: self.step.id.clone(),
                    visit: self.visit(),
                    attempt: self.attempt(),
                    target: target.to_string(),
                    until_ms: until,
                };
                if !append_durably(inner, self.run_id, vec![deferred.clone()]).await {
                    return false;
                }
                info!(target = %target, until = %rfc3339(until), "attempt held by an open circuit breaker");
                journaled.push(deferred);
                held_until = Some(until);
            }
            let cap = u64::try_from(inner.config.breakers.max_cooldown.as_millis()).unwrap_or(u64::MAX);
            tokio::time::sleep(Duration::from_millis(
                remaining_ms(inner.clock.now_ms(), until, cap).max(10),
            ))
            .await;
        }
    }

    /// Write-ahead: the attempt's start is durable before any side effect. None when the run
    /// ended meanwhile.
    async fn write_ahead(&self, inner: &Inner, key: String) -> Option<Event> {
        let started = engine::attempt_started(&self.step.id, self.visit(), self.attempt(), key, self.compensation);
        append_durably(inner, self.run_id, vec![started.clone()])
            .await
            .then_some(started)
    }

    /// The effect, once the start is durable: runs the action, feeds its breaker, and gives
    /// the events its outcome journals.
    async fn effect(&self, inner: &Arc<Inner>, target: Option<&str>, key: String, args: Value) -> Vec<Event> {
        info!(key = %key, "attempt started");
        let result = self.execute(inner, key, args).await;
        if let Some(t) = target {
            record_outcome(inner, t, &result);
        }
        self.report(inner, result)
    }

    /// Runs the action under the attempt's timeout.
    async fn execute(&self, inner: &Arc<Inner>, key: String, args: Value) -> Result<Value, ActionError> {
        let call = Call {
            run_id: self.run_id.to_string(),
            step: self.step.id.clone(),
            visit: self.visit(),
            attempt: self.attempt(),
            key,
            args,
        };
        let rt = Runtime { inner: inner.clone() };
        let action: Option<Arc<dyn Action>> = match ChildRuns::for_kind(rt, self.kind) {
            Some(children) => Some(Arc::new(children)),
            None => inner.registry.get(self.action),
        };
        let Some(action) = action else {
            return Err(ActionError::permanent(
                "unknown_action",
                format!("action '{}' is not available in this agent", self.action),
            ));
        };
        let began = Instant::now();
        let result = match self.timeout {
            Some(t) => tokio::time::timeout(t, action.execute(call)).await.unwrap_or_else(|_| {
                Err(ActionError::retryable(
                    "timeout",
                    format!("attempt took longer than {}", humantime::format_duration(t)),
                ))
            }),
            None => action.execute(call).await,
        };
        inner.step_latency.observe(began.elapsed());
        result
    }

    /// The events the attempt's outcome journals: the step's (or compensation's) completion,
    /// a retry at a backed-off time, or the failure.
    fn report(&self, inner: &Inner, result: Result<Value, ActionError>) -> Vec<Event> {
        let fail = |error: ErrorInfo, retryable: bool, unit: f64| {
            let failed = FailedAttempt {
                step: &self.step.id,
                visit: self.visit(),
                attempt: self.attempt(),
                error,
                retryable,
                compensation: self.compensation,
            };
            engine::attempt_failed(self.plan, failed, inner.clock.now_ms(), unit)
        };
        match result {
            Ok(output) => {
                let text = output.to_string();
                if text.len() > MAX_OUTPUT_BYTES {
                    let err = ErrorInfo::new(
                        "output_too_large",
                        format!("output is {} bytes; the limit is {MAX_OUTPUT_BYTES}", text.len()),
                    );
                    fail(err, false, 0.0)
                } else {
                    info!("attempt succeeded");
                    vec![engine::attempt_succeeded(
                        &self.step.id,
                        self.visit(),
                        text,
                        self.compensation,
                    )]
                }
            }
            Err(e) => {
                warn!(error = %e.info, "attempt failed");
                fail(e.info, e.retryable, fastrand::f64())
            }
        }
    }
}

/// Feeds the outcome to the target's breaker.
fn record_outcome(inner: &Inner, target: &str, result: &Result<Value, ActionError>) {
    match result {
        Ok(_) => inner.breakers.success(target),
        Err(e) if e.retryable => {
            if let Some(until) = inner
                .breakers
                .failure(target, inner.clock.now_ms(), &e.info.to_string())
            {
                warn!(target = %target, until = %rfc3339(until), "circuit breaker opened");
            }
        }
        Err(_) => {}
    }
}

/// Journals events for a run, retrying with backoff while storage fails (the run just waits;
/// nothing moves on unjournaled); false when the run has ended and takes no more.
pub(super) async fn append_durably(inner: &Inner, run_id: &str, events: Vec<Event>) -> bool {
    let mut delay = Duration::from_millis(100);
    loop {
        match inner.journal.append(run_id, events.clone()).await {
            Ok(_) => {
                inner.storage.wrote(Some(run_id));
                return true;
            }
            Err(JournalError::RunFinished(_) | JournalError::NoSuchRun(_)) => return false,
            Err(e) => {
                inner.storage.failed(Some(run_id), &e, inner.clock.now_ms());
                error!(error = %e, retry_in = ?delay, "cannot journal; the run waits and retries");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(30));
            }
        }
    }
}
