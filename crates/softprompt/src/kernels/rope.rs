//! Rotary position embeddings with the inverse rotation as backward, and the row function
//! the attention kernels share.

use super::cpu::{check_len, f32_out, operands, rows, Result, MIN_ROWS};
use super::op::{CpuKernel, Fused, Operand};
use candle_core::{CpuStorage, Shape, Tensor};
use rayon::prelude::*;

/// Rotary embeddings on `x [B, H, T, Dh]` with tables `cos`, `sin` `[T, Dh/2]` (no gradient).
/// `interleaved` as in `model::ops::rope`. The backward is the inverse rotation.
pub(crate) fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor, interleaved: bool) -> Result<Tensor> {
    let (_, _, t, d) = x.dims4()?;
    if d % 2 != 0 || cos.dims() != [t, d / 2] || sin.dims() != [t, d / 2] {
        candle_core::bail!(
            "fused rope: x {:?}, cos {:?}, sin {:?}",
            x.dims(),
            cos.dims(),
            sin.dims()
        );
    }
    x.contiguous()?.apply_op3(
        &cos.contiguous()?,
        &sin.contiguous()?,
        Fused(Rope {
            interleaved,
            inverse: false,
        }),
    )
}

struct Rope {
    interleaved: bool,
    /// Rotates by `-angle` (the backward).
    inverse: bool,
}

impl CpuKernel<3> for Rope {
    const NAME: &'static str = "fused-rope";

    fn forward(
        &self,
        [(xs, xl), (cs, cl), (ss, sl)]: [Operand<'_>; 3],
    ) -> Result<(CpuStorage, Shape)> {
        let [x, cos, sin] = operands(Self::NAME, [(xs, xl), (cs, cl), (ss, sl)])?;
        let dims = xl.dims();
        if dims.len() != 4 {
            candle_core::bail!("fused rope: expected [B, H, T, Dh], got {dims:?}");
        }
        let (t, d) = (dims[2], dims[3]);
        let half = d / 2;
        check_len("rope tables", cos.len(), t * half)?;
        check_len("rope tables", sin.len(), t * half)?;
        let n = x.len() / d;
        let out = rows(n, d, |i, y| {
            y.copy_from_slice(&x[i * d..(i + 1) * d]);
            let p = (i % t) * half;
            rope_row(
                y,
                &cos[p..p + half],
                &sin[p..p + half],
                self.interleaved,
                self.inverse,
            );
        })?;
        Ok(f32_out(out, xl))
    }

    fn backward(
        &self,
        [_, cos, sin]: [&Tensor; 3],
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<[Option<Tensor>; 3]> {
        let inverse = Fused(Rope {
            interleaved: self.interleaved,
            inverse: !self.inverse,
        });
        let dx = dy.contiguous()?.apply_op3_no_bwd(cos, sin, &inverse)?;
        Ok([Some(dx), None, None])
    }
}

/// Rotates one head row `x [Dh]` in place by the angles of `cos`, `sin` `[Dh/2]` (by minus
/// the angles when `inverse`); pairs `(j, j + Dh/2)`, or `(2j, 2j+1)` when `interleaved`.
pub(crate) fn rope_row(x: &mut [f32], cos: &[f32], sin: &[f32], interleaved: bool, inverse: bool) {
    let half = cos.len();
    let sign = if inverse { -1f32 } else { 1f32 };
    for j in 0..half {
        let (cj, sj) = (cos[j], sign * sin[j]);
        let (a, b) = if interleaved {
            (2 * j, 2 * j + 1)
        } else {
            (j, j + half)
        };
        let (x1, x2) = (x[a], x[b]);
        x[a] = x1 * cj - x2 * sj;
        x[b] = x2 * cj + x1 * sj;
    }
}
/// Rotary tables `cos`, `sin` `[T, Dh/2]` as data, and whether pairs are interleaved.
pub(crate) type RopeData<'a> = (&'a [f32], &'a [f32], bool);

/// `[B*T, H*Dh]` -> `[B, H, T, Dh]`, rotated when `rope` is given.
pub(crate) fn to_heads(
    x: &[f32],
    (b, t, h, dh): (usize, usize, usize, usize),
    rope: Option<RopeData>,
) -> Vec<f32> {
    let n = h * dh;
    let mut out = vec![0f32; b * h * t * dh];
    out.par_chunks_mut(t * dh)
        .enumerate()
        .for_each(|(bh, dst)| {
            let (bi, hi) = (bh / h, bh % h);
            for (ti, row) in dst.chunks_mut(dh).enumerate() {
                let src = (bi * t + ti) * n + hi * dh;
                row.copy_from_slice(&x[src..src + dh]);
                if let Some((cos, sin, interleaved)) = rope {
                    let p = ti * dh / 2;
                    rope_row(
                        row,
                        &cos[p..p + dh / 2],
                        &sin[p..p + dh / 2],
                        interleaved,
                        false,
                    );
                }
            }
        });
    out
}

/// Rotates every head (`Dh` floats) of every row of `x [M, N]` in place, row `i` by the
/// angles of position `pos(i)` of the tables `[T, Dh/2]` (by minus them when `inverse`).
pub(crate) fn rotate_rows(
    x: &mut [f32],
    (n, dh): (usize, usize),
    rope: RopeData,
    inverse: bool,
    pos: impl Fn(usize) -> usize + Sync,
) {
    let (cos, sin, interleaved) = rope;
    let half = dh / 2;
    x.par_chunks_mut(n)
        .enumerate()
        .with_min_len(MIN_ROWS)
        .for_each(|(i, row)| {
            let p = pos(i) * half;
            for head in row.chunks_mut(dh) {
                rope_row(
                    head,
                    &cos[p..p + half],
                    &sin[p..p + half],
                    interleaved,
                    inverse,
                );
            }
        });
}
