//! The `events` table's rows (format 6): each row holds several consecutive events, keyed by the
//! sequence number of the first it was written with. A row of one event cost about 13 bytes of
//! key and leaf bookkeeping on top of a record that repeats its run's 17-byte id and a 6-byte
//! timestamp; in a row, an event names its run by the id's 8 bytes (or by the run's place in
//! the row when it is already there), its time as the difference from the one before, and its
//! sequence number as the gap from the one before.
//!
//! A row gives back exactly the record bytes that went in: a record is split into run id, time
//! and event bytes only when joining those gives the same bytes back, and is kept whole
//! otherwise. Retention deletes events out of rows; a row keeps its key, which stays at or below
//! its first event, and rows never overlap, so the row holding `seq` is the last one keyed at or
//! below it.

use redb::ReadableTable;
use serde::{Deserialize, Serialize};

use super::JournalError;

/// A row takes events until their records add up to this many bytes (about 25 events of a
/// three-step run, packed into some 700 bytes: five or so to a 4 KiB page).
pub(super) const ROW_RECORD_BYTES: usize = 1_024;
/// ... or until it holds this many.
pub(super) const ROW_EVENTS: usize = 64;

/// An event in a row.
#[derive(Serialize, Deserialize)]
enum Packed<'a> {
    /// The record as it is (one that does not split into the parts below and back).
    Whole {
        /// Sequence number minus the previous event's (the row's key for the first).
        gap: u64,
        /// The record bytes.
        #[serde(borrow)]
        record: &'a [u8],
    },
    /// A version-1 record in parts.
    Split {
        /// As for `Whole`.
        gap: u64,
        /// Its run.
        #[serde(borrow)]
        run: RunRef<'a>,
        /// Time minus the previous split event's, wrapping (ms).
        at_delta: i64,
        /// The event's bytes, as they follow the time in the record.
        #[serde(borrow)]
        event: &'a [u8],
    },
}

/// How an event in a row names its run.
#[derive(Serialize, Deserialize)]
enum RunRef<'a> {
    /// An id given in full, first in this row.
    Text(&'a str),
    /// A generated id (16 lowercase hex digits) as its 8 bytes, first in this row.
    Hex([u8; 8]),
    /// The n-th run named in this row, from 0.
    Seen(u32),
}

/// The record bytes of a version-1 record (postcard: variant 0, run id, time, event).
fn join(run_id: &str, at_ms: u64, event: &[u8]) -> Result<Vec<u8>, postcard::Error> {
    let mut out = postcard::to_allocvec(&(0u32, run_id, at_ms))?;
    out.extend_from_slice(event);
    Ok(out)
}

/// A record's run id, time and event bytes, when joining them gives `record` back.
fn split(record: &[u8]) -> Option<(&str, u64, &[u8])> {
    let (variant, rest) = postcard::take_from_bytes::<u32>(record).ok()?;
    let (run_id, rest) = postcard::take_from_bytes::<&str>(rest).ok()?;
    let (at_ms, event) = postcard::take_from_bytes::<u64>(rest).ok()?;
    let same = variant == 0 && join(run_id, at_ms, event).is_ok_and(|j| j == record);
    same.then_some((run_id, at_ms, event))
}

/// The 8 bytes of a generated run id; `None` for any other id.
fn hex_id(id: &str) -> Option<[u8; 8]> {
    let digits = id.as_bytes();
    if digits.len() != 16 || !digits.iter().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f')) {
        return None;
    }
    let mut out = [0u8; 8];
    for (byte, pair) in out.iter_mut().zip(digits.chunks_exact(2)) {
        let text = std::str::from_utf8(pair).ok()?;
        *byte = u8::from_str_radix(text, 16).ok()?;
    }
    Some(out)
}

/// A generated run id from its 8 bytes.
fn hex_text(bytes: &[u8; 8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(16);
    for b in bytes {
        for digit in [b >> 4, b & 0xf] {
            out.push(char::from(DIGITS.get(usize::from(digit)).copied().unwrap_or(b'0')));
        }
    }
    out
}

/// Packs events (ascending sequence numbers, the first at or above `key`) into a row's value.
pub(super) fn pack<R: AsRef<[u8]>>(key: u64, events: &[(u64, R)]) -> Result<Vec<u8>, JournalError> {
    let mut runs: Vec<&str> = Vec::new();
    let (mut prev_seq, mut prev_at) = (key, 0u64);
    let mut packed = Vec::with_capacity(events.len());
    for (n, (seq, record)) in events.iter().enumerate() {
        let record = record.as_ref();
        // A row that repeats or reorders numbers would not unpack: refuse to write it.
        let gap = seq
            .checked_sub(prev_seq)
            .filter(|gap| *gap > 0 || n == 0)
            .ok_or_else(|| JournalError::Damaged(format!("event {seq} packed after {prev_seq}")))?;
        prev_seq = *seq;
        packed.push(match split(record) {
            Some((run_id, at_ms, event)) => {
                let run = match runs.iter().position(|r| *r == run_id) {
                    Some(n) => RunRef::Seen(u32::try_from(n).unwrap_or(u32::MAX)),
                    None => {
                        runs.push(run_id);
                        hex_id(run_id).map_or(RunRef::Text(run_id), RunRef::Hex)
                    }
                };
                let at_delta = at_ms.wrapping_sub(prev_at) as i64;
                prev_at = at_ms;
                Packed::Split {
                    gap,
                    run,
                    at_delta,
                    event,
                }
            }
            None => Packed::Whole { gap, record },
        });
    }
    postcard::to_allocvec(&packed).map_err(|e| JournalError::Damaged(format!("packing events from {key}: {e}")))
}

/// Unpacks a row keyed `key`: its events' sequence numbers (ascending, none below `key`) and
/// record bytes, or why the bytes are not a row (the fuzz target `journal_event_row`).
pub fn unpack(key: u64, bytes: &[u8]) -> Result<Vec<(u64, Vec<u8>)>, String> {
    Ok(unpack_some(key, bytes, |_| true, u64::MAX)?.0)
}

/// [`unpack`], giving only the events `wanted` picks by sequence number, and reading the row
/// only up to the first event past `stop_after`; also gives the last sequence number it read.
/// Only the wanted records are rebuilt: a run's history reads one or two events of each row it
/// touches, and start-up reads 20,000 runs' histories. What is read is checked as a whole row
/// is; `verify` reads every row to its end.
fn unpack_some(
    key: u64,
    bytes: &[u8],
    mut wanted: impl FnMut(u64) -> bool,
    stop_after: u64,
) -> Result<(RowEvents, u64), String> {
    let decode = |e: postcard::Error| format!("does not decode: {e}");
    // A postcard `Vec<Packed>`: the count, then the entries, read one at a time.
    let (count, mut rest) = postcard::take_from_bytes::<usize>(bytes).map_err(decode)?;
    if count == 0 {
        return Err("holds no event".into());
    }
    let mut runs: Vec<RunRef> = Vec::new();
    let (mut seq, mut at) = (key, 0u64);
    let mut out = Vec::new();
    for n in 0..count {
        if n > 0 && seq > stop_after {
            break;
        }
        let (entry, tail) = postcard::take_from_bytes::<Packed>(rest).map_err(decode)?;
        rest = tail;
        let gap = match &entry {
            Packed::Whole { gap, .. } | Packed::Split { gap, .. } => *gap,
        };
        if gap == 0 && n > 0 {
            return Err("repeats a sequence number".into());
        }
        seq = seq.checked_add(gap).ok_or("overflows its sequence numbers")?;
        let record = match entry {
            Packed::Whole { record, .. } => wanted(seq).then(|| Ok(record.to_vec())),
            Packed::Split {
                run, at_delta, event, ..
            } => {
                let run = match run {
                    RunRef::Seen(i) => usize::try_from(i)
                        .ok()
                        .and_then(|i| runs.get(i))
                        .ok_or("names a run it has not named before")?,
                    named => {
                        runs.push(named);
                        runs.last().ok_or("names no run")?
                    }
                };
                at = at.wrapping_add(at_delta as u64);
                wanted(seq).then(|| {
                    let joined = match run {
                        RunRef::Hex(bytes) => join(&hex_text(bytes), at, event),
                        RunRef::Text(id) => join(id, at, event),
                        // `runs` holds only runs named in full.
                        RunRef::Seen(_) => return Err("names a run by another run's place".to_string()),
                    };
                    joined.map_err(|e| format!("does not join: {e}"))
                })
            }
        };
        if let Some(record) = record {
            out.push((seq, record?));
        }
    }
    Ok((out, seq))
}

/// Damage to the `events` row keyed `key`, named.
fn row_damaged(key: u64, why: String) -> JournalError {
    JournalError::Damaged(format!("the events row at {key} {why}"))
}

/// [`unpack`] with the row named in the error.
pub(super) fn unpack_row(key: u64, bytes: &[u8]) -> Result<Vec<(u64, Vec<u8>)>, JournalError> {
    unpack(key, bytes).map_err(|why| row_damaged(key, why))
}

/// Whether the `events` row keyed `key` holds several events: in a file of table-layout
/// `format` 6 on (a new file has none yet), below `packed_below` while an upgrade is part way.
/// Older files keep one record a row, keyed by its sequence number, until the open packs them;
/// `journal-check` reads them before that, and a crash can leave an upgrade part way.
pub(super) fn packed_row(format: Option<u64>, packed_below: Option<u64>, key: u64) -> bool {
    format.is_none_or(|f| f >= 6) && packed_below.is_none_or(|below| key < below)
}

/// A row's events: sequence number and record bytes, ascending.
type RowEvents = Vec<(u64, Vec<u8>)>;

/// A readable `events` table.
pub(super) trait Events: ReadableTable<u64, &'static [u8]> {}
impl<T: ReadableTable<u64, &'static [u8]>> Events for T {}

/// The row that holds `seq` if any row does: its key and events.
fn row_of(t: &impl Events, seq: u64) -> Result<Option<(u64, RowEvents)>, JournalError> {
    let Some(row) = t.range(..=seq)?.next_back() else {
        return Ok(None);
    };
    let (k, v) = row?;
    let key = k.value();
    Ok(Some((key, unpack_row(key, v.value())?)))
}

/// The stored events among `seqs` (ascending), each row read once for all it holds of them.
pub(super) fn get_many(t: &impl Events, seqs: &[u64]) -> Result<Vec<(u64, Vec<u8>)>, JournalError> {
    let mut out = Vec::with_capacity(seqs.len());
    let mut rest = seqs;
    while let Some(&first) = rest.first() {
        let Some(row) = t.range(..=first)?.next_back() else {
            rest = rest.get(1..).unwrap_or_default();
            continue;
        };
        let (k, v) = row?;
        let key = k.value();
        let last_asked = rest.last().copied().unwrap_or(first);
        let (found, through) = unpack_some(key, v.value(), |s| rest.binary_search(&s).is_ok(), last_asked)
            .map_err(|why| row_damaged(key, why))?;
        out.extend(found);
        // Rows never overlap: what this row read through, no later row holds.
        let n = rest.iter().take_while(|s| **s <= through).count().max(1);
        rest = rest.get(n..).unwrap_or_default();
    }
    Ok(out)
}

/// Visits the stored events from `from` on, in order, while `visit` answers true.
pub(super) fn visit_from(
    t: &impl Events,
    from: u64,
    mut visit: impl FnMut(u64, Vec<u8>) -> Result<bool, JournalError>,
) -> Result<(), JournalError> {
    let start = match t.range(..=from)?.next_back() {
        Some(row) => row?.0.value(),
        None => from,
    };
    for row in t.range(start..)? {
        let (k, v) = row?;
        let key = k.value();
        let (events, _) = unpack_some(key, v.value(), |s| s >= from, u64::MAX).map_err(|why| row_damaged(key, why))?;
        for (seq, record) in events {
            if !visit(seq, record)? {
                return Ok(());
            }
        }
    }
    Ok(())
}

/// Up to `limit` stored events from `from` on.
pub(super) fn read_from(t: &impl Events, from: u64, limit: usize) -> Result<Vec<(u64, Vec<u8>)>, JournalError> {
    let mut out = Vec::new();
    if limit > 0 {
        visit_from(t, from, |seq, record| {
            out.push((seq, record));
            Ok(out.len() < limit)
        })?;
    }
    Ok(out)
}

/// The newest stored event.
pub(super) fn last(t: &impl Events) -> Result<Option<(u64, Vec<u8>)>, JournalError> {
    let Some(row) = t.last()? else { return Ok(None) };
    let (k, v) = row;
    Ok(unpack_row(k.value(), v.value())?.pop())
}

/// Whether a row of `events` whose records add up to `bytes` takes no more.
fn full(events: usize, bytes: usize) -> bool {
    events >= ROW_EVENTS || bytes >= ROW_RECORD_BYTES
}

/// Stores events newer than every stored one (ascending): the newest row takes what it has
/// room for, and new rows the rest.
pub(super) fn append<'r>(
    t: &mut redb::Table<u64, &'static [u8]>,
    events: impl IntoIterator<Item = (u64, &'r [u8])>,
) -> Result<(), JournalError> {
    let mut row: Option<(u64, RowEvents)> = match t.last()? {
        Some((k, v)) => {
            let key = k.value();
            Some((key, unpack_row(key, v.value())?))
        }
        None => None,
    };
    let mut bytes = row
        .as_ref()
        .map_or(0, |(_, evs)| evs.iter().map(|(_, r)| r.len()).sum());
    let mut dirty = false;
    for (seq, record) in events {
        let room = row.as_ref().is_some_and(|(_, evs)| !full(evs.len(), bytes));
        if !room {
            if let (Some((key, evs)), true) = (&row, dirty) {
                t.insert(*key, pack(*key, evs)?.as_slice())?;
            }
            row = Some((seq, Vec::new()));
            bytes = 0;
        }
        if let Some((_, evs)) = row.as_mut() {
            evs.push((seq, record.to_vec()));
            bytes += record.len();
            dirty = true;
        }
    }
    if let (Some((key, evs)), true) = (&row, dirty) {
        t.insert(*key, pack(*key, evs)?.as_slice())?;
    }
    Ok(())
}

/// Deletes the events `seqs` (ascending) where stored, rewriting the rows that held them.
/// Gives the record bytes deleted.
pub(super) fn remove(t: &mut redb::Table<u64, &'static [u8]>, seqs: &[u64]) -> Result<u64, JournalError> {
    let mut removed = 0u64;
    let mut rest = seqs;
    while let Some((&seq, _)) = rest.split_first() {
        let Some((key, events)) = row_of(t, seq)? else {
            rest = rest.get(1..).unwrap_or_default();
            continue;
        };
        let end = events.last().map_or(key, |(s, _)| *s);
        let n = rest.iter().take_while(|s| **s <= end).count().max(1);
        let (doomed, after) = rest.split_at(n.min(rest.len()));
        rest = after;
        let before = events.len();
        let kept: Vec<(u64, Vec<u8>)> = events
            .into_iter()
            .filter(|(s, r)| {
                let gone = doomed.binary_search(s).is_ok();
                if gone {
                    removed += r.len() as u64;
                }
                !gone
            })
            .collect();
        if kept.is_empty() {
            t.remove(key)?;
        } else if kept.len() != before {
            t.insert(key, pack(key, &kept)?.as_slice())?;
        }
    }
    Ok(removed)
}

/// Rewrites up to `max` of a format-5-or-older `events` table's one-record rows, from `from`
/// on, into rows of several, a few thousand events at a time (a step of the open's upgrade).
/// Gives how many it packed, and where the next step starts if any one-record row is left.
pub(super) fn pack_single_rows(
    t: &mut redb::Table<u64, &'static [u8]>,
    mut from: u64,
    max: u64,
) -> Result<(u64, Option<u64>), JournalError> {
    const CHUNK: u64 = 4_096;
    // At least one a step, so a step always moves the upgrade on.
    let max = max.max(1);
    let mut moved = 0u64;
    loop {
        let take = usize::try_from(CHUNK.min(max - moved)).unwrap_or(1);
        let chunk: Vec<(u64, Vec<u8>)> = t
            .range(from..)?
            .take(take)
            .map(|row| row.map(|(k, v)| (k.value(), v.value().to_vec())))
            .collect::<Result<_, _>>()?;
        let Some(&(last, _)) = chunk.last() else {
            return Ok((moved, None));
        };
        for (seq, _) in &chunk {
            t.remove(*seq)?;
        }
        for part in chunk_rows(&chunk) {
            if let Some((key, _)) = part.first() {
                t.insert(*key, pack(*key, part)?.as_slice())?;
            }
        }
        moved += chunk.len() as u64;
        from = last.saturating_add(1);
        if moved >= max {
            let more = t.range(from..)?.next().is_some();
            return Ok((moved, more.then_some(from)));
        }
    }
}

/// Splits ascending events into rows as [`append`] fills them.
fn chunk_rows(events: &[(u64, Vec<u8>)]) -> Vec<&[(u64, Vec<u8>)]> {
    let mut out = Vec::new();
    let (mut start, mut bytes) = (0usize, 0usize);
    for (i, (_, record)) in events.iter().enumerate() {
        if i > start && full(i - start, bytes) {
            out.extend(events.get(start..i));
            start = i;
            bytes = 0;
        }
        bytes += record.len();
    }
    out.extend(events.get(start..));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use outpost_shared::journal::{self as codec, Event, Record};
    use proptest::prelude::*;
    use redb::{Database, ReadableTableMetadata, TableDefinition};

    const T: TableDefinition<u64, &[u8]> = TableDefinition::new("events");

    /// One event's record, if stored.
    fn get(t: &impl Events, seq: u64) -> Option<Vec<u8>> {
        get_many(t, &[seq]).unwrap().pop().map(|(_, r)| r)
    }

    fn record(run: &str, at_ms: u64, step: &str) -> Vec<u8> {
        codec::encode(&Record {
            run_id: run.into(),
            at_ms,
            event: Event::TimerSet {
                step: step.into(),
                visit: 1,
                fire_at_ms: at_ms,
                duration_ms: 60_000,
            },
        })
    }

    #[test]
    fn a_row_gives_back_exactly_the_records_packed_into_it_and_is_smaller() {
        let events = vec![
            (10, record("1a251d4ba6c3c352", 1_765_000_000_000, "a")),
            (11, record("1a251d4ba6c3c352", 1_765_000_000_003, "b")),
            (13, record("order-7", 1_765_000_000_001, "a")),
            (14, b"not a record at all".to_vec()),
            (20, record("1A251D4BA6C3C352", 0, "c")),
            (21, record("order-7", u64::MAX, "d")),
        ];
        let row = pack(10, &events).unwrap();
        assert_eq!(unpack(10, &row).unwrap(), events);
        let raw: usize = events.iter().map(|(_, r)| r.len() + 8).sum();
        assert!(row.len() * 4 < raw * 3, "{} of {raw}", row.len());
        // A generated id is packed as its 8 bytes, once.
        let one = pack(10, &events[..1]).unwrap();
        let two = pack(10, &events[..2]).unwrap();
        assert!(two.len() < one.len() * 2 - 8, "{} {}", one.len(), two.len());
    }

    #[test]
    fn a_row_that_names_an_unnamed_run_or_repeats_a_number_is_refused() {
        let event = record("r", 5, "a");
        let (_, _, bytes) = split(&event).unwrap();
        let bad = |packed: Vec<Packed>| unpack(1, &postcard::to_allocvec(&packed).unwrap()).unwrap_err();
        let split_at = |gap, run| Packed::Split {
            gap,
            run,
            at_delta: 5,
            event: bytes,
        };
        assert!(bad(vec![split_at(0, RunRef::Seen(0))]).contains("has not named"));
        assert!(bad(vec![split_at(0, RunRef::Text("r")), split_at(0, RunRef::Seen(0))]).contains("repeats"));
        assert!(unpack(1, &[0]).unwrap_err().contains("no event"));
        assert!(pack(1, &[(2, event.clone()), (2, event.clone())]).is_err());
        assert!(pack(3, &[(2, event.clone())]).is_err());
        assert!(
            unpack(
                u64::MAX,
                &postcard::to_allocvec(&vec![split_at(1, RunRef::Text("r"))]).unwrap()
            )
            .unwrap_err()
            .contains("overflows")
        );
    }

    #[test]
    fn rows_fill_across_appends_and_reads_find_every_event_until_it_is_removed() {
        let dir = tempfile::tempdir().unwrap();
        let db = Database::create(dir.path().join("e.redb")).unwrap();
        let txn = db.begin_write().unwrap();
        let mut all = Vec::new();
        {
            let mut t = txn.open_table(T).unwrap();
            let mut seq = 1u64;
            for batch in [1usize, 3, 100, 1, 250] {
                let events: Vec<(u64, Vec<u8>)> = (0..batch)
                    .map(|i| {
                        seq += 1 + u64::from((i as u64).is_multiple_of(3));
                        (seq, record(&format!("{:016x}", seq / 5), 1_000 + seq, "s"))
                    })
                    .collect();
                append(&mut t, events.iter().map(|(s, r)| (*s, r.as_slice()))).unwrap();
                all.extend(events);
            }
            assert!(t.len().unwrap() < (all.len() / 20) as u64, "{} rows", t.len().unwrap());
            assert_eq!(read_from(&t, 0, usize::MAX).unwrap(), all);
            for (seq, rec) in &all {
                assert_eq!(get(&t, *seq).as_ref(), Some(rec));
                assert_eq!(get(&t, seq + 1).is_some(), all.iter().any(|(s, _)| *s == seq + 1));
            }
            let (mid, _) = all[200];
            assert_eq!(read_from(&t, mid, 3).unwrap(), all[200..203]);
            assert_eq!(last(&t).unwrap().as_ref(), all.last());

            // Retention: every third event, and then a row's worth from the start.
            let doomed: Vec<u64> = all.iter().step_by(3).map(|(s, _)| *s).collect();
            let bytes = remove(&mut t, &doomed).unwrap();
            assert_eq!(bytes, all.iter().step_by(3).map(|(_, r)| r.len() as u64).sum::<u64>());
            all.retain(|(s, _)| !doomed.contains(s));
            assert_eq!(read_from(&t, 0, usize::MAX).unwrap(), all);
            let head: Vec<u64> = all[..80].iter().map(|(s, _)| *s).collect();
            remove(&mut t, &head).unwrap();
            all.drain(..80);
            assert_eq!(read_from(&t, 0, usize::MAX).unwrap(), all);
            for (seq, rec) in &all {
                assert_eq!(get(&t, *seq).as_ref(), Some(rec));
            }
            // Every third number, stored or not: the stored ones come back, in order.
            let asked: Vec<u64> = (0..seq + 5).step_by(3).collect();
            let want: Vec<_> = all.iter().filter(|(s, _)| s % 3 == 0).cloned().collect();
            assert_eq!(get_many(&t, &asked).unwrap(), want);
            assert_eq!(remove(&mut t, &[0, 1]).unwrap(), 0);
        }
        txn.commit().unwrap();
    }

    #[test]
    fn single_record_rows_are_packed_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let db = Database::create(dir.path().join("e.redb")).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let mut t = txn.open_table(T).unwrap();
            let all: Vec<(u64, Vec<u8>)> = (1..=9_000u64)
                .filter(|s| s % 7 != 0)
                .map(|s| (s, record(&format!("run-{}", s / 4), s, "x")))
                .collect();
            for (s, r) in &all {
                t.insert(*s, r.as_slice()).unwrap();
            }
            // In steps, as the open does, with a step that ends inside a chunk.
            let (mut from, mut moved) = (0, 0);
            loop {
                let (n, next) = pack_single_rows(&mut t, from, 5_000).unwrap();
                moved += n;
                match next {
                    Some(next) => from = next,
                    None => break,
                }
            }
            assert_eq!(moved, all.len() as u64);
            assert!(t.len().unwrap() < 300, "{}", t.len().unwrap());
            assert_eq!(read_from(&t, 0, usize::MAX).unwrap(), all);
        }
        txn.commit().unwrap();
    }

    proptest! {
        #[test]
        fn any_events_round_trip(
            first in 0u64..1_000_000,
            events in proptest::collection::vec(
                (1u64..1_000, "[0-9a-f]{16}|[a-z]{1,5}", any::<u64>(), proptest::collection::vec(any::<u8>(), 0..40)),
                1..50,
            ),
            raw in any::<bool>(),
        ) {
            let mut seq = first;
            let events: Vec<(u64, Vec<u8>)> = events
                .into_iter()
                .map(|(gap, run, at, tail)| {
                    seq += gap;
                    let bytes = if raw { tail } else { join(&run, at, &tail).unwrap() };
                    (seq, bytes)
                })
                .collect();
            let row = pack(first, &events).unwrap();
            prop_assert_eq!(unpack(first, &row).unwrap(), events);
        }

        #[test]
        fn any_bytes_unpack_without_panicking(key in any::<u64>(), bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            if let Ok(events) = unpack(key, &bytes) {
                prop_assert!(events.windows(2).all(|w| w[0].0 < w[1].0));
                prop_assert!(events.first().is_none_or(|(s, _)| *s >= key));
            }
        }
    }
}
