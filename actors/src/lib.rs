//! agentplane's actor tree.
//!
//! - [`directory`]: one per replica; finds or starts the actor of a chat.
//! - [`chat`]: the chat actor, a serial state machine over one chat (queue, turns, interrupts).
//! - [`step`]: one step of the agent loop (model stream with retries, tool calls in parallel).
//! - [`tools`]: the tools the model sees and where each call goes.
//! - [`shared`]: what an actor shares with its running step; every durable change passes here.
//! - [`ports`]: the traits through which the actors reach the database, models, relays,
//!   provisioners and watchers. Nothing else here knows a concrete adapter.
//! - [`handle`]: [`ChatHandle`], the only way in from outside; actix types stay in this crate.
//!
//! Start reading at `chat/mod.rs`.

pub mod bus;
pub mod chat;
pub mod compaction;
pub mod deps;
pub mod directory;
pub mod error;
pub mod handle;
pub mod ports;
pub mod prompt;
pub mod shared;
pub mod step;
pub mod title;
pub mod tools;

pub use deps::Deps;
pub use directory::{ActorThreads, Directory};
pub use error::{ChatOpError, ChatOpErrorKind};
pub use handle::ChatHandle;
