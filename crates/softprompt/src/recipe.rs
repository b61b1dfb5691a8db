//! Training recipes: each method's defaults (learning rate, weight decay, optimizer, prompt
//! initialisation) and the data a run trains on (a JSONL file, the built-in task or a
//! BIG-bench task: [`crate::task::named`], the split `softprompt eval --task` uses), so that
//! every front end turns the same choices into the same [`TrainConfig`] and `task.json`.
//! Messages name the `softprompt train` options a user sets.

use crate::batch::Example;
use crate::load::Model;
use crate::prompt::{PeftAdapter, PromptInit};
use crate::task::named::{is_task_name, NamedTask, Split};
use crate::task::{data_source, encode_pair, label_targets, movie, read_jsonl, ClassificationTask, TaskMeta};
use crate::train::optim::{AdafactorConfig, AdamWConfig, OptimizerConfig};
use crate::train::schedule::Schedule;
use crate::train::trainer::{gold_labels, SelectBy, TrainConfig};
use crate::{bail, Error, Result};
use candle_core::Device;
use std::path::{Path, PathBuf};

/// The built-in task `--data` / `--dev` may name instead of a file.
pub const BUILTIN_TASK: &str = movie::NAME;

/// What is trained.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum Method {
    /// Lester et al. 2021: a soft prompt trained on the frozen model.
    PromptTuning,
    /// Baseline: every weight trained (AdamW), no soft prompt; writes a model folder.
    ModelTuning,
    /// Baseline (Liu et al. 2021): the prompt is the output of a trained prompt encoder.
    PTuning,
}

impl Method {
    pub fn name(self) -> &'static str {
        match self {
            Method::PromptTuning => "prompt-tuning",
            Method::ModelTuning => "model-tuning",
            Method::PTuning => "p-tuning",
        }
    }

    /// The paper's 0.3 for prompts; 1e-4 for model tuning; 1e-3 for P-tuning.
    pub fn default_lr(self) -> f64 {
        match self {
            Method::PromptTuning => 0.3,
            Method::ModelTuning => 1e-4,
            Method::PTuning => 1e-3,
        }
    }

    /// The baselines train with AdamW and weight decay 0.01; prompt tuning with the paper's
    /// Adafactor and 1e-5.
    fn is_baseline(self) -> bool {
        self != Method::PromptTuning
    }

    /// Rejects options that this method does not use, and counts of zero, before anything
    /// is loaded.
    pub fn check_flags(self, flags: &MethodFlags) -> Result<()> {
        let m = self.name();
        if self != Method::PTuning && (flags.encoder || flags.encoder_hidden.is_some()) {
            bail!("--encoder and --encoder-hidden are options of --method p-tuning, not {m}");
        }
        if self == Method::PTuning && flags.prompt_after_bos {
            bail!("--prompt-after-bos is an option of --method prompt-tuning, not {m}");
        }
        if flags.encoder_hidden == Some(0) {
            bail!("--encoder-hidden must be at least 1");
        }
        if self != Method::PromptTuning && flags.select_by == SelectBy::Accuracy {
            bail!("--select-by accuracy is an option of --method prompt-tuning, not {m}");
        }
        if self == Method::ModelTuning {
            let prompt_options = [
                ("--init", flags.init.kind.is_some()),
                ("--init-text", flags.init.text.is_some()),
                ("--init-file", flags.init.file.is_some()),
                ("--labels", !flags.labels.is_empty()),
                ("--n-tokens", flags.n_tokens.is_some()),
                ("--prompt-after-bos", flags.prompt_after_bos),
            ];
            if let Some((flag, _)) = prompt_options.iter().find(|(_, set)| *set) {
                bail!("{flag} does not apply to --method model-tuning: it trains the model's weights with no soft prompt");
            }
        }
        if flags.n_tokens == Some(0) {
            bail!("--n-tokens must be at least 1");
        }
        Ok(())
    }
}

/// The options of `softprompt train` whose use depends on the method, as the user gave them.
#[derive(Clone, Copy, Debug)]
pub struct MethodFlags<'a> {
    /// `--encoder` was given.
    pub encoder: bool,
    pub encoder_hidden: Option<usize>,
    pub prompt_after_bos: bool,
    pub select_by: SelectBy,
    pub init: &'a InitSpec,
    pub labels: &'a [String],
    pub n_tokens: Option<usize>,
}

/// Optimizer family.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum OptimizerKind {
    /// The paper's: T5X Adafactor, decay 0.8, update clipping 1.0, no momentum.
    Adafactor,
    /// torch.optim.AdamW (betas 0.9, 0.999; eps 1e-8).
    #[cfg_attr(feature = "clap", value(name = "adamw"))]
    AdamW,
}

/// Learning-rate decay.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum ScheduleKind {
    #[default]
    Constant,
    Linear,
    Cosine,
}

/// The optimizer options a user gave (with the `clap` feature, `softprompt train`'s optimizer
/// flags); unset ones take the method's defaults.
#[derive(Clone, Debug, Default)]
#[cfg_attr(feature = "clap", derive(clap::Args))]
pub struct OptimizerSpec {
    /// Optimizer [default: adafactor; adamw for model tuning and P-tuning].
    #[cfg_attr(feature = "clap", arg(long, value_enum))]
    pub optimizer: Option<OptimizerKind>,
    /// Learning rate [default: 0.3; model tuning 1e-4; P-tuning 1e-3].
    #[cfg_attr(feature = "clap", arg(long))]
    pub lr: Option<f64>,
    /// Learning-rate decay after the warmup.
    #[cfg_attr(feature = "clap", arg(long, value_enum, default_value_t = ScheduleKind::Constant))]
    pub schedule: ScheduleKind,
    /// Linear warmup steps before the schedule.
    #[cfg_attr(feature = "clap", arg(long, default_value_t = 0))]
    pub warmup_steps: usize,
    /// Weight decay (Adafactor: per step, not scaled by the learning rate; AdamW: decoupled)
    /// [default: 1e-5; model tuning and P-tuning 0.01].
    #[cfg_attr(feature = "clap", arg(long))]
    pub weight_decay: Option<f64>,
    /// Adafactor's second moment of a 2-D variable: `auto` factors it when its smaller axis has
    /// at least 128 elements (T5X/optax, the paper's: a 20- or 100-token prompt keeps a full
    /// second moment); `always` factors every 2-D variable (transformers' Adafactor); `never`.
    #[cfg_attr(feature = "clap", arg(long, value_enum, default_value_t = Factoring::Auto))]
    pub adafactor_factored: Factoring,
}

/// When Adafactor factors a 2-D second moment into row and column statistics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum Factoring {
    /// When the second largest axis has at least 128 elements (T5X, optax).
    #[default]
    Auto,
    /// Every variable of 2 or more axes (transformers' Adafactor).
    Always,
    /// Never: a full second moment, like Adam without momentum.
    Never,
}

impl OptimizerSpec {
    /// `method`'s learning rate (`lr` when given), checked.
    pub fn learning_rate(&self, method: Method) -> Result<f64> {
        let lr = self.lr.unwrap_or(method.default_lr());
        if !(lr.is_finite() && lr > 0.0) {
            bail!("--lr must be a positive number, got {lr}");
        }
        Ok(lr)
    }

    /// The optimizer: the kind (default by method) with the weight decay (default by method).
    pub fn optimizer(&self, method: Method) -> OptimizerConfig {
        let baseline = method.is_baseline();
        let weight_decay = self.weight_decay.unwrap_or(if baseline { 0.01 } else { 1e-5 });
        let kind = self.optimizer.unwrap_or(if baseline { OptimizerKind::AdamW } else { OptimizerKind::Adafactor });
        match kind {
            OptimizerKind::Adafactor => {
                let defaults = AdafactorConfig::default();
                OptimizerConfig::Adafactor(AdafactorConfig {
                    weight_decay,
                    factored: self.adafactor_factored != Factoring::Never,
                    min_dim_size_to_factor: match self.adafactor_factored {
                        Factoring::Always => 1,
                        _ => defaults.min_dim_size_to_factor,
                    },
                    ..defaults
                })
            }
            OptimizerKind::AdamW => OptimizerConfig::AdamW(AdamWConfig::new(weight_decay)),
        }
    }

    /// The schedule peaking at `lr` after the warmup, over `steps`.
    pub fn schedule(&self, lr: f64, steps: usize) -> Schedule {
        let warmup = self.warmup_steps;
        match self.schedule {
            ScheduleKind::Constant if warmup > 0 => Schedule::warmup_constant(lr, warmup),
            ScheduleKind::Constant => Schedule::constant(lr),
            ScheduleKind::Linear => Schedule::linear(lr, warmup, steps),
            ScheduleKind::Cosine => Schedule::cosine(lr, warmup, steps),
        }
    }
}

/// Prompt initialisation kinds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum InitKind {
    /// Values from U[-r, r] (--init-range, default 0.5).
    RandomUniform,
    /// Embeddings of distinct tokens drawn from the 5,000 most common (lowest-id) tokens.
    SampledVocab,
    /// One slot per --labels entry (multi-token labels averaged), the rest sampled-vocab.
    ClassLabels,
    /// Embeddings of --init-text's tokens, repeated or cut to fill the prompt.
    Text,
    /// The prompt of a PEFT adapter folder (--init-file): prompt transfer.
    File,
}

/// The initialisation options a user gave (with the `clap` feature, `softprompt train`'s
/// `--init*` options).
#[derive(Clone, Debug, Default)]
#[cfg_attr(feature = "clap", derive(clap::Args))]
pub struct InitSpec {
    /// Prompt initialisation [default: class-labels with --labels, text with --init-text,
    /// file with --init-file, else sampled-vocab].
    #[cfg_attr(feature = "clap", arg(long = "init", value_enum, value_name = "INIT"))]
    pub kind: Option<InitKind>,
    /// Text for --init text.
    #[cfg_attr(feature = "clap", arg(long = "init-text", value_name = "INIT_TEXT"))]
    pub text: Option<String>,
    /// PEFT adapter folder for --init file.
    #[cfg_attr(feature = "clap", arg(long = "init-file", value_name = "INIT_FILE"))]
    pub file: Option<PathBuf>,
    /// Half-width r of U[-r, r] for --init random-uniform.
    #[cfg_attr(feature = "clap", arg(long = "init-range", value_name = "INIT_RANGE", default_value_t = 0.5))]
    pub range: f64,
}

/// The prompt initialisation: `spec.kind`, by default file with a file, text with a text,
/// class labels with `labels`, else sampled vocabulary.
pub fn prompt_init(spec: &InitSpec, labels: &[String]) -> Result<PromptInit> {
    let kind = spec.kind.unwrap_or(if spec.file.is_some() {
        InitKind::File
    } else if spec.text.is_some() {
        InitKind::Text
    } else if !labels.is_empty() {
        InitKind::ClassLabels
    } else {
        InitKind::SampledVocab
    });
    Ok(match kind {
        InitKind::RandomUniform => PromptInit::RandomUniform { range: spec.range },
        InitKind::SampledVocab => PromptInit::SampledVocab,
        InitKind::ClassLabels if labels.is_empty() => bail!("--init class-labels needs --labels (comma separated)"),
        InitKind::ClassLabels => PromptInit::ClassLabels(labels.to_vec()),
        InitKind::Text => match &spec.text {
            Some(t) => PromptInit::Text(t.clone()),
            None => bail!("--init text needs --init-text"),
        },
        InitKind::File => match &spec.file {
            Some(d) => PromptInit::File(d.clone()),
            None => bail!("--init file needs --init-file (a PEFT adapter folder)"),
        },
    })
}

/// The prompt length: `n_tokens` when given, else the adapter's with an adapter to start
/// from, else the paper's 100.
pub fn prompt_length(n_tokens: Option<usize>, init: &PromptInit, device: &Device) -> Result<usize> {
    Ok(match (n_tokens, init) {
        (Some(n), _) => n,
        (None, PromptInit::File(dir)) => PeftAdapter::load(dir, device)?.config.num_virtual_tokens,
        (None, _) => 100,
    })
}

/// `--data` / `--dev` naming the built-in task (a file of that name wins).
pub fn is_builtin(path: &Path) -> bool {
    path.as_os_str() == BUILTIN_TASK && !path.exists()
}

/// `--data` / `--dev` naming a task (the built-in one or `bigbench:<task>`) rather than a
/// file: its name.
pub fn task_name(path: &Path) -> Option<&str> {
    path.to_str().filter(|s| is_task_name(s))
}

/// Where a run's examples come from (with the `clap` feature, `softprompt train`'s data
/// options). The labels given by the user (none: the built-in task's) also name the classes.
#[derive(Clone, Debug)]
#[cfg_attr(feature = "clap", derive(clap::Args))]
pub struct DataSpec {
    /// Training data: JSONL of {"input": ..., "target": ...} lines; or `movie-sentiment`: the
    /// built-in task's train split with its template and verbalizer (the examples of
    /// `softprompt run movie-sentiment`; its labels are then the default --labels); or
    /// `bigbench:<task>` (or `bigbench:<path>/task.json`): the BIG-bench task's train split,
    /// the seeded split `softprompt eval --task` uses (multiple choice: the gold choice is
    /// the target).
    #[cfg_attr(feature = "clap", arg(long))]
    pub data: PathBuf,
    /// Dev data (same format, or the task of --data by name: its dev split): evaluated every
    /// --eval-every steps (dev loss, and with --labels dev accuracy); the prompt of the best
    /// evaluation (--select-by) is the one exported.
    #[cfg_attr(feature = "clap", arg(long))]
    pub dev: Option<PathBuf>,
    /// Use only the first N dev examples.
    #[cfg_attr(feature = "clap", arg(long))]
    pub dev_limit: Option<usize>,
    /// Class labels, comma separated, as the targets spell them (e.g. ` negative, positive`):
    /// for --init class-labels, and for the dev accuracy (rank classification) when every dev
    /// target is one of them.
    #[cfg_attr(feature = "clap", arg(long, value_delimiter = ','))]
    pub labels: Vec<String>,
}

/// The classes whose dev accuracy a run logs.
pub enum DevClasses {
    /// Each label's target tokens.
    Some(Vec<Vec<u32>>),
    /// No dev accuracy, and a note for the user when the reason is worth one.
    None(Option<String>),
}

impl DevClasses {
    pub fn into_option(self) -> Option<Vec<Vec<u32>>> {
        match self {
            DevClasses::Some(c) => Some(c),
            DevClasses::None(_) => None,
        }
    }
}

/// A run's data: the named task when `data` names one, its labels, and (once a model is
/// loaded) the tokenized examples.
pub struct TrainData {
    pub spec: DataSpec,
    /// The task `data` names (its train split is trained on).
    pub task: Option<NamedTask>,
    /// The given labels, or the named classification task's verbalizer.
    pub labels: Vec<String>,
}

impl TrainData {
    /// Checks the data options and loads the task `spec.data` names, if any.
    pub fn resolve(spec: DataSpec) -> Result<TrainData> {
        let named = task_name(&spec.data);
        if let Some(dev) = spec.dev.as_deref().and_then(task_name) {
            if named != Some(dev) {
                bail!("--dev {dev} needs --data {dev} (its dev split goes with its train split)");
            }
        }
        if spec.dev_limit.is_some() && spec.dev.is_none() {
            bail!("--dev-limit needs --dev");
        }
        if spec.dev_limit == Some(0) {
            bail!("--dev-limit must be at least 1");
        }
        let task = named.map(NamedTask::load).transpose()?;
        let labels = match task.as_ref().and_then(NamedTask::classification) {
            Some(t) if spec.labels.is_empty() => t.verbalizer.clone(),
            _ => spec.labels.clone(),
        };
        Ok(TrainData { spec, task, labels })
    }

    /// Tokenized train and dev examples for `model` (dev cut to `dev_limit`).
    pub fn examples(&self, model: &Model) -> Result<(Vec<Example>, Option<Vec<Example>>)> {
        let (tokenizer, info) = (model.tokenizer()?, model.backbone.info());
        let read = |p: &Path| match &self.task {
            Some(t) if task_name(p).is_some() => t.examples(tokenizer, info, Split::Dev),
            _ => read_examples(p, model),
        };
        let train = match &self.task {
            Some(t) => t.examples(tokenizer, info, Split::Train)?,
            None => read_examples(&self.spec.data, model)?,
        };
        if train.is_empty() {
            bail!("{}: no training examples (the train split is empty)", self.spec.data.display());
        }
        let mut dev = self.spec.dev.as_deref().map(read).transpose()?;
        if let (Some(dev), Some(n)) = (dev.as_mut(), self.spec.dev_limit) {
            dev.truncate(n);
        }
        Ok((train, dev))
    }

    /// The classes of dev accuracy: each label's target as rank classification scores it,
    /// when every dev target is one of them. An error when `select_by` is accuracy and they
    /// cannot be; otherwise `DevClasses::None` with a note when the dev targets are not the
    /// labels.
    pub fn dev_classes(&self, select_by: SelectBy, dev: Option<&[Example]>, model: &Model) -> Result<DevClasses> {
        let accuracy = select_by == SelectBy::Accuracy;
        let Some(dev) = dev else {
            if accuracy {
                bail!("--select-by accuracy needs --dev");
            }
            return Ok(DevClasses::None(None));
        };
        if self.labels.is_empty() {
            if accuracy {
                bail!("--select-by accuracy needs --labels (the targets of the classes)");
            }
            return Ok(DevClasses::None(None));
        }
        let (tokenizer, info) = (model.tokenizer()?, model.backbone.info());
        let classes = match self.task.as_ref().and_then(NamedTask::classification) {
            Some(t) if self.spec.labels.is_empty() => t.label_targets(tokenizer, info),
            _ => label_targets("--labels", &self.labels, &self.labels, tokenizer, info),
        };
        let classes = match classes {
            Ok(c) => c,
            Err(e) if accuracy => return Err(e),
            // A bad label is reported by the initialisation that uses it, if any.
            Err(_) => return Ok(DevClasses::None(None)),
        };
        match gold_labels(dev, &classes, info) {
            Ok(_) => Ok(DevClasses::Some(classes)),
            Err(e) if accuracy => Err(Error::invalid(format!(
                "--select-by accuracy: every dev target must be one of --labels: {e}"
            ))),
            Err(e) => Ok(DevClasses::None(Some(format!("no dev accuracy ({e})")))),
        }
    }

    /// What `task.json` records of the data: the sources, the task (a named task's name and,
    /// for classification, its template, labels and verbalizer, as `softprompt run` records
    /// them, so `softprompt eval` finds the task), the formats and the selection metric.
    pub fn meta(&self, select_by: SelectBy) -> TaskMeta {
        let name = task_name(&self.spec.data).unwrap_or_default();
        let mut meta = match &self.task {
            Some(t) => t.meta(name),
            None => TaskMeta {
                input_format: Some(
                    "the `input` text as model input: BOS first where the model wants one; T5: followed by EOS".into(),
                ),
                target_format: Some("the `target` text followed by EOS".into()),
                labels: self.labels.clone(),
                ..TaskMeta::default()
            },
        };
        meta.data = Some(data_source(&self.spec.data));
        meta.dev = self.spec.dev.as_deref().map(data_source);
        meta.dev_limit = self.spec.dev_limit;
        meta.select_by = Some(format!("{select_by:?}").to_lowercase());
        meta
    }
}

/// Reads and tokenizes a JSONL file of `{"input", "target"}` pairs for `model`.
pub fn read_examples(path: &Path, model: &Model) -> Result<Vec<Example>> {
    let pairs = read_jsonl(path)?;
    if pairs.is_empty() {
        bail!("{}: no examples", path.display());
    }
    let (tokenizer, info) = (model.tokenizer()?, model.backbone.info());
    pairs
        .iter()
        .map(|p| {
            encode_pair(tokenizer, info, p)
                .map_err(|e| Error::invalid(format!("{}:{}: {e}", path.display(), p.line)))
        })
        .collect()
}

/// Writes `task`'s splits into `dir` as `train.jsonl`, `dev.jsonl`, `test.jsonl` of
/// `{"input": template applied, "target": what is trained on}` (what `--data` reads).
pub fn write_splits(dir: &Path, task: &NamedTask) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    for split in [Split::Train, Split::Dev, Split::Test] {
        let name = split.name();
        let mut text = String::new();
        for p in task.pairs(split) {
            text.push_str(&serde_json::json!({"input": p.input, "target": p.target}).to_string());
            text.push('\n');
        }
        crate::fsutil::write_atomic(&dir.join(format!("{name}.jsonl")), text.as_bytes())?;
    }
    Ok(())
}

/// The main job (`softprompt run movie-sentiment`): a class-label-initialised prompt trained
/// with constant-rate Adafactor on the built-in task, the dev accuracy logged beside the dev
/// loss (the prompt is still chosen by dev loss).
#[derive(Clone, Debug)]
pub struct MainJob {
    pub n_tokens: usize,
    pub lr: f64,
    pub steps: usize,
    pub batch_size: usize,
    /// The longer recipe: the whole dev split for model selection (else its first 200).
    pub full: bool,
    /// Seed of the prompt's sampled slots and the data order.
    pub seed: u64,
    /// Adafactor's factoring rule.
    pub factoring: Factoring,
}

impl MainJob {
    /// The default number of steps: 300, or 1500 for the longer recipe.
    pub fn default_steps(full: bool) -> usize {
        if full {
            1500
        } else {
            300
        }
    }

    /// The training configuration and the train and dev examples of `task` for `model`.
    pub fn config(
        &self,
        output: &Path,
        task: &ClassificationTask,
        model: &Model,
    ) -> Result<(TrainConfig, Vec<Example>, Vec<Example>)> {
        let (tokenizer, info) = (model.tokenizer()?, model.backbone.info());
        let dev_rows = if self.full { &task.dev[..] } else { &task.dev[..task.dev.len().min(200)] };
        let train = task.examples(tokenizer, info, &task.train)?;
        let dev = task.examples(tokenizer, info, dev_rows)?;
        let mut cfg = TrainConfig::paper(output);
        cfg.n_tokens = self.n_tokens;
        cfg.init = PromptInit::ClassLabels(task.verbalizer.clone());
        cfg.classes = Some(task.label_targets(tokenizer, info)?);
        cfg.schedule = Schedule::constant(self.lr);
        let optimizer = OptimizerSpec { adafactor_factored: self.factoring, ..OptimizerSpec::default() };
        cfg.optimizer = optimizer.optimizer(Method::PromptTuning);
        cfg.seed = self.seed;
        cfg.steps = self.steps;
        cfg.batch_size = self.batch_size;
        cfg.eval_every = (self.steps / 4).max(1);
        cfg.checkpoint_every = (self.steps / 10).max(1);
        cfg.task = task.meta();
        Ok((cfg, train, dev))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn method_defaults() {
        let unset = OptimizerSpec::default();
        assert_eq!(unset.learning_rate(Method::PromptTuning).unwrap(), 0.3);
        assert_eq!(unset.learning_rate(Method::ModelTuning).unwrap(), 1e-4);
        let nan = OptimizerSpec { lr: Some(f64::NAN), ..unset.clone() };
        assert!(nan.learning_rate(Method::PTuning).is_err());
        assert!(matches!(unset.optimizer(Method::PromptTuning), OptimizerConfig::Adafactor(c) if c.weight_decay == 1e-5));
        assert!(matches!(unset.optimizer(Method::PTuning), OptimizerConfig::AdamW(_)));
        let factored = |f| match (OptimizerSpec { adafactor_factored: f, ..OptimizerSpec::default() }).optimizer(Method::PromptTuning) {
            OptimizerConfig::Adafactor(c) => c.factored_dims(&[20, 576]),
            OptimizerConfig::AdamW(_) => unreachable!(),
        };
        assert_eq!(factored(Factoring::Auto), None, "a 20-token prompt keeps a full second moment");
        assert_eq!(factored(Factoring::Always), Some((0, 1)));
        assert_eq!(factored(Factoring::Never), None);
    }

    #[test]
    fn flags_go_with_their_method() {
        let init = InitSpec::default();
        let flags = MethodFlags {
            encoder: false,
            encoder_hidden: None,
            prompt_after_bos: true,
            select_by: SelectBy::Loss,
            init: &init,
            labels: &[],
            n_tokens: None,
        };
        assert!(Method::PromptTuning.check_flags(&flags).is_ok());
        let err = Method::ModelTuning.check_flags(&flags).unwrap_err().to_string();
        assert!(err.starts_with("--prompt-after-bos does not apply to --method model-tuning"), "{err}");
        let p_tuning = MethodFlags { prompt_after_bos: false, encoder_hidden: Some(0), ..flags };
        assert_eq!(Method::PTuning.check_flags(&p_tuning).unwrap_err().to_string(), "--encoder-hidden must be at least 1");
    }

    #[test]
    fn the_init_follows_what_was_given() {
        let labels = vec!["a".to_string()];
        let spec = InitSpec { range: 0.5, ..InitSpec::default() };
        assert_eq!(prompt_init(&spec, &labels).unwrap(), PromptInit::ClassLabels(labels.clone()));
        assert_eq!(prompt_init(&spec, &[]).unwrap(), PromptInit::SampledVocab);
        let text = InitSpec { text: Some("hi".into()), ..spec.clone() };
        assert_eq!(prompt_init(&text, &labels).unwrap(), PromptInit::Text("hi".into()));
        let bad = InitSpec { kind: Some(InitKind::File), ..spec };
        assert!(prompt_init(&bad, &labels).is_err());
    }
}
