//! `softprompt eval`: accuracy / macro-F1 / confusion matrix (classification), exact match
//! and token F1 (text-to-text), for a tuned prompt, an ensemble of prompts, or prompt design
//! (zero- or k-shot hard prompts, no soft prompt).

use crate::common;
use anyhow::{bail, Context, Result};
use candle_core::Tensor;
use clap::{Args, ValueEnum};
use softprompt::eval::ensemble::{evaluate_ensemble, mean_scores, EnsembleReport};
use softprompt::eval::prompt_design::{k_shot_pairs, k_shot_task};
use softprompt::eval::report::{
    classify, generate_text, multiple_choice, ClassificationEval, Decoding, Mode,
    MultipleChoiceEval, TextEval,
};
use softprompt::prompt::prefix_after_bos;
use softprompt::task::bigbench::{self, Imported, MultipleChoiceExample, SplitSpec};
use softprompt::task::formats::{read_labeled, read_pairs, Format, ReadOptions};
use softprompt::task::{movie, ClassificationTask, LabeledText, TextPair};
use softprompt::train::trainer::TASK_FILE;
use std::io::Write;
use std::path::PathBuf;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Split {
    Train,
    Dev,
    Test,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Method {
    /// The soft prompt(s) of --prompt.
    PromptTuning,
    /// No soft prompt: the task template, with --shots demonstrations before the query.
    PromptDesign,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ModeArg {
    /// Score each label's verbalizer and pick the most likely.
    Rank,
    /// Generate (greedy, or beam search with --beams) and compare the text.
    Generate,
}

#[derive(Args)]
pub struct EvalArgs {
    /// Model: a GGUF file, a Hugging Face model folder, or `smollm2`.
    #[arg(long)]
    pub model: String,
    /// PEFT prompt-tuning adapter folder; several: a prompt ensemble (majority vote and mean
    /// log-probability). A `task.json` beside the first adapter (written by `softprompt
    /// train`) supplies the template, labels and verbalizer unless given here.
    #[arg(long)]
    pub prompt: Vec<PathBuf>,
    /// `movie-sentiment` or `bigbench:<task name>`.
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
    pub mode: Option<ModeArg>,
    /// Beams for generation (1: greedy).
    #[arg(long, default_value_t = 1)]
    pub beams: usize,
    /// Rank beams by log-probability / length^alpha.
    #[arg(long)]
    pub length_penalty: Option<f64>,
    /// [default: the longest label's tokens for classification, else 32]
    #[arg(long)]
    pub max_new_tokens: Option<usize>,
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

/// What is evaluated.
enum Data {
    Class(ClassificationTask, Vec<LabeledText>),
    Text(Vec<TextPair>, Vec<TextPair>),
    Choice(Vec<MultipleChoiceExample>),
}

/// Facts from `task.json` beside an adapter.
#[derive(Default)]
struct Saved {
    name: Option<String>,
    template: Option<String>,
    labels: Vec<String>,
    verbalizer: Vec<String>,
    /// The prompt was trained after BOS (`softprompt train --prompt-after-bos`).
    prompt_after_bos: bool,
}

fn saved_task(dir: Option<&PathBuf>) -> Result<Saved> {
    let Some(dir) = dir else {
        return Ok(Saved::default());
    };
    let path = dir.join(TASK_FILE);
    if !path.is_file() {
        return Ok(Saved::default());
    }
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("{}: not valid JSON", path.display()))?;
    let strings = |key: &str| -> Result<Vec<String>> {
        match v.get(key) {
            None | Some(serde_json::Value::Null) => Ok(Vec::new()),
            Some(serde_json::Value::Array(a)) => a
                .iter()
                .map(|x| {
                    x.as_str().map(str::to_string).with_context(|| {
                        format!("{}: `{key}` must be a list of strings", path.display())
                    })
                })
                .collect(),
            Some(_) => bail!("{}: `{key}` must be a list of strings", path.display()),
        }
    };
    Ok(Saved {
        name: v.get("name").and_then(|x| x.as_str()).map(str::to_string),
        template: v
            .get("template")
            .and_then(|x| x.as_str())
            .map(str::to_string),
        labels: strings("labels")?,
        verbalizer: strings("verbalizer")?,
        prompt_after_bos: match v.get("prompt_after_bos") {
            None | Some(serde_json::Value::Null) => false,
            Some(serde_json::Value::Bool(b)) => *b,
            Some(_) => bail!(
                "{}: `prompt_after_bos` must be true or false",
                path.display()
            ),
        },
    })
}

fn pick<T: Clone>(rows: &[T], split: Split, train: &[T], dev: &[T]) -> Vec<T> {
    match split {
        Split::Train => train.to_vec(),
        Split::Dev => dev.to_vec(),
        Split::Test => rows.to_vec(),
    }
}

fn read_opts(args: &EvalArgs) -> Result<ReadOptions> {
    Ok(ReadOptions {
        format: args
            .format
            .as_deref()
            .map(str::parse::<Format>)
            .transpose()?,
        input_field: args.input_field.clone(),
        target_field: args.target_field.clone(),
        skip_bad_rows: args.skip_bad_rows,
    })
}

/// Resolves the task and the rows to evaluate; returns (data, description, skipped rows).
fn resolve(args: &EvalArgs, saved: &Saved) -> Result<(Data, String, usize)> {
    let split = args.split.unwrap_or(Split::Test);
    let split_name = format!("{split:?}").to_lowercase();
    let task_name = match (&args.task, &args.data) {
        (Some(_), Some(_)) => bail!("give either --task or --data, not both"),
        (Some(t), None) => Some(t.clone()),
        (None, Some(_)) => None,
        (None, None) => match saved.name.as_deref() {
            Some("movie-sentiment") => Some("movie-sentiment".to_string()),
            _ => bail!("give --task (movie-sentiment, bigbench:<name>) or --data FILE"),
        },
    };
    if let Some(name) = task_name {
        if args.train_data.is_some() {
            bail!("--train-data is for --data; a --task has its own train split");
        }
        if name == "movie-sentiment" {
            let task = movie::load().context("preparing movie-sentiment")?;
            let rows = pick(&task.test, split, &task.train, &task.dev);
            return Ok((
                Data::Class(task, rows),
                format!("movie-sentiment ({split_name} split)"),
                0,
            ));
        }
        if let Some(bb) = name.strip_prefix("bigbench:") {
            let what = format!("bigbench:{bb} ({split_name} split)");
            return Ok(match bigbench::load(bb, SplitSpec::default())? {
                Imported::Classification(t) => {
                    let rows = pick(&t.test, split, &t.train, &t.dev);
                    (Data::Class(t, rows), what, 0)
                }
                Imported::Text(t) => {
                    let rows = pick(&t.test, split, &t.train, &t.dev);
                    (Data::Text(t.train, rows), what, 0)
                }
                Imported::MultipleChoice(t) => (
                    Data::Choice(pick(&t.test, split, &t.train, &t.dev)),
                    what,
                    0,
                ),
            });
        }
        bail!("unknown task `{name}` (known: movie-sentiment, bigbench:<name>)");
    }
    let data = args.data.as_ref().expect("--data");
    if args.split.is_some() {
        bail!("--split is for --task; --data is evaluated whole");
    }
    let opts = read_opts(args)?;
    let template = args.template.clone().or_else(|| saved.template.clone());
    if let Some(t) = &template {
        if !t.contains("{text}") {
            bail!("the template `{t}` has no `{{text}}`");
        }
    }
    let labels = if args.labels.is_empty() {
        saved.labels.clone()
    } else {
        args.labels.clone()
    };
    let what = data.display().to_string();
    if labels.is_empty() {
        let apply = |rows: Vec<TextPair>| -> Vec<TextPair> {
            match &template {
                Some(t) => rows
                    .into_iter()
                    .map(|p| TextPair {
                        input: t.replace("{text}", &p.input),
                        ..p
                    })
                    .collect(),
                None => rows,
            }
        };
        let rows = read_pairs(data, &opts)?;
        let train = match &args.train_data {
            Some(p) => apply(read_pairs(p, &opts)?.rows),
            None => Vec::new(),
        };
        return Ok((Data::Text(train, apply(rows.rows)), what, rows.skipped));
    }
    let template = template.unwrap_or_else(|| "{text}".into());
    let verbalizer = if !args.verbalizer.is_empty() {
        args.verbalizer.clone()
    } else if args.labels.is_empty() && !saved.verbalizer.is_empty() {
        saved.verbalizer.clone()
    } else if args.labels.is_empty() {
        // Labels recorded by `softprompt train` without a verbalizer were its targets as written.
        labels.clone()
    } else if template.ends_with(char::is_whitespace) {
        labels.clone()
    } else {
        labels.iter().map(|l| format!(" {l}")).collect()
    };
    if verbalizer.len() != labels.len() {
        bail!(
            "{} labels but {} verbalizer entries",
            labels.len(),
            verbalizer.len()
        );
    }
    let rows = read_labeled(data, &opts, &labels, &verbalizer)?;
    let train = match &args.train_data {
        Some(p) => read_labeled(p, &opts, &labels, &verbalizer)?.rows,
        None => Vec::new(),
    };
    let name = saved.name.clone().unwrap_or_else(|| what.clone());
    let task = ClassificationTask {
        name,
        template,
        labels,
        verbalizer,
        train,
        dev: Vec::new(),
        test: rows.rows.clone(),
    };
    Ok((Data::Class(task, rows.rows), what, rows.skipped))
}

fn limited<T>(mut rows: Vec<T>, limit: Option<usize>, what: &str) -> Result<Vec<T>> {
    if limit == Some(0) {
        bail!("--limit must be at least 1");
    }
    if let Some(n) = limit {
        rows.truncate(n);
    }
    if rows.is_empty() {
        bail!("{what}: no examples to evaluate (the split is empty)");
    }
    Ok(rows)
}

/// Loads every adapter; several become one `[E, N, D]` tensor.
fn load_prompts(dirs: &[PathBuf], model: &softprompt::load::Model) -> Result<Vec<Tensor>> {
    let mut out: Vec<Tensor> = Vec::with_capacity(dirs.len());
    for dir in dirs {
        let p = common::load_prompt(Some(dir), model, &model.device)?.expect("prompt");
        if let Some(first) = out.first() {
            if first.dims() != p.dims() {
                bail!(
                    "{}: prompt {:?} differs in shape from {}'s {:?}; an ensemble needs prompts of one length",
                    dir.display(),
                    p.dims(),
                    dirs[0].display(),
                    first.dims()
                );
            }
        }
        out.push(p);
    }
    Ok(out)
}

pub fn run(args: EvalArgs) -> Result<()> {
    // Cheap checks first.
    let method = args.method.unwrap_or(if args.prompt.is_empty() {
        Method::PromptDesign
    } else {
        Method::PromptTuning
    });
    match method {
        Method::PromptDesign if !args.prompt.is_empty() => {
            bail!("--method prompt-design uses no soft prompt; drop --prompt")
        }
        Method::PromptTuning if args.prompt.is_empty() => {
            bail!("--method prompt-tuning needs --prompt ADAPTER_DIR")
        }
        Method::PromptTuning if args.shots > 0 => bail!("--shots is for --method prompt-design"),
        _ => {}
    }
    if args.limit == Some(0) {
        bail!("--limit must be at least 1");
    }
    if args.beams == 0 {
        bail!("--beams must be at least 1");
    }
    if args.max_new_tokens == Some(0) {
        bail!("--max-new-tokens must be at least 1");
    }
    let saved = saved_task(args.prompt.first())?;
    let (data, what, skipped) = resolve(&args, &saved)?;
    let limit = args.limit;
    // Demonstrations for prompt design, and the rows.
    let data = match data {
        Data::Class(task, rows) => {
            let task = if args.shots > 0 {
                k_shot_task(&task, args.shots, args.seed)
                    .with_context(|| format!("{what}: --shots"))?
            } else {
                task
            };
            Data::Class(task, limited(rows, limit, &what)?)
        }
        Data::Text(train, rows) => {
            let rows = limited(rows, limit, &what)?;
            let rows = if args.shots > 0 {
                if train.is_empty() {
                    bail!("--shots needs training examples: give --train-data with --data");
                }
                k_shot_pairs(&train, &rows, args.shots, args.seed)
                    .with_context(|| format!("{what}: --shots"))?
            } else {
                rows
            };
            Data::Text(Vec::new(), rows)
        }
        Data::Choice(rows) => {
            if args.shots > 0 {
                bail!(
                    "--shots is not supported for multiple-choice tasks with per-example choices"
                );
            }
            Data::Choice(limited(rows, limit, &what)?)
        }
    };
    let mode = match (args.mode, &data) {
        (Some(ModeArg::Rank), Data::Text(..)) => {
            bail!("--mode rank needs labels or choices; a text-to-text task is evaluated by generation")
        }
        (Some(ModeArg::Rank), _) | (None, Data::Class(..) | Data::Choice(_)) => Mode::Rank,
        (Some(ModeArg::Generate), _) | (None, Data::Text(..)) => Mode::Generate,
    };
    if args.prompt.len() > 1 && !(mode == Mode::Rank && matches!(data, Data::Class(..))) {
        bail!("a prompt ensemble (several --prompt) needs a classification task in rank mode");
    }

    // Every adapter of an ensemble must place its prompt the same way.
    for dir in args.prompt.iter().skip(1) {
        if saved_task(Some(dir))?.prompt_after_bos != saved.prompt_after_bos {
            bail!(
                "{} and {} place their prompts differently (one after BOS, one before the input); \
                 an ensemble needs one layout",
                args.prompt[0].display(),
                dir.display()
            );
        }
    }
    let device = common::device()?;
    let mut model = common::load(&args.model, &device)?;
    let mut prompts = load_prompts(&args.prompt, &model)?;
    if saved.prompt_after_bos {
        // As in training: `[BOS; prompt; input]`, the input without its own BOS.
        prompts = prompts
            .iter()
            .map(|p| prefix_after_bos(p, &model.backbone))
            .collect::<softprompt::Result<Vec<_>>>()
            .with_context(|| {
                format!(
                    "{}: the prompt was trained after BOS (task.json)",
                    args.prompt[0].display()
                )
            })?;
        if let Some(t) = model.tokenizer.as_mut() {
            t.add_bos = false;
        }
    }
    let model = model;
    let tokenizer = model.tokenizer()?;
    let info = model.backbone.info();
    let mut decoding = Decoding {
        beams: args.beams,
        max_new_tokens: args.max_new_tokens.unwrap_or(32),
        length_penalty: args.length_penalty,
    };
    let mut out = match &args.predictions {
        Some(p) => Some(std::io::BufWriter::new(
            std::fs::File::create(p).with_context(|| format!("creating {}", p.display()))?,
        )),
        None => None,
    };
    let mut summary = serde_json::json!({
        "data": what,
        "method": match method { Method::PromptTuning => "prompt-tuning", Method::PromptDesign => "prompt-design" },
        "mode": mode,
        "shots": args.shots,
        "prompts": args.prompt.iter().map(|p| p.display().to_string()).collect::<Vec<_>>(),
        "skipped_rows": skipped,
    });
    match data {
        Data::Class(task, rows) if prompts.len() > 1 => {
            let stacked = Tensor::stack(&prompts, 0)?; // [E, N, D]
            let sources = task.sources(tokenizer, info, &rows)?;
            let labels = task.label_targets(tokenizer, info)?;
            let gold: Vec<usize> = rows.iter().map(|r| r.label).collect();
            let rep = evaluate_ensemble(
                &model.backbone,
                &stacked,
                &sources,
                &labels,
                &gold,
                args.batch_size,
                &device,
            )?;
            if let Some(w) = out.as_mut() {
                write_ensemble(w, &task, &rows, &rep)?;
            }
            let obj = summary.as_object_mut().expect("object");
            obj.insert("task".into(), task.name.clone().into());
            obj.insert("labels".into(), serde_json::json!(task.labels));
            obj.insert("ensemble".into(), serde_json::to_value(&rep)?);
            if let Some(o) = obj.get_mut("ensemble").and_then(|e| e.as_object_mut()) {
                o.remove("scores");
                o.remove("majority_predictions");
                o.remove("mean_predictions");
            }
            obj.insert("examples".into(), rep.examples.into());
            if !args.json {
                println!(
                    "{what}: {} examples, ensemble of {} prompts",
                    rep.examples,
                    prompts.len()
                );
                for (i, m) in rep.per_prompt.iter().enumerate() {
                    println!(
                        "  prompt {i} ({}): accuracy {:.4}  macro-F1 {:.4}",
                        args.prompt[i].display(),
                        m.accuracy,
                        m.macro_f1
                    );
                }
                println!(
                    "  majority vote:      accuracy {:.4}  macro-F1 {:.4}",
                    rep.majority_vote.accuracy, rep.majority_vote.macro_f1
                );
                println!(
                    "  mean log-prob:      accuracy {:.4}  macro-F1 {:.4}",
                    rep.mean_log_prob.accuracy, rep.mean_log_prob.macro_f1
                );
                print_confusion(&task.labels, &rep.mean_log_prob.confusion);
            }
        }
        Data::Class(task, rows) => {
            if args.max_new_tokens.is_none() {
                let labels = task.label_targets(tokenizer, info)?;
                decoding.max_new_tokens = labels.iter().map(Vec::len).max().unwrap_or(1);
            }
            let rep = classify(
                &model,
                prompts.first(),
                &task,
                &rows,
                mode,
                &decoding,
                args.batch_size,
            )?;
            if let Some(w) = out.as_mut() {
                write_class(w, &task, &rep)?;
            }
            let obj = summary.as_object_mut().expect("object");
            obj.insert("task".into(), task.name.clone().into());
            obj.insert("labels".into(), serde_json::json!(task.labels));
            for (k, v) in serde_json::to_value(&rep)?.as_object().expect("object") {
                obj.insert(k.clone(), v.clone());
            }
            if !args.json {
                println!(
                    "{what}: {} examples  accuracy {:.4}  macro-F1 {:.4}{}",
                    rep.examples,
                    rep.accuracy,
                    rep.macro_f1,
                    if mode == Mode::Generate {
                        format!("  unmatched generations {}", rep.unmatched)
                    } else {
                        String::new()
                    }
                );
                print_confusion(&task.labels, &rep.confusion);
            }
        }
        Data::Text(_, pairs) => {
            let rep = generate_text(&model, prompts.first(), &pairs, &decoding, args.batch_size)?;
            if let Some(w) = out.as_mut() {
                write_text(w, &rep)?;
            }
            let obj = summary.as_object_mut().expect("object");
            for (k, v) in serde_json::to_value(&rep)?.as_object().expect("object") {
                obj.insert(k.clone(), v.clone());
            }
            if !args.json {
                println!(
                    "{what}: {} examples  exact match {:.4}  token F1 {:.4}",
                    rep.examples, rep.exact_match, rep.f1
                );
            }
        }
        Data::Choice(rows) if mode == Mode::Generate => {
            let pairs: Vec<TextPair> = rows
                .iter()
                .map(|r| TextPair {
                    input: r.input.clone(),
                    target: r.choices[r.gold].clone(),
                    line: r.line,
                })
                .collect();
            let rep = generate_text(&model, prompts.first(), &pairs, &decoding, args.batch_size)?;
            if let Some(w) = out.as_mut() {
                write_text(w, &rep)?;
            }
            let obj = summary.as_object_mut().expect("object");
            for (k, v) in serde_json::to_value(&rep)?.as_object().expect("object") {
                obj.insert(k.clone(), v.clone());
            }
            if !args.json {
                println!(
                    "{what}: {} examples  exact match {:.4}  token F1 {:.4}",
                    rep.examples, rep.exact_match, rep.f1
                );
            }
        }
        Data::Choice(rows) => {
            let rep = multiple_choice(&model, prompts.first(), &rows, args.batch_size)?;
            if let Some(w) = out.as_mut() {
                write_choice(w, &rep)?;
            }
            let obj = summary.as_object_mut().expect("object");
            for (k, v) in serde_json::to_value(&rep)?.as_object().expect("object") {
                obj.insert(k.clone(), v.clone());
            }
            if !args.json {
                println!(
                    "{what}: {} examples  accuracy {:.4}",
                    rep.examples, rep.accuracy
                );
            }
        }
    }
    if let Some(mut w) = out {
        w.flush()?;
    }
    if skipped > 0 && !args.json {
        println!("skipped {skipped} bad rows");
    }
    if args.json {
        println!("{summary}");
    }
    Ok(())
}

fn print_confusion(labels: &[String], m: &[Vec<usize>]) {
    let width = labels.iter().map(String::len).max().unwrap_or(4).max(6);
    println!("confusion (rows: gold, columns: predicted)");
    print!("  {:width$}", "");
    for l in labels {
        print!(" {l:>width$}");
    }
    println!();
    for (l, row) in labels.iter().zip(m) {
        print!("  {l:width$}");
        for c in row {
            print!(" {c:>width$}");
        }
        println!();
    }
}

fn scores_map(names: &[String], scores: &[f32]) -> serde_json::Value {
    serde_json::Value::Object(
        names
            .iter()
            .cloned()
            .zip(scores.iter().map(|&s| serde_json::json!(s)))
            .collect(),
    )
}

fn write_line(w: &mut impl Write, v: serde_json::Value) -> Result<()> {
    writeln!(w, "{v}")?;
    Ok(())
}

fn write_class(
    w: &mut impl Write,
    task: &ClassificationTask,
    rep: &ClassificationEval,
) -> Result<()> {
    for p in &rep.predictions {
        write_line(
            w,
            serde_json::json!({
                "line": p.line,
                "input": p.input,
                "gold": task.labels[p.gold],
                "prediction": p.prediction.map(|i| task.labels[i].clone()),
                "scores": p.scores.as_ref().map(|s| scores_map(&task.labels, s)),
                "generated": p.generated,
            }),
        )?;
    }
    Ok(())
}

fn write_ensemble(
    w: &mut impl Write,
    task: &ClassificationTask,
    rows: &[LabeledText],
    rep: &EnsembleReport,
) -> Result<()> {
    for (i, r) in rows.iter().enumerate() {
        let mean = mean_scores(&rep.scores[i]);
        write_line(
            w,
            serde_json::json!({
                "line": r.line,
                "input": task.format(&r.text),
                "gold": task.labels[r.label],
                "prediction": task.labels[rep.mean_predictions[i]],
                "majority_vote": task.labels[rep.majority_predictions[i]],
                "scores": scores_map(&task.labels, &mean),
                "per_prompt_scores": rep.scores[i].iter().map(|s| scores_map(&task.labels, s)).collect::<Vec<_>>(),
            }),
        )?;
    }
    Ok(())
}

fn write_text(w: &mut impl Write, rep: &TextEval) -> Result<()> {
    for p in &rep.predictions {
        write_line(w, serde_json::to_value(p)?)?;
    }
    Ok(())
}

fn write_choice(w: &mut impl Write, rep: &MultipleChoiceEval) -> Result<()> {
    for (ex, p, scores) in &rep.predictions {
        write_line(
            w,
            serde_json::json!({
                "line": ex.line,
                "input": ex.input,
                "gold": ex.choices[ex.gold],
                "prediction": ex.choices[*p],
                "scores": scores_map(&ex.choices, scores),
            }),
        )?;
    }
    Ok(())
}
