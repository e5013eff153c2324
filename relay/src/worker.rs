//! The relay as a NATS worker: takes one workspace's tool requests from NATS, runs them with a
//! [`Relay`], and publishes their output and results — the protocol of
//! [`agentplane_schema::nats`].
//!
//! [`run`] connects (retrying until NATS is reachable), queue-subscribes to `req`, subscribes to
//! `cancel`, and announces itself on `hello` at start, after every reconnect and every
//! [`HELLO_INTERVAL_SECONDS`]. A request is acknowledged with [`ACK`] as soon as it is taken; then
//! the journal decides whether it runs: a call id seen before is answered with its recorded
//! result (or, when it is still running here, not at all — its result is on its way), so a
//! repeated request never runs a tool twice, also across restarts. Each call runs in its own task,
//! streams `execute` output to `out.<call>`, is recorded as finished, and then publishes its
//! result to `res.<call>` with `Nats-Msg-Id: <call>`, which the results stream uses to drop
//! duplicates. Core NATS is at most once: a result lost on the way is published again when the
//! orchestrator repeats the request.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_nats::{Client, ConnectErrorKind, ConnectOptions, Event, HeaderMap, Message, Subscriber};
use bytes::Bytes;
use futures::{FutureExt as _, StreamExt as _};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;

use agentplane_schema::nats::{ACK, HEADER_CALL_ID, HELLO_INTERVAL_SECONDS, Hello, RELAY_QUEUE, Subjects, is_token};
use agentplane_schema::tool::{ToolLimits, ToolRequest, ToolResult};

use crate::journal::{Claim, Journal};
pub use crate::journal::{INTERRUPTED, JournalLimits};
use crate::{FileToolCall, Relay};

/// NATS pings this often, so a dead connection is noticed in seconds rather than the client's
/// default minute.
const PING_INTERVAL: Duration = Duration::from_secs(5);
/// The longest pause between attempts to reach NATS at start.
const MAX_CONNECT_BACKOFF: Duration = Duration::from_secs(5);
/// How long a cancelled call may take to end on its own (an `execute` collects its last output
/// and reports "interrupted") before its future is dropped, which kills whatever it runs.
const CANCEL_GRACE: Duration = Duration::from_secs(3);
/// How often a cancelled call is asked again to stop.
const CANCEL_RETRY: Duration = Duration::from_millis(50);
/// Room left under the server's maximum message size for headers and protocol overhead.
const PAYLOAD_HEADROOM: usize = 1024;
/// How long, at shutdown, the last messages may take to reach the server.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(5);

/// The result of a call whose tool panicked.
const PANICKED: &str = "interrupted, outcome unknown: the relay failed while running this call";
/// How the result of a call the journal could not record begins.
const NOT_RECORDED: &str = "the relay could not record the call in its journal, so it did not run it";

/// Everything [`run`] needs.
#[derive(Debug, Clone)]
pub struct WorkerSettings {
    /// NATS server URL(s), comma-separated.
    pub nats_url: String,
    /// The workspace this relay serves; a single subject token.
    pub workspace_id: String,
    /// `None`: connect without authentication.
    pub credentials: Option<Credentials>,
    /// The workspace root the tools are confined to (created if missing).
    pub root: PathBuf,
    /// Where the journal lives; created if missing, must not be inside `root`.
    pub state_dir: PathBuf,
    /// Subject prefix (default [`agentplane_schema::nats::DEFAULT_PREFIX`]).
    pub prefix: String,
    pub limits: ToolLimits,
    pub journal: JournalLimits,
    /// At shutdown, how long running calls may take to finish before they are cancelled.
    pub shutdown_grace: Duration,
}

/// A NATS credentials file (JWT and NKey seed), by path or as its text.
#[derive(Clone)]
pub enum Credentials {
    File(PathBuf),
    Text(String),
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Credentials::File(path) => f.debug_tuple("File").field(path).finish(),
            // The text holds a private key.
            Credentials::Text(_) => f.write_str("Text(…)"),
        }
    }
}

/// Why [`run`] stopped before it was asked to.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("invalid {setting}: {reason}")]
    Invalid { setting: &'static str, reason: String },
    #[error("cannot open the workspace root {}: {source}", root.display())]
    Root { root: PathBuf, source: io::Error },
    #[error("cannot open the journal in {}: {source}", dir.display())]
    Journal { dir: PathBuf, source: io::Error },
    #[error("cannot read the NATS credentials: {0}")]
    Credentials(io::Error),
    #[error("cannot connect to NATS at {url}: {source}")]
    Connect { url: String, source: async_nats::ConnectError },
    #[error("cannot subscribe to {subject}: {source}")]
    Subscribe { subject: String, source: async_nats::SubscribeError },
    #[error("the NATS connection closed and will not come back (the log says why)")]
    ConnectionClosed,
}

impl WorkerSettings {
    /// Checks what can be checked without touching the disk or the network.
    pub fn validate(&self) -> Result<(), WorkerError> {
        let invalid = |setting, reason: &str| Err(WorkerError::Invalid { setting, reason: reason.to_owned() });
        if !is_token(&self.workspace_id) {
            return invalid("workspace id", "it must be one NATS subject token (letters, digits, '-' and '_')");
        }
        if !self.prefix.split('.').all(is_token) {
            return invalid("subject prefix", "it must be NATS subject tokens joined by '.'");
        }
        if self.nats_url.trim().is_empty() {
            return invalid("NATS URL", "it is empty");
        }
        if self.journal.max_calls == 0 || self.journal.max_bytes == 0 {
            return invalid("journal limits", "the journal must keep at least one call");
        }
        Ok(())
    }
}

/// Serves the workspace until `shutdown` resolves (then stops taking requests, lets running
/// calls finish within [`WorkerSettings::shutdown_grace`], and returns `Ok`) or the connection
/// is lost for good.
pub async fn run(settings: WorkerSettings, shutdown: impl Future<Output = ()>) -> Result<(), WorkerError> {
    settings.validate()?;
    let relay = Relay::new(&settings.root, settings.limits.clone())
        .map_err(|source| WorkerError::Root { root: settings.root.clone(), source })?;
    let (journal, interrupted) = open_journal(&settings, &relay).await?;
    tracing::info!(
        workspace = %settings.workspace_id,
        root = %relay.root().display(),
        state_dir = %settings.state_dir.display(),
        unfinished = interrupted.len(),
        "relay starting"
    );

    tokio::pin!(shutdown);
    let (events_tx, mut events) = mpsc::channel(64);
    let client = tokio::select! {
        client = connect(&settings, events_tx) => client?,
        () = &mut shutdown => {
            tracing::info!("shutdown requested before NATS was reached");
            return Ok(());
        }
    };
    let subjects = Subjects::new(&settings.prefix);
    let ws = settings.workspace_id.clone();
    let mut requests = subscribe(&client, subjects.request(&ws), Some(RELAY_QUEUE)).await?;
    let mut cancels = subscribe(&client, subjects.cancel(&ws), None).await?;

    let hello = Hello {
        workspace_id: ws.clone(),
        relay_version: env!("CARGO_PKG_VERSION").to_owned(),
        started_at: chrono::Utc::now().to_rfc3339(),
    };
    let worker = Worker {
        shared: Arc::new(Shared {
            client: client.clone(),
            subjects: subjects.clone(),
            ws,
            relay,
            journal: Arc::new(journal),
            running: Mutex::default(),
        }),
        hello: Bytes::from(serde_json::to_vec(&hello).unwrap_or_default()),
    };
    for result in interrupted {
        tracing::warn!(call_id = %result.call_id, "a call ran when the relay last stopped; reporting it as interrupted");
        worker.shared.publish_result(&result).await;
    }

    let mut tasks = JoinSet::new();
    let mut hello_timer = tokio::time::interval(Duration::from_secs(HELLO_INTERVAL_SECONDS));
    hello_timer.set_missed_tick_behavior(MissedTickBehavior::Delay);
    tracing::info!(subject = %subjects.request(&worker.shared.ws), "relay serving");
    loop {
        tokio::select! {
            message = requests.next() => match message {
                Some(message) => worker.take(message, &mut tasks).await,
                // The client gives its subscriptions up only when the connection cannot come back.
                None => return Err(WorkerError::ConnectionClosed),
            },
            message = cancels.next() => match message {
                Some(message) => worker.cancel(&message),
                None => return Err(WorkerError::ConnectionClosed),
            },
            _ = hello_timer.tick() => worker.hello().await,
            Some(event) = events.recv() => {
                if matches!(event, Event::Connected) {
                    // Announce at once: the orchestrator may have marked the workspace offline.
                    worker.hello().await;
                }
            }
            Some(joined) = tasks.join_next(), if !tasks.is_empty() => log_join(joined),
            () = &mut shutdown => break,
        }
    }

    tracing::info!(running = tasks.len(), "shutting down: no longer taking requests");
    // Drain: the server stops sending, and requests already delivered to us are still taken
    // (and acknowledged) rather than lost.
    if let Err(err) = requests.drain().await {
        tracing::warn!(%err, "unsubscribing from requests failed");
    }
    while let Ok(Some(message)) = tokio::time::timeout(FLUSH_TIMEOUT, requests.next()).await {
        worker.take(message, &mut tasks).await;
    }
    let grace = tokio::time::Instant::now() + settings.shutdown_grace;
    if !worker.wait_for_calls(&mut tasks, &mut cancels, grace).await {
        tracing::warn!(running = tasks.len(), "calls still running after the shutdown grace; cancelling them");
        worker.shared.cancel_all();
        let grace = tokio::time::Instant::now() + CANCEL_GRACE + Duration::from_secs(2);
        if !worker.wait_for_calls(&mut tasks, &mut cancels, grace).await {
            // Left as `started` in the journal: the next start reports them as interrupted.
            tracing::error!(running = tasks.len(), "calls did not end after being cancelled; abandoning them");
            tasks.abort_all();
        }
    }
    match tokio::time::timeout(FLUSH_TIMEOUT, client.flush()).await {
        Ok(Ok(())) => {}
        Ok(Err(err)) => tracing::warn!(%err, "flushing the last messages to NATS failed"),
        Err(_) => tracing::warn!("flushing the last messages to NATS timed out"),
    }
    tracing::info!("relay stopped");
    Ok(())
}

/// Resolves on SIGTERM or SIGINT: what [`run`]'s `shutdown` usually is.
pub async fn termination_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM received"),
                _ = int.recv() => tracing::info!("SIGINT received"),
            }
        }
        (Err(err), _) | (_, Err(err)) => {
            tracing::error!(%err, "cannot listen for termination signals; stop the relay with SIGKILL");
            std::future::pending::<()>().await;
        }
    }
}

/// Resolves once standard input ends (or cannot be read): the process that started the relay
/// held the other end, and has closed it or died. Read on a thread of its own, which a relay
/// stopped otherwise leaves blocked until the process exits.
pub async fn stdin_closed() {
    let (closed, wait) = tokio::sync::oneshot::channel::<()>();
    let watching = std::thread::Builder::new().name("stdin-watch".into()).spawn(move || {
        use std::io::Read as _;
        let mut stdin = std::io::stdin();
        let mut buffer = [0u8; 256];
        while matches!(stdin.read(&mut buffer), Ok(n) if n > 0) {}
        let _ = closed.send(());
    });
    if let Err(err) = watching {
        tracing::error!(%err, "cannot watch standard input; the relay stops on signals only");
        std::future::pending::<()>().await;
    }
    let _ = wait.await;
    tracing::info!("standard input closed: the process that started the relay is gone");
}

async fn open_journal(settings: &WorkerSettings, relay: &Relay) -> Result<(Journal, Vec<ToolResult>), WorkerError> {
    let dir = settings.state_dir.clone();
    let failed = |source| WorkerError::Journal { dir: dir.clone(), source };
    std::fs::create_dir_all(&dir).map_err(failed)?;
    let canonical = dir.canonicalize().map_err(failed)?;
    // The model's tools can change anything beneath the root; a journal there could be edited
    // into answering a call with a forged result.
    if canonical.starts_with(relay.root()) {
        return Err(WorkerError::Invalid {
            setting: "state directory",
            reason: format!("{} is inside the workspace root {}", canonical.display(), relay.root().display()),
        });
    }
    let limits = settings.journal;
    tokio::task::spawn_blocking(move || Journal::open(&canonical, limits))
        .await
        .map_err(|err| failed(io::Error::other(err)))?
        .map_err(failed)
}

/// Connects, retrying while NATS is unreachable; gives up at once on what retrying cannot fix
/// (a bad URL, refused credentials, TLS). Once connected, the client reconnects by itself,
/// without limit, and renews its subscriptions.
async fn connect(settings: &WorkerSettings, events: mpsc::Sender<Event>) -> Result<Client, WorkerError> {
    let mut attempt: u32 = 0;
    loop {
        let events = events.clone();
        let mut options = ConnectOptions::new()
            .name(format!("agentplane-relay {}", settings.workspace_id))
            .custom_inbox_prefix(Subjects::new(&settings.prefix).relay_inbox_prefix(&settings.workspace_id))
            .ping_interval(PING_INTERVAL)
            .max_reconnects(None)
            .event_callback(move |event| {
                let events = events.clone();
                async move {
                    // The client logs every event itself; losing the connection deserves a warning.
                    if matches!(event, Event::Disconnected) {
                        tracing::warn!("disconnected from NATS; reconnecting");
                    }
                    // A full queue only loses an early hello; the timer sends the next.
                    let _ = events.try_send(event);
                }
            });
        // Read on every attempt: a mounted credentials file may be replaced while we wait.
        options = match &settings.credentials {
            None => options,
            Some(Credentials::File(path)) => options.credentials_file(path).await.map_err(WorkerError::Credentials)?,
            Some(Credentials::Text(text)) => options.credentials(text).map_err(WorkerError::Credentials)?,
        };
        match options.connect(settings.nats_url.as_str()).await {
            Ok(client) => return Ok(client),
            Err(err)
                if matches!(
                    err.kind(),
                    ConnectErrorKind::ServerParse
                        | ConnectErrorKind::Authentication
                        | ConnectErrorKind::AuthorizationViolation
                        | ConnectErrorKind::Tls
                ) =>
            {
                return Err(WorkerError::Connect { url: settings.nats_url.clone(), source: err });
            }
            Err(err) => {
                let pause = Duration::from_millis(250u64.saturating_mul(1 << attempt.min(5))).min(MAX_CONNECT_BACKOFF);
                tracing::warn!(url = %settings.nats_url, %err, retry_in = ?pause, "NATS is not reachable yet");
                tokio::time::sleep(pause).await;
                attempt = attempt.saturating_add(1);
            }
        }
    }
}

async fn subscribe(client: &Client, subject: String, queue: Option<&str>) -> Result<Subscriber, WorkerError> {
    let subscribed = match queue {
        Some(queue) => client.queue_subscribe(subject.clone(), queue.to_owned()).await,
        None => client.subscribe(subject.clone()).await,
    };
    subscribed.map_err(|source| WorkerError::Subscribe { subject, source })
}

fn log_join(joined: Result<(), tokio::task::JoinError>) {
    if let Err(err) = joined
        && err.is_panic()
    {
        // Its journal entry stays `started`: the next start reports the call as interrupted.
        tracing::error!(%err, "a call's task panicked");
    }
}

/// The request loop's side: decides what to do with each message.
struct Worker {
    shared: Arc<Shared>,
    hello: Bytes,
}

/// What the call tasks share with the loop.
struct Shared {
    client: Client,
    subjects: Subjects,
    ws: String,
    relay: Relay,
    journal: Arc<Journal>,
    /// Calls running in this process, to reach them with a cancel.
    running: Mutex<HashMap<String, CancellationToken>>,
}

impl Worker {
    /// Takes one request. Runs on the loop, without awaiting anything slow, so requests are
    /// claimed in the order they arrive: of two copies of a request, the second always finds the
    /// first claimed.
    async fn take(&self, message: Message, tasks: &mut JoinSet<()>) {
        let shared = &self.shared;
        let header_id = message.headers.as_ref().and_then(|h| h.get(HEADER_CALL_ID)).map(|v| v.as_str().to_owned());
        let request = match serde_json::from_slice::<ToolRequest>(&message.payload) {
            Ok(request) => request,
            Err(err) => {
                tracing::warn!(call_id = ?header_id, %err, "unreadable tool request");
                if let Some(call_id) = header_id.filter(|id| is_token(id)) {
                    shared.ack(&message).await;
                    let text = format!("the relay could not read the tool request: {err}");
                    shared.publish_result(&ToolResult::error(call_id, text)).await;
                }
                return;
            }
        };
        if let Some(header_id) = header_id.filter(|id| *id != request.call_id) {
            tracing::warn!(%header_id, call_id = %request.call_id, "the request's call id header and body disagree");
            if is_token(&header_id) {
                shared.ack(&message).await;
                let text = format!(
                    "the tool request names call {} in its body but {header_id} in its {HEADER_CALL_ID} header",
                    request.call_id
                );
                shared.publish_result(&ToolResult::error(header_id, text)).await;
            }
            return;
        }
        if !is_token(&request.call_id) {
            // There is no subject to answer on; the orchestrator never sends such ids.
            tracing::warn!(call_id = %request.call_id, "refusing a call id that is not a subject token");
            return;
        }
        shared.ack(&message).await;

        let call_id = request.call_id.clone();
        match shared.journal.claim(&call_id) {
            Claim::Finished(result) => {
                tracing::info!(%call_id, "repeated request for a finished call; publishing its recorded result");
                shared.publish_result(&result).await;
            }
            Claim::Running => tracing::info!(%call_id, "repeated request for a running call; its result will follow"),
            Claim::New => {
                let cancelled = CancellationToken::new();
                shared.running().insert(call_id.clone(), cancelled.clone());
                tracing::debug!(%call_id, tool = %request.name, chat_id = %request.chat_id, "call taken");
                tasks.spawn(Arc::clone(shared).run_call(request, cancelled));
            }
        }
    }

    /// Waits until every call has ended (`true`) or `deadline` has passed, still obeying cancels.
    async fn wait_for_calls(
        &self,
        tasks: &mut JoinSet<()>,
        cancels: &mut Subscriber,
        deadline: tokio::time::Instant,
    ) -> bool {
        let mut listening = true;
        loop {
            tokio::select! {
                joined = tasks.join_next() => match joined {
                    Some(joined) => log_join(joined),
                    None => return true,
                },
                message = cancels.next(), if listening => match message {
                    Some(message) => self.cancel(&message),
                    None => listening = false,
                },
                () = tokio::time::sleep_until(deadline) => return false,
            }
        }
    }

    fn cancel(&self, message: &Message) {
        let Ok(call_id) = std::str::from_utf8(&message.payload).map(str::trim) else {
            tracing::warn!("ignoring a cancel whose call id is not UTF-8");
            return;
        };
        match self.shared.running().get(call_id) {
            Some(cancelled) => {
                tracing::info!(call_id, "cancelling a running call");
                cancelled.cancel();
            }
            None => tracing::debug!(call_id, "cancel for a call not running here"),
        }
    }

    async fn hello(&self) {
        // Hellos queued while disconnected would all arrive late at once and say nothing.
        if self.shared.client.connection_state() != async_nats::connection::State::Connected {
            return;
        }
        if let Err(err) =
            self.shared.client.publish(self.shared.subjects.hello(&self.shared.ws), self.hello.clone()).await
        {
            tracing::warn!(%err, "publishing hello failed");
        }
    }
}

impl Shared {
    /// One call, from its `started` record to its published result.
    async fn run_call(self: Arc<Self>, request: ToolRequest, cancelled: CancellationToken) {
        let call_id = request.call_id.clone();
        let _running = RunningGuard { shared: &self, call_id: &call_id };
        if let Some(tool) = Relay::file_tool(&request) {
            // Its journal lines and the tool in one trip to a blocking thread. A file tool takes
            // moments and is not cancelled: what it did is what the result says.
            let shared = Arc::clone(&self);
            let result =
                tokio::task::spawn_blocking(move || shared.run_file_call(&request, tool)).await.unwrap_or_else(|_| {
                    // The tool's own panics are caught on the thread; this is the journal's, which
                    // would otherwise leave the call claimed and its repeats unanswered.
                    tracing::error!(%call_id, "the relay panicked while running a call");
                    self.journal.abandon(&call_id);
                    ToolResult::error(&call_id, PANICKED)
                });
            self.publish_result(&result).await;
            return;
        }

        // A read that runs again after a restart does no harm: only calls with effects wait for
        // their `started` line to be durable.
        let durable = Relay::has_effects(&request.name);
        if durable {
            let shared = Arc::clone(&self);
            let id = call_id.clone();
            let started = tokio::task::spawn_blocking(move || shared.record_started(&id)).await.unwrap_or_else(|err| {
                self.journal.abandon(&call_id);
                Err(ToolResult::error(&call_id, format!("{NOT_RECORDED}: {err}")))
            });
            if let Err(refusal) = started {
                self.publish_result(&refusal).await;
                return;
            }
        }

        let (pieces_tx, pieces) = mpsc::unbounded_channel();
        let forwarding =
            tokio::spawn(forward_output(self.client.clone(), self.subjects.output(&self.ws, &call_id), pieces));
        // A panic would leave the call claimed as running, and its repeats unanswered, for the
        // rest of this process: end it like a crash ends it.
        let result = match AssertUnwindSafe(self.execute(&request, pieces_tx, &cancelled)).catch_unwind().await {
            Ok(result) => result,
            Err(_) => {
                tracing::error!(%call_id, tool = %request.name, "the tool panicked");
                ToolResult::error(&call_id, PANICKED)
            }
        };
        // Every piece is handed to the client before the result, so they reach the server first.
        let _ = forwarding.await;

        let result = fit_payload(result, self.client.server_info().max_payload);
        if durable {
            // A durable line waits for an fsync: off the async thread.
            let (shared, recorded, name) = (Arc::clone(&self), result.clone(), request.name.clone());
            if let Err(err) = tokio::task::spawn_blocking(move || shared.record_finished(&name, true, &recorded)).await
            {
                tracing::error!(%call_id, %err, "recording the call's result panicked");
            }
        } else {
            self.record_finished(&request.name, false, &result);
        }
        self.publish_result(&result).await;
    }

    /// A file tool's call on a blocking thread: its `started` line when it has effects, the
    /// tool, and its `finished` line.
    fn run_file_call(&self, request: &ToolRequest, tool: FileToolCall) -> ToolResult {
        let durable = Relay::has_effects(&request.name);
        if durable && let Err(refusal) = self.record_started(&request.call_id) {
            return refusal;
        }
        let result = match std::panic::catch_unwind(AssertUnwindSafe(|| self.relay.run_file_tool(request, tool))) {
            Ok(result) => result,
            Err(_) => {
                tracing::error!(call_id = %request.call_id, tool = %request.name, "the tool panicked");
                ToolResult::error(&request.call_id, PANICKED)
            }
        };
        let result = fit_payload(result, self.client.server_info().max_payload);
        self.record_finished(&request.name, durable, &result);
        result
    }

    /// Durably records that the call is about to run; blocking. When that fails the call must
    /// not run (after a crash, a repeat could run it a second time): the error is the result to
    /// publish, and the call is no longer claimed.
    fn record_started(&self, call_id: &str) -> Result<(), ToolResult> {
        self.journal.record_started(call_id).map_err(|err| {
            tracing::error!(%call_id, %err, "cannot record the call in the journal; not running it");
            self.journal.abandon(call_id);
            ToolResult::error(call_id, format!("{NOT_RECORDED}: {err}"))
        })
    }

    /// Records how the call ended: durably (blocking) when it has effects, otherwise in memory.
    fn record_finished(&self, tool: &str, durable: bool, result: &ToolResult) {
        if !durable {
            self.journal.remember_finished(result);
        } else if let Err(err) = self.journal.record_finished(result) {
            tracing::error!(call_id = %result.call_id, %err, "cannot record the call's result in the journal");
        }
        tracing::info!(call_id = %result.call_id, tool, is_error = result.is_error, "call finished");
    }

    /// Runs the tool. A cancel asks the relay to stop it, again every [`CANCEL_RETRY`] — a cancel
    /// can come before the command has started — and, if it has not ended within
    /// [`CANCEL_GRACE`], drops it, which kills whatever it runs.
    async fn execute(
        &self,
        request: &ToolRequest,
        pieces: mpsc::UnboundedSender<String>,
        cancelled: &CancellationToken,
    ) -> ToolResult {
        let call = self.relay.handle(request, Some(pieces));
        tokio::pin!(call);
        tokio::select! {
            result = &mut call => return result,
            () = cancelled.cancelled() => {}
        }
        let give_up = tokio::time::Instant::now() + CANCEL_GRACE;
        loop {
            self.relay.cancel(&request.call_id);
            let retry = (tokio::time::Instant::now() + CANCEL_RETRY).min(give_up);
            match tokio::time::timeout_at(retry, &mut call).await {
                Ok(result) => return result,
                Err(_) if retry < give_up => {}
                Err(_) => {
                    return ToolResult::error(&request.call_id, "interrupted: the call was cancelled and stopped");
                }
            }
        }
    }

    async fn ack(&self, message: &Message) {
        let Some(reply) = &message.reply else { return };
        if let Err(err) = self.client.publish(reply.clone(), Bytes::from_static(ACK)).await {
            tracing::warn!(%err, "acknowledging a request failed");
        }
    }

    async fn publish_result(&self, result: &ToolResult) {
        let payload = match serde_json::to_vec(result) {
            Ok(payload) => Bytes::from(payload),
            Err(err) => {
                tracing::error!(call_id = %result.call_id, %err, "cannot serialize a result");
                return;
            }
        };
        let mut headers = HeaderMap::new();
        headers.insert(async_nats::header::NATS_MESSAGE_ID, result.call_id.as_str());
        headers.insert(HEADER_CALL_ID, result.call_id.as_str());
        let subject = self.subjects.result(&self.ws, &result.call_id);
        if let Err(err) = self.client.publish_with_headers(subject, headers, payload).await {
            // The journal keeps it; a repeated request publishes it again.
            tracing::warn!(call_id = %result.call_id, %err, "publishing a result failed");
        }
    }

    fn running(&self) -> std::sync::MutexGuard<'_, HashMap<String, CancellationToken>> {
        self.running.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn cancel_all(&self) {
        for cancelled in self.running().values() {
            cancelled.cancel();
        }
    }
}

/// Removes a call from [`Shared::running`] however its task ends.
struct RunningGuard<'a> {
    shared: &'a Shared,
    call_id: &'a str,
}

impl Drop for RunningGuard<'_> {
    fn drop(&mut self) {
        self.shared.running().remove(self.call_id);
    }
}

async fn forward_output(client: Client, subject: String, mut pieces: mpsc::UnboundedReceiver<String>) {
    while let Some(piece) = pieces.recv().await {
        if let Err(err) = client.publish(subject.clone(), Bytes::from(piece)).await {
            // Output pieces are ephemeral; the result carries the output too.
            tracing::debug!(%subject, %err, "publishing output failed");
        }
    }
}

/// Shortens a result whose JSON would not fit in one NATS message (a huge `read_file`), keeping
/// the head of its output and saying so: a result that cannot be published is worse.
fn fit_payload(mut result: ToolResult, max_payload: usize) -> ToolResult {
    if max_payload == 0 {
        return result;
    }
    let limit = max_payload.saturating_sub(PAYLOAD_HEADROOM).max(PAYLOAD_HEADROOM);
    for _ in 0..4 {
        let size = serde_json::to_vec(&result).map(|json| json.len()).unwrap_or(0);
        if size <= limit {
            return result;
        }
        let original = result.output.len();
        let mut keep = original.saturating_sub(size - limit + 200);
        while !result.output.is_char_boundary(keep) {
            keep -= 1;
        }
        result.output.truncate(keep);
        result.output.push_str(&format!(
            "\n[… result truncated: {} more bytes did not fit in one NATS message]",
            original - keep
        ));
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> WorkerSettings {
        WorkerSettings {
            nats_url: "nats://127.0.0.1:4222".into(),
            workspace_id: "ws-1".into(),
            credentials: None,
            root: "/nonexistent/root".into(),
            state_dir: "/nonexistent/state".into(),
            prefix: "ap".into(),
            limits: ToolLimits::default(),
            journal: JournalLimits::default(),
            shutdown_grace: Duration::from_secs(1),
        }
    }

    #[test]
    fn validation_names_the_setting() {
        assert!(settings().validate().is_ok());
        let bad_ws = WorkerSettings { workspace_id: "a.b".into(), ..settings() };
        assert!(bad_ws.validate().is_err_and(|e| e.to_string().starts_with("invalid workspace id")));
        let bad_prefix = WorkerSettings { prefix: "ap.".into(), ..settings() };
        assert!(bad_prefix.validate().is_err_and(|e| e.to_string().starts_with("invalid subject prefix")));
        assert!(WorkerSettings { prefix: "prod.ap".into(), ..settings() }.validate().is_ok());
    }

    #[test]
    fn credentials_text_is_not_printed() {
        let shown = format!("{:?}", Credentials::Text("-----BEGIN USER NKEY SEED-----".into()));
        assert!(!shown.contains("SEED"), "{shown}");
    }

    #[tokio::test]
    async fn the_state_dir_may_not_be_inside_the_root() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let root = tmp.path().join("root");
        let settings = WorkerSettings { root: root.clone(), state_dir: root.join(".state"), ..settings() };
        let relay = Relay::new(&root, ToolLimits::default()).expect("relay");
        let Err(err) = open_journal(&settings, &relay).await else { panic!("accepted a state dir in the root") };
        assert!(err.to_string().contains("is inside the workspace root"), "{err}");
    }

    /// A file tool whose `started` line cannot be made durable does not run: its result says
    /// so, and the call is no longer claimed, so a repeat runs it once the journal works again.
    #[tokio::test]
    async fn a_file_tool_the_journal_cannot_record_does_not_run() {
        let nats = agentplane_tests::NatsServer::start();
        let tmp = tempfile::tempdir().expect("tempdir");
        let root = tmp.path().join("root");
        let settings = WorkerSettings { root: root.clone(), state_dir: tmp.path().join("state"), ..settings() };
        let relay = Relay::new(&root, ToolLimits::default()).expect("relay");
        let (journal, _) = open_journal(&settings, &relay).await.expect("journal");
        let shared = Arc::new(Shared {
            client: async_nats::connect(nats.url()).await.expect("connect"),
            subjects: Subjects::new(&settings.prefix),
            ws: settings.workspace_id.clone(),
            relay,
            journal: Arc::new(journal),
            running: Mutex::default(),
        });
        let run = |shared: &Arc<Shared>, request: &ToolRequest| {
            let (shared, request) = (Arc::clone(shared), request.clone());
            let tool = Relay::file_tool(&request).expect("a file tool");
            tokio::task::spawn_blocking(move || shared.run_file_call(&request, tool))
        };
        let request = ToolRequest {
            call_id: "call-1".into(),
            chat_id: "chat".into(),
            user_id: "user".into(),
            name: "write_file".into(),
            args: serde_json::json!({"path": "a.txt", "content": "x"}),
        };
        assert!(matches!(shared.journal.claim("call-1"), Claim::New));
        shared.journal.fail_next_sync();
        let refused = run(&shared, &request).await.expect("join");
        assert!(refused.is_error && refused.output.starts_with(NOT_RECORDED), "{}", refused.output);
        assert!(!root.join("a.txt").exists(), "the tool ran");

        assert!(matches!(shared.journal.claim("call-1"), Claim::New), "the call stayed claimed");
        let ran = run(&shared, &request).await.expect("join");
        assert!(!ran.is_error, "{}", ran.output);
        assert_eq!(std::fs::read_to_string(root.join("a.txt")).expect("written"), "x");
        assert!(matches!(shared.journal.claim("call-1"), Claim::Finished(_)));
    }

    #[test]
    fn oversized_results_are_cut_to_fit() {
        let result = ToolResult::ok("c", "€".repeat(10_000));
        let fitted = fit_payload(result, 8 * 1024);
        let size = serde_json::to_vec(&fitted).expect("json").len();
        assert!(size <= 8 * 1024 - PAYLOAD_HEADROOM, "{size}");
        assert!(fitted.output.ends_with("did not fit in one NATS message]"), "{}", fitted.output);
        let small = ToolResult::ok("c", "small");
        assert_eq!(fit_payload(small.clone(), 8 * 1024), small);
    }
}
