//! The chat actor: owns one chat's live state and drives its turns.
//!
//! The actor is a serial state machine: every handler that changes the chat commits before the
//! next message is handled (`ctx.wait`). The one thing that runs beside it is the current step,
//! spawned as its own task on the actor's arbiter; it reports back with [`StepDone`]. An
//! interrupt cancels the step's token; the step stores what it has and returns.

pub mod messages;
mod queue;
mod tree;

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use agentplane_schema::api::{BusyBehavior, Chat, ChatError, ChatErrorKind, ChatStatus, SendOutcome};
use agentplane_schema::event::{EventBody, SubagentStatus};
use agentplane_schema::message::{Message, Part, QueuedMessage, Role};
use agentplane_schema::new_id;
use futures::FutureExt;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::deps::Deps;
use crate::directory::Directory;
use crate::error::ChatOpError;
use crate::handle::ChatFacts;
use crate::ports::{ChatState, Op, StoreError, ToolCallStatus};
use crate::shared::{ChatShared, status_change};
use crate::step::{self, StepInput, StepOutcome, StepResult};
use messages::{
    Close, Compact, EditMessage, EditQueued, GenerateTitle, Interrupt, TitleGenerated, UpdateChat, UserInput,
};
use queue::Queue;

pub struct ChatActor {
    chat_id: String,
    deps: Arc<Deps>,
    directory: Directory,
    /// The parent chat's actor, for a sub-agent.
    parent: Option<Recipient<messages::ChildEvent>>,
    live: Option<Live>,
}

struct Live {
    shared: Arc<ChatShared>,
    chat: Chat,
    /// Shared with the running step as a snapshot (the step holds a reference, not a copy);
    /// changed copy-on-write, which copies nothing once the step has ended.
    history: Arc<Vec<Message>>,
    queue: Queue,
    turn: Option<Turn>,
    /// The timer after which an idle chat lets its last prompt's text go.
    forget_prompt: Option<SpawnHandle>,
    /// 0 for a root chat.
    depth: u32,
    children: Vec<tree::Child>,
}

struct Turn {
    user_id: String,
    steps: u32,
    cancel: CancellationToken,
    /// An interrupt came with a message: deliver the queue once the step has stopped.
    deliver_on_interrupt: bool,
    /// This turn only summarises the conversation.
    compact_only: bool,
    task: Option<tokio::task::JoinHandle<()>>,
    /// Crashed steps restarted in this turn.
    restarts: u32,
}

impl Turn {
    fn new(user_id: String) -> Self {
        Turn {
            user_id,
            steps: 0,
            cancel: CancellationToken::new(),
            deliver_on_interrupt: false,
            compact_only: false,
            task: None,
            restarts: 0,
        }
    }
}

/// From the running step's task: the step has ended.
#[derive(Message)]
#[rtype(result = "()")]
struct StepDone(StepResult);

impl ChatActor {
    pub fn new(
        chat_id: String,
        deps: Arc<Deps>,
        directory: Directory,
        parent: Option<Recipient<messages::ChildEvent>>,
    ) -> Self {
        ChatActor { chat_id, deps, directory, parent, live: None }
    }

    fn on_loaded(&mut self, state: ChatState, ctx: &mut Context<Self>) {
        let facts = ChatFacts { owner_id: state.chat.owner_id.clone(), model_id: state.chat.model_id.clone() };
        self.directory.loaded(&self.chat_id, &ctx.address(), facts);
        let shared = Arc::new(ChatShared::new(
            state.chat.id.clone(),
            state.chat.owner_id.clone(),
            self.deps.store.clone(),
            self.deps.bus.clone(),
            state.last_seq,
            state.last_position,
            state.chat.workspace_id.clone(),
        ));
        let was_running = matches!(state.chat.status, ChatStatus::Running | ChatStatus::Interrupting);
        // Sub-agents that were running when the process stopped come back under this actor.
        let me = ctx.address().recipient::<messages::ChildEvent>();
        let children = state
            .children
            .into_iter()
            .map(|c| {
                let (status, addr) = match c.status {
                    ChatStatus::Running | ChatStatus::Interrupting => {
                        (SubagentStatus::Running, Some(self.directory.start_child(&c.id, me.clone())))
                    }
                    ChatStatus::Error => (SubagentStatus::Failed, None),
                    ChatStatus::Idle => (SubagentStatus::Finished, None),
                };
                tree::Child::new(c.id, c.title, addr, status)
            })
            .collect();
        self.live = Some(Live {
            queue: Queue::new(state.queued, shared.clone()),
            shared,
            chat: state.chat,
            history: Arc::new(state.messages),
            turn: None,
            forget_prompt: None,
            depth: state.depth,
            children,
        });
        // Recover from a stop in the middle of a step: tool calls without results get an
        // "outcome unknown" result (never re-run), then the turn continues where it stood.
        let fut = self.recover(was_running);
        ctx.wait(fut.into_actor(self).map(move |res, act, ctx| match res {
            Ok((recovered, resume)) => {
                let Some(live) = act.live.as_mut() else { return };
                Arc::make_mut(&mut live.history).extend(recovered);
                if resume {
                    let user = live.chat.owner_id.clone();
                    live.turn = Some(Turn::new(user));
                    act.start_step(ctx);
                }
            }
            Err(e) => {
                tracing::error!(chat = %act.chat_id, error = %e, "recovering the chat failed");
                ctx.stop();
            }
        }));
    }

    /// Returns the messages it committed and whether the turn should go on.
    fn recover(&self, was_running: bool) -> impl Future<Output = Result<(Vec<Message>, bool), StoreError>> + use<> {
        let live = self.live.as_ref().expect("loaded");
        let shared = live.shared.clone();
        let last = live.history.last().cloned();
        let owner = live.chat.owner_id.clone();
        async move {
            let mut committed = Vec::new();
            if let Some(last) = last.as_ref().filter(|m| m.role == Role::Assistant && m.tool_calls().next().is_some()) {
                let mut ops = Vec::new();
                let mut parts = Vec::new();
                for (call_id, name, _) in last.tool_calls() {
                    let result = "interrupted, outcome unknown: the orchestrator stopped while this tool call ran";
                    ops.push(Op::FinishToolCall {
                        call_id: call_id.to_string(),
                        message_id: last.id.clone(),
                        status: ToolCallStatus::Interrupted,
                        result: result.into(),
                        is_error: true,
                        exit_code: None,
                        duration_ms: None,
                        workspace_id: None,
                    });
                    parts.push(Part::ToolResult {
                        call_id: call_id.to_string(),
                        name: name.to_string(),
                        result: result.into(),
                        is_error: true,
                    });
                }
                let message = Message {
                    id: new_id(),
                    chat_id: shared.chat_id.clone(),
                    position: shared.next_position(),
                    role: Role::Tool,
                    parts: Arc::new(parts),
                    interrupted: true,
                    user_id: Some(owner),
                    model_id: None,
                    created_at: chrono::Utc::now(),
                };
                ops.push(Op::InsertMessage(message.clone()));
                shared.commit(ops, vec![EventBody::Message { message: message.clone() }]).await?;
                committed.push(message);
            }
            let last_role = committed.last().or(last.as_ref()).map(|m| m.role);
            let resume = was_running && matches!(last_role, Some(Role::User) | Some(Role::Tool));
            if was_running && !resume {
                shared.commit_status(ChatStatus::Idle).await?;
            }
            Ok((committed, resume))
        }
    }

    fn start_step(&mut self, ctx: &mut Context<Self>) {
        let max_steps = self.deps.settings.agent.max_steps;
        if let Some(error) = self.live.as_mut().and_then(unstored_results) {
            self.end_turn(Some(error), ctx);
            return;
        }
        let Some(live) = self.live.as_mut() else { return };
        let Some(turn) = live.turn.as_mut() else { return };
        turn.steps += 1;
        if turn.steps > max_steps {
            let error = ChatError {
                kind: ChatErrorKind::Internal,
                message: format!("the turn reached the step limit ({max_steps} steps) and was stopped"),
            };
            self.end_turn(Some(error), ctx);
            return;
        }
        let input = StepInput {
            deps: self.deps.clone(),
            shared: live.shared.clone(),
            history: live.history.clone(),
            model_id: live.chat.model_id.clone(),
            user_id: turn.user_id.clone(),
            cancel: turn.cancel.clone(),
            agent: ctx.address(),
            compact_only: turn.compact_only,
        };
        let addr = ctx.address();
        // Its own task, not an actor future: `ctx.wait` in handlers must never pause a step that
        // holds the chat's commit lock. A panicking step ends the turn as failed (and is
        // reported to the parent) instead of leaving it running forever.
        turn.task = Some(actix::spawn(async move {
            let result = match std::panic::AssertUnwindSafe(step::run_step(input)).catch_unwind().await {
                Ok(result) => result,
                Err(panic) => {
                    let what = panic
                        .downcast_ref::<&str>()
                        .map(|s| s.to_string())
                        .or_else(|| panic.downcast_ref::<String>().cloned())
                        .unwrap_or_else(|| "unknown panic".into());
                    tracing::error!(panic = %what, "a step panicked");
                    StepResult { outcome: StepOutcome::Crashed(what), committed: vec![], dropped: vec![] }
                }
            };
            addr.do_send(StepDone(result));
        }));
    }

    /// Ends the turn: `idle`, or `error` with the error kept on the chat.
    fn end_turn(&mut self, error: Option<ChatError>, ctx: &mut Context<Self>) {
        let status = if error.is_some() { ChatStatus::Error } else { ChatStatus::Idle };
        let Some((outcome, report)) = self.close_turn(status, error.as_ref(), ctx) else { return };
        let Some(live) = self.live.as_ref() else { return };
        // The parent hears of it once it is stored (or failed to be): a snapshot of the parent
        // that holds its `finished` event then finds this chat's turn ended too.
        let mut events = Vec::new();
        if let Some(e) = &error {
            events.push(EventBody::Error { error: e.clone() });
        }
        let (op, event) = status_change(status, error);
        events.push(event);
        let shared = live.shared.clone();
        let fut = async move { shared.commit(vec![op], events).await };
        ctx.wait(fut.into_actor(self).map(move |res, act, _| {
            if let Err(e) = res {
                tracing::error!(chat = %act.chat_id, error = %e, "could not store the end of the turn");
            }
            act.notify_parent(outcome, report);
        }));
    }

    /// The turn whose last answer also stored its end (`idle`).
    fn turn_ended(&mut self, ctx: &mut Context<Self>) {
        if let Some((outcome, report)) = self.close_turn(ChatStatus::Idle, None, ctx) {
            self.notify_parent(outcome, report);
        }
    }

    /// An idle chat keeps the text of its last prompt for `agent.keep_prompt_idle_ms`, for a
    /// turn that starts soon (a follow-up, the next task of a script); then it lets it go.
    fn keep_prompt_while_idle(&mut self, ctx: &mut Context<Self>) {
        let keep = Duration::from_millis(self.deps.settings.agent.keep_prompt_idle_ms);
        let Some(live) = self.live.as_mut() else { return };
        if let Some(pending) = live.forget_prompt.take() {
            ctx.cancel_future(pending);
        }
        if keep.is_zero() {
            live.shared.forget_prompt();
            return;
        }
        live.forget_prompt = Some(ctx.run_later(keep, |act, _| {
            if let Some(live) = act.live.as_mut() {
                live.forget_prompt = None;
                if live.turn.is_none() {
                    live.shared.forget_prompt();
                }
            }
        }));
    }

    /// The turn's end in memory (and the idle chat's timer for its prompt's text): what the
    /// parent is told of it.
    fn close_turn(
        &mut self,
        status: ChatStatus,
        error: Option<&ChatError>,
        ctx: &mut Context<Self>,
    ) -> Option<(SubagentStatus, Option<String>)> {
        let live = self.live.as_mut()?;
        live.turn = None;
        live.shared.forget_images();
        live.chat.status = status;
        live.chat.error = error.cloned();
        let told = match error {
            Some(e) => (SubagentStatus::Failed, Some(e.message.clone())),
            None => (
                SubagentStatus::Finished,
                live.history.iter().rev().find(|m| m.role == Role::Assistant).map(|m| m.text()),
            ),
        };
        self.keep_prompt_while_idle(ctx);
        Some(told)
    }

    /// Moves the queued messages into the history and starts a step for them; `resume`: the turn
    /// was already stored as ended, so the chat is `running` again.
    fn deliver_queue(&mut self, resume: bool, ctx: &mut Context<Self>) {
        let Some(live) = self.live.as_mut() else { return };
        let queued = live.queue.take();
        let shared = live.shared.clone();
        let mut ops = Vec::new();
        let mut events = vec![EventBody::QueueUpdate { queued_messages: vec![] }];
        let mut delivered = Vec::new();
        for q in queued {
            let message = user_message(&shared, q.user_id.clone(), q.content.clone());
            ops.push(Op::DeleteQueued { id: q.id });
            ops.push(Op::InsertMessage(message.clone()));
            events.push(EventBody::Message { message: message.clone() });
            delivered.push(message);
        }
        if resume {
            let (op, event) = status_change(ChatStatus::Running, None);
            ops.push(op);
            events.push(event);
        }
        if let Some(turn) = live.turn.as_mut() {
            turn.steps = 0;
            if let Some(last) = delivered.last() {
                turn.user_id = last.user_id.clone().unwrap_or_else(|| turn.user_id.clone());
            }
            if turn.cancel.is_cancelled() {
                turn.cancel = CancellationToken::new();
                turn.deliver_on_interrupt = false;
            }
        }
        let fut = async move { shared.commit(ops, events).await };
        ctx.wait(fut.into_actor(self).map(move |res, act, ctx| match res {
            Ok(()) => {
                if let Some(live) = act.live.as_mut() {
                    Arc::make_mut(&mut live.history).extend(delivered);
                }
                act.start_step(ctx);
            }
            Err(e) => act.end_turn(Some(ChatError { kind: ChatErrorKind::Internal, message: e.to_string() }), ctx),
        }));
    }
}

fn user_message(shared: &ChatShared, user_id: String, content: Vec<Part>) -> Message {
    Message {
        id: new_id(),
        chat_id: shared.chat_id.clone(),
        position: shared.next_position(),
        role: Role::User,
        parts: Arc::new(content),
        interrupted: false,
        user_id: Some(user_id),
        model_id: None,
        created_at: chrono::Utc::now(),
    }
}

impl Actor for ChatActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(256);
        let store = self.deps.store.clone();
        let id = self.chat_id.clone();
        ctx.wait(async move { store.load_chat(&id).await }.into_actor(self).map(|res, act, ctx| match res {
            Ok(state) => act.on_loaded(state, ctx),
            Err(e) => {
                tracing::warn!(chat = %act.chat_id, error = %e, "could not load chat");
                ctx.stop();
            }
        }));
    }

    fn stopped(&mut self, ctx: &mut Self::Context) {
        if let Some(turn) = self.live.as_mut().and_then(|l| l.turn.as_mut()) {
            turn.cancel.cancel();
            if let Some(task) = turn.task.take() {
                task.abort();
            }
        }
        // A stopped actor's state is in the database; keep nothing of it here.
        self.directory.forget(&self.chat_id, &ctx.address());
    }
}

type Reply<T> = AtomicResponse<ChatActor, Result<T, ChatOpError>>;

fn reply<T: 'static>(value: Result<T, ChatOpError>) -> Reply<T> {
    AtomicResponse::new(Box::pin(actix::fut::ready(value)))
}

impl Handler<UserInput> for ChatActor {
    type Result = Reply<SendOutcome>;

    fn handle(&mut self, msg: UserInput, _: &mut Context<Self>) -> Self::Result {
        if msg.content.is_empty() {
            return reply(Err(ChatOpError::invalid("a message needs at least one part")));
        }
        let Some(live) = self.live.as_mut() else {
            return reply(Err(ChatOpError::unavailable("the chat is not loaded")));
        };
        let shared = live.shared.clone();
        let audit = Op::Audit {
            user_id: Some(msg.user_id.clone()),
            action: "message.sent".into(),
            target_type: "chat".into(),
            target_id: Some(shared.chat_id.clone()),
            details: json!({"busy_behavior": msg.busy}),
        };
        if live.turn.is_none() {
            // Idle: messages left queued by an earlier interrupt go first, then this one.
            let mut ops = Vec::new();
            let mut events = Vec::new();
            let mut delivered = Vec::new();
            let queued = live.queue.take();
            if !queued.is_empty() {
                events.push(EventBody::QueueUpdate { queued_messages: vec![] });
            }
            for q in &queued {
                let m = user_message(&shared, q.user_id.clone(), q.content.clone());
                ops.push(Op::DeleteQueued { id: q.id.clone() });
                ops.push(Op::InsertMessage(m.clone()));
                events.push(EventBody::Message { message: m.clone() });
                delivered.push(m);
            }
            let message = user_message(&shared, msg.user_id.clone(), msg.content);
            let (running, running_event) = status_change(ChatStatus::Running, None);
            ops.push(Op::InsertMessage(message.clone()));
            ops.push(running);
            ops.push(audit);
            events.push(EventBody::Message { message: message.clone() });
            events.push(running_event);
            delivered.push(message.clone());
            live.turn = Some(Turn::new(msg.user_id));
            let fut = async move { shared.commit(ops, events).await };
            return AtomicResponse::new(Box::pin(fut.into_actor(self).map(move |res, act, ctx| {
                let live = act.live.as_mut().ok_or_else(|| ChatOpError::unavailable("the chat is not loaded"))?;
                match res {
                    Ok(()) => {
                        live.chat.status = ChatStatus::Running;
                        live.chat.error = None;
                        Arc::make_mut(&mut live.history).extend(delivered);
                        act.notify_parent(SubagentStatus::Running, None);
                        act.start_step(ctx);
                        Ok(SendOutcome { queued: false, message: Some(message), queued_message: None })
                    }
                    Err(e) => {
                        live.turn = None;
                        live.queue.restore(queued);
                        Err(ChatOpError::store(e))
                    }
                }
            })));
        }
        let queued = QueuedMessage {
            id: new_id(),
            chat_id: shared.chat_id.clone(),
            content: msg.content,
            user_id: msg.user_id,
            created_at: chrono::Utc::now(),
        };
        let position = live.queue.push(queued.clone());
        let snapshot = live.queue.items().to_vec();
        let interrupt = msg.busy == BusyBehavior::Interrupt;
        let ops = vec![Op::InsertQueued { message: queued.clone(), position }, audit];
        let events = vec![EventBody::QueueUpdate { queued_messages: snapshot }];
        let fut = async move { shared.commit(ops, events).await };
        AtomicResponse::new(Box::pin(fut.into_actor(self).map(move |res, act, ctx| match res {
            Ok(()) => {
                if interrupt {
                    if let Some(turn) = act.live.as_mut().and_then(|l| l.turn.as_mut()) {
                        turn.deliver_on_interrupt = true;
                    }
                    act.interrupt(ctx);
                }
                Ok(SendOutcome { queued: true, message: None, queued_message: Some(queued) })
            }
            Err(e) => {
                if let Some(live) = act.live.as_mut() {
                    live.queue.remove(&queued.id);
                }
                Err(ChatOpError::store(e))
            }
        })))
    }
}

impl ChatActor {
    /// Cancels the running step (if any) and records `interrupting`.
    fn interrupt(&mut self, ctx: &mut Context<Self>) {
        let Some(live) = self.live.as_mut() else { return };
        let Some(turn) = live.turn.as_mut() else { return };
        if turn.cancel.is_cancelled() {
            return;
        }
        turn.cancel.cancel();
        live.chat.status = ChatStatus::Interrupting;
        let shared = live.shared.clone();
        let fut = async move { shared.commit_status(ChatStatus::Interrupting).await };
        ctx.wait(fut.into_actor(self).map(|res, act, _| {
            if let Err(e) = res {
                tracing::error!(chat = %act.chat_id, error = %e, "could not store an interrupt");
            }
        }));
    }
}

impl Handler<Interrupt> for ChatActor {
    type Result = Result<(), ChatOpError>;

    fn handle(&mut self, _: Interrupt, ctx: &mut Context<Self>) -> Self::Result {
        if self.live.is_none() {
            return Err(ChatOpError::unavailable("the chat is not loaded"));
        }
        self.interrupt(ctx);
        self.interrupt_children();
        Ok(())
    }
}

impl Handler<EditQueued> for ChatActor {
    type Result = Reply<Option<QueuedMessage>>;

    fn handle(&mut self, msg: EditQueued, _: &mut Context<Self>) -> Self::Result {
        let Some(live) = self.live.as_mut() else {
            return reply(Err(ChatOpError::unavailable("the chat is not loaded")));
        };
        let Some(index) = live.queue.position(&msg.queued_id) else {
            return reply(Ok(None));
        };
        let before = live.queue.items()[index].clone();
        let (op, after) = match msg.content {
            None => (Op::DeleteQueued { id: msg.queued_id }, live.queue.remove_at(index)),
            Some(content) => {
                let queued = live.queue.get_mut(index);
                queued.content = content.clone();
                (Op::UpdateQueued { id: msg.queued_id, content }, queued.clone())
            }
        };
        let deleted = matches!(op, Op::DeleteQueued { .. });
        let snapshot = live.queue.items().to_vec();
        let shared = live.shared.clone();
        let fut =
            async move { shared.commit(vec![op], vec![EventBody::QueueUpdate { queued_messages: snapshot }]).await };
        AtomicResponse::new(Box::pin(fut.into_actor(self).map(move |res, act, _| match res {
            Ok(()) => Ok(Some(after)),
            Err(e) => {
                if let Some(live) = act.live.as_mut() {
                    if deleted {
                        live.queue.insert(index, before);
                    } else if let Some(index) = live.queue.position(&before.id) {
                        *live.queue.get_mut(index) = before;
                    }
                }
                Err(ChatOpError::store(e))
            }
        })))
    }
}

impl Handler<EditMessage> for ChatActor {
    type Result = Reply<Message>;

    fn handle(&mut self, msg: EditMessage, _: &mut Context<Self>) -> Self::Result {
        if msg.content.is_empty() {
            return reply(Err(ChatOpError::invalid("a message needs at least one part")));
        }
        let Some(live) = self.live.as_mut() else {
            return reply(Err(ChatOpError::unavailable("the chat is not loaded")));
        };
        if live.turn.is_some() {
            return reply(Err(ChatOpError::conflict("the agent is working; interrupt the chat, then edit")));
        }
        let Some(old) = live.history.iter().find(|m| m.id == msg.message_id).cloned() else {
            return reply(Err(ChatOpError::not_found(format!("message {}", msg.message_id))));
        };
        if old.role != Role::User {
            return reply(Err(ChatOpError::invalid("only user messages can be edited")));
        }
        let shared = live.shared.clone();
        let queued = live.queue.take();
        let message = user_message(&shared, msg.user_id.clone(), msg.content);
        let mut ops = vec![Op::DropMessagesFrom { from_position: old.position }];
        ops.extend(queued.iter().map(|q| Op::DeleteQueued { id: q.id.clone() }));
        let (running, running_event) = status_change(ChatStatus::Running, None);
        ops.push(Op::InsertMessage(message.clone()));
        ops.push(running);
        ops.push(Op::Audit {
            user_id: Some(msg.user_id.clone()),
            action: "message.edited".into(),
            target_type: "message".into(),
            target_id: Some(old.id.clone()),
            details: json!({"chat_id": shared.chat_id, "dropped_from_position": old.position}),
        });
        let mut events = vec![EventBody::MessagesDropped { from_position: old.position }];
        if !queued.is_empty() {
            events.push(EventBody::QueueUpdate { queued_messages: vec![] });
        }
        events.push(EventBody::Message { message: message.clone() });
        events.push(running_event);
        live.turn = Some(Turn::new(msg.user_id));
        let fut = async move { shared.commit(ops, events).await };
        AtomicResponse::new(Box::pin(fut.into_actor(self).map(move |res, act, ctx| {
            let live = act.live.as_mut().ok_or_else(|| ChatOpError::unavailable("the chat is not loaded"))?;
            match res {
                Ok(()) => {
                    let history = Arc::make_mut(&mut live.history);
                    history.retain(|m| m.position < old.position);
                    history.push(message.clone());
                    live.chat.status = ChatStatus::Running;
                    live.chat.error = None;
                    act.notify_parent(SubagentStatus::Running, None);
                    act.start_step(ctx);
                    Ok(message)
                }
                Err(e) => {
                    live.turn = None;
                    live.queue.restore(queued);
                    Err(ChatOpError::store(e))
                }
            }
        })))
    }
}

impl Handler<GenerateTitle> for ChatActor {
    type Result = ();

    fn handle(&mut self, _: GenerateTitle, ctx: &mut Context<Self>) {
        let Some(live) = self.live.as_ref() else { return };
        if !self.deps.settings.agent.generate_titles {
            return;
        }
        // An image-only first message has no words to title; it keeps its placeholder.
        let Some(first) =
            live.history.iter().find(|m| m.role == Role::User).map(|m| m.text()).filter(|t| !t.trim().is_empty())
        else {
            return;
        };
        let (deps, shared, model_id) = (self.deps.clone(), live.shared.clone(), live.chat.model_id.clone());
        let placeholder = live.chat.title.clone();
        let addr = ctx.address();
        actix::spawn(async move {
            if let Some(title) = crate::title::generate(deps, shared, model_id, first).await {
                addr.do_send(TitleGenerated { title, placeholder });
            }
        });
    }
}

impl ChatActor {
    /// Records title and archive changes with a `title` event for a new title.
    fn update_chat(
        &mut self,
        title: Option<String>,
        archived: Option<bool>,
    ) -> Pin<Box<dyn ActorFuture<Self, Output = Result<(), ChatOpError>>>> {
        let Some(live) = self.live.as_mut() else {
            return Box::pin(actix::fut::ready(Err(ChatOpError::unavailable("the chat is not loaded"))));
        };
        let mut ops = Vec::new();
        let mut events = Vec::new();
        if let Some(t) = &title {
            live.chat.title = Some(t.clone());
            ops.push(Op::SetTitle(t.clone()));
            events.push(EventBody::Title { title: t.clone() });
        }
        if let Some(a) = archived {
            live.chat.archived = a;
            ops.push(Op::SetArchived(a));
        }
        let shared = live.shared.clone();
        let fut = async move { shared.commit(ops, events).await };
        Box::pin(fut.into_actor(self).map(|res, _, _| res.map_err(ChatOpError::store)))
    }
}

impl Handler<UpdateChat> for ChatActor {
    type Result = Reply<()>;

    fn handle(&mut self, msg: UpdateChat, ctx: &mut Context<Self>) -> Self::Result {
        // Archiving puts the chat and its whole tree away: running work stops (the rows of the
        // descendants are archived by the caller, which knows the tree in the database).
        if msg.archived == Some(true) && self.live.is_some() {
            self.interrupt(ctx);
            self.interrupt_children();
        }
        AtomicResponse::new(self.update_chat(msg.title, msg.archived))
    }
}

impl Handler<TitleGenerated> for ChatActor {
    type Result = ();

    fn handle(&mut self, msg: TitleGenerated, ctx: &mut Context<Self>) {
        // A user's rename since the placeholder wins.
        if self.live.as_ref().is_some_and(|l| l.chat.title == msg.placeholder) {
            let update = self.update_chat(Some(msg.title), None);
            ctx.wait(update.map(|res, act, _| {
                if let Err(e) = res {
                    tracing::warn!(chat = %act.chat_id, error = %e, "could not store a title");
                }
            }));
        }
    }
}

impl Handler<Compact> for ChatActor {
    type Result = Reply<()>;

    fn handle(&mut self, msg: Compact, _: &mut Context<Self>) -> Self::Result {
        let Some(live) = self.live.as_mut() else {
            return reply(Err(ChatOpError::unavailable("the chat is not loaded")));
        };
        if live.turn.is_some() {
            return reply(Err(ChatOpError::conflict("the agent is working; compact when it is idle")));
        }
        let mut turn = Turn::new(msg.user_id);
        turn.compact_only = true;
        live.turn = Some(turn);
        let shared = live.shared.clone();
        let fut = async move { shared.commit_status(ChatStatus::Running).await };
        AtomicResponse::new(Box::pin(fut.into_actor(self).map(|res, act, ctx| match res {
            Ok(()) => {
                act.start_step(ctx);
                Ok(())
            }
            Err(e) => {
                if let Some(live) = act.live.as_mut() {
                    live.turn = None;
                }
                Err(ChatOpError::store(e))
            }
        })))
    }
}

impl Handler<Close> for ChatActor {
    type Result = AtomicResponse<Self, ()>;

    fn handle(&mut self, msg: Close, _: &mut Context<Self>) -> Self::Result {
        let children = self.child_addrs();
        let stop_turn = msg.stop_turn;
        let running = self.live.as_ref().is_some_and(|l| l.turn.is_some());
        if let Some(turn) = self.live.as_mut().and_then(|l| l.turn.as_mut()) {
            turn.cancel.cancel();
        }
        let shared = self.live.as_ref().map(|l| l.shared.clone());
        let fut = async move {
            // Descendants first: each closes its own before it answers.
            futures::future::join_all(children.iter().map(|c| c.send(Close { stop_turn }))).await;
            if let (true, true, Some(shared)) = (stop_turn, running, shared) {
                // Closed for good: recorded idle, not `running`, which would resume the turn on
                // the next start.
                if let Err(e) = shared.commit_status(ChatStatus::Idle).await {
                    tracing::error!(chat = %shared.chat_id, error = %e, "could not record the close");
                }
            }
        };
        AtomicResponse::new(Box::pin(fut.into_actor(self).map(move |(), act, ctx| {
            if stop_turn {
                act.notify_parent(SubagentStatus::Closed, None);
            }
            ctx.stop();
        })))
    }
}

impl Handler<StepDone> for ChatActor {
    type Result = ();

    fn handle(&mut self, StepDone(result): StepDone, ctx: &mut Context<Self>) {
        let Some(live) = self.live.as_mut() else { return };
        let history = Arc::make_mut(&mut live.history);
        if !result.dropped.is_empty() {
            history.retain(|m| !result.dropped.contains(&m.id));
        }
        history.extend(result.committed);
        let mut outcome = result.outcome;
        if let Some(error) = unstored_results(live) {
            // The step's results never landed: the turn cannot go on from them.
            if !matches!(outcome, StepOutcome::Failed(_) | StepOutcome::Crashed(_)) {
                outcome = StepOutcome::Failed(error);
            }
        }
        if matches!(outcome, StepOutcome::Crashed(_)) {
            // Whatever the crashed step streamed is void: it is produced again or never.
            live.shared.publish(EventBody::StreamReset);
        }
        let Some(turn) = live.turn.as_mut() else { return };
        turn.task = None;
        let has_queue = !live.queue.is_empty();
        match outcome {
            StepOutcome::Continue | StepOutcome::Done if has_queue => self.deliver_queue(false, ctx),
            // The answer's commit ended the turn, but a message was queued after it: it goes on.
            StepOutcome::Ended if has_queue => self.deliver_queue(true, ctx),
            StepOutcome::Continue => self.start_step(ctx),
            StepOutcome::Done => self.end_turn(None, ctx),
            // An interrupt stored after the `idle` left the chat `interrupting`: end it again.
            StepOutcome::Ended if turn.cancel.is_cancelled() => self.end_turn(None, ctx),
            StepOutcome::Ended => self.turn_ended(ctx),
            StepOutcome::Interrupted if turn.deliver_on_interrupt && has_queue => self.deliver_queue(false, ctx),
            StepOutcome::Interrupted => self.end_turn(None, ctx),
            StepOutcome::Failed(error) => self.end_turn(Some(error), ctx),
            StepOutcome::Crashed(_) if turn.restarts < self.deps.settings.agent.step_crash_restarts => {
                turn.restarts += 1;
                tracing::warn!(chat = %self.chat_id, restart = turn.restarts, "restarting the crashed step from the database");
                self.restart_from_database(ctx);
            }
            StepOutcome::Crashed(what) => self.end_turn(
                Some(ChatError { kind: ChatErrorKind::Internal, message: format!("the step crashed: {what}") }),
                ctx,
            ),
        }
    }
}

/// When the last step's results could not be stored ([`ChatShared::commit_ahead`]): drops them
/// from the history, which then ends as the database does, and returns the error that ends the
/// turn.
fn unstored_results(live: &mut Live) -> Option<ChatError> {
    let (id, message) = live.shared.take_failed_ahead()?;
    Arc::make_mut(&mut live.history).retain(|m| m.id != id);
    Some(ChatError { kind: ChatErrorKind::Internal, message })
}

impl ChatActor {
    /// After a crash: the history is re-read from the database (what the crashed step held in
    /// memory is dropped; what it committed stays), then the step runs again.
    fn restart_from_database(&mut self, ctx: &mut Context<Self>) {
        let store = self.deps.store.clone();
        let id = self.chat_id.clone();
        let shared = self.live.as_ref().map(|live| live.shared.clone());
        let reload = async move {
            // What the crashed step still had landing is in the database before it is read.
            if let Some(shared) = shared {
                shared.settle().await;
            }
            store.load_chat(&id).await
        };
        ctx.wait(reload.into_actor(self).map(|res, act, ctx| {
            let Some(live) = act.live.as_mut() else { return };
            match res {
                Ok(state) => {
                    live.history = Arc::new(state.messages);
                    act.start_step(ctx);
                }
                Err(e) => act.end_turn(
                    Some(ChatError {
                        kind: ChatErrorKind::Internal,
                        message: format!("the step crashed and the chat could not be reloaded: {e}"),
                    }),
                    ctx,
                ),
            }
        }));
    }
}
