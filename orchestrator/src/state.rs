//! What every request handler shares.

use std::sync::Arc;

use agentplane_actors::Directory;
use agentplane_actors::ports::EventBus;
use agentplane_config::Settings;

use crate::provisioners::Workspaces;
use crate::store::DbStore;

pub struct AppState {
    pub settings: Arc<Settings>,
    pub store: DbStore,
    pub directory: Directory,
    pub bus: Arc<dyn EventBus>,
    pub workspaces: Arc<Workspaces>,
}
