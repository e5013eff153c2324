//! How HTTP failures of a provider call become a typed [`ModelError`]: the status code and body
//! of an error response, `retry-after` headers, errors a provider reports inside an otherwise
//! successful stream, and transport errors (connect, reset, timeout).
//!
//! Messages carry the provider's own words where it gave some, because they tell an admin what
//! to fix ("model not found", "invalid api key"); the API key itself is scrubbed from them.

use std::time::{Duration, SystemTime};

use agentplane_actors::ports::ModelError;
use agentplane_schema::api::ChatErrorKind;
use futures::StreamExt;
use reqwest::StatusCode;
use reqwest::header::HeaderMap;
use serde_json::Value;

/// How much of an error body is read: enough for any JSON error, bounded against a proxy that
/// answers with a large HTML page.
const MAX_ERROR_BODY_BYTES: usize = 64 * 1024;

/// How much of a provider's message is kept in the error.
const MAX_MESSAGE_CHARS: usize = 1000;

/// Phrases by which providers say the prompt does not fit the model's context window. There is
/// no common code: OpenAI sends `context_length_exceeded`, vLLM and OpenRouter "maximum context
/// length", Anthropic "prompt is too long" (or, when the prompt and `max_tokens` together do
/// not fit, "exceed context limit"), llama.cpp "context size", others "too many tokens".
const CONTEXT_OVERFLOW_PHRASES: &[&str] = &[
    "context_length_exceeded",
    "maximum context length",
    "context length",
    "context window",
    "context size",
    "too many tokens",
    "prompt is too long",
    "context limit",
];

/// Maps an error response to a [`ModelError`]. `body` may be empty or not JSON.
pub(crate) fn status_error(status: StatusCode, headers: &HeaderMap, body: &[u8], api_key: Option<&str>) -> ModelError {
    let body_text = String::from_utf8_lossy(body);
    let json: Option<Value> = serde_json::from_slice(body).ok();
    let provider_message = json.as_ref().and_then(json_error_message);
    let code = json.as_ref().and_then(json_error_code);
    let detail = provider_message.clone().unwrap_or_else(|| body_text.trim().to_owned());

    let overflow = mentions_context_overflow(&detail) || code.as_deref().is_some_and(mentions_context_overflow);
    let (kind, retryable) = match status.as_u16() {
        // OpenAI answers an exhausted balance with 429 too; waiting does not refill it.
        429 if code.as_deref() == Some("insufficient_quota") => (ChatErrorKind::RateLimit, false),
        429 => (ChatErrorKind::RateLimit, true),
        // 529 is Anthropic's "overloaded", also passed through by gateways.
        503 | 529 => (ChatErrorKind::Overloaded, true),
        408 => (ChatErrorKind::Timeout, true),
        401 | 403 => (ChatErrorKind::Auth, false),
        // Azure OpenAI refuses prompts its content filter flags with a 400.
        400 if code.as_deref() == Some("content_filter") => (ChatErrorKind::ContentFilter, false),
        400 | 413 | 422 if overflow => (ChatErrorKind::ContextOverflow, false),
        // 404 is an unknown model or a wrong base URL; 402 is an unpaid account (OpenRouter).
        400..=499 => (ChatErrorKind::Config, false),
        _ => (ChatErrorKind::Provider, true),
    };

    let mut message = format!("HTTP {}", status.as_u16());
    if let Some(reason) = status.canonical_reason() {
        message.push(' ');
        message.push_str(reason);
    }
    if !detail.is_empty() {
        message.push_str(": ");
        message.push_str(&detail);
    }
    ModelError { kind, message: clean_message(&message, api_key), retryable, retry_after: retry_after(headers) }
}

/// Maps an error object a provider sent inside a 200 stream (OpenRouter does this when the
/// upstream fails after the headers went out). `value` is the whole chunk or the `error` field.
pub(crate) fn stream_error(value: &Value, api_key: Option<&str>) -> ModelError {
    let message = json_error_message(value).unwrap_or_else(|| value.to_string());
    let code = json_error_code(value);
    let status = code.as_deref().and_then(|c| c.parse::<u16>().ok()).and_then(|c| StatusCode::from_u16(c).ok());
    if let Some(status) = status.filter(|s| s.is_client_error() || s.is_server_error()) {
        let mut error = status_error(status, &HeaderMap::new(), value.to_string().as_bytes(), api_key);
        error.message = clean_message(&format!("provider error ({}): {message}", status.as_u16()), api_key);
        return error;
    }
    let lower_code = code.as_deref().map(str::to_ascii_lowercase).unwrap_or_default();
    let kind = if mentions_context_overflow(&message) || mentions_context_overflow(&lower_code) {
        ChatErrorKind::ContextOverflow
    } else if lower_code.contains("rate_limit") || lower_code == "insufficient_quota" {
        ChatErrorKind::RateLimit
    } else if lower_code.contains("overloaded") {
        ChatErrorKind::Overloaded
    } else if lower_code.contains("auth") || lower_code.contains("api_key") {
        ChatErrorKind::Auth
    } else if lower_code.contains("timeout") {
        ChatErrorKind::Timeout
    } else if lower_code == "content_filter" {
        ChatErrorKind::ContentFilter
    } else {
        ChatErrorKind::Provider
    };
    let prefix = match code {
        Some(code) => format!("provider error ({code})"),
        None => "provider error".to_owned(),
    };
    let mut error = ModelError::new(kind, clean_message(&format!("{prefix}: {message}"), api_key));
    // As with a 429 status: an empty balance does not refill by waiting.
    if lower_code == "insufficient_quota" {
        error.retryable = false;
    }
    error
}

/// Maps a failure to send the request or to read the response body.
pub(crate) fn transport_error(error: reqwest::Error, api_key: Option<&str>) -> ModelError {
    // The URL is dropped because a gateway's base URL may embed credentials.
    let error = error.without_url();
    let message = if error.is_timeout() {
        "timed out waiting for the provider".to_owned()
    } else if error.is_connect() {
        format!("could not connect: {}", root_cause(&error))
    } else if error.is_body() || error.is_decode() {
        format!("connection lost while reading the answer: {}", root_cause(&error))
    } else {
        format!("request failed: {}", root_cause(&error))
    };
    let kind = if error.is_timeout() { ChatErrorKind::Timeout } else { ChatErrorKind::Provider };
    // Every transport failure is worth another try: a reset or a stalled read says nothing about
    // whether the same request would succeed.
    ModelError { kind, message: clean_message(&message, api_key), retryable: true, retry_after: None }
}

/// The error of a response whose status is not a success: its body read (bounded), read by `map`
/// (the dialect's reading of status, headers and body; [`status_error`] for most), and logged
/// with the model, so every dialect reports a failed call the same way.
pub(crate) async fn failed_call(
    response: reqwest::Response,
    model: &str,
    map: impl FnOnce(StatusCode, &HeaderMap, &[u8]) -> ModelError,
) -> ModelError {
    let status = response.status();
    let headers = response.headers().clone();
    let body = read_error_body(response).await;
    let error = map(status, &headers, &body);
    tracing::warn!(model = %model, status = status.as_u16(), kind = ?error.kind, "model call failed");
    error
}

/// Reads at most [`MAX_ERROR_BODY_BYTES`] of an error response. A body that fails half-way is
/// still good for a message, so read errors just end it.
pub(crate) async fn read_error_body(response: reqwest::Response) -> Vec<u8> {
    let mut body = Vec::new();
    let mut chunks = response.bytes_stream();
    while let Some(Ok(chunk)) = chunks.next().await {
        let room = MAX_ERROR_BODY_BYTES - body.len();
        body.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if body.len() >= MAX_ERROR_BODY_BYTES {
            break;
        }
    }
    body
}

/// The delay a provider asked for: `retry-after-ms` (OpenAI, Azure) is preferred for its
/// precision, then `retry-after` as seconds (possibly fractional) or an HTTP date.
pub(crate) fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).map(str::trim);
    if let Some(ms) = header("retry-after-ms").and_then(|v| v.parse::<f64>().ok()) {
        return Duration::try_from_secs_f64(ms / 1000.0).ok();
    }
    let value = header("retry-after")?;
    if let Ok(seconds) = value.parse::<f64>() {
        return Duration::try_from_secs_f64(seconds).ok();
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(SystemTime::now()).unwrap_or(Duration::ZERO))
}

pub(crate) fn mentions_context_overflow(text: &str) -> bool {
    let lower = text.to_ascii_lowercase();
    CONTEXT_OVERFLOW_PHRASES.iter().any(|phrase| lower.contains(phrase))
}

/// The human message of an error body, in the shapes providers use: `{"error":{"message"}}`
/// (OpenAI and most compatible servers), `{"error":"..."}` (Ollama), `{"message"}` or
/// `{"detail"}` (FastAPI-based servers), or a one-element array of those (Gemini).
fn json_error_message(value: &Value) -> Option<String> {
    let value = match value {
        Value::Array(items) => items.first()?,
        other => other,
    };
    let error = value.get("error").unwrap_or(value);
    let message = match error {
        Value::String(s) => Some(s.clone()),
        Value::Object(_) => error.get("message").or_else(|| error.get("detail")).map(|m| match m {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        }),
        _ => None,
    }?;
    // OpenRouter puts the upstream provider's own error in `metadata.raw`; it is the useful part.
    let raw = error.get("metadata").and_then(|m| m.get("raw")).and_then(Value::as_str);
    Some(match raw {
        Some(raw) if !raw.is_empty() && !message.contains(raw) => format!("{message} ({raw})"),
        _ => message,
    })
}

/// The machine-readable code of an error body (`code`, else `type`, else `status`), as text.
fn json_error_code(value: &Value) -> Option<String> {
    let value = match value {
        Value::Array(items) => items.first()?,
        other => other,
    };
    let error = value.get("error").filter(|e| e.is_object()).unwrap_or(value);
    ["code", "type", "status"].iter().find_map(|key| match error.get(*key)? {
        Value::String(s) if !s.is_empty() => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    })
}

/// The innermost cause of an error, which is where reqwest keeps the useful part ("connection
/// reset by peer"); its own `Display` only says which phase failed.
fn root_cause(error: &dyn std::error::Error) -> String {
    let mut cause = error;
    while let Some(source) = cause.source() {
        cause = source;
    }
    cause.to_string()
}

/// Bounds a message and scrubs the API key from it: some proxies echo the key they rejected.
pub(crate) fn clean_message(message: &str, api_key: Option<&str>) -> String {
    let mut message = match api_key {
        // Short keys would match ordinary words; real keys are long.
        Some(key) if key.len() >= 8 => message.replace(key, "<redacted>"),
        _ => message.to_owned(),
    };
    if let Some((cut, _)) = message.char_indices().nth(MAX_MESSAGE_CHARS) {
        message.truncate(cut);
        message.push('…');
    }
    message
}

#[cfg(test)]
mod tests {
    use reqwest::header::HeaderValue;

    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.insert(*name, HeaderValue::from_str(value).expect("header value"));
        }
        map
    }

    fn error(status: u16, body: &str) -> ModelError {
        let status = StatusCode::from_u16(status).expect("status");
        status_error(status, &HeaderMap::new(), body.as_bytes(), Some("sk-secret-key-123"))
    }

    #[test]
    fn statuses_map_to_kinds() {
        let cases = [
            (429, ChatErrorKind::RateLimit, true),
            (529, ChatErrorKind::Overloaded, true),
            (503, ChatErrorKind::Overloaded, true),
            (500, ChatErrorKind::Provider, true),
            (502, ChatErrorKind::Provider, true),
            (504, ChatErrorKind::Provider, true),
            (408, ChatErrorKind::Timeout, true),
            (401, ChatErrorKind::Auth, false),
            (403, ChatErrorKind::Auth, false),
            (404, ChatErrorKind::Config, false),
            (400, ChatErrorKind::Config, false),
            (422, ChatErrorKind::Config, false),
        ];
        for (status, kind, retryable) in cases {
            let e = error(status, "");
            assert_eq!((e.kind, e.retryable), (kind, retryable), "status {status}");
        }
    }

    #[test]
    fn context_overflow_is_recognised_by_message_or_code() {
        let e =
            error(400, r#"{"error":{"message":"This model's maximum context length is 8192 tokens.","code":null}}"#);
        assert_eq!((e.kind, e.retryable), (ChatErrorKind::ContextOverflow, false));
        let e = error(400, r#"{"error":{"message":"too long","code":"context_length_exceeded"}}"#);
        assert_eq!(e.kind, ChatErrorKind::ContextOverflow);
        let e = error(413, "prompt is too long: 210000 tokens > 200000 maximum");
        assert_eq!(e.kind, ChatErrorKind::ContextOverflow);
        let e = error(400, r#"{"error":{"message":"Unsupported parameter: 'max_tokens'"}}"#);
        assert_eq!((e.kind, e.retryable), (ChatErrorKind::Config, false));
        assert!(e.message.contains("Unsupported parameter: 'max_tokens'"), "{}", e.message);
    }

    #[test]
    fn message_comes_from_the_json_body_without_the_key() {
        let e = error(401, r#"{"error":{"message":"Incorrect API key provided: sk-secret-key-123","type":"auth"}}"#);
        assert_eq!(e.message, "HTTP 401 Unauthorized: Incorrect API key provided: <redacted>");
        let e = error(404, r#"{"error":"model 'llama9' not found"}"#);
        assert_eq!(e.message, "HTTP 404 Not Found: model 'llama9' not found");
        let e = error(502, "<html>bad gateway</html>");
        assert_eq!(e.message, "HTTP 502 Bad Gateway: <html>bad gateway</html>");
    }

    #[test]
    fn azure_content_filter_is_its_own_kind() {
        let e = error(400, r#"{"error":{"message":"The response was filtered","code":"content_filter","status":400}}"#);
        assert_eq!((e.kind, e.retryable), (ChatErrorKind::ContentFilter, false));
        let e = stream_error(&serde_json::json!({"error": {"code": "content_filter", "message": "Filtered"}}), None);
        assert_eq!((e.kind, e.retryable), (ChatErrorKind::ContentFilter, false));
    }

    #[test]
    fn insufficient_quota_is_not_retried() {
        let e = error(429, r#"{"error":{"message":"You exceeded your current quota","code":"insufficient_quota"}}"#);
        assert_eq!((e.kind, e.retryable), (ChatErrorKind::RateLimit, false));
    }

    #[test]
    fn retry_after_forms() {
        assert_eq!(retry_after(&headers(&[("retry-after", "2")])), Some(Duration::from_secs(2)));
        assert_eq!(retry_after(&headers(&[("retry-after", "1.5")])), Some(Duration::from_millis(1500)));
        assert_eq!(
            retry_after(&headers(&[("retry-after", "2"), ("retry-after-ms", "250")])),
            Some(Duration::from_millis(250))
        );
        let in_a_minute = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(60));
        let delay = retry_after(&headers(&[("retry-after", &in_a_minute)])).expect("date form");
        assert!(delay > Duration::from_secs(55) && delay <= Duration::from_secs(60), "{delay:?}");
        let past = httpdate::fmt_http_date(SystemTime::now() - Duration::from_secs(60));
        assert_eq!(retry_after(&headers(&[("retry-after", &past)])), Some(Duration::ZERO));
        assert_eq!(retry_after(&headers(&[("retry-after", "soon")])), None);
        assert_eq!(retry_after(&headers(&[("retry-after", "-1")])), None);
        assert_eq!(retry_after(&HeaderMap::new()), None);
    }

    #[test]
    fn stream_errors_use_their_code() {
        let e = stream_error(&serde_json::json!({"error": {"code": 429, "message": "slow down"}}), None);
        assert_eq!((e.kind, e.retryable), (ChatErrorKind::RateLimit, true));
        assert_eq!(e.message, "provider error (429): slow down");
        let e = stream_error(
            &serde_json::json!({
                "error": {"code": "server_error", "message": "Provider disconnected"},
            }),
            None,
        );
        assert_eq!((e.kind, e.retryable), (ChatErrorKind::Provider, true));
        let quota = serde_json::json!({"error": {"code": "insufficient_quota", "message": "No credits"}});
        let e = stream_error(&quota, None);
        assert_eq!((e.kind, e.retryable), (ChatErrorKind::RateLimit, false));
        let e = stream_error(&serde_json::json!({"error": {"message": "boom"}}), None);
        assert_eq!((e.kind, e.retryable), (ChatErrorKind::Provider, true));
        assert_eq!(e.message, "provider error: boom");
        let e =
            stream_error(&serde_json::json!({"error": {"type": "overloaded_error", "message": "Overloaded"}}), None);
        assert_eq!(e.kind, ChatErrorKind::Overloaded);
    }

    #[test]
    fn long_messages_are_cut_on_a_char_boundary() {
        let body = "é".repeat(5000);
        let e = error(500, &body);
        assert!(e.message.chars().count() <= MAX_MESSAGE_CHARS + 1);
        assert!(e.message.ends_with('…'));
    }
}
