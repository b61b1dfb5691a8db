//! The element-wise and row-wise kernels against the same maths written with candle
//! primitives: forward values (1e-5 relative), gradients by candle's backward through the
//! primitive version, and gradients by central finite differences.

use super::assert_rel;
use crate::kernels::activation::{self, Act};
use crate::kernels::{loss, norm, rope, softmax, Kernels};
use crate::model::{attention_bias, ops};
use candle_core::{DType, Device, Tensor, Var, D};

const FWD_REL: f32 = 1e-5;
const GRAD_REL: f32 = 1e-4;

fn randn(shape: &[usize], seed: u64) -> Tensor {
    // A small deterministic generator: tests must not depend on candle's RNG.
    let n: usize = shape.iter().product();
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let v: Vec<f32> = (0..n)
        .map(|_| {
            let mut u = 0f32;
            for _ in 0..4 {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                u += (s >> 40) as f32 / (1u64 << 24) as f32;
            }
            (u - 2.0) * 1.7
        })
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

/// `sum(y * r)` for a fixed random `r`: a scalar loss whose gradient wrt `y` is `r`.
fn probe(y: &Tensor, seed: u64) -> Tensor {
    let r = randn(y.dims(), seed);
    (y * r).unwrap().sum_all().unwrap()
}

/// Checks `fused(inputs)` against `reference(inputs)`: forward values, gradients with respect
/// to every input (candle backward through the reference), and central finite differences of
/// the fused op on a few entries of every input.
fn check(
    what: &str,
    inputs: &[Tensor],
    fused: impl Fn(&[Tensor]) -> Tensor,
    reference: impl Fn(&[Tensor]) -> Tensor,
) {
    assert!(Kernels::fast().ops_apply(&inputs.iter().collect::<Vec<_>>()));
    let y_f = fused(inputs);
    let y_r = reference(inputs);
    assert_rel(&format!("{what} forward"), &y_f, &y_r, FWD_REL);

    let vars: Vec<Var> = inputs
        .iter()
        .map(|t| Var::from_tensor(t).unwrap())
        .collect();
    let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let g_f = probe(&fused(&ts), 7).backward().unwrap();
    let g_r = probe(&reference(&ts), 7).backward().unwrap();
    for (i, t) in ts.iter().enumerate() {
        let gf = g_f
            .get(t)
            .unwrap_or_else(|| panic!("{what}: no fused gradient for input {i}"));
        let gr = g_r.get(t).expect("reference gradient");
        assert_rel(&format!("{what} grad of input {i}"), gf, gr, GRAD_REL);

        // Central differences, Richardson-extrapolated, on the 3 largest entries and one
        // more; the loss is O(10), its f32 rounding ~1e-6 / h.
        let g = gf.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let gmax = g.iter().fold(0f32, |m, x| m.max(x.abs()));
        let mut order: Vec<usize> = (0..g.len()).collect();
        order.sort_by(|&a, &b| g[b].abs().total_cmp(&g[a].abs()));
        let x0 = inputs[i].flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let loss_at = |j: usize, delta: f32| -> f64 {
            let mut x = x0.clone();
            x[j] += delta;
            let mut args = inputs.to_vec();
            args[i] = Tensor::from_vec(x, inputs[i].dims(), &Device::Cpu).unwrap();
            probe(&fused(&args), 7).to_scalar::<f32>().unwrap() as f64
        };
        let h = 1e-2f32;
        for &j in order.iter().take(3).chain([&order[g.len() / 2]]) {
            let d1 = (loss_at(j, h) - loss_at(j, -h)) / (2.0 * h as f64);
            let d2 = (loss_at(j, 2.0 * h) - loss_at(j, -2.0 * h)) / (4.0 * h as f64);
            let fd = (4.0 * d1 - d2) / 3.0;
            assert!(
                (fd - g[j] as f64).abs() <= 2e-3 * gmax as f64,
                "{what}: input {i} entry {j}: finite difference {fd} vs backward {} (max |g| {gmax})",
                g[j]
            );
        }
    }
}

fn rms_norm_ref(x: &Tensor, w: &Tensor, eps: f64) -> Tensor {
    let ms = x.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
    let y = x
        .broadcast_div(&(ms + eps).unwrap().sqrt().unwrap())
        .unwrap();
    y.broadcast_mul(w).unwrap()
}

fn softmax_ref(x: &Tensor) -> Tensor {
    let max = x.max_keepdim(D::Minus1).unwrap().detach();
    let e = x.broadcast_sub(&max).unwrap().exp().unwrap();
    e.broadcast_div(&e.sum_keepdim(D::Minus1).unwrap()).unwrap()
}

#[test]
fn rms_norm_matches_composite() {
    let w = (randn(&[48], 2).abs().unwrap() + 0.5).unwrap();
    let x = randn(&[3, 5, 48], 1);
    check(
        "rms_norm",
        &[x],
        |a| norm::rms_norm(&a[0], &w, 1e-6).unwrap(),
        |a| rms_norm_ref(&a[0], &w, 1e-6),
    );
    // Large enough to run on the thread pool.
    let x = randn(&[64, 512], 3);
    let w = randn(&[512], 4);
    assert_rel(
        "rms_norm parallel",
        &norm::rms_norm(&x, &w, 1e-5).unwrap(),
        &rms_norm_ref(&x, &w, 1e-5),
        FWD_REL,
    );
}

#[test]
fn layer_norm_matches_composite() {
    let w = randn(&[40], 2);
    let b = randn(&[40], 3);
    let reference = |x: &Tensor| {
        let mean = x.mean_keepdim(D::Minus1).unwrap();
        let xc = x.broadcast_sub(&mean).unwrap();
        let var = xc.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
        let y = xc
            .broadcast_div(&(var + 1e-5).unwrap().sqrt().unwrap())
            .unwrap();
        y.broadcast_mul(&w).unwrap().broadcast_add(&b).unwrap()
    };
    check(
        "layer_norm",
        &[(randn(&[2, 7, 40], 1) + 0.3).unwrap()],
        |a| norm::layer_norm(&a[0], &w, &b, 1e-5).unwrap(),
        |a| reference(&a[0]),
    );
}

#[test]
fn softmax_with_scale_and_mask_matches_composite() {
    // Batch 2, 3 heads, 4 queries, 6 keys; row 1 has two padded keys; causal.
    let mask = Tensor::new(
        &[[1f32, 1., 1., 1., 1., 1.], [0., 0., 1., 1., 1., 1.]],
        &Device::Cpu,
    )
    .unwrap();
    let bias = attention_bias(&mask, 4, true).unwrap(); // [2, 1, 4, 6]
    let scale = 0.35;
    check(
        "softmax(scale, bias)",
        &[randn(&[2, 3, 4, 6], 5)],
        |a| softmax::softmax_scaled(&a[0], Some(&bias), scale).unwrap(),
        |a| softmax_ref(&(&a[0] * scale).unwrap().broadcast_add(&bias).unwrap()),
    );
    check(
        "softmax",
        &[randn(&[5, 9], 6)],
        |a| softmax::softmax_scaled(&a[0], None, 1.0).unwrap(),
        |a| softmax_ref(&a[0]),
    );
    // A per-head bias (T5's position bias plus mask), and a fully masked row (uniform).
    let pos = randn(&[1, 3, 4, 6], 8);
    let full = attention_bias(
        &Tensor::zeros((2, 6), DType::F32, &Device::Cpu).unwrap(),
        4,
        false,
    )
    .unwrap()
    .broadcast_add(&pos)
    .unwrap(); // [2, 3, 4, 6]
    let x = randn(&[2, 3, 4, 6], 9);
    let y = softmax::softmax_scaled(&x, Some(&full), 1.0).unwrap();
    assert_rel(
        "fully masked",
        &y,
        &softmax_ref(&(&x + &full).unwrap()),
        FWD_REL,
    );
    let mid = y
        .narrow(0, 1, 1)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert!(mid.iter().all(|p| (p - 1.0 / 6.0).abs() < 1e-6), "{mid:?}");
}

fn rope_ref(x: &Tensor, cos: &Tensor, sin: &Tensor, interleaved: bool) -> Tensor {
    let (b, h, t, d) = x.dims4().unwrap();
    let half = d / 2;
    let cos = cos.reshape((1, 1, t, half)).unwrap();
    let sin = sin.reshape((1, 1, t, half)).unwrap();
    let (x1, x2) = if interleaved {
        let p = x.reshape((b, h, t, half, 2)).unwrap();
        (
            p.narrow(4, 0, 1).unwrap().squeeze(4).unwrap(),
            p.narrow(4, 1, 1).unwrap().squeeze(4).unwrap(),
        )
    } else {
        (
            x.narrow(3, 0, half).unwrap(),
            x.narrow(3, half, half).unwrap(),
        )
    };
    let r1 = (x1.broadcast_mul(&cos).unwrap() - x2.broadcast_mul(&sin).unwrap()).unwrap();
    let r2 = (x2.broadcast_mul(&cos).unwrap() + x1.broadcast_mul(&sin).unwrap()).unwrap();
    if interleaved {
        Tensor::stack(&[&r1, &r2], 4)
            .unwrap()
            .reshape((b, h, t, d))
            .unwrap()
    } else {
        Tensor::cat(&[&r1, &r2], 3).unwrap()
    }
}

#[test]
fn rope_matches_composite_both_layouts() {
    let (cos, sin) = ops::rope_tables(8, 10000.0, 3, 5, &Device::Cpu).unwrap(); // [5, 4]
    for interleaved in [false, true] {
        check(
            &format!("rope interleaved={interleaved}"),
            &[randn(&[2, 3, 5, 8], 11)],
            |a| rope::rope(&a[0], &cos, &sin, interleaved).unwrap(),
            |a| rope_ref(&a[0], &cos, &sin, interleaved),
        );
    }
    // A strided input (heads split from [B, T, H*Dh] without a copy).
    let x = randn(&[2, 5, 3, 8], 12).transpose(1, 2).unwrap();
    assert_rel(
        "rope strided",
        &rope::rope(&x, &cos, &sin, false).unwrap(),
        &rope_ref(&x, &cos, &sin, false),
        FWD_REL,
    );
}

#[test]
fn activations_match_composite() {
    check(
        "gelu_tanh",
        &[randn(&[4, 33], 13)],
        |a| activation::act(&a[0], Act::GeluTanh).unwrap(),
        |a| a[0].gelu().unwrap(),
    );
    check(
        "silu(a) * b",
        &[randn(&[4, 33], 14), randn(&[4, 33], 15)],
        |a| activation::act_mul(&a[0], &a[1], Act::Silu).unwrap(),
        |a| (a[0].silu().unwrap() * &a[1]).unwrap(),
    );
    check(
        "gelu_tanh(a) * b",
        &[randn(&[3, 50], 16), randn(&[3, 50], 17)],
        |a| activation::act_mul(&a[0], &a[1], Act::GeluTanh).unwrap(),
        |a| (a[0].gelu().unwrap() * &a[1]).unwrap(),
    );
    // Large enough for several parallel chunks, with a short last one.
    let (a, b) = (randn(&[9000], 18), randn(&[9000], 19));
    assert_rel(
        "silu_mul parallel",
        &activation::act_mul(&a, &b, Act::Silu).unwrap(),
        &(a.silu().unwrap() * &b).unwrap(),
        FWD_REL,
    );
}

#[test]
fn token_nll_matches_composite() {
    let targets = Tensor::new(&[3u32, 0, 10, 7], &Device::Cpu).unwrap();
    let reference = |x: &Tensor| {
        let max = x.max_keepdim(D::Minus1).unwrap().detach();
        let s = x.broadcast_sub(&max).unwrap();
        let lse = s
            .exp()
            .unwrap()
            .sum_keepdim(D::Minus1)
            .unwrap()
            .log()
            .unwrap();
        let logp = s.broadcast_sub(&lse).unwrap();
        logp.gather(&targets.unsqueeze(1).unwrap(), 1)
            .unwrap()
            .squeeze(1)
            .unwrap()
            .neg()
            .unwrap()
    };
    check(
        "token_nll",
        &[randn(&[4, 11], 20)],
        |a| loss::token_nll(&a[0], &targets).unwrap(),
        |a| reference(&a[0]),
    );
    let bad = Tensor::new(&[3u32, 0, 11, 7], &Device::Cpu).unwrap();
    let err = loss::token_nll(&randn(&[4, 11], 20), &bad)
        .unwrap_err()
        .to_string();
    assert!(err.contains("outside the vocabulary"), "{err}");
}

/// `ops::attention` (grouped-query, scale, causal mask) takes the fused softmax; compare with
/// the composite formula, gradients for q, k and v.
#[test]
fn attention_matches_composite() {
    // No fully masked query row: there the output does not depend on q in f32 (the -1e30
    // bias swamps the scores) while the exact-arithmetic gradient is not zero.
    let mask = Tensor::new(
        &[[1f32, 1., 1., 1., 0.], [1., 1., 1., 1., 1.]],
        &Device::Cpu,
    )
    .unwrap();
    let bias = attention_bias(&mask, 5, true).unwrap(); // [2, 1, 5, 5]
    let scale = 0.5;
    let reference = |a: &[Tensor]| {
        // Repeat each kv head for its 2 query heads: [2, 2, 5, 8] -> [2, 4, 5, 8].
        let rep = |t: &Tensor| {
            let (b, h, s, d) = t.dims4().unwrap();
            t.unsqueeze(2)
                .unwrap()
                .broadcast_as((b, h, 2, s, d))
                .unwrap()
                .reshape((b, h * 2, s, d))
                .unwrap()
        };
        let (k, v) = (rep(&a[1]), rep(&a[2]));
        let s = (a[0].matmul(&k.t().unwrap().contiguous().unwrap()).unwrap() * scale).unwrap();
        softmax_ref(&s.broadcast_add(&bias).unwrap())
            .matmul(&v)
            .unwrap()
    };
    check(
        "attention",
        &[
            randn(&[2, 4, 5, 8], 21),
            randn(&[2, 2, 5, 8], 22),
            randn(&[2, 2, 5, 8], 23),
        ],
        |a| ops::attention(Kernels::fast(), &a[0], &a[1], &a[2], &bias, scale).unwrap(),
        reference,
    );
}

/// A trained norm weight (model tuning) takes the composite path and gets its gradient.
#[test]
fn trained_norm_weight_gets_a_gradient() {
    let w = Var::from_tensor(&randn(&[16], 30)).unwrap();
    let x = Var::from_tensor(&randn(&[3, 16], 31)).unwrap();
    let y = ops::rms_norm(Kernels::fast(), x.as_tensor(), w.as_tensor(), 1e-6).unwrap();
    let grads = probe(&y, 3).backward().unwrap();
    let gw = grads.get(w.as_tensor()).expect("the weight's gradient");
    let gw_ref = probe(&rms_norm_ref(x.as_tensor(), w.as_tensor(), 1e-6), 3)
        .backward()
        .unwrap();
    assert_rel(
        "weight grad",
        gw,
        gw_ref.get(w.as_tensor()).unwrap(),
        GRAD_REL,
    );
}
