//! AWS Bedrock's Converse API, streamed (`ConverseStream`): one request shape for every model
//! Bedrock hosts (Claude, Nova, Llama, Mistral, Kimi, …).
//!
//! [`request_body`] turns the prompt into the Converse JSON body. The request is signed with
//! SigV4 when `settings.access_key_id` is set (the provider's API key is then the secret access
//! key, or `<secret access key>:<session token>` for temporary credentials, so both secrets are
//! stored encrypted); otherwise the API key is a Bedrock API key, sent as a bearer token. The answer is a
//! binary `application/vnd.amazon.eventstream`: [`FrameReader`] cuts it into CRC-checked frames
//! (with `aws-smithy-eventstream`) and [`EventDecoder`] turns their JSON payloads into
//! [`ModelEvent`]s.
//!
//! Settings (the provider's, with the model's laid over them):
//! - `region`: the AWS region, e.g. `us-east-1`. Needed to sign and for the default endpoint
//!   `https://bedrock-runtime.{region}.amazonaws.com` (used when the base URL is empty).
//! - `access_key_id`: the IAM access key to sign with (its secret, and the session token of
//!   temporary credentials, are in the API key).
//! - `cache_points`: `true` adds Converse `cachePoint`s after the system prompt and after the last
//!   message. Off by default: models without prompt caching reject the request with them.
//! - `additional_model_request_fields`: an object sent as `additionalModelRequestFields`, for
//!   model-specific options such as Claude's `thinking`.

use std::collections::{HashMap, VecDeque};
use std::ops::ControlFlow;
use std::time::SystemTime;

use agentplane_actors::ports::{
    ImageData, ModelError, ModelEvent, ModelRequest, ModelStream, PromptMessage, StopReason, ToolSpec, Usage,
};
use agentplane_schema::api::ChatErrorKind;
use agentplane_schema::message::{Part, Role};
use aws_smithy_eventstream::frame::{DecodedFrame, MessageFrameDecoder};
use aws_smithy_types::event_stream::{HeaderValue, Message};
use bytes::BytesMut;
use futures::StreamExt;
use reqwest::StatusCode;
use reqwest::header::HeaderMap;
use serde::Deserialize;
use serde_json::{Value, json};

use super::fragments;
use super::http;

/// The SigV4 signing name of the Bedrock runtime.
const SIGNING_SERVICE: &str = "bedrock";

/// A frame longer than this is corrupt: event-stream messages carry at most 16 MiB of payload
/// and 128 KiB of headers. Checked before waiting for the rest of a frame, so a garbled length
/// fails at once instead of buffering until the body ends.
const MAX_FRAME_BYTES: usize = 16 * 1024 * 1024 + 128 * 1024 + 16;

/// Length of a frame's prelude: total length, headers length, prelude CRC.
const PRELUDE_BYTES: usize = 12;

/// Sent in place of an empty tool result: several Bedrock models reject an empty `toolResult`
/// content, and every model rejects one whose status is `error`.
const EMPTY_TOOL_RESULT: &str = "(no output)";

/// Marks redacted reasoning kept in a reasoning part's signature. Redacted reasoning is an
/// opaque blob the model needs back (Claude refuses a tool-use turn without its thinking), and
/// the signature is the only opaque field a reasoning part has. Base64 never contains `:`, so a
/// real signature cannot look like this.
const REDACTED_PREFIX: &str = "bedrock-redacted:";

/// The Converse body of `request`, as sent.
pub(crate) fn body_bytes(request: &ModelRequest) -> Result<Vec<u8>, ModelError> {
    request_body(request, &Settings::from_target(&request.target.settings))
}

/// Validation messages by which Bedrock models say the prompt does not fit, besides the phrases
/// `http` knows.
const OVERFLOW_PHRASES: &[&str] = &["input is too long", "too many input tokens", "exceed context limit"];

/// Sends `request` and returns its answer as a stream. Errors up to and including the response
/// headers (bad settings, connect failures, error statuses) come from the outer `Result`.
pub(crate) async fn stream(client: &reqwest::Client, request: ModelRequest) -> Result<ModelStream, ModelError> {
    let settings = Settings::from_target(&request.target.settings);
    let secret = request.target.api_key.clone().filter(|key| !key.is_empty());
    let url = endpoint(&request.target.base_url, &request.target.model, settings.region.as_deref())?;
    let body = body_bytes(&request)?;

    let mut builder = client.post(url.clone()).header(reqwest::header::CONTENT_TYPE, "application/json");
    match (&settings.access_key_id, &secret) {
        (Some(access_key_id), Some(secret)) => {
            // Secret access keys and session tokens are base64: a colon can only be the separator.
            let (secret_key, session_token) = match secret.split_once(':') {
                Some((key, token)) => (key, Some(token)),
                None => (secret.as_str(), None),
            };
            let credentials = Credentials {
                access_key_id,
                secret_access_key: secret_key,
                session_token,
                region: settings.region.as_deref().ok_or_else(|| config_error("`region` is required to sign"))?,
            };
            for (name, value) in sign(&url, &body, &credentials, SystemTime::now())? {
                builder = builder.header(name, value);
            }
        }
        (Some(_), None) => {
            return Err(config_error("`access_key_id` is set but the secret access key (the API key) is empty"));
        }
        (None, Some(api_key)) => builder = builder.bearer_auth(api_key),
        // A gateway in front of Bedrock may add credentials itself; AWS's own endpoint needs some.
        (None, None) if request.target.base_url.trim().is_empty() => {
            return Err(config_error("no credentials: set an API key, or `access_key_id` and the secret as API key"));
        }
        (None, None) => {}
    }

    let response = builder.body(body).send().await.map_err(|e| http::transport_error(e, secret.as_deref()))?;
    if !response.status().is_success() {
        return Err(http::failed_call(response, &request.target.model, |status, headers, body| {
            status_error(status, headers, body, secret.as_deref())
        })
        .await);
    }

    let state = StreamState {
        bytes: response.bytes_stream().boxed(),
        decoder: StreamDecoder::new(secret),
        pending: VecDeque::new(),
        done: false,
    };
    Ok(futures::stream::unfold(state, StreamState::next).boxed())
}

/// Runs the decoder over a whole recorded response body, as if it had arrived in one piece.
pub(crate) fn decode_body(body: &[u8]) -> Vec<Result<ModelEvent, ModelError>> {
    let mut decoder = StreamDecoder::new(None);
    let mut out = VecDeque::new();
    if decoder.push(body, &mut out).is_continue() {
        decoder.end(&mut out);
    }
    out.into()
}

fn config_error(message: &str) -> ModelError {
    ModelError::new(ChatErrorKind::Config, format!("bedrock: {message}"))
}

// ---------------------------------------------------------------------------------------------
// Settings, endpoint and signing

/// The dialect's keys of [`ModelTarget::settings`](agentplane_actors::ports::ModelTarget).
#[derive(Debug, Default)]
struct Settings {
    region: Option<String>,
    access_key_id: Option<String>,
    cache_points: bool,
    additional_model_request_fields: Option<Value>,
}

impl Settings {
    /// `settings` may be `null` or hold keys of other dialects; blank strings count as unset.
    fn from_target(settings: &Value) -> Self {
        let text = |key: &str| {
            settings.get(key).and_then(Value::as_str).map(str::trim).filter(|s| !s.is_empty()).map(str::to_owned)
        };
        Settings {
            region: text("region"),
            access_key_id: text("access_key_id"),
            cache_points: settings.get("cache_points").and_then(Value::as_bool).unwrap_or(false),
            additional_model_request_fields: settings
                .get("additional_model_request_fields")
                .filter(|v| v.as_object().is_some_and(|o| !o.is_empty()))
                .cloned(),
        }
    }
}

/// `{base}/model/{model id}/converse-stream`. The model id is percent-encoded as one path
/// segment: ids carry `:` (`anthropic.claude-3-haiku-20240307-v1:0`) and ARNs carry `/`.
pub(super) fn endpoint(base_url: &str, model: &str, region: Option<&str>) -> Result<reqwest::Url, ModelError> {
    let base = base_url.trim().trim_end_matches('/');
    let base = if base.is_empty() {
        let region = region.ok_or_else(|| config_error("`region` is required when the base URL is empty"))?;
        // The region becomes part of a host name.
        if !region.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-') {
            return Err(config_error(&format!("`region` {region:?} is not an AWS region name")));
        }
        format!("https://bedrock-runtime.{region}.amazonaws.com")
    } else {
        base.to_owned()
    };
    let url = format!("{base}/model/{}/converse-stream", encode_path_segment(model));
    reqwest::Url::parse(&url).map_err(|e| config_error(&format!("invalid endpoint {url:?}: {e}")))
}

/// RFC 3986 percent-encoding of everything but unreserved characters.
fn encode_path_segment(segment: &str) -> String {
    let mut out = String::with_capacity(segment.len());
    for byte in segment.bytes() {
        match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => out.push(byte as char),
            _ => out.push_str(&format!("%{byte:02X}")),
        }
    }
    out
}

struct Credentials<'a> {
    access_key_id: &'a str,
    secret_access_key: &'a str,
    session_token: Option<&'a str>,
    region: &'a str,
}

/// The SigV4 headers for a `POST` of `body` to `url`: `authorization`, `x-amz-date`,
/// `x-amz-content-sha256` and, with temporary credentials, `x-amz-security-token`. Signed are
/// the method, path, query, `host`, `content-type` and those `x-amz-*` headers.
fn sign(
    url: &reqwest::Url,
    body: &[u8],
    credentials: &Credentials<'_>,
    time: SystemTime,
) -> Result<Vec<(&'static str, String)>, ModelError> {
    use aws_sigv4::http_request::{PayloadChecksumKind, SignableBody, SignableRequest, SigningSettings};

    let identity = aws_credential_types::Credentials::new(
        credentials.access_key_id,
        credentials.secret_access_key,
        credentials.session_token.map(str::to_owned),
        None,
        "agentplane provider settings",
    )
    .into();
    let mut settings = SigningSettings::default();
    settings.payload_checksum_kind = PayloadChecksumKind::XAmzSha256;
    let params = aws_sigv4::sign::v4::SigningParams::builder()
        .identity(&identity)
        .region(credentials.region)
        .name(SIGNING_SERVICE)
        .time(time)
        .settings(settings)
        .build()
        .map_err(|e| config_error(&format!("cannot sign the request: {e}")))?
        .into();
    let headers = [("content-type", "application/json")];
    let signable = SignableRequest::new("POST", url.as_str(), headers.into_iter(), SignableBody::Bytes(body))
        .and_then(|signable| aws_sigv4::http_request::sign(signable, &params))
        .map_err(|e| config_error(&format!("cannot sign the request: {e}")))?;
    let (instructions, _signature) = signable.into_parts();
    let (headers, _params) = instructions.into_parts();
    Ok(headers.into_iter().map(|h| (h.name(), h.value().to_owned())).collect())
}

// ---------------------------------------------------------------------------------------------
// Request

/// The Converse body for `request`. Fails with a `Config` error when a message names an image
/// the request does not carry, or one in a format Converse does not take. Each history message's
/// content blocks come from the conversation's [`SentPrefix`](fragments::SentPrefix) as written for an earlier step, or
/// are written now and kept there; what is put together for each request is the messages
/// around them and the cache points.
fn request_body(request: &ModelRequest, settings: &Settings) -> Result<Vec<u8>, ModelError> {
    let tools_offered = !request.tools.is_empty();
    let mut rest = json!({});
    if !request.system.is_empty() {
        let mut system = vec![json!({"text": request.system})];
        if settings.cache_points {
            system.push(cache_point());
        }
        rest["system"] = Value::Array(system);
    }
    // An empty tool list is rejected, so the key is left out instead.
    if tools_offered {
        rest["toolConfig"] = json!({"tools": request.tools.iter().map(tool_definition).collect::<Vec<_>>()});
    }
    // Converse does not require a limit; without one the model's own default applies.
    if let Some(max) = request.target.max_output_tokens.filter(|m| *m > 0) {
        rest["inferenceConfig"] = json!({"maxTokens": max});
    }
    if let Some(fields) = &settings.additional_model_request_fields {
        rest["additionalModelRequestFields"] = fields.clone();
    }

    // Without tools, calls and results are written as text (see `message_content`).
    let written_as = if tools_offered { "bedrock" } else { "bedrock, no tools" };
    fragments::with_message_pieces(
        request,
        written_as,
        |message| fragments::raw_all(&message_content(message, &request.images, tools_offered)?),
        |pieces| {
            // Converse rejects empty content, and roles must alternate: a user message after tool
            // results (or two answers in a row) joins the message before it.
            let messages = fragments::merged_by_role(pieces, &request.messages);
            let size = pieces.size() + 40 * messages.len();
            let cache_point = settings.cache_points.then(|| cache_point().to_string());
            fragments::object_with_array_first("messages", size, &rest, |out| {
                fragments::push_role_messages(out, &messages, fragments::ROLE_AND_CONTENT, |out, index, content| {
                    let point = cache_point.as_deref().filter(|_| index + 1 == messages.len());
                    fragments::push_joined(out, content.iter().copied().chain(point));
                })
            })
        },
    )
}

/// Converse refuses text blocks that are empty or only whitespace.
fn is_blank(text: &str) -> bool {
    text.trim().is_empty()
}

fn cache_point() -> Value {
    json!({"cachePoint": {"type": "default"}})
}

/// The Converse content blocks of one prompt message (`assistant` for an assistant's, `user` for
/// the others').
fn message_content(
    message: &PromptMessage,
    images: &HashMap<String, ImageData>,
    tools_offered: bool,
) -> Result<Vec<Value>, ModelError> {
    let mut content = Vec::with_capacity(message.parts.len());
    match message.role {
        // The loop drops markers before a prompt is built; should one arrive anyway, it is not sent.
        Role::Marker => {}
        Role::User | Role::Summary => {
            for part in message.parts.iter() {
                match part {
                    Part::Text { text } if !is_blank(text) => content.push(json!({"text": text})),
                    Part::Image { file_id } => content.push(image_block(file_id, images)?),
                    _ => {}
                }
            }
        }
        Role::Assistant => {
            for part in message.parts.iter() {
                match part {
                    Part::Reasoning { text, signature: Some(signature) } => {
                        content.push(reasoning_block(text, signature));
                    }
                    Part::Text { text } if !is_blank(text) => content.push(json!({"text": text})),
                    Part::ToolCall { call_id, name, args } if tools_offered => content.push(json!({
                        "toolUse": {"toolUseId": call_id, "name": name, "input": tool_input(args)},
                    })),
                    // Without a tool list Converse refuses `toolUse` and `toolResult` blocks, so
                    // in a tool-less call (compaction) the calls and results are told as text.
                    Part::ToolCall { call_id, name, args } => {
                        content.push(json!({"text": format!("[tool call {name} ({call_id}): {args}]")}));
                    }
                    // Reasoning without a signature (DeepSeek, Kimi) is not sent back: the models
                    // that need their reasoning back (Claude) sign it, and others may refuse it.
                    _ => {}
                }
            }
        }
        Role::Tool => {
            for part in message.parts.iter() {
                let Part::ToolResult { call_id, name, result, is_error } = part else {
                    continue;
                };
                let text = if result.is_empty() { EMPTY_TOOL_RESULT } else { result.as_str() };
                if tools_offered {
                    content.push(json!({"toolResult": {
                        "toolUseId": call_id,
                        "content": [{"text": text}],
                        "status": if *is_error { "error" } else { "success" },
                    }}));
                } else {
                    let outcome = if *is_error { "tool error" } else { "tool result" };
                    content.push(json!({"text": format!("[{outcome} {name} ({call_id})]\n{text}")}));
                }
            }
        }
    }
    Ok(content)
}

fn reasoning_block(text: &str, signature: &str) -> Value {
    match signature.strip_prefix(REDACTED_PREFIX) {
        Some(data) => json!({"reasoningContent": {"redactedContent": data}}),
        None => json!({"reasoningContent": {"reasoningText": {"text": text, "signature": signature}}}),
    }
}

/// `toolUse.input` must be a JSON object. Arguments the model wrote as invalid JSON are kept as
/// a string by the loop; they are sent as an empty object, and the error result that followed
/// the call tells the model what went wrong.
fn tool_input(args: &Value) -> Value {
    match args {
        Value::Object(_) => args.clone(),
        _ => json!({}),
    }
}

fn image_block(file_id: &str, images: &HashMap<String, ImageData>) -> Result<Value, ModelError> {
    let image = images
        .get(file_id)
        .ok_or_else(|| config_error(&format!("image {file_id} is referenced but its bytes were not provided")))?;
    let format = match image.media_type.as_str() {
        "image/png" => "png",
        "image/jpeg" => "jpeg",
        "image/gif" => "gif",
        "image/webp" => "webp",
        other => return Err(config_error(&format!("image {file_id} has type {other}, which Converse does not take"))),
    };
    Ok(json!({"image": {"format": format, "source": {"bytes": data_encoding::BASE64.encode(&image.bytes)}}}))
}

fn tool_definition(tool: &ToolSpec) -> Value {
    json!({"toolSpec": {
        "name": tool.name,
        "description": tool.description,
        "inputSchema": {"json": tool.parameters},
    }})
}

// ---------------------------------------------------------------------------------------------
// Errors

/// Maps an error response. Bedrock names the error in `x-amzn-errortype`
/// (`ThrottlingException:http://internal.amazon.com/coral/…`) or in the body's `__type`, with
/// the text in `message` (or `Message`); unnamed errors fall back to the status.
fn status_error(status: StatusCode, headers: &HeaderMap, body: &[u8], api_key: Option<&str>) -> ModelError {
    let json: Option<Value> = serde_json::from_slice(body).ok();
    let header_type = headers.get("x-amzn-errortype").and_then(|v| v.to_str().ok());
    let body_type = json.as_ref().and_then(|j| j.get("__type")).and_then(Value::as_str);
    let error_type = header_type
        .or(body_type)
        .map(|t| t.split(':').next().unwrap_or(t))
        .map(|t| t.rsplit('#').next().unwrap_or(t))
        .filter(|t| !t.is_empty());
    let message = json.as_ref().and_then(aws_message).unwrap_or_default();
    let classified = error_type.and_then(|t| classify(t, &message).map(|kind| (t, kind)));
    let Some((error_type, (kind, retryable))) = classified else {
        let mut error = http::status_error(status, headers, body, api_key);
        if error.kind == ChatErrorKind::Config && mentions_overflow(&message) {
            error.kind = ChatErrorKind::ContextOverflow;
        }
        return error;
    };
    let reason = status.canonical_reason().map(|r| format!(" {r}")).unwrap_or_default();
    let text = format!("HTTP {}{reason}: {error_type}: {message}", status.as_u16());
    ModelError {
        kind,
        message: http::clean_message(&text, api_key),
        retryable,
        retry_after: http::retry_after(headers),
    }
}

/// An error the stream reported after it began: an `exception` frame (a modeled error such as
/// `throttlingException`, its payload `{"message"}`) or an `error` frame (code and message in
/// headers).
fn stream_error(error_type: &str, message: &str, api_key: Option<&str>) -> ModelError {
    let (kind, retryable) = classify(error_type, message).unwrap_or((ChatErrorKind::Provider, true));
    let text = format!("provider error ({error_type}): {message}");
    ModelError { kind, message: http::clean_message(&text, api_key), retryable, retry_after: None }
}

/// The kind of a Bedrock error by its name; the names come PascalCase over HTTP and camelCase in
/// stream exceptions.
fn classify(error_type: &str, message: &str) -> Option<(ChatErrorKind, bool)> {
    let kind = match error_type.to_ascii_lowercase().as_str() {
        "throttlingexception" | "toomanyrequestsexception" => (ChatErrorKind::RateLimit, true),
        // A quota for the account (tokens per day, …): waiting seconds does not restore it.
        "servicequotaexceededexception" => (ChatErrorKind::RateLimit, false),
        "serviceunavailableexception" | "modelnotreadyexception" => (ChatErrorKind::Overloaded, true),
        "internalserverexception" | "internalfailure" | "modelstreamerrorexception" | "modelerrorexception" => {
            (ChatErrorKind::Provider, true)
        }
        "modeltimeoutexception" => (ChatErrorKind::Timeout, true),
        "validationexception" if mentions_overflow(message) => (ChatErrorKind::ContextOverflow, false),
        "validationexception" | "resourcenotfoundexception" | "serializationexception" | "conflictexception" => {
            (ChatErrorKind::Config, false)
        }
        "accessdeniedexception"
        | "unrecognizedclientexception"
        | "invalidsignatureexception"
        | "incompletesignatureexception"
        | "missingauthenticationtokenexception"
        | "expiredtokenexception"
        | "invalidclienttokenid" => (ChatErrorKind::Auth, false),
        _ => return None,
    };
    Some(kind)
}

fn mentions_overflow(message: &str) -> bool {
    let lower = message.to_ascii_lowercase();
    http::mentions_context_overflow(&lower) || OVERFLOW_PHRASES.iter().any(|phrase| lower.contains(phrase))
}

/// The text of an AWS error body. A model stream error also names what the model said.
fn aws_message(value: &Value) -> Option<String> {
    let message = ["message", "Message"].iter().find_map(|k| value.get(*k)).and_then(Value::as_str)?;
    Some(match value.get("originalMessage").and_then(Value::as_str) {
        Some(original) if !original.is_empty() && !message.contains(original) => format!("{message} ({original})"),
        _ => message.to_owned(),
    })
}

// ---------------------------------------------------------------------------------------------
// Response

struct StreamState {
    bytes: futures::stream::BoxStream<'static, reqwest::Result<bytes::Bytes>>,
    decoder: StreamDecoder,
    pending: VecDeque<Result<ModelEvent, ModelError>>,
    done: bool,
}

impl StreamState {
    async fn next(mut self) -> Option<(Result<ModelEvent, ModelError>, Self)> {
        loop {
            if let Some(item) = self.pending.pop_front() {
                return Some((item, self));
            }
            if self.done {
                return None;
            }
            match self.bytes.next().await {
                Some(Ok(chunk)) => self.done = self.decoder.push(&chunk, &mut self.pending).is_break(),
                Some(Err(error)) => {
                    self.done = true;
                    self.decoder.fail(error, &mut self.pending);
                }
                None => {
                    self.done = true;
                    self.decoder.end(&mut self.pending);
                }
            }
        }
    }
}

/// Frames and events together: what turns body bytes into model events.
pub(crate) struct StreamDecoder {
    frames: FrameReader,
    events: EventDecoder,
}

impl StreamDecoder {
    pub(crate) fn new(api_key: Option<String>) -> Self {
        StreamDecoder { frames: FrameReader::default(), events: EventDecoder::new(api_key) }
    }

    /// Decodes every complete frame in the bytes so far. `Break` means the stream failed and
    /// nothing more is to be read.
    pub(crate) fn push(&mut self, chunk: &[u8], out: &mut VecDeque<Result<ModelEvent, ModelError>>) -> ControlFlow<()> {
        self.frames.push(chunk);
        loop {
            match self.frames.next_frame() {
                Ok(Some(frame)) => self.events.on_frame(&frame, out)?,
                Ok(None) => return ControlFlow::Continue(()),
                Err(problem) if self.events.finished => {
                    // The answer is complete; garbage after it changes nothing.
                    tracing::warn!(%problem, "bad event-stream data after the end of the answer");
                    return ControlFlow::Break(());
                }
                Err(problem) => {
                    tracing::warn!(%problem, "model stream is not a valid event stream");
                    let message = format!("malformed event stream: {problem}");
                    out.push_back(Err(ModelError::new(ChatErrorKind::Provider, message)));
                    return ControlFlow::Break(());
                }
            }
        }
    }

    /// The body ended. A complete answer has had its `messageStop`; one without it was cut.
    pub(crate) fn end(&mut self, out: &mut VecDeque<Result<ModelEvent, ModelError>>) {
        if self.events.finished {
            return;
        }
        if self.events.stop_reason.is_some() {
            // Only the metadata (usage) is missing; the answer itself is whole.
            self.events.finish(out);
            return;
        }
        let problem = if self.frames.is_clean() { "before the end of the answer" } else { "inside a frame" };
        tracing::warn!(problem, "model stream ended early");
        out.push_back(Err(ModelError::new(ChatErrorKind::Provider, format!("the model stream ended {problem}"))));
    }

    /// Reading the body failed.
    fn fail(&mut self, error: reqwest::Error, out: &mut VecDeque<Result<ModelEvent, ModelError>>) {
        if self.events.finished {
            return;
        }
        if self.events.stop_reason.is_some() {
            // The answer was complete; only the usage was lost. Retrying would pay for the whole
            // answer again.
            let error = error.without_url();
            tracing::warn!(%error, "model stream cut after its stop reason");
            self.events.finish(out);
            return;
        }
        let error = http::transport_error(error, self.events.api_key.as_deref());
        tracing::warn!(%error, "model stream failed");
        out.push_back(Err(error));
    }
}

/// Cuts an event-stream body into frames across arbitrary chunk boundaries. The CRCs are checked
/// by `aws-smithy-eventstream`'s decoder.
#[derive(Default)]
struct FrameReader {
    buffer: BytesMut,
    decoder: MessageFrameDecoder,
    /// The decoder has taken a frame's prelude off `buffer` and waits for the rest of it.
    in_frame: bool,
}

impl FrameReader {
    fn push(&mut self, chunk: &[u8]) {
        self.buffer.extend_from_slice(chunk);
    }

    /// The next complete frame, `None` until more bytes arrive.
    fn next_frame(&mut self) -> Result<Option<Message>, String> {
        if !self.in_frame {
            if self.buffer.len() < PRELUDE_BYTES {
                return Ok(None);
            }
            let total = u32::from_be_bytes([self.buffer[0], self.buffer[1], self.buffer[2], self.buffer[3]]);
            if total as usize > MAX_FRAME_BYTES {
                return Err(format!("a frame claims {total} bytes"));
            }
        }
        match self.decoder.decode_frame(&mut self.buffer) {
            Ok(DecodedFrame::Complete(message)) => {
                self.in_frame = false;
                Ok(Some(message))
            }
            Ok(DecodedFrame::Incomplete) => {
                self.in_frame = true;
                Ok(None)
            }
            Err(error) => Err(error.to_string()),
        }
    }

    /// No partial frame is pending.
    fn is_clean(&self) -> bool {
        !self.in_frame && self.buffer.is_empty()
    }
}

/// The payload of a `contentBlockStart` event.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct BlockStart {
    #[serde(default)]
    content_block_index: u64,
    #[serde(default)]
    start: Option<StartBody>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct StartBody {
    #[serde(default)]
    tool_use: Option<ToolUseStart>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ToolUseStart {
    #[serde(default)]
    tool_use_id: Option<String>,
    #[serde(default)]
    name: Option<String>,
}

/// The payload of a `contentBlockDelta` event. Unknown delta kinds (citations, images) are
/// ignored.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct BlockDelta {
    #[serde(default)]
    content_block_index: u64,
    #[serde(default)]
    delta: Option<DeltaBody>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct DeltaBody {
    #[serde(default)]
    text: Option<String>,
    #[serde(default)]
    tool_use: Option<ToolUseDelta>,
    #[serde(default)]
    reasoning_content: Option<ReasoningDelta>,
}

#[derive(Debug, Deserialize)]
struct ToolUseDelta {
    #[serde(default)]
    input: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ReasoningDelta {
    #[serde(default)]
    text: Option<String>,
    #[serde(default)]
    signature: Option<String>,
    /// Encrypted reasoning, base64.
    #[serde(default)]
    redacted_content: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct MessageStop {
    #[serde(default)]
    stop_reason: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Metadata {
    #[serde(default)]
    usage: Option<WireUsage>,
}

/// Bedrock's `inputTokens` excludes the tokens read from or written to the cache; ours is the
/// whole prompt.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct WireUsage {
    #[serde(default)]
    input_tokens: u64,
    #[serde(default)]
    output_tokens: u64,
    #[serde(default)]
    cache_read_input_tokens: u64,
    #[serde(default)]
    cache_write_input_tokens: u64,
}

/// Turns frames into events. `Usage` and `Finish` are held until the end, because the
/// `metadata` event with the usage follows `messageStop`.
struct EventDecoder {
    api_key: Option<String>,
    /// Converse `contentBlockIndex` of a tool-use block → our tool-call index.
    calls: HashMap<u64, usize>,
    started_calls: usize,
    usage: Option<Usage>,
    stop_reason: Option<String>,
    /// `Finish` went out; whatever follows is ignored.
    finished: bool,
}

impl EventDecoder {
    fn new(api_key: Option<String>) -> Self {
        EventDecoder {
            api_key,
            calls: HashMap::new(),
            started_calls: 0,
            usage: None,
            stop_reason: None,
            finished: false,
        }
    }

    /// Handles one frame. `Break` means the stream reported an error (pushed to `out`).
    fn on_frame(&mut self, frame: &Message, out: &mut VecDeque<Result<ModelEvent, ModelError>>) -> ControlFlow<()> {
        if self.finished {
            return ControlFlow::Continue(());
        }
        let header = |name: &str| {
            frame.headers().iter().find(|h| h.name().as_str() == name).and_then(|h| match h.value() {
                HeaderValue::String(s) => Some(s.as_str()),
                _ => None,
            })
        };
        match header(":message-type") {
            Some("event") => {
                let event_type = header(":event-type").unwrap_or_default();
                match self.on_event(event_type, frame.payload(), out) {
                    Ok(()) => ControlFlow::Continue(()),
                    Err(problem) => {
                        let message = format!("unexpected {event_type} event in model stream: {problem}");
                        out.push_back(Err(ModelError::new(ChatErrorKind::Provider, message)));
                        ControlFlow::Break(())
                    }
                }
            }
            Some("exception") => {
                let exception_type = header(":exception-type").unwrap_or("exception");
                let payload: Option<Value> = serde_json::from_slice(frame.payload()).ok();
                let message = payload
                    .as_ref()
                    .and_then(aws_message)
                    .unwrap_or_else(|| String::from_utf8_lossy(frame.payload()).into_owned());
                let error = stream_error(exception_type, &message, self.api_key.as_deref());
                tracing::warn!(%error, "model stream reported an exception");
                out.push_back(Err(error));
                ControlFlow::Break(())
            }
            Some("error") => {
                let code = header(":error-code").unwrap_or("error");
                let error = stream_error(code, header(":error-message").unwrap_or_default(), self.api_key.as_deref());
                tracing::warn!(%error, "model stream reported an error");
                out.push_back(Err(error));
                ControlFlow::Break(())
            }
            other => {
                tracing::debug!(message_type = ?other, "ignoring an event-stream frame of unknown type");
                ControlFlow::Continue(())
            }
        }
    }

    fn on_event(
        &mut self,
        event_type: &str,
        payload: &[u8],
        out: &mut VecDeque<Result<ModelEvent, ModelError>>,
    ) -> Result<(), serde_json::Error> {
        match event_type {
            "contentBlockStart" => {
                let start: BlockStart = serde_json::from_slice(payload)?;
                if let Some(tool_use) = start.start.and_then(|s| s.tool_use) {
                    let index = self.started_calls;
                    self.started_calls += 1;
                    self.calls.insert(start.content_block_index, index);
                    let call_id = tool_use.tool_use_id.filter(|id| !id.is_empty()).unwrap_or_else(|| {
                        // The loop pairs results with calls by id, so one is needed.
                        format!("call_{index}")
                    });
                    let name = tool_use.name.unwrap_or_default();
                    out.push_back(Ok(ModelEvent::ToolCallStart { index, call_id, name }));
                }
            }
            "contentBlockDelta" => {
                let delta: BlockDelta = serde_json::from_slice(payload)?;
                let Some(body) = delta.delta else {
                    return Ok(());
                };
                if let Some(text) = body.text.filter(|t| !t.is_empty()) {
                    out.push_back(Ok(ModelEvent::TextDelta(text)));
                }
                if let Some(piece) = body.tool_use.and_then(|t| t.input).filter(|p| !p.is_empty()) {
                    match self.calls.get(&delta.content_block_index) {
                        Some(&index) => out.push_back(Ok(ModelEvent::ToolCallArgs { index, piece })),
                        None => tracing::warn!("dropping tool input for a block that never started"),
                    }
                }
                if let Some(reasoning) = body.reasoning_content {
                    if let Some(text) = reasoning.text.filter(|t| !t.is_empty()) {
                        out.push_back(Ok(ModelEvent::ReasoningDelta { text, signature: None }));
                    }
                    if let Some(signature) = reasoning.signature.filter(|s| !s.is_empty()) {
                        out.push_back(Ok(ModelEvent::ReasoningDelta {
                            text: String::new(),
                            signature: Some(signature),
                        }));
                    }
                    if let Some(data) = reasoning.redacted_content.filter(|d| !d.is_empty()) {
                        let signature = Some(format!("{REDACTED_PREFIX}{data}"));
                        out.push_back(Ok(ModelEvent::ReasoningDelta { text: String::new(), signature }));
                    }
                }
            }
            "messageStop" => {
                let stop: MessageStop = serde_json::from_slice(payload)?;
                self.stop_reason = Some(stop.stop_reason.unwrap_or_default());
            }
            "metadata" => {
                let metadata: Metadata = serde_json::from_slice(payload)?;
                if let Some(usage) = metadata.usage {
                    let cached = usage.cache_read_input_tokens + usage.cache_write_input_tokens;
                    self.usage = Some(Usage {
                        input_tokens: usage.input_tokens + cached,
                        output_tokens: usage.output_tokens,
                        cache_read_tokens: usage.cache_read_input_tokens,
                        cache_write_tokens: usage.cache_write_input_tokens,
                    });
                }
                // The metadata is the last event of an answer: finish now rather than when the
                // connection closes, so a cut after it costs nothing.
                if self.stop_reason.is_some() {
                    self.finish(out);
                }
            }
            // `messageStart` carries only the role, `contentBlockStop` nothing we need; newer
            // event types are skipped.
            _ => {}
        }
        Ok(())
    }

    /// Ends the answer: `Usage`, then `Finish`.
    fn finish(&mut self, out: &mut VecDeque<Result<ModelEvent, ModelError>>) {
        if std::mem::replace(&mut self.finished, true) {
            return;
        }
        if let Some(usage) = self.usage {
            out.push_back(Ok(ModelEvent::Usage(usage)));
        }
        let saw_calls = self.started_calls > 0;
        let reason = match self.stop_reason.as_deref() {
            Some("tool_use") => StopReason::ToolUse,
            // Some models end a turn with calls as `end_turn`; the calls still have to run.
            Some("end_turn" | "stop_sequence") if saw_calls => StopReason::ToolUse,
            Some("end_turn" | "stop_sequence") => StopReason::EndTurn,
            // The answer was cut by the output limit or by the context window filling up.
            Some("max_tokens" | "model_context_window_exceeded") => StopReason::MaxTokens,
            Some("content_filtered" | "guardrail_intervened") => StopReason::ContentFilter,
            _ => StopReason::Other,
        };
        out.push_back(Ok(ModelEvent::Finish(reason)));
    }
}
