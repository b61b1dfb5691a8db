//! Qwen3 (Hugging Face `model_type = "qwen3"`, GGUF `qwen3`): the Llama layout with a
//! per-head RMSNorm of queries and keys before RoPE (`self_attn.{q,k}_norm`, `[head_dim]`),
//! biases only if the checkpoint has them (`attention_bias`). Sliding-window layers are
//! refused.

use super::decoder::Decoder;
use super::llama::Layout;
use super::Arch;
use crate::load::gguf::llama_layer_part;
use crate::load::Weights;
use crate::Result;

/// `config.json` of a Qwen3 model: the same fields as Qwen2's (the q/k norms have none).
pub use super::qwen2::Config;

/// llama.cpp's names of the parts of a Qwen3 layer -> Hugging Face names: Llama's and the
/// head norms.
pub(crate) fn gguf_layer_part(part: &str) -> Option<&'static str> {
    match part {
        "attn_q_norm" => Some("self_attn.q_norm"),
        "attn_k_norm" => Some("self_attn.k_norm"),
        _ => llama_layer_part(part),
    }
}

/// The Qwen3 family description: builds a [`Decoder`].
pub struct Qwen3;

impl Qwen3 {
    const LAYOUT: Layout = Layout {
        arch: Arch::Qwen3,
        qkv_bias: false,
        head_norms: true,
        fused_projections: false,
    };

    /// The model of `cfg` with the weights `w` (fast kernels).
    #[allow(clippy::new_ret_no_self)]
    pub fn new(cfg: &Config, w: &Weights, name: String) -> Result<Decoder> {
        super::qwen2::build(cfg, w, name, Self::LAYOUT)
    }
}
