//! GPT-2 (transformers' `GPT2LMHeadModel`): learned absolute positions, pre-LayerNorm blocks,
//! fused q/k/v projection, GELU (tanh approximation) MLP, LM head tied to `wte`.
//!
//! A description only: it reads the config and the weights into a [`Decoder`]. Checkpoints
//! store the projections as `Conv1D` weights `[in, out]`; they are transposed once at load
//! time to the nn.Linear layout `[out, in]`, and the fused `c_attn` is split into q, k, v.

use super::decoder::{Block, Decoder, Positions};
use super::layers::{
    Attention, AttentionOptions, Embedding, FeedForward, FfnInner, Linear, LmHead, Norm,
};
use super::ops::Activation;
use super::{Arch, ModelInfo};
use crate::kernels::Kernels;
use crate::load::Weights;
use crate::Result;
use serde::Deserialize;

/// The fields of a transformers `config.json` (model_type `gpt2`) that the forward pass uses.
#[derive(Clone, Debug, Deserialize)]
pub struct Config {
    pub n_embd: usize,
    pub n_layer: usize,
    pub n_head: usize,
    pub n_positions: usize,
    pub vocab_size: usize,
    #[serde(default = "default_eps")]
    pub layer_norm_epsilon: f64,
    /// MLP width; `null` or absent means `4 * n_embd`.
    #[serde(default)]
    pub n_inner: Option<usize>,
    #[serde(default = "default_activation")]
    pub activation_function: String,
    #[serde(default = "default_true")]
    pub scale_attn_weights: bool,
    #[serde(default)]
    pub scale_attn_by_inverse_layer_idx: bool,
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    #[serde(default)]
    pub eos_token_id: Option<u32>,
    #[serde(default)]
    pub pad_token_id: Option<u32>,
}

fn default_eps() -> f64 {
    1e-5
}

fn default_activation() -> String {
    "gelu_new".to_string()
}

fn default_true() -> bool {
    true
}

/// transformers' `activation_function` names.
fn activation(name: &str) -> Result<Activation> {
    Ok(match name {
        "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Activation::GeluTanh,
        "gelu" => Activation::GeluErf,
        "relu" => Activation::Relu,
        other => crate::bail!(
            "gpt2 config: activation_function `{other}` is not supported \
             (supported: gelu_new, gelu_pytorch_tanh, gelu_fast, gelu, relu)"
        ),
    })
}

/// A LayerNorm `{prefix}.weight`, `{prefix}.bias` `[D]`.
fn layer_norm(w: &Weights, prefix: &str, d: usize, eps: f64) -> Result<Norm> {
    Ok(Norm::layer(
        w.get(&format!("{prefix}.weight"), &[d])?,
        w.get(&format!("{prefix}.bias"), &[d])?,
        eps,
    ))
}

/// A Conv1D projection `{prefix}.weight [in, out]`, `{prefix}.bias [out]` as `[out, in]`.
fn conv1d(w: &Weights, prefix: &str, d_in: usize, d_out: usize) -> Result<Linear> {
    let weight = w.get(&format!("{prefix}.weight"), &[d_in, d_out])?; // [in, out]
    Ok(Linear::new(
        weight.t()?.contiguous()?,
        Some(w.get(&format!("{prefix}.bias"), &[d_out])?),
    ))
}

/// The GPT-2 description: builds a [`Decoder`].
pub struct Gpt2;

impl Gpt2 {
    /// The model of `cfg` with the weights `w` (fast kernels). A family builds the one
    /// decoder type, hence not `Self`.
    #[allow(clippy::new_ret_no_self)]
    pub fn new(cfg: &Config, w: &Weights, name: String) -> Result<Decoder> {
        let d = cfg.n_embd;
        if cfg.n_head == 0 || !d.is_multiple_of(cfg.n_head) {
            crate::bail!(
                "gpt2 config: n_embd = {d} is not a multiple of n_head = {}",
                cfg.n_head
            );
        }
        let act = activation(&cfg.activation_function)?;
        let (inner, eps) = (cfg.n_inner.unwrap_or(4 * d), cfg.layer_norm_epsilon);
        let head_dim = d / cfg.n_head;
        // GPT2LMHeadModel checkpoints name tensors `transformer.h.0...`; GPT2Model ones (e.g.
        // openai-community/gpt2) have no prefix.
        let root = if !w.contains("transformer.wte.weight") && w.contains("wte.weight") {
            ""
        } else {
            "transformer."
        };
        let wte = w.get(&format!("{root}wte.weight"), &[cfg.vocab_size, d])?;
        let wpe = w.get(&format!("{root}wpe.weight"), &[cfg.n_positions, d])?;
        let mut blocks = Vec::new(); // not with_capacity: the count comes from the file
        for i in 0..cfg.n_layer {
            let p = format!("{root}h.{i}");
            let mut scale = if cfg.scale_attn_weights {
                1.0 / (head_dim as f64).sqrt()
            } else {
                1.0
            };
            if cfg.scale_attn_by_inverse_layer_idx {
                scale /= (i + 1) as f64;
            }
            // c_attn stacks q, k, v: rows of `w [3D, D]` and `b [3D]` (contiguous views).
            let qkv = conv1d(w, &format!("{p}.attn.c_attn"), d, 3 * d)?;
            let part = |j: usize| qkv.rows(j * d, d);
            blocks.push(Block {
                attention: Attention {
                    norm: layer_norm(w, &format!("{p}.ln_1"), d, eps)?,
                    q: part(0)?,
                    k: part(1)?,
                    v: part(2)?,
                    qkv: Some(qkv.clone()),
                    o: conv1d(w, &format!("{p}.attn.c_proj"), d, d)?,
                    heads: cfg.n_head,
                    kv_heads: cfg.n_head,
                    head_dim,
                    scale,
                    options: AttentionOptions::default(),
                },
                feed_forward: FeedForward {
                    norm: layer_norm(w, &format!("{p}.ln_2"), d, eps)?,
                    inner: FfnInner::Plain(conv1d(w, &format!("{p}.mlp.c_fc"), d, inner)?),
                    act,
                    down: conv1d(w, &format!("{p}.mlp.c_proj"), inner, d)?,
                    output_norm: None,
                },
            });
        }
        let info = ModelInfo {
            arch: Arch::Gpt2,
            name,
            d_model: d,
            vocab_size: cfg.vocab_size,
            n_layers: cfg.n_layer,
            n_heads: cfg.n_head,
            max_positions: Some(cfg.n_positions),
            bos_token_id: cfg.bos_token_id,
            eos_token_ids: cfg.eos_token_id.into_iter().collect(),
            // GPT-2 has no pad token; transformers pads (and generate fills finished rows) with EOS.
            pad_token_id: cfg.pad_token_id.or(cfg.eos_token_id),
            decoder_start_token_id: None,
        };
        Ok(Decoder {
            info,
            embedding: Embedding::new(wte.clone(), "gpt2"),
            positions: Positions::Learned(wpe),
            blocks,
            final_norm: layer_norm(w, &format!("{root}ln_f"), d, eps)?,
            // Tied LM head.
            head: LmHead::new(wte, None),
            sliding_rope_theta: None,
            kernels: Kernels::fast(),
        })
    }
}
