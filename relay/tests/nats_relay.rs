//! The `agentplane-relay` binary against a real nats-server: the protocol of
//! `agentplane_schema::nats` as the orchestrator sees it — ACK, hello, streamed output, results on
//! `res.<call>` captured by the results stream, repeated requests, crashes, cancels, reconnects.
//!
//! Each test starts its own server (JetStream, no auth), creates the results stream the way the
//! orchestrator does, and spawns the built binary with a temporary root and state directory.
//! Waits are bounded and wait for events (a message, a file), never for a fixed time.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use async_nats::{Client, HeaderMap, Subscriber};
use bytes::Bytes;
use futures::StreamExt as _;
use serde_json::json;

use agentplane_relay::worker::INTERRUPTED;
use agentplane_schema::nats::{ACK, HEADER_CALL_ID, HEADER_CHAT_ID, HEADER_USER_ID, Hello, RESULTS_STREAM, Subjects};
use agentplane_schema::tool::{ToolRequest, ToolResult};
use agentplane_tests::NatsServer;

/// Generous bound for anything that should take milliseconds, for slow CI machines.
const WAIT: Duration = Duration::from_secs(15);

/// A test's world: a server, a client playing the orchestrator, and directories for a relay.
struct Fixture {
    nats: NatsServer,
    client: Client,
    tmp: tempfile::TempDir,
    ws: String,
    subjects: Subjects,
}

impl Fixture {
    async fn start() -> Fixture {
        agentplane_tests::init_tracing();
        let nats = NatsServer::start();
        let client = async_nats::connect(nats.url()).await.expect("test client connects");
        let subjects = Subjects::default();
        jetstream::new(client.clone())
            .create_stream(jetstream::stream::Config {
                name: RESULTS_STREAM.to_owned(),
                subjects: vec![subjects.all_results()],
                ..Default::default()
            })
            .await
            .expect("results stream");
        let tmp = tempfile::tempdir().expect("tempdir");
        Fixture { nats, client, tmp, ws: "ws-test".to_owned(), subjects }
    }

    fn root(&self) -> PathBuf {
        self.tmp.path().join("root")
    }

    /// Spawns a relay and waits for its first hello, after which it is subscribed.
    async fn relay(&self) -> RelayProcess {
        self.relay_with(&[]).await
    }

    async fn relay_with(&self, extra_args: &[&str]) -> RelayProcess {
        self.relay_reading(extra_args, Stdio::null()).await
    }

    /// [`Fixture::relay_with`], its standard input set to `stdin`.
    async fn relay_reading(&self, extra_args: &[&str], stdin: Stdio) -> RelayProcess {
        let mut hellos = self.subscribe(self.subjects.hello(&self.ws)).await;
        let relay = self.spawn_relay_reading(extra_args, stdin);
        next(&mut hellos, "the first hello").await;
        relay
    }

    fn spawn_relay(&self) -> RelayProcess {
        self.spawn_relay_with(&[])
    }

    fn spawn_relay_with(&self, extra_args: &[&str]) -> RelayProcess {
        self.spawn_relay_reading(extra_args, Stdio::null())
    }

    fn spawn_relay_reading(&self, extra_args: &[&str], stdin: Stdio) -> RelayProcess {
        let log = self.tmp.path().join(format!("relay-{}.log", uuid::Uuid::now_v7()));
        let stderr = std::fs::File::create(&log).expect("log file");
        let child = Command::new(env!("CARGO_BIN_EXE_agentplane-relay"))
            .args(["--nats", &self.nats.url(), "--workspace", &self.ws])
            .arg("--root")
            .arg(self.root())
            .arg("--state-dir")
            .arg(self.tmp.path().join("state"))
            .args(extra_args)
            .env("AGENTPLANE_RELAY_SHUTDOWN_GRACE_SECONDS", "10")
            .env_remove("AGENTPLANE_RELAY_CREDS")
            .env_remove("AGENTPLANE_RELAY_CREDS_FILE")
            .env("RUST_LOG", "info,agentplane_relay=debug")
            .stdin(stdin)
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("the relay binary starts");
        RelayProcess { child, log }
    }

    async fn subscribe(&self, subject: String) -> Subscriber {
        let subscriber = self.client.subscribe(subject).await.expect("subscribe");
        // The subscription is in place at the server once a round trip has passed.
        self.client.flush().await.expect("flush");
        subscriber
    }

    /// Sends a request the way the orchestrator does and checks that the relay took it.
    /// Subscribes to the call's output and result, then sends it and waits for the output line
    /// `started`; returns both subscriptions.
    async fn start_until_started(&self, request: &ToolRequest) -> (async_nats::Subscriber, async_nats::Subscriber) {
        let mut pieces = self.subscribe(self.subjects.output(&self.ws, &request.call_id)).await;
        let results = self.subscribe(self.subjects.result(&self.ws, &request.call_id)).await;
        self.send(request).await;
        output_until(&mut pieces, "started").await;
        (pieces, results)
    }

    async fn send(&self, request: &ToolRequest) {
        let reply = self.try_send(request).await.expect("the relay answers the request");
        assert_eq!(reply.payload.as_ref(), ACK);
    }

    async fn try_send(&self, request: &ToolRequest) -> Result<async_nats::Message, async_nats::RequestError> {
        let mut headers = HeaderMap::new();
        headers.insert(HEADER_CALL_ID, request.call_id.as_str());
        headers.insert(HEADER_CHAT_ID, request.chat_id.as_str());
        headers.insert(HEADER_USER_ID, request.user_id.as_str());
        let payload = Bytes::from(serde_json::to_vec(request).expect("json"));
        self.client.request_with_headers(self.subjects.request(&self.ws), headers, payload).await
    }

    /// Subscribes to the call's result, sends the request and waits for the result.
    async fn call(&self, request: &ToolRequest) -> ToolResult {
        let mut results = self.subscribe(self.subjects.result(&self.ws, &request.call_id)).await;
        self.send(request).await;
        next_result(&mut results).await
    }

    fn read(&self, file: &str) -> String {
        std::fs::read_to_string(self.root().join(file)).unwrap_or_default()
    }
}

/// The relay binary, killed (SIGKILL) when dropped; its log is printed if the test fails.
struct RelayProcess {
    child: Child,
    log: PathBuf,
}

impl RelayProcess {
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn signal(&self, signal: &str) {
        let status = Command::new("kill").args([signal, &self.child.id().to_string()]).status().expect("kill runs");
        assert!(status.success());
    }

    /// Waits for the process to exit by itself.
    async fn exited(&mut self) -> std::process::ExitStatus {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(Instant::now() < deadline, "the relay did not exit; log:\n{}", self.log());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for RelayProcess {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!("--- relay log ({}) ---\n{}", self.log.display(), self.log());
        }
    }
}

fn request(name: &str, args: serde_json::Value) -> ToolRequest {
    ToolRequest {
        call_id: uuid::Uuid::now_v7().to_string(),
        chat_id: "chat-1".into(),
        user_id: "user-1".into(),
        name: name.into(),
        args,
    }
}

fn execute(command: &str) -> ToolRequest {
    request("execute", json!({"command": command, "timeout_seconds": 120}))
}

async fn next(subscriber: &mut Subscriber, what: &str) -> async_nats::Message {
    match tokio::time::timeout(WAIT, subscriber.next()).await {
        Ok(Some(message)) => message,
        Ok(None) => panic!("subscription ended while waiting for {what}"),
        Err(_) => panic!("no {what} within {WAIT:?}"),
    }
}

async fn next_result(subscriber: &mut Subscriber) -> ToolResult {
    let message = next(subscriber, "result").await;
    serde_json::from_slice(&message.payload).expect("a ToolResult")
}

/// Waits for output pieces of a call until their text contains `text`.
async fn output_until(pieces: &mut Subscriber, text: &str) {
    let mut seen = String::new();
    while !seen.contains(text) {
        let message = next(pieces, "output").await;
        seen.push_str(&String::from_utf8_lossy(&message.payload));
    }
}

/// Waits until `path` exists and holds a line.
async fn wait_for_line(path: &Path) -> String {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Ok(text) = std::fs::read_to_string(path)
            && let Some(line) = text.strip_suffix('\n')
        {
            return line.to_owned();
        }
        assert!(Instant::now() < deadline, "{} never got a line", path.display());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Kills what a command left running when its relay was killed with it (`echo $$ > pgid`).
fn kill_group(pgid: &str) {
    let _ = Command::new("kill").args(["-KILL", "--", &format!("-{pgid}")]).status();
}

#[tokio::test]
async fn write_then_read_over_nats() {
    let fx = Fixture::start().await;
    let _relay = fx.relay().await;

    let write = request("write_file", json!({"path": "notes/a.txt", "content": "hello\nworld\n"}));
    let written = fx.call(&write).await;
    assert!(!written.is_error, "{}", written.output);
    assert_eq!(written.call_id, write.call_id);
    assert_eq!(fx.read("notes/a.txt"), "hello\nworld\n");

    let read = request("read_file", json!({"path": "notes/a.txt"}));
    let result = fx.call(&read).await;
    assert!(!result.is_error, "{}", result.output);
    assert!(result.output.contains("hello") && result.output.contains("world"), "{}", result.output);

    // The results stream holds it too, under the call id as message id, for whichever replica
    // looks for it later.
    let mut stream = jetstream::new(fx.client.clone()).get_stream(RESULTS_STREAM).await.expect("stream");
    let stored = stream
        .get_last_raw_message_by_subject(&fx.subjects.result(&fx.ws, &read.call_id))
        .await
        .expect("the result is in the stream");
    assert_eq!(
        stored.headers.get(async_nats::header::NATS_MESSAGE_ID).map(|v| v.as_str()),
        Some(read.call_id.as_str())
    );
    assert_eq!(serde_json::from_slice::<ToolResult>(&stored.payload).expect("json"), result);
    assert_eq!(stream.info().await.expect("info").state.messages, 2);
}

#[tokio::test]
async fn hello_arrives_at_start() {
    let fx = Fixture::start().await;
    let mut hellos = fx.subscribe(fx.subjects.hello(&fx.ws)).await;
    let _relay = fx.spawn_relay();
    let message = next(&mut hellos, "hello").await;
    let hello: Hello = serde_json::from_slice(&message.payload).expect("a Hello");
    assert_eq!(hello.workspace_id, fx.ws);
    assert_eq!(hello.relay_version, env!("CARGO_PKG_VERSION"));
    assert!(chrono::DateTime::parse_from_rfc3339(&hello.started_at).is_ok(), "{}", hello.started_at);
}

#[tokio::test]
async fn execute_output_arrives_before_the_result() {
    let fx = Fixture::start().await;
    let _relay = fx.relay().await;
    let run = execute("echo one; sleep 0.3; echo two");
    // One subscription for out.<call> and res.<call> keeps their order as published.
    let mut messages = fx.subscribe(format!("{}.ws.{}.*.{}", fx.subjects.prefix(), fx.ws, run.call_id)).await;
    fx.send(&run).await;

    let output_subject = fx.subjects.output(&fx.ws, &run.call_id);
    let mut streamed = String::new();
    let mut pieces = 0;
    let result = loop {
        let message = next(&mut messages, "output or result").await;
        if message.subject.as_str() == output_subject {
            streamed.push_str(std::str::from_utf8(&message.payload).expect("UTF-8 output"));
            pieces += 1;
        } else {
            assert_eq!(message.subject.as_str(), fx.subjects.result(&fx.ws, &run.call_id));
            break serde_json::from_slice::<ToolResult>(&message.payload).expect("a ToolResult");
        }
    };
    assert_eq!(streamed, "one\ntwo\n");
    assert!(pieces >= 2, "the output came in {pieces} piece(s), not as it was written");
    assert_eq!(result.exit_code, Some(0));
    assert!(result.output.starts_with("one\ntwo\nexit code: 0"), "{}", result.output);
}

#[tokio::test]
async fn a_repeated_request_runs_once_and_gets_the_same_result() {
    let fx = Fixture::start().await;
    let _relay = fx.relay().await;
    let run = execute("echo ran >> runs.txt; echo hi");
    let first = fx.call(&run).await;
    assert_eq!(first.exit_code, Some(0), "{}", first.output);
    let second = fx.call(&run).await;
    assert_eq!(second, first);
    assert_eq!(fx.read("runs.txt"), "ran\n");
}

#[tokio::test]
async fn a_repeated_file_write_runs_once_also_after_a_restart() {
    let fx = Fixture::start().await;
    let mut relay = fx.relay().await;
    let write = request("write_file", json!({"path": "a.txt", "content": "from the call\n"}));
    let first = fx.call(&write).await;
    assert!(!first.is_error, "{}", first.output);
    assert_eq!(fx.read("a.txt"), "from the call\n");

    // Someone changes the file; a repeat of the call must not undo that.
    std::fs::write(fx.root().join("a.txt"), "changed since\n").expect("write");
    assert_eq!(fx.call(&write).await, first);
    assert_eq!(fx.read("a.txt"), "changed since\n");

    // The journal on disk answers it after a restart too.
    relay.signal("-TERM");
    assert!(relay.exited().await.success(), "{}", relay.log());
    let _relay = fx.relay().await;
    assert_eq!(fx.call(&write).await, first);
    assert_eq!(fx.read("a.txt"), "changed since\n");

    // A read is not journaled on disk: after a restart it runs again.
    let read = request("read_file", json!({"path": "a.txt"}));
    assert!(fx.call(&read).await.output.contains("changed since"));
}

#[tokio::test]
async fn a_copy_arriving_while_the_call_runs_does_not_run_it_again() {
    let fx = Fixture::start().await;
    let _relay = fx.relay().await;
    let run = execute("echo ran >> runs.txt; echo started; while [ ! -e gate ]; do sleep 0.05; done; echo done");
    let (_pieces, mut results) = fx.start_until_started(&run).await;

    fx.send(&run).await;
    // The relay takes requests one after another: once a later one is acknowledged, the copy
    // has been looked up while the first still ran (it waits for the gate).
    fx.call(&request("read_file", json!({"path": "runs.txt"}))).await;
    std::fs::write(fx.root().join("gate"), "").expect("open the gate");

    let result = next_result(&mut results).await;
    assert!(result.output.starts_with("started\ndone\nexit code: 0"), "{}", result.output);
    // Asked once more, the relay answers with the recorded result.
    fx.send(&run).await;
    assert_eq!(next_result(&mut results).await, result);
    assert_eq!(fx.read("runs.txt"), "ran\n");
    // The copy taken while the call ran published nothing of its own: the stream got the
    // result once (the repeat after it is dropped as a duplicate by its message id).
    let stream = jetstream::new(fx.client.clone()).get_stream(RESULTS_STREAM).await.expect("stream");
    let stored =
        stream.get_last_raw_message_by_subject(&fx.subjects.result(&fx.ws, &run.call_id)).await.expect("stored");
    assert_eq!(serde_json::from_slice::<ToolResult>(&stored.payload).expect("json"), result);
}

#[tokio::test]
async fn a_call_cut_off_by_a_crash_is_reported_interrupted_and_never_run_again() {
    let fx = Fixture::start().await;
    let mut relay = fx.relay().await;
    let run = execute("echo $$ > pgid; echo ran >> runs.txt; echo started; sleep 30");
    let (_pieces, mut results) = fx.start_until_started(&run).await;
    let pgid = wait_for_line(&fx.root().join("pgid")).await;

    relay.kill();
    // The command outlives a SIGKILLed relay (nobody is left to kill its group).
    kill_group(&pgid);

    // At start, the new process reports what the old one left unfinished.
    let _relay = fx.relay().await;
    let result = next_result(&mut results).await;
    assert_eq!(result, ToolResult::error(&run.call_id, INTERRUPTED));

    fx.send(&run).await;
    assert_eq!(next_result(&mut results).await, result);
    assert_eq!(fx.read("runs.txt"), "ran\n");
}

#[tokio::test]
async fn cancel_stops_a_running_execute() {
    let fx = Fixture::start().await;
    let _relay = fx.relay().await;
    let run = execute("echo started; sleep 30; echo never");
    let mut pieces = fx.subscribe(fx.subjects.output(&fx.ws, &run.call_id)).await;
    let mut results = fx.subscribe(fx.subjects.result(&fx.ws, &run.call_id)).await;
    let started = Instant::now();
    fx.send(&run).await;
    output_until(&mut pieces, "started").await;

    fx.client.publish(fx.subjects.cancel(&fx.ws), run.call_id.clone().into()).await.expect("publish cancel");
    let result = next_result(&mut results).await;
    assert!(result.is_error);
    assert!(result.output.starts_with("started\ninterrupted after"), "{}", result.output);
    assert!(started.elapsed() < Duration::from_secs(20));
}

#[tokio::test]
async fn a_cancel_before_the_command_starts_still_stops_it() {
    let fx = Fixture::start().await;
    let _relay = fx.relay().await;
    let run = execute("sleep 30");
    let mut results = fx.subscribe(fx.subjects.result(&fx.ws, &run.call_id)).await;
    fx.send(&run).await;
    // Right behind the request: the command may not have been started yet.
    fx.client.publish(fx.subjects.cancel(&fx.ws), run.call_id.clone().into()).await.expect("publish cancel");
    let result = next_result(&mut results).await;
    assert!(result.is_error);
    assert!(result.output.starts_with("interrupted"), "{}", result.output);
}

#[tokio::test(flavor = "multi_thread")]
async fn reconnects_after_the_server_restarts() {
    let mut fx = Fixture::start().await;
    let _relay = fx.relay().await;
    assert!(!fx.call(&execute("echo before")).await.is_error);

    tokio::task::block_in_place(|| fx.nats.restart());
    // A hello after the restart says the relay is back (it announces itself on reconnecting).
    let mut hellos = fx.subscribe(fx.subjects.hello(&fx.ws)).await;
    next(&mut hellos, "a hello after the restart").await;

    let run = execute("echo after");
    let mut results = fx.subscribe(fx.subjects.result(&fx.ws, &run.call_id)).await;
    let deadline = Instant::now() + WAIT;
    loop {
        match fx.try_send(&run).await {
            Ok(reply) => {
                assert_eq!(reply.payload.as_ref(), ACK);
                break;
            }
            // The hello may be a periodic one sent just before the relay re-subscribed.
            Err(err) if Instant::now() < deadline => {
                tracing::info!(%err, "relay not back yet");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(err) => panic!("the relay did not come back: {err}"),
        }
    }
    let result = next_result(&mut results).await;
    assert!(result.output.starts_with("after\nexit code: 0"), "{}", result.output);
}

#[tokio::test]
async fn no_responders_when_no_relay_serves_the_workspace() {
    let fx = Fixture::start().await;
    let started = Instant::now();
    let Err(err) = fx.try_send(&execute("true")).await else { panic!("someone answered") };
    assert_eq!(err.kind(), async_nats::RequestErrorKind::NoResponders, "{err}");
    assert!(started.elapsed() < Duration::from_secs(2), "took {:?}", started.elapsed());
}

#[tokio::test]
async fn an_unreadable_request_is_answered_with_an_error_result() {
    let fx = Fixture::start().await;
    let _relay = fx.relay().await;
    let call_id = uuid::Uuid::now_v7().to_string();
    let mut results = fx.subscribe(fx.subjects.result(&fx.ws, &call_id)).await;
    let mut headers = HeaderMap::new();
    headers.insert(HEADER_CALL_ID, call_id.as_str());
    let reply = fx
        .client
        .request_with_headers(fx.subjects.request(&fx.ws), headers, Bytes::from_static(b"{not json"))
        .await
        .expect("answered");
    assert_eq!(reply.payload.as_ref(), ACK);
    let result = next_result(&mut results).await;
    assert!(result.is_error);
    assert!(result.output.starts_with("the relay could not read the tool request"), "{}", result.output);
}

#[tokio::test]
async fn sigterm_lets_a_running_call_finish_then_exits() {
    let fx = Fixture::start().await;
    let mut relay = fx.relay().await;
    let run = execute("echo started; sleep 0.5; echo finished");
    let (_pieces, mut results) = fx.start_until_started(&run).await;

    relay.signal("-TERM");
    let result = next_result(&mut results).await;
    assert!(result.output.starts_with("started\nfinished\nexit code: 0"), "{}", result.output);
    assert!(relay.exited().await.success(), "log:\n{}", relay.log());
    let Err(err) = fx.try_send(&execute("true")).await else { panic!("a stopped relay answered") };
    assert_eq!(err.kind(), async_nats::RequestErrorKind::NoResponders);
}

/// With `--stop-when-stdin-closes` the relay stops, as on SIGTERM, once the process holding its
/// standard input lets go of it (as the kernel does for a parent that dies).
#[tokio::test]
async fn the_relay_stops_when_its_standard_input_closes() {
    let fx = Fixture::start().await;
    let mut relay = fx.relay_reading(&["--stop-when-stdin-closes"], Stdio::piped()).await;
    assert_eq!(fx.call(&execute("echo still here")).await.output.lines().next(), Some("still here"));

    drop(relay.child.stdin.take());
    assert!(relay.exited().await.success(), "log:\n{}", relay.log());
    assert!(relay.log().contains("standard input closed"), "{}", relay.log());
}

#[tokio::test]
async fn sigterm_cancels_calls_that_outlast_the_grace() {
    let fx = Fixture::start().await;
    let mut relay = fx.relay_with(&["--shutdown-grace-seconds", "1"]).await;
    let run = execute("echo started; sleep 30");
    let (_pieces, mut results) = fx.start_until_started(&run).await;

    relay.signal("-TERM");
    let result = next_result(&mut results).await;
    assert!(result.is_error, "{result:?}\nlog:\n{}", relay.log());
    assert!(result.output.starts_with("started\ninterrupted after"), "{}", result.output);
    assert!(relay.exited().await.success(), "log:\n{}", relay.log());
}
