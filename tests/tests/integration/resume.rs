//! Reconnecting to a chat's stream with `after_seq`: the events of both connections together
//! have no gap and no duplicate.

use std::collections::BTreeSet;

use agentplane_schema::api::ChatStatus;
use agentplane_schema::event::{EventBody, ToolPhase};
use agentplane_tests::{EventStream, Reply};
use serde_json::json;

use crate::common::{ADMIN_TOKEN, TestEnv, WAIT, is_status};

fn gate(name: &str) -> serde_json::Value {
    json!({"command": format!("while [ ! -f {name} ]; do sleep 0.02; done; echo {name} passed")})
}

fn started(cmd_marker: &'static str) -> impl FnMut(&agentplane_schema::event::StreamEvent) -> bool {
    move |e| {
        matches!(&e.body, EventBody::ToolCall { phase: ToolPhase::Started, args: Some(a), .. }
            if a["command"].as_str().is_some_and(|c| c.contains(cmd_marker)))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnecting_with_after_seq_has_no_gap_and_no_duplicate() {
    let env = TestEnv::start().await;
    let (chat, mut first) = env.idle_chat("ready").await;
    let start = first.last_seq().expect("first turn's events");
    env.llm.push_all([
        Reply::tool_call("create_workspace", json!({"template_id": "local"})),
        Reply::tool_call("execute", gate("gate1")),
        Reply::tool_call("execute", gate("gate2")),
        Reply::text("both gates passed"),
    ]);
    env.send(&chat.id, "go through the gates").await;
    let mut seen: Vec<i64> =
        first.wait_for(started("gate1"), WAIT).await.expect("gate1").iter().filter_map(|e| e.seq).collect();
    // Everything the first connection saw, from the chat's first event on.
    let last_seen = first.last_seq().expect("some durable events");
    first.close().await;

    // Work happens while nobody watches.
    let ws = env.admin.get_chat(&chat.id).await.expect("chat").chat.workspace_id.expect("workspace");
    std::fs::write(env.workspace_dir(&ws).join("gate1"), "").expect("gate1");
    // Wait (over REST) until the agent has reached gate2, so the reconnect must replay.
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let at_gate2 =
            env.messages(&chat.id).await.iter().any(|m| {
                m.tool_calls().any(|(_, _, args)| args["command"].as_str().is_some_and(|c| c.contains("gate2")))
            });
        if at_gate2 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the agent never reached gate2");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }

    let mut second = EventStream::connect(&env.base_url(), &chat.id, ADMIN_TOKEN, Some(last_seen)).await.expect("ws");
    let got = second.wait_for(started("gate2"), WAIT).await.expect("gate2 (replayed)");
    assert!(got.iter().any(|e| matches!(e.body, EventBody::Snapshot { .. })), "the snapshot comes first");
    seen.extend(got.iter().filter_map(|e| e.seq));
    std::fs::write(env.workspace_dir(&ws).join("gate2"), "").expect("gate2");
    let got = second.wait_for(is_status(ChatStatus::Idle), WAIT).await.expect("idle");
    seen.extend(got.iter().filter_map(|e| e.seq));

    let unique: BTreeSet<i64> = seen.iter().copied().collect();
    assert_eq!(unique.len(), seen.len(), "no duplicates: {seen:?}");
    let max = *unique.iter().next_back().expect("events");
    assert_eq!(unique, (start + 1..=max).collect::<BTreeSet<i64>>(), "no gaps: {seen:?}");
    assert_eq!(env.messages(&chat.id).await.last().expect("last").text(), "both gates passed");
}
