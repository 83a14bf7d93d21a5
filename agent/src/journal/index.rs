//! The derived indexes between checkpoints.
//!
//! `run_history`, `runs`, `active_runs` and `timers` follow from the events alone. So the hot path
//! commits only `events` (and the rare definition, cursor and kv rows), and what each event
//! implies for the indexes collects here, in memory ([`Pending`]). A checkpoint writes it into
//! redb inside an ordinary group commit, together with the cursor `journal/indexed_through`
//! (every event up to it is in the index tables). That happens when [`CHECKPOINT_EVENTS`]
//! events have collected, before retention, and at a clean close. After a crash, the open
//! rebuilds the indexes from the events past the cursor ([`replay`]), with the same derivation
//! ([`Pending::derive`]) the hot path uses, so both give the same rows. Readers merge the
//! pending changes with what redb holds (`Journal::run`, `history`, …).
//!
//! Why: redb is copy-on-write, and the index tables are keyed by run id, so every commit that
//! touched them rewrote a scatter of leaves; see docs/journal.md for the measurements.

use std::collections::{HashMap, HashSet};

use outpost_shared::journal::{self as codec, Event, Record};
use redb::ReadableTable;

use super::JournalError;
use super::tables::{RunRecord, Tables, decode_run, encode_run, extend_history};
use crate::engine::RunStatus;

/// Cursor: every event up to this sequence is in the index tables.
pub(super) const INDEXED_THROUGH: &str = "journal/indexed_through";

/// Pending events that make the next commit a checkpoint: bounds both memory (well under a
/// megabyte of index rows) and the replay after a crash (well under a second), while one
/// checkpoint's scattered index pages are shared by this many events. 16,384 wrote no fewer
/// bytes per step and held about 2.7 MB more with 20,000 runs parked (docs/journal.md).
pub(super) const CHECKPOINT_EVENTS: usize = 4_096;

/// Index changes not yet in redb; later changes replace earlier ones.
#[derive(Debug, Clone, Default, PartialEq)]
pub(super) struct Pending {
    /// Each run's events not yet in `run_history`, in order.
    pub(super) run_events: HashMap<String, Vec<u64>>,
    /// Run rows to write.
    pub(super) runs: HashMap<String, RunRecord>,
    /// Changes to `active_runs`: `true` adds, `false` removes.
    pub(super) active: HashMap<String, bool>,
    /// Changes to `timers`: `true` adds, `false` removes. A run that ended here keeps only the
    /// changes made after its end.
    pub(super) timers: HashMap<(u64, String, String), bool>,
    /// Runs that ended here: every row of theirs in `timers` goes. An end drops the run's timers
    /// without looking them up, since the table is ordered by deadline and a lookup by run
    /// would read all of it (with 20,000 runs parked on timers, each run's end cost a scan of
    /// 20,000 rows on the writer thread).
    pub(super) ended: HashSet<String>,
    /// Events whose changes are here.
    pub(super) events: usize,
    /// Events in the segment log but not yet in `events`, in sequence order: (seq, record bytes).
    pub(super) records: Vec<(u64, Box<[u8]>)>,
    /// Cursors set in the segment log but not yet in `cursors`.
    pub(super) cursors: HashMap<String, u64>,
    /// kv rows set in the segment log but not yet in `kv`.
    pub(super) kv: HashMap<String, Vec<u8>>,
}

/// Where the derivation looks up what it does not hold itself: a run's row, as committed before
/// (the shared pending changes over redb's tables).
pub(super) trait Lookup {
    /// A run's row.
    fn run(&mut self, run_id: &str) -> Result<Option<RunRecord>, JournalError>;
}

impl Pending {
    /// Nothing pending.
    pub(super) fn is_empty(&self) -> bool {
        self.events == 0
            && self.runs.is_empty()
            && self.active.is_empty()
            && self.timers.is_empty()
            && self.ended.is_empty()
            && !self.logged()
    }

    /// Whether any of these changes are held only by the segment log (not yet in redb).
    pub(super) fn logged(&self) -> bool {
        !(self.records.is_empty() && self.cursors.is_empty() && self.kv.is_empty())
    }

    /// The stored bytes of event `seq`, if it is one held here.
    pub(super) fn record(&self, seq: u64) -> Option<&[u8]> {
        let i = self.records.binary_search_by_key(&seq, |(s, _)| *s).ok()?;
        self.records.get(i).map(|(_, b)| &b[..])
    }

    /// Up to `limit` held events from `from` on.
    pub(super) fn records_from(&self, from: u64, limit: usize) -> Vec<(u64, Box<[u8]>)> {
        let i = self.records.partition_point(|(s, _)| *s < from);
        self.records.iter().skip(i).take(limit).cloned().collect()
    }

    /// The log entries of these changes (one group commit's block).
    pub(super) fn log_entries(&self) -> Vec<super::wal::EntryRef<'_>> {
        let mut out = Vec::with_capacity(self.records.len() + self.cursors.len() + self.kv.len());
        out.extend(
            self.records
                .iter()
                .map(|(seq, record)| super::wal::EntryRef::Event { seq: *seq, record }),
        );
        out.extend(
            self.cursors
                .iter()
                .map(|(key, value)| super::wal::EntryRef::Cursor { key, value: *value }),
        );
        out.extend(
            self.kv
                .iter()
                .map(|(key, value)| super::wal::EntryRef::Kv { key, value }),
        );
        out
    }

    /// Takes `later`'s changes on top of these.
    pub(super) fn merge(&mut self, later: Pending) {
        for (run, seqs) in later.run_events {
            self.run_events.entry(run).or_default().extend(seqs);
        }
        self.runs.extend(later.runs);
        self.active.extend(later.active);
        // Later ends drop the timers set before them; `later.timers` holds only what follows.
        if !later.ended.is_empty() {
            self.timers.retain(|(_, run, _), _| !later.ended.contains(run));
        }
        self.timers.extend(later.timers);
        self.ended.extend(later.ended);
        self.events += later.events;
        self.records.extend(later.records);
        self.cursors.extend(later.cursors);
        self.kv.extend(later.kv);
    }

    /// Applies the changes to `active_runs` to a set read from the table.
    pub(super) fn overlay_active(&self, set: &mut std::collections::HashSet<String>) {
        for (run, add) in &self.active {
            if *add {
                set.insert(run.clone());
            } else {
                set.remove(run);
            }
        }
    }

    /// A run's row as these changes leave it, if they touch it.
    pub(super) fn run(&self, run_id: &str) -> Option<&RunRecord> {
        self.runs.get(run_id)
    }

    /// What one event, stored under `seq`, implies for the indexes. `before` answers for what
    /// is not in `self`.
    pub(super) fn derive(&mut self, seq: u64, r: &Record, before: &mut dyn Lookup) -> Result<(), JournalError> {
        let run_id = r.run_id.as_str();
        self.run_events.entry(run_id.to_string()).or_default().push(seq);
        self.events += 1;
        match &r.event {
            Event::RunStarted { workflow, version, .. } => {
                let rec = RunRecord {
                    workflow: workflow.clone(),
                    version: *version,
                    status: RunStatus::Running,
                    created_ms: r.at_ms,
                    finished_ms: None,
                };
                self.runs.insert(run_id.to_string(), rec);
                self.active.insert(run_id.to_string(), true);
            }
            Event::RunRetried { .. } => {
                // Reopens a failed run.
                if let Some(rec) = self.current(run_id, before)? {
                    let rec = RunRecord {
                        status: RunStatus::Running,
                        finished_ms: None,
                        ..rec
                    };
                    self.runs.insert(run_id.to_string(), rec);
                    self.active.insert(run_id.to_string(), true);
                }
            }
            Event::TimerSet { step, fire_at_ms, .. } => {
                self.timers
                    .insert((*fire_at_ms, run_id.to_string(), step.clone()), true);
            }
            Event::TimerFired { step, fire_at_ms, .. } => {
                self.timers
                    .insert((*fire_at_ms, run_id.to_string(), step.clone()), false);
            }
            e => {
                if let Some(status) = RunStatus::of_terminal(e) {
                    // A run that ends leaves no timer behind.
                    self.timers.retain(|(_, run, _), _| run != run_id);
                    self.ended.insert(run_id.to_string());
                    if let Some(mut rec) = self.current(run_id, before)? {
                        rec.status = status;
                        rec.finished_ms = Some(r.at_ms);
                        self.runs.insert(run_id.to_string(), rec);
                    }
                    self.active.insert(run_id.to_string(), false);
                }
            }
        }
        Ok(())
    }

    fn current(&self, run_id: &str, before: &mut dyn Lookup) -> Result<Option<RunRecord>, JournalError> {
        match self.runs.get(run_id) {
            Some(r) => Ok(Some(r.clone())),
            None => before.run(run_id),
        }
    }

    /// Takes a log's entries, read back, as if their commits had just been made: the events'
    /// index changes (looked up in `below` for what is not here), and the cursors and kv rows.
    pub(super) fn take_log(
        &mut self,
        entries: Vec<super::wal::Entry>,
        below: &mut dyn Lookup,
    ) -> Result<(), JournalError> {
        for entry in entries {
            match entry {
                super::wal::Entry::Event { seq, record } => {
                    self.derive(seq, &codec::decode(&record)?, below)?;
                    self.records.push((seq, record.into_boxed_slice()));
                }
                super::wal::Entry::Cursor { key, value } => {
                    self.cursors.insert(key, value);
                }
                super::wal::Entry::Kv { key, value } => {
                    self.kv.insert(key, value);
                }
            }
        }
        Ok(())
    }

    /// Writes the changes into the tables (the log's events, cursors and kv rows, and the
    /// index rows) and moves the cursor to `through`.
    pub(super) fn apply(&self, t: &mut Tables, through: u64) -> Result<(), JournalError> {
        super::blocks::append(&mut t.events, self.records.iter().map(|(s, r)| (*s, &r[..])))?;
        for (key, value) in &self.cursors {
            t.cursors.insert(key.as_str(), *value)?;
        }
        for (key, value) in &self.kv {
            t.kv.insert(key.as_str(), value.as_slice())?;
        }
        // In key order: redb packs leaves written in order (the append-only `events` table's are
        // nearly full) and splits the ones written at random, leaving them about half empty.
        for (run, seqs) in sorted(&self.run_events) {
            extend_history(&mut t.run_history, run, seqs)?;
        }
        for (run, rec) in sorted(&self.runs) {
            t.runs.insert(run.as_str(), encode_run(rec).as_slice())?;
        }
        for (run, add) in sorted(&self.active) {
            if *add {
                t.active.insert(run.as_str(), ())?;
            } else {
                t.active.remove(run.as_str())?;
            }
        }
        if !self.ended.is_empty() {
            let mut gone = Vec::new();
            for row in t.timers.iter()? {
                let (k, _) = row?;
                let (at, run, step) = k.value();
                if self.ended.contains(run) {
                    gone.push((at, run.to_string(), step.to_string()));
                }
            }
            for (at, run, step) in gone {
                t.timers.remove((at, run.as_str(), step.as_str()))?;
            }
        }
        for ((at, run, step), add) in sorted(&self.timers) {
            if *add {
                t.timers.insert((*at, run.as_str(), step.as_str()), ())?;
            } else {
                t.timers.remove((*at, run.as_str(), step.as_str()))?;
            }
        }
        t.cursors.insert(INDEXED_THROUGH, through)?;
        Ok(())
    }
}

/// A map's entries in key order.
fn sorted<K: Ord, V>(map: &HashMap<K, V>) -> Vec<(&K, &V)> {
    let mut entries: Vec<_> = map.iter().collect();
    entries.sort_unstable_by(|a, b| a.0.cmp(b.0));
    entries
}

/// Looks runs up in redb's `runs` table (as of the transaction's snapshot).
pub(super) struct TableLookup<'a, R> {
    pub(super) runs: &'a R,
}

impl<R> Lookup for TableLookup<'_, R>
where
    R: ReadableTable<&'static str, &'static [u8]>,
{
    fn run(&mut self, run_id: &str) -> Result<Option<RunRecord>, JournalError> {
        self.runs.get(run_id)?.map(|v| decode_run(v.value())).transpose()
    }
}

/// Pending changes over the tables: what a batch looks up while the shared changes are not yet
/// written.
pub(super) struct Layered<'a, L> {
    pub(super) pending: &'a Pending,
    pub(super) below: L,
}

impl<L: Lookup> Lookup for Layered<'_, L> {
    fn run(&mut self, run_id: &str) -> Result<Option<RunRecord>, JournalError> {
        match self.pending.run(run_id) {
            Some(r) => Ok(Some(r.clone())),
            None => self.below.run(run_id),
        }
    }
}

/// The index changes of every event after the `journal/indexed_through` cursor: what a crash
/// left out of the index tables. Gives the changes and the newest sequence they cover.
pub(super) fn replay(
    events: &impl super::blocks::Events,
    cursors: &impl ReadableTable<&'static str, u64>,
    below: &mut dyn Lookup,
) -> Result<(Pending, Option<u64>), JournalError> {
    let Some(from) = cursors.get(INDEXED_THROUGH)?.map(|v| v.value()) else {
        // Written by a build that indexed in every commit: nothing is missing.
        return Ok((Pending::default(), None));
    };
    let mut pending = Pending::default();
    let mut last = None;
    super::blocks::visit_from(events, from.saturating_add(1), |seq, bytes| {
        let record = codec::decode(&bytes)?;
        pending.derive(seq, &record, below)?;
        last = Some(seq);
        Ok(true)
    })?;
    Ok((pending, last))
}

#[cfg(test)]
mod tests {
    use super::*;
    use outpost_shared::journal::Record;

    /// What redb would answer: a run row.
    struct Below(Option<RunRecord>);

    impl Lookup for Below {
        fn run(&mut self, _: &str) -> Result<Option<RunRecord>, JournalError> {
            Ok(self.0.clone())
        }
    }

    fn rec(event: Event, at_ms: u64) -> Record {
        Record {
            run_id: "r".into(),
            at_ms,
            event,
        }
    }

    #[test]
    fn an_end_takes_its_row_from_below_and_drops_the_runs_timers_below_and_pending() {
        let row = RunRecord {
            workflow: "w".into(),
            version: 2,
            status: RunStatus::Running,
            created_ms: 5,
            finished_ms: None,
        };
        let mut below = Below(Some(row));
        let mut p = Pending::default();
        let set = Event::TimerSet {
            step: "b".into(),
            visit: 1,
            fire_at_ms: 200,
            duration_ms: 1,
        };
        p.derive(7, &rec(set, 10), &mut below).unwrap();
        p.derive(8, &rec(Event::RunCompleted { output: "1".into() }, 20), &mut below)
            .unwrap();
        let r = p.run("r").unwrap();
        assert_eq!(
            (r.status, r.finished_ms, r.version, r.created_ms),
            (RunStatus::Completed, Some(20), 2, 5)
        );
        assert_eq!(p.active.get("r"), Some(&false));
        assert!(p.ended.contains("r"), "the timers below go at the checkpoint");
        assert!(p.timers.is_empty(), "the pending one goes now");
        assert_eq!(p.run_events.get("r"), Some(&vec![7, 8]));
        assert_eq!(p.events, 2);
    }

    #[test]
    fn later_changes_win_when_merged() {
        let mut below = Below(None);
        let start = Event::RunStarted {
            workflow: "w".into(),
            version: 1,
            input: "{}".into(),
        };
        let mut first = Pending::default();
        first.derive(1, &rec(start, 1), &mut below).unwrap();
        let mut second = Pending::default();
        let mut from_first = Layered {
            pending: &first,
            below: Below(None),
        };
        let failed = Event::RunFailed {
            error: outpost_shared::journal::ErrorInfo::new("k", "m"),
        };
        second.derive(2, &rec(failed, 2), &mut from_first).unwrap();
        first.merge(second);
        assert_eq!(first.run("r").map(|r| r.status), Some(RunStatus::Failed));
        assert_eq!(first.active.get("r"), Some(&false));
        assert_eq!(first.run_events.get("r"), Some(&vec![1, 2]));
        assert_eq!(first.events, 2);
        let mut set = std::collections::HashSet::from(["r".to_string(), "other".to_string()]);
        first.overlay_active(&mut set);
        assert_eq!(set, std::collections::HashSet::from(["other".to_string()]));
    }
}
