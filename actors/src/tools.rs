//! The tools the model may call, and where each call goes: workspace tools to the relay through
//! the [`ToolTransport`](crate::ports::ToolTransport), platform tools to the
//! [`Provisioner`](crate::ports::Provisioner), sub-agent tools to the chat's own actor (spawn,
//! wait, message and close are operations of the actor tree).

use std::sync::Arc;
use std::time::Instant;

use agentplane_schema::api::{BusyBehavior, Template, WorkspaceStatus};
use agentplane_schema::event::{EventBody, ToolPhase};
use agentplane_schema::message::Part;
use agentplane_schema::tool::{ToolRequest, WORKSPACE_TOOLS};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::chat::ChatActor;
use crate::chat::messages::{ChildHandle, CloseChild, SpawnChild, WatchChildren};
use crate::deps::Deps;
use crate::ports::{Op, ToolSpec, TransportErrorKind};
use crate::shared::ChatShared;

/// What one tool call produced.
#[derive(Debug, Clone)]
pub struct ToolOutcome {
    pub output: String,
    pub is_error: bool,
    pub interrupted: bool,
    pub exit_code: Option<i32>,
    pub duration_ms: Option<u64>,
    pub workspace_id: Option<String>,
}

impl ToolOutcome {
    fn ok(output: impl Into<String>) -> Self {
        ToolOutcome {
            output: output.into(),
            is_error: false,
            interrupted: false,
            exit_code: None,
            duration_ms: None,
            workspace_id: None,
        }
    }

    pub(crate) fn error(output: impl Into<String>) -> Self {
        ToolOutcome { is_error: true, ..Self::ok(output) }
    }

    pub fn interrupted() -> Self {
        ToolOutcome { interrupted: true, ..Self::error("interrupted: the user stopped this tool call") }
    }
}

/// Everything a tool call needs.
pub struct ToolContext {
    pub deps: Arc<Deps>,
    pub shared: Arc<ChatShared>,
    pub user_id: String,
    pub cancel: CancellationToken,
    /// The chat's own actor: sub-agent tools are operations of the actor tree.
    pub agent: actix::Addr<ChatActor>,
}

/// Longest `wait_agent` a model may ask for, and the default.
const WAIT_AGENT_MAX_SECONDS: u64 = 3600;
const WAIT_AGENT_DEFAULT_SECONDS: u64 = 600;

/// Definitions sent to the model: built once, shared by every request.
pub fn specs() -> Arc<[ToolSpec]> {
    static SPECS: std::sync::LazyLock<Arc<[ToolSpec]>> = std::sync::LazyLock::new(|| build_specs().into());
    SPECS.clone()
}

fn build_specs() -> Vec<ToolSpec> {
    fn spec(name: &str, description: &str, parameters: Value) -> ToolSpec {
        ToolSpec { name: name.into(), description: description.into(), parameters }
    }
    vec![
        spec(
            "list_templates",
            "List the workspace templates you may use, best match for the query first.",
            json!({"type":"object","properties":{"query":{"type":"string","description":"What the workspace is for"}}}),
        ),
        spec(
            "read_template",
            "Show a template's description and parameters (name, type, default, required, options, validation).",
            json!({"type":"object","properties":{"template_id":{"type":"string"}},"required":["template_id"]}),
        ),
        spec(
            "create_workspace",
            "Provision a workspace from a template and bind it to this chat; waits until it is ready. \
             Idempotent: returns the chat's workspace if it already has a ready one.",
            json!({"type":"object","properties":{
                "template_id":{"type":"string"},
                "name":{"type":"string"},
                "parameters":{"type":"object","description":"Template parameters by name"}
            },"required":["template_id"]}),
        ),
        spec(
            "read_file",
            "Read a file of the workspace as numbered lines (or list a directory).",
            json!({"type":"object","properties":{
                "path":{"type":"string","description":"Relative to the workspace root"},
                "offset":{"type":"integer","description":"1-based first line"},
                "limit":{"type":"integer","description":"Number of lines (default 2000)"}
            },"required":["path"]}),
        ),
        spec(
            "write_file",
            "Create or replace a file of the workspace (parents are created).",
            json!({"type":"object","properties":{
                "path":{"type":"string"},"content":{"type":"string"}
            },"required":["path","content"]}),
        ),
        spec(
            "edit_files",
            "Replace text in workspace files. Each old_text must match exactly once (or use replace_all); \
             all edits are checked before any is written. Returns a unified diff per file.",
            json!({"type":"object","properties":{"edits":{"type":"array","items":{"type":"object","properties":{
                "path":{"type":"string"},"old_text":{"type":"string"},"new_text":{"type":"string"},
                "replace_all":{"type":"boolean"}
            },"required":["path","old_text","new_text"]}}},"required":["edits"]}),
        ),
        spec(
            "execute",
            "Run a shell command (sh -c) in the workspace. Returns output (capped, head and tail kept), exit \
             code and duration. On timeout the process group is killed. background=true returns a process id.",
            json!({"type":"object","properties":{
                "command":{"type":"string"},
                "timeout_seconds":{"type":"integer","description":"Default 30, max 3600"},
                "workdir":{"type":"string","description":"Relative to the workspace root"},
                "background":{"type":"boolean"}
            },"required":["command"]}),
        ),
        spec(
            "process_output",
            "Read new output of a background process and whether it is still running.",
            json!({"type":"object","properties":{"process_id":{"type":"string"}},"required":["process_id"]}),
        ),
        spec(
            "process_kill",
            "Stop a background process.",
            json!({"type":"object","properties":{"process_id":{"type":"string"}},"required":["process_id"]}),
        ),
        spec(
            "spawn_agent",
            "Start a sub-agent on a self-contained task; it has its own context, shares this chat's workspace, \
             and runs in parallel. Returns its id at once; collect its report with wait_agent.",
            json!({"type":"object","properties":{
                "prompt":{"type":"string","description":"The complete task: the sub-agent sees nothing else"},
                "title":{"type":"string"},
                "model_id":{"type":"string"}
            },"required":["prompt"]}),
        ),
        spec(
            "wait_agent",
            "Wait until the given sub-agents finish (or the timeout passes); returns each one's status and \
             final report. Sub-agents still running at the timeout keep running.",
            json!({"type":"object","properties":{
                "agent_ids":{"type":"array","items":{"type":"string"}},
                "timeout_seconds":{"type":"integer","description":"Default 600, max 3600"}
            },"required":["agent_ids"]}),
        ),
        spec(
            "message_agent",
            "Send a message to a sub-agent: queued for its next step, or with interrupt=true delivered at once.",
            json!({"type":"object","properties":{
                "agent_id":{"type":"string"},"message":{"type":"string"},"interrupt":{"type":"boolean"}
            },"required":["agent_id","message"]}),
        ),
        spec(
            "close_agent",
            "Stop a sub-agent and all of its own sub-agents; its chat stays readable.",
            json!({"type":"object","properties":{"agent_id":{"type":"string"}},"required":["agent_id"]}),
        ),
    ]
}

/// Runs one tool call to its outcome; never fails, errors become outcomes the model reads.
/// `wire_id` is agentplane's id of the call (what relays see), `call_id` the model's.
pub async fn run(ctx: &ToolContext, wire_id: &str, call_id: &str, name: &str, args: &Value) -> ToolOutcome {
    if ctx.cancel.is_cancelled() {
        return ToolOutcome::interrupted();
    }
    match name {
        "list_templates" => list_templates(ctx, args).await,
        "read_template" => read_template(ctx, args).await,
        "create_workspace" => create_workspace(ctx, args).await,
        "spawn_agent" => spawn_agent(ctx, args).await,
        "wait_agent" => wait_agent(ctx, args).await,
        "message_agent" => message_agent(ctx, args).await,
        "close_agent" => close_agent(ctx, args).await,
        n if WORKSPACE_TOOLS.contains(&n) => workspace_tool(ctx, wire_id, call_id, name, args).await,
        other => ToolOutcome::error(format!("unknown tool `{other}`")),
    }
}

/// A piece of a running tool's output, for the chat's watchers.
fn publish_output(ctx: &ToolContext, call_id: &str, name: &str, piece: String) {
    ctx.shared.publish(EventBody::ToolCall {
        phase: ToolPhase::Output,
        call_id: call_id.to_string(),
        name: name.to_string(),
        args: None,
        output: Some(piece),
        is_error: None,
        workspace_id: None,
    });
}

async fn workspace_tool(ctx: &ToolContext, wire_id: &str, call_id: &str, name: &str, args: &Value) -> ToolOutcome {
    let Some(workspace_id) = ctx.shared.workspace_id() else {
        return ToolOutcome::error(
            "This chat has no workspace yet. Call list_templates to pick a template, then create_workspace.",
        );
    };
    let request = ToolRequest {
        call_id: wire_id.to_string(),
        chat_id: ctx.shared.chat_id.clone(),
        user_id: ctx.user_id.clone(),
        name: name.to_string(),
        args: args.clone(),
    };
    let (tx, mut rx) = mpsc::unbounded_channel::<String>();
    let started = Instant::now();
    let transport = ctx.deps.transport.clone();
    let target = workspace_id.clone();
    let call = async move { transport.call(&target, request, Some(tx)).await };
    tokio::pin!(call);
    let result = loop {
        tokio::select! {
            biased;
            _ = ctx.cancel.cancelled() => {
                ctx.deps.transport.cancel(&workspace_id, wire_id).await;
                let mut out = ToolOutcome::interrupted();
                out.workspace_id = Some(workspace_id);
                return out;
            }
            Some(piece) = rx.recv() => publish_output(ctx, call_id, name, piece),
            result = &mut call => break result,
        }
    };
    // Pieces the call passed on in the poll that ended it come before its result too.
    while let Ok(piece) = rx.try_recv() {
        publish_output(ctx, call_id, name, piece);
    }
    let mut outcome = match result {
        Ok(r) => ToolOutcome {
            output: r.output,
            is_error: r.is_error,
            interrupted: false,
            exit_code: r.exit_code,
            duration_ms: r.duration_ms.or(Some(started.elapsed().as_millis() as u64)),
            workspace_id: None,
        },
        Err(e) if e.kind == TransportErrorKind::Offline => {
            ToolOutcome::error(offline_message(ctx, &workspace_id, &e.message).await)
        }
        Err(e) => ToolOutcome::error(format!("The tool call could not be delivered to the workspace: {}", e.message)),
    };
    outcome.workspace_id = Some(workspace_id);
    outcome
}

fn str_arg<'a>(args: &'a Value, name: &str) -> Option<&'a str> {
    args.get(name).and_then(Value::as_str).filter(|s| !s.trim().is_empty())
}

fn tree_error(e: actix::MailboxError) -> ToolOutcome {
    ToolOutcome::error(format!("the chat's actor could not be reached: {e}"))
}

async fn spawn_agent(ctx: &ToolContext, args: &Value) -> ToolOutcome {
    let Some(prompt) = str_arg(args, "prompt") else {
        return ToolOutcome::error("spawn_agent needs a non-empty `prompt`");
    };
    let spawn = SpawnChild {
        user_id: ctx.user_id.clone(),
        prompt: prompt.to_string(),
        title: str_arg(args, "title").map(str::to_string),
        model_id: str_arg(args, "model_id").map(str::to_string),
    };
    match ctx.agent.send(spawn).await {
        Ok(Ok(id)) => ToolOutcome::ok(
            json!({"agent_id": id, "status": "running", "note": "collect its report with wait_agent"}).to_string(),
        ),
        Ok(Err(e)) => ToolOutcome::error(e.message),
        Err(e) => tree_error(e),
    }
}

async fn wait_agent(ctx: &ToolContext, args: &Value) -> ToolOutcome {
    let ids: Vec<String> = match args.get("agent_ids") {
        Some(Value::Array(a)) => a.iter().filter_map(|v| v.as_str().map(str::to_string)).collect(),
        Some(Value::String(one)) => vec![one.clone()],
        _ => return ToolOutcome::error("wait_agent needs `agent_ids`, a list of sub-agent ids"),
    };
    let seconds = args
        .get("timeout_seconds")
        .and_then(Value::as_u64)
        .unwrap_or(WAIT_AGENT_DEFAULT_SECONDS)
        .min(WAIT_AGENT_MAX_SECONDS);
    let watches = match ctx.agent.send(WatchChildren { ids }).await {
        Ok(Ok(w)) => w,
        Ok(Err(e)) => return ToolOutcome::error(e.message),
        Err(e) => return tree_error(e),
    };
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(seconds);
    let mut reports = Vec::with_capacity(watches.len());
    for (id, mut watch) in watches {
        let finished = tokio::select! {
            _ = ctx.cancel.cancelled() => return ToolOutcome::interrupted(),
            r = tokio::time::timeout_at(deadline, watch.wait_for(|s| s.status.is_terminal())) => {
                r.ok().and_then(Result::ok).map(|state| state.clone())
            }
        };
        let state = finished.unwrap_or_else(|| watch.borrow().clone());
        let timed_out = !state.status.is_terminal();
        reports.push(json!({"agent_id": id, "status": state.status, "report": state.report, "timed_out": timed_out}));
    }
    ToolOutcome::ok(Value::Array(reports).to_string())
}

async fn message_agent(ctx: &ToolContext, args: &Value) -> ToolOutcome {
    let (Some(id), Some(message)) = (str_arg(args, "agent_id"), str_arg(args, "message")) else {
        return ToolOutcome::error("message_agent needs `agent_id` and a non-empty `message`");
    };
    let busy = if args.get("interrupt").and_then(Value::as_bool).unwrap_or(false) {
        BusyBehavior::Interrupt
    } else {
        BusyBehavior::Queue
    };
    let handle = match ctx.agent.send(ChildHandle { id: id.to_string() }).await {
        Ok(Ok(h)) => h,
        Ok(Err(e)) => return ToolOutcome::error(e.message),
        Err(e) => return tree_error(e),
    };
    match handle.send(&ctx.user_id, vec![Part::text(message)], busy).await {
        Ok(o) if o.queued => ToolOutcome::ok(format!(
            "queued for sub-agent {id}: it reads it {}",
            if busy == BusyBehavior::Interrupt { "now (its current step was interrupted)" } else { "at its next step" }
        )),
        Ok(_) => ToolOutcome::ok(format!("delivered to sub-agent {id}, which is working on it")),
        Err(e) => ToolOutcome::error(e.message),
    }
}

async fn close_agent(ctx: &ToolContext, args: &Value) -> ToolOutcome {
    let Some(id) = str_arg(args, "agent_id") else {
        return ToolOutcome::error("close_agent needs `agent_id`");
    };
    match ctx.agent.send(CloseChild { id: id.to_string() }).await {
        Ok(Ok(())) => ToolOutcome::ok(format!("sub-agent {id} and its own sub-agents are stopped")),
        Ok(Err(e)) => ToolOutcome::error(e.message),
        Err(e) => tree_error(e),
    }
}

/// What the model reads when a workspace does not answer: why, and how to go on.
async fn offline_message(ctx: &ToolContext, workspace_id: &str, reason: &str) -> String {
    let workspace = ctx.deps.provisioner.get_workspace(workspace_id).await.ok().flatten();
    match workspace {
        Some(ws)
            if matches!(ws.status, WorkspaceStatus::Deleted | WorkspaceStatus::Stopped | WorkspaceStatus::Failed) =>
        {
            format!(
                "workspace offline: workspace {workspace_id} is {}. Call create_workspace with template_id \"{}\" to \
                 provision a new one (the chat's history is kept), then continue.",
                ws.status.as_str(),
                ws.template_id
            )
        }
        Some(ws) => format!(
            "workspace offline: workspace {workspace_id} is not answering ({reason}). If it stays offline, call \
             create_workspace with template_id \"{}\" for a new one.",
            ws.template_id
        ),
        None => format!("workspace offline: workspace {workspace_id} is not answering ({reason})."),
    }
}

async fn list_templates(ctx: &ToolContext, args: &Value) -> ToolOutcome {
    let query = args.get("query").and_then(Value::as_str).unwrap_or("");
    let templates = match ctx.deps.provisioner.list_templates(&ctx.user_id).await {
        Ok(t) => t,
        Err(e) => return ToolOutcome::error(e.message),
    };
    if templates.is_empty() {
        return ToolOutcome::ok("No workspace templates are configured. Ask an administrator to add one.");
    }
    let mut out = String::new();
    for t in rank_templates(templates, query) {
        out.push_str(&format!("- {} (id {}): {}\n", t.name, t.id, t.description.trim()));
    }
    ToolOutcome::ok(out)
}

/// Best match first: query words found in the name weigh more than in the description.
pub fn rank_templates(mut templates: Vec<Template>, query: &str) -> Vec<Template> {
    let words: Vec<String> =
        query.split(|c: char| !c.is_alphanumeric()).filter(|w| !w.is_empty()).map(str::to_lowercase).collect();
    let score = |t: &Template| -> usize {
        let name = t.name.to_lowercase();
        let description = t.description.to_lowercase();
        words.iter().map(|w| 3 * name.matches(w.as_str()).count() + description.matches(w.as_str()).count()).sum()
    };
    templates.sort_by(|a, b| score(b).cmp(&score(a)).then_with(|| a.name.cmp(&b.name)));
    templates
}

async fn read_template(ctx: &ToolContext, args: &Value) -> ToolOutcome {
    let Some(id) = args.get("template_id").and_then(Value::as_str) else {
        return ToolOutcome::error("read_template needs `template_id`");
    };
    match ctx.deps.provisioner.get_template(id).await {
        Ok(Some(t)) => ToolOutcome::ok(describe_template(&t)),
        Ok(None) => ToolOutcome::error(format!("no template `{id}`; call list_templates")),
        Err(e) => ToolOutcome::error(e.message),
    }
}

fn describe_template(t: &Template) -> String {
    let mut out = format!("{} (id {})\n{}\n\nParameters:", t.name, t.id, t.description.trim());
    if t.parameters.is_empty() {
        out.push_str(" none");
    }
    for p in &t.parameters {
        out.push_str(&format!(
            "\n- {}: {} — {}",
            p.name,
            serde_json::to_string(&p.param_type).unwrap_or_default().trim_matches('"'),
            if p.description.is_empty() { "(no description)" } else { &p.description }
        ));
        if p.required {
            out.push_str("; required");
        }
        if let Some(d) = &p.default {
            out.push_str(&format!("; default {d}"));
        }
        if !p.options.is_empty() {
            out.push_str(&format!("; one of {}", p.options.join(", ")));
        }
        if let Some(v) = &p.validation {
            out.push_str(&format!("; validation {}", serde_json::to_string(v).unwrap_or_default()));
        }
    }
    out
}

async fn create_workspace(ctx: &ToolContext, args: &Value) -> ToolOutcome {
    let Some(template_id) = args.get("template_id").and_then(Value::as_str) else {
        return ToolOutcome::error("create_workspace needs `template_id`");
    };
    let name = args.get("name").and_then(Value::as_str).map(str::to_string);
    let parameters = args.get("parameters").cloned().unwrap_or_else(|| json!({}));
    // Parallel calls in one step must not provision twice.
    let _guard = ctx.shared.workspace_lock.lock().await;
    if let Some(existing) = ctx.shared.workspace_id() {
        match ctx.deps.provisioner.get_workspace(&existing).await {
            Ok(Some(ws)) if ws.status == WorkspaceStatus::Ready => {
                return ToolOutcome {
                    workspace_id: Some(ws.id.clone()),
                    ..ToolOutcome::ok(format!("This chat already has workspace {} ({}), ready.", ws.id, ws.name))
                };
            }
            Ok(_) => {}
            Err(e) => return ToolOutcome::error(e.message),
        }
    }
    let template = match ctx.deps.provisioner.get_template(template_id).await {
        Ok(Some(t)) => t,
        Ok(None) => return ToolOutcome::error(format!("no template `{template_id}`; call list_templates")),
        Err(e) => return ToolOutcome::error(e.message),
    };
    let workspace = match ctx
        .deps
        .provisioner
        .create_workspace(&ctx.user_id, &ctx.shared.chat_id, &template, name, parameters)
        .await
    {
        Ok(ws) => ws,
        Err(e) => return ToolOutcome::error(e.message),
    };
    let audit = Op::Audit {
        user_id: Some(ctx.user_id.clone()),
        action: "workspace.created".into(),
        target_type: "workspace".into(),
        target_id: Some(workspace.id.clone()),
        details: json!({"chat_id": ctx.shared.chat_id, "template_id": template.id}),
    };
    if let Err(e) = ctx.shared.commit(vec![Op::SetWorkspace(Some(workspace.id.clone())), audit], vec![]).await {
        return ToolOutcome::error(format!("the workspace was created but could not be bound to the chat: {e}"));
    }
    ctx.shared.set_workspace_id(Some(workspace.id.clone()));
    ToolOutcome {
        workspace_id: Some(workspace.id.clone()),
        ..ToolOutcome::ok(format!(
            "Workspace {} ({}) from template {} is ready and bound to this chat.",
            workspace.id, workspace.name, template.name
        ))
    }
}

#[cfg(test)]
mod tests {
    use agentplane_schema::api::ProvisionerSpec;

    use super::*;

    fn template(name: &str, description: &str) -> Template {
        Template {
            id: name.into(),
            name: name.into(),
            description: description.into(),
            parameters: vec![],
            provisioner: ProvisionerSpec::Local,
            created_at: chrono::Utc::now(),
        }
    }

    #[test]
    fn ranking_prefers_name_matches_then_description() {
        let ts = vec![
            template("alpha", "generic box"),
            template("python-dev", "a python toolchain"),
            template("node", "javascript, and python too"),
        ];
        let ranked: Vec<_> = rank_templates(ts.clone(), "Python").into_iter().map(|t| t.name).collect();
        assert_eq!(ranked, ["python-dev", "node", "alpha"]);
        let ranked: Vec<_> = rank_templates(ts, "").into_iter().map(|t| t.name).collect();
        assert_eq!(ranked, ["alpha", "node", "python-dev"]);
    }

    #[test]
    fn specs_are_valid_object_schemas() {
        for s in specs().iter() {
            assert_eq!(s.parameters["type"], "object", "{}", s.name);
        }
    }
}
