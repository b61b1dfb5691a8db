//! Fused CPU kernels, with their backward, for the element-wise and row-wise parts of a
//! training step.
//!
//! Composed of candle primitives (see [`super::ops`]), an RMSNorm is six tensor ops forward
//! and about twenty backward, each allocating a full-size buffer; candle's backward also
//! computes the gradients of constant operands (the norm weight, the attention mask, the
//! rotary tables) and seeds every gradient with a zero tensor. In a prompt-tuning step on a
//! CPU that bookkeeping costs more than the frozen matmuls' share would suggest. Each op here
//! is one pass over contiguous f32 rows forward and one pass backward, and returns gradients
//! only for the operands that can need them.
//!
//! Every op is a candle `CustomOp` with a backward, so gradients flow exactly as through the
//! composite ops (candle's own fused kernels have no backward). They run on the CPU in f32
//! only; [`super::ops`] checks [`usable`] and falls back to the composite ops otherwise (other
//! devices, other dtypes, or a frozen operand that is actually trained).
//!
//! Work is split over rows on candle's own thread pool, the one its element-wise ops use.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor};
use std::sync::atomic::{AtomicBool, Ordering};

type Result<T> = candle_core::Result<T>;

static ENABLED: AtomicBool = AtomicBool::new(true);
static FROM_ENV: std::sync::Once = std::sync::Once::new();

/// Turns the fused kernels on (the default) or off for the whole process. Off, [`super::ops`]
/// uses the composite ops; results agree to rounding. For benchmarks and debugging; the
/// environment variable `SOFTPROMPT_FUSED=0` turns them off at start-up.
pub fn set_enabled(on: bool) {
    FROM_ENV.call_once(|| ());
    ENABLED.store(on, Ordering::Relaxed);
}

/// Whether the fused kernels are on (see [`set_enabled`]).
pub fn enabled() -> bool {
    FROM_ENV.call_once(|| {
        if std::env::var("SOFTPROMPT_FUSED").is_ok_and(|v| v == "0") {
            ENABLED.store(false, Ordering::Relaxed);
        }
    });
    ENABLED.load(Ordering::Relaxed)
}

/// Whether the fused kernels can take these tensors: enabled, all on the CPU, all f32.
pub fn usable(ts: &[&Tensor]) -> bool {
    enabled()
        && ts
            .iter()
            .all(|t| t.device().is_cpu() && t.dtype() == DType::F32)
}

// ---------------------------------------------------------------------------------------------
// Helpers

/// Below this many elements an op runs on the calling thread.
const PAR_MIN: usize = 16 * 1024;

/// The contiguous f32 data of a CPU operand.
fn data<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> Result<&'a [f32]> {
    let all = s.as_slice::<f32>()?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&all[a..b]),
        None => candle_core::bail!("{op}: expected a contiguous input"),
    }
}

#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: every chunk of the output is written by exactly one task (see `fill`).
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}
impl OutPtr {
    /// `len` floats from `start`.
    #[allow(clippy::mut_from_ref)]
    unsafe fn slice(&self, start: usize, len: usize) -> &mut [f32] {
        std::slice::from_raw_parts_mut(self.0.add(start), len)
    }
}

/// Builds `total` floats in chunks of `chunk` (the last one may be shorter), the chunk
/// starting at `s` written by `f(s, chunk)`; in parallel on candle's pool when `work` (elements
/// touched) is large.
fn fill(total: usize, chunk: usize, work: usize, f: impl Fn(usize, &mut [f32]) + Sync) -> Vec<f32> {
    let mut out: Vec<f32> = Vec::with_capacity(total);
    let ptr = OutPtr(out.as_mut_ptr());
    let n = total.div_ceil(chunk.max(1));
    let run = |c: usize| {
        let start = c * chunk;
        // SAFETY: chunks are disjoint and `f` writes every element of its chunk.
        f(start, unsafe { ptr.slice(start, chunk.min(total - start)) })
    };
    if work >= PAR_MIN && n > 1 {
        candle_core::utils::barrier_pool().execute_chunked(n, |range| range.for_each(&run));
    } else {
        (0..n).for_each(&run);
    }
    // SAFETY: every element was written above.
    unsafe { out.set_len(total) };
    out
}

/// `n` rows of `len` floats, row `i` written by `f(i, row)`.
fn rows(n: usize, len: usize, f: impl Fn(usize, &mut [f32]) + Sync) -> Vec<f32> {
    fill(n * len, len, n * len, |s, row| f(s / len, row))
}

/// `n` floats written in chunks by `f(start, chunk)`.
fn map_flat(n: usize, f: impl Fn(usize, &mut [f32]) + Sync) -> Vec<f32> {
    fill(n, 4096, n, f)
}

fn last_dim(l: &Layout) -> Result<(usize, usize)> {
    let dims = l.dims();
    match dims.last() {
        Some(&d) if d > 0 => Ok((l.shape().elem_count() / d, d)),
        _ => candle_core::bail!("fused op: empty last dimension in {dims:?}"),
    }
}

fn f32_out(v: Vec<f32>, l: &Layout) -> (CpuStorage, Shape) {
    (CpuStorage::F32(v), l.shape().clone())
}

fn check_len(what: &str, got: usize, want: usize) -> Result<()> {
    if got != want {
        candle_core::bail!("{what}: expected {want} elements, got {got}");
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// RMSNorm

/// `x * rsqrt(mean(x^2) + eps) * w` over the last dimension; `x [.., D]`, `w [D]`.
/// Differentiable with respect to `x` only (`w` is frozen).
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    x.contiguous()?
        .apply_op2(&w.contiguous()?, RmsNorm { eps: eps as f32 })
}

struct RmsNorm {
    eps: f32,
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "fused-rms-norm"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, w) = (data(xs, xl, self.name())?, data(ws, wl, self.name())?);
        let (n, d) = last_dim(xl)?;
        check_len("rms-norm weight", w.len(), d)?;
        let out = rows(n, d, |i, y| {
            rms_norm_row(&x[i * d..(i + 1) * d], w, self.eps, y)
        });
        Ok(f32_out(out, xl))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dx = x.apply_op3_no_bwd(w, &dy.contiguous()?, &RmsNormBwd { eps: self.eps })?;
        Ok((Some(dx), None))
    }
}

/// `dx = r * g*w - x * r^3 * mean(g*w*x)` with `r = rsqrt(mean(x^2) + eps)`.
struct RmsNormBwd {
    eps: f32,
}

impl CustomOp3 for RmsNormBwd {
    fn name(&self) -> &'static str {
        "fused-rms-norm-bwd"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let name = self.name();
        let (x, w, g) = (
            data(xs, xl, name)?,
            data(ws, wl, name)?,
            data(gs, gl, name)?,
        );
        let (n, d) = last_dim(xl)?;
        check_len(name, g.len(), x.len())?;
        let out = rows(n, d, |i, dx| {
            let (x, g) = (&x[i * d..(i + 1) * d], &g[i * d..(i + 1) * d]);
            rms_norm_bwd_row(x, w, g, self.eps, dx);
        });
        Ok(f32_out(out, xl))
    }
}

/// `rsqrt(mean(x^2) + eps)` of one row (sum in f64).
fn rms_rsqrt(x: &[f32], eps: f32) -> f32 {
    let ms = x.iter().map(|&v| (v * v) as f64).sum::<f64>() / x.len() as f64;
    1.0 / (ms as f32 + eps).sqrt()
}

/// One row of RMSNorm: `y = x * rsqrt(mean(x^2) + eps) * w`.
pub(super) fn rms_norm_row(x: &[f32], w: &[f32], eps: f32, y: &mut [f32]) {
    let r = rms_rsqrt(x, eps);
    for ((y, &x), &w) in y.iter_mut().zip(x).zip(w) {
        *y = x * r * w;
    }
}

/// One row of RMSNorm's input gradient for the output gradient `g`.
pub(super) fn rms_norm_bwd_row(x: &[f32], w: &[f32], g: &[f32], eps: f32, dx: &mut [f32]) {
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

// ---------------------------------------------------------------------------------------------
// LayerNorm

/// `(x - mean) * rsqrt(var + eps) * w + b` over the last dimension; `x [.., D]`, `w`, `b [D]`.
/// Differentiable with respect to `x` only (`w`, `b` are frozen).
pub fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    x.contiguous()?.apply_op3(
        &w.contiguous()?,
        &b.contiguous()?,
        LayerNorm { eps: eps as f32 },
    )
}

struct LayerNorm {
    eps: f32,
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

impl CustomOp3 for LayerNorm {
    fn name(&self) -> &'static str {
        "fused-layer-norm"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let name = self.name();
        let (x, w, b) = (
            data(xs, xl, name)?,
            data(ws, wl, name)?,
            data(bs, bl, name)?,
        );
        let (n, d) = last_dim(xl)?;
        check_len("layer-norm weight", w.len(), d)?;
        check_len("layer-norm bias", b.len(), d)?;
        let out = rows(n, d, |i, y| {
            layer_norm_row(&x[i * d..(i + 1) * d], w, b, self.eps, y)
        });
        Ok(f32_out(out, xl))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dx = x.apply_op3_no_bwd(w, &dy.contiguous()?, &LayerNormBwd { eps: self.eps })?;
        Ok((Some(dx), None, None))
    }
}

/// `dx = r * (gw - mean(gw) - xhat * mean(gw * xhat))`, `gw = g*w`, `xhat = (x - mean) * r`.
struct LayerNormBwd {
    eps: f32,
}

impl CustomOp3 for LayerNormBwd {
    fn name(&self) -> &'static str {
        "fused-layer-norm-bwd"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let name = self.name();
        let (x, w, g) = (
            data(xs, xl, name)?,
            data(ws, wl, name)?,
            data(gs, gl, name)?,
        );
        let (n, d) = last_dim(xl)?;
        check_len(name, g.len(), x.len())?;
        let out = rows(n, d, |i, dx| {
            let (x, g) = (&x[i * d..(i + 1) * d], &g[i * d..(i + 1) * d]);
            layer_norm_bwd_row(x, w, g, self.eps, dx);
        });
        Ok(f32_out(out, xl))
    }
}

/// One row of LayerNorm: `y = (x - mean) * rsqrt(var + eps) * w + b`.
pub(super) fn layer_norm_row(x: &[f32], w: &[f32], b: &[f32], eps: f32, y: &mut [f32]) {
    let (mean, r) = moments(x, eps);
    for (((y, &x), &w), &b) in y.iter_mut().zip(x).zip(w).zip(b) {
        *y = (x - mean) * r * w + b;
    }
}

/// One row of LayerNorm's input gradient for the output gradient `g`.
pub(super) fn layer_norm_bwd_row(x: &[f32], w: &[f32], g: &[f32], eps: f32, dx: &mut [f32]) {
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

// ---------------------------------------------------------------------------------------------
// Softmax with scale and additive bias

/// `softmax(x * scale + bias)` over the last dimension. `bias` broadcasts to `x`'s shape (the
/// attention mask `[B, 1, T, K]`, T5's position bias `[B, H, T, K]`) and gets no gradient.
pub fn softmax_scaled(x: &Tensor, bias: Option<&Tensor>, scale: f64) -> Result<Tensor> {
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
        Softmax {
            scale: scale as f32,
        },
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

impl CustomOp2 for Softmax {
    fn name(&self) -> &'static str {
        "fused-softmax"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = data(xs, xl, self.name())?;
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
        });
        Ok(f32_out(out, xl))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        _bias: &Tensor,
        y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dx = y.apply_op2_no_bwd(&dy.contiguous()?, &SoftmaxBwd { scale: self.scale })?;
        Ok((Some(dx), None))
    }
}

/// Softmax of one row in place (the sum in f64).
pub(super) fn softmax_row(y: &mut [f32]) {
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
pub(super) fn softmax_bwd_row(y: &[f32], g: &mut [f32], scale: f32) {
    let dot = y
        .iter()
        .zip(g.iter())
        .map(|(y, g)| (y * g) as f64)
        .sum::<f64>() as f32;
    for (g, &y) in g.iter_mut().zip(y) {
        *g = scale * y * (*g - dot);
    }
}

/// `dx = scale * y * (g - sum(g * y))`.
struct SoftmaxBwd {
    scale: f32,
}

impl CustomOp2 for SoftmaxBwd {
    fn name(&self) -> &'static str {
        "fused-softmax-bwd"
    }

    fn cpu_fwd(
        &self,
        ys: &CpuStorage,
        yl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (y, g) = (data(ys, yl, self.name())?, data(gs, gl, self.name())?);
        let (n, k) = last_dim(yl)?;
        check_len(self.name(), g.len(), y.len())?;
        let out = rows(n, k, |i, dx| {
            dx.copy_from_slice(&g[i * k..(i + 1) * k]);
            softmax_bwd_row(&y[i * k..(i + 1) * k], dx, self.scale);
        });
        Ok(f32_out(out, yl))
    }
}

// ---------------------------------------------------------------------------------------------
// Rotary embeddings

/// Rotary embeddings on `x [B, H, T, Dh]` with tables `cos`, `sin` `[T, Dh/2]` (no gradient).
/// `interleaved` as in [`super::ops::rope`]. The backward is the inverse rotation.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor, interleaved: bool) -> Result<Tensor> {
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
        Rope {
            interleaved,
            inverse: false,
        },
    )
}

struct Rope {
    interleaved: bool,
    /// Rotates by `-angle` (the backward).
    inverse: bool,
}

impl CustomOp3 for Rope {
    fn name(&self) -> &'static str {
        "fused-rope"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        cs: &CpuStorage,
        cl: &Layout,
        ss: &CpuStorage,
        sl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let name = self.name();
        let (x, cos, sin) = (
            data(xs, xl, name)?,
            data(cs, cl, name)?,
            data(ss, sl, name)?,
        );
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
        });
        Ok(f32_out(out, xl))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let inverse = Rope {
            interleaved: self.interleaved,
            inverse: !self.inverse,
        };
        let dx = dy.contiguous()?.apply_op3_no_bwd(cos, sin, &inverse)?;
        Ok((Some(dx), None, None))
    }
}

/// Rotates one head row `x [Dh]` in place by the angles of `cos`, `sin` `[Dh/2]` (by minus
/// the angles when `inverse`); pairs `(j, j + Dh/2)`, or `(2j, 2j+1)` when `interleaved`.
pub(super) fn rope_row(x: &mut [f32], cos: &[f32], sin: &[f32], interleaved: bool, inverse: bool) {
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

// ---------------------------------------------------------------------------------------------
// Activations, plain and gated

/// Element-wise activations with a fused backward.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Act {
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
pub(super) fn exp(x: f32) -> f32 {
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
    pub(super) fn f(self, x: f32) -> f32 {
        match self {
            Act::Relu => x.max(0.0),
            Act::Silu => x / (1.0 + exp(-x)),
            Act::GeluTanh => 0.5 * x * (1.0 + tanh(SQRT_2_OVER_PI * x * (1.0 + GELU_C * x * x))),
        }
    }

    /// The value and the derivative at `x`.
    #[inline(always)]
    pub(super) fn f_df(self, x: f32) -> (f32, f32) {
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
pub fn act(x: &Tensor, act: Act) -> Result<Tensor> {
    x.contiguous()?.apply_op1(Unary { act })
}

/// `act(a) * b`, element-wise (SwiGLU's `silu(gate) * up`, T5 v1.1's gated GELU).
pub fn act_mul(a: &Tensor, b: &Tensor, act: Act) -> Result<Tensor> {
    if a.dims() != b.dims() {
        candle_core::bail!("fused act_mul: shapes {:?} and {:?}", a.dims(), b.dims());
    }
    a.contiguous()?.apply_op2(&b.contiguous()?, Gated { act })
}

struct Unary {
    act: Act,
}

impl CustomOp1 for Unary {
    fn name(&self) -> &'static str {
        "fused-act"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = data(xs, xl, self.name())?;
        let out = map_flat(x.len(), |o, y| {
            for (y, &x) in y.iter_mut().zip(&x[o..]) {
                *y = self.act.f(x);
            }
        });
        Ok(f32_out(out, xl))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        let dx = x.apply_op2_no_bwd(&dy.contiguous()?, &UnaryBwd { act: self.act })?;
        Ok(Some(dx))
    }
}

/// `dx = g * act'(x)`.
struct UnaryBwd {
    act: Act,
}

impl CustomOp2 for UnaryBwd {
    fn name(&self) -> &'static str {
        "fused-act-bwd"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, g) = (data(xs, xl, self.name())?, data(gs, gl, self.name())?);
        check_len(self.name(), g.len(), x.len())?;
        let out = map_flat(x.len(), |o, dx| {
            for ((dx, &x), &g) in dx.iter_mut().zip(&x[o..]).zip(&g[o..]) {
                *dx = g * self.act.f_df(x).1;
            }
        });
        Ok(f32_out(out, xl))
    }
}

struct Gated {
    act: Act,
}

impl CustomOp2 for Gated {
    fn name(&self) -> &'static str {
        "fused-act-mul"
    }

    fn cpu_fwd(
        &self,
        as_: &CpuStorage,
        al: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (a, b) = (data(as_, al, self.name())?, data(bs, bl, self.name())?);
        check_len(self.name(), b.len(), a.len())?;
        let out = map_flat(a.len(), |o, y| {
            for ((y, &a), &b) in y.iter_mut().zip(&a[o..]).zip(&b[o..]) {
                *y = self.act.f(a) * b;
            }
        });
        Ok(f32_out(out, al))
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dy = dy.contiguous()?;
        let da = a.apply_op3_no_bwd(
            b,
            &dy,
            &GatedBwd {
                act: self.act,
                wrt_a: true,
            },
        )?;
        let db = a.apply_op3_no_bwd(
            b,
            &dy,
            &GatedBwd {
                act: self.act,
                wrt_a: false,
            },
        )?;
        Ok((Some(da), Some(db)))
    }
}

/// `da = g * b * act'(a)` or `db = g * act(a)`.
struct GatedBwd {
    act: Act,
    wrt_a: bool,
}

impl CustomOp3 for GatedBwd {
    fn name(&self) -> &'static str {
        "fused-act-mul-bwd"
    }

    fn cpu_fwd(
        &self,
        as_: &CpuStorage,
        al: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let name = self.name();
        let (a, b, g) = (
            data(as_, al, name)?,
            data(bs, bl, name)?,
            data(gs, gl, name)?,
        );
        check_len(name, b.len(), a.len())?;
        check_len(name, g.len(), a.len())?;
        let out = map_flat(a.len(), |o, dx| {
            let it = dx.iter_mut().zip(&a[o..]).zip(&b[o..]).zip(&g[o..]);
            if self.wrt_a {
                for (((dx, &a), &b), &g) in it {
                    *dx = g * b * self.act.f_df(a).1;
                }
            } else {
                for (((dx, &a), _), &g) in it {
                    *dx = g * self.act.f(a);
                }
            }
        });
        Ok(f32_out(out, al))
    }
}

// ---------------------------------------------------------------------------------------------
// Token negative log-likelihood

/// `-log_softmax(logits)[i, targets[i]]`: `logits [M, V]` (f32), `targets [M]` (u32) -> `[M]`.
/// The backward is `g * (softmax(logits) - onehot(target))`.
pub fn token_nll(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
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
        .apply_op2(&targets.contiguous()?, TokenNll)
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

impl CustomOp2 for TokenNll {
    fn name(&self) -> &'static str {
        "fused-token-nll"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ts: &CpuStorage,
        tl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = data(xs, xl, self.name())?;
        let (m, v) = last_dim(xl)?;
        let t = targets_of(ts, tl, v)?;
        let out = fill(m, 1, m * v, |i, y| {
            let x = &x[i * v..(i + 1) * v];
            let (max, lse) = lse(x);
            y[0] = -((x[t[i] as usize] - max) - lse);
        });
        Ok((CpuStorage::F32(out), Shape::from(m)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        t: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dx = x.apply_op3_no_bwd(t, &dy.contiguous()?, &TokenNllBwd)?;
        Ok((Some(dx), None))
    }
}

struct TokenNllBwd;

impl CustomOp3 for TokenNllBwd {
    fn name(&self) -> &'static str {
        "fused-token-nll-bwd"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ts: &CpuStorage,
        tl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, g) = (data(xs, xl, self.name())?, data(gs, gl, self.name())?);
        let (m, v) = last_dim(xl)?;
        let t = targets_of(ts, tl, v)?;
        check_len(self.name(), g.len(), m)?;
        let out = rows(m, v, |i, dx| {
            let x = &x[i * v..(i + 1) * v];
            let (max, lse) = lse(x);
            for (dx, &x) in dx.iter_mut().zip(x) {
                *dx = g[i] * (x - max - lse).exp();
            }
            dx[t[i] as usize] -= g[i];
        });
        Ok(f32_out(out, xl))
    }
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
