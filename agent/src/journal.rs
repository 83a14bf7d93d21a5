//! The journal: every run's append-only history in one redb file.
//!
//! One writer thread owns all writes. Appends from every run queue on a channel; the writer
//! takes everything queued, writes it in one transaction, commits once (one fsync), and only
//! then answers every waiter (group commit). Reads run concurrently on redb snapshots from any
//! thread. Each event gets a device-wide, gap-free sequence number: the `events` table keyed by
//! it is also the outbox that sync will ship from.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use outpost_shared::journal::{self as codec, CodecError, Event, Record};
use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

use crate::clock::Clock;
use crate::engine::RunStatus;

/// seq → encoded [`Record`]. The journal proper and the sync outbox.
const EVENTS: TableDefinition<u64, &[u8]> = TableDefinition::new("events");
/// (run id, seq) → (): a run's history in order.
const RUN_EVENTS: TableDefinition<(&str, u64), ()> = TableDefinition::new("run_events");
/// run id → encoded [`RunRecord`]: one summary row per run.
const RUNS: TableDefinition<&str, &[u8]> = TableDefinition::new("runs");
/// run id → (): runs that are not finished, resumed at start-up.
const ACTIVE: TableDefinition<&str, ()> = TableDefinition::new("active_runs");
/// (name, version) → encoded [`DefinitionRecord`].
const DEFINITIONS: TableDefinition<(&str, u32), &[u8]> = TableDefinition::new("definitions");
/// (deadline ms, run id, step) → (): pending durable timers by deadline.
const TIMERS: TableDefinition<(u64, &str, &str), ()> = TableDefinition::new("timers");
/// Counters: `next_seq`, `format`.
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// Named positions kept by agent services: schedule slots, trigger marks, sync acks.
const CURSORS: TableDefinition<&str, u64> = TableDefinition::new("cursors");
/// Small named records kept by agent services (applied cloud commands, desired state).
const KV: TableDefinition<&str, &[u8]> = TableDefinition::new("kv");
/// Cursor: the newest sequence retention has deleted.
const PRUNED_THROUGH: &str = "journal/pruned_through";

/// Version of the table layout above; bumped on any incompatible change.
pub const FORMAT: u64 = 1;
/// Most operations folded into one transaction.
const MAX_BATCH: usize = 4096;

/// Journal settings.
#[derive(Debug, Clone)]
pub struct JournalConfig {
    /// Page cache in bytes (redb's default of 1 GiB is far too much for a gateway).
    pub cache_bytes: usize,
}

impl Default for JournalConfig {
    fn default() -> Self {
        JournalConfig {
            cache_bytes: 4 * 1024 * 1024,
        }
    }
}

/// A journal failure.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    /// redb reported an error (I/O, full disk, corruption).
    #[error("journal storage error: {0}")]
    Storage(#[from] redb::Error),
    /// A record did not decode.
    #[error(transparent)]
    Codec(#[from] CodecError),
    /// The database file is held by another process.
    #[error("journal {0} is already open in another process (is another `outpost run` using this data directory?)")]
    Locked(String),
    /// The file was written by an incompatible version.
    #[error("journal format {found} is not supported (this build reads format {FORMAT})")]
    Format {
        /// Format found.
        found: u64,
    },
    /// The writer thread has stopped.
    #[error("journal writer has stopped")]
    Closed,
    /// The file reads, but what it holds does not decode.
    #[error("journal damaged: {0}")]
    Damaged(String),
    /// The file was not closed cleanly and needs the repair only a writer does.
    #[error("journal {0} was not closed cleanly and needs the repair the agent does when it opens it")]
    NeedsRepair(String),
    /// The journal is being reopened after a storage error; try again shortly.
    #[error("journal is reopening after a storage error; try again")]
    Reopening,
    /// Appending to a run that does not exist.
    #[error("run '{0}' does not exist")]
    NoSuchRun(String),
    /// Appending to a run that has finished.
    #[error("run '{0}' has already finished")]
    RunFinished(String),
    /// The definition version exists with different content.
    #[error("{name} version {version} already exists with different content; bump the version to change it")]
    DefinitionConflict {
        /// Name.
        name: String,
        /// Version.
        version: u32,
    },
}

macro_rules! storage_from {
    ($($t:ty),*) => {$(
        impl From<$t> for JournalError {
            fn from(e: $t) -> Self { JournalError::Storage(e.into()) }
        }
    )*};
}
storage_from!(
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError,
    redb::SetDurabilityError
);

/// Summary row of one run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunRecord {
    /// Workflow name.
    pub workflow: String,
    /// Workflow version.
    pub version: u32,
    /// Status.
    pub status: RunStatus,
    /// Created (ms since epoch).
    pub created_ms: u64,
    /// Finished (ms since epoch); the row is written only at start and at the end, so appends
    /// in between touch just the event tables.
    pub finished_ms: Option<u64>,
}

#[derive(Serialize, Deserialize)]
enum RunRecordEnvelope {
    V1(RunRecord),
}

/// A stored definition version.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DefinitionRecord {
    /// Canonical JSON of the document.
    pub json: String,
    /// When it was applied (ms since epoch).
    pub applied_ms: u64,
}

#[derive(Serialize, Deserialize)]
enum DefinitionEnvelope {
    V1(DefinitionRecord),
}

fn encode_run(r: &RunRecord) -> Vec<u8> {
    postcard::to_allocvec(&RunRecordEnvelope::V1(r.clone())).unwrap_or_default()
}

fn decode_run(b: &[u8]) -> Result<RunRecord, JournalError> {
    match postcard::from_bytes::<RunRecordEnvelope>(b) {
        Ok(RunRecordEnvelope::V1(r)) => Ok(r),
        Err(source) => Err(CodecError::Corrupt { len: b.len(), source }.into()),
    }
}

fn decode_definition(b: &[u8]) -> Result<DefinitionRecord, JournalError> {
    match postcard::from_bytes::<DefinitionEnvelope>(b) {
        Ok(DefinitionEnvelope::V1(r)) => Ok(r),
        Err(source) => Err(CodecError::Corrupt { len: b.len(), source }.into()),
    }
}

/// What starting a run did.
#[derive(Debug, Clone)]
pub enum Started {
    /// A new run was journaled.
    Created,
    /// A run with that id already existed; nothing was written.
    Existing(RunRecord),
}

/// What applying a definition did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// Stored as a new version.
    Created,
    /// The same version with the same content was already stored.
    Unchanged,
}

type Reply<T> = oneshot::Sender<Result<T, JournalError>>;

enum Op {
    Start {
        run_id: String,
        event: Event,
        reply: Reply<Started>,
    },
    Append {
        run_id: String,
        events: Vec<Event>,
        reply: Reply<u64>,
    },
    PutDefinition {
        name: String,
        version: u32,
        json: String,
        reply: Reply<Applied>,
    },
    PutCursor {
        key: String,
        value: u64,
        reply: Reply<()>,
    },
    Prune {
        policy: Retention,
        reply: Reply<Pruned>,
    },
    PutKv {
        key: String,
        value: Vec<u8>,
        reply: Reply<()>,
    },
    /// Close the database cleanly and stop the writer (taken out of a batch before it commits).
    Close {
        reply: Reply<()>,
    },
}

/// Which finished runs may be deleted.
#[derive(Debug, Clone, Copy)]
pub struct Retention {
    /// Runs that finished before this wall-clock time go.
    pub finished_before_ms: u64,
    /// While the database holds more than this many bytes, the oldest finished runs go too.
    pub max_bytes: u64,
    /// Events at or after this sequence are kept (not yet acknowledged by the cloud).
    pub keep_from_seq: u64,
    /// At most this many runs per call, so one prune never holds the writer for long.
    pub max_runs: usize,
}

/// What a prune did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Pruned {
    /// Runs deleted.
    pub runs: u64,
    /// Events deleted.
    pub events: u64,
    /// Applied-command rows forgotten.
    pub commands: u64,
    /// Definition versions deleted (not the newest, used by no run).
    pub definitions: u64,
    /// Bytes in use (allocated pages) before the prune.
    pub bytes_before: u64,
}

/// Writer statistics, for `outpost status` and the benchmark.
#[derive(Debug, Default)]
pub struct Stats {
    /// Transactions committed.
    pub commits: AtomicU64,
    /// Events appended.
    pub events: AtomicU64,
    /// Operations (appends, starts, definitions) folded into commits.
    pub ops: AtomicU64,
}

/// Opens the database again; redb must be reopened after an I/O error.
type Opener = Box<dyn Fn() -> Result<Database, JournalError> + Send>;

/// The current database handle, shared by readers and swapped by the writer after a reopen
/// (read-only for `open_read_only`).
type Slot = Arc<RwLock<Option<Arc<dyn ReadableDatabase + Send + Sync>>>>;

/// Handle to the journal; cheap to clone.
#[derive(Clone)]
pub struct Journal {
    db: Slot,
    tx: mpsc::Sender<Op>,
    stats: Arc<Stats>,
    /// The next sequence after each commit: the outbox's "new events" signal.
    committed: tokio::sync::watch::Receiver<u64>,
}

impl Journal {
    /// Opens (or creates) the journal at `path` and starts its writer thread.
    pub fn open(path: &Path, config: &JournalConfig, clock: Arc<dyn Clock>) -> Result<Journal, JournalError> {
        let path = path.to_path_buf();
        let cache = config.cache_bytes;
        Self::start(
            Box::new(move || {
                Database::builder()
                    .set_cache_size(cache)
                    .create(&path)
                    .map_err(|e| match e {
                        redb::DatabaseError::DatabaseAlreadyOpen => JournalError::Locked(path.display().to_string()),
                        other => other.into(),
                    })
            }),
            clock,
        )
    }

    /// Opens a journal on redb storage backends made by `backend` (called again to reopen after an
    /// I/O error). Tests use this to inject faults.
    pub fn open_backend<B: redb::StorageBackend>(
        backend: impl Fn() -> std::io::Result<B> + Send + 'static,
        config: &JournalConfig,
        clock: Arc<dyn Clock>,
    ) -> Result<Journal, JournalError> {
        let cache = config.cache_bytes;
        Self::start(
            Box::new(move || {
                Ok(Database::builder().set_cache_size(cache).create_with_backend(
                    backend().map_err(|e| JournalError::Storage(redb::StorageError::Io(e).into()))?,
                )?)
            }),
            clock,
        )
    }

    fn start(opener: Opener, clock: Arc<dyn Clock>) -> Result<Journal, JournalError> {
        let db = Arc::new(opener()?);
        let (next_seq, active) = prepare(&db)?;
        let slot: Slot = Arc::new(RwLock::new(Some(db.clone() as Arc<dyn ReadableDatabase + Send + Sync>)));
        let stats = Arc::new(Stats::default());
        let (tx, rx) = mpsc::channel(MAX_BATCH);
        let (committed_tx, committed) = tokio::sync::watch::channel(next_seq);
        let writer = Writer {
            committed: committed_tx,
            db: Some(db),
            slot: slot.clone(),
            opener,
            next_seq,
            clock,
            stats: stats.clone(),
            active,
            started: HashSet::new(),
            finished: HashSet::new(),
        };
        std::thread::Builder::new()
            .name("journal-writer".into())
            .spawn(move || writer.run(rx))
            .map_err(|e| JournalError::Storage(redb::StorageError::Io(e).into()))?;
        Ok(Journal {
            db: slot,
            tx,
            stats,
            committed,
        })
    }

    /// Opens the journal at `path` for reading only, with no writer (`outpost list --offline`):
    /// every write fails with `Closed`. Refused while an agent holds the file, and when the file
    /// needs the repair that only a writer may do (the agent was killed: start it once).
    pub fn open_read_only(path: &Path) -> Result<Journal, JournalError> {
        let db = redb::Builder::new()
            .set_cache_size(4 * 1024 * 1024)
            .open_read_only(path)
            .map_err(|e| match e {
                redb::DatabaseError::DatabaseAlreadyOpen => JournalError::Locked(path.display().to_string()),
                redb::DatabaseError::RepairAborted => JournalError::NeedsRepair(path.display().to_string()),
                redb::DatabaseError::Storage(redb::StorageError::Io(io))
                    if io.kind() == std::io::ErrorKind::NotFound =>
                {
                    JournalError::Damaged(format!("{} does not exist (wrong --data-dir?)", path.display()))
                }
                other => other.into(),
            })?;
        let format = db
            .begin_read()?
            .open_table(META)
            .ok()
            .and_then(|t| t.get("format").ok().flatten().map(|v| v.value()));
        if let Some(found) = format.filter(|f| *f != FORMAT) {
            return Err(JournalError::Format { found });
        }
        Ok(Self::reader(Arc::new(db)))
    }

    /// Reads a journal that needs repair without touching it: copies `path` to `copy`, repairs
    /// the copy and opens that with no writer (every write fails with `Closed`).
    pub fn open_repaired_copy(path: &Path, copy: &Path) -> Result<Journal, JournalError> {
        std::fs::copy(path, copy).map_err(|e| JournalError::Storage(redb::StorageError::Io(e).into()))?;
        let db = Database::builder().set_cache_size(4 * 1024 * 1024).create(copy)?;
        Ok(Self::reader(Arc::new(db)))
    }

    fn reader(db: Arc<dyn ReadableDatabase + Send + Sync>) -> Journal {
        let (tx, _) = mpsc::channel(1);
        let (_, committed) = tokio::sync::watch::channel(0);
        Journal {
            db: Arc::new(RwLock::new(Some(db))),
            tx,
            stats: Arc::new(Stats::default()),
            committed,
        }
    }

    /// The current database, or an error while the writer is reopening it.
    fn db(&self) -> Result<Arc<dyn ReadableDatabase + Send + Sync>, JournalError> {
        self.db
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or(JournalError::Reopening)
    }

    async fn call<T>(&self, make: impl FnOnce(Reply<T>) -> Op) -> Result<T, JournalError> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(make(reply)).await.map_err(|_| JournalError::Closed)?;
        rx.await.map_err(|_| JournalError::Closed)?
    }

    /// Commits what is queued, closes the database cleanly (the next start needs no repair) and
    /// stops the writer; later calls fail with `Closed`.
    pub async fn close(&self) -> Result<(), JournalError> {
        self.call(|reply| Op::Close { reply }).await
    }

    /// Journals a new run's `RunStarted`, unless a run with that id exists. Durable on return.
    pub async fn start_run(&self, run_id: &str, event: Event) -> Result<Started, JournalError> {
        self.call(|reply| Op::Start {
            run_id: run_id.to_string(),
            event,
            reply,
        })
        .await
    }

    /// Appends events to a running run. Durable on return; gives the last sequence number.
    pub async fn append(&self, run_id: &str, events: Vec<Event>) -> Result<u64, JournalError> {
        self.call(|reply| Op::Append {
            run_id: run_id.to_string(),
            events,
            reply,
        })
        .await
    }

    /// Stores a definition version (canonical JSON).
    pub async fn put_definition(&self, name: &str, version: u32, json: String) -> Result<Applied, JournalError> {
        self.call(|reply| Op::PutDefinition {
            name: name.to_string(),
            version,
            json,
            reply,
        })
        .await
    }

    /// Durably sets a named cursor (a schedule's last slot, a sync position).
    pub async fn put_cursor(&self, key: &str, value: u64) -> Result<(), JournalError> {
        self.call(|reply| Op::PutCursor {
            key: key.to_string(),
            value,
            reply,
        })
        .await
    }

    /// Watches the next sequence number, updated after every commit.
    pub fn commits(&self) -> tokio::sync::watch::Receiver<u64> {
        self.committed.clone()
    }

    /// Up to `limit` events from `from` on, as their stored record bytes (the sync outbox), and
    /// no more than `max_bytes` of them (but at least one).
    pub fn raw_events_since(
        &self,
        from: u64,
        limit: usize,
        max_bytes: usize,
    ) -> Result<Vec<(u64, Vec<u8>)>, JournalError> {
        let txn = self.db()?.begin_read()?;
        let events = txn.open_table(EVENTS)?;
        let mut out = Vec::new();
        let mut bytes = 0usize;
        for row in events.range(from..)?.take(limit) {
            let (k, v) = row?;
            let v = v.value();
            // Always one, so a large record still moves; the caller shrinks it for the wire.
            if !out.is_empty() && bytes + v.len() > max_bytes {
                break;
            }
            bytes += v.len();
            out.push((k.value(), v.to_vec()));
        }
        Ok(out)
    }

    /// Durably stores a small named record.
    pub async fn put_kv(&self, key: &str, value: Vec<u8>) -> Result<(), JournalError> {
        self.call(|reply| Op::PutKv {
            key: key.to_string(),
            value,
            reply,
        })
        .await
    }

    /// A small named record, if stored.
    pub fn kv(&self, key: &str) -> Result<Option<Vec<u8>>, JournalError> {
        let txn = self.db()?.begin_read()?;
        Ok(txn.open_table(KV)?.get(key)?.map(|v| v.value().to_vec()))
    }

    /// Deletes finished runs (their rows and events) per `policy`.
    pub async fn prune(&self, policy: Retention) -> Result<Pruned, JournalError> {
        self.call(|reply| Op::Prune { policy, reply }).await
    }

    /// The oldest sequence from which every event is still here: retention deletes whole runs,
    /// so below the newest sequence it ever deleted there may be holes.
    pub fn resend_floor(&self) -> Result<u64, JournalError> {
        Ok(self.cursor(PRUNED_THROUGH)?.map_or(1, |s| s.saturating_add(1)))
    }

    /// A named cursor, if set.
    pub fn cursor(&self, key: &str) -> Result<Option<u64>, JournalError> {
        let txn = self.db()?.begin_read()?;
        Ok(txn.open_table(CURSORS)?.get(key)?.map(|v| v.value()))
    }

    /// Wall-clock time of the newest event: a floor for a clock that may have been reset.
    pub fn last_event_ms(&self) -> Result<Option<u64>, JournalError> {
        let txn = self.db()?.begin_read()?;
        let t = txn.open_table(EVENTS)?;
        match t.last()? {
            Some((_, v)) => Ok(Some(codec::decode(v.value())?.at_ms)),
            None => Ok(None),
        }
    }

    /// Writer counters.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// The summary row of a run.
    pub fn run(&self, run_id: &str) -> Result<Option<RunRecord>, JournalError> {
        let txn = self.db()?.begin_read()?;
        let runs = txn.open_table(RUNS)?;
        runs.get(run_id)?.map(|v| decode_run(v.value())).transpose()
    }

    /// Runs, newest first by creation, optionally only those with `status`.
    pub fn runs(&self, status: Option<RunStatus>, limit: usize) -> Result<Vec<(String, RunRecord)>, JournalError> {
        let txn = self.db()?.begin_read()?;
        let runs = txn.open_table(RUNS)?;
        let mut out = Vec::new();
        for row in runs.iter()? {
            let (k, v) = row?;
            let r = decode_run(v.value())?;
            if status.is_none_or(|s| s == r.status) {
                out.push((k.value().to_string(), r));
            }
        }
        out.sort_by(|a, b| b.1.created_ms.cmp(&a.1.created_ms).then_with(|| a.0.cmp(&b.0)));
        out.truncate(limit);
        Ok(out)
    }

    /// Ids of runs that have not finished.
    pub fn active_runs(&self) -> Result<Vec<String>, JournalError> {
        let txn = self.db()?.begin_read()?;
        let t = txn.open_table(ACTIVE)?;
        let mut out = Vec::new();
        for row in t.iter()? {
            out.push(row?.0.value().to_string());
        }
        Ok(out)
    }

    /// A run's whole history with sequence numbers, in order.
    pub fn history(&self, run_id: &str) -> Result<Vec<(u64, Record)>, JournalError> {
        let txn = self.db()?.begin_read()?;
        let idx = txn.open_table(RUN_EVENTS)?;
        let events = txn.open_table(EVENTS)?;
        let mut out = Vec::new();
        for row in idx.range((run_id, 0u64)..=(run_id, u64::MAX))? {
            let seq = row?.0.value().1;
            if let Some(bytes) = events.get(seq)? {
                out.push((seq, codec::decode(bytes.value())?));
            }
        }
        Ok(out)
    }

    /// A run's first event (its `RunStarted`, unless retention took the run).
    pub fn first_event(&self, run_id: &str) -> Result<Option<Record>, JournalError> {
        let txn = self.db()?.begin_read()?;
        let idx = txn.open_table(RUN_EVENTS)?;
        let events = txn.open_table(EVENTS)?;
        let Some(row) = idx.range((run_id, 0u64)..=(run_id, u64::MAX))?.next() else {
            return Ok(None);
        };
        let seq = row?.0.value().1;
        match events.get(seq)? {
            Some(bytes) => Ok(Some(codec::decode(bytes.value())?)),
            None => Ok(None),
        }
    }

    /// Events with sequence numbers from `from` on, at most `limit` (the outbox view).
    pub fn events_since(&self, from: u64, limit: usize) -> Result<Vec<(u64, Record)>, JournalError> {
        let txn = self.db()?.begin_read()?;
        let events = txn.open_table(EVENTS)?;
        let mut out = Vec::new();
        for row in events.range(from..)?.take(limit) {
            let (k, v) = row?;
            out.push((k.value(), codec::decode(v.value())?));
        }
        Ok(out)
    }

    /// One definition version's record, or the latest version when `version` is `None`.
    pub fn definition(
        &self,
        name: &str,
        version: Option<u32>,
    ) -> Result<Option<(u32, DefinitionRecord)>, JournalError> {
        let txn = self.db()?.begin_read()?;
        let t = txn.open_table(DEFINITIONS)?;
        let row = match version {
            Some(v) => t.get((name, v))?.map(|b| (v, b)),
            None => t
                .range((name, 0u32)..=(name, u32::MAX))?
                .next_back()
                .transpose()?
                .map(|(k, b)| (k.value().1, b)),
        };
        row.map(|(v, b)| Ok((v, decode_definition(b.value())?))).transpose()
    }

    /// Every stored definition: (name, version, record).
    pub fn definitions(&self) -> Result<Vec<(String, u32, DefinitionRecord)>, JournalError> {
        let txn = self.db()?.begin_read()?;
        let t = txn.open_table(DEFINITIONS)?;
        let mut out = Vec::new();
        for row in t.iter()? {
            let (k, v) = row?;
            let (name, version) = k.value();
            out.push((name.to_string(), version, decode_definition(v.value())?));
        }
        Ok(out)
    }

    /// Pending timers, earliest first: (deadline ms, run id, step).
    pub fn timers(&self) -> Result<Vec<(u64, String, String)>, JournalError> {
        let txn = self.db()?.begin_read()?;
        let t = txn.open_table(TIMERS)?;
        let mut out = Vec::new();
        for row in t.iter()? {
            let (k, _) = row?;
            let (at, run, step) = k.value();
            out.push((at, run.to_string(), step.to_string()));
        }
        Ok(out)
    }

    /// The next sequence number to be assigned (one past the newest event).
    pub fn next_seq(&self) -> Result<u64, JournalError> {
        let txn = self.db()?.begin_read()?;
        let meta = txn.open_table(META)?;
        Ok(meta.get("next_seq")?.map(|v| v.value()).unwrap_or(1))
    }
}

/// Checks the format, creates missing tables, and reads the writer's starting state.
fn prepare(db: &Database) -> Result<(u64, HashSet<String>), JournalError> {
    let txn = db.begin_write()?;
    let next = {
        let mut meta = txn.open_table(META)?;
        let format = meta.get("format")?.map(|v| v.value());
        match format {
            Some(f) if f != FORMAT => return Err(JournalError::Format { found: f }),
            Some(_) => {}
            None => {
                meta.insert("format", FORMAT)?;
            }
        }
        // Create every table so readers never see "table does not exist".
        txn.open_table(EVENTS)?;
        txn.open_table(RUN_EVENTS)?;
        txn.open_table(RUNS)?;
        txn.open_table(ACTIVE)?;
        txn.open_table(DEFINITIONS)?;
        txn.open_table(TIMERS)?;
        txn.open_table(CURSORS)?;
        txn.open_table(KV)?;
        meta.get("next_seq")?.map(|v| v.value()).unwrap_or(1)
    };
    let mut active = HashSet::new();
    for row in txn.open_table(ACTIVE)?.iter()? {
        active.insert(row?.0.value().to_string());
    }
    txn.commit()?;
    Ok((next, active))
}

/// Reads the writer's state without writing (the disk may still be full).
fn load_state(db: &Database) -> Result<(u64, HashSet<String>), JournalError> {
    let txn = db.begin_read()?;
    let next = txn.open_table(META)?.get("next_seq")?.map(|v| v.value()).unwrap_or(1);
    let mut active = HashSet::new();
    for row in txn.open_table(ACTIVE)?.iter()? {
        active.insert(row?.0.value().to_string());
    }
    Ok((next, active))
}

struct Writer {
    /// Told the next sequence after every successful commit.
    committed: tokio::sync::watch::Sender<u64>,
    /// The writer's own handle; `None` while a reopen has not yet succeeded.
    db: Option<Arc<Database>>,
    slot: Slot,
    opener: Opener,
    next_seq: u64,
    clock: Arc<dyn Clock>,
    stats: Arc<Stats>,
    /// Unfinished runs, mirrored from `active_runs` so appends need no lookup.
    active: HashSet<String>,
    /// Changes to `active` made by the batch being written, applied only once it commits.
    started: HashSet<String>,
    finished: HashSet<String>,
}

/// An operation's outcome inside a transaction, answered only after the commit.
enum Outcome {
    Start(Reply<Started>, Result<Started, JournalError>),
    Append(Reply<u64>, Result<u64, JournalError>),
    Definition(Reply<Applied>, Result<Applied, JournalError>),
    Cursor(Reply<()>, Result<(), JournalError>),
    Prune(Reply<Pruned>, Result<Pruned, JournalError>),
    Kv(Reply<()>, Result<(), JournalError>),
}

impl Outcome {
    fn error(&self) -> Option<&JournalError> {
        match self {
            Outcome::Start(_, Err(e))
            | Outcome::Append(_, Err(e))
            | Outcome::Definition(_, Err(e))
            | Outcome::Cursor(_, Err(e))
            | Outcome::Prune(_, Err(e))
            | Outcome::Kv(_, Err(e)) => Some(e),
            _ => None,
        }
    }
    fn fail(self, e: impl Fn() -> JournalError) {
        let _ = match self {
            Outcome::Start(tx, _) => tx.send(Err(e())).map_err(|_| ()),
            Outcome::Append(tx, _) => tx.send(Err(e())).map_err(|_| ()),
            Outcome::Definition(tx, _) => tx.send(Err(e())).map_err(|_| ()),
            Outcome::Cursor(tx, _) => tx.send(Err(e())).map_err(|_| ()),
            Outcome::Prune(tx, _) => tx.send(Err(e())).map_err(|_| ()),
            Outcome::Kv(tx, _) => tx.send(Err(e())).map_err(|_| ()),
        };
    }
    fn send(self) {
        let _ = match self {
            Outcome::Start(tx, r) => tx.send(r).map_err(|_| ()),
            Outcome::Append(tx, r) => tx.send(r).map_err(|_| ()),
            Outcome::Definition(tx, r) => tx.send(r).map_err(|_| ()),
            Outcome::Cursor(tx, r) => tx.send(r).map_err(|_| ()),
            Outcome::Prune(tx, r) => tx.send(r).map_err(|_| ()),
            Outcome::Kv(tx, r) => tx.send(r).map_err(|_| ()),
        };
    }
}

impl Writer {
    fn run(mut self, mut rx: mpsc::Receiver<Op>) {
        let mut batch = Vec::with_capacity(256);
        while let Some(first) = self.next_op(&mut rx) {
            batch.push(first);
            while batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(op) => batch.push(op),
                    Err(_) => break,
                }
            }
            let (close, rest): (Vec<Op>, Vec<Op>) = batch.drain(..).partition(|op| matches!(op, Op::Close { .. }));
            batch = rest;
            if !batch.is_empty() {
                self.commit_batch(&mut batch);
            }
            if !close.is_empty() {
                self.close();
                for op in close {
                    if let Op::Close { reply } = op {
                        let _ = reply.send(Ok(()));
                    }
                }
                return;
            }
        }
        self.close();
    }

    /// The next operation. While the database is closed after a storage error, it is reopened
    /// every second meanwhile: readers get `Reopening` until then, and an idle agent may write
    /// nothing for hours after the disk has space again.
    fn next_op(&mut self, rx: &mut mpsc::Receiver<Op>) -> Option<Op> {
        let mut last_try = std::time::Instant::now();
        while self.db.is_none() {
            match rx.try_recv() {
                Ok(op) => return Some(op),
                Err(mpsc::error::TryRecvError::Disconnected) => return None,
                Err(mpsc::error::TryRecvError::Empty) => {}
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
            if last_try.elapsed() >= std::time::Duration::from_secs(1) {
                last_try = std::time::Instant::now();
                if let Err(e) = self.reopen() {
                    tracing::debug!(error = %e, "journal still cannot be reopened");
                }
            }
        }
        rx.blocking_recv()
    }

    /// Drops the database once no reader holds it, so redb writes its clean-shutdown state and
    /// the next open needs no repair. Readers get `Reopening` from here on.
    fn close(&mut self) {
        *self.slot.write().unwrap_or_else(|p| p.into_inner()) = None;
        if let Some(mut db) = self.db.take() {
            for _ in 0..1000 {
                match Arc::try_unwrap(db) {
                    Ok(db) => {
                        drop(db);
                        tracing::debug!("journal closed");
                        return;
                    }
                    Err(shared) => {
                        db = shared;
                        std::thread::sleep(std::time::Duration::from_millis(5));
                    }
                }
            }
            tracing::warn!("journal still in use after 5 s; closing without a clean shutdown");
        }
    }

    /// Closes and reopens the database: after an I/O error redb refuses further transactions
    /// until it is reopened. Readers briefly get `Reopening`.
    fn reopen(&mut self) -> Result<(), JournalError> {
        *self.slot.write().unwrap_or_else(|p| p.into_inner()) = None;
        if let Some(mut old) = self.db.take() {
            // The file stays locked until every reader has dropped its handle.
            let mut tries = 0;
            loop {
                match Arc::try_unwrap(old) {
                    Ok(db) => {
                        drop(db);
                        break;
                    }
                    Err(still_shared) if tries < 1000 => {
                        old = still_shared;
                        tries += 1;
                        std::thread::sleep(std::time::Duration::from_millis(5));
                    }
                    Err(still_shared) => {
                        self.db = Some(still_shared);
                        return Err(JournalError::Reopening);
                    }
                }
            }
        }
        let db = Arc::new((self.opener)()?);
        let (next_seq, active) = load_state(&db)?;
        self.next_seq = next_seq;
        self.active = active;
        *self.slot.write().unwrap_or_else(|p| p.into_inner()) =
            Some(db.clone() as Arc<dyn ReadableDatabase + Send + Sync>);
        self.db = Some(db);
        tracing::info!(next_seq, "journal reopened after a storage error");
        Ok(())
    }

    fn commit_batch(&mut self, batch: &mut Vec<Op>) {
        let n = batch.len() as u64;
        let start_seq = self.next_seq;
        let mut outcomes = Vec::with_capacity(batch.len());
        if self.db.is_none()
            && let Err(e) = self.reopen()
        {
            tracing::error!(error = %e, "journal is still unavailable");
        }
        let result = (|| -> Result<u64, JournalError> {
            let db = self.db.clone().ok_or(JournalError::Reopening)?;
            let mut txn = db.begin_write()?;
            txn.set_durability(Durability::Immediate)?;
            let mut events_written = 0u64;
            {
                let mut t = Tables {
                    events: txn.open_table(EVENTS)?,
                    run_events: txn.open_table(RUN_EVENTS)?,
                    runs: txn.open_table(RUNS)?,
                    active: txn.open_table(ACTIVE)?,
                    definitions: txn.open_table(DEFINITIONS)?,
                    timers: txn.open_table(TIMERS)?,
                    cursors: txn.open_table(CURSORS)?,
                    kv: txn.open_table(KV)?,
                };
                let now = self.clock.now_ms();
                for op in batch.drain(..) {
                    let before = self.next_seq;
                    let outcome = match op {
                        Op::Start { run_id, event, reply } => {
                            Outcome::Start(reply, self.start(&mut t, &run_id, event, now))
                        }
                        Op::Append { run_id, events, reply } => {
                            Outcome::Append(reply, self.append(&mut t, &run_id, events, now))
                        }
                        Op::PutDefinition {
                            name,
                            version,
                            json,
                            reply,
                        } => Outcome::Definition(reply, put_definition(&mut t, &name, version, json, now)),
                        Op::PutCursor { key, value, reply } => Outcome::Cursor(
                            reply,
                            t.cursors
                                .insert(key.as_str(), value)
                                .map(|_| ())
                                .map_err(JournalError::from),
                        ),
                        Op::Prune { policy, reply } => {
                            let stats = txn.stats()?;
                            let in_use = stats.allocated_pages() * stats.page_size() as u64;
                            Outcome::Prune(reply, self.prune(&mut t, policy, in_use))
                        }
                        Op::Close { reply } => {
                            let _ = reply.send(Ok(()));
                            continue;
                        }
                        Op::PutKv { key, value, reply } => Outcome::Kv(
                            reply,
                            t.kv.insert(key.as_str(), value.as_slice())
                                .map(|_| ())
                                .map_err(JournalError::from),
                        ),
                    };
                    // A storage error mid-operation poisons the transaction: abort it whole.
                    if let Some(JournalError::Storage(e)) = outcome.error() {
                        let e = storage_failure(&io_text(e));
                        outcomes.push(outcome);
                        return Err(e);
                    }
                    events_written += self.next_seq - before;
                    outcomes.push(outcome);
                }
                let mut meta = txn.open_table(META)?;
                meta.insert("next_seq", self.next_seq)?;
            }
            txn.commit()?;
            Ok(events_written)
        })();
        let started = std::mem::take(&mut self.started);
        let finished = std::mem::take(&mut self.finished);
        match result {
            Ok(events) => {
                self.active.extend(started);
                for id in &finished {
                    self.active.remove(id);
                }
                self.stats.commits.fetch_add(1, Ordering::Relaxed);
                self.committed.send_replace(self.next_seq);
                self.stats.ops.fetch_add(n, Ordering::Relaxed);
                self.stats.events.fetch_add(events, Ordering::Relaxed);
                for o in outcomes {
                    o.send();
                }
            }
            Err(e) => {
                // Nothing of this batch is durable: roll the sequence back and fail every waiter.
                tracing::error!(error = %e, ops = n, "journal commit failed; nothing in this batch was written");
                self.next_seq = start_seq;
                if matches!(e, JournalError::Storage(_))
                    && let Err(e) = self.reopen()
                {
                    tracing::error!(error = %e, "cannot reopen the journal yet; will retry with the next write");
                }
                // The waiters' errors carry the cause once, not wrapped in this error's own text.
                let msg = match &e {
                    JournalError::Storage(inner) => io_text(inner),
                    other => other.to_string(),
                };
                let err = || storage_failure(&msg);
                for o in outcomes {
                    o.fail(err);
                }
                for op in batch.drain(..) {
                    match op {
                        Op::Start { reply, .. } => drop(reply.send(Err(err()))),
                        Op::Append { reply, .. } => drop(reply.send(Err(err()))),
                        Op::PutDefinition { reply, .. } => drop(reply.send(Err(err()))),
                        Op::PutCursor { reply, .. } => drop(reply.send(Err(err()))),
                        Op::Prune { reply, .. } => drop(reply.send(Err(err()))),
                        Op::PutKv { reply, .. } => drop(reply.send(Err(err()))),
                        Op::Close { reply } => drop(reply.send(Ok(()))),
                    }
                }
            }
        }
    }

    fn write_event(&mut self, t: &mut Tables, run_id: &str, at_ms: u64, event: Event) -> Result<u64, JournalError> {
        let seq = self.next_seq;
        match &event {
            Event::TimerSet { step, fire_at_ms, .. } => {
                t.timers.insert((*fire_at_ms, run_id, step.as_str()), ())?;
            }
            Event::TimerFired { step, fire_at_ms, .. } => {
                t.timers.remove((*fire_at_ms, run_id, step.as_str()))?;
            }
            _ => {}
        }
        let bytes = codec::encode(&Record {
            run_id: run_id.to_string(),
            at_ms,
            event,
        });
        t.events.insert(seq, bytes.as_slice())?;
        t.run_events.insert((run_id, seq), ())?;
        self.next_seq += 1;
        Ok(seq)
    }

    fn is_active(&self, run_id: &str) -> bool {
        (self.active.contains(run_id) || self.started.contains(run_id)) && !self.finished.contains(run_id)
    }

    fn start(&mut self, t: &mut Tables, run_id: &str, event: Event, now: u64) -> Result<Started, JournalError> {
        if let Some(existing) = t.runs.get(run_id)? {
            return Ok(Started::Existing(decode_run(existing.value())?));
        }
        let Event::RunStarted { workflow, version, .. } = &event else {
            return Err(JournalError::NoSuchRun(run_id.to_string()));
        };
        let rec = RunRecord {
            workflow: workflow.clone(),
            version: *version,
            status: RunStatus::Running,
            created_ms: now,
            finished_ms: None,
        };
        t.runs.insert(run_id, encode_run(&rec).as_slice())?;
        t.active.insert(run_id, ())?;
        self.started.insert(run_id.to_string());
        self.write_event(t, run_id, now, event)?;
        Ok(Started::Created)
    }

    fn append(&mut self, t: &mut Tables, run_id: &str, events: Vec<Event>, now: u64) -> Result<u64, JournalError> {
        let retry = matches!(events.first(), Some(Event::RunRetried { .. }));
        if retry || !self.is_active(run_id) {
            let rec = match t.runs.get(run_id)? {
                Some(v) => decode_run(v.value())?,
                None => return Err(JournalError::NoSuchRun(run_id.to_string())),
            };
            // Only a failed run that has ended may be reopened, and only by `RunRetried`.
            if !(retry && rec.status == RunStatus::Failed && !self.is_active(run_id)) {
                return Err(JournalError::RunFinished(run_id.to_string()));
            }
            let rec = RunRecord {
                status: RunStatus::Running,
                finished_ms: None,
                ..rec
            };
            t.runs.insert(run_id, encode_run(&rec).as_slice())?;
            t.active.insert(run_id, ())?;
            self.finished.remove(run_id);
            self.started.insert(run_id.to_string());
        }
        let mut last = 0;
        for e in events {
            let terminal = RunStatus::of_terminal(&e);
            let next = match &e {
                Event::RunContinued { next_run, input } => Some((next_run.clone(), input.clone())),
                _ => None,
            };
            last = self.write_event(t, run_id, now, e)?;
            if let Some(status) = terminal {
                // A run that ends leaves no timer behind in the index.
                let stale: Vec<(u64, String, String)> = t
                    .timers
                    .iter()?
                    .filter_map(|r| r.ok())
                    .map(|(k, _)| {
                        let (at, r, s) = k.value();
                        (at, r.to_string(), s.to_string())
                    })
                    .filter(|(_, r, _)| r == run_id)
                    .collect();
                for (at, r, s) in stale {
                    t.timers.remove((at, r.as_str(), s.as_str()))?;
                }
                let mut rec = match t.runs.get(run_id)? {
                    Some(v) => decode_run(v.value())?,
                    None => return Err(JournalError::NoSuchRun(run_id.to_string())),
                };
                rec.status = status;
                rec.finished_ms = Some(now);
                t.runs.insert(run_id, encode_run(&rec).as_slice())?;
                t.active.remove(run_id)?;
                self.finished.insert(run_id.to_string());
                // Continue-as-new: the next run exists in the same commit as this one's end.
                if let Some((next_run, input)) = next {
                    let started = Event::RunStarted {
                        workflow: rec.workflow.clone(),
                        version: rec.version,
                        input,
                    };
                    self.start(t, &next_run, started, now)?;
                }
                break;
            }
        }
        Ok(last)
    }
}

impl Writer {
    /// Deletes finished runs: all that finished before the cut-off, then the oldest while the
    /// database is over its size budget. Never an event the cloud has not acknowledged.
    fn prune(&mut self, t: &mut Tables, policy: Retention, in_use: u64) -> Result<Pruned, JournalError> {
        let mut done = Pruned {
            bytes_before: in_use,
            ..Pruned::default()
        };
        let mut finished: Vec<(u64, String)> = Vec::new();
        for row in t.runs.iter()? {
            let (k, v) = row?;
            let rec = decode_run(v.value())?;
            if let Some(at) = rec.finished_ms.filter(|_| rec.status.is_terminal()) {
                finished.push((at, k.value().to_string()));
            }
        }
        finished.sort();
        let mut estimate = in_use;
        let mut pruned_through = t.cursors.get(PRUNED_THROUGH)?.map(|v| v.value()).unwrap_or(0);
        for (at, id) in finished {
            if done.runs as usize >= policy.max_runs {
                break;
            }
            if at >= policy.finished_before_ms && estimate <= policy.max_bytes {
                break;
            }
            let seqs: Vec<u64> = t
                .run_events
                .range((id.as_str(), 0u64)..=(id.as_str(), u64::MAX))?
                .map(|r| r.map(|(k, _)| k.value().1))
                .collect::<Result<_, _>>()?;
            if seqs.iter().any(|s| *s >= policy.keep_from_seq) {
                // Not yet acknowledged: newer runs are not either.
                break;
            }
            for seq in &seqs {
                if let Some(v) = t.events.remove(*seq)? {
                    estimate = estimate.saturating_sub(v.value().len() as u64 + 48);
                }
                t.run_events.remove((id.as_str(), *seq))?;
            }
            t.runs.remove(id.as_str())?;
            done.runs += 1;
            done.events += seqs.len() as u64;
            pruned_through = seqs.iter().copied().fold(pruned_through, u64::max);
        }
        if pruned_through > 0 {
            t.cursors.insert(PRUNED_THROUGH, pruned_through)?;
        }
        done.commands = prune_commands(t, policy.finished_before_ms, policy.max_runs)?;
        done.definitions = prune_definitions(t)?;
        Ok(done)
    }
}

/// What `verify` read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Verified {
    /// Rows read, over every table.
    pub rows: u64,
    /// Value bytes read.
    pub bytes: u64,
    /// The file was not closed cleanly (a crash, a kill) and redb repaired it on open.
    pub repaired: bool,
}

/// Opens the journal file at `path` (repairing it if a crash left it unclean, as an open does)
/// and reads every row of every table, then closes it cleanly. redb can panic on a damaged file
/// rather than return an error, and release builds abort on a panic, so `outpost run` calls this
/// in a child process (`outpost journal-check`) before it opens the journal itself.
pub fn verify(path: &Path) -> Result<Verified, JournalError> {
    let repaired = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let seen = repaired.clone();
    let db = Database::builder()
        .set_cache_size(4 * 1024 * 1024)
        .set_repair_callback(move |_| seen.store(true, Ordering::Relaxed))
        .create(path)
        .map_err(|e| match e {
            redb::DatabaseError::DatabaseAlreadyOpen => JournalError::Locked(path.display().to_string()),
            other => other.into(),
        })?;
    let mut v = Verified::default();
    {
        let txn = db.begin_read()?;
        let mut count = |len: usize| {
            v.rows += 1;
            v.bytes += len as u64;
        };
        macro_rules! walk {
            ($table:expr, $len:expr) => {
                match txn.open_table($table) {
                    Ok(t) => {
                        for row in t.iter()? {
                            let (_, val) = row?;
                            count($len(&val.value()));
                        }
                    }
                    Err(redb::TableError::TableDoesNotExist(_)) => {}
                    Err(e) => return Err(e.into()),
                }
            };
        }
        walk!(RUN_EVENTS, |_: &()| 0);
        walk!(ACTIVE, |_: &()| 0);
        walk!(TIMERS, |_: &()| 0);
        walk!(META, |_: &u64| 8);
        walk!(CURSORS, |_: &u64| 8);
        walk!(KV, |b: &&[u8]| b.len());
        // Records, run rows and definitions must also decode: a run whose history does not
        // cannot resume, and serving the rest as if whole would hide the damage.
        macro_rules! decode_all {
            ($table:expr, $what:expr, $decode:expr) => {
                match txn.open_table($table) {
                    Ok(t) => {
                        for row in t.iter()? {
                            let (k, val) = row?;
                            let bytes = val.value();
                            if let Err(e) = $decode(bytes) {
                                return Err(JournalError::Damaged(format!(
                                    "{} {:?} does not decode: {e}",
                                    $what,
                                    k.value()
                                )));
                            }
                            count(bytes.len());
                        }
                    }
                    Err(redb::TableError::TableDoesNotExist(_)) => {}
                    Err(e) => return Err(e.into()),
                }
            };
        }
        decode_all!(EVENTS, "event", |b: &[u8]| outpost_shared::journal::decode(b)
            .map(drop)
            .map_err(|e| e.to_string()));
        decode_all!(RUNS, "run", |b: &[u8]| decode_run(b)
            .map(drop)
            .map_err(|e| e.to_string()));
        decode_all!(DEFINITIONS, "definition", |b: &[u8]| decode_definition(b)
            .map(drop)
            .map_err(|e| e.to_string()));
    }
    drop(db);
    v.repaired = repaired.load(Ordering::Relaxed);
    Ok(v)
}

/// Index of applied commands by time: `cmdat/{ms:020}/{id}`, written beside `cmd/{id}`.
pub const COMMAND_INDEX: &str = "cmdat/";

/// The index key of command `id` applied at `ms`.
pub fn command_index_key(ms: u64, id: &str) -> String {
    format!("{COMMAND_INDEX}{ms:020}/{id}")
}

/// Forgets applied commands older than `before_ms` (at most `max` per pass): the cloud stops
/// sending a command once it has its answer, so an old row only guards against a replay long
/// after the fact.
fn prune_commands(t: &mut Tables, before_ms: u64, max: usize) -> Result<u64, JournalError> {
    let end = command_index_key(before_ms, "");
    let old: Vec<String> =
        t.kv.range(COMMAND_INDEX..end.as_str())?
            .take(max)
            .map(|r| r.map(|(k, _)| k.value().to_string()))
            .collect::<Result<_, _>>()?;
    for key in &old {
        t.kv.remove(key.as_str())?;
        if let Some((_, id)) = key[COMMAND_INDEX.len()..].split_once('/') {
            t.kv.remove(format!("cmd/{id}").as_str())?;
        }
    }
    Ok(old.len() as u64)
}

/// Deletes definition versions that are neither their name's newest nor used by a run still in
/// the journal (a definition applied on every deploy would otherwise pile up forever).
fn prune_definitions(t: &mut Tables) -> Result<u64, JournalError> {
    let mut used = std::collections::HashSet::new();
    for row in t.runs.iter()? {
        let (_, v) = row?;
        let rec = decode_run(v.value())?;
        used.insert((rec.workflow, rec.version));
    }
    let mut newest: HashMap<String, u32> = HashMap::new();
    let mut all = Vec::new();
    for row in t.definitions.iter()? {
        let (k, _) = row?;
        let (name, version) = k.value();
        let n = newest.entry(name.to_string()).or_insert(version);
        *n = (*n).max(version);
        all.push((name.to_string(), version));
    }
    let mut removed = 0;
    for (name, version) in all {
        if newest.get(&name) != Some(&version) && !used.contains(&(name.clone(), version)) {
            t.definitions.remove((name.as_str(), version))?;
            removed += 1;
        }
    }
    Ok(removed)
}

struct Tables<'txn> {
    events: redb::Table<'txn, u64, &'static [u8]>,
    run_events: redb::Table<'txn, (&'static str, u64), ()>,
    runs: redb::Table<'txn, &'static str, &'static [u8]>,
    active: redb::Table<'txn, &'static str, ()>,
    definitions: redb::Table<'txn, (&'static str, u32), &'static [u8]>,
    timers: redb::Table<'txn, (u64, &'static str, &'static str), ()>,
    cursors: redb::Table<'txn, &'static str, u64>,
    kv: redb::Table<'txn, &'static str, &'static [u8]>,
}

fn put_definition(t: &mut Tables, name: &str, version: u32, json: String, now: u64) -> Result<Applied, JournalError> {
    if let Some(existing) = t.definitions.get((name, version))? {
        let existing = decode_definition(existing.value())?;
        return if existing.json == json {
            Ok(Applied::Unchanged)
        } else {
            Err(JournalError::DefinitionConflict {
                name: name.to_string(),
                version,
            })
        };
    }
    let bytes =
        postcard::to_allocvec(&DefinitionEnvelope::V1(DefinitionRecord { json, applied_ms: now })).unwrap_or_default();
    t.definitions.insert((name, version), bytes.as_slice())?;
    Ok(Applied::Created)
}

/// The cause of a redb error without redb's `I/O error: ` wrapper (`storage_failure` adds it back).
fn io_text(e: &redb::Error) -> String {
    match e {
        redb::Error::Io(io) => io.to_string(),
        other => other.to_string(),
    }
}

/// A storage error for a waiter of a failed batch; redb's errors are not `Clone`, so the text travels.
fn storage_failure(msg: &str) -> JournalError {
    JournalError::Storage(redb::StorageError::Io(std::io::Error::other(msg.to_string())).into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::SystemClock;

    fn started(w: &str) -> Event {
        Event::RunStarted {
            workflow: w.into(),
            version: 1,
            input: "{}".into(),
        }
    }

    #[tokio::test]
    async fn retention_forgets_old_command_rows_and_unused_old_definitions() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(
            &dir.path().join("j.redb"),
            &JournalConfig::default(),
            Arc::new(SystemClock),
        )
        .unwrap();
        for v in 1..=3 {
            j.put_definition("w", v, format!("{{\"v\": {v}}}")).await.unwrap();
        }
        j.start_run("r", started("w")).await.unwrap(); // pins w v1
        for (id, at) in [("old", 1_000), ("new", 5_000)] {
            j.put_kv(&format!("cmd/{id}"), b"result".to_vec()).await.unwrap();
            j.put_kv(&command_index_key(at, id), Vec::new()).await.unwrap();
        }
        let policy = Retention {
            finished_before_ms: 3_000,
            max_bytes: u64::MAX,
            keep_from_seq: 1,
            max_runs: 100,
        };
        let p = j.prune(policy).await.unwrap();
        assert_eq!((p.commands, p.definitions), (1, 1), "{p:?}");
        assert!(j.kv("cmd/old").unwrap().is_none());
        assert!(j.kv("cmd/new").unwrap().is_some());
        let versions: Vec<u32> = j.definitions().unwrap().into_iter().map(|(_, v, _)| v).collect();
        assert_eq!(versions, vec![1, 3], "v1 is used by a run, v3 is the newest");
        let again = j.prune(policy).await.unwrap();
        assert_eq!((again.commands, again.definitions), (0, 0));
    }

    fn needs_repair(path: &std::path::Path) -> bool {
        let repaired = std::rc::Rc::new(std::cell::Cell::new(false));
        let seen = repaired.clone();
        let db = Database::builder()
            .set_repair_callback(move |_| seen.set(true))
            .open(path)
            .unwrap();
        drop(db);
        repaired.get()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn close_leaves_a_file_that_needs_no_repair_while_other_handles_live() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j.redb");
        let j = Journal::open(&path, &JournalConfig::default(), Arc::new(SystemClock)).unwrap();
        j.start_run("r1", started("w")).await.unwrap();
        // Tasks of a stopping daemon still hold handles (and so the writer's channel).
        let held = j.clone();
        j.close().await.unwrap();
        assert!(!needs_repair(&path), "the journal was left needing a repair");
        assert!(matches!(
            held.start_run("r2", started("w")).await,
            Err(JournalError::Closed)
        ));
        let j = Journal::open(&path, &JournalConfig::default(), Arc::new(SystemClock)).unwrap();
        assert_eq!(j.next_seq().unwrap(), 2, "what was committed before the close is there");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn group_commit_assigns_gap_free_sequences_and_batches() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(
            &dir.path().join("j.redb"),
            &JournalConfig::default(),
            Arc::new(SystemClock),
        )
        .unwrap();
        let mut tasks = Vec::new();
        for i in 0..50 {
            let j = j.clone();
            tasks.push(tokio::spawn(async move {
                let id = format!("r{i}");
                j.start_run(&id, started("w")).await.unwrap();
                for k in 0..4 {
                    j.append(
                        &id,
                        vec![Event::StepCompleted {
                            step: format!("s{k}"),
                            visit: 1,
                            output: "1".into(),
                        }],
                    )
                    .await
                    .unwrap();
                }
                j.append(&id, vec![Event::RunCompleted { output: "null".into() }])
                    .await
                    .unwrap();
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let all = j.events_since(1, 10_000).unwrap();
        assert_eq!(all.len(), 50 * 6);
        assert!(
            all.iter().enumerate().all(|(i, (seq, _))| *seq == i as u64 + 1),
            "gap-free from 1"
        );
        let commits = j.stats().commits.load(Ordering::Relaxed);
        assert!(commits < 300, "{commits} commits for 300 ops: appends were not grouped");
        assert!(j.active_runs().unwrap().is_empty());
        let h = j.history("r7").unwrap();
        assert_eq!(h.len(), 6);
        assert!(matches!(h[0].1.event, Event::RunStarted { .. }));
        assert!(h.windows(2).all(|w| w[0].0 < w[1].0));
    }

    #[test]
    fn row_formats_are_pinned() {
        let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
        let run = RunRecord {
            workflow: "oven".into(),
            version: 3,
            status: RunStatus::Failed,
            created_ms: 1_700_000_000_000,
            finished_ms: Some(1_700_000_000_500),
        };
        let def = DefinitionRecord {
            json: "{}".into(),
            applied_ms: 1_700_000_000_000,
        };
        let run_bytes = encode_run(&run);
        let def_bytes = postcard::to_allocvec(&DefinitionEnvelope::V1(def.clone())).unwrap();
        // Changing these bytes needs a new envelope version, not a new constant.
        assert_eq!(hex(&run_bytes), "00046f76656e030280d095ffbc3101f4d395ffbc31");
        assert_eq!(hex(&def_bytes), "00027b7d80d095ffbc31");
        assert_eq!(decode_run(&run_bytes).unwrap(), run);
        assert_eq!(decode_definition(&def_bytes).unwrap(), def);
    }

    /// A file backend whose writes and syncs fail while `full` is set, like a full disk.
    #[derive(Debug)]
    struct FullDisk {
        inner: redb::backends::FileBackend,
        full: Arc<std::sync::atomic::AtomicBool>,
    }

    impl FullDisk {
        fn check(&self) -> Result<(), std::io::Error> {
            if self.full.load(Ordering::SeqCst) {
                Err(std::io::Error::new(
                    std::io::ErrorKind::StorageFull,
                    "no space left on device (injected)",
                ))
            } else {
                Ok(())
            }
        }
    }

    impl redb::StorageBackend for FullDisk {
        fn len(&self) -> Result<u64, std::io::Error> {
            self.inner.len()
        }
        fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), std::io::Error> {
            self.inner.read(offset, out)
        }
        fn set_len(&self, len: u64) -> Result<(), std::io::Error> {
            self.check()?;
            self.inner.set_len(len)
        }
        fn sync_data(&self) -> Result<(), std::io::Error> {
            self.check()?;
            self.inner.sync_data()
        }
        fn write(&self, offset: u64, data: &[u8]) -> Result<(), std::io::Error> {
            self.check()?;
            self.inner.write(offset, data)
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn full_disk_fails_the_batch_loses_nothing_and_recovers_gap_free() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j.redb");
        let full = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = full.clone();
        let backend = move || {
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)
                .unwrap();
            Ok(FullDisk {
                inner: redb::backends::FileBackend::new(file).unwrap(),
                full: flag.clone(),
            })
        };
        let j = Journal::open_backend(backend, &JournalConfig::default(), Arc::new(SystemClock)).unwrap();
        j.start_run("a", started("w")).await.unwrap();
        j.append(
            "a",
            vec![Event::StepCompleted {
                step: "s1".into(),
                visit: 1,
                output: "1".into(),
            }],
        )
        .await
        .unwrap();

        full.store(true, Ordering::SeqCst);
        let err = j
            .append("a", vec![Event::RunCompleted { output: "null".into() }])
            .await
            .unwrap_err();
        assert!(err.to_string().contains("no space left"), "{err}");
        assert!(j.start_run("b", started("w")).await.is_err());
        // While the disk stays full, reads either see exactly the committed events or say the
        // journal is reopening; they never see a partial batch.
        match j.history("a") {
            Ok(h) => assert_eq!(h.len(), 2),
            Err(e) => assert!(matches!(e, JournalError::Reopening), "{e}"),
        }

        full.store(false, Ordering::SeqCst);
        // redb may need a moment after a failed commit; the runtime retries the same way.
        let mut ok = false;
        for _ in 0..50 {
            if j.append("a", vec![Event::RunCompleted { output: "null".into() }])
                .await
                .is_ok()
            {
                ok = true;
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        assert!(ok, "journal did not recover after the disk had space again");
        assert!(j.run("b").unwrap().is_none(), "the failed start left nothing behind");
        let seqs: Vec<u64> = j.history("a").unwrap().iter().map(|(s, _)| *s).collect();
        assert_eq!(
            seqs,
            vec![1, 2, 3],
            "sequence numbers stay gap-free across the failed commits"
        );
        assert_eq!(j.run("a").unwrap().unwrap().status, RunStatus::Completed);
    }

    #[tokio::test]
    async fn duplicate_start_and_finished_runs_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j.redb");
        {
            let j = Journal::open(&path, &JournalConfig::default(), Arc::new(SystemClock)).unwrap();
            assert!(matches!(
                j.start_run("a", started("w")).await.unwrap(),
                Started::Created
            ));
            assert!(
                matches!(j.start_run("a", started("other")).await.unwrap(), Started::Existing(r) if r.workflow == "w")
            );
            j.append("a", vec![Event::RunCancelled { reason: "t".into() }])
                .await
                .unwrap();
            assert!(matches!(
                j.append("a", vec![Event::RunCancelled { reason: "t".into() }]).await,
                Err(JournalError::RunFinished(_))
            ));
            assert!(matches!(
                j.append("nope", vec![]).await,
                Err(JournalError::NoSuchRun(_))
            ));
            assert_eq!(j.put_definition("w", 1, "{}".into()).await.unwrap(), Applied::Created);
            assert_eq!(j.put_definition("w", 1, "{}".into()).await.unwrap(), Applied::Unchanged);
            assert!(matches!(
                j.put_definition("w", 1, "{\"x\":1}".into()).await,
                Err(JournalError::DefinitionConflict { .. })
            ));
            j.put_definition("w", 3, "{}".into()).await.unwrap();
            assert_eq!(j.definition("w", None).unwrap().unwrap().0, 3);
        }
        // The writer thread holds the last Arc until its channel closes; wait for the file lock.
        let mut reopened = None;
        for _ in 0..100 {
            match Journal::open(&path, &JournalConfig::default(), Arc::new(SystemClock)) {
                Ok(j) => {
                    reopened = Some(j);
                    break;
                }
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(10)).await,
            }
        }
        let j = reopened.expect("journal reopens");
        assert_eq!(j.next_seq().unwrap(), 3);
        assert_eq!(j.run("a").unwrap().unwrap().status, RunStatus::Cancelled);
    }
}
