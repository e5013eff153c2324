//! The OpenAI Chat Completions dialect, streamed: OpenAI itself and every server that copies it
//! (vLLM, Ollama, llama.cpp, OpenRouter, Vercel AI Gateway, Groq, DeepSeek, Anthropic's and
//! Gemini's compatibility endpoints).
//!
//! [`request_body`] turns the prompt into the JSON body; [`ChunkDecoder`] turns the streamed
//! `chat.completion.chunk`s into [`ModelEvent`]s. The decoder is deliberately lenient, because
//! the copies differ from OpenAI and from each other in small ways; each tolerance is commented
//! where it is handled.

use std::collections::{HashMap, VecDeque};

use agentplane_actors::ports::{
    ModelError, ModelEvent, ModelRequest, ModelStream, PromptMessage, StopReason, ToolSpec, Usage,
};
use agentplane_schema::api::ChatErrorKind;
use agentplane_schema::message::{Part, Role};
use futures::StreamExt;
use serde::Deserialize;
use serde_json::{Value, json};

use super::http;
use super::sse::{SseEvent, SseParser, SseStream};

/// Sends `request` and returns its answer as a stream. Errors up to and including the response
/// headers (connect failures, error statuses) come from the outer `Result`.
pub(crate) async fn stream(client: &reqwest::Client, request: ModelRequest) -> Result<ModelStream, ModelError> {
    let api_key = request.target.api_key.clone().filter(|key| !key.is_empty());
    let url = format!("{}/chat/completions", request.target.base_url.trim_end_matches('/'));
    let body = request_body(&request);

    let mut builder = client.post(&url).header(reqwest::header::ACCEPT, "text/event-stream").json(&body);
    if let Some(key) = &api_key {
        builder = builder.bearer_auth(key);
    }
    let response = builder.send().await.map_err(|e| http::transport_error(e, api_key.as_deref()))?;

    let status = response.status();
    if !status.is_success() {
        let headers = response.headers().clone();
        let body = http::read_error_body(response).await;
        let error = http::status_error(status, &headers, &body, api_key.as_deref());
        tracing::warn!(
            model = %request.target.model,
            status = status.as_u16(),
            kind = ?error.kind,
            "model call failed"
        );
        return Err(error);
    }

    // Some compatible servers ignore `stream: true` and answer with one JSON completion.
    let is_json = response
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim_start().starts_with("application/json"));
    if is_json {
        return Ok(whole_completion(response, api_key).await);
    }

    let state = StreamState {
        events: SseStream::new(response.bytes_stream().boxed()),
        decoder: ChunkDecoder::new(api_key),
        pending: VecDeque::new(),
        done: false,
    };
    Ok(futures::stream::unfold(state, StreamState::next).boxed())
}

// ---------------------------------------------------------------------------------------------
// Request

/// The Chat Completions body for `request`.
pub(crate) fn request_body(request: &ModelRequest) -> Value {
    let mut messages = Vec::with_capacity(request.messages.len() + 1);
    if !request.system.is_empty() {
        messages.push(json!({"role": "system", "content": request.system}));
    }
    for message in &request.messages {
        push_message(&mut messages, message);
    }

    let mut body = json!({
        "model": request.target.model,
        "stream": true,
        "stream_options": {"include_usage": true},
        "messages": messages,
    });
    // An empty `tools` array is rejected by several servers, so the key is left out instead.
    if !request.tools.is_empty() {
        body["tools"] = request.tools.iter().map(tool_definition).collect();
    }
    if let Some(max) = request.target.max_output_tokens.filter(|m| *m > 0) {
        body["max_tokens"] = json!(max);
    }
    body
}

fn push_message(out: &mut Vec<Value>, message: &PromptMessage) {
    match message.role {
        // The loop turns summaries into user messages and drops markers before a prompt is built;
        // should one arrive anyway, a summary reads as user context and a marker is not sent.
        Role::User | Role::Summary => out.push(json!({"role": "user", "content": user_content(&message.parts)})),
        Role::Marker => {}
        Role::Assistant => {
            let text: String = message
                .parts
                .iter()
                .filter_map(|p| match p {
                    Part::Text { text } => Some(text.as_str()),
                    _ => None,
                })
                .collect();
            let tool_calls: Vec<Value> = message
                .parts
                .iter()
                .filter_map(|p| match p {
                    Part::ToolCall { call_id, name, args } => Some(json!({
                        "id": call_id,
                        "type": "function",
                        "function": {"name": name, "arguments": arguments_string(args)},
                    })),
                    _ => None,
                })
                .collect();
            // Reasoning is not sent back: the dialect has no field for it. An answer that was
            // only reasoning (say, interrupted early) leaves nothing to send, and OpenAI rejects
            // an assistant message with neither content nor tool calls, so it is dropped.
            if text.is_empty() && tool_calls.is_empty() {
                return;
            }
            let mut value = json!({
                "role": "assistant",
                "content": if text.is_empty() { Value::Null } else { Value::String(text) },
            });
            if !tool_calls.is_empty() {
                value["tool_calls"] = Value::Array(tool_calls);
            }
            out.push(value);
        }
        // The dialect has no is_error flag; the result text itself says what went wrong.
        Role::Tool => out.extend(message.parts.iter().filter_map(|p| match p {
            Part::ToolResult { call_id, result, .. } => {
                Some(json!({"role": "tool", "tool_call_id": call_id, "content": result}))
            }
            _ => None,
        })),
    }
}

/// A plain string for text-only messages, which every compatible server accepts; the array form
/// only when there is an image.
fn user_content(parts: &[Part]) -> Value {
    let has_image = parts.iter().any(|p| matches!(p, Part::Image { .. }));
    if !has_image {
        let texts: Vec<&str> = parts
            .iter()
            .filter_map(|p| match p {
                Part::Text { text } => Some(text.as_str()),
                _ => None,
            })
            .collect();
        return Value::String(texts.join("\n"));
    }
    parts
        .iter()
        .filter_map(|p| match p {
            Part::Text { text } => Some(json!({"type": "text", "text": text})),
            // An image part only names a stored file; its bytes (sent as an `image_url` data
            // URL) arrive with the images feature. Until then the model is told an image was
            // attached rather than silently seeing nothing.
            Part::Image { file_id } => Some(json!({"type": "text", "text": format!("[image {file_id}]")})),
            _ => None,
        })
        .collect()
}

/// Arguments go over the wire as a JSON string. Arguments the model produced as invalid JSON are
/// kept as a string value; those are sent back verbatim rather than quoted a second time.
fn arguments_string(args: &Value) -> String {
    match args {
        Value::String(raw) => raw.clone(),
        other => other.to_string(),
    }
}

fn tool_definition(tool: &ToolSpec) -> Value {
    json!({
        "type": "function",
        "function": {
            "name": tool.name,
            "description": tool.description,
            "parameters": tool.parameters,
        },
    })
}

// ---------------------------------------------------------------------------------------------
// Response

struct StreamState {
    events: SseStream<futures::stream::BoxStream<'static, reqwest::Result<bytes::Bytes>>>,
    decoder: ChunkDecoder,
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
            match self.events.next().await {
                Some(Ok(event)) => self.done = self.decoder.on_event(&event, &mut self.pending).is_break(),
                Some(Err(error)) => {
                    self.done = true;
                    if self.decoder.finish_reason.is_some() {
                        // The answer was complete; only the trailing usage chunk or `[DONE]` was
                        // lost. Retrying would pay for the whole answer again.
                        let error = error.without_url();
                        tracing::warn!(%error, "model stream cut after its finish reason");
                        self.decoder.finish(&mut self.pending);
                    } else {
                        let error = http::transport_error(error, self.decoder.api_key.as_deref());
                        tracing::warn!(%error, "model stream failed");
                        self.pending.push_back(Err(error));
                    }
                }
                None => {
                    // No `[DONE]`: Anthropic's and some local servers' streams just end.
                    self.done = true;
                    self.decoder.finish(&mut self.pending);
                }
            }
        }
    }
}

/// A server that ignored `stream: true`: its one `chat.completion` is replayed through the same
/// decoder, its `message` standing in for a delta. Proxies that label an event stream
/// `application/json` exist too, so a body that is not a JSON object is read as SSE.
async fn whole_completion(response: reqwest::Response, api_key: Option<String>) -> ModelStream {
    let body = match response.bytes().await {
        Ok(body) => body,
        Err(error) => {
            let error = http::transport_error(error, api_key.as_deref());
            return futures::stream::iter([Err(error)]).boxed();
        }
    };
    let events = if body.trim_ascii_start().starts_with(b"{") {
        let data = String::from_utf8_lossy(&body).into_owned();
        vec![SseEvent { event: None, data }]
    } else {
        let mut parser = SseParser::new();
        parser.push(&body);
        std::iter::from_fn(|| parser.finish()).collect()
    };
    let mut decoder = ChunkDecoder::new(api_key);
    let mut out = VecDeque::new();
    for event in &events {
        if decoder.on_event(event, &mut out).is_break() {
            return futures::stream::iter(out).boxed();
        }
    }
    decoder.finish(&mut out);
    futures::stream::iter(out).boxed()
}

/// One `chat.completion.chunk`, with every field optional: compatible servers leave out or null
/// whatever they do not support.
#[derive(Debug, Deserialize)]
struct Chunk {
    #[serde(default)]
    choices: Option<Vec<Choice>>,
    #[serde(default)]
    usage: Option<WireUsage>,
}

#[derive(Debug, Deserialize)]
struct Choice {
    #[serde(default)]
    index: Option<u64>,
    #[serde(default)]
    delta: Option<Delta>,
    /// Non-streamed completions carry `message` instead of `delta`.
    #[serde(default)]
    message: Option<Delta>,
    #[serde(default)]
    finish_reason: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Delta {
    /// A string, or (Mistral) an array of typed parts.
    #[serde(default)]
    content: Option<Value>,
    /// DeepSeek, vLLM and llama.cpp name it `reasoning_content`; OpenRouter and Ollama `reasoning`.
    #[serde(default)]
    reasoning_content: Option<Value>,
    #[serde(default)]
    reasoning: Option<Value>,
    #[serde(default)]
    refusal: Option<String>,
    #[serde(default)]
    tool_calls: Option<Vec<WireToolCall>>,
}

#[derive(Debug, Deserialize)]
struct WireToolCall {
    #[serde(default)]
    index: Option<u64>,
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    function: Option<WireFunction>,
}

#[derive(Debug, Deserialize)]
struct WireFunction {
    #[serde(default)]
    name: Option<String>,
    /// A JSON string per the spec; some servers send the arguments object itself.
    #[serde(default)]
    arguments: Option<Value>,
}

#[derive(Debug, Deserialize)]
struct WireUsage {
    #[serde(default)]
    prompt_tokens: Option<u64>,
    #[serde(default)]
    completion_tokens: Option<u64>,
    #[serde(default)]
    prompt_tokens_details: Option<PromptTokensDetails>,
    /// DeepSeek reports cache hits here instead of in `prompt_tokens_details`.
    #[serde(default)]
    prompt_cache_hit_tokens: Option<u64>,
}

#[derive(Debug, Deserialize)]
struct PromptTokensDetails {
    #[serde(default)]
    cached_tokens: Option<u64>,
    /// OpenRouter, for models with explicit cache writes.
    #[serde(default)]
    cache_write_tokens: Option<u64>,
}

/// A tool call being assembled. Calls are numbered densely in the order they start, whatever
/// `index` the server used (Anthropic's compatibility layer starts at 1).
#[derive(Debug, Default)]
struct CallSlot {
    id: Option<String>,
    name: Option<String>,
    /// Our index, once `ToolCallStart` went out.
    started: Option<usize>,
    /// Argument pieces that came before the id and name.
    pending_args: String,
}

/// Turns chunks into events. Usage and the finish reason are held until the stream ends,
/// because the usage chunk comes after the finish reason and `Finish` must be last.
pub(crate) struct ChunkDecoder {
    api_key: Option<String>,
    slots: Vec<CallSlot>,
    /// The server's tool-call `index` → position in `slots`.
    slot_by_index: HashMap<u64, usize>,
    started_calls: usize,
    usage: Option<Usage>,
    finish_reason: Option<String>,
    finished: bool,
}

impl ChunkDecoder {
    pub(crate) fn new(api_key: Option<String>) -> Self {
        ChunkDecoder {
            api_key,
            slots: Vec::new(),
            slot_by_index: HashMap::new(),
            started_calls: 0,
            usage: None,
            finish_reason: None,
            finished: false,
        }
    }

    /// Handles one SSE event. `Break` means the stream is over (`[DONE]` or an error); what the
    /// caller should emit is in `out` either way.
    pub(crate) fn on_event(
        &mut self,
        event: &SseEvent,
        out: &mut VecDeque<Result<ModelEvent, ModelError>>,
    ) -> std::ops::ControlFlow<()> {
        use std::ops::ControlFlow::{Break, Continue};

        let data = event.data.trim();
        if data == "[DONE]" {
            self.finish(out);
            return Break(());
        }
        if data.is_empty() {
            return Continue(());
        }
        let value: Value = match serde_json::from_str(data) {
            Ok(value) => value,
            // A keep-alive some proxies send as data; nothing to decode.
            Err(_) if !data.starts_with('{') && !data.starts_with('[') => {
                tracing::debug!("ignoring non-JSON data line in model stream");
                return Continue(());
            }
            Err(error) => {
                let message = format!("malformed chunk in model stream: {error}");
                out.push_back(Err(ModelError::new(ChatErrorKind::Provider, message)));
                return Break(());
            }
        };
        let is_error_event = event.event.as_deref() == Some("error");
        if is_error_event || value.get("error").is_some_and(|e| !e.is_null()) {
            let error = http::stream_error(&value, self.api_key.as_deref());
            tracing::warn!(%error, "model stream reported an error");
            out.push_back(Err(error));
            return Break(());
        }
        let chunk: Chunk = match serde_json::from_value(value) {
            Ok(chunk) => chunk,
            Err(error) => {
                let message = format!("unexpected chunk in model stream: {error}");
                out.push_back(Err(ModelError::new(ChatErrorKind::Provider, message)));
                return Break(());
            }
        };
        self.on_chunk(chunk, out);
        Continue(())
    }

    fn on_chunk(&mut self, chunk: Chunk, out: &mut VecDeque<Result<ModelEvent, ModelError>>) {
        if let Some(usage) = chunk.usage {
            // Some servers repeat a running total on every chunk; the last one wins.
            let details = usage.prompt_tokens_details.as_ref();
            self.usage = Some(Usage {
                input_tokens: usage.prompt_tokens.unwrap_or(0),
                output_tokens: usage.completion_tokens.unwrap_or(0),
                cache_read_tokens: details.and_then(|d| d.cached_tokens).or(usage.prompt_cache_hit_tokens).unwrap_or(0),
                cache_write_tokens: details.and_then(|d| d.cache_write_tokens).unwrap_or(0),
            });
        }
        // With `n > 1` choices interleave; the loop wants one answer, so only choice 0 is read.
        // A missing index is taken as 0 (single-choice servers that omit it).
        let Some(choice) = chunk.choices.into_iter().flatten().find(|c| c.index.unwrap_or(0) == 0) else {
            return;
        };
        if let Some(delta) = choice.delta.or(choice.message) {
            self.on_delta(delta, out);
        }
        if let Some(reason) = choice.finish_reason.filter(|r| !r.is_empty()) {
            self.finish_reason = Some(reason);
        }
    }

    fn on_delta(&mut self, delta: Delta, out: &mut VecDeque<Result<ModelEvent, ModelError>>) {
        // Servers moving from one name to the other send both with the same text; one is read.
        let reasoning = [delta.reasoning_content, delta.reasoning].into_iter().flatten().find_map(|r| match r {
            Value::String(text) if !text.is_empty() => Some(text),
            _ => None,
        });
        if let Some(text) = reasoning {
            out.push_back(Ok(ModelEvent::ReasoningDelta { text, signature: None }));
        }
        if let Some(content) = delta.content {
            for text in content_texts(content) {
                out.push_back(Ok(ModelEvent::TextDelta(text)));
            }
        }
        // A refusal is the model's answer to the user, just in another field.
        if let Some(refusal) = delta.refusal.filter(|r| !r.is_empty()) {
            out.push_back(Ok(ModelEvent::TextDelta(refusal)));
        }
        for (position, call) in delta.tool_calls.into_iter().flatten().enumerate() {
            self.on_tool_call(call, position, out);
        }
    }

    fn on_tool_call(
        &mut self,
        call: WireToolCall,
        position: usize,
        out: &mut VecDeque<Result<ModelEvent, ModelError>>,
    ) {
        let id = call.id.filter(|id| !id.is_empty());
        // Without an index (a non-streamed message, or a server that omits it) the position in
        // this delta's list stands in, which is right for whole calls.
        let index = call.index.unwrap_or(position as u64);
        let slot = match self.slot_by_index.get(&index).copied() {
            // Some servers number every call 0; a new id under a used index is a new call. The
            // same id again (vLLM repeats it) is the same call.
            Some(slot) if id.is_some() && self.slots[slot].id.is_some() && self.slots[slot].id != id => {
                self.new_slot(index)
            }
            Some(slot) => slot,
            None => self.new_slot(index),
        };
        let (name, arguments) = match call.function {
            Some(function) => (function.name, function.arguments),
            None => (None, None),
        };
        let piece = match arguments {
            Some(Value::String(piece)) => piece,
            Some(Value::Null) | None => String::new(),
            Some(object) => object.to_string(),
        };

        let state = &mut self.slots[slot];
        if state.id.is_none() {
            state.id = id;
        }
        if state.name.is_none() {
            state.name = name.filter(|n| !n.is_empty());
        }
        match state.started {
            Some(ours) => {
                if !piece.is_empty() {
                    out.push_back(Ok(ModelEvent::ToolCallArgs { index: ours, piece }));
                }
            }
            None => {
                state.pending_args.push_str(&piece);
                if state.id.is_some() && state.name.is_some() {
                    self.start_call(slot, out);
                }
            }
        }
    }

    fn new_slot(&mut self, index: u64) -> usize {
        self.slots.push(CallSlot::default());
        let slot = self.slots.len() - 1;
        self.slot_by_index.insert(index, slot);
        slot
    }

    fn start_call(&mut self, slot: usize, out: &mut VecDeque<Result<ModelEvent, ModelError>>) {
        let ours = self.started_calls;
        let state = &mut self.slots[slot];
        let call_id = match state.id.clone() {
            Some(id) => id,
            // Only reached at the end of a stream whose server never sent an id; the loop needs
            // one to pair the result with the call.
            None => format!("call_{ours}"),
        };
        let name = state.name.clone().unwrap_or_default();
        state.started = Some(ours);
        self.started_calls += 1;
        out.push_back(Ok(ModelEvent::ToolCallStart { index: ours, call_id, name }));
        let pending = std::mem::take(&mut state.pending_args);
        if !pending.is_empty() {
            out.push_back(Ok(ModelEvent::ToolCallArgs { index: ours, piece: pending }));
        }
    }

    /// Ends the answer: starts calls still waiting for an id, then `Usage`, then `Finish`.
    pub(crate) fn finish(&mut self, out: &mut VecDeque<Result<ModelEvent, ModelError>>) {
        if std::mem::replace(&mut self.finished, true) {
            return;
        }
        for slot in 0..self.slots.len() {
            let state = &self.slots[slot];
            if state.started.is_some() {
                continue;
            }
            if state.name.is_some() {
                self.start_call(slot, out);
            } else {
                tracing::warn!("dropping a streamed tool call that never got a name");
            }
        }
        if let Some(usage) = self.usage {
            out.push_back(Ok(ModelEvent::Usage(usage)));
        }
        let saw_calls = self.started_calls > 0;
        let reason = match self.finish_reason.as_deref() {
            Some("tool_calls" | "function_call") => StopReason::ToolUse,
            // Gemini's and Ollama's compatibility layers say "stop" after tool calls; the calls
            // still have to run.
            Some("stop") if saw_calls => StopReason::ToolUse,
            Some("stop") => StopReason::EndTurn,
            Some("length") => StopReason::MaxTokens,
            Some("content_filter") => StopReason::ContentFilter,
            Some(_) => StopReason::Other,
            None if saw_calls => StopReason::ToolUse,
            None => StopReason::EndTurn,
        };
        out.push_back(Ok(ModelEvent::Finish(reason)));
    }
}

/// Text of a `content` delta: a string, or the `text` parts of an array.
fn content_texts(content: Value) -> Vec<String> {
    match content {
        Value::String(text) if !text.is_empty() => vec![text],
        Value::Array(parts) => parts
            .into_iter()
            .filter(|p| p.get("type").and_then(Value::as_str).is_none_or(|t| t == "text"))
            .filter_map(|p| match p.get("text") {
                Some(Value::String(text)) if !text.is_empty() => Some(text.clone()),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    }
}
