//! The in-process [`EventBus`]: one broadcast channel per watched chat, and what each chat is
//! streaming now, for watchers who join mid-answer.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use agentplane_schema::event::{EventBody, SharedEvent, StreamEvent, ToolPhase};
use tokio::sync::broadcast;

use crate::ports::EventBus;

/// Events a slow watcher may fall behind by, unless set: it is then caught up from the store
/// (the WebSocket session resyncs) and loses nothing durable.
const DEFAULT_CAPACITY: usize = 1024;

pub struct LocalEventBus {
    lines: Mutex<HashMap<String, ChatLine>>,
    /// Of each chat's channel.
    capacity: usize,
}

impl Default for LocalEventBus {
    fn default() -> Self {
        Self::with_capacity(DEFAULT_CAPACITY)
    }
}

/// The most of a running tool call's output a chat keeps for new watchers: its end. (The relay
/// streams output without a limit; an answer is bounded by the model's output limit.)
const MAX_KEPT_OUTPUT: usize = 64 * 1024;

/// One chat on the bus; a chat nobody watches and that streams nothing has none.
#[derive(Default)]
struct ChatLine {
    /// While anyone watches.
    tx: Option<broadcast::Sender<Arc<SharedEvent>>>,
    /// The pieces streamed that nothing has closed yet, one entry per thing streamed (each kind
    /// of delta of the answer or of one tool call's arguments, each tool call's output): a few
    /// entries however long the answer.
    streaming: Vec<StreamEvent>,
    /// The last durable `seq` published (or named by a piece's stamp).
    published: i64,
}

impl ChatLine {
    fn watch(&mut self, capacity: usize) -> broadcast::Receiver<Arc<SharedEvent>> {
        self.tx.get_or_insert_with(|| broadcast::channel(capacity).0).subscribe()
    }

    fn is_idle(&self) -> bool {
        self.tx.is_none() && self.streaming.is_empty()
    }

    fn keep(&mut self, event: &StreamEvent) {
        match event.seq {
            Some(seq) => {
                self.published = seq;
                self.streaming.retain(|piece| !event.body.closes(&piece.body));
            }
            None => {
                self.published = self.published.max(event.follows_seq.unwrap_or_default());
                match &event.body {
                    // The answer is being produced again: its pieces so far are void.
                    EventBody::StreamReset => {
                        self.streaming.retain(|piece| !matches!(piece.body, EventBody::MessageDelta { .. }))
                    }
                    _ => {
                        let kept = match self.streaming.iter_mut().position(|kept| merge(&mut kept.body, &event.body)) {
                            Some(at) => &mut self.streaming[at],
                            None => {
                                self.streaming.push(StreamEvent::clone(event));
                                self.streaming.last_mut().expect("just pushed")
                            }
                        };
                        if let EventBody::ToolCall { output: Some(text), .. } = &mut kept.body {
                            keep_end(text, MAX_KEPT_OUTPUT);
                        }
                    }
                }
            }
        }
    }
}

/// Appends `next` to `kept` when both are pieces of the same thing (the same kind of delta of
/// the same call, or output of the same tool call).
fn merge(kept: &mut EventBody, next: &EventBody) -> bool {
    match (kept, next) {
        (
            EventBody::MessageDelta { kind, text, call_id, .. },
            EventBody::MessageDelta { kind: next_kind, text: more, call_id: next_call, .. },
        ) if kind == next_kind && call_id == next_call => {
            text.push_str(more);
            true
        }
        (
            EventBody::ToolCall { phase: ToolPhase::Output, call_id, output: Some(text), .. },
            EventBody::ToolCall { phase: ToolPhase::Output, call_id: next_call, output: Some(more), .. },
        ) if call_id == next_call => {
            text.push_str(more);
            true
        }
        _ => false,
    }
}

/// Cuts `text` to about its last `max` bytes (at a character boundary).
fn keep_end(text: &mut String, max: usize) {
    if text.len() > max {
        let mut cut = text.len() - max;
        while !text.is_char_boundary(cut) {
            cut += 1;
        }
        text.drain(..cut);
    }
}

impl LocalEventBus {
    pub fn new() -> Self {
        Self::default()
    }

    /// Each chat's channel holds `capacity` events (at least one) for its slowest watcher.
    pub fn with_capacity(capacity: usize) -> Self {
        LocalEventBus { lines: Mutex::default(), capacity: capacity.max(1) }
    }
}

impl EventBus for LocalEventBus {
    fn publish(&self, event: Arc<SharedEvent>) {
        let mut lines = self.lines.lock().unwrap_or_else(|p| p.into_inner());
        // A durable event matters only to a chat that has a line; a piece starts one. (Looked
        // up before inserting: the chat id is copied only for a new line, not for every delta.)
        if !lines.contains_key(&event.chat_id) {
            if event.seq.is_some() {
                return;
            }
            lines.insert(event.chat_id.clone(), ChatLine::default());
        }
        let Some(line) = lines.get_mut(&event.chat_id) else { return };
        line.keep(&event);
        // Sent by value: a failed send hands the event back.
        let event = match &line.tx {
            Some(tx) => match tx.send(event) {
                Ok(_) => return,
                Err(broadcast::error::SendError(event)) => {
                    // Nobody listens any more.
                    line.tx = None;
                    event
                }
            },
            None => event,
        };
        if line.is_idle() {
            // So idle chats cost nothing.
            lines.remove(&event.chat_id);
        }
    }

    fn subscribe(&self, chat_id: &str) -> broadcast::Receiver<Arc<SharedEvent>> {
        let mut lines = self.lines.lock().unwrap_or_else(|p| p.into_inner());
        lines.entry(chat_id.to_string()).or_default().watch(self.capacity)
    }

    fn subscribe_streaming(&self, chat_id: &str) -> (broadcast::Receiver<Arc<SharedEvent>>, Vec<StreamEvent>) {
        let mut lines = self.lines.lock().unwrap_or_else(|p| p.into_inner());
        let line = lines.entry(chat_id.to_string()).or_default();
        let receiver = line.watch(self.capacity);
        let streaming = line
            .streaming
            .iter()
            .map(|piece| StreamEvent::ephemeral(line.published, chat_id, piece.body.clone()))
            .collect();
        (receiver, streaming)
    }
}

#[cfg(test)]
mod tests {
    use agentplane_schema::api::ChatStatus;
    use agentplane_schema::event::DeltaKind;
    use agentplane_schema::message::{Message, Part, Role};

    use super::*;

    fn delta(after: i64, text: &str) -> StreamEvent {
        let body = EventBody::MessageDelta { kind: DeltaKind::Text, text: text.into(), call_id: None, name: None };
        StreamEvent::ephemeral(after, "a", body)
    }

    fn output(after: i64, call: &str, text: &str) -> StreamEvent {
        let body = EventBody::ToolCall {
            phase: ToolPhase::Output,
            call_id: call.into(),
            name: "execute".into(),
            args: None,
            output: Some(text.into()),
            is_error: None,
            workspace_id: None,
        };
        StreamEvent::ephemeral(after, "a", body)
    }

    fn answer(seq: i64) -> StreamEvent {
        let message = Message {
            id: "m".into(),
            chat_id: "a".into(),
            position: 2,
            role: Role::Assistant,
            parts: vec![Part::text("hello world")].into(),
            interrupted: false,
            user_id: None,
            model_id: None,
            created_at: chrono::Utc::now(),
        };
        StreamEvent::durable(seq, "a", EventBody::Message { message })
    }

    fn texts(events: &[StreamEvent]) -> Vec<(Option<i64>, String)> {
        events
            .iter()
            .map(|e| match &e.body {
                EventBody::MessageDelta { text, .. } => (e.follows_seq, text.clone()),
                EventBody::ToolCall { output: Some(text), .. } => (e.follows_seq, format!("output: {text}")),
                other => panic!("not a piece: {}", other.kind()),
            })
            .collect()
    }

    #[tokio::test]
    async fn delivers_to_subscribers_of_that_chat_only() {
        let bus = LocalEventBus::new();
        let mut a = bus.subscribe("a");
        let mut b = bus.subscribe("b");
        bus.publish(SharedEvent::new(StreamEvent::durable(1, "a", EventBody::StreamReset)));
        assert_eq!(a.recv().await.expect("event").seq, Some(1));
        assert!(b.try_recv().is_err());
        drop(a);
        bus.publish(SharedEvent::new(StreamEvent::durable(2, "a", EventBody::StreamReset)));
        assert!(bus.lines.lock().expect("lock").get("a").is_none());
    }

    #[test]
    fn a_new_watcher_gets_what_is_streaming_merged_and_stamped_after_the_last_durable_event() {
        let bus = LocalEventBus::new();
        bus.publish(SharedEvent::new(delta(4, "hello")));
        bus.publish(SharedEvent::new(delta(4, " world")));
        bus.publish(SharedEvent::new(output(4, "c1", "line 1\n")));
        bus.publish(SharedEvent::new(output(4, "c1", "line 2\n")));
        bus.publish(SharedEvent::new(StreamEvent::durable(5, "a", EventBody::QueueUpdate { queued_messages: vec![] })));
        let (_live, streaming) = bus.subscribe_streaming("a");
        assert_eq!(
            texts(&streaming),
            [(Some(5), "hello world".to_string()), (Some(5), "output: line 1\nline 2\n".to_string())]
        );
    }

    #[test]
    fn interleaved_pieces_merge_by_what_they_belong_to_and_output_keeps_its_end() {
        let bus = LocalEventBus::new();
        for _ in 0..100 {
            bus.publish(SharedEvent::new(output(1, "c1", "1")));
            bus.publish(SharedEvent::new(output(1, "c2", "2")));
        }
        bus.publish(SharedEvent::new(output(1, "c1", &"x".repeat(MAX_KEPT_OUTPUT))));
        let streaming = texts(&bus.subscribe_streaming("a").1);
        assert_eq!(streaming.len(), 2, "one entry per call");
        assert_eq!(streaming[0].1, format!("output: {}", "x".repeat(MAX_KEPT_OUTPUT)), "the end of c1's output");
        assert_eq!(streaming[1].1, format!("output: {}", "2".repeat(100)));
    }

    #[test]
    fn what_closes_a_stream_clears_it_and_an_idle_chat_leaves_no_line() {
        let bus = LocalEventBus::new();
        bus.publish(SharedEvent::new(delta(1, "draft")));
        bus.publish(SharedEvent::new(StreamEvent::ephemeral(1, "a", EventBody::StreamReset)));
        bus.publish(SharedEvent::new(output(1, "c1", "out")));
        bus.publish(SharedEvent::new(delta(2, "hello world")));
        assert_eq!(
            texts(&bus.subscribe_streaming("a").1),
            [(Some(2), "output: out".to_string()), (Some(2), "hello world".to_string())],
            "a reset voids the answer's pieces, not a tool's output"
        );
        bus.publish(SharedEvent::new(answer(3)));
        assert_eq!(texts(&bus.subscribe_streaming("a").1), [(Some(3), "output: out".to_string())]);
        bus.publish(SharedEvent::new(StreamEvent::durable(
            4,
            "a",
            EventBody::Status { status: ChatStatus::Idle, error: None },
        )));
        assert!(bus.lines.lock().expect("lock").get("a").is_none(), "nobody watches, nothing streams");
        assert!(bus.subscribe_streaming("a").1.is_empty(), "the turn ended");
    }
}
