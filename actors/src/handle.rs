//! [`ChatHandle`]: how the API, the CLI and tests talk to a chat actor without naming actix.

use std::sync::{Arc, OnceLock};

use actix::Addr;
use agentplane_schema::api::{BusyBehavior, SendOutcome};
use agentplane_schema::message::{Part, QueuedMessage};

use crate::chat::ChatActor;
use crate::chat::messages::{Close, Compact, EditMessage, EditQueued, GenerateTitle, Interrupt, UpdateChat, UserInput};
use crate::error::ChatOpError;

#[derive(Clone)]
pub struct ChatHandle {
    addr: Addr<ChatActor>,
    /// Who owns the chat and which model it uses, once the actor has loaded it. Neither ever
    /// changes, so the API can check a request against them without reading the chat row.
    facts: Arc<OnceLock<ChatFacts>>,
}

/// What never changes about a chat.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatFacts {
    pub owner_id: String,
    pub model_id: Option<String>,
}

fn unreachable_actor(e: actix::MailboxError) -> ChatOpError {
    ChatOpError::unavailable(format!("the chat could not be reached: {e}"))
}

impl ChatHandle {
    pub(crate) fn new(addr: Addr<ChatActor>) -> Self {
        ChatHandle { addr, facts: Default::default() }
    }

    /// The chat's owner and model, when its actor has loaded it.
    pub(crate) fn facts(&self) -> Option<&ChatFacts> {
        self.facts.get()
    }

    pub(crate) fn set_facts(&self, facts: ChatFacts) {
        let _ = self.facts.set(facts);
    }

    pub(crate) fn is(&self, addr: &Addr<ChatActor>) -> bool {
        self.addr == *addr
    }

    pub(crate) fn is_alive(&self) -> bool {
        self.addr.connected()
    }

    /// Sends a user message: it starts a turn, or is queued while one runs.
    pub async fn send(
        &self,
        user_id: &str,
        content: Vec<Part>,
        busy: BusyBehavior,
    ) -> Result<SendOutcome, ChatOpError> {
        self.addr.send(UserInput { user_id: user_id.to_string(), content, busy }).await.map_err(unreachable_actor)?
    }

    /// Stops the running turn; the partial answer is kept.
    pub async fn interrupt(&self) -> Result<(), ChatOpError> {
        self.addr.send(Interrupt).await.map_err(unreachable_actor)?
    }

    /// Removes a queued message; `false` when it was not (or no longer) queued.
    pub async fn delete_queued(&self, queued_id: &str) -> Result<bool, ChatOpError> {
        let edit = EditQueued { queued_id: queued_id.to_string(), content: None };
        Ok(self.addr.send(edit).await.map_err(unreachable_actor)??.is_some())
    }

    /// Replaces the content of a queued message; `None` when it was not (or no longer) queued.
    pub async fn edit_queued(&self, queued_id: &str, content: Vec<Part>) -> Result<Option<QueuedMessage>, ChatOpError> {
        let edit = EditQueued { queued_id: queued_id.to_string(), content: Some(content) };
        self.addr.send(edit).await.map_err(unreachable_actor)?
    }

    /// Renames and/or (un)archives the chat.
    pub async fn update(&self, title: Option<String>, archived: Option<bool>) -> Result<(), ChatOpError> {
        self.addr.send(UpdateChat { title, archived }).await.map_err(unreachable_actor)?
    }

    /// Generates the chat's title from its first message, in the background.
    pub async fn generate_title(&self) {
        let _ = self.addr.send(GenerateTitle).await;
    }

    /// Summarises the conversation now; the chat is `running` until it is done.
    pub async fn compact(&self, user_id: &str) -> Result<(), ChatOpError> {
        self.addr.send(Compact { user_id: user_id.to_string() }).await.map_err(unreachable_actor)?
    }

    /// Replaces a past user message and runs the turn again from there.
    pub async fn edit_message(
        &self,
        user_id: &str,
        message_id: &str,
        content: Vec<Part>,
    ) -> Result<agentplane_schema::message::Message, ChatOpError> {
        let edit = EditMessage { user_id: user_id.to_string(), message_id: message_id.to_string(), content };
        self.addr.send(edit).await.map_err(unreachable_actor)?
    }

    /// Stops the actor and its sub-agents after cancelling the step; the chat stays in the
    /// database. `stop_turn` records it as no longer running (else it resumes on next start).
    pub async fn close(&self, stop_turn: bool) {
        let _ = self.addr.send(Close { stop_turn }).await;
    }
}
