//! The LLM provider clients behind the actors' [`ModelClient`] port.
//!
//! [`Providers`] owns one HTTP client for all providers and dispatches each request on its
//! target's dialect. One file per dialect (`openai_compat` so far); `sse` parses the event
//! streams they answer with, and `http` turns HTTP failures into typed [`ModelError`]s.
//!
//! API keys travel only in request headers: they are never logged and are scrubbed from error
//! messages.

use std::time::Duration;

use agentplane_actors::ports::{ModelClient, ModelError, ModelRequest, ModelStream};
use agentplane_schema::api::ProviderType;

mod bedrock;
mod http;
mod openai_compat;
mod sse;

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_bedrock;

/// The real model client: one connection pool shared by every provider and chat.
#[derive(Clone)]
pub struct Providers {
    http: reqwest::Client,
}

impl Providers {
    /// `connect_timeout` bounds connecting; `read_timeout` bounds each wait for more bytes, so a
    /// stalled stream fails while a long answer that keeps streaming is never cut. A total
    /// deadline (`reqwest`'s `timeout`) would kill long answers.
    pub fn new(connect_timeout: Duration, read_timeout: Duration) -> Result<Self, reqwest::Error> {
        let http = reqwest::Client::builder().connect_timeout(connect_timeout).read_timeout(read_timeout).build()?;
        Ok(Providers { http })
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
            ProviderType::OpenaiCompatible => openai_compat::stream(&self.http, request).await,
            ProviderType::Bedrock => bedrock::stream(&self.http, request).await,
            // PLACEHOLDER while the dialect modules are written (issue 5).
            other => Err(ModelError::new(
                agentplane_schema::api::ChatErrorKind::Config,
                format!("provider type {} is not supported yet", other.as_str()),
            )),
        }
    }
}
