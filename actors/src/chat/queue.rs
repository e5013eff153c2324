//! A chat's queued messages: sent while the agent works, delivered when its step ends.

use std::sync::Arc;

use agentplane_schema::message::QueuedMessage;

use crate::shared::ChatShared;

/// The queue in memory, in order. The running step reads whether it is empty (through
/// [`ChatShared::set_queue_waiting`]) to decide whether its answer may end the turn, so every
/// change goes through here and that flag follows the queue.
pub(super) struct Queue {
    items: Vec<QueuedMessage>,
    /// The position of the last message queued; positions only grow.
    last_position: i64,
    shared: Arc<ChatShared>,
}

impl Queue {
    /// The queue as loaded: `items` in order, numbered from 1.
    pub(super) fn new(items: Vec<QueuedMessage>, shared: Arc<ChatShared>) -> Self {
        let queue = Queue { last_position: items.len() as i64, items, shared };
        queue.changed();
        queue
    }

    pub(super) fn items(&self) -> &[QueuedMessage] {
        &self.items
    }

    pub(super) fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Empties the queue, for delivery.
    pub(super) fn take(&mut self) -> Vec<QueuedMessage> {
        let items = std::mem::take(&mut self.items);
        self.changed();
        items
    }

    /// Puts back what [`Queue::take`] returned, when its delivery could not be stored.
    pub(super) fn restore(&mut self, items: Vec<QueuedMessage>) {
        self.items = items;
        self.changed();
    }

    /// Queues `message` last; returns its position.
    pub(super) fn push(&mut self, message: QueuedMessage) -> i64 {
        self.last_position += 1;
        self.items.push(message);
        self.changed();
        self.last_position
    }

    pub(super) fn position(&self, id: &str) -> Option<usize> {
        self.items.iter().position(|q| q.id == id)
    }

    /// The message at `index`, to change its content.
    pub(super) fn get_mut(&mut self, index: usize) -> &mut QueuedMessage {
        &mut self.items[index]
    }

    pub(super) fn remove_at(&mut self, index: usize) -> QueuedMessage {
        let removed = self.items.remove(index);
        self.changed();
        removed
    }

    /// Removes the message `id`, if queued.
    pub(super) fn remove(&mut self, id: &str) {
        self.items.retain(|q| q.id != id);
        self.changed();
    }

    /// Puts `message` back at `index` (or last, if the queue is shorter now).
    pub(super) fn insert(&mut self, index: usize, message: QueuedMessage) {
        self.items.insert(index.min(self.items.len()), message);
        self.changed();
    }

    fn changed(&self) {
        self.shared.set_queue_waiting(!self.items.is_empty());
    }
}
