//! The NATS transport: tool requests go to the relay of a workspace over NATS (see
//! `agentplane_schema::nats` for the protocol).
//!
//! A call registers with its workspace's router (see [`super::routes`]: one subscription per
//! workspace gets every call's output and result), sends the request and
//! waits for the relay's acknowledgement ("no responders" = the workspace is offline, at once),
//! then waits for the result. Core NATS is at most once, so a result missed during a reconnect is
//! looked up in the results stream; a relay that stops saying hello while a call runs ends the
//! call with an "outcome unknown" error instead of a wait without end.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use agentplane_actors::ports::{ToolTransport, TransportError, TransportErrorKind};
use agentplane_schema::nats::{
    HEADER_CALL_ID, HEADER_CHAT_ID, HEADER_USER_ID, HELLO_INTERVAL_SECONDS, Hello, RESULTS_STREAM, Subjects, is_token,
};
use agentplane_schema::tool::{ToolRequest, ToolResult};
use async_nats::jetstream;
use futures::StreamExt;
use tokio::sync::{Notify, mpsc};

use super::routes::{IDLE_UNSUBSCRIBE, Routes};

/// How often a waiting call looks for its result in the stream, in case the live copy was lost.
const RESULT_POLL: Duration = Duration::from_secs(2);
/// Missed hellos after which a relay counts as gone.
const HELLOS_MISSED: u32 = 3;
/// After a reconnect, a relay may need a moment to resubscribe: until it says hello again (it
/// does after each reconnect), "no responders" is retried, for at most this long.
const RECONNECT_GRACE: Duration = Duration::from_secs(10);
const NO_RESPONDERS_RETRY: Duration = Duration::from_millis(100);
/// Re-sends of a request a live relay has not acknowledged before the call is given up on.
const MAX_UNACKNOWLEDGED: u32 = 5;
/// How long results stay findable.
const RESULTS_MAX_AGE: Duration = Duration::from_secs(24 * 3600);

fn offline(message: impl Into<String>) -> TransportError {
    TransportError { kind: TransportErrorKind::Offline, message: message.into() }
}

fn other(message: impl Into<String>) -> TransportError {
    TransportError { kind: TransportErrorKind::Other, message: message.into() }
}

/// Which relays said hello, and when: readiness for provisioning, liveness for running calls.
#[derive(Default)]
pub struct Presence {
    seen: Mutex<HashMap<String, Instant>>,
    changed: Notify,
}

impl Presence {
    fn record(&self, workspace_id: &str) {
        self.seen.lock().unwrap_or_else(|p| p.into_inner()).insert(workspace_id.to_string(), Instant::now());
        self.changed.notify_waiters();
    }

    pub fn last_hello(&self, workspace_id: &str) -> Option<Instant> {
        self.seen.lock().unwrap_or_else(|p| p.into_inner()).get(workspace_id).copied()
    }

    pub fn forget(&self, workspace_id: &str) {
        self.seen.lock().unwrap_or_else(|p| p.into_inner()).remove(workspace_id);
    }

    /// Waits until the workspace's relay says hello after `since`.
    pub async fn wait_ready(&self, workspace_id: &str, since: Instant, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.changed.notified();
            if self.last_hello(workspace_id).is_some_and(|t| t >= since) {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return false;
            }
        }
    }
}

pub struct NatsTransport {
    client: async_nats::Client,
    reconnected_at: Arc<Mutex<Option<Instant>>>,
    results: jetstream::stream::Stream,
    subjects: Subjects,
    request_timeout: Duration,
    presence: Arc<Presence>,
    routes: Arc<Routes>,
}

impl NatsTransport {
    /// Connects, makes sure the results stream exists, and starts following relay hellos.
    pub async fn connect(
        url: &str,
        creds: Option<&str>,
        subjects: Subjects,
        request_timeout: Duration,
    ) -> anyhow::Result<Self> {
        let reconnected_at: Arc<Mutex<Option<Instant>>> = Arc::default();
        let connects = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (marker, counter) = (reconnected_at.clone(), connects.clone());
        let mut options = async_nats::ConnectOptions::new()
            .name("agentplane-orchestrator")
            // The default 60 s ping leaves a dead connection unnoticed far too long.
            .ping_interval(Duration::from_secs(5))
            .connection_timeout(Duration::from_secs(5))
            .max_reconnects(None)
            .event_callback(move |event| {
                let (marker, counter) = (marker.clone(), counter.clone());
                async move {
                    match event {
                        async_nats::Event::Connected => {
                            if counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst) > 0 {
                                *marker.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
                            }
                            tracing::info!("NATS connected");
                        }
                        async_nats::Event::Disconnected => tracing::warn!("NATS disconnected; reconnecting"),
                        other => tracing::debug!(event = %other, "NATS event"),
                    }
                }
            });
        if let Some(creds) = creds {
            options = options.credentials(creds)?;
        }
        let client = options.connect(url).await.map_err(|e| anyhow::anyhow!("connecting to NATS at {url}: {e}"))?;
        let js = jetstream::new(client.clone());
        let results = js
            .get_or_create_stream(jetstream::stream::Config {
                name: RESULTS_STREAM.to_string(),
                subjects: vec![subjects.all_results()],
                max_age: RESULTS_MAX_AGE,
                duplicate_window: Duration::from_secs(120),
                ..Default::default()
            })
            .await
            .map_err(|e| anyhow::anyhow!("creating the {RESULTS_STREAM} stream: {e}"))?;
        let presence = Arc::new(Presence::default());
        let mut hellos = client.subscribe(subjects.all_hellos()).await?;
        let watcher = presence.clone();
        tokio::spawn(async move {
            while let Some(msg) = hellos.next().await {
                if let Ok(hello) = serde_json::from_slice::<Hello>(&msg.payload) {
                    watcher.record(&hello.workspace_id);
                }
            }
        });
        let routes = Routes::new(client.clone(), subjects.clone(), IDLE_UNSUBSCRIBE);
        Ok(NatsTransport { client, reconnected_at, results, subjects, request_timeout, presence, routes })
    }

    /// Checks each workspace's subscription every `idle` instead of every [`IDLE_UNSUBSCRIBE`]
    /// (dropped when no call waits and none registered since the last check); set before the
    /// first call.
    pub fn idle_unsubscribe(mut self, idle: Duration) -> Self {
        self.routes = Routes::new(self.client.clone(), self.subjects.clone(), idle);
        self
    }

    /// How many workspaces the transport is subscribed to now (for calls in flight or lately).
    pub async fn subscribed_workspaces(&self) -> usize {
        self.routes.subscribed().await
    }

    pub fn presence(&self) -> Arc<Presence> {
        self.presence.clone()
    }

    pub fn subjects(&self) -> &Subjects {
        &self.subjects
    }

    async fn stored_result(&self, subject: &str) -> Option<ToolResult> {
        let msg = self.results.get_last_raw_message_by_subject(subject).await.ok()?;
        serde_json::from_slice(&msg.payload).ok()
    }

    /// Whether "no responders" may only mean the relay has not resubscribed since a reconnect.
    fn relay_may_be_resubscribing(&self, workspace_id: &str) -> bool {
        let Some(reconnected) = *self.reconnected_at.lock().unwrap_or_else(|p| p.into_inner()) else {
            return false;
        };
        reconnected.elapsed() < RECONNECT_GRACE
            && self.presence.last_hello(workspace_id).is_none_or(|hello| hello < reconnected)
    }

    /// Sends the request until a relay takes it; `Err` says why none did.
    async fn deliver(
        &self,
        workspace_id: &str,
        headers: async_nats::HeaderMap,
        payload: bytes::Bytes,
    ) -> Result<(), TransportError> {
        let subject = self.subjects.request(workspace_id);
        let mut deadline = tokio::time::Instant::now() + self.request_timeout;
        let mut unacknowledged = 0;
        loop {
            let sent = tokio::time::timeout_at(
                deadline,
                self.client.request_with_headers(subject.clone(), headers.clone(), payload.clone()),
            )
            .await;
            match sent {
                Ok(Ok(_)) => return Ok(()),
                Ok(Err(e)) if e.kind() == async_nats::RequestErrorKind::NoResponders => {
                    if !self.relay_may_be_resubscribing(workspace_id)
                        || tokio::time::Instant::now() + NO_RESPONDERS_RETRY >= deadline
                    {
                        return Err(offline("no relay is serving this workspace"));
                    }
                    tokio::time::sleep(NO_RESPONDERS_RETRY).await;
                }
                Ok(Err(e)) if e.kind() != async_nats::RequestErrorKind::TimedOut => {
                    return Err(other(format!("sending the request: {e}")));
                }
                // No acknowledgement in time. A busy relay that is alive may have taken the call
                // anyway: ask again with the same call id (its journal answers a repeat without
                // running it twice) rather than report a call that may be running as offline.
                _ if self.relay_recently_seen(workspace_id) && unacknowledged < MAX_UNACKNOWLEDGED => {
                    unacknowledged += 1;
                    deadline = tokio::time::Instant::now() + self.request_timeout;
                }
                _ if unacknowledged > 0 => {
                    return Err(TransportError {
                        kind: TransportErrorKind::Timeout,
                        message: format!(
                            "the workspace's relay is alive but did not acknowledge the call after {} tries; \
                             its outcome is unknown",
                            unacknowledged + 1
                        ),
                    });
                }
                _ => {
                    return Err(offline(format!(
                        "the workspace's relay did not accept the call within {} ms",
                        self.request_timeout.as_millis()
                    )));
                }
            }
        }
    }

    /// Whether the relay's hellos are current (it is alive, whatever it is busy with).
    fn relay_recently_seen(&self, workspace_id: &str) -> bool {
        let grace = Duration::from_secs(HELLO_INTERVAL_SECONDS * u64::from(HELLOS_MISSED));
        self.presence.last_hello(workspace_id).is_some_and(|t| t.elapsed() < grace)
    }

    /// Whether the relay has said hello recently enough to count as alive.
    fn relay_alive(&self, workspace_id: &str, call_started: Instant) -> bool {
        let grace = Duration::from_secs(HELLO_INTERVAL_SECONDS * u64::from(HELLOS_MISSED));
        let last = self.presence.last_hello(workspace_id).unwrap_or(call_started).max(call_started);
        last.elapsed() < grace
    }
}

#[async_trait::async_trait]
impl ToolTransport for NatsTransport {
    async fn call(
        &self,
        workspace_id: &str,
        request: ToolRequest,
        output: Option<mpsc::UnboundedSender<String>>,
    ) -> Result<ToolResult, TransportError> {
        if !is_token(workspace_id) || !is_token(&request.call_id) {
            return Err(other("workspace and call ids must be single subject tokens"));
        }
        let call_id = request.call_id.clone();
        let result_subject = self.subjects.result(workspace_id, &call_id);
        let output_subject = self.subjects.output(workspace_id, &call_id);
        // Output and result come in one channel, in the order the relay sent them: the last
        // pieces of output before the result.
        let mut registration =
            self.routes.register(workspace_id, &call_id).await.map_err(|e| other(format!("subscribing: {e}")))?;
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(HEADER_CALL_ID, call_id.as_str());
        headers.insert(HEADER_CHAT_ID, request.chat_id.as_str());
        headers.insert(HEADER_USER_ID, request.user_id.as_str());
        let payload = serde_json::to_vec(&request).map_err(|e| other(format!("encoding the request: {e}")))?;
        let started = Instant::now();
        self.deliver(workspace_id, headers, payload.into()).await?;
        // Not `interval` and its immediate first tick: the timer rounds that tick up to the next
        // millisecond, which held any result arriving within that millisecond (a fast tool's)
        // until the tick.
        let mut poll = tokio::time::interval_at(tokio::time::Instant::now() + RESULT_POLL, RESULT_POLL);
        loop {
            tokio::select! {
                msg = registration.updates.recv() => match msg {
                    Some(msg) if msg.subject.as_str() == result_subject => {
                        return serde_json::from_slice(&msg.payload)
                            .map_err(|e| other(format!("the relay sent an unreadable result: {e}")));
                    }
                    Some(piece) if piece.subject.as_str() == output_subject => {
                        if let Some(tx) = &output {
                            let _ = tx.send(String::from_utf8_lossy(&piece.payload).into_owned());
                        }
                    }
                    Some(_) => {}
                    None => return Err(other("the NATS connection was closed")),
                },
                _ = poll.tick() => {
                    if let Some(result) = self.stored_result(&result_subject).await {
                        return Ok(result);
                    }
                    if !self.relay_alive(workspace_id, started) {
                        return Err(offline(
                            "the workspace's relay stopped answering while the call ran; its outcome is unknown",
                        ));
                    }
                }
            }
        }
    }

    async fn cancel(&self, workspace_id: &str, call_id: &str) {
        if let Err(e) = self.client.publish(self.subjects.cancel(workspace_id), call_id.to_string().into()).await {
            tracing::warn!(workspace = workspace_id, call = call_id, error = %e, "could not send a cancel");
        }
    }
}

#[cfg(test)]
mod tests {
    use agentplane_schema::nats::ACK;
    use agentplane_tests::nats::NatsServer;

    use super::*;

    const WAIT: Duration = Duration::from_secs(10);

    fn request(call_id: &str) -> ToolRequest {
        ToolRequest {
            call_id: call_id.into(),
            chat_id: "chat".into(),
            user_id: "user".into(),
            name: "execute".into(),
            args: serde_json::json!({"command": "true"}),
        }
    }

    fn result(call_id: &str) -> bytes::Bytes {
        serde_json::to_vec(&ToolResult::ok(call_id.to_string(), format!("done {call_id}"))).expect("json").into()
    }

    /// A relay that speaks the protocol by hand: it acknowledges the requests of workspace `w1`
    /// and hands their call ids over, so a test decides what to answer, in which order.
    struct HandRelay {
        client: async_nats::Client,
        taken: mpsc::UnboundedReceiver<String>,
    }

    impl HandRelay {
        /// Like a real relay it says hello once it listens, and this returns once `transport`
        /// has heard it (a request sent to a nats-server that has just started may otherwise
        /// find no responder).
        async fn start(url: &str, transport: &NatsTransport) -> Self {
            let client = async_nats::connect(url).await.expect("connect");
            let mut requests = client.subscribe(Subjects::default().request("w1")).await.expect("subscribe");
            let (tx, taken) = mpsc::unbounded_channel();
            let answering = client.clone();
            tokio::spawn(async move {
                while let Some(msg) = requests.next().await {
                    let call: ToolRequest = serde_json::from_slice(&msg.payload).expect("a tool request");
                    answering.publish(msg.reply.expect("a reply subject"), ACK.into()).await.expect("ack");
                    let _ = tx.send(call.call_id);
                }
            });
            let hello = Hello { workspace_id: "w1".into(), relay_version: "test".into(), started_at: "now".into() };
            let hello = bytes::Bytes::from(serde_json::to_vec(&hello).expect("json"));
            let (since, deadline) = (Instant::now(), Instant::now() + WAIT);
            loop {
                client.publish(Subjects::default().hello("w1"), hello.clone()).await.expect("hello");
                if transport.presence().wait_ready("w1", since, Duration::from_millis(50)).await {
                    return HandRelay { client, taken };
                }
                assert!(Instant::now() < deadline, "the transport never heard the relay's hello");
            }
        }

        /// The id of the next call the relay took.
        async fn next_call(&mut self) -> String {
            tokio::time::timeout(WAIT, self.taken.recv()).await.expect("a call in time").expect("a call")
        }

        async fn output(&self, call: &str, piece: &str) {
            let piece = bytes::Bytes::copy_from_slice(piece.as_bytes());
            self.client.publish(Subjects::default().output("w1", call), piece).await.expect("output");
        }

        /// Publishes `call`'s result, "done <call>".
        async fn finish(&self, call: &str) {
            self.client.publish(Subjects::default().result("w1", call), result(call)).await.expect("result");
        }

        /// Answers the next call taken with `pieces` of output, then its result.
        async fn answer_next(&mut self, pieces: &[&str]) {
            let call = self.next_call().await;
            for piece in pieces {
                self.output(&call, piece).await;
            }
            self.finish(&call).await;
        }
    }

    async fn transport(url: &str) -> NatsTransport {
        NatsTransport::connect(url, None, Subjects::default(), Duration::from_secs(5)).await.expect("transport")
    }

    /// Calls running at once on one workspace share its subscription, and each gets its own
    /// output, in order and before its result, however the relay interleaves them.
    #[tokio::test]
    async fn calls_on_one_workspace_each_get_their_own_output_and_result() {
        let nats = NatsServer::start();
        let transport = Arc::new(transport(&nats.url()).await);
        let mut relay = HandRelay::start(&nats.url(), &transport).await;
        let calls: [&'static str; 3] = ["c1", "c2", "c3"];
        let running: Vec<_> = calls
            .into_iter()
            .map(|id| {
                let (transport, (tx, rx)) = (transport.clone(), mpsc::unbounded_channel());
                (tokio::spawn(async move { transport.call("w1", request(id), Some(tx)).await }), rx)
            })
            .collect();
        for _ in calls {
            relay.next_call().await;
        }
        assert_eq!(transport.subscribed_workspaces().await, 1, "one subscription for the workspace");
        for (call, piece) in [("c3", "a"), ("c1", "b"), ("c2", "c"), ("c1", "d"), ("c3", "e"), ("c2", "f")] {
            relay.output(call, piece).await;
        }
        for call in ["c2", "c3", "c1"] {
            relay.finish(call).await;
        }
        for ((task, mut output), (call, expected)) in running.into_iter().zip(calls.iter().zip(["bd", "cf", "ae"])) {
            let answer = tokio::time::timeout(WAIT, task).await.expect("the call ends").expect("task").expect("call");
            assert_eq!(answer.output, format!("done {call}"));
            let mut pieces = String::new();
            while let Ok(piece) = output.try_recv() {
                pieces.push_str(&piece);
            }
            assert_eq!(pieces, expected, "{call}'s output, all of it, before its result");
        }
    }

    /// The same call waited for twice at once (a repeat of a request) gets its result twice.
    #[tokio::test]
    async fn a_call_waited_for_twice_is_answered_to_both() {
        let nats = NatsServer::start();
        let transport = transport(&nats.url()).await;
        let mut relay = HandRelay::start(&nats.url(), &transport).await;
        let answer = async {
            for _ in 0..2 {
                relay.next_call().await;
            }
            relay.finish("c1").await;
        };
        let (first, second, ()) =
            tokio::join!(transport.call("w1", request("c1"), None), transport.call("w1", request("c1"), None), answer);
        assert_eq!(first.expect("first").output, "done c1");
        assert_eq!(second.expect("second").output, "done c1");
    }

    /// A router whose runtime ended (the call that started it ran on another runtime) is
    /// replaced: the next call's output still arrives (the results stream alone would give only
    /// the result).
    #[tokio::test]
    async fn a_router_whose_runtime_ended_is_replaced() {
        let nats = NatsServer::start();
        let transport = Arc::new(transport(&nats.url()).await);
        let mut relay = HandRelay::start(&nats.url(), &transport).await;
        let elsewhere = transport.clone();
        let other_runtime = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
            runtime.block_on(elsewhere.call("w1", request("c1"), None))
        });
        relay.answer_next(&[]).await;
        let first = tokio::task::spawn_blocking(move || other_runtime.join().expect("thread")).await.expect("join");
        assert_eq!(first.expect("first call").output, "done c1");

        let (tx, mut output) = mpsc::unbounded_channel();
        let (second, ()) = tokio::join!(transport.call("w1", request("c2"), Some(tx)), relay.answer_next(&["piece"]));
        assert_eq!(second.expect("second call").output, "done c2");
        assert_eq!(output.try_recv().ok().as_deref(), Some("piece"), "the output came through a live router");
    }

    /// A workspace's subscription goes once no call has used it for a while, and the next call
    /// makes it again.
    #[tokio::test]
    async fn an_idle_workspace_subscription_is_dropped_and_made_again() {
        let nats = NatsServer::start();
        let transport = transport(&nats.url()).await.idle_unsubscribe(Duration::from_millis(50));
        let mut relay = HandRelay::start(&nats.url(), &transport).await;
        let (first, ()) = tokio::join!(transport.call("w1", request("c1"), None), relay.answer_next(&[]));
        assert_eq!(first.expect("first call").output, "done c1");
        let deadline = Instant::now() + WAIT;
        while transport.subscribed_workspaces().await > 0 {
            assert!(Instant::now() < deadline, "the idle subscription was not dropped");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let (second, ()) = tokio::join!(transport.call("w1", request("c2"), None), relay.answer_next(&[]));
        assert_eq!(second.expect("second call").output, "done c2");
    }
}
