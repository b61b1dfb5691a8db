//! Element-wise activations, plain and gated, with their backward; the polynomial `exp`
//! the softmax shares.

use super::cpu::{backward, check_len, data, f32_out, map_flat, operands, Result};
use super::op::{CpuKernel, Fused, Operand};
use candle_core::{CpuStorage, Shape, Tensor};

/// Element-wise activations with a fused backward.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Act {
    /// `x * sigmoid(x)`
    Silu,
    /// The tanh approximation of GELU (`gelu_new`, candle's `gelu`).
    GeluTanh,
    /// `max(x, 0)`; the derivative at 0 is taken as 1, as candle does.
    Relu,
}

const SQRT_2_OVER_PI: f32 = 0.797_884_6;

/// `tanh(u) = 1 - 2 / (exp(2u) + 1)`: one `exp` instead of libm's `tanhf` (an `expm1f`
/// and more), which took 15% of a GPT-2 step. Saturates to +-1 correctly; the absolute error
/// is a few f32 ulps of 1, which is what GELU's `1 + tanh(.)` can resolve anyway.
#[inline(always)]
fn tanh(u: f32) -> f32 {
    1.0 - 2.0 / (exp(2.0 * u) + 1.0)
}

/// `exp(x)` without a libm call, so that loops over it can vectorise (the exponentials of the
/// softmax, SiLU and GELU were ~8% of a SmolLM2 step through `expf`): `x = n ln2 + r` with
/// `ln2` split in two (Cody-Waite), Cephes' degree-6 polynomial for `exp(r)` on
/// `|r| <= ln2/2`, `2^n` written into the exponent bits. Within a few ulp of `f32::exp` on
/// `[-87.3, 88.3]`; 0 below (where f32's normal range ends; masked scores), `exp(88.3)` above.
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // 1.5 * 2^23: adding and subtracting it rounds to the nearest integer.
    const ROUND: f32 = 12_582_912.0;
    let xc = x.clamp(-87.3, 88.3);
    let n = (xc * std::f32::consts::LOG2_E + ROUND) - ROUND;
    let r = xc - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 0.166_666_65;
    p = p * r + 0.5;
    let y = p * r * r + r + 1.0;
    let two_n = f32::from_bits(((n as i32 + 127) as u32) << 23);
    if x < -87.3 {
        0.0
    } else {
        y * two_n
    }
}
const GELU_C: f32 = 0.044_715;

impl Act {
    #[inline(always)]
    pub(crate) fn f(self, x: f32) -> f32 {
        match self {
            Act::Relu => x.max(0.0),
            Act::Silu => x / (1.0 + exp(-x)),
            Act::GeluTanh => 0.5 * x * (1.0 + tanh(SQRT_2_OVER_PI * x * (1.0 + GELU_C * x * x))),
        }
    }

    /// The value and the derivative at `x`.
    #[inline(always)]
    pub(crate) fn f_df(self, x: f32) -> (f32, f32) {
        match self {
            Act::Relu => (x.max(0.0), if x >= 0.0 { 1.0 } else { 0.0 }),
            Act::Silu => {
                let s = 1.0 / (1.0 + exp(-x));
                (x * s, s * (1.0 + x * (1.0 - s)))
            }
            Act::GeluTanh => {
                let t = tanh(SQRT_2_OVER_PI * x * (1.0 + GELU_C * x * x));
                let du = SQRT_2_OVER_PI * (1.0 + 3.0 * GELU_C * x * x);
                (
                    0.5 * x * (1.0 + t),
                    0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * du,
                )
            }
        }
    }
}

/// `act(x)`, element-wise.
pub(crate) fn act(x: &Tensor, act: Act) -> Result<Tensor> {
    x.contiguous()?.apply_op1(Fused(Unary { act }))
}

/// `act(a) * b`, element-wise (SwiGLU's `silu(gate) * up`, T5 v1.1's gated GELU).
pub(crate) fn act_mul(a: &Tensor, b: &Tensor, act: Act) -> Result<Tensor> {
    if a.dims() != b.dims() {
        candle_core::bail!("fused act_mul: shapes {:?} and {:?}", a.dims(), b.dims());
    }
    a.contiguous()?
        .apply_op2(&b.contiguous()?, Fused(Gated { act }))
}

struct Unary {
    act: Act,
}

impl CpuKernel<1> for Unary {
    const NAME: &'static str = "fused-act";

    fn forward(&self, [(xs, xl)]: [Operand<'_>; 1]) -> Result<(CpuStorage, Shape)> {
        let x = data(xs, xl, Self::NAME)?;
        let out = map_flat(x.len(), |o, y| {
            for (y, &x) in y.iter_mut().zip(&x[o..]) {
                *y = self.act.f(x);
            }
        })?;
        Ok(f32_out(out, xl))
    }

    fn backward(&self, [x]: [&Tensor; 1], _y: &Tensor, dy: &Tensor) -> Result<[Option<Tensor>; 1]> {
        // dx = g * act'(x)
        let dx = backward("act backward", [x, dy], |[x, g]| {
            zip_map("act backward", x, g, |x, g| g * self.act.f_df(x).1)
        })?;
        Ok([Some(dx)])
    }
}

struct Gated {
    act: Act,
}

impl CpuKernel<2> for Gated {
    const NAME: &'static str = "fused-act-mul";

    fn forward(&self, [(as_, al), (bs, bl)]: [Operand<'_>; 2]) -> Result<(CpuStorage, Shape)> {
        let [a, b] = operands(Self::NAME, [(as_, al), (bs, bl)])?;
        let out = zip_map(Self::NAME, a, b, |a, b| self.act.f(a) * b)?;
        Ok(f32_out(out, al))
    }

    fn backward(
        &self,
        [a, b]: [&Tensor; 2],
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<[Option<Tensor>; 2]> {
        // da = g * b * act'(a), db = g * act(a)
        let act = self.act;
        let da = backward("act-mul backward", [a, b, dy], |[a, b, g]| {
            check_len("act-mul backward", g.len(), a.len())?;
            zip_map("act-mul backward", a, b, |a, b| b * act.f_df(a).1).map(|mut da| {
                da.iter_mut().zip(g).for_each(|(d, g)| *d *= g);
                da
            })
        })?;
        let db = backward("act-mul backward", [a, dy], |[a, g]| {
            zip_map("act-mul backward", a, g, |a, g| g * act.f(a))
        })?;
        Ok([Some(da), Some(db)])
    }
}

/// `f(a[i], b[i])` for every `i`, in parallel chunks; `a` and `b` of one length.
fn zip_map(op: &str, a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f32 + Sync) -> Result<Vec<f32>> {
    check_len(op, b.len(), a.len())?;
    map_flat(a.len(), |o, y| {
        for ((y, &a), &b) in y.iter_mut().zip(&a[o..]).zip(&b[o..]) {
            *y = f(a, b);
        }
    })
}

#[cfg(test)]
mod tests {
    /// The polynomial `exp` against libm's over the range the kernels use, the cut-offs and NaN.
    #[test]
    fn exp_matches_libm() {
        let mut worst = 0f32;
        for i in -873_000..=883_000 {
            let x = i as f32 * 1e-4;
            let (got, want) = (super::exp(x), x.exp());
            worst = worst.max(((got - want) / want).abs());
        }
        assert!(worst < 5e-7, "max relative error {worst}");
        assert_eq!(super::exp(-88.0), 0.0);
        assert_eq!(super::exp(-1e30), 0.0);
        assert!(super::exp(1e30).is_finite());
        assert!(super::exp(f32::NAN).is_nan());
        assert_eq!(super::exp(0.0), 1.0);
    }
}
