//! A client for a chat's WebSocket event stream (`GET /api/v1/chats/{id}/stream`).
//!
//! Tests wait on events instead of polling: [`EventStream::wait_for`] reads until a predicate
//! matches and hands back everything it read on the way, so a test can assert on the deltas,
//! tool calls and status changes that led there.

use std::time::Duration;

use agentplane_schema::api::ChatStatus;
use agentplane_schema::event::{ClientFrame, EventBody, StreamEvent};
use futures::{SinkExt, StreamExt};
use reqwest::StatusCode;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::error::{Error, Result};

/// The handshake to a local server is immediate; longer means it is not answering.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// One open stream of one chat's events.
pub struct EventStream {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    chat_id: String,
    last_seq: Option<i64>,
}

impl std::fmt::Debug for EventStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventStream").field("chat_id", &self.chat_id).field("last_seq", &self.last_seq).finish()
    }
}

/// `http://host:port` (server root) to the stream URL of a chat.
fn stream_url(base_http_url: &str, chat_id: &str, after_seq: Option<i64>) -> Result<String> {
    let base = base_http_url.trim_end_matches('/');
    let ws_base = if let Some(rest) = base.strip_prefix("http://") {
        format!("ws://{rest}")
    } else if let Some(rest) = base.strip_prefix("https://") {
        format!("wss://{rest}")
    } else {
        return Err(Error::Setup(format!("not an http(s) URL: {base_http_url}")));
    };
    let query = after_seq.map(|s| format!("?after_seq={s}")).unwrap_or_default();
    Ok(format!("{ws_base}/api/v1/chats/{chat_id}/stream{query}"))
}

fn summary(events: &[StreamEvent]) -> String {
    let kinds: Vec<String> = events
        .iter()
        .map(|e| match &e.body {
            EventBody::Status { status, .. } => format!("status({})", status.as_str()),
            body => body.kind().to_string(),
        })
        .collect();
    kinds.join(", ")
}

impl EventStream {
    /// Opens the stream with `Authorization: Bearer <token>` (none when `token` is empty); with `after_seq` the server replays
    /// durable events after that seq. A refused handshake (401, 404, …) is an [`Error::Api`].
    pub async fn connect(base_http_url: &str, chat_id: &str, token: &str, after_seq: Option<i64>) -> Result<Self> {
        let url = stream_url(base_http_url, chat_id, after_seq)?;
        let mut request = url.as_str().into_client_request()?;
        // An empty token means no credentials at all, for tests of anonymous access.
        if !token.is_empty() {
            let auth = HeaderValue::from_str(&format!("Bearer {token}"))
                .map_err(|_| Error::Setup("token is not a valid header value".into()))?;
            request.headers_mut().insert("authorization", auth);
        }
        let connected = tokio::time::timeout(CONNECT_TIMEOUT, tokio_tungstenite::connect_async(request))
            .await
            .map_err(|_| Error::Timeout { after: CONNECT_TIMEOUT, what: format!("WebSocket handshake with {url}") })?;
        let ws = match connected {
            Ok((ws, _response)) => ws,
            Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
                let status = StatusCode::from_u16(response.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
                let body = response
                    .body()
                    .as_deref()
                    .map(|b| {
                        serde_json::from_slice(b)
                            .unwrap_or_else(|_| serde_json::Value::String(String::from_utf8_lossy(b).into_owned()))
                    })
                    .unwrap_or(serde_json::Value::Null);
                return Err(Error::api(status, body));
            }
            Err(e) => return Err(e.into()),
        };
        Ok(EventStream { ws, chat_id: chat_id.to_string(), last_seq: None })
    }

    pub fn chat_id(&self) -> &str {
        &self.chat_id
    }

    /// The highest durable `seq` read so far (the snapshot's `last_seq` counts); pass it to
    /// [`EventStream::connect`] to resume.
    pub fn last_seq(&self) -> Option<i64> {
        self.last_seq
    }

    fn note_seq(&mut self, event: &StreamEvent) {
        let seq = match &event.body {
            EventBody::Snapshot { last_seq, .. } => Some(*last_seq),
            _ => event.seq,
        };
        if let Some(seq) = seq {
            self.last_seq = Some(self.last_seq.map_or(seq, |s| s.max(seq)));
        }
    }

    async fn read_event(&mut self) -> Result<StreamEvent> {
        loop {
            let raw = match self.ws.next().await {
                Some(Ok(Message::Text(text))) => text.as_str().to_string(),
                Some(Ok(Message::Binary(bytes))) => String::from_utf8_lossy(&bytes).into_owned(),
                // tungstenite answers pings itself.
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => continue,
                Some(Ok(Message::Close(frame))) => {
                    return Err(Error::Closed { reason: frame.map(|f| format!("{} {}", f.code, f.reason)) });
                }
                Some(Err(e)) => return Err(e.into()),
                None => return Err(Error::Closed { reason: None }),
            };
            let event: StreamEvent = serde_json::from_str(&raw).map_err(|source| Error::Decode {
                what: "StreamEvent",
                raw: raw.clone(),
                source,
            })?;
            self.note_seq(&event);
            return Ok(event);
        }
    }

    /// The next event, or [`Error::Timeout`] / [`Error::Closed`].
    pub async fn next_event(&mut self, timeout: Duration) -> Result<StreamEvent> {
        tokio::time::timeout(timeout, self.read_event())
            .await
            .map_err(|_| Error::Timeout { after: timeout, what: format!("an event on chat {}", self.chat_id) })?
    }

    /// Reads until `matches` holds, returning every event read, the match last. On timeout or
    /// close the error lists what was seen, which is usually the diagnosis.
    pub async fn wait_for(
        &mut self,
        mut matches: impl FnMut(&StreamEvent) -> bool,
        timeout: Duration,
    ) -> Result<Vec<StreamEvent>> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut seen = Vec::new();
        loop {
            let event = match tokio::time::timeout_at(deadline, self.read_event()).await {
                Ok(Ok(event)) => event,
                Ok(Err(Error::Closed { reason })) => {
                    let reason = reason.unwrap_or_default();
                    return Err(Error::Closed { reason: Some(format!("{reason} (saw: {})", summary(&seen))) });
                }
                Ok(Err(e)) => return Err(e),
                Err(_) => {
                    return Err(Error::Timeout {
                        after: timeout,
                        what: format!("a matching event on chat {} (saw: {})", self.chat_id, summary(&seen)),
                    });
                }
            };
            let done = matches(&event);
            seen.push(event);
            if done {
                return Ok(seen);
            }
        }
    }

    /// Reads until a `status` event with `status`.
    pub async fn wait_for_status(&mut self, status: ChatStatus, timeout: Duration) -> Result<Vec<StreamEvent>> {
        self.wait_for(|e| matches!(&e.body, EventBody::Status { status: s, .. } if *s == status), timeout).await
    }

    pub async fn send_frame(&mut self, frame: &ClientFrame) -> Result<()> {
        let text = serde_json::to_string(frame).map_err(|source| Error::Decode {
            what: "ClientFrame",
            raw: format!("{frame:?}"),
            source,
        })?;
        self.ws.send(Message::text(text)).await?;
        Ok(())
    }

    /// Sends a close frame and waits briefly for the server's; errors on an already closed
    /// socket are ignored since the goal is reached either way.
    pub async fn close(mut self) {
        let _ = self.ws.close(None).await;
        let _ = tokio::time::timeout(Duration::from_secs(1), async { while self.ws.next().await.is_some() {} }).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_urls() {
        assert_eq!(
            stream_url("http://127.0.0.1:8080/", "c1", Some(7)).expect("url"),
            "ws://127.0.0.1:8080/api/v1/chats/c1/stream?after_seq=7"
        );
        assert_eq!(stream_url("https://h", "c", None).expect("url"), "wss://h/api/v1/chats/c/stream");
        assert!(stream_url("ftp://h", "c", None).is_err());
    }
}
