//! Messages a [`ChatActor`](super::ChatActor) handles. Sent only through [`ChatHandle`](crate::ChatHandle).

use actix::Message;
use agentplane_schema::api::{BusyBehavior, SendOutcome};
use agentplane_schema::message::Part;

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

/// From the API: remove a queued message before it is delivered. Answers whether it was there.
#[derive(Message)]
#[rtype(result = "Result<bool, ChatOpError>")]
pub struct DeleteQueued {
    pub queued_id: String,
}

/// From the directory: stop after cancelling the running step.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Close;
