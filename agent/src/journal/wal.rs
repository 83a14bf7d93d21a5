//! The segment log: the hot path's write-ahead log beside the redb file (`journal.log`).
//!
//! A group commit of starts, appends, cursors and kv rows is one block appended to a
//! preallocated file and made durable with one `fdatasync`: a page or two written, where a redb
//! commit rewrites about nine (docs/journal.md). A checkpoint moves what the log holds into redb,
//! which stays the store of record, and moves the log generation on (the cursor
//! `journal/log_generation`, in the checkpoint's own transaction); the log then starts again at
//! offset 0.
//!
//! A block starts at a multiple of [`BLOCK`]:
//!
//! | bytes | field |
//! |---|---|
//! | 0..4 | magic `OPWL` |
//! | 4..8 | CRC-32C of bytes 8..24+len |
//! | 8..16 | generation (u64 LE) |
//! | 16..20 | block number within the generation (u32 LE), from 0 |
//! | 20..24 | payload length (u32 LE) |
//! | 24.. | payload: postcard `Vec<Entry>` |
//!
//! then zeros to the next multiple of [`BLOCK`]. A block is valid only with the right magic,
//! generation, number and checksum, so a torn block, a stale block of an older generation and
//! the zeros of a fresh file all end the scan. Blocks are written one at a time, each synced
//! before the next is begun, so only the last can be torn: a valid block of the current
//! generation after an invalid one is damage, and [`scan`] refuses it rather than drop the
//! acknowledged blocks between.

use redb::StorageBackend;
use serde::{Deserialize, Serialize};

/// Blocks start at multiples of this; a block is padded to it.
pub const BLOCK: u64 = 4096;
/// The log's default size: room for a few thousand small group commits between checkpoints.
pub const LOG_BYTES: u64 = 4 * 1024 * 1024;
/// The largest block written to the log; a larger group commit goes to redb directly.
pub(super) const BLOCK_MAX: usize = 256 * 1024;
/// Cursor: blocks of this generation are the log's; older ones are already in redb.
pub(super) const LOG_GENERATION: &str = "journal/log_generation";

const MAGIC: [u8; 4] = *b"OPWL";
const HEADER: usize = 24;
const CRC: crc::Crc<u32> = crc::Crc::<u32>::new(&crc::CRC_32_ISCSI);

/// One change a block carries.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Entry {
    /// An event: its sequence and its stored record bytes.
    Event {
        /// Sequence number.
        seq: u64,
        /// The record as `events` stores it.
        record: Vec<u8>,
    },
    /// A named cursor set.
    Cursor {
        /// Name.
        key: String,
        /// Value.
        value: u64,
    },
    /// A kv row set.
    Kv {
        /// Name.
        key: String,
        /// Value.
        value: Vec<u8>,
    },
}

/// An [`Entry`] to write, borrowing what it holds (the same bytes on disk).
#[derive(Debug, Serialize)]
pub(super) enum EntryRef<'a> {
    /// An event.
    Event {
        /// Sequence number.
        seq: u64,
        /// The record bytes.
        record: &'a [u8],
    },
    /// A cursor.
    Cursor {
        /// Name.
        key: &'a str,
        /// Value.
        value: u64,
    },
    /// A kv row.
    Kv {
        /// Name.
        key: &'a str,
        /// Value.
        value: &'a [u8],
    },
}

/// Why a log does not read.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// Reading or writing the file failed.
    #[error("journal log: {0}")]
    Io(#[from] std::io::Error),
    /// A valid block follows an invalid one: not a torn tail.
    #[error(
        "journal log damaged: block {block} at byte {offset} does not verify ({why}), yet a later block of the same generation does"
    )]
    Damaged {
        /// Block number.
        block: u32,
        /// Its offset.
        offset: u64,
        /// What is wrong with it.
        why: &'static str,
    },
    /// A block's checksum holds but its payload does not decode.
    #[error("journal log block {block} at byte {offset} does not decode: {source}")]
    Decode {
        /// Block number.
        block: u32,
        /// Its offset.
        offset: u64,
        /// The decoder's error.
        source: postcard::Error,
    },
}

/// Encodes one block (padded to [`BLOCK`]).
pub(super) fn encode_block<E: Serialize>(generation: u64, number: u32, entries: &[E]) -> Vec<u8> {
    let payload = postcard::to_allocvec(entries).unwrap_or_default();
    let len = u32::try_from(payload.len()).unwrap_or(u32::MAX);
    let mut out = Vec::with_capacity(padded(HEADER + payload.len()));
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(&generation.to_le_bytes());
    out.extend_from_slice(&number.to_le_bytes());
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&payload);
    let crc = CRC.checksum(&out[8..]);
    out[4..8].copy_from_slice(&crc.to_le_bytes());
    out.resize(padded(out.len()), 0);
    out
}

fn padded(len: usize) -> usize {
    len.div_ceil(BLOCK as usize) * BLOCK as usize
}

/// A block's header, if `head` is one of `generation`'s: its number and payload length.
fn header(head: &[u8], generation: u64) -> Result<(u32, usize), &'static str> {
    let field = |at: usize, n: usize| head.get(at..at + n).ok_or("short header");
    if field(0, 4)? != MAGIC {
        return Err("no block magic");
    }
    let u64_at = |at| field(at, 8).map(|b| u64::from_le_bytes(b.try_into().unwrap_or([0; 8])));
    let u32_at = |at| field(at, 4).map(|b| u32::from_le_bytes(b.try_into().unwrap_or([0; 4])));
    if u64_at(8)? != generation {
        return Err("another generation");
    }
    Ok((u32_at(16)?, u32_at(20)? as usize))
}

/// Decodes the block at the start of `bytes` if it is block `number` of `generation`: its
/// entries and its padded length. `Ok(None)` for anything that is not that block (the end of the
/// log); a block whose checksum holds but whose payload does not decode is an error.
pub fn decode_block(bytes: &[u8], generation: u64, number: u32) -> Result<Option<(Vec<Entry>, usize)>, LogError> {
    match check(bytes, generation, number) {
        Ok(len) => {
            let payload = bytes.get(HEADER..HEADER + len).unwrap_or_default();
            let entries = postcard::from_bytes(payload).map_err(|source| LogError::Decode {
                block: number,
                offset: 0,
                source,
            })?;
            Ok(Some((entries, padded(HEADER + len))))
        }
        Err(_) => Ok(None),
    }
}

/// The payload length of block `number` of `generation` at the start of `bytes`, or why it is
/// not that block.
fn check(bytes: &[u8], generation: u64, number: u32) -> Result<usize, &'static str> {
    let (n, len) = header(bytes, generation)?;
    if n != number {
        return Err("out of sequence");
    }
    let body = bytes.get(8..HEADER + len).ok_or("shorter than its length")?;
    let crc = bytes
        .get(4..8)
        .map(|b| u32::from_le_bytes(b.try_into().unwrap_or([0; 4])));
    if crc != Some(CRC.checksum(body)) {
        return Err("checksum mismatch");
    }
    Ok(len)
}

/// What a scan found: the valid blocks' entries, in order, and where the next block goes.
#[derive(Debug, Default)]
pub(super) struct Scanned {
    pub(super) entries: Vec<Entry>,
    pub(super) blocks: u32,
    pub(super) end: u64,
}

/// Reads `generation`'s blocks from the start of `file` up to the first that does not verify.
pub(super) fn scan(file: &dyn StorageBackend, generation: u64) -> Result<Scanned, LogError> {
    let len = file.len()?;
    let mut out = Scanned::default();
    let mut head = [0u8; HEADER];
    while out.end + HEADER as u64 <= len {
        file.read(out.end, &mut head)?;
        let Ok((_, payload)) = header(&head, generation) else {
            break;
        };
        let size = padded(HEADER + payload) as u64;
        if out.end + size > len {
            break;
        }
        let mut block = vec![0u8; size as usize];
        file.read(out.end, &mut block)?;
        match decode_block(&block, generation, out.blocks) {
            Ok(Some((entries, _))) => out.entries.extend(entries),
            Ok(None) => break,
            Err(LogError::Decode { block, source, .. }) => {
                return Err(LogError::Decode {
                    block,
                    offset: out.end,
                    source,
                });
            }
            Err(e) => return Err(e),
        }
        out.blocks += 1;
        out.end += size;
    }
    // Past the tail: a block of this generation further on means the one at the tail was
    // damaged, not torn (only the last block written can be torn).
    let mut at = out.end + BLOCK;
    while at + HEADER as u64 <= len {
        file.read(at, &mut head)?;
        if let Ok((n, _)) = header(&head, generation)
            && n > out.blocks
        {
            let mut first = vec![0u8; HEADER];
            file.read(out.end, &mut first)?;
            let why = match header(&first, generation) {
                Err(why) => why,
                Ok(_) => "checksum mismatch",
            };
            return Err(LogError::Damaged {
                block: out.blocks,
                offset: out.end,
                why,
            });
        }
        at += BLOCK;
    }
    Ok(out)
}

/// Checks that the log's events continue the journal's: the first is `next`, and each
/// follows the one before. A log that does not is not this journal's tail.
pub(super) fn check_sequence(entries: &[Entry], next: u64) -> Result<(), super::JournalError> {
    let mut want = next;
    for e in entries {
        if let Entry::Event { seq, .. } = e {
            if *seq != want {
                return Err(super::JournalError::Damaged(format!(
                    "the journal log holds event {seq} where event {want} was due (a log from another journal, or a file restored without its log?)"
                )));
            }
            want += 1;
        }
    }
    Ok(())
}

/// The open log: where the next block goes.
pub(super) struct Wal {
    file: Box<dyn StorageBackend>,
    /// Blocks of this generation are live.
    pub(super) generation: u64,
    next_block: u32,
    /// Offset of the next block.
    pub(super) tail: u64,
    capacity: u64,
    /// A write or sync failed: the log is not used again until a checkpoint has moved it on
    /// to a new generation.
    pub(super) failed: bool,
}

impl std::fmt::Debug for Wal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Wal")
            .field("generation", &self.generation)
            .field("tail", &self.tail)
            .finish()
    }
}

impl Wal {
    /// Takes `file` for `generation`, empty, and makes it `capacity` bytes long, written with
    /// zeros once so later writes allocate nothing (a write into a hole would cost the file
    /// system a metadata commit on every sync).
    pub(super) fn open(file: Box<dyn StorageBackend>, generation: u64, capacity: u64) -> std::io::Result<Wal> {
        let capacity = capacity.max(BLOCK) / BLOCK * BLOCK;
        let len = file.len()?;
        if len < capacity {
            let zeros = vec![0u8; 64 * 1024];
            let mut at = len / BLOCK * BLOCK;
            while at < capacity {
                let n = (capacity - at).min(zeros.len() as u64) as usize;
                file.write(at, zeros.get(..n).unwrap_or_default())?;
                at += n as u64;
            }
            file.sync_data()?;
        }
        Ok(Wal {
            file,
            generation,
            next_block: 0,
            tail: 0,
            capacity,
            failed: false,
        })
    }

    /// Whether the log takes group commits now.
    pub(super) fn usable(&self) -> bool {
        !self.failed
    }

    /// Whether the log holds anything redb does not (or may, after a failure).
    pub(super) fn used(&self) -> bool {
        self.tail > 0 || self.failed
    }

    /// Whether a block of `len` bytes fits (and is small enough for the log at all).
    pub(super) fn fits(&self, len: usize) -> bool {
        len <= BLOCK_MAX && self.tail + len as u64 <= self.capacity
    }

    /// Writes `block` (from `encode_block` with [`Wal::next`]) at the tail and syncs it.
    pub(super) fn append(&mut self, block: &[u8]) -> std::io::Result<()> {
        let written = self.file.write(self.tail, block).and_then(|()| self.file.sync_data());
        if written.is_err() {
            self.failed = true;
        }
        written?;
        self.tail += block.len() as u64;
        self.next_block += 1;
        Ok(())
    }

    /// The generation and number the next block must carry.
    pub(super) fn next(&self) -> (u64, u32) {
        (self.generation, self.next_block)
    }

    /// Everything in the log is now in redb, under `generation`: start again at offset 0.
    pub(super) fn restart(&mut self, generation: u64) {
        self.generation = generation;
        self.next_block = 0;
        self.tail = 0;
        self.failed = false;
    }
}

/// A log file read without a lock and never written (`outpost list --offline`,
/// `journal-check`).
pub(super) struct ReadOnlyLog(pub(super) std::fs::File);

impl std::fmt::Debug for ReadOnlyLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ReadOnlyLog")
    }
}

impl StorageBackend for ReadOnlyLog {
    fn len(&self) -> std::io::Result<u64> {
        Ok(self.0.metadata()?.len())
    }
    fn read(&self, offset: u64, out: &mut [u8]) -> std::io::Result<()> {
        std::os::unix::fs::FileExt::read_exact_at(&self.0, out, offset)
    }
    fn set_len(&self, _: u64) -> std::io::Result<()> {
        Err(std::io::Error::other("the journal log is open read-only"))
    }
    fn sync_data(&self) -> std::io::Result<()> {
        Ok(())
    }
    fn write(&self, _: u64, _: &[u8]) -> std::io::Result<()> {
        Err(std::io::Error::other("the journal log is open read-only"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A file in memory.
    #[derive(Debug, Default)]
    struct Mem(std::sync::Mutex<Vec<u8>>);

    impl StorageBackend for Mem {
        fn len(&self) -> std::io::Result<u64> {
            Ok(self.0.lock().unwrap().len() as u64)
        }
        fn read(&self, offset: u64, out: &mut [u8]) -> std::io::Result<()> {
            let d = self.0.lock().unwrap();
            out.copy_from_slice(&d[offset as usize..offset as usize + out.len()]);
            Ok(())
        }
        fn set_len(&self, len: u64) -> std::io::Result<()> {
            self.0.lock().unwrap().resize(len as usize, 0);
            Ok(())
        }
        fn sync_data(&self) -> std::io::Result<()> {
            Ok(())
        }
        fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
            let mut d = self.0.lock().unwrap();
            let end = offset as usize + data.len();
            if d.len() < end {
                d.resize(end, 0);
            }
            d[offset as usize..end].copy_from_slice(data);
            Ok(())
        }
    }

    fn event(seq: u64, len: usize) -> Entry {
        Entry::Event {
            seq,
            record: vec![seq as u8; len],
        }
    }

    fn filled(blocks: &[Vec<Entry>], generation: u64) -> Vec<u8> {
        let mut wal = Wal::open(Box::new(Mem::default()), generation, 64 * 1024).unwrap();
        for entries in blocks {
            let (g, n) = wal.next();
            wal.append(&encode_block(g, n, entries)).unwrap();
        }
        let Wal { file, .. } = wal;
        let mut out = vec![0u8; file.len().unwrap() as usize];
        file.read(0, &mut out).unwrap();
        out
    }

    fn mem(b: Vec<u8>) -> Mem {
        Mem(std::sync::Mutex::new(b))
    }

    #[test]
    fn blocks_read_back_in_order_and_a_new_generation_hides_the_old() {
        let blocks = vec![
            vec![event(1, 10), event(2, 5000)],
            vec![Entry::Cursor {
                key: "k".into(),
                value: 3,
            }],
            vec![event(3, 1)],
        ];
        let file = mem(filled(&blocks, 7));
        let s = scan(&file, 7).unwrap();
        assert_eq!(s.entries, blocks.concat());
        assert_eq!((s.blocks, s.end), (3, 4 * BLOCK), "the 5 KB event takes two pages");
        let s = scan(&file, 8).unwrap();
        assert!(s.entries.is_empty() && s.end == 0);
        // Generation 8 written over the start: generation 7's later blocks do not count.
        let mut wal = Wal::open(Box::new(file), 8, 64 * 1024).unwrap();
        wal.append(&encode_block(8, 0, &[event(4, 1)])).unwrap();
        let Wal { file, .. } = wal;
        assert_eq!(scan(&*file, 8).unwrap().entries, vec![event(4, 1)]);
    }

    #[test]
    fn a_torn_last_block_ends_the_log_but_damage_before_a_valid_block_is_refused() {
        let blocks: Vec<Vec<Entry>> = (1..=3).map(|s| vec![event(s, 100)]).collect();
        let good = filled(&blocks, 1);
        // Torn: the last block's first sector only.
        let mut torn = good.clone();
        torn[2 * BLOCK as usize + 100] ^= 0xff;
        let s = scan(&mem(torn), 1).unwrap();
        assert_eq!(s.entries, blocks[..2].concat());
        // Damage in the middle: block 1 bad, block 2 good.
        let mut bad = good;
        bad[BLOCK as usize + 30] ^= 0x01;
        let e = scan(&mem(bad), 1).unwrap_err().to_string();
        assert!(e.contains("block 1") && e.contains("checksum"), "{e}");
    }

    #[test]
    fn the_fuzz_seed_is_a_block_and_borrowed_entries_write_the_same_bytes() {
        let seed = std::fs::read(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../fuzz/corpus/journal_log_block/seed-block"
        ))
        .unwrap();
        let (entries, len) = decode_block(&seed, 5, 0).unwrap().unwrap();
        assert_eq!(len, BLOCK as usize);
        let record: Vec<u8> = (0..20).collect();
        let want = vec![
            Entry::Event {
                seq: 42,
                record: record.clone(),
            },
            Entry::Cursor {
                key: "k".into(),
                value: 7,
            },
            Entry::Kv {
                key: "v".into(),
                value: b"ok".to_vec(),
            },
        ];
        assert_eq!(entries, want);
        let borrowed = [
            EntryRef::Event {
                seq: 42,
                record: &record,
            },
            EntryRef::Cursor { key: "k", value: 7 },
            EntryRef::Kv { key: "v", value: b"ok" },
        ];
        assert_eq!(encode_block(5, 0, &borrowed), seed);
        assert_eq!(encode_block(5, 0, &want), seed);
    }

    proptest! {
        #[test]
        fn any_damage_reads_back_a_prefix_or_is_refused(
            sizes in proptest::collection::vec(0usize..6000, 1..6),
            flip in 0usize..40_000,
            bit in 0u8..8,
        ) {
            let blocks: Vec<Vec<Entry>> = sizes.iter().enumerate().map(|(i, n)| vec![event(i as u64, *n)]).collect();
            let mut b = filled(&blocks, 3);
            if flip < b.len() {
                b[flip] ^= 1 << bit;
            }
            match scan(&mem(b), 3) {
                Ok(s) => {
                    let n = s.blocks as usize;
                    prop_assert_eq!(s.entries, blocks[..n].concat());
                }
                Err(e) => prop_assert!(e.to_string().contains("damaged") || e.to_string().contains("decode")),
            }
        }
    }
}
