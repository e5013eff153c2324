//! agentplane's orchestrator: one replica of the control plane.
//!
//! - [`server`]: assembles a replica (database, bootstrap, adapters, actors) and serves it;
//! - [`api`]: the HTTP and WebSocket API; [`auth`]: bearer tokens;
//! - [`store`]: the database adapter (the actors' `Store` port and the API's queries);
//! - [`providers`]: LLM provider clients, one module per wire dialect;
//! - [`transport`]: how tool requests reach relays; [`provisioners`]: how workspaces come to be;
//! - [`nats_auth`]: per-workspace NATS credentials; [`cli`]: the admin command-line client.
//!
//! The agent loop itself lives in `agentplane-actors`; this crate plugs the real world into its
//! ports. Start reading at [`server::prepare`].

pub mod api;
pub mod auth;
pub mod cli;
pub mod nats_auth;
pub mod providers;
pub mod provisioners;
pub mod secrets;
pub mod server;
pub mod state;
pub mod store;
pub mod transport;
