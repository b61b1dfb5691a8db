//! Llama-family decoder (Llama 2/3 with plain or scaled RoPE, SmolLM, Mistral-style configs):
//! RMSNorm, rotary positions, grouped-query attention, SwiGLU MLP.
//!
//! A description only: it reads the config and the weights into a [`Decoder`]. The builder
//! [`build`] is shared with the families on the same layout ([`super::qwen2`],
//! [`super::qwen3`], [`super::phi3`]), which differ by the [`Layout`] they pass.
//!
//! Weights use the Hugging Face names (`model.layers.{i}.self_attn.q_proj.weight`, ...);
//! the GGUF loader renames GGUF tensors to these.

use super::decoder::{Block, Decoder, Positions};
use super::layers::{
    Attention, AttentionOptions, Embedding, FeedForward, FfnInner, HeadNorms, Linear, LmHead, Norm,
};
use super::ops::Activation;
use super::rope::RopeFrequencies;
use super::{Arch, ModelInfo};
use crate::kernels::Kernels;
use crate::load::Weights;
use crate::{Error, Result};
use serde::Deserialize;
use std::path::Path;

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
    /// transformers 4.x name of the rope variant (see [`RopeFrequencies::from_hf`]).
    #[serde(default)]
    pub rope_scaling: Option<serde_json::Value>,
    /// Only `silu` (SwiGLU); anything else is refused.
    #[serde(default)]
    pub hidden_act: Option<String>,
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
    /// Set by the GGUF loader (its `rope_freqs` tensor and `rope.scaling.*` metadata); when
    /// set, the rope fields above are not read.
    #[serde(skip)]
    pub rope_frequencies: Option<RopeFrequencies>,
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

    /// The rotary frequencies the config describes: plain or scaled RoPE. Errors name
    /// `source` and the field.
    pub fn rope(&self, source: &Path) -> Result<RopeFrequencies> {
        if let Some(f) = &self.rope_frequencies {
            return Ok(f.clone());
        }
        RopeFrequencies::from_hf(
            source,
            [
                ("rope_scaling", self.rope_scaling.as_ref()),
                ("rope_parameters", self.rope_parameters.as_ref()),
            ],
            self.rope_theta(),
            self.head_dim(),
            self.max_position_embeddings,
        )
    }
}

/// The Llama family description: builds a [`Decoder`].
pub struct Llama;

impl Llama {
    /// The model of `cfg` with the weights `w` (fast kernels). A family builds the one
    /// decoder type, hence not `Self`.
    #[allow(clippy::new_ret_no_self)]
    pub fn new(cfg: &Config, w: &Weights, name: String) -> Result<Decoder> {
        build(cfg, w, name, Layout::LLAMA)
    }
}

/// What a family on the Llama layout changes; the rest (RMSNorm, RoPE, grouped-query
/// attention, SwiGLU, optional tied head) is shared.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Layout {
    pub arch: Arch,
    /// q, k, v biases are required (Qwen2); otherwise every bias is read when the weights
    /// have it (Llama's `attention_bias` / `mlp_bias`).
    pub qkv_bias: bool,
    /// Per-head RMSNorm of queries and keys before RoPE, `self_attn.{q,k}_norm` (Qwen3).
    pub head_norms: bool,
    /// q, k, v stacked in `self_attn.qkv_proj`, gate and up in `mlp.gate_up_proj` (Phi-3).
    pub fused_projections: bool,
}

impl Layout {
    pub const LLAMA: Layout = Layout {
        arch: Arch::Llama,
        qkv_bias: false,
        head_norms: false,
        fused_projections: false,
    };
}

/// The decoder of `cfg` and weights `w` on the Llama layout with the quirks of `layout`.
pub(crate) fn build(cfg: &Config, w: &Weights, name: String, layout: Layout) -> Result<Decoder> {
    let bad = |msg: String| Error::format(w.source(), msg);
    let rope = cfg.rope(w.source())?;
    match cfg.hidden_act.as_deref() {
        None | Some("silu") => {}
        Some(other) => {
            return Err(Error::config(
                w.source(),
                "hidden_act",
                format!("unsupported activation `{other}` (supported: silu)"),
            ))
        }
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
        || heads.checked_mul(3 * hd).is_none()
    {
        return Err(bad(format!(
            "bad attention shape: {heads} heads, {kv_heads} kv heads, head_dim {hd}"
        )));
    }
    let (ff, v, eps) = (cfg.intermediate_size, cfg.vocab_size, cfg.rms_norm_eps);
    if ff.checked_mul(2).is_none() {
        return Err(bad(format!("bad intermediate_size {ff}")));
    }
    let embed = w.get_frozen("model.embed_tokens.weight", &[v, d])?;
    let mut blocks = Vec::new(); // not with_capacity: the count comes from the file
    for i in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{i}");
        let linear = |n: &str, shape: [usize; 2], bias_required: bool| -> Result<Linear> {
            let weight = w.get_frozen(&format!("{p}.{n}.weight"), &shape)?;
            let bias = format!("{p}.{n}.bias");
            let bias = match bias_required {
                true => Some(w.get(&bias, &shape[..1])?),
                false => w.get_opt(&bias, &shape[..1])?,
            };
            Ok(Linear::frozen(weight, bias))
        };
        let norm = |n: &str, width: usize| -> Result<Norm> {
            Ok(Norm::rms(w.get(&format!("{p}.{n}.weight"), &[width])?, eps))
        };
        let (nq, nkv) = (heads * hd, kv_heads * hd);
        let (q, k, v, qkv) = if layout.fused_projections {
            // Rows: q, then k, then v (transformers' Phi3Attention split).
            let qkv = linear("self_attn.qkv_proj", [nq + 2 * nkv, d], layout.qkv_bias)?;
            (
                qkv.rows(0, nq)?,
                qkv.rows(nq, nkv)?,
                qkv.rows(nq + nkv, nkv)?,
                Some(qkv),
            )
        } else {
            (
                linear("self_attn.q_proj", [nq, d], layout.qkv_bias)?,
                linear("self_attn.k_proj", [nkv, d], layout.qkv_bias)?,
                linear("self_attn.v_proj", [nkv, d], layout.qkv_bias)?,
                None,
            )
        };
        let head_norms = match layout.head_norms {
            true => Some(HeadNorms {
                q: norm("self_attn.q_norm", hd)?,
                k: norm("self_attn.k_norm", hd)?,
            }),
            false => None,
        };
        let inner = if layout.fused_projections {
            // Rows: gate, then up (transformers' Phi3MLP `chunk(2)`).
            let gate_up = linear("mlp.gate_up_proj", [2 * ff, d], false)?;
            FfnInner::Gated {
                gate: gate_up.rows(0, ff)?,
                up: gate_up.rows(ff, ff)?,
            }
        } else {
            FfnInner::Gated {
                gate: linear("mlp.gate_proj", [ff, d], false)?,
                up: linear("mlp.up_proj", [ff, d], false)?,
            }
        };
        blocks.push(Block {
            attention: Attention {
                norm: norm("input_layernorm", d)?,
                q,
                k,
                v,
                qkv,
                o: linear("self_attn.o_proj", [d, nq], false)?,
                heads,
                kv_heads,
                head_dim: hd,
                scale: 1.0 / (hd as f64).sqrt(),
                options: AttentionOptions {
                    head_norms,
                    ..Default::default()
                },
            },
            feed_forward: FeedForward {
                norm: norm("post_attention_layernorm", d)?,
                inner,
                act: Activation::Silu,
                down: linear("mlp.down_proj", [d, ff], false)?,
                output_norm: None,
            },
        });
    }
    let lm_head = match cfg.tie_word_embeddings {
        Some(true) => embed.clone(),
        _ => w
            .get_frozen_opt("lm_head.weight", &[v, d])?
            .unwrap_or_else(|| embed.clone()),
    };
    let info = ModelInfo {
        arch: layout.arch,
        name,
        d_model: d,
        vocab_size: v,
        n_layers: cfg.num_hidden_layers,
        n_heads: cfg.num_attention_heads,
        max_positions: match &rope {
            // Dynamic NTK exists to run past the trained length: up to `factor` times it.
            RopeFrequencies::DynamicNtk {
                factor,
                max_positions,
                ..
            } => Some((*max_positions as f64 * factor) as usize),
            RopeFrequencies::Fixed(_) => cfg.max_position_embeddings,
        },
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
        embedding: Embedding::frozen(embed, layout.arch.name()),
        positions: Positions::Rotary {
            head_dim: hd,
            frequencies: rope,
            interleaved: cfg.rope_interleaved,
        },
        blocks,
        final_norm: Norm::rms(w.get("model.norm.weight", &[d])?, eps),
        head: LmHead::frozen(lm_head, None),
        sliding_rope_theta: None,
        kernels: Kernels::fast(),
    })
}
