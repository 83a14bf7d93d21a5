//! The journal's tables and their rows: the layout on disk, versioned rows, and the set-up and
//! read of the writer's starting state.

use std::collections::HashSet;

use outpost_shared::journal::CodecError;
use outpost_shared::row;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction};
use serde::{Deserialize, Serialize};

use super::wal::{Entry, LOG_GENERATION};
use super::{Applied, JournalError};
use crate::engine::RunStatus;

/// seq → encoded [`Record`]. The journal proper and the sync outbox.
pub(super) const EVENTS: TableDefinition<u64, &[u8]> = TableDefinition::new("events");
/// Format 4 and older: (run id, seq) → (), a run's history in order; moved into
/// [`RUN_HISTORY`] when such a file is opened.
pub(super) const RUN_EVENTS: TableDefinition<(&str, u64), ()> = TableDefinition::new("run_events");
/// Format 5: (run id, its chunk's first seq) → up to [`HISTORY_CHUNK`] of the run's event
/// sequence numbers, packed ([`encode_seqs`]).
pub(super) const RUN_HISTORY: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("run_history");
/// Sequence numbers per `run_history` row. A checkpoint rewrites a run's last row to extend it,
/// so this bounds what a run that goes on for months costs each checkpoint (a few hundred bytes),
/// while a run of a few hundred events still takes one row.
pub(super) const HISTORY_CHUNK: usize = 256;
/// run id → encoded [`RunRecord`]: one summary row per run.
pub(super) const RUNS: TableDefinition<&str, &[u8]> = TableDefinition::new("runs");
/// run id → (): runs that are not finished, resumed at start-up.
pub(super) const ACTIVE: TableDefinition<&str, ()> = TableDefinition::new("active_runs");
/// (name, version) → encoded [`DefinitionRecord`].
pub(super) const DEFINITIONS: TableDefinition<(&str, u32), &[u8]> = TableDefinition::new("definitions");
/// (deadline ms, run id, step) → (): pending durable timers by deadline.
pub(super) const TIMERS: TableDefinition<(u64, &str, &str), ()> = TableDefinition::new("timers");
/// Counters: `format`; `next_seq` only as format-1 files left it (see [`next_seq`]).
pub(super) const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// Named positions kept by agent services: schedule slots, trigger marks, sync acks.
pub(super) const CURSORS: TableDefinition<&str, u64> = TableDefinition::new("cursors");
/// Small named records kept by agent services (applied cloud commands, desired state).
pub(super) const KV: TableDefinition<&str, &[u8]> = TableDefinition::new("kv");
/// Cursor, while an upgrade to format 6 is part way: `events` rows keyed below it are packed,
/// the rest still hold one record each.
pub(super) const PACKED_BELOW: &str = "journal/packed_below";
/// Events an upgrade step packs in one commit: the pages the step frees serve the next, so the
/// upgrade needs room for a step, not for a second copy of the journal.
pub(super) const UPGRADE_STEP_EVENTS: u64 = 65_536;
/// Cursor: the newest sequence retention has deleted.
pub(super) const PRUNED_THROUGH: &str = "journal/pruned_through";

/// Version of the table layout above; bumped on any incompatible change.
/// - Format 2 no longer stores `meta.next_seq` in every commit: a build that reads only format 1
///   would take the stale stored value and hand out sequence numbers again.
/// - Format 3 writes the index tables (`run_events`, `runs`, `active_runs`, `timers`) only at
///   checkpoints, under the cursor `journal/indexed_through`; after a crash the events past it
///   are in no index until the open replays them (`index`). An older build would not, and would
///   lose runs from its lists and resume.
///
/// So each build refuses a newer format rather than misread it, and upgrades older ones in place
/// when it opens them.
/// - Format 4 commits starts, appends, cursors and kv rows to the segment log beside the file
///   (`journal.log`, see `wal`), under the cursor `journal/log_generation`; the log's current
///   blocks are not yet in the file at all. An older build would not read them.
/// - Format 5 keeps a run's sequence numbers in `run_history` rows of up to [`HISTORY_CHUNK`]
///   instead of one `run_events` row per event; an older build would find no history at all.
/// - Format 6 keeps several events in each `events` row (`blocks`) instead of one record per
///   row keyed by its sequence number; an older build would misread every row.
pub const FORMAT: u64 = 6;

/// Whether this build reads a file of table-layout version `format`.
pub fn format_supported(format: u64) -> bool {
    (1..=FORMAT).contains(&format)
}
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

/// A stored definition version.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DefinitionRecord {
    /// Canonical JSON of the document.
    pub json: String,
    /// When it was applied (ms since epoch).
    pub applied_ms: u64,
}

pub(super) fn encode_run(r: &RunRecord) -> Vec<u8> {
    row::encode(r)
}

pub(super) fn decode_run(b: &[u8]) -> Result<RunRecord, JournalError> {
    row::decode(b).map_err(|source| CodecError::Corrupt { len: b.len(), source }.into())
}

pub(super) fn decode_definition(b: &[u8]) -> Result<DefinitionRecord, JournalError> {
    row::decode(b).map_err(|source| CodecError::Corrupt { len: b.len(), source }.into())
}

/// Every table, opened in one write transaction.
pub(super) struct Tables<'txn> {
    pub(super) events: redb::Table<'txn, u64, &'static [u8]>,
    pub(super) run_history: redb::Table<'txn, (&'static str, u64), &'static [u8]>,
    pub(super) runs: redb::Table<'txn, &'static str, &'static [u8]>,
    pub(super) active: redb::Table<'txn, &'static str, ()>,
    pub(super) definitions: redb::Table<'txn, (&'static str, u32), &'static [u8]>,
    pub(super) timers: redb::Table<'txn, (u64, &'static str, &'static str), ()>,
    pub(super) cursors: redb::Table<'txn, &'static str, u64>,
    pub(super) kv: redb::Table<'txn, &'static str, &'static [u8]>,
}

impl<'txn> Tables<'txn> {
    /// Opens every table in `txn`.
    pub(super) fn open(txn: &'txn WriteTransaction) -> Result<Tables<'txn>, JournalError> {
        Ok(Tables {
            events: txn.open_table(EVENTS)?,
            run_history: txn.open_table(RUN_HISTORY)?,
            runs: txn.open_table(RUNS)?,
            active: txn.open_table(ACTIVE)?,
            definitions: txn.open_table(DEFINITIONS)?,
            timers: txn.open_table(TIMERS)?,
            cursors: txn.open_table(CURSORS)?,
            kv: txn.open_table(KV)?,
        })
    }
}

/// Checks the format, creates missing tables, moves the segment log's current blocks into the
/// tables and the log to its next generation, rebuilds the index rows a crash left out (the
/// events past `journal/indexed_through`), and reads the writer's starting state: the next
/// sequence, the unfinished runs and the log's new generation.
pub(super) fn prepare(
    db: &Database,
    log: Option<&dyn redb::StorageBackend>,
) -> Result<(u64, HashSet<String>, u64), JournalError> {
    upgrade(db, UPGRADE_STEP_EVENTS)?;
    let txn = db.begin_write()?;
    let (next, generation) = {
        let mut meta = txn.open_table(META)?;
        let format = meta.get("format")?.map(|v| v.value());
        match format {
            Some(f) if !format_supported(f) => return Err(JournalError::Format { found: f }),
            Some(FORMAT) => {}
            _ => {
                meta.insert("format", FORMAT)?;
            }
        }
        // Create every table so readers never see "table does not exist".
        let mut t = Tables::open(&txn)?;
        // The segment log's blocks of the current generation: committed, not yet in redb.
        let generation = t.cursors.get(LOG_GENERATION)?.map_or(0, |v| v.value());
        if let Some(log) = log {
            let scanned = super::wal::scan(log, generation)?;
            let from = next_seq(&meta, &t.events, &t.cursors)?;
            super::wal::check_sequence(&scanned.entries, from)?;
            if !scanned.entries.is_empty() {
                tracing::info!(
                    blocks = scanned.blocks,
                    entries = scanned.entries.len(),
                    "moving the journal log's group commits into the journal"
                );
            }
            let mut events = Vec::new();
            for entry in scanned.entries {
                match entry {
                    Entry::Event { seq, record } => events.push((seq, record)),
                    Entry::Cursor { key, value } => {
                        t.cursors.insert(key.as_str(), value)?;
                    }
                    Entry::Kv { key, value } => {
                        t.kv.insert(key.as_str(), value.as_slice())?;
                    }
                }
            }
            super::blocks::append(&mut t.events, events.iter().map(|(s, r)| (*s, r.as_slice())))?;
        }
        // What the log held is in this transaction: its blocks are stale once it commits.
        t.cursors.insert(LOG_GENERATION, generation + 1)?;
        let next = next_seq(&meta, &t.events, &t.cursors)?;
        let (pending, replayed) = {
            let mut below = super::index::TableLookup { runs: &t.runs };
            super::index::replay(&t.events, &t.cursors, &mut below)?
        };
        match replayed {
            Some(through) => {
                tracing::info!(
                    events = pending.events,
                    through,
                    "rebuilt the journal's indexes for the events after its last checkpoint"
                );
                pending.apply(&mut t, through)?;
            }
            // A new file, or one from a build that indexed in every commit: complete as it is.
            None if t.cursors.get(super::index::INDEXED_THROUGH)?.is_none() => {
                t.cursors
                    .insert(super::index::INDEXED_THROUGH, next.saturating_sub(1))?;
            }
            None => {}
        }
        (next, generation + 1)
    };
    let mut active = HashSet::new();
    for row in txn.open_table(ACTIVE)?.iter()? {
        active.insert(row?.0.value().to_string());
    }
    txn.commit()?;
    Ok((next, active, generation))
}

/// Upgrades a format-5-or-older file, in commits of `step` events ([`upgrade_step`]) until it
/// is done. Gives the events packed.
pub(super) fn upgrade(db: &Database, step: u64) -> Result<u64, JournalError> {
    let mut packed = 0u64;
    if !upgrade_due(db)? {
        return Ok(packed);
    }
    loop {
        let (n, more) = upgrade_step(db, step)?;
        packed += n;
        if n > 0 {
            tracing::info!(
                events = packed,
                done = !more,
                "packing the journal's events into rows of several"
            );
        }
        if !more {
            return Ok(packed);
        }
    }
}

/// Whether the file is older than format 6 or part way through the upgrade to it, read
/// without a write transaction (a new file has no tables yet).
fn upgrade_due(db: &Database) -> Result<bool, JournalError> {
    let txn = db.begin_read()?;
    let format = match txn.open_table(META) {
        Ok(t) => t.get("format")?.map(|v| v.value()),
        Err(redb::TableError::TableDoesNotExist(_)) => None,
        Err(e) => return Err(e.into()),
    };
    let part_way = match txn.open_table(CURSORS) {
        Ok(t) => t.get(PACKED_BELOW)?.is_some(),
        Err(redb::TableError::TableDoesNotExist(_)) => false,
        Err(e) => return Err(e.into()),
    };
    Ok(format.is_some_and(|f| f < 6) || part_way)
}

/// One commit of an upgrade. The first sets the format (an older build refuses the file from
/// then on), moves a format-4-or-older file's `run_events` over, and packs the first `step`
/// events under the cursor [`PACKED_BELOW`]; each later one packs the next `step`; the last
/// removes the cursor. A crash in between leaves the cursor, and the next open goes on from
/// it. Gives the events packed and whether any are left.
pub(super) fn upgrade_step(db: &Database, step: u64) -> Result<(u64, bool), JournalError> {
    let txn = db.begin_write()?;
    let (packed, more) = {
        let mut meta = txn.open_table(META)?;
        let mut cursors = txn.open_table(CURSORS)?;
        let format = meta.get("format")?.map(|v| v.value());
        let from = match (format, cursors.get(PACKED_BELOW)?.map(|v| v.value())) {
            (Some(f), _) if !format_supported(f) => return Err(JournalError::Format { found: f }),
            (Some(f), _) if f < 6 => {
                meta.insert("format", FORMAT)?;
                if f < 5 {
                    move_run_events(&txn)?;
                }
                0
            }
            (_, Some(from)) => from,
            // A new file, or one in the current format: nothing to do.
            _ => return Ok((0, false)),
        };
        let (packed, next) = super::blocks::pack_single_rows(&mut txn.open_table(EVENTS)?, from, step)?;
        match next {
            Some(next) => cursors.insert(PACKED_BELOW, next)?,
            None => cursors.remove(PACKED_BELOW)?,
        };
        (packed, next.is_some())
    };
    txn.commit()?;
    Ok((packed, more))
}

/// Upgrades a format-4-or-older file: each run's `run_events` rows become its `run_history`
/// rows, and the old table goes. One run's sequence numbers are in memory at a time.
fn move_run_events(txn: &WriteTransaction) -> Result<(), JournalError> {
    {
        let old = txn.open_table(RUN_EVENTS)?;
        let mut new = txn.open_table(RUN_HISTORY)?;
        let mut current: Option<(String, Vec<u64>)> = None;
        let mut runs = 0u64;
        for row in old.iter()? {
            let (k, _) = row?;
            let (run, seq) = k.value();
            match current.as_mut() {
                Some((r, seqs)) if r == run => seqs.push(seq),
                _ => {
                    if let Some((r, seqs)) = current.replace((run.to_string(), vec![seq])) {
                        extend_history(&mut new, &r, &seqs)?;
                        runs += 1;
                    }
                }
            }
        }
        if let Some((r, seqs)) = current {
            extend_history(&mut new, &r, &seqs)?;
            runs += 1;
        }
        if runs > 0 {
            tracing::info!(runs, "journal format 5: moved each run's event index into history rows");
        }
    }
    txn.delete_table(RUN_EVENTS)?;
    Ok(())
}

/// A run's event sequence numbers in `run_history`, ascending; only the first with `first_only`.
pub(super) fn read_history(
    table: &impl ReadableTable<(&'static str, u64), &'static [u8]>,
    run: &str,
    first_only: bool,
) -> Result<Vec<u64>, JournalError> {
    let mut seqs = Vec::new();
    for row in table.range((run, 0u64)..=(run, u64::MAX))? {
        let (_, chunk) = row?;
        seqs.extend(decode_seqs(run, chunk.value())?);
        if first_only {
            seqs.truncate(1);
            break;
        }
    }
    Ok(seqs)
}

/// Adds `seqs` (ascending, all after the run's stored ones) to a run's `run_history`: fills its
/// last row up to [`HISTORY_CHUNK`], then starts new rows.
pub(super) fn extend_history(
    table: &mut redb::Table<(&'static str, u64), &'static [u8]>,
    run: &str,
    seqs: &[u64],
) -> Result<(), JournalError> {
    let last = match table.range((run, 0u64)..=(run, u64::MAX))?.next_back() {
        Some(row) => {
            let (k, v) = row?;
            Some((k.value().1, decode_seqs(run, v.value())?))
        }
        None => None,
    };
    let newest = last.as_ref().and_then(|(_, c)| c.last().copied()).unwrap_or(0);
    let mut fresh = seqs.iter().copied().filter(|s| *s > newest).peekable();
    let Some(&first) = fresh.peek() else {
        return Ok(());
    };
    let (mut key, mut chunk) = match last {
        Some((key, chunk)) if chunk.len() < HISTORY_CHUNK => (key, chunk),
        _ => (first, Vec::new()),
    };
    for seq in fresh {
        if chunk.len() == HISTORY_CHUNK {
            table.insert((run, key), encode_seqs(&chunk).as_slice())?;
            (key, chunk) = (seq, Vec::new());
        }
        chunk.push(seq);
    }
    table.insert((run, key), encode_seqs(&chunk).as_slice())?;
    Ok(())
}

/// Deletes a run's `run_history` rows.
pub(super) fn remove_history(
    table: &mut redb::Table<(&'static str, u64), &'static [u8]>,
    run: &str,
) -> Result<(), JournalError> {
    let keys: Vec<u64> = table
        .range((run, 0u64)..=(run, u64::MAX))?
        .map(|row| row.map(|(k, _)| k.value().1))
        .collect::<Result<_, _>>()?;
    for key in keys {
        table.remove((run, key))?;
    }
    Ok(())
}

/// Packs a run's sequence numbers (ascending, as a run's events are): postcard's `Vec<u64>` of
/// the first and then each gap, varints, so an event costs a byte or two rather than an index
/// row keyed by the run id (about 43 bytes on disk each, measured).
pub(super) fn encode_seqs(seqs: &[u64]) -> Vec<u8> {
    let mut prev = 0u64;
    let gaps: Vec<u64> = seqs
        .iter()
        .map(|s| {
            let gap = s.saturating_sub(prev);
            prev = *s;
            gap
        })
        .collect();
    // Serialising integers into a Vec cannot fail.
    postcard::to_allocvec(&gaps).unwrap_or_default()
}

/// Unpacks [`encode_seqs`]; a row that does not decode, or whose numbers do not ascend, is damage.
pub(super) fn decode_seqs(run: &str, bytes: &[u8]) -> Result<Vec<u64>, JournalError> {
    unpack_seqs(bytes).map_err(|why| JournalError::Damaged(format!("the run_history row of run {run} {why}")))
}

/// [`decode_seqs`] without the run's name, for the integrity check that names the row itself
/// (and the fuzz target `journal_history_row`): ascending numbers, or why not.
pub fn unpack_seqs(bytes: &[u8]) -> Result<Vec<u64>, String> {
    let gaps: Vec<u64> = postcard::from_bytes(bytes).map_err(|e| format!("does not decode: {e}"))?;
    let mut seq = 0u64;
    let mut out = Vec::with_capacity(gaps.len());
    for (i, gap) in gaps.into_iter().enumerate() {
        if gap == 0 && i > 0 {
            return Err("repeats a sequence number".into());
        }
        seq = seq.checked_add(gap).ok_or("overflows")?;
        out.push(seq);
    }
    Ok(out)
}

/// The next sequence number to assign: one past the newest event ever committed. Commits do
/// not store it (that would rewrite the `meta` table's pages in every commit, on flash): the
/// newest event is the last one in `events`, or, when retention deleted it, the
/// `journal/pruned_through` cursor written in the same transaction as the deletion. A
/// `meta.next_seq` left by older builds counts too, so sequences never go back.
pub(super) fn next_seq(
    meta: &impl ReadableTable<&'static str, u64>,
    events: &impl super::blocks::Events,
    cursors: &impl ReadableTable<&'static str, u64>,
) -> Result<u64, JournalError> {
    let stored = meta.get("next_seq")?.map_or(1, |v| v.value());
    let format = meta.get("format")?.map(|v| v.value());
    let below = cursors.get(PACKED_BELOW)?.map(|v| v.value());
    let newest = match events.last()? {
        Some((k, _)) if super::blocks::packed_row(format, below, k.value()) => {
            super::blocks::last(events)?.map_or(0, |(seq, _)| seq)
        }
        // An older file `journal-check` reads before the open upgrades it: a record a row.
        Some((k, _)) => k.value(),
        None => 0,
    };
    let pruned = cursors.get(PRUNED_THROUGH)?.map_or(0, |v| v.value());
    Ok(stored.max(newest.max(pruned).saturating_add(1)))
}

/// Reads the writer's state without writing (the disk may still be full).
pub(super) fn load_state(db: &Database) -> Result<(u64, HashSet<String>), JournalError> {
    let txn = db.begin_read()?;
    let next = next_seq(
        &txn.open_table(META)?,
        &txn.open_table(EVENTS)?,
        &txn.open_table(CURSORS)?,
    )?;
    let mut active = HashSet::new();
    for row in txn.open_table(ACTIVE)?.iter()? {
        active.insert(row?.0.value().to_string());
    }
    Ok((next, active))
}

/// Stores a definition version, unless the same version is there (the same: unchanged;
/// different: a conflict).
pub(super) fn put_definition(
    t: &mut Tables,
    name: &str,
    version: u32,
    json: String,
    now: u64,
) -> Result<Applied, JournalError> {
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
    let bytes = row::encode(&DefinitionRecord { json, applied_ms: now });
    t.definitions.insert((name, version), bytes.as_slice())?;
    Ok(Applied::Created)
}

/// Index of applied commands by time: `cmdat/{ms:020}/{id}`, written beside `cmd/{id}`.
pub const COMMAND_INDEX: &str = "cmdat/";

/// The index key of command `id` applied at `ms`.
pub fn command_index_key(ms: u64, id: &str) -> String {
    format!("{COMMAND_INDEX}{ms:020}/{id}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn sequence_lists_pack_to_a_byte_or_two_an_event() {
        let seqs = [100_000, 100_001, 100_033, 100_160, 100_161];
        let packed = encode_seqs(&seqs);
        assert!(packed.len() <= 10, "{} bytes", packed.len());
        assert_eq!(decode_seqs("r", &packed).unwrap(), seqs);
        assert!(decode_seqs("r", &encode_seqs(&[])).unwrap().is_empty());
        // A repeated number or a truncated row is damage, named with the run.
        let err = decode_seqs("r", &encode_seqs(&[5, 5])).unwrap_err().to_string();
        assert!(err.contains("run r") && err.contains("repeats"), "{err}");
        let err = decode_seqs("r", &packed[..packed.len() - 1]).unwrap_err().to_string();
        assert!(err.contains("does not decode"), "{err}");
    }

    #[test]
    fn a_long_history_goes_in_chunks_and_reads_back_whole() {
        let dir = tempfile::tempdir().unwrap();
        let db = Database::create(dir.path().join("h.redb")).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let mut t = txn.open_table(RUN_HISTORY).unwrap();
            let all: Vec<u64> = (1..=600).map(|i| i * 3).collect();
            // In three checkpoints, the middle one repeating numbers a replay could derive again.
            extend_history(&mut t, "r", &all[..100]).unwrap();
            extend_history(&mut t, "r", &all[90..400]).unwrap();
            extend_history(&mut t, "r", &all[400..]).unwrap();
            extend_history(&mut t, "s", &[2, 4]).unwrap();
            assert_eq!(read_history(&t, "r", false).unwrap(), all);
            assert_eq!(read_history(&t, "r", true).unwrap(), [3]);
            let chunks: Vec<(u64, usize)> = t
                .range(("r", 0u64)..=("r", u64::MAX))
                .unwrap()
                .map(|row| {
                    let (k, v) = row.unwrap();
                    (k.value().1, decode_seqs("r", v.value()).unwrap().len())
                })
                .collect();
            assert_eq!(chunks, [(3, HISTORY_CHUNK), (3 * 257, HISTORY_CHUNK), (3 * 513, 88)]);
            remove_history(&mut t, "r").unwrap();
            assert!(read_history(&t, "r", false).unwrap().is_empty());
            assert_eq!(read_history(&t, "s", false).unwrap(), [2, 4]);
        }
        txn.commit().unwrap();
    }

    proptest! {
        #[test]
        fn ascending_sequence_lists_round_trip(mut seqs in proptest::collection::vec(1u64.., 0..64)) {
            seqs.sort_unstable();
            seqs.dedup();
            prop_assert_eq!(decode_seqs("r", &encode_seqs(&seqs)).unwrap(), seqs);
        }

        #[test]
        fn any_bytes_decode_or_fail_without_panicking(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = unpack_seqs(&bytes);
        }
    }
}
