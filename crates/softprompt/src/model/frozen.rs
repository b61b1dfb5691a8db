//! `x @ w^T` for a frozen weight `w`: the backward pass computes the input's gradient only.
//!
//! candle's `matmul` backward always computes the gradients of both operands. In prompt
//! tuning every weight is a frozen plain tensor and only the prompt needs a gradient, so every
//! linear layer would spend one extra matmul (and a weight-sized buffer) on a gradient nobody
//! reads. [`matmul_t`] runs the same candle matmul kernel forward (same result bit for bit)
//! and returns `dx = dy @ w` only.
//!
//! [`super::ops::linear`] picks it automatically (see [`applies`]); weights that are variables
//! (model tuning) or depend on one keep the plain matmul and get their gradients.
//!
//! The second half of the file goes one step further for the two residual sub-blocks of a
//! pre-norm transformer layer, `x + attention(norm(x))` ([`attention_block`]) and
//! `x + ffn(norm(x))` ([`feed_forward_block`]): each is one candle op whose backward is
//! written out by hand. Composed of single ops, candle's autograd graph keeps every
//! intermediate alive until the step ends (the norm output, the projections before and after
//! the head split and the rotation, the scores, the merged heads, the branch output before
//! the residual add, ...) and seeds and sums gradients with extra full-size buffers. The block
//! ops keep exactly what their backward reads (attention: the rotated queries and keys, the
//! values and the probabilities; feed-forward: the input of the activation), recompute the
//! norm, and call the sgemm kernel candle uses (the `gemm` crate) with strides that fold the
//! head split/merge, bias and residual into the products. [`super::ops`] uses them on the CPU
//! in f32 with frozen weights and falls back to the composite ops otherwise.

use super::fused::{self, Act};
use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CudaStorage, CustomOp1, CustomOp2, DType, Layout, MetalStorage, Shape, Storage,
    StorageRef, Tensor,
};
use gemm::Parallelism;
use rayon::prelude::*;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

static ENABLED: AtomicBool = AtomicBool::new(true);

/// Turns the frozen-weight path on (the default) or off for the whole process. Off, every
/// linear layer uses candle's plain matmul; results are the same, the backward is slower.
/// For benchmarks and debugging.
pub fn set_enabled(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

/// Whether the frozen-weight path is on (see [`set_enabled`]).
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

static BLOCKS: AtomicBool = AtomicBool::new(true);

/// Turns the fused sub-block ops ([`attention_block`], [`feed_forward_block`]) on (the
/// default) or off for the whole process. Off, [`super::ops`] composes the sub-blocks from
/// single ops (fused element-wise kernels and [`matmul_t`] where those are on). For
/// benchmarks and debugging.
pub fn set_blocks_enabled(on: bool) {
    BLOCKS.store(on, Ordering::Relaxed);
}

/// Whether the fused sub-block ops are on (see [`set_blocks_enabled`]).
pub fn blocks_enabled() -> bool {
    BLOCKS.load(Ordering::Relaxed)
}

/// Whether [`super::ops::linear`] uses [`matmul_t`] for `x [M, K]` and `w [N, K]`: the path is
/// enabled, `x` takes part in a gradient computation, `w` does not (neither a variable nor
/// computed from one), and the shapes and dtypes are ones the plain matmul accepts without
/// special cases. Inference (nothing tracks gradients) keeps the plain matmul.
pub fn applies(x: &Tensor, w: &Tensor) -> bool {
    let (Ok((m, k)), Ok((n, k2))) = (x.dims2(), w.dims2()) else {
        return false;
    };
    enabled()
        && x.track_op()
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
pub fn matmul_t(x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
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

impl CustomOp2 for FrozenMatmulT {
    fn name(&self) -> &'static str {
        "frozen-matmul-t"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_l: &Layout,
        w: &CpuStorage,
        w_l: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        fwd(x, x_l, w, w_l)
    }

    fn cuda_fwd(
        &self,
        x: &CudaStorage,
        x_l: &Layout,
        w: &CudaStorage,
        w_l: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        fwd(x, x_l, w, w_l)
    }

    fn metal_fwd(
        &self,
        x: &MetalStorage,
        x_l: &Layout,
        w: &MetalStorage,
        w_l: &Layout,
    ) -> candle_core::Result<(MetalStorage, Shape)> {
        fwd(x, x_l, w, w_l)
    }

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

// ---------------------------------------------------------------------------------------------
// Fused residual sub-blocks with frozen weights

type Result<T> = candle_core::Result<T>;

/// A frozen linear layer `y = x @ w^T + b`: `w [N, K]` (nn.Linear layout), `b [N]`.
#[derive(Clone, Copy, Debug)]
pub struct Linear<'a> {
    pub w: &'a Tensor,
    pub b: Option<&'a Tensor>,
}

/// The pre-norm of a sub-block (weights frozen).
#[derive(Clone, Copy, Debug)]
pub enum Norm<'a> {
    /// `x * rsqrt(mean(x^2) + eps) * w` (Llama, T5).
    Rms { w: &'a Tensor, eps: f64 },
    /// `(x - mean) * rsqrt(var + eps) * w + b` (GPT-2).
    Layer {
        w: &'a Tensor,
        b: &'a Tensor,
        eps: f64,
    },
}

/// Rotary tables `cos`, `sin` `[T, Dh/2]` for the positions of the block's input, and the
/// pair layout (see [`super::ops::rope`]).
#[derive(Clone, Copy, Debug)]
pub struct Rotary<'a> {
    pub cos: &'a Tensor,
    pub sin: &'a Tensor,
    pub interleaved: bool,
}

/// `x + o(attention(rope(q(n)), rope(k(n)), v(n)))` with `n = norm(x)`, `x [B, T, D]`.
/// `q [H*Dh, D]`, `k`, `v [H_kv*Dh, D]`, `o [D, H*Dh]`; `bias` (additive, no gradient)
/// `[B or 1, H or 1, T, T]`; `scale` multiplies the scores.
#[derive(Clone, Copy, Debug)]
pub struct SelfAttention<'a> {
    pub norm: Norm<'a>,
    pub q: Linear<'a>,
    pub k: Linear<'a>,
    pub v: Linear<'a>,
    pub o: Linear<'a>,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub rope: Option<Rotary<'a>>,
    pub bias: &'a Tensor,
    pub scale: f64,
}

/// Activation of a feed-forward block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FfnAct {
    Relu,
    Silu,
    /// tanh approximation (`gelu_new`)
    GeluTanh,
    /// exact erf GELU (composite ops only)
    GeluErf,
}

impl FfnAct {
    fn fused(self) -> Option<Act> {
        match self {
            FfnAct::Relu => Some(Act::Relu),
            FfnAct::Silu => Some(Act::Silu),
            FfnAct::GeluTanh => Some(Act::GeluTanh),
            FfnAct::GeluErf => None,
        }
    }
}

/// The first half of a feed-forward block.
#[derive(Clone, Copy, Debug)]
pub enum FfnIn<'a> {
    /// `act(gate(n)) * up(n)` (SwiGLU, T5 v1.1's gated GELU).
    Gated {
        gate: Linear<'a>,
        up: Linear<'a>,
        act: FfnAct,
    },
    /// `act(w(n))` (GPT-2, T5 v1.0).
    Plain { w: Linear<'a>, act: FfnAct },
}

/// `x + down(inner(norm(x)))`, `x [B, T, D]`, inner width `F`: `gate`/`up`/`w [F, D]`,
/// `down [D, F]`.
#[derive(Clone, Copy, Debug)]
pub struct FeedForward<'a> {
    pub norm: Norm<'a>,
    pub inner: FfnIn<'a>,
    pub down: Linear<'a>,
}

/// Whether the block ops can run on `x` with these frozen operands: the switches on
/// ([`blocks_enabled`], [`enabled`], [`fused::enabled`]), everything f32 on the CPU, the
/// operands contiguous and not tracked by autograd.
fn block_usable(x: &Tensor, frozen: &[&Tensor]) -> bool {
    blocks_enabled()
        && enabled()
        && fused::enabled()
        && x.device().is_cpu()
        && x.dtype() == DType::F32
        && frozen.iter().all(|t| {
            t.device().is_cpu() && t.dtype() == DType::F32 && !t.track_op() && t.is_contiguous()
        })
}

impl<'a> Linear<'a> {
    fn tensors(&self, out: &mut Vec<&'a Tensor>) {
        out.push(self.w);
        out.extend(self.b);
    }

    /// `(N, K)`, checking the bias length.
    fn dims(&self, what: &str) -> Result<(usize, usize)> {
        let (n, k) = self.w.dims2()?;
        if let Some(b) = self.b {
            if b.dims() != [n] {
                candle_core::bail!("{what}: bias {:?} for weight [{n}, {k}]", b.dims());
            }
        }
        Ok((n, k))
    }
}

impl<'a> Norm<'a> {
    fn tensors(&self, out: &mut Vec<&'a Tensor>) {
        match *self {
            Norm::Rms { w, .. } => out.push(w),
            Norm::Layer { w, b, .. } => out.extend([w, b]),
        }
    }

    fn check(&self, d: usize) -> Result<()> {
        let ok = match *self {
            Norm::Rms { w, .. } => w.dims() == [d],
            Norm::Layer { w, b, .. } => w.dims() == [d] && b.dims() == [d],
        };
        if !ok {
            candle_core::bail!("block norm: weights do not have width {d}");
        }
        Ok(())
    }
}

/// The fused attention sub-block, or `None` when [`block_usable`] says no (the caller then
/// runs the composite ops). Errors on inconsistent shapes.
///
/// With `rows` (u32 `[M]`, indices into the flattened `B*T` positions) the output is
/// `[1, M, D]`, the sub-block at those positions only: keys and values still come from every
/// position, but queries, attention and the output projection run at the `M` rows (the last
/// layer of a model whose logits are wanted at label positions only).
pub fn attention_block(
    x: &Tensor,
    s: &SelfAttention,
    rows: Option<&Tensor>,
) -> Result<Option<Tensor>> {
    match attention_op(x, s, rows, false)? {
        Some(op) => Ok(Some(x.contiguous()?.apply_op1(op)?)),
        None => Ok(None),
    }
}

/// [`attention_block`] for a forward pass that fills a KV cache (the prefill of generation):
/// `(y, k, v)` with the block output as [`attention_block`] gives it (`[B, T, D]`, or
/// `[1, M, D]` with `rows`) and the keys (rotated, when the block has rotary tables) and
/// values of every position, `[B, H_kv, T, Dh]`, as the cache path stores them. Forward only:
/// `None` when `x` takes part in a gradient computation, or where [`attention_block`] gives
/// `None` (the caller then runs the single ops).
pub fn attention_block_kv(
    x: &Tensor,
    s: &SelfAttention,
    rows: Option<&Tensor>,
) -> Result<Option<(Tensor, Tensor, Tensor)>> {
    if x.track_op() {
        return Ok(None);
    }
    let Some(op) = attention_op(x, s, rows, true)? else {
        return Ok(None);
    };
    let y = x.contiguous()?.apply_op1_no_bwd(&op)?;
    let Some((k, v)) = op.kv.lock().map_err(|_| poisoned())?.take() else {
        candle_core::bail!("attention block: the forward kept no keys and values");
    };
    let AttnShape { b, t, hkv, dh, .. } = op.shape;
    let k = Tensor::from_vec(k, (b, hkv, t, dh), x.device())?;
    let v = Tensor::from_vec(v, (b, hkv, t, dh), x.device())?;
    Ok(Some((y, k, v)))
}

/// The [`AttentionOp`] of [`attention_block`] (`emit_kv`: for [`attention_block_kv`]), or
/// `None` when [`block_usable`] says no. Errors on inconsistent shapes.
fn attention_op(
    x: &Tensor,
    s: &SelfAttention,
    rows: Option<&Tensor>,
    emit_kv: bool,
) -> Result<Option<AttentionOp>> {
    let mut frozen = Vec::new();
    s.norm.tensors(&mut frozen);
    for l in [&s.q, &s.k, &s.v, &s.o] {
        l.tensors(&mut frozen);
    }
    if let Some(r) = &s.rope {
        frozen.extend([r.cos, r.sin]);
    }
    frozen.push(s.bias);
    if !block_usable(x, &frozen) {
        return Ok(None);
    }
    let (b, t, d) = x.dims3()?;
    let (h, hkv, dh) = (s.heads, s.kv_heads, s.head_dim);
    let bad = |msg: String| -> Result<Option<AttentionOp>> {
        candle_core::bail!("attention block: {msg}")
    };
    if h == 0 || hkv == 0 || h % hkv != 0 || dh == 0 {
        return bad(format!("{h} heads, {hkv} kv heads, head dim {dh}"));
    }
    s.norm.check(d)?;
    let dims = [
        s.q.dims("q")?,
        s.k.dims("k")?,
        s.v.dims("v")?,
        s.o.dims("o")?,
    ];
    if dims != [(h * dh, d), (hkv * dh, d), (hkv * dh, d), (d, h * dh)] {
        return bad(format!(
            "projection shapes {dims:?} for D {d}, {h}/{hkv} heads of {dh}"
        ));
    }
    if let Some(r) = &s.rope {
        if dh % 2 != 0 || r.cos.dims() != [t, dh / 2] || r.sin.dims() != [t, dh / 2] {
            return bad(format!(
                "rotary tables {:?} for T {t}, head dim {dh}",
                r.cos.dims()
            ));
        }
    }
    let bd = s.bias.dims();
    if bd.len() != 4
        || !(bd[0] == 1 || bd[0] == b)
        || !(bd[1] == 1 || bd[1] == h)
        || bd[2..] != [t, t]
    {
        return bad(format!("bias {bd:?} for [{b}, {h}, {t}, {t}] scores"));
    }
    let rows = match rows {
        Some(r) => {
            let r: Vec<usize> = r
                .to_vec1::<u32>()?
                .into_iter()
                .map(|i| i as usize)
                .collect();
            if let Some(bad_row) = r.iter().find(|&&i| i >= b * t) {
                return bad(format!("row {bad_row} outside the {} positions", b * t));
            }
            Some(r)
        }
        None => None,
    };
    let op = AttentionOp {
        rows,
        norm: OwnedNorm::new(&s.norm),
        q: OwnedLinear::new(&s.q),
        k: OwnedLinear::new(&s.k),
        v: OwnedLinear::new(&s.v),
        o: OwnedLinear::new(&s.o),
        rope: s
            .rope
            .map(|r| (r.cos.clone(), r.sin.clone(), r.interleaved)),
        bias: s.bias.clone(),
        bias_dims: (bd[0], bd[1]),
        key_limits: key_limits(Held::new(s.bias).f32()?, bd[0] * bd[1], t),
        shape: AttnShape {
            b,
            t,
            d,
            h,
            hkv,
            dh,
        },
        scale: s.scale as f32,
        keep: x.track_op() && !emit_kv,
        saved: Mutex::new(None),
        emit_kv,
        kv: Mutex::new(None),
    };
    Ok(Some(op))
}

/// The fused feed-forward sub-block, or `None` when [`block_usable`] says no or the
/// activation has no fused kernel. Errors on inconsistent shapes.
pub fn feed_forward_block(x: &Tensor, s: &FeedForward) -> Result<Option<Tensor>> {
    let mut frozen = Vec::new();
    s.norm.tensors(&mut frozen);
    s.down.tensors(&mut frozen);
    let (inner, act) = match s.inner {
        FfnIn::Gated { gate, up, act } => {
            gate.tensors(&mut frozen);
            up.tensors(&mut frozen);
            (
                OwnedFfnIn::Gated(OwnedLinear::new(&gate), OwnedLinear::new(&up)),
                act,
            )
        }
        FfnIn::Plain { w, act } => {
            w.tensors(&mut frozen);
            (OwnedFfnIn::Plain(OwnedLinear::new(&w)), act)
        }
    };
    let Some(act) = act.fused() else {
        return Ok(None);
    };
    if !block_usable(x, &frozen) {
        return Ok(None);
    }
    let (b, t, d) = x.dims3()?;
    s.norm.check(d)?;
    let (f, d2) = match &s.inner {
        FfnIn::Gated { gate, up, .. } => {
            let g = gate.dims("gate")?;
            if up.dims("up")? != g {
                candle_core::bail!(
                    "feed-forward block: gate {g:?} and up {:?} differ",
                    up.w.dims()
                );
            }
            g
        }
        FfnIn::Plain { w, .. } => w.dims("ffn in")?,
    };
    if d2 != d || s.down.dims("down")? != (d, f) {
        candle_core::bail!(
            "feed-forward block: input [{f}, {d2}] and down {:?} for D {d}",
            s.down.w.dims()
        );
    }
    let op = FeedForwardOp {
        norm: OwnedNorm::new(&s.norm),
        inner,
        down: OwnedLinear::new(&s.down),
        act,
        rows: b * t,
        d,
        f,
        keep: x.track_op(),
        saved: Mutex::new(None),
    };
    Ok(Some(x.contiguous()?.apply_op1(op)?))
}

// --- Owned operands and read access to their data

struct OwnedLinear {
    w: Tensor,
    b: Option<Tensor>,
}

impl OwnedLinear {
    fn new(l: &Linear) -> Self {
        OwnedLinear {
            w: l.w.clone(),
            b: l.b.cloned(),
        }
    }
}

enum OwnedNorm {
    Rms { w: Tensor, eps: f32 },
    Layer { w: Tensor, b: Tensor, eps: f32 },
}

impl OwnedNorm {
    fn new(n: &Norm) -> Self {
        match *n {
            Norm::Rms { w, eps } => OwnedNorm::Rms {
                w: w.clone(),
                eps: eps as f32,
            },
            Norm::Layer { w, b, eps } => OwnedNorm::Layer {
                w: w.clone(),
                b: b.clone(),
                eps: eps as f32,
            },
        }
    }
}

/// A read lock on a tensor's storage; [`Held::f32`] gives its contiguous f32 data.
struct Held<'a>(StorageRef<'a>, &'a Layout);

impl<'a> Held<'a> {
    fn new(t: &'a Tensor) -> Self {
        let (s, l) = t.storage_and_layout();
        Held(s, l)
    }

    fn f32(&self) -> Result<&[f32]> {
        match &*self.0 {
            Storage::Cpu(c) => {
                let all = c.as_slice::<f32>()?;
                match self.1.contiguous_offsets() {
                    Some((a, b)) => Ok(&all[a..b]),
                    None => candle_core::bail!("frozen block: expected a contiguous operand"),
                }
            }
            _ => candle_core::bail!("frozen block: expected a CPU operand"),
        }
    }
}

/// Held weight and bias of a linear layer.
struct HeldLinear<'a> {
    w: Held<'a>,
    b: Option<Held<'a>>,
}

impl<'a> HeldLinear<'a> {
    fn new(l: &'a OwnedLinear) -> Self {
        HeldLinear {
            w: Held::new(&l.w),
            b: l.b.as_ref().map(Held::new),
        }
    }

    fn data(&self) -> Result<Lin<'_>> {
        Ok(Lin {
            w: self.w.f32()?,
            b: self.b.as_ref().map(|b| b.f32()).transpose()?,
        })
    }
}

/// Weight `[N, K]` and bias `[N]` data of a linear layer.
struct Lin<'a> {
    w: &'a [f32],
    b: Option<&'a [f32]>,
}

struct HeldNorm<'a> {
    w: Held<'a>,
    b: Option<Held<'a>>,
    eps: f32,
}

impl<'a> HeldNorm<'a> {
    fn new(n: &'a OwnedNorm) -> Self {
        match n {
            OwnedNorm::Rms { w, eps } => HeldNorm {
                w: Held::new(w),
                b: None,
                eps: *eps,
            },
            OwnedNorm::Layer { w, b, eps } => HeldNorm {
                w: Held::new(w),
                b: Some(Held::new(b)),
                eps: *eps,
            },
        }
    }

    fn data(&self) -> Result<NormData<'_>> {
        Ok(NormData {
            w: self.w.f32()?,
            b: self.b.as_ref().map(|b| b.f32()).transpose()?,
            eps: self.eps,
        })
    }
}

/// Norm weights; `b` present for LayerNorm, absent for RMSNorm.
struct NormData<'a> {
    w: &'a [f32],
    b: Option<&'a [f32]>,
    eps: f32,
}

// --- Kernels

/// Rows per rayon task below which splitting does not pay.
const MIN_ROWS: usize = 8;

fn parallelism() -> Parallelism {
    match candle_core::utils::get_num_threads() {
        0 | 1 => Parallelism::None,
        n => Parallelism::Rayon(n),
    }
}

/// A matrix operand inside a flat buffer: element `(i, j)` at `off + i * rs + j * cs`.
#[derive(Clone, Copy)]
struct Mat {
    off: usize,
    rs: usize,
    cs: usize,
}

impl Mat {
    /// Row-major `[.., cols]` from `off`.
    fn rows(off: usize, cols: usize) -> Self {
        Mat {
            off,
            rs: cols,
            cs: 1,
        }
    }

    /// The transpose of row-major `[.., cols]` from `off`.
    fn t(off: usize, cols: usize) -> Self {
        Mat {
            off,
            rs: 1,
            cs: cols,
        }
    }

    /// Whether an `r x c` matrix at this place lies inside a buffer of `len` floats.
    fn fits(&self, r: usize, c: usize, len: usize) -> bool {
        r == 0 || c == 0 || self.off + (r - 1) * self.rs + (c - 1) * self.cs < len
    }
}

/// A shared output buffer written by several tasks at disjoint elements.
#[derive(Clone, Copy)]
struct Out {
    ptr: *mut f32,
    len: usize,
}
// SAFETY: users write disjoint elements from different tasks (see each call site).
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

impl Out {
    fn new(v: &mut [f32]) -> Self {
        Out {
            ptr: v.as_mut_ptr(),
            len: v.len(),
        }
    }

    /// `len` floats from `start`.
    ///
    /// # Safety
    /// No other reference to these elements may exist while the slice lives.
    #[allow(clippy::mut_from_ref)]
    unsafe fn slice(&self, start: usize, len: usize) -> Result<&mut [f32]> {
        if start + len > self.len {
            candle_core::bail!("frozen block: slice {start}+{len} out of {}", self.len);
        }
        Ok(std::slice::from_raw_parts_mut(self.ptr.add(start), len))
    }
}

/// A matrix operand: its buffer and where it sits in it.
#[derive(Clone, Copy)]
struct Src<'a>(&'a [f32], Mat);

/// `c = a @ b` (or `c += a @ b` with `acc`) for `a [m, k]`, `b [k, n]`, `c [m, n]`; `c` sits
/// at `cm` in `c`'s buffer.
///
/// # Safety
/// No other thread may access the elements of `c` this product writes while it runs.
unsafe fn gemm_into(
    c: Out,
    cm: Mat,
    acc: bool,
    Src(a, am): Src,
    Src(b, bm): Src,
    (m, n, k): (usize, usize, usize),
    par: Parallelism,
) -> Result<()> {
    if !(cm.fits(m, n, c.len) && am.fits(m, k, a.len()) && bm.fits(k, n, b.len())) {
        candle_core::bail!("frozen block: matmul operand out of range ({m}x{k} @ {k}x{n})");
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    gemm::gemm(
        m,
        n,
        k,
        c.ptr.add(cm.off),
        cm.cs as isize,
        cm.rs as isize,
        acc,
        a.as_ptr().add(am.off),
        am.cs as isize,
        am.rs as isize,
        b.as_ptr().add(bm.off),
        bm.cs as isize,
        bm.rs as isize,
        if acc { 1.0 } else { 0.0 },
        1.0,
        false,
        false,
        false,
        par,
    );
    Ok(())
}

/// [`gemm_into`] on an exclusively borrowed output, all threads on the one product.
fn gemm(
    c: &mut [f32],
    cm: Mat,
    acc: bool,
    a: Src,
    b: Src,
    mnk: (usize, usize, usize),
) -> Result<()> {
    // SAFETY: `c` is borrowed mutably, nothing else can touch it.
    unsafe { gemm_into(Out::new(c), cm, acc, a, b, mnk, parallelism()) }
}

/// `x [R, K] @ w^T (+ b)` -> `[R, N]` for `w [N, K]`.
fn project(x: &[f32], r: usize, k: usize, l: &Lin) -> Result<Vec<f32>> {
    let n = l.w.len() / k;
    let mut y = match l.b {
        Some(b) => b.repeat(r),
        None => vec![0f32; r * n],
    };
    gemm(
        &mut y,
        Mat::rows(0, n),
        l.b.is_some(),
        Src(x, Mat::rows(0, k)),
        Src(l.w, Mat::t(0, k)),
        (r, n, k),
    )?;
    Ok(y)
}

/// `x (+ b)` row by row: the start of a residual output `[R, D]`.
fn residual(x: &[f32], d: usize, b: Option<&[f32]>) -> Vec<f32> {
    let mut y = x.to_vec();
    if let Some(b) = b {
        y.par_chunks_mut(d).with_min_len(MIN_ROWS).for_each(|row| {
            row.iter_mut().zip(b).for_each(|(y, b)| *y += b);
        });
    }
    y
}

/// The norm of every row of `x [R, D]`.
fn norm_fwd(x: &[f32], d: usize, n: &NormData) -> Vec<f32> {
    let mut y = vec![0f32; x.len()];
    y.par_chunks_mut(d)
        .zip(x.par_chunks(d))
        .with_min_len(MIN_ROWS)
        .for_each(|(y, x)| match n.b {
            Some(b) => fused::layer_norm_row(x, n.w, b, n.eps, y),
            None => fused::rms_norm_row(x, n.w, n.eps, y),
        });
    y
}

/// `dy + norm'(x)^T dn` row by row: the input gradient of a residual sub-block.
fn norm_bwd_add(x: &[f32], dn: &[f32], dy: &[f32], d: usize, n: &NormData) -> Vec<f32> {
    let mut dx = vec![0f32; x.len()];
    dx.par_chunks_mut(d)
        .zip(x.par_chunks(d).zip(dn.par_chunks(d)).zip(dy.par_chunks(d)))
        .with_min_len(MIN_ROWS)
        .for_each(|(dx, ((x, g), dy))| {
            match n.b {
                Some(_) => fused::layer_norm_bwd_row(x, n.w, g, n.eps, dx),
                None => fused::rms_norm_bwd_row(x, n.w, g, n.eps, dx),
            }
            dx.iter_mut().zip(dy).for_each(|(dx, dy)| *dx += dy);
        });
    dx
}

/// `[B*T, H*Dh]` -> `[B, H, T, Dh]`, rotated when `rope` is given.
fn to_heads(
    x: &[f32],
    (b, t, h, dh): (usize, usize, usize, usize),
    rope: Option<(&[f32], &[f32], bool)>,
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
                    fused::rope_row(
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
fn rotate_rows(
    x: &mut [f32],
    (n, dh): (usize, usize),
    rope: (&[f32], &[f32], bool),
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
                fused::rope_row(
                    head,
                    &cos[p..p + half],
                    &sin[p..p + half],
                    interleaved,
                    inverse,
                );
            }
        });
}

// --- Attention

#[derive(Clone, Copy)]
struct AttnShape {
    b: usize,
    t: usize,
    d: usize,
    h: usize,
    hkv: usize,
    dh: usize,
}

/// What the attention backward reads: rotated queries `[B, H, T, Dh]`, rotated keys and values
/// `[B, H_kv, T, Dh]`, probabilities `[B, H, T, T]`. With rows: queries `[M, H*Dh]` and
/// probabilities `[M, H, T]`.
struct AttnSaved {
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    p: Vec<f32>,
}

struct AttentionOp {
    /// Output only at these flattened positions (see [`attention_block`]).
    rows: Option<Vec<usize>>,
    norm: OwnedNorm,
    q: OwnedLinear,
    k: OwnedLinear,
    v: OwnedLinear,
    o: OwnedLinear,
    /// `cos`, `sin` `[T, Dh/2]`, interleaved pairs.
    rope: Option<(Tensor, Tensor, bool)>,
    /// `[Bb, Hb, T, T]` with `Bb` in `{1, B}`, `Hb` in `{1, H}`.
    bias: Tensor,
    bias_dims: (usize, usize),
    /// Per bias matrix (`Bb * Hb`) and block of [`ROW_BLOCK`] query rows: how many leading keys
    /// any row of the block can see (see [`key_limits`]).
    key_limits: Vec<usize>,
    shape: AttnShape,
    scale: f32,
    /// Keep [`AttnSaved`] for the backward (the input takes part in a gradient computation).
    keep: bool,
    saved: Mutex<Option<AttnSaved>>,
    /// Hand the rotated keys and the values `[B, H_kv, T, Dh]` of the forward to
    /// [`attention_block_kv`] (through `kv`).
    emit_kv: bool,
    kv: Mutex<Option<(Vec<f32>, Vec<f32>)>>,
}

/// Held operands of an [`AttentionOp`].
struct AttnHeld<'a> {
    norm: HeldNorm<'a>,
    q: HeldLinear<'a>,
    k: HeldLinear<'a>,
    v: HeldLinear<'a>,
    o: HeldLinear<'a>,
    rope: Option<(Held<'a>, Held<'a>, bool)>,
    bias: Held<'a>,
}

/// Query rows per block of the whole-sequence attention.
const ROW_BLOCK: usize = 32;

/// For every bias matrix `[T, T]` in `bias [M, T, T]` and every block of [`ROW_BLOCK`] query
/// rows: one past the last key that some row of the block does not mask (bias above
/// `-MASK_VALUE / 2`), or `T` when a row masks every key (its softmax is uniform over all
/// of them). Past that, the scores get `exp(-1e30) = 0` exactly, so the blocks skip those
/// keys: a causal mask halves the attention products.
fn key_limits(bias: &[f32], m: usize, t: usize) -> Vec<usize> {
    let masked = -(super::MASK_VALUE as f32) / 2.0;
    let mut out = Vec::with_capacity(m * t.div_ceil(ROW_BLOCK));
    for mat in bias.chunks(t * t).take(m) {
        for block in mat.chunks(ROW_BLOCK * t) {
            let limit = block
                .chunks(t)
                .map(|row| row.iter().rposition(|&v| v > masked).map_or(t, |j| j + 1))
                .max()
                .unwrap_or(t);
            out.push(limit);
        }
    }
    out
}

impl AttentionOp {
    /// Keys to compute for bias matrix `bsel` and query block `blk`.
    fn keys(&self, bsel: usize, blk: usize) -> usize {
        let t = self.shape.t;
        self.key_limits
            .get(bsel * t.div_ceil(ROW_BLOCK) + blk)
            .copied()
            .unwrap_or(t)
    }

    fn hold(&self) -> AttnHeld<'_> {
        AttnHeld {
            norm: HeldNorm::new(&self.norm),
            q: HeldLinear::new(&self.q),
            k: HeldLinear::new(&self.k),
            v: HeldLinear::new(&self.v),
            o: HeldLinear::new(&self.o),
            rope: self
                .rope
                .as_ref()
                .map(|(c, s, i)| (Held::new(c), Held::new(s), *i)),
            bias: Held::new(&self.bias),
        }
    }
}

impl CustomOp1 for AttentionOp {
    fn name(&self) -> &'static str {
        "frozen-attention-block"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = match xl.contiguous_offsets() {
            Some((a, b)) => &xs.as_slice::<f32>()?[a..b],
            None => candle_core::bail!("attention block: expected a contiguous input"),
        };
        let AttnShape {
            b,
            t,
            d,
            h,
            hkv,
            dh,
        } = self.shape;
        let (r, nq, group) = (b * t, h * dh, h / hkv);
        let held = self.hold();
        let rope = match &held.rope {
            Some((c, s, i)) => Some((c.f32()?, s.f32()?, *i)),
            None => None,
        };
        let bias = held.bias.f32()?;
        let (bb, hb) = self.bias_dims;

        let n = norm_fwd(x, d, &held.norm.data()?); // [R, D]
        if let Some(rows) = &self.rows {
            let (y, saved) = self.fwd_rows(x, n, rows, &held)?;
            if self.emit_kv {
                *self.kv.lock().map_err(|_| poisoned())? = Some((saved.k, saved.v));
            } else if self.keep {
                *self.saved.lock().map_err(|_| poisoned())? = Some(saved);
            }
            return Ok((CpuStorage::F32(y), Shape::from((1, rows.len(), d))));
        }
        let q = to_heads(&project(&n, r, d, &held.q.data()?)?, (b, t, h, dh), rope); // [B,H,T,Dh]
        let k = to_heads(&project(&n, r, d, &held.k.data()?)?, (b, t, hkv, dh), rope);
        let v = to_heads(&project(&n, r, d, &held.v.data()?)?, (b, t, hkv, dh), None);
        drop(n);

        // Per (row, kv head): scores of its `group` query heads, softmax, `P V` into the
        // merged `[B*T, H*Dh]` layout.
        // Kept for the backward: all of them; otherwise one `[T, T]` scratch per task.
        let mut p = vec![0f32; if self.keep { b * h * t * t } else { 0 }]; // [B, H, T, T]
        let all_p = Out::new(&mut p);
        let mut merged = vec![0f32; r * nq];
        let out = Out::new(&mut merged);
        (0..b * hkv)
            .into_par_iter()
            .try_for_each(|task| -> Result<()> {
                let (bi, kv) = (task / hkv, task % hkv);
                let kv_off = (bi * hkv + kv) * t * dh;
                let mut scratch = vec![0f32; if self.keep { 0 } else { t * t }];
                for gi in 0..group {
                    let hi = kv * group + gi;
                    let ph: &mut [f32] = match self.keep {
                        // SAFETY: head `hi` of batch row `bi` belongs to this task only.
                        true => unsafe { all_p.slice((bi * h + hi) * t * t, t * t)? },
                        // Rows and keys past those computed below are never read.
                        false => &mut scratch,
                    };
                    let q_off = (bi * h + hi) * t * dh;
                    let bsel = (if bb == 1 { 0 } else { bi }) * hb + if hb == 1 { 0 } else { hi };
                    let b_off = bsel * t * t;
                    // Blocks of query rows, each against the keys its rows can see; the
                    // probabilities past them stay 0.
                    for (blk, r0) in (0..t).step_by(ROW_BLOCK).enumerate() {
                        let (r1, keys) = ((r0 + ROW_BLOCK).min(t), self.keys(bsel, blk));
                        // SAFETY: `ph` is this task's own chunk; rows `bi*T + r0..r1`, columns
                        // of head `hi` of `merged` are written by this task only.
                        unsafe {
                            gemm_into(
                                Out::new(ph),
                                Mat::rows(r0 * t, t),
                                false,
                                Src(&q, Mat::rows(q_off + r0 * dh, dh)),
                                Src(&k, Mat::t(kv_off, dh)),
                                (r1 - r0, keys, dh),
                                Parallelism::None,
                            )?;
                            for i in r0..r1 {
                                let row = &mut ph[i * t..i * t + keys];
                                let brow = &bias[b_off + i * t..b_off + i * t + keys];
                                row.iter_mut()
                                    .zip(brow)
                                    .for_each(|(s, &bv)| *s = *s * self.scale + bv);
                                fused::softmax_row(row);
                            }
                            gemm_into(
                                out,
                                Mat::rows((bi * t + r0) * nq + hi * dh, nq),
                                false,
                                Src(ph, Mat::rows(r0 * t, t)),
                                Src(&v, Mat::rows(kv_off, dh)),
                                (r1 - r0, dh, keys),
                                Parallelism::None,
                            )?;
                        }
                    }
                }
                Ok(())
            })?;

        let o = held.o.data()?;
        let mut y = residual(x, d, o.b); // [R, D]
        gemm(
            &mut y,
            Mat::rows(0, d),
            true,
            Src(&merged, Mat::rows(0, nq)),
            Src(o.w, Mat::t(0, nq)),
            (r, d, nq),
        )?;
        if self.emit_kv {
            *self.kv.lock().map_err(|_| poisoned())? = Some((k, v));
        } else if self.keep {
            *self.saved.lock().map_err(|_| poisoned())? = Some(AttnSaved { q, k, v, p });
        }
        Ok((CpuStorage::F32(y), xl.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        let saved = self.saved.lock().map_err(|_| poisoned())?;
        let Some(saved) = saved.as_ref() else {
            candle_core::bail!("attention block: backward without saved activations");
        };
        let dy = dy.contiguous()?;
        let (hx, hdy) = (Held::new(x), Held::new(&dy));
        let (xd, dyd) = (hx.f32()?, hdy.f32()?);
        let held = self.hold();
        let dx = match &self.rows {
            Some(rows) => self.bwd_rows(xd, dyd, rows, saved, &held)?,
            None => self.bwd_all(xd, dyd, saved, &held)?,
        };
        Ok(Some(Tensor::from_vec(dx, x.shape(), x.device())?))
    }
}

impl AttentionOp {
    /// The backward of the whole-sequence forward: `x`, `dy` `[B*T, D]` -> `dx`.
    fn bwd_all(
        &self,
        xd: &[f32],
        dyd: &[f32],
        saved: &AttnSaved,
        held: &AttnHeld,
    ) -> Result<Vec<f32>> {
        let AttnSaved { q, k, v, p } = saved;
        let AttnShape {
            b,
            t,
            d,
            h,
            hkv,
            dh,
        } = self.shape;
        let (r, nq, nkv, group) = (b * t, h * dh, hkv * dh, h / hkv);
        let (bb, hb) = self.bias_dims;
        let o = held.o.data()?;

        // d merged = dy @ Wo   [R, H*Dh]
        let mut dm = vec![0f32; r * nq];
        gemm(
            &mut dm,
            Mat::rows(0, nq),
            false,
            Src(dyd, Mat::rows(0, d)),
            Src(o.w, Mat::rows(0, nq)),
            (r, nq, d),
        )?;

        let mut dq = vec![0f32; r * nq];
        let mut dk = vec![0f32; r * nkv];
        let mut dv = vec![0f32; r * nkv];
        let (oq, ok, ov) = (Out::new(&mut dq), Out::new(&mut dk), Out::new(&mut dv));
        (0..b * hkv)
            .into_par_iter()
            .try_for_each(|task| -> Result<()> {
                let (bi, kv) = (task / hkv, task % hkv);
                let kv_off = (bi * hkv + kv) * t * dh;
                let mut ds = vec![0f32; t * t];
                let row0 = bi * t;
                for gi in 0..group {
                    let hi = kv * group + gi;
                    let p_off = (bi * h + hi) * t * t;
                    let q_off = (bi * h + hi) * t * dh;
                    let bsel = (if bb == 1 { 0 } else { bi }) * hb + if hb == 1 { 0 } else { hi };
                    let dkv = Mat::rows(row0 * nkv + kv * dh, nkv);
                    for (blk, r0) in (0..t).step_by(ROW_BLOCK).enumerate() {
                        let (r1, keys) = ((r0 + ROW_BLOCK).min(t), self.keys(bsel, blk));
                        let rows = r1 - r0;
                        let da = Mat::rows((row0 + r0) * nq + hi * dh, nq); // [rows, Dh] in dm
                                                                            // SAFETY: `ds` is local; rows `bi*T..`, columns of head `hi` (dq) and
                                                                            // of kv head `kv` (dk, dv) belong to this task only.
                        unsafe {
                            // dP = dA @ V^T
                            gemm_into(
                                Out::new(&mut ds),
                                Mat::rows(0, t),
                                false,
                                Src(&dm, da),
                                Src(v, Mat::t(kv_off, dh)),
                                (rows, keys, dh),
                                Parallelism::None,
                            )?;
                            for i in 0..rows {
                                let pr = p_off + (r0 + i) * t;
                                let g = &mut ds[i * t..i * t + keys];
                                fused::softmax_bwd_row(&p[pr..pr + keys], g, self.scale);
                            }
                            // dQ = dS @ K, dK += dS^T @ Q, dV += P^T @ dA (dk, dv start at 0)
                            gemm_into(
                                oq,
                                Mat::rows((row0 + r0) * nq + hi * dh, nq),
                                false,
                                Src(&ds, Mat::rows(0, t)),
                                Src(k, Mat::rows(kv_off, dh)),
                                (rows, dh, keys),
                                Parallelism::None,
                            )?;
                            gemm_into(
                                ok,
                                dkv,
                                true,
                                Src(&ds, Mat::t(0, t)),
                                Src(q, Mat::rows(q_off + r0 * dh, dh)),
                                (keys, dh, rows),
                                Parallelism::None,
                            )?;
                            gemm_into(
                                ov,
                                dkv,
                                true,
                                Src(p, Mat::t(p_off + r0 * t, t)),
                                Src(&dm, da),
                                (keys, dh, rows),
                                Parallelism::None,
                            )?;
                        }
                    }
                }
                Ok(())
            })?;
        drop(dm);
        if let Some((c, s, i)) = &held.rope {
            let rope = (c.f32()?, s.f32()?, *i);
            rotate_rows(&mut dq, (nq, dh), rope, true, |i| i % t);
            rotate_rows(&mut dk, (nkv, dh), rope, true, |i| i % t);
        }
        // d norm = dq @ Wq + dk @ Wk + dv @ Wv   [R, D]
        let mut dn = vec![0f32; r * d];
        let (wq, wk, wv) = (held.q.data()?, held.k.data()?, held.v.data()?);
        gemm(
            &mut dn,
            Mat::rows(0, d),
            false,
            Src(&dq, Mat::rows(0, nq)),
            Src(wq.w, Mat::rows(0, d)),
            (r, d, nq),
        )?;
        gemm(
            &mut dn,
            Mat::rows(0, d),
            true,
            Src(&dk, Mat::rows(0, nkv)),
            Src(wk.w, Mat::rows(0, d)),
            (r, d, nkv),
        )?;
        gemm(
            &mut dn,
            Mat::rows(0, d),
            true,
            Src(&dv, Mat::rows(0, nkv)),
            Src(wv.w, Mat::rows(0, d)),
            (r, d, nkv),
        )?;
        Ok(norm_bwd_add(xd, &dn, dyd, d, &held.norm.data()?))
    }

    /// The forward at `rows` only, given the normed input `n [B*T, D]`: `y [M, D]` and what
    /// [`Self::bwd_rows`] needs.
    fn fwd_rows(
        &self,
        x: &[f32],
        n: Vec<f32>,
        rows: &[usize],
        held: &AttnHeld,
    ) -> Result<(Vec<f32>, AttnSaved)> {
        let AttnShape {
            b,
            t,
            d,
            h,
            hkv,
            dh,
        } = self.shape;
        let (r, m, nq, group) = (b * t, rows.len(), h * dh, h / hkv);
        let rope = match &held.rope {
            Some((c, s, i)) => Some((c.f32()?, s.f32()?, *i)),
            None => None,
        };
        let bias = held.bias.f32()?;
        let (bb, hb) = self.bias_dims;
        let k = to_heads(&project(&n, r, d, &held.k.data()?)?, (b, t, hkv, dh), rope); // [B,Hkv,T,Dh]
        let v = to_heads(&project(&n, r, d, &held.v.data()?)?, (b, t, hkv, dh), None);
        let mut q = project(&gather(&n, rows, d), m, d, &held.q.data()?)?; // [M, H*Dh]
        drop(n);
        if let Some(rope) = rope {
            rotate_rows(&mut q, (nq, dh), rope, false, |i| rows[i] % t);
        }
        let mut p = vec![0f32; m * h * t]; // [M, H, T]
        let mut merged = vec![0f32; m * nq]; // [M, H*Dh]
        p.par_chunks_mut(h * t)
            .zip(merged.par_chunks_mut(nq))
            .enumerate()
            .for_each(|(i, (pm, om))| {
                let (bi, ti) = (rows[i] / t, rows[i] % t);
                for hi in 0..h {
                    let kv_off = (bi * hkv + hi / group) * t * dh;
                    let qh = &q[i * nq + hi * dh..(i * nq + (hi + 1) * dh)];
                    let s = &mut pm[hi * t..(hi + 1) * t];
                    for (j, s) in s.iter_mut().enumerate() {
                        *s = dot(qh, &k[kv_off + j * dh..kv_off + (j + 1) * dh]);
                    }
                    let b_row = ((if bb == 1 { 0 } else { bi }) * hb
                        + if hb == 1 { 0 } else { hi })
                        * t
                        * t
                        + ti * t;
                    s.iter_mut()
                        .zip(&bias[b_row..b_row + t])
                        .for_each(|(s, &bv)| *s = *s * self.scale + bv);
                    fused::softmax_row(s);
                    let oh = &mut om[hi * dh..(hi + 1) * dh];
                    for (j, &pj) in s.iter().enumerate() {
                        axpy(oh, pj, &v[kv_off + j * dh..kv_off + (j + 1) * dh]);
                    }
                }
            });
        let o = held.o.data()?;
        let mut y = residual(&gather(x, rows, d), d, o.b); // [M, D]
        gemm(
            &mut y,
            Mat::rows(0, d),
            true,
            Src(&merged, Mat::rows(0, nq)),
            Src(o.w, Mat::t(0, nq)),
            (m, d, nq),
        )?;
        Ok((y, AttnSaved { q, k, v, p }))
    }

    /// The backward of [`Self::fwd_rows`]: `x [B*T, D]`, `dy [M, D]` -> `dx [B*T, D]`.
    fn bwd_rows(
        &self,
        xd: &[f32],
        dyd: &[f32],
        rows: &[usize],
        saved: &AttnSaved,
        held: &AttnHeld,
    ) -> Result<Vec<f32>> {
        let AttnSaved { q, k, v, p } = saved;
        let AttnShape {
            b,
            t,
            d,
            h,
            hkv,
            dh,
        } = self.shape;
        let (r, m, nq, nkv, group) = (b * t, rows.len(), h * dh, hkv * dh, h / hkv);
        // d merged = dy @ Wo   [M, H*Dh]
        let mut dm = vec![0f32; m * nq];
        gemm(
            &mut dm,
            Mat::rows(0, nq),
            false,
            Src(dyd, Mat::rows(0, d)),
            Src(held.o.data()?.w, Mat::rows(0, nq)),
            (m, nq, d),
        )?;
        let mut by_batch = vec![Vec::new(); b];
        for (i, &row) in rows.iter().enumerate() {
            by_batch[row / t].push(i);
        }
        let mut dq = vec![0f32; m * nq];
        let mut dk = vec![0f32; r * nkv];
        let mut dv = vec![0f32; r * nkv];
        let (out_q, out_k, out_v) = (Out::new(&mut dq), Out::new(&mut dk), Out::new(&mut dv));
        (0..b * hkv)
            .into_par_iter()
            .try_for_each(|task| -> Result<()> {
                let (bi, kv) = (task / hkv, task % hkv);
                let kv_off = (bi * hkv + kv) * t * dh;
                let mut ds = vec![0f32; t];
                for &i in &by_batch[bi] {
                    for hi in kv * group..(kv + 1) * group {
                        let da = &dm[i * nq + hi * dh..i * nq + (hi + 1) * dh];
                        let qh = &q[i * nq + hi * dh..i * nq + (hi + 1) * dh];
                        let ph = &p[(i * h + hi) * t..(i * h + hi + 1) * t];
                        for (j, g) in ds.iter_mut().enumerate() {
                            *g = dot(da, &v[kv_off + j * dh..kv_off + (j + 1) * dh]);
                        }
                        fused::softmax_bwd_row(ph, &mut ds, self.scale);
                        // SAFETY: query row `i` (of batch row `bi`) at head `hi` (of kv head `kv`),
                        // and the keys/values of kv head `kv` in batch row `bi`: this task only.
                        let dqh = unsafe { out_q.slice(i * nq + hi * dh, dh)? };
                        for j in 0..t {
                            let at = (bi * t + j) * nkv + kv * dh;
                            axpy(dqh, ds[j], &k[kv_off + j * dh..kv_off + (j + 1) * dh]);
                            axpy(unsafe { out_k.slice(at, dh)? }, ds[j], qh);
                            axpy(unsafe { out_v.slice(at, dh)? }, ph[j], da);
                        }
                    }
                }
                Ok(())
            })?;
        drop(dm);
        if let Some((c, s, i)) = &held.rope {
            let rope = (c.f32()?, s.f32()?, *i);
            rotate_rows(&mut dq, (nq, dh), rope, true, |i| rows[i] % t);
            rotate_rows(&mut dk, (nkv, dh), rope, true, |i| i % t);
        }
        // d norm = dk @ Wk + dv @ Wv at every position, + dq @ Wq at the rows   [B*T, D]
        let mut dn = vec![0f32; r * d];
        let (wq, wk, wv) = (held.q.data()?, held.k.data()?, held.v.data()?);
        gemm(
            &mut dn,
            Mat::rows(0, d),
            false,
            Src(&dk, Mat::rows(0, nkv)),
            Src(wk.w, Mat::rows(0, d)),
            (r, d, nkv),
        )?;
        gemm(
            &mut dn,
            Mat::rows(0, d),
            true,
            Src(&dv, Mat::rows(0, nkv)),
            Src(wv.w, Mat::rows(0, d)),
            (r, d, nkv),
        )?;
        let mut dnq = vec![0f32; m * d];
        gemm(
            &mut dnq,
            Mat::rows(0, d),
            false,
            Src(&dq, Mat::rows(0, nq)),
            Src(wq.w, Mat::rows(0, d)),
            (m, d, nq),
        )?;
        let mut dy_all = vec![0f32; r * d];
        for (i, &row) in rows.iter().enumerate() {
            let (src, dst) = (i * d..(i + 1) * d, row * d..(row + 1) * d);
            dn[dst.clone()]
                .iter_mut()
                .zip(&dnq[src.clone()])
                .for_each(|(a, b)| *a += b);
            dy_all[dst]
                .iter_mut()
                .zip(&dyd[src])
                .for_each(|(a, b)| *a += b);
        }
        Ok(norm_bwd_add(xd, &dn, &dy_all, d, &held.norm.data()?))
    }
}

fn poisoned() -> candle_core::Error {
    candle_core::Error::Msg(
        "frozen block: a thread panicked while holding saved activations".into(),
    )
}

/// `sum(a * b)`.
fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(a, b)| a * b).sum()
}

/// `y += alpha * x`.
fn axpy(y: &mut [f32], alpha: f32, x: &[f32]) {
    y.iter_mut().zip(x).for_each(|(y, x)| *y += alpha * x);
}

/// Rows `rows` of `x [.., D]` -> `[M, D]`.
fn gather(x: &[f32], rows: &[usize], d: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(rows.len() * d);
    for &r in rows {
        out.extend_from_slice(&x[r * d..(r + 1) * d]);
    }
    out
}

// --- Feed-forward

enum OwnedFfnIn {
    Gated(OwnedLinear, OwnedLinear),
    Plain(OwnedLinear),
}

/// What the feed-forward backward reads: the gate and up projections `[R, F]` (gated), or
/// the activation's input `[R, F]` (plain).
enum FfnSaved {
    Gated(Vec<f32>, Vec<f32>),
    Plain(Vec<f32>),
}

struct FeedForwardOp {
    norm: OwnedNorm,
    inner: OwnedFfnIn,
    down: OwnedLinear,
    act: Act,
    rows: usize,
    d: usize,
    f: usize,
    keep: bool,
    saved: Mutex<Option<FfnSaved>>,
}

/// Element-wise chunks handed to one rayon task.
const CHUNK: usize = 4096;

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
        "frozen-feed-forward-block"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = match xl.contiguous_offsets() {
            Some((a, b)) => &xs.as_slice::<f32>()?[a..b],
            None => candle_core::bail!("feed-forward block: expected a contiguous input"),
        };
        let (r, d, f, act) = (self.rows, self.d, self.f, self.act);
        let hn = HeldNorm::new(&self.norm);
        let n = norm_fwd(x, d, &hn.data()?); // [R, D]
        let (s, saved) = match &self.inner {
            OwnedFfnIn::Gated(gate, up) => {
                let (hg, hu) = (HeldLinear::new(gate), HeldLinear::new(up));
                let g = project(&n, r, d, &hg.data()?)?; // [R, F]
                let u = project(&n, r, d, &hu.data()?)?;
                let s = with_act!(act, act_fwd(&g, Some(&u)));
                (s, FfnSaved::Gated(g, u))
            }
            OwnedFfnIn::Plain(w) => {
                let hw = HeldLinear::new(w);
                let a = project(&n, r, d, &hw.data()?)?; // [R, F]
                let s = with_act!(act, act_fwd(&a, None));
                (s, FfnSaved::Plain(a))
            }
        };
        drop(n);
        let hd = HeldLinear::new(&self.down);
        let down = hd.data()?;
        let mut y = residual(x, d, down.b);
        gemm(
            &mut y,
            Mat::rows(0, d),
            true,
            Src(&s, Mat::rows(0, f)),
            Src(down.w, Mat::t(0, f)),
            (r, d, f),
        )?;
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
        let (r, d, f, act) = (self.rows, self.d, self.f, self.act);
        let dy = dy.contiguous()?;
        let (hx, hdy) = (Held::new(x), Held::new(&dy));
        let (xd, dyd) = (hx.f32()?, hdy.f32()?);
        let hd = HeldLinear::new(&self.down);
        // ds = dy @ Wd   [R, F]
        let mut ds = vec![0f32; r * f];
        gemm(
            &mut ds,
            Mat::rows(0, f),
            false,
            Src(dyd, Mat::rows(0, d)),
            Src(hd.data()?.w, Mat::rows(0, f)),
            (r, f, d),
        )?;
        let mut dn = vec![0f32; r * d];
        match (&self.inner, saved) {
            (OwnedFfnIn::Gated(gate, up), FfnSaved::Gated(g, u)) => {
                let du = with_act!(act, act_bwd(&mut ds, g, Some(u)))
                    .ok_or_else(|| candle_core::Error::Msg("gated backward without du".into()))?;
                let (hg, hu) = (HeldLinear::new(gate), HeldLinear::new(up));
                gemm(
                    &mut dn,
                    Mat::rows(0, d),
                    false,
                    Src(&ds, Mat::rows(0, f)),
                    Src(hg.data()?.w, Mat::rows(0, d)),
                    (r, d, f),
                )?;
                gemm(
                    &mut dn,
                    Mat::rows(0, d),
                    true,
                    Src(&du, Mat::rows(0, f)),
                    Src(hu.data()?.w, Mat::rows(0, d)),
                    (r, d, f),
                )?;
            }
            (OwnedFfnIn::Plain(w), FfnSaved::Plain(a)) => {
                with_act!(act, act_bwd(&mut ds, a, None));
                let hw = HeldLinear::new(w);
                gemm(
                    &mut dn,
                    Mat::rows(0, d),
                    false,
                    Src(&ds, Mat::rows(0, f)),
                    Src(hw.data()?.w, Mat::rows(0, d)),
                    (r, d, f),
                )?;
            }
            _ => candle_core::bail!("feed-forward block: saved activations of the wrong kind"),
        }
        drop(ds);
        let dx = norm_bwd_add(xd, &dn, dyd, d, &HeldNorm::new(&self.norm).data()?);
        Ok(Some(Tensor::from_vec(dx, x.shape(), x.device())?))
    }
}

#[cfg(test)]
mod tests {
    //! The fused sub-blocks against the same sub-blocks composed of single ops (whose
    //! gradients candle's autograd computes): outputs, and the input gradient of a random
    //! projection of the output.
    use super::*;
    use crate::model::{attention_bias, ops};
    use candle_core::{Device, Var};

    /// Deterministic pseudo-random values in [-scale, scale).
    fn rand(shape: &[usize], seed: u64, scale: f32) -> Tensor {
        let n: usize = shape.iter().product();
        let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(1);
        let v: Vec<f32> = (0..n)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((state >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
            })
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    fn max_abs(t: &Tensor) -> f32 {
        t.abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar()
            .unwrap()
    }

    fn assert_rel(what: &str, got: &Tensor, want: &Tensor, rel: f32) {
        assert_eq!(got.dims(), want.dims(), "{what}: shapes");
        let diff = max_abs(&(got - want).unwrap());
        let tol = rel * max_abs(want).max(1e-6);
        assert!(diff <= tol, "{what}: max abs diff {diff} > {tol}");
    }

    /// Runs `fused` and `composite` on the same input; compares outputs and input gradients
    /// of `sum(y * probe)`.
    fn check(
        what: &str,
        x: &Tensor,
        fused: impl Fn(&Tensor) -> Option<Tensor>,
        composite: impl Fn(&Tensor) -> Tensor,
    ) {
        let xv = Var::from_tensor(x).unwrap();
        let y = fused(xv.as_tensor()).unwrap_or_else(|| panic!("{what}: fused path not taken"));
        let y_ref = composite(xv.as_tensor());
        assert_rel(&format!("{what}: forward"), &y, &y_ref, 1e-5);
        let probe = rand(y.dims(), 99, 1.0);
        let g = (&y * &probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let g_ref = (&y_ref * &probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let (g, g_ref) = (
            g.get(xv.as_tensor()).unwrap(),
            g_ref.get(xv.as_tensor()).unwrap(),
        );
        assert_rel(&format!("{what}: grad x"), g, g_ref, 1e-4);
        // Without a gradient to compute: same output, nothing kept.
        let y_inf = fused(x).unwrap();
        assert_rel(&format!("{what}: inference"), &y_inf, &y, 1e-6);
    }

    struct AttnWeights {
        norm_w: Tensor,
        norm_b: Tensor,
        q: (Tensor, Tensor),
        k: (Tensor, Tensor),
        v: (Tensor, Tensor),
        o: (Tensor, Tensor),
    }

    fn attn_weights(d: usize, h: usize, hkv: usize, dh: usize, seed: u64) -> AttnWeights {
        let lin = |n: usize, k: usize, s: u64| (rand(&[n, k], s, 0.4), rand(&[n], s + 1, 0.2));
        AttnWeights {
            norm_w: (rand(&[d], seed, 0.3) + 1.0).unwrap(),
            norm_b: rand(&[d], seed + 1, 0.3),
            q: lin(h * dh, d, seed + 2),
            k: lin(hkv * dh, d, seed + 4),
            v: lin(hkv * dh, d, seed + 6),
            o: lin(d, h * dh, seed + 8),
        }
    }

    fn lin((w, b): &(Tensor, Tensor), biased: bool) -> Linear<'_> {
        Linear {
            w,
            b: biased.then_some(b),
        }
    }

    /// A padded batch mask `[B, T]`: row `i` has its last `i` positions padded.
    fn padded_mask(b: usize, t: usize) -> Tensor {
        let v: Vec<f32> = (0..b)
            .flat_map(|i| (0..t).map(move |j| if j + i < t { 1.0 } else { 0.0 }))
            .collect();
        Tensor::from_vec(v, (b, t), &Device::Cpu).unwrap()
    }

    /// [`check`] on the whole sequence and at some rows (a repeated one included).
    fn check_attn(what: &str, x: &Tensor, spec: &SelfAttention) {
        check(
            what,
            x,
            |x| attention_block(x, spec, None).unwrap(),
            |x| ops::attention_block_composite(x, spec).unwrap(),
        );
        let (b, t, d) = x.dims3().unwrap();
        let rows = Tensor::new(&[(b * t - 1) as u32, 2, 13, 6, 13], &Device::Cpu).unwrap();
        check(
            &format!("{what} at rows"),
            x,
            |x| attention_block(x, spec, Some(&rows)).unwrap(),
            |x| {
                let y = ops::attention_block_composite(x, spec).unwrap();
                y.reshape((b * t, d))
                    .unwrap()
                    .index_select(&rows, 0)
                    .unwrap()
                    .unsqueeze(0)
                    .unwrap()
            },
        );
    }

    #[test]
    fn attention_block_matches_composite() {
        let (b, t, d) = (3, 7, 24);
        let x = rand(&[b, t, d], 1, 1.0);
        let causal = attention_bias(&padded_mask(b, t), t, true).unwrap(); // [B, 1, T, T]
                                                                           // Llama-style: RMSNorm, grouped-query attention, rotary (both layouts), q/k/v biases
                                                                           // or none.
        let (h, hkv, dh) = (6, 2, 4);
        let w = attn_weights(d, h, hkv, dh, 10);
        let (cos, sin) = ops::rope_tables(dh, 10000.0, 0, t, &Device::Cpu).unwrap();
        for (interleaved, biased) in [(false, false), (true, true)] {
            let lin = |p| self::tests::lin(p, biased);
            let spec = SelfAttention {
                norm: Norm::Rms {
                    w: &w.norm_w,
                    eps: 1e-5,
                },
                q: lin(&w.q),
                k: lin(&w.k),
                v: lin(&w.v),
                o: Linear { w: &w.o.0, b: None },
                heads: h,
                kv_heads: hkv,
                head_dim: dh,
                rope: Some(Rotary {
                    cos: &cos,
                    sin: &sin,
                    interleaved,
                }),
                bias: &causal,
                scale: 0.5,
            };
            check_attn(
                &format!("llama-style (interleaved {interleaved}, biases {biased})"),
                &x,
                &spec,
            );
        }
        // GPT-2-style: LayerNorm, biases everywhere, no rotary.
        let (h, dh) = (3, 8);
        let w = attn_weights(d, h, h, dh, 20);
        let lin = |p| self::tests::lin(p, true);
        let spec = SelfAttention {
            norm: Norm::Layer {
                w: &w.norm_w,
                b: &w.norm_b,
                eps: 1e-5,
            },
            q: lin(&w.q),
            k: lin(&w.k),
            v: lin(&w.v),
            o: lin(&w.o),
            heads: h,
            kv_heads: h,
            head_dim: dh,
            rope: None,
            bias: &causal,
            scale: 0.3,
        };
        check_attn("gpt2-style", &x, &spec);
        // T5-style: a bias per head and row `[B, H, T, T]` (position bias plus padding), and
        // one shared by the batch `[1, H, T, T]`; no scaling, inner width != D.
        let (h, dh) = (4, 5);
        let w = attn_weights(d, h, h, dh, 30);
        let pos = rand(&[1, h, t, t], 31, 2.0);
        let full = attention_bias(&padded_mask(b, t), t, false)
            .unwrap()
            .broadcast_add(&pos)
            .unwrap();
        for bias in [&full, &pos] {
            let lin = |p| self::tests::lin(p, false);
            let spec = SelfAttention {
                norm: Norm::Rms {
                    w: &w.norm_w,
                    eps: 1e-6,
                },
                q: lin(&w.q),
                k: lin(&w.k),
                v: lin(&w.v),
                o: lin(&w.o),
                heads: h,
                kv_heads: h,
                head_dim: dh,
                rope: None,
                bias,
                scale: 1.0,
            };
            check_attn(&format!("t5-style (bias {:?})", bias.dims()), &x, &spec);
        }
    }

    /// Sequences longer than a row block, causal, padded on the right (row 0) and on the left
    /// (row 1: its first queries see no real key, so their softmax spreads over every key):
    /// the blocks skip masked keys exactly.
    #[test]
    fn causal_row_blocks_match_composite() {
        let (b, t, d, h, hkv, dh) = (2, 2 * ROW_BLOCK + 6, 16, 4, 2, 4);
        let x = rand(&[b, t, d], 5, 1.0);
        let mask: Vec<f32> = (0..t)
            .map(|j| if j + 5 < t { 1.0 } else { 0.0 })
            .chain((0..t).map(|j| if j >= 3 { 1.0 } else { 0.0 }))
            .collect();
        let mask = Tensor::from_vec(mask, (b, t), &Device::Cpu).unwrap();
        let causal = attention_bias(&mask, t, true).unwrap(); // [B, 1, T, T]
        let w = attn_weights(d, h, hkv, dh, 60);
        let (cos, sin) = ops::rope_tables(dh, 10000.0, 0, t, &Device::Cpu).unwrap();
        let lin = |p| self::tests::lin(p, true);
        let spec = SelfAttention {
            norm: Norm::Rms {
                w: &w.norm_w,
                eps: 1e-5,
            },
            q: lin(&w.q),
            k: lin(&w.k),
            v: lin(&w.v),
            o: lin(&w.o),
            heads: h,
            kv_heads: hkv,
            head_dim: dh,
            rope: Some(Rotary {
                cos: &cos,
                sin: &sin,
                interleaved: false,
            }),
            bias: &causal,
            scale: 0.5,
        };
        check_attn("causal, 3 row blocks", &x, &spec);
    }

    #[test]
    fn feed_forward_block_matches_composite() {
        let (b, t, d, f) = (2, 5, 12, 20);
        let x = rand(&[b, t, d], 2, 1.0);
        let norm_w = (rand(&[d], 40, 0.3) + 1.0).unwrap();
        let norm_b = rand(&[d], 41, 0.3);
        let (wg, bg) = (rand(&[f, d], 42, 0.5), rand(&[f], 43, 0.3));
        let (wu, bu) = (rand(&[f, d], 44, 0.5), rand(&[f], 45, 0.3));
        let (wd, bd) = (rand(&[d, f], 46, 0.5), rand(&[d], 47, 0.3));
        let rms = Norm::Rms {
            w: &norm_w,
            eps: 1e-5,
        };
        let layer = Norm::Layer {
            w: &norm_w,
            b: &norm_b,
            eps: 1e-5,
        };
        let plain = |w, b| Linear { w, b };
        let cases = [
            (
                "swiglu",
                rms,
                FfnIn::Gated {
                    gate: plain(&wg, None),
                    up: plain(&wu, None),
                    act: FfnAct::Silu,
                },
                None,
            ),
            (
                "gated gelu",
                rms,
                FfnIn::Gated {
                    gate: plain(&wg, Some(&bg)),
                    up: plain(&wu, Some(&bu)),
                    act: FfnAct::GeluTanh,
                },
                None,
            ),
            (
                "relu",
                rms,
                FfnIn::Plain {
                    w: plain(&wg, None),
                    act: FfnAct::Relu,
                },
                None,
            ),
            (
                "gpt2 gelu",
                layer,
                FfnIn::Plain {
                    w: plain(&wg, Some(&bg)),
                    act: FfnAct::GeluTanh,
                },
                Some(&bd),
            ),
        ];
        for (what, norm, inner, down_b) in cases {
            let spec = FeedForward {
                norm,
                inner,
                down: Linear { w: &wd, b: down_b },
            };
            check(
                what,
                &x,
                |x| feed_forward_block(x, &spec).unwrap(),
                |x| ops::feed_forward_block_composite(x, &spec).unwrap(),
            );
        }
        // Exact GELU has no fused kernel: the composite ops run instead.
        let spec = FeedForward {
            norm: rms,
            inner: FfnIn::Plain {
                w: plain(&wg, None),
                act: FfnAct::GeluErf,
            },
            down: Linear { w: &wd, b: None },
        };
        assert!(feed_forward_block(&x, &spec).unwrap().is_none());
    }

    #[test]
    fn trained_weight_takes_the_composite_path() {
        let (b, t, d, f) = (2, 3, 8, 10);
        let x = Var::from_tensor(&rand(&[b, t, d], 3, 1.0)).unwrap();
        let norm_w = Tensor::ones(d, DType::F32, &Device::Cpu).unwrap();
        let wg = Var::from_tensor(&rand(&[f, d], 50, 0.5)).unwrap();
        let wd = rand(&[d, f], 51, 0.5);
        let spec = FeedForward {
            norm: Norm::Rms {
                w: &norm_w,
                eps: 1e-5,
            },
            inner: FfnIn::Plain {
                w: Linear {
                    w: wg.as_tensor(),
                    b: None,
                },
                act: FfnAct::Relu,
            },
            down: Linear { w: &wd, b: None },
        };
        assert!(feed_forward_block(x.as_tensor(), &spec).unwrap().is_none());
        let y = ops::feed_forward_block(x.as_tensor(), &spec).unwrap();
        let grads = y.sum_all().unwrap().backward().unwrap();
        assert!(
            grads.get(wg.as_tensor()).is_some(),
            "the trained weight has a gradient"
        );
    }

    /// The forward-only op that fills a KV cache ([`attention_block_kv`]) against the cache
    /// path of single ops: the output (whole sequence and at rows) and the keys (rotated) and
    /// values `[B, H_kv, T, Dh]`, with a left-padded causal mask longer than a row block; a
    /// grouped-query rotary (Llama) and a GPT-2-style block. An input that needs a gradient
    /// gets `None`.
    #[test]
    fn prefill_with_kv_matches_cache_path() {
        let (b, t, d) = (3, ROW_BLOCK + 9, 24);
        let x = rand(&[b, t, d], 7, 1.0);
        // Row `i` has its first `3 i` positions padded.
        let mask: Vec<f32> = (0..b)
            .flat_map(|i| (0..t).map(move |j| if j < 3 * i { 0.0 } else { 1.0 }))
            .collect();
        let mask = Tensor::from_vec(mask, (b, t), &Device::Cpu).unwrap();
        let causal = attention_bias(&mask, t, true).unwrap(); // [B, 1, T, T]
        let check_kv = |what: &str, spec: &SelfAttention| {
            // The cache path: norm, projections, head split, rotation, then attention.
            let n = match spec.norm {
                Norm::Rms { w, eps } => ops::rms_norm(&x, w, eps).unwrap(),
                Norm::Layer { w, b, eps } => ops::layer_norm(&x, w, b, eps).unwrap(),
            };
            let proj = |l: &Linear| {
                let y = ops::linear(&n, l.w, l.b).unwrap();
                ops::split_heads(&y, spec.kv_heads).unwrap()
            };
            let (mut k, v) = (proj(&spec.k), proj(&spec.v));
            if let Some(r) = &spec.rope {
                k = ops::rope(&k, r.cos, r.sin, r.interleaved).unwrap();
            }
            let y_ref = ops::attention_block_composite(&x, spec).unwrap();
            let (y, k_got, v_got) = attention_block_kv(&x, spec, None)
                .unwrap()
                .unwrap_or_else(|| panic!("{what}: fused path not taken"));
            assert_rel(&format!("{what}: output"), &y, &y_ref, 1e-5);
            assert_rel(&format!("{what}: keys"), &k_got, &k, 1e-5);
            assert_rel(&format!("{what}: values"), &v_got, &v, 1e-5);
            let rows = Tensor::new(
                &[(t - 1) as u32, (2 * t - 1) as u32, (3 * t - 1) as u32],
                &Device::Cpu,
            )
            .unwrap();
            let (y, k_got, v_got) = attention_block_kv(&x, spec, Some(&rows))
                .unwrap()
                .unwrap_or_else(|| panic!("{what} at rows: fused path not taken"));
            let y_rows = y_ref
                .reshape((b * t, d))
                .unwrap()
                .index_select(&rows, 0)
                .unwrap()
                .unsqueeze(0)
                .unwrap();
            assert_rel(&format!("{what} at rows: output"), &y, &y_rows, 1e-5);
            assert_rel(&format!("{what} at rows: keys"), &k_got, &k, 1e-5);
            assert_rel(&format!("{what} at rows: values"), &v_got, &v, 1e-5);
            let xv = Var::from_tensor(&x).unwrap();
            assert!(attention_block_kv(xv.as_tensor(), spec, None)
                .unwrap()
                .is_none());
        };
        // Llama-style: RMSNorm, grouped-query attention, rotary in both layouts.
        let (h, hkv, dh) = (6, 2, 4);
        let w = attn_weights(d, h, hkv, dh, 70);
        let (cos, sin) = ops::rope_tables(dh, 10000.0, 0, t, &Device::Cpu).unwrap();
        for interleaved in [false, true] {
            let lin = |p| self::tests::lin(p, interleaved);
            let spec = SelfAttention {
                norm: Norm::Rms {
                    w: &w.norm_w,
                    eps: 1e-5,
                },
                q: lin(&w.q),
                k: lin(&w.k),
                v: lin(&w.v),
                o: Linear { w: &w.o.0, b: None },
                heads: h,
                kv_heads: hkv,
                head_dim: dh,
                rope: Some(Rotary {
                    cos: &cos,
                    sin: &sin,
                    interleaved,
                }),
                bias: &causal,
                scale: 0.5,
            };
            check_kv(&format!("llama-style (interleaved {interleaved})"), &spec);
        }
        // GPT-2-style: LayerNorm, biases everywhere, no rotary.
        let (h, dh) = (3, 8);
        let w = attn_weights(d, h, h, dh, 80);
        let lin = |p| self::tests::lin(p, true);
        let spec = SelfAttention {
            norm: Norm::Layer {
                w: &w.norm_w,
                b: &w.norm_b,
                eps: 1e-5,
            },
            q: lin(&w.q),
            k: lin(&w.k),
            v: lin(&w.v),
            o: lin(&w.o),
            heads: h,
            kv_heads: h,
            head_dim: dh,
            rope: None,
            bias: &causal,
            scale: 0.3,
        };
        check_kv("gpt2-style", &spec);
    }
}
