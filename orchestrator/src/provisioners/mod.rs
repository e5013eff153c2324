//! Workspaces: templates, parameter validation, and the provisioners that bring workspaces up.
//!
//! [`Workspaces`] implements the actors' [`Provisioner`] port. The `local` provisioner makes a
//! directory under the workspace root and serves it with an in-process relay.

pub mod params;

use std::path::PathBuf;
use std::sync::Arc;

use agentplane_actors::ports::{ProvisionError, Provisioner};
use agentplane_schema::api::{ProvisionerSpec, Template, Workspace, WorkspaceStatus};
use agentplane_schema::new_id;
use chrono::Utc;

use crate::store::DbStore;
use crate::transport::inprocess::InProcessTransport;

pub struct Workspaces {
    store: DbStore,
    transport: Arc<InProcessTransport>,
    root: PathBuf,
}

fn internal(e: impl std::fmt::Display) -> ProvisionError {
    ProvisionError { message: format!("workspace service error: {e}") }
}

impl Workspaces {
    pub fn new(store: DbStore, transport: Arc<InProcessTransport>, root: PathBuf) -> Self {
        Workspaces { store, transport, root }
    }

    /// Serves again the `local` workspaces that were ready when the process stopped.
    pub async fn restore(&self) -> Result<usize, ProvisionError> {
        let mut restored = 0;
        for ws in self.store.list_workspaces(None).await.map_err(internal)? {
            if ws.status != WorkspaceStatus::Ready {
                continue;
            }
            let dir = self.root.join(&ws.id);
            if dir.is_dir() {
                self.transport.register(&ws.id, dir).map_err(internal)?;
                restored += 1;
            } else {
                self.store
                    .set_workspace_status(&ws.id, WorkspaceStatus::Failed, "directory missing at start")
                    .await
                    .map_err(internal)?;
            }
        }
        Ok(restored)
    }

    async fn provision_local(&self, ws: &Workspace) -> Result<(), String> {
        let dir = self.root.join(&ws.id);
        tokio::fs::create_dir_all(&dir).await.map_err(|e| format!("creating {}: {e}", dir.display()))?;
        self.transport.register(&ws.id, dir.clone()).map_err(|e| format!("starting the relay: {e}"))?;
        Ok(())
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
        let parameters = params::validate(&template.parameters, &parameters)
            .map_err(|message| ProvisionError { message: format!("invalid parameters: {message}") })?;
        let now = Utc::now();
        let id = new_id();
        let ws = Workspace {
            name: name
                .filter(|n| !n.trim().is_empty())
                .unwrap_or_else(|| format!("{}-{}", template.name, &id[id.len() - 6..])),
            id,
            template_id: template.id.clone(),
            owner_id: user_id.to_string(),
            status: WorkspaceStatus::Provisioning,
            parameters,
            created_at: now,
            updated_at: now,
        };
        self.store.insert_workspace(&ws).await.map_err(internal)?;
        let outcome = match template.provisioner {
            ProvisionerSpec::Local => self.provision_local(&ws).await,
        };
        match outcome {
            Ok(()) => {
                self.store
                    .set_workspace_status(&ws.id, WorkspaceStatus::Ready, &format!("ready (for chat {chat_id})"))
                    .await
                    .map_err(internal)?;
                Ok(Workspace { status: WorkspaceStatus::Ready, ..ws })
            }
            Err(e) => {
                self.store.set_workspace_status(&ws.id, WorkspaceStatus::Failed, &e).await.map_err(internal)?;
                Err(ProvisionError { message: format!("provisioning failed: {e}") })
            }
        }
    }

    async fn get_workspace(&self, workspace_id: &str) -> Result<Option<Workspace>, ProvisionError> {
        self.store.get_workspace(workspace_id).await.map_err(internal)
    }
}
