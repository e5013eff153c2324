//! Errors of chat operations, as callers of a [`ChatHandle`](crate::ChatHandle) see them.

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChatOpErrorKind {
    /// The request itself is wrong (e.g. an empty message).
    Invalid,
    /// The chat's actor could not be reached or could not load the chat.
    Unavailable,
    /// The database refused the change.
    Store,
    /// Not possible in the chat's current state (e.g. editing while a turn runs).
    Conflict,
    /// The message or queued message does not exist.
    NotFound,
}

#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct ChatOpError {
    pub kind: ChatOpErrorKind,
    pub message: String,
}

impl ChatOpError {
    pub fn invalid(message: impl Into<String>) -> Self {
        ChatOpError { kind: ChatOpErrorKind::Invalid, message: message.into() }
    }

    pub fn unavailable(message: impl Into<String>) -> Self {
        ChatOpError { kind: ChatOpErrorKind::Unavailable, message: message.into() }
    }

    pub fn conflict(message: impl Into<String>) -> Self {
        ChatOpError { kind: ChatOpErrorKind::Conflict, message: message.into() }
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        ChatOpError { kind: ChatOpErrorKind::NotFound, message: message.into() }
    }

    pub fn store(e: impl std::fmt::Display) -> Self {
        ChatOpError { kind: ChatOpErrorKind::Store, message: e.to_string() }
    }
}
