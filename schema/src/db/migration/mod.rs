//! Schema migrations, run in order by [`Migrator`] and recorded in `seaql_migrations`.
//!
//! Migrations are written against sea-query's portable column types (no backend-specific SQL), so
//! the same code builds the schema on SQLite and PostgreSQL. A migration, once released, is never
//! edited: changes go into a new module listed after it.

use sea_orm_migration::prelude::*;

mod m20261101_000001_initial;
mod m20261124_000001_model_settings;
mod m20261125_000001_tool_calls_by_message;
mod m20261125_000002_usage_by_message;

/// Every migration of agentplane's database, oldest first.
pub struct Migrator;

#[async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![
            Box::new(m20261101_000001_initial::Migration),
            Box::new(m20261124_000001_model_settings::Migration),
            Box::new(m20261125_000001_tool_calls_by_message::Migration),
            Box::new(m20261125_000002_usage_by_message::Migration),
        ]
    }
}
