//! Usage and cost: every model call's tokens are recorded with its cost from the model's prices,
//! announced as a `usage` event, and summed for a chat and its sub-agents.

use std::sync::{Arc, Mutex};

use agentplane_schema::api::{ChatStatus, ModelPrices, PatchModel, UsageTotals};
use agentplane_schema::event::EventBody;
use agentplane_tests::{EventStream, RecordedRequest, Reply, ScriptedLlm};
use serde_json::{Value, json};

use crate::common::{ADMIN_TOKEN, Db, TestEnv, WAIT};

const PRICES: ModelPrices = ModelPrices {
    input_per_mtok: Some(3.0),
    output_per_mtok: Some(15.0),
    cache_read_per_mtok: Some(0.3),
    cache_write_per_mtok: None,
};

/// (input incl. cached, output, cached) of each call the scripted model answered, by who asked.
#[derive(Default)]
struct Given {
    root: Vec<(u64, u64, u64)>,
    child: Vec<(u64, u64, u64)>,
}

fn cost(calls: &[(u64, u64, u64)]) -> f64 {
    calls
        .iter()
        .map(|&(input, output, cached)| {
            ((input - cached) as f64 * 3.0 + cached as f64 * 0.3 + output as f64 * 15.0) / 1e6
        })
        .sum()
}

fn totals(calls: &[(u64, u64, u64)]) -> (u64, u64, u64, u64) {
    calls.iter().fold((0, 0, 0, 0), |(i, o, c, n), &(input, output, cached)| (i + input, o + output, c + cached, n + 1))
}

fn tokens(u: &UsageTotals) -> (u64, u64, u64, u64) {
    (u.input_tokens, u.output_tokens, u.cache_read_tokens, u.calls)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_and_cost_of_a_chat_and_its_sub_agents_add_up_sqlite() {
    usage_and_cost_of_a_chat_and_its_sub_agents_add_up(Db::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_and_cost_of_a_chat_and_its_sub_agents_add_up_postgres() {
    usage_and_cost_of_a_chat_and_its_sub_agents_add_up(Db::Postgres).await;
}

async fn usage_and_cost_of_a_chat_and_its_sub_agents_add_up(db: Db) {
    let given = Arc::new(Mutex::new(Given::default()));
    let record = given.clone();
    let responder = move |r: &RecordedRequest| {
        let is_child = r.messages().iter().any(|m| m["role"] == "user" && m["content"] == "count to three");
        let results = r.tool_results();
        let n = results.len() as u64;
        let usage = (1_000 + 137 * n + if is_child { 11 } else { 0 }, 40 + n, 250 * n);
        let mut given = record.lock().expect("test");
        let reply = if is_child {
            given.child.push(usage);
            Reply::text("one two three")
        } else {
            given.root.push(usage);
            match results.len() {
                0 => Reply::tool_call("spawn_agent", json!({"prompt": "count to three"})),
                1 => {
                    let id = serde_json::from_str::<Value>(&results[0])
                        .ok()
                        .and_then(|v| v["agent_id"].as_str().map(str::to_string));
                    Reply::tool_call("wait_agent", json!({"agent_ids": [id], "timeout_seconds": 30}))
                }
                _ => Reply::text("the sub-agent counted"),
            }
        };
        reply.usage(usage.0, usage.1).cached_tokens(usage.2)
    };
    let env = TestEnv::start_full(ScriptedLlm::with_responder(responder), db, |_| {}).await;
    let model = env.admin.list_models().await.expect("models").remove(0);
    let patched = env
        .admin
        .patch_model(&model.id, &PatchModel { prices: Some(PRICES), ..Default::default() })
        .await
        .expect("prices");
    assert_eq!(patched.prices, PRICES);

    let chat = env.create_chat("delegate counting").await;
    let mut stream = EventStream::connect(&env.base_url(), &chat.id, ADMIN_TOKEN, Some(0)).await.expect("ws");
    let events = stream.wait_for(crate::common::is_status(ChatStatus::Idle), WAIT).await.expect("idle");
    assert_eq!(env.messages(&chat.id).await.last().expect("answer").text(), "the sub-agent counted");

    let given = std::mem::take(&mut *given.lock().expect("test"));
    assert_eq!((given.root.len(), given.child.len()), (3, 1));
    let usage = env.admin.chat_usage(&chat.id).await.expect("usage");
    assert_eq!(tokens(&usage.own), totals(&given.root));
    assert_eq!(usage.subagents.len(), 1);
    assert_eq!(usage.subagents[0].parent_id, chat.id);
    assert_eq!(tokens(&usage.subagents[0].usage), totals(&given.child));
    let all: Vec<_> = given.root.iter().chain(&given.child).copied().collect();
    assert_eq!(tokens(&usage.total), totals(&all));
    assert!((usage.own.cost_usd - cost(&given.root)).abs() < 1e-12, "{} vs {}", usage.own.cost_usd, cost(&given.root));
    assert!((usage.total.cost_usd - cost(&all)).abs() < 1e-12);

    // One `usage` event per model call of the root, matching what the model reported.
    let reported: Vec<(u64, u64, u64)> = events
        .iter()
        .filter_map(|e| match &e.body {
            EventBody::Usage { usage, .. } => Some((usage.input_tokens, usage.output_tokens, usage.cache_read_tokens)),
            _ => None,
        })
        .collect();
    assert_eq!(reported, given.root);

    // A member cannot read another user's chat usage.
    let member = env
        .admin
        .create_user(&agentplane_schema::api::CreateUser {
            name: "bob".into(),
            role: agentplane_schema::api::UserRole::Member,
        })
        .await
        .expect("member");
    let err = env.admin.with_token(member.token).chat_usage(&chat.id).await.expect_err("not theirs");
    assert_eq!(err.status(), Some(reqwest::StatusCode::NOT_FOUND));
}
