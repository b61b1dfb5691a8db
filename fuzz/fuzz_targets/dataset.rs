//! Task data files (JSONL / CSV / TSV via `task::formats`).
//!
//! Input layout: one control byte, then the file. Control bits 0-1: format (0 JSONL, 1 CSV,
//! 2 TSV, 3 from the extension of a `.jsonl` name); bit 2: skip bad rows; bit 3: read labels
//! (`neg`/`pos`, verbalizer ` negative`/` positive`) instead of text pairs; bit 4: custom
//! field names (`text`/`label`).
#![no_main]

mod common;

use libfuzzer_sys::fuzz_target;
use softprompt::task::formats::{read_labeled, read_pairs, Format, ReadOptions};

fuzz_target!(|data: &[u8]| {
    let Some((&control, file)) = data.split_first() else {
        return;
    };
    let format = match control & 3 {
        0 => Some(Format::Jsonl),
        1 => Some(Format::Csv),
        2 => Some(Format::Tsv),
        _ => None,
    };
    let path = common::file("data.jsonl", file);
    let mut opts = ReadOptions {
        format,
        skip_bad_rows: control & 4 != 0,
        ..ReadOptions::default()
    };
    if control & 16 != 0 {
        opts.input_field = "text".into();
        opts.target_field = "label".into();
    }
    if control & 8 != 0 {
        let labels = vec!["neg".to_string(), "pos".to_string()];
        let verbalizer = vec![" negative".to_string(), " positive".to_string()];
        if let Ok(rows) = read_labeled(&path, &opts, &labels, &verbalizer) {
            assert!(!rows.rows.is_empty());
            assert!(rows.rows.iter().all(|r| r.label < labels.len() && r.line >= 1));
        }
    } else if let Ok(rows) = read_pairs(&path, &opts) {
        assert!(!rows.rows.is_empty());
        assert!(rows.rows.iter().all(|r| r.line >= 1));
    }
    // The older JSONL reader used by `softprompt train`.
    let _ = softprompt::task::read_jsonl(&path);
});
