//! agentplane's workspace worker: runs the workspace tools (`read_file`, `write_file`,
//! `edit_files`, `execute`, `process_output`, `process_kill`) confined beneath a workspace root.
//!
//! Start reading at [`Relay`]: [`Relay::handle`] parses a [`ToolRequest`] and dispatches it. The
//! tools know no transport — the orchestrator calls [`Relay`] in-process (embedded mode), and the
//! `agentplane-relay` binary serves the same type over NATS with [`worker::run`].
//! - `worker`: the NATS side — connection, request loop, output streaming, results, shutdown;
//! - `journal`: the on-disk record of calls that makes a repeated request harmless;
//! - `path`: confinement — every path is resolved beneath the root, symlinks included (SPEC §8);
//! - `read`, `write`, `edit`: the file tools (`write` also holds the atomic replace);
//! - `execute`: shell commands in their own process group, with timeout and cancellation;
//! - `process`: background commands and their output buffers;
//! - `capture`: capped, UTF-8-safe text from process output;
//! - `signal`: the one libc call (killing a process group);
//! - `error`: the error a call ends with, worded for the model.

mod capture;
mod edit;
mod error;
mod execute;
mod journal;
mod path;
mod process;
mod read;
mod signal;
pub mod worker;
mod write;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::de::DeserializeOwned;
use tokio::sync::mpsc::UnboundedSender;

use agentplane_schema::tool::{
    EditFilesArgs, ExecuteArgs, ProcessArgs, ReadFileArgs, ToolLimits, ToolRequest, ToolResult, WORKSPACE_TOOLS,
    WriteFileArgs,
};

use crate::error::ToolError;
use crate::execute::RunningCalls;
use crate::path::Workspace;
use crate::process::Processes;

/// Executes workspace tools beneath one root. Cheap to clone; clones share running and
/// background processes. When the last clone is dropped, background processes are killed.
#[derive(Clone)]
pub struct Relay {
    inner: Arc<Inner>,
}

struct Inner {
    workspace: Workspace,
    limits: ToolLimits,
    running: RunningCalls,
    processes: Processes,
    /// Serializes `write_file` and `edit_files` so two parallel calls editing one file cannot
    /// lose each other's change (each reads, then replaces the whole file). Held on the blocking
    /// thread that does the work.
    writes: std::sync::Mutex<()>,
}

/// A request for a tool that only touches files, from [`Relay::file_tool`].
pub struct FileToolCall(Result<FileTool, ToolError>);

/// A tool that only touches files, with its arguments: it runs from start to end on one
/// blocking thread.
enum FileTool {
    Read(ReadFileArgs),
    Write(WriteFileArgs),
    Edit(EditFilesArgs),
}

impl FileTool {
    /// `None` when the request is for another kind of tool.
    fn parse(req: &ToolRequest) -> Option<Result<FileTool, ToolError>> {
        Some(match req.name.as_str() {
            "read_file" => parse("read_file", &req.args).map(FileTool::Read),
            "write_file" => parse("write_file", &req.args).map(FileTool::Write),
            "edit_files" => parse("edit_files", &req.args).map(FileTool::Edit),
            _ => return None,
        })
    }
}

impl Inner {
    /// Blocks: call it from a blocking thread.
    fn run_file_tool(&self, tool: FileTool) -> Result<String, ToolError> {
        match tool {
            FileTool::Read(args) => read::read_file(&self.workspace, &self.limits, &args),
            FileTool::Write(args) => {
                let _writing = self.writes.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                write::write_file(&self.workspace, &args)
            }
            FileTool::Edit(args) => {
                let _writing = self.writes.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                edit::edit_files(&self.workspace, &args)
            }
        }
    }
}

impl Relay {
    /// Opens the workspace at `root`, creating the directory if it is missing.
    pub fn new(root: impl Into<PathBuf>, limits: ToolLimits) -> std::io::Result<Relay> {
        let workspace = Workspace::open(root.into())?;
        Ok(Relay {
            inner: Arc::new(Inner {
                workspace,
                limits,
                running: RunningCalls::default(),
                processes: Processes::default(),
                writes: std::sync::Mutex::new(()),
            }),
        })
    }

    /// The workspace root, canonicalized (absolute, without symlinks).
    pub fn root(&self) -> &Path {
        self.inner.workspace.root()
    }

    /// Runs one tool request. Never panics on bad input: bad arguments, refused paths and
    /// failures become a result with `is_error: true` and a message for the model. A foreground
    /// `execute` sends its output to `output` piece by piece as it arrives; dropping the returned
    /// future kills the command's process group.
    pub async fn handle(&self, req: &ToolRequest, output: Option<UnboundedSender<String>>) -> ToolResult {
        result_of(req, self.dispatch(req, output).await)
    }

    /// The request's tool when it only touches files (`read_file`, `write_file`, `edit_files`),
    /// its arguments read; `None` for the other tools. [`Relay::run_file_tool`] runs it.
    pub fn file_tool(req: &ToolRequest) -> Option<FileToolCall> {
        FileTool::parse(req).map(FileToolCall)
    }

    /// Runs a file tool on the calling thread, which it blocks: for a caller already on a
    /// blocking thread, which can then do the rest of the call's blocking work (the relay's
    /// journal) in the same trip.
    pub fn run_file_tool(&self, req: &ToolRequest, FileToolCall(tool): FileToolCall) -> ToolResult {
        let text = tool.and_then(|tool| self.inner.run_file_tool(tool));
        result_of(req, text.map(|text| ToolResult::ok(&req.call_id, text)))
    }

    /// Kills the process group of the running foreground `execute` with this call id (its
    /// [`handle`](Relay::handle) then returns an "interrupted" error); no-op otherwise.
    pub fn cancel(&self, call_id: &str) {
        self.inner.running.cancel(call_id);
    }

    async fn dispatch(
        &self,
        req: &ToolRequest,
        output: Option<UnboundedSender<String>>,
    ) -> Result<ToolResult, ToolError> {
        let inner = &self.inner;
        let call_id = req.call_id.as_str();
        if let Some(tool) = FileTool::parse(req) {
            let tool = tool?;
            // The blocking work finishes even if this future is dropped.
            let text = self.blocking(move |inner| inner.run_file_tool(tool)).await?;
            return Ok(ToolResult::ok(call_id, text));
        }
        match req.name.as_str() {
            "execute" => {
                let args: ExecuteArgs = parse("execute", &req.args)?;
                if args.background {
                    inner.processes.start(&inner.workspace, &inner.limits, call_id, &args)
                } else {
                    execute::run(&inner.workspace, &inner.limits, &inner.running, call_id, &args, output).await
                }
            }
            "process_output" => inner.processes.output(call_id, &parse("process_output", &req.args)?),
            "process_kill" => {
                let args: ProcessArgs = parse("process_kill", &req.args)?;
                inner.processes.kill(call_id, &args).await
            }
            other => Err(ToolError::Rejected(format!(
                "unknown tool {other}; this workspace offers {}",
                WORKSPACE_TOOLS.join(", ")
            ))),
        }
    }

    /// Whether running the tool `name` changes anything. A call that does not (`read_file`) may
    /// run again after a restart without harm, so the journal need not record it durably.
    pub fn has_effects(name: &str) -> bool {
        name != "read_file"
    }

    /// Runs blocking filesystem work off the async threads.
    async fn blocking<T: Send + 'static>(
        &self,
        work: impl FnOnce(&Inner) -> Result<T, ToolError> + Send + 'static,
    ) -> Result<T, ToolError> {
        let inner = Arc::clone(&self.inner);
        tokio::task::spawn_blocking(move || work(&inner))
            .await
            .map_err(|err| ToolError::Rejected(format!("internal error while running the tool: {err}")))?
    }
}

/// A call's result: a failure becomes an error result worded for the model.
fn result_of(req: &ToolRequest, result: Result<ToolResult, ToolError>) -> ToolResult {
    result.unwrap_or_else(|err| {
        tracing::debug!(call_id = %req.call_id, tool = %req.name, %err, "tool call failed");
        ToolResult::error(&req.call_id, err.to_string())
    })
}

fn parse<T: DeserializeOwned>(tool: &'static str, args: &serde_json::Value) -> Result<T, ToolError> {
    T::deserialize(args).map_err(|err| ToolError::BadArgs { tool, reason: err.to_string() })
}

#[cfg(test)]
pub(crate) mod testing {
    //! Helpers shared by the modules' tests.

    use std::time::Duration;

    use agentplane_schema::tool::{ToolLimits, ToolRequest, ToolResult};

    use crate::Relay;

    pub(crate) fn relay() -> (tempfile::TempDir, Relay) {
        let tmp = tempfile::tempdir().expect("tempdir");
        let relay = Relay::new(tmp.path().join("ws"), ToolLimits::default()).expect("relay");
        (tmp, relay)
    }

    pub(crate) async fn call(relay: &Relay, name: &str, args: serde_json::Value) -> ToolResult {
        let request = ToolRequest {
            call_id: format!("call-{name}"),
            chat_id: "chat".into(),
            user_id: "user".into(),
            name: name.into(),
            args,
        };
        relay.handle(&request, None).await
    }

    /// Waits for a command to write its pid (`echo $! > file`) under the root.
    pub(crate) async fn read_pid(relay: &Relay, file: &str) -> u32 {
        let path = relay.root().join(file);
        for _ in 0..500 {
            if let Ok(text) = std::fs::read_to_string(&path)
                && let Some(pid) = text.strip_suffix('\n').and_then(|pid| pid.parse().ok())
            {
                return pid;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("no pid in {file}");
    }

    /// Whether `pid` runs. A zombie counts as gone: it has been killed and only waits for a reaper
    /// (which, in a container whose init does not reap, may never come).
    pub(crate) fn is_alive(pid: u32) -> bool {
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Ok(stat) => {
                let state = stat.rsplit_once(") ").and_then(|(_, rest)| rest.chars().next());
                !matches!(state, Some('Z' | 'X') | None)
            }
            Err(_) => false,
        }
    }

    pub(crate) async fn wait_gone(pid: u32) -> bool {
        for _ in 0..300 {
            if !is_alive(pid) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::testing::{call, relay};

    #[test]
    fn relay_is_shareable_across_tasks() {
        fn assert_send_sync<T: Send + Sync + Clone + 'static>() {}
        assert_send_sync::<Relay>();
    }

    #[tokio::test]
    async fn new_creates_the_root() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let relay = Relay::new(tmp.path().join("a/b"), ToolLimits::default()).expect("relay");
        assert!(relay.root().is_dir());
        assert!(relay.root().is_absolute());
    }

    #[tokio::test]
    async fn bad_arguments_name_the_problem() {
        let (_tmp, relay) = relay();
        let missing = call(&relay, "read_file", json!({})).await;
        assert!(missing.is_error);
        assert_eq!(missing.output, "invalid arguments for read_file: missing field `path`");
        let wrong = call(&relay, "execute", json!({"command": 5})).await;
        assert!(
            wrong.output.starts_with("invalid arguments for execute: invalid type: integer `5`"),
            "{}",
            wrong.output
        );
        let unknown = call(&relay, "write_file", json!({"path": "a", "content": "", "mode": 1})).await;
        assert!(unknown.output.contains("unknown field `mode`"), "{}", unknown.output);
        let null = call(&relay, "edit_files", serde_json::Value::Null).await;
        assert!(null.is_error);
    }

    #[tokio::test]
    async fn unknown_tools_are_errors() {
        let (_tmp, relay) = relay();
        let result = call(&relay, "rm_rf", json!({})).await;
        assert!(result.is_error);
        assert!(result.output.starts_with("unknown tool rm_rf; this workspace offers read_file"), "{}", result.output);
        assert_eq!(result.call_id, "call-rm_rf");
    }
}
