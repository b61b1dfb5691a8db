//! The library's own training path (task examples -> `batch::collate` -> `objective` ->
//! AdamW) reproduces PEFT's batch layout, loss, prompt gradient and the two AdamW steps of
//! every fixture model (tests/fixtures: PyTorch + PEFT, `torch.optim.AdamW(lr=0.1)`).

mod common;

use candle_core::{Device, Var};
use common::*;
use softprompt::batch::{collate, Example};
use softprompt::load::load_model;
use softprompt::objective::mean_loss;
use softprompt::train::optim::adamw::{AdamW, AdamWConfig};
use softprompt::train::optim::Optimizer;

/// Recovers the examples behind a fixture batch: source = real input tokens that carry no
/// label (causal) or the encoder input (seq2seq); target = the labelled tokens.
fn examples(name: &str, seq2seq: bool) -> Vec<Example> {
    let t = expected_tensors(name);
    let ids = to_vec2_i64(&t["input_ids"]);
    let mask = to_vec2_i64(&t["attention_mask"]);
    let labels = to_vec2_i64(&t["labels"]);
    (0..ids.len())
        .map(|b| {
            let target: Vec<u32> = labels[b].iter().filter(|&&l| l != -100).map(|&l| l as u32).collect();
            let source: Vec<u32> = if seq2seq {
                ids[b].iter().zip(&mask[b]).filter(|(_, &m)| m == 1).map(|(&i, _)| i as u32).collect()
            } else {
                ids[b]
                    .iter()
                    .zip(&mask[b])
                    .zip(&labels[b])
                    .filter(|((_, &m), &l)| m == 1 && l == -100)
                    .map(|((&i, _), _)| i as u32)
                    .collect()
            };
            Example { source, target }
        })
        .collect()
}

fn check(name: &str, seq2seq: bool) {
    let device = Device::Cpu;
    let t = expected_tensors(name);
    let model = load_model(&fixture_dir(name), &device).unwrap();
    let batch = collate(&examples(name, seq2seq), model.backbone.info(), 5, &device).unwrap();
    // The batch layout is PEFT's.
    assert_eq!(to_vec2_i64(&batch.input_ids), to_vec2_i64(&t["input_ids"]), "{name}: input_ids");
    assert_eq!(to_vec2_i64(&batch.attention_mask), to_vec2_i64(&t["attention_mask"]), "{name}: mask");
    if seq2seq {
        assert_eq!(
            to_vec2_i64(batch.decoder_input_ids.as_ref().unwrap()),
            to_vec2_i64(&t["decoder_input_ids"]),
            "{name}: decoder_input_ids"
        );
    }
    let prompt = Var::from_tensor(&t["prompt"]).unwrap();
    let loss = mean_loss(&model.backbone, Some(prompt.as_tensor()), &batch).unwrap();
    assert_close(&format!("{name}: loss"), &loss.reshape(1).unwrap(), &t["loss"], TOL_LOSS);
    let grads = loss.backward().unwrap();
    let grad = grads.get(prompt.as_tensor()).expect("the prompt has a gradient");
    let tol = TOL_GRAD_REL * max_abs(&t["grad_prompt"]);
    assert_close(&format!("{name}: grad_prompt"), grad, &t["grad_prompt"], tol);

    // Two AdamW steps as torch.optim.AdamW(lr=0.1, betas=(0.9, 0.999), eps=1e-8, wd=0).
    let mut opt = AdamW::new(vec![prompt.clone()], AdamWConfig::new(0.0)).unwrap();
    assert_eq!(opt.step(&grads, 0.1).unwrap(), 1);
    assert_close(&format!("{name}: after step 1"), prompt.as_tensor(), &t["adamw.prompt_after_step1"], 1e-4);
    let loss = mean_loss(&model.backbone, Some(prompt.as_tensor()), &batch).unwrap();
    let grads = loss.backward().unwrap();
    assert_eq!(opt.step(&grads, 0.1).unwrap(), 1);
    assert_close(&format!("{name}: after step 2"), prompt.as_tensor(), &t["adamw.prompt_after_step2"], 1e-4);
}

#[test]
fn llama_tiny() {
    check("llama-tiny", false);
}

#[test]
fn gpt2_tiny() {
    check("gpt2-tiny", false);
}

#[test]
fn t5_tiny() {
    check("t5-tiny", true);
}

#[test]
fn flan_t5_tiny() {
    check("flan-t5-tiny", true);
}
