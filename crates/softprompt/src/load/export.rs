//! Writing a Llama model read from a GGUF file (see [`super::gguf::read`]) as a Hugging Face
//! model folder that [`super::hf`] and transformers load: `model.safetensors` (f32, HF names,
//! q/k rows back in HF order), `config.json` (a `LlamaConfig`), `tokenizer.json` and
//! `tokenizer_config.json`.
//!
//! llama.cpp's converter permutes the rows of q/k for GGML's adjacent-pair RoPE: for a weight
//! `[n_heads * head_dim, in]` it is `reshape(n_heads, 2, head_dim / 2, in).swapaxes(1, 2)`,
//! so GGUF row `(h, i, j)` is HF row `(h, j, i)`. Transformers' RoPE rotates the two halves of
//! each head instead, so the rows must go back to HF order.

use crate::fsutil::write_atomic;
use crate::model::llama::{self, TokenIds};
use crate::model::rope::RopeFrequencies;
use crate::tokenizer::Tokenizer;
use crate::{Error, Result};
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::Path;

/// The rows of `t` (`[n_heads * head_dim, ...]`, a q/k weight or bias in GGUF's order) in
/// Hugging Face order: the inverse of llama.cpp's permutation (module doc).
pub fn unpermute_rows(t: &Tensor, n_heads: usize) -> Result<Tensor> {
    let dims = t.dims().to_vec();
    let rows = dims.first().copied().unwrap_or(0);
    if n_heads == 0 || rows % (2 * n_heads) != 0 {
        return Err(Error::invalid(format!(
            "cannot un-permute {dims:?} rows for {n_heads} heads: the rows are not n_heads * an even head_dim"
        )));
    }
    let rest: usize = dims[1..].iter().product();
    let half = rows / n_heads / 2;
    Ok(t.reshape((n_heads, half, 2, rest))? // [H, hd/2, 2, in]: GGUF order
        .transpose(1, 2)? // [H, 2, hd/2, in]: HF order
        .contiguous()?
        .reshape(dims)?)
}

/// The number of heads whose rows `name` (a Hugging Face tensor name) holds, for q and k.
fn rope_heads(name: &str, cfg: &llama::Config) -> Option<usize> {
    let base = name
        .strip_suffix(".weight")
        .or_else(|| name.strip_suffix(".bias"))?;
    if base.ends_with(".self_attn.q_proj") {
        Some(cfg.num_attention_heads)
    } else if base.ends_with(".self_attn.k_proj") {
        Some(cfg.num_kv_heads())
    } else {
        None
    }
}

/// Writes the Llama model of `cfg` with weights `tensors` (Hugging Face names, q/k rows in
/// GGUF order when `cfg.rope_interleaved`) and `tokenizer` as a Hugging Face model folder
/// `dir` (module doc). The head is tied to the embedding when `tensors` has no
/// `lm_head.weight` or the config says so; then only `model.embed_tokens.weight` is written.
pub fn write_hf_llama(
    dir: &Path,
    cfg: &llama::Config,
    tensors: &HashMap<String, Tensor>,
    tokenizer: &Tokenizer,
) -> Result<()> {
    // config.json below describes plain RoPE only.
    if let Some(f) = &cfg.rope_frequencies {
        if *f != RopeFrequencies::plain(cfg.head_dim(), cfg.rope_theta()) {
            return Err(Error::invalid(
                "a GGUF model with scaled RoPE (rope_freqs or rope.scaling metadata) cannot be \
                 written as a Hugging Face folder",
            ));
        }
    }
    let tied = cfg.tie_word_embeddings == Some(true) || !tensors.contains_key("lm_head.weight");
    let mut out: Vec<(String, Tensor)> = Vec::with_capacity(tensors.len() + cfg.num_hidden_layers);
    for (name, t) in tensors {
        if tied && name == "lm_head.weight" {
            continue;
        }
        let t = t.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
        let t = match rope_heads(name, cfg) {
            Some(heads) if cfg.rope_interleaved => unpermute_rows(&t, heads)?,
            _ => t,
        };
        out.push((name.clone(), t.contiguous()?));
    }
    // Qwen2-style q/k/v biases: transformers' `attention_bias` also gives o_proj a bias, which
    // this model does not have: zero is the same model.
    let attention_bias = tensors.keys().any(|n| n.ends_with(".self_attn.q_proj.bias"));
    if attention_bias {
        for i in 0..cfg.num_hidden_layers {
            let name = format!("model.layers.{i}.self_attn.o_proj.bias");
            if !tensors.contains_key(&name) {
                let zero = Tensor::zeros(cfg.hidden_size, DType::F32, &Device::Cpu)?;
                out.push((name, zero));
            }
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    let weights = dir.join("model.safetensors");
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    let bytes = safetensors::serialize(out.iter().map(|(k, t)| (k.as_str(), t)), Some(metadata))
        .map_err(|e| Error::format(&weights, format!("cannot serialise: {e}")))?;
    write_atomic(&weights, &bytes)?;
    drop(bytes);

    write_json(&dir.join("config.json"), &config_json(cfg, tied, attention_bias))?;
    let tok_path = dir.join("tokenizer.json");
    let text = tokenizer_json(tokenizer)
        .map_err(|e| Error::format(&tok_path, format!("cannot serialise the tokenizer: {e}")))?;
    write_atomic(&tok_path, text.as_bytes())?;
    write_json(
        &dir.join("tokenizer_config.json"),
        &tokenizer_config_json(cfg, tokenizer),
    )
}

fn write_json(path: &Path, value: &serde_json::Value) -> Result<()> {
    let text = serde_json::to_string_pretty(value)
        .map_err(|e| Error::format(path, format!("cannot serialise: {e}")))?;
    write_atomic(path, text.as_bytes())
}

/// A transformers `LlamaConfig` for `cfg`.
fn config_json(cfg: &llama::Config, tied: bool, attention_bias: bool) -> serde_json::Value {
    let eos = match cfg.eos_token_id.as_ref().map(TokenIds::to_vec).as_deref() {
        Some([one]) => serde_json::json!(one),
        Some(many) if !many.is_empty() => serde_json::json!(many),
        _ => serde_json::Value::Null,
    };
    serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_kv_heads(),
        "head_dim": cfg.head_dim(),
        "hidden_act": "silu",
        "rms_norm_eps": short(cfg.rms_norm_eps),
        "rope_theta": short(cfg.rope_theta()),
        "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.max_position_embeddings.unwrap_or(2048),
        "tie_word_embeddings": tied,
        "attention_bias": attention_bias,
        "mlp_bias": false,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": eos,
        "pad_token_id": cfg.pad_token_id,
        "torch_dtype": "float32",
    })
}

/// `x` as its shortest f32 decimal when it is an f32 value (GGUF stores these floats as f32:
/// 1e-5, not 9.999999747378752e-6), else as is.
fn short(x: f64) -> f64 {
    let f = x as f32;
    if f as f64 == x {
        f.to_string().parse().unwrap_or(x)
    } else {
        x
    }
}

/// `tokenizer.json`; when the model wants BOS first, a post-processor that adds it, so that
/// transformers' tokenizer (encoding with special tokens) does too.
fn tokenizer_json(tokenizer: &Tokenizer) -> tokenizers::Result<String> {
    let mut inner = tokenizer.inner().clone();
    if let Some((token, id)) = bos(tokenizer) {
        use tokenizers::processors::template::TemplateProcessing;
        let template = TemplateProcessing::builder()
            .try_single(format!("{token} $A"))?
            .try_pair(format!("{token} $A {token} $B"))?
            .special_tokens(vec![(token, id)])
            .build()?;
        inner.with_post_processor(Some(template));
    }
    inner.to_string(true)
}

/// The BOS token and id when the tokenizer puts BOS first.
fn bos(tokenizer: &Tokenizer) -> Option<(String, u32)> {
    let id = tokenizer.bos_token_id.filter(|_| tokenizer.add_bos)?;
    Some((tokenizer.id_to_token(id)?, id))
}

/// `tokenizer_config.json`: a plain fast tokenizer over `tokenizer.json`, with the special
/// tokens and `add_bos_token` (which [`super::hf`] reads too).
fn tokenizer_config_json(cfg: &llama::Config, tokenizer: &Tokenizer) -> serde_json::Value {
    let token = |id: Option<u32>| id.and_then(|i| tokenizer.id_to_token(i));
    serde_json::json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": tokenizer.add_bos,
        "add_eos_token": false,
        "bos_token": token(cfg.bos_token_id),
        "eos_token": token(tokenizer.eos_token_id),
        "pad_token": token(cfg.pad_token_id),
        "model_max_length": cfg.max_position_embeddings.unwrap_or(2048),
        "clean_up_tokenization_spaces": false,
    })
}
