//! The Anthropic Messages dialect, streamed: `POST /v1/messages` with `stream: true`.
//!
//! [`request_body`] turns the prompt into the JSON body, with prompt-caching breakpoints placed
//! so an agent turn re-reads its growing prefix from the cache; [`EventDecoder`] turns the typed
//! SSE events (`message_start`, `content_block_*`, `message_delta`, `message_stop`, `error`)
//! into [`ModelEvent`]s.

use std::collections::{HashMap, VecDeque};
use std::ops::ControlFlow;

use agentplane_actors::ports::{
    ImageData, ModelError, ModelEvent, ModelRequest, ModelStream, PromptMessage, StopReason, ToolSpec, Usage,
};
use agentplane_schema::api::ChatErrorKind;
use agentplane_schema::message::{Part, Role};
use futures::StreamExt;
use serde::Deserialize;
use serde_json::{Value, json};

use super::fragments::{self, WireRole};
use super::http;
use super::sse::{self, SseEvent};

/// The API version every request names; the event and body shapes below are this version's.
const ANTHROPIC_VERSION: &str = "2023-06-01";

/// `max_tokens` is required by the API. Used when neither the model nor the provider settings
/// give one; every current Claude model accepts it.
const DEFAULT_MAX_TOKENS: i64 = 8192;

/// The image types the API takes (`source.media_type`).
const IMAGE_MEDIA_TYPES: &[&str] = &["image/jpeg", "image/png", "image/gif", "image/webp"];

/// Sends `request` and returns its answer as a stream. Errors up to and including the response
/// headers (a prompt that cannot be encoded, connect failures, error statuses) come from the
/// outer `Result`.
pub(crate) async fn stream(client: &reqwest::Client, request: ModelRequest) -> Result<ModelStream, ModelError> {
    let api_key = request.target.api_key.clone().filter(|key| !key.is_empty());
    let url = messages_url(&request.target.base_url);
    let body = request_body(&request)?;

    let mut builder = client
        .post(&url)
        .header("anthropic-version", ANTHROPIC_VERSION)
        .header(reqwest::header::ACCEPT, "text/event-stream")
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .body(body);
    if let Some(key) = &api_key {
        builder = builder.header("x-api-key", key);
    }
    let response = builder.send().await.map_err(|e| http::transport_error(e, api_key.as_deref()))?;

    if !response.status().is_success() {
        return Err(http::failed_call(response, &request.target.model, |status, headers, body| {
            http::status_error(status, headers, body, api_key.as_deref())
        })
        .await);
    }

    Ok(sse::decode_stream(response.bytes_stream().boxed(), EventDecoder::new(api_key)))
}

/// Runs the decoder over a whole recorded response body, without HTTP: what [`stream`] would
/// yield for a server that sent exactly these bytes.
pub(crate) fn decode_body(body: &[u8]) -> Vec<Result<ModelEvent, ModelError>> {
    sse::decode_sse_body(body, EventDecoder::new(None))
}

/// `{base}/v1/messages`; a base URL that already ends in `/v1` (as admins often copy it) is not
/// given a second one.
fn messages_url(base_url: &str) -> String {
    let base = base_url.trim_end_matches('/');
    if base.ends_with("/v1") { format!("{base}/messages") } else { format!("{base}/v1/messages") }
}

// ---------------------------------------------------------------------------------------------
// Request

/// The name under which a conversation's [`SentPrefix`](fragments::SentPrefix) holds what this dialect wrote.
const KEPT_AS: &str = "anthropic";

/// The Messages body for `request`, as bytes. Fails (as a `Config` error, before anything is
/// sent) when a message names an image whose bytes are missing or whose type the API does not
/// take.
///
/// Each history message's content blocks come from the conversation's [`SentPrefix`](fragments::SentPrefix) as written
/// for an earlier step, or are written now and kept there (but a message with an image, whose
/// data would be kept for as long as the chat is loaded, is written anew each time). Only the
/// wire messages around them and the two cache breakpoints are put together for each request.
pub(crate) fn request_body(request: &ModelRequest) -> Result<Vec<u8>, ModelError> {
    let settings = &request.target.settings;
    let thinking_budget = settings.get("thinking_budget_tokens").and_then(Value::as_i64).filter(|b| *b > 0);
    let max_tokens = max_tokens(request, thinking_budget)?;
    let mut rest = json!({
        "model": request.target.model,
        "max_tokens": max_tokens,
        "stream": true,
    });
    if !request.system.is_empty() {
        rest["system"] = json!([{"type": "text", "text": request.system, "cache_control": ephemeral()}]);
    }
    if !request.tools.is_empty() {
        let mut tools: Vec<Value> = request.tools.iter().map(tool_definition).collect();
        // Tools come first in the cached prefix; their own breakpoint keeps them cached even
        // when the system prompt changes (an edited deployment prompt).
        if let Some(last) = tools.last_mut() {
            last["cache_control"] = ephemeral();
        }
        rest["tools"] = Value::Array(tools);
    }
    if let Some(budget) = thinking_budget {
        rest["thinking"] = json!({"type": "enabled", "budget_tokens": budget});
    }

    fragments::with_message_pieces(
        request,
        KEPT_AS,
        |message| fragments::raw_all(&message_blocks(message, &request.images)?),
        |pieces| {
            // The API wants user and assistant strictly alternating: tool results (a user
            // message) followed by a queued user message, or a dropped message in between, are
            // merged.
            let messages = fragments::merged_by_role(pieces, &request.messages);
            let breakpoints = message_breakpoints(messages.iter().map(|(role, _)| *role));
            let size = pieces.size() + 48 * messages.len();
            fragments::object_with_array_first("messages", size, &rest, |out| {
                fragments::push_role_messages(out, &messages, fragments::ROLE_AND_CONTENT, |out, index, blocks| {
                    if let Some((last, before)) = blocks.split_last() {
                        fragments::push_joined(out, before.iter().copied());
                        if !before.is_empty() {
                            out.push(b',');
                        }
                        push_last_blocks(out, last, breakpoints.contains(&index));
                    }
                })
            })
        },
    )
}

/// A message's last prompt message's blocks, the last of them with a cache breakpoint (put
/// before its closing brace) when `breakpoint`. Thinking blocks cannot carry one; they are never
/// last in a message anyway, because a message of reasoning alone is not sent.
fn push_last_blocks(out: &mut Vec<u8>, blocks: &str, breakpoint: bool) {
    match blocks.strip_suffix('}') {
        Some(open) if breakpoint => {
            out.extend_from_slice(open.as_bytes());
            out.extend_from_slice(br#","cache_control":{"type":"ephemeral"}}"#);
        }
        _ => out.extend_from_slice(blocks.as_bytes()),
    }
}

/// The model's limit, else the provider's `max_tokens` setting, else [`DEFAULT_MAX_TOKENS`].
/// Extended thinking counts against `max_tokens`, which must exceed the thinking budget: a
/// default is raised to leave room for the answer, a configured limit that leaves none is an
/// error that names both settings.
fn max_tokens(request: &ModelRequest, thinking_budget: Option<i64>) -> Result<i64, ModelError> {
    let configured = request
        .target
        .max_output_tokens
        .filter(|m| *m > 0)
        .or_else(|| request.target.settings.get("max_tokens").and_then(Value::as_i64).filter(|m| *m > 0));
    match (configured, thinking_budget) {
        (Some(max), Some(budget)) if max <= budget => Err(ModelError::new(
            ChatErrorKind::Config,
            format!("thinking_budget_tokens ({budget}) must be below the model's max output tokens ({max})"),
        )),
        (Some(max), _) => Ok(max),
        (None, Some(budget)) => Ok(budget + DEFAULT_MAX_TOKENS),
        (None, None) => Ok(DEFAULT_MAX_TOKENS),
    }
}

fn ephemeral() -> Value {
    json!({"type": "ephemeral"})
}

/// Prompt-caching breakpoints in the conversation, as indexes of the wire messages whose last
/// block carries one. The cache is a prefix cache: a breakpoint on the last block of the prompt
/// writes the whole prompt, which the next step of the same turn (the same prompt plus an answer
/// and tool results) reads back. The API only looks about 20 blocks back from a breakpoint for
/// an earlier one, and a step with many parallel tool calls adds more than that, so the previous
/// user message (the previous step's last block) gets a breakpoint too. With the tools and
/// system breakpoints that makes four, the API's maximum.
fn message_breakpoints(roles: impl DoubleEndedIterator<Item = WireRole> + ExactSizeIterator) -> Vec<usize> {
    let Some(last) = roles.len().checked_sub(1) else {
        return Vec::new();
    };
    let previous_user = roles.enumerate().rev().skip(1).find(|(_, role)| *role == WireRole::User);
    previous_user.map(|(index, _)| index).into_iter().chain([last]).collect()
}

/// The content blocks of one prompt message; none when it has nothing to send.
fn message_blocks(message: &PromptMessage, images: &HashMap<String, ImageData>) -> Result<Vec<Value>, ModelError> {
    let blocks = match message.role {
        Role::User | Role::Summary => user_blocks(&message.parts, images)?,
        Role::Marker => Vec::new(),
        Role::Assistant => assistant_blocks(&message.parts),
        // Tool results go back as a user message of `tool_result` blocks, which the API wants
        // before any text in that message (the merge in `request_body` keeps them first).
        Role::Tool => message
            .parts
            .iter()
            .filter_map(|p| match p {
                Part::ToolResult { call_id, result, is_error, .. } => {
                    Some(tool_result_block(call_id, result, *is_error))
                }
                _ => None,
            })
            .collect(),
    };
    // The API rejects messages without content; an assistant message of reasoning alone (an
    // answer interrupted while thinking) is not worth sending either.
    let has_content = blocks.iter().any(|b| b["type"] != "thinking");
    Ok(if has_content { blocks } else { Vec::new() })
}

fn user_blocks(parts: &[Part], images: &HashMap<String, ImageData>) -> Result<Vec<Value>, ModelError> {
    let mut blocks = Vec::with_capacity(parts.len());
    for part in parts {
        match part {
            // The API rejects empty text blocks.
            Part::Text { text } if !text.is_empty() => blocks.push(json!({"type": "text", "text": text})),
            Part::Image { file_id } => blocks.push(image_block(file_id, images)?),
            _ => {}
        }
    }
    Ok(blocks)
}

fn image_block(file_id: &str, images: &HashMap<String, ImageData>) -> Result<Value, ModelError> {
    let image = images.get(file_id).ok_or_else(|| {
        ModelError::new(ChatErrorKind::Config, format!("image {file_id} is not available to send to the model"))
    })?;
    if !IMAGE_MEDIA_TYPES.contains(&image.media_type.as_str()) {
        return Err(ModelError::new(
            ChatErrorKind::Config,
            format!("image {file_id} is {}; Anthropic takes only JPEG, PNG, GIF and WebP images", image.media_type),
        ));
    }
    Ok(json!({
        "type": "image",
        "source": {
            "type": "base64",
            "media_type": image.media_type,
            "data": data_encoding::BASE64.encode(&image.bytes),
        },
    }))
}

/// Reasoning first (the API wants a turn's `thinking` block before its text and tool calls),
/// then the text, then the tool calls, as the loop stores them.
fn assistant_blocks(parts: &[Part]) -> Vec<Value> {
    let mut blocks = Vec::with_capacity(parts.len());
    // Reasoning is only replayed with its signature: the API verifies it, and rejects thinking
    // without one. Reasoning from a provider that does not sign it is dropped.
    for part in parts {
        if let Part::Reasoning { text, signature: Some(signature) } = part
            && !signature.is_empty()
        {
            blocks.push(json!({"type": "thinking", "thinking": text, "signature": signature}));
        }
    }
    for part in parts {
        match part {
            Part::Text { text } if !text.is_empty() => blocks.push(json!({"type": "text", "text": text})),
            Part::ToolCall { call_id, name, args } => {
                blocks.push(json!({"type": "tool_use", "id": call_id, "name": name, "input": tool_input(args)}))
            }
            _ => {}
        }
    }
    blocks
}

/// `input` must be an object. Arguments the model wrote as invalid JSON are stored as a string
/// (and the call answered with an error); a string holding an object is unwrapped, anything
/// else goes back as an empty object, since the error result already tells the model what was
/// wrong.
fn tool_input(args: &Value) -> Value {
    match args {
        Value::Object(_) => args.clone(),
        Value::String(raw) => match serde_json::from_str::<Value>(raw) {
            Ok(object @ Value::Object(_)) => object,
            _ => json!({}),
        },
        _ => json!({}),
    }
}

fn tool_result_block(call_id: &str, result: &str, is_error: bool) -> Value {
    let mut block = json!({"type": "tool_result", "tool_use_id": call_id, "is_error": is_error});
    // `content` is optional, and an empty text is rejected where a missing one is not.
    if !result.is_empty() {
        block["content"] = Value::String(result.to_owned());
    }
    block
}

fn tool_definition(tool: &ToolSpec) -> Value {
    let input_schema = match &tool.parameters {
        Value::Null => json!({"type": "object", "properties": {}}),
        schema => schema.clone(),
    };
    json!({"name": tool.name, "description": tool.description, "input_schema": input_schema})
}

// ---------------------------------------------------------------------------------------------
// Response

impl sse::SseDecoder for EventDecoder {
    fn on_event(&mut self, event: &SseEvent, out: &mut VecDeque<Result<ModelEvent, ModelError>>) -> ControlFlow<()> {
        EventDecoder::on_event(self, event, out)
    }

    fn end_of_body(&mut self, out: &mut VecDeque<Result<ModelEvent, ModelError>>) {
        self.end_of_stream(out);
    }

    /// `message_delta` carried the stop reason; only `message_stop` is missing.
    fn answer_complete(&self) -> bool {
        self.stop_reason.is_some()
    }

    fn api_key(&self) -> Option<&str> {
        self.api_key.as_deref()
    }
}

/// One stream event. Unknown types (new event kinds) are ignored, as the API asks clients to.
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum WireEvent {
    MessageStart {
        message: WireMessageStart,
    },
    ContentBlockStart {
        index: u64,
        content_block: WireBlock,
    },
    ContentBlockDelta {
        index: u64,
        delta: WireDelta,
    },
    ContentBlockStop,
    MessageDelta {
        #[serde(default)]
        delta: Option<WireMessageDelta>,
        #[serde(default)]
        usage: Option<WireUsage>,
    },
    MessageStop,
    #[serde(other)]
    Other,
}

#[derive(Debug, Deserialize)]
struct WireMessageStart {
    /// Absent from some gateways' streams, which report usage only in `message_delta`.
    #[serde(default)]
    usage: Option<WireUsage>,
}

#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum WireBlock {
    Text {
        #[serde(default)]
        text: String,
    },
    Thinking {
        #[serde(default)]
        thinking: String,
        #[serde(default)]
        signature: String,
    },
    ToolUse {
        id: String,
        name: String,
        #[serde(default)]
        input: Option<Value>,
    },
    /// `server_tool_use`, `web_search_tool_result`, `redacted_thinking` and whatever comes next:
    /// the server ran or hid these itself, and nothing here can run or replay them.
    #[serde(other)]
    Other,
}

#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum WireDelta {
    TextDelta {
        text: String,
    },
    InputJsonDelta {
        partial_json: String,
    },
    ThinkingDelta {
        thinking: String,
    },
    SignatureDelta {
        signature: String,
    },
    /// `citations_delta` and future kinds.
    #[serde(other)]
    Other,
}

#[derive(Debug, Deserialize)]
struct WireMessageDelta {
    #[serde(default)]
    stop_reason: Option<String>,
}

/// Token counts. `message_start` has the input side, `message_delta` the output so far and, on
/// newer models, the input side again; every field present replaces the earlier value.
#[derive(Debug, Deserialize)]
struct WireUsage {
    #[serde(default)]
    input_tokens: Option<u64>,
    #[serde(default)]
    output_tokens: Option<u64>,
    #[serde(default)]
    cache_read_input_tokens: Option<u64>,
    #[serde(default)]
    cache_creation_input_tokens: Option<u64>,
}

/// What a content block index stands for.
#[derive(Debug, Clone, Copy)]
enum Block {
    /// Text or thinking: their deltas say which.
    Content,
    /// A client tool call, under our dense index.
    ToolUse { ours: usize },
    /// Server tools and their results, redacted thinking: their deltas are dropped.
    Ignored,
}

/// Turns stream events into [`ModelEvent`]s. Usage is held until the end, because `Finish`
/// must be last and `Usage` right before it.
pub(crate) struct EventDecoder {
    api_key: Option<String>,
    blocks: HashMap<u64, Block>,
    started_calls: usize,
    input_tokens: Option<u64>,
    output_tokens: Option<u64>,
    cache_read_tokens: Option<u64>,
    cache_write_tokens: Option<u64>,
    stop_reason: Option<String>,
    finished: bool,
}

impl EventDecoder {
    pub(crate) fn new(api_key: Option<String>) -> Self {
        EventDecoder {
            api_key,
            blocks: HashMap::new(),
            started_calls: 0,
            input_tokens: None,
            output_tokens: None,
            cache_read_tokens: None,
            cache_write_tokens: None,
            stop_reason: None,
            finished: false,
        }
    }

    /// Handles one SSE event. `Break` means the stream is over (`message_stop` or an error);
    /// what the caller should emit is in `out` either way.
    pub(crate) fn on_event(
        &mut self,
        event: &SseEvent,
        out: &mut VecDeque<Result<ModelEvent, ModelError>>,
    ) -> ControlFlow<()> {
        let data = event.data.trim();
        if data.is_empty() {
            return ControlFlow::Continue(());
        }
        // Read as a known event at once. An error (whose type reads as an unknown event), an
        // unknown event, and what is not an event are read again as any JSON to tell which.
        if event.event.as_deref() != Some("error") {
            match serde_json::from_str::<WireEvent>(data) {
                Ok(WireEvent::MessageStop) => {
                    self.finish(out);
                    return ControlFlow::Break(());
                }
                Ok(WireEvent::Other) | Err(_) => {}
                Ok(event) => {
                    self.on_wire_event(event, out);
                    return ControlFlow::Continue(());
                }
            }
        }
        let value: Value = match serde_json::from_str(data) {
            Ok(value) => value,
            Err(error) => {
                let message = format!("malformed event in model stream: {error}");
                out.push_back(Err(ModelError::new(ChatErrorKind::Provider, message)));
                return ControlFlow::Break(());
            }
        };
        if event.event.as_deref() == Some("error") || value.get("type").and_then(Value::as_str) == Some("error") {
            let error = stream_error(&value, self.api_key.as_deref());
            tracing::warn!(%error, "model stream reported an error");
            out.push_back(Err(error));
            return ControlFlow::Break(());
        }
        match serde_json::from_value::<WireEvent>(value) {
            Ok(WireEvent::MessageStop) => {
                self.finish(out);
                ControlFlow::Break(())
            }
            Ok(event) => {
                self.on_wire_event(event, out);
                ControlFlow::Continue(())
            }
            Err(error) => {
                let message = format!("unexpected event in model stream: {error}");
                out.push_back(Err(ModelError::new(ChatErrorKind::Provider, message)));
                ControlFlow::Break(())
            }
        }
    }

    fn on_wire_event(&mut self, event: WireEvent, out: &mut VecDeque<Result<ModelEvent, ModelError>>) {
        match event {
            WireEvent::MessageStart { message } => {
                if let Some(usage) = message.usage {
                    self.on_usage(usage);
                }
            }
            WireEvent::ContentBlockStart { index, content_block } => self.on_block_start(index, content_block, out),
            WireEvent::ContentBlockDelta { index, delta } => self.on_delta(index, delta, out),
            WireEvent::ContentBlockStop => {}
            WireEvent::MessageDelta { delta, usage } => {
                if let Some(reason) = delta.and_then(|d| d.stop_reason).filter(|r| !r.is_empty()) {
                    self.stop_reason = Some(reason);
                }
                if let Some(usage) = usage {
                    self.on_usage(usage);
                }
            }
            // `ping` and event types newer than this client.
            WireEvent::MessageStop | WireEvent::Other => {}
        }
    }

    fn on_usage(&mut self, usage: WireUsage) {
        let fields = [
            (&mut self.input_tokens, usage.input_tokens),
            (&mut self.output_tokens, usage.output_tokens),
            (&mut self.cache_read_tokens, usage.cache_read_input_tokens),
            (&mut self.cache_write_tokens, usage.cache_creation_input_tokens),
        ];
        for (field, value) in fields {
            if value.is_some() {
                *field = value;
            }
        }
    }

    fn on_block_start(&mut self, index: u64, block: WireBlock, out: &mut VecDeque<Result<ModelEvent, ModelError>>) {
        let state = match block {
            WireBlock::Text { text } => {
                if !text.is_empty() {
                    out.push_back(Ok(ModelEvent::TextDelta(text)));
                }
                Block::Content
            }
            WireBlock::Thinking { thinking, signature } => {
                if !thinking.is_empty() {
                    out.push_back(Ok(ModelEvent::ReasoningDelta { text: thinking, signature: None }));
                }
                if !signature.is_empty() {
                    out.push_back(Ok(ModelEvent::ReasoningDelta { text: String::new(), signature: Some(signature) }));
                }
                Block::Content
            }
            WireBlock::ToolUse { id, name, input } => {
                let ours = self.started_calls;
                self.started_calls += 1;
                out.push_back(Ok(ModelEvent::ToolCallStart { index: ours, call_id: id, name }));
                // Streamed calls start with `input: {}` and send the arguments as deltas; a
                // gateway that sends the whole input up front is taken at its word.
                if let Some(Value::Object(map)) = input
                    && !map.is_empty()
                {
                    let piece = Value::Object(map).to_string();
                    out.push_back(Ok(ModelEvent::ToolCallArgs { index: ours, piece }));
                }
                Block::ToolUse { ours }
            }
            WireBlock::Other => Block::Ignored,
        };
        self.blocks.insert(index, state);
    }

    fn on_delta(&mut self, index: u64, delta: WireDelta, out: &mut VecDeque<Result<ModelEvent, ModelError>>) {
        match (self.blocks.get(&index).copied(), delta) {
            (Some(Block::Ignored), _) => {}
            (Some(Block::ToolUse { ours }), WireDelta::InputJsonDelta { partial_json }) => {
                if !partial_json.is_empty() {
                    out.push_back(Ok(ModelEvent::ToolCallArgs { index: ours, piece: partial_json }));
                }
            }
            // Arguments of a block that never started have no call to belong to.
            (_, WireDelta::InputJsonDelta { .. }) => {
                tracing::warn!(index, "dropping tool arguments for a content block that is not a tool call");
            }
            // Text and reasoning are read by their delta type, so a block whose start was lost
            // (or came with another index) still reaches the user.
            (_, WireDelta::TextDelta { text }) => {
                if !text.is_empty() {
                    out.push_back(Ok(ModelEvent::TextDelta(text)));
                }
            }
            (_, WireDelta::ThinkingDelta { thinking }) => {
                if !thinking.is_empty() {
                    out.push_back(Ok(ModelEvent::ReasoningDelta { text: thinking, signature: None }));
                }
            }
            (_, WireDelta::SignatureDelta { signature }) => {
                if !signature.is_empty() {
                    out.push_back(Ok(ModelEvent::ReasoningDelta { text: String::new(), signature: Some(signature) }));
                }
            }
            (_, WireDelta::Other) => {}
        }
    }

    /// The body ended without `message_stop`. After the stop reason only the last event was
    /// lost; before it the answer is incomplete, and a retry is the way to get all of it.
    fn end_of_stream(&mut self, out: &mut VecDeque<Result<ModelEvent, ModelError>>) {
        if self.finished {
            return;
        }
        if self.stop_reason.is_some() {
            self.finish(out);
            return;
        }
        self.finished = true;
        tracing::warn!("model stream ended before message_stop");
        out.push_back(Err(ModelError::new(
            ChatErrorKind::Provider,
            "the model's stream ended before the answer was complete",
        )));
    }

    /// Ends the answer: `Usage` (when the server reported any), then `Finish`.
    fn finish(&mut self, out: &mut VecDeque<Result<ModelEvent, ModelError>>) {
        if std::mem::replace(&mut self.finished, true) {
            return;
        }
        let reported = [self.input_tokens, self.output_tokens, self.cache_read_tokens, self.cache_write_tokens];
        if reported.iter().any(Option::is_some) {
            let cache_read_tokens = self.cache_read_tokens.unwrap_or(0);
            let cache_write_tokens = self.cache_write_tokens.unwrap_or(0);
            out.push_back(Ok(ModelEvent::Usage(Usage {
                // Anthropic's `input_tokens` counts only what came after the last cache
                // breakpoint; the loop's input is the whole prompt.
                input_tokens: self.input_tokens.unwrap_or(0) + cache_read_tokens + cache_write_tokens,
                output_tokens: self.output_tokens.unwrap_or(0),
                cache_read_tokens,
                cache_write_tokens,
            })));
        }
        let reason = match self.stop_reason.as_deref() {
            Some("end_turn" | "stop_sequence") => StopReason::EndTurn,
            Some("tool_use") => StopReason::ToolUse,
            // The second is the answer running into the context window rather than max_tokens;
            // for the loop both mean "cut short".
            Some("max_tokens" | "model_context_window_exceeded") => StopReason::MaxTokens,
            Some("refusal") => StopReason::ContentFilter,
            // `pause_turn` (a server tool paused a long turn) and reasons newer than this client.
            Some(_) => StopReason::Other,
            None if self.started_calls > 0 => StopReason::ToolUse,
            None => StopReason::EndTurn,
        };
        out.push_back(Ok(ModelEvent::Finish(reason)));
    }
}

/// Maps an `error` event (`{"type":"error","error":{"type":"overloaded_error","message":…}}`).
/// Anthropic's error types say more than the generic mapping can guess from a code.
fn stream_error(value: &Value, api_key: Option<&str>) -> ModelError {
    let error = http::stream_error(value, api_key);
    let kind = match value.pointer("/error/type").and_then(Value::as_str) {
        Some("overloaded_error") => ChatErrorKind::Overloaded,
        Some("rate_limit_error") => ChatErrorKind::RateLimit,
        Some("api_error") => ChatErrorKind::Provider,
        Some("timeout_error") => ChatErrorKind::Timeout,
        Some("authentication_error" | "permission_error") => ChatErrorKind::Auth,
        Some("invalid_request_error") if error.kind == ChatErrorKind::ContextOverflow => ChatErrorKind::ContextOverflow,
        Some("invalid_request_error" | "not_found_error" | "request_too_large" | "billing_error") => {
            ChatErrorKind::Config
        }
        _ => return error,
    };
    ModelError::new(kind, error.message)
}
