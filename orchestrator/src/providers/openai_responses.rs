//! The OpenAI Responses API dialect, streamed: `POST {base}/responses` on OpenAI and
//! `POST {base}/openai/v1/responses` on Azure OpenAI (chosen per model with
//! `settings.api = "responses"`).
//!
//! Calls are stateless: `store: false`, and every request carries the whole conversation as
//! input items. Reasoning models think in items that must be sent back on the next call; without
//! a stored response they travel as `encrypted_content`, which is kept as the reasoning part's
//! signature.
//!
//! [`request_body`] turns the prompt into input items; [`EventDecoder`] turns the typed
//! `response.*` events into [`ModelEvent`]s.

use std::collections::{HashSet, VecDeque};
use std::ops::ControlFlow;

use agentplane_actors::ports::{
    ModelError, ModelEvent, ModelRequest, ModelStream, ModelTarget, PromptMessage, StopReason, ToolSpec, Usage,
};
use agentplane_schema::api::ChatErrorKind;
use agentplane_schema::message::{Part, Role};
use futures::StreamExt;
use serde_json::{Value, json};

use super::fragments;
use super::http;
use super::openai_compat::{Api, Endpoint, Endpoints, image_data_url, setting};
use super::sse::{self, SseEvent};

/// Sends `request` and returns its answer as a stream. Errors up to and including the response
/// headers (bad settings, connect failures, error statuses) come from the outer `Result`.
pub(crate) async fn stream(
    client: &reqwest::Client,
    endpoints: &Endpoints,
    request: ModelRequest,
) -> Result<ModelStream, ModelError> {
    let endpoint = endpoints.get(&request.target, Api::Responses)?;
    let body = request_body(&request, &endpoint)?;
    let response = endpoint.send(client, body).await?;
    Ok(sse::decode_stream(response.bytes_stream().boxed(), EventDecoder::new(endpoint.api_key.clone())))
}

/// Decodes a whole recorded Responses API body (SSE) without HTTP: the same events the stream
/// would yield. For tests and the decoder benchmark.
pub(crate) fn decode_body(body: &[u8]) -> Vec<Result<ModelEvent, ModelError>> {
    sse::decode_sse_body(body, EventDecoder::new(None))
}

// ---------------------------------------------------------------------------------------------
// Request

/// The name under which a conversation's [`SentPrefix`](fragments::SentPrefix) holds what this dialect wrote.
const KEPT_AS: &str = "openai_responses";

/// The Responses API body for `request`, sent to `endpoint`, as bytes. Each history message's
/// input items come from the conversation's [`SentPrefix`](fragments::SentPrefix) as written for an earlier step, or
/// are written now and kept there.
pub(crate) fn request_body(request: &ModelRequest, endpoint: &Endpoint) -> Result<Vec<u8>, ModelError> {
    let mut body = json!({
        "model": endpoint.model,
        "stream": true,
        // Nothing is kept at the provider: each call carries the whole conversation, so a chat
        // does not depend on OpenAI's retention or on which replica made the last call.
        "store": false,
    });
    if !request.system.is_empty() {
        body["instructions"] = json!(request.system);
    }
    if !request.tools.is_empty() {
        body["tools"] = request.tools.iter().map(tool_definition).collect();
    }
    if let Some(max) = request.target.max_output_tokens.filter(|m| *m > 0) {
        body["max_output_tokens"] = json!(max);
    }
    if reasons(&request.target)? {
        // Without a stored response, a reasoning item can only be sent back in encrypted form.
        body["include"] = json!(["reasoning.encrypted_content"]);
        let mut reasoning = serde_json::Map::new();
        if let Some(effort) = setting(&request.target, "reasoning_effort")? {
            reasoning.insert("effort".to_owned(), json!(effort));
        }
        if let Some(summary) = setting(&request.target, "reasoning_summary")? {
            reasoning.insert("summary".to_owned(), json!(summary));
        }
        if !reasoning.is_empty() {
            body["reasoning"] = Value::Object(reasoning);
        }
    }
    let write = |message: &PromptMessage| {
        let mut items = Vec::new();
        push_items(&mut items, message, request)?;
        fragments::raw_all(&items)
    };
    fragments::with_message_pieces(request, KEPT_AS, write, |pieces| {
        fragments::object_with_array_first("input", pieces.size(), &body, |out| pieces.push_all(out))
    })
}

/// Whether the model is a reasoning model. OpenAI rejects `include: ["reasoning.encrypted_content"]`
/// for the others ("Encrypted content is not supported with this model"), so it is only asked of
/// these: `settings.reasoning` when set, else the o-series, gpt-5 and codex families by name
/// (their `-chat` variants do not reason).
fn reasons(target: &ModelTarget) -> Result<bool, ModelError> {
    match target.settings.get("reasoning") {
        None | Some(Value::Null) => {}
        Some(Value::Bool(on)) => return Ok(*on),
        Some(other) => {
            let message = format!("settings.reasoning must be true or false, not {other}");
            return Err(ModelError::new(ChatErrorKind::Config, message));
        }
    }
    let name = target.model.rsplit('/').next().unwrap_or(&target.model).to_ascii_lowercase();
    let family = ["o1", "o3", "o4", "gpt-5", "codex"].iter().any(|prefix| name.starts_with(prefix));
    Ok(family && !name.contains("chat"))
}

fn push_items(out: &mut Vec<Value>, message: &PromptMessage, request: &ModelRequest) -> Result<(), ModelError> {
    match message.role {
        // The loop turns summaries into user messages and drops markers before a prompt is built;
        // should one arrive anyway, a summary reads as user context and a marker is not sent.
        Role::User | Role::Summary => {
            let mut content = Vec::with_capacity(message.parts.len());
            for part in message.parts.iter() {
                match part {
                    Part::Text { text } => content.push(json!({"type": "input_text", "text": text})),
                    Part::Image { file_id } => {
                        content.push(json!({"type": "input_image", "image_url": image_data_url(request, file_id)?}));
                    }
                    _ => {}
                }
            }
            if !content.is_empty() {
                out.push(json!({"role": "user", "content": content}));
            }
        }
        Role::Marker => {}
        // Output items in the order the model produced them: reasoning, text, calls.
        Role::Assistant => {
            // OpenAI rejects a reasoning item that nothing follows, as an answer interrupted
            // after its reasoning would leave it.
            let answered = message.parts.iter().any(|p| match p {
                Part::Text { text } => !text.is_empty(),
                Part::ToolCall { .. } => true,
                _ => false,
            });
            for part in message.parts.iter() {
                match part {
                    // Reasoning without encrypted content (another provider's, or one cut off
                    // before its item ended) cannot be sent back.
                    Part::Reasoning { text, signature: Some(encrypted) } if answered && !encrypted.is_empty() => {
                        let summary: Vec<Value> = if text.is_empty() {
                            Vec::new()
                        } else {
                            vec![json!({"type": "summary_text", "text": text})]
                        };
                        out.push(json!({"type": "reasoning", "summary": summary, "encrypted_content": encrypted}));
                    }
                    Part::Text { text } if !text.is_empty() => out.push(json!({
                        "type": "message",
                        "role": "assistant",
                        "content": [{"type": "output_text", "text": text}],
                    })),
                    Part::ToolCall { call_id, name, args } => out.push(json!({
                        "type": "function_call",
                        "call_id": call_id,
                        "name": name,
                        "arguments": arguments_string(args),
                    })),
                    _ => {}
                }
            }
        }
        // The dialect has no error flag on a function's output; the result text says what went
        // wrong.
        Role::Tool => {
            for part in message.parts.iter() {
                if let Part::ToolResult { call_id, result, .. } = part {
                    out.push(json!({"type": "function_call_output", "call_id": call_id, "output": result}));
                }
            }
        }
    }
    Ok(())
}

/// Arguments go over the wire as a JSON string. Arguments the model produced as invalid JSON are
/// kept as a string value; those are sent back verbatim rather than quoted a second time.
fn arguments_string(args: &Value) -> String {
    match args {
        Value::String(raw) => raw.clone(),
        other => other.to_string(),
    }
}

/// Non-strict: strict mode would require every property to be listed in `required` and
/// `additionalProperties: false`, which the tools' schemas do not promise.
fn tool_definition(tool: &ToolSpec) -> Value {
    json!({
        "type": "function",
        "name": tool.name,
        "description": tool.description,
        "parameters": tool.parameters,
        "strict": false,
    })
}

// ---------------------------------------------------------------------------------------------
// Response

impl sse::SseDecoder for EventDecoder {
    fn on_event(&mut self, event: &SseEvent, out: &mut VecDeque<Result<ModelEvent, ModelError>>) -> ControlFlow<()> {
        EventDecoder::on_event(self, event, out)
    }

    fn end_of_body(&mut self, out: &mut VecDeque<Result<ModelEvent, ModelError>>) {
        EventDecoder::end_of_body(self, out);
    }

    /// The terminal event ends the stream before any later failure is read, so a failure always
    /// means an unfinished answer.
    fn answer_complete(&self) -> bool {
        false
    }

    fn api_key(&self) -> Option<&str> {
        self.api_key.as_deref()
    }
}

/// A function call being streamed, known by its output item.
#[derive(Debug)]
struct CallItem {
    item_id: Option<String>,
    output_index: Option<u64>,
    /// Our dense index.
    index: usize,
    /// Argument pieces went out for it.
    has_args: bool,
}

/// Turns `response.*` events into events. The answer ends with `response.completed` (or
/// `.incomplete`), which carries the usage; a failure ends it with `response.failed` or `error`.
pub(crate) struct EventDecoder {
    api_key: Option<String>,
    calls: Vec<CallItem>,
    /// Output items whose text, summary or arguments arrived as deltas; their `.done` events
    /// then add nothing.
    streamed: HashSet<String>,
    /// Some text already went out, so the next message item starts after a blank line.
    text_emitted: bool,
    text_separator: bool,
    /// The reasoning part being streamed (item id, summary index), so that separate summary
    /// parts and items read as paragraphs.
    reasoning_part: Option<(String, u64)>,
    finished: bool,
}

impl EventDecoder {
    pub(crate) fn new(api_key: Option<String>) -> Self {
        EventDecoder {
            api_key,
            calls: Vec::new(),
            streamed: HashSet::new(),
            text_emitted: false,
            text_separator: false,
            reasoning_part: None,
            finished: false,
        }
    }

    /// Handles one SSE event. `Break` means the stream is over (a terminal event or an error);
    /// what the caller should emit is in `out` either way.
    pub(crate) fn on_event(
        &mut self,
        event: &SseEvent,
        out: &mut VecDeque<Result<ModelEvent, ModelError>>,
    ) -> ControlFlow<()> {
        let data = event.data.trim();
        if data.is_empty() || data == "[DONE]" {
            return ControlFlow::Continue(());
        }
        let value: Value = match serde_json::from_str(data) {
            Ok(value) => value,
            Err(_) if !data.starts_with('{') => {
                tracing::debug!("ignoring non-JSON data line in model stream");
                return ControlFlow::Continue(());
            }
            Err(error) => {
                let message = format!("malformed event in model stream: {error}");
                out.push_back(Err(ModelError::new(ChatErrorKind::Provider, message)));
                return ControlFlow::Break(());
            }
        };
        // The JSON names its type; the SSE `event:` line repeats it and stands in when a proxy
        // drops the field.
        let kind = value.get("type").and_then(Value::as_str).or(event.event.as_deref()).unwrap_or_default();
        match kind {
            "response.output_item.added" => self.on_item_added(&value, out),
            "response.output_text.delta" | "response.refusal.delta" => {
                if let Some(delta) = str_field(&value, "delta").filter(|d| !d.is_empty()) {
                    self.mark_streamed(&value);
                    self.push_text(delta, out);
                }
            }
            "response.reasoning_summary_text.delta" | "response.reasoning_text.delta" => {
                if let Some(delta) = str_field(&value, "delta").filter(|d| !d.is_empty()) {
                    self.mark_streamed(&value);
                    let item = str_field(&value, "item_id").unwrap_or_default();
                    let part = value.get("summary_index").or_else(|| value.get("content_index"));
                    self.push_reasoning(item, part.and_then(Value::as_u64).unwrap_or(0), delta, out);
                }
            }
            "response.function_call_arguments.delta" => {
                if let Some(delta) = str_field(&value, "delta").filter(|d| !d.is_empty()) {
                    self.on_arguments(&value, delta, out);
                }
            }
            "response.function_call_arguments.done" => {
                // A server that did not stream the arguments still sends them whole here.
                if let Some(arguments) = str_field(&value, "arguments").filter(|a| !a.is_empty())
                    && let Some(call) = self.find_call(&value)
                    && !self.calls[call].has_args
                {
                    self.calls[call].has_args = true;
                    out.push_back(Ok(ModelEvent::ToolCallArgs { index: self.calls[call].index, piece: arguments }));
                }
            }
            "response.output_item.done" => self.on_item_done(&value, out),
            "response.completed" | "response.incomplete" => {
                let response = value.get("response").unwrap_or(&Value::Null);
                self.finish(response, out);
                return ControlFlow::Break(());
            }
            "response.failed" => {
                let error = match value.pointer("/response/error").filter(|e| !e.is_null()) {
                    Some(error) => http::stream_error(&json!({"error": error}), self.api_key.as_deref()),
                    None => ModelError::new(ChatErrorKind::Provider, "the provider reported the response as failed"),
                };
                tracing::warn!(%error, "model stream reported a failure");
                out.push_back(Err(error));
                return ControlFlow::Break(());
            }
            // `{type: "error", code, message}` as documented, or the error nested under `error`
            // as OpenAI also sends it.
            "error" => {
                let error = http::stream_error(&value, self.api_key.as_deref());
                tracing::warn!(%error, "model stream reported an error");
                out.push_back(Err(error));
                return ControlFlow::Break(());
            }
            // Lifecycle and `.done` events whose content already came as deltas, and output of
            // built-in tools the request never enables.
            _ => {}
        }
        ControlFlow::Continue(())
    }

    fn on_item_added(&mut self, value: &Value, out: &mut VecDeque<Result<ModelEvent, ModelError>>) {
        let Some(item) = value.get("item") else {
            return;
        };
        match str_field(item, "type").as_deref() {
            Some("function_call") => {
                let call = self.start_call(value, item, out);
                // Some servers put the arguments on the item right away.
                if let Some(arguments) = str_field(item, "arguments").filter(|a| !a.is_empty()) {
                    self.calls[call].has_args = true;
                    out.push_back(Ok(ModelEvent::ToolCallArgs { index: self.calls[call].index, piece: arguments }));
                }
            }
            // A second message (the commentary and final-answer phases of codex models) reads as
            // a new paragraph of the one answer.
            Some("message") if self.text_emitted => self.text_separator = true,
            _ => {}
        }
    }

    fn on_item_done(&mut self, value: &Value, out: &mut VecDeque<Result<ModelEvent, ModelError>>) {
        let Some(item) = value.get("item") else {
            return;
        };
        let streamed = str_field(item, "id").is_some_and(|id| self.streamed.contains(&id));
        match str_field(item, "type").as_deref() {
            Some("function_call") => {
                let call = match self.find_call(value) {
                    Some(call) => call,
                    // A call whose `added` event never came (or was lost by a proxy).
                    None => self.start_call(value, item, out),
                };
                if let Some(arguments) = str_field(item, "arguments").filter(|a| !a.is_empty())
                    && !self.calls[call].has_args
                {
                    self.calls[call].has_args = true;
                    out.push_back(Ok(ModelEvent::ToolCallArgs { index: self.calls[call].index, piece: arguments }));
                }
            }
            Some("message") if !streamed => {
                // A server that sent the message only whole.
                let parts = item.get("content").and_then(Value::as_array).into_iter().flatten();
                let text: String =
                    parts.filter_map(|p| str_field(p, "text").or_else(|| str_field(p, "refusal"))).collect();
                if !text.is_empty() {
                    self.push_text(text, out);
                }
            }
            Some("reasoning") => {
                let id = str_field(item, "id").unwrap_or_default();
                if !streamed {
                    let summaries = item.get("summary").and_then(Value::as_array).into_iter().flatten();
                    for (n, summary) in summaries.enumerate() {
                        if let Some(text) = str_field(summary, "text").filter(|t| !t.is_empty()) {
                            self.push_reasoning(id.clone(), n as u64, text, out);
                        }
                    }
                }
                // Only the finished item carries the whole encrypted content.
                if let Some(encrypted) = str_field(item, "encrypted_content").filter(|e| !e.is_empty()) {
                    out.push_back(Ok(ModelEvent::ReasoningDelta { text: String::new(), signature: Some(encrypted) }));
                }
            }
            _ => {}
        }
    }

    fn on_arguments(&mut self, value: &Value, delta: String, out: &mut VecDeque<Result<ModelEvent, ModelError>>) {
        let Some(call) = self.find_call(value) else {
            tracing::warn!("dropping arguments of a function call that was never announced");
            return;
        };
        self.calls[call].has_args = true;
        out.push_back(Ok(ModelEvent::ToolCallArgs { index: self.calls[call].index, piece: delta }));
    }

    fn start_call(&mut self, value: &Value, item: &Value, out: &mut VecDeque<Result<ModelEvent, ModelError>>) -> usize {
        let index = self.calls.len();
        let item_id = str_field(item, "id");
        // The loop pairs results with calls by `call_id`; the item id is the only other handle.
        let call_id = str_field(item, "call_id").or_else(|| item_id.clone()).unwrap_or_else(|| format!("call_{index}"));
        let name = str_field(item, "name").unwrap_or_default();
        self.calls.push(CallItem {
            item_id,
            output_index: value.get("output_index").and_then(Value::as_u64),
            index,
            has_args: false,
        });
        out.push_back(Ok(ModelEvent::ToolCallStart { index, call_id, name }));
        index
    }

    /// The call an event is about: by `item_id` (argument events) or the item's `id`, else by
    /// `output_index`.
    fn find_call(&self, value: &Value) -> Option<usize> {
        let item_id = str_field(value, "item_id").or_else(|| value.get("item").and_then(|i| str_field(i, "id")));
        if let Some(id) = item_id
            && let Some(call) = self.calls.iter().position(|c| c.item_id.as_deref() == Some(id.as_str()))
        {
            return Some(call);
        }
        let output_index = value.get("output_index").and_then(Value::as_u64)?;
        self.calls.iter().position(|c| c.output_index == Some(output_index))
    }

    fn mark_streamed(&mut self, value: &Value) {
        if let Some(id) = str_field(value, "item_id") {
            self.streamed.insert(id);
        }
    }

    fn push_text(&mut self, text: String, out: &mut VecDeque<Result<ModelEvent, ModelError>>) {
        let text = if std::mem::take(&mut self.text_separator) { format!("\n\n{text}") } else { text };
        self.text_emitted = true;
        out.push_back(Ok(ModelEvent::TextDelta(text)));
    }

    fn push_reasoning(
        &mut self,
        item: String,
        part: u64,
        text: String,
        out: &mut VecDeque<Result<ModelEvent, ModelError>>,
    ) {
        let key = (item, part);
        let text = match &self.reasoning_part {
            Some(current) if *current != key => format!("\n\n{text}"),
            _ => text,
        };
        self.reasoning_part = Some(key);
        out.push_back(Ok(ModelEvent::ReasoningDelta { text, signature: None }));
    }

    /// Ends the answer from the terminal `response` object: `Usage`, then `Finish`.
    fn finish(&mut self, response: &Value, out: &mut VecDeque<Result<ModelEvent, ModelError>>) {
        self.finished = true;
        if let Some(usage) = response.get("usage").filter(|u| u.is_object()) {
            let count = |pointer: &str| usage.pointer(pointer).and_then(Value::as_u64).unwrap_or(0);
            // `input_tokens` already counts the cached ones, and `output_tokens` the reasoning.
            out.push_back(Ok(ModelEvent::Usage(Usage {
                input_tokens: count("/input_tokens"),
                output_tokens: count("/output_tokens"),
                cache_read_tokens: count("/input_tokens_details/cached_tokens"),
                cache_write_tokens: 0,
            })));
        }
        let incomplete = response.pointer("/incomplete_details/reason").and_then(Value::as_str);
        let reason = match (response.get("status").and_then(Value::as_str), incomplete) {
            (_, Some("max_output_tokens")) => StopReason::MaxTokens,
            (_, Some("content_filter")) => StopReason::ContentFilter,
            (Some("incomplete"), _) | (_, Some(_)) => StopReason::Other,
            _ if !self.calls.is_empty() => StopReason::ToolUse,
            _ => StopReason::EndTurn,
        };
        out.push_back(Ok(ModelEvent::Finish(reason)));
    }

    /// The body ended. Without a terminal event the answer is incomplete: a proxy or the
    /// provider cut it, and another try may succeed.
    pub(crate) fn end_of_body(&mut self, out: &mut VecDeque<Result<ModelEvent, ModelError>>) {
        if !self.finished {
            self.finished = true;
            let message = "the model stream ended before the response was complete";
            out.push_back(Err(ModelError::new(ChatErrorKind::Provider, message)));
        }
    }
}

fn str_field(value: &Value, key: &str) -> Option<String> {
    value.get(key).and_then(Value::as_str).map(str::to_owned)
}
