//! The OpenAI Chat Completions dialect, streamed: OpenAI itself, Azure OpenAI, OpenRouter,
//! Vercel AI Gateway, and every server that copies it (vLLM, Ollama, llama.cpp, Groq, DeepSeek,
//! Anthropic's and Gemini's compatibility endpoints).
//!
//! [`Endpoint`] says where a request of the OpenAI family goes and how it is authenticated (the
//! Responses API dialect uses it too); [`request_body`] turns the prompt into the JSON body;
//! [`ChunkDecoder`] turns the streamed `chat.completion.chunk`s into [`ModelEvent`]s. The decoder
//! is deliberately lenient, because the copies differ from OpenAI and from each other in small
//! ways; each tolerance is commented where it is handled.

use std::borrow::Cow;
use std::collections::{HashMap, VecDeque};
use std::ops::ControlFlow;
use std::sync::Arc;

use agentplane_actors::ports::{
    ModelError, ModelEvent, ModelRequest, ModelStream, ModelTarget, PromptMessage, StopReason, ToolSpec, Usage,
};
use agentplane_schema::api::{ChatErrorKind, ProviderType};
use agentplane_schema::message::{Part, Role};
use futures::StreamExt;
use reqwest::header::{HeaderName, HeaderValue};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::fragments::{self, Fragments, Written};
use super::http;
use super::sse::{self, SseEvent, SseParser};

/// Sends `request` and returns its answer as a stream. Errors up to and including the response
/// headers (bad settings, connect failures, error statuses) come from the outer `Result`.
pub(crate) async fn stream(
    client: &reqwest::Client,
    fragments: &Fragments,
    endpoints: &Endpoints,
    request: ModelRequest,
) -> Result<ModelStream, ModelError> {
    let endpoint = endpoints.get(&request.target, Api::ChatCompletions)?;
    let body = request_body(&request, &endpoint, fragments)?;
    let response = endpoint.send(client, body).await?;
    let api_key = endpoint.api_key.clone();

    // Some compatible servers ignore `stream: true` and answer with one JSON completion.
    let is_json = response
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim_start().starts_with("application/json"));
    if is_json {
        return Ok(whole_completion(response, api_key).await);
    }

    Ok(sse::decode_stream(response.bytes_stream().boxed(), ChunkDecoder::new(api_key)))
}

/// Decodes a whole recorded Chat Completions body (SSE, or one JSON completion) without HTTP:
/// the same events the stream would yield. For tests and the decoder benchmark.
pub(crate) fn decode_body(body: &[u8]) -> Vec<Result<ModelEvent, ModelError>> {
    decode_whole(body, None).into()
}

// ---------------------------------------------------------------------------------------------
// Endpoints of the OpenAI family

/// The two OpenAI APIs a model can be called through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Api {
    ChatCompletions,
    Responses,
}

impl Api {
    /// The API `settings.api` selects: `"chat_completions"` (the default) or `"responses"`, the
    /// latter only where the provider has it (OpenAI and Azure).
    pub(crate) fn for_target(target: &ModelTarget) -> Result<Api, ModelError> {
        match setting(target, "api")? {
            None | Some("chat_completions") => Ok(Api::ChatCompletions),
            Some("responses") if matches!(target.provider_type, ProviderType::Openai | ProviderType::Azure) => {
                Ok(Api::Responses)
            }
            Some("responses") => Err(config_error(format!(
                "settings.api `responses` is not available for {} providers; use `chat_completions`",
                target.provider_type.as_str()
            ))),
            Some(other) => {
                Err(config_error(format!("settings.api must be `chat_completions` or `responses`, not `{other}`")))
            }
        }
    }
}

/// The Azure OpenAI API version used for Chat Completions unless `settings.api_version` says
/// otherwise: the latest GA release of the versioned data-plane API.
const AZURE_DEFAULT_API_VERSION: &str = "2024-10-21";

/// Where a request of the OpenAI family goes and how it is authenticated.
pub(crate) struct Endpoint {
    /// Parsed once for every request sent to it.
    pub(crate) url: reqwest::Url,
    /// The key header (`Authorization: Bearer …` or Azure's `api-key`), marked sensitive.
    auth: Option<(HeaderName, HeaderValue)>,
    /// OpenRouter's attribution headers.
    extra_headers: Vec<(HeaderName, HeaderValue)>,
    /// OpenAI and Azure renamed `max_tokens` to `max_completion_tokens`, and their reasoning
    /// models reject the old name; most compatible servers know only the old one.
    max_tokens_field: &'static str,
    /// What the body's `model` says: the model name, or on Azure the deployment (which the
    /// Chat Completions path names too).
    pub(crate) model: String,
    pub(crate) api_key: Option<String>,
}

impl Endpoint {
    /// The endpoint of `target` for `api`. Settings that cannot make a valid request (an Azure
    /// provider without a base URL, a deployment name that is not a path segment, header values
    /// with line breaks) are `Config` errors here, before anything is sent.
    pub(crate) fn for_target(target: &ModelTarget, api: Api) -> Result<Endpoint, ModelError> {
        let api_key = target.api_key.clone().filter(|key| !key.is_empty());
        let base = base_url(target)?;
        let provider = target.provider_type;
        let model = match provider {
            ProviderType::Azure => setting(target, "deployment")?.unwrap_or(&target.model).to_owned(),
            _ => target.model.clone(),
        };
        let url = match (provider, api) {
            (ProviderType::Azure, Api::ChatCompletions) => {
                check_url_token("settings.deployment (or the model name)", &model)?;
                let version = setting(target, "api_version")?.unwrap_or(AZURE_DEFAULT_API_VERSION);
                check_url_token("settings.api_version", version)?;
                format!("{base}/openai/deployments/{model}/chat/completions?api-version={version}")
            }
            // Azure's v1 API: no deployment in the path (the body's `model` names it) and no
            // `api-version`.
            (ProviderType::Azure, Api::Responses) => format!("{base}/openai/v1/responses"),
            (_, Api::ChatCompletions) => format!("{base}/chat/completions"),
            (_, Api::Responses) => format!("{base}/responses"),
        };
        let auth = match &api_key {
            None => None,
            Some(key) => {
                let (name, value) = match provider {
                    ProviderType::Azure => (HeaderName::from_static("api-key"), key.clone()),
                    _ => (reqwest::header::AUTHORIZATION, format!("Bearer {key}")),
                };
                let mut value = HeaderValue::from_str(&value)
                    .map_err(|_| config_error("the API key contains characters not allowed in an HTTP header"))?;
                value.set_sensitive(true);
                Some((name, value))
            }
        };
        let mut extra_headers = Vec::new();
        if provider == ProviderType::Openrouter {
            for (key, header) in [("referer", "http-referer"), ("title", "x-title")] {
                if let Some(value) = setting(target, key)? {
                    let value = HeaderValue::from_str(value).map_err(|_| {
                        config_error(format!("settings.{key} contains characters not allowed in an HTTP header"))
                    })?;
                    extra_headers.push((HeaderName::from_static(header), value));
                }
            }
        }
        let max_tokens_field = match provider {
            ProviderType::Openai | ProviderType::Azure => "max_completion_tokens",
            _ => "max_tokens",
        };
        // Not echoed: a base URL may carry credentials, and this message reaches the chat.
        let url = reqwest::Url::parse(&url)
            .map_err(|e| config_error(format!("the provider's base URL does not make a valid URL: {e}")))?;
        Ok(Endpoint { url, auth, extra_headers, max_tokens_field, model, api_key })
    }

    /// Posts `body` (JSON) and returns the response once its status is known to be a success.
    pub(crate) async fn send(&self, client: &reqwest::Client, body: Vec<u8>) -> Result<reqwest::Response, ModelError> {
        let mut builder = client
            .post(self.url.clone())
            .header(reqwest::header::ACCEPT, "text/event-stream")
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body);
        if let Some((name, value)) = &self.auth {
            builder = builder.header(name, value);
        }
        for (name, value) in &self.extra_headers {
            builder = builder.header(name, value);
        }
        let response = builder.send().await.map_err(|e| http::transport_error(e, self.api_key.as_deref()))?;

        if response.status().is_success() {
            return Ok(response);
        }
        Err(http::failed_call(response, &self.model, |status, headers, body| {
            http::status_error(status, headers, body, self.api_key.as_deref())
        })
        .await)
    }
}

/// The endpoints of recent targets: a target's URL is parsed and its headers are checked once,
/// not on every step. A changed target (another key, model or setting) is another entry.
#[derive(Default)]
pub(crate) struct Endpoints(std::sync::Mutex<Vec<(ModelTarget, Api, Arc<Endpoint>)>>);

/// Targets whose endpoints are kept; the oldest goes first.
const KEPT_ENDPOINTS: usize = 32;

impl Endpoints {
    pub(crate) fn get(&self, target: &ModelTarget, api: Api) -> Result<Arc<Endpoint>, ModelError> {
        let mut kept = self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((_, _, endpoint)) = kept.iter().find(|(t, a, _)| *a == api && t == target) {
            return Ok(endpoint.clone());
        }
        let endpoint = Arc::new(Endpoint::for_target(target, api)?);
        if kept.len() == KEPT_ENDPOINTS {
            kept.remove(0);
        }
        kept.push((target.clone(), api, endpoint.clone()));
        Ok(endpoint)
    }
}

/// The provider's base URL without a trailing slash; the well-known default for the hosted
/// providers when none is set.
fn base_url(target: &ModelTarget) -> Result<String, ModelError> {
    let configured = target.base_url.trim().trim_end_matches('/');
    if !configured.is_empty() {
        let base = match target.provider_type {
            // Admins paste Azure's endpoint in several forms; the paths are added here.
            ProviderType::Azure => configured.trim_end_matches("/openai/v1").trim_end_matches("/openai"),
            _ => configured,
        };
        return Ok(base.to_owned());
    }
    match target.provider_type {
        ProviderType::Openai => Ok("https://api.openai.com/v1".to_owned()),
        ProviderType::Openrouter => Ok("https://openrouter.ai/api/v1".to_owned()),
        ProviderType::Vercel => Ok("https://ai-gateway.vercel.sh/v1".to_owned()),
        other => Err(config_error(format!("a {} provider needs a base URL", other.as_str()))),
    }
}

/// A string setting of the target; `None` when unset or null.
pub(crate) fn setting<'a>(target: &'a ModelTarget, key: &str) -> Result<Option<&'a str>, ModelError> {
    match target.settings.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(value)) => Ok(Some(value.as_str())),
        Some(other) => Err(config_error(format!("settings.{key} must be a string, not {other}"))),
    }
}

/// Values put into a URL path or query unencoded must not be able to change its shape.
fn check_url_token(what: &str, value: &str) -> Result<(), ModelError> {
    let valid = !value.is_empty() && value.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if valid {
        Ok(())
    } else {
        Err(config_error(format!("{what} `{value}` may only contain letters, digits, `-`, `_` and `.`")))
    }
}

fn config_error(message: impl Into<String>) -> ModelError {
    ModelError::new(ChatErrorKind::Config, message)
}

/// An image of the prompt as a `data:` URL, the form every OpenAI-family API takes inline.
/// OpenAI accepts PNG, JPEG, WEBP and non-animated GIF.
pub(crate) fn image_data_url(request: &ModelRequest, file_id: &str) -> Result<String, ModelError> {
    let image = request
        .images
        .get(file_id)
        .ok_or_else(|| config_error(format!("image {file_id} of the conversation could not be loaded")))?;
    if !matches!(image.media_type.as_str(), "image/png" | "image/jpeg" | "image/gif" | "image/webp") {
        return Err(config_error(format!(
            "image {file_id} is {}, which OpenAI models do not accept (PNG, JPEG, GIF or WEBP)",
            image.media_type
        )));
    }
    Ok(format!("data:{};base64,{}", image.media_type, data_encoding::BASE64.encode(&image.bytes)))
}

// ---------------------------------------------------------------------------------------------
// Request

/// The name under which [`Fragments`] keeps what this dialect wrote.
const KEPT_AS: &str = "openai_chat";

/// The Chat Completions body for `request`, sent to `endpoint`, as bytes. No JSON tree is built
/// for a prompt that every step resends: each history message comes from the conversation's
/// [`SentPrefix`](fragments::SentPrefix) as written for an earlier step, or is written now and kept there; the tool
/// definitions every request shares come from `fragments`.
pub(crate) fn request_body(
    request: &ModelRequest,
    endpoint: &Endpoint,
    fragments: &Fragments,
) -> Result<Vec<u8>, ModelError> {
    let max = request.target.max_output_tokens.filter(|m| *m > 0);
    let (max_tokens, max_completion_tokens) = match endpoint.max_tokens_field {
        "max_completion_tokens" => (None, max),
        _ => (max, None),
    };
    let rest = Body {
        model: &endpoint.model,
        stream: true,
        stream_options: StreamOptions { include_usage: true },
        // An empty `tools` array is rejected by several servers, so the key is left out instead.
        tools: fragments.get_or_write(KEPT_AS, &request.tools, || {
            request.tools.iter().map(|tool| fragments::raw(&tool_definition(tool))).collect()
        })?,
        max_tokens,
        max_completion_tokens,
    };
    let system = (!request.system.is_empty())
        .then(|| serde_json::to_string(&OutMessage::System { content: &request.system }))
        .transpose()
        .map_err(fragments::writing_error)?;
    let write = |message: &PromptMessage| {
        let mut out = Vec::new();
        push_message(&mut out, message, request)?;
        fragments::raw_all(&out)
    };
    fragments::with_message_pieces(request, KEPT_AS, write, |pieces| {
        let size = pieces.size() + system.as_ref().map_or(0, String::len) + 1;
        fragments::object_with_array_first("messages", size, &rest, |out| {
            if let Some(system) = &system {
                out.extend_from_slice(system.as_bytes());
                if !pieces.is_empty() {
                    out.push(b',');
                }
            }
            pieces.push_all(out);
        })
    })
}

/// A Chat Completions request body but for its messages, which are written before it.
#[derive(Serialize)]
struct Body<'a> {
    model: &'a str,
    stream: bool,
    stream_options: StreamOptions,
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    tools: Written,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_tokens: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_completion_tokens: Option<i64>,
}

#[derive(Serialize)]
struct StreamOptions {
    include_usage: bool,
}

#[derive(Serialize)]
#[serde(tag = "role", rename_all = "snake_case")]
enum OutMessage<'a> {
    System {
        content: &'a str,
    },
    User {
        content: UserContent<'a>,
    },
    Assistant {
        /// `null` when the answer was only tool calls.
        content: Option<String>,
        #[serde(skip_serializing_if = "Vec::is_empty")]
        tool_calls: Vec<OutToolCall<'a>>,
    },
    Tool {
        tool_call_id: &'a str,
        content: &'a str,
    },
}

/// A plain string, or parts when there is an image.
#[derive(Serialize)]
#[serde(untagged)]
enum UserContent<'a> {
    Text(Cow<'a, str>),
    Parts(Vec<UserPart<'a>>),
}

#[derive(Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum UserPart<'a> {
    Text { text: &'a str },
    ImageUrl { image_url: ImageUrl },
}

#[derive(Serialize)]
struct ImageUrl {
    url: String,
}

#[derive(Serialize)]
struct OutToolCall<'a> {
    id: &'a str,
    #[serde(rename = "type")]
    kind: &'static str,
    function: OutCall<'a>,
}

#[derive(Serialize)]
struct OutCall<'a> {
    name: &'a str,
    arguments: Cow<'a, str>,
}

#[derive(Serialize)]
struct OutTool<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    function: OutFunction<'a>,
}

#[derive(Serialize)]
struct OutFunction<'a> {
    name: &'a str,
    description: &'a str,
    parameters: &'a Value,
}

fn push_message<'a>(
    out: &mut Vec<OutMessage<'a>>,
    message: &'a PromptMessage,
    request: &'a ModelRequest,
) -> Result<(), ModelError> {
    match message.role {
        // The loop turns summaries into user messages and drops markers before a prompt is built;
        // should one arrive anyway, a summary reads as user context and a marker is not sent.
        Role::User | Role::Summary => {
            out.push(OutMessage::User { content: user_content(&message.parts, request)? });
        }
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
            let tool_calls: Vec<OutToolCall<'a>> = message
                .parts
                .iter()
                .filter_map(|p| match p {
                    Part::ToolCall { call_id, name, args } => Some(OutToolCall {
                        id: call_id,
                        kind: "function",
                        function: OutCall { name, arguments: arguments_string(args) },
                    }),
                    _ => None,
                })
                .collect();
            // Reasoning is not sent back: the dialect has no field for it. An answer that was
            // only reasoning (say, interrupted early) leaves nothing to send, and OpenAI rejects
            // an assistant message with neither content nor tool calls, so it is dropped.
            if text.is_empty() && tool_calls.is_empty() {
                return Ok(());
            }
            out.push(OutMessage::Assistant { content: (!text.is_empty()).then_some(text), tool_calls });
        }
        // The dialect has no is_error flag; the result text itself says what went wrong.
        Role::Tool => out.extend(message.parts.iter().filter_map(|p| match p {
            Part::ToolResult { call_id, result, .. } => {
                Some(OutMessage::Tool { tool_call_id: call_id, content: result })
            }
            _ => None,
        })),
    }
    Ok(())
}

/// A plain string for text-only messages, which every compatible server accepts; the array form
/// only when there is an image.
fn user_content<'a>(parts: &'a [Part], request: &ModelRequest) -> Result<UserContent<'a>, ModelError> {
    let has_image = parts.iter().any(|p| matches!(p, Part::Image { .. }));
    if !has_image {
        let mut texts = parts.iter().filter_map(|p| match p {
            Part::Text { text } => Some(text.as_str()),
            _ => None,
        });
        // Borrowed when there is one text part (nearly always): the history is sent every step.
        let text = match (texts.next(), texts.next()) {
            (None, _) => Cow::Borrowed(""),
            (Some(only), None) => Cow::Borrowed(only),
            (Some(first), Some(second)) => {
                Cow::Owned([first, second].into_iter().chain(texts).collect::<Vec<_>>().join("\n"))
            }
        };
        return Ok(UserContent::Text(text));
    }
    let mut content = Vec::with_capacity(parts.len());
    for part in parts {
        match part {
            Part::Text { text } => content.push(UserPart::Text { text }),
            Part::Image { file_id } => {
                content.push(UserPart::ImageUrl { image_url: ImageUrl { url: image_data_url(request, file_id)? } })
            }
            _ => {}
        }
    }
    Ok(UserContent::Parts(content))
}

/// Arguments go over the wire as a JSON string. Arguments the model produced as invalid JSON are
/// kept as a string value; those are sent back verbatim rather than quoted a second time.
/// (`to_string` of the serializer, not `Display`, which goes through the formatting machinery
/// and took twice as long: every call in the history is written again on every step.)
fn arguments_string(args: &Value) -> Cow<'_, str> {
    match args {
        Value::String(raw) => Cow::Borrowed(raw),
        other => Cow::Owned(serde_json::to_string(other).expect("a JSON value always serializes")),
    }
}

fn tool_definition(tool: &ToolSpec) -> OutTool<'_> {
    OutTool {
        kind: "function",
        function: OutFunction { name: &tool.name, description: &tool.description, parameters: &tool.parameters },
    }
}

// ---------------------------------------------------------------------------------------------
// Response

impl sse::SseDecoder for ChunkDecoder {
    fn on_event(&mut self, event: &SseEvent, out: &mut VecDeque<Result<ModelEvent, ModelError>>) -> ControlFlow<()> {
        ChunkDecoder::on_event(self, event, out)
    }

    /// No `[DONE]`: Anthropic's compatibility layer and some local servers just end the body.
    fn end_of_body(&mut self, out: &mut VecDeque<Result<ModelEvent, ModelError>>) {
        self.finish(out);
    }

    /// The finish reason came; only the trailing usage chunk or `[DONE]` can be missing.
    fn answer_complete(&self) -> bool {
        self.finish_reason.is_some()
    }

    fn api_key(&self) -> Option<&str> {
        self.api_key.as_deref()
    }
}

/// A server that ignored `stream: true`: its one `chat.completion` is replayed through the same
/// decoder, its `message` standing in for a delta.
async fn whole_completion(response: reqwest::Response, api_key: Option<String>) -> ModelStream {
    match response.bytes().await {
        Ok(body) => futures::stream::iter(decode_whole(&body, api_key)).boxed(),
        Err(error) => {
            let error = http::transport_error(error, api_key.as_deref());
            futures::stream::iter([Err(error)]).boxed()
        }
    }
}

/// Runs the decoder over a complete body. Proxies that label an event stream
/// `application/json` exist, so a body that is not a JSON object is read as SSE.
fn decode_whole(body: &[u8], api_key: Option<String>) -> VecDeque<Result<ModelEvent, ModelError>> {
    let events = if body.trim_ascii_start().starts_with(b"{") {
        let data = String::from_utf8_lossy(body).into_owned();
        vec![SseEvent { event: None, data }]
    } else {
        let mut parser = SseParser::new();
        parser.push(body);
        std::iter::from_fn(|| parser.finish()).collect()
    };
    let mut decoder = ChunkDecoder::new(api_key);
    let mut out = VecDeque::new();
    for event in &events {
        if decoder.on_event(event, &mut out).is_break() {
            return out;
        }
    }
    decoder.finish(&mut out);
    out
}

/// One `chat.completion.chunk`, with every field optional: compatible servers leave out or null
/// whatever they do not support.
#[derive(Debug, Deserialize)]
struct Chunk {
    #[serde(default)]
    choices: Option<Vec<Choice>>,
    #[serde(default)]
    usage: Option<WireUsage>,
    /// An error in the stream (null when there is none): read again whole, as an error.
    #[serde(default)]
    error: Option<Value>,
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
        // Read as a chunk at once. An error, and what is not a chunk (or a chunk naming a key
        // twice, which only a JSON value takes, keeping the last), are read again as any JSON.
        let is_error_event = event.event.as_deref() == Some("error");
        if !is_error_event
            && let Ok(chunk) = serde_json::from_str::<Chunk>(data)
            && chunk.error.is_none()
        {
            self.on_chunk(chunk, out);
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
