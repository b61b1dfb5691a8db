//! Shared helpers for tests: the golden fixtures (tests/fixtures, made by PyTorch +
//! transformers + PEFT, see tests/fixtures/README.md) and comparisons.
#![allow(dead_code)]

pub mod causal;
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
