//! The commands that talk to a running agent over its socket (or read the journal offline),
//! and how their replies are printed.

use super::*;
use serde::Deserialize;

use crate::api::types::{
    AppliedReply, ApproveReply, DefinitionRow, ErrorReply, EventsPage, HistoryRow, RunDetail, RunReply, ShownStatus,
    SignalReply, StartReply, StatusView,
};
use crate::sync_state::SyncView;

/// Turns an error answer of the API into a failure with the matching exit code.
pub(super) fn api_failure(status: StatusCode, body: &Value) -> Failure {
    let code = match status.as_u16() {
        400 | 413 | 422 => exit::INVALID,
        404 => exit::NOT_FOUND,
        409 => exit::CONFLICT,
        429 => exit::BUSY,
        _ => exit::FAILURE,
    };
    let reply = ErrorReply::deserialize(body).unwrap_or_default();
    let mut msg = if reply.error.message.is_empty() {
        format!("{status}: {body}")
    } else {
        reply.error.message
    };
    for p in &reply.error.problems {
        msg.push_str(&format!("\n  - {p}"));
    }
    Failure::new(code, msg)
}

pub(super) async fn call(client: &Client, method: Method, path: &str, body: Option<String>) -> Result<Value, Failure> {
    let (status, v) = client.request(method, path, body).await?;
    if status.is_success() {
        Ok(v)
    } else {
        Err(api_failure(status, &v))
    }
}

/// [`call`], with the reply read as the API's type for it.
pub(super) async fn call_as<T: serde::de::DeserializeOwned>(
    client: &Client,
    method: Method,
    path: &str,
    body: Option<String>,
) -> Result<T, Failure> {
    let v = call(client, method, path, body).await?;
    T::deserialize(&v).map_err(|e| {
        Failure::new(
            exit::FAILURE,
            format!("the agent's answer to {path} is not what this outpost reads (is the agent another version?): {e}"),
        )
    })
}

/// Exit code for a finished (or not) run.
pub(super) fn run_exit(status: ShownStatus) -> u8 {
    match status {
        ShownStatus::Completed => exit::OK,
        s if s.is_pending() => exit::STILL_RUNNING,
        _ => exit::RUN_UNSUCCESSFUL,
    }
}

/// Hands each of `run`'s events after `after` to `emit` as it is journaled, until the run ends
/// (or `deadline`).
pub(super) async fn follow_run(
    client: &Client,
    run: &str,
    mut after: u64,
    deadline: Option<tokio::time::Instant>,
    emit: &mut dyn FnMut(&HistoryRow),
) -> Result<(), Failure> {
    loop {
        let wait = match deadline {
            Some(d) => d
                .saturating_duration_since(tokio::time::Instant::now())
                .min(Duration::from_secs(30)),
            None => Duration::from_secs(30),
        };
        let path = format!(
            "/v1/runs/{run}/events?after={after}&wait={}",
            wait.as_secs_f64().max(0.001)
        );
        let page: EventsPage = call_as(client, Method::GET, &path, None).await?;
        for e in &page.events {
            emit(e);
        }
        after = page.last_seq;
        let ended = !page.status.is_pending();
        if ended || deadline.is_some_and(|d| tokio::time::Instant::now() >= d) {
            return Ok(());
        }
    }
}

/// The sync subsystem in one line: the link, the acknowledged sequence, the backlog, the last error.
pub(super) fn sync_line(sync: Option<&SyncView>) -> String {
    let Some(sync) = sync else {
        return "off (no --broker; runs are kept only here)".into();
    };
    let link = if sync.connected {
        format!("connected to {}", sync.broker)
    } else {
        format!("DISCONNECTED from {} (retrying)", sync.broker)
    };
    let mut line = format!(
        "{link}, acknowledged through seq {}, backlog {}",
        sync.acked_seq,
        outpost_shared::count(sync.backlog_events, "event")
    );
    if let Some(e) = &sync.last_error {
        line.push_str(&format!("; last error {}: {}", e.at, e.error));
    }
    line
}

/// One line for a human following a run, or `None` for events the final result covers.
pub(super) fn progress_line(e: &HistoryRow) -> Option<String> {
    let step = e.step.as_deref().unwrap_or_default();
    let attempt = e.detail.get("attempt").and_then(Value::as_u64).unwrap_or(0);
    let what = match e.kind.as_str() {
        "attempt_started" if attempt > 1 => format!("step {step} retrying (attempt {attempt})"),
        "attempt_started" => format!("step {step} started"),
        "attempt_failed" => format!("step {step} attempt {attempt} failed: {}", e.error_message()),
        "attempt_deferred" => format!("step {step} held back: {} is failing (circuit open)", e.text("target")),
        "step_completed" => format!("step {step} completed"),
        "step_failed" => format!("step {step} failed: {}", e.error_message()),
        "step_skipped" => format!("step {step} skipped"),
        "timer_set" => format!("step {step} sleeping"),
        "wait_started" => match outpost_shared::run::SignalName::parse(e.text("signal")) {
            outpost_shared::run::SignalName::Approval(_) => format!("step {step} waits for approval"),
            outpost_shared::run::SignalName::User(sig) => format!("step {step} waits for signal '{sig}'"),
        },
        "signal_received" => format!("signal '{}' received", e.text("name")),
        "compensation_started" => format!("compensating: {}", e.error_message()),
        "step_compensated" => format!("step {step} compensated"),
        "compensation_failed" => format!("step {step} compensation failed"),
        "run_retried" => format!("retried by {}", e.text("by")),
        _ => return None,
    };
    // `at` is RFC 3339; the time of day is what a person following along wants.
    let clock = e.at.get(11..19).unwrap_or(&e.at);
    Some(format!("{clock}  {what}"))
}

pub(super) fn print_result(v: &RunReply) {
    println!("run {} {}", v.run_id, v.status.as_str());
    if let Some(w) = &v.waiting {
        println!("waiting: {w}");
    }
    if let Some(out) = v.output.as_ref().filter(|o| !o.is_null()) {
        println!("output: {out}");
    }
    if let Some(e) = &v.error {
        println!("error: {}: {}", e.kind, e.message);
    }
}

/// The journal of `data_dir`, opened read-only for `--offline`.
pub(super) fn open_offline(data_dir: &Path) -> Result<crate::offline::Offline, Failure> {
    let path = data_dir.join("journal.redb");
    let note = |why: &crate::journal::JournalError| match why {
        crate::journal::JournalError::OlderFormat { found, .. } => eprintln!(
            "note: {} is in journal format {found}, which the agent upgrades when it next starts; reading an upgraded copy, the file itself is untouched",
            path.display()
        ),
        _ => eprintln!(
            "note: {} was not closed cleanly (the agent was killed or lost power); reading a repaired copy, the file itself is untouched",
            path.display()
        ),
    };
    crate::offline::Offline::open(&path, note).map_err(|e| match e {
        crate::journal::JournalError::Locked(_) => Failure::new(
            exit::BUSY,
            format!(
                "{} is open in the running agent: ask it instead (drop --offline)",
                path.display()
            ),
        ),
        other => Failure::new(exit::FAILURE, format!("cannot read {}: {other}", path.display())),
    })
}

/// An offline read's error, with the exit code the agent's API answer would give.
pub(super) fn offline_failure(e: crate::api::ApiError) -> Failure {
    let (status, body) = e.answer();
    api_failure(status, &serde_json::to_value(body).unwrap_or_default())
}

pub(super) async fn remote(client: Client, cmd: Cmd, as_json: bool, data_dir: &Path) -> Result<u8, Failure> {
    match cmd {
        Cmd::Apply { files } => {
            // Every file is tried, as `validate` does, so one run reports every bad file.
            let mut out = Vec::new();
            let mut code = exit::OK;
            for f in &files {
                let answer = match read_document(f) {
                    Ok(text) => match client.request(Method::POST, "/v1/definitions", Some(text)).await {
                        Ok((status, v)) if status.is_success() => Ok(v),
                        Ok((status, v)) => {
                            let problems = v["error"]["problems"].clone();
                            let e = api_failure(status, &v);
                            Err((
                                Failure::new(e.code, format!("{}: {}", f.display(), e.message)),
                                problems,
                            ))
                        }
                        Err(e) => return Err(e.into()),
                    },
                    Err(e) => Err((e, Value::Array(Vec::new()))),
                };
                let v = match answer.and_then(|v| {
                    AppliedReply::deserialize(&v).map_err(|e| {
                        (
                            Failure::new(exit::FAILURE, format!("{}: {e}", f.display())),
                            Value::Null,
                        )
                    })
                }) {
                    Ok(v) => v,
                    Err((e, problems)) => {
                        code = code.max(e.code);
                        if as_json {
                            let message = e.message.lines().next().unwrap_or_default().to_string();
                            out.push(json!({"file": f, "ok": false, "error": message, "problems": problems}));
                        } else {
                            eprintln!("error: {}", e.message);
                        }
                        continue;
                    }
                };
                if !as_json {
                    let what = if v.created { "applied" } else { "unchanged" };
                    println!(
                        "{what}: {} v{} ({}) from {}",
                        v.name,
                        v.version,
                        outpost_shared::count(v.steps as u64, "step"),
                        f.display()
                    );
                }
                let mut v = serde_json::to_value(v).unwrap_or_default();
                v["file"] = json!(f);
                v["ok"] = json!(true);
                out.push(v);
            }
            if as_json {
                print_json(&out);
            }
            Ok(code)
        }
        Cmd::Start(a) => {
            let input = match (&a.input, &a.input_file) {
                (Some(t), _) => Some(parse_input(t, "--input")?),
                (None, Some(f)) => {
                    let text = std::fs::read_to_string(f)
                        .map_err(|e| Failure::new(exit::INVALID, format!("{}: {e}", f.display())))?;
                    Some(parse_input(&text, &f.display().to_string())?)
                }
                (None, None) => None,
            };
            let body = json!({"workflow": a.workflow, "version": a.version, "input": input, "id": a.id});
            let path = if a.wait && as_json {
                format!("/v1/runs?wait={}", a.timeout)
            } else {
                "/v1/runs".into()
            };
            let v: StartReply = call_as(&client, Method::POST, &path, Some(body.to_string())).await?;
            if as_json {
                print_json(&v);
            } else if a.wait {
                // The id at once, then each step as it goes (on stderr: stdout keeps the result
                // scripts read), as `temporal workflow execute` does.
                let id = v.run_id.clone();
                eprintln!("run {id} started ({} v{})", v.workflow, v.version);
                // Bounded, so no --timeout can overflow the clock's arithmetic.
                let longest = Duration::from_secs(10 * 365 * 86_400);
                let limit = Duration::try_from_secs_f64(a.timeout).map_or(longest, |d| d.min(longest));
                let deadline = tokio::time::Instant::now() + limit;
                let mut print = |e: &HistoryRow| {
                    if let Some(line) = progress_line(e) {
                        eprintln!("{line}");
                    }
                };
                follow_run(&client, &id, 0, Some(deadline), &mut print).await?;
                let path = format!("/v1/runs/{id}/wait?timeout=0.001");
                let v: RunReply = call_as(&client, Method::GET, &path, None).await?;
                print_result(&v);
                return Ok(run_exit(v.status));
            } else {
                let note = match (v.created, v.same_input) {
                    (false, Some(true)) => " (already existed, same input; nothing new started)",
                    (false, _) => " (already existed; nothing new started)",
                    _ => "",
                };
                println!("{}{note}", v.run_id);
            }
            Ok(match v.status {
                Some(status) if a.wait => run_exit(status),
                _ => exit::OK,
            })
        }
        Cmd::List { status, limit, offline } => {
            let v = if offline {
                open_offline(data_dir)?
                    .list(status.as_deref(), limit)
                    .map_err(offline_failure)?
            } else {
                let mut path = format!("/v1/runs?limit={limit}");
                if let Some(st) = status {
                    path.push_str(&format!("&status={st}"));
                }
                call_as(&client, Method::GET, &path, None).await?
            };
            show(&v, as_json, |v: &Vec<RunReply>| {
                let rows: Vec<Vec<String>> = v
                    .iter()
                    .map(|r| {
                        vec![
                            r.run_id.clone(),
                            format!("{}@{}", r.workflow, r.version),
                            r.status.as_str().to_string(),
                            r.created_at.clone(),
                            ms(r.duration_ms),
                            r.waiting.clone().unwrap_or_default(),
                        ]
                    })
                    .collect();
                table(
                    &["RUN", "WORKFLOW", "STATUS", "STARTED", "DURATION", "WAITING ON"],
                    &rows,
                );
            });
            Ok(exit::OK)
        }
        Cmd::Show {
            run,
            history,
            follow,
            offline,
        } => {
            let v = if offline {
                open_offline(data_dir)?.show(&run).map_err(offline_failure)?
            } else {
                call_as::<RunDetail>(&client, Method::GET, &format!("/v1/runs/{run}"), None).await?
            };
            let last_seq = v.history.iter().map(|e| e.seq).max().unwrap_or(0);
            if as_json {
                print_json(&v);
                if follow {
                    let mut print = |e: &HistoryRow| println!("{}", serde_json::to_string(e).unwrap_or_default());
                    follow_run(&client, &run, last_seq, None, &mut print).await?;
                }
                return Ok(exit::OK);
            }
            println!("run:       {}", v.run_id);
            println!("workflow:  {} v{}", v.workflow, v.version);
            println!("status:    {}", v.status.as_str());
            println!("started:   {}", v.created_at);
            if let Some(t) = &v.finished_at {
                println!("finished:  {t}");
            }
            println!(
                "duration:  {} ({})",
                ms(v.duration_ms),
                outpost_shared::count(v.events as u64, "event")
            );
            println!("input:     {}", v.input);
            if let Some(w) = &v.waiting {
                println!("waiting:   {w}");
            }
            if !v.output.is_null() {
                println!("output:    {}", v.output);
            }
            if let Some(e) = &v.error {
                println!("error:     {}: {}", e.kind, e.message);
            }
            println!();
            let rows: Vec<Vec<String>> = v.steps.iter().map(step_line).collect();
            table(
                &["STEP", "ACTION", "STATUS", "ATTEMPTS", "DURATION", "OUTPUT / ERROR"],
                &rows,
            );
            if history {
                println!();
                let rows: Vec<Vec<String>> = v
                    .history
                    .iter()
                    .map(|e| {
                        vec![
                            e.seq.to_string(),
                            e.at.clone(),
                            e.kind.clone(),
                            e.step.clone().unwrap_or_default(),
                            Value::Object(e.detail.clone()).to_string(),
                        ]
                    })
                    .collect();
                table(&["SEQ", "AT", "EVENT", "STEP", "DETAIL"], &rows);
            }
            if follow && v.status.is_pending() {
                println!("\nfollowing run {run} (Ctrl-C stops)…");
                let mut print = |e: &HistoryRow| {
                    if let Some(line) = progress_line(e) {
                        println!("{line}");
                    }
                };
                follow_run(&client, &run, last_seq, None, &mut print).await?;
                let path = format!("/v1/runs/{run}/wait?timeout=0.001");
                let v: RunReply = call_as(&client, Method::GET, &path, None).await?;
                print_result(&v);
            }
            Ok(exit::OK)
        }
        Cmd::Wait { run, timeout } => {
            let path = format!("/v1/runs/{run}/wait?timeout={timeout}");
            let v: RunReply = call_as(&client, Method::GET, &path, None).await?;
            show(&v, as_json, print_result);
            Ok(run_exit(v.status))
        }
        Cmd::Cancel { run, reason } => {
            let body = json!({"reason": reason}).to_string();
            let v: RunReply = call_as(&client, Method::POST, &format!("/v1/runs/{run}/cancel"), Some(body)).await?;
            show(&v, as_json, |v| println!("run {} {}", v.run_id, v.status.as_str()));
            Ok(exit::OK)
        }
        Cmd::Terminate { run, reason } => {
            let body = json!({"reason": reason}).to_string();
            let path = format!("/v1/runs/{run}/terminate");
            let v: RunReply = call_as(&client, Method::POST, &path, Some(body)).await?;
            show(&v, as_json, |v| println!("run {} {}", v.run_id, v.status.as_str()));
            Ok(exit::OK)
        }
        Cmd::Retry { run, by } => {
            let body = json!({"by": by.unwrap_or_else(current_user)}).to_string();
            let v: RunReply = call_as(&client, Method::POST, &format!("/v1/runs/{run}/retry"), Some(body)).await?;
            show(&v, as_json, |v| {
                println!("run {} {} (retried)", v.run_id, v.status.as_str())
            });
            Ok(exit::OK)
        }
        Cmd::Signal {
            run,
            name,
            payload,
            id,
            strict,
        } => {
            let payload: Value = serde_json::from_str(&payload)
                .map_err(|e| Failure::new(exit::INVALID, format!("--payload is not JSON: {e}")))?;
            let body = json!({"name": name, "payload": payload, "id": id, "strict": strict}).to_string();
            let v: SignalReply = call_as(&client, Method::POST, &format!("/v1/runs/{run}/signal"), Some(body)).await?;
            if !v.awaited {
                let can = if v.receivable.is_empty() {
                    "no signals".to_string()
                } else {
                    v.receivable.join(", ")
                };
                eprintln!(
                    "warning: no step of run {run} waits for signal '{name}' (it can receive: {can}); \
                     it is kept in case one does. Use --strict to refuse such signals."
                );
            }
            show(&v, as_json, |v| {
                let what = if v.accepted {
                    "delivered"
                } else {
                    "already received (ignored)"
                };
                println!("signal '{}' to run {}: {what}", v.signal, v.run_id);
            });
            Ok(exit::OK)
        }
        Cmd::Approve {
            run,
            step,
            reject,
            comment,
            id,
        } => {
            // The agent records the decision as local:<the Unix user calling its socket>.
            let body = json!({"step": step, "approved": !reject, "comment": comment, "id": id}).to_string();
            let v: ApproveReply =
                call_as(&client, Method::POST, &format!("/v1/runs/{run}/approve"), Some(body)).await?;
            show(&v, as_json, |v| {
                let what = if v.approved { "approved" } else { "rejected" };
                let dup = if v.duplicate { " (repeat ignored)" } else { "" };
                println!("step '{}' of run {}: {what}{dup}", v.step, v.run_id);
            });
            Ok(exit::OK)
        }
        Cmd::Status => {
            let v: StatusView = call_as(&client, Method::GET, "/v1/status", None).await?;
            show(&v, as_json, print_status);
            Ok(exit::OK)
        }
        Cmd::Definitions => {
            let v: Vec<DefinitionRow> = call_as(&client, Method::GET, "/v1/definitions", None).await?;
            show(&v, as_json, |v: &Vec<DefinitionRow>| {
                let rows: Vec<Vec<String>> = v
                    .iter()
                    .map(|d| {
                        vec![
                            d.name.clone(),
                            d.version.to_string(),
                            d.steps.to_string(),
                            d.applied_at.clone(),
                        ]
                    })
                    .collect();
                table(&["NAME", "VERSION", "STEPS", "APPLIED"], &rows);
            });
            Ok(exit::OK)
        }
        Cmd::Run(_)
        | Cmd::Validate { .. }
        | Cmd::Bench(_)
        | Cmd::ModbusSim(_)
        | Cmd::JournalCheck { .. }
        | Cmd::Keygen { .. }
        | Cmd::Enroll { .. } => Ok(exit::OK),
        #[cfg(feature = "opcua-sim")]
        Cmd::OpcuaSim(_) => Ok(exit::OK),
    }
}

/// One row of `show`'s step table.
pub(super) fn step_line(st: &StepRow) -> Vec<String> {
    let detail = match (&st.error, &st.output) {
        (Some(e), _) => format!("{}: {}", e.kind, e.message),
        (None, Value::Null) => String::new(),
        (None, out) => out.to_string(),
    };
    let detail = match &st.next_retry_at {
        Some(t) => format!("retry at {t}; {detail}"),
        None => detail,
    };
    let status = match st.compensation {
        Some(CompensationStatus::Compensated) => format!("{}, compensated", st.status.as_str()),
        Some(CompensationStatus::Compensating) => format!("{}, compensating", st.status.as_str()),
        Some(c) => format!("{}, compensation {}", st.status.as_str(), c.as_str()),
        None => st.status.as_str().to_string(),
    };
    let duration = st.duration_ms.map(ms).unwrap_or_default();
    vec![
        st.id.clone(),
        st.action.clone(),
        status,
        st.attempts.to_string(),
        duration,
        detail,
    ]
}

/// `outpost status` for a person: a line per subsystem.
fn print_status(v: &StatusView) {
    println!("agent:       outpost {} (pid {})", v.version, v.pid);
    let runs = &v.limits.runs;
    println!(
        "runs:        {} active ({} parked) (limit {}), {} queued (queue {}, when full: {})",
        v.active_runs,
        v.parked_runs,
        runs.limit.map(|n| n.to_string()).unwrap_or_else(|| "none".into()),
        runs.queued,
        runs.queue_limit,
        runs.when_full
    );
    println!(
        "activities:  {} running, limit {}",
        v.activities.running, v.activities.limit
    );
    for (what, list) in [
        ("workflow", &v.limits.workflows),
        ("action", &v.limits.actions),
        ("resource", &v.limits.resources),
    ] {
        for l in list {
            println!(
                "  {what} {}: {} of {} in use, {} waiting",
                l.name, l.in_use, l.limit, l.waiting
            );
        }
    }
    let j = &v.journal;
    println!(
        "journal:     {:.1} MB file, next seq {}, {} commits, {} events, {} appends since start",
        j.file_bytes as f64 / 1e6,
        j.next_seq,
        j.commits,
        j.events,
        j.ops
    );
    if let Some(e) = &j.storage_error {
        println!(
            "journal:     CANNOT WRITE since {}: {} ({} runs blocked; they go on once the journal can be written — free disk space)",
            e.since, e.error, e.blocked_runs
        );
    }
    println!("sync:        {}", sync_line(v.sync.as_ref()));
    let t = &v.triggers;
    if t.schedules + t.mqtt + t.directories == 0 {
        println!("triggers:    none (definitions declare schedules and triggers)");
    } else {
        println!(
            "triggers:    {}, {}, {}",
            outpost_shared::count(t.schedules as u64, "schedule"),
            outpost_shared::count(t.mqtt as u64, "MQTT trigger"),
            outpost_shared::count(t.directories as u64, "watched directory")
        );
    }
    let devices: Vec<String> = v
        .equipment
        .devices
        .iter()
        .map(|d| format!("{} ({})", d.name, d.kind))
        .collect();
    if devices.is_empty() {
        println!("equipment:   none (--equipment FILE configures devices)");
    } else {
        println!(
            "equipment:   {}: {}",
            outpost_shared::count(devices.len() as u64, "device"),
            devices.join(", ")
        );
    }
    for b in &v.breakers {
        println!(
            "breaker:     {} {}{} ({} consecutive failures{})",
            b.target,
            b.state,
            b.open_until.as_ref().map(|t| format!(" until {t}")).unwrap_or_default(),
            b.consecutive_failures,
            b.last_error
                .as_ref()
                .map(|e| format!("; last: {e}"))
                .unwrap_or_default()
        );
    }
    if let Some(r) = &v.retention {
        println!(
            "retention:   last pass {}, deleted {} ({})",
            r.last_at,
            outpost_shared::count(r.runs_deleted, "run"),
            outpost_shared::count(r.events_deleted, "event")
        );
    }
    println!(
        "timers:      {} pending{}",
        v.timers.pending,
        v.timers
            .next_at
            .as_ref()
            .map(|t| format!(", next at {t}"))
            .unwrap_or_default()
    );
}
