//! The initial schema: every table and index.
//!
//! Column types map as follows: ids and short strings `varchar`; long text `text`; timestamps
//! `timestamp with time zone` (RFC 3339 text on SQLite); JSON `json` (text on SQLite); booleans
//! `boolean`; counters `bigint`; blobs `bytea` / `blob`. JSON is `json` rather than `jsonb` on
//! PostgreSQL on purpose: it keeps the document byte for byte (key order included), which matters
//! for tool arguments replayed to a model. No foreign keys: rows are deleted by the application
//! in its own order, and lookups rely on the indexes below.

use sea_orm_migration::{prelude::*, schema::*};

#[derive(DeriveMigrationName)]
pub struct Migration;

// The trait elides `SchemaManager`'s lifetime; writing `<'_>` here would not match it under
// async_trait's expansion.
#[allow(elided_lifetimes_in_paths)]
#[async_trait::async_trait]
impl MigrationTrait for Migration {
    // SQLite runs DDL transactionally too, so a failed first start leaves no half-built schema.
    fn use_transaction(&self) -> Option<bool> {
        Some(true)
    }

    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        for table in tables() {
            manager.create_table(table).await?;
        }
        for index in indexes() {
            manager.create_index(index).await?;
        }
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        for name in [
            Users::Table.into_iden(),
            ApiTokens::Table.into_iden(),
            Providers::Table.into_iden(),
            Models::Table.into_iden(),
            Templates::Table.into_iden(),
            Workspaces::Table.into_iden(),
            Chats::Table.into_iden(),
            Messages::Table.into_iden(),
            QueuedMessages::Table.into_iden(),
            ToolCalls::Table.into_iden(),
            Files::Table.into_iden(),
            Usage::Table.into_iden(),
            AuditEvents::Table.into_iden(),
            ChatEvents::Table.into_iden(),
        ] {
            manager.drop_table(Table::drop().table(name).if_exists().to_owned()).await?;
        }
        Ok(())
    }
}

/// A text primary key holding a UUID.
fn pk_id<T: IntoIden>(col: T) -> ColumnDef {
    string(col).primary_key().take()
}

fn timestamp_utc<T: IntoIden>(col: T) -> ColumnDef {
    timestamp_with_time_zone(col)
}

fn timestamp_utc_null<T: IntoIden>(col: T) -> ColumnDef {
    timestamp_with_time_zone_null(col)
}

fn tables() -> Vec<TableCreateStatement> {
    vec![
        Table::create()
            .table(Users::Table)
            .col(pk_id(Users::Id))
            .col(string(Users::Name))
            .col(string(Users::Role))
            .col(timestamp_utc(Users::CreatedAt))
            .to_owned(),
        Table::create()
            .table(ApiTokens::Table)
            .col(pk_id(ApiTokens::Id))
            .col(string(ApiTokens::UserId))
            .col(string(ApiTokens::Name))
            .col(string(ApiTokens::TokenHash))
            .col(timestamp_utc(ApiTokens::CreatedAt))
            .col(timestamp_utc_null(ApiTokens::LastUsedAt))
            .col(boolean(ApiTokens::Revoked).default(false))
            .to_owned(),
        Table::create()
            .table(Providers::Table)
            .col(pk_id(Providers::Id))
            .col(string(Providers::ProviderType))
            .col(string(Providers::Name))
            .col(string(Providers::BaseUrl))
            .col(text_null(Providers::ApiKey))
            .col(json(Providers::Settings))
            .col(timestamp_utc(Providers::CreatedAt))
            .col(timestamp_utc(Providers::UpdatedAt))
            .to_owned(),
        Table::create()
            .table(Models::Table)
            .col(pk_id(Models::Id))
            .col(string(Models::ProviderId))
            .col(string(Models::Model))
            .col(string(Models::DisplayName))
            .col(big_integer(Models::ContextWindow))
            .col(big_integer_null(Models::MaxOutputTokens))
            .col(boolean(Models::Vision))
            .col(boolean(Models::Enabled))
            .col(boolean(Models::IsDefault))
            .col(double_null(Models::CompactionThreshold))
            .col(double_null(Models::InputPricePerMtok))
            .col(double_null(Models::OutputPricePerMtok))
            .col(timestamp_utc(Models::CreatedAt))
            .to_owned(),
        Table::create()
            .table(Templates::Table)
            .col(pk_id(Templates::Id))
            .col(string(Templates::Name))
            .col(text(Templates::Description))
            .col(json(Templates::Parameters))
            .col(json(Templates::Provisioner))
            .col(timestamp_utc(Templates::CreatedAt))
            .col(timestamp_utc(Templates::UpdatedAt))
            .to_owned(),
        Table::create()
            .table(Workspaces::Table)
            .col(pk_id(Workspaces::Id))
            .col(string(Workspaces::Name))
            .col(string(Workspaces::TemplateId))
            .col(string(Workspaces::OwnerId))
            .col(string(Workspaces::Status))
            .col(json(Workspaces::Parameters))
            .col(json(Workspaces::State))
            .col(text(Workspaces::Logs))
            .col(timestamp_utc(Workspaces::CreatedAt))
            .col(timestamp_utc(Workspaces::UpdatedAt))
            .to_owned(),
        Table::create()
            .table(Chats::Table)
            .col(pk_id(Chats::Id))
            .col(string(Chats::OwnerId))
            .col(text_null(Chats::Title))
            .col(string(Chats::Status))
            .col(string_null(Chats::ModelId))
            .col(string_null(Chats::WorkspaceId))
            .col(string_null(Chats::ParentId))
            .col(string_null(Chats::ForkedFromChatId))
            .col(string_null(Chats::ForkedFromMessageId))
            .col(boolean(Chats::Archived).default(false))
            .col(boolean(Chats::Deleted).default(false))
            .col(string_null(Chats::ErrorKind))
            .col(text_null(Chats::ErrorMessage))
            .col(big_integer(Chats::LastSeq).default(0))
            .col(string_null(Chats::OwnerReplica))
            .col(timestamp_utc_null(Chats::LeaseUntil))
            .col(big_integer(Chats::OwnerEpoch).default(0))
            .col(timestamp_utc(Chats::CreatedAt))
            .col(timestamp_utc(Chats::UpdatedAt))
            .to_owned(),
        Table::create()
            .table(Messages::Table)
            .col(pk_id(Messages::Id))
            .col(string(Messages::ChatId))
            .col(big_integer(Messages::Position))
            .col(string(Messages::Role))
            .col(json(Messages::Parts))
            .col(boolean(Messages::Interrupted).default(false))
            .col(boolean(Messages::Deleted).default(false))
            .col(string_null(Messages::UserId))
            .col(string_null(Messages::ModelId))
            .col(timestamp_utc(Messages::CreatedAt))
            .to_owned(),
        Table::create()
            .table(QueuedMessages::Table)
            .col(pk_id(QueuedMessages::Id))
            .col(string(QueuedMessages::ChatId))
            .col(big_integer(QueuedMessages::Position))
            .col(json(QueuedMessages::Content))
            .col(string(QueuedMessages::UserId))
            .col(timestamp_utc(QueuedMessages::CreatedAt))
            .to_owned(),
        Table::create()
            .table(ToolCalls::Table)
            .col(pk_id(ToolCalls::Id))
            .col(string(ToolCalls::CallId))
            .col(string(ToolCalls::ChatId))
            .col(string(ToolCalls::MessageId))
            .col(string(ToolCalls::Name))
            .col(json(ToolCalls::Args))
            .col(string(ToolCalls::Status))
            .col(text_null(ToolCalls::Result))
            .col(boolean(ToolCalls::IsError).default(false))
            .col(string(ToolCalls::UserId))
            .col(string_null(ToolCalls::WorkspaceId))
            .col(integer_null(ToolCalls::ExitCode))
            .col(big_integer_null(ToolCalls::DurationMs))
            .col(timestamp_utc(ToolCalls::CreatedAt))
            .col(timestamp_utc_null(ToolCalls::FinishedAt))
            .to_owned(),
        Table::create()
            .table(Files::Table)
            .col(pk_id(Files::Id))
            .col(string(Files::OwnerId))
            .col(string(Files::ContentType))
            .col(big_integer(Files::Size))
            .col(string(Files::Sha256))
            .col(blob(Files::Bytes))
            .col(timestamp_utc(Files::CreatedAt))
            .to_owned(),
        Table::create()
            .table(Usage::Table)
            .col(pk_id(Usage::Id))
            .col(string(Usage::ChatId))
            .col(string_null(Usage::MessageId))
            .col(string_null(Usage::ModelId))
            .col(big_integer(Usage::InputTokens).default(0))
            .col(big_integer(Usage::OutputTokens).default(0))
            .col(big_integer(Usage::CacheReadTokens).default(0))
            .col(big_integer(Usage::CacheWriteTokens).default(0))
            .col(double_null(Usage::CostUsd))
            .col(timestamp_utc(Usage::CreatedAt))
            .to_owned(),
        Table::create()
            .table(AuditEvents::Table)
            .col(pk_id(AuditEvents::Id))
            .col(string_null(AuditEvents::UserId))
            .col(string(AuditEvents::Action))
            .col(string(AuditEvents::TargetType))
            .col(string_null(AuditEvents::TargetId))
            .col(json(AuditEvents::Details))
            .col(timestamp_utc(AuditEvents::CreatedAt))
            .to_owned(),
        Table::create()
            .table(ChatEvents::Table)
            .col(string(ChatEvents::ChatId))
            .col(big_integer(ChatEvents::Seq))
            .col(string(ChatEvents::Kind))
            .col(json(ChatEvents::Payload))
            .col(timestamp_utc(ChatEvents::CreatedAt))
            .primary_key(Index::create().col(ChatEvents::ChatId).col(ChatEvents::Seq))
            .to_owned(),
    ]
}

fn indexes() -> Vec<IndexCreateStatement> {
    vec![
        Index::create().name("ux_users_name").table(Users::Table).col(Users::Name).unique().to_owned(),
        Index::create()
            .name("ux_api_tokens_token_hash")
            .table(ApiTokens::Table)
            .col(ApiTokens::TokenHash)
            .unique()
            .to_owned(),
        Index::create().name("idx_api_tokens_user").table(ApiTokens::Table).col(ApiTokens::UserId).to_owned(),
        Index::create().name("ux_providers_name").table(Providers::Table).col(Providers::Name).unique().to_owned(),
        Index::create().name("idx_models_provider").table(Models::Table).col(Models::ProviderId).to_owned(),
        Index::create().name("ux_templates_name").table(Templates::Table).col(Templates::Name).unique().to_owned(),
        Index::create().name("idx_workspaces_owner").table(Workspaces::Table).col(Workspaces::OwnerId).to_owned(),
        Index::create()
            .name("idx_chats_owner_updated")
            .table(Chats::Table)
            .col(Chats::OwnerId)
            .col(Chats::UpdatedAt)
            .to_owned(),
        Index::create().name("idx_chats_parent").table(Chats::Table).col(Chats::ParentId).to_owned(),
        // Lease renewal updates every chat of one replica in a single statement, every few seconds.
        Index::create().name("idx_chats_owner_replica").table(Chats::Table).col(Chats::OwnerReplica).to_owned(),
        Index::create()
            .name("ux_messages_chat_position")
            .table(Messages::Table)
            .col(Messages::ChatId)
            .col(Messages::Position)
            .unique()
            .to_owned(),
        Index::create()
            .name("idx_queued_messages_chat_position")
            .table(QueuedMessages::Table)
            .col(QueuedMessages::ChatId)
            .col(QueuedMessages::Position)
            .to_owned(),
        // Not unique: some providers reuse call ids across turns; a call is identified by its
        // message and call id together.
        Index::create()
            .name("idx_tool_calls_chat_call")
            .table(ToolCalls::Table)
            .col(ToolCalls::ChatId)
            .col(ToolCalls::CallId)
            .to_owned(),
        Index::create().name("idx_files_owner").table(Files::Table).col(Files::OwnerId).to_owned(),
        Index::create().name("idx_usage_chat").table(Usage::Table).col(Usage::ChatId).to_owned(),
        Index::create()
            .name("idx_audit_events_created")
            .table(AuditEvents::Table)
            .col(AuditEvents::CreatedAt)
            .to_owned(),
    ]
}

#[derive(DeriveIden)]
enum Users {
    Table,
    Id,
    Name,
    Role,
    CreatedAt,
}

#[derive(DeriveIden)]
enum ApiTokens {
    Table,
    Id,
    UserId,
    Name,
    TokenHash,
    CreatedAt,
    LastUsedAt,
    Revoked,
}

#[derive(DeriveIden)]
enum Providers {
    Table,
    Id,
    ProviderType,
    Name,
    BaseUrl,
    ApiKey,
    Settings,
    CreatedAt,
    UpdatedAt,
}

#[derive(DeriveIden)]
enum Models {
    Table,
    Id,
    ProviderId,
    Model,
    DisplayName,
    ContextWindow,
    MaxOutputTokens,
    Vision,
    Enabled,
    IsDefault,
    CompactionThreshold,
    InputPricePerMtok,
    OutputPricePerMtok,
    CreatedAt,
}

#[derive(DeriveIden)]
enum Templates {
    Table,
    Id,
    Name,
    Description,
    Parameters,
    Provisioner,
    CreatedAt,
    UpdatedAt,
}

#[derive(DeriveIden)]
enum Workspaces {
    Table,
    Id,
    Name,
    TemplateId,
    OwnerId,
    Status,
    Parameters,
    State,
    Logs,
    CreatedAt,
    UpdatedAt,
}

#[derive(DeriveIden)]
enum Chats {
    Table,
    Id,
    OwnerId,
    Title,
    Status,
    ModelId,
    WorkspaceId,
    ParentId,
    ForkedFromChatId,
    ForkedFromMessageId,
    Archived,
    Deleted,
    ErrorKind,
    ErrorMessage,
    LastSeq,
    OwnerReplica,
    LeaseUntil,
    OwnerEpoch,
    CreatedAt,
    UpdatedAt,
}

#[derive(DeriveIden)]
enum Messages {
    Table,
    Id,
    ChatId,
    Position,
    Role,
    Parts,
    Interrupted,
    Deleted,
    UserId,
    ModelId,
    CreatedAt,
}

#[derive(DeriveIden)]
enum QueuedMessages {
    Table,
    Id,
    ChatId,
    Position,
    Content,
    UserId,
    CreatedAt,
}

#[derive(DeriveIden)]
enum ToolCalls {
    Table,
    Id,
    CallId,
    ChatId,
    MessageId,
    Name,
    Args,
    Status,
    Result,
    IsError,
    UserId,
    WorkspaceId,
    ExitCode,
    DurationMs,
    CreatedAt,
    FinishedAt,
}

#[derive(DeriveIden)]
enum Files {
    Table,
    Id,
    OwnerId,
    ContentType,
    Size,
    Sha256,
    Bytes,
    CreatedAt,
}

#[derive(DeriveIden)]
enum Usage {
    Table,
    Id,
    ChatId,
    MessageId,
    ModelId,
    InputTokens,
    OutputTokens,
    CacheReadTokens,
    CacheWriteTokens,
    CostUsd,
    CreatedAt,
}

#[derive(DeriveIden)]
enum AuditEvents {
    Table,
    Id,
    UserId,
    Action,
    TargetType,
    TargetId,
    Details,
    CreatedAt,
}

#[derive(DeriveIden)]
enum ChatEvents {
    Table,
    ChatId,
    Seq,
    Kind,
    Payload,
    CreatedAt,
}
