//! The soak's load generator: one request per connection, the closed-loop capacity
//! measurement and the open-loop soak (with the adversarial mode's attacks mixed in).

use super::adversarial::{self, Kind};
use super::Settings;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// One request on its own connection (HTTP/1.1, `Connection: close`), within `timeout`:
/// `(status, body)`, or the kind of failure.
pub async fn send(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: &[u8],
    timeout: Duration,
) -> Result<(u16, Vec<u8>), String> {
    let exchange = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.map_err(|e| format!("connect: {:?}", e.kind()))?;
        let mut msg = format!(
            "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .into_bytes();
        msg.extend_from_slice(body);
        s.write_all(&msg).await.map_err(|e| format!("write: {:?}", e.kind()))?;
        let mut raw = Vec::with_capacity(1024);
        s.read_to_end(&mut raw).await.map_err(|e| format!("read: {:?}", e.kind()))?;
        let head = String::from_utf8_lossy(&raw[..raw.len().min(32)]).into_owned();
        let status: u16 = head
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| "not an HTTP response".to_string())?;
        let body = match raw.windows(4).position(|w| w == b"\r\n\r\n") {
            Some(i) => raw[i + 4..].to_vec(),
            None => Vec::new(),
        };
        Ok::<_, String>((status, body))
    };
    tokio::time::timeout(timeout, exchange).await.map_err(|_| "client timeout".to_string())?
}

/// A Prometheus gauge or counter without labels.
pub fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[derive(Default)]
pub struct Tally {
    pub status: BTreeMap<u16, u64>,
    pub errors: BTreeMap<String, u64>,
    /// Seconds, of 200 answers.
    pub latency: Vec<f64>,
    /// Seconds, of 429 answers.
    pub latency_429: Vec<f64>,
    /// Adversarial arrivals (attacks, churn): how each kind ended (a status, `closed`, or an
    /// error).
    pub attacks: BTreeMap<(Kind, String), u64>,
    /// Seconds, of the adversarial arrivals answered with a status, by kind.
    pub attack_latency: BTreeMap<Kind, Vec<f64>>,
}

pub struct Soak {
    pub offered: f64,
    pub sent: u64,
    pub skipped: u64,
    pub send_secs: f64,
    pub total_secs: f64,
    pub unfinished: usize,
    pub tally: Tally,
    pub max_depth: Option<f64>,
    /// Largest `softprompt_prompt_kv_bytes` seen by the `/metrics` sampler.
    pub max_kv_bytes: Option<f64>,
}

/// Closed loop: `clients` clients back to back for `secs`; 200 answers per second.
pub fn capacity(rt: &tokio::runtime::Runtime, addr: SocketAddr, bodies: &Arc<Vec<Vec<u8>>>, s: &Settings) -> (f64, u64) {
    rt.block_on(async {
        let start = Instant::now();
        let deadline = start + s.capacity;
        let mut set = tokio::task::JoinSet::new();
        for c in 0..s.clients {
            let bodies = bodies.clone();
            let timeout = s.timeout + Duration::from_secs(10);
            set.spawn(async move {
                let (mut ok, mut other, mut i) = (0u64, 0u64, c);
                while Instant::now() < deadline {
                    match send(addr, "POST", "/v1/classify", &bodies[i % bodies.len()], timeout).await {
                        Ok((200, _)) => ok += 1,
                        _ => other += 1,
                    }
                    i += 1;
                }
                (ok, other)
            });
        }
        let (mut ok, mut other) = (0, 0);
        while let Some(r) = set.join_next().await {
            let (o, x) = r.expect("client task");
            ok += o;
            other += x;
        }
        (ok as f64 / start.elapsed().as_secs_f64(), other)
    })
}

/// How long an attack may take to be answered or dropped (the adversarial server's header
/// and body timeouts are 2 s).
const ATTACK_PATIENCE: Duration = Duration::from_secs(10);

/// Open loop at `rate` requests/s for `s.soak`, then waits for the requests in flight.
/// With `attacks` (the adversarial mode), 4 arrivals in 10 are attacks and 2 task churn
/// ([`Kind::of`]).
pub fn soak(
    rt: &tokio::runtime::Runtime,
    addr: SocketAddr,
    bodies: &Arc<Vec<Vec<u8>>>,
    attacks: Option<Arc<adversarial::Attacks>>,
    rate: f64,
    s: &Settings,
) -> Soak {
    rt.block_on(async {
        let tally = Arc::new(Mutex::new(Tally::default()));
        let inflight = Arc::new(AtomicUsize::new(0));
        let timeout = s.timeout + Duration::from_secs(10);
        // Queue depth and cached prompt-KV bytes from /metrics every 250 ms.
        let stop = Arc::new(AtomicBool::new(false));
        let sampler = {
            let stop = stop.clone();
            tokio::spawn(async move {
                let (mut depth, mut kv): (Option<f64>, Option<f64>) = (None, None);
                let larger = |m: Option<f64>, x: Option<f64>| match (m, x) {
                    (Some(m), Some(x)) => Some(m.max(x)),
                    (m, x) => m.or(x),
                };
                while !stop.load(Ordering::Relaxed) {
                    if let Ok((200, text)) = send(addr, "GET", "/metrics", b"", Duration::from_secs(5)).await {
                        let text = String::from_utf8_lossy(&text);
                        depth = larger(depth, metric(&text, "softprompt_queue_depth"));
                        kv = larger(kv, metric(&text, "softprompt_prompt_kv_bytes"));
                    }
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                (depth, kv)
            })
        };
        let start = Instant::now();
        let end = start + s.soak;
        let (mut sent, mut skipped, mut i) = (0u64, 0u64, 0u64);
        loop {
            let due = start + Duration::from_secs_f64(i as f64 / rate);
            if due >= end {
                break;
            }
            if due > Instant::now() {
                tokio::time::sleep_until(due.into()).await;
            }
            let body = i as usize % bodies.len();
            let kind = Kind::of(i, attacks.is_some());
            let churn = adversarial::churn_task(i, kind);
            let upload = (i / 10) as usize % adversarial::CHURN_PROMPT_ROWS.len();
            i += 1;
            if inflight.load(Ordering::Relaxed) >= s.max_inflight {
                skipped += 1;
                continue;
            }
            sent += 1;
            inflight.fetch_add(1, Ordering::Relaxed);
            let (tally, inflight, bodies, attacks) = (tally.clone(), inflight.clone(), bodies.clone(), attacks.clone());
            tokio::spawn(async move {
                if let (Some(a), false) = (&attacks, kind == Kind::Normal) {
                    let t0 = Instant::now();
                    let task = format!("/v1/tasks/churn{churn}");
                    let outcome = match kind {
                        Kind::TooManyChars => send(addr, "POST", "/v1/classify", &a.too_many_chars, ATTACK_PATIENCE).await,
                        Kind::TooManyTokens => send(addr, "POST", "/v1/classify", &a.too_many_tokens, ATTACK_PATIENCE).await,
                        // Churn waits like a normal request (uploads queue for the store's write lock).
                        Kind::Upload => send(addr, "PUT", &task, &a.uploads[upload], timeout).await,
                        Kind::Delete => send(addr, "DELETE", &task, b"", timeout).await,
                        Kind::ChurnClassify => send(addr, "POST", "/v1/classify", &a.churn_classify[churn], timeout).await,
                        _ => adversarial::slow_client(addr, kind, ATTACK_PATIENCE).await.map(|o| (0, o.into_bytes())),
                    };
                    let secs = t0.elapsed().as_secs_f64();
                    let mut t = tally.lock().unwrap_or_else(|e| e.into_inner());
                    let outcome = match outcome {
                        Ok((0, closed)) => String::from_utf8_lossy(&closed).into_owned(),
                        Ok((status, _)) => {
                            t.attack_latency.entry(kind).or_default().push(secs);
                            status.to_string()
                        }
                        Err(e) => e,
                    };
                    *t.attacks.entry((kind, outcome)).or_default() += 1;
                    drop(t);
                    inflight.fetch_sub(1, Ordering::Relaxed);
                    return;
                }
                let t0 = Instant::now();
                let r = send(addr, "POST", "/v1/classify", &bodies[body], timeout).await;
                let secs = t0.elapsed().as_secs_f64();
                {
                    let mut t = tally.lock().unwrap_or_else(|e| e.into_inner());
                    match r {
                        Ok((status, _)) => {
                            *t.status.entry(status).or_default() += 1;
                            if status == 200 {
                                t.latency.push(secs);
                            } else if status == 429 {
                                t.latency_429.push(secs);
                            }
                        }
                        Err(e) => *t.errors.entry(e).or_default() += 1,
                    }
                }
                inflight.fetch_sub(1, Ordering::Relaxed);
            });
        }
        let send_secs = start.elapsed().as_secs_f64();
        let drain_until = Instant::now() + timeout + Duration::from_secs(5);
        while inflight.load(Ordering::Relaxed) > 0 && Instant::now() < drain_until {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let total_secs = start.elapsed().as_secs_f64();
        stop.store(true, Ordering::Relaxed);
        let (max_depth, max_kv_bytes) = sampler.await.unwrap_or((None, None));
        let tally = std::mem::take(&mut *tally.lock().unwrap_or_else(|e| e.into_inner()));
        Soak {
            offered: rate,
            sent,
            skipped,
            send_secs,
            total_secs,
            unfinished: inflight.load(Ordering::Relaxed),
            tally,
            max_depth,
            max_kv_bytes,
        }
    })
}
