//! The attention op at chosen rows only (see [`super::attention::attention_block`]): keys and
//! values from every position, queries, attention and the output projection at `M` rows.

use super::attention::{Activations, AttentionOp, Dims, Operands, QkvGrads};
use super::cpu::Result;
use super::gemm::{axpy, dot, gather, input_grad, project};
use super::rope::rotate_rows;
use super::softmax::{softmax_bwd_row, softmax_row};
use rayon::prelude::*;

impl AttentionOp {
    /// The forward at `rows` only, given the normed input `n [B*T, D]`: `y [M, D]` and what
    /// [`Self::backward_rows`] needs.
    pub(super) fn forward_rows(
        &self,
        x: &[f32],
        n: Vec<f32>,
        rows: &[usize],
        ops: &Operands,
    ) -> Result<(Vec<f32>, Activations)> {
        let Dims {
            t, d, h, hkv, dh, ..
        } = self.dims;
        let (m, nq, group) = (rows.len(), h * dh, h / hkv);
        let bias = ops.bias.f32()?;
        let (k, v, k_proj) = self.keys_values(&n, ops)?; // [B, Hkv, T, Dh]
        let q = project(&gather(&n, rows, d), m, d, &ops.q)?; // [M, H*Dh]
        let (mut q, q_proj) = ops.head_norm(0, q, dh, self.keep)?;
        drop(n);
        if let Some(rope) = ops.rope()? {
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
                    let b_row = self.bias_matrix(bi, hi) * t * t + ti * t;
                    s.iter_mut()
                        .zip(&bias[b_row..b_row + t])
                        .for_each(|(s, &bv)| *s = *s * self.scale + bv);
                    softmax_row(s);
                    let oh = &mut om[hi * dh..(hi + 1) * dh];
                    for (j, &pj) in s.iter().enumerate() {
                        axpy(oh, pj, &v[kv_off + j * dh..kv_off + (j + 1) * dh]);
                    }
                }
            });
        let y = self.output(&gather(x, rows, d), &merged, ops)?; // [M, D]
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

    /// The backward of [`Self::forward_rows`]: `x [B*T, D]`, `dy [M, D]` -> `dx [B*T, D]`.
    pub(super) fn backward_rows(
        &self,
        xd: &[f32],
        dyd: &[f32],
        rows: &[usize],
        saved: &Activations,
        ops: &Operands,
    ) -> Result<Vec<f32>> {
        let Activations {
            q,
            k,
            v,
            p,
            q_proj,
            k_proj,
        } = saved;
        let (b, t, d, h, hkv, dh) = self.dims.all();
        let (r, m, nq, nkv, group) = (b * t, rows.len(), h * dh, hkv * dh, h / hkv);
        let mut dm = vec![0f32; m * nq]; // d merged = dy @ Wo   [M, H*Dh]
        input_grad(&mut dm, false, dyd, ops.o.w()?, (m, d, nq))?;
        let mut by_batch = vec![Vec::new(); b];
        for (i, &row) in rows.iter().enumerate() {
            by_batch[row / t].push(i);
        }
        let mut grads = QkvGrads::zeros(m, r, nq, nkv);
        let [out_q, out_k, out_v] = grads.shared();
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
                        softmax_bwd_row(ph, &mut ds, self.scale);
                        // SAFETY: query row `i` (of batch row `bi`) at head `hi` (of kv head
                        // `kv`), and the keys/values of kv head `kv` in batch row `bi`: this
                        // task only.
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
        let QkvGrads { mut dq, dk, dv } = grads;
        if let Some(rope) = ops.rope()? {
            rotate_rows(&mut dq, (nq, dh), rope, true, |i| rows[i] % t);
        }
        let dq = ops.head_norm_backward(0, q_proj, dq, dh)?;
        // d norm = dk @ Wk + dv @ Wv at every position, + dq @ Wq at the rows   [B*T, D]
        let mut dn = self.kv_input_grad(dk, &dv, k_proj, ops)?;
        let mut dnq = vec![0f32; m * d];
        input_grad(&mut dnq, false, &dq, ops.q.w()?, (m, nq, d))?;
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
        ops.norm.backward_rows_add(xd, &dn, &dy_all, d)
    }
}
