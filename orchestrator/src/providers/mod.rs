//! The LLM provider clients behind the actors' [`ModelClient`] port.
//!
//! [`Providers`] owns one HTTP client for all providers and dispatches each request on its
//! target's dialect. One file per dialect: `openai_compat` for Chat Completions (which also knows
//! the endpoints of the OpenAI family), `openai_responses` for OpenAI's and Azure's Responses API,
//! `anthropic`, `gemini`, `bedrock`; `sse` parses the event streams they answer with, and `http`
//! turns HTTP failures into typed [`ModelError`]s. [`decode_recorded`] runs a dialect's decoder
//! over a whole body, for the decoder benchmark.
//!
//! API keys travel only in request headers: they are never logged and are scrubbed from error
//! messages.

use std::sync::Arc;
use std::time::Duration;

use agentplane_actors::ports::{ModelClient, ModelError, ModelEvent, ModelRequest, ModelStream};
use agentplane_schema::api::ProviderType;

mod anthropic;
mod bedrock;
mod fragments;
mod gemini;
mod http;
mod openai_compat;
mod openai_responses;
mod sse;

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_anthropic;
#[cfg(test)]
mod tests_bedrock;
#[cfg(test)]
mod tests_gemini;
#[cfg(test)]
mod tests_openai;

/// A provider wire format, to name a decoder in [`decode_recorded`].
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WireDialect {
    /// Chat Completions SSE (OpenAI, Azure, OpenRouter, Vercel and compatible servers).
    OpenAiChat,
    /// The Responses API SSE (OpenAI and Azure).
    OpenAiResponses,
    /// Anthropic Messages SSE.
    Anthropic,
    /// Gemini `streamGenerateContent` (SSE or a JSON array).
    Gemini,
    /// Bedrock ConverseStream, AWS event-stream frames.
    Bedrock,
}

/// Runs `dialect`'s streaming decoder over a whole response body, without HTTP: the items the
/// provider client would yield for a server that sent exactly these bytes. Not an API: it exists
/// for the decoder benchmark (`benches/benches/provider_parsing.rs`).
#[doc(hidden)]
pub fn decode_recorded(dialect: WireDialect, body: &[u8]) -> Vec<Result<ModelEvent, ModelError>> {
    match dialect {
        WireDialect::OpenAiChat => openai_compat::decode_body(body),
        WireDialect::OpenAiResponses => openai_responses::decode_body(body),
        WireDialect::Anthropic => anthropic::decode_body(body),
        WireDialect::Gemini => gemini::decode_body(body),
        WireDialect::Bedrock => bedrock::decode_body(body),
    }
}

/// The real model client: one connection pool shared by every provider and chat.
#[derive(Clone)]
pub struct Providers {
    http: reqwest::Client,
    /// History messages and tool definitions as the dialects wrote them for earlier steps.
    fragments: Arc<fragments::Fragments>,
    endpoints: Arc<openai_compat::Endpoints>,
}

impl Providers {
    /// `connect_timeout` bounds connecting; `read_timeout` bounds each wait for more bytes, so a
    /// stalled stream fails while a long answer that keeps streaming is never cut. A total
    /// deadline (`reqwest`'s `timeout`) would kill long answers.
    pub fn new(connect_timeout: Duration, read_timeout: Duration) -> Result<Self, reqwest::Error> {
        let http = reqwest::Client::builder().connect_timeout(connect_timeout).read_timeout(read_timeout).build()?;
        Ok(Providers { http, fragments: Default::default(), endpoints: Default::default() })
    }
}

impl Providers {
    /// The body `dialect` would send for `request`, written as [`ModelClient::stream`] writes
    /// it (the conversation's memo and the kept fragments included), without sending it. Not an
    /// API: it exists for the request-writing benchmark (`benches/benches/request_writing.rs`).
    #[doc(hidden)]
    pub fn write_request(&self, dialect: WireDialect, request: &ModelRequest) -> Result<Vec<u8>, ModelError> {
        match dialect {
            WireDialect::OpenAiChat => {
                let endpoint = self.endpoints.get(&request.target, openai_compat::Api::ChatCompletions)?;
                openai_compat::request_body(request, &endpoint, &self.fragments)
            }
            WireDialect::OpenAiResponses => {
                let endpoint = self.endpoints.get(&request.target, openai_compat::Api::Responses)?;
                openai_responses::request_body(request, &endpoint)
            }
            WireDialect::Anthropic => anthropic::request_body(request),
            WireDialect::Gemini => gemini::request_body(request),
            WireDialect::Bedrock => bedrock::body_bytes(request),
        }
    }
}

impl std::fmt::Debug for Providers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Providers").finish_non_exhaustive()
    }
}

#[async_trait::async_trait]
impl ModelClient for Providers {
    async fn stream(&self, request: ModelRequest) -> Result<ModelStream, ModelError> {
        tracing::debug!(
            provider = request.target.provider_type.as_str(),
            model = %request.target.model,
            messages = request.messages.len(),
            tools = request.tools.len(),
            "model call"
        );
        match request.target.provider_type {
            ProviderType::OpenaiCompatible
            | ProviderType::Openai
            | ProviderType::Azure
            | ProviderType::Openrouter
            | ProviderType::Vercel => match openai_compat::Api::for_target(&request.target)? {
                openai_compat::Api::ChatCompletions => {
                    openai_compat::stream(&self.http, &self.fragments, &self.endpoints, request).await
                }
                openai_compat::Api::Responses => openai_responses::stream(&self.http, &self.endpoints, request).await,
            },
            ProviderType::Anthropic => anthropic::stream(&self.http, request).await,
            ProviderType::Gemini => gemini::stream(&self.http, request).await,
            ProviderType::Bedrock => bedrock::stream(&self.http, request).await,
        }
    }
}
