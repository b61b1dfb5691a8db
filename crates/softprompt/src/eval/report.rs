//! Whole-split evaluation: rank classification or generation for classification tasks,
//! generation with normalised exact match and token F1 for text-to-text tasks, and rank
//! classification of per-example choices for multiple-choice tasks. Every evaluation keeps
//! one prediction record per example (for `--predictions` files).

use super::beam::{beam_search, BeamOptions};
use super::classify::{argmax, label_log_likelihoods};
use super::generate::{greedy, GenerateOptions};
use super::metrics;
use crate::load::Model;
use crate::model::Backbone;
use crate::task::bigbench::MultipleChoiceExample;
use crate::task::{ClassificationTask, LabeledText, TextPair};
use crate::Result;
use candle_core::{Device, Tensor};

/// How a classification task is evaluated.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Score each label's verbalizer (or choice) and pick the most likely.
    Rank,
    /// Generate (greedy, or beam search) and compare the text; a classification maps it
    /// back to a label (normalised exact match).
    Generate,
}

/// Decoding settings for generation.
#[derive(Clone, Debug)]
pub struct Decoding {
    /// 1: greedy (batched); more: beam search (one input at a time).
    pub beams: usize,
    pub max_new_tokens: usize,
    /// See [`BeamOptions::length_penalty`].
    pub length_penalty: Option<f64>,
}

impl Default for Decoding {
    fn default() -> Self {
        Decoding {
            beams: 1,
            max_new_tokens: 20,
            length_penalty: None,
        }
    }
}

/// New tokens per source, cut before the first EOS. `prompt` is `[N, D]` or `[B, N, D]`.
pub fn generate_tokens(
    backbone: &Backbone,
    prompt: Option<&Tensor>,
    sources: &[Vec<u32>],
    decoding: &Decoding,
    batch_size: usize,
    device: &Device,
) -> Result<Vec<Vec<u32>>> {
    let eos = &backbone.info().eos_token_ids;
    let cut = |mut t: Vec<u32>| {
        if let Some(i) = t.iter().position(|x| eos.contains(x)) {
            t.truncate(i);
        }
        t
    };
    if decoding.beams > 1 {
        let opts = BeamOptions {
            beams: decoding.beams,
            max_new_tokens: decoding.max_new_tokens,
            length_penalty: decoding.length_penalty,
            stop_at_eos: true,
        };
        let hyps = beam_search(backbone, prompt, sources, &opts, device)?;
        return Ok(hyps
            .into_iter()
            .map(|h| cut(h.into_iter().next().map(|h| h.tokens).unwrap_or_default()))
            .collect());
    }
    let opts = GenerateOptions {
        max_new_tokens: decoding.max_new_tokens,
        stop_at_eos: true,
    };
    let step = batch_size.max(1);
    let mut out = Vec::with_capacity(sources.len());
    for (c, chunk) in sources.chunks(step).enumerate() {
        let p = match prompt {
            Some(p) if p.rank() == 3 => Some(p.narrow(0, c * step, chunk.len())?),
            Some(p) => Some(p.clone()),
            None => None,
        };
        let g = greedy(backbone, p.as_ref(), chunk, &opts, device)?;
        out.extend(g.tokens.into_iter().map(cut));
    }
    Ok(out)
}

/// The label whose target tokens (a trailing EOS ignored) begin `generated`; the longest
/// such target wins (ties: the first label).
pub fn label_of_tokens(
    generated: &[u32],
    label_targets: &[Vec<u32>],
    eos: &[u32],
) -> Option<usize> {
    let mut best: Option<(usize, usize)> = None;
    for (j, t) in label_targets.iter().enumerate() {
        let t = match t.last() {
            Some(last) if eos.contains(last) => &t[..t.len() - 1],
            _ => &t[..],
        };
        if !t.is_empty() && generated.starts_with(t) && best.is_none_or(|(_, len)| t.len() > len) {
            best = Some((j, t.len()));
        }
    }
    best.map(|(j, _)| j)
}

/// The label one of whose `names` (label name, verbalizer...) the generated text is, after
/// normalisation ([`metrics::normalize_answer`]), or starts with as whole words; the longest
/// matching name wins (ties: the first label).
pub fn label_of_text(generated: &str, names: &[Vec<String>]) -> Option<usize> {
    let g = metrics::normalize_answer(generated);
    let mut best: Option<(usize, usize)> = None;
    for (j, alternatives) in names.iter().enumerate() {
        for name in alternatives {
            let n = metrics::normalize_answer(name);
            if n.is_empty() {
                continue;
            }
            let hit = g == n || g.starts_with(&format!("{n} "));
            if hit && best.is_none_or(|(_, len)| n.len() > len) {
                best = Some((j, n.len()));
            }
        }
    }
    best.map(|(j, _)| j)
}

/// One classified example.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ClassPrediction {
    pub line: usize,
    /// The model input (template applied).
    pub input: String,
    pub gold: usize,
    /// `None`: the generation matched no label.
    pub prediction: Option<usize>,
    /// Rank mode: each label's log-likelihood.
    pub scores: Option<Vec<f32>>,
    /// Generate mode: the generated text.
    pub generated: Option<String>,
}

/// Classification results.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ClassificationEval {
    pub examples: usize,
    pub accuracy: f64,
    pub macro_f1: f64,
    /// `confusion[gold][predicted]` (generations matching no label are left out).
    pub confusion: Vec<Vec<usize>>,
    /// Generations that matched no label (counted as wrong).
    pub unmatched: usize,
    #[serde(skip)]
    pub predictions: Vec<ClassPrediction>,
}

impl ClassificationEval {
    fn new(predictions: Vec<ClassPrediction>, n_labels: usize) -> Self {
        let gold: Vec<usize> = predictions.iter().map(|p| p.gold).collect();
        // A missing prediction becomes index n_labels: wrong, and in no confusion cell.
        let pred: Vec<usize> = predictions
            .iter()
            .map(|p| p.prediction.unwrap_or(n_labels))
            .collect();
        ClassificationEval {
            examples: predictions.len(),
            accuracy: metrics::accuracy(&pred, &gold),
            macro_f1: metrics::macro_f1(&pred, &gold, n_labels),
            confusion: metrics::confusion_matrix(&pred, &gold, n_labels),
            unmatched: predictions
                .iter()
                .filter(|p| p.prediction.is_none())
                .count(),
            predictions,
        }
    }
}

/// Evaluates a classification task's `rows` with an optional prompt (`[N, D]`).
pub fn classify(
    model: &Model,
    prompt: Option<&Tensor>,
    task: &ClassificationTask,
    rows: &[LabeledText],
    mode: Mode,
    decoding: &Decoding,
    batch_size: usize,
) -> Result<ClassificationEval> {
    let tokenizer = model.tokenizer()?;
    let info = model.backbone.info();
    let sources = task.sources(tokenizer, info, rows)?;
    let labels = task.label_targets(tokenizer, info)?;
    let mut predictions = Vec::with_capacity(rows.len());
    match mode {
        Mode::Rank => {
            let scores = label_log_likelihoods(
                &model.backbone,
                prompt,
                &sources,
                &labels,
                batch_size,
                &model.device,
            )?;
            for (r, s) in rows.iter().zip(scores) {
                predictions.push(ClassPrediction {
                    line: r.line,
                    input: task.format(&r.text),
                    gold: r.label,
                    prediction: Some(argmax(&s)),
                    scores: Some(s),
                    generated: None,
                });
            }
        }
        Mode::Generate => {
            let generated = generate_tokens(
                &model.backbone,
                prompt,
                &sources,
                decoding,
                batch_size,
                &model.device,
            )?;
            let names: Vec<Vec<String>> = task
                .labels
                .iter()
                .zip(&task.verbalizer)
                .map(|(l, v)| vec![v.clone(), l.clone()])
                .collect();
            for (r, g) in rows.iter().zip(generated) {
                let text = tokenizer.decode(&g)?;
                let prediction = label_of_tokens(&g, &labels, &info.eos_token_ids)
                    .or_else(|| label_of_text(&text, &names));
                predictions.push(ClassPrediction {
                    line: r.line,
                    input: task.format(&r.text),
                    gold: r.label,
                    prediction,
                    scores: None,
                    generated: Some(text),
                });
            }
        }
    }
    Ok(ClassificationEval::new(predictions, task.labels.len()))
}

/// One generated answer of a text-to-text task.
#[derive(Clone, Debug, serde::Serialize)]
pub struct TextPrediction {
    pub line: usize,
    pub input: String,
    pub gold: String,
    pub prediction: String,
    pub exact_match: bool,
    pub f1: f64,
}

/// Text-to-text results: means over examples.
#[derive(Clone, Debug, serde::Serialize)]
pub struct TextEval {
    pub examples: usize,
    pub exact_match: f64,
    pub f1: f64,
    #[serde(skip)]
    pub predictions: Vec<TextPrediction>,
}

/// Generates an answer to every pair's input and compares it with the target.
pub fn generate_text(
    model: &Model,
    prompt: Option<&Tensor>,
    pairs: &[TextPair],
    decoding: &Decoding,
    batch_size: usize,
) -> Result<TextEval> {
    let tokenizer = model.tokenizer()?;
    let info = model.backbone.info();
    let sources = pairs
        .iter()
        .map(|p| {
            let mut ids = tokenizer.encode_input(&p.input)?;
            info.end_source(&mut ids);
            Ok(ids)
        })
        .collect::<Result<Vec<_>>>()?;
    let generated = generate_tokens(
        &model.backbone,
        prompt,
        &sources,
        decoding,
        batch_size,
        &model.device,
    )?;
    let mut predictions = Vec::with_capacity(pairs.len());
    for (p, g) in pairs.iter().zip(generated) {
        let text = tokenizer.decode(&g)?;
        predictions.push(TextPrediction {
            line: p.line,
            input: p.input.clone(),
            gold: p.target.clone(),
            exact_match: metrics::exact_match(&text, &p.target),
            f1: metrics::token_f1(&text, &p.target),
            prediction: text,
        });
    }
    let n = predictions.len().max(1) as f64;
    Ok(TextEval {
        examples: predictions.len(),
        exact_match: predictions.iter().filter(|p| p.exact_match).count() as f64 / n,
        f1: predictions.iter().map(|p| p.f1).sum::<f64>() / n,
        predictions,
    })
}

/// Multiple-choice results (each example ranks its own choices).
#[derive(Clone, Debug, serde::Serialize)]
pub struct MultipleChoiceEval {
    pub examples: usize,
    pub accuracy: f64,
    #[serde(skip)]
    pub predictions: Vec<(MultipleChoiceExample, usize, Vec<f32>)>,
}

/// Rank classification of every example over its own choices.
pub fn multiple_choice(
    model: &Model,
    prompt: Option<&Tensor>,
    examples: &[MultipleChoiceExample],
    batch_size: usize,
) -> Result<MultipleChoiceEval> {
    let tokenizer = model.tokenizer()?;
    let info = model.backbone.info();
    let mut predictions = Vec::with_capacity(examples.len());
    let mut right = 0usize;
    for ex in examples {
        let mut source = tokenizer.encode_input(&ex.input)?;
        info.end_source(&mut source);
        let seq2seq = info.is_encoder_decoder();
        let choices = ex
            .choices
            .iter()
            .map(|c| {
                let mut ids = tokenizer.encode(c)?;
                if ids.is_empty() {
                    crate::bail!("example {}: choice `{c}` tokenizes to nothing", ex.line);
                }
                if seq2seq {
                    ids.extend(info.eos_token_ids.first());
                }
                Ok(ids)
            })
            .collect::<Result<Vec<_>>>()?;
        let scores = label_log_likelihoods(
            &model.backbone,
            prompt,
            &[source],
            &choices,
            batch_size,
            &model.device,
        )?
        .pop()
        .unwrap_or_default();
        let p = argmax(&scores);
        right += usize::from(p == ex.gold);
        predictions.push((ex.clone(), p, scores));
    }
    Ok(MultipleChoiceEval {
        examples: examples.len(),
        accuracy: right as f64 / examples.len().max(1) as f64,
        predictions,
    })
}
