//! `agentplane serve` from a fresh directory with no configuration: it creates its SQLite
//! database under ./data, prints the admin token once, and answers /healthz and the API.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("free port")
}

fn start(dir: &std::path::Path, port: u16) -> (Server, Vec<String>) {
    start_with_env(dir, port, &[])
}

fn command(dir: &std::path::Path, port: u16, env: &[(&str, &str)]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_agentplane"));
    command
        .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .current_dir(dir)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(env.iter().copied());
    command
}

fn start_with_env(dir: &std::path::Path, port: u16, env: &[(&str, &str)]) -> (Server, Vec<String>) {
    let mut child =
        command(dir, port, env).stdout(Stdio::piped()).stderr(Stdio::null()).spawn().expect("agentplane starts");
    let stdout = child.stdout.take().expect("stdout");
    let server = Server(child);
    let mut lines = Vec::new();
    for line in BufReader::new(stdout).lines() {
        let line = line.expect("line");
        let listening = line.contains("listening on");
        lines.push(line);
        if listening {
            break;
        }
    }
    (server, lines)
}

fn get(port: u16, path: &str, token: Option<&str>) -> (u16, String) {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    let auth = token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
    write!(stream, "GET {path} HTTP/1.1\r\nHost: localhost\r\n{auth}Connection: close\r\n\r\n").expect("write");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("read");
    let status = response.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = response.split("\r\n\r\n").nth(1).unwrap_or_default().to_string();
    (status, body)
}

#[test]
fn serve_starts_on_the_embedded_default_with_no_configuration() {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let started = Instant::now();
    let (server, lines) = start(dir.path(), port);
    let token = lines
        .iter()
        .find_map(|l| l.split("Admin token (shown once): ").nth(1))
        .map(str::trim)
        .map(str::to_string)
        .unwrap_or_else(|| panic!("no admin token printed: {lines:?}"));
    assert!(token.starts_with("ap_") && token.len() > 40, "{token}");
    assert!(dir.path().join("data/agentplane.db").is_file(), "SQLite database created under ./data");

    let (status, body) = get(port, "/healthz", None);
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("ok"));
    let (status, body) = get(port, "/api/v1/templates", Some(&token));
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"local\""), "a local template is there out of the box: {body}");
    assert_eq!(get(port, "/api/v1/chats", None).0, 401);
    assert!(started.elapsed() < Duration::from_secs(60));

    // A second start on the same data keeps the admin and prints no new token.
    drop(server);
    let (_server, lines) = start(dir.path(), free_port());
    assert!(lines.iter().all(|l| !l.contains("Admin token")), "{lines:?}");
}

const ANTHROPIC_KEY: &str = "sk-ant-envkey-0123456789abcdef";
const OPENAI_KEY: &str = "sk-proj-envkey-fedcba9876543210";

fn admin_token(lines: &[String]) -> String {
    lines
        .iter()
        .find_map(|l| l.split("Admin token (shown once): ").nth(1))
        .map(|t| t.trim().to_string())
        .unwrap_or_else(|| panic!("no admin token printed: {lines:?}"))
}

/// Keys in the environment on first start become providers with a default model; the keys are
/// stored encrypted (not in the database file in any form we can grep), never returned; a
/// restart with another encryption key refuses to start and says why.
#[test]
fn first_start_takes_provider_keys_from_the_environment_and_stores_them_encrypted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let (server, lines) =
        start_with_env(dir.path(), port, &[("ANTHROPIC_API_KEY", ANTHROPIC_KEY), ("OPENAI_API_KEY", OPENAI_KEY)]);
    let token = admin_token(&lines);

    let (status, providers) = get(port, "/api/v1/providers", Some(&token));
    assert_eq!(status, 200, "{providers}");
    let providers: serde_json::Value = serde_json::from_str(&providers).expect("json");
    let mut types: Vec<&str> =
        providers.as_array().expect("test").iter().map(|p| p["type"].as_str().expect("test")).collect();
    types.sort();
    assert_eq!(types, ["anthropic", "openai"]);
    assert!(providers.as_array().expect("test").iter().all(|p| p["has_api_key"] == true && p.get("api_key").is_none()));
    let (_, models) = get(port, "/api/v1/models", Some(&token));
    let models: serde_json::Value = serde_json::from_str(&models).expect("json");
    let defaults: Vec<&str> = models
        .as_array()
        .expect("test")
        .iter()
        .filter(|m| m["is_default"] == true)
        .map(|m| m["model"].as_str().expect("test"))
        .collect();
    assert_eq!(defaults, ["claude-sonnet-4-5"], "{models}");
    drop(server);

    let key_file = dir.path().join("data/secret.key");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&key_file).expect("key file").permissions().mode() & 0o777, 0o600);
    for file in std::fs::read_dir(dir.path().join("data")).expect("test") {
        let bytes = std::fs::read(file.expect("test").path()).unwrap_or_default();
        for key in [ANTHROPIC_KEY, OPENAI_KEY] {
            assert!(!contains(&bytes, key.as_bytes()), "{key} found in plaintext");
        }
    }

    // Another key: the server does not start and names the problem.
    let wrong = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";
    let output = command(dir.path(), free_port(), &[("AGENTPLANE_SECRET_KEY", wrong)])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .expect("runs");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("encrypted with another key"), "{stderr}");
    assert!(!stderr.contains(ANTHROPIC_KEY) && !stderr.contains(OPENAI_KEY));
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}
