//! REST bodies under `/api/v1`, and the error body every failing request returns.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::message::{Message, Part, QueuedMessage};

/// `{"error": {"kind", "message"}}`, the body of every 4xx/5xx answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorDetail {
    pub kind: String,
    pub message: String,
}

/// Why a chat's last turn failed (SPEC §2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChatErrorKind {
    RateLimit,
    Overloaded,
    Auth,
    Config,
    ContextOverflow,
    Timeout,
    ContentFilter,
    Provider,
    Tool,
    Internal,
}

/// A typed chat error, kept on the chat and sent as an `error` event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatError {
    pub kind: ChatErrorKind,
    pub message: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChatStatus {
    Idle,
    Running,
    Interrupting,
    Error,
}

impl ChatStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            ChatStatus::Idle => "idle",
            ChatStatus::Running => "running",
            ChatStatus::Interrupting => "interrupting",
            ChatStatus::Error => "error",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "idle" => Some(ChatStatus::Idle),
            "running" => Some(ChatStatus::Running),
            "interrupting" => Some(ChatStatus::Interrupting),
            "error" => Some(ChatStatus::Error),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ForkRef {
    pub chat_id: String,
    pub message_id: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Chat {
    pub id: String,
    pub owner_id: String,
    pub title: Option<String>,
    pub status: ChatStatus,
    pub model_id: Option<String>,
    pub workspace_id: Option<String>,
    pub parent_id: Option<String>,
    pub forked_from: Option<ForkRef>,
    pub archived: bool,
    /// The error of the last failed turn, while `status` is `error`.
    pub error: Option<ChatError>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// `POST /chats`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateChat {
    pub content: Vec<Part>,
    #[serde(default)]
    pub model_id: Option<String>,
    #[serde(default)]
    pub workspace_id: Option<String>,
    #[serde(default)]
    pub title: Option<String>,
}

/// `PATCH /chats/{id}`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PatchChat {
    #[serde(default)]
    pub title: Option<String>,
    #[serde(default)]
    pub archived: Option<bool>,
}

/// What to do with a message sent while the agent runs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BusyBehavior {
    /// Deliver at the next step boundary.
    #[default]
    Queue,
    /// Stop the current step, then deliver.
    Interrupt,
}

/// `POST /chats/{id}/messages`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SendMessage {
    pub content: Vec<Part>,
    #[serde(default)]
    pub busy_behavior: BusyBehavior,
}

/// `PATCH /chats/{id}/messages/{mid}` on a user message: replaces it, drops what came after, and
/// runs the turn again.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EditMessage {
    pub content: Vec<Part>,
}

/// `POST /chats/{id}/fork`: a new chat with the history up to and including `message_id`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ForkChat {
    pub message_id: String,
}

/// `PATCH /chats/{id}/queue/{qid}`: new content for a message still in the queue.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EditQueuedMessage {
    pub content: Vec<Part>,
}

/// Answer to `POST /chats/{id}/messages`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SendOutcome {
    pub queued: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<Message>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queued_message: Option<QueuedMessage>,
}

/// `GET /chats/{id}/messages?before=POS&limit=N`: newest page first in time order.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MessagePage {
    pub messages: Vec<Message>,
    pub queued_messages: Vec<QueuedMessage>,
    /// Pass as `before` to get the page of older messages; absent on the first page of the chat.
    pub next_cursor: Option<i64>,
}

/// Answer to `GET /chats/{id}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChatDetail {
    #[serde(flatten)]
    pub chat: Chat,
    pub children: Vec<Chat>,
}

/// An uploaded file (`POST /files`): an image checked by its bytes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FileInfo {
    pub id: String,
    pub content_type: String,
    pub size: i64,
    pub sha256: String,
    pub created_at: DateTime<Utc>,
}

/// Token counts and cost. `input_tokens` includes the cached tokens counted in `cache_read_tokens`
/// and `cache_write_tokens`. `cost_usd` sums what is known: calls of models without prices add
/// tokens but no cost.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct UsageTotals {
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cache_read_tokens: u64,
    pub cache_write_tokens: u64,
    pub cost_usd: f64,
    /// Model calls counted.
    pub calls: u64,
}

impl UsageTotals {
    pub fn add(&mut self, other: &UsageTotals) {
        self.input_tokens += other.input_tokens;
        self.output_tokens += other.output_tokens;
        self.cache_read_tokens += other.cache_read_tokens;
        self.cache_write_tokens += other.cache_write_tokens;
        self.cost_usd += other.cost_usd;
        self.calls += other.calls;
    }
}

/// Answer to `GET /chats/{id}/usage`: the chat's own model calls, each sub-agent's (all
/// descendants, flattened), and the sum of both.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatUsage {
    pub chat_id: String,
    pub own: UsageTotals,
    pub subagents: Vec<SubagentUsage>,
    pub total: UsageTotals,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SubagentUsage {
    pub chat_id: String,
    pub parent_id: String,
    pub usage: UsageTotals,
}

/// The wire dialect of a provider. OpenRouter and Vercel AI Gateway speak OpenAI Chat
/// Completions with their own quirks; `openai_compatible` is any other server that does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProviderType {
    Anthropic,
    Openai,
    Gemini,
    Azure,
    Bedrock,
    OpenaiCompatible,
    Openrouter,
    Vercel,
}

impl ProviderType {
    pub const ALL: [ProviderType; 8] = [
        ProviderType::Anthropic,
        ProviderType::Openai,
        ProviderType::Gemini,
        ProviderType::Azure,
        ProviderType::Bedrock,
        ProviderType::OpenaiCompatible,
        ProviderType::Openrouter,
        ProviderType::Vercel,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ProviderType::Anthropic => "anthropic",
            ProviderType::Openai => "openai",
            ProviderType::Gemini => "gemini",
            ProviderType::Azure => "azure",
            ProviderType::Bedrock => "bedrock",
            ProviderType::OpenaiCompatible => "openai_compatible",
            ProviderType::Openrouter => "openrouter",
            ProviderType::Vercel => "vercel",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.as_str() == s)
    }

    /// The public endpoint used when a provider is created without a base URL. Azure and
    /// OpenAI-compatible servers have none (the URL names the resource); Bedrock's is derived
    /// from the `region` setting.
    pub fn default_base_url(self) -> Option<&'static str> {
        match self {
            ProviderType::Anthropic => Some("https://api.anthropic.com"),
            ProviderType::Openai => Some("https://api.openai.com/v1"),
            ProviderType::Gemini => Some("https://generativelanguage.googleapis.com/v1beta"),
            ProviderType::Openrouter => Some("https://openrouter.ai/api/v1"),
            ProviderType::Vercel => Some("https://ai-gateway.vercel.sh/v1"),
            ProviderType::Azure | ProviderType::Bedrock | ProviderType::OpenaiCompatible => None,
        }
    }
}

/// `POST /providers` (admin). The key is write-only.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateProvider {
    #[serde(rename = "type")]
    pub provider_type: ProviderType,
    pub name: String,
    /// Empty: the provider's public endpoint ([`ProviderType::default_base_url`]).
    #[serde(default)]
    pub base_url: String,
    #[serde(default)]
    pub api_key: Option<String>,
    /// Dialect options, e.g. `{"region": "eu-west-1", "access_key_id": "…"}` for Bedrock,
    /// `{"api_version": "…"}` for Azure.
    #[serde(default)]
    pub settings: serde_json::Value,
}

/// `PATCH /providers/{id}` (admin): only the fields given change. `api_key: null` removes the key.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PatchProvider {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_url: Option<String>,
    #[serde(default, deserialize_with = "some_even_if_null", skip_serializing_if = "Option::is_none")]
    pub api_key: Option<Option<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub settings: Option<serde_json::Value>,
}

/// `Some(None)` for an explicit `null`, so "remove" and "leave alone" differ.
fn some_even_if_null<'de, D, T>(d: D) -> Result<Option<Option<T>>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(d).map(Some)
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Provider {
    pub id: String,
    #[serde(rename = "type")]
    pub provider_type: ProviderType,
    pub name: String,
    pub base_url: String,
    pub has_api_key: bool,
    pub settings: serde_json::Value,
    pub created_at: DateTime<Utc>,
}

/// Prices in USD per million tokens. Cache prices default to the input price.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelPrices {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input_per_mtok: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_per_mtok: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_read_per_mtok: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_write_per_mtok: Option<f64>,
}

/// `POST /models` (admin).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateModel {
    pub provider_id: String,
    pub model: String,
    #[serde(default)]
    pub display_name: Option<String>,
    pub context_window: i64,
    #[serde(default)]
    pub max_output_tokens: Option<i64>,
    #[serde(default)]
    pub vision: bool,
    #[serde(default = "yes")]
    pub enabled: bool,
    #[serde(default)]
    pub is_default: bool,
    /// Share of the context window at which the conversation is compacted (default 0.7).
    #[serde(default)]
    pub compaction_threshold: Option<f64>,
    #[serde(default)]
    pub prices: ModelPrices,
    /// Dialect options laid over the provider's, e.g. `{"api": "responses"}` for OpenAI.
    #[serde(default)]
    pub settings: serde_json::Value,
}

/// `PATCH /models/{id}` (admin): only the fields given change.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PatchModel {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub display_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context_window: Option<i64>,
    #[serde(default, deserialize_with = "some_even_if_null", skip_serializing_if = "Option::is_none")]
    pub max_output_tokens: Option<Option<i64>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vision: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub is_default: Option<bool>,
    #[serde(default, deserialize_with = "some_even_if_null", skip_serializing_if = "Option::is_none")]
    pub compaction_threshold: Option<Option<f64>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prices: Option<ModelPrices>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub settings: Option<serde_json::Value>,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Model {
    pub id: String,
    pub provider_id: String,
    pub model: String,
    pub display_name: String,
    pub context_window: i64,
    pub max_output_tokens: Option<i64>,
    pub vision: bool,
    pub enabled: bool,
    pub is_default: bool,
    pub compaction_threshold: Option<f64>,
    pub prices: ModelPrices,
    pub settings: serde_json::Value,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ParamType {
    String,
    Number,
    Bool,
    Enum,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ParamValidation {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pattern: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_length: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_length: Option<usize>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TemplateParameter {
    pub name: String,
    #[serde(rename = "type")]
    pub param_type: ParamType,
    #[serde(default)]
    pub description: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default: Option<serde_json::Value>,
    #[serde(default)]
    pub required: bool,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub options: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub validation: Option<ParamValidation>,
}

/// How a template's workspaces come into being.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ProvisionerSpec {
    /// A directory under the orchestrator's workspace root, served by a relay on this host
    /// (in-process in embedded mode, a relay process over NATS when NATS is configured).
    Local,
    /// Operator scripts (`sh -c`) that bring the workspace and its relay up and down. Each gets
    /// the workspace id, relay credential, NATS URL and parameters in its environment.
    Command(CommandProvisioner),
}

/// Scripts of a `command` template; `create` is required, the others optional.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommandProvisioner {
    /// Creates the workspace and starts its relay.
    pub create: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delete: Option<String>,
    /// Longest run of one script; default `workspaces.command_timeout_seconds`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_seconds: Option<u64>,
}

/// `POST /templates` (admin).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateTemplate {
    pub name: String,
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub parameters: Vec<TemplateParameter>,
    pub provisioner: ProvisionerSpec,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Template {
    pub id: String,
    pub name: String,
    pub description: String,
    pub parameters: Vec<TemplateParameter>,
    pub provisioner: ProvisionerSpec,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WorkspaceStatus {
    Provisioning,
    Ready,
    Stopped,
    Failed,
    Deleted,
}

impl WorkspaceStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            WorkspaceStatus::Provisioning => "provisioning",
            WorkspaceStatus::Ready => "ready",
            WorkspaceStatus::Stopped => "stopped",
            WorkspaceStatus::Failed => "failed",
            WorkspaceStatus::Deleted => "deleted",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "provisioning" => Some(WorkspaceStatus::Provisioning),
            "ready" => Some(WorkspaceStatus::Ready),
            "stopped" => Some(WorkspaceStatus::Stopped),
            "failed" => Some(WorkspaceStatus::Failed),
            "deleted" => Some(WorkspaceStatus::Deleted),
            _ => None,
        }
    }
}

/// `PATCH /templates/{id}` (admin): the fields to change.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PatchTemplate {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub description: Option<String>,
    #[serde(default)]
    pub parameters: Option<Vec<TemplateParameter>>,
    #[serde(default)]
    pub provisioner: Option<ProvisionerSpec>,
}

/// `POST /workspaces`: a workspace created by a user directly (to pick for a chat).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateWorkspace {
    pub template_id: String,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub parameters: serde_json::Value,
}

/// `GET /workspaces/{id}`: the workspace with its provisioning log.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkspaceDetail {
    #[serde(flatten)]
    pub workspace: Workspace,
    pub logs: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Workspace {
    pub id: String,
    pub name: String,
    pub template_id: String,
    pub owner_id: String,
    pub status: WorkspaceStatus,
    pub parameters: serde_json::Value,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UserRole {
    Admin,
    Member,
}

impl UserRole {
    pub fn as_str(self) -> &'static str {
        match self {
            UserRole::Admin => "admin",
            UserRole::Member => "member",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "admin" => Some(UserRole::Admin),
            "member" => Some(UserRole::Member),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct User {
    pub id: String,
    pub name: String,
    pub role: UserRole,
    pub created_at: DateTime<Utc>,
}

/// `POST /users` (admin).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateUser {
    pub name: String,
    #[serde(default = "member")]
    pub role: UserRole,
}

fn member() -> UserRole {
    UserRole::Member
}

/// A freshly minted API token; the secret is shown once.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IssuedToken {
    pub user: User,
    pub token_id: String,
    pub token: String,
}
