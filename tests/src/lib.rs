//! The agentplane test harness: real servers on free ports, typed clients, no mocks of our own
//! components.
//!
//! - [`scripted_llm`]: an OpenAI-compatible LLM server whose answers a test scripts (text, tool
//!   calls, errors, delays, hangs, resets), recording every request. Start here: almost every
//!   agent test runs the orchestrator against it.
//! - [`api`]: a typed client for the REST API (`/api/v1/...`), built on the `schema` types.
//! - [`ws`]: a client for a chat's WebSocket event stream, with waiting helpers.
//! - [`pg`]: a fresh PostgreSQL (or SQLite) database per test, dropped afterwards.
//! - [`error`]: the one error type, with the API's typed error body.
//! - [`aws`]: AWS event-stream frames and an independent SigV4 check, for the Bedrock dialect.
//!
//! The library does not link the orchestrator: it talks to it over HTTP and WebSocket only, so it
//! builds while the orchestrator changes and is shared with the load benchmarks. The integration
//! tests (one file per surface, under `tests/`) start the orchestrator themselves.

pub mod api;
pub mod aws;
pub mod error;
pub mod nats;
pub mod pg;
pub mod scripted_llm;
pub mod ws;

use std::sync::Once;

pub use api::ApiClient;
pub use error::{Error, Result};
pub use nats::NatsServer;
pub use pg::TestDatabase;
pub use scripted_llm::{RecordedRequest, Reply, ScriptedCall, ScriptedLlm};
pub use ws::EventStream;

/// Installs a tracing subscriber once per test binary: output goes through the test writer (so
/// it is shown only for failing tests), filtered by `RUST_LOG` (default `info`).
pub fn init_tracing() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let filter = tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
        // Another subscriber may already be installed by the binary under test; keep it.
        let _ = tracing_subscriber::fmt().with_env_filter(filter).with_test_writer().try_init();
    });
}

/// A port that was free a moment ago on 127.0.0.1. Prefer binding `:0` and passing the listener
/// on: another process may take this port before it is used.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("no free port on 127.0.0.1")
}
