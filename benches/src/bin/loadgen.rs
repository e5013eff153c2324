//! `loadgen`: measures a real `agentplane serve` process over its public API, with the scripted
//! zero-latency LLM as the provider. Prints a table and, with `--json FILE`, writes the figures.
//!
//! Scenarios:
//! - `first-delta`: one chat, N sequential turns; time from `POST /messages` to the first
//!   `message_delta` on the chat's WebSocket, and to the turn's `idle`.
//! - `idle`: N chats each run one turn and stay loaded; server RSS before and after.
//! - `subagents`: one root spawns N sub-agents and closes them, for several rounds; time and RSS.
//! - `mailbox`: messages per second through one ChatActor (an in-process server).
//! - `burst`: M users, each with a chat, send at the same instant; time to each first delta.
//! - `delta-latency`: provider byte written → WebSocket delta, per piece of streamed answers.
//! - `fanout`: the same with many chats streaming at once, each with several watchers.
//! - `steps`: concurrent chats running tool steps over NATS relays (also the `runs` scenario).
//! - `storage`: the bytes each chat's rows take in the database as it grows to hundreds of turns
//!   (see `agentplane_benches::storage`); fails when they grow faster than the messages.
//!
//! Tool-transport scenarios (no `agentplane serve`: the bench process *is* the orchestrator side,
//! calling the real `NatsTransport` against `agentplane-relay` processes over a nats-server with
//! agentplane's per-workspace credentials; see `agentplane_benches::fleet`):
//! - `tool-roundtrip`: no-op tool calls at a fixed open-loop rate; round-trip percentiles.
//! - `tool-inflight`: many `execute` calls at once across many workspaces; every one must run
//!   exactly once and be answered, also when repeated.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use agentplane::transport::nats::NatsTransport;
use agentplane_actors::ports::ToolTransport as _;
use agentplane_benches::fleet::{Fleet, NOOP_FILE, NOOP_TEXT, check_noop, noop_request, tool_request, workspace_ids};
use agentplane_benches::inprocess::InProcessServer;
use agentplane_benches::{
    ADMIN_TOKEN, ServerProcess, Summary, cpu_time, create_workspaces, delete_workspaces, machine, setup, summarize,
};
use agentplane_schema::api::{ChatStatus, CreateChat, SendMessage};
use agentplane_schema::event::EventBody;
use agentplane_schema::message::Part;
use agentplane_schema::tool::{ToolRequest, ToolResult};
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
    /// The agentplane-relay binary of the tool-* scenarios (default: next to loadgen).
    #[arg(long, global = true)]
    relay_bin: Option<PathBuf>,
    /// Also write the figures as JSON to this file.
    #[arg(long, global = true)]
    json: Option<PathBuf>,
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Subcommand)]
enum Scenario {
    /// A root chat spawns N sub-agents in one step (each answers once), then closes them all;
    /// repeated `rounds` times in the same server to tell a leak from memory kept for reuse.
    Subagents {
        #[arg(long, default_value_t = 1000)]
        agents: usize,
        #[arg(long, default_value_t = 2)]
        rounds: usize,
    },
    /// C chats run turns concurrently, each turn K steps with one tool call (`write_file`) per
    /// step over NATS to relay processes, then a final answer. `--steps 1` with closed-loop
    /// clients is the `runs` scenario.
    Steps {
        #[arg(long, default_value_t = 50)]
        chats: usize,
        /// Tool steps per turn.
        #[arg(long, default_value_t = 1)]
        steps: usize,
        /// Turns each chat runs, one after the other.
        #[arg(long, default_value_t = 20)]
        turns: usize,
        /// Workspaces (one relay process each) the chats share.
        #[arg(long, default_value_t = 10)]
        workspaces: usize,
        /// PostgreSQL URL instead of the embedded SQLite.
        #[arg(long)]
        database_url: Option<String>,
        /// How long the scripted model takes to answer a call on average (ms before its first
        /// byte; the answer then comes in one write). 0 is a zero-latency model: the clients run
        /// closed loop as fast as the machine allows. With a model time the chats are paced as by
        /// a real model, whose time varies: each call takes between 0.8 and 1.2 times it, and
        /// the chats start spread over one model time instead of in lockstep. The rate is then
        /// about chats / (model time + tool time) per second (the reported one is over the whole
        /// run, ramp-up and ramp-down included).
        #[arg(long, default_value_t = 0)]
        model_ms: u64,
    },
    /// Chats run many turns (each: user message, tool steps over NATS, answer); at each
    /// checkpoint the bytes of each chat's rows per table. Fails when the bytes added per
    /// message grow (a copy of the history per step) or a message or event is lost or repeated.
    Storage {
        #[arg(long, default_value_t = agentplane_benches::storage::DEFAULT_CHATS)]
        chats: usize,
        /// Tool steps per turn (0: no NATS and relay needed).
        #[arg(long, default_value_t = agentplane_benches::storage::DEFAULT_TOOL_STEPS)]
        tool_steps: usize,
        /// Turn counts at which the chats are measured (they also are after the first turn).
        #[arg(long, value_delimiter = ',', default_value = agentplane_benches::storage::DEFAULT_CHECKPOINTS)]
        checkpoints: Vec<usize>,
        /// Bytes per message added in the last interval over the first, at most.
        #[arg(long, default_value_t = agentplane_benches::storage::DEFAULT_MAX_GROWTH)]
        max_growth: f64,
        /// PostgreSQL URL (of a fresh database) instead of the embedded SQLite.
        #[arg(long)]
        database_url: Option<String>,
    },
    /// Time from the provider writing a piece of the answer to its delta on the WebSocket.
    DeltaLatency {
        #[arg(long, default_value_t = agentplane_benches::delta_latency::DEFAULT_TURNS)]
        turns: usize,
        #[arg(long, default_value_t = agentplane_benches::delta_latency::DEFAULT_PIECES)]
        pieces: usize,
        #[arg(long, default_value_t = agentplane_benches::delta_latency::DEFAULT_PIECE_DELAY_MS)]
        piece_delay_ms: u64,
    },
    /// S chats stream at once, each watched by W WebSocket clients: provider write → delta at
    /// every watcher.
    Fanout {
        #[arg(long, default_value_t = 200)]
        chats: usize,
        #[arg(long, default_value_t = 2)]
        watchers: usize,
        #[arg(long, default_value_t = 3)]
        turns: usize,
        #[arg(long, default_value_t = 20)]
        pieces: usize,
        #[arg(long, default_value_t = agentplane_benches::delta_latency::DEFAULT_PIECE_DELAY_MS)]
        piece_delay_ms: u64,
    },
    /// M users (each with their own token and chat) send a message at the same instant.
    Burst {
        #[arg(long, default_value_t = 200)]
        users: usize,
    },
    /// Messages per second through one ChatActor's mailbox (in-process server), with 1, 8 and 64
    /// concurrent senders.
    Mailbox {
        #[arg(long, default_value_t = 3.0)]
        seconds: f64,
    },
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
    /// No-op tool round trip orchestrator → relay → orchestrator over NATS at a fixed rate.
    ToolRoundtrip {
        /// Calls per second, spread evenly (open loop: not slowed down by slow answers).
        #[arg(long, default_value_t = 500.0)]
        rate: f64,
        /// Length of the measured run.
        #[arg(long, default_value_t = 20.0)]
        seconds: f64,
        /// Run first at the same rate and not measured.
        #[arg(long, default_value_t = 2.0)]
        warmup_seconds: f64,
        /// Relays (workspaces) the calls are spread over, round robin.
        #[arg(long, default_value_t = 1)]
        workspaces: usize,
    },
    /// Many `execute` calls in flight at once across many workspaces: lost or duplicated?
    ToolInflight {
        #[arg(long, default_value_t = 1000)]
        calls: usize,
        #[arg(long, default_value_t = 100)]
        workspaces: usize,
        /// Calls sent a second time with the same call id (the relays must not run them again).
        #[arg(long, default_value_t = 100)]
        resend: usize,
        /// Each command sleeps this long before it appends its marker, to keep the calls in flight
        /// for a while (the transport then also looks for results in the stream and watches hellos).
        #[arg(long, default_value_t = 0)]
        hold_seconds: u64,
        /// Resend halfway through the hold, while the calls run, instead of after their results
        /// (the relays must then answer both copies with the one result).
        #[arg(long)]
        resend_while_running: bool,
    },
}

/// When one turn got there, from just before `POST /messages`.
struct TimedTurn {
    /// The POST answered.
    accepted: Duration,
    first_delta: Duration,
    idle: Duration,
}

/// Sends `message` to `chat_id` and times the turn on `stream` (connected before) until `idle`.
async fn timed_turn(
    client: &ApiClient,
    stream: &mut EventStream,
    chat_id: &str,
    message: &str,
) -> anyhow::Result<TimedTurn> {
    let t0 = Instant::now();
    client.send(chat_id, &SendMessage { content: text(message), busy_behavior: Default::default() }).await?;
    let accepted = t0.elapsed();
    let mut first_delta = None;
    stream
        .wait_for(
            |e| {
                if first_delta.is_none() && matches!(e.body, EventBody::MessageDelta { .. }) {
                    first_delta = Some(t0.elapsed());
                }
                matches!(&e.body, EventBody::Status { status: ChatStatus::Idle, .. })
            },
            WAIT,
        )
        .await?;
    let idle = t0.elapsed();
    Ok(TimedTurn { accepted, first_delta: first_delta.context("a turn streamed no delta")?, idle })
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
        let times = timed_turn(&admin, &mut stream, &chat.id, "next").await?;
        if i >= warmup {
            to_delta.push(times.first_delta.as_secs_f64() * 1000.0);
            to_idle.push(times.idle.as_secs_f64() * 1000.0);
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

/// What each `tool-inflight` call appends its call id to, in its workspace root.
const MARKER_FILE: &str = "calls.log";
/// `execute` timeout of a `tool-inflight` call beyond its hold: far above the milliseconds it
/// needs, so that a loaded machine shows as slow rather than as failed calls.
const INFLIGHT_EXECUTE_SLACK_SECONDS: u64 = 120;
/// Errors listed in the table (all are counted).
const ERRORS_SHOWN: usize = 5;

/// A report, and why the scenario failed when it found the system misbehaving.
type Verdict = (serde_json::Value, Option<String>);

/// One call through the orchestrator's transport; `Err` when no result came (a transport error,
/// or nothing within [`WAIT`]).
async fn answer(transport: &NatsTransport, ws: &str, request: ToolRequest) -> Result<ToolResult, String> {
    match tokio::time::timeout(WAIT, transport.call(ws, request, None)).await {
        Ok(Ok(result)) => Ok(result),
        Ok(Err(e)) => Err(format!("{:?}: {}", e.kind, e.message)),
        Err(_) => Err(format!("no result within {WAIT:?}")),
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn print_percentiles(label: &str, s: &Summary) {
    println!("{label:<34} {:>9.2} {:>9.2} {:>9.2} {:>9.2}", s.p50, s.p90, s.p99, s.max);
}

fn print_log_problems(problems: &[String]) {
    println!("relay logs: {} warnings or errors", problems.len());
    for p in problems.iter().take(ERRORS_SHOWN) {
        println!("  {p}");
    }
}

fn print_machine(machine: &serde_json::Value) {
    println!("machine: {} cores, load average {} at start", machine["cores"], machine["load_average"]);
}

/// One no-op call of the open loop; `error` is `None` when it answered as expected.
struct Sample {
    scheduled: Instant,
    sent: Instant,
    done: Instant,
    error: Option<String>,
}

/// Sends `rate` calls per second for `seconds`, each at its own scheduled time whatever the
/// earlier ones are doing (open loop), round robin over the relays.
async fn open_loop(fleet: &Fleet, rate: f64, seconds: f64, tag: &str) -> anyhow::Result<Vec<Sample>> {
    let ids: Vec<String> = fleet.relays().iter().map(|r| r.workspace_id.clone()).collect();
    let total = (rate * seconds).round() as usize;
    let start = Instant::now();
    let mut calls = tokio::task::JoinSet::new();
    let mut next_progress = Duration::from_secs(5);
    for i in 0..total {
        let scheduled = start + Duration::from_secs_f64(i as f64 / rate);
        tokio::time::sleep_until(scheduled.into()).await;
        let (transport, ws) = (fleet.transport.clone(), ids[i % ids.len()].clone());
        let request = noop_request(format!("{tag}-{i}"));
        calls.spawn(async move {
            let call_id = request.call_id.clone();
            let sent = Instant::now();
            let error = answer(&transport, &ws, request).await.and_then(|r| check_noop(&call_id, &r)).err();
            Sample { scheduled, sent, done: Instant::now(), error }
        });
        if scheduled - start >= next_progress {
            eprintln!("tool-roundtrip: {tag} {:.0}/{seconds} s, {} calls sent", next_progress.as_secs_f64(), i + 1);
            next_progress += Duration::from_secs(5);
        }
    }
    let mut samples = Vec::with_capacity(total);
    while let Some(sample) = calls.join_next().await {
        samples.push(sample?);
    }
    Ok(samples)
}

async fn tool_roundtrip(
    relay_bin: Option<PathBuf>,
    rate: f64,
    seconds: f64,
    warmup: f64,
    workspaces: usize,
) -> anyhow::Result<Verdict> {
    if !(rate > 0.0 && seconds > 0.0 && warmup >= 0.0 && workspaces > 0) {
        bail!("--rate, --seconds and --workspaces must be positive");
    }
    let machine = machine();
    let fleet = Fleet::start(relay_bin, &workspace_ids(workspaces), "tool-roundtrip").await?;
    for relay in fleet.relays() {
        std::fs::write(relay.root.join(NOOP_FILE), NOOP_TEXT)?;
    }
    if warmup > 0.0 {
        let samples = open_loop(&fleet, rate, warmup, "warmup").await?;
        let failed = samples.iter().filter(|s| s.error.is_some()).count();
        eprintln!("tool-roundtrip: warm-up done, {} calls, {failed} failed", samples.len());
    }

    let (own_before, relays_before) = (cpu_time(std::process::id())?, fleet.relay_cpu_time()?);
    let started = Instant::now();
    let samples = open_loop(&fleet, rate, seconds, "call").await?;
    let own_cpu = cpu_time(std::process::id())?.saturating_sub(own_before);
    let relay_cpu = fleet.relay_cpu_time()?.saturating_sub(relays_before);
    let window = samples.iter().map(|s| s.done).max().unwrap_or(started) - started;

    let errors: Vec<&str> = samples.iter().filter_map(|s| s.error.as_deref()).collect();
    let answered: Vec<&Sample> = samples.iter().filter(|s| s.error.is_none()).collect();
    let latency = summarize(answered.iter().map(|s| ms(s.done - s.scheduled)).collect());
    let service = summarize(answered.iter().map(|s| ms(s.done - s.sent)).collect());
    // The generator's own share of the latency: tokio's timer wakes up to a millisecond late.
    let lateness = summarize(samples.iter().map(|s| ms(s.sent - s.scheduled)).collect());
    let achieved = answered.len() as f64 / window.as_secs_f64();
    let per_call = |cpu: Duration| ms(cpu) / samples.len().max(1) as f64;
    let core_share = |cpu: Duration| 100.0 * cpu.as_secs_f64() / window.as_secs_f64();

    println!(
        "scenario tool-roundtrip: read_file of a {}-byte file (the no-op) at {rate}/s for {seconds} s \
         (+{warmup} s warm-up), open loop, over {workspaces} relay(s), NATS with per-workspace credentials",
        NOOP_TEXT.len()
    );
    print_machine(&machine);
    println!("{:<34} {:>9} {:>9} {:>9} {:>9}", "", "p50 ms", "p90 ms", "p99 ms", "max ms");
    print_percentiles("latency (from scheduled send)", &latency);
    print_percentiles("service time (from actual send)", &service);
    print_percentiles("send lateness (scheduled → sent)", &lateness);
    println!(
        "calls: {} sent, {} answered, {} errors; achieved {achieved:.1} answered/s",
        samples.len(),
        answered.len(),
        errors.len()
    );
    println!(
        "CPU: orchestrator side (this process) {:.1}% of a core, {:.3} ms/call; relays {:.1}%, {:.3} ms/call",
        core_share(own_cpu),
        per_call(own_cpu),
        core_share(relay_cpu),
        per_call(relay_cpu)
    );
    for e in errors.iter().take(ERRORS_SHOWN) {
        println!("error: {e}");
    }
    let log_problems = fleet.relay_log_problems();
    print_log_problems(&log_problems);
    let report = json!({"scenario": "tool-roundtrip", "machine": machine, "tool": "read_file", "rate": rate,
        "seconds": seconds, "warmup_seconds": warmup, "workspaces": workspaces, "sent": samples.len(),
        "answered": answered.len(), "errors": errors.len(), "achieved_per_second": achieved,
        "latency_ms": latency, "service_time_ms": service, "send_lateness_ms": lateness,
        "orchestrator_cpu_ms_per_call": per_call(own_cpu), "orchestrator_cpu_percent": core_share(own_cpu),
        "relay_cpu_ms_per_call": per_call(relay_cpu), "relay_log_problems": log_problems.len(), "relay_cpu_percent": core_share(relay_cpu),
        "first_errors": errors.iter().take(ERRORS_SHOWN).collect::<Vec<_>>()});
    let failure = (!errors.is_empty()).then(|| format!("{} of {} calls failed", errors.len(), samples.len()));
    Ok((report, failure))
}

/// One call of `tool-inflight`, its times counted from the launch.
struct Outcome {
    sent: Duration,
    done: Duration,
    answer: Result<ToolResult, String>,
}

/// Starts every call at once and waits for all of them; outcomes in request order.
async fn launch(transport: &Arc<NatsTransport>, requests: &[(String, ToolRequest)]) -> anyhow::Result<Vec<Outcome>> {
    let t0 = Instant::now();
    let handles: Vec<_> = requests
        .iter()
        .cloned()
        .map(|(ws, request)| {
            let transport = transport.clone();
            tokio::spawn(async move {
                let sent = t0.elapsed();
                let answer = answer(&transport, &ws, request).await;
                Outcome { sent, done: t0.elapsed(), answer }
            })
        })
        .collect();
    let mut outcomes = Vec::with_capacity(handles.len());
    for handle in handles {
        outcomes.push(handle.await?);
    }
    Ok(outcomes)
}

/// The most calls that were sent and not yet answered at one moment.
fn peak_in_flight(outcomes: &[Outcome]) -> usize {
    // An answer at the same instant as a send counts first: the peak is not overstated.
    let mut events: Vec<(Duration, i64)> = outcomes.iter().flat_map(|o| [(o.sent, 1), (o.done, -1)]).collect();
    events.sort();
    let (mut now, mut peak) = (0i64, 0i64);
    for (_, delta) in events {
        now += delta;
        peak = peak.max(now);
    }
    usize::try_from(peak).unwrap_or(0)
}

/// How often each line occurs in the relays' marker files.
fn count_markers(fleet: &Fleet) -> anyhow::Result<HashMap<String, usize>> {
    let mut counts = HashMap::new();
    for relay in fleet.relays() {
        let text = match std::fs::read_to_string(relay.root.join(MARKER_FILE)) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(e.into()),
        };
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            *counts.entry(line.trim().to_string()).or_insert(0) += 1;
        }
    }
    Ok(counts)
}

async fn tool_inflight(
    relay_bin: Option<PathBuf>,
    calls: usize,
    workspaces: usize,
    resend: usize,
    hold_seconds: u64,
    resend_while_running: bool,
) -> anyhow::Result<Verdict> {
    if calls == 0 || workspaces == 0 || resend > calls {
        bail!("--calls and --workspaces must be positive, --resend at most --calls");
    }
    if resend_while_running && hold_seconds == 0 {
        bail!("--resend-while-running needs --hold-seconds: the calls must still be running");
    }
    let machine = machine();
    let ids = workspace_ids(workspaces);
    let fleet = Fleet::start(relay_bin, &ids, "tool-inflight").await?;
    let command_of = |call_id: &str| match hold_seconds {
        0 => format!("echo {call_id} >> {MARKER_FILE}"),
        hold => format!("sleep {hold}; echo {call_id} >> {MARKER_FILE}"),
    };
    let requests: Vec<(String, ToolRequest)> = (0..calls)
        .map(|i| {
            // Call ids are subject tokens, so they are safe in the shell command as they are.
            let call_id = format!("inflight-{i:05}");
            let timeout = hold_seconds + INFLIGHT_EXECUTE_SLACK_SECONDS;
            let args = json!({ "command": command_of(&call_id), "timeout_seconds": timeout });
            (ids[i % workspaces].clone(), tool_request(call_id, "execute", args))
        })
        .collect();
    // The same requests again, same call ids: the journals must answer them without running them.
    let chosen: Vec<usize> = (0..resend).map(|k| k * calls / resend).collect();
    let repeats: Vec<(String, ToolRequest)> = chosen.iter().map(|&i| requests[i].clone()).collect();

    let rss_idle = fleet.relay_rss_kib()?;
    let (own_before, relays_before) = (cpu_time(std::process::id())?, fleet.relay_cpu_time()?);
    eprintln!("tool-inflight: launching {calls} calls");
    let (outcomes, again, markers_before_resend) = if resend_while_running {
        let halfway = Duration::from_secs(hold_seconds) / 2;
        let (outcomes, again) = tokio::join!(launch(&fleet.transport, &requests), async {
            tokio::time::sleep(halfway).await;
            eprintln!("tool-inflight: resending {resend} running calls with the same call ids");
            launch(&fleet.transport, &repeats).await
        });
        (outcomes?, again?, None)
    } else {
        let outcomes = launch(&fleet.transport, &requests).await?;
        let markers = count_markers(&fleet)?;
        eprintln!("tool-inflight: resending {resend} finished calls with the same call ids");
        (outcomes, launch(&fleet.transport, &repeats).await?, Some(markers))
    };
    let own_cpu = cpu_time(std::process::id())?.saturating_sub(own_before);
    let relay_cpu = fleet.relay_cpu_time()?.saturating_sub(relays_before);
    let (rss_after, pss_after) = (fleet.relay_rss_kib()?, fleet.relay_pss_kib()?);
    let wall = outcomes.iter().map(|o| o.done).max().unwrap_or_default();
    let completion = summarize(outcomes.iter().filter(|o| o.answer.is_ok()).map(|o| ms(o.done)).collect());

    let markers = count_markers(&fleet)?;
    let (mut unanswered, mut lost, mut misdelivered, mut tool_errors) = (Vec::new(), 0, 0, Vec::new());
    // The worst kind of unanswered: the orchestrator reports a failure, the tool had its effect.
    let mut ran_unanswered = 0;
    // Unanswered calls bunched on a few relays point at those relays rather than the orchestrator.
    let mut unanswered_by_workspace: BTreeMap<&str, usize> = BTreeMap::new();
    for ((ws, request), outcome) in requests.iter().zip(&outcomes) {
        match &outcome.answer {
            Err(e) => {
                unanswered.push(format!("{}: {e}", request.call_id));
                *unanswered_by_workspace.entry(ws.as_str()).or_default() += 1;
            }
            Ok(r) if r.call_id != request.call_id => misdelivered += 1,
            Ok(r) if r.is_error || r.exit_code != Some(0) => tool_errors.push(format!("{}: {}", r.call_id, r.output)),
            Ok(_) => {}
        }
        // Lost: no result, or a result but nothing happened.
        let ran = markers.contains_key(&request.call_id);
        if outcome.answer.is_err() || !ran {
            lost += 1;
        }
        if outcome.answer.is_err() && ran {
            ran_unanswered += 1;
        }
    }
    let missing = requests.iter().filter(|(_, r)| !markers.contains_key(&r.call_id)).count();
    // Every line beyond the first of a call id, and any line that is no call id at all.
    let extra_lines: usize =
        markers.values().map(|n| n - 1).sum::<usize>() + markers.len().saturating_sub(calls - missing);
    let reran: Option<usize> = markers_before_resend
        .map(|before| markers.iter().map(|(id, n)| n.saturating_sub(before.get(id).copied().unwrap_or(0))).sum());
    let (mut resend_lost, mut resend_differs, mut recovered) = (0, 0, 0);
    for (&i, outcome) in chosen.iter().zip(&again) {
        match (&outcome.answer, &outcomes[i].answer) {
            (Err(_), _) => resend_lost += 1,
            (Ok(second), Ok(first)) if second == first => {}
            (Ok(_), Ok(_)) => resend_differs += 1,
            // The first copy went unanswered: the repeat fetched the result the relay recorded.
            (Ok(_), Err(_)) => recovered += 1,
        }
    }
    let lost = lost + resend_lost;
    let duplicated = extra_lines + misdelivered;
    let log_problems = fleet.relay_log_problems();

    let mib = |kib: u64| kib as f64 / 1024.0;
    println!(
        "scenario tool-inflight: {calls} execute calls (`{}`) launched at once over {workspaces} relays, NATS \
         with per-workspace credentials",
        command_of("<call-id>")
    );
    print_machine(&machine);
    println!(
        "relays ready in {:.1} s; peak in flight {}; wall time launch → last result {:.2} s",
        fleet.ready_in.as_secs_f64(),
        peak_in_flight(&outcomes),
        wall.as_secs_f64()
    );
    println!("{:<34} {:>9} {:>9} {:>9} {:>9}", "", "p50 ms", "p90 ms", "p99 ms", "max ms");
    print_percentiles("completion time (from launch)", &completion);
    println!(
        "results: {} answered, {} unanswered ({ran_unanswered} of which ran all the same), {misdelivered} \
         answered with another call's result, {} tool errors",
        calls - unanswered.len(),
        unanswered.len(),
        tool_errors.len()
    );
    println!(
        "resent {resend} {} calls with the same ids: {resend_lost} unanswered, {resend_differs} answered \
         differently from the first time, {recovered} answered that were unanswered the first time",
        if resend_while_running { "running" } else { "finished" }
    );
    println!(
        "marker lines at the end: {} call ids present, {missing} missing, {extra_lines} extra lines{}",
        markers.len(),
        reran.map(|n| format!(" ({n} written after the resend)")).unwrap_or_default()
    );
    println!(
        "relays' memory: RSS {:.1} MiB total idle, {:.1} MiB after ({:.1} MiB per relay), PSS after {:.1} MiB \
         (shared pages once)",
        mib(rss_idle),
        mib(rss_after),
        mib(rss_after) / workspaces as f64,
        mib(pss_after)
    );
    println!(
        "CPU: this process {:.2} s, relays {:.2} s (not counting the commands they ran)",
        own_cpu.as_secs_f64(),
        relay_cpu.as_secs_f64()
    );
    for e in unanswered.iter().chain(&tool_errors).take(ERRORS_SHOWN) {
        println!("error: {e}");
    }
    if !unanswered_by_workspace.is_empty() {
        println!("unanswered by workspace: {unanswered_by_workspace:?}");
    }
    print_log_problems(&log_problems);
    println!("LOST {lost}, DUPLICATED {duplicated}");
    let report = json!({"scenario": "tool-inflight", "machine": machine, "calls": calls, "workspaces": workspaces,
        "hold_seconds": hold_seconds, "relays_ready_s": fleet.ready_in.as_secs_f64(),
        "peak_in_flight": peak_in_flight(&outcomes), "wall_s": wall.as_secs_f64(), "completion_ms": completion,
        "lost": lost, "duplicated": duplicated, "unanswered": unanswered.len(), "unanswered_but_ran": ran_unanswered,
        "unanswered_by_workspace": unanswered_by_workspace, "missing_markers": missing,
        "extra_marker_lines": extra_lines, "misdelivered_results": misdelivered, "tool_errors": tool_errors.len(),
        "resent": resend, "resent_while_running": resend_while_running, "resend_unanswered": resend_lost,
        "resend_differs": resend_differs, "resend_recovered": recovered, "lines_after_resend": reran,
        "relay_rss_idle_kib": rss_idle, "relay_rss_after_kib": rss_after, "relay_pss_after_kib": pss_after,
        "orchestrator_cpu_s": own_cpu.as_secs_f64(), "relay_cpu_s": relay_cpu.as_secs_f64(),
        "relay_log_problems": log_problems.len(),
        "first_errors": unanswered.iter().chain(&tool_errors).take(ERRORS_SHOWN).collect::<Vec<_>>()});
    let failure = (lost + duplicated + tool_errors.len() + resend_differs > 0).then(|| {
        format!(
            "{lost} lost, {duplicated} duplicated, {} tool errors, {resend_differs} repeated calls answered \
             differently",
            tool_errors.len()
        )
    });
    Ok((report, failure))
}

/// Root: spawn `agents` sub-agents in one step, then close them all in the next; each sub-agent
/// answers its prompt once. Measures the time of each phase and the server's memory.
async fn subagents(
    bin: Option<PathBuf>,
    agents: usize,
    rounds: usize,
) -> anyhow::Result<(serde_json::Value, Option<String>)> {
    use agentplane_tests::{RecordedRequest, Reply, ScriptedCall};
    let responder = move |r: &RecordedRequest| {
        let results = r.tool_results();
        if r.last_user_text().as_deref() == Some("noop") {
            return Reply::text("ok");
        }
        match results.len() {
            0 => Reply::calls((0..agents).map(|_| ScriptedCall::new("spawn_agent", json!({"prompt": "noop"})))),
            n if n == agents => Reply::calls(results.iter().filter_map(|r| {
                let id = serde_json::from_str::<serde_json::Value>(r).ok()?["agent_id"].as_str()?.to_string();
                Some(ScriptedCall::new("close_agent", json!({"agent_id": id})))
            })),
            _ => Reply::text("all closed"),
        }
    };
    let llm = ScriptedLlm::builder().record(true).responder(responder).start();
    let env = [
        ("AGENTPLANE__AGENT__MAX_CHILDREN", agents.to_string()),
        ("AGENTPLANE__AGENT__GENERATE_TITLES", "false".to_string()),
    ];
    let server = ServerProcess::start(bin, &env).await?;
    let admin = setup(&server, &llm).await?;
    let warm = admin
        .create_chat(&CreateChat { content: text("noop"), model_id: None, workspace_id: None, title: None })
        .await?;
    admin.wait_until_chat(&warm.id, |c| c.status == ChatStatus::Idle, WAIT).await?;
    let baseline = server.rss_kib()?;
    let mut rounds_out = Vec::new();
    let mut failure = None;
    for round in 1..=rounds {
        let (figures, problem) = fan_out_round(&server, &admin, agents).await?;
        println!(
            "round {round}: all {agents} spawned and finished {:.2} s; closed and root idle {:.2} s; RSS {:.1} MiB \
             (baseline {:.1} MiB)",
            figures["spawn_and_finish_s"].as_f64().unwrap_or_default(),
            figures["total_s"].as_f64().unwrap_or_default(),
            figures["rss_after_close_kib"].as_f64().unwrap_or_default() / 1024.0,
            baseline as f64 / 1024.0,
        );
        rounds_out.push(figures);
        failure = failure.or(problem);
    }
    println!(
        "scenario subagents: {rounds} round(s) of one root spawning {agents} sub-agents in one step (each answers \
         once), then closing them all"
    );
    Ok((
        json!({"scenario": "subagents", "agents": agents, "rss_baseline_kib": baseline, "rounds": rounds_out}),
        failure,
    ))
}

/// One root chat spawns `agents` sub-agents, waits for them to finish, closes them; returns the
/// figures and, when the tree did not behave, what went wrong.
async fn fan_out_round(
    server: &ServerProcess,
    admin: &ApiClient,
    agents: usize,
) -> anyhow::Result<(serde_json::Value, Option<String>)> {
    let started = Instant::now();
    let chat = admin
        .create_chat(&CreateChat { content: text("fan out"), model_id: None, workspace_id: None, title: None })
        .await?;
    let mut stream = EventStream::connect(&server.base_url, &chat.id, ADMIN_TOKEN, Some(0)).await?;
    let mut spawned_at = None;
    let mut finished = 0usize;
    let events = stream
        .wait_for(
            |e| {
                if let EventBody::Subagent {
                    status: Some(agentplane_schema::event::SubagentStatus::Finished), ..
                } = &e.body
                {
                    finished += 1;
                    if finished == agents {
                        spawned_at = Some(started.elapsed());
                    }
                }
                matches!(&e.body, EventBody::Status { status: ChatStatus::Idle, .. })
            },
            Duration::from_secs(600),
        )
        .await?;
    let total = started.elapsed();
    let closed = events
        .iter()
        .filter(|e| {
            matches!(
                &e.body,
                EventBody::Subagent { status: Some(agentplane_schema::event::SubagentStatus::Closed), .. }
            )
        })
        .count();
    // Give the allocator a moment to hand freed pages back before reading RSS again.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = server.rss_kib()?;
    let detail = admin.get_chat(&chat.id).await?;
    let failure = (detail.children.len() != agents || closed != agents || finished < agents).then(|| {
        format!(
            "expected {agents} children spawned, finished and closed; got {}, {finished}, {closed}",
            detail.children.len()
        )
    });
    let spawn_all = spawned_at.unwrap_or(total);
    Ok((
        json!({"spawn_and_finish_s": spawn_all.as_secs_f64(), "total_s": total.as_secs_f64(),
               "rss_after_close_kib": after, "children": detail.children.len(), "finished": finished,
               "closed": closed}),
        failure,
    ))
}

async fn burst(bin: Option<PathBuf>, users: usize) -> anyhow::Result<(serde_json::Value, Option<String>)> {
    let llm = ScriptedLlm::builder().record(false).start();
    let server = ServerProcess::start(bin, &[("AGENTPLANE__AGENT__GENERATE_TITLES", "false".into())]).await?;
    let admin = setup(&server, &llm).await?;
    // Each user: a token, an idle chat, a stream on it.
    let mut prepared = Vec::with_capacity(users);
    for u in 0..users {
        let issued = admin
            .create_user(&agentplane_schema::api::CreateUser {
                name: format!("user-{u}"),
                role: agentplane_schema::api::UserRole::Member,
            })
            .await?;
        let client = admin.with_token(issued.token.clone());
        let chat = client
            .create_chat(&CreateChat { content: text("hello"), model_id: None, workspace_id: None, title: None })
            .await?;
        let mut stream = EventStream::connect(&server.base_url, &chat.id, &issued.token, Some(0)).await?;
        stream.wait_for_status(ChatStatus::Idle, WAIT).await?;
        prepared.push((client, chat.id, stream));
    }
    eprintln!("burst: {users} users ready");
    let cpu_before = server.cpu_time()?;
    let barrier = Arc::new(tokio::sync::Barrier::new(users));
    let started = Instant::now();
    let tasks: Vec<_> = prepared
        .into_iter()
        .map(|(client, chat_id, mut stream)| {
            let barrier = barrier.clone();
            tokio::spawn(async move {
                barrier.wait().await;
                let times = timed_turn(&client, &mut stream, &chat_id, "now").await?;
                let messages = client.messages_page(&chat_id, None, Some(10)).await?.messages;
                if messages.len() != 4 || messages.last().map(|m| m.text()) != Some("ok".into()) {
                    bail!("chat {chat_id}: {} messages after the burst, expected 4", messages.len());
                }
                anyhow::Ok((times.accepted, times.first_delta, times.idle))
            })
        })
        .collect();
    let (mut accepted, mut first, mut idle, mut problems) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for task in tasks {
        match task.await? {
            Ok((a, f, i)) => {
                accepted.push(ms(a));
                first.push(ms(f));
                idle.push(ms(i));
            }
            Err(e) => problems.push(e.to_string()),
        }
    }
    let wall = started.elapsed();
    let cpu = server.cpu_time()?.saturating_sub(cpu_before);
    let (accepted, first, idle) = (summarize(accepted), summarize(first), summarize(idle));
    println!("scenario burst: {users} users, each with a chat, send at the same instant");
    println!("{:<34} {:>9} {:>9} {:>9} {:>9}", "", "p50 ms", "p90 ms", "p99 ms", "max ms");
    print_percentiles("POST /messages answered", &accepted);
    print_percentiles("POST /messages → first delta", &first);
    print_percentiles("POST /messages → idle", &idle);
    println!(
        "all done in {:.2} s; server CPU {:.2} s; errors: {}",
        wall.as_secs_f64(),
        cpu.as_secs_f64(),
        problems.len()
    );
    let failure = (!problems.is_empty()).then(|| format!("{} burst turn(s) failed: {}", problems.len(), problems[0]));
    Ok((
        json!({"scenario": "burst", "users": users, "accepted_ms": accepted, "to_first_delta_ms": first,
               "to_idle_ms": idle, "wall_s": wall.as_secs_f64(), "server_cpu_s": cpu.as_secs_f64(),
               "errors": problems}),
        failure,
    ))
}

/// What one chat saw in one turn, from its WebSocket.
#[derive(Default, Clone)]
struct TurnTimes {
    to_first_delta: Option<f64>,
    /// From each tool result (`tool_call` finished) to the next model output of the turn: the
    /// orchestration added per step (committing the result, building the prompt, the model call
    /// starting) when the model answers at once; with `--model-ms` it includes the model's time.
    step_gaps: Vec<f64>,
    /// Each tool call on the WebSocket: when `started` arrived (published once the call is
    /// committed, just before it is sent) and when `finished` did (published once its result is
    /// committed).
    tool_calls: Vec<(Instant, Instant)>,
}

/// One model call of a chat as the scripted model saw it: when the request arrived and when the
/// last byte of its answer was written.
#[derive(Clone, Copy)]
struct ModelCall {
    arrived: Instant,
    answered: Instant,
}

/// Per tool step, in ms: the added orchestration latency and the time from the tool's start to
/// the next model request. `None` when the chat's model calls do not line up with its turns
/// (e.g. a retried model call).
///
/// The added latency is estimated from outside as the issue defines it (step wall time minus
/// model stream time minus tool time): the time from the model's answer of step k (its last
/// write, as the scripted model logs it) to the model request of step k+1, minus the tool's span
/// between them ([`TurnTimes::tool_calls`]), cut off at that request. What remains is the
/// server's work between the model calls — reading the answer, committing it, dispatching the
/// call, building the next prompt, sending it — except the commit of the tool's result, which
/// falls inside the span. The next request goes out while that commit lands, so the span ends
/// at the request when the result's `finished` event comes after it: the prompt's building is
/// then inside the span too. Also in it under load: the scripted model's own queueing before it
/// reads a request, and any difference between how late the two tool events reach this
/// process; single values can be negative.
///
/// The second figure, from the tool's `started` event to the next request, holds the tool's own
/// time and everything the server does with its result before the next model call: what the
/// result's commit costs a step shows there.
fn step_latencies(calls: &[ModelCall], turns: &[TurnTimes], steps: usize) -> Option<Vec<(f64, f64)>> {
    if calls.len() != turns.len() * (steps + 1) || turns.iter().any(|t| t.tool_calls.len() != steps) {
        return None;
    }
    let ms = |from: Instant, to: Instant| {
        if to >= from { (to - from).as_secs_f64() * 1000.0 } else { -(from - to).as_secs_f64() * 1000.0 }
    };
    let mut out = Vec::with_capacity(turns.len() * steps);
    for (t, turn) in turns.iter().enumerate() {
        let calls = &calls[t * (steps + 1)..(t + 1) * (steps + 1)];
        for (k, &(started, finished)) in turn.tool_calls.iter().enumerate() {
            let next = calls[k + 1].arrived;
            let span = ms(started, finished.min(next)).max(0.0);
            out.push((ms(calls[k].answered, next) - span, ms(started, next)));
        }
    }
    Some(out)
}

/// The scripted model's time for its `index`th call when it takes `mean` on average: spread
/// evenly over 0.8–1.2 × `mean` by a hash of the index: every run draws the same set of times
/// (which chat gets which depends on the order requests arrive in).
fn model_time(mean: Duration, index: usize) -> Duration {
    // splitmix64's finalizer: consecutive indexes land far apart.
    let mut x = (index as u64).wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^= x >> 31;
    let unit = (x >> 11) as f64 / (1u64 << 53) as f64;
    mean.mul_f64(0.8 + 0.4 * unit)
}

/// When each chat's model requests arrived, with each one's place in the scripted model's log.
type ArrivalsByChat = HashMap<String, Vec<(Instant, usize)>>;

/// CPU time of each process taking part in a run: they share the machine's cores.
struct CpuBySide {
    server: Duration,
    /// The server's children: the relays of its local workspaces.
    relays: Duration,
    nats: Duration,
    /// This process: the clients and the scripted model.
    loadgen: Duration,
}

impl CpuBySide {
    fn read(server: u32, nats: u32) -> anyhow::Result<Self> {
        Ok(CpuBySide {
            server: cpu_time(server)?,
            relays: agentplane_benches::children_cpu_time(server)?,
            nats: cpu_time(nats)?,
            loadgen: cpu_time(std::process::id())?,
        })
    }

    fn since(&self, before: &Self) -> Self {
        CpuBySide {
            server: self.server.saturating_sub(before.server),
            relays: self.relays.saturating_sub(before.relays),
            nats: self.nats.saturating_sub(before.nats),
            loadgen: self.loadgen.saturating_sub(before.loadgen),
        }
    }

    fn total(&self) -> Duration {
        self.server + self.relays + self.nats + self.loadgen
    }
}

/// The shape of a `steps` run.
struct StepsShape {
    chats: usize,
    /// Tool steps per turn.
    steps: usize,
    turns: usize,
    workspaces: usize,
    /// The scripted model's time per call.
    model: Duration,
}

async fn steps_scenario(
    bin: Option<PathBuf>,
    relay_bin: Option<PathBuf>,
    shape: StepsShape,
    database_url: Option<String>,
) -> anyhow::Result<(serde_json::Value, Option<String>)> {
    let StepsShape { chats, steps, turns, workspaces, model } = shape;
    use agentplane_benches::storage::{Turns, check_history};
    use agentplane_schema::event::ToolPhase;
    use agentplane_tests::{RecordedRequest, Reply};

    // Each turn: `steps` tool calls (one per step), then the answer. The chat's number is in its
    // first message, so every chat writes its own file. When each chat's model requests arrive
    // (and their place in the scripted model's write log) is kept for the added-latency estimate.
    let arrivals: Arc<Mutex<ArrivalsByChat>> = Arc::default();
    let arrived = arrivals.clone();
    let responder = move |r: &RecordedRequest| {
        let now = Instant::now();
        let (chat, done) = agentplane_benches::turn_progress(r);
        if let Some(chat) = &chat {
            let mut arrived = arrived.lock().unwrap_or_else(PoisonError::into_inner);
            arrived.entry(chat.clone()).or_default().push((now, r.index));
        }
        let reply = if done < steps {
            let file = format!("{}.txt", chat.as_deref().unwrap_or("x").replace(' ', "-"));
            Reply::tool_call("write_file", json!({"path": file, "content": format!("step {done}")}))
        } else {
            Reply::text("done")
        };
        reply.delay(model_time(model, r.index))
    };
    let llm = ScriptedLlm::builder().record(false).write_log(true).workers(1).responder(responder).start();
    let (nats, creds_dir) = agentplane_benches::fleet::nats_with_auth()?;
    let mut env = agentplane_benches::fleet::server_relay_env(&nats, creds_dir.path(), relay_bin)?;
    env.push(("AGENTPLANE__AGENT__GENERATE_TITLES", "false".to_string()));
    if let Some(url) = &database_url {
        env.push(("AGENTPLANE__DATABASE__URL", url.clone()));
    }
    let server = ServerProcess::start(bin, &env).await?;
    let admin = setup(&server, &llm).await?;
    let workspace_ids = create_workspaces(&admin, workspaces).await?;
    eprintln!("steps: {workspaces} workspaces (relay processes) up; starting {chats} chats");

    let nats_pid = nats.pid().context("the NATS server is not running")?;
    let sides_before = CpuBySide::read(server.pid(), nats_pid)?;
    let started = Instant::now();
    let clients = (0..chats).map(|c| {
        let admin = admin.clone();
        let base = server.base_url.clone();
        let workspace = workspace_ids[c % workspace_ids.len()].clone();
        tokio::spawn(async move {
            tokio::time::sleep(model.mul_f64(c as f64 / chats as f64)).await;
            let chat = admin
                .create_chat(&CreateChat {
                    content: text(&format!("chat {c}")),
                    model_id: None,
                    workspace_id: Some(workspace),
                    title: None,
                })
                .await?;
            let mut stream = EventStream::connect(&base, &chat.id, ADMIN_TOKEN, Some(0)).await?;
            let mut all = Vec::with_capacity(turns);
            // Durable events arrive in order with no gap and no repeat, from the chat's first.
            let mut order = agentplane_benches::SeqOrder::after(Some(0));
            for turn in 0..turns {
                if turn > 0 {
                    admin
                        .send(&chat.id, &SendMessage { content: text("again"), busy_behavior: Default::default() })
                        .await?;
                }
                let t0 = Instant::now();
                let mut times = TurnTimes::default();
                let mut last_result: Option<Instant> = None;
                let mut call_started: Option<Instant> = None;
                stream
                    .wait_for(
                        |e| {
                            let now = Instant::now();
                            order.see(e.seq);
                            match &e.body {
                                EventBody::MessageDelta { .. } => {
                                    times.to_first_delta.get_or_insert_with(|| (now - t0).as_secs_f64() * 1000.0);
                                    if let Some(at) = last_result.take() {
                                        times.step_gaps.push((now - at).as_secs_f64() * 1000.0);
                                    }
                                }
                                EventBody::ToolCall { phase: ToolPhase::Started, .. } => call_started = Some(now),
                                EventBody::ToolCall { phase: ToolPhase::Finished, .. } => {
                                    last_result = Some(now);
                                    if let Some(at) = call_started.take() {
                                        times.tool_calls.push((at, now));
                                    }
                                }
                                _ => {}
                            }
                            matches!(&e.body, EventBody::Status { status: ChatStatus::Idle | ChatStatus::Error, .. })
                        },
                        WAIT,
                    )
                    .await?;
                all.push(times);
            }
            if let Some(problem) = order.take_problem() {
                bail!("chat {c}: event stream out of order: {problem}");
            }
            anyhow::Ok((format!("chat {c}"), chat.id, all))
        })
    });
    let clients: Vec<_> = clients.collect();
    let mut to_delta = Vec::new();
    let mut gaps = Vec::new();
    let mut added = Vec::new();
    let mut to_request = Vec::new();
    let mut unaligned = 0;
    let mut problems = Vec::new();
    let mut results = Vec::with_capacity(chats);
    for client in clients {
        results.push(client.await?);
    }
    let wall = started.elapsed();
    let sides = CpuBySide::read(server.pid(), nats_pid)?.since(&sides_before);
    // Every turn is in the history exactly once and in order: user, K × (call, result), answer.
    // Read once the figures are taken: the reads are the generator's check, not part of the load.
    for result in &mut results {
        if let Ok((label, chat_id, _)) = result {
            let first = label.clone();
            let user = move |turn| if turn == 1 { first.clone() } else { "again".to_string() };
            let expected = Turns { user_text: &user, answer: "done", tool_steps: steps };
            match agentplane_benches::storage::all_messages(&admin, chat_id).await {
                Ok(messages) => {
                    if let Some(problem) = check_history(&messages, turns, &expected) {
                        *result = Err(anyhow::anyhow!("{label}: {problem}"));
                    }
                }
                Err(error) => *result = Err(error.context(format!("{label}: reading its history"))),
            }
        }
    }
    // Each answer's last write (without a chunk delay an answer is one write), by request.
    let mut answered = HashMap::new();
    for w in llm.write_times() {
        answered.insert(w.request, w.at);
    }
    let mut model_times = Vec::new();
    for result in results {
        match result {
            Ok((label, _, turns)) => {
                let arrivals =
                    arrivals.lock().unwrap_or_else(PoisonError::into_inner).remove(&label).unwrap_or_default();
                let calls: Option<Vec<ModelCall>> = arrivals
                    .iter()
                    .map(|&(arrived, index)| answered.get(&index).map(|&answered| ModelCall { arrived, answered }))
                    .collect();
                let calls = calls.unwrap_or_default();
                model_times.extend(
                    calls.iter().map(|c| (c.answered.saturating_duration_since(c.arrived)).as_secs_f64() * 1000.0),
                );
                match step_latencies(&calls, &turns, steps) {
                    Some(chat_steps) => {
                        for (a, r) in chat_steps {
                            added.push(a);
                            to_request.push(r);
                        }
                    }
                    None => unaligned += 1,
                }
                for t in turns {
                    to_delta.extend(t.to_first_delta);
                    gaps.extend(t.step_gaps);
                }
            }
            Err(e) => problems.push(e.to_string()),
        }
    }
    let total_steps = chats * turns * (steps + 1);
    let tool_steps = chats * turns * steps;
    let delta = summarize(to_delta);
    let gap = summarize(gaps);
    let added = summarize(added);
    let to_request = summarize(to_request);
    let model_time = summarize(model_times);
    let db = if database_url.is_some() { "PostgreSQL" } else { "SQLite" };
    println!(
        "scenario steps: {chats} chats × {turns} turns × ({steps} tool step(s) + answer), tools over NATS to \
         {workspaces} relays, {db}, model time {} ms per call",
        model.as_millis()
    );
    println!(
        "model calls (steps): {total_steps} in {:.2} s = {:.0} steps/s ({:.0} tool steps/s, {:.0} turns/s)",
        wall.as_secs_f64(),
        total_steps as f64 / wall.as_secs_f64(),
        tool_steps as f64 / wall.as_secs_f64(),
        (chats * turns) as f64 / wall.as_secs_f64()
    );
    let per_1000 = |d: Duration| d.as_secs_f64() * 1000.0 / total_steps as f64;
    println!(
        "server CPU: {:.2} s per 1,000 steps ({:.2} ms per turn)",
        per_1000(sides.server),
        sides.server.as_secs_f64() * 1000.0 / (chats * turns) as f64
    );
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1) as f64;
    println!(
        "CPU per 1,000 steps: server {:.2} s, relays {:.2} s, nats-server {:.2} s, load generator (clients and \
         scripted model) {:.2} s; the {cores} cores {:.0} % busy with these",
        per_1000(sides.server),
        per_1000(sides.relays),
        per_1000(sides.nats),
        per_1000(sides.loadgen),
        sides.total().as_secs_f64() / wall.as_secs_f64() / cores * 100.0
    );
    println!("{:<40} {:>9} {:>9} {:>9} {:>9}", "", "p50 ms", "p90 ms", "p99 ms", "max ms");
    println!(
        "{:<40} {:>9.2} {:>9.2} {:>9.2} {:>9.2}",
        "turn start → first delta", delta.p50, delta.p90, delta.p99, delta.max
    );
    println!(
        "{:<40} {:>9.2} {:>9.2} {:>9.2} {:>9.2}",
        "tool result → next model output", gap.p50, gap.p90, gap.p99, gap.max
    );
    println!(
        "{:<40} {:>9.2} {:>9.2} {:>9.2} {:>9.2}",
        "added per tool step (estimate)", added.p50, added.p90, added.p99, added.max
    );
    println!(
        "{:<40} {:>9.2} {:>9.2} {:>9.2} {:>9.2}",
        "tool start → next model request", to_request.p50, to_request.p90, to_request.p99, to_request.max
    );
    println!(
        "{:<40} {:>9.2} {:>9.2} {:>9.2} {:>9.2}",
        "model call (request → last write)", model_time.p50, model_time.p90, model_time.p99, model_time.max
    );
    if unaligned > 0 {
        println!(
            "  ({unaligned} chat(s) left out of the estimate: their model requests did not line up with their turns)"
        );
    }
    println!("errors: {}", problems.len());
    for p in problems.iter().take(5) {
        println!("  {p}");
    }
    delete_workspaces(&admin, &workspace_ids).await?;
    drop(nats);
    let failure =
        (!problems.is_empty()).then(|| format!("{} chat(s) failed; the first: {}", problems.len(), problems[0]));
    Ok((
        json!({"scenario": "steps", "chats": chats, "turns": turns, "steps_per_turn": steps, "workspaces": workspaces,
               "database": db, "model_ms": model.as_secs_f64() * 1000.0, "wall_s": wall.as_secs_f64(), "steps_per_s": total_steps as f64 / wall.as_secs_f64(),
               "server_cpu_s_per_1000_steps": per_1000(sides.server),
               "relays_cpu_s_per_1000_steps": per_1000(sides.relays),
               "nats_cpu_s_per_1000_steps": per_1000(sides.nats),
               "loadgen_cpu_s_per_1000_steps": per_1000(sides.loadgen),
               "to_first_delta_ms": delta, "step_gap_ms": gap, "added_per_tool_step_ms": added,
               "tool_start_to_next_request_ms": to_request,
               "model_call_ms": model_time, "chats_left_out_of_added": unaligned, "errors": problems}),
        failure,
    ))
}

/// Round trips through one idle chat's actor from outside actix (a `delete_queued` of an id that
/// is not queued: answered from the actor's memory, no database), as fast as `senders` tasks can
/// go.
async fn mailbox(seconds: f64) -> anyhow::Result<serde_json::Value> {
    let server = InProcessServer::start(ScriptedLlm::builder().record(false).start(), |_| {}).await?;
    let chat = server.idle_chat("hi").await?;
    let handle = server.chat(&chat.id);
    println!("scenario mailbox: round trips to one idle ChatActor (answered from memory), {seconds} s per row");
    println!("{:<10} {:>14} {:>10} {:>10} {:>10}", "senders", "messages/s", "p50 µs", "p99 µs", "max µs");
    let mut rows = Vec::new();
    for senders in [1usize, 8, 64] {
        let deadline = Instant::now() + Duration::from_secs_f64(seconds);
        let tasks: Vec<_> = (0..senders)
            .map(|_| {
                let handle = handle.clone();
                tokio::spawn(async move {
                    let mut times = Vec::new();
                    while Instant::now() < deadline {
                        let t0 = Instant::now();
                        let found = handle.delete_queued("not-queued").await;
                        times.push(t0.elapsed().as_secs_f64() * 1e6);
                        if !matches!(found, Ok(false)) {
                            return Err(anyhow::anyhow!("unexpected answer from the actor: {found:?}"));
                        }
                    }
                    Ok(times)
                })
            })
            .collect();
        let started = Instant::now();
        let mut all = Vec::new();
        for task in tasks {
            all.extend(task.await??);
        }
        let rate = all.len() as f64 / started.elapsed().as_secs_f64();
        let latency = summarize(all);
        println!("{senders:<10} {rate:>14.0} {:>10.1} {:>10.1} {:>10.1}", latency.p50, latency.p99, latency.max);
        rows.push(json!({"senders": senders, "messages_per_s": rate, "latency_us": latency}));
    }
    server.stop().await?;
    Ok(json!({"scenario": "mailbox", "rows": rows}))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // A scenario that measured but found the system misbehaving still reports, then fails.
    let (report, failure) = match cli.scenario {
        Scenario::Subagents { agents, rounds } => subagents(cli.server_bin, agents, rounds).await?,
        Scenario::Mailbox { seconds } => (mailbox(seconds).await?, None),
        Scenario::Burst { users } => burst(cli.server_bin, users).await?,
        Scenario::Fanout { chats, watchers, turns, pieces, piece_delay_ms } => (
            agentplane_benches::delta_latency::run_fanout(
                cli.server_bin,
                chats,
                watchers,
                turns,
                pieces,
                piece_delay_ms,
            )
            .await?,
            None,
        ),
        Scenario::DeltaLatency { turns, pieces, piece_delay_ms } => {
            (agentplane_benches::delta_latency::run(cli.server_bin, turns, pieces, piece_delay_ms).await?, None)
        }
        Scenario::Steps { chats, steps, turns, workspaces, database_url, model_ms } => {
            let shape = StepsShape { chats, steps, turns, workspaces, model: Duration::from_millis(model_ms) };
            steps_scenario(cli.server_bin, cli.relay_bin, shape, database_url).await?
        }
        Scenario::Storage { chats, tool_steps, checkpoints, max_growth, database_url } => {
            agentplane_benches::storage::run(agentplane_benches::storage::Options {
                server_bin: cli.server_bin,
                relay_bin: cli.relay_bin,
                chats,
                tool_steps,
                checkpoints,
                max_growth,
                database_url,
            })
            .await?
        }
        Scenario::FirstDelta { turns, warmup } => (first_delta(cli.server_bin, turns, warmup).await?, None),
        Scenario::Idle { chats, concurrency } => (idle(cli.server_bin, chats, concurrency).await?, None),
        Scenario::ToolRoundtrip { rate, seconds, warmup_seconds, workspaces } => {
            tool_roundtrip(cli.relay_bin, rate, seconds, warmup_seconds, workspaces).await?
        }
        Scenario::ToolInflight { calls, workspaces, resend, hold_seconds, resend_while_running } => {
            tool_inflight(cli.relay_bin, calls, workspaces, resend, hold_seconds, resend_while_running).await?
        }
    };
    if let Some(path) = cli.json {
        std::fs::write(&path, serde_json::to_string_pretty(&report)?)?;
    }
    if let Some(failure) = failure {
        bail!(failure);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn added_latency_is_the_time_from_a_model_answer_to_the_next_request_less_the_tool_span() {
        let t0 = Instant::now();
        let at = |us: u64| t0 + Duration::from_micros(us);
        let turn = |calls: &[(u64, u64)]| TurnTimes {
            tool_calls: calls.iter().map(|&(s, f)| (at(s), at(f))).collect(),
            ..Default::default()
        };
        // Two turns of two tool steps: requests at 0, 10, 25 (answer) and 100, 104, 120 (answer)
        // ms, each answered 2 ms after it arrived. The last call's `finished` reaches the client
        // after the next request went out (its result still being committed): its span ends there.
        let arrivals: Vec<ModelCall> = [0, 10, 25, 100, 104, 120]
            .into_iter()
            .map(|ms| ModelCall { arrived: at(ms * 1000), answered: at(ms * 1000 + 2000) })
            .collect();
        let turns = [turn(&[(2500, 9500), (13000, 25000)]), turn(&[(102500, 103500), (107000, 121000)])];
        let steps = step_latencies(&arrivals, &turns, 2).expect("lined up");
        let want = [(1.0, 7.5), (1.0, 12.0), (1.0, 1.5), (1.0, 13.0)];
        assert_eq!(steps.len(), want.len());
        for (got, want) in steps.iter().zip(want) {
            assert!((got.0 - want.0).abs() < 1e-9 && (got.1 - want.1).abs() < 1e-9, "{steps:?}");
        }
        // A model call more than the turns explain (a retry): left out, not guessed at.
        assert!(step_latencies(&arrivals[..5], &turns, 2).is_none());
        assert!(step_latencies(&arrivals, &[turn(&[(2500, 9500)]), turns[1].clone()], 2).is_none());
    }
}
