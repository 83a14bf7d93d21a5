//! The redb backend: one file, one writer at a time (redb serialises write transactions), the
//! embedded default. Each store table is the typed redb table it has always been, so stores
//! written by earlier versions open unchanged.

use redb::{Database, Durability, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};

use super::StoreError;
use super::tables::{Dir, Kind, Owned, Part, T, Txn, Visit, has_prefix, shape_error};

pub(crate) const DEVICES: TableDefinition<&str, &[u8]> = TableDefinition::new("devices");
pub(crate) const EVENTS: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("events");
pub(crate) const RUN_EVENTS: TableDefinition<(&str, &str, u64), ()> = TableDefinition::new("run_events");
const RUNS: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("runs");
pub(crate) const DEVICE_COUNTS: TableDefinition<&str, &[u8]> = TableDefinition::new("device_counts");
const COMMANDS: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("commands");
const OUTBOX: TableDefinition<(&str, u64), &str> = TableDefinition::new("command_outbox");
const DEPLOYMENTS: TableDefinition<&str, &[u8]> = TableDefinition::new("deployments");
const ROLLOUTS: TableDefinition<&str, &[u8]> = TableDefinition::new("rollouts");
const ACTIVE_ROLLOUTS: TableDefinition<&str, ()> = TableDefinition::new("active_rollouts");
const DESIRED: TableDefinition<&str, &[u8]> = TableDefinition::new("desired");
pub(crate) const REPORTED: TableDefinition<&str, &[u8]> = TableDefinition::new("reported");
const COUNTERS: TableDefinition<&str, u64> = TableDefinition::new("counters");
const DEFINITIONS: TableDefinition<(&str, &str, u32), &str> = TableDefinition::new("definitions");
const QUARANTINE: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("quarantine");
const EQUIPMENT: TableDefinition<&str, &[u8]> = TableDefinition::new("equipment");
const LINEAGE: TableDefinition<&str, &[u8]> = TableDefinition::new("lineage");
const ARCHIVE: TableDefinition<(&str, u64, u64), &[u8]> = TableDefinition::new("archive");
const GATEWAY_SECURITY: TableDefinition<&str, &[u8]> = TableDefinition::new("gateway_security");
const GATEWAY_HEALTH: TableDefinition<&str, &[u8]> = TableDefinition::new("gateway_health");
const USERS: TableDefinition<&str, &[u8]> = TableDefinition::new("users");
const API_TOKENS: TableDefinition<&str, &[u8]> = TableDefinition::new("api_tokens");
const AUDIT: TableDefinition<u64, &[u8]> = TableDefinition::new("audit");

/// Runs `$body` with `$tab` bound to table `$t` opened in `$txn` (each arm is its own
/// monomorphisation: the tables' key and value types differ).
macro_rules! with_table {
    ($txn:expr, $t:expr, |$tab:ident| $body:expr) => {
        match $t {
            T::Devices => {
                #[allow(unused_mut)]
                let mut $tab = $txn.open_table(DEVICES)?;
                $body
            }
            T::Events => {
                #[allow(unused_mut)]
                let mut $tab = $txn.open_table(EVENTS)?;
                $body
            }
            T::RunEvents => {
                #[allow(unused_mut)]
                let mut $tab = $txn.open_table(RUN_EVENTS)?;
                $body
            }
            T::Runs => {
                #[allow(unused_mut)]
                let mut $tab = $txn.open_table(RUNS)?;
                $body
            }
            T::DeviceCounts => {
                #[allow(unused_mut)]
                let mut $tab = $txn.open_table(DEVICE_COUNTS)?;
                $body
            }
            T::Commands => {
                #[allow(unused_mut)]
                let mut $tab = $txn.open_table(COMMANDS)?;
                $body
            }
            T::Outbox => {
                #[allow(unused_mut)]
                let mut $tab = $txn.open_table(OUTBOX)?;
                $body
            }
            T::Deployments => {
                #[allow(unused_mut)]
                let mut $tab = $txn.open_table(DEPLOYMENTS)?;
                $body
            }
            T::Rollouts => {
                #[allow(unused_mut)]
                let mut $tab = $txn.open_table(ROLLOUTS)?;
                $body
            }
            T::ActiveRollouts => {
                #[allow(unused_mut)]
                let mut $tab = $txn.open_table(ACTIVE_ROLLOUTS)?;
                $body
            }
            T::Desired => {
                #[allow(unused_mut)]
                let mut $tab = $txn.open_table(DESIRED)?;
                $body
            }
            T::Reported => {
                #[allow(unused_mut)]
                let mut $tab = $txn.open_table(REPORTED)?;
                $body
            }
            T::Counters => {
                #[allow(unused_mut)]
                let mut $tab = $txn.open_table(COUNTERS)?;
                $body
            }
            T::Definitions => {
                #[allow(unused_mut)]
                let mut $tab = $txn.open_table(DEFINITIONS)?;
                $body
            }
            T::Quarantine => {
                #[allow(unused_mut)]
                let mut $tab = $txn.open_table(QUARANTINE)?;
                $body
            }
            T::Equipment => {
                #[allow(unused_mut)]
                let mut $tab = $txn.open_table(EQUIPMENT)?;
                $body
            }
            T::Lineage => {
                #[allow(unused_mut)]
                let mut $tab = $txn.open_table(LINEAGE)?;
                $body
            }
            T::Archive => {
                #[allow(unused_mut)]
                let mut $tab = $txn.open_table(ARCHIVE)?;
                $body
            }
            T::GatewaySecurity => {
                #[allow(unused_mut)]
                let mut $tab = $txn.open_table(GATEWAY_SECURITY)?;
                $body
            }
            T::GatewayHealth => {
                #[allow(unused_mut)]
                let mut $tab = $txn.open_table(GATEWAY_HEALTH)?;
                $body
            }
            T::Users => {
                #[allow(unused_mut)]
                let mut $tab = $txn.open_table(USERS)?;
                $body
            }
            T::ApiTokens => {
                #[allow(unused_mut)]
                let mut $tab = $txn.open_table(API_TOKENS)?;
                $body
            }
            T::Audit => {
                #[allow(unused_mut)]
                let mut $tab = $txn.open_table(AUDIT)?;
                $body
            }
        }
    };
}

/// A redb key type the store uses, built from and read back into key columns.
trait Key: redb::Key + 'static {
    /// Calls `f` with the typed key made of `parts`; `None` when they do not fit.
    fn with<R>(parts: &[Part<'_>], f: impl FnOnce(Self::SelfType<'_>) -> R) -> Option<R>;
    /// The key's columns.
    fn parts(k: Self::SelfType<'_>) -> Vec<Owned>;
}

impl Key for &'static str {
    fn with<R>(parts: &[Part<'_>], f: impl FnOnce(&str) -> R) -> Option<R> {
        match parts {
            [Part::Str(a)] => Some(f(a)),
            _ => None,
        }
    }
    fn parts(k: &str) -> Vec<Owned> {
        vec![Owned::Str(k.to_string())]
    }
}

impl Key for u64 {
    fn with<R>(parts: &[Part<'_>], f: impl FnOnce(u64) -> R) -> Option<R> {
        match parts {
            [Part::Num(a)] => Some(f(*a)),
            _ => None,
        }
    }
    fn parts(k: u64) -> Vec<Owned> {
        vec![Owned::Num(k)]
    }
}

impl Key for (&'static str, u64) {
    fn with<R>(parts: &[Part<'_>], f: impl FnOnce((&str, u64)) -> R) -> Option<R> {
        match parts {
            [Part::Str(a), Part::Num(b)] => Some(f((a, *b))),
            _ => None,
        }
    }
    fn parts(k: (&str, u64)) -> Vec<Owned> {
        vec![Owned::Str(k.0.to_string()), Owned::Num(k.1)]
    }
}

impl Key for (&'static str, &'static str) {
    fn with<R>(parts: &[Part<'_>], f: impl for<'a> FnOnce((&'a str, &'a str)) -> R) -> Option<R> {
        match parts {
            [Part::Str(a), Part::Str(b)] => Some(f((a, b))),
            _ => None,
        }
    }
    fn parts(k: (&str, &str)) -> Vec<Owned> {
        vec![Owned::Str(k.0.to_string()), Owned::Str(k.1.to_string())]
    }
}

impl Key for (&'static str, &'static str, u64) {
    fn with<R>(parts: &[Part<'_>], f: impl for<'a> FnOnce((&'a str, &'a str, u64)) -> R) -> Option<R> {
        match parts {
            [Part::Str(a), Part::Str(b), Part::Num(c)] => Some(f((a, b, *c))),
            _ => None,
        }
    }
    fn parts(k: (&str, &str, u64)) -> Vec<Owned> {
        vec![
            Owned::Str(k.0.to_string()),
            Owned::Str(k.1.to_string()),
            Owned::Num(k.2),
        ]
    }
}

impl Key for (&'static str, &'static str, u32) {
    fn with<R>(parts: &[Part<'_>], f: impl for<'a> FnOnce((&'a str, &'a str, u32)) -> R) -> Option<R> {
        match parts {
            [Part::Str(a), Part::Str(b), Part::Num(c)] => Some(f((a, b, u32::try_from(*c).ok()?))),
            _ => None,
        }
    }
    fn parts(k: (&str, &str, u32)) -> Vec<Owned> {
        vec![
            Owned::Str(k.0.to_string()),
            Owned::Str(k.1.to_string()),
            Owned::Num(u64::from(k.2)),
        ]
    }
}

impl Key for (&'static str, u64, u64) {
    fn with<R>(parts: &[Part<'_>], f: impl FnOnce((&str, u64, u64)) -> R) -> Option<R> {
        match parts {
            [Part::Str(a), Part::Num(b), Part::Num(c)] => Some(f((a, *b, *c))),
            _ => None,
        }
    }
    fn parts(k: (&str, u64, u64)) -> Vec<Owned> {
        vec![Owned::Str(k.0.to_string()), Owned::Num(k.1), Owned::Num(k.2)]
    }
}

/// A redb value type the store uses, as bytes (text as UTF-8, a counter as 8 little-endian
/// bytes, a set member as nothing).
trait Val: redb::Value + 'static {
    fn with<R>(bytes: &[u8], f: impl FnOnce(Self::SelfType<'_>) -> R) -> Option<R>;
    fn bytes(v: Self::SelfType<'_>) -> Vec<u8>;
}

impl Val for &'static [u8] {
    fn with<R>(bytes: &[u8], f: impl FnOnce(&[u8]) -> R) -> Option<R> {
        Some(f(bytes))
    }
    fn bytes(v: &[u8]) -> Vec<u8> {
        v.to_vec()
    }
}

impl Val for &'static str {
    fn with<R>(bytes: &[u8], f: impl FnOnce(&str) -> R) -> Option<R> {
        std::str::from_utf8(bytes).ok().map(f)
    }
    fn bytes(v: &str) -> Vec<u8> {
        v.as_bytes().to_vec()
    }
}

impl Val for u64 {
    fn with<R>(bytes: &[u8], f: impl FnOnce(u64) -> R) -> Option<R> {
        Some(f(super::counter_value(bytes)))
    }
    fn bytes(v: u64) -> Vec<u8> {
        v.to_le_bytes().to_vec()
    }
}

impl Val for () {
    fn with<R>(_: &[u8], f: impl FnOnce(()) -> R) -> Option<R> {
        Some(f(()))
    }
    fn bytes(_: ()) -> Vec<u8> {
        Vec::new()
    }
}

fn get<K: Key, V: Val>(tab: &impl ReadableTable<K, V>, t: T, key: &[Part<'_>]) -> Result<Option<Vec<u8>>, StoreError> {
    let found = K::with(key, |k| tab.get(k)).ok_or_else(|| shape_error(t, key))??;
    Ok(found.map(|g| V::bytes(g.value())))
}

fn put<K: Key, V: Val>(
    tab: &mut redb::Table<'_, K, V>,
    t: T,
    key: &[Part<'_>],
    value: &[u8],
) -> Result<(), StoreError> {
    K::with(key, |k| V::with(value, |v| tab.insert(k, v).map(drop)))
        .flatten()
        .ok_or_else(|| shape_error(t, key))??;
    Ok(())
}

fn remove<K: Key, V: Val>(tab: &mut redb::Table<'_, K, V>, t: T, key: &[Part<'_>]) -> Result<bool, StoreError> {
    let old = K::with(key, |k| tab.remove(k).map(|o| o.is_some())).ok_or_else(|| shape_error(t, key))??;
    Ok(old)
}

/// The smallest key under `prefix` (and `from`): the prefix padded with "" and 0.
fn lower_bound<'p>(t: T, prefix: &[Part<'p>], from: Option<u64>) -> Vec<Part<'p>> {
    let mut lo = prefix.to_vec();
    if let Some(n) = from {
        lo.push(Part::Num(n));
    }
    for (_, kind) in t.key().iter().skip(lo.len()) {
        lo.push(match kind {
            Kind::Str => Part::Str(""),
            Kind::Num => Part::Num(0),
        });
    }
    lo
}

fn scan<K: Key, V: Val>(
    tab: &impl ReadableTable<K, V>,
    t: T,
    prefix: &[Part<'_>],
    from: Option<u64>,
    dir: Dir,
    visit: &mut Visit<'_>,
) -> Result<(), StoreError> {
    let rows = match dir {
        Dir::Up => {
            let lo = lower_bound(t, prefix, from);
            K::with(&lo, |k| tab.range(k..)).ok_or_else(|| shape_error(t, &lo))??
        }
        Dir::Down if prefix.is_empty() && from.is_none() => tab.range::<K::SelfType<'_>>(..)?,
        Dir::Down => return Err(StoreError::Invalid("store: a downward scan takes no prefix".into())),
    };
    let mut step = |row: Result<(redb::AccessGuard<'_, K>, redb::AccessGuard<'_, V>), redb::StorageError>| {
        let (k, v) = row?;
        let key = K::parts(k.value());
        if !has_prefix(&key, prefix) {
            return Ok::<bool, StoreError>(false);
        }
        visit(&key, &V::bytes(v.value()))
    };
    match dir {
        Dir::Up => {
            for row in rows {
                if !step(row)? {
                    break;
                }
            }
        }
        Dir::Down => {
            for row in rows.rev() {
                if !step(row)? {
                    break;
                }
            }
        }
    }
    Ok(())
}

/// A read transaction (a snapshot).
pub(crate) struct Read(pub(crate) redb::ReadTransaction);

impl Txn for Read {
    fn get(&mut self, t: T, key: &[Part<'_>]) -> Result<Option<Vec<u8>>, StoreError> {
        with_table!(self.0, t, |tab| get(&tab, t, key))
    }
    fn put(&mut self, t: T, _: &[Part<'_>], _: &[u8]) -> Result<(), StoreError> {
        Err(StoreError::Invalid(format!(
            "store: write to {} in a read transaction",
            t.name()
        )))
    }
    fn remove(&mut self, t: T, _: &[Part<'_>]) -> Result<bool, StoreError> {
        Err(StoreError::Invalid(format!(
            "store: write to {} in a read transaction",
            t.name()
        )))
    }
    fn scan(
        &mut self,
        t: T,
        prefix: &[Part<'_>],
        from: Option<u64>,
        dir: Dir,
        visit: &mut Visit<'_>,
    ) -> Result<(), StoreError> {
        with_table!(self.0, t, |tab| scan(&tab, t, prefix, from, dir, visit))
    }
    fn len(&mut self, t: T) -> Result<u64, StoreError> {
        with_table!(self.0, t, |tab| Ok(tab.len()?))
    }
}

/// A write transaction.
pub(crate) struct Write(pub(crate) redb::WriteTransaction);

impl Txn for Write {
    fn get(&mut self, t: T, key: &[Part<'_>]) -> Result<Option<Vec<u8>>, StoreError> {
        with_table!(self.0, t, |tab| get(&tab, t, key))
    }
    fn put(&mut self, t: T, key: &[Part<'_>], value: &[u8]) -> Result<(), StoreError> {
        with_table!(self.0, t, |tab| put(&mut tab, t, key, value))
    }
    fn remove(&mut self, t: T, key: &[Part<'_>]) -> Result<bool, StoreError> {
        with_table!(self.0, t, |tab| remove(&mut tab, t, key))
    }
    fn scan(
        &mut self,
        t: T,
        prefix: &[Part<'_>],
        from: Option<u64>,
        dir: Dir,
        visit: &mut Visit<'_>,
    ) -> Result<(), StoreError> {
        with_table!(self.0, t, |tab| scan(&tab, t, prefix, from, dir, visit))
    }
    fn len(&mut self, t: T) -> Result<u64, StoreError> {
        with_table!(self.0, t, |tab| Ok(tab.len()?))
    }
}

/// Opens the database (again: redb refuses every transaction after an I/O error until reopened).
pub type Opener = Box<dyn Fn() -> Result<Database, StoreError> + Send + Sync>;

/// The redb backend.
pub(crate) struct Redb {
    /// The open database; `None` after a storage error until a reopen succeeds.
    slot: std::sync::RwLock<Option<std::sync::Arc<Database>>>,
    opener: Opener,
    /// Set by a storage error, cleared by a successful reopen; `/v1/health` answers 503 meanwhile.
    failing: std::sync::atomic::AtomicBool,
}

impl Redb {
    /// Opens the database and creates the tables it lacks.
    pub(crate) fn open_with(opener: Opener) -> Result<Redb, StoreError> {
        let db = opener()?;
        prepare(&db)?;
        Ok(Redb {
            slot: std::sync::RwLock::new(Some(std::sync::Arc::new(db))),
            opener,
            failing: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// The database, reopening it first if a storage error closed it.
    pub(crate) fn db(&self) -> Result<std::sync::Arc<Database>, StoreError> {
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

    /// Runs `f` on a snapshot.
    pub(crate) fn read<R>(&self, f: impl FnOnce(&mut dyn Txn) -> Result<R, StoreError>) -> Result<R, StoreError> {
        let mut txn = Read(self.db()?.begin_read()?);
        f(&mut txn)
    }

    /// Runs `f` in a durable write transaction; commits when it returns `Ok`.
    pub(crate) fn write<R>(&self, f: impl FnOnce(&mut dyn Txn) -> Result<R, StoreError>) -> Result<R, StoreError> {
        let mut txn = self.db()?.begin_write()?;
        txn.set_durability(Durability::Immediate)?;
        let mut w = Write(txn);
        let out = f(&mut w)?;
        w.0.commit()?;
        Ok(out)
    }

    /// After a storage error: drop the database so the next call reopens it (redb answers
    /// `PreviousIo` forever otherwise). The file is released once in-flight readers finish.
    pub(crate) fn storage_failed(&self) {
        self.failing.store(true, std::sync::atomic::Ordering::SeqCst);
        *self.slot.write().unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// False from a storage error until the store has been reopened.
    pub(crate) fn healthy(&self) -> bool {
        !self.failing.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Tries to reopen a failed store; true when it is usable again.
    pub(crate) fn recover(&self) -> bool {
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
}

/// Creates every table, and builds the run index once for stores written before it existed.
fn prepare(db: &Database) -> Result<(), StoreError> {
    let txn = db.begin_write()?;
    {
        let mut index = txn.open_table(RUN_EVENTS)?;
        if index.is_empty()? {
            let ev = txn.open_table(EVENTS)?;
            for row in ev.iter()? {
                let (k, v) = row?;
                let (device, seq) = k.value();
                if let Ok(r) = outpost_shared::journal::decode(v.value()) {
                    index.insert((device, r.run_id.as_str(), seq), ())?;
                }
            }
        }
    }
    for t in T::ALL {
        with_table!(txn, t, |tab| drop(tab));
    }
    txn.commit()?;
    Ok(())
}
