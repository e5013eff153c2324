//! A scripted OpenAI-compatible LLM server.
//!
//! [`ScriptedLlm::start`] binds `127.0.0.1:0` and serves `POST /v1/chat/completions` and
//! `GET /v1/models` from a thread with its own Tokio runtime, so it works under `#[tokio::test]`,
//! `#[actix::test]` and benchmarks alike, and stops when dropped. Each completion request takes
//! the next [`Reply`] from a FIFO ([`ScriptedLlm::push`]); when the FIFO is empty the responder
//! given to [`ScriptedLlm::with_responder`] decides, and without one the answer is the text `ok`.
//!
//! Streams are laid out exactly like OpenAI's: a role chunk, text (and reasoning) in pieces of
//! `chunk_chars` characters, each tool call named in its first delta with the arguments following
//! in pieces, a final chunk with `finish_reason`, a usage chunk with `"choices": []` when the
//! request asked for `stream_options.include_usage`, then `data: [DONE]`. Faults are part of the
//! script: HTTP errors with headers, delays, hanging until the client leaves, resets mid-stream.
//!
//! Every completion request is recorded ([`ScriptedLlm::requests`]) and can be awaited
//! ([`ScriptedLlm::wait_for_requests`]) without polling. Benchmarks can also have the time of
//! every streamed write logged ([`ScriptedLlmBuilder::write_log`]), and render a reply's whole
//! body in any dialect without a server ([`render_body`]).

mod dialect;
mod http;
mod reply;
#[cfg(test)]
mod tests;

use std::borrow::Cow;
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::ops::Deref;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};

pub use self::dialect::Dialect;
use self::http::{Connection, LAST_CHUNK, Request, fixed_response, push_chunk, stream_head};
use self::reply::{RenderContext, ReplyBody};
pub use self::reply::{Reply, ScriptedCall, Usage};
use crate::error::{Error, Result};

/// Characters per streamed piece unless the builder or the reply says otherwise: about a token,
/// so even short answers arrive in several pieces.
pub const DEFAULT_CHUNK_CHARS: usize = 4;
/// Worker threads of the server's runtime unless the builder says otherwise.
pub const DEFAULT_WORKERS: usize = 2;
/// How long dropping the server waits for its runtime to wind down.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

type Responder = Arc<dyn Fn(&RecordedRequest) -> Reply + Send + Sync>;

/// A completion request as the server received it.
#[derive(Debug, Clone)]
pub struct RecordedRequest {
    pub method: String,
    /// Without the query string.
    pub path: String,
    /// The query string after `?` (Azure's `api-version`), when there is one.
    pub query: Option<String>,
    /// Header names are lower-case.
    pub headers: Vec<(String, String)>,
    /// The JSON body: read it as a [`Value`]; [`JsonBody::raw`] holds the bytes as they arrived
    /// (what a request signature covers).
    pub body: JsonBody,
    /// The request's place in arrival order (once its body was read), counted from 0: the
    /// `request` of its [`Written`] entries. [`ScriptedLlm::requests`] holds the requests in the
    /// order their replies were chosen, which is this order unless two arrived at once.
    pub index: usize,
}

/// A request's JSON body, turned into a [`Value`] the first time it is read as one. A benchmark's
/// responder that only looks at [`RecordedRequest::message_heads`] never pays for that: with a
/// long history it cost the scripted model more CPU than the server under test spent on the step.
#[derive(Clone)]
pub struct JsonBody {
    raw: Vec<u8>,
    value: OnceLock<Value>,
}

impl JsonBody {
    /// The body and what the server reads of it, when `raw` is JSON; the history is only
    /// skipped over.
    fn read(raw: Vec<u8>) -> serde_json::Result<(Self, RequestHead)> {
        let head = match serde_json::from_slice::<RequestHead>(&raw) {
            Ok(head) => head,
            // JSON, but not an object of the expected shape.
            Err(_) => serde_json::from_slice::<serde::de::IgnoredAny>(&raw).map(|_| RequestHead::default())?,
        };
        Ok((JsonBody { raw, value: OnceLock::new() }, head))
    }

    /// The bytes as they arrived.
    pub fn raw(&self) -> &[u8] {
        &self.raw
    }
}

impl Deref for JsonBody {
    type Target = Value;

    fn deref(&self) -> &Value {
        // `read` checked the bytes are JSON.
        self.value.get_or_init(|| serde_json::from_slice(&self.raw).unwrap_or(Value::Null))
    }
}

impl std::fmt::Debug for JsonBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(&**self, f)
    }
}

impl std::fmt::Display for JsonBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(&**self, f)
    }
}

impl serde::Serialize for JsonBody {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        Value::serialize(self, serializer)
    }
}

/// What the server reads of every request before it answers; the rest of the body (the
/// history) is skipped over, not built.
#[derive(Deserialize, Default)]
struct RequestHead {
    model: Option<Value>,
    stream: Option<Value>,
    stream_options: Option<Value>,
    #[serde(rename = "toolConfig")]
    tool_config: Option<Value>,
}

/// A message of the `messages` array with its role and its content left as JSON text.
#[derive(Debug, Deserialize)]
pub struct MessageHead<'a> {
    #[serde(borrow, default)]
    pub role: Cow<'a, str>,
    #[serde(borrow, default)]
    pub content: Option<&'a RawValue>,
}

impl MessageHead<'_> {
    /// The content when it is a plain string.
    pub fn content_str(&self) -> Option<Cow<'_, str>> {
        self.content.and_then(|c| serde_json::from_str::<Cow<'_, str>>(c.get()).ok())
    }
}

impl RecordedRequest {
    /// Each message's role and content, read from the bytes without building the body: for
    /// responders that run at a benchmark's rate. Empty when there is no `messages` array, or
    /// one of its messages is not an object with a string `role`.
    pub fn message_heads(&self) -> Vec<MessageHead<'_>> {
        #[derive(Deserialize)]
        struct Messages<'a> {
            #[serde(borrow, default)]
            messages: Vec<MessageHead<'a>>,
        }
        serde_json::from_slice::<Messages<'_>>(self.body.raw()).map(|m| m.messages).unwrap_or_default()
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers.iter().find(|(n, _)| *n == name).map(|(_, v)| v.as_str())
    }

    pub fn model(&self) -> Option<&str> {
        self.body.get("model").and_then(Value::as_str)
    }

    pub fn is_stream(&self) -> bool {
        self.body.get("stream").and_then(Value::as_bool).unwrap_or(false)
    }

    /// The `messages` array (empty when absent).
    pub fn messages(&self) -> &[Value] {
        self.body.get("messages").and_then(Value::as_array).map(Vec::as_slice).unwrap_or_default()
    }

    /// Names of the tools offered to the model.
    pub fn tool_names(&self) -> Vec<String> {
        self.body
            .get("tools")
            .and_then(Value::as_array)
            .map(|tools| {
                tools
                    .iter()
                    .filter_map(|t| t.pointer("/function/name").and_then(Value::as_str))
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The text of the system message(s).
    pub fn system_prompt(&self) -> Option<String> {
        let texts: Vec<String> = self
            .messages()
            .iter()
            .filter(|m| matches!(m.get("role").and_then(Value::as_str), Some("system" | "developer")))
            .map(content_text)
            .collect();
        (!texts.is_empty()).then(|| texts.join("\n"))
    }

    /// The text of the last `user` message; content may be a string or an array of parts.
    pub fn last_user_text(&self) -> Option<String> {
        self.messages().iter().rev().find(|m| m.get("role").and_then(Value::as_str) == Some("user")).map(content_text)
    }

    /// How many `tool` messages (tool results) the conversation holds.
    pub fn tool_result_count(&self) -> usize {
        self.messages().iter().filter(|m| m.get("role").and_then(Value::as_str) == Some("tool")).count()
    }

    /// The content of the tool results, in order.
    pub fn tool_results(&self) -> Vec<String> {
        self.messages()
            .iter()
            .filter(|m| m.get("role").and_then(Value::as_str) == Some("tool"))
            .map(content_text)
            .collect()
    }
}

fn content_text(message: &Value) -> String {
    match message.get("content") {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(parts)) => parts
            .iter()
            .filter(|p| p.get("type").and_then(Value::as_str) == Some("text"))
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join(""),
        _ => String::new(),
    }
}

/// Options for [`ScriptedLlm`]; [`ScriptedLlm::start`] uses the defaults.
pub struct ScriptedLlmBuilder {
    responder: Option<Responder>,
    chunk_chars: usize,
    workers: usize,
    record: bool,
    models: Vec<String>,
    dialect: Dialect,
    write_log: bool,
}

impl Default for ScriptedLlmBuilder {
    fn default() -> Self {
        ScriptedLlmBuilder {
            responder: None,
            chunk_chars: DEFAULT_CHUNK_CHARS,
            workers: DEFAULT_WORKERS,
            record: true,
            models: vec!["scripted-model".to_string()],
            dialect: Dialect::OpenAiChat,
            write_log: false,
        }
    }
}

impl ScriptedLlmBuilder {
    /// Decides the reply when the FIFO is empty.
    pub fn responder(mut self, f: impl Fn(&RecordedRequest) -> Reply + Send + Sync + 'static) -> Self {
        self.responder = Some(Arc::new(f));
        self
    }

    /// Characters per streamed piece for replies that do not set their own.
    pub fn chunk_chars(mut self, n: usize) -> Self {
        self.chunk_chars = n.max(1);
        self
    }

    /// Worker threads of the server runtime (benchmarks with many streams want more).
    pub fn workers(mut self, n: usize) -> Self {
        self.workers = n.max(1);
        self
    }

    /// Keep request bodies for [`ScriptedLlm::requests`] (default on). Long benchmarks turn it
    /// off so memory stays flat; counting and waiting still work.
    pub fn record(mut self, on: bool) -> Self {
        self.record = on;
        self
    }

    /// Model ids listed by `GET /v1/models`.
    pub fn models<S: Into<String>>(mut self, ids: impl IntoIterator<Item = S>) -> Self {
        self.models = ids.into_iter().map(Into::into).collect();
        self
    }

    /// The wire format the server speaks (default OpenAI Chat Completions). The same scripted
    /// replies are rendered in that provider's exact stream layout.
    pub fn dialect(mut self, dialect: Dialect) -> Self {
        self.dialect = dialect;
        self
    }

    /// Log when each streamed write went out ([`ScriptedLlm::write_times`]; default off), for
    /// latency benchmarks that compare it with when the client saw the piece.
    pub fn write_log(mut self, on: bool) -> Self {
        self.write_log = on;
        self
    }

    /// Binds `127.0.0.1:0` and starts serving.
    ///
    /// # Panics
    /// When the port cannot be bound or the runtime cannot be built: nothing useful can be
    /// tested then.
    pub fn start(self) -> ScriptedLlm {
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0").expect("scripted LLM: cannot bind 127.0.0.1:0");
        let addr = std_listener.local_addr().expect("scripted LLM: no local address");
        std_listener.set_nonblocking(true).expect("scripted LLM: cannot make the listener non-blocking");
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(self.workers)
            .thread_name("scripted-llm")
            .enable_all()
            .build()
            .expect("scripted LLM: cannot build its runtime");
        let shared = Arc::new(Shared {
            script: Mutex::new(VecDeque::new()),
            responder: self.responder,
            record: self.record,
            requests: Mutex::new(Vec::new()),
            next_index: AtomicUsize::new(0),
            request_count: watch::Sender::new(0),
            active: watch::Sender::new(0),
            cancelled: AtomicUsize::new(0),
            next_call: AtomicU64::new(1),
            next_completion: AtomicU64::new(1),
            chunk_chars: self.chunk_chars,
            models: self.models,
            dialect: self.dialect,
            write_log: self.write_log.then(|| Mutex::new(Vec::new())),
        });
        let (stop_tx, stop_rx) = oneshot::channel();
        let server_shared = shared.clone();
        let thread = std::thread::Builder::new()
            .name(format!("scripted-llm-{}", addr.port()))
            .spawn(move || {
                runtime.block_on(accept_loop(std_listener, server_shared, stop_rx));
                // Dropping the runtime aborts every connection task, hanging ones included.
                runtime.shutdown_timeout(SHUTDOWN_GRACE);
            })
            .expect("scripted LLM: cannot spawn its thread");
        ScriptedLlm { addr, shared, stop: Some(stop_tx), thread: Some(thread) }
    }
}

struct Shared {
    dialect: Dialect,
    script: Mutex<VecDeque<Reply>>,
    responder: Option<Responder>,
    record: bool,
    requests: Mutex<Vec<RecordedRequest>>,
    /// The next request's [`RecordedRequest::index`].
    next_index: AtomicUsize,
    request_count: watch::Sender<usize>,
    /// Completion replies being served right now.
    active: watch::Sender<usize>,
    /// Replies cut short because the client went away.
    cancelled: AtomicUsize,
    next_call: AtomicU64,
    next_completion: AtomicU64,
    chunk_chars: usize,
    models: Vec<String>,
    /// With [`ScriptedLlmBuilder::write_log`].
    write_log: Option<Mutex<Vec<Written>>>,
}

/// One write of a streamed reply, logged with [`ScriptedLlmBuilder::write_log`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Written {
    /// The completion request's [`RecordedRequest::index`].
    pub request: usize,
    /// The last stream message the write carried, counted from 0 in the order the dialect
    /// renders them (for OpenAI Chat the role chunk is message 0). With a
    /// [`Reply::chunk_delay`] every message has its own write; without one the whole answer goes
    /// out in a single write, logged with the last message's index.
    pub message: usize,
    /// When the write returned, i.e. the bytes were in the socket's send buffer.
    pub at: Instant,
}

impl Shared {
    fn log_write(&self, request: usize, message: usize) {
        if let Some(log) = &self.write_log {
            let at = Instant::now();
            log.lock().unwrap_or_else(PoisonError::into_inner).push(Written { request, message, at });
        }
    }

    fn next_reply(&self, req: &RecordedRequest) -> Reply {
        if let Some(reply) = self.script.lock().unwrap_or_else(PoisonError::into_inner).pop_front() {
            return reply;
        }
        match &self.responder {
            // A panicking responder becomes a 500 the test can read, not a silently dropped
            // connection that looks like a network fault.
            Some(f) => std::panic::catch_unwind(AssertUnwindSafe(|| f(req))).unwrap_or_else(|panic| {
                let msg = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                Reply::error(500, json!({"error": {"message": format!("scripted responder panicked: {msg}"), "type": "server_error"}}))
            }),
            None => Reply::default(),
        }
    }
}

/// Decrements the active-reply count however the reply ends (finished, cancelled, aborted at
/// shutdown).
struct ActiveGuard<'a>(&'a watch::Sender<usize>);

impl<'a> ActiveGuard<'a> {
    fn new(active: &'a watch::Sender<usize>) -> Self {
        active.send_modify(|n| *n += 1);
        ActiveGuard(active)
    }
}

impl Drop for ActiveGuard<'_> {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n = n.saturating_sub(1));
    }
}

/// The running server. Dropping it stops the server and closes every connection.
pub struct ScriptedLlm {
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for ScriptedLlm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScriptedLlm").field("addr", &self.addr).finish_non_exhaustive()
    }
}

impl ScriptedLlm {
    /// A server with default options: FIFO script, then `ok`.
    pub fn start() -> Self {
        Self::builder().start()
    }

    /// A server whose replies (once the FIFO is empty) depend on the request.
    pub fn with_responder(f: impl Fn(&RecordedRequest) -> Reply + Send + Sync + 'static) -> Self {
        Self::builder().responder(f).start()
    }

    pub fn builder() -> ScriptedLlmBuilder {
        ScriptedLlmBuilder::default()
    }

    /// `http://127.0.0.1:PORT/v1`, the base URL an OpenAI-compatible provider is configured with.
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Appends a reply to the FIFO; each completion request consumes one.
    pub fn push(&self, reply: Reply) {
        self.shared.script.lock().unwrap_or_else(PoisonError::into_inner).push_back(reply);
    }

    pub fn push_all(&self, replies: impl IntoIterator<Item = Reply>) {
        self.shared.script.lock().unwrap_or_else(PoisonError::into_inner).extend(replies);
    }

    /// Scripted replies not consumed yet.
    pub fn pending(&self) -> usize {
        self.shared.script.lock().unwrap_or_else(PoisonError::into_inner).len()
    }

    /// Every completion request so far, in arrival order (empty with `record(false)`).
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.shared.requests.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Completion requests received so far (counted even with `record(false)`).
    pub fn request_count(&self) -> usize {
        *self.shared.request_count.borrow()
    }

    /// Waits until at least `n` completion requests have arrived, then returns the recorded ones.
    pub async fn wait_for_requests(&self, n: usize, timeout: Duration) -> Result<Vec<RecordedRequest>> {
        let mut rx = self.shared.request_count.subscribe();
        // The count's guard is dropped before `requests` takes its lock: a completion counts
        // while holding that lock, and would wait for the guard.
        let counted = tokio::time::timeout(timeout, rx.wait_for(|count| *count >= n)).await.map(|r| r.map(|_| ()));
        match counted {
            Ok(Ok(())) => Ok(self.requests()),
            // The sender lives in `self`, so the channel cannot close while we wait.
            Ok(Err(_)) => Err(Error::Setup("scripted LLM stopped".into())),
            Err(_) => {
                Err(Error::Timeout { after: timeout, what: format!("{n} LLM requests (got {})", self.request_count()) })
            }
        }
    }

    /// Every streamed write so far, in the order they happened (empty without
    /// [`ScriptedLlmBuilder::write_log`]).
    pub fn write_times(&self) -> Vec<Written> {
        self.shared
            .write_log
            .as_ref()
            .map(|log| log.lock().unwrap_or_else(PoisonError::into_inner).clone())
            .unwrap_or_default()
    }

    /// Completion replies being served right now (hanging ones included).
    pub fn active_replies(&self) -> usize {
        *self.shared.active.borrow()
    }

    /// Replies that ended because the client disconnected before they were complete.
    pub fn cancelled_replies(&self) -> usize {
        self.shared.cancelled.load(Ordering::SeqCst)
    }

    /// Waits until no reply is being served, e.g. until an interrupted turn has dropped its
    /// hanging stream.
    pub async fn wait_until_idle(&self, timeout: Duration) -> Result<()> {
        let mut rx = self.shared.active.subscribe();
        match tokio::time::timeout(timeout, rx.wait_for(|n| *n == 0)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(_)) => Err(Error::Setup("scripted LLM stopped".into())),
            Err(_) => Err(Error::Timeout {
                after: timeout,
                what: format!("the scripted LLM to be idle ({} replies active)", self.active_replies()),
            }),
        }
    }
}

impl Drop for ScriptedLlm {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

async fn accept_loop(std_listener: std::net::TcpListener, shared: Arc<Shared>, mut stop: oneshot::Receiver<()>) {
    let listener = match TcpListener::from_std(std_listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "scripted LLM: cannot register its listener");
            return;
        }
    };
    loop {
        tokio::select! {
            _ = &mut stop => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    tokio::spawn(serve_connection(shared.clone(), Connection::new(stream)));
                }
                // Running out of file descriptors under load is transient; keep accepting.
                Err(e) => {
                    tracing::warn!(error = %e, "scripted LLM: accept failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            },
        }
    }
}

async fn serve_connection(shared: Arc<Shared>, mut conn: Connection) {
    loop {
        let req = match conn.read_request().await {
            Ok(Some(req)) => req,
            Ok(None) => return,
            Err(e) => {
                if e.kind() != std::io::ErrorKind::UnexpectedEof {
                    let body = openai_error(&format!("bad request: {e}"), "invalid_request_error");
                    let _ = conn.write(&fixed_response(400, "application/json", &[], &body, false)).await;
                }
                return;
            }
        };
        let keep_alive = req.keep_alive;
        let keep_open = match (req.method.as_str(), req.path.as_str()) {
            ("POST", path) if shared.dialect.serves(path) => serve_completion(&shared, &mut conn, req).await,
            ("GET", "/v1/models") => {
                let data: Vec<Value> = shared
                    .models
                    .iter()
                    .map(|id| json!({"id": id, "object": "model", "created": 0, "owned_by": "agentplane-tests"}))
                    .collect();
                let body = json!({"object": "list", "data": data}).to_string();
                conn.write(&fixed_response(200, "application/json", &[], body.as_bytes(), keep_alive)).await.is_ok()
            }
            (method, path) => {
                let body = openai_error(&format!("no route {method} {path}"), "invalid_request_error");
                conn.write(&fixed_response(404, "application/json", &[], &body, keep_alive)).await.is_ok()
            }
        };
        if !(keep_open && keep_alive) {
            return;
        }
    }
}

fn openai_error(message: &str, kind: &str) -> Vec<u8> {
    json!({"error": {"message": message, "type": kind, "param": null, "code": null}}).to_string().into_bytes()
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or_default()
}

/// Serves one completion; `false` when the connection must close afterwards.
async fn serve_completion(shared: &Shared, conn: &mut Connection, req: Request) -> bool {
    let (body, head) = match JsonBody::read(req.body) {
        Ok(read) => read,
        Err(e) => {
            let body = openai_error(&format!("request body is not JSON: {e}"), "invalid_request_error");
            return conn.write(&fixed_response(400, "application/json", &[], &body, req.keep_alive)).await.is_ok();
        }
    };
    let request_bytes = body.raw().len();
    let mut recorded =
        RecordedRequest { method: req.method, path: req.path, query: req.query, headers: req.headers, body, index: 0 };
    let stream = shared.dialect.is_stream(&recorded.path, head.stream.as_ref().and_then(Value::as_bool));
    let model = head.model.as_ref().and_then(Value::as_str).unwrap_or("scripted-model").to_string();
    tracing::debug!(model, stream, "scripted LLM request");
    let _active = ActiveGuard::new(&shared.active);
    let include_usage =
        head.stream_options.and_then(|o| o.get("include_usage").and_then(Value::as_bool)).unwrap_or(false);
    let stream_function_call_arguments = head
        .tool_config
        .and_then(|c| c.pointer("/functionCallingConfig/streamFunctionCallArguments").and_then(Value::as_bool))
        .unwrap_or(false);
    // The responder runs outside any lock (a test's may block until it is told to answer), and
    // learns the index its writes will be logged under.
    let request_index = shared.next_index.fetch_add(1, Ordering::SeqCst);
    recorded.index = request_index;
    let reply = shared.next_reply(&recorded);
    // Counted under the lock, so whoever sees the count sees the request recorded.
    {
        let mut requests = shared.requests.lock().unwrap_or_else(PoisonError::into_inner);
        if shared.record {
            requests.push(recorded);
        }
        shared.request_count.send_modify(|n| *n += 1);
    }

    let cancelled = || {
        shared.cancelled.fetch_add(1, Ordering::SeqCst);
        false
    };
    if !conn.pause(reply.first_byte_delay).await {
        return cancelled();
    }
    let keep_alive = req.keep_alive;
    if let ReplyBody::Error { status, body } = &reply.body {
        let bytes = body.to_string();
        return conn
            .write(&fixed_response(*status, "application/json", &reply.headers, bytes.as_bytes(), keep_alive))
            .await
            .is_ok();
    }

    let id = format!("chatcmpl-scripted-{}", shared.next_completion.fetch_add(1, Ordering::Relaxed));
    let next_call_id = || format!("call_{}", shared.next_call.fetch_add(1, Ordering::Relaxed));
    let ctx = RenderContext {
        id: &id,
        created: unix_now(),
        model: &model,
        chunk_chars: reply.chunk_chars.unwrap_or(shared.chunk_chars),
        include_usage,
        stream_function_call_arguments,
        request_bytes,
        dialect: shared.dialect,
        next_call_id: &next_call_id,
    };

    if !stream {
        if reply.reset_after.is_some() {
            return false;
        }
        if reply.hang {
            conn.closed().await;
            return cancelled();
        }
        let bytes = reply.render_whole(&ctx).to_string();
        return conn
            .write(&fixed_response(200, "application/json", &reply.headers, bytes.as_bytes(), keep_alive))
            .await
            .is_ok();
    }

    let messages = reply.render_stream(&ctx);
    let cut = reply.reset_after.map(|n| n.min(messages.len()));
    let sent = cut.unwrap_or(messages.len());
    // Without a chunk delay the whole answer goes out in one write: benchmarks then measure the
    // orchestrator, not this server's syscalls.
    let mut out = stream_head(shared.dialect.content_type(), &reply.headers, keep_alive);
    for (i, msg) in messages[..sent].iter().enumerate() {
        if i > 0 && !reply.chunk_delay.is_zero() {
            if conn.write(&out).await.is_err() {
                return cancelled();
            }
            shared.log_write(request_index, i - 1);
            out.clear();
            if !conn.pause(reply.chunk_delay).await {
                return cancelled();
            }
        }
        push_chunk(&mut out, msg);
    }
    let last = sent.saturating_sub(1);
    if cut.is_some() {
        // Close without the last chunk: the client sees the body end early.
        if conn.write(&out).await.is_ok() {
            shared.log_write(request_index, last);
        }
        return false;
    }
    if reply.hang {
        if conn.write(&out).await.is_err() {
            return cancelled();
        }
        shared.log_write(request_index, last);
        conn.closed().await;
        return cancelled();
    }
    out.extend_from_slice(LAST_CHUNK);
    if conn.write(&out).await.is_err() {
        return cancelled();
    }
    shared.log_write(request_index, last);
    true
}

/// The whole body of a streamed answer with `reply` in `dialect`, as the server would send it
/// (without HTTP's chunked framing): for benchmarks of the provider clients' decoders. OpenAI
/// Chat ends with the usage chunk and `[DONE]`; Gemini streams function-call arguments in
/// pieces as Vertex does when asked to. `chunk_chars` applies unless the reply sets its own.
/// Error replies render an empty body; a hanging reply stops where it would hang.
pub fn render_body(dialect: Dialect, reply: &Reply, chunk_chars: usize) -> Vec<u8> {
    let calls = AtomicU64::new(1);
    let next_call_id = || format!("call_{}", calls.fetch_add(1, Ordering::Relaxed));
    let ctx = RenderContext {
        id: "chatcmpl-scripted-1",
        created: unix_now(),
        model: "scripted-model",
        chunk_chars: reply.chunk_chars.unwrap_or(chunk_chars.max(1)),
        include_usage: true,
        stream_function_call_arguments: true,
        request_bytes: 0,
        dialect,
        next_call_id: &next_call_id,
    };
    reply.render_stream(&ctx).concat()
}
