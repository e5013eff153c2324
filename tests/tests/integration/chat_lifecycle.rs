//! A chat doing real work end to end, on SQLite and on PostgreSQL; a chat that needs no
//! workspace creates none.

use agentplane_schema::api::{ChatStatus, CreateChat};
use agentplane_schema::event::{DeltaKind, EventBody, ToolPhase};
use agentplane_schema::message::{Part, Role};
use agentplane_tests::Reply;
use serde_json::json;

use crate::common::{Db, TestEnv, WAIT, assert_seqs_follow, is_status, tool_results};

pub async fn conversation_does_real_work(env: &TestEnv) {
    let (chat, mut stream) = env.idle_chat("Hi! What should I build?").await;
    env.llm.push_all([
        Reply::tool_call("list_templates", json!({"query": "shell"})),
        Reply::tool_call("create_workspace", json!({"template_id": "local"})),
        Reply::tool_call("write_file", json!({"path": "src/hello.txt", "content": "hello world\n"})),
        Reply::tool_call(
            "edit_files",
            json!({"edits": [{"path": "src/hello.txt", "old_text": "world", "new_text": "agentplane"}]}),
        ),
        Reply::tool_call("execute", json!({"command": "cat src/hello.txt"})),
        Reply::text("The file now says hello agentplane.").chunk_chars(4),
    ]);
    env.send(&chat.id, "Write a hello file, fix it, and show it").await;
    let events = stream.wait_for(is_status(ChatStatus::Idle), WAIT).await.expect("turn ends");

    // The workspace exists, is bound to the chat, and holds the edited file.
    let detail = env.admin.get_chat(&chat.id).await.expect("chat");
    let ws_id = detail.chat.workspace_id.clone().expect("workspace bound");
    assert_eq!(detail.chat.status, ChatStatus::Idle);
    let content = std::fs::read_to_string(env.workspace_dir(&ws_id).join("src/hello.txt")).expect("file");
    assert_eq!(content, "hello agentplane\n");
    assert_eq!(env.admin.list_workspaces().await.expect("workspaces").len(), 1);

    // Each tool's result is stored; execute returned the output and the exit code.
    let messages = env.messages(&chat.id).await;
    let results = tool_results(&messages);
    let names: Vec<&str> = results.iter().map(|r| r.1.as_str()).collect();
    assert_eq!(names, ["list_templates", "create_workspace", "write_file", "edit_files", "execute"]);
    assert!(results.iter().all(|r| !r.3), "no tool failed: {results:?}");
    assert!(results[0].2.contains("local"), "{}", results[0].2);
    assert!(results[3].2.contains("-hello world") && results[3].2.contains("+hello agentplane"), "{}", results[3].2);
    let exec = &results[4].2;
    assert!(exec.contains("hello agentplane") && exec.contains("exit code: 0"), "{exec}");

    // The final answer is committed.
    let last = messages.last().expect("messages");
    assert_eq!(last.role, Role::Assistant);
    assert_eq!(last.text(), "The file now says hello agentplane.");

    // The model got every tool result back, and the system prompt describes the tools.
    let requests = env.llm.requests();
    let final_request = requests.last().expect("requests");
    assert!(final_request.tool_results().iter().any(|r| r.contains("exit code: 0")));
    assert!(final_request.system_prompt().unwrap_or_default().contains("create_workspace"));

    // The watcher saw, in order: the tool calls started and finished, deltas of the answer, then
    // the committed answer, then idle.
    let kinds: Vec<String> = events
        .iter()
        .filter_map(|e| match &e.body {
            EventBody::ToolCall { phase: ToolPhase::Started, name, .. } => Some(format!("start:{name}")),
            EventBody::ToolCall { phase: ToolPhase::Finished, name, .. } => Some(format!("done:{name}")),
            _ => None,
        })
        .collect();
    assert_eq!(
        kinds,
        [
            "start:list_templates",
            "done:list_templates",
            "start:create_workspace",
            "done:create_workspace",
            "start:write_file",
            "done:write_file",
            "start:edit_files",
            "done:edit_files",
            "start:execute",
            "done:execute"
        ]
    );
    let final_message = events
        .iter()
        .position(|e| matches!(&e.body, EventBody::Message { message } if message.id == last.id))
        .expect("final message event");
    let deltas: String = events[..final_message]
        .iter()
        .filter_map(|e| match &e.body {
            EventBody::MessageDelta { kind: DeltaKind::Text, text, .. } => Some(text.as_str()),
            _ => None,
        })
        .collect();
    assert!(deltas.ends_with("The file now says hello agentplane."), "deltas: {deltas}");
    // Durable events arrive with strictly increasing seq.
    assert_seqs_follow(&events);
    // Each ephemeral event names the durable event it follows.
    let (mut last_seq, mut stamped) = (None, 0);
    for event in &events {
        match (event.seq, last_seq) {
            (Some(seq), _) => last_seq = Some(seq),
            (None, Some(_)) => {
                assert_eq!(event.follows_seq, last_seq, "{} after seq {last_seq:?}", event.body.kind());
                stamped += 1;
            }
            (None, None) => {}
        }
    }
    assert!(stamped > 0, "no ephemeral event after a durable one");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conversation_does_real_work_on_sqlite() {
    conversation_does_real_work(&TestEnv::start().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conversation_does_real_work_on_postgres() {
    conversation_does_real_work(&TestEnv::start_with(Db::Postgres, |_| {}).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_question_creates_no_workspace() {
    let env = TestEnv::start().await;
    let (chat, _stream) = env.idle_chat("Rust's ownership model means each value has one owner.").await;
    let detail = env.admin.get_chat(&chat.id).await.expect("chat");
    assert!(detail.chat.workspace_id.is_none());
    assert!(env.admin.list_workspaces().await.expect("workspaces").is_empty());
    let dirs = std::fs::read_dir(env.data_dir.path().join("workspaces")).expect("root").count();
    assert_eq!(dirs, 0, "no workspace directory was made");
    let messages = env.messages(&chat.id).await;
    assert_eq!(messages.len(), 2);
    assert_eq!(messages[1].parts, vec![Part::text("Rust's ownership model means each value has one owner.")].into());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chats_are_listed_patched_and_deleted() {
    let env = TestEnv::start().await;
    let (chat, _stream) = env.idle_chat("ok").await;
    assert_eq!(chat.title.as_deref(), Some("hello"));
    let patched = env
        .admin
        .patch_chat(&chat.id, &agentplane_schema::api::PatchChat { title: Some("Renamed".into()), archived: None })
        .await
        .expect("patch");
    assert_eq!(patched.title.as_deref(), Some("Renamed"));
    assert_eq!(env.admin.list_chats().await.expect("list").len(), 1);
    env.admin.delete_chat(&chat.id).await.expect("delete");
    assert!(env.admin.list_chats().await.expect("list").is_empty());
    let err = env.admin.get_chat(&chat.id).await.expect_err("gone");
    assert_eq!(err.status().map(|s| s.as_u16()), Some(404));
    // Creating a chat with an unknown model stores nothing.
    let err = env
        .admin
        .create_chat(&CreateChat {
            content: vec![Part::text("x")],
            model_id: Some("nope".into()),
            workspace_id: None,
            title: None,
        })
        .await
        .expect_err("unknown model");
    assert_eq!(err.status().map(|s| s.as_u16()), Some(400));
    assert!(env.admin.list_chats().await.expect("list").is_empty());
}
