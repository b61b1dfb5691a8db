//! Dev accuracy during prompt tuning (rank classification of the dev set) and selecting the
//! exported prompt by it.

mod common;

use candle_core::{Device, Tensor};
use common::*;
use softprompt::batch::Example;
use softprompt::load::Model;
use softprompt::prompt::PeftAdapter;
use softprompt::train::metrics;
use softprompt::train::trainer::SelectBy;
use softprompt::train::train;
use std::path::Path;

/// Rank classification by hand: for each example, the class whose target has the lowest NLL
/// given `[prompt; source]` ([`nll_by_hand`]: one example at a time, no padding, log-softmax
/// written out); the fraction of examples whose own target (without its EOS) is that class.
fn accuracy_by_hand(m: &Model, prompt: &Tensor, data: &[Example], classes: &[Vec<u32>]) -> f64 {
    let eos = eos(m);
    let mut right = 0;
    for e in data {
        let nll: Vec<f64> = classes
            .iter()
            .map(|c| {
                let pair = Example { source: e.source.clone(), target: c.clone() };
                // mean_nll * tokens: the summed NLL of the class's target
                nll_by_hand(m, prompt, &[pair]) * c.len() as f64
            })
            .collect();
        let picked = (0..classes.len())
            .min_by(|&a, &b| nll[a].total_cmp(&nll[b]))
            .unwrap();
        let bare = e.target.strip_suffix(&[eos]).unwrap_or(&e.target);
        let gold = classes
            .iter()
            .position(|c| *c == e.target || c.as_slice() == bare)
            .expect("every dev target is a class");
        right += usize::from(picked == gold);
    }
    right as f64 / data.len() as f64
}

fn dev_rows(dir: &Path) -> Vec<metrics::StepMetrics> {
    metrics::read(&dir.join(metrics::FILE))
        .unwrap()
        .into_iter()
        .filter(|r| r.dev_loss.is_some())
        .collect()
}

/// The dev accuracy logged at the exported step is the rank-classification accuracy of the
/// saved adapter's prompt, computed by hand; for one-token classes (the targets carry an EOS
/// the classes do not, as `softprompt eval` scores decoder-only labels) and for classes that
/// include the EOS (scored over two tokens).
#[test]
fn dev_accuracy_is_rank_classification_of_the_saved_prompt() {
    let m = fixture_model("llama-tiny");
    let e = eos(&m);
    let data = toy_data(16, 1, e);
    let dev = toy_data(12, 9, e);
    for classes in [vec![vec![100], vec![200]], vec![vec![100, e], vec![200, e]]] {
        let dir = tempdir();
        let mut cfg = base_config(dir.path());
        cfg.steps = 8;
        cfg.eval_every = 2;
        cfg.classes = Some(classes.clone());
        let report = train(&m, &data, Some(&dev), &cfg).unwrap();
        let rows = dev_rows(dir.path());
        assert_eq!(rows.iter().map(|r| r.step).collect::<Vec<_>>(), [2, 4, 6, 8]);
        let accs: Vec<f64> = rows.iter().map(|r| r.dev_accuracy.expect("dev accuracy logged")).collect();
        eprintln!("classes {classes:?}: dev accuracy {accs:?}, exported step {}", report.exported_step);
        let adapter = PeftAdapter::load(dir.path(), &Device::Cpu).unwrap();
        let by_hand = accuracy_by_hand(&m, &adapter.prompt, &dev, &classes);
        let logged = rows.iter().find(|r| r.step == report.exported_step).unwrap();
        assert_eq!(logged.dev_accuracy, Some(by_hand), "classes {classes:?}");
        assert_eq!(report.best_dev_accuracy, Some(by_hand));
        // Selection stays by dev loss by default.
        let min_loss = rows.iter().map(|r| r.dev_loss.unwrap()).fold(f64::INFINITY, f64::min);
        assert_eq!(logged.dev_loss, Some(min_loss));
    }
}

/// `select_by: Accuracy` exports the evaluation with the highest dev accuracy (ties: the
/// lower dev loss), and the adapter's prompt has that accuracy.
#[test]
fn select_by_accuracy_exports_the_most_accurate_evaluation() {
    let m = fixture_model("llama-tiny");
    let e = eos(&m);
    let data = toy_data(16, 1, e);
    let dev = toy_data(12, 9, e);
    let classes = vec![vec![100], vec![200]];
    let dir = tempdir();
    let mut cfg = base_config(dir.path());
    cfg.steps = 12;
    cfg.eval_every = 1;
    cfg.classes = Some(classes.clone());
    cfg.select_by = SelectBy::Accuracy;
    let report = train(&m, &data, Some(&dev), &cfg).unwrap();
    let rows = dev_rows(dir.path());
    assert_eq!(rows.len(), 12);
    let key = |r: &metrics::StepMetrics| (r.dev_accuracy.unwrap(), -r.dev_loss.unwrap());
    let best = rows
        .iter()
        .fold(None::<&metrics::StepMetrics>, |b, r| match b {
            Some(b) if key(r) <= key(b) => Some(b),
            _ => Some(r),
        })
        .unwrap();
    let accs: Vec<f64> = rows.iter().map(|r| r.dev_accuracy.unwrap()).collect();
    let min_loss_step = rows
        .iter()
        .min_by(|a, b| a.dev_loss.unwrap().total_cmp(&b.dev_loss.unwrap()))
        .unwrap()
        .step;
    eprintln!("dev accuracy by step {accs:?}; most accurate step {}, lowest-loss step {min_loss_step}", best.step);
    assert!(accs.iter().any(|&a| a != accs[0]), "the accuracy never changed: a weak test");
    assert_eq!(report.best_step, Some(best.step));
    assert_eq!(report.exported_step, best.step);
    assert_eq!(report.best_dev_accuracy, best.dev_accuracy);
    assert_eq!(report.best_dev_loss, best.dev_loss);
    let adapter = PeftAdapter::load(dir.path(), &Device::Cpu).unwrap();
    assert_eq!(Some(accuracy_by_hand(&m, &adapter.prompt, &dev, &classes)), best.dev_accuracy);

    // Patience counts evaluations without a better accuracy.
    let dir2 = tempdir();
    let mut cfg2 = cfg.clone();
    cfg2.output = dir2.path().to_path_buf();
    cfg2.patience = Some(2);
    let r2 = train(&m, &data, Some(&dev), &cfg2).unwrap();
    let rows2 = dev_rows(dir2.path());
    let mut best_key = None;
    let mut since = 0;
    let mut stop = None;
    for r in &rows2 {
        if best_key.is_none_or(|b| key(r) > b) {
            best_key = Some(key(r));
            since = 0;
        } else {
            since += 1;
            if since == 2 {
                stop = Some(r.step);
                break;
            }
        }
    }
    assert_eq!(r2.stopped_early, stop.is_some());
    assert_eq!(r2.steps, stop.unwrap_or(12));
}

/// A run selecting by accuracy, interrupted and resumed, ends as the uninterrupted run: same
/// best step, accuracy and exported prompt (the best accuracy comes back from metrics.jsonl,
/// or is measured again when that line is gone).
#[test]
fn select_by_accuracy_resumes_exactly() {
    let m = fixture_model("llama-tiny");
    let e = eos(&m);
    let data = toy_data(16, 1, e);
    let dev = toy_data(12, 9, e);
    let setup = |dir: &Path, steps: usize| {
        let mut cfg = base_config(dir);
        cfg.steps = steps;
        cfg.eval_every = 1;
        cfg.checkpoint_every = 1;
        cfg.classes = Some(vec![vec![100], vec![200]]);
        cfg.select_by = SelectBy::Accuracy;
        cfg
    };
    let straight = tempdir();
    let r1 = train(&m, &data, Some(&dev), &setup(straight.path(), 10)).unwrap();
    for drop_log in [false, true] {
        let split = tempdir();
        train(&m, &data, Some(&dev), &setup(split.path(), 5)).unwrap();
        if drop_log {
            std::fs::remove_file(split.path().join(metrics::FILE)).unwrap();
        }
        let mut resume = setup(split.path(), 10);
        resume.resume = true;
        let r2 = train(&m, &data, Some(&dev), &resume).unwrap();
        assert_eq!(r2.resumed_from, Some(5));
        assert_eq!(r1.best_step, r2.best_step, "metrics.jsonl removed: {drop_log}");
        assert_eq!(r1.best_dev_accuracy, r2.best_dev_accuracy);
        assert_eq!(f32_bits(&r1.prompt), f32_bits(&r2.prompt));
    }
    // Resuming with the other selection is another configuration.
    let mut by_loss = setup(straight.path(), 12);
    by_loss.select_by = SelectBy::Loss;
    by_loss.resume = true;
    let err = train(&m, &data, Some(&dev), &by_loss).unwrap_err();
    assert!(err.to_string().contains("another configuration"), "{err}");
}

#[test]
fn dev_accuracy_needs_matching_classes() {
    let m = fixture_model("llama-tiny");
    let e = eos(&m);
    let data = toy_data(8, 1, e);
    let dev = toy_data(6, 9, e);
    let dir = tempdir();
    let mut cfg = base_config(dir.path());
    cfg.select_by = SelectBy::Accuracy;
    let err = train(&m, &data, Some(&dev), &cfg).unwrap_err();
    assert!(err.to_string().contains("classes"), "{err}");
    cfg.classes = Some(vec![vec![100], vec![200]]);
    let err = train(&m, &data, None, &cfg).unwrap_err();
    assert!(err.to_string().contains("dev set"), "{err}");
    // A dev target that is no class.
    let mut bad = dev.clone();
    bad[3].target = vec![150, e];
    let err = train(&m, &data, Some(&bad), &cfg).unwrap_err();
    assert!(err.to_string().contains("dev example 4"), "{err}");
    cfg.classes = Some(vec![vec![100], vec![]]);
    let err = train(&m, &data, Some(&dev), &cfg).unwrap_err();
    assert!(err.to_string().contains("class 2"), "{err}");
    // Nothing was trained.
    assert!(!dir.path().join(metrics::FILE).exists());
}
