//! Rows ↔ wire types.

use agentplane_actors::ports::StoreError;
use agentplane_schema::api::{Chat, ChatError, ChatErrorKind, ChatStatus, ForkRef};
use agentplane_schema::db::entities::{audit_events, chats, messages};
use agentplane_schema::message::{Message, Role};
use sea_orm::ActiveValue::Set;
use serde::Serialize;
use serde::de::DeserializeOwned;

pub fn to_json<T: Serialize>(v: &T) -> Result<serde_json::Value, StoreError> {
    serde_json::to_value(v).map_err(|e| StoreError::Database(format!("encoding JSON: {e}")))
}

pub fn from_json<T: DeserializeOwned>(v: serde_json::Value, what: &str) -> Result<T, StoreError> {
    serde_json::from_value(v).map_err(|e| StoreError::Database(format!("decoding {what}: {e}")))
}

/// The string form of a unit enum as serde writes it.
pub fn enum_str<T: Serialize>(v: &T) -> String {
    serde_json::to_value(v).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default()
}

pub fn chat_from_row(row: chats::Model) -> Chat {
    let error = match (row.error_kind, row.error_message) {
        (Some(kind), message) => Some(ChatError {
            kind: serde_json::from_value(serde_json::Value::String(kind)).unwrap_or(ChatErrorKind::Internal),
            message: message.unwrap_or_default(),
        }),
        _ => None,
    };
    Chat {
        id: row.id,
        owner_id: row.owner_id,
        title: row.title,
        status: ChatStatus::parse(&row.status).unwrap_or(ChatStatus::Idle),
        model_id: row.model_id,
        workspace_id: row.workspace_id,
        parent_id: row.parent_id,
        forked_from: match (row.forked_from_chat_id, row.forked_from_message_id) {
            (Some(chat_id), Some(message_id)) => Some(ForkRef { chat_id, message_id }),
            _ => None,
        },
        archived: row.archived,
        error,
        created_at: row.created_at,
        updated_at: row.updated_at,
    }
}

pub fn message_from_row(row: messages::Model) -> Result<Message, StoreError> {
    Ok(Message {
        role: Role::parse(&row.role).ok_or_else(|| StoreError::Database(format!("unknown role {}", row.role)))?,
        parts: from_json(row.parts, "message parts")?,
        id: row.id,
        chat_id: row.chat_id,
        position: row.position,
        interrupted: row.interrupted,
        user_id: row.user_id,
        model_id: row.model_id,
        created_at: row.created_at,
    })
}

/// An audit log row: who did what to which target.
pub fn audit_row(
    user_id: Option<String>,
    action: &str,
    target_type: &str,
    target_id: Option<String>,
    details: serde_json::Value,
) -> audit_events::ActiveModel {
    audit_events::ActiveModel {
        id: Set(agentplane_schema::new_id()),
        user_id: Set(user_id),
        action: Set(action.to_string()),
        target_type: Set(target_type.to_string()),
        target_id: Set(target_id),
        details: Set(details),
        created_at: Set(chrono::Utc::now()),
    }
}

/// A fresh, idle chat row.
pub fn new_chat_row(
    owner_id: String,
    title: Option<String>,
    model_id: Option<String>,
    workspace_id: Option<String>,
    parent_id: Option<String>,
    forked_from: Option<ForkRef>,
) -> chats::Model {
    let now = chrono::Utc::now();
    let (forked_from_chat_id, forked_from_message_id) = match forked_from {
        Some(f) => (Some(f.chat_id), Some(f.message_id)),
        None => (None, None),
    };
    chats::Model {
        id: agentplane_schema::new_id(),
        owner_id,
        title,
        status: ChatStatus::Idle.as_str().into(),
        model_id,
        workspace_id,
        parent_id,
        forked_from_chat_id,
        forked_from_message_id,
        archived: false,
        deleted: false,
        error_kind: None,
        error_message: None,
        last_seq: 0,
        owner_replica: None,
        lease_until: None,
        owner_epoch: 0,
        created_at: now,
        updated_at: now,
    }
}
