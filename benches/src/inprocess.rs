//! A replica in this process (`agentplane::server::spawn`: its own thread and actix system, a
//! real HTTP listener, SQLite in a temp dir) with the scripted LLM as its default model, for
//! measurements that need the actors' handles or the event bus next to the public API: loadgen's
//! `mailbox` scenario and the criterion benches `chat_actor`, `subagents` and `fanout`.

use std::sync::Arc;
use std::time::Duration;

use agentplane::server::ServerHandle;
use agentplane_actors::ChatHandle;
use agentplane_actors::ports::EventBus;
use agentplane_schema::api::{Chat, ChatStatus, CreateChat};
use agentplane_schema::event::{EventBody, SharedEvent};
use agentplane_schema::message::Part;
use agentplane_tests::{ApiClient, ScriptedLlm};
use anyhow::{Context, bail};
use tokio::sync::broadcast;

use crate::{ADMIN_TOKEN, setup_provider};

/// How long a turn of the zero-latency model may take before a measurement gives up.
pub const TURN_TIMEOUT: Duration = Duration::from_secs(60);

/// The server, the model it talks to, and an admin client; stopped on [`InProcessServer::stop`]
/// (or on drop, which blocks).
pub struct InProcessServer {
    pub server: ServerHandle,
    pub admin: ApiClient,
    _llm: ScriptedLlm,
    _data: tempfile::TempDir,
}

/// Runs `benches` against a server in this process that answers with `llm`, on the criterion
/// benches' runtime ([`crate::bench_runtime`]), and stops the server after them.
pub fn bench_with(llm: ScriptedLlm, benches: impl FnOnce(&tokio::runtime::Runtime, &InProcessServer)) {
    let rt = crate::bench_runtime();
    let server = rt.block_on(InProcessServer::start(llm, |_| {})).expect("an in-process server");
    benches(&rt, &server);
    rt.block_on(server.stop()).expect("server stopped");
}

impl InProcessServer {
    /// Starts a server that answers with `llm`; `configure` adjusts the settings first (title
    /// generation is off, since title calls would be model requests outside what is measured).
    pub async fn start(
        llm: ScriptedLlm,
        configure: impl FnOnce(&mut agentplane_config::Settings) + Send + 'static,
    ) -> anyhow::Result<Self> {
        let data = tempfile::tempdir()?;
        let mut settings = agentplane_config::Settings::defaults();
        settings.server.data_dir = data.path().to_path_buf();
        settings.auth.bootstrap_token = ADMIN_TOKEN.into();
        settings.agent.generate_titles = false;
        configure(&mut settings);
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        // `spawn` blocks until the replica listens.
        let server = tokio::task::spawn_blocking(move || agentplane::server::spawn(settings, listener)).await??;
        let admin = ApiClient::new(server.base_url(), ADMIN_TOKEN);
        setup_provider(&admin, &llm).await?;
        Ok(InProcessServer { server, admin, _llm: llm, _data: data })
    }

    pub fn base_url(&self) -> String {
        self.server.base_url()
    }

    /// A chat created over the API whose first turn (`first` as the user message) has ended.
    pub async fn idle_chat(&self, first: &str) -> anyhow::Result<Chat> {
        let chat = self
            .admin
            .create_chat(&CreateChat {
                content: vec![Part::text(first)],
                model_id: None,
                workspace_id: None,
                title: None,
            })
            .await?;
        // The create answers once the turn is recorded as running, so idle here means it ended.
        let settled = |c: &Chat| matches!(c.status, ChatStatus::Idle | ChatStatus::Error);
        let chat = self.admin.wait_until_chat(&chat.id, settled, TURN_TIMEOUT).await?;
        if chat.status != ChatStatus::Idle {
            bail!("the first turn of chat {} ended {:?}: {:?}", chat.id, chat.status, chat.error);
        }
        Ok(chat)
    }

    /// The chat's actor, as the API reaches it.
    pub fn chat(&self, chat_id: &str) -> ChatHandle {
        self.server.directory.chat(chat_id)
    }

    /// The replica's event bus: what the actors publish on and the WebSocket sessions read.
    pub fn bus(&self) -> Arc<dyn EventBus> {
        self.server.directory.deps().bus.clone()
    }

    /// Stops the server without blocking the runtime.
    pub async fn stop(self) -> anyhow::Result<()> {
        let InProcessServer { server, .. } = self;
        tokio::task::spawn_blocking(move || server.stop()).await.context("stopping the server")
    }
}

/// Reads a chat's live events until its status is idle; returns every event read, the idle
/// last. A turn that ends in `error` is an `Err`, so a measurement never times a failure.
pub async fn until_idle(live: &mut broadcast::Receiver<Arc<SharedEvent>>) -> anyhow::Result<Vec<Arc<SharedEvent>>> {
    let mut seen = Vec::new();
    loop {
        let event = tokio::time::timeout(TURN_TIMEOUT, live.recv())
            .await
            .context("the turn did not end in time")?
            .context("the chat's event channel failed (lagged or closed)")?;
        let status = match &event.body {
            EventBody::Status { status, error } => Some((*status, error.clone())),
            _ => None,
        };
        seen.push(event);
        match status {
            Some((ChatStatus::Idle, _)) => return Ok(seen),
            Some((ChatStatus::Error, error)) => bail!("the turn failed: {error:?}"),
            _ => {}
        }
    }
}
