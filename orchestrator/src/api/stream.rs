//! `GET /api/v1/chats/{id}/stream?after_seq=N`: a chat's events over WebSocket.
//!
//! The session subscribes to live events first, then sends the snapshot and replays stored
//! durable events after `after_seq`; live durable events at or below the last `seq` sent are
//! dropped, and a jump in `seq` (a lagging session) is filled from the database. So a client
//! that reconnects with the last `seq` it saw gets no gap and no duplicate. After the snapshot
//! come the pieces of what the chat is streaming now (the answer so far), so a watcher who
//! joins mid-answer sees all of it. Ephemeral events queued behind the snapshot are ordered by
//! [`LiveOrder`], so none of an answer the snapshot already holds as a message reaches the
//! client after it.

use std::sync::Arc;

use actix_web::{HttpRequest, HttpResponse, web};
use actix_ws::AggregatedMessage;
use agentplane_schema::api::Chat;
use agentplane_schema::event::{ClientFrame, EventBody, SharedEvent, StreamEvent};
use futures::StreamExt;
use serde::Deserialize;
use tokio::sync::broadcast::error::RecvError;

use super::chats::{check_content, visible_chat};
use super::error::ApiError;
use crate::auth::AuthUser;
use crate::state::AppState;

/// Messages the snapshot carries; older ones are paged over REST.
const SNAPSHOT_MESSAGES: u64 = 100;
const MAX_FRAME_BYTES: usize = 4 * 1024 * 1024;

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.service(web::resource("/chats/{id}/stream").get(stream));
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StreamQuery {
    after_seq: Option<i64>,
}

async fn stream(
    req: HttpRequest,
    body: web::Payload,
    state: web::Data<AppState>,
    user: AuthUser,
    path: web::Path<String>,
    q: web::Query<StreamQuery>,
) -> Result<HttpResponse, actix_web::Error> {
    let chat = visible_chat(&state, &user, &path).await?;
    let (response, session, messages) = actix_ws::handle(&req, body)?;
    let messages = messages.max_frame_size(MAX_FRAME_BYTES).aggregate_continuations();
    actix_web::rt::spawn(run_session(state.into_inner(), user, chat, q.after_seq, session, messages));
    Ok(response)
}

/// Sends a frame of this connection's own (its snapshot, a reset).
async fn send_event(session: &mut actix_ws::Session, event: &StreamEvent) -> Result<(), ()> {
    let text = serde_json::to_string(event).map_err(|_| ())?;
    session.text(text).await.map_err(|_| ())
}

/// Sends `events` in order, leaving the vector empty for reuse. Each event's JSON is written
/// once for all the sessions that send it and the store.
async fn send_all(session: &mut actix_ws::Session, events: &mut Vec<Arc<SharedEvent>>) -> Result<(), ()> {
    for event in events.drain(..) {
        let text = event.json().map_err(|_| ())?.to_string();
        session.text(text).await.map_err(|_| ())?;
    }
    Ok(())
}

/// Sends the stored durable events after the client's last `seq`, through `order` (which
/// advances it).
async fn replay(
    state: &AppState,
    chat_id: &str,
    order: &mut LiveOrder,
    session: &mut actix_ws::Session,
) -> Result<(), ()> {
    let stored = state.store.events_after(chat_id, order.last).await.map_err(|_| ())?;
    admit_and_send(order, stored.into_iter().map(SharedEvent::new), session).await
}

/// Sends what `order` admits of `events`: stored durable events of a replay, or the pieces the
/// chat is streaming now (the answer so far, for a client that joins mid-answer), taken as if
/// published right after subscribing.
async fn admit_and_send(
    order: &mut LiveOrder,
    events: impl IntoIterator<Item = Arc<SharedEvent>>,
    session: &mut actix_ws::Session,
) -> Result<(), ()> {
    let mut out = Vec::new();
    for event in events {
        order.admit(event, &mut out).map_err(|Gap| ())?;
    }
    send_all(session, &mut out).await
}

/// The session lost events (it lagged, or durable ones were skipped): the client drops its
/// partial answer, gets the stored durable events it missed, then what is streaming now, from
/// a fresh subscription taken before the replay so nothing falls between.
async fn resync(
    state: &AppState,
    chat_id: &str,
    live: &mut tokio::sync::broadcast::Receiver<Arc<SharedEvent>>,
    order: &mut LiveOrder,
    session: &mut actix_ws::Session,
) -> Result<(), ()> {
    order.held.clear();
    send_event(session, &StreamEvent::local(chat_id, EventBody::StreamReset)).await?;
    let (fresh, streaming) = state.bus.subscribe_streaming(chat_id);
    *live = fresh;
    replay(state, chat_id, order, session).await?;
    admit_and_send(order, streaming.into_iter().map(SharedEvent::new), session).await
}

/// Durable events were skipped: the session fills the gap from the database.
#[derive(Debug, PartialEq)]
struct Gap;

/// Orders live events after what the client already holds.
///
/// Live events published before the snapshot was read can still be queued behind it. A durable
/// one the client holds is dropped by its `seq`. An ephemeral one stamped with a `follows_seq`
/// below the client's last `seq` is held: the durable events after its stamp were published
/// after it, so they arrive behind it. If one of them closes what the piece belongs to (the
/// answer was committed, the tool call finished), the piece is stale and dropped; once the
/// client's last durable event has come by, the pieces still held are sent.
struct LiveOrder {
    /// The last durable `seq` the client has.
    last: i64,
    held: Vec<Arc<SharedEvent>>,
}

impl LiveOrder {
    fn new(last: i64) -> Self {
        LiveOrder { last, held: Vec::new() }
    }

    /// Takes the next live event; what is to be sent now goes to `out`, in order.
    fn admit(&mut self, event: Arc<SharedEvent>, out: &mut Vec<Arc<SharedEvent>>) -> Result<(), Gap> {
        let Some(seq) = event.seq else {
            // Behind what is held, a piece keeps its place.
            if event.follows_seq.is_some_and(|after| after < self.last) || !self.held.is_empty() {
                self.held.push(event);
            } else {
                out.push(event);
            }
            return Ok(());
        };
        if seq > self.last + 1 {
            return Err(Gap);
        }
        self.held.retain(|piece| !event.body.closes(&piece.body));
        if seq >= self.last {
            out.append(&mut self.held);
        }
        if seq == self.last + 1 {
            self.last = seq;
            out.push(event);
        }
        Ok(())
    }
}

async fn run_session(
    state: std::sync::Arc<AppState>,
    user: AuthUser,
    chat: Chat,
    after_seq: Option<i64>,
    mut session: actix_ws::Session,
    mut incoming: actix_ws::AggregatedMessageStream,
) {
    let chat_id = chat.id.clone();
    let (mut live, streaming) = state.bus.subscribe_streaming(&chat_id);
    let snapshot = match state.store.snapshot(&chat_id, SNAPSHOT_MESSAGES).await {
        Ok(Some(s)) => s,
        _ => {
            let _ = session.close(None).await;
            return;
        }
    };
    // A client that comes back with the last seq it saw gets the stored events after it.
    let mut order = LiveOrder::new(after_seq.filter(|a| *a < snapshot.last_seq).unwrap_or(snapshot.last_seq));
    let behind = order.last < snapshot.last_seq;
    let frame = StreamEvent::local(
        chat_id.clone(),
        EventBody::Snapshot {
            chat: Box::new(snapshot.chat),
            messages: snapshot.messages,
            queued_messages: snapshot.queued,
            running_subagents: snapshot.running_subagents,
            last_seq: snapshot.last_seq,
        },
    );
    if send_event(&mut session, &frame).await.is_err() {
        return;
    }
    if behind && replay(&state, &chat_id, &mut order, &mut session).await.is_err() {
        return;
    }
    if admit_and_send(&mut order, streaming.into_iter().map(SharedEvent::new), &mut session).await.is_err() {
        return;
    }
    let mut out = Vec::new();
    loop {
        tokio::select! {
            event = live.recv() => {
                let ok = match event {
                    Ok(event) => match order.admit(event, &mut out) {
                        Ok(()) => send_all(&mut session, &mut out).await,
                        Err(Gap) => resync(&state, &chat_id, &mut live, &mut order, &mut session).await,
                    },
                    Err(RecvError::Lagged(_)) => resync(&state, &chat_id, &mut live, &mut order, &mut session).await,
                    Err(RecvError::Closed) => break,
                };
                if ok.is_err() {
                    return;
                }
            },
            frame = incoming.next() => match frame {
                Some(Ok(AggregatedMessage::Text(text))) => {
                    if let Err(e) = handle_frame(&state, &user, &chat, &text).await {
                        let body = serde_json::json!({"type": "error", "chat_id": chat_id, "error": {
                            "kind": "invalid_request", "message": e.message }});
                        if session.text(body.to_string()).await.is_err() {
                            return;
                        }
                    }
                }
                Some(Ok(AggregatedMessage::Ping(bytes))) => {
                    if session.pong(&bytes).await.is_err() {
                        return;
                    }
                }
                Some(Ok(AggregatedMessage::Close(_))) | None | Some(Err(_)) => break,
                Some(Ok(_)) => {}
            },
        }
    }
    let _ = session.close(None).await;
}

/// A frame from the client; the chat is the one the socket was opened on (its model never
/// changes, so its images are checked against that model without reading the row again).
async fn handle_frame(state: &AppState, user: &AuthUser, chat: &Chat, text: &str) -> Result<(), ApiError> {
    let frame: ClientFrame =
        serde_json::from_str(text).map_err(|e| ApiError::invalid(format!("unreadable frame: {e}")))?;
    match frame {
        ClientFrame::Send { content, busy_behavior } => {
            check_content(state, user, chat.model_id.as_deref(), &content).await?;
            state.directory.chat(&chat.id).send(user.id(), content, busy_behavior).await?;
        }
        ClientFrame::Interrupt => state.directory.chat(&chat.id).interrupt().await?,
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use agentplane_schema::event::{DeltaKind, ToolPhase};
    use agentplane_schema::message::{Message, Part, Role};

    use super::*;

    fn delta(after: i64, text: &str) -> StreamEvent {
        let body = EventBody::MessageDelta { kind: DeltaKind::Text, text: text.into(), call_id: None, name: None };
        StreamEvent::ephemeral(after, "c", body)
    }

    fn output(after: i64, call: &str) -> StreamEvent {
        StreamEvent::ephemeral(after, "c", tool_call(ToolPhase::Output, call))
    }

    fn tool_call(phase: ToolPhase, call: &str) -> EventBody {
        EventBody::ToolCall {
            phase,
            call_id: call.into(),
            name: "shell".into(),
            args: None,
            output: Some("piece".into()),
            is_error: None,
            workspace_id: None,
        }
    }

    fn message(seq: i64, role: Role) -> StreamEvent {
        let message = Message {
            id: format!("m{seq}"),
            chat_id: "c".into(),
            position: seq,
            role,
            parts: vec![Part::text("answer")].into(),
            interrupted: false,
            user_id: None,
            model_id: None,
            created_at: chrono::Utc::now(),
        };
        StreamEvent::durable(seq, "c", EventBody::Message { message })
    }

    fn queue_update(seq: i64) -> StreamEvent {
        StreamEvent::durable(seq, "c", EventBody::QueueUpdate { queued_messages: vec![] })
    }

    /// What `order` sends now for `event`.
    fn sent(order: &mut LiveOrder, event: StreamEvent) -> Vec<StreamEvent> {
        let mut out = Vec::new();
        order.admit(SharedEvent::new(event), &mut out).expect("no gap");
        out.iter().map(|e| StreamEvent::clone(e)).collect()
    }

    #[test]
    fn pieces_of_an_answer_the_snapshot_holds_as_a_message_are_dropped() {
        // The snapshot was read after the answer (seq 5) was stored; its deltas and the
        // message event were still queued for the session.
        let mut order = LiveOrder::new(5);
        assert!(sent(&mut order, delta(4, "ans")).is_empty());
        assert!(sent(&mut order, delta(4, "wer")).is_empty());
        assert!(sent(&mut order, message(5, Role::Assistant)).is_empty(), "the snapshot has it");
        let next = delta(5, "next answer");
        assert_eq!(sent(&mut order, next.clone()), vec![next], "pieces after the snapshot go straight out");
    }

    #[test]
    fn pieces_of_an_answer_still_streaming_are_sent_once_the_snapshot_is_caught_up() {
        // A queue update (seq 5) came in while the answer streamed; it does not end the answer.
        let mut order = LiveOrder::new(5);
        let (a, b) = (delta(4, "a"), delta(4, "b"));
        assert!(sent(&mut order, a.clone()).is_empty());
        assert!(sent(&mut order, b.clone()).is_empty());
        assert_eq!(sent(&mut order, queue_update(5)), vec![a, b], "held in order, then sent; seq 5 not again");
        let new = queue_update(6);
        assert_eq!(sent(&mut order, new.clone()), vec![new]);
    }

    #[test]
    fn a_users_message_does_not_close_the_answer_but_the_answer_commit_does() {
        let mut order = LiveOrder::new(6);
        assert!(sent(&mut order, delta(4, "a")).is_empty());
        assert!(sent(&mut order, message(5, Role::User)).is_empty(), "held across a user message");
        assert!(sent(&mut order, message(6, Role::Assistant)).is_empty(), "then closed by the answer");
    }

    #[test]
    fn output_of_a_finished_tool_call_is_dropped_and_of_a_running_one_kept() {
        let mut order = LiveOrder::new(4);
        let running = output(3, "c2");
        assert!(sent(&mut order, output(3, "c1")).is_empty());
        assert!(sent(&mut order, running.clone()).is_empty());
        let finished = StreamEvent::durable(4, "c", tool_call(ToolPhase::Finished, "c1"));
        assert_eq!(sent(&mut order, finished), vec![running]);
    }

    #[test]
    fn new_durable_events_are_sent_once_and_a_skipped_seq_is_a_gap() {
        let mut order = LiveOrder::new(3);
        assert!(sent(&mut order, queue_update(2)).is_empty());
        let fourth = queue_update(4);
        assert_eq!(sent(&mut order, fourth.clone()), vec![fourth]);
        assert!(sent(&mut order, queue_update(4)).is_empty());
        assert_eq!(order.admit(SharedEvent::new(queue_update(6)), &mut Vec::new()), Err(Gap));
    }

    #[test]
    fn a_piece_behind_held_ones_keeps_its_place() {
        let mut order = LiveOrder::new(5);
        let (held, unstamped) = (delta(4, "a"), StreamEvent::local("c", EventBody::StreamReset));
        assert!(sent(&mut order, held.clone()).is_empty());
        assert!(sent(&mut order, unstamped.clone()).is_empty());
        assert_eq!(sent(&mut order, queue_update(5)), vec![held, unstamped]);
    }
}
