//! Task data: JSONL/CSV/TSV reading, BIG-bench import, splits, truncation, and the real
//! BIG-bench NLI tasks fetched from the `bigbench==1.0.0` sdist.
//!
//! Expected values are read off the hand-made files in `tests/data/tasks/` and, for the real
//! tasks, counted with Python's `json` module from the sdist's `task.json` files.

use softprompt::batch::Example;
use softprompt::task::bigbench::{self, Imported, SplitSpec};
use softprompt::task::formats::{self, Format, Limits, ReadOptions, Truncated};
use softprompt::task::TextPair;
use softprompt::Error;
use std::path::{Path, PathBuf};

fn data(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/tasks")
        .join(name)
}

fn pair(input: &str, target: &str, line: usize) -> TextPair {
    TextPair {
        input: input.into(),
        target: target.into(),
        line,
    }
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

/// Asserts a data error at `file:line` whose message contains `needle`.
fn assert_data_error(err: Error, file: &str, line: usize, needle: &str) {
    let text = err.to_string();
    match &err {
        Error::Data { path, line: l, msg } => {
            assert!(path.ends_with(file), "{text}");
            assert_eq!(*l, line, "{text}");
            assert!(msg.contains(needle), "`{needle}` not in: {text}");
        }
        other => panic!("expected a data error at {file}:{line}, got {other:?}"),
    }
    assert!(text.contains(&format!("{file}:{line}")), "{text}");
}

#[test]
fn same_pairs_from_jsonl_csv_and_tsv() {
    let expected = |lines: [usize; 3]| {
        vec![
            pair("2 + 2 =", "4", lines[0]),
            pair("The capital of France is", "Paris", lines[1]),
            pair("Say \"hi\", please", "hi", lines[2]),
        ]
    };
    let opts = ReadOptions::default();
    let jsonl = formats::read_pairs(&data("pairs.jsonl"), &opts).unwrap();
    assert_eq!(jsonl.rows, expected([1, 3, 4])); // line 2 is blank
    assert_eq!(jsonl.skipped, 0);
    assert_eq!(
        formats::read_pairs(&data("pairs.csv"), &opts).unwrap().rows,
        expected([2, 3, 4])
    );
    assert_eq!(
        formats::read_pairs(&data("pairs.tsv"), &opts).unwrap().rows,
        expected([2, 3, 4])
    );

    // An explicit format overrides the extension: the TSV file read as CSV has one column.
    let as_csv = ReadOptions {
        format: Some(Format::Csv),
        ..ReadOptions::default()
    };
    let err = formats::read_pairs(&data("pairs.tsv"), &as_csv).unwrap_err();
    assert_data_error(err, "pairs.tsv", 1, "no column `input`");
    assert_eq!("TSV".parse::<Format>().unwrap(), Format::Tsv);
    assert!("xml".parse::<Format>().is_err());
    assert!(Format::from_path(Path::new("x.parquet")).is_err());
}

#[test]
fn labeled_csv_with_custom_columns_bom_crlf_and_quoted_newline() {
    let opts = ReadOptions {
        input_field: "sentence".into(),
        target_field: "label".into(),
        ..ReadOptions::default()
    };
    let labels = strings(&["negative", "positive"]);
    let verbalizer = strings(&[" negative", " positive"]);
    let got = formats::read_labeled(&data("review.csv"), &opts, &labels, &verbalizer).unwrap();
    let texts: Vec<(&str, usize, usize)> = got.rows.iter().map(|r| (r.text.as_str(), r.label, r.line)).collect();
    // The third row's label is ` positive`: the verbalizer text, not the label name.
    assert_eq!(
        texts,
        vec![
            ("A fine,\r\nfunny film", 1, 2),
            ("Dull and slow", 0, 4),
            ("Loved it", 1, 5)
        ]
    );
}

#[test]
fn missing_field_names_file_and_line() {
    let opts = ReadOptions::default();
    let err = formats::read_pairs(&data("missing_field.csv"), &opts).unwrap_err();
    assert_data_error(err, "missing_field.csv", 3, "missing field `target`");
    let err = formats::read_pairs(&data("missing_field.jsonl"), &opts).unwrap_err();
    assert_data_error(err, "missing_field.jsonl", 2, "missing field `target`");
    // A renamed field that no row has.
    let renamed = ReadOptions {
        target_field: "answer".into(),
        ..ReadOptions::default()
    };
    let err = formats::read_pairs(&data("pairs.jsonl"), &renamed).unwrap_err();
    assert_data_error(err, "pairs.jsonl", 1, "missing field `answer`");
}

#[test]
fn invalid_utf8_names_file_and_line() {
    let err = formats::read_pairs(&data("bad_utf8.tsv"), &ReadOptions::default()).unwrap_err();
    assert_data_error(err, "bad_utf8.tsv", 3, "invalid UTF-8");
    let err = formats::read_pairs(&data("some_bad.jsonl"), &ReadOptions::default()).unwrap_err();
    assert_data_error(err, "some_bad.jsonl", 2, "invalid JSON");
}

#[test]
fn unknown_label_names_file_and_line() {
    let labels = strings(&["negative", "positive"]);
    let verbalizer = strings(&[" negative", " positive"]);
    let err = formats::read_labeled(
        &data("unknown_label.jsonl"),
        &ReadOptions::default(),
        &labels,
        &verbalizer,
    )
    .unwrap_err();
    assert_data_error(err, "unknown_label.jsonl", 3, "unknown label `neutral`");
    let skip = ReadOptions {
        skip_bad_rows: true,
        ..ReadOptions::default()
    };
    let got = formats::read_labeled(&data("unknown_label.jsonl"), &skip, &labels, &verbalizer).unwrap();
    assert_eq!(got.skipped, 1);
    assert_eq!(got.rows.iter().map(|r| r.label).collect::<Vec<_>>(), vec![1, 0]);
}

#[test]
fn skip_bad_rows_counts_them() {
    let skip = ReadOptions {
        skip_bad_rows: true,
        ..ReadOptions::default()
    };
    // Lines 2 (invalid JSON), 4 (no target), 5 (invalid UTF-8), 6 (target not a string) are bad.
    let got = formats::read_pairs(&data("some_bad.jsonl"), &skip).unwrap();
    assert_eq!(got.skipped, 4);
    assert_eq!(got.rows, vec![pair("a", "x", 1), pair("c", "y", 3), pair("f", "w", 7)]);
    let got = formats::read_pairs(&data("missing_field.csv"), &skip).unwrap();
    assert_eq!(got.skipped, 1);
    assert_eq!(got.rows, vec![pair("ok one", "yes", 2), pair("ok two", "no", 4)]);
    let got = formats::read_pairs(&data("bad_utf8.tsv"), &skip).unwrap();
    assert_eq!((got.rows.len(), got.skipped), (2, 1));
    // Skipping never makes an unusable file pass.
    let err = formats::read_pairs(&data("all_bad.jsonl"), &skip).unwrap_err();
    assert!(
        err.to_string().contains("all_bad.jsonl") && err.to_string().contains("2 bad ones skipped"),
        "{err}"
    );
}

#[test]
fn empty_files_and_splits_are_errors() {
    for file in ["empty.jsonl", "header_only.csv"] {
        let err = formats::read_pairs(&data(file), &ReadOptions::default()).unwrap_err();
        assert!(matches!(err, Error::Format { .. }), "{err:?}");
        assert!(
            err.to_string().contains(file) && err.to_string().contains("no records"),
            "{err}"
        );
    }
    // 5 examples, 80 % / 15 %: 4 train, 1 dev, none left for the 5 % test split.
    let spec = SplitSpec {
        seed: 1,
        train: 0.8,
        dev: 0.15,
    };
    let err = bigbench::from_file(&data("bb_text.json"), spec).unwrap_err();
    assert!(
        err.to_string().contains("bb_text.json") && err.to_string().contains("test split is empty"),
        "{err}"
    );
    // A split with fraction 0 may be empty.
    let (train, dev, test) = formats::split_checked((0..5).collect(), 1, 0.8, 0.2, "five").unwrap();
    assert_eq!((train.len(), dev.len(), test.len()), (4, 1, 0));
    assert!(formats::split_checked((0..5).collect::<Vec<i32>>(), 1, 0.9, 0.3, "five").is_err());
}

#[test]
fn splits_are_seeded_and_sized() {
    let rows: Vec<u32> = (0..100).collect();
    let a = formats::split_checked(rows.clone(), 7, 0.8, 0.1, "hundred").unwrap();
    let b = formats::split_checked(rows.clone(), 7, 0.8, 0.1, "hundred").unwrap();
    let c = formats::split_checked(rows.clone(), 8, 0.8, 0.1, "hundred").unwrap();
    assert_eq!((a.0.len(), a.1.len(), a.2.len()), (80, 10, 10));
    assert_eq!(a, b);
    assert_ne!(a, c);
    let mut all: Vec<u32> = a.0.iter().chain(&a.1).chain(&a.2).copied().collect();
    assert_ne!(all, rows, "the rows are shuffled");
    all.sort_unstable();
    assert_eq!(all, rows, "every row lands in exactly one split");
}

#[test]
fn truncation_cuts_and_counts() {
    const BOS: u32 = 1;
    const EOS: u32 = 2;
    let mut examples = vec![
        // Short enough: untouched.
        Example {
            source: vec![BOS, 10, 11],
            target: vec![20, EOS],
        },
        // Source too long: cut from the left, BOS kept.
        Example {
            source: vec![BOS, 10, 11, 12, 13, 14],
            target: vec![20],
        },
        // Target too long: cut from the right, EOS kept at the end.
        Example {
            source: vec![10],
            target: vec![20, 21, 22, 23, EOS],
        },
        // Both too long, no BOS / EOS to keep.
        Example {
            source: vec![10, 11, 12, 13, 14, 15],
            target: vec![20, 21, 22, 23],
        },
    ];
    let limits = Limits {
        max_source: Some(4),
        max_target: Some(3),
    };
    let counts = formats::truncate_keeping(&mut examples, limits, Some(BOS), Some(EOS)).unwrap();
    assert_eq!(
        counts,
        Truncated {
            sources: 2,
            targets: 2,
            examples: 3
        }
    );
    assert_eq!(examples[0].source, vec![BOS, 10, 11]);
    assert_eq!(examples[0].target, vec![20, EOS]);
    assert_eq!(examples[1].source, vec![BOS, 12, 13, 14]);
    assert_eq!(examples[2].target, vec![20, 21, EOS]);
    assert_eq!(examples[3].source, vec![12, 13, 14, 15]);
    assert_eq!(examples[3].target, vec![20, 21, 22]);
    // No limits: nothing changes.
    let before = examples.clone();
    assert_eq!(
        formats::truncate_keeping(&mut examples, Limits::default(), Some(BOS), Some(EOS)).unwrap(),
        Truncated::default()
    );
    assert_eq!(examples, before);
}

#[test]
fn bigbench_fixed_choices_become_a_classification_task() {
    let path = data("bb_fixed.json");
    let task = bigbench::parse(&path).unwrap();
    assert_eq!(task.name, "tiny_nli");
    assert_eq!(task.examples.len(), 5);
    assert_eq!(task.duplicates, 1); // example 4 repeats example 2
    assert!(task.is_multiple_choice());
    let spec = SplitSpec {
        seed: 3,
        train: 0.6,
        dev: 0.2,
    };
    let Imported::Classification(cls) = bigbench::from_file(&path, spec).unwrap() else {
        panic!("a fixed choice set is a classification task")
    };
    assert_eq!(cls.labels, strings(&["entailment", "no-entailment"]));
    assert_eq!(cls.verbalizer, strings(&[" entailment", " no-entailment"]));
    assert_eq!(
        cls.template,
        "Decide whether the first sentence entails the second.\n\nSentences: {text}\nRelation:"
    );
    assert_eq!(
        cls.format("It rains. So it is wet.") + &cls.verbalizer[0],
        "Decide whether the first sentence entails the second.\n\nSentences: It rains. So it is wet.\nRelation: entailment"
    );
    assert_eq!((cls.train.len(), cls.dev.len(), cls.test.len()), (3, 1, 1));
    let mut rows: Vec<(usize, String, usize)> = cls
        .train
        .iter()
        .chain(&cls.dev)
        .chain(&cls.test)
        .map(|r| (r.line, r.text.clone(), r.label))
        .collect();
    rows.sort();
    let expected = vec![
        (1, "A dog runs. So an animal runs.", 0),
        (2, "A cat sleeps. So a cat runs.", 1),
        (3, "It rains. So it is wet.", 0),
        (5, "Tom is tall. So Tom is a giant.", 1),
        (6, "All men are mortal. So some men are mortal.", 0),
    ];
    let expected: Vec<(usize, String, usize)> = expected.into_iter().map(|(l, t, g)| (l, t.to_string(), g)).collect();
    assert_eq!(rows, expected);
    // The same seed gives the same split.
    let Imported::Classification(again) = bigbench::from_file(&path, spec).unwrap() else {
        unreachable!()
    };
    assert_eq!((again.train, again.dev, again.test), (cls.train, cls.dev, cls.test));
}

#[test]
fn bigbench_varied_choices_stay_per_example() {
    let spec = SplitSpec {
        seed: 0,
        train: 1.0,
        dev: 0.0,
    };
    let Imported::MultipleChoice(mc) = bigbench::from_file(&data("bb_varied.json"), spec).unwrap() else {
        panic!("different choice sets are kept per example")
    };
    assert_eq!(mc.name, "tiny_mc");
    assert!(mc.dev.is_empty() && mc.test.is_empty());
    let mut rows = mc.train.clone();
    rows.sort_by_key(|r| r.line);
    // BIG-bench defaults: "\nQ: " input prefix, choices appended with "\n  choice: ", "\nA: ".
    assert_eq!(
        rows[0].input,
        "\nQ: Which is a fruit?\n  choice: apple\n  choice: carrot\n  choice: potato\nA:"
    );
    assert_eq!(rows[0].choices, strings(&[" carrot", " apple", " potato"]));
    assert_eq!(rows[0].gold, 1);
    assert_eq!(rows[1].choices, strings(&[" sky", " blood"]));
    assert_eq!(rows[1].gold, 1);
    assert_eq!(
        rows[2].input,
        "\nQ: Which is a prime?\n  choice: 4\n  choice: 6\n  choice: 7\n  choice: 9\nA:"
    );
    assert_eq!(rows[2].gold, 2);
}

#[test]
fn bigbench_text_to_text_becomes_pairs() {
    let task = bigbench::parse(&data("bb_text.json")).unwrap();
    assert!(!task.is_multiple_choice());
    // The output prefix ends with a newline: the answer follows without a space.
    assert_eq!(
        task.text_pairs(),
        vec![
            pair("Q: 1 + 1\n", "2", 1),
            pair("Q: 2 + 3\n", "5", 2),
            pair("Q: 4 - 4\n", "0", 3),
            pair("Q: 3 * 3\n", "9", 4),
            pair("Q: 8 / 2\n", "4", 5),
        ]
    );
    assert_eq!(task.examples[1].targets, strings(&["5", "five"]));
    let spec = SplitSpec {
        seed: 5,
        train: 0.6,
        dev: 0.2,
    };
    let Imported::Text(text) = bigbench::from_file(&data("bb_text.json"), spec).unwrap() else {
        panic!("targets without scores make a text task")
    };
    assert_eq!((text.train.len(), text.dev.len(), text.test.len()), (3, 1, 1));
}

#[test]
fn bigbench_bad_files_are_errors() {
    let err = bigbench::parse(&data("bb_bad.json")).unwrap_err();
    assert!(
        err.to_string().contains("bb_bad.json") && err.to_string().contains("example 2"),
        "{err}"
    );
    let err = bigbench::parse(&data("bb_malformed.json")).unwrap_err();
    assert_data_error(err, "bb_malformed.json", 5, "not a BIG-bench task.json");
}

/// The real tasks, from the `bigbench==1.0.0` sdist (downloaded once with pip into
/// `$SOFTPROMPT_HOME/data/bigbench/`, then cached). Counts read with Python's `json`.
#[test]
fn real_bigbench_nli_tasks() {
    struct Expected {
        name: &'static str,
        examples: usize,
        duplicates: usize,
        labels: [&'static str; 2],
        per_label: [usize; 2],
        template: &'static str,
    }
    let tasks = [
        Expected {
            name: "analytic_entailment",
            examples: 70,
            duplicates: 0,
            labels: ["entailment", "no-entailment"],
            per_label: [30, 40],
            template: "Determine whether the following pairs of sentences embody an entailment relation or not.\n\nSentences: {text}\nRelation:",
        },
        Expected {
            name: "epistemic_reasoning",
            examples: 2000,
            duplicates: 0,
            labels: ["entailment", "non-entailment"],
            per_label: [741, 1259],
            template: "Identify the relation between the following premises and hypotheses, choosing from the options 'entailment' or 'non-entailment'.\n\n{text}\nRelation:",
        },
        Expected {
            name: "entailed_polarity",
            examples: 148, // 149 in the file, one exact duplicate
            duplicates: 1,
            labels: ["no", "yes"],
            per_label: [50, 98],
            template: "Given a fact, answer the following question with a yes or a no.\n{text}\nA:",
        },
    ];
    for want in tasks {
        let path = softprompt::fetch::bigbench_task(want.name).unwrap();
        assert!(
            path.ends_with(format!("data/bigbench/{}/task.json", want.name)),
            "{}",
            path.display()
        );
        let task = bigbench::parse(&path).unwrap();
        assert_eq!(
            (task.examples.len(), task.duplicates),
            (want.examples, want.duplicates),
            "{}",
            want.name
        );
        let Imported::Classification(cls) = task.import(SplitSpec::default(), &path).unwrap() else {
            panic!("{} has one choice set", want.name)
        };
        assert_eq!(cls.labels, strings(&want.labels), "{}", want.name);
        assert_eq!(cls.template, want.template, "{}", want.name);
        let n = want.examples as f64;
        let (n_train, n_dev) = ((n * 0.8).round() as usize, (n * 0.1).round() as usize);
        assert_eq!(
            (cls.train.len(), cls.dev.len(), cls.test.len()),
            (n_train, n_dev, want.examples - n_train - n_dev),
            "{}",
            want.name
        );
        let mut per_label = [0; 2];
        for r in cls.train.iter().chain(&cls.dev).chain(&cls.test) {
            per_label[r.label] += 1;
        }
        assert_eq!(per_label, want.per_label, "{}", want.name);
    }
    // A subtask missing from the fetch module's checksum table: extracted from the verified
    // sdist and trusted through its stamp afterwards.
    let path = softprompt::fetch::bigbench_task("fact_checker/fever").unwrap();
    assert!(path.ends_with("data/bigbench/fact_checker/fever/task.json"));
    let fever = bigbench::parse(&path).unwrap();
    // 6612 examples in the file; 85 repeat another's input, target and scores (they differ
    // only in their `id`) and are dropped.
    assert_eq!(
        (fever.name.as_str(), fever.examples.len(), fever.duplicates),
        ("fever", 6527, 85)
    );
    assert_eq!(softprompt::fetch::bigbench_task("fact_checker/fever").unwrap(), path);
    // Unknown names are rejected before any download.
    assert!(softprompt::fetch::bigbench_task("../etc").is_err());
}
