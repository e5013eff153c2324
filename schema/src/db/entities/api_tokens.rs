//! `api_tokens`: bearer tokens issued to users.

use sea_orm::entity::prelude::*;

/// An API token of a user. Only the hex SHA-256 of the secret is stored (`token_hash`, unique),
/// so a token is looked up by hashing what the client presents; `revoked` tokens stay for audit.
#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "api_tokens")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: String,
    pub user_id: String,
    pub name: String,
    #[sea_orm(unique)]
    pub token_hash: String,
    pub created_at: DateTimeUtc,
    pub last_used_at: Option<DateTimeUtc>,
    #[sea_orm(default_value = false)]
    pub revoked: bool,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
