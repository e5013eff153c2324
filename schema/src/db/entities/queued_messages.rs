//! `queued_messages`: user messages waiting for the chat to become idle.

use sea_orm::entity::prelude::*;

/// A user message sent while the chat was busy, delivered in `position` order at the next step
/// boundary; `content` is JSON (the parts the user sent).
#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "queued_messages")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: String,
    pub chat_id: String,
    pub position: i64,
    pub content: Json,
    pub user_id: String,
    pub created_at: DateTimeUtc,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
