//! Workspaces over NATS: a separate relay process per workspace with its own credential,
//! nats-server restarts, offline relays, templates with parameters and the `command`
//! provisioner, and a chat that outlives its workspace.

use std::time::{Duration, Instant};

use agentplane_schema::api::{
    ChatStatus, CommandProvisioner, CreateTemplate, CreateWorkspace, ParamType, ParamValidation, ProvisionerSpec,
    TemplateParameter, WorkspaceStatus,
};
use agentplane_schema::event::{EventBody, ToolPhase};
use agentplane_tests::Reply;
use reqwest::{Method, StatusCode};
use serde_json::json;

use crate::chat_lifecycle::conversation_does_real_work;
use crate::common::{TestEnv, WAIT, is_status, relay_binary, tool_results};

async fn bound_workspace(env: &TestEnv, chat_id: &str) -> String {
    env.admin.get_chat(chat_id).await.expect("chat").chat.workspace_id.expect("workspace")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conversation_runs_its_tools_in_a_relay_process_over_nats() {
    let env = TestEnv::start_nats(|_| {}).await;
    conversation_does_real_work(&env).await;
    let ws = env.admin.list_workspaces().await.expect("workspaces").pop().expect("one workspace");
    // The relay ran as its own process: it wrote its journal and log under the relay directory.
    let relay_dir = env.data_dir.path().join("relays").join(&ws.id);
    assert!(relay_dir.join("relay.creds").is_file(), "a credential was minted for the relay");
    assert!(
        std::fs::read_dir(relay_dir.join("state")).expect("state dir").next().is_some(),
        "the relay kept a journal"
    );
}

/// A command's output reaches the chat's watchers while it runs, over NATS, all of it and before
/// the call's result.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tools_output_streams_over_nats_ahead_of_its_result() {
    let env = TestEnv::start_nats(|_| {}).await;
    let (chat, mut stream) = env.idle_chat("ready").await;
    let lines = (1..=5).map(|i| format!("line {i}\n")).collect::<String>();
    env.llm.push_all([
        Reply::tool_call("create_workspace", json!({"template_id": "local"})),
        Reply::tool_call("execute", json!({"command": "for i in 1 2 3 4 5; do echo line $i; sleep 0.05; done"})),
        Reply::text("done"),
    ]);
    env.send(&chat.id, "stream it").await;
    let events = stream.wait_for(is_status(ChatStatus::Idle), WAIT).await.expect("idle");
    let mut streamed = String::new();
    let mut result = None;
    for event in &events {
        match &event.body {
            EventBody::ToolCall { phase: ToolPhase::Output, name, output: Some(piece), .. } if name == "execute" => {
                assert!(result.is_none(), "output after the call's result: {piece:?}");
                streamed.push_str(piece);
            }
            EventBody::ToolCall { phase: ToolPhase::Finished, name, output, .. } if name == "execute" => {
                result = output.clone();
            }
            _ => {}
        }
    }
    assert_eq!(streamed, lines, "every piece streamed, in order");
    assert!(result.expect("the call finished").contains(&lines));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_relay_fails_fast_and_tools_survive_a_nats_server_restart() {
    let mut env = TestEnv::start_nats(|_| {}).await;
    let (chat, mut stream) = env.idle_chat("ready").await;
    env.llm.push_all([
        Reply::tool_call("create_workspace", json!({"template_id": "local"})),
        Reply::tool_call("execute", json!({"command": "echo before > state.txt; cat state.txt"})),
        Reply::text("first done"),
    ]);
    env.send(&chat.id, "first").await;
    stream.wait_for(is_status(ChatStatus::Idle), WAIT).await.expect("idle");
    let ws = bound_workspace(&env, &chat.id).await;

    // Kill the relay behind the orchestrator's back: the next call fails fast, typed.
    let status = std::process::Command::new("pkill").args(["-f", &format!("workspace {ws}")]).status().expect("pkill");
    assert!(status.success(), "the relay process was found");
    env.llm.push_all([Reply::tool_call("execute", json!({"command": "echo lost"})), Reply::text("noted")]);
    let started = Instant::now();
    env.send(&chat.id, "second").await;
    stream.wait_for(is_status(ChatStatus::Idle), WAIT).await.expect("idle");
    let elapsed = started.elapsed();
    let results = tool_results(&env.messages(&chat.id).await);
    let (_, _, output, is_error) = results.last().expect("result");
    assert!(*is_error && output.starts_with("workspace offline:"), "{output}");
    assert!(elapsed < Duration::from_secs(2), "offline is noticed at once, took {elapsed:?}");

    // Bring the relay back (stop + start), then restart the nats-server under everyone.
    for action in ["stop", "start"] {
        let (status, body) =
            env.admin.raw(Method::POST, &format!("/api/v1/workspaces/{ws}/{action}"), None).await.expect(action);
        assert_eq!(status, StatusCode::OK, "{action}: {body}");
    }
    env.nats.as_mut().expect("nats").restart();
    env.llm.push_all([
        Reply::tool_call("execute", json!({"command": "echo after >> state.txt; cat state.txt"})),
        Reply::text("third done"),
    ]);
    env.send(&chat.id, "third").await;
    stream.wait_for(is_status(ChatStatus::Idle), WAIT).await.expect("idle after restart");
    let results = tool_results(&env.messages(&chat.id).await);
    let (_, _, output, is_error) = results.last().expect("result");
    assert!(!is_error && output.contains("before") && output.contains("after"), "{output}");
}

fn command_template(dir: &std::path::Path) -> CreateTemplate {
    let root = dir.display();
    let relay = relay_binary();
    let relay = relay.display();
    let create = format!(
        r#"set -e
W="{root}/$AGENTPLANE_WORKSPACE_ID"
mkdir -p "$W/root" "$W/state"
env | grep '^AGENTPLANE_PARAM_' | sort > "$W/params.env"
echo "creating $AGENTPLANE_WORKSPACE_NAME"
nohup "{relay}" --nats "$AGENTPLANE_NATS_URL" --workspace "$AGENTPLANE_WORKSPACE_ID" --root "$W/root" --state-dir "$W/state" > "$W/relay.log" 2>&1 &
echo $! > "$W/relay.pid""#
    );
    let delete = format!(r#"W="{root}/$AGENTPLANE_WORKSPACE_ID"; kill "$(cat "$W/relay.pid")"; rm -rf "$W""#);
    let param = |name: &str, t: ParamType| TemplateParameter {
        name: name.into(),
        param_type: t,
        description: format!("the {name}"),
        default: None,
        required: false,
        options: vec![],
        validation: None,
    };
    let mut branch = param("branch", ParamType::String);
    branch.required = true;
    branch.validation = Some(ParamValidation { pattern: Some("^[a-z0-9/-]+$".into()), ..Default::default() });
    let mut size = param("size", ParamType::Enum);
    size.options = vec!["small".into(), "large".into()];
    size.default = Some(json!("small"));
    let mut cpus = param("cpus", ParamType::Number);
    cpus.validation = Some(ParamValidation { min: Some(1.0), max: Some(8.0), ..Default::default() });
    let gpu = param("gpu", ParamType::Bool);
    CreateTemplate {
        name: "sandbox".into(),
        description: "A sandbox host started by a script".into(),
        parameters: vec![branch, size, cpus, gpu],
        provisioner: ProvisionerSpec::Command(CommandProvisioner {
            create,
            start: None,
            stop: None,
            delete: Some(delete),
            timeout_seconds: Some(30),
        }),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn template_parameters_are_validated_and_reach_the_command_provisioner() {
    let env = TestEnv::start_nats(|_| {}).await;
    let scripts_dir = tempfile::tempdir().expect("dir");
    let template = env.admin.create_template(&command_template(scripts_dir.path())).await.expect("template");
    let (chat, mut stream) = env.idle_chat("ready").await;
    env.llm.push_all([
        Reply::tool_call("read_template", json!({"template_id": "sandbox"})),
        Reply::tool_call("create_workspace", json!({"template_id": "sandbox", "parameters": {"size": "large"}})),
        Reply::tool_call(
            "create_workspace",
            json!({"template_id": "sandbox", "parameters": {"branch": "main", "cpus": "four"}}),
        ),
        Reply::tool_call(
            "create_workspace",
            json!({"template_id": "sandbox", "parameters": {"branch": "main", "size": "huge"}}),
        ),
        Reply::tool_call(
            "create_workspace",
            json!({"template_id": "sandbox", "parameters": {"branch": "feature/x", "cpus": 2, "gpu": true}}),
        ),
        Reply::tool_call("execute", json!({"command": "echo running in the sandbox"})),
        Reply::text("sandbox ready"),
    ]);
    env.send(&chat.id, "make a sandbox").await;
    stream.wait_for(is_status(ChatStatus::Idle), WAIT).await.expect("idle");
    let results = tool_results(&env.messages(&chat.id).await);
    assert!(results[0].2.contains("branch") && results[0].2.contains("required"), "{}", results[0].2);
    assert!(results[1].3 && results[1].2.contains("`branch` is required"), "{}", results[1].2);
    assert!(results[2].3 && results[2].2.contains("`cpus` must be a number"), "{}", results[2].2);
    assert!(results[3].3 && results[3].2.contains("`size` must be one of small, large"), "{}", results[3].2);
    let relay_logs: Vec<String> = std::fs::read_dir(scripts_dir.path())
        .expect("dir")
        .filter_map(|e| std::fs::read_to_string(e.ok()?.path().join("relay.log")).ok())
        .collect();
    assert!(!results[4].3, "{} (relay logs: {relay_logs:?})", results[4].2);
    assert!(!results[5].3 && results[5].2.contains("running in the sandbox"), "{}", results[5].2);

    let ws = bound_workspace(&env, &chat.id).await;
    let params = std::fs::read_to_string(scripts_dir.path().join(&ws).join("params.env")).expect("params");
    // The size was left out: its default is filled in.
    assert_eq!(
        params.lines().collect::<Vec<_>>(),
        [
            "AGENTPLANE_PARAM_BRANCH=feature/x",
            "AGENTPLANE_PARAM_CPUS=2",
            "AGENTPLANE_PARAM_GPU=true",
            "AGENTPLANE_PARAM_SIZE=small"
        ]
    );
    // Only the valid attempt made a workspace; its log holds the script's output.
    let workspaces = env.admin.list_workspaces().await.expect("list");
    assert_eq!(workspaces.len(), 1);
    assert_eq!(workspaces[0].template_id, template.id);
    let (status, detail) = env.admin.raw(Method::GET, &format!("/api/v1/workspaces/{ws}"), None).await.expect("detail");
    assert_eq!(status, StatusCode::OK);
    assert!(detail["logs"].as_str().unwrap_or_default().contains("creating sandbox-"), "{detail}");

    // Deleting runs the delete script: the relay is gone, and so are its files.
    let (status, _) = env.admin.raw(Method::DELETE, &format!("/api/v1/workspaces/{ws}"), None).await.expect("delete");
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert!(!scripts_dir.path().join(&ws).exists());
}

async fn chat_outlives_its_workspace(env: TestEnv) {
    let (chat, mut stream) = env.idle_chat("ready").await;
    env.llm.push_all([
        Reply::tool_call("create_workspace", json!({"template_id": "local"})),
        Reply::tool_call("write_file", json!({"path": "notes.txt", "content": "v1"})),
        Reply::text("written"),
    ]);
    env.send(&chat.id, "write notes").await;
    stream.wait_for(is_status(ChatStatus::Idle), WAIT).await.expect("idle");
    let first = bound_workspace(&env, &chat.id).await;
    let (status, _) =
        env.admin.raw(Method::DELETE, &format!("/api/v1/workspaces/{first}"), None).await.expect("delete");
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert!(!env.workspace_dir(&first).exists());
    assert_eq!(env.messages(&chat.id).await.len(), 8, "the chat is intact");

    env.llm.push_all([
        Reply::tool_call("write_file", json!({"path": "notes.txt", "content": "v2"})),
        Reply::tool_call("create_workspace", json!({"template_id": "local"})),
        Reply::tool_call("write_file", json!({"path": "notes.txt", "content": "v2"})),
        Reply::text("rewritten in a new workspace"),
    ]);
    env.send(&chat.id, "update the notes").await;
    stream.wait_for(is_status(ChatStatus::Idle), WAIT).await.expect("idle");
    let results = tool_results(&env.messages(&chat.id).await);
    let gone = &results[results.len() - 3];
    assert!(gone.3 && gone.2.contains("is deleted") && gone.2.contains("create_workspace"), "{}", gone.2);
    let second = bound_workspace(&env, &chat.id).await;
    assert_ne!(first, second);
    assert_eq!(std::fs::read_to_string(env.workspace_dir(&second).join("notes.txt")).expect("notes"), "v2");
    let workspaces = env.admin.list_workspaces().await.expect("list");
    assert_eq!(workspaces.iter().map(|w| w.id.as_str()).collect::<Vec<_>>(), [second.as_str()]);
    // The new one came from the same template.
    assert_eq!(workspaces[0].template_id, env.admin.list_templates().await.expect("t")[0].id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chat_outlives_its_workspace_over_nats() {
    chat_outlives_its_workspace(TestEnv::start_nats(|_| {}).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chat_outlives_its_workspace_embedded() {
    chat_outlives_its_workspace(TestEnv::start().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workspaces_can_be_created_stopped_started_and_picked_for_a_chat() {
    let env = TestEnv::start_nats(|_| {}).await;
    let template = env.admin.list_templates().await.expect("templates").pop().expect("local");
    let (status, body) = env
        .admin
        .raw(
            Method::POST,
            "/api/v1/workspaces",
            Some(
                serde_json::to_value(CreateWorkspace {
                    template_id: template.id.clone(),
                    name: Some("mine".into()),
                    parameters: json!({}),
                })
                .expect("json"),
            ),
        )
        .await
        .expect("create");
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let ws = body["id"].as_str().expect("id").to_string();
    assert_eq!(body["status"], "ready");
    let (status, body) =
        env.admin.raw(Method::POST, &format!("/api/v1/workspaces/{ws}/stop"), None).await.expect("stop");
    assert_eq!((status, body["status"].as_str()), (StatusCode::OK, Some("stopped")), "{body}");
    let (status, body) =
        env.admin.raw(Method::POST, &format!("/api/v1/workspaces/{ws}/stop"), None).await.expect("stop");
    assert_eq!(status, StatusCode::CONFLICT, "stopping twice is refused: {body}");
    let (status, body) =
        env.admin.raw(Method::POST, &format!("/api/v1/workspaces/{ws}/start"), None).await.expect("start");
    assert_eq!((status, body["status"].as_str()), (StatusCode::OK, Some("ready")), "{body}");

    // A chat created on that workspace uses it without provisioning another.
    env.llm.push_all([Reply::tool_call("execute", json!({"command": "pwd"})), Reply::text("here")]);
    let chat = env
        .admin
        .create_chat(&agentplane_schema::api::CreateChat {
            content: vec![agentplane_schema::message::Part::text("where am I")],
            model_id: None,
            workspace_id: Some(ws.clone()),
            title: None,
        })
        .await
        .expect("chat");
    let chat = env.admin.wait_until_chat(&chat.id, |c| c.status == ChatStatus::Idle, WAIT).await.expect("idle");
    assert_eq!(chat.workspace_id.as_deref(), Some(ws.as_str()));
    let results = tool_results(&env.messages(&chat.id).await);
    assert!(results[0].2.contains(&ws), "{}", results[0].2);
    assert_eq!(env.admin.list_workspaces().await.expect("list").len(), 1);
    let listed = env.admin.list_workspaces().await.expect("list");
    assert_eq!(listed[0].status, WorkspaceStatus::Ready);
    // Bad template parameters are a 400 before anything is made.
    let (status, body) = env
        .admin
        .raw(Method::POST, "/api/v1/workspaces", Some(json!({"template_id": template.id, "parameters": {"x": 1}})))
        .await
        .expect("bad");
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
}
