//! The two baselines of the prompt-tuning paper's comparison, on the same data order and
//! objective as [`super::train`]:
//!
//! * [`model_tuning`]: every weight of the model is trained (AdamW), with no soft prompt: the
//!   hard prompt is the data's input as is. The output folder is itself a model folder:
//!   `model.safetensors` (the tuned weights under their original names), a copy of
//!   `config.json` (and `tokenizer.json`, `generation_config.json` when present).
//! * [`p_tuning`]: the prompt is the output of a [`PromptEncoder`] (Liu et al. 2021); the
//!   exported adapter holds that output as `prompt_embeddings` (a plain PEFT prompt-tuning
//!   adapter) and `task.json` records the encoder.
//!
//! Both write `metrics.jsonl` and `loss.svg`; they keep no checkpoint (a run cannot resume).

use crate::batch::{collate, Example};
use crate::fsutil::write_atomic;
use crate::load::{hf, Model, Weights};
use crate::objective::target_nll;
use crate::prompt::encoder::{EncoderKind, PromptEncoder};
use crate::prompt::init::init_prompt;
use crate::prompt::{AdapterConfig, PeftAdapter};
use crate::train::metrics::{MetricsLog, StepMetrics};
use crate::train::optim::clip_grad_norm;
use crate::train::plot;
use crate::train::trainer::{dev_nll, epoch_batches, validate, TrainConfig, TASK_FILE};
use crate::{bail, Error, Result};
use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use std::collections::HashMap;
use std::path::Path;

/// What a baseline run did.
#[derive(Clone, Debug)]
pub struct BaselineReport {
    pub steps: usize,
    /// Loss of the first and last steps.
    pub first_loss: f64,
    pub final_loss: f64,
    /// Mean target-token NLL on the dev set after training.
    pub dev_loss: Option<f64>,
}

/// Full fine-tuning of the HF model folder `dir` (see the module doc). `cfg.n_tokens` and
/// `cfg.init` are ignored (there is no soft prompt); the optimizer is `cfg.optimizer`
/// (AdamW in the paper's comparison).
pub fn model_tuning(
    dir: &Path,
    device: &Device,
    train: &[Example],
    dev: Option<&[Example]>,
    cfg: &TrainConfig,
) -> Result<BaselineReport> {
    if !dir.is_dir() {
        return Err(Error::format(
            dir,
            "model tuning needs a Hugging Face model folder (config.json + safetensors); \
             GGUF files are not supported: convert the model to a folder first",
        ));
    }
    let files = hf::weight_files(dir)?;
    let weights = Weights::from_safetensors(&files, device)?;
    let source = weights.source().to_path_buf();
    let mut names: Vec<String> = weights.names().cloned().collect();
    names.sort();
    let map = weights.into_map();
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
        let (backbone, _) = hf::build_backbone(dir, &Weights::new(tensors, &source))?;
        Ok(Model {
            backbone,
            tokenizer: None,
            path: dir.to_path_buf(),
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

    let all: Vec<Var> = vars.iter().map(|(_, v)| v.clone()).collect();
    let (first_loss, final_loss, log) = run_loop(train, cfg, &model, 0, all, &|batch| {
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
    let target = out.join("model.safetensors");
    let tmp = out.join(".model.safetensors.tmp");
    candle_core::safetensors::save(&tensors, &tmp)?;
    std::fs::rename(&tmp, &target).map_err(|e| Error::io(&target, e))?;
    for extra in ["config.json", "tokenizer.json", "generation_config.json", "tokenizer_config.json"] {
        let src = dir.join(extra);
        if src.is_file() {
            let bytes = std::fs::read(&src).map_err(|e| Error::io(&src, e))?;
            write_atomic(&out.join(extra), &bytes)?;
        }
    }
    let mut task = serde_json::Map::new();
    task.insert("method".into(), "model-tuning".into());
    task.insert("model".into(), info.name.clone().into());
    task.insert("model_path".into(), dir.display().to_string().into());
    task.insert("optimizer".into(), format!("{:?}", cfg.optimizer).into());
    task.insert("train_examples".into(), train.len().into());
    task.insert("dev_examples".into(), dev.map(|d| d.len()).into());
    task.insert("seed".into(), cfg.seed.into());
    for (k, v) in &cfg.task {
        task.insert(k.clone(), v.clone());
    }
    write_task(out, task)?;
    plot::plot_loss(&log.rows, &out.join(plot::FILE))?;
    Ok(BaselineReport {
        steps: cfg.steps,
        first_loss,
        final_loss,
        dev_loss,
    })
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
    let (first_loss, final_loss, log) = run_loop(
        train,
        cfg,
        model,
        cfg.n_tokens,
        encoder.vars(),
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

    let mut task = serde_json::Map::new();
    task.insert("method".into(), "p-tuning".into());
    task.insert(
        "encoder".into(),
        serde_json::json!({"kind": kind.name(), "hidden": hidden}),
    );
    task.insert("model".into(), info.name.clone().into());
    task.insert("model_path".into(), model.path.display().to_string().into());
    task.insert("n_tokens".into(), cfg.n_tokens.into());
    task.insert("init".into(), cfg.init.describe());
    task.insert("train_examples".into(), train.len().into());
    task.insert("dev_examples".into(), dev.map(|d| d.len()).into());
    task.insert("seed".into(), cfg.seed.into());
    for (k, v) in &cfg.task {
        task.insert(k.clone(), v.clone());
    }
    write_task(out, task)?;
    plot::plot_loss(&log.rows, &out.join(plot::FILE))?;
    Ok((
        BaselineReport {
            steps: cfg.steps,
            first_loss,
            final_loss,
            dev_loss,
        },
        encoder,
    ))
}

fn write_task(out: &Path, task: serde_json::Map<String, serde_json::Value>) -> Result<()> {
    let text = serde_json::to_string_pretty(&serde_json::Value::Object(task))
        .map_err(|e| Error::invalid(format!("task.json: {e}")))?;
    write_atomic(&out.join(TASK_FILE), text.as_bytes())
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

/// The shared loop of the baselines: the data order of [`super::train`] (same seed, same
/// batches), `grad_accum` batches per step with the token-mean loss over the step, optional
/// clipping by global norm, the optimizer of `cfg` over `vars`. `nll` gives the per-target-token
/// NLL `[M]` of a batch (collated for a prompt of `n_prompt` tokens), differentiable with respect
/// to `vars`. Returns the first and last step losses and the metrics log.
fn run_loop(
    train: &[Example],
    cfg: &TrainConfig,
    model: &Model,
    n_prompt: usize,
    vars: Vec<Var>,
    nll: &dyn Fn(&crate::batch::Batch) -> Result<Tensor>,
) -> Result<(f64, f64, MetricsLog)> {
    let info = model.backbone.info();
    let mut optimizer = cfg.optimizer.build(vars.clone())?;
    let mut log = MetricsLog::open(&cfg.output, None)?;
    let lengths: Vec<usize> = train
        .iter()
        .map(|e| e.source.len() + e.target.len())
        .collect();
    let (mut epoch, mut position) = (0usize, 0usize);
    let mut plan = epoch_batches(&lengths, cfg.batch_size, cfg.seed, epoch);
    let (mut first, mut last) = (f64::NAN, f64::NAN);
    for step in 0..cfg.steps {
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
                "training diverged at step {}: the loss is {loss_sum} (try a lower learning rate)",
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
        if step == 0 {
            first = loss_sum;
        }
        last = loss_sum;
        let elapsed = started.elapsed().as_secs_f64();
        log.append(StepMetrics {
            step: step + 1,
            loss: loss_sum,
            lr,
            grad_norm,
            tokens_per_s: if elapsed > 0.0 { n_tokens as f64 / elapsed } else { 0.0 },
            dev_loss: None,
        })?;
    }
    Ok((first, last, log))
}
