//! sea-orm entities, one module per table, named after the table.
//!
//! Ids are UUID text ([`crate::new_id`]), timestamps are UTC, enumerations are stored as their
//! string form and parsed by the caller, structured values are JSON. [`prelude`] re-exports every
//! entity under a CamelCase name (`Chats`, `ToolCalls`, ...).

pub mod api_tokens;
pub mod audit_events;
pub mod chat_events;
pub mod chats;
pub mod files;
pub mod messages;
pub mod models;
pub mod providers;
pub mod queued_messages;
pub mod templates;
pub mod tool_calls;
pub mod usage;
pub mod users;
pub mod workspaces;

/// Every entity under a CamelCase name, for `use agentplane_schema::db::entities::prelude::*`.
pub mod prelude {
    pub use super::api_tokens::Entity as ApiTokens;
    pub use super::audit_events::Entity as AuditEvents;
    pub use super::chat_events::Entity as ChatEvents;
    pub use super::chats::Entity as Chats;
    pub use super::files::Entity as Files;
    pub use super::messages::Entity as Messages;
    pub use super::models::Entity as Models;
    pub use super::providers::Entity as Providers;
    pub use super::queued_messages::Entity as QueuedMessages;
    pub use super::templates::Entity as Templates;
    pub use super::tool_calls::Entity as ToolCalls;
    pub use super::usage::Entity as Usage;
    pub use super::users::Entity as Users;
    pub use super::workspaces::Entity as Workspaces;
}
