//! Byte streams from processes turned into text for the model: capped head-and-tail capture for
//! a finished command, a ring buffer for a background one, and chunking that never splits a
//! UTF-8 character between two pieces.

use std::collections::VecDeque;

/// Keeps the first and last bytes of a stream, up to a cap, and counts what falls in between.
/// The end of a long build log (the error) matters as much as its start (what ran).
pub(crate) struct HeadTail {
    head_cap: usize,
    tail_cap: usize,
    head: Vec<u8>,
    tail: VecDeque<u8>,
    total: usize,
}

impl HeadTail {
    pub(crate) fn new(cap: usize) -> HeadTail {
        let head_cap = cap / 2;
        HeadTail { head_cap, tail_cap: cap - head_cap, head: Vec::new(), tail: VecDeque::new(), total: 0 }
    }

    pub(crate) fn push(&mut self, bytes: &[u8]) {
        self.total += bytes.len();
        let to_head = bytes.len().min(self.head_cap - self.head.len());
        self.head.extend_from_slice(&bytes[..to_head]);
        let rest = &bytes[to_head..];
        if rest.len() >= self.tail_cap {
            self.tail.clear();
            self.tail.extend(&rest[rest.len() - self.tail_cap..]);
        } else {
            self.tail.extend(rest);
            let excess = self.tail.len().saturating_sub(self.tail_cap);
            self.tail.drain(..excess);
        }
    }

    /// The captured text, with `[… N bytes omitted …]` where the middle was dropped. Both cuts
    /// land on character boundaries; bytes of a character split by a cut count as omitted.
    pub(crate) fn render(&self) -> String {
        let tail: Vec<u8> = self.tail.iter().copied().collect();
        let omitted = self.total - self.head.len() - tail.len();
        if omitted == 0 {
            let mut all = self.head.clone();
            all.extend_from_slice(&tail);
            return String::from_utf8_lossy(&all).into_owned();
        }
        let head_end = self.head.len() - incomplete_suffix_len(&self.head);
        let tail_start = leading_continuation_len(&tail);
        let omitted = omitted + (self.head.len() - head_end) + tail_start;
        let head = String::from_utf8_lossy(&self.head[..head_end]);
        let tail = String::from_utf8_lossy(&tail[tail_start..]);
        let separator = if head.is_empty() || head.ends_with('\n') { "" } else { "\n" };
        format!("{head}{separator}[… {omitted} bytes omitted …]\n{tail}")
    }
}

/// Splits a byte stream into text pieces, holding back a character cut by a read boundary until
/// its remaining bytes arrive.
#[derive(Default)]
pub(crate) struct Utf8Pieces {
    pending: Vec<u8>,
}

impl Utf8Pieces {
    pub(crate) fn push(&mut self, bytes: &[u8]) -> String {
        self.pending.extend_from_slice(bytes);
        let complete = self.pending.len() - incomplete_suffix_len(&self.pending);
        let text = String::from_utf8_lossy(&self.pending[..complete]).into_owned();
        self.pending.drain(..complete);
        text
    }

    pub(crate) fn finish(&mut self) -> String {
        let text = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        text
    }
}

/// The last `cap` bytes of a background process's output, with a read position so each read
/// returns only what is new.
pub(crate) struct Ring {
    cap: usize,
    buf: VecDeque<u8>,
    /// Bytes ever pushed.
    total: usize,
    /// Position (in `total` terms) up to which output has been handed out.
    read: usize,
}

/// What [`Ring::take_unread`] hands out.
pub(crate) struct Unread {
    pub(crate) text: String,
    /// Bytes that were pushed out of the ring before anyone read them.
    pub(crate) dropped: usize,
}

impl Ring {
    pub(crate) fn new(cap: usize) -> Ring {
        Ring { cap, buf: VecDeque::new(), total: 0, read: 0 }
    }

    pub(crate) fn push(&mut self, bytes: &[u8]) {
        self.total += bytes.len();
        self.buf.extend(bytes);
        let excess = self.buf.len().saturating_sub(self.cap);
        self.buf.drain(..excess);
    }

    /// Output not handed out yet. Unless `finished`, a character whose bytes have not all arrived
    /// is held back for the next read.
    pub(crate) fn take_unread(&mut self, finished: bool) -> Unread {
        let start = self.total - self.buf.len();
        let from = self.read.max(start);
        let mut dropped = from - self.read;
        let unread: Vec<u8> = self.buf.iter().skip(from - start).copied().collect();
        let skip = if dropped > 0 { leading_continuation_len(&unread) } else { 0 };
        dropped += skip;
        let held = if finished { 0 } else { incomplete_suffix_len(&unread[skip..]) };
        let end = unread.len() - held;
        self.read = from + end;
        Unread { text: String::from_utf8_lossy(&unread[skip..end]).into_owned(), dropped }
    }
}

/// How many bytes at the end of `bytes` start a character that is not complete yet.
fn incomplete_suffix_len(bytes: &[u8]) -> usize {
    for back in 1..=bytes.len().min(4) {
        let byte = bytes[bytes.len() - back];
        if !is_continuation(byte) {
            let needed = match byte {
                0xF0.. => 4,
                0xE0.. => 3,
                0xC0.. => 2,
                _ => 1,
            };
            return if needed > back { back } else { 0 };
        }
    }
    0
}

/// How many bytes at the start of `bytes` belong to a character that began before it (at most 3).
fn leading_continuation_len(bytes: &[u8]) -> usize {
    bytes.iter().take(3).take_while(|byte| is_continuation(**byte)).count()
}

fn is_continuation(byte: u8) -> bool {
    byte & 0xC0 == 0x80
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn under_the_cap_everything_is_kept() {
        let mut capture = HeadTail::new(16);
        capture.push(b"hello ");
        capture.push("wörld".as_bytes());
        assert_eq!(capture.render(), "hello wörld");
    }

    #[test]
    fn over_the_cap_head_and_tail_are_kept() {
        let mut capture = HeadTail::new(10);
        for _ in 0..10 {
            capture.push(b"0123456789");
        }
        assert_eq!(capture.render(), "01234\n[… 90 bytes omitted …]\n56789");
    }

    #[test]
    fn cuts_land_on_character_boundaries() {
        // "é" is two bytes: the head cut (after 3 bytes) and the tail cut (last 3 bytes) both
        // fall inside one.
        let mut capture = HeadTail::new(6);
        capture.push("aaé".as_bytes());
        capture.push(b"xxxxxxxx");
        capture.push("ébb".as_bytes());
        let text = capture.render();
        assert_eq!(text, "aa\n[… 12 bytes omitted …]\nbb");
        // Same when the multibyte character arrives one byte per read.
        let mut capture = HeadTail::new(6);
        for byte in "aaéxxxxxxxxébb".as_bytes() {
            capture.push(&[*byte]);
        }
        assert_eq!(capture.render(), text);
    }

    #[test]
    fn cut_keeps_whole_character_when_it_fits() {
        let mut capture = HeadTail::new(8);
        capture.push("aé€".as_bytes()); // 1 + 2 + 3 bytes: head cap 4 ends inside "€"
        capture.push(&[b'x'; 20]);
        assert!(capture.render().starts_with("aé\n[… "), "{}", capture.render());
    }

    #[test]
    fn pieces_never_split_characters() {
        let mut pieces = Utf8Pieces::default();
        let bytes = "ab€".as_bytes();
        assert_eq!(pieces.push(&bytes[..3]), "ab");
        assert_eq!(pieces.push(&bytes[3..4]), "");
        assert_eq!(pieces.push(&bytes[4..]), "€");
        assert_eq!(pieces.push(&[0xE2]), "");
        assert_eq!(pieces.finish(), "\u{FFFD}");
    }

    #[test]
    fn ring_hands_out_only_new_output_and_counts_drops() {
        let mut ring = Ring::new(8);
        ring.push(b"abc");
        let first = ring.take_unread(false);
        assert_eq!((first.text.as_str(), first.dropped), ("abc", 0));
        assert_eq!(ring.take_unread(false).text, "");
        ring.push(b"0123456789");
        let second = ring.take_unread(false);
        assert_eq!((second.text.as_str(), second.dropped), ("23456789", 2));
        ring.push(&"é".as_bytes()[..1]);
        assert_eq!(ring.take_unread(false).text, "");
        ring.push(&"é".as_bytes()[1..]);
        assert_eq!(ring.take_unread(false).text, "é");
    }
}
