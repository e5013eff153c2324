//! The in-process transport: each `local` workspace is served by an [`agentplane_relay::Relay`]
//! living in this process, behind the same [`ToolTransport`] port a NATS relay sits behind.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use agentplane_actors::ports::{ToolTransport, TransportError, TransportErrorKind};
use agentplane_relay::Relay;
use agentplane_schema::tool::{ToolLimits, ToolRequest, ToolResult};
use tokio::sync::mpsc;

pub struct InProcessTransport {
    limits: ToolLimits,
    relays: RwLock<HashMap<String, Arc<Relay>>>,
}

impl InProcessTransport {
    pub fn new(limits: ToolLimits) -> Self {
        InProcessTransport { limits, relays: RwLock::new(HashMap::new()) }
    }

    /// Starts serving `workspace_id` from `root`.
    pub fn register(&self, workspace_id: &str, root: PathBuf) -> std::io::Result<()> {
        let relay = Arc::new(Relay::new(root, self.limits.clone())?);
        self.relays.write().unwrap_or_else(|p| p.into_inner()).insert(workspace_id.to_string(), relay);
        Ok(())
    }

    /// Stops serving a workspace; later calls find it offline.
    pub fn unregister(&self, workspace_id: &str) {
        self.relays.write().unwrap_or_else(|p| p.into_inner()).remove(workspace_id);
    }

    fn relay(&self, workspace_id: &str) -> Option<Arc<Relay>> {
        self.relays.read().unwrap_or_else(|p| p.into_inner()).get(workspace_id).cloned()
    }
}

#[async_trait::async_trait]
impl ToolTransport for InProcessTransport {
    async fn call(
        &self,
        workspace_id: &str,
        request: ToolRequest,
        output: Option<mpsc::UnboundedSender<String>>,
    ) -> Result<ToolResult, TransportError> {
        let relay = self.relay(workspace_id).ok_or_else(|| TransportError {
            kind: TransportErrorKind::Offline,
            message: format!("no relay serves workspace {workspace_id}"),
        })?;
        Ok(relay.handle(&request, output).await)
    }

    async fn cancel(&self, workspace_id: &str, call_id: &str) {
        if let Some(relay) = self.relay(workspace_id) {
            relay.cancel(call_id);
        }
    }
}
