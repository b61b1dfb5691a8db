//! Llama 3 RoPE scaling (llama3, linear, dynamic NTK), Qwen2, Qwen3 and Phi-3 against their
//! tiny fixtures (transformers + PEFT, tests/fixtures/make_family_fixtures_a.py): logits,
//! loss, prompt gradient, KV-cached greedy generation and tokenizer ids, each from the HF
//! folder and from the GGUF file written from the same weights; finite differences of the
//! prompt gradient; and an error for every refused variant.

mod common;

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::QTensor;
use candle_core::{DType, Device, Tensor, Var};
use common::*;
use softprompt::load::{load_model, Model};
use softprompt::model::{Arch, Backbone, CausalLm, Kernels, KvCache, LogitsAt};
use softprompt::train::metrics;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

const FAMILIES: [(&str, Arch); 4] = [
    ("llama3-tiny", Arch::Llama),
    ("qwen2-tiny", Arch::Qwen2),
    ("qwen3-tiny", Arch::Qwen3),
    ("phi3-tiny", Arch::Phi3),
];

fn lm(m: &Model) -> &dyn CausalLm {
    match &m.backbone {
        Backbone::Causal(c) => c.as_ref(),
        Backbone::Seq2Seq(_) => panic!("a decoder-only fixture loaded as seq2seq"),
    }
}

/// The HF folder and the GGUF file of a fixture.
fn both(name: &str) -> [(&'static str, Model); 2] {
    let dir = fixture_dir(name);
    let load = |p: PathBuf| load_model(&p, &Device::Cpu).unwrap_or_else(|e| panic!("{name}: {e}"));
    [
        ("hf", load(dir.clone())),
        ("gguf", load(dir.join("model.gguf"))),
    ]
}

fn get<'a>(t: &'a HashMap<String, Tensor>, key: &str) -> &'a Tensor {
    t.get(key).unwrap_or_else(|| panic!("fixture tensor {key}"))
}

/// Mean cross-entropy of the fixture batch with `prompt`: position `t` predicts label `t+1`
/// of `[-100]*N + labels`, logits at those rows only.
fn loss(lm: &dyn CausalLm, t: &HashMap<String, Tensor>, prompt: &Tensor) -> Tensor {
    let (ids, mask, labels) = (
        get(t, "input_ids"),
        get(t, "attention_mask"),
        get(t, "labels"),
    );
    prompted_loss(lm, prompt, ids, mask, labels)
}

/// KV-cached greedy decoding from `[prompt ; embed(ids)]`, every step's logits checked
/// against `step_logits [steps, B, V]`: the tokens `[B][steps]`.
fn greedy(
    lm: &dyn CausalLm,
    prompt: &Tensor,
    ids: &Tensor,
    mask: &Tensor,
    step_logits: &Tensor,
) -> Vec<Vec<i64>> {
    let (embeds, mut mask) = with_prompt(lm, prompt, ids, mask);
    let mut cache = KvCache::new(lm.info().n_layers);
    greedy_with_cache(lm, &embeds, &mut mask, &mut cache, step_logits)
}

#[test]
fn info_of_each_family() {
    for (name, arch) in FAMILIES {
        let json = expected_json(name);
        let vocab = json["tokenizer"]["vocab_size"].as_u64().unwrap() as usize;
        for (how, m) in both(name) {
            let info = lm(&m).info();
            assert_eq!(info.arch, arch, "{name} ({how})");
            assert_eq!(
                (info.d_model, info.vocab_size, info.n_layers),
                (32, vocab, 2),
                "{name} ({how})"
            );
            assert_eq!(info.eos_token_ids, vec![0], "{name} ({how})");
        }
    }
}

#[test]
fn logits_loss_and_gradient_match_transformers() {
    for (name, _) in FAMILIES {
        let t = expected_tensors(name);
        let prompt = get(&t, "prompt");
        for (how, m) in both(name) {
            let lm = lm(&m);
            let what = |q: &str| format!("{name} ({how}): {q}");
            let (embeds, mask) =
                with_prompt(lm, prompt, get(&t, "input_ids"), get(&t, "attention_mask"));
            let logits = lm.forward(&embeds, &mask, None, LogitsAt::All).unwrap();
            assert_close(&what("logits"), &logits, get(&t, "logits"), TOL_LOGITS);
            let states = lm.hidden_states(&embeds, &mask).unwrap();
            for (i, s) in states.iter().enumerate() {
                let want = get(&t, "hidden_states").get(i).unwrap();
                assert_close(&what(&format!("hidden_states[{i}]")), s, &want, TOL_HIDDEN);
            }

            let var = Var::from_tensor(prompt).unwrap();
            let l = loss(lm, &t, var.as_tensor());
            let want = scalar(get(&t, "loss"));
            assert!(
                (scalar(&l) - want).abs() <= TOL_LOSS,
                "{}: {} vs {want}",
                what("loss"),
                scalar(&l)
            );
            let grads = l.backward().unwrap();
            let g = grads.get(var.as_tensor()).expect("prompt gradient");
            let want = get(&t, "grad_prompt");
            assert_close(&what("grad_prompt"), g, want, TOL_GRAD_REL * max_abs(want));
        }
    }
}

#[test]
fn logits_without_prompt_at_real_positions() {
    for (name, _) in FAMILIES {
        let t = expected_tensors(name);
        let mask = get(&t, "attention_mask");
        for (how, m) in both(name) {
            let lm = lm(&m);
            let embeds = lm.embed(&as_u32(get(&t, "input_ids"))).unwrap();
            let logits = lm
                .forward(
                    &embeds,
                    &mask.to_dtype(DType::F32).unwrap(),
                    None,
                    LogitsAt::All,
                )
                .unwrap();
            for (b, row) in to_vec2_i64(mask).iter().enumerate() {
                for (i, _) in row.iter().enumerate().filter(|(_, &real)| real == 1) {
                    let got = logits.get(b).unwrap().get(i).unwrap();
                    let want = get(&t, "logits_no_prompt").get(b).unwrap().get(i).unwrap();
                    assert_close(
                        &format!("{name} ({how}): logits_no_prompt[{b}, {i}]"),
                        &got,
                        &want,
                        TOL_LOGITS,
                    );
                }
            }
        }
    }
}

#[test]
fn greedy_generation_with_kv_cache() {
    for (name, _) in FAMILIES {
        let t = expected_tensors(name);
        let want = to_vec2_i64(get(&t, "generate.new_tokens"));
        for (how, m) in both(name) {
            let (ids, mask) = (
                get(&t, "generate.input_ids"),
                get(&t, "generate.attention_mask"),
            );
            let steps = get(&t, "generate.step_logits");
            let tokens = greedy(lm(&m), get(&t, "prompt"), ids, mask, steps);
            assert_eq!(tokens, want, "{name} ({how}): generate.new_tokens");
        }
    }
}

/// The default (fast) kernels against the composite reference path, gradient included.
#[test]
fn fast_kernels_equal_the_reference_path() {
    for (name, _) in FAMILIES {
        let t = expected_tensors(name);
        let mut m = load_model(&fixture_dir(name), &Device::Cpu).unwrap();
        let run = |m: &Model| {
            let var = Var::from_tensor(get(&t, "prompt")).unwrap();
            let l = loss(lm(m), &t, var.as_tensor());
            let g = l.backward().unwrap().get(var.as_tensor()).unwrap().clone();
            (scalar(&l), g)
        };
        let (fast_loss, fast_grad) = run(&m);
        m.backbone.set_kernels(Kernels::reference());
        let (ref_loss, ref_grad) = run(&m);
        assert!(
            (fast_loss - ref_loss).abs() <= 1e-5,
            "{name}: loss {fast_loss} vs {ref_loss}"
        );
        assert_close(
            &format!("{name}: gradient"),
            &fast_grad,
            &ref_grad,
            1e-5 * max_abs(&ref_grad),
        );
    }
}

/// Central differences on a few prompt entries of each family (see
/// [`common::check_prompt_grad_by_finite_differences`]).
#[test]
fn grad_prompt_finite_differences() {
    for (name, _) in FAMILIES {
        let t = expected_tensors(name);
        let m = load_model(&fixture_dir(name), &Device::Cpu).unwrap();
        check_prompt_grad_by_finite_differences(get(&t, "prompt"), |p| loss(lm(&m), &t, p));
    }
}

#[test]
fn tokenizer_ids_from_folder_and_gguf() {
    for (name, _) in FAMILIES {
        let json = expected_json(name);
        for (how, m) in both(name) {
            let tok = m.tokenizer().unwrap();
            for s in json["tokenizer"]["sentences"].as_array().unwrap() {
                let text = s["text"].as_str().unwrap();
                let want: Vec<u32> = s["ids"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_u64().unwrap() as u32)
                    .collect();
                assert_eq!(
                    tok.encode_input(text).unwrap(),
                    want,
                    "{name} ({how}): {text:?}"
                );
            }
        }
    }
}

/// Prompt tuning learns the toy mapping of tests/trainer.rs on every family (the head norms
/// of Qwen3 and the stacked projections of Phi-3 included): the loss falls by more
/// than an order of magnitude (to about 0.02 - 0.2 on these random models).
#[test]
fn prompt_tuning_learns_a_toy_mapping() {
    for (name, _) in FAMILIES {
        let m = fixture_model(name);
        let data = toy_data(32, 1, eos(&m));
        let dir = tempdir();
        let cfg = toy_config(dir.path());
        let report = softprompt::train(&m, &data, None, &cfg).unwrap();
        let rows = metrics::read(&dir.path().join(metrics::FILE)).unwrap();
        let first = rows.first().unwrap().loss;
        let tail: Vec<f64> = rows.iter().rev().take(10).map(|r| r.loss).collect();
        let last = tail.iter().sum::<f64>() / tail.len() as f64;
        assert!(
            first > 1.0,
            "{name}: the untrained prompt knows the mapping ({first})"
        );
        assert!(
            last < first / 10.0,
            "{name}: loss {first} -> {last} after {} steps",
            report.steps
        );
    }
}

// ---- llama3-tiny's weights under the linear and dynamic-NTK rope configs ----

/// A copy of fixture `base` (config and weights) in `tmp` whose config.json has `update`
/// applied.
fn variant_folder(tmp: &Path, base: &str, update: &serde_json::Value) -> PathBuf {
    let src = fixture_dir(base);
    let dir = tmp.join("variant");
    std::fs::create_dir_all(&dir).unwrap();
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    for (k, v) in update.as_object().unwrap() {
        cfg[k] = v.clone();
    }
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    std::fs::copy(src.join("model.safetensors"), dir.join("model.safetensors")).unwrap();
    dir
}

#[test]
fn linear_and_dynamic_rope_scaling() {
    let t = expected_tensors("llama3-tiny");
    let json = expected_json("llama3-tiny");
    for variant in ["linear", "dynamic"] {
        let tmp = tempdir();
        let update = &json["results"]["variants"][variant]["config_update"];
        let m = load_model(
            &variant_folder(tmp.path(), "llama3-tiny", update),
            &Device::Cpu,
        )
        .unwrap();
        let lm = lm(&m);
        let prompt = get(&t, "prompt");
        let (embeds, mask) =
            with_prompt(lm, prompt, get(&t, "input_ids"), get(&t, "attention_mask"));
        let logits = lm.forward(&embeds, &mask, None, LogitsAt::All).unwrap();
        let key = |k: &str| format!("variant.{variant}.{k}");
        assert_close(&key("logits"), &logits, get(&t, &key("logits")), TOL_LOGITS);
        let want = to_vec2_i64(get(&t, &key("new_tokens")));
        let (ids, gen_mask) = (
            get(&t, "generate.input_ids"),
            get(&t, "generate.attention_mask"),
        );
        let tokens = greedy(lm, prompt, ids, gen_mask, get(&t, &key("step_logits")));
        assert_eq!(tokens, want, "{}", key("new_tokens"));
    }
}

#[test]
fn dynamic_ntk_keeps_the_kv_cache_in_place() {
    let tmp = tempdir();
    let update = serde_json::json!({"rope_parameters": {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 4.0}, "max_position_embeddings": 8});
    let m = load_model(
        &variant_folder(tmp.path(), "llama3-tiny", &update),
        &Device::Cpu,
    )
    .unwrap();
    assert_eq!(
        lm(&m).info().max_positions,
        Some(32),
        "dynamic NTK runs to factor x the trained length"
    );
    let mut cache = KvCache::new(2);
    let x = Tensor::ones((1, 3, 32), DType::F32, &Device::Cpu).unwrap();
    let mask = Tensor::ones((1, 3), DType::F32, &Device::Cpu).unwrap();
    lm(&m)
        .forward(&x, &mask, Some(&mut cache), LogitsAt::Last)
        .unwrap();
    assert!(
        !lm(&m).shift_cache(&mut cache, 2).unwrap(),
        "keys rotated at one length cannot be moved"
    );
}

// ---- refused variants: each an error naming the field and the value ----

/// The error of loading fixture `base` with `update` applied to its config.json.
fn refused_folder(base: &str, update: serde_json::Value) -> String {
    let tmp = tempdir();
    match load_model(&variant_folder(tmp.path(), base, &update), &Device::Cpu) {
        Ok(_) => panic!("{base} with {update} loaded"),
        Err(e) => e.to_string(),
    }
}

#[track_caller]
fn assert_names(err: &str, parts: &[&str]) {
    for p in parts {
        assert!(err.contains(p), "error does not name `{p}`: {err}");
    }
}

#[test]
fn unknown_rope_type_is_refused() {
    let err = refused_folder(
        "llama3-tiny",
        serde_json::json!({"rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0}}),
    );
    assert_names(&err, &["rope_parameters.rope_type", "yarn"]);
}

#[test]
fn rope_scaling_of_transformers_4_is_read_and_checked() {
    let err = refused_folder(
        "llama3-tiny",
        serde_json::json!({"rope_parameters": null, "rope_theta": 10000.0, "rope_scaling": {"type": "longrope", "factor": 2.0}}),
    );
    assert_names(&err, &["rope_scaling.type", "longrope"]);
}

#[test]
fn unknown_rope_field_is_refused() {
    let err = refused_folder(
        "llama3-tiny",
        serde_json::json!({"rope_parameters": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0, "beta_fast": 32}}),
    );
    assert_names(&err, &["rope_parameters.beta_fast", "32", "linear"]);
}

#[test]
fn llama3_rope_without_its_fields_is_refused() {
    let err = refused_folder(
        "llama3-tiny",
        serde_json::json!({"rope_parameters": {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0}}),
    );
    assert_names(&err, &["low_freq_factor", "missing"]);
}

#[test]
fn partial_rotary_factor_is_refused() {
    let err = refused_folder(
        "phi3-tiny",
        serde_json::json!({"partial_rotary_factor": 0.75}),
    );
    assert_names(&err, &["partial_rotary_factor", "0.75"]);
}

#[test]
fn phi3_longrope_is_refused() {
    let err = refused_folder(
        "phi3-tiny",
        serde_json::json!({"rope_parameters": {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0], "long_factor": [2.0]}}),
    );
    assert_names(&err, &["rope_parameters.rope_type", "longrope"]);
}

#[test]
fn qwen_sliding_window_layers_are_refused() {
    let err = refused_folder(
        "qwen2-tiny",
        serde_json::json!({"use_sliding_window": true}),
    );
    assert_names(&err, &["use_sliding_window", "true"]);
    let err = refused_folder(
        "qwen3-tiny",
        serde_json::json!({"layer_types": ["full_attention", "sliding_attention"]}),
    );
    assert_names(&err, &["layer_types[1]", "sliding_attention"]);
}

#[test]
fn other_activations_are_refused() {
    let err = refused_folder("qwen2-tiny", serde_json::json!({"hidden_act": "gelu"}));
    assert_names(&err, &["hidden_act", "gelu"]);
}

#[test]
fn phi3_sliding_window_caps_the_length() {
    let tmp = tempdir();
    let update = serde_json::json!({"sliding_window": 100});
    let m = load_model(
        &variant_folder(tmp.path(), "phi3-tiny", &update),
        &Device::Cpu,
    )
    .unwrap();
    assert_eq!(lm(&m).info().max_positions, Some(100));
}

// ---- refused GGUF variants ----

/// The fixture's GGUF loaded after `edit` was applied to its metadata and `tensors` replaced
/// (`Some`: added or replaced, `None`: removed).
fn edited_gguf(
    base: &str,
    edit: impl FnOnce(&mut HashMap<String, Value>),
    tensors: &[(&str, Option<Tensor>)],
) -> softprompt::Result<Model> {
    let src = fixture_dir(base).join("model.gguf");
    let mut f = std::fs::File::open(&src).unwrap();
    let content = gguf_file::Content::read(&mut f).unwrap();
    let mut meta = content.metadata.clone();
    edit(&mut meta);
    let mut all: Vec<(String, QTensor)> = content
        .tensor_infos
        .keys()
        .map(|n| (n.clone(), content.tensor(&mut f, n, &Device::Cpu).unwrap()))
        .collect();
    for (n, t) in tensors {
        all.retain(|(name, _)| name != n);
        if let Some(t) = t {
            let q = QTensor::quantize(t, candle_core::quantized::GgmlDType::F32).unwrap();
            all.push((n.to_string(), q));
        }
    }
    let tmp = tempdir();
    let path = tmp.path().join("m.gguf");
    let meta: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let qt: Vec<(&str, &QTensor)> = all.iter().map(|(k, v)| (k.as_str(), v)).collect();
    gguf_file::write(&mut std::fs::File::create(&path).unwrap(), &meta, &qt).unwrap();
    load_model(&path, &Device::Cpu)
}

/// The error of loading the edited GGUF of [`edited_gguf`] (`extra` tensors added).
fn refused_gguf(
    base: &str,
    edit: impl FnOnce(&mut HashMap<String, Value>),
    extra: &[(&str, Tensor)],
) -> String {
    let extra: Vec<(&str, Option<Tensor>)> =
        extra.iter().map(|(n, t)| (*n, Some(t.clone()))).collect();
    match edited_gguf(base, edit, &extra) {
        Ok(_) => panic!("{base}: edited GGUF loaded"),
        Err(e) => e.to_string(),
    }
}

/// llama.cpp's linear scaling (`rope.scaling.type = linear`, factor 2) in place of the
/// `rope_freqs` divisors: transformers' `linear` logits.
#[test]
fn gguf_linear_rope_scaling_matches_transformers() {
    let m = edited_gguf(
        "llama3-tiny",
        |m| {
            m.insert(
                "llama.rope.scaling.type".into(),
                Value::String("linear".into()),
            );
            m.insert("llama.rope.scaling.factor".into(), Value::F32(2.0));
        },
        &[("rope_freqs.weight", None)],
    )
    .unwrap();
    let t = expected_tensors("llama3-tiny");
    let lm = lm(&m);
    let (ids, mask) = (get(&t, "input_ids"), get(&t, "attention_mask"));
    let (embeds, mask) = with_prompt(lm, get(&t, "prompt"), ids, mask);
    let logits = lm.forward(&embeds, &mask, None, LogitsAt::All).unwrap();
    let want = get(&t, "variant.linear.logits");
    assert_close("GGUF linear scaling", &logits, want, TOL_LOGITS);
}

#[test]
fn gguf_unknown_pre_tokenizer_is_refused() {
    let err = refused_gguf(
        "qwen2-tiny",
        |m| {
            m.insert(
                "tokenizer.ggml.pre".into(),
                Value::String("chatglm-bpe".into()),
            );
        },
        &[],
    );
    assert_names(&err, &["tokenizer.ggml.pre", "chatglm-bpe"]);
}

#[test]
fn gguf_add_eos_token_is_refused() {
    let err = refused_gguf(
        "qwen2-tiny",
        |m| {
            m.insert("tokenizer.ggml.add_eos_token".into(), Value::Bool(true));
        },
        &[],
    );
    assert_names(&err, &["tokenizer.ggml.add_eos_token", "true"]);
}

#[test]
fn gguf_yarn_rope_scaling_is_refused() {
    let err = refused_gguf(
        "qwen3-tiny",
        |m| {
            m.insert(
                "qwen3.rope.scaling.type".into(),
                Value::String("yarn".into()),
            );
        },
        &[],
    );
    assert_names(&err, &["qwen3.rope.scaling.type", "yarn"]);
}

#[test]
fn gguf_phi3_longrope_factors_are_refused() {
    let factors = Tensor::ones(8, DType::F32, &Device::Cpu).unwrap();
    let err = refused_gguf(
        "phi3-tiny",
        |_| {},
        &[("rope_factors_long.weight", factors)],
    );
    assert_names(&err, &["rope_factors_long.weight", "phi3"]);
}

#[test]
fn gguf_unknown_architecture_is_refused() {
    let err = refused_gguf(
        "qwen2-tiny",
        |m| {
            m.insert(
                "general.architecture".into(),
                Value::String("falcon".into()),
            );
        },
        &[],
    );
    assert_names(&err, &["general.architecture", "falcon"]);
}

#[test]
fn gguf_rope_freqs_of_the_wrong_length_are_refused() {
    let divisors = Tensor::ones(3, DType::F32, &Device::Cpu).unwrap();
    let err = refused_gguf("llama3-tiny", |_| {}, &[("rope_freqs.weight", divisors)]);
    assert_names(&err, &["rope_freqs.weight", "found 3"]);
}

#[test]
fn crafted_head_width_is_refused_before_any_allocation() {
    let err = refused_folder("qwen2-tiny", serde_json::json!({"head_dim": 1u64 << 40}));
    assert_names(&err, &["head_dim", "1099511627776"]);
    let err = refused_gguf(
        "qwen2-tiny",
        |m| {
            m.insert("qwen2.attention.key_length".into(), Value::U64(1 << 40));
            m.insert("qwen2.attention.value_length".into(), Value::U64(1 << 40));
            m.insert("qwen2.rope.dimension_count".into(), Value::U64(1 << 40));
        },
        &[],
    );
    assert_names(&err, &["head width 1099511627776"]);
}
