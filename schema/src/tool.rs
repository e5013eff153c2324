//! The tool protocol between the agent and a workspace relay.
//!
//! A [`ToolRequest`] names one workspace tool and carries its JSON arguments as the model wrote
//! them; the relay parses them into the typed argument structs below and answers with one
//! [`ToolResult`]. The same types travel in-process (embedded mode) and over NATS.

use serde::{Deserialize, Serialize};

/// Tools a relay executes inside its workspace.
pub const WORKSPACE_TOOLS: &[&str] =
    &["read_file", "write_file", "edit_files", "execute", "process_output", "process_kill"];

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolRequest {
    /// Unique per tool call; a relay answers a repeated id with the recorded result.
    pub call_id: String,
    pub chat_id: String,
    /// The user the agent acts for.
    pub user_id: String,
    pub name: String,
    pub args: serde_json::Value,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolResult {
    pub call_id: String,
    /// What the model reads.
    pub output: String,
    pub is_error: bool,
    /// `execute`: the exit code (absent when killed by a signal or still running).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<u64>,
    /// `execute` with `background: true`: the id for `process_output` / `process_kill`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub process_id: Option<String>,
}

impl ToolResult {
    pub fn error(call_id: impl Into<String>, output: impl Into<String>) -> Self {
        ToolResult {
            call_id: call_id.into(),
            output: output.into(),
            is_error: true,
            exit_code: None,
            duration_ms: None,
            process_id: None,
        }
    }

    pub fn ok(call_id: impl Into<String>, output: impl Into<String>) -> Self {
        ToolResult { is_error: false, ..Self::error(call_id, output) }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReadFileArgs {
    pub path: String,
    /// 1-based first line.
    #[serde(default)]
    pub offset: Option<usize>,
    #[serde(default)]
    pub limit: Option<usize>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WriteFileArgs {
    pub path: String,
    pub content: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileEdit {
    pub path: String,
    pub old_text: String,
    pub new_text: String,
    #[serde(default)]
    pub replace_all: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EditFilesArgs {
    pub edits: Vec<FileEdit>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecuteArgs {
    pub command: String,
    #[serde(default)]
    pub timeout_seconds: Option<u64>,
    #[serde(default)]
    pub workdir: Option<String>,
    #[serde(default)]
    pub background: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProcessArgs {
    pub process_id: String,
}

/// Limits a relay applies; the orchestrator passes its `[tools]` settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ToolLimits {
    pub execute_default_timeout_seconds: u64,
    pub execute_max_timeout_seconds: u64,
    pub output_cap_bytes: usize,
    pub read_default_limit_lines: usize,
    pub read_max_line_chars: usize,
}

impl Default for ToolLimits {
    fn default() -> Self {
        ToolLimits {
            execute_default_timeout_seconds: 30,
            execute_max_timeout_seconds: 3600,
            output_cap_bytes: 32 * 1024,
            read_default_limit_lines: 2000,
            read_max_line_chars: 2000,
        }
    }
}
