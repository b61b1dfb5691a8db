//! Token embeddings in, logits out.

use crate::model::ops;
use crate::{Error, Result};
use candle_core::Tensor;

/// The input embedding table `[V, D]`.
#[derive(Clone, Debug)]
pub struct Embedding {
    table: Tensor,
    /// Names the model in errors.
    model: &'static str,
}

impl Embedding {
    pub fn new(table: Tensor, model: &'static str) -> Self {
        Embedding { table, model }
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
        Ok(rows.reshape((b, t, d))?)
    }
}

/// The LM head `[V, D]` (often the embedding table, tied), with an optional scale of its
/// input (T5 v1.0's `d_model^-0.5` before a tied head).
#[derive(Clone, Debug)]
pub struct LmHead {
    w: Tensor,
    scale: Option<f64>,
}

impl LmHead {
    pub fn new(w: Tensor, scale: Option<f64>) -> Self {
        LmHead { w, scale }
    }

    /// `[.., D]` -> `[.., V]`.
    pub fn forward(&self, h: &Tensor) -> Result<Tensor> {
        match self.scale {
            Some(s) => ops::linear(&(h * s)?, &self.w, None),
            None => ops::linear(h, &self.w, None),
        }
    }
}
