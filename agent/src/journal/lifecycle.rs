//! A run's lifecycle in the journal: what starting, appending to and ending a run write, inside
//! the writer's transaction. The rules live here, not in the writer: a finished run takes no
//! more events except `RunRetried`, which reopens a failed one; a `RunContinued` starts the next
//! run of its chain in the same commit. What the events imply for the index tables (rows,
//! timers, a run's end) is `index::Pending::derive`'s, the same on the hot path and in replay.

use std::collections::HashSet;

use outpost_shared::journal::{self as codec, Event, Record};

use super::index::{Layered, Lookup, Pending};
use super::tables::RunRecord;
use super::writer::Store;
use super::{JournalError, Started};
use crate::engine::RunStatus;

/// Sequence numbers and the set of unfinished runs, as the writer's batches change them. What a
/// batch changes counts only once it commits (`committed`); a failed batch is rolled back
/// (`rolled_back`). The index changes its events imply collect in `batch` (see `index`).
pub(super) struct Runs {
    /// The next sequence number to assign.
    pub(super) next_seq: u64,
    /// Unfinished runs, mirrored from `active_runs` so appends need no lookup.
    active: HashSet<String>,
    /// Runs the batch being written started (or reopened).
    started: HashSet<String>,
    /// Runs the batch being written ended.
    finished: HashSet<String>,
    /// The index changes of the batch being written.
    pub(super) batch: Pending,
}

impl Runs {
    /// The state read from the file: the next sequence and the unfinished runs.
    pub(super) fn new(next_seq: u64, active: HashSet<String>) -> Runs {
        Runs {
            next_seq,
            active,
            started: HashSet::new(),
            finished: HashSet::new(),
            batch: Pending::default(),
        }
    }

    /// The batch committed: its starts and ends now count. Gives its index changes.
    pub(super) fn committed(&mut self) -> Pending {
        self.active.extend(self.started.drain());
        for id in self.finished.drain() {
            self.active.remove(&id);
        }
        std::mem::take(&mut self.batch)
    }

    /// The batch failed: nothing of it was written, so its sequence numbers are handed out again.
    pub(super) fn rolled_back(&mut self, next_seq: u64) {
        self.next_seq = next_seq;
        self.started.clear();
        self.finished.clear();
        self.batch = Pending::default();
    }

    fn is_active(&self, run_id: &str) -> bool {
        (self.active.contains(run_id) || self.started.contains(run_id)) && !self.finished.contains(run_id)
    }

    /// A run's row: this batch's changes over the shared ones over the table.
    fn lookup(&self, t: &Store, shared: &Pending, run_id: &str) -> Result<Option<RunRecord>, JournalError> {
        if let Some(r) = self.batch.run(run_id).or_else(|| shared.run(run_id)) {
            return Ok(Some(r.clone()));
        }
        t.lookup().run(run_id)
    }

    /// Journals a new run's `RunStarted`, unless a run with that id exists.
    pub(super) fn start(
        &mut self,
        t: &mut Store,
        shared: &Pending,
        run_id: &str,
        event: Event,
        now: u64,
    ) -> Result<Started, JournalError> {
        if let Some(existing) = self.lookup(t, shared, run_id)? {
            return Ok(Started::Existing(existing));
        }
        if !matches!(event, Event::RunStarted { .. }) {
            return Err(JournalError::NoSuchRun(run_id.to_string()));
        }
        self.started.insert(run_id.to_string());
        self.write_event(t, shared, run_id, now, event)?;
        Ok(Started::Created)
    }

    /// Appends events to an unfinished run (or reopens a failed one for `RunRetried`); an event
    /// that ends the run ends it here and nothing after it is written. Gives the last sequence.
    pub(super) fn append(
        &mut self,
        t: &mut Store,
        shared: &Pending,
        run_id: &str,
        events: Vec<Event>,
        now: u64,
    ) -> Result<u64, JournalError> {
        let retry = matches!(events.first(), Some(Event::RunRetried { .. }));
        if retry || !self.is_active(run_id) {
            self.reopen_for_retry(t, shared, run_id, retry)?;
        }
        let mut last = 0;
        for e in events {
            let terminal = RunStatus::of_terminal(&e).is_some();
            let next = match &e {
                Event::RunContinued { next_run, input } => Some((next_run.clone(), input.clone())),
                _ => None,
            };
            last = self.write_event(t, shared, run_id, now, e)?;
            if terminal {
                self.finished.insert(run_id.to_string());
                // Continue-as-new: the next run exists in the same commit as this one's end.
                if let Some((next_run, input)) = next {
                    let rec = self
                        .lookup(t, shared, run_id)?
                        .ok_or_else(|| JournalError::NoSuchRun(run_id.to_string()))?;
                    let started = Event::RunStarted {
                        workflow: rec.workflow,
                        version: rec.version,
                        input,
                    };
                    self.start(t, shared, &next_run, started, now)?;
                }
                break;
            }
        }
        Ok(last)
    }

    /// Only a failed run that has ended may be reopened, and only by `RunRetried`; anything else
    /// appended to a run that is not active is refused.
    fn reopen_for_retry(&mut self, t: &Store, shared: &Pending, run_id: &str, retry: bool) -> Result<(), JournalError> {
        let rec = self
            .lookup(t, shared, run_id)?
            .ok_or_else(|| JournalError::NoSuchRun(run_id.to_string()))?;
        if !(retry && rec.status == RunStatus::Failed && !self.is_active(run_id)) {
            return Err(JournalError::RunFinished(run_id.to_string()));
        }
        self.finished.remove(run_id);
        self.started.insert(run_id.to_string());
        Ok(())
    }

    /// Writes one event under the next sequence; what it implies for the indexes goes into
    /// the batch's changes (`Pending::derive`: a start's row, a timer, an end's status).
    fn write_event(
        &mut self,
        t: &mut Store,
        shared: &Pending,
        run_id: &str,
        at_ms: u64,
        event: Event,
    ) -> Result<u64, JournalError> {
        let seq = self.next_seq;
        let record = Record {
            run_id: run_id.to_string(),
            at_ms,
            event,
        };
        t.put_event(seq, codec::encode(&record), &mut self.batch)?;
        let mut below = Layered {
            pending: shared,
            below: t.lookup(),
        };
        self.batch.derive(seq, &record, &mut below)?;
        self.next_seq += 1;
        Ok(seq)
    }
}
