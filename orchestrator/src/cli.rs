//! The `agentplane` command-line client: admin subcommands that talk to a running server over
//! its HTTP API (`--url`, `--token` or `AGENTPLANE_URL`, `AGENTPLANE_TOKEN`).

use std::path::PathBuf;

use agentplane_schema::api::{CreateTemplate, ErrorBody, PatchTemplate, Template, Workspace, WorkspaceDetail};
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
