//! agentplane's benchmarks. `loadgen` (src/bin/loadgen.rs) starts the scripted LLM and a real
//! `agentplane serve` process and measures it over its public API, or, for the tool transport,
//! a nats-server, `agentplane-relay` processes and the orchestrator's `NatsTransport`; this
//! library holds what the scenarios and the criterion benches share: the server process, a
//! server in this process ([`inprocess`]), the relay fleet ([`fleet`]), percentiles, and
//! per-process RSS and CPU time from `/proc`, and the scenarios that live in their own module
//! ([`delta_latency`], [`storage`]). The criterion benches under `benches/` time one path each:
//! `provider_parsing` the provider clients' stream decoders, `step_commit` one step's database
//! commit, `chat_actor` a chat actor's mailbox and turns, `subagents` a sub-agent's spawn and
//! close, `fanout` one event to many WebSockets, `tool_roundtrip` a tool call over NATS to a
//! relay process.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};

pub mod delta_latency;
pub mod fleet;
pub mod inprocess;
pub mod storage;

/// Where a chat's turn of tool steps stands, as its model request shows it: the text of the
/// chat's first user message (which names the chat) and how many tool results follow the last
/// user message. Read without building the request body, so the scripted model stays cheap
/// whatever the history's length.
pub fn turn_progress(request: &agentplane_tests::RecordedRequest) -> (Option<String>, usize) {
    let messages = request.message_heads();
    let first = messages.iter().find(|m| m.role == "user").and_then(|m| m.content_str()).map(String::from);
    let last_user = messages.iter().rposition(|m| m.role == "user").unwrap_or(0);
    let done = messages[last_user..].iter().filter(|m| m.role == "tool").count();
    (first, done)
}

/// The order of one chat's durable events on its stream: each numbered one after the one before,
/// so a lost, repeated or reordered event shows as the first `seq` that does not follow. Events
/// without a `seq` (deltas, statuses) are not counted.
#[derive(Debug, Clone, Default)]
pub struct SeqOrder {
    last: Option<i64>,
    problem: Option<String>,
}

impl SeqOrder {
    /// For a stream that replays every event after `after` (`Some(0)`: the whole chat); `None`
    /// when the first event seen may have any number.
    pub fn after(after: Option<i64>) -> Self {
        SeqOrder { last: after, problem: None }
    }

    /// Notes the next event's `seq`. Only the first problem since [`SeqOrder::take_problem`]
    /// is kept; counting goes on from the event seen.
    pub fn see(&mut self, seq: Option<i64>) {
        let Some(seq) = seq else { return };
        if let Some(last) = self.last
            && seq != last + 1
        {
            self.problem.get_or_insert_with(|| format!("seq {seq} after {last}"));
        }
        self.last = Some(seq);
    }

    /// The first event out of order since the last call, if any.
    pub fn take_problem(&mut self) -> Option<String> {
        self.problem.take()
    }
}

/// The scripted LLM as an OpenAI-compatible provider with the default model, on the server
/// `admin` talks to (what every scenario against a server starts with).
pub async fn setup_provider(
    admin: &agentplane_tests::ApiClient,
    llm: &agentplane_tests::ScriptedLlm,
) -> anyhow::Result<()> {
    use agentplane_schema::api::{CreateModel, CreateProvider, ProviderType};
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
            compaction_threshold: None,
            prices: Default::default(),
            settings: serde_json::Value::Null,
        })
        .await?;
    Ok(())
}

/// An admin client of `server` with [`setup_provider`] done.
pub async fn setup(
    server: &ServerProcess,
    llm: &agentplane_tests::ScriptedLlm,
) -> anyhow::Result<agentplane_tests::ApiClient> {
    let admin = agentplane_tests::ApiClient::new(server.base_url.clone(), ADMIN_TOKEN);
    setup_provider(&admin, llm).await?;
    Ok(admin)
}

/// `n` workspaces of the `local` template on the server `admin` talks to (one relay process
/// each, started by the server); their ids.
pub async fn create_workspaces(admin: &agentplane_tests::ApiClient, n: usize) -> anyhow::Result<Vec<String>> {
    let templates = admin.list_templates().await?;
    let local = templates.iter().find(|t| t.name == "local").context("no local template")?;
    let mut ids = Vec::with_capacity(n);
    for i in 0..n {
        let (status, body) = admin
            .raw(
                reqwest::Method::POST,
                "/api/v1/workspaces",
                Some(serde_json::json!({"template_id": local.id, "name": format!("bench-{i}")})),
            )
            .await?;
        if !status.is_success() {
            bail!("creating workspace {i}: {status} {body}");
        }
        ids.push(body["id"].as_str().context("workspace id")?.to_string());
    }
    Ok(ids)
}

/// Deletes the workspaces, which stops their relays: the server is killed when it is dropped,
/// and relays it started would otherwise outlive it.
pub async fn delete_workspaces(admin: &agentplane_tests::ApiClient, ids: &[String]) -> anyhow::Result<()> {
    for id in ids {
        let (status, body) = admin.raw(reqwest::Method::DELETE, &format!("/api/v1/workspaces/{id}"), None).await?;
        if !status.is_success() {
            bail!("deleting workspace {id}: {status} {body}");
        }
    }
    Ok(())
}

/// The runtime the criterion benches drive their async code on: two workers, as many as the
/// reference machine has cores.
pub fn bench_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("a Tokio runtime")
}

pub const ADMIN_TOKEN: &str = "ap_loadgen_admin";

/// A running `agentplane serve` process with its own data directory; killed on drop.
pub struct ServerProcess {
    child: Child,
    pub base_url: String,
    data: tempfile::TempDir,
}

impl ServerProcess {
    /// Starts the `agentplane` binary next to this executable (build it with
    /// `cargo build --release -p agentplane`), or the one given.
    pub async fn start(binary: Option<PathBuf>, extra_env: &[(&str, String)]) -> anyhow::Result<Self> {
        let binary = match binary {
            Some(b) => b,
            None => sibling_binary("agentplane")?,
        };
        if !binary.is_file() {
            bail!("{} not found: build it with `cargo build --release -p agentplane`", binary.display());
        }
        let data = tempfile::tempdir()?;
        let port = agentplane_tests::free_port();
        let mut cmd = Command::new(&binary);
        cmd.args(["serve", "--listen", &format!("127.0.0.1:{port}")])
            .arg("--data-dir")
            .arg(data.path())
            .env("AGENTPLANE_BOOTSTRAP_TOKEN", ADMIN_TOKEN)
            .env("AGENTPLANE__SERVER__LOG_FILTER", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        for (k, v) in extra_env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().with_context(|| format!("starting {}", binary.display()))?;
        let server = ServerProcess { child, base_url: format!("http://127.0.0.1:{port}"), data };
        let client = reqwest::Client::new();
        for _ in 0..200 {
            if client.get(format!("{}/healthz", server.base_url)).send().await.is_ok() {
                return Ok(server);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        bail!("the server did not answer /healthz within 10 s")
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The server's `--data-dir` (its embedded SQLite database lives there).
    pub fn data_dir(&self) -> &std::path::Path {
        self.data.path()
    }

    /// Resident set size of the server process, in KiB.
    pub fn rss_kib(&self) -> anyhow::Result<u64> {
        rss_kib(self.pid())
    }

    /// User + system CPU time of the server so far.
    pub fn cpu_time(&self) -> anyhow::Result<Duration> {
        cpu_time(self.pid())
    }
}

/// Where a binary of this workspace built in the same profile as the running executable is:
/// next to it (loadgen, in `target/release/`), or one directory up when the running executable
/// is a test or bench (`target/release/deps/`). The path next to it when neither exists, for the
/// caller's "not found" message.
pub fn sibling_binary(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let dir = exe.parent().context("the running executable has no directory")?;
    let beside = dir.join(name);
    let above = dir.file_name().filter(|d| *d == "deps").and(dir.parent()).map(|p| p.join(name));
    Ok(match above {
        Some(above) if !beside.is_file() && above.is_file() => above,
        _ => beside,
    })
}

/// Resident set size of a process, in KiB.
pub fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("VmRSS missing")
}

/// Proportional set size of a process, in KiB: its private memory plus its share of pages it
/// shares (the relay binary's code), so that a sum over many processes counts those once.
pub fn pss_kib(pid: u32) -> anyhow::Result<u64> {
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))?;
    rollup
        .lines()
        .find_map(|l| l.strip_prefix("Pss:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("Pss missing")
}

/// User + system CPU time of a process so far (all its threads, not its children).
pub fn cpu_time(pid: u32) -> anyhow::Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let fields: Vec<&str> = stat.rsplit(')').next().unwrap_or_default().split_whitespace().collect();
    // utime and stime are fields 14 and 15 of /proc/pid/stat (1-based), 12 and 13 after ')';
    // in clock ticks, which are 10 ms on every Linux this runs on (USER_HZ = 100).
    let ticks: u64 = fields.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
        + fields.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    Ok(Duration::from_millis(ticks * 10))
}

/// CPU time used so far by the live child processes of `pid` (a server's relays), each read
/// from its own `/proc` entry. A child that ends between two readings takes its time with it,
/// and a kernel without `/proc/PID/task/TID/children` (CONFIG_PROC_CHILDREN) reports none.
pub fn children_cpu_time(pid: u32) -> anyhow::Result<Duration> {
    let mut total = Duration::ZERO;
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let children = std::fs::read_to_string(task?.path().join("children")).unwrap_or_default();
        for child in children.split_whitespace().filter_map(|c| c.parse::<u32>().ok()) {
            total += cpu_time(child).unwrap_or_default();
        }
    }
    Ok(total)
}

/// The machine's situation, for the report: cores and the 1/5/15-minute load average, since
/// figures from a loaded 2-core box mean something else than from an idle 32-core one.
pub fn machine() -> serde_json::Value {
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load: Vec<f64> = load.split_whitespace().take(3).filter_map(|v| v.parse().ok()).collect();
    serde_json::json!({ "cores": cores, "load_average": load })
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Percentiles of a sample, in the sample's unit.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Summary {
    pub count: usize,
    pub min: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
    pub mean: f64,
}

pub fn summarize(mut values: Vec<f64>) -> Summary {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    let at = |q: f64| if n == 0 { 0.0 } else { values[((q * n as f64).ceil() as usize).clamp(1, n) - 1] };
    Summary {
        count: n,
        min: values.first().copied().unwrap_or(0.0),
        p50: at(0.50),
        p90: at(0.90),
        p99: at(0.99),
        max: values.last().copied().unwrap_or(0.0),
        mean: if n == 0 { 0.0 } else { values.iter().sum::<f64>() / n as f64 },
    }
}

#[cfg(test)]
mod tests {
    use super::SeqOrder;

    fn problem(after: Option<i64>, seqs: &[Option<i64>]) -> Option<String> {
        let mut order = SeqOrder::after(after);
        seqs.iter().for_each(|&seq| order.see(seq));
        order.take_problem()
    }

    #[test]
    fn events_out_of_order_are_found() {
        assert_eq!(problem(Some(0), &[Some(1), None, Some(2), Some(3), None]), None);
        assert_eq!(problem(None, &[Some(7), Some(8)]), None);
        assert_eq!(problem(Some(0), &[Some(2), Some(3)]).as_deref(), Some("seq 2 after 0"), "the first lost");
        assert_eq!(problem(Some(0), &[Some(1), Some(3)]).as_deref(), Some("seq 3 after 1"), "one lost");
        assert_eq!(problem(Some(0), &[Some(1), Some(2), Some(2)]).as_deref(), Some("seq 2 after 2"), "repeated");
        assert_eq!(problem(Some(0), &[Some(2), Some(1)]).as_deref(), Some("seq 2 after 0"), "reordered");
        // The first problem is kept; once taken, counting goes on from the last event seen.
        let mut order = SeqOrder::after(Some(0));
        [1, 3, 5].into_iter().for_each(|seq| order.see(Some(seq)));
        assert_eq!(order.take_problem().as_deref(), Some("seq 3 after 1"));
        order.see(Some(6));
        assert_eq!(order.take_problem(), None);
    }

    #[test]
    fn percentiles_use_nearest_rank() {
        let s = super::summarize((1..=100).map(f64::from).collect());
        assert_eq!((s.p50, s.p90, s.p99, s.max), (50.0, 90.0, 99.0, 100.0));
    }
}
