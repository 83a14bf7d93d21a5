//! The console's markup. Every function here is pure: store rows in, HTML out (maud escapes
//! every value). Elements marked `data-live` are replaced in place when the page refreshes.

use std::collections::HashMap;

use axum::http::StatusCode;
use maud::{DOCTYPE, Markup, html};
use outpost_shared::definition::Document;
use outpost_shared::journal::{Event, Record, rfc3339};
use outpost_shared::protocol::CommandKind;
use outpost_shared::run::{RunStatus, SignalName, fold_mirrored};

use super::graph;
use crate::service::{DeploymentView, RolloutView};
use crate::store::{
    AuditFilter, AuditRow, CommandRecord, Deployment, DesiredRow, Device, GatewayHealth, ReportedRow, RunMirror,
};

/// A one-off message after a form was sent.
#[derive(Default)]
pub struct Flash {
    /// The id of the command just queued.
    pub queued: Option<String>,
    /// Something done that is not a command.
    pub note: Option<String>,
    /// Why the form was refused.
    pub error: Option<String>,
}

/// Percent-encodes a path segment.
pub fn enc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~' | b':') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// True while a run can still change.
pub fn is_active(status: RunStatus) -> bool {
    !status.is_terminal()
}

/// How far a device's reported state is from its desired state.
pub enum Drift {
    /// No desired state set.
    Unmanaged,
    /// Desired set, nothing reported for it yet.
    Pending(u64),
    /// Reported equals desired exactly.
    InSync(u64),
    /// Reported for the current version, not in sync: why, and since when a verified state
    /// has drifted (`None`: it never was in sync).
    Drifted(String, Option<u64>),
}

/// Compares a device's desired and reported rows.
pub fn drift(desired: Option<&DesiredRow>, reported: Option<&ReportedRow>) -> Drift {
    match (desired, reported) {
        (None, _) => Drift::Unmanaged,
        (Some(d), Some(r)) if r.desired_version == d.version && r.in_sync => Drift::InSync(d.version),
        (Some(d), Some(r)) if r.desired_version == d.version => Drift::Drifted(r.message.clone(), r.drift_since_ms),
        (Some(d), _) => Drift::Pending(d.version),
    }
}

fn drift_cell(d: &Drift) -> Markup {
    match d {
        Drift::Unmanaged => html! { span.muted data-drift="none" { "—" } },
        Drift::Pending(v) => {
            html! { span.badge.pending data-drift="pending" title={"desired v" (v) " not reported yet"} { "pending v" (v) } }
        }
        Drift::InSync(v) => html! { span.badge.completed data-drift="in_sync" { "in sync v" (v) } },
        Drift::Drifted(m, None) => html! { span.badge.failed data-drift="drift" title=(m) { "not in sync" } },
        Drift::Drifted(m, Some(since)) => html! {
            span.badge.failed data-drift="drift" data-drift-since=(rfc3339(*since)) title=(m) { "drift since " (at(*since)) }
        },
    }
}

/// The run a command is about, if any.
pub fn command_run(k: &CommandKind) -> Option<&str> {
    match k {
        CommandKind::Start { run_id, .. } => run_id.as_deref(),
        CommandKind::Cancel { run_id, .. }
        | CommandKind::Signal { run_id, .. }
        | CommandKind::Approve { run_id, .. } => Some(run_id),
        CommandKind::Deploy { .. } => None,
    }
}

fn command_text(k: &CommandKind) -> String {
    match k {
        CommandKind::Start { workflow, version, .. } => match version {
            Some(v) => format!("start {workflow} v{v}"),
            None => format!("start {workflow}"),
        },
        CommandKind::Cancel { run_id, .. } => format!("cancel {run_id}"),
        CommandKind::Signal { run_id, name, .. } => format!("signal {name} to {run_id}"),
        CommandKind::Approve {
            step,
            approved,
            by,
            comment,
            ..
        } => {
            let verb = if *approved { "approve" } else { "reject" };
            let why = if comment.is_empty() {
                String::new()
            } else {
                format!(": {comment}")
            };
            format!("{verb} {step} (by {by}{why})")
        }
        CommandKind::Deploy { deployment, .. } => format!("deployment {deployment}"),
    }
}

/// "3 s ago", "5 min ago" … for a past time; the exact time goes in a tooltip.
fn ago(ms: u64, now: u64) -> Markup {
    let s = now.saturating_sub(ms) / 1000;
    let text = match s {
        0..=4 => "just now".to_string(),
        5..=59 => format!("{s} s ago"),
        60..=3599 => format!("{} min ago", s / 60),
        3600..=86_399 => format!("{} h ago", s / 3600),
        _ => format!("{} d ago", s / 86_400),
    };
    html! { time datetime=(rfc3339(ms)) title=(rfc3339(ms)) { (text) } }
}

/// A point in time, written in UTC; the page's script shows it in the browser's time zone
/// unless the operator chose UTC (the header's clock button).
fn at(ms: u64) -> Markup {
    html! { time.at datetime=(rfc3339(ms)) title=(rfc3339(ms)) { (rfc3339(ms)) } }
}

/// A duration in the largest sensible units.
pub fn duration(ms: u64) -> String {
    match ms {
        0..=999 => format!("{ms} ms"),
        1000..=59_999 => format!("{:.1} s", ms as f64 / 1000.0),
        60_000..=3_599_999 => format!("{} min {:02} s", ms / 60_000, (ms / 1000) % 60),
        _ => format!("{} h {:02} min", ms / 3_600_000, (ms / 60_000) % 60),
    }
}

fn badge(state: &str) -> Markup {
    html! { span class={"badge " (state)} data-status=(state) { (state.replace('_', " ")) } }
}

/// Who is looking at a page, and which of its forms they may use.
#[derive(Debug, Clone, Default)]
pub struct Viewer {
    /// Their name.
    pub name: String,
    /// The CSRF token every form carries.
    pub csrf: String,
    /// May start, cancel and signal runs.
    pub operate: bool,
    /// May decide approvals.
    pub approve: bool,
    /// May deploy and set desired state.
    pub deploy: bool,
    /// May read the audit trail and manage users.
    pub admin: bool,
    /// Signed in with a session (and so may sign out).
    pub session: bool,
}

impl Viewer {
    /// The viewer a request's caller is.
    pub fn of(c: &crate::access::Caller) -> Viewer {
        use crate::operators::Role;
        let p = &c.principal;
        Viewer {
            name: p.name.clone(),
            csrf: c.csrf.clone(),
            operate: p.may(Role::Operator),
            approve: p.may(Role::Approver),
            deploy: p.may(Role::Deployer),
            admin: p.may(Role::Admin),
            session: p.via == crate::operators::Via::Session,
        }
    }
}

/// The hidden CSRF field of a form.
fn csrf(v: &Viewer) -> Markup {
    html! { input type="hidden" name="csrf" value=(v.csrf); }
}

fn layout(title: &str, section: &str, viewer: Option<&Viewer>, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · Outpost console" }
                link rel="stylesheet" href="/console/app.css";
                script src="/console/app.js" defer {}
            }
            body {
                header.top {
                    a.brand href="/" { span.logo { "◆" } " Outpost" }
                    nav {
                        a href="/" class=[(section == "fleet").then_some("active")] { "Fleet" }
                        a href="/deployments" class=[(section == "deployments").then_some("active")] { "Deployments" }
                        @if viewer.is_some_and(|v| v.admin) {
                            a href="/audit" class=[(section == "audit").then_some("active")] { "Audit" }
                        }
                    }
                    @if let Some(v) = viewer {
                        span.who #who { (v.name) }
                        @if v.session {
                            a.who href="/account/password" { "password" }
                            form.inline.signout method="post" action="/logout" #signout-form {
                                (csrf(v))
                                button.link type="submit" { "Sign out" }
                            }
                        }
                    }
                    button.link.clock #clock type="button" title="Show times in this browser's time zone or in UTC" { "times: UTC" }
                    span #live .live data-state="connecting" title="Live updates" { "connecting…" }
                }
                main { (body) }
            }
        }
    }
}

fn flash(f: &Flash) -> Markup {
    html! {
        @if let Some(e) = &f.error { div.flash.error role="alert" { (e) } }
        @if let Some(n) = &f.note { div.flash.ok role="status" { (n) } }
        @if let Some(q) = &f.queued {
            div.flash.ok role="status" { "Queued " code { (q) } " — it shows as pending below until the device applies it." }
        }
    }
}

/// One fleet row.
pub struct FleetRow {
    /// Device id.
    pub id: String,
    /// Stored device.
    pub device: Device,
    /// Runs still going.
    pub active: u64,
    /// Runs that ended badly.
    pub failed: u64,
    /// All runs.
    pub total: u64,
    /// Desired vs reported.
    pub drift: Drift,
    /// What is insecure about its link.
    pub warnings: Vec<String>,
    /// When its certificate expires (ms).
    pub cert_expires_ms: Option<u64>,
}

/// The certificate cell: its expiry, marked when it is near (30 days) or past.
fn cert_cell(expires: Option<u64>, now: u64) -> Markup {
    const MONTH: u64 = 30 * 24 * 3600 * 1000;
    html! {
        @match expires {
            None => span.muted { "—" },
            Some(e) if e <= now => span.bad title="the broker refuses it; sign a new one" { "expired " (at(e)) },
            Some(e) if e - now < MONTH => span.warn title="rotate it soon" { "expires " (at(e)) },
            Some(e) => span { (rfc3339(e).get(..10).unwrap_or("")) },
        }
    }
}

/// The banner of a gateway whose link is not secure.
fn insecure_banner(warnings: &[String]) -> Markup {
    html! {
        @if !warnings.is_empty() {
            div.banner.error #insecure-banner {
                strong { "Insecure link: " } (warnings.join("; "))
                ". Enrol the gateway (README, \"Securing a fleet\") and drop the --insecure flags."
            }
        }
    }
}

/// Events a device has journaled that the cloud has not stored yet (as of its last birth).
pub fn backlog(d: &Device) -> u64 {
    d.reported_last_seq.saturating_sub(d.next_seq.saturating_sub(1))
}

/// Devices per page of the fleet page.
pub const FLEET_PAGE: usize = 100;

/// The fleet page's totals over every device the search matches.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FleetSummary {
    /// Devices matched.
    pub devices: usize,
    /// Of them online.
    pub online: usize,
    /// Their runs still going.
    pub active: u64,
    /// Their runs that ended badly.
    pub failed: u64,
    /// Their events still to sync.
    pub backlog: u64,
}

/// Where a paged list stands.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Paging {
    /// The search.
    pub q: String,
    /// This page, from 1.
    pub page: usize,
    /// Pages in all.
    pub pages: usize,
}

/// True when every word of `q` matches the device: `key=value` one of its labels, anything else
/// part of its id or of a label's value (case-insensitive).
pub fn fleet_matches(q: &str, id: &str, d: &Device) -> bool {
    q.split_whitespace().all(|word| {
        let word = word.to_lowercase();
        match word.split_once('=') {
            Some((k, v)) => d
                .labels
                .iter()
                .any(|(lk, lv)| lk.to_lowercase() == k && lv.to_lowercase() == v),
            None => id.to_lowercase().contains(&word) || d.labels.iter().any(|(_, v)| v.to_lowercase().contains(&word)),
        }
    })
}

/// A link to page `page` of the fleet with search `q`.
fn fleet_href(q: &str, page: usize) -> String {
    let mut href = format!("/?page={page}");
    if !q.is_empty() {
        href.push_str("&q=");
        href.push_str(&enc(q));
    }
    href
}

/// The fleet overview: totals, a search, one page of devices.
pub fn fleet(rows: &[FleetRow], summary: &FleetSummary, paging: &Paging, viewer: &Viewer, now: u64) -> Markup {
    let s = summary;
    layout(
        "Fleet",
        "fleet",
        Some(viewer),
        html! {
            h1 { "Fleet" }
            div #summary .cards data-live {
                div.card { span.big { (s.online) " / " (s.devices) } span { "devices online" } }
                div.card { span.big { (s.active) } span { "runs active" } }
                div.card.warn[s.failed > 0] { span.big { (s.failed) } span { "runs failed" } }
                div.card { span.big { (s.backlog) } span { "events still to sync" } }
            }
            form.search method="get" action="/" {
                input type="search" name="q" value=(paging.q) placeholder="device id, label value or key=value";
                " " button type="submit" { "Search" }
                @if !paging.q.is_empty() { " " a href="/" { "all devices" } }
            }
            div #fleet-table data-live {
                @if rows.is_empty() && !paging.q.is_empty() {
                    p.empty { "No device matches " code { (paging.q) } "." }
                } @else if rows.is_empty() {
                    p.empty { "No device has connected yet. Start an agent with "
                        code { "outpost run --broker mqtts://HOST:8883 --device-id NAME" } " (enrol it first: README, Securing a fleet)." }
                } @else {
                    table #fleet {
                        thead { tr { th { "Device" } th { "State" } th { "Last seen" } th { "Agent" } th { "Labels" }
                            th.num { "Backlog" } th.num { "Active" } th.num { "Failed" } th.num { "Runs" } th { "Desired state" } th { "Certificate" } } }
                        tbody {
                            @for r in rows {
                                tr data-device=(r.id) {
                                    td { a href={"/devices/" (enc(&r.id))} { (r.id) } }
                                    td {
                                        @if r.device.online() { (badge("online")) } @else { (badge("offline")) }
                                        @if !r.warnings.is_empty() { " " span.badge.bad title=(r.warnings.join("; ")) { "insecure" } }
                                    }
                                    td { (ago(r.device.last_seen(now), now)) }
                                    td { (r.device.agent_version) }
                                    td { @for (k, v) in &r.device.labels { span.label { (k) "=" (v) } " " } }
                                    td.num { (backlog(&r.device)) }
                                    td.num { (r.active) }
                                    td.num.bad[r.failed > 0] { (r.failed) }
                                    td.num { (r.total) }
                                    td { (drift_cell(&r.drift)) }
                                    td { (cert_cell(r.cert_expires_ms, now)) }
                                }
                            }
                        }
                    }
                    @if paging.pages > 1 {
                        nav.pager {
                            @if paging.page > 1 { a rel="prev" href=(fleet_href(&paging.q, paging.page - 1)) { "← previous" } " " }
                            span { "page " (paging.page) " of " (paging.pages) " (" (s.devices) " devices)" }
                            @if paging.page < paging.pages { " " a rel="next" href=(fleet_href(&paging.q, paging.page + 1)) { "next →" } }
                        }
                    }
                }
            }
        },
    )
}

/// Runs listed on a device page; the rest are counted (the JSON API lists them all).
pub const RUNS_SHOWN: usize = 100;

/// Everything the device page shows.
pub struct DeviceView {
    /// Device id.
    pub id: String,
    /// Stored device.
    pub device: Device,
    /// Its newest runs, newest first (at most `RUNS_SHOWN`).
    pub runs: Vec<(String, RunMirror)>,
    /// How many runs it has in all.
    pub total_runs: usize,
    /// Equipment (name, kind).
    pub equipment: Vec<(String, String)>,
    /// Desired state.
    pub desired: Option<DesiredRow>,
    /// Reported state.
    pub reported: Option<ReportedRow>,
    /// Newest commands.
    pub commands: Vec<(String, CommandRecord)>,
    /// Workflows it holds (name, newest version).
    pub workflows: Vec<(String, u32)>,
    /// Its journal's storage failure, while its newest birth reports one.
    pub health: Option<GatewayHealth>,
    /// What it says about its link's security.
    pub security: crate::store::SecurityRow,
    /// When its certificate expires (ms).
    pub cert_expires_ms: Option<u64>,
}

/// The banner a device whose journal cannot be written gets on its pages.
fn storage_banner(h: &GatewayHealth, now: u64) -> Markup {
    html! {
        div.banner.error #storage-banner {
            strong { "The gateway's journal cannot be written" }
            " (since " (ago(h.since_ms, now)) "): " (h.storage_error)
            ". Its runs wait and go on by themselves once it can write again; free disk space on the gateway."
            @if !h.blocked_runs.is_empty() {
                " Blocked: " (h.blocked_runs.join(", "))
            }
        }
    }
}

/// Every equipment point of the reported state: desired, found, raw words and the verdict.
fn points_table(r: &ReportedRow, now: u64) -> Markup {
    let verified = if r.verified_ms == 0 {
        r.updated_ms
    } else {
        r.verified_ms
    };
    html! {
        p.muted { "Points read back " (ago(verified, now)) " (" (at(verified)) ")"
            @if let Some(since) = r.drift_since_ms { "; drifted since " (at(since)) } }
        table #points {
            thead { tr { th { "Point" } th { "Desired" } th { "Found" } th title="registers: desired → found" { "Raw" } th { "Verdict" } } }
            tbody {
                @for p in &r.points {
                    @let name = if p.point.is_empty() { p.device.clone() } else { format!("{}.{}", p.device, p.point) };
                    tr data-point=(name) data-verdict=(p.verdict.name()) {
                        td { code { (name) } }
                        td { code { (p.desired) } }
                        td { code { (p.found) } }
                        td.muted { code { (p.desired_raw) } @if p.desired_raw != p.found_raw { " → " code { (p.found_raw) } } }
                        td {
                            span.badge.(if p.verdict == outpost_shared::protocol::Verdict::Match { "completed" } else { "failed" }) { (p.verdict.name()) }
                            @if let Some(why) = p.verdict.reason() { " " span.muted { (why) } }
                        }
                    }
                }
            }
        }
    }
}

fn pretty(json_text: &str) -> String {
    serde_json::from_str::<serde_json::Value>(json_text)
        .ok()
        .and_then(|v| serde_json::to_string_pretty(&v).ok())
        .unwrap_or_else(|| json_text.to_string())
}

fn run_duration(m: &RunMirror, now: u64) -> String {
    duration(m.finished_ms.unwrap_or(now).saturating_sub(m.created_ms))
}

fn commands_table(cmds: &[(String, CommandRecord)], now: u64) -> Markup {
    html! {
        @if cmds.is_empty() { p.empty { "No commands yet." } } @else {
            table.commands {
                thead { tr { th { "Command" } th { "What" } th { "State" } th { "Issued" } th { "Result" } } }
                tbody {
                    @for (id, c) in cmds {
                        tr data-command=(id) data-state=(c.state) {
                            td { code { (id) } }
                            td { (command_text(&c.kind)) }
                            td { (badge(&c.state)) }
                            td { (ago(c.created_ms, now)) }
                            td { (c.message) }
                        }
                    }
                }
            }
        }
    }
}

/// The device page.
pub fn device(v: &DeviceView, viewer: &Viewer, f: &Flash, now: u64) -> Markup {
    let deploys: Vec<&(String, CommandRecord)> = v
        .commands
        .iter()
        .filter(|(_, c)| matches!(c.kind, CommandKind::Deploy { .. }))
        .collect();
    let desired_text = v
        .desired
        .as_ref()
        .map(|d| pretty(&d.document))
        .unwrap_or_else(|| "{}".into());
    layout(
        &v.id,
        "fleet",
        Some(viewer),
        html! {
            p.crumbs { a href="/" { "Fleet" } " / " (v.id) }
            div #device-head data-live {
                h1 { (v.id) " " @if v.device.online() { (badge("online")) } @else { (badge("offline")) } }
                p.meta {
                    "agent " (v.device.agent_version) " · last seen " (ago(v.device.last_seen(now), now))
                    " · " (v.device.next_seq.saturating_sub(1)) " events stored, " (backlog(&v.device)) " still to sync"
                    @for (k, val) in &v.device.labels { " " span.label { (k) "=" (val) } }
                }
            }
            div #device-storage data-live {
                @if let Some(h) = &v.health { (storage_banner(h, now)) }
                (insecure_banner(&v.security.warnings))
                @if !v.security.refused.is_empty() {
                    div.banner.error #refused-banner {
                        strong { "The gateway refused messages sent to it as orders (not applied): " }
                        ul { @for r in &v.security.refused { li { "rejected: " (r) } } }
                        "Someone who can publish on the broker is trying to command it; check the broker's access rules."
                    }
                }
                @if let Some(e) = v.cert_expires_ms { p.meta { "certificate: " (cert_cell(Some(e), now)) } }
            }
            (flash(f))
            div.grid {
                section.wide {
                    h2 { "Runs" }
                    div #runs data-live {
                        @if v.total_runs > v.runs.len() {
                            p.hint { "The newest " (v.runs.len()) " of " (v.total_runs) " runs; all of them: "
                                a href={"/v1/devices/" (enc(&v.id)) "/runs"} { "JSON" } "." }
                        }
                        @if v.runs.is_empty() { p.empty { "No runs yet." } } @else {
                            table #run-list {
                                thead { tr { th { "Run" } th { "Workflow" } th { "Status" } th { "Started" } th.num { "Duration" } th.num { "Events" } } }
                                tbody {
                                    @for (id, m) in &v.runs {
                                        tr data-run=(id) {
                                            td { a href={"/devices/" (enc(&v.id)) "/runs/" (enc(id))} { (id) } }
                                            td { (m.workflow) " v" (m.version) }
                                            td { (badge(m.status.as_str())) }
                                            td { (ago(m.created_ms, now)) }
                                            td.num { (run_duration(m, now)) }
                                            td.num { (m.events) }
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
                section {
                    @if viewer.operate {
                    h2 { "Start a workflow" }
                    form.stack method="post" action={"/devices/" (enc(&v.id)) "/start"} #start-form {
                        (csrf(viewer))
                        label { "Workflow"
                            select name="workflow" required {
                                @for (w, ver) in &v.workflows { option value=(w) { (w) " (v" (ver) ")" } }
                            }
                        }
                        label { "Input (JSON)" textarea name="input" rows="3" spellcheck="false" { "{}" } }
                        label { "Run id (optional)" input name="run_id" placeholder="generated"; }
                        button type="submit" { "Start" }
                        p #start-hint .hint data-live {
                            @if !v.device.online() { "The device is offline: the start waits until it returns." }
                        }
                    }
                    }
                    h2 { "Equipment" }
                    @if v.equipment.is_empty() { p.empty { "No equipment file on this device." } } @else {
                        table #equipment { tbody { @for (n, k) in &v.equipment { tr { td { (n) } td.muted { (k) } } } } }
                    }
                }
                // A points table needs the width.
                section.wide[v.reported.as_ref().is_some_and(|r| !r.points.is_empty())] {
                    h2 { "Desired and reported state" }
                    div #state data-live {
                        @let d = drift(v.desired.as_ref(), v.reported.as_ref());
                        p { (drift_cell(&d))
                            @if let Some(r) = &v.reported { " " span.muted { (r.message) " (" (ago(r.updated_ms, now)) ")" } } }
                        @if let Some(r) = &v.reported {
                            @if !r.points.is_empty() { (points_table(r, now)) }
                            h3 { "Reported" } pre { (pretty(&r.document)) }
                        }
                        @if let Some(d) = &v.desired { h3 { "Desired v" (d.version) } pre { (pretty(&d.document)) } }
                    }
                    @if viewer.deploy {
                        form.stack method="post" action={"/devices/" (enc(&v.id)) "/desired"} #desired-form {
                            (csrf(viewer))
                            label { "Set desired state (JSON)" textarea name="document" rows="5" spellcheck="false" { (desired_text) } }
                            button type="submit" { "Set desired state" }
                        }
                    }
                }
                section.wide {
                    h2 { "Commands" }
                    div #commands data-live { (commands_table(&v.commands, now)) }
                }
                section.wide {
                    h2 { "Deployments" }
                    div #device-deployments data-live {
                        @if deploys.is_empty() { p.empty { "No deployment has targeted this device." } } @else {
                            table { tbody { @for (id, c) in &deploys {
                                @let dep = id.split('.').next().unwrap_or(id);
                                tr { td { a href={"/deployments/" (enc(dep))} { (dep) } } td { (badge(&c.state)) } td { (ago(c.created_ms, now)) } td { (c.message) } }
                            } } }
                        }
                    }
                }
            }
        },
    )
}

/// Everything the run page shows.
pub struct RunView {
    /// Device id.
    pub device: String,
    /// Whether the device is online.
    pub online: bool,
    /// Run id.
    pub run_id: String,
    /// The mirror row.
    pub mirror: RunMirror,
    /// Its history (seq, record).
    pub history: Vec<(u64, Record)>,
    /// The definition of the version the run is pinned to, when the device sent it.
    pub document: Option<Document>,
    /// Commands about this run, newest first.
    pub commands: Vec<(String, CommandRecord)>,
    /// The device's journal storage failure, while its newest birth reports one.
    pub health: Option<GatewayHealth>,
}

fn short_json(text: &str, max: usize) -> String {
    let compact = serde_json::from_str::<serde_json::Value>(text)
        .map(|v| v.to_string())
        .unwrap_or_else(|_| text.to_string());
    if compact.chars().count() > max {
        format!("{}…", compact.chars().take(max).collect::<String>())
    } else {
        compact
    }
}

/// One timeline row: (class, step, what, detail).
fn describe(e: &Event) -> (&'static str, String, String, String) {
    let err = |e: &outpost_shared::journal::ErrorInfo| format!("{}: {}", e.kind, e.message);
    match e {
        Event::RunStarted {
            workflow,
            version,
            input,
        } => (
            "run",
            String::new(),
            format!("run started ({workflow} v{version})"),
            format!("input {}", short_json(input, 200)),
        ),
        Event::AttemptStarted {
            step, visit, attempt, ..
        } => (
            "attempt",
            step.clone(),
            format!("attempt {attempt}{}", visit_text(*visit)),
            String::new(),
        ),
        Event::AttemptFailed {
            step,
            attempt,
            error,
            retry_at_ms,
            ..
        } => (
            "fail",
            step.clone(),
            match retry_at_ms {
                Some(at) => format!("attempt {attempt} failed, retry at {}", rfc3339(*at)),
                None => format!("attempt {attempt} failed"),
            },
            err(error),
        ),
        Event::AttemptDeferred { step, attempt, .. } => (
            "wait",
            step.clone(),
            format!("attempt {attempt} held by an open circuit breaker"),
            String::new(),
        ),
        Event::StepCompleted { step, output, .. } => (
            "ok",
            step.clone(),
            "completed".into(),
            format!("output {}", short_json(output, 300)),
        ),
        Event::StepFailed { step, error, .. } => ("fail", step.clone(), "step failed".into(), err(error)),
        Event::StepSkipped { step, reason } => ("skip", step.clone(), "skipped".into(), reason.clone()),
        Event::TimerSet {
            step,
            duration_ms,
            fire_at_ms,
            ..
        } => (
            "wait",
            step.clone(),
            format!("sleeping {}", duration(*duration_ms)),
            format!("until {}", rfc3339(*fire_at_ms)),
        ),
        Event::TimerFired { step, .. } => ("wait", step.clone(), "timer fired".into(), String::new()),
        Event::WaitStarted {
            step,
            signal,
            fire_at_ms,
            ..
        } => (
            "wait",
            step.clone(),
            match SignalName::parse(signal) {
                SignalName::Approval(_) => "waiting for approval".to_string(),
                SignalName::User(name) => format!("waiting for signal {name}"),
            },
            fire_at_ms
                .map(|t| format!("times out at {}", rfc3339(t)))
                .unwrap_or_default(),
        ),
        Event::RunResumed { replayed } => (
            "run",
            String::new(),
            "resumed after the agent restarted".into(),
            format!("{replayed} events replayed"),
        ),
        Event::SignalFrom { id, by } => (
            "signal",
            String::new(),
            format!("sent by {by}"),
            format!("signal id {id}"),
        ),
        Event::SignalReceived { name, payload, .. } => (
            "signal",
            String::new(),
            match SignalName::parse(name) {
                SignalName::Approval(step) => format!("decision for {step}"),
                SignalName::User(name) => format!("signal {name}"),
            },
            short_json(payload, 200),
        ),
        Event::RunCompleted { output } => (
            "ok",
            String::new(),
            "run completed".into(),
            format!("output {}", short_json(output, 300)),
        ),
        Event::RunFailed { error } => ("fail", String::new(), "run failed".into(), err(error)),
        Event::RunCancelled { reason } => ("fail", String::new(), "run cancelled".into(), reason.clone()),
        Event::CompensationStarted { error } => ("comp", String::new(), "compensating".into(), err(error)),
        Event::CompensationAttemptStarted { step, attempt, .. } => (
            "comp",
            step.clone(),
            format!("compensation attempt {attempt}"),
            String::new(),
        ),
        Event::CompensationAttemptFailed {
            step, attempt, error, ..
        } => (
            "fail",
            step.clone(),
            format!("compensation attempt {attempt} failed"),
            err(error),
        ),
        Event::StepCompensated { step, output, .. } => {
            ("comp", step.clone(), "compensated".into(), short_json(output, 200))
        }
        Event::CompensationFailed { step, error, .. } => {
            ("fail", step.clone(), "compensation failed".into(), err(error))
        }
        Event::RunCompensated { error } => ("comp", String::new(), "run compensated".into(), err(error)),
        Event::RunCompensationFailed { step, error } => {
            ("fail", step.clone(), "run compensation failed".into(), err(error))
        }
        Event::RunRetried { by } => ("run", String::new(), "run retried".into(), format!("by {by}")),
        Event::RunTerminated { reason } => ("fail", String::new(), "run terminated".into(), reason.clone()),
        Event::RunContinued { next_run, .. } => (
            "run",
            String::new(),
            "continued as new".into(),
            format!("next run {next_run}"),
        ),
    }
}

fn visit_text(visit: u32) -> String {
    if visit > 1 {
        format!(" (visit {visit})")
    } else {
        String::new()
    }
}

/// The run page.
pub fn run(v: &RunView, viewer: &Viewer, f: &Flash, now: u64) -> Markup {
    let folded = fold_mirrored(
        &v.mirror.workflow,
        v.mirror.version,
        v.document.as_ref(),
        &v.run_id,
        &v.history,
    );
    let states = folded
        .as_ref()
        .map(|(def, st)| graph::step_classes(def, st))
        .unwrap_or_default();
    let open = folded.as_ref().map(|(def, st)| st.open_waits(def)).unwrap_or_default();
    let approvals: Vec<&str> = open
        .iter()
        .filter_map(|(step, s)| matches!(s, SignalName::Approval(_)).then_some(*step))
        .collect();
    let waits: Vec<&str> = open
        .iter()
        .filter_map(|(_, s)| match s {
            SignalName::User(name) => Some(name.as_str()),
            SignalName::Approval(_) => None,
        })
        .collect();
    let start = v.history.first().map(|(_, r)| r.at_ms).unwrap_or(v.mirror.created_ms);
    let active = is_active(v.mirror.status);
    let run_path = format!("/devices/{}/runs/{}", enc(&v.device), enc(&v.run_id));
    let summary: HashMap<&str, usize> = states.values().fold(HashMap::new(), |mut m, s| {
        *m.entry(*s).or_default() += 1;
        m
    });
    layout(
        &v.run_id,
        "fleet",
        Some(viewer),
        html! {
            p.crumbs { a href="/" { "Fleet" } " / " a href={"/devices/" (enc(&v.device))} { (v.device) } " / " (v.run_id) }
            div #run-head data-live {
                h1 { (v.run_id) " " (badge(v.mirror.status.as_str())) }
                p.meta {
                    (v.mirror.workflow) " v" (v.mirror.version) " on " (v.device)
                    " · started " (ago(v.mirror.created_ms, now))
                    " · " @if v.mirror.finished_ms.is_some() { "took " } @else { "running for " } (run_duration(&v.mirror, now))
                    " · " (outpost_shared::count(v.mirror.events, "event"))
                    @if !v.online { " · " span.badge.offline { "device offline" } }
                }
            }
            @if let Some(h) = v.health.as_ref().filter(|_| active) {
                div #run-storage data-live {
                    @if h.blocked_runs.contains(&v.run_id) {
                        div.banner.error { strong { "Blocked:" } " this run waits for the gateway's journal, which cannot be written (" (h.storage_error) "); it goes on by itself once it can." }
                    } @else {
                        (storage_banner(h, now))
                    }
                }
            }
            (flash(f))
            div #actions data-live {
                @if active && (viewer.approve || viewer.operate) {
                    div.actions {
                        @for step in approvals.iter().filter(|_| viewer.approve) {
                            form.approval method="post" action={(run_path) "/approve"} data-step=(step) {
                                (csrf(viewer))
                                strong { "Approval: " (step) }
                                input type="hidden" name="step" value=(step);
                                span.muted { "as " (viewer.name) }
                                input name="comment" placeholder="comment";
                                button type="submit" name="decision" value="approve" { "Approve" }
                                button.danger type="submit" name="decision" value="reject" { "Reject" }
                            }
                        }
                        @if viewer.operate {
                            form.inline method="post" action={(run_path) "/signal"} #signal-form {
                                (csrf(viewer))
                                input name="name" placeholder="signal name" required value=[waits.first()];
                                input name="payload" placeholder="payload JSON (optional)";
                                button type="submit" { "Send signal" }
                            }
                            form.inline method="post" action={(run_path) "/cancel"} #cancel-form {
                                (csrf(viewer))
                                input name="reason" placeholder="reason (optional)";
                                button.danger type="submit" { "Cancel run" }
                            }
                        }
                    }
                }
                @let pending: Vec<_> = v.commands.iter().filter(|(_, c)| c.state == "pending").collect();
                @if !pending.is_empty() {
                    div.pending-cmds {
                        "Waiting for the device: "
                        @for (id, c) in pending { span.badge.pending data-command=(id) { (command_text(&c.kind)) } " " }
                    }
                }
            }
            section {
                h2 { "Graph" }
                div #graph .graph-box data-live {
                    @match &v.document {
                        Some(doc) => {
                            (graph::svg(doc, &states))
                            p.legend {
                                @for s in graph::LEGEND.iter().filter(|s| graph::ALWAYS_IN_LEGEND.contains(s) || summary.contains_key(*s)) {
                                    span class={"key " (s)} { (s) @if let Some(n) = summary.get(s) { " " (n) } }
                                }
                            }
                        }
                        None => p.empty { "The device has not sent definition " (v.mirror.workflow) " v" (v.mirror.version) " yet; the timeline below is complete." }
                    }
                }
            }
            section {
                h2 { "Timeline" }
                div #timeline-box data-live {
                    table #timeline {
                        thead { tr { th.num { "#" } th { "Time" } th { "Step" } th { "Event" } th { "Detail" } } }
                        tbody {
                            @for (seq, r) in &v.history {
                                @let (class, step, what, detail) = describe(&r.event);
                                tr class=(class) data-step=(step) data-type=(r.event.name()) {
                                    td.num.muted { (seq) }
                                    td title=(rfc3339(r.at_ms)) { "+" (duration(r.at_ms.saturating_sub(start))) }
                                    td { (step) }
                                    td { (what) }
                                    td.detail { (detail) }
                                }
                            }
                        }
                    }
                }
            }
            section {
                h2 { "Commands" }
                div #run-commands data-live { (commands_table(&v.commands, now)) }
            }
        },
    )
}

/// Per device of a deployment: (device, state, reason).
pub type DeviceStates = Vec<(String, String, String)>;

/// A deployment listed: (id, record, per-device states, its rollout's state and reason when it
/// is rolled out wave by wave).
pub type DeploymentRow = (String, Deployment, DeviceStates, Option<(&'static str, String)>);

/// The deployments page: a form and the newest deployments.
pub fn deployments(
    list: &[DeploymentRow],
    devices: &[(String, Device)],
    viewer: &Viewer,
    f: &Flash,
    document: &str,
    now: u64,
) -> Markup {
    layout(
        "Deployments",
        "deployments",
        Some(viewer),
        html! {
            h1 { "Deployments" }
            (flash(f))
            div.grid {
                @if viewer.deploy {
                section {
                    h2 { "New deployment" }
                    form.stack method="post" action="/deployments" #deploy-form {
                        (csrf(viewer))
                        label { "Definition file (YAML or JSON)" input type="file" accept=".yaml,.yml,.json" data-fills="document"; }
                        label { "…or paste it" textarea name="document" rows="12" spellcheck="false" placeholder="name: my-workflow\nversion: 1\nsteps: …" { (document) } }
                        fieldset {
                            legend { "Devices" }
                            @if devices.is_empty() { p.empty { "No devices known yet." } }
                            @for (id, d) in devices {
                                label.check { input type="checkbox" name="device" value=(id);
                                    " " (id) " " @if d.online() { span.badge.online { "online" } } @else { span.badge.offline { "offline" } } }
                            }
                        }
                        label { "…and/or devices with labels" input name="labels" placeholder="line=3, site=north"; }
                        fieldset #rollout-plan {
                            legend { "Rollout" }
                            label.check { input type="checkbox" name="staged" value="on"; " Wave by wave, with a health gate between waves (otherwise to every device at once)" }
                            label { "Canaries: a count, a percentage or device ids" input name="canary" placeholder="2, 10% or gw1, gw2"; }
                            label { "Each wave after them: a count or a percentage" input name="wave" placeholder="25% (default: the rest at once)"; }
                            label { "…or one wave per value of label" input name="wave_by_label" placeholder="site"; }
                            label { "Pace: least time between wave starts" input name="pace" placeholder="15m"; }
                            label { "Bake: how long a wave's runs are watched" input name="bake" placeholder="5m"; }
                            label { "Gate: least % of ended runs completed" input name="min_completed_percent" inputmode="numeric" placeholder="90"; }
                            label { "Gate: most failed runs" input name="max_failed_runs" inputmode="numeric" placeholder="0"; }
                            label { "Gate: least runs ended before judging" input name="min_runs" inputmode="numeric" placeholder="0"; }
                            label { "Gate: health workflow (its output says healthy: true)" input name="gate_workflow" placeholder="optional"; }
                            label { "A device holds its wave for at most" input name="device_deadline" placeholder="1h"; }
                            label { "When a gate fails" select name="on_failure" { option value="halt" { "halt" } option value="rollback" { "halt and roll back the updated devices" } } }
                            label { "Devices offline when their wave starts" select name="offline" { option value="wait" { "update them when they return" } option value="skip" { "skip them" } } }
                        }
                        button type="submit" { "Deploy" }
                    }
                }
                }
                section.wide {
                    h2 { "Recent" }
                    div #deployment-list data-live {
                        @if list.is_empty() { p.empty { "No deployments yet." } } @else {
                            table {
                                thead { tr { th { "Deployment" } th { "Workflow" } th { "Created" } th { "Rollout" } th { "Devices" } } }
                                tbody {
                                    @for (id, d, states, rollout) in list {
                                        tr data-deployment=(id) {
                                            td { a href={"/deployments/" (enc(id))} { (id) } }
                                            td { (d.workflow) " v" (d.version) }
                                            td { (ago(d.created_ms, now)) }
                                            td { @if let Some((state, reason)) = rollout { span title=(reason) { (badge(state)) } } @else { "at once" } }
                                            td { @for (dev, st, _) in states { span class={"badge " (st)} title=(st) { (dev) } " " } }
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
            }
        },
    )
}

/// One deployment with its per-device state.
pub fn deployment(v: &DeploymentView, document: Option<&Document>, viewer: &Viewer, f: &Flash, now: u64) -> Markup {
    layout(
        &v.id,
        "deployments",
        Some(viewer),
        html! {
            p.crumbs { a href="/deployments" { "Deployments" } " / " (v.id) }
            h1 { "Deployment " (v.id) }
            (flash(f))
            p.meta { (v.workflow) " v" (v.version) " · created " (ago(v.created_ms, now)) " · " (outpost_shared::count(v.devices.len() as u64, "device")) }
            // Outside the live region: a live refresh must not swap a button being clicked.
            @if let Some(r) = &v.rollout { (rollout_controls(&v.id, r, viewer)) }
            div #deployment-states data-live {
                @if let Some(r) = &v.rollout { (rollout_section(r)) }
                @if !v.active_runs.is_empty() {
                    p.meta #active-runs { "Runs still active on these devices: "
                        @for (i, (version, n)) in v.active_runs.iter().enumerate() {
                            @if i > 0 { ", " }
                            span data-version=(version) { "v" (version) ": " (n) }
                        }
                        " (a run keeps the version it started on)"
                    }
                }
                table #deployment-devices {
                    thead { tr { th { "Device" } @if v.rollout.is_some() { th { "Wave" } } th { "State" } th { "Reason" } } }
                    tbody {
                        @for d in &v.devices {
                            tr data-device=(d.device) data-state=(d.state) {
                                td { a href={"/devices/" (enc(&d.device))} { (d.device) } }
                                @if v.rollout.is_some() { td { (d.wave.as_deref().unwrap_or("")) } }
                                td { (badge(&d.state)) }
                                td { (d.reason.as_deref().unwrap_or("")) }
                            }
                        }
                    }
                }
                p.hint { "Offline devices apply it when they return; a newer deployment of the same workflow supersedes a pending one." }
            }
            @if let Some(doc) = document {
                section {
                    h2 { "Definition" }
                    @if let Some(text) = &doc.description { p.meta { (text) } }
                    div.graph-box { (graph::svg(doc, &HashMap::new())) }
                }
            }
        },
    )
}

/// A deployer's controls of a rollout still going (as the page was loaded; an order that no
/// longer applies is refused with the reason).
fn rollout_controls(id: &str, r: &RolloutView, viewer: &Viewer) -> Markup {
    let running = r.state == "running";
    let paused = r.state == "paused";
    html! {
        @if viewer.deploy && (running || paused) {
            div.actions.row #rollout-actions {
                @for (order, label, show) in [("pause", "Pause", running), ("resume", "Resume", paused), ("promote", "Promote (skip the bake)", running || paused), ("abort", "Abort", true)] {
                    @if show {
                        form method="post" action={"/deployments/" (enc(id)) "/" (order)} {
                            (csrf(viewer))
                            button type="submit" id={"rollout-" (order)} { (label) }
                        }
                    }
                }
            }
        }
    }
}

/// A rollout's state, reason, waves, gate evidence and history.
fn rollout_section(r: &RolloutView) -> Markup {
    let e = &r.evidence;
    html! {
        section #rollout data-rollout-state=(r.state) {
            h2 { "Rollout " (badge(r.state)) }
            p #rollout-reason { (r.reason) }
            p.meta { (r.plan) }
            table #rollout-waves {
                thead { tr { th { "Wave" } th { "Devices" } th { "" } } }
                tbody {
                    @for w in &r.waves {
                        tr data-wave=(w.name) data-sent=(w.sent) {
                            td { (w.name) }
                            td { (w.devices.join(", ")) }
                            td { @if w.sent { "sent" } @else { "not yet" } }
                        }
                    }
                }
            }
            h3 { "Health gate evidence" }
            dl.facts #rollout-evidence {
                dt { "Devices updated" } dd data-applied=(e.applied) { (e.applied) }
                dt { "Still to answer" } dd { (e.pending)
                    @if !e.offline.is_empty() { " (offline, updated when they return: " (e.offline.join(", ")) ")" }
                    @if !e.timed_out.is_empty() { " (past their deadline: " (e.timed_out.join(", ")) ")" } }
                @if !e.rejected.is_empty() {
                    dt { "Rejected" } dd { @for (d, why) in &e.rejected { (d) ": " (why) br; } }
                }
                dt { "Runs of the new version" } dd #rollout-runs { (e.runs_completed) " completed, " (e.runs_failed) " failed, " (e.runs_active) " active" }
                @if !e.failed_runs.is_empty() {
                    dt { "Failed runs" } dd #rollout-failed-runs {
                        @for (d, run) in &e.failed_runs { a href={"/devices/" (enc(d)) "/runs/" (enc(run))} { (d) "/" (run) } " " }
                    }
                }
                @if !e.health.is_empty() {
                    dt { "Health checks" } dd { @for (d, ok, run) in &e.health { (d) ": " @if *ok { "healthy" } @else { "unhealthy" } " (" (run) ") " } }
                }
                @if let Some(rb) = &r.rollback_deployment {
                    dt { "Rolled back by" } dd { a href={"/deployments/" (enc(rb))} { (rb) } }
                }
            }
            details #rollout-log {
                summary { "History (" (r.log.len()) ")" }
                ol { @for l in &r.log { li { time datetime=(l.at) { (l.at) } " " (l.text) } } }
            }
        }
    }
}

/// The sign-in page.
pub fn login(error: Option<&str>, next: &str) -> Markup {
    layout(
        "Sign in",
        "",
        None,
        html! {
            section.narrow {
                h1 { "Sign in" }
                @if let Some(e) = error { div.flash.error role="alert" #login-error { (e) } }
                form.stack method="post" action="/login" #login-form {
                    input type="hidden" name="next" value=(next);
                    label { "User" input name="user" autocomplete="username" required autofocus; }
                    label { "Password" input type="password" name="password" autocomplete="current-password" required; }
                    button type="submit" { "Sign in" }
                }
                p.hint { "Accounts are made with " code { "outpost-cloud users add NAME --role ROLE" } "." }
            }
        },
    )
}

/// The change-password page.
pub fn password(viewer: &Viewer, must_change: bool, error: Option<&str>) -> Markup {
    layout(
        "Password",
        "",
        Some(viewer),
        html! {
            section.narrow {
                h1 { "Change your password" }
                @if must_change { div.flash.ok #must-change { "Your password was set by someone else: choose your own before you go on." } }
                @if let Some(e) = error { div.flash.error role="alert" #password-error { (e) } }
                form.stack method="post" action="/account/password" #password-form {
                    (csrf(viewer))
                    label { "Current password" input type="password" name="current" autocomplete="current-password" required; }
                    label { "New password (at least " (crate::operators::MIN_PASSWORD_CHARS) " characters)"
                        input type="password" name="new" autocomplete="new-password" required; }
                    label { "New password again" input type="password" name="repeat" autocomplete="new-password" required; }
                    button type="submit" { "Change password" }
                }
            }
        },
    )
}

/// The audit trail page: the newest entries that match the filter.
pub fn audit(rows: &[(u64, AuditRow)], filter: &AuditFilter, viewer: &Viewer, limit: usize) -> Markup {
    let val = |o: &Option<String>| o.clone().unwrap_or_default();
    let export = serde_urlencoded::to_string([
        ("who", val(&filter.who)),
        ("device", val(&filter.device)),
        ("kind", val(&filter.kind)),
    ])
    .unwrap_or_default();
    layout(
        "Audit",
        "audit",
        Some(viewer),
        html! {
            h1 { "Audit trail" }
            form.inline method="get" action="/audit" #audit-filter {
                input name="who" placeholder="user" value=(val(&filter.who));
                input name="device" placeholder="device" value=(val(&filter.device));
                input name="kind" placeholder="kind (start, approve, sign_in…)" value=(val(&filter.kind));
                button type="submit" { "Filter" }
                " " a href={"/v1/audit?" (export)} { "Export (JSON lines)" }
            }
            @if rows.len() >= limit { p.hint { "The newest " (limit) " entries; the export has all of them." } }
            @if rows.is_empty() { p.empty { "Nothing recorded that matches." } } @else {
                table #audit {
                    thead { tr { th.num { "#" } th { "Time" } th { "Who" } th { "From" } th { "Action" } th { "Device" } th { "About" } th { "Result" } th { "Detail" } } }
                    tbody {
                        @for (n, a) in rows {
                            tr data-kind=(a.kind) data-result=(a.result) data-who=(a.who) {
                                td.num.muted { (n) }
                                td { (at(a.at_ms)) }
                                td { (a.who) }
                                td.muted { (a.from) }
                                td { (a.kind) }
                                td { (a.device) }
                                td { (a.target) }
                                td { @if a.result == "ok" { span.badge.completed { "ok" } } @else { span.badge.failed { (a.result) } } }
                                td.detail { (a.message) }
                            }
                        }
                    }
                }
            }
        },
    )
}

/// A page for a request that failed.
pub fn error_page(code: StatusCode, message: &str) -> Markup {
    layout(
        "Error",
        "",
        None,
        html! {
            h1 { (code.as_u16()) " " (code.canonical_reason().unwrap_or("")) }
            div.flash.error { (message) }
            p { a href="/" { "Back to the fleet" } }
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_text_from_the_wire_is_escaped_everywhere() {
        let rows = vec![FleetRow {
            id: "gw-1".into(),
            device: Device {
                agent_version: "<script>alert(1)</script>".into(),
                labels: vec![("line".into(), "\"><img src=x>".into())],
                epoch: 1,
                ..Device::default()
            },
            active: 0,
            failed: 0,
            total: 0,
            drift: Drift::Unmanaged,
            warnings: vec!["<b>plain</b>".into()],
            cert_expires_ms: Some(0),
        }];
        let html = fleet(
            &rows,
            &FleetSummary::default(),
            &Paging::default(),
            &Viewer::default(),
            0,
        )
        .into_string();
        assert!(!html.contains("<b>plain"), "{html}");
        assert!(html.contains("insecure") && html.contains("expired"), "{html}");
        assert!(!html.contains("<script>alert"), "{html}");
        assert!(!html.contains("<img src=x>"), "{html}");
        assert!(html.contains("&lt;script&gt;"));
    }

    #[test]
    fn the_fleet_search_matches_ids_label_values_and_key_value_pairs() {
        let d = Device {
            labels: vec![("site".into(), "Lyon".into()), ("line".into(), "4".into())],
            ..Device::default()
        };
        assert!(fleet_matches("", "gw-17", &d));
        assert!(fleet_matches("GW-1", "gw-17", &d));
        assert!(fleet_matches("lyon", "gw-17", &d));
        assert!(fleet_matches("site=lyon line=4", "gw-17", &d));
        assert!(!fleet_matches("site=paris", "gw-17", &d));
        assert!(!fleet_matches("gw-17 paris", "gw-17", &d));
        assert_eq!(fleet_href("site=lyon", 2), "/?page=2&q=site%3Dlyon");
    }

    #[test]
    fn durations_and_paths_read_well() {
        assert_eq!(duration(850), "850 ms");
        assert_eq!(duration(12_345), "12.3 s");
        assert_eq!(duration(245_000), "4 min 05 s");
        assert_eq!(enc("a b/c"), "a%20b%2Fc");
    }
}
