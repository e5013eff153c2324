//! Decoder throughput of every provider dialect, in bytes of response body per second: the real
//! streaming decoders (`agentplane::providers::decode_recorded`) over whole bodies, no HTTP.
//!
//! One group per dialect, two inputs each:
//! - `recorded`: every recorded stream of that dialect in `tests/fixtures/providers/`, decoded
//!   one after the other per iteration. Raw recordings are used as they are; decoded ones (one
//!   JSON event per line) are first put back into the wire format: `data: <line>\n\n` for the
//!   SSE dialects, event-stream frames for Bedrock.
//! - `large`: about 1 MiB in the dialect's own layout, rendered by the scripted LLM: a text answer
//!   in pieces of a few characters, then a tool call whose arguments also arrive in such pieces.
//!   Before it is timed, its decoding is checked to give back exactly that text and those
//!   arguments, so the figure is that of a correct decode.
//!
//! `cargo bench -p agentplane-benches --bench provider_parsing`

use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::time::Duration;

use agentplane::providers::{WireDialect, decode_recorded};
use agentplane_actors::ports::ModelEvent;
use agentplane_tests::Reply;
use agentplane_tests::aws::jsonl_to_eventstream;
use agentplane_tests::scripted_llm::{Dialect, render_body};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use serde_json::{Value, json};

/// Size of the `large` input of each dialect, approximately.
const LARGE_BYTES: usize = 1 << 20;
/// Characters per text and argument piece of the `large` input: about a token, as providers
/// stream them.
const PIECE_CHARS: usize = 4;
/// Of the `large` input's characters, how many are text; the rest are tool-call arguments.
const TEXT_SHARE: f64 = 0.75;

const DIALECTS: [(WireDialect, Dialect, &str); 5] = [
    (WireDialect::OpenAiChat, Dialect::OpenAiChat, "openai_chat"),
    (WireDialect::OpenAiResponses, Dialect::OpenAiResponses, "openai_responses"),
    (WireDialect::Anthropic, Dialect::Anthropic, "anthropic"),
    (WireDialect::Gemini, Dialect::Gemini, "gemini"),
    (WireDialect::Bedrock, Dialect::Bedrock, "bedrock"),
];

fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/providers")
}

/// How a fixture file becomes a response body.
#[derive(Clone, Copy)]
enum Wire {
    /// Already the body's bytes.
    Raw,
    /// One JSON event per line, to be wrapped as SSE `data:` events.
    SseLines,
    /// One ConverseStream event per line, to be framed as AWS event-stream messages.
    EventStreamLines,
}

/// The fixtures of `dialect`: `(directory, file-name prefix, extension, how to wire it)`.
fn fixture_sets(dialect: WireDialect) -> &'static [(&'static str, &'static str, &'static str, Wire)] {
    match dialect {
        WireDialect::OpenAiChat => &[
            ("openai", "chat_", "sse", Wire::Raw),
            ("openai_compat", "", "sse", Wire::Raw),
            ("azure", "chat_", "jsonl", Wire::SseLines),
        ],
        WireDialect::OpenAiResponses => {
            &[("openai", "responses_", "jsonl", Wire::SseLines), ("azure", "responses_", "jsonl", Wire::SseLines)]
        }
        WireDialect::Anthropic => &[("anthropic", "", "sse", Wire::Raw), ("anthropic", "", "jsonl", Wire::SseLines)],
        WireDialect::Gemini => &[("gemini", "", "jsonl", Wire::SseLines)],
        WireDialect::Bedrock => {
            &[("bedrock", "", "eventstream", Wire::Raw), ("bedrock", "", "jsonl", Wire::EventStreamLines)]
        }
    }
}

/// The recorded bodies of `dialect`, by file name, in a stable order.
fn recorded_bodies(dialect: WireDialect) -> Vec<(String, Vec<u8>)> {
    let mut bodies = Vec::new();
    for &(dir, prefix, ext, wire) in fixture_sets(dialect) {
        let dir_path = fixtures_dir().join(dir);
        let mut names: Vec<String> = std::fs::read_dir(&dir_path)
            .unwrap_or_else(|e| panic!("{}: {e}", dir_path.display()))
            .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
            .filter(|name| name.starts_with(prefix) && name.ends_with(&format!(".{ext}")))
            .collect();
        names.sort();
        for name in names {
            let bytes = std::fs::read(dir_path.join(&name)).expect("fixture is readable");
            let body = match wire {
                Wire::Raw => bytes,
                Wire::SseLines => String::from_utf8(bytes)
                    .expect("fixture is UTF-8")
                    .lines()
                    .filter(|line| !line.trim().is_empty())
                    .map(|line| format!("data: {line}\n\n"))
                    .collect::<String>()
                    .into_bytes(),
                Wire::EventStreamLines => jsonl_to_eventstream(&String::from_utf8(bytes).expect("fixture is UTF-8")),
            };
            bodies.push((format!("{dir}/{name}"), body));
        }
    }
    assert!(!bodies.is_empty(), "no recorded fixtures for {dialect:?}");
    bodies
}

/// `chars` characters of prose with what makes JSON strings expensive: quotes, backslashes,
/// newlines and non-ASCII.
fn prose(chars: usize) -> String {
    const PARAGRAPH: &str = "The build failed because `Settings::validate` rejects an empty \"nats.url\"; \
                             set it (or AGENTPLANE__NATS__URL) and retry — the path C:\\agentplane is \
                             quoted for Windows users. Größe: 3 × 4 ≈ 12.\n\n";
    PARAGRAPH.chars().cycle().take(chars).collect()
}

/// A Rust-looking file of `chars` characters, as a model writes one through a tool.
fn code(chars: usize) -> String {
    const LINES: &str = "fn main() {\n    let name = \"agentplane\";\n    println!(\"hello, {name}\\n\");\n}\n\n\
                         #[test]\n\tfn adds() { assert_eq!(2 + 2, 4, \"math\"); }\n";
    LINES.chars().cycle().take(chars).collect()
}

/// The answer of the `large` input: its text, its one tool call's arguments, and the reply.
struct Large {
    text: String,
    arguments: Value,
    reply: Reply,
}

impl Large {
    fn new(chars: usize) -> Self {
        let text_chars = (chars as f64 * TEXT_SHARE) as usize;
        let text = prose(text_chars);
        let arguments = json!({"path": "src/main.rs", "content": code(chars - text_chars)});
        let reply = Reply::tool_call("write_file", &arguments).with_text(text.clone());
        Large { text, arguments, reply }
    }

    /// About [`LARGE_BYTES`] of body in `dialect`: per-piece overhead differs between dialects,
    /// so a small render sets how many characters it takes.
    fn sized_for(dialect: Dialect) -> (Self, Vec<u8>) {
        const PROBE_CHARS: usize = 20_000;
        let probe = render_body(dialect, &Large::new(PROBE_CHARS).reply, PIECE_CHARS).len();
        let large = Large::new(PROBE_CHARS * LARGE_BYTES / probe);
        let body = render_body(dialect, &large.reply, PIECE_CHARS);
        (large, body)
    }

    /// Panics unless `body` decodes without error to exactly this text and tool call.
    fn check(&self, dialect: WireDialect, body: &[u8]) {
        let mut text = String::new();
        let mut calls = Vec::new();
        let mut arguments = String::new();
        let mut finished = false;
        for item in decode_recorded(dialect, body) {
            match item.unwrap_or_else(|e| panic!("{dialect:?}: the large body fails to decode: {e}")) {
                ModelEvent::TextDelta(piece) => text.push_str(&piece),
                ModelEvent::ToolCallStart { name, .. } => calls.push(name),
                ModelEvent::ToolCallArgs { piece, .. } => arguments.push_str(&piece),
                ModelEvent::Finish(_) => finished = true,
                ModelEvent::ReasoningDelta { .. } | ModelEvent::Usage(_) => {}
            }
        }
        assert_eq!(text.chars().count(), self.text.chars().count(), "{dialect:?}: text length");
        assert!(text == self.text, "{dialect:?}: the decoded text differs");
        assert_eq!(calls, ["write_file"], "{dialect:?}: tool calls");
        // Gemini's streamed arguments are rebuilt from JSON paths, so compare values, not text.
        let decoded: Value = serde_json::from_str(&arguments).expect("decoded arguments are JSON");
        assert!(decoded == self.arguments, "{dialect:?}: the decoded arguments differ");
        assert!(finished, "{dialect:?}: no finish");
    }
}

fn provider_parsing(c: &mut Criterion) {
    for (wire, dialect, name) in DIALECTS {
        let recorded = recorded_bodies(wire);
        for (file, body) in &recorded {
            assert!(!decode_recorded(wire, body).is_empty(), "{file} decodes to nothing");
        }
        let recorded_bytes: usize = recorded.iter().map(|(_, body)| body.len()).sum();
        let (large, large_body) = Large::sized_for(dialect);
        large.check(wire, &large_body);

        eprintln!(
            "{name}: recorded = {} files, {recorded_bytes} bytes; large = {} bytes",
            recorded.len(),
            large_body.len()
        );

        let mut group = c.benchmark_group(name);
        group.throughput(Throughput::Bytes(recorded_bytes as u64));
        group.bench_function("recorded", |b| {
            b.iter(|| {
                for (_, body) in &recorded {
                    black_box(decode_recorded(wire, black_box(body)));
                }
            })
        });
        group.throughput(Throughput::Bytes(large_body.len() as u64));
        group.bench_function("large", |b| b.iter(|| black_box(decode_recorded(wire, black_box(&large_body)))));
        group.finish();
    }
}

criterion_group! {
    name = benches;
    // Short runs: the whole bench takes about 40 s, and decoding is steady enough for that.
    config = Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    targets = provider_parsing
}
criterion_main!(benches);
