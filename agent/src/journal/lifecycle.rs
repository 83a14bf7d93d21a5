//! A run's lifecycle in the journal: what starting, appending to and ending a run write, inside
//! the writer's transaction. The rules live here, not in the writer: a finished run takes no
//! more events except `RunRetried`, which reopens a failed one; a run that ends leaves no timer
//! behind; a `RunContinued` starts the next run of its chain in the same commit.

use std::collections::HashSet;

use outpost_shared::journal::{self as codec, Event, Record};
use redb::ReadableTable;

use super::tables::{RunRecord, Tables, decode_run, encode_run};
use super::{JournalError, Started};
use crate::engine::RunStatus;

/// Sequence numbers and the set of unfinished runs, as the writer's batches change them. What a
/// batch changes counts only once it commits (`committed`); a failed batch is rolled back
/// (`rolled_back`).
pub(super) struct Runs {
    /// The next sequence number to assign.
    pub(super) next_seq: u64,
    /// Unfinished runs, mirrored from `active_runs` so appends need no lookup.
    active: HashSet<String>,
    /// Runs the batch being written started (or reopened).
    started: HashSet<String>,
    /// Runs the batch being written ended.
    finished: HashSet<String>,
}

impl Runs {
    /// The state read from the file: the next sequence and the unfinished runs.
    pub(super) fn new(next_seq: u64, active: HashSet<String>) -> Runs {
        Runs {
            next_seq,
            active,
            started: HashSet::new(),
            finished: HashSet::new(),
        }
    }

    /// The batch committed: its starts and ends now count.
    pub(super) fn committed(&mut self) {
        self.active.extend(self.started.drain());
        for id in self.finished.drain() {
            self.active.remove(&id);
        }
    }

    /// The batch failed: nothing of it was written, so its sequence numbers are handed out again.
    pub(super) fn rolled_back(&mut self, next_seq: u64) {
        self.next_seq = next_seq;
        self.started.clear();
        self.finished.clear();
    }

    fn is_active(&self, run_id: &str) -> bool {
        (self.active.contains(run_id) || self.started.contains(run_id)) && !self.finished.contains(run_id)
    }

    /// Journals a new run's `RunStarted`, unless a run with that id exists.
    pub(super) fn start(
        &mut self,
        t: &mut Tables,
        run_id: &str,
        event: Event,
        now: u64,
    ) -> Result<Started, JournalError> {
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

    /// Appends events to an unfinished run (or reopens a failed one for `RunRetried`); an event
    /// that ends the run ends it here and nothing after it is written. Gives the last sequence.
    pub(super) fn append(
        &mut self,
        t: &mut Tables,
        run_id: &str,
        events: Vec<Event>,
        now: u64,
    ) -> Result<u64, JournalError> {
        let retry = matches!(events.first(), Some(Event::RunRetried { .. }));
        if retry || !self.is_active(run_id) {
            self.reopen_for_retry(t, run_id, retry)?;
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
                let rec = self.end(t, run_id, status, now)?;
                // Continue-as-new: the next run exists in the same commit as this one's end.
                if let Some((next_run, input)) = next {
                    let started = Event::RunStarted {
                        workflow: rec.workflow,
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

    /// Only a failed run that has ended may be reopened, and only by `RunRetried`; anything else
    /// appended to a run that is not active is refused.
    fn reopen_for_retry(&mut self, t: &mut Tables, run_id: &str, retry: bool) -> Result<(), JournalError> {
        let rec = match t.runs.get(run_id)? {
            Some(v) => decode_run(v.value())?,
            None => return Err(JournalError::NoSuchRun(run_id.to_string())),
        };
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
        Ok(())
    }

    /// Ends a run: its summary row gets the final status, it leaves `active_runs`, and its timers
    /// leave the index. Gives the updated row.
    fn end(&mut self, t: &mut Tables, run_id: &str, status: RunStatus, now: u64) -> Result<RunRecord, JournalError> {
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
        Ok(rec)
    }

    /// Writes one event under the next sequence (and the timer index a timer event changes).
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
}
