//! Provider clients against a local HTTP server: recorded provider streams replayed byte for
//! byte (split at awkward places), error statuses, resets and stalls, and the request bodies the
//! clients send.
//!
//! The server is a plain `TcpListener` speaking just enough HTTP/1.1, so the real reqwest client
//! and its timeouts are what is tested.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use agentplane_actors::ports::{
    ImageData, ModelClient, ModelError, ModelEvent, ModelRequest, ModelTarget, PromptMessage, StopReason, ToolSpec,
    Usage,
};
use agentplane_schema::api::{ChatErrorKind, ProviderType};
use agentplane_schema::message::{Part, Role};
use futures::StreamExt;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::Providers;

pub(super) const API_KEY: &str = "sk-test-0123456789abcdef";

pub(super) fn fixture(name: &str) -> Vec<u8> {
    let path = format!("{}/../tests/fixtures/providers/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read(&path).unwrap_or_else(|e| panic!("fixture {path}: {e}"))
}

// ---------------------------------------------------------------------------------------------
// Test server

/// One request as the server saw it.
#[derive(Debug, Clone)]
pub(super) struct Recorded {
    pub(super) method: String,
    pub(super) path: String,
    /// Names lower-cased.
    pub(super) headers: Vec<(String, String)>,
    pub(super) body: Vec<u8>,
}

impl Recorded {
    pub(super) fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }

    pub(super) fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("request body is JSON")
    }
}

/// The canned answer the server gives to every request.
#[derive(Debug, Clone)]
pub(super) struct Reply {
    pub(super) status: u16,
    pub(super) headers: Vec<(String, String)>,
    pub(super) parts: Vec<Vec<u8>>,
    /// Chunked transfer encoding (streams) instead of a content-length (error bodies).
    pub(super) chunked: bool,
    pub(super) pause: Duration,
    /// After the parts: close without ending the body (a reset mid-stream).
    pub(super) cut: bool,
    /// After the parts: send nothing more for a long time.
    pub(super) stall: bool,
}

impl Reply {
    pub(super) fn json(status: u16, body: &str) -> Self {
        Reply {
            status,
            headers: vec![("content-type".into(), "application/json".into())],
            parts: vec![body.as_bytes().to_vec()],
            chunked: false,
            pause: Duration::ZERO,
            cut: false,
            stall: false,
        }
    }

    /// An SSE body in pieces of `piece` bytes, which split lines, JSON and UTF-8 sequences.
    pub(super) fn sse(body: &[u8], piece: usize) -> Self {
        Reply {
            status: 200,
            headers: vec![("content-type".into(), "text/event-stream; charset=utf-8".into())],
            parts: body.chunks(piece).map(<[u8]>::to_vec).collect(),
            chunked: true,
            pause: Duration::ZERO,
            cut: false,
            stall: false,
        }
    }

    pub(super) fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }
}

pub(super) struct TestServer {
    pub(super) base_url: String,
    requests: Arc<Mutex<Vec<Recorded>>>,
}

impl TestServer {
    pub(super) async fn start(reply: Reply) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let requests = Arc::new(Mutex::new(Vec::new()));
        let recorded = requests.clone();
        tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                tokio::spawn(serve_one(socket, reply.clone(), recorded.clone()));
            }
        });
        // A trailing slash, as admins type it; the client must not double it.
        TestServer { base_url: format!("http://{addr}/v1/"), requests }
    }

    pub(super) fn requests(&self) -> Vec<Recorded> {
        self.requests.lock().expect("requests lock").clone()
    }
}

async fn serve_one(mut socket: TcpStream, reply: Reply, requests: Arc<Mutex<Vec<Recorded>>>) {
    let Ok(request) = read_request(&mut socket).await else {
        return;
    };
    requests.lock().expect("requests lock").push(request);
    let _ = write_reply(&mut socket, &reply).await;
}

pub(super) async fn read_request(socket: &mut TcpStream) -> std::io::Result<Recorded> {
    let mut buf = Vec::new();
    let mut tmp = [0u8; 8192];
    let head_end = loop {
        if let Some(pos) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break pos + 4;
        }
        let n = socket.read(&mut tmp).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&tmp[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let mut request_line = lines.next().unwrap_or_default().split(' ');
    let method = request_line.next().unwrap_or_default().to_owned();
    let path = request_line.next().unwrap_or_default().to_owned();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let length: usize =
        headers.iter().find(|(n, _)| n == "content-length").and_then(|(_, v)| v.parse().ok()).unwrap_or(0);
    while buf.len() < head_end + length {
        let n = socket.read(&mut tmp).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&tmp[..n]);
    }
    Ok(Recorded { method, path, headers, body: buf[head_end..head_end + length].to_vec() })
}

pub(super) async fn write_reply(socket: &mut TcpStream, reply: &Reply) -> std::io::Result<()> {
    let reason = reqwest::StatusCode::from_u16(reply.status).ok().and_then(|s| s.canonical_reason()).unwrap_or("X");
    let mut head = format!("HTTP/1.1 {} {reason}\r\n", reply.status);
    for (name, value) in &reply.headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    if reply.chunked {
        head.push_str("transfer-encoding: chunked\r\n");
    } else {
        head.push_str(&format!("content-length: {}\r\n", reply.parts.iter().map(Vec::len).sum::<usize>()));
    }
    head.push_str("connection: close\r\n\r\n");
    socket.write_all(head.as_bytes()).await?;
    for part in &reply.parts {
        if reply.chunked {
            socket.write_all(format!("{:x}\r\n", part.len()).as_bytes()).await?;
            socket.write_all(part).await?;
            socket.write_all(b"\r\n").await?;
        } else {
            socket.write_all(part).await?;
        }
        socket.flush().await?;
        if !reply.pause.is_zero() {
            tokio::time::sleep(reply.pause).await;
        }
    }
    if reply.cut {
        return Ok(());
    }
    if reply.stall {
        tokio::time::sleep(Duration::from_secs(30)).await;
    }
    if reply.chunked {
        socket.write_all(b"0\r\n\r\n").await?;
    }
    socket.shutdown().await
}

// ---------------------------------------------------------------------------------------------
// Helpers

pub(super) fn providers() -> Providers {
    Providers::new(Duration::from_secs(5), Duration::from_secs(5)).expect("client")
}

pub(super) fn target(base_url: &str) -> ModelTarget {
    ModelTarget {
        provider_type: ProviderType::OpenaiCompatible,
        base_url: base_url.to_owned(),
        api_key: Some(API_KEY.to_owned()),
        model: "gpt-4o".to_owned(),
        max_output_tokens: Some(1024),
        settings: json!({}),
    }
}

pub(super) fn simple_request(base_url: &str) -> ModelRequest {
    ModelRequest {
        target: target(base_url),
        system: "You are terse.".to_owned(),
        messages: vec![PromptMessage { role: Role::User, parts: vec![Part::text("What's the weather?")].into() }]
            .into(),
        tools: Vec::new().into(),
        images: Default::default(),
        memo: Default::default(),
    }
}

/// Every item of one answer stream.
pub(super) type Items = Vec<Result<ModelEvent, ModelError>>;

/// Serves `reply` and sends the request `build` makes for the server's base URL through the real
/// client; returns the stream's items (or the error before it) and the requests the server saw.
pub(super) async fn call(
    reply: Reply,
    build: impl FnOnce(&str) -> ModelRequest,
) -> (Result<Items, ModelError>, Vec<Recorded>) {
    let server = TestServer::start(reply).await;
    let result = match providers().stream(build(&server.base_url)).await {
        Ok(stream) => Ok(stream.collect().await),
        Err(error) => Err(error),
    };
    (result, server.requests())
}

/// Replays `reply` through the real client and returns every stream item.
pub(super) async fn run(reply: Reply) -> (Result<Items, ModelError>, Vec<Recorded>) {
    call(reply, simple_request).await
}

/// The events of a stream that must have no error item.
pub(super) fn all_ok(items: Items) -> Vec<ModelEvent> {
    items.into_iter().map(|item| item.expect("no error item")).collect()
}

/// Replays a fixture and returns its events, which must all be `Ok`.
async fn replay(name: &str) -> Vec<ModelEvent> {
    let (result, _) = run(Reply::sse(&fixture(name), 97)).await;
    let events: Vec<ModelEvent> =
        result.expect("stream opens").into_iter().map(|item| item.expect("no error item")).collect();
    check_shape(&events);
    events
}

/// Invariants of every answer: `Finish` once and last, each tool call started once with dense
/// indices, arguments only for started calls, no empty pieces.
pub(super) fn check_shape(events: &[ModelEvent]) {
    let finishes = events.iter().filter(|e| matches!(e, ModelEvent::Finish(_))).count();
    assert_eq!(finishes, 1, "one Finish: {events:?}");
    assert!(matches!(events.last(), Some(ModelEvent::Finish(_))), "Finish last: {events:?}");
    let mut started = 0;
    for event in events {
        match event {
            ModelEvent::ToolCallStart { index, .. } => {
                assert_eq!(*index, started, "dense start indices: {events:?}");
                started += 1;
            }
            ModelEvent::ToolCallArgs { index, piece } => {
                assert!(*index < started, "args after start: {events:?}");
                assert!(!piece.is_empty(), "no empty pieces: {events:?}");
            }
            ModelEvent::TextDelta(text) => assert!(!text.is_empty(), "no empty text: {events:?}"),
            _ => {}
        }
    }
}

#[derive(Debug, Default, PartialEq)]
pub(super) struct Answer {
    pub(super) text: String,
    /// (call id, name, arguments)
    pub(super) calls: Vec<(String, String, Value)>,
    pub(super) usage: Option<Usage>,
    pub(super) finish: Option<StopReason>,
}

pub(super) fn assemble(events: &[ModelEvent]) -> Answer {
    let mut answer = Answer::default();
    let mut raw_args: Vec<String> = Vec::new();
    for event in events {
        match event {
            ModelEvent::TextDelta(text) => answer.text.push_str(text),
            ModelEvent::ToolCallStart { call_id, name, .. } => {
                answer.calls.push((call_id.clone(), name.clone(), Value::Null));
                raw_args.push(String::new());
            }
            ModelEvent::ToolCallArgs { index, piece } => raw_args[*index].push_str(piece),
            ModelEvent::Usage(usage) => answer.usage = Some(*usage),
            ModelEvent::Finish(reason) => answer.finish = Some(*reason),
            ModelEvent::ReasoningDelta { .. } => {}
        }
    }
    for (call, raw) in answer.calls.iter_mut().zip(raw_args) {
        call.2 = serde_json::from_str(&raw).unwrap_or_else(|e| panic!("arguments {raw:?} are not JSON: {e}"));
    }
    answer
}

pub(super) fn usage(input: u64, output: u64) -> Usage {
    Usage { input_tokens: input, output_tokens: output, ..Usage::default() }
}

pub(super) fn text_events(pieces: &[&str]) -> Vec<ModelEvent> {
    pieces.iter().map(|p| ModelEvent::TextDelta((*p).to_owned())).collect()
}

pub(super) fn reasoning_events(pieces: &[&str]) -> Vec<ModelEvent> {
    pieces.iter().map(|p| ModelEvent::ReasoningDelta { text: (*p).to_owned(), signature: None }).collect()
}

/// A reasoning signature on its own (what the dialects emit when the signature arrives).
pub(super) fn signature_event(signature: &str) -> ModelEvent {
    ModelEvent::ReasoningDelta { text: String::new(), signature: Some(signature.to_owned()) }
}

pub(super) fn usage_event(input: u64, output: u64) -> ModelEvent {
    ModelEvent::Usage(usage(input, output))
}

pub(super) fn args(index: usize, pieces: &[&str]) -> Vec<ModelEvent> {
    pieces.iter().map(|p| ModelEvent::ToolCallArgs { index, piece: (*p).to_owned() }).collect()
}

pub(super) fn start(index: usize, call_id: &str, name: &str) -> ModelEvent {
    ModelEvent::ToolCallStart { index, call_id: call_id.to_owned(), name: name.to_owned() }
}

pub(super) fn sse_body(chunks: &[Value]) -> Vec<u8> {
    chunks.iter().map(|c| format!("data: {c}\n\n")).collect::<String>().into_bytes()
}

/// A complete tool call as Chat Completions spells it in messages.
fn wire_call(id: &str, name: &str, arguments: &str) -> Value {
    json!({"id": id, "type": "function", "function": {"name": name, "arguments": arguments}})
}

pub(super) fn command_schema() -> Value {
    json!({"type": "object", "properties": {"command": {"type": "string"}}, "required": ["command"]})
}

fn delta_chunk(delta: Value, finish_reason: Option<&str>) -> Value {
    json!({
        "object": "chat.completion.chunk",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
    })
}

// ---------------------------------------------------------------------------------------------
// Recorded streams

#[tokio::test]
async fn text_basic() {
    let events = replay("openai/chat_text_basic.sse").await;
    let mut expected = text_events(&[
        "I'm",
        " unable",
        " to",
        " provide",
        " real",
        "-time",
        " weather",
        " updates",
        ".",
        " To",
        " get",
        " the",
        " current",
        " weather",
        " in",
        " San",
        " Francisco",
        ",",
        " I",
        " recommend",
        " checking",
        " a",
        " reliable",
        " weather",
        " website",
        " or",
        " a",
        " weather",
        " app",
        ".",
    ]);
    expected.push(ModelEvent::Usage(usage(14, 30)));
    expected.push(ModelEvent::Finish(StopReason::EndTurn));
    assert_eq!(events, expected);
}

#[tokio::test]
async fn tool_call_single() {
    let events = replay("openai/chat_tool_call_single.sse").await;
    let mut expected = vec![start(0, "call_CTf1nWJLqSeRgDqaCG27xZ74", "get_weather")];
    expected.extend(args(0, &["{\"", "city", "\":\"", "San", " Francisco", "\",\"", "state", "\":\"", "CA", "\"}"]));
    expected.push(ModelEvent::Usage(usage(48, 19)));
    expected.push(ModelEvent::Finish(StopReason::ToolUse));
    assert_eq!(events, expected);
    assert_eq!(assemble(&events).calls[0].2, json!({"city": "San Francisco", "state": "CA"}));
}

#[tokio::test]
async fn tool_calls_parallel() {
    let events = replay("openai/chat_tool_calls_parallel.sse").await;
    let mut expected = vec![start(0, "call_JMW1whyEaYG438VE1OIflxA2", "GetWeatherArgs")];
    expected.extend(args(
        0,
        &["{\"ci", "ty\": ", "\"Edinb", "urgh", "\", \"c", "ountry", "\": \"", "GB\", ", "\"units", "\": \"", "c\"}"],
    ));
    expected.push(start(1, "call_DNYTawLBoN8fj3KN6qU9N1Ou", "get_stock_price"));
    expected.extend(args(1, &["{\"ti", "cker\"", ": \"AAP", "L\", ", "\"exch", "ange\":", " \"NA", "SDAQ\"", "}"]));
    expected.push(ModelEvent::Usage(usage(149, 60)));
    expected.push(ModelEvent::Finish(StopReason::ToolUse));
    assert_eq!(events, expected);

    let answer = assemble(&events);
    assert_eq!(answer.text, "");
    assert_eq!(
        answer.calls,
        vec![
            (
                "call_JMW1whyEaYG438VE1OIflxA2".to_owned(),
                "GetWeatherArgs".to_owned(),
                json!({"city": "Edinburgh", "country": "GB", "units": "c"})
            ),
            (
                "call_DNYTawLBoN8fj3KN6qU9N1Ou".to_owned(),
                "get_stock_price".to_owned(),
                json!({"ticker": "AAPL", "exchange": "NASDAQ"})
            ),
        ]
    );
}

/// What `openai/chat_finish_length.sse` (max_tokens = 1) must turn into.
fn finish_length_events() -> Vec<ModelEvent> {
    vec![
        ModelEvent::TextDelta("{\"".to_owned()),
        ModelEvent::Usage(usage(79, 1)),
        ModelEvent::Finish(StopReason::MaxTokens),
    ]
}

#[tokio::test]
async fn finish_length() {
    let events = replay("openai/chat_finish_length.sse").await;
    assert_eq!(events, finish_length_events());
}

#[tokio::test]
async fn refusal_is_text() {
    let events = replay("openai/chat_refusal.sse").await;
    let mut expected =
        text_events(&["I'm", " sorry", ",", " I", " can't", " assist", " with", " that", " request", "."]);
    expected.push(ModelEvent::Usage(usage(79, 11)));
    expected.push(ModelEvent::Finish(StopReason::EndTurn));
    assert_eq!(events, expected);
}

#[tokio::test]
async fn multiple_choices_use_choice_zero() {
    let events = replay("openai/chat_multiple_choices_n3.sse").await;
    let answer = assemble(&events);
    assert_eq!(answer.text, r#"{"city":"San Francisco","temperature":65,"units":"f"}"#);
    assert_eq!(answer.usage, Some(usage(79, 42)));
    assert_eq!(answer.finish, Some(StopReason::EndTurn));
    assert!(answer.calls.is_empty());
}

#[tokio::test]
async fn anthropic_compat_tool_call_index_one() {
    // First tool-call index 1, an empty first arguments piece, no usage chunk, and a body that
    // ends `data: [DONE]\n` without a blank line.
    let events = replay("openai_compat/anthropic_chat_tool_call_index1.sse").await;
    let mut expected = text_events(&["Reading", " it."]);
    expected.push(start(0, "toolu_sanitized", "read_file"));
    expected.extend(args(0, &["{\"pa", "th\": \"a.txt\"}"]));
    expected.push(ModelEvent::Finish(StopReason::ToolUse));
    assert_eq!(events, expected);
    assert_eq!(assemble(&events).calls[0].2, json!({"path": "a.txt"}));
}

#[tokio::test]
async fn byte_by_byte_delivery_with_pauses_gives_the_same_events() {
    let body = fixture("openai/chat_tool_calls_parallel.sse");
    let whole = replay("openai/chat_tool_calls_parallel.sse").await;
    let mut reply = Reply::sse(&body, 1);
    reply.parts = vec![body[..500].to_vec(), body[500..501].to_vec(), body[501..3001].to_vec(), body[3001..].to_vec()];
    reply.pause = Duration::from_millis(20);
    let (result, _) = run(reply).await;
    let events: Vec<ModelEvent> = result.expect("opens").into_iter().map(|i| i.expect("ok")).collect();
    assert_eq!(events, whole);

    let (result, _) = run(Reply::sse(&body, 1)).await;
    let events: Vec<ModelEvent> = result.expect("opens").into_iter().map(|i| i.expect("ok")).collect();
    assert_eq!(events, whole);
}

// ---------------------------------------------------------------------------------------------
// Lenient decoding

#[tokio::test]
async fn crlf_comments_reasoning_cached_usage_and_no_done() {
    let mut body = String::from(": OPENROUTER PROCESSING\r\n\r\n");
    for chunk in [
        delta_chunk(json!({"role": "assistant", "reasoning_content": "Think"}), None),
        // Both names with the same text, as servers migrating between them send it.
        delta_chunk(json!({"reasoning": "ing.", "reasoning_content": "ing."}), None),
        delta_chunk(json!({"content": "Hi"}), None),
        delta_chunk(json!({}), Some("stop")),
        json!({"choices": [], "usage": {"prompt_tokens": 100, "completion_tokens": 5,
            "prompt_tokens_details": {"cached_tokens": 64, "cache_write_tokens": 8}}}),
    ] {
        body.push_str(&format!("data:{chunk}\r\n\r\n"));
    }
    let (result, _) = run(Reply::sse(body.as_bytes(), 13)).await;
    let events: Vec<ModelEvent> = result.expect("opens").into_iter().map(|i| i.expect("ok")).collect();
    check_shape(&events);
    assert_eq!(
        events,
        vec![
            ModelEvent::ReasoningDelta { text: "Think".to_owned(), signature: None },
            ModelEvent::ReasoningDelta { text: "ing.".to_owned(), signature: None },
            ModelEvent::TextDelta("Hi".to_owned()),
            ModelEvent::Usage(Usage {
                input_tokens: 100,
                output_tokens: 5,
                cache_read_tokens: 64,
                cache_write_tokens: 8
            }),
            ModelEvent::Finish(StopReason::EndTurn),
        ]
    );
}

#[tokio::test]
async fn whole_arguments_repeated_ids_and_missing_finish_reason() {
    let body = sse_body(&[
        delta_chunk(
            json!({"tool_calls": [
                {"index": 0, "id": "a", "function": {"name": "read_file", "arguments": r#"{"path":"x"}"#}},
            ]}),
            None,
        ),
        // vLLM repeats the id on later deltas of the same call.
        delta_chunk(json!({"tool_calls": [{"index": 0, "id": "a", "function": {"arguments": ""}}]}), None),
        // A server that numbers every call 0: a new id is a new call.
        delta_chunk(
            json!({"tool_calls": [{
                "index": 0,
                "id": "b",
                "type": "function",
                "function": {"name": "execute", "arguments": {"command": "ls"}},
            }]}),
            None,
        ),
    ]);
    let (result, _) = run(Reply::sse(&body, 50)).await;
    let events: Vec<ModelEvent> = result.expect("opens").into_iter().map(|i| i.expect("ok")).collect();
    check_shape(&events);
    let answer = assemble(&events);
    assert_eq!(
        answer.calls,
        vec![
            ("a".to_owned(), "read_file".to_owned(), json!({"path": "x"})),
            ("b".to_owned(), "execute".to_owned(), json!({"command": "ls"})),
        ]
    );
    assert_eq!(answer.finish, Some(StopReason::ToolUse), "inferred from the calls");
    assert_eq!(answer.usage, None);
}

#[tokio::test]
async fn event_stream_labelled_json_is_still_read() {
    let mut reply = Reply::sse(&fixture("openai/chat_finish_length.sse"), 4096);
    reply.headers = vec![("content-type".into(), "application/json".into())];
    let (result, _) = run(reply).await;
    let events: Vec<ModelEvent> = result.expect("opens").into_iter().map(|i| i.expect("ok")).collect();
    assert_eq!(events, finish_length_events());
}

#[tokio::test]
async fn non_streamed_json_answer_is_accepted() {
    let body = json!({
        "object": "chat.completion",
        "choices": [{
            "index": 0,
            "finish_reason": "tool_calls",
            "message": {
                "role": "assistant",
                "content": "On it.",
                "tool_calls": [wire_call("c1", "execute", "{\"command\":\"ls\"}")],
            },
        }],
        "usage": {"prompt_tokens": 10, "completion_tokens": 3},
    });
    let (result, _) = run(Reply::json(200, &body.to_string())).await;
    let events: Vec<ModelEvent> = result.expect("opens").into_iter().map(|i| i.expect("ok")).collect();
    check_shape(&events);
    assert_eq!(
        assemble(&events),
        Answer {
            text: "On it.".to_owned(),
            calls: vec![("c1".to_owned(), "execute".to_owned(), json!({"command": "ls"}))],
            usage: Some(usage(10, 3)),
            finish: Some(StopReason::ToolUse),
        }
    );
}

// ---------------------------------------------------------------------------------------------
// Errors

pub(super) async fn status_error(reply: Reply) -> ModelError {
    let (result, requests) = run(reply).await;
    assert_eq!(requests.len(), 1, "the client itself does not retry");
    match result {
        Err(error) => {
            assert!(!error.message.contains(API_KEY), "key leaked: {}", error.message);
            error
        }
        Ok(items) => panic!("expected an error, got {items:?}"),
    }
}

#[tokio::test]
async fn rate_limit_with_retry_after() {
    let body =
        r#"{"error":{"message":"Rate limit reached for gpt-4o","type":"requests","code":"rate_limit_exceeded"}}"#;
    let error = status_error(Reply::json(429, body).header("retry-after", "2")).await;
    assert_eq!(error.kind, ChatErrorKind::RateLimit);
    assert!(error.retryable);
    assert_eq!(error.retry_after, Some(Duration::from_secs(2)));
    assert!(error.message.contains("Rate limit reached for gpt-4o"), "{}", error.message);
}

#[tokio::test]
async fn unauthorized_is_not_retryable_and_hides_the_key() {
    let body = format!(r#"{{"error":{{"message":"Incorrect API key provided: {API_KEY}","code":"invalid_api_key"}}}}"#);
    let error = status_error(Reply::json(401, &body)).await;
    assert_eq!((error.kind, error.retryable), (ChatErrorKind::Auth, false));
    assert!(error.message.contains("Incorrect API key provided: <redacted>"), "{}", error.message);
}

#[tokio::test]
async fn service_unavailable_is_overloaded() {
    let error = status_error(Reply::json(503, "upstream busy").header("retry-after", "0.5")).await;
    assert_eq!((error.kind, error.retryable), (ChatErrorKind::Overloaded, true));
    assert_eq!(error.retry_after, Some(Duration::from_millis(500)));
}

#[tokio::test]
async fn context_length_is_overflow() {
    let body = concat!(
        r#"{"error":{"message":"This model's maximum context length is 128000 tokens. "#,
        r#"However, your messages resulted in 130000 tokens.","#,
        r#""type":"invalid_request_error","param":"messages","code":null}}"#,
    );
    let error = status_error(Reply::json(400, body)).await;
    assert_eq!((error.kind, error.retryable), (ChatErrorKind::ContextOverflow, false));
    assert!(error.message.contains("maximum context length is 128000"), "{}", error.message);
}

#[tokio::test]
async fn unknown_model_is_config() {
    let error = status_error(Reply::json(404, r#"{"error":{"message":"The model `gpt-9` does not exist"}}"#)).await;
    assert_eq!((error.kind, error.retryable), (ChatErrorKind::Config, false));
}

#[tokio::test]
async fn connection_refused_is_retryable() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    drop(listener);
    let error = match providers().stream(simple_request(&format!("http://{addr}/v1"))).await {
        Err(error) => error,
        Ok(_) => panic!("nothing listens there"),
    };
    assert_eq!((error.kind, error.retryable), (ChatErrorKind::Provider, true));
    assert!(error.message.starts_with("could not connect"), "{}", error.message);
}

#[tokio::test]
async fn connection_closed_mid_stream_is_a_retryable_error_item() {
    let body = fixture("openai/chat_text_basic.sse");
    let mut reply = Reply::sse(&body[..2000], 300);
    reply.cut = true;
    let (result, _) = run(reply).await;
    let items = result.expect("headers arrived");
    let (last, before) = items.split_last().expect("items");
    assert!(before.iter().all(Result::is_ok), "{items:?}");
    assert!(matches!(before.first(), Some(Ok(ModelEvent::TextDelta(t))) if t == "I'm"), "{items:?}");
    assert!(!before.iter().any(|i| matches!(i, Ok(ModelEvent::Finish(_)))), "no Finish after a cut: {items:?}");
    let error = last.as_ref().expect_err("ends with an error");
    assert_eq!((error.kind, error.retryable), (ChatErrorKind::Provider, true));
}

#[tokio::test]
async fn cut_after_the_finish_reason_still_finishes() {
    let body = sse_body(&[delta_chunk(json!({"content": "Done."}), None), delta_chunk(json!({}), Some("stop"))]);
    let mut reply = Reply::sse(&body, 1000);
    reply.cut = true;
    let (result, _) = run(reply).await;
    let events: Vec<ModelEvent> = result.expect("opens").into_iter().map(|i| i.expect("ok")).collect();
    assert_eq!(events, vec![ModelEvent::TextDelta("Done.".to_owned()), ModelEvent::Finish(StopReason::EndTurn)]);
}

#[tokio::test]
async fn stalled_stream_times_out() {
    let body = sse_body(&[delta_chunk(json!({"content": "Hel"}), None)]);
    let mut reply = Reply::sse(&body, 1000);
    reply.stall = true;
    let server = TestServer::start(reply).await;
    let providers = Providers::new(Duration::from_secs(5), Duration::from_millis(300)).expect("client");
    let stream = providers.stream(simple_request(&server.base_url)).await.expect("opens");
    let items: Vec<_> = tokio::time::timeout(Duration::from_secs(10), stream.collect::<Vec<_>>()).await.expect("ends");
    assert_eq!(items.first(), Some(&Ok(ModelEvent::TextDelta("Hel".to_owned()))));
    let error = items.last().and_then(|i| i.as_ref().err()).expect("ends with an error");
    assert_eq!((error.kind, error.retryable), (ChatErrorKind::Timeout, true));
}

#[tokio::test]
async fn in_stream_error_object_ends_the_stream() {
    // OpenRouter reports an upstream failure after the 200 as a data line with an `error`.
    let error_chunk = json!({"id": "gen-1", "object": "chat.completion.chunk", "provider": "openai",
        "error": {"code": 502, "message": "Provider returned error"},
        "choices": [{"index": 0, "delta": {"content": ""}, "finish_reason": "error"}]});
    let body = sse_body(&[delta_chunk(json!({"content": "Partial"}), None), error_chunk]);
    let (result, _) = run(Reply::sse(&body, 64)).await;
    let items = result.expect("opens");
    assert_eq!(items.len(), 2, "{items:?}");
    assert_eq!(items[0], Ok(ModelEvent::TextDelta("Partial".to_owned())));
    let error = items[1].as_ref().expect_err("error item");
    assert_eq!((error.kind, error.retryable), (ChatErrorKind::Provider, true));
    assert!(error.message.contains("Provider returned error"), "{}", error.message);

    // Without a code it is a retryable provider error; an `event: error` name counts too.
    let body = concat!(
        "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"a\"}}]}\n\n",
        "event: error\ndata: {\"message\":\"boom\"}\n\n",
    )
    .as_bytes();
    let (result, _) = run(Reply::sse(body, 64)).await;
    let items = result.expect("opens");
    let error = items.last().and_then(|i| i.as_ref().err()).expect("error item");
    assert_eq!(
        (error.kind, error.retryable, error.message.as_str()),
        (ChatErrorKind::Provider, true, "provider error: boom")
    );
}

#[tokio::test]
async fn in_stream_rate_limit_keeps_its_kind() {
    let body = sse_body(&[json!({"error": {"code": 429, "message": "Rate limit exceeded upstream"}})]);
    let (result, _) = run(Reply::sse(&body, 64)).await;
    let items = result.expect("opens");
    assert_eq!(items.len(), 1, "{items:?}");
    let error = items[0].as_ref().expect_err("error item");
    assert_eq!((error.kind, error.retryable), (ChatErrorKind::RateLimit, true));
}

/// Data lines that are not chunks, over HTTP: a keep-alive is skipped; a repeated key counts once;
/// JSON of another shape, and broken JSON, end the stream with a provider error saying which.
#[tokio::test]
async fn data_that_is_not_a_chunk() {
    let hi = json!({"choices": [{"index": 0, "delta": {"content": "hi"}}]});
    let skipped = format!("data: ping\n\ndata: {hi}\n\ndata: [DONE]\n\n");
    let (result, _) = run(Reply::sse(skipped.as_bytes(), 64)).await;
    let items = result.expect("opens");
    assert!(items.iter().all(Result::is_ok), "{items:?}");
    assert!(matches!(items.first(), Some(Ok(ModelEvent::TextDelta(text))) if text == "hi"), "{items:?}");

    // A key given twice counts once, its last value, as when the chunk was read as any JSON.
    let twice = r#"{"choices": [{"index": 0, "delta": {"content": "a", "content": "b"}}]}"#;
    let (result, _) = run(Reply::sse(format!("data: {twice}\n\ndata: [DONE]\n\n").as_bytes(), 64)).await;
    let items = result.expect("opens");
    assert!(items.iter().all(Result::is_ok), "{items:?}");
    assert!(matches!(items.first(), Some(Ok(ModelEvent::TextDelta(text))) if text == "b"), "{items:?}");

    for (body, says) in [
        (format!("data: {hi}\n\ndata: {}\n\n", json!({"choices": "none"})), "unexpected chunk"),
        (format!("data: {hi}\n\ndata: {{\"choices\": [\n\n"), "malformed chunk"),
    ] {
        let (result, _) = run(Reply::sse(body.as_bytes(), 64)).await;
        let items = result.expect("opens");
        let error = items.last().and_then(|i| i.as_ref().err()).expect("error item");
        assert_eq!(error.kind, ChatErrorKind::Provider, "{body}");
        assert!(error.message.contains(says), "{body}: {}", error.message);
        assert!(matches!(items.first(), Some(Ok(ModelEvent::TextDelta(text))) if text == "hi"), "{items:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// Requests

#[tokio::test]
async fn request_shape() {
    let server = TestServer::start(Reply::sse(&fixture("openai/chat_text_basic.sse"), 4096)).await;
    let request = ModelRequest {
        target: target(&server.base_url),
        system: "You are a coding agent.".to_owned(),
        messages: vec![
            PromptMessage { role: Role::User, parts: vec![Part::text("List the files.")].into() },
            PromptMessage {
                role: Role::Assistant,
                parts: vec![
                    Part::Reasoning { text: "Use ls.".to_owned(), signature: Some("sig".to_owned()) },
                    Part::text("Listing."),
                    Part::ToolCall {
                        call_id: "call_1".to_owned(),
                        name: "execute".to_owned(),
                        args: json!({"command": "ls"}),
                    },
                    Part::ToolCall {
                        call_id: "call_2".to_owned(),
                        name: "read_file".to_owned(),
                        args: json!({"path": "a"}),
                    },
                ]
                .into(),
            },
            PromptMessage {
                role: Role::Tool,
                parts: vec![
                    Part::ToolResult {
                        call_id: "call_1".to_owned(),
                        name: "execute".to_owned(),
                        result: "a\nb".to_owned(),
                        is_error: false,
                    },
                    Part::ToolResult {
                        call_id: "call_2".to_owned(),
                        name: "read_file".to_owned(),
                        result: "no such file".to_owned(),
                        is_error: true,
                    },
                ]
                .into(),
            },
            PromptMessage {
                role: Role::Assistant,
                parts: vec![Part::ToolCall {
                    call_id: "call_3".to_owned(),
                    name: "execute".to_owned(),
                    args: json!({}),
                }]
                .into(),
            },
            PromptMessage {
                role: Role::Tool,
                parts: vec![Part::ToolResult {
                    call_id: "call_3".to_owned(),
                    name: "execute".to_owned(),
                    result: String::new(),
                    is_error: false,
                }]
                .into(),
            },
            PromptMessage {
                role: Role::User,
                parts: vec![Part::text("What is this?"), Part::Image { file_id: "file_9".to_owned() }].into(),
            },
        ]
        .into(),
        tools: vec![ToolSpec {
            name: "execute".to_owned(),
            description: "Run a command.".to_owned(),
            parameters: command_schema(),
        }]
        .into(),
        images: [(
            "file_9".to_owned(),
            ImageData { media_type: "image/png".to_owned(), bytes: Arc::from(&b"\x89PNG"[..]) },
        )]
        .into(),
        memo: Default::default(),
    };
    // The next step's request: the same history (its messages' parts shared, as the loop shares
    // them) and one more message. The client writes the shared part from what it kept.
    let mut next = request.clone();
    Arc::make_mut(&mut next.messages)
        .push(PromptMessage { role: Role::Assistant, parts: vec![Part::text("Done: \"a\", b.")].into() });
    let providers = providers();
    for request in [request, next] {
        let events: Vec<_> = providers.stream(request).await.expect("opens").collect().await;
        assert!(events.iter().all(Result::is_ok));
    }

    let requests = server.requests();
    assert_eq!(requests.len(), 2);
    let recorded = &requests[0];
    assert_eq!(recorded.method, "POST");
    assert_eq!(recorded.path, "/v1/chat/completions");
    assert_eq!(recorded.header("authorization"), Some(format!("Bearer {API_KEY}").as_str()));
    assert_eq!(recorded.header("content-type"), Some("application/json"));
    assert_eq!(recorded.header("accept"), Some("text/event-stream"));
    let first = json!({
            "model": "gpt-4o",
            "stream": true,
            "stream_options": {"include_usage": true},
            "max_tokens": 1024,
            "messages": [
                {"role": "system", "content": "You are a coding agent."},
                {"role": "user", "content": "List the files."},
                {"role": "assistant", "content": "Listing.", "tool_calls": [
                    wire_call("call_1", "execute", "{\"command\":\"ls\"}"),
                    wire_call("call_2", "read_file", "{\"path\":\"a\"}"),
                ]},
                {"role": "tool", "tool_call_id": "call_1", "content": "a\nb"},
                {"role": "tool", "tool_call_id": "call_2", "content": "no such file"},
                {"role": "assistant", "content": null, "tool_calls": [
                    wire_call("call_3", "execute", "{}"),
                ]},
                {"role": "tool", "tool_call_id": "call_3", "content": ""},
                {"role": "user", "content": [
                    {"type": "text", "text": "What is this?"},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw=="}},
                ]},
            ],
            "tools": [{"type": "function", "function": {
                "name": "execute",
                "description": "Run a command.",
                "parameters": command_schema(),
            }}],
    });
    assert_eq!(recorded.json(), first);
    let mut second = first;
    second["messages"]
        .as_array_mut()
        .expect("messages")
        .push(json!({"role": "assistant", "content": "Done: \"a\", b."}));
    assert_eq!(requests[1].json(), second, "the next step's body, from what was kept and the new message");
}

/// A conversation's requests as the loop makes them, each body written with the conversation's
/// memo and again with a new one, by each dialect that keeps one: the memo never changes a byte,
/// whether the history grew, was summarised (the summary made anew, with the same text, for
/// every request), had a compaction request in between, or holds an image (which is not kept).
#[test]
fn the_conversations_memo_never_changes_what_is_sent() {
    use super::WireDialect;
    use super::fragments::SentPrefix;

    let text = |role: Role, text: &str| PromptMessage { role, parts: vec![Part::text(text)].into() };
    let call = |id: &str| PromptMessage {
        role: Role::Assistant,
        parts: vec![Part::ToolCall {
            call_id: id.to_owned(),
            name: "execute".to_owned(),
            args: json!({"command": "ls"}),
        }]
        .into(),
    };
    let result = |id: &str| PromptMessage {
        role: Role::Tool,
        parts: vec![Part::ToolResult {
            call_id: id.to_owned(),
            name: "execute".to_owned(),
            result: "a \"b\"\n".to_owned(),
            is_error: false,
        }]
        .into(),
    };
    let image = PromptMessage {
        role: Role::User,
        parts: vec![Part::text("this?"), Part::Image { file_id: "file_1".to_owned() }].into(),
    };
    let summary = || text(Role::User, "[Summary] the files were listed");
    let (u1, a1, t1, a2, u2) =
        (text(Role::User, "list"), call("c1"), result("c1"), text(Role::Assistant, "listed"), text(Role::User, "more"));
    let (u3, a3, t3, a4) = (text(Role::User, "again"), call("c3"), result("c3"), text(Role::Assistant, "done"));
    let histories: [Vec<PromptMessage>; 10] = [
        vec![u1.clone()],
        vec![u1.clone(), a1.clone(), t1.clone()],
        vec![u1.clone(), a1.clone(), t1.clone(), a2.clone(), u2.clone()],
        // The compaction's own request, then the conversation after it.
        vec![u1.clone(), a1.clone(), t1.clone(), a2.clone(), text(Role::User, "Summarise.")],
        vec![summary(), u2.clone()],
        vec![summary(), u2.clone(), a3.clone(), t3.clone()],
        vec![summary(), u2.clone(), a3.clone(), t3.clone(), image.clone(), a4.clone()],
        vec![summary(), u2.clone(), a3.clone(), t3.clone(), image.clone(), a4.clone(), u3.clone()],
        // A history that shares nothing with the last (an edited first message), with messages
        // that send nothing: a marker, an answer of unsigned reasoning alone.
        vec![
            text(Role::User, "list files"),
            a1.clone(),
            t1.clone(),
            text(Role::Marker, "compacted"),
            PromptMessage {
                role: Role::Assistant,
                parts: vec![Part::Reasoning { text: "hmm".to_owned(), signature: None }].into(),
            },
            text(Role::User, "go on"),
        ],
        // No user message at all.
        vec![a2.clone()],
    ];
    let has_image = |m: &PromptMessage| m.parts.iter().any(|p| matches!(p, Part::Image { .. }));
    let every = [
        (WireDialect::OpenAiChat, ProviderType::OpenaiCompatible, "gpt-4o", json!({})),
        (WireDialect::OpenAiResponses, ProviderType::Openai, "gpt-4o", json!({"api": "responses"})),
        (WireDialect::Anthropic, ProviderType::Anthropic, "claude-sonnet-4-5", json!({})),
        (WireDialect::Gemini, ProviderType::Gemini, "gemini-3-pro-preview", json!({})),
        // Gemma's system prompt opens the first user content.
        (WireDialect::Gemini, ProviderType::Gemini, "gemma-3-27b-it", json!({})),
        (WireDialect::Bedrock, ProviderType::Bedrock, "anthropic.claude", json!({"region": "us-east-1"})),
    ];
    for (dialect, provider_type, model, settings) in every {
        let (client, memo) = (providers(), agentplane_actors::ports::PromptMemo::default());
        for (i, messages) in histories.iter().enumerate() {
            let request = ModelRequest {
                target: ModelTarget {
                    provider_type,
                    model: model.to_owned(),
                    settings: settings.clone(),
                    ..target("http://127.0.0.1:9/v1")
                },
                system: "You are a coding agent.".to_owned(),
                messages: messages.clone().into(),
                // The compaction's request offers no tools, as the loop's does not.
                tools: if i == 3 {
                    Vec::new().into()
                } else {
                    vec![ToolSpec { name: "execute".to_owned(), description: "Run.".to_owned(), parameters: json!({}) }]
                        .into()
                },
                images: [(
                    "file_1".to_owned(),
                    ImageData { media_type: "image/png".to_owned(), bytes: Arc::from(&b"\x89PNG"[..]) },
                )]
                .into(),
                memo: memo.clone(),
            };
            let with_memo = client.write_request(dialect, &request).expect("body");
            let alone = ModelRequest { memo: Default::default(), ..request.clone() };
            let without = providers().write_request(dialect, &alone).expect("body");
            let context = format!("{dialect:?} ({model}), request {i}");
            assert_eq!(String::from_utf8_lossy(&with_memo), String::from_utf8_lossy(&without), "{context}");
            let body: Value = serde_json::from_slice(&with_memo).expect("JSON");
            let history = ["messages", "input", "contents"].iter().find_map(|key| body.get(key));
            assert!(history.is_some_and(Value::is_array), "{context}: {body}");
            // The memo holds every message for the next request, an image's without its text.
            let held = memo.with(|sent: &mut SentPrefix| {
                messages.iter().enumerate().all(|(i, m)| sent.piece(i).is_some() != has_image(m))
            });
            assert!(held, "{context}");
        }
    }
}

#[tokio::test]
async fn no_key_no_system_no_tools_no_limit() {
    let server = TestServer::start(Reply::sse(&fixture("openai/chat_finish_length.sse"), 4096)).await;
    let mut request = simple_request(server.base_url.trim_end_matches('/'));
    request.target.api_key = None;
    request.target.max_output_tokens = None;
    request.system = String::new();
    let events: Vec<_> = providers().stream(request).await.expect("opens").collect().await;
    assert!(events.iter().all(Result::is_ok));

    let recorded = &server.requests()[0];
    assert_eq!(recorded.path, "/v1/chat/completions");
    assert_eq!(recorded.header("authorization"), None);
    let body = recorded.json();
    assert_eq!(body["messages"], json!([{"role": "user", "content": "What's the weather?"}]));
    assert!(body.get("tools").is_none() && body.get("max_tokens").is_none(), "{body}");
}
