//! The adapters a chat actor works with, shared by all actors of a replica.

use std::sync::Arc;

use agentplane_config::Settings;

use crate::ports::{EventBus, ModelClient, Provisioner, Store, ToolTransport};

pub struct Deps {
    pub store: Arc<dyn Store>,
    pub model: Arc<dyn ModelClient>,
    pub transport: Arc<dyn ToolTransport>,
    pub provisioner: Arc<dyn Provisioner>,
    pub bus: Arc<dyn EventBus>,
    pub settings: Arc<Settings>,
}
