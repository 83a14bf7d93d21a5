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
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::task::JoinSet;
use tracing::{Instrument, error, info, info_span, warn};

use crate::actions::{Call, Registry};
use crate::clock::{Clock, SystemClock, remaining_ms};
use crate::engine::{self, Command, FailedAttempt, RunState, RunStatus};
use crate::journal::{Applied, Journal, JournalConfig, JournalError, RunRecord, Started};

/// Largest run input accepted, in bytes of JSON.
pub const MAX_INPUT_BYTES: usize = 256 * 1024;
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
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig {
            max_activities: 32,
            journal: JournalConfig::default(),
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
    cancel: mpsc::Sender<String>,
    /// Becomes the run's final event when its driver stops.
    done: watch::Receiver<Option<Event>>,
}

struct Inner {
    journal: Journal,
    registry: Registry,
    clock: Arc<dyn Clock>,
    activities: Arc<Semaphore>,
    config: RuntimeConfig,
    definitions: Mutex<HashMap<(String, u32), Arc<Definition>>>,
    /// Latest version per name, for names looked up since start (this process owns the journal).
    latest: Mutex<HashMap<String, u32>>,
    runs: Mutex<HashMap<String, RunHandle>>,
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
        let journal = Journal::open(&data_dir.join("journal.redb"), &config.journal, clock.clone())?;
        Ok(Runtime {
            inner: Arc::new(Inner {
                journal,
                registry,
                clock,
                activities: Arc::new(Semaphore::new(config.max_activities.max(1))),
                config,
                definitions: Mutex::new(HashMap::new()),
                latest: Mutex::new(HashMap::new()),
                runs: Mutex::new(HashMap::new()),
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

    /// Runs with a live driver.
    pub fn active_count(&self) -> usize {
        lock(&self.inner.runs).len()
    }

    /// Resumes every unfinished run from its journaled history. Returns how many resumed.
    pub fn resume_all(&self) -> Result<usize, RuntimeError> {
        let ids = self.inner.journal.active_runs()?;
        let mut resumed = 0;
        for id in ids {
            match self.resume(&id) {
                Ok(()) => resumed += 1,
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
        Ok(resumed)
    }

    fn resume(&self, run_id: &str) -> Result<(), RuntimeError> {
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
        self.spawn_driver(def, st);
        Ok(())
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

    /// Starts a run, or returns the existing one with the same id.
    pub async fn start(&self, req: StartRequest) -> Result<StartResponse, RuntimeError> {
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
        let event = Event::RunStarted {
            workflow: def.name().to_string(),
            version: def.version(),
            input: input_text,
        };
        match self.inner.journal.start_run(&run_id, event).await? {
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
                self.spawn_driver(def, st);
                Ok(resp)
            }
        }
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

    /// Cancels a run: stops its activities and journals `RunCancelled`. Returns its final row.
    pub async fn cancel(&self, run_id: &str, reason: &str) -> Result<RunRecord, RuntimeError> {
        let handle = lock(&self.inner.runs)
            .get(run_id)
            .map(|h| (h.cancel.clone(), h.done.clone()));
        match handle {
            Some((cancel, mut done)) => {
                let _ = cancel.send(reason.to_string()).await;
                let _ = done.wait_for(Option::is_some).await;
                self.inner
                    .journal
                    .run(run_id)?
                    .ok_or_else(|| RuntimeError::NoSuchRun(run_id.to_string()))
            }
            None => match self.inner.journal.run(run_id)? {
                Some(rec) if rec.status.is_terminal() => Err(RuntimeError::Finished {
                    run: run_id.to_string(),
                    status: rec.status.as_str(),
                }),
                Some(rec) => Ok(rec),
                None => Err(RuntimeError::NoSuchRun(run_id.to_string())),
            },
        }
    }

    fn spawn_driver(&self, def: Arc<Definition>, st: RunState) {
        let (cancel_tx, cancel_rx) = mpsc::channel(1);
        let (done_tx, done_rx) = watch::channel(None);
        let run_id = st.run_id.clone();
        lock(&self.inner.runs).insert(
            run_id.clone(),
            RunHandle {
                cancel: cancel_tx,
                done: done_rx,
            },
        );
        let inner = self.inner.clone();
        let span = info_span!("run", run_id = %run_id, workflow = def.name());
        tokio::spawn(
            async move {
                let end = Driver {
                    inner: inner.clone(),
                    def,
                    st,
                    next: None,
                }
                .run(cancel_rx)
                .await;
                lock(&inner.runs).remove(&run_id);
                let _ = done_tx.send(Some(end));
            }
            .instrument(span),
        );
    }
}

fn check_run_id(id: &str) -> Result<(), RuntimeError> {
    let ok = !id.is_empty()
        && id.len() <= MAX_RUN_ID_LEN
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':'));
    if ok {
        Ok(())
    } else {
        Err(RuntimeError::Invalid(format!(
            "run id '{id}' must be 1-{MAX_RUN_ID_LEN} characters of letters, digits, '-', '_', '.', ':'"
        )))
    }
}

/// Identifies an activity or timer task: (step, visit, attempt); timers use attempt 0.
type Slot = (usize, u32, u32);

/// What a finished task hands back: events already journaled, then events to journal.
struct TaskResult {
    journaled: Vec<Event>,
    to_journal: Vec<Event>,
}

struct Driver {
    inner: Arc<Inner>,
    def: Arc<Definition>,
    st: RunState,
    /// Decisions already made for the current state (by the look-ahead in `journal`).
    next: Option<Vec<Command>>,
}

impl Driver {
    /// Drives the run to its end; returns the final event.
    async fn run(mut self, mut cancel_rx: mpsc::Receiver<String>) -> Event {
        let mut tasks: JoinSet<TaskResult> = JoinSet::new();
        let mut slots: HashMap<tokio::task::Id, Slot> = HashMap::new();
        loop {
            let mut records = Vec::new();
            let decided = self.next.take().unwrap_or_else(|| engine::decide(&self.def, &self.st));
            for cmd in decided {
                match cmd {
                    Command::Record(e) => records.push(e),
                    Command::StartTimer {
                        step,
                        visit,
                        duration_ms,
                    } => {
                        let fire_at_ms = self.inner.clock.now_ms().saturating_add(duration_ms);
                        let id = self.def.doc.steps[step].id.clone();
                        records.push(Event::TimerSet {
                            step: id,
                            visit,
                            fire_at_ms,
                            duration_ms,
                        });
                    }
                    Command::AwaitTimer {
                        step,
                        visit,
                        fire_at_ms,
                        duration_ms,
                    } => {
                        let slot = (step, visit, 0);
                        if !slots.values().any(|s| *s == slot) {
                            let clock = self.inner.clock.clone();
                            let id = self.def.doc.steps[step].id.clone();
                            let h = tasks.spawn(
                                async move {
                                    let wait = remaining_ms(clock.now_ms(), fire_at_ms, duration_ms);
                                    tokio::time::sleep(Duration::from_millis(wait)).await;
                                    TaskResult {
                                        journaled: Vec::new(),
                                        to_journal: vec![
                                            Event::TimerFired {
                                                step: id.clone(),
                                                visit,
                                                fire_at_ms,
                                            },
                                            Event::StepCompleted {
                                                step: id,
                                                visit,
                                                output: "null".into(),
                                            },
                                        ],
                                    }
                                }
                                .in_current_span(),
                            );
                            slots.insert(h.id(), slot);
                        }
                    }
                    Command::RunActivity {
                        step,
                        visit,
                        attempt,
                        args,
                        key,
                        not_before_ms,
                    } => {
                        let slot = (step, visit, attempt);
                        if !slots.values().any(|s| *s == slot) {
                            let fut = activity(
                                self.inner.clone(),
                                self.def.clone(),
                                self.st.run_id.clone(),
                                slot,
                                args,
                                key,
                                not_before_ms,
                            );
                            let span = info_span!("step", step = %self.def.doc.steps[step].id, attempt);
                            let h = tasks.spawn(fut.instrument(span));
                            slots.insert(h.id(), slot);
                        }
                    }
                }
            }
            if !records.is_empty() {
                self.journal(records, &mut tasks).await;
                if self.st.status.is_terminal() {
                    break;
                }
                continue;
            }
            if tasks.is_empty() {
                // Nothing to run and nothing running: the definition cannot make progress.
                let err = ErrorInfo::new("engine.stuck", "no step can run and none is running");
                self.journal(vec![Event::RunFailed { error: err }], &mut tasks).await;
                break;
            }
            tokio::select! {
                joined = tasks.join_next_with_id() => match joined {
                    Some(Ok((id, res))) => {
                        slots.remove(&id);
                        self.absorb(res.journaled);
                        if !res.to_journal.is_empty() {
                            self.journal(res.to_journal, &mut tasks).await;
                        }
                        if self.st.status.is_terminal() {
                            break;
                        }
                    }
                    Some(Err(e)) => {
                        let slot = slots.remove(&e.id());
                        if e.is_panic() {
                            error!(?slot, "activity task panicked");
                            if let Some((step, visit, attempt)) = slot {
                                let id = self.def.doc.steps[step].id.clone();
                                let failed = FailedAttempt {
                                    step: &id,
                                    visit,
                                    attempt,
                                    error: ErrorInfo::new("internal", "the action panicked"),
                                    retryable: false,
                                };
                                let events = engine::attempt_failed(
                                    &self.def.plans[step],
                                    failed,
                                    self.inner.clock.now_ms(),
                                    0.0,
                                );
                                self.journal(events, &mut tasks).await;
                                if self.st.status.is_terminal() {
                                    break;
                                }
                            }
                        }
                    }
                    None => {}
                },
                reason = cancel_rx.recv() => {
                    tasks.abort_all();
                    let reason = reason.unwrap_or_else(|| "shutdown".into());
                    info!(%reason, "run cancelled");
                    self.journal(vec![Event::RunCancelled { reason }], &mut tasks).await;
                    break;
                }
            }
        }
        match self.st.status {
            RunStatus::Completed => info!("run completed"),
            RunStatus::Failed => {
                warn!(error = %self.st.error.as_ref().map(|e| e.to_string()).unwrap_or_default(), "run failed")
            }
            _ => {}
        }
        match self.st.status {
            RunStatus::Completed => Event::RunCompleted {
                output: self
                    .st
                    .output
                    .as_ref()
                    .map(Value::to_string)
                    .unwrap_or_else(|| "null".into()),
            },
            RunStatus::Cancelled | RunStatus::Running => Event::RunCancelled {
                reason: self.st.error.as_ref().map(|e| e.message.clone()).unwrap_or_default(),
            },
            RunStatus::Failed => Event::RunFailed {
                error: self.st.error.clone().unwrap_or_else(|| ErrorInfo::new("unknown", "")),
            },
        }
    }

    fn absorb(&mut self, events: Vec<Event>) {
        self.next = None;
        for e in &events {
            if let Err(err) = self.st.apply(&self.def, e) {
                error!(error = %err, "journaled event does not fit the definition");
            }
        }
    }

    /// Journals events (retrying while storage fails: nothing is lost, the run just waits) and
    /// folds them into the state. When these events make the run's end certain, the end is
    /// journaled in the same commit: it is a pure consequence, so no effect depends on it early.
    async fn journal(&mut self, mut events: Vec<Event>, tasks: &mut JoinSet<TaskResult>) {
        self.absorb(events.clone());
        if !self.st.status.is_terminal() {
            let next = engine::decide(&self.def, &self.st);
            if let [Command::Record(end)] = next.as_slice()
                && end.is_terminal()
            {
                self.absorb(vec![end.clone()]);
                events.push(end.clone());
            } else {
                // The state will not change before the driver decides again: keep the decision.
                self.next = Some(next);
            }
        }
        if self.st.status.is_terminal() {
            // The run ends with this commit: whatever is still running must stop first.
            tasks.abort_all();
        }
        let mut delay = Duration::from_millis(100);
        loop {
            match self.inner.journal.append(&self.st.run_id, events.clone()).await {
                Ok(_) => break,
                Err(JournalError::RunFinished(_)) => {
                    // Finished elsewhere (cannot happen with one driver per run); stop deciding.
                    self.st.status = RunStatus::Cancelled;
                    self.next = None;
                    return;
                }
                Err(e) => {
                    error!(error = %e, retry_in = ?delay, "cannot journal; the run waits and retries");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(30));
                }
            }
        }
    }
}

/// One attempt of an activity: back off, take a slot, journal the start, run, report.
async fn activity(
    inner: Arc<Inner>,
    def: Arc<Definition>,
    run_id: String,
    slot: Slot,
    args: Value,
    key: String,
    not_before_ms: Option<u64>,
) -> TaskResult {
    let (step, visit, attempt) = slot;
    let plan = &def.plans[step];
    let step_def = &def.doc.steps[step];
    if let Some(at) = not_before_ms {
        let cap = u64::try_from(plan.retry.max_interval.as_millis()).unwrap_or(u64::MAX);
        tokio::time::sleep(Duration::from_millis(remaining_ms(inner.clock.now_ms(), at, cap))).await;
    }
    let _permit = inner.activities.clone().acquire_owned().await;
    let started = Event::AttemptStarted {
        step: step_def.id.clone(),
        visit,
        attempt,
        key: key.clone(),
    };
    // Write-ahead: no side effect before the attempt is durable.
    let mut delay = Duration::from_millis(100);
    loop {
        match inner.journal.append(&run_id, vec![started.clone()]).await {
            Ok(_) => break,
            Err(JournalError::RunFinished(_) | JournalError::NoSuchRun(_)) => {
                return TaskResult {
                    journaled: Vec::new(),
                    to_journal: Vec::new(),
                };
            }
            Err(e) => {
                error!(error = %e, "cannot journal attempt start; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(30));
            }
        }
    }
    info!(key = %key, "attempt started");
    let result = match inner.registry.get(&step_def.action) {
        None => Err(crate::actions::ActionError::permanent(
            "unknown_action",
            format!("action '{}' is not available in this agent", step_def.action),
        )),
        Some(action) => {
            let fut = action.execute(Call {
                run_id: run_id.clone(),
                step: step_def.id.clone(),
                attempt,
                key,
                args,
            });
            match plan.timeout {
                Some(t) => tokio::time::timeout(t, fut).await.unwrap_or_else(|_| {
                    Err(crate::actions::ActionError::retryable(
                        "timeout",
                        format!("attempt took longer than {}", humantime::format_duration(t)),
                    ))
                }),
                None => fut.await,
            }
        }
    };
    let to_journal = match result {
        Ok(output) => {
            let text = output.to_string();
            if text.len() > MAX_OUTPUT_BYTES {
                let err = ErrorInfo::new(
                    "output_too_large",
                    format!("output is {} bytes; the limit is {MAX_OUTPUT_BYTES}", text.len()),
                );
                let failed = FailedAttempt {
                    step: &step_def.id,
                    visit,
                    attempt,
                    error: err,
                    retryable: false,
                };
                engine::attempt_failed(plan, failed, inner.clock.now_ms(), 0.0)
            } else {
                info!("attempt succeeded");
                vec![Event::StepCompleted {
                    step: step_def.id.clone(),
                    visit,
                    output: text,
                }]
            }
        }
        Err(e) => {
            warn!(error = %e.info, "attempt failed");
            let failed = FailedAttempt {
                step: &step_def.id,
                visit,
                attempt,
                error: e.info,
                retryable: e.retryable,
            };
            engine::attempt_failed(plan, failed, inner.clock.now_ms(), fastrand::f64())
        }
    };
    TaskResult {
        journaled: vec![started],
        to_journal,
    }
}
