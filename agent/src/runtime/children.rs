//! Child workflows and parallel map: steps that start other runs and complete with their results.
//! They are actions like any other ([`ChildRuns`] implements [`Action`]); they live in the
//! runtime because what they act on is the runtime itself.
//!
//! A child's run id is derived from the parent's step visit, so re-running the step after a crash
//! finds the child already started instead of starting it again (`Runtime::start` is idempotent
//! by id). Waiting is done by the parent's activity; the child is an ordinary run with its own
//! history, resumed at start-up like any other.

use std::sync::Arc;

use outpost_shared::{ErrorInfo, Event};
use serde_json::{Value, json};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use outpost_shared::definition::{Signature, StepKind};

use super::{MAX_RUN_ID_LEN, Runtime, RuntimeError, StartRequest};
use crate::actions::{Action, ActionError, ActionFuture, Call, str_arg};

/// Most items one map step fans out to.
pub const MAX_MAP_ITEMS: usize = 10_000;
/// Highest concurrency a map step may ask for.
pub const MAX_MAP_CONCURRENCY: usize = 64;

/// The deterministic id of the child run (or, for a map, the prefix of its children's ids)
/// started by visit `visit` of step `step` of run `run_id`.
pub fn child_id(run_id: &str, step: &str, visit: u32) -> String {
    let id = format!("{run_id}:{step}:{visit}");
    // Leave room for a map index; deep nesting falls back to a stable hash.
    if id.len() <= MAX_RUN_ID_LEN - 8 {
        id
    } else {
        format!("c{:016x}", fnv1a(id.as_bytes()))
    }
}

/// The parent of a child run id (`PARENT:STEP:VISIT`, maybe `:INDEX`, or a hashed `c…` id whose
/// parent is not recoverable: `Some("")`), when `exists` confirms the parent run.
pub fn parent_of(id: &str, exists: impl Fn(&str) -> bool) -> Option<&str> {
    let hashed = |s: &str| s.len() == 17 && s.starts_with('c') && s[1..].bytes().all(|b| b.is_ascii_hexdigit());
    let base = match id.rsplit_once(':') {
        Some((b, idx)) if hashed(b) && idx.bytes().all(|c| c.is_ascii_digit()) => return Some(""),
        _ if hashed(id) => return Some(""),
        _ => id,
    };
    // PARENT:STEP:VISIT, or PARENT:STEP:VISIT:INDEX for a map item.
    for cut in [2, 3] {
        let parts: Vec<&str> = base.rsplitn(cut + 1, ':').collect();
        if parts.len() == cut + 1
            && parts[..cut - 1]
                .iter()
                .all(|p| !p.is_empty() && p.bytes().all(|c| c.is_ascii_digit()))
            && exists(parts[cut])
        {
            return Some(parts[cut]);
        }
    }
    None
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3)
    })
}

fn version_arg(args: &Value) -> Result<Option<u32>, ActionError> {
    match args.get("version") {
        None | Some(Value::Null) => Ok(None),
        Some(v) => {
            v.as_u64().and_then(|v| u32::try_from(v).ok()).map(Some).ok_or_else(|| {
                ActionError::permanent("invalid_argument", format!("version {v} is not a version number"))
            })
        }
    }
}

/// The `workflow` (one child run) and `map` (a child run per item) actions, bound to the runtime
/// whose runs they start.
pub(super) struct ChildRuns {
    rt: Runtime,
    map: bool,
}

impl ChildRuns {
    /// The action for a step of kind `kind`, when it starts child runs.
    pub(super) fn for_kind(rt: Runtime, kind: StepKind) -> Option<ChildRuns> {
        match kind {
            StepKind::Workflow => Some(ChildRuns { rt, map: false }),
            StepKind::Map => Some(ChildRuns { rt, map: true }),
            _ => None,
        }
    }
}

impl Action for ChildRuns {
    fn signature(&self) -> Signature {
        let name = if self.map { "map" } else { "workflow" };
        crate::actions::engine_signature(name).unwrap_or(Signature {
            required: &[],
            optional: &[],
        })
    }

    fn execute(&self, call: Call) -> ActionFuture {
        let rt = self.rt.clone();
        if self.map {
            Box::pin(run_map(rt, call))
        } else {
            Box::pin(run_child(rt, call))
        }
    }
}

/// Runs one child workflow to its end and returns its output.
async fn run_child(rt: Runtime, call: Call) -> Result<Value, ActionError> {
    let workflow = str_arg(&call.args, "workflow")?.to_string();
    let version = version_arg(&call.args)?;
    let input = call.args.get("input").cloned().unwrap_or_else(|| json!({}));
    let id = child_id(&call.run_id, &call.step, call.visit);
    await_child(&rt, id, workflow, version, input).await
}

/// Starts (or finds) child run `id` and waits for it to end.
async fn await_child(
    rt: &Runtime,
    id: String,
    workflow: String,
    version: Option<u32>,
    input: Value,
) -> Result<Value, ActionError> {
    let req = StartRequest {
        workflow,
        version,
        input: Some(input),
        id: Some(id.clone()),
    };
    rt.start_child(req).await.map_err(start_error)?;
    let (rec, end) = rt.wait_until_ended(&id).await.map_err(start_error)?;
    let end = match end {
        Some(e) => e,
        None => rt.final_event(&id).map_err(start_error)?,
    };
    match end {
        Event::RunCompleted { output } => Ok(serde_json::from_str(&output).unwrap_or(Value::Null)),
        other => {
            let why = match &other {
                Event::RunFailed { error } | Event::RunCompensated { error } => error.to_string(),
                Event::RunCompensationFailed { step, error } => format!("compensation of '{step}': {error}"),
                Event::RunCancelled { reason } | Event::RunTerminated { reason } => reason.clone(),
                _ => String::new(),
            };
            Err(ActionError::permanent(
                "child.failed",
                format!("child run {id} ended {}: {why}", rec.status.as_str()),
            ))
        }
    }
}

fn start_error(e: RuntimeError) -> ActionError {
    match e {
        RuntimeError::Journal(e) => ActionError::retryable("child.journal", e.to_string()),
        other => ActionError::permanent("child.start", other.to_string()),
    }
}

/// Runs a child workflow per item with a concurrency cap; outputs come back in item order.
async fn run_map(rt: Runtime, call: Call) -> Result<Value, ActionError> {
    let args = &call.args;
    let workflow = str_arg(args, "workflow")?.to_string();
    let version = version_arg(args)?;
    let Some(items) = args.get("items").and_then(Value::as_array).cloned() else {
        return Err(ActionError::permanent(
            "invalid_argument",
            format!(
                "items must be a list, got {}",
                args.get("items").unwrap_or(&Value::Null)
            ),
        ));
    };
    if items.len() > MAX_MAP_ITEMS {
        return Err(ActionError::permanent(
            "invalid_argument",
            format!("items has {} elements; the limit is {MAX_MAP_ITEMS}", items.len()),
        ));
    }
    let count_arg = |name: &str, default: u64| match args.get(name) {
        None | Some(Value::Null) => Ok(default),
        Some(v) => v
            .as_u64()
            .ok_or_else(|| ActionError::permanent("invalid_argument", format!("{name} {v} is not a count"))),
    };
    let concurrency = count_arg("concurrency", 4)?.clamp(1, MAX_MAP_CONCURRENCY as u64) as usize;
    let tolerate = count_arg("tolerate", 0)? as usize;
    let extra = args
        .get("input")
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default();
    let base = child_id(&call.run_id, &call.step, call.visit);

    let slots = Arc::new(Semaphore::new(concurrency));
    let mut set: JoinSet<(usize, Result<Value, ActionError>)> = JoinSet::new();
    let mut results = vec![Value::Null; items.len()];
    let mut failures: Vec<(usize, ErrorInfo)> = Vec::new();
    let total = items.len();
    let absorb = |results: &mut Vec<Value>,
                  failures: &mut Vec<(usize, ErrorInfo)>,
                  (i, r): (usize, Result<Value, ActionError>)| match r {
        Ok(v) => results[i] = v,
        Err(e) => failures.push((i, e.info)),
    };
    for (i, item) in items.into_iter().enumerate() {
        // Wait for a free slot, collecting finished children meanwhile.
        let permit = loop {
            tokio::select! {
                p = slots.clone().acquire_owned() => break p,
                Some(Ok(r)) = set.join_next(), if !set.is_empty() => absorb(&mut results, &mut failures, r),
            }
        };
        while let Some(Ok(r)) = set.try_join_next() {
            absorb(&mut results, &mut failures, r);
        }
        if failures.len() > tolerate {
            break;
        }
        let mut input = extra.clone();
        input.insert("item".into(), item);
        input.insert("index".into(), json!(i));
        let (rt, workflow, id) = (rt.clone(), workflow.clone(), format!("{base}:{i}"));
        set.spawn(async move {
            let r = await_child(&rt, id, workflow, version, Value::Object(input)).await;
            drop(permit);
            (i, r)
        });
    }
    while failures.len() <= tolerate
        && let Some(joined) = set.join_next().await
    {
        if let Ok(r) = joined {
            absorb(&mut results, &mut failures, r);
        }
    }
    if failures.len() > tolerate {
        // Fail fast: stop what still runs.
        set.abort_all();
        for id in rt.children_of(&base) {
            let _ = rt.cancel(&id, "map step failed").await;
        }
        failures.sort_by_key(|(i, _)| *i);
        let (first, err) = &failures[0];
        return Err(ActionError::permanent(
            "map.failed",
            format!(
                "{} of {total} items failed (tolerate {tolerate}); item {first}: {err}",
                failures.len()
            ),
        ));
    }
    failures.sort_by_key(|(i, _)| *i);
    let failed: Vec<Value> = failures
        .iter()
        .map(|(i, e)| json!({"index": i, "error": {"kind": e.kind, "message": e.message}}))
        .collect();
    Ok(json!({ "results": results, "failed": failed }))
}
