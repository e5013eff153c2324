//! The error a tool call ends with. Its text is what the model reads, so every variant says what
//! went wrong in terms of the request the model made.

use std::io;

#[derive(Debug, thiserror::Error)]
pub(crate) enum ToolError {
    /// The arguments do not fit the tool's schema.
    #[error("invalid arguments for {tool}: {reason}")]
    BadArgs { tool: &'static str, reason: String },
    /// A path (or a symlink on the way) leads outside the workspace root.
    #[error("path escapes the workspace: {0}")]
    Escape(String),
    /// A well-formed request that cannot be carried out (ambiguous edit, directory given, …).
    #[error("{0}")]
    Rejected(String),
    #[error("{context}: {}", describe(source))]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
}

impl ToolError {
    pub(crate) fn io(context: impl Into<String>, source: io::Error) -> Self {
        ToolError::Io { context: context.into(), source }
    }
}

/// The OS text for the common cases reads better without the "(os error 2)" suffix.
fn describe(err: &io::Error) -> String {
    match err.kind() {
        io::ErrorKind::NotFound => "no such file or directory".to_owned(),
        io::ErrorKind::PermissionDenied => format!("permission denied ({err})"),
        io::ErrorKind::NotADirectory => "a component of the path is not a directory".to_owned(),
        io::ErrorKind::IsADirectory => "is a directory".to_owned(),
        _ => err.to_string(),
    }
}
