//! Model tuning, the first baseline of the prompt-tuning paper's comparison: every weight of
//! the model is trained (AdamW), with no soft prompt: the hard prompt is the data's input as
//! is. A configuration of the one training loop (`train::step_loop`) on the data order and
//! objective of prompt tuning. The output folder is itself a model folder: from a Hugging Face
//! folder, `model.safetensors` (the tuned weights under their original names) and a copy of
//! `config.json` (and `tokenizer.json`, `generation_config.json` when present); from a GGUF
//! Llama file (trained as the dequantised f32 weights), a Hugging Face folder written by
//! [`crate::load::export::write_hf_llama`] (q/k rows back in HF order).
//!
//! Both baselines (this and [`p_tuning`]) write `metrics.jsonl` (a line every step),
//! `loss.svg` and `loss.png`, and keep a checkpoint like prompt tuning's
//! (`checkpoint/checkpoint.safetensors`, a [`ParamsCheckpoint`](super::checkpoint::ParamsCheckpoint)
//! with the trained tensors, the optimizer's state and the data position), written every
//! `checkpoint_every` steps and at the end; with `resume` a run continues from it exactly.

use crate::batch::{collate_shard, Example};
use crate::fsutil::write_atomic;
use crate::load::{export, gguf, hf, model_name, Model, Weights};
use crate::model::{llama, Backbone};
use crate::objective::target_nll;
use crate::prompt::init::PromptInit;
use crate::tokenizer::Tokenizer;
use crate::train::baseline::run_baseline;
use crate::train::config::TrainConfig;
use crate::train::data::validate;
use crate::train::dev_eval::dev_nll_without_prompt;
use crate::train::export::{run_task_fields, save_tensors_atomic, write_task_json};
use crate::train::plot;
use crate::train::run_id::baseline_hash;
use crate::train::step_loop::BatchLoss;
use crate::{Error, Result};
use candle_core::{Device, Tensor, Var};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

pub use crate::train::baseline::BaselineReport;
pub use crate::train::p_tuning::p_tuning;

/// The method's name in checkpoints and `task.json`.
const MODEL_TUNING: &str = "model-tuning";

/// Full fine-tuning of `path`, a Hugging Face model folder or a GGUF Llama file (see the
/// module doc). `cfg.n_tokens` and `cfg.init` are ignored (there is no soft prompt); the
/// optimizer is `cfg.optimizer` (AdamW in the paper's comparison).
pub fn model_tuning(
    path: &Path,
    device: &Device,
    train: &[Example],
    dev: Option<&[Example]>,
    cfg: &TrainConfig,
) -> Result<BaselineReport> {
    let (base, map) = Base::open(path, device)?;
    let mut names: Vec<String> = map.keys().cloned().collect();
    names.sort();
    let mut vars: Vec<Var> = Vec::with_capacity(names.len());
    for name in &names {
        vars.push(Var::from_tensor(&map[name].contiguous()?)?);
    }
    drop(map);
    // The backbone is rebuilt from the vars' current tensors at every step: some models derive
    // tensors from their weights when built (e.g. GPT-2 transposes its Conv1D weights), and
    // those copies would not see the optimizer's in-place updates.
    let build = || -> Result<Model> {
        let tensors: HashMap<String, Tensor> = names
            .iter()
            .zip(&vars)
            .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
            .collect();
        Ok(Model {
            backbone: base.backbone(&Weights::new(tensors, base.source()))?,
            tokenizer: None,
            path: path.to_path_buf(),
            device: device.clone(),
        })
    };
    let model = build()?;
    let info = model.backbone.info().clone();
    // The context check counts one prompt position: conservative by one token.
    let mut check = cfg.clone();
    check.n_tokens = 1;
    validate(&check, &info, train, dev)?;
    let out = &cfg.output;
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;

    // n_tokens and init are not used: they must not stop a resume.
    let mut hashed = cfg.clone();
    hashed.n_tokens = 0;
    hashed.init = PromptInit::default();
    let hash = baseline_hash(
        &hashed,
        &info,
        train,
        dev,
        serde_json::json!({"method": MODEL_TUNING}),
    );
    let loss = |examples: &[Example], shard: std::ops::Range<usize>| -> Result<BatchLoss> {
        let batch = collate_shard(examples, shard, &info, 0, device)?;
        let nll = target_nll(&build()?.backbone, None, &batch)?; // [M]
        Ok(BatchLoss {
            nll,
            tokens: batch.n_tokens,
        })
    };
    let named = names.iter().cloned().zip(vars.iter().cloned()).collect();
    let run = run_baseline(cfg, MODEL_TUNING, named, &loss, &hash, device, train)?;
    let dev_loss = match dev {
        Some(d) => Some(dev_nll_without_prompt(&build()?, d, cfg)?),
        None => None,
    };

    if !cfg.parallel.is_root() {
        // Rank 0 writes; every rank holds the same weights.
        return Ok(BaselineReport::from_run(&run, dev_loss));
    }
    // The output folder is a loadable model folder.
    let tensors: HashMap<String, Tensor> = names
        .iter()
        .zip(&vars)
        .map(|(n, v)| Ok((n.clone(), v.as_tensor().detach().to_device(&Device::Cpu)?)))
        .collect::<Result<_>>()?;
    base.export(out, &tensors)?;
    drop(tensors);
    let mut task = run_task_fields(&model, cfg, train, dev)?;
    task.method = Some(MODEL_TUNING.into());
    task.optimizer = Some(format!("{:?}", cfg.optimizer));
    write_task_json(cfg, task)?;
    plot::plot_loss(&run.log.rows, &out.join(plot::FILE))?;
    Ok(BaselineReport::from_run(&run, dev_loss))
}

/// What model tuning starts from.
enum Base {
    /// A Hugging Face model folder: its `config.json` builds the model; its files are copied.
    Folder { dir: PathBuf, source: PathBuf },
    /// A GGUF Llama file: trained in GGUF's layout (q/k rows permuted, adjacent-pair RoPE),
    /// written as a Hugging Face folder.
    Gguf {
        path: PathBuf,
        config: Box<llama::Config>,
        tokenizer: Box<Tokenizer>,
    },
}

impl Base {
    /// The base at `path` and its weights (f32, on `device`).
    fn open(path: &Path, device: &Device) -> Result<(Base, HashMap<String, Tensor>)> {
        if path.is_dir() {
            let weights = Weights::from_safetensors(&hf::weight_files(path)?, device)?;
            let base = Base::Folder {
                dir: path.to_path_buf(),
                source: weights.source().to_path_buf(),
            };
            return Ok((base, weights.into_map()));
        }
        let gguf::GgufLlama {
            tensors,
            config,
            tokenizer,
            ..
        } = gguf::read(path, device)?;
        let base = Base::Gguf {
            path: path.to_path_buf(),
            config: Box::new(config),
            tokenizer: Box::new(tokenizer),
        };
        Ok((base, tensors))
    }

    /// The file or folder the weights came from, for error messages.
    fn source(&self) -> &Path {
        match self {
            Base::Folder { source, .. } => source,
            Base::Gguf { path, .. } => path,
        }
    }

    /// The model computed with `weights`.
    fn backbone(&self, weights: &Weights) -> Result<Backbone> {
        Ok(match self {
            Base::Folder { dir, .. } => hf::build_backbone(dir, weights)?.0,
            Base::Gguf { path, config, .. } => Backbone::Causal(Box::new(llama::Llama::new(
                config,
                weights,
                model_name(path),
            )?)),
        })
    }

    /// Writes the tuned `tensors` (on the CPU) as a model folder `out`.
    fn export(&self, out: &Path, tensors: &HashMap<String, Tensor>) -> Result<()> {
        match self {
            Base::Folder { dir, .. } => {
                save_tensors_atomic(&out.join("model.safetensors"), tensors)?;
                for extra in [
                    "config.json",
                    "tokenizer.json",
                    "generation_config.json",
                    "tokenizer_config.json",
                ] {
                    let src = dir.join(extra);
                    if src.is_file() {
                        let bytes = std::fs::read(&src).map_err(|e| Error::io(&src, e))?;
                        write_atomic(&out.join(extra), &bytes)?;
                    }
                }
                Ok(())
            }
            Base::Gguf {
                config, tokenizer, ..
            } => export::write_hf_llama(out, config, tensors, tokenizer),
        }
    }
}
