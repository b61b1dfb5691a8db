//! Shared helpers for tests: the golden fixtures (tests/fixtures, made by PyTorch +
//! transformers + PEFT, see tests/fixtures/README.md) and comparisons.
#![allow(dead_code)]

pub mod word_level;

use candle_core::{DType, Device, Tensor};
use softprompt::batch::Example;
use softprompt::load::{load_model, Model};
use softprompt::model::{Backbone, LogitsAt};
use softprompt::prompt::init::Rng;
use softprompt::tokenizer::Tokenizer;
use softprompt::train::TrainConfig;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// `tests/fixtures/<name>`
pub fn fixture_dir(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// `expected.safetensors` of a fixture model, every tensor on the CPU.
pub fn expected_tensors(name: &str) -> HashMap<String, Tensor> {
    let path = fixture_dir(name).join("expected.safetensors");
    candle_core::safetensors::load(&path, &Device::Cpu).expect("fixture tensors")
}

/// `expected.json` of a fixture model.
pub fn expected_json(name: &str) -> serde_json::Value {
    let path = fixture_dir(name).join("expected.json");
    serde_json::from_str(&std::fs::read_to_string(path).expect("fixture json")).expect("json")
}

/// An int64 fixture tensor as u32 (ids) or as f32 (masks); `-100` entries stay -100 in the
/// i64 -> Vec conversion helpers below.
pub fn as_u32(t: &Tensor) -> Tensor {
    t.to_dtype(DType::I64)
        .unwrap()
        .to_dtype(DType::U32)
        .unwrap()
}

pub fn to_vec2_i64(t: &Tensor) -> Vec<Vec<i64>> {
    t.to_dtype(DType::I64).unwrap().to_vec2::<i64>().unwrap()
}

/// max |a - b| over all elements (shapes must match).
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shape mismatch");
    let a = a.to_dtype(DType::F32).unwrap().flatten_all().unwrap();
    let b = b.to_dtype(DType::F32).unwrap().flatten_all().unwrap();
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// max |t| over all elements.
pub fn max_abs(t: &Tensor) -> f32 {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .abs()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// Asserts max |a - b| <= tol with a readable message.
#[track_caller]
pub fn assert_close(what: &str, a: &Tensor, b: &Tensor, tol: f32) {
    let d = max_abs_diff(a, b);
    assert!(d <= tol, "{what}: max abs diff {d} > {tol}");
}

/// Suggested tolerances from tests/fixtures/README.md.
pub const TOL_LOGITS: f32 = 1e-4;
pub const TOL_HIDDEN: f32 = 2e-4;
pub const TOL_LOSS: f32 = 1e-5;
/// Relative to max |grad|.
pub const TOL_GRAD_REL: f32 = 1e-4;

/// A fresh temporary folder, removed when dropped.
pub fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir().expect("temporary folder")
}

/// Mean target-token NLL of `data` with no prompt (one batch).
pub fn mean_nll(m: &softprompt::load::Model, data: &[softprompt::batch::Example]) -> f64 {
    let batch = softprompt::batch::collate(data, m.backbone.info(), 0, &Device::Cpu).unwrap();
    softprompt::objective::target_nll(&m.backbone, None, &batch)
        .unwrap()
        .mean_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap() as f64
}

// ---- training: fixture models, synthetic data, a base configuration ----

/// A fixture model (`tests/fixtures/<name>`) on the CPU.
pub fn fixture_model(name: &str) -> Model {
    load_model(&fixture_dir(name), &Device::Cpu).unwrap_or_else(|e| panic!("load {name}: {e}"))
}

/// Synthetic classification-like data: source = filler tokens + a class token, target = the
/// class's answer token (+ EOS for the given model). Deterministic in `seed`.
pub fn toy_data(n: usize, seed: u64, eos: u32) -> Vec<Example> {
    let mut rng = Rng::new(seed, 42);
    (0..n)
        .map(|_| {
            let len = 1 + rng.below(4) as usize;
            let mut source: Vec<u32> = (0..len).map(|_| 10 + rng.below(30) as u32).collect();
            let class = rng.below(2) as usize;
            source.push([60, 70][class]);
            let target = vec![[100, 200][class], eos];
            Example { source, target }
        })
        .collect()
}

pub fn base_config(out: &Path) -> TrainConfig {
    let mut cfg = TrainConfig::paper(out);
    cfg.n_tokens = 5;
    cfg.batch_size = 4;
    cfg.steps = 6;
    cfg.quiet = true;
    cfg.seed = 7;
    cfg
}

/// The toy-mapping run of the trainer tests: 8 tokens, batch 8, 300 steps of Adafactor at
/// 0.3 decayed linearly (a constant 0.3 makes tiny random models' losses oscillate around
/// 0.2), no checkpoints.
pub fn toy_config(out: &Path) -> TrainConfig {
    let mut cfg = base_config(out);
    cfg.n_tokens = 8;
    cfg.batch_size = 8;
    cfg.steps = 300;
    cfg.checkpoint_every = 0;
    cfg.schedule = softprompt::train::schedule::Schedule::linear(0.3, 0, cfg.steps);
    cfg
}

pub fn f32_bits(t: &Tensor) -> Vec<u32> {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .map(|x| x.to_bits())
        .collect()
}

/// The embedding table of a fixture model, read straight from its model.safetensors.
pub fn embedding_table(name: &str, tensor: &str) -> Tensor {
    let all =
        candle_core::safetensors::load(fixture_dir(name).join("model.safetensors"), &Device::Cpu)
            .unwrap();
    all[tensor].to_dtype(DType::F32).unwrap()
}

pub fn eos(m: &Model) -> u32 {
    m.backbone.info().eos_token_ids[0]
}

/// A word-level tokenizer over the fixture vocabulary: id 0 `[UNK]` (special), id 3 a
/// SentencePiece byte piece `<0x0A>`, id 4 `<sep>` (special), every other id `i` the word `w{i}`.
pub fn word_tokenizer(dir: &Path, vocab: usize) -> Tokenizer {
    let mut words = serde_json::Map::new();
    for i in 0..vocab {
        let w = match i {
            0 => "[UNK]".to_string(),
            3 => "<0x0A>".to_string(),
            4 => "<sep>".to_string(),
            _ => format!("w{i}"),
        };
        words.insert(w, i.into());
    }
    let added = |id: usize, content: &str| {
        serde_json::json!({"id": id, "content": content, "single_word": false, "lstrip": false,
            "rstrip": false, "normalized": false, "special": true})
    };
    let json = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": [added(0, "[UNK]"), added(4, "<sep>")],
        "normalizer": null, "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": null, "decoder": null,
        "model": {"type": "WordLevel", "vocab": words, "unk_token": "[UNK]"},
    });
    let path = dir.join("tokenizer.json");
    std::fs::write(&path, json.to_string()).unwrap();
    Tokenizer::from_file(&path).unwrap()
}

/// llama-tiny with the word tokenizer.
pub fn llama_with_words(dir: &Path) -> Model {
    let mut m = fixture_model("llama-tiny");
    m.tokenizer = Some(word_tokenizer(dir, 256));
    m
}

/// Mean target NLL computed by hand, one example at a time without padding: the model reads
/// `[prefix; embed(source); embed(target)]` and target token `j` is predicted at position
/// `len(prefix) + len(source) + j - 1`.
pub fn nll_by_hand(m: &Model, prefix: &Tensor, data: &[Example]) -> f64 {
    let Backbone::Causal(lm) = &m.backbone else {
        panic!("a decoder-only model")
    };
    let table = embedding_table("llama-tiny", "model.embed_tokens.weight"); // [V, D]
    let (mut total, mut count) = (0f64, 0usize);
    for e in data {
        let ids: Vec<u32> = e.source.iter().chain(&e.target).copied().collect();
        let ids_t = Tensor::new(ids.as_slice(), &Device::Cpu).unwrap();
        let x = table.index_select(&ids_t, 0).unwrap(); // [S+T, D]
        let embeds = Tensor::cat(&[prefix, &x], 0).unwrap().unsqueeze(0).unwrap(); // [1, L, D]
        let len = embeds.dim(1).unwrap();
        let mask = Tensor::ones((1, len), DType::F32, &Device::Cpu).unwrap();
        let logits = lm.forward(&embeds, &mask, None, LogitsAt::All).unwrap(); // [1, L, V]
        let logits: Vec<Vec<f32>> = logits.squeeze(0).unwrap().to_vec2().unwrap();
        let start = prefix.dim(0).unwrap() + e.source.len();
        for (j, &tok) in e.target.iter().enumerate() {
            let row = &logits[start + j - 1];
            let max = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
            let lse = max + row.iter().map(|&v| (v as f64 - max).exp()).sum::<f64>().ln();
            total += lse - row[tok as usize] as f64;
            count += 1;
        }
    }
    total / count as f64
}

// ---- decoder-only fixtures with a prompt (llama-tiny, the family fixtures) ----

/// `[P ; embed(ids)]` `[B, N+S, D]` and `[1]*N + mask` `[B, N+S]`, as PEFT builds them.
pub fn with_prompt(
    lm: &dyn softprompt::model::CausalLm,
    prompt: &Tensor,
    ids: &Tensor,
    mask: &Tensor,
) -> (Tensor, Tensor) {
    let (b, _) = ids.dims2().unwrap();
    let (n, d) = prompt.dims2().unwrap();
    let tok = lm.embed(&as_u32(ids)).unwrap();
    let p = prompt
        .unsqueeze(0)
        .unwrap()
        .broadcast_as((b, n, d))
        .unwrap();
    let embeds = Tensor::cat(&[&p, &tok], 1).unwrap();
    let ones = Tensor::ones((b, n), DType::F32, &Device::Cpu).unwrap();
    let mask = Tensor::cat(&[&ones, &mask.to_dtype(DType::F32).unwrap()], 1).unwrap();
    (embeds, mask)
}

/// Rows (of the flattened `[B*(N+S)]` positions) and targets of the loss: position `t`
/// predicts label `t+1` of `[-100]*N + labels`.
pub fn loss_rows(labels: &Tensor, n: usize) -> (Tensor, Tensor) {
    let labels = to_vec2_i64(labels);
    let mut rows = Vec::new();
    let mut targets = Vec::new();
    for (b, row) in labels.iter().enumerate() {
        let full: Vec<i64> = std::iter::repeat_n(-100, n)
            .chain(row.iter().copied())
            .collect();
        let len = full.len();
        for t in 0..len - 1 {
            if full[t + 1] != -100 {
                rows.push((b * len + t) as u32);
                targets.push(full[t + 1] as u32);
            }
        }
    }
    let m = rows.len();
    (
        Tensor::from_vec(rows, m, &Device::Cpu).unwrap(),
        Tensor::from_vec(targets, m, &Device::Cpu).unwrap(),
    )
}

/// Mean cross-entropy of a labelled batch with `prompt` prepended, logits computed at the
/// scored rows only (see [`loss_rows`]).
pub fn prompted_loss(
    lm: &dyn softprompt::model::CausalLm,
    prompt: &Tensor,
    ids: &Tensor,
    mask: &Tensor,
    labels: &Tensor,
) -> Tensor {
    let (embeds, mask) = with_prompt(lm, prompt, ids, mask);
    let (rows, targets) = loss_rows(labels, prompt.dim(0).unwrap());
    let logits = lm
        .forward(&embeds, &mask, None, LogitsAt::Rows(&rows))
        .unwrap(); // [M, V]
    softprompt::model::ops::token_nll(&logits, &targets)
        .unwrap()
        .mean_all()
        .unwrap()
}

/// The first element of a tensor as f32.
pub fn scalar(t: &Tensor) -> f32 {
    t.flatten_all()
        .unwrap()
        .get(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// Checks the gradient of `loss` at `prompt` by central differences on a few entries (the 4
/// largest and the 2 smallest), in f32, Richardson-extrapolated from steps h and 2h
/// (truncation error O(h^4)); the rounding error of a loss of ~10 is ~1e-6 / h.
pub fn check_prompt_grad_by_finite_differences(prompt: &Tensor, loss: impl Fn(&Tensor) -> Tensor) {
    let var = candle_core::Var::from_tensor(prompt).unwrap();
    let grads = loss(var.as_tensor()).backward().unwrap();
    let g = grads
        .get(var.as_tensor())
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let gmax = g.iter().fold(0f32, |m, x| m.max(x.abs()));
    let mut order: Vec<usize> = (0..g.len()).collect();
    order.sort_by(|&a, &b| g[b].abs().total_cmp(&g[a].abs()));
    let p0 = prompt.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let loss_at = |i: usize, delta: f32| -> f64 {
        let mut p = p0.clone();
        p[i] += delta;
        let t = Tensor::from_slice(&p, prompt.dims(), &Device::Cpu).unwrap();
        scalar(&loss(&t)) as f64
    };
    let h = 1e-2f32;
    for &i in order.iter().take(4).chain(order.iter().rev().take(2)) {
        let d1 = (loss_at(i, h) - loss_at(i, -h)) / (2.0 * h as f64);
        let d2 = (loss_at(i, 2.0 * h) - loss_at(i, -2.0 * h)) / (4.0 * h as f64);
        let fd = (4.0 * d1 - d2) / 3.0;
        let err = (fd - g[i] as f64).abs();
        assert!(
            err <= 5e-4 * gmax as f64,
            "prompt entry {i}: finite difference {fd} vs autodiff {} (max |g| {gmax})",
            g[i]
        );
    }
}

/// Greedy decoding with a KV cache from `embeds [B, T, D]`, `mask [B, T]` (extended in
/// place), one step per entry of `step_logits [steps, B, V]`, whose logits every step must
/// match; returns the chosen tokens `[B][steps]`.
pub fn greedy_with_cache(
    lm: &dyn softprompt::model::CausalLm,
    embeds: &Tensor,
    mask: &mut Tensor,
    cache: &mut softprompt::model::KvCache,
    step_logits: &Tensor,
) -> Vec<Vec<i64>> {
    let b = embeds.dim(0).unwrap();
    let steps = step_logits.dim(0).unwrap();
    let mut logits = lm
        .forward(embeds, mask, Some(&mut *cache), LogitsAt::Last)
        .unwrap(); // [B, V]
    let mut got: Vec<Vec<i64>> = vec![Vec::new(); b];
    for step in 0..steps {
        assert_close(
            &format!("step_logits[{step}]"),
            &logits,
            &step_logits.get(step).unwrap(),
            TOL_LOGITS,
        );
        let next = logits.argmax_keepdim(candle_core::D::Minus1).unwrap(); // [B, 1] u32
        for (row, id) in next
            .flatten_all()
            .unwrap()
            .to_vec1::<u32>()
            .unwrap()
            .into_iter()
            .enumerate()
        {
            got[row].push(id as i64);
        }
        if step + 1 == steps {
            break;
        }
        let emb = lm.embed(&next).unwrap(); // [B, 1, D]
        let one = Tensor::ones((b, 1), DType::F32, &Device::Cpu).unwrap();
        *mask = Tensor::cat(&[&*mask, &one], 1).unwrap();
        logits = lm
            .forward(&emb, mask, Some(&mut *cache), LogitsAt::Last)
            .unwrap();
    }
    got
}

/// `n` greedy new tokens after `ids` (one unpadded row), with the KV cache.
pub fn greedy_tokens(lm: &dyn softprompt::model::CausalLm, ids: &[u32], n: usize) -> Vec<u32> {
    let input = Tensor::from_slice(ids, (1, ids.len()), &Device::Cpu).unwrap();
    let mut mask = Tensor::ones((1, ids.len()), DType::F32, &Device::Cpu).unwrap();
    let mut cache = softprompt::model::KvCache::new(lm.info().n_layers);
    let mut embeds = lm.embed(&input).unwrap();
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let logits = lm.forward(&embeds, &mask, Some(&mut cache), LogitsAt::Last).unwrap(); // [1, V]
        let next = logits.argmax_keepdim(candle_core::D::Minus1).unwrap(); // [1, 1]
        out.push(next.flatten_all().unwrap().to_vec1::<u32>().unwrap()[0]);
        embeds = lm.embed(&next).unwrap();
        let one = Tensor::ones((1, 1), DType::F32, &Device::Cpu).unwrap();
        mask = Tensor::cat(&[&mask, &one], 1).unwrap();
    }
    out
}
