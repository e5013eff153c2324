//! The Anthropic Messages client against the local test server of `tests.rs`: every recorded
//! Anthropic stream replayed byte for byte in small pieces, error statuses and in-stream error
//! events, resets, and the request body checked field by field against the Messages API schema
//! (roles, system blocks, tools, tool use and results, thinking replay, images, cache
//! breakpoints).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use agentplane_actors::ports::{
    ImageData, ModelClient, ModelError, ModelEvent, ModelRequest, ModelTarget, PromptMessage, StopReason, ToolSpec,
    Usage,
};
use agentplane_schema::api::{ChatErrorKind, ProviderType};
use agentplane_schema::message::{Part, Role};
use futures::StreamExt;
use serde_json::{Value, json};

use super::anthropic::decode_body;
use super::tests::{
    API_KEY, Items, Recorded, Reply, TestServer, all_ok, args, call as serve_and_send, check_shape, fixture, providers,
    reasoning_events as thinking, signature_event as signature, start, text_events as text, usage_event as usage,
};

fn target(base_url: &str) -> ModelTarget {
    ModelTarget {
        provider_type: ProviderType::Anthropic,
        base_url: base_url.to_owned(),
        api_key: Some(API_KEY.to_owned()),
        model: "claude-sonnet-4-5".to_owned(),
        max_output_tokens: Some(1024),
        settings: Value::Null,
    }
}

fn simple_request(base_url: &str) -> ModelRequest {
    ModelRequest {
        target: target(base_url),
        system: "You are terse.".to_owned(),
        messages: vec![PromptMessage { role: Role::User, parts: vec![Part::text("What's the weather?")].into() }]
            .into(),
        tools: Vec::new().into(),
        images: HashMap::new(),
        memo: Default::default(),
    }
}

/// Sends `request` (its base URL pointed at a server answering `reply`) through the real client.
async fn run_request(reply: Reply, mut request: ModelRequest) -> (Result<Items, ModelError>, Vec<Recorded>) {
    serve_and_send(reply, move |base_url: &str| {
        request.target.base_url = base_url.to_owned();
        request
    })
    .await
}

async fn run(reply: Reply) -> (Result<Items, ModelError>, Vec<Recorded>) {
    run_request(reply, simple_request("")).await
}

/// Replays a raw fixture in 7-byte pieces (splitting lines, JSON and UTF-8 sequences) and checks
/// that decoding the whole body without HTTP gives the same events.
async fn replay_body(body: &[u8]) -> Vec<ModelEvent> {
    let (result, _) = run(Reply::sse(body, 7)).await;
    let events = all_ok(result.expect("stream opens"));
    check_shape(&events);
    assert_eq!(decode_body(body), events.iter().cloned().map(Ok).collect::<Items>(), "decode_body agrees");
    events
}

async fn replay(name: &str) -> Vec<ModelEvent> {
    replay_body(&fixture(&format!("anthropic/{name}"))).await
}

/// SSE events as the API names them: `event: <type>` and the JSON as data.
fn sse_events(events: &[Value]) -> Vec<u8> {
    let mut body = String::new();
    for event in events {
        let name = event["type"].as_str().expect("type");
        body.push_str(&format!("event: {name}\ndata: {event}\n\n"));
    }
    body.into_bytes()
}

fn message_start(usage: Value) -> Value {
    json!({"type": "message_start", "message": {"id": "msg_1", "type": "message", "role": "assistant",
        "model": "claude-test", "content": [], "stop_reason": null, "stop_sequence": null, "usage": usage}})
}

fn text_block(index: u64, pieces: &[&str]) -> Vec<Value> {
    let mut events =
        vec![json!({"type": "content_block_start", "index": index, "content_block": {"type": "text", "text": ""}})];
    for piece in pieces {
        events.push(json!({"type": "content_block_delta", "index": index,
            "delta": {"type": "text_delta", "text": piece}}));
    }
    events.push(json!({"type": "content_block_stop", "index": index}));
    events
}

fn message_delta(stop_reason: &str, usage: Value) -> Value {
    json!({"type": "message_delta", "delta": {"stop_reason": stop_reason, "stop_sequence": null}, "usage": usage})
}

fn error_event(kind: &str, message: &str) -> Value {
    json!({"type": "error", "error": {"type": kind, "message": message}})
}

// ---------------------------------------------------------------------------------------------
// Recorded streams

#[tokio::test]
async fn text_basic() {
    let mut expected = text(&["Hello", " there", "!"]);
    expected.extend([usage(11, 6), ModelEvent::Finish(StopReason::EndTurn)]);
    assert_eq!(replay("text_basic.sse").await, expected);
}

#[tokio::test]
async fn tool_use_input_json_delta() {
    let mut expected = text(&["I", "'ll check the current weather in Paris for you."]);
    expected.push(start(0, "toolu_01NRLabsLyVHZPKxbKvkfSMn", "get_weather"));
    // The first, empty `input_json_delta` sends nothing.
    expected.extend(args(0, &["{\"locati", "on\": \"P", "ar", "is\"}"]));
    expected.extend([usage(377, 65), ModelEvent::Finish(StopReason::ToolUse)]);
    assert_eq!(replay("tool_use_input_json_delta.sse").await, expected);
}

#[tokio::test]
async fn tool_use_cut_by_max_tokens_does_not_crash() {
    let mut expected = text(&[
        "I",
        "'ll create a comprehensive tax guide for",
        " someone with multiple W2s an",
        "d save it in a file called taxes.txt. Let",
        " me do that for you now.",
    ]);
    expected.push(start(0, "toolu_01EKqbqmZrGRXy18eN7m9kvY", "make_file"));
    expected.extend(args(
        0,
        &[
            "{\"filename\": \"taxes.txt",
            "\", \"lines_of_text\": [\n\"# COMPREHENSIVE TAX GUIDE FOR INDIVIDUALS WITH MULTIPLE W-2s\",\n\"\",\n\"## INTRODUCTION\",\n\"\",",
            "\n\"Filing taxes",
        ],
    ));
    // The arguments are cut mid-string and the block never stopped: the loop gets what there
    // is and the reason it ended.
    expected.extend([usage(450, 124), ModelEvent::Finish(StopReason::MaxTokens)]);
    assert_eq!(replay("tool_use_incomplete_partial_json_max_tokens.sse").await, expected);
}

#[tokio::test]
async fn refusal_is_content_filter() {
    assert_eq!(
        replay("refusal_stop_details.sse").await,
        vec![usage(20, 0), ModelEvent::Finish(StopReason::ContentFilter)]
    );
}

#[tokio::test]
async fn thinking_with_signature_then_refusal() {
    let mut expected = thinking(&[
        "Simple educ",
        "ational question about what a solar eclipse is. This is benign general knowledge — definitions are fine. Also the user called",
        " me \"claudius\" — I'm Claude. Minor correction or just roll with it politely.",
    ]);
    expected.push(signature("c3ludGhldGljLXNpZ25hdHVyZS1maXh0dXJlLWEtbm90LWEtcmVhbC1zaWduYXR1cmU="));
    expected.extend(text(&["Hi"]));
    expected.extend([usage(28, 106), ModelEvent::Finish(StopReason::ContentFilter)]);
    assert_eq!(replay("thinking_signature_then_refusal.sse").await, expected);
}

#[tokio::test]
async fn server_tool_use_and_its_result_are_not_client_calls() {
    let mut expected = text(&["Here's a summary of this year's solar eclipses and how"]);
    // `message_delta` repeats the input side of the usage; its numbers replace `message_start`'s.
    expected.extend([usage(28, 106), ModelEvent::Finish(StopReason::ContentFilter)]);
    assert_eq!(replay("server_tool_use_web_search_result.sse").await, expected);
}

#[tokio::test]
async fn usage_only_in_message_delta() {
    let mut expected = text(&["Hello"]);
    expected.extend([usage(12, 6), ModelEvent::Finish(StopReason::EndTurn)]);
    assert_eq!(replay("usage_omitted_in_message_start.sse").await, expected);
}

#[tokio::test]
async fn block_index_without_a_zero_is_tolerated() {
    assert_eq!(
        replay("out_of_order_block_index.sse").await,
        vec![usage(11, 1), ModelEvent::Finish(StopReason::EndTurn)]
    );
}

#[tokio::test]
async fn recorded_extended_thinking() {
    // Decoded JSON lines: each becomes one `data:` event (no `event:` line; the decoder reads
    // the JSON's own `type`).
    let lines = String::from_utf8(fixture("anthropic/thinking_signature.chunks.jsonl")).expect("UTF-8");
    let body: String = lines.lines().map(|line| format!("data: {line}\n\n")).collect();
    let mut expected = thinking(&[
        "The previous",
        " result",
        " was",
        " 925.",
        " Now",
        " I need to divide that",
        " by 5.\n\n925",
        " ÷ 5 ",
        "= 185",
    ]);
    expected.push(signature(concat!(
        "EvQBCkYICxgCKkAxhD4NUKFzudtZ6NzbZdEiBACIScTzqjPViM596iWLZIk4EFKYYBj3B6Ptl3b0dcQv/VeJBNbejNWIWRBn+KPNEgz6HWtK",
        "x7p+QRgKsEoaDGjsiqfht7gTRFYHiyIwD1VSmNqHxv3wy8KEMP+LYb/TC4UH3H97tuoaADARFFcA0phdfxnzKQxFnc9lwY+dKlzUsaKSUAFe",
        "u1bDL5ikZJ1vL0Fkz6JjoFke0L/wOJRIUDUlDUOFJ1tZ3ea7g6LGE/5hwuvWgLwewdcm64d+43l7F57XrOmqNd6flI2K/oPr/4yzNgvi/EhT6C",
        "a17BgB",
    )));
    expected.extend(text(&["925", " ÷ 5 ", "= 185"]));
    expected.extend([usage(69, 53), ModelEvent::Finish(StopReason::EndTurn)]);
    assert_eq!(replay_body(body.as_bytes()).await, expected);
}

#[tokio::test]
async fn byte_by_byte_delivery_gives_the_same_events() {
    let body = fixture("anthropic/thinking_signature_then_refusal.sse");
    let whole = replay_body(&body).await;
    let (result, _) = run(Reply::sse(&body, 1)).await;
    assert_eq!(all_ok(result.expect("opens")), whole);
}

// ---------------------------------------------------------------------------------------------
// Usage and stop reasons

#[tokio::test]
async fn cache_reads_and_writes_are_part_of_the_input() {
    let mut events = vec![message_start(json!({"input_tokens": 5, "cache_creation_input_tokens": 200,
        "cache_read_input_tokens": 1000, "output_tokens": 1}))];
    events.extend(text_block(0, &["ok"]));
    events.push(message_delta("end_turn", json!({"output_tokens": 30})));
    events.push(json!({"type": "message_stop"}));
    let items = all_ok(run(Reply::sse(&sse_events(&events), 11)).await.0.expect("opens"));
    assert_eq!(
        items,
        vec![
            ModelEvent::TextDelta("ok".to_owned()),
            ModelEvent::Usage(Usage {
                input_tokens: 1205,
                output_tokens: 30,
                cache_read_tokens: 1000,
                cache_write_tokens: 200,
            }),
            ModelEvent::Finish(StopReason::EndTurn),
        ]
    );
}

#[test]
fn stop_reasons_map_to_the_loop_s_words() {
    let cases = [
        ("end_turn", StopReason::EndTurn),
        ("stop_sequence", StopReason::EndTurn),
        ("tool_use", StopReason::ToolUse),
        ("max_tokens", StopReason::MaxTokens),
        ("model_context_window_exceeded", StopReason::MaxTokens),
        ("refusal", StopReason::ContentFilter),
        ("pause_turn", StopReason::Other),
        ("something_new", StopReason::Other),
    ];
    for (wire, expected) in cases {
        let body = sse_events(&[
            message_start(json!({"input_tokens": 1, "output_tokens": 1})),
            message_delta(wire, json!({"output_tokens": 2})),
            json!({"type": "message_stop"}),
        ]);
        let items = decode_body(&body);
        assert_eq!(items.last(), Some(&Ok(ModelEvent::Finish(expected))), "{wire}");
    }
}

#[test]
fn a_call_without_arguments_and_unknown_blocks_and_deltas() {
    let body = sse_events(&[
        message_start(json!({"input_tokens": 3, "output_tokens": 1})),
        json!({"type": "content_block_start", "index": 0,
            "content_block": {"type": "redacted_thinking", "data": "EmwKAhgBEgy3va3pzix"}}),
        json!({"type": "content_block_stop", "index": 0}),
        json!({"type": "content_block_start", "index": 1,
            "content_block": {"type": "tool_use", "id": "toolu_a", "name": "list_templates", "input": {}}}),
        json!({"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": ""}}),
        json!({"type": "content_block_stop", "index": 1}),
        json!({"type": "content_block_start", "index": 2,
            "content_block": {"type": "tool_use", "id": "toolu_b", "name": "execute", "input": {"command": "ls"}}}),
        json!({"type": "content_block_stop", "index": 2}),
        json!({"type": "content_block_delta", "index": 3, "delta": {"type": "citations_delta", "citation": {}}}),
        json!({"type": "some_future_event", "index": 3}),
        message_delta("tool_use", json!({"output_tokens": 9})),
        json!({"type": "message_stop"}),
    ]);
    let events: Vec<ModelEvent> = decode_body(&body).into_iter().map(|i| i.expect("ok")).collect();
    check_shape(&events);
    let mut expected = vec![start(0, "toolu_a", "list_templates"), start(1, "toolu_b", "execute")];
    // A gateway that sends the whole input up front is taken at its word.
    expected.extend(args(1, &[r#"{"command":"ls"}"#]));
    expected.extend([usage(3, 9), ModelEvent::Finish(StopReason::ToolUse)]);
    assert_eq!(events, expected);
}

// ---------------------------------------------------------------------------------------------
// Errors

async fn status_error(reply: Reply) -> ModelError {
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

fn error_body(kind: &str, message: &str) -> String {
    json!({"type": "error", "error": {"type": kind, "message": message}, "request_id": "req_011CV5J4"}).to_string()
}

#[tokio::test]
async fn rate_limit_with_retry_after() {
    let body = error_body("rate_limit_error", "Number of request tokens has exceeded your per-minute rate limit");
    let error = status_error(Reply::json(429, &body).header("retry-after", "7")).await;
    assert_eq!((error.kind, error.retryable), (ChatErrorKind::RateLimit, true));
    assert_eq!(error.retry_after, Some(Duration::from_secs(7)));
    assert!(error.message.contains("per-minute rate limit"), "{}", error.message);
}

#[tokio::test]
async fn overloaded_529_is_retryable() {
    let error = status_error(Reply::json(529, &error_body("overloaded_error", "Overloaded"))).await;
    assert_eq!((error.kind, error.retryable), (ChatErrorKind::Overloaded, true));
    assert!(error.message.starts_with("HTTP 529") && error.message.ends_with("Overloaded"), "{}", error.message);
}

#[tokio::test]
async fn internal_server_error_is_a_retryable_provider_error() {
    let error = status_error(Reply::json(500, &error_body("api_error", "Internal server error"))).await;
    assert_eq!((error.kind, error.retryable), (ChatErrorKind::Provider, true));
}

#[tokio::test]
async fn unauthorized_is_auth_and_hides_the_key() {
    let body = error_body("authentication_error", &format!("invalid x-api-key {API_KEY}"));
    let error = status_error(Reply::json(401, &body)).await;
    assert_eq!((error.kind, error.retryable), (ChatErrorKind::Auth, false));
    assert!(error.message.contains("invalid x-api-key <redacted>"), "{}", error.message);
}

#[tokio::test]
async fn prompt_too_long_is_context_overflow() {
    let body = error_body("invalid_request_error", "prompt is too long: 205351 tokens > 200000 maximum");
    let error = status_error(Reply::json(400, &body)).await;
    assert_eq!((error.kind, error.retryable), (ChatErrorKind::ContextOverflow, false));
    let body = error_body(
        "invalid_request_error",
        "input length and `max_tokens` exceed context limit: 188240 + 21333 > 200000, decrease input length or \
         `max_tokens` and try again",
    );
    let error = status_error(Reply::json(400, &body)).await;
    assert_eq!((error.kind, error.retryable), (ChatErrorKind::ContextOverflow, false));
    let body = error_body("invalid_request_error", "messages: roles must alternate");
    let error = status_error(Reply::json(400, &body)).await;
    assert_eq!((error.kind, error.retryable), (ChatErrorKind::Config, false));
}

#[tokio::test]
async fn connection_reset_mid_stream_is_a_retryable_error_item() {
    let body = fixture("anthropic/tool_use_input_json_delta.sse");
    let piece = br#""on\": \"P""#;
    let cut = body.windows(piece.len()).position(|w| w == piece).expect("a piece of the arguments");
    let mut reply = Reply::sse(&body[..cut], 50);
    reply.cut = true;
    let items = run(reply).await.0.expect("headers arrived");
    let (last, before) = items.split_last().expect("items");
    assert!(before.iter().all(Result::is_ok), "{items:?}");
    assert_eq!(before.first(), Some(&Ok(ModelEvent::TextDelta("I".to_owned()))));
    assert!(before.iter().any(|i| matches!(i, Ok(ModelEvent::ToolCallStart { .. }))), "{items:?}");
    assert!(!before.iter().any(|i| matches!(i, Ok(ModelEvent::Finish(_)))), "no Finish after a cut: {items:?}");
    let error = last.as_ref().expect_err("ends with an error");
    assert_eq!((error.kind, error.retryable), (ChatErrorKind::Provider, true));
}

#[tokio::test]
async fn cut_after_the_stop_reason_still_finishes() {
    let body = fixture("anthropic/text_basic.sse");
    let last_event = b"event: message_stop";
    let end = body.windows(last_event.len()).position(|w| w == last_event).expect("message_stop");
    let mut reply = Reply::sse(&body[..end], 64);
    reply.cut = true;
    let items = all_ok(run(reply).await.0.expect("opens"));
    assert_eq!(items.last(), Some(&ModelEvent::Finish(StopReason::EndTurn)));
    assert_eq!(items.len(), 5, "{items:?}");
}

#[tokio::test]
async fn a_body_that_ends_before_the_stop_reason_is_an_error() {
    let mut events = vec![message_start(json!({"input_tokens": 3, "output_tokens": 1}))];
    events.extend(text_block(0, &["Half an ans"]));
    let items = run(Reply::sse(&sse_events(&events), 64)).await.0.expect("opens");
    assert_eq!(items[0], Ok(ModelEvent::TextDelta("Half an ans".to_owned())));
    let error = items.last().and_then(|i| i.as_ref().err()).expect("ends with an error");
    assert_eq!((error.kind, error.retryable), (ChatErrorKind::Provider, true));
    assert_eq!(items.len(), 2, "{items:?}");
}

#[tokio::test]
async fn overloaded_error_event_mid_stream() {
    let mut events = vec![message_start(json!({"input_tokens": 3, "output_tokens": 1}))];
    events.extend(text_block(0, &["Partial"]));
    events.push(error_event("overloaded_error", "Overloaded"));
    let items = run(Reply::sse(&sse_events(&events), 16)).await.0.expect("opens");
    assert_eq!(items.len(), 2, "{items:?}");
    assert_eq!(items[0], Ok(ModelEvent::TextDelta("Partial".to_owned())));
    let error = items[1].as_ref().expect_err("error item");
    assert_eq!((error.kind, error.retryable), (ChatErrorKind::Overloaded, true));
    assert_eq!(error.message, "provider error (overloaded_error): Overloaded");
}

#[test]
fn error_event_types_map_to_kinds() {
    let cases = [
        ("overloaded_error", "Overloaded", ChatErrorKind::Overloaded, true),
        ("rate_limit_error", "slow down", ChatErrorKind::RateLimit, true),
        ("api_error", "Internal server error", ChatErrorKind::Provider, true),
        ("timeout_error", "took too long", ChatErrorKind::Timeout, true),
        ("authentication_error", "invalid x-api-key", ChatErrorKind::Auth, false),
        ("permission_error", "no access to this model", ChatErrorKind::Auth, false),
        ("invalid_request_error", "prompt is too long: 210000 tokens > 200000", ChatErrorKind::ContextOverflow, false),
        ("invalid_request_error", "tools.0: missing input_schema", ChatErrorKind::Config, false),
        ("not_found_error", "model: claude-9", ChatErrorKind::Config, false),
        ("billing_error", "credit balance too low", ChatErrorKind::Config, false),
        ("mystery_error", "???", ChatErrorKind::Provider, true),
    ];
    for (kind, message, expected, retryable) in cases {
        // Without the `event: error` line too: the JSON's `type` says it is an error.
        let body = format!("data: {}\n\n", error_event(kind, message));
        let items = decode_body(body.as_bytes());
        assert_eq!(items.len(), 1, "{kind}: {items:?}");
        let error = items[0].as_ref().expect_err("error");
        assert_eq!((error.kind, error.retryable), (expected, retryable), "{kind}");
        assert!(error.message.contains(message), "{kind}: {}", error.message);
    }
}

#[test]
fn malformed_json_ends_the_stream_with_an_error() {
    let body = b"event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\n\n";
    let items = decode_body(body);
    assert_eq!(items.len(), 1, "{items:?}");
    let error = items[0].as_ref().expect_err("error");
    assert_eq!((error.kind, error.retryable), (ChatErrorKind::Provider, true));
}

// ---------------------------------------------------------------------------------------------
// Requests

const PNG: &[u8] = b"\x89PNG\r\n\x1a\nnot really";

fn command_schema() -> Value {
    json!({"type": "object", "properties": {"command": {"type": "string"}}, "required": ["command"]})
}

fn tool(name: &str) -> ToolSpec {
    ToolSpec { name: name.to_owned(), description: format!("The {name} tool."), parameters: command_schema() }
}

fn call(call_id: &str, name: &str, args: Value) -> Part {
    Part::ToolCall { call_id: call_id.to_owned(), name: name.to_owned(), args }
}

fn result(call_id: &str, result: &str, is_error: bool) -> Part {
    Part::ToolResult { call_id: call_id.to_owned(), name: "execute".to_owned(), result: result.to_owned(), is_error }
}

fn message(role: Role, parts: Vec<Part>) -> PromptMessage {
    PromptMessage { role, parts: parts.into() }
}

/// Sends `request` against a server answering `text_basic.sse` and returns what it received.
async fn sent(request: ModelRequest) -> Recorded {
    let (result, requests) = run_request(Reply::sse(&fixture("anthropic/text_basic.sse"), 4096), request).await;
    assert!(result.expect("opens").iter().all(Result::is_ok));
    assert_eq!(requests.len(), 1);
    requests.into_iter().next().expect("one request")
}

#[tokio::test]
async fn request_shape() {
    let request = ModelRequest {
        target: target(""),
        system: "You are a coding agent.".to_owned(),
        messages: vec![
            message(Role::User, vec![Part::text("List the files.")]),
            message(
                Role::Assistant,
                vec![
                    Part::Reasoning { text: "Use ls.".to_owned(), signature: Some("sig-1".to_owned()) },
                    Part::text("Listing."),
                    call("toolu_1", "execute", json!({"command": "ls"})),
                    call("toolu_2", "read_file", json!({"path": "a"})),
                ],
            ),
            message(Role::Tool, vec![result("toolu_1", "a\nb", false), result("toolu_2", "no such file", true)]),
            message(
                Role::Assistant,
                vec![
                    // Unsigned reasoning (another provider's) is not sent.
                    Part::Reasoning { text: "Hmm.".to_owned(), signature: None },
                    // Arguments the model wrote as invalid JSON are stored as a string.
                    call("toolu_3", "execute", Value::String("{\"command\": \"l".to_owned())),
                ],
            ),
            message(Role::Tool, vec![result("toolu_3", "", true)]),
            // A message the user queued while the tools ran: merged into the tool results'
            // user message, after them.
            message(Role::User, vec![Part::text("What is this?"), Part::Image { file_id: "file_9".to_owned() }]),
        ]
        .into(),
        tools: vec![tool("execute"), tool("read_file")].into(),
        images: HashMap::from([(
            "file_9".to_owned(),
            ImageData { media_type: "image/png".to_owned(), bytes: Arc::from(PNG) },
        )]),
        memo: Default::default(),
    };
    let recorded = sent(request).await;
    assert_eq!(recorded.method, "POST");
    // The test server's base URL ends in `/v1/`: it is not doubled.
    assert_eq!(recorded.path, "/v1/messages");
    assert_eq!(recorded.header("x-api-key"), Some(API_KEY));
    assert_eq!(recorded.header("anthropic-version"), Some("2023-06-01"));
    assert_eq!(recorded.header("content-type"), Some("application/json"));
    assert_eq!(recorded.header("accept"), Some("text/event-stream"));
    assert_eq!(recorded.header("authorization"), None, "the key travels only in x-api-key");
    let cached = json!({"type": "ephemeral"});
    assert_eq!(
        recorded.json(),
        json!({
            "model": "claude-sonnet-4-5",
            "max_tokens": 1024,
            "stream": true,
            "system": [{"type": "text", "text": "You are a coding agent.", "cache_control": cached}],
            "tools": [
                {"name": "execute", "description": "The execute tool.", "input_schema": command_schema()},
                {"name": "read_file", "description": "The read_file tool.", "input_schema": command_schema(),
                    "cache_control": cached},
            ],
            "messages": [
                {"role": "user", "content": [{"type": "text", "text": "List the files."}]},
                {"role": "assistant", "content": [
                    {"type": "thinking", "thinking": "Use ls.", "signature": "sig-1"},
                    {"type": "text", "text": "Listing."},
                    {"type": "tool_use", "id": "toolu_1", "name": "execute", "input": {"command": "ls"}},
                    {"type": "tool_use", "id": "toolu_2", "name": "read_file", "input": {"path": "a"}},
                ]},
                {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": "toolu_1", "content": "a\nb", "is_error": false},
                    // The previous step's last block: a second breakpoint for the cache.
                    {"type": "tool_result", "tool_use_id": "toolu_2", "content": "no such file", "is_error": true,
                        "cache_control": cached},
                ]},
                {"role": "assistant", "content": [
                    {"type": "tool_use", "id": "toolu_3", "name": "execute", "input": {}},
                ]},
                {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": "toolu_3", "is_error": true},
                    {"type": "text", "text": "What is this?"},
                    {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                        "data": data_encoding::BASE64.encode(PNG)}, "cache_control": cached},
                ]},
            ],
        })
    );
}

/// Where `cache_control` sits in a body, as JSON pointers.
fn breakpoints(body: &Value) -> Vec<String> {
    fn walk(value: &Value, path: String, out: &mut Vec<String>) {
        match value {
            Value::Object(map) => {
                if map.contains_key("cache_control") {
                    out.push(path.clone());
                }
                for (key, child) in map {
                    walk(child, format!("{path}/{key}"), out);
                }
            }
            Value::Array(items) => {
                for (i, child) in items.iter().enumerate() {
                    walk(child, format!("{path}/{i}"), out);
                }
            }
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk(body, String::new(), &mut out);
    out.sort();
    out
}

#[tokio::test]
async fn cache_breakpoints_follow_the_turn() {
    // A long agent turn: user, then five steps of a call and its result. At most four
    // breakpoints: tools, system, the previous step's result, the last result.
    let mut request = simple_request("");
    request.tools = vec![tool("execute")].into();
    for step in 0..5 {
        let id = format!("toolu_{step}");
        Arc::make_mut(&mut request.messages)
            .push(message(Role::Assistant, vec![call(&id, "execute", json!({"command": "ls"}))]));
        Arc::make_mut(&mut request.messages).push(message(Role::Tool, vec![result(&id, "ok", false)]));
    }
    let body = sent(request).await.json();
    assert_eq!(
        breakpoints(&body),
        ["/messages/10/content/0", "/messages/8/content/0", "/system/0", "/tools/0"],
        "{body:#}"
    );

    // A first message: it is the only one marked; no tools, no system, no tool breakpoint.
    let mut request = simple_request("");
    request.system = String::new();
    let body = sent(request).await.json();
    assert_eq!(breakpoints(&body), ["/messages/0/content/0"]);
    assert!(body.get("system").is_none() && body.get("tools").is_none(), "{body}");
}

#[tokio::test]
async fn consecutive_roles_merge_and_empty_messages_are_dropped() {
    let mut request = simple_request("");
    request.messages = vec![
        message(Role::User, vec![Part::text("one")]),
        // A summary reads as user context; a marker is never sent.
        message(Role::Summary, vec![Part::text("summary")]),
        message(Role::Marker, vec![Part::text("conversation summarised")]),
        // An answer interrupted while thinking: nothing to send.
        message(Role::Assistant, vec![Part::Reasoning { text: "Hmm".to_owned(), signature: Some("s".to_owned()) }]),
        message(Role::User, vec![Part::text(""), Part::text("two")]),
        message(Role::Assistant, vec![Part::text("answer")]),
        message(Role::User, vec![Part::text("three")]),
    ]
    .into();
    let body = sent(request).await.json();
    let cached = json!({"type": "ephemeral"});
    assert_eq!(
        body["messages"],
        json!([
            {"role": "user", "content": [
                {"type": "text", "text": "one"},
                {"type": "text", "text": "summary"},
                {"type": "text", "text": "two", "cache_control": cached},
            ]},
            {"role": "assistant", "content": [{"type": "text", "text": "answer"}]},
            {"role": "user", "content": [{"type": "text", "text": "three", "cache_control": cached}]},
        ])
    );
}

#[tokio::test]
async fn max_tokens_and_extended_thinking() {
    // No limit anywhere: the default.
    let mut request = simple_request("");
    request.target.max_output_tokens = None;
    let body = sent(request.clone()).await.json();
    assert_eq!(body["max_tokens"], 8192);
    assert!(body.get("thinking").is_none());

    // The provider's setting when the model has none.
    request.target.settings = json!({"max_tokens": 2048});
    assert_eq!(sent(request.clone()).await.json()["max_tokens"], 2048);

    // Thinking on, no limit: room for the budget and an answer.
    request.target.settings = json!({"thinking_budget_tokens": 4000});
    let body = sent(request.clone()).await.json();
    assert_eq!(body["thinking"], json!({"type": "enabled", "budget_tokens": 4000}));
    assert_eq!(body["max_tokens"], 12192);

    // A limit at or below the budget leaves no room: a config error before anything is sent.
    request.target.max_output_tokens = Some(4000);
    let (result, requests) = run_request(Reply::json(500, "{}"), request).await;
    let error = result.expect_err("config error");
    assert_eq!((error.kind, error.retryable), (ChatErrorKind::Config, false));
    assert!(error.message.contains("thinking_budget_tokens"), "{}", error.message);
    assert!(requests.is_empty());
}

#[tokio::test]
async fn base_url_without_v1_and_no_key() {
    let server = TestServer::start(Reply::sse(&fixture("anthropic/text_basic.sse"), 4096)).await;
    let mut request = simple_request(server.base_url.trim_end_matches("/v1/"));
    request.target.api_key = None;
    let items: Items = providers().stream(request).await.expect("opens").collect().await;
    assert!(items.iter().all(Result::is_ok));
    let recorded = &server.requests()[0];
    assert_eq!(recorded.path, "/v1/messages");
    assert_eq!(recorded.header("x-api-key"), None);
    assert_eq!(recorded.header("anthropic-version"), Some("2023-06-01"));
}

#[tokio::test]
async fn images_of_every_accepted_type_and_config_errors_for_the_rest() {
    let mut request = simple_request("");
    let mut images = HashMap::new();
    let mut parts = Vec::new();
    for (i, media_type) in ["image/jpeg", "image/png", "image/gif", "image/webp"].into_iter().enumerate() {
        let file_id = format!("file_{i}");
        images
            .insert(file_id.clone(), ImageData { media_type: media_type.to_owned(), bytes: Arc::from(&[i as u8][..]) });
        parts.push(Part::Image { file_id });
    }
    request.messages = vec![message(Role::User, parts)].into();
    request.images = images;
    let body = sent(request.clone()).await.json();
    let sources: Vec<Value> =
        body["messages"][0]["content"].as_array().expect("blocks").iter().map(|b| b["source"].clone()).collect();
    assert_eq!(
        sources,
        [
            json!({"type": "base64", "media_type": "image/jpeg", "data": "AA=="}),
            json!({"type": "base64", "media_type": "image/png", "data": "AQ=="}),
            json!({"type": "base64", "media_type": "image/gif", "data": "Ag=="}),
            json!({"type": "base64", "media_type": "image/webp", "data": "Aw=="}),
        ]
    );

    // A type the API does not take, and an image whose bytes are missing.
    let mut bmp = request.clone();
    bmp.images.insert("file_0".to_owned(), ImageData { media_type: "image/bmp".to_owned(), bytes: Arc::from(PNG) });
    let mut missing = request;
    missing.images.remove("file_3");
    for (request, words) in [(bmp, "image/bmp"), (missing, "file_3")] {
        let (result, requests) = run_request(Reply::json(500, "{}"), request).await;
        let error = result.expect_err("config error");
        assert_eq!((error.kind, error.retryable), (ChatErrorKind::Config, false));
        assert!(error.message.contains(words), "{}", error.message);
        assert!(requests.is_empty(), "nothing is sent");
    }
}
