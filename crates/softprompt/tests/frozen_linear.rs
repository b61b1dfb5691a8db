//! The prompt gradient of the fixture models (PyTorch + PEFT) through the frozen-weight linear
//! path, end to end, under every kernel policy (the fast kernels, fused element-wise ops only,
//! the composite reference); the kernels' own checks are unit tests in `kernels::tests`.

mod common;

use candle_core::{DType, Device, Tensor, Var};
use common::*;
use softprompt::batch::Batch;
use softprompt::load::load_model;
use softprompt::model::Kernels;
use softprompt::objective::mean_loss;

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

/// The loss and prompt gradient of fixture `name` against PyTorch + PEFT, under every kernel
/// policy: the fast kernels and the composite reference path must both match.
fn check_fixture(name: &str, seq2seq: bool) {
    for kernels in [
        Kernels::fast(),
        Kernels::fused_ops_only(),
        Kernels::reference(),
    ] {
        check_fixture_with(name, seq2seq, kernels);
    }
}

fn check_fixture_with(name: &str, seq2seq: bool, kernels: Kernels) {
    let mut model = load_model(&fixture_dir(name), &Device::Cpu).expect("load fixture model");
    model.backbone.set_kernels(kernels);
    assert_eq!(model.backbone.kernels(), kernels);
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
        "{name} ({kernels:?}): loss {got_loss} vs {want_loss}"
    );
    let grads = loss.backward().unwrap();
    let g = grads
        .get(prompt.as_tensor())
        .expect("the prompt has a gradient");
    let want = &ex["grad_prompt"];
    assert_close(
        &format!("{name} ({kernels:?}): grad_prompt"),
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
