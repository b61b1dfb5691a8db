//! The Llama backbone against the llama-tiny fixture (PyTorch + transformers + PEFT reference),
//! plus a finite-difference check of the prompt gradient.

mod common;

use candle_core::{DType, Device, Tensor, Var, D};
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
        let (b, _) = ids.dims2().unwrap();
        let (n, d) = prompt.dims2().unwrap();
        let tok = self.lm().embed(&as_u32(ids)).unwrap();
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
    fn loss_rows(&self, n: usize) -> (Tensor, Tensor) {
        let labels = to_vec2_i64(self.get("labels"));
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

fn scalar(t: &Tensor) -> f32 {
    t.flatten_all()
        .unwrap()
        .get(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
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

/// Central differences on a few prompt entries, in f32, Richardson-extrapolated from steps
/// h and 2h (truncation error O(h^4)); the rounding error of a loss of ~10 is ~1e-6 / h.
#[test]
fn grad_prompt_finite_differences() {
    let f = fixture();
    let prompt = f.get("prompt").clone();
    let var = Var::from_tensor(&prompt).unwrap();
    let grads = f.loss(var.as_tensor(), true).backward().unwrap();
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
        scalar(&f.loss(&t, true)) as f64
    };
    let h = 1e-2f32;
    // The 4 largest entries and the 2 smallest.
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

#[test]
fn greedy_generation_with_kv_cache() {
    let f = fixture();
    let lm = f.lm();
    let (embeds, mut mask) = f.with_prompt(
        f.get("prompt"),
        f.get("generate.input_ids"),
        f.get("generate.attention_mask"),
    );
    let b = embeds.dim(0).unwrap();
    let want_tokens = to_vec2_i64(f.get("generate.new_tokens"));
    let steps = want_tokens[0].len();
    let step_logits = f.get("generate.step_logits");

    let mut cache = KvCache::new(lm.info().n_layers);
    let mut logits = lm
        .forward(&embeds, &mask, Some(&mut cache), LogitsAt::Last)
        .unwrap(); // [B, V]
    assert_eq!(cache.seq_len(), 5 + 7);
    let mut got: Vec<Vec<i64>> = vec![Vec::new(); b];
    for step in 0..steps {
        assert_close(
            &format!("step_logits[{step}]"),
            &logits,
            &step_logits.get(step).unwrap(),
            TOL_LOGITS,
        );
        let next = logits.argmax_keepdim(D::Minus1).unwrap(); // [B, 1] u32
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
        mask = Tensor::cat(
            &[
                &mask,
                &Tensor::ones((b, 1), DType::F32, &Device::Cpu).unwrap(),
            ],
            1,
        )
        .unwrap();
        logits = lm
            .forward(&emb, &mask, Some(&mut cache), LogitsAt::Last)
            .unwrap();
    }
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
