//! Encoder-decoder serving over real HTTP on 127.0.0.1 (ephemeral ports) with the tiny T5
//! fixtures (`t5-tiny`: T5 v1.0, `flan-t5-tiny`: T5 v1.1; random weights, golden outputs from
//! transformers + PEFT, see crates/softprompt/tests/fixtures/README.md), each given a
//! word-level tokenizer (`w{i}` is token `i`) so that requests can carry text.
//!
//! References: the fixture's greedy tokens and step logits (transformers' generate with the
//! fixture's PEFT adapter), and the library's own entry points, as `softprompt eval` runs
//! them (`eval::generate::greedy`, `eval::classify::label_log_likelihoods`,
//! `objective::target_nll`), on the same prompt and input.

mod common;
use common::*;
use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};
use softprompt::batch::{collate, Example};
use softprompt::eval::classify::label_log_likelihoods;
use softprompt::eval::generate::{greedy, GenerateOptions};
use softprompt::load::{load_model, Model};
use softprompt::model::ops::log_softmax_last_dim;
use softprompt::prompt::{AdapterConfig, PeftAdapter};
use softprompt_serve::registry::{write_task_folder, TaskMeta};
use softprompt_serve::{ServeConfig, Server};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

const MODELS: [&str; 2] = ["t5-tiny", "flan-t5-tiny"];

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../softprompt/tests/fixtures").join(name)
}

/// The fixture model `name` copied to `root/name` with a word-level `tokenizer.json`:
/// 0 `<pad>`, 1 `</s>` (EOS), 2 `<unk>`, and `w{i}` for `3 <= i < 256`.
fn word_model(root: &Path, name: &str) -> Arc<Model> {
    let dir = root.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    for f in ["config.json", "generation_config.json", "model.safetensors"] {
        std::fs::copy(fixture(name).join(f), dir.join(f)).unwrap();
    }
    // The unknown token first: it is the tokenizer's unk.
    let tok = common::word_level::word_level_json(&[(2, "<unk>"), (0, "<pad>"), (1, "</s>")], 256);
    std::fs::write(dir.join("tokenizer.json"), tok).unwrap();
    Arc::new(load_model(&dir, &Device::Cpu).unwrap())
}

/// A random prompt `[n, D]` on the fixtures' scale (seeded).
fn random_prompt(model: &Model, n: usize, seed: u64) -> Tensor {
    let d = model.backbone.info().d_model;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let v: Vec<f32> = (0..n * d).map(|_| rng.random_range(-0.8f32..0.8)).collect();
    Tensor::from_vec(v, (n, d), &Device::Cpu).unwrap()
}

fn config(dir: &Path) -> ServeConfig {
    let mut cfg = ServeConfig::new(dir);
    cfg.addr = "127.0.0.1:0".parse().unwrap();
    cfg.allow_writes = true; // uploads over HTTP
    cfg
}

fn request(addr: SocketAddr, method: &str, path: &str, body: Option<&[u8]>) -> (u16, String) {
    softprompt_serve::client::request(addr, method, path, body, None).expect("HTTP request")
}

fn post(addr: SocketAddr, path: &str, body: &serde_json::Value) -> (u16, serde_json::Value) {
    let (status, text) = request(addr, "POST", path, Some(body.to_string().as_bytes()));
    (status, serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text}")))
}


/// Encoder input as the library builds it: the template applied, then EOS.
fn source(model: &Model, meta: &TaskMeta, input: &str) -> Vec<u32> {
    let text = match &meta.template {
        Some(t) => t.replace("{text}", input),
        None => input.to_string(),
    };
    let mut ids = model.tokenizer().unwrap().encode_input(&text).unwrap();
    ids.extend(model.backbone.info().eos_token_ids.first());
    ids
}

/// Label targets as the library builds them (`ClassificationTask::label_targets`: EOS last).
fn label_targets(model: &Model, meta: &TaskMeta) -> Vec<Vec<u32>> {
    softprompt::task::label_targets("t", &meta.labels, &meta.verbalizer, model.tokenizer().unwrap(), model.backbone.info())
        .unwrap()
}

/// Library greedy decoding with one prompt: tokens and each token's log-probability.
fn library_generate(model: &Model, prompt: &Tensor, src: &[u32], max_new: usize) -> (Vec<u32>, Vec<f32>) {
    let opts = GenerateOptions { max_new_tokens: max_new, stop_at_eos: true };
    let g = greedy(&model.backbone, Some(prompt), &[src.to_vec()], &opts, &Device::Cpu).unwrap();
    let tokens = g.tokens[0].clone();
    let logprobs = tokens
        .iter()
        .zip(&g.step_logits)
        .map(|(&t, l)| log_softmax_last_dim(l).unwrap().get(0).unwrap().get(t as usize).unwrap().to_scalar::<f32>().unwrap())
        .collect();
    (tokens, logprobs)
}

/// Per-token log-likelihoods of `target` after `src` under `prompt`, by the training
/// objective (teacher forcing, no KV cache).
fn library_token_logprobs(model: &Model, prompt: &Tensor, src: &[u32], target: &[u32]) -> Vec<f32> {
    let ex = Example { source: src.to_vec(), target: target.to_vec() };
    let batch = collate(&[ex], model.backbone.info(), prompt.dim(0).unwrap(), &Device::Cpu).unwrap();
    let nll = softprompt::objective::target_nll(&model.backbone, Some(prompt), &batch).unwrap();
    nll.to_vec1::<f32>().unwrap().into_iter().map(|x| -x).collect()
}

/// Three tasks: `sent` (5 prompt tokens, template, one-word labels), `multi` (8 tokens, labels
/// of 1 to 3 words, no template), `ens` (an ensemble of prompts of 3, 6 and 7 tokens).
fn three_tasks(model: &Model, dir: &Path) -> Vec<(String, Vec<Tensor>, TaskMeta)> {
    let meta = |template: Option<&str>, labels: &[&str], verbalizer: &[&str]| TaskMeta {
        template: template.map(str::to_string),
        labels: labels.iter().map(|s| s.to_string()).collect(),
        verbalizer: verbalizer.iter().map(|s| s.to_string()).collect(),
        ..TaskMeta::default()
    };
    let tasks = vec![
        (
            "sent".to_string(),
            vec![random_prompt(model, 5, 1)],
            meta(Some("w50 {text} w51"), &["pos", "neg"], &["w100", "w200"]),
        ),
        (
            "multi".to_string(),
            vec![random_prompt(model, 8, 2)],
            meta(None, &["yes", "no", "maybe"], &["w30 w31 w32", "w40", "w41 w42"]),
        ),
        (
            "ens".to_string(),
            vec![random_prompt(model, 3, 3), random_prompt(model, 6, 4), random_prompt(model, 7, 5)],
            meta(Some("w60 {text}"), &["a", "b"], &["w70 w71", "w80"]),
        ),
    ];
    for (name, prompts, meta) in &tasks {
        write_task_folder(&dir.join(name), prompts, model, Some(meta)).unwrap();
    }
    tasks
}

const INPUTS: [&str; 3] = ["w10 w11 w12", "w13", "w14 w15 w16 w17 w18 w19 w20 w21 w22"];

#[test]
fn greedy_generation_matches_the_fixture_and_the_library() {
    for name in MODELS {
        let tmp = tempfile::tempdir().unwrap();
        let model = word_model(tmp.path(), name);
        // The fixture's PEFT adapter as it is (`num_transformer_submodules` 2: [2N, D] stored).
        let prompts_dir = tmp.path().join("prompts");
        let golden = prompts_dir.join("golden");
        std::fs::create_dir_all(&golden).unwrap();
        for f in ["adapter_config.json", "adapter_model.safetensors"] {
            std::fs::copy(fixture(name).join("adapter").join(f), golden.join(f)).unwrap();
        }
        let prompt = PeftAdapter::load(&golden, &Device::Cpu).unwrap().prompt;
        let expected = candle_core::safetensors::load(fixture(name).join("expected.safetensors"), &Device::Cpu).unwrap();
        let ids = expected["generate.input_ids"].to_dtype(DType::I64).unwrap().to_vec2::<i64>().unwrap();
        let mask = expected["generate.attention_mask"].to_dtype(DType::I64).unwrap().to_vec2::<i64>().unwrap();
        let new_tokens = expected["generate.new_tokens"].to_dtype(DType::I64).unwrap().to_vec2::<i64>().unwrap();
        let step_logp = log_softmax_last_dim(&expected["generate.step_logits"]).unwrap(); // [6, 3, V]

        let mut cfg = config(&prompts_dir);
        cfg.batch.max_wait = Duration::from_millis(300);
        let server = Server::start(model.clone(), cfg).unwrap();
        let addr = server.addr;
        // The fixture's three rows as text (their trailing EOS is added by the server), sent
        // together so that they share batches as in the fixture's right-padded batch.
        let texts: Vec<String> = ids
            .iter()
            .zip(&mask)
            .map(|(row, m)| {
                let real: Vec<i64> = row.iter().zip(m).filter(|(_, k)| **k == 1).map(|(&t, _)| t).collect();
                assert_eq!(real.last(), Some(&1), "fixture inputs end with EOS");
                real[..real.len() - 1].iter().map(|t| format!("w{t}")).collect::<Vec<_>>().join(" ")
            })
            .collect();
        let handles: Vec<_> = texts
            .iter()
            .map(|text| {
                let body = serde_json::json!({"task": "golden", "input": text, "max_new_tokens": 6});
                std::thread::spawn(move || post(addr, "/v1/generate", &body))
            })
            .collect();
        for (i, h) in handles.into_iter().enumerate() {
            let (status, got) = h.join().unwrap();
            assert_eq!(status, 200, "{name} row {i}: {got}");
            let tokens = as_u32s(&got["tokens"]);
            let want: Vec<u32> = new_tokens[i].iter().map(|&t| t as u32).collect();
            assert_eq!(tokens, want, "{name} row {i}: golden tokens");
            let golden_lp: Vec<f32> = want
                .iter()
                .enumerate()
                .map(|(t, &tok)| step_logp.get(t).unwrap().get(i).unwrap().get(tok as usize).unwrap().to_scalar::<f32>().unwrap())
                .collect();
            assert_close(&format!("{name} row {i} logprobs vs transformers"), &as_f32s(&got["logprobs"]), &golden_lp, 1e-4);
            assert_eq!(got["finish_reason"], "length");
            // The library on the same prompt and input.
            let src = source(&model, &TaskMeta::default(), &texts[i]);
            let fixture_src: Vec<u32> = ids[i].iter().zip(&mask[i]).filter(|(_, k)| **k == 1).map(|(&t, _)| t as u32).collect();
            assert_eq!(src, fixture_src, "{name} row {i}: tokenization");
            let (lib_tokens, lib_lp) = library_generate(&model, &prompt, &src, 6);
            assert_eq!(tokens, lib_tokens, "{name} row {i}: library tokens");
            assert_close(&format!("{name} row {i} logprobs vs library"), &as_f32s(&got["logprobs"]), &lib_lp, 1e-4);
            let text = model.tokenizer().unwrap().decode(&tokens).unwrap();
            assert_eq!(got["text"].as_str().unwrap(), text);
        }
        server.shutdown().unwrap();
    }
}

#[test]
fn classify_and_generate_equal_the_library() {
    for name in MODELS {
        let tmp = tempfile::tempdir().unwrap();
        let model = word_model(tmp.path(), name);
        let prompts_dir = tmp.path().join("prompts");
        let tasks = three_tasks(&model, &prompts_dir);
        let server = Server::start(model.clone(), config(&prompts_dir)).unwrap();
        let addr = server.addr;
        let (status, list) = request(addr, "GET", "/v1/tasks", None);
        assert_eq!(status, 200);
        let list: serde_json::Value = serde_json::from_str(&list).unwrap();
        assert_eq!(list[0]["prompt_tokens"], serde_json::json!([3, 6, 7]), "{list}");

        for (task, prompts, meta) in &tasks {
            let targets = label_targets(&model, meta);
            for input in INPUTS {
                let src = source(&model, meta, input);
                let what = format!("{name} {task} {input:?}");
                // Classification: the library's rank classification per prompt (one example
                // per call), the mean over the prompts.
                let (status, got) = post(addr, "/v1/classify", &serde_json::json!({"task": task, "input": input}));
                assert_eq!(status, 200, "{what}: {got}");
                let per_prompt: Vec<Vec<f32>> = prompts
                    .iter()
                    .map(|p| {
                        label_log_likelihoods(&model.backbone, Some(p), std::slice::from_ref(&src), &targets, 1, &Device::Cpu)
                            .unwrap()
                            .remove(0)
                    })
                    .collect();
                for (j, s) in per_prompt.iter().enumerate() {
                    assert_close(&format!("{what} prompt {j}"), &as_f32s(&got["per_prompt"][j]["scores"]), s, 1e-4);
                }
                let mut best = (f32::NEG_INFINITY, "");
                for (l, label) in meta.labels.iter().enumerate() {
                    let want = per_prompt.iter().map(|s| s[l]).sum::<f32>() / prompts.len() as f32;
                    let have = got["scores"][label].as_f64().unwrap() as f32;
                    assert!((want - have).abs() < 1e-4, "{what} {label}: server {have} vs library {want}");
                    if want > best.0 {
                        best = (want, label);
                    }
                }
                assert_eq!(got["label"], best.1, "{what}");
                let votes: u64 = meta.labels.iter().map(|l| got["votes"][l].as_u64().unwrap()).sum();
                assert_eq!(votes, prompts.len() as u64);

                let (status, got) = post(
                    addr,
                    "/v1/generate",
                    &serde_json::json!({"task": task, "input": input, "max_new_tokens": 5}),
                );
                assert_eq!(status, 200, "{what}: {got}");
                let tokens = as_u32s(&got["tokens"]);
                let logprobs = as_f32s(&got["logprobs"]);
                if prompts.len() == 1 {
                    // One prompt: the library's greedy decoding.
                    let (lib_tokens, lib_lp) = library_generate(&model, &prompts[0], &src, 5);
                    assert_eq!(tokens, lib_tokens, "{what}: tokens");
                    assert_close(&format!("{what} logprobs"), &logprobs, &lib_lp, 1e-4);
                } else {
                    // Ensemble: each step's log-probability is the mean over the prompts of
                    // the chosen token's log-probability (the library's objective with the
                    // served tokens as target); the first token is the argmax of that mean.
                    let per: Vec<Vec<f32>> =
                        prompts.iter().map(|p| library_token_logprobs(&model, p, &src, &tokens)).collect();
                    let mean: Vec<f32> =
                        (0..tokens.len()).map(|t| per.iter().map(|v| v[t]).sum::<f32>() / prompts.len() as f32).collect();
                    assert_close(&format!("{what} ensemble logprobs"), &logprobs, &mean, 1e-4);
                    let opts = GenerateOptions { max_new_tokens: 1, stop_at_eos: true };
                    let mut first: Option<Tensor> = None;
                    for p in prompts {
                        let g = greedy(&model.backbone, Some(p), std::slice::from_ref(&src), &opts, &Device::Cpu).unwrap();
                        let lp = log_softmax_last_dim(&g.step_logits[0]).unwrap().get(0).unwrap();
                        first = Some(match first {
                            None => lp,
                            Some(m) => (m + lp).unwrap(),
                        });
                    }
                    let best = first.unwrap().argmax(0).unwrap().to_scalar::<u32>().unwrap();
                    assert_eq!(tokens[0], best, "{what}: first ensemble token");
                }
            }
        }
        server.shutdown().unwrap();
    }
}

#[test]
fn mixed_batches_give_each_request_its_alone_answer() {
    for name in MODELS {
        let tmp = tempfile::tempdir().unwrap();
        let model = word_model(tmp.path(), name);
        let prompts_dir = tmp.path().join("prompts");
        let tasks = three_tasks(&model, &prompts_dir);
        // Alone: a server that runs one request per batch. Mixed: one that waits for company.
        let mut alone_cfg = config(&prompts_dir);
        alone_cfg.batch.max_batch = 1;
        let alone_server = Server::start(model.clone(), alone_cfg).unwrap();
        let mut mixed_cfg = config(&prompts_dir);
        mixed_cfg.batch.max_batch = 64;
        mixed_cfg.batch.max_wait = Duration::from_millis(300);
        mixed_cfg.batch.max_rows = 16; // several classification forwards per batch
        let mixed_server = Server::start(model.clone(), mixed_cfg).unwrap();

        // Every (task, input): greedy generation (rows leave the batch at different steps),
        // seeded sampling, and classification; inputs of different lengths.
        let mut jobs = Vec::new();
        for (task, _, _) in &tasks {
            for (k, input) in INPUTS.iter().enumerate() {
                let max_new = [6, 2, 4][k];
                jobs.push(("/v1/generate", serde_json::json!({"task": task, "input": input, "max_new_tokens": max_new})));
                jobs.push((
                    "/v1/generate",
                    serde_json::json!({"task": task, "input": input, "max_new_tokens": 5, "temperature": 0.9, "seed": 11 + k}),
                ));
                jobs.push(("/v1/classify", serde_json::json!({"task": task, "input": input})));
            }
        }
        let alone: Vec<serde_json::Value> = jobs
            .iter()
            .map(|(path, body)| {
                let (status, v) = post(alone_server.addr, path, body);
                assert_eq!(status, 200, "{v}");
                v
            })
            .collect();
        let addr = mixed_server.addr;
        let handles: Vec<_> = jobs
            .iter()
            .cloned()
            .map(|(path, body)| std::thread::spawn(move || post(addr, path, &body)))
            .collect();
        let mixed: Vec<(u16, serde_json::Value)> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        for (((path, body), a), (status, m)) in jobs.iter().zip(&alone).zip(&mixed) {
            assert_eq!(*status, 200, "{m}");
            assert_same_answer(&format!("{name} {path} {body}"), path, a, m);
            if *path == "/v1/generate" {
                assert_eq!(a["finish_reason"], m["finish_reason"]);
            }
        }
        // Some batch of the mixed server held more than one task.
        let (_, metrics) = request(addr, "GET", "/metrics", None);
        let line = |prefix: &str| -> u64 {
            metrics.lines().find(|l| l.starts_with(prefix)).and_then(|l| l.rsplit(' ').next()).unwrap().parse().unwrap()
        };
        let single = line("softprompt_batch_tasks_bucket{le=\"1\"}");
        let total = line("softprompt_batch_tasks_count");
        assert!(total > single, "{name}: no batch mixed tasks: {metrics}");
        alone_server.shutdown().unwrap();
        mixed_server.shutdown().unwrap();
    }
}

#[test]
fn uploads_that_do_not_fit_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let model = word_model(tmp.path(), "t5-tiny");
    let d = model.backbone.info().d_model;
    let prompts_dir = tmp.path().join("prompts");
    let server = Server::start(model.clone(), config(&prompts_dir)).unwrap();
    let addr = server.addr;
    let put = |body: serde_json::Value| -> (u16, String) {
        let (s, t) = request(addr, "PUT", "/v1/tasks/up", Some(body.to_string().as_bytes()));
        let v: serde_json::Value = serde_json::from_str(&t).unwrap_or_else(|_| panic!("not JSON: {t}"));
        (s, v["error"].as_str().unwrap_or_default().to_string())
    };
    // Rows of the wrong width.
    let (s, msg) = put(serde_json::json!({"prompt": vec![vec![0.1f32; d / 2]; 4]}));
    assert_eq!(s, 400, "{msg}");
    assert!(msg.contains("hidden size"), "{msg}");
    // A safetensors prompt of the wrong width.
    let wide = Tensor::zeros((5, d + 8), DType::F32, &Device::Cpu).unwrap();
    let bytes = safetensors::serialize([("prompt_embeddings", &wide)], None).unwrap();
    let (s, msg) = put(serde_json::json!({"prompt": base64_encode(&bytes)}));
    assert_eq!(s, 400, "{msg}");
    assert!(msg.contains("hidden size"), "{msg}");
    // An adapter config whose token_dim disagrees with the prompt.
    let mut cfg = AdapterConfig::new(model.backbone.info(), 4, "RANDOM");
    cfg.token_dim = d / 2;
    let (s, msg) = put(serde_json::json!({"prompt": vec![vec![0.1f32; d]; 4], "adapter_config": cfg}));
    assert_eq!(s, 400, "{msg}");
    assert!(msg.contains("token_dim"), "{msg}");
    // A decoder-only adapter (the llama fixture's config, same width) does not fit T5.
    let causal: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("llama-tiny/adapter/adapter_config.json")).unwrap()).unwrap();
    let (s, msg) = put(serde_json::json!({"prompt": vec![vec![0.1f32; d]; 5], "adapter_config": causal}));
    assert_eq!(s, 400, "{msg}");
    assert!(msg.contains("task_type"), "{msg}");
    let left: Vec<_> = std::fs::read_dir(&prompts_dir).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert!(left.is_empty(), "nothing written: {left:?}");

    // A fitting upload is served and classifies as the library does.
    let p = random_prompt(&model, 4, 9);
    let meta = TaskMeta { template: None, labels: vec!["x".into(), "y".into()], verbalizer: vec!["w90".into(), "w91 w92".into()], ..TaskMeta::default() };
    let body = serde_json::json!({"prompt": p.to_vec2::<f32>().unwrap(), "task": meta});
    let (s, t) = request(addr, "PUT", "/v1/tasks/up", Some(body.to_string().as_bytes()));
    assert_eq!(s, 201, "{t}");
    let (s, got) = post(addr, "/v1/classify", &serde_json::json!({"task": "up", "input": INPUTS[0]}));
    assert_eq!(s, 200, "{got}");
    let src = source(&model, &meta, INPUTS[0]);
    let want = label_log_likelihoods(&model.backbone, Some(&p), &[src], &label_targets(&model, &meta), 1, &Device::Cpu).unwrap();
    assert_close("uploaded task", &[got["scores"]["x"].as_f64().unwrap() as f32, got["scores"]["y"].as_f64().unwrap() as f32], &want[0], 1e-4);
    // The same prompt as PEFT writes a seq2seq adapter: `[N * 2, D]` with
    // num_transformer_submodules 2, of which only the first N rows are the prompt.
    let peft_cfg = AdapterConfig::new(model.backbone.info(), 4, "RANDOM");
    assert_eq!(peft_cfg.num_transformer_submodules, Some(2));
    let table = Tensor::cat(&[&p, &(&p * 7.0).unwrap()], 0).unwrap(); // second half unused
    let bytes = safetensors::serialize([("prompt_embeddings", &table)], None).unwrap();
    let body = serde_json::json!({"prompt": base64_encode(&bytes), "adapter_config": peft_cfg, "task": meta});
    let (s, t) = request(addr, "PUT", "/v1/tasks/peft", Some(body.to_string().as_bytes()));
    assert_eq!(s, 201, "{t}");
    let (s, got) = post(addr, "/v1/classify", &serde_json::json!({"task": "peft", "input": INPUTS[0]}));
    assert_eq!(s, 200, "{got}");
    assert_close("PEFT-layout upload", &[got["scores"]["x"].as_f64().unwrap() as f32, got["scores"]["y"].as_f64().unwrap() as f32], &want[0], 1e-4);
    server.shutdown().unwrap();

    // A prompts folder holding an adapter of the wrong width: the server starts without it
    // and lists it, with the reason, under `GET /v1/tasks?errors`.
    let bad_dir = tmp.path().join("bad");
    let mut cfg = AdapterConfig::new(model.backbone.info(), 3, "RANDOM");
    cfg.token_dim = d / 2;
    let narrow = Tensor::zeros((3, d / 2), DType::F32, &Device::Cpu).unwrap();
    PeftAdapter::new(cfg, narrow).unwrap().save(&bad_dir.join("narrow")).unwrap();
    let server = Server::start(model.clone(), config(&bad_dir)).unwrap();
    let (s, errors) = request(server.addr, "GET", "/v1/tasks?errors", None);
    assert_eq!(s, 200, "{errors}");
    let errors: serde_json::Value = serde_json::from_str(&errors).unwrap();
    assert_eq!(errors[0]["name"], "narrow", "{errors}");
    assert!(errors[0]["error"].as_str().unwrap().contains("token_dim"), "{errors}");
    assert_eq!(request(server.addr, "GET", "/v1/tasks", None).1, "[]");
    server.shutdown().unwrap();
}

fn base64_encode(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}
