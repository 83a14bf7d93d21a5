//! The writer thread: group commit. It takes everything queued, runs each write in one
//! transaction, commits once (one fsync with `Durability::Immediate`), and only then answers
//! every waiter; a failed commit fails every waiter of the batch and hands its sequence numbers
//! out again. After a storage error it reopens the file (redb refuses further transactions
//! until then), every second while idle.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use redb::{Database, Durability, ReadableDatabase, WriteTransaction};
use tokio::sync::{mpsc, oneshot};

use super::index::{Lookup, Pending, TableLookup};
use super::lifecycle::Runs;
use super::tables::{Tables, load_state};
use super::wal::{LOG_GENERATION, LogError, Wal, encode_block};
use super::{JournalError, Opener, Slot, Stats};
use crate::clock::Clock;

/// Most operations folded into one transaction.
pub(super) const MAX_BATCH: usize = 4096;

/// The default of `JournalConfig::linger`: the longest a batch waits for more writes while
/// they keep arriving.
pub(super) const LINGER_MAX: std::time::Duration = std::time::Duration::from_micros(1000);
/// A linger ends after a slot this long in which no write arrived.
const LINGER_SLOT: std::time::Duration = std::time::Duration::from_micros(100);

/// A waiter's reply channel.
pub(super) type Reply<T> = oneshot::Sender<Result<T, JournalError>>;

/// What the writer is asked to do.
pub(super) enum Op {
    /// A write, done in the next batch's transaction and answered after its commit.
    Write(Box<dyn Job>),
    /// Close the database cleanly and stop (taken out of a batch before it commits).
    Close(Reply<()>),
}

/// Where a batch's writes go.
pub(super) enum Store<'a, 'txn> {
    /// Into redb's tables, in the batch's write transaction.
    Tables {
        /// Every table.
        tables: &'a mut Tables<'txn>,
        /// The transaction itself (for its statistics).
        txn: &'txn WriteTransaction,
    },
    /// Into the segment log: the batch's changes collect in `Runs::batch` and go out as one
    /// block; lookups read the newest commit's snapshot.
    Log(&'a Snapshot),
}

/// The table a log batch looks runs up in.
pub(super) struct Snapshot {
    runs: redb::ReadOnlyTable<&'static str, &'static [u8]>,
}

impl Snapshot {
    fn open(db: &Database) -> Result<Snapshot, JournalError> {
        let txn = db.begin_read()?;
        Ok(Snapshot {
            runs: txn.open_table(super::tables::RUNS)?,
        })
    }
}

/// A store's lookups of runs.
pub(super) enum StoreLookup<'a, 'txn> {
    Tables(TableLookup<'a, redb::Table<'txn, &'static str, &'static [u8]>>),
    Log(TableLookup<'a, redb::ReadOnlyTable<&'static str, &'static [u8]>>),
}

impl Lookup for StoreLookup<'_, '_> {
    fn run(&mut self, run_id: &str) -> Result<Option<super::RunRecord>, JournalError> {
        match self {
            StoreLookup::Tables(l) => l.run(run_id),
            StoreLookup::Log(l) => l.run(run_id),
        }
    }
}

impl<'txn> Store<'_, 'txn> {
    /// Looks runs up in what is committed.
    pub(super) fn lookup(&self) -> StoreLookup<'_, 'txn> {
        match self {
            Store::Tables { tables, .. } => StoreLookup::Tables(TableLookup { runs: &tables.runs }),
            Store::Log(s) => StoreLookup::Log(TableLookup { runs: &s.runs }),
        }
    }

    /// Stores event `seq`: in `events`, or with the batch's changes for the log's block.
    pub(super) fn put_event(&mut self, seq: u64, record: Vec<u8>, batch: &mut Pending) -> Result<(), JournalError> {
        match self {
            Store::Tables { tables, .. } => {
                super::blocks::append(&mut tables.events, [(seq, record.as_slice())])?;
            }
            Store::Log(_) => batch.records.push((seq, record.into_boxed_slice())),
        }
        Ok(())
    }
}

/// What a write may touch inside the batch's transaction.
pub(super) struct Txn<'a, 'txn> {
    /// Where the writes go.
    pub(super) store: Store<'a, 'txn>,
    /// Sequence numbers and the run lifecycle.
    pub(super) runs: &'a mut Runs,
    /// The changes committed but not yet in the tables (empty once checkpointed).
    pub(super) indexed: &'a Pending,
    /// Set by `checkpoint`: the shared changes are in the tables, and the batch's from here on
    /// replace them after the commit.
    pub(super) checkpointed: bool,
    /// Stands in for `indexed` after a checkpoint.
    pub(super) empty: &'a Pending,
    /// The log generation a checkpoint moves to (`None`: no log).
    pub(super) next_generation: Option<u64>,
    /// Wall-clock time of the batch.
    pub(super) now: u64,
}

impl<'txn> Txn<'_, 'txn> {
    /// The tables, for a write that only a redb batch runs (never a log batch: see `Job::logged`).
    pub(super) fn tables(&mut self) -> Result<(&mut Tables<'txn>, &'txn WriteTransaction), JournalError> {
        match &mut self.store {
            Store::Tables { tables, txn } => Ok((tables, txn)),
            Store::Log(_) => Err(JournalError::Damaged(
                "internal: a write that needs redb's tables was put in a log batch".into(),
            )),
        }
    }

    /// Writes every change so far (the shared ones, then the batch's: the log's events, cursors
    /// and kv rows, and the index rows) into the tables in this transaction, with the cursors:
    /// a checkpoint inside this commit. Moves the log to its next generation.
    pub(super) fn checkpoint(&mut self) -> Result<(), JournalError> {
        let through = self.runs.next_seq.saturating_sub(1);
        let generation = self.next_generation;
        let Store::Tables { tables, .. } = &mut self.store else {
            return Err(JournalError::Damaged(
                "internal: a checkpoint was put in a log batch".into(),
            ));
        };
        self.indexed.apply(tables, through)?;
        std::mem::take(&mut self.runs.batch).apply(tables, through)?;
        if let Some(g) = generation {
            tables.cursors.insert(LOG_GENERATION, g)?;
        }
        self.indexed = self.empty;
        self.checkpointed = true;
        Ok(())
    }

    /// Durably sets a named cursor.
    pub(super) fn put_cursor(&mut self, key: &str, value: u64) -> Result<(), JournalError> {
        match &mut self.store {
            Store::Tables { tables, .. } => {
                tables.cursors.insert(key, value)?;
            }
            Store::Log(_) => {
                self.runs.batch.cursors.insert(key.to_string(), value);
            }
        }
        Ok(())
    }

    /// Durably stores a kv row.
    pub(super) fn put_kv(&mut self, key: &str, value: Vec<u8>) -> Result<(), JournalError> {
        match &mut self.store {
            Store::Tables { tables, .. } => {
                tables.kv.insert(key, value.as_slice())?;
            }
            Store::Log(_) => {
                self.runs.batch.kv.insert(key.to_string(), value);
            }
        }
        Ok(())
    }
}

/// One queued write: its work, and its waiter.
pub(super) trait Job: Send {
    /// Whether the write may go to the segment log (starts, appends, cursors, kv rows); the
    /// others need redb's tables.
    fn logged(&self) -> bool;
    /// Does the work inside the transaction; the answer waits for the commit.
    fn run(self: Box<Self>, txn: &mut Txn) -> Box<dyn Answer>;
    /// Fails the waiter without doing the work (the batch failed before reaching it).
    fn fail(self: Box<Self>, error: JournalError);
}

/// A write's result, held until the commit.
pub(super) trait Answer: Send {
    /// The redb error the work ran into, which poisons the whole transaction.
    fn storage_error(&self) -> Option<&redb::Error>;
    /// The commit succeeded: the waiter gets the result.
    fn send(self: Box<Self>);
    /// The commit failed: the waiter gets `error` instead.
    fn fail(self: Box<Self>, error: JournalError);
}

/// A write as a closure and its reply channel.
pub(super) struct Write<T, F> {
    pub(super) logged: bool,
    pub(super) work: F,
    pub(super) reply: Reply<T>,
}

struct Answered<T> {
    result: Result<T, JournalError>,
    reply: Reply<T>,
}

impl<T, F> Job for Write<T, F>
where
    T: Send + 'static,
    F: FnOnce(&mut Txn) -> Result<T, JournalError> + Send,
{
    fn logged(&self) -> bool {
        self.logged
    }

    fn run(self: Box<Self>, txn: &mut Txn) -> Box<dyn Answer> {
        let Write { work, reply, .. } = *self;
        Box::new(Answered {
            result: work(txn),
            reply,
        })
    }

    fn fail(self: Box<Self>, error: JournalError) {
        let _ = self.reply.send(Err(error));
    }
}

impl<T: Send + 'static> Answer for Answered<T> {
    fn storage_error(&self) -> Option<&redb::Error> {
        match &self.result {
            Err(JournalError::Storage(e)) => Some(e),
            _ => None,
        }
    }

    fn send(self: Box<Self>) {
        let _ = self.reply.send(self.result);
    }

    fn fail(self: Box<Self>, error: JournalError) {
        let _ = self.reply.send(Err(error));
    }
}

pub(super) struct Writer {
    /// Told the next sequence after every successful commit.
    pub(super) committed: tokio::sync::watch::Sender<u64>,
    /// The writer's own handle; `None` while a reopen has not yet succeeded.
    pub(super) db: Option<Arc<Database>>,
    pub(super) slot: Slot,
    pub(super) opener: Opener,
    pub(super) runs: Runs,
    pub(super) clock: Arc<dyn Clock>,
    pub(super) stats: Arc<Stats>,
    /// Index changes committed but not yet checkpointed; readers merge them.
    pub(super) indexed: Arc<std::sync::RwLock<Pending>>,
    /// Pending events that make the next commit a checkpoint.
    pub(super) checkpoint_events: usize,
    /// How long a batch may wait for more writes (zero: never).
    pub(super) linger: std::time::Duration,
    /// The segment log; `None` when it is off (every batch then goes to redb).
    pub(super) wal: Option<Wal>,
}

impl Writer {
    pub(super) fn run(mut self, mut rx: mpsc::Receiver<Op>) {
        let mut batch = Vec::with_capacity(256);
        let mut close = Vec::new();
        while let Some(first) = self.next_op(&mut rx) {
            let mut next = Some(first);
            let lingered = std::time::Instant::now();
            loop {
                while let Some(op) = next.take() {
                    match op {
                        Op::Write(job) => batch.push(job),
                        Op::Close(reply) => close.push(reply),
                    }
                    if batch.len() < MAX_BATCH {
                        next = rx.try_recv().ok();
                    }
                }
                // Linger while writes keep coming: under load the callers answered by the last
                // commit send their next writes within microseconds, and one commit for all of
                // them writes redb's pages once instead of once per few writes.
                if !close.is_empty() || batch.len() >= MAX_BATCH || lingered.elapsed() >= self.linger {
                    break;
                }
                std::thread::sleep(LINGER_SLOT);
                next = rx.try_recv().ok();
                if next.is_none() {
                    break;
                }
            }
            if !batch.is_empty() {
                self.commit_batch(&mut batch);
            }
            if !close.is_empty() {
                self.close();
                for reply in close.drain(..) {
                    let _ = reply.send(Ok(()));
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

    /// Takes the database out of the readers' slot and waits (up to 5 s) until no reader holds
    /// it, so dropping it closes the file. Gives it back when a reader still holds it.
    fn release(&mut self) -> Result<(), Arc<Database>> {
        *self.slot.write().unwrap_or_else(|p| p.into_inner()) = None;
        let Some(mut db) = self.db.take() else { return Ok(()) };
        for _ in 0..1000 {
            match Arc::try_unwrap(db) {
                Ok(db) => {
                    drop(db);
                    return Ok(());
                }
                Err(shared) => {
                    db = shared;
                    std::thread::sleep(std::time::Duration::from_millis(5));
                }
            }
        }
        Err(db)
    }

    /// Drops the database once no reader holds it, so redb writes its clean-shutdown state and
    /// the next open needs no repair. Readers get `Reopening` from here on.
    fn close(&mut self) {
        // The index tables complete, so the next open replays nothing.
        if let Err(e) = self.checkpoint_now() {
            tracing::warn!(error = %e, "cannot checkpoint the journal's indexes; the next start rebuilds them");
        }
        // The log's lock goes with its file, before the closer is answered: a new open may follow.
        self.wal = None;
        match self.release() {
            Ok(()) => tracing::debug!("journal closed"),
            Err(_) => tracing::warn!("journal still in use after 5 s; closing without a clean shutdown"),
        }
    }

    /// A commit that is only a checkpoint of the shared changes.
    fn checkpoint_now(&mut self) -> Result<(), JournalError> {
        let Some(db) = self.db.clone() else { return Ok(()) };
        let indexed = self.indexed.clone();
        let mut shared = indexed.write().unwrap_or_else(|p| p.into_inner());
        let log_used = self.wal.as_ref().is_some_and(Wal::used);
        if shared.is_empty() && !log_used {
            return Ok(());
        }
        let generation = self.wal.as_ref().map(|w| w.generation + 1);
        let mut txn = db.begin_write()?;
        txn.set_durability(Durability::Immediate)?;
        {
            let mut tables = Tables::open(&txn)?;
            shared.apply(&mut tables, self.runs.next_seq.saturating_sub(1))?;
            if let Some(g) = generation {
                tables.cursors.insert(LOG_GENERATION, g)?;
            }
        }
        txn.commit()?;
        *shared = Pending::default();
        if let (Some(wal), Some(g)) = (self.wal.as_mut(), generation) {
            wal.restart(g);
        }
        Ok(())
    }

    /// Closes and reopens the database: after an I/O error redb refuses further transactions
    /// until it is reopened. Readers briefly get `Reopening`.
    fn reopen(&mut self) -> Result<(), JournalError> {
        // The file stays locked until every reader has dropped its handle.
        if let Err(still_shared) = self.release() {
            self.db = Some(still_shared);
            return Err(JournalError::Reopening);
        }
        let db = Arc::new((self.opener)()?);
        let (mut next_seq, mut active) = load_state(&db)?;
        // What is not yet checkpointed is still right: it is derived from committed events,
        // and those only the log holds are not in the file at all.
        {
            let shared = self.indexed.read().unwrap_or_else(|p| p.into_inner());
            shared.overlay_active(&mut active);
            if let Some((last, _)) = shared.records.last() {
                next_seq = next_seq.max(last + 1);
            }
        }
        self.runs = Runs::new(next_seq, active);
        *self.slot.write().unwrap_or_else(|p| p.into_inner()) =
            Some(db.clone() as Arc<dyn ReadableDatabase + Send + Sync>);
        self.db = Some(db);
        tracing::info!(next_seq, "journal reopened after a storage error");
        Ok(())
    }

    fn commit_batch(&mut self, batch: &mut Vec<Box<dyn Job>>) {
        let n = batch.len() as u64;
        let mut answers: Vec<Box<dyn Answer>> = Vec::with_capacity(batch.len());
        if self.db.is_none()
            && let Err(e) = self.reopen()
        {
            tracing::error!(error = %e, "journal is still unavailable");
        }
        let start_seq = self.runs.next_seq;
        let now = self.clock.now_ms();
        let indexed = self.indexed.clone();
        let shared = indexed.read().unwrap_or_else(|p| p.into_inner());
        let logged = self.wal.as_ref().is_some_and(Wal::usable)
            && shared.events < self.checkpoint_events
            && batch.iter().all(|j| j.logged());
        let result = if logged {
            self.write_logged(batch, &mut answers, &shared, now)
        } else {
            self.write_tables(batch, &mut answers, &shared, now)
        };
        drop(shared);
        match result {
            Ok(checkpointed) => {
                let changes = self.runs.committed();
                {
                    let mut shared = self.indexed.write().unwrap_or_else(|p| p.into_inner());
                    if checkpointed {
                        *shared = changes;
                    } else {
                        shared.merge(changes);
                    }
                }
                if checkpointed && let Some(wal) = self.wal.as_mut() {
                    wal.restart(wal.generation + 1);
                }
                self.stats.commits.fetch_add(1, Ordering::Relaxed);
                self.committed.send_replace(self.runs.next_seq);
                self.stats.ops.fetch_add(n, Ordering::Relaxed);
                self.stats
                    .events
                    .fetch_add(self.runs.next_seq.saturating_sub(start_seq), Ordering::Relaxed);
                for a in answers {
                    a.send();
                }
            }
            Err(e) => {
                // Nothing of this batch is durable: roll the sequence back and fail every waiter.
                tracing::error!(error = %e, ops = n, "journal commit failed; nothing in this batch was written");
                self.runs.rolled_back(start_seq);
                if matches!(e, JournalError::Storage(_))
                    && let Err(e) = self.reopen()
                {
                    tracing::error!(error = %e, "cannot reopen the journal yet; will retry with the next write");
                }
                // The waiters' errors carry the cause once, not wrapped in this error's own text.
                let msg = match &e {
                    JournalError::Storage(inner) => io_text(inner),
                    JournalError::Log(LogError::Io(inner)) => inner.to_string(),
                    other => other.to_string(),
                };
                for a in answers {
                    a.fail(storage_failure(&msg));
                }
                for job in batch.drain(..) {
                    job.fail(storage_failure(&msg));
                }
            }
        }
    }

    /// Runs the batch's jobs in `txn`, stopping at the first storage error (it poisons the
    /// transaction).
    fn run_jobs(
        batch: &mut Vec<Box<dyn Job>>,
        answers: &mut Vec<Box<dyn Answer>>,
        w: &mut Txn,
    ) -> Result<(), JournalError> {
        for job in batch.drain(..) {
            let answer = job.run(w);
            if let Some(e) = answer.storage_error() {
                let e = storage_failure(&io_text(e));
                answers.push(answer);
                return Err(e);
            }
            answers.push(answer);
        }
        Ok(())
    }

    /// A group commit into redb: one write transaction, one fsync. Checkpoints first when the
    /// shared changes are due or the log holds anything (a redb commit must not put events
    /// ahead of the log's). Gives whether it checkpointed.
    fn write_tables(
        &mut self,
        batch: &mut Vec<Box<dyn Job>>,
        answers: &mut Vec<Box<dyn Answer>>,
        shared: &Pending,
        now: u64,
    ) -> Result<bool, JournalError> {
        let db = self.db.clone().ok_or(JournalError::Reopening)?;
        let log_used = self.wal.as_ref().is_some_and(Wal::used);
        let mut txn = db.begin_write()?;
        txn.set_durability(Durability::Immediate)?;
        let empty = Pending::default();
        let checkpointed = {
            let mut tables = Tables::open(&txn)?;
            let mut w = Txn {
                store: Store::Tables {
                    tables: &mut tables,
                    txn: &txn,
                },
                runs: &mut self.runs,
                indexed: shared,
                checkpointed: false,
                empty: &empty,
                next_generation: self.wal.as_ref().map(|w| w.generation + 1),
                now,
            };
            if shared.events >= self.checkpoint_events || shared.logged() || log_used {
                w.checkpoint()?;
            }
            let ran = Self::run_jobs(batch, answers, &mut w);
            let checkpointed = w.checkpointed;
            ran?;
            checkpointed
        };
        txn.commit()?;
        Ok(checkpointed)
    }

    /// A group commit into the segment log: the jobs run against the newest commit's snapshot,
    /// their changes go out as one block, synced once. A block that does not fit goes to redb
    /// instead, in a checkpoint. Gives whether it checkpointed.
    fn write_logged(
        &mut self,
        batch: &mut Vec<Box<dyn Job>>,
        answers: &mut Vec<Box<dyn Answer>>,
        shared: &Pending,
        now: u64,
    ) -> Result<bool, JournalError> {
        let db = self.db.clone().ok_or(JournalError::Reopening)?;
        let snapshot = Snapshot::open(&db)?;
        let empty = Pending::default();
        {
            let mut w = Txn {
                store: Store::Log(&snapshot),
                runs: &mut self.runs,
                indexed: shared,
                checkpointed: false,
                empty: &empty,
                next_generation: None,
                now,
            };
            Self::run_jobs(batch, answers, &mut w)?;
        }
        let Some(wal) = self.wal.as_mut() else {
            return Err(JournalError::Reopening);
        };
        if !self.runs.batch.logged() {
            // Nothing to write (every job was refused): nothing to sync either.
            return Ok(false);
        }
        let (generation, number) = wal.next();
        let block = encode_block(generation, number, &self.runs.batch.log_entries());
        if wal.fits(block.len()) {
            return match wal.append(&block) {
                Ok(()) => Ok(false),
                Err(e) => {
                    // After a failed write or sync the log's state is unknown: batches go to redb,
                    // which checkpoints what the log held first and moves it to a new generation.
                    tracing::error!(error = %e, "the journal log failed; writing to the journal file directly until a checkpoint");
                    // Not a redb error: the file stays open, and readers go on reading it.
                    Err(JournalError::Log(LogError::Io(e)))
                }
            };
        }
        drop(block);
        let mut txn = db.begin_write()?;
        txn.set_durability(Durability::Immediate)?;
        {
            let mut tables = Tables::open(&txn)?;
            let mut w = Txn {
                store: Store::Tables {
                    tables: &mut tables,
                    txn: &txn,
                },
                runs: &mut self.runs,
                indexed: shared,
                checkpointed: false,
                empty: &empty,
                next_generation: Some(generation + 1),
                now,
            };
            w.checkpoint()?;
        }
        txn.commit()?;
        Ok(true)
    }
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
