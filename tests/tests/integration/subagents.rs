//! Sub-agents as an actor tree: spawned children run in parallel in the parent's workspace,
//! report back through wait_agent, show up as `subagent` events, and respect the limits.

use agentplane_schema::api::ChatStatus;
use agentplane_schema::event::{EventBody, SubagentPhase, SubagentStatus};
use agentplane_schema::message::Part;
use agentplane_tests::{EventStream, RecordedRequest, Reply, ScriptedCall, ScriptedLlm};
use serde_json::{Value, json};

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use agentplane_actors::ports::{ModelClient, ModelError, ModelRequest, ModelStream};

use crate::common::{ADMIN_TOKEN, Db, ProviderSetup, TestEnv, WAIT, is_status, tool_results};

fn first_user_text(r: &RecordedRequest) -> String {
    r.messages()
        .iter()
        .find(|m| m["role"] == "user")
        .and_then(|m| m["content"].as_str().map(str::to_string))
        .unwrap_or_default()
}

/// The root creates a workspace, spawns one sub-agent per file, waits for all, and reports; each
/// sub-agent writes its file with timestamps around a pause, so overlap proves parallelism.
fn responder(r: &RecordedRequest) -> Reply {
    let first = first_user_text(r);
    let results = r.tool_results();
    if let Some(file) = first.strip_prefix("write ") {
        return match results.len() {
            0 => Reply::tool_call(
                "execute",
                json!({"command": format!("date +%s.%N > {file}.start; sleep 0.6; echo {file} > {file}; date +%s.%N > {file}.end")}),
            ),
            _ => Reply::text(format!("wrote {file}")),
        };
    }
    match results.len() {
        0 => Reply::tool_call("create_workspace", json!({"template_id": "local"})),
        1 => Reply::calls(["a.txt", "b.txt", "c.txt"].map(|f| {
            ScriptedCall::new("spawn_agent", json!({"prompt": format!("write {f}"), "title": format!("writer {f}")}))
        })),
        4 => {
            let ids: Vec<String> = results[1..]
                .iter()
                .filter_map(|r| serde_json::from_str::<Value>(r).ok()?["agent_id"].as_str().map(str::to_string))
                .collect();
            Reply::tool_call("wait_agent", json!({"agent_ids": ids, "timeout_seconds": 60}))
        }
        _ => Reply::text("all three done"),
    }
}

fn secs(path: &std::path::Path) -> f64 {
    std::fs::read_to_string(path).expect("timestamp").trim().parse().expect("seconds")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn root_spawns_three_parallel_sub_agents_and_collects_their_reports() {
    let env = TestEnv::start_full(ScriptedLlm::with_responder(responder), Db::Sqlite, |_| {}).await;
    let chat = env.create_chat("split the work").await;
    let mut stream = EventStream::connect(&env.base_url(), &chat.id, ADMIN_TOKEN, Some(0)).await.expect("ws");
    let events = stream.wait_for(is_status(ChatStatus::Idle), WAIT).await.expect("root idle");

    let messages = env.messages(&chat.id).await;
    assert_eq!(messages.last().expect("last").text(), "all three done");
    let results = tool_results(&messages);
    let wait = &results.last().expect("wait_agent result").2;
    let reports: Vec<Value> = serde_json::from_str(wait).expect("json reports");
    let mut texts: Vec<&str> = reports.iter().map(|r| r["report"].as_str().unwrap_or_default()).collect();
    texts.sort();
    assert_eq!(texts, ["wrote a.txt", "wrote b.txt", "wrote c.txt"], "{wait}");
    assert!(reports.iter().all(|r| r["status"] == "finished" && r["timed_out"] == false), "{wait}");

    // The three wrote into the parent's workspace, at the same time.
    let ws = env.admin.get_chat(&chat.id).await.expect("chat").chat.workspace_id.expect("workspace");
    let dir = env.workspace_dir(&ws);
    let mut starts = Vec::new();
    let mut ends = Vec::new();
    for f in ["a.txt", "b.txt", "c.txt"] {
        assert_eq!(std::fs::read_to_string(dir.join(f)).expect("file").trim(), f);
        starts.push(secs(&dir.join(format!("{f}.start"))));
        ends.push(secs(&dir.join(format!("{f}.end"))));
    }
    let latest_start = starts.iter().cloned().fold(f64::MIN, f64::max);
    let earliest_end = ends.iter().cloned().fold(f64::MAX, f64::min);
    assert!(latest_start < earliest_end, "the sub-agents ran concurrently: starts {starts:?} ends {ends:?}");

    // The parent's stream told the story; the chat lists its children.
    let spawned =
        events.iter().filter(|e| matches!(&e.body, EventBody::Subagent { phase: SubagentPhase::Spawned, .. })).count();
    let finished = events
        .iter()
        .filter(|e| matches!(&e.body, EventBody::Subagent { status: Some(SubagentStatus::Finished), .. }))
        .count();
    assert_eq!((spawned, finished), (3, 3));
    let detail = env.admin.get_chat(&chat.id).await.expect("chat");
    assert_eq!(detail.children.len(), 3);
    assert!(
        detail
            .children
            .iter()
            .all(|c| c.parent_id.as_deref() == Some(chat.id.as_str()) && c.status == ChatStatus::Idle)
    );
    assert!(detail.children.iter().all(|c| c.workspace_id.as_deref() == Some(ws.as_str())));
    // Each child's own stream and history work like any chat's.
    let child = &detail.children[0];
    let history = env.messages(&child.id).await;
    assert!(history.last().expect("child answer").text().starts_with("wrote "));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn depth_and_children_limits_refuse_with_a_clear_tool_error() {
    let responder = |r: &RecordedRequest| {
        let first = first_user_text(r);
        let results = r.tool_results();
        if first == "child: try to go deeper" {
            return match results.len() {
                0 => Reply::tool_call("spawn_agent", json!({"prompt": "grandchild"})),
                _ => Reply::text(format!("child saw: {}", results[0])),
            };
        }
        match results.len() {
            0 => Reply::calls([
                ScriptedCall::new("spawn_agent", json!({"prompt": "child: try to go deeper"})),
                ScriptedCall::new("spawn_agent", json!({"prompt": "child: try to go deeper"})),
                ScriptedCall::new("spawn_agent", json!({"prompt": "child: try to go deeper"})),
            ]),
            3 => {
                let ids: Vec<String> = results
                    .iter()
                    .filter_map(|r| serde_json::from_str::<Value>(r).ok()?["agent_id"].as_str().map(str::to_string))
                    .collect();
                Reply::tool_call("wait_agent", json!({"agent_ids": ids}))
            }
            _ => Reply::text("done"),
        }
    };
    let env = TestEnv::start_full(ScriptedLlm::with_responder(responder), Db::Sqlite, |s| {
        s.agent.max_children = 2;
        s.agent.max_depth = 1;
    })
    .await;
    let chat = env.create_chat("spawn three").await;
    env.admin.wait_until_chat(&chat.id, |c| c.status == ChatStatus::Idle, WAIT).await.expect("idle");
    let results = tool_results(&env.messages(&chat.id).await);
    let refused: Vec<&(String, String, String, bool)> = results.iter().filter(|r| r.3).collect();
    assert_eq!(refused.len(), 1, "{results:#?}");
    assert!(refused[0].2.contains("at most 2 sub-agents may run at once"), "{}", refused[0].2);
    let reports = &results.last().expect("wait").2;
    assert!(reports.contains("nested at most 1 level"), "the children were refused a grandchild: {reports}");
}

fn ids_in(results: &[String]) -> Vec<String> {
    results
        .iter()
        .filter_map(|r| serde_json::from_str::<Value>(r).ok()?["agent_id"].as_str().map(str::to_string))
        .collect()
}

async fn wait_no_active_replies(env: &TestEnv) {
    let deadline = std::time::Instant::now() + WAIT;
    while env.llm.active_replies() > 0 {
        assert!(std::time::Instant::now() < deadline, "model streams are still open");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_agent_stops_a_child_and_its_child_and_nothing_runs_after() {
    let responder = |r: &RecordedRequest| {
        let first = first_user_text(r);
        let results = r.tool_results();
        match first.as_str() {
            "grandchild: think forever" => Reply::text("thinking").then_hang(),
            "child: delegate, then think" => match results.len() {
                0 => Reply::tool_call("spawn_agent", json!({"prompt": "grandchild: think forever"})),
                _ => Reply::text("also thinking").then_hang(),
            },
            _ => match results.len() {
                0 => Reply::tool_call("spawn_agent", json!({"prompt": "child: delegate, then think"})),
                // Give the tree a moment to grow, then close it.
                1 => Reply::tool_call("wait_agent", json!({"agent_ids": ids_in(&results), "timeout_seconds": 1})),
                2 => Reply::tool_call("close_agent", json!({"agent_id": ids_in(&results)[0]})),
                _ => Reply::text("closed it"),
            },
        }
    };
    let env = TestEnv::start_full(ScriptedLlm::with_responder(responder), Db::Sqlite, |_| {}).await;
    let chat = env.create_chat("run a tree").await;
    env.admin.wait_until_chat(&chat.id, |c| c.status == ChatStatus::Idle, WAIT).await.expect("root idle");
    let results = tool_results(&env.messages(&chat.id).await);
    assert!(results[1].2.contains("\"timed_out\":true"), "the child was still running: {}", results[1].2);
    assert!(!results[2].3, "{}", results[2].2);

    let child = env.admin.get_chat(&chat.id).await.expect("root").children.pop().expect("child");
    let grandchild = env.admin.get_chat(&child.id).await.expect("child").children.pop().expect("grandchild");
    for c in [&child.id, &grandchild.id] {
        assert_eq!(env.admin.get_chat(c).await.expect("chat").chat.status, ChatStatus::Idle, "{c} stopped");
    }
    wait_no_active_replies(&env).await;
    let requests = env.llm.request_count();
    let calls =
        tool_results(&env.messages(&child.id).await).len() + tool_results(&env.messages(&grandchild.id).await).len();
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert_eq!(env.llm.request_count(), requests, "no model call after the close");
    let calls_after =
        tool_results(&env.messages(&child.id).await).len() + tool_results(&env.messages(&grandchild.id).await).len();
    assert_eq!(calls, calls_after, "no tool call after the close");
}

/// The running sub-agents a new watcher's snapshot lists.
async fn snapshot_subagents(env: &TestEnv, chat_id: &str) -> Vec<(String, Option<String>)> {
    let mut stream = EventStream::connect(&env.base_url(), chat_id, ADMIN_TOKEN, None).await.expect("ws");
    match stream.next_event(WAIT).await.expect("snapshot").body {
        EventBody::Snapshot { running_subagents, .. } => {
            running_subagents.into_iter().map(|s| (s.agent_id, s.title)).collect()
        }
        other => panic!("a stream starts with its snapshot, not {}", other.kind()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interrupting_the_root_stops_all_running_descendants() {
    let (env, chat, mut stream) = root_with_a_streaming_child().await;
    let child = env.admin.get_chat(&chat.id).await.expect("root").children.pop().expect("child");
    assert_eq!(
        snapshot_subagents(&env, &chat.id).await,
        [(child.id.clone(), child.title.clone())],
        "a watcher who joins now sees the sub-agent running"
    );
    env.admin.interrupt(&chat.id).await.expect("interrupt");
    stream.wait_for(is_status(ChatStatus::Idle), WAIT).await.expect("root idle");
    env.admin.wait_until_chat(&child.id, |c| c.status == ChatStatus::Idle, WAIT).await.expect("child idle");
    wait_no_active_replies(&env).await;
    assert!(env.messages(&child.id).await.last().expect("partial").interrupted);
    assert!(snapshot_subagents(&env, &chat.id).await.is_empty(), "none runs any more");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn archiving_the_root_stops_and_archives_the_whole_tree() {
    let (env, chat, mut stream) = root_with_a_streaming_child().await;
    let patched = env
        .admin
        .patch_chat(&chat.id, &agentplane_schema::api::PatchChat { title: None, archived: Some(true) })
        .await
        .expect("archive");
    assert!(patched.archived);
    stream.wait_for(is_status(ChatStatus::Idle), WAIT).await.expect("root idle");
    let child = env.admin.get_chat(&chat.id).await.expect("root").children.pop().expect("child");
    let child = env.admin.wait_until_chat(&child.id, |c| c.status == ChatStatus::Idle, WAIT).await.expect("child idle");
    assert!(child.archived, "the sub-agent is archived with its root");
    wait_no_active_replies(&env).await;
    assert!(env.messages(&child.id).await.last().expect("partial").interrupted);
}

/// A root whose sub-agent is streaming an answer that never ends, while the root streams too.
async fn root_with_a_streaming_child() -> (TestEnv, agentplane_schema::api::Chat, EventStream) {
    let responder = |r: &RecordedRequest| {
        let first = first_user_text(r);
        match (first.as_str(), r.tool_results().len()) {
            ("child: think forever", _) => Reply::text("child thinking").then_hang(),
            (_, 0) => Reply::tool_call("spawn_agent", json!({"prompt": "child: think forever"})),
            _ => Reply::text("root thinking").then_hang(),
        }
    };
    let env = TestEnv::start_full(ScriptedLlm::with_responder(responder), Db::Sqlite, |_| {}).await;
    let chat = env.create_chat("start").await;
    let mut stream = EventStream::connect(&env.base_url(), &chat.id, ADMIN_TOKEN, Some(0)).await.expect("ws");
    stream
        .wait_for(|e| matches!(&e.body, EventBody::Subagent { phase: SubagentPhase::Spawned, .. }), WAIT)
        .await
        .expect("spawned");
    // Both are streaming: the root's second answer and the child's first.
    let deadline = std::time::Instant::now() + WAIT;
    while env.llm.active_replies() < 2 {
        assert!(std::time::Instant::now() < deadline, "both streams open");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    (env, chat, stream)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_agent_reaches_a_running_child_at_once_with_interrupt() {
    let responder = |r: &RecordedRequest| {
        let first = first_user_text(r);
        let results = r.tool_results();
        match first.as_str() {
            "child: think" if r.last_user_text().as_deref() == Some("change of plan") => Reply::text("new plan taken"),
            "child: think" => Reply::text("child thinking").then_hang(),
            _ => match results.len() {
                0 => Reply::tool_call("spawn_agent", json!({"prompt": "child: think"})),
                1 => Reply::tool_call(
                    "message_agent",
                    json!({"agent_id": ids_in(&results)[0], "message": "change of plan", "interrupt": true}),
                ),
                2 => Reply::tool_call("wait_agent", json!({"agent_ids": ids_in(&results[..1])})),
                _ => Reply::text("child replanned"),
            },
        }
    };
    let env = TestEnv::start_full(ScriptedLlm::with_responder(responder), Db::Sqlite, |_| {}).await;
    let chat = env.create_chat("go").await;
    env.admin.wait_until_chat(&chat.id, |c| c.status == ChatStatus::Idle, WAIT).await.expect("root idle");
    let results = tool_results(&env.messages(&chat.id).await);
    assert!(results[2].2.contains("new plan taken"), "{}", results[2].2);
    let child = env.admin.get_chat(&chat.id).await.expect("root").children.pop().expect("child");
    let texts: Vec<(String, bool)> = env.messages(&child.id).await.iter().map(|m| (m.text(), m.interrupted)).collect();
    assert_eq!(
        texts,
        [
            ("child: think".to_string(), false),
            ("child thinking".to_string(), true),
            ("change of plan".to_string(), false),
            ("new plan taken".to_string(), false)
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_restart_the_tree_is_visible_and_the_root_answers() {
    let responder = |r: &RecordedRequest| {
        let first = first_user_text(r);
        if first == "child: idle along" {
            return Reply::text("child waiting").then_hang();
        }
        if r.last_user_text().as_deref() == Some("still there?") {
            return Reply::text("yes, after the restart");
        }
        match r.tool_results().len() {
            0 => Reply::tool_call("spawn_agent", json!({"prompt": "child: idle along"})),
            _ => Reply::text("root waiting").then_hang(),
        }
    };
    let mut env = TestEnv::start_full(ScriptedLlm::with_responder(responder), Db::Sqlite, |_| {}).await;
    let chat = env.create_chat("start a tree").await;
    let deadline = std::time::Instant::now() + WAIT;
    while env.llm.active_replies() < 2 {
        assert!(std::time::Instant::now() < deadline, "root and child streaming");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let child = env.admin.get_chat(&chat.id).await.expect("root").children.pop().expect("child");

    env.restart_server().await;

    let detail = env.admin.get_chat(&chat.id).await.expect("root after restart");
    assert_eq!(detail.children.iter().map(|c| c.id.as_str()).collect::<Vec<_>>(), [child.id.as_str()]);
    let outcome = env
        .admin
        .send(
            &chat.id,
            &agentplane_schema::api::SendMessage {
                content: vec![Part::text("still there?")],
                busy_behavior: agentplane_schema::api::BusyBehavior::Interrupt,
            },
        )
        .await
        .expect("send after restart");
    assert!(outcome.queued || outcome.message.is_some());
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let last = env.messages(&chat.id).await.pop().expect("messages");
        if last.text() == "yes, after the restart" {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the root answered after the restart (last: {})", last.text());
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    // The resumed child is still under the root: interrupting the root reaches it.
    env.admin.interrupt(&child.id).await.expect("interrupt child");
    env.admin.wait_until_chat(&child.id, |c| c.status == ChatStatus::Idle, WAIT).await.expect("child idle");
}

/// The server's real model client, except that a step whose conversation starts with a prompt
/// containing "crash" panics (like a bug in a provider client would): always for "crash always",
/// the first time for "crash once".
fn crashing_layer(crashes: Arc<AtomicUsize>) -> agentplane::server::ModelLayer {
    struct Crashing {
        inner: Arc<dyn ModelClient>,
        crashes: Arc<AtomicUsize>,
    }
    #[async_trait::async_trait]
    impl ModelClient for Crashing {
        async fn stream(&self, request: ModelRequest) -> Result<ModelStream, ModelError> {
            let first = request.messages.first().and_then(|m| match m.parts.first() {
                Some(Part::Text { text }) => Some(text.clone()),
                _ => None,
            });
            match first.as_deref() {
                Some("crash always") => {
                    self.crashes.fetch_add(1, Ordering::SeqCst);
                    panic!("provider client bug");
                }
                Some("crash once") if self.crashes.fetch_add(1, Ordering::SeqCst) == 0 => {
                    panic!("provider client bug");
                }
                _ => self.inner.stream(request).await,
            }
        }
    }
    Box::new(move |inner| Arc::new(Crashing { inner, crashes }))
}

/// Root: spawn one sub-agent with `prompt`, wait for it, then answer with what it reported.
fn supervising_responder(prompt: &'static str) -> impl Fn(&RecordedRequest) -> Reply + Send + Sync + 'static {
    move |r: &RecordedRequest| {
        let first = first_user_text(r);
        if first.starts_with("crash") {
            return Reply::text("recovered and done");
        }
        let results = r.tool_results();
        match results.len() {
            0 => Reply::tool_call("spawn_agent", json!({"prompt": prompt})),
            1 => {
                let id = serde_json::from_str::<Value>(&results[0])
                    .ok()
                    .and_then(|v| v["agent_id"].as_str().map(str::to_string));
                Reply::tool_call("wait_agent", json!({"agent_ids": [id], "timeout_seconds": 30}))
            }
            _ => Reply::text(format!("child said: {}", results[1])),
        }
    }
}

async fn supervised(
    prompt: &'static str,
    restarts: u32,
) -> (TestEnv, Arc<AtomicUsize>, String, Vec<agentplane_schema::event::StreamEvent>) {
    let crashes = Arc::new(AtomicUsize::new(0));
    let llm = ScriptedLlm::with_responder(supervising_responder(prompt));
    let provider = ProviderSetup::openai_compatible(&llm);
    let env = TestEnv::start_layered(
        llm,
        provider,
        Db::Sqlite,
        |s| s.agent.step_crash_restarts = restarts,
        Some(crashing_layer(crashes.clone())),
    )
    .await;
    let chat = env.create_chat("delegate").await;
    let mut stream = EventStream::connect(&env.base_url(), &chat.id, ADMIN_TOKEN, Some(0)).await.expect("ws");
    let events = stream.wait_for(is_status(ChatStatus::Idle), WAIT).await.expect("root idle");
    (env, crashes, chat.id, events)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashing_sub_agent_is_reported_failed_and_nothing_else_is_hurt() {
    let (env, crashes, root, events) = supervised("crash always", 0).await;
    assert_eq!(crashes.load(Ordering::SeqCst), 1, "no restart with the policy at 0");
    let answer = env.messages(&root).await.last().expect("answer").text();
    assert!(
        answer.contains("\"status\":\"failed\"") && answer.contains("the step crashed: provider client bug"),
        "{answer}"
    );
    assert!(events.iter().any(|e| matches!(&e.body, EventBody::Subagent { status: Some(SubagentStatus::Failed), .. })));
    let child = &env.admin.get_chat(&root).await.expect("root").children[0];
    assert_eq!(child.status, ChatStatus::Error);
    assert_eq!(child.error.as_ref().map(|e| e.kind), Some(agentplane_schema::api::ChatErrorKind::Internal));

    // The root and an unrelated chat keep working.
    let (other, _) = env.idle_chat("unrelated answer").await;
    assert_eq!(env.messages(&other.id).await.last().expect("answer").text(), "unrelated answer");
    let mut stream = EventStream::connect(&env.base_url(), &root, ADMIN_TOKEN, None).await.expect("ws");
    env.llm.push(Reply::text("yes, still here"));
    env.send(&root, "still there?").await;
    stream.wait_for_status(ChatStatus::Idle, WAIT).await.expect("root answers again");
    assert_eq!(env.messages(&root).await.last().expect("answer").text(), "yes, still here");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_step_is_restarted_from_the_database_by_default() {
    let (env, crashes, root, events) = supervised("crash once", 1).await;
    assert_eq!(crashes.load(Ordering::SeqCst), 2, "crashed once, then ran again");
    let answer = env.messages(&root).await.last().expect("answer").text();
    assert!(answer.contains("recovered and done") && answer.contains("\"status\":\"finished\""), "{answer}");
    assert!(
        events.iter().any(|e| matches!(&e.body, EventBody::Subagent { status: Some(SubagentStatus::Finished), .. }))
    );
    let child = &env.admin.get_chat(&root).await.expect("root").children[0];
    assert_eq!(child.status, ChatStatus::Idle);
    // The child's history holds its prompt and one answer: nothing of the crashed step.
    let history = env.messages(&child.id).await;
    let roles: Vec<_> = history.iter().map(|m| m.role).collect();
    assert_eq!(roles, [agentplane_schema::message::Role::User, agentplane_schema::message::Role::Assistant]);
}
