//! Workflow definitions: the YAML/JSON document format and its validation.
//!
//! A definition is either a DAG (steps with `depends_on`; a step runs once all it depends on
//! succeeded, optionally guarded by `when`) or a state machine (`start`, then each step names its
//! successor with `next`, `choices` + `default`, or `end`). Validation collects every problem it
//! finds, each naming the step and field, so a user fixes a document in one pass.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{Map, Value};

use crate::expr;

/// Largest definition document accepted, in bytes.
pub const MAX_DOCUMENT_BYTES: usize = 1024 * 1024;
/// Largest number of steps in one definition.
pub const MAX_STEPS: usize = 1000;
/// Default loop guard: how many times one step may run within a single run.
pub const DEFAULT_MAX_VISITS: u32 = 1000;
/// Longest name or step id.
pub const MAX_NAME_LEN: usize = 64;

/// How the steps of a definition are connected.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// Steps with dependencies; fan-out and fan-in.
    #[default]
    Dag,
    /// Steps with transitions chosen by conditions; loops allowed.
    StateMachine,
}

/// How a state-machine step ends the run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum End {
    /// The run completes successfully after this step.
    Succeed,
    /// The run fails after this step.
    Fail,
}

/// A duration written as `"30s"`, `"1m 30s"`, `"250ms"` or a number of seconds.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(transparent)]
pub struct DurationText(pub String);

impl<'de> Deserialize<'de> for DurationText {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = DurationText;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a duration such as \"30s\" or a number of seconds")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<DurationText, E> {
                Ok(DurationText(v.to_string()))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<DurationText, E> {
                Ok(DurationText(format!("{v}s")))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<DurationText, E> {
                Ok(DurationText(format!("{v}s")))
            }
            fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<DurationText, E> {
                Ok(DurationText(format!("{}ms", (v * 1000.0).round() as i64)))
            }
        }
        d.deserialize_any(V)
    }
}

/// Parses a duration (`"30s"`, `"1m 30s"`, `"250ms"`).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    if t.starts_with('-') {
        return Err(format!("'{s}' is negative"));
    }
    humantime::parse_duration(t)
        .map_err(|e| format!("'{s}' is not a duration ({e}); write e.g. \"30s\", \"5m\", \"250ms\""))
}

/// An action call without step wiring (used by `compensate`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ActionCall {
    /// Action name, e.g. `exec`.
    pub action: String,
    /// Arguments; strings may be templates.
    #[serde(default)]
    pub args: Map<String, Value>,
    /// Retry policy for the call.
    #[serde(default)]
    pub retry: Option<RetrySpec>,
    /// Per-attempt timeout.
    #[serde(default)]
    pub timeout: Option<DurationText>,
}

/// A branch of a state-machine step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Choice {
    /// Condition over `input`, `steps` and `run`.
    pub when: String,
    /// Step to go to when the condition holds.
    pub next: String,
}

/// Retry policy as written (Temporal / Step Functions semantics).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetrySpec {
    /// Total attempts including the first (default 3).
    #[serde(default)]
    pub max_attempts: Option<u32>,
    /// Delay before the second attempt (default 1s).
    #[serde(default)]
    pub initial_interval: Option<DurationText>,
    /// Multiplier applied to the delay after each attempt (default 2.0).
    #[serde(default)]
    pub backoff: Option<f64>,
    /// Ceiling on the delay (default 60s).
    #[serde(default)]
    pub max_interval: Option<DurationText>,
    /// Fraction of the delay randomly taken off, 0.0–1.0 (default 0.1).
    #[serde(default)]
    pub jitter: Option<f64>,
    /// Error kinds that fail the step at once; `http` matches `http.server_error`.
    #[serde(default)]
    pub non_retryable: Vec<String>,
}

/// A validated retry policy.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    /// Total attempts including the first.
    pub max_attempts: u32,
    /// Delay before the second attempt.
    pub initial_interval: Duration,
    /// Delay multiplier per attempt.
    pub backoff: f64,
    /// Ceiling on the delay.
    pub max_interval: Duration,
    /// Fraction of the delay randomly taken off.
    pub jitter: f64,
    /// Error kinds that are never retried.
    pub non_retryable: Vec<String>,
}

impl RetryPolicy {
    /// The policy of a step with no `retry` block: one attempt.
    pub fn none() -> Self {
        RetryPolicy {
            max_attempts: 1,
            initial_interval: Duration::from_secs(1),
            backoff: 2.0,
            max_interval: Duration::from_secs(60),
            jitter: 0.0,
            non_retryable: Vec::new(),
        }
    }

    /// True when `kind` is listed as non-retryable (exactly or by a dotted prefix).
    pub fn is_non_retryable(&self, kind: &str) -> bool {
        self.non_retryable
            .iter()
            .any(|k| k == kind || (kind.starts_with(k.as_str()) && kind.as_bytes().get(k.len()) == Some(&b'.')))
    }

    /// Delay before attempt `next_attempt` (2 = first retry), before jitter; `unit` in [0,1) takes
    /// off up to `jitter` of it.
    pub fn delay(&self, next_attempt: u32, unit: f64) -> Duration {
        let exp = next_attempt.saturating_sub(2).min(64) as i32;
        let base = self.initial_interval.as_secs_f64() * self.backoff.powi(exp);
        let capped = base.min(self.max_interval.as_secs_f64());
        let jittered = capped * (1.0 - self.jitter * unit.clamp(0.0, 1.0));
        Duration::try_from_secs_f64(jittered.max(0.0)).unwrap_or(self.max_interval)
    }
}

/// One step as written.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Step {
    /// Unique id within the definition.
    pub id: String,
    /// Action name (`exec`, `http`, `sleep`, `set`, `fail`, or a registered one).
    pub action: String,
    /// Arguments; strings may be templates.
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub args: Map<String, Value>,
    /// DAG: steps that must succeed first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub depends_on: Vec<String>,
    /// DAG: run only when this condition holds, otherwise skip (and skip dependents).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub when: Option<String>,
    /// State machine: the step that follows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next: Option<String>,
    /// State machine: conditional successors, first match wins.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub choices: Vec<Choice>,
    /// State machine: successor when no choice matches.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default: Option<String>,
    /// State machine: the run ends after this step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end: Option<End>,
    /// Loop guard: how often this step may run in one run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_visits: Option<u32>,
    /// Retry policy; without it a step gets one attempt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<RetrySpec>,
    /// Per-attempt timeout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<DurationText>,
    /// Action that undoes this step when a later failure unwinds the run (saga).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compensate: Option<ActionCall>,
    /// Named resource whose concurrency limit (agent configuration) this step's attempts share.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource: Option<String>,
}

/// Concurrency limits of one workflow.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Runs of this workflow (any version) that may be active at once; more wait in the queue.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_runs: Option<u32>,
}

/// What a schedule does with slots missed while the agent was down.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CatchUp {
    /// Missed slots are dropped.
    Skip,
    /// One run for the latest missed slot.
    #[default]
    RunOnce,
    /// A run for every missed slot, oldest first, at most `max_catch_up`.
    RunAll,
}

/// What a schedule does when a slot comes while its previous run is still active.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Overlap {
    /// The slot is dropped.
    #[default]
    Skip,
    /// Runs overlap.
    Allow,
    /// One slot waits for the previous run to end; further ones are dropped.
    QueueOne,
}

/// A schedule attached to a workflow: a cron expression or a fixed interval.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleSpec {
    /// Name, unique within the workflow; part of the run ids (default `s0`, `s1`, …).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// Cron expression in UTC, 5 fields (or 6 with seconds first).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cron: Option<String>,
    /// Fixed interval, e.g. `5m`, counted from the Unix epoch so slots are stable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub every: Option<DurationText>,
    /// Input of each run; `{{ slot }}` is not templated, the run gets `schedule` and `slot` fields.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input: Option<Value>,
    /// Missed slots after downtime: `skip`, `run_once` (default) or `run_all`.
    #[serde(default)]
    pub catch_up: CatchUp,
    /// Most missed slots `run_all` starts (default 10).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_catch_up: Option<u32>,
    /// A slot while the previous run is active: `skip` (default), `allow` or `queue_one`.
    #[serde(default)]
    pub overlap: Overlap,
}

/// Something outside the agent that starts runs of a workflow.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TriggerSpec {
    /// MQTT topic filter on the agent's configured local broker; the payload (JSON) is the input.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mqtt: Option<String>,
    /// Directory watched for `*.json` files; each file's content is the input of one run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub directory: Option<String>,
    /// A point of an OPC UA device watched for data changes; each change starts one run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub opcua: Option<OpcuaTrigger>,
}

/// An OPC UA data-change trigger: a monitored item on a point of a `kind: opcua` device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OpcuaTrigger {
    /// Device name in the equipment file.
    pub device: String,
    /// Point name in the device's `points`.
    pub point: String,
    /// Absolute deadband: a numeric change smaller than this starts nothing (default 0: any).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadband: Option<f64>,
    /// How often the server samples the value (default 500ms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sampling: Option<String>,
}

/// A definition document as written.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Document {
    /// Workflow name.
    pub name: String,
    /// Version; a run is pinned to the version it started with.
    pub version: u32,
    /// Free text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// `dag` (default) or `state_machine`.
    #[serde(default)]
    pub kind: Kind,
    /// State machine: first step (default: the first listed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start: Option<String>,
    /// The steps.
    pub steps: Vec<Step>,
    /// Template for the run's output (default: see the engine).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<Value>,
    /// Concurrency limits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<Limits>,
    /// Schedules that start runs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub schedules: Vec<ScheduleSpec>,
    /// Triggers that start runs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub triggers: Vec<TriggerSpec>,
}

/// What a step's action is to the engine and the runtime, resolved from its name once, at
/// validation, so no module matches action names as strings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepKind {
    /// `set`: the rendered arguments are the output; a journal record, no effect.
    Set,
    /// `fail`: fails the step (or the compensation) with the arguments' error.
    Fail,
    /// `continue_as_new`: ends the run and starts the next of its chain in the same commit.
    ContinueAsNew,
    /// `wait_signal`: waits for a named signal.
    WaitSignal,
    /// `approval`: waits for a person's decision (a signal bound to the step's visit).
    Approval,
    /// `sleep`: a durable timer.
    Sleep,
    /// `workflow`: one child run.
    Workflow,
    /// `map`: a child run per item.
    Map,
    /// Anything else: an action from the agent's registry, run as an attempt with side effects.
    Activity,
}

impl StepKind {
    /// The kind of the action named `action`.
    pub fn of(action: &str) -> StepKind {
        match action {
            "set" => StepKind::Set,
            "fail" => StepKind::Fail,
            "continue_as_new" => StepKind::ContinueAsNew,
            "wait_signal" => StepKind::WaitSignal,
            "approval" => StepKind::Approval,
            "sleep" => StepKind::Sleep,
            "workflow" => StepKind::Workflow,
            "map" => StepKind::Map,
            _ => StepKind::Activity,
        }
    }

    /// Whether an attempt of this step starts child runs (a parent's cancel must reach them).
    pub fn starts_children(self) -> bool {
        matches!(self, StepKind::Workflow | StepKind::Map)
    }

    /// Whether this action may undo a step: it must be an effect (or a record), not a wait or a
    /// new run.
    pub fn can_compensate(self) -> bool {
        matches!(self, StepKind::Set | StepKind::Fail | StepKind::Activity)
    }
}

/// Per-step settings resolved at validation.
#[derive(Debug, Clone)]
pub struct StepPlan {
    /// What the step's action is.
    pub kind: StepKind,
    /// Parsed retry policy.
    pub retry: RetryPolicy,
    /// Parsed per-attempt timeout.
    pub timeout: Option<Duration>,
    /// Loop guard.
    pub max_visits: u32,
    /// Indices of the steps this one depends on (DAG).
    pub deps: Vec<usize>,
    /// Indices of the steps that depend on this one (DAG).
    pub dependents: Vec<usize>,
    /// The compensation's retry policy and timeout, when the step has a `compensate`.
    pub compensate: Option<CompensationPlan>,
}

/// Resolved settings of a step's compensation.
#[derive(Debug, Clone)]
pub struct CompensationPlan {
    /// What the compensation's action is.
    pub kind: StepKind,
    /// Retry policy of the compensation.
    pub retry: RetryPolicy,
    /// Per-attempt timeout.
    pub timeout: Option<Duration>,
}

/// A validated definition.
#[derive(Debug, Clone)]
pub struct Definition {
    /// The document as written.
    pub doc: Document,
    /// Resolved settings, one per step, same order as `doc.steps`.
    pub plans: Vec<StepPlan>,
    /// Step id → index.
    pub index: HashMap<String, usize>,
    /// State machine: index of the first step.
    pub start: usize,
}

impl Definition {
    /// Workflow name.
    pub fn name(&self) -> &str {
        &self.doc.name
    }
    /// Workflow version.
    pub fn version(&self) -> u32 {
        self.doc.version
    }
    /// A step by id.
    pub fn step(&self, id: &str) -> Option<(usize, &Step)> {
        self.index.get(id).map(|&i| (i, &self.doc.steps[i]))
    }
    /// The signal names this workflow's `wait_signal` steps wait for, and whether some step
    /// computes its name from a template (so any name may be awaited).
    pub fn signal_names(&self) -> (Vec<String>, bool) {
        let mut names = Vec::new();
        let mut templated = false;
        let waits = self.doc.steps.iter().zip(&self.plans);
        for (step, _) in waits.filter(|(_, p)| p.kind == StepKind::WaitSignal) {
            match step.args.get("signal").and_then(Value::as_str) {
                Some(n) if crate::expr::is_template(n) => templated = true,
                Some(n) if !names.iter().any(|m| m == n) => names.push(n.to_string()),
                _ => {}
            }
        }
        (names, templated)
    }

    /// The canonical JSON form, stored in the journal so a run can always re-read its version.
    pub fn to_json(&self) -> String {
        serde_json::to_string(&self.doc).unwrap_or_default()
    }

    /// A definition of independent steps with default settings (a stand-in, never run).
    pub fn from_parts(name: &str, version: u32, steps: Vec<Step>, index: HashMap<String, usize>) -> Definition {
        let plans = steps
            .iter()
            .map(|s: &Step| StepPlan {
                kind: StepKind::of(&s.action),
                retry: RetryPolicy::none(),
                timeout: None,
                max_visits: u32::MAX,
                deps: Vec::new(),
                dependents: Vec::new(),
                compensate: None,
            })
            .collect();
        Definition {
            doc: Document {
                name: name.to_string(),
                version,
                description: None,
                kind: Kind::Dag,
                start: None,
                steps,
                output: None,
                limits: None,
                schedules: Vec::new(),
                triggers: Vec::new(),
            },
            plans,
            index,
            start: 0,
        }
    }
}

impl Step {
    /// A step known only by its id (its action is not known either).
    pub fn outline(id: &str) -> Step {
        Step {
            id: id.to_string(),
            action: String::new(),
            args: Map::new(),
            depends_on: Vec::new(),
            when: None,
            next: None,
            choices: Vec::new(),
            default: None,
            end: None,
            max_visits: None,
            retry: None,
            timeout: None,
            compensate: None,
            resource: None,
        }
    }
}

/// One thing wrong with a definition, and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Where: `steps[2] (open_valve).retry.backoff`.
    pub at: String,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.at, self.message)
    }
}

/// Why a document is not a valid definition.
#[derive(Debug, thiserror::Error)]
pub enum DefinitionError {
    /// The document is larger than [`MAX_DOCUMENT_BYTES`].
    #[error("definition is {size} bytes; the limit is {limit} bytes")]
    TooLarge {
        /// Actual size.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// The document is not well-formed YAML/JSON or does not have the definition's shape.
    #[error("{format} error: {message}")]
    Syntax {
        /// `YAML` or `JSON`.
        format: &'static str,
        /// Parser message with line and column.
        message: String,
    },
    /// The document parsed but breaks the rules.
    #[error("invalid workflow '{name}': {}", problems.iter().map(|p| format!("\n  - {p}")).collect::<String>())]
    Invalid {
        /// Workflow name as written.
        name: String,
        /// Every problem found.
        problems: Vec<Problem>,
    },
}

/// What the validator needs to know about actions.
pub trait ActionCatalog {
    /// Every known action name, for "did you mean" messages.
    fn names(&self) -> Vec<String>;
    /// `None` when the action is unknown, else the problems with `args` (empty when fine).
    /// Template strings are not checked for type, only presence.
    fn check(&self, action: &str, args: &Map<String, Value>) -> Option<Vec<String>>;
}

/// An action's argument names, for the common required/unknown checks.
#[derive(Debug, Clone, Copy)]
pub struct Signature {
    /// Arguments that must be present.
    pub required: &'static [&'static str],
    /// Arguments that may be present.
    pub optional: &'static [&'static str],
}

impl Signature {
    /// Problems with the argument names of `args`.
    pub fn check_names(&self, args: &Map<String, Value>) -> Vec<String> {
        let mut out = Vec::new();
        for r in self.required {
            if !args.contains_key(*r) {
                out.push(format!("missing required argument '{r}'"));
            }
        }
        for k in args.keys() {
            if !self.required.contains(&k.as_str()) && !self.optional.contains(&k.as_str()) {
                let known: Vec<_> = self.required.iter().chain(self.optional).copied().collect();
                out.push(format!(
                    "unknown argument '{k}' (expected one of: {})",
                    known.join(", ")
                ));
            }
        }
        out
    }
}

/// Parses a document: JSON when it starts with `{`, YAML otherwise.
pub fn parse_document(text: &str) -> Result<Document, DefinitionError> {
    if text.len() > MAX_DOCUMENT_BYTES {
        return Err(DefinitionError::TooLarge {
            size: text.len(),
            limit: MAX_DOCUMENT_BYTES,
        });
    }
    if text.trim_start().starts_with('{') {
        serde_json::from_str(text).map_err(|e| DefinitionError::Syntax {
            format: "JSON",
            message: e.to_string(),
        })
    } else {
        serde_saphyr::from_str(text).map_err(|e| {
            // The parser stops at its first error; the lines it would trip on next are found
            // here, so one `validate` names all of them.
            let mut message = e.to_string();
            for p in yaml_lint(text) {
                message.push_str(&format!("\n  - also {p}"));
            }
            DefinitionError::Syntax {
                format: "YAML",
                message,
            }
        })
    }
}

/// Mistakes a YAML parser reports one at a time, found on every line at once: tabs in the
/// indentation (YAML indents with spaces only) and a `key:value` with no space after the colon
/// where a mapping key is meant.
pub fn yaml_lint(text: &str) -> Vec<String> {
    // The definition's own keys: elsewhere `a:b` is a fine scalar (a URL, a time).
    const KEYS: [&str; 21] = [
        "id",
        "action",
        "args",
        "depends_on",
        "when",
        "next",
        "choices",
        "default",
        "end",
        "max_visits",
        "retry",
        "timeout",
        "compensate",
        "resource",
        "name",
        "version",
        "description",
        "kind",
        "start",
        "steps",
        "output",
    ];
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let n = i + 1;
        let indent: String = line.chars().take_while(|c| c.is_whitespace()).collect();
        if indent.contains('\t') {
            out.push(format!("line {n}: a tab in the indentation (YAML indents with spaces)"));
        }
        let body = line.trim_start().trim_start_matches("- ");
        if body.starts_with('#') {
            continue;
        }
        if let Some((key, value)) = body.split_once(':')
            && !key.is_empty()
            && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
            && value.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
            && KEYS.contains(&key)
        {
            out.push(format!(
                "line {n}: '{key}:{value}' needs a space after the colon to be a key"
            ));
        }
    }
    out
}

/// Parses and validates a document.
pub fn parse(text: &str, catalog: &dyn ActionCatalog) -> Result<Definition, DefinitionError> {
    validate(parse_document(text)?, catalog)
}

fn valid_ident(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        && s.len() <= MAX_NAME_LEN
}

struct Checker {
    problems: Vec<Problem>,
}

impl Checker {
    fn push(&mut self, at: impl Into<String>, message: impl Into<String>) {
        self.problems.push(Problem {
            at: at.into(),
            message: message.into(),
        });
    }

    fn duration(&mut self, at: &str, d: &Option<DurationText>) -> Option<Duration> {
        let d = d.as_ref()?;
        match parse_duration(&d.0) {
            Ok(v) if v.is_zero() => {
                self.push(at, format!("'{}' must be greater than zero", d.0));
                None
            }
            Ok(v) => Some(v),
            Err(e) => {
                self.push(at, e);
                None
            }
        }
    }

    fn retry(&mut self, at: &str, spec: &Option<RetrySpec>) -> RetryPolicy {
        let Some(spec) = spec else { return RetryPolicy::none() };
        let mut p = RetryPolicy {
            max_attempts: spec.max_attempts.unwrap_or(3),
            initial_interval: Duration::from_secs(1),
            backoff: spec.backoff.unwrap_or(2.0),
            max_interval: Duration::from_secs(60),
            jitter: spec.jitter.unwrap_or(0.1),
            non_retryable: spec.non_retryable.clone(),
        };
        if p.max_attempts == 0 {
            self.push(format!("{at}.max_attempts"), "must be at least 1");
        }
        if let Some(d) = self.duration(&format!("{at}.initial_interval"), &spec.initial_interval) {
            p.initial_interval = d;
        }
        if let Some(d) = self.duration(&format!("{at}.max_interval"), &spec.max_interval) {
            p.max_interval = d;
        } else if spec.max_interval.is_none() {
            p.max_interval = p.max_interval.max(p.initial_interval);
        }
        if !(p.backoff.is_finite() && p.backoff >= 1.0 && p.backoff <= 100.0) {
            self.push(
                format!("{at}.backoff"),
                format!("{} must be between 1.0 and 100.0", p.backoff),
            );
        }
        if !(p.jitter.is_finite() && (0.0..=1.0).contains(&p.jitter)) {
            self.push(
                format!("{at}.jitter"),
                format!("{} must be between 0.0 and 1.0", p.jitter),
            );
        }
        if p.initial_interval > p.max_interval {
            self.push(format!("{at}.initial_interval"), "is larger than max_interval");
        }
        p
    }

    fn action(&mut self, at: &str, action: &str, args: &Map<String, Value>, catalog: &dyn ActionCatalog) {
        match catalog.check(action, args) {
            None => {
                let mut names = catalog.names();
                names.sort();
                self.push(
                    format!("{at}.action"),
                    format!("unknown action '{action}' (known: {})", names.join(", ")),
                );
            }
            Some(problems) => {
                for p in problems {
                    self.push(format!("{at}.args"), p);
                }
            }
        }
    }

    /// Checks the template syntax and references in `value`.
    fn templates(&mut self, at: &str, value: &Value, ids: &HashMap<String, usize>) {
        let mut found = Vec::new();
        expr::templates_in(value, at, &mut found);
        for (path, src) in found {
            match expr::check_template(src) {
                Ok(vars) => self.references(&path, &vars, ids),
                Err(e) => self.push(path, format!("template error: {e}")),
            }
        }
    }

    fn condition(&mut self, at: &str, src: &str, ids: &HashMap<String, usize>) {
        match expr::check_expression(src) {
            Ok(vars) => self.references(at, &vars, ids),
            Err(e) => self.push(at, format!("expression error: {e}")),
        }
    }

    fn references(&mut self, at: &str, vars: &BTreeSet<String>, ids: &HashMap<String, usize>) {
        for v in vars {
            let mut parts = v.split('.');
            let root = parts.next().unwrap_or_default();
            if !expr::ROOTS.contains(&root) {
                self.push(
                    at,
                    format!("unknown variable '{root}' (use one of: {})", expr::ROOTS.join(", ")),
                );
            } else if root == "steps"
                && let Some(step) = parts.next()
                && !ids.contains_key(step)
            {
                self.push(at, format!("refers to unknown step '{step}'"));
            }
        }
    }
}

/// Parses a schedule's cron expression (5 fields, or 6 with seconds first), in UTC.
pub fn parse_cron(expr: &str) -> Result<croner::Cron, String> {
    croner::parser::CronParser::builder()
        .seconds(croner::parser::Seconds::Optional)
        .build()
        .parse(expr)
        .map_err(|e| format!("cron '{expr}': {e}"))
}

/// The id of schedule `i` of a workflow: its `id`, or `s{i}`.
pub fn schedule_id(spec: &ScheduleSpec, i: usize) -> String {
    spec.id.clone().unwrap_or_else(|| format!("s{i}"))
}

fn check_schedules(doc: &Document, c: &mut Checker) {
    let mut ids = std::collections::HashSet::new();
    for (i, s) in doc.schedules.iter().enumerate() {
        let at = format!("schedules[{i}]");
        let id = schedule_id(s, i);
        if !valid_ident(&id) {
            c.push(
                format!("{at}.id"),
                format!("'{id}' must start with a letter and use letters, digits, '_' or '-'"),
            );
        }
        if !ids.insert(id.clone()) {
            c.push(format!("{at}.id"), format!("duplicate schedule id '{id}'"));
        }
        match (&s.cron, &s.every) {
            (Some(_), Some(_)) | (None, None) => c.push(&at, "give exactly one of cron or every"),
            (Some(expr), None) => {
                if let Err(e) = parse_cron(expr) {
                    c.push(format!("{at}.cron"), e);
                }
            }
            (None, Some(_)) => {
                if let Some(d) = c.duration(&format!("{at}.every"), &s.every)
                    && d < Duration::from_secs(1)
                {
                    c.push(format!("{at}.every"), "must be at least 1s");
                }
            }
        }
        if s.max_catch_up == Some(0) {
            c.push(format!("{at}.max_catch_up"), "must be at least 1");
        }
        if let Some(input) = &s.input
            && !input.is_object()
        {
            c.push(format!("{at}.input"), "must be an object");
        }
    }
}

/// Validates a parsed document into a [`Definition`].
pub fn validate(doc: Document, catalog: &dyn ActionCatalog) -> Result<Definition, DefinitionError> {
    let mut c = Checker { problems: Vec::new() };
    if !valid_ident(&doc.name) {
        c.push("name", format!("'{}' must start with a letter, use only letters, digits, '_' or '-', and be at most {MAX_NAME_LEN} characters", doc.name));
    }
    if doc.version == 0 {
        c.push("version", "must be at least 1");
    }
    if doc.steps.is_empty() {
        c.push("steps", "a workflow needs at least one step");
    }
    if doc.steps.len() > MAX_STEPS {
        c.push("steps", format!("{} steps; the limit is {MAX_STEPS}", doc.steps.len()));
    }

    let mut index = HashMap::new();
    for (i, s) in doc.steps.iter().enumerate() {
        if !valid_ident(&s.id) {
            c.push(format!("steps[{i}].id"), format!("'{}' must start with a letter, use only letters, digits, '_' or '-', and be at most {MAX_NAME_LEN} characters", s.id));
        }
        if index.insert(s.id.clone(), i).is_some() {
            c.push(format!("steps[{i}].id"), format!("duplicate step id '{}'", s.id));
        }
    }

    let mut plans = Vec::with_capacity(doc.steps.len());
    for (i, s) in doc.steps.iter().enumerate() {
        let at = format!("steps[{i}] ({})", s.id);
        c.action(&at, &s.action, &s.args, catalog);
        c.templates(&format!("{at}.args"), &Value::Object(s.args.clone()), &index);
        let retry = c.retry(&format!("{at}.retry"), &s.retry);
        let timeout = c.duration(&format!("{at}.timeout"), &s.timeout);
        let compensate = s.compensate.as_ref().map(|comp| {
            let cat = format!("{at}.compensate");
            c.action(&cat, &comp.action, &comp.args, catalog);
            let kind = StepKind::of(&comp.action);
            if !kind.can_compensate() {
                c.push(
                    format!("{cat}.action"),
                    format!(
                        "'{}' cannot compensate a step; use an action with an effect",
                        comp.action
                    ),
                );
            }
            c.templates(&format!("{cat}.args"), &Value::Object(comp.args.clone()), &index);
            CompensationPlan {
                kind,
                retry: c.retry(&format!("{cat}.retry"), &comp.retry),
                timeout: c.duration(&format!("{cat}.timeout"), &comp.timeout),
            }
        });
        if s.max_visits == Some(0) {
            c.push(format!("{at}.max_visits"), "must be at least 1");
        }
        let mut deps = Vec::new();
        for d in &s.depends_on {
            match index.get(d) {
                Some(&j) if j == i => c.push(format!("{at}.depends_on"), "a step cannot depend on itself"),
                Some(&j) => deps.push(j),
                None => c.push(format!("{at}.depends_on"), format!("unknown step '{d}'")),
            }
        }
        plans.push(StepPlan {
            kind: StepKind::of(&s.action),
            retry,
            timeout,
            max_visits: s.max_visits.unwrap_or(DEFAULT_MAX_VISITS),
            deps,
            dependents: Vec::new(),
            compensate,
        });
    }
    for i in 0..plans.len() {
        for d in plans[i].deps.clone() {
            plans[d].dependents.push(i);
        }
    }
    if let Some(out) = &doc.output {
        c.templates("output", out, &index);
    }

    check_schedules(&doc, &mut c);
    for (i, t) in doc.triggers.iter().enumerate() {
        let at = format!("triggers[{i}]");
        let given = [t.mqtt.is_some(), t.directory.is_some(), t.opcua.is_some()];
        if given.iter().filter(|g| **g).count() != 1 {
            c.push(&at, "give exactly one of mqtt, directory or opcua");
        }
        if let Some(topic) = &t.mqtt
            && (topic.is_empty() || topic.len() > 256)
        {
            c.push(format!("{at}.mqtt"), "a topic filter is 1-256 characters");
        }
        if t.directory.as_ref().is_some_and(|d| d.is_empty()) {
            c.push(format!("{at}.directory"), "must not be empty");
        }
        if let Some(o) = &t.opcua {
            for (field, name) in [("device", &o.device), ("point", &o.point)] {
                if !valid_ident(name) {
                    c.push(format!("{at}.opcua.{field}"), format!("'{name}' is not a valid name"));
                }
            }
            if let Some(d) = o.deadband
                && !(d.is_finite() && d >= 0.0)
            {
                c.push(
                    format!("{at}.opcua.deadband"),
                    format!("{d} must be a number of at least 0"),
                );
            }
            if let Some(e) = o.sampling.as_deref().and_then(|s| parse_duration(s).err()) {
                c.push(format!("{at}.opcua.sampling"), e);
            }
        }
    }
    if doc.limits.as_ref().and_then(|l| l.max_runs) == Some(0) {
        c.push("limits.max_runs", "must be at least 1");
    }
    for (i, s) in doc.steps.iter().enumerate() {
        if let Some(r) = &s.resource
            && !valid_ident(r)
        {
            c.push(
                format!("steps[{i}] ({}).resource", s.id),
                format!("'{r}' is not a valid resource name"),
            );
        }
    }

    let mut start = 0;
    match doc.kind {
        Kind::Dag => check_dag(&doc, &plans, &index, &mut c),
        Kind::StateMachine => start = check_state_machine(&doc, &index, &mut c),
    }

    if c.problems.is_empty() {
        Ok(Definition {
            doc,
            plans,
            index,
            start,
        })
    } else {
        Err(DefinitionError::Invalid {
            name: doc.name,
            problems: c.problems,
        })
    }
}

fn check_dag(doc: &Document, plans: &[StepPlan], index: &HashMap<String, usize>, c: &mut Checker) {
    if let Some(s) = &doc.start {
        c.push(
            "start",
            format!(
                "'start: {s}' is only for kind: state_machine; a DAG starts with every step that has no depends_on"
            ),
        );
    }
    for (i, s) in doc.steps.iter().enumerate() {
        let at = format!("steps[{i}] ({})", s.id);
        if s.next.is_some() || !s.choices.is_empty() || s.default.is_some() || s.end.is_some() {
            c.push(
                &at,
                "next/choices/default/end are for kind: state_machine; a DAG step uses depends_on",
            );
        }
        if let Some(w) = &s.when {
            c.condition(&format!("{at}.when"), w, index);
        }
    }
    // Kahn's algorithm; whatever is left over sits on or behind a cycle.
    let mut indegree: Vec<usize> = plans.iter().map(|p| p.deps.len()).collect();
    let mut queue: VecDeque<usize> = (0..plans.len()).filter(|&i| indegree[i] == 0).collect();
    let mut seen = 0;
    while let Some(i) = queue.pop_front() {
        seen += 1;
        for &d in &plans[i].dependents {
            indegree[d] -= 1;
            if indegree[d] == 0 {
                queue.push_back(d);
            }
        }
    }
    if seen < plans.len()
        && let Some(cycle) = find_cycle(plans)
    {
        let names: Vec<&str> = cycle.iter().map(|&i| doc.steps[i].id.as_str()).collect();
        c.push("steps", format!("dependency cycle: {}", names.join(" -> ")));
    }
}

/// One cycle in the dependency graph, as a closed path of step indices.
fn find_cycle(plans: &[StepPlan]) -> Option<Vec<usize>> {
    // 0 = unvisited, 1 = on stack, 2 = done.
    let mut mark = vec![0u8; plans.len()];
    let mut stack: Vec<(usize, usize)> = Vec::new();
    for root in 0..plans.len() {
        if mark[root] != 0 {
            continue;
        }
        stack.push((root, 0));
        mark[root] = 1;
        while let Some(&mut (node, ref mut next)) = stack.last_mut() {
            if *next < plans[node].deps.len() {
                let dep = plans[node].deps[*next];
                *next += 1;
                match mark[dep] {
                    0 => {
                        mark[dep] = 1;
                        stack.push((dep, 0));
                    }
                    1 => {
                        let pos = stack.iter().position(|&(n, _)| n == dep).unwrap_or(0);
                        let mut cycle: Vec<usize> = stack[pos..].iter().map(|&(n, _)| n).collect();
                        cycle.push(dep);
                        // The stack follows depends_on edges; reverse to read in execution order.
                        cycle.reverse();
                        return Some(cycle);
                    }
                    _ => {}
                }
            } else {
                mark[node] = 2;
                stack.pop();
            }
        }
    }
    None
}

fn check_state_machine(doc: &Document, index: &HashMap<String, usize>, c: &mut Checker) -> usize {
    let start = match &doc.start {
        Some(s) => match index.get(s) {
            Some(&i) => i,
            None => {
                c.push("start", format!("unknown step '{s}'"));
                0
            }
        },
        None => 0,
    };
    let mut edges: Vec<Vec<usize>> = vec![Vec::new(); doc.steps.len()];
    for (i, s) in doc.steps.iter().enumerate() {
        let at = format!("steps[{i}] ({})", s.id);
        if !s.depends_on.is_empty() {
            c.push(
                format!("{at}.depends_on"),
                "depends_on is for kind: dag; a state-machine step names its successor with next or choices",
            );
        }
        if s.when.is_some() {
            c.push(
                format!("{at}.when"),
                "when is for kind: dag; use choices in a state machine",
            );
        }
        let mut target = |field: String, t: &str, edges: &mut Vec<usize>| match index.get(t) {
            Some(&j) => edges.push(j),
            None => c.push(field, format!("unknown step '{t}'")),
        };
        let mut e = Vec::new();
        if let Some(n) = &s.next {
            target(format!("{at}.next"), n, &mut e);
        }
        for (k, ch) in s.choices.iter().enumerate() {
            target(format!("{at}.choices[{k}].next"), &ch.next, &mut e);
        }
        if let Some(d) = &s.default {
            target(format!("{at}.default"), d, &mut e);
        }
        edges[i] = e;
        for (k, ch) in s.choices.iter().enumerate() {
            c.condition(&format!("{at}.choices[{k}].when"), &ch.when, index);
        }
        let transitions =
            usize::from(s.next.is_some()) + usize::from(!s.choices.is_empty()) + usize::from(s.end.is_some());
        let terminal_action = StepKind::of(&s.action) == StepKind::Fail;
        if transitions == 0 && !terminal_action {
            c.push(
                &at,
                "no transition: add next, choices (with an optional default) or end: succeed|fail",
            );
        } else if transitions > 1 {
            c.push(&at, "use only one of next, choices or end");
        }
        if s.default.is_some() && s.choices.is_empty() {
            c.push(format!("{at}.default"), "default needs choices");
        }
    }
    // Everything must be reachable from start, or it is dead code the author did not mean.
    let mut reached = vec![false; doc.steps.len()];
    let mut queue = VecDeque::from([start]);
    while let Some(i) = queue.pop_front() {
        if i >= reached.len() || reached[i] {
            continue;
        }
        reached[i] = true;
        queue.extend(edges[i].iter().copied());
    }
    for (i, r) in reached.iter().enumerate() {
        if !r {
            c.push(
                format!("steps[{i}] ({})", doc.steps[i].id),
                "unreachable from the start step",
            );
        }
    }
    start
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_yaml_syntax_error_also_names_every_line_a_parser_would_trip_on_next() {
        let text = "name: bad\nversion: 1\nsteps:\n  - id: a\n    action: set\n\targs: {x: 1}\n  - id: b\n    action:set\n  - id: c\n\taction: set\n    args: {url: 'http://x:80'}\n";
        let Err(err) = super::parse_document(text) else {
            panic!("a syntax error was accepted");
        };
        let err = err.to_string();
        assert!(err.contains("YAML error"), "{err}");
        assert!(err.contains("also line 6: a tab in the indentation"), "{err}");
        assert!(
            err.contains("also line 8: 'action:set' needs a space after the colon"),
            "{err}"
        );
        assert!(err.contains("also line 10: a tab"), "{err}");
        assert!(!err.contains("line 11"), "a URL is not a key: {err}");
        // A well-formed document gets none of this.
        assert!(
            super::yaml_lint("name: ok\nsteps:\n  - {id: a, action: set}\n  - id: b\n    action: set\n").is_empty()
        );
    }
    use super::*;

    struct Cat;
    impl ActionCatalog for Cat {
        fn names(&self) -> Vec<String> {
            vec!["set".into(), "exec".into(), "fail".into()]
        }
        fn check(&self, action: &str, args: &Map<String, Value>) -> Option<Vec<String>> {
            match action {
                "set" | "fail" => Some(vec![]),
                "exec" => Some(
                    Signature {
                        required: &["command"],
                        optional: &["args"],
                    }
                    .check_names(args),
                ),
                _ => None,
            }
        }
    }

    fn problems(src: &str) -> Vec<String> {
        match parse(src, &Cat) {
            Ok(_) => vec![],
            Err(DefinitionError::Invalid { problems, .. }) => problems.iter().map(|p| p.to_string()).collect(),
            Err(e) => vec![e.to_string()],
        }
    }

    #[test]
    fn valid_dag_parses() {
        let d = parse(
            "name: w\nversion: 1\nsteps:\n  - id: a\n    action: set\n  - id: b\n    action: exec\n    args: {command: echo}\n    depends_on: [a]\n    retry: {max_attempts: 5, initial_interval: 200ms}\n    timeout: 10\n",
            &Cat,
        )
        .unwrap();
        assert_eq!(d.plans[1].deps, vec![0]);
        assert_eq!(d.plans[1].retry.max_attempts, 5);
        assert_eq!(d.plans[1].timeout, Some(Duration::from_secs(10)));
    }

    #[test]
    fn json_documents_parse_too() {
        let d = parse(
            r#"{"name":"j","version":2,"steps":[{"id":"a","action":"set","args":{"x":1}}]}"#,
            &Cat,
        )
        .unwrap();
        assert_eq!(d.version(), 2);
    }

    #[test]
    fn reports_unknown_refs_cycles_actions_durations_and_args() {
        let p = problems(
            "name: w\nversion: 1\nsteps:\n  - id: a\n    action: set\n    depends_on: [c]\n  - id: b\n    action: frobnicate\n  - id: c\n    action: exec\n    args: {comand: x}\n    depends_on: [a, ghost]\n    timeout: soon\n",
        );
        let all = p.join("\n");
        assert!(
            all.contains("dependency cycle: a -> c -> a") || all.contains("dependency cycle: c -> a -> c"),
            "{all}"
        );
        assert!(
            all.contains("steps[1] (b).action: unknown action 'frobnicate'"),
            "{all}"
        );
        assert!(all.contains("steps[2] (c).depends_on: unknown step 'ghost'"), "{all}");
        assert!(
            all.contains("steps[2] (c).args: missing required argument 'command'"),
            "{all}"
        );
        assert!(all.contains("unknown argument 'comand'"), "{all}");
        assert!(all.contains("steps[2] (c).timeout: 'soon' is not a duration"), "{all}");
    }

    #[test]
    fn state_machine_rules() {
        let p = problems(
            "name: w\nversion: 1\nkind: state_machine\nsteps:\n  - id: a\n    action: set\n    choices:\n      - when: steps.a.output.x > 1\n        next: b\n    default: zz\n  - id: b\n    action: set\n  - id: orphan\n    action: set\n    end: succeed\n",
        );
        let all = p.join("\n");
        assert!(all.contains("steps[0] (a).default: unknown step 'zz'"), "{all}");
        assert!(all.contains("steps[1] (b): no transition"), "{all}");
        assert!(all.contains("steps[2] (orphan): unreachable"), "{all}");
    }

    #[test]
    fn expressions_are_checked() {
        let p = problems(
            "name: w\nversion: 1\nsteps:\n  - id: a\n    action: set\n    args: {v: '{{ steps.nope.output }}', w: '{{ oops'}\n  - id: b\n    action: set\n    when: 'input.x >'\n",
        );
        let all = p.join("\n");
        assert!(
            all.contains("steps[0] (a).args.v: refers to unknown step 'nope'"),
            "{all}"
        );
        assert!(all.contains("steps[0] (a).args.w: template error"), "{all}");
        assert!(all.contains("steps[1] (b).when: expression error"), "{all}");
    }

    #[test]
    fn syntax_errors_name_the_line() {
        let p = problems("name: w\nversion: 1\nsteps:\n  - id: a\n    action: set\n   bad: [\n");
        assert!(p[0].starts_with("YAML error"), "{p:?}");
        let p = problems("name: w\nversion: 1\nstepz: []\n");
        assert!(p[0].contains("stepz"), "{p:?}");
    }

    #[test]
    fn retry_delay_grows_and_caps() {
        let p = RetryPolicy {
            max_attempts: 10,
            initial_interval: Duration::from_millis(100),
            backoff: 2.0,
            max_interval: Duration::from_millis(500),
            jitter: 0.0,
            non_retryable: vec!["http".into()],
        };
        assert_eq!(p.delay(2, 0.5), Duration::from_millis(100));
        assert_eq!(p.delay(3, 0.5), Duration::from_millis(200));
        assert_eq!(p.delay(6, 0.5), Duration::from_millis(500));
        assert!(p.is_non_retryable("http.client_error"));
        assert!(!p.is_non_retryable("https"));
    }
}
