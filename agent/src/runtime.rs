//! The runtime: turns the engine's decisions into effects and journals the results.
//!
//! Each active run has one driver task that owns its folded state. The driver asks
//! `engine::decide` what to do, journals pure decisions (a `set` result, a skip, the run's end),
//! and spawns activity and timer tasks. An activity journals `AttemptStarted` before any side
//! effect, runs under the global concurrency limit and its timeout, and hands its result back to
//! the driver, which journals it (durably) before deciding again. At start-up every unfinished
//! run is replayed from the journal and its driver resumes where the history stops.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use outpost_shared::definition::{self, Definition, DefinitionError};
use outpost_shared::{ErrorInfo, Event};
use serde_json::Value;
use tokio::sync::{Semaphore, mpsc, oneshot, watch};
use tokio::task::JoinSet;
use tracing::{Instrument, error, info, info_span, warn};

use crate::actions::{Call, Registry};
use crate::clock::{Clock, SystemClock, remaining_ms};
use crate::engine::{self, Command, FailedAttempt, RunState, RunStatus};
use crate::journal::{Applied, Journal, JournalConfig, JournalError, RunRecord, Started};
use crate::limits::{Limits, LimitsConfig};

/// Largest run input accepted, in bytes of JSON.
pub const MAX_INPUT_BYTES: usize = 256 * 1024;
/// Signals one run holds that no step has taken yet.
pub const MAX_PENDING_SIGNALS: usize = 256;
/// Signals one run takes in its life (each is journaled and remembered for dedupe).
pub const MAX_SIGNALS_PER_RUN: usize = 10_000;
/// Largest step output journaled, in bytes of JSON.
pub const MAX_OUTPUT_BYTES: usize = 256 * 1024;
/// Longest run id.
pub const MAX_RUN_ID_LEN: usize = 128;

/// Runtime settings.
#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    /// Activities allowed to run at once, agent-wide.
    pub max_activities: usize,
    /// Journal settings.
    pub journal: JournalConfig,
    /// Run and activity limits.
    pub limits: LimitsConfig,
    /// Circuit breakers per target.
    pub breakers: crate::breaker::BreakerConfig,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig {
            max_activities: 32,
            journal: JournalConfig::default(),
            limits: LimitsConfig::default(),
            breakers: crate::breaker::BreakerConfig::default(),
        }
    }
}

/// Why a runtime request failed.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// The journal failed.
    #[error(transparent)]
    Journal(#[from] JournalError),
    /// A definition document is invalid.
    #[error(transparent)]
    Definition(#[from] DefinitionError),
    /// No such workflow (or version).
    #[error("workflow '{name}'{} is not defined; apply it first (outpost apply FILE)", version.map(|v| format!(" version {v}")).unwrap_or_default())]
    NoSuchWorkflow {
        /// Name.
        name: String,
        /// Version asked for.
        version: Option<u32>,
    },
    /// No such run.
    #[error("run '{0}' does not exist")]
    NoSuchRun(String),
    /// Bad request input.
    #[error("{0}")]
    Invalid(String),
    /// The run already finished.
    #[error("run '{run}' has already finished ({status})")]
    Finished {
        /// Run.
        run: String,
        /// Its final status.
        status: &'static str,
    },
    /// The run is not in a state that allows this (a retry of a run that did not fail).
    #[error("{0}")]
    WrongState(String),
    /// A limit is full and the policy (or a full queue) rejects the start.
    #[error(transparent)]
    Busy(#[from] crate::limits::Rejected),
    /// The data directory cannot be used.
    #[error("data directory {path}: {source}")]
    DataDir {
        /// Path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// A request to start a run.
#[derive(Debug, Clone, Default, serde::Deserialize)]
pub struct StartRequest {
    /// Workflow name.
    pub workflow: String,
    /// Version; latest when absent.
    #[serde(default)]
    pub version: Option<u32>,
    /// Input; `{}` when absent.
    #[serde(default)]
    pub input: Option<Value>,
    /// Run id; generated when absent. An existing id returns the existing run.
    #[serde(default)]
    pub id: Option<String>,
}

/// An operator's decision on an approval step.
#[derive(Debug, Clone, Default, serde::Deserialize)]
pub struct Decision {
    /// The approval step.
    pub step: String,
    /// True to approve, false to reject.
    pub approved: bool,
    /// Who decided (set by the API from the caller, never taken from a body).
    #[serde(default)]
    pub by: String,
    /// Free text kept in history.
    #[serde(default)]
    pub comment: String,
    /// Request id; a repeat is ignored. Generated when absent.
    #[serde(default)]
    pub id: Option<String>,
    /// The fleet's signed command vouches that `by` may decide (cloud-sync checked the step's
    /// `approvers:`, which may name roles the gateway does not know); never from a request body.
    #[serde(skip)]
    pub vouched: bool,
}

/// The answer to a start request.
#[derive(Debug, Clone, serde::Serialize)]
pub struct StartResponse {
    /// Run id.
    pub run_id: String,
    /// False when the id already existed and nothing new was started.
    pub created: bool,
    /// Workflow name.
    pub workflow: String,
    /// Workflow version the run is pinned to.
    pub version: u32,
}

struct RunHandle {
    control: mpsc::Sender<Control>,
    /// Becomes the run's final event when its driver stops.
    done: watch::Receiver<Option<Event>>,
}

struct Inner {
    journal: Journal,
    registry: Registry,
    clock: Arc<dyn Clock>,
    activities: Arc<Semaphore>,
    limits: Limits,
    breakers: crate::breaker::Breakers,
    config: RuntimeConfig,
    definitions: Mutex<HashMap<(String, u32), Arc<Definition>>>,
    /// Latest version per name, for names looked up since start (this process owns the journal).
    latest: Mutex<HashMap<String, u32>>,
    runs: Mutex<HashMap<String, RunHandle>>,
    /// Bumped whenever a run's driver registers, so `wait_until_ended` need not poll for one.
    drivers: watch::Sender<u64>,
    /// Notified when a definition is applied (schedules and triggers reload).
    changed: watch::Sender<u64>,
    /// The journal file, for its size in `status`.
    journal_path: PathBuf,
    /// The latest retention pass.
    pruned: Mutex<Option<(u64, crate::journal::Pruned)>>,
    /// Cloud sync, when configured.
    sync: std::sync::OnceLock<Arc<crate::sync_state::SyncState>>,
    /// How long step attempts take.
    step_latency: crate::histogram::Histogram,
    /// Runs whose driver waits for the journal to take a write, and the storage's latest failure.
    storage: StorageHealth,
}

/// What `show`, `list` and `status` say while the journal's storage fails (a full disk): which
/// runs wait for it, since when, and why.
struct StorageHealth {
    /// Run id → when it started waiting (ms).
    blocked: Mutex<HashMap<String, u64>>,
    /// The latest storage error and when it began; cleared by the next successful write.
    failing: Mutex<Option<(String, u64)>>,
    /// Bumped when the set of blocked runs or the failure changes (sync announces it).
    changes: watch::Sender<u64>,
}

impl Default for StorageHealth {
    fn default() -> Self {
        StorageHealth {
            blocked: Mutex::new(HashMap::new()),
            failing: Mutex::new(None),
            changes: watch::channel(0).0,
        }
    }
}

impl StorageHealth {
    fn failed(&self, run_id: Option<&str>, error: &JournalError, now_ms: u64) {
        let mut changed = false;
        if let Some(id) = run_id {
            let mut blocked = lock(&self.blocked);
            if !blocked.contains_key(id) {
                blocked.insert(id.to_string(), now_ms);
                changed = true;
            }
        }
        let mut f = lock(&self.failing);
        changed |= f.is_none();
        let since = f.as_ref().map_or(now_ms, |(_, since)| *since);
        *f = Some((error.to_string(), since));
        drop(f);
        if changed {
            self.changes.send_modify(|n| *n = n.wrapping_add(1));
        }
    }

    fn wrote(&self, run_id: Option<&str>) {
        let mut blocked = lock(&self.blocked);
        let mut changed = run_id.is_some_and(|id| blocked.remove(id).is_some());
        if blocked.is_empty() {
            changed |= lock(&self.failing).take().is_some();
        }
        drop(blocked);
        if changed {
            self.changes.send_modify(|n| *n = n.wrapping_add(1));
        }
    }
}

/// Opens the journal; test builds can put it on a backend that fails like a full disk.
fn open_journal(path: &Path, config: &JournalConfig, clock: Arc<dyn Clock>) -> Result<Journal, JournalError> {
    #[cfg(feature = "fault-injection")]
    if let Some(marker) = std::env::var_os("OUTPOST_JOURNAL_FULL_DISK_MARKER") {
        warn!(marker = ?marker, "fault injection: the journal fails like a full disk while the marker file exists");
        let (path, marker) = (path.to_path_buf(), PathBuf::from(marker));
        return Journal::open_backend(
            move || outpost_shared::fault::FullDiskWhenMarked::open(&path, &marker),
            config,
            clock,
        );
    }
    Journal::open(path, config, clock)
}

/// A run held up by the journal's storage, for `show` and `list`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StorageBlock {
    /// The storage error, e.g. `journal storage error: I/O error: No space left on device`.
    pub error: String,
    /// When the run began waiting (ms).
    pub since_ms: u64,
}

/// The running agent: journal, definitions and run drivers. Cheap to clone.
#[derive(Clone)]
pub struct Runtime {
    inner: Arc<Inner>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding these maps leaves them consistent (single inserts/removes).
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Runtime {
    /// Opens the journal in `data_dir` with the built-in actions and the system clock.
    pub fn open(data_dir: &Path, config: RuntimeConfig) -> Result<Runtime, RuntimeError> {
        Self::open_with(data_dir, config, Registry::builtin(), Arc::new(SystemClock))
    }

    /// Opens with a given action registry and clock.
    pub fn open_with(
        data_dir: &Path,
        config: RuntimeConfig,
        registry: Registry,
        clock: Arc<dyn Clock>,
    ) -> Result<Runtime, RuntimeError> {
        std::fs::create_dir_all(data_dir).map_err(|source| RuntimeError::DataDir {
            path: data_dir.to_path_buf(),
            source,
        })?;
        let journal_path = data_dir.join("journal.redb");
        let journal = open_journal(&journal_path, &config.journal, clock.clone())?;
        Ok(Runtime {
            inner: Arc::new(Inner {
                journal,
                registry,
                clock,
                activities: Arc::new(Semaphore::new(config.max_activities.max(1))),
                limits: Limits::new(config.limits.clone()),
                breakers: crate::breaker::Breakers::new(config.breakers),
                config,
                definitions: Mutex::new(HashMap::new()),
                latest: Mutex::new(HashMap::new()),
                runs: Mutex::new(HashMap::new()),
                drivers: watch::channel(0).0,
                changed: watch::channel(0).0,
                journal_path,
                pruned: Mutex::new(None),
                sync: std::sync::OnceLock::new(),
                step_latency: crate::histogram::Histogram::default(),
                storage: StorageHealth::default(),
            }),
        })
    }

    /// The journal.
    pub fn journal(&self) -> &Journal {
        &self.inner.journal
    }

    /// The action registry.
    pub fn registry(&self) -> &Registry {
        &self.inner.registry
    }

    /// The configured activity limit.
    pub fn max_activities(&self) -> usize {
        self.inner.config.max_activities
    }

    /// Activities running right now.
    pub fn activities_running(&self) -> usize {
        self.inner.config.max_activities.max(1) - self.inner.activities.available_permits()
    }

    /// Run and activity limits with their live counts.
    pub fn limits(&self) -> &Limits {
        &self.inner.limits
    }

    /// Circuit breakers and their states, for `status`.
    pub fn breakers_view(&self) -> Value {
        self.inner.breakers.view(self.clock_ms())
    }

    /// Runs with a live driver.
    pub fn active_count(&self) -> usize {
        lock(&self.inner.runs).len()
    }

    /// Resumes every unfinished run from its journaled history, each with a `RunResumed` marker
    /// in it (journaled together, so group commit makes few commits of many markers). Returns
    /// how many resumed.
    pub async fn resume_all(&self) -> Result<usize, RuntimeError> {
        let ids = self.inner.journal.active_runs()?;
        let mut ready = Vec::new();
        for id in ids {
            if lock(&self.inner.runs).contains_key(&id) {
                continue;
            }
            match self.prepare_resume(&id) {
                Ok(r) => ready.push((id, r)),
                Err(e) => {
                    error!(run_id = %id, error = %e, "cannot resume run; failing it");
                    let rt = self.clone();
                    let err = ErrorInfo::new("resume", e.to_string());
                    tokio::spawn(async move {
                        let _ = rt
                            .inner
                            .journal
                            .append(&id, vec![Event::RunFailed { error: err }])
                            .await;
                    });
                }
            }
        }
        let markers: Vec<_> = ready
            .iter()
            .map(|(id, (_, _, _, replayed))| {
                let journal = self.inner.journal.clone();
                let (id, replayed) = (id.clone(), *replayed);
                tokio::spawn(async move { journal.append(&id, vec![Event::RunResumed { replayed }]).await })
            })
            .collect();
        for (marker, (id, _)) in markers.into_iter().zip(&ready) {
            // Only a marker: a run whose marker cannot be written still resumes.
            if let Ok(Err(e)) = marker.await {
                warn!(run_id = %id, error = %e, "cannot journal the resume marker");
            }
        }
        let resumed = ready.len();
        for (_, (def, st, child, _)) in ready {
            self.spawn_driver(def, st, child);
        }
        Ok(resumed)
    }

    /// Starts a driver for a run the journal holds as active (a retried run, the next run of a
    /// continue-as-new), unless one is running.
    fn resume(&self, run_id: &str) -> Result<(), RuntimeError> {
        if lock(&self.inner.runs).contains_key(run_id) {
            return Ok(());
        }
        let (def, st, child, _) = self.prepare_resume(run_id)?;
        self.spawn_driver(def, st, child);
        Ok(())
    }

    /// A run's definition and state, replayed from its history, to resume it; whether it is a
    /// child run, and how many events were replayed.
    fn prepare_resume(&self, run_id: &str) -> Result<(Arc<Definition>, RunState, bool, u64), RuntimeError> {
        let history = self.inner.journal.history(run_id)?;
        let Some((_, first)) = history.first() else {
            return Err(RuntimeError::NoSuchRun(run_id.to_string()));
        };
        let Event::RunStarted { workflow, version, .. } = &first.event else {
            return Err(RuntimeError::Invalid(format!(
                "history of run {run_id} does not begin with run_started"
            )));
        };
        let def = self.definition(workflow, Some(*version))?;
        let st = RunState::replay(&def, run_id, history.iter().map(|(_, r)| &r.event))
            .map_err(|e| RuntimeError::Invalid(e.to_string()))?;
        info!(run_id, workflow = %workflow, version, events = history.len(), "resuming run");
        let child =
            crate::children::parent_of(run_id, |p| self.inner.journal.run(p).ok().flatten().is_some()).is_some();
        Ok((def, st, child, history.len() as u64))
    }

    /// Parses and validates a document without storing it.
    pub fn validate(&self, text: &str) -> Result<Definition, RuntimeError> {
        Ok(definition::parse(text, &self.inner.registry)?)
    }

    /// Validates and stores a definition version.
    pub async fn apply(&self, text: &str) -> Result<(Arc<Definition>, Applied), RuntimeError> {
        let def = Arc::new(self.validate(text)?);
        let applied = self
            .inner
            .journal
            .put_definition(def.name(), def.version(), def.to_json())
            .await?;
        lock(&self.inner.definitions).insert((def.name().to_string(), def.version()), def.clone());
        if let Some(v) = lock(&self.inner.latest).get_mut(def.name()) {
            *v = (*v).max(def.version());
        }
        if applied == Applied::Created {
            self.inner.changed.send_modify(|n| *n += 1);
        }
        Ok((def, applied))
    }

    /// A stored definition (latest version when `version` is `None`).
    pub fn definition(&self, name: &str, version: Option<u32>) -> Result<Arc<Definition>, RuntimeError> {
        let version = version.or_else(|| lock(&self.inner.latest).get(name).copied());
        if let Some(v) = version
            && let Some(d) = lock(&self.inner.definitions).get(&(name.to_string(), v))
        {
            return Ok(d.clone());
        }
        let Some((v, rec)) = self.inner.journal.definition(name, version)? else {
            return Err(RuntimeError::NoSuchWorkflow {
                name: name.to_string(),
                version,
            });
        };
        if let Some(d) = lock(&self.inner.definitions).get(&(name.to_string(), v)) {
            return Ok(d.clone());
        }
        let def = Arc::new(definition::parse(&rec.json, &self.inner.registry)?);
        lock(&self.inner.definitions).insert((name.to_string(), v), def.clone());
        if version.is_none() {
            lock(&self.inner.latest).insert(name.to_string(), v);
        }
        Ok(def)
    }

    /// Starts a run, or returns the existing one with the same id. When the run limits are
    /// full the run queues (or is rejected, per `--when-full`).
    pub async fn start(&self, req: StartRequest) -> Result<StartResponse, RuntimeError> {
        self.start_run(req, false).await
    }

    /// Why run `id` is not progressing when the journal cannot be written, if it is waiting for it.
    pub fn storage_block(&self, id: &str) -> Option<StorageBlock> {
        let since_ms = *lock(&self.inner.storage.blocked).get(id)?;
        let error = lock(&self.inner.storage.failing)
            .as_ref()
            .map_or_else(|| "journal storage error".to_string(), |(e, _)| e.clone());
        Some(StorageBlock { error, since_ms })
    }

    /// Up to `max` ids of runs waiting for the journal to take a write, oldest wait first.
    pub fn blocked_runs(&self, max: usize) -> Vec<String> {
        let blocked = lock(&self.inner.storage.blocked);
        let mut ids: Vec<(&u64, &String)> = blocked.iter().map(|(id, since)| (since, id)).collect();
        ids.sort();
        ids.into_iter().take(max).map(|(_, id)| id.clone()).collect()
    }

    /// Changes whenever runs start or stop waiting for the journal's storage.
    pub fn storage_changes(&self) -> watch::Receiver<u64> {
        self.inner.storage.changes.subscribe()
    }

    /// The journal's storage failure (its text and since when) and how many runs wait for it.
    pub fn storage_failure(&self) -> Option<(String, u64, usize)> {
        let blocked = lock(&self.inner.storage.blocked).len();
        lock(&self.inner.storage.failing)
            .as_ref()
            .map(|(e, since)| (e.clone(), *since, blocked))
    }

    async fn start_run(&self, req: StartRequest, child: bool) -> Result<StartResponse, RuntimeError> {
        let input = req.input.unwrap_or_else(|| Value::Object(Default::default()));
        let input_text = input.to_string();
        if input_text.len() > MAX_INPUT_BYTES {
            return Err(RuntimeError::Invalid(format!(
                "input is {} bytes; the limit is {MAX_INPUT_BYTES} bytes",
                input_text.len()
            )));
        }
        let req_had_id = req.id.is_some();
        let run_id = match req.id {
            Some(id) => {
                check_run_id(&id)?;
                id
            }
            None => self.new_run_id(),
        };
        if req_had_id && let Some(rec) = self.inner.journal.run(&run_id)? {
            return Ok(StartResponse {
                run_id,
                created: false,
                workflow: rec.workflow,
                version: rec.version,
            });
        }
        let def = self.definition(&req.workflow, req.version)?;
        if !child {
            self.inner.limits.check_admission(def.name(), max_runs(&def))?;
            self.check_outbox()?;
        }
        let event = Event::RunStarted {
            workflow: def.name().to_string(),
            version: def.version(),
            input: input_text,
        };
        let started = self.inner.journal.start_run(&run_id, event).await;
        match &started {
            Err(e @ JournalError::Storage(_)) => self.inner.storage.failed(None, e, self.inner.clock.now_ms()),
            Err(_) => {}
            Ok(_) => self.inner.storage.wrote(None),
        }
        match started? {
            Started::Existing(rec) => Ok(StartResponse {
                run_id,
                created: false,
                workflow: rec.workflow,
                version: rec.version,
            }),
            Started::Created => {
                info!(run_id = %run_id, workflow = def.name(), version = def.version(), "run started");
                let st = RunState::new(&def, &run_id, input);
                let resp = StartResponse {
                    run_id,
                    created: true,
                    workflow: def.name().to_string(),
                    version: def.version(),
                };
                self.spawn_driver(def, st, child);
                Ok(resp)
            }
        }
    }

    /// Starts a child run (for `workflow` and `map` steps); children were admitted with their
    /// parent, so they are not held back by run limits.
    pub(crate) async fn start_child(&self, req: StartRequest) -> Result<StartResponse, RuntimeError> {
        // A child is a new run and takes room in the sync outbox like any start; it waits for
        // that room (its parent's step waits with it) rather than failing the parent's step.
        let id = req.id.clone();
        self.wait_for_outbox_room("child run", || match id.as_deref() {
            Some(id) => Ok(self.inner.journal.run(id)?.is_some()),
            None => Ok(false),
        })
        .await?;
        self.start_run(req, true).await
    }

    /// The last event of a finished run.
    pub fn final_event(&self, run_id: &str) -> Result<Event, RuntimeError> {
        let history = self.inner.journal.history(run_id)?;
        history
            .into_iter()
            .rev()
            .map(|(_, r)| r.event)
            .find(Event::is_terminal)
            .ok_or_else(|| RuntimeError::Invalid(format!("run '{run_id}' has not finished")))
    }

    fn new_run_id(&self) -> String {
        format!("{:011x}{:05x}", self.inner.clock.now_ms(), fastrand::u32(..1 << 20))
    }

    /// Waits until the run finishes or `timeout` passes; returns its summary row either way,
    /// and its final event when this call saw it end.
    pub async fn wait(
        &self,
        run_id: &str,
        timeout: Option<Duration>,
    ) -> Result<(RunRecord, Option<Event>), RuntimeError> {
        let done = lock(&self.inner.runs).get(run_id).map(|h| h.done.clone());
        let mut end = None;
        if let Some(mut done) = done {
            let wait = async {
                let _ = done.wait_for(Option::is_some).await;
                done.borrow().clone()
            };
            end = match timeout {
                Some(t) => tokio::time::timeout(t, wait).await.ok().flatten(),
                None => wait.await,
            };
        }
        let rec = self
            .inner
            .journal
            .run(run_id)?
            .ok_or_else(|| RuntimeError::NoSuchRun(run_id.to_string()))?;
        Ok((rec, end))
    }

    /// Waits until the run has ended, also one whose driver has not started yet (start-up
    /// resumes runs one by one): woken when a driver registers, never polling.
    pub async fn wait_until_ended(&self, run_id: &str) -> Result<(RunRecord, Option<Event>), RuntimeError> {
        let mut drivers = self.inner.drivers.subscribe();
        loop {
            // Seen before looking, so a driver registering meanwhile wakes the wait below.
            drivers.borrow_and_update();
            let (rec, end) = self.wait(run_id, None).await?;
            if rec.status.is_terminal() || drivers.changed().await.is_err() {
                return Ok((rec, end));
            }
        }
    }

    /// Cancels a run: stops its activities and child runs and journals `RunCancelled`.
    pub async fn cancel(&self, run_id: &str, reason: &str) -> Result<RunRecord, RuntimeError> {
        self.stop(run_id, reason, false).await
    }

    /// Terminates a run (also one that is compensating): no compensation runs.
    pub async fn terminate(&self, run_id: &str, reason: &str) -> Result<RunRecord, RuntimeError> {
        self.stop(run_id, reason, true).await
    }

    async fn stop(&self, run_id: &str, reason: &str, terminate: bool) -> Result<RunRecord, RuntimeError> {
        let handle = lock(&self.inner.runs)
            .get(run_id)
            .map(|h| (h.control.clone(), h.done.clone()));
        match handle {
            Some((control, mut done)) => {
                let msg = Control::Stop {
                    reason: reason.to_string(),
                    terminate,
                };
                let _ = control.send(msg).await;
                let _ = done.wait_for(Option::is_some).await;
                self.inner
                    .journal
                    .run(run_id)?
                    .ok_or_else(|| RuntimeError::NoSuchRun(run_id.to_string()))
            }
            None => Err(self.not_active(run_id)?),
        }
    }

    /// The error for a request that needs a live run: finished or unknown.
    fn not_active(&self, run_id: &str) -> Result<RuntimeError, RuntimeError> {
        Ok(match self.inner.journal.run(run_id)? {
            Some(rec) if rec.status.is_terminal() => RuntimeError::Finished {
                run: run_id.to_string(),
                status: rec.status.as_str(),
            },
            Some(_) => RuntimeError::Invalid(format!("run '{run_id}' is not loaded yet; try again")),
            None => RuntimeError::NoSuchRun(run_id.to_string()),
        })
    }

    /// Sends a request to a live run's driver and waits for its answer.
    async fn ask(
        &self,
        run_id: &str,
        make: impl FnOnce(oneshot::Sender<Result<bool, RuntimeError>>) -> Control,
    ) -> Result<bool, RuntimeError> {
        let control = lock(&self.inner.runs).get(run_id).map(|h| h.control.clone());
        let Some(control) = control else {
            return Err(self.not_active(run_id)?);
        };
        let (tx, rx) = oneshot::channel();
        if control.send(make(tx)).await.is_err() {
            return Err(self.not_active(run_id)?);
        }
        match rx.await {
            Ok(r) => r,
            Err(_) => Err(self.not_active(run_id)?),
        }
    }

    /// Delivers a signal to a run; it is kept durably until a step consumes it. Returns false
    /// when a signal with the same id was already received.
    pub async fn signal(
        &self,
        run_id: &str,
        name: &str,
        id: Option<String>,
        payload: Value,
    ) -> Result<bool, RuntimeError> {
        self.signal_from(run_id, name, id, payload, None).await
    }

    /// `signal`, with who sent it journaled beside it (`Event::SignalFrom`).
    pub async fn signal_from(
        &self,
        run_id: &str,
        name: &str,
        id: Option<String>,
        payload: Value,
        by: Option<String>,
    ) -> Result<bool, RuntimeError> {
        if name.is_empty() || name.len() > 128 || engine::SignalName::is_reserved(name) {
            return Err(RuntimeError::Invalid(format!(
                "signal name '{name}' must be 1-128 characters and not start with 'approval:'"
            )));
        }
        let id = id.unwrap_or_else(|| self.new_run_id());
        let name = name.to_string();
        self.ask(run_id, |reply| Control::Signal {
            name,
            id,
            payload,
            by,
            reply,
        })
        .await
    }

    /// Approves or rejects an approval step that is waiting. Returns false for a repeated id.
    pub async fn approve(&self, run_id: &str, decision: Decision) -> Result<bool, RuntimeError> {
        let id = decision.id.unwrap_or_else(|| self.new_run_id());
        self.ask(run_id, |reply| Control::Approve {
            step: decision.step,
            approved: decision.approved,
            vouched: decision.vouched,
            by: decision.by,
            comment: decision.comment,
            id,
            reply,
        })
        .await
    }

    /// Resumes a failed run from its failed steps (each gets a fresh visit and attempt budget).
    pub async fn retry(&self, run_id: &str, by: &str) -> Result<RunRecord, RuntimeError> {
        let rec = self
            .inner
            .journal
            .run(run_id)?
            .ok_or_else(|| RuntimeError::NoSuchRun(run_id.to_string()))?;
        if rec.status != RunStatus::Failed {
            return Err(RuntimeError::WrongState(format!(
                "run '{run_id}' is {}; only a failed run can be retried",
                rec.status.as_str()
            )));
        }
        self.inner
            .journal
            .append(run_id, vec![Event::RunRetried { by: by.to_string() }])
            .await?;
        info!(run_id, by, "run retried by operator");
        self.resume(run_id)?;
        self.inner
            .journal
            .run(run_id)?
            .ok_or_else(|| RuntimeError::NoSuchRun(run_id.to_string()))
    }

    /// The latest version of every stored workflow (schedules and triggers come from these).
    pub fn latest_definitions(&self) -> Vec<Arc<Definition>> {
        let mut latest: HashMap<String, u32> = HashMap::new();
        match self.inner.journal.definitions() {
            Ok(defs) => {
                for (name, version, _) in defs {
                    let v = latest.entry(name).or_default();
                    *v = (*v).max(version);
                }
            }
            Err(e) => warn!(error = %e, "cannot read definitions"),
        }
        latest
            .into_iter()
            .filter_map(|(name, version)| self.definition(&name, Some(version)).ok())
            .collect()
    }

    /// Notified whenever a new definition version is stored.
    pub fn definitions_changed(&self) -> watch::Receiver<u64> {
        self.inner.changed.subscribe()
    }

    /// Connects cloud sync: its cursor bounds retention and its backlog gates new runs.
    pub fn attach_sync(&self, state: Arc<crate::sync_state::SyncState>) {
        let _ = self.inner.sync.set(state);
    }

    /// The step attempt latency histogram.
    pub fn step_latency(&self) -> &crate::histogram::Histogram {
        &self.inner.step_latency
    }

    /// Cloud sync's state, when configured.
    pub fn sync(&self) -> Option<&Arc<crate::sync_state::SyncState>> {
        self.inner.sync.get()
    }

    /// Remembers a retention pass for `status`.
    pub fn record_prune(&self, p: crate::journal::Pruned) {
        *lock(&self.inner.pruned) = Some((self.clock_ms(), p));
    }

    /// The latest retention pass: when, and what it deleted.
    pub fn last_prune(&self) -> Option<(u64, crate::journal::Pruned)> {
        lock(&self.inner.pruned).clone()
    }

    /// Size of the journal file in bytes.
    pub fn journal_file_bytes(&self) -> u64 {
        std::fs::metadata(&self.inner.journal_path)
            .map(|m| m.len())
            .unwrap_or(0)
    }

    /// The runtime's clock (what certificates are checked against too).
    pub fn clock(&self) -> Arc<dyn Clock> {
        self.inner.clock.clone()
    }

    /// Now, by the runtime's clock.
    pub fn clock_ms(&self) -> u64 {
        self.inner.clock.now_ms()
    }

    /// True when a live run's id starts with `prefix`.
    pub fn has_active_prefix(&self, prefix: &str) -> bool {
        lock(&self.inner.runs).keys().any(|id| id.starts_with(prefix))
    }

    /// Live runs whose id is `base` or starts with `base:` (a step's child runs).
    pub(crate) fn children_of(&self, base: &str) -> Vec<String> {
        let prefix = format!("{base}:");
        lock(&self.inner.runs)
            .keys()
            .filter(|id| *id == base || id.starts_with(&prefix))
            .cloned()
            .collect()
    }

    fn spawn_driver(&self, def: Arc<Definition>, st: RunState, child: bool) {
        let (control_tx, control_rx) = mpsc::channel(16);
        let (done_tx, done_rx) = watch::channel(None);
        let run_id = st.run_id.clone();
        lock(&self.inner.runs).insert(
            run_id.clone(),
            RunHandle {
                control: control_tx,
                done: done_rx,
            },
        );
        self.inner.drivers.send_modify(|n| *n = n.wrapping_add(1));
        let inner = self.inner.clone();
        // A root span: a run started by another (continue-as-new, a child) is not nested in it.
        let span = info_span!(parent: None, "run", run_id = %run_id, workflow = def.name());
        tokio::spawn(
            async move {
                let end = Driver {
                    inner: inner.clone(),
                    def,
                    st,
                    next: None,
                    end: None,
                }
                .run(control_rx, child)
                .await;
                inner.limits.forget(&run_id);
                lock(&inner.runs).remove(&run_id);
                let _ = done_tx.send(Some(end));
            }
            .instrument(span),
        );
    }
}

impl Runtime {
    /// Refuses new runs while the sync outbox is over its cap: nothing is dropped, and the
    /// journal stops growing except for runs already going.
    /// Waits, backing off, until the sync outbox has room for one more run, unless `exists` says
    /// the run is already there (a repeated start needs no room). `what` names it in the log.
    async fn wait_for_outbox_room(
        &self,
        what: &str,
        mut exists: impl FnMut() -> Result<bool, RuntimeError>,
    ) -> Result<(), RuntimeError> {
        let mut delay = Duration::from_millis(500);
        let mut said = false;
        loop {
            if exists()? {
                return Ok(());
            }
            let Err(e) = self.check_outbox() else { return Ok(()) };
            if !said {
                warn!(error = %e, "{what} waits for room in the sync outbox");
                said = true;
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(10));
        }
    }

    fn check_outbox(&self) -> Result<(), RuntimeError> {
        let Some(sync) = self.inner.sync.get() else {
            return Ok(());
        };
        // The writer's commit watch: no read transaction on the start path.
        let backlog = sync.backlog(*self.inner.journal.commits().borrow());
        let max = sync.max_events.load(std::sync::atomic::Ordering::Relaxed);
        if backlog > max {
            sync.refused_starts.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return Err(RuntimeError::Busy(crate::limits::Rejected(format!(
                "start rejected: the sync outbox holds {backlog} events the cloud has not acknowledged (cap {max}, --outbox-max-events)"
            ))));
        }
        Ok(())
    }
}

/// The workflow's own run limit.
fn max_runs(def: &Definition) -> Option<u32> {
    def.doc.limits.as_ref().and_then(|l| l.max_runs)
}

fn check_run_id(id: &str) -> Result<(), RuntimeError> {
    let ok = !id.is_empty()
        && id.len() <= MAX_RUN_ID_LEN
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':' | '~'));
    if ok {
        Ok(())
    } else {
        Err(RuntimeError::Invalid(format!(
            "run id '{id}' must be 1-{MAX_RUN_ID_LEN} characters of letters, digits, '-', '_', '.', ':', '~'"
        )))
    }
}

/// Identifies an activity or timer task: (step, visit, attempt, compensation); timers use attempt 0.
type Slot = (usize, u32, u32, bool);

/// What a finished task hands back: events already journaled, then events to journal.
struct TaskResult {
    journaled: Vec<Event>,
    to_journal: Vec<Event>,
}

/// A request to a run's driver from outside: operators, the API, parent runs.
pub(crate) enum Control {
    /// Stop the run: cancel (`terminate` false) or terminate.
    Stop {
        /// Why.
        reason: String,
        /// Record `RunTerminated` instead of `RunCancelled`.
        terminate: bool,
    },
    /// Deliver a signal; the reply says whether it was new (false: a repeated id).
    Signal {
        /// The signal as it will be journaled.
        name: String,
        /// Sender's id.
        id: String,
        /// Payload.
        payload: Value,
        /// Who sent it, when known.
        by: Option<String>,
        /// Whether it was new, once durable.
        reply: oneshot::Sender<Result<bool, RuntimeError>>,
    },
    /// Decide an approval step that is waiting.
    Approve {
        /// The approval step.
        step: String,
        /// Decision.
        approved: bool,
        /// Who decided.
        by: String,
        /// The fleet vouches that `by` may decide.
        vouched: bool,
        /// Free text.
        comment: String,
        /// Request id (repeats are ignored).
        id: String,
        /// Whether it was new, once durable.
        reply: oneshot::Sender<Result<bool, RuntimeError>>,
    },
}

struct Driver {
    inner: Arc<Inner>,
    def: Arc<Definition>,
    st: RunState,
    /// Decisions already made for the current state (by the look-ahead in `journal`).
    next: Option<Vec<Command>>,
    /// The run's final event, once journaled.
    end: Option<Event>,
}

impl Driver {
    /// Drives the run to its end; returns the final event. A run that is not a child first
    /// waits for its run slots (answering stop and signal requests meanwhile).
    async fn run(mut self, mut control: mpsc::Receiver<Control>, child: bool) -> Event {
        let mut tasks: JoinSet<TaskResult> = JoinSet::new();
        let inner = self.inner.clone();
        let mut _slots = Vec::new();
        if !child && !self.st.status.is_terminal() {
            let (run_id, def) = (self.st.run_id.clone(), self.def.clone());
            let admit = inner.limits.admit(&run_id, def.name(), max_runs(&def));
            tokio::pin!(admit);
            loop {
                tokio::select! {
                    permits = &mut admit => {
                        _slots = permits;
                        break;
                    }
                    msg = control.recv() => {
                        self.control(msg, &mut tasks).await;
                        if self.st.status.is_terminal() {
                            break;
                        }
                    }
                }
            }
        }
        let mut slots: HashMap<tokio::task::Id, Slot> = HashMap::new();
        while !self.st.status.is_terminal() {
            let mut records = Vec::new();
            let decided = self.next.take().unwrap_or_else(|| engine::decide(&self.def, &self.st));
            for cmd in decided {
                self.command(cmd, &mut records, &mut tasks, &mut slots);
            }
            if !records.is_empty() {
                self.journal(records, &mut tasks).await;
                continue;
            }
            if tasks.is_empty() && !self.st.is_waiting() {
                // Nothing to run, nothing running, nothing awaited: the run cannot make progress.
                let err = ErrorInfo::new("engine.stuck", "no step can run and none is running");
                self.journal(vec![Event::RunFailed { error: err }], &mut tasks).await;
                break;
            }
            tokio::select! {
                Some(joined) = tasks.join_next_with_id(), if !tasks.is_empty() => match joined {
                    Ok((id, res)) => {
                        slots.remove(&id);
                        self.absorb(res.journaled);
                        if !res.to_journal.is_empty() {
                            self.journal(res.to_journal, &mut tasks).await;
                        }
                    }
                    Err(e) => {
                        let slot = slots.remove(&e.id());
                        if e.is_panic() {
                            error!(?slot, "activity task panicked");
                            if let Some((step, visit, attempt, compensation)) = slot {
                                let id = self.def.doc.steps[step].id.clone();
                                let failed = FailedAttempt {
                                    step: &id,
                                    visit,
                                    attempt,
                                    error: ErrorInfo::new("internal", "the action panicked"),
                                    retryable: false,
                                    compensation,
                                };
                                let events = engine::attempt_failed(
                                    &self.def.plans[step],
                                    failed,
                                    self.inner.clock.now_ms(),
                                    0.0,
                                );
                                self.journal(events, &mut tasks).await;
                            }
                        }
                    }
                },
                msg = control.recv() => self.control(msg, &mut tasks).await,
            }
        }
        match self.st.status {
            RunStatus::Completed => info!("run completed"),
            RunStatus::Continued => info!("run continued as new"),
            status => {
                let error = self.st.error.as_ref().map(|e| e.to_string()).unwrap_or_default();
                warn!(status = status.as_str(), %error, "run ended");
            }
        }
        self.end.take().unwrap_or_else(|| Event::RunCancelled {
            reason: "the driver stopped".into(),
        })
    }

    /// Turns one decision into records to journal or a task to run.
    fn command(
        &self,
        cmd: Command,
        records: &mut Vec<Event>,
        tasks: &mut JoinSet<TaskResult>,
        slots: &mut HashMap<tokio::task::Id, Slot>,
    ) {
        match cmd {
            Command::Record(e) => records.push(e),
            Command::StartTimer {
                step,
                visit,
                duration_ms,
            } => records.push(Event::TimerSet {
                step: self.def.doc.steps[step].id.clone(),
                visit,
                fire_at_ms: self.inner.clock.now_ms().saturating_add(duration_ms),
                duration_ms,
            }),
            Command::StartWait {
                step,
                visit,
                signal,
                duration_ms,
            } => records.push(Event::WaitStarted {
                step: self.def.doc.steps[step].id.clone(),
                visit,
                signal,
                fire_at_ms: duration_ms.map(|d| self.inner.clock.now_ms().saturating_add(d)),
                duration_ms: duration_ms.unwrap_or(0),
            }),
            Command::AwaitTimer {
                step,
                visit,
                fire_at_ms,
                duration_ms,
                completes,
            } => {
                let slot = (step, visit, 0, false);
                if slots.values().any(|s| *s == slot) {
                    return;
                }
                let clock = self.inner.clock.clone();
                let id = self.def.doc.steps[step].id.clone();
                let h = tasks.spawn(
                    async move {
                        let wait = remaining_ms(clock.now_ms(), fire_at_ms, duration_ms);
                        tokio::time::sleep(Duration::from_millis(wait)).await;
                        let mut to_journal = vec![Event::TimerFired {
                            step: id.clone(),
                            visit,
                            fire_at_ms,
                        }];
                        if completes {
                            to_journal.push(Event::StepCompleted {
                                step: id,
                                visit,
                                output: "null".into(),
                            });
                        }
                        TaskResult {
                            journaled: Vec::new(),
                            to_journal,
                        }
                    }
                    .in_current_span(),
                );
                slots.insert(h.id(), slot);
            }
            Command::RunActivity {
                step,
                visit,
                attempt,
                args,
                key,
                not_before_ms,
                compensation,
            } => {
                let slot = (step, visit, attempt, compensation);
                if slots.values().any(|s| *s == slot) {
                    return;
                }
                let fut = activity(
                    self.inner.clone(),
                    self.def.clone(),
                    self.st.run_id.clone(),
                    slot,
                    args,
                    key,
                    not_before_ms,
                );
                let span = info_span!("step", step = %self.def.doc.steps[step].id, attempt, compensation);
                let h = tasks.spawn(fut.instrument(span));
                slots.insert(h.id(), slot);
            }
        }
    }

    /// Handles a request from outside the run.
    async fn control(&mut self, msg: Option<Control>, tasks: &mut JoinSet<TaskResult>) {
        match msg {
            None => {}
            Some(Control::Stop { reason, terminate }) => {
                tasks.abort_all();
                self.stop_children().await;
                info!(%reason, terminate, "run stopped by request");
                let end = if terminate {
                    Event::RunTerminated { reason }
                } else {
                    Event::RunCancelled { reason }
                };
                self.journal(vec![end], tasks).await;
            }
            Some(Control::Signal {
                name,
                id,
                payload,
                by,
                reply,
            }) => {
                let res = self.signal(name, id, payload, by, tasks).await;
                let _ = reply.send(res);
            }
            Some(Control::Approve {
                step,
                approved,
                by,
                vouched,
                comment,
                id,
                reply,
            }) => {
                let res = match self.check_approval(&step, &by, vouched) {
                    Ok(visit) => {
                        let payload = serde_json::json!({
                            "approved": approved, "by": by, "comment": comment, "visit": visit,
                        });
                        self.signal(engine::approval_signal(&step), id, payload, None, tasks)
                            .await
                    }
                    Err(e) => Err(e),
                };
                let _ = reply.send(res);
            }
        }
    }

    /// Journals a signal unless its id was seen before; true when it was new.
    async fn signal(
        &mut self,
        name: String,
        id: String,
        payload: Value,
        by: Option<String>,
        tasks: &mut JoinSet<TaskResult>,
    ) -> Result<bool, RuntimeError> {
        if self.st.signals.iter().any(|s| s.id == id) {
            info!(signal = %name, id = %id, "repeated signal ignored");
            return Ok(false);
        }
        let payload = payload.to_string();
        if payload.len() > MAX_INPUT_BYTES {
            return Err(RuntimeError::Invalid(format!(
                "signal payload is {} bytes; the limit is {MAX_INPUT_BYTES} bytes",
                payload.len()
            )));
        }
        // Every signal is journaled and kept (for dedupe) for the run's life: bound both what
        // waits unconsumed and what one run can ever take, or a sender in a loop fills the disk.
        let pending = self.st.signals.iter().filter(|s| !s.consumed).count();
        if pending >= MAX_PENDING_SIGNALS {
            return Err(RuntimeError::Invalid(format!(
                "run '{}' already holds {pending} signals no step has taken (the limit is {MAX_PENDING_SIGNALS}); signal '{name}' refused",
                self.st.run_id
            )));
        }
        if self.st.signals.len() >= MAX_SIGNALS_PER_RUN {
            return Err(RuntimeError::Invalid(format!(
                "run '{}' has received {MAX_SIGNALS_PER_RUN} signals, the most one run takes; signal '{name}' refused (continue as new to reset)",
                self.st.run_id
            )));
        }
        info!(signal = %name, id = %id, "signal received");
        let mut events = vec![Event::SignalReceived {
            name,
            id: id.clone(),
            payload,
        }];
        if let Some(by) = by {
            events.push(Event::SignalFrom { id, by });
        }
        self.journal(events, tasks).await;
        Ok(true)
    }

    /// The visit of approval step `step` that is waiting for a decision `by` may make.
    fn check_approval(&self, step: &str, by: &str, vouched: bool) -> Result<u32, RuntimeError> {
        let Some((i, s)) = self.def.step(step) else {
            return Err(RuntimeError::Invalid(format!(
                "workflow {} has no step '{step}'",
                self.def.name()
            )));
        };
        if s.action != "approval" {
            return Err(RuntimeError::Invalid(format!(
                "step '{step}' is a {} step, not an approval",
                s.action
            )));
        }
        let state = &self.st.steps[i];
        if !matches!(state.phase, engine::Phase::Waiting { .. }) {
            return Err(RuntimeError::Invalid(format!(
                "step '{step}' is not waiting for approval (it is {})",
                engine::phase_name(&state.phase)
            )));
        }
        if let Some(list) = s.args.get("approvers").and_then(Value::as_array)
            && !vouched
            && !list.iter().any(|a| a.as_str() == Some(by))
        {
            let names: Vec<String> = list
                .iter()
                .map(|a| a.as_str().unwrap_or_default().to_string())
                .collect();
            return Err(RuntimeError::Invalid(format!(
                "'{by}' may not decide step '{step}' (approvers: {})",
                names.join(", ")
            )));
        }
        Ok(state.visits)
    }

    /// Cancels the child runs of steps in flight (a parent's cancel reaches its children).
    async fn stop_children(&self) {
        let rt = Runtime {
            inner: self.inner.clone(),
        };
        for (i, s) in self.st.steps.iter().enumerate() {
            let step = &self.def.doc.steps[i];
            if !matches!(step.action.as_str(), "workflow" | "map") {
                continue;
            }
            // An attempt in flight may not be folded in yet: its visit is the current or the next.
            for visit in [s.visits, s.visits + 1] {
                let base = crate::children::child_id(&self.st.run_id, &step.id, visit);
                for id in rt.children_of(&base) {
                    if let Err(e) = rt.stop(&id, "parent run stopped", false).await {
                        warn!(child = %id, error = %e, "cannot cancel child run");
                    }
                }
            }
        }
    }

    fn absorb(&mut self, events: Vec<Event>) {
        self.next = None;
        for e in events {
            if let Err(err) = self.st.apply(&self.def, &e) {
                error!(error = %err, "journaled event does not fit the definition");
            }
            if e.is_terminal() {
                self.end = Some(e);
            }
        }
    }

    /// Journals events (retrying while storage fails: nothing is lost, the run just waits) and
    /// folds them into the state. When these events make the run's end certain, the end is
    /// journaled in the same commit: it is a pure consequence, so no effect depends on it early.
    async fn journal(&mut self, mut events: Vec<Event>, tasks: &mut JoinSet<TaskResult>) {
        let was_compensating = self.st.status == RunStatus::Compensating;
        self.absorb(events.clone());
        // Decisions that are only records (a `set`, a skip, a choice, the run's end) follow
        // purely from these events and have no effect, so they join this commit; a loop of pure
        // steps then costs one fsync per batch instead of one per step.
        while !self.st.status.is_terminal() {
            let next = engine::decide(&self.def, &self.st);
            let pure = !next.is_empty() && next.iter().all(|c| matches!(c, Command::Record(_)));
            if !pure || events.len() >= MAX_PURE_BATCH {
                // The state will not change before the driver decides again: keep the decision.
                self.next = Some(next);
                break;
            }
            let records: Vec<Event> = next
                .into_iter()
                .filter_map(|c| match c {
                    Command::Record(e) => Some(e),
                    _ => None,
                })
                .collect();
            self.absorb(records.clone());
            events.extend(records);
        }
        let starts_compensating = !was_compensating && self.st.status == RunStatus::Compensating;
        if self.st.status.is_terminal() || starts_compensating {
            // The run ends (or turns to undoing) with this commit: what still runs must stop first.
            tasks.abort_all();
            self.stop_children().await;
        }
        if events.iter().any(|e| matches!(e, Event::RunContinued { .. })) {
            // The next run is a new run in the sync outbox like any start: wait for room (this
            // run waits with it) rather than slip past the cap.
            let rt = Runtime {
                inner: self.inner.clone(),
            };
            // Only `exists` can fail, and there is none here.
            let _ = rt.wait_for_outbox_room("continue-as-new", || Ok(false)).await;
        }
        let mut delay = Duration::from_millis(100);
        loop {
            match self.inner.journal.append(&self.st.run_id, events.clone()).await {
                Ok(_) => {
                    self.inner.storage.wrote(Some(&self.st.run_id));
                    break;
                }
                Err(JournalError::RunFinished(_)) => {
                    // Finished elsewhere (cannot happen with one driver per run); stop deciding.
                    self.st.status = RunStatus::Cancelled;
                    self.next = None;
                    return;
                }
                Err(e) => {
                    self.inner
                        .storage
                        .failed(Some(&self.st.run_id), &e, self.inner.clock.now_ms());
                    error!(error = %e, retry_in = ?delay, "cannot journal; the run waits and retries");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(30));
                }
            }
        }
        if let Some(Event::RunContinued { next_run, .. }) = &self.end {
            // The next run was created in the same commit; give it a driver.
            let rt = Runtime {
                inner: self.inner.clone(),
            };
            if let Err(e) = rt.resume(next_run) {
                error!(next_run = %next_run, error = %e, "cannot start the continued run; it resumes at restart");
            } else {
                info!(next_run = %next_run, "continued as new");
            }
        }
    }
}

/// Most events one driver journals in a single commit when it chains pure decisions.
const MAX_PURE_BATCH: usize = 512;

/// Journals events for a task, retrying while storage fails; false when the run has ended.
async fn append_durably(inner: &Inner, run_id: &str, events: Vec<Event>) -> bool {
    let mut delay = Duration::from_millis(100);
    loop {
        match inner.journal.append(run_id, events.clone()).await {
            Ok(_) => {
                inner.storage.wrote(Some(run_id));
                return true;
            }
            Err(JournalError::RunFinished(_) | JournalError::NoSuchRun(_)) => return false,
            Err(e) => {
                inner.storage.failed(Some(run_id), &e, inner.clock.now_ms());
                error!(error = %e, "cannot journal attempt start; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(30));
            }
        }
    }
}

/// One attempt of an activity (or of a compensation): back off, take a slot, journal the
/// start, run, report.
async fn activity(
    inner: Arc<Inner>,
    def: Arc<Definition>,
    run_id: String,
    slot: Slot,
    args: Value,
    key: String,
    not_before_ms: Option<u64>,
) -> TaskResult {
    let (step, visit, attempt, compensation) = slot;
    let plan = &def.plans[step];
    let step_def = &def.doc.steps[step];
    let (action, policy, timeout) = match (compensation, &step_def.compensate, &plan.compensate) {
        (true, Some(call), Some(cp)) => (call.action.as_str(), &cp.retry, cp.timeout),
        _ => (step_def.action.as_str(), &plan.retry, plan.timeout),
    };
    if let Some(at) = not_before_ms {
        let cap = u64::try_from(policy.max_interval.as_millis()).unwrap_or(u64::MAX);
        tokio::time::sleep(Duration::from_millis(remaining_ms(inner.clock.now_ms(), at, cap))).await;
    }
    // An open breaker holds the attempt back before it takes any slot.
    let target = crate::breaker::target_of(action, &args, step_def.resource.as_deref());
    let mut journaled = Vec::new();
    if let Some(t) = &target {
        let mut held_until = None;
        loop {
            let until = match inner.breakers.gate(t, inner.clock.now_ms()) {
                crate::breaker::Gate::Pass | crate::breaker::Gate::Probe => break,
                crate::breaker::Gate::Wait(until) => until,
            };
            if !compensation && held_until != Some(until) {
                let deferred = Event::AttemptDeferred {
                    step: step_def.id.clone(),
                    visit,
                    attempt,
                    target: t.clone(),
                    until_ms: until,
                };
                if !append_durably(&inner, &run_id, vec![deferred.clone()]).await {
                    return TaskResult {
                        journaled,
                        to_journal: Vec::new(),
                    };
                }
                info!(target = %t, until = %outpost_shared::journal::rfc3339(until), "attempt held by an open circuit breaker");
                journaled.push(deferred);
                held_until = Some(until);
            }
            let cap = u64::try_from(inner.config.breakers.max_cooldown.as_millis()).unwrap_or(u64::MAX);
            tokio::time::sleep(Duration::from_millis(
                remaining_ms(inner.clock.now_ms(), until, cap).max(10),
            ))
            .await;
        }
    }
    let _permit = inner.activities.clone().acquire_owned().await;
    let _limits = inner
        .limits
        .activity(&run_id, &step_def.id, action, step_def.resource.as_deref())
        .await;
    let started = if compensation {
        Event::CompensationAttemptStarted {
            step: step_def.id.clone(),
            visit,
            attempt,
            key: key.clone(),
        }
    } else {
        Event::AttemptStarted {
            step: step_def.id.clone(),
            visit,
            attempt,
            key: key.clone(),
        }
    };
    // Write-ahead: no side effect before the attempt is durable.
    if !append_durably(&inner, &run_id, vec![started.clone()]).await {
        return TaskResult {
            journaled,
            to_journal: Vec::new(),
        };
    }
    journaled.push(started);
    info!(key = %key, "attempt started");
    let call = Call {
        run_id: run_id.clone(),
        step: step_def.id.clone(),
        attempt,
        key,
        args,
    };
    let rt = Runtime { inner: inner.clone() };
    let fut: crate::actions::ActionFuture = match action {
        "workflow" => Box::pin(crate::children::run_child(rt, call, visit)),
        "map" => Box::pin(crate::children::run_map(rt, call, visit)),
        _ => match inner.registry.get(action) {
            None => Box::pin(std::future::ready(Err(crate::actions::ActionError::permanent(
                "unknown_action",
                format!("action '{action}' is not available in this agent"),
            )))),
            Some(a) => a.execute(call),
        },
    };
    let began = std::time::Instant::now();
    let result = match timeout {
        Some(t) => tokio::time::timeout(t, fut).await.unwrap_or_else(|_| {
            Err(crate::actions::ActionError::retryable(
                "timeout",
                format!("attempt took longer than {}", humantime::format_duration(t)),
            ))
        }),
        None => fut.await,
    };
    inner.step_latency.observe(began.elapsed());
    if let Some(t) = &target {
        match &result {
            Ok(_) => inner.breakers.success(t),
            Err(e) if e.retryable => {
                if let Some(until) = inner.breakers.failure(t, inner.clock.now_ms(), &e.info.to_string()) {
                    warn!(target = %t, until = %outpost_shared::journal::rfc3339(until), "circuit breaker opened");
                }
            }
            Err(_) => {}
        }
    }
    let fail = |error: ErrorInfo, retryable: bool, unit: f64| {
        let failed = FailedAttempt {
            step: &step_def.id,
            visit,
            attempt,
            error,
            retryable,
            compensation,
        };
        engine::attempt_failed(plan, failed, inner.clock.now_ms(), unit)
    };
    let to_journal = match result {
        Ok(output) => {
            let text = output.to_string();
            if text.len() > MAX_OUTPUT_BYTES {
                let err = ErrorInfo::new(
                    "output_too_large",
                    format!("output is {} bytes; the limit is {MAX_OUTPUT_BYTES}", text.len()),
                );
                fail(err, false, 0.0)
            } else {
                info!("attempt succeeded");
                let (step, output) = (step_def.id.clone(), text);
                vec![if compensation {
                    Event::StepCompensated { step, visit, output }
                } else {
                    Event::StepCompleted { step, visit, output }
                }]
            }
        }
        Err(e) => {
            warn!(error = %e.info, "attempt failed");
            fail(e.info, e.retryable, fastrand::f64())
        }
    };
    TaskResult { journaled, to_journal }
}
