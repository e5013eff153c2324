//! Anthropic Messages streams, laid out as the API sends them (compare
//! `tests/fixtures/providers/anthropic/`): `message_start` with the input usage, then each content
//! block as `content_block_start` / deltas / `content_block_stop` (a `ping` after the first
//! start), then `message_delta` with the stop reason and usage, then `message_stop`. Every SSE
//! event carries an `event:` line naming its type.
//!
//! Blocks come in the API's order: thinking (its text in `thinking_delta`s, then one
//! `signature_delta`), text, then tool calls whose `input` starts as `{}` and arrives as
//! `input_json_delta`s, the first one empty.

use serde::Serialize;
use serde_json::Value;

use super::super::reply::{Completion, RenderContext, pieces};

#[derive(Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Event<'a> {
    MessageStart { message: MessageStart<'a> },
    ContentBlockStart { index: usize, content_block: Block<'a> },
    Ping,
    ContentBlockDelta { index: usize, delta: Delta<'a> },
    ContentBlockStop { index: usize },
    MessageDelta { delta: MessageDelta<'a>, usage: DeltaUsage },
    MessageStop,
}

impl Event<'_> {
    fn name(&self) -> &'static str {
        match self {
            Event::MessageStart { .. } => "message_start",
            Event::ContentBlockStart { .. } => "content_block_start",
            Event::Ping => "ping",
            Event::ContentBlockDelta { .. } => "content_block_delta",
            Event::ContentBlockStop { .. } => "content_block_stop",
            Event::MessageDelta { .. } => "message_delta",
            Event::MessageStop => "message_stop",
        }
    }
}

#[derive(Serialize)]
struct MessageStart<'a> {
    id: &'a str,
    #[serde(rename = "type")]
    kind: &'static str,
    role: &'static str,
    model: &'a str,
    content: [(); 0],
    stop_reason: Option<&'a str>,
    stop_sequence: Option<&'a str>,
    usage: StartUsage,
}

#[derive(Serialize)]
struct StartUsage {
    input_tokens: u64,
    cache_creation_input_tokens: u64,
    cache_read_input_tokens: u64,
    output_tokens: u64,
    service_tier: &'static str,
}

#[derive(Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Block<'a> {
    Thinking { thinking: &'a str, signature: &'a str },
    Text { text: &'a str },
    ToolUse { id: &'a str, name: &'a str, input: Value },
}

#[derive(Serialize)]
#[serde(tag = "type")]
enum Delta<'a> {
    #[serde(rename = "thinking_delta")]
    Thinking { thinking: &'a str },
    #[serde(rename = "signature_delta")]
    Signature { signature: &'a str },
    #[serde(rename = "text_delta")]
    Text { text: &'a str },
    #[serde(rename = "input_json_delta")]
    InputJson { partial_json: &'a str },
}

#[derive(Serialize)]
struct MessageDelta<'a> {
    stop_reason: &'a str,
    stop_sequence: Option<&'a str>,
}

/// Newer models repeat the input side of the usage here, next to the final output count.
#[derive(Serialize)]
struct DeltaUsage {
    input_tokens: u64,
    cache_creation_input_tokens: u64,
    cache_read_input_tokens: u64,
    output_tokens: u64,
}

fn sse(event: &Event<'_>) -> Vec<u8> {
    let mut msg = format!("event: {}\ndata: ", event.name()).into_bytes();
    // Serialising plain structs of strings and integers into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut msg, event);
    msg.extend_from_slice(b"\n\n");
    msg
}

/// The stop reason for the reply's OpenAI-worded finish; other words pass through, so a script
/// can send `pause_turn` or `stop_sequence` itself.
fn stop_reason(finish: &str) -> &str {
    match finish {
        "stop" => "end_turn",
        "tool_calls" => "tool_use",
        "length" => "max_tokens",
        "content_filter" => "refusal",
        other => other,
    }
}

pub(crate) fn render_stream(completion: &Completion<'_>, ctx: &RenderContext<'_>) -> Vec<Vec<u8>> {
    let id = format!("msg_{}", ctx.id.replace('-', "_"));
    // A stand-in for the API's opaque signature, tied to the message so a test can recognise it
    // when the client sends the reasoning back.
    let signature = format!("scripted-signature-{id}");
    let usage = completion.usage;
    let cached = usage.cached_tokens.min(usage.prompt_tokens);
    let uncached = usage.prompt_tokens - cached;

    let mut out = vec![sse(&Event::MessageStart {
        message: MessageStart {
            id: &id,
            kind: "message",
            role: "assistant",
            model: ctx.model,
            content: [],
            stop_reason: None,
            stop_sequence: None,
            usage: StartUsage {
                input_tokens: uncached,
                cache_creation_input_tokens: 0,
                cache_read_input_tokens: cached,
                output_tokens: 1,
                service_tier: "standard",
            },
        },
    })];

    let mut index = 0;
    let start = |out: &mut Vec<Vec<u8>>, index: usize, content_block: Block<'_>| {
        out.push(sse(&Event::ContentBlockStart { index, content_block }));
        if index == 0 {
            out.push(sse(&Event::Ping));
        }
    };
    if !completion.reasoning.is_empty() {
        start(&mut out, index, Block::Thinking { thinking: "", signature: "" });
        for piece in pieces(completion.reasoning, completion.chunk_chars) {
            out.push(sse(&Event::ContentBlockDelta { index, delta: Delta::Thinking { thinking: piece } }));
        }
        out.push(sse(&Event::ContentBlockDelta { index, delta: Delta::Signature { signature: &signature } }));
        out.push(sse(&Event::ContentBlockStop { index }));
        index += 1;
    }
    // An answer with nothing in it still has its (empty) text block, as a refusal does.
    let nothing_else = completion.reasoning.is_empty() && completion.calls.is_empty();
    if !completion.text.is_empty() || nothing_else {
        start(&mut out, index, Block::Text { text: "" });
        for piece in pieces(completion.text, completion.chunk_chars) {
            out.push(sse(&Event::ContentBlockDelta { index, delta: Delta::Text { text: piece } }));
        }
        out.push(sse(&Event::ContentBlockStop { index }));
        index += 1;
    }
    for (call_id, name, arguments) in &completion.calls {
        let input = Value::Object(Default::default());
        start(&mut out, index, Block::ToolUse { id: call_id, name, input });
        for piece in std::iter::once("").chain(pieces(arguments, completion.chunk_chars)) {
            out.push(sse(&Event::ContentBlockDelta { index, delta: Delta::InputJson { partial_json: piece } }));
        }
        out.push(sse(&Event::ContentBlockStop { index }));
        index += 1;
    }
    if completion.hang {
        return out;
    }
    out.push(sse(&Event::MessageDelta {
        delta: MessageDelta { stop_reason: stop_reason(completion.finish), stop_sequence: None },
        usage: DeltaUsage {
            input_tokens: uncached,
            cache_creation_input_tokens: 0,
            cache_read_input_tokens: cached,
            output_tokens: usage.completion_tokens,
        },
    }));
    out.push(sse(&Event::MessageStop));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scripted_llm::Dialect;
    use crate::scripted_llm::reply::Usage;

    fn ctx(next_call_id: &(dyn Fn() -> String + Sync)) -> RenderContext<'_> {
        RenderContext {
            id: "chatcmpl-scripted-1",
            created: 0,
            model: "claude-test",
            chunk_chars: 4,
            include_usage: false,
            request_bytes: 100,
            next_call_id,
            dialect: Dialect::Anthropic,
            stream_function_call_arguments: false,
        }
    }

    /// `(event name, data)` of each rendered message; each must be one whole SSE event whose
    /// `type` matches its `event:` line.
    fn events(messages: &[Vec<u8>]) -> Vec<(String, Value)> {
        messages
            .iter()
            .map(|m| {
                let text = std::str::from_utf8(m).expect("UTF-8");
                let body = text.strip_suffix("\n\n").expect("ends the event");
                let (event, data) = body.split_once('\n').expect("two lines");
                let name = event.strip_prefix("event: ").expect("event line").to_owned();
                let data: Value = serde_json::from_str(data.strip_prefix("data: ").expect("data line")).expect("JSON");
                assert_eq!(data["type"], name.as_str());
                (name, data)
            })
            .collect()
    }

    #[test]
    fn text_then_tool_call_in_the_recorded_layout() {
        let no_ids = || -> String { unreachable!("calls are resolved") };
        let completion = Completion {
            reasoning: "",
            text: "I'll check.",
            calls: vec![("toolu_1".into(), "get_weather".into(), r#"{"location": "Paris"}"#.into())],
            usage: Usage { prompt_tokens: 377, completion_tokens: 65, cached_tokens: 300 },
            finish: "tool_calls",
            hang: false,
            chunk_chars: 8,
        };
        let events = events(&render_stream(&completion, &ctx(&no_ids)));
        let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
        // As tests/fixtures/providers/anthropic/tool_use_input_json_delta.sse, with the text and
        // the arguments cut into 8-character pieces.
        let delta = "content_block_delta";
        assert_eq!(
            names,
            [
                "message_start",
                "content_block_start",
                "ping",
                delta,
                delta,
                "content_block_stop",
                "content_block_start",
                delta,
                delta,
                delta,
                delta,
                "content_block_stop",
                "message_delta",
                "message_stop",
            ]
        );
        assert_eq!(events[0].1["message"]["usage"]["input_tokens"], 77);
        assert_eq!(events[0].1["message"]["usage"]["cache_read_input_tokens"], 300);
        assert_eq!(events[3].1["delta"], serde_json::json!({"type": "text_delta", "text": "I'll che"}));
        assert_eq!(
            events[6].1["content_block"],
            serde_json::json!({"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {}})
        );
        let args: Vec<&str> =
            events[7..11].iter().map(|(_, d)| d["delta"]["partial_json"].as_str().expect("piece")).collect();
        assert_eq!(args, ["", r#"{"locati"#, r#"on": "Pa"#, r#"ris"}"#]);
        assert!(events[7..11].iter().all(|(_, d)| d["index"] == 1));
        assert_eq!(events[12].1["delta"]["stop_reason"], "tool_use");
        assert_eq!(events[12].1["usage"]["output_tokens"], 65);
    }

    #[test]
    fn thinking_is_signed_and_a_hang_stops_before_the_stop_reason() {
        let no_ids = || -> String { unreachable!("no calls") };
        let completion = Completion {
            reasoning: "Think.",
            text: "Hi",
            calls: Vec::new(),
            usage: Usage { prompt_tokens: 10, completion_tokens: 2, cached_tokens: 0 },
            finish: "stop",
            hang: true,
            chunk_chars: 4,
        };
        let events = events(&render_stream(&completion, &ctx(&no_ids)));
        let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names[..3], ["message_start", "content_block_start", "ping"]);
        assert_eq!(
            events[1].1["content_block"],
            serde_json::json!({"type": "thinking", "thinking": "", "signature": ""})
        );
        assert_eq!(events[3].1["delta"]["thinking"], "Thin");
        assert_eq!(events[5].1["delta"]["type"], "signature_delta");
        assert_eq!(events[5].1["delta"]["signature"], "scripted-signature-msg_chatcmpl_scripted_1");
        assert_eq!(names.last(), Some(&"content_block_stop"), "nothing after the blocks: {names:?}");
    }
}
