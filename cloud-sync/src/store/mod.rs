//! The fleet store (redb): devices, a mirror of every run with its full history, commands,
//! deployments, desired and reported state.
//!
//! Events are stored by (device, sequence); a batch is stored only up to its first gap, and the
//! device's next expected sequence moves in the same transaction, so an acknowledgement sent
//! after the commit is always true and a redelivered batch is recognised by its sequence.

use std::path::Path;

use outpost_shared::journal::{self, Event};
use outpost_shared::protocol::{Birth, CommandKind, CommandResult, Inventory, Outcome, WireEvent};
use outpost_shared::row;
use outpost_shared::run::RunStatus;
use redb::{Database, Durability, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use serde::{Deserialize, Serialize};

use crate::lineage::{self, ArchiveNote, BirthFacts, Lineage, Verdict};

mod operators;
pub use operators::{AuditFilter, AuditRow, TokenRow, UserRow};

const DEVICES: TableDefinition<&str, &[u8]> = TableDefinition::new("devices");
const EVENTS: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("events");
/// Index of each run's events: (device, run, seq), written with the event.
const RUN_EVENTS: TableDefinition<(&str, &str, u64), ()> = TableDefinition::new("run_events");
const RUNS: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("runs");
const COMMANDS: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("commands");
/// Commands not yet answered, per device, in the order they were issued.
const OUTBOX: TableDefinition<(&str, u64), &str> = TableDefinition::new("command_outbox");
const DEPLOYMENTS: TableDefinition<&str, &[u8]> = TableDefinition::new("deployments");
/// Deployment id → `rollout::Rollout`, for deployments sent wave by wave.
const ROLLOUTS: TableDefinition<&str, &[u8]> = TableDefinition::new("rollouts");
/// Deployment ids of the rollouts still going (running or paused): what the ticker reads.
const ACTIVE_ROLLOUTS: TableDefinition<&str, ()> = TableDefinition::new("active_rollouts");
const DESIRED: TableDefinition<&str, &[u8]> = TableDefinition::new("desired");
const REPORTED: TableDefinition<&str, &[u8]> = TableDefinition::new("reported");
const COUNTERS: TableDefinition<&str, u64> = TableDefinition::new("counters");
/// Most commands that wait for one device.
pub const MAX_PENDING_COMMANDS: usize = 1000;
/// Definitions each device holds (from its inventory), by (device, workflow, version).
const DEFINITIONS: TableDefinition<(&str, &str, u32), &str> = TableDefinition::new("definitions");
/// Events whose record does not decode, kept by (device, seq) for forensics: the sequence is
/// consumed so one bad record cannot stop a device's sync.
const QUARANTINE: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("quarantine");
/// Each device's equipment list (from its inventory).
const EQUIPMENT: TableDefinition<&str, &[u8]> = TableDefinition::new("equipment");
/// Which journal each device's events come from (`lineage::Lineage`).
const LINEAGE: TableDefinition<&str, &[u8]> = TableDefinition::new("lineage");
/// Events set aside because the device's journal no longer has them, by (device, archive, seq):
/// kept for forensics, never shown as the device's history.
const ARCHIVE: TableDefinition<(&str, u64, u64), &[u8]> = TableDefinition::new("archive");
/// Device → `SecurityRow`: what its newest birth says is insecure about its link and which
/// messages it refused, when there is anything to say.
const GATEWAY_SECURITY: TableDefinition<&str, &[u8]> = TableDefinition::new("gateway_security");
/// What a gateway says about its link's security.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecurityRow {
    /// What is insecure about its link.
    pub warnings: Vec<String>,
    /// The newest messages it refused for their signature.
    pub refused: Vec<String>,
}

/// Device → `GatewayHealth`, while its newest birth says its journal cannot be written.
const GATEWAY_HEALTH: TableDefinition<&str, &[u8]> = TableDefinition::new("gateway_health");

/// What a device's newest birth says about its journal's storage, while it fails.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GatewayHealth {
    /// The storage error, as the gateway says it.
    pub storage_error: String,
    /// Runs waiting for the journal (at most `protocol::MAX_BLOCKED_RUNS_LISTED`).
    pub blocked_runs: Vec<String>,
    /// When cloud-sync first heard of it.
    pub since_ms: u64,
}

/// Why the store failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// redb failed.
    #[error("store: {0}")]
    Storage(#[from] redb::Error),
    /// A stored row does not decode.
    #[error("store: corrupt {what}: {reason}")]
    Corrupt {
        /// Which row.
        what: &'static str,
        /// Why.
        reason: String,
    },
    /// The request names something that does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The request is invalid.
    #[error("{0}")]
    Invalid(String),
    /// A new device would pass the store's device limit.
    #[error("{0}")]
    DeviceLimit(String),
    /// The blocking task running store work panicked or was cancelled.
    #[error("store task failed: {0}")]
    Task(String),
}

outpost_shared::redb_errors_into!(StoreError, StoreError::Storage);

/// A device's own words kept short (it is shown on every page of that device).
fn protocol_clip(text: &str) -> String {
    outpost_shared::protocol::clip(text, 512)
}

fn enc<T: Serialize>(v: &T) -> Vec<u8> {
    row::encode(v)
}

fn dec<T: for<'de> Deserialize<'de>>(what: &'static str, bytes: &[u8]) -> Result<T, StoreError> {
    row::decode(bytes).map_err(|e| StoreError::Corrupt {
        what,
        reason: e.to_string(),
    })
}

/// What the cloud knows about a device.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Device {
    /// Highest birth epoch seen.
    pub epoch: u64,
    /// Highest death epoch seen; the device is online while `epoch > death_epoch`.
    pub death_epoch: u64,
    /// Last message of any kind (ms since the epoch).
    pub last_seen_ms: u64,
    /// Next sequence expected (every event before it is stored).
    pub next_seq: u64,
    /// The device's newest sequence as of its last birth.
    pub reported_last_seq: u64,
    /// Agent version.
    pub agent_version: String,
    /// Labels from the birth message.
    pub labels: Vec<(String, String)>,
}

impl Device {
    /// True while the newest birth is newer than the newest death.
    pub fn online(&self) -> bool {
        self.epoch > self.death_epoch
    }

    /// When the device was last known to be there: now while it is online (the broker keeps
    /// its session alive with MQTT keepalives and publishes its death message when they stop,
    /// so an idle device is still present), else its last message.
    pub fn last_seen(&self, now_ms: u64) -> u64 {
        if self.online() {
            now_ms.max(self.last_seen_ms)
        } else {
            self.last_seen_ms
        }
    }
}

/// The mirror of one run.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RunMirror {
    /// Workflow.
    pub workflow: String,
    /// Version.
    pub version: u32,
    /// Where the run stands (stored as its name, `running`, `completed`, …).
    #[serde(with = "outpost_shared::run::status_text")]
    pub status: RunStatus,
    /// First event time.
    pub created_ms: u64,
    /// End time.
    pub finished_ms: Option<u64>,
    /// Events stored.
    pub events: u64,
}

/// A command and where it stands.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CommandRecord {
    /// Issue order (also its key in the outbox).
    pub order: u64,
    /// What to do.
    pub kind: CommandKind,
    /// Issued at.
    pub created_ms: u64,
    /// `pending` (stored, not yet applied), `applied`, `rejected`, `superseded`.
    pub state: String,
    /// Result message.
    pub message: String,
    /// Result detail (JSON text).
    pub detail: String,
    /// When the result arrived.
    pub answered_ms: Option<u64>,
}

/// A deployment of one definition to chosen devices.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Deployment {
    /// Workflow name.
    pub workflow: String,
    /// Version.
    pub version: u32,
    /// Devices targeted (their commands are `DEPLOYMENT.DEVICE`).
    pub devices: Vec<String>,
    /// Created at.
    pub created_ms: u64,
}

/// A device's desired document.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DesiredRow {
    /// Version, from 1.
    pub version: u64,
    /// JSON text.
    pub document: String,
    /// Set at.
    pub updated_ms: u64,
}

/// A device's reported document.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReportedRow {
    /// The desired version it answers.
    pub desired_version: u64,
    /// JSON text.
    pub document: String,
    /// Equal to the desired version it answers (not necessarily the current one).
    pub in_sync: bool,
    /// Why not.
    pub message: String,
    /// Received at.
    pub updated_ms: u64,
    /// Per equipment point: desired, found, raw words, verdict (empty from older agents).
    pub points: Vec<outpost_shared::protocol::PointCheck>,
    /// When the device read its points back (epoch ms; 0 from older agents: use `updated_ms`).
    pub verified_ms: u64,
    /// Since when a verified state has drifted, while it stays so.
    pub drift_since_ms: Option<u64>,
}

/// A reported row as stored before per-point verdicts, still read from older stores.
#[derive(Deserialize)]
struct ReportedRowV1 {
    desired_version: u64,
    document: String,
    in_sync: bool,
    message: String,
    updated_ms: u64,
}

impl ReportedRow {
    /// True when it answers `desired_version` and was in sync with it.
    pub fn in_sync_with(&self, desired_version: u64) -> bool {
        self.in_sync && self.desired_version == desired_version
    }
}

/// What storing a batch did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    /// Events newly stored.
    pub new: u64,
    /// Events already stored (a redelivery).
    pub duplicates: u64,
    /// Set when the batch starts past the next expected sequence: ask from here.
    pub gap_from: Option<u64>,
    /// The device's next expected sequence after this batch (the ack).
    pub next_seq: u64,
    /// Sequences whose records did not decode, kept in quarantine, with why.
    pub quarantined: Vec<(u64, String)>,
    /// Set when a resent event differed from the stored one: stored events from here were set
    /// aside.
    pub diverged_from: Option<u64>,
}

/// What a birth did.
#[derive(Debug, Clone, PartialEq)]
pub struct BirthOutcome {
    /// The device afterwards.
    pub device: Device,
    /// The decision.
    pub verdict: Verdict,
    /// Events set aside.
    pub archived: u64,
}

/// Folds one event into its run's mirror (created by the run's first event).
fn fold(m: &mut Option<RunMirror>, rec: &journal::Record) {
    let m = m.get_or_insert_with(|| RunMirror {
        status: RunStatus::Running,
        created_ms: rec.at_ms,
        ..RunMirror::default()
    });
    if let Event::RunStarted { workflow, version, .. } = &rec.event {
        m.workflow = workflow.clone();
        m.version = *version;
        m.created_ms = rec.at_ms;
    }
    if let Some(st) = RunStatus::after(&rec.event) {
        m.status = st;
        m.finished_ms = rec.event.is_terminal().then_some(rec.at_ms);
    }
    m.events += 1;
}

/// Removes and returns a device's rows from sequence `from` on.
fn take_tail(
    t: &mut redb::Table<(&'static str, u64), &'static [u8]>,
    device: &str,
    from: u64,
) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
    let rows: Vec<(u64, Vec<u8>)> = t
        .range((device, from)..=(device, u64::MAX))?
        .map(|r| r.map(|(k, v)| (k.value().1, v.value().to_vec())))
        .collect::<Result<_, _>>()?;
    for (seq, _) in &rows {
        t.remove((device, *seq))?;
    }
    Ok(rows)
}

/// The tables of a device's event stream, open in one write transaction.
struct Stream<'t> {
    ev: redb::Table<'t, (&'static str, u64), &'static [u8]>,
    index: redb::Table<'t, (&'static str, &'static str, u64), ()>,
    runs: redb::Table<'t, (&'static str, &'static str), &'static [u8]>,
    quarantine: redb::Table<'t, (&'static str, u64), &'static [u8]>,
    archive: redb::Table<'t, (&'static str, u64, u64), &'static [u8]>,
}

impl<'t> Stream<'t> {
    fn open(txn: &'t redb::WriteTransaction) -> Result<Stream<'t>, StoreError> {
        Ok(Stream {
            ev: txn.open_table(EVENTS)?,
            index: txn.open_table(RUN_EVENTS)?,
            runs: txn.open_table(RUNS)?,
            quarantine: txn.open_table(QUARANTINE)?,
            archive: txn.open_table(ARCHIVE)?,
        })
    }

    /// True when a redelivered event equals what is stored under its sequence (or nothing is
    /// stored there to compare: a range recorded as lost).
    fn same_as_stored(&self, device: &str, e: &WireEvent) -> Result<bool, StoreError> {
        if let Some(v) = self.ev.get((device, e.seq))? {
            return Ok(v.value() == e.record.as_slice());
        }
        if let Some(v) = self.quarantine.get((device, e.seq))? {
            return Ok(v.value() == e.record.as_slice());
        }
        Ok(true)
    }

    /// Moves every stored event of `device` from `from` on into a new archive and folds the
    /// affected run mirrors again from what stays (a run left with no events goes).
    fn archive_tail(
        &mut self,
        device: &str,
        from: u64,
        lin: &mut Lineage,
        reason: &str,
        now: u64,
    ) -> Result<u64, StoreError> {
        let no = lin.archives + 1;
        let mut moved = 0u64;
        let mut touched = std::collections::BTreeSet::new();
        for (seq, bytes) in take_tail(&mut self.ev, device, from)? {
            self.archive.insert((device, no, seq), bytes.as_slice())?;
            if let Ok(r) = journal::decode(&bytes) {
                self.index.remove((device, r.run_id.as_str(), seq))?;
                touched.insert(r.run_id);
            }
            moved += 1;
        }
        for (seq, bytes) in take_tail(&mut self.quarantine, device, from)? {
            self.archive.insert((device, no, seq), bytes.as_slice())?;
            moved += 1;
        }
        for run in &touched {
            let seqs: Vec<u64> = self
                .index
                .range((device, run.as_str(), 0u64)..=(device, run.as_str(), u64::MAX))?
                .map(|r| r.map(|(k, _)| k.value().2))
                .collect::<Result<_, _>>()?;
            let mut m = None;
            for seq in seqs {
                if let Some(v) = self.ev.get((device, seq))?
                    && let Ok(r) = journal::decode(v.value())
                {
                    fold(&mut m, &r);
                }
            }
            match m {
                Some(m) => self.runs.insert((device, run.as_str()), enc(&m).as_slice())?,
                None => self.runs.remove((device, run.as_str()))?,
            };
        }
        if moved > 0 {
            lin.archives = no;
            lin.archived_events += moved;
            lin.last_archive = Some(ArchiveNote {
                at_ms: now,
                from_seq: from,
                events: moved,
                reason: reason.to_string(),
            });
        }
        Ok(moved)
    }
}

/// A run's events with their device sequence numbers, oldest first.
pub type History = Vec<(u64, journal::Record)>;

/// Opens the database (again: redb refuses every transaction after an I/O error until reopened).
type Opener = Box<dyn Fn() -> Result<Database, StoreError> + Send + Sync>;

/// The store.
pub struct Store {
    /// The open database; `None` after a storage error until a reopen succeeds.
    slot: std::sync::RwLock<Option<std::sync::Arc<Database>>>,
    opener: Opener,
    /// Set by a storage error, cleared by a successful reopen; `/v1/health` answers 503 meanwhile.
    failing: std::sync::atomic::AtomicBool,
    /// Most devices the store takes (`--max-devices`): anyone who may publish on the broker can
    /// make up device ids.
    max_devices: std::sync::atomic::AtomicU64,
}

/// Answered commands kept per device (newest first; deployment commands are kept with their
/// deployment). Older answers go when a new one arrives.
pub const KEEP_ANSWERED_COMMANDS: usize = 1000;

/// Deletes a device's oldest answered commands beyond `keep` (not deployment commands, which a
/// deployment's view reads), once there are a tenth more than that, so it runs rarely.
fn forget_old_answers(
    cmds: &mut redb::Table<(&str, &str), &[u8]>,
    device: &str,
    keep: usize,
) -> Result<(), StoreError> {
    let mut answered: Vec<(u64, String)> = Vec::new();
    for row in cmds.range((device, "")..=(device, "\u{10FFFF}"))? {
        let (k, v) = row?;
        let c: CommandRecord = dec("command", v.value())?;
        if c.answered_ms.is_some() && !matches!(c.kind, CommandKind::Deploy { .. }) {
            answered.push((c.order, k.value().1.to_string()));
        }
    }
    if answered.len() <= keep + keep / 10 {
        return Ok(());
    }
    answered.sort_unstable_by_key(|a| std::cmp::Reverse(a.0));
    for (_, id) in answered.into_iter().skip(keep) {
        cmds.remove((device, id.as_str()))?;
    }
    Ok(())
}

/// Versions of one workflow kept per device (the newest); a run of an older one shows no graph.
pub const KEEP_DEFINITION_VERSIONS: usize = 100;

/// Default for `Store::set_max_devices`.
pub const DEFAULT_MAX_DEVICES: u64 = 10_000;

/// A device row for an id seen for the first time, if the store has room for one more.
fn new_device(devices: &redb::Table<&str, &[u8]>, id: &str, max: u64) -> Result<Device, StoreError> {
    let n = redb::ReadableTableMetadata::len(devices)?;
    if n >= max {
        return Err(StoreError::DeviceLimit(format!(
            "device '{id}' is new and the store already holds {n} devices (--max-devices {max})"
        )));
    }
    Ok(Device {
        next_seq: 1,
        ..Device::default()
    })
}

impl Store {
    /// Opens (or creates) the store at `path`.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let path = path.to_path_buf();
        Self::open_with(Box::new(move || {
            Ok(Database::builder().set_cache_size(64 * 1024 * 1024).create(&path)?)
        }))
    }

    /// Opens the store with `opener` (tests inject a failing storage backend through it).
    pub fn open_with(opener: Opener) -> Result<Store, StoreError> {
        let db = opener()?;
        Self::prepare(&db)?;
        Ok(Store {
            slot: std::sync::RwLock::new(Some(std::sync::Arc::new(db))),
            opener,
            failing: std::sync::atomic::AtomicBool::new(false),
            max_devices: std::sync::atomic::AtomicU64::new(DEFAULT_MAX_DEVICES),
        })
    }

    /// Sets the most devices the store takes; births and events of further new ids are refused.
    pub fn set_max_devices(&self, max: u64) {
        self.max_devices.store(max, std::sync::atomic::Ordering::Relaxed);
    }

    fn max_devices(&self) -> u64 {
        self.max_devices.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The database, reopening it first if a storage error closed it.
    fn db(&self) -> Result<std::sync::Arc<Database>, StoreError> {
        if let Some(db) = self.slot.read().unwrap_or_else(|p| p.into_inner()).clone() {
            return Ok(db);
        }
        let mut slot = self.slot.write().unwrap_or_else(|p| p.into_inner());
        if let Some(db) = slot.clone() {
            return Ok(db);
        }
        let db = std::sync::Arc::new((self.opener)()?);
        *slot = Some(db.clone());
        self.failing.store(false, std::sync::atomic::Ordering::SeqCst);
        tracing::info!("store reopened after a storage error");
        Ok(db)
    }

    /// After a storage error: drop the database so the next call reopens it (redb answers
    /// `PreviousIo` forever otherwise). The file is released once in-flight readers finish.
    pub fn storage_failed(&self) {
        self.failing.store(true, std::sync::atomic::Ordering::SeqCst);
        *self.slot.write().unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// False from a storage error until the store has been reopened.
    pub fn healthy(&self) -> bool {
        !self.failing.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Tries to reopen a failed store; true when it is usable again.
    pub fn recover(&self) -> bool {
        match self
            .db()
            .and_then(|db| Ok(db.begin_read()?.open_table(DEVICES).map(drop)?))
        {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(error = %e, "store still unavailable");
                self.storage_failed();
                false
            }
        }
    }

    fn prepare(db: &Database) -> Result<(), StoreError> {
        let txn = db.begin_write()?;
        txn.open_table(DEVICES)?;
        txn.open_table(EVENTS)?;
        {
            // Stores written before the run index existed get it built once.
            let mut index = txn.open_table(RUN_EVENTS)?;
            if index.is_empty()? {
                let ev = txn.open_table(EVENTS)?;
                for row in ev.iter()? {
                    let (k, v) = row?;
                    let (device, seq) = k.value();
                    if let Ok(r) = journal::decode(v.value()) {
                        index.insert((device, r.run_id.as_str(), seq), ())?;
                    }
                }
            }
        }
        txn.open_table(RUNS)?;
        txn.open_table(COMMANDS)?;
        txn.open_table(OUTBOX)?;
        txn.open_table(DEPLOYMENTS)?;
        txn.open_table(ROLLOUTS)?;
        txn.open_table(ACTIVE_ROLLOUTS)?;
        txn.open_table(DESIRED)?;
        txn.open_table(REPORTED)?;
        txn.open_table(COUNTERS)?;
        txn.open_table(DEFINITIONS)?;
        txn.open_table(EQUIPMENT)?;
        txn.open_table(QUARANTINE)?;
        txn.open_table(LINEAGE)?;
        txn.open_table(ARCHIVE)?;
        txn.open_table(GATEWAY_HEALTH)?;
        txn.open_table(GATEWAY_SECURITY)?;
        Self::prepare_operators(&txn)?;
        txn.commit()?;
        Ok(())
    }

    /// One row of a table keyed by a string.
    fn get_row<T: for<'de> Deserialize<'de>>(
        &self,
        table: TableDefinition<&str, &[u8]>,
        key: &str,
        what: &'static str,
    ) -> Result<Option<T>, StoreError> {
        let txn = self.db()?.begin_read()?;
        let t = txn.open_table(table)?;
        t.get(key)?.map(|v| dec(what, v.value())).transpose()
    }

    /// Writes one row of a table keyed by a string, in its own transaction.
    fn put_row<T: Serialize>(&self, table: TableDefinition<&str, &[u8]>, key: &str, row: &T) -> Result<(), StoreError> {
        let txn = self.db()?.begin_write()?;
        txn.open_table(table)?.insert(key, enc(row).as_slice())?;
        txn.commit()?;
        Ok(())
    }

    /// A device, if known.
    pub fn device(&self, id: &str) -> Result<Option<Device>, StoreError> {
        self.get_row(DEVICES, id, "device")
    }

    /// Every device.
    pub fn devices(&self) -> Result<Vec<(String, Device)>, StoreError> {
        let txn = self.db()?.begin_read()?;
        let t = txn.open_table(DEVICES)?;
        let mut out = Vec::new();
        for row in t.iter()? {
            let (k, v) = row?;
            out.push((k.value().to_string(), dec("device", v.value())?));
        }
        Ok(out)
    }

    fn update_device<R>(
        &self,
        id: &str,
        now: u64,
        f: impl FnOnce(&mut Device) -> R,
    ) -> Result<(Device, R), StoreError> {
        let txn = self.db()?.begin_write()?;
        let out = {
            let mut t = txn.open_table(DEVICES)?;
            let mut d: Device = match t.get(id)? {
                Some(v) => dec("device", v.value())?,
                None => new_device(&t, id, self.max_devices())?,
            };
            let r = f(&mut d);
            d.last_seen_ms = now;
            t.insert(id, enc(&d).as_slice())?;
            (d, r)
        };
        txn.commit()?;
        Ok(out)
    }

    /// A birth: decides what it means for the stored copy (`lineage::judge`) and applies it in
    /// one durable transaction: a stale birth changes nothing.
    pub fn birth(&self, id: &str, b: &Birth, now: u64) -> Result<BirthOutcome, StoreError> {
        let mut txn = self.db()?.begin_write()?;
        txn.set_durability(Durability::Immediate)?;
        let out = {
            let mut devices = txn.open_table(DEVICES)?;
            let mut lineages = txn.open_table(LINEAGE)?;
            let mut d: Device = match devices.get(id)? {
                Some(v) => dec("device", v.value())?,
                None => new_device(&devices, id, self.max_devices())?,
            };
            let mut lin: Lineage = match lineages.get(id)? {
                Some(v) => dec("lineage", v.value())?,
                None => Lineage::default(),
            };
            let facts = BirthFacts {
                epoch: b.epoch,
                journal_id: b.journal_id,
                announcement: b.announcement,
                resend_from: b.resend_from,
            };
            let verdict = lineage::judge(d.epoch, d.next_seq, &lin, facts);
            let mut archived = 0;
            if verdict.fresh {
                if let Some((from, reason)) = verdict.archive_from {
                    let mut stream = Stream::open(&txn)?;
                    archived = stream.archive_tail(id, from, &mut lin, reason, now)?;
                }
                if let Some((from, to)) = verdict.lost {
                    lin.lost_events += to - from;
                }
                if verdict.new_journal {
                    // The new journal counts its epochs from 1 again.
                    d.death_epoch = 0;
                    lin.replaced.push(lin.journal_id);
                    let excess = lin.replaced.len().saturating_sub(lineage::MAX_REPLACED);
                    lin.replaced.drain(..excess);
                }
                lin.journal_id = b.journal_id;
                lin.last_birth = lin.last_birth.max((b.epoch, b.announcement));
                if verdict.new_journal {
                    lin.last_birth = (b.epoch, b.announcement);
                }
                d.epoch = b.epoch;
                d.next_seq = verdict.next_seq;
                d.reported_last_seq = b.last_seq;
                d.agent_version = b.agent_version.clone();
                d.labels = b.labels.clone();
                lineages.insert(id, enc(&lin).as_slice())?;
                let mut security = txn.open_table(GATEWAY_SECURITY)?;
                if b.insecure.is_empty() && b.refused.is_empty() {
                    security.remove(id)?;
                } else {
                    let clip = |list: &[String]| list.iter().take(8).map(|w| protocol_clip(w)).collect();
                    let row = SecurityRow {
                        warnings: clip(&b.insecure),
                        refused: clip(&b.refused),
                    };
                    security.insert(id, enc(&row).as_slice())?;
                }
                let mut health = txn.open_table(GATEWAY_HEALTH)?;
                if b.storage_error.is_empty() {
                    health.remove(id)?;
                } else {
                    let since_ms = match health.get(id)? {
                        Some(v) => dec::<GatewayHealth>("gateway health", v.value())?.since_ms,
                        None => now,
                    };
                    let h = GatewayHealth {
                        storage_error: protocol_clip(&b.storage_error),
                        blocked_runs: b
                            .blocked_runs
                            .iter()
                            .take(outpost_shared::protocol::MAX_BLOCKED_RUNS_LISTED)
                            .cloned()
                            .collect(),
                        since_ms,
                    };
                    health.insert(id, enc(&h).as_slice())?;
                }
            }
            d.last_seen_ms = now;
            devices.insert(id, enc(&d).as_slice())?;
            BirthOutcome {
                device: d,
                verdict,
                archived,
            }
        };
        txn.commit()?;
        Ok(out)
    }

    /// What the device's newest birth says about its link's security (default: nothing).
    pub fn gateway_security(&self, id: &str) -> Result<SecurityRow, StoreError> {
        Ok(self
            .get_row::<SecurityRow>(GATEWAY_SECURITY, id, "gateway security")?
            .unwrap_or_default())
    }

    /// What the device's newest birth says about its journal's storage, while it fails.
    pub fn gateway_health(&self, id: &str) -> Result<Option<GatewayHealth>, StoreError> {
        self.get_row(GATEWAY_HEALTH, id, "gateway health")
    }

    /// Which journal a device's events come from, and what was set aside or lost.
    pub fn lineage(&self, id: &str) -> Result<Lineage, StoreError> {
        Ok(self.get_row(LINEAGE, id, "lineage")?.unwrap_or_default())
    }

    /// Events set aside for a device, by (archive number, seq).
    pub fn archived(&self, device: &str) -> Result<Vec<(u64, u64, Vec<u8>)>, StoreError> {
        let txn = self.db()?.begin_read()?;
        let t = txn.open_table(ARCHIVE)?;
        let mut out = Vec::new();
        for row in t.range((device, 0u64, 0u64)..=(device, u64::MAX, u64::MAX))? {
            let (k, v) = row?;
            let (_, n, seq) = k.value();
            out.push((n, seq, v.value().to_vec()));
        }
        Ok(out)
    }

    /// The quarantined (undecodable) records of a device, by sequence.
    pub fn quarantined(&self, device: &str) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        let txn = self.db()?.begin_read()?;
        let t = txn.open_table(QUARANTINE)?;
        let mut out = Vec::new();
        for row in t.range((device, 0)..=(device, u64::MAX))? {
            let (k, v) = row?;
            out.push((k.value().1, v.value().to_vec()));
        }
        Ok(out)
    }

    /// A death (Last Will): returns false when it is stale (an older epoch than the last birth).
    pub fn death(&self, id: &str, epoch: u64, now: u64) -> Result<bool, StoreError> {
        let (_, fresh) = self.update_device(id, now, |d| {
            d.death_epoch = d.death_epoch.max(epoch);
            epoch >= d.epoch
        })?;
        Ok(fresh)
    }

    /// Stores a batch up to its first gap and updates run mirrors, in one durable transaction.
    /// A redelivered event must equal the stored one: one that differs means the device's
    /// journal diverged there (restored from a backup), and the stored events from that
    /// sequence on are set aside for the device's own.
    pub fn store_events(&self, device: &str, events: &[WireEvent], now: u64) -> Result<Stored, StoreError> {
        let mut txn = self.db()?.begin_write()?;
        txn.set_durability(Durability::Immediate)?;
        let stored = {
            let mut devices = txn.open_table(DEVICES)?;
            let mut lineages = txn.open_table(LINEAGE)?;
            let mut st = Stream::open(&txn)?;
            let mut d: Device = match devices.get(device)? {
                Some(v) => dec("device", v.value())?,
                None => new_device(&devices, device, self.max_devices())?,
            };
            let mut s = Stored {
                new: 0,
                duplicates: 0,
                gap_from: None,
                next_seq: d.next_seq,
                quarantined: Vec::new(),
                diverged_from: None,
            };
            for e in events {
                if e.seq < d.next_seq {
                    if st.same_as_stored(device, e)? {
                        s.duplicates += 1;
                        continue;
                    }
                    let mut lin: Lineage = match lineages.get(device)? {
                        Some(v) => dec("lineage", v.value())?,
                        None => Lineage::default(),
                    };
                    let reason = "a resent event differs from the stored one (the device's journal was restored)";
                    st.archive_tail(device, e.seq, &mut lin, reason, now)?;
                    lineages.insert(device, enc(&lin).as_slice())?;
                    d.next_seq = e.seq;
                    s.diverged_from = Some(e.seq);
                }
                if e.seq > d.next_seq {
                    s.gap_from = Some(d.next_seq);
                    break;
                }
                let rec = match journal::decode(&e.record) {
                    Ok(r) => r,
                    Err(err) => {
                        st.quarantine.insert((device, e.seq), e.record.as_slice())?;
                        s.quarantined.push((e.seq, err.to_string()));
                        d.next_seq += 1;
                        continue;
                    }
                };
                st.ev.insert((device, e.seq), e.record.as_slice())?;
                st.index.insert((device, rec.run_id.as_str(), e.seq), ())?;
                let key = (device, rec.run_id.as_str());
                let mut m: Option<RunMirror> = st.runs.get(key)?.map(|v| dec("run", v.value())).transpose()?;
                fold(&mut m, &rec);
                if let Some(m) = m {
                    st.runs.insert(key, enc(&m).as_slice())?;
                }
                d.next_seq += 1;
                s.new += 1;
            }
            d.last_seen_ms = now;
            s.next_seq = d.next_seq;
            devices.insert(device, enc(&d).as_slice())?;
            s
        };
        txn.commit()?;
        Ok(stored)
    }

    /// A run mirror and its full history (seq, record).
    pub fn run(&self, device: &str, run: &str) -> Result<Option<(RunMirror, History)>, StoreError> {
        let txn = self.db()?.begin_read()?;
        let runs = txn.open_table(RUNS)?;
        let Some(m) = runs.get((device, run))? else {
            return Ok(None);
        };
        let m: RunMirror = dec("run", m.value())?;
        let ev = txn.open_table(EVENTS)?;
        let index = txn.open_table(RUN_EVENTS)?;
        let mut history = Vec::new();
        // The console reads a run on every live refresh: through the index, not a scan of the
        // device's whole history.
        for row in index.range((device, run, 0u64)..=(device, run, u64::MAX))? {
            let (k, _) = row?;
            let seq = k.value().2;
            if let Some(v) = ev.get((device, seq))? {
                let r = journal::decode(v.value()).map_err(|e| StoreError::Corrupt {
                    what: "event",
                    reason: format!("{device} #{seq}: {e}"),
                })?;
                history.push((seq, r));
            }
        }
        Ok(Some((m, history)))
    }

    /// Every run of a device.
    pub fn runs(&self, device: &str) -> Result<Vec<(String, RunMirror)>, StoreError> {
        let txn = self.db()?.begin_read()?;
        let runs = txn.open_table(RUNS)?;
        let mut out = Vec::new();
        for row in runs.range((device, "")..)? {
            let (k, v) = row?;
            let (d, r) = k.value();
            if d != device {
                break;
            }
            out.push((r.to_string(), dec("run", v.value())?));
        }
        Ok(out)
    }

    /// Events stored for a device, in order (for tests and exports).
    pub fn events(&self, device: &str) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        let txn = self.db()?.begin_read()?;
        let ev = txn.open_table(EVENTS)?;
        let mut out = Vec::new();
        for row in ev.range((device, 0u64)..=(device, u64::MAX))? {
            let (k, v) = row?;
            out.push((k.value().1, v.value().to_vec()));
        }
        Ok(out)
    }

    fn bump(t: &mut redb::Table<&str, u64>, key: &str) -> Result<u64, StoreError> {
        let n = t.get(key)?.map(|v| v.value()).unwrap_or(0) + 1;
        t.insert(key, n)?;
        Ok(n)
    }

    /// Counts a rejected message by reason.
    pub fn count(&self, counter: &str) -> Result<(), StoreError> {
        self.add_counts(&[(counter.to_string(), 1)])
    }

    /// Adds to several counters in one commit (the service batches its rejection counts, so a
    /// flood of bad messages costs one fsync a second, not one each).
    pub fn add_counts(&self, counts: &[(String, u64)]) -> Result<(), StoreError> {
        let txn = self.db()?.begin_write()?;
        {
            let mut t = txn.open_table(COUNTERS)?;
            for (key, by) in counts {
                let n = t.get(key.as_str())?.map(|v| v.value()).unwrap_or(0).saturating_add(*by);
                t.insert(key.as_str(), n)?;
            }
        }
        txn.commit()?;
        Ok(())
    }

    /// Every counter.
    pub fn counters(&self) -> Result<Vec<(String, u64)>, StoreError> {
        let txn = self.db()?.begin_read()?;
        let t = txn.open_table(COUNTERS)?;
        let mut out = Vec::new();
        for row in t.iter()? {
            let (k, v) = row?;
            out.push((k.value().to_string(), v.value()));
        }
        Ok(out)
    }

    /// Stores a new command for a device; it waits in the outbox until answered.
    pub fn add_command(
        &self,
        device: &str,
        id: &str,
        kind: CommandKind,
        now: u64,
    ) -> Result<CommandRecord, StoreError> {
        let txn = self.db()?.begin_write()?;
        let rec = {
            let mut cmds = txn.open_table(COMMANDS)?;
            if let Some(existing) = cmds.get((device, id))? {
                return dec("command", existing.value());
            }
            // An offline device's outbox only grows: bound it, and say so to whoever queues.
            let waiting = txn
                .open_table(OUTBOX)?
                .range((device, 0u64)..=(device, u64::MAX))?
                .take(MAX_PENDING_COMMANDS)
                .count();
            if waiting >= MAX_PENDING_COMMANDS {
                return Err(StoreError::Invalid(format!(
                    "device '{device}' already has {MAX_PENDING_COMMANDS} commands waiting for it (the limit); let it come online and answer them first"
                )));
            }
            let order = Self::bump(&mut txn.open_table(COUNTERS)?, "command_order")?;
            let rec = CommandRecord {
                order,
                kind,
                created_ms: now,
                state: "pending".into(),
                message: String::new(),
                detail: "{}".into(),
                answered_ms: None,
            };
            cmds.insert((device, id), enc(&rec).as_slice())?;
            txn.open_table(OUTBOX)?.insert((device, order), id)?;
            rec
        };
        txn.commit()?;
        Ok(rec)
    }

    /// A command.
    pub fn command(&self, device: &str, id: &str) -> Result<Option<CommandRecord>, StoreError> {
        let txn = self.db()?.begin_read()?;
        let t = txn.open_table(COMMANDS)?;
        t.get((device, id))?.map(|v| dec("command", v.value())).transpose()
    }

    /// Commands of a device waiting for an answer, oldest first.
    pub fn pending(&self, device: &str) -> Result<Vec<(String, CommandRecord)>, StoreError> {
        let txn = self.db()?.begin_read()?;
        let outbox = txn.open_table(OUTBOX)?;
        let cmds = txn.open_table(COMMANDS)?;
        let mut out = Vec::new();
        for row in outbox.range((device, 0u64)..=(device, u64::MAX))? {
            let (_, id) = row?;
            if let Some(c) = cmds.get((device, id.value()))? {
                out.push((id.value().to_string(), dec("command", c.value())?));
            }
        }
        Ok(out)
    }

    /// Commands waiting for any device, known to the store or not (queued for
    /// pre-provisioning): what the `pending_commands` gauge shows.
    pub fn pending_total(&self) -> Result<u64, StoreError> {
        let txn = self.db()?.begin_read()?;
        Ok(txn.open_table(OUTBOX)?.len()?)
    }

    /// Records a command's result; false when the command is unknown for this device.
    pub fn answer(&self, device: &str, r: &CommandResult, now: u64) -> Result<bool, StoreError> {
        let txn = self.db()?.begin_write()?;
        let known = {
            let mut cmds = txn.open_table(COMMANDS)?;
            let existing = cmds.get((device, r.id.as_str()))?.map(|v| v.value().to_vec());
            match existing {
                None => false,
                Some(bytes) => {
                    let mut c: CommandRecord = dec("command", &bytes)?;
                    // The first answer stands; a repeat (redelivery) changes nothing.
                    if c.answered_ms.is_none() {
                        c.state = match r.outcome {
                            Outcome::Applied | Outcome::Duplicate => "applied",
                            Outcome::Rejected => "rejected",
                        }
                        .into();
                        c.message = r.message.clone();
                        c.detail = r.detail.clone();
                        c.answered_ms = Some(now);
                        cmds.insert((device, r.id.as_str()), enc(&c).as_slice())?;
                        txn.open_table(OUTBOX)?.remove((device, c.order))?;
                        forget_old_answers(&mut cmds, device, KEEP_ANSWERED_COMMANDS)?;
                    }
                    true
                }
            }
        };
        txn.commit()?;
        Ok(known)
    }

    /// Marks a pending command superseded (a newer deployment replaced it).
    pub fn supersede(&self, device: &str, id: &str, by: &str, now: u64) -> Result<(), StoreError> {
        self.close_unanswered(device, id, "superseded", &format!("superseded by deployment {by}"), now)
    }

    /// Closes a command that is still unanswered (`state`: `superseded`, `withdrawn`, …) so it
    /// is never sent; an answered command is left as it is.
    pub fn close_unanswered(
        &self,
        device: &str,
        id: &str,
        state: &str,
        message: &str,
        now: u64,
    ) -> Result<(), StoreError> {
        let txn = self.db()?.begin_write()?;
        {
            let mut cmds = txn.open_table(COMMANDS)?;
            let existing = cmds.get((device, id))?.map(|v| v.value().to_vec());
            if let Some(bytes) = existing {
                let mut c: CommandRecord = dec("command", &bytes)?;
                if c.answered_ms.is_none() {
                    c.state = state.into();
                    c.message = message.into();
                    c.answered_ms = Some(now);
                    cmds.insert((device, id), enc(&c).as_slice())?;
                    txn.open_table(OUTBOX)?.remove((device, c.order))?;
                }
            }
        }
        txn.commit()?;
        Ok(())
    }

    /// Stores a deployment record.
    pub fn put_deployment(&self, id: &str, d: &Deployment) -> Result<(), StoreError> {
        self.put_row(DEPLOYMENTS, id, d)
    }

    /// The document a deployment sent, from the first of its devices' commands that holds it
    /// (every device gets the same one; a rollout keeps it in its row too).
    pub fn deployment_document(&self, id: &str, d: &Deployment) -> Result<Option<String>, StoreError> {
        for dev in &d.devices {
            if let Some(CommandKind::Deploy { document, .. }) =
                self.command(dev, &format!("{id}.{dev}"))?.map(|c| c.kind)
            {
                return Ok(Some(document));
            }
        }
        Ok(None)
    }

    /// A deployment.
    pub fn deployment(&self, id: &str) -> Result<Option<Deployment>, StoreError> {
        self.get_row(DEPLOYMENTS, id, "deployment")
    }

    /// Sets a device's desired document; returns the new version.
    pub fn set_desired(&self, device: &str, document: String, now: u64) -> Result<DesiredRow, StoreError> {
        let txn = self.db()?.begin_write()?;
        let row = {
            let mut t = txn.open_table(DESIRED)?;
            let version = match t.get(device)? {
                Some(v) => dec::<DesiredRow>("desired", v.value())?.version + 1,
                None => 1,
            };
            let row = DesiredRow {
                version,
                document,
                updated_ms: now,
            };
            t.insert(device, enc(&row).as_slice())?;
            row
        };
        txn.commit()?;
        Ok(row)
    }

    /// A device's desired document.
    pub fn desired(&self, device: &str) -> Result<Option<DesiredRow>, StoreError> {
        self.get_row(DESIRED, device, "desired")
    }

    /// Stores a device's reported document.
    /// A report for an older desired version than the stored one (a replay, or a delayed
    /// redelivery) is ignored: false.
    pub fn set_reported(&self, device: &str, row: &ReportedRow) -> Result<bool, StoreError> {
        if self
            .reported(device)?
            .is_some_and(|old| old.desired_version > row.desired_version)
        {
            return Ok(false);
        }
        self.put_row(REPORTED, device, row)?;
        Ok(true)
    }

    /// A device's reported document.
    pub fn reported(&self, device: &str) -> Result<Option<ReportedRow>, StoreError> {
        let txn = self.db()?.begin_read()?;
        let t = txn.open_table(REPORTED)?;
        let Some(v) = t.get(device)? else { return Ok(None) };
        let bytes = v.value();
        match dec::<ReportedRow>("reported", bytes) {
            Ok(r) => Ok(Some(r)),
            // Rows written before per-point verdicts are a prefix of today's layout.
            Err(e) => match row::decode::<ReportedRowV1>(bytes) {
                Ok(o) => Ok(Some(ReportedRow {
                    desired_version: o.desired_version,
                    document: o.document,
                    in_sync: o.in_sync,
                    message: o.message,
                    updated_ms: o.updated_ms,
                    points: Vec::new(),
                    verified_ms: 0,
                    drift_since_ms: None,
                })),
                Err(_) => Err(e),
            },
        }
    }

    /// Stores a device's inventory: its equipment list when given, and its definitions (upserted).
    pub fn put_inventory(&self, device: &str, inv: &Inventory) -> Result<(), StoreError> {
        let txn = self.db()?.begin_write()?;
        {
            if let Some(eq) = &inv.equipment {
                txn.open_table(EQUIPMENT)?.insert(device, enc(eq).as_slice())?;
            }
            let mut defs = txn.open_table(DEFINITIONS)?;
            for d in &inv.definitions {
                defs.insert((device, d.workflow.as_str(), d.version), d.document.as_str())?;
            }
            // A workflow deployed again and again keeps only its newest versions here.
            let mut names: Vec<&str> = inv.definitions.iter().map(|d| d.workflow.as_str()).collect();
            names.sort_unstable();
            names.dedup();
            for name in names {
                let versions: Vec<u32> = defs
                    .range((device, name, 0u32)..=(device, name, u32::MAX))?
                    .map(|r| r.map(|(k, _)| k.value().2))
                    .collect::<Result<_, _>>()?;
                for v in versions
                    .iter()
                    .take(versions.len().saturating_sub(KEEP_DEFINITION_VERSIONS))
                {
                    defs.remove((device, name, *v))?;
                }
            }
        }
        txn.commit()?;
        Ok(())
    }

    /// A device's equipment as (name, kind).
    pub fn equipment(&self, device: &str) -> Result<Vec<(String, String)>, StoreError> {
        Ok(self.get_row(EQUIPMENT, device, "equipment")?.unwrap_or_default())
    }

    /// The definition document (JSON text) a device holds for a workflow version.
    pub fn definition(&self, device: &str, workflow: &str, version: u32) -> Result<Option<String>, StoreError> {
        let txn = self.db()?.begin_read()?;
        let t = txn.open_table(DEFINITIONS)?;
        Ok(t.get((device, workflow, version))?.map(|v| v.value().to_string()))
    }

    /// The workflows a device holds as (name, newest version).
    pub fn workflows(&self, device: &str) -> Result<Vec<(String, u32)>, StoreError> {
        let txn = self.db()?.begin_read()?;
        let t = txn.open_table(DEFINITIONS)?;
        let mut out: Vec<(String, u32)> = Vec::new();
        for row in t.range((device, "", 0u32)..=(device, "\u{10FFFF}", u32::MAX))? {
            let (k, _) = row?;
            let (_, wf, v) = k.value();
            match out.last_mut() {
                Some((name, ver)) if name == wf => *ver = (*ver).max(v),
                _ => out.push((wf.to_string(), v)),
            }
        }
        Ok(out)
    }

    /// The newest `limit` commands of a device, answered or not, newest first.
    pub fn commands(&self, device: &str, limit: usize) -> Result<Vec<(String, CommandRecord)>, StoreError> {
        let txn = self.db()?.begin_read()?;
        let t = txn.open_table(COMMANDS)?;
        let mut out = Vec::new();
        for row in t.range((device, "")..=(device, "\u{10FFFF}"))? {
            let (k, v) = row?;
            out.push((k.value().1.to_string(), dec::<CommandRecord>("command", v.value())?));
        }
        out.sort_by_key(|c| std::cmp::Reverse(c.1.order));
        out.truncate(limit);
        Ok(out)
    }

    /// Forgets a device: its row and everything mirrored or queued for it (runs, events,
    /// commands, desired and reported state, inventory, lineage, archive), in one transaction.
    /// Deployments keep naming it. Returns how many events were removed.
    pub fn remove_device(&self, id: &str) -> Result<u64, StoreError> {
        const END: &str = "\u{10FFFF}";
        let txn = self.db()?.begin_write()?;
        let mut events = 0u64;
        {
            let mut t = txn.open_table(DEVICES)?;
            if t.remove(id)?.is_none() {
                return Err(StoreError::NotFound(format!("device '{id}' is not known")));
            }
            for table in [DESIRED, REPORTED, EQUIPMENT, LINEAGE, GATEWAY_SECURITY, GATEWAY_HEALTH] {
                txn.open_table(table)?.remove(id)?;
            }
            txn.open_table(EVENTS)?.retain_in((id, 0)..=(id, u64::MAX), |_, _| {
                events += 1;
                false
            })?;
            txn.open_table(QUARANTINE)?
                .retain_in((id, 0)..=(id, u64::MAX), |_, _| false)?;
            txn.open_table(OUTBOX)?
                .retain_in((id, 0)..=(id, u64::MAX), |_, _| false)?;
            txn.open_table(RUN_EVENTS)?
                .retain_in((id, "", 0)..=(id, END, u64::MAX), |_, _| false)?;
            txn.open_table(RUNS)?.retain_in((id, "")..=(id, END), |_, _| false)?;
            txn.open_table(COMMANDS)?
                .retain_in((id, "")..=(id, END), |_, _| false)?;
            txn.open_table(DEFINITIONS)?
                .retain_in((id, "", 0)..=(id, END, u32::MAX), |_, _| false)?;
            txn.open_table(ARCHIVE)?
                .retain_in((id, 0, 0)..=(id, u64::MAX, u64::MAX), |_, _| false)?;
        }
        txn.commit()?;
        Ok(events)
    }

    /// Stores a rollout's state (and whether it is still going, in the same transaction).
    pub fn put_rollout(&self, id: &str, r: &crate::rollout::Rollout) -> Result<(), StoreError> {
        let txn = self.db()?.begin_write()?;
        txn.open_table(ROLLOUTS)?.insert(id, enc(r).as_slice())?;
        {
            let mut active = txn.open_table(ACTIVE_ROLLOUTS)?;
            if r.phase.is_final() {
                active.remove(id)?;
            } else {
                active.insert(id, ())?;
            }
        }
        txn.commit()?;
        Ok(())
    }

    /// The rollouts still going (running or paused), by deployment id.
    pub fn active_rollouts(&self) -> Result<Vec<(String, crate::rollout::Rollout)>, StoreError> {
        let txn = self.db()?.begin_read()?;
        let (active, rows) = (txn.open_table(ACTIVE_ROLLOUTS)?, txn.open_table(ROLLOUTS)?);
        let mut out = Vec::new();
        for row in active.iter()? {
            let (k, _) = row?;
            if let Some(v) = rows.get(k.value())? {
                out.push((k.value().to_string(), dec("rollout", v.value())?));
            }
        }
        Ok(out)
    }

    /// A deployment's rollout, if it is sent wave by wave.
    pub fn rollout(&self, id: &str) -> Result<Option<crate::rollout::Rollout>, StoreError> {
        self.get_row(ROLLOUTS, id, "rollout")
    }

    /// Every deployment, newest first.
    pub fn deployments(&self) -> Result<Vec<(String, Deployment)>, StoreError> {
        let txn = self.db()?.begin_read()?;
        let t = txn.open_table(DEPLOYMENTS)?;
        let mut out = Vec::new();
        for row in t.iter()? {
            let (k, v) = row?;
            out.push((k.value().to_string(), dec::<Deployment>("deployment", v.value())?));
        }
        out.sort_by_key(|d| std::cmp::Reverse(d.1.created_ms));
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use outpost_shared::journal::Record;

    #[test]
    fn reported_rows_written_before_point_verdicts_still_read() {
        #[derive(Serialize)]
        struct Old(u64, String, bool, String, u64);
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("c.redb")).unwrap();
        let old = postcard::to_allocvec(&row::Row::V1(Old(2, "{}".into(), true, "ok".into(), 77))).unwrap();
        let txn = s.db().unwrap().begin_write().unwrap();
        txn.open_table(REPORTED).unwrap().insert("gw", old.as_slice()).unwrap();
        txn.commit().unwrap();
        let r = s.reported("gw").unwrap().unwrap();
        assert_eq!(
            (r.desired_version, r.in_sync, r.updated_ms, r.points.len()),
            (2, true, 77, 0)
        );
        assert!(
            r.in_sync_with(2) && !r.in_sync_with(3),
            "in sync only with the version it answers"
        );
        let mut new = r.clone();
        new.desired_version = 3;
        new.drift_since_ms = Some(5);
        assert!(s.set_reported("gw", &new).unwrap());
        assert_eq!(s.reported("gw").unwrap().unwrap(), new);
    }

    fn rec(run: &str, event: Event) -> Vec<u8> {
        journal::encode(&Record {
            run_id: run.into(),
            at_ms: 5,
            event,
        })
    }

    fn birth(epoch: u64, journal_id: u64, last_seq: u64, resend_from: u64) -> Birth {
        Birth {
            epoch,
            last_seq,
            announcement: 1,
            agent_version: "0.1".into(),
            labels: Vec::new(),
            journal_id,
            resend_from,
            storage_error: String::new(),
            blocked_runs: Vec::new(),
            insecure: Vec::new(),
            refused: Vec::new(),
        }
    }

    #[test]
    fn a_restored_gateway_journal_sets_the_stored_tail_aside_and_refolds_its_runs() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("c.redb")).unwrap();
        let ev = |seq, r: Vec<u8>| WireEvent { seq, record: r };
        s.birth("gw", &birth(1, 7, 0, 1), 0).unwrap();
        let done = |r: &str| rec(r, Event::RunCompleted { output: "1".into() });
        s.store_events(
            "gw",
            &[
                ev(1, started("r1")),
                ev(2, started("r2")),
                ev(3, done("r1")),
                ev(4, done("r2")),
            ],
            0,
        )
        .unwrap();
        // The journal came back from a backup taken after event 2; its own event 3 differs.
        let o = s.birth("gw", &birth(2, 7, 2, 1), 9).unwrap();
        assert_eq!(
            (o.archived, o.device.next_seq),
            (0, 5),
            "a birth alone sets nothing aside"
        );
        let cancel = rec("r2", Event::RunCancelled { reason: "x".into() });
        let c = s
            .store_events("gw", &[ev(2, started("r2")), ev(3, cancel)], 10)
            .unwrap();
        assert_eq!((c.diverged_from, c.new, c.duplicates, c.next_seq), (Some(3), 1, 1, 4));
        assert_eq!(
            s.run("gw", "r1").unwrap().unwrap().0.status,
            RunStatus::Running,
            "refolded without its end"
        );
        assert_eq!(s.run("gw", "r2").unwrap().unwrap().0.status, RunStatus::Cancelled);
        let lin = s.lineage("gw").unwrap();
        assert_eq!((lin.archives, lin.archived_events), (1, 2));
        assert_eq!(
            s.archived("gw").unwrap().iter().map(|a| a.1).collect::<Vec<_>>(),
            vec![3, 4]
        );
    }

    #[test]
    fn a_resent_event_that_differs_marks_where_the_journals_diverged() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("c.redb")).unwrap();
        let ev = |seq, r: Vec<u8>| WireEvent { seq, record: r };
        s.store_events(
            "gw",
            &[ev(1, started("r1")), ev(2, started("r2")), ev(3, started("r3"))],
            0,
        )
        .unwrap();
        // Same length, other content from 2 on: the journal was restored and wrote again.
        let d = s
            .store_events(
                "gw",
                &[ev(1, started("r1")), ev(2, started("r4")), ev(3, started("r5"))],
                0,
            )
            .unwrap();
        assert_eq!((d.diverged_from, d.new, d.duplicates, d.next_seq), (Some(2), 2, 1, 4));
        let runs: Vec<String> = s.runs("gw").unwrap().into_iter().map(|r| r.0).collect();
        assert_eq!(runs, ["r1", "r4", "r5"]);
        assert_eq!(s.lineage("gw").unwrap().archived_events, 2);
    }

    #[test]
    fn a_new_journal_under_the_same_id_starts_a_new_stream_and_is_online() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("c.redb")).unwrap();
        let ev = |seq, r: Vec<u8>| WireEvent { seq, record: r };
        s.birth("gw", &birth(40, 7, 0, 1), 0).unwrap();
        s.store_events("gw", &[ev(1, started("r1"))], 0).unwrap();
        s.death("gw", 40, 1).unwrap();
        let o = s.birth("gw", &birth(1, 8, 0, 1), 2).unwrap();
        assert!(o.verdict.new_journal && o.device.online());
        assert_eq!((o.device.next_seq, o.archived), (1, 1));
        assert!(s.runs("gw").unwrap().is_empty());
    }

    #[test]
    fn a_restored_store_counts_what_the_journal_already_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("c.redb")).unwrap();
        let o = s.birth("gw", &birth(5, 7, 300, 120), 0).unwrap();
        assert_eq!((o.device.next_seq, o.verdict.lost), (120, Some((1, 120))));
        assert_eq!(s.lineage("gw").unwrap().lost_events, 119);
    }

    fn started(run: &str) -> Vec<u8> {
        rec(
            run,
            Event::RunStarted {
                workflow: "w".into(),
                version: 2,
                input: "{}".into(),
            },
        )
    }

    #[test]
    fn batches_store_once_in_order_and_stop_at_a_gap() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("c.redb")).unwrap();
        let ev = |seq, r: Vec<u8>| WireEvent { seq, record: r };
        let a = s
            .store_events("gw", &[ev(1, started("r1")), ev(2, started("r2"))], 0)
            .unwrap();
        assert_eq!((a.new, a.next_seq, a.gap_from), (2, 3, None));
        // Redelivery of 2 plus 3: 2 is a duplicate.
        let done = rec("r1", Event::RunCompleted { output: "1".into() });
        let b = s.store_events("gw", &[ev(2, started("r2")), ev(3, done)], 0).unwrap();
        assert_eq!((b.new, b.duplicates, b.next_seq), (1, 1, 4));
        // A batch starting at 6 leaves a gap at 4.
        let c = s.store_events("gw", &[ev(6, started("r3"))], 0).unwrap();
        assert_eq!((c.new, c.gap_from, c.next_seq), (0, Some(4), 4));
        let (m, h) = s.run("gw", "r1").unwrap().unwrap();
        assert_eq!((m.status.as_str(), m.version, h.len()), ("completed", 2, 2));
        assert_eq!(s.runs("gw").unwrap().len(), 2);
    }

    #[test]
    fn a_store_from_before_the_run_index_gets_it_built_on_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.redb");
        let s = Store::open(&path).unwrap();
        let ev = |seq, r: Vec<u8>| WireEvent { seq, record: r };
        s.store_events("gw", &[ev(1, started("r1")), ev(2, started("r2"))], 0)
            .unwrap();
        let txn = s.db().unwrap().begin_write().unwrap();
        txn.delete_table(RUN_EVENTS).unwrap();
        txn.commit().unwrap();
        drop(s);
        let s = Store::open(&path).unwrap();
        let (_, h) = s.run("gw", "r2").unwrap().unwrap();
        assert_eq!(h.iter().map(|(seq, _)| *seq).collect::<Vec<_>>(), vec![2]);
    }

    /// A file whose writes fail like a full disk while `full` is set.
    #[derive(Debug)]
    struct FullDisk {
        inner: redb::backends::FileBackend,
        full: std::sync::Arc<std::sync::atomic::AtomicBool>,
    }

    impl FullDisk {
        fn check(&self) -> Result<(), std::io::Error> {
            if self.full.load(std::sync::atomic::Ordering::SeqCst) {
                Err(std::io::Error::new(
                    std::io::ErrorKind::StorageFull,
                    "no space left (injected)",
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

    #[test]
    fn a_full_disk_fails_the_batch_and_the_store_reopens_when_space_returns() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.redb");
        let full = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let f = full.clone();
        let s = Store::open_with(Box::new(move || {
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)
                .map_err(|e| StoreError::Storage(redb::StorageError::Io(e).into()))?;
            let backend = FullDisk {
                inner: redb::backends::FileBackend::new(file)?,
                full: f.clone(),
            };
            Ok(Database::builder().create_with_backend(backend)?)
        }))
        .unwrap();
        let ev = |seq, r: Vec<u8>| WireEvent { seq, record: r };
        s.store_events("gw", &[ev(1, started("r1"))], 0).unwrap();
        full.store(true, std::sync::atomic::Ordering::SeqCst);
        let e = s.store_events("gw", &[ev(2, started("r2"))], 0).unwrap_err();
        assert!(matches!(e, StoreError::Storage(_)), "{e}");
        s.storage_failed();
        assert!(!s.healthy());
        assert!(!s.recover(), "still full");
        assert!(!s.healthy());
        full.store(false, std::sync::atomic::Ordering::SeqCst);
        assert!(s.recover());
        assert!(s.healthy());
        let again = s.store_events("gw", &[ev(2, started("r2"))], 0).unwrap();
        assert_eq!((again.new, again.next_seq), (1, 3), "nothing acked is missing, no gap");
        assert_eq!(s.runs("gw").unwrap().len(), 2);
    }

    #[test]
    fn stale_deaths_are_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("c.redb")).unwrap();
        s.birth("gw", &birth(2, 1, 0, 1), 1).unwrap();
        assert!(!s.death("gw", 1, 2).unwrap(), "a will from epoch 1 is stale");
        assert!(s.device("gw").unwrap().unwrap().online());
        assert!(s.death("gw", 2, 3).unwrap());
        assert!(!s.device("gw").unwrap().unwrap().online());
        s.birth("gw", &birth(3, 1, 0, 1), 4).unwrap();
        assert!(s.device("gw").unwrap().unwrap().online());
    }

    #[test]
    fn new_devices_past_the_limit_are_refused_and_known_ones_go_on() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("c.redb")).unwrap();
        s.set_max_devices(2);
        s.birth("a", &birth(1, 1, 0, 1), 1).unwrap();
        s.store_events(
            "b",
            &[WireEvent {
                seq: 1,
                record: started("r"),
            }],
            1,
        )
        .unwrap();
        let e = s.birth("c", &birth(1, 1, 0, 1), 1).unwrap_err();
        assert!(matches!(e, StoreError::DeviceLimit(_)), "{e}");
        assert!(e.to_string().contains("already holds 2 devices"), "{e}");
        assert!(
            s.store_events(
                "c",
                &[WireEvent {
                    seq: 1,
                    record: started("r")
                }],
                1
            )
            .is_err()
        );
        assert!(s.device("c").unwrap().is_none());
        s.birth("a", &birth(2, 1, 0, 1), 2).unwrap();
        s.store_events(
            "b",
            &[WireEvent {
                seq: 2,
                record: started("r2"),
            }],
            2,
        )
        .unwrap();
    }

    #[test]
    fn old_answered_commands_are_forgotten_past_the_bound() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("c.redb")).unwrap();
        let kind = CommandKind::Cancel {
            run_id: "r".into(),
            reason: "x".into(),
        };
        let answer = |id: &str| CommandResult {
            id: id.into(),
            outcome: Outcome::Applied,
            message: String::new(),
            detail: String::new(),
        };
        let n = KEEP_ANSWERED_COMMANDS + KEEP_ANSWERED_COMMANDS / 10 + 1;
        for i in 0..n {
            let id = format!("c{i:05}");
            s.add_command("gw", &id, kind.clone(), 0).unwrap();
            s.answer("gw", &answer(&id), 1).unwrap();
        }
        s.add_command("gw", "waiting", kind, 0).unwrap();
        let all = s.commands("gw", usize::MAX).unwrap();
        assert_eq!(
            all.len(),
            KEEP_ANSWERED_COMMANDS + 1,
            "the newest answers and the pending one stay"
        );
        assert!(
            s.command("gw", "c00000").unwrap().is_none(),
            "the oldest answer is gone"
        );
        assert!(s.command("gw", &format!("c{:05}", n - 1)).unwrap().is_some());
        assert_eq!(s.pending("gw").unwrap().len(), 1);
    }

    #[test]
    fn a_device_keeps_only_the_newest_versions_of_a_workflow() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("c.redb")).unwrap();
        let info = |v: u32| outpost_shared::protocol::DefinitionInfo {
            workflow: "w".into(),
            version: v,
            document: "{}".into(),
        };
        for chunk in (1..=250u32).collect::<Vec<_>>().chunks(50) {
            let inv = Inventory {
                equipment: None,
                definitions: chunk.iter().map(|v| info(*v)).collect(),
            };
            s.put_inventory("gw", &inv).unwrap();
        }
        assert!(s.definition("gw", "w", 150).unwrap().is_none());
        assert!(s.definition("gw", "w", 151).unwrap().is_some());
        assert!(s.definition("gw", "w", 250).unwrap().is_some());
    }

    #[test]
    fn an_offline_devices_outbox_is_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("c.redb")).unwrap();
        let kind = CommandKind::Cancel {
            run_id: "r".into(),
            reason: "x".into(),
        };
        for i in 0..MAX_PENDING_COMMANDS {
            s.add_command("gw", &format!("c{i}"), kind.clone(), 0).unwrap();
        }
        let e = s.add_command("gw", "one-more", kind.clone(), 0).unwrap_err();
        assert!(e.to_string().contains("already has 1000 commands waiting"), "{e}");
        // A repeat of a queued id is still just that command; another device is not affected.
        assert!(s.add_command("gw", "c0", kind.clone(), 0).is_ok());
        assert!(s.add_command("gw2", "c0", kind, 0).is_ok());
    }

    #[test]
    fn commands_wait_until_answered_and_the_first_answer_stands() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("c.redb")).unwrap();
        let kind = CommandKind::Cancel {
            run_id: "r".into(),
            reason: "x".into(),
        };
        s.add_command("gw", "c1", kind.clone(), 0).unwrap();
        s.add_command("gw", "c2", kind, 0).unwrap();
        assert_eq!(s.pending("gw").unwrap().len(), 2);
        let r = CommandResult {
            id: "c1".into(),
            outcome: Outcome::Rejected,
            message: "no such run".into(),
            detail: "{}".into(),
        };
        assert!(s.answer("gw", &r, 1).unwrap());
        let again = CommandResult {
            outcome: Outcome::Applied,
            ..r.clone()
        };
        assert!(s.answer("gw", &again, 2).unwrap());
        assert_eq!(s.command("gw", "c1").unwrap().unwrap().state, "rejected");
        assert_eq!(s.pending("gw").unwrap().len(), 1);
        assert!(
            !s.answer("other", &r, 3).unwrap(),
            "a result from the wrong device is refused"
        );
    }
}
