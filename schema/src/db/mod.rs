//! The database: sea-orm [`entities`] (one module per table), the [`migration`]s that create
//! them, and [`connect`] / [`connect_and_migrate`], which open a pool tuned for the backend.
//!
//! The same code runs on SQLite (the embedded single-replica default) and PostgreSQL (several
//! replicas): ids are UUID text, timestamps UTC, enumerations strings, structured values JSON, and
//! migrations use only sea-query's portable column types. Start reading at [`connect_and_migrate`].

pub mod entities;
pub mod migration;

#[cfg(test)]
mod tests;

use std::time::Duration;

use sea_orm::sqlx::sqlite::{SqliteJournalMode, SqliteSynchronous};
use sea_orm::{
    ConnectOptions, ConnectionTrait, Database, DatabaseConnection, DbBackend, DbErr, Statement, TransactionTrait,
};
use sea_orm_migration::MigratorTrait;

use self::migration::Migrator;

/// How long a SQLite connection waits for another writer's lock before failing with "busy".
pub const SQLITE_BUSY_TIMEOUT: Duration = Duration::from_millis(5000);

/// The smallest SQLite pool [`connect`] opens: with one connection a reader waits behind every
/// transaction (and a transaction that re-acquires the pool deadlocks), which defeats WAL.
pub const MIN_SQLITE_CONNECTIONS: u32 = 2;

/// WAL pages after which a commit through the pool checkpoints (SQLite's default is 1,000). The
/// orchestrator's store commits on a connection of its own and checkpoints on a thread of its own
/// at a quarter of this; a pool commit (creating a chat, an admin change) should not take over
/// that work in the middle of a request. This bounds the WAL of a database used without the store.
pub const SQLITE_POOL_AUTOCHECKPOINT_PAGES: u32 = 40_000;

/// Key of the PostgreSQL advisory lock that serialises migrations of replicas starting together.
const MIGRATION_LOCK_KEY: i64 = 0x6167_656e_7470_6c6e; // "agentpln"

/// Opens a connection pool for `url` (`sqlite:...` or `postgres://...` / `postgresql://...`).
///
/// SQLite: the file is created if missing, and every pooled connection uses WAL journaling,
/// `synchronous=NORMAL`, enforced foreign keys, a [`SQLITE_BUSY_TIMEOUT`] busy timeout and
/// checkpoints every [`SQLITE_POOL_AUTOCHECKPOINT_PAGES`] WAL pages; the
/// pool holds `max_connections` but at least [`MIN_SQLITE_CONNECTIONS`]. The directory of the
/// file must exist. PostgreSQL: the pool holds `max_connections` (at least one).
///
/// Statement logging is off: at sqlx's default level it would log every query.
pub async fn connect(url: &str, max_connections: u32) -> Result<DatabaseConnection, DbErr> {
    let mut options = ConnectOptions::new(url);
    options.sqlx_logging(false);
    match backend_of(url)? {
        DbBackend::Sqlite => {
            // An in-process SQLite connection cannot go stale: testing it on every checkout is a
            // round trip to its worker thread for nothing.
            options.max_connections(max_connections.max(MIN_SQLITE_CONNECTIONS)).test_before_acquire(false);
            options.map_sqlx_sqlite_pool_opts(|pool| pool.after_connect(|conn, _| Box::pin(stable_plans(conn))));
            options.map_sqlx_sqlite_opts(|sqlite| {
                sqlite
                    .create_if_missing(true)
                    .journal_mode(SqliteJournalMode::Wal)
                    .synchronous(SqliteSynchronous::Normal)
                    .foreign_keys(true)
                    .busy_timeout(SQLITE_BUSY_TIMEOUT)
                    .pragma("wal_autocheckpoint", SQLITE_POOL_AUTOCHECKPOINT_PAGES.to_string())
            });
        }
        _ => {
            // A connection idle for a while is pinged before use (the server or the network may
            // have cut it meanwhile); one in steady use is not: a ping is a round trip, and a
            // group commit of small batches is only a few.
            options.max_connections(max_connections.max(1)).test_before_acquire_if_idle_for(PING_AFTER_IDLE);
        }
    }
    Database::connect(options).await
}

/// How long a PostgreSQL connection may sit idle in the pool before it is pinged on checkout.
const PING_AFTER_IDLE: Duration = Duration::from_secs(1);

/// Turns on SQLite's query planner stability guarantee for `conn`, so that prepared statements
/// stay prepared. Without it, once SQLite prepares a statement again (as it does after any
/// schema change it notices, migrations included), it plans a `LIMIT` that is a bound parameter
/// with the bound value in mind and marks the statement to be prepared again whenever that
/// parameter is bound anew. sea-orm binds every limit (`one()` is `LIMIT ?`), so those queries
/// were compiled afresh on every run (≈ 5 % of the server's CPU in a profile of `loadgen
/// steps`). With the guarantee a plan never depends on bound values; no query here needs it to.
#[allow(unsafe_code)]
async fn stable_plans(conn: &mut sea_orm::sqlx::SqliteConnection) -> Result<(), sea_orm::sqlx::Error> {
    use libsqlite3_sys::{SQLITE_DBCONFIG_ENABLE_QPSG, SQLITE_OK, sqlite3_db_config};
    let mut handle = conn.lock_handle().await?;
    let db = handle.as_raw_handle().as_ptr();
    let mut enabled: std::ffi::c_int = 0;
    // SAFETY: `db` is this connection's open handle, locked for this thread's use while `handle`
    // lives; SQLITE_DBCONFIG_ENABLE_QPSG takes an int (1 = on) and an int* the setting is written
    // to, as the SQLite documentation of sqlite3_db_config specifies.
    let rc = unsafe { sqlite3_db_config(db, SQLITE_DBCONFIG_ENABLE_QPSG, 1 as std::ffi::c_int, &mut enabled) };
    if rc != SQLITE_OK || enabled != 1 {
        return Err(sea_orm::sqlx::Error::Configuration(
            format!("could not enable SQLite's query planner stability guarantee (code {rc})").into(),
        ));
    }
    Ok(())
}

/// [`connect`], then [`migrate`]: what a process calls on every start.
pub async fn connect_and_migrate(url: &str, max_connections: u32) -> Result<DatabaseConnection, DbErr> {
    let db = connect(url, max_connections).await?;
    migrate(&db).await?;
    Ok(db)
}

/// Applies every pending migration; does nothing when the schema is current.
///
/// On PostgreSQL the run holds a transaction-scoped advisory lock, so replicas that start at the
/// same time apply the migrations once, one after the other, instead of racing on `CREATE TABLE`.
/// SQLite is single-process (the embedded default), so no lock is taken there.
pub async fn migrate(db: &DatabaseConnection) -> Result<(), DbErr> {
    match db.get_database_backend() {
        DbBackend::Postgres => {
            let txn = db.begin().await?;
            txn.execute_raw(Statement::from_sql_and_values(
                DbBackend::Postgres,
                "SELECT pg_advisory_xact_lock($1)",
                [MIGRATION_LOCK_KEY.into()],
            ))
            .await?;
            Migrator::up(&txn, None).await?;
            txn.commit().await
        }
        _ => Migrator::up(db, None).await,
    }
}

/// The backend a URL names, judged by its scheme only (the URL may carry a password, so it is
/// never echoed in the error).
fn backend_of(url: &str) -> Result<DbBackend, DbErr> {
    let scheme = url.split_once(':').map(|(scheme, _)| scheme).unwrap_or("");
    match scheme {
        "sqlite" => Ok(DbBackend::Sqlite),
        "postgres" | "postgresql" => Ok(DbBackend::Postgres),
        other => {
            Err(DbErr::Custom(format!("unsupported database URL scheme {other:?}: expected sqlite: or postgres://")))
        }
    }
}
