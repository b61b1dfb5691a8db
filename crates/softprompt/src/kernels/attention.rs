//! The attention sub-block of a pre-norm layer as one op with a hand-written backward:
//! `x + o(attention(rope(q(n)), rope(k(n)), v(n)))` with `n = norm(x)`.
//!
//! Composed of single ops, candle's autograd graph keeps every intermediate alive until the
//! step ends (the norm output, the projections before and after the head split and the
//! rotation, the scores, the merged heads, ...) and seeds and sums gradients with extra
//! full-size buffers. This op keeps exactly what its backward reads (the rotated queries and
//! keys, the values and the probabilities), recomputes the norm, and calls the sgemm kernel
//! with strides that fold the head split/merge, bias and residual into the products. A
//! forward-only call ([`attention_block_kv`]) also returns the keys and values it computed, for
//! a KV cache. The output at chosen rows only is in [`super::attention_rows`].

use super::cpu::{poisoned, ReadLock, Result, SharedOut};
use super::gemm::{
    add_product_t, gemm_shared, input_grad, project, residual, MatLayout, MatRef, ProjLock,
    ProjWeights, Threads,
};
use super::norm::{NormLock, NormWeights};
use super::rope::{rotate_rows, to_heads, RopeData};
use super::softmax::softmax_row;
use super::Kernels;
use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};
use rayon::prelude::*;
use std::sync::Mutex;

/// Rotary tables `cos`, `sin` `[T, Dh/2]` for the positions of the block's input, and the
/// pair layout (`interleaved`: GGML's adjacent pairs).
#[derive(Clone, Debug)]
pub(crate) struct RopeTables {
    pub cos: Tensor,
    pub sin: Tensor,
    pub interleaved: bool,
}

/// The operands of the attention op: `x [B, T, D]`, `q [H*Dh, D]`, `k`, `v [H_kv*Dh, D]`,
/// `o [D, H*Dh]`; `bias` (additive, no gradient) `[B or 1, H or 1, T, T]`; `scale` multiplies
/// the scores.
#[derive(Clone, Debug)]
pub(crate) struct AttentionArgs {
    pub norm: NormWeights,
    pub q: ProjWeights,
    pub k: ProjWeights,
    pub v: ProjWeights,
    pub o: ProjWeights,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub rope: Option<RopeTables>,
    /// Per-head norms `[Dh]` of the projected queries and keys, before the rotation (Qwen3).
    pub head_norms: Option<[NormWeights; 2]>,
    pub bias: Tensor,
    pub scale: f64,
}

impl AttentionArgs {
    /// Whether the op runs on `x` under the policy `kernels` (see [`Kernels::blocks_apply`]).
    pub(crate) fn applies(&self, x: &Tensor, kernels: Kernels) -> bool {
        let mut frozen = Vec::new();
        self.norm.tensors(&mut frozen);
        for p in [&self.q, &self.k, &self.v, &self.o] {
            p.tensors(&mut frozen);
        }
        if let Some(r) = &self.rope {
            frozen.extend([&r.cos, &r.sin]);
        }
        for n in self.head_norms.iter().flatten() {
            n.tensors(&mut frozen);
        }
        frozen.push(&self.bias);
        kernels.blocks_apply(x, &frozen)
    }
}

/// The sub-block; differentiable with respect to `x`. The caller checks
/// [`AttentionArgs::applies`]; errors on inconsistent shapes.
///
/// With `rows` (u32 `[M]`, indices into the flattened `B*T` positions) the output is
/// `[1, M, D]`, the sub-block at those positions only: keys and values still come from every
/// position, but queries, attention and the output projection run at the `M` rows (the last
/// layer of a model whose logits are wanted at label positions only).
pub(crate) fn attention_block(
    x: &Tensor,
    args: AttentionArgs,
    rows: Option<&Tensor>,
) -> Result<Tensor> {
    let op = AttentionOp::new(x, args, rows, x.track_op())?;
    x.contiguous()?.apply_op1(op)
}

/// [`attention_block`] forward only, for a pass that fills an empty KV cache: `(y, k, v)` with
/// the block output and the keys (rotated, when the block has rotary tables) and values of
/// every position, `[B, H_kv, T, Dh]`. No autograd graph is built.
pub(crate) fn attention_block_kv(
    x: &Tensor,
    args: AttentionArgs,
    rows: Option<&Tensor>,
) -> Result<(Tensor, Tensor, Tensor)> {
    let op = AttentionOp::new(x, args, rows, false)?;
    let x = x.contiguous()?;
    let (y, saved) = {
        let lock = ReadLock::new(&x);
        op.forward(lock.f32()?)?
    };
    let Dims {
        b, t, d, hkv, dh, ..
    } = op.dims;
    let device = x.device();
    let y = match &op.rows {
        Some(r) => Tensor::from_vec(y, (1, r.len(), d), device)?,
        None => Tensor::from_vec(y, (b, t, d), device)?,
    };
    let k = Tensor::from_vec(saved.k, (b, hkv, t, dh), device)?;
    let v = Tensor::from_vec(saved.v, (b, hkv, t, dh), device)?;
    Ok((y, k, v))
}

/// Batch, positions, width, heads, kv heads, head dim.
#[derive(Clone, Copy)]
pub(super) struct Dims {
    pub b: usize,
    pub t: usize,
    pub d: usize,
    pub h: usize,
    pub hkv: usize,
    pub dh: usize,
}

impl Dims {
    /// `(B, T, D, H, H_kv, Dh)`
    pub fn all(self) -> (usize, usize, usize, usize, usize, usize) {
        (self.b, self.t, self.d, self.h, self.hkv, self.dh)
    }
}

/// What the forward computed and the backward reads: rotated queries `[B, H, T, Dh]`, rotated
/// keys and values `[B, H_kv, T, Dh]`, probabilities `[B, H, T, T]` (empty when not kept).
/// At rows: queries `[M, H*Dh]` and probabilities `[M, H, T]`. With head norms, also the
/// projections they normed, `q_proj [B*T or M, H*Dh]` and `k_proj [B*T, H_kv*Dh]` (else
/// empty).
pub(super) struct Activations {
    pub q: Vec<f32>,
    pub k: Vec<f32>,
    pub v: Vec<f32>,
    pub p: Vec<f32>,
    pub q_proj: Vec<f32>,
    pub k_proj: Vec<f32>,
}

pub(super) struct AttentionOp {
    pub args: AttentionArgs,
    /// Output only at these flattened positions (see [`attention_block`]).
    pub rows: Option<Vec<usize>>,
    /// `(Bb, Hb)` of the bias `[Bb, Hb, T, T]`, `Bb` in `{1, B}`, `Hb` in `{1, H}`.
    bias_dims: (usize, usize),
    /// Per bias matrix (`Bb * Hb`) and block of [`ROW_BLOCK`] query rows: how many leading keys
    /// any row of the block can see (see [`key_limits`]).
    key_limits: Vec<usize>,
    pub dims: Dims,
    pub scale: f32,
    /// Keep the [`Activations`] for the backward (the input takes part in a gradient
    /// computation).
    pub(super) keep: bool,
    saved: Mutex<Option<Activations>>,
}

/// Gradients of the rotated queries `[M, H*Dh]` and of the keys and values
/// `[B*T, H_kv*Dh]`, written by parallel tasks at disjoint elements.
pub(super) struct QkvGrads {
    pub dq: Vec<f32>,
    pub dk: Vec<f32>,
    pub dv: Vec<f32>,
}

impl QkvGrads {
    /// Zeros for `m` query rows and `r` key rows.
    pub fn zeros(m: usize, r: usize, nq: usize, nkv: usize) -> Self {
        QkvGrads {
            dq: vec![0f32; m * nq],
            dk: vec![0f32; r * nkv],
            dv: vec![0f32; r * nkv],
        }
    }

    /// The three buffers as shared outputs for the tasks.
    pub fn shared(&mut self) -> [SharedOut; 3] {
        [
            SharedOut::new(&mut self.dq),
            SharedOut::new(&mut self.dk),
            SharedOut::new(&mut self.dv),
        ]
    }
}

/// Read locks on the operands of an [`AttentionOp`].
pub(super) struct Operands<'a> {
    pub norm: NormLock<'a>,
    pub q: ProjLock<'a>,
    pub k: ProjLock<'a>,
    pub v: ProjLock<'a>,
    pub o: ProjLock<'a>,
    rope: Option<RopeLock<'a>>,
    /// q and k head norms.
    head_norms: Option<[NormLock<'a>; 2]>,
    pub bias: ReadLock<'a>,
}

/// Read locks on the rotary tables.
struct RopeLock<'a> {
    cos: ReadLock<'a>,
    sin: ReadLock<'a>,
    interleaved: bool,
}

impl Operands<'_> {
    /// `proj [R, heads*Dh]` with the head norm `which` (0: queries, 1: keys) applied to
    /// every head, and the projection itself when `keep` (empty otherwise); `proj` as it is
    /// without head norms.
    pub fn head_norm(
        &self,
        which: usize,
        proj: Vec<f32>,
        dh: usize,
        keep: bool,
    ) -> Result<(Vec<f32>, Vec<f32>)> {
        match &self.head_norms {
            Some(norms) => {
                let normed = norms[which].forward_rows(&proj, dh)?;
                Ok((normed, if keep { proj } else { Vec::new() }))
            }
            None => Ok((proj, Vec::new())),
        }
    }

    /// The gradient of the projection from that of the normed one (`dp`, `[R, heads*Dh]`),
    /// given the projection `proj` kept by [`Self::head_norm`]; `dp` without head norms.
    pub fn head_norm_backward(
        &self,
        which: usize,
        proj: &[f32],
        dp: Vec<f32>,
        dh: usize,
    ) -> Result<Vec<f32>> {
        match &self.head_norms {
            Some(norms) => norms[which].backward_rows(proj, &dp, None, dh),
            None => Ok(dp),
        }
    }

    /// `cos`, `sin` `[T, Dh/2]` and the layout, when the block rotates.
    pub fn rope(&self) -> Result<Option<RopeData<'_>>> {
        Ok(match &self.rope {
            Some(r) => Some((r.cos.f32()?, r.sin.f32()?, r.interleaved)),
            None => None,
        })
    }
}

/// Query rows per block of the whole-sequence attention.
pub(crate) const ROW_BLOCK: usize = 32;

/// For every bias matrix `[T, T]` in `bias [M, T, T]` and every block of [`ROW_BLOCK`] query
/// rows: one past the last key that some row of the block does not mask (bias above
/// `-MASK_VALUE / 2`), or `T` when a row masks every key (its softmax is uniform over all
/// of them). Past that, the scores get `exp(-1e30) = 0` exactly, so the blocks skip those
/// keys: a causal mask halves the attention products.
fn key_limits(bias: &[f32], m: usize, t: usize) -> Vec<usize> {
    let masked = -(crate::model::MASK_VALUE as f32) / 2.0;
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
    /// Checks the shapes of `x` and `args`; `keep`: save what the backward reads.
    fn new(x: &Tensor, args: AttentionArgs, rows: Option<&Tensor>, keep: bool) -> Result<Self> {
        let (b, t, d) = x.dims3()?;
        let (h, hkv, dh) = (args.heads, args.kv_heads, args.head_dim);
        let bad = |msg: String| -> Result<Self> { candle_core::bail!("attention block: {msg}") };
        if h == 0 || hkv == 0 || h % hkv != 0 || dh == 0 {
            return bad(format!("{h} heads, {hkv} kv heads, head dim {dh}"));
        }
        args.norm.check(d)?;
        for n in args.head_norms.iter().flatten() {
            n.check(dh)?;
        }
        let dims = [
            args.q.dims("q")?,
            args.k.dims("k")?,
            args.v.dims("v")?,
            args.o.dims("o")?,
        ];
        if dims != [(h * dh, d), (hkv * dh, d), (hkv * dh, d), (d, h * dh)] {
            return bad(format!(
                "projection shapes {dims:?} for D {d}, {h}/{hkv} heads of {dh}"
            ));
        }
        if let Some(r) = &args.rope {
            if dh % 2 != 0 || r.cos.dims() != [t, dh / 2] || r.sin.dims() != [t, dh / 2] {
                return bad(format!(
                    "rotary tables {:?} for T {t}, head dim {dh}",
                    r.cos.dims()
                ));
            }
        }
        let bd = args.bias.dims().to_vec();
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
        let key_limits = key_limits(ReadLock::new(&args.bias).f32()?, bd[0] * bd[1], t);
        Ok(AttentionOp {
            rows,
            bias_dims: (bd[0], bd[1]),
            key_limits,
            dims: Dims {
                b,
                t,
                d,
                h,
                hkv,
                dh,
            },
            scale: args.scale as f32,
            args,
            keep,
            saved: Mutex::new(None),
        })
    }

    /// Keys to compute for bias matrix `bsel` and query block `blk`.
    pub(super) fn keys(&self, bsel: usize, blk: usize) -> usize {
        let t = self.dims.t;
        self.key_limits
            .get(bsel * t.div_ceil(ROW_BLOCK) + blk)
            .copied()
            .unwrap_or(t)
    }

    /// Index of the bias matrix `[T, T]` that batch row `bi`, head `hi` adds.
    pub(super) fn bias_matrix(&self, bi: usize, hi: usize) -> usize {
        let (bb, hb) = self.bias_dims;
        (if bb == 1 { 0 } else { bi }) * hb + if hb == 1 { 0 } else { hi }
    }

    pub(super) fn lock(&self) -> Result<Operands<'_>> {
        let a = &self.args;
        Ok(Operands {
            norm: a.norm.lock(),
            q: a.q.lock()?,
            k: a.k.lock()?,
            v: a.v.lock()?,
            o: a.o.lock()?,
            rope: a.rope.as_ref().map(|r| RopeLock {
                cos: ReadLock::new(&r.cos),
                sin: ReadLock::new(&r.sin),
                interleaved: r.interleaved,
            }),
            head_norms: a.head_norms.as_ref().map(|[q, k]| [q.lock(), k.lock()]),
            bias: ReadLock::new(&a.bias),
        })
    }

    /// The output (`[B*T, D]`, or `[M, D]` at rows) and the activations of `x [B*T, D]`.
    pub(super) fn forward(&self, x: &[f32]) -> Result<(Vec<f32>, Activations)> {
        let ops = self.lock()?;
        let n = ops.norm.forward_rows(x, self.dims.d)?; // [R, D]
        match &self.rows {
            Some(rows) => self.forward_rows(x, n, rows, &ops),
            None => self.forward_all(x, n, &ops),
        }
    }

    /// The keys and values `[B, H_kv, T, Dh]` of the normed input `n [B*T, D]`, keys
    /// head-normed (kept projection returned third, see [`Operands::head_norm`]) and rotated.
    pub(super) fn keys_values(
        &self,
        n: &[f32],
        ops: &Operands,
    ) -> Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
        let Dims {
            b, t, d, hkv, dh, ..
        } = self.dims;
        let r = b * t;
        let (k, k_proj) = ops.head_norm(1, project(n, r, d, &ops.k)?, dh, self.keep)?;
        let k = to_heads(&k, (b, t, hkv, dh), ops.rope()?);
        let v = to_heads(&project(n, r, d, &ops.v)?, (b, t, hkv, dh), None);
        Ok((k, v, k_proj))
    }

    /// `y = x (+ b_o) + merged @ Wo^T` for `x`, `y [M, D]`, `merged [M, H*Dh]`.
    pub(super) fn output(&self, x: &[f32], merged: &[f32], ops: &Operands) -> Result<Vec<f32>> {
        let Dims { d, h, dh, .. } = self.dims;
        let mut y = residual(x, d, ops.o.b()?);
        add_product_t(&mut y, merged, ops.o.w()?, true, (x.len() / d, d, h * dh))?;
        Ok(y)
    }

    /// The input gradient of the keys' and values' projections, `dk @ Wk + dv @ Wv`
    /// (`dk`, `dv` `[B*T, H_kv*Dh]`) -> `[B*T, D]`, unrotating `dk` and taking it through the
    /// head norm (`k_proj`: the kept projection) first.
    pub(super) fn kv_input_grad(
        &self,
        mut dk: Vec<f32>,
        dv: &[f32],
        k_proj: &[f32],
        ops: &Operands,
    ) -> Result<Vec<f32>> {
        let Dims {
            b, t, d, hkv, dh, ..
        } = self.dims;
        let (r, nkv) = (b * t, hkv * dh);
        if let Some(rope) = ops.rope()? {
            rotate_rows(&mut dk, (nkv, dh), rope, true, |i| i % t);
        }
        let dk = ops.head_norm_backward(1, k_proj, dk, dh)?;
        let mut dn = vec![0f32; r * d];
        input_grad(&mut dn, false, &dk, ops.k.w()?, (r, nkv, d))?;
        input_grad(&mut dn, true, dv, ops.v.w()?, (r, nkv, d))?;
        Ok(dn)
    }

    fn forward_all(
        &self,
        x: &[f32],
        n: Vec<f32>,
        ops: &Operands,
    ) -> Result<(Vec<f32>, Activations)> {
        let (b, t, d, h, hkv, dh) = self.dims.all();
        let (r, nq, group) = (b * t, h * dh, h / hkv);
        let bias = ops.bias.f32()?;
        let (q, q_proj) = ops.head_norm(0, project(&n, r, d, &ops.q)?, dh, self.keep)?;
        let q = to_heads(&q, (b, t, h, dh), ops.rope()?); // [B,H,T,Dh]
        let (k, v, k_proj) = self.keys_values(&n, ops)?; // [B,Hkv,T,Dh]
        drop(n);

        // Per (row, kv head): scores of its `group` query heads, softmax, `P V` into the
        // merged `[B*T, H*Dh]` layout.
        // Kept for the backward: all of them; otherwise one `[T, T]` scratch per task.
        let mut p = vec![0f32; if self.keep { b * h * t * t } else { 0 }]; // [B, H, T, T]
        let all_p = SharedOut::new(&mut p);
        let mut merged = vec![0f32; r * nq];
        let out = SharedOut::new(&mut merged);
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
                    let bsel = self.bias_matrix(bi, hi);
                    let b_off = bsel * t * t;
                    // Blocks of query rows, each against the keys its rows can see; the
                    // probabilities past them stay 0.
                    for (blk, r0) in (0..t).step_by(ROW_BLOCK).enumerate() {
                        let (r1, keys) = ((r0 + ROW_BLOCK).min(t), self.keys(bsel, blk));
                        // SAFETY: `ph` is this task's own chunk; rows `bi*T + r0..r1`, columns
                        // of head `hi` of `merged` are written by this task only.
                        unsafe {
                            gemm_shared(
                                SharedOut::new(ph),
                                MatLayout::rows(r0 * t, t),
                                false,
                                MatRef(&q, MatLayout::rows(q_off + r0 * dh, dh)),
                                MatRef(&k, MatLayout::t(kv_off, dh)),
                                (r1 - r0, keys, dh),
                                Threads::Calling,
                            )?;
                            for i in r0..r1 {
                                let row = &mut ph[i * t..i * t + keys];
                                let brow = &bias[b_off + i * t..b_off + i * t + keys];
                                row.iter_mut()
                                    .zip(brow)
                                    .for_each(|(s, &bv)| *s = *s * self.scale + bv);
                                softmax_row(row);
                            }
                            gemm_shared(
                                out,
                                MatLayout::rows((bi * t + r0) * nq + hi * dh, nq),
                                false,
                                MatRef(ph, MatLayout::rows(r0 * t, t)),
                                MatRef(&v, MatLayout::rows(kv_off, dh)),
                                (r1 - r0, dh, keys),
                                Threads::Calling,
                            )?;
                        }
                    }
                }
                Ok(())
            })?;
        let y = self.output(x, &merged, ops)?; // [R, D]
        let saved = Activations {
            q,
            k,
            v,
            p,
            q_proj,
            k_proj,
        };
        Ok((y, saved))
    }
}

impl CustomOp1 for AttentionOp {
    fn name(&self) -> &'static str {
        "fused-attention-block"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = super::cpu::data(xs, xl, "attention block")?;
        let (y, saved) = self.forward(x)?;
        if self.keep {
            *self.saved.lock().map_err(|_| poisoned())? = Some(saved);
        }
        let shape = match &self.rows {
            Some(rows) => Shape::from((1, rows.len(), self.dims.d)),
            None => xl.shape().clone(),
        };
        Ok((CpuStorage::F32(y), shape))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        let saved = self.saved.lock().map_err(|_| poisoned())?;
        let Some(saved) = saved.as_ref() else {
            candle_core::bail!("attention block: backward without saved activations");
        };
        let dy = dy.contiguous()?;
        let (x_lock, dy_lock) = (ReadLock::new(x), ReadLock::new(&dy));
        let (xd, dyd) = (x_lock.f32()?, dy_lock.f32()?);
        let ops = self.lock()?;
        let dx = match &self.rows {
            Some(rows) => self.backward_rows(xd, dyd, rows, saved, &ops)?,
            None => self.backward_all(xd, dyd, saved, &ops)?,
        };
        Ok(Some(Tensor::from_vec(dx, x.shape(), x.device())?))
    }
}
