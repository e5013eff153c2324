//! Tool transports: how a tool request reaches the relay of its workspace.
//!
//! - [`inprocess`]: the embedded default; relays run inside this process.

pub mod inprocess;
