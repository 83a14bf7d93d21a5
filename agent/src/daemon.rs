//! The agent daemon's composition root: `DaemonOptions → Daemon::start() → Daemon::serve()`.
//!
//! The CLI maps its arguments to [`DaemonOptions`] (every option already parsed and checked);
//! this module opens the runtime, applies `--apply` documents, resumes runs, starts each
//! subsystem as a named task it owns ([`Tasks`]), binds the API socket and serves it until
//! SIGTERM, Ctrl-C or [`Daemon::stopper`]. Shutdown stops admitting (the API closes first), stops
//! every subsystem and waits for it, removes the socket and closes the journal last: runs in
//! flight are journaled, so they park and resume on the next start.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::sync::watch;
use tracing::{error, info, warn};

use crate::actions::Registry;
use crate::clock::Clock;
use crate::equipment::Equipment;
use crate::retention::RetentionConfig;
use crate::runtime::{Runtime, RuntimeConfig};
use crate::sync::SyncConfig;
use crate::tasks::Tasks;
use crate::trigger::MqttTriggerConfig;

/// Everything the daemon needs, already parsed and checked.
pub struct DaemonOptions {
    /// The data directory (journal, identity).
    pub data_dir: PathBuf,
    /// The API socket.
    pub socket: PathBuf,
    /// Runtime limits and the journal's cache.
    pub runtime: RuntimeConfig,
    /// The clock runs, timers and certificate checks use.
    pub clock: Arc<dyn Clock>,
    /// The equipment file's devices, when one was given.
    pub equipment: Option<Arc<Equipment>>,
    /// Documents to apply before anything starts: (file, text).
    pub apply: Vec<(PathBuf, String)>,
    /// Where to serve `/metrics`, if anywhere.
    pub metrics_listen: Option<SocketAddr>,
    /// Retention of finished runs.
    pub retention: RetentionConfig,
    /// Sync with cloud-sync, when `--broker` was given.
    pub sync: Option<SyncConfig>,
    /// The local broker for MQTT triggers, when `--mqtt-broker` was given.
    pub mqtt_triggers: Option<MqttTriggerConfig>,
}

/// Why the daemon could not start.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The journal cannot be opened.
    #[error(
        "cannot open the journal {file}: {reason}\n  if the file is damaged: stop every outpost using it, move it aside with its log (mv {file} {file}.damaged; the same for journal.log beside it) and start again with an empty journal; runs and events not yet synced to the cloud are only in the damaged files"
    )]
    Journal {
        /// The journal file.
        file: String,
        /// Why.
        reason: String,
    },
    /// An `--apply` document was refused.
    #[error("{file}: {reason}")]
    Apply {
        /// The document.
        file: String,
        /// Why.
        reason: String,
    },
    /// Another agent serves this socket.
    #[error("another agent is already listening on {0}")]
    SocketInUse(String),
    /// Anything else that stops the start (a port in use, a directory that cannot be made).
    #[error("{0}")]
    Failed(String),
}

/// A started daemon: the runtime, its subsystems and its bound API socket.
pub struct Daemon {
    runtime: Runtime,
    tasks: Tasks,
    listener: tokio::net::UnixListener,
    socket: PathBuf,
    stop: watch::Sender<Option<u8>>,
    // Held from the start: a `send` with no receiver would be dropped, and `--start` may send
    // before `serve` runs.
    stop_rx: watch::Receiver<Option<u8>>,
}

impl Daemon {
    /// Opens the runtime and starts every subsystem. On an error after the journal opened, the
    /// journal is closed before returning.
    pub async fn start(opts: DaemonOptions) -> Result<Daemon, DaemonError> {
        let registry = Registry::builtin().with_equipment(opts.equipment.clone());
        let runtime =
            Runtime::open_with(&opts.data_dir, opts.runtime.clone(), registry, opts.clock.clone()).map_err(|e| {
                DaemonError::Journal {
                    file: opts.data_dir.join("journal.redb").display().to_string(),
                    reason: e.to_string(),
                }
            })?;
        match Daemon::wire(runtime.clone(), opts).await {
            Ok(d) => Ok(d),
            Err(e) => {
                close_journal(&runtime).await;
                Err(e)
            }
        }
    }

    async fn wire(runtime: Runtime, opts: DaemonOptions) -> Result<Daemon, DaemonError> {
        for (file, text) in &opts.apply {
            let (def, applied) = runtime.apply(text).await.map_err(|e| DaemonError::Apply {
                file: file.display().to_string(),
                reason: e.to_string(),
            })?;
            info!(file = %file.display(), workflow = def.name(), version = def.version(), ?applied, "definition applied");
        }
        let resumed = runtime
            .resume_all()
            .await
            .map_err(|e| DaemonError::Failed(e.to_string()))?;
        let mut tasks = Tasks::new();
        let changed = || runtime.definitions_changed();
        tasks.spawn("schedules", crate::schedule::run(runtime.clone(), changed()));
        if let Some(addr) = opts.metrics_listen {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| DaemonError::Failed(format!("--metrics-listen {addr}: {e}")))?;
            let app = axum::Router::new()
                .route("/metrics", axum::routing::get(crate::api::metrics))
                .with_state(Arc::new(runtime.clone()));
            info!(%addr, "metrics on http://{addr}/metrics");
            tasks.spawn("metrics", async move {
                if let Err(e) = axum::serve(listener, app).await {
                    error!(error = %e, "metrics server stopped");
                }
            });
        }
        tasks.spawn("retention", crate::retention::run(runtime.clone(), opts.retention));
        tasks.spawn(
            "triggers.directory",
            crate::trigger::run_directories(runtime.clone(), changed()),
        );
        #[cfg(feature = "opcua")]
        tasks.spawn(
            "triggers.opcua",
            crate::trigger::opcua::run(runtime.clone(), changed(), opts.equipment.clone()),
        );
        if let Some(config) = opts.sync {
            crate::sync::start(runtime.clone(), config, &mut tasks)
                .await
                .map_err(|e| DaemonError::Failed(format!("cannot start sync: {e}")))?;
        }
        if let Some(config) = opts.mqtt_triggers {
            tasks.spawn(
                "triggers.mqtt",
                crate::trigger::run_mqtt(runtime.clone(), changed(), config),
            );
        }
        let listener = bind_socket(&opts.socket)?;
        info!(socket = %opts.socket.display(), data_dir = %opts.data_dir.display(), resumed, "outpost agent ready");
        runtime.trim_soon();
        let (stop, stop_rx) = watch::channel(None);
        Ok(Daemon {
            runtime,
            tasks,
            listener,
            socket: opts.socket,
            stop,
            stop_rx,
        })
    }

    /// The runtime (for work the caller adds, such as `--start`).
    pub fn runtime(&self) -> &Runtime {
        &self.runtime
    }

    /// Sends an exit code to stop the daemon with (`--once`, a `--start` that failed).
    pub fn stopper(&self) -> watch::Sender<Option<u8>> {
        self.stop.clone()
    }

    /// Adds a task the daemon owns and stops on shutdown.
    pub fn spawn(&mut self, name: &'static str, task: impl std::future::Future<Output = ()> + Send + 'static) {
        self.tasks.spawn(name, task);
    }

    /// Serves the API until SIGTERM, Ctrl-C or the stopper, then shuts down (see the module
    /// doc). Returns the stopper's code, if it sent one.
    pub async fn serve(self) -> Result<Option<u8>, DaemonError> {
        let Daemon {
            runtime,
            mut tasks,
            listener,
            socket,
            stop,
            mut stop_rx,
        } = self;
        let (down_tx, down_rx) = tokio::sync::oneshot::channel::<()>();
        // Supervises the subsystems until a stop is asked for, then hands them back.
        let supervisor = tokio::spawn(async move {
            let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                .map_err(|e| warn!(error = %e, "cannot listen for SIGTERM"))
                .ok();
            let terminated = async {
                match term.as_mut() {
                    Some(t) => {
                        t.recv().await;
                    }
                    None => std::future::pending().await,
                }
            };
            tokio::pin!(terminated);
            loop {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {
                        info!("interrupted; stopping (unfinished runs resume on next start)");
                        break;
                    }
                    _ = &mut terminated => {
                        info!("terminated; stopping (unfinished runs resume on next start)");
                        break;
                    }
                    _ = stop_rx.wait_for(|c| c.is_some()) => break,
                    Some(ended) = tasks.next_ended() => match ended {
                        Ok(name) => warn!(subsystem = name, "subsystem ended; the agent goes on without it"),
                        Err(why) => error!(error = %why, "a subsystem failed; the agent goes on without it"),
                    },
                }
            }
            let _ = down_tx.send(());
            tasks
        });
        let served = axum::serve(
            listener,
            crate::api::router(runtime.clone()).into_make_service_with_connect_info::<crate::api::Peer>(),
        )
        .with_graceful_shutdown(async {
            let _ = down_rx.await;
        })
        .await
        .map_err(|e| DaemonError::Failed(format!("API server: {e}")));
        let _ = std::fs::remove_file(&socket);
        match supervisor.await {
            Ok(mut tasks) => tasks.shutdown().await,
            Err(e) => error!(error = %e, "the supervisor failed"),
        }
        close_journal(&runtime).await;
        served?;
        let code = *stop.borrow();
        Ok(code)
    }
}

/// Closes the journal before the process exits: its writer is a detached thread, and an exit
/// that races its close can stop redb in the middle of writing the clean-shutdown header,
/// leaving the recovery flag set or a torn header that made redb panic on the next open (seen
/// only with some builds' timing, e.g. `cargo build --release -p outpost-agent`).
async fn close_journal(runtime: &Runtime) {
    if let Err(e) = runtime.journal().close().await {
        warn!(error = %e, "cannot close the journal cleanly");
    }
}

/// Binds the API socket, replacing a stale socket file but never a live agent's.
fn bind_socket(socket: &Path) -> Result<tokio::net::UnixListener, DaemonError> {
    let failed = |what: String| move |e: std::io::Error| DaemonError::Failed(format!("{what}: {e}"));
    if socket.exists() {
        if std::os::unix::net::UnixStream::connect(socket).is_ok() {
            return Err(DaemonError::SocketInUse(socket.display().to_string()));
        }
        std::fs::remove_file(socket).map_err(failed(format!("removing stale socket {}", socket.display())))?;
    }
    if let Some(parent) = socket.parent()
        && !parent.as_os_str().is_empty()
    {
        std::fs::create_dir_all(parent).map_err(failed(format!("creating {}", parent.display())))?;
    }
    // Owner and group only, from the first moment: the socket drives actuators. It is bound
    // inside a fresh 0700 directory, made 0660 there, and renamed into place, so there is no
    // window in which it exists at its path with looser permissions (a umask change would be
    // process-wide and race the journal's own files).
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let parent = socket
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let staging = parent.join(format!(".outpost-sock-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&staging)
        .map_err(failed(format!("creating {}", staging.display())))?;
    let staged = staging.join("s");
    let bound = tokio::net::UnixListener::bind(&staged)
        .map_err(failed(format!("binding {}", socket.display())))
        .and_then(|l| {
            std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(0o660))
                .map_err(failed("setting the socket's permissions".into()))?;
            std::fs::rename(&staged, socket).map_err(failed(format!("moving the socket to {}", socket.display())))?;
            Ok(l)
        });
    let _ = std::fs::remove_dir_all(&staging);
    bound
}
