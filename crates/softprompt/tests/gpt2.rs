//! GPT-2 backbone against the gpt2-tiny golden fixture (PyTorch + transformers + PEFT), plus
//! finite-difference gradients and bad-input errors.

mod common;

use candle_core::{DType, Device, Tensor, Var, D};
use common::*;
use softprompt::load::{load_model, Model};
use softprompt::model::{ops, Arch, Backbone, CausalLm, KvCache, LogitsAt};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

const NAME: &str = "gpt2-tiny";
const N: usize = 5;

fn load() -> Model {
    load_model(&fixture_dir(NAME), &Device::Cpu).expect("load gpt2-tiny")
}

fn causal(model: &Model) -> &dyn CausalLm {
    match &model.backbone {
        Backbone::Causal(m) => m.as_ref(),
        Backbone::Seq2Seq(_) => panic!("gpt2-tiny loaded as seq2seq"),
    }
}

/// Mean cross-entropy of the batch with the given prompt, logits computed only where scored.
fn loss_with(m: &dyn CausalLm, prompt: &Tensor, ex: &HashMap<String, Tensor>) -> Tensor {
    let (embeds, mask) = with_prompt(m, prompt, &as_u32(&ex["input_ids"]), &ex["attention_mask"]);
    let (rows, targets) = loss_rows(&ex["labels"], N);
    let logits = m
        .forward(&embeds, &mask, None, LogitsAt::Rows(&rows))
        .unwrap(); // [M, V]
    ops::token_nll(&logits, &targets)
        .unwrap()
        .mean_all()
        .unwrap()
}

#[test]
fn info() {
    let model = load();
    let info = causal(&model).info();
    assert_eq!(info.arch, Arch::Gpt2);
    assert_eq!(info.d_model, 32);
    assert_eq!(info.vocab_size, 256);
    assert_eq!(info.n_layers, 2);
    assert_eq!(info.max_positions, Some(128));
    assert_eq!(info.eos_token_ids, vec![255]);
    assert_eq!(info.pad_token_id, Some(255));
    assert!(model.tokenizer.is_none());
}

#[test]
fn logits_no_prompt() {
    let model = load();
    let m = causal(&model);
    let ex = expected_tensors(NAME);
    let ids = as_u32(&ex["input_ids"]);
    let mask = ex["attention_mask"].to_dtype(DType::F32).unwrap(); // [B, S]
    let logits = m
        .forward(&m.embed(&ids).unwrap(), &mask, None, LogitsAt::All)
        .unwrap();
    let want = &ex["logits_no_prompt"];
    assert_eq!(logits.dims(), want.dims());
    // Leading pads attend to nothing without a prompt: compare real positions only.
    let diff = (logits - want)
        .unwrap()
        .abs()
        .unwrap()
        .broadcast_mul(&mask.unsqueeze(2).unwrap())
        .unwrap();
    let d = max_abs(&diff);
    assert!(d <= TOL_LOGITS, "logits_no_prompt: max abs diff {d}");
}

#[test]
fn logits_with_prompt() {
    let model = load();
    let m = causal(&model);
    let ex = expected_tensors(NAME);
    let (embeds, mask) = with_prompt(
        m,
        &ex["prompt"],
        &as_u32(&ex["input_ids"]),
        &ex["attention_mask"],
    );
    let logits = m.forward(&embeds, &mask, None, LogitsAt::All).unwrap();
    assert_close("logits", &logits, &ex["logits"], TOL_LOGITS);
}

#[test]
fn hidden_states() {
    let model = load();
    let m = causal(&model);
    let ex = expected_tensors(NAME);
    let (embeds, mask) = with_prompt(
        m,
        &ex["prompt"],
        &as_u32(&ex["input_ids"]),
        &ex["attention_mask"],
    );
    let hs = m.hidden_states(&embeds, &mask).unwrap();
    assert_eq!(hs.len(), 3);
    let hs = Tensor::stack(&hs, 0).unwrap(); // [L+1, B, N+S, D]
    assert_close("hidden_states", &hs, &ex["hidden_states"], TOL_HIDDEN);
}

#[test]
fn loss_and_rows_equal_all() {
    let model = load();
    let m = causal(&model);
    let ex = expected_tensors(NAME);
    let loss = scalar(&loss_with(m, &ex["prompt"], &ex));
    let want = scalar(&ex["loss"]);
    assert!((loss - want).abs() <= TOL_LOSS, "loss {loss} vs {want}");

    // LogitsAt::All, then pick the same rows: same loss.
    let (embeds, mask) = with_prompt(
        m,
        &ex["prompt"],
        &as_u32(&ex["input_ids"]),
        &ex["attention_mask"],
    );
    let (rows, targets) = loss_rows(&ex["labels"], N);
    assert_eq!(rows.dim(0).unwrap(), 9, "n_loss_tokens");
    let all = m.forward(&embeds, &mask, None, LogitsAt::All).unwrap(); // [B, N+S, V]
    let (b, t, v) = all.dims3().unwrap();
    let picked = all
        .reshape((b * t, v))
        .unwrap()
        .index_select(&rows, 0)
        .unwrap();
    let loss_all = scalar(
        &ops::token_nll(&picked, &targets)
            .unwrap()
            .mean_all()
            .unwrap(),
    );
    assert!(
        (loss_all - loss).abs() <= 1e-6,
        "Rows {loss} vs All {loss_all}"
    );
}

#[test]
fn grad_prompt() {
    let model = load();
    let m = causal(&model);
    let ex = expected_tensors(NAME);
    let prompt = Var::from_tensor(&ex["prompt"]).unwrap();
    let loss = loss_with(m, prompt.as_tensor(), &ex);
    let grads = loss.backward().unwrap();
    let g = grads
        .get(prompt.as_tensor())
        .expect("the prompt has a gradient");
    let want = &ex["grad_prompt"];
    assert_close("grad_prompt", g, want, TOL_GRAD_REL * max_abs(want));
}

#[test]
fn grad_prompt_finite_differences() {
    let model = load();
    let m = causal(&model);
    let ex = expected_tensors(NAME);
    let prompt = Var::from_tensor(&ex["prompt"]).unwrap();
    let loss = loss_with(m, prompt.as_tensor(), &ex);
    let grads = loss.backward().unwrap();
    let g = grads
        .get(prompt.as_tensor())
        .expect("the prompt has a gradient")
        .to_vec2::<f32>()
        .unwrap();
    let gmax = g.iter().flatten().fold(0f32, |a, x| a.max(x.abs()));

    let base = ex["prompt"].to_vec2::<f32>().unwrap();
    let h = 1e-2f32;
    // The f32 loss (~10) carries ~1e-6 round-off, so central differences with h = 1e-2 are
    // good to ~1e-4 plus O(h^2) truncation (measured: <= 5e-5); allow 0.2% of max |grad|.
    let tol = 2e-3 * gmax;
    for &(i, j) in &[(0, 0), (1, 13), (2, 7), (3, 20), (4, 31)] {
        let eval = |delta: f32| {
            let mut p = base.clone();
            p[i][j] += delta;
            let p = Tensor::new(p, &Device::Cpu).unwrap();
            scalar(&loss_with(m, &p, &ex))
        };
        let fd = (eval(h) - eval(-h)) / (2.0 * h);
        assert!(
            (fd - g[i][j]).abs() <= tol,
            "prompt[{i}][{j}]: finite difference {fd} vs autodiff {} (tol {tol})",
            g[i][j]
        );
    }
}

#[test]
fn greedy_generation_with_cache() {
    let model = load();
    let m = causal(&model);
    let ex = expected_tensors(NAME);
    let (embeds, mut mask) = with_prompt(
        m,
        &ex["prompt"],
        &as_u32(&ex["generate.input_ids"]),
        &ex["generate.attention_mask"],
    );
    let b = embeds.dim(0).unwrap();
    let step_logits = &ex["generate.step_logits"]; // [6, B, V]
    let mut cache = KvCache::new(m.info().n_layers);
    let mut logits = m
        .forward(&embeds, &mask, Some(&mut cache), LogitsAt::Last)
        .unwrap(); // [B, V]
    let mut tokens = Vec::new();
    for step in 0..6 {
        assert_close(
            &format!("step_logits[{step}]"),
            &logits,
            &step_logits.get(step).unwrap(),
            TOL_LOGITS,
        );
        let next = logits
            .argmax(D::Minus1)
            .unwrap()
            .to_dtype(DType::U32)
            .unwrap(); // [B]
        tokens.push(next.clone());
        if step == 5 {
            break;
        }
        let ones = Tensor::ones((b, 1), DType::F32, &Device::Cpu).unwrap();
        mask = Tensor::cat(&[&mask, &ones], 1).unwrap();
        let e = m.embed(&next.unsqueeze(1).unwrap()).unwrap(); // [B, 1, D]
        logits = m
            .forward(&e, &mask, Some(&mut cache), LogitsAt::Last)
            .unwrap();
    }
    assert_eq!(cache.seq_len(), N + 7 + 5);
    let got = to_vec2_i64(&Tensor::stack(&tokens, 1).unwrap());
    assert_eq!(got, to_vec2_i64(&ex["generate.new_tokens"]));
}

#[test]
fn unpadded_examples() {
    let model = load();
    let m = causal(&model);
    let ex = expected_tensors(NAME);
    let json = expected_json(NAME);
    let examples = json["batch"]["examples_unpadded"].as_array().unwrap();
    assert_eq!(examples.len(), 3);
    for (i, e) in examples.iter().enumerate() {
        let ids: Vec<u32> = ["source", "target"]
            .iter()
            .flat_map(|k| {
                e[*k]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_u64().unwrap() as u32)
            })
            .collect();
        let s = ids.len();
        let ids = Tensor::from_vec(ids, (1, s), &Device::Cpu).unwrap();
        let mask = Tensor::ones((1, s), DType::F32, &Device::Cpu).unwrap();
        let (embeds, mask) = with_prompt(m, &ex["prompt"], &ids, &mask);
        let logits = m
            .forward(&embeds, &mask, None, LogitsAt::All)
            .unwrap()
            .squeeze(0)
            .unwrap();
        assert_close(
            &format!("unpadded.{i}.logits"),
            &logits,
            &ex[&format!("unpadded.{i}.logits")],
            TOL_LOGITS,
        );
    }
}

#[test]
fn too_long_sequence_is_an_error() {
    let model = load();
    let m = causal(&model);
    let embeds = Tensor::zeros((1, 129, 32), DType::F32, &Device::Cpu).unwrap();
    let mask = Tensor::ones((1, 129), DType::F32, &Device::Cpu).unwrap();
    let err = m
        .forward(&embeds, &mask, None, LogitsAt::Last)
        .expect_err("129 > n_positions");
    assert!(err.to_string().contains("n_positions"), "{err}");

    // With a cache: 120 cached + 9 new.
    let mut cache = KvCache::new(2);
    let e = embeds.narrow(1, 0, 120).unwrap();
    m.forward(
        &e,
        &mask.narrow(1, 0, 120).unwrap(),
        Some(&mut cache),
        LogitsAt::Last,
    )
    .unwrap();
    let e = embeds.narrow(1, 0, 9).unwrap();
    let err = m
        .forward(&e, &mask, Some(&mut cache), LogitsAt::Last)
        .expect_err("129 > n_positions");
    assert!(err.to_string().contains("n_positions"), "{err}");
}

/// A fresh copy of the fixture folder (config, weights) in the temp dir.
fn temp_copy(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("softprompt-gpt2-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(fixture_dir(NAME).join(f), dir.join(f)).unwrap();
    }
    dir
}

fn load_err(dir: &Path) -> String {
    match load_model(dir, &Device::Cpu) {
        Ok(_) => panic!("{} loaded although it is broken", dir.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn weights_without_transformer_prefix() {
    let dir = temp_copy("noprefix");
    let path = dir.join("model.safetensors");
    let tensors = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    let renamed: HashMap<String, Tensor> = tensors
        .into_iter()
        .map(|(k, v)| (k.strip_prefix("transformer.").unwrap_or(&k).to_string(), v))
        .collect();
    assert!(renamed.contains_key("h.0.attn.c_attn.weight"));
    candle_core::safetensors::save(&renamed, &path).unwrap();

    let model = load_model(&dir, &Device::Cpu).expect("load without prefix");
    let m = causal(&model);
    let ex = expected_tensors(NAME);
    let (embeds, mask) = with_prompt(
        m,
        &ex["prompt"],
        &as_u32(&ex["input_ids"]),
        &ex["attention_mask"],
    );
    let logits = m.forward(&embeds, &mask, None, LogitsAt::All).unwrap();
    assert_close("logits (no prefix)", &logits, &ex["logits"], TOL_LOGITS);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn config_without_n_embd_is_an_error() {
    let dir = temp_copy("config");
    let path = dir.join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    cfg.as_object_mut().unwrap().remove("n_embd");
    std::fs::write(&path, serde_json::to_string_pretty(&cfg).unwrap()).unwrap();
    let msg = load_err(&dir);
    assert!(
        msg.contains("config.json") && msg.contains("n_embd"),
        "{msg}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn truncated_weights_are_an_error() {
    let dir = temp_copy("truncated");
    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let msg = load_err(&dir);
    assert!(msg.contains("model.safetensors"), "{msg}");
    std::fs::remove_dir_all(&dir).unwrap();
}
