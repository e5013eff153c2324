//! OpenAI's Responses API stream, as OpenAI and Azure send it: named SSE events with a
//! `sequence_number`, `response.created` and `.in_progress`, then each output item (reasoning,
//! the message, each function call) opened with `response.output_item.added`, streamed as
//! deltas, closed with the `.done` events that repeat its whole content, and last
//! `response.completed` (or `.incomplete`) with the usage.
//!
//! Reasoning items always carry `encrypted_content`, as they do when the request includes
//! `reasoning.encrypted_content` (which agentplane asks of reasoning models).

use serde_json::{Value, json};

use super::super::reply::{Completion, RenderContext, pieces};

pub(crate) fn render_stream(completion: &Completion<'_>, ctx: &RenderContext<'_>) -> Vec<Vec<u8>> {
    let mut stream = Stream { out: Vec::new(), sequence: 0 };
    let response_id = format!("resp_{}", ctx.id);
    let response = |status: &str, output: &[Value], usage: Value, incomplete: Value| {
        json!({
            "id": response_id,
            "object": "response",
            "created_at": ctx.created,
            "status": status,
            "error": null,
            "incomplete_details": incomplete,
            "model": ctx.model,
            "output": output,
            "store": false,
            "usage": usage,
        })
    };
    stream.event("response.created", json!({"response": response("in_progress", &[], Value::Null, Value::Null)}));
    stream.event("response.in_progress", json!({"response": response("in_progress", &[], Value::Null, Value::Null)}));

    let mut output: Vec<Value> = Vec::new();
    if !completion.reasoning.is_empty() {
        let item_id = format!("rs_{}_{}", ctx.id, output.len());
        let output_index = output.len();
        let at =
            |extra: Value| merge(json!({"item_id": item_id, "output_index": output_index, "summary_index": 0}), extra);
        stream.event(
            "response.output_item.added",
            json!({"output_index": output_index, "item": {"id": item_id, "type": "reasoning", "summary": []}}),
        );
        stream
            .event("response.reasoning_summary_part.added", at(json!({"part": {"type": "summary_text", "text": ""}})));
        for piece in pieces(completion.reasoning, completion.chunk_chars) {
            stream.event("response.reasoning_summary_text.delta", at(json!({"delta": piece})));
        }
        let part = json!({"type": "summary_text", "text": completion.reasoning});
        stream.event("response.reasoning_summary_text.done", at(json!({"text": completion.reasoning})));
        stream.event("response.reasoning_summary_part.done", at(json!({"part": part})));
        let item = json!({
            "id": item_id,
            "type": "reasoning",
            "summary": [part],
            "encrypted_content": format!("gAAAAB-scripted-{item_id}"),
        });
        stream.event("response.output_item.done", json!({"output_index": output_index, "item": item}));
        output.push(item);
    }

    // A reply with nothing to say still answers with an (empty) message, unless it is about to
    // hang, when the silence starts right after the preamble.
    let has_message =
        !completion.text.is_empty() || (completion.calls.is_empty() && output.is_empty() && !completion.hang);
    if has_message {
        let item_id = format!("msg_{}_{}", ctx.id, output.len());
        let output_index = output.len();
        let at =
            |extra: Value| merge(json!({"item_id": item_id, "output_index": output_index, "content_index": 0}), extra);
        let text_part = |text: &str| json!({"type": "output_text", "annotations": [], "logprobs": [], "text": text});
        let message = |status: &str, content: Value| json!({"id": item_id, "type": "message", "status": status, "content": content, "role": "assistant"});
        stream.event(
            "response.output_item.added",
            json!({"output_index": output_index, "item": message("in_progress", json!([]))}),
        );
        stream.event("response.content_part.added", at(json!({"part": text_part("")})));
        for piece in pieces(completion.text, completion.chunk_chars) {
            stream.event("response.output_text.delta", at(json!({"delta": piece, "logprobs": []})));
        }
        stream.event("response.output_text.done", at(json!({"text": completion.text, "logprobs": []})));
        stream.event("response.content_part.done", at(json!({"part": text_part(completion.text)})));
        let item = message("completed", json!([text_part(completion.text)]));
        stream.event("response.output_item.done", json!({"output_index": output_index, "item": item}));
        output.push(item);
    }

    for (call_id, name, arguments) in &completion.calls {
        let item_id = format!("fc_{}_{}", ctx.id, output.len());
        let output_index = output.len();
        let at = |extra: Value| merge(json!({"item_id": item_id, "output_index": output_index}), extra);
        let call = |status: &str, arguments: &str| {
            json!({"id": item_id, "type": "function_call", "status": status, "arguments": arguments,
                "call_id": call_id, "name": name})
        };
        // Named in full when the item opens; only the arguments stream.
        stream.event(
            "response.output_item.added",
            json!({"output_index": output_index, "item": call("in_progress", "")}),
        );
        for piece in pieces(arguments, completion.chunk_chars) {
            stream.event("response.function_call_arguments.delta", at(json!({"delta": piece})));
        }
        stream.event("response.function_call_arguments.done", at(json!({"arguments": arguments})));
        let item = call("completed", arguments);
        stream.event("response.output_item.done", json!({"output_index": output_index, "item": item}));
        output.push(item);
    }

    if completion.hang {
        return stream.out;
    }
    let usage = completion.usage;
    let usage = json!({
        "input_tokens": usage.prompt_tokens,
        "input_tokens_details": {"cached_tokens": usage.cached_tokens},
        "output_tokens": usage.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
    });
    // Chat Completions' finish reasons, in the Responses API's words.
    let incomplete_reason = match completion.finish {
        "length" => Some("max_output_tokens"),
        "content_filter" => Some("content_filter"),
        _ => None,
    };
    match incomplete_reason {
        Some(reason) => stream.event(
            "response.incomplete",
            json!({"response": response("incomplete", &output, usage, json!({"reason": reason}))}),
        ),
        None => {
            stream.event("response.completed", json!({"response": response("completed", &output, usage, Value::Null)}))
        }
    }
    stream.out
}

struct Stream {
    out: Vec<Vec<u8>>,
    sequence: u64,
}

impl Stream {
    /// One SSE message: the event's name on an `event:` line, then the JSON, which repeats it as
    /// `type` and numbers the event.
    fn event(&mut self, kind: &str, fields: Value) {
        let mut event = json!({"type": kind, "sequence_number": self.sequence});
        self.sequence += 1;
        if let (Some(event), Value::Object(fields)) = (event.as_object_mut(), fields) {
            event.extend(fields);
        }
        let mut message = format!("event: {kind}\ndata: ").into_bytes();
        // Serialising a JSON value into a Vec cannot fail.
        let _ = serde_json::to_writer(&mut message, &event);
        message.extend_from_slice(b"\n\n");
        self.out.push(message);
    }
}

fn merge(mut base: Value, extra: Value) -> Value {
    if let (Some(base), Value::Object(extra)) = (base.as_object_mut(), extra) {
        base.extend(extra);
    }
    base
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scripted_llm::Dialect;
    use crate::scripted_llm::reply::Usage;

    fn render(completion: &Completion<'_>) -> Vec<Value> {
        let next_call_id = || "call_x".to_string();
        let ctx = RenderContext {
            id: "r1",
            created: 1,
            model: "gpt-5",
            chunk_chars: completion.chunk_chars,
            include_usage: false,
            request_bytes: 10,
            next_call_id: &next_call_id,
            dialect: Dialect::OpenAiResponses,
            stream_function_call_arguments: false,
        };
        render_stream(completion, &ctx)
            .into_iter()
            .map(|message| {
                let text = String::from_utf8(message).expect("UTF-8");
                let (head, data) = text.split_once("\ndata: ").expect("event and data lines");
                let value: Value = serde_json::from_str(data.trim_end()).expect("JSON");
                assert_eq!(head.strip_prefix("event: "), value["type"].as_str(), "event name repeats the type");
                assert!(text.ends_with("\n\n"));
                value
            })
            .collect()
    }

    fn completion<'a>(calls: Vec<(String, String, String)>, finish: &'a str, hang: bool) -> Completion<'a> {
        Completion {
            reasoning: "Think",
            text: "Héllo",
            calls,
            usage: Usage { prompt_tokens: 10, completion_tokens: 5, cached_tokens: 2 },
            finish,
            hang,
            chunk_chars: 2,
        }
    }

    #[test]
    fn items_stream_in_order_with_sequence_numbers() {
        let call = ("call_1".to_string(), "execute".to_string(), r#"{"command":"ls"}"#.to_string());
        let events = render(&completion(vec![call], "tool_calls", false));
        let types: Vec<&str> = events.iter().filter_map(|e| e["type"].as_str()).collect();
        let deltas = |kind: &str| -> String {
            events.iter().filter(|e| e["type"] == kind).filter_map(|e| e["delta"].as_str()).collect()
        };
        assert_eq!(types[..2], ["response.created", "response.in_progress"]);
        assert_eq!(types.last(), Some(&"response.completed"));
        assert_eq!(deltas("response.reasoning_summary_text.delta"), "Think");
        assert_eq!(deltas("response.output_text.delta"), "Héllo");
        assert_eq!(deltas("response.function_call_arguments.delta"), r#"{"command":"ls"}"#);
        assert_eq!(types.iter().filter(|t| **t == "response.output_text.delta").count(), 3, "2-char pieces");
        let numbers: Vec<u64> = events.iter().filter_map(|e| e["sequence_number"].as_u64()).collect();
        assert_eq!(numbers, (0..events.len() as u64).collect::<Vec<_>>());
        let last = events.last().expect("events");
        assert_eq!(last["response"]["usage"]["input_tokens"], 10);
        assert_eq!(last["response"]["usage"]["input_tokens_details"]["cached_tokens"], 2);
        assert_eq!(last["response"]["output"].as_array().map(Vec::len), Some(3));
        let added = events.iter().find(|e| e["item"]["type"] == "function_call").expect("call item");
        assert_eq!(
            (added["item"]["call_id"].as_str(), added["item"]["name"].as_str()),
            (Some("call_1"), Some("execute"))
        );
    }

    #[test]
    fn length_is_incomplete_and_hang_stops_before_the_end() {
        let events = render(&completion(Vec::new(), "length", false));
        let last = events.last().expect("events");
        assert_eq!(last["type"], "response.incomplete");
        assert_eq!(last["response"]["incomplete_details"]["reason"], "max_output_tokens");

        let events = render(&completion(Vec::new(), "stop", true));
        assert!(events.iter().all(|e| e["type"] != "response.completed"));
    }
}
