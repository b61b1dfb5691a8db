//! `softprompt score` and `softprompt generate`

use crate::common;
use anyhow::{Context, Result};
use clap::Args;
use softprompt::batch::{collate, per_example_sums};
use softprompt::eval::generate::{greedy, GenerateOptions};
use softprompt::objective::target_nll;
use softprompt::task::{encode_pair_with, read_jsonl};
use std::path::PathBuf;
use softprompt::load::WeightStorage;

#[derive(Args)]
pub struct ScoreArgs {
    /// Model: a GGUF file, a Hugging Face model folder, or `smollm2`.
    #[arg(long)]
    pub model: String,
    /// How the frozen weights are kept in memory: `stored` (GGUF blocks as the file stores
    /// them, dequantised one matrix at a time when a product runs; same results, a fraction
    /// of the memory) or `f32` (all dequantised at load).
    #[arg(long, value_enum, default_value_t = WeightStorage::Stored)]
    pub weights: WeightStorage,
    /// PEFT prompt-tuning adapter folder to prepend.
    #[arg(long)]
    pub prompt: Option<PathBuf>,
    /// JSONL file of {"input": ..., "target": ...} lines.
    #[arg(long)]
    pub data: PathBuf,
    /// One JSON object per example, then a summary object.
    #[arg(long)]
    pub json: bool,
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// Score the target text alone, without the EOS that training appends (decoder-only).
    #[arg(long)]
    pub no_eos: bool,
}

pub fn run_score(args: ScoreArgs) -> Result<()> {
    let device = common::device()?;
    let mut model = common::load(&args.model, &device, args.weights)?;
    let prompt = common::load_prompt(args.prompt.as_deref(), &mut model)?;
    let n_prompt = prompt.as_ref().map(|p| p.dim(0)).transpose()?.unwrap_or(0);
    let tokenizer = model.tokenizer()?;
    let info = model.backbone.info();
    let pairs = read_jsonl(&args.data)?;
    if pairs.is_empty() {
        anyhow::bail!("{}: no examples", args.data.display());
    }
    let mut total_nll = 0f64;
    let mut total_tokens = 0usize;
    let mut sum_of_means = 0f64;
    for chunk in pairs.chunks(args.batch_size.max(1)) {
        let examples = chunk
            .iter()
            .map(|p| encode_pair_with(tokenizer, info, p, !args.no_eos))
            .collect::<softprompt::Result<Vec<_>>>()?;
        let batch = collate(&examples, info, n_prompt, &device)?;
        let nll = target_nll(&model.backbone, prompt.as_ref(), &batch)?;
        let sums = per_example_sums(&nll, &batch)?;
        for ((pair, sum), &len) in chunk.iter().zip(sums).zip(&batch.target_lens) {
            let mean = sum as f64 / len as f64;
            total_nll += sum as f64;
            total_tokens += len;
            sum_of_means += mean;
            if args.json {
                println!(
                    "{}",
                    serde_json::json!({"line": pair.line, "nll": sum, "target_tokens": len, "mean_nll": mean})
                );
            } else {
                println!("line {:>5}  tokens {:>4}  mean NLL {:.4}", pair.line, len, mean);
            }
        }
    }
    let n = pairs.len();
    let mean_nll = sum_of_means / n as f64;
    let token_mean = total_nll / total_tokens as f64;
    if args.json {
        println!(
            "{}",
            serde_json::json!({"examples": n, "mean_nll": mean_nll, "token_mean_nll": token_mean, "total_nll": total_nll, "target_tokens": total_tokens})
        );
    } else {
        println!("examples {n}  mean NLL {mean_nll:.4}  token-mean NLL {token_mean:.4}  total NLL {total_nll:.3}");
    }
    Ok(())
}

#[derive(Args)]
pub struct GenerateArgs {
    /// Model: a GGUF file, a Hugging Face model folder, or `smollm2`.
    #[arg(long)]
    pub model: String,
    /// How the frozen weights are kept in memory: `stored` (GGUF blocks as the file stores
    /// them; generation steps multiply quantised blocks directly, with 8-bit activations, so
    /// the tokens can differ slightly from f32's) or `f32` (all dequantised at load, exact).
    /// Default f32: candle's quantised decode is still slower than the f32 path on this
    /// project's CPUs (docs/performance.md).
    #[arg(long, value_enum, default_value_t = WeightStorage::F32)]
    pub weights: WeightStorage,
    /// PEFT prompt-tuning adapter folder to prepend.
    #[arg(long)]
    pub prompt: Option<PathBuf>,
    /// Input text.
    #[arg(long)]
    pub input: String,
    #[arg(long, default_value_t = 20)]
    pub max_new_tokens: usize,
}

pub fn run_generate(args: GenerateArgs) -> Result<()> {
    let device = common::device()?;
    let mut model = common::load_generating(&args.model, &device, args.weights)?;
    let prompt = common::load_prompt(args.prompt.as_deref(), &mut model)?;
    let tokenizer = model.tokenizer()?;
    let mut source = tokenizer.encode_input(&args.input)?;
    if model.backbone.is_seq2seq() {
        source.extend(model.backbone.info().eos_token_ids.first());
    }
    let opts = GenerateOptions {
        max_new_tokens: args.max_new_tokens,
        stop_at_eos: true,
    };
    let out = greedy(&model.backbone, prompt.as_ref(), &[source], &opts, &device)
        .context("generation failed")?;
    let text = tokenizer.decode(&out.tokens[0])?;
    println!("{text}");
    Ok(())
}
