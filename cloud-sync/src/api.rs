//! The HTTP JSON API: devices, runs and their histories, commands, deployments, desired state.

use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use outpost_shared::journal::rfc3339;
use outpost_shared::protocol::CommandKind;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::access::{Access, Audited, Caller, Forbidden};
use crate::operators::Role;
use crate::service::{ApproveError, Service};
use crate::store::{Device, RunMirror, StoreError};

/// Builds the router: the API and the console, every route behind `access::guard`.
pub fn router(service: Arc<Service>, access: Arc<Access>) -> Router {
    Router::new()
        .route("/v1/health", get(health))
        .route("/v1/openapi.json", get(openapi))
        .route("/v1/stats", get(stats))
        .route("/metrics", get(metrics))
        .route("/v1/devices", get(devices))
        .route("/v1/devices/{id}", get(device).delete(remove_device))
        .route("/v1/devices/{id}/runs", get(runs))
        .route("/v1/devices/{id}/runs/{run}", get(run))
        .route("/v1/devices/{id}/commands", post(command).get(pending))
        .route("/v1/devices/{id}/commands/{cid}", get(command_status))
        .route("/v1/devices/{id}/desired", axum::routing::put(desired))
        .route("/v1/devices/{id}/state", get(state))
        .route("/v1/deployments", post(deploy).get(deployments))
        .route("/v1/deployments/{id}", get(deployment))
        .route("/v1/deployments/{id}/{order}", post(rollout_order))
        .route("/v1/audit", get(audit))
        .merge(crate::console::router())
        .layer(DefaultBodyLimit::max(2 * 1024 * 1024))
        .layer(axum::middleware::from_fn_with_state(
            access.clone(),
            crate::access::guard,
        ))
        .layer(axum::Extension(access))
        .with_state(service)
}

type S = State<Arc<Service>>;

/// 200 while the store works; 503 from a storage failure until it has been reopened, so a load
/// balancer or systemd watchdog sees a cloud-sync that cannot store anything. It names this
/// replica, its store and whether its broker connection is up (a replica without its broker
/// still serves the API and the console, so that alone does not fail the check).
async fn health(State(s): S) -> (axum::http::StatusCode, Json<Value>) {
    let ok = s.store.healthy();
    let code = if ok {
        axum::http::StatusCode::OK
    } else {
        axum::http::StatusCode::SERVICE_UNAVAILABLE
    };
    let store = if ok { "ok" } else { "failing: storage error, reopening" };
    let broker = if s.broker_connected() {
        "connected"
    } else {
        "disconnected"
    };
    (
        code,
        Json(json!({
            "ok": ok,
            "store": store,
            "store_backend": s.store.location(),
            "broker": broker,
            "replica": s.client_id,
            "version": env!("CARGO_PKG_VERSION"),
        })),
    )
}

/// The API's OpenAPI 3 document (`cloud-sync/openapi.json`; a test checks it against the
/// routes and request types here).
pub const OPENAPI: &str = include_str!("../openapi.json");

async fn openapi() -> impl IntoResponse {
    ([(axum::http::header::CONTENT_TYPE, "application/json")], OPENAPI)
}

/// An API error.
pub struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({"error": {"message": self.1}}))).into_response()
    }
}

/// The HTTP status a store error answers with (the API and the console agree).
pub(crate) fn status_of(e: &StoreError) -> StatusCode {
    match e {
        StoreError::NotFound(_) => StatusCode::NOT_FOUND,
        StoreError::Invalid(_) => StatusCode::BAD_REQUEST,
        StoreError::DeviceLimit(_) => StatusCode::INSUFFICIENT_STORAGE,
        StoreError::Task(_) => StatusCode::INTERNAL_SERVER_ERROR,
        StoreError::Storage(_) | StoreError::Corrupt { .. } | StoreError::Unavailable(_) | StoreError::Conflict(_) => {
            StatusCode::SERVICE_UNAVAILABLE
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        ApiError(status_of(&e), e.to_string())
    }
}

/// A JSON answer with what it did recorded for the audit trail.
fn audited<T: IntoResponse>(kind: &str, device: &str, target: &str, result: Result<T, ApiError>) -> Response {
    let outcome = match &result {
        Ok(_) => Ok(String::new()),
        Err(e) => Err(e.1.clone()),
    };
    Audited {
        kind: kind.to_string(),
        device: device.to_string(),
        target: target.to_string(),
        outcome,
    }
    .on(match result {
        Ok(r) => r.into_response(),
        Err(e) => e.into_response(),
    })
}

type R = Result<Json<Value>, ApiError>;

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, ApiError> {
    Ok(crate::service::blocking(f).await?)
}

fn device_json(id: &str, d: &Device) -> Value {
    json!({
        "id": id,
        "online": d.online(),
        "epoch": d.epoch,
        "last_seen": rfc3339(d.last_seen(crate::service::now_ms())),
        "last_message_at": rfc3339(d.last_seen_ms),
        "stored_seq": d.next_seq.saturating_sub(1),
        "device_seq": d.reported_last_seq,
        "agent_version": d.agent_version,
        "labels": d.labels.iter().map(|(k, v)| (k.clone(), Value::from(v.clone()))).collect::<serde_json::Map<String, Value>>(),
    })
}

fn run_json(id: &str, m: &RunMirror) -> Value {
    json!({
        "run_id": id, "workflow": m.workflow, "version": m.version, "status": m.status,
        "created_at": rfc3339(m.created_ms), "finished_at": m.finished_ms.map(rfc3339), "events": m.events,
    })
}

async fn stats(State(s): S) -> R {
    let counters = s.counters().await?;
    let o = std::sync::atomic::Ordering::Relaxed;
    Ok(Json(json!({
        "messages": s.stats.messages.load(o),
        "events_stored": s.stats.events.load(o),
        "duplicate_events": s.stats.duplicate_events.load(o),
        "resend_requests": s.stats.resends.load(o),
        "rejected": s.stats.rejected.load(o),
        "archived_events": s.stats.archived_events.load(o),
        "lost_events": s.stats.lost_events.load(o),
        "counters": counters.into_iter().map(|(k, v)| (k, Value::from(v))).collect::<serde_json::Map<String, Value>>(),
    })))
}

/// Prometheus metrics: devices by presence, ingest counters, backlog, command queue.
async fn metrics(State(s): S) -> Result<impl IntoResponse, ApiError> {
    use std::fmt::Write as _;
    let store = s.store.clone();
    let (devices, pending) = blocking(move || Ok((store.devices()?, store.pending_total()?))).await?;
    let counters = s.counters().await?;
    let o = std::sync::atomic::Ordering::Relaxed;
    let online = devices.iter().filter(|(_, d)| d.online()).count();
    let backlog: u64 = devices
        .iter()
        .map(|(_, d)| d.reported_last_seq.saturating_sub(d.next_seq.saturating_sub(1)))
        .sum();
    let mut out = String::new();
    let mut m = |name: &str, kind: &str, help: &str, lines: Vec<(String, f64)>| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (labels, v) in lines {
            let _ = writeln!(out, "{name}{labels} {v}");
        }
    };
    m(
        "outpost_cloud_devices",
        "gauge",
        "Known devices by presence.",
        vec![
            ("{state=\"online\"}".into(), online as f64),
            ("{state=\"offline\"}".into(), (devices.len() - online) as f64),
        ],
    );
    m(
        "outpost_cloud_events_ingested_total",
        "counter",
        "Events stored since start.",
        vec![(String::new(), s.stats.events.load(o) as f64)],
    );
    m(
        "outpost_cloud_duplicate_events_total",
        "counter",
        "Events received again since start.",
        vec![(String::new(), s.stats.duplicate_events.load(o) as f64)],
    );
    m(
        "outpost_cloud_archived_events_total",
        "counter",
        "Stored events set aside since start because their device's journal no longer has them.",
        vec![(String::new(), s.stats.archived_events.load(o) as f64)],
    );
    m(
        "outpost_cloud_lost_events_total",
        "counter",
        "Events devices' journals deleted before this store got them, since start.",
        vec![(String::new(), s.stats.lost_events.load(o) as f64)],
    );
    m(
        "outpost_cloud_messages_total",
        "counter",
        "MQTT messages handled since start.",
        vec![(String::new(), s.stats.messages.load(o) as f64)],
    );
    m(
        "outpost_cloud_backlog_events",
        "gauge",
        "Events devices reported at their last birth that are not stored yet.",
        vec![(String::new(), backlog as f64)],
    );
    m(
        "outpost_cloud_pending_commands",
        "gauge",
        "Commands waiting for their device.",
        vec![(String::new(), pending as f64)],
    );
    let rejected: Vec<(String, f64)> = counters
        .iter()
        .filter_map(|(k, v)| {
            k.strip_prefix("rejected.")
                .map(|r| (format!("{{reason=\"{r}\"}}"), *v as f64))
        })
        .collect();
    m(
        "outpost_cloud_rejected_messages_total",
        "counter",
        "Messages rejected, by reason.",
        rejected,
    );
    Ok(([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], out))
}

async fn devices(State(s): S) -> R {
    let store = s.store.clone();
    let list = blocking(move || store.devices()).await?;
    Ok(Json(Value::Array(
        list.iter().map(|(id, d)| device_json(id, d)).collect(),
    )))
}

async fn device(State(s): S, Path(id): Path<String>) -> R {
    let store = s.store.clone();
    let expires = s.certificate_expiry(&id);
    blocking(move || {
        let d = store
            .device(&id)?
            .ok_or_else(|| StoreError::NotFound(format!("device '{id}' is not known")))?;
        let mut v = device_json(&id, &d);
        v["runs"] = store.run_counts(&id)?.runs.into();
        v["pending_commands"] = store.pending(&id)?.len().into();
        let security = store.gateway_security(&id)?;
        v["security"] = json!({
            "warnings": security.warnings,
            "refused": security.refused,
            "certificate_expires": expires.map(rfc3339),
        });
        v["storage"] = match store.gateway_health(&id)? {
            Some(h) => json!({
                "error": h.storage_error, "since": rfc3339(h.since_ms), "blocked_runs": h.blocked_runs,
            }),
            None => Value::Null,
        };
        let lin = store.lineage(&id)?;
        v["journal"] = json!({
            "id": format!("{:016x}", lin.journal_id),
            "lost_events": lin.lost_events,
            "archived_events": lin.archived_events,
            "archives": lin.archives,
            "last_archive": lin.last_archive.map(|a| json!({
                "at": rfc3339(a.at_ms), "from_seq": a.from_seq, "events": a.events, "reason": a.reason,
            })),
        });
        Ok(Json(v))
    })
    .await
}

/// Forgets an offline device and everything stored for it (admin).
async fn remove_device(State(s): S, caller: Caller, Path(id): Path<String>) -> Response {
    if let Err(e) = caller.need(Role::Admin, "remove devices") {
        return e.into_response();
    }
    let r = match s.remove_device(&id).await {
        Ok(Some(events)) => Ok(Json(json!({"removed": id, "events": events}))),
        Ok(None) => Err(ApiError(
            StatusCode::CONFLICT,
            format!("device '{id}' is online: stop its agent (or revoke it) first"),
        )),
        Err(e) => Err(e.into()),
    };
    audited("remove_device", &id, &id, r)
}

async fn runs(State(s): S, Path(id): Path<String>) -> R {
    let store = s.store.clone();
    let list = blocking(move || store.runs(&id)).await?;
    let mut rows: Vec<Value> = list.iter().map(|(r, m)| run_json(r, m)).collect();
    rows.sort_by(|a, b| b["created_at"].as_str().cmp(&a["created_at"].as_str()));
    Ok(Json(Value::Array(rows)))
}

async fn run(State(s): S, Path((id, run)): Path<(String, String)>) -> R {
    let store = s.store.clone();
    blocking(move || {
        let (m, history) = store
            .run(&id, &run)?
            .ok_or_else(|| StoreError::NotFound(format!("device '{id}' has no run '{run}'")))?;
        let mut v = run_json(&run, &m);
        // The same fold as the agent's `show`: both sides say the same of every step.
        let document = store
            .definition(&id, &m.workflow, m.version)?
            .and_then(|text| outpost_shared::definition::parse_document(&text).ok());
        if let Some((def, st)) =
            outpost_shared::run::fold_mirrored(&m.workflow, m.version, document.as_ref(), &run, &history)
        {
            v["steps"] = serde_json::to_value(st.step_rows(&def, crate::service::now_ms())).unwrap_or_default();
            let reasons = st.waiting_reasons(&def);
            v["waiting"] = (!reasons.is_empty()).then(|| reasons.join("; ")).into();
        }
        v["history"] = Value::Array(
            history
                .iter()
                .map(|(seq, r)| outpost_shared::journal::history_row(*seq, r))
                .collect(),
        );
        Ok(Json(v))
    })
    .await
}

/// A command as posted.
#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
enum CommandBody {
    Start {
        workflow: String,
        #[serde(default)]
        version: Option<u32>,
        #[serde(default)]
        input: Option<Value>,
        #[serde(default)]
        run_id: Option<String>,
        #[serde(default)]
        id: Option<String>,
    },
    Cancel {
        run_id: String,
        #[serde(default)]
        reason: Option<String>,
        #[serde(default)]
        id: Option<String>,
    },
    Signal {
        run_id: String,
        name: String,
        #[serde(default)]
        payload: Value,
        #[serde(default)]
        id: Option<String>,
    },
    /// Decided as the caller (a user, or a token's name): there is no `by` to give.
    Approve {
        run_id: String,
        step: String,
        #[serde(default = "yes")]
        approved: bool,
        #[serde(default)]
        comment: String,
    },
}

fn yes() -> bool {
    true
}

fn bad(e: impl std::fmt::Display) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, format!("request body: {e}"))
}

async fn command(State(s): S, caller: Caller, Path(device): Path<String>, body: String) -> Response {
    let b: CommandBody = match serde_json::from_str(&body) {
        Ok(b) => b,
        Err(e) => return audited("command", &device, "", Err::<(), _>(bad(e))),
    };
    if let CommandBody::Approve {
        run_id,
        step,
        approved,
        comment,
    } = b
    {
        if let Err(e) = caller.need(Role::Approver, "decide approvals") {
            return e.into_response();
        }
        let r = s
            .approve(&device, &run_id, &step, approved, comment, &caller.principal)
            .await
            .map_err(|e| match e {
                ApproveError::Store(e) => ApiError::from(e),
                ApproveError::Refused(why) => ApiError(StatusCode::FORBIDDEN, why),
            })
            .map(|id| accepted(&id, &device));
        return audited("approve", &device, &run_id, r);
    }
    let (id, kind, what, target) = match b {
        CommandBody::Start {
            workflow,
            version,
            input,
            run_id,
            id,
        } => (
            id,
            CommandKind::Start {
                workflow,
                version,
                input: input.unwrap_or_else(|| json!({})).to_string(),
                run_id: run_id.clone(),
            },
            "start",
            run_id.unwrap_or_default(),
        ),
        CommandBody::Cancel { run_id, reason, id } => (
            id,
            CommandKind::Cancel {
                run_id: run_id.clone(),
                reason: format!(
                    "{} (by {})",
                    reason.unwrap_or_else(|| "cancelled from the cloud".into()),
                    caller.principal.name
                ),
            },
            "cancel",
            run_id,
        ),
        CommandBody::Signal {
            run_id,
            name,
            payload,
            id,
        } => (
            id,
            CommandKind::Signal {
                run_id: run_id.clone(),
                name,
                payload: payload.to_string(),
                by: caller.principal.name.clone(),
            },
            "signal",
            run_id,
        ),
        CommandBody::Approve { .. } => return StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    };
    if let Err(e) = need_for(&caller, what) {
        return e.into_response();
    }
    let r = s
        .command(&device, id, kind)
        .await
        .map_err(ApiError::from)
        .map(|id| accepted(&id, &device));
    audited(what, &device, &target, r)
}

fn need_for(caller: &Caller, what: &str) -> Result<(), Forbidden> {
    caller.need(Role::Operator, &format!("{what} runs"))
}

fn accepted(id: &str, device: &str) -> (StatusCode, Json<Value>) {
    (
        StatusCode::ACCEPTED,
        Json(json!({"id": id, "device": device, "state": "pending"})),
    )
}

async fn pending(State(s): S, Path(device): Path<String>) -> R {
    let store = s.store.clone();
    let list = blocking(move || store.pending(&device)).await?;
    Ok(Json(Value::Array(
        list.iter()
            .map(|(id, c)| json!({"id": id, "state": c.state, "created_at": rfc3339(c.created_ms)}))
            .collect(),
    )))
}

async fn command_status(State(s): S, Path((device, cid)): Path<(String, String)>) -> R {
    let store = s.store.clone();
    blocking(move || {
        let c = store
            .command(&device, &cid)?
            .ok_or_else(|| StoreError::NotFound(format!("device '{device}' has no command '{cid}'")))?;
        Ok(Json(json!({
            "id": cid, "device": device, "state": c.state, "message": c.message,
            "detail": serde_json::from_str::<Value>(&c.detail).unwrap_or(Value::Null),
            "created_at": rfc3339(c.created_ms), "answered_at": c.answered_ms.map(rfc3339),
        })))
    })
    .await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DesiredBody {
    document: Value,
}

async fn desired(State(s): S, caller: Caller, Path(device): Path<String>, body: String) -> Response {
    if let Err(e) = caller.need(Role::Deployer, "set desired state") {
        return e.into_response();
    }
    let r = async {
        let b: DesiredBody = serde_json::from_str(&body).map_err(bad)?;
        let version = s.set_desired(&device, b.document).await?;
        Ok(Json(json!({"device": device, "version": version})))
    }
    .await;
    audited("desired", &device, "", r)
}

/// One point's verdict as the API shows it.
fn point_json(p: &outpost_shared::protocol::PointCheck) -> Value {
    let doc = |t: &str| serde_json::from_str::<Value>(t).unwrap_or(Value::Null);
    json!({
        "device": p.device, "point": p.point, "desired": doc(&p.desired), "found": doc(&p.found),
        "desired_raw": p.desired_raw, "found_raw": p.found_raw,
        "verdict": p.verdict.name(), "reason": p.verdict.reason(),
    })
}

async fn state(State(s): S, Path(device): Path<String>) -> R {
    let store = s.store.clone();
    blocking(move || {
        let d = store.desired(&device)?;
        let r = store.reported(&device)?;
        let doc = |t: &str| serde_json::from_str::<Value>(t).unwrap_or(Value::Null);
        Ok(Json(json!({
            "device": device,
            "desired": d.as_ref().map(|d| json!({"version": d.version, "document": doc(&d.document), "updated_at": rfc3339(d.updated_ms)})),
            // `in_sync` answers for the current desired version; `verified_in_sync` for the
            // version the report answers (an offline device's report is of an older one).
            "reported": r.map(|r| {
                let current = d.as_ref().map_or(r.desired_version, |d| d.version);
                let verified = if r.verified_ms == 0 { r.updated_ms } else { r.verified_ms };
                let message = if r.desired_version < current {
                    format!("desired v{current} not applied yet; v{} was verified at {} ({})", r.desired_version, rfc3339(verified), r.message)
                } else {
                    r.message.clone()
                };
                json!({
                    "desired_version": r.desired_version, "document": doc(&r.document),
                    "in_sync": r.in_sync_with(current), "verified_in_sync": r.in_sync,
                    "verified_version": r.desired_version, "verified_at": rfc3339(verified),
                    "drift_since": r.drift_since_ms.map(rfc3339),
                    "points": r.points.iter().map(point_json).collect::<Vec<_>>(),
                    "message": message, "updated_at": rfc3339(r.updated_ms),
                })
            }),
        })))
    })
    .await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DeployBody {
    document: String,
    #[serde(default)]
    devices: Vec<String>,
    #[serde(default)]
    labels: std::collections::BTreeMap<String, String>,
    /// Send it wave by wave (`crate::rollout::PlanRequest`); without it, to every device at once.
    #[serde(default)]
    rollout: Option<crate::rollout::PlanRequest>,
}

async fn deploy(State(s): S, caller: Caller, body: String) -> Response {
    if let Err(e) = caller.need(Role::Deployer, "deploy definitions") {
        return e.into_response();
    }
    let mut target = String::new();
    let r = async {
        let b: DeployBody = serde_json::from_str(&body).map_err(bad)?;
        let (id, _) = s
            .deploy(b.document, b.devices, b.labels.into_iter().collect(), b.rollout)
            .await?;
        target = id.clone();
        Ok((StatusCode::CREATED, Json(s.deployment_status(&id).await?)))
    }
    .await;
    audited("deploy", "", &target, r)
}

/// The audit trail as JSON lines, oldest first (filters: `who`, `device`, `kind`).
async fn audit(
    State(s): S,
    caller: Caller,
    axum::extract::Query(q): axum::extract::Query<crate::console::AuditQuery>,
) -> Result<Response, ApiError> {
    if let Err(e) = caller.need(Role::Admin, "read the audit trail") {
        return Ok(e.into_response());
    }
    let store = s.store.clone();
    let filter = q.filter();
    let rows = blocking(move || store.audit(&filter, usize::MAX)).await?;
    let mut out = String::new();
    for (n, a) in rows.iter().rev() {
        out.push_str(
            &json!({
                "n": n, "at": rfc3339(a.at_ms), "who": a.who, "from": a.from, "kind": a.kind,
                "device": a.device, "target": a.target, "result": a.result, "message": a.message,
            })
            .to_string(),
        );
        out.push('\n');
    }
    Ok(([(axum::http::header::CONTENT_TYPE, "application/x-ndjson")], out).into_response())
}

#[derive(Deserialize)]
struct ListQuery {
    limit: Option<usize>,
}

/// Deployments, newest first (`limit`, default 100).
async fn deployments(State(s): S, axum::extract::Query(q): axum::extract::Query<ListQuery>) -> R {
    Ok(Json(s.deployments_status(q.limit.unwrap_or(100)).await?))
}

/// `pause`, `resume`, `promote` or `abort` a staged rollout; answers the deployment.
async fn rollout_order(State(s): S, caller: Caller, Path((id, order)): Path<(String, String)>) -> Response {
    let kind = format!("rollout.{order}");
    if let Err(e) = caller.need(Role::Deployer, "steer rollouts") {
        return e.into_response();
    }
    let r = async {
        let o = crate::rollout::Order::parse(&order).ok_or_else(|| {
            ApiError(
                StatusCode::NOT_FOUND,
                format!("'{order}' is not a rollout order: pause, resume, promote or abort"),
            )
        })?;
        s.rollout_order(&id, o, &caller.principal.name).await?;
        Ok(Json(s.deployment_status(&id).await?))
    }
    .await;
    audited(&kind, "", &id, r)
}

async fn deployment(State(s): S, Path(id): Path<String>) -> R {
    Ok(Json(s.deployment_status(&id).await?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    fn document() -> Value {
        serde_json::from_str(OPENAPI).expect("openapi.json is JSON")
    }

    /// Every `.route(PATH, METHOD(..).METHOD(..))` of the router above, as (method, path).
    fn routes_in_source() -> BTreeSet<(String, String)> {
        let src = include_str!("api.rs");
        let router = &src[..src.find("type S =").expect("router comes first")];
        let mut out = BTreeSet::new();
        for line in router.lines().map(str::trim).filter(|l| l.starts_with(".route(\"")) {
            let rest = &line[".route(\"".len()..];
            let (path, handlers) = rest.split_once('"').expect("quoted path");
            for m in ["get", "post", "put", "delete"] {
                let call = format!("{m}(");
                let found = handlers
                    .match_indices(&call)
                    .any(|(i, _)| i == 0 || matches!(handlers.as_bytes()[i - 1], b' ' | b'.' | b',' | b':'));
                if found {
                    out.insert((m.to_string(), path.to_string()));
                }
            }
        }
        out
    }

    #[test]
    fn the_openapi_document_has_exactly_the_routes_of_the_router() {
        let doc = document();
        let mut documented = BTreeSet::new();
        for (path, ops) in doc["paths"].as_object().expect("paths") {
            for method in ops.as_object().expect("operations").keys() {
                documented.insert((method.clone(), path.clone()));
            }
        }
        let routed = routes_in_source();
        assert!(routed.len() > 15, "the route scan found too few: {routed:?}");
        let undocumented: Vec<_> = routed.difference(&documented).collect();
        let stale: Vec<_> = documented.difference(&routed).collect();
        assert!(
            undocumented.is_empty(),
            "routes missing from openapi.json: {undocumented:?}"
        );
        assert!(
            stale.is_empty(),
            "openapi.json documents routes that do not exist: {stale:?}"
        );
    }

    #[test]
    fn the_openapi_examples_are_what_the_api_accepts() {
        let doc = document();
        let commands = &doc["paths"]["/v1/devices/{id}/commands"]["post"]["requestBody"]["content"]["application/json"];
        let examples = commands["examples"].as_object().expect("command examples");
        let mut kinds = std::collections::HashSet::new();
        for (name, ex) in examples {
            let body: CommandBody = serde_json::from_value(ex["value"].clone())
                .unwrap_or_else(|e| panic!("example {name} is refused: {e}"));
            kinds.insert(std::mem::discriminant(&body));
        }
        assert_eq!(kinds.len(), 4, "one example per command type");
        // Each command schema lists exactly the fields the API takes: an example with every
        // documented field parses, and an undocumented one is refused.
        for variant in doc["components"]["schemas"]["Command"]["oneOf"]
            .as_array()
            .expect("oneOf")
        {
            let props = variant["properties"].as_object().expect("properties");
            let mut full = serde_json::Map::new();
            for (k, schema) in props {
                let v = match (k.as_str(), schema["type"].as_str()) {
                    ("type", _) => schema["enum"][0].clone(),
                    (_, Some("integer")) => json!(1),
                    (_, Some("boolean")) => json!(true),
                    (_, Some("object")) | (_, None) => json!({}),
                    _ => json!("x"),
                };
                full.insert(k.clone(), v);
            }
            let body = Value::Object(full.clone());
            assert!(
                serde_json::from_value::<CommandBody>(body.clone()).is_ok(),
                "the documented fields are refused: {body}"
            );
            full.insert("by".into(), json!("someone"));
            assert!(
                serde_json::from_value::<CommandBody>(Value::Object(full)).is_err(),
                "an undocumented field is accepted"
            );
        }
        let deploy = &doc["paths"]["/v1/deployments"]["post"]["requestBody"]["content"]["application/json"]["example"];
        assert!(serde_json::from_value::<DeployBody>(deploy.clone()).is_ok(), "{deploy}");
        let desired =
            &doc["paths"]["/v1/devices/{id}/desired"]["put"]["requestBody"]["content"]["application/json"]["example"];
        assert!(
            serde_json::from_value::<DesiredBody>(desired.clone()).is_ok(),
            "{desired}"
        );
    }
}
