//! Parts of prompts already written as JSON. A conversation resends its whole history and the
//! same tool definitions with every step, and writing them again (escaping every string, turning
//! every tool call's arguments into a string) was most of the cost of a request body. A history
//! message's parts never change once made ([`Message::parts`] is shared, never edited in place),
//! nor do the tool definitions every request shares, so what a dialect writes for them is kept
//! and reused.
//!
//! Two keepers, both by the address of the shared value:
//! - [`SentPrefix`], one per conversation (kept in the request's [`PromptMemo`]): what each
//!   message of its last request was written as, in one text. The next request resends them
//!   first, so it reuses them after one address comparison per message and writes only what is
//!   new ([`message_pieces`]).
//! - [`Fragments`], one for all: what a dialect wrote for one shared value (the tool definitions
//!   every request carries). An entry holds a [`Weak`] to its value: while the entry exists the
//!   allocation cannot be reused, so an address never names two values, and entries whose value
//!   is gone are dropped as the map grows.
//!
//! [`Message::parts`]: agentplane_schema::message::Message::parts
//! [`PromptMemo`]: agentplane_actors::ports::PromptMemo

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::{Arc, Mutex, Weak};

use agentplane_actors::ports::{ModelError, ModelRequest, PromptMessage};
use agentplane_schema::message::{Part, Role};
use serde_json::value::RawValue;

/// What a dialect writes for one shared value: none, one or several elements of an array (its
/// tools for the tool definitions).
pub(crate) type Written = Arc<[Box<RawValue>]>;

/// Entries kept before the dead ones are swept, at least.
const MIN_SWEEP: usize = 4096;

/// Whether the value an entry was written from still exists; it holds a [`Weak`] to it.
type Alive = Box<dyn Fn() -> bool + Send>;

#[derive(Default)]
pub(crate) struct Fragments {
    entries: Mutex<Entries>,
}

#[derive(Default)]
struct Entries {
    by_value: HashMap<Key, (Alive, Written), BuildHasherDefault<AddressHasher>>,
    /// The map is swept of dead entries when it grows past this.
    sweep_at: usize,
}

/// A shared value's address and the dialect that wrote it.
#[derive(PartialEq, Eq)]
struct Key {
    address: usize,
    dialect: &'static str,
}

impl std::hash::Hash for Key {
    /// By the address alone: a value is seldom written by two dialects.
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_usize(self.address);
    }
}

/// An address hashed with one multiplication, where the default hasher would cost more than
/// the lookup saves on a short message. A product's low bits depend only on the factor's low
/// bits, which alignment leaves zero, so `finish` rotates the well-mixed high bits down: the
/// map picks a bucket by the low ones.
#[derive(Default)]
struct AddressHasher(u64);

impl Hasher for AddressHasher {
    fn finish(&self) -> u64 {
        self.0.rotate_left(26)
    }

    fn write(&mut self, bytes: &[u8]) {
        for byte in bytes {
            self.write_u64(u64::from(*byte));
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0.rotate_left(5) ^ n).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }

    fn write_usize(&mut self, n: usize) {
        self.write_u64(n as u64);
    }
}

impl Fragments {
    /// What `dialect` writes for `shared` (the tool definitions): kept from
    /// an earlier request, or written now by `write` and kept. A failure is not kept.
    pub(crate) fn get_or_write<T: ?Sized + Send + Sync + 'static>(
        &self,
        dialect: &'static str,
        shared: &Arc<T>,
        write: impl FnOnce() -> Result<Written, ModelError>,
    ) -> Result<Written, ModelError> {
        let key = Key { address: Arc::as_ptr(shared).cast::<()>() as usize, dialect };
        if let Some((_, written)) = self.lock().by_value.get(&key) {
            return Ok(written.clone());
        }
        let written = write()?;
        let weak: Weak<T> = Arc::downgrade(shared);
        let alive: Alive = Box::new(move || weak.strong_count() > 0);
        let mut entries = self.lock();
        if entries.by_value.len() >= entries.sweep_at.max(MIN_SWEEP) {
            entries.by_value.retain(|_, (alive, _)| alive());
            entries.sweep_at = entries.by_value.len() * 2;
        }
        entries.by_value.insert(key, (alive, written.clone()));
        Ok(written)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Entries> {
        self.entries.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().by_value.len()
    }
}

/// The messages a dialect wrote for a conversation's last request, as the text between the
/// brackets of a JSON array: the elements, comma-separated. A message may also be held without
/// its text (one with an image, written anew for each request).
#[derive(Default)]
pub(crate) struct SentPrefix {
    /// The dialect and whatever else changes how it writes a message (a model's options).
    written_as: String,
    /// What each message was written from (held, so its address cannot name another value while
    /// it is here), and whether its elements are in `text`, ending where.
    sent: Vec<Sent>,
    text: String,
}

struct Sent {
    role: Role,
    parts: Arc<Vec<Part>>,
    kept: bool,
    end: usize,
}

impl SentPrefix {
    /// How many of `messages`, from the first, this prefix holds as written by `written_as` (a
    /// dialect, and what else changes how it writes a message); what it
    /// held beyond them is dropped. A message matches by its parts' address or, failing that,
    /// their value: the summary that opens a compacted conversation is made anew for each
    /// request, with the same text.
    pub(crate) fn reuse(&mut self, written_as: &str, messages: &[PromptMessage]) -> usize {
        if self.written_as != written_as {
            *self = SentPrefix { written_as: written_as.to_owned(), ..SentPrefix::default() };
            return 0;
        }
        let same = self
            .sent
            .iter()
            .zip(messages)
            .take_while(|(sent, message)| {
                sent.role == message.role && (Arc::ptr_eq(&sent.parts, &message.parts) || *sent.parts == *message.parts)
            })
            .count();
        let end = same.checked_sub(1).map_or(0, |last| self.sent[last].end);
        self.sent.truncate(same);
        self.text.truncate(end);
        // After a summary most of the text goes: its buffer need not stay the size of the
        // longest prompt so far.
        if self.text.capacity() > 4 * self.text.len() + (64 << 10) {
            self.text.shrink_to(2 * self.text.len());
        }
        same
    }

    /// Appends `message` as the elements `written`, each one JSON text.
    pub(crate) fn push(&mut self, message: &PromptMessage, written: &[Box<RawValue>]) {
        for element in written {
            if !self.text.is_empty() {
                self.text.push(',');
            }
            self.text.push_str(element.get());
        }
        self.sent.push(Sent { role: message.role, parts: message.parts.clone(), kept: true, end: self.text.len() });
    }

    /// Appends `message` without its text.
    pub(crate) fn push_unkept(&mut self, message: &PromptMessage) {
        self.sent.push(Sent { role: message.role, parts: message.parts.clone(), kept: false, end: self.text.len() });
    }

    /// The elements, comma-separated; empty when none.
    fn text(&self) -> &str {
        &self.text
    }

    /// The elements of the `index`th message, comma-separated (empty when it has none); `None`
    /// when it is held without its text or not held.
    pub(crate) fn piece(&self, index: usize) -> Option<&str> {
        let sent = self.sent.get(index).filter(|sent| sent.kept)?;
        let previous = index.checked_sub(1).map_or(0, |i| self.sent[i].end);
        // The comma before the message's first element, if anything came before it.
        let start = if previous > 0 && sent.end > previous { previous + 1 } else { previous };
        self.text.get(start..sent.end)
    }
}

/// The elements of each of `request`'s messages as text, comma-separated (empty for a message
/// with nothing to send): kept in the conversation's memo from an earlier request, or written
/// now by `write` (its elements, see [`raw_all`]) and kept there. A message with an image is
/// written anew for each request and held without its text, which would be its image's data for
/// as long as the chat is loaded.
pub(crate) fn message_pieces<'s>(
    sent: &'s mut SentPrefix,
    written_as: &str,
    request: &ModelRequest,
    write: impl Fn(&PromptMessage) -> Result<Vec<Box<RawValue>>, ModelError>,
) -> Result<Pieces<'s>, ModelError> {
    let kept = sent.reuse(written_as, &request.messages);
    let mut unkept = HashMap::new();
    for (index, message) in request.messages.iter().enumerate() {
        let held = index < kept;
        if held && sent.piece(index).is_some() {
            continue;
        }
        let written = write(message)?;
        if message.parts.iter().any(|p| matches!(p, Part::Image { .. })) {
            if !held {
                sent.push_unkept(message);
            }
            let text: Vec<&str> = written.iter().map(|element| element.get()).collect();
            unkept.insert(index, text.join(","));
        } else {
            sent.push(message, &written);
        }
    }
    Ok(Pieces { sent, unkept })
}

/// [`message_pieces`] kept in the conversation's memo (`request.memo`), for `body` to write the
/// request around.
pub(crate) fn with_message_pieces<R>(
    request: &ModelRequest,
    written_as: &str,
    write: impl Fn(&PromptMessage) -> Result<Vec<Box<RawValue>>, ModelError>,
    body: impl FnOnce(&Pieces<'_>) -> Result<R, ModelError>,
) -> Result<R, ModelError> {
    request.memo.with(|sent: &mut SentPrefix| body(&message_pieces(sent, written_as, request, write)?))
}

/// What [`message_pieces`] gives: each of the request's messages as its elements' text.
pub(crate) struct Pieces<'s> {
    /// Holds every message of the request, in order.
    sent: &'s SentPrefix,
    /// The text of the messages `sent` holds without it, by index.
    unkept: HashMap<usize, String>,
}

impl Pieces<'_> {
    /// The `index`th message's elements, comma-separated; empty when it has none.
    pub(crate) fn get(&self, index: usize) -> &str {
        match self.sent.piece(index) {
            Some(piece) => piece,
            None => self.unkept.get(&index).map_or("", String::as_str),
        }
    }

    /// Every message's elements in order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = &str> {
        (0..self.sent.sent.len()).map(|index| self.get(index))
    }

    /// The bytes of all the elements, for sizing a body.
    pub(crate) fn size(&self) -> usize {
        self.sent.text().len() + self.unkept.values().map(|text| text.len() + 1).sum::<usize>()
    }

    /// Whether no message has an element.
    pub(crate) fn is_empty(&self) -> bool {
        self.sent.text().is_empty() && self.unkept.values().all(String::is_empty)
    }

    /// Writes every message's elements, comma-separated: in one copy when the memo holds them
    /// all (its text is exactly that).
    pub(crate) fn push_all(&self, out: &mut Vec<u8>) {
        if self.unkept.is_empty() {
            out.extend_from_slice(self.sent.text().as_bytes());
        } else {
            push_joined(out, self.iter().filter(|piece| !piece.is_empty()));
        }
    }
}

/// Who a message of a dialect whose roles must alternate is from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum WireRole {
    User,
    Assistant,
}

/// The wire role of a prompt message; `None` for a marker, which is not sent. Tool results go
/// back in a user message. The loop turns summaries into user messages before a prompt is
/// built; should one arrive anyway, it reads as user context.
fn wire_role(role: Role) -> Option<WireRole> {
    match role {
        Role::Marker => None,
        Role::Assistant => Some(WireRole::Assistant),
        Role::User | Role::Summary | Role::Tool => Some(WireRole::User),
    }
}

/// Consecutive non-empty pieces of one [`WireRole`] joined into one message, for dialects whose
/// roles must alternate (tool results then the user's next message, or a dropped message in
/// between, make one); markers are left out.
pub(crate) fn merged_by_role<'p>(pieces: &'p Pieces<'_>, messages: &[PromptMessage]) -> Vec<(WireRole, Vec<&'p str>)> {
    let mut merged: Vec<(WireRole, Vec<&str>)> = Vec::with_capacity(messages.len());
    for (piece, message) in pieces.iter().zip(messages) {
        let Some(role) = wire_role(message.role).filter(|_| !piece.is_empty()) else {
            continue;
        };
        match merged.last_mut() {
            Some((last, joined)) if *last == role => joined.push(piece),
            _ => merged.push((role, vec![piece])),
        }
    }
    merged
}

/// The openings of a user's and an assistant's message where both are `role` and `content`
/// (Anthropic, Bedrock), for [`push_role_messages`].
pub(crate) const ROLE_AND_CONTENT: (&[u8], &[u8]) =
    (br#"{"role":"user","content":["#, br#"{"role":"assistant","content":["#);

/// Writes `messages` comma-separated, each as its role's opening (`openings`: the user's, the
/// assistant's; `{"role":"…","<key>":[`), the elements `write_elements` writes for it (given its
/// index), and `]}`.
pub(crate) fn push_role_messages<'p>(
    out: &mut Vec<u8>,
    messages: &[(WireRole, Vec<&'p str>)],
    openings: (&[u8], &[u8]),
    mut write_elements: impl FnMut(&mut Vec<u8>, usize, &[&'p str]),
) {
    for (index, (role, elements)) in messages.iter().enumerate() {
        if index > 0 {
            out.push(b',');
        }
        out.extend_from_slice(match role {
            WireRole::User => openings.0,
            WireRole::Assistant => openings.1,
        });
        write_elements(out, index, elements);
        out.extend_from_slice(b"]}");
    }
}

/// `{"<key>":[…], …rest}`: the JSON object `rest` with one more field written first, an array
/// whose elements `write_elements` writes (comma-separated, no brackets).
pub(crate) fn object_with_array_first(
    key: &str,
    capacity: usize,
    rest: &impl serde::Serialize,
    write_elements: impl FnOnce(&mut Vec<u8>),
) -> Result<Vec<u8>, ModelError> {
    let rest = serde_json::to_vec(rest).map_err(writing_error)?;
    let mut out = Vec::with_capacity(capacity + rest.len() + key.len() + 8);
    out.push(b'{');
    serde_json::to_writer(&mut out, key).map_err(writing_error)?;
    out.extend_from_slice(b":[");
    write_elements(&mut out);
    out.push(b']');
    // `rest` is an object: after its `{`, nothing (`}`) or its fields.
    let fields = rest.get(1..).unwrap_or_default();
    if fields != b"}" {
        out.push(b',');
    }
    out.extend_from_slice(fields);
    Ok(out)
}

/// Writes `elements` comma-separated.
pub(crate) fn push_joined<'e>(out: &mut Vec<u8>, elements: impl IntoIterator<Item = &'e str>) {
    for (i, element) in elements.into_iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(element.as_bytes());
    }
}

/// `value` as raw JSON, to keep.
pub(crate) fn raw(value: &impl serde::Serialize) -> Result<Box<RawValue>, ModelError> {
    serde_json::value::to_raw_value(value).map_err(writing_error)
}

/// Each of `values` as raw JSON.
pub(crate) fn raw_all(values: &[impl serde::Serialize]) -> Result<Vec<Box<RawValue>>, ModelError> {
    values.iter().map(raw).collect()
}

/// A prompt that could not be written as JSON (a failure of ours, not the provider's).
pub(crate) fn writing_error(e: serde_json::Error) -> ModelError {
    ModelError::new(agentplane_schema::api::ChatErrorKind::Internal, format!("writing the prompt: {e}"))
}

#[cfg(test)]
mod tests {

    use super::*;

    fn written(text: &str) -> Result<Written, ModelError> {
        Ok(vec![raw(&text)?].into())
    }

    #[test]
    fn a_message_is_written_once_and_a_new_one_never_gets_an_old_ones_text() {
        let fragments = Fragments::default();
        let first = Arc::new(vec![Part::text("one")]);
        let calls = std::cell::Cell::new(0);
        let write = |text: &str| {
            calls.set(calls.get() + 1);
            written(text)
        };
        assert_eq!(fragments.get_or_write("d", &first, || write("one")).expect("first")[0].get(), "\"one\"");
        assert_eq!(fragments.get_or_write("d", &first, || write("again")).expect("kept")[0].get(), "\"one\"");
        assert_eq!(calls.get(), 1);
        // Another dialect writes its own.
        assert_eq!(fragments.get_or_write("e", &first, || write("other")).expect("other")[0].get(), "\"other\"");

        // Parts made after the first are dropped never share its address while its entry lives.
        drop(first);
        for i in 0..100 {
            let text = format!("new {i}");
            let parts = Arc::new(vec![Part::text(&text)]);
            let got = fragments.get_or_write("d", &parts, || written(&text)).expect("new");
            assert_eq!(got[0].get(), format!("\"{text}\""));
        }
    }

    fn message(role: Role, text: &str) -> PromptMessage {
        PromptMessage { role, parts: Arc::new(vec![Part::text(text)]) }
    }

    /// Pushes `messages` as their text, one element each.
    fn push_all(prefix: &mut SentPrefix, messages: &[PromptMessage]) {
        for m in messages {
            prefix.push(m, &[raw(&m.parts[0]).expect("raw")]);
        }
    }

    #[test]
    fn a_prefix_is_reused_up_to_where_the_messages_part() {
        let history: Vec<PromptMessage> = ["one", "two", "three"].iter().map(|t| message(Role::User, t)).collect();
        let mut prefix = SentPrefix::default();
        assert_eq!(prefix.reuse("d", &history), 0);
        push_all(&mut prefix, &history);
        let all = prefix.text().to_owned();

        // The next request: the same messages and one more.
        let mut next = history.clone();
        next.push(message(Role::Assistant, "four"));
        assert_eq!(prefix.reuse("d", &next), 3);
        assert_eq!(prefix.text(), all);

        // A summary made anew with the same text still matches; a role or text that differs
        // does not, and what came after it is dropped.
        let mut rebuilt = next.clone();
        rebuilt[0] = message(Role::User, "one");
        assert_eq!(prefix.reuse("d", &rebuilt), 3);
        let mut changed = rebuilt.clone();
        changed[1] = message(Role::Assistant, "two");
        assert_eq!(prefix.reuse("d", &changed), 1);
        assert_eq!(prefix.text(), raw(&history[0].parts[0]).expect("raw").get());
        push_all(&mut prefix, &changed[1..]);
        assert_eq!(prefix.reuse("d", &changed), 4);

        // Another dialect starts over; so does a history that shares nothing.
        assert_eq!(prefix.reuse("e", &changed), 0);
        assert_eq!(prefix.text(), "");
        push_all(&mut prefix, &changed);
        assert_eq!(prefix.reuse("e", &[message(Role::User, "other")]), 0);
        assert_eq!(prefix.text(), "");
    }

    #[test]
    fn a_prefix_cut_short_gives_back_its_buffer() {
        let long = "x".repeat(1 << 20);
        let history = [message(Role::User, "one"), message(Role::Assistant, &long)];
        let mut prefix = SentPrefix::default();
        prefix.reuse("d", &history);
        push_all(&mut prefix, &history);
        assert!(prefix.text.capacity() >= 1 << 20);
        // A summary replaced the long message.
        assert_eq!(prefix.reuse("d", &[history[0].clone(), message(Role::User, "summary")]), 1);
        assert!(prefix.text.capacity() < 64 << 10, "{} bytes kept", prefix.text.capacity());
        assert_eq!(prefix.text(), raw(&history[0].parts[0]).expect("raw").get());
    }

    #[test]
    fn a_message_written_as_nothing_keeps_its_place() {
        let history = [message(Role::User, "one"), message(Role::Assistant, ""), message(Role::User, "three")];
        let mut prefix = SentPrefix::default();
        prefix.reuse("d", &history);
        prefix.push(&history[0], &[raw(&"one").expect("raw")]);
        prefix.push(&history[1], &[]);
        prefix.push(&history[2], &[raw(&"three").expect("raw")]);
        assert_eq!(prefix.text(), r#""one","three""#);
        assert_eq!(prefix.reuse("d", &history[..2]), 2);
        assert_eq!(prefix.text(), r#""one""#);
        prefix.push(&history[2], &[raw(&"three").expect("raw")]);
        assert_eq!(prefix.text(), r#""one","three""#);
    }

    #[test]
    fn entries_of_dropped_messages_are_swept() {
        let fragments = Fragments::default();
        let kept: Vec<Arc<Vec<Part>>> = (0..10).map(|i| Arc::new(vec![Part::text(format!("{i}"))])).collect();
        for parts in &kept {
            fragments.get_or_write("d", parts, || written("x")).expect("write");
        }
        for i in 0..3 * MIN_SWEEP {
            let parts = Arc::new(vec![Part::text(format!("gone {i}"))]);
            fragments.get_or_write("d", &parts, || written("y")).expect("write");
        }
        assert!(fragments.len() <= 2 * MIN_SWEEP + 10, "{} entries", fragments.len());
        for parts in &kept {
            let got = fragments.get_or_write("d", parts, || written("rewritten")).expect("kept");
            assert_eq!(got[0].get(), "\"x\"", "a live message's entry survives the sweeps");
        }
    }
}
