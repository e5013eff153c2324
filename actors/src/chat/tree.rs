//! The sub-agent tree: a chat actor spawns sub-agents as child actors on its own arbiter, keeps
//! what it knows of each (a watch that `wait_agent` follows), and hears from them as
//! [`ChildEvent`]s. Closing or interrupting a chat reaches all its descendants.
//!
//! Supervision policy: a sub-agent whose step fails or panics is reported to its parent as
//! `failed` with the reason (the step's panic is caught where the step runs); the parent's model
//! decides what to do (it may message the sub-agent to try again, or close it).

use actix::prelude::*;
use agentplane_schema::event::{EventBody, SubagentPhase, SubagentStatus};
use agentplane_schema::message::Part;
use tokio::sync::watch;

use super::ChatActor;
use super::messages::{ChildEvent, ChildHandle, ChildState, Close, CloseChild, SpawnChild, UserInput, WatchChildren};
use crate::error::ChatOpError;
use crate::handle::ChatHandle;
use crate::ports::NewChild;

/// One sub-agent, as its parent keeps it.
pub(super) struct Child {
    pub id: String,
    pub title: Option<String>,
    /// Running actor; `None` for a sub-agent loaded from the database that has not been needed.
    pub addr: Option<Addr<ChatActor>>,
    pub state: watch::Sender<ChildState>,
}

impl Child {
    pub fn new(id: String, title: Option<String>, addr: Option<Addr<ChatActor>>, status: SubagentStatus) -> Self {
        Child { id, title, addr, state: watch::channel(ChildState { status, report: None }).0 }
    }

    pub fn status(&self) -> SubagentStatus {
        self.state.borrow().status
    }
}

impl ChatActor {
    fn child(&self, id: &str) -> Option<&Child> {
        self.live.as_ref()?.children.iter().find(|c| c.id == id)
    }

    /// The sub-agent's actor, started under this one if it is not running.
    fn child_addr(&mut self, id: &str, ctx: &mut Context<Self>) -> Option<Addr<ChatActor>> {
        let parent = ctx.address().recipient();
        let directory = self.directory.clone();
        let child = self.live.as_mut()?.children.iter_mut().find(|c| c.id == id)?;
        match &child.addr {
            Some(addr) if addr.connected() => Some(addr.clone()),
            _ => {
                let addr = directory.start_child(id, parent);
                child.addr = Some(addr.clone());
                Some(addr)
            }
        }
    }

    /// Records a sub-agent event on this chat's stream.
    fn announce_child(&mut self, event: EventBody, ctx: &mut Context<Self>) {
        let Some(live) = self.live.as_ref() else { return };
        let shared = live.shared.clone();
        let fut = async move { shared.commit(vec![], vec![event]).await };
        ctx.wait(fut.into_actor(self).map(|res, act, _| {
            if let Err(e) = res {
                tracing::error!(chat = %act.chat_id, error = %e, "could not record a sub-agent event");
            }
        }));
    }

    /// Tells this chat's parent (if any) how it stands.
    pub(super) fn notify_parent(&self, status: SubagentStatus, report: Option<String>) {
        if let Some(parent) = &self.parent {
            parent.do_send(ChildEvent { child_id: self.chat_id.clone(), status, report });
        }
    }

    /// Asks every running sub-agent to interrupt its turn.
    pub(super) fn interrupt_children(&self) {
        for child in self.live.iter().flat_map(|l| l.children.iter()) {
            if let Some(addr) = child.addr.as_ref().filter(|_| child.status() == SubagentStatus::Running) {
                addr.do_send(super::messages::Interrupt);
            }
        }
    }

    /// Running sub-agent actors, to close with this chat.
    pub(super) fn child_addrs(&self) -> Vec<Addr<ChatActor>> {
        self.live.iter().flat_map(|l| l.children.iter()).filter_map(|c| c.addr.clone()).collect()
    }
}

impl Handler<SpawnChild> for ChatActor {
    type Result = AtomicResponse<Self, Result<String, ChatOpError>>;

    fn handle(&mut self, msg: SpawnChild, _: &mut Context<Self>) -> Self::Result {
        let settings = &self.deps.settings.agent;
        let refuse = |e: ChatOpError| AtomicResponse::new(Box::pin(actix::fut::ready(Err(e))));
        let Some(live) = self.live.as_ref() else {
            return refuse(ChatOpError::unavailable("the chat is not loaded"));
        };
        if live.depth + 1 > settings.max_depth {
            return refuse(ChatOpError::invalid(format!(
                "spawn refused: sub-agents may be nested at most {} level(s) deep, and this chat is at level {}; \
                 do the work here instead",
                settings.max_depth, live.depth
            )));
        }
        let running = live.children.iter().filter(|c| c.status() == SubagentStatus::Running).count();
        if running >= settings.max_children {
            return refuse(ChatOpError::invalid(format!(
                "spawn refused: at most {} sub-agents may run at once under one chat ({running} running); \
                 wait for or close one first",
                settings.max_children
            )));
        }
        let store = self.deps.store.clone();
        let new = NewChild {
            parent: live.chat.clone(),
            title: msg.title.clone(),
            model_id: msg.model_id.clone(),
            workspace_id: live.shared.workspace_id(),
        };
        let fut = async move { store.create_child(new).await };
        AtomicResponse::new(Box::pin(fut.into_actor(self).then(move |res, act, ctx| {
            let started = res.map_err(ChatOpError::store).and_then(|child| {
                let addr = act.directory.start_child(&child.id, ctx.address().recipient());
                let live = act.live.as_mut().ok_or_else(|| ChatOpError::unavailable("the chat is not loaded"))?;
                live.children.push(Child::new(
                    child.id.clone(),
                    msg.title.clone(),
                    Some(addr.clone()),
                    SubagentStatus::Running,
                ));
                Ok((child.id, addr))
            });
            if let Ok((id, _)) = &started {
                act.announce_child(
                    EventBody::Subagent {
                        agent_id: id.clone(),
                        phase: SubagentPhase::Spawned,
                        title: msg.title.clone(),
                        status: Some(SubagentStatus::Running),
                        report: None,
                    },
                    ctx,
                );
            }
            let input =
                UserInput { user_id: msg.user_id, content: vec![Part::text(msg.prompt)], busy: Default::default() };
            // Answer only once the sub-agent has its prompt: a message_agent right after the
            // spawn then finds it working, never idle.
            async move {
                let (id, addr) = started?;
                match addr.send(input).await {
                    Ok(Ok(_)) => Ok(id),
                    Ok(Err(e)) => Err(ChatOpError::store(format!("the sub-agent refused its prompt: {e}"))),
                    Err(e) => Err(ChatOpError::unavailable(format!("the sub-agent could not be reached: {e}"))),
                }
            }
            .into_actor(act)
        })))
    }
}

impl Handler<ChildEvent> for ChatActor {
    type Result = ();

    fn handle(&mut self, msg: ChildEvent, ctx: &mut Context<Self>) {
        let Some(child) = self.child(&msg.child_id) else { return };
        // Closed is final, and close_agent has announced it already.
        if child.status() == SubagentStatus::Closed {
            return;
        }
        child.state.send_replace(ChildState { status: msg.status, report: msg.report.clone() });
        let phase = if msg.status.is_terminal() { SubagentPhase::Finished } else { SubagentPhase::Status };
        let title = child.title.clone();
        self.announce_child(
            EventBody::Subagent { agent_id: msg.child_id, phase, title, status: Some(msg.status), report: msg.report },
            ctx,
        );
    }
}

impl Handler<WatchChildren> for ChatActor {
    type Result = Result<Vec<(String, watch::Receiver<ChildState>)>, ChatOpError>;

    fn handle(&mut self, msg: WatchChildren, _: &mut Context<Self>) -> Self::Result {
        if msg.ids.is_empty() {
            return Err(ChatOpError::invalid("wait_agent needs at least one agent id"));
        }
        msg.ids
            .into_iter()
            .map(|id| match self.child(&id) {
                Some(child) => Ok((id, child.state.subscribe())),
                None => Err(ChatOpError::invalid(format!("`{id}` is not a sub-agent of this chat"))),
            })
            .collect()
    }
}

impl Handler<ChildHandle> for ChatActor {
    type Result = Result<ChatHandle, ChatOpError>;

    fn handle(&mut self, msg: ChildHandle, ctx: &mut Context<Self>) -> Self::Result {
        if self.child(&msg.id).is_some_and(|c| c.status() == SubagentStatus::Closed) {
            return Err(ChatOpError::invalid(format!("sub-agent `{}` was closed", msg.id)));
        }
        self.child_addr(&msg.id, ctx)
            .map(ChatHandle::new)
            .ok_or_else(|| ChatOpError::invalid(format!("`{}` is not a sub-agent of this chat", msg.id)))
    }
}

impl Handler<CloseChild> for ChatActor {
    type Result = AtomicResponse<Self, Result<(), ChatOpError>>;

    fn handle(&mut self, msg: CloseChild, _: &mut Context<Self>) -> Self::Result {
        let Some(child) = self.child(&msg.id) else {
            let e = ChatOpError::invalid(format!("`{}` is not a sub-agent of this chat", msg.id));
            return AtomicResponse::new(Box::pin(actix::fut::ready(Err(e))));
        };
        let addr = child.addr.clone();
        let fut = async move {
            if let Some(addr) = addr {
                // The child closes its own sub-agents before it answers.
                let _ = addr.send(Close { stop_turn: true }).await;
            }
        };
        AtomicResponse::new(Box::pin(fut.into_actor(self).map(move |(), act, ctx| {
            let Some(child) = act.live.as_mut().and_then(|l| l.children.iter_mut().find(|c| c.id == msg.id)) else {
                return Ok(());
            };
            child.addr = None;
            child.state.send_replace(ChildState { status: SubagentStatus::Closed, report: None });
            let title = child.title.clone();
            act.announce_child(
                EventBody::Subagent {
                    agent_id: msg.id,
                    phase: SubagentPhase::Finished,
                    title,
                    status: Some(SubagentStatus::Closed),
                    report: None,
                },
                ctx,
            );
            Ok(())
        })))
    }
}
