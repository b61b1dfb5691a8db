//! The prompt-tuning loop on the tiny fixture models with synthetic token data: it learns,
//! leaves the backbone alone, resumes exactly, writes consistent checkpoints and PEFT adapters
//! like the fixtures', initialises prompts as documented and rejects bad input up front.

mod common;

use candle_core::{DType, Device, Tensor};
use common::*;
use softprompt::batch::{collate, Example};
use softprompt::load::{hf, load_model, Model, Weights};
use softprompt::model::{llama, Backbone, CausalLm, LogitsAt, ModelInfo};
use softprompt::objective::mean_loss;
use softprompt::prompt::init::{common_token_ids, init_prompt, Rng, COMMON_TOKENS};
use softprompt::prompt::{prefix_after_bos, strip_leading_bos, PeftAdapter, PromptInit};
use softprompt::tokenizer::Tokenizer;
use softprompt::train::checkpoint::{self, Checkpoint};
use softprompt::train::metrics;
use softprompt::train::optim::{AdafactorConfig, AdamWConfig, OptimizerConfig};
use softprompt::train::schedule::Schedule;
use softprompt::train::trainer::{config_hash, epoch_batches, SelectBy};
use softprompt::train::{train, TrainConfig};
use std::collections::{BTreeSet, HashSet};
use std::path::{Path, PathBuf};

fn model(name: &str) -> Model {
    load_model(&fixture_dir(name), &Device::Cpu).unwrap_or_else(|e| panic!("load {name}: {e}"))
}

fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().expect("temp dir")
}

/// Synthetic classification-like data: source = filler tokens + a class token, target = the
/// class's answer token (+ EOS for the given model). Deterministic in `seed`.
fn toy_data(n: usize, seed: u64, eos: u32) -> Vec<Example> {
    let mut rng = Rng::new(seed, 42);
    (0..n)
        .map(|_| {
            let len = 1 + rng.below(4) as usize;
            let mut source: Vec<u32> = (0..len).map(|_| 10 + rng.below(30) as u32).collect();
            let class = rng.below(2) as usize;
            source.push([60, 70][class]);
            let target = vec![[100, 200][class], eos];
            Example { source, target }
        })
        .collect()
}

fn base_config(out: &Path) -> TrainConfig {
    let mut cfg = TrainConfig::paper(out);
    cfg.n_tokens = 5;
    cfg.batch_size = 4;
    cfg.steps = 6;
    cfg.quiet = true;
    cfg.seed = 7;
    cfg
}

fn f32_bits(t: &Tensor) -> Vec<u32> {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .map(|x| x.to_bits())
        .collect()
}

/// The embedding table of a fixture model, read straight from its model.safetensors.
fn embedding_table(name: &str, tensor: &str) -> Tensor {
    let all =
        candle_core::safetensors::load(fixture_dir(name).join("model.safetensors"), &Device::Cpu)
            .unwrap();
    all[tensor].to_dtype(DType::F32).unwrap()
}

fn eos(m: &Model) -> u32 {
    m.backbone.info().eos_token_ids[0]
}

#[test]
fn toy_mapping_loss_goes_to_zero_causal() {
    for name in ["llama-tiny", "gpt2-tiny"] {
        let m = model(name);
        let data = toy_data(32, 1, eos(&m));
        let dir = tmp();
        let mut cfg = base_config(dir.path());
        cfg.n_tokens = 8;
        cfg.batch_size = 8;
        cfg.steps = 300;
        cfg.checkpoint_every = 0;
        // Adafactor as in the paper, but decayed: a constant 0.3 makes these tiny random
        // models' losses oscillate around 0.2.
        cfg.schedule = Schedule::linear(0.3, 0, cfg.steps);
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
    let m = model("t5-tiny");
    let data = toy_data(32, 2, eos(&m));
    let dir = tmp();
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

    let out = tmp();
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
    let m = model("llama-tiny");
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
        let straight = tmp();
        let r1 = train(&m, &data, Some(&dev), &setup(straight.path(), 6)).unwrap();
        assert_eq!(r1.steps, 6);
        assert_eq!(r1.resumed_from, None);

        let split = tmp();
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
    let out = tmp();
    let path = checkpoint::path(out.path());
    let done = std::sync::atomic::AtomicBool::new(false);
    let (loads, last_step) = std::thread::scope(|s| {
        let trainer = s.spawn(|| {
            let m = model("gpt2-tiny");
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
        let m = model(name);
        let out = tmp();
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

/// A word-level tokenizer over the fixture vocabulary: id 0 `[UNK]` (special), id 3 a
/// SentencePiece byte piece `<0x0A>`, id 4 `<sep>` (special), every other id `i` the word `w{i}`.
fn word_tokenizer(dir: &Path, vocab: usize) -> Tokenizer {
    let mut words = serde_json::Map::new();
    for i in 0..vocab {
        let w = match i {
            0 => "[UNK]".to_string(),
            3 => "<0x0A>".to_string(),
            4 => "<sep>".to_string(),
            _ => format!("w{i}"),
        };
        words.insert(w, i.into());
    }
    let added = |id: usize, content: &str| {
        serde_json::json!({"id": id, "content": content, "single_word": false, "lstrip": false,
            "rstrip": false, "normalized": false, "special": true})
    };
    let json = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": [added(0, "[UNK]"), added(4, "<sep>")],
        "normalizer": null, "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": null, "decoder": null,
        "model": {"type": "WordLevel", "vocab": words, "unk_token": "[UNK]"},
    });
    let path = dir.join("tokenizer.json");
    std::fs::write(&path, json.to_string()).unwrap();
    Tokenizer::from_file(&path).unwrap()
}

/// llama-tiny with the word tokenizer.
fn llama_with_words(dir: &Path) -> Model {
    let mut m = model("llama-tiny");
    m.tokenizer = Some(word_tokenizer(dir, 256));
    m
}

/// The ids whose embedding rows (of `table`, `[V, D]`) equal the prompt's rows exactly.
fn row_ids(prompt: &Tensor, table: &Tensor) -> Vec<u32> {
    let rows = prompt.to_vec2::<f32>().unwrap();
    let table = table.to_vec2::<f32>().unwrap();
    rows.iter()
        .map(|r| {
            let hits: Vec<usize> = (0..table.len()).filter(|&i| &table[i] == r).collect();
            assert_eq!(
                hits.len(),
                1,
                "a prompt row is not exactly one embedding row"
            );
            hits[0] as u32
        })
        .collect()
}

#[test]
fn init_common_tokens_are_lowest_ordinary_ids() {
    let dir = tmp();
    let m = model("llama-tiny"); // bos 1, eos = pad = 2
    let mut info = m.backbone.info().clone();
    let tok = word_tokenizer(dir.path(), 256);
    let ids = common_token_ids(&info, Some(&tok), 10);
    assert_eq!(
        ids,
        (5..15).collect::<Vec<u32>>(),
        "specials 0, 1, 2, 4 and byte piece 3 excluded"
    );
    // A vocabulary larger than 5,000: exactly the 5,000 lowest ordinary ids.
    info.vocab_size = 6000;
    let big = word_tokenizer(dir.path(), 6000);
    let ids = common_token_ids(&info, Some(&big), COMMON_TOKENS);
    assert_eq!(ids.len(), COMMON_TOKENS);
    assert_eq!(ids, (5..5005).collect::<Vec<u32>>());
    // Without a tokenizer only the model's special ids are known.
    let ids = common_token_ids(m.backbone.info(), None, 5);
    assert_eq!(ids, vec![0, 3, 4, 5, 6]);
}

#[test]
fn init_sampled_vocab_draws_distinct_common_ids() {
    let dir = tmp();
    let m = llama_with_words(dir.path());
    let table = embedding_table("llama-tiny", "model.embed_tokens.weight");
    let p = init_prompt(&PromptInit::SampledVocab, &m, 50, 11).unwrap();
    assert_eq!(p.dims(), &[50, 32]);
    let ids = row_ids(&p, &table);
    let set: HashSet<u32> = ids.iter().copied().collect();
    assert_eq!(set.len(), 50, "ids drawn twice: {ids:?}");
    assert!(ids.iter().all(|i| (5..5000).contains(i)), "{ids:?}");
    // Deterministic in the seed, different across seeds.
    let again = init_prompt(&PromptInit::SampledVocab, &m, 50, 11).unwrap();
    assert_eq!(f32_bits(&p), f32_bits(&again));
    let other = init_prompt(&PromptInit::SampledVocab, &m, 50, 12).unwrap();
    assert_ne!(f32_bits(&p), f32_bits(&other));
    // More slots than ordinary tokens (251): every token once, then again.
    let many = row_ids(
        &init_prompt(&PromptInit::SampledVocab, &m, 300, 1).unwrap(),
        &table,
    );
    let first: HashSet<u32> = many[..251].iter().copied().collect();
    assert_eq!(first.len(), 251);
}

#[test]
fn init_class_labels_average_multi_token_labels() {
    let dir = tmp();
    let m = llama_with_words(dir.path());
    let table = embedding_table("llama-tiny", "model.embed_tokens.weight");
    let init = PromptInit::ClassLabels(vec!["w10 w20".into(), "w30".into()]);
    let p = init_prompt(&init, &m, 5, 3).unwrap();
    assert_eq!(p.dims(), &[5, 32]);
    // By hand: the mean of rows 10 and 20, then row 30.
    let t = table.to_vec2::<f32>().unwrap();
    let rows = p.to_vec2::<f32>().unwrap();
    for d in 0..32 {
        let mean = (t[10][d] + t[20][d]) / 2.0;
        assert!(
            (rows[0][d] - mean).abs() <= 1e-7,
            "dim {d}: {} vs {mean}",
            rows[0][d]
        );
        assert_eq!(rows[1][d], t[30][d]);
    }
    // The other 3 slots: distinct sampled ordinary tokens, none of the labels'.
    let rest = row_ids(&p.narrow(0, 2, 3).unwrap(), &table);
    let set: HashSet<u32> = rest.iter().copied().collect();
    assert_eq!(set.len(), 3);
    assert!(
        rest.iter()
            .all(|i| ![0, 1, 2, 3, 4, 10, 20, 30].contains(i)),
        "{rest:?}"
    );

    // Errors: a label with no tokens, more labels than slots, no labels.
    let err = init_prompt(
        &PromptInit::ClassLabels(vec!["w5".into(), "  ".into()]),
        &m,
        5,
        0,
    )
    .unwrap_err();
    assert!(err.to_string().contains("tokenizes to no tokens"), "{err}");
    let err = init_prompt(
        &PromptInit::ClassLabels(vec!["w5".into(), "w6".into()]),
        &m,
        1,
        0,
    )
    .unwrap_err();
    assert!(err.to_string().contains("do not fit"), "{err}");
    assert!(init_prompt(&PromptInit::ClassLabels(vec![]), &m, 3, 0).is_err());
    // No tokenizer: a clear error.
    let bare = model("llama-tiny");
    let err = init_prompt(&init, &bare, 5, 0).unwrap_err();
    assert!(err.to_string().contains("tokenizer"), "{err}");
}

#[test]
fn init_text_repeats_and_truncates() {
    let dir = tmp();
    let m = llama_with_words(dir.path());
    let table = embedding_table("llama-tiny", "model.embed_tokens.weight");
    let text = PromptInit::Text("w5 w6 w7".into());
    let p = init_prompt(&text, &m, 8, 0).unwrap();
    assert_eq!(row_ids(&p, &table), vec![5, 6, 7, 5, 6, 7, 5, 6]);
    let p = init_prompt(&text, &m, 2, 0).unwrap();
    assert_eq!(row_ids(&p, &table), vec![5, 6]);
    assert!(init_prompt(&PromptInit::Text(" ".into()), &m, 2, 0).is_err());
    assert_eq!(text.peft_name(), "TEXT");

    // The adapter records TEXT the way PEFT needs it (text and tokenizer).
    let out = tmp();
    let mut cfg = base_config(out.path());
    cfg.init = text;
    cfg.steps = 1;
    train(&m, &toy_data(4, 1, 2), None, &cfg).unwrap();
    let conf: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.path().join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(conf["prompt_tuning_init"], "TEXT");
    assert_eq!(conf["prompt_tuning_init_text"], "w5 w6 w7");
    assert!(conf["tokenizer_name_or_path"].is_string());
}

#[test]
fn init_random_uniform_and_file() {
    let m = model("gpt2-tiny");
    let p = init_prompt(&PromptInit::RandomUniform { range: 0.5 }, &m, 20, 9).unwrap();
    let v: Vec<f32> = p.flatten_all().unwrap().to_vec1().unwrap();
    assert!(v.iter().all(|x| (-0.5..=0.5).contains(x)));
    let mean_abs = v.iter().map(|x| x.abs()).sum::<f32>() / v.len() as f32;
    assert!(
        (mean_abs - 0.25).abs() < 0.03,
        "mean |x| {mean_abs} (U[-0.5, 0.5] gives 0.25)"
    );
    let again = init_prompt(&PromptInit::RandomUniform { range: 0.5 }, &m, 20, 9).unwrap();
    assert_eq!(f32_bits(&p), f32_bits(&again));
    assert!(init_prompt(&PromptInit::RandomUniform { range: f64::NAN }, &m, 20, 9).is_err());

    // Prompt transfer from the fixture's adapter: its rows, checked against the model.
    let adapter = fixture_dir("gpt2-tiny").join("adapter");
    let p = init_prompt(&PromptInit::File(adapter.clone()), &m, 5, 0).unwrap();
    assert_eq!(
        f32_bits(&p),
        f32_bits(&expected_tensors("gpt2-tiny")["prompt"])
    );
    let err = init_prompt(&PromptInit::File(adapter), &m, 6, 0).unwrap_err();
    assert!(err.to_string().contains("num_virtual_tokens"), "{err}");
    // A seq2seq adapter does not fit a causal model.
    let t5 = fixture_dir("t5-tiny").join("adapter");
    assert!(init_prompt(&PromptInit::File(t5), &m, 5, 0).is_err());
}

/// Each bad input is an error before anything is written.
#[test]
fn bad_input_is_rejected_before_training() {
    let dir = tmp();
    let words = llama_with_words(dir.path());
    let gpt2 = model("gpt2-tiny"); // context 128
    let data = toy_data(4, 1, 2);
    type Edit = Box<dyn Fn(&mut TrainConfig)>;
    type Case<'a> = (&'static str, &'a Model, Vec<Example>, Option<Vec<Example>>, Edit);
    let cases: Vec<Case> = vec![
        (
            "training set is empty",
            &words,
            vec![],
            None,
            Box::new(|_| {}),
        ),
        (
            "dev set is empty",
            &words,
            data.clone(),
            Some(vec![]),
            Box::new(|_| {}),
        ),
        (
            "n_tokens",
            &words,
            data.clone(),
            None,
            Box::new(|c| c.n_tokens = 0),
        ),
        (
            "learning rate",
            &words,
            data.clone(),
            None,
            Box::new(|c| c.schedule = Schedule::constant(f64::NAN)),
        ),
        (
            "learning rate",
            &words,
            data.clone(),
            None,
            Box::new(|c| c.schedule = Schedule::constant(0.0)),
        ),
        (
            "learning rate",
            &words,
            data.clone(),
            None,
            Box::new(|c| c.schedule = Schedule::constant(-0.1)),
        ),
        (
            "tokenizes to no tokens",
            &words,
            data.clone(),
            None,
            Box::new(|c| c.init = PromptInit::ClassLabels(vec!["w7".into(), "".into()])),
        ),
        (
            "longer than the model's context of 128",
            &gpt2,
            vec![Example {
                source: vec![5; 20],
                target: vec![6; 9],
            }],
            None,
            Box::new(|c| c.n_tokens = 100),
        ),
        (
            "outside the model's vocabulary",
            &words,
            vec![Example {
                source: vec![5, 300],
                target: vec![6],
            }],
            None,
            Box::new(|_| {}),
        ),
        (
            "empty target",
            &words,
            vec![Example {
                source: vec![5],
                target: vec![],
            }],
            None,
            Box::new(|_| {}),
        ),
    ];
    for (want, m, train_set, dev, edit) in cases {
        let out = tmp();
        let mut cfg = base_config(out.path());
        edit(&mut cfg);
        let err = train(m, &train_set, dev.as_deref(), &cfg)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(want),
            "expected an error about `{want}`, got: {err}"
        );
        assert!(
            std::fs::read_dir(out.path()).unwrap().next().is_none(),
            "{want}: files were written"
        );
    }
    // At the context limit exactly (100 + 28 = 128) training works.
    let out = tmp();
    let mut cfg = base_config(out.path());
    cfg.n_tokens = 100;
    cfg.steps = 1;
    train(
        &gpt2,
        &[Example {
            source: vec![5; 20],
            target: vec![6; 8],
        }],
        None,
        &cfg,
    )
    .unwrap();
}

/// A backbone whose logits do not depend on its input: the prompt gets no gradient, which must
/// be an error rather than silent non-training.
struct Detached {
    info: ModelInfo,
}

impl CausalLm for Detached {
    fn info(&self) -> &ModelInfo {
        &self.info
    }
    fn embed(&self, ids: &Tensor) -> softprompt::Result<Tensor> {
        let (b, t) = ids.dims2()?;
        Ok(Tensor::zeros(
            (b, t, self.info.d_model),
            DType::F32,
            &Device::Cpu,
        )?)
    }
    fn forward(
        &self,
        _embeds: &Tensor,
        _mask: &Tensor,
        _cache: Option<&mut softprompt::model::KvCache>,
        at: LogitsAt,
    ) -> softprompt::Result<Tensor> {
        let LogitsAt::Rows(rows) = at else {
            panic!("training asks for label rows")
        };
        Ok(Tensor::zeros(
            (rows.dim(0)?, self.info.vocab_size),
            DType::F32,
            &Device::Cpu,
        )?)
    }
    fn hidden_states(&self, _: &Tensor, _: &Tensor) -> softprompt::Result<Vec<Tensor>> {
        unimplemented!()
    }
}

#[test]
fn a_prompt_without_gradient_is_an_error() {
    let info = model("llama-tiny").backbone.info().clone();
    let m = Model {
        backbone: Backbone::Causal(Box::new(Detached { info })),
        tokenizer: None,
        path: PathBuf::from("detached"),
        device: Device::Cpu,
    };
    let out = tmp();
    let err = train(&m, &toy_data(4, 1, 2), None, &base_config(out.path())).unwrap_err();
    assert!(err.to_string().contains("no gradient"), "{err}");
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

/// Synthetic examples whose sources start with BOS (as a Llama tokenizer writes them), all of
/// one length so batches have no padding: `[BOS, a, b, c, class]` -> `[answer, EOS]`.
fn bos_data(n: usize, seed: u64, bos: u32, eos: u32) -> Vec<Example> {
    let mut rng = Rng::new(seed, 43);
    (0..n)
        .map(|_| {
            let class = rng.below(2) as usize;
            let mut source = vec![bos];
            source.extend((0..3).map(|_| 10 + rng.below(30) as u32));
            source.push([60, 70][class]);
            Example {
                source,
                target: vec![[100, 200][class], eos],
            }
        })
        .collect()
}

/// Mean target NLL computed by hand, one example at a time without padding: the model reads
/// `[prefix; embed(source); embed(target)]` and target token `j` is predicted at position
/// `len(prefix) + len(source) + j - 1`.
fn nll_by_hand(m: &Model, prefix: &Tensor, data: &[Example]) -> f64 {
    let Backbone::Causal(lm) = &m.backbone else {
        panic!("a decoder-only model")
    };
    let table = embedding_table("llama-tiny", "model.embed_tokens.weight"); // [V, D]
    let (mut total, mut count) = (0f64, 0usize);
    for e in data {
        let ids: Vec<u32> = e.source.iter().chain(&e.target).copied().collect();
        let ids_t = Tensor::new(ids.as_slice(), &Device::Cpu).unwrap();
        let x = table.index_select(&ids_t, 0).unwrap(); // [S+T, D]
        let embeds = Tensor::cat(&[prefix, &x], 0).unwrap().unsqueeze(0).unwrap(); // [1, L, D]
        let len = embeds.dim(1).unwrap();
        let mask = Tensor::ones((1, len), DType::F32, &Device::Cpu).unwrap();
        let logits = lm.forward(&embeds, &mask, None, LogitsAt::All).unwrap(); // [1, L, V]
        let logits: Vec<Vec<f32>> = logits.squeeze(0).unwrap().to_vec2().unwrap();
        let start = prefix.dim(0).unwrap() + e.source.len();
        for (j, &tok) in e.target.iter().enumerate() {
            let row = &logits[start + j - 1];
            let max = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
            let lse = max + row.iter().map(|&v| (v as f64 - max).exp()).sum::<f64>().ln();
            total += lse - row[tok as usize] as f64;
            count += 1;
        }
    }
    total / count as f64
}

#[test]
fn prompt_after_bos_places_the_prompt_after_bos() {
    let m = model("llama-tiny");
    let bos = m.backbone.info().bos_token_id.expect("llama-tiny has a BOS");
    assert_eq!(bos, 1);
    let data = bos_data(8, 3, bos, eos(&m));
    let table = embedding_table("llama-tiny", "model.embed_tokens.weight");
    let bos_row = table.narrow(0, bos as usize, 1).unwrap(); // [1, D]

    // (a) One step over one batch of all examples: the reported loss is the loss of the
    // initial prompt P, which must be that of [embed(BOS); P; embed(X without BOS)].
    let dir = tmp();
    let mut cfg = base_config(dir.path());
    cfg.init = PromptInit::RandomUniform { range: 0.5 };
    cfg.batch_size = data.len();
    cfg.steps = 1;
    cfg.prompt_after_bos = true;
    let p0 = init_prompt(&cfg.init, &m, cfg.n_tokens, cfg.seed).unwrap(); // [N, D]
    let report = train(&m, &data, None, &cfg).unwrap();
    let got = report.final_loss.unwrap();
    let stripped: Vec<Example> = data
        .iter()
        .map(|e| Example {
            source: e.source[1..].to_vec(),
            target: e.target.clone(),
        })
        .collect();
    let after = nll_by_hand(&m, &Tensor::cat(&[&bos_row, &p0], 0).unwrap(), &stripped);
    let before = nll_by_hand(&m, &p0, &data); // the default layout [P; embed(BOS); embed(X)]
    eprintln!("prompt after BOS: trainer {got}, by hand {after}; before BOS {before}");
    assert!(
        (got - after).abs() < 1e-5,
        "trainer {got} vs by hand {after}"
    );
    assert!(
        (before - after).abs() > 1e-3,
        "the layouts should differ ({before} vs {after})"
    );
    // The helper: [embed(BOS); P], gradient to P only.
    let var = candle_core::Var::from_tensor(&p0).unwrap();
    let prefix = prefix_after_bos(var.as_tensor(), &m.backbone).unwrap(); // [N+1, D]
    assert_eq!(prefix.dims(), &[cfg.n_tokens + 1, 32]);
    assert_close(
        "BOS row",
        &prefix.narrow(0, 0, 1).unwrap(),
        &bos_row,
        0.0,
    );
    assert_close("prompt rows", &prefix.narrow(0, 1, cfg.n_tokens).unwrap(), &p0, 0.0);
    let mut source = vec![bos, 5, bos];
    strip_leading_bos(&mut source, bos);
    assert_eq!(source, vec![5, bos]);
    strip_leading_bos(&mut source, bos);
    assert_eq!(source, vec![5, bos]);

    // (b) The gradient reaches P (through the prefix) and training lowers the loss.
    let batch = collate(&stripped, m.backbone.info(), cfg.n_tokens + 1, &Device::Cpu).unwrap();
    let loss = mean_loss(&m.backbone, Some(&prefix), &batch).unwrap();
    let grads = loss.backward().unwrap();
    let g = grads.get(var.as_tensor()).expect("the prompt gets a gradient");
    assert_eq!(g.dims(), &[cfg.n_tokens, 32]);
    assert!(max_abs(g) > 0.0, "the prompt gradient is zero");

    let dir2 = tmp();
    let mut cfg2 = cfg.clone();
    cfg2.output = dir2.path().to_path_buf();
    cfg2.steps = 40;
    cfg2.checkpoint_every = 0;
    cfg2.schedule = Schedule::linear(0.3, 0, cfg2.steps);
    let report = train(&m, &data, None, &cfg2).unwrap();
    let rows = metrics::read(&dir2.path().join(metrics::FILE)).unwrap();
    let (first, last) = (rows.first().unwrap().loss, rows.last().unwrap().loss);
    eprintln!("prompt after BOS: loss {first} -> {last}");
    assert!((first - got).abs() < 1e-9, "same first step ({first} vs {got})");
    assert!(last < 0.5 * first, "loss {first} -> {last}");
    assert_eq!(report.prompt.dims(), &[cfg.n_tokens, 32]);

    // (c) task.json records the layout; the adapter holds P alone (N rows); without the
    // option the key is absent and the configuration hash differs.
    let task: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir2.path().join("task.json")).unwrap())
            .unwrap();
    assert_eq!(task["prompt_after_bos"], serde_json::json!(true));
    let adapter = PeftAdapter::load(dir2.path(), &Device::Cpu).unwrap();
    assert_eq!(adapter.config.num_virtual_tokens, cfg.n_tokens);
    let info = m.backbone.info();
    let mut plain = cfg.clone();
    plain.prompt_after_bos = false;
    assert_ne!(
        config_hash(&cfg, info, &data, None),
        config_hash(&plain, info, &data, None)
    );
    let dir3 = tmp();
    plain.output = dir3.path().to_path_buf();
    train(&m, &data, None, &plain).unwrap();
    let task: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir3.path().join("task.json")).unwrap())
            .unwrap();
    assert!(task.get("prompt_after_bos").is_none());

    // An encoder-decoder model has no place "after BOS".
    let t5 = model("t5-tiny");
    let dir4 = tmp();
    let mut cfg4 = base_config(dir4.path());
    cfg4.prompt_after_bos = true;
    let err = train(&t5, &toy_data(4, 1, eos(&t5)), None, &cfg4).unwrap_err();
    assert!(err.to_string().contains("BOS"), "{err}");
}

// ---- dev accuracy (rank classification) and selecting by it ----

/// Rank classification by hand: for each example, the class whose target has the lowest NLL
/// given `[prompt; source]` ([`nll_by_hand`]: one example at a time, no padding, log-softmax
/// written out); the fraction of examples whose own target (without its EOS) is that class.
fn accuracy_by_hand(m: &Model, prompt: &Tensor, data: &[Example], classes: &[Vec<u32>]) -> f64 {
    let eos = eos(m);
    let mut right = 0;
    for e in data {
        let nll: Vec<f64> = classes
            .iter()
            .map(|c| {
                let pair = Example { source: e.source.clone(), target: c.clone() };
                // mean_nll * tokens: the summed NLL of the class's target
                nll_by_hand(m, prompt, &[pair]) * c.len() as f64
            })
            .collect();
        let picked = (0..classes.len())
            .min_by(|&a, &b| nll[a].total_cmp(&nll[b]))
            .unwrap();
        let bare = e.target.strip_suffix(&[eos]).unwrap_or(&e.target);
        let gold = classes
            .iter()
            .position(|c| *c == e.target || c.as_slice() == bare)
            .expect("every dev target is a class");
        right += usize::from(picked == gold);
    }
    right as f64 / data.len() as f64
}

fn dev_rows(dir: &Path) -> Vec<metrics::StepMetrics> {
    metrics::read(&dir.join(metrics::FILE))
        .unwrap()
        .into_iter()
        .filter(|r| r.dev_loss.is_some())
        .collect()
}

/// The dev accuracy logged at the exported step is the rank-classification accuracy of the
/// saved adapter's prompt, computed by hand; for one-token classes (the targets carry an EOS
/// the classes do not, as `softprompt eval` scores decoder-only labels) and for classes that
/// include the EOS (scored over two tokens).
#[test]
fn dev_accuracy_is_rank_classification_of_the_saved_prompt() {
    let m = model("llama-tiny");
    let e = eos(&m);
    let data = toy_data(16, 1, e);
    let dev = toy_data(12, 9, e);
    for classes in [vec![vec![100], vec![200]], vec![vec![100, e], vec![200, e]]] {
        let dir = tmp();
        let mut cfg = base_config(dir.path());
        cfg.steps = 8;
        cfg.eval_every = 2;
        cfg.classes = Some(classes.clone());
        let report = train(&m, &data, Some(&dev), &cfg).unwrap();
        let rows = dev_rows(dir.path());
        assert_eq!(rows.iter().map(|r| r.step).collect::<Vec<_>>(), [2, 4, 6, 8]);
        let accs: Vec<f64> = rows.iter().map(|r| r.dev_accuracy.expect("dev accuracy logged")).collect();
        eprintln!("classes {classes:?}: dev accuracy {accs:?}, exported step {}", report.exported_step);
        let adapter = PeftAdapter::load(dir.path(), &Device::Cpu).unwrap();
        let by_hand = accuracy_by_hand(&m, &adapter.prompt, &dev, &classes);
        let logged = rows.iter().find(|r| r.step == report.exported_step).unwrap();
        assert_eq!(logged.dev_accuracy, Some(by_hand), "classes {classes:?}");
        assert_eq!(report.best_dev_accuracy, Some(by_hand));
        // Selection stays by dev loss by default.
        let min_loss = rows.iter().map(|r| r.dev_loss.unwrap()).fold(f64::INFINITY, f64::min);
        assert_eq!(logged.dev_loss, Some(min_loss));
    }
}

/// `select_by: Accuracy` exports the evaluation with the highest dev accuracy (ties: the
/// lower dev loss), and the adapter's prompt has that accuracy.
#[test]
fn select_by_accuracy_exports_the_most_accurate_evaluation() {
    let m = model("llama-tiny");
    let e = eos(&m);
    let data = toy_data(16, 1, e);
    let dev = toy_data(12, 9, e);
    let classes = vec![vec![100], vec![200]];
    let dir = tmp();
    let mut cfg = base_config(dir.path());
    cfg.steps = 12;
    cfg.eval_every = 1;
    cfg.classes = Some(classes.clone());
    cfg.select_by = SelectBy::Accuracy;
    let report = train(&m, &data, Some(&dev), &cfg).unwrap();
    let rows = dev_rows(dir.path());
    assert_eq!(rows.len(), 12);
    let key = |r: &metrics::StepMetrics| (r.dev_accuracy.unwrap(), -r.dev_loss.unwrap());
    let best = rows
        .iter()
        .fold(None::<&metrics::StepMetrics>, |b, r| match b {
            Some(b) if key(r) <= key(b) => Some(b),
            _ => Some(r),
        })
        .unwrap();
    let accs: Vec<f64> = rows.iter().map(|r| r.dev_accuracy.unwrap()).collect();
    let min_loss_step = rows
        .iter()
        .min_by(|a, b| a.dev_loss.unwrap().total_cmp(&b.dev_loss.unwrap()))
        .unwrap()
        .step;
    eprintln!("dev accuracy by step {accs:?}; most accurate step {}, lowest-loss step {min_loss_step}", best.step);
    assert!(accs.iter().any(|&a| a != accs[0]), "the accuracy never changed: a weak test");
    assert_eq!(report.best_step, Some(best.step));
    assert_eq!(report.exported_step, best.step);
    assert_eq!(report.best_dev_accuracy, best.dev_accuracy);
    assert_eq!(report.best_dev_loss, best.dev_loss);
    let adapter = PeftAdapter::load(dir.path(), &Device::Cpu).unwrap();
    assert_eq!(Some(accuracy_by_hand(&m, &adapter.prompt, &dev, &classes)), best.dev_accuracy);

    // Patience counts evaluations without a better accuracy.
    let dir2 = tmp();
    let mut cfg2 = cfg.clone();
    cfg2.output = dir2.path().to_path_buf();
    cfg2.patience = Some(2);
    let r2 = train(&m, &data, Some(&dev), &cfg2).unwrap();
    let rows2 = dev_rows(dir2.path());
    let mut best_key = None;
    let mut since = 0;
    let mut stop = None;
    for r in &rows2 {
        if best_key.is_none_or(|b| key(r) > b) {
            best_key = Some(key(r));
            since = 0;
        } else {
            since += 1;
            if since == 2 {
                stop = Some(r.step);
                break;
            }
        }
    }
    assert_eq!(r2.stopped_early, stop.is_some());
    assert_eq!(r2.steps, stop.unwrap_or(12));
}

/// A run selecting by accuracy, interrupted and resumed, ends as the uninterrupted run: same
/// best step, accuracy and exported prompt (the best accuracy comes back from metrics.jsonl,
/// or is measured again when that line is gone).
#[test]
fn select_by_accuracy_resumes_exactly() {
    let m = model("llama-tiny");
    let e = eos(&m);
    let data = toy_data(16, 1, e);
    let dev = toy_data(12, 9, e);
    let setup = |dir: &Path, steps: usize| {
        let mut cfg = base_config(dir);
        cfg.steps = steps;
        cfg.eval_every = 1;
        cfg.checkpoint_every = 1;
        cfg.classes = Some(vec![vec![100], vec![200]]);
        cfg.select_by = SelectBy::Accuracy;
        cfg
    };
    let straight = tmp();
    let r1 = train(&m, &data, Some(&dev), &setup(straight.path(), 10)).unwrap();
    for drop_log in [false, true] {
        let split = tmp();
        train(&m, &data, Some(&dev), &setup(split.path(), 5)).unwrap();
        if drop_log {
            std::fs::remove_file(split.path().join(metrics::FILE)).unwrap();
        }
        let mut resume = setup(split.path(), 10);
        resume.resume = true;
        let r2 = train(&m, &data, Some(&dev), &resume).unwrap();
        assert_eq!(r2.resumed_from, Some(5));
        assert_eq!(r1.best_step, r2.best_step, "metrics.jsonl removed: {drop_log}");
        assert_eq!(r1.best_dev_accuracy, r2.best_dev_accuracy);
        assert_eq!(f32_bits(&r1.prompt), f32_bits(&r2.prompt));
    }
    // Resuming with the other selection is another configuration.
    let mut by_loss = setup(straight.path(), 12);
    by_loss.select_by = SelectBy::Loss;
    by_loss.resume = true;
    let err = train(&m, &data, Some(&dev), &by_loss).unwrap_err();
    assert!(err.to_string().contains("another configuration"), "{err}");
}

#[test]
fn dev_accuracy_needs_matching_classes() {
    let m = model("llama-tiny");
    let e = eos(&m);
    let data = toy_data(8, 1, e);
    let dev = toy_data(6, 9, e);
    let dir = tmp();
    let mut cfg = base_config(dir.path());
    cfg.select_by = SelectBy::Accuracy;
    let err = train(&m, &data, Some(&dev), &cfg).unwrap_err();
    assert!(err.to_string().contains("classes"), "{err}");
    cfg.classes = Some(vec![vec![100], vec![200]]);
    let err = train(&m, &data, None, &cfg).unwrap_err();
    assert!(err.to_string().contains("dev set"), "{err}");
    // A dev target that is no class.
    let mut bad = dev.clone();
    bad[3].target = vec![150, e];
    let err = train(&m, &data, Some(&bad), &cfg).unwrap_err();
    assert!(err.to_string().contains("dev example 4"), "{err}");
    cfg.classes = Some(vec![vec![100], vec![]]);
    let err = train(&m, &data, Some(&dev), &cfg).unwrap_err();
    assert!(err.to_string().contains("class 2"), "{err}");
    // Nothing was trained.
    assert!(!dir.path().join(metrics::FILE).exists());
}
