//! `softprompt train`: prompt tuning on a JSONL data set, with the paper's recipe as defaults.

use crate::common;
use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use softprompt::batch::Example;
use softprompt::prompt::{EncoderKind, PeftAdapter, PromptInit};
use softprompt::task::{encode_pair, read_jsonl};
use softprompt::train::optim::{AdafactorConfig, AdamWConfig, OptimizerConfig};
use softprompt::train::schedule::Schedule;
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

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum ScheduleKind {
    Constant,
    Linear,
    Cosine,
}

/// Defaults are the prompt-tuning paper's recipe (Lester et al. 2021).
#[derive(Args)]
pub struct TrainArgs {
    /// Model: a GGUF file, a Hugging Face model folder, or `smollm2` (model tuning: a folder).
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
    /// Training data: JSONL of {"input": ..., "target": ...} lines.
    #[arg(long)]
    pub data: PathBuf,
    /// Dev data (same format): evaluated every --eval-every steps; the prompt with the best
    /// dev loss is the one exported.
    #[arg(long)]
    pub dev: Option<PathBuf>,
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
    /// Class labels for --init class-labels, comma separated (e.g. `negative,positive`).
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
    /// Stop after this many evaluations without a better dev loss.
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

fn prompt_init(args: &TrainArgs) -> Result<PromptInit> {
    let kind = args.init.unwrap_or(if args.init_file.is_some() {
        InitKind::File
    } else if args.init_text.is_some() {
        InitKind::Text
    } else if !args.labels.is_empty() {
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
            if args.labels.is_empty() {
                bail!("--init class-labels needs --labels (comma separated)");
            }
            PromptInit::ClassLabels(args.labels.clone())
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
    let init = prompt_init(&args)?;
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

    let device = common::device()?;
    let model = common::load(&args.model, &device)?;
    let n_tokens = match (args.n_tokens, &init) {
        (Some(n), _) => n,
        (None, PromptInit::File(dir)) => PeftAdapter::load(dir, &device)?.config.num_virtual_tokens,
        (None, _) => 100,
    };
    let train_set = read_examples(&args.data, &model)?;
    let dev_set = args
        .dev
        .as_deref()
        .map(|p| read_examples(p, &model))
        .transpose()?;

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
    cfg.task
        .insert("data".into(), args.data.display().to_string().into());
    cfg.task.insert(
        "dev".into(),
        args.dev.as_ref().map(|p| p.display().to_string()).into(),
    );
    cfg.task.insert(
        "input_format".into(),
        "the `input` text as model input: BOS first where the model wants one; T5: followed by EOS"
            .into(),
    );
    cfg.task.insert(
        "target_format".into(),
        "the `target` text followed by EOS".into(),
    );

    match args.method {
        Method::PromptTuning => {}
        Method::ModelTuning => {
            if !model.path.is_dir() {
                bail!(
                    "--method model-tuning needs a Hugging Face model folder, not {}",
                    model.path.display()
                );
            }
            cfg.task.insert("lr".into(), lr.into());
            let report = model_tuning(&model.path, &device, &train_set, dev_set.as_deref(), &cfg)?;
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
    if let (Some(d), Some(s)) = (report.best_dev_loss, report.best_step) {
        line.push_str(&format!("; best dev loss {d:.4} at step {s}"));
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
