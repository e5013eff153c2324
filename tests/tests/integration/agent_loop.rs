//! The agent loop's edges: frames sent on the stream socket, a connection reset mid-answer, the
//! step limit, the deployment prompt, parallel tool calls.

use std::sync::{Arc, Mutex};

use agentplane_actors::ports::{ModelClient, ModelError, ModelRequest, ModelStream};
use agentplane_schema::api::{BusyBehavior, ChatErrorKind, ChatStatus};
use agentplane_schema::event::{ClientFrame, DeltaKind, EventBody};
use agentplane_schema::message::{Part, Role};
use agentplane_tests::{Reply, ScriptedCall, ScriptedLlm};
use serde_json::json;

use crate::common::{
    Db, ProviderSetup, TestEnv, WAIT, assert_seqs_follow, is_status, is_tool_started, reset_mid_stream_turn,
    tool_results,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_and_interrupt_frames_on_the_socket_work() {
    let env = TestEnv::start().await;
    let (chat, mut stream) = env.idle_chat("ready").await;
    env.llm.push_all([Reply::text("on it").then_hang(), Reply::text("done via socket")]);
    stream
        .send_frame(&ClientFrame::Send {
            content: vec![Part::text("from the socket")],
            busy_behavior: BusyBehavior::Queue,
        })
        .await
        .expect("send frame");
    // The new answer's own delta: deltas of "ready" published before the socket's snapshot may
    // still arrive after it.
    stream
        .wait_for(|e| matches!(&e.body, EventBody::MessageDelta { text, .. } if text.starts_with('o')), WAIT)
        .await
        .expect("streams");
    stream.send_frame(&ClientFrame::Interrupt).await.expect("interrupt frame");
    stream.wait_for(is_status(ChatStatus::Idle), WAIT).await.expect("idle");
    let messages = env.messages(&chat.id).await;
    let last = messages.last().expect("last");
    assert_eq!((last.role, last.text().as_str(), last.interrupted), (Role::Assistant, "on it", true));
    assert_eq!(messages[messages.len() - 2].text(), "from the socket");
}

/// A delta as a watcher saw it: (kind, text, call id, tool name).
type SeenDelta = (DeltaKind, String, Option<String>, Option<String>);

/// The deltas a watcher saw until the turn ended.
async fn deltas_of_turn(stream: &mut agentplane_tests::EventStream) -> Vec<SeenDelta> {
    let mut deltas = Vec::new();
    stream
        .wait_for(
            |e| match &e.body {
                EventBody::MessageDelta { kind, text, call_id, name } => {
                    deltas.push((*kind, text.clone(), call_id.clone(), name.clone()));
                    false
                }
                EventBody::Status { status: ChatStatus::Idle, .. } => true,
                _ => false,
            },
            WAIT,
        )
        .await
        .expect("the turn ends");
    deltas
}

/// An answer the model wrote at once reaches the server together: its pieces (ten of text,
/// eleven of a tool call's arguments) go to watchers merged, in order, each tool call's
/// arguments in deltas of their own that name the call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pieces_that_arrive_together_reach_watchers_merged() {
    const TEXT: &str = "one two three four five six seven eig";
    let args = json!({"template": "none", "note": "hello there"});
    let env = TestEnv::start().await;
    let (chat, mut stream) = env.idle_chat("ready").await;
    env.llm.push_all([
        Reply::tool_call("list_templates", args.to_string()).with_text(TEXT).chunk_chars(4),
        Reply::text(TEXT).chunk_chars(4),
    ]);
    env.send(&chat.id, "go").await;
    let deltas = deltas_of_turn(&mut stream).await;
    let texts: Vec<&str> = deltas.iter().filter(|d| d.0 == DeltaKind::Text).map(|d| d.1.as_str()).collect();
    let pieces = TEXT.len().div_ceil(4);
    assert_eq!(texts.concat(), format!("{TEXT}{TEXT}"), "both answers' text, whole and in order");
    assert!(texts.len() < 2 * pieces, "{} text deltas for {} pieces: {texts:?}", texts.len(), 2 * pieces);
    let calls: Vec<_> = deltas.iter().filter(|d| d.0 == DeltaKind::ToolArgs).collect();
    let arguments: String = calls.iter().map(|d| d.1.as_str()).collect();
    assert_eq!(serde_json::from_str::<serde_json::Value>(&arguments).expect("whole arguments"), args);
    assert!(calls.len() < args.to_string().len().div_ceil(4), "{} argument deltas: {calls:?}", calls.len());
    assert_eq!(calls[0].3.as_deref(), Some("list_templates"), "the call's first delta names it");
    assert!(calls.iter().all(|d| d.2 == calls[0].2 && d.2.is_some()), "every piece names its call: {calls:?}");
    let messages = env.messages(&chat.id).await;
    assert_eq!(messages.last().expect("answer").text(), TEXT);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_reset_mid_answer_resets_the_stream_and_retries() {
    let env = TestEnv::start().await;
    reset_mid_stream_turn(&env).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_step_limit_ends_a_runaway_turn() {
    let env = TestEnv::start_with(Db::Sqlite, |s| s.agent.max_steps = 3).await;
    let (chat, mut stream) = env.idle_chat("ready").await;
    env.llm.push_all((0..5).map(|_| Reply::tool_call("list_templates", json!({}))));
    env.send(&chat.id, "loop forever").await;
    stream.wait_for(is_status(ChatStatus::Error), WAIT).await.expect("error");
    let error = env.admin.get_chat(&chat.id).await.expect("chat").chat.error.expect("error");
    assert_eq!(error.kind, ChatErrorKind::Internal);
    assert!(error.message.contains("step limit (3 steps)"), "{}", error.message);
    assert_eq!(tool_results(&env.messages(&chat.id).await).len(), 3);
    assert_eq!(env.llm.pending(), 2, "no model call after the limit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_deployment_prompt_reaches_the_model_and_parallel_calls_all_run() {
    let env = TestEnv::start_with(Db::Sqlite, |s| s.agent.system_prompt = "Always answer in French.".into()).await;
    let (chat, mut stream) = env.idle_chat("prêt").await;
    let system = env.llm.requests()[0].system_prompt().expect("system prompt");
    assert!(system.contains("create_workspace") && system.ends_with("Always answer in French."), "{system}");

    env.llm.push_all([
        Reply::tool_call("create_workspace", json!({"template_id": "local"})),
        Reply::calls([
            ScriptedCall::new("write_file", json!({"path": "a.txt", "content": "a"})),
            ScriptedCall::new("write_file", json!({"path": "b.txt", "content": "b"})),
            ScriptedCall::new("execute", json!({"command": "echo parallel"})),
        ]),
        Reply::text("fini"),
    ]);
    env.send(&chat.id, "write two files").await;
    stream.wait_for(is_status(ChatStatus::Idle), WAIT).await.expect("idle");
    let messages = env.messages(&chat.id).await;
    let tool_message = messages.iter().rev().find(|m| m.role == Role::Tool).expect("tool results");
    assert_eq!(tool_message.parts.len(), 3, "one message carries all three results, in call order");
    let ws = env.admin.get_chat(&chat.id).await.expect("chat").chat.workspace_id.expect("workspace");
    assert_eq!(std::fs::read_to_string(env.workspace_dir(&ws).join("a.txt")).expect("a"), "a");
    assert_eq!(std::fs::read_to_string(env.workspace_dir(&ws).join("b.txt")).expect("b"), "b");
    let last_request = env.llm.requests().pop().expect("request");
    assert_eq!(last_request.tool_result_count(), 4);
}

/// The kind and commit time of each stored event of `chat_id`, in `seq` order. Every event of
/// one transaction carries the same time, and two commits of one chat never share one.
async fn stored_events(env: &TestEnv, chat_id: &str) -> Vec<(String, chrono::DateTime<chrono::Utc>)> {
    use agentplane_schema::db::entities::chat_events;
    use sea_orm::{ColumnTrait, EntityTrait, QueryFilter, QueryOrder};
    let db = agentplane_schema::db::connect(&env.settings.database_url(), 1).await.expect("database");
    let rows = chat_events::Entity::find()
        .filter(chat_events::Column::ChatId.eq(chat_id))
        .order_by_asc(chat_events::Column::Seq)
        .all(&db)
        .await
        .expect("events");
    rows.into_iter().map(|r| (r.kind, r.created_at)).collect()
}

/// A turn's last answer (no tool call) and the turn's end are stored in one transaction: the
/// chat does not pay a commit of its own for going `idle`.
async fn the_last_answer_and_the_turns_end_are_one_commit(db: Db) {
    let env = TestEnv::start_with(db, |_| {}).await;
    let (chat, mut stream) = env.idle_chat("ready").await;
    env.llm.push_all([Reply::tool_call("list_templates", json!({})), Reply::text("done")]);
    env.send(&chat.id, "go").await;
    stream.wait_for(is_status(ChatStatus::Idle), WAIT).await.expect("idle");
    let events = stored_events(&env, &chat.id).await;
    let n = events.len();
    let last: Vec<&str> = events[n - 3..].iter().map(|(kind, _)| kind.as_str()).collect();
    assert_eq!(last, ["message", "usage", "status"], "{events:?}");
    assert!(events[n - 3..].iter().all(|(_, at)| at == &events[n - 1].1), "one commit: {events:?}");
    // The tool's result before it was a commit of its own.
    assert_eq!(events[n - 4].0, "message");
    assert_ne!(events[n - 4].1, events[n - 1].1, "{events:?}");
    let messages = env.messages(&chat.id).await;
    assert_eq!(messages.last().map(|m| (m.role, m.text())), Some((Role::Assistant, "done".into())));
    assert_eq!(env.admin.get_chat(&chat.id).await.expect("chat").chat.status, ChatStatus::Idle);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_last_answer_and_the_turns_end_are_one_commit_sqlite() {
    the_last_answer_and_the_turns_end_are_one_commit(Db::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_last_answer_and_the_turns_end_are_one_commit_postgres() {
    the_last_answer_and_the_turns_end_are_one_commit(Db::Postgres).await;
}

/// The real model client, recording for each request whether the conversation's memo held the
/// text of an earlier prompt when the request was made.
fn memo_probe(held: Arc<Mutex<Vec<bool>>>) -> agentplane::server::ModelLayer {
    struct Probe {
        inner: Arc<dyn ModelClient>,
        held: Arc<Mutex<Vec<bool>>>,
    }
    #[async_trait::async_trait]
    impl ModelClient for Probe {
        async fn stream(&self, request: ModelRequest) -> Result<ModelStream, ModelError> {
            self.held.lock().expect("lock").push(!request.memo.is_empty());
            self.inner.stream(request).await
        }
    }
    Box::new(move |inner| Arc::new(Probe { inner, held }))
}

/// Two turns of one chat, the second `pause` after the first ended: whether the second turn's
/// model call found the first prompt's text still kept, with `agent.keep_prompt_idle_ms` = `keep_ms`.
async fn prompt_kept_across(keep_ms: u64, pause: std::time::Duration) -> Vec<bool> {
    let held = Arc::new(Mutex::new(Vec::new()));
    let llm = ScriptedLlm::start();
    let provider = ProviderSetup::openai_compatible(&llm);
    let layer = Some(memo_probe(held.clone()));
    let env = TestEnv::start_layered(llm, provider, Db::Sqlite, |s| s.agent.keep_prompt_idle_ms = keep_ms, layer).await;
    let (chat, mut stream) = env.idle_chat("first answer").await;
    tokio::time::sleep(pause).await;
    env.llm.push(Reply::text("second answer"));
    env.send(&chat.id, "again").await;
    stream
        .wait_for(|e| matches!(&e.body, EventBody::Message { message } if message.text() == "second answer"), WAIT)
        .await
        .expect("second answer");
    held.lock().expect("lock").clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_chat_keeps_its_last_prompt_for_a_while_then_lets_it_go() {
    use std::time::Duration;
    // Kept for the next turn; the first call of a chat finds nothing.
    assert_eq!(prompt_kept_across(60_000, Duration::ZERO).await, [false, true]);
    // Let go when the turn ends.
    assert_eq!(prompt_kept_across(0, Duration::ZERO).await, [false, false]);
    // Let go once the chat was idle for longer than the setting.
    assert_eq!(prompt_kept_across(50, Duration::from_millis(400)).await, [false, false]);
}

/// A step's results land while the next model request is already out. Another connection holds
/// SQLite's write lock while a tool runs, so the results cannot be stored until it lets go: the
/// next request still reaches the model meanwhile, nothing of its answer reaches watchers before
/// the results, and once the lock is free everything lands in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_next_model_request_goes_out_while_the_results_land() {
    use agentplane_schema::event::ToolPhase;
    use sea_orm::{ConnectionTrait, TransactionTrait};
    let env = TestEnv::start().await;
    let (chat, mut stream) = env.idle_chat("ready").await;
    env.llm.push_all([
        Reply::tool_call("create_workspace", json!({"template_id": "local"})),
        Reply::tool_call("execute", json!({"command": "sleep 1; echo slept"})),
        Reply::text("done"),
    ]);
    env.send(&chat.id, "wait a moment").await;
    let mut events = stream.wait_for(is_tool_started("execute"), WAIT).await.expect("the execute call starts");
    let db = env.database_beside().await;
    let lock = db.begin().await.expect("begin");
    lock.execute_unprepared("DELETE FROM chats WHERE 0").await.expect("take the write lock");

    // The call finishes while the lock is held; the answer is asked for all the same.
    let requests = env.llm.wait_for_requests(4, WAIT).await.expect("the next model request");
    assert_eq!(requests[3].tool_result_count(), 2, "it carries the execute call's result");
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_millis(300);
    while let Ok(Ok(event)) = tokio::time::timeout_at(deadline, stream.next_event(WAIT)).await {
        assert!(
            !matches!(
                &event.body,
                EventBody::ToolCall { phase: ToolPhase::Finished, .. }
                    | EventBody::Message { .. }
                    | EventBody::MessageDelta { .. }
            ),
            "reached a watcher before the results were stored: {event:?}"
        );
        events.push(event);
    }
    lock.rollback().await.expect("let go of the lock");

    let rest = stream.wait_for(is_status(ChatStatus::Idle), WAIT).await.expect("idle");
    let finished = rest
        .iter()
        .position(|e| matches!(&e.body, EventBody::ToolCall { phase: ToolPhase::Finished, .. }))
        .expect("the call's finish");
    let results = rest
        .iter()
        .position(|e| matches!(&e.body, EventBody::Message { message } if message.role == Role::Tool))
        .expect("the results message");
    let first_delta =
        rest.iter().position(|e| matches!(&e.body, EventBody::MessageDelta { .. })).expect("the answer's deltas");
    assert!(finished < results && results < first_delta, "out of order: {rest:?}");
    events.extend(rest);
    assert_seqs_follow(&events);
    let stored = tool_results(&env.messages(&chat.id).await);
    assert!(stored.iter().any(|(_, name, result, _)| name == "execute" && result.contains("slept")), "{stored:?}");
}

/// Results that cannot be stored end the turn with an error even though the next model request
/// may already be out; the chat stays usable and its memory matches the database.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_that_cannot_be_stored_end_the_turn_and_the_chat_goes_on() {
    use sea_orm::ConnectionTrait;
    let env = TestEnv::start().await;
    let (chat, mut stream) = env.idle_chat("ready").await;
    let db = env.database_beside().await;
    db.execute_unprepared(
        "CREATE TRIGGER no_tool_results BEFORE INSERT ON messages WHEN NEW.role = 'tool' \
         BEGIN SELECT RAISE(ABORT, 'injected: no tool results'); END",
    )
    .await
    .expect("trigger");
    env.llm.push_all([Reply::tool_call("list_templates", json!({})), Reply::text("never seen")]);
    env.send(&chat.id, "list the templates").await;
    let mut events = stream.wait_for(is_status(ChatStatus::Error), WAIT).await.expect("error");
    let error = env.admin.get_chat(&chat.id).await.expect("chat").chat.error.expect("error");
    assert_eq!(error.kind, ChatErrorKind::Internal);
    assert!(error.message.contains("tool results could not be stored"), "{}", error.message);
    assert!(!events.iter().any(|e| format!("{:?}", e.body).contains("never seen")), "no answer went out");

    db.execute_unprepared("DROP TRIGGER no_tool_results").await.expect("drop the trigger");
    // The failed turn may have asked for its answer before it heard of the failure, or not:
    // the next turn gets what is left.
    let answer = if env.llm.pending() == 0 {
        env.llm.push(Reply::text("back"));
        "back"
    } else {
        "never seen"
    };
    let asked_before = env.llm.request_count();
    env.send(&chat.id, "again").await;
    events.extend(stream.wait_for(is_status(ChatStatus::Idle), WAIT).await.expect("idle"));
    assert_seqs_follow(&events);
    let messages = env.messages(&chat.id).await;
    assert!(!messages.iter().any(|m| m.role == Role::Tool), "the unstored results are nowhere");
    assert_eq!(messages.last().map(|m| m.text()), Some(answer.to_string()));
    let last = env.llm.requests().pop().expect("request");
    assert!(env.llm.request_count() > asked_before);
    assert_eq!(last.tool_result_count(), 0, "nor in what the model is sent");
}
