//! Google Gemini end to end: the agent loop against the scripted LLM speaking Gemini's
//! `streamGenerateContent` SSE (and Vertex's streamed arguments), with the request bodies it
//! received checked against Gemini's schema, and its failures typed and retried.

use agentplane_schema::api::{ChatErrorKind, ChatStatus, ProviderType};
use agentplane_schema::event::{EventBody, StreamEvent};
use agentplane_schema::message::{Message, Part, Role};
use agentplane_tests::scripted_llm::Dialect;
use agentplane_tests::{EventStream, RecordedRequest, Reply, ScriptedLlm};
use serde_json::{Value, json};

use crate::common::{
    ADMIN_TOKEN, Db, ProviderSetup, TestEnv, WAIT, is_status, reset_mid_stream_turn, retries, tool_results,
};

const KEY: &str = "gemini-test-key-0123456789";
const MODEL: &str = "gemini-3-flash-preview";

async fn gemini_env(settings: Value) -> TestEnv {
    let llm = ScriptedLlm::builder().dialect(Dialect::Gemini).start();
    let provider = ProviderSetup {
        provider_type: ProviderType::Gemini,
        base_url: format!("http://{}/v1beta", llm.addr()),
        api_key: Some(KEY.into()),
        settings,
        model: MODEL.into(),
        max_output_tokens: Some(4096),
        vision: false,
    };
    TestEnv::start_with_provider(llm, provider, Db::Sqlite, |_| {}).await
}

/// Starts a chat with `text` and waits for its turn to end with `status`.
async fn run_turn(env: &TestEnv, text: &str, status: ChatStatus) -> (String, Vec<StreamEvent>) {
    let chat = env.create_chat(text).await;
    let mut stream = EventStream::connect(&env.base_url(), &chat.id, ADMIN_TOKEN, Some(0)).await.expect("ws");
    let events = stream.wait_for(is_status(status), WAIT).await.expect("turn ends");
    (chat.id, events)
}

/// Path, key header and the parts of every request that do not change from step to step.
fn check_request_envelope(request: &RecordedRequest) {
    assert_eq!(request.method, "POST");
    assert_eq!(request.path, format!("/v1beta/models/{MODEL}:streamGenerateContent"));
    assert_eq!(request.header("x-goog-api-key"), Some(KEY));
    assert_eq!(request.header("authorization"), None);
    let body = &request.body;
    let system = body.pointer("/systemInstruction/parts/0/text").and_then(Value::as_str).expect("system");
    assert!(system.contains("create_workspace"), "{system}");
    let declarations = body.pointer("/tools/0/functionDeclarations").and_then(Value::as_array).expect("tools");
    let names: Vec<&str> = declarations.iter().filter_map(|d| d["name"].as_str()).collect();
    assert!(names.contains(&"create_workspace") && names.contains(&"write_file"), "{names:?}");
    for declaration in declarations {
        assert_eq!(declaration["parametersJsonSchema"]["type"], "object", "{declaration}");
        assert!(declaration.get("parameters").is_none(), "{declaration}");
    }
    assert_eq!(body["generationConfig"], json!({"maxOutputTokens": 4096, "thinkingConfig": {"includeThoughts": true}}));
    let roles: Vec<&str> =
        body["contents"].as_array().expect("contents").iter().filter_map(|c| c["role"].as_str()).collect();
    assert!(roles.iter().all(|r| *r == "user" || *r == "model"), "{roles:?}");
    assert!(roles.windows(2).all(|w| w[0] != w[1]), "turns alternate: {roles:?}");
}

/// The assistant messages of a chat.
fn assistant_messages(messages: &[Message]) -> Vec<&Message> {
    messages.iter().filter(|m| m.role == Role::Assistant).collect()
}

fn signature_of(message: &Message) -> String {
    message
        .parts
        .iter()
        .find_map(|p| match p {
            Part::Reasoning { signature: Some(sig), .. } => Some(sig.clone()),
            _ => None,
        })
        .unwrap_or_else(|| panic!("a signed reasoning part: {message:?}"))
}

/// Two tool steps and a final answer: the stored messages, the file written, and what Gemini
/// was sent on each step, signatures and tool results included.
async fn two_step_turn(env: &TestEnv, streamed_arguments: bool) {
    env.llm.push_all([
        Reply::tool_call("create_workspace", json!({"template_id": "local", "name": "demo"}))
            .with_text("Setting up.")
            .with_reasoning("A workspace first.")
            .chunk_chars(3),
        Reply::tool_call("write_file", json!({"path": "hello.txt", "content": "hi from gemini\n"})).chunk_chars(5),
        Reply::text("Wrote hello.txt.").usage(1200, 9).cached_tokens(1000),
    ]);
    let (chat_id, events) = run_turn(env, "Write hello.txt", ChatStatus::Idle).await;
    assert!(!events.iter().any(|e| matches!(e.body, EventBody::Retry { .. })), "no retries");

    // The tool really ran.
    let detail = env.admin.get_chat(&chat_id).await.expect("chat");
    let ws = detail.chat.workspace_id.expect("workspace bound");
    let written = std::fs::read_to_string(env.workspace_dir(&ws).join("hello.txt")).expect("file written");
    assert_eq!(written, "hi from gemini\n");

    // Stored: reasoning (with Gemini's signature), text and calls; results; the final answer.
    let messages = env.messages(&chat_id).await;
    let roles: Vec<Role> = messages.iter().map(|m| m.role).collect();
    assert_eq!(roles, [Role::User, Role::Assistant, Role::Tool, Role::Assistant, Role::Tool, Role::Assistant]);
    let answers = assistant_messages(&messages);
    let first = answers[0];
    assert!(
        matches!(&first.parts[0], Part::Reasoning { text, signature: Some(_) } if text == "A workspace first."),
        "{first:?}"
    );
    assert_eq!(first.text(), "Setting up.");
    let calls: Vec<_> = first.tool_calls().collect();
    assert_eq!(calls.len(), 1);
    let (create_id, create_name, create_args) = calls[0];
    assert_eq!((create_name, create_args), ("create_workspace", &json!({"template_id": "local", "name": "demo"})));
    assert!(create_id.starts_with("call_"), "a made-up id: {create_id}");
    let (write_id, _, write_args) = answers[1].tool_calls().next().expect("write_file call");
    assert_eq!(write_args, &json!({"path": "hello.txt", "content": "hi from gemini\n"}));
    assert_ne!(write_id, create_id, "ids are unique within the chat");
    assert_eq!(answers[2].text(), "Wrote hello.txt.");
    let results = tool_results(&messages);
    assert_eq!(results.iter().map(|r| r.1.as_str()).collect::<Vec<_>>(), ["create_workspace", "write_file"]);
    assert!(results.iter().all(|r| !r.3), "{results:?}");

    // What Gemini was sent.
    let requests = env.llm.requests();
    assert_eq!(requests.len(), 3);
    requests.iter().for_each(check_request_envelope);
    assert_eq!(requests[0].body["contents"], json!([{"role": "user", "parts": [{"text": "Write hello.txt"}]}]));
    assert_eq!(requests[0].body.get("toolConfig").is_some(), streamed_arguments);
    let second = &requests[1].body["contents"];
    assert_eq!(
        second[1],
        json!({"role": "model", "parts": [
            {"text": "Setting up."},
            {"functionCall": {"id": create_id, "name": "create_workspace",
                "args": {"template_id": "local", "name": "demo"}},
             "thoughtSignature": signature_of(first)},
        ]})
    );
    assert_eq!(
        second[2],
        json!({"role": "user", "parts": [{"functionResponse": {
            "id": create_id, "name": "create_workspace", "response": {"output": results[0].2},
        }}]})
    );
    let third = requests[2].body["contents"].as_array().expect("contents");
    assert_eq!(third[..3], second.as_array().expect("contents")[..3], "history is sent again unchanged");
    assert_eq!(
        third[3]["parts"][0]["thoughtSignature"],
        json!(signature_of(answers[1])),
        "each step's signature goes back on its own call"
    );
    assert_ne!(signature_of(answers[1]), signature_of(first));
    assert_eq!(third[4]["parts"][0]["functionResponse"]["response"], json!({"output": results[1].2}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_two_step_turn_completes() {
    let env = gemini_env(Value::Null).await;
    two_step_turn(&env, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_two_step_turn_with_vertex_streamed_arguments_completes() {
    // Vertex streams the arguments in pieces (`partialArgs`) when asked to.
    let env = gemini_env(json!({"stream_function_call_arguments": true})).await;
    two_step_turn(&env, true).await;
    let first = &env.llm.requests()[0].body;
    assert_eq!(first["toolConfig"], json!({"functionCallingConfig": {"streamFunctionCallArguments": true}}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_with_retry_info_is_retried_after_its_delay() {
    let env = gemini_env(Value::Null).await;
    let quota = json!({"error": {"code": 429, "message": "Resource has been exhausted (e.g. check quota).",
        "status": "RESOURCE_EXHAUSTED", "details": [
            {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "1s"}]}});
    env.llm.push_all([Reply::error(429, quota), Reply::text("made it")]);
    let (chat_id, events) = run_turn(&env, "go", ChatStatus::Idle).await;
    let retries = retries(&events);
    assert_eq!(retries, [(1, 1000, ChatErrorKind::RateLimit)], "RetryInfo sets the delay");
    assert_eq!(env.messages(&chat_id).await.last().expect("last").text(), "made it");
    assert_eq!(env.llm.request_count(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_mid_stream_is_retried() {
    let env = gemini_env(Value::Null).await;
    reset_mid_stream_turn(&env).await;
    assert_eq!(env.llm.request_count(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_401_ends_in_an_auth_error_without_retrying() {
    let env = gemini_env(Value::Null).await;
    let denied = json!({"error": {"code": 401, "message": format!("Request had invalid authentication credentials: {KEY}"),
        "status": "UNAUTHENTICATED"}});
    env.llm.push(Reply::error(401, denied));
    let (chat_id, events) = run_turn(&env, "go", ChatStatus::Error).await;
    assert!(events.iter().all(|e| !matches!(e.body, EventBody::Retry { .. })));
    assert_eq!(env.llm.request_count(), 1);
    let error = env.admin.get_chat(&chat_id).await.expect("chat").chat.error.expect("error");
    assert_eq!(error.kind, ChatErrorKind::Auth);
    assert!(error.message.contains("invalid authentication credentials"), "{}", error.message);
    assert!(!error.message.contains(KEY), "the key never leaks: {}", error.message);
}
