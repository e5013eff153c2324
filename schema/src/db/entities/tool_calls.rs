//! `tool_calls`: every tool call the model made, written before dispatch.

use sea_orm::entity::prelude::*;

/// A tool call of an assistant message. `call_id` is the model's id, unique only within a chat,
/// so `id` is ours. `status` is `dispatched`, `done` or `interrupted`: a row is written as
/// `dispatched` before the request leaves, and completed with `result`, `is_error`, `exit_code`,
/// `duration_ms` and `finished_at` when it returns.
#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "tool_calls")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: String,
    pub call_id: String,
    pub chat_id: String,
    pub message_id: String,
    pub name: String,
    pub args: Json,
    pub status: String,
    #[sea_orm(column_type = "Text", nullable)]
    pub result: Option<String>,
    pub is_error: bool,
    pub user_id: String,
    pub workspace_id: Option<String>,
    pub exit_code: Option<i32>,
    pub duration_ms: Option<i64>,
    pub created_at: DateTimeUtc,
    pub finished_at: Option<DateTimeUtc>,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
