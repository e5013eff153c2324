//! Tool transports: how a tool request reaches the relay of its workspace.
//!
//! - [`inprocess`]: the embedded default; relays run inside this process.
//! - [`nats`]: relays anywhere, reached over NATS ([`routes`] hands their answers to the calls).

pub mod inprocess;
pub mod nats;
mod routes;
