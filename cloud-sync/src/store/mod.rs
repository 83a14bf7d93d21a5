//! The fleet store (redb, or Postgres for several replicas): devices, a mirror of every run with its full history, commands,
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
use redb::Database;
use serde::{Deserialize, Serialize};

use crate::lineage::{self, ArchiveNote, BirthFacts, Lineage, Verdict};

mod operators;
mod postgres;
mod redb_backend;
mod tables;

pub use operators::{AuditFilter, AuditRow, TokenRow, UserRow};
pub use redb_backend::Opener;
use tables::{Dir, Owned, Part, Part::Num, Part::Str, T, Txn, TxnExt};

/// Most commands that wait for one device.
pub const MAX_PENDING_COMMANDS: usize = 1000;
/// A device's runs counted: what the fleet page shows without reading any run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunCounts {
    /// Runs mirrored.
    pub runs: u64,
    /// Runs still going.
    pub active: u64,
    /// Runs that ended badly (`ended_badly`).
    pub failed: u64,
    /// Events mirrored for these runs (what cloud-side retention bounds).
    pub events: u64,
}

impl RunCounts {
    /// Counts `m` in (`add`) or out.
    fn tally(&mut self, m: &RunMirror, add: bool) {
        let step = |n: &mut u64| *n = if add { n.saturating_add(1) } else { n.saturating_sub(1) };
        step(&mut self.runs);
        self.events = if add {
            self.events.saturating_add(m.events)
        } else {
            self.events.saturating_sub(m.events)
        };
        if !m.status.is_terminal() {
            step(&mut self.active);
        }
        if ended_badly(m.status) {
            step(&mut self.failed);
        }
    }

    /// Replaces `before` by `after` in the counts.
    fn change(&mut self, before: Option<&RunMirror>, after: Option<&RunMirror>) {
        if let Some(b) = before {
            self.tally(b, false);
        }
        if let Some(a) = after {
            self.tally(a, true);
        }
    }
}

/// How much mirrored history the cloud keeps per device (`outpost-cloud --keep-events-per-device`,
/// `--keep-ended-runs-for`); the gateway's own journal has its own retention.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// Most events kept per device; older ended runs go first.
    pub events: u64,
    /// Ended runs that ended before this (ms since the epoch) go; 0 keeps them.
    pub ended_before_ms: u64,
}

/// What a prune removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pruned {
    /// Runs forgotten.
    pub runs: u64,
    /// Their events.
    pub events: u64,
}

/// True for runs that ended badly: failed, compensated, or failed while compensating.
pub fn ended_badly(status: RunStatus) -> bool {
    matches!(
        status,
        RunStatus::Failed | RunStatus::CompensationFailed | RunStatus::Compensated
    )
}

/// What a gateway says about its link's security.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecurityRow {
    /// What is insecure about its link.
    pub warnings: Vec<String>,
    /// The newest messages it refused for their signature.
    pub refused: Vec<String>,
}

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
    /// The database server cannot be reached or failed (Postgres).
    #[error("store: {0}")]
    Unavailable(String),
    /// A concurrent transaction conflicted (Postgres serialisation failure); the store retries
    /// these itself and returns this only when retries ran out.
    #[error("store: {0}")]
    Conflict(String),
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

/// A counter's stored value (8 little-endian bytes; anything else reads as 0).
pub(crate) fn counter_value(bytes: &[u8]) -> u64 {
    bytes.try_into().map(u64::from_le_bytes).unwrap_or(0)
}

/// One row, decoded.
fn get_row<R: for<'de> Deserialize<'de>>(
    tx: &mut dyn Txn,
    t: T,
    key: &[Part<'_>],
    what: &'static str,
) -> Result<Option<R>, StoreError> {
    tx.get(t, key)?.map(|v| dec(what, &v)).transpose()
}

/// Writes one row, encoded.
fn put_row<R: Serialize>(tx: &mut dyn Txn, t: T, key: &[Part<'_>], row: &R) -> Result<(), StoreError> {
    tx.put(t, key, &enc(row))
}

/// Removes and returns a device's rows of `t` from sequence `from` on.
fn take_tail(tx: &mut dyn Txn, t: T, device: &str, from: u64) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
    let mut rows = Vec::new();
    tx.scan(t, &[Str(device)], Some(from), Dir::Up, &mut |k, v| {
        rows.push((k.get(1).map_or(0, Owned::num), v.to_vec()));
        Ok(true)
    })?;
    for (seq, _) in &rows {
        tx.remove(t, &[Str(device), Num(*seq)])?;
    }
    Ok(rows)
}

/// True when a redelivered event equals what is stored under its sequence (or nothing is
/// stored there to compare: a range recorded as lost).
fn same_as_stored(tx: &mut dyn Txn, device: &str, e: &WireEvent) -> Result<bool, StoreError> {
    let key = [Str(device), Num(e.seq)];
    if let Some(v) = tx.get(T::Events, &key)? {
        return Ok(v == e.record);
    }
    if let Some(v) = tx.get(T::Quarantine, &key)? {
        return Ok(v == e.record);
    }
    Ok(true)
}

/// Moves every stored event of `device` from `from` on into a new archive and folds the
/// affected run mirrors again from what stays (a run left with no events goes).
fn archive_tail(
    tx: &mut dyn Txn,
    device: &str,
    from: u64,
    lin: &mut Lineage,
    reason: &str,
    now: u64,
) -> Result<u64, StoreError> {
    let no = lin.archives + 1;
    let mut moved = 0u64;
    let mut touched = std::collections::BTreeSet::new();
    for (seq, bytes) in take_tail(tx, T::Events, device, from)? {
        tx.put(T::Archive, &[Str(device), Num(no), Num(seq)], &bytes)?;
        if let Ok(r) = journal::decode(&bytes) {
            tx.remove(T::RunEvents, &[Str(device), Str(&r.run_id), Num(seq)])?;
            touched.insert(r.run_id);
        }
        moved += 1;
    }
    for (seq, bytes) in take_tail(tx, T::Quarantine, device, from)? {
        tx.put(T::Archive, &[Str(device), Num(no), Num(seq)], &bytes)?;
        moved += 1;
    }
    for run in &touched {
        let seqs: Vec<u64> = tx
            .rows(T::RunEvents, &[Str(device), Str(run)])?
            .iter()
            .map(|(k, _)| k.get(2).map_or(0, Owned::num))
            .collect();
        let mut m = None;
        for seq in seqs {
            if let Some(v) = tx.get(T::Events, &[Str(device), Num(seq)])?
                && let Ok(r) = journal::decode(&v)
            {
                fold(&mut m, &r);
            }
        }
        let before: Option<RunMirror> = get_row(tx, T::Runs, &[Str(device), Str(run)], "run")?;
        let mut counts: RunCounts = get_row(tx, T::DeviceCounts, &[Str(device)], "run counts")?.unwrap_or_default();
        counts.change(before.as_ref(), m.as_ref());
        put_row(tx, T::DeviceCounts, &[Str(device)], &counts)?;
        match m {
            Some(m) => put_row(tx, T::Runs, &[Str(device), Str(run)], &m)?,
            None => {
                tx.remove(T::Runs, &[Str(device), Str(run)])?;
            }
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

/// A run's events with their device sequence numbers, oldest first.
pub type History = Vec<(u64, journal::Record)>;

/// Where the store keeps its tables.
enum Backend {
    /// One redb file (the embedded default).
    Redb(redb_backend::Redb),
    /// A Postgres database shared by every replica.
    Postgres(Box<postgres::Postgres>),
}

/// The store.
pub struct Store {
    backend: Backend,
    /// Most devices the store takes (`--max-devices`): anyone who may publish on the broker can
    /// make up device ids.
    max_devices: std::sync::atomic::AtomicU64,
}

/// A lock held across replicas (`Store::lock_across_replicas`), released when dropped.
pub struct ReplicaLock(#[allow(dead_code)] Option<postgres::Held>);

/// Answered commands kept per device (newest first; deployment commands are kept with their
/// deployment). Older answers go when a new one arrives.
pub const KEEP_ANSWERED_COMMANDS: usize = 1000;

/// Deletes a device's oldest answered commands beyond `keep` (not deployment commands, which a
/// deployment's view reads), once there are a tenth more than that, so it runs rarely.
fn forget_old_answers(tx: &mut dyn Txn, device: &str, keep: usize) -> Result<(), StoreError> {
    let mut answered: Vec<(u64, String)> = Vec::new();
    tx.scan(T::Commands, &[Str(device)], None, Dir::Up, &mut |k, v| {
        let c: CommandRecord = dec("command", v)?;
        if c.answered_ms.is_some() && !matches!(c.kind, CommandKind::Deploy { .. }) {
            answered.push((c.order, k.get(1).map_or("", Owned::text).to_string()));
        }
        Ok(true)
    })?;
    if answered.len() <= keep + keep / 10 {
        return Ok(());
    }
    answered.sort_unstable_by_key(|a| std::cmp::Reverse(a.0));
    for (_, id) in answered.into_iter().skip(keep) {
        tx.remove(T::Commands, &[Str(device), Str(&id)])?;
    }
    Ok(())
}

/// Versions of one workflow kept per device (the newest); a run of an older one shows no graph.
pub const KEEP_DEFINITION_VERSIONS: usize = 100;

/// Default for `Store::set_max_devices`.
pub const DEFAULT_MAX_DEVICES: u64 = 10_000;

/// A device row for an id seen for the first time, if the store has room for one more.
fn new_device(tx: &mut dyn Txn, id: &str, max: u64) -> Result<Device, StoreError> {
    let n = tx.len(T::Devices)?;
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

/// A device's row, or a new one (within the device limit).
fn device_or_new(tx: &mut dyn Txn, id: &str, max: u64) -> Result<Device, StoreError> {
    match get_row(tx, T::Devices, &[Str(id)], "device")? {
        Some(d) => Ok(d),
        None => new_device(tx, id, max),
    }
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
        Self::with_backend(Backend::Redb(redb_backend::Redb::open_with(opener)?))
    }

    /// Connects to the Postgres database at `url` (`postgres://user@host:port/db`) and applies
    /// the schema migrations it lacks.
    pub fn connect(url: &str) -> Result<Store, StoreError> {
        Self::with_backend(Backend::Postgres(Box::new(postgres::Postgres::connect(url)?)))
    }

    /// Opens the store `spec` names: a `postgres://` or `postgresql://` URL, else a redb file.
    pub fn open_spec(spec: &str) -> Result<Store, StoreError> {
        if spec.starts_with("postgres://") || spec.starts_with("postgresql://") {
            Self::connect(spec)
        } else {
            Self::open(Path::new(spec))
        }
    }

    fn with_backend(backend: Backend) -> Result<Store, StoreError> {
        let store = Store {
            backend,
            max_devices: std::sync::atomic::AtomicU64::new(DEFAULT_MAX_DEVICES),
        };
        store.count_runs_once()?;
        Ok(store)
    }

    /// The redb database under a redb store (tests reach past the store's interface with it).
    #[cfg(test)]
    fn db(&self) -> Result<std::sync::Arc<Database>, StoreError> {
        match &self.backend {
            Backend::Redb(b) => b.db(),
            Backend::Postgres(_) => Err(StoreError::Invalid("not a redb store".into())),
        }
    }

    /// Where the store is, for logs and `/v1/health`: `redb` or `postgres host:port/db`.
    pub fn location(&self) -> String {
        match &self.backend {
            Backend::Redb(_) => "redb".into(),
            Backend::Postgres(p) => format!("postgres {}", p.target()),
        }
    }

    /// Which backend holds the store (`redb` or `postgres`), for logs and `/v1/health`.
    pub fn kind(&self) -> &'static str {
        match self.backend {
            Backend::Redb(_) => "redb",
            Backend::Postgres(_) => "postgres",
        }
    }

    /// Sets the most devices the store takes; births and events of further new ids are refused.
    pub fn set_max_devices(&self, max: u64) {
        self.max_devices.store(max, std::sync::atomic::Ordering::Relaxed);
    }

    fn max_devices(&self) -> u64 {
        self.max_devices.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Calls `f` whenever any replica on this store announces a change (Postgres `LISTEN`);
    /// a redb store has no other writer, so nothing to hear.
    pub fn on_change(&self, f: Box<dyn Fn() + Send + Sync>) {
        if let Backend::Postgres(p) = &self.backend {
            p.on_change(f);
        }
    }

    /// Tells the other replicas the store changed (Postgres `NOTIFY`), so their consoles
    /// refresh; nothing on redb.
    pub fn announce_change(&self) {
        if let Backend::Postgres(p) = &self.backend {
            p.notify();
        }
    }

    /// Holds `name` exclusively across every replica on this store until the guard drops (a
    /// Postgres advisory lock; a redb store has one process, so nothing to wait for). The
    /// rollout steps take it: two replicas never move one rollout from the same state.
    pub fn lock_across_replicas(&self, name: &str) -> Result<ReplicaLock, StoreError> {
        match &self.backend {
            Backend::Redb(_) => Ok(ReplicaLock(None)),
            Backend::Postgres(p) => {
                // FNV-1a: a stable key for the name.
                let key = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
                    (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
                });
                Ok(ReplicaLock(Some(p.lock(key as i64)?)))
            }
        }
    }

    /// Runs `f` on a consistent snapshot.
    fn read<R>(&self, f: impl FnOnce(&mut dyn Txn) -> Result<R, StoreError>) -> Result<R, StoreError> {
        match &self.backend {
            Backend::Redb(b) => b.read(f),
            Backend::Postgres(b) => b.read(f),
        }
    }

    /// Runs `f` in one durable, serialisable write transaction, committed when it returns `Ok`.
    /// On Postgres `f` may run again when a concurrent replica's transaction conflicts, so it
    /// must act only through the transaction.
    fn write<R>(&self, mut f: impl FnMut(&mut dyn Txn) -> Result<R, StoreError>) -> Result<R, StoreError> {
        match &self.backend {
            Backend::Redb(b) => b.write(f),
            Backend::Postgres(b) => b.write(&mut f),
        }
    }

    /// After a storage error: drop the connection or file so the next call opens it again.
    pub fn storage_failed(&self) {
        match &self.backend {
            Backend::Redb(b) => b.storage_failed(),
            Backend::Postgres(b) => b.storage_failed(),
        }
    }

    /// False from a storage error until the store has been reopened.
    pub fn healthy(&self) -> bool {
        match &self.backend {
            Backend::Redb(b) => b.healthy(),
            Backend::Postgres(b) => b.healthy(),
        }
    }

    /// Tries to reopen a failed store; true when it is usable again.
    pub fn recover(&self) -> bool {
        match &self.backend {
            Backend::Redb(b) => b.recover(),
            Backend::Postgres(b) => b.recover(),
        }
    }

    /// One row of a table keyed by a string.
    fn get_one<R: for<'de> Deserialize<'de>>(
        &self,
        t: T,
        key: &str,
        what: &'static str,
    ) -> Result<Option<R>, StoreError> {
        self.read(|tx| get_row(tx, t, &[Str(key)], what))
    }

    /// Writes one row of a table keyed by a string, in its own transaction.
    fn put_one<R: Serialize>(&self, t: T, key: &str, row: &R) -> Result<(), StoreError> {
        let bytes = enc(row);
        self.write(|tx| tx.put(t, &[Str(key)], &bytes))
    }

    /// Every row of a table keyed by a string, in key order.
    fn all_rows<R: for<'de> Deserialize<'de>>(&self, t: T, what: &'static str) -> Result<Vec<(String, R)>, StoreError> {
        self.read(|tx| {
            let mut out = Vec::new();
            tx.scan(t, &[], None, Dir::Up, &mut |k, v| {
                out.push((k.first().map_or("", Owned::text).to_string(), dec(what, v)?));
                Ok(true)
            })?;
            Ok(out)
        })
    }

    /// A device, if known.
    pub fn device(&self, id: &str) -> Result<Option<Device>, StoreError> {
        self.get_one(T::Devices, id, "device")
    }

    /// Every device.
    pub fn devices(&self) -> Result<Vec<(String, Device)>, StoreError> {
        self.all_rows(T::Devices, "device")
    }

    fn update_device<R>(&self, id: &str, now: u64, f: impl Fn(&mut Device) -> R) -> Result<(Device, R), StoreError> {
        let max = self.max_devices();
        self.write(|tx| {
            let mut d = device_or_new(tx, id, max)?;
            let r = f(&mut d);
            d.last_seen_ms = now;
            put_row(tx, T::Devices, &[Str(id)], &d)?;
            Ok((d, r))
        })
    }

    /// A birth: decides what it means for the stored copy (`lineage::judge`) and applies it in
    /// one durable transaction: a stale birth changes nothing.
    pub fn birth(&self, id: &str, b: &Birth, now: u64) -> Result<BirthOutcome, StoreError> {
        let max = self.max_devices();
        self.write(|tx| {
            let mut d = device_or_new(tx, id, max)?;
            let mut lin: Lineage = get_row(tx, T::Lineage, &[Str(id)], "lineage")?.unwrap_or_default();
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
                    archived = archive_tail(tx, id, from, &mut lin, reason, now)?;
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
                put_row(tx, T::Lineage, &[Str(id)], &lin)?;
                if b.insecure.is_empty() && b.refused.is_empty() {
                    tx.remove(T::GatewaySecurity, &[Str(id)])?;
                } else {
                    let clip = |list: &[String]| list.iter().take(8).map(|w| protocol_clip(w)).collect();
                    let row = SecurityRow {
                        warnings: clip(&b.insecure),
                        refused: clip(&b.refused),
                    };
                    put_row(tx, T::GatewaySecurity, &[Str(id)], &row)?;
                }
                if b.storage_error.is_empty() {
                    tx.remove(T::GatewayHealth, &[Str(id)])?;
                } else {
                    let since_ms = get_row::<GatewayHealth>(tx, T::GatewayHealth, &[Str(id)], "gateway health")?
                        .map_or(now, |h| h.since_ms);
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
                    put_row(tx, T::GatewayHealth, &[Str(id)], &h)?;
                }
            }
            d.last_seen_ms = now;
            put_row(tx, T::Devices, &[Str(id)], &d)?;
            Ok(BirthOutcome {
                device: d,
                verdict,
                archived,
            })
        })
    }

    /// What the device's newest birth says about its link's security (default: nothing).
    pub fn gateway_security(&self, id: &str) -> Result<SecurityRow, StoreError> {
        Ok(self
            .get_one::<SecurityRow>(T::GatewaySecurity, id, "gateway security")?
            .unwrap_or_default())
    }

    /// What the device's newest birth says about its journal's storage, while it fails.
    pub fn gateway_health(&self, id: &str) -> Result<Option<GatewayHealth>, StoreError> {
        self.get_one(T::GatewayHealth, id, "gateway health")
    }

    /// Which journal a device's events come from, and what was set aside or lost.
    pub fn lineage(&self, id: &str) -> Result<Lineage, StoreError> {
        Ok(self.get_one(T::Lineage, id, "lineage")?.unwrap_or_default())
    }

    /// Events set aside for a device, by (archive number, seq).
    pub fn archived(&self, device: &str) -> Result<Vec<(u64, u64, Vec<u8>)>, StoreError> {
        let rows = self.read(|tx| tx.rows(T::Archive, &[Str(device)]))?;
        Ok(rows
            .into_iter()
            .map(|(k, v)| (k.get(1).map_or(0, Owned::num), k.get(2).map_or(0, Owned::num), v))
            .collect())
    }

    /// The quarantined (undecodable) records of a device, by sequence.
    pub fn quarantined(&self, device: &str) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        let rows = self.read(|tx| tx.rows(T::Quarantine, &[Str(device)]))?;
        Ok(rows
            .into_iter()
            .map(|(k, v)| (k.get(1).map_or(0, Owned::num), v))
            .collect())
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
        let max = self.max_devices();
        self.write(|tx| {
            // The device row is read first and written last: on Postgres two replicas storing
            // batches of one device conflict on it, and one of them retries from the new row.
            let mut d = device_or_new(tx, device, max)?;
            let mut s = Stored {
                new: 0,
                duplicates: 0,
                gap_from: None,
                next_seq: d.next_seq,
                quarantined: Vec::new(),
                diverged_from: None,
            };
            // Read at the first event, written once at the end.
            let mut counts: Option<RunCounts> = None;
            for e in events {
                if e.seq < d.next_seq {
                    if same_as_stored(tx, device, e)? {
                        s.duplicates += 1;
                        continue;
                    }
                    let mut lin: Lineage = get_row(tx, T::Lineage, &[Str(device)], "lineage")?.unwrap_or_default();
                    let reason = "a resent event differs from the stored one (the device's journal was restored)";
                    // The archive rewrites the counts row: write ours first, read it again after.
                    if let Some(c) = counts.take() {
                        put_row(tx, T::DeviceCounts, &[Str(device)], &c)?;
                    }
                    archive_tail(tx, device, e.seq, &mut lin, reason, now)?;
                    put_row(tx, T::Lineage, &[Str(device)], &lin)?;
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
                        tx.put(T::Quarantine, &[Str(device), Num(e.seq)], &e.record)?;
                        s.quarantined.push((e.seq, err.to_string()));
                        d.next_seq += 1;
                        continue;
                    }
                };
                tx.put(T::Events, &[Str(device), Num(e.seq)], &e.record)?;
                tx.put(T::RunEvents, &[Str(device), Str(&rec.run_id), Num(e.seq)], &[])?;
                let key = [Str(device), Str(&rec.run_id)];
                let mut m: Option<RunMirror> = get_row(tx, T::Runs, &key, "run")?;
                let before = m.clone();
                fold(&mut m, &rec);
                let counts = match &mut counts {
                    Some(c) => c,
                    None => {
                        counts.insert(get_row(tx, T::DeviceCounts, &[Str(device)], "run counts")?.unwrap_or_default())
                    }
                };
                counts.change(before.as_ref(), m.as_ref());
                if let Some(m) = m {
                    put_row(tx, T::Runs, &key, &m)?;
                }
                d.next_seq += 1;
                s.new += 1;
            }
            if let Some(c) = counts {
                put_row(tx, T::DeviceCounts, &[Str(device)], &c)?;
            }
            d.last_seen_ms = now;
            s.next_seq = d.next_seq;
            put_row(tx, T::Devices, &[Str(device)], &d)?;
            Ok(s)
        })
    }

    /// A run mirror and its full history (seq, record).
    pub fn run(&self, device: &str, run: &str) -> Result<Option<(RunMirror, History)>, StoreError> {
        self.read(|tx| {
            let Some(m) = get_row::<RunMirror>(tx, T::Runs, &[Str(device), Str(run)], "run")? else {
                return Ok(None);
            };
            // The console reads a run on every live refresh: through the index, not a scan of
            // the device's whole history.
            let seqs: Vec<u64> = tx
                .rows(T::RunEvents, &[Str(device), Str(run)])?
                .iter()
                .map(|(k, _)| k.get(2).map_or(0, Owned::num))
                .collect();
            let mut history = Vec::new();
            for seq in seqs {
                if let Some(v) = tx.get(T::Events, &[Str(device), Num(seq)])? {
                    let r = journal::decode(&v).map_err(|e| StoreError::Corrupt {
                        what: "event",
                        reason: format!("{device} #{seq}: {e}"),
                    })?;
                    history.push((seq, r));
                }
            }
            Ok(Some((m, history)))
        })
    }

    /// A device's runs counted (all zero for a device without runs).
    pub fn run_counts(&self, device: &str) -> Result<RunCounts, StoreError> {
        Ok(self.get_one(T::DeviceCounts, device, "run counts")?.unwrap_or_default())
    }

    /// Every device's run counts, by device id.
    pub fn all_run_counts(&self) -> Result<std::collections::HashMap<String, RunCounts>, StoreError> {
        Ok(self.all_rows(T::DeviceCounts, "run counts")?.into_iter().collect())
    }

    /// Counts every device's runs once, for a store written before the counts were kept.
    fn count_runs_once(&self) -> Result<(), StoreError> {
        self.write(|tx| {
            if tx.len(T::DeviceCounts)? > 0 || tx.len(T::Runs)? == 0 {
                return Ok(());
            }
            let mut counts: std::collections::BTreeMap<String, RunCounts> = Default::default();
            tx.scan(T::Runs, &[], None, Dir::Up, &mut |k, v| {
                let m: RunMirror = dec("run", v)?;
                counts
                    .entry(k.first().map_or("", Owned::text).to_string())
                    .or_default()
                    .tally(&m, true);
                Ok(true)
            })?;
            for (device, c) in &counts {
                put_row(tx, T::DeviceCounts, &[Str(device)], c)?;
            }
            Ok(())
        })
    }

    /// Forgets a device's oldest ended runs (their mirrors, index rows and events) while it
    /// keeps more than `limits.events` events, and those that ended before `limits.ended_before_ms`.
    /// Runs still going are never touched; the device's sequence stays, so a late redelivery of
    /// a forgotten event is still recognised as one.
    pub fn prune(&self, device: &str, limits: &Retention) -> Result<Pruned, StoreError> {
        self.write(|tx| {
            let mut counts: RunCounts = get_row(tx, T::DeviceCounts, &[Str(device)], "run counts")?.unwrap_or_default();
            if counts.events <= limits.events && limits.ended_before_ms == 0 {
                return Ok(Pruned::default());
            }
            let mut ended: Vec<(u64, String, RunMirror)> = Vec::new();
            tx.scan(T::Runs, &[Str(device)], None, Dir::Up, &mut |k, v| {
                let m: RunMirror = dec("run", v)?;
                if let Some(at) = m.finished_ms {
                    ended.push((at, k.get(1).map_or("", Owned::text).to_string(), m));
                }
                Ok(true)
            })?;
            ended.sort_unstable_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)));
            let mut out = Pruned::default();
            for (at, run, m) in ended {
                if counts.events <= limits.events && at >= limits.ended_before_ms {
                    break;
                }
                let seqs: Vec<u64> = tx
                    .rows(T::RunEvents, &[Str(device), Str(&run)])?
                    .iter()
                    .map(|(k, _)| k.get(2).map_or(0, Owned::num))
                    .collect();
                for seq in &seqs {
                    tx.remove(T::Events, &[Str(device), Num(*seq)])?;
                    tx.remove(T::RunEvents, &[Str(device), Str(&run), Num(*seq)])?;
                }
                tx.remove(T::Runs, &[Str(device), Str(&run)])?;
                counts.change(Some(&m), None);
                out.runs += 1;
                out.events += seqs.len() as u64;
            }
            if out.runs > 0 {
                put_row(tx, T::DeviceCounts, &[Str(device)], &counts)?;
            }
            Ok(out)
        })
    }

    /// Every run of a device.
    pub fn runs(&self, device: &str) -> Result<Vec<(String, RunMirror)>, StoreError> {
        self.read(|tx| {
            let mut out = Vec::new();
            tx.scan(T::Runs, &[Str(device)], None, Dir::Up, &mut |k, v| {
                out.push((k.get(1).map_or("", Owned::text).to_string(), dec("run", v)?));
                Ok(true)
            })?;
            Ok(out)
        })
    }

    /// Events stored for a device, in order (for tests and exports).
    pub fn events(&self, device: &str) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        let rows = self.read(|tx| tx.rows(T::Events, &[Str(device)]))?;
        Ok(rows
            .into_iter()
            .map(|(k, v)| (k.get(1).map_or(0, Owned::num), v))
            .collect())
    }

    /// Counts a rejected message by reason.
    pub fn count(&self, counter: &str) -> Result<(), StoreError> {
        self.add_counts(&[(counter.to_string(), 1)])
    }

    /// Adds to several counters in one commit (the service batches its rejection counts, so a
    /// flood of bad messages costs one fsync a second, not one each).
    pub fn add_counts(&self, counts: &[(String, u64)]) -> Result<(), StoreError> {
        self.write(|tx| {
            for (key, by) in counts {
                bump(tx, key, *by)?;
            }
            Ok(())
        })
    }

    /// Every counter.
    pub fn counters(&self) -> Result<Vec<(String, u64)>, StoreError> {
        let rows = self.read(|tx| tx.rows(T::Counters, &[]))?;
        Ok(rows
            .into_iter()
            .map(|(k, v)| (k.first().map_or("", Owned::text).to_string(), counter_value(&v)))
            .collect())
    }

    /// Stores a new command for a device; it waits in the outbox until answered.
    pub fn add_command(
        &self,
        device: &str,
        id: &str,
        kind: CommandKind,
        now: u64,
    ) -> Result<CommandRecord, StoreError> {
        self.write(|tx| {
            if let Some(existing) = get_row(tx, T::Commands, &[Str(device), Str(id)], "command")? {
                return Ok(existing);
            }
            // An offline device's outbox only grows: bound it, and say so to whoever queues.
            let mut waiting = 0usize;
            tx.scan(T::Outbox, &[Str(device)], None, Dir::Up, &mut |_, _| {
                waiting += 1;
                Ok(waiting < MAX_PENDING_COMMANDS)
            })?;
            if waiting >= MAX_PENDING_COMMANDS {
                return Err(StoreError::Invalid(format!(
                    "device '{device}' already has {MAX_PENDING_COMMANDS} commands waiting for it (the limit); let it come online and answer them first"
                )));
            }
            let order = bump(tx, "command_order", 1)?;
            let rec = CommandRecord {
                order,
                kind: kind.clone(),
                created_ms: now,
                state: "pending".into(),
                message: String::new(),
                detail: "{}".into(),
                answered_ms: None,
            };
            put_row(tx, T::Commands, &[Str(device), Str(id)], &rec)?;
            tx.put(T::Outbox, &[Str(device), Num(order)], id.as_bytes())?;
            Ok(rec)
        })
    }

    /// A command.
    pub fn command(&self, device: &str, id: &str) -> Result<Option<CommandRecord>, StoreError> {
        self.read(|tx| get_row(tx, T::Commands, &[Str(device), Str(id)], "command"))
    }

    /// Commands of a device waiting for an answer, oldest first.
    pub fn pending(&self, device: &str) -> Result<Vec<(String, CommandRecord)>, StoreError> {
        self.read(|tx| {
            let ids: Vec<String> = tx
                .rows(T::Outbox, &[Str(device)])?
                .into_iter()
                .map(|(_, v)| String::from_utf8_lossy(&v).into_owned())
                .collect();
            let mut out = Vec::new();
            for id in ids {
                if let Some(c) = get_row(tx, T::Commands, &[Str(device), Str(&id)], "command")? {
                    out.push((id, c));
                }
            }
            Ok(out)
        })
    }

    /// Commands waiting for any device, known to the store or not (queued for
    /// pre-provisioning): what the `pending_commands` gauge shows.
    pub fn pending_total(&self) -> Result<u64, StoreError> {
        self.read(|tx| tx.len(T::Outbox))
    }

    /// Records a command's result; false when the command is unknown for this device.
    pub fn answer(&self, device: &str, r: &CommandResult, now: u64) -> Result<bool, StoreError> {
        self.write(|tx| {
            let key = [Str(device), Str(&r.id)];
            let Some(mut c) = get_row::<CommandRecord>(tx, T::Commands, &key, "command")? else {
                return Ok(false);
            };
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
                put_row(tx, T::Commands, &key, &c)?;
                tx.remove(T::Outbox, &[Str(device), Num(c.order)])?;
                forget_old_answers(tx, device, KEEP_ANSWERED_COMMANDS)?;
            }
            Ok(true)
        })
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
        self.write(|tx| {
            let key = [Str(device), Str(id)];
            if let Some(mut c) = get_row::<CommandRecord>(tx, T::Commands, &key, "command")?
                && c.answered_ms.is_none()
            {
                c.state = state.into();
                c.message = message.into();
                c.answered_ms = Some(now);
                put_row(tx, T::Commands, &key, &c)?;
                tx.remove(T::Outbox, &[Str(device), Num(c.order)])?;
            }
            Ok(())
        })
    }

    /// Stores a deployment record.
    pub fn put_deployment(&self, id: &str, d: &Deployment) -> Result<(), StoreError> {
        self.put_one(T::Deployments, id, d)
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
        self.get_one(T::Deployments, id, "deployment")
    }

    /// Sets a device's desired document; returns the new version.
    pub fn set_desired(&self, device: &str, document: String, now: u64) -> Result<DesiredRow, StoreError> {
        self.write(|tx| {
            let version =
                get_row::<DesiredRow>(tx, T::Desired, &[Str(device)], "desired")?.map_or(1, |r| r.version + 1);
            let row = DesiredRow {
                version,
                document: document.clone(),
                updated_ms: now,
            };
            put_row(tx, T::Desired, &[Str(device)], &row)?;
            Ok(row)
        })
    }

    /// A device's desired document.
    pub fn desired(&self, device: &str) -> Result<Option<DesiredRow>, StoreError> {
        self.get_one(T::Desired, device, "desired")
    }

    /// Stores a device's reported document.
    /// A report for an older desired version than the stored one (a replay, or a delayed
    /// redelivery) is ignored: false.
    pub fn set_reported(&self, device: &str, row: &ReportedRow) -> Result<bool, StoreError> {
        self.write(|tx| {
            if read_reported(tx, device)?.is_some_and(|old| old.desired_version > row.desired_version) {
                return Ok(false);
            }
            put_row(tx, T::Reported, &[Str(device)], row)?;
            Ok(true)
        })
    }

    /// A device's reported document.
    pub fn reported(&self, device: &str) -> Result<Option<ReportedRow>, StoreError> {
        self.read(|tx| read_reported(tx, device))
    }

    /// Stores a device's inventory: its equipment list when given, and its definitions (upserted).
    pub fn put_inventory(&self, device: &str, inv: &Inventory) -> Result<(), StoreError> {
        self.write(|tx| {
            if let Some(eq) = &inv.equipment {
                put_row(tx, T::Equipment, &[Str(device)], eq)?;
            }
            for d in &inv.definitions {
                let key = [Str(device), Str(&d.workflow), Num(u64::from(d.version))];
                tx.put(T::Definitions, &key, d.document.as_bytes())?;
            }
            // A workflow deployed again and again keeps only its newest versions here.
            let mut names: Vec<&str> = inv.definitions.iter().map(|d| d.workflow.as_str()).collect();
            names.sort_unstable();
            names.dedup();
            for name in names {
                let versions: Vec<u64> = tx
                    .rows(T::Definitions, &[Str(device), Str(name)])?
                    .iter()
                    .map(|(k, _)| k.get(2).map_or(0, Owned::num))
                    .collect();
                for v in versions
                    .iter()
                    .take(versions.len().saturating_sub(KEEP_DEFINITION_VERSIONS))
                {
                    tx.remove(T::Definitions, &[Str(device), Str(name), Num(*v)])?;
                }
            }
            Ok(())
        })
    }

    /// A device's equipment as (name, kind).
    pub fn equipment(&self, device: &str) -> Result<Vec<(String, String)>, StoreError> {
        Ok(self.get_one(T::Equipment, device, "equipment")?.unwrap_or_default())
    }

    /// The definition document (JSON text) a device holds for a workflow version.
    pub fn definition(&self, device: &str, workflow: &str, version: u32) -> Result<Option<String>, StoreError> {
        let key = [Str(device), Str(workflow), Num(u64::from(version))];
        let v = self.read(|tx| tx.get(T::Definitions, &key))?;
        Ok(v.map(|b| String::from_utf8_lossy(&b).into_owned()))
    }

    /// The workflows a device holds as (name, newest version).
    pub fn workflows(&self, device: &str) -> Result<Vec<(String, u32)>, StoreError> {
        let rows = self.read(|tx| tx.rows(T::Definitions, &[Str(device)]))?;
        let mut out: Vec<(String, u32)> = Vec::new();
        for (k, _) in rows {
            let wf = k.get(1).map_or("", Owned::text);
            let v = u32::try_from(k.get(2).map_or(0, Owned::num)).unwrap_or(u32::MAX);
            match out.last_mut() {
                Some((name, ver)) if name == wf => *ver = (*ver).max(v),
                _ => out.push((wf.to_string(), v)),
            }
        }
        Ok(out)
    }

    /// The newest `limit` commands of a device, answered or not, newest first.
    pub fn commands(&self, device: &str, limit: usize) -> Result<Vec<(String, CommandRecord)>, StoreError> {
        let rows = self.read(|tx| tx.rows(T::Commands, &[Str(device)]))?;
        let mut out = Vec::new();
        for (k, v) in rows {
            out.push((
                k.get(1).map_or("", Owned::text).to_string(),
                dec::<CommandRecord>("command", &v)?,
            ));
        }
        out.sort_by_key(|c| std::cmp::Reverse(c.1.order));
        out.truncate(limit);
        Ok(out)
    }

    /// Forgets a device: its row and everything mirrored or queued for it (runs, events,
    /// commands, desired and reported state, inventory, lineage, archive), in one transaction.
    /// Deployments keep naming it. Returns how many events were removed.
    pub fn remove_device(&self, id: &str) -> Result<u64, StoreError> {
        self.write(|tx| {
            if !tx.remove(T::Devices, &[Str(id)])? {
                return Err(StoreError::NotFound(format!("device '{id}' is not known")));
            }
            for t in [
                T::Desired,
                T::Reported,
                T::Equipment,
                T::Lineage,
                T::GatewaySecurity,
                T::GatewayHealth,
                T::DeviceCounts,
            ] {
                tx.remove(t, &[Str(id)])?;
            }
            let events = tx.remove_all(T::Events, &[Str(id)])?;
            for t in [
                T::Quarantine,
                T::Outbox,
                T::RunEvents,
                T::Runs,
                T::Commands,
                T::Definitions,
                T::Archive,
            ] {
                tx.remove_all(t, &[Str(id)])?;
            }
            Ok(events)
        })
    }

    /// Stores a rollout's state (and whether it is still going, in the same transaction).
    pub fn put_rollout(&self, id: &str, r: &crate::rollout::Rollout) -> Result<(), StoreError> {
        let bytes = enc(r);
        self.write(|tx| {
            tx.put(T::Rollouts, &[Str(id)], &bytes)?;
            if r.phase.is_final() {
                tx.remove(T::ActiveRollouts, &[Str(id)])?;
            } else {
                tx.put(T::ActiveRollouts, &[Str(id)], &[])?;
            }
            Ok(())
        })
    }

    /// The rollouts still going (running or paused), by deployment id.
    pub fn active_rollouts(&self) -> Result<Vec<(String, crate::rollout::Rollout)>, StoreError> {
        self.read(|tx| {
            let ids: Vec<String> = tx
                .rows(T::ActiveRollouts, &[])?
                .into_iter()
                .map(|(k, _)| k.first().map_or("", Owned::text).to_string())
                .collect();
            let mut out = Vec::new();
            for id in ids {
                if let Some(r) = get_row(tx, T::Rollouts, &[Str(&id)], "rollout")? {
                    out.push((id, r));
                }
            }
            Ok(out)
        })
    }

    /// A deployment's rollout, if it is sent wave by wave.
    pub fn rollout(&self, id: &str) -> Result<Option<crate::rollout::Rollout>, StoreError> {
        self.get_one(T::Rollouts, id, "rollout")
    }

    /// Every deployment, newest first.
    pub fn deployments(&self) -> Result<Vec<(String, Deployment)>, StoreError> {
        let mut out = self.all_rows::<Deployment>(T::Deployments, "deployment")?;
        out.sort_by_key(|d| std::cmp::Reverse(d.1.created_ms));
        Ok(out)
    }
}

/// Adds `by` to a counter; returns its new value.
fn bump(tx: &mut dyn Txn, key: &str, by: u64) -> Result<u64, StoreError> {
    let n = tx
        .get(T::Counters, &[Str(key)])?
        .map_or(0, |v| counter_value(&v))
        .saturating_add(by);
    tx.put(T::Counters, &[Str(key)], &n.to_le_bytes())?;
    Ok(n)
}

/// A device's reported document (rows from before per-point verdicts read too).
fn read_reported(tx: &mut dyn Txn, device: &str) -> Result<Option<ReportedRow>, StoreError> {
    let Some(bytes) = tx.get(T::Reported, &[Str(device)])? else {
        return Ok(None);
    };
    match dec::<ReportedRow>("reported", &bytes) {
        Ok(r) => Ok(Some(r)),
        // Rows written before per-point verdicts are a prefix of today's layout.
        Err(e) => match row::decode::<ReportedRowV1>(&bytes) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use outpost_shared::journal::Record;
    use redb_backend::{REPORTED, RUN_EVENTS};

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
        counts_match(&s, "gw");
        let lin = s.lineage("gw").unwrap();
        assert_eq!((lin.archives, lin.archived_events), (1, 2));
        assert_eq!(
            s.archived("gw").unwrap().iter().map(|a| a.1).collect::<Vec<_>>(),
            vec![3, 4]
        );
    }

    /// The kept counts are what counting the device's run mirrors gives.
    pub(super) fn counts_match(s: &Store, device: &str) {
        let mut want = RunCounts::default();
        for (_, m) in s.runs(device).unwrap() {
            want.tally(&m, true);
        }
        assert_eq!(s.run_counts(device).unwrap(), want, "{device}");
    }

    #[test]
    fn run_counts_follow_every_run_and_are_made_once_for_an_older_store() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.redb");
        let s = Store::open(&path).unwrap();
        let ev = |seq, r: Vec<u8>| WireEvent { seq, record: r };
        let failed = |r: &str| {
            rec(
                r,
                Event::RunFailed {
                    error: outpost_shared::journal::ErrorInfo::new("x", "y"),
                },
            )
        };
        s.store_events(
            "gw",
            &[ev(1, started("r1")), ev(2, started("r2")), ev(3, started("r3"))],
            0,
        )
        .unwrap();
        s.store_events(
            "gw",
            &[
                ev(4, failed("r1")),
                ev(5, rec("r2", Event::RunCompleted { output: "1".into() })),
            ],
            0,
        )
        .unwrap();
        assert_eq!(
            s.run_counts("gw").unwrap(),
            RunCounts {
                runs: 3,
                active: 1,
                failed: 1,
                events: 5
            }
        );
        counts_match(&s, "gw");
        // A store from before the counts: they are made on open.
        let txn = s.db().unwrap().begin_write().unwrap();
        txn.delete_table(redb_backend::DEVICE_COUNTS).unwrap();
        txn.commit().unwrap();
        drop(s);
        let s = Store::open(&path).unwrap();
        assert_eq!(
            s.run_counts("gw").unwrap(),
            RunCounts {
                runs: 3,
                active: 1,
                failed: 1,
                events: 5
            }
        );
        s.remove_device("gw").unwrap();
        assert_eq!(s.run_counts("gw").unwrap(), RunCounts::default());
    }

    #[test]
    fn retention_forgets_the_oldest_ended_runs_never_a_running_one_and_redeliveries_stay_duplicates() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("c.redb")).unwrap();
        let ev = |seq, r: Vec<u8>| WireEvent { seq, record: r };
        let done = |r: &str, at: u64| {
            journal::encode(&Record {
                run_id: r.into(),
                at_ms: at,
                event: Event::RunCompleted { output: "1".into() },
            })
        };
        // r1 ended at 10, r2 at 20, r3 still going; two events each.
        s.store_events(
            "gw",
            &[
                ev(1, started("r1")),
                ev(2, started("r2")),
                ev(3, started("r3")),
                ev(4, done("r1", 10)),
                ev(5, done("r2", 20)),
            ],
            0,
        )
        .unwrap();
        let keep_all = Retention {
            events: 100,
            ended_before_ms: 0,
        };
        assert_eq!(s.prune("gw", &keep_all).unwrap(), Pruned::default());
        let p = s
            .prune(
                "gw",
                &Retention {
                    events: 4,
                    ended_before_ms: 0,
                },
            )
            .unwrap();
        assert_eq!(p, Pruned { runs: 1, events: 2 }, "the oldest ended run goes first");
        assert!(s.run("gw", "r1").unwrap().is_none());
        counts_match(&s, "gw");
        let p = s
            .prune(
                "gw",
                &Retention {
                    events: 100,
                    ended_before_ms: 21,
                },
            )
            .unwrap();
        assert_eq!(p.runs, 1, "by age: r2 (ended at 20); r3 is still going");
        let left: Vec<String> = s.runs("gw").unwrap().into_iter().map(|r| r.0).collect();
        assert_eq!(left, ["r3"]);
        counts_match(&s, "gw");
        // A late redelivery of a forgotten event is a duplicate, not a divergence.
        let again = s.store_events("gw", &[ev(1, started("r1"))], 0).unwrap();
        assert_eq!((again.duplicates, again.new, again.diverged_from), (1, 0, None));
    }

    #[test]
    fn retention_never_forgets_a_running_run() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("c.redb")).unwrap();
        let ev = |seq, r: Vec<u8>| WireEvent { seq, record: r };
        s.store_events("gw", &[ev(1, started("r1")), ev(2, started("r2"))], 0)
            .unwrap();
        let p = s
            .prune(
                "gw",
                &Retention {
                    events: 0,
                    ended_before_ms: u64::MAX,
                },
            )
            .unwrap();
        assert_eq!(p, Pruned::default());
        assert_eq!(s.runs("gw").unwrap().len(), 2);
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
        counts_match(&s, "gw");
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

/// The store's behaviour on Postgres: the same checks as on redb, against a real server.
#[cfg(test)]
mod postgres_tests {
    use super::*;
    use crate::testing::TestPostgres;

    /// A store on a server of its own (stopped when the test ends).
    fn store() -> (TestPostgres, Store) {
        let pg = TestPostgres::start().expect("start a test Postgres");
        let url = pg.create_database("unit").expect("createdb");
        let s = Store::connect(&url).expect("connect");
        (pg, s)
    }

    fn started(run: &str) -> Vec<u8> {
        journal::encode(&journal::Record {
            run_id: run.into(),
            at_ms: 1,
            event: Event::RunStarted {
                workflow: "w".into(),
                version: 2,
                input: "{}".into(),
            },
        })
    }

    #[test]
    fn batches_store_once_in_order_and_stop_at_a_gap() {
        let (_pg, s) = store();
        let ev = |seq, r: Vec<u8>| WireEvent { seq, record: r };
        let a = s
            .store_events("gw", &[ev(1, started("r1")), ev(2, started("r2"))], 0)
            .unwrap();
        assert_eq!((a.new, a.next_seq, a.gap_from), (2, 3, None));
        let b = s
            .store_events("gw", &[ev(2, started("r2")), ev(3, started("r3"))], 0)
            .unwrap();
        assert_eq!((b.new, b.duplicates, b.next_seq), (1, 1, 4));
        let c = s.store_events("gw", &[ev(6, started("r6"))], 0).unwrap();
        assert_eq!((c.new, c.gap_from, c.next_seq), (0, Some(4), 4));
        assert_eq!(s.runs("gw").unwrap().len(), 3);
        let (_, h) = s.run("gw", "r2").unwrap().unwrap();
        assert_eq!(h.iter().map(|x| x.0).collect::<Vec<_>>(), [2]);
        assert_eq!(s.events("gw").unwrap().len(), 3);
        assert_eq!(s.remove_device("gw").unwrap(), 3);
        assert!(s.runs("gw").unwrap().is_empty());
    }

    #[test]
    fn concurrent_writers_of_one_device_store_each_sequence_once_and_contiguously() {
        // Two "replicas" (two stores on one database) race the same device's batches, as two
        // cloud-sync processes behind a shared subscription would after a redelivery.
        let pg = TestPostgres::start().unwrap();
        let url = pg.create_database("race").unwrap();
        let a = std::sync::Arc::new(Store::connect(&url).unwrap());
        let b = std::sync::Arc::new(Store::connect(&url).unwrap());
        let mut threads = Vec::new();
        for (i, s) in [a.clone(), b.clone(), a.clone(), b.clone()].into_iter().enumerate() {
            threads.push(std::thread::spawn(move || {
                for start in (1..=200u64).step_by(10) {
                    let batch: Vec<WireEvent> = (start..start + 10)
                        .map(|seq| WireEvent {
                            seq,
                            record: started(&format!("r{}", seq % 7)),
                        })
                        .collect();
                    // A batch past the stored end stops at the gap; the writer sends it again.
                    let mut tries = 0;
                    loop {
                        let st = s.store_events("gw", &batch, i as u64).unwrap();
                        if st.next_seq >= start + 10 {
                            break;
                        }
                        tries += 1;
                        assert!(tries < 20_000, "stuck at {} waiting for {start}", st.next_seq);
                        std::thread::yield_now();
                    }
                }
            }));
        }
        for t in threads {
            t.join().unwrap();
        }
        let seqs: Vec<u64> = a.events("gw").unwrap().iter().map(|e| e.0).collect();
        assert_eq!(seqs, (1..=200).collect::<Vec<_>>());
        assert_eq!(a.device("gw").unwrap().unwrap().next_seq, 201);
        let total: u64 = a.runs("gw").unwrap().iter().map(|r| r.1.events).sum();
        assert_eq!(total, 200, "every event folded into its run exactly once");
        super::tests::counts_match(&a, "gw");
    }

    #[test]
    fn commands_audit_and_counters_work_as_on_redb() {
        let (_pg, s) = store();
        let kind = CommandKind::Cancel {
            run_id: "r".into(),
            reason: "x".into(),
        };
        s.add_command("gw", "c1", kind.clone(), 0).unwrap();
        s.add_command("gw", "c2", kind, 0).unwrap();
        assert_eq!(s.pending("gw").unwrap().len(), 2);
        assert_eq!(s.pending_total().unwrap(), 2);
        let r = CommandResult {
            id: "c1".into(),
            outcome: Outcome::Rejected,
            message: "no such run".into(),
            detail: "{}".into(),
        };
        assert!(s.answer("gw", &r, 1).unwrap());
        assert_eq!(s.command("gw", "c1").unwrap().unwrap().state, "rejected");
        assert_eq!(
            s.pending("gw")
                .unwrap()
                .iter()
                .map(|c| c.0.as_str())
                .collect::<Vec<_>>(),
            ["c2"]
        );
        s.add_counts(&[("a".into(), 2), ("b".into(), 1)]).unwrap();
        s.count("a").unwrap();
        let counters = s.counters().unwrap();
        assert!(counters.contains(&("a".into(), 3)), "{counters:?}");
        let entry = |who: &str| AuditRow {
            at_ms: 1,
            who: who.into(),
            from: "127.0.0.1".into(),
            kind: "k".into(),
            device: "gw".into(),
            target: String::new(),
            result: "ok".into(),
            message: String::new(),
        };
        assert_eq!(s.append_audit(&entry("a")).unwrap(), 1);
        assert_eq!(s.append_audit(&entry("b")).unwrap(), 2);
        assert_eq!(
            s.audit(&AuditFilter::default(), 10)
                .unwrap()
                .iter()
                .map(|e| e.0)
                .collect::<Vec<_>>(),
            [2, 1]
        );
        let info = |v: u32| outpost_shared::protocol::DefinitionInfo {
            workflow: "w".into(),
            version: v,
            document: format!("{{\"v\":{v}}}"),
        };
        let inv = Inventory {
            equipment: Some(vec![("plc".into(), "modbus".into())]),
            definitions: (1..=3).map(info).collect(),
        };
        s.put_inventory("gw", &inv).unwrap();
        assert_eq!(s.workflows("gw").unwrap(), [("w".to_string(), 3)]);
        assert_eq!(s.definition("gw", "w", 2).unwrap().as_deref(), Some("{\"v\":2}"));
        assert_eq!(s.equipment("gw").unwrap().len(), 1);
    }

    #[test]
    fn a_lock_across_replicas_is_held_by_one_at_a_time() {
        let pg = TestPostgres::start().unwrap();
        let url = pg.create_database("locks").unwrap();
        let a = Store::connect(&url).unwrap();
        let b = std::sync::Arc::new(Store::connect(&url).unwrap());
        let held = a.lock_across_replicas("rollouts").unwrap();
        let taken = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (b2, t2) = (b.clone(), taken.clone());
        let waiter = std::thread::spawn(move || {
            let _l = b2.lock_across_replicas("rollouts").unwrap();
            t2.store(true, std::sync::atomic::Ordering::SeqCst);
        });
        std::thread::sleep(std::time::Duration::from_millis(300));
        assert!(
            !taken.load(std::sync::atomic::Ordering::SeqCst),
            "the other replica waits"
        );
        let _other = a.lock_across_replicas("something else").unwrap();
        drop(held);
        waiter.join().unwrap();
        assert!(taken.load(std::sync::atomic::Ordering::SeqCst));
    }

    #[test]
    fn a_server_restart_fails_calls_until_it_is_back_and_loses_nothing_committed() {
        let pg = TestPostgres::start().unwrap();
        let url = pg.create_database("restart").unwrap();
        let s = Store::connect(&url).unwrap();
        let ev = |seq| WireEvent {
            seq,
            record: started("r"),
        };
        s.store_events("gw", &[ev(1)], 0).unwrap();
        pg.stop().unwrap();
        let e = s.store_events("gw", &[ev(2)], 0).unwrap_err();
        assert!(matches!(e, StoreError::Unavailable(_)), "{e}");
        assert!(!s.healthy());
        assert!(!s.recover());
        pg.start_again().unwrap();
        assert!(s.recover() && s.healthy());
        let again = s.store_events("gw", &[ev(2)], 0).unwrap();
        assert_eq!((again.new, again.next_seq), (1, 3));
        // A read that fails while the server is down marks the store unhealthy; the next one
        // that gets through clears it, with no ingest error to drive a recover.
        pg.stop().unwrap();
        assert!(s.device("gw").is_err());
        assert!(!s.healthy());
        pg.start_again().unwrap();
        assert!(s.device("gw").unwrap().is_some());
        assert!(s.healthy());
    }
}
