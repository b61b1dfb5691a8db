//! `OUTPUT/metrics.jsonl`: one JSON object per logged step.

use crate::fsutil::write_atomic;
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};

pub const FILE: &str = "metrics.jsonl";

/// One line of `metrics.jsonl`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StepMetrics {
    /// Optimizer steps done (1 after the first update).
    pub step: usize,
    /// Mean target-token NLL of the training batches since the previous line.
    pub loss: f64,
    /// Learning rate of this step's update.
    pub lr: f64,
    /// Global L2 norm of the prompt gradient before clipping.
    pub grad_norm: f64,
    /// Non-pad tokens (sources and targets) per second of this step.
    pub tokens_per_s: f64,
    /// Mean target-token NLL on the dev set, when it was evaluated after this step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dev_loss: Option<f64>,
    /// Rank-classification accuracy on the dev set (a fraction), when it was evaluated after
    /// this step and the task's classes are known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dev_accuracy: Option<f64>,
    /// Seconds of this step (forward, backward, exchanges and optimizer; not the dev
    /// evaluation or checkpoint after it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step_s: Option<f64>,
    /// Data-parallel runs: mean seconds per step spent in collectives (the gradient
    /// all-reduce, the sums of losses and dev scores, waiting for the slowest rank included)
    /// since the previous line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comm_s: Option<f64>,
}

/// Reads `metrics.jsonl` (an absent file is empty); a bad line is an error naming it.
pub fn read(path: &Path) -> Result<Vec<StepMetrics>> {
    read_inner(path, false)
}

/// `read_inner(path, true)` drops a bad LAST line: the torn write of a run that was killed.
fn read_inner(path: &Path, tolerate_torn_tail: bool) -> Result<Vec<StepMetrics>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io(path, e)),
    };
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str(line) {
            Ok(m) => out.push(m),
            Err(_) if tolerate_torn_tail && i + 1 == lines.len() => break,
            Err(e) => return Err(Error::data(path, i + 1, format!("bad metrics line: {e}"))),
        }
    }
    Ok(out)
}

/// Appends lines to `metrics.jsonl`, flushing each one.
pub struct MetricsLog {
    path: PathBuf,
    /// `None`: the lines are kept but not written (a data-parallel rank other than 0).
    file: Option<std::fs::File>,
    /// Every line of the file, in order (for the plot).
    pub rows: Vec<StepMetrics>,
}

impl MetricsLog {
    /// Opens `OUTPUT/metrics.jsonl`. A fresh run (`keep_up_to` = `None`) empties it; a resumed
    /// run keeps the lines of steps up to the checkpoint's and drops later ones (logged after
    /// the checkpoint by the run that stopped), which the resumed run logs again.
    pub fn open(output: &Path, keep_up_to: Option<usize>) -> Result<Self> {
        let path = output.join(FILE);
        let rows = Self::kept_rows(&path, keep_up_to)?;
        let mut text = String::new();
        for r in &rows {
            text.push_str(&to_line(r)?);
        }
        write_atomic(&path, text.as_bytes())?;
        let file = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        Ok(MetricsLog {
            path,
            file: Some(file),
            rows,
        })
    }

    /// The log [`MetricsLog::open`] would give, without touching the file: the lines of a
    /// resumed run are read, appended ones only kept in memory. Data-parallel ranks other
    /// than 0 log this way (rank 0 writes the file).
    pub fn read_only(output: &Path, keep_up_to: Option<usize>) -> Result<Self> {
        let path = output.join(FILE);
        let rows = Self::kept_rows(&path, keep_up_to)?;
        Ok(MetricsLog {
            path,
            file: None,
            rows,
        })
    }

    /// The lines of a fresh (none) or resumed run (those up to its checkpoint's step).
    fn kept_rows(path: &Path, keep_up_to: Option<usize>) -> Result<Vec<StepMetrics>> {
        Ok(match keep_up_to {
            None => Vec::new(),
            Some(step) => read_inner(path, true)?
                .into_iter()
                .filter(|m| m.step <= step)
                .collect(),
        })
    }

    pub fn append(&mut self, m: StepMetrics) -> Result<()> {
        if let Some(file) = &mut self.file {
            let line = to_line(&m)?;
            file.write_all(line.as_bytes())
                .and_then(|_| file.flush())
                .map_err(|e| Error::io(&self.path, e))?;
        }
        self.rows.push(m);
        Ok(())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

fn to_line(m: &StepMetrics) -> Result<String> {
    let mut s = serde_json::to_string(m).map_err(|e| Error::invalid(format!("metrics: {e}")))?;
    s.push('\n');
    Ok(s)
}
