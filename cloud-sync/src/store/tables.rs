//! The store's tables as the backends see them: a name, typed key columns and a value.
//!
//! The store's logic is written once against `Txn`; the redb backend maps each table onto its
//! typed redb table, the Postgres backend onto a SQL table with the same key columns.

use super::StoreError;

/// One column of a key, borrowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Part<'a> {
    /// Text (device ids, run ids, names).
    Str(&'a str),
    /// A number (sequences, orders, versions).
    Num(u64),
}

/// One column of a key read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Owned {
    /// Text.
    Str(String),
    /// A number.
    Num(u64),
}

impl Owned {
    /// The text, or "" for a number (a table's shape fixes which it is).
    pub(crate) fn text(&self) -> &str {
        match self {
            Owned::Str(s) => s,
            Owned::Num(_) => "",
        }
    }

    /// The number, or 0 for text.
    pub(crate) fn num(&self) -> u64 {
        match self {
            Owned::Num(n) => *n,
            Owned::Str(_) => 0,
        }
    }

    /// Borrowed, to compare with a prefix.
    pub(crate) fn part(&self) -> Part<'_> {
        match self {
            Owned::Str(s) => Part::Str(s),
            Owned::Num(n) => Part::Num(*n),
        }
    }
}

/// The kind of a key column.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// Text, ordered bytewise.
    Str,
    /// An unsigned number.
    Num,
}

/// Every table of the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum T {
    /// Device id → `Device`.
    Devices,
    /// Every mirrored event by (device, seq).
    Events,
    /// Index of each run's events: (device, run, seq), written with the event.
    RunEvents,
    /// (device, run) → `RunMirror`.
    Runs,
    /// Device → `RunCounts`, kept with the run mirrors so the fleet page reads no runs.
    DeviceCounts,
    /// (device, command id) → `CommandRecord`.
    Commands,
    /// Commands not yet answered, per device, in the order they were issued (value: the id).
    Outbox,
    /// Deployment id → `Deployment`.
    Deployments,
    /// Deployment id → `rollout::Rollout`, for deployments sent wave by wave.
    Rollouts,
    /// Deployment ids of the rollouts still going (running or paused): what the ticker reads.
    ActiveRollouts,
    /// Device → `DesiredRow`.
    Desired,
    /// Device → `ReportedRow`.
    Reported,
    /// Counter name → value (8 little-endian bytes).
    Counters,
    /// Definitions each device holds (from its inventory), by (device, workflow, version); value:
    /// the document.
    Definitions,
    /// Events whose record does not decode, kept by (device, seq) for forensics: the sequence is
    /// consumed so one bad record cannot stop a device's sync.
    Quarantine,
    /// Each device's equipment list (from its inventory).
    Equipment,
    /// Which journal each device's events come from (`lineage::Lineage`).
    Lineage,
    /// Events set aside because the device's journal no longer has them, by (device, archive, seq):
    /// kept for forensics, never shown as the device's history.
    Archive,
    /// Device → `SecurityRow`, when its newest birth has something to say about its link.
    GatewaySecurity,
    /// Device → `GatewayHealth`, while its newest birth says its journal cannot be written.
    GatewayHealth,
    /// User name → `UserRow`.
    Users,
    /// Token id → `TokenRow`.
    ApiTokens,
    /// Audit entry number → `AuditRow`, append-only: nothing deletes or rewrites an entry.
    Audit,
}

use Kind::{Num as N, Str as S};

impl T {
    /// Every table, in the order the schema creates them.
    pub(crate) const ALL: [T; 23] = [
        T::Devices,
        T::Events,
        T::RunEvents,
        T::Runs,
        T::DeviceCounts,
        T::Commands,
        T::Outbox,
        T::Deployments,
        T::Rollouts,
        T::ActiveRollouts,
        T::Desired,
        T::Reported,
        T::Counters,
        T::Definitions,
        T::Quarantine,
        T::Equipment,
        T::Lineage,
        T::Archive,
        T::GatewaySecurity,
        T::GatewayHealth,
        T::Users,
        T::ApiTokens,
        T::Audit,
    ];

    /// The table's name (the same in redb and Postgres).
    pub(crate) fn name(self) -> &'static str {
        match self {
            T::Devices => "devices",
            T::Events => "events",
            T::RunEvents => "run_events",
            T::Runs => "runs",
            T::DeviceCounts => "device_counts",
            T::Commands => "commands",
            T::Outbox => "command_outbox",
            T::Deployments => "deployments",
            T::Rollouts => "rollouts",
            T::ActiveRollouts => "active_rollouts",
            T::Desired => "desired",
            T::Reported => "reported",
            T::Counters => "counters",
            T::Definitions => "definitions",
            T::Quarantine => "quarantine",
            T::Equipment => "equipment",
            T::Lineage => "lineage",
            T::Archive => "archive",
            T::GatewaySecurity => "gateway_security",
            T::GatewayHealth => "gateway_health",
            T::Users => "users",
            T::ApiTokens => "api_tokens",
            T::Audit => "audit",
        }
    }

    /// The key's columns, by name and kind.
    pub(crate) fn key(self) -> &'static [(&'static str, Kind)] {
        match self {
            T::Devices
            | T::Desired
            | T::Reported
            | T::Equipment
            | T::Lineage
            | T::GatewaySecurity
            | T::GatewayHealth
            | T::DeviceCounts => &[("device", S)],
            T::Events | T::Quarantine => &[("device", S), ("seq", N)],
            T::RunEvents => &[("device", S), ("run", S), ("seq", N)],
            T::Runs => &[("device", S), ("run", S)],
            T::Commands => &[("device", S), ("id", S)],
            T::Outbox => &[("device", S), ("command_order", N)],
            T::Deployments | T::Rollouts | T::ActiveRollouts => &[("id", S)],
            T::Counters => &[("name", S)],
            T::Definitions => &[("device", S), ("workflow", S), ("version", N)],
            T::Archive => &[("device", S), ("archive", N), ("seq", N)],
            T::Users => &[("name", S)],
            T::ApiTokens => &[("id", S)],
            T::Audit => &[("n", N)],
        }
    }
}

/// Which way a scan goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Dir {
    /// Smallest key first.
    Up,
    /// Largest key first.
    Down,
}

/// Called for each row of a scan with its key and value; false stops the scan.
pub(crate) type Visit<'v> = dyn FnMut(&[Owned], &[u8]) -> Result<bool, StoreError> + 'v;

/// One transaction on a backend. A write transaction commits when the store's closure returns
/// `Ok`, and is abandoned (nothing written) when it returns an error.
pub(crate) trait Txn {
    /// The value under a full key.
    fn get(&mut self, t: T, key: &[Part<'_>]) -> Result<Option<Vec<u8>>, StoreError>;
    /// Inserts or replaces a row.
    fn put(&mut self, t: T, key: &[Part<'_>], value: &[u8]) -> Result<(), StoreError>;
    /// Removes a row; true when there was one.
    fn remove(&mut self, t: T, key: &[Part<'_>]) -> Result<bool, StoreError>;
    /// Visits the rows whose key starts with `prefix` (and, when `from` is given, whose next key
    /// column is at least `from`), in key order (`Dir::Down`: only with an empty prefix).
    fn scan(
        &mut self,
        t: T,
        prefix: &[Part<'_>],
        from: Option<u64>,
        dir: Dir,
        visit: &mut Visit<'_>,
    ) -> Result<(), StoreError>;
    /// How many rows the table has.
    fn len(&mut self, t: T) -> Result<u64, StoreError>;
}

/// A row read back: its key columns and its value.
pub(crate) type Row = (Vec<Owned>, Vec<u8>);

/// Helpers every `Txn` has.
pub(crate) trait TxnExt: Txn {
    /// Every row under `prefix`, in key order.
    fn rows(&mut self, t: T, prefix: &[Part<'_>]) -> Result<Vec<Row>, StoreError> {
        let mut out = Vec::new();
        self.scan(t, prefix, None, Dir::Up, &mut |k, v| {
            out.push((k.to_vec(), v.to_vec()));
            Ok(true)
        })?;
        Ok(out)
    }

    /// Removes every row under `prefix`; returns how many.
    fn remove_all(&mut self, t: T, prefix: &[Part<'_>]) -> Result<u64, StoreError> {
        let keys: Vec<Vec<Owned>> = self.rows(t, prefix)?.into_iter().map(|r| r.0).collect();
        for k in &keys {
            let parts: Vec<Part<'_>> = k.iter().map(Owned::part).collect();
            self.remove(t, &parts)?;
        }
        Ok(keys.len() as u64)
    }
}

impl<X: Txn + ?Sized> TxnExt for X {}

/// True when `key` starts with `prefix`.
pub(crate) fn has_prefix(key: &[Owned], prefix: &[Part<'_>]) -> bool {
    key.len() >= prefix.len() && key.iter().zip(prefix).all(|(k, p)| k.part() == *p)
}

/// A key that does not fit the table's shape (a bug in the store, not bad input).
pub(crate) fn shape_error(t: T, key: &[Part<'_>]) -> StoreError {
    StoreError::Invalid(format!("store: key {key:?} does not fit table {}", t.name()))
}
