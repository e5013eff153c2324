//! A sub-agent's life as the agent loop drives it, in a replica in this process (SQLite in a temp
//! dir) with the scripted zero-latency LLM. The actors expose spawning and closing only to a
//! chat's own step (the `spawn_agent` / `close_agent` tools send to the actor's address, which
//! `ChatHandle` does not give out), so the model calls the tools:
//!
//! - `subagents/spawn_wait_close`: one turn of a root chat: `spawn_agent` (a child chat row, a
//!   child actor, its prompt, which it answers with one model call), `wait_agent` for its report,
//!   `close_agent`, then the root's answer. `send` → the root's `idle` on the event bus.
//! - `subagents/same_steps_without_subagent`: a turn of the same shape (three tool steps, then
//!   the answer) whose tools are cheap errors (`read_file` without a workspace). The difference
//!   between the two is what the sub-agent costs: spawn, its turn, wait, close.
//!
//! `cargo bench -p agentplane-benches --bench subagents`

use std::sync::Arc;
use std::time::{Duration, Instant};

use agentplane_actors::ChatHandle;
use agentplane_benches::inprocess::{InProcessServer, bench_with, until_idle};
use agentplane_schema::event::{EventBody, SharedEvent, SubagentPhase, SubagentStatus, ToolPhase};
use agentplane_schema::message::Part;
use agentplane_tests::{RecordedRequest, Reply, ScriptedLlm};
use criterion::{Criterion, criterion_group, criterion_main};
use serde_json::{Value, json};
use tokio::runtime::Runtime;
use tokio::sync::broadcast;

/// The root's user message of a measured turn with a sub-agent.
const SPAWN: &str = "spawn one sub-agent";
/// The root's user message of a baseline turn.
const BASELINE: &str = "three cheap tool steps";
const CHILD_PROMPT: &str = "sub-agent: answer ok";
/// Tool steps of either kind of turn before the answer.
const TOOL_STEPS: usize = 3;
/// Turns one root runs before the measurement moves to a fresh one (made outside the timing):
/// every model request carries the whole history, and a root keeps its closed children.
const TURNS_PER_ROOT: u64 = 25;

/// The model: the root spawns, waits for and closes one sub-agent; the sub-agent (and every
/// chat's first message) gets `ok`.
fn respond(r: &RecordedRequest) -> Reply {
    let messages = r.messages();
    let turn_start = messages.iter().rposition(|m| m["role"] == "user").unwrap_or(0);
    let results: Vec<&Value> = messages[turn_start..].iter().filter(|m| m["role"] == "tool").collect();
    match r.last_user_text().as_deref() {
        Some(SPAWN) => {
            let agent_id = || {
                let spawned = results.first().and_then(|m| m["content"].as_str()).unwrap_or_default();
                serde_json::from_str::<Value>(spawned).ok()?["agent_id"].as_str().map(str::to_string)
            };
            match (results.len(), agent_id()) {
                (0, _) => Reply::tool_call("spawn_agent", json!({ "prompt": CHILD_PROMPT })),
                (1, Some(id)) => Reply::tool_call("wait_agent", json!({ "agent_ids": [id] })),
                (2, Some(id)) => Reply::tool_call("close_agent", json!({ "agent_id": id })),
                // The bench checks the turn's events and says what went wrong.
                _ => Reply::text("done"),
            }
        }
        Some(BASELINE) if results.len() < TOOL_STEPS => Reply::tool_call("read_file", json!({ "path": "x" })),
        Some(BASELINE) => Reply::text("done"),
        _ => Reply::text("ok"),
    }
}

/// A root chat, its actor, and its live events (subscribed before any measured turn).
struct Root {
    handle: ChatHandle,
    user_id: String,
    live: broadcast::Receiver<Arc<SharedEvent>>,
    turns: u64,
}

async fn root(server: &InProcessServer) -> Root {
    let chat = server.idle_chat("hi").await.expect("a root chat");
    let live = server.bus().subscribe(&chat.id);
    Root { handle: server.chat(&chat.id), user_id: chat.owner_id, live, turns: 0 }
}

/// Panics unless the turn did what `message` asks for: one sub-agent spawned, finished and
/// closed, or three finished tool calls.
fn check_turn(message: &str, events: &[Arc<SharedEvent>]) {
    let finished_tools =
        events.iter().filter(|e| matches!(&e.body, EventBody::ToolCall { phase: ToolPhase::Finished, .. })).count();
    let subagent = |wanted: fn(SubagentPhase, Option<SubagentStatus>) -> bool| {
        events
            .iter()
            .filter(|e| matches!(&e.body, EventBody::Subagent { phase, status, .. } if wanted(*phase, *status)))
            .count()
    };
    let spawned = subagent(|p, _| p == SubagentPhase::Spawned);
    let reported = subagent(|_, s| s == Some(SubagentStatus::Finished));
    let closed = subagent(|_, s| s == Some(SubagentStatus::Closed));
    let expected = if message == SPAWN { (1, 1, 1) } else { (0, 0, 0) };
    assert!(
        finished_tools == TOOL_STEPS && (spawned, reported, closed) == expected,
        "turn `{message}`: {finished_tools} tool calls finished, sub-agents spawned/finished/closed \
         {spawned}/{reported}/{closed}; expected {TOOL_STEPS} and {expected:?}"
    );
}

fn turns(c: &mut Criterion, rt: &Runtime, server: &InProcessServer) {
    let mut group = c.benchmark_group("subagents");
    for (name, message) in [("spawn_wait_close", SPAWN), ("same_steps_without_subagent", BASELINE)] {
        let mut target = rt.block_on(root(server));
        group.bench_function(name, |b| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let mut measured = Duration::ZERO;
                    for _ in 0..iters {
                        if target.turns >= TURNS_PER_ROOT {
                            target = root(server).await;
                        }
                        let t0 = Instant::now();
                        let sent = target.handle.send(&target.user_id, vec![Part::text(message)], Default::default());
                        sent.await.expect("the root takes the message");
                        let events = until_idle(&mut target.live).await.expect("the root's turn ends idle");
                        measured += t0.elapsed();
                        check_turn(message, &events);
                        target.turns += 1;
                    }
                    measured
                })
            })
        });
    }
    group.finish();
}

fn subagents(c: &mut Criterion) {
    bench_with(ScriptedLlm::builder().record(false).responder(respond).start(), |rt, server| turns(c, rt, server));
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(15)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4));
    targets = subagents
}
criterion_main!(benches);
