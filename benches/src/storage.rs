//! The `storage` scenario: does the space a chat takes in the database grow linearly with its
//! messages, or does something store the whole history again at every step (a snapshot of the
//! conversation in an event, a copy per compaction)?
//!
//! Chats run many turns against a real `agentplane serve` (each turn: a user message, tool steps
//! over NATS to a relay, an answer). After the first turn and at each checkpoint, while every
//! chat is idle, this process reads the server's database and sums, per table, the stored sizes
//! of the columns of the chat's own rows — exact, and independent of how pages are allocated.
//! A linear store adds the same bytes per message whenever they are added; one that snapshots
//! the history adds more and more. The verdict compares the bytes per message added in the last
//! interval with those added in the first. Every chat's history is also checked, over the API
//! and in its rows, for lost, repeated or reordered messages and events.

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use agentplane_schema::api::{ChatStatus, CreateChat, SendMessage};
use agentplane_schema::event::EventBody;
use agentplane_schema::message::{Message, Part, Role};
use agentplane_tests::{ApiClient, EventStream, RecordedRequest, Reply, ScriptedLlm};
use anyhow::{Context, bail, ensure};
use sea_orm::{ConnectOptions, ConnectionTrait, Database, DatabaseConnection, DbBackend, Statement};
use serde::Serialize;
use serde_json::json;

use crate::fleet::{nats_with_auth, server_relay_env};
use crate::{ADMIN_TOKEN, SeqOrder, ServerProcess, create_workspaces, delete_workspaces, machine, setup};

pub const DEFAULT_CHATS: usize = 2;
pub const DEFAULT_TOOL_STEPS: usize = 1;
pub const DEFAULT_CHECKPOINTS: &str = "50,100,200,400";
/// Bytes per message added in the last interval over those added in the first, at most. A store
/// that keeps a copy of the history per step grows it by about the ratio of the intervals'
/// history lengths (×8 from the default first to last interval); a linear one stays near 1.
pub const DEFAULT_MAX_GROWTH: f64 = 1.5;

/// How long one turn may take before the run fails.
const WAIT: Duration = Duration::from_secs(60);
/// Messages per page when reading a history over the API (the server's maximum).
const PAGE: u32 = 500;
/// Problems listed in the table (all are counted and written to the JSON).
const PROBLEMS_SHOWN: usize = 5;

// What the chats say, about the size of a short exchange with a coding agent. The verdict does
// not depend on the sizes: it compares the bytes added per message across the run.
const USER_TEXT: &str = "Please look at the failing test in the parser module: the second case trips over an \
                         empty line at the end of the input. Fix it, keep the change small, run the suite again \
                         and tell me what you changed and why.";
const FILE_TEXT: &str = "fn trim_trailing_empty_lines(input: &str) -> &str {\n    input.trim_end_matches(['\\n', \
                         '\\r'])\n}\n";
const ANSWER_TEXT: &str = "Fixed. The tokenizer treated a trailing empty line as the start of a new record and then \
                           failed on the missing header; it now trims trailing blank lines before splitting, which \
                           is the only change (one helper and its call). The suite passes, including the second \
                           case, and I added a case with two trailing blank lines so that the behaviour is pinned \
                           down. Nothing else in the parser depends on the old behaviour.";

/// What one run does.
pub struct Options {
    pub server_bin: Option<PathBuf>,
    pub relay_bin: Option<PathBuf>,
    pub chats: usize,
    /// Tool steps per turn (`write_file` over NATS), before the answer; 0: answers only, and no
    /// NATS or relay is needed.
    pub tool_steps: usize,
    /// Turns after which the chats are measured, increasing; they are also measured after the
    /// first turn.
    pub checkpoints: Vec<usize>,
    pub max_growth: f64,
    /// PostgreSQL instead of the embedded SQLite; a fresh database, so that the whole-table
    /// figures are this run's.
    pub database_url: Option<String>,
}

/// Runs the scenario; the report, and why it failed when the store misbehaved.
pub async fn run(options: Options) -> anyhow::Result<(serde_json::Value, Option<String>)> {
    let Options { server_bin, relay_bin, chats, tool_steps, checkpoints, max_growth, database_url } = options;
    ensure!(chats > 0, "--chats must be at least 1");
    ensure!(
        checkpoints.first().is_some_and(|&c| c > 1) && checkpoints.windows(2).all(|w| w[0] < w[1]),
        "--checkpoints must be increasing turn counts above 1"
    );
    ensure!(max_growth >= 1.0, "--max-growth must be at least 1");
    let machine = machine();
    let per_turn = 2 + 2 * tool_steps;

    let llm = ScriptedLlm::builder().record(false).responder(move |r| respond(r, tool_steps)).start();
    // Title calls would write a title event in the first turn only; not what is measured.
    let mut env = vec![("AGENTPLANE__AGENT__GENERATE_TITLES", "false".to_string())];
    let nats = match tool_steps {
        0 => None,
        _ => {
            let (nats, credentials) = nats_with_auth()?;
            env.extend(server_relay_env(&nats, credentials.path(), relay_bin)?);
            Some((nats, credentials))
        }
    };
    if let Some(url) = &database_url {
        env.push(("AGENTPLANE__DATABASE__URL", url.clone()));
    }
    let server = ServerProcess::start(server_bin, &env).await?;
    let admin = setup(&server, &llm).await?;
    let workspace = match tool_steps {
        0 => None,
        _ => create_workspaces(&admin, 1).await?.pop(),
    };
    let store = ServerDb::open(&server, database_url.as_deref()).await?;
    let db_name = match store.backend() {
        DbBackend::Postgres => "PostgreSQL",
        _ => "SQLite",
    };

    let mut runs = Vec::with_capacity(chats);
    for index in 0..chats {
        runs.push(ChatRun::start(&server, &admin, index, workspace.clone()).await?);
    }
    let others = store.count("SELECT CAST(count(*) AS BIGINT) FROM chats", None).await? - chats as i64;
    if others > 0 {
        eprintln!("storage: the database holds {others} other chat(s): the whole-table figures include them");
    }
    eprintln!("storage: {chats} chat(s) created; running to {checkpoints:?} turns");

    let mut measured = vec![measure(&store, &admin, &mut runs, 1, tool_steps, Duration::ZERO).await?];
    for &until in &checkpoints {
        let started = Instant::now();
        let tasks: Vec<_> = runs.drain(..).map(|run| tokio::spawn(run.advance(admin.clone(), until))).collect();
        for task in tasks {
            runs.push(task.await??);
        }
        measured.push(measure(&store, &admin, &mut runs, until, tool_steps, started.elapsed()).await?);
        eprintln!("storage: {until} turns measured");
    }
    let problems: Vec<String> = runs.iter().flat_map(|r| r.problems.iter().cloned()).collect();
    let growth = Growth::of(&measured);
    let fit = Fit::of(&measured);

    println!(
        "scenario storage: {chats} chat(s) × {} turns, each turn a user message, {tool_steps} tool step(s){} and an \
         answer = {per_turn} messages; {db_name}",
        checkpoints.last().copied().unwrap_or_default(),
        if tool_steps > 0 { " (write_file over NATS)" } else { "" }
    );
    println!("machine: {} cores, load average {} at start", machine["cores"], machine["load_average"]);
    println!(
        "bytes: the stored sizes of the columns of each chat's own rows (mean per chat); on disk: the chat tables \
         with their indexes, all chats ({})",
        store.disk_method()
    );
    println!(
        "{:>6} {:>6} {:>9} {:>9} {:>10} {:>9} {:>9} {:>6} {:>7} {:>9} {:>11} {:>9}",
        "turns",
        "msgs",
        "messages",
        "events",
        "tool_calls",
        "other",
        "total",
        "B/msg",
        "Δ B/msg",
        "on disk",
        "Δ disk/msg",
        "db size"
    );
    let kib = |b: f64| format!("{:.1}K", b / 1024.0);
    for (i, m) in measured.iter().enumerate() {
        let table = |name: &str| m.mean_table_bytes(name);
        let other = m.mean_bytes() - table("messages") - table("chat_events") - table("tool_calls");
        let (interval, disk_interval) = match i {
            0 => (String::new(), String::new()),
            _ => (
                format!("{:.0}", growth.intervals[i - 1]),
                growth.disk_intervals[i - 1].map(|d| format!("{d:.0}")).unwrap_or_else(|| "-".into()),
            ),
        };
        println!(
            "{:>6} {:>6} {:>9} {:>9} {:>10} {:>9} {:>9} {:>6.0} {:>7} {:>9} {:>11} {:>9}",
            m.turns,
            m.messages,
            kib(table("messages")),
            kib(table("chat_events")),
            kib(table("tool_calls")),
            kib(other),
            kib(m.mean_bytes()),
            m.mean_bytes() / m.messages as f64,
            interval,
            kib(m.disk.tables.values().sum::<i64>() as f64),
            disk_interval,
            kib(m.disk.total_bytes as f64)
        );
    }
    println!(
        "fit: bytes = {:.0} + {:.1} × messages (R² {:.6}; largest residual {:.0} B, {:.3}% of the last checkpoint)",
        fit.intercept,
        fit.slope,
        fit.r_squared,
        fit.max_residual,
        100.0 * fit.max_residual / measured.last().map_or(1.0, Measured::mean_bytes)
    );
    let linear = growth.worst_ratio <= max_growth;
    println!(
        "growth: bytes per message added {:.0} in the first interval, {:.0} in the last: ×{:.3} (worst chat; limit \
         ×{max_growth}) — {}",
        growth.intervals.first().copied().unwrap_or_default(),
        growth.intervals.last().copied().unwrap_or_default(),
        growth.worst_ratio,
        if linear { "linear" } else { "SUPER-LINEAR" }
    );
    println!("lost, repeated or reordered messages or events: {}", problems.len());
    for p in problems.iter().take(PROBLEMS_SHOWN) {
        println!("  {p}");
    }
    delete_workspaces(&admin, workspace.as_slice()).await?;
    drop(server);
    drop(nats);

    let failure = match (linear, problems.first()) {
        (_, Some(first)) => {
            Some(format!("{} problem(s) with the chats' histories; the first: {first}", problems.len()))
        }
        (false, None) => Some(format!(
            "storage grows faster than the messages: the last interval added ×{:.2} the bytes per message of the \
             first (limit ×{max_growth})",
            growth.worst_ratio
        )),
        (true, None) => None,
    };
    let report = json!({"scenario": "storage", "machine": machine, "database": db_name, "chats": chats,
        "tool_steps": tool_steps, "messages_per_turn": per_turn, "disk_method": store.disk_method(),
        "checkpoints": measured, "interval_bytes_per_message": growth.intervals,
        "interval_disk_bytes_per_message": growth.disk_intervals, "growth_ratio": growth.worst_ratio,
        "max_growth": max_growth, "linear": linear, "fit": fit, "problems": problems});
    Ok((report, failure))
}

/// The scripted model: `tool_steps` `write_file` calls (one per step) after each user message,
/// then the answer. Each chat writes its own file, named after its number in its first message.
fn respond(r: &RecordedRequest, tool_steps: usize) -> Reply {
    let (first, done) = crate::turn_progress(r);
    if done < tool_steps {
        let chat = first.as_deref().unwrap_or("x").split(':').next().unwrap_or("x").replace(' ', "-");
        Reply::tool_call("write_file", json!({"path": format!("{chat}.rs"), "content": FILE_TEXT}))
    } else {
        Reply::text(ANSWER_TEXT)
    }
}

/// The user message of turn `turn` (from 1) of chat `index`.
fn user_text(index: usize, turn: usize) -> String {
    format!("chat {index}: turn {turn}. {USER_TEXT}")
}

/// One chat being driven: its event stream, and what it saw wrong so far.
struct ChatRun {
    index: usize,
    id: String,
    stream: EventStream,
    turns: usize,
    order: SeqOrder,
    problems: Vec<String>,
}

impl ChatRun {
    /// Creates chat `index` (its first turn) and waits for that turn to end.
    async fn start(
        server: &ServerProcess,
        admin: &ApiClient,
        index: usize,
        workspace_id: Option<String>,
    ) -> anyhow::Result<Self> {
        let chat = admin
            .create_chat(&CreateChat {
                content: vec![Part::text(user_text(index, 1))],
                model_id: None,
                workspace_id,
                title: None,
            })
            .await?;
        let stream = EventStream::connect(&server.base_url, &chat.id, ADMIN_TOKEN, Some(0)).await?;
        let order = SeqOrder::after(Some(0));
        let mut run = ChatRun { index, id: chat.id, stream, turns: 1, order, problems: Vec::new() };
        run.wait_idle().await?;
        Ok(run)
    }

    /// Runs turns one after the other until `until` are done.
    async fn advance(mut self, admin: ApiClient, until: usize) -> anyhow::Result<Self> {
        while self.turns < until {
            let content = vec![Part::text(user_text(self.index, self.turns + 1))];
            admin.send(&self.id, &SendMessage { content, busy_behavior: Default::default() }).await?;
            self.turns += 1;
            self.wait_idle().await?;
        }
        Ok(self)
    }

    /// Reads the stream to the end of the turn, noting durable events out of order and a turn
    /// that ended in an error.
    async fn wait_idle(&mut self) -> anyhow::Result<()> {
        let order = &mut self.order;
        let events = self
            .stream
            .wait_for(
                |e| {
                    order.see(e.seq);
                    matches!(&e.body, EventBody::Status { status: ChatStatus::Idle | ChatStatus::Error, .. })
                },
                WAIT,
            )
            .await
            .with_context(|| format!("chat {} turn {}", self.index, self.turns))?;
        if let Some(gap) = self.order.take_problem() {
            self.problems.push(format!("chat {} turn {}: event stream out of order: {gap}", self.index, self.turns));
        }
        if let Some(EventBody::Status { status: ChatStatus::Error, error }) = events.last().map(|e| &e.body) {
            self.problems.push(format!("chat {} turn {} ended in an error: {error:?}", self.index, self.turns));
        }
        Ok(())
    }
}

/// Bytes of one chat's rows in one table.
#[derive(Debug, Clone, Copy, Serialize)]
struct TableBytes {
    rows: i64,
    bytes: i64,
}

/// Space the chat tables take on disk, all rows (not only the chats'), with their indexes.
#[derive(Debug, Serialize)]
struct Disk {
    /// Per table; empty when SQLite was built without `dbstat`.
    tables: BTreeMap<String, i64>,
    /// The SQLite file and its WAL, or the PostgreSQL database.
    total_bytes: i64,
}

/// Everything measured at one checkpoint.
#[derive(Debug, Serialize)]
struct Measured {
    turns: usize,
    /// Per chat.
    messages: usize,
    /// Per chat, per table.
    chats: Vec<BTreeMap<&'static str, TableBytes>>,
    disk: Disk,
    /// Time the turns since the previous checkpoint took.
    seconds: f64,
}

impl Measured {
    fn chat_bytes(&self, chat: usize) -> f64 {
        self.chats[chat].values().map(|t| t.bytes as f64).sum()
    }

    fn mean_bytes(&self) -> f64 {
        (0..self.chats.len()).map(|c| self.chat_bytes(c)).sum::<f64>() / self.chats.len() as f64
    }

    fn mean_table_bytes(&self, table: &str) -> f64 {
        self.chats.iter().filter_map(|c| c.get(table)).map(|t| t.bytes as f64).sum::<f64>() / self.chats.len() as f64
    }
}

/// Measures every chat (all idle at `turns` turns) and checks their histories and rows.
async fn measure(
    store: &ServerDb,
    admin: &ApiClient,
    runs: &mut [ChatRun],
    turns: usize,
    tool_steps: usize,
    seconds: Duration,
) -> anyhow::Result<Measured> {
    let mut chats = Vec::with_capacity(runs.len());
    for run in runs.iter_mut() {
        ensure!(run.turns == turns, "chat {} is at turn {}, not {turns}", run.index, run.turns);
        chats.push(store.chat_bytes(&run.id).await?);
        let messages = all_messages(admin, &run.id).await?;
        let label = format!("chat {} at {turns} turns", run.index);
        let expected = Turns { user_text: &|turn| user_text(run.index, turn), answer: ANSWER_TEXT, tool_steps };
        run.problems.extend(check_history(&messages, turns, &expected).map(|p| format!("{label}: {p}")));
        run.problems
            .extend(store.check_rows(&run.id, turns, tool_steps).await?.into_iter().map(|p| format!("{label}: {p}")));
    }
    Ok(Measured {
        turns,
        messages: turns * (2 + 2 * tool_steps),
        chats,
        disk: store.on_disk().await?,
        seconds: seconds.as_secs_f64(),
    })
}

/// A chat's whole history over the API, oldest first.
pub async fn all_messages(admin: &ApiClient, chat_id: &str) -> anyhow::Result<Vec<Message>> {
    let mut pages = Vec::new();
    let mut before = None;
    loop {
        let page = admin.messages_page(chat_id, before, Some(PAGE)).await?;
        let cursor = page.next_cursor;
        pages.push(page.messages);
        match cursor {
            Some(c) if before.is_none_or(|b| c < b) => before = Some(c),
            Some(c) => bail!("chat {chat_id}: the message cursor did not move back ({c})"),
            None => break,
        }
    }
    let mut all: Vec<Message> = pages.into_iter().rev().flatten().collect();
    all.sort_by_key(|m| m.position);
    Ok(all)
}

/// What each turn of a scenario's chat holds: its user message (by turn, from 1), `tool_steps` ×
/// (an assistant message with one tool call, its result), and the answer.
pub struct Turns<'a> {
    pub user_text: &'a dyn Fn(usize) -> String,
    pub answer: &'a str,
    pub tool_steps: usize,
}

/// Whether the history is exactly `turns` such turns in order, each message once: `None`, or the
/// first thing wrong (a message lost, repeated or out of place).
pub fn check_history(messages: &[Message], turns: usize, expected: &Turns<'_>) -> Option<String> {
    let per_turn = 2 + 2 * expected.tool_steps;
    if messages.len() != turns * per_turn {
        return Some(format!("{} messages, expected {}", messages.len(), turns * per_turn));
    }
    let mut ids = HashSet::new();
    for (i, pair) in messages.windows(2).enumerate() {
        if pair[0].position >= pair[1].position {
            return Some(format!("message {} has position {} after {}", i + 1, pair[1].position, pair[0].position));
        }
    }
    for (i, m) in messages.iter().enumerate() {
        if !ids.insert(m.id.as_str()) {
            return Some(format!("message id {} appears twice", m.id));
        }
        let (turn, step) = (i / per_turn + 1, i % per_turn);
        let calls = m.parts.iter().filter(|p| matches!(p, Part::ToolCall { .. })).count();
        let results = m.parts.iter().filter(|p| matches!(p, Part::ToolResult { is_error: false, .. })).count();
        let expected = match step {
            0 => m.role == Role::User && m.text() == (expected.user_text)(turn),
            s if s == per_turn - 1 => m.role == Role::Assistant && calls == 0 && m.text() == expected.answer,
            s if s % 2 == 1 => m.role == Role::Assistant && calls == 1,
            _ => m.role == Role::Tool && results == 1,
        };
        if !expected {
            return Some(format!(
                "message {i} (turn {turn}, position {}) is a {:?} message not expected there: {:.80}",
                m.position,
                m.role,
                m.text()
            ));
        }
    }
    None
}

/// Bytes added per message between consecutive checkpoints, and the worst chat's ratio of the
/// last interval to the first.
struct Growth {
    /// Mean over the chats, per interval.
    intervals: Vec<f64>,
    worst_ratio: f64,
    /// Space on disk of the chat tables (all chats) added per message, per interval; `None`
    /// without per-table figures. Reported, not judged: pages are allocated in steps.
    disk_intervals: Vec<Option<f64>>,
}

impl Growth {
    fn of(measured: &[Measured]) -> Self {
        let per_chat = |chat: usize| -> Vec<f64> {
            measured
                .windows(2)
                .map(|w| (w[1].chat_bytes(chat) - w[0].chat_bytes(chat)) / (w[1].messages - w[0].messages) as f64)
                .collect()
        };
        let chats = measured.first().map_or(0, |m| m.chats.len());
        let all: Vec<Vec<f64>> = (0..chats).map(per_chat).collect();
        let intervals = (0..measured.len().saturating_sub(1))
            .map(|i| all.iter().map(|c| c[i]).sum::<f64>() / chats.max(1) as f64)
            .collect();
        let worst_ratio = all
            .iter()
            .filter_map(|c| Some(c.last()? / c.first()?))
            .fold(0.0, |worst: f64, r| if r.is_nan() { f64::INFINITY } else { worst.max(r) });
        let disk = |m: &Measured| m.disk.tables.values().sum::<i64>() as f64;
        let disk_intervals = measured
            .windows(2)
            .map(|w| {
                let added_messages = ((w[1].messages - w[0].messages) * chats) as f64;
                (!w[1].disk.tables.is_empty()).then(|| (disk(&w[1]) - disk(&w[0])) / added_messages)
            })
            .collect();
        Growth { intervals, worst_ratio, disk_intervals }
    }
}

/// Least-squares line through (messages, mean bytes per chat) of every checkpoint.
#[derive(Debug, Serialize)]
struct Fit {
    intercept: f64,
    /// Bytes per message.
    slope: f64,
    r_squared: f64,
    /// The largest |measured − fitted|, in bytes.
    max_residual: f64,
}

impl Fit {
    fn of(measured: &[Measured]) -> Self {
        let points: Vec<(f64, f64)> = measured.iter().map(|m| (m.messages as f64, m.mean_bytes())).collect();
        let n = points.len() as f64;
        let (mx, my) = (points.iter().map(|p| p.0).sum::<f64>() / n, points.iter().map(|p| p.1).sum::<f64>() / n);
        let sxx: f64 = points.iter().map(|p| (p.0 - mx).powi(2)).sum();
        let sxy: f64 = points.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
        let syy: f64 = points.iter().map(|p| (p.1 - my).powi(2)).sum();
        let slope = if sxx > 0.0 { sxy / sxx } else { 0.0 };
        let intercept = my - slope * mx;
        let fitted = |x: f64| intercept + slope * x;
        let residual: f64 = points.iter().map(|p| (p.1 - fitted(p.0)).powi(2)).sum();
        Fit {
            intercept,
            slope,
            r_squared: if syy > 0.0 { 1.0 - residual / syy } else { 1.0 },
            max_residual: points.iter().map(|p| (p.1 - fitted(p.0)).abs()).fold(0.0, f64::max),
        }
    }
}

/// The tables holding a chat's rows, and which rows are the chat's (`$1`: the chat's id). Audit
/// rows name the chat as their target (`message.sent`) or in their details (`tool.executed`).
fn chat_tables(backend: DbBackend) -> [(&'static str, &'static str); 7] {
    let audit = match backend {
        DbBackend::Postgres => "target_id = $1 OR details->>'chat_id' = $1",
        _ => "target_id = $1 OR json_extract(details, '$.chat_id') = $1",
    };
    [
        ("chats", "id = $1"),
        ("messages", "chat_id = $1"),
        ("chat_events", "chat_id = $1"),
        ("tool_calls", "chat_id = $1"),
        ("usage", "chat_id = $1"),
        ("queued_messages", "chat_id = $1"),
        ("audit_events", audit),
    ]
}

/// The server's database, read from this process while the chats are idle.
struct ServerDb {
    db: DatabaseConnection,
    /// The SQLite file (its WAL is beside it); `None` on PostgreSQL.
    file: Option<PathBuf>,
    /// Per chat table: the query of the number of a chat's rows and their bytes.
    queries: Vec<(&'static str, String)>,
    /// Whether SQLite has the `dbstat` table (per-table space on disk).
    dbstat: bool,
}

impl ServerDb {
    /// Connects to the database `server` uses: `database_url`, or its embedded SQLite file
    /// (found the way the server finds it, from its data directory).
    async fn open(server: &ServerProcess, database_url: Option<&str>) -> anyhow::Result<Self> {
        let mut settings = agentplane_config::Settings::defaults();
        settings.server.data_dir = server.data_dir().to_path_buf();
        settings.database.url = database_url.unwrap_or_default().to_string();
        let url = settings.database_url();
        let file = url.strip_prefix("sqlite://").map(|rest| PathBuf::from(rest.split('?').next().unwrap_or(rest)));
        let mut options = ConnectOptions::new(url.clone());
        options.max_connections(1).sqlx_logging(false);
        let db = Database::connect(options).await.with_context(|| format!("connecting to {url}"))?;
        let backend = db.get_database_backend();
        let mut queries = Vec::new();
        for (table, filter) in chat_tables(backend) {
            let columns = column_names(&db, table).await?;
            ensure!(!columns.is_empty(), "table {table} has no columns (or does not exist)");
            let bytes: Vec<String> = columns.iter().map(|c| column_bytes(backend, c)).collect();
            queries.push((
                table,
                format!(
                    "SELECT CAST(count(*) AS BIGINT), CAST(coalesce(sum({}), 0) AS BIGINT) FROM \"{table}\" WHERE {filter}",
                    bytes.join(" + ")
                ),
            ));
        }
        let dbstat = backend == DbBackend::Sqlite
            && db.query_one_raw(Statement::from_string(backend, "SELECT 1 FROM dbstat LIMIT 1")).await.is_ok();
        Ok(ServerDb { db, file, queries, dbstat })
    }

    fn backend(&self) -> DbBackend {
        self.db.get_database_backend()
    }

    fn disk_method(&self) -> &'static str {
        match (self.backend(), self.dbstat) {
            (DbBackend::Postgres, _) => "pg_total_relation_size; db size: pg_database_size",
            (_, true) => "SQLite dbstat pages; db size: the file and its WAL",
            (_, false) => "no dbstat in this SQLite; db size: the file and its WAL",
        }
    }

    /// One integer, from a query with at most one parameter (`$1`).
    async fn count(&self, sql: &str, param: Option<&str>) -> anyhow::Result<i64> {
        let values: Vec<sea_orm::Value> = param.map(|p| p.into()).into_iter().collect();
        let row = self
            .db
            .query_one_raw(Statement::from_sql_and_values(self.backend(), sql, values))
            .await
            .with_context(|| format!("`{sql}`"))?
            .with_context(|| format!("`{sql}` returned no row"))?;
        Ok(row.try_get_by_index::<i64>(0)?)
    }

    /// The chat's rows and their bytes, per table.
    async fn chat_bytes(&self, chat_id: &str) -> anyhow::Result<BTreeMap<&'static str, TableBytes>> {
        let mut tables = BTreeMap::new();
        for (table, sql) in &self.queries {
            let row = self
                .db
                .query_one_raw(Statement::from_sql_and_values(self.backend(), sql, [chat_id.into()]))
                .await
                .with_context(|| format!("measuring {table}"))?
                .with_context(|| format!("measuring {table}: no row"))?;
            tables.insert(*table, TableBytes { rows: row.try_get_by_index(0)?, bytes: row.try_get_by_index(1)? });
        }
        Ok(tables)
    }

    /// What the chat's rows must be after `turns` turns: as many message rows as messages (none
    /// soft-deleted), events numbered 1..=`last_seq` once each, every tool call finished, one
    /// usage row per model call.
    async fn check_rows(&self, chat_id: &str, turns: usize, tool_steps: usize) -> anyhow::Result<Vec<String>> {
        let count = |sql: &'static str| self.count(sql, Some(chat_id));
        let expect = [
            (
                "message rows",
                count("SELECT CAST(count(*) AS BIGINT) FROM messages WHERE chat_id = $1").await?,
                turns * (2 + 2 * tool_steps),
            ),
            (
                "finished tool calls",
                count("SELECT CAST(count(*) AS BIGINT) FROM tool_calls WHERE chat_id = $1 AND status = 'done'").await?,
                turns * tool_steps,
            ),
            (
                "tool call rows",
                count("SELECT CAST(count(*) AS BIGINT) FROM tool_calls WHERE chat_id = $1").await?,
                turns * tool_steps,
            ),
            (
                "usage rows",
                count("SELECT CAST(count(*) AS BIGINT) FROM \"usage\" WHERE chat_id = $1").await?,
                turns * (1 + tool_steps),
            ),
        ];
        let mut problems: Vec<String> = expect
            .iter()
            .filter(|(_, got, want)| *got != *want as i64)
            .map(|(what, got, want)| format!("{got} {what}, expected {want}"))
            .collect();
        let last_seq = count("SELECT CAST(last_seq AS BIGINT) FROM chats WHERE id = $1").await?;
        let events = count("SELECT CAST(count(*) AS BIGINT) FROM chat_events WHERE chat_id = $1").await?;
        let distinct = count("SELECT CAST(count(DISTINCT seq) AS BIGINT) FROM chat_events WHERE chat_id = $1").await?;
        let range =
            count("SELECT CAST(coalesce(max(seq) - min(seq) + 1, 0) AS BIGINT) FROM chat_events WHERE chat_id = $1")
                .await?;
        if events != last_seq || distinct != events || range != events {
            problems.push(format!(
                "{events} event rows ({distinct} distinct seqs spanning {range}), the chat's last seq is {last_seq}"
            ));
        }
        Ok(problems)
    }

    async fn on_disk(&self) -> anyhow::Result<Disk> {
        let names: Vec<&str> = self.queries.iter().map(|(t, _)| *t).collect();
        let mut tables = BTreeMap::new();
        match &self.file {
            Some(file) => {
                if self.dbstat {
                    // Indexes count for the table they index.
                    let sql = "SELECT m.tbl_name, CAST(sum(d.pgsize) AS BIGINT) FROM dbstat d JOIN sqlite_master m \
                               ON m.name = d.name GROUP BY m.tbl_name";
                    for row in self.db.query_all_raw(Statement::from_string(DbBackend::Sqlite, sql)).await? {
                        let name: String = row.try_get_by_index(0)?;
                        if names.contains(&name.as_str()) {
                            tables.insert(name, row.try_get_by_index::<i64>(1)?);
                        }
                    }
                }
                let size = |p: PathBuf| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
                let mut wal = file.clone().into_os_string();
                wal.push("-wal");
                let total = size(file.clone()) + size(PathBuf::from(wal));
                Ok(Disk { tables, total_bytes: i64::try_from(total)? })
            }
            None => {
                for name in names {
                    let size = self
                        .count("SELECT pg_total_relation_size(CAST(CAST($1 AS TEXT) AS regclass))", Some(name))
                        .await?;
                    tables.insert(name.to_string(), size);
                }
                let total = self.count("SELECT pg_database_size(current_database())", None).await?;
                Ok(Disk { tables, total_bytes: total })
            }
        }
    }
}

/// The columns of `table`, in order.
async fn column_names(db: &DatabaseConnection, table: &str) -> anyhow::Result<Vec<String>> {
    let backend = db.get_database_backend();
    let sql = match backend {
        DbBackend::Postgres => {
            "SELECT CAST(column_name AS TEXT) FROM information_schema.columns WHERE table_schema = current_schema() \
             AND table_name = $1 ORDER BY ordinal_position"
        }
        _ => "SELECT name FROM pragma_table_info($1) ORDER BY cid",
    };
    let rows = db.query_all_raw(Statement::from_sql_and_values(backend, sql, [table.into()])).await?;
    rows.iter().map(|r| Ok(r.try_get_by_index::<String>(0)?)).collect()
}

/// The bytes the value of `column` takes as stored: PostgreSQL's own `pg_column_size` (after
/// compression, with its length header); on SQLite text and blobs by their bytes and numbers as
/// 8 (SQLite stores small integers in fewer, so this slightly overstates them).
fn column_bytes(backend: DbBackend, column: &str) -> String {
    match backend {
        DbBackend::Postgres => format!("coalesce(pg_column_size(\"{column}\"), 0)"),
        _ => format!(
            "(CASE typeof(\"{column}\") WHEN 'null' THEN 0 WHEN 'integer' THEN 8 WHEN 'real' THEN 8 ELSE \
             length(CAST(\"{column}\" AS BLOB)) END)"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(turns: usize, bytes: i64) -> Measured {
        let messages = turns * 4;
        Measured {
            turns,
            messages,
            chats: vec![BTreeMap::from([("messages", TableBytes { rows: messages as i64, bytes })])],
            disk: Disk { tables: BTreeMap::new(), total_bytes: 0 },
            seconds: 0.0,
        }
    }

    fn run_of(bytes: impl Fn(i64) -> i64) -> Vec<Measured> {
        [1, 50, 100, 200, 400].into_iter().map(|t| at(t, bytes(t as i64 * 4))).collect()
    }

    #[test]
    fn a_copy_of_the_history_per_message_is_super_linear_and_rows_per_message_are_not() {
        let linear = Growth::of(&run_of(|m| 300 + 2000 * m));
        assert!((linear.worst_ratio - 1.0).abs() < 1e-9, "{}", linear.worst_ratio);
        // Each message also stores the history before it, at 100 bytes a message.
        let snapshots = Growth::of(&run_of(|m| 2000 * m + 100 * m * (m - 1) / 2));
        assert!(snapshots.worst_ratio > DEFAULT_MAX_GROWTH * 4.0, "{}", snapshots.worst_ratio);
        let fit = Fit::of(&run_of(|m| 300 + 2000 * m));
        assert!((fit.slope - 2000.0).abs() < 1e-6 && (fit.intercept - 300.0).abs() < 1e-6);
    }

    fn history(turns: usize) -> Vec<Message> {
        let message = |position: usize, role: Role, parts: Vec<Part>| Message {
            id: format!("m{position}"),
            chat_id: "c".into(),
            position: position as i64,
            role,
            parts: parts.into(),
            interrupted: false,
            user_id: None,
            model_id: None,
            created_at: chrono::Utc::now(),
        };
        (1..=turns)
            .flat_map(|turn| {
                let p = (turn - 1) * 4;
                let call = Part::ToolCall { call_id: "c1".into(), name: "write_file".into(), args: json!({}) };
                let result = Part::ToolResult {
                    call_id: "c1".into(),
                    name: "write_file".into(),
                    result: "ok".into(),
                    is_error: false,
                };
                [
                    message(p + 1, Role::User, vec![Part::text(user_text(0, turn))]),
                    message(p + 2, Role::Assistant, vec![call]),
                    message(p + 3, Role::Tool, vec![result]),
                    message(p + 4, Role::Assistant, vec![Part::text(ANSWER_TEXT)]),
                ]
            })
            .collect()
    }

    #[test]
    fn a_lost_or_repeated_message_is_found() {
        let user = |turn| user_text(0, turn);
        let expected = Turns { user_text: &user, answer: ANSWER_TEXT, tool_steps: 1 };
        let check = |messages: &[Message], turns| check_history(messages, turns, &expected);
        assert_eq!(check(&history(3), 3), None);
        let mut lost = history(3);
        lost.remove(5);
        assert!(check(&lost, 3).is_some());
        // A repeated turn in place of another: the count is right, the turn numbers are not.
        let mut repeated = history(3);
        for (i, m) in repeated.iter_mut().enumerate().skip(4).take(4) {
            m.parts = history(1)[i - 4].parts.clone();
        }
        assert!(check(&repeated, 3).is_some());
        let mut same_id = history(3);
        same_id[7].id = same_id[3].id.clone();
        assert!(check(&same_id, 3).is_some());
    }
}
