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
/// (run id, seq) → (): a run's history in order.
pub(super) const RUN_EVENTS: TableDefinition<(&str, u64), ()> = TableDefinition::new("run_events");
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
pub const FORMAT: u64 = 4;

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
    pub(super) run_events: redb::Table<'txn, (&'static str, u64), ()>,
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
            run_events: txn.open_table(RUN_EVENTS)?,
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
            for entry in scanned.entries {
                match entry {
                    Entry::Event { seq, record } => {
                        t.events.insert(seq, record.as_slice())?;
                    }
                    Entry::Cursor { key, value } => {
                        t.cursors.insert(key.as_str(), value)?;
                    }
                    Entry::Kv { key, value } => {
                        t.kv.insert(key.as_str(), value.as_slice())?;
                    }
                }
            }
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

/// The next sequence number to assign: one past the newest event ever committed. Commits do
/// not store it (that would rewrite the `meta` table's pages in every commit, on flash): the
/// newest event is the last row of `events`, or, when retention deleted it, the
/// `journal/pruned_through` cursor written in the same transaction as the deletion. A
/// `meta.next_seq` left by older builds counts too, so sequences never go back.
pub(super) fn next_seq(
    meta: &impl ReadableTable<&'static str, u64>,
    events: &impl ReadableTable<u64, &'static [u8]>,
    cursors: &impl ReadableTable<&'static str, u64>,
) -> Result<u64, JournalError> {
    let stored = meta.get("next_seq")?.map_or(1, |v| v.value());
    let newest = events.last()?.map_or(0, |(k, _)| k.value());
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
