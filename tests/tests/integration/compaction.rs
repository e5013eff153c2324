//! Context compaction: near the model's context window the conversation is summarised (a
//! model-only summary and a visible marker are stored) and the turn completes; a prompt that
//! cannot fit ends in `context_overflow`, never a loop; compaction on demand.

use agentplane_schema::api::{ChatErrorKind, ChatStatus, CreateModel};
use agentplane_schema::message::Role;
use agentplane_tests::{RecordedRequest, Reply, ScriptedLlm};
use reqwest::{Method, StatusCode};

use crate::common::{Db, TestEnv, WAIT};

fn is_summary_request(r: &RecordedRequest) -> bool {
    r.system_prompt().is_some_and(|s| s.contains("You summarise conversations"))
}

/// Answers say they used many tokens, so the second turn pushes the chat over 70 % of 1,000.
fn responder(r: &RecordedRequest) -> Reply {
    if is_summary_request(r) {
        return Reply::text("SUMMARY: the user asked q1 and q2; both answered.");
    }
    let last = r.last_user_text().unwrap_or_default();
    Reply::text(format!("answer to {last}")).usage(if last == "q2" { 700 } else { 300 }, 20)
}

async fn small_model_env() -> TestEnv {
    let env = TestEnv::start_full(ScriptedLlm::with_responder(responder), Db::Sqlite, |_| {}).await;
    let provider = env.admin.list_providers().await.expect("providers").pop().expect("provider");
    env.admin
        .create_model(&CreateModel {
            provider_id: provider.id,
            model: "tiny".into(),
            display_name: None,
            context_window: 1000,
            max_output_tokens: None,
            vision: false,
            enabled: true,
            is_default: true,
            compaction_threshold: None,
            prices: Default::default(),
            settings: serde_json::Value::Null,
        })
        .await
        .expect("small default model");
    env
}

async fn turn(env: &TestEnv, chat_id: &str, text: &str) -> agentplane_schema::api::Chat {
    env.send(chat_id, text).await;
    env.admin.wait_until_chat(chat_id, |c| c.status != ChatStatus::Running, WAIT).await.expect("turn ends")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_conversation_compacts_and_completes() {
    let env = small_model_env().await;
    let chat = env.create_chat("q1").await;
    env.admin.wait_until_chat(&chat.id, |c| c.status == ChatStatus::Idle, WAIT).await.expect("idle");
    turn(&env, &chat.id, "q2").await;
    assert!(env.llm.requests().iter().all(|r| !is_summary_request(r)), "no compaction below the threshold");

    let after = turn(&env, &chat.id, "q3").await;
    assert_eq!(after.status, ChatStatus::Idle);
    let requests = env.llm.requests();
    let summary_requests = requests.iter().filter(|r| is_summary_request(r)).count();
    assert_eq!(summary_requests, 1);
    let last = requests.last().expect("request");
    let first_user = last.messages().iter().find(|m| m["role"] == "user").expect("user")["content"].to_string();
    assert!(
        first_user.contains("SUMMARY: the user asked q1 and q2"),
        "the prompt starts from the summary: {first_user}"
    );
    assert_eq!(last.last_user_text().as_deref(), Some("q3"), "the unanswered message is kept after the summary");
    assert!(!last.messages().iter().any(|m| m["content"] == "answer to q1"), "older history is not sent");

    let messages = env.messages(&chat.id).await;
    let roles: Vec<Role> = messages.iter().map(|m| m.role).collect();
    let summary = roles.iter().position(|r| *r == Role::Summary).expect("summary stored");
    assert_eq!(roles[summary + 1], Role::Marker, "a visible marker follows the summary");
    assert!(messages[summary + 1].text().contains("Conversation summarised"));
    assert_eq!(messages[summary + 2].text(), "q3");
    assert_eq!(messages.last().expect("answer").text(), "answer to q3");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prompt_that_cannot_fit_ends_in_context_overflow_and_compaction_works_on_demand() {
    let env = small_model_env().await;
    let chat = env.create_chat("q1").await;
    env.admin.wait_until_chat(&chat.id, |c| c.status == ChatStatus::Idle, WAIT).await.expect("idle");

    let (status, body) =
        env.admin.raw(Method::POST, &format!("/api/v1/chats/{}/compact", chat.id), None).await.expect("compact");
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    env.admin.wait_until_chat(&chat.id, |c| c.status == ChatStatus::Idle, WAIT).await.expect("idle");
    let roles: Vec<Role> = env.messages(&chat.id).await.iter().map(|m| m.role).collect();
    assert_eq!(roles, [Role::User, Role::Assistant, Role::Summary, Role::Marker]);

    let before = env.llm.request_count();
    let huge = "lorem ipsum ".repeat(600);
    let ended = turn(&env, &chat.id, &huge).await;
    assert_eq!(ended.status, ChatStatus::Error);
    assert_eq!(ended.error.expect("error").kind, ChatErrorKind::ContextOverflow);
    assert!(env.llm.request_count() - before <= 3, "bounded: no loop of summaries");
    // The chat stays usable: the message that cannot fit is edited down, and the turn re-runs.
    let huge_id = env.messages(&chat.id).await.last().expect("huge").id.clone();
    let (status, body) = env
        .admin
        .raw(
            Method::PATCH,
            &format!("/api/v1/chats/{}/messages/{huge_id}", chat.id),
            Some(serde_json::json!({"content": [{"type": "text", "text": "short instead"}]})),
        )
        .await
        .expect("edit");
    assert_eq!(status, StatusCode::OK, "{body}");
    let next = env.admin.wait_until_chat(&chat.id, |c| c.status != ChatStatus::Running, WAIT).await.expect("re-run");
    assert_eq!(next.status, ChatStatus::Idle);
    assert_eq!(env.messages(&chat.id).await.last().expect("answer").text(), "answer to short instead");
}
