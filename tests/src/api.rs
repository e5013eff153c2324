//! A typed client for the agentplane REST API.
//!
//! Bodies are the `agentplane_schema::api` types, so a test breaks at compile time when the wire
//! contract changes. Non-2xx answers become [`Error::Api`] with the status and the server's
//! `{"error": {"kind", "message"}}`; [`ApiClient::raw`] is there for bad-input tests that need to
//! send what the types would not allow.

use std::time::Duration;

use agentplane_schema::api::{
    Chat, ChatDetail, ChatUsage, CreateChat, CreateModel, CreateProvider, CreateTemplate, CreateUser, FileInfo,
    IssuedToken, MessagePage, Model, PatchChat, PatchModel, PatchProvider, Provider, SendMessage, SendOutcome,
    Template, Workspace,
};
use reqwest::{Method, RequestBuilder, StatusCode};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::error::{Error, Result};
use crate::ws::EventStream;

/// Connecting to a local server takes microseconds; a long connect means it is not listening.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// REST calls are short (streams go over the WebSocket), so a total deadline is safe here and
/// turns a stuck server into a failing test instead of a hung one.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// How long an idle pooled connection is kept.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(2);
/// First and largest pause between polls of [`ApiClient::wait_until_chat`].
const POLL_START: Duration = Duration::from_millis(10);
const POLL_MAX: Duration = Duration::from_millis(200);

/// A client acting as one user (or anonymously). Cheap to clone.
#[derive(Debug, Clone)]
pub struct ApiClient {
    http: reqwest::Client,
    base: String,
    token: Option<String>,
}

impl ApiClient {
    /// `base_url` is the server root (`http://127.0.0.1:PORT`), without `/api/v1`.
    pub fn new(base_url: impl Into<String>, token: impl Into<String>) -> Self {
        let http = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(REQUEST_TIMEOUT)
            // Shorter than the server's keep-alive (5 s), so a pooled connection is never reused
            // just as the server closes it (the request would fail with "error sending request").
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .build()
            .expect("reqwest client with rustls");
        let token = token.into();
        ApiClient {
            http,
            base: base_url.into().trim_end_matches('/').to_string(),
            token: (!token.is_empty()).then_some(token),
        }
    }

    /// The same server as another user; shares the connection pool.
    pub fn with_token(&self, token: impl Into<String>) -> Self {
        ApiClient { token: Some(token.into()), ..self.clone() }
    }

    /// The same server without credentials (auth tests).
    pub fn anonymous(&self) -> Self {
        ApiClient { token: None, ..self.clone() }
    }

    pub fn base_url(&self) -> &str {
        &self.base
    }

    pub fn token(&self) -> Option<&str> {
        self.token.as_deref()
    }

    fn request(&self, method: Method, path: &str) -> RequestBuilder {
        let req = self.http.request(method, format!("{}{path}", self.base));
        match &self.token {
            Some(token) => req.bearer_auth(token),
            None => req,
        }
    }

    /// Sends and returns status and body; the body is `Null` when empty and a JSON string when it
    /// is not JSON.
    async fn exchange(req: RequestBuilder) -> Result<(StatusCode, Value)> {
        let resp = req.send().await?;
        let status = resp.status();
        let bytes = resp.bytes().await?;
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()))
        };
        Ok((status, body))
    }

    async fn call<T: DeserializeOwned>(&self, method: Method, path: &str, body: Option<&impl Serialize>) -> Result<T> {
        let mut req = self.request(method, path);
        if let Some(body) = body {
            req = req.json(body);
        }
        let (status, value) = Self::exchange(req).await?;
        if !status.is_success() {
            return Err(Error::api(status, value));
        }
        serde_json::from_value(value.clone()).map_err(|source| Error::Decode {
            what: std::any::type_name::<T>(),
            raw: value.to_string(),
            source,
        })
    }

    /// For answers whose body does not matter (204, or an acknowledgement).
    async fn call_ignoring_body(&self, method: Method, path: &str) -> Result<()> {
        let (status, value) = Self::exchange(self.request(method, path)).await?;
        if !status.is_success() {
            return Err(Error::api(status, value));
        }
        Ok(())
    }

    /// Any request; `path` starts at the root (`/api/v1/chats`, `/healthz`). Never fails on a
    /// status, only on transport.
    pub async fn raw(&self, method: Method, path: &str, body: Option<Value>) -> Result<(StatusCode, Value)> {
        let mut req = self.request(method, path);
        if let Some(body) = body {
            req = req.json(&body);
        }
        Self::exchange(req).await
    }

    /// `GET /healthz` answered 2xx.
    pub async fn healthz(&self) -> bool {
        matches!(self.raw(Method::GET, "/healthz", None).await, Ok((status, _)) if status.is_success())
    }

    pub async fn create_chat(&self, body: &CreateChat) -> Result<Chat> {
        self.call(Method::POST, "/api/v1/chats", Some(body)).await
    }

    pub async fn get_chat(&self, id: &str) -> Result<ChatDetail> {
        self.call(Method::GET, &format!("/api/v1/chats/{id}"), None::<&()>).await
    }

    pub async fn list_chats(&self) -> Result<Vec<Chat>> {
        self.call(Method::GET, "/api/v1/chats", None::<&()>).await
    }

    pub async fn patch_chat(&self, id: &str, body: &PatchChat) -> Result<Chat> {
        self.call(Method::PATCH, &format!("/api/v1/chats/{id}"), Some(body)).await
    }

    pub async fn delete_chat(&self, id: &str) -> Result<()> {
        self.call_ignoring_body(Method::DELETE, &format!("/api/v1/chats/{id}")).await
    }

    /// The newest page of messages (and the queue).
    pub async fn messages(&self, id: &str) -> Result<MessagePage> {
        self.messages_page(id, None, None).await
    }

    /// A page of messages older than position `before`.
    pub async fn messages_page(&self, id: &str, before: Option<i64>, limit: Option<u32>) -> Result<MessagePage> {
        let mut query = Vec::new();
        if let Some(before) = before {
            query.push(format!("before={before}"));
        }
        if let Some(limit) = limit {
            query.push(format!("limit={limit}"));
        }
        let query = if query.is_empty() { String::new() } else { format!("?{}", query.join("&")) };
        self.call(Method::GET, &format!("/api/v1/chats/{id}/messages{query}"), None::<&()>).await
    }

    pub async fn send(&self, id: &str, body: &SendMessage) -> Result<SendOutcome> {
        self.call(Method::POST, &format!("/api/v1/chats/{id}/messages"), Some(body)).await
    }

    pub async fn delete_queued(&self, chat_id: &str, queued_id: &str) -> Result<()> {
        self.call_ignoring_body(Method::DELETE, &format!("/api/v1/chats/{chat_id}/queue/{queued_id}")).await
    }

    pub async fn interrupt(&self, id: &str) -> Result<()> {
        self.call_ignoring_body(Method::POST, &format!("/api/v1/chats/{id}/interrupt")).await
    }

    pub async fn create_provider(&self, body: &CreateProvider) -> Result<Provider> {
        self.call(Method::POST, "/api/v1/providers", Some(body)).await
    }

    pub async fn patch_provider(&self, id: &str, body: &PatchProvider) -> Result<Provider> {
        self.call(Method::PATCH, &format!("/api/v1/providers/{id}"), Some(body)).await
    }

    pub async fn delete_provider(&self, id: &str) -> Result<()> {
        self.call_ignoring_body(Method::DELETE, &format!("/api/v1/providers/{id}")).await
    }

    pub async fn patch_model(&self, id: &str, body: &PatchModel) -> Result<Model> {
        self.call(Method::PATCH, &format!("/api/v1/models/{id}"), Some(body)).await
    }

    pub async fn delete_model(&self, id: &str) -> Result<()> {
        self.call_ignoring_body(Method::DELETE, &format!("/api/v1/models/{id}")).await
    }

    /// `POST /files` with `bytes` as the body (the declared type is whatever the caller says).
    pub async fn upload_file(&self, bytes: Vec<u8>, content_type: &str) -> Result<FileInfo> {
        let req = self.request(Method::POST, "/api/v1/files").header("content-type", content_type).body(bytes);
        let (status, value) = Self::exchange(req).await?;
        if !status.is_success() {
            return Err(Error::api(status, value));
        }
        serde_json::from_value(value.clone()).map_err(|source| Error::Decode {
            what: "FileInfo",
            raw: value.to_string(),
            source,
        })
    }

    pub async fn chat_usage(&self, chat_id: &str) -> Result<ChatUsage> {
        self.call(Method::GET, &format!("/api/v1/chats/{chat_id}/usage"), None::<&()>).await
    }

    pub async fn list_providers(&self) -> Result<Vec<Provider>> {
        self.call(Method::GET, "/api/v1/providers", None::<&()>).await
    }

    pub async fn create_model(&self, body: &CreateModel) -> Result<Model> {
        self.call(Method::POST, "/api/v1/models", Some(body)).await
    }

    pub async fn list_models(&self) -> Result<Vec<Model>> {
        self.call(Method::GET, "/api/v1/models", None::<&()>).await
    }

    pub async fn create_template(&self, body: &CreateTemplate) -> Result<Template> {
        self.call(Method::POST, "/api/v1/templates", Some(body)).await
    }

    pub async fn list_templates(&self) -> Result<Vec<Template>> {
        self.call(Method::GET, "/api/v1/templates", None::<&()>).await
    }

    pub async fn list_workspaces(&self) -> Result<Vec<Workspace>> {
        self.call(Method::GET, "/api/v1/workspaces", None::<&()>).await
    }

    pub async fn create_user(&self, body: &CreateUser) -> Result<IssuedToken> {
        self.call(Method::POST, "/api/v1/users", Some(body)).await
    }

    /// Opens the chat's event stream as this client's user.
    pub async fn stream(&self, chat_id: &str, after_seq: Option<i64>) -> Result<EventStream> {
        EventStream::connect(&self.base, chat_id, self.token.as_deref().unwrap_or_default(), after_seq).await
    }

    /// Polls `GET /chats/{id}` until `done` holds. Prefer waiting on [`crate::ws::EventStream`]
    /// events; this is for checks made after the stream is gone.
    pub async fn wait_until_chat(
        &self,
        id: &str,
        mut done: impl FnMut(&Chat) -> bool,
        timeout: Duration,
    ) -> Result<Chat> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut pause = POLL_START;
        loop {
            let chat = self.get_chat(id).await?.chat;
            if done(&chat) {
                return Ok(chat);
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return Err(Error::Timeout {
                    after: timeout,
                    what: format!("chat {id} to reach the expected state (last status {:?})", chat.status),
                });
            }
            tokio::time::sleep(pause.min(deadline - now)).await;
            pause = (pause * 2).min(POLL_MAX);
        }
    }
}
