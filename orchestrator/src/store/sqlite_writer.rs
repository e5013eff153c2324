//! The SQLite group committer: a thread of its own with its own connection to the database
//! file, which takes every batch waiting, writes them in one transaction through statements it
//! keeps prepared, and tells each caller.
//!
//! Through sqlx each query was a hand-off from the committer's task to the connection's worker
//! thread and back, one per batch, and every value went through sqlx's argument conversion; here
//! a group is one hand-off to this thread and one message back per batch. Values are bound as
//! sqlx binds them, so sea-orm reads back what this thread writes
//! (`every_kind_of_op_reads_back_as_written` checks every kind of op).

use std::sync::Arc;
use std::time::{Duration, Instant};

use agentplane_actors::ports::StoreError;
use agentplane_schema::db::SQLITE_BUSY_TIMEOUT;
use chrono::Utc;
use rusqlite::types::Value as SqlValue;
use rusqlite::{Connection, OpenFlags, TransactionBehavior};
use sea_orm::DbBackend;
use sea_orm::sea_query::{OptionEnum, Value};
use tokio::sync::mpsc;

use super::{MAX_GROUP, PendingCommit, batch_statements};

/// Statements kept prepared: a few per kind of op.
const PREPARED_STATEMENTS: usize = 256;
/// WAL pages after which the writer asks for a checkpoint. SQLite's own default is 1,000 pages
/// (about 4 MB) and checkpoints inside the commit that crosses it. Under load that came every few
/// dozen group commits, each copying the latest version of every page changed since the last one
/// into the database file and syncing both files, while the same hot pages (the ends of the
/// tables and of each chat's index ranges) changed again in between; and the commit that ran it,
/// with every chat waiting on it, took that long. Here the checkpoints run on a thread of their
/// own, ten times less often, while commits go on: the WAL may grow to about 40 MB.
/// The pool's own connections checkpoint only past four times as many.
pub(super) const CHECKPOINT_AT_PAGES: i32 = (agentplane_schema::db::SQLITE_POOL_AUTOCHECKPOINT_PAGES / 4) as i32;

std::thread_local! {
    /// The WAL's length in pages after the writer thread's last commit, as SQLite reports it.
    static WAL_PAGES: std::cell::Cell<i32> = const { std::cell::Cell::new(0) };
    /// The busy timeout of the connection [`open`] made on this thread (none: a connection
    /// used on another thread than its own waits [`SQLITE_BUSY_TIMEOUT`]), and when the wait for
    /// the lock now being waited for began.
    static BUSY_WAIT: std::cell::Cell<(Duration, Option<Instant>)> =
        const { std::cell::Cell::new((Duration::ZERO, None)) };
}

/// The writer's (and checkpointer's) busy handler: tries again after 50 µs, doubling to 800 µs,
/// until the busy timeout has passed. SQLite's own handler sleeps 1, 2, 5, 10, 15, 20, 25 ms …
/// between tries, so a commit that found a pool connection's short write (a chat being created)
/// holding the lock went on milliseconds after it was free: commits of up to 28 ms at the start
/// of a `steps` run, 122 waits in its first 500 group commits.
fn wait_briefly(tries: std::ffi::c_int) -> bool {
    BUSY_WAIT.with(|wait| {
        let (limit, began) = wait.get();
        let limit = if limit.is_zero() { SQLITE_BUSY_TIMEOUT } else { limit };
        let now = Instant::now();
        let began = if tries == 0 { now } else { began.unwrap_or(now) };
        wait.set((limit, Some(began)));
        if now.duration_since(began) >= limit {
            return false;
        }
        std::thread::sleep(Duration::from_micros(50 << tries.clamp(0, 4)));
        true
    })
}

/// The writer connection's WAL hook. It replaces SQLite's automatic checkpoints on that
/// connection (which are themselves a WAL hook).
fn note_wal_pages(_: &rusqlite::hooks::Wal, pages: std::ffi::c_int) -> rusqlite::Result<()> {
    WAL_PAGES.with(|count| count.set(pages));
    Ok(())
}

/// The database the writer opens: the one sqlx's pool uses.
#[derive(Clone)]
pub(super) struct Target {
    /// A path, or a URI (`file:…`) when `uri` is set.
    name: String,
    uri: bool,
    vfs: Option<String>,
}

impl Target {
    /// Read from the pool's own options as sqlx understands them: a file (named by a path or a
    /// `file:` URI), or an in-memory database shared between the pool's connections under the
    /// name sqlx gave it; and the VFS the URL names, if any.
    pub(super) fn of(pool: &sea_orm::sqlx::SqlitePool) -> Self {
        use sea_orm::sqlx::ConnectOptions as _;
        let options = pool.connect_options();
        let filename = options.get_filename().to_string_lossy().into_owned();
        let memory = |name: String| Target { name: format!("{name}?mode=memory&cache=shared"), uri: true, vfs: None };
        // sqlx's name for `sqlite::memory:`, which its own URL of the options cannot hold.
        if filename.starts_with("file:sqlx-in-memory-") {
            return memory(filename);
        }
        if filename.starts_with("file:") {
            return Target { name: filename, uri: true, vfs: None };
        }
        let url = options.to_url_lossy();
        let param = |key: &str| url.query_pairs().find(|(k, _)| k == key).map(|(_, v)| v.into_owned());
        if param("mode").as_deref() == Some("memory") {
            return Target { vfs: param("vfs"), ..memory(format!("file:{filename}")) };
        }
        Target { name: filename, uri: false, vfs: param("vfs") }
    }
}

/// Starts the writer thread on `queue`, and the thread that checkpoints for it once the WAL holds
/// `checkpoint_at` pages; both end when every sender is gone.
pub(super) fn spawn(
    target: Target,
    busy_timeout: Duration,
    checkpoint_at: i32,
    queue: mpsc::UnboundedReceiver<PendingCommit>,
) -> Checkpoints {
    let checkpoints = Checkpoints::default();
    let (ask, asked) = std::sync::mpsc::sync_channel(1);
    let (name, done) = (target.clone(), checkpoints.clone());
    let started = std::thread::Builder::new()
        .name("sqlite-checkpoint".into())
        .spawn(move || checkpoint_when_asked(&name, busy_timeout, &asked, &done));
    if let Err(error) = started {
        // The WAL then grows until the server stops; commits still work.
        tracing::error!(%error, "could not start the SQLite checkpoint thread");
    }
    let started = std::thread::Builder::new()
        .name("sqlite-writer".into())
        // While the WAL is long every commit asks; one request waits at most, the rest are dropped.
        .spawn(move || {
            run(&target, busy_timeout, queue, |pages| {
                if pages >= checkpoint_at {
                    let _ = ask.try_send(());
                }
            })
        });
    if let Err(error) = started {
        // Nothing can commit without it; callers then get "the commit queue is closed".
        tracing::error!(%error, "could not start the SQLite writer thread");
    }
    checkpoints
}

/// How many checkpoints the checkpoint thread has run, and a way to wait for the next.
#[derive(Clone, Default)]
pub(super) struct Checkpoints(Arc<(std::sync::Mutex<u64>, std::sync::Condvar)>);

impl Checkpoints {
    fn count_one(&self) {
        let (count, changed) = &*self.0;
        *count.lock().unwrap_or_else(std::sync::PoisonError::into_inner) += 1;
        changed.notify_all();
    }

    /// Blocks until more than `seen` checkpoints have run, or `timeout` has passed; returns the
    /// count.
    #[cfg(test)]
    pub(super) fn wait_past(&self, seen: u64, timeout: Duration) -> u64 {
        let (count, changed) = &*self.0;
        let count = count.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let (count, _) = changed
            .wait_timeout_while(count, timeout, |count| *count <= seen)
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *count
    }
}

/// The checkpoint thread: a passive checkpoint each time the writer asks, on a connection of its
/// own. A passive checkpoint copies what no reader still needs and waits for nobody; commits go
/// on meanwhile, and the writer starts the WAL over at the first commit after one that copied
/// everything.
fn checkpoint_when_asked(
    target: &Target,
    busy_timeout: Duration,
    asked: &std::sync::mpsc::Receiver<()>,
    done: &Checkpoints,
) {
    let mut connection: Option<Connection> = None;
    while asked.recv().is_ok() {
        let conn = match &mut connection {
            Some(conn) => conn,
            None => match open(target, busy_timeout) {
                Ok(conn) => connection.insert(conn),
                Err(error) => {
                    tracing::warn!(%error, "the SQLite checkpoint thread could not open the database");
                    continue;
                }
            },
        };
        let passive = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |row| {
            Ok((row.get::<_, i64>(0)?, row.get::<_, i64>(1)?, row.get::<_, i64>(2)?))
        });
        match passive {
            Ok((_, log, copied)) => tracing::debug!(log, copied, "WAL checkpoint"),
            Err(error) => tracing::warn!(%error, "WAL checkpoint failed"),
        }
        done.count_one();
    }
}

fn run(
    target: &Target,
    busy_timeout: Duration,
    mut queue: mpsc::UnboundedReceiver<PendingCommit>,
    ask_for_checkpoint: impl Fn(i32),
) {
    let mut connection: Option<Connection> = None;
    let mut group = Vec::new();
    while let Some(first) = queue.blocking_recv() {
        group.push(first);
        while group.len() < MAX_GROUP {
            match queue.try_recv() {
                Ok(next) => group.push(next),
                Err(_) => break,
            }
        }
        let conn = match &mut connection {
            Some(conn) => conn,
            None => match open(target, busy_timeout) {
                Ok(conn) => connection.insert(conn),
                Err(error) => {
                    for pending in group.drain(..) {
                        let _ = pending.done.send(Err(StoreError::Database(error.to_string())));
                    }
                    continue;
                }
            },
        };
        commit_group(conn, std::mem::take(&mut group));
        ask_for_checkpoint(WAL_PAGES.with(std::cell::Cell::get));
        if !conn.is_autocommit() {
            // A transaction a failed rollback left open would hold the write lock: start afresh.
            tracing::warn!("the SQLite writer's connection was left in a transaction; reopening it");
            connection = None;
        }
    }
}

/// The connection, set up as sqlx sets up the pool's: WAL (the database already is),
/// `synchronous=NORMAL`, enforced foreign keys, the busy timeout (kept by [`wait_briefly`]), and
/// stable plans. Use it on the thread that opened it.
pub(super) fn open(target: &Target, busy_timeout: Duration) -> Result<Connection, StoreError> {
    let mut flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    if target.uri {
        flags |= OpenFlags::SQLITE_OPEN_URI;
    }
    let conn = match &target.vfs {
        Some(vfs) => Connection::open_with_flags_and_vfs(&target.name, flags, vfs.as_str()),
        None => Connection::open_with_flags(&target.name, flags),
    }
    .map_err(sqlite_err)?;
    // The connection is used on the thread that opens it.
    BUSY_WAIT.with(|wait| wait.set((busy_timeout, None)));
    conn.busy_handler(Some(wait_briefly)).map_err(sqlite_err)?;
    conn.execute_batch("PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; PRAGMA foreign_keys = ON;")
        .map_err(sqlite_err)?;
    // No checkpoints in commits: the checkpoint thread runs them.
    conn.wal_hook(Some(note_wal_pages));
    conn.set_db_config(rusqlite::config::DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG, true).map_err(sqlite_err)?;
    conn.set_prepared_statement_cache_capacity(PREPARED_STATEMENTS);
    Ok(conn)
}

/// One transaction for the group; should it fail, each batch in a transaction of its own, so a
/// batch that cannot be written fails alone. Each batch's statements are built and their values
/// converted once, before any transaction, and bound by reference in both attempts.
pub(super) fn commit_group(conn: &mut Connection, group: Vec<PendingCommit>) {
    let now = Now::new(Utc::now());
    let mut built = Vec::with_capacity(group.len());
    for PendingCommit { chat_id, batch, done } in group {
        // A batch that cannot be built fails alone, before anything is written.
        match statements(&chat_id, batch, &now) {
            Ok(statements) => built.push((statements, done)),
            Err(error) => drop(done.send(Err(error))),
        }
    }
    if built.len() > 1 {
        let all: Vec<&[Bound]> = built.iter().map(|(statements, _)| statements.as_slice()).collect();
        match write(conn, &all) {
            Ok(()) => {
                for (_, done) in built {
                    let _ = done.send(Ok(()));
                }
                return;
            }
            // No transaction could start (the write lock stayed taken past the busy timeout,
            // say): one per batch would only wait as long again for each.
            Err(Failed::Begin(error)) => {
                tracing::warn!(%error, batches = built.len(), "group commit could not begin");
                for (_, done) in built {
                    let _ = done.send(Err(StoreError::Database(error.to_string())));
                }
                return;
            }
            Err(Failed::Batch(error)) => {
                tracing::warn!(%error, batches = built.len(), "group commit failed; committing its batches one by one");
            }
        }
    }
    for (statements, done) in built {
        let _ = done.send(write(conn, std::slice::from_ref(&statements)).map_err(Failed::into_error));
    }
}

/// Why a write failed: its transaction could not begin, or something in its batches failed.
enum Failed {
    Begin(StoreError),
    Batch(StoreError),
}

impl Failed {
    fn into_error(self) -> StoreError {
        match self {
            Failed::Begin(e) | Failed::Batch(e) => e,
        }
    }
}

/// A statement's text and its values as SQLite binds them.
struct Bound {
    sql: String,
    values: Vec<SqlValue>,
}

/// The statements that write one chat's batch, ready to bind.
fn statements(chat_id: &str, batch: agentplane_actors::ports::Batch, now: &Now) -> Result<Vec<Bound>, StoreError> {
    batch_statements(DbBackend::Sqlite, chat_id, batch, now.time)?
        .into_iter()
        .map(|statement| {
            let values = statement.values.map(|v| v.0).unwrap_or_default();
            let values = values.into_iter().map(|value| sql_value(value, now)).collect::<Result<_, _>>()?;
            Ok(Bound { sql: statement.sql, values })
        })
        .collect()
}

/// Writes the batches' statements in one transaction, in order. Any failure rolls it back whole,
/// which the statements rely on: they do not undo their own part on a failure (`OR FAIL`).
fn write<S: AsRef<[Bound]>>(conn: &mut Connection, batches: &[S]) -> Result<(), Failed> {
    // IMMEDIATE: the write lock is taken (or waited for) at the start, never in the middle.
    let txn =
        conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(|e| Failed::Begin(sqlite_err(e)))?;
    for statement in batches.iter().flat_map(|batch| batch.as_ref()) {
        let mut prepared = txn.prepare_cached(&statement.sql).map_err(|e| Failed::Batch(sqlite_err(e)))?;
        prepared.execute(rusqlite::params_from_iter(&statement.values)).map_err(|e| Failed::Batch(sqlite_err(e)))?;
    }
    // Dropped without a commit, the transaction rolls back.
    txn.commit().map_err(|e| Failed::Batch(sqlite_err(e)))
}

/// The group's commit time, and its text: most timestamps a group writes are this one.
struct Now {
    time: chrono::DateTime<Utc>,
    text: String,
}

impl Now {
    fn new(time: chrono::DateTime<Utc>) -> Self {
        Now { time, text: timestamp_text(&time) }
    }
}

/// A timestamp as sqlx's SQLite driver binds it.
fn timestamp_text(time: &chrono::DateTime<Utc>) -> String {
    time.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, false)
}

/// A sea-query value as sqlx's SQLite driver binds it: booleans as integers, timestamps as
/// RFC 3339 text ([`timestamp_text`]; the group's commit time from `now`), JSON as its text.
fn sql_value(value: Value, now: &Now) -> Result<SqlValue, StoreError> {
    fn or_null<T>(value: Option<T>, f: impl FnOnce(T) -> SqlValue) -> SqlValue {
        value.map_or(SqlValue::Null, f)
    }
    Ok(match value {
        Value::Bool(v) => or_null(v, |b| SqlValue::Integer(b.into())),
        Value::TinyInt(v) => or_null(v, |i| SqlValue::Integer(i.into())),
        Value::SmallInt(v) => or_null(v, |i| SqlValue::Integer(i.into())),
        Value::Int(v) => or_null(v, |i| SqlValue::Integer(i.into())),
        Value::BigInt(v) => or_null(v, SqlValue::Integer),
        Value::TinyUnsigned(v) => or_null(v, |i| SqlValue::Integer(i.into())),
        Value::SmallUnsigned(v) => or_null(v, |i| SqlValue::Integer(i.into())),
        Value::Unsigned(v) => or_null(v, |i| SqlValue::Integer(i.into())),
        Value::BigUnsigned(Some(i)) => SqlValue::Integer(
            i64::try_from(i).map_err(|_| StoreError::Database(format!("{i} does not fit a SQLite integer")))?,
        ),
        Value::BigUnsigned(None) => SqlValue::Null,
        Value::Float(v) => or_null(v, |f| SqlValue::Real(f.into())),
        Value::Double(v) => or_null(v, SqlValue::Real),
        Value::String(v) => or_null(v, SqlValue::Text),
        Value::Char(v) => or_null(v, |c| SqlValue::Text(c.to_string())),
        Value::Enum(OptionEnum::Some(e)) => SqlValue::Text(e.value.into_owned()),
        Value::Enum(OptionEnum::None(_)) => SqlValue::Null,
        Value::Bytes(v) => or_null(v, SqlValue::Blob),
        Value::Json(v) => match v {
            Some(json) => {
                SqlValue::Text(serde_json::to_string(&json).map_err(|e| StoreError::Database(e.to_string()))?)
            }
            None => SqlValue::Null,
        },
        Value::ChronoDateTimeUtc(v) => {
            or_null(v, |t| SqlValue::Text(if t == now.time { now.text.clone() } else { timestamp_text(&t) }))
        }
        Value::ChronoDateTime(v) => or_null(v, |t| SqlValue::Text(t.format("%F %T%.f").to_string())),
        other => return Err(StoreError::Database(format!("no SQLite binding for {other:?}"))),
    })
}

fn sqlite_err(e: rusqlite::Error) -> StoreError {
    StoreError::Database(e.to_string())
}
