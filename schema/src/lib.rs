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
    uuid::Uuid::now_v7().to_string()
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
