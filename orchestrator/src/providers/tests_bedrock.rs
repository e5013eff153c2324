//! The Bedrock Converse dialect against a local server that checks every request's SigV4
//! signature independently (and answers 403 to a wrong one): recorded event streams replayed
//! byte for byte with splits inside preludes and headers, the decoded recordings framed again,
//! HTTP and in-stream errors, resets, and the request body field by field.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agentplane_actors::ports::{
    ImageData, ModelClient, ModelError, ModelEvent, ModelRequest, ModelTarget, PromptMessage, StopReason, ToolSpec,
    Usage,
};
use agentplane_schema::api::{ChatErrorKind, ProviderType};
use agentplane_schema::message::{Part, Role};
use agentplane_tests::aws::{
    SigV4Expect, error_frame, event_frame, exception_frame, jsonl_to_eventstream, verify_sigv4,
};
use futures::StreamExt;
use serde_json::{Value, json};
use tokio::net::TcpListener;

use super::bedrock::{StreamDecoder, decode_body, endpoint};
use super::tests::{
    Items, Recorded, Reply, args, assemble, check_shape, fixture, providers, read_request,
    reasoning_events as reasoning, signature_event as signature, start, text_events as text, usage_event as usage,
    write_reply,
};

const ACCESS_KEY_ID: &str = "AKIDEXAMPLE";
const SECRET: &str = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY";
const SESSION_TOKEN: &str = "IQoJb3JpZ2luX2VjEXAMPLETOKEN";
const BEARER_KEY: &str = "ABSKQmVkcm9ja0FQSUtleS1leGFtcGxl";
const REGION: &str = "eu-central-1";
/// A real model id: its `:` must be percent-encoded in the path and encoded again when signing.
const MODEL: &str = "anthropic.claude-sonnet-4-5-20250929-v1:0";
const MODEL_PATH: &str = "/model/anthropic.claude-sonnet-4-5-20250929-v1%3A0/converse-stream";
const EVENTSTREAM: &str = "application/vnd.amazon.eventstream";

// ---------------------------------------------------------------------------------------------
// A server that checks signatures

/// A request as the server saw it, with the verdict of its credential check.
type Checked = (Recorded, Result<(), String>);

struct BedrockServer {
    base_url: String,
    requests: Arc<Mutex<Vec<Checked>>>,
}

impl BedrockServer {
    /// Answers every request whose credentials check out with `reply`, others with AWS's 403.
    async fn start(reply: Reply) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let requests = Arc::new(Mutex::new(Vec::new()));
        let recorded = requests.clone();
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                let (reply, recorded) = (reply.clone(), recorded.clone());
                tokio::spawn(async move {
                    let Ok(request) = read_request(&mut socket).await else {
                        return;
                    };
                    let check = check_credentials(&request);
                    let answer = match &check {
                        Ok(()) => reply,
                        Err(_) => forbidden(),
                    };
                    recorded.lock().expect("requests lock").push((request, check));
                    let _ = write_reply(&mut socket, &answer).await;
                });
            }
        });
        // A trailing slash, as admins type it; the client must not double it.
        BedrockServer { base_url: format!("http://{addr}/"), requests }
    }

    fn requests(&self) -> Vec<Checked> {
        self.requests.lock().expect("requests lock").clone()
    }
}

fn check_credentials(request: &Recorded) -> Result<(), String> {
    match request.header("authorization") {
        Some(auth) if auth.starts_with("AWS4-HMAC-SHA256 ") => {
            let expect = SigV4Expect {
                access_key_id: ACCESS_KEY_ID,
                secret_access_key: SECRET,
                region: REGION,
                service: "bedrock",
            };
            verify_sigv4(&request.method, &request.path, &request.headers, &request.body, &expect)
        }
        Some(auth) if auth == format!("Bearer {BEARER_KEY}") => Ok(()),
        Some(other) => Err(format!("unknown credentials {other:?}")),
        None => Err("no credentials".to_owned()),
    }
}

/// What AWS answers to a request whose signature does not match.
fn forbidden() -> Reply {
    let body = json!({"message": "The request signature we calculated does not match the signature you provided. \
        Check your AWS Secret Access Key and signing method."});
    Reply::json(403, &body.to_string()).header(
        "x-amzn-errortype",
        "InvalidSignatureException:http://internal.amazon.com/coral/com.amazon.coral.service/",
    )
}

// ---------------------------------------------------------------------------------------------
// Helpers

fn target(base_url: &str) -> ModelTarget {
    ModelTarget {
        provider_type: ProviderType::Bedrock,
        base_url: base_url.to_owned(),
        api_key: Some(SECRET.to_owned()),
        model: MODEL.to_owned(),
        max_output_tokens: Some(1024),
        settings: json!({"region": REGION, "access_key_id": ACCESS_KEY_ID}),
    }
}

fn simple_request(base_url: &str) -> ModelRequest {
    ModelRequest {
        target: target(base_url),
        system: "You are terse.".to_owned(),
        messages: vec![PromptMessage { role: Role::User, parts: vec![Part::text("Reply with exactly OK.")].into() }]
            .into(),
        tools: Vec::new().into(),
        images: HashMap::new(),
        memo: Default::default(),
    }
}

/// An event-stream body in the given pieces.
fn eventstream(parts: Vec<Vec<u8>>) -> Reply {
    let mut reply = Reply::json(200, "");
    reply.headers = vec![("content-type".into(), EVENTSTREAM.into()), ("x-amzn-requestid".into(), "req-1".into())];
    reply.parts = parts;
    reply.chunked = true;
    reply
}

/// `bytes` cut at `offsets` (ascending).
fn split_at(bytes: &[u8], offsets: &[usize]) -> Vec<Vec<u8>> {
    let mut parts = Vec::new();
    let mut start = 0;
    for &end in offsets.iter().chain(std::iter::once(&bytes.len())) {
        parts.push(bytes[start..end].to_vec());
        start = end;
    }
    parts
}

/// `bytes` in pieces of 1, 3, 7, 11 and 17 bytes in turn: every frame is split somewhere in its
/// prelude, its headers and its payload.
fn ragged(bytes: &[u8]) -> Vec<Vec<u8>> {
    let mut parts = Vec::new();
    let mut rest = bytes;
    for size in [1, 3, 7, 11, 17].into_iter().cycle() {
        if rest.is_empty() {
            break;
        }
        let (head, tail) = rest.split_at(size.min(rest.len()));
        parts.push(head.to_vec());
        rest = tail;
    }
    parts
}

async fn run_with(
    reply: Reply,
    request: impl FnOnce(&str) -> ModelRequest,
) -> (Result<Items, ModelError>, Vec<Checked>) {
    let server = BedrockServer::start(reply).await;
    let result = match providers().stream(request(&server.base_url)).await {
        Ok(stream) => Ok(stream.collect().await),
        Err(error) => Err(error),
    };
    (result, server.requests())
}

async fn run(reply: Reply) -> (Result<Items, ModelError>, Vec<Checked>) {
    run_with(reply, simple_request).await
}

/// Replays `reply` and returns its events, which must all be `Ok`.
async fn replay(reply: Reply) -> Vec<ModelEvent> {
    let (result, requests) = run(reply).await;
    assert_eq!(requests.len(), 1);
    assert_eq!(requests[0].1, Ok(()), "signature checks out");
    let events: Vec<ModelEvent> =
        result.expect("stream opens").into_iter().map(|item| item.expect("no error item")).collect();
    check_shape(&events);
    events
}

fn last_error(items: &[Result<ModelEvent, ModelError>]) -> &ModelError {
    items.last().and_then(|i| i.as_ref().err()).unwrap_or_else(|| panic!("ends with an error: {items:?}"))
}

/// A fixture line's value at `pointer` (for the long opaque strings).
fn fixture_value(name: &str, line: usize, pointer: &str) -> String {
    let text = String::from_utf8(fixture(name)).expect("UTF-8");
    let value: Value = serde_json::from_str(text.lines().nth(line).expect("line")).expect("JSON");
    value.pointer(pointer).and_then(Value::as_str).expect("string at pointer").to_owned()
}

// ---------------------------------------------------------------------------------------------
// Recorded streams

/// What `bedrock/converse_stream_text_live.eventstream` (Claude answering "OK.") must turn into.
fn live_events() -> Vec<ModelEvent> {
    let mut expected = text(&["OK", "."]);
    expected.push(usage(12, 5));
    expected.push(ModelEvent::Finish(StopReason::EndTurn));
    expected
}

#[tokio::test]
async fn live_capture_split_inside_preludes_and_headers() {
    let body = fixture("bedrock/converse_stream_text_live.eventstream");
    // Frames start at 0, 180, 359, 549, 683 and 900. Cut inside the first prelude (length, then
    // CRC), inside headers, inside payloads, one byte into a prelude, and inside the last CRC.
    let offsets = [2, 9, 15, 40, 181, 190, 200, 360, 372, 500, 551, 683, 700, 901, 912, 1000, 1155];
    assert_eq!(replay(eventstream(split_at(&body, &offsets))).await, live_events());
    assert_eq!(replay(eventstream(ragged(&body))).await, live_events());
}

#[test]
fn every_split_point_gives_the_same_events() {
    let body = fixture("bedrock/converse_stream_text_live.eventstream");
    let expected: Items = live_events().into_iter().map(Ok).collect();
    assert_eq!(decode_body(&body), expected);
    for split in 0..=body.len() {
        let (a, b) = body.split_at(split);
        let mut decoder = StreamDecoder::new(None);
        let mut out = VecDeque::new();
        assert!(decoder.push(a, &mut out).is_continue());
        assert!(decoder.push(b, &mut out).is_continue());
        decoder.end(&mut out);
        assert_eq!(Vec::from(out), expected, "split at {split}");
    }
}

#[tokio::test]
async fn model_stream_exception_is_a_retryable_provider_error() {
    let body = fixture("bedrock/stream_error_exception.eventstream");
    // Cut inside the exception frame's prelude and inside its `:exception-type` header.
    let (result, _) = run(eventstream(split_at(&body, &[100, 160, 165, 200]))).await;
    let items = result.expect("opens");
    assert_eq!(items.len(), 2, "{items:?}");
    assert_eq!(items[0], Ok(ModelEvent::TextDelta("before error".to_owned())));
    let error = last_error(&items);
    assert_eq!((error.kind, error.retryable), (ChatErrorKind::Provider, true));
    assert_eq!(error.message, "provider error (modelStreamErrorException): Model Stream Error (Upstream model failed)");
}

#[tokio::test]
async fn text_recording() {
    let body = jsonl_to_eventstream(&String::from_utf8(fixture("bedrock/converse_stream_text.jsonl")).expect("UTF-8"));
    let mut expected = text(&[
        "Let",
        " me count the \"",
        "r\"s in \"",
        "strawberry\":\n\ns-t-",
        "**",
        "r**-a-w-b",
        "-e-**",
        "r**-**",
        "r**-y\n\nThere",
        " are **3",
        "** r",
        "'s in \"strawberry.\"",
    ]);
    expected.push(usage(22, 55));
    expected.push(ModelEvent::Finish(StopReason::EndTurn));
    assert_eq!(replay(eventstream(ragged(&body))).await, expected);
}

#[tokio::test]
async fn reasoning_with_signature_recording() {
    let name = "bedrock/converse_stream_reasoning_signature.jsonl";
    let body = jsonl_to_eventstream(&String::from_utf8(fixture(name)).expect("UTF-8"));
    let mut expected = reasoning(&[
        "Let me count the r",
        "'s in \"",
        "strawberry\":",
        "\n\ns-t-r-a",
        "-w-b-e-r",
        "-r-y\n\nr",
        " appears at positions ",
        "3, 8",
        ", and 9.\n\nSo there",
        " are 3 r's.",
    ]);
    // The empty reasoning delta before the signature carries nothing.
    expected.push(signature(&fixture_value(name, 12, "/contentBlockDelta/delta/reasoningContent/signature")));
    expected.extend(text(&[
        "There",
        " are **3** r's in \"",
        "strawberry\":",
        "\n\n1",
        ". st",
        "**",
        "r**awbe",
        "**r****",
        "r**y",
    ]));
    expected.push(usage(51, 94));
    expected.push(ModelEvent::Finish(StopReason::EndTurn));
    assert_eq!(replay(eventstream(ragged(&body))).await, expected);
}

#[tokio::test]
async fn redacted_reasoning_then_tool_use_recording() {
    let name = "bedrock/converse_stream_redacted_reasoning_tool_use.jsonl";
    let body = jsonl_to_eventstream(&String::from_utf8(fixture(name)).expect("UTF-8"));
    let redacted = fixture_value(name, 1, "/contentBlockDelta/delta/reasoningContent/redactedContent");
    let mut expected = vec![signature(&format!("bedrock-redacted:{redacted}"))];
    expected.push(start(0, "call_61f8fcbe423a58699163c53e076f1a06", "propose"));
    expected.extend(args(
        0,
        &[
            "{\"", "groups", "\":[", "{\"", "name", "\":\"", "Sales", "\",\"", "parent", "Group", "Name", "\":",
            "\"\"", "},{\"", "name", "\":\"", "Team", "1", "\",\"", "parent", "Group", "Name", "\":\"", "Sales", "\"}",
            "]}",
        ],
    ));
    expected.push(usage(67, 70));
    expected.push(ModelEvent::Finish(StopReason::ToolUse));
    let events = replay(eventstream(ragged(&body))).await;
    assert_eq!(events, expected);
    assert_eq!(
        assemble(&events).calls[0].2,
        json!({"groups": [{"name": "Sales", "parentGroupName": ""}, {"name": "Team1", "parentGroupName": "Sales"}]})
    );
}

#[tokio::test]
async fn kimi_empty_text_blocks_and_reasoning_recording() {
    let name = "bedrock/converse_stream_kimi_reasoning_tool_use.jsonl";
    let body = jsonl_to_eventstream(&String::from_utf8(fixture(name)).expect("UTF-8"));
    let mut expected = reasoning(&[
        " The user wants me to:\n1. Call glob_search with pattern **/*cursor* \n2.",
        " Read the file that results from this search (FILE1)\n3. Then answer with \"FOUND ISS",
        "UE_11409_CONTENT\"\n\nLet me do this step by step.",
    ]);
    expected.push(start(0, "functions.glob_search:0", "glob_search"));
    expected.extend(args(0, &["{\"pattern\": \"**/*cursor*\"}"]));
    expected.push(usage(217, 75));
    expected.push(ModelEvent::Finish(StopReason::ToolUse));
    assert_eq!(replay(eventstream(ragged(&body))).await, expected);
}

// ---------------------------------------------------------------------------------------------
// Decoding details

fn frames(events: &[(&str, Value)]) -> Vec<u8> {
    events.iter().flat_map(|(event_type, payload)| event_frame(event_type, payload)).collect()
}

fn finish_of(stop_reason: &str, with_call: bool) -> StopReason {
    let mut events = vec![("messageStart", json!({"role": "assistant"}))];
    if with_call {
        let start = json!({"toolUse": {"toolUseId": "t1", "name": "execute"}});
        events.push(("contentBlockStart", json!({"contentBlockIndex": 0, "start": start})));
    }
    events.push(("messageStop", json!({"stopReason": stop_reason})));
    match decode_body(&frames(&events)).pop() {
        Some(Ok(ModelEvent::Finish(reason))) => reason,
        other => panic!("no Finish: {other:?}"),
    }
}

#[test]
fn stop_reasons() {
    assert_eq!(finish_of("end_turn", false), StopReason::EndTurn);
    assert_eq!(finish_of("stop_sequence", false), StopReason::EndTurn);
    assert_eq!(finish_of("tool_use", true), StopReason::ToolUse);
    assert_eq!(finish_of("end_turn", true), StopReason::ToolUse, "calls have to run");
    assert_eq!(finish_of("max_tokens", false), StopReason::MaxTokens);
    assert_eq!(finish_of("model_context_window_exceeded", false), StopReason::MaxTokens);
    assert_eq!(finish_of("content_filtered", false), StopReason::ContentFilter);
    assert_eq!(finish_of("guardrail_intervened", false), StopReason::ContentFilter);
    assert_eq!(finish_of("malformed_tool_use", true), StopReason::Other);
}

#[test]
fn usage_counts_cached_tokens_in_the_prompt() {
    let body = frames(&[
        ("messageStop", json!({"stopReason": "end_turn"})),
        (
            "metadata",
            json!({"usage": {"inputTokens": 10, "outputTokens": 5, "cacheReadInputTokens": 100,
                "cacheWriteInputTokens": 20, "totalTokens": 135}, "metrics": {"latencyMs": 1}}),
        ),
    ]);
    let usage = Usage { input_tokens: 130, output_tokens: 5, cache_read_tokens: 100, cache_write_tokens: 20 };
    assert_eq!(decode_body(&body), vec![Ok(ModelEvent::Usage(usage)), Ok(ModelEvent::Finish(StopReason::EndTurn))]);
}

#[test]
fn parallel_tool_calls_are_numbered_in_start_order() {
    let start_block = |index: u64, id: &str, name: &str| {
        (
            "contentBlockStart",
            json!({"contentBlockIndex": index, "start": {"toolUse": {"toolUseId": id, "name": name}}}),
        )
    };
    let input = |index: u64, piece: &str| {
        ("contentBlockDelta", json!({"contentBlockIndex": index, "delta": {"toolUse": {"input": piece}}}))
    };
    let body = frames(&[
        ("contentBlockDelta", json!({"contentBlockIndex": 0, "delta": {"text": "Two things."}})),
        ("contentBlockStop", json!({"contentBlockIndex": 0})),
        start_block(1, "a", "read_file"),
        start_block(2, "b", "execute"),
        input(2, "{\"command\":"),
        input(1, "{\"path\":\"x\"}"),
        input(2, "\"ls\"}"),
        input(7, "{\"orphan\":1}"),
        ("messageStop", json!({"stopReason": "tool_use"})),
    ]);
    let events: Vec<ModelEvent> = decode_body(&body).into_iter().map(|i| i.expect("ok")).collect();
    check_shape(&events);
    let answer = assemble(&events);
    assert_eq!(answer.text, "Two things.");
    assert_eq!(
        answer.calls,
        vec![
            ("a".to_owned(), "read_file".to_owned(), json!({"path": "x"})),
            ("b".to_owned(), "execute".to_owned(), json!({"command": "ls"})),
        ]
    );
    assert_eq!((answer.usage, answer.finish), (None, Some(StopReason::ToolUse)));
}

#[test]
fn exceptions_in_the_stream_keep_their_kind() {
    let before = event_frame("contentBlockDelta", &json!({"contentBlockIndex": 0, "delta": {"text": "Hi"}}));
    let cases = [
        ("throttlingException", "Too many tokens, please wait before trying again.", ChatErrorKind::RateLimit, true),
        ("serviceUnavailableException", "Bedrock is unable to process your request.", ChatErrorKind::Overloaded, true),
        ("internalServerException", "The server encountered an error.", ChatErrorKind::Provider, true),
        ("modelTimeoutException", "Model has timed out.", ChatErrorKind::Timeout, true),
        ("validationException", "Input is too long for requested model.", ChatErrorKind::ContextOverflow, false),
        ("validationException", "messages.1.content: blank text", ChatErrorKind::Config, false),
        ("someNewException", "who knows", ChatErrorKind::Provider, true),
    ];
    for (exception, message, kind, retryable) in cases {
        let mut body = before.clone();
        body.extend(exception_frame(exception, &json!({"message": message})));
        let items = decode_body(&body);
        assert_eq!(items[0], Ok(ModelEvent::TextDelta("Hi".to_owned())), "{exception}");
        assert_eq!(items.len(), 2, "the exception ends the stream: {items:?}");
        let error = last_error(&items);
        assert_eq!((error.kind, error.retryable), (kind, retryable), "{exception}: {message}");
        assert_eq!(error.message, format!("provider error ({exception}): {message}"));
    }

    // An unmodeled `error` frame carries its code and message in headers.
    let items = decode_body(&error_frame("ThrottlingException", "Rate exceeded"));
    let error = last_error(&items);
    assert_eq!((error.kind, error.retryable), (ChatErrorKind::RateLimit, true));
    assert_eq!(error.message, "provider error (ThrottlingException): Rate exceeded");
}

#[test]
fn corrupt_and_truncated_streams_are_errors() {
    let mut body = fixture("bedrock/converse_stream_text_live.eventstream");
    // A flipped payload byte in the second frame: its message CRC no longer matches.
    body[300] ^= 0x20;
    let items = decode_body(&body);
    assert_eq!(items.len(), 1, "{items:?}");
    let error = last_error(&items);
    assert_eq!((error.kind, error.retryable), (ChatErrorKind::Provider, true));
    assert!(error.message.starts_with("malformed event stream"), "{}", error.message);

    // A garbled length fails at once instead of waiting for gigabytes.
    let mut body = fixture("bedrock/converse_stream_text_live.eventstream");
    body[0] = 0x7f;
    let mut decoder = StreamDecoder::new(None);
    let mut out = VecDeque::new();
    assert!(decoder.push(&body[..20], &mut out).is_break());
    assert!(matches!(out.pop_back(), Some(Err(e)) if e.message.contains("claims")));

    // The body ends inside a frame, or between frames before `messageStop`.
    let body = fixture("bedrock/converse_stream_text_live.eventstream");
    for (cut, problem) in [(500, "inside a frame"), (549, "before the end of the answer")] {
        let items = decode_body(&body[..cut]);
        let error = last_error(&items);
        assert_eq!((error.kind, error.retryable), (ChatErrorKind::Provider, true));
        assert_eq!(error.message, format!("the model stream ended {problem}"));
    }

    // After `messageStop` only the usage is missing: the answer stands.
    let events: Vec<ModelEvent> = decode_body(&body[..950]).into_iter().map(|i| i.expect("ok")).collect();
    assert_eq!(events, [text(&["OK", "."]), vec![ModelEvent::Finish(StopReason::EndTurn)]].concat());
}

// ---------------------------------------------------------------------------------------------
// HTTP errors

async fn status_error(reply: Reply) -> ModelError {
    let (result, requests) = run(reply).await;
    assert_eq!(requests.len(), 1, "the client itself does not retry");
    match result {
        Err(error) => {
            assert!(!error.message.contains(SECRET), "secret leaked: {}", error.message);
            error
        }
        Ok(items) => panic!("expected an error, got {items:?}"),
    }
}

fn aws_error(status: u16, error_type: &str, message: &str) -> Reply {
    Reply::json(status, &json!({"message": message}).to_string())
        .header("x-amzn-errortype", &format!("{error_type}:http://internal.amazon.com/coral/com.amazon.bedrock/"))
        .header("x-amzn-requestid", "0b7a9c1e-req")
}

#[tokio::test]
async fn throttling_with_retry_after() {
    let reply = aws_error(429, "ThrottlingException", "Too many requests, please wait before trying again.")
        .header("retry-after", "2");
    let error = status_error(reply).await;
    assert_eq!((error.kind, error.retryable), (ChatErrorKind::RateLimit, true));
    assert_eq!(error.retry_after, Some(Duration::from_secs(2)));
    assert_eq!(
        error.message,
        "HTTP 429 Too Many Requests: ThrottlingException: Too many requests, please wait before trying again."
    );
}

#[tokio::test]
async fn http_errors_map_by_their_aws_type() {
    let cases = [
        (
            503,
            "ServiceUnavailableException",
            "Bedrock is unable to process your request.",
            ChatErrorKind::Overloaded,
            true,
        ),
        (429, "ModelNotReadyException", "Model is not ready.", ChatErrorKind::Overloaded, true),
        (500, "InternalServerException", "Internal server error", ChatErrorKind::Provider, true),
        (408, "ModelTimeoutException", "Model timed out.", ChatErrorKind::Timeout, true),
        (400, "ServiceQuotaExceededException", "Too many tokens per day.", ChatErrorKind::RateLimit, false),
        (403, "AccessDeniedException", "You don't have access to the model.", ChatErrorKind::Auth, false),
        (
            403,
            "UnrecognizedClientException",
            "The security token included in the request is invalid.",
            ChatErrorKind::Auth,
            false,
        ),
        (400, "ValidationException", "Input is too long for requested model.", ChatErrorKind::ContextOverflow, false),
        (
            400,
            "ValidationException",
            "prompt is too long: 210000 tokens > 200000 maximum",
            ChatErrorKind::ContextOverflow,
            false,
        ),
        (400, "ValidationException", "The provided model identifier is invalid.", ChatErrorKind::Config, false),
        (404, "ResourceNotFoundException", "Model not found.", ChatErrorKind::Config, false),
    ];
    for (status, error_type, message, kind, retryable) in cases {
        let error = status_error(aws_error(status, error_type, message)).await;
        assert_eq!((error.kind, error.retryable), (kind, retryable), "{status} {error_type}");
        assert!(error.message.contains(&format!("{error_type}: {message}")), "{}", error.message);
    }
}

#[tokio::test]
async fn http_errors_without_an_aws_type_map_by_status() {
    let error = status_error(Reply::json(502, "<html>bad gateway</html>")).await;
    assert_eq!((error.kind, error.retryable), (ChatErrorKind::Provider, true));
    let error = status_error(Reply::json(500, r#"{"message":"boom"}"#)).await;
    assert_eq!((error.kind, error.retryable), (ChatErrorKind::Provider, true));
    // A JSON body that names its type in `__type` (the AWS JSON protocol) is enough.
    let body = r#"{"__type":"com.amazon.coral.validate#ValidationException","message":"Input is too long for requested model."}"#;
    let error = status_error(Reply::json(400, body)).await;
    assert_eq!((error.kind, error.retryable), (ChatErrorKind::ContextOverflow, false));
}

#[tokio::test]
async fn a_wrong_secret_is_rejected_by_the_signature_check() {
    let (result, requests) = run_with(eventstream(vec![Vec::new()]), |base_url| {
        let mut request = simple_request(base_url);
        request.target.api_key = Some("not-the-secret-access-key".to_owned());
        request
    })
    .await;
    assert_eq!(requests.len(), 1);
    let problem = requests[0].1.as_ref().expect_err("the server saw a bad signature");
    assert!(problem.starts_with("signature mismatch"), "{problem}");
    let error = result.expect_err("403");
    assert_eq!((error.kind, error.retryable), (ChatErrorKind::Auth, false));
    assert!(error.message.starts_with("HTTP 403 Forbidden: InvalidSignatureException: "), "{}", error.message);
    assert!(!error.message.contains("not-the-secret-access-key"), "{}", error.message);
}

#[tokio::test]
async fn a_bad_bearer_key_is_unauthorized() {
    let reply = aws_error(403, "UnrecognizedClientException", "The security token included in the request is invalid.");
    let (result, requests) = run_with(reply, |base_url| {
        let mut request = simple_request(base_url);
        request.target.settings = json!({"region": REGION});
        request.target.api_key = Some("ABSK-wrong-key-0123456789".to_owned());
        request
    })
    .await;
    assert_eq!(requests.len(), 1);
    let error = result.expect_err("403");
    assert_eq!((error.kind, error.retryable), (ChatErrorKind::Auth, false));
}

#[tokio::test]
async fn connection_reset_mid_stream_is_a_retryable_error_item() {
    let body = fixture("bedrock/converse_stream_text_live.eventstream");
    // Through the second text delta, then half of the contentBlockStop frame.
    let mut reply = eventstream(split_at(&body[..600], &[180, 400]));
    reply.cut = true;
    let (result, _) = run(reply).await;
    let items = result.expect("headers arrived");
    assert_eq!(items[..2], [Ok(ModelEvent::TextDelta("OK".to_owned())), Ok(ModelEvent::TextDelta(".".to_owned()))]);
    assert_eq!(items.len(), 3, "{items:?}");
    let error = last_error(&items);
    assert_eq!((error.kind, error.retryable), (ChatErrorKind::Provider, true));
}

#[tokio::test]
async fn a_reset_after_the_stop_reason_still_finishes() {
    let body = fixture("bedrock/converse_stream_text_live.eventstream");
    // Everything up to the middle of the metadata frame.
    let mut reply = eventstream(split_at(&body[..1000], &[900]));
    reply.cut = true;
    let (result, _) = run(reply).await;
    let events: Vec<ModelEvent> = result.expect("opens").into_iter().map(|i| i.expect("ok")).collect();
    assert_eq!(events, [text(&["OK", "."]), vec![ModelEvent::Finish(StopReason::EndTurn)]].concat());
}

#[tokio::test]
async fn a_stalled_stream_times_out() {
    let body = fixture("bedrock/converse_stream_text_live.eventstream");
    let mut reply = eventstream(vec![body[..359].to_vec()]);
    reply.stall = true;
    let server = BedrockServer::start(reply).await;
    let providers = super::Providers::new(Duration::from_secs(5), Duration::from_millis(300)).expect("client");
    let stream = providers.stream(simple_request(&server.base_url)).await.expect("opens");
    let items: Items = tokio::time::timeout(Duration::from_secs(10), stream.collect()).await.expect("ends");
    assert_eq!(items[0], Ok(ModelEvent::TextDelta("OK".to_owned())));
    let error = last_error(&items);
    assert_eq!((error.kind, error.retryable), (ChatErrorKind::Timeout, true));
}

#[tokio::test]
async fn settings_errors_are_config_errors_before_any_request() {
    let cases: [(&str, Value, Option<&str>, &str); 3] = [
        ("", json!({"access_key_id": ACCESS_KEY_ID}), Some(SECRET), "`region` is required when the base URL is empty"),
        ("http://127.0.0.1:9", json!({"access_key_id": ACCESS_KEY_ID}), Some(SECRET), "`region` is required to sign"),
        ("http://127.0.0.1:9", json!({"region": REGION, "access_key_id": ACCESS_KEY_ID}), None, "secret access key"),
    ];
    for (base_url, settings, key, needle) in cases {
        let mut request = simple_request(base_url);
        request.target.settings = settings;
        request.target.api_key = key.map(str::to_owned);
        let error = match providers().stream(request).await {
            Err(error) => error,
            Ok(_) => panic!("{needle}: expected a config error"),
        };
        assert_eq!((error.kind, error.retryable), (ChatErrorKind::Config, false), "{needle}");
        assert!(error.message.contains(needle), "{}", error.message);
    }
}

#[test]
fn endpoints() {
    let url = endpoint("", MODEL, Some("us-east-1")).expect("default endpoint");
    assert_eq!(
        url.as_str(),
        "https://bedrock-runtime.us-east-1.amazonaws.com/model/anthropic.claude-sonnet-4-5-20250929-v1%3A0/converse-stream"
    );
    let arn = "arn:aws:bedrock:us-east-1:123456789012:inference-profile/us.anthropic.claude-3-7-sonnet";
    let url = endpoint("https://gateway.example/bedrock/", arn, None).expect("custom endpoint");
    assert_eq!(
        url.as_str(),
        "https://gateway.example/bedrock/model/\
         arn%3Aaws%3Abedrock%3Aus-east-1%3A123456789012%3Ainference-profile%2Fus.anthropic.claude-3-7-sonnet/converse-stream"
    );
    assert!(endpoint("", MODEL, Some("us-east-1.evil.example/x")).is_err());
}

// ---------------------------------------------------------------------------------------------
// Requests

fn command_schema() -> Value {
    json!({"type": "object", "properties": {"command": {"type": "string"}}, "required": ["command"]})
}

const PNG: &[u8] = b"\x89PNG\r\n\x1a\nfake";

/// A conversation that uses every part: reasoning (signed, redacted, unsigned), text, tool
/// calls (one with arguments the model wrote as invalid JSON), results (failed, empty), an image,
/// a marker, and roles that must be merged to alternate.
fn conversation() -> Vec<PromptMessage> {
    let call =
        |id: &str, name: &str, args: Value| Part::ToolCall { call_id: id.to_owned(), name: name.to_owned(), args };
    let result = |id: &str, name: &str, result: &str, is_error: bool| Part::ToolResult {
        call_id: id.to_owned(),
        name: name.to_owned(),
        result: result.to_owned(),
        is_error,
    };
    vec![
        PromptMessage { role: Role::User, parts: vec![Part::text("List the files.")].into() },
        PromptMessage {
            role: Role::Assistant,
            parts: vec![
                Part::Reasoning { text: "Use ls.".to_owned(), signature: Some("sig-1".to_owned()) },
                Part::text("Listing."),
                Part::text("\n\n"),
                call("call_1", "execute", json!({"command": "ls"})),
                call("call_2", "read_file", json!({"path": "a"})),
            ]
            .into(),
        },
        PromptMessage {
            role: Role::Tool,
            parts: vec![
                result("call_1", "execute", "a\nb", false),
                result("call_2", "read_file", "no such file", true),
            ]
            .into(),
        },
        PromptMessage {
            role: Role::Assistant,
            parts: vec![
                Part::Reasoning { text: String::new(), signature: Some("bedrock-redacted:UkVEQUNURUQ=".to_owned()) },
                call("call_3", "execute", Value::String("{\"command\":".to_owned())),
            ]
            .into(),
        },
        PromptMessage { role: Role::Tool, parts: vec![result("call_3", "execute", "", false)].into() },
        PromptMessage { role: Role::Marker, parts: vec![Part::text("Model changed.")].into() },
        PromptMessage {
            role: Role::User,
            parts: vec![Part::text("What is this?"), Part::Image { file_id: "file_9".to_owned() }].into(),
        },
        // Only unsigned reasoning: nothing to send, so the user messages around it join.
        PromptMessage {
            role: Role::Assistant,
            parts: vec![Part::Reasoning { text: "Hmm.".to_owned(), signature: None }].into(),
        },
        PromptMessage { role: Role::User, parts: vec![Part::text("Go on.")].into() },
    ]
}

fn images() -> HashMap<String, ImageData> {
    let image = ImageData { media_type: "image/png".to_owned(), bytes: Arc::from(PNG) };
    HashMap::from([("file_9".to_owned(), image)])
}

fn tool_result(id: &str, text: &str, status: &str) -> Value {
    json!({"toolResult": {"toolUseId": id, "content": [{"text": text}], "status": status}})
}

#[tokio::test]
async fn request_shape() {
    let body = fixture("bedrock/converse_stream_text_live.eventstream");
    let (result, requests) = run_with(eventstream(vec![body]), |base_url| ModelRequest {
        target: target(base_url),
        system: "You are a coding agent.".to_owned(),
        messages: conversation().into(),
        tools: vec![ToolSpec {
            name: "execute".to_owned(),
            description: "Run a command.".to_owned(),
            parameters: command_schema(),
        }]
        .into(),
        images: images(),
        memo: Default::default(),
    })
    .await;
    assert!(result.expect("opens").iter().all(Result::is_ok));
    assert_eq!(requests.len(), 1);
    let (recorded, check) = &requests[0];
    assert_eq!(check, &Ok(()), "the signature checks out");
    assert_eq!(recorded.method, "POST");
    assert_eq!(recorded.path, MODEL_PATH);
    assert_eq!(recorded.header("content-type"), Some("application/json"));
    let authorization = recorded.header("authorization").expect("signed");
    let scope_prefix = format!("AWS4-HMAC-SHA256 Credential={ACCESS_KEY_ID}/");
    assert!(authorization.starts_with(&scope_prefix), "{authorization}");
    assert!(authorization.contains(&format!("/{REGION}/bedrock/aws4_request, ")), "{authorization}");
    assert!(
        authorization.contains("SignedHeaders=content-type;host;x-amz-content-sha256;x-amz-date, "),
        "{authorization}"
    );
    assert_eq!(recorded.header("x-amz-security-token"), None);
    assert!(!recorded.headers.iter().any(|(_, v)| v.contains(SECRET)), "the secret is never sent");

    let png = data_encoding::BASE64.encode(PNG);
    assert_eq!(
        recorded.json(),
        json!({
            "system": [{"text": "You are a coding agent."}],
            "messages": [
                {"role": "user", "content": [{"text": "List the files."}]},
                {"role": "assistant", "content": [
                    {"reasoningContent": {"reasoningText": {"text": "Use ls.", "signature": "sig-1"}}},
                    {"text": "Listing."},
                    {"toolUse": {"toolUseId": "call_1", "name": "execute", "input": {"command": "ls"}}},
                    {"toolUse": {"toolUseId": "call_2", "name": "read_file", "input": {"path": "a"}}},
                ]},
                {"role": "user", "content": [
                    tool_result("call_1", "a\nb", "success"),
                    tool_result("call_2", "no such file", "error"),
                ]},
                {"role": "assistant", "content": [
                    {"reasoningContent": {"redactedContent": "UkVEQUNURUQ="}},
                    {"toolUse": {"toolUseId": "call_3", "name": "execute", "input": {}}},
                ]},
                {"role": "user", "content": [
                    tool_result("call_3", "(no output)", "success"),
                    {"text": "What is this?"},
                    {"image": {"format": "png", "source": {"bytes": png}}},
                    {"text": "Go on."},
                ]},
            ],
            "toolConfig": {"tools": [{"toolSpec": {
                "name": "execute",
                "description": "Run a command.",
                "inputSchema": {"json": command_schema()},
            }}]},
            "inferenceConfig": {"maxTokens": 1024},
        })
    );
}

#[tokio::test]
async fn without_tools_calls_and_results_are_told_as_text() {
    let body = fixture("bedrock/converse_stream_text_live.eventstream");
    let (result, requests) = run_with(eventstream(vec![body]), |base_url| {
        let mut request = simple_request(base_url);
        request.target.max_output_tokens = None;
        request.target.settings = json!({
            "region": REGION,
            "access_key_id": ACCESS_KEY_ID,
            "cache_points": true,
            "additional_model_request_fields": {"thinking": {"type": "enabled", "budget_tokens": 2048}},
        });
        request.messages = conversation()[..3].to_vec().into();
        Arc::make_mut(&mut request.messages)
            .push(PromptMessage { role: Role::User, parts: vec![Part::text("Summarise.")].into() });
        request
    })
    .await;
    assert!(result.expect("opens").iter().all(Result::is_ok));
    let (recorded, check) = &requests[0];
    assert_eq!(check, &Ok(()));
    let cache_point = json!({"cachePoint": {"type": "default"}});
    assert_eq!(
        recorded.json(),
        json!({
            "system": [{"text": "You are terse."}, cache_point],
            "messages": [
                {"role": "user", "content": [{"text": "List the files."}]},
                {"role": "assistant", "content": [
                    {"reasoningContent": {"reasoningText": {"text": "Use ls.", "signature": "sig-1"}}},
                    {"text": "Listing."},
                    {"text": "[tool call execute (call_1): {\"command\":\"ls\"}]"},
                    {"text": "[tool call read_file (call_2): {\"path\":\"a\"}]"},
                ]},
                {"role": "user", "content": [
                    {"text": "[tool result execute (call_1)]\na\nb"},
                    {"text": "[tool error read_file (call_2)]\nno such file"},
                    {"text": "Summarise."},
                    cache_point,
                ]},
            ],
            "additionalModelRequestFields": {"thinking": {"type": "enabled", "budget_tokens": 2048}},
        })
    );
}

#[tokio::test]
async fn temporary_credentials_sign_the_session_token() {
    let body = fixture("bedrock/converse_stream_text_live.eventstream");
    let (result, requests) = run_with(eventstream(vec![body]), |base_url| {
        let mut request = simple_request(base_url);
        // The session token travels with the secret in the (encrypted) API key.
        request.target.api_key = Some(format!("{SECRET}:{SESSION_TOKEN}"));
        request
    })
    .await;
    assert!(result.expect("opens").iter().all(Result::is_ok));
    let (recorded, check) = &requests[0];
    assert_eq!(check, &Ok(()), "the token is signed");
    assert_eq!(recorded.header("x-amz-security-token"), Some(SESSION_TOKEN));
    let authorization = recorded.header("authorization").expect("signed");
    assert!(authorization.contains("x-amz-date;x-amz-security-token"), "{authorization}");
}

#[tokio::test]
async fn a_bedrock_api_key_is_a_bearer_token() {
    let body = fixture("bedrock/converse_stream_text_live.eventstream");
    let (result, requests) = run_with(eventstream(vec![body]), |base_url| {
        let mut request = simple_request(base_url);
        request.target.settings = json!({"region": REGION});
        request.target.api_key = Some(BEARER_KEY.to_owned());
        request.system = String::new();
        request
    })
    .await;
    let events: Vec<ModelEvent> = result.expect("opens").into_iter().map(|i| i.expect("ok")).collect();
    assert_eq!(events, live_events());
    let (recorded, check) = &requests[0];
    assert_eq!(check, &Ok(()));
    assert_eq!(recorded.path, MODEL_PATH);
    assert_eq!(recorded.header("x-amz-date"), None);
    assert_eq!(
        recorded.json(),
        json!({
            "messages": [{"role": "user", "content": [{"text": "Reply with exactly OK."}]}],
            "inferenceConfig": {"maxTokens": 1024},
        })
    );
}

#[tokio::test]
async fn images_that_cannot_be_sent_are_config_errors_before_sending() {
    let server = BedrockServer::start(eventstream(Vec::new())).await;
    let with_image = |images: HashMap<String, ImageData>| {
        let mut request = simple_request(&server.base_url);
        request.messages = vec![PromptMessage {
            role: Role::User,
            parts: vec![Part::text("Look"), Part::Image { file_id: "file_9".to_owned() }].into(),
        }]
        .into();
        request.images = images;
        request
    };
    let bmp = ImageData { media_type: "image/bmp".to_owned(), bytes: Arc::from(&b"BM"[..]) };
    for (images, needle) in [
        (HashMap::new(), "image file_9 is referenced but its bytes were not provided"),
        (HashMap::from([("file_9".to_owned(), bmp)]), "image file_9 has type image/bmp"),
    ] {
        let error = match providers().stream(with_image(images)).await {
            Err(error) => error,
            Ok(_) => panic!("expected a config error"),
        };
        assert_eq!((error.kind, error.retryable), (ChatErrorKind::Config, false));
        assert!(error.message.contains(needle), "{}", error.message);
    }
    assert!(server.requests().is_empty(), "nothing was sent");
}
