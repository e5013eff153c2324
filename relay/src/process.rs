//! Background processes: `execute` with `background: true`, `process_output`, `process_kill`.
//!
//! A background command keeps running after its call returns. A task per process copies its
//! output into a ring buffer and records how it ended; the process group lives as long as its
//! table entry, so dropping the [`Relay`](crate::Relay) stops every background process.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::os::unix::process::ExitStatusExt as _;
use std::process::ExitStatus;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::io::AsyncReadExt as _;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::MissedTickBehavior;

use agentplane_schema::tool::{ExecuteArgs, ProcessArgs, ToolLimits, ToolResult};

use crate::capture::Ring;
use crate::error::ToolError;
use crate::execute::{ProcessGroup, Spawned, spawn};
use crate::path::Workspace;
use crate::signal::group_exists;

/// How long `process_kill` waits for the killed process to be reaped, so it can report the end.
const KILL_WAIT: Duration = Duration::from_secs(2);
const READ_CHUNK_BYTES: usize = 16 * 1024;
/// How often an exited background command's group is checked for leftover processes.
const GROUP_PROBE_INTERVAL: Duration = Duration::from_secs(1);
/// Ended processes whose last output can still be read; older ones are forgotten so a long
/// session does not accumulate output buffers.
const ENDED_KEPT: usize = 32;

#[derive(Default)]
pub(crate) struct Processes {
    table: Mutex<HashMap<String, Arc<Background>>>,
}

struct Background {
    command: String,
    /// Shared with the output task, which marks it emptied once the group is gone.
    group: Arc<ProcessGroup>,
    state: Arc<Mutex<State>>,
    ended: watch::Receiver<bool>,
    task: JoinHandle<()>,
}

impl Drop for Background {
    fn drop(&mut self) {
        // The task would otherwise wait on a pipe forever if something outside the group held
        // it; the group is killed when the task's and our references to it are gone.
        self.task.abort();
    }
}

struct State {
    output: Ring,
    status: Status,
}

enum Status {
    Running,
    Exited(ExitStatus),
    Failed(String),
}

impl Processes {
    /// Starts a background command and returns at once with its `process_id`.
    pub(crate) fn start(
        &self,
        workspace: &Workspace,
        limits: &ToolLimits,
        call_id: &str,
        args: &ExecuteArgs,
    ) -> Result<ToolResult, ToolError> {
        let Spawned { mut child, output: mut reader, group } =
            spawn(workspace, &args.command, args.workdir.as_deref())?;
        let process_id = format!("proc-{}", uuid::Uuid::now_v7().simple());
        let state = Arc::new(Mutex::new(State { output: Ring::new(limits.output_cap_bytes), status: Status::Running }));
        let (ended_tx, ended) = watch::channel(false);

        let group = Arc::new(group);
        let task_group = Arc::clone(&group);
        let task_state = Arc::clone(&state);
        let task = tokio::spawn(async move {
            let mut chunk = vec![0u8; READ_CHUNK_BYTES];
            let mut eof = false;
            let mut exited = false;
            let mut group_gone = false;
            let mut probe = tokio::time::interval(GROUP_PROBE_INTERVAL);
            probe.set_missed_tick_behavior(MissedTickBehavior::Delay);
            // Output keeps being collected after the shell exits, as long as anything it left
            // behind still writes; and the group is watched until it is empty, because only
            // then may its id be reused (by a later `execute`) and signalling it become unsafe.
            while !(eof && group_gone) {
                tokio::select! {
                    read = reader.read(&mut chunk), if !eof => match read {
                        Ok(0) | Err(_) => eof = true,
                        Ok(n) => lock(&task_state).output.push(&chunk[..n]),
                    },
                    status = child.wait(), if !exited => {
                        exited = true;
                        lock(&task_state).status = match status {
                            Ok(status) => Status::Exited(status),
                            Err(err) => Status::Failed(err.to_string()),
                        };
                        let _ = ended_tx.send(true);
                    },
                    _ = probe.tick(), if exited && !group_gone => {
                        if !group_exists(task_group.id()) {
                            task_group.mark_emptied();
                            group_gone = true;
                        }
                    },
                }
            }
        });

        let pgid = group.id();
        let background = Background { command: args.command.clone(), group, state, ended, task };
        let mut table = lock_table(&self.table);
        forget_oldest_ended(&mut table);
        table.insert(process_id.clone(), Arc::new(background));
        drop(table);
        tracing::debug!(call_id, %process_id, pgid, "background process started");
        Ok(ToolResult {
            process_id: Some(process_id.clone()),
            ..ToolResult::ok(
                call_id,
                format!(
                    "started in the background (pid {pgid}): process_id {process_id}\n\
                     Read its output with process_output, stop it with process_kill."
                ),
            )
        })
    }

    /// New output since the last read, and whether the process still runs.
    pub(crate) fn output(&self, call_id: &str, args: &ProcessArgs) -> Result<ToolResult, ToolError> {
        let background = self.find(&args.process_id)?;
        Ok(report(call_id, &args.process_id, &background, None))
    }

    /// Kills the process's group, then reports its remaining output and how it ended.
    pub(crate) async fn kill(&self, call_id: &str, args: &ProcessArgs) -> Result<ToolResult, ToolError> {
        let background = self.find(&args.process_id)?;
        let was_running = matches!(lock(&background.state).status, Status::Running);
        // Killed even when the shell has exited: children it left in the group may still run.
        background.group.kill();
        let mut ended = background.ended.clone();
        let _ = tokio::time::timeout(KILL_WAIT, ended.wait_for(|ended| *ended)).await;
        let note = if was_running {
            "killed"
        } else {
            "it had already exited; what it left running in its process group was killed"
        };
        Ok(report(call_id, &args.process_id, &background, Some(note)))
    }

    fn find(&self, process_id: &str) -> Result<Arc<Background>, ToolError> {
        lock_table(&self.table).get(process_id).cloned().ok_or_else(|| {
            ToolError::Rejected(format!(
                "no background process {process_id}; process ids come from execute with background: true"
            ))
        })
    }
}

fn forget_oldest_ended(table: &mut HashMap<String, Arc<Background>>) {
    let mut ended: Vec<String> = table
        .iter()
        .filter(|(_, background)| *background.ended.borrow())
        .map(|(process_id, _)| process_id.clone())
        .collect();
    if ended.len() > ENDED_KEPT {
        // Ids embed a UUIDv7, so their order is their start order.
        ended.sort();
        for process_id in &ended[..ended.len() - ENDED_KEPT] {
            table.remove(process_id);
        }
    }
}

fn report(call_id: &str, process_id: &str, background: &Background, note: Option<&str>) -> ToolResult {
    let mut state = lock(&background.state);
    let finished = !matches!(state.status, Status::Running);
    let unread = state.output.take_unread(finished);
    let mut text = String::new();
    if let Some(note) = note {
        let _ = writeln!(text, "{process_id}: {note}");
    }
    if unread.dropped > 0 {
        let _ = writeln!(text, "[… {} bytes dropped: output came faster than it was read …]", unread.dropped);
    }
    if unread.text.is_empty() {
        text.push_str("(no new output)\n");
    } else {
        text.push_str(&unread.text);
        if !text.ends_with('\n') {
            text.push('\n');
        }
    }
    let (status, exit_code) = match &state.status {
        Status::Running => (format!("status: running (pid {})", background.group.id()), None),
        Status::Exited(status) => match (status.code(), status.signal()) {
            (Some(code), _) => (format!("status: exited with code {code}"), Some(code)),
            (None, Some(signal)) => (format!("status: killed by signal {signal}"), None),
            (None, None) => ("status: exited".to_owned(), None),
        },
        Status::Failed(err) => (format!("status: unknown ({err})"), None),
    };
    let _ = write!(text, "{status} — command: {}", background.command);
    ToolResult { exit_code, process_id: Some(process_id.to_owned()), ..ToolResult::ok(call_id, text) }
}

fn lock(state: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    state.lock().unwrap_or_else(PoisonError::into_inner)
}

fn lock_table(
    table: &Mutex<HashMap<String, Arc<Background>>>,
) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Background>>> {
    table.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use serde_json::json;

    use crate::testing::{call, read_pid, relay, wait_gone};

    #[tokio::test]
    async fn background_output_is_read_incrementally_until_exit() {
        let (_tmp, relay) = relay();
        let started = call(
            &relay,
            "execute",
            json!({"command": "echo one; while [ ! -f go ]; do sleep 0.05; done; echo two; exit 4", "background": true}),
        )
        .await;
        assert!(!started.is_error, "{}", started.output);
        let process_id = started.process_id.clone().expect("process id");
        assert!(started.output.contains(&process_id));

        let mut saw_first_line = false;
        for _ in 0..100 {
            let result = call(&relay, "process_output", json!({"process_id": process_id})).await;
            assert!(result.output.contains("status: running"), "{}", result.output);
            if result.output.starts_with("one\n") {
                saw_first_line = true;
                break;
            }
            assert!(result.output.starts_with("(no new output)\n"), "{}", result.output);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(saw_first_line);

        std::fs::write(relay.root().join("go"), "").expect("write");
        let mut last = None;
        for _ in 0..250 {
            let result = call(&relay, "process_output", json!({"process_id": process_id})).await;
            if result.output.contains("status: exited") {
                last = Some(result);
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let last = last.expect("the process exited");
        assert_eq!(last.exit_code, Some(4));
        // "two" may have been read by an earlier poll; "one" must never come again.
        assert!(last.output.starts_with("two\n") || last.output.starts_with("(no new output)\n"), "{}", last.output);
    }

    #[tokio::test]
    async fn process_kill_stops_the_group() {
        let (_tmp, relay) = relay();
        let started = call(
            &relay,
            "execute",
            json!({"command": "sleep 30 & echo $! > a.pid; echo up; wait", "background": true}),
        )
        .await;
        let process_id = started.process_id.clone().expect("process id");
        let pid = read_pid(&relay, "a.pid").await;
        let killed = call(&relay, "process_kill", json!({"process_id": process_id})).await;
        assert!(!killed.is_error, "{}", killed.output);
        assert!(killed.output.contains(": killed\n"), "{}", killed.output);
        assert!(killed.output.contains("status: killed by signal 9"), "{}", killed.output);
        assert!(wait_gone(pid).await);
    }

    #[tokio::test]
    async fn process_kill_reaches_children_left_by_an_exited_shell() {
        let (_tmp, relay) = relay();
        let started = call(
            &relay,
            "execute",
            json!({"command": "sleep 30 >/dev/null 2>&1 & echo $! > a.pid", "background": true}),
        )
        .await;
        let process_id = started.process_id.clone().expect("process id");
        let pid = read_pid(&relay, "a.pid").await;
        for _ in 0..250 {
            let output = call(&relay, "process_output", json!({"process_id": process_id})).await;
            if output.exit_code == Some(0) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(Duration::from_millis(1500)).await; // past a group probe
        assert!(crate::testing::is_alive(pid));
        let killed = call(&relay, "process_kill", json!({"process_id": process_id})).await;
        assert!(killed.output.contains("already exited"), "{}", killed.output);
        assert!(wait_gone(pid).await);
    }

    #[tokio::test]
    async fn dropping_the_relay_stops_background_processes() {
        let (_tmp, relay) = relay();
        call(&relay, "execute", json!({"command": "sleep 30 & echo $! > a.pid; wait", "background": true})).await;
        let pid = read_pid(&relay, "a.pid").await;
        drop(relay);
        assert!(wait_gone(pid).await);
    }

    #[tokio::test]
    async fn unknown_process_ids_are_errors() {
        let (_tmp, relay) = relay();
        for tool in ["process_output", "process_kill"] {
            let result = call(&relay, tool, json!({"process_id": "proc-nope"})).await;
            assert!(result.is_error);
            assert!(result.output.starts_with("no background process proc-nope"), "{}", result.output);
        }
    }
}
