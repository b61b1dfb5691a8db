//! The server over real HTTP on 127.0.0.1 (ephemeral ports) with SmolLM2-135M and random
//! small prompts; the tiny llama fixture's adapter for the dimension mismatch.
//!
//! Reference answers come from the library's own entry points (`eval::generate::greedy`,
//! `eval::classify::label_log_likelihoods`) run directly on the same prompt and input.

mod common;
use common::*;
use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};
use softprompt::eval::classify::label_log_likelihoods;
use softprompt::eval::generate::{greedy, GenerateOptions};
use softprompt::load::{load_model, Model};
use softprompt_serve::registry::{write_task_folder, TaskMeta};
use softprompt_serve::{ServeConfig, Server};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../softprompt/tests/fixtures").join(name)
}

/// A random prompt `[n, D]` with small values (seeded).
fn random_prompt(model: &Model, n: usize, seed: u64) -> Tensor {
    let d = model.backbone.info().d_model;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let v: Vec<f32> = (0..n * d).map(|_| rng.random_range(-0.1f32..0.1)).collect();
    Tensor::from_vec(v, (n, d), &Device::Cpu).unwrap()
}

struct Fixture {
    dir: tempfile::TempDir,
    /// task -> prompts
    tasks: Vec<(String, Vec<Tensor>, TaskMeta)>,
}

/// Three tasks: `sent` (5 tokens, one-token labels, template), `yesno` (8 tokens, multi-token
/// labels), `ens` (ensemble of prompts of 4, 6 and 7 tokens, one-token labels).
fn three_tasks(model: &Model) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let sent = TaskMeta {
        template: Some("Review: {text}\nSentiment:".into()),
        labels: vec!["positive".into(), "negative".into()],
        verbalizer: vec![" positive".into(), " negative".into()],
        ..TaskMeta::default()
    };
    let yesno = TaskMeta {
        template: None,
        labels: vec!["yes".into(), "no".into()],
        verbalizer: vec![" absolutely yes, indeed".into(), " certainly not".into()],
        ..TaskMeta::default()
    };
    let ens = TaskMeta {
        template: Some("Q: {text}\nA:".into()),
        labels: vec!["good".into(), "bad".into(), "meh".into()],
        verbalizer: vec![" good".into(), " bad".into(), " meh".into()],
        ..TaskMeta::default()
    };
    let tasks = vec![
        ("sent".to_string(), vec![random_prompt(model, 5, 1)], sent),
        ("yesno".to_string(), vec![random_prompt(model, 8, 2)], yesno),
        (
            "ens".to_string(),
            vec![random_prompt(model, 4, 3), random_prompt(model, 6, 4), random_prompt(model, 7, 5)],
            ens,
        ),
    ];
    for (name, prompts, meta) in &tasks {
        write_task_folder(&dir.path().join(name), prompts, model, Some(meta)).unwrap();
    }
    Fixture { dir, tasks }
}

fn config(dir: &Path) -> ServeConfig {
    let mut cfg = ServeConfig::new(dir);
    cfg.addr = "127.0.0.1:0".parse().unwrap();
    cfg
}

fn request(addr: SocketAddr, method: &str, path: &str, body: Option<&[u8]>, token: Option<&str>) -> (u16, String) {
    softprompt_serve::client::request(addr, method, path, body, token).expect("HTTP request")
}

fn post(addr: SocketAddr, path: &str, body: &serde_json::Value) -> (u16, serde_json::Value) {
    let (status, text) = request(addr, "POST", path, Some(body.to_string().as_bytes()), None);
    (status, serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text}")))
}

fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    request(addr, "GET", path, None, None)
}

fn source(model: &Model, meta: &TaskMeta, input: &str) -> Vec<u32> {
    let text = match &meta.template {
        Some(t) => t.replace("{text}", input),
        None => input.to_string(),
    };
    model.tokenizer().unwrap().encode_input(&text).unwrap()
}

fn label_targets(model: &Model, meta: &TaskMeta) -> Vec<Vec<u32>> {
    meta.verbalizer.iter().map(|v| model.tokenizer().unwrap().encode(v).unwrap()).collect()
}

/// Library answer for one prompt: greedy tokens and each chosen token's log-probability.
fn library_generate(model: &Model, prompt: &Tensor, src: &[u32], max_new: usize) -> (Vec<u32>, Vec<f32>) {
    let opts = GenerateOptions { max_new_tokens: max_new, stop_at_eos: true };
    let g = greedy(&model.backbone, Some(prompt), &[src.to_vec()], &opts, &Device::Cpu).unwrap();
    let tokens = g.tokens[0].clone();
    let logprobs = tokens
        .iter()
        .zip(&g.step_logits)
        .map(|(&t, l)| {
            let lp = softprompt::model::ops::log_softmax_last_dim(l).unwrap();
            lp.get(0).unwrap().get(t as usize).unwrap().to_scalar::<f32>().unwrap()
        })
        .collect();
    (tokens, logprobs)
}


const INPUTS: [&str; 3] = [
    "a gripping, beautifully shot film",
    "dull",
    "the plot wanders for two hours and the jokes never land, though the cast tries hard",
];

#[test]
fn answers_equal_the_library() {
    let model = common::smollm2();
    let fx = three_tasks(&model);
    let server = Server::start(model.clone(), config(fx.dir.path())).unwrap();
    let addr = server.addr;
    let (status, tasks) = get(addr, "/v1/tasks");
    assert_eq!(status, 200);
    let tasks: serde_json::Value = serde_json::from_str(&tasks).unwrap();
    let names: Vec<&str> = tasks.as_array().unwrap().iter().map(|t| t["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["ens", "sent", "yesno"]);
    assert_eq!(tasks[0]["n_prompts"], 3);
    assert_eq!(tasks[1]["labels"], serde_json::json!(["positive", "negative"]));

    for (name, prompts, meta) in &fx.tasks {
        let input = INPUTS[2];
        let src = source(&model, meta, input);
        // Classification: the library's rank classification, per prompt, mean over prompts.
        let (status, got) = post(addr, "/v1/classify", &serde_json::json!({"task": name, "input": input}));
        assert_eq!(status, 200, "{got}");
        let targets = label_targets(&model, meta);
        // Batch size 1: no padding. (Batched, the library pads multi-token label rows between
        // the prompt and the input, which shifts their positions: PEFT's layout.)
        let per_prompt: Vec<Vec<f32>> = prompts
            .iter()
            .map(|p| label_log_likelihoods(&model.backbone, Some(p), std::slice::from_ref(&src), &targets, 1, &Device::Cpu).unwrap()[0].clone())
            .collect();
        for (l, label) in meta.labels.iter().enumerate() {
            let want = per_prompt.iter().map(|s| s[l]).sum::<f32>() / prompts.len() as f32;
            let have = got["scores"][label].as_f64().unwrap() as f32;
            assert!((want - have).abs() < 1e-4, "{name} {label}: server {have} vs library {want}");
        }
        let votes: u64 = meta.labels.iter().map(|l| got["votes"][l].as_u64().unwrap()).sum();
        assert_eq!(votes, prompts.len() as u64);
        for (j, s) in per_prompt.iter().enumerate() {
            assert_close(&format!("{name} prompt {j}"), &as_f32s(&got["per_prompt"][j]["scores"]), s, 1e-4);
        }

        // Generation (single-prompt tasks): the library's greedy with the KV cache.
        if prompts.len() == 1 {
            let (status, got) = post(
                addr,
                "/v1/generate",
                &serde_json::json!({"task": name, "input": input, "max_new_tokens": 8}),
            );
            assert_eq!(status, 200, "{got}");
            let (tokens, logprobs) = library_generate(&model, &prompts[0], &src, 8);
            assert_eq!(as_u32s(&got["tokens"]), tokens, "{name}: tokens");
            assert_close(&format!("{name} logprobs"), &as_f32s(&got["logprobs"]), &logprobs, 1e-4);
            let text = model.tokenizer().unwrap().decode(&tokens).unwrap();
            assert_eq!(got["text"].as_str().unwrap(), text);
        }
    }
    // Ensemble generation: every step averages the members' log-probabilities. With one
    // step, that is the mean of the library's first-step log-softmax over the prompts.
    let (name, prompts, meta) = &fx.tasks[2];
    let src = source(&model, meta, INPUTS[0]);
    let (status, got) = post(addr, "/v1/generate", &serde_json::json!({"task": name, "input": INPUTS[0], "max_new_tokens": 1}));
    assert_eq!(status, 200, "{got}");
    let opts = GenerateOptions { max_new_tokens: 1, stop_at_eos: true };
    let mut mean: Option<Tensor> = None;
    for p in prompts {
        let g = greedy(&model.backbone, Some(p), std::slice::from_ref(&src), &opts, &Device::Cpu).unwrap();
        let lp = softprompt::model::ops::log_softmax_last_dim(&g.step_logits[0]).unwrap().get(0).unwrap();
        mean = Some(match mean {
            None => lp,
            Some(m) => (m + lp).unwrap(),
        });
    }
    let mean = (mean.unwrap() / prompts.len() as f64).unwrap();
    let best = mean.argmax(0).unwrap().to_scalar::<u32>().unwrap();
    assert_eq!(as_u32s(&got["tokens"]), vec![best]);
    let want = mean.get(best as usize).unwrap().to_scalar::<f32>().unwrap();
    assert!((as_f32s(&got["logprobs"])[0] - want).abs() < 1e-4);
    server.shutdown().unwrap();
}

#[test]
fn mixed_batches_give_each_request_its_alone_answer() {
    let model = common::smollm2();
    let fx = three_tasks(&model);
    let mut cfg = config(fx.dir.path());
    cfg.batch.max_batch = 32;
    cfg.batch.max_wait = Duration::from_millis(300);
    // This test is about equal answers, not admission: on a loaded machine the 36 requests
    // at once would otherwise be refused (429 when the expected wait passes half the timeout).
    cfg.request_timeout = Duration::from_secs(900);
    let server = Server::start(model.clone(), cfg).unwrap();
    let addr = server.addr;
    // Every (task, input) pair, generate and classify, with inputs of different lengths.
    let mut jobs = Vec::new();
    for (name, _, _) in &fx.tasks {
        for input in INPUTS {
            jobs.push(("/v1/generate", serde_json::json!({"task": name, "input": input, "max_new_tokens": 6})));
            jobs.push(("/v1/classify", serde_json::json!({"task": name, "input": input})));
        }
    }
    // Alone: one request at a time (each is its own batch).
    let alone: Vec<serde_json::Value> = jobs
        .iter()
        .map(|(path, body)| {
            let (status, v) = post(addr, path, body);
            assert_eq!(status, 200, "{v}");
            v
        })
        .collect();
    let (_, m) = get(addr, "/metrics");
    assert!(m.contains("softprompt_batch_tasks_bucket{le=\"1\"} 18\n"), "{m}");
    // Together: all at once, so generations of three tasks share batches (and so do the
    // classifications).
    let handles: Vec<_> = jobs
        .iter()
        .cloned()
        .map(|(path, body)| std::thread::spawn(move || post(addr, path, &body)))
        .collect();
    let mixed: Vec<(u16, serde_json::Value)> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    for (((path, body), a), (status, m)) in jobs.iter().zip(&alone).zip(&mixed) {
        assert_eq!(*status, 200, "{m}");
        assert_same_answer(&format!("{path} {body}"), path, a, m);
    }
    // Some batch held more than one task.
    let (_, m) = get(addr, "/metrics");
    let line = |prefix: &str| -> u64 {
        m.lines().find(|l| l.starts_with(prefix)).and_then(|l| l.rsplit(' ').next()).unwrap().parse().unwrap()
    };
    let single = line("softprompt_batch_tasks_bucket{le=\"1\"}");
    let total = line("softprompt_batch_tasks_count");
    assert!(total > single, "no batch mixed tasks: {m}");
    assert!(m.contains("softprompt_queue_depth 0"));
    assert!(m.contains("softprompt_request_duration_seconds_bucket{endpoint=\"/v1/generate\",le=\"+Inf\"} 18"), "{m}");
    server.shutdown().unwrap();
}

#[test]
fn bad_requests_get_json_errors() {
    let model = common::smollm2();
    let fx = three_tasks(&model);
    let mut cfg = config(fx.dir.path());
    cfg.max_body_bytes = 64 << 10;
    cfg.max_new_tokens = 32;
    cfg.allow_writes = true;
    let server = Server::start(model.clone(), cfg).unwrap();
    let addr = server.addr;
    let error = |status: u16, text: &str| -> (u16, String) {
        let v: serde_json::Value = serde_json::from_str(text).unwrap_or_else(|_| panic!("not JSON: {text}"));
        (status, v["error"].as_str().unwrap_or_else(|| panic!("no error field: {text}")).to_string())
    };
    let (s, t) = request(addr, "POST", "/v1/generate", Some(b"{\"task\": \"sent\", \"input\": "), None);
    let (s, msg) = error(s, &t);
    assert_eq!(s, 400);
    assert!(msg.contains("invalid JSON"), "{msg}");
    let (s, t) = request(addr, "POST", "/v1/generate", Some(br#"{"task": "sent", "input": "x", "max_tokens": 3}"#), None);
    assert_eq!(error(s, &t).0, 400);
    let (s, t) = request(addr, "POST", "/v1/classify", Some(br#"{"task": "nope", "input": "x"}"#), None);
    let (s, msg) = error(s, &t);
    assert_eq!(s, 404);
    assert!(msg.contains("nope"), "{msg}");
    let (s, t) = request(addr, "POST", "/v1/generate", Some(br#"{"task": "sent", "input": "x", "max_new_tokens": 33}"#), None);
    let (s, msg) = error(s, &t);
    assert_eq!(s, 400);
    assert!(msg.contains("max_new_tokens"), "{msg}");
    let big = serde_json::json!({"task": "sent", "input": "x".repeat(100_000)}).to_string();
    let (s, t) = request(addr, "POST", "/v1/generate", Some(big.as_bytes()), None);
    assert_eq!(error(s, &t).0, 413);
    let (s, t) = request(addr, "GET", "/v1/nothing", None, None);
    assert_eq!(error(s, &t).0, 404);
    let (s, t) = request(addr, "DELETE", "/v1/tasks/nope", None, None);
    assert_eq!(error(s, &t).0, 404);

    // An adapter made for another model (the tiny llama fixture, D = 16 or so) is refused.
    let tiny = fixture("llama-tiny/adapter");
    let bytes = std::fs::read(tiny.join("adapter_model.safetensors")).unwrap();
    let body = serde_json::json!({"prompt": base64_encode(&bytes)}).to_string();
    let (s, t) = request(addr, "PUT", "/v1/tasks/tiny", Some(body.as_bytes()), None);
    let (s, msg) = error(s, &t);
    assert_eq!(s, 400);
    assert!(msg.contains("hidden size"), "{msg}");
    let body = serde_json::json!({"prompt": [[0.1, 0.2], [0.3, 0.4]]}).to_string();
    let (s, t) = request(addr, "PUT", "/v1/tasks/tiny", Some(body.as_bytes()), None);
    assert_eq!(error(s, &t).0, 400);
    let body = serde_json::json!({"prompt": [[0.1, 0.2], [0.3]]}).to_string();
    let (s, t) = request(addr, "PUT", "/v1/tasks/tiny", Some(body.as_bytes()), None);
    assert_eq!(error(s, &t).0, 400);
    let (s, t) = request(addr, "PUT", "/v1/tasks/..", Some(b"{}"), None);
    assert!(s == 400 || s == 404, "{s} {t}");
    assert!(!fx.dir.path().join("tiny").exists());
    let leftovers: Vec<_> = std::fs::read_dir(fx.dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(leftovers.len(), 3, "{leftovers:?}");
    // A task without labels cannot classify.
    let d = model.backbone.info().d_model;
    let body = serde_json::json!({"prompt": vec![vec![0.01f32; d]; 2]}).to_string();
    let (s, t) = request(addr, "PUT", "/v1/tasks/plain", Some(body.as_bytes()), None);
    assert_eq!(s, 201, "{t}");
    let (s, t) = request(addr, "POST", "/v1/classify", Some(br#"{"task": "plain", "input": "x"}"#), None);
    let (s, msg) = error(s, &t);
    assert_eq!(s, 400);
    assert!(msg.contains("no labels"), "{msg}");
    let (s, _) = get(addr, "/health");
    assert_eq!(s, 200);
    server.shutdown().unwrap();

    // A folder holding the fixture's adapter is skipped at start-up and listed, with the
    // reason, under `GET /v1/tasks?errors`.
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&tiny, &dir.path().join("tiny"));
    let server = Server::start(model.clone(), config(dir.path())).unwrap();
    let (s, errors) = get(server.addr, "/v1/tasks?errors");
    assert_eq!(s, 200, "{errors}");
    assert!(errors.contains("\"tiny\"") && errors.contains("token_dim"), "{errors}");
    server.shutdown().unwrap();
    // A model without a tokenizer (the tiny fixtures) cannot be served.
    let tiny_model = Arc::new(load_model(&fixture("llama-tiny"), &Device::Cpu).unwrap());
    let err = Server::start(tiny_model, config(tempfile::tempdir().unwrap().path())).err().expect("must refuse");
    assert!(err.to_string().contains("tokenizer"), "{err}");
}

#[test]
fn upload_list_delete() {
    let model = common::smollm2();
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.token = Some("s3cret".into());
    let server = Server::start(model.clone(), cfg).unwrap();
    let addr = server.addr;
    let (s, _) = get(addr, "/health");
    assert_eq!(s, 200, "health needs no token");
    let (s, t) = get(addr, "/v1/tasks");
    assert_eq!(s, 401, "{t}");
    assert!(t.contains("error"));
    let (s, _) = request(addr, "GET", "/v1/tasks", None, Some("wrong"));
    assert_eq!(s, 401);
    let (s, t) = request(addr, "GET", "/v1/tasks", None, Some("s3cret"));
    assert_eq!((s, t.as_str()), (200, "[]"));

    // One prompt as float rows, with task.json fields.
    let p = random_prompt(&model, 3, 7);
    let rows = p.to_vec2::<f32>().unwrap();
    let meta = serde_json::json!({"template": "Review: {text}\nSentiment:", "labels": ["pos", "neg"], "verbalizer": [" positive", " negative"]});
    let body = serde_json::json!({"prompt": rows, "task": meta}).to_string();
    let (s, t) = request(addr, "PUT", "/v1/tasks/up", Some(body.as_bytes()), Some("s3cret"));
    assert_eq!(s, 201, "{t}");
    let saved = softprompt::prompt::PeftAdapter::load(&dir.path().join("up"), &Device::Cpu).unwrap();
    assert_eq!(saved.prompt.to_vec2::<f32>().unwrap(), rows);
    assert!(dir.path().join("up/task.json").is_file());
    // An ensemble as base64 safetensors, replacing nothing.
    let st = |t: &Tensor| {
        let bytes = safetensors::serialize([("prompt_embeddings", t)], None).unwrap();
        serde_json::Value::String(base64_encode(&bytes))
    };
    let q = random_prompt(&model, 4, 8);
    let body = serde_json::json!({"prompts": [st(&p), st(&q)], "task": meta}).to_string();
    let (s, t) = request(addr, "PUT", "/v1/tasks/duo", Some(body.as_bytes()), Some("s3cret"));
    assert_eq!(s, 201, "{t}");
    let v: serde_json::Value = serde_json::from_str(&t).unwrap();
    assert_eq!(v["n_prompts"], 2);
    assert_eq!(v["prompt_tokens"], serde_json::json!([3, 4]));
    let (s, t) = request(addr, "GET", "/v1/tasks", None, Some("s3cret"));
    assert_eq!(s, 200);
    let v: serde_json::Value = serde_json::from_str(&t).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 2);
    assert_eq!(v[1]["name"], "up");
    assert_eq!(v[1]["labels"], serde_json::json!(["pos", "neg"]));
    // Classify through the uploaded task; replace it (200) and it is still served.
    let cls = br#"{"task": "up", "input": "great"}"#;
    let (s, t) = request(addr, "POST", "/v1/classify", Some(cls), Some("s3cret"));
    assert_eq!(s, 200, "{t}");
    let (s, t) = request(addr, "PUT", "/v1/tasks/up", Some(body.as_bytes()), Some("s3cret"));
    assert_eq!(s, 200, "{t}");
    assert!(dir.path().join("up/p1/adapter_config.json").is_file());
    // The folder reloads as it was served.
    let (s, t) = request(addr, "DELETE", "/v1/tasks/up", None, Some("s3cret"));
    assert_eq!(s, 200, "{t}");
    assert!(!dir.path().join("up").exists());
    let (s, _) = request(addr, "POST", "/v1/classify", Some(cls), Some("s3cret"));
    assert_eq!(s, 404);
    let (s, _) = request(addr, "DELETE", "/v1/tasks/up", None, Some("s3cret"));
    assert_eq!(s, 404);
    let (s, t) = request(addr, "GET", "/openapi.json", None, Some("s3cret"));
    assert_eq!(s, 200);
    let doc: serde_json::Value = serde_json::from_str(&t).unwrap();
    assert_eq!(doc["openapi"], "3.0.3");
    for path in ["/v1/generate", "/v1/classify", "/v1/tasks", "/v1/tasks/{name}", "/health", "/metrics"] {
        assert!(doc["paths"].get(path).is_some(), "{path}");
    }
    server.shutdown().unwrap();
    // A restarted server finds the uploaded task.
    let server = Server::start(model.clone(), config(dir.path())).unwrap();
    let (s, t) = get(server.addr, "/v1/tasks");
    assert_eq!(s, 200);
    assert!(t.contains("\"duo\""), "{t}");
    server.shutdown().unwrap();
}

#[test]
fn floods_timeouts_and_shutdown() {
    let model = common::smollm2();
    let fx = three_tasks(&model);
    let mut cfg = config(fx.dir.path());
    cfg.batch.max_batch = 2;
    cfg.batch.max_wait = Duration::from_millis(0);
    cfg.batch.queue = 3;
    let server = Server::start(model.clone(), cfg).unwrap();
    let addr = server.addr;
    let handles: Vec<_> = (0..40)
        .map(|i| {
            std::thread::spawn(move || {
                post(addr, "/v1/generate", &serde_json::json!({"task": "sent", "input": INPUTS[i % 3], "max_new_tokens": 4}))
            })
        })
        .collect();
    let results: Vec<(u16, serde_json::Value)> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let ok = results.iter().filter(|r| r.0 == 200).count();
    let full = results.iter().filter(|r| r.0 == 429).count();
    assert_eq!(ok + full, 40, "{results:?}");
    assert!(ok >= 1 && full >= 1, "ok {ok}, 429 {full}");
    assert!(results.iter().filter(|r| r.0 == 429).all(|r| r.1["error"].as_str().unwrap().contains("queue is full")));
    let (s, _) = get(addr, "/health");
    assert_eq!(s, 200);
    let (s, v) = post(addr, "/v1/generate", &serde_json::json!({"task": "sent", "input": "x", "max_new_tokens": 2}));
    assert_eq!(s, 200, "{v}");
    let (_, m) = get(addr, "/metrics");
    assert!(m.contains(&format!("softprompt_rejected_total {full}")), "{m}");

    // Graceful shutdown: a request in flight when the server is told to stop still gets its answer.
    let inflight = std::thread::spawn(move || {
        post(addr, "/v1/generate", &serde_json::json!({"task": "yesno", "input": INPUTS[2], "max_new_tokens": 24}))
    });
    std::thread::sleep(Duration::from_millis(150));
    server.shutdown().unwrap();
    let (s, v) = inflight.join().unwrap();
    assert_eq!(s, 200, "{v}");
    assert!(TcpStream::connect(addr).is_err(), "still listening after shutdown");

    // Per-request timeout: 504, and the server stays up.
    let mut cfg = config(fx.dir.path());
    cfg.request_timeout = Duration::from_millis(30);
    let server = Server::start(model.clone(), cfg).unwrap();
    let (s, v) = post(server.addr, "/v1/generate", &serde_json::json!({"task": "sent", "input": INPUTS[2], "max_new_tokens": 64}));
    assert_eq!(s, 504, "{v}");
    let (s, _) = get(server.addr, "/health");
    assert_eq!(s, 200);
    server.shutdown().unwrap();
}

fn base64_encode(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}
