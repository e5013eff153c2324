//! agentplane settings.
//!
//! [`Settings`] is made of one struct per subsystem. Values come from three layers, later ones
//! winning: the defaults embedded from `default.toml`, an optional file (`--config`), and the
//! environment (`AGENTPLANE__SECTION__KEY`, nested keys joined by `__`). [`Settings::validate`]
//! runs after loading and names the offending key in every error.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// The embedded defaults; each key is documented there.
pub const DEFAULT_TOML: &str = include_str!("../default.toml");

/// Prefix of environment overrides.
pub const ENV_PREFIX: &str = "AGENTPLANE";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("could not load settings: {0}")]
    Load(#[from] config::ConfigError),
    #[error("invalid setting `{key}`: {message}")]
    Invalid { key: &'static str, message: String },
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    pub server: ServerSettings,
    pub database: DatabaseSettings,
    pub llm: LlmSettings,
    pub agent: AgentSettings,
    pub tools: ToolSettings,
    pub workspaces: WorkspaceSettings,
    pub nats: NatsSettings,
    pub auth: AuthSettings,
    pub secrets: SecretsSettings,
}

/// The largest `server.stream_buffer`: each watched chat allocates its buffer in full.
pub const MAX_STREAM_BUFFER: usize = 65_536;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerSettings {
    /// Address the HTTP/WebSocket API listens on. Default `127.0.0.1:7420`.
    pub listen: String,
    /// Where the SQLite database and local workspaces live. Default `./data`.
    pub data_dir: PathBuf,
    /// Arbiter threads for chat actors; 0 = half the cores (at least one). Default 0.
    pub actor_threads: usize,
    /// HTTP worker threads; 0 = half the cores (at least one). Default 0.
    pub http_workers: usize,
    /// Live events a WebSocket watcher may fall behind by before it is caught up from the
    /// database. Each watched chat holds a buffer of this many events (rounded up to a power of
    /// two), allocated when its first watcher connects. Default 1024, at most
    /// [`MAX_STREAM_BUFFER`].
    pub stream_buffer: usize,
    /// Log as JSON lines instead of text. Default false.
    pub log_json: bool,
    /// tracing-subscriber filter. Default `info`.
    pub log_filter: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseSettings {
    /// Database URL; empty = SQLite under `server.data_dir`. Default empty.
    pub url: String,
    /// Connection pool size. Default 8. On PostgreSQL, up to three connections at a time hold
    /// group commits; the rest serve reads.
    pub max_connections: u32,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LlmSettings {
    /// TCP/TLS connect timeout for provider calls. Default 10000.
    pub connect_timeout_ms: u64,
    /// Longest silence inside a streamed answer. Default 120000.
    pub read_timeout_ms: u64,
    pub retry: RetrySettings,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetrySettings {
    /// Attempts in all, the first included. Default 5.
    pub max_attempts: usize,
    /// First backoff delay (exponential, with jitter). Default 500.
    pub initial_delay_ms: u64,
    /// Cap on one delay, `retry-after` included. Default 30000.
    pub max_delay_ms: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentSettings {
    /// Model steps per turn before the turn ends with an error. Default 200.
    pub max_steps: u32,
    /// Levels of sub-agents below a root chat. Default 2.
    pub max_depth: u32,
    /// Sub-agents running at once under one chat. Default 8.
    pub max_children: usize,
    /// Times a crashed (panicked) step is restarted from the database before the turn fails.
    /// Default 1.
    pub step_crash_restarts: u32,
    /// Generate a chat's title from its first message with a short model call. Default true.
    pub generate_titles: bool,
    /// Model for titles; empty = the chat's model. Default empty.
    pub title_model_id: String,
    /// Deployment system prompt, layered above the built-in one. Default empty.
    pub system_prompt: String,
    /// How long an idle chat keeps the text of its last prompt, so that a turn starting soon
    /// writes only its new messages; 0 = let it go when the turn ends. Default 60000.
    pub keep_prompt_idle_ms: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ToolSettings {
    /// `execute` timeout when the model gives none. Default 30.
    pub execute_default_timeout_seconds: u64,
    /// Largest `execute` timeout a model may ask for. Default 3600.
    pub execute_max_timeout_seconds: u64,
    /// Tool output returned to the model, head and tail kept. Default 32768.
    pub output_cap_bytes: usize,
    /// `read_file` lines when the model gives no limit. Default 2000.
    pub read_default_limit_lines: usize,
    /// `read_file` cuts longer lines. Default 2000.
    pub read_max_line_chars: usize,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkspaceSettings {
    /// Root of `local` workspaces; empty = `<data_dir>/workspaces`. Default empty.
    pub root: String,
    /// Longest run of a `command` provisioner script. Default 600.
    pub command_timeout_seconds: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NatsSettings {
    /// NATS server URL; empty = embedded in-process tools. Default empty.
    pub url: String,
    /// URL relays use to reach NATS; empty = `url`. Default empty.
    pub relay_url: String,
    /// Subject prefix. Default `ap`.
    pub prefix: String,
    /// Output directory of `agentplane nats init`; empty = connect without auth. Default empty.
    pub credentials_dir: String,
    /// Wait for a relay to accept a request before the workspace counts as offline. Default 5000.
    pub request_timeout_ms: u64,
    /// Relay binary for `local` workspaces; empty = next to this binary. Default empty.
    pub relay_binary: String,
    /// Wait for a new workspace's relay hello. Default 60.
    pub ready_timeout_seconds: u64,
}

impl ServerSettings {
    /// The arbiter threads chat actors run on: `actor_threads`, or half the cores.
    pub fn actor_thread_count(&self) -> usize {
        or_half_the_cores(self.actor_threads)
    }

    /// The HTTP worker threads: `http_workers`, or half the cores.
    pub fn http_worker_count(&self) -> usize {
        or_half_the_cores(self.http_workers)
    }
}

/// `configured`, or when it is 0 half the cores (at least one). The actors and the HTTP workers
/// share the cores with the database and NATS threads: on two cores, one of each took 16 % less
/// CPU per `loadgen` run than two of each, at a higher rate (benches/REPORT.md, fourth round).
fn or_half_the_cores(configured: usize) -> usize {
    match configured {
        0 => std::thread::available_parallelism().map_or(1, |n| (n.get() / 2).max(1)),
        n => n,
    }
}

impl NatsSettings {
    pub fn enabled(&self) -> bool {
        !self.url.trim().is_empty()
    }

    pub fn relay_url(&self) -> &str {
        if self.relay_url.trim().is_empty() { self.url.trim() } else { self.relay_url.trim() }
    }
}

/// Where the key that encrypts provider API keys comes from.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecretsSettings {
    /// 32 bytes, base64. Default empty (use `key_file`).
    pub key: String,
    /// Default empty: `<data_dir>/secret.key`, created on first start.
    pub key_file: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthSettings {
    /// Admin token used on first start instead of a random one. Default empty.
    pub bootstrap_token: String,
}

impl Settings {
    /// Defaults, then `file` if given, then the process environment; validated.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        Self::load_with_env(file, std::env::vars())
    }

    /// As [`Settings::load`], with the environment given explicitly (tests).
    pub fn load_with_env(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let mut builder =
            config::Config::builder().add_source(config::File::from_str(DEFAULT_TOML, config::FileFormat::Toml));
        if let Some(path) = file {
            builder = builder.add_source(config::File::from(path).required(true));
        }
        let env: config::Map<String, String> =
            env.into_iter().filter(|(k, _)| k.starts_with(&format!("{ENV_PREFIX}__"))).collect();
        builder = builder.add_source(
            config::Environment::with_prefix(ENV_PREFIX)
                .prefix_separator("__")
                .separator("__")
                .try_parsing(true)
                .source(Some(env)),
        );
        let settings: Settings = builder.build()?.try_deserialize()?;
        settings.validate()?;
        Ok(settings)
    }

    /// The embedded defaults alone (tests and tools start from these).
    pub fn defaults() -> Self {
        Self::load_with_env(None, Vec::new()).expect("embedded default.toml is valid")
    }

    /// Checks values serde cannot; each error names its key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        fn invalid(key: &'static str, message: impl Into<String>) -> ConfigError {
            ConfigError::Invalid { key, message: message.into() }
        }
        if self.server.listen.parse::<SocketAddr>().is_err() {
            return Err(invalid(
                "server.listen",
                format!("`{}` is not an address like 127.0.0.1:7420", self.server.listen),
            ));
        }
        if !(1..=MAX_STREAM_BUFFER).contains(&self.server.stream_buffer) {
            return Err(invalid("server.stream_buffer", format!("must be between 1 and {MAX_STREAM_BUFFER}")));
        }
        if self.server.data_dir.as_os_str().is_empty() {
            return Err(invalid("server.data_dir", "must not be empty"));
        }
        let url = self.database.url.trim();
        if !url.is_empty() && !["sqlite:", "postgres://", "postgresql://"].iter().any(|p| url.starts_with(p)) {
            return Err(invalid(
                "database.url",
                "must start with sqlite:, postgres:// or postgresql:// (or be empty for the embedded SQLite)",
            ));
        }
        if self.database.max_connections == 0 {
            return Err(invalid("database.max_connections", "must be at least 1"));
        }
        if self.llm.retry.max_attempts == 0 {
            return Err(invalid("llm.retry.max_attempts", "must be at least 1"));
        }
        if self.llm.retry.initial_delay_ms > self.llm.retry.max_delay_ms {
            return Err(invalid("llm.retry.initial_delay_ms", "must not exceed llm.retry.max_delay_ms"));
        }
        if self.llm.read_timeout_ms == 0 {
            return Err(invalid("llm.read_timeout_ms", "must be positive"));
        }
        if self.agent.max_steps == 0 {
            return Err(invalid("agent.max_steps", "must be at least 1"));
        }
        let t = &self.tools;
        if t.execute_default_timeout_seconds == 0 || t.execute_default_timeout_seconds > t.execute_max_timeout_seconds {
            return Err(invalid(
                "tools.execute_default_timeout_seconds",
                "must be between 1 and tools.execute_max_timeout_seconds",
            ));
        }
        if t.output_cap_bytes < 1024 {
            return Err(invalid("tools.output_cap_bytes", "must be at least 1024"));
        }
        let n = &self.nats;
        if n.enabled() && !["nats://", "tls://", "ws://", "wss://"].iter().any(|p| n.url.trim().starts_with(p)) {
            return Err(invalid("nats.url", "must start with nats://, tls://, ws:// or wss:// (or be empty)"));
        }
        if n.prefix.is_empty() || !n.prefix.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-') {
            return Err(invalid("nats.prefix", "must be one subject token (letters, digits, - and _)"));
        }
        if n.request_timeout_ms == 0 {
            return Err(invalid("nats.request_timeout_ms", "must be positive"));
        }
        if t.read_default_limit_lines == 0 {
            return Err(invalid("tools.read_default_limit_lines", "must be at least 1"));
        }
        Ok(())
    }

    /// The database URL in force: the configured one, or the embedded SQLite file.
    pub fn database_url(&self) -> String {
        let url = self.database.url.trim();
        if url.is_empty() {
            format!("sqlite://{}?mode=rwc", self.server.data_dir.join("agentplane.db").display())
        } else {
            url.to_string()
        }
    }

    /// Directory of `local` workspaces.
    /// The file holding the API-key encryption key when `secrets.key` is not set.
    pub fn secret_key_file(&self) -> PathBuf {
        if self.secrets.key_file.trim().is_empty() {
            self.server.data_dir.join("secret.key")
        } else {
            PathBuf::from(&self.secrets.key_file)
        }
    }

    pub fn workspace_root(&self) -> PathBuf {
        if self.workspaces.root.trim().is_empty() {
            self.server.data_dir.join("workspaces")
        } else {
            PathBuf::from(&self.workspaces.root)
        }
    }

    /// Whether the database is PostgreSQL.
    pub fn is_postgres(&self) -> bool {
        self.database_url().starts_with("postgres")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn defaults_load_and_validate() {
        let s = Settings::defaults();
        assert_eq!(s.server.listen, "127.0.0.1:7420");
        assert_eq!(s.llm.retry.max_attempts, 5);
        assert!(s.database_url().starts_with("sqlite://"));
        assert!(s.database_url().ends_with("agentplane.db?mode=rwc"));
    }

    #[test]
    fn thread_counts_default_to_half_the_cores() {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let mut s = Settings::defaults();
        assert_eq!(s.server.actor_thread_count(), (cores / 2).max(1));
        assert_eq!(s.server.http_worker_count(), (cores / 2).max(1));
        s.server.actor_threads = 3;
        s.server.http_workers = 5;
        assert_eq!((s.server.actor_thread_count(), s.server.http_worker_count()), (3, 5));
    }

    #[test]
    fn environment_overrides_nested_keys() {
        let s = Settings::load_with_env(
            None,
            env(&[
                ("AGENTPLANE__SERVER__LISTEN", "0.0.0.0:9000"),
                ("AGENTPLANE__LLM__RETRY__MAX_ATTEMPTS", "2"),
                ("UNRELATED", "x"),
            ]),
        )
        .expect("loads");
        assert_eq!(s.server.listen, "0.0.0.0:9000");
        assert_eq!(s.llm.retry.max_attempts, 2);
    }

    #[test]
    fn file_layer_sits_between_defaults_and_environment() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("agentplane.toml");
        std::fs::write(
            &path,
            "[agent]\nmax_steps = 7\nsystem_prompt = \"be terse\"\n[server]\nlisten = \"127.0.0.1:1\"\n",
        )
        .expect("write");
        let s =
            Settings::load_with_env(Some(&path), env(&[("AGENTPLANE__SERVER__LISTEN", "127.0.0.1:2")])).expect("loads");
        assert_eq!(s.agent.max_steps, 7);
        assert_eq!(s.agent.system_prompt, "be terse");
        assert_eq!(s.server.listen, "127.0.0.1:2");
    }

    #[test]
    fn validation_names_the_key() {
        let err =
            Settings::load_with_env(None, env(&[("AGENTPLANE__SERVER__LISTEN", "nonsense")])).expect_err("invalid");
        assert!(err.to_string().contains("server.listen"), "{err}");
        let err =
            Settings::load_with_env(None, env(&[("AGENTPLANE__DATABASE__URL", "mysql://x")])).expect_err("invalid");
        assert!(err.to_string().contains("database.url"), "{err}");
        let err =
            Settings::load_with_env(None, env(&[("AGENTPLANE__LLM__RETRY__MAX_ATTEMPTS", "0")])).expect_err("invalid");
        assert!(err.to_string().contains("llm.retry.max_attempts"), "{err}");
        for bad in ["0", "65537"] {
            let err =
                Settings::load_with_env(None, env(&[("AGENTPLANE__SERVER__STREAM_BUFFER", bad)])).expect_err("invalid");
            assert!(err.to_string().contains("server.stream_buffer"), "{bad}: {err}");
        }
    }

    #[test]
    fn nats_settings_are_checked() {
        let s = Settings::defaults();
        assert!(!s.nats.enabled());
        let s = Settings::load_with_env(None, env(&[("AGENTPLANE__NATS__URL", "nats://127.0.0.1:4222")])).expect("ok");
        assert!(s.nats.enabled());
        assert_eq!(s.nats.relay_url(), "nats://127.0.0.1:4222");
        let err = Settings::load_with_env(None, env(&[("AGENTPLANE__NATS__URL", "http://x")])).expect_err("bad");
        assert!(err.to_string().contains("nats.url"), "{err}");
        let err = Settings::load_with_env(None, env(&[("AGENTPLANE__NATS__PREFIX", "a.b")])).expect_err("bad");
        assert!(err.to_string().contains("nats.prefix"), "{err}");
    }

    #[test]
    fn unknown_keys_are_refused() {
        let err = Settings::load_with_env(None, env(&[("AGENTPLANE__SERVER__LISTN", "x")])).expect_err("unknown");
        assert!(err.to_string().contains("listn"), "{err}");
    }
}
