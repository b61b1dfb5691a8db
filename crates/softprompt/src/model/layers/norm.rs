//! The norms of a transformer layer: RMSNorm and LayerNorm over the last dimension.

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
}

impl Norm {
    pub fn rms(w: Tensor, eps: f64) -> Self {
        Norm {
            kind: NormKind::Rms,
            w,
            b: None,
            eps,
        }
    }

    pub fn layer(w: Tensor, b: Tensor, eps: f64) -> Self {
        Norm {
            kind: NormKind::Layer,
            w,
            b: Some(b),
            eps,
        }
    }

    /// `x [.., D]` -> `[.., D]`.
    pub fn forward(&self, kernels: Kernels, x: &Tensor) -> Result<Tensor> {
        match (self.kind, &self.b) {
            (NormKind::Layer, Some(b)) => ops::layer_norm(kernels, x, &self.w, b, self.eps),
            _ => ops::rms_norm(kernels, x, &self.w, self.eps),
        }
    }

    /// The operands of the block kernels (shared tensors, no copy).
    pub(crate) fn weights(&self) -> NormWeights {
        NormWeights {
            kind: self.kind,
            w: self.w.clone(),
            b: self.b.clone(),
            eps: self.eps as f32,
        }
    }
}
