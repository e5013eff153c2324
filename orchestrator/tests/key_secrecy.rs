//! A provider's API key goes to the provider and nowhere else: not into the database file, the
//! logs (at `trace`), any API response or event, the NATS traffic to relays, or a workspace's
//! environment. Runs the real `agentplane` binary with relays over a real nats-server.

use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agentplane_schema::api::{ChatStatus, CreateChat, CreateModel, CreateProvider, ProviderType};
use agentplane_schema::message::Part;
use agentplane_tests::{ApiClient, EventStream, NatsServer, RecordedRequest, Reply, ScriptedLlm};
use futures::StreamExt;
use serde_json::json;

const KEY: &str = "sk-secret-Zq8wX3vN5tY7uB2mK9pL4rJ6";
const TOKEN: &str = "ap_key_secrecy_admin_token";
const WAIT: Duration = Duration::from_secs(60);

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle.as_bytes())
}

/// The workspace runs `env`, so a key leaked into its environment would come back as a tool
/// result (and be caught there and in the NATS traffic).
fn responder(r: &RecordedRequest) -> Reply {
    match r.tool_results().len() {
        0 => Reply::tool_call("create_workspace", json!({"template_id": "local"})),
        1 => Reply::tool_call("execute", json!({"command": "env; echo done"})),
        _ => Reply::text("finished"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_key_reaches_the_provider_and_nothing_else() {
    let nats = NatsServer::start();
    let llm = ScriptedLlm::with_responder(responder);
    let dir = tempfile::tempdir().expect("tempdir");
    let port = std::net::TcpListener::bind("127.0.0.1:0").expect("test setup").local_addr().expect("test setup").port();
    let exe = std::path::PathBuf::from(env!("CARGO_BIN_EXE_agentplane"));
    let relay = exe.with_file_name("agentplane-relay");
    assert!(relay.is_file(), "{} is missing: build the workspace first", relay.display());
    let log_path = dir.path().join("server.log");
    let log = std::fs::File::create(&log_path).expect("log file");

    // Everything a relay or workspace sees travels over NATS: record all of it.
    let client = async_nats::connect(nats.url()).await.expect("nats");
    let mut all = client.subscribe(">").await.expect("subscribe");
    let traffic = Arc::new(Mutex::new(Vec::<u8>::new()));
    let sink = traffic.clone();
    tokio::spawn(async move {
        while let Some(m) = all.next().await {
            let mut sink = sink.lock().expect("test setup");
            sink.extend_from_slice(m.subject.as_bytes());
            for (name, values) in m.headers.iter().flat_map(|h| h.iter()) {
                sink.extend_from_slice(name.to_string().as_bytes());
                for v in values {
                    sink.extend_from_slice(v.as_str().as_bytes());
                }
            }
            sink.extend_from_slice(&m.payload);
        }
    });
    client.flush().await.expect("flush");

    let server = Server(
        Command::new(&exe)
            .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
            .current_dir(dir.path())
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("AGENTPLANE_BOOTSTRAP_TOKEN", TOKEN)
            .env("AGENTPLANE__SERVER__LOG_FILTER", "trace")
            .env("AGENTPLANE__NATS__URL", nats.url())
            .env("AGENTPLANE__NATS__RELAY_BINARY", &relay)
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .expect("agentplane starts"),
    );
    let base = format!("http://127.0.0.1:{port}");
    let admin = ApiClient::new(&base, TOKEN);
    let started = std::time::Instant::now();
    while !admin.healthz().await {
        assert!(started.elapsed() < WAIT, "the server did not come up; log: {}", log_path.display());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let mut responses = Vec::<u8>::new();
    let provider = admin
        .create_provider(&CreateProvider {
            provider_type: ProviderType::OpenaiCompatible,
            name: "secret-holder".into(),
            base_url: llm.base_url(),
            api_key: Some(KEY.into()),
            settings: json!({}),
        })
        .await
        .expect("provider");
    responses.extend(serde_json::to_vec(&provider).expect("test setup"));
    let model = admin
        .create_model(&CreateModel {
            provider_id: provider.id.clone(),
            model: "m".into(),
            display_name: None,
            context_window: 100_000,
            max_output_tokens: None,
            vision: false,
            enabled: true,
            is_default: true,
            compaction_threshold: None,
            prices: Default::default(),
            settings: json!({}),
        })
        .await
        .expect("model");
    responses.extend(serde_json::to_vec(&model).expect("test setup"));
    let chat = admin
        .create_chat(&CreateChat {
            content: vec![Part::text("look around")],
            model_id: None,
            workspace_id: None,
            title: None,
        })
        .await
        .expect("chat");
    let mut stream = EventStream::connect(&base, &chat.id, TOKEN, Some(0)).await.expect("ws");
    let events = stream.wait_for_status(ChatStatus::Idle, WAIT).await.expect("turn ends");
    for e in &events {
        responses.extend(serde_json::to_vec(e).expect("test setup"));
    }
    let messages = admin.messages(&chat.id).await.expect("messages");
    assert_eq!(messages.messages.last().expect("answer").text(), "finished");
    responses.extend(serde_json::to_vec(&messages).expect("test setup"));
    responses.extend(serde_json::to_vec(&admin.list_providers().await.expect("test setup")).expect("test setup"));
    responses.extend(serde_json::to_vec(&admin.get_chat(&chat.id).await.expect("test setup")).expect("test setup"));
    for path in ["/api/v1/workspaces", "/api/v1/models", "/api/v1/chats"] {
        let (_, body) = admin.raw(reqwest::Method::GET, path, None).await.expect("test setup");
        responses.extend(body.to_string().into_bytes());
    }

    // The key did its job: the provider received it.
    let requests = llm.requests();
    // Three steps, and the title call.
    assert!(requests.len() >= 3, "{} requests", requests.len());
    assert!(requests.iter().all(|r| r.header("authorization") == Some(&format!("Bearer {KEY}"))));
    // The tool ran over NATS and its output (the workspace's environment) came back through it.
    let traffic = traffic.lock().expect("test setup").clone();
    assert!(contains(&traffic, "PATH="), "the execute output crossed NATS");
    assert!(contains(&responses, "PATH="), "the env output is in the API answers");

    assert!(!contains(&traffic, KEY), "the key crossed NATS");
    assert!(!contains(&responses, KEY), "the key is in an API response or event");
    let log = std::fs::read(&log_path).expect("log");
    assert!(log.len() > 10_000, "trace logging was on ({} bytes)", log.len());
    assert!(!contains(&log, KEY), "the key is in the log");
    for file in std::fs::read_dir(dir.path().join("data")).expect("data dir") {
        let path = file.expect("test setup").path();
        if path.is_file() {
            assert!(!contains(&std::fs::read(&path).expect("test setup"), KEY), "the key is in {}", path.display());
        }
    }

    // Killed outright, the server leaves no relay behind: a relay stops once its parent's end of
    // its standard input is closed.
    let relays = children_of(server.0.id());
    assert!(!relays.is_empty(), "the workspace's relay runs as the server's child");
    drop(server);
    for pid in relays {
        let started = std::time::Instant::now();
        while running(pid) {
            assert!(started.elapsed() < WAIT, "relay {pid} outlived the server");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// The processes `pid` started that are still its children.
fn children_of(pid: u32) -> Vec<u32> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).expect("the server's tasks");
    tasks
        .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("children")).ok())
        .flat_map(|children| children.split_whitespace().filter_map(|c| c.parse().ok()).collect::<Vec<u32>>())
        .collect()
}

/// Whether process `pid` exists and has not exited (an exited one no one reaped is a zombie).
fn running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| stat.rsplit_once(')').map(|(_, rest)| rest.trim_start().starts_with('Z')))
        .is_some_and(|zombie| !zombie)
}
