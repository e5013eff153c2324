//! `providers`: configured LLM endpoints.

use sea_orm::entity::prelude::*;

/// An LLM provider: its dialect (`provider_type`, parsed as [`crate::api::ProviderType`]), a
/// unique display `name`, the endpoint and its credential. `api_key` is text so it can later hold
/// ciphertext; `settings` holds dialect-specific options as JSON.
#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "providers")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: String,
    pub provider_type: String,
    #[sea_orm(unique)]
    pub name: String,
    pub base_url: String,
    #[sea_orm(column_type = "Text", nullable)]
    pub api_key: Option<String>,
    pub settings: Json,
    pub created_at: DateTimeUtc,
    pub updated_at: DateTimeUtc,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
