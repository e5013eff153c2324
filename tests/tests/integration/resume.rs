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

/// What a client draws of `events` by the protocol: deltas append to the answer being drawn, a
/// `stream_reset` drops it, a committed assistant message replaces it. Returns the drawn answer
/// left over (a ghost, if not empty) and the text of each committed answer that has some.
fn draw(events: &[agentplane_schema::event::StreamEvent]) -> (String, Vec<String>) {
    use agentplane_schema::event::DeltaKind;
    use agentplane_schema::message::Role;
    let (mut drawing, mut answers) = (String::new(), Vec::new());
    for event in events {
        match &event.body {
            EventBody::MessageDelta { kind: DeltaKind::Text, text, .. } => drawing.push_str(text),
            EventBody::StreamReset => drawing.clear(),
            EventBody::Message { message } if message.role == Role::Assistant => {
                drawing.clear();
                answers.extend(Some(message.text()).filter(|t| !t.is_empty()));
            }
            _ => {}
        }
    }
    (drawing, answers)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watcher_that_falls_behind_is_caught_up_from_the_database() {
    // A buffer of 2 live events: a long answer streamed in one-character pieces overruns it, and
    // so do the three durable events a tool call's commit publishes at once.
    let env = TestEnv::start_with(crate::common::Db::Sqlite, |s| s.server.stream_buffer = 2).await;
    let (chat, mut stream) = env.idle_chat("ready").await;
    let start = stream.last_seq().expect("first turn's events");
    let answer: String = (0..400).map(|i| char::from(b'a' + (i % 26) as u8)).collect();
    let mut seqs = Vec::new();
    let mut resets = 0;
    // Each turn is a chance to fall behind; the watcher almost always does on the first.
    for turn in 0..5 {
        env.llm.push_all([Reply::tool_call("no_such_tool", json!({})), Reply::text(answer.clone()).chunk_chars(1)]);
        env.send(&chat.id, &format!("turn {turn}")).await;
        let events = stream.wait_for(is_status(ChatStatus::Idle), WAIT).await.expect("idle");
        resets += events.iter().filter(|e| matches!(e.body, EventBody::StreamReset)).count();
        seqs.extend(events.iter().filter_map(|e| e.seq));
        let (ghost, answers) = draw(&events);
        assert_eq!(ghost, "", "nothing of the answer is left drawn after it was committed");
        assert_eq!(answers, vec![answer.clone()], "the answer arrives once, whole");
        if resets > 0 {
            break;
        }
    }
    assert!(resets > 0, "the watcher never fell behind a 2-event buffer");

    let unique: BTreeSet<i64> = seqs.iter().copied().collect();
    assert_eq!(unique.len(), seqs.len(), "no duplicates: {seqs:?}");
    let max = *unique.iter().next_back().expect("events");
    assert_eq!(unique, (start + 1..=max).collect::<BTreeSet<i64>>(), "no gaps: {seqs:?}");

    // The same session keeps working after the catch-up.
    env.llm.push(Reply::text("short"));
    env.send(&chat.id, "again").await;
    let events = stream.wait_for(is_status(ChatStatus::Idle), WAIT).await.expect("idle");
    assert_eq!(draw(&events), (String::new(), vec!["short".to_string()]));
}
