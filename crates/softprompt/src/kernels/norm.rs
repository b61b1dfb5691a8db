//! RMSNorm and LayerNorm over the last dimension, differentiable with respect to the input
//! only (the weights are frozen), and their row functions for the block kernels.

use super::cpu::{
    backward, check_len, f32_out, last_dim, operands, rows, ReadLock, Result, MIN_ROWS,
};
use super::op::{CpuKernel, Fused, Operand};
use candle_core::{CpuStorage, Shape, Tensor};
use rayon::prelude::*;

/// Which normalisation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum NormKind {
    /// `x * rsqrt(mean(x^2) + eps) * w` (Llama, T5).
    Rms,
    /// `(x - mean) * rsqrt(var + eps) * w + b` (GPT-2).
    Layer,
}

/// A frozen norm as the block kernels take it: weight `[D]`, bias `[D]` (LayerNorm only).
#[derive(Clone, Debug)]
pub(crate) struct NormWeights {
    pub kind: NormKind,
    pub w: Tensor,
    pub b: Option<Tensor>,
    pub eps: f32,
}

impl NormWeights {
    pub(crate) fn tensors<'a>(&'a self, out: &mut Vec<&'a Tensor>) {
        out.push(&self.w);
        out.extend(&self.b);
    }

    pub(crate) fn check(&self, d: usize) -> Result<()> {
        let bias_ok = match (self.kind, &self.b) {
            (NormKind::Rms, _) => true,
            (NormKind::Layer, Some(b)) => b.dims() == [d],
            (NormKind::Layer, None) => false,
        };
        if self.w.dims() != [d] || !bias_ok {
            candle_core::bail!("block norm: weights do not have width {d}");
        }
        Ok(())
    }

    pub(crate) fn lock(&self) -> NormLock<'_> {
        NormLock {
            norm: self,
            w: ReadLock::new(&self.w),
            b: self.b.as_ref().map(ReadLock::new),
        }
    }
}

pub(crate) struct NormLock<'a> {
    norm: &'a NormWeights,
    w: ReadLock<'a>,
    b: Option<ReadLock<'a>>,
}

/// `x * rsqrt(mean(x^2) + eps) * w`; `x [.., D]`, `w [D]`.
pub(crate) fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    x.contiguous()?
        .apply_op2(&w.contiguous()?, Fused(RmsNorm { eps: eps as f32 }))
}

/// `(x - mean) * rsqrt(var + eps) * w + b`; `x [.., D]`, `w`, `b [D]`.
pub(crate) fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    x.contiguous()?.apply_op3(
        &w.contiguous()?,
        &b.contiguous()?,
        Fused(LayerNorm { eps: eps as f32 }),
    )
}

struct RmsNorm {
    eps: f32,
}

impl CpuKernel<2> for RmsNorm {
    const NAME: &'static str = "fused-rms-norm";

    fn forward(&self, [(xs, xl), (ws, wl)]: [Operand<'_>; 2]) -> Result<(CpuStorage, Shape)> {
        let [x, w] = operands(Self::NAME, [(xs, xl), (ws, wl)])?;
        let (n, d) = last_dim(xl)?;
        check_len("rms-norm weight", w.len(), d)?;
        let out = rows(n, d, |i, y| {
            rms_norm_row(&x[i * d..(i + 1) * d], w, self.eps, y)
        })?;
        Ok(f32_out(out, xl))
    }

    fn backward(
        &self,
        [x, w]: [&Tensor; 2],
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<[Option<Tensor>; 2]> {
        Ok([
            Some(norm_backward(NormKind::Rms, self.eps, x, w, dy)?),
            None,
        ])
    }
}

struct LayerNorm {
    eps: f32,
}

impl CpuKernel<3> for LayerNorm {
    const NAME: &'static str = "fused-layer-norm";

    fn forward(
        &self,
        [(xs, xl), (ws, wl), (bs, bl)]: [Operand<'_>; 3],
    ) -> Result<(CpuStorage, Shape)> {
        let [x, w, b] = operands(Self::NAME, [(xs, xl), (ws, wl), (bs, bl)])?;
        let (n, d) = last_dim(xl)?;
        check_len("layer-norm weight", w.len(), d)?;
        check_len("layer-norm bias", b.len(), d)?;
        let out = rows(n, d, |i, y| {
            layer_norm_row(&x[i * d..(i + 1) * d], w, b, self.eps, y)
        })?;
        Ok(f32_out(out, xl))
    }

    fn backward(
        &self,
        [x, w, _]: [&Tensor; 3],
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<[Option<Tensor>; 3]> {
        let dx = norm_backward(NormKind::Layer, self.eps, x, w, dy)?;
        Ok([Some(dx), None, None])
    }
}

/// The input gradient of either norm, `(x, w, dy) -> dx`, row by row.
fn norm_backward(kind: NormKind, eps: f32, x: &Tensor, w: &Tensor, dy: &Tensor) -> Result<Tensor> {
    backward("norm backward", [x, w, dy], |[x, w, g]| {
        let d = w.len().max(1);
        check_len("norm backward", g.len(), x.len())?;
        rows(x.len() / d, d, |i, dx| {
            let (x, g) = (&x[i * d..(i + 1) * d], &g[i * d..(i + 1) * d]);
            match kind {
                NormKind::Rms => rms_norm_bwd_row(x, w, g, eps, dx),
                NormKind::Layer => layer_norm_bwd_row(x, w, g, eps, dx),
            }
        })
    })
}

/// `rsqrt(mean(x^2) + eps)` of one row (sum in f64).
fn rms_rsqrt(x: &[f32], eps: f32) -> f32 {
    let ms = x.iter().map(|&v| (v * v) as f64).sum::<f64>() / x.len() as f64;
    1.0 / (ms as f32 + eps).sqrt()
}

/// One row of RMSNorm: `y = x * rsqrt(mean(x^2) + eps) * w`.
fn rms_norm_row(x: &[f32], w: &[f32], eps: f32, y: &mut [f32]) {
    let r = rms_rsqrt(x, eps);
    for ((y, &x), &w) in y.iter_mut().zip(x).zip(w) {
        *y = x * r * w;
    }
}

/// One row of RMSNorm's input gradient for the output gradient `g`:
/// `dx = r * g*w - x * r^3 * mean(g*w*x)` with `r = rsqrt(mean(x^2) + eps)`.
fn rms_norm_bwd_row(x: &[f32], w: &[f32], g: &[f32], eps: f32, dx: &mut [f32]) {
    let r = rms_rsqrt(x, eps);
    let dot: f64 = x
        .iter()
        .zip(g)
        .zip(w)
        .map(|((x, g), w)| (x * g * w) as f64)
        .sum();
    let c = r * r * r * (dot / x.len() as f64) as f32;
    for (((dx, &x), &g), &w) in dx.iter_mut().zip(x).zip(g).zip(w) {
        *dx = r * g * w - x * c;
    }
}

/// Mean and `rsqrt(var + eps)` of one row (sums in f64).
fn moments(x: &[f32], eps: f32) -> (f32, f32) {
    let d = x.len() as f64;
    let mean = (x.iter().map(|&v| v as f64).sum::<f64>() / d) as f32;
    let var = x
        .iter()
        .map(|&v| ((v - mean) * (v - mean)) as f64)
        .sum::<f64>()
        / d;
    (mean, 1.0 / (var as f32 + eps).sqrt())
}

/// One row of LayerNorm: `y = (x - mean) * rsqrt(var + eps) * w + b`.
fn layer_norm_row(x: &[f32], w: &[f32], b: &[f32], eps: f32, y: &mut [f32]) {
    let (mean, r) = moments(x, eps);
    for (((y, &x), &w), &b) in y.iter_mut().zip(x).zip(w).zip(b) {
        *y = (x - mean) * r * w + b;
    }
}

/// One row of LayerNorm's input gradient for the output gradient `g`:
/// `dx = r * (gw - mean(gw) - xhat * mean(gw * xhat))`, `gw = g*w`, `xhat = (x - mean) * r`.
fn layer_norm_bwd_row(x: &[f32], w: &[f32], g: &[f32], eps: f32, dx: &mut [f32]) {
    let d = x.len() as f64;
    let (mean, r) = moments(x, eps);
    let (mut s_gw, mut s_gwx) = (0f64, 0f64);
    for ((&x, &g), &w) in x.iter().zip(g).zip(w) {
        let gw = g * w;
        s_gw += gw as f64;
        s_gwx += (gw * (x - mean) * r) as f64;
    }
    let (m_gw, m_gwx) = ((s_gw / d) as f32, (s_gwx / d) as f32);
    for (((dx, &x), &g), &w) in dx.iter_mut().zip(x).zip(g).zip(w) {
        *dx = r * (g * w - m_gw - (x - mean) * r * m_gwx);
    }
}

impl NormLock<'_> {
    /// The norm of every row of `x [R, D]`.
    pub(crate) fn forward_rows(&self, x: &[f32], d: usize) -> Result<Vec<f32>> {
        let (kind, w, b, eps) = self.data()?;
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(d)
            .zip(x.par_chunks(d))
            .with_min_len(MIN_ROWS)
            .for_each(|(y, x)| match kind {
                NormKind::Layer => layer_norm_row(x, w, b, eps, y),
                NormKind::Rms => rms_norm_row(x, w, eps, y),
            });
        Ok(y)
    }

    /// `dy + norm'(x)^T dn` row by row: the input gradient of a residual sub-block whose
    /// branch starts with this norm.
    pub(crate) fn backward_rows_add(
        &self,
        x: &[f32],
        dn: &[f32],
        dy: &[f32],
        d: usize,
    ) -> Result<Vec<f32>> {
        self.backward_rows(x, dn, Some(dy), d)
    }

    /// `norm'(x)^T dn` row by row, plus `dy` when given (the residual's gradient).
    pub(crate) fn backward_rows(
        &self,
        x: &[f32],
        dn: &[f32],
        dy: Option<&[f32]>,
        d: usize,
    ) -> Result<Vec<f32>> {
        let (kind, w, _, eps) = self.data()?;
        let mut dx = vec![0f32; x.len()];
        dx.par_chunks_mut(d)
            .zip(x.par_chunks(d).zip(dn.par_chunks(d)))
            .enumerate()
            .with_min_len(MIN_ROWS)
            .for_each(|(i, (dx, (x, g)))| {
                match kind {
                    NormKind::Layer => layer_norm_bwd_row(x, w, g, eps, dx),
                    NormKind::Rms => rms_norm_bwd_row(x, w, g, eps, dx),
                }
                if let Some(dy) = dy {
                    let dy = &dy[i * d..(i + 1) * d];
                    dx.iter_mut().zip(dy).for_each(|(dx, dy)| *dx += dy);
                }
            });
        Ok(dx)
    }

    /// Kind, weight `[D]`, bias `[D]` (empty for RMSNorm) and epsilon.
    fn data(&self) -> Result<(NormKind, &[f32], &[f32], f32)> {
        let b = match (self.norm.kind, &self.b) {
            (NormKind::Rms, _) => &[][..],
            (NormKind::Layer, Some(b)) => b.f32()?,
            (NormKind::Layer, None) => candle_core::bail!("layer norm without a bias"),
        };
        Ok((self.norm.kind, self.w.f32()?, b, self.norm.eps))
    }
}
