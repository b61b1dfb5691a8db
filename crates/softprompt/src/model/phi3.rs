//! Phi-3 (Hugging Face `model_type = "phi3"`, GGUF `phi3`): the Llama layout with q, k, v
//! stacked in one `qkv_proj` and gate, up in one `gate_up_proj`. `longrope` / `su` RoPE
//! scaling (Phi-3 128k, Phi-3.5) and partial rotary embeddings are refused. A
//! `sliding_window` (Phi-3 mini: 2047) caps the sequence length at the window, where the
//! window changes nothing.

use super::decoder::Decoder;
use super::llama::{self, Layout};
use super::Arch;
use crate::load::gguf::llama_layer_part;
use crate::load::Weights;
use crate::{Error, Result};
use serde::Deserialize;

/// `config.json` of a Phi-3 model: the Llama fields, the window, the rotary fraction.
#[derive(Clone, Debug, Deserialize)]
pub struct Config {
    #[serde(flatten)]
    pub base: llama::Config,
    #[serde(default)]
    pub sliding_window: Option<usize>,
    /// transformers 4.x keeps it here, 5.x in `rope_parameters` (checked there).
    #[serde(default)]
    pub partial_rotary_factor: Option<f64>,
}

/// llama.cpp's names of the parts of a Phi-3 layer -> Hugging Face names: llama.cpp keeps
/// q, k, v in `attn_qkv` and gate, up in `ffn_up`. Phi-3 longrope files also have
/// `rope_factors_{long,short}`, which no name maps to: they are refused.
pub(crate) fn gguf_layer_part(part: &str) -> Option<&'static str> {
    match part {
        "attn_qkv" => Some("self_attn.qkv_proj"),
        "ffn_up" => Some("mlp.gate_up_proj"),
        _ => llama_layer_part(part),
    }
}

impl Config {
    /// The config of a GGUF file: its Llama-layout config and `phi3.attention.sliding_window`.
    pub(crate) fn gguf(base: llama::Config, sliding_window: Option<usize>) -> Self {
        Config {
            base,
            sliding_window,
            partial_rotary_factor: None,
        }
    }
}

/// The Phi-3 family description: builds a [`Decoder`].
pub struct Phi3;

impl Phi3 {
    const LAYOUT: Layout = Layout {
        arch: Arch::Phi3,
        qkv_bias: false,
        head_norms: false,
        fused_projections: true,
    };

    /// The model of `cfg` with the weights `w` (fast kernels).
    #[allow(clippy::new_ret_no_self)]
    pub fn new(cfg: &Config, w: &Weights, name: String) -> Result<Decoder> {
        if let Some(f) = cfg.partial_rotary_factor.filter(|f| *f != 1.0) {
            return Err(Error::config(
                w.source(),
                "partial_rotary_factor",
                format!("partial rotary embeddings ({f}) are not supported"),
            ));
        }
        let mut decoder = llama::build(&cfg.base, w, name, Self::LAYOUT)?;
        if let Some(window) = cfg.sliding_window {
            // A query sees keys fewer than `window` positions back: with at most `window`
            // positions in all, that is every earlier one.
            let max = decoder.info.max_positions.map_or(window, |m| m.min(window));
            decoder.info.max_positions = Some(max);
        }
        Ok(decoder)
    }
}
