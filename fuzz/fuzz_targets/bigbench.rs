//! BIG-bench `task.json` import: parse, then turn into a text, classification or
//! multiple-choice task with the default 80/10/10 split and with a 50/50 one.
#![no_main]

mod common;

use libfuzzer_sys::fuzz_target;
use softprompt::task::bigbench::{self, Imported, SplitSpec};

fuzz_target!(|data: &[u8]| {
    let dir = common::scratch().join("bb_task");
    std::fs::create_dir_all(&dir).expect("task folder");
    let path = dir.join("task.json");
    std::fs::write(&path, data).expect("write task.json");
    let Ok(task) = bigbench::parse(&path) else {
        return;
    };
    let _ = task.text_pairs();
    let _ = task.shared_choices();
    for spec in [
        SplitSpec::default(),
        SplitSpec { seed: 7, train: 0.5, dev: 0.0 },
    ] {
        match task.import(spec, &path) {
            Ok(Imported::Classification(t)) => {
                let all = t.train.iter().chain(&t.dev).chain(&t.test);
                assert!(all.clone().all(|r| r.label < t.labels.len()));
                let _ = t.pairs(&t.train);
            }
            Ok(Imported::MultipleChoice(t)) => {
                let all = t.train.iter().chain(&t.dev).chain(&t.test);
                assert!(all.clone().all(|e| e.gold < e.choices.len()));
            }
            Ok(Imported::Text(_)) | Err(_) => {}
        }
    }
});
