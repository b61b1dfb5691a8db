//! `softprompt train`: prompt tuning on a JSONL data set, with the paper's recipe as defaults.

use crate::common;
use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use softprompt::batch::Example;
use softprompt::prompt::{EncoderKind, PeftAdapter, PromptInit};
use softprompt::task::{encode_pair, movie, read_jsonl, ClassificationTask};
use softprompt::train::optim::{AdafactorConfig, AdamWConfig, OptimizerConfig};
use softprompt::train::schedule::Schedule;
use softprompt::train::trainer::{gold_labels, SelectBy};
use softprompt::train::{model_tuning, p_tuning, train, BaselineReport, TrainConfig};
use std::path::{Path, PathBuf};

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum InitKind {
    /// Values from U[-r, r] (--init-range, default 0.5).
    RandomUniform,
    /// Embeddings of distinct tokens drawn from the 5,000 most common (lowest-id) tokens.
    SampledVocab,
    /// One slot per --labels entry (multi-token labels averaged), the rest sampled-vocab.
    ClassLabels,
    /// Embeddings of --init-text's tokens, repeated or cut to fill the prompt.
    Text,
    /// The prompt of a PEFT adapter folder (--init-file): prompt transfer.
    File,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum OptimizerKind {
    /// The paper's: T5X Adafactor, decay 0.8, update clipping 1.0, no momentum.
    Adafactor,
    /// torch.optim.AdamW (betas 0.9, 0.999; eps 1e-8).
    Adamw,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Method {
    /// Lester et al. 2021: a soft prompt trained on the frozen model.
    PromptTuning,
    /// Baseline: every weight trained (AdamW), no soft prompt; writes a model folder.
    ModelTuning,
    /// Baseline (Liu et al. 2021): the prompt is the output of a trained prompt encoder.
    PTuning,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum EncoderArg {
    /// Linear-ReLU-Linear-ReLU-Linear (PEFT's MLP).
    Mlp,
    /// A 2-layer bidirectional LSTM followed by an MLP (PEFT's LSTM).
    Lstm,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum SelectByArg {
    /// The lowest dev loss.
    Loss,
    /// The highest dev accuracy (rank classification over --labels; ties: the lower dev loss).
    Accuracy,
}

/// The built-in task `--data` / `--dev` may name instead of a file.
const BUILTIN_TASK: &str = "movie-sentiment";

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum ScheduleKind {
    Constant,
    Linear,
    Cosine,
}

/// Defaults are the prompt-tuning paper's recipe (Lester et al. 2021).
#[derive(Args)]
pub struct TrainArgs {
    /// Model: a GGUF file, a Hugging Face model folder, or `smollm2` (model tuning of a GGUF
    /// file writes a Hugging Face folder).
    #[arg(long)]
    pub model: String,
    /// What is trained: the soft prompt (the paper's method), all the model's weights
    /// (model tuning), or a prompt encoder (P-tuning).
    #[arg(long, value_enum, default_value_t = Method::PromptTuning)]
    pub method: Method,
    /// The prompt encoder of --method p-tuning.
    #[arg(long, value_enum)]
    pub encoder: Option<EncoderArg>,
    /// Hidden size of the prompt encoder of --method p-tuning [default: the model's width].
    #[arg(long)]
    pub encoder_hidden: Option<usize>,
    /// Training data: JSONL of {"input": ..., "target": ...} lines, or `movie-sentiment`: the
    /// built-in task's train split with its template and verbalizer (the examples of
    /// `softprompt run movie-sentiment`; its labels are then the default --labels).
    #[arg(long)]
    pub data: PathBuf,
    /// Dev data (same format, or `movie-sentiment` with --data movie-sentiment: its dev
    /// split): evaluated every --eval-every steps (dev loss, and with --labels dev accuracy);
    /// the prompt of the best evaluation (--select-by) is the one exported.
    #[arg(long)]
    pub dev: Option<PathBuf>,
    /// Use only the first N dev examples.
    #[arg(long)]
    pub dev_limit: Option<usize>,
    /// The dev metric that picks the exported prompt and drives --patience; accuracy needs
    /// --labels (or a built-in task) and every dev target to be one of them.
    #[arg(long, value_enum, default_value_t = SelectByArg::Loss)]
    pub select_by: SelectByArg,
    /// With --data movie-sentiment: also write the task's seeded train/dev/test splits to
    /// this folder as `train.jsonl`, `dev.jsonl`, `test.jsonl` ({"input": template applied,
    /// "target": verbalizer}, the format --data and `softprompt eval --data` read).
    #[arg(long)]
    pub write_splits: Option<PathBuf>,
    /// Prompt length in virtual tokens [default: 100, the paper's; 20 is nearly as good;
    /// with --init file, the adapter's length].
    #[arg(long)]
    pub n_tokens: Option<usize>,
    /// Prompt initialisation [default: class-labels with --labels, text with --init-text,
    /// file with --init-file, else sampled-vocab].
    #[arg(long, value_enum)]
    pub init: Option<InitKind>,
    /// Text for --init text.
    #[arg(long)]
    pub init_text: Option<String>,
    /// PEFT adapter folder for --init file.
    #[arg(long)]
    pub init_file: Option<PathBuf>,
    /// Class labels, comma separated, as the targets spell them (e.g. ` negative, positive`):
    /// for --init class-labels, and for the dev accuracy (rank classification) when every dev
    /// target is one of them.
    #[arg(long, value_delimiter = ',')]
    pub labels: Vec<String>,
    /// Half-width r of U[-r, r] for --init random-uniform.
    #[arg(long, default_value_t = 0.5)]
    pub init_range: f64,
    /// Optimizer [default: adafactor; adamw for model tuning and P-tuning].
    #[arg(long, value_enum)]
    pub optimizer: Option<OptimizerKind>,
    /// Learning rate [default: 0.3; model tuning 1e-4; P-tuning 1e-3].
    #[arg(long)]
    pub lr: Option<f64>,
    #[arg(long, value_enum, default_value_t = ScheduleKind::Constant)]
    pub schedule: ScheduleKind,
    /// Linear warmup steps before the schedule.
    #[arg(long, default_value_t = 0)]
    pub warmup_steps: usize,
    /// Weight decay (Adafactor: per step, not scaled by the learning rate; AdamW: decoupled)
    /// [default: 1e-5; model tuning and P-tuning 0.01].
    #[arg(long)]
    pub weight_decay: Option<f64>,
    /// Total optimizer steps (a resumed run continues up to this many).
    #[arg(long, default_value_t = 30_000)]
    pub steps: usize,
    /// Examples per batch.
    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,
    /// Batches per optimizer step (gradient accumulation).
    #[arg(long, default_value_t = 1)]
    pub grad_accum: usize,
    /// Clip the prompt gradient to this global L2 norm.
    #[arg(long)]
    pub clip: Option<f64>,
    /// Seed of the prompt initialisation and the data order.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Evaluate on --dev every this many steps (and after the last); 0: only after the last.
    #[arg(long, default_value_t = 100)]
    pub eval_every: usize,
    /// Stop after this many evaluations without a better dev metric (--select-by).
    #[arg(long)]
    pub patience: Option<usize>,
    /// Write a checkpoint every this many steps (and at the end); 0: only at the end.
    #[arg(long, default_value_t = 100)]
    pub checkpoint_every: usize,
    /// Write a metrics.jsonl line every this many steps.
    #[arg(long, default_value_t = 1)]
    pub log_every: usize,
    /// Output folder: PEFT adapter, task.json, metrics.jsonl, loss.svg, loss.png, checkpoint/.
    #[arg(long)]
    pub output: PathBuf,
    /// Continue the run whose checkpoint is in --output (same settings and data), exactly
    /// where it stopped; without a checkpoint, start from scratch.
    #[arg(long)]
    pub resume: bool,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
    /// Decoder-only models: put the soft prompt after the BOS token, `[BOS; prompt; input]`,
    /// instead of before the whole input (the prompt-tuning code's `prefix_prompt_after_bos`).
    #[arg(long)]
    pub prompt_after_bos: bool,
}

/// The prompt initialisation; `labels`: --labels, or the built-in task's.
fn prompt_init(args: &TrainArgs, labels: &[String]) -> Result<PromptInit> {
    let kind = args.init.unwrap_or(if args.init_file.is_some() {
        InitKind::File
    } else if args.init_text.is_some() {
        InitKind::Text
    } else if !labels.is_empty() {
        InitKind::ClassLabels
    } else {
        InitKind::SampledVocab
    });
    Ok(match kind {
        InitKind::RandomUniform => PromptInit::RandomUniform {
            range: args.init_range,
        },
        InitKind::SampledVocab => PromptInit::SampledVocab,
        InitKind::ClassLabels => {
            if labels.is_empty() {
                bail!("--init class-labels needs --labels (comma separated)");
            }
            PromptInit::ClassLabels(labels.to_vec())
        }
        InitKind::Text => match &args.init_text {
            Some(t) => PromptInit::Text(t.clone()),
            None => bail!("--init text needs --init-text"),
        },
        InitKind::File => match &args.init_file {
            Some(d) => PromptInit::File(d.clone()),
            None => bail!("--init file needs --init-file (a PEFT adapter folder)"),
        },
    })
}

fn read_examples(path: &Path, model: &softprompt::load::Model) -> Result<Vec<Example>> {
    let pairs = read_jsonl(path)?;
    if pairs.is_empty() {
        bail!("{}: no examples", path.display());
    }
    let tokenizer = model.tokenizer()?;
    let info = model.backbone.info();
    pairs
        .iter()
        .map(|p| {
            encode_pair(tokenizer, info, p)
                .with_context(|| format!("{}:{}", path.display(), p.line))
        })
        .collect()
}

/// `--data` / `--dev` naming the built-in task (a file of that name wins).
fn is_builtin(path: &Path) -> bool {
    path.as_os_str() == BUILTIN_TASK && !path.exists()
}

/// The built-in task when `--data` names it; checks the options that go with it.
fn builtin_task(args: &TrainArgs) -> Result<Option<ClassificationTask>> {
    let data = is_builtin(&args.data);
    if args.dev.as_deref().is_some_and(is_builtin) && !data {
        bail!("--dev {BUILTIN_TASK} needs --data {BUILTIN_TASK} (its dev split goes with its train split)");
    }
    if args.write_splits.is_some() && !data {
        bail!("--write-splits needs --data {BUILTIN_TASK}");
    }
    if args.dev_limit.is_some() && args.dev.is_none() {
        bail!("--dev-limit needs --dev");
    }
    if args.dev_limit == Some(0) {
        bail!("--dev-limit must be at least 1");
    }
    if !data {
        return Ok(None);
    }
    Ok(Some(movie::load().context("preparing movie-sentiment")?))
}

/// Writes the task's splits as `{"input", "target"}` JSONL files into `dir`.
fn write_splits(dir: &Path, task: &ClassificationTask) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    for (name, rows) in [("train", &task.train), ("dev", &task.dev), ("test", &task.test)] {
        let mut text = String::new();
        for p in task.pairs(rows) {
            text.push_str(&serde_json::json!({"input": p.input, "target": p.target}).to_string());
            text.push('\n');
        }
        softprompt::fsutil::write_atomic(&dir.join(format!("{name}.jsonl")), text.as_bytes())?;
    }
    eprintln!(
        "wrote {} train / {} dev / {} test examples of {} to {}",
        task.train.len(),
        task.dev.len(),
        task.test.len(),
        task.name,
        dir.display()
    );
    Ok(())
}

/// Each label's target as rank classification scores it, when every dev target is one of
/// them (with or without EOS); else `None` with a note, or an error with --select-by accuracy.
fn dev_classes(
    args: &TrainArgs,
    labels: &[String],
    task: Option<&ClassificationTask>,
    dev: Option<&[Example]>,
    model: &softprompt::load::Model,
) -> Result<Option<Vec<Vec<u32>>>> {
    let accuracy = args.select_by == SelectByArg::Accuracy;
    let Some(dev) = dev else {
        if accuracy {
            bail!("--select-by accuracy needs --dev");
        }
        return Ok(None);
    };
    if labels.is_empty() {
        if accuracy {
            bail!("--select-by accuracy needs --labels (the targets of the classes)");
        }
        return Ok(None);
    }
    let tokenizer = model.tokenizer()?;
    let info = model.backbone.info();
    let classes = match task {
        Some(t) if args.labels.is_empty() => t.label_targets(tokenizer, info),
        _ => ClassificationTask {
            name: "--labels".into(),
            template: "{text}".into(),
            labels: labels.to_vec(),
            verbalizer: labels.to_vec(),
            train: Vec::new(),
            dev: Vec::new(),
            test: Vec::new(),
        }
        .label_targets(tokenizer, info),
    };
    let classes = match classes {
        Ok(c) => c,
        Err(e) if accuracy => return Err(e.into()),
        // A bad label is reported by the initialisation that uses it, if any.
        Err(_) => return Ok(None),
    };
    match gold_labels(dev, &classes, info) {
        Ok(_) => Ok(Some(classes)),
        Err(e) if accuracy => Err(e).context("--select-by accuracy: every dev target must be one of --labels"),
        Err(e) => {
            eprintln!("note: no dev accuracy ({e})");
            Ok(None)
        }
    }
}

/// Rejects options that the chosen method does not use.
fn check_method(args: &TrainArgs) -> Result<()> {
    let m = match args.method {
        Method::PromptTuning => "prompt-tuning",
        Method::ModelTuning => "model-tuning",
        Method::PTuning => "p-tuning",
    };
    if args.method != Method::PTuning && (args.encoder.is_some() || args.encoder_hidden.is_some()) {
        bail!("--encoder and --encoder-hidden are options of --method p-tuning, not {m}");
    }
    if args.method == Method::PTuning && args.prompt_after_bos {
        bail!("--prompt-after-bos is an option of --method prompt-tuning, not {m}");
    }
    if args.encoder_hidden == Some(0) {
        bail!("--encoder-hidden must be at least 1");
    }
    if args.method != Method::PromptTuning && args.select_by == SelectByArg::Accuracy {
        bail!("--select-by accuracy is an option of --method prompt-tuning, not {m}");
    }
    if args.method == Method::ModelTuning {
        let prompt_options = [
            ("--init", args.init.is_some()),
            ("--init-text", args.init_text.is_some()),
            ("--init-file", args.init_file.is_some()),
            ("--labels", !args.labels.is_empty()),
            ("--n-tokens", args.n_tokens.is_some()),
            ("--prompt-after-bos", args.prompt_after_bos),
        ];
        if let Some((flag, _)) = prompt_options.iter().find(|(_, set)| *set) {
            bail!("{flag} does not apply to --method model-tuning: it trains the model's weights with no soft prompt");
        }
    }
    Ok(())
}

pub fn run(args: TrainArgs) -> Result<()> {
    check_method(&args)?;
    let task = builtin_task(&args)?;
    let labels: Vec<String> = match &task {
        Some(t) if args.labels.is_empty() => t.verbalizer.clone(),
        _ => args.labels.clone(),
    };
    let init = prompt_init(&args, &labels)?;
    let baseline = args.method != Method::PromptTuning;
    let lr = args.lr.unwrap_or(match args.method {
        Method::PromptTuning => 0.3,
        Method::ModelTuning => 1e-4,
        Method::PTuning => 1e-3,
    });
    let weight_decay = args.weight_decay.unwrap_or(if baseline { 0.01 } else { 1e-5 });
    // Cheap checks first, before loading anything.
    if !(lr.is_finite() && lr > 0.0) {
        bail!("--lr must be a positive number, got {lr}");
    }
    if args.n_tokens == Some(0) {
        bail!("--n-tokens must be at least 1");
    }
    let schedule = match args.schedule {
        ScheduleKind::Constant if args.warmup_steps > 0 => {
            Schedule::warmup_constant(lr, args.warmup_steps)
        }
        ScheduleKind::Constant => Schedule::constant(lr),
        ScheduleKind::Linear => Schedule::linear(lr, args.warmup_steps, args.steps),
        ScheduleKind::Cosine => Schedule::cosine(lr, args.warmup_steps, args.steps),
    };
    let kind = args.optimizer.unwrap_or(if baseline {
        OptimizerKind::Adamw
    } else {
        OptimizerKind::Adafactor
    });
    let optimizer = match kind {
        OptimizerKind::Adafactor => OptimizerConfig::Adafactor(AdafactorConfig {
            weight_decay,
            ..AdafactorConfig::default()
        }),
        OptimizerKind::Adamw => OptimizerConfig::AdamW(AdamWConfig::new(weight_decay)),
    };

    if let (Some(dir), Some(t)) = (&args.write_splits, &task) {
        write_splits(dir, t)?;
    }
    let device = common::device()?;
    let model = common::load(&args.model, &device)?;
    let n_tokens = match (args.n_tokens, &init) {
        (Some(n), _) => n,
        (None, PromptInit::File(dir)) => PeftAdapter::load(dir, &device)?.config.num_virtual_tokens,
        (None, _) => 100,
    };
    let (train_set, mut dev_set) = match &task {
        Some(t) => {
            let (tokenizer, info) = (model.tokenizer()?, model.backbone.info());
            let dev = match args.dev.as_deref() {
                Some(p) if is_builtin(p) => Some(t.examples(tokenizer, info, &t.dev)?),
                Some(p) => Some(read_examples(p, &model)?),
                None => None,
            };
            (t.examples(tokenizer, info, &t.train)?, dev)
        }
        None => (
            read_examples(&args.data, &model)?,
            args.dev
                .as_deref()
                .map(|p| read_examples(p, &model))
                .transpose()?,
        ),
    };
    if let (Some(dev), Some(n)) = (dev_set.as_mut(), args.dev_limit) {
        dev.truncate(n);
    }
    let classes = dev_classes(&args, &labels, task.as_ref(), dev_set.as_deref(), &model)?;

    let mut cfg = TrainConfig::paper(&args.output);
    cfg.n_tokens = n_tokens;
    cfg.init = init;
    cfg.optimizer = optimizer;
    cfg.schedule = schedule;
    cfg.steps = args.steps;
    cfg.batch_size = args.batch_size;
    cfg.grad_accum = args.grad_accum;
    cfg.clip = args.clip;
    cfg.seed = args.seed;
    cfg.eval_every = args.eval_every;
    cfg.patience = args.patience;
    cfg.checkpoint_every = args.checkpoint_every;
    cfg.log_every = args.log_every;
    cfg.resume = args.resume;
    cfg.quiet = args.quiet;
    cfg.prompt_after_bos = args.prompt_after_bos;
    cfg.classes = classes;
    cfg.select_by = match args.select_by {
        SelectByArg::Loss => SelectBy::Loss,
        SelectByArg::Accuracy => SelectBy::Accuracy,
    };
    cfg.task
        .insert("data".into(), args.data.display().to_string().into());
    cfg.task.insert(
        "dev".into(),
        args.dev.as_ref().map(|p| p.display().to_string()).into(),
    );
    cfg.task.insert("dev_limit".into(), args.dev_limit.into());
    cfg.task.insert(
        "select_by".into(),
        format!("{:?}", cfg.select_by).to_lowercase().into(),
    );
    match &task {
        Some(t) => {
            // As `softprompt run` records it: `softprompt eval` finds the task from these.
            cfg.task.insert("name".into(), t.name.clone().into());
            cfg.task.insert("template".into(), t.template.clone().into());
            cfg.task.insert("labels".into(), serde_json::json!(t.labels));
            cfg.task.insert("verbalizer".into(), serde_json::json!(t.verbalizer));
            cfg.task.insert(
                "target_format".into(),
                "the label's verbalizer (encoder-decoder models: followed by EOS)".into(),
            );
        }
        None => {
            cfg.task.insert(
                "input_format".into(),
                "the `input` text as model input: BOS first where the model wants one; T5: followed by EOS"
                    .into(),
            );
            cfg.task.insert(
                "target_format".into(),
                "the `target` text followed by EOS".into(),
            );
            if !labels.is_empty() {
                cfg.task.insert("labels".into(), serde_json::json!(labels));
            }
        }
    }

    match args.method {
        Method::PromptTuning => {}
        Method::ModelTuning => {
            cfg.task.insert("lr".into(), lr.into());
            // model_tuning reads the weights again, as trainable f32 variables.
            let path = model.path.clone();
            drop(model);
            let report = model_tuning(&path, &device, &train_set, dev_set.as_deref(), &cfg)?;
            print_baseline(&report, &args.output, "tuned model folder");
            return Ok(());
        }
        Method::PTuning => {
            let kind = match args.encoder.unwrap_or(EncoderArg::Mlp) {
                EncoderArg::Mlp => EncoderKind::Mlp,
                EncoderArg::Lstm => EncoderKind::Lstm,
            };
            let hidden = args
                .encoder_hidden
                .unwrap_or(model.backbone.info().d_model);
            let (report, _) =
                p_tuning(&model, &train_set, dev_set.as_deref(), &cfg, kind, hidden)?;
            print_baseline(&report, &args.output, "adapter (the encoder's output)");
            return Ok(());
        }
    }
    let report = train(&model, &train_set, dev_set.as_deref(), &cfg)?;
    let mut line = format!("trained {} steps", report.steps);
    if let Some(from) = report.resumed_from {
        line.push_str(&format!(" (resumed at step {from})"));
    }
    if let Some(loss) = report.final_loss {
        line.push_str(&format!("; last train loss {loss:.4}"));
    }
    match (report.best_dev_loss, report.best_dev_accuracy, report.best_step) {
        (Some(d), Some(a), Some(s)) if args.select_by == SelectByArg::Accuracy => {
            line.push_str(&format!("; best dev accuracy {a:.4} at step {s} (dev loss {d:.4})"));
        }
        (Some(d), Some(a), Some(s)) => {
            line.push_str(&format!("; best dev loss {d:.4} at step {s} (dev accuracy {a:.4})"));
        }
        (Some(d), None, Some(s)) => line.push_str(&format!("; best dev loss {d:.4} at step {s}")),
        _ => {}
    }
    if report.stopped_early {
        line.push_str("; stopped early");
    }
    println!("{line}");
    println!(
        "adapter (prompt of step {}) written to {}",
        report.exported_step,
        args.output.display()
    );
    Ok(())
}

fn print_baseline(report: &BaselineReport, output: &Path, what: &str) {
    let mut line = format!("trained {} steps", report.steps);
    if let Some(from) = report.resumed_from {
        line.push_str(&format!(" (resumed at step {from})"));
    }
    line.push_str(&format!(
        "; train loss {:.4} -> {:.4}",
        report.first_loss, report.final_loss
    ));
    if let Some(d) = report.dev_loss {
        line.push_str(&format!("; dev loss {d:.4}"));
    }
    println!("{line}");
    println!("{what} written to {}", output.display());
}
