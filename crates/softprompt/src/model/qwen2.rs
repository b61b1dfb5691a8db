//! Qwen2 / Qwen2.5 (Hugging Face `model_type = "qwen2"`, GGUF `qwen2`): the Llama layout
//! with q/k/v biases. Sliding-window layers (`use_sliding_window`) are refused, not ignored.

use super::decoder::Decoder;
use super::llama::{self, Layout};
use super::Arch;
use crate::load::Weights;
use crate::{Error, Result};
use serde::Deserialize;
use std::path::Path;

/// `config.json` of a Qwen2 (and Qwen3) model: the Llama fields and the sliding-window
/// switches.
#[derive(Clone, Debug, Deserialize)]
pub struct Config {
    #[serde(flatten)]
    pub base: llama::Config,
    #[serde(default)]
    pub use_sliding_window: Option<bool>,
    /// transformers 5: `full_attention` or `sliding_attention` per layer.
    #[serde(default)]
    pub layer_types: Option<Vec<String>>,
}

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

/// The Qwen2 family description: builds a [`Decoder`].
pub struct Qwen2;

impl Qwen2 {
    const LAYOUT: Layout = Layout {
        arch: Arch::Qwen2,
        qkv_bias: true,
        head_norms: false,
        fused_projections: false,
    };

    /// The model of `cfg` with the weights `w` (fast kernels).
    #[allow(clippy::new_ret_no_self)]
    pub fn new(cfg: &Config, w: &Weights, name: String) -> Result<Decoder> {
        build(cfg, w, name, Self::LAYOUT)
    }
}

/// A Qwen model (Qwen2 or Qwen3 `layout`) of `cfg`, after refusing sliding-window layers.
pub(crate) fn build(cfg: &Config, w: &Weights, name: String, layout: Layout) -> Result<Decoder> {
    check_full_attention(w.source(), cfg.use_sliding_window, cfg.layer_types.as_deref())?;
    llama::build(&cfg.base, w, name, layout)
}

/// Qwen configs can switch some layers to sliding-window attention, which this family does
/// not run: an error naming the field unless every layer attends to every earlier position.
pub(crate) fn check_full_attention(
    source: &Path,
    use_sliding_window: Option<bool>,
    layer_types: Option<&[String]>,
) -> Result<()> {
    if use_sliding_window == Some(true) {
        return Err(Error::config(
            source,
            "use_sliding_window",
            "true: sliding-window layers are not supported for this family",
        ));
    }
    if let Some((i, kind)) = layer_types
        .unwrap_or_default()
        .iter()
        .enumerate()
        .find(|(_, kind)| kind.as_str() != "full_attention")
    {
        return Err(Error::config(
            source,
            format!("layer_types[{i}]"),
            format!("unsupported layer type `{kind}` (supported: full_attention)"),
        ));
    }
    Ok(())
}
