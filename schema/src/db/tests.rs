//! Migrations and entities against a real SQLite file and a real PostgreSQL server.

use chrono::{DateTime, Utc};
use sea_orm::{
    ActiveModelTrait, ConnectionTrait, DatabaseConnection, DbBackend, EntityTrait, IntoActiveModel, PaginatorTrait,
    Statement, TransactionTrait,
};
use serde_json::json;

use super::entities::*;
use super::migration::Migrator;
use super::{connect, connect_and_migrate, migrate};

/// Admin database the PostgreSQL test connects to first; override with `AGENTPLANE_TEST_PG_URL`.
const DEFAULT_PG_URL: &str = "postgres://postgres@127.0.0.1:5432/test";

/// How long the PostgreSQL test waits for the server before failing.
const PG_CONNECT_LIMIT: std::time::Duration = std::time::Duration::from_secs(10);

/// A timestamp both backends keep exactly (PostgreSQL stores microseconds).
fn ts(offset_secs: i64) -> DateTime<Utc> {
    DateTime::from_timestamp(1_793_534_400 + offset_secs, 123_456_000).expect("valid timestamp")
}

fn unique_suffix() -> String {
    crate::new_id().replace('-', "")
}

/// Inserts `$model` through its active model and checks it reads back identical by `$key`.
macro_rules! round_trip {
    ($db:expr, $table:ident, $key:expr, $model:expr) => {{
        let key = $key;
        let model: $table::Model = $model;
        $table::Entity::insert(model.clone().into_active_model().reset_all())
            .exec_without_returning($db)
            .await
            .unwrap_or_else(|e| panic!("insert into {}: {e}", stringify!($table)));
        let back = $table::Entity::find_by_id(key)
            .one($db)
            .await
            .unwrap_or_else(|e| panic!("select from {}: {e}", stringify!($table)))
            .unwrap_or_else(|| panic!("row missing from {}", stringify!($table)));
        assert_eq!(back, model, "{} round trip", stringify!($table));
    }};
}

/// Writes and reads back one row of every table, exercising each column type.
async fn round_trip_every_entity(db: &DatabaseConnection) {
    let user_id = crate::new_id();
    let chat_id = crate::new_id();
    let message_id = crate::new_id();
    let model_id = crate::new_id();

    round_trip!(
        db,
        users,
        user_id.clone(),
        users::Model {
            id: user_id.clone(),
            name: format!("alice-{}", unique_suffix()),
            role: "admin".into(),
            created_at: ts(0),
        }
    );
    let token_id = crate::new_id();
    round_trip!(
        db,
        api_tokens,
        token_id.clone(),
        api_tokens::Model {
            id: token_id,
            user_id: user_id.clone(),
            name: "laptop".into(),
            token_hash: "ab".repeat(32),
            created_at: ts(1),
            last_used_at: Some(ts(2)),
            revoked: false,
        }
    );
    let provider_id = crate::new_id();
    round_trip!(
        db,
        providers,
        provider_id.clone(),
        providers::Model {
            id: provider_id.clone(),
            provider_type: "anthropic".into(),
            name: "anthropic-main".into(),
            base_url: "https://api.example.invalid".into(),
            api_key: Some("sk-secret".into()),
            settings: json!({"beta": ["a", "b"], "timeout_ms": 30000}),
            created_at: ts(3),
            updated_at: ts(4),
        }
    );
    round_trip!(
        db,
        models,
        model_id.clone(),
        models::Model {
            id: model_id.clone(),
            provider_id,
            model: "claude-x".into(),
            display_name: "Claude X".into(),
            context_window: 200_000,
            max_output_tokens: Some(64_000),
            vision: true,
            enabled: true,
            is_default: false,
            compaction_threshold: Some(0.75),
            input_price_per_mtok: Some(3.0),
            output_price_per_mtok: None,
            cache_read_price_per_mtok: Some(0.3),
            cache_write_price_per_mtok: None,
            settings: Some(json!({"api": "responses"})),
            created_at: ts(5),
        }
    );
    let template_id = crate::new_id();
    round_trip!(
        db,
        templates,
        template_id.clone(),
        templates::Model {
            id: template_id.clone(),
            name: "rust-dev".into(),
            description: "A Rust toolchain\nwith cargo.".into(),
            parameters: json!([{"name": "cpu", "type": "number"}]),
            provisioner: json!({"kind": "local"}),
            created_at: ts(6),
            updated_at: ts(7),
        }
    );
    let workspace_id = crate::new_id();
    round_trip!(
        db,
        workspaces,
        workspace_id.clone(),
        workspaces::Model {
            id: workspace_id.clone(),
            name: "ws".into(),
            template_id,
            owner_id: user_id.clone(),
            status: "running".into(),
            parameters: json!({"cpu": 2}),
            state: json!({}),
            logs: "provisioned\n".into(),
            created_at: ts(8),
            updated_at: ts(9),
        }
    );
    round_trip!(
        db,
        chats,
        chat_id.clone(),
        chats::Model {
            id: chat_id.clone(),
            owner_id: user_id.clone(),
            title: Some("A chat".into()),
            status: "idle".into(),
            model_id: Some(model_id.clone()),
            workspace_id: Some(workspace_id.clone()),
            parent_id: None,
            forked_from_chat_id: None,
            forked_from_message_id: None,
            archived: false,
            deleted: false,
            error_kind: Some("provider".into()),
            error_message: Some("rate limited".into()),
            last_seq: 42,
            owner_replica: Some("replica-1".into()),
            lease_until: Some(ts(60)),
            owner_epoch: 3,
            created_at: ts(10),
            updated_at: ts(11),
        }
    );
    round_trip!(
        db,
        messages,
        message_id.clone(),
        messages::Model {
            id: message_id.clone(),
            chat_id: chat_id.clone(),
            position: 0,
            role: "assistant".into(),
            parts: json!([{"type": "text", "text": "héllo ✓"}]),
            interrupted: true,
            deleted: false,
            user_id: None,
            model_id: Some(model_id.clone()),
            created_at: ts(12),
        }
    );
    let queued_id = crate::new_id();
    round_trip!(
        db,
        queued_messages,
        queued_id.clone(),
        queued_messages::Model {
            id: queued_id,
            chat_id: chat_id.clone(),
            position: 1,
            content: json!([{"type": "text", "text": "next"}]),
            user_id: user_id.clone(),
            created_at: ts(13),
        }
    );
    let tool_call_id = crate::new_id();
    round_trip!(
        db,
        tool_calls,
        tool_call_id.clone(),
        tool_calls::Model {
            id: tool_call_id,
            call_id: "toolu_01".into(),
            chat_id: chat_id.clone(),
            message_id: message_id.clone(),
            name: "execute".into(),
            args: json!({"z": 1, "a": {"cmd": "ls"}}),
            status: "done".into(),
            result: Some("Cargo.toml\n".into()),
            is_error: false,
            user_id: user_id.clone(),
            workspace_id: Some(workspace_id),
            exit_code: Some(-1),
            duration_ms: Some(1234),
            created_at: ts(14),
            finished_at: Some(ts(15)),
        }
    );
    let file_id = crate::new_id();
    round_trip!(
        db,
        files,
        file_id.clone(),
        files::Model {
            id: file_id,
            owner_id: user_id.clone(),
            content_type: "image/png".into(),
            size: 5,
            sha256: "cd".repeat(32),
            bytes: vec![0, 159, 146, 150, 255],
            created_at: ts(16),
        }
    );
    let usage_id = crate::new_id();
    round_trip!(
        db,
        usage,
        usage_id.clone(),
        usage::Model {
            id: usage_id,
            chat_id: chat_id.clone(),
            message_id: Some(message_id),
            model_id: Some(model_id),
            input_tokens: 1000,
            output_tokens: 200,
            cache_read_tokens: 300,
            cache_write_tokens: 0,
            cost_usd: Some(0.0123),
            created_at: ts(17),
        }
    );
    let audit_id = crate::new_id();
    round_trip!(
        db,
        audit_events,
        audit_id.clone(),
        audit_events::Model {
            id: audit_id,
            user_id: Some(user_id),
            action: "provider.create".into(),
            target_type: "provider".into(),
            target_id: None,
            details: json!({"name": "anthropic-main"}),
            created_at: ts(18),
        }
    );
    round_trip!(
        db,
        chat_events,
        (chat_id.clone(), 42_i64),
        chat_events::Model {
            chat_id: chat_id.clone(),
            seq: 42,
            kind: "message_done".into(),
            payload: json!({"message_id": "m", "seq": 42}),
            created_at: ts(19),
        }
    );

    // Constraints the application relies on.
    let duplicate_position = messages::Model {
        id: crate::new_id(),
        chat_id: chat_id.clone(),
        position: 0,
        role: "user".into(),
        parts: json!([]),
        interrupted: false,
        deleted: false,
        user_id: None,
        model_id: None,
        created_at: ts(20),
    };
    assert!(
        messages::Entity::insert(duplicate_position.into_active_model().reset_all())
            .exec_without_returning(db)
            .await
            .is_err(),
        "(chat_id, position) must be unique in messages"
    );
    let duplicate_event =
        chat_events::Model { chat_id, seq: 42, kind: "x".into(), payload: json!(null), created_at: ts(21) };
    assert!(
        chat_events::Entity::insert(duplicate_event.into_active_model().reset_all())
            .exec_without_returning(db)
            .await
            .is_err(),
        "(chat_id, seq) is the primary key of chat_events"
    );
}

async fn pragma(conn: &impl ConnectionTrait, name: &str) -> String {
    let row = conn
        .query_one_raw(Statement::from_string(DbBackend::Sqlite, format!("PRAGMA {name}")))
        .await
        .unwrap_or_else(|e| panic!("PRAGMA {name}: {e}"))
        .unwrap_or_else(|| panic!("PRAGMA {name} returned no row"));
    match row.try_get_by_index::<String>(0) {
        Ok(text) => text,
        Err(_) => row.try_get_by_index::<i64>(0).unwrap_or_else(|e| panic!("PRAGMA {name} value: {e}")).to_string(),
    }
}

/// A new directory for an SQLite database, and the URL of `agentplane.db` in it.
fn temp_sqlite() -> (std::path::PathBuf, String) {
    let dir = std::env::temp_dir().join(format!("ap_schema_{}", unique_suffix()));
    std::fs::create_dir_all(&dir).expect("create temp dir");
    let url = format!("sqlite://{}", dir.join("agentplane.db").display());
    (dir, url)
}

#[tokio::test]
async fn sqlite_file_migrates_round_trips_and_pools_wal_connections() {
    let (dir, url) = temp_sqlite();

    let db = connect_and_migrate(&url, 4).await.expect("connect and migrate");
    round_trip_every_entity(&db).await;
    migrate(&db).await.expect("second migration run is a no-op");
    assert_eq!(users::Entity::find().count(&db).await.expect("count"), 1);

    assert_eq!(pragma(&db, "journal_mode").await, "wal");

    // Several transactions open at once each hold their own pooled connection, and every one of
    // them was opened with the same settings.
    let mut open = Vec::new();
    for _ in 0..3 {
        open.push(db.begin().await.expect("begin concurrent transaction"));
    }
    for txn in &open {
        assert_eq!(pragma(txn, "journal_mode").await, "wal");
        assert_eq!(pragma(txn, "synchronous").await, "1", "synchronous=NORMAL");
        assert_eq!(pragma(txn, "foreign_keys").await, "1");
        assert_eq!(pragma(txn, "busy_timeout").await, "5000");
        assert_eq!(pragma(txn, "wal_autocheckpoint").await, "40000");
    }
    drop(open);

    // With WAL a reader on another connection is not blocked by an open write transaction and
    // does not see its uncommitted row.
    let writer = db.begin().await.expect("begin writer");
    let bob = users::Model { id: crate::new_id(), name: "bob".into(), role: "member".into(), created_at: ts(100) };
    bob.clone().into_active_model().reset_all().insert(&writer).await.expect("insert in writer");
    let seen = tokio::time::timeout(std::time::Duration::from_secs(2), users::Entity::find().count(&db))
        .await
        .expect("a read must not wait for the writer")
        .expect("count while writing");
    assert_eq!(seen, 1, "uncommitted row invisible to other connections");
    writer.commit().await.expect("commit writer");
    assert_eq!(users::Entity::find().count(&db).await.expect("count"), 2);

    db.close().await.expect("close pool");
    // A new pool on the same file finds the schema current.
    let again = connect_and_migrate(&url, 1).await.expect("reopen");
    assert_eq!(pragma(&again, "journal_mode").await, "wal");
    assert_eq!(users::Entity::find().count(&again).await.expect("count"), 2);
    again.close().await.expect("close pool");

    std::fs::remove_dir_all(&dir).expect("remove temp dir");
}

/// A tool call's finish finds its row by message and call id through the index made for it, and
/// the migration that made it can be undone and done again.
#[tokio::test]
async fn tool_calls_are_found_by_message_and_call_id() {
    use sea_orm_migration::MigratorTrait as _;
    let (dir, url) = temp_sqlite();
    // Checked on a connection of its own, opened after the schema changed (a connection that was
    // open keeps planning EXPLAIN with the schema it read before).
    let plan = || async {
        let db = connect(&url, 1).await.expect("connect");
        let rows = db
            .query_all_raw(Statement::from_string(
                DbBackend::Sqlite,
                "EXPLAIN QUERY PLAN UPDATE tool_calls SET status = 'done' \
                 WHERE message_id = 'm' AND call_id = 'c' AND chat_id = 'x'",
            ))
            .await
            .expect("explain");
        db.close().await.expect("close");
        rows.iter().map(|r| r.try_get_by_index::<String>(3).expect("detail")).collect::<Vec<_>>().join("; ")
    };
    let db = connect_and_migrate(&url, 2).await.expect("connect and migrate");
    let detail = plan().await;
    assert!(detail.contains("USING INDEX idx_tool_calls_message_call"), "{detail}");

    // It and the one after it.
    Migrator::down(&db, Some(2)).await.expect("undo the last two migrations");
    let detail = plan().await;
    assert!(detail.contains("USING INDEX idx_tool_calls_chat_call"), "undone: {detail}");
    migrate(&db).await.expect("migrate again");
    let detail = plan().await;
    assert!(detail.contains("USING INDEX idx_tool_calls_message_call"), "done again: {detail}");
    db.close().await.expect("close pool");
    std::fs::remove_dir_all(&dir).expect("remove temp dir");
}

/// A chat's usage is read through its messages and the usage index by message, and the
/// migration that made that index can be undone and done again.
#[tokio::test]
async fn usage_is_found_through_the_chats_messages() {
    use sea_orm_migration::MigratorTrait as _;
    let (dir, url) = temp_sqlite();
    let plan = |sql: &'static str| {
        let url = url.clone();
        async move {
            let db = connect(&url, 1).await.expect("connect");
            let rows = db
                .query_all_raw(Statement::from_string(DbBackend::Sqlite, format!("EXPLAIN QUERY PLAN {sql}")))
                .await
                .expect("explain");
            db.close().await.expect("close");
            rows.iter().map(|r| r.try_get_by_index::<String>(3).expect("detail")).collect::<Vec<_>>().join("; ")
        }
    };
    const BY_MESSAGES: &str =
        "SELECT * FROM usage WHERE message_id IN (SELECT id FROM messages WHERE chat_id IN ('a', 'b'))";
    const WITHOUT_MESSAGE: &str = "SELECT * FROM usage WHERE message_id IS NULL AND chat_id IN ('a', 'b')";
    let db = connect_and_migrate(&url, 2).await.expect("connect and migrate");
    let detail = plan(BY_MESSAGES).await;
    assert!(detail.contains("usage USING INDEX idx_usage_message (message_id=?)"), "{detail}");
    assert!(detail.contains("messages USING INDEX ux_messages_chat_position (chat_id=?)"), "{detail}");
    let detail = plan(WITHOUT_MESSAGE).await;
    assert!(detail.contains("USING INDEX idx_usage_message (message_id=?)"), "{detail}");

    Migrator::down(&db, Some(1)).await.expect("undo the last migration");
    let detail = plan(WITHOUT_MESSAGE).await;
    assert!(detail.contains("USING INDEX idx_usage_chat"), "undone: {detail}");
    migrate(&db).await.expect("migrate again");
    let detail = plan(BY_MESSAGES).await;
    assert!(detail.contains("USING INDEX idx_usage_message"), "done again: {detail}");
    db.close().await.expect("close pool");
    std::fs::remove_dir_all(&dir).expect("remove temp dir");
}

#[tokio::test]
async fn unsupported_url_scheme_is_an_error() {
    let err = connect("mysql://root:hunter2@localhost/db", 2).await.expect_err("mysql is not supported");
    let text = err.to_string();
    assert!(text.contains("mysql"), "{text}");
    assert!(!text.contains("hunter2"), "password leaked: {text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_migrates_and_round_trips() {
    let admin_url = std::env::var("AGENTPLANE_TEST_PG_URL").unwrap_or_else(|_| DEFAULT_PG_URL.to_owned());
    let unreachable = |why: String| -> ! {
        panic!(
            "PostgreSQL is required for this test but {admin_url} is not reachable ({why}); \
             start it (see PITFALLS.md) or point AGENTPLANE_TEST_PG_URL at one"
        )
    };
    let admin = match tokio::time::timeout(PG_CONNECT_LIMIT, connect(&admin_url, 2)).await {
        Ok(Ok(admin)) => admin,
        Ok(Err(e)) => unreachable(e.to_string()),
        Err(_) => unreachable(format!("no connection within {PG_CONNECT_LIMIT:?}")),
    };
    let name = format!("ap_schema_{}", unique_suffix());
    admin.execute_unprepared(&format!("CREATE DATABASE {name}")).await.expect("create test database");
    let (base, _) = admin_url.rsplit_once('/').expect("PostgreSQL URL names a database");
    let url = format!("{base}/{name}");

    let outcome = async move {
        // Replicas starting together (separate pools, in parallel): both succeed and the schema
        // is built once. Without the advisory lock one of them fails on `CREATE TABLE`.
        let replicas: Vec<_> = (0..3)
            .map(|_| {
                let url = url.clone();
                tokio::spawn(async move { connect_and_migrate(&url, 2).await })
            })
            .collect();
        for replica in replicas {
            let db = replica.await.expect("replica task").expect("concurrent connect and migrate");
            db.close().await.expect("close replica pool");
        }
        let db = connect(&url, 4).await.expect("connect to test database");
        round_trip_every_entity(&db).await;
        migrate(&db).await.expect("second migration run is a no-op");
        let applied = db
            .query_one_raw(Statement::from_string(DbBackend::Postgres, "SELECT count(*) FROM seaql_migrations"))
            .await
            .expect("count migrations")
            .expect("one row")
            .try_get_by_index::<i64>(0)
            .expect("count value");
        assert_eq!(applied, <super::Migrator as sea_orm_migration::MigratorTrait>::migrations().len() as i64);

        // Connections the server cut while they sat idle are found dead on checkout (the pool
        // pings a connection idle for a while) and replaced: every query still succeeds.
        let all_at_once = |db: &DatabaseConnection| {
            let queries: Vec<_> = (0..4)
                .map(|_| {
                    let db = db.clone();
                    tokio::spawn(async move { db.execute_unprepared("SELECT pg_sleep(0.05)").await.map(drop) })
                })
                .collect();
            async move {
                for query in queries {
                    query.await.expect("query task").expect("query on a pooled connection");
                }
            }
        };
        all_at_once(&db).await;
        let cut = db
            .query_one_raw(Statement::from_string(
                DbBackend::Postgres,
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
                 WHERE datname = current_database() AND pid <> pg_backend_pid()",
            ))
            .await
            .expect("terminate the other connections")
            .expect("one row")
            .try_get_by_index::<i64>(0)
            .expect("count");
        assert!(cut >= 1, "the pool held other connections to cut");
        tokio::time::sleep(super::PING_AFTER_IDLE + std::time::Duration::from_millis(100)).await;
        all_at_once(&db).await;
        db.close().await.expect("close pool");
    };
    // Drop the database even when an assertion fails, then report the failure.
    let result = tokio::spawn(outcome).await;
    admin
        .execute_unprepared(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .await
        .expect("drop test database");
    admin.close().await.expect("close admin pool");
    if let Err(e) = result {
        std::panic::resume_unwind(e.into_panic());
    }
}

/// How many times SQLite re-prepared the statements `conn` holds (sqlx keeps them prepared).
#[allow(unsafe_code)]
async fn reprepares(conn: &mut sea_orm::sqlx::SqliteConnection) -> i32 {
    use libsqlite3_sys::{SQLITE_STMTSTATUS_REPREPARE, sqlite3_next_stmt, sqlite3_stmt_status};
    let mut handle = conn.lock_handle().await.expect("lock the connection's handle");
    let db = handle.as_raw_handle().as_ptr();
    let mut total = 0;
    // SAFETY: `db` is the connection's open handle, locked for this thread while `handle` lives;
    // sqlite3_next_stmt walks the statements it owns, which nothing finalizes meanwhile.
    unsafe {
        let mut stmt = sqlite3_next_stmt(db, std::ptr::null_mut());
        while !stmt.is_null() {
            total += sqlite3_stmt_status(stmt, SQLITE_STMTSTATUS_REPREPARE, 0);
            stmt = sqlite3_next_stmt(db, stmt);
        }
    }
    total
}

/// Runs a `LIMIT ?` query on `conn`, changes the schema from `other` with `change`, runs the
/// query again, and returns how many times SQLite prepared it again over three more runs, each
/// with a new limit.
async fn reprepares_after_a_schema_change(
    conn: &mut sea_orm::sqlx::SqliteConnection,
    other: &mut sea_orm::sqlx::SqliteConnection,
    change: &'static str,
) -> i32 {
    use sea_orm::sqlx;
    let mut since = 0;
    for limit in 1..=5_i64 {
        sqlx::query("SELECT id FROM users WHERE name = ? LIMIT ?")
            .bind("nobody")
            .bind(limit)
            .execute(&mut *conn)
            .await
            .expect("query");
        match limit {
            1 => {
                sqlx::query(change).execute(&mut *other).await.expect("change the schema");
            }
            2 => since = reprepares(conn).await,
            _ => {}
        }
    }
    reprepares(conn).await - since
}

/// sea-orm binds every limit (`one()` is `LIMIT ?`). Once a schema change has made SQLite
/// prepare such a statement again, it plans with the bound limit in mind and from then on
/// prepares it again on every new binding, unless the query planner stability guarantee is on,
/// which [`connect`] turns on for every pooled connection.
#[tokio::test]
async fn sqlite_statements_with_a_bound_limit_are_not_prepared_on_every_binding() {
    use sea_orm::sqlx::{Connection, SqliteConnection};
    let (dir, url) = temp_sqlite();
    let db = connect_and_migrate(&url, 2).await.expect("connect and migrate");
    let mut other = SqliteConnection::connect(&url).await.expect("a second connection");

    let mut pooled = db.get_sqlite_connection_pool().acquire().await.expect("a pooled connection");
    let changed = "CREATE TABLE changed_once (x INTEGER)";
    assert_eq!(reprepares_after_a_schema_change(&mut pooled, &mut other, changed).await, 0);

    // Without the guarantee every new binding prepares the statement again: the check above
    // can fail.
    let mut plain = SqliteConnection::connect(&url).await.expect("a plain connection");
    let changed = "CREATE TABLE changed_twice (x INTEGER)";
    assert_eq!(reprepares_after_a_schema_change(&mut plain, &mut other, changed).await, 3);
    std::fs::remove_dir_all(&dir).ok();
}
