//! Interrupting a long `execute`: the process group dies, the chat goes idle with the partial
//! work and an "interrupted" result stored, and the next message works. A watcher who joins
//! mid-answer sees the answer from its start, and the partial answer is kept on interrupt.

use std::time::Duration;

use agentplane_schema::api::ChatStatus;
use agentplane_schema::event::{DeltaKind, EventBody, ToolPhase};
use agentplane_tests::{EventStream, Reply};
use serde_json::json;

use crate::common::{ADMIN_TOKEN, TestEnv, WAIT, is_status, tool_results};

fn process_gone(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        // A zombie has exited; only its parent's reaping is pending.
        Ok(stat) => stat.rsplit(')').next().is_some_and(|rest| rest.trim_start().starts_with('Z')),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interrupting_a_long_execute_kills_its_process_group() {
    let env = TestEnv::start().await;
    let (chat, mut stream) = env.idle_chat("ready").await;
    env.llm.push_all([
        Reply::tool_call("create_workspace", json!({"template_id": "local"})),
        Reply::tool_call(
            "execute",
            json!({"command": "sleep 300 & echo $! > child.pid; echo started; wait", "timeout_seconds": 600}),
        ),
    ]);
    env.send(&chat.id, "run the long job").await;
    stream
        .wait_for(
            |e| matches!(&e.body, EventBody::ToolCall { phase: ToolPhase::Output, output: Some(o), .. } if o.contains("started")),
            WAIT,
        )
        .await
        .expect("output streams");
    let ws = env.admin.get_chat(&chat.id).await.expect("chat").chat.workspace_id.expect("workspace");
    let pid: i32 = std::fs::read_to_string(env.workspace_dir(&ws).join("child.pid"))
        .expect("pid file")
        .trim()
        .parse()
        .expect("pid");
    assert!(!process_gone(pid), "the child runs before the interrupt");
    // A watcher who joins now gets the output so far.
    let mut late = EventStream::connect(&env.base_url(), &chat.id, ADMIN_TOKEN, None).await.expect("ws");
    late.wait_for(
        |e| matches!(&e.body, EventBody::ToolCall { phase: ToolPhase::Output, output: Some(o), .. } if o.contains("started")),
        WAIT,
    )
    .await
    .expect("the output so far");

    env.admin.interrupt(&chat.id).await.expect("interrupt");
    stream.wait_for(is_status(ChatStatus::Idle), WAIT).await.expect("idle");

    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !process_gone(pid) {
        assert!(std::time::Instant::now() < deadline, "process {pid} survived the interrupt");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let messages = env.messages(&chat.id).await;
    let results = tool_results(&messages);
    let (_, name, result, is_error) = results.last().expect("a result");
    assert_eq!(name, "execute");
    assert!(*is_error && result.contains("interrupted"), "{result}");
    assert!(messages.last().expect("last").interrupted);
    assert_eq!(env.admin.get_chat(&chat.id).await.expect("chat").chat.status, ChatStatus::Idle);

    env.llm.push(Reply::text("back at it"));
    env.send(&chat.id, "continue").await;
    stream.wait_for(is_status(ChatStatus::Idle), WAIT).await.expect("idle");
    assert_eq!(env.messages(&chat.id).await.last().expect("last").text(), "back at it");
}

/// The text of the answer's deltas among `events`.
fn streamed_text(events: &[agentplane_schema::event::StreamEvent]) -> String {
    events
        .iter()
        .filter_map(|e| match &e.body {
            EventBody::MessageDelta { kind: DeltaKind::Text, text, .. } => Some(text.as_str()),
            _ => None,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watcher_who_joins_mid_answer_sees_it_from_its_start() {
    const ANSWER: &str = "one two three four";
    let env = TestEnv::start().await;
    let (chat, mut stream) = env.idle_chat("ready").await;
    env.llm.push(Reply::text(ANSWER).chunk_chars(4).then_hang());
    env.send(&chat.id, "count").await;
    let mut seen = String::new();
    stream
        .wait_for(
            |e| {
                seen.push_str(&streamed_text(std::slice::from_ref(e)));
                seen == ANSWER
            },
            WAIT,
        )
        .await
        .expect("the answer streams");

    let mut late = EventStream::connect(&env.base_url(), &chat.id, ADMIN_TOKEN, None).await.expect("ws");
    let snapshot = late.next_event(WAIT).await.expect("snapshot");
    assert!(matches!(snapshot.body, EventBody::Snapshot { .. }), "{}", snapshot.body.kind());
    let mut joined = String::new();
    late.wait_for(
        |e| {
            joined.push_str(&streamed_text(std::slice::from_ref(e)));
            joined.len() >= ANSWER.len()
        },
        WAIT,
    )
    .await
    .expect("the answer so far");
    assert_eq!(joined, ANSWER, "the late watcher got the answer from its start");

    env.admin.interrupt(&chat.id).await.expect("interrupt");
    let rest = late.wait_for(is_status(ChatStatus::Idle), WAIT).await.expect("idle");
    assert_eq!(streamed_text(&rest), "", "no piece twice");
    let kept = rest
        .iter()
        .find_map(|e| match &e.body {
            EventBody::Message { message } if message.interrupted => Some(message.text()),
            _ => None,
        })
        .expect("the partial answer is committed");
    assert_eq!(kept, ANSWER);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interrupting_while_only_a_tool_call_was_written_voids_its_pieces() {
    let env = TestEnv::start().await;
    let (chat, mut stream) = env.idle_chat("ready").await;
    // The arguments stream for over a second, so pieces would keep coming after the interrupt
    // if it did not stop the step's reading.
    let command = "echo never run; ".repeat(32);
    env.llm.push(
        Reply::tool_call("execute", json!({ "command": command }))
            .chunk_chars(4)
            .chunk_delay(Duration::from_millis(10))
            .then_hang(),
    );
    env.send(&chat.id, "run something").await;
    stream
        .wait_for(|e| matches!(&e.body, EventBody::MessageDelta { kind: DeltaKind::ToolArgs, .. }), WAIT)
        .await
        .expect("the call's arguments stream");

    env.admin.interrupt(&chat.id).await.expect("interrupt");
    let rest = stream.wait_for(is_status(ChatStatus::Idle), WAIT).await.expect("idle");
    // Nothing of the answer is kept, so the client is told to drop what it drew of it.
    let reset = rest.iter().position(|e| matches!(e.body, EventBody::StreamReset)).expect("stream_reset");
    assert!(
        !rest[reset..].iter().any(|e| matches!(e.body, EventBody::MessageDelta { .. })),
        "no piece after the reset"
    );
    assert!(!rest.iter().any(|e| matches!(e.body, EventBody::ToolCall { .. })), "the call never ran");
    let messages = env.messages(&chat.id).await;
    assert_eq!(messages.last().expect("last").text(), "run something", "no answer was stored");

    env.llm.push(Reply::text("ready again"));
    env.send(&chat.id, "hello").await;
    stream.wait_for(is_status(ChatStatus::Idle), WAIT).await.expect("idle");
    assert_eq!(env.messages(&chat.id).await.last().expect("last").text(), "ready again");
}
