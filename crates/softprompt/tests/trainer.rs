//! The prompt-tuning loop on the tiny fixture models with synthetic token data: it learns,
//! leaves the backbone alone, resumes exactly, writes consistent checkpoints and PEFT adapters
//! like the fixtures', and reads the data in an order that depends on the seed and epoch only.

mod common;

use candle_core::{DType, Device, Tensor};
use common::*;
use softprompt::load::{hf, Model, Weights};
use softprompt::model::{llama, Backbone, LogitsAt};
use softprompt::prompt::{PeftAdapter, PromptInit};
use softprompt::train::checkpoint::{self, Checkpoint};
use softprompt::train::metrics;
use softprompt::train::optim::{AdafactorConfig, AdamWConfig, OptimizerConfig};
use softprompt::train::schedule::Schedule;
use softprompt::train::trainer::epoch_batches;
use softprompt::train::train;
use std::collections::{BTreeSet, HashSet};
use std::path::Path;

#[test]
fn toy_mapping_loss_goes_to_zero_causal() {
    for name in ["llama-tiny", "gpt2-tiny"] {
        let m = fixture_model(name);
        let data = toy_data(32, 1, eos(&m));
        let dir = tempdir();
        let cfg = toy_config(dir.path());
        let report = train(&m, &data, None, &cfg).unwrap();
        let rows = metrics::read(&dir.path().join(metrics::FILE)).unwrap();
        let first = rows.first().unwrap().loss;
        let tail: Vec<f64> = rows.iter().rev().take(10).map(|r| r.loss).collect();
        let last = tail.iter().sum::<f64>() / tail.len() as f64;
        eprintln!("{name}: loss {first} -> {last} (mean of the last 10 steps)");
        assert!(
            first > 1.0,
            "{name}: the untrained prompt should not know the mapping ({first})"
        );
        assert!(
            last < 0.1,
            "{name}: loss after {} steps is {last}",
            report.steps
        );
    }
}

/// The seq2seq prompt only reaches the decoder through cross-attention over RMS-normalised
/// encoder states, which bounds how far it can move a random tiny T5's logits: the loss falls
/// by an order of magnitude but plateaus above zero (about 0.7 for t5-tiny, whatever the
/// optimiser or prompt length). So this checks a large drop, not a near-zero loss.
#[test]
fn toy_mapping_loss_drops_seq2seq() {
    let m = fixture_model("t5-tiny");
    let data = toy_data(32, 2, eos(&m));
    let dir = tempdir();
    let mut cfg = base_config(dir.path());
    cfg.n_tokens = 16;
    cfg.batch_size = 8;
    cfg.steps = 150;
    cfg.checkpoint_every = 0;
    cfg.optimizer = OptimizerConfig::AdamW(AdamWConfig::new(0.0));
    cfg.schedule = Schedule::constant(0.05);
    train(&m, &data, None, &cfg).unwrap();
    let rows = metrics::read(&dir.path().join(metrics::FILE)).unwrap();
    let first = rows.first().unwrap().loss;
    let tail: Vec<f64> = rows.iter().rev().take(10).map(|r| r.loss).collect();
    let last = tail.iter().sum::<f64>() / tail.len() as f64;
    eprintln!("t5-tiny: loss {first} -> {last}");
    assert!(first > 5.0, "untrained loss {first}");
    assert!(
        last < 0.15 * first,
        "loss after training {last} (from {first})"
    );
}

/// Every tensor the backbone was built from is bit-identical after training to the file's, and
/// the model computes exactly what it computed before.
#[test]
fn backbone_weights_never_change() {
    let dir_model = fixture_dir("llama-tiny");
    let files = hf::weight_files(&dir_model).unwrap();
    let weights = Weights::from_safetensors(&files, &Device::Cpu).unwrap();
    let config = hf::read_json(&dir_model.join("config.json")).unwrap();
    let cfg_llama: llama::Config =
        hf::parse_config(&dir_model.join("config.json"), &config).unwrap();
    let lm = llama::Llama::new(&cfg_llama, &weights, "llama-tiny".into()).unwrap();
    let m = Model {
        backbone: Backbone::Causal(Box::new(lm)),
        tokenizer: None,
        path: dir_model.clone(),
        device: Device::Cpu,
    };
    let file_bytes = std::fs::read(&files[0]).unwrap();

    // Behaviour before: the no-prompt logits of the fixture batch and the whole embedding table.
    let t = expected_tensors("llama-tiny");
    let ids = as_u32(&t["input_ids"]);
    let mask = t["attention_mask"].to_dtype(DType::F32).unwrap();
    let run = |m: &Model| {
        let Backbone::Causal(lm) = &m.backbone else {
            unreachable!()
        };
        let embeds = lm.embed(&ids).unwrap();
        let logits = lm.forward(&embeds, &mask, None, LogitsAt::All).unwrap();
        let all_ids = Tensor::arange(0u32, 256, &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        (f32_bits(&logits), f32_bits(&lm.embed(&all_ids).unwrap()))
    };
    let before = run(&m);

    let out = tempdir();
    let mut cfg = base_config(out.path());
    cfg.steps = 10;
    cfg.optimizer = OptimizerConfig::AdamW(AdamWConfig::new(0.01));
    cfg.schedule = Schedule::constant(0.5);
    let data = toy_data(12, 3, eos(&m));
    let report = train(&m, &data, Some(&data[..4]), &cfg).unwrap();
    assert_eq!(report.steps, 10);

    let fresh = Weights::from_safetensors(&files, &Device::Cpu).unwrap();
    let mut n = 0;
    for name in fresh.names() {
        let a = fresh.get(name, &[]).or_else(|_| {
            // `get` checks the shape; take it from the fresh copy.
            let dims = candle_core::safetensors::load(&files[0], &Device::Cpu).unwrap()[name]
                .dims()
                .to_vec();
            fresh.get(name, &dims)
        });
        let a = a.unwrap();
        let b = weights.get(name, a.dims()).unwrap();
        assert_eq!(
            f32_bits(&a),
            f32_bits(&b),
            "weight {name} changed during training"
        );
        n += 1;
    }
    assert!(n >= 10, "compared only {n} tensors");
    assert_eq!(
        std::fs::read(&files[0]).unwrap(),
        file_bytes,
        "model.safetensors changed"
    );
    let after = run(&m);
    assert!(before.0 == after.0, "the no-prompt logits changed");
    assert!(before.1 == after.1, "the embedding table changed");
    // The embedding table the model uses is the file's, bit for bit.
    assert_eq!(
        before.1,
        f32_bits(&embedding_table("llama-tiny", "model.embed_tokens.weight"))
    );
}

fn read_adapter_bits(dir: &Path) -> Vec<u32> {
    f32_bits(&PeftAdapter::load(dir, &Device::Cpu).unwrap().prompt)
}

/// 6 steps straight, or 3 steps then `--resume` up to 6: the same prompt, bit for bit; also the
/// same best prompt, optimizer state, data position and per-step losses.
#[test]
fn resume_is_exact() {
    let m = fixture_model("llama-tiny");
    let data = toy_data(10, 4, eos(&m)); // 3 batches of 4 per epoch: 6 steps cross epochs
    let dev = toy_data(5, 5, eos(&m));
    for optimizer in [
        OptimizerConfig::Adafactor(AdafactorConfig::default()),
        OptimizerConfig::AdamW(AdamWConfig::new(0.01)),
    ] {
        let setup = |dir: &Path, steps: usize| {
            let mut cfg = base_config(dir);
            cfg.optimizer = optimizer.clone();
            cfg.schedule = Schedule::constant(0.1);
            cfg.steps = steps;
            cfg.eval_every = 1;
            cfg.grad_accum = 2;
            cfg.clip = Some(1.0);
            cfg.init = PromptInit::SampledVocab;
            cfg
        };
        let straight = tempdir();
        let r1 = train(&m, &data, Some(&dev), &setup(straight.path(), 6)).unwrap();
        assert_eq!(r1.steps, 6);
        assert_eq!(r1.resumed_from, None);

        let split = tempdir();
        let first = train(&m, &data, Some(&dev), &setup(split.path(), 3)).unwrap();
        assert_eq!(first.steps, 3);
        let c3 = Checkpoint::load(split.path(), &Device::Cpu)
            .unwrap()
            .unwrap();
        assert_eq!(c3.step, 3);
        assert_eq!(
            (c3.epoch, c3.position),
            (1, 3),
            "3 steps x 2 batches = 2 epochs of 3 batches"
        );
        // Without --resume, an existing checkpoint is an error.
        let err = train(&m, &data, Some(&dev), &setup(split.path(), 6)).unwrap_err();
        assert!(err.to_string().contains("--resume"), "{err}");
        // A run killed after its checkpoint may have logged later steps, the last line torn.
        let log = split.path().join(metrics::FILE);
        let mut text = std::fs::read_to_string(&log).unwrap();
        text.push_str("{\"step\":4,\"loss\":1.0,\"lr\":0.1,\"grad_norm\":1.0,\"tokens_per_s\":1.0}\n{\"step\":5,\"lo");
        std::fs::write(&log, text).unwrap();
        let mut resume = setup(split.path(), 6);
        resume.resume = true;
        let r2 = train(&m, &data, Some(&dev), &resume).unwrap();
        assert_eq!(r2.resumed_from, Some(3));
        assert_eq!(r2.steps, 6);

        assert_eq!(
            f32_bits(&r1.prompt),
            f32_bits(&r2.prompt),
            "exported prompt differs"
        );
        assert_eq!(
            read_adapter_bits(straight.path()),
            read_adapter_bits(split.path())
        );
        assert_eq!(
            r1.best_dev_loss.map(f64::to_bits),
            r2.best_dev_loss.map(f64::to_bits)
        );
        assert_eq!(r1.best_step, r2.best_step);
        let a = Checkpoint::load(straight.path(), &Device::Cpu)
            .unwrap()
            .unwrap();
        let b = Checkpoint::load(split.path(), &Device::Cpu)
            .unwrap()
            .unwrap();
        assert_eq!(
            f32_bits(&a.prompt),
            f32_bits(&b.prompt),
            "last prompt differs"
        );
        assert_eq!((a.step, a.epoch, a.position), (b.step, b.epoch, b.position));
        let keys: BTreeSet<&String> = a.optimizer.tensors.keys().collect();
        assert_eq!(keys, b.optimizer.tensors.keys().collect());
        assert!(!keys.is_empty());
        for k in keys {
            assert_eq!(
                f32_bits(&a.optimizer.tensors[k]),
                f32_bits(&b.optimizer.tensors[k]),
                "optimizer {k}"
            );
        }
        assert_eq!(a.optimizer.scalars, b.optimizer.scalars);
        // The metrics of the resumed run continue the first part's.
        let ma = metrics::read(&straight.path().join(metrics::FILE)).unwrap();
        let mb = metrics::read(&split.path().join(metrics::FILE)).unwrap();
        let steps: Vec<usize> = mb.iter().map(|r| r.step).collect();
        assert_eq!(steps, vec![1, 2, 3, 4, 5, 6]);
        for (x, y) in ma.iter().zip(&mb) {
            assert_eq!(
                x.loss.to_bits(),
                y.loss.to_bits(),
                "loss at step {}",
                x.step
            );
            assert_eq!(
                x.dev_loss.map(f64::to_bits),
                y.dev_loss.map(f64::to_bits),
                "dev loss at step {}",
                x.step
            );
        }
        // Another configuration cannot resume this run.
        let mut other = setup(split.path(), 8);
        other.resume = true;
        other.seed = 8;
        let err = train(&m, &data, Some(&dev), &other).unwrap_err();
        assert!(err.to_string().contains("another configuration"), "{err}");
    }
}

/// A reader polling the checkpoint while training writes one every step always finds a
/// complete, loadable checkpoint (or none yet), and no temporary file is left behind.
#[test]
fn checkpoint_is_never_half_written() {
    let out = tempdir();
    let path = checkpoint::path(out.path());
    let done = std::sync::atomic::AtomicBool::new(false);
    let (loads, last_step) = std::thread::scope(|s| {
        let trainer = s.spawn(|| {
            let m = fixture_model("gpt2-tiny");
            let mut cfg = base_config(out.path());
            cfg.steps = 40;
            cfg.checkpoint_every = 1;
            let data = toy_data(16, 6, eos(&m));
            let r = train(&m, &data, None, &cfg);
            done.store(true, std::sync::atomic::Ordering::SeqCst);
            r.unwrap()
        });
        let mut loads = 0;
        let mut last_step = 0;
        while !done.load(std::sync::atomic::Ordering::SeqCst) {
            match std::fs::read(&path) {
                Ok(bytes) => {
                    let c = Checkpoint::from_bytes(&bytes, &path, &Device::Cpu)
                        .unwrap_or_else(|e| panic!("a checkpoint on disk does not load: {e}"));
                    assert!(
                        c.step >= last_step,
                        "checkpoint went back from {last_step} to {}",
                        c.step
                    );
                    assert_eq!(c.prompt.dims(), &[5, 32]);
                    last_step = c.step;
                    loads += 1;
                }
                Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::NotFound),
            }
        }
        trainer.join().unwrap();
        (loads, last_step)
    });
    eprintln!("{loads} checkpoint reads during training, last at step {last_step}");
    assert!(loads > 0);
    let names: Vec<String> = std::fs::read_dir(path.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, vec![checkpoint::FILE.to_string()], "leftover files");
    assert_eq!(
        Checkpoint::load(out.path(), &Device::Cpu)
            .unwrap()
            .unwrap()
            .step,
        40
    );
    // A truncated file is detected, not half-read.
    let bytes = std::fs::read(&path).unwrap();
    for cut in [0, 7, bytes.len() / 2, bytes.len() - 1] {
        assert!(
            Checkpoint::from_bytes(&bytes[..cut], &path, &Device::Cpu).is_err(),
            "cut at {cut}"
        );
    }
}

fn json_keys(path: &Path) -> BTreeSet<String> {
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    v.as_object().unwrap().keys().cloned().collect()
}

/// The adapter we write looks like PEFT's (the fixtures'): same config keys, one F32 tensor
/// `prompt_embeddings` of `[N * submodules, D]`; it loads back; the other outputs exist.
#[test]
fn outputs_match_peft_layout() {
    for (name, submodules) in [("llama-tiny", 1), ("gpt2-tiny", 1), ("t5-tiny", 2)] {
        let m = fixture_model(name);
        let out = tempdir();
        let mut cfg = base_config(out.path());
        cfg.steps = 3;
        cfg.n_tokens = 4;
        let data = toy_data(8, 7, eos(&m));
        let report = train(&m, &data, Some(&data[..3]), &cfg).unwrap();

        let fixture = fixture_dir(name).join("adapter");
        assert_eq!(
            json_keys(&out.path().join("adapter_config.json")),
            json_keys(&fixture.join("adapter_config.json")),
            "{name}: adapter_config.json keys"
        );
        let ours: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(out.path().join("adapter_config.json")).unwrap(),
        )
        .unwrap();
        let theirs: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(fixture.join("adapter_config.json")).unwrap(),
        )
        .unwrap();
        for key in [
            "peft_type",
            "task_type",
            "token_dim",
            "num_transformer_submodules",
            "num_layers",
            "inference_mode",
        ] {
            assert_eq!(ours[key], theirs[key], "{name}: {key}");
        }
        assert_eq!(ours["num_virtual_tokens"], 4);
        assert_eq!(ours["prompt_tuning_init"], "RANDOM");

        for dir in [out.path(), fixture.as_path()] {
            let bytes = std::fs::read(dir.join("adapter_model.safetensors")).unwrap();
            let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
            assert_eq!(st.names(), vec!["prompt_embeddings"], "{name}");
            let v = st.tensor("prompt_embeddings").unwrap();
            assert_eq!(v.dtype(), safetensors::Dtype::F32);
            let n = if dir == out.path() { 4 } else { 5 };
            assert_eq!(
                v.shape(),
                &[n * submodules, 32],
                "{name}: {}",
                dir.display()
            );
        }
        let back = PeftAdapter::load(out.path(), &Device::Cpu).unwrap();
        back.validate(m.backbone.info(), out.path()).unwrap();
        assert_eq!(f32_bits(&back.prompt), f32_bits(&report.prompt));

        // The exported prompt is the best one on dev.
        let rows = metrics::read(&out.path().join(metrics::FILE)).unwrap();
        assert_eq!(rows.len(), 3);
        let best = rows
            .iter()
            .filter_map(|r| r.dev_loss)
            .fold(f64::INFINITY, f64::min);
        let reported = report.best_dev_loss.unwrap();
        assert!(
            (reported - best).abs() <= 1e-12 * best,
            "best dev loss {reported} vs logged {best}"
        );
        for r in &rows {
            assert!(r.loss.is_finite() && r.lr == 0.3 && r.grad_norm > 0.0 && r.tokens_per_s > 0.0);
        }
        let line = std::fs::read_to_string(out.path().join(metrics::FILE)).unwrap();
        let first: serde_json::Value = serde_json::from_str(line.lines().next().unwrap()).unwrap();
        for key in ["step", "loss", "lr", "grad_norm", "tokens_per_s"] {
            assert!(
                first.get(key).is_some(),
                "metrics line lacks {key}: {first}"
            );
        }
        let svg = std::fs::read_to_string(out.path().join("loss.svg")).unwrap();
        assert!(
            svg.starts_with("<svg") && svg.contains("<polyline"),
            "loss.svg"
        );
        check_loss_png(&out.path().join("loss.png"));
        let task: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.path().join("task.json")).unwrap())
                .unwrap();
        assert_eq!(task["n_tokens"], 4);
        assert_eq!(task["init"]["kind"], "random-uniform");
    }
}

/// `loss.png` is a 900 x 540 RGB PNG with more than one colour, and its caption strip (the
/// top rows, where only the title's text is drawn) holds dark pixels: the embedded font
/// rendered text with no system font.
fn check_loss_png(path: &Path) {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "PNG signature");
    assert_eq!(&bytes[12..16], b"IHDR");
    let width = u32::from_be_bytes(bytes[16..20].try_into().unwrap());
    let height = u32::from_be_bytes(bytes[20..24].try_into().unwrap());
    assert_eq!((width, height), (900, 540));
    let mut reader = png::Decoder::new(std::io::Cursor::new(&bytes)).read_info().unwrap();
    let mut buf = vec![0u8; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).unwrap();
    assert_eq!(info.color_type, png::ColorType::Rgb);
    let pixels: Vec<&[u8]> = buf[..info.buffer_size()].chunks(3).collect();
    let colours: HashSet<&[u8]> = pixels.iter().copied().collect();
    assert!(colours.len() > 3, "{} colours", colours.len());
    let dark_in_caption = pixels[..900 * 40].iter().filter(|p| p.iter().all(|&c| c < 100)).count();
    assert!(dark_in_caption > 50, "caption text: {dark_in_caption} dark pixels");
}

#[test]
fn epoch_order_depends_on_seed_and_epoch_only() {
    let lengths: Vec<usize> = (0..103).map(|i| (i * 37) % 11 + 1).collect();
    let e0 = epoch_batches(&lengths, 8, 5, 0);
    assert_eq!(e0, epoch_batches(&lengths, 8, 5, 0));
    assert_ne!(e0, epoch_batches(&lengths, 8, 5, 1));
    assert_ne!(e0, epoch_batches(&lengths, 8, 6, 0));
    for epoch in 0..3 {
        let b = epoch_batches(&lengths, 8, 5, epoch);
        let mut all: Vec<usize> = b.iter().flatten().copied().collect();
        all.sort();
        assert_eq!(
            all,
            (0..103).collect::<Vec<_>>(),
            "every example once per epoch"
        );
        assert_eq!(
            b.iter().filter(|x| x.len() != 8).count(),
            1,
            "one short batch (103 = 12 * 8 + 7)"
        );
        // Length-bucketed: inside a batch lengths are sorted.
        for batch in &b {
            assert!(batch.windows(2).all(|w| lengths[w[0]] <= lengths[w[1]]));
        }
    }
}
