//! `outpost run`: its arguments mapped to `daemon::DaemonOptions`, the daemon started and served,
//! and the exit code it ends with.

use super::*;

pub(super) fn host_name() -> String {
    let host = std::fs::read_to_string("/etc/hostname").unwrap_or_default();
    let host = host.trim();
    if host.is_empty() {
        "agent".into()
    } else {
        host.to_string()
    }
}

/// `outpost-HOSTNAME`: stable across restarts, distinct per gateway.
pub(super) fn default_client_id() -> String {
    format!("outpost-{}", host_name())
}

/// Checks the journal in a child process (`outpost journal-check`) before this process opens it:
/// redb panics on some damaged files, and with `panic = "abort"` that would be a crash loop under
/// systemd. Falls back to checking in-process when the binary cannot run itself (qemu-user).
pub(super) fn check_journal_first(file: &Path) -> Result<(), String> {
    if !file.exists() {
        return Ok(());
    }
    let out = std::env::current_exe().and_then(|exe| {
        std::process::Command::new(exe)
            .arg("journal-check")
            .arg("--file")
            .arg(file)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .output()
    });
    match out {
        Ok(o) if o.status.success() => Ok(()),
        Ok(o) => {
            use std::os::unix::process::ExitStatusExt;
            let text = String::from_utf8_lossy(&o.stderr);
            let said = text.lines().find_map(|l| l.strip_prefix("error: ")).map(str::trim);
            match (o.status.signal(), said) {
                (Some(sig), _) => Err(format!("reading it crashed the check (signal {sig})")),
                (None, Some(said)) => Err(format!("the check said: {}", outpost_shared::protocol::clip(said, 300))),
                (None, None) if text.contains("panicked") => {
                    Err(format!("reading it crashed the check ({})", o.status))
                }
                // Neither an answer nor a crash: the check did not run (an emulator's binfmt
                // without the target's libraries exits 127). Check here instead.
                (None, None) => {
                    warn!(status = %o.status, "the journal check could not run in a child process; checking here");
                    crate::journal::verify(file).map(drop).map_err(|e| e.to_string())
                }
            }
        }
        Err(e) => {
            warn!(error = %e, "cannot run the journal check in a child process; checking here");
            crate::journal::verify(file).map(drop).map_err(|e| e.to_string())
        }
    }
}

pub(super) fn identity_options(args: &RunArgs) -> crate::identity::IdentityOptions {
    crate::identity::IdentityOptions {
        ca: args.ca.clone(),
        cert: args.cert.clone(),
        key: args.key.clone(),
        fleet_key: args.fleet_key.clone(),
        insecure_plaintext: args.insecure_plaintext,
        insecure_unsigned: args.insecure_unsigned,
    }
}

pub(super) fn run_daemon(data_dir: &Path, socket: &Path, args: RunArgs) -> Result<u8, Failure> {
    init_tracing();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.worker_threads.max(1))
        .max_blocking_threads(8)
        .enable_all()
        .build()
        .map_err(|e| Failure::new(exit::FAILURE, format!("cannot start the async runtime: {e}")))?;
    rt.block_on(daemon(data_dir, socket, args))
}

pub(super) async fn daemon(data_dir: &Path, socket: &Path, args: RunArgs) -> Result<u8, Failure> {
    let opts = daemon_options(data_dir, socket, &args)?;
    let journal_file = data_dir.join("journal.redb");
    if let Err(why) = check_journal_first(&journal_file) {
        return Err(Failure::new(
            exit::FAILURE,
            format!(
                "the journal {0} is damaged: {why}\n  stop every outpost using it, move it aside with its log (mv {0} {0}.damaged; \
                 mv {1} {1}.damaged; keep them for forensics) and start again with an empty journal; runs and events not \
                 yet synced to the cloud are only in the damaged files (`outpost journal-check --file FILE` checks a file)",
                journal_file.display(),
                crate::journal::log_path(&journal_file).display()
            ),
        ));
    }
    let start_input = match &args.input {
        Some(t) => Some(parse_input(t, "--input")?),
        None => None,
    };
    let mut daemon = crate::daemon::Daemon::start(opts).await.map_err(daemon_failure)?;
    if let Some(workflow) = args.start.clone() {
        let runtime = daemon.runtime().clone();
        let once = args.once;
        let stop_tx = daemon.stopper();
        daemon.spawn("start", async move {
            let code = match runtime
                .start(StartRequest {
                    workflow,
                    input: start_input,
                    ..Default::default()
                })
                .await
            {
                Ok(r) => {
                    info!(run_id = %r.run_id, "started run; follow it with `outpost show {}`", r.run_id);
                    match runtime.wait(&r.run_id, None).await {
                        Ok((rec, _)) => {
                            let detail = crate::api::run_detail(&runtime, &r.run_id, &rec).ok();
                            let out = json!({
                                "run_id": r.run_id,
                                "status": rec.status.as_str(),
                                "output": detail.as_ref().map(|d| d.output.clone()),
                                "error": detail.as_ref().map(|d| d.error.clone()),
                            });
                            println!("{out}");
                            run_exit(rec.status.into())
                        }
                        Err(e) => {
                            error!(error = %e, "waiting for the run");
                            exit::FAILURE
                        }
                    }
                }
                Err(e) => {
                    error!(error = %e, "cannot start the --start run; stopping");
                    // Keeping a daemon up whose one asked-for run never started would hide
                    // the mistake behind a healthy-looking service.
                    let _ = stop_tx.send(Some(start_error_exit(&e)));
                    return;
                }
            };
            if once {
                let _ = stop_tx.send(Some(code));
            }
        });
    }
    let code = daemon.serve().await.map_err(daemon_failure)?;
    Ok(code.unwrap_or(exit::OK))
}

pub(super) fn daemon_failure(e: crate::daemon::DaemonError) -> Failure {
    use crate::daemon::DaemonError as E;
    let code = match &e {
        E::Apply { .. } => exit::INVALID,
        E::SocketInUse(_) => exit::CONFLICT,
        E::Journal { .. } | E::Failed(_) => exit::FAILURE,
    };
    Failure::new(code, e.to_string())
}

/// Maps `outpost run`'s arguments to the daemon's options, checking each (a bad device id,
/// broker address, identity or policy is refused before the journal is opened).
pub(super) fn daemon_options(
    data_dir: &Path,
    socket: &Path,
    args: &RunArgs,
) -> Result<crate::daemon::DaemonOptions, Failure> {
    let runtime = RuntimeConfig {
        max_activities: args.max_activities,
        journal: JournalConfig {
            cache_bytes: args.cache_mb.max(1) * 1024 * 1024,
            linger: args.commit_linger.into(),
            log_bytes: args.journal_log_kb.saturating_mul(1024),
            ..JournalConfig::default()
        },
        limits: LimitsConfig {
            max_runs: args.max_runs,
            queue: args.queue,
            when_full: args.when_full,
            actions: args.limit.iter().cloned().collect(),
            resources: args.resource.iter().cloned().collect(),
        },
        breakers: crate::breaker::BreakerConfig {
            threshold: args.breaker_threshold.max(1),
            cooldown: args.breaker_cooldown.into(),
            ..crate::breaker::BreakerConfig::default()
        },
        park_after: Some(Duration::from(args.park_after)).filter(|d| !d.is_zero()),
    };
    let equipment = args.equipment.as_deref().map(load_equipment).transpose()?;
    if let Some(eq) = &equipment {
        info!(devices = ?eq.names(), "equipment ready");
    }
    // Tests reset a running agent's wall clock through this file (see `FileOffsetClock`).
    #[cfg(feature = "test-clock")]
    let clock: Arc<dyn crate::clock::Clock> = match std::env::var_os("OUTPOST_CLOCK_OFFSET_FILE") {
        Some(path) => Arc::new(crate::clock::FileOffsetClock::watch(path.into())),
        None => Arc::new(crate::clock::SystemClock),
    };
    #[cfg(not(feature = "test-clock"))]
    let clock: Arc<dyn crate::clock::Clock> = Arc::new(crate::clock::SystemClock);
    let apply = args
        .apply
        .iter()
        .map(|f| Ok((f.clone(), read_document(f)?)))
        .collect::<Result<Vec<_>, Failure>>()?;
    let sync = match &args.broker {
        Some(url) => Some(sync_config(data_dir, args, url, equipment.clone(), clock.clone())?),
        None => None,
    };
    let mqtt_triggers = match &args.mqtt_broker {
        Some(url) => Some(mqtt_trigger_config(data_dir, args, url)?),
        None => None,
    };
    Ok(crate::daemon::DaemonOptions {
        data_dir: data_dir.to_path_buf(),
        socket: socket.to_path_buf(),
        runtime,
        clock,
        equipment,
        apply,
        metrics_listen: args.metrics_listen,
        retention: crate::retention::RetentionConfig {
            keep_for: args.retention.into(),
            max_bytes: args.retention_max_mb.saturating_mul(1024 * 1024),
            every: args.prune_interval.into(),
        },
        sync,
        mqtt_triggers,
    })
}

/// Sync's configuration from `--broker` and the identity, policy and sync options.
pub(super) fn sync_config(
    data_dir: &Path,
    args: &RunArgs,
    url: &str,
    equipment: Option<Arc<crate::equipment::Equipment>>,
    clock: Arc<dyn crate::clock::Clock>,
) -> Result<crate::sync::SyncConfig, Failure> {
    let device = args.device_id.clone().unwrap_or_else(host_name);
    if !outpost_shared::protocol::valid_device_id(&device) {
        return Err(Failure::new(
            exit::INVALID,
            format!("device id '{device}' must be 1-64 letters, digits, '-', '_' or '.' (--device-id)"),
        ));
    }
    let broker = broker_url(url, "--broker")?;
    let security = crate::identity::Security::resolve(data_dir, &identity_options(args), &broker, clock)
        .map_err(|e| Failure::new(exit::INVALID, e))?;
    let mut config = crate::sync::SyncConfig::new(broker.host, broker.port, device);
    config.security = Arc::new(security);
    if let Some(p) = &args.policy {
        let policy = crate::policy::Policy::load(p).map_err(|e| Failure::new(exit::INVALID, e))?;
        info!(policy = %p.display(), exec_rules = policy.exec.len(), "policy for deployed definitions loaded");
        config.policy = Arc::new(policy);
    }
    config.prefix = args.sync_prefix.clone();
    config.labels = args.label.clone();
    config.outbox_max_events = args.outbox_max_events;
    config.drain_rate = args.drain_rate;
    config.equipment = equipment
        .as_ref()
        .map(|eq| {
            eq.names()
                .into_iter()
                .map(|n| {
                    let kind = eq.kind_of(&n).unwrap_or("device").to_string();
                    (n, kind)
                })
                .collect()
        })
        .unwrap_or_default();
    config.desired = crate::desired::DesiredConfig {
        remediation: args.remediation.clone(),
        equipment,
        verify_every: Some(args.verify_every).filter(|d| !d.is_zero()),
        on_drift: args.on_drift,
    };
    Ok(config)
}

/// The MQTT triggers' broker from `--mqtt-broker` (TLS with the gateway's identity by default).
pub(super) fn mqtt_trigger_config(
    data_dir: &Path,
    args: &RunArgs,
    url: &str,
) -> Result<crate::trigger::MqttTriggerConfig, Failure> {
    let id = args.mqtt_client_id.clone().unwrap_or_else(default_client_id);
    let b = broker_url(url, "--mqtt-broker")?;
    outpost_shared::tls::check_plaintext(&b, args.insecure_plaintext, "--mqtt-broker")
        .map_err(|e| Failure::new(exit::INVALID, e))?;
    let tls = if b.tls {
        let ident = crate::identity::identity_dir(data_dir);
        let files = outpost_shared::tls::TlsFiles {
            ca: args.ca.clone().unwrap_or_else(|| ident.join("ca.crt")),
            cert: args
                .cert
                .clone()
                .or_else(|| Some(ident.join("device.crt")).filter(|p| p.exists())),
            key: args
                .key
                .clone()
                .or_else(|| Some(ident.join("device.key")).filter(|p| p.exists())),
        };
        Some(
            outpost_shared::tls::client_config(&files)
                .map_err(|e| Failure::new(exit::INVALID, format!("--mqtt-broker: {e}")))?,
        )
    } else {
        None
    };
    Ok(crate::trigger::MqttTriggerConfig {
        host: b.host,
        port: b.port,
        client_id: id,
        tls,
    })
}

/// The exit code for a start the runtime refused: the same code `outpost start` gives when the
/// API refuses it for that reason.
pub(super) fn start_error_exit(e: &crate::runtime::RuntimeError) -> u8 {
    use crate::runtime::RuntimeError as E;
    match e {
        E::NoSuchWorkflow { .. } | E::NoSuchRun(_) => exit::NOT_FOUND,
        E::Invalid(_) | E::Definition(_) => exit::INVALID,
        E::Busy(_) => exit::BUSY,
        E::Finished { .. } | E::WrongState(_) => exit::CONFLICT,
        E::Journal(_) | E::DataDir { .. } => exit::FAILURE,
    }
}
