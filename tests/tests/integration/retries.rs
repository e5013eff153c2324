//! Provider failures: retried with backoff (honouring `retry-after`), each retry an event; a
//! provider that keeps failing ends the turn with a typed error and the chat stays usable.

use agentplane_schema::api::{ChatErrorKind, ChatStatus};
use agentplane_schema::event::EventBody;
use agentplane_tests::Reply;
use serde_json::json;

use crate::common::{TestEnv, WAIT, is_status, retries};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_with_retry_after_is_retried_and_completes() {
    let env = TestEnv::start().await;
    let (chat, mut stream) = env.idle_chat("ready").await;
    env.llm.push_all([Reply::rate_limited(1), Reply::text("made it")]);
    env.send(&chat.id, "go").await;
    let events = stream.wait_for(is_status(ChatStatus::Idle), WAIT).await.expect("idle");
    let retries = retries(&events);
    assert_eq!(retries, [(1, 1000, ChatErrorKind::RateLimit)], "retry-after sets the delay");
    assert_eq!(env.messages(&chat.id).await.last().expect("last").text(), "made it");
    assert_eq!(env.llm.request_count(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_that_keeps_failing_ends_in_a_typed_error_and_the_chat_recovers() {
    let env = TestEnv::start().await;
    let (chat, mut stream) = env.idle_chat("ready").await;
    let boom = || Reply::error(500, json!({"error": {"message": "upstream exploded", "type": "server_error"}}));
    env.llm.push_all([boom(), boom(), boom()]);
    env.send(&chat.id, "go").await;
    let events = stream.wait_for(is_status(ChatStatus::Error), WAIT).await.expect("error status");
    assert_eq!(events.iter().filter(|e| matches!(e.body, EventBody::Retry { .. })).count(), 2);
    let error = events
        .iter()
        .find_map(|e| match &e.body {
            EventBody::Error { error } => Some(error.clone()),
            _ => None,
        })
        .expect("error event");
    assert_eq!(error.kind, ChatErrorKind::Provider);
    assert!(error.message.contains("upstream exploded"), "{}", error.message);
    let chat_now = env.admin.get_chat(&chat.id).await.expect("chat").chat;
    assert_eq!(chat_now.status, ChatStatus::Error);
    assert_eq!(chat_now.error.expect("kept").kind, ChatErrorKind::Provider);

    env.llm.push(Reply::text("recovered"));
    env.send(&chat.id, "try again").await;
    stream.wait_for(is_status(ChatStatus::Idle), WAIT).await.expect("idle");
    assert_eq!(env.messages(&chat.id).await.last().expect("last").text(), "recovered");
    assert!(env.admin.get_chat(&chat.id).await.expect("chat").chat.error.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_auth_failure_is_not_retried() {
    let env = TestEnv::start().await;
    let (chat, mut stream) = env.idle_chat("ready").await;
    let before = env.llm.request_count();
    env.llm.push(Reply::error(401, json!({"error": {"message": "Incorrect API key provided"}})));
    env.send(&chat.id, "go").await;
    let events = stream.wait_for(is_status(ChatStatus::Error), WAIT).await.expect("error");
    assert!(events.iter().all(|e| !matches!(e.body, EventBody::Retry { .. })));
    assert_eq!(env.llm.request_count(), before + 1);
    let error = env.admin.get_chat(&chat.id).await.expect("chat").chat.error.expect("error");
    assert_eq!(error.kind, ChatErrorKind::Auth);
    assert!(!error.message.contains("sk-test-secret"), "the key never leaks: {}", error.message);
}
