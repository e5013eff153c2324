//! `loadgen`: measures a real `agentplane serve` process over its public API, with the scripted
//! zero-latency LLM as the provider. Prints a table and, with `--json FILE`, writes the figures.
//!
//! Scenarios:
//! - `first-delta`: one chat, N sequential turns; time from `POST /messages` to the first
//!   `message_delta` on the chat's WebSocket, and to the turn's `idle`.
//! - `idle`: N chats each run one turn and stay loaded; server RSS before and after.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use agentplane_benches::{ADMIN_TOKEN, ServerProcess, summarize};
use agentplane_schema::api::{ChatStatus, CreateChat, CreateModel, CreateProvider, ProviderType, SendMessage};
use agentplane_schema::event::EventBody;
use agentplane_schema::message::Part;
use agentplane_tests::{ApiClient, EventStream, ScriptedLlm};
use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(60);

#[derive(Parser)]
#[command(about = "Load generator for agentplane")]
struct Cli {
    /// The agentplane binary (default: next to loadgen).
    #[arg(long, global = true)]
    server_bin: Option<PathBuf>,
    /// Also write the figures as JSON to this file.
    #[arg(long, global = true)]
    json: Option<PathBuf>,
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Subcommand)]
enum Scenario {
    /// Time to first delta over sequential turns of one chat.
    FirstDelta {
        #[arg(long, default_value_t = 1000)]
        turns: usize,
        /// Turns run first and not measured.
        #[arg(long, default_value_t = 50)]
        warmup: usize,
    },
    /// RSS with N loaded idle chats.
    Idle {
        #[arg(long, default_value_t = 1000)]
        chats: usize,
        #[arg(long, default_value_t = 16)]
        concurrency: usize,
    },
}

async fn setup(server: &ServerProcess, llm: &ScriptedLlm) -> anyhow::Result<ApiClient> {
    let admin = ApiClient::new(server.base_url.clone(), ADMIN_TOKEN);
    let provider = admin
        .create_provider(&CreateProvider {
            provider_type: ProviderType::OpenaiCompatible,
            name: "scripted".into(),
            base_url: llm.base_url(),
            api_key: None,
            settings: serde_json::Value::Null,
        })
        .await?;
    admin
        .create_model(&CreateModel {
            provider_id: provider.id,
            model: "scripted".into(),
            display_name: None,
            context_window: 1_000_000,
            max_output_tokens: None,
            vision: false,
            enabled: true,
            is_default: true,
        })
        .await?;
    Ok(admin)
}

fn text(t: &str) -> Vec<Part> {
    vec![Part::text(t)]
}

async fn first_delta(bin: Option<PathBuf>, turns: usize, warmup: usize) -> anyhow::Result<serde_json::Value> {
    let llm = ScriptedLlm::builder().record(false).start();
    let server = ServerProcess::start(bin, &[]).await?;
    let admin = setup(&server, &llm).await?;
    let chat =
        admin.create_chat(&CreateChat { content: text("hi"), model_id: None, workspace_id: None, title: None }).await?;
    let mut stream = EventStream::connect(&server.base_url, &chat.id, ADMIN_TOKEN, Some(0)).await?;
    stream.wait_for_status(ChatStatus::Idle, WAIT).await?;
    let mut to_delta = Vec::with_capacity(turns);
    let mut to_idle = Vec::with_capacity(turns);
    let cpu_before = server.cpu_time()?;
    let started = Instant::now();
    for i in 0..warmup + turns {
        let t0 = Instant::now();
        admin.send(&chat.id, &SendMessage { content: text("next"), busy_behavior: Default::default() }).await?;
        let mut delta_at = None;
        stream
            .wait_for(
                |e| {
                    if delta_at.is_none() && matches!(e.body, EventBody::MessageDelta { .. }) {
                        delta_at = Some(t0.elapsed());
                    }
                    matches!(&e.body, EventBody::Status { status: ChatStatus::Idle, .. })
                },
                WAIT,
            )
            .await?;
        let idle_at = t0.elapsed();
        let delta_at = delta_at.context("a turn streamed no delta")?;
        if i >= warmup {
            to_delta.push(delta_at.as_secs_f64() * 1000.0);
            to_idle.push(idle_at.as_secs_f64() * 1000.0);
        }
        if (i + 1) % 100 == 0 {
            eprintln!("first-delta: {}/{} turns", i + 1, warmup + turns);
        }
    }
    let wall = started.elapsed();
    let cpu = server.cpu_time()?.saturating_sub(cpu_before);
    let messages = admin.messages_page(&chat.id, None, Some(1)).await?;
    if messages.messages.last().map(|m| m.text()) != Some("ok".into()) {
        bail!("the last turn did not end with the scripted answer");
    }
    let delta = summarize(to_delta);
    let idle = summarize(to_idle);
    println!("scenario first-delta: {turns} turns (+{warmup} warm-up), one chat, zero-latency model");
    println!("{:<34} {:>9} {:>9} {:>9} {:>9}", "", "p50 ms", "p90 ms", "p99 ms", "max ms");
    println!(
        "{:<34} {:>9.2} {:>9.2} {:>9.2} {:>9.2}",
        "POST /messages → first delta", delta.p50, delta.p90, delta.p99, delta.max
    );
    println!("{:<34} {:>9.2} {:>9.2} {:>9.2} {:>9.2}", "POST /messages → idle", idle.p50, idle.p90, idle.p99, idle.max);
    println!(
        "server CPU: {:.3} ms per turn; wall {:.1} s",
        cpu.as_secs_f64() * 1000.0 / (warmup + turns) as f64,
        wall.as_secs_f64()
    );
    Ok(json!({"scenario": "first-delta", "turns": turns, "to_first_delta_ms": delta, "to_idle_ms": idle,
              "server_cpu_ms_per_turn": cpu.as_secs_f64() * 1000.0 / (warmup + turns) as f64}))
}

async fn idle(bin: Option<PathBuf>, chats: usize, concurrency: usize) -> anyhow::Result<serde_json::Value> {
    let llm = ScriptedLlm::builder().record(false).start();
    let server = ServerProcess::start(bin, &[]).await?;
    let admin = setup(&server, &llm).await?;
    // Let the empty server settle (allocator arenas, first connections) before the baseline.
    let warm = admin
        .create_chat(&CreateChat { content: text("warm"), model_id: None, workspace_id: None, title: None })
        .await?;
    admin.wait_until_chat(&warm.id, |c| c.status == ChatStatus::Idle, WAIT).await?;
    let baseline = server.rss_kib()?;
    let started = Instant::now();
    let semaphore = std::sync::Arc::new(tokio::sync::Semaphore::new(concurrency));
    let mut tasks = Vec::with_capacity(chats);
    for i in 0..chats {
        let admin = admin.clone();
        let permit = semaphore.clone().acquire_owned().await?;
        tasks.push(tokio::spawn(async move {
            let _permit = permit;
            let chat = admin
                .create_chat(&CreateChat {
                    content: text(&format!("chat {i}")),
                    model_id: None,
                    workspace_id: None,
                    title: None,
                })
                .await?;
            admin.wait_until_chat(&chat.id, |c| c.status == ChatStatus::Idle, WAIT).await?;
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let elapsed = started.elapsed();
    let after = server.rss_kib()?;
    let listed = admin.raw(reqwest::Method::GET, "/api/v1/chats?limit=500", None).await?;
    if !listed.0.is_success() {
        bail!("listing chats failed: {}", listed.1);
    }
    let per_chat = (after.saturating_sub(baseline)) as f64 * 1024.0 / chats as f64;
    println!("scenario idle: {chats} chats, each one turn, all actors loaded");
    println!(
        "RSS baseline {:.1} MiB, after {:.1} MiB, delta {:.1} MiB, {:.1} KiB per idle chat",
        baseline as f64 / 1024.0,
        after as f64 / 1024.0,
        after.saturating_sub(baseline) as f64 / 1024.0,
        per_chat / 1024.0
    );
    println!(
        "created and ran {chats} chats in {:.1} s ({:.0} chats/s at concurrency {concurrency})",
        elapsed.as_secs_f64(),
        chats as f64 / elapsed.as_secs_f64()
    );
    Ok(json!({"scenario": "idle", "chats": chats, "rss_baseline_kib": baseline, "rss_after_kib": after,
              "bytes_per_idle_chat": per_chat}))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let report = match cli.scenario {
        Scenario::FirstDelta { turns, warmup } => first_delta(cli.server_bin, turns, warmup).await?,
        Scenario::Idle { chats, concurrency } => idle(cli.server_bin, chats, concurrency).await?,
    };
    if let Some(path) = cli.json {
        std::fs::write(&path, serde_json::to_string_pretty(&report)?)?;
    }
    Ok(())
}
