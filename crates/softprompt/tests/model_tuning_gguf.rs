//! Model tuning of a GGUF Llama file: the weights are trained as f32 variables and written as
//! a Hugging Face folder (q/k rows back in HF order). The GGUF files are made here from the
//! llama-tiny fixture (transformers weights) with llama.cpp's converter permutation, so the
//! exported folder must give back the fixture's weights and transformers' logits.

mod common;

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use common::*;
use softprompt::batch::Example;
use softprompt::load::{load_model, Model};
use softprompt::model::{Backbone, CausalLm, LogitsAt};
use softprompt::train::optim::{AdamWConfig, OptimizerConfig};
use softprompt::train::schedule::Schedule;
use softprompt::train::{model_tuning, TrainConfig};
use std::collections::HashMap;
use std::path::Path;

const NAME: &str = "llama-tiny";
const HEADS: usize = 4;
const KV_HEADS: usize = 2;

/// llama.cpp's HF -> GGUF permutation of q/k rows (convert_hf_to_gguf.py):
/// `reshape(n_head, 2, head_dim / 2, in).swapaxes(1, 2)`.
fn permute(w: &Tensor, n_head: usize) -> Tensor {
    let (rows, cols) = w.dims2().unwrap();
    w.reshape((n_head, 2, rows / n_head / 2, cols))
        .unwrap()
        .transpose(1, 2)
        .unwrap()
        .contiguous()
        .unwrap()
        .reshape((rows, cols))
        .unwrap()
}

/// GGUF name of a Hugging Face Llama tensor name.
fn gguf_name(hf: &str) -> String {
    let fixed = [
        ("model.embed_tokens.weight", "token_embd.weight"),
        ("model.norm.weight", "output_norm.weight"),
        ("lm_head.weight", "output.weight"),
    ];
    if let Some((_, g)) = fixed.iter().find(|(h, _)| *h == hf) {
        return g.to_string();
    }
    let rest = hf.strip_prefix("model.layers.").unwrap();
    let (layer, part) = rest.split_once('.').unwrap();
    let part = [
        ("self_attn.q_proj", "attn_q"),
        ("self_attn.k_proj", "attn_k"),
        ("self_attn.v_proj", "attn_v"),
        ("self_attn.o_proj", "attn_output"),
        ("mlp.gate_proj", "ffn_gate"),
        ("mlp.up_proj", "ffn_up"),
        ("mlp.down_proj", "ffn_down"),
        ("input_layernorm", "attn_norm"),
        ("post_attention_layernorm", "ffn_norm"),
    ]
    .iter()
    .find_map(|(h, g)| part.strip_prefix(h).map(|kind| format!("{g}{kind}")))
    .unwrap_or_else(|| panic!("no GGUF name for {hf}"));
    format!("blk.{layer}.{part}")
}

/// The fixture's weights (transformers' safetensors).
fn fixture_weights() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture_dir(NAME).join("model.safetensors"), &Device::Cpu)
        .unwrap()
        .into_iter()
        .map(|(k, v)| (k, v.to_dtype(DType::F32).unwrap()))
        .collect()
}

/// Byte-level BPE vocabulary of 256 tokens: three control tokens, printable ASCII, `Ġ`, `Ċ`,
/// a few merges, then filler.
fn vocab() -> (Vec<String>, Vec<String>, Vec<i32>) {
    let mut tokens: Vec<String> = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    tokens.extend((b'!'..=b'~').map(|b| (b as char).to_string()));
    tokens.extend(["\u{120}", "\u{10a}"].map(String::from));
    let merges: Vec<String> = ["\u{120} t", "h e", "\u{120}t he", "i n", "\u{120} g"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    tokens.extend(merges.iter().map(|m| m.replace(' ', "")));
    let mut i = 0;
    while tokens.len() < 256 {
        tokens.push(format!("<extra_{i}>"));
        i += 1;
    }
    let types = (0..tokens.len()).map(|i| if i < 3 { 3 } else { 1 }).collect();
    (tokens, merges, types)
}

/// Writes the fixture as a GGUF Llama file: q/k rows permuted as llama.cpp does, the matrices
/// stored as `matrix` (F32 or a quantised type), the norms as F32; the fixture's config and a
/// byte-level BPE tokenizer in the metadata.
fn write_gguf(path: &Path, matrix: GgmlDType, add_bos: bool) {
    let mut tensors: Vec<(String, QTensor)> = Vec::new();
    let mut weights: Vec<_> = fixture_weights().into_iter().collect();
    weights.sort_by(|a, b| a.0.cmp(&b.0));
    for (name, t) in weights {
        let t = if name.contains("q_proj") {
            permute(&t, HEADS)
        } else if name.contains("k_proj") {
            permute(&t, KV_HEADS)
        } else {
            t
        };
        let dtype = if t.rank() == 2 { matrix } else { GgmlDType::F32 };
        tensors.push((gguf_name(&name), QTensor::quantize(&t, dtype).unwrap()));
    }
    let (tokens, merges, types) = vocab();
    let strings = |v: &[String]| Value::Array(v.iter().map(|s| Value::String(s.clone())).collect());
    let metadata: Vec<(&str, Value)> = vec![
        ("general.architecture", Value::String("llama".into())),
        ("llama.context_length", Value::U32(2048)),
        ("llama.embedding_length", Value::U32(32)),
        ("llama.feed_forward_length", Value::U32(64)),
        ("llama.block_count", Value::U32(2)),
        ("llama.attention.head_count", Value::U32(HEADS as u32)),
        ("llama.attention.head_count_kv", Value::U32(KV_HEADS as u32)),
        ("llama.rope.freq_base", Value::F32(10000.0)),
        ("llama.rope.dimension_count", Value::U32(8)),
        ("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-5)),
        ("tokenizer.ggml.model", Value::String("gpt2".into())),
        ("tokenizer.ggml.pre", Value::String("smollm".into())),
        ("tokenizer.ggml.tokens", strings(&tokens)),
        ("tokenizer.ggml.merges", strings(&merges)),
        ("tokenizer.ggml.token_type", Value::Array(types.into_iter().map(Value::I32).collect())),
        ("tokenizer.ggml.bos_token_id", Value::U32(1)),
        ("tokenizer.ggml.eos_token_id", Value::U32(2)),
        ("tokenizer.ggml.padding_token_id", Value::U32(2)),
        ("tokenizer.ggml.add_bos_token", Value::Bool(add_bos)),
    ];
    let meta: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (*k, v)).collect();
    let qt: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut f = std::fs::File::create(path).unwrap();
    gguf_file::write(&mut f, &meta, &qt).unwrap();
}

fn lm(m: &Model) -> &dyn CausalLm {
    match &m.backbone {
        Backbone::Causal(c) => c.as_ref(),
        Backbone::Seq2Seq(_) => panic!("a Llama loaded as seq2seq"),
    }
}

/// Logits `[T, V]` of one unpadded row.
fn logits(m: &Model, ids: &[u32]) -> Tensor {
    let ids = Tensor::from_slice(ids, (1, ids.len()), &Device::Cpu).unwrap();
    let mask = Tensor::ones(ids.dims(), DType::F32, &Device::Cpu).unwrap();
    let embeds = lm(m).embed(&ids).unwrap();
    lm(m).forward(&embeds, &mask, None, LogitsAt::All)
        .unwrap()
        .squeeze(0)
        .unwrap()
}

/// Row 1 of the fixture batch (no padding) and transformers' logits for it `[9, 256]`.
fn reference_row() -> (Vec<u32>, Tensor) {
    let t = expected_tensors(NAME);
    let ids: Vec<u32> = to_vec2_i64(&t["input_ids"])[1].iter().map(|&i| i as u32).collect();
    let mask = to_vec2_i64(&t["attention_mask"]);
    assert!(mask[1].iter().all(|&m| m == 1), "row 1 of the fixture batch is unpadded");
    (ids, t["logits_no_prompt"].get(1).unwrap())
}

/// Eight fixed examples: source = filler + a class token, target = the class's token + EOS.
fn batch_of_8() -> Vec<Example> {
    (0..8u32)
        .map(|i| Example {
            source: vec![10 + i, 20 + 3 * i, [60, 70][i as usize % 2]],
            target: vec![[100, 200][i as usize % 2], 2],
        })
        .collect()
}

fn config(out: &Path, lr: f64, steps: usize) -> TrainConfig {
    let mut cfg = TrainConfig::paper(out);
    cfg.batch_size = 8;
    cfg.steps = steps;
    cfg.quiet = true;
    cfg.optimizer = OptimizerConfig::AdamW(AdamWConfig::new(0.01));
    cfg.schedule = Schedule::constant(lr);
    cfg
}


fn saved_weights(dir: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap()
}

#[test]
fn zero_lr_export_is_the_gguf_model_as_a_hf_folder() {
    let (ids, reference) = reference_row();
    let fixture = fixture_weights();
    for (matrix, add_bos) in [(GgmlDType::F32, false), (GgmlDType::Q8_0, true)] {
        let what = format!("{matrix:?}, add_bos {add_bos}");
        let dir = tempdir();
        let file = dir.path().join("tiny.gguf");
        write_gguf(&file, matrix, add_bos);
        let gguf = load_model(&file, &Device::Cpu).unwrap();
        let out = dir.path().join("tuned");
        let data = batch_of_8();
        // lr must be positive; an AdamW update of ~1e-30 is below f32 resolution of these
        // weights: the run is the export of the GGUF's own weights.
        model_tuning(&file, &Device::Cpu, &data, None, &config(&out, 1e-30, 1)).unwrap();

        // The folder loads with the HF loader (half-split RoPE) and computes the GGUF model
        // (adjacent-pair RoPE on permuted rows): only right if the rows were un-permuted.
        let hf = load_model(&out, &Device::Cpu).unwrap();
        let from_gguf = logits(&gguf, &ids);
        let from_hf = logits(&hf, &ids);
        assert_close(&format!("{what}: folder vs GGUF logits"), &from_hf, &from_gguf, 1e-5);
        if matrix == GgmlDType::F32 {
            // Unquantised: the fixture's own weights and transformers' logits.
            assert_close(&format!("{what}: folder vs transformers"), &from_hf, &reference, TOL_LOGITS);
            let saved = saved_weights(&out);
            let mut names: Vec<_> = saved.keys().collect();
            let mut want: Vec<_> = fixture.keys().collect();
            names.sort();
            want.sort();
            assert_eq!(names, want, "{what}: tensor names (tied: no lm_head)");
            for (name, t) in &fixture {
                assert_eq!(max_abs_diff(&saved[name], t), 0.0, "{what}: {name}");
            }
        }

        // config.json has the fixture's (transformers') LlamaConfig values.
        let config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
        let fixture_config: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(fixture_dir(NAME).join("config.json")).unwrap(),
        )
        .unwrap();
        for key in [
            "architectures",
            "model_type",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "rms_norm_eps",
            "vocab_size",
            "max_position_embeddings",
            "tie_word_embeddings",
            "bos_token_id",
            "eos_token_id",
            "pad_token_id",
        ] {
            assert_eq!(config[key], fixture_config[key], "{what}: config.json {key}");
        }
        assert_eq!(config["rope_theta"], fixture_config["rope_parameters"]["rope_theta"]);
        assert_eq!(config["torch_dtype"], "float32");

        // The tokenizer round-trips: same ids, same BOS rule.
        let (a, b) = (gguf.tokenizer().unwrap(), hf.tokenizer().unwrap());
        assert_eq!(b.add_bos, add_bos, "{what}: add_bos");
        for text in ["the thing in the gin", "Review: the\ntheme!<|im_end|>"] {
            assert_eq!(b.encode_input(text).unwrap(), a.encode_input(text).unwrap(), "{what}: {text:?}");
        }
        assert_eq!(b.eos_token_id, a.eos_token_id);
    }
}

#[test]
fn one_step_changes_the_weights_and_lowers_the_loss() {
    let dir = tempdir();
    let file = dir.path().join("tiny.gguf");
    write_gguf(&file, GgmlDType::F32, false);
    let gguf = load_model(&file, &Device::Cpu).unwrap();
    let data = batch_of_8();
    let before = mean_nll(&gguf, &data);
    let out = dir.path().join("tuned");
    let report = model_tuning(&file, &Device::Cpu, &data, Some(&data), &config(&out, 1e-3, 1)).unwrap();
    assert_eq!(report.steps, 1);
    assert!((report.first_loss - before).abs() < 1e-5, "step loss {} vs {before}", report.first_loss);

    let tuned = load_model(&out, &Device::Cpu).unwrap();
    let after = mean_nll(&tuned, &data);
    assert!(after < before, "loss on the repeated batch {before} -> {after}");
    // The folder is the model the run ended with (trained in GGUF layout).
    let in_memory = report.dev_loss.unwrap();
    assert!((after - in_memory).abs() < 1e-5, "reloaded {after} vs trained {in_memory}");

    let fixture = fixture_weights();
    let saved = saved_weights(&out);
    for (name, t) in &fixture {
        assert!(max_abs_diff(&saved[name], t) > 0.0, "{name} did not change");
    }
}
