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
    let mut child = Command::new(env!("CARGO_BIN_EXE_agentplane"))
        .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .current_dir(dir)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("agentplane starts");
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
