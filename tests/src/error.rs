//! The one error type of the harness.
//!
//! Tests mostly `expect` these, but bad-input and auth tests match on them, so each variant is a
//! kind a caller can tell apart: an API answer that was not 2xx (with the server's typed error
//! body), a transport failure, a stream that ended, or a wait that ran out of time.

use std::time::Duration;

use agentplane_schema::api::ErrorBody;
use reqwest::StatusCode;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The server answered with a non-2xx status. `kind` and `message` come from the
    /// `{"error": {"kind", "message"}}` body; when the body is not of that shape (a proxy page,
    /// an empty 404) `kind` is empty and `body` holds whatever came back.
    #[error("HTTP {status}: {kind}: {message}")]
    Api { status: StatusCode, kind: String, message: String, body: serde_json::Value },
    #[error("HTTP request failed: {0}")]
    Http(#[from] reqwest::Error),
    #[error("WebSocket failed: {0}")]
    WebSocket(#[from] Box<tokio_tungstenite::tungstenite::Error>),
    /// A body or frame that does not match the schema type it should be.
    #[error("could not decode {what}: {source}; raw: {raw}")]
    Decode {
        what: &'static str,
        raw: String,
        #[source]
        source: serde_json::Error,
    },
    /// The WebSocket closed (close frame or end of stream) while events were expected.
    #[error("stream closed{}", .reason.as_ref().map(|r| format!(": {r}")).unwrap_or_default())]
    Closed { reason: Option<String> },
    #[error("timed out after {after:?} waiting for {what}")]
    Timeout { after: Duration, what: String },
    /// Harness misuse or environment problems (bad URL, server thread failed to start).
    #[error("{0}")]
    Setup(String),
}

impl Error {
    /// The HTTP status of an [`Error::Api`].
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            Error::Api { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// The `error.kind` of an [`Error::Api`] (empty when the body had none).
    pub fn api_kind(&self) -> Option<&str> {
        match self {
            Error::Api { kind, .. } => Some(kind),
            _ => None,
        }
    }

    pub(crate) fn api(status: StatusCode, body: serde_json::Value) -> Self {
        match serde_json::from_value::<ErrorBody>(body.clone()) {
            Ok(parsed) => Error::Api { status, kind: parsed.error.kind, message: parsed.error.message, body },
            Err(_) => Error::Api { status, kind: String::new(), message: body.to_string(), body },
        }
    }
}

impl From<tokio_tungstenite::tungstenite::Error> for Error {
    fn from(e: tokio_tungstenite::tungstenite::Error) -> Self {
        // Boxed because tungstenite's error is large and would bloat every `Result` here.
        Error::WebSocket(Box::new(e))
    }
}
