//! The frozen-weight matmul (used by `ops::linear`): the same forward values and input
//! gradient as candle's plain matmul, no gradient computed for the frozen weight, the plain
//! path (weight gradients) when the weight is a variable.

use super::{assert_close, max_abs};
use crate::kernels::frozen_matmul;
use crate::model::ops;
use candle_core::{Device, Tensor, TensorId, Var};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::HashSet;

/// Uniform [-1, 1) values of a fixed seed.
fn rand_tensor(rng: &mut StdRng, shape: &[usize]) -> Tensor {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| rng.random::<f32>() * 2.0 - 1.0).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

/// (x shape, N): rank 2 and rank 3 inputs, odd sizes, and one SmolLM2-sized layer.
const CASES: &[(&[usize], usize)] = &[
    (&[1, 1], 1),
    (&[7, 5], 3),
    (&[37, 129], 65),
    (&[3, 14, 32], 64),
    (&[2, 9, 33], 17),
    (&[4, 21, 576], 1536),
];

#[test]
fn forward_matches_plain_matmul() {
    let mut rng = StdRng::seed_from_u64(1);
    for &(xs, n) in CASES {
        let k = xs[xs.len() - 1];
        let x = Var::from_tensor(&rand_tensor(&mut rng, xs)).unwrap();
        let w = rand_tensor(&mut rng, &[n, k]);
        let b = rand_tensor(&mut rng, &[n]);
        let rows: usize = xs[..xs.len() - 1].iter().product();
        let x2 = x.as_tensor().reshape((rows, k)).unwrap();
        assert!(
            frozen_matmul::applies(&x2, &w),
            "{xs:?} x [{n}, {k}]: frozen path expected"
        );

        let plain = x2.matmul(&w.t().unwrap()).unwrap(); // [rows, N]
        let tol = 1e-6 * max_abs(&plain).max(1.0);
        assert_close(
            &format!("matmul_t {xs:?} x [{n}, {k}]"),
            &frozen_matmul::matmul_t(&x2, &w).unwrap(),
            &plain,
            tol,
        );

        let mut out = xs.to_vec();
        *out.last_mut().unwrap() = n;
        let want = plain
            .broadcast_add(&b)
            .unwrap()
            .reshape(out.as_slice())
            .unwrap();
        let got = ops::linear(x.as_tensor(), &w, Some(&b)).unwrap();
        assert_eq!(got.dims(), out.as_slice());
        assert_close(&format!("linear {xs:?} x [{n}, {k}]"), &got, &want, tol);
    }
}

#[test]
fn strided_weight_and_input() {
    // A weight that is a transposed view and an input that is a column slice.
    let mut rng = StdRng::seed_from_u64(2);
    let w_kn = rand_tensor(&mut rng, &[24, 10]);
    let w = w_kn.t().unwrap(); // [10, 24], not contiguous
    let big = Var::from_tensor(&rand_tensor(&mut rng, &[6, 30])).unwrap();
    let x = big.as_tensor().narrow(1, 3, 24).unwrap(); // [6, 24], strided rows
    let plain = x.matmul(&w.t().unwrap()).unwrap();
    let got = frozen_matmul::matmul_t(&x, &w).unwrap();
    assert_close("strided", &got, &plain, 1e-6 * max_abs(&plain));
}

#[test]
fn grad_x_matches_plain_and_analytic() {
    let mut rng = StdRng::seed_from_u64(3);
    for &(xs, n) in CASES {
        let k = xs[xs.len() - 1];
        let x0 = rand_tensor(&mut rng, xs);
        let w = rand_tensor(&mut rng, &[n, k]);
        let b = rand_tensor(&mut rng, &[n]);
        let mut out = xs.to_vec();
        *out.last_mut().unwrap() = n;
        let c = rand_tensor(&mut rng, &out); // loss = sum(c * y), so dy = c

        let x = Var::from_tensor(&x0).unwrap();
        let y = ops::linear(x.as_tensor(), &w, Some(&b)).unwrap();
        let grads = (y * &c).unwrap().sum_all().unwrap().backward().unwrap();
        let got = grads.get(x.as_tensor()).expect("x has a gradient");

        // candle's plain matmul, differentiated by candle.
        let xp = Var::from_tensor(&x0).unwrap();
        let rows: usize = xs[..xs.len() - 1].iter().product();
        let yp = xp
            .as_tensor()
            .reshape((rows, k))
            .unwrap()
            .matmul(&w.t().unwrap())
            .unwrap()
            .broadcast_add(&b)
            .unwrap()
            .reshape(out.as_slice())
            .unwrap();
        let gp = (yp * &c).unwrap().sum_all().unwrap().backward().unwrap();
        let want = gp.get(xp.as_tensor()).unwrap();
        let tol = 1e-6 * max_abs(want).max(1.0);
        assert_close(&format!("dx vs plain {xs:?} x [{n}, {k}]"), got, want, tol);

        // By hand: dx = c @ w.
        let analytic = c
            .reshape((rows, n))
            .unwrap()
            .matmul(&w)
            .unwrap()
            .reshape(xs)
            .unwrap();
        assert_close(&format!("dx vs c @ w {xs:?}"), got, &analytic, tol);
    }
}

/// Ids of the gradient store that are not nodes of the graph that needs gradients: what the
/// backward computed for nothing.
fn wasted_grads(loss: &Tensor, grads: &candle_core::backprop::GradStore) -> usize {
    let tracked: HashSet<TensorId> = loss.sorted_nodes().iter().map(|t| t.id()).collect();
    grads.get_ids().filter(|id| !tracked.contains(id)).count()
}

#[test]
fn frozen_weight_gets_no_gradient() {
    let mut rng = StdRng::seed_from_u64(4);
    let x = Var::from_tensor(&rand_tensor(&mut rng, &[2, 5, 16])).unwrap();
    let w = rand_tensor(&mut rng, &[8, 16]);

    let loss = ops::linear(x.as_tensor(), &w, None)
        .unwrap()
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap();
    let grads = loss.backward().unwrap();
    assert!(grads.get(x.as_tensor()).is_some());
    assert!(grads.get(&w).is_none());
    assert_eq!(
        wasted_grads(&loss, &grads),
        0,
        "a gradient was computed for the frozen weight"
    );

    // The same check flags candle's plain matmul (it computes d(w^T)).
    let x2 = x.as_tensor().reshape((10, 16)).unwrap();
    let loss = x2
        .matmul(&w.t().unwrap())
        .unwrap()
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap();
    let grads = loss.backward().unwrap();
    assert_eq!(wasted_grads(&loss, &grads), 1);
}

#[test]
fn variable_weight_gets_gradient() {
    let mut rng = StdRng::seed_from_u64(5);
    let (m, k, n) = (6, 12, 5);
    let x = Var::from_tensor(&rand_tensor(&mut rng, &[m, k])).unwrap();
    let c = rand_tensor(&mut rng, &[m, n]);

    // Weight as a variable (model tuning): plain path, dW = c^T @ x.
    let w = Var::from_tensor(&rand_tensor(&mut rng, &[n, k])).unwrap();
    assert!(!frozen_matmul::applies(x.as_tensor(), w.as_tensor()));
    let y = ops::linear(x.as_tensor(), w.as_tensor(), None).unwrap();
    let grads = (y * &c).unwrap().sum_all().unwrap().backward().unwrap();
    let dw = grads
        .get(w.as_tensor())
        .expect("the variable weight has a gradient");
    let want = c.t().unwrap().matmul(x.as_tensor()).unwrap();
    assert_close("dW", dw, &want, 1e-6 * max_abs(&want));
    let dx = grads.get(x.as_tensor()).expect("x has a gradient");
    let want_dx = c.matmul(w.as_tensor()).unwrap();
    assert_close("dx", dx, &want_dx, 1e-6 * max_abs(&want_dx));

    // Weight computed from a variable (e.g. scaled): the gradient still reaches it.
    let scaled = (w.as_tensor() * 2.0).unwrap();
    assert!(!frozen_matmul::applies(x.as_tensor(), &scaled));
    let y = ops::linear(x.as_tensor(), &scaled, None).unwrap();
    let grads = (y * &c).unwrap().sum_all().unwrap().backward().unwrap();
    let dw = grads
        .get(w.as_tensor())
        .expect("the underlying variable has a gradient");
    assert_close("dW scaled", dw, &(want * 2.0).unwrap(), 2e-6 * max_abs(dw));
}

#[test]
fn inference_keeps_plain_matmul() {
    // Nothing tracks gradients: the plain matmul runs (no graph either way).
    let mut rng = StdRng::seed_from_u64(6);
    let x = rand_tensor(&mut rng, &[4, 8]);
    let w = rand_tensor(&mut rng, &[3, 8]);
    assert!(!frozen_matmul::applies(&x, &w));
    let y = ops::linear(&x, &w, None).unwrap();
    assert!(!y.track_op());
}
