//! `x @ w^T` for a frozen weight `w`: the backward pass computes the input's gradient only.
//!
//! candle's `matmul` backward always computes the gradients of both operands. In prompt
//! tuning every weight is a frozen plain tensor and only the prompt needs a gradient, so every
//! linear layer would spend one extra matmul (and a weight-sized buffer) on a gradient nobody
//! reads. [`matmul_t`] runs the same candle matmul kernel forward (same result bit for bit)
//! and returns `dx = dy @ w` only. Weights that are variables (model tuning) or depend on one
//! keep the plain matmul and get their gradients (see [`applies`]).

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CudaStorage, CustomOp2, Layout, MetalStorage, Shape, Tensor};

/// Whether `model::ops::linear` uses [`matmul_t`] for `x [M, K]` and `w [N, K]`: `x` takes part in a gradient computation, `w` does not (neither a variable nor
/// computed from one), and the shapes and dtypes are ones the plain matmul accepts without
/// special cases. Inference (nothing tracks gradients) keeps the plain matmul.
pub(crate) fn applies(x: &Tensor, w: &Tensor) -> bool {
    let (Ok((m, k)), Ok((n, k2))) = (x.dims2(), w.dims2()) else {
        return false;
    };
    x.track_op()
        && !w.track_op()
        && x.dtype() == w.dtype()
        && x.device().same_device(w.device())
        && k == k2
        && m > 0
        && n > 0
        && k > 0
}

/// `x [M, K] @ w^T` -> `[M, N]` for `w [N, K]`. Differentiable with respect to `x` only:
/// `w` never receives a gradient, even if it is a variable.
pub(crate) fn matmul_t(x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    x.apply_op2(w, FrozenMatmulT)
}

struct FrozenMatmulT;

/// Candle's own storage-level matmul with `w`'s layout transposed, exactly what
/// `x.matmul(&w.t())` runs.
fn fwd<S: BackendStorage>(
    x: &S,
    x_l: &Layout,
    w: &S,
    w_l: &Layout,
) -> candle_core::Result<(S, Shape)> {
    let (m, k) = x_l.shape().dims2()?;
    let (n, k2) = w_l.shape().dims2()?;
    if k != k2 {
        candle_core::bail!("frozen matmul: x is [{m}, {k}] but w is [{n}, {k2}]");
    }
    let wt = w_l.transpose(0, 1)?; // [K, N], strided
    let y = x.matmul(w, (1, m, n, k), x_l, &wt)?;
    Ok((y, Shape::from((m, n))))
}

/// `CustomOp2`'s forward methods for the listed backends, each calling [`fwd`].
macro_rules! forward_on_every_backend {
    ($($method:ident: $storage:ty),*) => {$(
        fn $method(
            &self,
            x: &$storage,
            x_l: &Layout,
            w: &$storage,
            w_l: &Layout,
        ) -> candle_core::Result<($storage, Shape)> {
            fwd(x, x_l, w, w_l)
        }
    )*};
}

impl CustomOp2 for FrozenMatmulT {
    fn name(&self) -> &'static str {
        "frozen-matmul-t"
    }

    // The same storage-level matmul on every backend.
    forward_on_every_backend!(
        cpu_fwd: CpuStorage,
        cuda_fwd: CudaStorage,
        metal_fwd: MetalStorage
    );

    /// `dx = dy @ w` (`[M, N] @ [N, K]`), the same product candle's matmul backward forms
    /// for the left operand; no gradient for `w`.
    fn bwd(
        &self,
        _x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(dy.matmul(w)?), None))
    }
}
