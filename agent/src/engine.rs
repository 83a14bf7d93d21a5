//! The engine's decisions: a pure function from a definition and a run's history to the next
//! commands. No I/O, no clock, no randomness here: the runtime supplies the time and random
//! numbers as arguments and journals what was decided, so replaying a history reproduces every
//! decision exactly.

use std::collections::BTreeMap;

use outpost_shared::definition::{Definition, End, Kind, Step, StepKind, StepPlan};
use outpost_shared::expr;
use outpost_shared::{ErrorInfo, Event};
use serde_json::{Map, Value, json};

pub use outpost_shared::run::{
    Compensation, Phase, ReplayError, RunState, RunStatus, Signal, SignalName, StepState, phase_name,
};

/// What the runtime must do next.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    /// Run (or re-run after a crash) one attempt of an activity.
    RunActivity {
        /// Step index.
        step: usize,
        /// Visit.
        visit: u32,
        /// Attempt.
        attempt: u32,
        /// Rendered arguments.
        args: Value,
        /// Idempotency key: the same for every attempt of this visit.
        key: String,
        /// Not before this wall-clock time (a retry's backoff).
        not_before_ms: Option<u64>,
        /// True when this runs the step's compensation rather than the step.
        compensation: bool,
    },
    /// Set a durable timer of this length.
    StartTimer {
        /// Step index.
        step: usize,
        /// Visit.
        visit: u32,
        /// Length.
        duration_ms: u64,
    },
    /// Wait for a timer already set.
    AwaitTimer {
        /// Step index.
        step: usize,
        /// Visit.
        visit: u32,
        /// Deadline.
        fire_at_ms: u64,
        /// Requested length.
        duration_ms: u64,
        /// True for a `sleep` (firing completes the step), false for a wait's timeout.
        completes: bool,
    },
    /// Start waiting for a signal; journal `WaitStarted` with a deadline `duration_ms` from now.
    StartWait {
        /// Step index.
        step: usize,
        /// Visit.
        visit: u32,
        /// Signal name.
        signal: String,
        /// Timeout, if any.
        duration_ms: Option<u64>,
    },
    /// Journal this event: a decision with no side effect (a `set` result, a skip, the run's end).
    Record(Event),
}

impl Command {
    /// The record this command journals at once, deadlines placed from `now_ms`: a pure
    /// decision, a timer set, a wait begun. A command with an effect (an attempt, waiting for a
    /// timer) comes back as it is. The runtime and the engine's simulator both journal through
    /// this, so what a command means in the journal is said once.
    pub fn into_record(self, def: &Definition, now_ms: u64) -> Result<Event, Command> {
        match self {
            Command::Record(e) => Ok(e),
            Command::StartTimer {
                step,
                visit,
                duration_ms,
            } => Ok(Event::TimerSet {
                step: def.doc.steps[step].id.clone(),
                visit,
                fire_at_ms: now_ms.saturating_add(duration_ms),
                duration_ms,
            }),
            Command::StartWait {
                step,
                visit,
                signal,
                duration_ms,
            } => Ok(Event::WaitStarted {
                step: def.doc.steps[step].id.clone(),
                visit,
                signal,
                fire_at_ms: duration_ms.map(|d| now_ms.saturating_add(d)),
                duration_ms: duration_ms.unwrap_or(0),
            }),
            other => Err(other),
        }
    }
}

/// What an attempt journals before its effect (write-ahead).
pub fn attempt_started(step: &str, visit: u32, attempt: u32, key: String, compensation: bool) -> Event {
    let step = step.to_string();
    if compensation {
        Event::CompensationAttemptStarted {
            step,
            visit,
            attempt,
            key,
        }
    } else {
        Event::AttemptStarted {
            step,
            visit,
            attempt,
            key,
        }
    }
}

/// What a successful attempt journals: the step's completion, or its compensation's.
pub fn attempt_succeeded(step: &str, visit: u32, output: String, compensation: bool) -> Event {
    let step = step.to_string();
    if compensation {
        Event::StepCompensated { step, visit, output }
    } else {
        Event::StepCompleted { step, visit, output }
    }
}

/// What a timer journals when it fires; a `sleep`'s timer also completes its step.
pub fn timer_fired(step: &str, visit: u32, fire_at_ms: u64, completes: bool) -> Vec<Event> {
    let mut events = vec![Event::TimerFired {
        step: step.to_string(),
        visit,
        fire_at_ms,
    }];
    if completes {
        events.push(Event::StepCompleted {
            step: step.to_string(),
            visit,
            output: "null".into(),
        });
    }
    events
}

/// The idempotency key of one visit of one step: stable across attempts and restarts.
pub fn idempotency_key(run_id: &str, step: &str, visit: u32) -> String {
    format!("{run_id}/{step}/{visit}")
}

/// Lazily built expression context: most decisions never evaluate anything.
struct Ctx<'a> {
    def: &'a Definition,
    st: &'a RunState,
    value: Option<expr::Scope>,
}

impl Ctx<'_> {
    fn get(&mut self) -> &expr::Scope {
        self.value.get_or_insert_with(|| self.st.scope(self.def))
    }
}

/// Decides what to do next. Pure: the same definition and state always give the same commands.
pub fn decide(def: &Definition, st: &RunState) -> Vec<Command> {
    if st.status.is_terminal() {
        return Vec::new();
    }
    let mut ctx = Ctx { def, st, value: None };
    if st.status == RunStatus::Compensating {
        return decide_compensation(def, st, &mut ctx);
    }
    let mut out = match def.doc.kind {
        Kind::Dag => decide_dag(def, st, &mut ctx),
        Kind::StateMachine => decide_state_machine(def, st, &mut ctx),
    };
    // A failing run with completed compensable steps becomes a saga instead of ending.
    if let [Command::Record(Event::RunFailed { error })] = out.as_slice()
        && !st.compensations.is_empty()
    {
        out = vec![Command::Record(Event::CompensationStarted { error: error.clone() })];
    }
    out
}

/// Compensations run one at a time, newest completion first; the first that fails for good
/// ends the run, because older ones may depend on the newer being undone.
fn decide_compensation(def: &Definition, st: &RunState, ctx: &mut Ctx) -> Vec<Command> {
    let Some(c) = st.compensations.iter().rev().find(|c| c.phase != Phase::Completed) else {
        let error = st.error.clone().unwrap_or_else(|| ErrorInfo::new("unknown", ""));
        return vec![Command::Record(Event::RunCompensated { error })];
    };
    let step = &def.doc.steps[c.step];
    let (Some(comp), Some(plan)) = (&step.compensate, &def.plans[c.step].compensate) else {
        return Vec::new();
    };
    let (attempt, not_before_ms) = match c.phase {
        Phase::Failed => {
            let error = c.error.clone().unwrap_or_else(|| ErrorInfo::new("unknown", ""));
            return vec![Command::Record(Event::RunCompensationFailed {
                step: step.id.clone(),
                error,
            })];
        }
        Phase::Running { attempt } => (attempt, None),
        Phase::Backoff { attempt, retry_at_ms } => (attempt + 1, Some(retry_at_ms)),
        _ => (1, None),
    };
    let args = match expr::render_in(&Value::Object(comp.args.clone()), ctx.get()) {
        Ok(a) => a,
        Err(e) => {
            return vec![Command::Record(Event::CompensationFailed {
                step: step.id.clone(),
                visit: c.visit,
                error: ErrorInfo::new("expression", format!("compensate.args: {e}")),
            })];
        }
    };
    match plan.kind {
        StepKind::Set => vec![Command::Record(Event::StepCompensated {
            step: step.id.clone(),
            visit: c.visit,
            output: args.to_string(),
        })],
        StepKind::Fail => vec![Command::Record(Event::CompensationFailed {
            step: step.id.clone(),
            visit: c.visit,
            error: fail_error(&args, &step.id),
        })],
        _ => vec![Command::RunActivity {
            step: c.step,
            visit: c.visit,
            attempt,
            args,
            key: format!("{}/compensate", idempotency_key(&st.run_id, &step.id, c.visit)),
            not_before_ms,
            compensation: true,
        }],
    }
}

fn fail_run(kind: &str, message: String) -> Vec<Command> {
    vec![Command::Record(Event::RunFailed {
        error: ErrorInfo::new(kind, message),
    })]
}

fn decide_dag(def: &Definition, st: &RunState, ctx: &mut Ctx) -> Vec<Command> {
    if let Some(i) = st.steps.iter().position(|s| s.phase == Phase::Failed) {
        return fail_run("step_failed", step_failure_message(def, st, i));
    }
    let mut out = Vec::new();
    let mut all_done = true;
    for (i, s) in st.steps.iter().enumerate() {
        let step = &def.doc.steps[i];
        match &s.phase {
            Phase::Completed | Phase::Skipped => continue,
            Phase::Idle => {
                all_done = false;
                let deps = &def.plans[i].deps;
                if let Some(&d) = deps.iter().find(|&&d| st.steps[d].phase == Phase::Skipped) {
                    out.push(Command::Record(Event::StepSkipped {
                        step: step.id.clone(),
                        reason: format!("dependency '{}' was skipped", def.doc.steps[d].id),
                    }));
                    continue;
                }
                if !deps.iter().all(|&d| st.steps[d].phase == Phase::Completed) {
                    continue;
                }
                if let Some(cond) = &step.when {
                    match expr::eval_condition_in(cond, ctx.get()) {
                        Ok(true) => {}
                        Ok(false) => {
                            out.push(Command::Record(Event::StepSkipped {
                                step: step.id.clone(),
                                reason: format!("when `{cond}` was false"),
                            }));
                            continue;
                        }
                        Err(e) => {
                            out.push(expression_failure(step.id.clone(), 1, "when", &e));
                            continue;
                        }
                    }
                }
                out.push(start_visit(def, st, i, s.visits + 1, ctx));
            }
            _ => {
                all_done = false;
                out.extend(continue_visit(def, st, i, ctx));
            }
        }
    }
    if all_done {
        return complete_run(def, st, ctx, None);
    }
    out
}

fn decide_state_machine(def: &Definition, st: &RunState, ctx: &mut Ctx) -> Vec<Command> {
    let Some(cur) = st.cursor else {
        return vec![start_visit(def, st, def.start, 1, ctx)];
    };
    let step = &def.doc.steps[cur];
    match st.steps[cur].phase {
        Phase::Failed => fail_run("step_failed", step_failure_message(def, st, cur)),
        Phase::Completed => {
            let next = if let Some(end) = step.end {
                return match end {
                    End::Succeed => complete_run(def, st, ctx, Some(cur)),
                    End::Fail => fail_run("workflow.fail", format!("step '{}' ends the run as failed", step.id)),
                };
            } else if let Some(n) = &step.next {
                n
            } else {
                let mut chosen = None;
                for (k, ch) in step.choices.iter().enumerate() {
                    match expr::eval_condition_in(&ch.when, ctx.get()) {
                        Ok(true) => {
                            chosen = Some(&ch.next);
                            break;
                        }
                        Ok(false) => {}
                        Err(e) => {
                            return fail_run(
                                "expression",
                                format!("step '{}' choices[{k}].when `{}`: {e}", step.id, ch.when),
                            );
                        }
                    }
                }
                match chosen.or(step.default.as_ref()) {
                    Some(n) => n,
                    None => {
                        return fail_run(
                            "no_choice",
                            format!("step '{}': no choice matched and there is no default", step.id),
                        );
                    }
                }
            };
            let Some(&target) = def.index.get(next.as_str()) else {
                return fail_run("definition", format!("step '{}' names unknown step '{next}'", step.id));
            };
            let visit = st.steps[target].visits + 1;
            let limit = def.plans[target].max_visits;
            if visit > limit {
                return fail_run(
                    "iteration_limit",
                    format!("step '{next}' would run for the {visit}th time; its max_visits is {limit}"),
                );
            }
            vec![start_visit(def, st, target, visit, ctx)]
        }
        // Idle with a cursor: an operator retried the run; the failed step gets a fresh visit.
        Phase::Idle | Phase::Skipped => vec![start_visit(def, st, cur, st.steps[cur].visits + 1, ctx)],
        _ => continue_visit(def, st, cur, ctx),
    }
}

fn step_failure_message(def: &Definition, st: &RunState, i: usize) -> String {
    let e = st.steps[i].error.as_ref();
    format!(
        "step '{}' failed: {}",
        def.doc.steps[i].id,
        e.map(|e| e.to_string()).unwrap_or_else(|| "unknown error".into())
    )
}

fn expression_failure(step: String, visit: u32, field: &str, e: &expr::ExprError) -> Command {
    Command::Record(Event::StepFailed {
        step,
        visit,
        error: ErrorInfo::new("expression", format!("{field}: {e}")),
    })
}

/// The first move of a visit: pure actions resolve here, others become commands.
fn start_visit(def: &Definition, st: &RunState, i: usize, visit: u32, ctx: &mut Ctx) -> Command {
    let step = &def.doc.steps[i];
    let args = match expr::render_in(&Value::Object(step.args.clone()), ctx.get()) {
        Ok(a) => a,
        Err(e) => return expression_failure(step.id.clone(), visit, "args", &e),
    };
    match def.plans[i].kind {
        StepKind::Set => Command::Record(Event::StepCompleted {
            step: step.id.clone(),
            visit,
            output: args.to_string(),
        }),
        StepKind::Fail => Command::Record(Event::StepFailed {
            step: step.id.clone(),
            visit,
            error: fail_error(&args, &step.id),
        }),
        StepKind::ContinueAsNew => {
            let input = args.get("input").cloned().unwrap_or_else(|| st.input.clone());
            Command::Record(Event::RunContinued {
                next_run: next_in_chain(&st.run_id),
                input: input.to_string(),
            })
        }
        kind @ (StepKind::WaitSignal | StepKind::Approval) => {
            let signal = wait_signal_name(step, kind, &args);
            match wait_timeout(&args) {
                Ok(duration_ms) => match deliver(def, st, i, visit, &signal, &args) {
                    Some(cmd) => cmd,
                    None => Command::StartWait {
                        step: i,
                        visit,
                        signal,
                        duration_ms,
                    },
                },
                Err(msg) => Command::Record(Event::StepFailed {
                    step: step.id.clone(),
                    visit,
                    error: ErrorInfo::new("invalid_argument", msg),
                }),
            }
        }
        StepKind::Sleep => match sleep_duration(&args) {
            Ok(ms) => Command::StartTimer {
                step: i,
                visit,
                duration_ms: ms,
            },
            Err(msg) => Command::Record(Event::StepFailed {
                step: step.id.clone(),
                visit,
                error: ErrorInfo::new("invalid_argument", msg),
            }),
        },
        StepKind::Workflow | StepKind::Map | StepKind::Activity => Command::RunActivity {
            step: i,
            visit,
            attempt: 1,
            args,
            key: idempotency_key(&st.run_id, &step.id, visit),
            not_before_ms: None,
            compensation: false,
        },
    }
}

/// The id of the run that continues `run_id` as new: `ID~2`, then `ID~3`, …
pub fn next_in_chain(run_id: &str) -> String {
    match run_id.rsplit_once('~') {
        Some((base, n)) if !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) => {
            format!("{base}~{}", n.parse::<u64>().unwrap_or(1) + 1)
        }
        _ => format!("{run_id}~2"),
    }
}

/// The error a `fail` action records.
fn fail_error(args: &Value, step: &str) -> ErrorInfo {
    let kind = args.get("error").and_then(Value::as_str).unwrap_or("workflow.fail");
    let message = args
        .get("message")
        .map(|m| m.as_str().map(str::to_string).unwrap_or_else(|| m.to_string()))
        .unwrap_or_else(|| format!("step '{step}' failed the run"));
    ErrorInfo::new(kind, message)
}

/// The signal a waiting step consumes: its `signal` argument, or `approval:STEP` for approvals.
pub fn wait_signal_name(step: &Step, kind: StepKind, args: &Value) -> String {
    if kind == StepKind::Approval {
        approval_signal(&step.id)
    } else {
        args.get("signal")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string()
    }
}

/// The signal name that carries decisions for approval step `step`.
pub fn approval_signal(step: &str) -> String {
    SignalName::approval_of(step)
}

fn wait_timeout(args: &Value) -> Result<Option<u64>, String> {
    match args.get("timeout") {
        None | Some(Value::Null) => Ok(None),
        Some(_) => {
            let mut a = Map::new();
            a.insert("duration".into(), args["timeout"].clone());
            sleep_duration(&Value::Object(a)).map(Some)
        }
    }
}

/// The step's outcome if a signal it can consume is already here. Approvals consume only a
/// decision made for the current visit, so a rejection does not also reject a later retry.
fn deliver(def: &Definition, st: &RunState, i: usize, visit: u32, signal: &str, args: &Value) -> Option<Command> {
    let step = &def.doc.steps[i];
    let id = step.id.clone();
    if def.plans[i].kind == StepKind::Approval {
        let sig = st
            .signals
            .iter()
            .find(|s| s.name == signal && s.payload.get("visit").and_then(Value::as_u64) == Some(u64::from(visit)))?;
        let approved = sig.payload.get("approved").and_then(Value::as_bool).unwrap_or(false);
        let by = sig.payload.get("by").and_then(Value::as_str).unwrap_or("unknown");
        let comment = sig.payload.get("comment").and_then(Value::as_str).unwrap_or("");
        if !approved && args.get("on_reject").and_then(Value::as_str) != Some("continue") {
            let why = if comment.is_empty() {
                String::new()
            } else {
                format!(": {comment}")
            };
            return Some(Command::Record(Event::StepFailed {
                step: id,
                visit,
                error: ErrorInfo::new("approval.rejected", format!("rejected by {by}{why}")),
            }));
        }
        let output = json!({"approved": approved, "by": by, "comment": comment, "signal_id": sig.id});
        return Some(Command::Record(Event::StepCompleted {
            step: id,
            visit,
            output: output.to_string(),
        }));
    }
    let sig = st.pending_signal(signal)?;
    let output = json!({"signal": sig.name, "signal_id": sig.id, "payload": sig.payload});
    Some(Command::Record(Event::StepCompleted {
        step: id,
        visit,
        output: output.to_string(),
    }))
}

/// What a wait whose timeout fired records: a completion marked `timed_out`, or a failure.
fn wait_timed_out(def: &Definition, i: usize, visit: u32, ctx: &mut Ctx) -> Command {
    let step = &def.doc.steps[i];
    let args = expr::render_in(&Value::Object(step.args.clone()), ctx.get()).unwrap_or(Value::Null);
    let kind = def.plans[i].kind;
    let signal = wait_signal_name(step, kind, &args);
    if args.get("on_timeout").and_then(Value::as_str) == Some("continue") {
        return Command::Record(Event::StepCompleted {
            step: step.id.clone(),
            visit,
            output: json!({"timed_out": true, "signal": signal}).to_string(),
        });
    }
    let kind = if kind == StepKind::Approval {
        "approval.timeout"
    } else {
        "signal.timeout"
    };
    Command::Record(Event::StepFailed {
        step: step.id.clone(),
        visit,
        error: ErrorInfo::new(kind, format!("no '{signal}' arrived before the timeout")),
    })
}

/// Length of a `sleep` step from its rendered `duration` argument.
pub fn sleep_duration(args: &Value) -> Result<u64, String> {
    let d = args.get("duration").ok_or("sleep needs a duration")?;
    let dur = match d {
        // `from_secs_f64` panics past u64::MAX seconds (1e300 is a valid JSON number).
        Value::Number(n) => std::time::Duration::try_from_secs_f64(n.as_f64().unwrap_or(-1.0).max(0.0))
            .map_err(|_| format!("duration {n} is too long"))?,
        Value::String(s) => outpost_shared::definition::parse_duration(s)?,
        other => return Err(format!("duration {other} is not a duration")),
    };
    u64::try_from(dur.as_millis()).map_err(|_| "duration is too long".to_string())
}

/// Carry on with a visit already under way (possibly interrupted by a crash).
fn continue_visit(def: &Definition, st: &RunState, i: usize, ctx: &mut Ctx) -> Vec<Command> {
    let step = &def.doc.steps[i];
    let s = &st.steps[i];
    let visit = s.visits.max(1);
    let rerun =
        |attempt, not_before_ms, ctx: &mut Ctx| match expr::render_in(&Value::Object(step.args.clone()), ctx.get()) {
            Ok(args) => Command::RunActivity {
                step: i,
                visit,
                attempt,
                args,
                key: idempotency_key(&st.run_id, &step.id, visit),
                not_before_ms,
                compensation: false,
            },
            Err(e) => expression_failure(step.id.clone(), visit, "args", &e),
        };
    match s.phase {
        Phase::Running { attempt } => vec![rerun(attempt, None, ctx)],
        Phase::Backoff { attempt, retry_at_ms } => vec![rerun(attempt + 1, Some(retry_at_ms), ctx)],
        Phase::Timer {
            fire_at_ms,
            duration_ms,
        } => {
            vec![Command::AwaitTimer {
                step: i,
                visit,
                fire_at_ms,
                duration_ms,
                completes: true,
            }]
        }
        Phase::Waiting {
            ref signal,
            fire_at_ms,
            duration_ms,
        } => {
            let args = expr::render_in(&Value::Object(step.args.clone()), ctx.get()).unwrap_or(Value::Null);
            if let Some(cmd) = deliver(def, st, i, visit, &signal.wire(), &args) {
                return vec![cmd];
            }
            match fire_at_ms {
                Some(fire_at_ms) => vec![Command::AwaitTimer {
                    step: i,
                    visit,
                    fire_at_ms,
                    duration_ms,
                    completes: false,
                }],
                None => Vec::new(),
            }
        }
        Phase::TimedOut => vec![wait_timed_out(def, i, visit, ctx)],
        _ => Vec::new(),
    }
}

fn complete_run(def: &Definition, st: &RunState, ctx: &mut Ctx, last: Option<usize>) -> Vec<Command> {
    let output = if let Some(tmpl) = &def.doc.output {
        match expr::render_in(tmpl, ctx.get()) {
            Ok(v) => v,
            Err(e) => return fail_run("expression", format!("output: {e}")),
        }
    } else if let Some(i) = last {
        st.steps[i].output.clone().unwrap_or(Value::Null)
    } else {
        // DAG: the outputs of the sinks (steps nothing depends on); one sink gives its output.
        let sinks: BTreeMap<&str, &Value> = def
            .plans
            .iter()
            .enumerate()
            .filter(|(_, p)| p.dependents.is_empty())
            .filter_map(|(i, _)| st.steps[i].output.as_ref().map(|o| (def.doc.steps[i].id.as_str(), o)))
            .collect();
        match sinks.len() {
            0 => Value::Null,
            1 => sinks.into_values().next().cloned().unwrap_or(Value::Null),
            _ => serde_json::to_value(sinks).unwrap_or(Value::Null),
        }
    };
    vec![Command::Record(Event::RunCompleted {
        output: output.to_string(),
    })]
}

/// One failed attempt, as the runtime saw it.
#[derive(Debug, Clone)]
pub struct FailedAttempt<'a> {
    /// Step id.
    pub step: &'a str,
    /// Visit.
    pub visit: u32,
    /// Attempt number.
    pub attempt: u32,
    /// What went wrong.
    pub error: ErrorInfo,
    /// False when the action says retrying cannot help.
    pub retryable: bool,
    /// True for an attempt of the step's compensation.
    pub compensation: bool,
}

/// Events recording a failed attempt: a retry at a backed-off time, or the step's (or its
/// compensation's) failure. `unit` is a random number in [0,1) for jitter, supplied by the
/// caller so this stays pure.
pub fn attempt_failed(plan: &StepPlan, failed: FailedAttempt, now_ms: u64, unit: f64) -> Vec<Event> {
    let FailedAttempt {
        step,
        visit,
        attempt,
        error,
        retryable,
        compensation,
    } = failed;
    let policy = match (&plan.compensate, compensation) {
        (Some(c), true) => &c.retry,
        _ => &plan.retry,
    };
    let retry = retryable && !policy.is_non_retryable(&error.kind) && attempt < policy.max_attempts;
    let retry_at_ms = retry.then(|| {
        let delay = policy.delay(attempt + 1, unit);
        now_ms.saturating_add(u64::try_from(delay.as_millis()).unwrap_or(u64::MAX))
    });
    let final_error = (!retry).then(|| {
        if attempt > 1 {
            ErrorInfo::new(
                error.kind.clone(),
                format!("{} (after {attempt} attempts)", error.message),
            )
        } else {
            error.clone()
        }
    });
    let step = step.to_string();
    let mut out = Vec::with_capacity(2);
    if compensation {
        out.push(Event::CompensationAttemptFailed {
            step: step.clone(),
            visit,
            attempt,
            error,
            retry_at_ms,
        });
        if let Some(error) = final_error {
            out.push(Event::CompensationFailed { step, visit, error });
        }
    } else {
        out.push(Event::AttemptFailed {
            step: step.clone(),
            visit,
            attempt,
            error,
            retry_at_ms,
        });
        if let Some(error) = final_error {
            out.push(Event::StepFailed { step, visit, error });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use outpost_shared::definition::{ActionCatalog, parse};

    struct Cat;
    impl ActionCatalog for Cat {
        fn names(&self) -> Vec<String> {
            vec![]
        }
        fn check(&self, _: &str, _: &Map<String, Value>) -> Option<Vec<String>> {
            Some(vec![])
        }
    }

    fn def(src: &str) -> Definition {
        parse(src, &Cat).unwrap()
    }

    /// Drives a run to the end, completing activities with `outcome(step, attempt)`.
    fn simulate(
        d: &Definition,
        input: Value,
        mut outcome: impl FnMut(&str, u32) -> Result<Value, ErrorInfo>,
    ) -> (RunState, Vec<Event>) {
        let mut st = RunState::new(d, "r1", input);
        let mut history = Vec::new();
        let mut now = 1_000;
        for _ in 0..10_000 {
            let cmds = decide(d, &st);
            if cmds.is_empty() {
                break;
            }
            let mut events = Vec::new();
            for c in cmds {
                let c = match c.into_record(d, now) {
                    Ok(e) => {
                        events.push(e);
                        continue;
                    }
                    Err(c) => c,
                };
                match c {
                    Command::RunActivity {
                        step,
                        visit,
                        attempt,
                        key,
                        not_before_ms,
                        compensation,
                        ..
                    } => {
                        let id = d.doc.steps[step].id.clone();
                        let base = idempotency_key("r1", &id, visit);
                        let (expected_key, name) = if compensation {
                            (format!("{base}/compensate"), format!("{id}.compensate"))
                        } else {
                            (base, id.clone())
                        };
                        assert_eq!(key, expected_key);
                        now = now.max(not_before_ms.unwrap_or(0));
                        events.push(attempt_started(&id, visit, attempt, key, compensation));
                        match outcome(&name, attempt) {
                            Ok(v) => events.push(attempt_succeeded(&id, visit, v.to_string(), compensation)),
                            Err(e) => {
                                let f = FailedAttempt {
                                    step: &id,
                                    visit,
                                    attempt,
                                    error: e,
                                    retryable: true,
                                    compensation,
                                };
                                events.extend(attempt_failed(&d.plans[step], f, now, 0.5))
                            }
                        }
                    }
                    Command::AwaitTimer {
                        step,
                        visit,
                        fire_at_ms,
                        completes,
                        ..
                    } => {
                        now = fire_at_ms;
                        events.extend(timer_fired(&d.doc.steps[step].id, visit, fire_at_ms, completes));
                    }
                    Command::Record(_) | Command::StartTimer { .. } | Command::StartWait { .. } => {
                        unreachable!("journaled by into_record")
                    }
                }
            }
            for e in &events {
                st.apply(d, e).unwrap();
            }
            history.extend(events);
        }
        (st, history)
    }

    const SAGA: &str = r#"
name: trip
version: 1
kind: state_machine
steps:
  - id: flight
    action: book
    compensate: {action: cancel, args: {what: "flight {{ steps.flight.output }}"}}
    next: hotel
  - id: hotel
    action: book
    compensate: {action: cancel, retry: {max_attempts: 2, initial_interval: 1s}}
    next: card
  - id: card
    action: charge
    end: succeed
"#;

    fn names(history: &[Event]) -> Vec<String> {
        history
            .iter()
            .map(|e| format!("{}{}", e.name(), e.step().map(|s| format!(":{s}")).unwrap_or_default()))
            .collect()
    }

    #[test]
    fn huge_and_odd_numeric_durations_are_errors_not_panics() {
        assert!(
            sleep_duration(&json!({"duration": 1e300}))
                .unwrap_err()
                .contains("too long")
        );
        assert_eq!(sleep_duration(&json!({"duration": -5})), Ok(0));
        assert_eq!(sleep_duration(&json!({"duration": 1.5})), Ok(1500));
        assert!(sleep_duration(&json!({"duration": "8000y"})).is_ok(), "long but valid");
    }

    #[test]
    fn a_failed_saga_compensates_completed_steps_newest_first() {
        let d = def(SAGA);
        let (st, h) = simulate(&d, json!({}), |step, _| match step {
            "card" => Err(ErrorInfo::new("card.declined", "no funds")),
            _ => Ok(json!(7)),
        });
        assert_eq!(st.status, RunStatus::Compensated);
        let n = names(&h);
        let comp: Vec<&String> = n.iter().filter(|n| n.contains("compens")).collect();
        assert_eq!(
            comp,
            [
                "compensation_started",
                "compensation_attempt_started:hotel",
                "step_compensated:hotel",
                "compensation_attempt_started:flight",
                "step_compensated:flight",
                "run_compensated"
            ]
        );
        assert!(matches!(h.last(), Some(Event::RunCompensated { error }) if error.message.contains("card.declined")));
    }

    #[test]
    fn a_failing_compensation_is_retried_then_ends_the_run() {
        let d = def(SAGA);
        let (st, h) = simulate(&d, json!({}), |step, _| match step {
            "card" => Err(ErrorInfo::new("card.declined", "no funds")),
            "hotel.compensate" => Err(ErrorInfo::new("http.server_error", "503")),
            _ => Ok(json!(1)),
        });
        assert_eq!(st.status, RunStatus::CompensationFailed);
        let n = names(&h);
        assert_eq!(
            n.iter().filter(|n| *n == "compensation_attempt_started:hotel").count(),
            2
        );
        // The flight is not compensated once the hotel's compensation failed.
        assert!(!n.iter().any(|n| n == "compensation_attempt_started:flight"));
        assert!(matches!(h.last(), Some(Event::RunCompensationFailed { step, .. }) if step == "hotel"));
        assert!(
            st.error
                .unwrap()
                .message
                .contains("compensation of step 'hotel' failed")
        );
    }

    #[test]
    fn a_run_without_compensations_just_fails() {
        let d = def(SAGA);
        let (st, _) = simulate(&d, json!({}), |_, _| Err(ErrorInfo::new("x", "y")));
        assert_eq!(st.status, RunStatus::Failed);
    }

    const GATE: &str = r#"
name: gate
version: 1
kind: state_machine
steps:
  - id: wait
    action: wait_signal
    args: {signal: go, timeout: 10s, on_timeout: continue}
    next: ok
  - id: ok
    action: approval
    args: {approvers: [alice]}
    end: succeed
"#;

    #[test]
    fn signals_sent_early_are_kept_and_repeats_ignored() {
        let d = def(GATE);
        let mut st = RunState::new(&d, "r1", json!({}));
        for e in [
            Event::SignalReceived {
                name: "go".into(),
                id: "s1".into(),
                payload: "{\"lot\":7}".into(),
            },
            Event::SignalReceived {
                name: "go".into(),
                id: "s1".into(),
                payload: "{\"lot\":8}".into(),
            },
        ] {
            st.apply(&d, &e).unwrap();
        }
        assert_eq!(st.signals.len(), 1);
        let cmds = decide(&d, &st);
        let [Command::Record(Event::StepCompleted { output, .. })] = cmds.as_slice() else {
            panic!("expected the early signal to complete the step: {cmds:?}");
        };
        let out: Value = serde_json::from_str(output).unwrap();
        assert_eq!(out["payload"]["lot"], 7);
        st.apply(&d, &cmds[0].clone().into_event()).unwrap();
        assert!(st.pending_signal("go").is_none(), "the signal was consumed");
        // The approval step waits with no deadline.
        assert!(matches!(
            decide(&d, &st).as_slice(),
            [Command::StartWait { duration_ms: None, .. }]
        ));
    }

    #[test]
    fn approvals_reject_fail_the_step_and_bind_to_their_visit() {
        let d = def(GATE);
        let mut st = RunState::new(&d, "r1", json!({}));
        let events = [
            Event::WaitStarted {
                step: "wait".into(),
                visit: 1,
                signal: "go".into(),
                fire_at_ms: Some(10),
                duration_ms: 10,
            },
            Event::TimerFired {
                step: "wait".into(),
                visit: 1,
                fire_at_ms: 10,
            },
        ];
        for e in &events {
            st.apply(&d, e).unwrap();
        }
        let cmds = decide(&d, &st);
        assert!(
            matches!(&cmds[..], [Command::Record(Event::StepCompleted { output, .. })] if output.contains("timed_out"))
        );
        st.apply(&d, &cmds[0].clone().into_event()).unwrap();
        let wait = Event::WaitStarted {
            step: "ok".into(),
            visit: 1,
            signal: "approval:ok".into(),
            fire_at_ms: None,
            duration_ms: 0,
        };
        st.apply(&d, &wait).unwrap();
        let reject = json!({"approved": false, "by": "alice", "comment": "bad lot", "visit": 1}).to_string();
        st.apply(
            &d,
            &Event::SignalReceived {
                name: "approval:ok".into(),
                id: "a1".into(),
                payload: reject,
            },
        )
        .unwrap();
        let cmds = decide(&d, &st);
        assert!(matches!(&cmds[..], [Command::Record(Event::StepFailed { error, .. })]
            if error.kind == "approval.rejected" && error.message == "rejected by alice: bad lot"));
        for e in [
            cmds[0].clone().into_event(),
            Event::RunFailed {
                error: ErrorInfo::new("x", "y"),
            },
            Event::RunRetried { by: "bob".into() },
        ] {
            st.apply(&d, &e).unwrap();
        }
        // Retried: a fresh visit, which the old rejection does not decide.
        let cmds = decide(&d, &st);
        assert!(matches!(&cmds[..], [Command::StartWait { visit: 2, .. }]), "{cmds:?}");
    }

    #[test]
    fn continue_as_new_names_the_next_run_of_the_chain() {
        assert_eq!(next_in_chain("poll"), "poll~2");
        assert_eq!(next_in_chain("poll~2"), "poll~3");
        assert_eq!(next_in_chain("a~b"), "a~b~2");
        let d = def("name: l\nversion: 1\nsteps:\n  - {id: again, action: continue_as_new, args: {input: {n: 2}}}\n");
        let st = RunState::new(&d, "poll~9", json!({"n": 1}));
        assert_eq!(
            decide(&d, &st),
            vec![Command::Record(Event::RunContinued {
                next_run: "poll~10".into(),
                input: r#"{"n":2}"#.into()
            })]
        );
    }

    impl Command {
        fn into_event(self) -> Event {
            match self {
                Command::Record(e) => e,
                other => panic!("not a record: {other:?}"),
            }
        }
    }

    fn order(history: &[Event]) -> Vec<String> {
        history
            .iter()
            .filter_map(|e| match e {
                Event::StepCompleted { step, .. } => Some(step.clone()),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn dag_fans_out_and_in() {
        let d = def(
            "name: w\nversion: 1\nsteps:\n  - {id: a, action: x}\n  - {id: b, action: x, depends_on: [a]}\n  - {id: c, action: x, depends_on: [a]}\n  - {id: d, action: x, depends_on: [b, c], args: {sum: '{{ steps.b.output + steps.c.output }}'}}\n",
        );
        let mut st = RunState::new(&d, "r1", Value::Null);
        let first = decide(&d, &st);
        assert_eq!(first.len(), 1, "only a is ready: {first:?}");
        st.apply(
            &d,
            &Event::StepCompleted {
                step: "a".into(),
                visit: 1,
                output: "1".into(),
            },
        )
        .unwrap();
        let second = decide(&d, &st);
        let ready: Vec<usize> = second
            .iter()
            .filter_map(|c| match c {
                Command::RunActivity { step, .. } => Some(*step),
                _ => None,
            })
            .collect();
        assert_eq!(ready, vec![1, 2], "b and c fan out together");
        st.apply(
            &d,
            &Event::StepCompleted {
                step: "b".into(),
                visit: 1,
                output: "2".into(),
            },
        )
        .unwrap();
        assert!(
            decide(&d, &st)
                .iter()
                .all(|c| !matches!(c, Command::RunActivity { step: 3, .. })),
            "d waits for c"
        );
        st.apply(
            &d,
            &Event::StepCompleted {
                step: "c".into(),
                visit: 1,
                output: "3".into(),
            },
        )
        .unwrap();
        match &decide(&d, &st)[..] {
            [Command::RunActivity { step: 3, args, .. }] => assert_eq!(args["sum"], json!(5)),
            other => panic!("expected d with rendered args, got {other:?}"),
        }
    }

    #[test]
    fn when_false_skips_step_and_dependents() {
        let d = def(
            "name: w\nversion: 1\nsteps:\n  - {id: read, action: set, args: {t: '{{ input.t }}'}}\n  - {id: alarm, action: x, depends_on: [read], when: 'steps.read.output.t > 80'}\n  - {id: page, action: x, depends_on: [alarm]}\n  - {id: log, action: set, depends_on: [read], args: {ok: true}}\n",
        );
        let (st, h) = simulate(&d, json!({"t": 20}), |_, _| Ok(json!(null)));
        assert_eq!(st.status, RunStatus::Completed);
        let skipped: Vec<_> = h
            .iter()
            .filter_map(|e| match e {
                Event::StepSkipped { step, .. } => Some(step.as_str()),
                _ => None,
            })
            .collect();
        assert_eq!(skipped, vec!["alarm", "page"]);
        let (_, h) = simulate(&d, json!({"t": 90}), |_, _| Ok(json!(null)));
        assert_eq!(order(&h), vec!["read", "alarm", "log", "page"]);
    }

    #[test]
    fn state_machine_choice_and_loop_with_guard() {
        let src = "name: w\nversion: 1\nkind: state_machine\nstart: read\nsteps:\n  - id: read\n    action: x\n    choices:\n      - when: steps.read.output >= 3\n        next: done\n    default: wait\n  - id: wait\n    action: set\n    next: read\n  - id: done\n    action: set\n    args: {reads: '{{ steps.read.visits }}'}\n    end: succeed\n";
        let d = def(src);
        let mut n = 0;
        let (st, h) = simulate(&d, Value::Null, |_, _| {
            n += 1;
            Ok(json!(n))
        });
        assert_eq!(st.status, RunStatus::Completed);
        assert_eq!(order(&h), vec!["read", "wait", "read", "wait", "read", "done"]);
        assert_eq!(st.output, Some(json!({"reads": 3})));

        let guarded = def(&src
            .replace("    next: read\n", "    next: read\n    max_visits: 1\n")
            .replace(
                "  - id: read\n    action: x\n",
                "  - id: read\n    action: x\n    max_visits: 2\n",
            ));
        let (st, _) = simulate(&guarded, Value::Null, |_, _| Ok(json!(0)));
        assert_eq!(st.status, RunStatus::Failed);
        assert_eq!(st.error.unwrap().kind, "iteration_limit");
    }

    #[test]
    fn retries_back_off_then_succeed_and_non_retryable_fails_at_once() {
        let d = def(
            "name: w\nversion: 1\nsteps:\n  - id: a\n    action: x\n    retry: {max_attempts: 4, initial_interval: 1s, backoff: 2, jitter: 0, non_retryable: [bad]}\n",
        );
        let (st, h) = simulate(&d, Value::Null, |_, attempt| {
            if attempt < 3 {
                Err(ErrorInfo::new("flaky", "try again"))
            } else {
                Ok(json!("ok"))
            }
        });
        assert_eq!(st.status, RunStatus::Completed);
        let retries: Vec<u64> = h
            .iter()
            .filter_map(|e| match e {
                Event::AttemptFailed { retry_at_ms, .. } => *retry_at_ms,
                _ => None,
            })
            .collect();
        assert_eq!(
            retries,
            vec![1_000 + 1_000, 2_000 + 2_000],
            "1s then 2s backoff, recorded in history"
        );

        let (st, h) = simulate(&d, Value::Null, |_, _| Err(ErrorInfo::new("bad", "no")));
        assert_eq!(st.status, RunStatus::Failed);
        assert_eq!(
            h.iter().filter(|e| matches!(e, Event::AttemptStarted { .. })).count(),
            1
        );

        let (st, h) = simulate(&d, Value::Null, |_, _| Err(ErrorInfo::new("flaky", "no")));
        assert_eq!(st.status, RunStatus::Failed);
        assert_eq!(
            h.iter().filter(|e| matches!(e, Event::AttemptStarted { .. })).count(),
            4
        );
        assert!(st.error.unwrap().message.contains("after 4 attempts"));
    }

    /// A run of workflow `w` whose step `a` has started its first attempt.
    fn started_a() -> Vec<Event> {
        vec![
            Event::RunStarted {
                workflow: "w".into(),
                version: 1,
                input: "null".into(),
            },
            Event::AttemptStarted {
                step: "a".into(),
                visit: 1,
                attempt: 1,
                key: "r1/a/1".into(),
            },
        ]
    }

    #[test]
    fn crash_mid_attempt_reruns_same_attempt_with_same_key() {
        let d = def("name: w\nversion: 1\nsteps:\n  - {id: a, action: x}\n");
        let history = started_a();
        let st = RunState::replay(&d, "r1", &history).unwrap();
        match &decide(&d, &st)[..] {
            [Command::RunActivity { attempt: 1, key, .. }] => assert_eq!(key, "r1/a/1"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn completed_step_is_never_decided_again() {
        let d = def("name: w\nversion: 1\nsteps:\n  - {id: a, action: x}\n  - {id: b, action: x, depends_on: [a]}\n");
        let mut history = started_a();
        history.push(Event::StepCompleted {
            step: "a".into(),
            visit: 1,
            output: "1".into(),
        });
        let st = RunState::replay(&d, "r1", &history).unwrap();
        let cmds = decide(&d, &st);
        assert!(
            cmds.iter().all(|c| !matches!(c, Command::RunActivity { step: 0, .. })),
            "{cmds:?}"
        );
    }

    #[test]
    fn sleep_becomes_a_timer_and_resumes_as_await() {
        let d = def("name: w\nversion: 1\nsteps:\n  - {id: nap, action: sleep, args: {duration: 2s}}\n");
        let st = RunState::new(&d, "r1", Value::Null);
        assert_eq!(
            decide(&d, &st),
            vec![Command::StartTimer {
                step: 0,
                visit: 1,
                duration_ms: 2000
            }]
        );
        let mut st = st;
        st.apply(
            &d,
            &Event::TimerSet {
                step: "nap".into(),
                visit: 1,
                fire_at_ms: 5000,
                duration_ms: 2000,
            },
        )
        .unwrap();
        assert_eq!(
            decide(&d, &st),
            vec![Command::AwaitTimer {
                step: 0,
                visit: 1,
                fire_at_ms: 5000,
                duration_ms: 2000,
                completes: true,
            }]
        );
    }

    #[test]
    fn fail_action_and_bad_expression_fail_the_run() {
        let d = def(
            "name: w\nversion: 1\nsteps:\n  - {id: a, action: fail, args: {error: line.stop, message: 'too hot'}}\n",
        );
        let (st, _) = simulate(&d, Value::Null, |_, _| Ok(json!(null)));
        assert_eq!(st.status, RunStatus::Failed);
        assert!(st.error.unwrap().message.contains("too hot"));
        let d = def("name: w\nversion: 1\nsteps:\n  - {id: a, action: set, args: {v: '{{ input.missing.deep }}'}}\n");
        let (st, _) = simulate(&d, json!({}), |_, _| Ok(json!(null)));
        assert_eq!(st.status, RunStatus::Failed);
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        /// A random DAG: step i depends on a subset of the steps before it.
        fn arb_dag() -> impl Strategy<Value = (String, usize)> {
            (1usize..7).prop_flat_map(|n| {
                let deps = proptest::collection::vec(proptest::collection::vec(any::<bool>(), n), n);
                let attempts = proptest::collection::vec(1u32..4, n);
                (Just(n), deps, attempts).prop_map(|(n, deps, attempts)| {
                    let mut doc = String::from("name: p\nversion: 1\nsteps:\n");
                    for i in 0..n {
                        let d: Vec<String> = (0..i).filter(|&j| deps[i][j]).map(|j| format!("s{j}")).collect();
                        doc.push_str(&format!(
                            "  - id: s{i}\n    action: x\n    depends_on: [{}]\n    retry: {{max_attempts: {}, initial_interval: 1s, jitter: 0}}\n",
                            d.join(", "),
                            attempts[i]
                        ));
                    }
                    (doc, n)
                })
            })
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(300))]

            /// Whatever fails and wherever the process crashes, a completed step never runs
            /// again, steps run only after their dependencies, every attempt of a step uses the
            /// same key, and replaying the history reproduces the state.
            #[test]
            fn crashes_and_failures_keep_the_invariants(
                (doc, n) in arb_dag(),
                failures in proptest::collection::vec(any::<bool>(), 64),
                crashes in proptest::collection::vec(any::<bool>(), 64),
            ) {
                let d = def(&doc);
                let mut st = RunState::new(&d, "r1", Value::Null);
                let mut history = vec![Event::RunStarted { workflow: "p".into(), version: 1, input: "null".into() }];
                let (mut fi, mut ci, mut now) = (0usize, 0usize, 1_000u64);
                for _ in 0..500 {
                    let cmds = decide(&d, &st);
                    if cmds.is_empty() {
                        break;
                    }
                    let mut batch = Vec::new();
                    for c in cmds {
                        match c {
                            Command::Record(e) => batch.push(e),
                            Command::RunActivity { step, visit, attempt, key, not_before_ms, .. } => {
                                let id = d.doc.steps[step].id.clone();
                                now = now.max(not_before_ms.unwrap_or(0));
                                batch.push(Event::AttemptStarted { step: id.clone(), visit, attempt, key });
                                ci += 1;
                                if crashes[ci % crashes.len()] && ci % 3 == 0 {
                                    // Crash after the start was journaled, before any result.
                                    break;
                                }
                                fi += 1;
                                if failures[fi % failures.len()] {
                                    let f = FailedAttempt { step: &id, visit, attempt, error: ErrorInfo::new("e", "x"), retryable: true, compensation: false };
                                    batch.extend(attempt_failed(&d.plans[step], f, now, 0.0));
                                } else {
                                    batch.push(Event::StepCompleted { step: id, visit, output: "1".into() });
                                }
                            }
                            other => prop_assert!(false, "unexpected command {:?}", other),
                        }
                    }
                    for e in &batch {
                        st.apply(&d, e).unwrap();
                    }
                    history.extend(batch);
                    // Every so often the process restarts: state comes only from the journal.
                    if ci % 4 == 0 {
                        st = RunState::replay(&d, "r1", &history).unwrap();
                    }
                }
                prop_assert!(st.status.is_terminal(), "run did not finish: {:?}", st.status);

                let pos = |kind: &str, step: &str| -> Vec<usize> {
                    history.iter().enumerate().filter(|(_, e)| e.name() == kind && e.step() == Some(step)).map(|(i, _)| i).collect()
                };
                for i in 0..n {
                    let id = format!("s{i}");
                    let done = pos("step_completed", &id);
                    prop_assert!(done.len() <= 1, "{} completed {} times", id, done.len());
                    if let Some(&at) = done.first() {
                        prop_assert!(pos("attempt_started", &id).iter().all(|&s| s < at), "{} started after completing", id);
                        for &dep in &d.plans[i].deps {
                            let dep_done = pos("step_completed", &format!("s{dep}"));
                            prop_assert!(dep_done.first().is_some_and(|&x| x < at), "{} finished before its dependency s{}", id, dep);
                        }
                    }
                    for e in &history {
                        if let Event::AttemptStarted { step, key, .. } = e {
                            prop_assert_eq!(key, &idempotency_key("r1", step, 1));
                        }
                    }
                }
                let replayed = RunState::replay(&d, "r1", &history).unwrap();
                prop_assert_eq!(replayed.status, st.status);
                prop_assert_eq!(replayed.output, st.output);
                let all_done = (0..n).all(|i| !pos("step_completed", &format!("s{i}")).is_empty());
                prop_assert_eq!(st.status == RunStatus::Completed, all_done);
            }
        }
    }
}
