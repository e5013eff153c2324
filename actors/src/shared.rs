//! State a chat actor shares with the step running for it: the event sequence, message
//! positions and the workspace binding.
//!
//! Every durable change goes through [`ChatShared::commit`], which assigns `seq`s, writes the
//! change and its events in one transaction, and only then publishes — all under one lock, so
//! watchers see durable events in `seq` order and never one that is not stored.
//! [`ChatShared::commit_ahead`] takes its place in that order the same way but lets the commit
//! land in a task of its own; [`ChatShared::settle`] waits for it.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};

use agentplane_schema::api::{ChatError, ChatStatus};
use agentplane_schema::event::{EventBody, SharedEvent, StreamEvent};
use agentplane_schema::message::Message;
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

use crate::ports::{Batch, EventBus, ImageData, Op, PromptMemo, PromptMessage, Store, StoreError};
use crate::prompt::PromptList;

/// A change of the chat's status and the durable event that announces it, committed together.
pub fn status_change(status: ChatStatus, error: Option<ChatError>) -> (Op, EventBody) {
    (Op::SetStatus { status, error: error.clone() }, EventBody::Status { status, error })
}

pub struct ChatShared {
    pub chat_id: String,
    pub owner_id: String,
    store: Arc<dyn Store>,
    bus: Arc<dyn EventBus>,
    /// The commit lock, holding the last durable `seq`.
    last_seq: Arc<Mutex<i64>>,
    /// The results message a [`ChatShared::commit_ahead`] could not store, until the actor drops
    /// it from its history ([`ChatShared::take_failed_ahead`]); with the error that ends the turn.
    failed_ahead: std::sync::Mutex<Option<(String, String)>>,
    /// The last durable `seq` handed to the bus. Ephemeral events are stamped with it under this
    /// lock, so each one comes after the durable event it names and before the next one.
    published_seq: std::sync::Mutex<i64>,
    last_position: AtomicI64,
    /// Whether the actor holds queued messages, which go on with the turn once the step ends.
    queue_waiting: AtomicBool,
    workspace_id: std::sync::Mutex<Option<String>>,
    /// Serialises `create_workspace` calls of one chat.
    pub workspace_lock: Mutex<()>,
    /// Tokens of the last model call (prompt + answer) and the position of its answer: what the
    /// provider reported, for deciding when to compact.
    reported_usage: std::sync::Mutex<Option<(u64, i64)>>,
    /// Image bytes the prompts of the current turn show, read from the store once per turn (an
    /// uploaded file never changes); dropped when the turn ends so an idle chat holds none.
    images: std::sync::Mutex<HashMap<String, ImageData>>,
    /// What the model client wrote of this chat's prompt for its last request.
    prompt_memo: PromptMemo,
    /// The prompt list of the last step, for the next one to add to.
    prompt_list: std::sync::Mutex<PromptList>,
}

impl ChatShared {
    pub fn new(
        chat_id: String,
        owner_id: String,
        store: Arc<dyn Store>,
        bus: Arc<dyn EventBus>,
        last_seq: i64,
        last_position: i64,
        workspace_id: Option<String>,
    ) -> Self {
        ChatShared {
            chat_id,
            owner_id,
            store,
            bus,
            last_seq: Arc::new(Mutex::new(last_seq)),
            failed_ahead: std::sync::Mutex::new(None),
            published_seq: std::sync::Mutex::new(last_seq),
            last_position: AtomicI64::new(last_position),
            queue_waiting: AtomicBool::new(false),
            workspace_id: std::sync::Mutex::new(workspace_id),
            workspace_lock: Mutex::new(()),
            reported_usage: std::sync::Mutex::new(None),
            images: std::sync::Mutex::new(HashMap::new()),
            prompt_memo: PromptMemo::default(),
            prompt_list: Default::default(),
        }
    }

    /// The memo every model request of this chat's conversation carries.
    pub fn prompt_memo(&self) -> PromptMemo {
        self.prompt_memo.clone()
    }

    /// Lets the text of the last prompt go (an idle chat need not hold it), and its list.
    pub fn forget_prompt(&self) {
        self.prompt_memo.clear();
        *self.prompt_list.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = PromptList::default();
    }

    /// The prompt for `history` and the file ids of the images it shows, added to the last
    /// step's list ([`PromptList`]).
    pub fn prompt(&self, history: &[Message]) -> (Arc<Vec<PromptMessage>>, Vec<String>) {
        self.prompt_list.lock().unwrap_or_else(std::sync::PoisonError::into_inner).update(history)
    }

    /// The bytes of the images `ids` names; those not read yet in this turn come from the store.
    /// Ids that do not exist are left out.
    pub async fn images(&self, ids: &[String]) -> Result<HashMap<String, ImageData>, StoreError> {
        let missing: Vec<String> = {
            let cached = self.images.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            ids.iter().filter(|id| !cached.contains_key(*id)).cloned().collect()
        };
        let loaded = if missing.is_empty() { HashMap::new() } else { self.store.load_images(&missing).await? };
        let mut cached = self.images.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        cached.extend(loaded);
        Ok(ids.iter().filter_map(|id| Some((id.clone(), cached.get(id)?.clone()))).collect())
    }

    /// Drops the image bytes read in the turn that ended.
    pub fn forget_images(&self) {
        self.images.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clear();
    }

    /// Commits `ops` with the durable `events`, then publishes the events.
    pub async fn commit(&self, ops: Vec<Op>, events: Vec<EventBody>) -> Result<(), StoreError> {
        let mut last_seq = self.last_seq.lock().await;
        self.commit_locked(&mut last_seq, ops, events).await
    }

    /// Commits the step's tool results (`ops` with the durable `events`, storing the results
    /// message `message_id`) in a task of its own, and returns once the commit has its place in
    /// the chat's order: the next model request goes out while it lands. Every later commit
    /// waits for it (the commit lock), and the next step waits for it ([`ChatShared::settle`])
    /// before it publishes anything. If it fails, the results message stays unstored and
    /// [`ChatShared::take_failed_ahead`] names it. Must run on the chat's thread (a local task).
    pub async fn commit_ahead(self: &Arc<Self>, message_id: String, ops: Vec<Op>, events: Vec<EventBody>) {
        let mut last_seq = self.last_seq.clone().lock_owned().await;
        let shared = self.clone();
        tokio::task::spawn_local(async move {
            if let Err(error) = shared.commit_locked(&mut last_seq, ops, events).await {
                tracing::warn!(chat = %shared.chat_id, %error, "the tool results could not be stored");
                // Set before the lock is released: whoever takes it next sees the failure.
                *shared.failed_ahead.lock().unwrap_or_else(std::sync::PoisonError::into_inner) =
                    Some((message_id, format!("the tool results could not be stored: {error}")));
            }
        });
    }

    /// Waits until the commits before this call have landed; the error that ends the turn if the
    /// last [`ChatShared::commit_ahead`] failed and the actor has not dropped its message yet.
    pub async fn settle(&self) -> Option<String> {
        drop(self.last_seq.lock().await);
        self.failed_ahead.lock().unwrap_or_else(std::sync::PoisonError::into_inner).as_ref().map(|(_, why)| why.clone())
    }

    /// The id of the results message a failed [`ChatShared::commit_ahead`] did not store and the
    /// error that ends the turn, once: the actor drops the message from its history.
    pub fn take_failed_ahead(&self) -> Option<(String, String)> {
        self.failed_ahead.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take()
    }

    /// Commits a change of the chat's status (without an error) and its event, alone.
    pub async fn commit_status(&self, status: ChatStatus) -> Result<(), StoreError> {
        let (op, event) = status_change(status, None);
        self.commit(vec![op], vec![event]).await
    }

    /// Commits a step's answer that calls no tool. When nothing would go on with the turn (no
    /// queued message, no interrupt), the same transaction ends it (`idle`), which saves the
    /// turn's last commit; returns whether it did. Decided under the commit lock, so a message
    /// queued or an interrupt stored before it is seen, and one after it comes after the `idle`.
    pub async fn commit_answer(
        &self,
        mut ops: Vec<Op>,
        mut events: Vec<EventBody>,
        cancel: &CancellationToken,
    ) -> Result<bool, StoreError> {
        let mut last_seq = self.last_seq.lock().await;
        let ends = !self.queue_waiting.load(Ordering::SeqCst) && !cancel.is_cancelled();
        if ends {
            let (op, event) = status_change(ChatStatus::Idle, None);
            ops.push(op);
            events.push(event);
        }
        self.commit_locked(&mut last_seq, ops, events).await?;
        Ok(ends)
    }

    /// Commits under the commit lock, whose guard holds `last_seq`.
    async fn commit_locked(&self, last_seq: &mut i64, ops: Vec<Op>, events: Vec<EventBody>) -> Result<(), StoreError> {
        let mut seq = *last_seq;
        let events: Vec<Arc<SharedEvent>> = events
            .into_iter()
            .map(|body| {
                debug_assert!(body.is_durable(), "{} is not durable", body.kind());
                seq += 1;
                SharedEvent::new(StreamEvent::durable(seq, self.chat_id.clone(), body))
            })
            .collect();
        self.store.commit(&self.chat_id, Batch { ops, events: events.clone() }).await?;
        *last_seq = seq;
        let mut published = self.published_seq.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        for event in events {
            self.bus.publish(event);
        }
        *published = seq;
        Ok(())
    }

    /// Publishes an ephemeral event (a delta, an output piece, a stream reset).
    pub fn publish(&self, body: EventBody) {
        let published = self.published_seq.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        self.bus.publish(SharedEvent::new(StreamEvent::ephemeral(*published, self.chat_id.clone(), body)));
    }

    /// Tells the running step whether queued messages wait for it to end.
    pub fn set_queue_waiting(&self, waiting: bool) {
        self.queue_waiting.store(waiting, Ordering::SeqCst);
    }

    /// Whether queued messages wait for the running step to end.
    pub fn queue_waiting(&self) -> bool {
        self.queue_waiting.load(Ordering::SeqCst)
    }

    /// The next message position.
    pub fn next_position(&self) -> i64 {
        self.last_position.fetch_add(1, Ordering::SeqCst) + 1
    }

    pub fn record_usage(&self, tokens: u64, at_position: i64) {
        *self.reported_usage.lock().unwrap_or_else(|p| p.into_inner()) = (tokens > 0).then_some((tokens, at_position));
    }

    pub fn reported_usage(&self) -> Option<(u64, i64)> {
        *self.reported_usage.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn forget_usage(&self) {
        *self.reported_usage.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    pub fn workspace_id(&self) -> Option<String> {
        self.workspace_id.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn set_workspace_id(&self, id: Option<String>) {
        *self.workspace_id.lock().unwrap_or_else(|p| p.into_inner()) = id;
    }
}
