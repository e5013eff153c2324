//! `models`: the models offered by each provider.

use sea_orm::entity::prelude::*;

/// A model of a provider (`model` is the provider's own model name), with its limits,
/// capabilities, the compaction threshold (fraction of the context window) and prices in USD per
/// million tokens. At most one row is meant to be `is_default`; the caller enforces it.
#[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
#[sea_orm(table_name = "models")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: String,
    pub provider_id: String,
    pub model: String,
    pub display_name: String,
    pub context_window: i64,
    pub max_output_tokens: Option<i64>,
    pub vision: bool,
    pub enabled: bool,
    pub is_default: bool,
    pub compaction_threshold: Option<f64>,
    pub input_price_per_mtok: Option<f64>,
    pub output_price_per_mtok: Option<f64>,
    pub cache_read_price_per_mtok: Option<f64>,
    pub cache_write_price_per_mtok: Option<f64>,
    /// Dialect settings of this model, laid over its provider's (e.g. `{"api": "responses"}`).
    pub settings: Option<Json>,
    pub created_at: DateTimeUtc,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
