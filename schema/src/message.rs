//! Chat messages and their parts, as stored and as sent over the API.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// One piece of a message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Part {
    Text {
        text: String,
    },
    Reasoning {
        text: String,
        /// Provider signature that must accompany the reasoning on later turns.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        signature: Option<String>,
    },
    ToolCall {
        call_id: String,
        name: String,
        args: serde_json::Value,
    },
    ToolResult {
        call_id: String,
        name: String,
        result: String,
        is_error: bool,
    },
    Image {
        file_id: String,
    },
}

impl Part {
    pub fn text(text: impl Into<String>) -> Self {
        Part::Text { text: text.into() }
    }
}

/// Who a message is from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    User,
    Assistant,
    /// Results of the tool calls of the assistant message before it.
    Tool,
    /// A summary of the conversation before it, written for the model by compaction; the
    /// prompt starts from the latest one. Not meant for display.
    Summary,
    /// A visible note in the conversation (e.g. "conversation summarised"); never sent to the model.
    Marker,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::User => "user",
            Role::Assistant => "assistant",
            Role::Tool => "tool",
            Role::Summary => "summary",
            Role::Marker => "marker",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "user" => Some(Role::User),
            "assistant" => Some(Role::Assistant),
            "tool" => Some(Role::Tool),
            "summary" => Some(Role::Summary),
            "marker" => Some(Role::Marker),
            _ => None,
        }
    }
}

/// A committed message of a chat.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Message {
    pub id: String,
    pub chat_id: String,
    /// Position in the chat, 1-based, strictly increasing.
    pub position: i64,
    pub role: Role,
    /// Shared, not copied, by every holder of the message (history snapshots, prompts, events,
    /// batches): a message's parts never change once it is made.
    pub parts: Arc<Vec<Part>>,
    /// The answer was cut short by an interrupt.
    #[serde(default)]
    pub interrupted: bool,
    /// The user who sent it (user messages) or on whose behalf the agent ran.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_id: Option<String>,
    pub created_at: DateTime<Utc>,
}

impl Message {
    /// Concatenated text parts.
    pub fn text(&self) -> String {
        self.parts
            .iter()
            .filter_map(|p| match p {
                Part::Text { text } => Some(text.as_str()),
                _ => None,
            })
            .collect::<Vec<_>>()
            .join("")
    }

    pub fn tool_calls(&self) -> impl Iterator<Item = (&str, &str, &serde_json::Value)> {
        self.parts.iter().filter_map(|p| match p {
            Part::ToolCall { call_id, name, args } => Some((call_id.as_str(), name.as_str(), args)),
            _ => None,
        })
    }
}

/// A user message waiting for the next step boundary.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QueuedMessage {
    pub id: String,
    pub chat_id: String,
    pub content: Vec<Part>,
    pub user_id: String,
    pub created_at: DateTime<Utc>,
}
