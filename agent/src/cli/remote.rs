//! The commands that talk to a running agent over its socket (or read the journal offline),
//! and how their replies are printed.

use super::*;

/// Turns an error answer of the API into a failure with the matching exit code.
pub(super) fn api_failure(status: StatusCode, body: &Value) -> Failure {
    let code = match status.as_u16() {
        400 | 413 | 422 => exit::INVALID,
        404 => exit::NOT_FOUND,
        409 => exit::CONFLICT,
        429 => exit::BUSY,
        _ => exit::FAILURE,
    };
    let err = &body["error"];
    let mut msg = err["message"]
        .as_str()
        .map(str::to_string)
        .unwrap_or_else(|| format!("{status}: {body}"));
    if let Some(problems) = err["problems"].as_array() {
        for p in problems {
            msg.push_str(&format!("\n  - {}", p.as_str().unwrap_or_default()));
        }
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

/// Exit code for a finished (or not) run.
pub(super) fn run_exit(status: &str) -> u8 {
    match status {
        "completed" => exit::OK,
        "running" | "queued" => exit::STILL_RUNNING,
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
    emit: &mut dyn FnMut(&Value),
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
        let v = call(client, Method::GET, &path, None).await?;
        for e in v["events"].as_array().into_iter().flatten() {
            emit(e);
        }
        after = v["last_seq"].as_u64().unwrap_or(after);
        let ended = !matches!(v["status"].as_str(), Some("running" | "queued"));
        if ended || deadline.is_some_and(|d| tokio::time::Instant::now() >= d) {
            return Ok(());
        }
    }
}

/// The sync subsystem in one line: the link, the acknowledged sequence, the backlog, the last error.
pub(super) fn sync_line(sync: &Value) -> String {
    if sync.is_null() {
        return "off (no --broker; runs are kept only here)".into();
    }
    let link = if sync["connected"] == true {
        format!("connected to {}", s(&sync["broker"]))
    } else {
        format!("DISCONNECTED from {} (retrying)", s(&sync["broker"]))
    };
    let mut line = format!(
        "{link}, acknowledged through seq {}, backlog {}",
        sync["acked_seq"],
        outpost_shared::count(sync["backlog_events"].as_u64().unwrap_or(0), "event")
    );
    if let Some(e) = sync["last_error"].as_object() {
        line.push_str(&format!(
            "; last error {}: {}",
            e.get("at").map(s).unwrap_or_default(),
            e.get("error").map(s).unwrap_or_default()
        ));
    }
    line
}

/// One line for a human following a run, or `None` for events the final result covers.
pub(super) fn progress_line(e: &Value) -> Option<String> {
    let step = s(&e["step"]);
    let what = match s(&e["type"]).as_str() {
        "attempt_started" => match e["attempt"].as_u64() {
            Some(n) if n > 1 => format!("step {step} retrying (attempt {n})"),
            _ => format!("step {step} started"),
        },
        "attempt_failed" => format!(
            "step {step} attempt {} failed: {}",
            e["attempt"],
            s(&e["error"]["message"])
        ),
        "attempt_deferred" => format!("step {step} held back: {} is failing (circuit open)", s(&e["target"])),
        "step_completed" => format!("step {step} completed"),
        "step_failed" => format!("step {step} failed: {}", s(&e["error"]["message"])),
        "step_skipped" => format!("step {step} skipped"),
        "timer_set" => format!("step {step} sleeping"),
        "wait_started" => match s(&e["signal"]) {
            sig if sig.starts_with("approval:") => format!("step {step} waits for approval"),
            sig => format!("step {step} waits for signal '{sig}'"),
        },
        "signal_received" => format!("signal '{}' received", s(&e["name"])),
        "compensation_started" => format!("compensating: {}", s(&e["error"]["message"])),
        "step_compensated" => format!("step {step} compensated"),
        "compensation_failed" => format!("step {step} compensation failed"),
        "run_retried" => format!("retried by {}", s(&e["by"])),
        _ => return None,
    };
    // `at` is RFC 3339; the time of day is what a person following along wants.
    let at = s(&e["at"]);
    let clock = at.get(11..19).unwrap_or(&at);
    Some(format!("{clock}  {what}"))
}

pub(super) fn print_result(v: &Value) {
    println!("run {} {}", s(&v["run_id"]), s(&v["status"]));
    if !v["waiting"].is_null() {
        println!("waiting: {}", s(&v["waiting"]));
    }
    if !v["output"].is_null() {
        println!("output: {}", v["output"]);
    }
    if !v["error"].is_null() {
        println!("error: {}: {}", s(&v["error"]["kind"]), s(&v["error"]["message"]));
    }
}

/// The journal of `data_dir`, opened read-only for `--offline`.
pub(super) fn open_offline(data_dir: &Path) -> Result<crate::offline::Offline, Failure> {
    let path = data_dir.join("journal.redb");
    let note = || {
        eprintln!(
            "note: {} was not closed cleanly (the agent was killed or lost power); reading a repaired copy, the file itself is untouched",
            path.display()
        )
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
    api_failure(status, &body)
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
                let v = match answer {
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
                    let what = if v["created"].as_bool() == Some(true) {
                        "applied"
                    } else {
                        "unchanged"
                    };
                    println!(
                        "{what}: {} v{} ({}) from {}",
                        s(&v["name"]),
                        v["version"],
                        outpost_shared::count(v["steps"].as_u64().unwrap_or(0), "step"),
                        f.display()
                    );
                }
                let mut v = v;
                v["file"] = json!(f);
                v["ok"] = json!(true);
                out.push(v);
            }
            if as_json {
                print_json(&Value::Array(out));
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
            let v = call(&client, Method::POST, &path, Some(body.to_string())).await?;
            if as_json {
                print_json(&v);
            } else if a.wait {
                // The id at once, then each step as it goes (on stderr: stdout keeps the result
                // scripts read), as `temporal workflow execute` does.
                let id = s(&v["run_id"]).to_string();
                eprintln!("run {id} started ({} v{})", s(&v["workflow"]), v["version"]);
                // Bounded, so no --timeout can overflow the clock's arithmetic.
                let longest = Duration::from_secs(10 * 365 * 86_400);
                let limit = Duration::try_from_secs_f64(a.timeout).map_or(longest, |d| d.min(longest));
                let deadline = tokio::time::Instant::now() + limit;
                let mut print = |e: &Value| {
                    if let Some(line) = progress_line(e) {
                        eprintln!("{line}");
                    }
                };
                follow_run(&client, &id, 0, Some(deadline), &mut print).await?;
                let v = call(&client, Method::GET, &format!("/v1/runs/{id}/wait?timeout=0.001"), None).await?;
                print_result(&v);
                return Ok(run_exit(v["status"].as_str().unwrap_or("")));
            } else {
                let note = match (v["created"].as_bool(), v["same_input"].as_bool()) {
                    (Some(false), Some(true)) => " (already existed, same input; nothing new started)",
                    (Some(false), _) => " (already existed; nothing new started)",
                    _ => "",
                };
                println!("{}{note}", s(&v["run_id"]));
            }
            Ok(if a.wait {
                run_exit(v["status"].as_str().unwrap_or(""))
            } else {
                exit::OK
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
                call(&client, Method::GET, &path, None).await?
            };
            show(&v, as_json, |v| {
                let rows = rows_of(v, |r| {
                    vec![
                        s(&r["run_id"]),
                        format!("{}@{}", s(&r["workflow"]), r["version"]),
                        s(&r["status"]),
                        s(&r["created_at"]),
                        ms(&r["duration_ms"]),
                        s(&r["waiting"]),
                    ]
                });
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
                call(&client, Method::GET, &format!("/v1/runs/{run}"), None).await?
            };
            let last_seq = v["history"]
                .as_array()
                .and_then(|h| h.iter().filter_map(|e| e["seq"].as_u64()).max())
                .unwrap_or(0);
            if as_json {
                print_json(&v);
                if follow {
                    follow_run(&client, &run, last_seq, None, &mut |e| println!("{e}")).await?;
                }
                return Ok(exit::OK);
            }
            println!("run:       {}", s(&v["run_id"]));
            println!("workflow:  {} v{}", s(&v["workflow"]), v["version"]);
            println!("status:    {}", s(&v["status"]));
            println!("started:   {}", s(&v["created_at"]));
            if !v["finished_at"].is_null() {
                println!("finished:  {}", s(&v["finished_at"]));
            }
            println!(
                "duration:  {} ({})",
                ms(&v["duration_ms"]),
                outpost_shared::count(v["events"].as_u64().unwrap_or(0), "event")
            );
            println!("input:     {}", v["input"]);
            if !v["waiting"].is_null() {
                println!("waiting:   {}", s(&v["waiting"]));
            }
            if !v["output"].is_null() {
                println!("output:    {}", v["output"]);
            }
            if !v["error"].is_null() {
                println!("error:     {}: {}", s(&v["error"]["kind"]), s(&v["error"]["message"]));
            }
            println!();
            let steps: Vec<StepRow> = serde_json::from_value(v["steps"].clone()).unwrap_or_default();
            let rows: Vec<Vec<String>> = steps.iter().map(step_line).collect();
            table(
                &["STEP", "ACTION", "STATUS", "ATTEMPTS", "DURATION", "OUTPUT / ERROR"],
                &rows,
            );
            if history {
                println!();
                let rows = rows_of(&v["history"], |e| {
                    let mut rest = e.clone();
                    if let Some(o) = rest.as_object_mut() {
                        for k in ["seq", "at", "type", "step"] {
                            o.remove(k);
                        }
                    }
                    vec![
                        e["seq"].to_string(),
                        s(&e["at"]),
                        s(&e["type"]),
                        s(&e["step"]),
                        rest.to_string(),
                    ]
                });
                table(&["SEQ", "AT", "EVENT", "STEP", "DETAIL"], &rows);
            }
            if follow && matches!(v["status"].as_str(), Some("running" | "queued")) {
                println!("\nfollowing run {run} (Ctrl-C stops)…");
                let mut print = |e: &Value| {
                    if let Some(line) = progress_line(e) {
                        println!("{line}");
                    }
                };
                follow_run(&client, &run, last_seq, None, &mut print).await?;
                let v = call(
                    &client,
                    Method::GET,
                    &format!("/v1/runs/{run}/wait?timeout=0.001"),
                    None,
                )
                .await?;
                print_result(&v);
            }
            Ok(exit::OK)
        }
        Cmd::Wait { run, timeout } => {
            let v = call(
                &client,
                Method::GET,
                &format!("/v1/runs/{run}/wait?timeout={timeout}"),
                None,
            )
            .await?;
            show(&v, as_json, |v| {
                print_result(v);
            });
            Ok(run_exit(v["status"].as_str().unwrap_or("")))
        }
        Cmd::Cancel { run, reason } => {
            let body = json!({"reason": reason}).to_string();
            let v = call(&client, Method::POST, &format!("/v1/runs/{run}/cancel"), Some(body)).await?;
            show(&v, as_json, |v| {
                println!("run {} {}", s(&v["run_id"]), s(&v["status"]));
            });
            Ok(exit::OK)
        }
        Cmd::Terminate { run, reason } => {
            let body = json!({"reason": reason}).to_string();
            let v = call(&client, Method::POST, &format!("/v1/runs/{run}/terminate"), Some(body)).await?;
            show(&v, as_json, |v| println!("run {} {}", s(&v["run_id"]), s(&v["status"])));
            Ok(exit::OK)
        }
        Cmd::Retry { run, by } => {
            let body = json!({"by": by.unwrap_or_else(current_user)}).to_string();
            let v = call(&client, Method::POST, &format!("/v1/runs/{run}/retry"), Some(body)).await?;
            show(&v, as_json, |v| {
                println!("run {} {} (retried)", s(&v["run_id"]), s(&v["status"]))
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
            let v = call(&client, Method::POST, &format!("/v1/runs/{run}/signal"), Some(body)).await?;
            if v["awaited"] == false {
                let names: Vec<&str> = v["receivable"]
                    .as_array()
                    .map(|a| a.iter().filter_map(Value::as_str).collect())
                    .unwrap_or_default();
                let can = if names.is_empty() {
                    "no signals".to_string()
                } else {
                    names.join(", ")
                };
                eprintln!(
                    "warning: no step of run {run} waits for signal '{name}' (it can receive: {can}); \
                     it is kept in case one does. Use --strict to refuse such signals."
                );
            }
            show(&v, as_json, |v| {
                let what = if v["accepted"] == true {
                    "delivered"
                } else {
                    "already received (ignored)"
                };
                println!("signal '{}' to run {}: {what}", s(&v["signal"]), s(&v["run_id"]));
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
            let v = call(&client, Method::POST, &format!("/v1/runs/{run}/approve"), Some(body)).await?;
            show(&v, as_json, |v| {
                let what = if v["approved"] == true { "approved" } else { "rejected" };
                let dup = if v["duplicate"] == true {
                    " (repeat ignored)"
                } else {
                    ""
                };
                println!("step '{}' of run {}: {what}{dup}", s(&v["step"]), s(&v["run_id"]));
            });
            Ok(exit::OK)
        }
        Cmd::Status => {
            let v = call(&client, Method::GET, "/v1/status", None).await?;
            show(&v, as_json, |v| {
                println!("agent:       outpost {} (pid {})", s(&v["version"]), v["pid"]);
                let runs = &v["limits"]["runs"];
                println!(
                    "runs:        {} active (limit {}), {} queued (queue {}, when full: {})",
                    v["active_runs"],
                    runs["limit"]
                        .as_u64()
                        .map(|n| n.to_string())
                        .unwrap_or_else(|| "none".into()),
                    runs["queued"],
                    runs["queue_limit"],
                    s(&runs["when_full"])
                );
                println!(
                    "activities:  {} running, limit {}",
                    v["activities"]["running"], v["activities"]["limit"]
                );
                for (what, key) in [
                    ("workflow", "workflows"),
                    ("action", "actions"),
                    ("resource", "resources"),
                ] {
                    for l in v["limits"][key].as_array().into_iter().flatten() {
                        println!(
                            "  {what} {}: {} of {} in use, {} waiting",
                            s(&l["name"]),
                            l["in_use"],
                            l["limit"],
                            l["waiting"]
                        );
                    }
                }
                let j = &v["journal"];
                println!(
                    "journal:     {:.1} MB file, next seq {}, {} commits, {} events, {} appends since start",
                    j["file_bytes"].as_f64().unwrap_or(0.0) / 1e6,
                    j["next_seq"],
                    j["commits"],
                    j["events"],
                    j["ops"]
                );
                let e = &j["storage_error"];
                if !e.is_null() {
                    println!(
                        "journal:     CANNOT WRITE since {}: {} ({} runs blocked; they go on once the journal can be written — free disk space)",
                        s(&e["since"]),
                        s(&e["error"]),
                        e["blocked_runs"]
                    );
                }
                println!("sync:        {}", sync_line(&v["sync"]));
                let t = &v["triggers"];
                let n = |k: &str| t[k].as_u64().unwrap_or(0);
                if n("schedules") + n("mqtt") + n("directories") == 0 {
                    println!("triggers:    none (definitions declare schedules and triggers)");
                } else {
                    println!(
                        "triggers:    {}, {}, {}",
                        outpost_shared::count(n("schedules"), "schedule"),
                        outpost_shared::count(n("mqtt"), "MQTT trigger"),
                        outpost_shared::count(n("directories"), "watched directory")
                    );
                }
                let devices: Vec<String> = v["equipment"]["devices"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|d| format!("{} ({})", s(&d["name"]), s(&d["kind"])))
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
                for b in v["breakers"].as_array().into_iter().flatten() {
                    println!(
                        "breaker:     {} {}{} ({} consecutive failures{})",
                        s(&b["target"]),
                        s(&b["state"]),
                        b["open_until"]
                            .as_str()
                            .map(|t| format!(" until {t}"))
                            .unwrap_or_default(),
                        b["consecutive_failures"],
                        b["last_error"]
                            .as_str()
                            .map(|e| format!("; last: {e}"))
                            .unwrap_or_default()
                    );
                }
                if let Some(r) = v["retention"].as_object() {
                    println!(
                        "retention:   last pass {}, deleted {} ({})",
                        s(&r["last_at"]),
                        outpost_shared::count(r["runs_deleted"].as_u64().unwrap_or(0), "run"),
                        outpost_shared::count(r["events_deleted"].as_u64().unwrap_or(0), "event")
                    );
                }
                println!(
                    "timers:      {} pending{}",
                    v["timers"]["pending"],
                    v["timers"]["next_at"]
                        .as_str()
                        .map(|t| format!(", next at {t}"))
                        .unwrap_or_default()
                );
            });
            Ok(exit::OK)
        }
        Cmd::Definitions => {
            let v = call(&client, Method::GET, "/v1/definitions", None).await?;
            show(&v, as_json, |v| {
                let rows = rows_of(v, |d| {
                    vec![
                        s(&d["name"]),
                        d["version"].to_string(),
                        d["steps"].to_string(),
                        s(&d["applied_at"]),
                    ]
                });
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
    let duration = st.duration_ms.map(|d| ms(&Value::from(d))).unwrap_or_default();
    vec![
        st.id.clone(),
        st.action.clone(),
        status,
        st.attempts.to_string(),
        duration,
        detail,
    ]
}
