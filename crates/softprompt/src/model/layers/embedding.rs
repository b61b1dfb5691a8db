//! Token embeddings in, logits out.

use super::Linear;
use crate::kernels::weight::FrozenWeight;
use crate::kernels::Kernels;
use crate::{Error, Result};
use candle_core::Tensor;

/// The input embedding table `[V, D]`, with an optional scale of the looked-up rows (Gemma's
/// `sqrt(D)`: the token embeddings are scaled, a soft prompt prepended to them is not).
#[derive(Clone, Debug)]
pub struct Embedding {
    table: FrozenWeight,
    /// Names the model in errors.
    model: &'static str,
    scale: Option<f64>,
}

impl Embedding {
    pub fn new(table: Tensor, model: &'static str) -> Self {
        Embedding::frozen(FrozenWeight::Dense(table), model)
    }

    /// A table in any encoding: stored blocks are decoded only at the looked-up rows.
    pub fn frozen(table: FrozenWeight, model: &'static str) -> Self {
        Embedding {
            table,
            model,
            scale: None,
        }
    }

    /// The rows are multiplied by `scale` (rounded to f32 first, as transformers does).
    pub fn scaled(self, scale: f64) -> Self {
        Embedding {
            scale: Some(scale as f32 as f64),
            ..self
        }
    }

    pub fn table(&self) -> &FrozenWeight {
        &self.table
    }

    /// `ids [B, T]` (u32) -> `[B, T, D]`.
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        let (b, t) = ids.dims2().map_err(|_| {
            Error::invalid(format!(
                "{}: expected token ids [B, T], got {:?}",
                self.model,
                ids.dims()
            ))
        })?;
        let (v, d) = self.table.dims2()?;
        let outside = |e: candle_core::Error| {
            Error::invalid(format!(
                "{}: token ids outside the vocabulary ({v}): {e}",
                self.model
            ))
        };
        let rows = match &self.table {
            // A tensor (perhaps a trained variable) keeps the differentiable gather.
            FrozenWeight::Dense(table) => table
                .index_select(&ids.flatten_all()?, 0)
                .map_err(outside)?
                .reshape((b, t, d))?,
            stored => {
                let flat: Vec<u32> = ids.flatten_all()?.to_dtype(candle_core::DType::U32)?.to_vec1()?;
                let rows = stored.gather_rows(&flat).map_err(outside)?; // [B*T, D]
                Tensor::from_vec(rows, (b, t, d), ids.device())?
            }
        };
        match self.scale {
            Some(s) => Ok((rows * s)?),
            None => Ok(rows),
        }
    }
}

/// The LM head `[V, D]` (often the embedding table, tied), with an optional scale of its
/// input (T5 v1.0's `d_model^-0.5` before a tied head) and an optional soft cap of its output.
#[derive(Clone, Debug)]
pub struct LmHead {
    w: FrozenWeight,
    scale: Option<f64>,
    softcap: Option<f64>,
}

impl LmHead {
    pub fn new(w: Tensor, scale: Option<f64>) -> Self {
        LmHead::frozen(FrozenWeight::Dense(w), scale)
    }

    /// A head in any encoding (a tied head shares the embedding's stored blocks).
    pub fn frozen(w: FrozenWeight, scale: Option<f64>) -> Self {
        LmHead {
            w,
            scale,
            softcap: None,
        }
    }

    /// The head's weight `[V, D]`.
    pub fn weight(&self) -> &FrozenWeight {
        &self.w
    }

    /// The logits become `cap * tanh(logits / cap)` (Gemma 2's `final_logit_softcapping`).
    pub fn soft_capped(self, cap: f64) -> Self {
        LmHead {
            softcap: Some(cap),
            ..self
        }
    }

    /// `[.., D]` -> `[.., V]`.
    pub fn forward(&self, h: &Tensor) -> Result<Tensor> {
        self.forward_with(Kernels::fast(), h)
    }

    /// [`Self::forward`], on quantised blocks where `kernels` allows it for `h` (generation
    /// steps, see [`Kernels::quantized_decode`]).
    pub fn forward_with(&self, kernels: Kernels, h: &Tensor) -> Result<Tensor> {
        let head = Linear::frozen(self.w.clone(), None);
        let logits = match self.scale {
            Some(s) => head.forward_with(kernels, &(h * s)?)?,
            None => head.forward_with(kernels, h)?,
        };
        match self.softcap {
            Some(cap) => Ok(((logits / cap)?.tanh()? * cap)?),
            None => Ok(logits),
        }
    }
}
