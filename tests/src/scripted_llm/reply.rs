//! What the scripted LLM answers to one request, and how that answer is laid out on the wire.
//!
//! A [`Reply`] is built by a test; [`Reply::render_stream`] turns it into the exact SSE messages
//! an OpenAI-compatible server sends, so the connection code only has to pace and write them.

use std::time::Duration;

use serde::Serialize;
use serde_json::{Value, json};

use super::Dialect;

/// One scripted answer. Build with [`Reply::text`], [`Reply::tool_calls`], [`Reply::error`],
/// [`Reply::hang`] and refine with the builder methods.
#[derive(Debug, Clone)]
pub struct Reply {
    pub(crate) body: ReplyBody,
    pub(crate) headers: Vec<(String, String)>,
    pub(crate) first_byte_delay: Duration,
    pub(crate) chunk_delay: Duration,
    pub(crate) chunk_chars: Option<usize>,
    pub(crate) reset_after: Option<usize>,
    pub(crate) hang: bool,
    pub(crate) usage: Option<Usage>,
    pub(crate) finish_reason: Option<String>,
}

#[derive(Debug, Clone)]
pub(crate) enum ReplyBody {
    Completion { reasoning: String, text: String, calls: Vec<ScriptedCall> },
    Error { status: u16, body: Value },
}

/// A tool call the scripted model makes. `arguments` is sent verbatim (it may be invalid JSON on
/// purpose); without an `id` the server assigns `call_<n>`, unique per server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScriptedCall {
    pub id: Option<String>,
    pub name: String,
    pub arguments: String,
}

impl ScriptedCall {
    pub fn new(name: impl Into<String>, arguments: impl ToString) -> Self {
        ScriptedCall { id: None, name: name.into(), arguments: arguments.to_string() }
    }

    pub fn with_id(mut self, id: impl Into<String>) -> Self {
        self.id = Some(id.into());
        self
    }
}

/// Token counts reported in the usage chunk (or the `usage` of a non-streaming answer).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub cached_tokens: u64,
}

impl Default for Reply {
    /// The answer used when nothing is scripted: the text `ok`.
    fn default() -> Self {
        Reply::text("ok")
    }
}

impl Reply {
    fn completion(text: String, calls: Vec<ScriptedCall>) -> Self {
        Reply {
            body: ReplyBody::Completion { reasoning: String::new(), text, calls },
            headers: Vec::new(),
            first_byte_delay: Duration::ZERO,
            chunk_delay: Duration::ZERO,
            chunk_chars: None,
            reset_after: None,
            hang: false,
            usage: None,
            finish_reason: None,
        }
    }

    /// A plain text answer, streamed in pieces of `chunk_chars` characters.
    pub fn text(text: impl Into<String>) -> Self {
        Reply::completion(text.into(), Vec::new())
    }

    /// Tool calls, each `(name, arguments)`; arguments may be a `serde_json::Value` or raw text
    /// (anything `ToString`, so deliberately broken JSON is possible).
    pub fn tool_calls<N, A>(calls: impl IntoIterator<Item = (N, A)>) -> Self
    where
        N: Into<String>,
        A: ToString,
    {
        Reply::calls(calls.into_iter().map(|(name, args)| ScriptedCall::new(name, args)))
    }

    /// One tool call.
    pub fn tool_call(name: impl Into<String>, arguments: impl ToString) -> Self {
        Reply::calls([ScriptedCall::new(name, arguments)])
    }

    /// Tool calls with full control (explicit ids).
    pub fn calls(calls: impl IntoIterator<Item = ScriptedCall>) -> Self {
        Reply::completion(String::new(), calls.into_iter().collect())
    }

    /// An HTTP error answer with a JSON body; add headers with [`Reply::header`].
    pub fn error(status: u16, body: Value) -> Self {
        Reply { body: ReplyBody::Error { status, body }, ..Reply::text("") }
    }

    /// A 429 the way OpenAI sends it, with `retry-after` in seconds.
    pub fn rate_limited(retry_after_secs: u64) -> Self {
        Reply::error(
            429,
            json!({"error": {
                "message": "Rate limit reached (scripted)",
                "type": "requests",
                "param": null,
                "code": "rate_limit_exceeded"
            }}),
        )
        .header("retry-after", retry_after_secs.to_string())
    }

    /// Sends the role chunk, then nothing until the client disconnects (interrupt tests).
    /// Add text before the silence with [`Reply::with_text`], or use [`Reply::then_hang`] on any
    /// streamed reply.
    pub fn hang() -> Self {
        Reply::text("").then_hang()
    }

    /// Text streamed before the tool calls (or before hanging).
    pub fn with_text(mut self, leading: impl Into<String>) -> Self {
        if let ReplyBody::Completion { text, .. } = &mut self.body {
            *text = leading.into();
        }
        self
    }

    /// Reasoning streamed before the text, as DeepSeek-style `reasoning_content` deltas.
    pub fn with_reasoning(mut self, reasoning_text: impl Into<String>) -> Self {
        if let ReplyBody::Completion { reasoning, .. } = &mut self.body {
            *reasoning = reasoning_text.into();
        }
        self
    }

    /// An extra response header (error replies and streams alike).
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// Wait this long before the status line.
    pub fn delay(mut self, d: Duration) -> Self {
        self.first_byte_delay = d;
        self
    }

    /// Wait this long between SSE messages.
    pub fn chunk_delay(mut self, d: Duration) -> Self {
        self.chunk_delay = d;
        self
    }

    /// Characters per text / reasoning / argument piece (overrides the server's default).
    pub fn chunk_chars(mut self, n: usize) -> Self {
        self.chunk_chars = Some(n.max(1));
        self
    }

    /// Close the connection after `n` SSE messages (the role chunk is the first), without
    /// finishing the chunked body: the client sees a connection reset mid-stream. For a
    /// non-streaming request the connection closes before any answer.
    pub fn reset_after(mut self, n: usize) -> Self {
        self.reset_after = Some(n);
        self
    }

    /// Stream everything but the final chunk, then stay silent until the client disconnects.
    pub fn then_hang(mut self) -> Self {
        self.hang = true;
        self
    }

    /// Report these token counts instead of the estimate (request bytes / 4, output chars / 4).
    pub fn usage(mut self, prompt_tokens: u64, completion_tokens: u64) -> Self {
        let cached_tokens = self.usage.map(|u| u.cached_tokens).unwrap_or(0);
        self.usage = Some(Usage { prompt_tokens, completion_tokens, cached_tokens });
        self
    }

    /// Report cached prompt tokens (`prompt_tokens_details.cached_tokens`).
    pub fn cached_tokens(mut self, n: u64) -> Self {
        let mut usage = self.usage.unwrap_or_default();
        usage.cached_tokens = n;
        self.usage = Some(usage);
        self
    }

    /// Override the finish reason (`length`, `content_filter`, …); the default is `stop`, or
    /// `tool_calls` when the reply has calls.
    pub fn finish_reason(mut self, reason: impl Into<String>) -> Self {
        self.finish_reason = Some(reason.into());
        self
    }
}

/// Per-request facts the rendering needs besides the reply.
pub(crate) struct RenderContext<'a> {
    pub id: &'a str,
    pub created: u64,
    pub model: &'a str,
    pub chunk_chars: usize,
    pub include_usage: bool,
    /// Gemini on Vertex: the request asked for streamed function-call arguments
    /// (`toolConfig.functionCallingConfig.streamFunctionCallArguments`).
    pub stream_function_call_arguments: bool,
    pub request_bytes: usize,
    /// Assigns ids to calls that have none.
    pub next_call_id: &'a (dyn Fn() -> String + Sync),
    pub dialect: Dialect,
}

/// A completion reply with everything resolved (call ids, usage, finish reason), as a
/// dialect's renderer gets it.
pub(crate) struct Completion<'a> {
    pub reasoning: &'a str,
    pub text: &'a str,
    /// `(id, name, arguments)`; the arguments are the exact text the model "wrote".
    pub calls: Vec<(String, String, String)>,
    pub usage: Usage,
    /// In OpenAI's words: `stop`, `tool_calls`, `length`, `content_filter`, or what the reply set.
    pub finish: &'a str,
    /// Stop before the end of the answer (the server then hangs).
    pub hang: bool,
    pub chunk_chars: usize,
}

#[derive(Serialize)]
struct Chunk<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    choices: Vec<ChunkChoice<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    usage: Option<UsageJson>,
}

#[derive(Serialize)]
struct ChunkChoice<'a> {
    index: u32,
    delta: Delta<'a>,
    // Always present (null until the last chunk), as OpenAI sends it.
    finish_reason: Option<&'a str>,
}

#[derive(Serialize, Default)]
struct Delta<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    content: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reasoning_content: Option<&'a str>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    tool_calls: Vec<ToolCallDelta<'a>>,
}

#[derive(Serialize)]
struct ToolCallDelta<'a> {
    index: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a str>,
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    call_type: Option<&'static str>,
    function: FunctionDelta<'a>,
}

#[derive(Serialize)]
struct FunctionDelta<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    arguments: Option<&'a str>,
}

#[derive(Serialize)]
struct UsageJson {
    prompt_tokens: u64,
    completion_tokens: u64,
    total_tokens: u64,
    prompt_tokens_details: CachedJson,
}

#[derive(Serialize)]
struct CachedJson {
    cached_tokens: u64,
}

impl From<Usage> for UsageJson {
    fn from(u: Usage) -> Self {
        UsageJson {
            prompt_tokens: u.prompt_tokens,
            completion_tokens: u.completion_tokens,
            total_tokens: u.prompt_tokens + u.completion_tokens,
            prompt_tokens_details: CachedJson { cached_tokens: u.cached_tokens },
        }
    }
}

/// Splits at character boundaries so multi-byte text never yields invalid UTF-8 pieces.
pub(crate) fn pieces(s: &str, chars: usize) -> impl Iterator<Item = &str> {
    let chars = chars.max(1);
    let mut rest = s;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let end = rest.char_indices().nth(chars).map(|(i, _)| i).unwrap_or(rest.len());
        let (head, tail) = rest.split_at(end);
        rest = tail;
        Some(head)
    })
}

fn sse_message(chunk: &Chunk<'_>) -> Vec<u8> {
    let mut msg = b"data: ".to_vec();
    // Serialising plain structs of strings and integers into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut msg, chunk);
    msg.extend_from_slice(b"\n\n");
    msg
}

impl Reply {
    fn resolved_calls(calls: &[ScriptedCall], ctx: &RenderContext<'_>) -> Vec<(String, String, String)> {
        calls
            .iter()
            .map(|c| {
                let id = c.id.clone().unwrap_or_else(|| (ctx.next_call_id)());
                (id, c.name.clone(), c.arguments.clone())
            })
            .collect()
    }

    fn resolved_usage(&self, ctx: &RenderContext<'_>, output_chars: usize) -> Usage {
        self.usage.unwrap_or(Usage {
            prompt_tokens: (ctx.request_bytes / 4).max(1) as u64,
            completion_tokens: (output_chars / 4).max(1) as u64,
            cached_tokens: 0,
        })
    }

    fn resolved_finish(&self, has_calls: bool) -> &str {
        match &self.finish_reason {
            Some(r) => r,
            None if has_calls => "tool_calls",
            None => "stop",
        }
    }

    /// The messages of a streamed completion in the server's dialect, each one written as a
    /// unit (an SSE event, an event-stream frame). A hanging reply stops before the end. Error
    /// replies render nothing.
    pub(crate) fn render_stream(&self, ctx: &RenderContext<'_>) -> Vec<Vec<u8>> {
        if ctx.dialect == Dialect::OpenAiChat {
            return self.render_openai_chat_stream(ctx);
        }
        let ReplyBody::Completion { reasoning, text, calls } = &self.body else {
            return Vec::new();
        };
        let calls = Self::resolved_calls(calls, ctx);
        let output_chars = reasoning.chars().count()
            + text.chars().count()
            + calls.iter().map(|(_, _, a)| a.chars().count()).sum::<usize>();
        let completion = Completion {
            reasoning,
            text,
            usage: self.resolved_usage(ctx, output_chars),
            finish: self.resolved_finish(!calls.is_empty()),
            calls,
            hang: self.hang,
            chunk_chars: ctx.chunk_chars,
        };
        ctx.dialect.render_stream(&completion, ctx)
    }

    /// OpenAI Chat Completions: `data: {chunk}` events, a usage chunk when asked, `[DONE]`.
    fn render_openai_chat_stream(&self, ctx: &RenderContext<'_>) -> Vec<Vec<u8>> {
        let ReplyBody::Completion { reasoning, text, calls } = &self.body else {
            return Vec::new();
        };
        let calls = Self::resolved_calls(calls, ctx);
        let mut out = Vec::new();
        let chunk = |delta: Delta<'_>, finish: Option<&'_ str>| {
            sse_message(&Chunk {
                id: ctx.id,
                object: "chat.completion.chunk",
                created: ctx.created,
                model: ctx.model,
                choices: vec![ChunkChoice { index: 0, delta, finish_reason: finish }],
                usage: None,
            })
        };
        out.push(chunk(Delta { role: Some("assistant"), content: Some(""), ..Delta::default() }, None));
        for piece in pieces(reasoning, ctx.chunk_chars) {
            out.push(chunk(Delta { reasoning_content: Some(piece), ..Delta::default() }, None));
        }
        for piece in pieces(text, ctx.chunk_chars) {
            out.push(chunk(Delta { content: Some(piece), ..Delta::default() }, None));
        }
        for (index, (id, name, args)) in calls.iter().enumerate() {
            // OpenAI names the call once, in its first delta, with empty arguments; the
            // arguments then follow in pieces that carry only the index.
            out.push(chunk(
                Delta {
                    tool_calls: vec![ToolCallDelta {
                        index,
                        id: Some(id),
                        call_type: Some("function"),
                        function: FunctionDelta { name: Some(name), arguments: Some("") },
                    }],
                    ..Delta::default()
                },
                None,
            ));
            for piece in pieces(args, ctx.chunk_chars) {
                out.push(chunk(
                    Delta {
                        tool_calls: vec![ToolCallDelta {
                            index,
                            id: None,
                            call_type: None,
                            function: FunctionDelta { name: None, arguments: Some(piece) },
                        }],
                        ..Delta::default()
                    },
                    None,
                ));
            }
        }
        if self.hang {
            return out;
        }
        out.push(chunk(Delta::default(), Some(self.resolved_finish(!calls.is_empty()))));
        if ctx.include_usage {
            let output_chars = reasoning.chars().count()
                + text.chars().count()
                + calls.iter().map(|(_, _, a)| a.chars().count()).sum::<usize>();
            out.push(sse_message(&Chunk {
                id: ctx.id,
                object: "chat.completion.chunk",
                created: ctx.created,
                model: ctx.model,
                choices: Vec::new(),
                usage: Some(self.resolved_usage(ctx, output_chars).into()),
            }));
        }
        out.push(b"data: [DONE]\n\n".to_vec());
        out
    }

    /// The body of a non-streaming (`"stream": false`) completion.
    pub(crate) fn render_whole(&self, ctx: &RenderContext<'_>) -> Value {
        let ReplyBody::Completion { reasoning, text, calls } = &self.body else {
            return Value::Null;
        };
        let calls = Self::resolved_calls(calls, ctx);
        let output_chars = reasoning.chars().count()
            + text.chars().count()
            + calls.iter().map(|(_, _, a)| a.chars().count()).sum::<usize>();
        let mut message = json!({
            "role": "assistant",
            "content": if text.is_empty() && !calls.is_empty() { Value::Null } else { json!(text) },
        });
        if !reasoning.is_empty() {
            message["reasoning_content"] = json!(reasoning);
        }
        if !calls.is_empty() {
            message["tool_calls"] = calls
                .iter()
                .map(|(id, name, args)| {
                    json!({"id": id, "type": "function", "function": {"name": name, "arguments": args}})
                })
                .collect();
        }
        let usage = UsageJson::from(self.resolved_usage(ctx, output_chars));
        json!({
            "id": ctx.id,
            "object": "chat.completion",
            "created": ctx.created,
            "model": ctx.model,
            "choices": [{
                "index": 0,
                "message": message,
                "finish_reason": self.resolved_finish(!calls.is_empty()),
            }],
            "usage": serde_json::to_value(usage).unwrap_or(Value::Null),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_respect_char_boundaries() {
        let got: Vec<_> = pieces("héllo wörld", 3).collect();
        assert_eq!(got, ["hél", "lo ", "wör", "ld"]);
        assert_eq!(pieces("", 3).count(), 0);
        assert_eq!(pieces("ab", 0).collect::<Vec<_>>(), ["a", "b"]);
    }
}
