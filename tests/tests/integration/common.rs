//! One test environment: scripted LLM + orchestrator + admin client + a default model.

use std::net::TcpListener;
use std::path::PathBuf;
use std::time::Duration;

use agentplane::server::{ModelLayer, ServerHandle, spawn_with};
use agentplane_config::Settings;
use agentplane_schema::api::{Chat, ChatStatus, CreateChat, CreateModel, CreateProvider, ProviderType, SendMessage};
use agentplane_schema::event::{EventBody, StreamEvent, ToolPhase};
use agentplane_schema::message::{Message, Part};
use agentplane_tests::{ApiClient, EventStream, NatsServer, ScriptedLlm, TestDatabase};

pub const ADMIN_TOKEN: &str = "ap_test_admin_token";
/// Generous: nothing here should take this long; it only bounds a failing test.
pub const WAIT: Duration = Duration::from_secs(30);

pub struct TestEnv {
    pub llm: ScriptedLlm,
    pub admin: ApiClient,
    pub data_dir: tempfile::TempDir,
    // Dropped in field order: the server before the database and NATS it uses.
    pub server: Option<ServerHandle>,
    /// What the server runs with; change and `restart_server` to apply.
    pub settings: Settings,
    _db: TestDatabase,
    pub nats: Option<NatsServer>,
    pub creds_dir: Option<tempfile::TempDir>,
}

async fn start_server(settings: Settings) -> ServerHandle {
    start_server_with(settings, None).await
}

async fn start_server_with(settings: Settings, layer: Option<ModelLayer>) -> ServerHandle {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    tokio::task::spawn_blocking(move || spawn_with(settings, listener, layer))
        .await
        .expect("join")
        .expect("server starts")
}

/// The provider and default model a [`TestEnv`] is configured with.
pub struct ProviderSetup {
    pub provider_type: ProviderType,
    pub base_url: String,
    pub api_key: Option<String>,
    pub settings: serde_json::Value,
    /// The provider's name for the model.
    pub model: String,
    pub max_output_tokens: Option<i64>,
    pub vision: bool,
}

impl ProviderSetup {
    /// The scripted LLM as an OpenAI-compatible endpoint (what most tests use).
    pub fn openai_compatible(llm: &ScriptedLlm) -> Self {
        ProviderSetup {
            provider_type: ProviderType::OpenaiCompatible,
            base_url: llm.base_url(),
            api_key: Some("sk-test-secret".into()),
            settings: serde_json::Value::Null,
            model: "scripted-1".into(),
            max_output_tokens: None,
            vision: false,
        }
    }
}

pub enum Db {
    Sqlite,
    Postgres,
}

/// The relay binary built next to this test binary (`target/<profile>/agentplane-relay`).
pub fn relay_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().and_then(|deps| deps.parent()).expect("target dir");
    let relay = dir.join("agentplane-relay");
    assert!(relay.is_file(), "{} is missing: build the workspace (cargo build --workspace) first", relay.display());
    relay
}

/// A nats-server with agentplane's operator, account and per-workspace credentials, and the
/// directory the orchestrator reads its own credential and signing key from.
pub fn nats_with_auth() -> (NatsServer, tempfile::TempDir) {
    let bootstrap = agentplane::nats_auth::bootstrap("ap").expect("nats bootstrap");
    let dir = tempfile::tempdir().expect("creds dir");
    agentplane::nats_auth::write_bootstrap(&bootstrap, dir.path()).expect("write bootstrap");
    (NatsServer::start_with_config(&bootstrap.server_config), dir)
}

impl TestEnv {
    pub async fn start() -> Self {
        Self::start_with(Db::Sqlite, |_| {}).await
    }

    /// Tools run by `agentplane-relay` processes over a real nats-server with per-workspace
    /// credentials.
    pub async fn start_nats(tweak: impl FnOnce(&mut Settings)) -> Self {
        let (nats, creds_dir) = nats_with_auth();
        let url = nats.url();
        let creds = creds_dir.path().to_path_buf();
        let mut env = Self::start_with(Db::Sqlite, move |s| {
            s.nats.url = url;
            s.nats.credentials_dir = creds.display().to_string();
            s.nats.relay_binary = relay_binary().display().to_string();
            s.nats.ready_timeout_seconds = 20;
            tweak(s);
        })
        .await;
        env.nats = Some(nats);
        env.creds_dir = Some(creds_dir);
        env
    }

    pub async fn start_with(db: Db, tweak: impl FnOnce(&mut Settings)) -> Self {
        Self::start_full(ScriptedLlm::start(), db, tweak).await
    }

    /// With a scripted LLM of the caller's (e.g. one answering by request content).
    pub async fn start_full(llm: ScriptedLlm, db: Db, tweak: impl FnOnce(&mut Settings)) -> Self {
        let provider = ProviderSetup::openai_compatible(&llm);
        Self::start_with_provider(llm, provider, db, tweak).await
    }

    /// With the default model served by `provider` (whose far end is `llm`, speaking that
    /// provider's dialect).
    pub async fn start_with_provider(
        llm: ScriptedLlm,
        provider: ProviderSetup,
        db: Db,
        tweak: impl FnOnce(&mut Settings),
    ) -> Self {
        Self::start_layered(llm, provider, db, tweak, None).await
    }

    /// With the server's model client wrapped by `layer` (supervision tests make it crash).
    pub async fn start_layered(
        llm: ScriptedLlm,
        provider: ProviderSetup,
        db: Db,
        tweak: impl FnOnce(&mut Settings),
        layer: Option<ModelLayer>,
    ) -> Self {
        agentplane_tests::init_tracing();
        let data_dir = tempfile::tempdir().expect("tempdir");
        let db = match db {
            Db::Sqlite => TestDatabase::sqlite(data_dir.path()),
            Db::Postgres => TestDatabase::postgres(),
        };
        let mut settings = Settings::defaults();
        settings.server.data_dir = data_dir.path().to_path_buf();
        settings.server.actor_threads = 2;
        settings.server.http_workers = 2;
        settings.database.url = db.url().to_string();
        settings.database.max_connections = 4;
        settings.auth.bootstrap_token = ADMIN_TOKEN.into();
        settings.llm.retry.initial_delay_ms = 10;
        settings.llm.retry.max_delay_ms = 2000;
        settings.llm.retry.max_attempts = 3;
        // Title calls would take replies from the scripted FIFO; the title test turns them on.
        settings.agent.generate_titles = false;
        tweak(&mut settings);
        let server = start_server_with(settings.clone(), layer).await;
        let admin = ApiClient::new(server.base_url(), ADMIN_TOKEN);
        let created = admin
            .create_provider(&CreateProvider {
                provider_type: provider.provider_type,
                name: "scripted".into(),
                base_url: provider.base_url,
                api_key: provider.api_key,
                settings: provider.settings,
            })
            .await
            .expect("provider");
        admin
            .create_model(&CreateModel {
                provider_id: created.id,
                model: provider.model,
                display_name: Some("Scripted".into()),
                context_window: 128_000,
                max_output_tokens: provider.max_output_tokens,
                vision: provider.vision,
                enabled: true,
                is_default: true,
                compaction_threshold: None,
                prices: Default::default(),
                settings: serde_json::Value::Null,
            })
            .await
            .expect("model");
        TestEnv { llm, admin, data_dir, server: Some(server), settings, _db: db, nats: None, creds_dir: None }
    }

    pub fn base_url(&self) -> String {
        self.server.as_ref().expect("server running").base_url()
    }

    /// Stops the server (as a shutdown would) and starts a new one on the same data.
    pub async fn restart_server(&mut self) {
        if let Some(old) = self.server.take() {
            tokio::task::spawn_blocking(move || old.stop()).await.expect("stop");
        }
        let server = start_server(self.settings.clone()).await;
        self.admin = ApiClient::new(server.base_url(), ADMIN_TOKEN);
        self.server = Some(server);
    }

    pub fn workspace_dir(&self, workspace_id: &str) -> PathBuf {
        self.data_dir.path().join("workspaces").join(workspace_id)
    }

    /// Creates a chat whose first turn answers `reply_text` (pushed to the script first), waits for
    /// it to be idle, and returns it with an open event stream positioned after that turn.
    pub async fn idle_chat(&self, reply_text: &str) -> (Chat, EventStream) {
        self.llm.push(agentplane_tests::Reply::text(reply_text));
        let chat = self
            .admin
            .create_chat(&CreateChat {
                content: vec![Part::text("hello")],
                model_id: None,
                workspace_id: None,
                title: None,
            })
            .await
            .expect("create chat");
        let mut stream = EventStream::connect(&self.base_url(), &chat.id, ADMIN_TOKEN, Some(0)).await.expect("ws");
        stream.wait_for_status(ChatStatus::Idle, WAIT).await.expect("first turn ends");
        (chat, stream)
    }

    /// Creates a chat with a first text message (its turn starts at once).
    pub async fn create_chat(&self, text: &str) -> Chat {
        self.admin
            .create_chat(&CreateChat {
                content: vec![Part::text(text)],
                model_id: None,
                workspace_id: None,
                title: None,
            })
            .await
            .expect("create chat")
    }

    pub async fn send(&self, chat_id: &str, text: &str) {
        self.admin
            .send(chat_id, &SendMessage { content: vec![Part::text(text)], busy_behavior: Default::default() })
            .await
            .expect("send");
    }

    /// The server's database, opened beside it: the test's own connection, as another
    /// process's would be (to hold SQLite's write lock, or to change the schema under it).
    pub async fn database_beside(&self) -> sea_orm::DatabaseConnection {
        let mut options = sea_orm::ConnectOptions::new(self.settings.database_url());
        options.max_connections(1).sqlx_logging(false);
        sea_orm::Database::connect(options).await.expect("the test's connection to the server's database")
    }

    pub async fn messages(&self, chat_id: &str) -> Vec<Message> {
        self.admin.messages(chat_id).await.expect("messages").messages
    }
}

/// A turn whose first answer is cut by a connection reset after three streamed pieces and then
/// retried: its events (watched from before the turn, since the reset is a live event only),
/// checked for a `stream_reset` before the `retry`, and the history, checked to end with the
/// whole answer and to hold no copy of the cut one.
pub async fn reset_mid_stream_turn(env: &TestEnv) -> (String, Vec<StreamEvent>) {
    let (chat, mut stream) = env.idle_chat("ready").await;
    env.llm.push_all([
        agentplane_tests::Reply::text("this answer will be cut off").chunk_chars(3).reset_after(3),
        agentplane_tests::Reply::text("whole answer"),
    ]);
    env.send(&chat.id, "go").await;
    let events = stream.wait_for(is_status(ChatStatus::Idle), WAIT).await.expect("idle");
    let reset = events.iter().position(|e| matches!(e.body, EventBody::StreamReset)).expect("stream_reset");
    let retry = events.iter().position(|e| matches!(e.body, EventBody::Retry { .. })).expect("retry");
    assert!(reset < retry);
    let messages = env.messages(&chat.id).await;
    assert_eq!(messages.last().expect("last").text(), "whole answer");
    let answers = messages.iter().filter(|m| m.role == agentplane_schema::message::Role::Assistant).count();
    assert_eq!(answers, 2, "the cut answer was not stored");
    (chat.id, events)
}

/// `(attempt, delay_ms, error kind)` of each `retry` event.
pub fn retries(events: &[StreamEvent]) -> Vec<(u32, u64, agentplane_schema::api::ChatErrorKind)> {
    events
        .iter()
        .filter_map(|e| match &e.body {
            EventBody::Retry { attempt, delay_ms, error } => Some((*attempt, *delay_ms, error.kind)),
            _ => None,
        })
        .collect()
}

pub fn is_status(status: ChatStatus) -> impl FnMut(&StreamEvent) -> bool {
    move |e| matches!(&e.body, EventBody::Status { status: s, .. } if *s == status)
}

/// Matches the `started` event of a call of the tool `tool`.
pub fn is_tool_started(tool: &str) -> impl FnMut(&StreamEvent) -> bool + '_ {
    move |e| matches!(&e.body, EventBody::ToolCall { phase: ToolPhase::Started, name, .. } if name == tool)
}

/// Every durable event of `events` follows the one before it: no gap, no repeat.
pub fn assert_seqs_follow(events: &[StreamEvent]) {
    let seqs: Vec<i64> = events.iter().filter_map(|e| e.seq).collect();
    assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "durable seqs with a gap or repeat: {seqs:?}");
}

/// `(call_id, name, result, is_error)` of every tool result in `messages`.
pub fn tool_results(messages: &[Message]) -> Vec<(String, String, String, bool)> {
    messages
        .iter()
        .flat_map(|m| m.parts.iter())
        .filter_map(|p| match p {
            Part::ToolResult { call_id, name, result, is_error } => {
                Some((call_id.clone(), name.clone(), result.clone(), *is_error))
            }
            _ => None,
        })
        .collect()
}
