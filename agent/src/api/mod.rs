//! The local API: JSON over HTTP on a Unix socket (only local users with access to the socket
//! file can drive the agent). The CLI, the benchmark and scripts all use it.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use outpost_shared::definition::DefinitionError;
use outpost_shared::{ErrorInfo, Event};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::engine::{RunState, RunStatus};
use crate::journal::{Applied, JournalError, RunRecord};
use crate::runtime::{Decision, Runtime, RuntimeError, StartRequest};

pub mod types;

use types::{
    ActivitiesView, AppliedReply, ApproveReply, Blocked, CheckpointReply, DefinitionRow, DeviceView, EquipmentView,
    ErrorDetail, ErrorReply, EventsPage, HistoryRow, JournalView, ReconnectReply, RetentionView, RunDetail, RunError,
    RunReply, ShownStatus, SignalReply, StartReply, StatusView, StorageErrorView, TimersView, TriggersView,
};

/// Largest request body, in bytes (definitions are capped at 1 MiB, inputs at 256 KiB).
pub const MAX_BODY_BYTES: usize = 2 * 1024 * 1024;
/// Longest a single `wait` request blocks.
pub const MAX_WAIT: Duration = Duration::from_secs(3600);

/// Builds the router.
pub fn router(rt: Runtime) -> Router {
    Router::new()
        .route("/v1/health", get(health))
        .route("/metrics", get(metrics))
        .route("/v1/status", get(status))
        .route("/v1/sync/reconnect", post(sync_reconnect))
        .route("/v1/journal/checkpoint", post(checkpoint))
        .route("/v1/definitions", post(apply).get(list_definitions))
        .route("/v1/definitions/{name}", get(get_definition))
        .route("/v1/runs", post(start).get(list_runs))
        .route("/v1/runs/{id}", get(show_run))
        .route("/v1/runs/{id}/wait", get(wait_run))
        .route("/v1/runs/{id}/events", get(run_events))
        .route("/v1/runs/{id}/cancel", post(cancel_run))
        .route("/v1/runs/{id}/terminate", post(terminate_run))
        .route("/v1/runs/{id}/retry", post(retry_run))
        .route("/v1/runs/{id}/signal", post(signal_run))
        .route("/v1/runs/{id}/approve", post(approve_run))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(Arc::new(rt))
}

type AppState = State<Arc<Runtime>>;

/// An API error: HTTP status, a stable code, a message, and for invalid definitions each problem.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    problems: Vec<String>,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
            problems: Vec::new(),
        }
    }

    /// The HTTP status and JSON body the API answers with (the CLI reads the same offline).
    pub fn answer(&self) -> (StatusCode, ErrorReply) {
        let body = ErrorReply {
            error: ErrorDetail {
                code: self.code.to_string(),
                message: self.message.clone(),
                problems: self.problems.clone(),
            },
        };
        (self.status, body)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, body) = self.answer();
        (status, Json(body)).into_response()
    }
}

impl From<RuntimeError> for ApiError {
    fn from(e: RuntimeError) -> Self {
        let msg = e.to_string();
        match e {
            RuntimeError::Definition(DefinitionError::Invalid { name, problems }) => ApiError {
                status: StatusCode::BAD_REQUEST,
                code: "invalid_definition",
                message: format!("invalid workflow '{name}': {} problem(s)", problems.len()),
                problems: problems.iter().map(|p| p.to_string()).collect(),
            },
            RuntimeError::Definition(_) => ApiError::new(StatusCode::BAD_REQUEST, "invalid_definition", msg),
            RuntimeError::Invalid(_) => ApiError::new(StatusCode::BAD_REQUEST, "invalid_request", msg),
            RuntimeError::NoSuchWorkflow { .. } | RuntimeError::NoSuchRun(_) => {
                ApiError::new(StatusCode::NOT_FOUND, "not_found", msg)
            }
            RuntimeError::Finished { .. } => ApiError::new(StatusCode::CONFLICT, "finished", msg),
            RuntimeError::WrongState(_) => ApiError::new(StatusCode::CONFLICT, "wrong_state", msg),
            RuntimeError::Busy(_) => ApiError::new(StatusCode::TOO_MANY_REQUESTS, "busy", msg),
            RuntimeError::Journal(JournalError::DefinitionConflict { .. }) => {
                ApiError::new(StatusCode::CONFLICT, "conflict", msg)
            }
            RuntimeError::Journal(_) | RuntimeError::DataDir { .. } => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "storage", msg)
            }
        }
    }
}

impl From<JournalError> for ApiError {
    fn from(e: JournalError) -> Self {
        RuntimeError::from(e).into()
    }
}

type ApiResult<T> = Result<Json<T>, ApiError>;

/// Runs blocking journal reads off the async workers.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T, ApiError> + Send + 'static) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?
}

use outpost_shared::journal::rfc3339;

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Prometheus metrics.
pub async fn metrics(State(rt): AppState) -> impl IntoResponse {
    let text = tokio::task::spawn_blocking(move || crate::metrics::render(&rt))
        .await
        .unwrap_or_default();
    ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], text)
}

async fn health() -> Json<Value> {
    Json(json!({"ok": true, "version": env!("CARGO_PKG_VERSION")}))
}

async fn status(State(rt): AppState) -> ApiResult<StatusView> {
    let rt2 = rt.clone();
    let (next_seq, timers) = blocking(move || Ok((rt2.journal().next_seq()?, rt2.journal().timer_summary()?))).await?;
    let s = rt.journal().stats();
    let ord = std::sync::atomic::Ordering::Relaxed;
    let mut triggers = TriggersView {
        schedules: 0,
        mqtt: 0,
        directories: 0,
    };
    for def in rt.latest_definitions() {
        triggers.schedules += def.doc.schedules.len();
        triggers.mqtt += def.doc.triggers.iter().filter(|t| t.mqtt.is_some()).count();
        triggers.directories += def.doc.triggers.iter().filter(|t| t.directory.is_some()).count();
    }
    let devices: Vec<DeviceView> = rt
        .registry()
        .equipment()
        .map(|eq| {
            eq.names()
                .into_iter()
                .map(|n| DeviceView {
                    kind: eq.kind_of(&n).unwrap_or("device").to_string(),
                    name: n,
                })
                .collect()
        })
        .unwrap_or_default();
    Ok(Json(StatusView {
        version: env!("CARGO_PKG_VERSION").to_string(),
        pid: std::process::id(),
        active_runs: rt.active_count(),
        parked_runs: rt.parked_count(),
        activities: ActivitiesView {
            running: rt.activities_running(),
            limit: rt.max_activities(),
        },
        limits: rt.limits().view(rt.active_count()),
        breakers: rt.breakers_view(),
        sync: rt.sync().map(|s| s.view(next_seq)),
        journal: JournalView {
            next_seq,
            file_bytes: rt.journal_file_bytes(),
            commits: s.commits.load(ord),
            events: s.events.load(ord),
            ops: s.ops.load(ord),
            unindexed_events: rt.journal().unindexed_events(),
            storage_error: rt
                .storage_failure()
                .map(|(error, since, blocked_runs)| StorageErrorView {
                    error,
                    since: rfc3339(since),
                    blocked_runs,
                }),
        },
        timers: TimersView {
            pending: timers.pending,
            next_at: timers.next_at.map(rfc3339),
        },
        triggers,
        equipment: EquipmentView { devices },
        retention: rt.last_prune().map(|(at, p)| RetentionView {
            last_at: rfc3339(at),
            runs_deleted: p.runs,
            events_deleted: p.events,
            commands_forgotten: p.commands,
            definitions_deleted: p.definitions,
            bytes_in_use_before: p.bytes_before,
        }),
    }))
}

async fn apply(State(rt): AppState, body: String) -> Result<(StatusCode, Json<AppliedReply>), ApiError> {
    let (def, applied) = rt.apply(&body).await?;
    let created = applied == Applied::Created;
    let code = if created { StatusCode::CREATED } else { StatusCode::OK };
    Ok((
        code,
        Json(AppliedReply {
            name: def.name().to_string(),
            version: def.version(),
            created,
            steps: def.doc.steps.len(),
        }),
    ))
}

async fn list_definitions(State(rt): AppState) -> ApiResult<Vec<DefinitionRow>> {
    let rt2 = rt.clone();
    let defs = blocking(move || Ok(rt2.journal().definitions()?)).await?;
    let list = defs
        .into_iter()
        .map(|(name, version, rec)| {
            let steps = serde_json::from_str::<Value>(&rec.json)
                .ok()
                .and_then(|d| d.get("steps").and_then(Value::as_array).map(Vec::len))
                .unwrap_or(0);
            DefinitionRow {
                name,
                version,
                applied_at: rfc3339(rec.applied_ms),
                steps,
            }
        })
        .collect();
    Ok(Json(list))
}

#[derive(Deserialize)]
struct VersionQuery {
    version: Option<u32>,
}

async fn get_definition(
    State(rt): AppState,
    Path(name): Path<String>,
    Query(q): Query<VersionQuery>,
) -> ApiResult<Value> {
    let def = rt.definition(&name, q.version)?;
    Ok(Json(
        json!({"name": def.name(), "version": def.version(), "document": def.doc}),
    ))
}

#[derive(Deserialize)]
struct StartQuery {
    /// Seconds to wait for the run to finish before answering.
    wait: Option<f64>,
}

async fn start(
    State(rt): AppState,
    Query(q): Query<StartQuery>,
    body: String,
) -> Result<(StatusCode, Json<StartReply>), ApiError> {
    let req: StartRequest = serde_json::from_str(&body)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid_request", format!("request body: {e}")))?;
    let asked_workflow = req.workflow.clone();
    let asked_input = req.input.clone().unwrap_or_else(|| json!({}));
    let resp = rt.start(req).await?;
    let mut out = StartReply {
        run_id: resp.run_id.clone(),
        created: resp.created,
        workflow: resp.workflow.clone(),
        version: resp.version,
        same_input: None,
        status: None,
        created_at: None,
        finished_at: None,
        duration_ms: None,
        waiting: None,
        output: None,
        error: None,
    };
    if !resp.created {
        // Reusing an id is how a caller retries a start safely; reusing it for another start
        // would silently hand back a run that is not the one asked for.
        let rt2 = rt.clone();
        let id = resp.run_id.clone();
        let first = blocking(move || Ok(rt2.journal().first_event(&id)?)).await?;
        let stored_input = match first.map(|r| r.event) {
            Some(Event::RunStarted { input, .. }) => serde_json::from_str::<Value>(&input).ok(),
            _ => None,
        };
        if resp.workflow != asked_workflow {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "id_reused",
                format!(
                    "run id '{}' already belongs to a run of workflow '{}'; choose another id",
                    resp.run_id, resp.workflow
                ),
            ));
        }
        if let Some(stored) = &stored_input
            && *stored != asked_input
        {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "id_reused",
                format!(
                    "run id '{}' already exists with a different input ({stored}); choose another id, \
                     or repeat the first input to get that run back",
                    resp.run_id
                ),
            ));
        }
        out.same_input = Some(stored_input.is_some());
    }
    if let Some(secs) = q.wait {
        let (rec, end) = rt.wait(&resp.run_id, Some(wait_limit(secs))).await?;
        let run = run_reply(&resp.run_id, &rec, end.as_ref(), &rt)?;
        out.status = Some(run.status);
        out.created_at = Some(run.created_at);
        out.finished_at = run.finished_at;
        out.duration_ms = Some(run.duration_ms);
        out.waiting = run.waiting;
        out.output = run.output;
        out.error = run.error;
    }
    Ok((
        if resp.created {
            StatusCode::CREATED
        } else {
            StatusCode::OK
        },
        Json(out),
    ))
}

fn wait_limit(secs: f64) -> Duration {
    if secs.is_finite() && secs > 0.0 {
        Duration::try_from_secs_f64(secs).map_or(MAX_WAIT, |d| d.min(MAX_WAIT))
    } else {
        MAX_WAIT
    }
}

/// A run's summary, and once it ended its output or error; `end` is its final event when
/// already known.
fn run_reply(run_id: &str, rec: &RunRecord, end: Option<&Event>, rt: &Runtime) -> Result<RunReply, ApiError> {
    let mut out = run_summary(run_id, rec);
    if rec.status.is_terminal() {
        let (output, error) = match end {
            Some(e) => outcome_of(Some(e)),
            None => outcome(rt, run_id)?,
        };
        out.output = Some(output);
        out.error = error;
    } else if let Some(b) = rt.storage_block(run_id) {
        // `start --wait` that times out on a run held up by a full disk says why.
        out.waiting = Some(format!("blocked: the journal cannot be written ({})", b.error));
    }
    Ok(out)
}

/// The output and error of a finished run, from its last event.
fn outcome(rt: &Runtime, run_id: &str) -> Result<(Value, Option<RunError>), ApiError> {
    let history = rt.journal().history(run_id)?;
    Ok(outcome_of(history.last().map(|(_, r)| &r.event)))
}

fn outcome_of(end: Option<&Event>) -> (Value, Option<RunError>) {
    let error = |kind: &str, message: String| {
        Some(RunError {
            kind: kind.to_string(),
            message,
            step: None,
        })
    };
    match end {
        Some(Event::RunCompleted { output }) => (serde_json::from_str(output).unwrap_or(Value::Null), None),
        Some(Event::RunFailed { error: e } | Event::RunCompensated { error: e }) => (Value::Null, Some(run_error(e))),
        Some(Event::RunCancelled { reason }) => (Value::Null, error("cancelled", reason.clone())),
        Some(Event::RunTerminated { reason }) => (Value::Null, error("terminated", reason.clone())),
        Some(Event::RunCompensationFailed { step, error: e }) => (
            Value::Null,
            Some(RunError {
                kind: e.kind.clone(),
                message: format!("compensation of step '{step}' failed: {}", e.message),
                step: Some(step.clone()),
            }),
        ),
        Some(Event::RunContinued { next_run, .. }) => (json!({"continued_as": next_run}), None),
        _ => (Value::Null, None),
    }
}

fn run_error(e: &ErrorInfo) -> RunError {
    RunError {
        kind: e.kind.clone(),
        message: e.message.clone(),
        step: None,
    }
}

fn run_summary(run_id: &str, r: &RunRecord) -> RunReply {
    RunReply {
        run_id: run_id.to_string(),
        workflow: r.workflow.clone(),
        version: r.version,
        status: r.status.into(),
        created_at: rfc3339(r.created_ms),
        finished_at: r.finished_ms.map(rfc3339),
        duration_ms: r.finished_ms.unwrap_or_else(now_ms).saturating_sub(r.created_ms),
        waiting: None,
        output: None,
        error: None,
    }
}

#[derive(Deserialize)]
struct ListQuery {
    status: Option<String>,
    limit: Option<usize>,
}

async fn list_runs(State(rt): AppState, Query(q): Query<ListQuery>) -> ApiResult<Vec<RunReply>> {
    let status = parse_status(q.status.as_deref())?;
    let limit = q.limit.unwrap_or(100).clamp(1, 100_000);
    let rt2 = rt.clone();
    let rows = blocking(move || list_rows(rt2.journal(), status, limit, |id, rec| run_detail(&rt2, id, rec))).await?;
    Ok(Json(rows))
}

/// A `status` filter as the list takes it (a run status, `all`, or none).
pub fn parse_status(name: Option<&str>) -> Result<Option<RunStatus>, ApiError> {
    match name {
        None | Some("") | Some("all") => Ok(None),
        Some(name) => RunStatus::ALL
            .iter()
            .find(|s| s.as_str() == name)
            .copied()
            .map(Some)
            .ok_or_else(|| {
                let names: Vec<&str> = RunStatus::ALL.iter().map(|s| s.as_str()).collect();
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "invalid_request",
                    format!("status '{name}' is not one of {}, all", names.join(", ")),
                )
            }),
    }
}

/// The run list, newest first; running runs also say what they wait for (from `detail`).
pub fn list_rows(
    journal: &crate::journal::Journal,
    status: Option<RunStatus>,
    limit: usize,
    detail: impl Fn(&str, &RunRecord) -> Result<RunDetail, ApiError>,
) -> Result<Vec<RunReply>, ApiError> {
    let rows = journal.runs(status, limit)?;
    Ok(rows
        .into_iter()
        .map(|(id, rec)| {
            let mut v = run_summary(&id, &rec);
            if rec.status == RunStatus::Running
                && let Ok(d) = detail(&id, &rec)
            {
                v.waiting = d.waiting;
                v.status = d.status;
            }
            v
        })
        .collect())
}

async fn show_run(State(rt): AppState, Path(id): Path<String>) -> ApiResult<RunDetail> {
    let rt2 = rt.clone();
    blocking(move || {
        let rec = rt2
            .journal()
            .run(&id)?
            .ok_or_else(|| ApiError::from(RuntimeError::NoSuchRun(id.clone())))?;
        Ok(Json(run_detail(&rt2, &id, &rec)?))
    })
    .await
}

#[derive(Deserialize)]
struct WaitQuery {
    timeout: Option<f64>,
}

async fn wait_run(State(rt): AppState, Path(id): Path<String>, Query(q): Query<WaitQuery>) -> ApiResult<RunReply> {
    let (rec, end) = rt.wait(&id, Some(wait_limit(q.timeout.unwrap_or(0.0)))).await?;
    Ok(Json(run_reply(&id, &rec, end.as_ref(), &rt)?))
}

#[derive(Deserialize)]
struct EventsQuery {
    /// Only events with a larger sequence number.
    #[serde(default)]
    after: u64,
    /// Seconds to wait for a first new event when there is none yet (long poll).
    wait: Option<f64>,
}

/// A run's events after a sequence number, waiting (long poll) for the next one when there is
/// none yet: `start --wait` and `show --follow` follow a run with it.
async fn run_events(
    State(rt): AppState,
    Path(id): Path<String>,
    Query(q): Query<EventsQuery>,
) -> ApiResult<EventsPage> {
    let limit = q.wait.map(wait_limit).unwrap_or(Duration::ZERO);
    let deadline = tokio::time::Instant::now() + limit;
    // Subscribed before the first read, so a commit between the read and the wait wakes it.
    let mut commits = rt.journal().commits();
    loop {
        let (rt2, id2, after) = (rt.clone(), id.clone(), q.after);
        let (rec, rows) = blocking(move || {
            let rec = rt2
                .journal()
                .run(&id2)?
                .ok_or_else(|| ApiError::from(RuntimeError::NoSuchRun(id2.clone())))?;
            let rows: Vec<HistoryRow> = rt2
                .journal()
                .history(&id2)?
                .iter()
                .filter(|(seq, _)| *seq > after)
                .map(|(seq, r)| HistoryRow::of(*seq, r))
                .collect();
            Ok((rec, rows))
        })
        .await?;
        let now = tokio::time::Instant::now();
        if !rows.is_empty() || rec.status.is_terminal() || now >= deadline {
            let last = rows.last().map_or(q.after, |r| r.seq);
            return Ok(Json(EventsPage {
                run_id: id,
                status: rec.status.into(),
                events: rows,
                last_seq: last,
            }));
        }
        if tokio::time::timeout(deadline - now, commits.changed())
            .await
            .is_ok_and(|r| r.is_err())
        {
            // The journal is closing: answer with what there is.
            tokio::time::sleep_until(deadline).await;
        }
    }
}

#[derive(Deserialize, Default)]
struct ReasonBody {
    reason: Option<String>,
    by: Option<String>,
}

/// A JSON body, or the type's default for an empty one.
fn body_or_default<T: Default + serde::de::DeserializeOwned>(body: &str) -> Result<T, ApiError> {
    if body.trim().is_empty() {
        return Ok(T::default());
    }
    serde_json::from_str(body)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid_request", format!("request body: {e}")))
}

async fn summary_of(rt: &Runtime, id: &str, rec: RunRecord) -> ApiResult<RunReply> {
    Ok(Json(run_reply(id, &rec, None, rt)?))
}

/// Asks sync to reconnect (after `outpost enroll` installed a new certificate and key).
/// Writes the journal's pending index rows now (before a backup of the file, or in a benchmark).
async fn checkpoint(State(rt): AppState) -> ApiResult<CheckpointReply> {
    Ok(Json(CheckpointReply {
        indexed_through: rt.journal().checkpoint().await?,
    }))
}

async fn sync_reconnect(State(rt): AppState) -> ApiResult<ReconnectReply> {
    Ok(Json(match rt.sync() {
        Some(s) => {
            s.reconnect.notify_one();
            ReconnectReply {
                reconnecting: true,
                reason: None,
            }
        }
        None => ReconnectReply {
            reconnecting: false,
            reason: Some("sync is not configured (--broker)".into()),
        },
    }))
}

async fn cancel_run(State(rt): AppState, Path(id): Path<String>, body: String) -> ApiResult<RunReply> {
    let b: ReasonBody = body_or_default(&body)?;
    let rec = rt
        .cancel(&id, b.reason.as_deref().unwrap_or("cancelled by operator"))
        .await?;
    summary_of(&rt, &id, rec).await
}

async fn terminate_run(State(rt): AppState, Path(id): Path<String>, body: String) -> ApiResult<RunReply> {
    let b: ReasonBody = body_or_default(&body)?;
    let rec = rt
        .terminate(&id, b.reason.as_deref().unwrap_or("terminated by operator"))
        .await?;
    summary_of(&rt, &id, rec).await
}

async fn retry_run(State(rt): AppState, Path(id): Path<String>, body: String) -> ApiResult<RunReply> {
    let b: ReasonBody = body_or_default(&body)?;
    let rec = rt.retry(&id, b.by.as_deref().unwrap_or("operator")).await?;
    summary_of(&rt, &id, rec).await
}

#[derive(Deserialize, Default)]
struct SignalBody {
    name: String,
    #[serde(default)]
    payload: Value,
    #[serde(default)]
    id: Option<String>,
    /// Refuse (and journal nothing) when no step of the run's workflow waits for this name.
    #[serde(default)]
    strict: bool,
}

async fn signal_run(
    State(rt): AppState,
    peer: Option<axum::Extension<axum::extract::ConnectInfo<Peer>>>,
    Path(id): Path<String>,
    body: String,
) -> ApiResult<SignalReply> {
    let b: SignalBody = body_or_default(&body)?;
    let by = local_name(peer.map(|p| p.0.0));
    let rec = rt
        .journal()
        .run(&id)?
        .ok_or_else(|| RuntimeError::NoSuchRun(id.clone()))?;
    let (names, templated) = rt.definition(&rec.workflow, Some(rec.version))?.signal_names();
    // A signal no step waits for is kept (a later version's step might) but is most often a
    // typo, so the caller hears which names the run can receive.
    let awaited = templated || names.contains(&b.name);
    if !awaited && b.strict {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "unknown_signal",
            format!(
                "no step of run '{id}' ({}@{}) waits for signal '{}'; it can receive: {}",
                rec.workflow,
                rec.version,
                b.name,
                names_or_none(&names)
            ),
        ));
    }
    let accepted = rt.signal_from(&id, &b.name, b.id, b.payload, Some(by)).await?;
    Ok(Json(SignalReply {
        run_id: id,
        signal: b.name,
        accepted,
        duplicate: !accepted,
        awaited,
        receivable: names,
    }))
}

fn names_or_none(names: &[String]) -> String {
    if names.is_empty() {
        "no signals".into()
    } else {
        names.join(", ")
    }
}

/// Who is on the other end of the API socket (its peer credentials).
#[derive(Debug, Clone, Copy)]
pub struct Peer {
    /// The caller's uid, when the kernel says.
    pub uid: Option<u32>,
}

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, tokio::net::UnixListener>> for Peer {
    fn connect_info(stream: axum::serve::IncomingStream<'_, tokio::net::UnixListener>) -> Self {
        Peer {
            uid: stream.io().peer_cred().ok().map(|c| c.uid()),
        }
    }
}

/// `local:<user>`: how a decision made on the gateway itself is recorded.
fn local_name(peer: Option<Peer>) -> String {
    let Some(uid) = peer.and_then(|p| p.uid) else {
        return "local:unknown".into();
    };
    let name = outpost_shared::unix_user_name(uid);
    format!("local:{name}")
}

async fn approve_run(
    State(rt): AppState,
    peer: Option<axum::Extension<axum::extract::ConnectInfo<Peer>>>,
    Path(id): Path<String>,
    body: String,
) -> ApiResult<ApproveReply> {
    let mut d: Decision = body_or_default(&body)?;
    // Whoever holds the socket decides as themselves: a name in the body would let anyone with
    // access pass a gate as anyone.
    d.by = local_name(peer.map(|p| p.0.0));
    let (step, approved) = (d.step.clone(), d.approved);
    let accepted = rt.approve(&id, d).await?;
    Ok(Json(ApproveReply {
        run_id: id,
        step,
        approved,
        accepted,
        duplicate: !accepted,
    }))
}

/// A run as `show` and the API show it: its summary, the fold of its history, what it waits
/// for, and the history itself.
pub fn run_detail(rt: &Runtime, id: &str, rec: &RunRecord) -> Result<RunDetail, ApiError> {
    let def = rt.definition(&rec.workflow, Some(rec.version))?;
    run_view(rt.journal(), &def, id, rec, rt.limits().held(id), rt.storage_block(id))
}

/// `run_detail` from the journal alone, plus what the runtime holds the run back for
/// (admission, a failing journal): none when the journal is read without an agent.
pub fn run_view(
    journal: &crate::journal::Journal,
    def: &outpost_shared::definition::Definition,
    id: &str,
    rec: &RunRecord,
    held: Option<String>,
    block: Option<crate::runtime::StorageBlock>,
) -> Result<RunDetail, ApiError> {
    let history = journal.history(id)?;
    let state = RunState::replay_records(def, id, &history)
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?;
    let summary = run_summary(id, rec);
    let reasons = state.waiting_reasons(def);
    let waiting = (!reasons.is_empty()).then(|| reasons.join("; "));
    let queued = held.as_deref().is_some_and(|h| h.starts_with("queued:"));
    let mut waiting = match (held, waiting) {
        (Some(h), _) if queued => Some(h),
        (Some(h), Some(w)) => Some(format!("{h}; {w}")),
        (h, w) => h.or(w),
    };
    // A run held up by the journal's storage says so first: nothing else moves until it can write.
    let blocked = block.map(|b| {
        waiting = Some(format!(
            "blocked: the journal cannot be written since {} ({}); the run goes on by itself once it can",
            rfc3339(b.since_ms),
            b.error
        ));
        Blocked {
            reason: "journal_storage".into(),
            error: b.error,
            since: rfc3339(b.since_ms),
        }
    });
    Ok(RunDetail {
        run_id: summary.run_id,
        workflow: summary.workflow,
        version: summary.version,
        // Journaled as running, but admission holds it back: it has not begun.
        status: if queued { ShownStatus::Queued } else { summary.status },
        created_at: summary.created_at,
        finished_at: summary.finished_at,
        duration_ms: summary.duration_ms,
        events: history.len(),
        input: state.input.clone(),
        output: state.output.clone().unwrap_or(Value::Null),
        error: state.error.as_ref().map(run_error),
        steps: state.step_rows(def, now_ms()),
        waiting,
        blocked,
        history: history.iter().map(|(seq, r)| HistoryRow::of(*seq, r)).collect(),
    })
}
