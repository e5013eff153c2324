//! A fresh database per test.
//!
//! [`TestDatabase::postgres`] creates a uniquely named database on the local PostgreSQL and drops
//! it (forcibly, connections and all) when the value is dropped, so tests run in parallel without
//! seeing each other's rows. PostgreSQL is required, not optional: when it is not reachable the
//! constructor panics with instructions rather than letting the test pass without it.
//! [`TestDatabase::sqlite`] gives the same shape for SQLite, so a test can run against both.

use std::future::Future;
use std::path::Path;
use std::time::Duration;

use sea_orm::{ConnectOptions, ConnectionTrait, Database};

/// Where the administrative connection goes unless `AGENTPLANE_TEST_POSTGRES_URL` says otherwise;
/// the `test` database exists only to have something to connect to for `CREATE DATABASE`.
pub const DEFAULT_ADMIN_URL: &str = "postgres://postgres@127.0.0.1:5432/test";
/// Environment variable overriding [`DEFAULT_ADMIN_URL`].
pub const ADMIN_URL_ENV: &str = "AGENTPLANE_TEST_POSTGRES_URL";
/// Environment variable choosing the backend of [`TestDatabase::from_env`]: `postgres` (default)
/// or `sqlite`.
pub const BACKEND_ENV: &str = "AGENTPLANE_TEST_DB";
/// A local server answers at once; waiting longer only delays the failure message.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Postgres,
    Sqlite,
}

#[derive(Debug)]
enum Inner {
    Postgres { admin_url: String, name: String },
    Sqlite { _dir: Option<tempfile::TempDir> },
}

/// A database that exists for the lifetime of this value.
#[derive(Debug)]
pub struct TestDatabase {
    url: String,
    inner: Inner,
}

/// Runs a future to completion on a private runtime in a helper thread. Constructors and `Drop`
/// are synchronous and may be called from inside any runtime, where `block_on` would panic.
fn run_aside<T, F>(make: impl FnOnce() -> F + Send + 'static) -> Result<T, String>
where
    T: Send + 'static,
    F: Future<Output = Result<T, String>>,
{
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("cannot build a runtime: {e}"))?;
        rt.block_on(make())
    })
    .join()
    .map_err(|_| "database helper thread panicked".to_string())?
}

/// `url` with its database name replaced by `name` (query string kept).
fn with_database(url: &str, name: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let authority_start = base.find("://").map(|i| i + 3).unwrap_or(0);
    let root = match base[authority_start..].find('/') {
        Some(i) => &base[..authority_start + i],
        None => base,
    };
    match query {
        Some(q) => format!("{root}/{name}?{q}"),
        None => format!("{root}/{name}"),
    }
}

fn admin_url() -> String {
    std::env::var(ADMIN_URL_ENV).unwrap_or_else(|_| DEFAULT_ADMIN_URL.to_string())
}

async fn admin_execute(admin_url: String, sql: String) -> Result<(), String> {
    let mut opts = ConnectOptions::new(admin_url.clone());
    opts.max_connections(1).connect_timeout(CONNECT_TIMEOUT).sqlx_logging(false);
    let db = Database::connect(opts).await.map_err(|e| format!("cannot connect to {admin_url}: {e}"))?;
    let result = db.execute_unprepared(&sql).await.map(|_| ()).map_err(|e| format!("`{sql}` failed: {e}"));
    let _ = db.close().await;
    result
}

impl TestDatabase {
    /// A new, empty PostgreSQL database.
    ///
    /// # Panics
    /// When PostgreSQL is not reachable or refuses `CREATE DATABASE`.
    pub fn postgres() -> Self {
        let admin_url = admin_url();
        // Unique across parallel tests and test binaries; lower-case so it needs no quoting rules.
        let name = format!("ap_test_{}", uuid::Uuid::now_v7().simple());
        let create = format!("CREATE DATABASE \"{name}\"");
        let url = admin_url.clone();
        if let Err(e) = run_aside(move || admin_execute(url, create)) {
            panic!(
                "PostgreSQL is required at 127.0.0.1:5432 (user `postgres`, database `test`; override with \
                 {ADMIN_URL_ENV}) and tests never skip without it. Start it (e.g. `pg_ctlcluster <version> main \
                 start`) or install it (`apt-get install -y postgresql`). Error: {e}"
            );
        }
        tracing::debug!(%name, "created test database");
        TestDatabase { url: with_database(&admin_url, &name), inner: Inner::Postgres { admin_url, name } }
    }

    /// A SQLite database file in `dir` (created on first connection); the caller owns `dir`.
    pub fn sqlite(dir: impl AsRef<Path>) -> Self {
        TestDatabase { url: sqlite_url(&dir.as_ref().join("agentplane.sqlite")), inner: Inner::Sqlite { _dir: None } }
    }

    /// A SQLite database in a temporary directory removed on drop.
    pub fn sqlite_temp() -> Self {
        let dir = tempfile::tempdir().expect("cannot create a temporary directory");
        let url = sqlite_url(&dir.path().join("agentplane.sqlite"));
        TestDatabase { url, inner: Inner::Sqlite { _dir: Some(dir) } }
    }

    /// PostgreSQL unless `AGENTPLANE_TEST_DB=sqlite`, so one test suite can cover both backends.
    pub fn from_env() -> Self {
        match std::env::var(BACKEND_ENV).as_deref() {
            Ok("sqlite") => Self::sqlite_temp(),
            Ok("postgres") | Err(_) => Self::postgres(),
            Ok(other) => panic!("{BACKEND_ENV} must be `postgres` or `sqlite`, not `{other}`"),
        }
    }

    /// The connection URL of this database.
    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn backend(&self) -> Backend {
        match self.inner {
            Inner::Postgres { .. } => Backend::Postgres,
            Inner::Sqlite { .. } => Backend::Sqlite,
        }
    }

    /// The PostgreSQL database name (`None` for SQLite).
    pub fn name(&self) -> Option<&str> {
        match &self.inner {
            Inner::Postgres { name, .. } => Some(name),
            Inner::Sqlite { .. } => None,
        }
    }
}

fn sqlite_url(file: &Path) -> String {
    // `mode=rwc` creates the file; without it SQLite refuses a missing database.
    format!("sqlite://{}?mode=rwc", file.display())
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        if let Inner::Postgres { admin_url, name } = &self.inner {
            // FORCE ends connections a server under test may still hold open.
            let drop_sql = format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)");
            let url = admin_url.clone();
            if let Err(e) = run_aside(move || admin_execute(url, drop_sql)) {
                tracing::warn!(%name, error = %e, "could not drop test database");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn database_name_is_replaced() {
        assert_eq!(with_database("postgres://u@h:5432/test", "x"), "postgres://u@h:5432/x");
        assert_eq!(with_database("postgres://u@h/test?sslmode=disable", "x"), "postgres://u@h/x?sslmode=disable");
        assert_eq!(with_database("postgres://u@h", "x"), "postgres://u@h/x");
    }

    async fn exists(name: &str) -> bool {
        let mut opts = ConnectOptions::new(admin_url());
        opts.max_connections(1).sqlx_logging(false);
        let db = Database::connect(opts).await.expect("admin connection");
        let row = db
            .query_one_raw(sea_orm::Statement::from_sql_and_values(
                sea_orm::DbBackend::Postgres,
                "SELECT 1 AS one FROM pg_database WHERE datname = $1",
                [name.into()],
            ))
            .await
            .expect("query pg_database");
        row.is_some()
    }

    #[tokio::test]
    async fn postgres_database_is_created_usable_and_dropped() {
        let db = TestDatabase::postgres();
        let name = db.name().expect("postgres name").to_string();
        assert_eq!(db.backend(), Backend::Postgres);
        assert!(exists(&name).await, "{name} should exist");

        // Hold a connection open across the drop: WITH (FORCE) must still remove the database.
        let conn = Database::connect(db.url()).await.expect("connect to the test database");
        conn.execute_unprepared("CREATE TABLE t (x int); INSERT INTO t VALUES (1)").await.expect("use it");
        drop(db);
        assert!(!exists(&name).await, "{name} should be dropped");
        let _ = conn.close().await;
    }

    #[test]
    fn sqlite_urls() {
        let db = TestDatabase::sqlite_temp();
        assert!(db.url().starts_with("sqlite:///"), "{}", db.url());
        assert!(db.url().ends_with("/agentplane.sqlite?mode=rwc"));
        assert_eq!(db.backend(), Backend::Sqlite);
        assert_eq!(TestDatabase::sqlite("/data").url(), "sqlite:///data/agentplane.sqlite?mode=rwc");
    }
}
