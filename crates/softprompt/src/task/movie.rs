//! `movie-sentiment`: the 10,605 Rotten Tomatoes snippets with human sentiment scores
//! (Hutto & Gilbert 2014, shipped in the vaderSentiment sdist). Label = sign of the mean
//! score (the 37 snippets scored exactly 0 are dropped); a fixed seeded 80/10/10 split.

use super::{split, ClassificationTask, LabeledText};
use crate::{Error, Result};
use std::path::Path;

/// The task's name (`--task`, `--data`, `task.json`).
pub const NAME: &str = "movie-sentiment";
pub const TEMPLATE: &str = "Review: {text}\nSentiment:";
pub const LABELS: [&str; 2] = ["negative", "positive"];
/// Verbalizer: what the model is asked to produce for each label.
pub const VERBALIZER: [&str; 2] = [" negative", " positive"];
/// Seed of the fixed split.
pub const SPLIT_SEED: u64 = 2014;

/// Parses `movieReviewSnippets_GroundTruth.txt` (`id<TAB>score<TAB>sentence` per line).
pub fn parse(path: &Path) -> Result<Vec<LabeledText>> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let text = std::str::from_utf8(&bytes).map_err(|e| Error::format(path, format!("invalid UTF-8: {e}")))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line_no = i + 1;
        let line = line.trim_end_matches('\r');
        if line.trim().is_empty() {
            continue;
        }
        let mut fields = line.splitn(3, '\t');
        let (_id, score, sentence) = match (fields.next(), fields.next(), fields.next()) {
            (Some(a), Some(b), Some(c)) => (a, b, c),
            _ => return Err(Error::data(path, line_no, "expected `id<TAB>score<TAB>sentence`")),
        };
        let score: f64 = score
            .trim()
            .parse()
            .map_err(|_| Error::data(path, line_no, format!("score `{score}` is not a number")))?;
        if score == 0.0 {
            continue;
        }
        out.push(LabeledText {
            text: sentence.trim().to_string(),
            label: usize::from(score > 0.0),
            line: line_no,
        });
    }
    Ok(out)
}

/// The task with its fixed split, from the cached data file (fetched on first use).
pub fn load() -> Result<ClassificationTask> {
    let path = crate::fetch::movie_reviews()?;
    from_file(&path)
}

pub fn from_file(path: &Path) -> Result<ClassificationTask> {
    let rows = parse(path)?;
    let (train, dev, test) = split(rows, SPLIT_SEED, 0.8, 0.1);
    Ok(ClassificationTask {
        name: NAME.into(),
        template: TEMPLATE.into(),
        labels: LABELS.iter().map(|s| s.to_string()).collect(),
        verbalizer: VERBALIZER.iter().map(|s| s.to_string()).collect(),
        train,
        dev,
        test,
    })
}
