//! `softprompt train`: prompt tuning on a JSONL data set, with the paper's recipe as defaults.

use crate::common;
use crate::ranks::{ParallelArgs, Ranks};
use anyhow::{bail, Result};
use clap::Args;
use softprompt::prompt::EncoderKind;
use softprompt::recipe::{self, DataSpec, DevClasses, InitSpec, Method, MethodFlags, OptimizerSpec, TrainData, BUILTIN_TASK};
use softprompt::train::trainer::SelectBy;
use softprompt::train::{model_tuning, p_tuning, train, TrainConfig};
use std::path::PathBuf;
use softprompt::load::WeightStorage;

/// Defaults are the prompt-tuning paper's recipe (Lester et al. 2021).
#[derive(Args)]
pub struct TrainArgs {
    /// Model: a GGUF file, a Hugging Face model folder, or `smollm2` (model tuning of a GGUF
    /// file writes a Hugging Face folder).
    #[arg(long)]
    pub model: String,
    /// How the frozen weights are kept in memory: `stored` (GGUF blocks as the file stores
    /// them, dequantised one matrix at a time when a product runs; same results, a fraction
    /// of the memory) or `f32` (all dequantised at load).
    #[arg(long, value_enum, default_value_t = WeightStorage::Stored)]
    pub weights: WeightStorage,
    /// What is trained: the soft prompt (the paper's method), all the model's weights
    /// (model tuning), or a prompt encoder (P-tuning).
    #[arg(long, value_enum, default_value_t = Method::PromptTuning)]
    pub method: Method,
    /// The prompt encoder of --method p-tuning.
    #[arg(long, value_enum)]
    pub encoder: Option<EncoderKind>,
    /// Hidden size of the prompt encoder of --method p-tuning [default: the model's width].
    #[arg(long)]
    pub encoder_hidden: Option<usize>,
    #[command(flatten)]
    pub data: DataSpec,
    /// The dev metric that picks the exported prompt and drives --patience; accuracy needs
    /// --labels (or a built-in task) and every dev target to be one of them.
    #[arg(long, value_enum, default_value_t = SelectBy::Loss)]
    pub select_by: SelectBy,
    /// With --data naming a task (movie-sentiment, bigbench:<task>): also write its seeded
    /// train/dev/test splits to this folder as `train.jsonl`, `dev.jsonl`, `test.jsonl`
    /// ({"input": template applied, "target": what is trained on}, the format --data and
    /// `softprompt eval --data` read).
    #[arg(long)]
    pub write_splits: Option<PathBuf>,
    /// Prompt length in virtual tokens [default: 100, the paper's; 20 is nearly as good;
    /// with --init file, the adapter's length].
    #[arg(long)]
    pub n_tokens: Option<usize>,
    #[command(flatten)]
    pub init: InitSpec,
    #[command(flatten)]
    pub optimizer: OptimizerSpec,
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
    /// Render every example with the model's chat template: the input as the user's turn
    /// (with the generation prompt), the target as the assistant's turn (its end-of-turn
    /// marker included). Recorded in task.json (`chat`), so `softprompt serve` renders
    /// inputs the same way. JSONL --data/--dev, decoder-only models with a template.
    #[arg(long)]
    pub chat: bool,
    #[command(flatten)]
    pub ranks: ParallelArgs,
}

impl TrainArgs {
    fn method_flags(&self) -> MethodFlags<'_> {
        MethodFlags {
            encoder: self.encoder.is_some(),
            encoder_hidden: self.encoder_hidden,
            prompt_after_bos: self.prompt_after_bos,
            select_by: self.select_by,
            init: &self.init,
            labels: &self.data.labels,
            n_tokens: self.n_tokens,
        }
    }
}

pub fn run(args: TrainArgs) -> Result<()> {
    // Cheap checks first, before loading anything.
    args.method.check_flags(&args.method_flags())?;
    let ranks = Ranks::start(&args.ranks)?;
    let result = run_on(args, &ranks);
    ranks.finish(result)
}

/// The run on this rank (all of it in one process).
fn run_on(args: TrainArgs, ranks: &Ranks) -> Result<()> {
    if args.write_splits.is_some() && recipe::task_name(&args.data.data).is_none() {
        bail!("--write-splits needs --data naming a task ({BUILTIN_TASK}, bigbench:<task>)");
    }
    let data = TrainData::resolve(args.data.clone())?;
    let init = recipe::prompt_init(&args.init, &data.labels)?;
    let lr = args.optimizer.learning_rate(args.method)?;
    if let (Some(dir), Some(t), true) = (&args.write_splits, &data.task, ranks.is_root()) {
        recipe::write_splits(dir, t)?;
        let (train, dev, test) = t.sizes();
        eprintln!("wrote {train} train / {dev} dev / {test} test examples of {} to {}", args.data.data.display(), dir.display());
    }
    let device = ranks.device()?;
    let model = common::load(&args.model, &device, args.weights)?;
    let (train_set, dev_set) = if args.chat { chat_examples(&args.data, &model)? } else { data.examples(&model)? };
    let classes = match data.dev_classes(args.select_by, dev_set.as_deref(), &model)? {
        DevClasses::None(Some(note)) => {
            eprintln!("note: {note}");
            None
        }
        c => c.into_option(),
    };

    let mut cfg = TrainConfig::paper(&args.output);
    cfg.n_tokens = recipe::prompt_length(args.n_tokens, &init, &device)?;
    cfg.init = init;
    cfg.optimizer = args.optimizer.optimizer(args.method);
    cfg.schedule = args.optimizer.schedule(lr, args.steps);
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
    // One progress bar: rank 0's.
    cfg.quiet = args.quiet || !ranks.is_root();
    cfg.parallel = ranks.parallel.clone();
    cfg.prompt_after_bos = args.prompt_after_bos;
    cfg.classes = classes;
    cfg.select_by = args.select_by;
    cfg.task = data.meta(cfg.select_by);
    if args.chat {
        cfg.task.chat = true;
        cfg.task.input_format = Some("the `input` as the user's turn of the model's chat template, ending with the generation prompt".into());
        cfg.task.target_format = Some("the `target` as the assistant's turn: the template's text after the generation prompt".into());
    }

    match args.method {
        Method::PromptTuning => {
            let report = train(&model, &train_set, dev_set.as_deref(), &cfg)?;
            if ranks.is_root() {
                println!("{}", report.summary(cfg.select_by));
                println!("adapter (prompt of step {}) written to {}", report.exported_step, args.output.display());
            }
        }
        Method::ModelTuning => {
            cfg.task.lr = Some(lr);
            // model_tuning reads the weights again, as trainable f32 variables.
            let path = model.path.clone();
            drop(model);
            let report = model_tuning(&path, &device, &train_set, dev_set.as_deref(), &cfg)?;
            if ranks.is_root() {
                println!("{}\ntuned model folder written to {}", report.summary(), args.output.display());
            }
        }
        Method::PTuning => {
            let kind = args.encoder.unwrap_or(EncoderKind::Mlp);
            let hidden = args.encoder_hidden.unwrap_or(model.backbone.info().d_model);
            let (report, _) = p_tuning(&model, &train_set, dev_set.as_deref(), &cfg, kind, hidden)?;
            if ranks.is_root() {
                println!("{}\nadapter (the encoder's output) written to {}", report.summary(), args.output.display());
            }
        }
    }
    Ok(())
}

/// `--chat`: the train and dev examples rendered with the model's chat template.
fn chat_examples(spec: &DataSpec, model: &softprompt::Model) -> Result<(Vec<softprompt::batch::Example>, Option<Vec<softprompt::batch::Example>>)> {
    if recipe::task_name(&spec.data).is_some() || spec.dev.as_deref().is_some_and(|d| recipe::task_name(d).is_some()) {
        bail!("--chat needs JSONL --data (and --dev) of {{\"input\", \"target\"}} pairs, not a named task ({BUILTIN_TASK}, bigbench:<task>)");
    }
    let train = softprompt::chat::read_examples(&spec.data, model)?;
    let mut dev = spec.dev.as_deref().map(|p| softprompt::chat::read_examples(p, model)).transpose()?;
    if let (Some(dev), Some(n)) = (dev.as_mut(), spec.dev_limit) {
        dev.truncate(n);
    }
    Ok((train, dev))
}
