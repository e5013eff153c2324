//! The database adapter: [`DbStore`] implements the actors' [`Store`] port and the queries the
//! API needs, over sea-orm, on SQLite or PostgreSQL alike.

mod admin;
mod chats;
mod convert;
mod recent;
mod sql;
mod sqlite_writer;
mod uploads;

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::Arc;

use agentplane_actors::ports::{
    Batch, ChatState, ImageData, NewChild, Op, Prices, ResolvedModel, Store, StoreError, ToolCallStatus,
};
use agentplane_schema::api::{Chat, ProviderType, User};
use agentplane_schema::db::entities::{
    audit_events, chat_events, chats as chat_rows, files, messages, models, providers, queued_messages, tool_calls,
    usage,
};
use agentplane_schema::new_id;
use chrono::Utc;
use sea_orm::{
    ColumnTrait, ConnectionTrait, DatabaseConnection, DbBackend, DbErr, EntityTrait, QueryFilter, QueryOrder,
    Statement, TransactionTrait,
};
use tokio::sync::mpsc;

pub use chats::{NewChat, Snapshot};
pub use convert::{chat_from_row, message_from_row};
pub use uploads::{ImageKind, MAX_IMAGE_BYTES};

use self::recent::Recent;
use crate::secrets::SecretBox;

#[derive(Clone)]
pub struct DbStore {
    db: DatabaseConnection,
    /// Seals and opens provider API keys.
    secrets: SecretBox,
    /// Where chats' batches wait for the next group commit: one queue per committer, and each
    /// chat always uses the same one ([`committer_of`]).
    committers: Arc<[mpsc::UnboundedSender<PendingCommit>]>,
    /// Models as the loop uses them (provider row joined, key decrypted), by the id asked for
    /// (`None`: the default): every step resolves its model, and the rows rarely change. Emptied
    /// by every provider or model change made through this store; each is read again after
    /// [`MODEL_CACHE_TTL`] in case another process changed the rows.
    models: Arc<Recent<Option<String>, ResolvedModel>>,
    /// The user of each token (by its hash) a request came with: every API request asks, and a
    /// conversation sends many. Only tokens found are kept, so a new token works at once; a token
    /// revoked in the database stops working within [`TOKEN_CACHE_TTL`].
    tokens: Arc<Recent<String, User>>,
}

/// How long a resolved model is reused.
const MODEL_CACHE_TTL: std::time::Duration = std::time::Duration::from_secs(10);

/// How long a token's user is reused: the longest a revoked token still works.
pub const TOKEN_CACHE_TTL: std::time::Duration = std::time::Duration::from_secs(5);

/// Tokens kept at most (a sweep of expired ones, or of all, makes room).
const TOKEN_CACHE_CAPACITY: usize = 10_000;

/// Batches of different chats committed in one transaction at most.
const MAX_GROUP: usize = 256;

/// A chat's batch waiting to be committed, and who to tell.
struct PendingCommit {
    chat_id: String,
    batch: Batch,
    done: tokio::sync::oneshot::Sender<Result<(), StoreError>>,
}

/// Group commit: takes every batch waiting and commits them in one transaction, then tells each
/// caller, so many chats stepping at once pay for one transaction (one WAL append on SQLite, one
/// round trip of BEGIN/COMMIT on PostgreSQL) instead of one each. A caller hears `Ok` only after
/// that transaction committed. Should the group's transaction fail, each batch is committed on
/// its own, so a batch that cannot be written fails alone. A chat's batches all go through the
/// same loop's queue and are applied in the order they were sent — also when a caller stopped
/// waiting for an earlier one (an aborted step) and the chat sent the next meanwhile.
///
/// This is PostgreSQL's: several of these loops run ([`committers`]), each with its own queue
/// and connection, so while one group's statements make their round trips, others commit
/// theirs. SQLite's is a thread of its own ([`sqlite_writer`]).
async fn commit_loop(db: DatabaseConnection, mut queue: mpsc::UnboundedReceiver<PendingCommit>) {
    let mut group = Vec::new();
    while let Some(first) = queue.recv().await {
        group.push(first);
        while group.len() < MAX_GROUP {
            match queue.try_recv() {
                Ok(next) => group.push(next),
                Err(_) => break,
            }
        }
        commit_group(&db, std::mem::take(&mut group)).await;
    }
}

/// Which of `count` committers takes `chat_id`'s batches: always the same one.
fn committer_of(chat_id: &str, count: usize) -> usize {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    chat_id.hash(&mut hasher);
    (hasher.finish() % count.max(1) as u64) as usize
}

/// How many groups commit at the same time. SQLite has one writer at a time, and a second
/// transaction waiting for the write lock would only sleep in SQLite's busy handler; PostgreSQL
/// commits groups in parallel on separate connections (each group's statements are sequential
/// round trips, which left the database mostly idle with one committer).
fn committers(db: &DatabaseConnection) -> usize {
    match db.get_database_backend() {
        DbBackend::Sqlite => 1,
        _ => POSTGRES_COMMITTERS,
    }
}

/// Group committers on PostgreSQL: a few, leaving most of the pool (default 8) to readers.
const POSTGRES_COMMITTERS: usize = 3;

async fn commit_group(db: &DatabaseConnection, mut group: Vec<PendingCommit>) {
    let now = Utc::now();
    if group.len() == 1 {
        let PendingCommit { chat_id, batch, done } = group.remove(0);
        let _ = done.send(write(db, vec![(&chat_id, batch)], now).await);
        return;
    }
    // The originals stay for the fallback; the copies go into the group's transaction.
    let copies = group.iter().map(|p| (p.chat_id.as_str(), p.batch.clone())).collect();
    match write(db, copies, now).await {
        Ok(()) => {
            for pending in group {
                let _ = pending.done.send(Ok(()));
            }
        }
        Err(error) => {
            tracing::warn!(%error, batches = group.len(), "group commit failed; committing its batches one by one");
            for PendingCommit { chat_id, batch, done } in group {
                let _ = done.send(write(db, vec![(&chat_id, batch)], now).await);
            }
        }
    }
}

/// Writes the chats' batches atomically on a connection from the pool, in order: one statement
/// per batch where its statements are independent ([`one_statement`]), and all of them in one
/// transaction (a single statement is a transaction of its own).
async fn write(
    db: &DatabaseConnection,
    batches: Vec<(&str, Batch)>,
    now: chrono::DateTime<Utc>,
) -> Result<(), StoreError> {
    let backend = db.get_database_backend();
    let mut statements = Vec::new();
    for (chat_id, batch) in batches {
        let independent = backend == DbBackend::Postgres && independent_ops(&batch.ops);
        let batch = batch_statements(backend, chat_id, batch, now)?;
        statements.extend(if independent { one_statement(batch) } else { batch });
    }
    // One statement is atomic on its own: no BEGIN and COMMIT round trips around it.
    if statements.len() == 1 {
        let statement = statements.pop().expect("one statement");
        return db.execute_raw(statement).await.map(drop).map_err(db_err);
    }
    let txn = db.begin().await.map_err(db_err)?;
    for statement in statements {
        txn.execute_raw(statement).await.map_err(db_err)?;
    }
    txn.commit().await.map_err(db_err)
}

/// Whether a batch's statements may run as one: none of them reads or changes a row another
/// of them writes (the parts of a PostgreSQL `WITH` all see the rows as they were before the
/// statement). Its inserts, the finish of calls made in earlier batches, and the chat row's
/// update qualify; dropping messages and changing queued messages are left in order.
fn independent_ops(ops: &[Op]) -> bool {
    ops.iter().all(|op| {
        match op {
            Op::InsertMessage(_)
            | Op::InsertToolCall { .. }
            | Op::RecordUsage { .. }
            | Op::Audit { .. }
            | Op::SetStatus { .. }
            | Op::SetWorkspace(_)
            | Op::SetTitle(_)
            | Op::SetArchived(_) => true,
            // Not the finish of a call inserted in the same batch, nor a call finished twice (one
            // statement updating a row twice keeps one of the updates, which one unspecified).
            Op::FinishToolCall { call_id, message_id, .. } => {
                ops.iter()
                    .filter(|other| match other {
                        Op::InsertToolCall { call_id: c, message_id: m, .. }
                        | Op::FinishToolCall { call_id: c, message_id: m, .. } => c == call_id && m == message_id,
                        _ => false,
                    })
                    .count()
                    == 1
            }
            Op::InsertQueued { .. }
            | Op::DeleteQueued { .. }
            | Op::UpdateQueued { .. }
            | Op::DropMessagesFrom { .. } => false,
        }
    })
}

/// Most values one combined statement binds; PostgreSQL takes at most 65,535.
const MAX_COMBINED_VALUES: usize = 16_384;

/// PostgreSQL: a batch's statements as one, every one but the last a data-modifying part of a
/// `WITH`, so the batch costs one round trip to the database instead of one per statement.
/// Each part runs exactly once and to completion. The placeholders are renumbered in order.
fn one_statement(statements: Vec<Statement>) -> Vec<Statement> {
    let count: usize = statements.iter().map(|s| s.values.as_ref().map_or(0, |v| v.0.len())).sum();
    if statements.len() < 2 || count > MAX_COMBINED_VALUES {
        return statements;
    }
    let last = statements.len() - 1;
    let mut sql = String::from("WITH ");
    let mut values = Vec::with_capacity(count);
    for (index, statement) in statements.into_iter().enumerate() {
        let offset = values.len();
        if index == last {
            sql.push(' ');
            renumber_placeholders(&statement.sql, offset, &mut sql);
        } else {
            if index > 0 {
                sql.push_str(", ");
            }
            let _ = write!(sql, "p{index} AS (");
            renumber_placeholders(&statement.sql, offset, &mut sql);
            sql.push(')');
        }
        values.extend(statement.values.map(|v| v.0).unwrap_or_default());
    }
    vec![Statement::from_sql_and_values(DbBackend::Postgres, sql, values)]
}

/// Copies `sql` to `out` with every `$n` placeholder outside quotes made `$(n + offset)`.
fn renumber_placeholders(sql: &str, offset: usize, out: &mut String) {
    let mut quote = None;
    let mut chars = sql.chars().peekable();
    while let Some(c) = chars.next() {
        match (quote, c) {
            (None, '"' | '\'') => quote = Some(c),
            (Some(q), c) if c == q => quote = None,
            (None, '$') if chars.peek().is_some_and(char::is_ascii_digit) => {
                let mut number = 0usize;
                while let Some(digit) = chars.peek().and_then(|d| d.to_digit(10)) {
                    number = number * 10 + digit as usize;
                    chars.next();
                }
                out.push('$');
                out.push_str(&(number + offset).to_string());
                continue;
            }
            _ => {}
        }
        out.push(c);
    }
}

/// The provider's settings with the model's laid over them, key by key.
fn merged_settings(provider: serde_json::Value, model: Option<serde_json::Value>) -> serde_json::Value {
    match (provider, model) {
        (serde_json::Value::Object(mut base), Some(serde_json::Value::Object(over))) => {
            base.extend(over);
            serde_json::Value::Object(base)
        }
        (serde_json::Value::Null, Some(over)) => over,
        (base, _) => base,
    }
}

pub(crate) fn db_err(e: DbErr) -> StoreError {
    StoreError::Database(e.to_string())
}

impl DbStore {
    /// Must be called inside a Tokio runtime: it starts the group-commit task there.
    pub fn new(db: DatabaseConnection, secrets: SecretBox) -> Self {
        let committers = (0..committers(&db))
            .map(|_| {
                let (committer, queue) = mpsc::unbounded_channel();
                match db.get_database_backend() {
                    DbBackend::Sqlite => drop(sqlite_writer::spawn(
                        sqlite_writer::Target::of(db.get_sqlite_connection_pool()),
                        agentplane_schema::db::SQLITE_BUSY_TIMEOUT,
                        sqlite_writer::CHECKPOINT_AT_PAGES,
                        queue,
                    )),
                    _ => drop(tokio::spawn(commit_loop(db.clone(), queue))),
                }
                committer
            })
            .collect();
        DbStore {
            db,
            secrets,
            committers,
            models: Arc::new(Recent::new(MODEL_CACHE_TTL, 64)),
            tokens: Arc::new(Recent::new(TOKEN_CACHE_TTL, TOKEN_CACHE_CAPACITY)),
        }
    }

    /// A transaction that writes. On SQLite it takes the write lock at `BEGIN`, waiting for it
    /// as long as the busy timeout allows, and not at its first write: a transaction that has
    /// read by then fails at once with "busy" should another connection have written in between,
    /// and the writer thread commits all the time.
    pub(crate) async fn begin_write(&self) -> Result<sea_orm::DatabaseTransaction, StoreError> {
        let options = sea_orm::TransactionOptions {
            sqlite_transaction_mode: Some(sea_orm::SqliteTransactionMode::Immediate),
            ..Default::default()
        };
        self.db.begin_with_options(options).await.map_err(db_err)
    }

    pub fn connection(&self) -> &DatabaseConnection {
        &self.db
    }

    async fn resolve_model_uncached(&self, model_id: Option<&str>) -> Result<ResolvedModel, StoreError> {
        let model = match model_id {
            Some(id) => models::Entity::find_by_id(id).filter(models::Column::Enabled.eq(true)).one(&self.db).await,
            None => {
                models::Entity::find()
                    .filter(models::Column::Enabled.eq(true))
                    .order_by_desc(models::Column::IsDefault)
                    .order_by_asc(models::Column::CreatedAt)
                    .one(&self.db)
                    .await
            }
        }
        .map_err(db_err)?
        .ok_or_else(|| match model_id {
            Some(id) => StoreError::NotFound(format!("model {id} does not exist or is disabled")),
            None => StoreError::NotFound("no enabled model is configured".into()),
        })?;
        let provider = providers::Entity::find_by_id(&model.provider_id)
            .one(&self.db)
            .await
            .map_err(db_err)?
            .ok_or_else(|| StoreError::NotFound(format!("provider {} of model {}", model.provider_id, model.id)))?;
        let provider_type = ProviderType::parse(&provider.provider_type).ok_or_else(|| {
            StoreError::NotFound(format!("provider type `{}` is not supported", provider.provider_type))
        })?;
        let api_key = self.provider_api_key(&provider)?;
        Ok(ResolvedModel {
            id: model.id,
            context_window: model.context_window,
            compaction_threshold: model.compaction_threshold.filter(|t| *t > 0.0 && *t <= 1.0).unwrap_or(0.7),
            vision: model.vision,
            prices: Prices {
                input: model.input_price_per_mtok,
                output: model.output_price_per_mtok,
                cache_read: model.cache_read_price_per_mtok,
                cache_write: model.cache_write_price_per_mtok,
            },
            target: agentplane_actors::ports::ModelTarget {
                provider_type,
                base_url: provider.base_url,
                api_key,
                model: model.model,
                max_output_tokens: model.max_output_tokens,
                settings: merged_settings(provider.settings, model.settings),
            },
        })
    }

    /// Forgets every resolved model; called after a provider or model row changed.
    pub(crate) fn forget_models(&self) {
        self.models.forget_all();
    }
}

#[async_trait::async_trait]
impl Store for DbStore {
    async fn load_chat(&self, chat_id: &str) -> Result<ChatState, StoreError> {
        let row = chat_rows::Entity::find_by_id(chat_id)
            .filter(chat_rows::Column::Deleted.eq(false))
            .one(&self.db)
            .await
            .map_err(db_err)?
            .ok_or_else(|| StoreError::NotFound(format!("chat {chat_id}")))?;
        let last_seq = row.last_seq;
        let rows = messages::Entity::find()
            .filter(messages::Column::ChatId.eq(chat_id))
            .order_by_asc(messages::Column::Position)
            .all(&self.db)
            .await
            .map_err(db_err)?;
        let last_position = rows.last().map(|m| m.position).unwrap_or(0);
        let messages = rows.into_iter().filter(|m| !m.deleted).map(message_from_row).collect::<Result<_, _>>()?;
        let queued = self.queued(chat_id).await?;
        let mut depth = 0;
        let mut ancestor = row.parent_id.clone();
        while let Some(id) = ancestor {
            depth += 1;
            ancestor =
                chat_rows::Entity::find_by_id(&id).one(&self.db).await.map_err(db_err)?.and_then(|c| c.parent_id);
        }
        let children = self.children(chat_id).await?;
        Ok(ChatState { chat: chat_from_row(row), messages, queued, last_seq, last_position, depth, children })
    }

    async fn create_child(&self, child: NewChild) -> Result<Chat, StoreError> {
        self.create_chat(NewChat {
            owner_id: child.parent.owner_id.clone(),
            title: child.title,
            model_id: child.model_id.or(child.parent.model_id.clone()),
            workspace_id: child.workspace_id,
            parent_id: Some(child.parent.id.clone()),
        })
        .await
    }

    async fn load_images(&self, file_ids: &[String]) -> Result<HashMap<String, ImageData>, StoreError> {
        let rows = files::Entity::find()
            .filter(files::Column::Id.is_in(file_ids.to_vec()))
            .all(&self.db)
            .await
            .map_err(db_err)?;
        Ok(rows.into_iter().map(|r| (r.id, ImageData { media_type: r.content_type, bytes: r.bytes.into() })).collect())
    }

    async fn resolve_model(&self, model_id: Option<&str>) -> Result<ResolvedModel, StoreError> {
        let key = model_id.map(str::to_string);
        let miss = match self.models.get(&key) {
            Ok(model) => return Ok(model),
            Err(miss) => miss,
        };
        let resolved = self.resolve_model_uncached(model_id).await?;
        self.models.put(miss, key, resolved.clone());
        Ok(resolved)
    }

    /// Applies `batch` atomically, grouped with the batches other chats commit at the same moment
    /// (see [`commit_loop`]); returns once the transaction holding it has committed.
    async fn commit(&self, chat_id: &str, batch: Batch) -> Result<(), StoreError> {
        let (done, result) = tokio::sync::oneshot::channel();
        self.committers[committer_of(chat_id, self.committers.len())]
            .send(PendingCommit { chat_id: chat_id.to_string(), batch, done })
            .map_err(|_| StoreError::Database("the commit queue is closed (shutting down)".into()))?;
        result.await.map_err(|_| StoreError::Database("the commit queue stopped before committing".into()))?
    }
}

/// The statements that write one chat's batch.
fn batch_statements(
    backend: DbBackend,
    chat_id: &str,
    batch: Batch,
    now: chrono::DateTime<Utc>,
) -> Result<Vec<Statement>, StoreError> {
    use sql::{Sql, json};
    let mut statements = Vec::with_capacity(batch.ops.len() + 2);
    // The chat row's changes, the last of each kind counting: written once, after the others.
    let mut status = None;
    let mut workspace = None;
    let mut title = None;
    let mut archived = None;
    for op in batch.ops {
        let statement = match op {
            Op::InsertMessage(m) => {
                use messages::Column as C;
                Sql::insert_one(
                    backend,
                    messages::Entity,
                    [
                        (C::Id, m.id.into()),
                        (C::ChatId, m.chat_id.into()),
                        (C::Position, m.position.into()),
                        (C::Role, m.role.as_str().into()),
                        (C::Parts, json(backend, &m.parts)?),
                        (C::Interrupted, m.interrupted.into()),
                        (C::Deleted, false.into()),
                        (C::UserId, m.user_id.into()),
                        (C::ModelId, m.model_id.into()),
                        (C::CreatedAt, m.created_at.into()),
                    ],
                )
            }
            Op::SetStatus { status: s, error } => {
                status = Some((s, error));
                continue;
            }
            Op::SetWorkspace(w) => {
                workspace = Some(w);
                continue;
            }
            Op::InsertQueued { message, position } => {
                use queued_messages::Column as C;
                Sql::insert_one(
                    backend,
                    queued_messages::Entity,
                    [
                        (C::Id, message.id.into()),
                        (C::ChatId, message.chat_id.into()),
                        (C::Position, position.into()),
                        (C::Content, json(backend, &message.content)?),
                        (C::UserId, message.user_id.into()),
                        (C::CreatedAt, message.created_at.into()),
                    ],
                )
            }
            Op::DeleteQueued { id } => {
                let mut delete = Sql::delete(backend, queued_messages::Entity);
                delete.and_where(queued_messages::Column::Id, "=", id);
                delete
            }
            Op::SetTitle(t) => {
                title = Some(t);
                continue;
            }
            Op::SetArchived(a) => {
                archived = Some(a);
                continue;
            }
            Op::DropMessagesFrom { from_position } => {
                let mut update = Sql::update(backend, messages::Entity);
                update.set(messages::Column::Deleted, true);
                update.and_where(messages::Column::ChatId, "=", chat_id);
                update.and_where(messages::Column::Position, ">=", from_position);
                update
            }
            Op::UpdateQueued { id, content } => {
                let mut update = Sql::update(backend, queued_messages::Entity);
                update.set(queued_messages::Column::Content, json(backend, &content)?);
                update.and_where(queued_messages::Column::Id, "=", id);
                update
            }
            Op::InsertToolCall { id, call_id, message_id, name, args, user_id, workspace_id } => {
                use tool_calls::Column as C;
                Sql::insert_one(
                    backend,
                    tool_calls::Entity,
                    [
                        (C::Id, id.into()),
                        (C::CallId, call_id.into()),
                        (C::ChatId, chat_id.into()),
                        (C::MessageId, message_id.into()),
                        (C::Name, name.into()),
                        (C::Args, json(backend, &args)?),
                        (C::Status, ToolCallStatus::Dispatched.as_str().into()),
                        (C::IsError, false.into()),
                        (C::UserId, user_id.into()),
                        (C::WorkspaceId, workspace_id.into()),
                        (C::CreatedAt, now.into()),
                    ],
                )
            }
            Op::FinishToolCall {
                call_id,
                message_id,
                status,
                result,
                is_error,
                exit_code,
                duration_ms,
                workspace_id,
            } => {
                use tool_calls::Column as C;
                let mut update = Sql::update(backend, tool_calls::Entity);
                update.set(C::Status, status.as_str());
                update.set(C::Result, result);
                update.set(C::IsError, is_error);
                update.set(C::ExitCode, exit_code);
                update.set(C::DurationMs, duration_ms.map(|d| d as i64));
                update.set(C::FinishedAt, now);
                if workspace_id.is_some() {
                    update.set(C::WorkspaceId, workspace_id);
                }
                // Found by the index on message and call id.
                update.and_where(C::MessageId, "=", message_id);
                update.and_where(C::CallId, "=", call_id);
                update.and_where(C::ChatId, "=", chat_id);
                update
            }
            Op::RecordUsage { message_id, model_id, usage: u, cost_usd } => {
                use usage::Column as C;
                Sql::insert_one(
                    backend,
                    usage::Entity,
                    [
                        (C::Id, new_id().into()),
                        (C::ChatId, chat_id.into()),
                        (C::MessageId, Some(message_id).into()),
                        (C::ModelId, Some(model_id).into()),
                        (C::InputTokens, (u.input_tokens as i64).into()),
                        (C::OutputTokens, (u.output_tokens as i64).into()),
                        (C::CacheReadTokens, (u.cache_read_tokens as i64).into()),
                        (C::CacheWriteTokens, (u.cache_write_tokens as i64).into()),
                        (C::CostUsd, cost_usd.into()),
                        (C::CreatedAt, now.into()),
                    ],
                )
            }
            Op::Audit { user_id, action, target_type, target_id, details } => {
                use audit_events::Column as C;
                Sql::insert_one(
                    backend,
                    audit_events::Entity,
                    [
                        (C::Id, new_id().into()),
                        (C::UserId, user_id.into()),
                        (C::Action, action.into()),
                        (C::TargetType, target_type.into()),
                        (C::TargetId, target_id.into()),
                        (C::Details, json(backend, &details)?),
                        (C::CreatedAt, now.into()),
                    ],
                )
            }
        };
        statements.push(statement.statement());
    }
    let mut chat = Sql::update(backend, chat_rows::Entity);
    chat.set(chat_rows::Column::UpdatedAt, now);
    if let Some((status, error)) = status {
        chat.set(chat_rows::Column::Status, status.as_str());
        chat.set(chat_rows::Column::ErrorKind, error.as_ref().map(|e| convert::enum_str(&e.kind)));
        chat.set(chat_rows::Column::ErrorMessage, error.map(|e| e.message));
    }
    if let Some(workspace) = workspace {
        chat.set(chat_rows::Column::WorkspaceId, workspace);
    }
    if let Some(title) = title {
        chat.set(chat_rows::Column::Title, Some(title));
    }
    if let Some(archived) = archived {
        chat.set(chat_rows::Column::Archived, archived);
    }
    if let Some(last) = batch.events.iter().filter_map(|e| e.seq).max() {
        use chat_events::Column as C;
        let mut insert =
            Sql::insert(backend, chat_events::Entity, [C::ChatId, C::Seq, C::Kind, C::Payload, C::CreatedAt]);
        for event in &batch.events {
            insert.row([
                chat_id.into(),
                event.seq.unwrap_or_default().into(),
                event.body.kind().into(),
                sql::event_json(backend, event)?,
                now.into(),
            ]);
        }
        statements.push(insert.statement());
        chat.set(chat_rows::Column::LastSeq, last);
    }
    chat.and_where(chat_rows::Column::Id, "=", chat_id);
    statements.push(chat.statement());
    Ok(statements)
}

#[cfg(test)]
mod tests {
    use agentplane_schema::event::{EventBody, SharedEvent, StreamEvent};
    use agentplane_schema::message::{Message, Part, Role};

    use super::*;

    fn message(chat_id: &str, id: &str) -> Message {
        Message {
            id: id.to_string(),
            chat_id: chat_id.to_string(),
            position: 1,
            role: Role::User,
            parts: vec![Part::text("hi")].into(),
            interrupted: false,
            user_id: Some("u".into()),
            model_id: None,
            created_at: Utc::now(),
        }
    }

    fn batch(chat_id: &str, message_id: &str) -> Batch {
        batch_with_seq(chat_id, message_id, 1)
    }

    fn batch_with_seq(chat_id: &str, message_id: &str, seq: i64) -> Batch {
        let m = message(chat_id, message_id);
        Batch {
            ops: vec![Op::InsertMessage(m.clone())],
            events: vec![SharedEvent::new(StreamEvent::durable(seq, chat_id, EventBody::Message { message: m }))],
        }
    }

    /// A store on a fresh database at `url` with `count` root chats.
    async fn store_with_chats(url: &str, count: usize) -> (DbStore, Vec<String>) {
        let db = agentplane_schema::db::connect_and_migrate(url, 8).await.expect("database");
        let store = DbStore::new(db, SecretBox::new(&[1; 32]));
        let mut chats = Vec::new();
        for _ in 0..count {
            let chat = store.create_chat(NewChat { owner_id: "u".into(), ..Default::default() }).await.expect("chat");
            chats.push(chat.id);
        }
        (store, chats)
    }

    /// An empty SQLite file and a fresh PostgreSQL database.
    fn both_databases() -> [agentplane_tests::pg::TestDatabase; 2] {
        [agentplane_tests::pg::TestDatabase::sqlite_temp(), agentplane_tests::pg::TestDatabase::postgres()]
    }

    /// The chat's usage row: its four token counts, its cost and its model.
    async fn usage_of(store: &DbStore, chat_id: &str) -> ((i64, i64, i64, i64), Option<f64>, Option<String>) {
        let used = usage::Entity::find().filter(usage::Column::ChatId.eq(chat_id)).one(&store.db).await.expect("q");
        let used = used.expect("usage row");
        (
            (used.input_tokens, used.output_tokens, used.cache_read_tokens, used.cache_write_tokens),
            used.cost_usd,
            used.model_id,
        )
    }

    /// The audit row of the (only) `tool.executed` action.
    async fn tool_audit(store: &DbStore) -> audit_events::Model {
        audit_events::Entity::find()
            .filter(audit_events::Column::Action.eq("tool.executed"))
            .one(&store.db)
            .await
            .expect("query")
            .expect("audit row")
    }

    /// The seqs of the chat's stored events, in order.
    async fn event_seqs(store: &DbStore, chat_id: &str) -> Vec<i64> {
        chat_events::Entity::find()
            .filter(chat_events::Column::ChatId.eq(chat_id))
            .order_by_asc(chat_events::Column::Seq)
            .all(&store.db)
            .await
            .expect("events")
            .into_iter()
            .map(|e| e.seq)
            .collect()
    }

    /// The chat's `n`th batch: message `n` at position `n` with its event of seq `n`.
    fn numbered(chat_id: &str, n: i64) -> Batch {
        let mut b = batch_with_seq(chat_id, &format!("{chat_id}-{n}"), n);
        if let Op::InsertMessage(m) = &mut b.ops[0] {
            m.position = n;
        }
        b
    }

    /// A write transaction of the pool (a fork, say) that reads before it writes holds SQLite's
    /// write lock from its start: the writer thread's commits wait for it instead of slipping in
    /// between, which would fail its first write at once with "busy".
    #[tokio::test]
    async fn a_write_transaction_holds_the_lock_from_its_start() {
        let database = agentplane_tests::pg::TestDatabase::sqlite_temp();
        let (store, chats) = store_with_chats(database.url(), 2).await;
        let txn = store.begin_write().await.expect("begin");
        chat_rows::Entity::find_by_id(&chats[0]).one(&txn).await.expect("read").expect("chat");
        let mut other = {
            let (store, chat) = (store.clone(), chats[1].clone());
            tokio::spawn(async move { store.commit(&chat, numbered(&chat, 1)).await })
        };
        let waited = tokio::time::timeout(std::time::Duration::from_millis(200), &mut other).await;
        assert!(waited.is_err(), "another commit got in while the transaction was open");
        let row =
            chat_rows::ActiveModel { title: sea_orm::ActiveValue::Set(Some("renamed".into())), ..Default::default() };
        chat_rows::Entity::update_many()
            .set(row)
            .filter(chat_rows::Column::Id.eq(&chats[0]))
            .exec(&txn)
            .await
            .expect("write after read");
        txn.commit().await.expect("commit");
        other.await.expect("joined").expect("the other commit lands after");
    }

    /// The writer thread finds the database sqlx's pool uses, also an in-memory one (which
    /// only exists as long as a connection to it is open, under the name sqlx gave it).
    #[tokio::test]
    async fn the_sqlite_writer_writes_where_the_pool_reads_in_memory_too() {
        let (store, chats) = store_with_chats("sqlite::memory:", 2).await;
        for chat in &chats {
            store.commit(chat, numbered(chat, 1)).await.expect("commit");
            let state = store.load_chat(chat).await.expect("load");
            assert_eq!((state.last_seq, state.messages.len()), (1, 1));
        }
    }

    /// The writer's own connection is set up like the pool's, and leaves checkpoints to the
    /// checkpoint thread.
    #[tokio::test]
    async fn the_sqlite_writers_connection_is_set_up_for_group_commits() {
        let database = agentplane_tests::pg::TestDatabase::sqlite_temp();
        let db = agentplane_schema::db::connect_and_migrate(database.url(), 1).await.expect("database");
        let target = sqlite_writer::Target::of(db.get_sqlite_connection_pool());
        let conn = sqlite_writer::open(&target, agentplane_schema::db::SQLITE_BUSY_TIMEOUT).expect("open");
        let pragma = |name: &str| -> String {
            conn.query_row(&format!("PRAGMA {name}"), [], |row| row.get::<_, rusqlite::types::Value>(0))
                .map(|value| match value {
                    rusqlite::types::Value::Integer(n) => n.to_string(),
                    rusqlite::types::Value::Text(text) => text,
                    other => format!("{other:?}"),
                })
                .expect(name)
        };
        assert_eq!(pragma("journal_mode"), "wal");
        assert_eq!(pragma("synchronous"), "1", "NORMAL");
        assert_eq!(pragma("foreign_keys"), "1");
        assert_eq!(pragma("wal_autocheckpoint"), "0", "no checkpoints in commits");
    }

    /// The writer's connection waits for a write lock another connection holds, takes it once
    /// free, and gives up when its busy timeout has passed.
    #[test]
    fn the_sqlite_writer_waits_for_the_write_lock_as_long_as_its_busy_timeout() {
        let database = agentplane_tests::pg::TestDatabase::sqlite_temp();
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        let db = runtime.block_on(agentplane_schema::db::connect_and_migrate(database.url(), 1)).expect("database");
        let target = sqlite_writer::Target::of(db.get_sqlite_connection_pool());
        let timeout = std::time::Duration::from_millis(300);
        let writer = sqlite_writer::open(&target, timeout).expect("open");
        let holder = sqlite_writer::open(&target, timeout).expect("open");
        let try_lock = || writer.execute_batch("BEGIN IMMEDIATE; COMMIT;");

        holder.execute_batch("BEGIN IMMEDIATE").expect("lock");
        let started = std::time::Instant::now();
        let refused = try_lock().expect_err("the lock is held throughout");
        assert_eq!(refused.sqlite_error_code(), Some(rusqlite::ErrorCode::DatabaseBusy), "{refused}");
        assert!(started.elapsed() >= timeout, "gave up after {:?}", started.elapsed());

        // Released while the writer waits: it goes on.
        std::thread::scope(|scope| {
            scope.spawn(move || {
                std::thread::sleep(std::time::Duration::from_millis(30));
                holder.execute_batch("COMMIT").expect("release");
            });
            try_lock().expect("taken once free");
        });
    }

    /// Once the WAL is long, the writer asks the checkpoint thread, which checkpoints while
    /// commits go on.
    #[tokio::test]
    async fn a_long_wal_is_checkpointed_by_the_checkpoint_thread() {
        let database = agentplane_tests::pg::TestDatabase::sqlite_temp();
        let (store, chats) = store_with_chats(database.url(), 1).await;
        let (committer, queue) = mpsc::unbounded_channel();
        let target = sqlite_writer::Target::of(store.db.get_sqlite_connection_pool());
        let checkpoints = sqlite_writer::spawn(target, agentplane_schema::db::SQLITE_BUSY_TIMEOUT, 20, queue);
        // What the migrations wrote is copied and the WAL emptied, so it holds only what follows.
        store.db.execute_unprepared("PRAGMA wal_checkpoint(TRUNCATE)").await.expect("checkpoint");
        let chat = &chats[0];
        let mut n = 1;
        let mut commit_one = async || {
            let (done, outcome) = tokio::sync::oneshot::channel();
            committer.send(PendingCommit { chat_id: chat.clone(), batch: numbered(chat, n), done }).expect("queued");
            outcome.await.expect("answered").expect("committed");
            n += 1;
        };
        // A few pages per commit: well short of 20 pages, nothing is asked.
        commit_one().await;
        assert_eq!(checkpoints.wait_past(0, std::time::Duration::from_millis(50)), 0, "a short WAL is left alone");
        for _ in 0..40 {
            commit_one().await;
        }
        let waiter = checkpoints.clone();
        let ran = tokio::task::spawn_blocking(move || waiter.wait_past(0, std::time::Duration::from_secs(10)))
            .await
            .expect("join");
        assert!(ran >= 1, "no checkpoint ran");
        // Commits go on, and every one is there.
        commit_one().await;
        let state = store.load_chat(chat).await.expect("load");
        assert_eq!(state.messages.len(), 42);
    }

    /// Many chats commit at once: their batches share a transaction, each caller hears the
    /// outcome of its own batch, and a batch that cannot be written fails alone.
    #[tokio::test]
    async fn concurrent_batches_are_committed_together_and_a_bad_one_fails_alone_sqlite() {
        let database = agentplane_tests::pg::TestDatabase::sqlite_temp();
        concurrent_batches_are_committed_together_and_a_bad_one_fails_alone(database.url()).await;
    }

    /// The same on PostgreSQL, where several committers commit groups at the same time.
    #[tokio::test]
    async fn concurrent_batches_are_committed_together_and_a_bad_one_fails_alone_postgres() {
        let database = agentplane_tests::pg::TestDatabase::postgres();
        concurrent_batches_are_committed_together_and_a_bad_one_fails_alone(database.url()).await;
    }

    /// A batch that fails in its last statement, after its message and its first event were
    /// written (its second event repeats a stored `seq`), leaves nothing behind: the statements
    /// stop without undoing their own part (`OR FAIL` on SQLite), the transaction undoes it all.
    #[tokio::test]
    async fn a_batch_failing_part_way_leaves_nothing_behind() {
        for database in both_databases() {
            let (store, chats) = store_with_chats(database.url(), 1).await;
            let chat = &chats[0];
            store.commit(chat, numbered(chat, 1)).await.expect("first batch");
            let mut bad = numbered(chat, 2);
            let repeated = SharedEvent::new(StreamEvent::durable(1, chat.as_str(), EventBody::StreamReset));
            bad.events.push(repeated);
            store.commit(chat, bad).await.expect_err("seq 1 is stored already");
            let state = store.load_chat(chat).await.expect("load");
            assert_eq!(state.messages.len(), 1, "the failed batch's message is gone");
            assert_eq!(state.last_seq, 1);
            assert_eq!(event_seqs(&store, chat).await, [1], "the failed batch's first event is gone");
        }
    }

    /// Chats that each commit batch after batch, all at the same time: every chat's batches land
    /// in its order, on both backends (several committers on PostgreSQL).
    #[tokio::test]
    async fn each_chats_batches_land_in_order_under_concurrent_commits() {
        for database in both_databases() {
            let (store, chats) = store_with_chats(database.url(), 30).await;
            let rounds = 12;
            let commits = chats.iter().map(|chat| {
                let store = store.clone();
                let chat = chat.clone();
                async move {
                    for round in 1..=rounds {
                        store.commit(&chat, numbered(&chat, round)).await.expect("commit");
                    }
                }
            });
            futures::future::join_all(commits).await;
            for chat in &chats {
                let state = store.load_chat(chat).await.expect("load");
                assert_eq!(state.last_seq, rounds, "{:?}: the last batch's seq", database.backend());
                let positions: Vec<i64> = state.messages.iter().map(|m| m.position).collect();
                assert_eq!(positions, (1..=rounds).collect::<Vec<_>>(), "{:?}", database.backend());
                assert_eq!(
                    event_seqs(&store, chat).await,
                    (1..=rounds).collect::<Vec<_>>(),
                    "{:?}",
                    database.backend()
                );
            }
        }
    }

    /// A step aborted while its commit waits in the queue stops waiting, and the chat may send
    /// its next batch at once: the two still land in the order they were sent (each chat has one
    /// committer), on PostgreSQL's several committers too.
    #[tokio::test]
    async fn a_batch_whose_caller_stopped_waiting_still_lands_before_the_next() {
        use futures::FutureExt as _;
        for database in both_databases() {
            let (store, chats) = store_with_chats(database.url(), 30).await;
            let mut abandoned = 0;
            for chat in &chats {
                // Sent, then abandoned: polled once (which queues it) and dropped. SQLite's writer
                // is a thread of its own and may have written it already.
                abandoned += usize::from(store.commit(chat, numbered(chat, 1)).now_or_never().is_none());
            }
            assert!(abandoned > 0, "{:?}: every commit was written before its caller looked", database.backend());
            let next = chats.iter().map(|chat| store.commit(chat, numbered(chat, 2)));
            assert!(futures::future::join_all(next).await.iter().all(Result::is_ok));
            for chat in &chats {
                let state = store.load_chat(chat).await.expect("load");
                assert_eq!(state.last_seq, 2, "{:?}: the later batch's seq stays", database.backend());
                let positions: Vec<i64> = state.messages.iter().map(|m| m.position).collect();
                assert_eq!(positions, [1, 2], "{:?}", database.backend());
            }
        }
    }

    /// Every kind of op in one batch, with text full of `?`, `;` and quotes, through the SQLite
    /// writer's prepared statements and, on PostgreSQL, one statement at a time (the batch drops
    /// messages and changes queued ones, so it is not made one statement): everything reads back
    /// as written, so no value went to the wrong placeholder.
    #[tokio::test]
    async fn every_kind_of_op_reads_back_as_written() {
        use agentplane_actors::ports::{ToolCallStatus, Usage};
        use agentplane_schema::api::{ChatError, ChatErrorKind, ChatStatus};
        use agentplane_schema::message::QueuedMessage;
        for database in both_databases() {
            let (store, chats) = store_with_chats(database.url(), 1).await;
            let id = chats[0].as_str();
            let tricky = "it's; a ? test -- ?1 $1 '';";
            let mut kept = message(id, "m1");
            kept.parts = vec![Part::text(tricky)].into();
            let mut dropped = message(id, "m2");
            dropped.position = 2;
            let queued = |qid: &str, text: &str| QueuedMessage {
                id: qid.into(),
                chat_id: id.into(),
                content: vec![Part::text(text)],
                user_id: "u".into(),
                created_at: Utc::now(),
            };
            let ops = vec![
                Op::InsertMessage(kept.clone()),
                Op::InsertMessage(dropped),
                Op::InsertQueued { message: queued("q1", "first ?"), position: 1 },
                Op::InsertQueued { message: queued("q2", "second ;"), position: 2 },
                Op::UpdateQueued { id: "q1".into(), content: vec![Part::text("edited ?;")] },
                Op::DeleteQueued { id: "q2".into() },
                Op::SetTitle("T ? ;".into()),
                Op::SetArchived(true),
                Op::SetStatus {
                    status: ChatStatus::Error,
                    error: Some(ChatError { kind: ChatErrorKind::RateLimit, message: "slow ? down;".into() }),
                },
                Op::SetWorkspace(None),
                Op::InsertToolCall {
                    id: "tc1".into(),
                    call_id: "c1".into(),
                    message_id: "m2".into(),
                    name: "write_file".into(),
                    args: serde_json::json!({"path": "a?;b"}),
                    user_id: "u".into(),
                    workspace_id: None,
                },
                Op::FinishToolCall {
                    call_id: "c1".into(),
                    message_id: "m2".into(),
                    status: ToolCallStatus::Done,
                    result: "ok ? ;".into(),
                    is_error: false,
                    exit_code: Some(3),
                    duration_ms: Some(12),
                    workspace_id: None,
                },
                Op::RecordUsage {
                    message_id: "m2".into(),
                    model_id: "model-x".into(),
                    usage: Usage { input_tokens: 1, output_tokens: 2, cache_read_tokens: 3, cache_write_tokens: 4 },
                    cost_usd: Some(0.5),
                },
                Op::Audit {
                    user_id: Some("u".into()),
                    action: "tool.executed".into(),
                    target_type: "tool_call".into(),
                    target_id: Some("c1".into()),
                    details: serde_json::json!({"k": "v ? ;"}),
                },
                Op::DropMessagesFrom { from_position: 2 },
            ];
            let events = (1..=2)
                .map(|seq| {
                    SharedEvent::new(StreamEvent::durable(seq, id, EventBody::Message { message: kept.clone() }))
                })
                .collect();
            store.commit(id, Batch { ops, events }).await.expect("commit");

            let backend = database.backend();
            let state = store.load_chat(id).await.expect("load");
            assert_eq!(state.messages.len(), 1, "{backend:?}: m2 was dropped");
            assert_eq!(state.messages[0].text(), tricky, "{backend:?}");
            assert_eq!(state.queued.len(), 1, "{backend:?}");
            assert_eq!(state.queued[0].content, vec![Part::text("edited ?;")], "{backend:?}");
            assert_eq!(state.chat.title.as_deref(), Some("T ? ;"), "{backend:?}");
            assert!(state.chat.archived, "{backend:?}");
            assert_eq!(state.chat.status, ChatStatus::Error, "{backend:?}");
            let error = state.chat.error.expect("error");
            assert_eq!((error.kind, error.message.as_str()), (ChatErrorKind::RateLimit, "slow ? down;"), "{backend:?}");
            assert_eq!(state.last_seq, 2, "{backend:?}");

            let call = tool_calls::Entity::find_by_id("tc1").one(&store.db).await.expect("query").expect("row");
            assert_eq!(
                (call.status.as_str(), call.result.as_deref(), call.exit_code, call.duration_ms, call.args),
                ("done", Some("ok ? ;"), Some(3), Some(12), serde_json::json!({"path": "a?;b"})),
                "{backend:?}"
            );
            assert_eq!(usage_of(&store, id).await, ((1, 2, 3, 4), Some(0.5), Some("model-x".into())), "{backend:?}");
            assert_eq!(tool_audit(&store).await.target_id.as_deref(), Some("c1"), "{backend:?}");
            assert_eq!(event_seqs(&store, id).await, [1, 2], "{backend:?}");
        }
    }

    #[test]
    fn placeholders_are_renumbered_outside_quotes_only() {
        let mut out = String::new();
        renumber_placeholders(r#"UPDATE "t$1" SET "a" = $1, "b" = '$2''s', "c" = $12 WHERE "d" = $3"#, 4, &mut out);
        assert_eq!(out, r#"UPDATE "t$1" SET "a" = $5, "b" = '$2''s', "c" = $16 WHERE "d" = $7"#);
    }

    #[test]
    fn a_batch_runs_as_one_statement_only_when_no_statement_depends_on_another() {
        let insert = Op::InsertToolCall {
            id: "tc".into(),
            call_id: "c".into(),
            message_id: "m".into(),
            name: "n".into(),
            args: serde_json::json!({}),
            user_id: "u".into(),
            workspace_id: None,
        };
        let finish = |message_id: &str| Op::FinishToolCall {
            call_id: "c".into(),
            message_id: message_id.into(),
            status: agentplane_actors::ports::ToolCallStatus::Done,
            result: String::new(),
            is_error: false,
            exit_code: None,
            duration_ms: None,
            workspace_id: None,
        };
        let message = Op::InsertMessage(message("chat", "m"));
        assert!(independent_ops(&[message.clone(), insert.clone(), Op::SetArchived(false)]));
        assert!(independent_ops(&[finish("m"), message.clone()]), "a call made in an earlier batch");
        assert!(!independent_ops(&[insert, finish("m")]), "the finish must see the insert");
        assert!(!independent_ops(&[finish("m"), finish("m")]), "a row updated twice in one statement");
        assert!(independent_ops(&[finish("m"), finish("other")]));
        assert!(!independent_ops(&[message, Op::DropMessagesFrom { from_position: 1 }]));

        let statements = batch_statements(DbBackend::Postgres, "chat", batch("chat", "m"), Utc::now()).expect("build");
        let values: usize = statements.iter().map(|s| s.values.as_ref().map_or(0, |v| v.0.len())).sum();
        let one = one_statement(statements);
        assert_eq!(one.len(), 1);
        assert!(one[0].sql.starts_with("WITH p0 AS (INSERT"), "{}", one[0].sql);
        assert!(one[0].sql.contains(&format!("${values}")) && !one[0].sql.contains(&format!("${}", values + 1)));
    }

    /// Batches shaped as a step commits them, on both databases: on PostgreSQL each one is a
    /// single statement, and every value must land in its own column.
    #[tokio::test]
    async fn batches_as_steps_commit_them_read_back_as_written() {
        use agentplane_actors::ports::{ToolCallStatus, Usage};
        use agentplane_schema::api::ChatStatus;
        for database in both_databases() {
            let (store, chats) = store_with_chats(database.url(), 1).await;
            let id = chats[0].as_str();
            let backend = database.backend();
            let tricky = r#"it's "$1" ? $2; -- ''"#;
            let mut answer = message(id, "m1");
            answer.role = Role::Assistant;
            answer.parts = vec![Part::text(tricky)].into();
            let ops = vec![
                Op::InsertMessage(answer.clone()),
                Op::InsertToolCall {
                    id: "tc1".into(),
                    call_id: "c1".into(),
                    message_id: "m1".into(),
                    name: "write_file".into(),
                    args: serde_json::json!({"path": tricky}),
                    user_id: "u".into(),
                    workspace_id: Some("w$1".into()),
                },
                Op::RecordUsage {
                    message_id: "m1".into(),
                    model_id: "model-$2".into(),
                    usage: Usage { input_tokens: 5, output_tokens: 6, cache_read_tokens: 7, cache_write_tokens: 8 },
                    cost_usd: None,
                },
                Op::SetStatus { status: ChatStatus::Running, error: None },
                Op::SetTitle(tricky.into()),
            ];
            let events = (1..=3).map(|seq| {
                SharedEvent::new(StreamEvent::durable(seq, id, EventBody::Message { message: answer.clone() }))
            });
            store.commit(id, Batch { ops, events: events.collect() }).await.expect("first");
            let mut results = message(id, "m2");
            results.position = 2;
            results.parts = vec![Part::text("result $1")].into();
            let ops = vec![
                Op::FinishToolCall {
                    call_id: "c1".into(),
                    message_id: "m1".into(),
                    status: ToolCallStatus::Done,
                    result: tricky.into(),
                    is_error: true,
                    exit_code: Some(1),
                    duration_ms: Some(9),
                    workspace_id: None,
                },
                Op::Audit {
                    user_id: Some("u".into()),
                    action: "tool.executed".into(),
                    target_type: "tool_call".into(),
                    target_id: Some("c1".into()),
                    details: serde_json::json!({"text": tricky}),
                },
                Op::InsertMessage(results),
                Op::SetStatus { status: ChatStatus::Idle, error: None },
            ];
            let events = vec![SharedEvent::new(StreamEvent::durable(4, id, EventBody::StreamReset))];
            store.commit(id, Batch { ops, events }).await.expect("second");

            let state = store.load_chat(id).await.expect("load");
            let texts: Vec<String> = state.messages.iter().map(|m| m.text()).collect();
            assert_eq!(texts, [tricky, "result $1"], "{backend:?}");
            assert_eq!(
                (state.chat.status, state.chat.title.as_deref()),
                (ChatStatus::Idle, Some(tricky)),
                "{backend:?}"
            );
            assert_eq!(state.last_seq, 4, "{backend:?}");
            assert_eq!(event_seqs(&store, id).await, [1, 2, 3, 4], "{backend:?}");
            let call = tool_calls::Entity::find_by_id("tc1").one(&store.db).await.expect("query").expect("row");
            assert_eq!(
                (call.status.as_str(), call.result.as_deref(), call.is_error, call.exit_code, call.duration_ms),
                ("done", Some(tricky), true, Some(1), Some(9)),
                "{backend:?}"
            );
            assert_eq!(
                (call.args, call.workspace_id.as_deref()),
                (serde_json::json!({"path": tricky}), Some("w$1")),
                "{backend:?}"
            );
            assert_eq!(usage_of(&store, id).await, ((5, 6, 7, 8), None, Some("model-$2".into())), "{backend:?}");
            assert_eq!(tool_audit(&store).await.details, serde_json::json!({"text": tricky}), "{backend:?}");
        }
    }

    async fn concurrent_batches_are_committed_together_and_a_bad_one_fails_alone(url: &str) {
        let db = agentplane_schema::db::connect_and_migrate(url, 4).await.expect("database");
        let store = DbStore::new(db, SecretBox::new(&[1; 32]));
        let mut chats = Vec::new();
        for _ in 0..40 {
            let chat = store.create_chat(NewChat { owner_id: "u".into(), ..Default::default() }).await.expect("chat");
            chats.push(chat.id);
        }
        // One message id already taken (by another chat): that batch violates the primary key.
        let other = store.create_chat(NewChat { owner_id: "u".into(), ..Default::default() }).await.expect("chat");
        store.commit(&other.id, batch(&other.id, "taken")).await.expect("first use");
        // One group, as the commit loop makes it when 40 chats step at once.
        let mut outcomes = Vec::new();
        let group: Vec<PendingCommit> = chats
            .iter()
            .enumerate()
            .map(|(i, chat)| {
                let id = if i == 13 { "taken".to_string() } else { format!("m{i}") };
                let (done, outcome) = tokio::sync::oneshot::channel();
                outcomes.push(outcome);
                PendingCommit { chat_id: chat.clone(), batch: batch(chat, &id), done }
            })
            .collect();
        match store.db.get_database_backend() {
            DbBackend::Sqlite => {
                let target = sqlite_writer::Target::of(store.db.get_sqlite_connection_pool());
                let mut conn = sqlite_writer::open(&target, agentplane_schema::db::SQLITE_BUSY_TIMEOUT).expect("open");
                tokio::task::spawn_blocking(move || sqlite_writer::commit_group(&mut conn, group)).await.expect("join");
            }
            _ => commit_group(&store.db, group).await,
        }
        for (i, outcome) in outcomes.into_iter().enumerate() {
            let result = outcome.await.expect("answered");
            assert_eq!(result.is_ok(), i != 13, "chat {i}: {result:?}");
        }
        // Through the store's own queue too.
        let commits = chats.iter().map(|chat| {
            let store = store.clone();
            let chat = chat.clone();
            async move { store.commit(&chat, numbered(&chat, 2)).await }
        });
        assert!(futures::future::join_all(commits).await.iter().all(Result::is_ok));
        for (i, chat) in chats.iter().enumerate() {
            let state = store.load_chat(chat).await.expect("load");
            assert_eq!(state.messages.len(), 1 + usize::from(i != 13), "chat {i}");
            assert_eq!(state.last_seq, 2, "chat {i}");
        }
    }

    /// A token finds its user until it is revoked (its answer reused for at most
    /// [`TOKEN_CACHE_TTL`]); an unknown token finds no one.
    #[tokio::test]
    async fn a_token_finds_its_user_until_revoked() {
        use agentplane_schema::api::UserRole;
        use agentplane_schema::db::entities::api_tokens;
        use sea_orm::ActiveValue::Set;
        for database in both_databases() {
            let (mut store, _) = store_with_chats(database.url(), 0).await;
            let (ada, ada_token_id, ada_token) =
                store.create_user_with_token("ada", UserRole::Admin, None).await.expect("ada");
            let (bob, _, bob_token) = store.create_user_with_token("bob", UserRole::Member, None).await.expect("bob");
            let found = |store: &DbStore, token: &str| {
                let (store, token) = (store.clone(), token.to_string());
                async move { store.user_by_token(&token).await.expect("lookup").map(|u| u.id) }
            };
            assert_eq!(found(&store, &ada_token).await, Some(ada.id.clone()));
            assert_eq!(found(&store, &bob_token).await, Some(bob.id.clone()));
            assert_eq!(found(&store, "not-a-token").await, None);

            api_tokens::Entity::update(api_tokens::ActiveModel {
                id: Set(ada_token_id),
                revoked: Set(true),
                ..Default::default()
            })
            .exec(&store.db)
            .await
            .expect("revoke");
            assert_eq!(found(&store, &ada_token).await, Some(ada.id.clone()), "the answer is reused a while");
            // Once the answer has expired, the revocation counts.
            store.tokens = Arc::new(Recent::new(std::time::Duration::ZERO, 8));
            assert_eq!(found(&store, &ada_token).await, None, "{:?}: a revoked token", database.backend());
            assert_eq!(found(&store, &bob_token).await, Some(bob.id), "{:?}", database.backend());
        }
    }
}
