//! A raw HTTP/1.1 client over a socket, for what a polite client library never does: stall
//! mid-header, trickle a body, hold connections open, read a stream in pieces.

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use serde_json::Value;

pub fn connect(addr: &str) -> TcpStream {
    let s = TcpStream::connect(addr).expect("connecting to the server");
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s
}

pub fn send(s: &mut TcpStream, bytes: &str) {
    s.write_all(bytes.as_bytes())
        .expect("writing to the server");
}

/// A request with `Connection: close`, and everything the server answers until it closes.
pub fn request(addr: &str, method: &str, path: &str, body: Option<&Value>) -> Response {
    let mut s = connect(addr);
    send(&mut s, &request_text(method, path, body, false));
    read_until_closed(&mut s)
}

pub fn request_text(method: &str, path: &str, body: Option<&Value>, keep_alive: bool) -> String {
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    format!(
        "{method} {path} HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: {}\r\n\r\n{body}",
        body.len(),
        if keep_alive { "keep-alive" } else { "close" }
    )
}

#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub head: String,
    /// De-chunked.
    pub body: String,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<String> {
        self.head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_string())
        })
    }

    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body))
    }

    /// The `data:` payloads of a server-sent event stream.
    pub fn events(&self) -> Vec<String> {
        self.body
            .lines()
            .filter_map(|l| l.strip_prefix("data: ").map(str::to_string))
            .collect()
    }
}

/// Reads until the server closes the connection (a reset counts as closed).
pub fn read_until_closed(s: &mut TcpStream) -> Response {
    parse(&read_until_closed_raw(s))
}

/// Reads one response on a kept-alive connection (its body sized by Content-Length).
pub fn read_one(s: &mut TcpStream) -> Response {
    let mut raw = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        let text = String::from_utf8_lossy(&raw).to_string();
        if let Some(end) = text.find("\r\n\r\n") {
            let r = parse(&raw[..end + 4]);
            let len: usize = r
                .header("content-length")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            if raw.len() >= end + 4 + len {
                return parse(&raw[..end + 4 + len]);
            }
        }
        let n = s.read(&mut buf).expect("reading a response");
        assert!(n > 0, "the server closed the connection mid-response");
        raw.extend_from_slice(&buf[..n]);
    }
}

/// Reads until `needle` has arrived; returns what came so far.
pub fn read_until(s: &mut TcpStream, needle: &str) -> Vec<u8> {
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&raw).contains(needle) {
        let n = s.read(&mut buf).expect("reading");
        assert!(
            n > 0,
            "closed before {needle:?}: {:?}",
            String::from_utf8_lossy(&raw)
        );
        raw.extend_from_slice(&buf[..n]);
    }
    raw
}

/// How long until the server closes the connection, and what it sent before (None: still
/// open after `limit`).
pub fn time_to_close(s: &mut TcpStream, limit: Duration) -> Option<(Duration, Vec<u8>)> {
    let t0 = Instant::now();
    s.set_read_timeout(Some(limit)).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return Some((t0.elapsed(), got)),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return Some((t0.elapsed(), got)),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return None
            }
            Err(e) => panic!("reading: {e}"),
        }
    }
}

pub fn parse(raw: &[u8]) -> Response {
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| {
            panic!(
                "no complete response head in {:?}",
                String::from_utf8_lossy(raw)
            )
        });
    let head = String::from_utf8_lossy(&raw[..end]).to_string();
    let body = &raw[end + 4..];
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {head:?}"));
    let mut r = Response {
        status,
        head,
        body: String::new(),
    };
    let chunked = r
        .header("transfer-encoding")
        .is_some_and(|v| v.eq_ignore_ascii_case("chunked"));
    r.body = if chunked {
        String::from_utf8_lossy(&dechunk(body)).to_string()
    } else {
        String::from_utf8_lossy(body).to_string()
    };
    r
}

fn dechunk(mut s: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(line_end) = s.windows(2).position(|w| w == b"\r\n") {
        let size = String::from_utf8_lossy(&s[..line_end]).to_string();
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        let rest = &s[line_end + 2..];
        if n == 0 || rest.len() < n {
            break;
        }
        out.extend_from_slice(&rest[..n]);
        s = rest[n..].strip_prefix(b"\r\n").unwrap_or(&rest[n..]);
    }
    out
}

/// The raw bytes until the server closes the connection (a test failure after 30 s: a stream
/// that never ends keeps sending, so the socket's read timeout alone would not catch it).
pub fn read_until_closed_raw(s: &mut TcpStream) -> Vec<u8> {
    let mut raw = Vec::new();
    let mut buf = [0u8; 8192];
    let t0 = Instant::now();
    loop {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "the server never closed the connection"
        );
        match s.read(&mut buf) {
            Ok(0) => return raw,
            Ok(n) => raw.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return raw,
            Err(e) => panic!("reading: {e}"),
        }
    }
}
