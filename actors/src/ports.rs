//! The ports through which the actor tree reaches the world. The orchestrator plugs in the real
//! adapters (database, provider clients, NATS or in-process transport, provisioners); the actors
//! never name a concrete one.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use agentplane_schema::api::{ChatErrorKind, ProviderType};
use agentplane_schema::message::{Part, Role};
use agentplane_schema::tool::{ToolRequest, ToolResult};
use futures::stream::BoxStream;
use tokio::sync::mpsc;

// ---------------------------------------------------------------------------------------------
// Model

/// Where a model call goes: the provider's dialect, endpoint and key, and the model name.
#[derive(Clone, PartialEq)]
pub struct ModelTarget {
    pub provider_type: ProviderType,
    pub base_url: String,
    /// Decrypted only for the call; never logged (see the manual Debug below).
    pub api_key: Option<String>,
    pub model: String,
    pub max_output_tokens: Option<i64>,
    /// The provider's settings with the model's own settings laid over them (model keys win):
    /// dialect options such as Azure's `api_version`, Bedrock's `region`, OpenAI's `api`.
    pub settings: serde_json::Value,
}

impl std::fmt::Debug for ModelTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelTarget")
            .field("provider_type", &self.provider_type)
            .field("base_url", &self.base_url)
            .field("api_key", &self.api_key.as_ref().map(|_| "<redacted>"))
            .field("model", &self.model)
            .finish()
    }
}

/// One message of the prompt.
#[derive(Debug, Clone, PartialEq)]
pub struct PromptMessage {
    pub role: Role,
    /// The history message's own parts, shared.
    pub parts: Arc<Vec<Part>>,
}

/// A tool the model may call.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolSpec {
    pub name: String,
    pub description: String,
    /// JSON schema of the arguments object.
    pub parameters: serde_json::Value,
}

#[derive(Debug, Clone)]
pub struct ModelRequest {
    pub target: ModelTarget,
    pub system: String,
    /// Shared: a chat keeps its prompt list between steps and adds only the new messages
    /// ([`crate::prompt::PromptList`]), and a retried call resends the same list.
    pub messages: Arc<Vec<PromptMessage>>,
    /// Shared: the same definitions go with every request.
    pub tools: Arc<[ToolSpec]>,
    /// The bytes of every image the messages refer to (`Part::Image { file_id }`), by file id.
    pub images: HashMap<String, ImageData>,
    /// The conversation's memo: the same one for every request of a chat, a new one for a call
    /// that stands alone (a title).
    pub memo: PromptMemo,
}

/// Where a model client keeps what it wrote of one conversation's prompt, for the conversation's
/// next request: that request resends the same history with a few messages more, and only those
/// need writing. The chat holds it, so it goes when the chat is unloaded. What is kept is the
/// client's own business; a value of another type than the one asked for is replaced.
#[derive(Clone, Default)]
pub struct PromptMemo(Arc<std::sync::Mutex<Option<Box<dyn std::any::Any + Send>>>>);

impl PromptMemo {
    /// `f` on the kept `T`, a new one if none is kept.
    pub fn with<T: Default + Send + 'static, R>(&self, f: impl FnOnce(&mut T) -> R) -> R {
        let mut kept = self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(value) = kept.as_mut().and_then(|value| value.downcast_mut::<T>()) {
            return f(value);
        }
        let mut value = T::default();
        let result = f(&mut value);
        *kept = Some(Box::new(value));
        result
    }

    /// Lets what is kept go.
    pub fn clear(&self) {
        *self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = None;
    }

    /// Whether nothing is kept.
    pub fn is_empty(&self) -> bool {
        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner).is_none()
    }
}

impl std::fmt::Debug for PromptMemo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PromptMemo")
    }
}

/// An uploaded image, checked by its magic bytes when it was stored.
#[derive(Clone, PartialEq)]
pub struct ImageData {
    /// `image/png`, `image/jpeg`, `image/gif` or `image/webp`.
    pub media_type: String,
    pub bytes: Arc<[u8]>,
}

impl std::fmt::Debug for ImageData {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ImageData({}, {} bytes)", self.media_type, self.bytes.len())
    }
}

/// Tokens of one model call. `input_tokens` is the whole prompt, cached tokens included (as
/// OpenAI's `prompt_tokens`); `cache_read_tokens` and `cache_write_tokens` are the parts of it read
/// from and written to the provider's prompt cache. `output_tokens` includes reasoning tokens.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cache_read_tokens: u64,
    pub cache_write_tokens: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    EndTurn,
    ToolUse,
    MaxTokens,
    ContentFilter,
    Other,
}

/// What a streaming model call yields, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum ModelEvent {
    TextDelta(String),
    ReasoningDelta {
        text: String,
        signature: Option<String>,
    },
    /// A tool call begins; `index` identifies it in later `ToolCallArgs` pieces.
    ToolCallStart {
        index: usize,
        call_id: String,
        name: String,
    },
    ToolCallArgs {
        index: usize,
        piece: String,
    },
    Usage(Usage),
    Finish(StopReason),
}

/// A failed model call, typed so the loop knows whether and when to retry.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{kind:?}: {message}")]
pub struct ModelError {
    pub kind: ChatErrorKind,
    pub message: String,
    pub retryable: bool,
    /// The provider's `retry-after`, when it sent one.
    pub retry_after: Option<Duration>,
}

impl ModelError {
    pub fn new(kind: ChatErrorKind, message: impl Into<String>) -> Self {
        let retryable = matches!(
            kind,
            ChatErrorKind::RateLimit | ChatErrorKind::Overloaded | ChatErrorKind::Provider | ChatErrorKind::Timeout
        );
        ModelError { kind, message: message.into(), retryable, retry_after: None }
    }
}

pub type ModelStream = BoxStream<'static, Result<ModelEvent, ModelError>>;

/// Streams one model answer. Errors before the first event come from the outer `Result`;
/// errors mid-stream as an item.
#[async_trait::async_trait]
pub trait ModelClient: Send + Sync + 'static {
    async fn stream(&self, request: ModelRequest) -> Result<ModelStream, ModelError>;
}

// ---------------------------------------------------------------------------------------------
// Tools

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransportErrorKind {
    /// Nobody serves the workspace (no relay, or the workspace is stopped or deleted).
    Offline,
    Timeout,
    Other,
}

#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct TransportError {
    pub kind: TransportErrorKind,
    pub message: String,
}

/// Carries tool requests to the relay serving a workspace.
#[async_trait::async_trait]
pub trait ToolTransport: Send + Sync + 'static {
    /// Runs one tool call; output pieces of `execute` go to `output` as they appear.
    async fn call(
        &self,
        workspace_id: &str,
        request: ToolRequest,
        output: Option<mpsc::UnboundedSender<String>>,
    ) -> Result<ToolResult, TransportError>;

    /// Stops a running call (kills its process group); a no-op for a call that is not running.
    async fn cancel(&self, workspace_id: &str, call_id: &str);
}

// ---------------------------------------------------------------------------------------------
// Store

use agentplane_schema::api::{Chat, ChatError, ChatStatus, Template, Workspace};
use agentplane_schema::event::{SharedEvent, StreamEvent};
use agentplane_schema::message::{Message, QueuedMessage};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("not found: {0}")]
    NotFound(String),
    /// The chat is owned by another replica now (lease epoch moved on).
    #[error("chat ownership lost")]
    Fenced,
    #[error("database: {0}")]
    Database(String),
    /// The change would break something that depends on the row (named in the message).
    #[error("{0}")]
    Conflict(String),
}

/// Everything an actor needs to (re)build a chat's live state.
#[derive(Debug, Clone)]
pub struct ChatState {
    pub chat: Chat,
    /// Live (not soft-deleted) messages in position order.
    pub messages: Vec<Message>,
    pub queued: Vec<QueuedMessage>,
    pub last_seq: i64,
    /// Highest position ever used, deleted messages included.
    pub last_position: i64,
    /// 0 for a root chat, 1 for its sub-agents, and so on.
    pub depth: u32,
    /// Sub-agents of this chat, oldest first.
    pub children: Vec<Chat>,
}

/// A sub-agent's chat, as its parent creates it.
#[derive(Debug, Clone)]
pub struct NewChild {
    pub parent: Chat,
    pub title: Option<String>,
    pub model_id: Option<String>,
    pub workspace_id: Option<String>,
}

/// A model as the loop uses it: where to call and how large its context is.
#[derive(Debug, Clone)]
pub struct ResolvedModel {
    pub id: String,
    pub target: ModelTarget,
    pub context_window: i64,
    /// Share of the context window at which the conversation is compacted (default 0.7).
    pub compaction_threshold: f64,
    /// Whether the model takes images.
    pub vision: bool,
    pub prices: Prices,
}

/// USD per million tokens; a missing price means the cost is unknown.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Prices {
    pub input: Option<f64>,
    pub output: Option<f64>,
    /// Defaults to the input price.
    pub cache_read: Option<f64>,
    /// Defaults to the input price.
    pub cache_write: Option<f64>,
}

impl Prices {
    /// The cost of `usage`, when the input and output prices are known. Cached tokens are part
    /// of `input_tokens` and are charged at their own price instead of the input price.
    pub fn cost(&self, usage: &Usage) -> Option<f64> {
        let (input, output) = (self.input?, self.output?);
        let cached = usage.cache_read_tokens + usage.cache_write_tokens;
        let fresh = usage.input_tokens.saturating_sub(cached) as f64;
        let micro = fresh * input
            + usage.cache_read_tokens as f64 * self.cache_read.unwrap_or(input)
            + usage.cache_write_tokens as f64 * self.cache_write.unwrap_or(input)
            + usage.output_tokens as f64 * output;
        Some(micro / 1_000_000.0)
    }
}

/// One state change of a chat. A [`Batch`] of them is committed in one transaction together with
/// the durable events that announce them.
#[derive(Debug, Clone)]
pub enum Op {
    InsertMessage(Message),
    SetStatus {
        status: ChatStatus,
        error: Option<ChatError>,
    },
    SetWorkspace(Option<String>),
    InsertQueued {
        message: QueuedMessage,
        position: i64,
    },
    DeleteQueued {
        id: String,
    },
    UpdateQueued {
        id: String,
        content: Vec<Part>,
    },
    SetTitle(String),
    SetArchived(bool),
    /// Soft-deletes the messages at `from_position` and after.
    DropMessagesFrom {
        from_position: i64,
    },
    InsertToolCall {
        /// agentplane's id of the call (the relay's call id); `call_id` is the model's.
        id: String,
        call_id: String,
        message_id: String,
        name: String,
        args: serde_json::Value,
        user_id: String,
        workspace_id: Option<String>,
    },
    FinishToolCall {
        call_id: String,
        message_id: String,
        status: ToolCallStatus,
        result: String,
        is_error: bool,
        exit_code: Option<i32>,
        duration_ms: Option<u64>,
        workspace_id: Option<String>,
    },
    RecordUsage {
        message_id: String,
        model_id: String,
        usage: Usage,
        cost_usd: Option<f64>,
    },
    Audit {
        user_id: Option<String>,
        action: String,
        target_type: String,
        target_id: Option<String>,
        details: serde_json::Value,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ToolCallStatus {
    Dispatched,
    Done,
    Interrupted,
}

impl ToolCallStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            ToolCallStatus::Dispatched => "dispatched",
            ToolCallStatus::Done => "done",
            ToolCallStatus::Interrupted => "interrupted",
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct Batch {
    pub ops: Vec<Op>,
    /// Durable events with their `seq` assigned; stored, and `chats.last_seq` advanced. Shared
    /// with the bus, which publishes them once they are stored.
    pub events: Vec<Arc<SharedEvent>>,
}

/// The database as the actors see it.
#[async_trait::async_trait]
pub trait Store: Send + Sync + 'static {
    async fn load_chat(&self, chat_id: &str) -> Result<ChatState, StoreError>;
    /// The chat's model, or the default model when `model_id` is `None`.
    async fn resolve_model(&self, model_id: Option<&str>) -> Result<ResolvedModel, StoreError>;
    /// Applies `batch` atomically.
    async fn commit(&self, chat_id: &str, batch: Batch) -> Result<(), StoreError>;
    /// Creates a sub-agent's chat row (same owner, `parent_id` set).
    async fn create_child(&self, child: NewChild) -> Result<Chat, StoreError>;
    /// The bytes of uploaded images, by file id; ids that do not exist are left out.
    async fn load_images(&self, file_ids: &[String]) -> Result<HashMap<String, ImageData>, StoreError>;
}

// ---------------------------------------------------------------------------------------------
// Events

/// Fans chat events out to the sessions watching them.
pub trait EventBus: Send + Sync + 'static {
    fn publish(&self, event: Arc<SharedEvent>);
    fn subscribe(&self, chat_id: &str) -> tokio::sync::broadcast::Receiver<Arc<SharedEvent>>;
    /// [`EventBus::subscribe`], and with it what the chat is streaming now that nothing has
    /// closed yet (the answer so far, running tool calls' output so far), as ephemeral events
    /// stamped after the last durable event published: what a new watcher needs to show a
    /// stream from its start. Later pieces come on the receiver.
    fn subscribe_streaming(
        &self,
        chat_id: &str,
    ) -> (tokio::sync::broadcast::Receiver<Arc<SharedEvent>>, Vec<StreamEvent>);
}

// ---------------------------------------------------------------------------------------------
// Workspaces

#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct ProvisionError {
    /// Safe to show to the model: says what to change.
    pub message: String,
}

/// Templates and workspace lifecycle, as the platform tools need them.
#[async_trait::async_trait]
pub trait Provisioner: Send + Sync + 'static {
    async fn list_templates(&self, user_id: &str) -> Result<Vec<Template>, ProvisionError>;
    /// By id or by name.
    async fn get_template(&self, template: &str) -> Result<Option<Template>, ProvisionError>;
    /// Validates the parameters, provisions, and returns once the workspace is ready.
    async fn create_workspace(
        &self,
        user_id: &str,
        chat_id: &str,
        template: &Template,
        name: Option<String>,
        parameters: serde_json::Value,
    ) -> Result<Workspace, ProvisionError>;
    async fn get_workspace(&self, workspace_id: &str) -> Result<Option<Workspace>, ProvisionError>;
}
