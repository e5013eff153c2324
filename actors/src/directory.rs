//! The directory: one per replica, `chat id → ChatHandle`. It starts a chat's actor on first use,
//! on an arbiter picked by hashing the chat id, and replaces actors that have died.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex};

use actix::{Actor, Addr, Arbiter, Recipient};

use crate::chat::ChatActor;
use crate::chat::messages::ChildEvent;
use crate::deps::Deps;
use crate::handle::{ChatFacts, ChatHandle};

/// The threads (actix arbiters) chat actors run on. Started before the directory, so that I/O the
/// actors wait on can be driven from the same thread: a task a [`ActorThreads::run_on_first`]
/// future spawns stays on the first actor thread, and waking an actor from there is no hand-off
/// to another thread.
pub struct ActorThreads {
    arbiters: Vec<Arbiter>,
}

impl ActorThreads {
    /// Starts `threads` arbiters (at least one). Must run inside an actix system.
    pub fn start(threads: usize) -> Self {
        ActorThreads { arbiters: (0..threads.max(1)).map(|_| Arbiter::new()).collect() }
    }

    /// Runs `future` on the first actor thread and returns its output; `None` if the thread
    /// stopped before it finished.
    pub async fn run_on_first<F>(&self, future: F) -> Option<F::Output>
    where
        F: std::future::Future + Send + 'static,
        F::Output: Send + 'static,
    {
        let (done, output) = tokio::sync::oneshot::channel();
        if !self.arbiters[0].spawn(async move {
            let _ = done.send(future.await);
        }) {
            return None;
        }
        output.await.ok()
    }
}

#[derive(Clone)]
pub struct Directory {
    inner: Arc<Inner>,
}

struct Inner {
    deps: Arc<Deps>,
    arbiters: Vec<Arbiter>,
    chats: Mutex<HashMap<String, ChatHandle>>,
}

impl Directory {
    /// Chats' actors are spread over `threads`.
    pub fn new(deps: Deps, threads: ActorThreads) -> Self {
        let arbiters = threads.arbiters;
        Directory { inner: Arc::new(Inner { deps: Arc::new(deps), arbiters, chats: Mutex::new(HashMap::new()) }) }
    }

    pub fn deps(&self) -> &Arc<Deps> {
        &self.inner.deps
    }

    /// The chat's handle, starting its actor if none is alive. The actor loads the chat from the
    /// database before it handles anything; a chat that does not exist stops it again.
    pub fn chat(&self, chat_id: &str) -> ChatHandle {
        let mut chats = self.inner.chats.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(handle) = chats.get(chat_id).filter(|h| h.is_alive()) {
            return handle.clone();
        }
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        chat_id.hash(&mut hasher);
        let arbiter = &self.inner.arbiters[(hasher.finish() as usize) % self.inner.arbiters.len()];
        let deps = self.inner.deps.clone();
        let id = chat_id.to_string();
        let directory = self.clone();
        let addr = ChatActor::start_in_arbiter(&arbiter.handle(), move |_| ChatActor::new(id, deps, directory, None));
        let handle = ChatHandle::new(addr);
        chats.insert(chat_id.to_string(), handle.clone());
        handle
    }

    /// Starts a sub-agent's actor on the calling (parent's) arbiter, reporting to `parent`, and
    /// makes it the one the API reaches for that chat.
    pub(crate) fn start_child(&self, chat_id: &str, parent: Recipient<ChildEvent>) -> Addr<ChatActor> {
        let deps = self.inner.deps.clone();
        let id = chat_id.to_string();
        let directory = self.clone();
        let addr = ChatActor::start_in_arbiter(&Arbiter::current(), move |_| {
            ChatActor::new(id, deps, directory, Some(parent))
        });
        self.inner
            .chats
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(chat_id.to_string(), ChatHandle::new(addr.clone()));
        addr
    }

    /// The owner and model of a chat whose actor is alive and has loaded it; `None` otherwise
    /// (the caller reads the chat instead).
    pub fn loaded_chat(&self, chat_id: &str) -> Option<ChatFacts> {
        let chats = self.inner.chats.lock().unwrap_or_else(|p| p.into_inner());
        chats.get(chat_id).filter(|h| h.is_alive()).and_then(|h| h.facts().cloned())
    }

    /// Called by a chat's actor once it has loaded the chat.
    pub(crate) fn loaded(&self, chat_id: &str, addr: &Addr<ChatActor>, facts: ChatFacts) {
        let chats = self.inner.chats.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(handle) = chats.get(chat_id).filter(|h| h.is(addr)) {
            handle.set_facts(facts);
        }
    }

    /// Forgets a stopped actor, unless its entry already points at a newer one.
    pub(crate) fn forget(&self, chat_id: &str, addr: &Addr<ChatActor>) {
        let mut chats = self.inner.chats.lock().unwrap_or_else(|p| p.into_inner());
        if chats.get(chat_id).is_some_and(|h| h.is(addr)) {
            chats.remove(chat_id);
        }
    }

    /// Stops and forgets a chat's actor and its sub-agents (e.g. the chat was deleted).
    pub async fn evict(&self, chat_id: &str) {
        let handle = self.inner.chats.lock().unwrap_or_else(|p| p.into_inner()).remove(chat_id);
        if let Some(handle) = handle {
            handle.close(true).await;
        }
    }

    /// Stops every actor and the arbiters.
    pub async fn shutdown(&self) {
        let handles: Vec<ChatHandle> =
            self.inner.chats.lock().unwrap_or_else(|p| p.into_inner()).drain().map(|(_, h)| h).collect();
        for h in handles {
            h.close(false).await;
        }
        for a in &self.inner.arbiters {
            a.stop();
        }
    }
}
