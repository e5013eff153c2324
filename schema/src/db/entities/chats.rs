//! `chats`: root chats and sub-agents, with their ownership lease.

use sea_orm::entity::prelude::*;

/// A chat (a sub-agent when `parent_id` is set). Besides what the user sees (title, status parsed
/// as [`crate::api::ChatStatus`], model, workspace, fork origin, last error), it carries
/// `last_seq`, the last durable event sequence number written to `chat_events`, and the
/// cross-replica lease: `owner_replica`, `lease_until` and `owner_epoch`, the fencing token every
/// state write checks.
#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "chats")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: String,
    pub owner_id: String,
    #[sea_orm(column_type = "Text", nullable)]
    pub title: Option<String>,
    pub status: String,
    pub model_id: Option<String>,
    pub workspace_id: Option<String>,
    pub parent_id: Option<String>,
    pub forked_from_chat_id: Option<String>,
    pub forked_from_message_id: Option<String>,
    pub archived: bool,
    pub deleted: bool,
    pub error_kind: Option<String>,
    #[sea_orm(column_type = "Text", nullable)]
    pub error_message: Option<String>,
    pub last_seq: i64,
    pub owner_replica: Option<String>,
    pub lease_until: Option<DateTimeUtc>,
    pub owner_epoch: i64,
    pub created_at: DateTimeUtc,
    pub updated_at: DateTimeUtc,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
