//! The soak's adversarial mode (`--adversarial`): attacks and task churn mixed into the
//! open-loop load.
//!
//! Of every ten arrivals, four are ordinary classifications, four are attacks, one of each:
//! an input over `--max-input-chars` (one 40,000-character word), an input over
//! `--max-input-tokens` (3,000 words, under the character limit), a slow head (half a
//! request head, then silence) and a slow body (the head and 10 of 100 body bytes, then
//! silence); and two are task churn: a `PUT` or `DELETE` of one of [`CHURN_TASKS`] churn
//! tasks (two uploads, new or replacing, for every deletion; prompts of 4 to 16 rows), and a
//! classification on a churn task (answered, or 404 when it is deleted at that moment). With a
//! small `--kv-cache-bytes` the churn and the stable tasks evict each other's prompt
//! keys/values all the time. Each arrival must end with an answer its kind allows
//! ([`Kind::acceptable`]) within its patience; anything else fails the soak.

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
    /// `PUT /v1/tasks/churn{k}`: a new task, or a replacement.
    Upload,
    /// `DELETE /v1/tasks/churn{k}`.
    Delete,
    /// `POST /v1/classify` on a churn task.
    ChurnClassify,
}

/// Names of the churn tasks: `churn0` ... `churn4`.
pub const CHURN_TASKS: usize = 5;

/// Prompt rows of the uploads, in turn.
pub const CHURN_PROMPT_ROWS: [usize; 4] = [4, 8, 12, 16];

impl Kind {
    /// Every kind other than `Normal`, in report order.
    pub const ADVERSARIAL: [Kind; 7] =
        [Kind::TooManyChars, Kind::TooManyTokens, Kind::SlowHead, Kind::SlowBody, Kind::Upload, Kind::Delete, Kind::ChurnClassify];

    /// The kind of arrival `i` (all normal without the adversarial mode).
    pub fn of(i: u64, adversarial: bool) -> Kind {
        match (adversarial, i % 10) {
            (true, 1) => Kind::TooManyChars,
            (true, 3) => Kind::TooManyTokens,
            (true, 4) if (i / 10) % 3 == 2 => Kind::Delete,
            (true, 4) => Kind::Upload,
            (true, 6) => Kind::SlowHead,
            (true, 8) => Kind::SlowBody,
            (true, 9) => Kind::ChurnClassify,
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
            Kind::Upload => "churn: PUT of a task",
            Kind::Delete => "churn: DELETE of a task",
            Kind::ChurnClassify => "churn: classify on a churn task",
        }
    }

    /// Whether `outcome` (a status, or `closed`: the server closed without an answer) is
    /// what the server should answer this kind with. Requests may also be refused for load
    /// (429 queue, 503 connection cap or shutdown, 504 timeout).
    pub fn acceptable(self, outcome: &str) -> bool {
        let allowed: &[&str] = match self {
            Kind::Normal => &["200", "429", "503", "504"],
            Kind::TooManyChars | Kind::TooManyTokens => &["413", "503"],
            Kind::SlowHead => &["closed", "408", "503"],
            Kind::SlowBody => &["408", "503", "closed"],
            // 201 created, 200 replaced.
            Kind::Upload => &["200", "201", "503"],
            Kind::Delete => &["200", "404", "503"],
            Kind::ChurnClassify => &["200", "404", "429", "503", "504"],
        };
        allowed.contains(&outcome)
    }
}

/// The churn task arrival `i` (an upload, deletion or classification) acts on: the uploads
/// and deletions walk the tasks in a different order from the classifications.
pub fn churn_task(i: u64, kind: Kind) -> usize {
    let round = i / 10;
    let k = if kind == Kind::ChurnClassify { round * 3 + 1 } else { round * 2 };
    (k % CHURN_TASKS as u64) as usize
}

/// What the adversarial arrivals send.
pub struct Attacks {
    /// An input over the character limit.
    pub too_many_chars: Vec<u8>,
    /// An input over the token limit.
    pub too_many_tokens: Vec<u8>,
    /// `PUT` bodies, one per [`CHURN_PROMPT_ROWS`] entry: random prompt rows and a task.json.
    pub uploads: Vec<Vec<u8>>,
    /// A classification body per churn task.
    pub churn_classify: Vec<Vec<u8>>,
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
