//! [`Recent`]: rows read from the database, reused for a short while. For what is read far more
//! often than it changes (every step resolves its model, every request its token).

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// Values by key, each reused for `ttl` after it was read; [`Recent::forget_all`] empties it when
/// this process changes what they were read from. `ttl` bounds how long a change made elsewhere
/// (another replica, an operator's SQL) goes unseen.
pub(crate) struct Recent<K, V> {
    ttl: Duration,
    /// Entries at most; past it, expired ones are swept, and if none were, all go.
    capacity: usize,
    inner: Mutex<Inner<K, V>>,
}

struct Inner<K, V> {
    entries: HashMap<K, (Instant, V)>,
    /// Bumped by every [`Recent::forget_all`]: a read that began before a change does not store
    /// its (old) result after it.
    generation: u64,
}

/// A miss: what [`Recent::put`] needs to store the value read now.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Miss {
    generation: u64,
}

impl<K: Eq + Hash, V: Clone> Recent<K, V> {
    pub(crate) fn new(ttl: Duration, capacity: usize) -> Self {
        Recent { ttl, capacity, inner: Mutex::new(Inner { entries: HashMap::new(), generation: 0 }) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner<K, V>> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The value read for `key` less than `ttl` ago, or a [`Miss`] to store a fresh read with.
    pub(crate) fn get(&self, key: &K) -> Result<V, Miss> {
        let inner = self.lock();
        match inner.entries.get(key) {
            Some((at, value)) if at.elapsed() < self.ttl => Ok(value.clone()),
            _ => Err(Miss { generation: inner.generation }),
        }
    }

    /// Stores what was read after `miss`, unless something changed since.
    pub(crate) fn put(&self, miss: Miss, key: K, value: V) {
        let mut inner = self.lock();
        if inner.generation != miss.generation {
            return;
        }
        if inner.entries.len() >= self.capacity {
            let ttl = self.ttl;
            inner.entries.retain(|_, (at, _)| at.elapsed() < ttl);
            if inner.entries.len() >= self.capacity {
                inner.entries.clear();
            }
        }
        inner.entries.insert(key, (Instant::now(), value));
    }

    /// Forgets every value; called after this process changed the rows they came from.
    pub(crate) fn forget_all(&self) {
        let mut inner = self.lock();
        inner.entries.clear();
        inner.generation += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_value_is_reused_until_it_expires() {
        let recent = Recent::new(Duration::from_secs(60), 8);
        let miss = recent.get(&"a").expect_err("empty");
        recent.put(miss, "a", 1);
        assert_eq!(recent.get(&"a").ok(), Some(1));
        let expired = Recent::new(Duration::ZERO, 8);
        let miss = expired.get(&"a").expect_err("empty");
        expired.put(miss, "a", 1);
        assert!(expired.get(&"a").is_err(), "older than its ttl");
    }

    #[test]
    fn a_read_from_before_a_change_is_not_stored() {
        let recent = Recent::new(Duration::from_secs(60), 8);
        let before = recent.get(&"a").expect_err("empty");
        recent.forget_all();
        recent.put(before, "a", 1);
        assert!(recent.get(&"a").is_err(), "the stale read was dropped");
        let after = recent.get(&"a").expect_err("still empty");
        recent.put(after, "a", 2);
        assert_eq!(recent.get(&"a").ok(), Some(2));
    }

    #[test]
    fn it_never_holds_more_than_its_capacity() {
        let recent = Recent::new(Duration::from_secs(60), 4);
        for key in 0..10 {
            let miss = recent.get(&key).expect_err("new key");
            recent.put(miss, key, key);
            assert!(recent.lock().entries.len() <= 4);
        }
        assert_eq!(recent.get(&9).ok(), Some(9), "the newest is kept");
    }
}
