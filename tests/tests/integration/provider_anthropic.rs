//! The agent loop against Anthropic's Messages API: the scripted LLM speaks the dialect and the
//! real orchestrator drives whole turns through it. Checks what is stored, what the tools did,
//! and that every request has the shape the API documents (path, auth headers, system blocks,
//! tools, alternating roles, thinking replay, tool results).

use agentplane_schema::api::{ChatErrorKind, ChatStatus, ProviderType};
use agentplane_schema::event::EventBody;
use agentplane_schema::message::{Part, Role};
use agentplane_tests::scripted_llm::Dialect;
use agentplane_tests::{EventStream, RecordedRequest, Reply, ScriptedCall, ScriptedLlm};
use serde_json::json;

use crate::common::{ADMIN_TOKEN, Db, ProviderSetup, TestEnv, WAIT, is_status, retries, tool_results};

const API_KEY: &str = "sk-ant-test-secret-0123456789";

async fn anthropic_env() -> TestEnv {
    let llm = ScriptedLlm::builder().dialect(Dialect::Anthropic).start();
    let provider = ProviderSetup {
        provider_type: ProviderType::Anthropic,
        // As admins configure it: the host alone; the client adds `/v1/messages`.
        base_url: format!("http://{}", llm.addr()),
        api_key: Some(API_KEY.into()),
        settings: json!({}),
        model: "claude-sonnet-4-5".into(),
        max_output_tokens: Some(4096),
        vision: false,
    };
    TestEnv::start_with_provider(llm, provider, Db::Sqlite, |_| {}).await
}

/// Starts a chat with `text` and waits for its first turn to reach `status`.
async fn run_turn(
    env: &TestEnv,
    text: &str,
    status: ChatStatus,
) -> (String, Vec<agentplane_schema::event::StreamEvent>) {
    let chat = env.create_chat(text).await;
    let mut stream = EventStream::connect(&env.base_url(), &chat.id, ADMIN_TOKEN, Some(0)).await.expect("ws");
    let events = stream.wait_for(is_status(status), WAIT).await.expect("turn ends");
    (chat.id, events)
}

fn wire_roles(request: &RecordedRequest) -> Vec<&str> {
    request.messages().iter().map(|m| m["role"].as_str().expect("role")).collect()
}

/// What every request must have, whatever its conversation.
fn check_common_shape(request: &RecordedRequest) {
    assert_eq!(request.method, "POST");
    assert_eq!(request.path, "/v1/messages");
    assert_eq!(request.header("x-api-key"), Some(API_KEY));
    assert_eq!(request.header("anthropic-version"), Some("2023-06-01"));
    assert_eq!(request.header("authorization"), None);
    let body = &request.body;
    assert_eq!(body["model"], "claude-sonnet-4-5");
    assert_eq!(body["max_tokens"], 4096);
    assert_eq!(body["stream"], true);
    // The system prompt is a list of text blocks, never a message.
    let system = body["system"].as_array().expect("system blocks");
    assert_eq!(system.len(), 1);
    assert_eq!(system[0]["type"], "text");
    assert!(system[0]["text"].as_str().expect("text").contains("create_workspace"));
    assert_eq!(system[0]["cache_control"], json!({"type": "ephemeral"}));
    // Tools carry a JSON schema as `input_schema`.
    let tools = body["tools"].as_array().expect("tools");
    let names: Vec<&str> = tools.iter().map(|t| t["name"].as_str().expect("name")).collect();
    assert!(names.contains(&"create_workspace") && names.contains(&"write_file"), "{names:?}");
    for tool in tools {
        assert_eq!(tool["input_schema"]["type"], "object", "{tool}");
        assert!(tool["description"].is_string(), "{tool}");
        assert!(tool.get("function").is_none() && tool.get("parameters").is_none(), "{tool}");
    }
    // Roles alternate, starting with the user; no system or tool roles.
    let roles = wire_roles(request);
    assert_eq!(roles[0], "user");
    assert!(roles.windows(2).all(|w| w[0] != w[1]), "{roles:?}");
    assert!(roles.iter().all(|r| matches!(*r, "user" | "assistant")), "{roles:?}");
    let breakpoints = serde_json::to_string(body).expect("JSON").matches("cache_control").count();
    assert!(breakpoints <= 4, "at most four cache breakpoints, got {breakpoints}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_turn_with_tools_runs_through_the_messages_api() {
    let env = anthropic_env().await;
    let create =
        ScriptedCall::new("create_workspace", json!({"template_id": "local", "name": "demo"})).with_id("toolu_ws");
    let write = ScriptedCall::new("write_file", json!({"path": "hello.txt", "content": "hello from claude\n"}))
        .with_id("toolu_write");
    env.llm.push_all([
        // Reasoning, text and arguments all arrive in 5-character pieces.
        Reply::calls([create]).with_reasoning("The user wants a workspace.").with_text("Setting up.").chunk_chars(5),
        Reply::calls([write]).chunk_chars(5),
        Reply::text("Wrote hello.txt in demo.").usage(900, 12).cached_tokens(800),
    ]);
    let (chat_id, events) = run_turn(&env, "Make a demo workspace and write hello.txt", ChatStatus::Idle).await;
    assert!(!events.iter().any(|e| matches!(e.body, EventBody::Retry { .. } | EventBody::Error { .. })));

    // The tools really ran: the workspace exists and holds the file.
    let detail = env.admin.get_chat(&chat_id).await.expect("chat");
    let ws_id = detail.chat.workspace_id.expect("workspace bound");
    let content = std::fs::read_to_string(env.workspace_dir(&ws_id).join("hello.txt")).expect("file");
    assert_eq!(content, "hello from claude\n");
    let workspaces = env.admin.list_workspaces().await.expect("workspaces");
    assert_eq!(workspaces.len(), 1);
    assert_eq!(workspaces[0].name, "demo");

    // What is stored: the signed reasoning, the text and the calls, their results, the answer.
    let messages = env.messages(&chat_id).await;
    let roles: Vec<Role> = messages.iter().map(|m| m.role).collect();
    assert_eq!(roles, [Role::User, Role::Assistant, Role::Tool, Role::Assistant, Role::Tool, Role::Assistant]);
    let signature = "scripted-signature-msg_chatcmpl_scripted_1";
    assert_eq!(
        messages[1].parts,
        vec![
            Part::Reasoning { text: "The user wants a workspace.".into(), signature: Some(signature.into()) },
            Part::text("Setting up."),
            Part::ToolCall {
                call_id: "toolu_ws".into(),
                name: "create_workspace".into(),
                args: json!({"template_id": "local", "name": "demo"}),
            },
        ]
        .into()
    );
    assert_eq!(
        messages[3].parts,
        vec![Part::ToolCall {
            call_id: "toolu_write".into(),
            name: "write_file".into(),
            args: json!({"path": "hello.txt", "content": "hello from claude\n"}),
        }]
        .into()
    );
    let results = tool_results(&messages);
    assert_eq!(results.len(), 2);
    assert_eq!((results[0].0.as_str(), results[0].1.as_str(), results[0].3), ("toolu_ws", "create_workspace", false));
    assert_eq!((results[1].0.as_str(), results[1].1.as_str(), results[1].3), ("toolu_write", "write_file", false));
    assert_eq!(messages[5].parts, vec![Part::text("Wrote hello.txt in demo.")].into());

    // Every request has the documented shape.
    let requests = env.llm.requests();
    assert_eq!(requests.len(), 3);
    requests.iter().for_each(check_common_shape);
    assert_eq!(
        requests[0].messages(),
        [json!({"role": "user", "content": [{"type": "text",
        "text": "Make a demo workspace and write hello.txt", "cache_control": {"type": "ephemeral"}}]})]
    );

    // The second request replays the first answer, thinking first, then gives the result back as
    // a `tool_result` block in a user message.
    let second = &requests[1];
    assert_eq!(wire_roles(second), ["user", "assistant", "user"]);
    assert_eq!(
        second.messages()[1]["content"],
        json!([
            {"type": "thinking", "thinking": "The user wants a workspace.", "signature": signature},
            {"type": "text", "text": "Setting up."},
            {"type": "tool_use", "id": "toolu_ws", "name": "create_workspace",
                "input": {"template_id": "local", "name": "demo"}},
        ])
    );
    let result_blocks = second.messages()[2]["content"].as_array().expect("blocks");
    assert_eq!(result_blocks.len(), 1);
    let block = &result_blocks[0];
    assert_eq!(block["type"], "tool_result");
    assert_eq!(block["tool_use_id"], "toolu_ws");
    assert_eq!(block["is_error"], false);
    assert_eq!(block["content"].as_str(), Some(results[0].2.as_str()));
    assert_eq!(block["cache_control"], json!({"type": "ephemeral"}), "the end of the prompt is cached");

    // The third: both steps, the newest result last; the previous step's result keeps a
    // breakpoint so its prefix is read back from the cache.
    let third = &requests[2];
    assert_eq!(wire_roles(third), ["user", "assistant", "user", "assistant", "user"]);
    assert_eq!(third.messages()[2], second.messages()[2], "the earlier prompt is repeated unchanged");
    assert_eq!(
        third.messages()[3]["content"],
        json!([{"type": "tool_use", "id": "toolu_write", "name": "write_file",
            "input": {"path": "hello.txt", "content": "hello from claude\n"}}])
    );
    let last = &third.messages()[4]["content"][0];
    assert_eq!((last["type"].as_str(), last["tool_use_id"].as_str()), (Some("tool_result"), Some("toolu_write")));
    assert_eq!(last["cache_control"], json!({"type": "ephemeral"}));
}

fn anthropic_error(status: u16, kind: &str, message: &str) -> Reply {
    Reply::error(status, json!({"type": "error", "error": {"type": kind, "message": message}}))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_limit_with_retry_after_is_retried_and_completes() {
    let env = anthropic_env().await;
    env.llm.push_all([
        anthropic_error(429, "rate_limit_error", "Number of request tokens has exceeded your rate limit")
            .header("retry-after", "1"),
        Reply::text("made it"),
    ]);
    let (chat_id, events) = run_turn(&env, "go", ChatStatus::Idle).await;
    assert_eq!(retries(&events), [(1, 1000, ChatErrorKind::RateLimit)], "retry-after sets the delay");
    assert_eq!(env.messages(&chat_id).await.last().expect("answer").text(), "made it");
    assert_eq!(env.llm.request_count(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_mid_stream_is_retried_and_completes() {
    let env = anthropic_env().await;
    env.llm.push_all([
        // message_start, the text block's start, a ping and one delta, then the connection drops.
        Reply::text("this answer is cut short").reset_after(4),
        Reply::text("second try"),
    ]);
    let (chat_id, events) = run_turn(&env, "go", ChatStatus::Idle).await;
    assert_eq!(retries(&events).len(), 1, "{events:?}");
    assert_eq!(retries(&events)[0].2, ChatErrorKind::Provider);
    let messages = env.messages(&chat_id).await;
    assert_eq!(messages.len(), 2);
    assert_eq!(messages[1].parts, vec![Part::text("second try")].into());
    assert_eq!(env.llm.request_count(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_overloaded_answer_is_retried() {
    let env = anthropic_env().await;
    env.llm.push_all([anthropic_error(529, "overloaded_error", "Overloaded"), Reply::text("after the storm")]);
    let (chat_id, events) = run_turn(&env, "go", ChatStatus::Idle).await;
    assert_eq!(retries(&events).iter().map(|r| r.2).collect::<Vec<_>>(), [ChatErrorKind::Overloaded]);
    assert_eq!(env.messages(&chat_id).await.last().expect("answer").text(), "after the storm");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_key_ends_in_an_auth_error_after_one_request() {
    let env = anthropic_env().await;
    env.llm.push(anthropic_error(401, "authentication_error", &format!("invalid x-api-key: {API_KEY}")));
    let (chat_id, events) = run_turn(&env, "go", ChatStatus::Error).await;
    assert!(retries(&events).is_empty());
    assert_eq!(env.llm.request_count(), 1);
    let error = env.admin.get_chat(&chat_id).await.expect("chat").chat.error.expect("error");
    assert_eq!(error.kind, ChatErrorKind::Auth);
    assert!(error.message.contains("invalid x-api-key"), "{}", error.message);
    assert!(!error.message.contains(API_KEY), "the key never leaks: {}", error.message);
}
