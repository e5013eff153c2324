//! The database commit of one agent step, as a chat actor makes it: the assistant message with a
//! tool call, the tool-call row, the usage record and three durable events, in one transaction
//! (`DbStore::commit`, the real adapter), on SQLite (embedded default, a file) and PostgreSQL
//! (127.0.0.1:5432, a fresh database dropped afterwards).
//!
//! `cargo bench -p agentplane-benches --bench step_commit`

use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use agentplane::secrets::SecretBox;
use agentplane::store::{DbStore, NewChat};
use agentplane_actors::ports::{Batch, Op, Store, Usage};
use agentplane_schema::api::UsageTotals;
use agentplane_schema::event::{EventBody, SharedEvent, StreamEvent, ToolPhase};
use agentplane_schema::message::{Message, Part, Role};
use agentplane_tests::TestDatabase;
use criterion::{Criterion, criterion_group, criterion_main};
use serde_json::json;

struct Target {
    store: DbStore,
    chat_id: String,
    /// The last position and seq used.
    next: AtomicI64,
}

async fn target(db: &TestDatabase) -> Target {
    let conn = agentplane_schema::db::connect_and_migrate(db.url(), 4).await.expect("database");
    let store = DbStore::new(conn, SecretBox::new(&[7; 32]));
    let chat = store.create_chat(NewChat { owner_id: "bench".into(), ..Default::default() }).await.expect("chat");
    Target { store, chat_id: chat.id, next: AtomicI64::new(0) }
}

/// One step's batch: what `step.rs` commits after a model answer with one tool call.
fn step_batch(t: &Target) -> Batch {
    let n = t.next.fetch_add(3, Ordering::Relaxed);
    let message_id = agentplane_schema::new_id();
    let args = json!({"path": "src/main.rs", "content": "fn main() {\n    println!(\"hello\");\n}\n"});
    let message = Message {
        id: message_id.clone(),
        chat_id: t.chat_id.clone(),
        position: n + 1,
        role: Role::Assistant,
        parts: vec![
            Part::text("I'll write the file."),
            Part::ToolCall { call_id: format!("call_{n}"), name: "write_file".into(), args: args.clone() },
        ]
        .into(),
        interrupted: false,
        user_id: Some("bench".into()),
        model_id: Some("m".into()),
        created_at: chrono::Utc::now(),
    };
    let usage = Usage { input_tokens: 1200, output_tokens: 40, cache_read_tokens: 1000, cache_write_tokens: 0 };
    let event = |seq: i64, body: EventBody| SharedEvent::new(StreamEvent::durable(seq, t.chat_id.clone(), body));
    Batch {
        ops: vec![
            Op::InsertMessage(message.clone()),
            Op::InsertToolCall {
                id: agentplane_schema::new_id(),
                call_id: format!("call_{n}"),
                message_id: message_id.clone(),
                name: "write_file".into(),
                args: args.clone(),
                user_id: "bench".into(),
                workspace_id: Some("ws".into()),
            },
            Op::RecordUsage { message_id: message_id.clone(), model_id: "m".into(), usage, cost_usd: Some(0.0004) },
        ],
        events: vec![
            event(n + 1, EventBody::Message { message }),
            event(
                n + 2,
                EventBody::ToolCall {
                    phase: ToolPhase::Started,
                    call_id: format!("call_{n}"),
                    name: "write_file".into(),
                    args: Some(args),
                    output: None,
                    is_error: None,
                    workspace_id: Some("ws".into()),
                },
            ),
            event(
                n + 3,
                EventBody::Usage {
                    message_id,
                    model_id: "m".into(),
                    usage: UsageTotals {
                        input_tokens: 1200,
                        output_tokens: 40,
                        cache_read_tokens: 1000,
                        calls: 1,
                        ..Default::default()
                    },
                },
            ),
        ],
    }
}

fn step_commit(c: &mut Criterion) {
    let rt = agentplane_benches::bench_runtime();
    let dir = tempfile::tempdir().expect("tempdir");
    let sqlite = TestDatabase::sqlite(dir.path());
    let postgres = TestDatabase::postgres();
    let mut group = c.benchmark_group("step_commit");
    for (name, db) in [("sqlite", &sqlite), ("postgres", &postgres)] {
        let t = rt.block_on(target(db));
        group.bench_function(name, |b| {
            b.iter(|| rt.block_on(async { t.store.commit(&t.chat_id, step_batch(&t)).await.expect("commit") }))
        });
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(30)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    targets = step_commit
}
criterion_main!(benches);
