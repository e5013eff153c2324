//! The tool transport as production runs it, for the `tool-*` scenarios: a nats-server that
//! trusts agentplane's operator and account (`nats_auth::bootstrap`), the orchestrator's
//! [`NatsTransport`] with the orchestrator's credential, and one `agentplane-relay` process per
//! workspace with a credential minted for that workspace alone — started the way the `local`
//! provisioner starts them (empty environment, `--creds` file, log to a file). Everything is
//! killed and removed on drop.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use agentplane::nats_auth::{bootstrap, mint_workspace_creds};
use agentplane::transport::nats::NatsTransport;
use agentplane_schema::nats::Subjects;
use agentplane_schema::tool::{ToolRequest, ToolResult};
use agentplane_tests::NatsServer;
use anyhow::{Context, bail};

/// How long a relay may take from spawn to its first hello; generous, since a hundred of them
/// start at once on a small machine.
const READY_TIMEOUT: Duration = Duration::from_secs(120);
/// How often a waiting start looks whether a relay has died instead.
const READY_POLL: Duration = Duration::from_millis(250);
/// Lines of a failed relay's log shown in the error.
const LOG_TAIL_LINES: usize = 20;

/// One `agentplane-relay` process; killed on drop.
pub struct RelayProcess {
    pub workspace_id: String,
    /// The workspace root the relay's tools run in.
    pub root: PathBuf,
    log: PathBuf,
    child: Child,
}

impl RelayProcess {
    fn spawn(binary: &Path, nats_url: &str, dir: &Path, workspace_id: &str, creds: &str) -> anyhow::Result<Self> {
        let dir = dir.join(workspace_id);
        let (root, state) = (dir.join("root"), dir.join("state"));
        std::fs::create_dir_all(&root)?;
        std::fs::create_dir_all(&state)?;
        let creds_path = dir.join("relay.creds");
        write_private(&creds_path, creds)?;
        let log = dir.join("relay.log");
        let child = Command::new(binary)
            .args(["--nats", nats_url, "--workspace", workspace_id])
            .arg("--root")
            .arg(&root)
            .arg("--state-dir")
            .arg(&state)
            .arg("--creds")
            .arg(&creds_path)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("HOME", &root)
            .env("LANG", "C.UTF-8")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&log)?)
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        Ok(RelayProcess { workspace_id: workspace_id.to_string(), root, log, child })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `Err` with the end of its log when the process has exited.
    fn check_running(&mut self) -> anyhow::Result<()> {
        match self.child.try_wait()? {
            None => Ok(()),
            Some(status) => {
                let log = std::fs::read_to_string(&self.log).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(LOG_TAIL_LINES).collect();
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                bail!("the relay of {} exited ({status}); its log ends:\n{}", self.workspace_id, tail.join("\n"))
            }
        }
    }
}

impl Drop for RelayProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A nats-server, the transport, and a relay per workspace, all of which said hello.
pub struct Fleet {
    // Dropped in field order: the relays before the server they use, the files last.
    relays: Vec<RelayProcess>,
    pub transport: Arc<NatsTransport>,
    _nats: NatsServer,
    _dir: tempfile::TempDir,
    /// From the first spawn to the last hello.
    pub ready_in: Duration,
}

impl Fleet {
    /// Starts everything; `relay_bin` defaults to the `agentplane-relay` built beside this
    /// executable ([`crate::sibling_binary`]; build it with `cargo build --release -p
    /// agentplane-relay`).
    pub async fn start(relay_bin: Option<PathBuf>, workspaces: &[String], scenario: &str) -> anyhow::Result<Self> {
        let binary = match relay_bin {
            Some(b) => b,
            None => crate::sibling_binary("agentplane-relay")?,
        };
        if !binary.is_file() {
            bail!("{} not found: build it with `cargo build --release -p agentplane-relay`", binary.display());
        }
        let auth = bootstrap("ap")?;
        let config = auth.server_config.clone();
        // The harness waits for the port with blocking sleeps (and panics when the server fails).
        let nats = tokio::task::spawn_blocking(move || NatsServer::start_with_config(&config))
            .await
            .context("nats-server did not start (is AGENTPLANE_TEST_NATS_SERVER set?)")?;
        let subjects = Subjects::default();
        // The orchestrator's own setting, so the bench waits for acknowledgements as it does.
        let request_timeout = Duration::from_millis(agentplane_config::Settings::defaults().nats.request_timeout_ms);
        let transport =
            NatsTransport::connect(&nats.url(), Some(&auth.orchestrator_creds), subjects.clone(), request_timeout)
                .await?;
        let presence = transport.presence();

        let dir = tempfile::tempdir()?;
        let since = Instant::now();
        let mut relays = Vec::with_capacity(workspaces.len());
        for ws in workspaces {
            let creds = mint_workspace_creds(&auth.account_signing_seed, &auth.account_public_key, &subjects, ws)?;
            relays.push(RelayProcess::spawn(&binary, &nats.url(), dir.path(), ws, &creds)?);
        }
        let deadline = since + READY_TIMEOUT;
        for (i, relay) in relays.iter_mut().enumerate() {
            while !presence.wait_ready(&relay.workspace_id, since, READY_POLL).await {
                relay.check_running()?;
                if Instant::now() > deadline {
                    bail!("the relay of {} said no hello within {READY_TIMEOUT:?}", relay.workspace_id);
                }
            }
            if (i + 1) % 25 == 0 && i + 1 < workspaces.len() {
                eprintln!("{scenario}: {}/{} relays ready", i + 1, workspaces.len());
            }
        }
        let ready_in = since.elapsed();
        eprintln!("{scenario}: {} relay(s) ready in {:.1} s", relays.len(), ready_in.as_secs_f64());
        Ok(Fleet { relays, transport: Arc::new(transport), _nats: nats, _dir: dir, ready_in })
    }

    pub fn relays(&self) -> &[RelayProcess] {
        &self.relays
    }

    /// CPU time of all relays so far.
    pub fn relay_cpu_time(&self) -> anyhow::Result<Duration> {
        self.relays.iter().map(|r| crate::cpu_time(r.pid())).sum()
    }

    /// Resident set size of all relays together, in KiB.
    pub fn relay_rss_kib(&self) -> anyhow::Result<u64> {
        self.relays.iter().map(|r| crate::rss_kib(r.pid())).sum()
    }

    /// Proportional set size of all relays together, in KiB (shared pages counted once).
    pub fn relay_pss_kib(&self) -> anyhow::Result<u64> {
        self.relays.iter().map(|r| crate::pss_kib(r.pid())).sum()
    }

    /// The warnings and errors the relays have logged, prefixed with their workspace: a relay
    /// that had to retry or drop something says so only there.
    pub fn relay_log_problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        for relay in &self.relays {
            let log = std::fs::read_to_string(&relay.log).unwrap_or_default();
            let bad = log.lines().filter(|l| l.contains("WARN") || l.contains("ERROR"));
            problems.extend(bad.map(|l| format!("{}: {l}", relay.workspace_id)));
        }
        problems
    }
}

/// The "no-op" tool call of `tool-roundtrip` and the `tool_roundtrip` bench: the cheapest real
/// tool is `read_file` of a one-line file — no process, one small read, a result of a few bytes —
/// so what is measured is the way there and back (NATS, acknowledgement, journal, results)
/// rather than any work. Write [`NOOP_TEXT`] to [`NOOP_FILE`] in each relay's root first.
pub const NOOP_FILE: &str = "noop.txt";
pub const NOOP_TEXT: &str = "ok\n";

/// A tool request as the orchestrator sends it, from a chat and user of the benchmarks.
pub fn tool_request(call_id: String, name: &str, args: serde_json::Value) -> ToolRequest {
    ToolRequest { call_id, chat_id: "loadgen".into(), user_id: "loadgen".into(), name: name.into(), args }
}

/// The no-op call (see [`NOOP_FILE`]) with this call id; call ids must differ, since a relay
/// answers a repeated one from its journal without running it.
pub fn noop_request(call_id: String) -> ToolRequest {
    tool_request(call_id, "read_file", serde_json::json!({ "path": NOOP_FILE }))
}

/// `Err` unless `result` is the answer to the no-op call `call_id`.
pub fn check_noop(call_id: &str, result: &ToolResult) -> Result<(), String> {
    if result.call_id != call_id {
        Err(format!("{call_id} was answered with {}'s result", result.call_id))
    } else if result.is_error || !result.output.contains(NOOP_TEXT.trim()) {
        Err(format!("tool error: {}", result.output))
    } else {
        Ok(())
    }
}

/// `ws-000`, `ws-001`, …
pub fn workspace_ids(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("ws-{i:03}")).collect()
}

/// Credentials are secrets: readable by this user only, as the provisioner writes them.
fn write_private(path: &Path, contents: &str) -> std::io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path)?.write_all(contents.as_bytes())
}

/// A nats-server trusting a fresh agentplane operator and account, and a directory holding what
/// `agentplane nats init` writes (for `nats.credentials_dir` of a server process that provisions
/// its own relays).
pub fn nats_with_auth() -> anyhow::Result<(NatsServer, tempfile::TempDir)> {
    let auth = bootstrap("ap")?;
    let dir = tempfile::tempdir()?;
    agentplane::nats_auth::write_bootstrap(&auth, dir.path())?;
    let nats = NatsServer::start_with_config(&auth.server_config);
    Ok((nats, dir))
}

/// The settings of an `agentplane serve` process that provisions its own relays (the `local`
/// template) over `nats` with what [`nats_with_auth`] wrote to `credentials_dir`; the relay
/// binary is `relay_bin`, by default the one next to this executable.
pub fn server_relay_env(
    nats: &NatsServer,
    credentials_dir: &Path,
    relay_bin: Option<PathBuf>,
) -> anyhow::Result<Vec<(&'static str, String)>> {
    let relay = match relay_bin {
        Some(r) => r,
        None => std::env::current_exe()?.with_file_name("agentplane-relay"),
    };
    Ok(vec![
        ("AGENTPLANE__NATS__URL", nats.url()),
        ("AGENTPLANE__NATS__CREDENTIALS_DIR", credentials_dir.display().to_string()),
        ("AGENTPLANE__NATS__RELAY_BINARY", relay.display().to_string()),
    ])
}
