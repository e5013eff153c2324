//! `messages`: the committed history of each chat.

use sea_orm::entity::prelude::*;

/// One message of a chat at a `position` unique within the chat: its `role` (parsed as
/// [`crate::message::Role`]) and `parts` (JSON list of [`crate::message::Part`]). `interrupted`
/// marks an assistant message cut short; `deleted` is a soft delete.
#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "messages")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: String,
    pub chat_id: String,
    pub position: i64,
    pub role: String,
    pub parts: Json,
    pub interrupted: bool,
    pub deleted: bool,
    pub user_id: Option<String>,
    pub model_id: Option<String>,
    pub created_at: DateTimeUtc,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
