//! The runtime: turns the engine's decisions into effects and journals the results.
//!
//! In three parts: this module is the handle (open, start, wait, signal, approve, cancel, retry,
//! resume); `driver` is the per-run task (fold, decide, journal, act); `activity` is one
//! attempt's pipeline (back off, breaker gate, admission, write ahead, execute, report).
//! `children` holds the actions that start runs of this runtime (`workflow`, `map`).
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
use tracing::{debug, error, info, warn};

mod activity;
pub mod children;
mod driver;
mod park;
mod runs;
#[cfg(test)]
mod tests;

use driver::{Control, Driver};
use runs::{Begin, RunTable, RunTask};

use crate::actions::Registry;
use crate::clock::{Clock, SystemClock};
use crate::engine::{self, RunState, RunStatus};
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
    /// A run whose next timer is at least this far off, or that waits only for a signal or an
    /// approval, is parked: its state leaves memory until the timer or a request wakes it
    /// (`None`: keep every run in memory).
    pub park_after: Option<Duration>,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig {
            max_activities: 32,
            journal: JournalConfig::default(),
            limits: LimitsConfig::default(),
            breakers: crate::breaker::BreakerConfig::default(),
            park_after: Some(DEFAULT_PARK_AFTER),
        }
    }
}

/// The default of `RuntimeConfig::park_after`: long enough that a short sleep or a retry's
/// back-off never pays for a fold from the journal, short enough that a fleet of runs waiting
/// on long timers leaves memory at once.
pub const DEFAULT_PARK_AFTER: Duration = Duration::from_secs(5);

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
    /// Active runs: live ones with a driver, parked ones with their state in the journal only.
    runs: Mutex<RunTable>,
    /// The counter in generated ids (`new_run_id`).
    ids: std::sync::atomic::AtomicU32,
    /// Told when a parked run's wake-up is set, so the waker looks again.
    wakeups: Arc<tokio::sync::Notify>,
    /// Set once the task that wakes parked runs is started.
    waker: std::sync::OnceLock<()>,
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
    /// Hands the memory of parked runs back to the system after a burst of parks.
    trimmer: Arc<crate::memory::Trimmer>,
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
        let log = outpost_shared::fault::FullDiskWhenMarked::open(&crate::journal::log_path(&path), &marker)
            .map_err(|e| JournalError::Storage(redb::StorageError::Io(e).into()))?;
        let log: Option<Box<dyn redb::StorageBackend>> = (config.log_bytes > 0).then(|| Box::new(log) as _);
        return Journal::open_backend(
            move || outpost_shared::fault::FullDiskWhenMarked::open(&path, &marker),
            log,
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
                runs: Mutex::new(RunTable::default()),
                wakeups: Default::default(),
                ids: std::sync::atomic::AtomicU32::new(fastrand::u32(..)),
                waker: std::sync::OnceLock::new(),
                drivers: watch::channel(0).0,
                changed: watch::channel(0).0,
                journal_path,
                pruned: Mutex::new(None),
                sync: std::sync::OnceLock::new(),
                step_latency: crate::histogram::Histogram::default(),
                storage: StorageHealth::default(),
                trimmer: Arc::default(),
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
    pub fn breakers_view(&self) -> Vec<crate::breaker::BreakerView> {
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
        let mut resumed = 0;
        // A chunk at a time: the folded states of one chunk are handed to drivers (most of
        // which park at once) before the next is folded, so start-up never holds every run's
        // state at once (20,000 runs would take tens of megabytes it never gives back).
        for chunk in ids.chunks(RESUME_CHUNK) {
            resumed += self.resume_chunk(chunk).await;
        }
        Ok(resumed)
    }

    async fn resume_chunk(&self, ids: &[String]) -> usize {
        let mut ready = Vec::new();
        for id in ids {
            if lock(&self.inner.runs).contains(id) {
                continue;
            }
            match self.prepare_resume(id) {
                Ok(r) => ready.push((id.clone(), r)),
                Err(e) => {
                    error!(run_id = %id, error = %e, "cannot resume run; failing it");
                    let rt = self.clone();
                    let err = ErrorInfo::new("resume", e.to_string());
                    let id = id.clone();
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
        resumed
    }

    /// Starts a driver for a run the journal holds as active (a retried run, the next run of a
    /// continue-as-new), unless one is running.
    fn resume(&self, run_id: &str) -> Result<(), RuntimeError> {
        if lock(&self.inner.runs).contains(run_id) {
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
        // Debug: a start-up resumes every active run (20,000 lines for 20,000 runs) and the
        // daemon's "ready" line counts them; a parked run's wake-up comes here too.
        debug!(run_id, workflow = %workflow, version, events = history.len(), "resuming run");
        let child = children::parent_of(run_id, |p| self.inner.journal.run(p).ok().flatten().is_some()).is_some();
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
        let cached = lock(&self.inner.definitions).get(&(name.to_string(), v)).cloned();
        let def = match cached {
            Some(d) => d,
            None => {
                let def = Arc::new(definition::parse(&rec.json, &self.inner.registry)?);
                lock(&self.inner.definitions).insert((name.to_string(), v), def.clone());
                def
            }
        };
        // Remembered also when the version was parsed before (by `apply`): otherwise every
        // start of a workflow applied in this process read the journal for its latest version.
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
        // A run admitted at once journals its first pure decisions (a `set`, a choice, even
        // its end) in the commit that starts it: one fsync fewer per run. One that has to
        // queue for its slots decides nothing before it has them.
        let admission = if child {
            Some(Vec::new())
        } else {
            self.inner.limits.try_admit(def.name(), max_runs(&def))
        };
        let mut driver = Driver::new(self.inner.clone(), def.clone(), RunState::new(&def, &run_id, input));
        let first = match admission {
            Some(_) => driver.first_records(),
            None => Vec::new(),
        };
        let started = self.inner.journal.start_run_with(&run_id, event, first).await;
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
                let resp = StartResponse {
                    run_id,
                    created: true,
                    workflow: def.name().to_string(),
                    version: def.version(),
                };
                let mut task = RunTask::new(self.inner.clone(), resp.run_id.clone(), def, child);
                if let Some(permits) = admission {
                    task = task.admitted(permits);
                }
                runs::launch(
                    &mut lock(&self.inner.runs),
                    task,
                    Begin::Started(Box::new(driver)),
                    None,
                );
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

    /// A fresh id for a run or a signal: the wall clock's ms and a 20-bit counter. The counter
    /// (not a random number) keeps ids made in one millisecond apart: 20 random bits collided
    /// about once in 20 benchmark runs of 20,000 starts, and a colliding signal id is taken for
    /// a repeat and dropped. It starts at a random value so a restart within the same
    /// millisecond is unlikely to repeat one.
    fn new_run_id(&self) -> String {
        let n = self.inner.ids.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        format!("{:011x}{:05x}", self.inner.clock.now_ms(), n & 0xF_FFFF)
    }

    /// Waits until the run finishes or `timeout` passes; returns its summary row either way,
    /// and its final event when this call saw it end.
    pub async fn wait(
        &self,
        run_id: &str,
        timeout: Option<Duration>,
    ) -> Result<(RunRecord, Option<Event>), RuntimeError> {
        let done = lock(&self.inner.runs).done(run_id);
        let mut end = None;
        if let Some(done) = done {
            end = match timeout {
                Some(t) => tokio::time::timeout(t, done.wait()).await.ok(),
                None => Some(done.wait().await),
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
        self.ask(run_id, |reply| Control::Stop {
            reason: reason.to_string(),
            terminate,
            reply,
        })
        .await?;
        // The end is durable; wait until the driver has let go of the run too.
        self.wait(run_id, None).await.map(|(rec, _)| rec)
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

    /// A run's control channel, waking it first if it is parked; `None` when it is not active.
    fn control_of(&self, run_id: &str) -> Option<mpsc::Sender<Box<Control>>> {
        let mut table = lock(&self.inner.runs);
        table
            .control(run_id)
            .or_else(|| runs::unpark(&self.inner, &mut table, run_id, false))
    }

    /// Sends a request to a run's driver (waking the run if it is parked) and waits for its
    /// answer. A request lost because the run parked just then is sent again: see
    /// [`runs`] for why that is safe.
    async fn ask(
        &self,
        run_id: &str,
        make: impl Fn(oneshot::Sender<Result<bool, RuntimeError>>) -> Control,
    ) -> Result<bool, RuntimeError> {
        for _ in 0..ASK_ATTEMPTS {
            let Some(control) = self.control_of(run_id) else {
                return Err(self.not_active(run_id)?);
            };
            let (tx, rx) = oneshot::channel();
            if control.send(Box::new(make(tx))).await.is_err() {
                continue;
            }
            if let Ok(r) = rx.await {
                return r;
            }
        }
        Err(self.not_active(run_id)?)
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
        self.ask(run_id, |reply| Control::Signal {
            name: name.to_string(),
            id: id.clone(),
            payload: payload.clone(),
            by: by.clone(),
            reply,
        })
        .await
    }

    /// Approves or rejects an approval step that is waiting. Returns false for a repeated id.
    pub async fn approve(&self, run_id: &str, decision: Decision) -> Result<bool, RuntimeError> {
        let id = decision.id.unwrap_or_else(|| self.new_run_id());
        self.ask(run_id, |reply| Control::Approve {
            step: decision.step.clone(),
            approved: decision.approved,
            vouched: decision.vouched,
            by: decision.by.clone(),
            comment: decision.comment.clone(),
            id: id.clone(),
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

    /// A burst of one-off work just ended (start-up, a new sync session): hand its freed heap and
    /// the code it alone ran back to the system soon (see `memory`).
    pub fn trim_soon(&self) {
        self.inner.trimmer.freed();
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
        lock(&self.inner.runs).ids().any(|id| id.starts_with(prefix))
    }

    /// Live runs whose id is `base` or starts with `base:` (a step's child runs).
    pub(crate) fn children_of(&self, base: &str) -> Vec<String> {
        let prefix = format!("{base}:");
        lock(&self.inner.runs)
            .ids()
            .filter(|id| *id == base || id.starts_with(&prefix))
            .map(str::to_string)
            .collect()
    }

    fn spawn_driver(&self, def: Arc<Definition>, st: RunState, child: bool) {
        let task = RunTask::new(self.inner.clone(), st.run_id.clone(), def, child);
        runs::launch(&mut lock(&self.inner.runs), task, Begin::With(Box::new(st)), None);
    }

    /// How many active runs are parked: their state is only in the journal.
    pub fn parked_count(&self) -> usize {
        lock(&self.inner.runs).parked()
    }
}

/// Runs folded at a time at start-up.
const RESUME_CHUNK: usize = 256;

/// Times a request is sent to a run that keeps parking under it before giving up.
const ASK_ATTEMPTS: usize = 8;

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
