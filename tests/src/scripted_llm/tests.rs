//! The scripted LLM driven by a real HTTP client, checked against what an OpenAI client expects.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::*;

const WAIT: Duration = Duration::from_secs(5);

fn client() -> reqwest::Client {
    reqwest::Client::builder().connect_timeout(WAIT).build().expect("client")
}

fn chat_body(user_text: &str, stream: bool, include_usage: bool) -> Value {
    let mut body = json!({
        "model": "gpt-test",
        "stream": stream,
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": user_text},
        ],
    });
    if include_usage {
        body["stream_options"] = json!({"include_usage": true});
    }
    body
}

async fn post(llm: &ScriptedLlm, body: &Value) -> reqwest::Response {
    client()
        .post(format!("{}/chat/completions", llm.base_url()))
        .bearer_auth("sk-test")
        .json(body)
        .send()
        .await
        .expect("request")
}

/// Posts `body` as it is, JSON or not.
async fn post_text(llm: &ScriptedLlm, body: &'static str) -> reqwest::Response {
    client()
        .post(format!("{}/chat/completions", llm.base_url()))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .expect("send")
}

/// The `data:` payloads of an SSE body, in order.
fn sse_payloads(body: &str) -> Vec<String> {
    body.split("\n\n")
        .filter(|m| !m.is_empty())
        .map(|m| m.strip_prefix("data: ").unwrap_or_else(|| panic!("not an SSE data line: {m:?}")).to_string())
        .collect()
}

fn parse_chunks(payloads: &[String]) -> Vec<Value> {
    payloads.iter().filter(|p| *p != "[DONE]").map(|p| serde_json::from_str(p).expect("chunk JSON")).collect()
}

fn content_of(chunks: &[Value], field: &str) -> Vec<String> {
    chunks
        .iter()
        .filter_map(|c| c.pointer(&format!("/choices/0/delta/{field}")).and_then(Value::as_str))
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}

#[tokio::test]
async fn text_streams_like_openai() {
    let llm = ScriptedLlm::start();
    llm.push(Reply::text("Hello, streaming world!"));
    let resp = post(&llm, &chat_body("hi", true, true)).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let payloads = sse_payloads(&resp.text().await.expect("body"));
    assert_eq!(payloads.last().map(String::as_str), Some("[DONE]"));
    let chunks = parse_chunks(&payloads);

    for c in &chunks {
        assert_eq!(c["object"], "chat.completion.chunk");
        assert_eq!(c["model"], "gpt-test");
        assert_eq!(c["id"], chunks[0]["id"]);
        assert!(c["created"].is_u64());
    }
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let pieces = content_of(&chunks, "content");
    assert!(pieces.len() >= 5, "text should arrive in several pieces: {pieces:?}");
    assert_eq!(pieces.concat(), "Hello, streaming world!");

    let (usage_chunk, rest) = chunks.split_last().expect("chunks");
    let finish = rest.last().expect("final chunk");
    assert_eq!(finish["choices"][0]["finish_reason"], "stop");
    assert_eq!(finish["choices"][0]["delta"], json!({}));
    for c in &rest[..rest.len() - 1] {
        assert!(c["choices"][0]["finish_reason"].is_null(), "only the final chunk finishes: {c}");
    }
    assert_eq!(usage_chunk["choices"], json!([]));
    let usage = &usage_chunk["usage"];
    assert_eq!(
        usage["total_tokens"].as_u64(),
        Some(usage["prompt_tokens"].as_u64().unwrap_or(0) + usage["completion_tokens"].as_u64().unwrap_or(0))
    );

    let recorded = llm.requests();
    assert_eq!(recorded.len(), 1);
    assert_eq!(recorded[0].header("Authorization"), Some("Bearer sk-test"));
    assert_eq!(recorded[0].last_user_text().as_deref(), Some("hi"));
    assert_eq!(recorded[0].system_prompt().as_deref(), Some("be brief"));
}

#[tokio::test]
async fn usage_chunk_only_when_asked_and_default_reply_is_ok() {
    let llm = ScriptedLlm::builder().chunk_chars(1).start();
    let payloads = sse_payloads(&post(&llm, &chat_body("x", true, false)).await.text().await.expect("body"));
    let chunks = parse_chunks(&payloads);
    assert!(chunks.iter().all(|c| c.get("usage").is_none()));
    assert_eq!(content_of(&chunks, "content"), ["o", "k"]);
    assert_eq!(chunks.last().expect("final")["choices"][0]["finish_reason"], "stop");
}

#[tokio::test]
async fn tool_call_pieces_reassemble() {
    let llm = ScriptedLlm::start();
    let read_args = json!({"path": "src/main.rs", "offset": 10});
    let exec_args = json!({"command": "cargo test --workspace", "timeout_seconds": 120});
    llm.push(
        Reply::tool_calls([("read_file", read_args.clone()), ("execute", exec_args.clone())]).with_text("Let me look."),
    );
    llm.push(Reply::calls([ScriptedCall::new("write_file", "{not json").with_id("call_fixed")]));

    let payloads = sse_payloads(&post(&llm, &chat_body("go", true, false)).await.text().await.expect("body"));
    let chunks = parse_chunks(&payloads);
    assert_eq!(content_of(&chunks, "content").concat(), "Let me look.");

    // Reassemble the way an OpenAI client does: by index; id and name come once.
    let mut calls: BTreeMap<u64, (String, String, Vec<String>)> = BTreeMap::new();
    let mut first_call_chunk = None;
    for (i, c) in chunks.iter().enumerate() {
        let Some(deltas) = c.pointer("/choices/0/delta/tool_calls").and_then(Value::as_array) else { continue };
        first_call_chunk.get_or_insert(i);
        for d in deltas {
            let index = d["index"].as_u64().expect("index");
            let entry = calls.entry(index).or_default();
            if let Some(id) = d["id"].as_str() {
                assert!(entry.0.is_empty(), "id sent twice");
                entry.0 = id.to_string();
                assert_eq!(d["type"], "function");
                entry.1 = d["function"]["name"].as_str().expect("name with id").to_string();
            } else {
                assert!(d["function"].get("name").is_none(), "name only in the first delta");
            }
            if let Some(piece) = d["function"]["arguments"].as_str().filter(|p| !p.is_empty()) {
                entry.2.push(piece.to_string());
            }
        }
    }
    let text_chunks_after_calls = chunks[first_call_chunk.expect("tool call chunks")..]
        .iter()
        .any(|c| c.pointer("/choices/0/delta/content").is_some());
    assert!(!text_chunks_after_calls, "text comes before the calls");
    assert_eq!(calls.len(), 2);
    let (id0, name0, pieces0) = &calls[&0];
    let (id1, name1, pieces1) = &calls[&1];
    assert_ne!(id0, id1);
    assert!(id0.starts_with("call_"));
    assert_eq!((name0.as_str(), name1.as_str()), ("read_file", "execute"));
    assert!(pieces0.len() > 2 && pieces1.len() > 2, "arguments arrive in pieces");
    assert_eq!(serde_json::from_str::<Value>(&pieces0.concat()).expect("args 0"), read_args);
    assert_eq!(serde_json::from_str::<Value>(&pieces1.concat()).expect("args 1"), exec_args);
    assert_eq!(chunks.last().expect("final")["choices"][0]["finish_reason"], "tool_calls");

    // Arguments are sent verbatim, broken JSON included, with the scripted id.
    let payloads = sse_payloads(&post(&llm, &chat_body("go", true, false)).await.text().await.expect("body"));
    let chunks = parse_chunks(&payloads);
    let args: String = chunks
        .iter()
        .filter_map(|c| c.pointer("/choices/0/delta/tool_calls/0/function/arguments").and_then(Value::as_str))
        .collect();
    assert_eq!(args, "{not json");
    assert!(chunks.iter().any(|c| c.pointer("/choices/0/delta/tool_calls/0/id") == Some(&json!("call_fixed"))));
}

#[tokio::test]
async fn non_streaming_completion() {
    let llm = ScriptedLlm::start();
    llm.push(Reply::tool_call("execute", json!({"command": "ls"})).with_text("checking").usage(11, 3));
    let resp = post(&llm, &chat_body("x", false, false)).await;
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.expect("json");
    assert_eq!(body["object"], "chat.completion");
    let choice = &body["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls");
    assert_eq!(choice["message"]["content"], "checking");
    assert_eq!(choice["message"]["tool_calls"][0]["function"]["name"], "execute");
    assert_eq!(choice["message"]["tool_calls"][0]["function"]["arguments"], r#"{"command":"ls"}"#);
    assert_eq!(body["usage"]["prompt_tokens"], 11);
    assert_eq!(body["usage"]["total_tokens"], 14);
}

#[tokio::test]
async fn error_replies_carry_status_headers_and_body() {
    let llm = ScriptedLlm::start();
    llm.push(Reply::rate_limited(7));
    llm.push(
        Reply::error(503, json!({"error": {"message": "overloaded", "type": "server_error"}})).header("x-why", "test"),
    );
    llm.push(Reply::text("after errors"));

    let resp = post(&llm, &chat_body("x", true, true)).await;
    assert_eq!(resp.status(), 429);
    assert_eq!(resp.headers()["retry-after"], "7");
    let body: Value = resp.json().await.expect("json");
    assert_eq!(body["error"]["code"], "rate_limit_exceeded");

    let resp = post(&llm, &chat_body("x", true, true)).await;
    assert_eq!(resp.status(), 503);
    assert_eq!(resp.headers()["x-why"], "test");
    assert_eq!(resp.json::<Value>().await.expect("json")["error"]["message"], "overloaded");

    // The connection stays usable after an error answer.
    let payloads = sse_payloads(&post(&llm, &chat_body("x", true, false)).await.text().await.expect("body"));
    assert_eq!(content_of(&parse_chunks(&payloads), "content").concat(), "after errors");
    assert_eq!(llm.request_count(), 3);
}

#[tokio::test]
async fn hang_ends_when_the_client_drops() {
    let llm = ScriptedLlm::start();
    llm.push(Reply::hang().with_text("partial answer"));
    let mut resp = post(&llm, &chat_body("x", true, false)).await;
    let mut seen = String::new();
    while !content_of(&parse_chunks(&sse_payloads(&seen)), "content").concat().contains("partial answer") {
        let piece = tokio::time::timeout(WAIT, resp.chunk()).await.expect("chunk in time").expect("chunk");
        seen.push_str(&String::from_utf8_lossy(&piece.expect("stream still open")));
    }
    assert!(!seen.contains("finish_reason\":\"stop"), "a hanging reply never finishes");
    // Nothing more comes while the client stays.
    assert!(tokio::time::timeout(Duration::from_millis(200), resp.chunk()).await.is_err());
    assert_eq!(llm.active_replies(), 1);

    drop(resp);
    llm.wait_until_idle(WAIT).await.expect("the hanging reply ends when the client leaves");
    assert_eq!(llm.cancelled_replies(), 1);
}

#[tokio::test]
async fn reset_after_cuts_the_stream() {
    let llm = ScriptedLlm::start();
    llm.push(Reply::text("abcdefghijklmnop").reset_after(3));
    let mut resp = post(&llm, &chat_body("x", true, false)).await;
    let mut received = String::new();
    let error = loop {
        match resp.chunk().await {
            Ok(Some(piece)) => received.push_str(&String::from_utf8_lossy(&piece)),
            Ok(None) => panic!("the body must not end cleanly; got {received}"),
            Err(e) => break e,
        }
    };
    assert!(error.is_body() || error.is_decode() || error.is_request(), "{error:?}");
    let payloads = sse_payloads(&received);
    assert_eq!(payloads.len(), 3, "{payloads:?}");
    assert_eq!(content_of(&parse_chunks(&payloads), "content").concat(), "abcdefgh");

    // The server keeps serving new connections.
    let payloads = sse_payloads(&post(&llm, &chat_body("x", true, false)).await.text().await.expect("body"));
    assert_eq!(content_of(&parse_chunks(&payloads), "content").concat(), "ok");
}

#[tokio::test]
async fn delays_are_applied() {
    let llm = ScriptedLlm::start();
    llm.push(
        Reply::text("abcdefgh").chunk_chars(4).delay(Duration::from_millis(150)).chunk_delay(Duration::from_millis(40)),
    );
    let started = Instant::now();
    let resp = post(&llm, &chat_body("x", true, false)).await;
    assert!(started.elapsed() >= Duration::from_millis(150), "status line waits for the first-byte delay");
    resp.text().await.expect("body");
    // role, 2 text pieces, final chunk, [DONE]: four gaps between five messages.
    assert!(started.elapsed() >= Duration::from_millis(150 + 4 * 40));
}

/// The write log once it holds `n` writes (or after 5 s, as it is then). A write is logged once
/// `write` has returned in the server's thread, which can be just after the client has read the
/// bytes.
async fn logged_writes(llm: &ScriptedLlm, n: usize) -> Vec<Written> {
    let deadline = Instant::now() + Duration::from_secs(5);
    while llm.write_times().len() < n && Instant::now() < deadline {
        tokio::task::yield_now().await;
    }
    llm.write_times()
}

#[tokio::test]
async fn write_log_times_every_paced_message() {
    let llm = ScriptedLlm::builder().write_log(true).start();
    llm.push(Reply::text("abcdefgh").chunk_chars(4).chunk_delay(Duration::from_millis(10)));
    llm.push(Reply::text("whole"));
    let started = Instant::now();
    post(&llm, &chat_body("x", true, false)).await.text().await.expect("body");
    post(&llm, &chat_body("y", true, false)).await.text().await.expect("body");
    let log = logged_writes(&llm, 6).await;
    // role, 2 text pieces, final chunk, [DONE] each in its own write; then one write for all.
    let order: Vec<(usize, usize)> = log.iter().map(|w| (w.request, w.message)).collect();
    assert_eq!(order, [(0, 0), (0, 1), (0, 2), (0, 3), (0, 4), (1, 4)]);
    assert!(log.windows(2).all(|w| w[0].at <= w[1].at) && log[0].at >= started);
    assert!(log[4].at.duration_since(log[0].at) >= Duration::from_millis(40), "the delays sit between writes");
    assert!(ScriptedLlm::start().write_times().is_empty(), "off by default");
}

#[tokio::test]
async fn a_responder_sees_each_requests_place_in_the_log() {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let seen_by_responder = seen.clone();
    let llm = ScriptedLlm::builder()
        .write_log(true)
        .responder(move |req| {
            let text = req.last_user_text().unwrap_or_default();
            seen_by_responder.lock().expect("lock").push((req.index, text.clone()));
            Reply::text(text)
        })
        .start();
    let bodies = ["a", "b", "c", "d"].map(|text| chat_body(text, true, false));
    let (a, b, c, d) =
        tokio::join!(post(&llm, &bodies[0]), post(&llm, &bodies[1]), post(&llm, &bodies[2]), post(&llm, &bodies[3]));
    for response in [a, b, c, d] {
        response.text().await.expect("body");
    }
    let mut seen = seen.lock().expect("lock").clone();
    seen.sort();
    let mut recorded: Vec<(usize, String)> =
        llm.requests().iter().map(|r| (r.index, r.last_user_text().unwrap_or_default())).collect();
    recorded.sort();
    assert_eq!(seen, recorded, "the responder sees the index the request is recorded with");
    assert_eq!(seen.iter().map(|(i, _)| *i).collect::<Vec<_>>(), [0, 1, 2, 3]);
    let mut logged: Vec<usize> = logged_writes(&llm, 4).await.iter().map(|w| w.request).collect();
    logged.sort();
    assert_eq!(logged, [0, 1, 2, 3], "each answer's write carries its request's index");
}

#[test]
fn render_body_is_what_the_server_streams() {
    let reply = Reply::text("Hello, world").with_reasoning("hmm");
    let body = String::from_utf8(render_body(Dialect::OpenAiChat, &reply, 5)).expect("UTF-8");
    let payloads = sse_payloads(&body);
    assert_eq!(payloads.last().map(String::as_str), Some("[DONE]"));
    let chunks = parse_chunks(&payloads);
    assert_eq!(content_of(&chunks, "content"), ["Hello", ", wor", "ld"]);
    assert_eq!(content_of(&chunks, "reasoning_content"), ["hmm"]);
    assert!(chunks.last().and_then(|c| c.get("usage")).is_some(), "ends with the usage chunk");
    for dialect in [Dialect::OpenAiResponses, Dialect::Anthropic, Dialect::Gemini, Dialect::Bedrock] {
        let call = Reply::tool_call("edit", json!({"path": "a.rs", "text": "fn main() {}"})).with_text("ok");
        assert!(!render_body(dialect, &call, 3).is_empty(), "{dialect:?}");
    }
}

#[tokio::test]
async fn responder_answers_concurrent_requests_by_content() {
    let llm = ScriptedLlm::with_responder(|req| {
        if req.tool_result_count() > 0 {
            Reply::text(format!("saw {} results", req.tool_result_count()))
        } else {
            let text = req.last_user_text().unwrap_or_default();
            Reply::text(format!("echo {text}")).chunk_delay(Duration::from_millis(5))
        }
    });
    let requests = (0..32).map(|i| {
        let llm = &llm;
        async move {
            let body = chat_body(&format!("n{i}"), true, false);
            let payloads = sse_payloads(&post(llm, &body).await.text().await.expect("body"));
            (i, content_of(&parse_chunks(&payloads), "content").concat())
        }
    });
    for (i, text) in futures::future::join_all(requests).await {
        assert_eq!(text, format!("echo n{i}"));
    }
    assert_eq!(llm.wait_for_requests(32, WAIT).await.expect("recorded").len(), 32);

    let mut body = chat_body("x", false, false);
    body["messages"] = json!([
        {"role": "user", "content": [{"type": "text", "text": "x"}]},
        {"role": "assistant", "content": null, "tool_calls": [{"id": "a", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "a", "content": "one"},
    ]);
    let answer: Value = post(&llm, &body).await.json().await.expect("json");
    assert_eq!(answer["choices"][0]["message"]["content"], "saw 1 results");

    // Scripted replies take precedence over the responder.
    llm.push(Reply::text("scripted"));
    let answer: Value = post(&llm, &chat_body("x", false, false)).await.json().await.expect("json");
    assert_eq!(answer["choices"][0]["message"]["content"], "scripted");
}

#[tokio::test]
async fn responder_panic_becomes_a_500() {
    let llm = ScriptedLlm::with_responder(|_| panic!("boom"));
    let resp = post(&llm, &chat_body("x", true, false)).await;
    assert_eq!(resp.status(), 500);
    assert!(resp.text().await.expect("body").contains("boom"));
}

#[tokio::test]
async fn wait_for_requests_wakes_on_arrival_and_times_out() {
    let llm = ScriptedLlm::start();
    let err = llm.wait_for_requests(1, Duration::from_millis(50)).await.expect_err("nothing sent");
    assert!(matches!(err, Error::Timeout { .. }), "{err}");

    let body = chat_body("late", true, false);
    let (waited, _) = tokio::join!(llm.wait_for_requests(1, WAIT), async {
        tokio::time::sleep(Duration::from_millis(50)).await;
        post(&llm, &body).await.text().await.expect("body")
    });
    let requests = waited.expect("woken by the request");
    assert_eq!(requests[0].last_user_text().as_deref(), Some("late"));
    assert!(requests[0].is_stream());
    assert_eq!(requests[0].model(), Some("gpt-test"));
}

#[tokio::test]
async fn models_route_unknown_routes_and_bad_json() {
    let llm = ScriptedLlm::builder().models(["m1", "m2"]).record(false).start();
    let models: Value =
        client().get(format!("{}/models", llm.base_url())).send().await.expect("send").json().await.expect("json");
    assert_eq!(models["data"][1]["id"], "m2");

    let resp = client().get(format!("{}/nope", llm.base_url())).send().await.expect("send");
    assert_eq!(resp.status(), 404);

    let resp = post_text(&llm, "{").await;
    assert_eq!(resp.status(), 400);

    post(&llm, &chat_body("x", true, false)).await.text().await.expect("body");
    assert_eq!(llm.request_count(), 1);
    assert!(llm.requests().is_empty(), "record(false) keeps no bodies");
}

#[tokio::test]
async fn chunked_request_bodies_are_read() {
    let llm = ScriptedLlm::start();
    let body = chat_body("chunked", true, false).to_string();
    let (a, b) = body.split_at(body.len() / 2);
    let request = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n\
         {:x}\r\n{a}\r\n{:x}\r\n{b}\r\n0\r\n\r\n",
        a.len(),
        b.len()
    );
    let mut socket = tokio::net::TcpStream::connect(llm.addr()).await.expect("connect");
    socket.write_all(request.as_bytes()).await.expect("write");
    let mut response = String::new();
    tokio::time::timeout(WAIT, socket.read_to_string(&mut response)).await.expect("in time").expect("read");
    assert!(response.starts_with("HTTP/1.1 200 OK\r\n"), "{response}");
    assert!(response.ends_with("data: [DONE]\n\n\r\n0\r\n\r\n"), "{response}");
    assert_eq!(llm.requests()[0].last_user_text().as_deref(), Some("chunked"));
}

#[test]
fn server_handle_is_send_and_sync_and_stops_on_drop() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<ScriptedLlm>();
    let llm = ScriptedLlm::start();
    let addr = llm.addr();
    drop(llm);
    assert!(std::net::TcpStream::connect(addr).is_err(), "the port is closed after drop");
}

#[tokio::test]
async fn message_heads_read_roles_and_contents_without_building_the_body() {
    let llm = ScriptedLlm::start();
    let body = json!({
        "model": "gpt-test",
        "stream": false,
        "messages": [
            {"role": "system", "content": "be \"brief\"\n"},
            {"role": "user", "content": [{"type": "text", "text": "parts"}]},
            {"role": "assistant", "content": null, "tool_calls": [{"id": "c1", "type": "function",
                "function": {"name": "write_file", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "wrote é"},
        ],
    });
    let answer: Value = post(&llm, &body).await.json().await.expect("json");
    assert_eq!(answer["model"], "gpt-test", "the head is read: {answer}");
    let request = &llm.requests()[0];
    let heads = request.message_heads();
    let roles: Vec<&str> = heads.iter().map(|m| m.role.as_ref()).collect();
    assert_eq!(roles, ["system", "user", "assistant", "tool"]);
    assert_eq!(heads[0].content_str().as_deref(), Some("be \"brief\"\n"), "escapes are decoded");
    assert_eq!(heads[1].content_str(), None, "parts are not a string");
    let parts: Value = serde_json::from_str(heads[1].content.expect("content").get()).expect("JSON");
    assert_eq!(parts, json!([{"type": "text", "text": "parts"}]));
    assert_eq!(heads[2].content_str(), None);
    assert_eq!(heads[3].content_str().as_deref(), Some("wrote é"));
    // The same request read as a value, as tests do.
    assert_eq!(request.messages().len(), 4);
    assert_eq!(request.body["messages"][3]["tool_call_id"], "c1");
    assert_eq!(serde_json::from_slice::<Value>(request.body.raw()).expect("raw JSON"), body);
}

#[tokio::test]
async fn a_json_body_that_is_not_an_object_is_answered() {
    let llm = ScriptedLlm::start();
    let resp = post_text(&llm, "[1, 2]").await;
    assert_eq!(resp.status(), 200);
    let request = &llm.requests()[0];
    assert_eq!(request.body[1], 2);
    assert!(request.message_heads().is_empty());
}
