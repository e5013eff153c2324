//! agentplane's shared vocabulary.
//!
//! Everything that crosses a process or crate boundary is declared once here and used by the
//! server, the relay, the CLI and the tests:
//! - [`message`]: chat messages and their parts;
//! - [`api`]: REST request and response bodies, and the error body;
//! - [`event`]: WebSocket stream events (durable ones carry a per-chat `seq`);
//! - [`tool`]: the tool protocol between the agent and a workspace relay;
//! - `db` (feature `db`): sea-orm entities and migrations, portable across SQLite and PostgreSQL.

pub mod api;
pub mod event;
pub mod message;
pub mod nats;
pub mod tool;

#[cfg(feature = "db")]
pub mod db;

/// New time-ordered identifier (UUID v7 text), used for every row id.
pub fn new_id() -> String {
    uuid_v7()
}

fn uuid_v7() -> String {
    // Kept local so the wire crate does not need the uuid crate's serde features.
    use std::time::{SystemTime, UNIX_EPOCH};
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    let millis = now.as_millis() as u64;
    let mut rand_bytes = [0u8; 10];
    fill_random(&mut rand_bytes);
    let mut b = [0u8; 16];
    b[..6].copy_from_slice(&millis.to_be_bytes()[2..]);
    b[6..].copy_from_slice(&rand_bytes);
    b[6] = (b[6] & 0x0f) | 0x70;
    b[8] = (b[8] & 0x3f) | 0x80;
    format!(
        "{:02x}{:02x}{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}{:02x}{:02x}{:02x}{:02x}",
        b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7], b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15]
    )
}

fn fill_random(buf: &mut [u8]) {
    use std::collections::hash_map::RandomState;
    use std::hash::{BuildHasher, Hasher};
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    for chunk in buf.chunks_mut(8) {
        let mut h = RandomState::new().build_hasher();
        h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
        let v = h.finish().to_le_bytes();
        chunk.copy_from_slice(&v[..chunk.len()]);
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn ids_are_unique_and_time_ordered() {
        let a = super::new_id();
        std::thread::sleep(std::time::Duration::from_millis(2));
        let b = super::new_id();
        assert_ne!(a, b);
        assert!(a < b, "{a} < {b}");
        assert_eq!(a.len(), 36);
        assert_eq!(&a[14..15], "7");
    }
}
