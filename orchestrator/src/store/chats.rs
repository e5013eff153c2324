//! Chat queries of the API: create, read, list, patch, delete, pages of messages, event replay.

use agentplane_actors::ports::StoreError;
use agentplane_schema::api::{Chat, ChatStatus, ChatUsage, ForkRef, SubagentUsage, UsageTotals};
use agentplane_schema::db::entities::{audit_events, chat_events, chats, messages, queued_messages, usage};
use agentplane_schema::event::{RunningSubagent, StreamEvent};
use agentplane_schema::message::{Message, QueuedMessage};
use agentplane_schema::new_id;
use chrono::Utc;
use sea_orm::ActiveValue::Set;
use sea_orm::{ColumnTrait, EntityTrait, QueryFilter, QueryOrder, QuerySelect, TransactionTrait};

use super::convert::{audit_row, chat_from_row, from_json, message_from_row, new_chat_row};
use super::{DbStore, db_err};

/// A chat to create; `Default` leaves everything but the owner unset (a root chat).
#[derive(Default)]
pub struct NewChat {
    pub owner_id: String,
    pub title: Option<String>,
    pub model_id: Option<String>,
    pub workspace_id: Option<String>,
    pub parent_id: Option<String>,
}

impl DbStore {
    pub async fn create_chat(&self, new: NewChat) -> Result<Chat, StoreError> {
        let row = new_chat_row(new.owner_id, new.title, new.model_id, new.workspace_id, new.parent_id, None);
        let txn = self.begin_write().await?;
        chats::Entity::insert(chats::ActiveModel::from(row.clone()))
            .exec_without_returning(&txn)
            .await
            .map_err(db_err)?;
        let details = serde_json::json!({"model_id": row.model_id, "workspace_id": row.workspace_id});
        audit_events::Entity::insert(audit_row(
            Some(row.owner_id.clone()),
            "chat.created",
            "chat",
            Some(row.id.clone()),
            details,
        ))
        .exec_without_returning(&txn)
        .await
        .map_err(db_err)?;
        txn.commit().await.map_err(db_err)?;
        Ok(chat_from_row(row))
    }

    /// Copies `source`'s live history up to and including `message_id` into a new chat owned by
    /// `owner_id`, with no workspace; the source is not touched.
    pub async fn fork_chat(&self, source: &Chat, message_id: &str, owner_id: &str) -> Result<Chat, StoreError> {
        let txn = self.begin_write().await?;
        let at = messages::Entity::find_by_id(message_id)
            .filter(messages::Column::ChatId.eq(&source.id))
            .filter(messages::Column::Deleted.eq(false))
            .one(&txn)
            .await
            .map_err(db_err)?
            .ok_or_else(|| StoreError::NotFound(format!("message {message_id} in chat {}", source.id)))?;
        let history = messages::Entity::find()
            .filter(messages::Column::ChatId.eq(&source.id))
            .filter(messages::Column::Deleted.eq(false))
            .filter(messages::Column::Position.lte(at.position))
            .order_by_asc(messages::Column::Position)
            .all(&txn)
            .await
            .map_err(db_err)?;
        let row = new_chat_row(
            owner_id.to_string(),
            Some(format!("Fork of {}", source.title.as_deref().unwrap_or("a chat"))),
            source.model_id.clone(),
            None,
            None,
            Some(ForkRef { chat_id: source.id.clone(), message_id: message_id.to_string() }),
        );
        chats::Entity::insert(chats::ActiveModel::from(row.clone()))
            .exec_without_returning(&txn)
            .await
            .map_err(db_err)?;
        let copies: Vec<messages::ActiveModel> = history
            .into_iter()
            .enumerate()
            .map(|(i, m)| {
                messages::ActiveModel::from(messages::Model {
                    id: new_id(),
                    chat_id: row.id.clone(),
                    position: i as i64 + 1,
                    ..m
                })
            })
            .collect();
        if !copies.is_empty() {
            messages::Entity::insert_many(copies).exec_without_returning(&txn).await.map_err(db_err)?;
        }
        audit_events::Entity::insert(audit_row(
            Some(owner_id.to_string()),
            "chat.forked",
            "chat",
            Some(row.id.clone()),
            serde_json::json!({"from_chat": source.id, "at_message": message_id}),
        ))
        .exec_without_returning(&txn)
        .await
        .map_err(db_err)?;
        txn.commit().await.map_err(db_err)?;
        Ok(chat_from_row(row))
    }

    /// A chat that is not deleted.
    pub async fn get_chat(&self, id: &str) -> Result<Option<Chat>, StoreError> {
        Ok(chats::Entity::find_by_id(id)
            .filter(chats::Column::Deleted.eq(false))
            .one(&self.db)
            .await
            .map_err(db_err)?
            .map(chat_from_row))
    }

    /// Root chats of an owner, newest activity first.
    pub async fn list_chats(
        &self,
        owner_id: &str,
        archived: Option<bool>,
        limit: u64,
    ) -> Result<Vec<Chat>, StoreError> {
        let mut q = chats::Entity::find()
            .filter(chats::Column::OwnerId.eq(owner_id))
            .filter(chats::Column::Deleted.eq(false))
            .filter(chats::Column::ParentId.is_null());
        if let Some(a) = archived {
            q = q.filter(chats::Column::Archived.eq(a));
        }
        let rows = q.order_by_desc(chats::Column::UpdatedAt).limit(limit).all(&self.db).await.map_err(db_err)?;
        Ok(rows.into_iter().map(chat_from_row).collect())
    }

    pub async fn children(&self, parent_id: &str) -> Result<Vec<Chat>, StoreError> {
        let rows = chats::Entity::find()
            .filter(chats::Column::ParentId.eq(parent_id))
            .filter(chats::Column::Deleted.eq(false))
            .order_by_asc(chats::Column::CreatedAt)
            .all(&self.db)
            .await
            .map_err(db_err)?;
        Ok(rows.into_iter().map(chat_from_row).collect())
    }

    /// Ids of every descendant of a chat (sub-agents at any depth), parents before children, each
    /// with its parent.
    pub async fn descendants(&self, chat_id: &str) -> Result<Vec<(String, String)>, StoreError> {
        let mut tree: Vec<(String, String)> = Vec::new();
        let mut frontier = vec![chat_id.to_string()];
        while !frontier.is_empty() {
            let rows = chats::Entity::find()
                .filter(chats::Column::ParentId.is_in(frontier.clone()))
                .order_by_asc(chats::Column::CreatedAt)
                .all(&self.db)
                .await
                .map_err(db_err)?;
            frontier = rows.iter().map(|r| r.id.clone()).collect();
            tree.extend(rows.into_iter().filter_map(|r| Some((r.id, r.parent_id?))));
        }
        Ok(tree)
    }

    /// Sets the archived flag of every descendant of a chat.
    pub async fn archive_descendants(&self, chat_id: &str, archived: bool) -> Result<(), StoreError> {
        let ids: Vec<String> = self.descendants(chat_id).await?.into_iter().map(|(id, _)| id).collect();
        for chunk in ids.chunks(500) {
            chats::Entity::update_many()
                .col_expr(chats::Column::Archived, sea_orm::sea_query::Expr::value(archived))
                .filter(chats::Column::Id.is_in(chunk.to_vec()))
                .exec(&self.db)
                .await
                .map_err(db_err)?;
        }
        Ok(())
    }

    /// Token and cost totals of a chat and of each of its descendants (sub-agents, at any depth),
    /// summed from the per-call usage records.
    pub async fn chat_usage(&self, chat_id: &str) -> Result<ChatUsage, StoreError> {
        let tree = self.descendants(chat_id).await?;
        let mut ids: Vec<String> = tree.iter().map(|(id, _)| id.clone()).collect();
        ids.push(chat_id.to_string());
        let mut totals: std::collections::HashMap<String, UsageTotals> = std::collections::HashMap::new();
        for chunk in ids.chunks(500) {
            // Found through the chats' messages (usage is indexed by message); a record without
            // a message, should there be one, through that index's NULL entries.
            let of_messages = sea_orm::sea_query::Query::select()
                .column(messages::Column::Id)
                .from(messages::Entity)
                .and_where(messages::Column::ChatId.is_in(chunk.to_vec()))
                .to_owned();
            let mut rows = usage::Entity::find()
                .filter(usage::Column::MessageId.in_subquery(of_messages))
                .all(&self.db)
                .await
                .map_err(db_err)?;
            let without_message = usage::Entity::find()
                .filter(usage::Column::MessageId.is_null())
                .filter(usage::Column::ChatId.is_in(chunk.to_vec()))
                .all(&self.db)
                .await
                .map_err(db_err)?;
            rows.extend(without_message);
            for r in rows {
                totals.entry(r.chat_id).or_default().add(&UsageTotals {
                    input_tokens: r.input_tokens.max(0) as u64,
                    output_tokens: r.output_tokens.max(0) as u64,
                    cache_read_tokens: r.cache_read_tokens.max(0) as u64,
                    cache_write_tokens: r.cache_write_tokens.max(0) as u64,
                    cost_usd: r.cost_usd.unwrap_or(0.0),
                    calls: 1,
                });
            }
        }
        let own = totals.get(chat_id).copied().unwrap_or_default();
        let mut total = own;
        let subagents: Vec<SubagentUsage> = tree
            .into_iter()
            .map(|(id, parent_id)| {
                let usage = totals.get(&id).copied().unwrap_or_default();
                total.add(&usage);
                SubagentUsage { chat_id: id, parent_id, usage }
            })
            .collect();
        Ok(ChatUsage { chat_id: chat_id.to_string(), own, subagents, total })
    }

    /// Soft delete: the chat disappears from the API; its rows stay for the audit trail.
    pub async fn delete_chat(&self, id: &str, user_id: &str) -> Result<(), StoreError> {
        let now = Utc::now();
        let txn = self.begin_write().await?;
        let row = chats::ActiveModel { deleted: Set(true), updated_at: Set(now), ..Default::default() };
        chats::Entity::update_many().set(row).filter(chats::Column::Id.eq(id)).exec(&txn).await.map_err(db_err)?;
        audit_events::Entity::insert(audit_row(
            Some(user_id.to_string()),
            "chat.deleted",
            "chat",
            Some(id.to_string()),
            serde_json::json!({}),
        ))
        .exec_without_returning(&txn)
        .await
        .map_err(db_err)?;
        txn.commit().await.map_err(db_err)
    }

    /// Live chats that were running when the process stopped.
    pub async fn running_chat_ids(&self) -> Result<Vec<String>, StoreError> {
        let rows = chats::Entity::find()
            .filter(chats::Column::Deleted.eq(false))
            .filter(chats::Column::Status.is_in([ChatStatus::Running.as_str(), ChatStatus::Interrupting.as_str()]))
            .all(&self.db)
            .await
            .map_err(db_err)?;
        Ok(rows.into_iter().map(|r| r.id).collect())
    }

    /// Up to `limit` live messages before position `before` (all when `None`), oldest first,
    /// and the cursor of the page before them.
    pub async fn messages_page(
        &self,
        chat_id: &str,
        before: Option<i64>,
        limit: u64,
    ) -> Result<(Vec<Message>, Option<i64>), StoreError> {
        let mut q = messages::Entity::find()
            .filter(messages::Column::ChatId.eq(chat_id))
            .filter(messages::Column::Deleted.eq(false));
        if let Some(b) = before {
            q = q.filter(messages::Column::Position.lt(b));
        }
        let mut rows =
            q.order_by_desc(messages::Column::Position).limit(limit + 1).all(&self.db).await.map_err(db_err)?;
        let more = rows.len() as u64 > limit;
        rows.truncate(limit as usize);
        rows.reverse();
        let cursor = if more { rows.first().map(|m| m.position) } else { None };
        let messages = rows.into_iter().map(message_from_row).collect::<Result<_, _>>()?;
        Ok((messages, cursor))
    }

    pub async fn queued(&self, chat_id: &str) -> Result<Vec<QueuedMessage>, StoreError> {
        let rows = queued_messages::Entity::find()
            .filter(queued_messages::Column::ChatId.eq(chat_id))
            .order_by_asc(queued_messages::Column::Position)
            .all(&self.db)
            .await
            .map_err(db_err)?;
        rows.into_iter().map(queued_from_row).collect()
    }

    /// Durable events with `seq > after`, in order.
    pub async fn events_after(&self, chat_id: &str, after: i64) -> Result<Vec<StreamEvent>, StoreError> {
        let rows = chat_events::Entity::find()
            .filter(chat_events::Column::ChatId.eq(chat_id))
            .filter(chat_events::Column::Seq.gt(after))
            .order_by_asc(chat_events::Column::Seq)
            .all(&self.db)
            .await
            .map_err(db_err)?;
        rows.into_iter().map(|r| from_json(r.payload, "chat event")).collect()
    }
}

/// What a stream's `snapshot` frame carries, read from one consistent database snapshot.
pub struct Snapshot {
    pub chat: Chat,
    pub messages: Vec<Message>,
    pub queued: Vec<QueuedMessage>,
    pub running_subagents: Vec<RunningSubagent>,
    pub last_seq: i64,
}

impl DbStore {
    pub async fn snapshot(&self, chat_id: &str, recent: u64) -> Result<Option<Snapshot>, StoreError> {
        use sea_orm::{DbBackend, IsolationLevel};
        // PostgreSQL reads each statement at its own snapshot unless told otherwise; the seq and
        // the messages must agree or a watcher would see a message twice.
        let isolation = match self.db.get_database_backend() {
            DbBackend::Postgres => Some(IsolationLevel::RepeatableRead),
            _ => None,
        };
        let txn = self.db.begin_with_config(isolation, None).await.map_err(db_err)?;
        let Some(row) = chats::Entity::find_by_id(chat_id)
            .filter(chats::Column::Deleted.eq(false))
            .one(&txn)
            .await
            .map_err(db_err)?
        else {
            return Ok(None);
        };
        let mut rows = messages::Entity::find()
            .filter(messages::Column::ChatId.eq(chat_id))
            .filter(messages::Column::Deleted.eq(false))
            .order_by_desc(messages::Column::Position)
            .limit(recent)
            .all(&txn)
            .await
            .map_err(db_err)?;
        rows.reverse();
        let queued_rows = queued_messages::Entity::find()
            .filter(queued_messages::Column::ChatId.eq(chat_id))
            .order_by_asc(queued_messages::Column::Position)
            .all(&txn)
            .await
            .map_err(db_err)?;
        // A sub-agent is a chat of its own: it runs while its chat does (as its parent's actor
        // judges its children when it loads them). A sub-agent stores the end of its turn before
        // it tells its parent, so a snapshot holding the parent's `finished` event never lists
        // the sub-agent as running.
        let running = [ChatStatus::Running.as_str(), ChatStatus::Interrupting.as_str()];
        let child_rows = chats::Entity::find()
            .filter(chats::Column::ParentId.eq(chat_id))
            .filter(chats::Column::Deleted.eq(false))
            .filter(chats::Column::Status.is_in(running))
            .order_by_asc(chats::Column::CreatedAt)
            .all(&txn)
            .await
            .map_err(db_err)?;
        txn.commit().await.map_err(db_err)?;
        let last_seq = row.last_seq;
        let queued = queued_rows.into_iter().map(queued_from_row).collect::<Result<_, _>>()?;
        Ok(Some(Snapshot {
            chat: chat_from_row(row),
            messages: rows.into_iter().map(message_from_row).collect::<Result<_, _>>()?,
            queued,
            running_subagents: child_rows
                .into_iter()
                .map(|c| RunningSubagent { agent_id: c.id, title: c.title })
                .collect(),
            last_seq,
        }))
    }
}

fn queued_from_row(r: queued_messages::Model) -> Result<QueuedMessage, StoreError> {
    Ok(QueuedMessage {
        id: r.id,
        chat_id: r.chat_id,
        content: from_json(r.content, "queued message")?,
        user_id: r.user_id,
        created_at: r.created_at,
    })
}
