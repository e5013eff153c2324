//! An incremental Server-Sent Events parser over a byte stream, as the streaming provider APIs
//! speak it.
//!
//! It follows the WHATWG event-stream rules that matter for LLM providers: `data:` with or without
//! the optional space, several `data:` lines joined by `\n`, `event:` names, `:` comment lines
//! (OpenRouter's keep-alives), and LF, CRLF or lone CR line endings even when a chunk boundary
//! splits a CRLF. Unlike a browser's EventSource it also delivers a final event that is not
//! followed by a blank line: several providers end the body right after the last `data:` line,
//! and the SDKs flush that event too.

use std::pin::Pin;
use std::task::{Context, Poll};

use std::collections::VecDeque;
use std::ops::ControlFlow;

use agentplane_actors::ports::{ModelError, ModelEvent, ModelStream};
use bytes::Bytes;
use futures::stream::BoxStream;
use futures::{Stream, StreamExt};

use super::http;

/// One dispatched event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseEvent {
    /// The `event:` field, when the server named the event.
    pub event: Option<String>,
    /// The `data:` lines joined by `\n`.
    pub data: String,
}

/// Splits bytes into lines and lines into events. Feed it with [`SseParser::push`], take events
/// with [`SseParser::next_event`], and call [`SseParser::finish`] at the end of the body.
#[derive(Debug, Default)]
pub struct SseParser {
    /// Bytes not yet split into lines.
    buffer: Vec<u8>,
    /// Start of the unconsumed part of `buffer`; compacted on the next `push`.
    consumed: usize,
    event: Option<String>,
    data: String,
    /// At least one `data:` line belongs to the event being built (its data may still be empty).
    has_data: bool,
}

impl SseParser {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn push(&mut self, chunk: &[u8]) {
        if self.consumed > 0 {
            self.buffer.drain(..self.consumed);
            self.consumed = 0;
        }
        self.buffer.extend_from_slice(chunk);
    }

    /// The next complete event in the bytes pushed so far.
    pub fn next_event(&mut self) -> Option<SseEvent> {
        while let Some(line) = self.next_line(false) {
            if let Some(event) = self.process_line(&line) {
                return Some(event);
            }
        }
        None
    }

    /// Ends the body: an unterminated last line is taken as a line, and an event still being
    /// built is dispatched as if a blank line had followed.
    pub fn finish(&mut self) -> Option<SseEvent> {
        if let Some(event) = self.next_event() {
            return Some(event);
        }
        while let Some(line) = self.next_line(true) {
            if let Some(event) = self.process_line(&line) {
                return Some(event);
            }
        }
        self.dispatch()
    }

    /// Takes one line off the buffer. Without `at_eof` a trailing CR is left in place, because the
    /// LF of a CRLF may come in the next chunk.
    fn next_line(&mut self, at_eof: bool) -> Option<String> {
        let rest = &self.buffer[self.consumed..];
        if rest.is_empty() {
            return None;
        }
        let (end, terminator_len) = match rest.iter().position(|&b| b == b'\n' || b == b'\r') {
            Some(pos) if rest[pos] == b'\n' => (pos, 1),
            Some(pos) if pos + 1 < rest.len() => (pos, if rest[pos + 1] == b'\n' { 2 } else { 1 }),
            Some(pos) if at_eof => (pos, 1),
            Some(_) => return None,
            None if at_eof => (rest.len(), 0),
            None => return None,
        };
        // Line terminators are ASCII, so a line never ends inside a UTF-8 sequence; lossy decoding
        // only replaces bytes that were invalid to begin with.
        let line = String::from_utf8_lossy(&rest[..end]).into_owned();
        self.consumed += end + terminator_len;
        Some(line)
    }

    fn process_line(&mut self, line: &str) -> Option<SseEvent> {
        if line.is_empty() {
            return self.dispatch();
        }
        if line.starts_with(':') {
            return None;
        }
        let (field, value) = match line.split_once(':') {
            Some((field, value)) => (field, value.strip_prefix(' ').unwrap_or(value)),
            None => (line, ""),
        };
        match field {
            "data" => {
                if self.has_data {
                    self.data.push('\n');
                }
                self.data.push_str(value);
                self.has_data = true;
            }
            "event" => self.event = Some(value.to_owned()),
            // `id` and `retry` only matter to a reconnecting EventSource; a model call is never
            // resumed mid-stream.
            _ => {}
        }
        None
    }

    fn dispatch(&mut self) -> Option<SseEvent> {
        let event = self.event.take();
        if !std::mem::take(&mut self.has_data) {
            return None;
        }
        Some(SseEvent { event, data: std::mem::take(&mut self.data) })
    }
}

/// Adapts a stream of byte chunks into a stream of [`SseEvent`]s. An error from the byte stream
/// is passed through and ends the event stream.
pub struct SseStream<S> {
    inner: S,
    parser: SseParser,
    /// The byte stream ended (or failed); it must not be polled again.
    inner_done: bool,
}

impl<S> SseStream<S> {
    pub fn new(inner: S) -> Self {
        SseStream { inner, parser: SseParser::new(), inner_done: false }
    }
}

impl<S, E> Stream for SseStream<S>
where
    S: Stream<Item = Result<Bytes, E>> + Unpin,
{
    type Item = Result<SseEvent, E>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            if this.inner_done {
                return Poll::Ready(this.parser.finish().map(Ok));
            }
            if let Some(event) = this.parser.next_event() {
                return Poll::Ready(Some(Ok(event)));
            }
            match Pin::new(&mut this.inner).poll_next(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Ok(chunk))) => this.parser.push(&chunk),
                Poll::Ready(Some(Err(err))) => {
                    // Whatever was buffered is a fragment of an interrupted event: drop it rather
                    // than hand a truncated payload to the caller.
                    this.inner_done = true;
                    this.parser = SseParser::new();
                    return Poll::Ready(Some(Err(err)));
                }
                Poll::Ready(None) => this.inner_done = true,
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Driving a dialect's decoder

/// What a dialect's stream decoder does with the events of one answer; [`decode_stream`] and
/// [`decode_sse_body`] drive it over a live response or a whole recorded body alike.
pub(crate) trait SseDecoder: Send + 'static {
    /// Handles one event; `Break` when the stream is over (its end marker, or an error). What
    /// to emit goes to `out` either way.
    fn on_event(&mut self, event: &SseEvent, out: &mut VecDeque<ModelItem>) -> ControlFlow<()>;
    /// The body ended: emit what was held back and `Finish`, or an error when the answer is
    /// unfinished. Called at most once, and not after `on_event` broke.
    fn end_of_body(&mut self, out: &mut VecDeque<ModelItem>);
    /// Whether the answer is complete but for trailing metadata (the stop reason came): a
    /// connection lost after that ends the answer normally instead of failing it, since
    /// retrying would pay for the whole answer again.
    fn answer_complete(&self) -> bool;
    /// Scrubbed from transport error messages.
    fn api_key(&self) -> Option<&str>;
}

pub(crate) type ModelItem = Result<ModelEvent, ModelError>;

/// The model events of a streamed SSE response.
pub(crate) fn decode_stream<D: SseDecoder>(
    bytes: BoxStream<'static, reqwest::Result<Bytes>>,
    decoder: D,
) -> ModelStream {
    let state = DecodeState { events: SseStream::new(bytes), decoder, pending: VecDeque::new(), done: false };
    futures::stream::unfold(state, DecodeState::next).boxed()
}

/// What [`decode_stream`] would yield for a server that sent exactly `body`.
pub(crate) fn decode_sse_body<D: SseDecoder>(body: &[u8], mut decoder: D) -> Vec<ModelItem> {
    let mut parser = SseParser::new();
    parser.push(body);
    let mut out = VecDeque::new();
    while let Some(event) = parser.finish() {
        if decoder.on_event(&event, &mut out).is_break() {
            return out.into();
        }
    }
    decoder.end_of_body(&mut out);
    out.into()
}

struct DecodeState<D> {
    events: SseStream<BoxStream<'static, reqwest::Result<Bytes>>>,
    decoder: D,
    pending: VecDeque<ModelItem>,
    done: bool,
}

impl<D: SseDecoder> DecodeState<D> {
    async fn next(mut self) -> Option<(ModelItem, Self)> {
        loop {
            if let Some(item) = self.pending.pop_front() {
                return Some((item, self));
            }
            if self.done {
                return None;
            }
            match self.events.next().await {
                Some(Ok(event)) => self.done = self.decoder.on_event(&event, &mut self.pending).is_break(),
                Some(Err(error)) => {
                    self.done = true;
                    if self.decoder.answer_complete() {
                        let error = error.without_url();
                        tracing::warn!(%error, "model stream cut after its stop reason");
                        self.decoder.end_of_body(&mut self.pending);
                    } else {
                        let error = http::transport_error(error, self.decoder.api_key());
                        tracing::warn!(%error, "model stream failed");
                        self.pending.push_back(Err(error));
                    }
                }
                None => {
                    self.done = true;
                    self.decoder.end_of_body(&mut self.pending);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use futures::StreamExt;

    use super::*;

    fn parse_all(chunks: &[&[u8]]) -> Vec<SseEvent> {
        let mut parser = SseParser::new();
        let mut events = Vec::new();
        for chunk in chunks {
            parser.push(chunk);
            while let Some(event) = parser.next_event() {
                events.push(event);
            }
        }
        while let Some(event) = parser.finish() {
            events.push(event);
        }
        events
    }

    fn data(data: &str) -> SseEvent {
        SseEvent { event: None, data: data.to_owned() }
    }

    fn named(event: &str, data: &str) -> SseEvent {
        SseEvent { event: Some(event.to_owned()), data: data.to_owned() }
    }

    #[test]
    fn data_with_and_without_space() {
        assert_eq!(parse_all(&[b"data: a\n\ndata:b\n\ndata:  c\n\n"]), vec![data("a"), data("b"), data(" c")]);
    }

    #[test]
    fn multi_line_data_is_joined_with_newlines() {
        assert_eq!(parse_all(&[b"data: {\"a\":\ndata: 1}\n\n"]), vec![data("{\"a\":\n1}")]);
    }

    #[test]
    fn event_names_apply_to_one_event() {
        let events = parse_all(&[b"event: message_start\ndata: {}\n\ndata: x\n\n"]);
        assert_eq!(events, vec![named("message_start", "{}"), data("x")]);
    }

    #[test]
    fn comments_and_unknown_fields_are_ignored() {
        let events = parse_all(&[b": OPENROUTER PROCESSING\n\nid: 7\nretry: 10\nfoo\ndata: x\n\n"]);
        assert_eq!(events, vec![data("x")]);
    }

    #[test]
    fn crlf_and_lone_cr_line_endings() {
        assert_eq!(parse_all(&[b"data: a\r\n\r\ndata: b\r\rdata: c\n\n"]), vec![data("a"), data("b"), data("c")]);
    }

    #[test]
    fn crlf_split_across_chunks() {
        assert_eq!(parse_all(&[b"data: a\r", b"\n\r", b"\ndata: b\r\n\r\n"]), vec![data("a"), data("b")]);
    }

    #[test]
    fn final_event_without_blank_line_is_flushed() {
        assert_eq!(parse_all(&[b"data: a\n\ndata: [DONE]\n"]), vec![data("a"), data("[DONE]")]);
        assert_eq!(parse_all(&[b"data: a\n\ndata: [DONE]"]), vec![data("a"), data("[DONE]")]);
        assert_eq!(parse_all(&[b"data: a\r"]), vec![data("a")]);
    }

    #[test]
    fn empty_data_line_is_an_event_but_a_bare_event_line_is_not() {
        assert_eq!(parse_all(&[b"data:\n\nevent: ping\n\n"]), vec![data("")]);
    }

    #[test]
    fn every_split_point_gives_the_same_events() {
        let body = "event: e\r\ndata: {\"t\":\"h\u{e9}llo \u{1f600}\"}\r\n\r\n: c\ndata: 2\n\ndata: end";
        let whole = parse_all(&[body.as_bytes()]);
        assert_eq!(whole, vec![named("e", "{\"t\":\"h\u{e9}llo \u{1f600}\"}"), data("2"), data("end")]);
        for split in 0..=body.len() {
            let (a, b) = body.as_bytes().split_at(split);
            assert_eq!(parse_all(&[a, b]), whole, "split at {split}");
        }
        let bytes: Vec<&[u8]> = body.as_bytes().chunks(1).collect();
        assert_eq!(parse_all(&bytes), whole);
    }

    #[tokio::test]
    async fn stream_adapter_flushes_at_eof_and_passes_errors() {
        let chunks: Vec<Result<Bytes, &str>> =
            vec![Ok(Bytes::from_static(b"data: a\n")), Ok(Bytes::from_static(b"\ndata: b"))];
        let events: Vec<_> = SseStream::new(futures::stream::iter(chunks)).collect().await;
        assert_eq!(events, vec![Ok(data("a")), Ok(data("b"))]);

        let chunks: Vec<Result<Bytes, &str>> = vec![Ok(Bytes::from_static(b"data: a\n\ndata: b")), Err("reset")];
        let events: Vec<_> = SseStream::new(futures::stream::iter(chunks)).collect().await;
        assert_eq!(events, vec![Ok(data("a")), Err("reset")]);
    }
}
