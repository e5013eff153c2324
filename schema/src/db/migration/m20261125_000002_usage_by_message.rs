//! A model call's usage is found by its message, not its chat.
//!
//! Keyed by chat, every chat's new usage record dirtied a page of that index of its own in each
//! commit that held one (a `runs` group commit wrote about 13 such pages). A message id is a
//! UUIDv7, so new records' entries go to the end of this index, where they share a page; a chat's
//! usage is read through its messages.

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

const BY_CHAT: &str = "idx_usage_chat";
const BY_MESSAGE: &str = "idx_usage_message";

#[allow(elided_lifetimes_in_paths)]
#[async_trait::async_trait]
impl MigrationTrait for Migration {
    fn use_transaction(&self) -> Option<bool> {
        Some(true)
    }

    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        swap(manager, (BY_MESSAGE, Usage::MessageId), BY_CHAT).await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        swap(manager, (BY_CHAT, Usage::ChatId), BY_MESSAGE).await
    }
}

/// Creates the index `name` on `column`, then drops the index `old`.
async fn swap(manager: &SchemaManager<'_>, (name, column): (&str, Usage), old: &str) -> Result<(), DbErr> {
    manager.create_index(Index::create().name(name).table(Usage::Table).col(column).to_owned()).await?;
    manager.drop_index(Index::drop().name(old).table(Usage::Table).to_owned()).await
}

#[derive(DeriveIden)]
enum Usage {
    Table,
    ChatId,
    MessageId,
}
