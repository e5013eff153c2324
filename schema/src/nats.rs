//! The NATS protocol between the orchestrator and workspace relays.
//!
//! Subjects (prefix configurable, default `ap`):
//!
//! | subject | publisher → listener | payload |
//! |---|---|---|
//! | `ap.ws.<ws>.req` | orchestrator → relay (queue group [`RELAY_QUEUE`]) | [`ToolRequest`](crate::tool::ToolRequest) JSON; headers [`HEADER_CALL_ID`], [`HEADER_CHAT_ID`], [`HEADER_USER_ID`]; the relay answers the request's reply subject with [`ACK`] once it has taken the call |
//! | `ap.ws.<ws>.out.<call>` | relay → orchestrator | a piece of `execute` output (UTF-8 text) |
//! | `ap.ws.<ws>.res.<call>` | relay → JetStream stream [`RESULTS_STREAM`] | [`ToolResult`](crate::tool::ToolResult) JSON, header `Nats-Msg-Id: <call>` |
//! | `ap.ws.<ws>.cancel` | orchestrator → relay | the call id to stop |
//! | `ap.ws.<ws>.hello` | relay → orchestrator | [`Hello`] JSON, at start and every [`HELLO_INTERVAL_SECONDS`] |
//!
//! Call ids on the wire are agentplane's own (UUID text), never a provider's: they must be
//! single subject tokens. Core NATS is at most once; the results stream and the relay's journal
//! make a call's outcome findable and a repeated request harmless.

use serde::{Deserialize, Serialize};

pub const DEFAULT_PREFIX: &str = "ap";
pub const RELAY_QUEUE: &str = "relay";
pub const RESULTS_STREAM: &str = "AP_RESULTS";
pub const HEADER_CALL_ID: &str = "Ap-Call-Id";
pub const HEADER_CHAT_ID: &str = "Ap-Chat-Id";
pub const HEADER_USER_ID: &str = "Ap-User-Id";
pub const ACK: &[u8] = b"ack";
pub const HELLO_INTERVAL_SECONDS: u64 = 5;

/// Subject names under one prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subjects {
    prefix: String,
}

impl Default for Subjects {
    fn default() -> Self {
        Subjects::new(DEFAULT_PREFIX)
    }
}

impl Subjects {
    pub fn new(prefix: impl Into<String>) -> Self {
        Subjects { prefix: prefix.into() }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Everything of one workspace: `ap.ws.<ws>.>`.
    pub fn workspace_all(&self, ws: &str) -> String {
        format!("{}.ws.{ws}.>", self.prefix)
    }

    pub fn request(&self, ws: &str) -> String {
        format!("{}.ws.{ws}.req", self.prefix)
    }

    pub fn output(&self, ws: &str, call: &str) -> String {
        format!("{}.ws.{ws}.out.{call}", self.prefix)
    }

    pub fn result(&self, ws: &str, call: &str) -> String {
        format!("{}.ws.{ws}.res.{call}", self.prefix)
    }

    /// Every call's output and result in one workspace (`ap.ws.<ws>.*.*`): one subscription gets
    /// each call's in the order the relay published them; the last token names the call.
    pub fn workspace_updates(&self, ws: &str) -> String {
        format!("{}.ws.{ws}.*.*", self.prefix)
    }

    /// What the results stream captures: `ap.ws.*.res.*`.
    pub fn all_results(&self) -> String {
        format!("{}.ws.*.res.*", self.prefix)
    }

    pub fn cancel(&self, ws: &str) -> String {
        format!("{}.ws.{ws}.cancel", self.prefix)
    }

    pub fn hello(&self, ws: &str) -> String {
        format!("{}.ws.{ws}.hello", self.prefix)
    }

    /// Every relay's hello: `ap.ws.*.hello`.
    pub fn all_hellos(&self) -> String {
        format!("{}.ws.*.hello", self.prefix)
    }

    pub fn chat_events(&self, chat: &str) -> String {
        format!("{}.chat.{chat}.ev", self.prefix)
    }

    pub fn chat_commands(&self, chat: &str) -> String {
        format!("{}.chat.{chat}.cmd", self.prefix)
    }

    /// The inbox prefix of a workspace's relay connection (its credential allows only this one).
    pub fn relay_inbox_prefix(&self, ws: &str) -> String {
        format!("_INBOX_{ws}")
    }
}

/// Whether `s` can stand as one subject token (workspace ids, call ids).
pub fn is_token(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// A relay's readiness and heartbeat.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Hello {
    pub workspace_id: String,
    pub relay_version: String,
    /// Process start, RFC 3339.
    pub started_at: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_follow_the_documented_layout() {
        let s = Subjects::default();
        assert_eq!(s.request("w1"), "ap.ws.w1.req");
        assert_eq!(s.output("w1", "c1"), "ap.ws.w1.out.c1");
        assert_eq!(s.result("w1", "c1"), "ap.ws.w1.res.c1");
        assert_eq!(s.all_results(), "ap.ws.*.res.*");
        assert_eq!(s.workspace_all("w1"), "ap.ws.w1.>");
        assert_eq!(s.workspace_updates("w1"), "ap.ws.w1.*.*");
        assert!(is_token("01a2-b_c"));
        assert!(!is_token("a.b") && !is_token("a*") && !is_token("") && !is_token("a b"));
    }
}
