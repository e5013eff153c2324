//! The `agentplane` binary: `agentplane serve` runs a replica.

use std::net::TcpListener;
use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};

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
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
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
    }
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
