//! AWS Bedrock `ConverseStream`: binary event-stream frames, laid out as Bedrock sends a Claude
//! answer (compare `tests/fixtures/providers/bedrock/`).
//!
//! `messageStart`; reasoning as `reasoningContent.text` deltas closed by a `signature` delta; the
//! text as `text` deltas (text blocks have no `contentBlockStart`); each tool call as a
//! `contentBlockStart` naming it, then its input in pieces; a `contentBlockStop` after every
//! block; then `messageStop` with the stop reason and `metadata` with the usage. Every payload
//! carries AWS's random-length `p` padding field, and keys are sorted as AWS sorts them.

use serde_json::{Value, json};

use super::super::reply::{Completion, RenderContext, pieces};
use crate::aws::event_frame;

/// The signature a scripted reasoning block ends with (base64, like Claude's).
pub(crate) const SCRIPTED_SIGNATURE: &str = "c2NyaXB0ZWQtcmVhc29uaW5nLXNpZ25hdHVyZQ==";

/// The characters AWS pads payloads with.
const PADDING: &str = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";

pub(crate) fn render_stream(completion: &Completion<'_>, _ctx: &RenderContext<'_>) -> Vec<Vec<u8>> {
    let mut frames = Frames::default();
    frames.push("messageStart", json!({"role": "assistant"}));
    let mut block = 0;
    if !completion.reasoning.is_empty() {
        for piece in pieces(completion.reasoning, completion.chunk_chars) {
            frames.delta(block, json!({"reasoningContent": {"text": piece}}));
        }
        frames.delta(block, json!({"reasoningContent": {"signature": SCRIPTED_SIGNATURE}}));
        frames.push("contentBlockStop", json!({"contentBlockIndex": block}));
        block += 1;
    }
    if !completion.text.is_empty() {
        for piece in pieces(completion.text, completion.chunk_chars) {
            frames.delta(block, json!({"text": piece}));
        }
        frames.push("contentBlockStop", json!({"contentBlockIndex": block}));
        block += 1;
    }
    for (id, name, arguments) in &completion.calls {
        frames.push(
            "contentBlockStart",
            json!({"contentBlockIndex": block, "start": {"toolUse": {"name": name, "toolUseId": id}}}),
        );
        for piece in pieces(arguments, completion.chunk_chars) {
            frames.delta(block, json!({"toolUse": {"input": piece}}));
        }
        frames.push("contentBlockStop", json!({"contentBlockIndex": block}));
        block += 1;
    }
    if completion.hang {
        return frames.out;
    }
    // Claude's answers carry the stop sequence it hit (none here) in the model's own fields.
    let additional = json!({"delta": {"stop_sequence": null}});
    frames.push(
        "messageStop",
        json!({"additionalModelResponseFields": additional, "stopReason": stop_reason(completion.finish)}),
    );
    // Bedrock's `inputTokens` leaves out what was read from or written to the cache.
    let usage = completion.usage;
    let mut wire_usage = json!({
        "inputTokens": usage.prompt_tokens.saturating_sub(usage.cached_tokens),
        "outputTokens": usage.completion_tokens,
        "serverToolUsage": {},
        "totalTokens": usage.prompt_tokens + usage.completion_tokens,
    });
    if usage.cached_tokens > 0 {
        wire_usage["cacheReadInputTokens"] = json!(usage.cached_tokens);
        wire_usage["cacheWriteInputTokens"] = json!(0);
    }
    frames.push("metadata", json!({"metrics": {"latencyMs": 42}, "usage": wire_usage}));
    frames.out
}

/// Converse's word for an OpenAI finish reason; others (already Converse words) pass through.
fn stop_reason(finish: &str) -> &str {
    match finish {
        "stop" => "end_turn",
        "tool_calls" => "tool_use",
        "length" => "max_tokens",
        "content_filter" => "content_filtered",
        other => other,
    }
}

#[derive(Default)]
struct Frames {
    out: Vec<Vec<u8>>,
}

impl Frames {
    fn push(&mut self, event_type: &str, mut payload: Value) {
        // AWS pads every payload to a random length (so sizes do not reveal the tokens); a
        // fixed cycle of lengths keeps the scripted stream reproducible.
        let len = (self.out.len() * 37 + 11) % PADDING.len() + 1;
        payload["p"] = json!(&PADDING[..len]);
        self.out.push(event_frame(event_type, &payload));
    }

    fn delta(&mut self, block: usize, delta: Value) {
        self.push("contentBlockDelta", json!({"contentBlockIndex": block, "delta": delta}));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aws::parse_frames;
    use crate::scripted_llm::Dialect;
    use crate::scripted_llm::reply::Usage;

    fn context<'a>(next_call_id: &'a (dyn Fn() -> String + Sync)) -> RenderContext<'a> {
        RenderContext {
            id: "c1",
            created: 0,
            model: "m",
            chunk_chars: 2,
            include_usage: false,
            request_bytes: 100,
            next_call_id,
            dialect: Dialect::Bedrock,
            stream_function_call_arguments: false,
        }
    }

    /// Headers and payloads without the random parts (padding, latency).
    fn comparable(bytes: &[u8]) -> Vec<(Vec<(String, String)>, Value)> {
        parse_frames(bytes)
            .into_iter()
            .map(|(headers, payload)| {
                let mut payload: Value = serde_json::from_slice(&payload).expect("JSON payload");
                let object = payload.as_object_mut().expect("object payload");
                object.remove("p");
                object.remove("metrics");
                (headers, payload)
            })
            .collect()
    }

    #[test]
    fn text_answer_is_laid_out_like_the_live_capture() {
        let path =
            format!("{}/fixtures/providers/bedrock/converse_stream_text_live.eventstream", env!("CARGO_MANIFEST_DIR"));
        let recorded = std::fs::read(&path).expect("fixture");
        let completion = Completion {
            reasoning: "",
            text: "OK.",
            calls: Vec::new(),
            usage: Usage { prompt_tokens: 12, completion_tokens: 5, cached_tokens: 0 },
            finish: "stop",
            hang: false,
            chunk_chars: 2,
        };
        let next = || "call_1".to_owned();
        let rendered: Vec<u8> = render_stream(&completion, &context(&next)).concat();
        assert_eq!(comparable(&rendered), comparable(&recorded));
    }

    #[test]
    fn reasoning_and_calls_are_blocks_in_order() {
        let completion = Completion {
            reasoning: "Hmm",
            text: "",
            calls: vec![("t1".to_owned(), "execute".to_owned(), "{\"a\":1}".to_owned())],
            usage: Usage { prompt_tokens: 30, completion_tokens: 5, cached_tokens: 20 },
            finish: "tool_calls",
            hang: false,
            chunk_chars: 4,
        };
        let next = || "unused".to_owned();
        let frames = comparable(&render_stream(&completion, &context(&next)).concat());
        let events: Vec<&str> = frames.iter().map(|(h, _)| h[0].1.as_str()).collect();
        assert_eq!(
            events,
            [
                "messageStart",
                "contentBlockDelta",
                "contentBlockDelta",
                "contentBlockStop",
                "contentBlockStart",
                "contentBlockDelta",
                "contentBlockDelta",
                "contentBlockStop",
                "messageStop",
                "metadata"
            ]
        );
        assert_eq!(
            frames[2].1,
            json!({"contentBlockIndex": 0, "delta": {"reasoningContent": {"signature": SCRIPTED_SIGNATURE}}})
        );
        assert_eq!(
            frames[4].1,
            json!({"contentBlockIndex": 1, "start": {"toolUse": {"name": "execute", "toolUseId": "t1"}}})
        );
        assert_eq!(frames[6].1, json!({"contentBlockIndex": 1, "delta": {"toolUse": {"input": ":1}"}}}));
        assert_eq!(frames[8].1["stopReason"], "tool_use");
        assert_eq!(
            frames[9].1["usage"],
            json!({"inputTokens": 10, "outputTokens": 5, "totalTokens": 35, "serverToolUsage": {},
                "cacheReadInputTokens": 20, "cacheWriteInputTokens": 0})
        );
    }
}
