//! Qwen3 (Hugging Face `model_type = "qwen3"`, GGUF `qwen3`): the Llama layout with a
//! per-head RMSNorm of queries and keys before RoPE (`self_attn.{q,k}_norm`, `[head_dim]`),
//! biases only if the checkpoint has them (`attention_bias`). Sliding-window layers are
//! refused.

use super::decoder::Decoder;
use super::llama::{self, Layout};
use super::qwen2::check_full_attention;
use super::Arch;
use crate::load::Weights;
use crate::Result;
use serde::Deserialize;

/// `config.json` of a Qwen3 model: the Llama fields and the sliding-window switches.
#[derive(Clone, Debug, Deserialize)]
pub struct Config {
    #[serde(flatten)]
    pub base: llama::Config,
    #[serde(default)]
    pub use_sliding_window: Option<bool>,
    #[serde(default)]
    pub layer_types: Option<Vec<String>>,
}

/// GGUF block tensor names beyond the Llama ones (GGUF part -> Hugging Face part).
pub(crate) const GGUF_TENSORS: &[(&str, &str)] = &[
    ("attn_q_norm", "self_attn.q_norm"),
    ("attn_k_norm", "self_attn.k_norm"),
];

impl From<llama::Config> for Config {
    /// The config of a GGUF file (whose metadata has no sliding-window switches).
    fn from(base: llama::Config) -> Self {
        Config {
            base,
            use_sliding_window: None,
            layer_types: None,
        }
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

    /// The model of `cfg` with the weights `w` (fast kernels; the attention runs the
    /// composite path, the fused op has no q/k norm).
    #[allow(clippy::new_ret_no_self)]
    pub fn new(cfg: &Config, w: &Weights, name: String) -> Result<Decoder> {
        check_full_attention(
            w.source(),
            cfg.use_sliding_window,
            cfg.layer_types.as_deref(),
        )?;
        llama::build(&cfg.base, w, name, Self::LAYOUT)
    }
}
