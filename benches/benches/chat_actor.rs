//! One chat actor, reached from outside actix as the API reaches it (its `ChatHandle`), in a
//! replica in this process (SQLite in a temp dir) whose model is the scripted zero-latency LLM:
//!
//! - `chat_actor/mailbox/{1,8,64}`: round trips of a message the actor answers from memory
//!   (`delete_queued` of an id that is not queued: no database, no model), from 1, 8 or 64
//!   concurrent senders. The throughput line is messages per second through the one mailbox.
//! - `chat_actor/send_turn`: `send` of a user message → the turn's `idle` status on the event
//!   bus: the commit of the message, one streamed model call over local HTTP, the commit of the
//!   answer and its events.
//!
//! `cargo bench -p agentplane-benches --bench chat_actor`

use std::sync::Arc;
use std::time::{Duration, Instant};

use agentplane_actors::ChatHandle;
use agentplane_benches::inprocess::{InProcessServer, bench_with, until_idle};
use agentplane_schema::event::{EventBody, SharedEvent};
use agentplane_schema::message::{Part, Role};
use agentplane_tests::ScriptedLlm;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use tokio::runtime::Runtime;
use tokio::sync::broadcast;

/// Concurrent senders of the mailbox rows.
const SENDERS: [u64; 3] = [1, 8, 64];
/// Turns one chat runs before the measurement moves to a fresh chat (made outside the timing):
/// every model request carries the whole history, so one chat would slow down as it grows.
const TURNS_PER_CHAT: u64 = 50;

/// `iters` round trips shared by `senders` tasks; the wall time of all of them.
async fn round_trips(handle: &ChatHandle, senders: u64, iters: u64) -> Duration {
    let started = Instant::now();
    let tasks: Vec<_> = (0..senders)
        .map(|s| {
            let count = iters / senders + u64::from(s < iters % senders);
            let handle = handle.clone();
            tokio::spawn(async move {
                for _ in 0..count {
                    let found = handle.delete_queued("not-queued").await.expect("the actor answers");
                    assert!(!found, "nothing is queued in this chat");
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("a sender task");
    }
    started.elapsed()
}

fn mailbox(c: &mut Criterion, rt: &Runtime, server: &InProcessServer) {
    let chat = rt.block_on(server.idle_chat("hi")).expect("a chat");
    let handle = server.chat(&chat.id);
    let mut group = c.benchmark_group("chat_actor/mailbox");
    group.throughput(Throughput::Elements(1));
    for senders in SENDERS {
        group.bench_with_input(BenchmarkId::from_parameter(senders), &senders, |b, &senders| {
            b.iter_custom(|iters| rt.block_on(round_trips(&handle, senders, iters)))
        });
    }
    group.finish();
}

/// An idle chat, its actor, and its live events (subscribed before any measured turn).
struct TurnTarget {
    handle: ChatHandle,
    user_id: String,
    live: broadcast::Receiver<Arc<SharedEvent>>,
    turns: u64,
}

async fn turn_target(server: &InProcessServer) -> TurnTarget {
    let chat = server.idle_chat("hi").await.expect("a chat");
    let live = server.bus().subscribe(&chat.id);
    TurnTarget { handle: server.chat(&chat.id), user_id: chat.owner_id, live, turns: 0 }
}

fn send_turn(c: &mut Criterion, rt: &Runtime, server: &InProcessServer) {
    let mut target = rt.block_on(turn_target(server));
    let mut group = c.benchmark_group("chat_actor");
    group.bench_function("send_turn", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let mut measured = Duration::ZERO;
                for _ in 0..iters {
                    if target.turns >= TURNS_PER_CHAT {
                        target = turn_target(server).await;
                    }
                    let t0 = Instant::now();
                    let sent = target.handle.send(&target.user_id, vec![Part::text("next")], Default::default());
                    // The last turn's `idle` goes out with its answer's commit, which can be before
                    // the actor has heard that its step is done: the message is then queued and
                    // delivered at once, starting the turn all the same.
                    sent.await.expect("the actor takes the message");
                    let events = until_idle(&mut target.live).await.expect("the turn ends idle");
                    measured += t0.elapsed();
                    let answered = events
                        .iter()
                        .any(|e| matches!(&e.body, EventBody::Message { message } if message.role == Role::Assistant));
                    assert!(answered, "the turn stored the model's answer");
                    target.turns += 1;
                }
                measured
            })
        })
    });
    group.finish();
}

fn chat_actor(c: &mut Criterion) {
    bench_with(ScriptedLlm::builder().record(false).start(), |rt, server| {
        mailbox(c, rt, server);
        send_turn(c, rt, server);
    });
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    targets = chat_actor
}
criterion_main!(benches);
