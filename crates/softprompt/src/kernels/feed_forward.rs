//! The feed-forward sub-block of a pre-norm layer as one op with a hand-written backward:
//! `x + down(inner(norm(x)))`, `inner` gated (`act(gate(n)) * up(n)`) or plain (`act(w(n))`);
//! or the branch alone, `down(inner(norm(x)))`, for a layer that norms it before the residual
//! add (Gemma).
//! It keeps only the input of the activation for its backward and recomputes the norm.

use super::activation::Act;
use super::cpu::{data, poisoned, ReadLock, Result, CHUNK};
use super::gemm::{add_product_t, bias_rows, input_grad, project, residual, ProjWeights};
use super::norm::NormWeights;
use super::Kernels;
use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};
use rayon::prelude::*;
use std::sync::Mutex;

/// The first half of a feed-forward block: `F` rows of `[F, D]` projections.
#[derive(Clone, Debug)]
pub(crate) enum FfnInner {
    /// `act(gate(n)) * up(n)` (SwiGLU, T5 v1.1's gated GELU).
    Gated { gate: ProjWeights, up: ProjWeights },
    /// `act(w(n))` (GPT-2, T5 v1.0).
    Plain(ProjWeights),
}

/// The operands of the feed-forward op: `x [B, T, D]`, `down [D, F]`.
#[derive(Clone, Debug)]
pub(crate) struct FeedForwardArgs {
    pub norm: NormWeights,
    pub inner: FfnInner,
    pub down: ProjWeights,
    pub act: Act,
    /// `x +` the branch; `false`: the branch alone.
    pub residual: bool,
}

impl FeedForwardArgs {
    /// Whether the op runs on `x` under the policy `kernels` (see [`Kernels::blocks_apply`]).
    pub(crate) fn applies(&self, x: &Tensor, kernels: Kernels) -> bool {
        let mut frozen = Vec::new();
        self.norm.tensors(&mut frozen);
        self.down.tensors(&mut frozen);
        match &self.inner {
            FfnInner::Gated { gate, up } => {
                gate.tensors(&mut frozen);
                up.tensors(&mut frozen);
            }
            FfnInner::Plain(w) => w.tensors(&mut frozen),
        }
        kernels.blocks_apply(x, &frozen)
    }
}

/// The sub-block; differentiable with respect to `x`. The caller checks
/// [`FeedForwardArgs::applies`]; errors on inconsistent shapes.
pub(crate) fn feed_forward_block(x: &Tensor, args: FeedForwardArgs) -> Result<Tensor> {
    let (b, t, d) = x.dims3()?;
    args.norm.check(d)?;
    let (f, d2) = match &args.inner {
        FfnInner::Gated { gate, up } => {
            let g = gate.dims("gate")?;
            if up.dims("up")? != g {
                candle_core::bail!(
                    "feed-forward block: gate {g:?} and up {:?} differ",
                    up.w.dims2()?
                );
            }
            g
        }
        FfnInner::Plain(w) => w.dims("ffn in")?,
    };
    if d2 != d || args.down.dims("down")? != (d, f) {
        candle_core::bail!(
            "feed-forward block: input [{f}, {d2}] and down {:?} for D {d}",
            args.down.w.dims2()?
        );
    }
    let op = FeedForwardOp {
        args,
        rows: b * t,
        d,
        f,
        keep: x.track_op(),
        saved: Mutex::new(None),
    };
    x.contiguous()?.apply_op1(op)
}

/// What the feed-forward backward reads: the gate and up projections `[R, F]` (gated), or
/// the activation's input `[R, F]` (plain).
enum FfnSaved {
    Gated(Vec<f32>, Vec<f32>),
    Plain(Vec<f32>),
}

struct FeedForwardOp {
    args: FeedForwardArgs,
    rows: usize,
    d: usize,
    f: usize,
    keep: bool,
    saved: Mutex<Option<FfnSaved>>,
}

/// Calls `$f(args.., fd)` with `fd` the value and derivative of the activation `$act`, one
/// closure type per activation: each instantiation inlines a single activation (no `match`
/// per element), so that the element-wise loops vectorise.
macro_rules! with_act {
    ($act:expr, $f:ident($($arg:expr),*)) => {
        match $act {
            Act::Silu => $f($($arg,)* |x| Act::Silu.f_df(x)),
            Act::GeluTanh => $f($($arg,)* |x| Act::GeluTanh.f_df(x)),
            Act::Relu => $f($($arg,)* |x| Act::Relu.f_df(x)),
        }
    };
}

/// `act(g) * u` (`u` given: gated) or `act(g)`, element-wise.
fn act_fwd<F: Fn(f32) -> (f32, f32) + Sync>(g: &[f32], u: Option<&[f32]>, fd: F) -> Vec<f32> {
    let mut out = vec![0f32; g.len()];
    out.par_chunks_mut(CHUNK)
        .zip(g.par_chunks(CHUNK))
        .enumerate()
        .for_each(|(c, (o, g))| match u {
            Some(u) => {
                let u = &u[c * CHUNK..c * CHUNK + g.len()];
                for ((o, &g), &u) in o.iter_mut().zip(g).zip(u) {
                    *o = fd(g).0 * u;
                }
            }
            None => {
                for (o, &g) in o.iter_mut().zip(g) {
                    *o = fd(g).0;
                }
            }
        });
    out
}

/// The backward of [`act_fwd`], `ds` the gradient of its output: gated, `ds` becomes the
/// gradient of `g` and the gradient of `u` is returned; plain, `ds` becomes the gradient of
/// `g` and nothing is returned.
fn act_bwd<F: Fn(f32) -> (f32, f32) + Sync>(
    ds: &mut [f32],
    g: &[f32],
    u: Option<&[f32]>,
    fd: F,
) -> Option<Vec<f32>> {
    match u {
        Some(u) => {
            let mut du = vec![0f32; g.len()];
            ds.par_chunks_mut(CHUNK)
                .zip(du.par_chunks_mut(CHUNK))
                .zip(g.par_chunks(CHUNK).zip(u.par_chunks(CHUNK)))
                .for_each(|((ds, du), (g, u))| {
                    for (((s, du), &g), &u) in ds.iter_mut().zip(du).zip(g).zip(u) {
                        let (f, df) = fd(g);
                        *du = *s * f;
                        *s *= u * df;
                    }
                });
            Some(du)
        }
        None => {
            ds.par_chunks_mut(CHUNK)
                .zip(g.par_chunks(CHUNK))
                .for_each(|(ds, g)| {
                    for (s, &g) in ds.iter_mut().zip(g) {
                        *s *= fd(g).1;
                    }
                });
            None
        }
    }
}

impl CustomOp1 for FeedForwardOp {
    fn name(&self) -> &'static str {
        "fused-feed-forward-block"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = data(xs, xl, "feed-forward block")?;
        let (r, d, f, act) = (self.rows, self.d, self.f, self.args.act);
        let n = self.args.norm.lock().forward_rows(x, d)?; // [R, D]
        let (s, saved) = match &self.args.inner {
            FfnInner::Gated { gate, up } => {
                let g = project(&n, r, d, &gate.lock()?)?; // [R, F]
                let u = project(&n, r, d, &up.lock()?)?;
                let s = with_act!(act, act_fwd(&g, Some(&u)));
                (s, FfnSaved::Gated(g, u))
            }
            FfnInner::Plain(w) => {
                let a = project(&n, r, d, &w.lock()?)?; // [R, F]
                let s = with_act!(act, act_fwd(&a, None));
                (s, FfnSaved::Plain(a))
            }
        };
        drop(n);
        let down = self.args.down.lock()?;
        let mut y = match self.args.residual {
            true => residual(x, d, down.b()?),
            false => bias_rows(r, d, down.b()?),
        };
        add_product_t(&mut y, &s, down.w()?, true, (r, d, f))?;
        if self.keep {
            *self.saved.lock().map_err(|_| poisoned())? = Some(saved);
        }
        Ok((CpuStorage::F32(y), xl.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        let saved = self.saved.lock().map_err(|_| poisoned())?;
        let Some(saved) = saved.as_ref() else {
            candle_core::bail!("feed-forward block: backward without saved activations");
        };
        let (r, d, f, act) = (self.rows, self.d, self.f, self.args.act);
        let dy = dy.contiguous()?;
        let (x_lock, dy_lock) = (ReadLock::new(x), ReadLock::new(&dy));
        let (xd, dyd) = (x_lock.f32()?, dy_lock.f32()?);
        let mut ds = vec![0f32; r * f]; // ds = dy @ Wd   [R, F]
        input_grad(&mut ds, false, dyd, self.args.down.lock()?.w()?, (r, d, f))?;
        let mut dn = vec![0f32; r * d];
        match (&self.args.inner, saved) {
            (FfnInner::Gated { gate, up }, FfnSaved::Gated(g, u)) => {
                let du = with_act!(act, act_bwd(&mut ds, g, Some(u)))
                    .ok_or_else(|| candle_core::Error::Msg("gated backward without du".into()))?;
                input_grad(&mut dn, false, &ds, gate.lock()?.w()?, (r, f, d))?;
                input_grad(&mut dn, true, &du, up.lock()?.w()?, (r, f, d))?;
            }
            (FfnInner::Plain(w), FfnSaved::Plain(a)) => {
                with_act!(act, act_bwd(&mut ds, a, None));
                input_grad(&mut dn, false, &ds, w.lock()?.w()?, (r, f, d))?;
            }
            _ => candle_core::bail!("feed-forward block: saved activations of the wrong kind"),
        }
        drop(ds);
        let dy_residual = self.args.residual.then_some(dyd);
        let dx = self.args.norm.lock().backward_rows(xd, &dn, dy_residual, d)?;
        Ok(Some(Tensor::from_vec(dx, x.shape(), x.device())?))
    }
}
