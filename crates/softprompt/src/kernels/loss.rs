//! Token negative log-likelihood over the vocabulary with its backward.

use super::cpu::{check_len, data, f32_out, fill, last_dim, operands, rows, Result};
use super::op::{CpuKernel, Fused, Operand};
use candle_core::{CpuStorage, DType, Layout, Shape, Tensor};

/// `-log_softmax(logits)[i, targets[i]]`: `logits [M, V]` (f32), `targets [M]` (u32) -> `[M]`.
/// The backward is `g * (softmax(logits) - onehot(target))`.
pub(crate) fn token_nll(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let (m, _) = logits.dims2()?;
    if targets.dims() != [m] || targets.dtype() != DType::U32 {
        candle_core::bail!(
            "fused token_nll: targets must be u32 [{m}], got {:?} {:?}",
            targets.dtype(),
            targets.dims()
        );
    }
    logits
        .contiguous()?
        .apply_op2(&targets.contiguous()?, Fused(TokenNll))
}

struct TokenNll;

fn targets_of<'a>(s: &'a CpuStorage, l: &Layout, v: usize) -> Result<&'a [u32]> {
    let all = s.as_slice::<u32>()?;
    let t = match l.contiguous_offsets() {
        Some((a, b)) => &all[a..b],
        None => candle_core::bail!("fused token_nll: non-contiguous targets"),
    };
    if let Some(bad) = t.iter().find(|&&t| t as usize >= v) {
        candle_core::bail!("token_nll: target id {bad} is outside the vocabulary ({v})");
    }
    Ok(t)
}

/// Max and log-sum-exp of one row.
fn lse(x: &[f32]) -> (f32, f32) {
    let max = x.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    let sum: f64 = x.iter().map(|v| (v - max).exp() as f64).sum();
    (max, sum.ln() as f32)
}

impl CpuKernel<2> for TokenNll {
    const NAME: &'static str = "fused-token-nll";

    fn forward(&self, [(xs, xl), (ts, tl)]: [Operand<'_>; 2]) -> Result<(CpuStorage, Shape)> {
        let x = data(xs, xl, Self::NAME)?;
        let (m, v) = last_dim(xl)?;
        let t = targets_of(ts, tl, v)?;
        let out = fill(m, 1, m * v, |i, y| {
            let x = &x[i * v..(i + 1) * v];
            let (max, lse) = lse(x);
            y[0] = -((x[t[i] as usize] - max) - lse);
        })?;
        Ok((CpuStorage::F32(out), Shape::from(m)))
    }

    fn backward(
        &self,
        [x, t]: [&Tensor; 2],
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<[Option<Tensor>; 2]> {
        let dx = x.apply_op3_no_bwd(t, &dy.contiguous()?, &Fused(TokenNllBwd))?;
        Ok([Some(dx), None])
    }
}

struct TokenNllBwd;

/// No backward of its own (the default): it is the backward.
impl CpuKernel<3> for TokenNllBwd {
    const NAME: &'static str = "fused-token-nll-bwd";

    fn forward(
        &self,
        [(xs, xl), (ts, tl), (gs, gl)]: [Operand<'_>; 3],
    ) -> Result<(CpuStorage, Shape)> {
        let [x, g] = operands(Self::NAME, [(xs, xl), (gs, gl)])?;
        let (m, v) = last_dim(xl)?;
        let t = targets_of(ts, tl, v)?;
        check_len(Self::NAME, g.len(), m)?;
        let out = rows(m, v, |i, dx| {
            let x = &x[i * v..(i + 1) * v];
            let (max, lse) = lse(x);
            for (dx, &x) in dx.iter_mut().zip(x) {
                *dx = g[i] * (x - max - lse).exp();
            }
            dx[t[i] as usize] -= g[i];
        })?;
        Ok(f32_out(out, xl))
    }
}
