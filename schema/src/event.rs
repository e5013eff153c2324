//! Events on a chat's WebSocket stream (`GET /api/v1/chats/{id}/stream?after_seq=N`).
//!
//! Durable events carry a per-chat `seq` and are stored before they are published, so a client
//! that reconnects with the last `seq` it saw gets every later durable event exactly once.
//! Ephemeral events (deltas, tool output pieces, stream resets) carry no `seq`, only the
//! `follows_seq` of the last durable event before them.

use serde::{Deserialize, Serialize};

use crate::api::{BusyBehavior, Chat, ChatError, ChatStatus};
use crate::message::{Message, Part, QueuedMessage};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StreamEvent {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq: Option<i64>,
    /// On an ephemeral event from the chat: the last durable `seq` the chat had published when
    /// this one was sent. Durable events after it were published after it, so one who already
    /// holds them (a snapshot, a replay) can tell a piece of an answer or tool call they closed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub follows_seq: Option<i64>,
    pub chat_id: String,
    #[serde(flatten)]
    pub body: EventBody,
}

impl StreamEvent {
    /// A stored event with its per-chat `seq`.
    pub fn durable(seq: i64, chat_id: impl Into<String>, body: EventBody) -> Self {
        StreamEvent { seq: Some(seq), follows_seq: None, chat_id: chat_id.into(), body }
    }

    /// An ephemeral event sent after the chat's durable event `follows_seq`.
    pub fn ephemeral(follows_seq: i64, chat_id: impl Into<String>, body: EventBody) -> Self {
        StreamEvent { seq: None, follows_seq: Some(follows_seq), chat_id: chat_id.into(), body }
    }

    /// A frame for one connection only (its snapshot, a reset after it lagged).
    pub fn local(chat_id: impl Into<String>, body: EventBody) -> Self {
        StreamEvent { seq: None, follows_seq: None, chat_id: chat_id.into(), body }
    }
}

/// An event as the bus and the store carry it: one allocation shared by the commit that stores
/// it and every session that sends it, its JSON written at most once, by whichever needs it
/// first (the store's writer for a durable event, the first watcher's session otherwise).
#[derive(Debug)]
pub struct SharedEvent {
    event: StreamEvent,
    json: std::sync::OnceLock<String>,
}

impl SharedEvent {
    pub fn new(event: StreamEvent) -> std::sync::Arc<Self> {
        std::sync::Arc::new(SharedEvent { event, json: std::sync::OnceLock::new() })
    }

    /// The event's JSON: its stored payload and its WebSocket frame.
    pub fn json(&self) -> Result<&str, serde_json::Error> {
        if let Some(json) = self.json.get() {
            return Ok(json);
        }
        // Two threads asking at once may both write it; one copy is kept.
        let json = serde_json::to_string(&self.event)?;
        Ok(self.json.get_or_init(|| json))
    }
}

impl std::ops::Deref for SharedEvent {
    type Target = StreamEvent;

    fn deref(&self) -> &StreamEvent {
        &self.event
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeltaKind {
    Text,
    Reasoning,
    /// A piece of a tool call's JSON arguments.
    ToolArgs,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ToolPhase {
    Started,
    Output,
    Finished,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SubagentPhase {
    Spawned,
    Status,
    Finished,
}

/// Where a sub-agent stands, as its parent sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SubagentStatus {
    Running,
    /// Its turn ended with an answer.
    Finished,
    /// Its turn ended with an error (or it crashed).
    Failed,
    /// Stopped by close_agent or by its parent closing.
    Closed,
}

impl SubagentStatus {
    pub fn is_terminal(self) -> bool {
        self != SubagentStatus::Running
    }
}

/// A running sub-agent, as a snapshot lists it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunningSubagent {
    pub agent_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum EventBody {
    /// First frame of every connection: the chat as it is now. `seq` is the last durable seq
    /// the snapshot includes.
    Snapshot {
        /// Boxed: the other events are small, and every event is as big as the biggest.
        chat: Box<Chat>,
        messages: Vec<Message>,
        queued_messages: Vec<QueuedMessage>,
        /// The chat's sub-agents that are running; later `subagent` events tell of changes.
        #[serde(default)]
        running_subagents: Vec<RunningSubagent>,
        last_seq: i64,
    },
    Status {
        status: ChatStatus,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<ChatError>,
    },
    MessageDelta {
        kind: DeltaKind,
        text: String,
        /// The tool call the piece belongs to (for `tool_args`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        call_id: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        name: Option<String>,
    },
    Message {
        message: Message,
    },
    ToolCall {
        phase: ToolPhase,
        call_id: String,
        name: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        args: Option<serde_json::Value>,
        /// Output piece (`output`) or final result text (`finished`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        output: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        is_error: Option<bool>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        workspace_id: Option<String>,
    },
    QueueUpdate {
        queued_messages: Vec<QueuedMessage>,
    },
    /// A sub-agent of this chat was spawned, changed status, or finished (with its report).
    Subagent {
        agent_id: String,
        phase: SubagentPhase,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        title: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        status: Option<SubagentStatus>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        report: Option<String>,
    },
    /// The chat's title changed (generated from the first message).
    Title {
        title: String,
    },
    /// Messages from `from_position` on were dropped (a user message was edited); the edited one
    /// follows as a `message` event.
    MessagesDropped {
        from_position: i64,
    },
    /// Tokens and cost of one model call of this chat (its committed assistant message).
    Usage {
        message_id: String,
        model_id: String,
        usage: crate::api::UsageTotals,
    },
    Retry {
        attempt: u32,
        delay_ms: u64,
        error: ChatError,
    },
    Error {
        error: ChatError,
    },
    /// Drop the deltas of the answer being streamed: it is being produced again.
    StreamReset,
}

impl EventBody {
    /// Whether this (durable) event ends what the ephemeral `piece` is part of: a committed
    /// assistant message ends the answer its deltas streamed (and any reset of it), a finished
    /// tool call its output pieces.
    pub fn closes(&self, piece: &EventBody) -> bool {
        match (self, piece) {
            (EventBody::Message { message }, EventBody::MessageDelta { .. } | EventBody::StreamReset) => {
                message.role == crate::message::Role::Assistant
            }
            (
                EventBody::ToolCall { phase: ToolPhase::Finished, call_id, .. },
                EventBody::ToolCall { phase: ToolPhase::Output, call_id: piece_call, .. },
            ) => call_id == piece_call,
            // A turn that ended, or a new one, leaves nothing of an earlier one streaming.
            (EventBody::Status { status, .. }, _) => {
                matches!(status, ChatStatus::Idle | ChatStatus::Error | ChatStatus::Running)
            }
            _ => false,
        }
    }

    /// Durable events are stored with a `seq` and replayed on reconnect.
    pub fn is_durable(&self) -> bool {
        match self {
            EventBody::MessageDelta { .. } | EventBody::StreamReset | EventBody::Snapshot { .. } => false,
            EventBody::ToolCall { phase, .. } => *phase != ToolPhase::Output,
            _ => true,
        }
    }

    /// The `type` tag, as stored.
    pub fn kind(&self) -> &'static str {
        match self {
            EventBody::Snapshot { .. } => "snapshot",
            EventBody::Status { .. } => "status",
            EventBody::MessageDelta { .. } => "message_delta",
            EventBody::Message { .. } => "message",
            EventBody::ToolCall { .. } => "tool_call",
            EventBody::QueueUpdate { .. } => "queue_update",
            EventBody::MessagesDropped { .. } => "messages_dropped",
            EventBody::Subagent { .. } => "subagent",
            EventBody::Title { .. } => "title",
            EventBody::Usage { .. } => "usage",
            EventBody::Retry { .. } => "retry",
            EventBody::Error { .. } => "error",
            EventBody::StreamReset => "stream_reset",
        }
    }
}

/// Frames a client may send on the stream socket.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ClientFrame {
    Send {
        content: Vec<Part>,
        #[serde(default)]
        busy_behavior: BusyBehavior,
    },
    Interrupt,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_serialize_flat_with_type_tag() {
        let ev = StreamEvent::durable(3, "c", EventBody::Status { status: ChatStatus::Running, error: None });
        let v = serde_json::to_value(&ev).expect("json");
        assert_eq!(v, serde_json::json!({"seq": 3, "chat_id": "c", "type": "status", "status": "running"}));
        let back: StreamEvent = serde_json::from_value(v).expect("parse");
        assert_eq!(back, ev);
        let delta = StreamEvent::ephemeral(
            3,
            "c",
            EventBody::MessageDelta { kind: DeltaKind::Text, text: "hi".into(), call_id: None, name: None },
        );
        assert!(!delta.body.is_durable());
        let v = serde_json::to_value(&delta).expect("json");
        assert!(v.get("seq").is_none());
        assert_eq!(v["follows_seq"], 3);
    }

    #[test]
    fn a_shared_event_writes_its_json_once_and_reads_as_the_event() {
        let ev = StreamEvent::durable(3, "c", EventBody::Title { title: "a \"quoted\" title".into() });
        let shared = SharedEvent::new(ev.clone());
        let first = shared.json().expect("json");
        assert_eq!(first, serde_json::to_string(&ev).expect("json"));
        assert!(std::ptr::eq(first, shared.json().expect("json")), "kept, not written again");
        assert_eq!(**shared, ev);
        assert_eq!(serde_json::from_str::<StreamEvent>(first).expect("parse"), ev);
    }

    #[test]
    fn client_frames_parse() {
        let f: ClientFrame =
            serde_json::from_str(r#"{"type":"send","content":[{"type":"text","text":"x"}]}"#).expect("send");
        assert!(matches!(f, ClientFrame::Send { busy_behavior: BusyBehavior::Queue, .. }));
        let f: ClientFrame = serde_json::from_str(r#"{"type":"interrupt"}"#).expect("interrupt");
        assert!(matches!(f, ClientFrame::Interrupt));
    }
}
