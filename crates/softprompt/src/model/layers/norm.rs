//! The norms of a transformer layer: RMSNorm (weight `w` or Gemma's `1 + w`) and LayerNorm
//! over the last dimension.

use crate::kernels::norm::{NormKind, NormWeights};
use crate::kernels::Kernels;
use crate::model::ops;
use crate::Result;
use candle_core::Tensor;

/// `x * rsqrt(mean(x^2) + eps) * w` (Llama, T5) or `(x - mean) * rsqrt(var + eps) * w + b`
/// (GPT-2); weights `[D]`.
#[derive(Clone, Debug)]
pub struct Norm {
    kind: NormKind,
    w: Tensor,
    b: Option<Tensor>,
    eps: f64,
    /// The gain is `1 + w` (Gemma), computed at each call so that a trained `w` (model
    /// tuning) is seen after every update.
    plus_one: bool,
}

impl Norm {
    pub fn rms(w: Tensor, eps: f64) -> Self {
        Norm {
            kind: NormKind::Rms,
            w,
            b: None,
            eps,
            plus_one: false,
        }
    }

    /// Gemma's RMSNorm, `x * rsqrt(mean(x^2) + eps) * (1 + w)` (`1 + w` in f32, as
    /// transformers computes it).
    pub fn rms_plus_one(w: Tensor, eps: f64) -> Self {
        Norm {
            plus_one: true,
            ..Norm::rms(w, eps)
        }
    }

    pub fn layer(w: Tensor, b: Tensor, eps: f64) -> Self {
        Norm {
            kind: NormKind::Layer,
            w,
            b: Some(b),
            eps,
            plus_one: false,
        }
    }

    /// `x [.., D]` -> `[.., D]`.
    pub fn forward(&self, kernels: Kernels, x: &Tensor) -> Result<Tensor> {
        let gain = self.gain()?;
        match (self.kind, &self.b) {
            (NormKind::Layer, Some(b)) => ops::layer_norm(kernels, x, &gain, b, self.eps),
            _ => ops::rms_norm(kernels, x, &gain, self.eps),
        }
    }

    /// The weight the normed input is multiplied by, `[D]`.
    fn gain(&self) -> Result<Tensor> {
        Ok(match self.plus_one {
            true => (&self.w + 1.0)?,
            false => self.w.clone(),
        })
    }

    /// The operands of the block kernels (shared tensors, no copy but Gemma's `1 + w`).
    pub(crate) fn weights(&self) -> Result<NormWeights> {
        Ok(NormWeights {
            kind: self.kind,
            w: self.gain()?,
            b: self.b.clone(),
            eps: self.eps as f32,
        })
    }
}
