//! `agentplane-relay`: serves one workspace's tools over NATS. Every flag can also come from the
//! environment variable named in `--help`; the library's [`agentplane_relay::worker`] does the
//! work.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;

use agentplane_relay::worker::{self, Credentials, JournalLimits, WorkerSettings};
use agentplane_schema::nats::DEFAULT_PREFIX;
use agentplane_schema::tool::ToolLimits;

/// Holds the credentials text itself; read from the environment only, so it never shows in `ps`.
const CREDS_TEXT_ENV: &str = "AGENTPLANE_RELAY_CREDS";

/// agentplane's workspace worker: runs file and process tools beneath --root for the requests
/// of one workspace on NATS.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// NATS server URL (several: comma-separated).
    #[arg(long = "nats", env = "AGENTPLANE_NATS_URL")]
    nats_url: String,
    /// The workspace id this relay serves (letters, digits, '-' and '_').
    #[arg(long = "workspace", env = "AGENTPLANE_WORKSPACE_ID")]
    workspace_id: String,
    /// NATS credentials file. Alternatively put the file's text in AGENTPLANE_RELAY_CREDS.
    /// Without either, the relay connects without authentication.
    #[arg(long = "creds", env = "AGENTPLANE_RELAY_CREDS_FILE")]
    creds_file: Option<PathBuf>,
    /// The workspace root; the tools cannot reach outside it. Created if missing.
    #[arg(long = "root", env = "AGENTPLANE_RELAY_ROOT")]
    root: PathBuf,
    /// Where the journal lives [default: $HOME/.local/state/agentplane-relay/<workspace>].
    /// Must not be inside the root.
    #[arg(long = "state-dir", env = "AGENTPLANE_RELAY_STATE_DIR")]
    state_dir: Option<PathBuf>,
    /// Subject prefix.
    #[arg(long, env = "AGENTPLANE_NATS_PREFIX", default_value = DEFAULT_PREFIX)]
    prefix: String,
    /// `execute` timeout when the call gives none.
    #[arg(long, env = "AGENTPLANE_RELAY_EXECUTE_DEFAULT_TIMEOUT_SECONDS",
          default_value_t = ToolLimits::default().execute_default_timeout_seconds)]
    execute_default_timeout_seconds: u64,
    /// Longest `execute` timeout a call may ask for.
    #[arg(long, env = "AGENTPLANE_RELAY_EXECUTE_MAX_TIMEOUT_SECONDS",
          default_value_t = ToolLimits::default().execute_max_timeout_seconds)]
    execute_max_timeout_seconds: u64,
    /// Command output kept in a result (head and tail), in bytes.
    #[arg(long, env = "AGENTPLANE_RELAY_OUTPUT_CAP_BYTES", default_value_t = ToolLimits::default().output_cap_bytes)]
    output_cap_bytes: usize,
    /// Lines `read_file` returns when the call gives no limit.
    #[arg(long, env = "AGENTPLANE_RELAY_READ_DEFAULT_LIMIT_LINES",
          default_value_t = ToolLimits::default().read_default_limit_lines)]
    read_default_limit_lines: usize,
    /// Longest line `read_file` returns whole, in characters.
    #[arg(long, env = "AGENTPLANE_RELAY_READ_MAX_LINE_CHARS",
          default_value_t = ToolLimits::default().read_max_line_chars)]
    read_max_line_chars: usize,
    /// Finished calls the journal remembers (calls with effects; reads have the same bound of
    /// their own, in memory only).
    #[arg(long, env = "AGENTPLANE_RELAY_JOURNAL_MAX_CALLS", default_value_t = JournalLimits::default().max_calls)]
    journal_max_calls: usize,
    /// Total size of the finished calls the journal remembers, in bytes (likewise, separately
    /// for reads).
    #[arg(long, env = "AGENTPLANE_RELAY_JOURNAL_MAX_BYTES", default_value_t = JournalLimits::default().max_bytes)]
    journal_max_bytes: usize,
    /// On SIGTERM/SIGINT, how long running calls may take to finish before they are cancelled.
    #[arg(long, env = "AGENTPLANE_RELAY_SHUTDOWN_GRACE_SECONDS", default_value_t = 20)]
    shutdown_grace_seconds: u64,
    /// Stop, as on SIGTERM, once standard input is closed. Whoever starts the relay holds it
    /// open, so the relay ends with its parent, even a parent killed outright.
    #[arg(long, env = "AGENTPLANE_RELAY_STOP_WHEN_STDIN_CLOSES")]
    stop_when_stdin_closes: bool,
    /// Log JSON lines instead of text (to stderr; filter with RUST_LOG).
    #[arg(long, env = "AGENTPLANE_LOG_JSON")]
    log_json: bool,
}

// One thread for the async work (NATS, process output): the tools' file work and the journal's
// fsyncs run on blocking threads, and a second async thread only added wake-ups between the two.
#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    init_tracing(args.log_json);
    let with_stdin = args.stop_when_stdin_closes;
    let settings = settings(args)?;
    let stop = async move {
        if with_stdin {
            tokio::select! {
                () = worker::termination_signal() => {}
                () = worker::stdin_closed() => {}
            }
        } else {
            worker::termination_signal().await;
        }
    };
    worker::run(settings, stop).await?;
    Ok(())
}

fn settings(args: Args) -> anyhow::Result<WorkerSettings> {
    let creds_text = std::env::var(CREDS_TEXT_ENV).ok().filter(|text| !text.trim().is_empty());
    let credentials = match (args.creds_file, creds_text) {
        (Some(_), Some(_)) => {
            anyhow::bail!("give the NATS credentials either with --creds or in {CREDS_TEXT_ENV}, not both")
        }
        (Some(path), None) => Some(Credentials::File(path)),
        (None, Some(text)) => Some(Credentials::Text(text)),
        (None, None) => None,
    };
    let state_dir = match args.state_dir {
        Some(dir) => dir,
        None => {
            let home = std::env::var_os("HOME")
                .filter(|home| !home.is_empty())
                .context("HOME is not set: give the journal's directory with --state-dir")?;
            PathBuf::from(home).join(".local/state/agentplane-relay").join(&args.workspace_id)
        }
    };
    Ok(WorkerSettings {
        nats_url: args.nats_url,
        workspace_id: args.workspace_id,
        credentials,
        root: args.root,
        state_dir,
        prefix: args.prefix,
        limits: ToolLimits {
            execute_default_timeout_seconds: args.execute_default_timeout_seconds,
            execute_max_timeout_seconds: args.execute_max_timeout_seconds,
            output_cap_bytes: args.output_cap_bytes,
            read_default_limit_lines: args.read_default_limit_lines,
            read_max_line_chars: args.read_max_line_chars,
        },
        journal: JournalLimits { max_calls: args.journal_max_calls, max_bytes: args.journal_max_bytes },
        shutdown_grace: Duration::from_secs(args.shutdown_grace_seconds),
    })
}

fn init_tracing(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}
