//! Per-model dialect settings (e.g. OpenAI's `api: "responses"`) and cache prices.
//!
//! SQLite adds one column per `ALTER TABLE`, so each column is its own statement.

use sea_orm_migration::{prelude::*, schema::*};

#[derive(DeriveMigrationName)]
pub struct Migration;

#[allow(elided_lifetimes_in_paths)]
#[async_trait::async_trait]
impl MigrationTrait for Migration {
    fn use_transaction(&self) -> Option<bool> {
        Some(true)
    }

    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        for column in [
            json_null(Models::Settings),
            double_null(Models::CacheReadPricePerMtok),
            double_null(Models::CacheWritePricePerMtok),
        ] {
            manager.alter_table(Table::alter().table(Models::Table).add_column(column).to_owned()).await?;
        }
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        for column in [Models::Settings, Models::CacheReadPricePerMtok, Models::CacheWritePricePerMtok] {
            manager.alter_table(Table::alter().table(Models::Table).drop_column(column).to_owned()).await?;
        }
        Ok(())
    }
}

#[derive(DeriveIden)]
enum Models {
    Table,
    Settings,
    CacheReadPricePerMtok,
    CacheWritePricePerMtok,
}
