//! The two baselines of the prompt-tuning paper's comparison, on the same data order and
//! objective as [`super::train`]:
//!
//! * [`model_tuning`]: every weight of the model is trained (AdamW), with no soft prompt: the
//!   hard prompt is the data's input as is. The output folder is itself a model folder:
//!   from a Hugging Face folder, `model.safetensors` (the tuned weights under their original
//!   names) and a copy of `config.json` (and `tokenizer.json`, `generation_config.json` when
//!   present); from a GGUF Llama file (trained as the dequantised f32 weights), a Hugging Face
//!   folder written by [`crate::load::export::write_hf_llama`] (q/k rows back in HF order).
//! * [`p_tuning`]: the prompt is the output of a [`PromptEncoder`] (Liu et al. 2021); the
//!   exported adapter holds that output as `prompt_embeddings` (a plain PEFT prompt-tuning
//!   adapter) and `task.json` records the encoder.
//!
//! Both write `metrics.jsonl`, `loss.svg` and `loss.png`, and keep a checkpoint like
//! [`super::train`]'s (`checkpoint/checkpoint.safetensors`, a [`ParamsCheckpoint`] with the
//! trained tensors, the optimizer's state and the data position), written every
//! `checkpoint_every` steps and at the end; with `resume` a run continues from it exactly.

use crate::batch::{collate, Example};
use crate::fsutil::write_atomic;
use crate::load::{export, gguf, hf, model_name, Model, Weights};
use crate::model::{llama, Backbone};
use crate::tokenizer::Tokenizer;
use crate::objective::target_nll;
use crate::prompt::encoder::{EncoderKind, PromptEncoder};
use crate::prompt::init::{init_prompt, PromptInit};
use crate::prompt::{AdapterConfig, PeftAdapter};
use crate::model::ModelInfo;
use crate::task::meta::{describe_init, EncoderMeta, TaskMeta};
use crate::train::checkpoint::{self, ParamsCheckpoint};
use crate::train::metrics::{MetricsLog, StepMetrics};
use crate::train::optim::clip_grad_norm;
use crate::train::plot;
use crate::train::trainer::{
    config_hash, dev_nll, epoch_batches, validate, TrainConfig,
};
use crate::{bail, Error, Result};
use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// What a baseline run did.
#[derive(Clone, Debug)]
pub struct BaselineReport {
    /// Optimizer steps done in total (resumed steps included).
    pub steps: usize,
    /// The step the run resumed from, if it did.
    pub resumed_from: Option<usize>,
    /// Loss of the first and last steps (read back from the metrics log after a resume).
    pub first_loss: f64,
    pub final_loss: f64,
    /// Mean target-token NLL on the dev set after training.
    pub dev_loss: Option<f64>,
}

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
    let mut vars: Vec<(String, Var)> = Vec::with_capacity(names.len());
    for name in &names {
        vars.push((name.clone(), Var::from_tensor(&map[name].contiguous()?)?));
    }
    drop(map);
    // The backbone is rebuilt from the vars' current tensors at every step: some models derive
    // tensors from their weights when built (e.g. GPT-2 transposes its Conv1D weights), and
    // those copies would not see the optimizer's in-place updates.
    let build = || -> Result<Model> {
        let tensors: HashMap<String, Tensor> = vars
            .iter()
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
    let run = run_loop(train, cfg, &model, 0, &vars, MODEL_TUNING, &hash, &|batch| {
        target_nll(&build()?.backbone, None, batch)
    })?;
    let tuned = build()?;
    let dev_loss = match dev {
        Some(d) => Some(dev_nll_no_prompt(&tuned, d, cfg)?),
        None => None,
    };

    // The output folder is a loadable model folder.
    let tensors: HashMap<String, Tensor> = vars
        .iter()
        .map(|(n, v)| Ok((n.clone(), v.as_tensor().detach().to_device(&Device::Cpu)?)))
        .collect::<Result<_>>()?;
    base.export(out, &tensors)?;
    drop(tensors);
    let mut task = TaskMeta::for_run(Some(MODEL_TUNING), &info, path, train.len(), dev.map(<[_]>::len), cfg.seed)?;
    task.optimizer = Some(format!("{:?}", cfg.optimizer));
    task.merge(&cfg.task)?;
    task.write(out)?;
    plot::plot_loss(&run.log.rows, &out.join(plot::FILE))?;
    Ok(BaselineReport {
        steps: run.steps,
        resumed_from: run.resumed_from,
        first_loss: run.first_loss,
        final_loss: run.final_loss,
        dev_loss,
    })
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
            Base::Gguf { path, config, .. } => {
                Backbone::Causal(Box::new(llama::Llama::new(config, weights, model_name(path))?))
            }
        })
    }

    /// Writes the tuned `tensors` (on the CPU) as a model folder `out`.
    fn export(&self, out: &Path, tensors: &HashMap<String, Tensor>) -> Result<()> {
        match self {
            Base::Folder { dir, .. } => {
                let target = out.join("model.safetensors");
                let tmp = out.join(".model.safetensors.tmp");
                candle_core::safetensors::save(tensors, &tmp)?;
                std::fs::rename(&tmp, &target).map_err(|e| Error::io(&target, e))?;
                for extra in ["config.json", "tokenizer.json", "generation_config.json", "tokenizer_config.json"] {
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

const MODEL_TUNING: &str = "model-tuning";
const P_TUNING: &str = "p-tuning";

/// The prompt-tuning [`config_hash`] of `cfg` extended with the baseline's own settings.
fn baseline_hash(
    cfg: &TrainConfig,
    info: &ModelInfo,
    train: &[Example],
    dev: Option<&[Example]>,
    extra: serde_json::Value,
) -> String {
    let text = format!("{} {extra}", config_hash(cfg, info, train, dev));
    Sha256::digest(text.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// P-tuning of a prompt of `cfg.n_tokens` tokens for the frozen `model`: the encoder's input
/// embeddings start from `cfg.init`, its network weights are drawn from `cfg.seed`. Writes the
/// adapter (the encoder's final output), `task.json` (with `"method": "p-tuning"` and the
/// encoder) and `encoder.safetensors` (every encoder parameter). Returns the report and the
/// trained encoder.
pub fn p_tuning(
    model: &Model,
    train: &[Example],
    dev: Option<&[Example]>,
    cfg: &TrainConfig,
    kind: EncoderKind,
    hidden: usize,
) -> Result<(BaselineReport, PromptEncoder)> {
    let info = model.backbone.info();
    validate(cfg, info, train, dev)?;
    let initial = init_prompt(&cfg.init, model, cfg.n_tokens, cfg.seed)?;
    let encoder = PromptEncoder::new(kind, &initial, hidden, cfg.seed)?;
    let out = &cfg.output;
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let hash = baseline_hash(
        cfg,
        info,
        train,
        dev,
        serde_json::json!({"method": P_TUNING, "encoder": kind.name(), "hidden": hidden}),
    );
    let run = run_loop(
        train,
        cfg,
        model,
        cfg.n_tokens,
        &encoder.named_vars(),
        P_TUNING,
        &hash,
        &|batch| {
            let prompt = encoder.forward()?; // [N, D]
            target_nll(&model.backbone, Some(&prompt), batch)
        },
    )?;
    let prompt = encoder.forward()?.detach();
    let dev_loss = match dev {
        Some(d) => Some(dev_nll(model, &prompt, d, cfg)?),
        None => None,
    };
    let mut config = AdapterConfig::new(info, cfg.n_tokens, cfg.init.peft_name());
    config.tokenizer_name_or_path = None;
    PeftAdapter::new(config, prompt.to_dtype(DType::F32)?.to_device(&Device::Cpu)?)?
        .save(out)?;
    let params: HashMap<String, Tensor> = encoder
        .named_vars()
        .into_iter()
        .map(|(n, v)| Ok((n, v.as_tensor().detach().to_device(&Device::Cpu)?)))
        .collect::<Result<_>>()?;
    let target = out.join("encoder.safetensors");
    let tmp = out.join(".encoder.safetensors.tmp");
    candle_core::safetensors::save(&params, &tmp)?;
    std::fs::rename(&tmp, &target).map_err(|e| Error::io(&target, e))?;

    let mut task = TaskMeta::for_run(Some(P_TUNING), info, &model.path, train.len(), dev.map(<[_]>::len), cfg.seed)?;
    task.encoder = Some(EncoderMeta { kind: kind.name().into(), hidden });
    task.n_tokens = Some(cfg.n_tokens);
    task.init = Some(describe_init(&cfg.init));
    task.merge(&cfg.task)?;
    task.write(out)?;
    plot::plot_loss(&run.log.rows, &out.join(plot::FILE))?;
    Ok((
        BaselineReport {
            steps: run.steps,
            resumed_from: run.resumed_from,
            first_loss: run.first_loss,
            final_loss: run.final_loss,
            dev_loss,
        },
        encoder,
    ))
}

fn dev_nll_no_prompt(model: &Model, dev: &[Example], cfg: &TrainConfig) -> Result<f64> {
    let info = model.backbone.info();
    let mut total = 0f64;
    let mut count = 0usize;
    for chunk in dev.chunks(cfg.batch_size.max(1)) {
        let batch = collate(chunk, info, 0, &model.device)?;
        let nll = target_nll(&model.backbone, None, &batch)?.detach();
        total += nll.to_dtype(DType::F64)?.sum_all()?.to_scalar::<f64>()?;
        count += nll.dim(0)?;
    }
    Ok(total / count.max(1) as f64)
}

/// What [`run_loop`] did.
struct LoopResult {
    steps: usize,
    resumed_from: Option<usize>,
    first_loss: f64,
    final_loss: f64,
    log: MetricsLog,
}

/// The shared loop of the baselines: the data order of [`super::train`] (same seed, same
/// batches), `grad_accum` batches per step with the token-mean loss over the step, optional
/// clipping by global norm, the optimizer of `cfg` over the vars of `named`. `nll` gives the
/// per-target-token NLL `[M]` of a batch (collated for a prompt of `n_prompt` tokens),
/// differentiable with respect to those vars. Checkpoints (`method`, `hash`) are written every
/// `cfg.checkpoint_every` steps and after the last; with `cfg.resume` the run first restores
/// the vars, the optimizer and the data position from the checkpoint of `cfg.output`.
#[allow(clippy::too_many_arguments)]
fn run_loop(
    train: &[Example],
    cfg: &TrainConfig,
    model: &Model,
    n_prompt: usize,
    named: &[(String, Var)],
    method: &str,
    hash: &str,
    nll: &dyn Fn(&crate::batch::Batch) -> Result<Tensor>,
) -> Result<LoopResult> {
    let info = model.backbone.info();
    let out = &cfg.output;
    let vars: Vec<Var> = named.iter().map(|(_, v)| v.clone()).collect();
    let mut optimizer = cfg.optimizer.build(vars.clone())?;
    let (mut step, mut epoch, mut position) = (0usize, 0usize, 0usize);
    let ckpt = checkpoint::path(out);
    let mut resumed_from = None;
    if ckpt.exists() {
        if !cfg.resume {
            return Err(Error::format(
                &ckpt,
                "the output folder already has a checkpoint: pass --resume to continue that run, \
                 or choose another output folder",
            ));
        }
        if let Some(c) = ParamsCheckpoint::load(out, &model.device)? {
            restore(&c, named, method, hash, &ckpt)?;
            optimizer.load_state(&c.optimizer)?;
            (step, epoch, position) = (c.step, c.epoch, c.position);
            resumed_from = Some(c.step);
        }
    }
    let mut log = MetricsLog::open(out, resumed_from)?;
    let lengths: Vec<usize> = train
        .iter()
        .map(|e| e.source.len() + e.target.len())
        .collect();
    let mut plan = epoch_batches(&lengths, cfg.batch_size, cfg.seed, epoch);
    while step < cfg.steps {
        let started = std::time::Instant::now();
        let mut micro: Vec<Vec<Example>> = Vec::with_capacity(cfg.grad_accum);
        for _ in 0..cfg.grad_accum {
            if position >= plan.len() {
                epoch += 1;
                position = 0;
                plan = epoch_batches(&lengths, cfg.batch_size, cfg.seed, epoch);
            }
            micro.push(plan[position].iter().map(|&i| train[i].clone()).collect());
            position += 1;
        }
        let target_tokens: usize = micro.iter().flatten().map(|e| e.target.len()).sum();
        let scale = 1.0 / target_tokens as f64;
        let mut grads = GradStore::default();
        let mut loss_sum = 0f64;
        let mut n_tokens = 0usize;
        for examples in &micro {
            let batch = collate(examples, info, n_prompt, &model.device)?;
            n_tokens += batch.n_tokens;
            let loss = nll(&batch)?.sum_all()?.affine(scale, 0.0)?;
            loss_sum += loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            let mut g = loss.backward()?;
            for v in &vars {
                if let Some(gv) = g.remove(v.as_tensor()) {
                    let sum = match grads.get(v.as_tensor()) {
                        Some(prev) => (prev + gv)?,
                        None => gv,
                    };
                    grads.insert(v.as_tensor(), sum);
                }
            }
        }
        if !loss_sum.is_finite() {
            bail!(
                "training diverged at step {}: the loss is {loss_sum} (try a lower learning rate); \
                 the last checkpoint is intact",
                step + 1
            );
        }
        let grad_norm = match cfg.clip {
            Some(max) => clip_grad_norm(&mut grads, &vars, max)?,
            None => {
                let mut sq = 0f64;
                for v in &vars {
                    if let Some(g) = grads.get(v.as_tensor()) {
                        sq += g.to_dtype(DType::F64)?.sqr()?.sum_all()?.to_scalar::<f64>()?;
                    }
                }
                sq.sqrt()
            }
        };
        if !grad_norm.is_finite() {
            bail!("the gradient is not finite at step {} (norm {grad_norm})", step + 1);
        }
        let lr = cfg.schedule.lr_at(step);
        if optimizer.step(&grads, lr)? == 0 {
            bail!("no trainable parameter received a gradient");
        }
        step += 1;
        let elapsed = started.elapsed().as_secs_f64();
        log.append(StepMetrics {
            step,
            loss: loss_sum,
            lr,
            grad_norm,
            tokens_per_s: if elapsed > 0.0 { n_tokens as f64 / elapsed } else { 0.0 },
            dev_loss: None,
            dev_accuracy: None,
        })?;
        if step == cfg.steps || (cfg.checkpoint_every > 0 && step.is_multiple_of(cfg.checkpoint_every)) {
            ParamsCheckpoint {
                method: method.to_string(),
                step,
                epoch,
                position,
                params: named
                    .iter()
                    .map(|(n, v)| (n.clone(), v.as_tensor().detach()))
                    .collect(),
                optimizer: optimizer.state()?,
                config_hash: hash.to_string(),
            }
            .save(out)?;
            plot::plot_loss(&log.rows, &out.join(plot::FILE))?;
        }
    }
    // Every step is logged, so the log holds the first and last losses, resumed or not.
    let first_loss = log.rows.first().map_or(f64::NAN, |r| r.loss);
    let final_loss = log.rows.last().map_or(f64::NAN, |r| r.loss);
    Ok(LoopResult {
        steps: step,
        resumed_from,
        first_loss,
        final_loss,
        log,
    })
}

/// Checks that `c` was written by this run's method and configuration and holds exactly the
/// tensors of `named` with their shapes, then copies them into the vars.
fn restore(
    c: &ParamsCheckpoint,
    named: &[(String, Var)],
    method: &str,
    hash: &str,
    path: &Path,
) -> Result<()> {
    if c.method != method {
        return Err(Error::format(
            path,
            format!(
                "the checkpoint was written by a {} run, not {method}; resume it with \
                 --method {}, or choose another output folder",
                c.method, c.method
            ),
        ));
    }
    if c.config_hash != hash {
        return Err(Error::format(
            path,
            "the checkpoint was written by a run with another configuration or data \
             (optimizer, schedule, batching, clipping, seed, encoder, model or examples differ); \
             use the same settings to resume or another output folder",
        ));
    }
    let mut saved: HashMap<&str, &Tensor> = c.params.iter().map(|(n, t)| (n.as_str(), t)).collect();
    for (name, var) in named {
        let Some(t) = saved.remove(name.as_str()) else {
            return Err(Error::format(path, format!("checkpoint: missing tensor `{name}`")));
        };
        if t.dims() != var.dims() {
            return Err(Error::format(
                path,
                format!(
                    "checkpoint: tensor `{name}` is {:?}, the run's is {:?}",
                    t.dims(),
                    var.dims()
                ),
            ));
        }
        var.set(&t.to_dtype(var.dtype())?.to_device(var.device())?)?;
    }
    if let Some(extra) = saved.keys().next() {
        return Err(Error::format(
            path,
            format!("checkpoint: unexpected tensor `{extra}` (not a parameter of this run)"),
        ));
    }
    Ok(())
}
