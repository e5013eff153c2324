//! The Gemini client against the local test server of `tests.rs`: the recorded Gemini and Vertex
//! streams replayed byte for byte (split at awkward places), Google's error bodies, resets and
//! in-stream errors, and the `GenerateContentRequest`s the client sends, field by field.

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

use super::gemini;
use super::tests::{
    API_KEY, Items, Recorded, Reply, TestServer, all_ok, assemble, call, check_shape, fixture, providers,
    signature_event, start, usage,
};

const MODEL: &str = "gemini-3-pro-preview";

// ---------------------------------------------------------------------------------------------
// Helpers

/// A decoded fixture (one JSON chunk per line) as Gemini's `alt=sse` body: CRLF line endings.
fn sse_fixture(name: &str) -> Vec<u8> {
    let text = String::from_utf8(fixture(&format!("gemini/{name}"))).expect("fixture is UTF-8");
    sse_body(text.lines().filter(|l| !l.trim().is_empty()))
}

fn sse_body<S: AsRef<str>>(chunks: impl IntoIterator<Item = S>) -> Vec<u8> {
    chunks.into_iter().map(|c| format!("data: {}\r\n\r\n", c.as_ref())).collect::<String>().into_bytes()
}

/// The `thoughtSignature`s of a fixture, in order.
fn signatures(name: &str) -> Vec<String> {
    let text = String::from_utf8(fixture(&format!("gemini/{name}"))).expect("fixture is UTF-8");
    let mut found = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let chunk: Value = serde_json::from_str(line).expect("fixture line is JSON");
        for part in chunk.pointer("/candidates/0/content/parts").and_then(Value::as_array).into_iter().flatten() {
            if let Some(sig) = part.get("thoughtSignature").and_then(Value::as_str) {
                found.push(sig.to_owned());
            }
        }
    }
    found
}

fn target(base_url: &str) -> ModelTarget {
    ModelTarget {
        provider_type: ProviderType::Gemini,
        base_url: base_url.to_owned(),
        api_key: Some(API_KEY.to_owned()),
        model: MODEL.to_owned(),
        max_output_tokens: Some(2048),
        settings: Value::Null,
    }
}

fn simple_request(base_url: &str) -> ModelRequest {
    ModelRequest {
        target: target(base_url),
        system: "You are terse.".to_owned(),
        messages: vec![PromptMessage {
            role: Role::User,
            parts: vec![Part::text("How many r's in strawberry?")].into(),
        }]
        .into(),
        tools: Vec::new().into(),
        images: HashMap::new(),
        memo: Default::default(),
    }
}

async fn run(reply: Reply) -> (Result<Items, ModelError>, Vec<Recorded>) {
    call(reply, simple_request).await
}

/// Replays a fixture in 97-byte pieces through the real client, checks the events have the
/// shape every answer must have, and that the synchronous decoder agrees.
async fn replay(name: &str) -> Vec<ModelEvent> {
    let body = sse_fixture(name);
    let (result, _) = run(Reply::sse(&body, 97)).await;
    let events = all_ok(result.expect("stream opens"));
    check_shape(&events);
    let decoded: Vec<ModelEvent> = gemini::decode_body(&body).into_iter().map(|i| i.expect("ok")).collect();
    assert_eq!(decoded, events, "decode_body agrees with the streamed decoding");
    events
}

fn args_event(index: usize, value: Value) -> ModelEvent {
    ModelEvent::ToolCallArgs { index, piece: value.to_string() }
}

/// The `ToolCallArgs` pieces as JSON values, so comparisons do not depend on key order.
fn normalise(events: Vec<ModelEvent>) -> Vec<ModelEvent> {
    events
        .into_iter()
        .map(|event| match event {
            ModelEvent::ToolCallArgs { index, piece } => {
                let value: Value = serde_json::from_str(&piece).unwrap_or(Value::String(piece));
                args_event(index, value)
            }
            other => other,
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Recorded streams

#[tokio::test]
async fn text_with_trailing_signature() {
    let events = replay("text_thought_signature.jsonl").await;
    let sig = &signatures("text_thought_signature.jsonl")[0];
    assert_eq!(
        events,
        vec![
            ModelEvent::TextDelta("There are **3**".to_owned()),
            ModelEvent::TextDelta(" \"r\"s in strawberry.\n\nst**r**awbe**rr**y".to_owned()),
            signature_event(sig),
            // Output counts the 185 thought tokens as well.
            ModelEvent::Usage(usage(9, 23 + 185)),
            ModelEvent::Finish(StopReason::EndTurn),
        ]
    );
}

#[tokio::test]
async fn whole_function_call_gets_an_id_and_its_signature() {
    let events = replay("function_call.jsonl").await;
    let sig = &signatures("function_call.jsonl")[0];
    assert_eq!(
        events,
        vec![
            signature_event(sig),
            start(0, "call_b36LacjwM668nsEP2tbsgQQ_0", "weather"),
            args_event(0, json!({"location": "San Francisco"})),
            ModelEvent::Usage(usage(29, 15 + 45)),
            // STOP after a call: the call still has to run.
            ModelEvent::Finish(StopReason::ToolUse),
        ]
    );
}

#[tokio::test]
async fn vertex_streamed_arguments() {
    let events = replay("vertex_function_call_streamed_args.jsonl").await;
    let sig = &signatures("vertex_function_call_streamed_args.jsonl")[0];
    assert_eq!(
        normalise(events),
        vec![
            signature_event(sig),
            start(0, "call_dqHOab6xGLzWodAPkPuViA4_0", "getWeather"),
            args_event(0, json!({"location": "Boston"})),
            start(1, "call_dqHOab6xGLzWodAPkPuViA4_1", "getWeather"),
            args_event(1, json!({"location": "San Francisco"})),
            // Earlier chunks carry a `usageMetadata` without counts; they do not reset these.
            ModelEvent::Usage(usage(26, 23 + 132)),
            ModelEvent::Finish(StopReason::ToolUse),
        ]
    );
}

#[tokio::test]
async fn vertex_thought_then_a_no_args_call_and_parallel_streamed_calls() {
    let events = replay("vertex_thought_then_parallel_function_calls.jsonl").await;
    let sig = &signatures("vertex_thought_then_parallel_function_calls.jsonl")[0];
    let ModelEvent::ReasoningDelta { text: thought, signature: None } = &events[0] else {
        panic!("a thought first: {events:?}");
    };
    assert!(thought.starts_with("**Processing User Requests**\n\nI've started"), "{thought}");
    let id = |n: usize| format!("call__vr4aYiWEJnYodAPkujX0QM_{n}");
    assert_eq!(
        normalise(events[1..].to_vec()),
        vec![
            signature_event(sig),
            start(0, &id(0), "read_theme"),
            args_event(0, json!({})),
            start(1, &id(1), "read_screen"),
            args_event(1, json!({"id": "A"})),
            start(2, &id(2), "read_screen"),
            args_event(2, json!({"id": "B"})),
            start(3, &id(3), "read_screen"),
            args_event(3, json!({"id": "C"})),
            ModelEvent::Usage(usage(249, 58 + 183)),
            ModelEvent::Finish(StopReason::ToolUse),
        ]
    );
}

#[tokio::test]
async fn vertex_streamed_array_arguments_without_terminator() {
    let events = replay("vertex_function_call_streamed_array_args.jsonl").await;
    let answer = assemble(&events);
    assert_eq!(answer.calls.len(), 1);
    assert_eq!(answer.calls[0].0, "call_3noMaojQL_2s6tkPiO26qQ4_0");
    assert_eq!(answer.calls[0].1, "writeItems");
    assert_eq!(
        answer.calls[0].2,
        json!({"operations": [
            {"action": "add", "description": "Fresh red apple", "itemid": "apple_001", "price": 0.5},
            {"action": "add", "description": "Ripe yellow banana", "itemid": "banana_001", "price": 0.3},
        ]})
    );
    assert_eq!(answer.usage, Some(usage(54, 74 + 121)));
    assert_eq!(answer.finish, Some(StopReason::ToolUse));
    // The arguments come as one piece, once the call is complete.
    assert_eq!(events.iter().filter(|e| matches!(e, ModelEvent::ToolCallArgs { .. })).count(), 1);
}

#[tokio::test]
async fn byte_by_byte_delivery_gives_the_same_events() {
    let body = sse_fixture("vertex_thought_then_parallel_function_calls.jsonl");
    let whole = replay("vertex_thought_then_parallel_function_calls.jsonl").await;
    let (result, _) = run(Reply::sse(&body, 1)).await;
    assert_eq!(all_ok(result.expect("opens")), whole);
}

#[tokio::test]
async fn json_array_answer_is_read_like_the_stream() {
    // What `streamGenerateContent` answers without `alt=sse`.
    let text = String::from_utf8(fixture("gemini/function_call.jsonl")).expect("UTF-8");
    let array = format!("[{}]", text.lines().filter(|l| !l.trim().is_empty()).collect::<Vec<_>>().join(",\r\n"));
    let (result, _) = run(Reply::json(200, &array)).await;
    assert_eq!(all_ok(result.expect("opens")), replay("function_call.jsonl").await);
}

// ---------------------------------------------------------------------------------------------
// Decoding details

fn chunk(parts: Value, finish: Option<&str>) -> Value {
    let mut candidate = json!({"content": {"role": "model", "parts": parts}, "index": 0});
    if let Some(reason) = finish {
        candidate["finishReason"] = json!(reason);
    }
    json!({"candidates": [candidate], "responseId": "resp1"})
}

fn decode(chunks: &[Value]) -> Items {
    gemini::decode_body(&sse_body(chunks.iter().map(Value::to_string)))
}

#[test]
fn thoughts_text_cached_usage_and_finish_reasons() {
    let mut last = chunk(json!([{"text": "Hi"}]), Some("STOP"));
    last["usageMetadata"] = json!({"promptTokenCount": 1000, "cachedContentTokenCount": 800,
        "candidatesTokenCount": 5, "thoughtsTokenCount": 20, "toolUsePromptTokenCount": 7});
    let items =
        decode(&[chunk(json!([{"text": "Let me think.", "thought": true, "thoughtSignature": "s1"}]), None), last]);
    assert_eq!(
        all_ok(items),
        vec![
            ModelEvent::ReasoningDelta { text: "Let me think.".to_owned(), signature: Some("s1".to_owned()) },
            ModelEvent::TextDelta("Hi".to_owned()),
            ModelEvent::Usage(Usage {
                input_tokens: 1007,
                output_tokens: 25,
                cache_read_tokens: 800,
                cache_write_tokens: 0
            }),
            ModelEvent::Finish(StopReason::EndTurn),
        ]
    );

    let cases = [
        ("MAX_TOKENS", StopReason::MaxTokens),
        ("SAFETY", StopReason::ContentFilter),
        ("RECITATION", StopReason::ContentFilter),
        ("PROHIBITED_CONTENT", StopReason::ContentFilter),
        ("SPII", StopReason::ContentFilter),
        ("BLOCKLIST", StopReason::ContentFilter),
        ("IMAGE_SAFETY", StopReason::ContentFilter),
        ("MALFORMED_FUNCTION_CALL", StopReason::Other),
        ("OTHER", StopReason::Other),
    ];
    for (reason, expected) in cases {
        let events = all_ok(decode(&[chunk(json!([{"text": "x"}]), Some(reason))]));
        assert_eq!(events.last(), Some(&ModelEvent::Finish(expected)), "{reason}");
    }
}

#[test]
fn calls_with_gemini_ids_and_no_response_id() {
    let items = decode(&[
        json!({"candidates": [{"content": {"parts": [
            {"functionCall": {"id": "fc-1", "name": "read_file", "args": {"path": "a"}}},
            {"functionCall": {"name": "execute", "args": {"command": "ls"}}},
        ]}}]}),
        json!({"candidates": [{"content": {"parts": [{"text": ""}]}, "finishReason": "STOP"}]}),
    ]);
    let events = all_ok(items);
    check_shape(&events);
    let answer = assemble(&events);
    assert_eq!(answer.calls[0], ("fc-1".to_owned(), "read_file".to_owned(), json!({"path": "a"})));
    let made_up = &answer.calls[1].0;
    assert!(made_up.starts_with("call_") && made_up.ends_with("_1") && made_up.len() > 10, "{made_up}");
    assert_eq!(answer.calls[1].2, json!({"command": "ls"}));
    assert_eq!(answer.finish, Some(StopReason::ToolUse));
    assert_eq!(answer.usage, None);

    // Another answer makes other ids.
    let again = assemble(&all_ok(decode(&[json!({"candidates": [{"content": {"parts": [
        {"functionCall": {"name": "execute", "args": {}}},
    ]}}]})])));
    assert_ne!(&again.calls[0].0, made_up);
}

#[test]
fn blocked_prompt_is_a_content_filter_error() {
    let items = decode(&[json!({"promptFeedback": {"blockReason": "PROHIBITED_CONTENT"},
        "usageMetadata": {"promptTokenCount": 10}})]);
    assert_eq!(items.len(), 1, "{items:?}");
    let error = items[0].as_ref().expect_err("error");
    assert_eq!((error.kind, error.retryable), (ChatErrorKind::ContentFilter, false));
    assert!(error.message.contains("PROHIBITED_CONTENT"), "{}", error.message);
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

fn google_error(code: u16, status: &str, message: &str) -> String {
    json!({"error": {"code": code, "message": message, "status": status}}).to_string()
}

#[tokio::test]
async fn quota_429_with_retry_info() {
    let body = String::from_utf8(fixture("gemini/error_429_retry_info.json")).expect("UTF-8");
    let error = status_error(Reply::json(429, &body)).await;
    assert_eq!((error.kind, error.retryable), (ChatErrorKind::RateLimit, true));
    assert_eq!(error.retry_after, Some(Duration::from_millis(34_400)));
    assert!(error.message.contains("You exceeded your current quota"), "{}", error.message);

    // A `retry-after` header wins over the body.
    let error = status_error(Reply::json(429, &body).header("retry-after", "2")).await;
    assert_eq!(error.retry_after, Some(Duration::from_secs(2)));
}

#[tokio::test]
async fn statuses_map_to_kinds() {
    let cases = [
        (503, "UNAVAILABLE", "The model is overloaded. Please try again later.", ChatErrorKind::Overloaded, true),
        (500, "INTERNAL", "An internal error has occurred.", ChatErrorKind::Provider, true),
        (504, "DEADLINE_EXCEEDED", "Deadline exceeded", ChatErrorKind::Timeout, true),
        (401, "UNAUTHENTICATED", "Request had invalid authentication credentials.", ChatErrorKind::Auth, false),
        (403, "PERMISSION_DENIED", "Method doesn't allow unregistered callers.", ChatErrorKind::Auth, false),
        (404, "NOT_FOUND", "models/gemini-9 is not found for API version v1beta", ChatErrorKind::Config, false),
        (400, "INVALID_ARGUMENT", "Invalid JSON payload received.", ChatErrorKind::Config, false),
        (
            400,
            "INVALID_ARGUMENT",
            "The input token count (1200000) exceeds the maximum number of tokens allowed (1048576).",
            ChatErrorKind::ContextOverflow,
            false,
        ),
    ];
    for (code, status, message, kind, retryable) in cases {
        let error = status_error(Reply::json(code, &google_error(code, status, message))).await;
        assert_eq!((error.kind, error.retryable), (kind, retryable), "{code} {status}");
        assert!(error.message.contains(message), "{}", error.message);
    }
}

#[tokio::test]
async fn invalid_key_400_is_auth() {
    let body = json!({"error": {"code": 400, "message": "API key not valid. Please pass a valid API key.",
        "status": "INVALID_ARGUMENT", "details": [{"@type": "type.googleapis.com/google.rpc.ErrorInfo",
        "reason": "API_KEY_INVALID", "domain": "googleapis.com", "metadata": {"service": "generativelanguage.googleapis.com"}}]}});
    let error = status_error(Reply::json(400, &body.to_string())).await;
    assert_eq!((error.kind, error.retryable), (ChatErrorKind::Auth, false));
    assert!(error.message.contains("API key not valid"), "{}", error.message);
}

#[tokio::test]
async fn reset_mid_stream_is_a_retryable_error_item() {
    let body = sse_fixture("text_thought_signature.jsonl");
    let first_event = body.windows(4).position(|w| w == b"\r\n\r\n").expect("an event") + 4;
    let mut reply = Reply::sse(&body[..first_event + 200], 50);
    reply.cut = true;
    let (result, _) = run(reply).await;
    let items = result.expect("headers arrived");
    let (last, before) = items.split_last().expect("items");
    assert_eq!(before, [Ok(ModelEvent::TextDelta("There are **3**".to_owned()))]);
    let error = last.as_ref().expect_err("ends with an error");
    assert_eq!((error.kind, error.retryable), (ChatErrorKind::Provider, true));
}

#[tokio::test]
async fn cut_after_the_finish_reason_still_finishes() {
    let mut last = chunk(json!([{"text": "Done."}]), Some("STOP"));
    last["usageMetadata"] = json!({"promptTokenCount": 3, "candidatesTokenCount": 1});
    let mut reply = Reply::sse(&sse_body([last.to_string()]), 1000);
    reply.cut = true;
    let (result, _) = run(reply).await;
    assert_eq!(
        all_ok(result.expect("opens")),
        vec![
            ModelEvent::TextDelta("Done.".to_owned()),
            ModelEvent::Usage(usage(3, 1)),
            ModelEvent::Finish(StopReason::EndTurn)
        ]
    );
}

#[tokio::test]
async fn in_stream_errors_keep_their_kind() {
    let body = sse_body([
        chunk(json!([{"text": "Partial"}]), None).to_string(),
        google_error(503, "UNAVAILABLE", "The model is overloaded."),
    ]);
    let (result, _) = run(Reply::sse(&body, 64)).await;
    let items = result.expect("opens");
    assert_eq!(items.len(), 2, "{items:?}");
    assert_eq!(items[0], Ok(ModelEvent::TextDelta("Partial".to_owned())));
    let error = items[1].as_ref().expect_err("error item");
    assert_eq!((error.kind, error.retryable), (ChatErrorKind::Overloaded, true));
    assert!(error.message.contains("The model is overloaded."), "{}", error.message);

    let quota = json!({"error": {"code": 429, "message": "Quota exceeded", "status": "RESOURCE_EXHAUSTED",
        "details": [{"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "7s"}]}});
    let items = gemini::decode_body(&sse_body([quota.to_string()]));
    let error = items[0].as_ref().expect_err("error item");
    assert_eq!(
        (error.kind, error.retryable, error.retry_after),
        (ChatErrorKind::RateLimit, true, Some(Duration::from_secs(7)))
    );

    let items = gemini::decode_body(b"data: {\"candidates\": [\r\n\r\n");
    let error = items[0].as_ref().expect_err("malformed chunk");
    assert_eq!((error.kind, error.retryable), (ChatErrorKind::Provider, true));
}

// ---------------------------------------------------------------------------------------------
// Requests

fn png_bytes() -> Arc<[u8]> {
    Arc::from(&b"\x89PNG\r\n\x1a\n-not-a-real-png"[..])
}

/// A 3x2 GIF whose only frame (1x1, red) sits at (2, 1).
fn gif_bytes() -> Arc<[u8]> {
    let mut out = Vec::new();
    {
        let mut encoder = gif::Encoder::new(&mut out, 3, 2, &[]).expect("encoder");
        let mut frame = gif::Frame::from_palette_pixels(1, 1, [0u8], [255u8, 0, 0], None);
        frame.left = 2;
        frame.top = 1;
        encoder.write_frame(&frame).expect("frame");
    }
    Arc::from(out)
}

fn command_schema() -> Value {
    // `additionalProperties` and `const` are JSON Schema the OpenAPI subset of `parameters` lacks.
    json!({"type": "object", "properties": {"command": {"type": "string"}, "shell": {"const": "sh"}},
        "required": ["command"], "additionalProperties": false})
}

fn tool_result(call_id: &str, name: &str, result: &str, is_error: bool) -> Part {
    Part::ToolResult { call_id: call_id.to_owned(), name: name.to_owned(), result: result.to_owned(), is_error }
}

fn tool_call(call_id: &str, name: &str, args: Value) -> Part {
    Part::ToolCall { call_id: call_id.to_owned(), name: name.to_owned(), args }
}

async fn sent_body(request: ModelRequest) -> (Value, Recorded) {
    let server = TestServer::start(Reply::sse(&sse_fixture("text_thought_signature.jsonl"), 4096)).await;
    let mut request = request;
    request.target.base_url = server.base_url.clone();
    let items: Vec<_> = providers().stream(request).await.expect("opens").collect().await;
    assert!(items.iter().all(Result::is_ok), "{items:?}");
    let recorded = server.requests().into_iter().next().expect("one request");
    (recorded.json(), recorded)
}

#[tokio::test]
async fn request_shape() {
    let request = ModelRequest {
        target: target("set below"),
        system: "You are a coding agent.".to_owned(),
        messages: vec![
            PromptMessage {
                role: Role::User,
                parts: vec![
                    Part::text("What is in these?"),
                    Part::Image { file_id: "file_png".to_owned() },
                    Part::Image { file_id: "file_gif".to_owned() },
                ]
                .into(),
            },
            PromptMessage {
                role: Role::Assistant,
                parts: vec![
                    Part::Reasoning { text: "Look at both.".to_owned(), signature: Some("sig-1".to_owned()) },
                    Part::text("Checking."),
                    tool_call("c1", "execute", json!({"command": "ls"})),
                    tool_call("c2", "read_file", json!({"path": "a"})),
                ]
                .into(),
            },
            PromptMessage {
                role: Role::Tool,
                parts: vec![
                    tool_result("c1", "execute", "a\nb", false),
                    tool_result("c2", "read_file", "no such file", true),
                ]
                .into(),
            },
            PromptMessage {
                role: Role::Assistant,
                parts: vec![
                    Part::Reasoning { text: String::new(), signature: Some("sig-2".to_owned()) },
                    Part::text("Two files."),
                ]
                .into(),
            },
            PromptMessage { role: Role::User, parts: vec![Part::text("Run it again.")].into() },
            // History from a model that gave no signature: Gemini 3 needs the documented
            // placeholder on the first call.
            PromptMessage {
                role: Role::Assistant,
                parts: vec![
                    tool_call("c3", "execute", json!({"command": "ls"})),
                    tool_call("c4", "execute", Value::String("{\"command\": \"pwd\"}".to_owned())),
                ]
                .into(),
            },
            PromptMessage {
                role: Role::Tool,
                parts: vec![tool_result("c3", "execute", "a\nb", false), tool_result("c4", "execute", "/w", false)]
                    .into(),
            },
            PromptMessage { role: Role::User, parts: vec![Part::text("Thanks.")].into() },
            PromptMessage { role: Role::Marker, parts: vec![Part::text("conversation summarised")].into() },
        ]
        .into(),
        tools: vec![ToolSpec {
            name: "execute".to_owned(),
            description: "Run a command.".to_owned(),
            parameters: command_schema(),
        }]
        .into(),
        images: HashMap::from([
            ("file_png".to_owned(), ImageData { media_type: "image/png".to_owned(), bytes: png_bytes() }),
            ("file_gif".to_owned(), ImageData { media_type: "image/gif".to_owned(), bytes: gif_bytes() }),
        ]),
        memo: Default::default(),
    };
    let (body, recorded) = sent_body(request).await;

    assert_eq!(recorded.method, "POST");
    assert_eq!(recorded.path, format!("/v1/models/{MODEL}:streamGenerateContent?alt=sse"));
    assert_eq!(recorded.header("x-goog-api-key"), Some(API_KEY));
    assert_eq!(recorded.header("authorization"), None);
    assert_eq!(recorded.header("content-type"), Some("application/json"));
    assert!(!recorded.path.contains(API_KEY) && !recorded.path.contains("key="));

    // The GIF went as a PNG of its first frame, drawn where the frame sits on the screen.
    let gif_part = &body["contents"][0]["parts"][2]["inlineData"];
    assert_eq!(gif_part["mimeType"], "image/png");
    let png = data_encoding::BASE64.decode(gif_part["data"].as_str().expect("data").as_bytes()).expect("base64");
    let mut reader = png::Decoder::new(std::io::Cursor::new(png)).read_info().expect("a PNG");
    let mut pixels = vec![0u8; reader.output_buffer_size().expect("size")];
    let info = reader.next_frame(&mut pixels).expect("frame");
    assert_eq!((info.width, info.height, info.color_type), (3, 2, png::ColorType::Rgba));
    assert_eq!(&pixels[..4 * 5], &[0u8; 20][..], "transparent around the frame");
    assert_eq!(&pixels[4 * 5..4 * 6], &[255, 0, 0, 255]);

    let png_data = data_encoding::BASE64.encode(&png_bytes());
    let mut expected = json!({
        "systemInstruction": {"parts": [{"text": "You are a coding agent."}]},
        "contents": [
            {"role": "user", "parts": [
                {"text": "What is in these?"},
                {"inlineData": {"mimeType": "image/png", "data": png_data}},
                "GIF checked above",
            ]},
            {"role": "model", "parts": [
                {"text": "Checking."},
                {"functionCall": {"id": "c1", "name": "execute", "args": {"command": "ls"}},
                 "thoughtSignature": "sig-1"},
                {"functionCall": {"id": "c2", "name": "read_file", "args": {"path": "a"}}},
            ]},
            {"role": "user", "parts": [
                {"functionResponse": {"id": "c1", "name": "execute", "response": {"output": "a\nb"}}},
                {"functionResponse": {"id": "c2", "name": "read_file", "response": {"error": "no such file"}}},
            ]},
            {"role": "model", "parts": [{"text": "Two files.", "thoughtSignature": "sig-2"}]},
            {"role": "user", "parts": [{"text": "Run it again."}]},
            {"role": "model", "parts": [
                {"functionCall": {"id": "c3", "name": "execute", "args": {"command": "ls"}},
                 "thoughtSignature": "skip_thought_signature_validator"},
                {"functionCall": {"id": "c4", "name": "execute", "args": {"command": "pwd"}}},
            ]},
            // Results and the next user message are one user turn.
            {"role": "user", "parts": [
                {"functionResponse": {"id": "c3", "name": "execute", "response": {"output": "a\nb"}}},
                {"functionResponse": {"id": "c4", "name": "execute", "response": {"output": "/w"}}},
                {"text": "Thanks."},
            ]},
        ],
        "tools": [{"functionDeclarations": [{
            "name": "execute",
            "description": "Run a command.",
            "parametersJsonSchema": command_schema(),
        }]}],
        "generationConfig": {"maxOutputTokens": 2048, "thinkingConfig": {"includeThoughts": true}},
    });
    expected["contents"][0]["parts"][2] = body["contents"][0]["parts"][2].clone();
    assert_eq!(body, expected);
}

/// What the agent loop keeps of an answer: one reasoning part (text joined, last signature),
/// the text, then the calls.
fn fold_answer(events: &[ModelEvent]) -> Vec<Part> {
    let (mut reasoning, mut signature, mut text) = (String::new(), None, String::new());
    for event in events {
        match event {
            ModelEvent::ReasoningDelta { text: piece, signature: sig } => {
                reasoning.push_str(piece);
                if sig.is_some() {
                    signature = sig.clone();
                }
            }
            ModelEvent::TextDelta(piece) => text.push_str(piece),
            _ => {}
        }
    }
    let mut parts = vec![Part::Reasoning { text: reasoning, signature }];
    if !text.is_empty() {
        parts.push(Part::text(text));
    }
    for (call_id, name, args) in assemble(events).calls {
        parts.push(Part::ToolCall { call_id, name, args });
    }
    parts
}

#[tokio::test]
async fn thought_signature_survives_into_the_next_request() {
    let events = replay("function_call.jsonl").await;
    let answer = fold_answer(&events);
    let call_id = "call_b36LacjwM668nsEP2tbsgQQ_0";
    let mut request = simple_request("set below");
    Arc::make_mut(&mut request.messages).push(PromptMessage { role: Role::Assistant, parts: answer.into() });
    Arc::make_mut(&mut request.messages).push(PromptMessage {
        role: Role::Tool,
        parts: vec![tool_result(call_id, "weather", "18°C, fog", false)].into(),
    });
    let (body, _) = sent_body(request).await;
    let sig = &signatures("function_call.jsonl")[0];
    assert_eq!(
        body["contents"],
        json!([
            {"role": "user", "parts": [{"text": "How many r's in strawberry?"}]},
            {"role": "model", "parts": [{
                "functionCall": {"id": call_id, "name": "weather", "args": {"location": "San Francisco"}},
                "thoughtSignature": sig,
            }]},
            {"role": "user", "parts": [{
                "functionResponse": {"id": call_id, "name": "weather", "response": {"output": "18°C, fog"}},
            }]},
        ])
    );

    // A text answer's signature goes back on its text.
    let events = replay("text_thought_signature.jsonl").await;
    let mut request = simple_request("set below");
    Arc::make_mut(&mut request.messages)
        .push(PromptMessage { role: Role::Assistant, parts: fold_answer(&events).into() });
    Arc::make_mut(&mut request.messages)
        .push(PromptMessage { role: Role::User, parts: vec![Part::text("And in raspberry?")].into() });
    let (body, _) = sent_body(request).await;
    assert_eq!(
        body["contents"][1],
        json!({"role": "model", "parts": [{
            "text": "There are **3** \"r\"s in strawberry.\n\nst**r**awbe**rr**y",
            "thoughtSignature": signatures("text_thought_signature.jsonl")[0],
        }]})
    );
}

#[tokio::test]
async fn settings_vertex_gemma_and_no_key() {
    // Settings: generation config laid over ours, thoughts off, streamed arguments on.
    let mut request = simple_request("set below");
    request.tools =
        vec![ToolSpec { name: "execute".into(), description: "Run.".into(), parameters: command_schema() }].into();
    request.target.model = "models/gemini-2.5-flash".to_owned();
    request.target.settings = json!({
        "include_thoughts": false,
        "stream_function_call_arguments": true,
        "generation_config": {"temperature": 0.2, "maxOutputTokens": 100},
    });
    let (body, recorded) = sent_body(request).await;
    assert_eq!(recorded.path, "/v1/models/gemini-2.5-flash:streamGenerateContent?alt=sse");
    assert_eq!(body["generationConfig"], json!({"maxOutputTokens": 100, "temperature": 0.2}));
    assert_eq!(body["toolConfig"], json!({"functionCallingConfig": {"streamFunctionCallArguments": true}}));

    // A thinking level from the settings keeps the thoughts included.
    let mut request = simple_request("set below");
    request.target.settings = json!({"generation_config": {"thinkingConfig": {"thinkingLevel": "low"}}});
    let (body, _) = sent_body(request).await;
    assert_eq!(body["generationConfig"]["thinkingConfig"], json!({"includeThoughts": true, "thinkingLevel": "low"}));

    // Gemma: the system prompt leads the first user turn; no thinking config. No key, no header;
    // no limit, no `maxOutputTokens`.
    let mut request = simple_request("set below");
    request.target.model = "gemma-3-27b-it".to_owned();
    request.target.api_key = None;
    request.target.max_output_tokens = None;
    let (body, recorded) = sent_body(request).await;
    assert_eq!(recorded.header("x-goog-api-key"), None);
    assert_eq!(
        body,
        json!({"contents": [{"role": "user", "parts": [
            {"text": "You are terse.\n\n"},
            {"text": "How many r's in strawberry?"},
        ]}]})
    );

    // Vertex takes no call ids; an older model needs no signature placeholder.
    let mut request = simple_request("set below");
    request.target.model = "gemini-2.5-pro".to_owned();
    Arc::make_mut(&mut request.messages)
        .push(PromptMessage { role: Role::Assistant, parts: vec![tool_call("c1", "execute", json!({}))].into() });
    Arc::make_mut(&mut request.messages)
        .push(PromptMessage { role: Role::Tool, parts: vec![tool_result("c1", "execute", "", false)].into() });
    let body =
        request_body_for(request, "https://aiplatform.googleapis.com/v1/projects/p/locations/global/publishers/google");
    let contents = body["contents"].as_array().expect("contents");
    assert_eq!(
        contents[1..],
        [
            json!({"role": "model", "parts": [{"functionCall": {"name": "execute", "args": {}}}]}),
            json!({"role": "user", "parts": [{"functionResponse": {"name": "execute", "response": {"output": ""}}}]}),
        ]
    );
}

fn request_body_for(mut request: ModelRequest, base_url: &str) -> Value {
    request.target.base_url = base_url.to_owned();
    serde_json::from_slice(&gemini::request_body(&request).expect("a body")).expect("JSON")
}

#[tokio::test]
async fn images_gemini_cannot_take_fail_before_sending() {
    let mut missing = simple_request("set below");
    Arc::make_mut(&mut Arc::make_mut(&mut missing.messages)[0].parts)
        .push(Part::Image { file_id: "file_gone".to_owned() });
    let mut bmp = simple_request("set below");
    Arc::make_mut(&mut Arc::make_mut(&mut bmp.messages)[0].parts).push(Part::Image { file_id: "file_bmp".to_owned() });
    bmp.images.insert("file_bmp".to_owned(), ImageData { media_type: "image/bmp".to_owned(), bytes: png_bytes() });
    let mut broken_gif = simple_request("set below");
    Arc::make_mut(&mut Arc::make_mut(&mut broken_gif.messages)[0].parts)
        .push(Part::Image { file_id: "file_gif".to_owned() });
    broken_gif.images.insert(
        "file_gif".to_owned(),
        ImageData { media_type: "image/gif".to_owned(), bytes: Arc::from(&b"GIF89a\x01"[..]) },
    );

    for (request, words) in [(missing, "file_gone"), (bmp, "image/bmp"), (broken_gif, "cannot convert the GIF")] {
        let (result, requests) = call(Reply::sse(&sse_fixture("text_thought_signature.jsonl"), 4096), |base| {
            let mut request = request;
            request.target.base_url = base.to_owned();
            request
        })
        .await;
        let error = result.expect_err("refused");
        assert_eq!((error.kind, error.retryable), (ChatErrorKind::Config, false));
        assert!(error.message.contains(words), "{}", error.message);
        assert!(requests.is_empty(), "nothing was sent");
    }
}
