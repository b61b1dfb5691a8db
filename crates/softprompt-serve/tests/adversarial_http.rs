//! The server's HTTP boundary under attack, over real HTTP on 127.0.0.1 (ephemeral ports):
//! one test per attack, each answered with a status instead of work, a hang or a crash
//! (docs/reliability.md, "HTTP boundary", lists them with the answers).
//!
//! Models: the tiny Llama and T5 fixtures (T5: no position limit) with a word-level tokenizer
//! (`w{i}` is token `i`); SmolLM2-135M where the model's speed matters (cancelling a
//! classification batch whose clients left).

mod common;
use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};
use softprompt::load::{load_model, Model};
use softprompt_serve::client::exchange;
use softprompt_serve::registry::{write_task_folder, TaskMeta};
use softprompt_serve::{ServeConfig, Server};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../softprompt/tests/fixtures").join(name)
}

/// The fixture model `name` (`llama-tiny` or `t5-tiny`) with a word-level tokenizer, loaded
/// once per test binary.
fn word_model(name: &'static str) -> Arc<Model> {
    static LLAMA: OnceLock<Arc<Model>> = OnceLock::new();
    static T5: OnceLock<Arc<Model>> = OnceLock::new();
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    let t5 = name == "t5-tiny";
    let cell = if t5 { &T5 } else { &LLAMA };
    cell.get_or_init(|| {
        let dir = DIR.get_or_init(|| tempfile::tempdir().unwrap()).path().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        for f in ["config.json", "generation_config.json", "model.safetensors"] {
            std::fs::copy(fixture(name).join(f), dir.join(f)).unwrap();
        }
        let specials: Vec<(u32, &str)> =
            if t5 { vec![(2, "<unk>"), (0, "<pad>"), (1, "</s>")] } else { vec![(0, "<unk>"), (1, "<s>"), (2, "</s>")] };
        std::fs::write(dir.join("tokenizer.json"), common::word_level::word_level_json(&specials, 256)).unwrap();
        Arc::new(load_model(&dir, &Device::Cpu).unwrap())
    })
    .clone()
}

fn random_prompt(model: &Model, n: usize, seed: u64) -> Tensor {
    let d = model.backbone.info().d_model;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let v: Vec<f32> = (0..n * d).map(|_| rng.random_range(-0.5f32..0.5)).collect();
    Tensor::from_vec(v, (n, d), &Device::Cpu).unwrap()
}

fn meta(labels: &[&str], verbalizer: &[&str]) -> TaskMeta {
    TaskMeta {
        labels: labels.iter().map(|s| s.to_string()).collect(),
        verbalizer: verbalizer.iter().map(|s| s.to_string()).collect(),
        ..TaskMeta::default()
    }
}

/// A prompts folder with task `t`: one prompt of 4 rows, the given labels and verbalizer.
fn one_task(model: &Model, labels: &[&str], verbalizer: &[&str]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    write_task_folder(&dir.path().join("t"), &[random_prompt(model, 4, 1)], model, Some(&meta(labels, verbalizer))).unwrap();
    dir
}

fn config(dir: &Path) -> ServeConfig {
    let mut cfg = ServeConfig::new(dir);
    cfg.addr = "127.0.0.1:0".parse().unwrap();
    cfg
}

/// One request with the given extra header lines (`Host` and `Content-Type` are only sent
/// when given there).
fn raw(addr: SocketAddr, method: &str, path: &str, headers: &[String], body: &str) -> (u16, serde_json::Value) {
    let mut req = format!("{method} {path} HTTP/1.1\r\nConnection: close\r\nContent-Length: {}\r\n", body.len());
    for h in headers {
        req.push_str(h);
        req.push_str("\r\n");
    }
    req.push_str("\r\n");
    req.push_str(body);
    let (status, text) = exchange(addr, req.as_bytes()).expect("HTTP exchange");
    (status, serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON ({status}): {text}")))
}

fn host(addr: SocketAddr) -> String {
    format!("Host: {addr}")
}

const JSON: &str = "Content-Type: application/json";

/// A well-formed request: loopback Host, JSON body.
fn call(addr: SocketAddr, method: &str, path: &str, body: &serde_json::Value) -> (u16, serde_json::Value) {
    let body = if body.is_null() { String::new() } else { body.to_string() };
    raw(addr, method, path, &[host(addr), JSON.into()], &body)
}

fn error_of(v: &serde_json::Value) -> &str {
    v["error"].as_str().unwrap_or_else(|| panic!("no error field: {v}"))
}

#[track_caller]
fn assert_refused(got: (u16, serde_json::Value), status: u16, mentions: &[&str]) {
    assert_eq!(got.0, status, "{}", got.1);
    for m in mentions {
        assert!(error_of(&got.1).contains(m), "`{m}` not in: {}", got.1);
    }
}

fn words(n: usize) -> String {
    vec!["w5"; n].join(" ")
}

/// The value of the `/metrics` line `name VALUE` (`name` with its labels, if any).
fn metric(addr: SocketAddr, name: &str) -> f64 {
    let (status, text) = exchange(addr, format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes()).unwrap();
    assert_eq!(status, 200);
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no metric {name} in {text}"))
}

// ---- Item 2: input size before work ----

/// T5 has no position limit: before the input limits, any input ran (a long one for seconds
/// and gigabytes of attention scores). Characters are counted before tokenizing; tokens after.
#[test]
fn oversized_inputs_are_refused_on_a_model_without_a_position_limit() {
    let model = word_model("t5-tiny");
    assert!(model.backbone.info().max_positions.is_none());
    let dir = one_task(&model, &["a", "b"], &["w10", "w11"]);
    let server = Server::start(model, config(dir.path())).unwrap();
    let addr = server.addr;
    let ok = call(addr, "POST", "/v1/classify", &serde_json::json!({"task": "t", "input": words(100)}));
    assert_eq!(ok.0, 200, "{}", ok.1);
    // 2,100 tokens (+ EOS) > --max-input-tokens 2048.
    let got = call(addr, "POST", "/v1/generate", &serde_json::json!({"task": "t", "input": words(2100), "max_new_tokens": 1}));
    assert_refused(got, 413, &["--max-input-tokens"]);
    let got = call(addr, "POST", "/v1/classify", &serde_json::json!({"task": "t", "input": words(2100)}));
    assert_refused(got, 413, &["--max-input-tokens"]);
    // One word of 40,000 characters is one (unknown) token: refused by its characters.
    let got = call(addr, "POST", "/v1/classify", &serde_json::json!({"task": "t", "input": "x".repeat(40_000)}));
    assert_refused(got, 413, &["--max-input-chars", "40000"]);
    // A 4 MB body is refused before it is parsed (under the 16 MiB upload limit).
    let got = call(addr, "POST", "/v1/generate", &serde_json::json!({"task": "t", "input": "x".repeat(4 << 20)}));
    assert_refused(got, 413, &["bytes"]);
    server.shutdown().unwrap();
}

/// Stop strings: every generation step searches the text for each; their count and length
/// are bounded.
#[test]
fn stop_strings_are_bounded() {
    let model = word_model("llama-tiny");
    let dir = one_task(&model, &["a", "b"], &[" w10", " w11"]);
    let server = Server::start(model, config(dir.path())).unwrap();
    let addr = server.addr;
    let body = |stop: serde_json::Value| serde_json::json!({"task": "t", "input": "w5 w6", "max_new_tokens": 2, "stop": stop});
    let ok = call(addr, "POST", "/v1/generate", &body(serde_json::json!(vec!["w7"; 16])));
    assert_eq!(ok.0, 200, "{}", ok.1);
    assert_refused(call(addr, "POST", "/v1/generate", &body(serde_json::json!(vec!["w7"; 17]))), 400, &["stop", "16"]);
    assert_refused(call(addr, "POST", "/v1/generate", &body(serde_json::json!("w".repeat(257)))), 400, &["stop[0]", "256"]);
    let many = vec!["z".repeat(300_000)];
    assert_refused(call(addr, "POST", "/v1/generate", &body(serde_json::json!(many))), 413, &[]);
    server.shutdown().unwrap();
}

/// A request's model work (rows x positions) against the per-batch budget: an ensemble of 8
/// prompts over a 2,000-token input on T5, and a verbalizer of 40 multi-token labels, each
/// refused alone; requests that fit are batched without passing the budget together.
#[test]
fn the_token_budget_bounds_requests_and_batches() {
    let t5 = word_model("t5-tiny");
    let dir = tempfile::tempdir().unwrap();
    let ens: Vec<Tensor> = (0..8).map(|i| random_prompt(&t5, 4, i)).collect();
    write_task_folder(&dir.path().join("ens"), &ens, &t5, Some(&meta(&["a", "b"], &["w10", "w11"]))).unwrap();
    let server = Server::start(t5, config(dir.path())).unwrap();
    let got = call(server.addr, "POST", "/v1/generate", &serde_json::json!({"task": "ens", "input": words(2000), "max_new_tokens": 16}));
    assert_refused(got, 413, &["--max-batch-tokens", "8 rows"]);
    let ok = call(server.addr, "POST", "/v1/generate", &serde_json::json!({"task": "ens", "input": words(20), "max_new_tokens": 2}));
    assert_eq!(ok.0, 200, "{}", ok.1);
    server.shutdown().unwrap();

    let llama = word_model("llama-tiny");
    let labels: Vec<String> = (0..40).map(|i| format!("l{i}")).collect();
    let verbalizer: Vec<String> = (0..40).map(|i| format!(" w{} w11 w12 w13 w14", 20 + i)).collect();
    let dir = tempfile::tempdir().unwrap();
    let m = TaskMeta { labels, verbalizer, ..TaskMeta::default() };
    write_task_folder(&dir.path().join("many"), &[random_prompt(&llama, 4, 1)], &llama, Some(&m)).unwrap();
    write_task_folder(&dir.path().join("t"), &[random_prompt(&llama, 4, 2)], &llama, Some(&meta(&["a", "b"], &[" w10", " w11"]))).unwrap();
    let mut cfg = config(dir.path());
    cfg.batch.max_batch = 16;
    cfg.batch.max_wait = Duration::from_millis(400);
    cfg.request_timeout = Duration::from_secs(120);
    let server = Server::start(llama, cfg).unwrap();
    let addr = server.addr;
    // 40 labels x (4 + 1 + 300 + 5) = 12,400 positions.
    let got = call(addr, "POST", "/v1/classify", &serde_json::json!({"task": "many", "input": words(300)}));
    assert_refused(got, 413, &["--max-batch-tokens", "40 rows"]);
    let ok = call(addr, "POST", "/v1/classify", &serde_json::json!({"task": "many", "input": words(10)}));
    assert_eq!(ok.0, 200, "{}", ok.1);
    // Eight generations of 4 + 1 + 1010 + 16 = 1,031 positions: 8 x 1,031 = 8,248 padded
    // positions together, over the 8,192 budget, so they never run as one batch; 7 fit.
    let before = metric(addr, "softprompt_batches_total");
    let clients: Vec<_> = (0..8)
        .map(|_| {
            std::thread::spawn(move || {
                call(addr, "POST", "/v1/generate", &serde_json::json!({"task": "t", "input": words(1010), "max_new_tokens": 16}))
            })
        })
        .collect();
    for c in clients {
        let (status, v) = c.join().unwrap();
        assert_eq!(status, 200, "{v}");
    }
    let batches = metric(addr, "softprompt_batches_total") - before;
    assert!(batches >= 2.0, "8 x 1,031 positions ran in {batches} batch, over the 8,192 budget");
    server.shutdown().unwrap();
}

/// A classification batch whose clients all left stops at the next group of `max_rows` rows
/// (before, the whole batch ran: every row of every request). SmolLM2, so that one group
/// takes long enough for the clients to leave while it runs.
#[test]
fn classification_stops_when_its_clients_leave() {
    let model = common::smollm2();
    let dir = one_task(&model, &["pos", "neg"], &[" positive", " negative"]);
    let mut cfg = config(dir.path());
    cfg.batch.max_batch = 7; // six are sent: the batch starts when `max_wait` runs out
    cfg.batch.max_wait = Duration::from_secs(4); // time to see all six queued, even on a loaded machine
    cfg.batch.max_rows = 1; // one request per forward
    let server = Server::start(model.clone(), cfg).unwrap();
    let addr = server.addr;
    let input = "the film was long and the ending made little sense to anyone. ".repeat(30);
    let input_tokens = model.tokenizer().unwrap().encode_input(&input).unwrap().len() as f64;
    let computed_before = metric(addr, "softprompt_prefill_tokens_total{source=\"computed\"}");
    let body = serde_json::json!({"task": "t", "input": input}).to_string();
    let clients: Vec<TcpStream> = (0..6)
        .map(|_| {
            let mut s = TcpStream::connect(addr).unwrap();
            let req = format!(
                "POST /v1/classify HTTP/1.1\r\nHost: {addr}\r\n{JSON}\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
            s.write_all(req.as_bytes()).unwrap();
            s
        })
        .collect();
    // Queued, then taken by the worker: the clients leave while the first group runs.
    let wait_for = |depth: f64| {
        let start = Instant::now();
        while metric(addr, "softprompt_queue_depth") != depth {
            assert!(start.elapsed() < Duration::from_secs(60), "queue depth never reached {depth}");
            std::thread::sleep(Duration::from_millis(5));
        }
    };
    wait_for(6.0);
    wait_for(0.0);
    drop(clients);
    // The worker is free again once a new request is answered.
    let ok = call(addr, "POST", "/v1/classify", &serde_json::json!({"task": "t", "input": "great"}));
    assert_eq!(ok.0, 200, "{}", ok.1);
    let computed = metric(addr, "softprompt_prefill_tokens_total{source=\"computed\"}") - computed_before;
    let rows_run = computed / input_tokens;
    assert!(rows_run < 3.0, "{rows_run:.1} of 6 abandoned inputs were run ({computed} positions)");
    assert!(metric(addr, "softprompt_cancelled_total") >= 4.0);
    server.shutdown().unwrap();
}

// ---- Item 4: access ----

#[test]
fn writes_are_off_without_a_token_or_allow_writes() {
    let model = word_model("llama-tiny");
    let dir = one_task(&model, &["a", "b"], &[" w10", " w11"]);
    let d = model.backbone.info().d_model;
    let upload = serde_json::json!({"prompt": vec![vec![0.01f32; d]; 2]});
    let server = Server::start(model.clone(), config(dir.path())).unwrap();
    let addr = server.addr;
    assert_refused(call(addr, "PUT", "/v1/tasks/new", &upload), 403, &["--token", "--allow-writes"]);
    assert_refused(call(addr, "DELETE", "/v1/tasks/t", &serde_json::Value::Null), 403, &["--allow-writes"]);
    assert!(!dir.path().join("new").exists() && dir.path().join("t").exists());
    assert_eq!(call(addr, "GET", "/v1/tasks/t", &serde_json::Value::Null).0, 200);
    server.shutdown().unwrap();

    let mut cfg = config(dir.path());
    cfg.allow_writes = true;
    let server = Server::start(model.clone(), cfg).unwrap();
    assert_eq!(call(server.addr, "PUT", "/v1/tasks/new", &upload).0, 201);
    assert_eq!(call(server.addr, "DELETE", "/v1/tasks/new", &serde_json::Value::Null).0, 200);
    server.shutdown().unwrap();

    let mut cfg = config(dir.path());
    cfg.token = Some("s3cret".into());
    let server = Server::start(model, cfg).unwrap();
    let addr = server.addr;
    let auth = |t: &str| format!("Authorization: Bearer {t}");
    let put = |t: &str| raw(addr, "PUT", "/v1/tasks/new", &[host(addr), JSON.into(), auth(t)], &upload.to_string());
    assert_eq!(put("s3cre").0, 401);
    assert_eq!(put("s3cret-and-more").0, 401);
    assert_eq!(put("s3cret").0, 201);
    server.shutdown().unwrap();
}

#[test]
fn health_shows_no_model_details_without_the_token() {
    let model = word_model("llama-tiny");
    let dir = one_task(&model, &["a", "b"], &[" w10", " w11"]);
    let mut cfg = config(dir.path());
    cfg.token = Some("s3cret".into());
    let server = Server::start(model, cfg).unwrap();
    let addr = server.addr;
    let (status, v) = raw(addr, "GET", "/health", &[host(addr)], "");
    assert_eq!(status, 200);
    assert_eq!(v, serde_json::json!({"status": "ok"}));
    let (status, v) = raw(addr, "GET", "/health", &[host(addr), "Authorization: Bearer wrong".into()], "");
    assert_eq!((status, v), (200, serde_json::json!({"status": "ok"})));
    let (status, v) = raw(addr, "GET", "/health", &[host(addr), "Authorization: Bearer s3cret".into()], "");
    assert_eq!(status, 200);
    assert_eq!(v["d_model"], 32, "{v}");
    assert_eq!(v["tasks"], 1, "{v}");
    server.shutdown().unwrap();
}

/// Browsers send cross-site `text/plain` and form posts without a CORS preflight.
#[test]
fn json_endpoints_need_a_json_content_type() {
    let model = word_model("llama-tiny");
    let dir = one_task(&model, &["a", "b"], &[" w10", " w11"]);
    let mut cfg = config(dir.path());
    cfg.allow_writes = true;
    let server = Server::start(model, cfg).unwrap();
    let addr = server.addr;
    let body = serde_json::json!({"task": "t", "input": "w5"}).to_string();
    for ct in ["Content-Type: text/plain", "Content-Type: application/x-www-form-urlencoded", "Content-Type: multipart/form-data; boundary=x"] {
        assert_refused(raw(addr, "POST", "/v1/classify", &[host(addr), ct.into()], &body), 415, &["application/json"]);
        assert_refused(raw(addr, "POST", "/v1/generate", &[host(addr), ct.into()], &body), 415, &["application/json"]);
        assert_refused(raw(addr, "PUT", "/v1/tasks/x", &[host(addr), ct.into()], "{}"), 415, &["application/json"]);
    }
    assert_refused(raw(addr, "POST", "/v1/classify", &[host(addr)], &body), 415, &["none"]);
    let ok = raw(addr, "POST", "/v1/classify", &[host(addr), "content-type: Application/JSON; charset=utf-8".into()], &body);
    assert_eq!(ok.0, 200, "{}", ok.1);
    server.shutdown().unwrap();
}

/// DNS rebinding: a page on `evil.example`, re-resolved to 127.0.0.1, sends
/// `Host: evil.example:PORT`.
#[test]
fn foreign_host_headers_are_refused_on_loopback() {
    let model = word_model("llama-tiny");
    let dir = one_task(&model, &["a", "b"], &[" w10", " w11"]);
    let mut cfg = config(dir.path());
    cfg.allowed_hosts = vec!["api.example".into()];
    let server = Server::start(model, cfg).unwrap();
    let addr = server.addr;
    let port = addr.port();
    let body = serde_json::json!({"task": "t", "input": "w5"}).to_string();
    for bad in [format!("Host: evil.example:{port}"), format!("Host: localhost:{}", port.wrapping_add(1)), "Host: 127.0.0.1".into()] {
        assert_refused(raw(addr, "POST", "/v1/classify", &[bad.clone(), JSON.into()], &body), 403, &["--allowed-host"]);
        assert_refused(raw(addr, "GET", "/health", &[bad], ""), 403, &["DNS rebinding"]);
    }
    assert_eq!(raw(addr, "GET", "/v1/tasks", &[], "").0, 403, "no Host header");
    for good in [format!("Host: localhost:{port}"), format!("Host: 127.0.0.1:{port}"), "Host: api.example".into()] {
        let got = raw(addr, "POST", "/v1/classify", &[good, JSON.into()], &body);
        assert_eq!(got.0, 200, "{}", got.1);
    }
    server.shutdown().unwrap();
}

// ---- Item 7: connections ----

/// Reads from `s` until the server closes it or answers; `None` when it did neither within
/// `patience` (a generous bound: the server's own limits are a tenth of it).
fn closed_or_answered(s: &mut TcpStream, patience: Duration) -> Option<String> {
    s.set_read_timeout(Some(patience)).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return Some(String::from_utf8_lossy(&got).into_owned()),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => return None,
            Err(_) => return Some(String::from_utf8_lossy(&got).into_owned()),
        }
    }
}

#[test]
fn slow_clients_are_dropped() {
    let model = word_model("llama-tiny");
    let dir = one_task(&model, &["a", "b"], &[" w10", " w11"]);
    let mut cfg = config(dir.path());
    cfg.connections.header_timeout = Duration::from_millis(300);
    cfg.connections.body_timeout = Duration::from_millis(300);
    let server = Server::start(model, cfg).unwrap();
    let addr = server.addr;
    let patience = Duration::from_secs(5);
    // Silent: connects and sends nothing.
    let mut silent = TcpStream::connect(addr).unwrap();
    // Slow headers: half a request head, then nothing.
    let mut slow_head = TcpStream::connect(addr).unwrap();
    slow_head.write_all(format!("POST /v1/classify HTTP/1.1\r\nHost: {addr}\r\nContent-").as_bytes()).unwrap();
    // Slow body: the head and 10 of 100 body bytes.
    let mut slow_body = TcpStream::connect(addr).unwrap();
    let head = format!("POST /v1/classify HTTP/1.1\r\nHost: {addr}\r\n{JSON}\r\nContent-Length: 100\r\n\r\n{{\"task\": \"");
    slow_body.write_all(head.as_bytes()).unwrap();
    // Idle keep-alive: one request answered, then nothing.
    let mut idle = TcpStream::connect(addr).unwrap();
    idle.write_all(format!("GET /health HTTP/1.1\r\nHost: {addr}\r\n\r\n").as_bytes()).unwrap();

    assert!(closed_or_answered(&mut silent, patience).is_some(), "a silent connection stayed open");
    assert!(closed_or_answered(&mut slow_head, patience).is_some(), "a half-sent head kept its connection");
    let answer = closed_or_answered(&mut slow_body, patience).expect("a half-sent body kept its connection");
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("--body-timeout-ms"), "{answer}");
    let answer = closed_or_answered(&mut idle, patience).expect("an idle keep-alive connection stayed open");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let ok = call(addr, "POST", "/v1/classify", &serde_json::json!({"task": "t", "input": "w5"}));
    assert_eq!(ok.0, 200, "{}", ok.1);
    server.shutdown().unwrap();
}

#[test]
fn connections_over_the_cap_are_refused_with_503() {
    let model = word_model("llama-tiny");
    let dir = one_task(&model, &["a", "b"], &[" w10", " w11"]);
    let mut cfg = config(dir.path());
    cfg.connections.max_connections = 4;
    let server = Server::start(model, cfg).unwrap();
    let addr = server.addr;
    // Four idle connections (the header timeout is 10 s); connections are accepted in the
    // order they arrive, so a fifth is over the cap.
    let held: Vec<TcpStream> = (0..4).map(|_| TcpStream::connect(addr).unwrap()).collect();
    assert_refused(call(addr, "POST", "/v1/classify", &serde_json::json!({"task": "t", "input": "w5"})), 503, &["--max-connections"]);
    drop(held);
    let start = Instant::now();
    loop {
        let got = call(addr, "POST", "/v1/classify", &serde_json::json!({"task": "t", "input": "w5"}));
        if got.0 == 200 {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "connections not freed: {}", got.1);
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(metric(addr, "softprompt_connections_refused_total") >= 1.0);
    server.shutdown().unwrap();
}
