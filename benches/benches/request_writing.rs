//! Writing a step's request body, by dialect and history length: what every model call costs the
//! orchestrator before the first byte is sent, and whether it grows with the conversation.
//!
//! A coding conversation of `N` history messages (turns of a user message, an assistant message
//! calling `write_file` with about 1 KiB of content, a tool result of about 2 KiB of output with
//! quotes and line breaks, and a short answer) is written the way the loop asks for it: each
//! iteration writes the request of the first `N - 1` messages, then that of all `N`, with the
//! conversation's memo and the client's kept fragments, as consecutive steps would (the second
//! request resends the first's history plus one message). The figure is per iteration: two
//! requests, the written bytes counted as throughput.
//!
//! `cargo bench -p agentplane-benches --bench request_writing`

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use agentplane::providers::{Providers, WireDialect};
use agentplane_actors::ports::{ModelRequest, ModelTarget, PromptMemo, PromptMessage, ToolSpec};
use agentplane_schema::api::ProviderType;
use agentplane_schema::message::{Part, Role};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use serde_json::json;

const LENGTHS: [usize; 3] = [50, 200, 800];

const DIALECTS: [(WireDialect, ProviderType, &str); 5] = [
    (WireDialect::OpenAiChat, ProviderType::OpenaiCompatible, "openai_chat"),
    (WireDialect::OpenAiResponses, ProviderType::Openai, "openai_responses"),
    (WireDialect::Anthropic, ProviderType::Anthropic, "anthropic"),
    (WireDialect::Gemini, ProviderType::Gemini, "gemini"),
    (WireDialect::Bedrock, ProviderType::Bedrock, "bedrock"),
];

/// The `i`th message of the conversation.
fn message(i: usize) -> PromptMessage {
    let turn = i / 4;
    let parts = match i % 4 {
        0 => vec![Part::text(format!("Step {turn}: make the parser accept \"quoted\" names and run the tests."))],
        1 => vec![
            Part::text("I'll update the parser."),
            Part::ToolCall {
                call_id: format!("call_{turn}"),
                name: "write_file".into(),
                args: json!({"path": format!("src/parser_{turn}.rs"), "content": "fn parse(s: &str) -> Name {\n    todo!(\"quoted\")\n}\n".repeat(20)}),
            },
        ],
        2 => vec![Part::ToolResult {
            call_id: format!("call_{turn}"),
            name: "write_file".into(),
            result: "running 12 tests\ntest parser::quoted ... ok\ntest parser::\"odd\" ... FAILED\n".repeat(30),
            is_error: false,
        }],
        _ => vec![Part::text(format!("Turn {turn} done: the parser takes quoted names; one test still fails."))],
    };
    let role = match i % 4 {
        0 => Role::User,
        1 | 3 => Role::Assistant,
        _ => Role::Tool,
    };
    PromptMessage { role, parts: Arc::new(parts) }
}

fn target(provider_type: ProviderType) -> ModelTarget {
    let settings = match provider_type {
        ProviderType::Openai => json!({"api": "responses"}),
        ProviderType::Bedrock => json!({"region": "us-east-1"}),
        _ => json!({}),
    };
    ModelTarget {
        provider_type,
        base_url: "http://127.0.0.1:9/v1".into(),
        api_key: Some("sk-bench".into()),
        model: "bench-model".into(),
        max_output_tokens: Some(4096),
        settings,
    }
}

fn request_writing(c: &mut Criterion) {
    let providers = Providers::new(Duration::from_secs(5), Duration::from_secs(5)).expect("client");
    let tools: Arc<[ToolSpec]> = ["read_file", "write_file", "execute"]
        .iter()
        .map(|name| ToolSpec {
            name: (*name).into(),
            description: format!("The {name} tool."),
            parameters: json!({"type": "object", "properties": {"path": {"type": "string"}}}),
        })
        .collect();
    let history: Vec<PromptMessage> = (0..*LENGTHS.iter().max().unwrap_or(&0)).map(message).collect();
    for (dialect, provider_type, name) in DIALECTS {
        let mut group = c.benchmark_group(format!("request_writing/{name}"));
        for n in LENGTHS {
            let memo = PromptMemo::default();
            let request = |len: usize| ModelRequest {
                target: target(provider_type),
                system: "You are a coding agent.".into(),
                messages: history[..len].to_vec().into(),
                tools: tools.clone(),
                images: Default::default(),
                memo: memo.clone(),
            };
            let (shorter, full) = (request(n - 1), request(n));
            let bytes = providers.write_request(dialect, &shorter).expect("body").len()
                + providers.write_request(dialect, &full).expect("body").len();
            group.throughput(Throughput::Bytes(bytes as u64));
            group.bench_function(format!("{n}_messages"), |b| {
                b.iter(|| {
                    black_box(providers.write_request(dialect, &shorter).expect("body"));
                    black_box(providers.write_request(dialect, &full).expect("body"));
                })
            });
        }
        group.finish();
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20).measurement_time(Duration::from_secs(2)).warm_up_time(Duration::from_millis(500));
    targets = request_writing
}
criterion_main!(benches);
