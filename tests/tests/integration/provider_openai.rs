//! The OpenAI family through the whole agent loop: OpenAI (Chat Completions and the Responses
//! API), Azure OpenAI (both APIs), OpenRouter and Vercel AI Gateway, each against the scripted
//! LLM speaking that wire format. A two-step turn creates a workspace and writes a file; the
//! request bodies the server received are checked against each provider's documented schema.
//! Retries (429 with retry-after, a reset mid-stream) and a refused key go through the same
//! clients.

use agentplane_schema::api::{ChatErrorKind, ChatStatus, ProviderType};
use agentplane_schema::event::EventBody;
use agentplane_schema::message::{Message, Part, Role};
use agentplane_tests::scripted_llm::Dialect;
use agentplane_tests::{EventStream, RecordedRequest, Reply, ScriptedLlm};
use serde_json::{Value, json};

use crate::common::{ADMIN_TOKEN, Db, ProviderSetup, TestEnv, WAIT, is_status, tool_results};

const KEY: &str = "sk-test-openai-family-0123456789";

/// One provider under test: how it is configured and what its requests must look like.
struct Flavour {
    provider_type: ProviderType,
    dialect: Dialect,
    /// From the scripted server's `http://127.0.0.1:PORT`.
    base_url: fn(&ScriptedLlm) -> String,
    settings: Value,
    model: &'static str,
}

impl Flavour {
    async fn start(&self) -> TestEnv {
        let llm = ScriptedLlm::builder().dialect(self.dialect).start();
        let provider = ProviderSetup {
            provider_type: self.provider_type,
            base_url: (self.base_url)(&llm),
            api_key: Some(KEY.into()),
            settings: self.settings.clone(),
            model: self.model.into(),
            max_output_tokens: Some(2048),
            vision: false,
        };
        TestEnv::start_with_provider(llm, provider, Db::Sqlite, |_| {}).await
    }
}

fn host(llm: &ScriptedLlm) -> String {
    format!("http://{}", llm.addr())
}

fn openai_chat() -> Flavour {
    Flavour {
        provider_type: ProviderType::Openai,
        dialect: Dialect::OpenAiChat,
        base_url: ScriptedLlm::base_url,
        settings: Value::Null,
        model: "gpt-4.1",
    }
}

fn openai_responses() -> Flavour {
    Flavour {
        provider_type: ProviderType::Openai,
        dialect: Dialect::OpenAiResponses,
        base_url: ScriptedLlm::base_url,
        settings: json!({"api": "responses"}),
        model: "gpt-5",
    }
}

fn azure_chat() -> Flavour {
    Flavour {
        provider_type: ProviderType::Azure,
        dialect: Dialect::OpenAiChat,
        base_url: host,
        settings: json!({"deployment": "agent-gpt4o"}),
        model: "gpt-4o",
    }
}

fn azure_responses() -> Flavour {
    Flavour {
        provider_type: ProviderType::Azure,
        dialect: Dialect::OpenAiResponses,
        base_url: host,
        settings: json!({"api": "responses", "deployment": "agent-gpt5"}),
        model: "gpt-5",
    }
}

// ---------------------------------------------------------------------------------------------
// A two-step turn

/// Runs the turn and checks what every flavour must get right: the stored conversation, the
/// tool's real effect, and three requests. Returns them for the flavour's own checks.
async fn two_step_turn(flavour: Flavour) -> Vec<RecordedRequest> {
    let env = flavour.start().await;
    env.llm.push_all([
        // Text, then a call whose arguments arrive in 5-character pieces.
        Reply::tool_call("create_workspace", json!({"template_id": "local", "name": "demo"}))
            .with_text("Setting up a workspace.")
            .chunk_chars(5),
        Reply::tool_call("write_file", json!({"path": "hello.txt", "content": "hello from the OpenAI family\n"})),
        Reply::text("hello.txt is written.").chunk_chars(3),
    ]);
    let chat = env.create_chat("Write hello.txt in a new workspace").await;
    let mut stream = EventStream::connect(&env.base_url(), &chat.id, ADMIN_TOKEN, Some(0)).await.expect("ws");
    stream.wait_for(is_status(ChatStatus::Idle), WAIT).await.expect("the turn ends");

    let detail = env.admin.get_chat(&chat.id).await.expect("chat");
    assert_eq!(detail.chat.status, ChatStatus::Idle, "{:?}", detail.chat.error);
    let workspace = detail.chat.workspace_id.expect("a workspace is bound");
    let written = std::fs::read_to_string(env.workspace_dir(&workspace).join("hello.txt")).expect("file");
    assert_eq!(written, "hello from the OpenAI family\n");

    let messages = env.messages(&chat.id).await;
    let roles: Vec<Role> = messages.iter().map(|m| m.role).collect();
    use Role::{Assistant, Tool, User};
    assert_eq!(roles, [User, Assistant, Tool, Assistant, Tool, Assistant]);
    assert_eq!(messages[1].text(), "Setting up a workspace.");
    let calls: Vec<(&str, &Value)> = messages.iter().flat_map(Message::tool_calls).map(|(_, n, a)| (n, a)).collect();
    assert_eq!(
        calls,
        [
            ("create_workspace", &json!({"template_id": "local", "name": "demo"})),
            ("write_file", &json!({"path": "hello.txt", "content": "hello from the OpenAI family\n"})),
        ]
    );
    let results = tool_results(&messages);
    assert!(results.iter().all(|r| !r.3), "no tool failed: {results:?}");
    let first_call = messages[1].tool_calls().next().map(|(id, _, _)| id.to_owned()).expect("call");
    assert_eq!(results[0].0, first_call, "the result answers the call");
    assert_eq!(*messages[5].parts, [Part::text("hello.txt is written.")]);

    let requests = env.llm.requests();
    assert_eq!(requests.len(), 3, "two steps and the final answer");
    for request in &requests {
        assert_eq!(request.method, "POST");
        assert!(request.is_stream());
    }
    requests
}

/// The id of the first tool call, as the model (scripted server) named it.
fn first_call_id(requests: &[RecordedRequest]) -> String {
    let body = &requests[1].body;
    let from_chat = body
        .pointer("/messages")
        .and_then(Value::as_array)
        .and_then(|messages| messages.iter().find_map(|m| m.pointer("/tool_calls/0/id").and_then(Value::as_str)));
    let from_responses = body
        .pointer("/input")
        .and_then(Value::as_array)
        .and_then(|items| items.iter().find(|i| i["type"] == "function_call").and_then(|i| i["call_id"].as_str()));
    from_chat.or(from_responses).expect("the second request repeats the call").to_owned()
}

/// Chat Completions as OpenAI documents it: the system message first, the assistant's text and
/// `tool_calls`, then a `tool` message per result.
fn check_chat_requests(requests: &[RecordedRequest], max_tokens_field: &str) {
    let call_id = first_call_id(requests);
    for request in requests {
        let body = &request.body;
        assert_eq!(body["stream_options"], json!({"include_usage": true}));
        assert_eq!(body[max_tokens_field], 2048, "{body}");
        let messages = request.messages();
        assert_eq!(messages[0]["role"], "system");
        assert!(request.system_prompt().unwrap_or_default().contains("create_workspace"));
        assert_eq!(messages[1], json!({"role": "user", "content": "Write hello.txt in a new workspace"}));
        let tools = body["tools"].as_array().expect("tools");
        let create = tools.iter().find(|t| t["function"]["name"] == "create_workspace").expect("create_workspace");
        assert_eq!(create["type"], "function");
        assert_eq!(create["function"]["parameters"]["required"], json!(["template_id"]));
    }
    let second = &requests[1];
    let messages = second.messages();
    assert_eq!(
        messages[2],
        json!({"role": "assistant", "content": "Setting up a workspace.", "tool_calls": [{
            "id": call_id, "type": "function",
            "function": {"name": "create_workspace", "arguments": "{\"name\":\"demo\",\"template_id\":\"local\"}"},
        }]})
    );
    assert_eq!(messages[3]["role"], "tool");
    assert_eq!(messages[3]["tool_call_id"], call_id.as_str());
    assert!(messages[3]["content"].as_str().is_some_and(|c| !c.is_empty()), "{}", messages[3]);
    assert_eq!(requests[2].tool_result_count(), 2);
}

/// The Responses API as OpenAI documents it: the system prompt as `instructions`, input items
/// (user message, assistant `message`, `function_call`, `function_call_output`), flat function
/// tools, nothing stored.
fn check_responses_requests(requests: &[RecordedRequest]) {
    let call_id = first_call_id(requests);
    for request in requests {
        let body = &request.body;
        assert!(body.get("messages").is_none(), "{body}");
        assert_eq!(body["store"], false);
        assert_eq!(body["max_output_tokens"], 2048);
        assert_eq!(body["include"], json!(["reasoning.encrypted_content"]), "gpt-5 reasons");
        assert!(body["instructions"].as_str().is_some_and(|s| s.contains("create_workspace")), "{body}");
        assert_eq!(
            body["input"][0],
            json!({"role": "user", "content": [{"type": "input_text", "text": "Write hello.txt in a new workspace"}]})
        );
        let tools = body["tools"].as_array().expect("tools");
        let create = tools.iter().find(|t| t["name"] == "create_workspace").expect("create_workspace");
        assert_eq!(create["type"], "function");
        assert_eq!(create["strict"], false);
        assert_eq!(create["parameters"]["required"], json!(["template_id"]));
    }
    let input = requests[1].body["input"].as_array().expect("input");
    assert_eq!(input.len(), 4, "{input:?}");
    assert_eq!(
        input[1],
        json!({"type": "message", "role": "assistant",
            "content": [{"type": "output_text", "text": "Setting up a workspace."}]})
    );
    assert_eq!(
        input[2],
        json!({"type": "function_call", "call_id": call_id, "name": "create_workspace",
            "arguments": "{\"name\":\"demo\",\"template_id\":\"local\"}"})
    );
    assert_eq!(input[3]["type"], "function_call_output");
    assert_eq!(input[3]["call_id"], call_id.as_str());
    assert!(input[3]["output"].as_str().is_some_and(|o| !o.is_empty()), "{}", input[3]);
    let last = requests[2].body["input"].as_array().expect("input");
    assert_eq!(last.iter().filter(|i| i["type"] == "function_call_output").count(), 2);
}

fn bearer(request: &RecordedRequest) {
    assert_eq!(request.header("authorization"), Some(format!("Bearer {KEY}").as_str()));
    assert_eq!(request.header("api-key"), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_chat_completions_two_step_turn() {
    let requests = two_step_turn(openai_chat()).await;
    for request in &requests {
        assert_eq!(request.path, "/v1/chat/completions");
        bearer(request);
        assert_eq!(request.model(), Some("gpt-4.1"));
    }
    check_chat_requests(&requests, "max_completion_tokens");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_responses_two_step_turn() {
    let requests = two_step_turn(openai_responses()).await;
    for request in &requests {
        assert_eq!(request.path, "/v1/responses");
        assert_eq!(request.query, None);
        bearer(request);
        assert_eq!(request.model(), Some("gpt-5"));
    }
    check_responses_requests(&requests);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn azure_chat_completions_two_step_turn() {
    let requests = two_step_turn(azure_chat()).await;
    for request in &requests {
        assert_eq!(request.path, "/openai/deployments/agent-gpt4o/chat/completions");
        assert_eq!(request.query.as_deref(), Some("api-version=2024-10-21"));
        assert_eq!(request.header("api-key"), Some(KEY));
        assert_eq!(request.header("authorization"), None);
    }
    check_chat_requests(&requests, "max_completion_tokens");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn azure_responses_two_step_turn() {
    let requests = two_step_turn(azure_responses()).await;
    for request in &requests {
        assert_eq!(request.path, "/openai/v1/responses");
        assert_eq!(request.query, None);
        assert_eq!(request.header("api-key"), Some(KEY));
        assert_eq!(request.header("authorization"), None);
        assert_eq!(request.model(), Some("agent-gpt5"), "Azure's v1 API names the deployment in the body");
    }
    check_responses_requests(&requests);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openrouter_two_step_turn() {
    let requests = two_step_turn(Flavour {
        provider_type: ProviderType::Openrouter,
        dialect: Dialect::OpenAiChat,
        base_url: ScriptedLlm::base_url,
        settings: json!({"referer": "https://agentplane.example", "title": "agentplane tests"}),
        model: "anthropic/claude-sonnet-4.5",
    })
    .await;
    for request in &requests {
        assert_eq!(request.path, "/v1/chat/completions");
        bearer(request);
        assert_eq!(request.header("http-referer"), Some("https://agentplane.example"));
        assert_eq!(request.header("x-title"), Some("agentplane tests"));
        assert_eq!(request.model(), Some("anthropic/claude-sonnet-4.5"));
    }
    check_chat_requests(&requests, "max_tokens");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vercel_two_step_turn() {
    let requests = two_step_turn(Flavour {
        provider_type: ProviderType::Vercel,
        dialect: Dialect::OpenAiChat,
        base_url: ScriptedLlm::base_url,
        settings: Value::Null,
        model: "openai/gpt-5",
    })
    .await;
    for request in &requests {
        assert_eq!(request.path, "/v1/chat/completions");
        bearer(request);
        assert_eq!(request.header("http-referer"), None);
        assert_eq!(request.model(), Some("openai/gpt-5"));
    }
    check_chat_requests(&requests, "max_tokens");
}

// ---------------------------------------------------------------------------------------------
// Failures: on the Responses API and on Azure's Chat Completions (its own key header)

async fn turn_after(env: &TestEnv, replies: Vec<Reply>, status: ChatStatus) -> (String, Vec<EventBody>) {
    env.llm.push_all(replies);
    let chat = env.create_chat("go").await;
    let mut stream = EventStream::connect(&env.base_url(), &chat.id, ADMIN_TOKEN, Some(0)).await.expect("ws");
    let events = stream.wait_for(is_status(status), WAIT).await.expect("the turn ends");
    (chat.id, events.into_iter().map(|e| e.body).collect())
}

fn retries(events: &[EventBody]) -> Vec<(u32, u64, ChatErrorKind)> {
    events
        .iter()
        .filter_map(|e| match e {
            EventBody::Retry { attempt, delay_ms, error } => Some((*attempt, *delay_ms, error.kind)),
            _ => None,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_with_retry_after_then_success() {
    for flavour in [openai_responses(), azure_chat()] {
        let env = flavour.start().await;
        let (chat_id, events) =
            turn_after(&env, vec![Reply::rate_limited(1), Reply::text("made it")], ChatStatus::Idle).await;
        assert_eq!(retries(&events), [(1, 1000, ChatErrorKind::RateLimit)], "retry-after sets the delay");
        assert_eq!(env.messages(&chat_id).await.last().expect("last").text(), "made it");
        assert_eq!(env.llm.request_count(), 2);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_mid_stream_then_success() {
    for flavour in [openai_responses(), azure_chat()] {
        let env = flavour.start().await;
        let cut = Reply::text("this answer is cut off half way").chunk_chars(3).reset_after(6);
        let (chat_id, events) = turn_after(&env, vec![cut, Reply::text("second try")], ChatStatus::Idle).await;
        let retries = retries(&events);
        assert_eq!(retries.len(), 1, "{retries:?}");
        assert_eq!(retries[0].2, ChatErrorKind::Provider);
        let messages = env.messages(&chat_id).await;
        assert_eq!(messages.len(), 2, "the cut answer is not kept: {messages:?}");
        assert_eq!(messages[1].text(), "second try");
        assert_eq!(env.llm.request_count(), 2);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unauthorized_ends_in_an_auth_error_after_one_request() {
    for flavour in [openai_responses(), azure_chat()] {
        let env = flavour.start().await;
        let refused = Reply::error(
            401,
            json!({"error": {"message": format!("Incorrect API key provided: {KEY}"), "code": "invalid_api_key"}}),
        );
        let (chat_id, events) = turn_after(&env, vec![refused], ChatStatus::Error).await;
        assert!(retries(&events).is_empty());
        assert_eq!(env.llm.request_count(), 1);
        let error = env.admin.get_chat(&chat_id).await.expect("chat").chat.error.expect("error");
        assert_eq!(error.kind, ChatErrorKind::Auth);
        assert!(!error.message.contains(KEY), "the key never leaks: {}", error.message);
    }
}
