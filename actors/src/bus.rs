//! The in-process [`EventBus`]: one broadcast channel per watched chat.

use std::collections::HashMap;
use std::sync::Mutex;

use agentplane_schema::event::StreamEvent;
use tokio::sync::broadcast;

use crate::ports::EventBus;

/// Events a slow watcher may fall behind by before it is told to resync (it then reconnects
/// with `after_seq` and loses nothing durable).
const CHANNEL_CAPACITY: usize = 1024;

#[derive(Default)]
pub struct LocalEventBus {
    channels: Mutex<HashMap<String, broadcast::Sender<StreamEvent>>>,
}

impl LocalEventBus {
    pub fn new() -> Self {
        Self::default()
    }
}

impl EventBus for LocalEventBus {
    fn publish(&self, event: StreamEvent) {
        let mut channels = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(tx) = channels.get(&event.chat_id)
            && tx.send(event.clone()).is_err()
        {
            // Nobody listens any more: forget the channel so idle chats cost nothing.
            channels.remove(&event.chat_id);
        }
    }

    fn subscribe(&self, chat_id: &str) -> broadcast::Receiver<StreamEvent> {
        let mut channels = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        channels.entry(chat_id.to_string()).or_insert_with(|| broadcast::channel(CHANNEL_CAPACITY).0).subscribe()
    }
}

#[cfg(test)]
mod tests {
    use agentplane_schema::event::EventBody;

    use super::*;

    #[tokio::test]
    async fn delivers_to_subscribers_of_that_chat_only() {
        let bus = LocalEventBus::new();
        let mut a = bus.subscribe("a");
        let mut b = bus.subscribe("b");
        bus.publish(StreamEvent::durable(1, "a", EventBody::StreamReset));
        assert_eq!(a.recv().await.expect("event").seq, Some(1));
        assert!(b.try_recv().is_err());
        drop(a);
        bus.publish(StreamEvent::durable(2, "a", EventBody::StreamReset));
        assert!(bus.channels.lock().expect("lock").get("a").is_none());
    }
}
