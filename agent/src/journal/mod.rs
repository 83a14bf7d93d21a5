//! The journal: every run's append-only history in one redb file.
//!
//! In parts: this module is the handle (open, the writes as requests to the writer, the reads on
//! redb snapshots merged with the index changes not yet checkpointed); `tables` the layout on
//! disk and its versioned rows; `writer` the thread and its group commit; `lifecycle` what
//! starting, appending to and ending a run write; `index` the derived indexes between
//! checkpoints and their replay after a crash; `prune` retention; `verify` the full read of
//! `outpost journal-check`.
//!
//! One writer thread owns all writes. Appends from every run queue on a channel; the writer
//! takes everything queued, writes it in one transaction, commits once (one fsync), and only
//! then answers every waiter (group commit). Reads run concurrently on redb snapshots from any
//! thread. Each event gets a device-wide, gap-free sequence number: the `events` table keyed by
//! it is also the outbox that sync will ship from.

use std::path::Path;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, RwLock};

use outpost_shared::journal::{self as codec, CodecError, Event, Record};
use redb::{Database, ReadableDatabase, ReadableTable};
use serde::Serialize;
use tokio::sync::{mpsc, oneshot};

use crate::clock::Clock;
use crate::engine::RunStatus;

mod blocks;
mod index;
mod lifecycle;
#[cfg(test)]
mod power_cut;
mod prune;
mod tables;
mod verify;
mod wal;
mod writer;

pub use blocks::unpack as decode_event_row;
pub use tables::unpack_seqs as decode_history_row;
pub use tables::{COMMAND_INDEX, DefinitionRecord, FORMAT, RunRecord, command_index_key};
pub use verify::{Verified, verify};
pub use wal::{Entry as LogEntry, LogError, decode_block as decode_log_block};

use lifecycle::Runs;
use tables::{
    ACTIVE, CURSORS, DEFINITIONS, EVENTS, KV, META, PRUNED_THROUGH, RUN_HISTORY, RUNS, TIMERS, decode_definition,
    decode_run, prepare,
};
use writer::{MAX_BATCH, Op, Txn, Write, Writer};

/// Journal settings.
#[derive(Debug, Clone)]
pub struct JournalConfig {
    /// Page cache in bytes (redb's default of 1 GiB is far too much for a gateway).
    pub cache_bytes: usize,
    /// Events whose index changes wait in memory before a checkpoint writes them (see `index`).
    pub checkpoint_events: usize,
    /// How long a group commit may wait for more writes while they keep arriving (zero: never):
    /// fewer, fuller commits write less to flash, at some latency (docs/journal.md).
    pub linger: std::time::Duration,
    /// Size of the segment log beside the file (`journal.log`) that group commits go to between
    /// checkpoints; 0 commits every group to redb directly (docs/journal.md).
    pub log_bytes: u64,
}

impl Default for JournalConfig {
    fn default() -> Self {
        JournalConfig {
            // 2 MiB: 4 cost 2 MB more RSS offline at no throughput measured (docs/journal.md).
            cache_bytes: 2 * 1024 * 1024,
            checkpoint_events: index::CHECKPOINT_EVENTS,
            linger: writer::LINGER_MAX,
            log_bytes: wal::LOG_BYTES,
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
    #[error(
        "journal format {found} is not supported (this build reads formats 1 to {FORMAT}; a newer agent wrote this file)"
    )]
    Format {
        /// Format found.
        found: u64,
    },
    /// The writer thread has stopped.
    #[error("journal writer has stopped")]
    Closed,
    /// The segment log beside the file does not read.
    #[error(transparent)]
    Log(#[from] LogError),
    /// The file reads, but what it holds does not decode.
    #[error("journal damaged: {0}")]
    Damaged(String),
    /// The file is in an older table layout, which only a writer upgrades.
    #[error("journal {path} is in format {found}, which the agent upgrades to {FORMAT} when it opens it")]
    OlderFormat {
        /// The file.
        path: String,
        /// Its format.
        found: u64,
    },
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

outpost_shared::redb_errors_into!(JournalError, JournalError::Storage);

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

/// The timers waiting to fire, counted ([`Journal::timer_summary`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TimerSummary {
    /// Timers set and neither fired nor dropped by their run's end.
    pub pending: usize,
    /// The earliest deadline among them, in ms since the epoch.
    pub next_at: Option<u64>,
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
pub(super) type Opener = Box<dyn Fn() -> Result<Database, JournalError> + Send>;

/// The current database handle, shared by readers and swapped by the writer after a reopen
/// (read-only for `open_read_only`).
pub(super) type Slot = Arc<RwLock<Option<Arc<dyn ReadableDatabase + Send + Sync>>>>;

/// The segment log of the journal file at `path`: `journal.log` beside `journal.redb`.
pub fn log_path(path: &Path) -> std::path::PathBuf {
    path.with_extension("log")
}

/// Opens the log file at `path` without a lock, for reading, if it exists.
fn open_log_file(path: &Path) -> Result<Option<Box<dyn redb::StorageBackend>>, JournalError> {
    match std::fs::File::open(path) {
        Ok(f) => Ok(Some(Box::new(wal::ReadOnlyLog(f)))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_error(e)),
    }
}

fn io_error(e: std::io::Error) -> JournalError {
    JournalError::Storage(redb::StorageError::Io(e).into())
}

/// Opens (or creates) `path` with its cached pages dropped and read-ahead off. A kernel with large page-cache folios writes back a whole cached folio
/// for a 4 KiB write into it (a 2 MiB folio for one 4 KiB write, measured here; docs/journal.md),
/// and read-ahead and large writes make large folios: pages cached one at a time are written
/// back one at a time. Gives the backend and a second handle on the same open file.
fn uncached_file(path: &Path) -> Result<(redb::backends::FileBackend, std::fs::File), JournalError> {
    use std::os::unix::io::AsRawFd;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(io_error)?;
    let handle = file.try_clone().map_err(io_error)?;
    let backend = redb::backends::FileBackend::new(file)?;
    let fd = handle.as_raw_fd();
    // SAFETY: `fd` is an open descriptor owned by `handle`; fadvise only changes caching advice.
    unsafe {
        libc::posix_fadvise(fd, 0, 0, libc::POSIX_FADV_DONTNEED);
        libc::posix_fadvise(fd, 0, 0, libc::POSIX_FADV_RANDOM);
    }
    Ok((backend, handle))
}

/// Opens (or creates) the log file at `path` for the writer (see `uncached_file`), locked against
/// other processes, `bytes` long and written once with zeros, a page per write: a write into a
/// hole would cost the file system a metadata commit on every sync.
fn create_log_file(path: &Path, bytes: u64) -> Result<Box<dyn redb::StorageBackend>, JournalError> {
    use std::os::unix::fs::FileExt;
    use std::os::unix::io::AsRawFd;
    let (backend, file) = uncached_file(path)?;
    // The lock is the open file's, shared with the backend's handle, and held while it is open.
    file.try_lock().map_err(|e| match e {
        std::fs::TryLockError::WouldBlock => JournalError::Locked(path.display().to_string()),
        std::fs::TryLockError::Error(e) => io_error(e),
    })?;
    let bytes = bytes.max(wal::BLOCK) / wal::BLOCK * wal::BLOCK;
    let len = file.metadata().map_err(io_error)?.len();
    if len < bytes {
        let zeros = vec![0u8; wal::BLOCK as usize];
        let mut at = len / wal::BLOCK * wal::BLOCK;
        while at < bytes {
            file.write_all_at(&zeros, at).map_err(io_error)?;
            at += wal::BLOCK;
        }
        file.sync_all().map_err(io_error)?;
        // SAFETY: as in `uncached_file`.
        unsafe {
            libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED);
        }
    }
    Ok(Box::new(backend))
}

/// Events only the segment log holds yet: (seq, record bytes), in order.
type Logged = Vec<(u64, Box<[u8]>)>;

/// A run's sequences, the bytes of those only the log holds, and the snapshot for the rest.
type RunSeqs = (Vec<u64>, Logged, redb::ReadTransaction);

/// Handle to the journal; cheap to clone.
#[derive(Clone)]
pub struct Journal {
    db: Slot,
    /// Index changes committed but not yet checkpointed (see `index`); reads merge them.
    indexed: Arc<RwLock<index::Pending>>,
    tx: mpsc::Sender<Op>,
    stats: Arc<Stats>,
    /// The next sequence after each commit: the outbox's "new events" signal.
    committed: tokio::sync::watch::Receiver<u64>,
}

impl Journal {
    /// Opens (or creates) the journal at `path`, and its segment log beside it, and starts its
    /// writer thread.
    pub fn open(path: &Path, config: &JournalConfig, clock: Arc<dyn Clock>) -> Result<Journal, JournalError> {
        let log = match config.log_bytes {
            0 => open_log_file(&log_path(path))?,
            bytes => Some(create_log_file(&log_path(path), bytes)?),
        };
        let path = path.to_path_buf();
        let cache = config.cache_bytes;
        Self::start(
            Box::new(move || {
                let (backend, _) = uncached_file(&path)?;
                Database::builder()
                    .set_cache_size(cache)
                    .create_with_backend(backend)
                    .map_err(|e| match e {
                        redb::DatabaseError::DatabaseAlreadyOpen => JournalError::Locked(path.display().to_string()),
                        other => other.into(),
                    })
            }),
            log,
            clock,
            config,
        )
    }

    /// Opens a journal on redb storage backends made by `backend` (called again to reopen after an
    /// I/O error), with `log` as its segment log. Tests use this to inject faults.
    pub fn open_backend<B: redb::StorageBackend>(
        backend: impl Fn() -> std::io::Result<B> + Send + 'static,
        log: Option<Box<dyn redb::StorageBackend>>,
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
            log,
            clock,
            config,
        )
    }

    fn start(
        opener: Opener,
        log: Option<Box<dyn redb::StorageBackend>>,
        clock: Arc<dyn Clock>,
        config: &JournalConfig,
    ) -> Result<Journal, JournalError> {
        let db = Arc::new(opener()?);
        let (next_seq, active, generation) = prepare(&db, log.as_deref())?;
        let wal = match log {
            Some(file) if config.log_bytes > 0 => Some(
                wal::Wal::open(file, generation, config.log_bytes)
                    .map_err(|e| JournalError::Storage(redb::StorageError::Io(e).into()))?,
            ),
            _ => None,
        };
        let indexed = Arc::new(RwLock::new(index::Pending::default()));
        let slot: Slot = Arc::new(RwLock::new(Some(db.clone() as Arc<dyn ReadableDatabase + Send + Sync>)));
        let stats = Arc::new(Stats::default());
        let (tx, rx) = mpsc::channel(MAX_BATCH);
        let (committed_tx, committed) = tokio::sync::watch::channel(next_seq);
        let writer = Writer {
            committed: committed_tx,
            db: Some(db),
            slot: slot.clone(),
            opener,
            runs: Runs::new(next_seq, active),
            clock,
            stats: stats.clone(),
            indexed: indexed.clone(),
            checkpoint_events: config.checkpoint_events.max(1),
            linger: config.linger,
            wal,
        };
        std::thread::Builder::new()
            .name("journal-writer".into())
            .spawn(move || writer.run(rx))
            .map_err(|e| JournalError::Storage(redb::StorageError::Io(e).into()))?;
        Ok(Journal {
            db: slot,
            indexed,
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
        let (format, part_way) = {
            let txn = db.begin_read()?;
            let format = txn
                .open_table(META)
                .ok()
                .and_then(|t| t.get("format").ok().flatten().map(|v| v.value()));
            let part_way = txn
                .open_table(CURSORS)
                .ok()
                .and_then(|t| t.get(tables::PACKED_BELOW).ok().flatten())
                .is_some();
            (format, part_way)
        };
        if let Some(found) = format.filter(|f| !tables::format_supported(*f)) {
            return Err(JournalError::Format { found });
        }
        // The readers read the current layout only: an older file, or one whose upgrade a crash
        // cut short (its rows not yet packed are format 5's), is read through an upgraded copy
        // (`open_repaired_copy`).
        let older = if part_way {
            Some(5)
        } else {
            format.filter(|f| *f < FORMAT)
        };
        if let Some(found) = older {
            return Err(JournalError::OlderFormat {
                path: path.display().to_string(),
                found,
            });
        }
        Self::reader(Arc::new(db), &log_path(path))
    }

    /// Reads a journal that needs repair or an upgrade without touching it: copies `path` to
    /// `copy`, repairs and upgrades the copy (moving the log's current blocks into it, as an open
    /// does) and opens that with no writer (every write fails with `Closed`).
    pub fn open_repaired_copy(path: &Path, copy: &Path) -> Result<Journal, JournalError> {
        std::fs::copy(path, copy).map_err(|e| JournalError::Storage(redb::StorageError::Io(e).into()))?;
        let db = Database::builder().set_cache_size(4 * 1024 * 1024).create(copy)?;
        let log = open_log_file(&log_path(path))?;
        tables::prepare(&db, log.as_deref())?;
        Self::reader(Arc::new(db), &log_path(path))
    }

    /// A journal with no writer; the index changes a crash left out of the tables are derived
    /// from the events (read only).
    fn reader(db: Arc<dyn ReadableDatabase + Send + Sync>, log: &Path) -> Result<Journal, JournalError> {
        let pending = {
            let txn = db.begin_read()?;
            let runs = txn.open_table(RUNS)?;
            let mut below = index::TableLookup { runs: &runs };
            let (events, cursors) = (txn.open_table(EVENTS)?, txn.open_table(CURSORS)?);
            let mut pending = index::replay(&events, &cursors, &mut below)?.0;
            if let Some(file) = open_log_file(log)? {
                let generation = cursors.get(wal::LOG_GENERATION)?.map_or(0, |v| v.value());
                let entries = wal::scan(&*file, generation)?.entries;
                wal::check_sequence(&entries, tables::next_seq(&txn.open_table(META)?, &events, &cursors)?)?;
                pending.take_log(entries, &mut below)?;
            }
            pending
        };
        let (tx, _) = mpsc::channel(1);
        let (_, committed) = tokio::sync::watch::channel(0);
        Ok(Journal {
            db: Arc::new(RwLock::new(Some(db))),
            indexed: Arc::new(RwLock::new(pending)),
            tx,
            stats: Arc::new(Stats::default()),
            committed,
        })
    }

    /// The index changes not yet checkpointed. Read before the redb snapshot, so that what a
    /// checkpoint moves from here into the tables is in one or the other.
    fn pending(&self) -> std::sync::RwLockReadGuard<'_, index::Pending> {
        self.indexed.read().unwrap_or_else(|p| p.into_inner())
    }

    /// The current database, or an error while the writer is reopening it.
    fn db(&self) -> Result<Arc<dyn ReadableDatabase + Send + Sync>, JournalError> {
        self.db
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or(JournalError::Reopening)
    }

    /// Queues a write that needs redb's tables for the writer's next batch and waits until its
    /// commit is durable.
    async fn write<T: Send + 'static>(
        &self,
        work: impl FnOnce(&mut Txn) -> Result<T, JournalError> + Send + 'static,
    ) -> Result<T, JournalError> {
        self.queue(false, work).await
    }

    /// Queues a write the segment log can take (a start, an append, a cursor, a kv row) and
    /// waits until its commit is durable.
    async fn write_logged<T: Send + 'static>(
        &self,
        work: impl FnOnce(&mut Txn) -> Result<T, JournalError> + Send + 'static,
    ) -> Result<T, JournalError> {
        self.queue(true, work).await
    }

    async fn queue<T: Send + 'static>(
        &self,
        logged: bool,
        work: impl FnOnce(&mut Txn) -> Result<T, JournalError> + Send + 'static,
    ) -> Result<T, JournalError> {
        let (reply, rx) = oneshot::channel();
        let op = Op::Write(Box::new(Write { logged, work, reply }));
        self.tx.send(op).await.map_err(|_| JournalError::Closed)?;
        rx.await.map_err(|_| JournalError::Closed)?
    }

    /// Commits what is queued, closes the database cleanly (the next start needs no repair) and
    /// stops the writer; later calls fail with `Closed`.
    pub async fn close(&self) -> Result<(), JournalError> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(Op::Close(reply)).await.map_err(|_| JournalError::Closed)?;
        rx.await.map_err(|_| JournalError::Closed)?
    }

    /// Journals a new run's `RunStarted`, unless a run with that id exists. Durable on return.
    pub async fn start_run(&self, run_id: &str, event: Event) -> Result<Started, JournalError> {
        self.start_run_with(run_id, event, Vec::new()).await
    }

    /// `start_run`, and when the run is new, its first events after `RunStarted` in the same
    /// commit (a run whose first steps are pure decisions); dropped when the run exists.
    pub async fn start_run_with(&self, run_id: &str, event: Event, first: Vec<Event>) -> Result<Started, JournalError> {
        let run_id = run_id.to_string();
        self.write_logged(move |w| {
            let started = w.runs.start(&mut w.store, w.indexed, &run_id, event, w.now)?;
            if matches!(started, Started::Created) && !first.is_empty() {
                w.runs.append(&mut w.store, w.indexed, &run_id, first, w.now)?;
            }
            Ok(started)
        })
        .await
    }

    /// Appends events to a running run. Durable on return; gives the last sequence number.
    pub async fn append(&self, run_id: &str, events: Vec<Event>) -> Result<u64, JournalError> {
        let run_id = run_id.to_string();
        self.write_logged(move |w| w.runs.append(&mut w.store, w.indexed, &run_id, events, w.now))
            .await
    }

    /// Stores a definition version (canonical JSON).
    pub async fn put_definition(&self, name: &str, version: u32, json: String) -> Result<Applied, JournalError> {
        let name = name.to_string();
        self.write(move |w| {
            let now = w.now;
            tables::put_definition(w.tables()?.0, &name, version, json, now)
        })
        .await
    }

    /// Durably sets a named cursor (a schedule's last slot, a sync position).
    pub async fn put_cursor(&self, key: &str, value: u64) -> Result<(), JournalError> {
        let key = key.to_string();
        self.write_logged(move |w| w.put_cursor(&key, value)).await
    }

    /// Writes every index change still waiting in memory into the index tables now (a
    /// checkpoint, normally done every `checkpoint_events` events and at close). Gives the
    /// sequence every index row is written through.
    pub async fn checkpoint(&self) -> Result<u64, JournalError> {
        self.write(|w| {
            w.checkpoint()?;
            Ok(w.runs.next_seq.saturating_sub(1))
        })
        .await
    }

    /// Events whose index rows wait in memory for the next checkpoint.
    pub fn unindexed_events(&self) -> u64 {
        self.pending().events as u64
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
        let mut out = Vec::new();
        let mut bytes = 0usize;
        for (seq, v) in self.stored_events(from, limit)? {
            // Always one, so a large record still moves; the caller shrinks it for the wire.
            if !out.is_empty() && bytes + v.len() > max_bytes {
                break;
            }
            bytes += v.len();
            out.push((seq, v));
        }
        Ok(out)
    }

    /// Up to `limit` stored events from `from` on: redb's `events`, then those only the segment
    /// log holds yet.
    fn stored_events(&self, from: u64, limit: usize) -> Result<Vec<(u64, Vec<u8>)>, JournalError> {
        // Read before the snapshot: an event a checkpoint moves is in one or the other.
        let logged = self.pending().records_from(from, limit);
        let txn = self.db()?.begin_read()?;
        let mut out = blocks::read_from(&txn.open_table(EVENTS)?, from, limit)?;
        let last = out.last().map(|(s, _)| *s);
        out.extend(
            logged
                .into_iter()
                .filter(|(s, _)| last.is_none_or(|l| *s > l))
                .map(|(s, v)| (s, v.into_vec())),
        );
        out.truncate(limit);
        Ok(out)
    }

    /// Durably stores a small named record.
    pub async fn put_kv(&self, key: &str, value: Vec<u8>) -> Result<(), JournalError> {
        let key = key.to_string();
        self.write_logged(move |w| w.put_kv(&key, value)).await
    }

    /// A small named record, if stored.
    pub fn kv(&self, key: &str) -> Result<Option<Vec<u8>>, JournalError> {
        if let Some(v) = self.pending().kv.get(key) {
            return Ok(Some(v.clone()));
        }
        let txn = self.db()?.begin_read()?;
        Ok(txn.open_table(KV)?.get(key)?.map(|v| v.value().to_vec()))
    }

    /// Deletes finished runs (their rows and events) per `policy`.
    pub async fn prune(&self, policy: Retention) -> Result<Pruned, JournalError> {
        self.write(move |w| {
            // Retention reads and deletes index rows: they must all be in the tables.
            w.checkpoint()?;
            let (tables, txn) = w.tables()?;
            let stats = txn.stats()?;
            prune::prune(tables, policy, stats.allocated_pages() * stats.page_size() as u64)
        })
        .await
    }

    /// The oldest sequence from which every event is still here: retention deletes whole runs,
    /// so below the newest sequence it ever deleted there may be holes.
    pub fn resend_floor(&self) -> Result<u64, JournalError> {
        Ok(self.cursor(PRUNED_THROUGH)?.map_or(1, |s| s.saturating_add(1)))
    }

    /// A named cursor, if set.
    pub fn cursor(&self, key: &str) -> Result<Option<u64>, JournalError> {
        if let Some(v) = self.pending().cursors.get(key) {
            return Ok(Some(*v));
        }
        let txn = self.db()?.begin_read()?;
        Ok(txn.open_table(CURSORS)?.get(key)?.map(|v| v.value()))
    }

    /// Wall-clock time of the newest event: a floor for a clock that may have been reset.
    pub fn last_event_ms(&self) -> Result<Option<u64>, JournalError> {
        if let Some((_, record)) = self.pending().records.last() {
            return Ok(Some(codec::decode(record)?.at_ms));
        }
        let txn = self.db()?.begin_read()?;
        match blocks::last(&txn.open_table(EVENTS)?)? {
            Some((_, record)) => Ok(Some(codec::decode(&record)?.at_ms)),
            None => Ok(None),
        }
    }

    /// Writer counters.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// The summary row of a run.
    pub fn run(&self, run_id: &str) -> Result<Option<RunRecord>, JournalError> {
        if let Some(r) = self.pending().run(run_id) {
            return Ok(Some(r.clone()));
        }
        let txn = self.db()?.begin_read()?;
        let runs = txn.open_table(RUNS)?;
        runs.get(run_id)?.map(|v| decode_run(v.value())).transpose()
    }

    /// Runs, newest first by creation, optionally only those with `status`.
    pub fn runs(&self, status: Option<RunStatus>, limit: usize) -> Result<Vec<(String, RunRecord)>, JournalError> {
        let pending = self.pending().runs.clone();
        let txn = self.db()?.begin_read()?;
        let runs = txn.open_table(RUNS)?;
        let mut out = Vec::new();
        for row in runs.iter()? {
            let (k, v) = row?;
            if pending.contains_key(k.value()) {
                continue;
            }
            let r = decode_run(v.value())?;
            if status.is_none_or(|s| s == r.status) {
                out.push((k.value().to_string(), r));
            }
        }
        out.extend(
            pending
                .into_iter()
                .filter(|(_, r)| status.is_none_or(|s| s == r.status)),
        );
        out.sort_by(|a, b| b.1.created_ms.cmp(&a.1.created_ms).then_with(|| a.0.cmp(&b.0)));
        out.truncate(limit);
        Ok(out)
    }

    /// Ids of runs that have not finished.
    pub fn active_runs(&self) -> Result<Vec<String>, JournalError> {
        let pending = self.pending().active.clone();
        let txn = self.db()?.begin_read()?;
        let t = txn.open_table(ACTIVE)?;
        let mut set = std::collections::BTreeSet::new();
        for row in t.iter()? {
            set.insert(row?.0.value().to_string());
        }
        for (run, add) in pending {
            if add {
                set.insert(run);
            } else {
                set.remove(&run);
            }
        }
        Ok(set.into_iter().collect())
    }

    /// A run's events not yet checkpointed: their sequences, and the bytes of those only the
    /// segment log holds yet. Read before the snapshot, as every read of the pending changes.
    fn pending_of(&self, run_id: &str, first_only: bool) -> (Vec<u64>, Logged) {
        let pending = self.pending();
        let mut seqs = pending.run_events.get(run_id).cloned().unwrap_or_default();
        if first_only {
            seqs.truncate(1);
        }
        let logged = seqs
            .iter()
            .filter_map(|s| pending.record(*s).map(|b| (*s, b.into())))
            .collect();
        (seqs, logged)
    }

    /// The events `seqs` of `events`, or of `logged` for those only the log holds.
    fn events_at(
        events: &impl blocks::Events,
        logged: &Logged,
        seqs: impl IntoIterator<Item = u64>,
    ) -> Result<Vec<(u64, Record)>, JournalError> {
        let (mut from_log, mut stored) = (Vec::new(), Vec::new());
        for seq in seqs {
            match logged.binary_search_by_key(&seq, |(s, _)| *s) {
                Ok(i) => from_log.extend(logged.get(i).map(|(s, b)| (*s, b.to_vec()))),
                Err(_) => stored.push(seq),
            }
        }
        stored.sort_unstable();
        let mut all = blocks::get_many(events, &stored)?;
        // The log holds only events newer than every stored one.
        all.extend(from_log);
        all.into_iter().map(|(seq, b)| Ok((seq, codec::decode(&b)?))).collect()
    }

    /// Sequence numbers of a run's events (the index table's and those not yet checkpointed),
    /// the bytes of those only the log holds, and the snapshot to read the rest from.
    fn run_seqs(&self, run_id: &str, first_only: bool) -> Result<RunSeqs, JournalError> {
        let (pending, logged) = self.pending_of(run_id, first_only);
        let txn = self.db()?.begin_read()?;
        let mut seqs = std::collections::BTreeSet::new();
        seqs.extend(tables::read_history(&txn.open_table(RUN_HISTORY)?, run_id, first_only)?);
        seqs.extend(pending);
        Ok((seqs.into_iter().collect(), logged, txn))
    }

    /// A run's whole history with sequence numbers, in order.
    pub fn history(&self, run_id: &str) -> Result<Vec<(u64, Record)>, JournalError> {
        let (seqs, logged, txn) = self.run_seqs(run_id, false)?;
        Self::events_at(&txn.open_table(EVENTS)?, &logged, seqs)
    }

    /// A run's first event (its `RunStarted`, unless retention took the run).
    pub fn first_event(&self, run_id: &str) -> Result<Option<Record>, JournalError> {
        let (seqs, logged, txn) = self.run_seqs(run_id, true)?;
        let first = seqs.first().copied();
        Ok(Self::events_at(&txn.open_table(EVENTS)?, &logged, first)?
            .pop()
            .map(|(_, r)| r))
    }

    /// Events with sequence numbers from `from` on, at most `limit` (the outbox view).
    pub fn events_since(&self, from: u64, limit: usize) -> Result<Vec<(u64, Record)>, JournalError> {
        self.stored_events(from, limit)?
            .into_iter()
            .map(|(seq, v)| Ok((seq, codec::decode(&v)?)))
            .collect()
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
        let (pending, ended) = {
            let p = self.pending();
            (p.timers.clone(), p.ended.clone())
        };
        let txn = self.db()?.begin_read()?;
        let t = txn.open_table(TIMERS)?;
        let mut set = std::collections::BTreeSet::new();
        for row in t.iter()? {
            let (k, _) = row?;
            let (at, run, step) = k.value();
            // The pending changes hold what an ended run set after its end.
            if !ended.contains(run) {
                set.insert((at, run.to_string(), step.to_string()));
            }
        }
        for (key, add) in pending {
            if add {
                set.insert(key);
            } else {
                set.remove(&key);
            }
        }
        Ok(set.into_iter().collect())
    }

    /// How many timers [`Journal::timers`] would list, and the earliest deadline, without
    /// building the list: `status` asks for this, and with 20,000 runs parked on timers the list
    /// cost about 40 ms and 3 MB of heap per request.
    pub fn timer_summary(&self) -> Result<TimerSummary, JournalError> {
        let (pending, ended) = {
            let p = self.pending();
            (p.timers.clone(), p.ended.clone())
        };
        let removed: std::collections::HashSet<(u64, &str, &str)> = pending
            .iter()
            .filter(|(_, add)| !**add)
            .map(|((at, run, step), _)| (*at, run.as_str(), step.as_str()))
            .collect();
        let txn = self.db()?.begin_read()?;
        let t = txn.open_table(TIMERS)?;
        let mut summary = TimerSummary::default();
        // Rows come in deadline order: the first one counted is the earliest.
        for row in t.iter()? {
            let (k, _) = row?;
            let (at, run, step) = k.value();
            if !ended.contains(run) && !removed.contains(&(at, run, step)) {
                summary.pending += 1;
                summary.next_at.get_or_insert(at);
            }
        }
        for ((at, run, step), add) in &pending {
            // An added key is listed once: it was counted above if its row is there and counts.
            let counted = !ended.contains(run) && t.get((*at, run.as_str(), step.as_str()))?.is_some();
            if *add && !counted {
                summary.pending += 1;
                summary.next_at = Some(summary.next_at.map_or(*at, |n| n.min(*at)));
            }
        }
        Ok(summary)
    }

    /// The next sequence number to be assigned (one past the newest event).
    pub fn next_seq(&self) -> Result<u64, JournalError> {
        let logged = self.pending().records.last().map(|(s, _)| s + 1);
        let txn = self.db()?.begin_read()?;
        let stored = tables::next_seq(
            &txn.open_table(META)?,
            &txn.open_table(EVENTS)?,
            &txn.open_table(CURSORS)?,
        )?;
        Ok(logged.map_or(stored, |l| l.max(stored)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::SystemClock;
    use std::sync::atomic::Ordering;

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
        let run_bytes = tables::encode_run(&run);
        let def_bytes = outpost_shared::row::encode(&def);
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
        let log_file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(dir.path().join("j.log"))
            .unwrap();
        let log = FullDisk {
            inner: redb::backends::FileBackend::new(log_file).unwrap(),
            full: full.clone(),
        };
        let j = Journal::open_backend(
            backend,
            Some(Box::new(log)),
            &JournalConfig::default(),
            Arc::new(SystemClock),
        )
        .unwrap();
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
    async fn sequences_never_go_back_across_reopens_even_when_retention_took_the_newest_events() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j.redb");
        let open = || Journal::open(&path, &JournalConfig::default(), Arc::new(SystemClock)).unwrap();
        let j = open();
        j.start_run("a", started("w")).await.unwrap();
        j.append("a", vec![Event::RunCompleted { output: "null".into() }])
            .await
            .unwrap();
        j.close().await.unwrap();
        let j = open();
        assert_eq!(j.next_seq().unwrap(), 3, "derived from the newest event");
        let policy = Retention {
            finished_before_ms: u64::MAX,
            max_bytes: u64::MAX,
            keep_from_seq: u64::MAX,
            max_runs: 100,
        };
        assert_eq!(j.prune(policy).await.unwrap().events, 2);
        j.close().await.unwrap();
        let j = open();
        assert_eq!(j.next_seq().unwrap(), 3, "derived from what retention deleted");
        j.start_run("b", started("w")).await.unwrap();
        assert_eq!(j.history("b").unwrap()[0].0, 3);
        j.close().await.unwrap();
    }

    /// A format-4 file's `run_events` rows become one `run_history` row per run, the old table
    /// goes, and the histories read, grow and survive a reopen as before.
    #[tokio::test]
    async fn a_format_4_files_run_events_move_into_run_history() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j.redb");
        {
            let db = Database::create(&path).unwrap();
            let txn = db.begin_write().unwrap();
            {
                txn.open_table(META).unwrap().insert("format", 4).unwrap();
                let mut events = txn.open_table(EVENTS).unwrap();
                let mut index = txn.open_table(tables::RUN_EVENTS).unwrap();
                let mut runs = txn.open_table(RUNS).unwrap();
                for (seq, run, event) in [(1, "a", started("w")), (2, "b", started("w")), (3, "a", failed())] {
                    let record = Record {
                        run_id: run.into(),
                        at_ms: 1_000 + seq,
                        event,
                    };
                    events.insert(seq, codec::encode(&record).as_slice()).unwrap();
                    index.insert((run, seq), ()).unwrap();
                }
                for run in ["a", "b"] {
                    let row = RunRecord {
                        workflow: "w".into(),
                        version: 1,
                        status: RunStatus::Running,
                        created_ms: 1_000,
                        finished_ms: None,
                    };
                    runs.insert(run, tables::encode_run(&row).as_slice()).unwrap();
                }
                txn.open_table(ACTIVE).unwrap().insert("b", ()).unwrap();
                txn.open_table(CURSORS)
                    .unwrap()
                    .insert(index::INDEXED_THROUGH, 3)
                    .unwrap();
            }
            txn.commit().unwrap();
        }
        let seqs = |j: &Journal, run: &str| j.history(run).unwrap().iter().map(|e| e.0).collect::<Vec<_>>();
        // Before any open upgrades it: `journal-check` (which `outpost run` runs first) reads
        // the old rows, and `list --offline` is sent to an upgraded copy.
        let checked = verify(&path).unwrap();
        assert!(!checked.repaired && checked.rows > 0, "{checked:?}");
        assert!(matches!(
            Journal::open_read_only(&path),
            Err(JournalError::OlderFormat { found: 4, .. })
        ));
        {
            let copy = dir.path().join("copy.redb");
            let j = Journal::open_repaired_copy(&path, &copy).unwrap();
            assert_eq!((seqs(&j, "a"), seqs(&j, "b")), (vec![1, 3], vec![2]));
            assert_eq!(j.next_seq().unwrap(), 4);
        }
        {
            let j = Journal::open(&path, &JournalConfig::default(), Arc::new(SystemClock)).unwrap();
            assert_eq!(seqs(&j, "a"), [1, 3]);
            assert_eq!(seqs(&j, "b"), [2]);
            assert!(matches!(
                j.first_event("b").unwrap().map(|r| r.event),
                Some(Event::RunStarted { .. })
            ));
            j.append("b", vec![timer("t", 10)]).await.unwrap();
            j.checkpoint().await.unwrap();
            assert_eq!(seqs(&j, "b"), [2, 4]);
        }
        let j = reopen(&path).await;
        assert_eq!(seqs(&j, "a"), [1, 3]);
        assert_eq!(seqs(&j, "b"), [2, 4]);
        j.close().await.unwrap();
        let db = Database::create(&path).unwrap();
        let txn = db.begin_read().unwrap();
        assert_eq!(
            txn.open_table(META).unwrap().get("format").unwrap().map(|v| v.value()),
            Some(FORMAT)
        );
        assert!(txn.open_table(tables::RUN_EVENTS).is_err(), "run_events is gone");
    }

    /// An upgrade packs `events` in steps of its own commits. One cut short by a crash leaves a
    /// file that `journal-check` reads, that `--offline` reads through an upgraded copy, and that
    /// the next open finishes.
    #[tokio::test]
    async fn an_upgrade_cut_short_is_checked_read_through_a_copy_and_finished_by_the_next_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j.redb");
        let histories = |j: &Journal| -> Vec<Vec<u64>> {
            ["a", "b", "c"]
                .iter()
                .map(|r| j.history(r).unwrap().iter().map(|e| e.0).collect())
                .collect()
        };
        let want = {
            let j = Journal::open(&path, &JournalConfig::default(), Arc::new(SystemClock)).unwrap();
            for run in ["a", "b", "c"] {
                j.start_run(run, started("w")).await.unwrap();
            }
            for n in 0..60 {
                for run in ["a", "b", "c"] {
                    j.append(run, vec![timer("t", n)]).await.unwrap();
                }
            }
            let want = histories(&j);
            j.close().await.unwrap();
            want
        };
        // Back to format 5: one record a row.
        {
            let db = Database::create(&path).unwrap();
            let txn = db.begin_write().unwrap();
            {
                let mut events = txn.open_table(EVENTS).unwrap();
                let all = blocks::read_from(&events, 0, usize::MAX).unwrap();
                assert_eq!(all.len(), 183);
                let keys: Vec<u64> = events.iter().unwrap().map(|r| r.unwrap().0.value()).collect();
                for k in keys {
                    events.remove(k).unwrap();
                }
                for (seq, record) in &all {
                    events.insert(*seq, record.as_slice()).unwrap();
                }
                txn.open_table(META).unwrap().insert("format", 5).unwrap();
            }
            txn.commit().unwrap();
            // One step of the upgrade, then the crash.
            assert_eq!(tables::upgrade_step(&db, 50).unwrap(), (50, true));
        }
        verify(&path).unwrap();
        assert!(matches!(
            Journal::open_read_only(&path),
            Err(JournalError::OlderFormat { found: 5, .. })
        ));
        {
            let j = Journal::open_repaired_copy(&path, &dir.path().join("copy.redb")).unwrap();
            assert_eq!(histories(&j), want);
        }
        let j = reopen(&path).await;
        assert_eq!(histories(&j), want);
        assert_eq!(j.next_seq().unwrap(), 184);
        assert_eq!(j.cursor(tables::PACKED_BELOW).unwrap(), None);
        j.close().await.unwrap();
        verify(&path).unwrap();
        assert!(Journal::open_read_only(&path).is_ok());
    }

    #[tokio::test]
    async fn a_format_1_file_keeps_its_stored_sequence_and_is_upgraded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j.redb");
        {
            let db = Database::create(&path).unwrap();
            let txn = db.begin_write().unwrap();
            {
                let mut meta = txn.open_table(META).unwrap();
                meta.insert("format", 1).unwrap();
                meta.insert("next_seq", 10).unwrap();
            }
            txn.commit().unwrap();
        }
        let j = Journal::open(&path, &JournalConfig::default(), Arc::new(SystemClock)).unwrap();
        assert_eq!(j.next_seq().unwrap(), 10);
        j.start_run("a", started("w")).await.unwrap();
        assert_eq!(j.history("a").unwrap()[0].0, 10);
        j.close().await.unwrap();
        let db = Database::create(&path).unwrap();
        let format = db
            .begin_read()
            .unwrap()
            .open_table(META)
            .unwrap()
            .get("format")
            .unwrap()
            .map(|v| v.value());
        assert_eq!(format, Some(FORMAT), "upgraded, so a format-1-only build refuses it");
    }

    /// Opens the journal at `path` again once the last writer has let go of its file lock (the
    /// writer thread holds the last handle until its channel closes).
    async fn reopen(path: &Path) -> Journal {
        for _ in 0..100 {
            match Journal::open(path, &JournalConfig::default(), Arc::new(SystemClock)) {
                Ok(j) => return j,
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(10)).await,
            }
        }
        panic!("journal at {} does not reopen", path.display())
    }

    fn timer(step: &str, at: u64) -> Event {
        Event::TimerSet {
            step: step.into(),
            visit: 1,
            fire_at_ms: at,
            duration_ms: 1,
        }
    }

    fn failed() -> Event {
        Event::RunFailed {
            error: outpost_shared::journal::ErrorInfo::new("k", "m"),
        }
    }

    /// An end drops the run's timers wherever they are (checkpointed, pending, or both), and only
    /// those set before it: a retried run's new timer stays, through checkpoints and a reopen.
    #[tokio::test]
    async fn an_end_drops_the_runs_timers_in_the_tables_and_pending_and_not_the_next_ones() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j.redb");
        let keys = |j: &Journal| {
            let timers = j.timers().unwrap();
            // The summary `status` shows counts exactly what the list holds.
            let summary = j.timer_summary().unwrap();
            assert_eq!(summary.pending, timers.len());
            assert_eq!(summary.next_at, timers.iter().map(|t| t.0).min());
            timers
                .into_iter()
                .map(|(at, run, step)| format!("{run}/{step}@{at}"))
                .collect::<Vec<_>>()
        };
        {
            let j = Journal::open(&path, &JournalConfig::default(), Arc::new(SystemClock)).unwrap();
            for run in ["a", "b"] {
                j.start_run(run, started("w")).await.unwrap();
                j.append(run, vec![timer("t1", 100)]).await.unwrap();
            }
            j.checkpoint().await.unwrap();
            j.append("a", vec![timer("t2", 200)]).await.unwrap();
            assert_eq!(keys(&j), ["a/t1@100", "b/t1@100", "a/t2@200"]);
            // One checkpointed timer and one pending go with the end; b's stay.
            j.append("a", vec![failed()]).await.unwrap();
            assert_eq!(keys(&j), ["b/t1@100"]);
            j.append("a", vec![Event::RunRetried { by: "op".into() }, timer("t3", 300)])
                .await
                .unwrap();
            assert_eq!(keys(&j), ["b/t1@100", "a/t3@300"]);
            j.checkpoint().await.unwrap();
            assert_eq!(keys(&j), ["b/t1@100", "a/t3@300"]);
            // An end in the same window as the retry's timer, after a checkpoint of it.
            j.append("b", vec![failed()]).await.unwrap();
            assert_eq!(keys(&j), ["a/t3@300"]);
        }
        let j = reopen(&path).await;
        assert_eq!(keys(&j), ["a/t3@300"]);
        j.checkpoint().await.unwrap();
        assert_eq!(keys(&j), ["a/t3@300"]);
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
        let j = reopen(&path).await;
        assert_eq!(j.next_seq().unwrap(), 3);
        assert_eq!(j.run("a").unwrap().unwrap().status, RunStatus::Cancelled);
    }
}
