//! The fuzz targets' inputs as ordinary tests (see docs/reliability.md):
//!
//! * every seed in `fuzz/seeds/<target>/` is a VALID input and must load (so the fuzzers
//!   start from files the loaders accept, and a format change that breaks them is noticed);
//! * every input in `fuzz/regressions/<target>/` once made a loader panic (or is a hand-made
//!   corruption of a seed) and must now give an error, never a panic.
//!
//! The inputs are decoded exactly as the fuzz targets in `fuzz/fuzz_targets/` decode them.

use candle_core::Device;
use softprompt::load::gguf;
use softprompt::prompt::peft::{PeftAdapter, CONFIG_FILE, WEIGHTS_FILE};
use softprompt::task::bigbench::{self, SplitSpec};
use softprompt::task::formats::{read_labeled, read_pairs, Format, ReadOptions};
use softprompt::train::checkpoint::Checkpoint;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz")
}

/// The files of `fuzz/<kind>/<target>/` (none when the folder does not exist).
fn inputs(kind: &str, target: &str) -> Vec<PathBuf> {
    let dir = fuzz_dir().join(kind).join(target);
    let mut files: Vec<PathBuf> = match std::fs::read_dir(&dir) {
        Ok(entries) => entries
            .map(|e| e.unwrap().path())
            .filter(|p| p.is_file())
            .collect(),
        Err(_) => Vec::new(),
    };
    files.sort();
    files
}

/// Runs the target `target`'s loader on `data`; `Ok` when it loaded, `Err(message)` when it
/// returned an error. A panic propagates.
fn load(target: &str, data: &[u8], scratch: &Path) -> Result<(), String> {
    let cpu = Device::Cpu;
    match target {
        "gguf" => {
            let path = scratch.join("model.gguf");
            std::fs::write(&path, data).unwrap();
            gguf::load(&path, &cpu).map(drop).map_err(|e| e.to_string())
        }
        "peft_adapter" => {
            let (len, rest) = data.split_first_chunk::<2>().ok_or("too short")?;
            let len = (u16::from_le_bytes(*len) as usize).min(rest.len());
            let (config, weights) = rest.split_at(len);
            let dir = scratch.join("adapter");
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join(CONFIG_FILE), config).unwrap();
            std::fs::write(dir.join(WEIGHTS_FILE), weights).unwrap();
            let adapter = PeftAdapter::load(&dir, &cpu).map_err(|e| e.to_string())?;
            adapter.save(&scratch.join("adapter-out")).unwrap();
            PeftAdapter::load(&scratch.join("adapter-out"), &cpu).unwrap();
            Ok(())
        }
        "dataset" => {
            let (&control, file) = data.split_first().ok_or("empty")?;
            let format = match control & 3 {
                0 => Some(Format::Jsonl),
                1 => Some(Format::Csv),
                2 => Some(Format::Tsv),
                _ => None,
            };
            let path = scratch.join("data.jsonl");
            std::fs::write(&path, file).unwrap();
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
                read_labeled(&path, &opts, &labels, &verbalizer)
                    .map(drop)
                    .map_err(|e| e.to_string())
            } else {
                read_pairs(&path, &opts).map(drop).map_err(|e| e.to_string())
            }
        }
        "bigbench" => {
            let dir = scratch.join("bb_task");
            std::fs::create_dir_all(&dir).unwrap();
            let path = dir.join("task.json");
            std::fs::write(&path, data).unwrap();
            let task = bigbench::parse(&path).map_err(|e| e.to_string())?;
            task.import(SplitSpec::default(), &path)
                .map(drop)
                .map_err(|e| e.to_string())
        }
        "checkpoint" => Checkpoint::from_bytes(data, Path::new("checkpoint.safetensors"), &cpu)
            .map(drop)
            .map_err(|e| e.to_string()),
        other => panic!("unknown fuzz target {other}"),
    }
}

const TARGETS: [&str; 5] = ["gguf", "peft_adapter", "dataset", "bigbench", "checkpoint"];

#[test]
fn every_seed_loads() {
    let scratch = tempfile::tempdir().unwrap();
    for target in TARGETS {
        let seeds = inputs("seeds", target);
        assert!(!seeds.is_empty(), "no seeds for fuzz target {target}");
        for seed in seeds {
            let data = std::fs::read(&seed).unwrap();
            if let Err(e) = load(target, &data, scratch.path()) {
                panic!("seed {} does not load: {e}", seed.display());
            }
        }
    }
}

#[test]
fn regression_inputs_give_errors_not_panics() {
    let scratch = tempfile::tempdir().unwrap();
    let mut failures = Vec::new();
    for target in TARGETS {
        for input in inputs("regressions", target) {
            let data = std::fs::read(&input).unwrap();
            match catch_unwind(AssertUnwindSafe(|| load(target, &data, scratch.path()))) {
                Ok(Err(_)) => {}
                Ok(Ok(())) => failures.push(format!("{}: loaded, expected an error", input.display())),
                Err(_) => failures.push(format!("{}: panicked", input.display())),
            }
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

/// Every prefix of each seed (a truncated download or a torn write) is an error or, for
/// text formats, a shorter valid file: never a panic.
#[test]
fn truncated_seeds_never_panic() {
    let scratch = tempfile::tempdir().unwrap();
    for target in TARGETS {
        for seed in inputs("seeds", target) {
            let data = std::fs::read(&seed).unwrap();
            let step = (data.len() / 64).max(1);
            for cut in (0..data.len()).step_by(step) {
                let result = catch_unwind(AssertUnwindSafe(|| {
                    load(target, &data[..cut], scratch.path())
                }));
                assert!(
                    result.is_ok(),
                    "{} cut to {cut} bytes panicked",
                    seed.display()
                );
                if matches!(target, "gguf" | "checkpoint") {
                    assert!(
                        result.unwrap().is_err(),
                        "{} cut to {cut} bytes loaded",
                        seed.display()
                    );
                }
            }
        }
    }
}
