//! `templates`: workspace templates.

use sea_orm::entity::prelude::*;

/// A workspace template: a unique `name`, the `parameters` a user fills in (JSON list of
/// [`crate::api::TemplateParameter`]) and how to provision it (`provisioner`, JSON
/// [`crate::api::ProvisionerSpec`]).
#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "templates")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: String,
    #[sea_orm(unique)]
    pub name: String,
    #[sea_orm(column_type = "Text")]
    pub description: String,
    pub parameters: Json,
    pub provisioner: Json,
    pub created_at: DateTimeUtc,
    pub updated_at: DateTimeUtc,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
