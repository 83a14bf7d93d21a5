//! The web console: server-rendered pages over the store (fleet, device, run, deployments),
//! forms that queue commands, and a server-sent event stream that tells open pages to refresh
//! their live parts. No external assets: the CSS and the little JavaScript are compiled in.

mod account;
pub mod graph;
mod pages;

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Form, Router};
use maud::Markup;
use outpost_shared::protocol::CommandKind;
use serde::Deserialize;

use crate::access::{Audited, Caller};
use crate::operators::Role;
use crate::service::{Service, now_ms};
use crate::store::StoreError;

pub use account::AuditQuery;
pub use pages::error_page;

type S = State<Arc<Service>>;

/// The console's routes (merged into the API router).
pub fn router() -> Router<Arc<Service>> {
    Router::new()
        .route("/", get(fleet))
        .route("/devices/{id}", get(device))
        .route("/devices/{id}/start", post(start))
        .route("/devices/{id}/desired", post(desired))
        .route("/devices/{id}/runs/{run}", get(run))
        .route("/devices/{id}/runs/{run}/cancel", post(cancel))
        .route("/devices/{id}/runs/{run}/signal", post(signal))
        .route("/devices/{id}/runs/{run}/approve", post(approve))
        .route("/deployments", get(deployments).post(deploy))
        .route("/deployments/{id}", get(deployment))
        .route("/deployments/{id}/{order}", post(rollout_order))
        .route("/audit", get(account::audit))
        .route("/login", get(account::login_page).post(account::login))
        .route("/logout", post(account::logout))
        .route(
            "/account/password",
            get(account::password_page).post(account::change_password),
        )
        .route("/console/live", get(live))
        .route("/console/app.css", get(css))
        .route("/console/app.js", get(js))
}

/// Messages shown once after a redirect (`?queued=ID` or `?error=TEXT`).
#[derive(Deserialize, Default)]
struct Flash {
    queued: Option<String>,
    note: Option<String>,
    error: Option<String>,
}

impl Flash {
    fn view(&self) -> pages::Flash {
        pages::Flash {
            queued: self.queued.clone(),
            note: self.note.clone(),
            error: self.error.clone(),
        }
    }
}

/// A page that could not be built.
struct PageError(StatusCode, String);

impl IntoResponse for PageError {
    fn into_response(self) -> Response {
        (self.0, pages::error_page(self.0, &self.1)).into_response()
    }
}

impl From<StoreError> for PageError {
    fn from(e: StoreError) -> Self {
        PageError(crate::api::status_of(&e), e.to_string())
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, PageError> {
    Ok(crate::service::blocking(f).await?)
}

/// The fleet page's query: a search and a page number.
#[derive(Debug, Default, Deserialize)]
struct FleetQuery {
    /// Words that must all match: `key=value` a label, anything else part of the id or of a
    /// label's value (case-insensitive).
    #[serde(default)]
    q: String,
    /// From 1.
    #[serde(default)]
    page: Option<usize>,
}

async fn fleet(State(s): S, caller: Caller, Query(fq): Query<FleetQuery>) -> Result<Markup, PageError> {
    let store = s.store.clone();
    let svc = s.clone();
    let q = fq.q.clone();
    let (rows, summary, paging) = blocking(move || {
        // The counts and the device rows for the whole fleet: two scans, no run is read. Only
        // the page's devices have their state documents and certificates looked at.
        let counts = store.all_run_counts()?;
        let matching: Vec<_> = store
            .devices()?
            .into_iter()
            .filter(|(id, d)| pages::fleet_matches(&q, id, d))
            .collect();
        let mut summary = pages::FleetSummary {
            devices: matching.len(),
            ..Default::default()
        };
        for (id, d) in &matching {
            let c = counts.get(id).copied().unwrap_or_default();
            summary.online += usize::from(d.online());
            summary.active += c.active;
            summary.failed += c.failed;
            summary.backlog += pages::backlog(d);
        }
        let pages_n = matching.len().div_ceil(pages::FLEET_PAGE).max(1);
        let page = fq.page.unwrap_or(1).clamp(1, pages_n);
        let mut rows = Vec::new();
        for (id, d) in matching
            .into_iter()
            .skip((page - 1) * pages::FLEET_PAGE)
            .take(pages::FLEET_PAGE)
        {
            let c = counts.get(&id).copied().unwrap_or_default();
            let drift = pages::drift(store.desired(&id)?.as_ref(), store.reported(&id)?.as_ref());
            rows.push(pages::FleetRow {
                active: c.active,
                failed: c.failed,
                total: c.runs,
                drift,
                warnings: store.gateway_security(&id)?.warnings,
                cert_expires_ms: svc.certificate_expiry(&id),
                id,
                device: d,
            });
        }
        let paging = pages::Paging {
            q: q.clone(),
            page,
            pages: pages_n,
        };
        Ok((rows, summary, paging))
    })
    .await?;
    Ok(pages::fleet(
        &rows,
        &summary,
        &paging,
        &pages::Viewer::of(&caller),
        now_ms(),
    ))
}

async fn device(
    State(s): S,
    caller: Caller,
    Path(id): Path<String>,
    Query(flash): Query<Flash>,
) -> Result<Markup, PageError> {
    let store = s.store.clone();
    let expires = s.certificate_expiry(&id);
    let view = blocking(move || {
        let device = store
            .device(&id)?
            .ok_or_else(|| StoreError::NotFound(format!("device '{id}' is not known")))?;
        let mut runs = store.runs(&id)?;
        runs.sort_by_key(|r| std::cmp::Reverse(r.1.created_ms));
        let total_runs = runs.len();
        runs.truncate(pages::RUNS_SHOWN);
        Ok(pages::DeviceView {
            runs,
            total_runs,
            equipment: store.equipment(&id)?,
            desired: store.desired(&id)?,
            reported: store.reported(&id)?,
            commands: store.commands(&id, 100)?,
            workflows: store.workflows(&id)?,
            health: store.gateway_health(&id)?,
            security: store.gateway_security(&id)?,
            cert_expires_ms: expires,
            device,
            id,
        })
    })
    .await?;
    Ok(pages::device(
        &view,
        &pages::Viewer::of(&caller),
        &flash.view(),
        now_ms(),
    ))
}

async fn run(
    State(s): S,
    caller: Caller,
    Path((id, run)): Path<(String, String)>,
    Query(flash): Query<Flash>,
) -> Result<Markup, PageError> {
    let store = s.store.clone();
    let view = blocking(move || {
        let (mirror, history) = store
            .run(&id, &run)?
            .ok_or_else(|| StoreError::NotFound(format!("device '{id}' has no run '{run}'")))?;
        let document = store
            .definition(&id, &mirror.workflow, mirror.version)?
            .and_then(|text| outpost_shared::definition::parse_document(&text).ok());
        let commands = store
            .commands(&id, 200)?
            .into_iter()
            .filter(|(_, c)| pages::command_run(&c.kind) == Some(run.as_str()))
            .collect();
        let online = store.device(&id)?.is_some_and(|d| d.online());
        let health = store.gateway_health(&id)?;
        Ok(pages::RunView {
            health,
            device: id,
            online,
            run_id: run,
            mirror,
            history,
            document,
            commands,
        })
    })
    .await?;
    Ok(pages::run(&view, &pages::Viewer::of(&caller), &flash.view(), now_ms()))
}

/// The newest deployments with their per-device states, and every device (for the form).
type DeploymentsView = (Vec<pages::DeploymentRow>, Vec<(String, crate::store::Device)>);

fn deployments_view(store: &crate::store::Store) -> Result<DeploymentsView, StoreError> {
    let mut list = Vec::new();
    for (id, d) in store.deployments()?.into_iter().take(50) {
        let states = deployment_states(store, &id, &d.devices)?;
        let rollout = store.rollout(&id)?.map(|r| (r.phase.as_str(), r.reason));
        list.push((id, d, states, rollout));
    }
    Ok((list, store.devices()?))
}

async fn deployments(State(s): S, caller: Caller, Query(flash): Query<Flash>) -> Result<Markup, PageError> {
    let store = s.store.clone();
    let (list, devices) = blocking(move || deployments_view(&store)).await?;
    Ok(pages::deployments(
        &list,
        &devices,
        &pages::Viewer::of(&caller),
        &flash.view(),
        "",
        now_ms(),
    ))
}

fn deployment_states(
    store: &crate::store::Store,
    id: &str,
    devices: &[String],
) -> Result<pages::DeviceStates, StoreError> {
    let mut out = Vec::new();
    for d in devices {
        let c = store.command(d, &format!("{id}.{d}"))?;
        out.push((
            d.clone(),
            c.as_ref().map(|c| c.state.clone()).unwrap_or_else(|| "unknown".into()),
            c.map(|c| c.message).unwrap_or_default(),
        ));
    }
    Ok(out)
}

async fn deployment(
    State(s): S,
    caller: Caller,
    Path(id): Path<String>,
    Query(flash): Query<Flash>,
) -> Result<Markup, PageError> {
    let store = s.store.clone();
    let (view, document) = blocking(move || {
        let d = store
            .deployment(&id)?
            .ok_or_else(|| StoreError::NotFound(format!("deployment '{id}' does not exist")))?;
        let view = crate::service::deployment_view(&store, &id, &d, crate::service::Detail::Full)?;
        let text = match store.rollout(&id)? {
            Some(r) => Some(r.document),
            None => store.deployment_document(&id, &d)?,
        };
        let document = text.and_then(|t| outpost_shared::definition::parse_document(&t).ok());
        Ok((view, document))
    })
    .await?;
    Ok(pages::deployment(
        &view,
        document.as_ref(),
        &pages::Viewer::of(&caller),
        &flash.view(),
        now_ms(),
    ))
}

/// Pause, resume, promote or abort a staged rollout from its page.
async fn rollout_order(
    State(s): S,
    caller: Caller,
    Path((id, order)): Path<(String, String)>,
    Form(_f): Fields,
) -> Response {
    let path = format!("/deployments/{}", pages::enc(&id));
    let kind = format!("rollout.{order}");
    if let Err(e) = caller.need(Role::Deployer, "steer rollouts") {
        return e.into_page();
    }
    let Some(o) = crate::rollout::Order::parse(&order) else {
        return refused(&path, &kind, "", &id, &format!("'{order}' is not a rollout order"));
    };
    match s.rollout_order(&id, o, &caller.principal.name).await {
        Ok(r) => audited(
            &kind,
            "",
            &id,
            Ok(String::new()),
            back(&path, "note", &format!("{}: {}", o.as_str(), r.reason)),
        ),
        Err(e) => refused(&path, &kind, "", &id, &e.to_string()),
    }
}

/// Form fields as pairs: repeated keys (device checkboxes) stay.
type Fields = Form<Vec<(String, String)>>;

/// The deployment form's rollout fields, when "wave by wave" is ticked.
fn plan_from_form(f: &[(String, String)]) -> Result<Option<crate::rollout::PlanRequest>, String> {
    use crate::rollout::plan::{Amount, Canary, GateRequest, OfflinePolicy, OnFailure};
    use outpost_shared::definition::DurationText;
    if field(f, "staged").is_empty() {
        return Ok(None);
    }
    let text = |name: &str| Some(field(f, name)).filter(|v| !v.is_empty()).map(str::to_string);
    let number = |name: &str| -> Result<Option<u32>, String> {
        text(name)
            .map(|v| {
                v.parse::<u32>()
                    .map_err(|_| format!("{}: '{v}' is not a whole number", name.replace('_', " ")))
            })
            .transpose()
    };
    let canary = text("canary").map(|v| match Amount::parse(&v) {
        Ok(a) => Canary::Amount(a),
        Err(_) => Canary::Devices(
            v.split(',')
                .map(|d| d.trim().to_string())
                .filter(|d| !d.is_empty())
                .collect(),
        ),
    });
    Ok(Some(crate::rollout::PlanRequest {
        canary,
        wave: text("wave")
            .map(|v| Amount::parse(&v))
            .transpose()
            .map_err(|e| format!("wave size: {e}"))?,
        wave_by_label: text("wave_by_label"),
        pace: text("pace").map(DurationText),
        bake: text("bake").map(DurationText),
        gate: GateRequest {
            min_completed_percent: number("min_completed_percent")?,
            max_failed_runs: number("max_failed_runs")?,
            min_runs: number("min_runs")?,
            workflow: text("gate_workflow"),
        },
        on_failure: if field(f, "on_failure") == "rollback" {
            OnFailure::Rollback
        } else {
            OnFailure::Halt
        },
        device_deadline: text("device_deadline").map(DurationText),
        offline: if field(f, "offline") == "skip" {
            OfflinePolicy::Skip
        } else {
            OfflinePolicy::Wait
        },
    }))
}

fn field<'a>(f: &'a [(String, String)], name: &str) -> &'a str {
    f.iter().find(|(k, _)| k == name).map(|(_, v)| v.trim()).unwrap_or("")
}

fn back(path: &str, key: &str, value: &str) -> Redirect {
    let q = serde_urlencoded::to_string([(key, value)]).unwrap_or_default();
    Redirect::to(&format!("{path}?{q}"))
}

/// A form's answer: back to `path` with `error`, recorded in the audit trail as refused.
fn refused(path: &str, kind: &str, device: &str, target: &str, error: &str) -> Response {
    audited(kind, device, target, Err(error.to_string()), back(path, "error", error))
}

fn audited(kind: &str, device: &str, target: &str, outcome: Result<String, String>, r: impl IntoResponse) -> Response {
    Audited {
        kind: kind.to_string(),
        device: device.to_string(),
        target: target.to_string(),
        outcome,
    }
    .on(r.into_response())
}

/// What a command is, for the audit trail: (kind, target, detail).
fn command_audit(kind: &CommandKind) -> (&'static str, String, String) {
    match kind {
        CommandKind::Start {
            workflow,
            version,
            run_id,
            ..
        } => (
            "start",
            run_id.clone().unwrap_or_default(),
            format!("{workflow}{}", version.map(|v| format!(" v{v}")).unwrap_or_default()),
        ),
        CommandKind::Cancel { run_id, reason } => ("cancel", run_id.clone(), reason.clone()),
        CommandKind::Signal { run_id, name, .. } => ("signal", run_id.clone(), format!("signal {name}")),
        CommandKind::Approve {
            run_id, step, approved, ..
        } => (
            "approve",
            run_id.clone(),
            format!("{} step {step}", if *approved { "approved" } else { "rejected" }),
        ),
        CommandKind::Deploy { deployment, .. } => ("deploy", deployment.clone(), String::new()),
    }
}

/// Queues a command, then sends the browser back to `path` saying what happened.
async fn queue(s: &Service, device: &str, kind: CommandKind, id: Option<String>, path: &str) -> Response {
    let (what, target, detail) = command_audit(&kind);
    match s.command(device, id, kind).await {
        Ok(cid) => audited(
            what,
            device,
            &target,
            Ok(format!("{detail} (command {cid})")),
            back(path, "queued", &cid),
        ),
        Err(e) => refused(path, what, device, &target, &e.to_string()),
    }
}

fn json_field(f: &[(String, String)], name: &str, default: &str) -> Result<String, String> {
    let text = match field(f, name) {
        "" => default,
        t => t,
    };
    serde_json::from_str::<serde_json::Value>(text)
        .map(|v| v.to_string())
        .map_err(|e| format!("{name} is not JSON: {e}"))
}

async fn start(State(s): S, caller: Caller, Path(id): Path<String>, Form(f): Fields) -> Response {
    let path = format!("/devices/{}", pages::enc(&id));
    if let Err(e) = caller.need(Role::Operator, "start runs") {
        return e.into_page();
    }
    let workflow = field(&f, "workflow").to_string();
    if workflow.is_empty() {
        return refused(&path, "start", &id, "", "choose a workflow to start");
    }
    let input = match json_field(&f, "input", "{}") {
        Ok(i) => i,
        Err(e) => return refused(&path, "start", &id, "", &e),
    };
    let version = match field(&f, "version") {
        "" => None,
        v => match v.parse() {
            Ok(v) => Some(v),
            Err(_) => return refused(&path, "start", &id, "", &format!("version '{v}' is not a number")),
        },
    };
    let run_id = Some(field(&f, "run_id")).filter(|r| !r.is_empty()).map(str::to_string);
    let kind = CommandKind::Start {
        workflow,
        version,
        input,
        run_id,
    };
    queue(&s, &id, kind, None, &path).await
}

async fn desired(State(s): S, caller: Caller, Path(id): Path<String>, Form(f): Fields) -> Response {
    let path = format!("/devices/{}", pages::enc(&id));
    if let Err(e) = caller.need(Role::Deployer, "set desired state") {
        return e.into_page();
    }
    let doc = match serde_json::from_str::<serde_json::Value>(field(&f, "document")) {
        Ok(d) => d,
        Err(e) => return refused(&path, "desired", &id, "", &format!("desired state is not JSON: {e}")),
    };
    match s.set_desired(&id, doc).await {
        Ok(v) => audited(
            "desired",
            &id,
            &format!("v{v}"),
            Ok(String::new()),
            back(
                &path,
                "note",
                &format!("Desired state v{v} set: the device applies it and reports in sync once it has verified it."),
            ),
        ),
        Err(e) => refused(&path, "desired", &id, "", &e.to_string()),
    }
}

fn run_path(id: &str, run: &str) -> String {
    format!("/devices/{}/runs/{}", pages::enc(id), pages::enc(run))
}

async fn cancel(State(s): S, caller: Caller, Path((id, run)): Path<(String, String)>, Form(f): Fields) -> Response {
    if let Err(e) = caller.need(Role::Operator, "cancel runs") {
        return e.into_page();
    }
    let reason = match field(&f, "reason") {
        "" => format!("cancelled from the console by {}", caller.principal.name),
        r => format!("{r} (cancelled by {})", caller.principal.name),
    };
    let kind = CommandKind::Cancel {
        run_id: run.clone(),
        reason,
    };
    queue(&s, &id, kind, None, &run_path(&id, &run)).await
}

async fn signal(State(s): S, caller: Caller, Path((id, run)): Path<(String, String)>, Form(f): Fields) -> Response {
    let path = run_path(&id, &run);
    if let Err(e) = caller.need(Role::Operator, "signal runs") {
        return e.into_page();
    }
    let name = field(&f, "name").to_string();
    if name.is_empty() {
        return refused(&path, "signal", &id, &run, "a signal needs a name");
    }
    let payload = match json_field(&f, "payload", "null") {
        Ok(p) => p,
        Err(e) => return refused(&path, "signal", &id, &run, &e),
    };
    let kind = CommandKind::Signal {
        run_id: run.clone(),
        name,
        payload,
        by: caller.principal.name.clone(),
    };
    queue(&s, &id, kind, None, &path).await
}

async fn approve(State(s): S, caller: Caller, Path((id, run)): Path<(String, String)>, Form(f): Fields) -> Response {
    let path = run_path(&id, &run);
    if let Err(e) = caller.need(Role::Approver, "decide approvals") {
        return e.into_page();
    }
    let step = field(&f, "step").to_string();
    if step.is_empty() {
        return refused(&path, "approve", &id, &run, "an approval names its step");
    }
    let approved = match field(&f, "decision") {
        "approve" => true,
        "reject" => false,
        other => {
            return refused(
                &path,
                "approve",
                &id,
                &run,
                &format!("decision '{other}' is neither approve nor reject"),
            );
        }
    };
    let verb = if approved { "approved" } else { "rejected" };
    match s
        .approve(
            &id,
            &run,
            &step,
            approved,
            field(&f, "comment").to_string(),
            &caller.principal,
        )
        .await
    {
        Ok(cid) => audited(
            "approve",
            &id,
            &run,
            Ok(format!("{verb} step {step} (command {cid})")),
            back(&path, "queued", &cid),
        ),
        Err(e) => refused(&path, "approve", &id, &run, &format!("step {step}: {e}")),
    }
}

async fn deploy(State(s): S, caller: Caller, Form(f): Fields) -> Response {
    if let Err(e) = caller.need(Role::Deployer, "deploy definitions") {
        return e.into_page();
    }
    let document = field(&f, "document").to_string();
    let devices: Vec<String> = f
        .iter()
        .filter(|(k, v)| k == "device" && !v.is_empty())
        .map(|(_, v)| v.clone())
        .collect();
    let mut labels = Vec::new();
    for part in field(&f, "labels").split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match part.split_once('=') {
            Some((k, v)) if !k.trim().is_empty() => labels.push((k.trim().to_string(), v.trim().to_string())),
            _ => {
                return refused(
                    "/deployments",
                    "deploy",
                    "",
                    "",
                    &format!("label '{part}' is not KEY=VALUE"),
                );
            }
        }
    }
    let plan = match plan_from_form(&f) {
        Ok(p) => p,
        Err(e) => return refused("/deployments", "deploy", "", "", &e),
    };
    let outcome = if document.is_empty() {
        Err("paste a definition or choose a file".to_string())
    } else if devices.is_empty() && labels.is_empty() {
        Err("pick devices or give labels to deploy to".to_string())
    } else {
        s.deploy(document.clone(), devices, labels, plan)
            .await
            .map_err(|e| e.to_string())
    };
    match outcome {
        Ok((id, _)) => audited(
            "deploy",
            "",
            &id,
            Ok(String::new()),
            Redirect::to(&format!("/deployments/{}", pages::enc(&id))),
        ),
        Err(e) => {
            // Shown again with the document kept, so a typo costs no re-paste.
            let store = s.store.clone();
            let listed = crate::service::blocking(move || deployments_view(&store)).await;
            let (list, devices) = listed.unwrap_or_default();
            let flash = pages::Flash {
                error: Some(e),
                ..Default::default()
            };
            let page = pages::deployments(
                &list,
                &devices,
                &pages::Viewer::of(&caller),
                &flash,
                &document,
                now_ms(),
            );
            let why = flash.error.clone().unwrap_or_default();
            audited("deploy", "", "", Err(why), (StatusCode::BAD_REQUEST, page))
        }
    }
}

/// Server-sent events: one `change` after store changes (at most four a second), so open pages
/// refetch themselves; a comment every 15 s keeps proxies from closing the stream.
async fn live(State(s): S) -> Sse<impl futures_util::Stream<Item = Result<SseEvent, Infallible>>> {
    let rx = s.subscribe();
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.changed().await.ok()?;
        tokio::time::sleep(Duration::from_millis(250)).await;
        rx.borrow_and_update();
        Some((Ok(SseEvent::default().event("change").data("1")), rx))
    });
    Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
}

fn asset(kind: &'static str, body: &'static str) -> Response {
    let mut r = body.into_response();
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(kind));
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    r
}

async fn css() -> Response {
    asset("text/css; charset=utf-8", include_str!("app.css"))
}

async fn js() -> Response {
    asset("text/javascript; charset=utf-8", include_str!("app.js"))
}
