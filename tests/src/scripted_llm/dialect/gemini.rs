//! Google Gemini's `streamGenerateContent?alt=sse` layout: one `GenerateContentResponse` per
//! event, `data: {…}` followed by CRLF CRLF, no end marker.
//!
//! As the Gemini API sends it (compare `tests/fixtures/providers/gemini/*.jsonl`): thought
//! summaries as `thought: true` text parts, text in pieces, function calls whole (an `args`
//! object, no id) all in one chunk with the thought signature on the first call, and a last
//! chunk with an empty text part and `finishReason`; in an answer without calls the signature
//! sits on that last empty part. `usageMetadata` with running totals is on every chunk.
//!
//! When the request asks for streamed arguments (`streamFunctionCallArguments`, a Vertex AI
//! option) the layout is Vertex's instead: each call opens with its name and `willContinue`,
//! its arguments follow as `partialArgs` addressed by JSON path (strings in pieces, each ended
//! by an empty piece), an empty `functionCall` closes it, and only the last chunk carries token
//! counts.

use serde_json::{Map, Value, json};

use super::super::reply::{Completion, RenderContext, pieces};

pub(crate) fn render_stream(completion: &Completion<'_>, ctx: &RenderContext<'_>) -> Vec<Vec<u8>> {
    let vertex = ctx.stream_function_call_arguments;
    let mut stream = Stream::new(completion, ctx);

    for piece in pieces(completion.reasoning, completion.chunk_chars) {
        stream.thoughts_sent += piece.chars().count();
        stream.push(vec![json!({"text": piece, "thought": true})], None);
    }
    for piece in pieces(completion.text, completion.chunk_chars) {
        stream.output_sent += piece.chars().count();
        stream.push(vec![json!({"text": piece})], None);
    }

    // Gemini cannot send arguments that are not a JSON object; what it does instead is end the
    // answer with MALFORMED_FUNCTION_CALL.
    let calls: Option<Vec<(&str, Map<String, Value>)>> = completion
        .calls
        .iter()
        .map(|(_, name, arguments)| match serde_json::from_str(arguments) {
            Ok(Value::Object(args)) => Some((name.as_str(), args)),
            _ => None,
        })
        .collect();
    let Some(calls) = calls else {
        return stream.end("MALFORMED_FUNCTION_CALL", completion.hang);
    };

    if vertex {
        for (n, (name, args)) in calls.iter().enumerate() {
            stream.output_sent += completion.calls[n].2.chars().count();
            if args.is_empty() {
                stream.push(vec![stream.signed(json!({"functionCall": {"name": name}}), n == 0)], None);
                continue;
            }
            stream
                .push(vec![stream.signed(json!({"functionCall": {"name": name, "willContinue": true}}), n == 0)], None);
            let mut leaves = Vec::new();
            flatten("$", &Value::Object(args.clone()), &mut leaves);
            for (path, value) in leaves {
                for partial in partial_args(&path, &value, completion.chunk_chars) {
                    stream.push(vec![json!({"functionCall": {"partialArgs": [partial], "willContinue": true}})], None);
                }
            }
            let last = n + 1 == calls.len();
            if last && !completion.hang {
                // The last call's closing part comes with the finish reason.
                return stream.finish_with(vec![json!({"functionCall": {}})], completion.finish);
            }
            stream.push(vec![json!({"functionCall": {}})], None);
        }
    } else if !calls.is_empty() {
        let parts = calls
            .iter()
            .enumerate()
            .map(|(n, (name, args))| stream.signed(json!({"functionCall": {"name": name, "args": args}}), n == 0))
            .collect();
        stream.output_sent += completion.calls.iter().map(|(_, _, a)| a.chars().count()).sum::<usize>();
        stream.push(parts, None);
    }
    stream.end(completion.finish, completion.hang)
}

/// Gemini's words for the finish reasons a script gives in OpenAI's; anything else is passed
/// through, so a script can use Gemini's own (`RECITATION`, …).
fn finish_reason(finish: &str) -> &str {
    match finish {
        "stop" | "tool_calls" => "STOP",
        "length" => "MAX_TOKENS",
        "content_filter" => "SAFETY",
        other => other,
    }
}

/// The leaves of `value` with their JSON paths (`$.a.b[0]`), in order.
fn flatten(path: &str, value: &Value, out: &mut Vec<(String, Value)>) {
    match value {
        Value::Object(map) if !map.is_empty() => {
            for (key, item) in map {
                let simple = key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') && !key.is_empty();
                let child = if simple { format!("{path}.{key}") } else { format!("{path}['{key}']") };
                flatten(&child, item, out);
            }
        }
        Value::Array(items) if !items.is_empty() => {
            for (index, item) in items.iter().enumerate() {
                flatten(&format!("{path}[{index}]"), item, out);
            }
        }
        leaf => out.push((path.to_owned(), leaf.clone())),
    }
}

/// The `partialArgs` entries for one leaf: a string in pieces (`willContinue`) ended by an empty
/// piece, any other value in one entry.
fn partial_args(path: &str, value: &Value, chunk_chars: usize) -> Vec<Value> {
    match value {
        Value::String(text) => {
            let mut out: Vec<Value> = pieces(text, chunk_chars)
                .map(|piece| json!({"jsonPath": path, "stringValue": piece, "willContinue": true}))
                .collect();
            out.push(json!({"jsonPath": path, "stringValue": ""}));
            out
        }
        Value::Number(number) => vec![json!({"jsonPath": path, "numberValue": number})],
        Value::Bool(flag) => vec![json!({"jsonPath": path, "boolValue": flag})],
        // Null, and the empty objects and arrays the path form cannot express.
        _ => vec![json!({"jsonPath": path, "nullValue": null})],
    }
}

/// The chunks of one answer, with running token counts.
struct Stream<'c, 'a> {
    completion: &'c Completion<'a>,
    ctx: &'c RenderContext<'a>,
    vertex: bool,
    /// Characters streamed so far, for the running counts.
    thoughts_sent: usize,
    output_sent: usize,
    thought_tokens: u64,
    output_tokens: u64,
    messages: Vec<Vec<u8>>,
}

impl<'c, 'a> Stream<'c, 'a> {
    fn new(completion: &'c Completion<'a>, ctx: &'c RenderContext<'a>) -> Self {
        // Thoughts are counted apart from the answer; together they make the completion tokens.
        let reasoning_chars = completion.reasoning.chars().count() as u64;
        let thought_tokens =
            if reasoning_chars == 0 { 0 } else { (reasoning_chars / 4).max(1).min(completion.usage.completion_tokens) };
        Stream {
            completion,
            ctx,
            vertex: ctx.stream_function_call_arguments,
            thoughts_sent: 0,
            output_sent: 0,
            thought_tokens,
            output_tokens: completion.usage.completion_tokens - thought_tokens,
            messages: Vec::new(),
        }
    }

    /// The thought signature goes on the first call of the answer.
    fn signed(&self, mut part: Value, first: bool) -> Value {
        if first {
            part["thoughtSignature"] = json!(self.signature());
        }
        part
    }

    /// An opaque signature, unique per answer, as Gemini's are (theirs are base64; the client
    /// must not care).
    fn signature(&self) -> String {
        let id: String = self.ctx.id.bytes().map(|b| format!("{b:02x}")).collect();
        format!("scripted-signature-{id}")
    }

    fn usage(&self, last: bool) -> Value {
        let usage = self.completion.usage;
        if self.vertex && !last {
            return json!({"trafficType": "ON_DEMAND"});
        }
        let reasoning_chars = self.completion.reasoning.chars().count().max(1);
        let output_chars = (self.completion.text.chars().count()
            + self.completion.calls.iter().map(|(_, _, a)| a.chars().count()).sum::<usize>())
        .max(1);
        let (thoughts, candidates) = if last {
            (self.thought_tokens, self.output_tokens)
        } else {
            (
                self.thought_tokens * self.thoughts_sent as u64 / reasoning_chars as u64,
                self.output_tokens * self.output_sent as u64 / output_chars as u64,
            )
        };
        let mut value = json!({
            "promptTokenCount": usage.prompt_tokens,
            "candidatesTokenCount": candidates,
            "totalTokenCount": usage.prompt_tokens + candidates + thoughts,
            "promptTokensDetails": [{"modality": "TEXT", "tokenCount": usage.prompt_tokens}],
        });
        if self.vertex {
            value["trafficType"] = json!("ON_DEMAND");
            value["candidatesTokensDetails"] = json!([{"modality": "TEXT", "tokenCount": candidates}]);
        }
        if thoughts > 0 {
            value["thoughtsTokenCount"] = json!(thoughts);
        }
        if usage.cached_tokens > 0 {
            value["cachedContentTokenCount"] = json!(usage.cached_tokens);
            value["cacheTokensDetails"] = json!([{"modality": "TEXT", "tokenCount": usage.cached_tokens}]);
        }
        value
    }

    fn push(&mut self, parts: Vec<Value>, finish: Option<&str>) {
        let last = finish.is_some();
        let content = json!({"parts": parts, "role": "model"});
        let mut candidate = if self.vertex {
            json!({"content": {"role": "model", "parts": content["parts"]}})
        } else {
            json!({"content": content})
        };
        if let Some(reason) = finish {
            candidate["finishReason"] = json!(finish_reason(reason));
        }
        if !self.vertex {
            candidate["index"] = json!(0);
        }
        let mut chunk = json!({"candidates": [candidate], "usageMetadata": self.usage(last)});
        chunk["modelVersion"] = json!(self.ctx.model);
        if self.vertex {
            chunk["createTime"] = json!("2026-01-01T00:00:00.000000Z");
        }
        chunk["responseId"] = json!(self.ctx.id);
        self.messages.push(format!("data: {chunk}\r\n\r\n").into_bytes());
    }

    /// The last chunk: an empty text part with the finish reason, carrying the signature when
    /// no call did. A hanging reply stops before it.
    fn end(mut self, finish: &str, hang: bool) -> Vec<Vec<u8>> {
        if hang {
            return self.messages;
        }
        let mut part = json!({"text": ""});
        if self.completion.calls.is_empty() {
            part["thoughtSignature"] = json!(self.signature());
        }
        self.push(vec![part], Some(finish));
        self.messages
    }

    fn finish_with(mut self, parts: Vec<Value>, finish: &str) -> Vec<Vec<u8>> {
        self.push(parts, Some(finish));
        self.messages
    }
}

#[cfg(test)]
mod tests {
    use super::super::super::reply::Usage;
    use super::super::Dialect;
    use super::*;

    fn fixture_chunks(name: &str) -> Vec<Value> {
        let path = format!("{}/fixtures/providers/gemini/{name}", env!("CARGO_MANIFEST_DIR"));
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("fixture {path}: {e}"));
        text.lines().filter(|l| !l.trim().is_empty()).map(|l| serde_json::from_str(l).expect("JSON line")).collect()
    }

    fn render(completion: &Completion<'_>, vertex: bool) -> Vec<Value> {
        let next_call_id = || "call_unused".to_owned();
        let ctx = RenderContext {
            id: "resp-1",
            created: 0,
            model: "gemini-3-pro-preview",
            chunk_chars: completion.chunk_chars,
            include_usage: false,
            stream_function_call_arguments: vertex,
            request_bytes: 100,
            next_call_id: &next_call_id,
            dialect: Dialect::Gemini,
        };
        render_stream(completion, &ctx)
            .into_iter()
            .map(|message| {
                let text = String::from_utf8(message).expect("UTF-8");
                let json =
                    text.strip_prefix("data: ").and_then(|t| t.strip_suffix("\r\n\r\n")).expect("one CRLF event");
                serde_json::from_str(json).expect("chunk JSON")
            })
            .collect()
    }

    fn completion<'a>(text: &'a str, calls: &[(&str, &str)], chunk_chars: usize) -> Completion<'a> {
        Completion {
            reasoning: "",
            text,
            calls: calls.iter().map(|(n, a)| ("id".to_owned(), (*n).to_owned(), (*a).to_owned())).collect(),
            usage: Usage { prompt_tokens: 29, completion_tokens: 15, cached_tokens: 0 },
            finish: if calls.is_empty() { "stop" } else { "tool_calls" },
            hang: false,
            chunk_chars,
        }
    }

    /// The structure of a chunk: keys and nesting, every scalar replaced by null. Thought token
    /// counts are left out (the recordings come from thinking models, the script has no
    /// thoughts).
    fn skeleton(value: &Value) -> Value {
        match value {
            Value::Object(map) => Value::Object(
                map.iter().filter(|(k, _)| *k != "thoughtsTokenCount").map(|(k, v)| (k.clone(), skeleton(v))).collect(),
            ),
            Value::Array(items) => Value::Array(items.iter().map(skeleton).collect()),
            _ => Value::Null,
        }
    }

    fn parts(chunk: &Value) -> Value {
        let mut parts = chunk.pointer("/candidates/0/content/parts").cloned().expect("parts");
        for part in parts.as_array_mut().into_iter().flatten() {
            part.as_object_mut().map(|p| p.remove("thoughtSignature"));
        }
        parts
    }

    #[test]
    fn whole_call_layout_matches_the_recording() {
        let recorded = fixture_chunks("function_call.jsonl");
        let rendered = render(&completion("", &[("weather", r#"{"location":"San Francisco"}"#)], 4), false);
        assert_eq!(
            rendered.iter().map(skeleton).collect::<Vec<_>>(),
            recorded.iter().map(skeleton).collect::<Vec<_>>()
        );
        assert_eq!(rendered.iter().map(parts).collect::<Vec<_>>(), recorded.iter().map(parts).collect::<Vec<_>>());
        assert_eq!(rendered[1].pointer("/candidates/0/finishReason"), Some(&json!("STOP")));
    }

    #[test]
    fn text_layout_matches_the_recording() {
        let recorded = fixture_chunks("text_thought_signature.jsonl");
        let text = "There are **3** \"r\"s in strawberry.\n\nst**r**awbe**rr**y";
        let rendered = render(&completion(text, &[], 15), false);
        assert_eq!(rendered.len(), 5, "four pieces and the end");
        assert_eq!(skeleton(&rendered[0]), skeleton(&recorded[0]));
        assert_eq!(parts(&rendered[0]), parts(&recorded[0]));
        assert_eq!(skeleton(&rendered[4]), skeleton(&recorded[2]), "the signature on an empty last part");
        let counts: Vec<u64> = rendered
            .iter()
            .filter_map(|c| c.pointer("/usageMetadata/candidatesTokenCount").and_then(Value::as_u64))
            .collect();
        assert!(counts.windows(2).all(|w| w[0] <= w[1]) && counts.last() == Some(&15), "running totals: {counts:?}");
    }

    #[test]
    fn vertex_streamed_arguments_layout_matches_the_recording() {
        let recorded = fixture_chunks("vertex_function_call_streamed_args.jsonl");
        let calls = [("getWeather", r#"{"location":"Boston"}"#), ("getWeather", r#"{"location":"San Francisco"}"#)];
        let rendered = render(&completion("", &calls, 100), true);
        assert_eq!(
            rendered.iter().map(skeleton).collect::<Vec<_>>(),
            recorded.iter().map(skeleton).collect::<Vec<_>>()
        );
        assert_eq!(rendered.iter().map(parts).collect::<Vec<_>>(), recorded.iter().map(parts).collect::<Vec<_>>());

        // Long strings come in pieces, each path ended by an empty piece; nested paths too.
        let rendered = render(&completion("", &[("edit", r#"{"edits":[{"path":"a.txt","n":2}]}"#)], 3), true);
        let partials: Vec<Value> = rendered
            .iter()
            .filter_map(|c| c.pointer("/candidates/0/content/parts/0/functionCall/partialArgs/0").cloned())
            .collect();
        assert_eq!(
            partials,
            [
                json!({"jsonPath": "$.edits[0].n", "numberValue": 2}),
                json!({"jsonPath": "$.edits[0].path", "stringValue": "a.t", "willContinue": true}),
                json!({"jsonPath": "$.edits[0].path", "stringValue": "xt", "willContinue": true}),
                json!({"jsonPath": "$.edits[0].path", "stringValue": ""}),
            ]
        );
    }

    #[test]
    fn arguments_that_are_not_an_object_end_as_a_malformed_call() {
        let rendered = render(&completion("", &[("execute", "{not json")], 4), false);
        assert_eq!(rendered.len(), 1);
        assert_eq!(rendered[0].pointer("/candidates/0/finishReason"), Some(&json!("MALFORMED_FUNCTION_CALL")));
    }
}
