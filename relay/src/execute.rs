//! `execute`: a shell command in the workspace, in its own process group.
//!
//! The group is the unit of control: a timeout, a [`cancel`](crate::Relay::cancel), dropping the
//! call's future, and the shell's own exit all kill the whole group, so nothing the command
//! started outlives it (use `background: true`, see [`crate::process`], for things that should).
//! Killing the group when the shell exits is also what keeps `sleep 100 &` from holding the
//! output pipe open and the call hanging.

use std::collections::HashMap;
use std::os::unix::process::ExitStatusExt as _;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio::io::AsyncReadExt as _;
use tokio::net::unix::pipe;
use tokio::process::{Child, Command};
use tokio::sync::mpsc::UnboundedSender;
use tokio_util::sync::CancellationToken;

use agentplane_schema::tool::{ExecuteArgs, ToolLimits, ToolResult};

use crate::capture::{HeadTail, Utf8Pieces};
use crate::error::ToolError;
use crate::path::Workspace;
use crate::signal::kill_group;

/// How long output already written to the pipe is still collected after the group was killed.
/// Killed processes close their ends at once; this only bounds the wait when something outside
/// the group (a `setsid` daemon) still holds the pipe.
const DRAIN_GRACE: Duration = Duration::from_millis(500);
const READ_CHUNK_BYTES: usize = 16 * 1024;
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// A process group, killed when this is dropped.
pub(crate) struct ProcessGroup {
    pgid: u32,
    emptied: AtomicBool,
}

impl ProcessGroup {
    fn new(pgid: u32) -> ProcessGroup {
        ProcessGroup { pgid, emptied: AtomicBool::new(false) }
    }

    pub(crate) fn id(&self) -> u32 {
        self.pgid
    }

    pub(crate) fn kill(&self) {
        if self.emptied.load(Ordering::Acquire) {
            return;
        }
        if let Err(err) = kill_group(self.pgid) {
            tracing::warn!(pgid = self.pgid, %err, "killing a process group failed");
        }
    }

    /// Records that the group was seen empty. From then on its id may be reused for an
    /// unrelated group (a later `execute`'s, say), so it is never signalled again.
    pub(crate) fn mark_emptied(&self) {
        self.emptied.store(true, Ordering::Release);
    }
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A started command: the shell, the read end of its merged stdout/stderr, and its group.
pub(crate) struct Spawned {
    pub(crate) child: Child,
    pub(crate) output: pipe::Receiver,
    pub(crate) group: ProcessGroup,
}

/// Starts `sh -c command` in `workdir` (beneath the root) with a minimal, non-interactive
/// environment: the relay's own variables (which may include credentials) are not passed on.
pub(crate) fn spawn(workspace: &Workspace, command: &str, workdir: Option<&str>) -> Result<Spawned, ToolError> {
    let cwd: PathBuf = match workdir {
        Some(workdir) => workspace.resolve_dir(workdir)?,
        None => workspace.root().to_path_buf(),
    };
    let failed = |err| ToolError::io("failed to start the command", err);
    // One pipe for both streams keeps stdout and stderr in the order the command wrote them.
    let (reader, writer) = std::io::pipe().map_err(failed)?;
    let stderr = writer.try_clone().map_err(failed)?;

    let mut shell = Command::new("sh");
    shell
        .arg("-c")
        .arg(command)
        .current_dir(&cwd)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_else(|| DEFAULT_PATH.into()))
        .env("HOME", workspace.root())
        .env("LANG", std::env::var_os("LANG").unwrap_or_else(|| "C.UTF-8".into()))
        .env("TERM", "dumb")
        .env("CI", "1")
        .env("DEBIAN_FRONTEND", "noninteractive")
        .env("PAGER", "cat")
        .env("GIT_PAGER", "cat")
        .env("GIT_TERMINAL_PROMPT", "0")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(writer)
        .stderr(stderr)
        .process_group(0)
        .kill_on_drop(true);
    let child = shell.spawn().map_err(failed)?;
    // The Command holds our copies of the write end; the pipe reaches EOF only once they close.
    drop(shell);
    let pgid =
        child.id().ok_or_else(|| ToolError::Rejected("failed to start the command: no process id".to_owned()))?;
    let group = ProcessGroup::new(pgid);
    let output = pipe::Receiver::from_owned_fd(reader.into()).map_err(failed)?;
    Ok(Spawned { child, output, group })
}

/// Foreground `execute` calls in flight, by call id, so [`RunningCalls::cancel`] can reach them.
#[derive(Default)]
pub(crate) struct RunningCalls {
    calls: Mutex<HashMap<String, RunningCall>>,
    next_serial: AtomicU64,
}

struct RunningCall {
    /// Tells a re-used call id's registration from an earlier one's.
    serial: u64,
    pgid: u32,
    cancelled: CancellationToken,
}

/// Removes its call from [`RunningCalls`] when the call ends (or its future is dropped).
struct Registration<'a> {
    calls: &'a RunningCalls,
    call_id: String,
    serial: u64,
    cancelled: CancellationToken,
}

impl RunningCalls {
    fn register(&self, call_id: &str, pgid: u32) -> Registration<'_> {
        let serial = self.next_serial.fetch_add(1, Ordering::Relaxed);
        let cancelled = CancellationToken::new();
        let call = RunningCall { serial, pgid, cancelled: cancelled.clone() };
        self.calls.lock().unwrap_or_else(PoisonError::into_inner).insert(call_id.to_owned(), call);
        Registration { calls: self, call_id: call_id.to_owned(), serial, cancelled }
    }

    /// Kills the group of the running call `call_id` and marks it cancelled; no-op otherwise.
    pub(crate) fn cancel(&self, call_id: &str) {
        let calls = self.calls.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(call) = calls.get(call_id) {
            call.cancelled.cancel();
            // Killed here too, not only by the call's own future, which may not be polled soon.
            if let Err(err) = kill_group(call.pgid) {
                tracing::warn!(call_id, %err, "killing a cancelled command failed");
            }
        }
    }
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        let mut calls = self.calls.calls.lock().unwrap_or_else(PoisonError::into_inner);
        if calls.get(&self.call_id).is_some_and(|call| call.serial == self.serial) {
            calls.remove(&self.call_id);
        }
    }
}

enum End {
    Exited(std::io::Result<ExitStatus>),
    TimedOut,
    Cancelled,
}

/// Runs a foreground command to its end and describes it for the model.
pub(crate) async fn run(
    workspace: &Workspace,
    limits: &ToolLimits,
    running: &RunningCalls,
    call_id: &str,
    args: &ExecuteArgs,
    output: Option<UnboundedSender<String>>,
) -> Result<ToolResult, ToolError> {
    let timeout_seconds = args
        .timeout_seconds
        .unwrap_or(limits.execute_default_timeout_seconds)
        .clamp(1, limits.execute_max_timeout_seconds.max(1));
    let started = Instant::now();
    let Spawned { mut child, output: mut reader, group } = spawn(workspace, &args.command, args.workdir.as_deref())?;
    let registration = running.register(call_id, group.id());
    tracing::debug!(call_id, pgid = group.id(), timeout_seconds, "execute started");

    let mut sink = Sink { captured: HeadTail::new(limits.output_cap_bytes), pieces: Utf8Pieces::default(), output };
    let mut chunk = vec![0u8; READ_CHUNK_BYTES];
    let mut eof = false;
    let deadline = tokio::time::sleep(Duration::from_secs(timeout_seconds));
    tokio::pin!(deadline);
    let end = loop {
        // In this order: a cancel marks the call before it kills the group, so when the shell's
        // death and the cancel are both seen at once, the call was interrupted, not "killed by
        // signal 9" (an unbiased select picked either, and under load the model was told the
        // command died by itself). An exit seen with an expired deadline is a real exit: the
        // group is only killed after the loop.
        tokio::select! {
            biased;
            () = registration.cancelled.cancelled() => break End::Cancelled,
            status = child.wait() => break End::Exited(status),
            () = &mut deadline => break End::TimedOut,
            read = reader.read(&mut chunk), if !eof => match read {
                Ok(0) | Err(_) => eof = true,
                Ok(n) => sink.push(&chunk[..n]),
            },
        }
    };

    // Whatever the end, nothing of the command may outlive the call; and once the group is
    // gone, cancel() must not signal its id, which may be reused.
    drop(group);
    drop(registration);
    let drain_until = tokio::time::Instant::now() + DRAIN_GRACE;
    while !eof {
        match tokio::time::timeout_at(drain_until, reader.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => sink.push(&chunk[..n]),
            _ => eof = true,
        }
    }
    sink.finish();
    if !matches!(end, End::Exited(_)) {
        // Reap the killed shell now rather than leaving it to the runtime's orphan queue.
        let _ = tokio::time::timeout(DRAIN_GRACE, child.wait()).await;
    }

    let elapsed = started.elapsed();
    let seconds = elapsed.as_secs_f64();
    let mut text = sink.captured.render();
    if !text.is_empty() && !text.ends_with('\n') {
        text.push('\n');
    }
    let (status_line, is_error, exit_code) = match end {
        End::Exited(Ok(status)) => match (status.code(), status.signal()) {
            (Some(code), _) => (format!("exit code: {code}, {seconds:.2} s"), false, Some(code)),
            (None, Some(signal)) => (format!("killed by signal {signal}, {seconds:.2} s"), false, None),
            (None, None) => (format!("ended without an exit code, {seconds:.2} s"), false, None),
        },
        End::Exited(Err(err)) => (format!("failed waiting for the command: {err}"), true, None),
        End::TimedOut => {
            (format!("timed out after {timeout_seconds} s; the command and its children were killed"), true, None)
        }
        End::Cancelled => {
            (format!("interrupted after {seconds:.2} s; the command and its children were killed"), true, None)
        }
    };
    tracing::debug!(call_id, %status_line, "execute finished");
    text.push_str(&status_line);
    Ok(ToolResult {
        call_id: call_id.to_owned(),
        output: text,
        is_error,
        exit_code,
        duration_ms: Some(u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX)),
        process_id: None,
    })
}

/// Where a foreground command's output goes: the capped capture for the result, and the live
/// stream to the caller.
struct Sink {
    captured: HeadTail,
    pieces: Utf8Pieces,
    output: Option<UnboundedSender<String>>,
}

impl Sink {
    fn push(&mut self, bytes: &[u8]) {
        self.captured.push(bytes);
        if let Some(output) = &self.output {
            let piece = self.pieces.push(bytes);
            if !piece.is_empty() && output.send(piece).is_err() {
                // Nobody listens any more; the result still carries the output.
                self.output = None;
            }
        }
    }

    fn finish(&mut self) {
        if let Some(output) = &self.output {
            let piece = self.pieces.finish();
            if !piece.is_empty() {
                let _ = output.send(piece);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use serde_json::json;
    use tokio::sync::mpsc;

    use agentplane_schema::tool::{ToolLimits, ToolRequest};

    use crate::Relay;
    use crate::testing::{call, is_alive, read_pid, relay, wait_gone};

    #[tokio::test]
    async fn merges_output_and_reports_exit_code() {
        let (_tmp, relay) = relay();
        let result = call(&relay, "execute", json!({"command": "echo out; echo err >&2; echo out2"})).await;
        assert!(!result.is_error, "{}", result.output);
        assert_eq!(result.exit_code, Some(0));
        assert!(result.duration_ms.is_some());
        assert!(result.output.starts_with("out\nerr\nout2\nexit code: 0, "), "{}", result.output);
        assert!(result.output.ends_with(" s"), "{}", result.output);
    }

    #[tokio::test]
    async fn a_failing_command_is_not_a_tool_error() {
        let (_tmp, relay) = relay();
        let result = call(&relay, "execute", json!({"command": "echo nope; exit 3"})).await;
        assert!(!result.is_error);
        assert_eq!(result.exit_code, Some(3));
        assert!(result.output.starts_with("nope\nexit code: 3, "), "{}", result.output);
    }

    #[tokio::test]
    async fn output_is_streamed_while_it_runs() {
        let (_tmp, relay) = relay();
        let (tx, mut rx) = mpsc::unbounded_channel();
        let request = ToolRequest {
            call_id: "c".into(),
            chat_id: "chat".into(),
            user_id: "u".into(),
            name: "execute".into(),
            args: json!({"command": "printf 'a€'; sleep 0.2; printf b"}),
        };
        let result = relay.handle(&request, Some(tx)).await;
        assert!(!result.is_error);
        let mut streamed = String::new();
        while let Ok(piece) = rx.try_recv() {
            streamed.push_str(&piece);
        }
        assert_eq!(streamed, "a€b");
    }

    #[tokio::test]
    async fn runs_in_the_workspace_with_a_minimal_environment() {
        let (_tmp, relay) = relay();
        std::fs::create_dir(relay.root().join("sub")).expect("mkdir");
        let result =
            call(&relay, "execute", json!({"command": "pwd; cd; pwd; env | cut -d= -f1 | sort", "workdir": "sub"}))
                .await;
        let root = relay.root().display().to_string();
        let mut lines = result.output.lines();
        assert_eq!(lines.next(), Some(format!("{root}/sub").as_str()));
        assert_eq!(lines.next(), Some(root.as_str()));
        let allowed = [
            "CI",
            "DEBIAN_FRONTEND",
            "GIT_PAGER",
            "GIT_TERMINAL_PROMPT",
            "HOME",
            "LANG",
            "NO_COLOR",
            "OLDPWD",
            "PAGER",
            "PATH",
            "PWD",
            "SHLVL",
            "TERM",
            "_",
        ];
        for name in lines.take_while(|line| !line.starts_with("exit code")) {
            assert!(allowed.contains(&name), "unexpected variable {name}");
        }
    }

    #[tokio::test]
    async fn workdir_outside_is_refused() {
        let (_tmp, relay) = relay();
        std::os::unix::fs::symlink("/tmp", relay.root().join("tmp")).expect("symlink");
        for workdir in ["..", "/", "tmp"] {
            let result = call(&relay, "execute", json!({"command": "pwd", "workdir": workdir})).await;
            assert!(result.is_error, "{workdir}");
            assert!(result.output.starts_with("path escapes the workspace"), "{}", result.output);
        }
    }

    #[tokio::test]
    async fn long_output_keeps_head_and_tail() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let limits = ToolLimits { output_cap_bytes: 100, ..ToolLimits::default() };
        let relay = Relay::new(tmp.path(), limits).expect("relay");
        let result = call(&relay, "execute", json!({"command": "echo START; seq 1 10000; echo END"})).await;
        assert!(result.output.starts_with("START\n"), "{}", result.output);
        assert!(result.output.contains(" bytes omitted …]\n"), "{}", result.output);
        assert!(result.output.contains("\nEND\nexit code: 0"), "{}", result.output);
        assert!(result.output.len() < 200, "{}", result.output);
    }

    #[tokio::test]
    async fn background_children_do_not_hold_the_call_open() {
        let (_tmp, relay) = relay();
        let started = std::time::Instant::now();
        let result = call(&relay, "execute", json!({"command": "sleep 100 & echo $! > bg.pid; echo done"})).await;
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(result.output.starts_with("done\nexit code: 0"), "{}", result.output);
        let pid = read_pid(&relay, "bg.pid").await;
        assert!(wait_gone(pid).await, "background child {pid} survived");
    }

    #[tokio::test]
    async fn timeout_kills_the_whole_group() {
        let (_tmp, relay) = relay();
        let result = call(
            &relay,
            "execute",
            json!({"command": "sleep 30 & echo $! > a.pid; sleep 30 & echo $! > b.pid; echo waiting; wait", "timeout_seconds": 1}),
        )
        .await;
        assert!(result.is_error);
        assert_eq!(result.exit_code, None);
        assert!(result.output.starts_with("waiting\ntimed out after 1 s"), "{}", result.output);
        for file in ["a.pid", "b.pid"] {
            let pid = read_pid(&relay, file).await;
            assert!(wait_gone(pid).await, "{file}: {pid} survived");
        }
    }

    #[tokio::test]
    async fn cancel_kills_and_reports_interrupted() {
        let (_tmp, relay) = relay();
        let runner = relay.clone();
        let task = tokio::spawn(async move {
            call_with_id(&runner, "call-1", json!({"command": "sleep 30 & echo $! > a.pid; wait"})).await
        });
        let pid = read_pid(&relay, "a.pid").await;
        assert!(is_alive(pid));
        relay.cancel("call-1");
        relay.cancel("no-such-call");
        let result = tokio::time::timeout(Duration::from_secs(5), task).await.expect("in time").expect("joined");
        assert!(result.is_error);
        assert!(result.output.starts_with("interrupted"), "{}", result.output);
        assert!(wait_gone(pid).await);
    }

    #[tokio::test]
    async fn dropping_the_call_kills_the_group() {
        let (_tmp, relay) = relay();
        let call = call_with_id(&relay, "call-2", json!({"command": "sleep 30 & echo $! > a.pid; wait"}));
        let pid_file = read_pid(&relay, "a.pid");
        let pid = tokio::select! {
            _ = call => panic!("the command should still be running"),
            pid = pid_file => pid,
        };
        // The select dropped the call's future.
        assert!(wait_gone(pid).await, "{pid} survived its dropped call");
    }

    async fn call_with_id(
        relay: &Relay,
        call_id: &str,
        args: serde_json::Value,
    ) -> agentplane_schema::tool::ToolResult {
        let request = ToolRequest {
            call_id: call_id.into(),
            chat_id: "chat".into(),
            user_id: "u".into(),
            name: "execute".into(),
            args,
        };
        relay.handle(&request, None).await
    }
}
