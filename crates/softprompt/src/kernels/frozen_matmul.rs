//! `x @ w^T` for a frozen weight `w`: the backward pass computes the input's gradient only.
//!
//! candle's `matmul` backward always computes the gradients of both operands. In prompt
//! tuning every weight is a frozen plain tensor and only the prompt needs a gradient, so every
//! linear layer would spend one extra matmul (and a weight-sized buffer) on a gradient nobody
//! reads. [`matmul_t`] runs the same candle matmul kernel forward (same result bit for bit)
//! and returns `dx = dy @ w` only. Weights that are variables (model tuning) or depend on one
//! keep the plain matmul and get their gradients (see [`applies`]).

use super::cpu::{data, ReadLock};
use super::gemm::{gemm, MatLayout, MatRef};
use super::weight::FrozenWeight;
use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CudaStorage, CustomOp1, CustomOp2, Layout, MetalStorage, Shape, Storage, Tensor,
};

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

/// `x [M, K] @ w^T` -> `[M, N]` for a stored `w [N, K]`, differentiable with respect to `x`
/// when `x` tracks a gradient. A matrix of at most [`PANEL_BYTES`] of f32 is dequantised
/// whole and multiplied by the same storage-level matmul as [`matmul_t`] (the same result bit
/// for bit as on the f32 weight); a larger one (an LM head `[V, D]`) one panel of rows at a
/// time into its columns of the output, so its f32 copy never exists whole (the same values;
/// the gemm's blocking can differ, so equal to rounding). The backward dequantises again for
/// `dx = dy @ w`: nothing keeps an f32 copy between forward and backward.
pub(crate) fn stored_matmul_t(x: &Tensor, w: &FrozenWeight) -> candle_core::Result<Tensor> {
    let x = x.contiguous()?;
    let op = StoredMatmulT(w.clone());
    if x.track_op() {
        x.apply_op1(op)
    } else {
        x.apply_op1_no_bwd(&op)
    }
}

/// The f32 size above which a stored matrix is multiplied panel by panel: 128 MB keeps a
/// small model's head (SmolLM2's `[49152, 576]`, 113 MB) whole and bit-equal to the f32 path
/// (panels sum the backward in another order: equal to ~1e-6 relative, measured on it), and
/// splits a large one (Llama-3-8B's `[128256, 4096]`, 2.1 GB).
const PANEL_BYTES: usize = 128 << 20;

/// Rows of a `[.., k]` matrix in one panel.
fn panel_rows(k: usize) -> usize {
    (PANEL_BYTES / (4 * k.max(1))).max(1)
}

struct StoredMatmulT(FrozenWeight);

impl CustomOp1 for StoredMatmulT {
    fn name(&self) -> &'static str {
        "stored-matmul-t"
    }

    fn cpu_fwd(&self, x: &CpuStorage, x_l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (n, k) = self.0.dims2()?;
        let (m, k2) = x_l.shape().dims2()?;
        if k != k2 {
            candle_core::bail!("stored matmul: x is [{m}, {k2}] but w is [{n}, {k}]");
        }
        let step = panel_rows(k);
        if n <= step {
            let w = self.0.to_f32()?; // [N, K], dropped at the end of this product
            let (storage, w_l) = w.storage_and_layout();
            return match &*storage {
                Storage::Cpu(w) => fwd(x, x_l, w, w_l),
                _ => candle_core::bail!("stored matmul: expected a CPU weight"),
            };
        }
        let xd = data(x, x_l, "stored matmul")?;
        let mut y = vec![0f32; m * n];
        for r0 in (0..n).step_by(step) {
            let p = step.min(n - r0);
            let wp = self.0.rows(r0, p)?.to_f32_vec()?; // [p, K]
            gemm(
                &mut y,
                MatLayout::rows(r0, n), // columns r0 .. r0+p of y [M, N]
                false,
                MatRef(xd, MatLayout::rows(0, k)),
                MatRef(&wp, MatLayout::t(0, k)),
                (m, p, k),
            )?;
        }
        Ok((CpuStorage::F32(y), Shape::from((m, n))))
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, dy: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let (n, k) = self.0.dims2()?;
        let step = panel_rows(k);
        if n <= step || !dy.device().is_cpu() {
            return Ok(Some(dy.matmul(&self.0.to_f32()?)?));
        }
        let dy = dy.contiguous()?;
        let m = dy.dim(0)?;
        let lock = ReadLock::new(&dy);
        let dyd = lock.f32()?;
        let mut dx = vec![0f32; m * k];
        for r0 in (0..n).step_by(step) {
            let p = step.min(n - r0);
            let wp = self.0.rows(r0, p)?.to_f32_vec()?; // [p, K]
            gemm(
                &mut dx,
                MatLayout::rows(0, k),
                r0 > 0,
                MatRef(dyd, MatLayout::rows(r0, n)), // columns r0 .. r0+p of dy [M, N]
                MatRef(&wp, MatLayout::rows(0, k)),
                (m, k, p),
            )?;
        }
        Ok(Some(Tensor::from_vec(dx, (m, k), dy.device())?))
    }
}
