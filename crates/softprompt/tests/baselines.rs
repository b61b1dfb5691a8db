//! The baselines of `softprompt train`: model tuning (every weight trained, no soft prompt) and
//! P-tuning (the prompt produced by an MLP or LSTM encoder).

mod common;

use candle_core::{DType, Device, Tensor, Var};
use common::{eos, fixture_dir, fixture_model as model, mean_nll, toy_data};
use softprompt::batch::{collate, Example};
use softprompt::load::{load_model, Model};
use softprompt::objective::target_nll;
use softprompt::prompt::{EncoderKind, PeftAdapter, PromptEncoder, PromptInit};
use softprompt::train::optim::{AdamWConfig, OptimizerConfig};
use softprompt::train::schedule::Schedule;
use softprompt::train::{model_tuning, p_tuning, TrainConfig};
use std::path::Path;

fn config(out: &Path, lr: f64, steps: usize) -> TrainConfig {
    let mut cfg = TrainConfig::paper(out);
    cfg.n_tokens = 4;
    cfg.batch_size = 8;
    cfg.steps = steps;
    cfg.quiet = true;
    cfg.seed = 3;
    cfg.optimizer = OptimizerConfig::AdamW(AdamWConfig::new(0.01));
    cfg.schedule = Schedule::constant(lr);
    cfg.init = PromptInit::RandomUniform { range: 0.5 };
    cfg
}


#[test]
fn model_tuning_learns_and_saves_a_loadable_folder() {
    for name in ["llama-tiny", "gpt2-tiny"] {
        let base = model(name);
        let data = toy_data(32, 1, eos(&base));
        let before = mean_nll(&base, &data);
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path(), 1e-3, 40);
        let report =
            model_tuning(&fixture_dir(name), &Device::Cpu, &data, Some(&data), &cfg).unwrap();
        eprintln!(
            "{name}: step loss {} -> {}, data loss {before} -> {:?}",
            report.first_loss, report.final_loss, report.dev_loss
        );
        assert!(
            report.final_loss < 0.3 * report.first_loss,
            "{name}: loss {} -> {}",
            report.first_loss,
            report.final_loss
        );

        // The output folder is a model folder whose loss is the tuned one.
        let tuned = load_model(dir.path(), &Device::Cpu).unwrap();
        let after = mean_nll(&tuned, &data);
        assert!(after < 0.3 * before, "{name}: reloaded loss {after} vs {before}");
        let in_memory = report.dev_loss.unwrap();
        assert!(
            (after - in_memory).abs() < 1e-4,
            "{name}: reloaded {after} vs trained {in_memory}"
        );

        // Same tensor names as the original; tied heads stay tied (no separate head appears,
        // and the reloaded model, whose head is its embedding, reproduces the trained loss).
        let orig =
            candle_core::safetensors::load(fixture_dir(name).join("model.safetensors"), &Device::Cpu)
                .unwrap();
        let saved =
            candle_core::safetensors::load(dir.path().join("model.safetensors"), &Device::Cpu)
                .unwrap();
        let mut a: Vec<_> = orig.keys().collect();
        let mut b: Vec<_> = saved.keys().collect();
        a.sort();
        b.sort();
        assert_eq!(a, b, "{name}: tensor names");
        let emb = if name == "gpt2-tiny" {
            "transformer.wte.weight"
        } else {
            "model.embed_tokens.weight"
        };
        let moved = common::max_abs_diff(&orig[emb].to_dtype(DType::F32).unwrap(), &saved[emb]);
        assert!(moved > 1e-4, "{name}: the embedding did not change");
        assert!(dir.path().join("config.json").is_file());
    }
}

#[test]
fn model_tuning_names_a_corrupt_gguf_file() {
    // GGUF files are accepted (tests/model_tuning_gguf.rs); a truncated one is a clear error.
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("m.gguf");
    std::fs::write(&f, b"GGUF").unwrap();
    let cfg = config(dir.path(), 1e-3, 1);
    let data = toy_data(2, 1, 2);
    let err = model_tuning(&f, &Device::Cpu, &data, None, &cfg)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("GGUF") && err.contains("m.gguf"), "{err}");
}

#[test]
fn p_tuning_learns_with_both_encoders_and_exports_its_output() {
    for (name, kind) in [("llama-tiny", EncoderKind::Mlp), ("gpt2-tiny", EncoderKind::Lstm)] {
        let m = model(name);
        let data = toy_data(32, 1, eos(&m));
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path(), 1e-2, 150);
        let (report, encoder) = p_tuning(&m, &data, None, &cfg, kind, 16).unwrap();
        eprintln!(
            "{name} {kind:?}: loss {} -> {}",
            report.first_loss, report.final_loss
        );
        assert!(
            report.final_loss < 0.3 * report.first_loss,
            "{name} {kind:?}: loss {} -> {}",
            report.first_loss,
            report.final_loss
        );
        let adapter = PeftAdapter::load(dir.path(), &Device::Cpu).unwrap();
        let out = encoder.forward().unwrap();
        assert_eq!(adapter.prompt.dims(), out.dims());
        assert!(common::max_abs_diff(&adapter.prompt, &out) < 1e-6);
        let task: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(dir.path().join("task.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(task["method"], "p-tuning");
        assert_eq!(task["encoder"]["kind"], kind.name());
        assert!(dir.path().join("encoder.safetensors").is_file());
    }
}

fn loss_of(m: &Model, enc: &PromptEncoder, data: &[Example]) -> Tensor {
    let batch = collate(data, m.backbone.info(), enc.n_tokens(), &Device::Cpu).unwrap();
    let p = enc.forward().unwrap();
    target_nll(&m.backbone, Some(&p), &batch)
        .unwrap()
        .sum_all()
        .unwrap()
}

#[test]
fn gradient_reaches_every_encoder_parameter() {
    let m = model("llama-tiny");
    let data = toy_data(4, 2, eos(&m));
    for kind in [EncoderKind::Mlp, EncoderKind::Lstm] {
        let init = Tensor::randn(0f32, 0.5, (3, m.backbone.info().d_model), &Device::Cpu).unwrap();
        let enc = PromptEncoder::new(kind, &init, 8, 5).unwrap();
        let grads = loss_of(&m, &enc, &data).backward().unwrap();
        for (n, v) in enc.named_vars() {
            let g = grads
                .get(v.as_tensor())
                .unwrap_or_else(|| panic!("{kind:?}: no gradient for {n}"));
            assert!(common::max_abs(g) > 0.0, "{kind:?}: zero gradient for {n}");
        }
    }
}

/// Finite differences (central, f32) on a few elements of the MLP encoder's parameters.
#[test]
fn mlp_encoder_gradient_matches_finite_differences() {
    let m = model("llama-tiny");
    let data = toy_data(4, 2, eos(&m));
    // A fixed input (not candle's unseeded randn): with a random one, a perturbation of
    // +-h now and then crosses a ReLU kink and the central difference is meaningless.
    let d = m.backbone.info().d_model;
    let vals: Vec<f32> = (0..3 * d).map(|i| 0.5 * ((i as f32 * 0.7131).sin() + (i as f32 * 0.173).cos()) / 2f32.sqrt()).collect();
    let init = Tensor::from_vec(vals, (3, d), &Device::Cpu).unwrap();
    let enc = PromptEncoder::new(EncoderKind::Mlp, &init, 8, 5).unwrap();
    let grads = loss_of(&m, &enc, &data).backward().unwrap();
    let named = enc.named_vars();
    for (name, idx) in [("input", 5usize), ("mlp.0.weight", 3), ("mlp.2.bias", 1)] {
        let var: &Var = &named.iter().find(|(n, _)| n == name).unwrap().1;
        let analytic = grads.get(var.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap()[idx] as f64;
        let orig = var.as_tensor().detach().copy().unwrap();
        let shape = orig.dims().to_vec();
        let h = 1e-2f32;
        let at = |delta: f32| -> f64 {
            let mut v = orig.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            v[idx] += delta;
            var.set(&Tensor::from_vec(v, shape.as_slice(), &Device::Cpu).unwrap()).unwrap();
            loss_of(&m, &enc, &data).to_scalar::<f32>().unwrap() as f64
        };
        let numeric = (at(h) - at(-h)) / (2.0 * h as f64);
        var.set(&orig).unwrap();
        eprintln!("{name}[{idx}]: analytic {analytic}, numeric {numeric}");
        assert!(
            (analytic - numeric).abs() < 2e-2 + 0.05 * analytic.abs(),
            "{name}[{idx}]: analytic {analytic} vs numeric {numeric}"
        );
    }
}

/// The raw bits of every tensor of a safetensors file, by name.
fn tensor_bits(path: &Path) -> Vec<(String, Vec<u8>)> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut out: Vec<(String, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| (n, v.data().to_vec()))
        .collect();
    out.sort();
    out
}

fn losses(dir: &Path) -> Vec<(usize, u64)> {
    softprompt::train::metrics::read(&dir.join("metrics.jsonl"))
        .unwrap()
        .iter()
        .map(|r| (r.step, r.loss.to_bits()))
        .collect()
}

/// Runs one baseline; `p_tuning` (MLP encoder) or model tuning.
fn run_baseline(
    name: &str,
    p: bool,
    data: &[Example],
    cfg: &TrainConfig,
) -> softprompt::Result<softprompt::train::BaselineReport> {
    if p {
        p_tuning(&model(name), data, Some(&data[..8]), cfg, EncoderKind::Mlp, 16).map(|r| r.0)
    } else {
        model_tuning(&fixture_dir(name), &Device::Cpu, data, Some(&data[..8]), cfg)
    }
}

/// A baseline stopped after 3 steps and resumed to 6 ends bit-identical to a run of 6 steps:
/// same per-step losses, same outputs, same final checkpoint (weights and optimizer state).
#[test]
fn baselines_resume_exactly() {
    for (name, p, outputs) in [
        ("llama-tiny", true, ["adapter_model.safetensors", "encoder.safetensors"]),
        ("gpt2-tiny", false, ["model.safetensors", "model.safetensors"]),
    ] {
        let what = if p { "p-tuning" } else { "model tuning" };
        let m = model(name);
        let data = toy_data(32, 4, eos(&m)); // 4 batches an epoch: 6 steps cross an epoch
        let lr = if p { 1e-2 } else { 1e-3 };

        let straight = tempfile::tempdir().unwrap();
        let mut cfg = config(straight.path(), lr, 6);
        cfg.checkpoint_every = 2;
        cfg.clip = Some(1.0);
        let full = run_baseline(name, p, &data, &cfg).unwrap();
        assert_eq!((full.steps, full.resumed_from), (6, None));

        let split = tempfile::tempdir().unwrap();
        let mut cfg = config(split.path(), lr, 3);
        cfg.checkpoint_every = 2;
        cfg.clip = Some(1.0);
        run_baseline(name, p, &data, &cfg).unwrap();
        // Not without --resume.
        cfg.steps = 6;
        let err = run_baseline(name, p, &data, &cfg).err().unwrap().to_string();
        assert!(err.contains("--resume"), "{what}: {err}");
        // Not with another configuration.
        cfg.resume = true;
        cfg.seed += 1;
        let err = run_baseline(name, p, &data, &cfg).err().unwrap().to_string();
        assert!(err.contains("another configuration"), "{what}: {err}");
        cfg.seed -= 1;
        // Not as the other baseline, nor as prompt tuning.
        let err = run_baseline(name, !p, &data, &cfg).err().unwrap().to_string();
        assert!(err.contains("run, not"), "{what}: {err}");
        let err = softprompt::train::train(&m, &data, None, &cfg).err().unwrap().to_string();
        assert!(err.contains("not of prompt tuning"), "{what}: {err}");

        let resumed = run_baseline(name, p, &data, &cfg).unwrap();
        assert_eq!((resumed.steps, resumed.resumed_from), (6, Some(3)), "{what}");
        assert_eq!(resumed.first_loss.to_bits(), full.first_loss.to_bits(), "{what}");
        assert_eq!(resumed.final_loss.to_bits(), full.final_loss.to_bits(), "{what}");
        assert_eq!(
            resumed.dev_loss.unwrap().to_bits(),
            full.dev_loss.unwrap().to_bits(),
            "{what}: dev loss"
        );
        assert_eq!(losses(split.path()), losses(straight.path()), "{what}: metrics");
        assert_eq!(losses(split.path()).len(), 6);
        for file in outputs {
            assert!(
                tensor_bits(&split.path().join(file)) == tensor_bits(&straight.path().join(file)),
                "{what}: {file} differs"
            );
        }
        let ckpt = |d: &Path| tensor_bits(&d.join("checkpoint").join("checkpoint.safetensors"));
        let (a, b) = (ckpt(split.path()), ckpt(straight.path()));
        assert!(a.iter().any(|(n, _)| n.starts_with("optimizer.")), "{what}: optimizer state");
        assert!(a.iter().any(|(n, _)| n.starts_with("param.")), "{what}: params");
        assert!(a == b, "{what}: final checkpoints differ");
        assert!(split.path().join("loss.png").is_file() && split.path().join("loss.svg").is_file());
    }
}
