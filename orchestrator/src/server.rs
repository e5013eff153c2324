//! Assembling and running one replica: database, bootstrap, adapters, actors, HTTP.
//!
//! [`run`] serves until stopped (what `agentplane serve` calls); [`spawn`] starts a server on its
//! own thread with its own actix system and returns once it listens (tests and benchmarks).

use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::time::Duration;

use actix_web::{App, HttpServer, web};
use agentplane_actors::bus::LocalEventBus;
use agentplane_actors::ports::{EventBus, ModelClient, ToolTransport};
use agentplane_actors::{ActorThreads, Deps, Directory};
use agentplane_config::Settings;
use agentplane_schema::api::{
    CreateModel, CreateProvider, CreateTemplate, ModelPrices, ProviderType, ProvisionerSpec, UserRole,
};
use agentplane_schema::nats::Subjects;
use agentplane_schema::tool::ToolLimits;
use anyhow::Context as _;

use crate::providers::Providers;
use crate::provisioners::local::LocalRelays;
use crate::provisioners::{CredentialMinter, NatsBackend, ToolBackend, Workspaces};
use crate::state::AppState;
use crate::store::DbStore;
use crate::transport::inprocess::InProcessTransport;
use crate::transport::nats::NatsTransport;

/// Environment variable that sets the first admin's token.
pub const BOOTSTRAP_TOKEN_ENV: &str = "AGENTPLANE_BOOTSTRAP_TOKEN";

/// The replica, ready to serve.
pub struct Prepared {
    pub state: web::Data<AppState>,
    /// The admin token created on first start (shown once).
    pub admin_token: Option<String>,
}

fn tool_limits(settings: &Settings) -> ToolLimits {
    let t = &settings.tools;
    ToolLimits {
        execute_default_timeout_seconds: t.execute_default_timeout_seconds,
        execute_max_timeout_seconds: t.execute_max_timeout_seconds,
        output_cap_bytes: t.output_cap_bytes,
        read_default_limit_lines: t.read_default_limit_lines,
        read_max_line_chars: t.read_max_line_chars,
    }
}

/// Opens the database, bootstraps it, builds the adapters and the directory, and resumes chats
/// that were running. Must run inside an actix system.
pub async fn prepare(settings: Settings) -> anyhow::Result<Prepared> {
    prepare_with(settings, None).await
}

/// Wraps the model client the actors use (for instance to observe or fail calls in a test of
/// supervision); the real provider clients stay underneath.
pub type ModelLayer = Box<dyn FnOnce(Arc<dyn ModelClient>) -> Arc<dyn ModelClient> + Send>;

/// [`prepare`], with the model client wrapped by `layer`.
pub async fn prepare_with(settings: Settings, layer: Option<ModelLayer>) -> anyhow::Result<Prepared> {
    // reqwest and async-nats both use rustls; with more than one crypto backend linked, rustls
    // cannot choose one by itself. Already installed is fine.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let settings = Arc::new(settings);
    std::fs::create_dir_all(&settings.server.data_dir)
        .with_context(|| format!("creating data dir {}", settings.server.data_dir.display()))?;
    let workspace_root = settings.workspace_root();
    std::fs::create_dir_all(&workspace_root)
        .with_context(|| format!("creating workspace root {}", workspace_root.display()))?;
    let db = agentplane_schema::db::connect_and_migrate(&settings.database_url(), settings.database.max_connections)
        .await
        .context("opening the database")?;
    let secrets = crate::secrets::SecretBox::load(&settings).context("loading the key that encrypts API keys")?;
    let store = DbStore::new(db, secrets);
    let sealed = store.check_provider_keys().await.map_err(|e| {
        anyhow::anyhow!(
            "{e}. The API keys in the database were encrypted with another key: start with the same secrets.key / \
             AGENTPLANE_SECRET_KEY / secret key file as before"
        )
    })?;
    if sealed > 0 {
        tracing::info!(sealed, "encrypted provider API keys stored in plaintext by an older version");
    }
    let admin_token = bootstrap(&store, &settings).await?;

    // The NATS client's connection is driven from the first actor thread (its tasks are spawned
    // where it connects): with one actor thread, the default on two cores, a tool call's request
    // and result wake no other thread.
    let threads = ActorThreads::start(settings.server.actor_thread_count());
    let backend = {
        let settings = settings.clone();
        threads
            .run_on_first(async move { tool_backend(&settings).await })
            .await
            .context("the actor thread stopped while connecting the tool backend")??
    };
    let transport: Arc<dyn ToolTransport> = match &backend {
        ToolBackend::InProcess(t) => t.clone(),
        ToolBackend::Nats(n) => n.transport.clone(),
    };
    let workspaces = Arc::new(Workspaces::new(store.clone(), settings.clone(), backend));
    let restored = workspaces.restore().await.map_err(|e| anyhow::anyhow!(e.message))?;
    let bus: Arc<dyn EventBus> = Arc::new(LocalEventBus::with_capacity(settings.server.stream_buffer));
    let mut model: Arc<dyn ModelClient> = Arc::new(Providers::new(
        Duration::from_millis(settings.llm.connect_timeout_ms),
        Duration::from_millis(settings.llm.read_timeout_ms),
    )?);
    if let Some(layer) = layer {
        model = layer(model);
    }
    let deps = Deps {
        store: Arc::new(store.clone()),
        model,
        transport,
        provisioner: workspaces.clone(),
        bus: bus.clone(),
        settings: settings.clone(),
    };
    let directory = Directory::new(deps, threads);
    let running = store.running_chat_ids().await?;
    for id in &running {
        directory.chat(id);
    }
    tracing::info!(restored_workspaces = restored, resumed_chats = running.len(), "replica ready");
    let state = web::Data::new(AppState { settings, store, directory, bus, workspaces });
    Ok(Prepared { state, admin_token })
}

/// In-process relays, or NATS (with per-workspace credentials when `nats.credentials_dir` is set).
async fn tool_backend(settings: &Settings) -> anyhow::Result<ToolBackend> {
    if !settings.nats.enabled() {
        return Ok(ToolBackend::InProcess(Arc::new(InProcessTransport::new(tool_limits(settings)))));
    }
    let subjects = Subjects::new(settings.nats.prefix.clone());
    let dir = settings.nats.credentials_dir.trim();
    let (creds, minter) = if dir.is_empty() {
        (None, None)
    } else {
        let dir = std::path::Path::new(dir);
        let creds =
            std::fs::read_to_string(dir.join(crate::nats_auth::ORCHESTRATOR_CREDS_FILE)).with_context(|| {
                format!("reading the orchestrator's NATS credential in {} (nats.credentials_dir)", dir.display())
            })?;
        let signing = crate::nats_auth::read_signing_material(dir)
            .with_context(|| format!("reading the account signing key in {} (nats.credentials_dir)", dir.display()))?;
        let minter = CredentialMinter {
            account_signing_seed: signing.account_signing_seed,
            account_public_key: signing.account_public_key,
            subjects: subjects.clone(),
        };
        (Some(creds), Some(minter))
    };
    let transport = NatsTransport::connect(
        settings.nats.url.trim(),
        creds.as_deref(),
        subjects,
        Duration::from_millis(settings.nats.request_timeout_ms),
    )
    .await?;
    Ok(ToolBackend::Nats(Arc::new(NatsBackend {
        transport: Arc::new(transport),
        relay_url: settings.nats.relay_url().to_string(),
        relay_binary: LocalRelays::default_relay_binary(&settings.nats.relay_binary),
        minter,
    })))
}

/// First start: an admin with a one-time token (or the configured one), and a `local` template
/// so the agent can work out of the box.
async fn bootstrap(store: &DbStore, settings: &Settings) -> anyhow::Result<Option<String>> {
    let mut token = None;
    if store.count_users().await? == 0 {
        let configured = Some(settings.auth.bootstrap_token.trim().to_string())
            .filter(|t| !t.is_empty())
            .or_else(|| std::env::var(BOOTSTRAP_TOKEN_ENV).ok().filter(|t| !t.trim().is_empty()));
        let (_, _, t) = store.create_user_with_token("admin", UserRole::Admin, configured).await?;
        token = Some(t);
    }
    if store.list_providers().await?.is_empty() {
        bootstrap_providers(store, |name| std::env::var(name).ok()).await?;
    }
    if store.count_templates().await? == 0 {
        store
            .create_template(&CreateTemplate {
                name: "local".into(),
                description: "A directory on the agentplane host with a POSIX shell and the host's tools \
                              (git, compilers and interpreters as installed). For editing files and running \
                              commands when no other template fits."
                    .into(),
                parameters: vec![],
                provisioner: ProvisionerSpec::Local,
            })
            .await?;
    }
    Ok(token)
}

/// A provider made on first start from a key in the environment, with the model it starts with.
struct EnvProvider {
    env: &'static str,
    provider_type: ProviderType,
    model: &'static str,
    display_name: &'static str,
    context_window: i64,
    max_output_tokens: i64,
    /// USD per million tokens: input, output, cache read, cache write (list prices when written).
    prices: [Option<f64>; 4],
}

const ENV_PROVIDERS: [EnvProvider; 3] = [
    EnvProvider {
        env: "ANTHROPIC_API_KEY",
        provider_type: ProviderType::Anthropic,
        model: "claude-sonnet-4-5",
        display_name: "Claude Sonnet 4.5",
        context_window: 200_000,
        max_output_tokens: 64_000,
        prices: [Some(3.0), Some(15.0), Some(0.3), Some(3.75)],
    },
    EnvProvider {
        env: "OPENAI_API_KEY",
        provider_type: ProviderType::Openai,
        model: "gpt-5",
        display_name: "GPT-5",
        context_window: 400_000,
        max_output_tokens: 128_000,
        prices: [Some(1.25), Some(10.0), Some(0.125), None],
    },
    EnvProvider {
        env: "GEMINI_API_KEY",
        provider_type: ProviderType::Gemini,
        model: "gemini-2.5-pro",
        display_name: "Gemini 2.5 Pro",
        context_window: 1_048_576,
        max_output_tokens: 65_536,
        prices: [Some(1.25), Some(10.0), Some(0.31), None],
    },
];

/// On a first start without providers: one provider and model per API key found in the
/// environment (`ANTHROPIC_API_KEY`, `OPENAI_API_KEY`, `GEMINI_API_KEY`); the first found is the
/// default model. Returns how many were created.
async fn bootstrap_providers(store: &DbStore, env: impl Fn(&str) -> Option<String>) -> anyhow::Result<usize> {
    let mut created = 0;
    for p in &ENV_PROVIDERS {
        let Some(key) = env(p.env).map(|k| k.trim().to_string()).filter(|k| !k.is_empty()) else { continue };
        let provider = store
            .create_provider(&CreateProvider {
                provider_type: p.provider_type,
                name: p.provider_type.as_str().into(),
                base_url: p.provider_type.default_base_url().unwrap_or_default().into(),
                api_key: Some(key),
                settings: serde_json::json!({}),
            })
            .await?;
        let [input, output, cache_read, cache_write] = p.prices;
        store
            .create_model(&CreateModel {
                provider_id: provider.id,
                model: p.model.into(),
                display_name: Some(p.display_name.into()),
                context_window: p.context_window,
                max_output_tokens: Some(p.max_output_tokens),
                vision: true,
                enabled: true,
                is_default: created == 0,
                compaction_threshold: None,
                prices: ModelPrices {
                    input_per_mtok: input,
                    output_per_mtok: output,
                    cache_read_per_mtok: cache_read,
                    cache_write_per_mtok: cache_write,
                },
                settings: serde_json::json!({}),
            })
            .await?;
        tracing::info!(provider = p.provider_type.as_str(), model = p.model, "created a provider from {}", p.env);
        created += 1;
    }
    Ok(created)
}

/// Serves on `listener` until the server is stopped (SIGINT/SIGTERM).
pub async fn run(settings: Settings, listener: TcpListener) -> anyhow::Result<()> {
    let prepared = prepare(settings).await?;
    if let Some(token) = &prepared.admin_token {
        println!("agentplane: created the admin user. Admin token (shown once): {token}");
    }
    let addr = listener.local_addr()?;
    println!("agentplane: listening on http://{addr}");
    let directory = prepared.state.directory.clone();
    http_server(prepared.state, listener)?.await?;
    directory.shutdown().await;
    Ok(())
}

fn http_server(state: web::Data<AppState>, listener: TcpListener) -> anyhow::Result<actix_web::dev::Server> {
    let workers = state.settings.server.http_worker_count();
    let server = HttpServer::new(move || {
        App::new().app_data(state.clone()).wrap(tracing_actix()).configure(crate::api::configure)
    })
    .listen(listener)?
    .shutdown_timeout(10)
    .workers(workers);
    Ok(server.run())
}

fn tracing_actix() -> actix_web::middleware::Logger {
    actix_web::middleware::Logger::new("%r %s %Dms")
}

/// A server running on its own thread.
pub struct ServerHandle {
    pub addr: SocketAddr,
    pub admin_token: Option<String>,
    /// The replica's chat actors, for in-process measurements (e.g. mailbox throughput).
    pub directory: Directory,
    handle: actix_web::dev::ServerHandle,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ServerHandle {
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops the server at once (open WebSockets are cut) and waits for its thread to end.
    pub fn stop(mut self) {
        self.stop_inner();
    }

    fn stop_inner(&mut self) {
        if let Some(thread) = self.thread.take() {
            let handle = self.handle.clone();
            // Driven from a thread of its own: the caller may be inside an async runtime, where
            // blocking on another runtime is not allowed.
            let stopper = std::thread::spawn(move || {
                if let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() {
                    rt.block_on(handle.stop(false));
                }
            });
            let _ = stopper.join();
            let _ = thread.join();
        }
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        self.stop_inner();
    }
}

/// Starts a server for `settings` on `listener` in a thread of its own.
pub fn spawn(settings: Settings, listener: TcpListener) -> anyhow::Result<ServerHandle> {
    spawn_with(settings, listener, None)
}

/// [`spawn`], with the model client wrapped by `layer` (see [`prepare_with`]).
pub fn spawn_with(
    settings: Settings,
    listener: TcpListener,
    layer: Option<ModelLayer>,
) -> anyhow::Result<ServerHandle> {
    let addr = listener.local_addr()?;
    let (tx, rx) = std::sync::mpsc::channel();
    let thread = std::thread::Builder::new().name("agentplane-server".into()).spawn(move || {
        let system = actix_rt::System::new();
        system.block_on(async move {
            let prepared = match prepare_with(settings, layer).await {
                Ok(p) => p,
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return;
                }
            };
            let directory = prepared.state.directory.clone();
            let server = match http_server(prepared.state, listener) {
                Ok(s) => s,
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return;
                }
            };
            let _ = tx.send(Ok((server.handle(), prepared.admin_token, directory.clone())));
            let _ = server.await;
            directory.shutdown().await;
        });
    })?;
    let (handle, admin_token, directory) = rx.recv().context("server thread ended before it was ready")??;
    Ok(ServerHandle { addr, admin_token, directory, handle, thread: Some(thread) })
}
