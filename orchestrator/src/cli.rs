//! The `agentplane` command-line client: admin subcommands that talk to a running server over
//! its HTTP API (`--url`, `--token` or `AGENTPLANE_URL`, `AGENTPLANE_TOKEN`).

use std::path::PathBuf;

use agentplane_schema::api::{
    CreateModel, CreateProvider, CreateTemplate, ErrorBody, Model, PatchModel, PatchProvider, PatchTemplate, Provider,
    ProviderType, Template, Workspace, WorkspaceDetail,
};
use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use reqwest::Method;
use serde::Serialize;
use serde::de::DeserializeOwned;

#[derive(Args, Clone)]
pub struct Remote {
    /// Server to talk to.
    #[arg(long, env = "AGENTPLANE_URL", default_value = "http://127.0.0.1:7420", global = true)]
    pub url: String,
    /// API token (the admin's for admin commands).
    #[arg(long, env = "AGENTPLANE_TOKEN", hide_env_values = true, global = true)]
    pub token: Option<String>,
}

#[derive(Subcommand)]
pub enum TemplateCommand {
    /// List templates.
    Ls,
    /// Show one template (by id or name) as JSON.
    Show { template: String },
    /// Create a template from a JSON file (the body of POST /api/v1/templates).
    Create {
        #[arg(long)]
        file: PathBuf,
    },
    /// Change a template with a JSON file holding the fields to change.
    Update {
        template: String,
        #[arg(long)]
        file: PathBuf,
    },
    /// Delete a template.
    Delete { template: String },
}

#[derive(Subcommand)]
pub enum WorkspaceCommand {
    /// List your workspaces.
    Ls,
    /// Show a workspace with its provisioning log.
    Show {
        workspace: String,
    },
    Start {
        workspace: String,
    },
    Stop {
        workspace: String,
    },
    /// Delete a workspace (chats that used it stay intact).
    Delete {
        workspace: String,
    },
}

/// Where a provider's API key comes from: never a command-line argument (it would land in the
/// shell history and the process list).
#[derive(Args, Clone, Default)]
pub struct KeySource {
    /// Read the API key from this environment variable.
    #[arg(long, value_name = "VAR")]
    pub api_key_env: Option<String>,
    /// Read the API key from the first line of standard input.
    #[arg(long, conflicts_with = "api_key_env")]
    pub api_key_stdin: bool,
}

impl KeySource {
    fn read(&self) -> anyhow::Result<Option<String>> {
        if let Some(var) = &self.api_key_env {
            let key = std::env::var(var).with_context(|| format!("the environment variable {var} is not set"))?;
            return Ok(Some(key.trim().to_string()));
        }
        if self.api_key_stdin {
            let mut line = String::new();
            std::io::stdin().read_line(&mut line).context("reading the API key from stdin")?;
            return Ok(Some(line.trim().to_string()));
        }
        Ok(None)
    }
}

#[derive(Subcommand)]
pub enum ProviderCommand {
    /// List providers.
    Ls,
    /// Add a provider.
    Create {
        /// anthropic, openai, gemini, azure, bedrock, openai_compatible, openrouter or vercel.
        #[arg(long = "type")]
        provider_type: String,
        #[arg(long)]
        name: String,
        /// Leave out for the provider's public endpoint.
        #[arg(long, default_value = "")]
        base_url: String,
        /// Dialect settings as a JSON object, e.g. '{"region":"us-east-1","access_key_id":"AKIA…"}'.
        #[arg(long)]
        settings: Option<String>,
        #[command(flatten)]
        key: KeySource,
    },
    /// Change a provider: the fields given change.
    Update {
        provider: String,
        #[arg(long)]
        name: Option<String>,
        #[arg(long)]
        base_url: Option<String>,
        #[arg(long)]
        settings: Option<String>,
        #[command(flatten)]
        key: KeySource,
        /// Remove the stored API key.
        #[arg(long, conflicts_with_all = ["api_key_env", "api_key_stdin"])]
        remove_api_key: bool,
    },
    /// Delete a provider no model uses.
    Delete { provider: String },
}

#[derive(Subcommand)]
pub enum ModelCommand {
    /// List models.
    Ls,
    /// Add a model from a JSON file (the body of POST /api/v1/models).
    Create {
        #[arg(long)]
        file: PathBuf,
    },
    /// Change a model with a JSON file holding the fields to change.
    Update {
        model: String,
        #[arg(long)]
        file: PathBuf,
    },
    /// Delete a model.
    Delete { model: String },
}

fn parse_settings(settings: Option<&str>) -> anyhow::Result<Option<serde_json::Value>> {
    settings.map(|s| serde_json::from_str(s).context("--settings is not valid JSON")).transpose()
}

struct Client {
    http: reqwest::Client,
    remote: Remote,
}

impl Client {
    fn new(remote: Remote) -> anyhow::Result<Self> {
        if remote.token.as_deref().is_none_or(str::is_empty) {
            bail!("no API token: pass --token or set AGENTPLANE_TOKEN");
        }
        Ok(Client { http: reqwest::Client::new(), remote })
    }

    async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&impl Serialize>,
    ) -> anyhow::Result<Option<T>> {
        let url = format!("{}/api/v1{path}", self.remote.url.trim_end_matches('/'));
        let mut req = self.http.request(method, &url).bearer_auth(self.remote.token.as_deref().unwrap_or_default());
        if let Some(b) = body {
            req = req.json(b);
        }
        let resp = req.send().await.with_context(|| format!("reaching {url}"))?;
        let status = resp.status();
        let bytes = resp.bytes().await?;
        if !status.is_success() {
            match serde_json::from_slice::<ErrorBody>(&bytes) {
                Ok(e) => bail!("{status}: {} ({})", e.error.message, e.error.kind),
                Err(_) => bail!("{status}: {}", String::from_utf8_lossy(&bytes)),
            }
        }
        if bytes.is_empty() {
            return Ok(None);
        }
        Ok(Some(serde_json::from_slice(&bytes).context("reading the server's answer")?))
    }
}

fn read_json<T: DeserializeOwned>(file: &PathBuf) -> anyhow::Result<T> {
    let text = std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{} is not a valid body", file.display()))
}

fn print_json(value: &impl Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

const NONE: Option<&()> = None;

pub async fn templates(remote: Remote, command: TemplateCommand) -> anyhow::Result<()> {
    let client = Client::new(remote)?;
    match command {
        TemplateCommand::Ls => {
            let templates: Vec<Template> = client.call(Method::GET, "/templates", NONE).await?.unwrap_or_default();
            println!("{:<38} {:<20} {:<8} DESCRIPTION", "ID", "NAME", "PARAMS");
            for t in templates {
                let description: String = t.description.chars().take(60).collect();
                println!("{:<38} {:<20} {:<8} {description}", t.id, t.name, t.parameters.len());
            }
        }
        TemplateCommand::Show { template } => {
            let t: Option<Template> = client.call(Method::GET, &format!("/templates/{template}"), NONE).await?;
            print_json(&t)?;
        }
        TemplateCommand::Create { file } => {
            let body: CreateTemplate = read_json(&file)?;
            let t: Option<Template> = client.call(Method::POST, "/templates", Some(&body)).await?;
            print_json(&t)?;
        }
        TemplateCommand::Update { template, file } => {
            let body: PatchTemplate = read_json(&file)?;
            let t: Option<Template> =
                client.call(Method::PATCH, &format!("/templates/{template}"), Some(&body)).await?;
            print_json(&t)?;
        }
        TemplateCommand::Delete { template } => {
            client.call::<serde_json::Value>(Method::DELETE, &format!("/templates/{template}"), NONE).await?;
            println!("deleted template {template}");
        }
    }
    Ok(())
}

pub async fn workspaces(remote: Remote, command: WorkspaceCommand) -> anyhow::Result<()> {
    let client = Client::new(remote)?;
    match command {
        WorkspaceCommand::Ls => {
            let list: Vec<Workspace> = client.call(Method::GET, "/workspaces", NONE).await?.unwrap_or_default();
            println!("{:<38} {:<24} {:<13} CREATED", "ID", "NAME", "STATUS");
            for w in list {
                println!("{:<38} {:<24} {:<13} {}", w.id, w.name, w.status.as_str(), w.created_at.to_rfc3339());
            }
        }
        WorkspaceCommand::Show { workspace } => {
            let w: Option<WorkspaceDetail> =
                client.call(Method::GET, &format!("/workspaces/{workspace}"), NONE).await?;
            print_json(&w)?;
        }
        WorkspaceCommand::Start { workspace } => {
            let w: Option<Workspace> =
                client.call(Method::POST, &format!("/workspaces/{workspace}/start"), NONE).await?;
            print_json(&w)?;
        }
        WorkspaceCommand::Stop { workspace } => {
            let w: Option<Workspace> =
                client.call(Method::POST, &format!("/workspaces/{workspace}/stop"), NONE).await?;
            print_json(&w)?;
        }
        WorkspaceCommand::Delete { workspace } => {
            client.call::<serde_json::Value>(Method::DELETE, &format!("/workspaces/{workspace}"), NONE).await?;
            println!("deleted workspace {workspace}");
        }
    }
    Ok(())
}

pub async fn providers(remote: Remote, command: ProviderCommand) -> anyhow::Result<()> {
    let client = Client::new(remote)?;
    match command {
        ProviderCommand::Ls => {
            let list: Vec<Provider> = client.call(Method::GET, "/providers", NONE).await?.unwrap_or_default();
            println!("{:<38} {:<18} {:<18} {:<4} BASE URL", "ID", "NAME", "TYPE", "KEY");
            for p in list {
                let key = if p.has_api_key { "yes" } else { "no" };
                println!("{:<38} {:<18} {:<18} {key:<4} {}", p.id, p.name, p.provider_type.as_str(), p.base_url);
            }
        }
        ProviderCommand::Create { provider_type, name, base_url, settings, key } => {
            let provider_type = ProviderType::parse(&provider_type).with_context(|| {
                let all: Vec<&str> = ProviderType::ALL.iter().map(|t| t.as_str()).collect();
                format!("unknown provider type `{provider_type}` (one of {})", all.join(", "))
            })?;
            let body = CreateProvider {
                provider_type,
                name,
                base_url,
                api_key: key.read()?,
                settings: parse_settings(settings.as_deref())?.unwrap_or_default(),
            };
            let p: Option<Provider> = client.call(Method::POST, "/providers", Some(&body)).await?;
            print_json(&p)?;
        }
        ProviderCommand::Update { provider, name, base_url, settings, key, remove_api_key } => {
            let api_key = if remove_api_key { Some(None) } else { key.read()?.map(Some) };
            let body = PatchProvider { name, base_url, api_key, settings: parse_settings(settings.as_deref())? };
            let p: Option<Provider> =
                client.call(Method::PATCH, &format!("/providers/{provider}"), Some(&body)).await?;
            print_json(&p)?;
        }
        ProviderCommand::Delete { provider } => {
            client.call::<serde_json::Value>(Method::DELETE, &format!("/providers/{provider}"), NONE).await?;
            println!("deleted provider {provider}");
        }
    }
    Ok(())
}

pub async fn models(remote: Remote, command: ModelCommand) -> anyhow::Result<()> {
    let client = Client::new(remote)?;
    match command {
        ModelCommand::Ls => {
            let list: Vec<Model> = client.call(Method::GET, "/models", NONE).await?.unwrap_or_default();
            println!("{:<38} {:<28} {:<9} {:<7} {:<7} DEFAULT", "ID", "MODEL", "CONTEXT", "VISION", "ENABLED");
            for m in list {
                let yes = |b: bool| if b { "yes" } else { "no" };
                println!(
                    "{:<38} {:<28} {:<9} {:<7} {:<7} {}",
                    m.id,
                    m.model,
                    m.context_window,
                    yes(m.vision),
                    yes(m.enabled),
                    yes(m.is_default)
                );
            }
        }
        ModelCommand::Create { file } => {
            let body: CreateModel = read_json(&file)?;
            let m: Option<Model> = client.call(Method::POST, "/models", Some(&body)).await?;
            print_json(&m)?;
        }
        ModelCommand::Update { model, file } => {
            let body: PatchModel = read_json(&file)?;
            let m: Option<Model> = client.call(Method::PATCH, &format!("/models/{model}"), Some(&body)).await?;
            print_json(&m)?;
        }
        ModelCommand::Delete { model } => {
            client.call::<serde_json::Value>(Method::DELETE, &format!("/models/{model}"), NONE).await?;
            println!("deleted model {model}");
        }
    }
    Ok(())
}

/// `agentplane nats init`: the operator, accounts and credentials for a NATS deployment.
pub fn nats_init(out: &PathBuf, prefix: &str) -> anyhow::Result<()> {
    if out.join(crate::nats_auth::ORCHESTRATOR_CREDS_FILE).exists() {
        bail!("{} already holds NATS credentials; refusing to overwrite them", out.display());
    }
    let bootstrap = crate::nats_auth::bootstrap(prefix)?;
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    crate::nats_auth::write_bootstrap(&bootstrap, out).with_context(|| format!("writing to {}", out.display()))?;
    println!("wrote NATS credentials to {}", out.display());
    println!("- include {}/{} in the nats-server configuration", out.display(), crate::nats_auth::SERVER_CONF_FILE);
    println!("- set AGENTPLANE__NATS__CREDENTIALS_DIR={} for the orchestrator", out.display());
    Ok(())
}
