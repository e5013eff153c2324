//! Messages a [`ChatActor`](super::ChatActor) handles. Sent only through [`ChatHandle`](crate::ChatHandle).

use actix::Message;
use agentplane_schema::api::{BusyBehavior, SendOutcome};
use agentplane_schema::message::{Part, QueuedMessage};

use crate::error::ChatOpError;

/// From the API (REST or WebSocket `send`): a user message. Answers whether it was queued.
#[derive(Message)]
#[rtype(result = "Result<SendOutcome, ChatOpError>")]
pub struct UserInput {
    pub user_id: String,
    pub content: Vec<Part>,
    pub busy: BusyBehavior,
}

/// From the API: stop the running turn. Answers once the interrupt is recorded.
#[derive(Message)]
#[rtype(result = "Result<(), ChatOpError>")]
pub struct Interrupt;

/// From the API: replace (`Some`) or remove (`None`) the content of a queued message before it
/// is delivered. Answers the message as it is now (the removed one for a delete), `None` when it
/// was not (or no longer) queued.
#[derive(Message)]
#[rtype(result = "Result<Option<QueuedMessage>, ChatOpError>")]
pub struct EditQueued {
    pub queued_id: String,
    pub content: Option<Vec<Part>>,
}

/// From the directory or a parent: stop after closing its own sub-agents and cancelling the
/// running step. The chat stays in the database, readable.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Close {
    /// Record the chat as no longer running (closed for good). `false` on shutdown, so a
    /// running chat resumes when the server starts again.
    pub stop_turn: bool,
}

/// From the API: replace a past user message, drop what came after it (and the queue), and run
/// the turn again. Answers the new message; refused while a turn runs.
#[derive(Message)]
#[rtype(result = "Result<agentplane_schema::message::Message, ChatOpError>")]
pub struct EditMessage {
    pub user_id: String,
    pub message_id: String,
    pub content: Vec<Part>,
}

/// From a step's `spawn_agent` tool call to its own chat actor: start a sub-agent with `prompt`.
/// Answers the sub-agent's chat id at once; it runs in parallel.
#[derive(Message)]
#[rtype(result = "Result<String, ChatOpError>")]
pub struct SpawnChild {
    pub user_id: String,
    pub prompt: String,
    pub title: Option<String>,
    pub model_id: Option<String>,
}

/// From a sub-agent to its parent: the sub-agent's status changed (a turn began or ended, it was
/// closed, or its step crashed).
#[derive(Message)]
#[rtype(result = "()")]
pub struct ChildEvent {
    pub child_id: String,
    pub status: agentplane_schema::event::SubagentStatus,
    /// The final answer (finished) or the error (failed).
    pub report: Option<String>,
}

/// What a parent knows of one sub-agent; watched by `wait_agent`.
#[derive(Debug, Clone, PartialEq)]
pub struct ChildState {
    pub status: agentplane_schema::event::SubagentStatus,
    pub report: Option<String>,
}

/// From `wait_agent` to its chat actor: a watch on each named sub-agent. Unknown ids (not this
/// chat's sub-agents) are an error.
#[derive(Message)]
#[rtype(result = "Result<Vec<(String, tokio::sync::watch::Receiver<ChildState>)>, ChatOpError>")]
pub struct WatchChildren {
    pub ids: Vec<String>,
}

/// From `message_agent` to its chat actor: the handle of one of its sub-agents.
#[derive(Message)]
#[rtype(result = "Result<crate::ChatHandle, ChatOpError>")]
pub struct ChildHandle {
    pub id: String,
}

/// From `close_agent` to its chat actor: stop a sub-agent and all its descendants.
#[derive(Message)]
#[rtype(result = "Result<(), ChatOpError>")]
pub struct CloseChild {
    pub id: String,
}

/// From the API: summarise the conversation now (`POST /chats/{id}/compact`). Answers once the
/// compaction has started; refused while a turn runs.
#[derive(Message)]
#[rtype(result = "Result<(), ChatOpError>")]
pub struct Compact {
    pub user_id: String,
}

/// From the API after creating a chat without a title: generate one from the first message in
/// the background. Answers at once.
#[derive(Message)]
#[rtype(result = "()")]
pub struct GenerateTitle;

/// From the API (`PATCH /chats/{id}`): rename and/or (un)archive. Answers once stored.
#[derive(Message)]
#[rtype(result = "Result<(), ChatOpError>")]
pub struct UpdateChat {
    pub title: Option<String>,
    pub archived: Option<bool>,
}

/// From the title task: a generated title, to apply only if the title is still `placeholder`.
#[derive(Message)]
#[rtype(result = "()")]
pub struct TitleGenerated {
    pub title: String,
    pub placeholder: Option<String>,
}
