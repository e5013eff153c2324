//! Messages sent while the agent works: queued and delivered at the next step boundary, or
//! delivered at once with `interrupt`; queued messages can be deleted; nothing is lost.

use agentplane_schema::api::{BusyBehavior, Chat, ChatStatus, SendMessage};
use agentplane_schema::event::{DeltaKind, EventBody};
use agentplane_schema::message::{Part, Role};
use agentplane_tests::{EventStream, Reply, ScriptedLlm};
use serde_json::json;

use crate::common::{Db, TestEnv, WAIT, is_status, is_tool_started};

fn msg(text: &str, busy: BusyBehavior) -> SendMessage {
    SendMessage { content: vec![Part::text(text)], busy_behavior: busy }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_message_is_delivered_at_the_next_step_boundary() {
    let env = TestEnv::start().await;
    let (chat, mut stream) = env.idle_chat("ready").await;
    env.llm.push_all([
        Reply::tool_call("create_workspace", json!({"template_id": "local"})),
        // Holds the step open until the test creates `go` in the workspace.
        Reply::tool_call("execute", json!({"command": "while [ ! -f go ]; do sleep 0.02; done; echo released"})),
        Reply::text("handled both"),
    ]);
    env.send(&chat.id, "start working").await;
    stream.wait_for(is_tool_started("execute"), WAIT).await.expect("execute starts");

    let outcome = env.admin.send(&chat.id, &msg("also do this", BusyBehavior::Queue)).await.expect("send");
    assert!(outcome.queued);
    let queued = outcome.queued_message.expect("queued message");
    let page = env.admin.messages(&chat.id).await.expect("page");
    assert_eq!(page.queued_messages.len(), 1);
    assert_eq!(page.queued_messages[0].id, queued.id);
    stream
        .wait_for(|e| matches!(&e.body, EventBody::QueueUpdate { queued_messages } if queued_messages.len() == 1), WAIT)
        .await
        .expect("queue_update");
    // Not delivered while the step runs.
    assert!(env.messages(&chat.id).await.iter().all(|m| m.text() != "also do this"));

    let ws = env.admin.get_chat(&chat.id).await.expect("chat").chat.workspace_id.expect("workspace");
    std::fs::write(env.workspace_dir(&ws).join("go"), "").expect("release");
    stream.wait_for(is_status(ChatStatus::Idle), WAIT).await.expect("idle");

    let page = env.admin.messages(&chat.id).await.expect("page");
    assert!(page.queued_messages.is_empty());
    let roles: Vec<(Role, String)> = page.messages.iter().map(|m| (m.role, m.text())).collect();
    let n = roles.len();
    // ... assistant(execute call), tool(result), user(queued), assistant(final)
    assert_eq!(roles[n - 4].0, Role::Assistant);
    assert_eq!(roles[n - 3].0, Role::Tool);
    assert_eq!(roles[n - 2], (Role::User, "also do this".into()));
    assert_eq!(roles[n - 1], (Role::Assistant, "handled both".into()));
    let last_request = env.llm.requests().pop().expect("request");
    assert_eq!(last_request.last_user_text().as_deref(), Some("also do this"));
}

/// A message queued while the final answer (no tool calls) is on its way is delivered after that
/// answer, and the chat stays `running` until the turn it starts has answered: no `idle` between.
/// A chat whose model holds its answer to a message starting "go on" ("first answer") until the
/// test sends on the returned sender, after telling it through the returned receiver that the
/// request arrived; a message starting "also this" gets "second answer".
async fn chat_with_held_answer()
-> (TestEnv, Chat, EventStream, tokio::sync::mpsc::UnboundedReceiver<()>, std::sync::mpsc::Sender<()>) {
    let (arrived_tx, arrived) = tokio::sync::mpsc::unbounded_channel();
    let (release, gate) = std::sync::mpsc::channel::<()>();
    let gate = std::sync::Mutex::new(gate);
    // The scripted server's worker waits at the gate; a second worker answers the rest.
    let llm = ScriptedLlm::builder()
        .workers(2)
        .responder(move |req| match req.last_user_text().as_deref() {
            Some(text) if text.starts_with("go on") => {
                arrived_tx.send(()).expect("the test listens");
                gate.lock().expect("gate").recv().expect("released");
                Reply::text("first answer")
            }
            Some(text) if text.starts_with("also this") => Reply::text("second answer"),
            _ => Reply::text("ready"),
        })
        .start();
    let env = TestEnv::start_full(llm, Db::Sqlite, |_| {}).await;
    let (chat, stream) = env.idle_chat("ready").await;
    (env, chat, stream, arrived, release)
}

/// The other side of that race: a message queued after the answer's commit has already ended the
/// turn (`idle` in the same transaction) but before the chat actor heard the step was done. The
/// actor delivers it and sets the chat `running` again in the commit that does; nothing stays
/// queued on an idle chat.
///
/// The answer's commit is held by a write lock the test takes on the SQLite file itself (no hook
/// in the server). The message must reach the actor after the step decided to end the turn and
/// before that commit lands; nothing outside the actor shows those two moments, so each attempt
/// waits a little at each, then reads from the events which way it went. An attempt where the
/// message came first (the ordinary queue, the test below) is repeated, up to a bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_queued_after_the_answers_commit_ended_the_turn_starts_it_again() {
    use sea_orm::{ConnectionTrait, TransactionTrait};
    const ATTEMPTS: usize = 10;
    const SETTLE: std::time::Duration = std::time::Duration::from_millis(50);
    let (env, chat, mut stream, mut arrived, release) = chat_with_held_answer().await;
    // The test's own connection to the server's database file, to hold the write lock.
    let locker = env.database_beside().await;
    let texts = |events: &[agentplane_schema::event::StreamEvent]| -> Vec<String> {
        events
            .iter()
            .filter_map(|e| match &e.body {
                EventBody::Message { message } => Some(message.text()),
                EventBody::Status { status, .. } => Some(format!("<{}>", status.as_str())),
                _ => None,
            })
            .collect()
    };

    for attempt in 0..ATTEMPTS {
        env.send(&chat.id, &format!("go on {attempt}")).await;
        arrived.recv().await.expect("the model is asked");
        let lock = locker.begin().await.expect("begin");
        lock.execute_unprepared("UPDATE users SET name = name").await.expect("the write lock");
        release.send(()).expect("release the answer");
        // The answer streams (its deltas go out before its commit); then the step decides to
        // end the turn and waits for the lock.
        stream
            .wait_for(|e| matches!(&e.body, EventBody::MessageDelta { kind: DeltaKind::Text, .. }), WAIT)
            .await
            .expect("the answer streams");
        tokio::time::sleep(SETTLE).await;
        let text = format!("also this {attempt}");
        let send = {
            let (admin, chat_id, text) = (env.admin.clone(), chat.id.clone(), text.clone());
            tokio::spawn(async move { admin.send(&chat_id, &msg(&text, BusyBehavior::Queue)).await })
        };
        tokio::time::sleep(SETTLE).await;
        lock.rollback().await.expect("unlock");
        let outcome = send.await.expect("send task").expect("send");
        let first = texts(&stream.wait_for(is_status(ChatStatus::Idle), WAIT).await.expect("idle"));
        if !outcome.queued {
            // Too late: the actor had ended the turn too, and the message started one of its own.
            stream.wait_for(is_status(ChatStatus::Idle), WAIT).await.expect("its turn ends");
            continue;
        }
        if first.contains(&"second answer".to_string()) {
            // The message was queued before the step decided: delivered without an `idle`.
            assert_eq!(first, ["first answer", &text, "second answer", "<idle>"], "the ordinary queue");
            continue;
        }
        assert_eq!(first, ["first answer", "<idle>"], "the answer's commit ended the turn");
        let rest = texts(&stream.wait_for(is_status(ChatStatus::Idle), WAIT).await.expect("idle again"));
        assert_eq!(rest, [&text, "<running>", "second answer", "<idle>"], "the queued message started it again");
        let page = env.admin.messages(&chat.id).await.expect("page");
        assert!(page.queued_messages.is_empty(), "nothing stays queued");
        let stored: Vec<String> = page.messages.iter().rev().take(3).rev().map(|m| m.text()).collect();
        assert_eq!(stored, ["first answer", text.as_str(), "second answer"]);
        assert_eq!(env.admin.get_chat(&chat.id).await.expect("chat").chat.status, ChatStatus::Idle);
        return;
    }
    panic!("in {ATTEMPTS} attempts the message never reached the chat between the step's decision and its commit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_queued_during_the_final_answer_is_delivered_without_going_idle() {
    let (env, chat, mut stream, mut arrived, release) = chat_with_held_answer().await;

    env.send(&chat.id, "go on").await;
    arrived.recv().await.expect("the model is asked");
    let outcome = env.admin.send(&chat.id, &msg("also this", BusyBehavior::Queue)).await.expect("send");
    assert!(outcome.queued);
    stream
        .wait_for(|e| matches!(&e.body, EventBody::QueueUpdate { queued_messages } if queued_messages.len() == 1), WAIT)
        .await
        .expect("queue_update");
    release.send(()).expect("release the answer");

    let events = stream.wait_for(is_status(ChatStatus::Idle), WAIT).await.expect("idle");
    let messages: Vec<(Role, String)> = events
        .iter()
        .filter_map(|e| match &e.body {
            EventBody::Message { message } => Some((message.role, message.text())),
            _ => None,
        })
        .collect();
    assert_eq!(
        messages,
        [
            (Role::Assistant, "first answer".into()),
            (Role::User, "also this".into()),
            (Role::Assistant, "second answer".into())
        ],
        "the chat went idle before its queue was delivered"
    );
    let page = env.admin.messages(&chat.id).await.expect("page");
    assert!(page.queued_messages.is_empty());
    assert_eq!(env.admin.get_chat(&chat.id).await.expect("chat").chat.status, ChatStatus::Idle);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interrupt_delivers_at_once_and_keeps_the_partial_answer() {
    let env = TestEnv::start().await;
    let (chat, mut stream) = env.idle_chat("ready").await;
    env.llm.push_all([Reply::text("Let me think about this at length").then_hang(), Reply::text("changing course")]);
    env.send(&chat.id, "a long question").await;
    // The whole partial answer has streamed (the model then hangs): that is what must be kept.
    let mut streamed = String::new();
    stream
        .wait_for(
            |e| {
                if let EventBody::MessageDelta { kind: DeltaKind::Text, text, .. } = &e.body {
                    streamed.push_str(text);
                }
                streamed == "Let me think about this at length"
            },
            WAIT,
        )
        .await
        .expect("answer streams");

    let outcome = env.admin.send(&chat.id, &msg("stop, do this instead", BusyBehavior::Interrupt)).await.expect("send");
    assert!(outcome.queued);
    let events = stream.wait_for(is_status(ChatStatus::Idle), WAIT).await.expect("idle");
    assert!(events.iter().any(|e| matches!(&e.body, EventBody::Status { status: ChatStatus::Interrupting, .. })));

    let messages = env.messages(&chat.id).await;
    let tail: Vec<(Role, String, bool)> =
        messages.iter().rev().take(4).rev().map(|m| (m.role, m.text(), m.interrupted)).collect();
    assert_eq!(
        tail,
        [
            (Role::User, "a long question".into(), false),
            (Role::Assistant, "Let me think about this at length".into(), true),
            (Role::User, "stop, do this instead".into(), false),
            (Role::Assistant, "changing course".into(), false),
        ]
    );
    assert_eq!(env.llm.requests().pop().expect("request").last_user_text().as_deref(), Some("stop, do this instead"));
    assert!(env.admin.messages(&chat.id).await.expect("page").queued_messages.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queued_message_can_be_deleted_before_delivery() {
    let env = TestEnv::start().await;
    let (chat, mut stream) = env.idle_chat("ready").await;
    env.llm.push(Reply::text("working").then_hang());
    env.send(&chat.id, "first").await;
    stream.wait_for(|e| matches!(&e.body, EventBody::MessageDelta { .. }), WAIT).await.expect("streams");
    let outcome = env.admin.send(&chat.id, &msg("never mind this", BusyBehavior::Queue)).await.expect("send");
    let qid = outcome.queued_message.expect("queued").id;
    env.admin.delete_queued(&chat.id, &qid).await.expect("delete");
    stream
        .wait_for(|e| matches!(&e.body, EventBody::QueueUpdate { queued_messages } if queued_messages.is_empty()), WAIT)
        .await
        .expect("queue emptied");
    let err = env.admin.delete_queued(&chat.id, &qid).await.expect_err("already gone");
    assert_eq!(err.status().map(|s| s.as_u16()), Some(404));

    env.admin.interrupt(&chat.id).await.expect("interrupt");
    stream.wait_for(is_status(ChatStatus::Idle), WAIT).await.expect("idle");
    let page = env.admin.messages(&chat.id).await.expect("page");
    assert!(page.queued_messages.is_empty());
    assert!(page.messages.iter().all(|m| m.text() != "never mind this"));

    env.llm.push(Reply::text("fine"));
    env.send(&chat.id, "again").await;
    stream.wait_for(is_status(ChatStatus::Idle), WAIT).await.expect("idle");
    assert_eq!(env.messages(&chat.id).await.last().expect("last").text(), "fine");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queued_message_can_be_edited_before_delivery() {
    use reqwest::{Method, StatusCode};
    let env = TestEnv::start().await;
    let (chat, mut stream) = env.idle_chat("ready").await;
    env.llm.push(Reply::text("working").then_hang());
    env.send(&chat.id, "first").await;
    stream.wait_for(|e| matches!(&e.body, EventBody::MessageDelta { .. }), WAIT).await.expect("streams");
    let outcome = env.admin.send(&chat.id, &msg("the original", BusyBehavior::Queue)).await.expect("send");
    let qid = outcome.queued_message.expect("queued").id;
    let path = format!("/api/v1/chats/{}/queue/{qid}", chat.id);
    let (status, body) = env
        .admin
        .raw(Method::PATCH, &path, Some(json!({"content": [{"type": "text", "text": "the edited one"}]})))
        .await
        .expect("patch");
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["content"][0]["text"], "the edited one");
    stream
        .wait_for(
            |e| matches!(&e.body, EventBody::QueueUpdate { queued_messages } if queued_messages.first().is_some_and(|q| q.content == vec![Part::text("the edited one")])),
            WAIT,
        )
        .await
        .expect("queue_update with the edit");
    let (status, _) = env.admin.raw(Method::PATCH, &path, Some(json!({"content": []}))).await.expect("patch");
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let missing = format!("/api/v1/chats/{}/queue/nope", chat.id);
    let (status, _) = env
        .admin
        .raw(Method::PATCH, &missing, Some(json!({"content": [{"type": "text", "text": "x"}]})))
        .await
        .expect("patch");
    assert_eq!(status, StatusCode::NOT_FOUND);

    // A plain interrupt keeps the queue; the next message delivers it first.
    env.admin.interrupt(&chat.id).await.expect("interrupt");
    stream.wait_for(is_status(ChatStatus::Idle), WAIT).await.expect("idle");
    env.llm.push(Reply::text("got both"));
    env.send(&chat.id, "and this").await;
    stream.wait_for(is_status(ChatStatus::Idle), WAIT).await.expect("idle");
    let texts: Vec<String> = env.messages(&chat.id).await.iter().map(|m| m.text()).collect();
    assert_eq!(texts[texts.len() - 3..], ["the edited one", "and this", "got both"]);
    assert!(!texts.iter().any(|t| t == "the original"));
}
