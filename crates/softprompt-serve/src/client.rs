//! A minimal blocking HTTP/1.1 client (one request per connection), for the tests and the
//! load generator: no TLS, no dependencies.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// Sends one request and returns `(status, body)`; `Err` when the connection fails or the
/// answer is not HTTP.
pub fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
    token: Option<&str>,
) -> std::io::Result<(u16, String)> {
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    if let Some(t) = token {
        head.push_str(&format!("Authorization: Bearer {t}\r\n"));
    }
    let body = body.unwrap_or(b"");
    head.push_str(&format!("Content-Type: application/json\r\nContent-Length: {}\r\n\r\n", body.len()));
    let mut raw = head.into_bytes();
    raw.extend_from_slice(body);
    exchange(addr, &raw)
}

/// Sends `request` (raw bytes: head and body, which should ask for `Connection: close`) on a
/// new connection and reads the answer until the server closes: `(status, body)`.
pub fn exchange(addr: SocketAddr, request: &[u8]) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(300)))?;
    // The server may answer (413) and close before reading a large body: ignore write errors.
    let _ = s.write_all(request);
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    let text = String::from_utf8_lossy(&raw).into_owned();
    let bad = || std::io::Error::new(std::io::ErrorKind::InvalidData, format!("not an HTTP response: {text:?}"));
    let (headers, rest) = text.split_once("\r\n\r\n").ok_or_else(bad)?;
    let status: u16 = headers.split_whitespace().nth(1).and_then(|s| s.parse().ok()).ok_or_else(bad)?;
    let chunked = headers.to_ascii_lowercase().contains("transfer-encoding: chunked");
    let body = if chunked { dechunk(rest) } else { rest.to_string() };
    Ok((status, body))
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].strip_prefix("\r\n").unwrap_or(&rest[n..]);
    }
    out
}

/// POSTs JSON and parses the JSON answer.
pub fn post_json(addr: SocketAddr, path: &str, body: &serde_json::Value) -> std::io::Result<(u16, serde_json::Value)> {
    let (status, text) = request(addr, "POST", path, Some(body.to_string().as_bytes()), None)?;
    let v = serde_json::from_str(&text)
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidData, format!("not JSON: {text}")))?;
    Ok((status, v))
}
