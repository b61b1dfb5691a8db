//! A linear layer `y = x @ w^T + b`: the one representation of a weight.

use crate::kernels::gemm::ProjWeights;
use crate::kernels::weight::FrozenWeight;
use crate::kernels::Kernels;
use crate::model::ops;
use crate::Result;
use candle_core::Tensor;

/// `w [N, K]` (nn.Linear layout), `b [N]`. The weight is a tensor (it may be a trainable
/// variable under model tuning: every path then keeps its gradient) or stored blocks of a
/// GGUF file, dequantised when a product runs.
#[derive(Clone, Debug)]
pub struct Linear {
    pub w: FrozenWeight,
    pub b: Option<Tensor>,
}

impl Linear {
    /// A layer on a weight tensor.
    pub fn new(w: Tensor, b: Option<Tensor>) -> Self {
        Linear::frozen(FrozenWeight::Dense(w), b)
    }

    /// A layer on a frozen weight in any encoding.
    pub fn frozen(w: FrozenWeight, b: Option<Tensor>) -> Self {
        Linear { w, b }
    }

    /// Output rows `start .. start+len` of the layer (views, no copy): one projection out of
    /// a checkpoint's stacked ones (Phi-3's `qkv_proj`, `gate_up_proj`).
    pub fn rows(&self, start: usize, len: usize) -> Result<Linear> {
        let b = self.b.as_ref().map(|b| b.narrow(0, start, len)).transpose()?;
        Ok(Linear::frozen(self.w.rows(start, len)?, b))
    }

    /// `x [.., K]` -> `[.., N]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        ops::linear_frozen(x, &self.w, self.b.as_ref())
    }

    /// [`Self::forward`], or candle's quantised matmul on the stored blocks where `kernels`
    /// allows it for `x` (generation steps, see [`Kernels::quantized_decode`]).
    pub fn forward_with(&self, kernels: Kernels, x: &Tensor) -> Result<Tensor> {
        match self.w.quantized() {
            Some(q) if kernels.quantized_applies(x) => {
                let y = x.contiguous()?.apply_op1_no_bwd(q)?; // [.., N]
                match &self.b {
                    Some(b) => Ok(y.broadcast_add(b)?),
                    None => Ok(y),
                }
            }
            _ => self.forward(x),
        }
    }

    /// Whether [`Self::forward_with`] runs on quantised blocks for `x` under `kernels`.
    pub(crate) fn quantized_for(&self, kernels: Kernels, x: &Tensor) -> bool {
        self.w.quantized().is_some() && kernels.quantized_applies(x)
    }

    /// The operands of the block kernels (shared tensors or blocks, no copy).
    pub(crate) fn weights(&self) -> ProjWeights {
        ProjWeights {
            w: self.w.clone(),
            b: self.b.clone(),
        }
    }
}
