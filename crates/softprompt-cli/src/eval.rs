//! `softprompt eval`: accuracy / macro-F1 / confusion matrix (classification), exact match
//! and token F1 (text-to-text), for a tuned prompt, an ensemble of prompts, or prompt design
//! (zero- or k-shot hard prompts, no soft prompt).

use crate::common;
use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use softprompt::eval::adapters::AdapterSet;
use softprompt::eval::outcome::{evaluate_plan, DecodeSpec};
use softprompt::eval::plan::{EvalPlan, EvalSource, LabelSpec, Split};
use softprompt::eval::report::Mode;
use softprompt::task::formats::{Format, ReadOptions};
use softprompt::task::named::is_task_name;
use std::io::Write;
use std::path::{Path, PathBuf};
use softprompt::load::WeightStorage;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Method {
    /// The soft prompt(s) of --prompt.
    PromptTuning,
    /// No soft prompt: the task template, with --shots demonstrations before the query.
    PromptDesign,
}

#[derive(Args)]
pub struct EvalArgs {
    /// Model: a GGUF file, a Hugging Face model folder, or `smollm2`.
    #[arg(long)]
    pub model: String,
    /// How the frozen weights are kept in memory: `stored` (GGUF blocks as the file stores
    /// them, dequantised one matrix at a time when a product runs; same results, a fraction
    /// of the memory) or `f32` (all dequantised at load).
    #[arg(long, value_enum, default_value_t = WeightStorage::Stored)]
    pub weights: WeightStorage,
    /// PEFT prompt-tuning adapter folder; several: a prompt ensemble (majority vote and mean
    /// log-probability). A `task.json` beside the first adapter (written by `softprompt
    /// train`) supplies the template, labels and verbalizer unless given here.
    #[arg(long)]
    pub prompt: Vec<PathBuf>,
    /// `movie-sentiment`, `bigbench:<task name>` (or `bigbench:<path>/task.json`): its
    /// seeded split, the one `softprompt train --data <task>` trains on; or any data file
    /// (JSONL, CSV, TSV), evaluated whole as with --data.
    #[arg(long)]
    pub task: Option<String>,
    /// A data file to evaluate (all of it): JSONL, CSV or TSV.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Format of --data (default: from the extension).
    #[arg(long)]
    pub format: Option<String>,
    #[arg(long, default_value = "input")]
    pub input_field: String,
    /// The target text, or for classification the label (a label name or its verbalizer).
    #[arg(long, default_value = "target")]
    pub target_field: String,
    /// Class labels, comma separated: --data is a classification task.
    #[arg(long, value_delimiter = ',')]
    pub labels: Vec<String>,
    /// What the model should produce for each label, comma separated [default: each label
    /// after a space, or as is when the template ends with whitespace].
    #[arg(long, value_delimiter = ',')]
    pub verbalizer: Vec<String>,
    /// Input template with `{text}` [default: `{text}`].
    #[arg(long)]
    pub template: Option<String>,
    /// Training data for --shots demonstrations with --data (same format and fields).
    #[arg(long)]
    pub train_data: Option<PathBuf>,
    /// Split of --task to evaluate [default: test].
    #[arg(long, value_enum)]
    pub split: Option<Split>,
    /// [default: prompt-tuning with --prompt, else prompt-design]
    #[arg(long, value_enum)]
    pub method: Option<Method>,
    /// Prompt design: demonstrations drawn (with --seed) from the train split.
    #[arg(long, default_value_t = 0)]
    pub shots: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// [default: rank for classification and multiple choice, generate for text]
    #[arg(long, value_enum)]
    pub mode: Option<Mode>,
    #[command(flatten)]
    pub decode: DecodeSpec,
    /// Evaluate only the first N examples of the split.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Skip (and count) bad records of --data instead of failing.
    #[arg(long)]
    pub skip_bad_rows: bool,
    /// Write one JSON line per example (input, gold, prediction, per-label scores).
    #[arg(long)]
    pub predictions: Option<PathBuf>,
    /// Print the summary as JSON.
    #[arg(long)]
    pub json: bool,
    #[arg(long, default_value_t = 16)]
    pub batch_size: usize,
}

impl EvalArgs {
    /// The method, after the checks that need nothing loaded.
    fn check(&self) -> Result<Method> {
        let method = self.method.unwrap_or(if self.prompt.is_empty() {
            Method::PromptDesign
        } else {
            Method::PromptTuning
        });
        match method {
            Method::PromptDesign if !self.prompt.is_empty() => {
                bail!("--method prompt-design uses no soft prompt; drop --prompt")
            }
            Method::PromptTuning if self.prompt.is_empty() => {
                bail!("--method prompt-tuning needs --prompt ADAPTER_DIR")
            }
            Method::PromptTuning if self.shots > 0 => bail!("--shots is for --method prompt-design"),
            _ => {}
        }
        if self.limit == Some(0) {
            bail!("--limit must be at least 1");
        }
        self.decode.check()?;
        Ok(method)
    }

    /// --task or --data, with the options that go with each.
    fn source(&self) -> Result<Option<EvalSource>> {
        // `--task FILE` (not a task name): the file, as --data.
        let (task, data) = match (&self.task, &self.data) {
            (Some(t), None) if !is_task_name(t) && Path::new(t).is_file() => (None, Some(PathBuf::from(t))),
            (t, d) => (t.clone(), d.clone()),
        };
        Ok(match (&task, &data) {
            (Some(_), Some(_)) => bail!("give either --task or --data, not both"),
            (Some(_), None) if self.train_data.is_some() => {
                bail!("--train-data is for --data; a --task has its own train split")
            }
            (Some(name), None) => Some(EvalSource::Task {
                name: name.clone(),
                split: self.split.unwrap_or_default(),
            }),
            (None, Some(_)) if self.split.is_some() => {
                bail!("--split is for --task; --data is evaluated whole")
            }
            (None, Some(path)) => Some(EvalSource::File {
                path: path.clone(),
                read: ReadOptions {
                    format: self.format.as_deref().map(str::parse::<Format>).transpose()?,
                    input_field: self.input_field.clone(),
                    target_field: self.target_field.clone(),
                    skip_bad_rows: self.skip_bad_rows,
                },
                train: self.train_data.clone(),
            }),
            (None, None) => None,
        })
    }
}

pub fn run(args: EvalArgs) -> Result<()> {
    let method = args.check()?;
    let source = args.source()?;
    let adapters = AdapterSet::read(&args.prompt)?;
    let given = LabelSpec {
        template: args.template.clone(),
        labels: args.labels.clone(),
        verbalizer: args.verbalizer.clone(),
    };
    let plan = EvalPlan::resolve(source, &given, &adapters.meta, args.shots, args.seed, args.limit)?;
    let mode = plan.mode(args.mode, args.prompt.len())?;
    let (what, skipped) = (plan.what.clone(), plan.skipped);
    let mut out = match &args.predictions {
        Some(p) => Some(std::io::BufWriter::new(
            std::fs::File::create(p).with_context(|| format!("creating {}", p.display()))?,
        )),
        None => None,
    };
    let device = common::device()?;
    let mut model = common::load(&args.model, &device, args.weights)?;
    let prompts = adapters.load_prompts(&mut model)?;
    let outcome = evaluate_plan(&model, &prompts, plan, mode, &args.decode, args.batch_size)?;
    if let Some(w) = out.as_mut() {
        for line in outcome.prediction_lines()? {
            writeln!(w, "{line}")?;
        }
        w.flush()?;
    }
    if args.json {
        let mut summary = serde_json::json!({
            "data": what,
            "method": match method { Method::PromptTuning => "prompt-tuning", Method::PromptDesign => "prompt-design" },
            "mode": mode,
            "shots": args.shots,
            "prompts": args.prompt.iter().map(|p| p.display().to_string()).collect::<Vec<_>>(),
            "skipped_rows": skipped,
        });
        if let Some(obj) = summary.as_object_mut() {
            obj.extend(outcome.summary()?);
        }
        println!("{summary}");
        return Ok(());
    }
    let names: Vec<String> = args.prompt.iter().map(|p| p.display().to_string()).collect();
    print!("{}", outcome.text(&what, &names));
    if skipped > 0 {
        println!("skipped {skipped} bad rows");
    }
    Ok(())
}
