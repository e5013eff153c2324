//! One event to every WebSocket session watching a chat: N = 1, 10 and 100 clients
//! (tokio-tungstenite, the harness's `EventStream`) hold `GET /api/v1/chats/{id}/stream` open on
//! a replica in this process (actix-web and actix-ws, real TCP on 127.0.0.1). The bench
//! publishes a `message_delta` on the replica's event bus, as a chat actor does while a model
//! streams, and times until the last of the N clients has read and decoded it: each session's
//! broadcast receive, JSON encoding, WebSocket framing, the socket, the client's decoding.
//! The throughput line is deliveries (events × watchers) per second.
//!
//! `cargo bench -p agentplane-benches --bench fanout`

use std::time::{Duration, Instant};

use agentplane_benches::ADMIN_TOKEN;
use agentplane_benches::inprocess::{InProcessServer, bench_with};
use agentplane_schema::event::{DeltaKind, EventBody, SharedEvent, StreamEvent};
use agentplane_tests::{EventStream, ScriptedLlm};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use tokio::runtime::Runtime;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

const WATCHERS: [u64; 3] = [1, 10, 100];
/// How long one event may take to reach every watcher before the bench fails.
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(30);
/// A watcher between measurements waits this long for the next event.
const IDLE_READ: Duration = Duration::from_secs(3600);

/// N open streams of one chat; each reports every delta it reads (its number, when it arrived).
struct Watchers {
    chat_id: String,
    /// The chat's last durable `seq`: the deltas follow it, as a chat actor stamps them.
    last_seq: i64,
    arrivals: mpsc::UnboundedReceiver<(Option<u64>, Instant)>,
    readers: Vec<JoinHandle<()>>,
}

impl Drop for Watchers {
    fn drop(&mut self) {
        // Dropping a reader's stream closes its socket.
        for reader in &self.readers {
            reader.abort();
        }
    }
}

async fn watchers(server: &InProcessServer, n: u64) -> Watchers {
    let chat = server.idle_chat("hi").await.expect("a chat");
    let (tx, arrivals) = mpsc::unbounded_channel();
    let mut readers = Vec::new();
    let mut last_seq = 0;
    for _ in 0..n {
        let mut stream = EventStream::connect(&server.base_url(), &chat.id, ADMIN_TOKEN, None).await.expect("a stream");
        // The session subscribes to live events before it sends the snapshot: once the snapshot
        // is here, nothing published later can be missed.
        let first = stream.next_event(DELIVERY_TIMEOUT).await.expect("the snapshot");
        let EventBody::Snapshot { last_seq: snapshot_seq, .. } = first.body else {
            panic!("a stream starts with its snapshot");
        };
        last_seq = snapshot_seq;
        let tx = tx.clone();
        readers.push(tokio::spawn(async move {
            while let Ok(event) = stream.next_event(IDLE_READ).await {
                if let EventBody::MessageDelta { text, .. } = event.body {
                    let arrived = Instant::now();
                    if tx.send((text.parse().ok(), arrived)).is_err() {
                        return;
                    }
                }
            }
        }));
    }
    Watchers { chat_id: chat.id, last_seq, arrivals, readers }
}

/// Publishes `iters` numbered deltas one after the other; the sum of the times from each publish
/// to its arrival at the last watcher.
async fn deliver(server: &InProcessServer, w: &mut Watchers, n: u64, next: &mut u64, iters: u64) -> Duration {
    let bus = server.bus();
    let mut measured = Duration::ZERO;
    for _ in 0..iters {
        *next += 1;
        // Stamped before the chat's last durable event, a delta would be held back for the
        // durable events the watcher has not seen yet (`LiveOrder`), and never delivered.
        let event = StreamEvent::ephemeral(
            w.last_seq,
            w.chat_id.clone(),
            EventBody::MessageDelta { kind: DeltaKind::Text, text: next.to_string(), call_id: None, name: None },
        );
        let published = Instant::now();
        bus.publish(SharedEvent::new(event));
        let mut last = published;
        for _ in 0..n {
            let (number, arrived) = tokio::time::timeout(DELIVERY_TIMEOUT, w.arrivals.recv())
                .await
                .expect("every watcher reads the event in time")
                .expect("the watchers are running");
            assert_eq!(number, Some(*next), "a watcher read another event than the one published");
            last = last.max(arrived);
        }
        measured += last - published;
    }
    measured
}

fn fanout_group(c: &mut Criterion, rt: &Runtime, server: &InProcessServer) {
    let mut group = c.benchmark_group("fanout");
    let mut next = 0;
    for n in WATCHERS {
        let mut w = rt.block_on(watchers(server, n));
        group.throughput(Throughput::Elements(n));
        group.bench_with_input(BenchmarkId::new("watchers", n), &n, |b, &n| {
            b.iter_custom(|iters| rt.block_on(deliver(server, &mut w, n, &mut next, iters)))
        });
        // Closes this row's sockets; the next row watches a chat of its own.
        drop(w);
    }
    group.finish();
}

fn fanout(c: &mut Criterion) {
    bench_with(ScriptedLlm::builder().record(false).start(), |rt, server| fanout_group(c, rt, server));
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    targets = fanout
}
criterion_main!(benches);
