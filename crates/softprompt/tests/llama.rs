//! The Llama backbone against the llama-tiny fixture (PyTorch + transformers + PEFT reference),
//! plus a finite-difference check of the prompt gradient.

mod common;

use candle_core::{DType, Device, Tensor, Var};
use common::*;
use softprompt::load::{load_model, Model};
use softprompt::model::{ops, Backbone, CausalLm, KvCache, LogitsAt};
use std::collections::HashMap;

const NAME: &str = "llama-tiny";

struct Fixture {
    model: Model,
    t: HashMap<String, Tensor>,
    json: serde_json::Value,
}

fn fixture() -> Fixture {
    let model = load_model(&fixture_dir(NAME), &Device::Cpu).expect("load llama-tiny");
    Fixture {
        model,
        t: expected_tensors(NAME),
        json: expected_json(NAME),
    }
}

impl Fixture {
    fn lm(&self) -> &dyn CausalLm {
        match &self.model.backbone {
            Backbone::Causal(m) => m.as_ref(),
            Backbone::Seq2Seq(_) => panic!("llama-tiny loaded as seq2seq"),
        }
    }

    fn get(&self, key: &str) -> &Tensor {
        self.t
            .get(key)
            .unwrap_or_else(|| panic!("fixture tensor {key}"))
    }

    /// `[P ; embed(ids)]` `[B, N+S, D]` and `[1]*N + mask` `[B, N+S]`.
    fn with_prompt(&self, prompt: &Tensor, ids: &Tensor, mask: &Tensor) -> (Tensor, Tensor) {
        with_prompt(self.lm(), prompt, ids, mask)
    }

    /// Rows and targets of the loss (see [`common::loss_rows`]).
    fn loss_rows(&self, n: usize) -> (Tensor, Tensor) {
        loss_rows(self.get("labels"), n)
    }

    /// Mean cross-entropy of the batch with `prompt` (via all logits or via `Rows`).
    fn loss(&self, prompt: &Tensor, via_rows: bool) -> Tensor {
        let (n, _) = prompt.dims2().unwrap();
        let (embeds, mask) =
            self.with_prompt(prompt, self.get("input_ids"), self.get("attention_mask"));
        let (rows, targets) = self.loss_rows(n);
        let picked = if via_rows {
            self.lm()
                .forward(&embeds, &mask, None, LogitsAt::Rows(&rows))
                .unwrap()
        } else {
            let logits = self
                .lm()
                .forward(&embeds, &mask, None, LogitsAt::All)
                .unwrap();
            let (b, t, v) = logits.dims3().unwrap();
            logits
                .reshape((b * t, v))
                .unwrap()
                .index_select(&rows, 0)
                .unwrap()
        };
        ops::token_nll(&picked, &targets)
            .unwrap()
            .mean_all()
            .unwrap()
    }
}

#[test]
fn config_and_info() {
    let f = fixture();
    let info = f.lm().info();
    assert_eq!(info.d_model, 32);
    assert_eq!(info.vocab_size, 256);
    assert_eq!(info.n_layers, 2);
    assert_eq!(info.max_positions, Some(2048));
    assert_eq!(info.eos_token_ids, vec![2]);
    assert_eq!(info.pad_token_id, Some(2));
    assert_eq!(info.bos_token_id, Some(1));
}

#[test]
fn logits_no_prompt_at_real_positions() {
    let f = fixture();
    let ids = as_u32(f.get("input_ids"));
    let mask = f.get("attention_mask").to_dtype(DType::F32).unwrap();
    let logits = f
        .lm()
        .forward(&f.lm().embed(&ids).unwrap(), &mask, None, LogitsAt::All)
        .unwrap();
    let expected = f.get("logits_no_prompt");
    assert_eq!(logits.dims(), expected.dims());
    let m = to_vec2_i64(f.get("attention_mask"));
    for (b, row) in m.iter().enumerate() {
        for (t, &real) in row.iter().enumerate() {
            if real == 1 {
                let got = logits.get(b).unwrap().get(t).unwrap();
                let want = expected.get(b).unwrap().get(t).unwrap();
                assert_close(
                    &format!("logits_no_prompt[{b}, {t}]"),
                    &got,
                    &want,
                    TOL_LOGITS,
                );
            }
        }
    }
}

#[test]
fn loss_no_prompt() {
    let f = fixture();
    let ids = as_u32(f.get("input_ids"));
    let mask = f.get("attention_mask").to_dtype(DType::F32).unwrap();
    let (rows, targets) = f.loss_rows(0);
    let picked = f
        .lm()
        .forward(
            &f.lm().embed(&ids).unwrap(),
            &mask,
            None,
            LogitsAt::Rows(&rows),
        )
        .unwrap();
    let loss = scalar(
        &ops::token_nll(&picked, &targets)
            .unwrap()
            .mean_all()
            .unwrap(),
    );
    let want = scalar(f.get("loss_no_prompt"));
    assert!(
        (loss - want).abs() <= TOL_LOSS,
        "loss_no_prompt {loss} vs {want}"
    );
}

#[test]
fn logits_with_prompt() {
    let f = fixture();
    let (embeds, mask) =
        f.with_prompt(f.get("prompt"), f.get("input_ids"), f.get("attention_mask"));
    let logits = f.lm().forward(&embeds, &mask, None, LogitsAt::All).unwrap();
    assert_close("logits", &logits, f.get("logits"), TOL_LOGITS);

    // Last and Rows pick the same rows out of the full logits.
    let last = f
        .lm()
        .forward(&embeds, &mask, None, LogitsAt::Last)
        .unwrap();
    let want_last = f
        .get("logits")
        .narrow(1, 13, 1)
        .unwrap()
        .squeeze(1)
        .unwrap();
    assert_close("logits (Last)", &last, &want_last, TOL_LOGITS);
}

#[test]
fn hidden_states_with_prompt() {
    let f = fixture();
    let (embeds, mask) =
        f.with_prompt(f.get("prompt"), f.get("input_ids"), f.get("attention_mask"));
    let states = f.lm().hidden_states(&embeds, &mask).unwrap();
    let expected = f.get("hidden_states");
    assert_eq!(states.len(), expected.dim(0).unwrap());
    for (i, s) in states.iter().enumerate() {
        assert_close(
            &format!("hidden_states[{i}]"),
            s,
            &expected.get(i).unwrap(),
            TOL_HIDDEN,
        );
    }
}

#[test]
fn loss_all_and_rows_agree_with_reference() {
    let f = fixture();
    let want = scalar(f.get("loss"));
    let all = scalar(&f.loss(f.get("prompt"), false));
    let rows = scalar(&f.loss(f.get("prompt"), true));
    assert!((all - want).abs() <= TOL_LOSS, "loss (All) {all} vs {want}");
    assert!(
        (rows - want).abs() <= TOL_LOSS,
        "loss (Rows) {rows} vs {want}"
    );
    assert_eq!(f.loss_rows(5).0.dim(0).unwrap(), 9, "number of loss tokens");
}

#[test]
fn grad_prompt() {
    let f = fixture();
    let want = f.get("grad_prompt");
    let tol = TOL_GRAD_REL * max_abs(want);
    for via_rows in [false, true] {
        let prompt = Var::from_tensor(f.get("prompt")).unwrap();
        let loss = f.loss(prompt.as_tensor(), via_rows);
        let grads = loss.backward().unwrap();
        let g = grads
            .get(prompt.as_tensor())
            .expect("prompt has a gradient");
        assert_close(&format!("grad_prompt (rows: {via_rows})"), g, want, tol);
    }
}

/// Central differences on a few prompt entries (see
/// [`common::check_prompt_grad_by_finite_differences`]).
#[test]
fn grad_prompt_finite_differences() {
    let f = fixture();
    check_prompt_grad_by_finite_differences(f.get("prompt"), |p| f.loss(p, true));
}

#[test]
fn greedy_generation_with_kv_cache() {
    let f = fixture();
    let lm = f.lm();
    let (embeds, mut mask) = f.with_prompt(
        f.get("prompt"),
        f.get("generate.input_ids"),
        f.get("generate.attention_mask"),
    );
    let want_tokens = to_vec2_i64(f.get("generate.new_tokens"));
    let steps = want_tokens[0].len();
    let step_logits = f.get("generate.step_logits");

    let mut cache = KvCache::new(lm.info().n_layers);
    let got = greedy_with_cache(lm, &embeds, &mut mask, &mut cache, step_logits);
    // The prefill cached prompt + input (5 + 7), every step but the last one more.
    assert_eq!(cache.seq_len(), 5 + 7 + steps - 1);
    assert_eq!(got, want_tokens, "generate.new_tokens");
    assert_eq!(
        f.json["results"]["generate"]["new_tokens"],
        serde_json::json!(want_tokens),
        "fixture json and tensors agree"
    );
}

#[test]
fn unpadded_examples() {
    let f = fixture();
    let examples = f.json["batch"]["examples_unpadded"].as_array().unwrap();
    for (i, ex) in examples.iter().enumerate() {
        let ids: Vec<i64> = ["source", "target"]
            .iter()
            .flat_map(|k| {
                ex[*k]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_i64().unwrap())
            })
            .collect();
        let s = ids.len();
        let ids = Tensor::from_vec(ids, (1, s), &Device::Cpu).unwrap();
        let mask = Tensor::ones((1, s), DType::F32, &Device::Cpu).unwrap();
        let (embeds, mask) = f.with_prompt(f.get("prompt"), &ids, &mask);
        let logits = f
            .lm()
            .forward(&embeds, &mask, None, LogitsAt::All)
            .unwrap()
            .squeeze(0)
            .unwrap();
        assert_close(
            &format!("unpadded.{i}.logits"),
            &logits,
            f.get(&format!("unpadded.{i}.logits")),
            TOL_LOGITS,
        );
    }
}

#[test]
fn bad_mask_shape_is_an_error() {
    let f = fixture();
    let ids = as_u32(f.get("input_ids"));
    let embeds = f.lm().embed(&ids).unwrap();
    let mask = Tensor::ones((3, 4), DType::F32, &Device::Cpu).unwrap();
    let err = f
        .lm()
        .forward(&embeds, &mask, None, LogitsAt::All)
        .expect_err("error");
    assert!(err.to_string().contains("mask"), "{err}");
}
