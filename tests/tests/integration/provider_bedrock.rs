//! The Bedrock Converse dialect through the whole agent loop: the scripted LLM answers in AWS
//! event-stream frames, and every request it received is checked against the Converse schema
//! and its SigV4 signature, recomputed independently of the client's signer.

use agentplane_schema::api::{ChatErrorKind, ChatStatus, ProviderType};
use agentplane_schema::event::EventBody;
use agentplane_schema::message::{Part, Role};
use agentplane_tests::aws::{SigV4Expect, verify_sigv4};
use agentplane_tests::scripted_llm::Dialect;
use agentplane_tests::{EventStream, RecordedRequest, Reply, ScriptedLlm};
use serde_json::{Value, json};

use crate::common::{
    ADMIN_TOKEN, Db, ProviderSetup, TestEnv, WAIT, is_status, reset_mid_stream_turn, retries, tool_results,
};

const ACCESS_KEY_ID: &str = "AKIDEXAMPLE";
const SECRET: &str = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY";
const REGION: &str = "us-west-2";
/// Its `:` is percent-encoded in the path, and encoded again in the signed canonical request.
const MODEL: &str = "anthropic.claude-sonnet-4-5-20250929-v1:0";
const PATH: &str = "/model/anthropic.claude-sonnet-4-5-20250929-v1%3A0/converse-stream";
/// What the scripted Bedrock signs its reasoning with.
const SCRIPTED_SIGNATURE: &str = "c2NyaXB0ZWQtcmVhc29uaW5nLXNpZ25hdHVyZQ==";

async fn start() -> TestEnv {
    let llm = ScriptedLlm::builder().dialect(Dialect::Bedrock).start();
    let provider = ProviderSetup {
        provider_type: ProviderType::Bedrock,
        base_url: format!("http://{}", llm.addr()),
        api_key: Some(SECRET.into()),
        settings: json!({"region": REGION, "access_key_id": ACCESS_KEY_ID}),
        model: MODEL.into(),
        max_output_tokens: Some(4096),
        vision: false,
    };
    TestEnv::start_with_provider(llm, provider, Db::Sqlite, |_| {}).await
}

/// A request as Bedrock would accept it: the path, a valid signature over it, and a Converse
/// body whose roles alternate, starting with the user.
fn assert_converse_request(request: &RecordedRequest) {
    assert_eq!((request.method.as_str(), request.path.as_str()), ("POST", PATH));
    assert_eq!(request.header("content-type"), Some("application/json"));
    let expect =
        SigV4Expect { access_key_id: ACCESS_KEY_ID, secret_access_key: SECRET, region: REGION, service: "bedrock" };
    if let Err(problem) = verify_sigv4(&request.method, &request.path, &request.headers, request.body.raw(), &expect) {
        panic!("bad signature: {problem}");
    }
    let roles: Vec<&str> = request.messages().iter().filter_map(|m| m["role"].as_str()).collect();
    assert_eq!(roles.first(), Some(&"user"), "{roles:?}");
    assert!(roles.windows(2).all(|w| w[0] != w[1]), "roles alternate: {roles:?}");
    assert!(request.messages().iter().all(|m| m["content"].as_array().is_some_and(|c| !c.is_empty())));
    assert!(request.body.get("model").is_none(), "the model is in the path");
}

async fn turn(env: &TestEnv, text: &str) -> (String, Vec<agentplane_schema::event::StreamEvent>) {
    let chat = env.create_chat(text).await;
    let mut stream = EventStream::connect(&env.base_url(), &chat.id, ADMIN_TOKEN, Some(0)).await.expect("ws");
    let events = stream
        .wait_for(|e| is_status(ChatStatus::Idle)(e) || is_status(ChatStatus::Error)(e), WAIT)
        .await
        .expect("turn ends");
    (chat.id, events)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_turn_with_tools_runs_over_bedrock() {
    let env = start().await;
    let create_args = json!({"template_id": "local", "name": "demo"});
    let write_args = json!({"path": "notes/hello.txt", "content": "hello from bedrock\n"});
    env.llm.push_all([
        Reply::tool_call("create_workspace", &create_args)
            .with_reasoning("The user wants a file.")
            .with_text("Setting up a workspace.")
            .chunk_chars(5),
        Reply::tool_call("write_file", &write_args).chunk_chars(7),
        Reply::text("Wrote notes/hello.txt.").usage(900, 12),
    ]);
    let (chat_id, _events) = turn(&env, "Write a hello file").await;

    // The tool really ran: the workspace exists under its name and holds the file.
    let detail = env.admin.get_chat(&chat_id).await.expect("chat");
    assert_eq!(detail.chat.status, ChatStatus::Idle);
    let workspace_id = detail.chat.workspace_id.clone().expect("workspace bound");
    let workspaces = env.admin.list_workspaces().await.expect("workspaces");
    assert_eq!(workspaces.iter().map(|w| w.name.as_str()).collect::<Vec<_>>(), ["demo"]);
    let written = std::fs::read_to_string(env.workspace_dir(&workspace_id).join("notes/hello.txt")).expect("file");
    assert_eq!(written, "hello from bedrock\n");

    // Stored: the reasoning with its signature, the text, both calls with their results, the answer.
    let messages = env.messages(&chat_id).await;
    let roles: Vec<Role> = messages.iter().map(|m| m.role).collect();
    assert_eq!(roles, [Role::User, Role::Assistant, Role::Tool, Role::Assistant, Role::Tool, Role::Assistant]);
    let (first_call_id, second_call_id) = match (&messages[1].parts[..], &messages[3].parts[..]) {
        (
            [Part::Reasoning { text, signature }, Part::Text { text: said }, Part::ToolCall { call_id, name, args }],
            [Part::ToolCall { call_id: second, name: second_name, args: second_args }],
        ) => {
            assert_eq!((text.as_str(), signature.as_deref()), ("The user wants a file.", Some(SCRIPTED_SIGNATURE)));
            assert_eq!(said, "Setting up a workspace.");
            assert_eq!((name.as_str(), args), ("create_workspace", &create_args));
            assert_eq!((second_name.as_str(), second_args), ("write_file", &write_args));
            (call_id.clone(), second.clone())
        }
        other => panic!("unexpected answers: {other:?}"),
    };
    let results = tool_results(&messages);
    assert_eq!(
        results.iter().map(|r| (r.0.as_str(), r.3)).collect::<Vec<_>>(),
        [(first_call_id.as_str(), false), (second_call_id.as_str(), false)]
    );
    assert_eq!(messages[5].text(), "Wrote notes/hello.txt.");

    // What Bedrock received: three signed Converse requests.
    let requests = env.llm.requests();
    assert_eq!(requests.len(), 3);
    requests.iter().for_each(assert_converse_request);

    let first = &requests[0].body;
    let system = first["system"].as_array().expect("system blocks");
    assert_eq!(system.len(), 1);
    assert!(system[0]["text"].as_str().is_some_and(|s| s.contains("create_workspace")), "{system:?}");
    assert_eq!(first["messages"], json!([{"role": "user", "content": [{"text": "Write a hello file"}]}]));
    assert_eq!(first["inferenceConfig"], json!({"maxTokens": 4096}));
    let tools = first["toolConfig"]["tools"].as_array().expect("tools");
    let write_file = tools.iter().find(|t| t["toolSpec"]["name"] == "write_file").expect("write_file offered");
    assert_eq!(write_file["toolSpec"]["inputSchema"]["json"]["required"], json!(["path", "content"]));
    assert!(write_file["toolSpec"]["description"].as_str().is_some_and(|d| !d.is_empty()));

    // The second request replays the first answer (signed reasoning included) and its result.
    let second = requests[1].messages();
    assert_eq!(second.len(), 3);
    assert_eq!(
        second[1],
        json!({"role": "assistant", "content": [
            {"reasoningContent": {"reasoningText": {"text": "The user wants a file.", "signature": SCRIPTED_SIGNATURE}}},
            {"text": "Setting up a workspace."},
            {"toolUse": {"toolUseId": first_call_id, "name": "create_workspace", "input": create_args}},
        ]})
    );
    let result = &second[2]["content"][0]["toolResult"];
    assert_eq!(second[2]["role"], "user");
    assert_eq!((&result["toolUseId"], &result["status"]), (&json!(first_call_id), &json!("success")));
    assert!(result["content"][0]["text"].as_str().is_some_and(|t| t.contains("demo")), "{result}");

    let third = requests[2].messages();
    assert_eq!(third.len(), 5);
    assert_eq!(
        third[3],
        json!({"role": "assistant", "content": [
            {"toolUse": {"toolUseId": second_call_id, "name": "write_file", "input": write_args}},
        ]})
    );
    let result: &Value = &third[4]["content"][0]["toolResult"];
    assert_eq!((&result["toolUseId"], &result["status"]), (&json!(second_call_id), &json!("success")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttling_with_retry_after_is_retried() {
    let env = start().await;
    env.llm.push_all([
        Reply::error(429, json!({"message": "Too many requests, please wait before trying again."}))
            .header("x-amzn-errortype", "ThrottlingException:http://internal.amazon.com/coral/com.amazon.bedrock/")
            .header("retry-after", "1"),
        Reply::text("made it"),
    ]);
    let (chat_id, events) = turn(&env, "go").await;
    let retries = retries(&events);
    assert_eq!(retries, [(1, 1000, ChatErrorKind::RateLimit)], "retry-after sets the delay");
    assert_eq!(env.messages(&chat_id).await.last().expect("last").text(), "made it");
    let requests = env.llm.requests();
    assert_eq!(requests.len(), 2);
    requests.iter().for_each(assert_converse_request);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_mid_stream_is_retried() {
    let env = start().await;
    // Bedrock's frames: `messageStart` and two text deltas, then the connection closes mid-body.
    let (_, events) = reset_mid_stream_turn(&env).await;
    let cut: String = events
        .iter()
        .take_while(|e| !matches!(e.body, EventBody::StreamReset))
        .filter_map(|e| match &e.body {
            EventBody::MessageDelta { text, .. } => Some(text.as_str()),
            _ => None,
        })
        .collect();
    assert!(cut.ends_with("this a"), "the cut answer streamed before the reset: {cut:?}");
    let requests = env.llm.requests();
    assert_eq!(requests.len(), 3);
    requests.iter().for_each(assert_converse_request);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_auth_failure_is_not_retried() {
    let env = start().await;
    env.llm.push(
        Reply::error(401, json!({"message": "The security token included in the request is invalid."})).header(
            "x-amzn-errortype",
            "UnrecognizedClientException:http://internal.amazon.com/coral/com.amazon.coral.service/",
        ),
    );
    let (chat_id, events) = turn(&env, "go").await;
    assert!(events.iter().all(|e| !matches!(e.body, EventBody::Retry { .. })));
    assert_eq!(env.llm.request_count(), 1);
    let error = env.admin.get_chat(&chat_id).await.expect("chat").chat.error.expect("error");
    assert_eq!(error.kind, ChatErrorKind::Auth);
    assert!(error.message.contains("UnrecognizedClientException"), "{}", error.message);
    assert!(!error.message.contains(SECRET), "the secret never leaks: {}", error.message);
}
