//! Just enough HTTP/1.1 for the scripted LLM: keep-alive, `Content-Length` and chunked request
//! bodies, chunked streaming responses.
//!
//! Hand-rolled instead of a framework because fault injection needs the raw socket: a hanging
//! reply must notice the client leaving (by reading EOF while it writes nothing), and a reset must
//! close the connection in the middle of a chunked body.

use std::io;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use reqwest::StatusCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

/// Larger request heads are refused; real clients send a few hundred bytes.
const MAX_HEAD_BYTES: usize = 64 * 1024;
/// Long benchmark conversations make big prompts; anything past this is a bug in the client.
const MAX_BODY_BYTES: usize = 256 * 1024 * 1024;

pub(crate) struct Request {
    pub method: String,
    /// Path without the query string.
    pub path: String,
    /// Names lower-cased, in arrival order.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub keep_alive: bool,
}

impl Request {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }
}

/// One client connection; requests are served one after another (no pipelining replies, but
/// pipelined bytes are kept for the next request).
pub(crate) struct Connection {
    rd: OwnedReadHalf,
    wr: OwnedWriteHalf,
    buf: BytesMut,
}

fn bad(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.to_string())
}

impl Connection {
    pub fn new(stream: TcpStream) -> Self {
        // Token-sized SSE writes must not wait for Nagle's algorithm.
        let _ = stream.set_nodelay(true);
        let (rd, wr) = stream.into_split();
        Connection { rd, wr, buf: BytesMut::with_capacity(16 * 1024) }
    }

    async fn fill(&mut self) -> io::Result<usize> {
        self.rd.read_buf(&mut self.buf).await
    }

    async fn fill_to(&mut self, n: usize) -> io::Result<()> {
        while self.buf.len() < n {
            if self.fill().await? == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        }
        Ok(())
    }

    async fn line(&mut self) -> io::Result<String> {
        let mut scanned = 0;
        loop {
            if let Some(pos) = self.buf[scanned..].windows(2).position(|w| w == b"\r\n") {
                let line = self.buf.split_to(scanned + pos + 2);
                return String::from_utf8(line[..line.len() - 2].to_vec()).map_err(|_| bad("non-UTF-8 line"));
            }
            scanned = self.buf.len().saturating_sub(1);
            if self.buf.len() > MAX_HEAD_BYTES {
                return Err(bad("line too long"));
            }
            if self.fill().await? == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        }
    }

    /// The next request, or `None` when the client closed the connection between requests.
    pub async fn read_request(&mut self) -> io::Result<Option<Request>> {
        let mut scanned = 0;
        let head_end = loop {
            if let Some(pos) = self.buf[scanned..].windows(4).position(|w| w == b"\r\n\r\n") {
                break scanned + pos;
            }
            scanned = self.buf.len().saturating_sub(3);
            if self.buf.len() > MAX_HEAD_BYTES {
                return Err(bad("request head too large"));
            }
            if self.fill().await? == 0 {
                return if self.buf.is_empty() { Ok(None) } else { Err(io::ErrorKind::UnexpectedEof.into()) };
            }
        };
        let head = self.buf.split_to(head_end + 4);
        let head = std::str::from_utf8(&head[..head_end]).map_err(|_| bad("non-UTF-8 request head"))?;
        let mut lines = head.split("\r\n");
        let mut request_line = lines.next().unwrap_or_default().split_whitespace();
        let (Some(method), Some(target), Some(version)) =
            (request_line.next(), request_line.next(), request_line.next())
        else {
            return Err(bad("malformed request line"));
        };
        let mut headers = Vec::new();
        for line in lines {
            let (name, value) = line.split_once(':').ok_or_else(|| bad("malformed header"))?;
            headers.push((name.trim().to_ascii_lowercase(), value.trim().to_string()));
        }
        let connection =
            headers.iter().find(|(n, _)| n == "connection").map(|(_, v)| v.to_ascii_lowercase()).unwrap_or_default();
        let keep_alive = match version {
            "HTTP/1.1" => !connection.contains("close"),
            _ => connection.contains("keep-alive"),
        };
        let mut req = Request {
            method: method.to_string(),
            path: target.split('?').next().unwrap_or_default().to_string(),
            headers,
            body: Vec::new(),
            keep_alive,
        };
        if req.header("expect").is_some_and(|v| v.eq_ignore_ascii_case("100-continue")) {
            self.wr.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").await?;
        }
        let chunked = req.header("transfer-encoding").is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
        if chunked {
            req.body = self.read_chunked_body().await?;
        } else if let Some(len) = req.header("content-length") {
            let len: usize = len.parse().map_err(|_| bad("bad content-length"))?;
            if len > MAX_BODY_BYTES {
                return Err(bad("body too large"));
            }
            self.fill_to(len).await?;
            req.body = self.buf.split_to(len).to_vec();
        }
        Ok(Some(req))
    }

    async fn read_chunked_body(&mut self) -> io::Result<Vec<u8>> {
        let mut body = Vec::new();
        loop {
            let size_line = self.line().await?;
            let size = size_line.split(';').next().unwrap_or_default().trim();
            let size = usize::from_str_radix(size, 16).map_err(|_| bad("bad chunk size"))?;
            if size == 0 {
                // Trailers, up to the empty line.
                while !self.line().await?.is_empty() {}
                return Ok(body);
            }
            if body.len() + size > MAX_BODY_BYTES {
                return Err(bad("body too large"));
            }
            self.fill_to(size + 2).await?;
            body.extend_from_slice(&self.buf[..size]);
            self.buf.advance(size + 2);
        }
    }

    /// Resolves when the client has gone (EOF or error on the read side). Bytes that arrive
    /// meanwhile are kept for the next request. Cancel-safe.
    pub async fn closed(&mut self) {
        loop {
            match self.rd.read_buf(&mut self.buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) if self.buf.len() > MAX_HEAD_BYTES + MAX_BODY_BYTES => return,
                Ok(_) => {}
            }
        }
    }

    /// Sleeps, unless the client leaves first; `false` means it left.
    pub async fn pause(&mut self, d: Duration) -> bool {
        if d.is_zero() {
            return true;
        }
        tokio::select! {
            _ = tokio::time::sleep(d) => true,
            _ = self.closed() => false,
        }
    }

    pub async fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.wr.write_all(bytes).await
    }
}

fn status_line(status: u16) -> String {
    let reason = StatusCode::from_u16(status).ok().and_then(|s| s.canonical_reason()).unwrap_or("Status");
    format!("HTTP/1.1 {status} {reason}\r\n")
}

fn connection_header(keep_alive: bool) -> &'static str {
    if keep_alive { "connection: keep-alive\r\n" } else { "connection: close\r\n" }
}

/// A complete response with a body of known length.
pub(crate) fn fixed_response(
    status: u16,
    content_type: &str,
    extra_headers: &[(String, String)],
    body: &[u8],
    keep_alive: bool,
) -> Vec<u8> {
    let mut head = status_line(status);
    head.push_str(&format!("content-type: {content_type}\r\ncontent-length: {}\r\n", body.len()));
    head.push_str(connection_header(keep_alive));
    for (name, value) in extra_headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    let mut out = head.into_bytes();
    out.extend_from_slice(body);
    out
}

/// The head of a chunked `text/event-stream` response.
pub(crate) fn stream_head(content_type: &str, extra_headers: &[(String, String)], keep_alive: bool) -> Vec<u8> {
    let mut head = status_line(200);
    head.push_str(&format!(
        "content-type: {content_type}\r\ncache-control: no-cache\r\ntransfer-encoding: chunked\r\n"
    ));
    head.push_str(connection_header(keep_alive));
    for (name, value) in extra_headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    head.into_bytes()
}

/// Appends one HTTP chunk holding `data`.
pub(crate) fn push_chunk(out: &mut Vec<u8>, data: &[u8]) {
    out.extend_from_slice(format!("{:x}\r\n", data.len()).as_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
}

/// The end of a chunked body.
pub(crate) const LAST_CHUNK: &[u8] = b"0\r\n\r\n";
