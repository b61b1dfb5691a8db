//! Load generator: starts the server in-process on loopback with SmolLM2-135M and K random
//! prompts, drives `/v1/generate` with concurrent clients for a bounded time, and prints
//! throughput and latency for 1, 4 and 16 tasks, with mixed-task batching versus
//! one-task-at-a-time batching.
//!
//! `cargo bench -p softprompt-serve --bench loadgen` (or, without a release build,
//! `cargo test -p softprompt-serve --bench loadgen`). Environment overrides:
//! `LOADGEN_SECS` (per scenario, default 8), `LOADGEN_CLIENTS` (default 16),
//! `LOADGEN_TOKENS` (max_new_tokens, default 8), `LOADGEN_MAX_BATCH` (default 16),
//! `LOADGEN_REUSE` (1: prompt keys/values computed once per prompt, the server's default;
//! 0: every batch runs the prompts again), `LOADGEN_TASKS` (comma-separated task counts,
//! default `1,4,16`). The prefill columns are the server's
//! `softprompt_prefill_tokens_total`: positions run through the model, and prompt positions
//! taken from cached keys/values.

use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};
use softprompt_serve::client::{post_json, request};
use softprompt_serve::registry::write_task_folder;
use softprompt_serve::{ServeConfig, Server};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn env(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

const INPUTS: [&str; 4] = [
    "The movie was",
    "Write a short note about the weather today:",
    "Translate to French: good morning",
    "A list of three fruits:",
];

struct Row {
    tasks: usize,
    mixed: bool,
    ok: usize,
    rejected: usize,
    tokens: usize,
    secs: f64,
    p50: f64,
    p99: f64,
    mean_batch: f64,
    mean_batch_tasks: f64,
    prefill_computed: f64,
    prefill_reused: f64,
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

fn main() {
    let secs = env("LOADGEN_SECS", 8) as u64;
    let clients = env("LOADGEN_CLIENTS", 16);
    let max_new = env("LOADGEN_TOKENS", 8);
    let max_batch = env("LOADGEN_MAX_BATCH", 16);
    let reuse = env("LOADGEN_REUSE", 1) != 0;
    let task_counts: Vec<usize> = std::env::var("LOADGEN_TASKS")
        .ok()
        .map(|v| v.split(',').filter_map(|x| x.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![1, 4, 16]);
    let path = softprompt::fetch::smollm2().expect("SmolLM2 (softprompt fetch smollm2)");
    let model = Arc::new(softprompt::load::load_model(&path, &Device::Cpu).expect("load SmolLM2"));
    let d = model.backbone.info().d_model;
    let dir = tempfile::tempdir().expect("temp dir");
    let mut rng = rand::rngs::StdRng::seed_from_u64(0);
    for k in 0..16 {
        let n = 4 + (k % 5) * 4; // prompt lengths 4..20
        let v: Vec<f32> = (0..n * d).map(|_| rng.random_range(-0.1f32..0.1)).collect();
        let p = Tensor::from_vec(v, (n, d), &Device::Cpu).expect("prompt");
        write_task_folder(&dir.path().join(format!("t{k:02}")), &[p], &model, None).expect("write task");
    }
    eprintln!(
        "loadgen: SmolLM2-135M, {clients} clients, {secs} s per scenario, max_new_tokens {max_new}, max_batch {max_batch}, max_wait 5 ms, prompt KV reuse {}",
        if reuse { "on" } else { "off" }
    );
    let mut rows = Vec::new();
    for tasks in task_counts {
        for mixed in [true, false] {
            let mut cfg = ServeConfig::new(dir.path());
            cfg.addr = "127.0.0.1:0".parse().expect("addr");
            cfg.batch.max_batch = max_batch;
            cfg.batch.max_wait = Duration::from_millis(5);
            cfg.batch.queue = 4 * clients;
            cfg.batch.one_task_per_batch = !mixed;
            cfg.batch.reuse_prompt_kv = reuse;
            cfg.request_timeout = Duration::from_secs(120);
            let server = Server::start(model.clone(), cfg).expect("start server");
            let addr = server.addr;
            let start = Instant::now();
            let stop_at = start + Duration::from_secs(secs);
            let handles: Vec<_> = (0..clients)
                .map(|c| {
                    std::thread::spawn(move || {
                        let mut lat = Vec::new();
                        let (mut tokens, mut rejected, mut i) = (0usize, 0usize, c);
                        while Instant::now() < stop_at {
                            let body = serde_json::json!({
                                "task": format!("t{:02}", i % tasks),
                                "input": INPUTS[(i / tasks) % INPUTS.len()],
                                "max_new_tokens": max_new,
                            });
                            i += clients;
                            let t0 = Instant::now();
                            match post_json(addr, "/v1/generate", &body) {
                                Ok((200, v)) => {
                                    lat.push(t0.elapsed().as_secs_f64());
                                    tokens += v["tokens"].as_array().map(Vec::len).unwrap_or(0);
                                }
                                Ok((429, _)) => rejected += 1,
                                Ok((s, v)) => panic!("status {s}: {v}"),
                                Err(e) => panic!("{e}"),
                            }
                        }
                        (lat, tokens, rejected)
                    })
                })
                .collect();
            let mut lat = Vec::new();
            let (mut tokens, mut rejected) = (0, 0);
            for h in handles {
                let (l, t, r) = h.join().expect("client thread");
                lat.extend(l);
                tokens += t;
                rejected += r;
            }
            let elapsed = start.elapsed().as_secs_f64();
            let (_, m) = request(addr, "GET", "/metrics", None, None).expect("metrics");
            server.shutdown().expect("shutdown");
            lat.sort_by(|a, b| a.total_cmp(b));
            let pct = |q: f64| -> f64 {
                if lat.is_empty() {
                    return f64::NAN;
                }
                let i = ((lat.len() as f64 * q).ceil() as usize).clamp(1, lat.len()) - 1;
                lat[i] * 1000.0
            };
            let batches = metric(&m, "softprompt_batch_size_count").max(1.0);
            let row = Row {
                tasks,
                mixed,
                ok: lat.len(),
                rejected,
                tokens,
                secs: elapsed,
                p50: pct(0.5),
                p99: pct(0.99),
                mean_batch: metric(&m, "softprompt_batch_size_sum") / batches,
                mean_batch_tasks: metric(&m, "softprompt_batch_tasks_sum") / batches,
                prefill_computed: metric(&m, "softprompt_prefill_tokens_total{source=\"computed\"}"),
                prefill_reused: metric(&m, "softprompt_prefill_tokens_total{source=\"reused\"}"),
            };
            eprintln!(
                "  {} tasks, {}: {} requests, {:.2} req/s",
                tasks,
                if mixed { "mixed" } else { "one task per batch" },
                row.ok,
                row.ok as f64 / row.secs
            );
            rows.push(row);
        }
    }
    println!();
    println!("| tasks | batching | requests | 429s | req/s | tokens/s | p50 ms | p99 ms | mean batch | tasks/batch | prefill computed | prefill reused |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    for r in &rows {
        println!(
            "| {} | {} | {} | {} | {:.2} | {:.1} | {:.0} | {:.0} | {:.1} | {:.2} | {:.0} | {:.0} |",
            r.tasks,
            if r.mixed { "mixed tasks" } else { "one task per batch" },
            r.ok,
            r.rejected,
            r.ok as f64 / r.secs,
            r.tokens as f64 / r.secs,
            r.p50,
            r.p99,
            r.mean_batch,
            r.mean_batch_tasks,
            r.prefill_computed,
            r.prefill_reused
        );
    }
}
