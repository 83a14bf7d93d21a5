//! The Postgres backend: the store's tables in one database shared by every cloud-sync replica.
//!
//! Every write transaction runs at `SERIALIZABLE` and is retried when Postgres reports a
//! serialisation failure, so the store's logic (written once, in `store::mod`) keeps the
//! guarantees it has on redb, where one writer runs at a time: two replicas storing batches of
//! one device both read and write its row, one of them is aborted and runs again on the other's
//! result, so no (device, seq) is stored twice and `next_seq` only moves contiguously.
//!
//! tokio-postgres connections are driven by one thread of their own; the store's callers (the
//! service's blocking tasks, admin commands, tests) wait on the client's futures from wherever
//! they are, so the store keeps its synchronous interface.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, Statement};

use super::StoreError;
use super::tables::{Dir, Kind, Owned, Part, T, Txn, Visit, shape_error};

/// The schema migrations, in order; `schema_migrations` records which ran.
const MIGRATIONS: [(i32, &str); 2] = [
    (1, include_str!("../../migrations/0001_tables.sql")),
    (2, include_str!("../../migrations/0002_device_counts.sql")),
];

/// Rows fetched per page of a scan.
const PAGE: i64 = 512;

/// Times a conflicting write transaction runs before the store gives up.
const MAX_ATTEMPTS: u32 = 50;

/// Connections kept open when idle.
const MAX_IDLE: usize = 16;

/// One connection and the statements prepared on it.
struct Conn {
    client: Client,
    prepared: HashMap<String, Statement>,
}

/// The channel replicas announce store changes on (`LISTEN`/`NOTIFY`).
const CHANGES_CHANNEL: &str = "outpost_changes";

/// Called when another replica (or this one) announced a change.
pub(crate) type OnChange = Box<dyn Fn() + Send + Sync>;

/// What the driver thread is asked to do.
enum Request {
    /// A new connection for the pool.
    Connect(
        tokio_postgres::Config,
        std::sync::mpsc::Sender<Result<Client, tokio_postgres::Error>>,
    ),
    /// Listen for change announcements for as long as the store lives (reconnecting after a
    /// server restart), calling back on each.
    Listen(tokio_postgres::Config, OnChange),
    /// Announce a change to every listening replica.
    Notify(tokio_postgres::Config),
}

/// The Postgres backend.
pub(crate) struct Postgres {
    /// `host:port/database`, for logs and `/v1/health` (never the password).
    target: String,
    config: tokio_postgres::Config,
    /// Where connection requests go; the driver thread ends when this is dropped.
    driver: Mutex<std::sync::mpsc::Sender<Request>>,
    idle: Mutex<Vec<Conn>>,
    failing: AtomicBool,
}

fn pg_error(e: tokio_postgres::Error) -> StoreError {
    match e.code() {
        Some(c) if *c == SqlState::T_R_SERIALIZATION_FAILURE || *c == SqlState::T_R_DEADLOCK_DETECTED => {
            StoreError::Conflict(e.to_string())
        }
        // A concurrent insert of the same key: the retry reads the other's row.
        Some(c) if *c == SqlState::UNIQUE_VIOLATION => StoreError::Conflict(e.to_string()),
        Some(_) => StoreError::Unavailable(format!("postgres: {}", db_message(&e))),
        None => StoreError::Unavailable(format!("postgres: {e}")),
    }
}

/// The server's message when there is one (tokio-postgres' Display says only "db error").
fn db_message(e: &tokio_postgres::Error) -> String {
    e.as_db_error()
        .map_or_else(|| e.to_string(), |d| d.message().to_string())
}

/// A Postgres number from a key column (bigint holds up to 2^63 - 1).
fn num(n: u64) -> Result<i64, StoreError> {
    i64::try_from(n).map_err(|_| StoreError::Invalid(format!("store: {n} is past what the Postgres store holds")))
}

/// `host:port/database` of a connection configuration.
fn describe(c: &tokio_postgres::Config) -> String {
    let host = match c.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
        Some(tokio_postgres::config::Host::Unix(p)) => p.display().to_string(),
        None => "localhost".into(),
    };
    let port = c.get_ports().first().copied().unwrap_or(5432);
    format!("{host}:{port}/{}", c.get_dbname().unwrap_or("postgres"))
}

/// The driver thread: connects on request and runs each connection until it closes.
fn drive(requests: std::sync::mpsc::Receiver<Request>) {
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the Postgres connection thread");
            return;
        }
    };
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Request>();
    // Blocking receives happen on a helper thread so the runtime keeps driving connections.
    std::thread::spawn(move || {
        while let Ok(r) = requests.recv() {
            if tx.send(r).is_err() {
                return;
            }
        }
    });
    rt.block_on(async move {
        let mut notifier: Option<Client> = None;
        while let Some(request) = rx.recv().await {
            match request {
                Request::Connect(config, reply) => {
                    let _ = reply.send(connect(&config).await);
                }
                Request::Listen(config, on_change) => {
                    tokio::spawn(listen(config, on_change));
                }
                Request::Notify(config) => {
                    if notifier.as_ref().is_none_or(Client::is_closed) {
                        notifier = connect(&config).await.ok();
                    }
                    if let Some(c) = &notifier
                        && let Err(e) = c.batch_execute(&format!("NOTIFY {CHANGES_CHANNEL}")).await
                    {
                        tracing::debug!(error = %e, "cannot announce a change");
                    }
                }
            }
        }
    });
}

/// A connection whose driving runs on this (the driver) thread.
async fn connect(config: &tokio_postgres::Config) -> Result<Client, tokio_postgres::Error> {
    let (client, connection) = config.connect(tokio_postgres::NoTls).await?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::warn!(error = %e, "postgres connection closed");
        }
    });
    Ok(client)
}

/// Listens for change announcements, reconnecting a second after the connection is lost.
async fn listen(config: tokio_postgres::Config, on_change: OnChange) {
    loop {
        if let Ok((client, mut connection)) = config.connect(tokio_postgres::NoTls).await {
            let sql = format!("LISTEN {CHANGES_CHANNEL}");
            let listening = client.batch_execute(&sql);
            let mut listening = std::pin::pin!(listening);
            let mut subscribed = false;
            loop {
                // Drive the connection (and its notifications) while the LISTEN is in flight.
                let message = std::future::poll_fn(|cx| {
                    if !subscribed && let std::task::Poll::Ready(r) = listening.as_mut().poll(cx) {
                        subscribed = true;
                        if r.is_ok() {
                            // Whatever changed while we were away: look again.
                            on_change();
                        }
                    }
                    connection.poll_message(cx)
                })
                .await;
                match message {
                    Some(Ok(tokio_postgres::AsyncMessage::Notification(_))) => on_change(),
                    Some(Ok(_)) => {}
                    Some(Err(_)) | None => break,
                }
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

impl Postgres {
    /// Connects and applies the migrations the database lacks (one replica at a time).
    pub(crate) fn connect(url: &str) -> Result<Postgres, StoreError> {
        let config: tokio_postgres::Config = url
            .parse()
            .map_err(|e| StoreError::Invalid(format!("store URL '{url}': {e}")))?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("postgres".into())
            .spawn(move || drive(rx))
            .map_err(|e| StoreError::Unavailable(format!("cannot start the Postgres thread: {e}")))?;
        let pg = Postgres {
            target: describe(&config),
            config,
            driver: Mutex::new(tx),
            idle: Mutex::new(Vec::new()),
            failing: AtomicBool::new(false),
        };
        pg.migrate()?;
        Ok(pg)
    }

    /// `host:port/database`.
    pub(crate) fn target(&self) -> &str {
        &self.target
    }

    fn new_conn(&self) -> Result<Conn, StoreError> {
        let (reply, answer) = std::sync::mpsc::channel();
        self.driver
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .send(Request::Connect(self.config.clone(), reply))
            .map_err(|_| StoreError::Unavailable("postgres: the connection thread is gone".into()))?;
        let client = answer
            .recv_timeout(Duration::from_secs(30))
            .map_err(|_| StoreError::Unavailable("postgres: no connection within 30 s".into()))?
            .map_err(|e| StoreError::Unavailable(format!("postgres: cannot connect: {e}")))?;
        Ok(Conn {
            client,
            prepared: HashMap::new(),
        })
    }

    /// Calls `on_change` whenever any replica announces a change (`notify`).
    pub(crate) fn on_change(&self, on_change: OnChange) {
        let _ = self
            .driver
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .send(Request::Listen(self.config.clone(), on_change));
    }

    /// Announces a change to every replica, without waiting (best effort: a lost announcement
    /// delays a console's live update until the next one).
    pub(crate) fn notify(&self) {
        let _ = self
            .driver
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .send(Request::Notify(self.config.clone()));
    }

    /// Waits for the session-level advisory lock `key`, held on a connection of its own until
    /// the returned guard drops (closing that connection releases it, also if this process dies).
    pub(crate) fn lock(&self, key: i64) -> Result<Held, StoreError> {
        let c = self.new_conn()?;
        block(c.client.execute("SELECT pg_advisory_lock($1)", &[&key]))?;
        Ok(Held { _conn: c.client })
    }

    /// An idle connection, or a new one.
    fn take(&self) -> Result<Conn, StoreError> {
        loop {
            let c = self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop();
            match c {
                Some(c) if c.client.is_closed() => continue,
                Some(c) => return Ok(c),
                None => return self.new_conn(),
            }
        }
    }

    fn give_back(&self, c: Conn) {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        if !c.client.is_closed() && idle.len() < MAX_IDLE {
            idle.push(c);
        }
    }

    fn migrate(&self) -> Result<(), StoreError> {
        let mut c = self.take()?;
        let run = |c: &mut Conn| -> Result<(), StoreError> {
            block(c.client.batch_execute(
                "BEGIN; SELECT pg_advisory_xact_lock(7301); \
                 CREATE TABLE IF NOT EXISTS schema_migrations (version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())",
            ))?;
            let applied: Vec<i32> = block(c.client.query("SELECT version FROM schema_migrations", &[]))?
                .iter()
                .map(|r| r.get(0))
                .collect();
            for (version, sql) in MIGRATIONS {
                if applied.contains(&version) {
                    continue;
                }
                block(c.client.batch_execute(sql))?;
                block(
                    c.client
                        .execute("INSERT INTO schema_migrations (version) VALUES ($1)", &[&version]),
                )?;
                tracing::info!(version, "postgres schema migration applied");
            }
            block(c.client.batch_execute("COMMIT"))?;
            Ok(())
        };
        let out = run(&mut c);
        if out.is_err() {
            let _ = block(c.client.batch_execute("ROLLBACK"));
        }
        self.give_back(c);
        out
    }

    /// Runs `f` in a `REPEATABLE READ READ ONLY` transaction: one snapshot for all its reads.
    pub(crate) fn read<R>(&self, f: impl FnOnce(&mut dyn Txn) -> Result<R, StoreError>) -> Result<R, StoreError> {
        let mut c = self.take().inspect_err(|_| self.note(true))?;
        let out = (|| {
            block(
                c.client
                    .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY"),
            )?;
            let r = f(&mut PgTxn { conn: &mut c });
            block(c.client.batch_execute(if r.is_ok() { "COMMIT" } else { "ROLLBACK" }))?;
            r
        })();
        self.finish(c, &out);
        out
    }

    /// Runs `f` in a `SERIALIZABLE` transaction, again after a serialisation failure.
    pub(crate) fn write<R>(&self, f: &mut dyn FnMut(&mut dyn Txn) -> Result<R, StoreError>) -> Result<R, StoreError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let mut c = self.take().inspect_err(|_| self.note(true))?;
            let out = (|| {
                block(c.client.batch_execute("BEGIN ISOLATION LEVEL SERIALIZABLE"))?;
                match f(&mut PgTxn { conn: &mut c }) {
                    Ok(r) => {
                        block(c.client.batch_execute("COMMIT"))?;
                        Ok(r)
                    }
                    Err(e) => {
                        block(c.client.batch_execute("ROLLBACK"))?;
                        Err(e)
                    }
                }
            })();
            if out.is_err() && !c.client.is_closed() {
                // A failed statement leaves the transaction aborted; end it before reuse.
                let _ = block(c.client.batch_execute("ROLLBACK"));
            }
            self.finish(c, &out);
            match out {
                Err(StoreError::Conflict(_)) if attempt < MAX_ATTEMPTS => {
                    std::thread::sleep(Duration::from_micros(
                        fastrand::u64(100..2_000) * u64::from(attempt.min(10)),
                    ));
                }
                other => return other,
            }
        }
    }

    /// Returns the connection and records whether the server answered: a transaction that got
    /// through clears a failure (a restarted server needs no `recover` to look healthy again).
    fn finish<R>(&self, c: Conn, out: &Result<R, StoreError>) {
        let failed = matches!(out, Err(StoreError::Unavailable(_))) || c.client.is_closed();
        self.failing.store(failed, Ordering::SeqCst);
        self.give_back(c);
    }

    fn note(&self, failed: bool) {
        if failed {
            self.failing.store(true, Ordering::SeqCst);
        }
    }

    /// After a storage error: drop the idle connections so the next call connects anew.
    pub(crate) fn storage_failed(&self) {
        self.failing.store(true, Ordering::SeqCst);
        self.idle.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }

    /// False from a connection failure until a query succeeds again.
    pub(crate) fn healthy(&self) -> bool {
        !self.failing.load(Ordering::SeqCst)
    }

    /// Tries the database again; true when it answers.
    pub(crate) fn recover(&self) -> bool {
        self.idle.lock().unwrap_or_else(|p| p.into_inner()).clear();
        let ok = self.take().and_then(|c| {
            let r = block(c.client.simple_query("SELECT 1"));
            self.give_back(c);
            r.map(drop)
        });
        match ok {
            Ok(()) => {
                self.failing.store(false, Ordering::SeqCst);
                true
            }
            Err(e) => {
                tracing::warn!(error = %e, "store still unavailable");
                false
            }
        }
    }
}

/// An advisory lock held for as long as this lives.
pub(crate) struct Held {
    _conn: Client,
}

/// Waits for a client future on this thread (the connection is driven on its own thread).
fn block<R>(f: impl std::future::Future<Output = Result<R, tokio_postgres::Error>>) -> Result<R, StoreError> {
    futures_executor::block_on(f).map_err(pg_error)
}

/// A transaction on one connection.
struct PgTxn<'c> {
    conn: &'c mut Conn,
}

/// One bound parameter.
enum Param {
    Text(String),
    Int(i64),
    Bytes(Vec<u8>),
}

impl Param {
    fn sql(&self) -> &(dyn ToSql + Sync) {
        match self {
            Param::Text(s) => s,
            Param::Int(n) => n,
            Param::Bytes(b) => b,
        }
    }
}

fn key_params(t: T, key: &[Part<'_>]) -> Result<Vec<Param>, StoreError> {
    if key.len() > t.key().len() {
        return Err(shape_error(t, key));
    }
    key.iter()
        .zip(t.key())
        .map(|(p, (_, kind))| match (p, kind) {
            (Part::Str(s), Kind::Str) => Ok(Param::Text((*s).to_string())),
            (Part::Num(n), Kind::Num) => Ok(Param::Int(num(*n)?)),
            _ => Err(shape_error(t, key)),
        })
        .collect()
}

/// `a = $1 AND b = $2` over the first `n` key columns, numbered from `first`.
fn equal(t: T, n: usize, first: usize) -> String {
    t.key()
        .iter()
        .take(n)
        .enumerate()
        .map(|(i, (c, _))| format!("{c} = ${}", first + i))
        .collect::<Vec<_>>()
        .join(" AND ")
}

fn columns(t: T) -> String {
    t.key().iter().map(|(c, _)| *c).collect::<Vec<_>>().join(", ")
}

impl PgTxn<'_> {
    fn statement(&mut self, sql: String) -> Result<Statement, StoreError> {
        if let Some(s) = self.conn.prepared.get(&sql) {
            return Ok(s.clone());
        }
        let s = block(self.conn.client.prepare(&sql))?;
        self.conn.prepared.insert(sql, s.clone());
        Ok(s)
    }

    fn query(&mut self, sql: String, params: &[Param]) -> Result<Vec<tokio_postgres::Row>, StoreError> {
        let s = self.statement(sql)?;
        let refs: Vec<&(dyn ToSql + Sync)> = params.iter().map(Param::sql).collect();
        block(self.conn.client.query(&s, &refs))
    }

    fn execute(&mut self, sql: String, params: &[Param]) -> Result<u64, StoreError> {
        let s = self.statement(sql)?;
        let refs: Vec<&(dyn ToSql + Sync)> = params.iter().map(Param::sql).collect();
        block(self.conn.client.execute(&s, &refs))
    }
}

/// A row's key columns back from Postgres.
fn read_key(t: T, row: &tokio_postgres::Row) -> Result<Vec<Owned>, StoreError> {
    t.key()
        .iter()
        .enumerate()
        .map(|(i, (_, kind))| match kind {
            Kind::Str => row.try_get::<_, String>(i).map(Owned::Str).map_err(pg_error),
            Kind::Num => row
                .try_get::<_, i64>(i)
                .map(|n| Owned::Num(u64::try_from(n).unwrap_or(0)))
                .map_err(pg_error),
        })
        .collect()
}

impl Txn for PgTxn<'_> {
    fn get(&mut self, t: T, key: &[Part<'_>]) -> Result<Option<Vec<u8>>, StoreError> {
        let n = t.key().len();
        if key.len() != n {
            return Err(shape_error(t, key));
        }
        let sql = format!("SELECT value FROM {} WHERE {}", t.name(), equal(t, n, 1));
        let rows = self.query(sql, &key_params(t, key)?)?;
        rows.first()
            .map(|r| r.try_get::<_, Vec<u8>>(0).map_err(pg_error))
            .transpose()
    }

    fn put(&mut self, t: T, key: &[Part<'_>], value: &[u8]) -> Result<(), StoreError> {
        let n = t.key().len();
        if key.len() != n {
            return Err(shape_error(t, key));
        }
        let cols = columns(t);
        let marks: Vec<String> = (1..=n + 1).map(|i| format!("${i}")).collect();
        let sql = format!(
            "INSERT INTO {} ({cols}, value) VALUES ({}) ON CONFLICT ({cols}) DO UPDATE SET value = EXCLUDED.value",
            t.name(),
            marks.join(", ")
        );
        let mut params = key_params(t, key)?;
        params.push(Param::Bytes(value.to_vec()));
        self.execute(sql, &params)?;
        Ok(())
    }

    fn remove(&mut self, t: T, key: &[Part<'_>]) -> Result<bool, StoreError> {
        let n = t.key().len();
        if key.len() != n {
            return Err(shape_error(t, key));
        }
        let sql = format!("DELETE FROM {} WHERE {}", t.name(), equal(t, n, 1));
        Ok(self.execute(sql, &key_params(t, key)?)? > 0)
    }

    fn scan(
        &mut self,
        t: T,
        prefix: &[Part<'_>],
        from: Option<u64>,
        dir: Dir,
        visit: &mut Visit<'_>,
    ) -> Result<(), StoreError> {
        if dir == Dir::Down && (!prefix.is_empty() || from.is_some()) {
            return Err(StoreError::Invalid("store: a downward scan takes no prefix".into()));
        }
        let cols = columns(t);
        let n = t.key().len();
        let base = key_params(t, prefix)?;
        let mut filter: Vec<String> = Vec::new();
        if !prefix.is_empty() {
            filter.push(equal(t, prefix.len(), 1));
        }
        let mut params = base;
        if let Some(f) = from {
            let (col, _) = t.key().get(prefix.len()).ok_or_else(|| shape_error(t, prefix))?;
            params.push(Param::Int(num(f)?));
            filter.push(format!("{col} >= ${}", params.len()));
        }
        let (order, cmp) = match dir {
            Dir::Up => ("ASC", ">"),
            Dir::Down => ("DESC", "<"),
        };
        let order_by = t
            .key()
            .iter()
            .map(|(c, _)| format!("{c} {order}"))
            .collect::<Vec<_>>()
            .join(", ");
        let mut after: Option<Vec<Owned>> = None;
        loop {
            let mut clauses = filter.clone();
            let mut p: Vec<Param> = params
                .iter()
                .map(|x| match x {
                    Param::Text(s) => Param::Text(s.clone()),
                    Param::Int(i) => Param::Int(*i),
                    Param::Bytes(b) => Param::Bytes(b.clone()),
                })
                .collect();
            if let Some(last) = &after {
                let first = p.len() + 1;
                for k in last {
                    p.push(match k {
                        Owned::Str(s) => Param::Text(s.clone()),
                        Owned::Num(v) => Param::Int(num(*v)?),
                    });
                }
                let marks: Vec<String> = (first..first + n).map(|i| format!("${i}")).collect();
                clauses.push(format!("({cols}) {cmp} ({})", marks.join(", ")));
            }
            let filter_sql = if clauses.is_empty() {
                String::new()
            } else {
                format!("WHERE {}", clauses.join(" AND "))
            };
            let sql = format!(
                "SELECT {cols}, value FROM {} {filter_sql} ORDER BY {order_by} LIMIT {PAGE}",
                t.name()
            );
            let rows = self.query(sql, &p)?;
            let full = rows.len() as i64 == PAGE;
            for row in &rows {
                let key = read_key(t, row)?;
                let value: Vec<u8> = row.try_get(n).map_err(pg_error)?;
                if !visit(&key, &value)? {
                    return Ok(());
                }
                after = Some(key);
            }
            if !full {
                return Ok(());
            }
        }
    }

    fn len(&mut self, t: T) -> Result<u64, StoreError> {
        let rows = self.query(format!("SELECT count(*) FROM {}", t.name()), &[])?;
        let n: i64 = rows
            .first()
            .map(|r| r.try_get(0))
            .transpose()
            .map_err(pg_error)?
            .unwrap_or(0);
        Ok(u64::try_from(n).unwrap_or(0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_migrations_create_every_table_with_its_key_columns() {
        let sql: String = MIGRATIONS.iter().map(|m| m.1).collect();
        for t in T::ALL {
            let cols: Vec<String> = t
                .key()
                .iter()
                .map(|(c, k)| match k {
                    Kind::Str => format!("{c} text COLLATE \"C\" NOT NULL"),
                    Kind::Num => format!("{c} bigint NOT NULL"),
                })
                .collect();
            let want = format!(
                "CREATE TABLE {} ({}, value bytea NOT NULL, PRIMARY KEY ({}));",
                t.name(),
                cols.join(", "),
                columns(t)
            );
            assert!(sql.contains(&want), "{want}");
        }
    }
}
