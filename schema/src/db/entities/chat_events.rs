//! `chat_events`: the durable WebSocket events of each chat.

use sea_orm::entity::prelude::*;

/// A durable stream event, keyed by (`chat_id`, `seq`) and replayed to a client that reconnects
/// with the last `seq` it saw; `kind` names the event and `payload` is its JSON body.
#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "chat_events")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub chat_id: String,
    #[sea_orm(primary_key, auto_increment = false)]
    pub seq: i64,
    pub kind: String,
    pub payload: Json,
    pub created_at: DateTimeUtc,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
