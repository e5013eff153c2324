//! The `agentplane` binary: `agentplane serve` runs a replica; the other subcommands are clients
//! of a running server (see [`agentplane::cli`]) or set-up helpers.

use std::net::TcpListener;
use std::path::PathBuf;

use agentplane::cli::{self, ModelCommand, ProviderCommand, Remote, TemplateCommand, WorkspaceCommand};
use anyhow::Context as _;
use clap::{Parser, Subcommand};

/// mimalloc instead of glibc's malloc: the server allocates and frees many small short-lived
/// buffers per step (events, statements, request bodies) across threads.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "agentplane", version, about = "Self-hosted control plane for coding agents")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run an orchestrator replica (embedded SQLite and in-process tools unless configured).
    Serve {
        /// Settings file (TOML); AGENTPLANE__SECTION__KEY variables override it.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Address to listen on (overrides server.listen; default 127.0.0.1:7420).
        #[arg(long)]
        listen: Option<String>,
        /// Data directory (overrides server.data_dir; default ./data).
        #[arg(long)]
        data_dir: Option<PathBuf>,
    },
    /// Generate the NATS operator, accounts and credentials for a deployment with relays.
    Nats {
        #[command(subcommand)]
        command: NatsCommand,
    },
    /// Manage workspace templates (admin).
    Templates {
        #[command(flatten)]
        remote: Remote,
        #[command(subcommand)]
        command: TemplateCommand,
    },
    /// Manage LLM providers (admin). API keys are read from an environment variable or stdin,
    /// never from the command line.
    Providers {
        #[command(flatten)]
        remote: Remote,
        #[command(subcommand)]
        command: ProviderCommand,
    },
    /// Manage models (admin; members may list the enabled ones).
    Models {
        #[command(flatten)]
        remote: Remote,
        #[command(subcommand)]
        command: ModelCommand,
    },
    /// Manage your workspaces.
    Workspaces {
        #[command(flatten)]
        remote: Remote,
        #[command(subcommand)]
        command: WorkspaceCommand,
    },
}

#[derive(Subcommand)]
enum NatsCommand {
    /// Write server.conf (to include in nats-server's configuration), orchestrator.creds and the
    /// account signing key into DIR.
    Init {
        #[arg(long)]
        out: PathBuf,
        /// Subject prefix (must match nats.prefix).
        #[arg(long, default_value = agentplane_schema::nats::DEFAULT_PREFIX)]
        prefix: String,
    },
}

fn main() -> std::process::ExitCode {
    match run(Cli::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("agentplane: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve { config, listen, data_dir } => {
            let mut settings = agentplane_config::Settings::load(config.as_deref())?;
            if let Some(listen) = listen {
                settings.server.listen = listen;
            }
            if let Some(dir) = data_dir {
                settings.server.data_dir = dir;
            }
            settings.validate()?;
            init_tracing(&settings);
            let listener = TcpListener::bind(&settings.server.listen)
                .with_context(|| format!("binding {}", settings.server.listen))?;
            actix_rt::System::new().block_on(agentplane::server::run(settings, listener))
        }
        Command::Nats { command: NatsCommand::Init { out, prefix } } => cli::nats_init(&out, &prefix),
        Command::Templates { remote, command } => runtime()?.block_on(cli::templates(remote, command)),
        Command::Workspaces { remote, command } => runtime()?.block_on(cli::workspaces(remote, command)),
        Command::Providers { remote, command } => runtime()?.block_on(cli::providers(remote, command)),
        Command::Models { remote, command } => runtime()?.block_on(cli::models(remote, command)),
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread().enable_all().build()?)
}

fn init_tracing(settings: &agentplane_config::Settings) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&settings.server.log_filter));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if settings.server.log_json {
        builder.json().init();
    } else {
        builder.init();
    }
}
