//! Bad input gets a clear 4xx (or a tool error for the model) and stores nothing half-way.

use agentplane_schema::api::{ChatStatus, CreateUser, UserRole};
use agentplane_schema::message::Part;
use agentplane_tests::{ApiClient, EventStream, Reply};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::common::{TestEnv, WAIT, is_status, tool_results};

async fn post_raw(env: &TestEnv, token: Option<&str>, path: &str, body: &str) -> (StatusCode, Value) {
    let mut req = reqwest::Client::new()
        .post(format!("{}{path}", env.base_url()))
        .header("content-type", "application/json")
        .body(body.to_string());
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let resp = req.send().await.expect("request");
    let status = resp.status();
    (status, resp.json().await.unwrap_or(Value::Null))
}

fn kind(body: &Value) -> &str {
    body["error"]["kind"].as_str().unwrap_or("<no error body>")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_clear_errors_and_store_nothing() {
    let env = TestEnv::start().await;
    let (chat, _stream) = env.idle_chat("ready").await;
    let messages_before = env.messages(&chat.id).await.len();
    let token = Some(crate::common::ADMIN_TOKEN);

    let (status, body) = post_raw(&env, token, "/api/v1/chats", "{\"content\": [{\"type\":\"text\"").await;
    assert_eq!((status, kind(&body)), (StatusCode::BAD_REQUEST, "invalid_request"), "{body}");
    assert!(body["error"]["message"].as_str().is_some_and(|m| !m.is_empty()));

    let path = format!("/api/v1/chats/{}/messages", chat.id);
    for bad in [
        "not json",
        "{\"content\": []}",
        "{\"content\": [{\"type\":\"text\",\"text\":\"  \"}]}",
        "{\"content\": [{\"type\":\"tool_result\",\"call_id\":\"x\",\"name\":\"y\",\"result\":\"z\",\"is_error\":false}]}",
        "{\"content\": [{\"type\":\"text\",\"text\":\"x\"}], \"busy_behavior\": \"sometimes\"}",
        "{\"content\": [{\"type\":\"text\",\"text\":\"x\"}], \"surprise\": 1}",
    ] {
        let (status, body) = post_raw(&env, token, &path, bad).await;
        assert_eq!((status, kind(&body)), (StatusCode::BAD_REQUEST, "invalid_request"), "{bad} → {body}");
    }

    let (status, body) = env.admin.raw(Method::GET, "/api/v1/chats/does-not-exist", None).await.expect("raw");
    assert_eq!((status, kind(&body)), (StatusCode::NOT_FOUND, "not_found"));
    let (status, body) = env.admin.anonymous().raw(Method::GET, "/api/v1/chats", None).await.expect("raw");
    assert_eq!((status, kind(&body)), (StatusCode::UNAUTHORIZED, "unauthorized"));
    let (status, _) = env.admin.with_token("ap_wrong").raw(Method::GET, "/api/v1/chats", None).await.expect("raw");
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, body) = env.admin.raw(Method::GET, "/api/v1/nothing-here", None).await.expect("raw");
    assert_eq!((status, kind(&body)), (StatusCode::NOT_FOUND, "not_found"));

    assert_eq!(env.admin.list_chats().await.expect("chats").len(), 1, "no chat was created half-way");
    assert_eq!(env.messages(&chat.id).await.len(), messages_before, "no message was stored");
    assert_eq!(env.llm.request_count(), 1, "no model call was made");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_never_sees_another_users_chat() {
    let env = TestEnv::start().await;
    let (chat, _stream) = env.idle_chat("ready").await;
    let issued =
        env.admin.create_user(&CreateUser { name: "mallory".into(), role: UserRole::Member }).await.expect("user");
    let member: ApiClient = env.admin.with_token(issued.token.clone());

    assert!(member.list_chats().await.expect("list").is_empty());
    for (method, path, body) in [
        (Method::GET, format!("/api/v1/chats/{}", chat.id), None),
        (Method::GET, format!("/api/v1/chats/{}/messages", chat.id), None),
        (
            Method::POST,
            format!("/api/v1/chats/{}/messages", chat.id),
            Some(json!({"content": [{"type": "text", "text": "hi"}]})),
        ),
        (Method::POST, format!("/api/v1/chats/{}/interrupt", chat.id), None),
        (Method::PATCH, format!("/api/v1/chats/{}", chat.id), Some(json!({"title": "mine now"}))),
        (Method::DELETE, format!("/api/v1/chats/{}", chat.id), None),
    ] {
        let (status, body) = member.raw(method.clone(), &path, body).await.expect("raw");
        assert_eq!((status, kind(&body)), (StatusCode::NOT_FOUND, "not_found"), "{method} {path}");
    }
    assert!(EventStream::connect(&env.base_url(), &chat.id, &issued.token, None).await.is_err());
    let (status, body) = member
        .raw(
            Method::POST,
            "/api/v1/providers",
            Some(json!({"type": "openai_compatible", "name": "x", "base_url": "http://x"})),
        )
        .await
        .expect("raw");
    assert_eq!((status, kind(&body)), (StatusCode::FORBIDDEN, "forbidden"));
    // The chat is untouched.
    let detail = env.admin.get_chat(&chat.id).await.expect("chat");
    assert_eq!(detail.chat.title.as_deref(), Some("hello"));
    assert_eq!(env.messages(&chat.id).await.len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_tools_cannot_escape_the_workspace() {
    let env = TestEnv::start().await;
    let (chat, mut stream) = env.idle_chat("ready").await;
    let outside = tempfile::tempdir().expect("outside dir");
    let outside_path = outside.path().display().to_string();
    env.llm.push_all([
        Reply::tool_call("create_workspace", json!({"template_id": "local"})),
        Reply::tool_call("write_file", json!({"path": "../escape.txt", "content": "x"})),
        Reply::tool_call("read_file", json!({"path": "/etc/passwd"})),
        Reply::tool_call("execute", json!({"command": format!("ln -s {outside_path} out")})),
        Reply::tool_call("write_file", json!({"path": "out/evil.txt", "content": "x"})),
        Reply::tool_call("read_file", json!({"path": "out"})),
        Reply::tool_call("write_file", json!({"path": format!("{outside_path}/abs.txt"), "content": "x"})),
        Reply::text("could not escape"),
    ]);
    env.send(&chat.id, "try to escape").await;
    stream.wait_for(is_status(ChatStatus::Idle), WAIT).await.expect("idle");
    let results = tool_results(&env.messages(&chat.id).await);
    let by_name: Vec<(&str, bool)> = results.iter().map(|r| (r.1.as_str(), r.3)).collect();
    assert_eq!(
        by_name,
        [
            ("create_workspace", false),
            ("write_file", true),
            ("read_file", true),
            ("execute", false),
            ("write_file", true),
            ("read_file", true),
            ("write_file", true),
        ],
        "{results:#?}"
    );
    for r in results.iter().filter(|r| r.3) {
        assert!(
            r.2.to_lowercase().contains("escape") || r.2.to_lowercase().contains("outside"),
            "clear message: {}",
            r.2
        );
    }
    assert!(!env.data_dir.path().join("workspaces/escape.txt").exists());
    assert_eq!(std::fs::read_dir(outside.path()).expect("outside").count(), 0, "nothing written outside");
    assert_eq!(env.messages(&chat.id).await.last().expect("last").parts, vec![Part::text("could not escape")].into());
}
