//! Parts of prompts already written as JSON. A conversation resends its whole history and the
//! same tool definitions with every step, and writing them again (escaping every string, turning
//! every tool call's arguments into a string) was most of the cost of a request body. A history
//! message's parts never change once made ([`Message::parts`] is shared, never edited in place),
//! nor do the tool definitions every request shares, so what a dialect writes for them is kept
//! and reused.
//!
//! An entry is found by the address of the shared value and holds a [`Weak`] to it: while the
//! entry exists the allocation cannot be reused, so an address never names two values, and
//! entries whose value is gone are dropped as the map grows.
//!
//! [`Message::parts`]: agentplane_schema::message::Message::parts

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::{Arc, Mutex, Weak};

use agentplane_actors::ports::ModelError;
use serde_json::value::RawValue;

/// What a dialect writes for one shared value: none, one or several elements of an array (its
/// messages for a prompt message, its tools for the tool definitions).
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
    /// What `dialect` writes for `shared` (a message's parts, the tool definitions): kept from
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

/// `value` as raw JSON, to keep.
pub(crate) fn raw(value: &impl serde::Serialize) -> Result<Box<RawValue>, ModelError> {
    serde_json::value::to_raw_value(value).map_err(|e| {
        ModelError::new(agentplane_schema::api::ChatErrorKind::Internal, format!("writing the prompt: {e}"))
    })
}

#[cfg(test)]
mod tests {
    use agentplane_schema::message::Part;

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
