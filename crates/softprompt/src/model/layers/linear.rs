//! A linear layer `y = x @ w^T + b`: the one representation of a weight.

use crate::kernels::gemm::ProjWeights;
use crate::model::ops;
use crate::Result;
use candle_core::Tensor;

/// `w [N, K]` (nn.Linear layout), `b [N]`. The tensors may be trainable variables (model
/// tuning): every path then keeps their gradients.
#[derive(Clone, Debug)]
pub struct Linear {
    pub w: Tensor,
    pub b: Option<Tensor>,
}

impl Linear {
    pub fn new(w: Tensor, b: Option<Tensor>) -> Self {
        Linear { w, b }
    }

    /// Output rows `start .. start+len` of the layer (views, no copy): one projection out of
    /// a checkpoint's stacked ones (Phi-3's `qkv_proj`, `gate_up_proj`).
    pub fn rows(&self, start: usize, len: usize) -> Result<Linear> {
        let b = self.b.as_ref().map(|b| b.narrow(0, start, len)).transpose()?;
        Ok(Linear::new(self.w.narrow(0, start, len)?, b))
    }

    /// `x [.., K]` -> `[.., N]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        ops::linear(x, &self.w, self.b.as_ref())
    }

    /// The operands of the block kernels (shared tensors, no copy).
    pub(crate) fn weights(&self) -> ProjWeights {
        ProjWeights {
            w: self.w.clone(),
            b: self.b.clone(),
        }
    }
}
