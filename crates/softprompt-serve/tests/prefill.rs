//! Prompt keys/values computed once per prompt and reused by every batch (see
//! `softprompt_serve::engine`), over real HTTP on 127.0.0.1 with the tiny Llama (Hugging Face
//! rope layout: halves) and GPT-2 (absolute positions) fixtures, each given a word-level
//! tokenizer (`w{i}` is token `i`). The GGUF rope layout (adjacent pairs) is covered by
//! tests/http.rs on SmolLM2, whose server reuses prompt keys/values by default.
//!
//! References: the same server with reuse off; the library's entry points on each row alone
//! (batch 1, so no padding: `eval::generate::greedy`, `eval::classify::label_log_likelihoods`);
//! for `prompt_after_bos`, the task folder written by the trainer and `softprompt eval`'s
//! path (`prefix_after_bos`, a tokenizer without BOS, `eval::report`); for the key rotation, the
//! model run with the inputs placed later.

mod common;
use common::*;
use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};
use softprompt::batch::Example;
use softprompt::eval::classify::label_log_likelihoods;
use softprompt::eval::generate::{greedy, GenerateOptions};
use softprompt::eval::report::{classify, generate_tokens, Decoding, Mode};
use softprompt::load::{load_model, Model};
use softprompt::model::{Backbone, CausalLm, KvCache, LogitsAt};
use softprompt::prompt::{prefix_after_bos, PeftAdapter, PromptInit};
use softprompt::task::{ClassificationTask, LabeledText};
use softprompt::train::trainer::{train, TrainConfig};
use softprompt_serve::registry::{write_task_folder, TaskMeta};
use softprompt_serve::{ServeConfig, Server};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// mistral-tiny: a sliding window of 4, shorter than the rows, so reuse must not put pads
/// between a prompt and its input.
const MODELS: [&str; 3] = ["llama-tiny", "gpt2-tiny", "mistral-tiny"];

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../softprompt/tests/fixtures").join(name)
}

/// The fixture model `name` copied to `root/name` with a word-level `tokenizer.json`: the
/// model's special tokens (llama-tiny: 0 `<unk>`, 1 `<s>` = BOS, 2 `</s>` = EOS/pad;
/// gpt2-tiny: 255 `<|endoftext|>`) and `w{i}` for every other id below 256.
fn word_model(root: &Path, name: &str) -> Model {
    let dir = root.join(name);
    if !dir.join("tokenizer.json").is_file() {
        std::fs::create_dir_all(&dir).unwrap();
        for f in ["config.json", "generation_config.json", "model.safetensors"] {
            std::fs::copy(fixture(name).join(f), dir.join(f)).unwrap();
        }
        let specials: Vec<(u32, &str)> =
            if name == "gpt2-tiny" { vec![(255, "<|endoftext|>")] } else { vec![(0, "<unk>"), (1, "<s>"), (2, "</s>")] };
        let tok = common::word_level::word_level_json(&specials, 256);
        std::fs::write(dir.join("tokenizer.json"), tok).unwrap();
    }
    load_model(&dir, &Device::Cpu).unwrap()
}

/// A random prompt `[n, D]` on the fixtures' scale (seeded).
fn random_prompt(model: &Model, n: usize, seed: u64) -> Tensor {
    let d = model.backbone.info().d_model;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let v: Vec<f32> = (0..n * d).map(|_| rng.random_range(-0.8f32..0.8)).collect();
    Tensor::from_vec(v, (n, d), &Device::Cpu).unwrap()
}

fn causal(model: &Model) -> &dyn CausalLm {
    match &model.backbone {
        Backbone::Causal(m) => m.as_ref(),
        Backbone::Seq2Seq(_) => panic!("decoder-only fixture expected"),
    }
}

fn config(dir: &Path) -> ServeConfig {
    let mut cfg = ServeConfig::new(dir);
    cfg.addr = "127.0.0.1:0".parse().unwrap();
    cfg
}

fn request(addr: SocketAddr, method: &str, path: &str, body: Option<&[u8]>) -> (u16, String) {
    softprompt_serve::client::request(addr, method, path, body, None).expect("HTTP request")
}

fn post(addr: SocketAddr, path: &str, body: &serde_json::Value) -> (u16, serde_json::Value) {
    let (status, text) = request(addr, "POST", path, Some(body.to_string().as_bytes()));
    (status, serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text}")))
}

/// A sample of the Prometheus text (`name` with its labels, as printed).
fn metric(addr: SocketAddr, name: &str) -> u64 {
    let (_, m) = request(addr, "GET", "/metrics", None);
    m.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in {m}"))
}

/// `(computed, reused)` prefill positions so far.
fn prefill(addr: SocketAddr) -> (u64, u64) {
    (
        metric(addr, "softprompt_prefill_tokens_total{source=\"computed\"}"),
        metric(addr, "softprompt_prefill_tokens_total{source=\"reused\"}"),
    )
}


fn format(meta: &TaskMeta, input: &str) -> String {
    match &meta.template {
        Some(t) => t.replace("{text}", input),
        None => input.to_string(),
    }
}

fn meta(template: Option<&str>, labels: &[&str], verbalizer: &[&str]) -> TaskMeta {
    TaskMeta {
        template: template.map(str::to_string),
        labels: labels.iter().map(|s| s.to_string()).collect(),
        verbalizer: verbalizer.iter().map(|s| s.to_string()).collect(),
        ..TaskMeta::default()
    }
}

/// Three tasks with prompts of different lengths: `one` (3 tokens, template, one-word
/// labels), `multi` (6 tokens, labels of 1 to 3 words), `ens` (an ensemble of 2, 5 and 7).
fn three_tasks(model: &Model, dir: &Path) -> Vec<(String, Vec<Tensor>, TaskMeta)> {
    let tasks = vec![
        ("one".to_string(), vec![random_prompt(model, 3, 1)], meta(Some("w5 {text} w6"), &["x", "y"], &["w10", "w11"])),
        (
            "multi".to_string(),
            vec![random_prompt(model, 6, 2)],
            meta(None, &["x", "y", "z"], &["w20 w21", "w22", "w23 w24 w25"]),
        ),
        (
            "ens".to_string(),
            vec![random_prompt(model, 2, 3), random_prompt(model, 5, 4), random_prompt(model, 7, 5)],
            meta(Some("{text} w7"), &["a", "b"], &["w30", "w31"]),
        ),
    ];
    for (name, prompts, meta) in &tasks {
        write_task_folder(&dir.join(name), prompts, model, Some(meta)).unwrap();
    }
    tasks
}

/// Inputs of 2, 5 and 4 words. On GPT-2 (no BOS) `one` with the second and `multi` with the
/// third are both 10 positions long, so their generations share a batch although their
/// prompts differ (3 and 6 tokens).
const INPUTS: [&str; 3] = ["w40 w41", "w42 w43 w44 w45 w46", "w47 w48 w49 w50"];

/// Every (task, input) pair, generate and classify, all at once.
fn jobs(tasks: &[(String, Vec<Tensor>, TaskMeta)]) -> Vec<(&'static str, serde_json::Value)> {
    let mut jobs = Vec::new();
    for (name, _, _) in tasks {
        for input in INPUTS {
            jobs.push(("/v1/generate", serde_json::json!({"task": name, "input": input, "max_new_tokens": 5})));
            jobs.push(("/v1/classify", serde_json::json!({"task": name, "input": input})));
        }
    }
    jobs
}

fn run_together(addr: SocketAddr, jobs: &[(&'static str, serde_json::Value)]) -> Vec<serde_json::Value> {
    let handles: Vec<_> = jobs
        .iter()
        .cloned()
        .map(|(path, body)| std::thread::spawn(move || post(addr, path, &body)))
        .collect();
    handles
        .into_iter()
        .map(|h| {
            let (status, v) = h.join().unwrap();
            assert_eq!(status, 200, "{v}");
            v
        })
        .collect()
}

#[test]
fn reuse_gives_the_answers_of_no_reuse_and_of_each_row_alone() {
    let root = tempfile::tempdir().unwrap();
    for name in MODELS {
        let model = Arc::new(word_model(root.path(), name));
        let dir = tempfile::tempdir().unwrap();
        let tasks = three_tasks(&model, dir.path());
        let jobs = jobs(&tasks);
        let mut answers = Vec::new();
        for reuse in [true, false] {
            let mut cfg = config(dir.path());
            cfg.batch.max_batch = 64;
            cfg.batch.max_wait = Duration::from_millis(300);
            cfg.batch.reuse_prompt_kv = reuse;
            let server = Server::start(model.clone(), cfg).unwrap();
            answers.push(run_together(server.addr, &jobs));
            let (computed, reused) = prefill(server.addr);
            eprintln!("{name}, reuse {reuse}: prefill positions computed {computed}, reused {reused}");
            if reuse {
                assert!(reused > 0 && computed > 0);
                // Some batch held more than one task.
                let single = metric(server.addr, "softprompt_batch_tasks_bucket{le=\"1\"}");
                let total = metric(server.addr, "softprompt_batch_tasks_count");
                assert!(total > single, "{name}: no batch mixed tasks");
            } else {
                assert_eq!(reused, 0);
            }
            server.shutdown().unwrap();
        }
        let tok = model.tokenizer().unwrap();
        for (((path, body), on), off) in jobs.iter().zip(&answers[0]).zip(&answers[1]) {
            let what = format!("{name} {path} {body}");
            let (task, input) = (body["task"].as_str().unwrap(), body["input"].as_str().unwrap());
            let (_, prompts, meta) = tasks.iter().find(|t| t.0 == task).unwrap();
            let src = tok.encode_input(&format(meta, input)).unwrap();
            if *path == "/v1/generate" {
                assert_eq!(as_u32s(&on["tokens"]), as_u32s(&off["tokens"]), "{what}: tokens");
                assert_close(&what, &as_f32s(&on["logprobs"]), &as_f32s(&off["logprobs"]), 1e-4);
                assert_eq!(on["text"], off["text"], "{what}");
                if prompts.len() == 1 {
                    let opts = GenerateOptions { max_new_tokens: 5, stop_at_eos: true };
                    let g = greedy(&model.backbone, Some(&prompts[0]), std::slice::from_ref(&src), &opts, &Device::Cpu).unwrap();
                    assert_eq!(as_u32s(&on["tokens"]), g.tokens[0], "{what}: library tokens");
                    let lp: Vec<f32> = g.tokens[0]
                        .iter()
                        .zip(&g.step_logits)
                        .map(|(&t, l)| {
                            let l = softprompt::model::ops::log_softmax_last_dim(l).unwrap();
                            l.get(0).unwrap().get(t as usize).unwrap().to_scalar::<f32>().unwrap()
                        })
                        .collect();
                    assert_close(&format!("{what} vs library"), &as_f32s(&on["logprobs"]), &lp, 1e-4);
                    assert_eq!(on["text"].as_str().unwrap(), tok.decode(&g.tokens[0]).unwrap());
                }
            } else {
                assert_eq!(on["label"], off["label"], "{what}");
                for (label, s) in on["scores"].as_object().unwrap() {
                    let (x, y) = (s.as_f64().unwrap(), off["scores"][label].as_f64().unwrap());
                    assert!((x - y).abs() < 1e-4, "{what} {label}: {x} vs {y}");
                }
                let targets: Vec<Vec<u32>> = meta.verbalizer.iter().map(|v| tok.encode(v).unwrap()).collect();
                for (j, p) in prompts.iter().enumerate() {
                    let want = label_log_likelihoods(&model.backbone, Some(p), std::slice::from_ref(&src), &targets, 1, &Device::Cpu)
                        .unwrap()
                        .remove(0);
                    assert_close(&format!("{what} prompt {j} vs library"), &as_f32s(&on["per_prompt"][j]["scores"]), &want, 1e-4);
                }
            }
        }
    }
}

#[test]
fn prompt_keys_values_are_computed_once_per_task_and_dropped_with_it() {
    let root = tempfile::tempdir().unwrap();
    for name in MODELS {
        let model = Arc::new(word_model(root.path(), name));
        let tok = model.tokenizer().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let cls = meta(None, &["x", "y"], &["w10", "w11"]);
        write_task_folder(&dir.path().join("t"), &[random_prompt(&model, 4, 9)], &model, Some(&cls)).unwrap();
        let multi = meta(None, &["x", "y", "z"], &["w20 w21", "w22", "w23 w24 w25"]);
        write_task_folder(&dir.path().join("m"), &[random_prompt(&model, 5, 10)], &model, Some(&multi)).unwrap();
        let server = Server::start(model.clone(), config(dir.path())).unwrap();
        let addr = server.addr;
        let s = tok.encode_input(INPUTS[1]).unwrap().len() as u64;
        let classify = |task: &str| {
            let (status, v) = post(addr, "/v1/classify", &serde_json::json!({"task": task, "input": INPUTS[1]}));
            assert_eq!(status, 200, "{v}");
            v
        };
        assert_eq!(prefill(addr), (0, 0));
        // First request: the prompt (4) runs once, alone, then only the input.
        let first = classify("t");
        assert_eq!(prefill(addr), (4 + s, 4), "{name}");
        // Later requests: only the input.
        let again = classify("t");
        assert_eq!(prefill(addr), (4 + 2 * s, 8), "{name}");
        assert_eq!(first["scores"], again["scores"]);
        let (status, v) = post(addr, "/v1/generate", &serde_json::json!({"task": "t", "input": INPUTS[1], "max_new_tokens": 3}));
        assert_eq!(status, 200, "{v}");
        assert_eq!(prefill(addr), (4 + 3 * s, 12), "{name}: generation prefills the input only");
        // Multi-token labels: one row per label, all from the one cached prompt (5).
        classify("m");
        let rows: u64 = multi.verbalizer.iter().map(|v| s + tok.encode(v).unwrap().len() as u64).sum();
        assert_eq!(prefill(addr), (4 + 3 * s + 5 + rows, 12 + 3 * 5), "{name}");
        // Replacing the task drops its cache: the new prompt (6) is computed on first use.
        let before = prefill(addr);
        let p = random_prompt(&model, 6, 11).to_vec2::<f32>().unwrap();
        let body = serde_json::json!({"prompt": p, "task": {"labels": ["x", "y"], "verbalizer": ["w10", "w11"]}});
        let (status, t) = request(addr, "PUT", "/v1/tasks/t", Some(body.to_string().as_bytes()));
        assert_eq!(status, 200, "{t}");
        let replaced = classify("t");
        assert_eq!(prefill(addr), (before.0 + 6 + s, before.1 + 6), "{name}");
        assert_ne!(replaced["scores"], first["scores"]);
        // So does deleting it; an upload under the same name starts afresh.
        let (status, t) = request(addr, "DELETE", "/v1/tasks/t", None);
        assert_eq!(status, 200, "{t}");
        let (status, t) = request(addr, "PUT", "/v1/tasks/t", Some(body.to_string().as_bytes()));
        assert_eq!(status, 201, "{t}");
        let before = prefill(addr);
        let back = classify("t");
        assert_eq!(prefill(addr), (before.0 + 6 + s, before.1 + 6), "{name}");
        assert_eq!(back["scores"], replaced["scores"]);
        server.shutdown().unwrap();
    }
}

/// `shift_cache`: keys of inputs run at positions `0..N-1`, moved by `k`, are the keys of the
/// same inputs run at `k..k+N-1` (after `k` masked positions); GPT-2 refuses.
#[test]
fn shifted_keys_equal_keys_computed_later() {
    let root = tempfile::tempdir().unwrap();
    let model = word_model(root.path(), "llama-tiny");
    let m = causal(&model);
    let n_layers = m.info().n_layers;
    let (n, k) = (5, 7);
    let x = random_prompt(&model, n, 21).unsqueeze(0).unwrap(); // [1, N, D]
    let mut alone = KvCache::new(n_layers);
    m.forward(&x, &Tensor::ones((1, n), candle_core::DType::F32, &Device::Cpu).unwrap(), Some(&mut alone), LogitsAt::Last).unwrap();
    let later_x = x.pad_with_zeros(1, k, 0).unwrap(); // [1, K+N, D]
    let mask: Vec<f32> = (0..k + n).map(|j| if j < k { 0. } else { 1. }).collect();
    let mut later = KvCache::new(n_layers);
    m.forward(&later_x, &Tensor::from_vec(mask, (1, k + n), &Device::Cpu).unwrap(), Some(&mut later), LogitsAt::Last).unwrap();
    let mut shifted = alone.clone();
    assert!(m.shift_cache(&mut shifted, k).unwrap());
    let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    for l in 0..n_layers {
        let (ks, vs) = shifted.layers[l].as_ref().unwrap();
        let (kl, vl) = later.layers[l].as_ref().unwrap();
        let (ka, _) = alone.layers[l].as_ref().unwrap();
        assert_close(&format!("layer {l} keys"), &flat(ks), &flat(&kl.narrow(2, k, n).unwrap()), 1e-5);
        assert_close(&format!("layer {l} values"), &flat(vs), &flat(&vl.narrow(2, k, n).unwrap()), 1e-5);
        let moved = flat(ks).iter().zip(flat(ka)).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(moved > 1e-3, "layer {l}: the keys did not move");
    }

    let gpt2 = word_model(root.path(), "gpt2-tiny");
    let g = causal(&gpt2);
    let x = random_prompt(&gpt2, n, 22).unsqueeze(0).unwrap();
    let mut cache = KvCache::new(g.info().n_layers);
    g.forward(&x, &Tensor::ones((1, n), candle_core::DType::F32, &Device::Cpu).unwrap(), Some(&mut cache), LogitsAt::Last).unwrap();
    let before = flat(&cache.layers[0].as_ref().unwrap().0);
    assert!(!g.shift_cache(&mut cache, k).unwrap(), "absolute positions cannot move");
    assert_eq!(flat(&cache.layers[0].as_ref().unwrap().0), before);
}

/// A task trained with `--prompt-after-bos` (its folder as the trainer wrote it) is served as
/// `softprompt eval` runs it: `[embed(BOS); P; embed(X)]` with X tokenized without BOS.
#[test]
fn prompt_after_bos_task_is_served_as_eval_runs_it() {
    let root = tempfile::tempdir().unwrap();
    let model = Arc::new(word_model(root.path(), "llama-tiny"));
    let tok = model.tokenizer().unwrap();
    let bos = model.backbone.info().bos_token_id.unwrap();
    assert!(tok.add_bos, "the tiny Llama's inputs start with BOS");
    let template = "w5 {text} w6";
    let task = ClassificationTask {
        name: "bos".into(),
        template: template.into(),
        labels: vec!["x".into(), "y".into(), "z".into()],
        verbalizer: vec!["w10".into(), "w11 w12".into(), "w13".into()],
        train: vec![],
        dev: vec![],
        test: vec![],
    };
    let rows: Vec<LabeledText> = INPUTS.iter().enumerate().map(|(i, t)| LabeledText { text: t.to_string(), label: i % 3, line: i + 1 }).collect();
    let examples: Vec<Example> = task.examples(tok, model.backbone.info(), &rows).unwrap();
    assert!(examples.iter().all(|e| e.source[0] == bos));

    // Two training steps with the prompt after BOS write the task folder.
    let prompts = root.path().join("prompts");
    let out = prompts.join("bos");
    let mut cfg = TrainConfig::paper(out.clone());
    cfg.n_tokens = 4;
    cfg.init = PromptInit::RandomUniform { range: 0.5 };
    cfg.steps = 2;
    cfg.batch_size = 3;
    cfg.quiet = true;
    cfg.prompt_after_bos = true;
    cfg.task.template = Some(template.into());
    cfg.task.labels = task.labels.clone();
    cfg.task.verbalizer = task.verbalizer.clone();
    train(&model, &examples, None, &cfg).unwrap();
    let saved: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("task.json")).unwrap()).unwrap();
    assert_eq!(saved["prompt_after_bos"], true);
    // A plain task next to it, so batches mix the two layouts.
    write_task_folder(&prompts.join("plain"), &[random_prompt(&model, 3, 30)], &model, Some(&meta(Some(template), &["x", "y"], &["w10", "w13"])))
        .unwrap();

    let mut cfg = config(&prompts);
    cfg.batch.max_wait = Duration::from_millis(300);
    let server = Server::start(model.clone(), cfg).unwrap();
    let addr = server.addr;
    let (status, list) = request(addr, "GET", "/v1/tasks/bos", None);
    assert_eq!(status, 200, "{list}");
    let list: serde_json::Value = serde_json::from_str(&list).unwrap();
    assert_eq!(list["prompt_tokens"], serde_json::json!([4]), "{list}");
    assert_eq!(list["prompt_after_bos"], true, "{list}");
    let mut jobs = Vec::new();
    for input in INPUTS {
        for t in ["bos", "plain"] {
            jobs.push(("/v1/classify", serde_json::json!({"task": t, "input": input})));
            jobs.push(("/v1/generate", serde_json::json!({"task": t, "input": input, "max_new_tokens": 6})));
        }
    }
    let got = run_together(addr, &jobs);
    let (_, reused) = prefill(addr);
    assert!(reused > 0);
    server.shutdown().unwrap();

    // `softprompt eval`'s path: the prefix [embed(BOS); P], a tokenizer that adds no BOS,
    // `eval::report` with batch 1 (unpadded rows).
    let mut eval_model = word_model(root.path(), "llama-tiny");
    let p = PeftAdapter::load(&out, &Device::Cpu).unwrap().prompt; // [4, D]
    let prefix = prefix_after_bos(&p, &eval_model.backbone).unwrap(); // [5, D]
    eval_model.tokenizer.as_mut().unwrap().add_bos = false;
    let rank = classify(&eval_model, Some(&prefix), &task, &rows, Mode::Rank, &Decoding::default(), 1).unwrap();
    let sources = task.sources(eval_model.tokenizer().unwrap(), eval_model.backbone.info(), &rows).unwrap();
    assert!(sources.iter().all(|s| s[0] != bos));
    let decoding = Decoding { max_new_tokens: 6, ..Decoding::default() };
    let generated = generate_tokens(&eval_model.backbone, Some(&prefix), &sources, &decoding, 1, &Device::Cpu).unwrap();
    // The layout matters: the plain layout [P; BOS; X] scores differently.
    let plain_src = task.sources(tok, model.backbone.info(), &rows).unwrap();
    let plain_targets = task.label_targets(tok, model.backbone.info()).unwrap();
    let plain = label_log_likelihoods(&model.backbone, Some(&p), &plain_src, &plain_targets, 1, &Device::Cpu).unwrap();
    let eos = &model.backbone.info().eos_token_ids;
    for (i, input) in INPUTS.iter().enumerate() {
        let cls = &got[4 * i];
        let want = rank.predictions[i].scores.clone().unwrap();
        let have: Vec<f32> = task.labels.iter().map(|l| cls["scores"][l].as_f64().unwrap() as f32).collect();
        assert_close(&format!("{input}: scores"), &have, &want, 1e-4);
        assert_eq!(cls["label"], task.labels[rank.predictions[i].prediction.unwrap()].as_str());
        let apart = have.iter().zip(&plain[i]).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(apart > 1e-3, "{input}: the after-BOS layout should change the scores");
        let gen = &got[4 * i + 1];
        let mut tokens = as_u32s(&gen["tokens"]);
        if let Some(e) = tokens.iter().position(|t| eos.contains(t)) {
            tokens.truncate(e);
        }
        assert_eq!(tokens, generated[i], "{input}: generated tokens");
        assert_eq!(gen["text"].as_str().unwrap(), eval_model.tokenizer().unwrap().decode(&generated[i]).unwrap());
    }
}
