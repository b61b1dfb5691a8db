//! Compute kernels with no model knowledge: plain tensors and numbers in, tensors out.
//!
//! candle's own fused kernels (`softmax_last_dim`, `rms_norm`, `rope`) have no backward, and
//! composed of candle primitives an RMSNorm is six tensor ops forward and about twenty
//! backward, each allocating a full-size buffer, plus gradients of constant operands nobody
//! reads. The kernels here are candle `CustomOp`s with a hand-written backward that returns
//! gradients only for the operands that can need them:
//!
//! - element-wise and row-wise ops: [`norm`], [`softmax`], [`rope`], [`activation`], [`loss`];
//! - [`frozen_matmul`]: `x @ W^T` whose backward computes the input gradient only;
//! - the residual sub-blocks of a pre-norm transformer layer, [`attention`] and
//!   [`feed_forward`]: one op each, keeping only what their backward reads;
//! - [`gemm`] (one strided sgemm helper), [`cpu`] (buffer access, the one shared-output
//!   helper, the one parallelism setting) and `op` (candle's `CustomOp1/2/3`
//!   implemented once for the element-wise and row-wise ops) underneath.
//!
//! All of them but the frozen matmul run on the CPU in f32 only. Which ones a model uses is
//! chosen by a [`Kernels`] value the model owns; the composite (candle-primitive) path in
//! `model::ops` and `model::layers` stays the readable reference these are tested against.

pub(crate) mod activation;
pub(crate) mod attention;
mod attention_backward;
mod attention_rows;
pub(crate) mod cpu;
pub(crate) mod feed_forward;
pub(crate) mod frozen_matmul;
pub(crate) mod gemm;
pub(crate) mod loss;
pub(crate) mod norm;
mod op;
pub(crate) mod rope;
pub(crate) mod softmax;
pub(crate) mod weight;

#[cfg(test)]
pub(crate) mod tests;

use candle_core::{DType, Tensor};

/// Which kernels a model runs: a value owned by the model (set at load, changed with
/// `CausalLm::set_kernels` / `Seq2SeqLm::set_kernels`), never a process-wide switch. Every
/// choice gives the same results to rounding; the fast ones allocate less and skip gradients
/// nobody reads. Where a fast kernel does not apply (another device or dtype, a trained
/// weight), the composite path runs whatever the policy says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Kernels {
    /// Fused element-wise and row-wise ops (norms, softmax, rotary, activations, token NLL).
    pub fused_ops: bool,
    /// Fused residual sub-blocks (attention, feed-forward) with a hand-written backward.
    pub fused_blocks: bool,
    /// Generation steps (few rows, no gradient) multiply stored quantised matrices with
    /// candle's quantised matmul instead of dequantising them: much faster, but the
    /// activations are rounded to 8 bits on the way, so the logits are close to, not equal
    /// to, the exact path's. Off unless a generation entry point asks for it; the decoder
    /// applies it to generation steps only (a non-empty KV cache, the last position's logits).
    pub quantized_decode: bool,
}

impl Kernels {
    /// Every fast kernel (the default).
    pub const fn fast() -> Self {
        Kernels {
            fused_ops: true,
            fused_blocks: true,
            quantized_decode: false,
        }
    }

    /// candle primitives only: the readable reference path.
    pub const fn reference() -> Self {
        Kernels {
            fused_ops: false,
            fused_blocks: false,
            quantized_decode: false,
        }
    }

    /// Fused element-wise ops, sub-blocks composed of single ops.
    pub const fn fused_ops_only() -> Self {
        Kernels {
            fused_ops: true,
            fused_blocks: false,
            quantized_decode: false,
        }
    }

    /// The same policy with quantised generation steps on or off.
    pub const fn with_quantized_decode(self, on: bool) -> Self {
        Kernels {
            quantized_decode: on,
            ..self
        }
    }

    /// Whether a product on `x [.., K]` runs on quantised blocks: the policy allows it, `x`
    /// needs no gradient and has at most [`QUANTIZED_MAX_ROWS`] rows (beyond, dequantising
    /// the matrix once and running the f32 gemm is faster).
    pub(crate) fn quantized_applies(self, x: &Tensor) -> bool {
        let rows = x.dims().split_last().map_or(0, |(_, r)| r.iter().product::<usize>());
        self.quantized_decode && !x.track_op() && rows <= QUANTIZED_MAX_ROWS && all_cpu_f32(&[x])
    }

    /// Whether the fused element-wise ops run on these tensors: on, all on the CPU, all f32.
    pub(crate) fn ops_apply(self, ts: &[&Tensor]) -> bool {
        self.fused_ops && all_cpu_f32(ts)
    }

    /// Whether the fused sub-block ops run on `x` with these frozen operands: both switches
    /// on, everything f32 on the CPU, the operands contiguous and not tracked by autograd.
    pub(crate) fn blocks_apply(self, x: &Tensor, frozen: &[&Tensor]) -> bool {
        self.fused_ops
            && self.fused_blocks
            && all_cpu_f32(&[x])
            && all_cpu_f32(frozen)
            && frozen.iter().all(|t| !t.track_op() && t.is_contiguous())
    }
}

/// Rows up to which a product without gradient may run on quantised blocks (a decode step
/// of a batch of this many sequences).
pub(crate) const QUANTIZED_MAX_ROWS: usize = 32;

impl Default for Kernels {
    fn default() -> Self {
        Kernels::fast()
    }
}

fn all_cpu_f32(ts: &[&Tensor]) -> bool {
    ts.iter()
        .all(|t| t.device().is_cpu() && t.dtype() == DType::F32)
}
