//! `softprompt run movie-sentiment`: the main job end to end on the real model and data.
//!
//! Fetches SmolLM2-135M-Instruct and the Rotten Tomatoes snippets, measures zero-shot prompt
//! design (the template alone, rank classification), trains a 20-token class-label-initialised
//! soft prompt, evaluates it on the test split and prints a table.

use anyhow::{Context, Result};
use clap::Args;
use softprompt::eval::classify::{evaluate, ClassificationReport};
use softprompt::recipe::{Factoring, MainJob};
use softprompt::task::movie;
use softprompt::train::trainer::train;
use std::path::PathBuf;
use std::time::Instant;
use softprompt::load::WeightStorage;

#[derive(Args)]
pub struct RunArgs {
    /// The job: `movie-sentiment`.
    pub job: String,
    /// The frozen model: a known name (`smollm2`, `gemma3-270m`), a GGUF file or a folder.
    #[arg(long, default_value = "smollm2")]
    pub model: String,
    /// How the frozen weights are kept in memory: `stored` (GGUF blocks as the file stores
    /// them, dequantised one matrix at a time when a product runs; same results, a fraction
    /// of the memory) or `f32` (all dequantised at load).
    #[arg(long, value_enum, default_value_t = WeightStorage::Stored)]
    pub weights: WeightStorage,
    /// Output folder (adapter, metrics, plot, results.json).
    #[arg(long, default_value = "runs/movie-sentiment")]
    pub output: PathBuf,
    /// The longer recipe: more steps, the whole dev split for model selection.
    #[arg(long)]
    pub full: bool,
    /// Optimizer steps (default: 300, or 1500 with --full).
    #[arg(long)]
    pub steps: Option<usize>,
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    #[arg(long, default_value_t = 20)]
    pub n_tokens: usize,
    /// Learning rate (Adafactor, constant).
    #[arg(long, default_value_t = 0.3)]
    pub lr: f64,
    /// Seed of the prompt's sampled slots and the data order.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Adafactor's second-moment factoring (see `softprompt train --help`).
    #[arg(long, value_enum, default_value_t = Factoring::Auto)]
    pub adafactor_factored: Factoring,
    /// Evaluate on only the first N test examples (default: the whole test split).
    #[arg(long)]
    pub test_limit: Option<usize>,
    /// Continue an interrupted run from its checkpoint.
    #[arg(long)]
    pub resume: bool,
    #[arg(long)]
    pub quiet: bool,
}

const EVAL_BATCH: usize = 32;

pub fn run(args: RunArgs) -> Result<()> {
    if args.job != movie::NAME {
        anyhow::bail!("unknown job `{}` (known: movie-sentiment)", args.job);
    }
    let device = crate::common::device()?;
    eprintln!("fetching {} and the movie-review snippets (cached after the first run)...", args.model);
    let model = crate::common::load(&args.model, &device, args.weights)?;
    let task = movie::load().context("preparing movie-sentiment")?;
    let info = model.backbone.info();
    let test = match args.test_limit {
        Some(n) => &task.test[..n.min(task.test.len())],
        None => &task.test[..],
    };
    eprintln!(
        "movie-sentiment: {} train / {} dev / {} test examples (evaluating on {})",
        task.train.len(),
        task.dev.len(),
        task.test.len(),
        test.len()
    );

    // 1. Prompt design, zero-shot: the template alone.
    eprintln!("zero-shot prompt design on the test split...");
    let t0 = Instant::now();
    let zero_shot = evaluate(&model, None, &task, test, EVAL_BATCH)?;
    let zero_shot_time = t0.elapsed().as_secs_f64();

    // 2. Prompt tuning.
    let steps = args.steps.unwrap_or(MainJob::default_steps(args.full));
    let job = MainJob {
        n_tokens: args.n_tokens,
        lr: args.lr,
        steps,
        batch_size: args.batch_size,
        full: args.full,
        seed: args.seed,
        factoring: args.adafactor_factored,
    };
    let (mut cfg, train_examples, dev_examples) = job.config(&args.output, &task, &model)?;
    cfg.resume = args.resume;
    cfg.quiet = args.quiet;
    eprintln!(
        "training a {}-token class-label prompt: {steps} steps x batch {} (Adafactor, lr {})...",
        args.n_tokens, args.batch_size, args.lr
    );
    let t0 = Instant::now();
    let report = train(&model, &train_examples, Some(&dev_examples), &cfg)?;
    let train_time = t0.elapsed().as_secs_f64();

    // 3. The tuned prompt on the test split.
    eprintln!("evaluating the tuned prompt on the test split...");
    let t0 = Instant::now();
    let tuned = evaluate(&model, Some(&report.prompt), &task, test, EVAL_BATCH)?;
    let tuned_time = t0.elapsed().as_secs_f64();

    let params = args.n_tokens * info.d_model;
    println!();
    println!("| method | test accuracy | macro-F1 | trainable params | time |");
    println!("|---|---|---|---|---|");
    row("prompt design (zero-shot)", &zero_shot, 0, zero_shot_time);
    row(&format!("prompt tuning ({} tokens, {} steps)", args.n_tokens, report.steps), &tuned, params, train_time + tuned_time);
    println!();
    println!("test examples: {}", test.len());
    println!("adapter: {}", args.output.display());
    println!("metrics: {}", args.output.join("metrics.jsonl").display());
    println!("plot:    {}", args.output.join("loss.svg").display());
    let results = serde_json::json!({
        "task": task.name,
        "model": model.path,
        "test_examples": test.len(),
        "zero_shot": {"accuracy": zero_shot.accuracy, "macro_f1": zero_shot.macro_f1, "confusion": zero_shot.confusion, "seconds": zero_shot_time},
        "prompt_tuning": {"accuracy": tuned.accuracy, "macro_f1": tuned.macro_f1, "confusion": tuned.confusion,
            "n_tokens": args.n_tokens, "steps": report.steps, "batch_size": args.batch_size, "lr": args.lr,
            "seed": args.seed, "adafactor_factored": format!("{:?}", args.adafactor_factored).to_lowercase(),
            "trainable_params": params, "train_seconds": train_time, "eval_seconds": tuned_time,
            "best_dev_loss": report.best_dev_loss, "best_step": report.best_step},
    });
    let path = args.output.join("results.json");
    softprompt::fsutil::write_atomic(&path, serde_json::to_string_pretty(&results)?.as_bytes())?;
    println!("results: {}", path.display());
    Ok(())
}

fn row(method: &str, r: &ClassificationReport, params: usize, seconds: f64) {
    println!(
        "| {method} | {:.1}% | {:.3} | {params} | {:.0} s |",
        100.0 * r.accuracy,
        r.macro_f1,
        seconds
    );
}
