//! Llama-family decoder (Llama 2/3 without rope scaling, SmolLM, Mistral-style configs):
//! RMSNorm, rotary positions, grouped-query attention, SwiGLU MLP.
//!
//! A description only: it reads the config and the weights into a [`Decoder`].
//!
//! Weights use the Hugging Face names (`model.layers.{i}.self_attn.q_proj.weight`, ...);
//! the GGUF loader renames GGUF tensors to these.

use super::decoder::{Block, Decoder, Positions};
use super::layers::{
    Attention, AttentionOptions, Embedding, FeedForward, FfnInner, Linear, LmHead, Norm,
};
use super::ops::Activation;
use super::{Arch, ModelInfo};
use crate::kernels::Kernels;
use crate::load::Weights;
use crate::{Error, Result};
use serde::Deserialize;

/// The fields of a Hugging Face `config.json` that the forward pass needs.
#[derive(Clone, Debug, Deserialize)]
pub struct Config {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    /// Defaults to `num_attention_heads` (no grouping).
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    /// Defaults to `hidden_size / num_attention_heads`.
    #[serde(default)]
    pub head_dim: Option<usize>,
    pub rms_norm_eps: f64,
    /// transformers 4.x; transformers 5.x writes `rope_parameters.rope_theta` instead.
    #[serde(default)]
    pub rope_theta: Option<f64>,
    #[serde(default)]
    pub rope_parameters: Option<serde_json::Value>,
    /// transformers 4.x name of the rope variant (only plain RoPE is supported).
    #[serde(default)]
    pub rope_scaling: Option<serde_json::Value>,
    pub vocab_size: usize,
    #[serde(default)]
    pub max_position_embeddings: Option<usize>,
    /// When absent, the head is `lm_head.weight` if the weights have it, else the embedding.
    #[serde(default)]
    pub tie_word_embeddings: Option<bool>,
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    #[serde(default)]
    pub eos_token_id: Option<TokenIds>,
    #[serde(default)]
    pub pad_token_id: Option<u32>,
    /// GGML's adjacent-pair RoPE layout, for q/k weights as stored in GGUF files.
    #[serde(default)]
    pub rope_interleaved: bool,
}

/// `eos_token_id` is an int or a list of ints.
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub enum TokenIds {
    One(u32),
    Many(Vec<u32>),
}

impl TokenIds {
    pub fn to_vec(&self) -> Vec<u32> {
        match self {
            TokenIds::One(id) => vec![*id],
            TokenIds::Many(ids) => ids.clone(),
        }
    }
}

impl Config {
    /// `rope_theta`, wherever the config stores it (default 10000).
    pub fn rope_theta(&self) -> f64 {
        self.rope_theta
            .or_else(|| {
                self.rope_parameters
                    .as_ref()
                    .and_then(|p| p.get("rope_theta"))
                    .and_then(|v| v.as_f64())
            })
            .unwrap_or(10000.0)
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    pub fn num_kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    /// The rope variant if it is anything but plain RoPE (which is all this file implements).
    fn unsupported_rope(&self) -> Option<String> {
        let kind = |v: &serde_json::Value| {
            v.get("rope_type")
                .or_else(|| v.get("type"))
                .and_then(|t| t.as_str())
                .map(str::to_string)
        };
        [&self.rope_parameters, &self.rope_scaling]
            .into_iter()
            .flatten()
            .filter(|v| !v.is_null())
            .filter_map(kind)
            .find(|k| k != "default")
    }
}

/// The Llama family description: builds a [`Decoder`].
pub struct Llama;

impl Llama {
    /// The model of `cfg` with the weights `w` (fast kernels). A family builds the one
    /// decoder type, hence not `Self`.
    #[allow(clippy::new_ret_no_self)]
    pub fn new(cfg: &Config, w: &Weights, name: String) -> Result<Decoder> {
        let bad = |msg: String| Error::format(w.source(), msg);
        if let Some(kind) = cfg.unsupported_rope() {
            return Err(bad(format!(
                "unsupported rope type `{kind}` (only plain RoPE)"
            )));
        }
        let (d, heads, kv_heads, hd) = (
            cfg.hidden_size,
            cfg.num_attention_heads,
            cfg.num_kv_heads(),
            cfg.head_dim(),
        );
        if heads == 0
            || kv_heads == 0
            || heads % kv_heads != 0
            || hd == 0
            || hd % 2 != 0
            || heads.checked_mul(hd).is_none()
        {
            return Err(bad(format!(
                "bad attention shape: {heads} heads, {kv_heads} kv heads, head_dim {hd}"
            )));
        }
        let (ff, v, eps) = (cfg.intermediate_size, cfg.vocab_size, cfg.rms_norm_eps);
        let embed = w.get("model.embed_tokens.weight", &[v, d])?;
        let mut blocks = Vec::new(); // not with_capacity: the count comes from the file
        for i in 0..cfg.num_hidden_layers {
            let p = format!("model.layers.{i}");
            // Qwen2-style q/k/v biases when the weights have them.
            let proj = |n: &str, shape: [usize; 2]| -> Result<Linear> {
                let name = format!("{p}.self_attn.{n}");
                Ok(Linear::new(
                    w.get(&format!("{name}.weight"), &shape)?,
                    w.get_opt(&format!("{name}.bias"), &shape[..1])?,
                ))
            };
            let mlp = |n: &str, shape: [usize; 2]| -> Result<Linear> {
                Ok(Linear::new(
                    w.get(&format!("{p}.mlp.{n}.weight"), &shape)?,
                    None,
                ))
            };
            let norm = |n: &str| -> Result<Norm> {
                Ok(Norm::rms(w.get(&format!("{p}.{n}.weight"), &[d])?, eps))
            };
            blocks.push(Block {
                attention: Attention {
                    norm: norm("input_layernorm")?,
                    q: proj("q_proj", [heads * hd, d])?,
                    k: proj("k_proj", [kv_heads * hd, d])?,
                    v: proj("v_proj", [kv_heads * hd, d])?,
                    qkv: None,
                    o: Linear::new(
                        w.get(&format!("{p}.self_attn.o_proj.weight"), &[d, heads * hd])?,
                        None,
                    ),
                    heads,
                    kv_heads,
                    head_dim: hd,
                    scale: 1.0 / (hd as f64).sqrt(),
                    options: AttentionOptions::default(),
                },
                feed_forward: FeedForward {
                    norm: norm("post_attention_layernorm")?,
                    inner: FfnInner::Gated {
                        gate: mlp("gate_proj", [ff, d])?,
                        up: mlp("up_proj", [ff, d])?,
                    },
                    act: Activation::Silu,
                    down: mlp("down_proj", [d, ff])?,
                    output_norm: None,
                },
            });
        }
        let lm_head = match cfg.tie_word_embeddings {
            Some(true) => embed.clone(),
            _ => w
                .get_opt("lm_head.weight", &[v, d])?
                .unwrap_or_else(|| embed.clone()),
        };
        let info = ModelInfo {
            arch: Arch::Llama,
            name,
            d_model: d,
            vocab_size: v,
            n_layers: cfg.num_hidden_layers,
            n_heads: cfg.num_attention_heads,
            max_positions: cfg.max_position_embeddings,
            bos_token_id: cfg.bos_token_id,
            eos_token_ids: cfg
                .eos_token_id
                .as_ref()
                .map(TokenIds::to_vec)
                .unwrap_or_default(),
            pad_token_id: cfg.pad_token_id,
            decoder_start_token_id: None,
        };
        Ok(Decoder {
            info,
            embedding: Embedding::new(embed, "llama"),
            positions: Positions::Rotary {
                head_dim: hd,
                theta: cfg.rope_theta(),
                interleaved: cfg.rope_interleaved,
            },
            blocks,
            final_norm: Norm::rms(w.get("model.norm.weight", &[d])?, eps),
            head: LmHead::new(lm_head, None),
            sliding_rope_theta: None,
            kernels: Kernels::fast(),
        })
    }
}
