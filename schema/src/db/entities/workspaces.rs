//! `workspaces`: provisioned environments where tools run.

use sea_orm::entity::prelude::*;

/// A workspace built from a template for an owner: its `status` (parsed as
/// [`crate::api::WorkspaceStatus`]), the parameter values chosen, the provisioner's opaque
/// `state` (JSON) and the provisioning `logs`.
#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "workspaces")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: String,
    pub name: String,
    pub template_id: String,
    pub owner_id: String,
    pub status: String,
    pub parameters: Json,
    pub state: Json,
    #[sea_orm(column_type = "Text")]
    pub logs: String,
    pub created_at: DateTimeUtc,
    pub updated_at: DateTimeUtc,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
