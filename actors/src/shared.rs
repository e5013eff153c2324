//! State a chat actor shares with the step running for it: the event sequence, message
//! positions and the workspace binding.
//!
//! Every durable change goes through [`ChatShared::commit`], which assigns `seq`s, writes the
//! change and its events in one transaction, and only then publishes — all under one lock, so
//! watchers see durable events in `seq` order and never one that is not stored.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use agentplane_schema::event::{EventBody, StreamEvent};
use tokio::sync::Mutex;

use crate::ports::{Batch, EventBus, Op, Store, StoreError};

pub struct ChatShared {
    pub chat_id: String,
    pub owner_id: String,
    store: Arc<dyn Store>,
    bus: Arc<dyn EventBus>,
    last_seq: Mutex<i64>,
    last_position: AtomicI64,
    workspace_id: std::sync::Mutex<Option<String>>,
    /// Serialises `create_workspace` calls of one chat.
    pub workspace_lock: Mutex<()>,
    /// Tokens of the last model call (prompt + answer) and the position of its answer: what the
    /// provider reported, for deciding when to compact.
    reported_usage: std::sync::Mutex<Option<(u64, i64)>>,
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
            last_seq: Mutex::new(last_seq),
            last_position: AtomicI64::new(last_position),
            workspace_id: std::sync::Mutex::new(workspace_id),
            workspace_lock: Mutex::new(()),
            reported_usage: std::sync::Mutex::new(None),
        }
    }

    /// Commits `ops` with the durable `events`, then publishes the events.
    pub async fn commit(&self, ops: Vec<Op>, events: Vec<EventBody>) -> Result<(), StoreError> {
        let mut last_seq = self.last_seq.lock().await;
        let mut seq = *last_seq;
        let events: Vec<StreamEvent> = events
            .into_iter()
            .map(|body| {
                debug_assert!(body.is_durable(), "{} is not durable", body.kind());
                seq += 1;
                StreamEvent { seq: Some(seq), chat_id: self.chat_id.clone(), body }
            })
            .collect();
        self.store.commit(&self.chat_id, Batch { ops, events: events.clone() }).await?;
        *last_seq = seq;
        for event in events {
            self.bus.publish(event);
        }
        Ok(())
    }

    /// Publishes an ephemeral event (a delta, an output piece, a stream reset).
    pub fn publish(&self, body: EventBody) {
        self.bus.publish(StreamEvent { seq: None, chat_id: self.chat_id.clone(), body });
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
