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

/// From the directory: stop after cancelling the running step.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Close;

/// From the API: replace a past user message, drop what came after it (and the queue), and run
/// the turn again. Answers the new message; refused while a turn runs.
#[derive(Message)]
#[rtype(result = "Result<agentplane_schema::message::Message, ChatOpError>")]
pub struct EditMessage {
    pub user_id: String,
    pub message_id: String,
    pub content: Vec<Part>,
}
