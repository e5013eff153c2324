//! The Google Gemini dialect: `models/{model}:streamGenerateContent?alt=sse` on the Gemini API
//! (generativelanguage.googleapis.com) and on Vertex AI, which serves the same shapes.
//!
//! [`request_body`] turns the prompt into a `GenerateContentRequest`; [`ChunkDecoder`] turns the
//! streamed `GenerateContentResponse`s into [`ModelEvent`]s. What sets Gemini apart, each part
//! handled where it is commented:
//! - thought signatures: opaque tokens on response parts that must go back on the next request,
//!   on the first `functionCall` of that model turn (Gemini 3 rejects calls without one);
//! - function calls arrive whole (an `args` object) and often without an id, except on Vertex
//!   with streamed arguments, where `partialArgs` pieces address values by JSON path;
//! - usage is repeated cumulatively on every chunk, field by field;
//! - errors are Google RPC statuses (`RESOURCE_EXHAUSTED`, `UNAVAILABLE`, …) whose `details`
//!   may carry a `RetryInfo` delay, and an invalid key is a 400, not a 401.
//!
//! The key travels in the `x-goog-api-key` header, never as the `key=` query parameter that
//! Google also accepts: URLs end up in logs.

use std::borrow::Cow;
use std::collections::{HashMap, VecDeque};
use std::ops::ControlFlow;
use std::time::Duration;

use agentplane_actors::ports::{
    ImageData, ModelError, ModelEvent, ModelRequest, ModelStream, ModelTarget, PromptMessage, StopReason, ToolSpec,
    Usage,
};
use agentplane_schema::api::ChatErrorKind;
use agentplane_schema::message::{Part, Role};
use data_encoding::BASE64;
use futures::StreamExt;
use reqwest::header::{HeaderValue, InvalidHeaderValue};
use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::fragments::{self, WireRole};
use super::http;
use super::sse::{self, SseEvent, SseParser};

/// The openings of a user's and a model's content, for [`fragments::push_role_messages`].
const ROLE_AND_PARTS: (&[u8], &[u8]) = (br#"{"role":"user","parts":["#, br#"{"role":"model","parts":["#);

/// The value Google documents for a `functionCall` replayed without the signature Gemini gave
/// it (history written by another model, or an answer that came without one): Gemini 3 then
/// skips its signature check instead of failing the request with a 400.
const SKIP_SIGNATURE_CHECK: &str = "skip_thought_signature_validator";

/// Largest GIF (in pixels of its logical screen) converted to PNG; bounds the memory a hostile
/// file can make the conversion take.
const MAX_GIF_PIXELS: u64 = 40_000_000;

/// Highest array index a streamed argument path may use, so a bogus path cannot make the decoder
/// allocate a huge array.
const MAX_PATH_INDEX: usize = 100_000;

/// Sends `request` and returns its answer as a stream. Errors up to and including the response
/// headers (a prompt Gemini cannot take, connect failures, error statuses) come from the outer
/// `Result`.
pub(crate) async fn stream(client: &reqwest::Client, request: ModelRequest) -> Result<ModelStream, ModelError> {
    let api_key = request.target.api_key.clone().filter(|key| !key.is_empty());
    let body = request_body(&request)?;
    let url = endpoint(&request.target);

    let mut builder = client
        .post(&url)
        .header(reqwest::header::ACCEPT, "text/event-stream")
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .body(body);
    if let Some(key) = &api_key {
        let value = key_header(key).map_err(|_| {
            ModelError::new(ChatErrorKind::Config, "the provider's API key contains characters a header cannot carry")
        })?;
        builder = builder.header("x-goog-api-key", value);
    }
    let response = builder.send().await.map_err(|e| http::transport_error(e, api_key.as_deref()))?;

    if !response.status().is_success() {
        return Err(http::failed_call(response, &request.target.model, |status, headers, body| {
            let error = http::status_error(status, headers, body, api_key.as_deref());
            match serde_json::from_slice::<Value>(body) {
                Ok(value) => refine_error(error, &value),
                Err(_) => error,
            }
        })
        .await);
    }

    // Without `alt=sse` (a proxy that drops the query) Gemini answers with one JSON array of
    // the same chunks.
    let is_json = response
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim_start().starts_with("application/json"));
    if is_json {
        let items = match response.bytes().await {
            Ok(body) => decode(&body, api_key),
            Err(error) => vec![Err(http::transport_error(error, api_key.as_deref()))],
        };
        return Ok(futures::stream::iter(items).boxed());
    }

    Ok(sse::decode_stream(response.bytes_stream().boxed(), ChunkDecoder::new(api_key)))
}

/// Runs the decoder over a whole response body, without HTTP: an SSE body as `alt=sse` sends
/// it, or the JSON array (or single object) of the other forms. For tests and benchmarks.
pub(crate) fn decode_body(body: &[u8]) -> Vec<Result<ModelEvent, ModelError>> {
    decode(body, None)
}

fn decode(body: &[u8], api_key: Option<String>) -> Vec<Result<ModelEvent, ModelError>> {
    let mut decoder = ChunkDecoder::new(api_key);
    let mut out = VecDeque::new();
    let trimmed = body.trim_ascii_start();
    if trimmed.starts_with(b"[") || trimmed.starts_with(b"{") {
        let event = SseEvent { event: None, data: String::from_utf8_lossy(trimmed).into_owned() };
        if decoder.on_event(&event, &mut out).is_break() {
            return out.into();
        }
    } else {
        let mut parser = SseParser::new();
        parser.push(body);
        while let Some(event) = parser.finish() {
            if decoder.on_event(&event, &mut out).is_break() {
                return out.into();
            }
        }
    }
    decoder.finish(&mut out);
    out.into()
}

/// `{base}/models/{model}:streamGenerateContent?alt=sse`. Model names as Google lists them
/// (`models/gemini-…`) are accepted too.
fn endpoint(target: &ModelTarget) -> String {
    let model = target.model.trim().trim_start_matches("models/");
    format!("{}/models/{model}:streamGenerateContent?alt=sse", target.base_url.trim_end_matches('/'))
}

fn key_header(key: &str) -> Result<HeaderValue, InvalidHeaderValue> {
    let mut value = HeaderValue::from_str(key)?;
    // Keeps the key out of reqwest's and hyper's debug output.
    value.set_sensitive(true);
    Ok(value)
}

// ---------------------------------------------------------------------------------------------
// Request

/// What the request depends on besides the prompt: the model generation, the endpoint, and the
/// provider's settings.
#[derive(Debug, Clone, Copy)]
struct Options {
    /// Gemma models on the Gemini API take neither a system instruction nor a thinking config.
    gemma: bool,
    /// Gemini 3 and later require a thought signature on replayed function calls.
    requires_signatures: bool,
    /// Vertex AI rejects the `id` fields of `functionCall` and `functionResponse`.
    vertex: bool,
    include_thoughts: bool,
    stream_arguments: bool,
}

impl Options {
    fn of(target: &ModelTarget) -> Self {
        let model = target.model.trim().trim_start_matches("models/").to_ascii_lowercase();
        let gemma = model.starts_with("gemma");
        let gemini = model.starts_with("gemini-");
        // Google's model names are open-ended, so anything that is not a known older generation
        // is taken to behave like the newest one.
        let older = ["gemini-1", "gemini-2", "gemini-pro"].iter().any(|prefix| model.starts_with(prefix));
        let thinks = !gemma && !model.starts_with("gemini-1") && !model.starts_with("gemini-2.0");
        let setting = |key: &str| target.settings.get(key).and_then(Value::as_bool);
        let host = target.base_url.split("://").nth(1).unwrap_or(&target.base_url);
        let host = host.split('/').next().unwrap_or(host);
        Options {
            gemma,
            requires_signatures: gemini && !older,
            vertex: host.ends_with("aiplatform.googleapis.com"),
            include_thoughts: setting("include_thoughts").unwrap_or(thinks),
            stream_arguments: setting("stream_function_call_arguments").unwrap_or(false),
        }
    }
}

/// The `GenerateContentRequest` for `request`. Fails with a `Config` error when the prompt holds
/// an image Gemini cannot be given.
///
/// Provider or model settings understood here: `include_thoughts` (default on for thinking
/// models), `stream_function_call_arguments` (Vertex only; default off) and `generation_config`,
/// an object laid over the `generationConfig` built here (e.g. `{"thinkingConfig":
/// {"thinkingLevel": "low"}, "temperature": 0.2}`).
pub(crate) fn request_body(request: &ModelRequest) -> Result<Vec<u8>, ModelError> {
    let target = &request.target;
    let options = Options::of(target);

    let system = request.system.trim();
    let mut body = json!({});
    if !system.is_empty() && !options.gemma {
        body["systemInstruction"] = json!({"parts": [{"text": system}]});
    }
    if !request.tools.is_empty() {
        let declarations: Vec<Value> = request.tools.iter().map(function_declaration).collect();
        body["tools"] = json!([{"functionDeclarations": declarations}]);
        if options.stream_arguments {
            body["toolConfig"] = json!({"functionCallingConfig": {"streamFunctionCallArguments": true}});
        }
    }
    let mut config = Map::new();
    if let Some(max) = target.max_output_tokens.filter(|m| *m > 0) {
        config.insert("maxOutputTokens".into(), json!(max));
    }
    if options.include_thoughts && !options.gemma {
        config.insert("thinkingConfig".into(), json!({"includeThoughts": true}));
    }
    if let Some(Value::Object(extra)) = target.settings.get("generation_config") {
        for (key, value) in extra {
            match (config.get_mut(key), value) {
                // `thinkingConfig` is merged key by key so a configured thinking level keeps
                // the thoughts included.
                (Some(Value::Object(ours)), Value::Object(theirs)) => {
                    ours.extend(theirs.iter().map(|(k, v)| (k.clone(), v.clone())));
                }
                _ => {
                    config.insert(key.clone(), value.clone());
                }
            }
        }
    }
    if !config.is_empty() {
        body["generationConfig"] = Value::Object(config);
    }

    // How a message is written depends on these options of the model.
    let written_as = format!("gemini, vertex {}, signatures {}", options.vertex, options.requires_signatures);
    fragments::with_message_pieces(
        request,
        &written_as,
        |message| fragments::raw_all(&content(message, &request.images, options)?),
        |pieces| {
            // Consecutive contents of one role (tool results, then the user's next message) are
            // merged: Gemini expects the turns to alternate.
            let contents = fragments::merged_by_role(pieces, &request.messages);
            // Gemma takes no system instruction: the system prompt opens the first user content,
            // or is a user content of its own when there is none.
            let first_user = contents.iter().position(|(role, _)| *role == WireRole::User);
            let opening = (!system.is_empty() && options.gemma).then(|| {
                let text = if first_user.is_some() { format!("{system}\n\n") } else { system.to_owned() };
                json!({"text": text}).to_string()
            });
            let size = pieces.size() + 32 * contents.len();
            fragments::object_with_array_first("contents", size, &body, |out| {
                if let (Some(opening), None) = (&opening, first_user) {
                    out.extend_from_slice(ROLE_AND_PARTS.0);
                    out.extend_from_slice(opening.as_bytes());
                    out.extend_from_slice(b"]}");
                    if !contents.is_empty() {
                        out.push(b',');
                    }
                }
                fragments::push_role_messages(out, &contents, ROLE_AND_PARTS, |out, index, parts| {
                    let opening = opening.as_deref().filter(|_| first_user == Some(index));
                    fragments::push_joined(out, opening.into_iter().chain(parts.iter().copied()));
                })
            })
        },
    )
}

/// The parts of one prompt message's Gemini content (`model` for an assistant's, `user` for the
/// others'); none
/// when nothing of it is sent.
fn content(
    message: &PromptMessage,
    images: &HashMap<String, ImageData>,
    options: Options,
) -> Result<Vec<Value>, ModelError> {
    let parts = match message.role {
        // The loop drops markers before a prompt is built; should one arrive anyway, it is not sent.
        Role::Marker => Vec::new(),
        Role::User | Role::Summary => {
            let mut parts = Vec::with_capacity(message.parts.len());
            for part in message.parts.iter() {
                match part {
                    // Gemini rejects empty text parts.
                    Part::Text { text } if !text.is_empty() => parts.push(json!({"text": text})),
                    Part::Image { file_id } => parts.push(inline_image(file_id, images)?),
                    _ => {}
                }
            }
            parts
        }
        Role::Assistant => model_parts(&message.parts, options),
        // Results go back in a user turn, one `functionResponse` per call. Gemini has no error
        // flag; its documented convention is the key: `output` for a result, `error` for a
        // failure.
        Role::Tool => message
            .parts
            .iter()
            .filter_map(|part| match part {
                Part::ToolResult { call_id, name, result, is_error } => {
                    let key = if *is_error { "error" } else { "output" };
                    let mut response = json!({"name": name, "response": {key: result}});
                    if !options.vertex {
                        response["id"] = json!(call_id);
                    }
                    Some(json!({"functionResponse": response}))
                }
                _ => None,
            })
            .collect(),
    };
    Ok(parts)
}

/// An assistant message as the parts of a model turn: text, then the calls, with the turn's
/// thought signature put back where Gemini wants it: on the first `functionCall`, or, in a turn
/// without calls, on its last text part.
///
/// Thought text itself is not sent back: it is a summary, and the signature is what carries the
/// model's reasoning into the next request.
fn model_parts(message: &[Part], options: Options) -> Vec<Value> {
    let mut parts = Vec::with_capacity(message.len());
    let mut signature = None;
    for part in message {
        match part {
            // The loop keeps one reasoning part per message; should there be several, the last
            // signature is the newest.
            Part::Reasoning { signature: Some(sig), .. } if !sig.is_empty() => signature = Some(sig.as_str()),
            Part::Text { text } if !text.is_empty() => parts.push(json!({"text": text})),
            Part::ToolCall { call_id, name, args } => {
                let mut call = json!({"name": name, "args": call_args(args)});
                if !options.vertex {
                    call["id"] = json!(call_id);
                }
                parts.push(json!({"functionCall": call}));
            }
            _ => {}
        }
    }
    let first_call = parts.iter().position(|p| p.get("functionCall").is_some());
    let signature = match (signature, first_call) {
        (Some(sig), _) => Some(sig),
        (None, Some(_)) if options.requires_signatures => Some(SKIP_SIGNATURE_CHECK),
        (None, _) => None,
    };
    let target = first_call.or_else(|| parts.iter().rposition(|p| p.get("text").is_some()));
    if let (Some(sig), Some(index)) = (signature, target) {
        parts[index]["thoughtSignature"] = json!(sig);
    }
    parts
}

/// Gemini's `args` is a JSON object. Arguments kept as a string (another model wrote invalid
/// JSON) are parsed if they hold an object, else wrapped so the request stays valid.
fn call_args(args: &Value) -> Value {
    match args {
        Value::Object(_) => args.clone(),
        Value::String(raw) => match serde_json::from_str::<Value>(raw) {
            Ok(object @ Value::Object(_)) => object,
            _ => json!({"arguments": raw}),
        },
        Value::Null => json!({}),
        other => json!({"arguments": other}),
    }
}

/// An image as an `inlineData` part. Gemini takes PNG, JPEG, WebP, HEIC and HEIF; a GIF is
/// converted to a PNG of its first frame.
fn inline_image(file_id: &str, images: &HashMap<String, ImageData>) -> Result<Value, ModelError> {
    let image = images.get(file_id).ok_or_else(|| {
        ModelError::new(ChatErrorKind::Config, format!("image {file_id} is not available to send to the model"))
    })?;
    let (mime_type, bytes): (&str, Cow<'_, [u8]>) = match image.media_type.as_str() {
        "image/png" | "image/jpeg" | "image/webp" | "image/heic" | "image/heif" => {
            (image.media_type.as_str(), Cow::Borrowed(&image.bytes[..]))
        }
        "image/gif" => {
            let png = gif_to_png(&image.bytes).map_err(|reason| {
                ModelError::new(ChatErrorKind::Config, format!("image {file_id}: cannot convert the GIF: {reason}"))
            })?;
            ("image/png", Cow::Owned(png))
        }
        other => {
            return Err(ModelError::new(
                ChatErrorKind::Config,
                format!("image {file_id} is {other}, which Gemini does not accept"),
            ));
        }
    };
    Ok(json!({"inlineData": {"mimeType": mime_type, "data": BASE64.encode(&bytes)}}))
}

/// The first frame of a GIF, drawn on its logical screen, as a PNG.
fn gif_to_png(gif_bytes: &[u8]) -> Result<Vec<u8>, String> {
    let mut options = gif::DecodeOptions::new();
    options.set_color_output(gif::ColorOutput::RGBA);
    let mut decoder = options.read_info(gif_bytes).map_err(|e| e.to_string())?;
    let (width, height) = (usize::from(decoder.width()), usize::from(decoder.height()));
    if width == 0 || height == 0 || (width as u64) * (height as u64) > MAX_GIF_PIXELS {
        return Err(format!("unsupported size {width}x{height}"));
    }
    let frame = decoder.read_next_frame().map_err(|e| e.to_string())?.ok_or("it has no frames")?;
    // A frame may cover only part of the screen; the rest stays transparent.
    let mut canvas = vec![0u8; width * height * 4];
    let (left, top) = (usize::from(frame.left), usize::from(frame.top));
    let frame_width = usize::from(frame.width);
    for (row, line) in frame.buffer.chunks_exact(frame_width * 4).enumerate() {
        let y = top + row;
        if y >= height || left >= width {
            break;
        }
        let visible = frame_width.min(width - left) * 4;
        let start = (y * width + left) * 4;
        canvas[start..start + visible].copy_from_slice(&line[..visible]);
    }

    let mut png_bytes = Vec::new();
    let mut encoder = png::Encoder::new(&mut png_bytes, width as u32, height as u32);
    encoder.set_color(png::ColorType::Rgba);
    encoder.set_depth(png::BitDepth::Eight);
    let mut writer = encoder.write_header().map_err(|e| e.to_string())?;
    writer.write_image_data(&canvas).map_err(|e| e.to_string())?;
    writer.finish().map_err(|e| e.to_string())?;
    Ok(png_bytes)
}

/// Our tool schemas are plain JSON Schema, so they go in `parametersJsonSchema`, which takes it
/// whole; `parameters` takes only Google's OpenAPI subset and rejects keywords outside it.
fn function_declaration(tool: &ToolSpec) -> Value {
    json!({
        "name": tool.name,
        "description": tool.description,
        "parametersJsonSchema": tool.parameters,
    })
}

// ---------------------------------------------------------------------------------------------
// Errors

/// Sharpens an error mapped from the HTTP status with what Google's error body says: its RPC
/// status and `details` (`ErrorInfo` reasons, `RetryInfo` delays). `value` is the whole body or
/// an in-stream error chunk.
fn refine_error(mut error: ModelError, value: &Value) -> ModelError {
    let body = match value {
        Value::Array(items) => items.first().unwrap_or(value),
        other => other,
    };
    let Some(status) = body.get("error").filter(|e| e.is_object()) else {
        return error;
    };
    let rpc_status = status.get("status").and_then(Value::as_str).unwrap_or_default();
    let message = status.get("message").and_then(Value::as_str).unwrap_or_default().to_ascii_lowercase();
    let details: &[Value] = status.get("details").and_then(Value::as_array).map(Vec::as_slice).unwrap_or_default();
    let reasons: Vec<&str> = details.iter().filter_map(|d| d.get("reason").and_then(Value::as_str)).collect();

    let kind = if reasons.iter().any(|r| matches!(*r, "API_KEY_INVALID" | "API_KEY_EXPIRED")) {
        // Google answers a wrong key with 400 INVALID_ARGUMENT.
        Some(ChatErrorKind::Auth)
    } else {
        match rpc_status {
            "RESOURCE_EXHAUSTED" => Some(ChatErrorKind::RateLimit),
            "UNAVAILABLE" => Some(ChatErrorKind::Overloaded),
            "UNAUTHENTICATED" | "PERMISSION_DENIED" => Some(ChatErrorKind::Auth),
            "DEADLINE_EXCEEDED" => Some(ChatErrorKind::Timeout),
            // "The input token count (1200000) exceeds the maximum number of tokens allowed
            // (1048576)."
            "INVALID_ARGUMENT"
                if message.contains("maximum number of tokens")
                    || (message.contains("token count") && message.contains("exceeds")) =>
            {
                Some(ChatErrorKind::ContextOverflow)
            }
            _ => None,
        }
    };
    if let Some(kind) = kind {
        error.kind = kind;
        error.retryable = ModelError::new(kind, "").retryable;
    }
    if error.retry_after.is_none() {
        error.retry_after = details
            .iter()
            .filter(|d| d.get("@type").and_then(Value::as_str).is_some_and(|t| t.ends_with("google.rpc.RetryInfo")))
            .find_map(|d| d.get("retryDelay").and_then(Value::as_str).and_then(parse_duration));
    }
    error
}

/// A protobuf `Duration` in its JSON form: seconds with an `s` suffix (`"34.4s"`, `"2s"`).
fn parse_duration(text: &str) -> Option<Duration> {
    let seconds: f64 = text.trim().strip_suffix('s')?.parse().ok()?;
    Duration::try_from_secs_f64(seconds).ok()
}

// ---------------------------------------------------------------------------------------------
// Response

impl sse::SseDecoder for ChunkDecoder {
    fn on_event(&mut self, event: &SseEvent, out: &mut VecDeque<Result<ModelEvent, ModelError>>) -> ControlFlow<()> {
        ChunkDecoder::on_event(self, event, out)
    }

    fn end_of_body(&mut self, out: &mut VecDeque<Result<ModelEvent, ModelError>>) {
        self.finish(out);
    }

    /// The chunk with the finish reason is the last one.
    fn answer_complete(&self) -> bool {
        self.finish_reason.is_some()
    }

    fn api_key(&self) -> Option<&str> {
        self.api_key.as_deref()
    }
}

/// One `GenerateContentResponse`, every field optional.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Chunk {
    #[serde(default)]
    candidates: Option<Vec<Candidate>>,
    #[serde(default)]
    usage_metadata: Option<UsageMetadata>,
    #[serde(default)]
    prompt_feedback: Option<PromptFeedback>,
    #[serde(default)]
    response_id: Option<String>,
    /// A Google error body in the stream (null when there is none): read again whole, as an
    /// error.
    #[serde(default)]
    error: Option<Value>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Candidate {
    #[serde(default)]
    index: Option<u64>,
    #[serde(default)]
    content: Option<Content>,
    #[serde(default)]
    finish_reason: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Content {
    #[serde(default)]
    parts: Option<Vec<WirePart>>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct WirePart {
    #[serde(default)]
    text: Option<String>,
    #[serde(default)]
    thought: Option<bool>,
    #[serde(default)]
    thought_signature: Option<String>,
    #[serde(default)]
    function_call: Option<WireFunctionCall>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct WireFunctionCall {
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    args: Option<Value>,
    /// Vertex's streamed arguments. Kept as raw values because `nullValue: null` must be told
    /// apart from a missing field.
    #[serde(default)]
    partial_args: Option<Vec<Value>>,
    #[serde(default)]
    will_continue: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct UsageMetadata {
    #[serde(default)]
    prompt_token_count: Option<u64>,
    #[serde(default)]
    candidates_token_count: Option<u64>,
    #[serde(default)]
    thoughts_token_count: Option<u64>,
    #[serde(default)]
    cached_content_token_count: Option<u64>,
    #[serde(default)]
    tool_use_prompt_token_count: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct PromptFeedback {
    #[serde(default)]
    block_reason: Option<String>,
}

/// The latest value of each usage counter. Gemini repeats running totals on every chunk, but
/// Vertex sends chunks whose `usageMetadata` holds no counts at all until the last one, so the
/// counters are kept one by one rather than the last object winning.
#[derive(Debug, Default)]
struct UsageCounts {
    prompt: Option<u64>,
    candidates: Option<u64>,
    thoughts: Option<u64>,
    cached: Option<u64>,
    tool_use_prompt: Option<u64>,
}

impl UsageCounts {
    fn update(&mut self, usage: UsageMetadata) {
        let fields = [
            (&mut self.prompt, usage.prompt_token_count),
            (&mut self.candidates, usage.candidates_token_count),
            (&mut self.thoughts, usage.thoughts_token_count),
            (&mut self.cached, usage.cached_content_token_count),
            (&mut self.tool_use_prompt, usage.tool_use_prompt_token_count),
        ];
        for (slot, value) in fields {
            if value.is_some() {
                *slot = value;
            }
        }
    }

    /// `promptTokenCount` already includes the cached tokens; the tool-use prompt (results of
    /// Google's own tools) is read by the model too but counted apart. Thoughts are billed as
    /// output.
    fn usage(&self) -> Option<Usage> {
        let any = [self.prompt, self.candidates, self.thoughts, self.cached, self.tool_use_prompt];
        if any.iter().all(Option::is_none) {
            return None;
        }
        Some(Usage {
            input_tokens: self.prompt.unwrap_or(0) + self.tool_use_prompt.unwrap_or(0),
            output_tokens: self.candidates.unwrap_or(0) + self.thoughts.unwrap_or(0),
            cache_read_tokens: self.cached.unwrap_or(0),
            cache_write_tokens: 0,
        })
    }
}

/// A call whose arguments Vertex is streaming: its index and the arguments assembled so far.
#[derive(Debug)]
struct OpenCall {
    index: usize,
    args: Value,
}

/// Turns chunks into events. Usage and the finish reason are held until the stream ends, so
/// that `Finish` comes last.
pub(crate) struct ChunkDecoder {
    api_key: Option<String>,
    response_id: Option<String>,
    /// Prefix of the ids made up for calls Gemini sent without one.
    id_prefix: Option<String>,
    started_calls: usize,
    open_call: Option<OpenCall>,
    usage: UsageCounts,
    finish_reason: Option<String>,
    finished: bool,
}

impl ChunkDecoder {
    pub(crate) fn new(api_key: Option<String>) -> Self {
        ChunkDecoder {
            api_key,
            response_id: None,
            id_prefix: None,
            started_calls: 0,
            open_call: None,
            usage: UsageCounts::default(),
            finish_reason: None,
            finished: false,
        }
    }

    /// Handles one SSE event (or a whole JSON body). `Break` means the stream is over (an
    /// error); what the caller should emit is in `out` either way.
    pub(crate) fn on_event(
        &mut self,
        event: &SseEvent,
        out: &mut VecDeque<Result<ModelEvent, ModelError>>,
    ) -> ControlFlow<()> {
        let data = event.data.trim();
        if data.is_empty() {
            return ControlFlow::Continue(());
        }
        // A chunk is read as one at once; an error, a JSON array of chunks (a whole body) and
        // what is not a chunk are read again as any JSON to tell which.
        if let Ok(chunk) = serde_json::from_str::<Chunk>(data)
            && chunk.error.is_none()
        {
            return self.on_chunk(chunk, out);
        }
        let value: Value = match serde_json::from_str(data) {
            Ok(value) => value,
            Err(_) if !data.starts_with('{') && !data.starts_with('[') => {
                tracing::debug!("ignoring non-JSON data line in model stream");
                return ControlFlow::Continue(());
            }
            Err(error) => {
                let message = format!("malformed chunk in model stream: {error}");
                out.push_back(Err(ModelError::new(ChatErrorKind::Provider, message)));
                return ControlFlow::Break(());
            }
        };
        match value {
            Value::Array(items) => {
                for item in items {
                    self.on_value(item, out)?;
                }
                ControlFlow::Continue(())
            }
            value => self.on_value(value, out),
        }
    }

    fn on_value(&mut self, value: Value, out: &mut VecDeque<Result<ModelEvent, ModelError>>) -> ControlFlow<()> {
        // Gemini reports a failure after the 200 (an overloaded backend, a timeout) as a chunk
        // holding a Google error body.
        if value.get("error").is_some_and(|e| !e.is_null()) {
            let error = refine_error(http::stream_error(&value, self.api_key.as_deref()), &value);
            tracing::warn!(%error, "model stream reported an error");
            out.push_back(Err(error));
            return ControlFlow::Break(());
        }
        let chunk: Chunk = match serde_json::from_value(value) {
            Ok(chunk) => chunk,
            Err(error) => {
                let message = format!("unexpected chunk in model stream: {error}");
                out.push_back(Err(ModelError::new(ChatErrorKind::Provider, message)));
                return ControlFlow::Break(());
            }
        };
        self.on_chunk(chunk, out)
    }

    fn on_chunk(&mut self, chunk: Chunk, out: &mut VecDeque<Result<ModelEvent, ModelError>>) -> ControlFlow<()> {
        if self.response_id.is_none() {
            self.response_id = chunk.response_id.filter(|id| !id.is_empty());
        }
        if let Some(usage) = chunk.usage_metadata {
            self.usage.update(usage);
        }
        let candidates = chunk.candidates.unwrap_or_default();
        // A blocked prompt gets no candidates at all, only the reason.
        if candidates.is_empty()
            && let Some(reason) = chunk.prompt_feedback.and_then(|f| f.block_reason).filter(|r| !r.is_empty())
        {
            let message = format!("Gemini blocked the prompt ({reason})");
            out.push_back(Err(ModelError::new(ChatErrorKind::ContentFilter, message)));
            return ControlFlow::Break(());
        }
        // With `candidateCount > 1` candidates interleave; the loop wants one answer.
        let Some(candidate) = candidates.into_iter().find(|c| c.index.unwrap_or(0) == 0) else {
            return ControlFlow::Continue(());
        };
        for part in candidate.content.and_then(|c| c.parts).into_iter().flatten() {
            self.on_part(part, out);
        }
        if let Some(reason) = candidate.finish_reason.filter(|r| !r.is_empty()) {
            self.finish_reason = Some(reason);
        }
        ControlFlow::Continue(())
    }

    fn on_part(&mut self, part: WirePart, out: &mut VecDeque<Result<ModelEvent, ModelError>>) {
        let signature = part.thought_signature.filter(|s| !s.is_empty());
        let text = part.text.unwrap_or_default();
        if part.thought == Some(true) {
            if !text.is_empty() || signature.is_some() {
                out.push_back(Ok(ModelEvent::ReasoningDelta { text, signature }));
            }
            return;
        }
        // A signature may sit on any part (often an empty text part at the end); it belongs to
        // the turn's reasoning, which the loop keeps with its latest signature.
        if signature.is_some() {
            out.push_back(Ok(ModelEvent::ReasoningDelta { text: String::new(), signature }));
        }
        if !text.is_empty() {
            out.push_back(Ok(ModelEvent::TextDelta(text)));
        }
        if let Some(call) = part.function_call {
            self.on_function_call(call, out);
        }
    }

    /// A whole call (`name` and `args`) or a piece of a streamed one. Vertex streams a call as a
    /// part with the name and `willContinue`, parts with `partialArgs`, and an empty
    /// `functionCall` that ends it; the end may also be a last `partialArgs` part without
    /// `willContinue`, or simply the next call or the end of the answer.
    fn on_function_call(&mut self, call: WireFunctionCall, out: &mut VecDeque<Result<ModelEvent, ModelError>>) {
        let streamed = call.will_continue == Some(true) || call.partial_args.is_some();
        if let Some(name) = call.name.filter(|n| !n.is_empty()) {
            self.close_call(out);
            let index = self.start_call(call.id, name, out);
            if !streamed {
                let args = match call.args {
                    Some(args @ Value::Object(_)) => args,
                    // A call without parameters comes without `args`.
                    _ => json!({}),
                };
                out.push_back(Ok(ModelEvent::ToolCallArgs { index, piece: args.to_string() }));
                return;
            }
            self.open_call = Some(OpenCall { index, args: json!({}) });
        }
        if let Some(partials) = call.partial_args {
            match &mut self.open_call {
                Some(open) => partials.iter().for_each(|partial| apply_partial_arg(&mut open.args, partial)),
                None => tracing::warn!("dropping streamed arguments of a call that never started"),
            }
        }
        if call.will_continue != Some(true) {
            self.close_call(out);
        }
    }

    fn start_call(
        &mut self,
        id: Option<String>,
        name: String,
        out: &mut VecDeque<Result<ModelEvent, ModelError>>,
    ) -> usize {
        let index = self.started_calls;
        self.started_calls += 1;
        let call_id = match id.filter(|id| !id.is_empty()) {
            Some(id) => id,
            // Gemini mostly sends no ids (the recorded Gemini 3 answers have none). The loop
            // pairs results with calls by id and the ids go back to Gemini with the results, so
            // they must be unique within the chat: the response id is, and a random one stands
            // in when that is missing too.
            None => {
                let response_id = self.response_id.clone();
                let prefix = self.id_prefix.get_or_insert_with(|| match response_id {
                    Some(id) => format!("call_{id}"),
                    None => format!("call_{:016x}", rand::random::<u64>()),
                });
                format!("{prefix}_{index}")
            }
        };
        out.push_back(Ok(ModelEvent::ToolCallStart { index, call_id, name }));
        index
    }

    /// Ends the call whose arguments are being streamed: its arguments go out as one piece,
    /// because pieces addressed by path only make valid JSON once assembled.
    fn close_call(&mut self, out: &mut VecDeque<Result<ModelEvent, ModelError>>) {
        if let Some(open) = self.open_call.take() {
            out.push_back(Ok(ModelEvent::ToolCallArgs { index: open.index, piece: open.args.to_string() }));
        }
    }

    /// Ends the answer: closes a streamed call left open, then `Usage`, then `Finish`.
    pub(crate) fn finish(&mut self, out: &mut VecDeque<Result<ModelEvent, ModelError>>) {
        if std::mem::replace(&mut self.finished, true) {
            return;
        }
        self.close_call(out);
        if let Some(usage) = self.usage.usage() {
            out.push_back(Ok(ModelEvent::Usage(usage)));
        }
        let saw_calls = self.started_calls > 0;
        let reason = match self.finish_reason.as_deref() {
            // Gemini says STOP after function calls too; the calls still have to run.
            Some("STOP") | None if saw_calls => StopReason::ToolUse,
            Some("STOP") | None => StopReason::EndTurn,
            Some("MAX_TOKENS") => StopReason::MaxTokens,
            Some(
                "SAFETY"
                | "RECITATION"
                | "BLOCKLIST"
                | "PROHIBITED_CONTENT"
                | "SPII"
                | "IMAGE_SAFETY"
                | "IMAGE_PROHIBITED_CONTENT"
                | "IMAGE_RECITATION",
            ) => StopReason::ContentFilter,
            // MALFORMED_FUNCTION_CALL, UNEXPECTED_TOOL_CALL, LANGUAGE, OTHER, …
            Some(_) => StopReason::Other,
        };
        out.push_back(Ok(ModelEvent::Finish(reason)));
    }
}

// ---------------------------------------------------------------------------------------------
// Streamed arguments

#[derive(Debug, Clone, PartialEq, Eq)]
enum PathSegment {
    Key(String),
    Index(usize),
}

/// Applies one Vertex `partialArgs` entry to the arguments assembled so far. A string value may
/// come in several entries for the same path, each continuing the last.
fn apply_partial_arg(args: &mut Value, partial: &Value) {
    let Some(path) = partial.get("jsonPath").and_then(Value::as_str).and_then(parse_json_path) else {
        tracing::warn!("dropping a streamed argument without a usable path");
        return;
    };
    let Some(slot) = slot_mut(args, &path) else {
        tracing::warn!("dropping a streamed argument whose path does not fit the arguments");
        return;
    };
    if let Some(piece) = partial.get("stringValue").and_then(Value::as_str) {
        match slot {
            Value::String(text) => text.push_str(piece),
            other => *other = Value::String(piece.to_owned()),
        }
    } else if let Some(number @ Value::Number(_)) = partial.get("numberValue") {
        *slot = number.clone();
    } else if let Some(flag @ Value::Bool(_)) = partial.get("boolValue") {
        *slot = flag.clone();
    } else if partial.get("nullValue").is_some() {
        *slot = Value::Null;
    }
}

/// `$.a.b[0].c` or `$['a b'][2]` as segments; `None` for anything else.
fn parse_json_path(path: &str) -> Option<Vec<PathSegment>> {
    let mut rest = path.trim().strip_prefix('$')?;
    let mut segments = Vec::new();
    while !rest.is_empty() {
        if let Some(after_dot) = rest.strip_prefix('.') {
            let end = after_dot.find(['.', '[']).unwrap_or(after_dot.len());
            if end == 0 {
                return None;
            }
            segments.push(PathSegment::Key(after_dot[..end].to_owned()));
            rest = &after_dot[end..];
        } else if let Some(inside) = rest.strip_prefix('[') {
            let close = inside.find(']')?;
            let token = &inside[..close];
            let quoted = token
                .strip_prefix('\'')
                .and_then(|t| t.strip_suffix('\''))
                .or_else(|| token.strip_prefix('"').and_then(|t| t.strip_suffix('"')));
            match quoted {
                Some(key) => segments.push(PathSegment::Key(key.to_owned())),
                None => segments.push(PathSegment::Index(token.parse().ok()?)),
            }
            rest = &inside[close + 1..];
        } else {
            return None;
        }
    }
    (!segments.is_empty()).then_some(segments)
}

/// The value at `path` inside `root`, creating the objects and arrays on the way.
fn slot_mut<'a>(root: &'a mut Value, path: &[PathSegment]) -> Option<&'a mut Value> {
    // Checked up front so that a refused path leaves nothing behind.
    if path.iter().any(|segment| matches!(segment, PathSegment::Index(index) if *index > MAX_PATH_INDEX)) {
        return None;
    }
    let mut node = root;
    for segment in path {
        node = match segment {
            PathSegment::Key(key) => {
                if !node.is_object() {
                    *node = Value::Object(Map::new());
                }
                node.as_object_mut()?.entry(key.clone()).or_insert(Value::Null)
            }
            PathSegment::Index(index) => {
                if !node.is_array() {
                    *node = Value::Array(Vec::new());
                }
                let items = node.as_array_mut()?;
                if items.len() <= *index {
                    items.resize(index + 1, Value::Null);
                }
                &mut items[*index]
            }
        };
    }
    Some(node)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_paths() {
        use PathSegment::{Index, Key};
        assert_eq!(parse_json_path("$.location"), Some(vec![Key("location".into())]));
        assert_eq!(
            parse_json_path("$.operations[10].price"),
            Some(vec![Key("operations".into()), Index(10), Key("price".into())])
        );
        assert_eq!(parse_json_path("$['a.b'][\"c\"]"), Some(vec![Key("a.b".into()), Key("c".into())]));
        for bad in ["", "$", "location", "$..a", "$[x]", "$.a[1", "$a"] {
            assert_eq!(parse_json_path(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn partial_args_assemble_nested_values() {
        let mut args = json!({});
        for partial in [
            json!({"jsonPath": "$.ops[1].name", "stringValue": "ba", "willContinue": true}),
            json!({"jsonPath": "$.ops[1].name", "stringValue": "nana"}),
            json!({"jsonPath": "$.ops[0].n", "numberValue": 0.5}),
            json!({"jsonPath": "$.flag", "boolValue": false}),
            json!({"jsonPath": "$.none", "nullValue": null}),
            json!({"jsonPath": "$.big[100001]", "stringValue": "x"}),
            json!({"stringValue": "no path"}),
        ] {
            apply_partial_arg(&mut args, &partial);
        }
        assert_eq!(args, json!({"ops": [{"n": 0.5}, {"name": "banana"}], "flag": false, "none": null}));
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("34.4s"), Some(Duration::from_millis(34_400)));
        assert_eq!(parse_duration("2s"), Some(Duration::from_secs(2)));
        assert_eq!(parse_duration("2"), None);
        assert_eq!(parse_duration("-1s"), None);
    }
}
