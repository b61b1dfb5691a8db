//! Token embeddings in, logits out.

use crate::model::ops;
use crate::{Error, Result};
use candle_core::Tensor;

/// The input embedding table `[V, D]`, with an optional scale of the looked-up rows (Gemma's
/// `sqrt(D)`: the token embeddings are scaled, a soft prompt prepended to them is not).
#[derive(Clone, Debug)]
pub struct Embedding {
    table: Tensor,
    /// Names the model in errors.
    model: &'static str,
    scale: Option<f64>,
}

impl Embedding {
    pub fn new(table: Tensor, model: &'static str) -> Self {
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

    pub fn table(&self) -> &Tensor {
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
        let rows = self
            .table
            .index_select(&ids.flatten_all()?, 0)
            .map_err(|e| {
                Error::invalid(format!(
                    "{}: token ids outside the vocabulary ({v}): {e}",
                    self.model
                ))
            })?; // [B*T, D]
        let rows = rows.reshape((b, t, d))?;
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
    w: Tensor,
    scale: Option<f64>,
    softcap: Option<f64>,
}

impl LmHead {
    pub fn new(w: Tensor, scale: Option<f64>) -> Self {
        LmHead {
            w,
            scale,
            softcap: None,
        }
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
        let logits = match self.scale {
            Some(s) => ops::linear(&(h * s)?, &self.w, None)?,
            None => ops::linear(h, &self.w, None)?,
        };
        match self.softcap {
            Some(cap) => Ok(((logits / cap)?.tanh()? * cap)?),
            None => Ok(logits),
        }
    }
}
