//! Editing a past user message drops what came after it (soft delete), clears the queue and runs
//! the turn again from there.

use agentplane_schema::api::ChatStatus;
use agentplane_schema::event::EventBody;
use agentplane_tests::Reply;
use reqwest::{Method, StatusCode};
use serde_json::json;

use crate::common::{TestEnv, WAIT, is_status};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn editing_an_earlier_user_message_drops_the_later_ones_and_reruns() {
    let env = TestEnv::start().await;
    let (chat, mut stream) = env.idle_chat("ready").await;
    env.llm.push(Reply::text("answer one"));
    env.send(&chat.id, "question one").await;
    stream.wait_for(is_status(ChatStatus::Idle), WAIT).await.expect("idle");
    env.llm.push_all([Reply::tool_call("list_templates", json!({})), Reply::text("answer two")]);
    env.send(&chat.id, "question two").await;
    stream.wait_for(is_status(ChatStatus::Idle), WAIT).await.expect("idle");
    let before = env.messages(&chat.id).await;
    let one = before.iter().find(|m| m.text() == "question one").expect("question one").clone();

    env.llm.push(Reply::text("answer to the edit"));
    let path = format!("/api/v1/chats/{}/messages/{}", chat.id, one.id);
    let (status, body) = env
        .admin
        .raw(Method::PATCH, &path, Some(json!({"content": [{"type": "text", "text": "question one, better"}]})))
        .await
        .expect("edit");
    assert_eq!(status, StatusCode::OK, "{body}");
    let events = stream.wait_for(is_status(ChatStatus::Idle), WAIT).await.expect("idle");
    assert!(
        events
            .iter()
            .any(|e| matches!(e.body, EventBody::MessagesDropped { from_position } if from_position == one.position))
    );

    let texts: Vec<String> = env.messages(&chat.id).await.iter().map(|m| m.text()).collect();
    assert_eq!(texts, ["hello", "ready", "question one, better", "answer to the edit"]);
    let request = env.llm.requests().pop().expect("request");
    let sent: Vec<String> =
        request.messages().iter().filter_map(|m| m["content"].as_str().map(str::to_string)).collect();
    assert!(
        !sent.iter().any(|t| t.contains("question two") || t == "question one"),
        "dropped history is not sent: {sent:?}"
    );

    // Only user messages, only existing ones, and not while the agent works.
    let assistant = env.messages(&chat.id).await.pop().expect("last");
    let (status, _) = env
        .admin
        .raw(
            Method::PATCH,
            &format!("/api/v1/chats/{}/messages/{}", chat.id, assistant.id),
            Some(json!({"content": [{"type": "text", "text": "x"}]})),
        )
        .await
        .expect("edit");
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, _) = env
        .admin
        .raw(
            Method::PATCH,
            &format!("/api/v1/chats/{}/messages/nope", chat.id),
            Some(json!({"content": [{"type": "text", "text": "x"}]})),
        )
        .await
        .expect("edit");
    assert_eq!(status, StatusCode::NOT_FOUND);
    env.llm.push(Reply::text("busy").then_hang());
    env.send(&chat.id, "long one").await;
    stream.wait_for(|e| matches!(e.body, EventBody::MessageDelta { .. }), WAIT).await.expect("streams");
    let (status, _) = env
        .admin
        .raw(
            Method::PATCH,
            &path.replace(&one.id, &env.messages(&chat.id).await[2].id),
            Some(json!({"content": [{"type": "text", "text": "x"}]})),
        )
        .await
        .expect("edit");
    assert_eq!(status, StatusCode::CONFLICT);
    env.admin.interrupt(&chat.id).await.expect("interrupt");
    stream.wait_for(is_status(ChatStatus::Idle), WAIT).await.expect("idle");
}
