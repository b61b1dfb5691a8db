//! Mistral, Gemma 2 and Gemma 3 against their tiny fixtures (PyTorch + transformers + PEFT,
//! `tests/fixtures/make_family_fixtures_b.py`): logits, loss and prompt gradient with a soft
//! prompt, finite differences, greedy generation with the KV cache, from the HF folder and
//! from the GGUF file of the same weights, and the GGUF SentencePiece tokenizer. Every fixture
//! has a sliding window of 4, shorter than every row (prompt included).

mod common;

use candle_core::{Device, Tensor, Var};
use common::*;
use softprompt::load::{load_model, Model};
use softprompt::model::{ops, Backbone, CausalLm, KvCache, LogitsAt};
use std::collections::HashMap;

struct Fixture {
    model: Model,
    t: HashMap<String, Tensor>,
    json: serde_json::Value,
}

/// Fixture `name` loaded from its HF folder, or from its `model.gguf`.
fn fixture(name: &str, gguf: bool) -> Fixture {
    let dir = fixture_dir(name);
    let path = if gguf { dir.join("model.gguf") } else { dir };
    let model = load_model(&path, &Device::Cpu).unwrap_or_else(|e| panic!("load {name}: {e}"));
    Fixture {
        model,
        t: expected_tensors(name),
        json: expected_json(name),
    }
}

impl Fixture {
    fn lm(&self) -> &dyn CausalLm {
        match &self.model.backbone {
            Backbone::Causal(m) => m.as_ref(),
            Backbone::Seq2Seq(_) => panic!("loaded as seq2seq"),
        }
    }

    fn get(&self, key: &str) -> &Tensor {
        self.t
            .get(key)
            .unwrap_or_else(|| panic!("fixture tensor {key}"))
    }

    /// The batch with `prompt` prepended.
    fn batch(&self, prompt: &Tensor) -> (Tensor, Tensor) {
        with_prompt(
            self.lm(),
            prompt,
            self.get("input_ids"),
            self.get("attention_mask"),
        )
    }

    /// Mean cross-entropy of the batch with `prompt`, logits at the label rows only.
    fn loss(&self, prompt: &Tensor) -> Tensor {
        let (embeds, mask) = self.batch(prompt);
        let (rows, targets) = loss_rows(self.get("labels"), prompt.dim(0).unwrap());
        let picked = self
            .lm()
            .forward(&embeds, &mask, None, LogitsAt::Rows(&rows))
            .unwrap();
        ops::token_nll(&picked, &targets)
            .unwrap()
            .mean_all()
            .unwrap()
    }
}

/// Logits with the prompt, loss (all logits and label rows) and prompt gradient.
fn check_forward_and_gradient(name: &str, gguf: bool) {
    let f = fixture(name, gguf);
    let what = |s: &str| format!("{name} (gguf: {gguf}): {s}");
    assert_eq!(f.lm().sliding_window(), Some(4), "{}", what("window"));
    let (embeds, mask) = f.batch(f.get("prompt"));
    let logits = f.lm().forward(&embeds, &mask, None, LogitsAt::All).unwrap();
    assert_close(&what("logits"), &logits, f.get("logits"), TOL_LOGITS);

    let want = scalar(f.get("loss"));
    let prompt = Var::from_tensor(f.get("prompt")).unwrap();
    let loss = f.loss(prompt.as_tensor());
    assert!(
        (scalar(&loss) - want).abs() <= TOL_LOSS,
        "{}: {} vs {want}",
        what("loss"),
        scalar(&loss)
    );
    let grads = loss.backward().unwrap();
    let g = grads
        .get(prompt.as_tensor())
        .expect("prompt has a gradient");
    let want_g = f.get("grad_prompt");
    assert_close(
        &what("grad_prompt"),
        g,
        want_g,
        TOL_GRAD_REL * max_abs(want_g),
    );
    assert_eq!(
        f.json["results"]["loss"].as_f64().map(|l| l as f32),
        Some(want),
        "fixture json and tensors agree"
    );
}

fn check_finite_differences(name: &str) {
    let f = fixture(name, false);
    check_prompt_grad_by_finite_differences(f.get("prompt"), |p| f.loss(p));
}

/// Greedy decoding with the KV cache: the logits of every step and the tokens; the cache
/// holds every position while the window masks the old ones.
fn check_generation(name: &str, gguf: bool) {
    let f = fixture(name, gguf);
    let lm = f.lm();
    let (embeds, mut mask) = with_prompt(
        lm,
        f.get("prompt"),
        f.get("generate.input_ids"),
        f.get("generate.attention_mask"),
    );
    let want = to_vec2_i64(f.get("generate.new_tokens"));
    let mut cache = KvCache::new(lm.info().n_layers);
    let got = greedy_with_cache(
        lm,
        &embeds,
        &mut mask,
        &mut cache,
        f.get("generate.step_logits"),
    );
    assert_eq!(got, want, "{name} (gguf: {gguf}): generate.new_tokens");
    assert_eq!(
        f.json["results"]["generate"]["new_tokens"],
        serde_json::json!(want)
    );
}

/// The GGUF file's SentencePiece tokenizer gives transformers' ids (BOS first).
fn check_gguf_tokenizer(name: &str) {
    let f = fixture(name, true);
    let tok = f.model.tokenizer().unwrap();
    let cases = f.json["tokenizer_cases"]
        .as_array()
        .expect("tokenizer_cases");
    assert!(!cases.is_empty());
    for case in cases {
        let text = case["text"].as_str().unwrap();
        let want: Vec<u32> = serde_json::from_value(case["ids"].clone()).unwrap();
        assert_eq!(tok.encode_input(text).unwrap(), want, "{name}: {text:?}");
    }
}

macro_rules! family {
    ($module:ident, $name:literal) => {
        mod $module {
            use super::*;

            #[test]
            fn forward_and_gradient_hf() {
                check_forward_and_gradient($name, false);
            }

            #[test]
            fn forward_and_gradient_gguf() {
                check_forward_and_gradient($name, true);
            }

            #[test]
            fn prompt_gradient_finite_differences() {
                check_finite_differences($name);
            }

            #[test]
            fn greedy_generation_hf() {
                check_generation($name, false);
            }

            #[test]
            fn greedy_generation_gguf() {
                check_generation($name, true);
            }

            #[test]
            fn gguf_tokenizer() {
                check_gguf_tokenizer($name);
            }
        }
    };
}

family!(mistral, "mistral-tiny");
family!(gemma2, "gemma2-tiny");
family!(gemma3, "gemma3-tiny");

// ---- refused variants: an error naming the field and the value, never a silent drop ----

/// The error of loading fixture `name`'s folder with `edit` applied to its `config.json`.
fn hf_error(name: &str, edit: impl Fn(&mut serde_json::Value)) -> String {
    let dir = tempdir();
    let src = fixture_dir(name);
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    edit(&mut config);
    std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
    std::fs::copy(
        src.join("model.safetensors"),
        dir.path().join("model.safetensors"),
    )
    .unwrap();
    match load_model(dir.path(), &Device::Cpu) {
        Ok(_) => panic!("{name}: the edited config loaded"),
        Err(e) => e.to_string(),
    }
}

#[track_caller]
fn assert_names(err: &str, words: &[&str]) {
    for w in words {
        assert!(err.contains(w), "error {err:?} does not name {w:?}");
    }
}

#[test]
fn unsupported_gemma_rope_scaling_is_refused() {
    let err = hf_error("gemma3-tiny", |c| {
        c["rope_parameters"]["full_attention"] =
            serde_json::json!({"rope_type": "linear", "factor": 8.0});
    });
    assert_names(&err, &["rope_parameters.full_attention", "linear"]);
    let err = hf_error("gemma2-tiny", |c| {
        c["rope_scaling"] = serde_json::json!({"rope_type": "dynamic", "factor": 2.0});
    });
    assert_names(&err, &["rope_scaling", "dynamic"]);
}

#[test]
fn unsupported_gemma_layouts_are_refused() {
    let err = hf_error("gemma3-tiny", |c| c["model_type"] = "gemma3".into());
    assert_names(&err, &["model_type", "gemma3", "gemma3_text"]);
    let err = hf_error("gemma3-tiny", |c| {
        c["use_bidirectional_attention"] = true.into()
    });
    assert_names(&err, &["use_bidirectional_attention"]);
    let err = hf_error("gemma3-tiny", |c| {
        c["layer_types"][1] = "chunked_attention".into()
    });
    assert_names(&err, &["layer_types", "chunked_attention"]);
    let err = hf_error("gemma2-tiny", |c| c["hidden_activation"] = "relu2".into());
    assert_names(&err, &["hidden_activation", "relu2"]);
    let err = hf_error("gemma2-tiny", |c| {
        c["attn_logit_softcapping"] = (-1.0).into()
    });
    assert_names(&err, &["attn_logit_softcapping"]);
}

#[test]
fn bad_sliding_window_is_refused() {
    let err = hf_error("mistral-tiny", |c| c["sliding_window"] = 0.into());
    assert_names(&err, &["sliding_window", "0"]);
    let err = hf_error("gemma2-tiny", |c| c["sliding_window"] = 0.into());
    assert_names(&err, &["sliding_window", "0"]);
}

/// A GGUF tokenizer of a kind this library does not build is an error naming it.
#[test]
fn unknown_gguf_tokenizer_model_is_refused() {
    use candle_core::quantized::gguf_file::{self, Content, Value};
    let src = fixture_dir("gemma3-tiny").join("model.gguf");
    let mut reader = std::fs::File::open(&src).unwrap();
    let content = Content::read(&mut reader).unwrap();
    let tensors: Vec<(String, candle_core::quantized::QTensor)> = content
        .tensor_infos
        .keys()
        .map(|n| {
            (
                n.clone(),
                content.tensor(&mut reader, n, &Device::Cpu).unwrap(),
            )
        })
        .collect();
    let mut metadata = content.metadata.clone();
    metadata.insert("tokenizer.ggml.model".into(), Value::String("bert".into()));
    let dir = tempdir();
    let path = dir.path().join("bert-tokenizer.gguf");
    let meta: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let ts: Vec<(&str, &candle_core::quantized::QTensor)> =
        tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    gguf_file::write(&mut std::fs::File::create(&path).unwrap(), &meta, &ts).unwrap();
    let err = match load_model(&path, &Device::Cpu) {
        Ok(_) => panic!("a `bert` tokenizer loaded"),
        Err(e) => e.to_string(),
    };
    assert_names(&err, &["tokenizer.ggml.model", "bert"]);
}
