//! `softmax(x * scale + bias)` over the last dimension with its backward, and the row
//! functions the attention kernels share.

use super::activation::exp;
use super::cpu::{backward, check_len, data, f32_out, last_dim, rows, Result};
use super::op::{CpuKernel, Fused, Operand};
use candle_core::{CpuStorage, DType, Layout, Shape, Tensor};

/// `softmax(x * scale + bias)` over the last dimension. `bias` broadcasts to `x`'s shape (the
/// attention mask `[B, 1, T, K]`, T5's position bias `[B, H, T, K]`) and gets no gradient.
pub(crate) fn softmax_scaled(x: &Tensor, bias: Option<&Tensor>, scale: f64) -> Result<Tensor> {
    let x = x.contiguous()?;
    let bias = match bias {
        Some(b) => {
            let b = if b.stride().last() == Some(&1) {
                b.clone()
            } else {
                b.contiguous()?
            };
            b.broadcast_as(x.shape())?
        }
        // A zero-stride stand-in: the kernel adds 0.
        None => Tensor::zeros(1, DType::F32, x.device())?.broadcast_as(x.shape())?,
    };
    x.apply_op2(
        &bias,
        Fused(Softmax {
            scale: scale as f32,
        }),
    )
}

struct Softmax {
    scale: f32,
}

/// Offset of every row of a strided operand whose last dimension has stride 1.
fn row_offsets(l: &Layout) -> Result<Vec<usize>> {
    let dims = l.dims();
    let stride = l.stride();
    let rank = dims.len();
    if rank == 0 || stride[rank - 1] > 1 {
        candle_core::bail!("fused softmax: bias must have a unit-stride last dimension");
    }
    let n: usize = dims[..rank - 1].iter().product();
    let mut out = Vec::with_capacity(n);
    for mut i in 0..n {
        let mut off = l.start_offset();
        for k in (0..rank - 1).rev() {
            off += (i % dims[k]) * stride[k];
            i /= dims[k];
        }
        out.push(off);
    }
    Ok(out)
}

impl CpuKernel<2> for Softmax {
    const NAME: &'static str = "fused-softmax";

    fn forward(&self, [(xs, xl), (bs, bl)]: [Operand<'_>; 2]) -> Result<(CpuStorage, Shape)> {
        let x = data(xs, xl, Self::NAME)?;
        let b_all = bs.as_slice::<f32>()?;
        let (n, k) = last_dim(xl)?;
        if bl.dims() != xl.dims() {
            candle_core::bail!(
                "fused softmax: bias {:?} vs scores {:?}",
                bl.dims(),
                xl.dims()
            );
        }
        let offsets = row_offsets(bl)?;
        let unit = bl.stride().last() == Some(&1);
        let out = rows(n, k, |i, y| {
            let x = &x[i * k..(i + 1) * k];
            let o = offsets[i];
            for (j, (y, &x)) in y.iter_mut().zip(x).enumerate() {
                let b = if unit { b_all[o + j] } else { b_all[o] };
                *y = x * self.scale + b;
            }
            softmax_row(y);
        })?;
        Ok(f32_out(out, xl))
    }

    fn backward(
        &self,
        _inputs: [&Tensor; 2],
        y: &Tensor,
        dy: &Tensor,
    ) -> Result<[Option<Tensor>; 2]> {
        // dx = scale * y * (g - sum(g * y))
        let k = y.dims().last().copied().unwrap_or(1).max(1);
        let dx = backward("softmax backward", [y, dy], |[y, g]| {
            check_len("softmax backward", g.len(), y.len())?;
            rows(y.len() / k, k, |i, dx| {
                dx.copy_from_slice(&g[i * k..(i + 1) * k]);
                softmax_bwd_row(&y[i * k..(i + 1) * k], dx, self.scale);
            })
        })?;
        Ok([Some(dx), None])
    }
}

/// Softmax of one row in place (the sum in f64).
pub(crate) fn softmax_row(y: &mut [f32]) {
    let max = y.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    for y in y.iter_mut() {
        *y = exp(*y - max);
    }
    let sum = y.iter().map(|&v| v as f64).sum::<f64>() as f32;
    for y in y.iter_mut() {
        *y /= sum;
    }
}

/// One row of the softmax backward, in place: `g <- scale * y * (g - sum(g * y))`.
pub(crate) fn softmax_bwd_row(y: &[f32], g: &mut [f32], scale: f32) {
    let dot = y
        .iter()
        .zip(g.iter())
        .map(|(y, g)| (y * g) as f64)
        .sum::<f64>() as f32;
    for (g, &y) in g.iter_mut().zip(y) {
        *g = scale * y * (*g - dot);
    }
}
