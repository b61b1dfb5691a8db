//! The soak's adversarial mode (`--adversarial`): attacks mixed into the open-loop load.
//!
//! Of every ten arrivals, six are ordinary classifications and four are attacks, one of each:
//! an input over `--max-input-chars` (one 40,000-character word), an input over
//! `--max-input-tokens` (3,000 words, under the character limit), a slow head (half a
//! request head, then silence) and a slow body (the head and 10 of 100 body bytes, then
//! silence). Each attack must end with the answer the server gives it (413; the slow ones
//! closed, 408, or 503 at the connection cap) within `patience`; anything else fails the
//! soak.

use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    Normal,
    TooManyChars,
    TooManyTokens,
    SlowHead,
    SlowBody,
}

impl Kind {
    /// The kind of arrival `i` (all normal without the adversarial mode).
    pub fn of(i: u64, adversarial: bool) -> Kind {
        match (adversarial, i % 10) {
            (true, 1) => Kind::TooManyChars,
            (true, 3) => Kind::TooManyTokens,
            (true, 6) => Kind::SlowHead,
            (true, 8) => Kind::SlowBody,
            _ => Kind::Normal,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Kind::Normal => "normal",
            Kind::TooManyChars => "input over --max-input-chars",
            Kind::TooManyTokens => "input over --max-input-tokens",
            Kind::SlowHead => "slow head",
            Kind::SlowBody => "slow body",
        }
    }

    /// Whether `outcome` (a status, or `closed`: the server closed without an answer) is
    /// what the server should answer this kind with. Normal requests may also be refused
    /// for load (429 queue, 503 connection cap or shutdown, 504 timeout).
    pub fn acceptable(self, outcome: &str) -> bool {
        let allowed: &[&str] = match self {
            Kind::Normal => &["200", "429", "503", "504"],
            Kind::TooManyChars | Kind::TooManyTokens => &["413", "503"],
            Kind::SlowHead => &["closed", "408", "503"],
            Kind::SlowBody => &["408", "503", "closed"],
        };
        allowed.contains(&outcome)
    }
}

/// Bodies of the oversized attacks: (over the characters, over the tokens).
pub fn oversized_bodies(task: &str, word: &str) -> (Vec<u8>, Vec<u8>) {
    let chars = serde_json::json!({"task": task, "input": "x".repeat(40_000)});
    let tokens = serde_json::json!({"task": task, "input": vec![word; 3000].join(" ")});
    (chars.to_string().into_bytes(), tokens.to_string().into_bytes())
}

/// A slow client (`SlowHead` or `SlowBody`): sends part of a request, then waits for the
/// server to answer or close, at most `patience`. Returns the status, `closed`, or an error
/// (`not dropped` when the server kept the connection open that long).
pub async fn slow_client(addr: SocketAddr, kind: Kind, patience: Duration) -> Result<String, String> {
    let start = Instant::now();
    let mut s = tokio::net::TcpStream::connect(addr).await.map_err(|e| format!("connect: {:?}", e.kind()))?;
    let part = match kind {
        Kind::SlowBody => format!(
            "POST /v1/classify HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"task\": \""
        ),
        _ => format!("POST /v1/classify HTTP/1.1\r\nHost: {addr}\r\nContent-"),
    };
    // The server may already have refused the connection (503) and closed it.
    let _ = s.write_all(part.as_bytes()).await;
    let mut got = Vec::new();
    let read = tokio::time::timeout(patience.saturating_sub(start.elapsed()), s.read_to_end(&mut got)).await;
    match read {
        Err(_) => Err("not dropped".to_string()),
        Ok(_) if got.is_empty() => Ok("closed".to_string()),
        Ok(_) => Ok(String::from_utf8_lossy(&got).split_whitespace().nth(1).unwrap_or("garbled").to_string()),
    }
}
