//! Reading task data from JSONL, CSV or TSV files, and length limits on tokenized examples.
//!
//! Every record has an input field and a target field (named `input` and `target` unless the
//! [`ReadOptions`] say otherwise). JSONL files hold one object per line; CSV and TSV files
//! start with a header row naming the columns. CSV follows RFC 4180 (double quotes); TSV has
//! no quoting at all: a field is everything between two tabs, so quotes are kept as written.
//!
//! A bad record is an error naming the file and its 1-based line, unless
//! [`ReadOptions::skip_bad_rows`] is set: then it is skipped and counted in
//! [`Rows::skipped`]. A file with no usable record is always an error.

use super::{LabeledText, TextPair};
use crate::batch::Example;
use crate::model::ModelInfo;
use crate::{Error, Result};
use std::path::Path;

/// The layout of a data file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Jsonl,
    Csv,
    Tsv,
}

impl Format {
    /// The format named by the file's extension: `.jsonl`/`.json`/`.ndjson`, `.csv`, `.tsv`/`.tab`.
    pub fn from_path(path: &Path) -> Result<Format> {
        let ext = path
            .extension()
            .and_then(|e| e.to_str())
            .unwrap_or("")
            .to_ascii_lowercase();
        match ext.as_str() {
            "jsonl" | "json" | "ndjson" => Ok(Format::Jsonl),
            "csv" => Ok(Format::Csv),
            "tsv" | "tab" => Ok(Format::Tsv),
            _ => Err(Error::format(
                path,
                "cannot tell the data format from the extension (expected .jsonl, .csv or .tsv); name it explicitly",
            )),
        }
    }
}

impl std::str::FromStr for Format {
    type Err = Error;
    fn from_str(s: &str) -> Result<Format> {
        match s.to_ascii_lowercase().as_str() {
            "jsonl" | "json" | "ndjson" => Ok(Format::Jsonl),
            "csv" => Ok(Format::Csv),
            "tsv" => Ok(Format::Tsv),
            _ => Err(Error::invalid(format!(
                "unknown data format `{s}` (expected jsonl, csv or tsv)"
            ))),
        }
    }
}

/// How to read a data file.
#[derive(Clone, Debug)]
pub struct ReadOptions {
    /// `None`: from the file's extension.
    pub format: Option<Format>,
    /// Field (JSONL key, CSV/TSV column) holding the model input.
    pub input_field: String,
    /// Field holding the target text (or, for classification, the label).
    pub target_field: String,
    /// Skip and count bad records instead of failing on the first one.
    pub skip_bad_rows: bool,
}

impl Default for ReadOptions {
    fn default() -> Self {
        ReadOptions {
            format: None,
            input_field: "input".into(),
            target_field: "target".into(),
            skip_bad_rows: false,
        }
    }
}

/// The records read from a file and how many bad ones were skipped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rows<T> {
    pub rows: Vec<T>,
    /// Bad records skipped (always 0 unless [`ReadOptions::skip_bad_rows`]).
    pub skipped: usize,
}

/// Reads `(input, target)` pairs.
pub fn read_pairs(path: &Path, opts: &ReadOptions) -> Result<Rows<TextPair>> {
    read_records(path, opts, |input, target, line| Ok(TextPair { input, target, line }))
}

/// Reads labelled texts: the target field must name one of `labels`, or equal one of the
/// `verbalizer` texts (compared exactly, then with surrounding whitespace trimmed). Anything
/// else is an "unknown label" error for that line.
pub fn read_labeled(
    path: &Path,
    opts: &ReadOptions,
    labels: &[String],
    verbalizer: &[String],
) -> Result<Rows<LabeledText>> {
    if labels.is_empty() {
        crate::bail!("reading {}: the task has no labels", path.display());
    }
    read_records(path, opts, |text, target, line| {
        let label = labels
            .iter()
            .position(|l| *l == target)
            .or_else(|| verbalizer.iter().position(|v| *v == target))
            .or_else(|| verbalizer.iter().position(|v| v.trim() == target.trim()))
            .filter(|&i| i < labels.len())
            .ok_or_else(|| {
                Error::data(
                    path,
                    line,
                    format!("unknown label `{target}` (the task's labels: {})", labels.join(", ")),
                )
            })?;
        Ok(LabeledText { text, label, line })
    })
}

/// Reads every record as `(input, target, line)` and maps it with `make`; errors from `make`
/// are bad records like the others.
fn read_records<T>(
    path: &Path,
    opts: &ReadOptions,
    mut make: impl FnMut(String, String, usize) -> Result<T>,
) -> Result<Rows<T>> {
    let format = match opts.format {
        Some(f) => f,
        None => Format::from_path(path)?,
    };
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let mut rows = Vec::new();
    let mut skipped = 0;
    let mut take = |record: Result<(String, String, usize)>| -> Result<()> {
        match record.and_then(|(input, target, line)| make(input, target, line)) {
            Ok(row) => rows.push(row),
            Err(e @ Error::Data { .. }) if opts.skip_bad_rows => {
                tracing::debug!("skipping bad record: {e}");
                skipped += 1;
            }
            Err(e) => return Err(e),
        }
        Ok(())
    };
    match format {
        Format::Jsonl => jsonl_records(path, &bytes, opts, &mut take)?,
        Format::Csv => delimited_records(path, &bytes, b',', true, opts, &mut take)?,
        Format::Tsv => delimited_records(path, &bytes, b'\t', false, opts, &mut take)?,
    }
    if rows.is_empty() {
        let why = if skipped > 0 {
            format!("no usable record ({skipped} bad ones skipped)")
        } else {
            "no records: the file is empty".to_string()
        };
        return Err(Error::format(path, why));
    }
    Ok(Rows { rows, skipped })
}

type Take<'a> = dyn FnMut(Result<(String, String, usize)>) -> Result<()> + 'a;

fn jsonl_records(path: &Path, bytes: &[u8], opts: &ReadOptions, take: &mut Take) -> Result<()> {
    let bytes = bytes.strip_prefix("\u{feff}".as_bytes()).unwrap_or(bytes);
    for (i, raw) in bytes.split(|&b| b == b'\n').enumerate() {
        let line = i + 1;
        let record = (|| {
            let text = std::str::from_utf8(raw).map_err(|e| Error::data(path, line, format!("invalid UTF-8: {e}")))?;
            if text.trim().is_empty() {
                return Ok(None);
            }
            let v: serde_json::Value =
                serde_json::from_str(text).map_err(|e| Error::data(path, line, format!("invalid JSON: {e}")))?;
            if !v.is_object() {
                return Err(Error::data(path, line, "expected a JSON object"));
            }
            let field = |name: &str| -> Result<String> {
                match v.get(name) {
                    Some(serde_json::Value::String(s)) => Ok(s.clone()),
                    Some(n @ (serde_json::Value::Number(_) | serde_json::Value::Bool(_))) => Ok(n.to_string()),
                    Some(_) => Err(Error::data(path, line, format!("field `{name}` must be a string"))),
                    None => Err(Error::data(path, line, format!("missing field `{name}`"))),
                }
            };
            Ok(Some((field(&opts.input_field)?, field(&opts.target_field)?, line)))
        })();
        match record {
            Ok(None) => {}
            Ok(Some(r)) => take(Ok(r))?,
            Err(e) => take(Err(e))?,
        }
    }
    Ok(())
}

fn delimited_records(
    path: &Path,
    bytes: &[u8],
    delimiter: u8,
    quoting: bool,
    opts: &ReadOptions,
    take: &mut Take,
) -> Result<()> {
    let mut reader = csv::ReaderBuilder::new()
        .delimiter(delimiter)
        .quoting(quoting)
        .flexible(true)
        .has_headers(true)
        .from_reader(bytes);
    let headers = reader
        .byte_headers()
        .map_err(|e| Error::data(path, 1, format!("cannot read the header row: {e}")))?
        .clone();
    if headers.is_empty() {
        return Err(Error::format(path, "no records: the file is empty"));
    }
    let names: Vec<String> = headers
        .iter()
        .enumerate()
        .map(|(i, h)| {
            let h = std::str::from_utf8(h)
                .map_err(|e| Error::data(path, 1, format!("invalid UTF-8 in the header: {e}")))?;
            let h = if i == 0 { h.trim_start_matches('\u{feff}') } else { h };
            Ok(h.trim().to_string())
        })
        .collect::<Result<_>>()?;
    let column = |name: &str| -> Result<usize> {
        names.iter().position(|n| n == name).ok_or_else(|| {
            Error::data(
                path,
                1,
                format!("no column `{name}` in the header (columns: {})", names.join(", ")),
            )
        })
    };
    let (ci, ct) = (column(&opts.input_field)?, column(&opts.target_field)?);
    // Lines are counted here from byte offsets: the csv crate's own line numbers are off by
    // one after a CRLF.
    let mut lines = LineCounter::default();
    let mut record = csv::ByteRecord::new();
    loop {
        let line = lines.at(bytes, reader.position().byte() as usize);
        match reader.read_byte_record(&mut record) {
            Ok(false) => break,
            Ok(true) => {}
            Err(e) => {
                // A broken quote or similar: the reader cannot resynchronise reliably.
                let line = e.position().map(|p| lines.at(bytes, p.byte() as usize)).unwrap_or(line);
                return Err(Error::data(path, line, format!("malformed record: {e}")));
            }
        }
        let line = record
            .position()
            .map(|p| lines.at(bytes, p.byte() as usize))
            .unwrap_or(line);
        if record.iter().all(|f| f.iter().all(u8::is_ascii_whitespace)) {
            continue; // blank line
        }
        let field = |i: usize, name: &str| -> Result<String> {
            let raw = record.get(i).ok_or_else(|| {
                Error::data(
                    path,
                    line,
                    format!(
                        "missing field `{name}` (the row has {} of {} columns)",
                        record.len(),
                        names.len()
                    ),
                )
            })?;
            std::str::from_utf8(raw)
                .map(str::to_string)
                .map_err(|e| Error::data(path, line, format!("invalid UTF-8 in field `{name}`: {e}")))
        };
        let r = field(ci, &opts.input_field).and_then(|input| Ok((input, field(ct, &opts.target_field)?, line)));
        take(r)?;
    }
    Ok(())
}

/// 1-based line numbers of byte offsets, for offsets that never decrease.
#[derive(Default)]
struct LineCounter {
    offset: usize,
    newlines: usize,
}

impl LineCounter {
    /// The line of the first byte at or after `offset` that is not a line break (the csv
    /// reader reports a record after a CRLF as starting at the LF).
    fn at(&mut self, bytes: &[u8], offset: usize) -> usize {
        let mut offset = offset.min(bytes.len());
        while offset < bytes.len() && matches!(bytes[offset], b'\r' | b'\n') {
            offset += 1;
        }
        if offset >= self.offset {
            self.newlines += bytes[self.offset..offset].iter().filter(|&&b| b == b'\n').count();
            self.offset = offset;
        } else {
            return bytes[..offset].iter().filter(|&&b| b == b'\n').count() + 1;
        }
        self.newlines + 1
    }
}

/// [`super::split`], failing (naming `source`, the file or task the rows came from) when a
/// split with a non-zero fraction comes out empty.
pub fn split_checked<T>(
    rows: Vec<T>,
    seed: u64,
    train_frac: f64,
    dev_frac: f64,
    source: &str,
) -> Result<(Vec<T>, Vec<T>, Vec<T>)> {
    if !(0.0..=1.0).contains(&train_frac) || !(0.0..=1.0).contains(&dev_frac) || train_frac + dev_frac > 1.0 + 1e-9 {
        crate::bail!("{source}: split fractions train {train_frac} + dev {dev_frac} must lie in [0, 1]");
    }
    let n = rows.len();
    let (train, dev, test) = super::split(rows, seed, train_frac, dev_frac);
    let test_frac = 1.0 - train_frac - dev_frac;
    for (name, len, frac) in [
        ("train", train.len(), train_frac),
        ("dev", dev.len(), dev_frac),
        ("test", test.len(), test_frac),
    ] {
        if len == 0 && frac > 1e-9 {
            crate::bail!("{source}: the {name} split is empty ({n} examples, fraction {frac:.3}); use more data or other fractions");
        }
    }
    Ok((train, dev, test))
}

/// Length limits in tokens (`None`: no limit).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Limits {
    pub max_source: Option<usize>,
    pub max_target: Option<usize>,
}

/// How many examples [`truncate`] shortened.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Truncated {
    /// Examples whose source was cut.
    pub sources: usize,
    /// Examples whose target was cut.
    pub targets: usize,
    /// Examples with either cut.
    pub examples: usize,
}

/// Cuts examples to `limits`, in place.
///
/// Sources are cut from the LEFT: the start of the input goes, the end stays, because the end
/// carries what the answer depends on most (the answer cue of a template such as
/// `"\nSentiment:"`, and T5's closing EOS). A leading BOS of `info` is kept as the first token.
/// Targets are cut from the RIGHT (the answer's beginning is kept); a target that ended with
/// `info`'s EOS still ends with it, so the model keeps learning to stop.
pub fn truncate(examples: &mut [Example], limits: Limits, info: &ModelInfo) -> Result<Truncated> {
    truncate_keeping(examples, limits, info.bos_token_id, info.eos_token_ids.first().copied())
}

/// [`truncate`] with the BOS to keep at the start of sources and the EOS to keep at the end
/// of targets given explicitly.
pub fn truncate_keeping(
    examples: &mut [Example],
    limits: Limits,
    bos: Option<u32>,
    eos: Option<u32>,
) -> Result<Truncated> {
    if limits.max_source == Some(0) || limits.max_target == Some(0) {
        crate::bail!("length limits must be at least 1 token");
    }
    let mut counts = Truncated::default();
    for ex in examples.iter_mut() {
        let mut cut = false;
        if let Some(max) = limits.max_source {
            if ex.source.len() > max {
                let keep_bos = bos.is_some() && ex.source.first().copied() == bos && max >= 2;
                let head = usize::from(keep_bos);
                let drop = ex.source.len() - max;
                ex.source.drain(head..head + drop);
                counts.sources += 1;
                cut = true;
            }
        }
        if let Some(max) = limits.max_target {
            if ex.target.len() > max {
                let ends_eos = eos.is_some() && ex.target.last().copied() == eos;
                ex.target.truncate(max);
                if ends_eos {
                    if let (Some(last), Some(e)) = (ex.target.last_mut(), eos) {
                        *last = e;
                    }
                }
                counts.targets += 1;
                cut = true;
            }
        }
        counts.examples += usize::from(cut);
    }
    Ok(counts)
}
