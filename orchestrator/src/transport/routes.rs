//! Hands relays' output and results to the calls waiting for them.
//!
//! One subscription per workspace with calls in flight (`ap.ws.<ws>.*.*`), not one per call: a
//! call registers its id and gets a channel; the workspace's router task reads the subscription
//! and passes each message on by the call id that ends its subject. A subscription per call cost
//! a SUB and an UNSUB on the connection and two changes of nats-server's subscription list for
//! every tool call. A router keeps its subscription while calls use it and drops it once none
//! has for a while (a workspace's calls tend to come in bursts: a turn's steps).
//!
//! Order is kept: the router reads one subscription in the order the server delivered it, and
//! each call's channel keeps that order, so a call's last output still comes before its result.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agentplane_schema::nats::Subjects;
use futures::StreamExt;
use tokio::sync::mpsc;

/// A workspace's subscription is dropped at the first of its checks, this far apart, that finds no
/// call waiting and none registered since the check before.
pub const IDLE_UNSUBSCRIBE: Duration = Duration::from_secs(30);

/// The channels of the calls registered under each call id (one, unless the same call is waited
/// for twice).
type Senders = HashMap<String, Vec<mpsc::UnboundedSender<async_nats::Message>>>;

/// The calls of one workspace that wait for messages.
#[derive(Default)]
struct Workspace {
    calls: Mutex<Senders>,
    /// Whether a call registered since the router last looked: a subscription in use stays.
    used: AtomicBool,
    /// Set when the router has stopped, however it stopped (its runtime may have ended).
    closed: AtomicBool,
}

impl Workspace {
    fn calls(&self) -> std::sync::MutexGuard<'_, Senders> {
        self.calls.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Held by a router while it runs: when it stops, its workspace is marked closed and the calls
/// still registered see their channels close.
struct Running(Arc<Workspace>);

impl Drop for Running {
    fn drop(&mut self) {
        self.0.closed.store(true, Ordering::SeqCst);
        self.0.calls().clear();
    }
}

pub struct Routes {
    client: async_nats::Client,
    subjects: Subjects,
    idle: Duration,
    /// A tokio lock: a workspace's subscription is made while it is held, so a second call on
    /// the same workspace waits for it rather than making another. The routers take it only to
    /// leave.
    workspaces: tokio::sync::Mutex<HashMap<String, Arc<Workspace>>>,
}

/// A registered call: its messages arrive on `updates`; dropping it unregisters the call.
pub struct Registration {
    pub updates: mpsc::UnboundedReceiver<async_nats::Message>,
    workspace: Arc<Workspace>,
    call_id: String,
}

impl Drop for Registration {
    fn drop(&mut self) {
        // Closed, this call's channel is the one to leave among those of its call id.
        self.updates.close();
        let mut calls = self.workspace.calls();
        if let Some(waiting) = calls.get_mut(&self.call_id) {
            waiting.retain(|tx| !tx.is_closed());
            if waiting.is_empty() {
                calls.remove(&self.call_id);
            }
        }
    }
}

impl Routes {
    pub fn new(client: async_nats::Client, subjects: Subjects, idle: Duration) -> Arc<Self> {
        Arc::new(Routes { client, subjects, idle, workspaces: Default::default() })
    }

    /// Registers a call. When this returns, the workspace's subscription has been sent to the
    /// server ahead of anything the caller publishes next on the same connection, so no message
    /// the relay sends in answer can miss it.
    pub async fn register(
        self: &Arc<Self>,
        workspace_id: &str,
        call_id: &str,
    ) -> Result<Registration, async_nats::SubscribeError> {
        let (tx, updates) = mpsc::unbounded_channel();
        let mut workspaces = self.workspaces.lock().await;
        loop {
            let workspace = match workspaces.get(workspace_id) {
                Some(workspace) if !workspace.closed.load(Ordering::SeqCst) => workspace.clone(),
                // None yet, or its router stopped without leaving (its runtime ended): a new one.
                _ => {
                    let subscription = self.client.subscribe(self.subjects.workspace_updates(workspace_id)).await?;
                    let workspace = Arc::new(Workspace::default());
                    workspaces.insert(workspace_id.to_owned(), workspace.clone());
                    let running = Running(workspace.clone());
                    tokio::spawn(self.clone().route(workspace_id.to_owned(), running, subscription));
                    workspace
                }
            };
            workspace.used.store(true, Ordering::Relaxed);
            let mut calls = workspace.calls();
            // Checked under the calls' lock, which the stopping router takes after marking it.
            if workspace.closed.load(Ordering::SeqCst) {
                continue;
            }
            calls.entry(call_id.to_owned()).or_default().push(tx);
            drop(calls);
            return Ok(Registration { updates, workspace, call_id: call_id.to_owned() });
        }
    }

    /// How many workspaces have a subscription now.
    pub async fn subscribed(&self) -> usize {
        self.workspaces.lock().await.len()
    }

    /// One workspace's router: passes messages on until the subscription has been idle for a
    /// while or ends (the client was closed: the waiting calls then see their channels close).
    /// Dropping the subscription unsubscribes.
    async fn route(self: Arc<Self>, workspace_id: String, running: Running, mut subscription: async_nats::Subscriber) {
        let workspace = &running.0;
        let mut check = tokio::time::interval_at(tokio::time::Instant::now() + self.idle, self.idle);
        // The registry, locked, once the router is to leave: nothing registers with a router that
        // is going away.
        let mut workspaces = loop {
            tokio::select! {
                message = subscription.next() => match message {
                    Some(message) => {
                        let call_id = message.subject.rsplit('.').next().unwrap_or_default();
                        if let Some((last, others)) = workspace.calls().get(call_id).and_then(|w| w.split_last()) {
                            for tx in others {
                                let _ = tx.send(message.clone());
                            }
                            let _ = last.send(message);
                        }
                    }
                    None => break self.workspaces.lock().await,
                },
                _ = check.tick() => {
                    if workspace.used.swap(false, Ordering::Relaxed) || !workspace.calls().is_empty() {
                        continue;
                    }
                    let workspaces = self.workspaces.lock().await;
                    // A call that registered while the lock was awaited keeps the router.
                    if !workspace.used.load(Ordering::Relaxed) {
                        break workspaces;
                    }
                }
            }
        };
        if workspaces.get(&workspace_id).is_some_and(|w| Arc::ptr_eq(w, workspace)) {
            workspaces.remove(&workspace_id);
        }
        // `running`, dropped now, marks the workspace closed and closes what still waits.
    }
}
