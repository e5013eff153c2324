//! Forking a chat at a message: the fork has the history up to and including that message, no
//! workspace, `forked_from`; the original is untouched; both go on independently.

use agentplane_schema::api::{Chat, ChatStatus};
use agentplane_schema::message::Role;
use agentplane_tests::{EventStream, Reply};
use reqwest::{Method, StatusCode};
use serde_json::json;

use crate::common::{ADMIN_TOKEN, TestEnv, WAIT, is_status};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fork_starts_from_the_original_history_and_goes_its_own_way() {
    let env = TestEnv::start().await;
    let (chat, mut stream) = env.idle_chat("ready").await;
    env.llm.push_all([
        Reply::tool_call("create_workspace", json!({"template_id": "local"})),
        Reply::tool_call("write_file", json!({"path": "a.txt", "content": "a"})),
        Reply::text("wrote a"),
    ]);
    env.send(&chat.id, "write a").await;
    stream.wait_for(is_status(ChatStatus::Idle), WAIT).await.expect("idle");
    let original = env.messages(&chat.id).await;
    assert_eq!(original.len(), 8);

    for k in [3usize, 4] {
        // k = 4 ends on an assistant message whose tool call has no result in the fork.
        let at = &original[k - 1];
        let (status, body) = env
            .admin
            .raw(Method::POST, &format!("/api/v1/chats/{}/fork", chat.id), Some(json!({"message_id": at.id})))
            .await
            .expect("fork");
        assert_eq!(status, StatusCode::CREATED, "{body}");
        let fork: Chat = serde_json::from_value(body).expect("chat");
        assert_eq!(
            fork.forked_from.as_ref().map(|f| (f.chat_id.as_str(), f.message_id.as_str())),
            Some((chat.id.as_str(), at.id.as_str()))
        );
        assert!(fork.workspace_id.is_none());
        let history = env.messages(&fork.id).await;
        let shape = |ms: &[agentplane_schema::message::Message]| {
            ms.iter().map(|m| (m.role, m.parts.clone())).collect::<Vec<_>>()
        };
        assert_eq!(shape(&history), shape(&original[..k]), "fork at {k}");

        // The fork goes on by itself; the original does not move.
        env.llm.push(Reply::text(format!("fork {k} answers")));
        let mut fork_stream = EventStream::connect(&env.base_url(), &fork.id, ADMIN_TOKEN, None).await.expect("ws");
        env.send(&fork.id, "carry on in the fork").await;
        fork_stream.wait_for(is_status(ChatStatus::Idle), WAIT).await.expect("fork idle");
        let history = env.messages(&fork.id).await;
        assert_eq!(history.last().expect("last").text(), format!("fork {k} answers"));
        if k == 4 {
            let results = history.iter().find(|m| m.role == Role::Tool).expect("synthesised result");
            assert!(results.interrupted, "the fork's open tool call was answered as interrupted");
        }
        assert_eq!(env.messages(&chat.id).await, original, "the original is untouched");
    }

    env.llm.push(Reply::text("original goes on"));
    env.send(&chat.id, "and the original").await;
    stream.wait_for(is_status(ChatStatus::Idle), WAIT).await.expect("idle");
    assert_eq!(env.messages(&chat.id).await.last().expect("last").text(), "original goes on");

    let (status, _) = env
        .admin
        .raw(Method::POST, &format!("/api/v1/chats/{}/fork", chat.id), Some(json!({"message_id": "nope"})))
        .await
        .expect("fork");
    assert_eq!(status, StatusCode::BAD_REQUEST);
}
