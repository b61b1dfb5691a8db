//! The frozen-weight linear path (`model::frozen`, used by `ops::linear`): the same forward
//! values and input gradient as candle's plain matmul, no gradient computed for the frozen
//! weight, the plain path (weight gradients) when the weight is a variable, and the prompt
//! gradient of the fixture models (PyTorch + PEFT) unchanged end to end.

mod common;

use candle_core::{DType, Device, Tensor, TensorId, Var};
use common::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use softprompt::batch::Batch;
use softprompt::load::load_model;
use softprompt::model::{frozen, ops};
use softprompt::objective::mean_loss;
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
            frozen::applies(&x2, &w),
            "{xs:?} x [{n}, {k}]: frozen path expected"
        );

        let plain = x2.matmul(&w.t().unwrap()).unwrap(); // [rows, N]
        let tol = 1e-6 * max_abs(&plain).max(1.0);
        assert_close(
            &format!("matmul_t {xs:?} x [{n}, {k}]"),
            &frozen::matmul_t(&x2, &w).unwrap(),
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
    let got = frozen::matmul_t(&x, &w).unwrap();
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
    assert!(!frozen::applies(x.as_tensor(), w.as_tensor()));
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
    assert!(!frozen::applies(x.as_tensor(), &scaled));
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
    assert!(!frozen::applies(&x, &w));
    let y = ops::linear(&x, &w, None).unwrap();
    assert!(!y.track_op());
}

/// The fixture batch as a [`Batch`]: label rows as PEFT scores them (see
/// tests/fixtures/README.md). Causal: position `t` of the `N + S` sequence predicts
/// `labels[t + 1]` of the labels with `N` x -100 prepended. Seq2seq: decoder position `t`
/// predicts `labels[t]`.
fn fixture_batch(ex: &std::collections::HashMap<String, Tensor>, n: usize, seq2seq: bool) -> Batch {
    let labels = to_vec2_i64(&ex["labels"]);
    let mut rows = Vec::new();
    let mut ids = Vec::new();
    let mut example = Vec::new();
    for (b, row) in labels.iter().enumerate() {
        let (full, len, shift): (Vec<i64>, usize, usize) = if seq2seq {
            (row.clone(), row.len(), 0)
        } else {
            let full: Vec<i64> = std::iter::repeat_n(-100, n)
                .chain(row.iter().copied())
                .collect();
            let len = full.len();
            (full, len, 1)
        };
        for t in 0..len - shift {
            let label = full[t + shift];
            if label != -100 {
                rows.push((b * len + t) as u32);
                ids.push(label as u32);
                example.push(b);
            }
        }
    }
    let input_ids = as_u32(&ex["input_ids"]);
    let batch_size = input_ids.dim(0).unwrap();
    Batch {
        attention_mask: ex["attention_mask"].to_dtype(DType::F32).unwrap(),
        input_ids,
        decoder_input_ids: seq2seq.then(|| as_u32(&ex["decoder_input_ids"])),
        label_rows: Tensor::new(rows, &Device::Cpu).unwrap(),
        label_ids: Tensor::new(ids, &Device::Cpu).unwrap(),
        target_lens: (0..batch_size)
            .map(|b| example.iter().filter(|&&e| e == b).count())
            .collect(),
        label_example: example,
        n_tokens: 0,
    }
}

fn check_fixture(name: &str, seq2seq: bool) {
    let model = load_model(&fixture_dir(name), &Device::Cpu).expect("load fixture model");
    assert_eq!(model.backbone.is_seq2seq(), seq2seq);
    let ex = expected_tensors(name);
    let prompt = Var::from_tensor(&ex["prompt"]).unwrap();
    let n = prompt.dim(0).unwrap();
    let batch = fixture_batch(&ex, n, seq2seq);
    let loss = mean_loss(&model.backbone, Some(prompt.as_tensor()), &batch).unwrap();
    let got_loss = loss
        .to_dtype(DType::F32)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let want_loss = ex["loss"].flatten_all().unwrap().to_vec1::<f32>().unwrap()[0];
    assert!(
        (got_loss - want_loss).abs() <= TOL_LOSS,
        "{name}: loss {got_loss} vs {want_loss}"
    );
    let grads = loss.backward().unwrap();
    let g = grads
        .get(prompt.as_tensor())
        .expect("the prompt has a gradient");
    let want = &ex["grad_prompt"];
    assert_close(
        &format!("{name}: grad_prompt"),
        g,
        want,
        TOL_GRAD_REL * max_abs(want),
    );
}

#[test]
fn fixture_grad_prompt_llama_tiny() {
    check_fixture("llama-tiny", false);
}

#[test]
fn fixture_grad_prompt_gpt2_tiny() {
    check_fixture("gpt2-tiny", false);
}

#[test]
fn fixture_grad_prompt_t5_tiny() {
    check_fixture("t5-tiny", true);
}
