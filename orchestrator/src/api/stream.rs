//! `GET /api/v1/chats/{id}/stream?after_seq=N`: a chat's events over WebSocket.
//!
//! The session subscribes to live events first, then sends the snapshot and replays stored
//! durable events after `after_seq`; live durable events at or below the last `seq` sent are
//! dropped, and a jump in `seq` (a lagging session) is filled from the database. So a client
//! that reconnects with the last `seq` it saw gets no gap and no duplicate.

use actix_web::{HttpRequest, HttpResponse, web};
use actix_ws::AggregatedMessage;
use agentplane_schema::api::Chat;
use agentplane_schema::event::{ClientFrame, EventBody, StreamEvent};
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

async fn send_event(session: &mut actix_ws::Session, event: &StreamEvent) -> Result<(), ()> {
    let text = serde_json::to_string(event).map_err(|_| ())?;
    session.text(text).await.map_err(|_| ())
}

/// Sends stored durable events after `*last`, advancing it.
async fn replay(state: &AppState, chat_id: &str, last: &mut i64, session: &mut actix_ws::Session) -> Result<(), ()> {
    let events = state.store.events_after(chat_id, *last).await.map_err(|_| ())?;
    for event in events {
        if event.seq.is_some_and(|s| s > *last) {
            send_event(session, &event).await?;
            *last = event.seq.unwrap_or(*last);
        }
    }
    Ok(())
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
    let mut live = state.bus.subscribe(&chat_id);
    let snapshot = match state.store.snapshot(&chat_id, SNAPSHOT_MESSAGES).await {
        Ok(Some(s)) => s,
        _ => {
            let _ = session.close(None).await;
            return;
        }
    };
    let mut last = snapshot.last_seq;
    let frame = StreamEvent {
        seq: None,
        chat_id: chat_id.clone(),
        body: EventBody::Snapshot {
            chat: snapshot.chat,
            messages: snapshot.messages,
            queued_messages: snapshot.queued,
            last_seq: snapshot.last_seq,
        },
    };
    if send_event(&mut session, &frame).await.is_err() {
        return;
    }
    if let Some(after) = after_seq.filter(|a| *a < last) {
        last = after;
        if replay(&state, &chat_id, &mut last, &mut session).await.is_err() {
            return;
        }
    }
    loop {
        tokio::select! {
            event = live.recv() => match event {
                Ok(event) => {
                    let ok = match event.seq {
                        Some(seq) if seq <= last => Ok(()),
                        Some(seq) if seq > last + 1 => replay(&state, &chat_id, &mut last, &mut session).await,
                        Some(seq) => {
                            last = seq;
                            send_event(&mut session, &event).await
                        }
                        None => send_event(&mut session, &event).await,
                    };
                    if ok.is_err() {
                        return;
                    }
                }
                Err(RecvError::Lagged(_)) => {
                    // Deltas were lost: tell the client to drop its partial answer, then catch up.
                    let reset = StreamEvent { seq: None, chat_id: chat_id.clone(), body: EventBody::StreamReset };
                    if send_event(&mut session, &reset).await.is_err()
                        || replay(&state, &chat_id, &mut last, &mut session).await.is_err()
                    {
                        return;
                    }
                }
                Err(RecvError::Closed) => break,
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
