//! Mistral: the Llama description with a sliding attention window on every layer
//! (`sliding_window`; `null` in Mistral v0.2+ configs, which are then plain Llama).

use super::llama::{self, Llama};
use super::Decoder;
use crate::load::Weights;
use crate::{Error, Result};
use serde::Deserialize;

/// A Llama config plus the window.
#[derive(Clone, Debug, Deserialize)]
pub struct Config {
    #[serde(flatten)]
    pub llama: llama::Config,
    #[serde(default)]
    pub sliding_window: Option<usize>,
}

/// The Mistral family description: builds a [`Decoder`].
pub struct Mistral;

impl Mistral {
    #[allow(clippy::new_ret_no_self)]
    pub fn new(cfg: &Config, w: &Weights, name: String) -> Result<Decoder> {
        let mut model = Llama::new(&cfg.llama, w, name)?;
        if let Some(window) = cfg.sliding_window {
            if window == 0 {
                return Err(Error::config(
                    w.source(),
                    "sliding_window",
                    "must be positive, found 0",
                ));
            }
            for block in &mut model.blocks {
                block.attention.options.sliding_window = Some(window);
            }
        }
        Ok(model)
    }
}
