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
