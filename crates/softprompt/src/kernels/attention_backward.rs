//! The backward of the whole-sequence attention op (see [`super::attention`]): per (batch
//! row, kv head), blocks of query rows against the keys they can see, products into shared
//! gradient buffers at disjoint elements.

use super::attention::{Activations, AttentionOp, Operands, QkvGrads, ROW_BLOCK};
use super::cpu::{Result, SharedOut};
use super::gemm::{gemm_shared, input_grad, MatLayout, MatRef, Threads};
use super::rope::rotate_rows;
use super::softmax::softmax_bwd_row;
use rayon::prelude::*;

impl AttentionOp {
    /// The backward of the whole-sequence forward: `x`, `dy` `[B*T, D]` -> `dx`.
    pub(super) fn backward_all(
        &self,
        xd: &[f32],
        dyd: &[f32],
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
        let (r, nq, nkv, group) = (b * t, h * dh, hkv * dh, h / hkv);

        let mut dm = vec![0f32; r * nq]; // d merged = dy @ Wo   [R, H*Dh]
        input_grad(&mut dm, false, dyd, ops.o.w()?, (r, d, nq))?;
        let mut grads = QkvGrads::zeros(r, r, nq, nkv);
        let [oq, ok, ov] = grads.shared();
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
                    let bsel = self.bias_matrix(bi, hi);
                    let dkv = MatLayout::rows(row0 * nkv + kv * dh, nkv);
                    for (blk, r0) in (0..t).step_by(ROW_BLOCK).enumerate() {
                        let (r1, keys) = ((r0 + ROW_BLOCK).min(t), self.keys(bsel, blk));
                        let rows = r1 - r0;
                        let da = MatLayout::rows((row0 + r0) * nq + hi * dh, nq); // [rows, Dh] in dm
                                                                                  // SAFETY: `ds` is local; rows `bi*T..`, columns of head `hi` (dq) and
                                                                                  // of kv head `kv` (dk, dv) belong to this task only.
                        unsafe {
                            // dP = dA @ V^T
                            gemm_shared(
                                SharedOut::new(&mut ds),
                                MatLayout::rows(0, t),
                                false,
                                MatRef(&dm, da),
                                MatRef(v, MatLayout::t(kv_off, dh)),
                                (rows, keys, dh),
                                Threads::Calling,
                            )?;
                            for i in 0..rows {
                                let pr = p_off + (r0 + i) * t;
                                let g = &mut ds[i * t..i * t + keys];
                                softmax_bwd_row(&p[pr..pr + keys], g, self.scale);
                            }
                            // dQ = dS @ K, dK += dS^T @ Q, dV += P^T @ dA (dk, dv start at 0)
                            gemm_shared(
                                oq,
                                MatLayout::rows((row0 + r0) * nq + hi * dh, nq),
                                false,
                                MatRef(&ds, MatLayout::rows(0, t)),
                                MatRef(k, MatLayout::rows(kv_off, dh)),
                                (rows, dh, keys),
                                Threads::Calling,
                            )?;
                            gemm_shared(
                                ok,
                                dkv,
                                true,
                                MatRef(&ds, MatLayout::t(0, t)),
                                MatRef(q, MatLayout::rows(q_off + r0 * dh, dh)),
                                (keys, dh, rows),
                                Threads::Calling,
                            )?;
                            gemm_shared(
                                ov,
                                dkv,
                                true,
                                MatRef(p, MatLayout::t(p_off + r0 * t, t)),
                                MatRef(&dm, da),
                                (keys, dh, rows),
                                Threads::Calling,
                            )?;
                        }
                    }
                }
                Ok(())
            })?;
        drop(dm);
        let QkvGrads { mut dq, dk, dv } = grads;
        if let Some(rope) = ops.rope()? {
            rotate_rows(&mut dq, (nq, dh), rope, true, |i| i % t);
        }
        let dq = ops.head_norm_backward(0, q_proj, dq, dh)?;
        // d norm = dk @ Wk + dv @ Wv + dq @ Wq   [R, D]
        let mut dn = self.kv_input_grad(dk, &dv, k_proj, ops)?;
        input_grad(&mut dn, true, &dq, ops.q.w()?, (r, nq, d))?;
        ops.norm.backward_rows_add(xd, &dn, dyd, d)
    }
}
