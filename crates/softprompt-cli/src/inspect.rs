//! `softprompt inspect`: the vocabulary tokens nearest to each prompt vector (cosine
//! similarity with the model's input embedding table).

use crate::common;
use anyhow::Result;
use clap::Args;
use softprompt::eval::inspect::{embedding_table, nearest_tokens};
use softprompt::prompt::PeftAdapter;
use softprompt::task::TaskMeta;
use std::path::PathBuf;
use softprompt::load::WeightStorage;

#[derive(Args)]
pub struct InspectArgs {
    /// PEFT prompt-tuning adapter folder.
    pub adapter: PathBuf,
    /// Model: a GGUF file, a Hugging Face model folder, or `smollm2`.
    #[arg(long)]
    pub model: String,
    /// How the frozen weights are kept in memory: `stored` (GGUF blocks as the file stores
    /// them, dequantised one matrix at a time when a product runs; same results, a fraction
    /// of the memory) or `f32` (all dequantised at load).
    #[arg(long, value_enum, default_value_t = WeightStorage::Stored)]
    pub weights: WeightStorage,
    /// Neighbours per prompt position.
    #[arg(long, default_value_t = 5)]
    pub top: usize,
    /// One JSON object per prompt position.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: InspectArgs) -> Result<()> {
    if args.top == 0 {
        anyhow::bail!("--top must be at least 1");
    }
    let device = common::device()?;
    let model = common::load(&args.model, &device, args.weights)?;
    // The trained prompt itself (not the BOS row placed before it): its task.json must read.
    TaskMeta::read(&args.adapter)?;
    let adapter = PeftAdapter::load(&args.adapter, &device)?;
    adapter.validate(model.backbone.info(), &args.adapter)?;
    let prompt = adapter.prompt; // [N, D]
    let table = embedding_table(&model.backbone, &device)?;
    let near = nearest_tokens(&prompt, &table, args.top, model.tokenizer.as_ref())?;
    for (pos, list) in near.iter().enumerate() {
        if args.json {
            println!(
                "{}",
                serde_json::json!({"position": pos, "neighbours": list})
            );
        } else {
            let items: Vec<String> = list
                .iter()
                .map(|n| {
                    let shown = n
                        .text
                        .clone()
                        .or_else(|| n.token.clone())
                        .unwrap_or_else(|| format!("#{}", n.id));
                    format!("{:?} (id {}, {:.3})", shown, n.id, n.similarity)
                })
                .collect();
            println!("{pos:>4}: {}", items.join("  "));
        }
    }
    Ok(())
}
