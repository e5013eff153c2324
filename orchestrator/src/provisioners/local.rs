//! `local` workspaces: a directory under the workspace root, served by an in-process relay or
//! by an `agentplane-relay` child process connected to NATS with the workspace's own credential.
//!
//! Per-workspace relay files (credential, journal, log) live under `<data_dir>/relays/<id>/`,
//! outside the workspace directory the agent can touch.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;

use super::NatsBackend;
use crate::transport::inprocess::InProcessTransport;

pub struct LocalRelays {
    workspace_root: PathBuf,
    relay_root: PathBuf,
    children: Mutex<HashMap<String, Child>>,
}

impl LocalRelays {
    pub fn new(workspace_root: PathBuf, relay_root: PathBuf) -> Self {
        LocalRelays { workspace_root, relay_root, children: Mutex::new(HashMap::new()) }
    }

    pub fn workspace_dir(&self, workspace_id: &str) -> PathBuf {
        self.workspace_root.join(workspace_id)
    }

    fn relay_dir(&self, workspace_id: &str) -> PathBuf {
        self.relay_root.join(workspace_id)
    }

    fn ensure_workspace_dir(&self, workspace_id: &str) -> Result<PathBuf, String> {
        let dir = self.workspace_dir(workspace_id);
        std::fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        Ok(dir)
    }

    pub fn serve_in_process(&self, transport: &InProcessTransport, workspace_id: &str) -> Result<(), String> {
        let dir = self.ensure_workspace_dir(workspace_id)?;
        transport.register(workspace_id, dir).map_err(|e| format!("starting the in-process relay: {e}"))
    }

    /// Writes a relay credential readable by this user only; returns its path.
    pub fn write_creds(&self, workspace_id: &str, creds: &str) -> Result<PathBuf, String> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let dir = self.relay_dir(workspace_id);
        std::fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        let path = dir.join("relay.creds");
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&path)
            .map_err(|e| format!("writing {}: {e}", path.display()))?;
        file.write_all(creds.as_bytes()).map_err(|e| format!("writing {}: {e}", path.display()))?;
        Ok(path)
    }

    /// Starts (or restarts) the relay process of a workspace.
    pub fn spawn_relay(&self, nats: &NatsBackend, workspace_id: &str) -> Result<(), String> {
        self.kill_relay(workspace_id);
        let root = self.ensure_workspace_dir(workspace_id)?;
        let relay_dir = self.relay_dir(workspace_id);
        let state = relay_dir.join("state");
        std::fs::create_dir_all(&state).map_err(|e| format!("creating {}: {e}", state.display()))?;
        let log_path = relay_dir.join("relay.log");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|e| format!("opening {}: {e}", log_path.display()))?;
        let mut cmd = Command::new(&nats.relay_binary);
        cmd.arg("--nats")
            .arg(&nats.relay_url)
            .arg("--workspace")
            .arg(workspace_id)
            .arg("--root")
            .arg(&root)
            .arg("--state-dir")
            .arg(&state)
            .arg("--prefix")
            .arg(nats.transport.subjects().prefix())
            // Its standard input is a pipe this process holds: should the orchestrator die
            // without stopping it (killed, crashed), the relay sees the pipe close and stops,
            // rather than serving the workspace beside the one a restart starts.
            .arg("--stop-when-stdin-closes")
            // The relay gets nothing of the orchestrator's environment: no keys, no tokens.
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("HOME", &root)
            .env("LANG", "C.UTF-8")
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(log);
        if let Some(minter) = &nats.minter {
            let creds = minter.mint(workspace_id)?;
            let path = self.write_creds(workspace_id, &creds)?;
            cmd.arg("--creds").arg(path);
        }
        let child = cmd.spawn().map_err(|e| format!("starting {}: {e}", nats.relay_binary.display()))?;
        self.children.lock().unwrap_or_else(|p| p.into_inner()).insert(workspace_id.to_string(), child);
        Ok(())
    }

    pub fn kill_relay(&self, workspace_id: &str) {
        let child = self.children.lock().unwrap_or_else(|p| p.into_inner()).remove(workspace_id);
        if let Some(mut child) = child {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Removes a workspace's directory and relay files.
    pub fn remove_files(&self, workspace_id: &str) -> std::io::Result<()> {
        for dir in [self.workspace_dir(workspace_id), self.relay_dir(workspace_id)] {
            match std::fs::remove_dir_all(&dir) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
        Ok(())
    }

    /// The relay binary to use: configured, else next to this executable.
    pub fn default_relay_binary(configured: &str) -> PathBuf {
        if !configured.trim().is_empty() {
            return PathBuf::from(configured);
        }
        std::env::current_exe()
            .ok()
            .and_then(|exe| exe.parent().map(|d| d.join("agentplane-relay")))
            .filter(|p| p.is_file())
            .unwrap_or_else(|| PathBuf::from("agentplane-relay"))
    }
}

impl Drop for LocalRelays {
    fn drop(&mut self) {
        let children: Vec<Child> =
            self.children.lock().unwrap_or_else(|p| p.into_inner()).drain().map(|(_, c)| c).collect();
        for mut child in children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
