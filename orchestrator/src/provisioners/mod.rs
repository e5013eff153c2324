//! Workspaces: templates, parameter validation, the provisioners that bring workspaces up and
//! down, and their lifecycle (`provisioning → ready → stopped → deleted`, or `failed`).
//!
//! [`Workspaces`] implements the actors' [`Provisioner`] port and serves the workspace API.
//! - [`local`]: a directory on this host, served by an in-process relay (embedded mode) or by an
//!   `agentplane-relay` process over NATS;
//! - [`command`]: operator scripts, given the workspace id, relay credential, NATS URL and
//!   parameters in their environment; they start the relay wherever the workspace lives.
//!
//! A workspace is ready when its relay says hello (NATS) or is registered (in-process).

pub mod command;
pub mod local;
pub mod params;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use agentplane_actors::ports::{ProvisionError, Provisioner};
use agentplane_config::Settings;
use agentplane_schema::api::{ProvisionerSpec, Template, Workspace, WorkspaceDetail, WorkspaceStatus};
use agentplane_schema::nats::Subjects;
use agentplane_schema::new_id;
use chrono::Utc;

use crate::store::DbStore;
use crate::transport::inprocess::InProcessTransport;
use crate::transport::nats::NatsTransport;

/// How tools reach workspaces in this replica.
pub enum ToolBackend {
    InProcess(Arc<InProcessTransport>),
    Nats(Arc<NatsBackend>),
}

/// What provisioning needs when relays are reached over NATS.
pub struct NatsBackend {
    pub transport: Arc<NatsTransport>,
    /// The URL relays connect to.
    pub relay_url: String,
    pub relay_binary: PathBuf,
    /// Mints per-workspace relay credentials; `None` when NATS runs without auth.
    pub minter: Option<CredentialMinter>,
}

/// Signs relay credentials for the agentplane account.
pub struct CredentialMinter {
    pub account_signing_seed: String,
    pub account_public_key: String,
    pub subjects: Subjects,
}

impl CredentialMinter {
    pub fn mint(&self, workspace_id: &str) -> Result<String, String> {
        crate::nats_auth::mint_workspace_creds(
            &self.account_signing_seed,
            &self.account_public_key,
            &self.subjects,
            workspace_id,
        )
        .map_err(|e| e.to_string())
    }
}

pub struct Workspaces {
    store: DbStore,
    settings: Arc<Settings>,
    backend: ToolBackend,
    local: local::LocalRelays,
}

fn internal(e: impl std::fmt::Display) -> ProvisionError {
    ProvisionError { message: format!("workspace service error: {e}") }
}

fn refused(message: impl Into<String>) -> ProvisionError {
    ProvisionError { message: message.into() }
}

impl Workspaces {
    pub fn new(store: DbStore, settings: Arc<Settings>, backend: ToolBackend) -> Self {
        let local = local::LocalRelays::new(settings.workspace_root(), settings.server.data_dir.join("relays"));
        Workspaces { store, settings, backend, local }
    }

    /// Serves again the workspaces that were ready when the process stopped: local ones get
    /// their relay back; others are expected to come back by themselves (their relay reconnects).
    pub async fn restore(&self) -> Result<usize, ProvisionError> {
        let mut restored = 0;
        for ws in self.store.list_workspaces(None).await.map_err(internal)? {
            if ws.status != WorkspaceStatus::Ready {
                continue;
            }
            let Some(template) = self.store.get_template(&ws.template_id).await.map_err(internal)? else { continue };
            if template.provisioner != ProvisionerSpec::Local {
                continue;
            }
            match self.start_local(&ws).await {
                Ok(()) => restored += 1,
                Err(e) => {
                    self.store
                        .set_workspace_status(&ws.id, WorkspaceStatus::Failed, &format!("not restored at start: {e}"))
                        .await
                        .map_err(internal)?;
                }
            }
        }
        Ok(restored)
    }

    /// Creates a workspace from a template and returns once it is ready (or failed).
    pub async fn create(
        &self,
        user_id: &str,
        template: &Template,
        name: Option<String>,
        parameters: &serde_json::Value,
        purpose: &str,
    ) -> Result<Workspace, ProvisionError> {
        let parameters = params::validate(&template.parameters, parameters).map_err(|message| {
            refused(format!(
                "invalid parameters for template `{}`: {message}. Call read_template to see them.",
                template.name
            ))
        })?;
        if matches!(template.provisioner, ProvisionerSpec::Command(_))
            && matches!(self.backend, ToolBackend::InProcess(_))
        {
            return Err(refused(format!(
                "template `{}` uses the command provisioner, which needs NATS ([nats] url) for its relay",
                template.name
            )));
        }
        let now = Utc::now();
        let id = new_id();
        let suffix = &id[id.len() - 6..];
        let ws = Workspace {
            name: name.filter(|n| !n.trim().is_empty()).unwrap_or_else(|| format!("{}-{suffix}", template.name)),
            id,
            template_id: template.id.clone(),
            owner_id: user_id.to_string(),
            status: WorkspaceStatus::Provisioning,
            parameters,
            created_at: now,
            updated_at: now,
        };
        self.store.insert_workspace(&ws).await.map_err(internal)?;
        self.store
            .append_workspace_log(&ws.id, &format!("provisioning from template {} ({purpose})", template.name))
            .await
            .map_err(internal)?;
        let outcome = match &template.provisioner {
            ProvisionerSpec::Local => self.start_local(&ws).await,
            ProvisionerSpec::Command(c) => self.run_command(&ws, template, c, command::Action::Create).await,
        };
        self.settle(ws, outcome).await
    }

    /// Records the outcome of bringing a workspace up.
    async fn settle(&self, ws: Workspace, outcome: Result<(), String>) -> Result<Workspace, ProvisionError> {
        match outcome {
            Ok(()) => {
                self.store.set_workspace_status(&ws.id, WorkspaceStatus::Ready, "ready").await.map_err(internal)?;
                Ok(Workspace { status: WorkspaceStatus::Ready, updated_at: Utc::now(), ..ws })
            }
            Err(e) => {
                self.store.set_workspace_status(&ws.id, WorkspaceStatus::Failed, &e).await.map_err(internal)?;
                Err(refused(format!("provisioning workspace {} failed: {e}", ws.id)))
            }
        }
    }

    async fn start_local(&self, ws: &Workspace) -> Result<(), String> {
        match &self.backend {
            ToolBackend::InProcess(transport) => self.local.serve_in_process(transport, &ws.id),
            ToolBackend::Nats(nats) => {
                let since = Instant::now();
                self.local.spawn_relay(nats, &ws.id)?;
                self.wait_ready(nats, &ws.id, since).await
            }
        }
    }

    async fn wait_ready(&self, nats: &NatsBackend, workspace_id: &str, since: Instant) -> Result<(), String> {
        let timeout = Duration::from_secs(self.settings.nats.ready_timeout_seconds);
        if nats.transport.presence().wait_ready(workspace_id, since, timeout).await {
            Ok(())
        } else {
            Err(format!("its relay did not say hello within {} s", timeout.as_secs()))
        }
    }

    async fn run_command(
        &self,
        ws: &Workspace,
        template: &Template,
        spec: &agentplane_schema::api::CommandProvisioner,
        action: command::Action,
    ) -> Result<(), String> {
        let ToolBackend::Nats(nats) = &self.backend else {
            return Err("the command provisioner needs NATS ([nats] url)".into());
        };
        let Some(script) = action.script(spec) else {
            return Ok(());
        };
        let creds = match &nats.minter {
            Some(m) => Some(m.mint(&ws.id)?),
            None => None,
        };
        let creds_file = match &creds {
            Some(c) => Some(self.local.write_creds(&ws.id, c)?),
            None => None,
        };
        let timeout =
            Duration::from_secs(spec.timeout_seconds.unwrap_or(self.settings.workspaces.command_timeout_seconds));
        let env = command::environment(ws, template, action, nats, creds_file.as_deref());
        let since = Instant::now();
        let run = command::run(script, &env, timeout).await;
        self.store.append_workspace_log(&ws.id, &run.log(action)).await.map_err(|e| e.to_string())?;
        run.into_result()?;
        if action.brings_up() { self.wait_ready(nats, &ws.id, since).await } else { Ok(()) }
    }

    async fn template_of(&self, ws: &Workspace) -> Result<Template, ProvisionError> {
        self.store
            .get_template(&ws.template_id)
            .await
            .map_err(internal)?
            .ok_or_else(|| refused(format!("the template of workspace {} no longer exists", ws.id)))
    }

    pub async fn detail(&self, workspace_id: &str) -> Result<Option<WorkspaceDetail>, ProvisionError> {
        self.store.workspace_detail(workspace_id).await.map_err(internal)
    }

    /// Stops a ready workspace; its files stay (local) or as the stop script leaves them.
    pub async fn stop(&self, ws: &Workspace) -> Result<Workspace, ProvisionError> {
        if ws.status != WorkspaceStatus::Ready {
            return Err(refused(format!("workspace {} is {}, not ready", ws.id, ws.status.as_str())));
        }
        let template = self.template_of(ws).await?;
        let outcome = match &template.provisioner {
            ProvisionerSpec::Local => {
                self.stop_local(&ws.id);
                Ok(())
            }
            ProvisionerSpec::Command(c) => self.run_command(ws, &template, c, command::Action::Stop).await,
        };
        self.forget_presence(&ws.id);
        match outcome {
            Ok(()) => {
                self.store.set_workspace_status(&ws.id, WorkspaceStatus::Stopped, "stopped").await.map_err(internal)?;
                Ok(Workspace { status: WorkspaceStatus::Stopped, ..ws.clone() })
            }
            Err(e) => Err(refused(format!("stopping workspace {} failed: {e}", ws.id))),
        }
    }

    /// Starts a stopped workspace again.
    pub async fn start(&self, ws: &Workspace) -> Result<Workspace, ProvisionError> {
        if ws.status != WorkspaceStatus::Stopped {
            return Err(refused(format!("workspace {} is {}, not stopped", ws.id, ws.status.as_str())));
        }
        let template = self.template_of(ws).await?;
        let outcome = match &template.provisioner {
            ProvisionerSpec::Local => self.start_local(ws).await,
            ProvisionerSpec::Command(c) => self.run_command(ws, &template, c, command::Action::Start).await,
        };
        self.settle(ws.clone(), outcome).await
    }

    /// Deletes a workspace and its files; chats that used it stay intact.
    pub async fn delete(&self, ws: &Workspace) -> Result<(), ProvisionError> {
        if ws.status == WorkspaceStatus::Deleted {
            return Ok(());
        }
        let template = self.template_of(ws).await?;
        match &template.provisioner {
            ProvisionerSpec::Local => {
                self.stop_local(&ws.id);
                self.local.remove_files(&ws.id).map_err(internal)?;
            }
            ProvisionerSpec::Command(c) => {
                if let Err(e) = self.run_command(ws, &template, c, command::Action::Delete).await {
                    return Err(refused(format!("deleting workspace {} failed: {e}", ws.id)));
                }
                self.local.remove_files(&ws.id).map_err(internal)?;
            }
        }
        self.forget_presence(&ws.id);
        self.store.set_workspace_status(&ws.id, WorkspaceStatus::Deleted, "deleted").await.map_err(internal)?;
        Ok(())
    }

    fn stop_local(&self, workspace_id: &str) {
        match &self.backend {
            ToolBackend::InProcess(transport) => transport.unregister(workspace_id),
            ToolBackend::Nats(_) => self.local.kill_relay(workspace_id),
        }
    }

    fn forget_presence(&self, workspace_id: &str) {
        if let ToolBackend::Nats(nats) = &self.backend {
            nats.transport.presence().forget(workspace_id);
        }
    }
}

#[async_trait::async_trait]
impl Provisioner for Workspaces {
    async fn list_templates(&self, _user_id: &str) -> Result<Vec<Template>, ProvisionError> {
        self.store.list_templates().await.map_err(internal)
    }

    async fn get_template(&self, template: &str) -> Result<Option<Template>, ProvisionError> {
        self.store.get_template(template).await.map_err(internal)
    }

    async fn create_workspace(
        &self,
        user_id: &str,
        chat_id: &str,
        template: &Template,
        name: Option<String>,
        parameters: serde_json::Value,
    ) -> Result<Workspace, ProvisionError> {
        self.create(user_id, template, name, &parameters, &format!("for chat {chat_id}")).await
    }

    async fn get_workspace(&self, workspace_id: &str) -> Result<Option<Workspace>, ProvisionError> {
        self.store.get_workspace(workspace_id).await.map_err(internal)
    }
}
