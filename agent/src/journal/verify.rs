//! `outpost journal-check`: open the file (repairing it as an open does), read every row of
//! every table and decode every record, read the segment log's current blocks and decode theirs,
//! then close it cleanly.

use std::path::Path;
use std::sync::atomic::Ordering;

use redb::{Database, ReadableDatabase, ReadableTable};

use super::JournalError;
use super::tables::{
    ACTIVE, CURSORS, DEFINITIONS, EVENTS, KV, META, PACKED_BELOW, RUN_EVENTS, RUN_HISTORY, RUNS, TIMERS,
    decode_definition, decode_run, next_seq, unpack_seqs,
};
use super::wal::{Entry, LOG_GENERATION, ReadOnlyLog, check_sequence, scan};

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
    let mut db = Database::builder()
        .set_cache_size(4 * 1024 * 1024)
        .set_repair_callback(move |_| seen.store(true, Ordering::Relaxed))
        .create(path)
        .map_err(|e| match e {
            redb::DatabaseError::DatabaseAlreadyOpen => JournalError::Locked(path.display().to_string()),
            other => other.into(),
        })?;
    // Every page's checksum: a flipped bit in a key (a run's id, an event's sequence) decodes
    // fine and would quietly drop a run from the lists. A file that was closed cleanly yet does
    // not verify was damaged outside redb.
    if !repaired.load(Ordering::Relaxed) {
        match db.check_integrity() {
            Ok(true) => {}
            Ok(false) => {
                return Err(JournalError::Damaged(
                    "its page checksums do not verify (redb rolled it back to its last whole commit; what came after is lost)"
                        .into(),
                ));
            }
            Err(e) => return Err(JournalError::Damaged(format!("its page checksums do not verify: {e}"))),
        }
    }
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
        let format = match txn.open_table(META) {
            Ok(t) => t.get("format")?.map(|v| v.value()),
            Err(redb::TableError::TableDoesNotExist(_)) => None,
            Err(e) => return Err(e.into()),
        };
        let below = match txn.open_table(CURSORS) {
            Ok(t) => t.get(PACKED_BELOW)?.map(|v| v.value()),
            Err(redb::TableError::TableDoesNotExist(_)) => None,
            Err(e) => return Err(e.into()),
        };
        match txn.open_table(EVENTS) {
            Ok(t) => {
                for row in t.iter()? {
                    let (k, val) = row?;
                    let bytes = val.value();
                    let events = if super::blocks::packed_row(format, below, k.value()) {
                        super::blocks::unpack_row(k.value(), bytes)?
                    } else {
                        vec![(k.value(), bytes.to_vec())]
                    };
                    for (seq, record) in events {
                        if let Err(e) = outpost_shared::journal::decode(&record) {
                            return Err(JournalError::Damaged(format!("event {seq} does not decode: {e}")));
                        }
                    }
                    count(bytes.len());
                }
            }
            Err(redb::TableError::TableDoesNotExist(_)) => {}
            Err(e) => return Err(e.into()),
        }
        decode_all!(RUNS, "run", |b: &[u8]| decode_run(b)
            .map(drop)
            .map_err(|e| e.to_string()));
        decode_all!(DEFINITIONS, "definition", |b: &[u8]| decode_definition(b)
            .map(drop)
            .map_err(|e| e.to_string()));
        decode_all!(RUN_HISTORY, "run history", |b: &[u8]| unpack_seqs(b).map(drop));
        // The segment log's current blocks: committed, not yet in the file.
        let generation = match txn.open_table(CURSORS) {
            Ok(t) => t.get(LOG_GENERATION)?.map_or(0, |v| v.value()),
            Err(redb::TableError::TableDoesNotExist(_)) => 0,
            Err(e) => return Err(e.into()),
        };
        let next = match (txn.open_table(META), txn.open_table(EVENTS), txn.open_table(CURSORS)) {
            (Ok(meta), Ok(events), Ok(cursors)) => Some(next_seq(&meta, &events, &cursors)?),
            _ => None,
        };
        let log = super::log_path(path);
        match std::fs::File::open(&log) {
            Ok(file) => {
                let entries = scan(&ReadOnlyLog(file), generation)?.entries;
                if let Some(next) = next {
                    check_sequence(&entries, next)?;
                }
                for entry in &entries {
                    let len = match entry {
                        Entry::Event { seq, record } => {
                            if let Err(e) = outpost_shared::journal::decode(record) {
                                return Err(JournalError::Damaged(format!(
                                    "event {seq} in {} does not decode: {e}",
                                    log.display()
                                )));
                            }
                            record.len()
                        }
                        Entry::Cursor { .. } => 8,
                        Entry::Kv { value, .. } => value.len(),
                    };
                    count(len);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(JournalError::Storage(redb::StorageError::Io(e).into())),
        }
    }
    drop(db);
    v.repaired = repaired.load(Ordering::Relaxed);
    Ok(v)
}
