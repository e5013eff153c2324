//! The `command` provisioner: operator scripts run with `sh -c`.
//!
//! Each script gets a minimal environment (nothing of the orchestrator's own, so no keys leak):
//! `PATH`, `HOME`, `LANG`, and
//! `AGENTPLANE_ACTION` (create/start/stop/delete), `AGENTPLANE_WORKSPACE_ID`,
//! `AGENTPLANE_WORKSPACE_NAME`, `AGENTPLANE_TEMPLATE_NAME`, `AGENTPLANE_NATS_URL`,
//! `AGENTPLANE_NATS_PREFIX`, `AGENTPLANE_RELAY_CREDS_FILE` (a 0600 file with the relay's
//! credential, when NATS has auth; the relay reads the same variable), `AGENTPLANE_RELAY_BINARY`, `AGENTPLANE_PARAMETERS` (JSON) and one
//! `AGENTPLANE_PARAM_<NAME>` per parameter (name upper-cased, other characters as `_`).
//! `create` and `start` must leave a relay running that connects with those; the workspace is
//! ready when it says hello. stdout and stderr go to the workspace's provisioning log.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use agentplane_schema::api::{CommandProvisioner, Template, Workspace};
use serde_json::Value;

use super::NatsBackend;

/// Output kept in the log per script run.
const LOG_CAP_BYTES: usize = 64 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Create,
    Start,
    Stop,
    Delete,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Create => "create",
            Action::Start => "start",
            Action::Stop => "stop",
            Action::Delete => "delete",
        }
    }

    pub fn script(self, spec: &CommandProvisioner) -> Option<&str> {
        match self {
            Action::Create => Some(spec.create.as_str()),
            Action::Start => spec.start.as_deref(),
            Action::Stop => spec.stop.as_deref(),
            Action::Delete => spec.delete.as_deref(),
        }
    }

    /// Whether the workspace should be serving afterwards.
    pub fn brings_up(self) -> bool {
        matches!(self, Action::Create | Action::Start)
    }
}

/// `AGENTPLANE_PARAM_<NAME>`.
pub fn param_var(name: &str) -> String {
    let upper: String =
        name.chars().map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_uppercase() } else { '_' }).collect();
    format!("AGENTPLANE_PARAM_{upper}")
}

pub fn environment(
    ws: &Workspace,
    template: &Template,
    action: Action,
    nats: &NatsBackend,
    creds_file: Option<&Path>,
) -> Vec<(String, String)> {
    let subjects = nats.transport.subjects();
    let mut env = vec![
        ("PATH".to_string(), std::env::var("PATH").unwrap_or_else(|_| "/usr/local/bin:/usr/bin:/bin".into())),
        ("HOME".to_string(), std::env::var("HOME").unwrap_or_else(|_| "/".into())),
        ("LANG".to_string(), "C.UTF-8".to_string()),
        ("AGENTPLANE_ACTION".to_string(), action.as_str().to_string()),
        ("AGENTPLANE_WORKSPACE_ID".to_string(), ws.id.clone()),
        ("AGENTPLANE_WORKSPACE_NAME".to_string(), ws.name.clone()),
        ("AGENTPLANE_TEMPLATE_NAME".to_string(), template.name.clone()),
        ("AGENTPLANE_NATS_URL".to_string(), nats.relay_url.clone()),
        ("AGENTPLANE_NATS_PREFIX".to_string(), subjects.prefix().to_string()),
        ("AGENTPLANE_RELAY_BINARY".to_string(), nats.relay_binary.display().to_string()),
        ("AGENTPLANE_PARAMETERS".to_string(), ws.parameters.to_string()),
    ];
    if let Some(f) = creds_file {
        env.push(("AGENTPLANE_RELAY_CREDS_FILE".into(), f.display().to_string()));
    }
    if let Value::Object(params) = &ws.parameters {
        for (name, value) in params {
            let text = match value {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            env.push((param_var(name), text));
        }
    }
    env
}

/// What one script run did.
pub struct Run {
    exit: Result<i32, String>,
    output: String,
}

impl Run {
    pub fn log(&self, action: Action) -> String {
        let status = match &self.exit {
            Ok(code) => format!("exit code {code}"),
            Err(e) => e.clone(),
        };
        format!("{} script: {status}\n{}", action.as_str(), self.output.trim_end())
    }

    pub fn into_result(self) -> Result<(), String> {
        match self.exit {
            Ok(0) => Ok(()),
            Ok(code) => Err(format!("the provisioning script exited with code {code} (see the workspace log)")),
            Err(e) => Err(e),
        }
    }
}

fn cap(mut bytes: Vec<u8>) -> String {
    if bytes.len() > LOG_CAP_BYTES {
        let cut = bytes.len() - LOG_CAP_BYTES;
        bytes.drain(..cut);
    }
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Runs `script` with exactly `env`, killing it after `timeout`.
pub async fn run(script: &str, env: &[(String, String)], timeout: Duration) -> Run {
    let mut cmd = tokio::process::Command::new("sh");
    cmd.arg("-c")
        .arg(script)
        .env_clear()
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => return Run { exit: Err(format!("could not start the script: {e}")), output: String::new() },
    };
    match tokio::time::timeout(timeout, child.wait_with_output()).await {
        Err(_) => Run {
            exit: Err(format!("the script did not finish within {} s", timeout.as_secs())),
            output: String::new(),
        },
        Ok(Err(e)) => Run { exit: Err(format!("waiting for the script: {e}")), output: String::new() },
        Ok(Ok(out)) => {
            let mut combined = out.stdout;
            combined.extend_from_slice(&out.stderr);
            Run { exit: Ok(out.status.code().unwrap_or(-1)), output: cap(combined) }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameter_variables_are_shell_safe() {
        assert_eq!(param_var("cpu-count"), "AGENTPLANE_PARAM_CPU_COUNT");
        assert_eq!(param_var("git.branch"), "AGENTPLANE_PARAM_GIT_BRANCH");
    }

    #[tokio::test]
    async fn scripts_see_only_the_given_environment_and_time_out() {
        let env =
            vec![("PATH".to_string(), "/usr/bin:/bin".to_string()), ("AGENTPLANE_X".to_string(), "1".to_string())];
        let run = run("echo out; echo err >&2; env | sort", &env, Duration::from_secs(10)).await;
        assert!(run.output.contains("out") && run.output.contains("err") && run.output.contains("AGENTPLANE_X=1"));
        assert!(!run.output.contains("CARGO"), "the orchestrator's environment does not leak: {}", run.output);
        assert!(run.into_result().is_ok());
        let run = super::run("exit 3", &env, Duration::from_secs(10)).await;
        assert!(run.into_result().expect_err("fails").contains("code 3"));
        let run = super::run("sleep 5", &env, Duration::from_millis(100)).await;
        assert!(run.into_result().expect_err("times out").contains("did not finish"));
    }
}
