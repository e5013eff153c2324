//! Tool calls are found by their message and call id, not their chat and call id.
//!
//! A message id is a UUIDv7, so new calls' index entries go to the end of the index, where every
//! chat's new calls share a page; keyed by chat, each chat's new call dirtied a page of its own in
//! every commit that made or finished one.

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

const BY_CHAT: &str = "idx_tool_calls_chat_call";
const BY_MESSAGE: &str = "idx_tool_calls_message_call";

#[allow(elided_lifetimes_in_paths)]
#[async_trait::async_trait]
impl MigrationTrait for Migration {
    fn use_transaction(&self) -> Option<bool> {
        Some(true)
    }

    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        swap(manager, (BY_MESSAGE, ToolCalls::MessageId), BY_CHAT).await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        swap(manager, (BY_CHAT, ToolCalls::ChatId), BY_MESSAGE).await
    }
}

/// Creates the index `name` on (`first`, call id), then drops the index `old`.
async fn swap(manager: &SchemaManager<'_>, (name, first): (&str, ToolCalls), old: &str) -> Result<(), DbErr> {
    let index = Index::create().name(name).table(ToolCalls::Table).col(first).col(ToolCalls::CallId).to_owned();
    manager.create_index(index).await?;
    manager.drop_index(Index::drop().name(old).table(ToolCalls::Table).to_owned()).await
}

#[derive(DeriveIden)]
enum ToolCalls {
    Table,
    ChatId,
    MessageId,
    CallId,
}
