//! The OpenAI family against the local test server: the Responses API dialect (OpenAI and
//! Azure), and the Chat Completions flavours of OpenAI, Azure, OpenRouter and Vercel AI Gateway
//! (endpoints, auth headers, images, Azure's chunk quirks). Recorded streams are replayed byte
//! for byte in small pieces; request bodies are checked field by field against the providers'
//! documented schemas.

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

use super::openai_compat::{self, Api, Endpoint};
use super::openai_responses;
use super::tests::{
    API_KEY, Answer, Items, Reply, TestServer, args, assemble, call, check_shape, command_schema, fixture, providers,
    sse_body, start, text_events, usage,
};

/// Small enough to split every event, JSON string and multi-byte character somewhere.
const PIECE: usize = 13;

fn target_of(provider_type: ProviderType, base_url: &str, model: &str, settings: Value) -> ModelTarget {
    ModelTarget {
        provider_type,
        base_url: base_url.to_owned(),
        api_key: Some(API_KEY.to_owned()),
        model: model.to_owned(),
        max_output_tokens: Some(1024),
        settings,
    }
}

fn request_for(target: ModelTarget) -> ModelRequest {
    ModelRequest {
        target,
        system: "You are terse.".to_owned(),
        messages: vec![PromptMessage { role: Role::User, parts: vec![Part::text("What's the weather?")].into() }]
            .into(),
        tools: Vec::new().into(),
        images: Default::default(),
        memo: Default::default(),
    }
}

/// OpenAI's Responses API, reached through `settings.api`.
fn responses_target(base_url: &str, model: &str) -> ModelTarget {
    target_of(ProviderType::Openai, base_url, model, json!({"api": "responses"}))
}

/// The events of a stream with no error item, checked for the shape every answer has.
fn all_ok(items: Items) -> Vec<ModelEvent> {
    let events = super::tests::all_ok(items);
    check_shape(&events);
    events
}

/// A decoded Responses API recording (one event per line) as the wire carries it: each event
/// named on an `event:` line, then its `data:` line and a blank line.
fn responses_sse(name: &str) -> Vec<u8> {
    let text = String::from_utf8(fixture(name)).expect("fixture is UTF-8");
    let mut body = String::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let value: Value = serde_json::from_str(line).expect("fixture line is JSON");
        let kind = value["type"].as_str().expect("event type");
        body.push_str(&format!("event: {kind}\ndata: {line}\n\n"));
    }
    body.into_bytes()
}

/// A decoded Chat Completions recording as SSE `data:` lines.
fn chat_sse(name: &str) -> Vec<u8> {
    let text = String::from_utf8(fixture(name)).expect("fixture is UTF-8");
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|line| format!("data: {line}\n\n"))
        .collect::<String>()
        .into_bytes()
}

/// Replays a Responses recording through OpenAI's Responses client, and checks that
/// `decode_body` yields the same items from the whole body.
async fn replay_responses(name: &str) -> Items {
    let body = responses_sse(name);
    let (result, requests) = call(Reply::sse(&body, PIECE), |base| request_for(responses_target(base, "gpt-5"))).await;
    assert_eq!(requests.len(), 1);
    assert_eq!(requests[0].path, "/v1/responses");
    let items = result.expect("stream opens");
    assert_eq!(openai_responses::decode_body(&body), items, "decode_body agrees with the stream");
    items
}

fn png(bytes: &[u8]) -> ImageData {
    ImageData { media_type: "image/png".to_owned(), bytes: Arc::from(bytes) }
}

fn tool_result(call_id: &str, name: &str, result: &str, is_error: bool) -> Part {
    Part::ToolResult { call_id: call_id.to_owned(), name: name.to_owned(), result: result.to_owned(), is_error }
}

fn tool_call(call_id: &str, name: &str, args: Value) -> Part {
    Part::ToolCall { call_id: call_id.to_owned(), name: name.to_owned(), args }
}

/// A conversation with every kind of part: a system prompt, a summary, user text and an image,
/// reasoning with and without a signature, text, two tool calls (one of them failing), a marker.
fn full_conversation(target: ModelTarget) -> ModelRequest {
    ModelRequest {
        target,
        system: "You are a coding agent.".to_owned(),
        messages: vec![
            PromptMessage { role: Role::Summary, parts: vec![Part::text("Earlier: set up the repo.")].into() },
            PromptMessage {
                role: Role::User,
                parts: vec![Part::text("What is in this picture?"), Part::Image { file_id: "file_1".to_owned() }]
                    .into(),
            },
            PromptMessage {
                role: Role::Assistant,
                parts: vec![
                    Part::Reasoning { text: "Look, then list.".to_owned(), signature: Some("gAAAAenc1".to_owned()) },
                    Part::text("Listing."),
                    tool_call("call_1", "execute", json!({"command": "ls"})),
                    tool_call("call_2", "read_file", json!({"path": "a"})),
                ]
                .into(),
            },
            PromptMessage {
                role: Role::Tool,
                parts: vec![
                    tool_result("call_1", "execute", "a\nb", false),
                    tool_result("call_2", "read_file", "no such file", true),
                ]
                .into(),
            },
            PromptMessage { role: Role::Marker, parts: vec![Part::text("conversation summarised")].into() },
            PromptMessage {
                role: Role::Assistant,
                parts: vec![
                    // Reasoning that came from a stream without encrypted content cannot be sent.
                    Part::Reasoning { text: "Hmm.".to_owned(), signature: None },
                    tool_call("call_3", "execute", Value::String("{not json".to_owned())),
                ]
                .into(),
            },
            PromptMessage { role: Role::Tool, parts: vec![tool_result("call_3", "execute", "", false)].into() },
            // An answer interrupted after its reasoning: nothing of it can be sent.
            PromptMessage {
                role: Role::Assistant,
                parts: vec![Part::Reasoning {
                    text: "Only thinking.".to_owned(),
                    signature: Some("gAAAAlone".to_owned()),
                }]
                .into(),
            },
            PromptMessage { role: Role::User, parts: vec![Part::text("Go on.")].into() },
        ]
        .into(),
        tools: vec![ToolSpec {
            name: "execute".to_owned(),
            description: "Run a command.".to_owned(),
            parameters: command_schema(),
        }]
        .into(),
        images: [("file_1".to_owned(), png(b"\x89PNG"))].into(),
        memo: Default::default(),
    }
}

// ---------------------------------------------------------------------------------------------
// Responses API: recorded streams

#[tokio::test]
async fn responses_text_two_messages() {
    // Recorded from gpt-5.3-codex, trimmed upstream: each message keeps its first deltas only
    // (the `.done` events still hold the whole text, which a streamed item does not repeat).
    let events = all_ok(replay_responses("openai/responses_text_two_messages.jsonl").await);
    let mut expected = text_events(&["Got", " it", "\n\nHere are a", " few **AI"]);
    expected.push(ModelEvent::Usage(Usage {
        input_tokens: 7112,
        output_tokens: 463,
        cache_read_tokens: 3072,
        cache_write_tokens: 0,
    }));
    expected.push(ModelEvent::Finish(StopReason::EndTurn));
    assert_eq!(events, expected);
}

#[tokio::test]
async fn azure_responses_text() {
    let events = all_ok(replay_responses("azure/responses_text.jsonl").await);
    assert_eq!(
        events,
        vec![
            ModelEvent::TextDelta("Hello".to_owned()),
            ModelEvent::Usage(usage(11, 11)),
            ModelEvent::Finish(StopReason::EndTurn),
        ]
    );
}

#[tokio::test]
async fn azure_responses_function_call() {
    let events = all_ok(replay_responses("azure/responses_function_call.jsonl").await);
    let mut expected = vec![start(0, "call_H5DxLSFnsGhiROnUiDHmgyc8", "weather")];
    expected.extend(args(0, &["{\"", "location", "\":\"", "San", " Francisco", "\"}"]));
    expected.push(ModelEvent::Usage(usage(45, 24)));
    expected.push(ModelEvent::Finish(StopReason::ToolUse));
    assert_eq!(events, expected);
}

#[tokio::test]
async fn responses_in_stream_insufficient_quota_is_a_final_rate_limit() {
    let items = replay_responses("openai/responses_error_insufficient_quota.jsonl").await;
    assert_eq!(items.len(), 1, "the error event ends the stream: {items:?}");
    let error = items[0].as_ref().expect_err("error item");
    assert_eq!((error.kind, error.retryable), (ChatErrorKind::RateLimit, false));
    assert!(error.message.contains("exceeded your current quota"), "{}", error.message);
}

// ---------------------------------------------------------------------------------------------
// Responses API: hand-written streams in the documented event shapes

fn event(value: Value) -> String {
    format!("event: {}\ndata: {value}\n\n", value["type"].as_str().expect("type"))
}

fn completed(status: &str, incomplete_reason: Option<&str>) -> Value {
    json!({
        "type": if status == "completed" { "response.completed" } else { "response.incomplete" },
        "response": {
            "id": "resp_1", "object": "response", "status": status,
            "incomplete_details": incomplete_reason.map(|r| json!({"reason": r})),
            "usage": {
                "input_tokens": 100, "input_tokens_details": {"cached_tokens": 40},
                "output_tokens": 30, "output_tokens_details": {"reasoning_tokens": 20}, "total_tokens": 130,
            },
        },
    })
}

/// A reasoning model's answer: two summary parts, the encrypted reasoning, text, then a call.
fn reasoning_stream() -> Vec<Value> {
    vec![
        json!({"type": "response.created", "response": {"id": "resp_1", "status": "in_progress"}}),
        json!({"type": "response.output_item.added", "output_index": 0,
            "item": {"id": "rs_1", "type": "reasoning", "summary": []}}),
        json!({"type": "response.reasoning_summary_part.added", "item_id": "rs_1", "output_index": 0,
            "summary_index": 0, "part": {"type": "summary_text", "text": ""}}),
        json!({"type": "response.reasoning_summary_text.delta", "item_id": "rs_1", "output_index": 0,
            "summary_index": 0, "delta": "**Plan**"}),
        json!({"type": "response.reasoning_summary_text.delta", "item_id": "rs_1", "output_index": 0,
            "summary_index": 0, "delta": " list files"}),
        json!({"type": "response.reasoning_summary_text.delta", "item_id": "rs_1", "output_index": 0,
            "summary_index": 1, "delta": "Then read."}),
        json!({"type": "response.output_item.done", "output_index": 0,
            "item": {"id": "rs_1", "type": "reasoning", "encrypted_content": "gAAAAB-secret",
                "summary": [{"type": "summary_text", "text": "**Plan** list files"},
                    {"type": "summary_text", "text": "Then read."}]}}),
        json!({"type": "response.output_item.added", "output_index": 1,
            "item": {"id": "msg_1", "type": "message", "role": "assistant", "content": []}}),
        json!({"type": "response.output_text.delta", "item_id": "msg_1", "output_index": 1, "content_index": 0,
            "delta": "Listing ☃"}),
        json!({"type": "response.output_text.done", "item_id": "msg_1", "output_index": 1, "content_index": 0,
            "text": "Listing ☃"}),
        json!({"type": "response.output_item.done", "output_index": 1,
            "item": {"id": "msg_1", "type": "message", "role": "assistant",
                "content": [{"type": "output_text", "text": "Listing ☃"}]}}),
        json!({"type": "response.output_item.added", "output_index": 2,
            "item": {"id": "fc_1", "type": "function_call", "call_id": "call_A", "name": "execute", "arguments": ""}}),
        json!({"type": "response.function_call_arguments.delta", "item_id": "fc_1", "output_index": 2,
            "delta": "{\"command\""}),
        json!({"type": "response.function_call_arguments.delta", "item_id": "fc_1", "output_index": 2,
            "delta": ":\"ls\"}"}),
        json!({"type": "response.function_call_arguments.done", "item_id": "fc_1", "output_index": 2,
            "arguments": "{\"command\":\"ls\"}"}),
        json!({"type": "response.output_item.done", "output_index": 2,
            "item": {"id": "fc_1", "type": "function_call", "call_id": "call_A", "name": "execute",
                "arguments": "{\"command\":\"ls\"}"}}),
        completed("completed", None),
    ]
}

fn stream_of(events: &[Value]) -> Vec<u8> {
    events.iter().map(|e| event(e.clone())).collect::<String>().into_bytes()
}

#[tokio::test]
async fn responses_reasoning_summary_signature_text_and_call() {
    let body = stream_of(&reasoning_stream());
    let (result, _) = call(Reply::sse(&body, 5), |base| request_for(responses_target(base, "gpt-5"))).await;
    let events = all_ok(result.expect("opens"));
    let reasoning = |text: &str| ModelEvent::ReasoningDelta { text: text.to_owned(), signature: None };
    let mut expected = vec![
        reasoning("**Plan**"),
        reasoning(" list files"),
        reasoning("\n\nThen read."),
        ModelEvent::ReasoningDelta { text: String::new(), signature: Some("gAAAAB-secret".to_owned()) },
        ModelEvent::TextDelta("Listing ☃".to_owned()),
        start(0, "call_A", "execute"),
    ];
    expected.extend(args(0, &["{\"command\"", ":\"ls\"}"]));
    expected.push(ModelEvent::Usage(Usage {
        input_tokens: 100,
        output_tokens: 30,
        cache_read_tokens: 40,
        cache_write_tokens: 0,
    }));
    expected.push(ModelEvent::Finish(StopReason::ToolUse));
    assert_eq!(events, expected);
    assert_eq!(openai_responses::decode_body(&body), expected.into_iter().map(Ok).collect::<Items>());
}

#[test]
fn responses_items_sent_only_whole_are_still_decoded() {
    // A gateway that does not stream deltas: the `.done` events carry everything.
    let body = stream_of(&[
        json!({"type": "response.output_item.done", "output_index": 0,
            "item": {"id": "rs_1", "type": "reasoning", "summary": [{"type": "summary_text", "text": "Think."}]}}),
        json!({"type": "response.output_item.done", "output_index": 1,
            "item": {"id": "msg_1", "type": "message", "role": "assistant",
                "content": [{"type": "output_text", "text": "Hi."}]}}),
        json!({"type": "response.output_item.done", "output_index": 2,
            "item": {"id": "fc_1", "type": "function_call", "call_id": "call_B", "name": "read_file",
                "arguments": "{\"path\":\"x\"}"}}),
        completed("completed", None),
    ]);
    let events: Vec<ModelEvent> = openai_responses::decode_body(&body).into_iter().map(|i| i.expect("ok")).collect();
    check_shape(&events);
    assert_eq!(events[0], ModelEvent::ReasoningDelta { text: "Think.".to_owned(), signature: None });
    assert_eq!(
        assemble(&events),
        Answer {
            text: "Hi.".to_owned(),
            calls: vec![("call_B".to_owned(), "read_file".to_owned(), json!({"path": "x"}))],
            usage: Some(Usage { input_tokens: 100, output_tokens: 30, cache_read_tokens: 40, cache_write_tokens: 0 }),
            finish: Some(StopReason::ToolUse),
        }
    );
}

#[test]
fn responses_incomplete_maps_its_reason() {
    for (reason, stop) in [
        ("max_output_tokens", StopReason::MaxTokens),
        ("content_filter", StopReason::ContentFilter),
        ("something_new", StopReason::Other),
    ] {
        let body = stream_of(&[
            json!({"type": "response.output_text.delta", "item_id": "msg_1", "output_index": 0, "delta": "Par"}),
            completed("incomplete", Some(reason)),
        ]);
        let items = openai_responses::decode_body(&body);
        assert_eq!(items.last(), Some(&Ok(ModelEvent::Finish(stop))), "{reason}: {items:?}");
    }
}

#[test]
fn responses_error_events_are_typed() {
    let cases = [
        // The documented shape: code and message at the top level.
        (
            json!({"type": "error", "code": "rate_limit_exceeded", "message": "Slow down", "param": null}),
            ChatErrorKind::RateLimit,
            true,
        ),
        (json!({"type": "error", "code": "server_error", "message": "boom"}), ChatErrorKind::Provider, true),
        (
            json!({"type": "error", "error": {"type": "invalid_request_error", "code": "context_length_exceeded",
                "message": "Your input exceeds the context window of this model."}}),
            ChatErrorKind::ContextOverflow,
            false,
        ),
        (
            json!({"type": "response.failed", "response": {"id": "resp_1", "status": "failed",
                "error": {"code": "server_error", "message": "The model failed"}}}),
            ChatErrorKind::Provider,
            true,
        ),
        (
            json!({"type": "response.failed", "response": {"id": "resp_1", "status": "failed",
                "error": {"code": "content_filter", "message": "Filtered"}}}),
            ChatErrorKind::ContentFilter,
            false,
        ),
        (
            json!({"type": "response.failed", "response": {"id": "resp_1", "status": "failed", "error": null}}),
            ChatErrorKind::Provider,
            true,
        ),
    ];
    for (error_event, kind, retryable) in cases {
        let body = stream_of(&[
            json!({"type": "response.output_text.delta", "item_id": "msg_1", "output_index": 0, "delta": "Hi"}),
            error_event.clone(),
            completed("completed", None),
        ]);
        let items = openai_responses::decode_body(&body);
        assert_eq!(items.len(), 2, "{error_event}: {items:?}");
        assert_eq!(items[0], Ok(ModelEvent::TextDelta("Hi".to_owned())));
        let error = items[1].as_ref().expect_err("error item");
        assert_eq!((error.kind, error.retryable), (kind, retryable), "{error_event}: {error:?}");
    }
}

#[test]
fn responses_stream_without_a_terminal_event_is_a_retryable_error() {
    let body = stream_of(&[
        json!({"type": "response.output_text.delta", "item_id": "msg_1", "output_index": 0, "delta": "Hi"}),
    ]);
    let items = openai_responses::decode_body(&body);
    assert_eq!(items[0], Ok(ModelEvent::TextDelta("Hi".to_owned())));
    let error = items[1].as_ref().expect_err("error item");
    assert_eq!((error.kind, error.retryable), (ChatErrorKind::Provider, true));
}

#[tokio::test]
async fn responses_connection_reset_mid_stream_is_a_retryable_error_item() {
    let body = responses_sse("azure/responses_function_call.jsonl");
    let mut reply = Reply::sse(&body[..body.len() / 2], PIECE);
    reply.cut = true;
    let (result, _) = call(reply, |base| request_for(responses_target(base, "gpt-5"))).await;
    let items = result.expect("headers arrived");
    let (last, before) = items.split_last().expect("items");
    assert!(matches!(before.first(), Some(Ok(ModelEvent::ToolCallStart { .. }))), "{items:?}");
    assert!(before.iter().all(|i| matches!(i, Ok(ModelEvent::ToolCallStart { .. } | ModelEvent::ToolCallArgs { .. }))));
    let error = last.as_ref().expect_err("ends with an error");
    assert_eq!((error.kind, error.retryable), (ChatErrorKind::Provider, true));
}

// ---------------------------------------------------------------------------------------------
// Errors (both APIs share the endpoint code; each status is checked on both)

async fn error_of(reply: Reply, build: impl Fn(&str) -> ModelRequest + Copy) -> ModelError {
    let (result, requests) = call(reply, build).await;
    assert_eq!(requests.len(), 1, "the client itself does not retry");
    let error = result.expect_err("an error before the stream");
    assert!(!error.message.contains(API_KEY), "key leaked: {}", error.message);
    error
}

fn both_apis() -> [fn(&str) -> ModelRequest; 2] {
    [
        |base| request_for(responses_target(base, "gpt-5")),
        |base| request_for(target_of(ProviderType::Openai, base, "gpt-5", Value::Null)),
    ]
}

#[tokio::test]
async fn rate_limit_honours_retry_after() {
    for build in both_apis() {
        let body =
            r#"{"error":{"message":"Rate limit reached for gpt-5","type":"tokens","code":"rate_limit_exceeded"}}"#;
        let error = error_of(Reply::json(429, body).header("retry-after", "3"), build).await;
        assert_eq!((error.kind, error.retryable), (ChatErrorKind::RateLimit, true));
        assert_eq!(error.retry_after, Some(Duration::from_secs(3)));
        let error = error_of(Reply::json(429, body).header("retry-after-ms", "1500"), build).await;
        assert_eq!(error.retry_after, Some(Duration::from_millis(1500)));
    }
}

#[tokio::test]
async fn overloaded_and_server_errors_are_retryable() {
    for build in both_apis() {
        let error =
            error_of(Reply::json(503, r#"{"error":{"message":"The engine is currently overloaded"}}"#), build).await;
        assert_eq!((error.kind, error.retryable), (ChatErrorKind::Overloaded, true));
        let error = error_of(Reply::json(500, r#"{"error":{"message":"The server had an error"}}"#), build).await;
        assert_eq!((error.kind, error.retryable), (ChatErrorKind::Provider, true));
        assert!(error.message.contains("The server had an error"), "{}", error.message);
    }
}

#[tokio::test]
async fn unauthorized_is_auth_and_hides_the_key() {
    for build in both_apis() {
        let body =
            format!(r#"{{"error":{{"message":"Incorrect API key provided: {API_KEY}","code":"invalid_api_key"}}}}"#);
        let error = error_of(Reply::json(401, &body), build).await;
        assert_eq!((error.kind, error.retryable), (ChatErrorKind::Auth, false));
        assert!(error.message.contains("<redacted>"), "{}", error.message);
    }
}

#[tokio::test]
async fn context_overflow_is_recognised() {
    for build in both_apis() {
        let body = concat!(
            r#"{"error":{"message":"Your input exceeds the context window of this model. "#,
            r#"Please adjust your input and try again.","type":"invalid_request_error","#,
            r#""param":"input","code":"context_length_exceeded"}}"#,
        );
        let error = error_of(Reply::json(400, body), build).await;
        assert_eq!((error.kind, error.retryable), (ChatErrorKind::ContextOverflow, false));
    }
}

#[tokio::test]
async fn azure_content_filter_refusal_is_content_filter() {
    let body = concat!(
        r#"{"error":{"message":"The response was filtered due to the prompt triggering Azure OpenAI's "#,
        r#"content management policy.","type":null,"param":"prompt","code":"content_filter","status":400,"#,
        r#""innererror":{"code":"ResponsibleAIPolicyViolation","content_filter_result":{"hate":{"filtered":true,"#,
        r#""severity":"high"}}}}}"#,
    );
    let build = |base: &str| request_for(target_of(ProviderType::Azure, base, "gpt-4o", Value::Null));
    let error = error_of(Reply::json(400, body), build).await;
    assert_eq!((error.kind, error.retryable), (ChatErrorKind::ContentFilter, false));
    assert!(error.message.contains("content management policy"), "{}", error.message);
}

// ---------------------------------------------------------------------------------------------
// Requests: Responses API

#[tokio::test]
async fn responses_request_shape() {
    let server = TestServer::start(Reply::sse(&responses_sse("azure/responses_text.jsonl"), 4096)).await;
    let mut target = responses_target(&server.base_url, "gpt-5");
    target.settings["reasoning_effort"] = json!("low");
    target.settings["reasoning_summary"] = json!("auto");
    let events: Vec<_> = providers().stream(full_conversation(target)).await.expect("opens").collect().await;
    assert!(events.iter().all(Result::is_ok), "{events:?}");

    let requests = server.requests();
    assert_eq!(requests.len(), 1);
    let recorded = &requests[0];
    assert_eq!(recorded.method, "POST");
    assert_eq!(recorded.path, "/v1/responses");
    assert_eq!(recorded.header("authorization"), Some(format!("Bearer {API_KEY}").as_str()));
    assert_eq!(recorded.header("api-key"), None);
    assert_eq!(recorded.header("content-type"), Some("application/json"));
    assert_eq!(recorded.header("accept"), Some("text/event-stream"));
    assert_eq!(
        recorded.json(),
        json!({
            "model": "gpt-5",
            "instructions": "You are a coding agent.",
            "stream": true,
            "store": false,
            "max_output_tokens": 1024,
            "include": ["reasoning.encrypted_content"],
            "reasoning": {"effort": "low", "summary": "auto"},
            "input": [
                {"role": "user", "content": [{"type": "input_text", "text": "Earlier: set up the repo."}]},
                {"role": "user", "content": [
                    {"type": "input_text", "text": "What is in this picture?"},
                    {"type": "input_image", "image_url": "data:image/png;base64,iVBORw=="},
                ]},
                {"type": "reasoning", "encrypted_content": "gAAAAenc1",
                    "summary": [{"type": "summary_text", "text": "Look, then list."}]},
                {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Listing."}]},
                {"type": "function_call", "call_id": "call_1", "name": "execute", "arguments": "{\"command\":\"ls\"}"},
                {"type": "function_call", "call_id": "call_2", "name": "read_file", "arguments": "{\"path\":\"a\"}"},
                {"type": "function_call_output", "call_id": "call_1", "output": "a\nb"},
                {"type": "function_call_output", "call_id": "call_2", "output": "no such file"},
                {"type": "function_call", "call_id": "call_3", "name": "execute", "arguments": "{not json"},
                {"type": "function_call_output", "call_id": "call_3", "output": ""},
                {"role": "user", "content": [{"type": "input_text", "text": "Go on."}]},
            ],
            "tools": [{
                "type": "function",
                "name": "execute",
                "description": "Run a command.",
                "parameters": command_schema(),
                "strict": false,
            }],
        })
    );
}

#[tokio::test]
async fn responses_non_reasoning_model_gets_no_encrypted_reasoning() {
    for (model, settings, reasons) in [
        ("gpt-4.1", json!({"api": "responses"}), false),
        ("gpt-5-chat-latest", json!({"api": "responses"}), false),
        ("o4-mini", json!({"api": "responses"}), true),
        ("my-finetune", json!({"api": "responses", "reasoning": true}), true),
        ("gpt-5", json!({"api": "responses", "reasoning": false}), false),
    ] {
        let server = TestServer::start(Reply::sse(&responses_sse("azure/responses_text.jsonl"), 4096)).await;
        let mut request = request_for(target_of(ProviderType::Openai, &server.base_url, model, settings));
        request.system = String::new();
        request.target.max_output_tokens = None;
        let events: Vec<_> = providers().stream(request).await.expect("opens").collect().await;
        assert!(events.iter().all(Result::is_ok));
        let body = server.requests()[0].json();
        assert_eq!(body.get("include").is_some(), reasons, "{model}: {body}");
        assert!(body.get("reasoning").is_none(), "{model}: {body}");
        assert!(body.get("instructions").is_none() && body.get("max_output_tokens").is_none(), "{body}");
        assert!(body.get("tools").is_none(), "{body}");
        assert_eq!(
            body["input"],
            json!([{"role": "user", "content": [{"type": "input_text", "text": "What's the weather?"}]}])
        );
    }
}

#[tokio::test]
async fn azure_responses_uses_the_v1_path_api_key_and_deployment() {
    let server = TestServer::start(Reply::sse(&responses_sse("azure/responses_text.jsonl"), 4096)).await;
    let settings = json!({"api": "responses", "deployment": "my-gpt5", "api_version": "2024-10-21"});
    let target = target_of(ProviderType::Azure, &format!("{}openai/", server.base_url), "gpt-5", settings);
    let events: Vec<_> = providers().stream(request_for(target)).await.expect("opens").collect().await;
    assert!(events.iter().all(Result::is_ok));
    let recorded = &server.requests()[0];
    // The pasted `/openai` suffix is not doubled; the v1 API takes no api-version.
    assert_eq!(recorded.path, "/v1/openai/v1/responses");
    assert_eq!(recorded.header("api-key"), Some(API_KEY));
    assert_eq!(recorded.header("authorization"), None);
    assert_eq!(recorded.json()["model"], "my-gpt5");
}

// ---------------------------------------------------------------------------------------------
// Requests: Chat Completions flavours

#[tokio::test]
async fn openai_chat_request_shape() {
    let server = TestServer::start(Reply::sse(&fixture("openai/chat_text_basic.sse"), 4096)).await;
    let target = target_of(ProviderType::Openai, &server.base_url, "gpt-4o", Value::Null);
    let events: Vec<_> = providers().stream(full_conversation(target)).await.expect("opens").collect().await;
    assert!(events.iter().all(Result::is_ok));
    let recorded = &server.requests()[0];
    assert_eq!(recorded.path, "/v1/chat/completions");
    assert_eq!(recorded.header("authorization"), Some(format!("Bearer {API_KEY}").as_str()));
    let wire_call = |id: &str, name: &str, arguments: &str| json!({"id": id, "type": "function", "function": {"name": name, "arguments": arguments}});
    assert_eq!(
        recorded.json(),
        json!({
            "model": "gpt-4o",
            "stream": true,
            "stream_options": {"include_usage": true},
            // OpenAI's current name; its reasoning models reject `max_tokens`.
            "max_completion_tokens": 1024,
            "messages": [
                {"role": "system", "content": "You are a coding agent."},
                {"role": "user", "content": "Earlier: set up the repo."},
                {"role": "user", "content": [
                    {"type": "text", "text": "What is in this picture?"},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw=="}},
                ]},
                {"role": "assistant", "content": "Listing.", "tool_calls": [
                    wire_call("call_1", "execute", "{\"command\":\"ls\"}"),
                    wire_call("call_2", "read_file", "{\"path\":\"a\"}"),
                ]},
                {"role": "tool", "tool_call_id": "call_1", "content": "a\nb"},
                {"role": "tool", "tool_call_id": "call_2", "content": "no such file"},
                {"role": "assistant", "content": null, "tool_calls": [wire_call("call_3", "execute", "{not json")]},
                {"role": "tool", "tool_call_id": "call_3", "content": ""},
                {"role": "user", "content": "Go on."},
            ],
            "tools": [{"type": "function", "function": {
                "name": "execute",
                "description": "Run a command.",
                "parameters": command_schema(),
            }}],
        })
    );
}

#[tokio::test]
async fn azure_chat_path_api_key_and_api_version() {
    let body = chat_sse("azure/chat_model_router_content_filter.jsonl");
    for (settings, path) in [
        (Value::Null, "/v1/openai/deployments/model-router/chat/completions?api-version=2024-10-21"),
        (
            json!({"deployment": "router-eu", "api_version": "2025-04-01-preview"}),
            "/v1/openai/deployments/router-eu/chat/completions?api-version=2025-04-01-preview",
        ),
    ] {
        let server = TestServer::start(Reply::sse(&body, PIECE)).await;
        let target = target_of(ProviderType::Azure, &server.base_url, "model-router", settings);
        let items: Items = providers().stream(request_for(target)).await.expect("opens").collect().await;
        let recorded = &server.requests()[0];
        assert_eq!(recorded.path, path);
        assert_eq!(recorded.header("api-key"), Some(API_KEY));
        assert_eq!(recorded.header("authorization"), None);
        assert_eq!(recorded.json()["max_completion_tokens"], 1024);

        // The recorded quirks: an empty first chunk with only `prompt_filter_results`, per-choice
        // `content_filter_results`, `obfuscation`, and reasoning tokens in the usage.
        let mut expected = text_events(&["Capital", " of", " Denmark", "."]);
        expected.push(ModelEvent::Usage(usage(15, 78)));
        expected.push(ModelEvent::Finish(StopReason::EndTurn));
        assert_eq!(all_ok(items.clone()), expected);
        assert_eq!(openai_compat::decode_body(&body), items);
    }
}

#[tokio::test]
async fn azure_chat_content_filter_finish() {
    // Hand-written in Azure's shape: the completion is cut by the output filter.
    let filtered = json!({"hate": {"filtered": true, "severity": "high"}});
    let body = sse_body(&[
        json!({"choices": [], "id": "", "model": "", "object": "", "created": 0, "prompt_filter_results": []}),
        json!({"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": "Well"},
            "finish_reason": null, "content_filter_results": {}}]}),
        json!({"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {},
            "finish_reason": "content_filter", "content_filter_results": filtered}]}),
    ]);
    let (result, _) =
        call(Reply::sse(&body, PIECE), |base| request_for(target_of(ProviderType::Azure, base, "gpt-4o", Value::Null)))
            .await;
    assert_eq!(
        all_ok(result.expect("opens")),
        vec![ModelEvent::TextDelta("Well".to_owned()), ModelEvent::Finish(StopReason::ContentFilter)]
    );
}

#[tokio::test]
async fn openrouter_headers_comments_and_usage_cost() {
    // Hand-written in OpenRouter's documented shape (there is no recording): keep-alive comments,
    // `reasoning` deltas, and a usage chunk with `cost`.
    let body = [
        ": OPENROUTER PROCESSING\n\n".to_owned(),
        format!(
            "data: {}\n\n",
            json!({"id": "gen-1", "provider": "Anthropic", "object": "chat.completion.chunk",
                "choices": [{"index": 0, "delta": {"role": "assistant", "content": "", "reasoning": "Hm."}}]})
        ),
        ": OPENROUTER PROCESSING\n\n".to_owned(),
        format!(
            "data: {}\n\n",
            json!({"id": "gen-1", "object": "chat.completion.chunk",
                "choices": [{"index": 0, "delta": {"content": "Hi."}, "finish_reason": "stop"}]})
        ),
        format!(
            "data: {}\n\n",
            json!({"id": "gen-1", "object": "chat.completion.chunk", "choices": [],
                "usage": {"prompt_tokens": 20, "completion_tokens": 4, "total_tokens": 24, "cost": 0.00012,
                    "prompt_tokens_details": {"cached_tokens": 8}}})
        ),
        "data: [DONE]\n\n".to_owned(),
    ]
    .concat();
    let server = TestServer::start(Reply::sse(body.as_bytes(), PIECE)).await;
    let settings = json!({"referer": "https://agentplane.example", "title": "agentplane"});
    let target = target_of(ProviderType::Openrouter, &server.base_url, "anthropic/claude-sonnet-4.5", settings);
    let items: Items = providers().stream(request_for(target)).await.expect("opens").collect().await;
    assert_eq!(
        all_ok(items),
        vec![
            ModelEvent::ReasoningDelta { text: "Hm.".to_owned(), signature: None },
            ModelEvent::TextDelta("Hi.".to_owned()),
            ModelEvent::Usage(Usage {
                input_tokens: 20,
                output_tokens: 4,
                cache_read_tokens: 8,
                cache_write_tokens: 0
            }),
            ModelEvent::Finish(StopReason::EndTurn),
        ]
    );
    let recorded = &server.requests()[0];
    assert_eq!(recorded.path, "/v1/chat/completions");
    assert_eq!(recorded.header("authorization"), Some(format!("Bearer {API_KEY}").as_str()));
    assert_eq!(recorded.header("http-referer"), Some("https://agentplane.example"));
    assert_eq!(recorded.header("x-title"), Some("agentplane"));
    let body = recorded.json();
    assert_eq!(body["model"], "anthropic/claude-sonnet-4.5");
    assert_eq!(body["max_tokens"], 1024);
    assert!(body.get("max_completion_tokens").is_none());
}

#[tokio::test]
async fn openrouter_mid_stream_errors_are_typed() {
    // Hand-written in OpenRouter's documented mid-stream error shape (no recording exists): the
    // error object at the top level and `finish_reason: "error"`.
    let error_chunk = |code: Value, message: &str| {
        json!({"id": "gen-2", "object": "chat.completion.chunk", "provider": "OpenAI",
            "error": {"code": code, "message": message},
            "choices": [{"index": 0, "delta": {"content": ""}, "finish_reason": "error"}]})
    };
    let cases = [
        (error_chunk(json!("server_error"), "Provider disconnected unexpectedly"), ChatErrorKind::Provider, true),
        (error_chunk(json!(429), "Rate limited upstream"), ChatErrorKind::RateLimit, true),
        (error_chunk(json!(502), "Bad gateway upstream"), ChatErrorKind::Provider, true),
        (error_chunk(json!(402), "Insufficient credits"), ChatErrorKind::Config, false),
    ];
    for (chunk, kind, retryable) in cases {
        let body = [
            ": OPENROUTER PROCESSING\n\n".to_owned(),
            format!("data: {}\n\n", json!({"choices": [{"index": 0, "delta": {"content": "Part"}}]})),
            format!("data: {chunk}\n\n"),
        ]
        .concat();
        let target = |base: &str| request_for(target_of(ProviderType::Openrouter, base, "openai/gpt-4o", Value::Null));
        let (result, _) = call(Reply::sse(body.as_bytes(), PIECE), target).await;
        let items = result.expect("opens");
        assert_eq!(items.len(), 2, "{items:?}");
        assert_eq!(items[0], Ok(ModelEvent::TextDelta("Part".to_owned())));
        let error = items[1].as_ref().expect_err("error item");
        assert_eq!((error.kind, error.retryable), (kind, retryable), "{chunk}: {error:?}");
    }
}

#[tokio::test]
async fn vercel_path_auth_and_fixtures() {
    let body = fixture("openai/chat_tool_calls_parallel.sse");
    let server = TestServer::start(Reply::sse(&body, PIECE)).await;
    let target = target_of(ProviderType::Vercel, &server.base_url, "openai/gpt-4o", Value::Null);
    let items: Items = providers().stream(request_for(target)).await.expect("opens").collect().await;
    let recorded = &server.requests()[0];
    assert_eq!(recorded.path, "/v1/chat/completions");
    assert_eq!(recorded.header("authorization"), Some(format!("Bearer {API_KEY}").as_str()));
    assert_eq!(recorded.json()["max_tokens"], 1024);
    let answer = assemble(&all_ok(items));
    assert_eq!(answer.calls.len(), 2);
    assert_eq!(answer.finish, Some(StopReason::ToolUse));
}

#[tokio::test]
async fn chat_logprob_recordings_decode() {
    let target = |base: &str| request_for(target_of(ProviderType::Openai, base, "gpt-4o", Value::Null));
    let body = fixture("openai/chat_content_logprobs.sse");
    let (result, _) = call(Reply::sse(&body, PIECE), target).await;
    let items = result.expect("opens");
    let mut expected = text_events(&["Foo", "!"]);
    expected.push(ModelEvent::Usage(usage(9, 2)));
    expected.push(ModelEvent::Finish(StopReason::EndTurn));
    assert_eq!(all_ok(items.clone()), expected);
    assert_eq!(openai_compat::decode_body(&body), items);

    let body = fixture("openai/chat_refusal_logprobs.sse");
    let (result, _) = call(Reply::sse(&body, PIECE), target).await;
    let items = result.expect("opens");
    let mut expected =
        text_events(&["I'm", " very", " sorry", ",", " but", " I", " can't", " assist", " with", " that", "."]);
    expected.push(ModelEvent::Usage(usage(79, 12)));
    expected.push(ModelEvent::Finish(StopReason::EndTurn));
    assert_eq!(all_ok(items.clone()), expected);
    assert_eq!(openai_compat::decode_body(&body), items);
}

#[tokio::test]
async fn chat_decode_body_matches_every_recording() {
    // Each stream is asserted event by event in `tests.rs`; the whole-body decoder must agree.
    for name in [
        "openai/chat_text_basic.sse",
        "openai/chat_tool_call_single.sse",
        "openai/chat_tool_calls_parallel.sse",
        "openai/chat_refusal.sse",
        "openai/chat_multiple_choices_n3.sse",
        "openai/chat_finish_length.sse",
        "openai_compat/anthropic_chat_tool_call_index1.sse",
    ] {
        let body = fixture(name);
        let target = |base: &str| request_for(target_of(ProviderType::Openai, base, "gpt-4o", Value::Null));
        let (result, _) = call(Reply::sse(&body, PIECE), target).await;
        let items = result.expect("opens");
        all_ok(items.clone());
        assert_eq!(openai_compat::decode_body(&body), items, "{name}");
    }
}

// ---------------------------------------------------------------------------------------------
// Settings and images checked before anything is sent

#[tokio::test]
async fn images_that_cannot_be_sent_are_config_errors_before_any_request() {
    for api in [json!({"api": "responses"}), json!({})] {
        let with_image = |base: &str, images: Vec<(String, ImageData)>| {
            let mut request = request_for(target_of(ProviderType::Openai, base, "gpt-5", api.clone()));
            Arc::make_mut(&mut Arc::make_mut(&mut request.messages)[0].parts)
                .push(Part::Image { file_id: "file_7".to_owned() });
            request.images = images.into_iter().collect();
            request
        };
        let (result, requests) = call(Reply::json(200, "{}"), |base| with_image(base, Vec::new())).await;
        let error = result.expect_err("missing image");
        assert_eq!((error.kind, error.retryable), (ChatErrorKind::Config, false));
        assert!(error.message.contains("file_7"), "{}", error.message);
        assert!(requests.is_empty());

        let bmp = ImageData { media_type: "image/bmp".to_owned(), bytes: Arc::from(&b"BM"[..]) };
        let (result, requests) =
            call(Reply::json(200, "{}"), |base| with_image(base, vec![("file_7".to_owned(), bmp)])).await;
        let error = result.expect_err("unsupported type");
        assert_eq!(error.kind, ChatErrorKind::Config);
        assert!(error.message.contains("image/bmp"), "{}", error.message);
        assert!(requests.is_empty());
    }
}

/// An endpoint is built once per target and API; a target that changed in anything (key,
/// model, settings) gets one of its own, and an unparseable base URL is a `Config` error.
#[test]
fn endpoints_are_kept_per_target() {
    let endpoints = openai_compat::Endpoints::default();
    let target = target_of(ProviderType::OpenaiCompatible, "http://127.0.0.1:9/v1", "m", Value::Null);
    let first = endpoints.get(&target, Api::ChatCompletions).expect("endpoint");
    assert!(Arc::ptr_eq(&first, &endpoints.get(&target.clone(), Api::ChatCompletions).expect("endpoint")));
    assert_eq!(first.url.as_str(), "http://127.0.0.1:9/v1/chat/completions");
    let responses = endpoints.get(&target, Api::Responses).expect("endpoint");
    assert_eq!(responses.url.as_str(), "http://127.0.0.1:9/v1/responses");
    let rekeyed = ModelTarget { api_key: Some("another key".into()), ..target.clone() };
    let other = endpoints.get(&rekeyed, Api::ChatCompletions).expect("endpoint");
    assert!(!Arc::ptr_eq(&first, &other), "a new key is a new endpoint");
    assert_eq!(other.api_key.as_deref(), Some("another key"));
    let error = endpoints
        .get(&target_of(ProviderType::OpenaiCompatible, "not a url", "m", Value::Null), Api::ChatCompletions)
        .err()
        .expect("unparseable");
    assert_eq!(error.kind, ChatErrorKind::Config);
    // Kept for the 32 most recent targets: the first is built again after 32 others.
    for n in 0..32 {
        let model = format!("model-{n}");
        endpoints.get(&ModelTarget { model, ..target.clone() }, Api::ChatCompletions).expect("endpoint");
    }
    assert!(!Arc::ptr_eq(&first, &endpoints.get(&target, Api::ChatCompletions).expect("endpoint")));
}

#[test]
fn endpoints_of_the_family() {
    let url = |provider, base: &str, settings: Value, api| {
        Endpoint::for_target(&target_of(provider, base, "gpt-4o", settings), api).map(|e| e.url.to_string())
    };
    let chat = Api::ChatCompletions;
    assert_eq!(
        url(ProviderType::Openai, "", Value::Null, chat).as_deref(),
        Ok("https://api.openai.com/v1/chat/completions")
    );
    assert_eq!(
        url(ProviderType::Openai, "", Value::Null, Api::Responses).as_deref(),
        Ok("https://api.openai.com/v1/responses")
    );
    assert_eq!(
        url(ProviderType::Openrouter, "", Value::Null, chat).as_deref(),
        Ok("https://openrouter.ai/api/v1/chat/completions")
    );
    assert_eq!(
        url(ProviderType::Vercel, "", Value::Null, chat).as_deref(),
        Ok("https://ai-gateway.vercel.sh/v1/chat/completions")
    );
    assert_eq!(
        url(ProviderType::Azure, "https://res.openai.azure.com/", Value::Null, chat).as_deref(),
        Ok("https://res.openai.azure.com/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21")
    );
    assert_eq!(
        url(ProviderType::Azure, "https://res.openai.azure.com/openai/v1", Value::Null, Api::Responses).as_deref(),
        Ok("https://res.openai.azure.com/openai/v1/responses")
    );

    let config = |result: Result<String, ModelError>| result.err().map(|e| (e.kind, e.retryable));
    let bad = Some((ChatErrorKind::Config, false));
    assert_eq!(config(url(ProviderType::Azure, "", Value::Null, chat)), bad, "Azure has no default URL");
    assert_eq!(config(url(ProviderType::OpenaiCompatible, "", Value::Null, chat)), bad);
    let settings = json!({"deployment": "a/../b"});
    assert_eq!(config(url(ProviderType::Azure, "https://r.openai.azure.com", settings, chat)), bad);
    let settings = json!({"api_version": "2024&x=1"});
    assert_eq!(config(url(ProviderType::Azure, "https://r.openai.azure.com", settings, chat)), bad);
    assert_eq!(config(url(ProviderType::Openrouter, "", json!({"title": "a\nb"}), chat)), bad);
    assert_eq!(config(url(ProviderType::Openrouter, "", json!({"referer": 7}), chat)), bad);

    let api = |provider, settings: Value| Api::for_target(&target_of(provider, "", "m", settings)).map_err(|e| e.kind);
    assert_eq!(api(ProviderType::Openai, Value::Null), Ok(Api::ChatCompletions));
    assert_eq!(api(ProviderType::Openai, json!({"api": "chat_completions"})), Ok(Api::ChatCompletions));
    assert_eq!(api(ProviderType::Azure, json!({"api": "responses"})), Ok(Api::Responses));
    assert_eq!(api(ProviderType::Openai, json!({"api": "assistants"})), Err(ChatErrorKind::Config));
    assert_eq!(api(ProviderType::Openrouter, json!({"api": "responses"})), Err(ChatErrorKind::Config));
}

#[tokio::test]
async fn a_user_message_of_several_text_parts_is_sent_as_one_string() {
    let server = TestServer::start(Reply::sse(&fixture("openai/chat_text_basic.sse"), 4096)).await;
    let target = target_of(ProviderType::Openai, &server.base_url, "gpt-4o", Value::Null);
    let mut request = full_conversation(target);
    request.messages = vec![
        PromptMessage { role: Role::User, parts: vec![Part::text("first"), Part::text("second")].into() },
        PromptMessage { role: Role::User, parts: vec![Part::text("only")].into() },
    ]
    .into();
    let events: Vec<_> = providers().stream(request).await.expect("opens").collect().await;
    assert!(events.iter().all(Result::is_ok));
    assert_eq!(
        server.requests()[0].json()["messages"],
        json!([
            {"role": "system", "content": "You are a coding agent."},
            {"role": "user", "content": "first\nsecond"},
            {"role": "user", "content": "only"},
        ])
    );
}
