//! The prompt-design baseline (GPT-3 style in-context learning): no soft prompt; the model
//! input is `K` solved demonstrations followed by the query, all written with the task's own
//! template and verbalizer. `K = 0` is the zero-shot template alone.
//!
//! The `K` demonstrations are drawn once, without replacement, from the train split with a
//! seed, and the same ones (in the drawn order) precede every query, so results are
//! reproducible. Demonstrations are separated from each other and from the query by
//! [`SEPARATOR`].

use crate::task::{ClassificationTask, LabeledText, TextPair};
use crate::Result;

/// Between two demonstrations, and between the last one and the query.
pub const SEPARATOR: &str = "\n\n";

/// `k` distinct indices of `0..n` drawn with `seed` (in the drawn order).
pub fn draw(n: usize, k: usize, seed: u64) -> Result<Vec<usize>> {
    use rand::seq::SliceRandom;
    use rand::SeedableRng;
    if k > n {
        crate::bail!("{k} demonstrations asked for, but the train split has only {n} examples");
    }
    let mut idx: Vec<usize> = (0..n).collect();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    idx.shuffle(&mut rng);
    idx.truncate(k);
    Ok(idx)
}

/// The classification task with `k` demonstrations from `task.train` prepended to its
/// template (each: the template applied to the example's text, then its label's verbalizer).
/// The returned task has the same labels, verbalizer and splits.
pub fn k_shot_task(task: &ClassificationTask, k: usize, seed: u64) -> Result<ClassificationTask> {
    let demos: Vec<&LabeledText> = draw(task.train.len(), k, seed)?
        .into_iter()
        .map(|i| &task.train[i])
        .collect();
    let mut prefix = String::new();
    for d in demos {
        if d.text.contains("{text}") {
            crate::bail!(
                "task {}: demonstration (line {}) contains `{{text}}`, which the template would replace",
                task.name,
                d.line
            );
        }
        let verbal = task.verbalizer.get(d.label).ok_or_else(|| {
            crate::Error::invalid(format!(
                "task {}: label index {} out of range",
                task.name, d.label
            ))
        })?;
        prefix.push_str(&task.format(&d.text));
        prefix.push_str(verbal);
        prefix.push_str(SEPARATOR);
    }
    let mut out = task.clone();
    out.template = format!("{prefix}{}", task.template);
    Ok(out)
}

/// Text-to-text pairs with `k` demonstrations from `train` (input then target) before each
/// input of `rows`.
pub fn k_shot_pairs(
    train: &[TextPair],
    rows: &[TextPair],
    k: usize,
    seed: u64,
) -> Result<Vec<TextPair>> {
    let mut prefix = String::new();
    for i in draw(train.len(), k, seed)? {
        prefix.push_str(&train[i].input);
        prefix.push_str(&train[i].target);
        prefix.push_str(SEPARATOR);
    }
    Ok(rows
        .iter()
        .map(|r| TextPair {
            input: format!("{prefix}{}", r.input),
            target: r.target.clone(),
            line: r.line,
        })
        .collect())
}
