//! Soak: the server under ten times its capacity for a bounded time on loopback.
//!
//! Starts the server in-process on 127.0.0.1 (SmolLM2-135M with four random prompts, one an
//! ensemble; or, with `SOAK_MODEL=fixture`, the tiny llama fixture with a word-level
//! tokenizer), then
//!
//! 1. records reference answers: every (task, input) pair once, one request at a time;
//! 2. measures capacity: closed loop, `SOAK_CLIENTS` clients sending `/v1/classify` back to
//!    back for `SOAK_CAPACITY_SECS`; capacity = 200 answers per second;
//! 3. soaks: open loop at `SOAK_FACTOR` x capacity for `SOAK_SECS`: arrivals at fixed
//!    intervals, each on its own connection, whether or not earlier ones were answered;
//!    answers are counted by status (200/429/503/504/other) and failed connections by kind;
//!    the process's RSS (`/proc/self/status` VmRSS, VmHWM) is sampled every 100 ms and the
//!    queue depth (`/metrics`) every 250 ms; then the requests in flight are waited for;
//! 4. checks recovery: queue depth back to 0, every reference request answered 200 with the
//!    same label and scores (1e-4), `/health` 200.
//!
//! Prints a table; exits 1 when the peak RSS during the soak exceeds the cap, when recovery
//! fails, or when any answer is neither 200, 429, 503 nor 504. RSS is the whole process's:
//! server, model and load generator.
//!
//! The client side is `soak/traffic.rs`. `--adversarial` mixes attacks and task churn into
//! the soak's arrivals (see `soak/adversarial.rs`: oversized inputs, slow heads and bodies;
//! PUT/DELETE of tasks and requests to them, under a small `--kv-cache-bytes` so that prompt
//! keys/values are evicted all the time) and fails when any of them is not answered as it
//! should be (413, 408, closed, 503 at the connection cap; 200/201/404 for churn), when no
//! prompt was evicted, or when the store is not consistent afterwards (hidden staging
//! folders left, folders and served tasks differ, a served churn task not answering).
//!
//! `cargo bench -p softprompt-serve --bench soak` (or, without a release build, `cargo test
//! -p softprompt-serve --bench soak`); `-- --tiny` runs the fixture model for 2 s (a smoke
//! test), `-- --help` lists the environment variables.

#[path = "../../softprompt/tests/common/word_level.rs"]
mod word_level;
#[path = "soak/adversarial.rs"]
mod adversarial;
#[path = "soak/traffic.rs"]
mod traffic;

use adversarial::Kind;
use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};
use softprompt::load::{load_model, Model};
use softprompt_serve::client::{post_json, request};
use softprompt_serve::registry::{write_task_folder, TaskMeta};
use softprompt_serve::{ServeConfig, Server};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use traffic::{capacity, metric, soak};

const HELP: &str = "\
soak: the server under SOAK_FACTOR x its capacity for SOAK_SECS on loopback; checks that it
answers 429/503 instead of queueing without bound, that RSS stays under a cap, and that it
answers normally afterwards. Exit status 1 when a check fails.

usage: cargo bench -p softprompt-serve --bench soak [-- --tiny | --adversarial | --help]
  --tiny                  SOAK_MODEL=fixture, SOAK_SECS=2, SOAK_CAPACITY_SECS=1,
                          SOAK_MAX_INFLIGHT=400 (a smoke test, a few seconds)
  --adversarial           4 arrivals in 10 are attacks: inputs over --max-input-chars and
                          --max-input-tokens, slow heads, slow bodies (server header and
                          body timeouts 2 s); each must get its answer within 10 s;
                          2 in 10 are task churn (PUT/DELETE of 5 churn tasks, classify on
                          them), writes allowed, --kv-cache-bytes SOAK_KV_CACHE_BYTES

environment (defaults in brackets):
  SOAK_MODEL              smollm2 | fixture (tiny llama, word-level tokenizer) [smollm2]
  SOAK_SECS               soak duration, seconds [60]
  SOAK_CAPACITY_SECS      closed-loop capacity measurement, seconds [10; fixture 2]
  SOAK_CLIENTS            closed-loop clients [2 x SOAK_MAX_BATCH]
  SOAK_FACTOR             offered load / capacity [10]
  SOAK_RSS_CAP_MIB        RSS cap [RSS before the soak + SOAK_RSS_SLACK_MIB]
  SOAK_RSS_SLACK_MIB      [256]
  SOAK_MAX_INFLIGHT       most client connections open at once; arrivals beyond are skipped
                          and counted [4096]
  SOAK_QUEUE, SOAK_MAX_BATCH, SOAK_TIMEOUT_MS, SOAK_MAX_CONNECTIONS
                          server --queue [256], --max-batch [16], --timeout-ms [60000],
                          --max-connections [512]
  SOAK_KV_CACHE_BYTES     server --kv-cache-bytes [1 GiB; --adversarial: 2 MiB with
                          SmolLM2 (about 45 prompt positions), 4 KiB with the fixture (16)]
";

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    match std::env::var(name) {
        Ok(v) => v.trim().parse().unwrap_or_else(|_| {
            eprintln!("soak: {name}={v:?} is not a valid value");
            std::process::exit(2)
        }),
        Err(_) => default,
    }
}

struct Settings {
    fixture: bool,
    adversarial: bool,
    soak: Duration,
    capacity: Duration,
    clients: usize,
    factor: f64,
    rss_cap_mib: Option<f64>,
    rss_slack_mib: f64,
    max_inflight: usize,
    queue: usize,
    max_batch: usize,
    timeout: Duration,
    max_connections: usize,
    kv_cache_bytes: Option<usize>,
}

fn settings() -> Settings {
    let (mut tiny, mut adversarial) = (false, false);
    for arg in std::env::args().skip(1) {
        match arg.as_str() {
            "--help" | "-h" => {
                print!("{HELP}");
                std::process::exit(0);
            }
            "--tiny" => tiny = true,
            "--adversarial" => adversarial = true,
            "--bench" => {} // passed by `cargo bench`
            other => eprintln!("soak: ignoring argument {other:?} (see --help)"),
        }
    }
    let model: String = env_or("SOAK_MODEL", if tiny { "fixture".to_string() } else { "smollm2".to_string() });
    let fixture = match model.as_str() {
        "fixture" => true,
        "smollm2" => false,
        other => {
            eprintln!("soak: SOAK_MODEL must be smollm2 or fixture, not {other:?}");
            std::process::exit(2)
        }
    };
    let max_batch = env_or("SOAK_MAX_BATCH", 16usize).max(1);
    let secs = |name: &str, default: f64| Duration::from_secs_f64(env_or(name, default).max(0.1));
    Settings {
        fixture,
        adversarial,
        soak: secs("SOAK_SECS", if tiny { 2.0 } else { 60.0 }),
        capacity: secs("SOAK_CAPACITY_SECS", if tiny { 1.0 } else if fixture { 2.0 } else { 10.0 }),
        clients: env_or("SOAK_CLIENTS", 2 * max_batch).max(1),
        factor: env_or("SOAK_FACTOR", 10.0f64).max(0.01),
        rss_cap_mib: std::env::var("SOAK_RSS_CAP_MIB").ok().map(|_| env_or("SOAK_RSS_CAP_MIB", 0.0)),
        rss_slack_mib: env_or("SOAK_RSS_SLACK_MIB", 256.0),
        // --tiny: under 1024 file descriptors (both ends of every connection are in-process).
        max_inflight: env_or("SOAK_MAX_INFLIGHT", if tiny { 400 } else { 4096usize }).max(1),
        queue: env_or("SOAK_QUEUE", 256usize),
        max_batch,
        timeout: Duration::from_millis(env_or("SOAK_TIMEOUT_MS", 60_000u64)),
        max_connections: env_or("SOAK_MAX_CONNECTIONS", 512usize).max(1),
        kv_cache_bytes: match (std::env::var("SOAK_KV_CACHE_BYTES").is_ok(), adversarial) {
            (true, _) => Some(env_or("SOAK_KV_CACHE_BYTES", 0usize)),
            // Small enough that the stable and churn tasks' prompts evict each other.
            (false, true) => Some(if fixture { 4 << 10 } else { 2 << 20 }),
            (false, false) => None,
        },
    }
}

/// The served model, its prompts folder and the request bodies.
struct Setup {
    model: Arc<Model>,
    name: String,
    _dir: tempfile::TempDir,
    dir: std::path::PathBuf,
    /// `/v1/classify` bodies, every (task, input) pair.
    bodies: Vec<serde_json::Value>,
    /// What the adversarial mode sends besides `bodies`.
    attacks: adversarial::Attacks,
    /// Names of the stable tasks (never changed by the churn).
    task_names: Vec<String>,
}

/// A random prompt `[n, D]` with small values.
fn random_prompt(model: &Model, n: usize, rng: &mut rand::rngs::StdRng) -> Tensor {
    let d = model.backbone.info().d_model;
    let v: Vec<f32> = (0..n * d).map(|_| rng.random_range(-0.1f32..0.1)).collect();
    Tensor::from_vec(v, (n, d), &Device::Cpu).expect("prompt")
}

fn meta(template: &str, labels: &[&str], verbalizer: &[&str]) -> TaskMeta {
    TaskMeta {
        template: Some(template.to_string()),
        labels: labels.iter().map(|s| s.to_string()).collect(),
        verbalizer: verbalizer.iter().map(|s| s.to_string()).collect(),
        ..TaskMeta::default()
    }
}

/// llama-tiny's weights with a word-level tokenizer (`w{i}` is token i), in `root/model`.
fn word_model(root: &Path) -> std::path::PathBuf {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("../softprompt/tests/fixtures/llama-tiny");
    let dir = root.join("model");
    std::fs::create_dir_all(&dir).expect("model folder");
    for f in ["config.json", "generation_config.json", "model.safetensors"] {
        std::fs::copy(fixture.join(f), dir.join(f)).expect("copy the llama-tiny fixture");
    }
    let tok = word_level::word_level_json(&[(0, "[UNK]"), (1, "<s>"), (2, "</s>")], 256);
    std::fs::write(dir.join("tokenizer.json"), tok).expect("write tokenizer.json");
    dir
}

/// (task name, prompt lengths, task.json)
type TaskSpec = (&'static str, Vec<usize>, TaskMeta);

fn setup(fixture: bool) -> Setup {
    let tmp = tempfile::tempdir().expect("temp dir");
    let (model, name) = if fixture {
        let path = word_model(tmp.path());
        (load_model(&path, &Device::Cpu).expect("load the llama-tiny fixture"), "llama-tiny fixture (word-level tokenizer)")
    } else {
        let path = softprompt::fetch::smollm2().expect("SmolLM2 (softprompt fetch smollm2)");
        (load_model(&path, &Device::Cpu).expect("load SmolLM2"), "SmolLM2-135M-Instruct")
    };
    let model = Arc::new(model);
    let mut rng = rand::rngs::StdRng::seed_from_u64(0);
    let dir = tmp.path().join("prompts");
    let (tasks, inputs): (Vec<TaskSpec>, Vec<&str>) = if fixture {
        let m = meta("w50 {text} w51", &["a", "b"], &[" w100", " w200"]);
        let three = meta("w52 {text}", &["a", "b", "c"], &[" w100", " w200", " w101 w102"]);
        (
            vec![("t0", vec![4], m.clone()), ("t1", vec![8], three), ("t2", vec![12], m.clone()), ("ens", vec![4, 8], m)],
            vec!["w10 w11", "w12", "w13 w14 w15 w16 w17", "w20 w21 w22"],
        )
    } else {
        let sentiment = meta("Review: {text}\nSentiment:", &["positive", "negative"], &[" positive", " negative"]);
        let topic = meta("Text: {text}\nTopic:", &["film", "food", "sport"], &[" film", " food", " sport"]);
        let yesno = meta("{text}\nDid the writer like it?", &["yes", "no"], &[" yes", " no"]);
        (
            vec![
                ("sentiment", vec![8], sentiment.clone()),
                ("topic", vec![20], topic),
                ("yesno", vec![4], yesno),
                ("ensemble", vec![6, 12], sentiment),
            ],
            vec![
                "great fun from start to finish",
                "the plot made no sense and the acting was wooden",
                "a quiet, moving film about growing old and the people we leave behind",
                "I want my two hours back.",
            ],
        )
    };
    for (task, lens, m) in &tasks {
        let prompts: Vec<Tensor> = lens.iter().map(|&n| random_prompt(&model, n, &mut rng)).collect();
        write_task_folder(&dir.join(task), &prompts, &model, Some(m)).expect("write task");
    }
    let bodies = inputs
        .iter()
        .flat_map(|input| tasks.iter().map(move |(task, ..)| serde_json::json!({"task": task, "input": input})))
        .collect();
    let (too_many_chars, too_many_tokens) = adversarial::oversized_bodies(tasks[0].0, if fixture { "w5" } else { "word" });
    // Churn uploads: a two-label task (the first task's template and labels), random prompts.
    let churn_meta = serde_json::to_value(&tasks[0].2).expect("task.json as JSON");
    let uploads = adversarial::CHURN_PROMPT_ROWS
        .iter()
        .map(|&n| {
            let d = model.backbone.info().d_model;
            let rows: Vec<Vec<f32>> = (0..n).map(|_| (0..d).map(|_| rng.random_range(-0.1f32..0.1)).collect()).collect();
            serde_json::json!({"prompt": rows, "task": churn_meta}).to_string().into_bytes()
        })
        .collect();
    let churn_classify = (0..adversarial::CHURN_TASKS)
        .map(|k| serde_json::json!({"task": format!("churn{k}"), "input": inputs[k % inputs.len()]}).to_string().into_bytes())
        .collect();
    let attacks = adversarial::Attacks { too_many_chars, too_many_tokens, uploads, churn_classify };
    let task_names = tasks.iter().map(|t| t.0.to_string()).collect();
    Setup { model, name: name.to_string(), dir, _dir: tmp, bodies, attacks, task_names }
}

/// `/proc/self/status` fields in MiB: (VmRSS, VmHWM); `None` off Linux.
fn rss_mib() -> Option<(f64, f64)> {
    let text = std::fs::read_to_string("/proc/self/status").ok()?;
    let field = |name: &str| -> Option<f64> {
        let line = text.lines().find(|l| l.starts_with(name))?;
        let kib: f64 = line[name.len()..].trim_start_matches(':').trim().trim_end_matches("kB").trim().parse().ok()?;
        Some(kib / 1024.0)
    };
    Some((field("VmRSS")?, field("VmHWM")?))
}

/// Classify answers: (label, scores by label).
type Answer = (String, BTreeMap<String, f64>);

fn answers(addr: SocketAddr, bodies: &[serde_json::Value]) -> Result<Vec<Answer>, String> {
    bodies
        .iter()
        .map(|b| match post_json(addr, "/v1/classify", b) {
            Ok((200, v)) => {
                let label = v["label"].as_str().unwrap_or_default().to_string();
                let scores = v["scores"]
                    .as_object()
                    .map(|m| m.iter().map(|(k, x)| (k.clone(), x.as_f64().unwrap_or(f64::NAN))).collect())
                    .unwrap_or_default();
                Ok((label, scores))
            }
            Ok((status, v)) => Err(format!("{b}: status {status}: {v}")),
            Err(e) => Err(format!("{b}: {e}")),
        })
        .collect()
}

/// After the soak: the stable tasks are all served, no folder failed, every served task has
/// its folder and no other visible folder exists, no hidden staging folder (`.NAME.upload-*`,
/// `.old-*`, `.deleted-*`) is left, and every served churn task answers. Returns a summary.
fn store_check(addr: SocketAddr, dir: &Path, stable: &[String]) -> Result<String, String> {
    let (status, text) = request(addr, "GET", "/v1/tasks", None, None).map_err(|e| format!("GET /v1/tasks: {e}"))?;
    let list: serde_json::Value =
        serde_json::from_str(&text).map_err(|_| format!("GET /v1/tasks: {status}: {text}"))?;
    let mut served: Vec<String> = list
        .as_array()
        .map(|a| a.iter().filter_map(|t| t["name"].as_str().map(str::to_string)).collect())
        .unwrap_or_default();
    served.sort();
    if let Some(missing) = stable.iter().find(|t| !served.contains(t)) {
        return Err(format!("stable task {missing} no longer served ({served:?})"));
    }
    let (_, errors) = request(addr, "GET", "/v1/tasks?errors", None, None).map_err(|e| format!("GET /v1/tasks?errors: {e}"))?;
    if errors.trim() != "[]" {
        return Err(format!("folders that could not be served: {errors}"));
    }
    let mut visible = Vec::new();
    let mut hidden = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))?.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') {
            hidden.push(name);
        } else {
            visible.push(name);
        }
    }
    visible.sort();
    if !hidden.is_empty() {
        return Err(format!("hidden folders left in the prompts folder: {hidden:?}"));
    }
    if visible != served {
        return Err(format!("folders {visible:?} but served tasks {served:?}"));
    }
    let churn: Vec<&String> = served.iter().filter(|t| !stable.contains(t)).collect();
    for task in &churn {
        let body = serde_json::json!({"task": task, "input": "one more"});
        match post_json(addr, "/v1/classify", &body) {
            Ok((200, _)) => {}
            Ok((status, v)) => return Err(format!("churn task {task}: {status} {v}")),
            Err(e) => return Err(format!("churn task {task}: {e}")),
        }
    }
    Ok(format!("{} tasks served ({} churn tasks, each answering 200), folders match, no staging folder left", served.len(), churn.len()))
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

fn main() {
    let s = settings();
    let setup = setup(s.fixture);
    let mut cfg = ServeConfig::new(&setup.dir);
    cfg.addr = "127.0.0.1:0".parse().expect("addr");
    cfg.batch.max_batch = s.max_batch;
    cfg.batch.queue = s.queue;
    cfg.request_timeout = s.timeout;
    if s.adversarial {
        // Slow clients are dropped within the soak, well inside ATTACK_PATIENCE.
        cfg.connections.header_timeout = Duration::from_secs(2);
        cfg.connections.body_timeout = Duration::from_secs(2);
        // The churn uploads and deletes tasks.
        cfg.allow_writes = true;
    }
    if let Some(bytes) = s.kv_cache_bytes {
        cfg.store.kv_cache_bytes = bytes;
    }
    let kv_budget = cfg.store.kv_cache_bytes;
    cfg.connections.max_connections = s.max_connections;
    let max_connections = s.max_connections;
    let max_wait_ms = cfg.batch.max_wait.as_millis();
    let server = Server::start(setup.model.clone(), cfg).expect("start the server");
    let addr = server.addr;
    eprintln!(
        "soak: {}, {} tasks, {} bodies; server max_batch {}, max_wait {max_wait_ms} ms, queue {}, timeout {} ms",
        setup.name,
        setup.task_names.len(),
        setup.bodies.len(),
        s.max_batch,
        s.queue,
        s.timeout.as_millis()
    );

    // 1. Reference answers (also the warm-up).
    let reference = answers(addr, &setup.bodies).unwrap_or_else(|e| {
        eprintln!("soak: reference request failed: {e}");
        std::process::exit(1)
    });

    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("client runtime");
    let bodies: Arc<Vec<Vec<u8>>> = Arc::new(setup.bodies.iter().map(|b| b.to_string().into_bytes()).collect());

    // 2. Capacity.
    eprintln!("soak: measuring capacity ({} clients, {:.0} s)", s.clients, s.capacity.as_secs_f64());
    let (cap, cap_other) = capacity(&rt, addr, &bodies, &s);
    if cap <= 0.0 {
        eprintln!("soak: no request answered while measuring capacity ({cap_other} failed)");
        std::process::exit(1);
    }
    let rate = s.factor * cap;

    // 3. Soak, sampling RSS every 100 ms.
    let rss_before = rss_mib().map(|r| r.0);
    let cap_mib = s.rss_cap_mib.or(rss_before.map(|r| r + s.rss_slack_mib));
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let start = Instant::now();
            let mut samples = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                if let Some((rss, _)) = rss_mib() {
                    samples.push((start.elapsed().as_secs_f64(), rss));
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            samples
        })
    };
    eprintln!(
        "soak: capacity {cap:.1} req/s; offering {rate:.1} req/s ({}x) open loop for {:.0} s",
        s.factor,
        s.soak.as_secs_f64()
    );
    let attacks = s.adversarial.then_some(Arc::new(setup.attacks));
    let mut out = soak(&rt, addr, &bodies, attacks, rate, &s);
    stop.store(true, Ordering::Relaxed);
    let samples = sampler.join().unwrap_or_default();
    drop(rt);
    let rss_peak = samples.iter().map(|x| x.1).fold(None, |m: Option<f64>, x| Some(m.map_or(x, |m| m.max(x))));
    let rss_end = samples.last().map(|x| x.1);

    // 4. Recovery.
    let recovery_start = Instant::now();
    let mut depth = None;
    while recovery_start.elapsed() < Duration::from_secs(30) {
        if let Ok((200, text)) = request(addr, "GET", "/metrics", None, None) {
            depth = metric(&text, "softprompt_queue_depth");
            if depth == Some(0.0) {
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let drained_secs = recovery_start.elapsed().as_secs_f64();
    let after = answers(addr, &setup.bodies);
    let health = request(addr, "GET", "/health", None, None).map(|r| r.0).unwrap_or(0);
    let (same, max_diff, recovery_error) = match &after {
        Ok(after) => {
            let same = reference.iter().zip(after).filter(|(a, b)| a.0 == b.0).count();
            let diff = reference
                .iter()
                .zip(after)
                .flat_map(|(a, b)| a.1.iter().map(move |(k, x)| (x - b.1.get(k).copied().unwrap_or(f64::NAN)).abs()))
                .fold(0.0f64, |m, d| if d.is_nan() { f64::INFINITY } else { m.max(d) });
            (same, diff, None)
        }
        Err(e) => (0, f64::NAN, Some(e.clone())),
    };
    let store = store_check(addr, &setup.dir, &setup.task_names);
    let evictions = request(addr, "GET", "/metrics", None, None)
        .ok()
        .and_then(|(_, text)| metric(&text, "softprompt_prompt_kv_evictions_total"));
    let recovered = depth == Some(0.0) && recovery_error.is_none() && same == reference.len() && max_diff <= 1e-4 && health == 200;
    let rss_after = rss_mib();
    server.shutdown().expect("shutdown");

    // Report.
    out.tally.latency.sort_by(|a, b| a.total_cmp(b));
    out.tally.latency_429.sort_by(|a, b| a.total_cmp(b));
    let count = |code: u16| out.tally.status.get(&code).copied().unwrap_or(0);
    let other: Vec<String> = out
        .tally
        .status
        .iter()
        .filter(|(c, _)| ![200, 429, 503, 504].contains(*c))
        .map(|(c, n)| format!("{n} x {c}"))
        .collect();
    let errors: u64 = out.tally.errors.values().sum();
    let error_kinds: Vec<String> = out.tally.errors.iter().map(|(k, n)| format!("{n} {k}")).collect();
    let rss_ok = match (rss_peak, cap_mib) {
        (Some(p), Some(c)) => p <= c,
        _ => true,
    };
    let mib = |x: Option<f64>| x.map_or("n/a".to_string(), |x| format!("{x:.0} MiB"));
    // RSS every `step` seconds (about 12 values over the soak).
    let step = (s.soak.as_secs_f64() / 12.0).max(0.1);
    let rss_trace: Vec<String> = {
        let mut next = 0.0;
        let mut v = Vec::new();
        for (t, r) in &samples {
            if *t >= next {
                v.push(format!("{t:.1}s {r:.0}"));
                next += step;
            }
        }
        v
    };
    println!();
    println!("| soak | |");
    println!("|---|---|");
    println!("| model | {}, {} tasks (one an ensemble of 2 prompts), {} bodies |", setup.name, setup.task_names.len(), setup.bodies.len());
    println!(
        "| server | max_batch {}, max_wait {max_wait_ms} ms, queue {}, timeout {} ms, max_connections {max_connections}{} |",
        s.max_batch,
        s.queue,
        s.timeout.as_millis(),
        if s.adversarial { ", header and body timeouts 2 s" } else { "" }
    );
    println!(
        "| capacity (closed loop, {} clients, {:.0} s) | {cap:.1} req/s |",
        s.clients,
        s.capacity.as_secs_f64()
    );
    println!(
        "| offered (open loop, {}x, {:.0} s) | {:.1} req/s; sent {} ({:.1} req/s), {} skipped (client at {} open connections) |",
        s.factor,
        s.soak.as_secs_f64(),
        out.offered,
        out.sent,
        out.sent as f64 / out.send_secs,
        out.skipped,
        s.max_inflight
    );
    println!(
        "| throughput (200s / {:.1} s incl. drain) | {:.1} req/s |",
        out.total_secs,
        count(200) as f64 / out.total_secs
    );
    println!("| 200 / 429 / 503 / 504 | {} / {} / {} / {} |", count(200), count(429), count(503), count(504));
    println!("| other status | {} |", if other.is_empty() { "0".to_string() } else { other.join(", ") });
    println!(
        "| connection errors | {errors}{} |",
        if error_kinds.is_empty() { String::new() } else { format!(" ({})", error_kinds.join(", ")) }
    );
    println!("| unanswered at the end | {} |", out.unfinished);
    let mut wrong_answers = Vec::new();
    for kind in Kind::ADVERSARIAL {
        let ends: Vec<String> = out
            .tally
            .attacks
            .iter()
            .filter(|((k, _), _)| *k == kind)
            .map(|((_, outcome), n)| {
                if !kind.acceptable(outcome) {
                    wrong_answers.push(format!("{}: {n} x {outcome}", kind.name()));
                }
                format!("{n} x {outcome}")
            })
            .collect();
        if !ends.is_empty() {
            let mut secs = out.tally.attack_latency.remove(&kind).unwrap_or_default();
            secs.sort_by(|a, b| a.total_cmp(b));
            println!(
                "| {} | {}; latency of answers p50 / p99 {:.0} / {:.0} ms |",
                kind.name(),
                ends.join(", "),
                percentile(&secs, 0.5) * 1e3,
                percentile(&secs, 0.99) * 1e3
            );
        }
    }
    println!(
        "| latency of 200s p50 / p99 / max | {:.0} / {:.0} / {:.0} ms |",
        percentile(&out.tally.latency, 0.5) * 1e3,
        percentile(&out.tally.latency, 0.99) * 1e3,
        out.tally.latency.last().copied().unwrap_or(f64::NAN) * 1e3
    );
    println!(
        "| latency of 429s p50 / p99 | {:.0} / {:.0} ms |",
        percentile(&out.tally.latency_429, 0.5) * 1e3,
        percentile(&out.tally.latency_429, 0.99) * 1e3
    );
    println!(
        "| max queue depth seen (/metrics every 250 ms) | {} (limit {}) |",
        out.max_depth.map_or("n/a".to_string(), |d| format!("{d:.0}")),
        s.queue
    );
    println!(
        "| RSS: before / peak / end of soak / cap | {} / {} / {} / {} ({}) |",
        mib(rss_before),
        mib(rss_peak),
        mib(rss_end),
        mib(cap_mib),
        if rss_ok { "under the cap" } else { "EXCEEDED" }
    );
    println!("| RSS every {step:.1} s from the soak's start (MiB) | {} |", rss_trace.join(", "));
    let kv_ok = out.max_kv_bytes.is_none_or(|b| b <= kv_budget as f64);
    println!(
        "| prompt KV: budget / largest seen (/metrics every 250 ms) / evictions | {kv_budget} / {} / {} bytes, evictions ({}) |",
        out.max_kv_bytes.map_or("n/a".to_string(), |b| format!("{b:.0}")),
        evictions.map_or("n/a".to_string(), |e| format!("{e:.0}")),
        if kv_ok { "within the budget" } else { "OVER THE BUDGET" }
    );
    println!("| task store after the soak | {} |", match &store {
        Ok(summary) => format!("consistent: {summary}"),
        Err(e) => format!("INCONSISTENT: {e}"),
    });
    println!(
        "| RSS after recovery, VmHWM (includes loading) | {} , {} |",
        mib(rss_after.map(|r| r.0)),
        mib(rss_after.map(|r| r.1))
    );
    println!(
        "| recovery | {}: queue depth {} after {drained_secs:.1} s; {}/{} reference requests 200 with the same label, max score difference {max_diff:.1e}; /health {health}{} |",
        if recovered { "OK" } else { "FAILED" },
        depth.map_or("n/a".to_string(), |d| format!("{d:.0}")),
        same,
        reference.len(),
        recovery_error.map(|e| format!("; {e}")).unwrap_or_default()
    );
    let mut failed = Vec::new();
    if !rss_ok {
        failed.push("RSS cap exceeded");
    }
    if !recovered {
        failed.push("recovery failed");
    }
    if !other.is_empty() {
        failed.push("answers other than 200/429/503/504");
    }
    if !kv_ok {
        failed.push("cached prompt keys/values over --kv-cache-bytes");
    }
    if let Err(e) = &store {
        eprintln!("soak: task store: {e}");
        failed.push("task store inconsistent after the soak");
    }
    if s.adversarial && !evictions.is_some_and(|e| e > 0.0) {
        failed.push("no prompt keys/values evicted (lower SOAK_KV_CACHE_BYTES)");
    }
    if !wrong_answers.is_empty() {
        eprintln!("soak: attacks answered wrongly: {}", wrong_answers.join("; "));
        failed.push("attacks not answered as they should be");
    }
    if failed.is_empty() {
        eprintln!("soak: passed");
    } else {
        eprintln!("soak: FAILED: {}", failed.join(", "));
        std::process::exit(1);
    }
}
