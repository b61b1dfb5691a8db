//! Evaluation on the tiny fixture models: beam search against greedy decoding and against
//! independent scoring with the training objective, prompt ensembling against each prompt
//! alone, the nearest-token inspection, rank classification against generation, and the
//! prompt-design (k-shot) inputs.

mod common;

use candle_core::{DType, Device, Tensor};
use common::{fixture_dir, tempdir};
use softprompt::batch::{collate, per_example_sums, Example};
use softprompt::eval::beam::{beam_search, BeamOptions};
use softprompt::eval::classify::{argmax, label_log_likelihoods};
use softprompt::eval::ensemble::{ensemble_label_log_likelihoods, majority_vote, mean_log_prob};
use softprompt::eval::generate::{greedy, GenerateOptions};
use softprompt::eval::inspect::{embedding_table, nearest_tokens};
use softprompt::eval::prompt_design::{draw, k_shot_pairs, k_shot_task, SEPARATOR};
use softprompt::eval::report::{classify, label_of_text, label_of_tokens, Decoding, Mode};
use softprompt::load::{load_model, Model};
use softprompt::objective::target_nll;
use softprompt::prompt::PeftAdapter;
use softprompt::task::{ClassificationTask, LabeledText, TextPair};
use softprompt::tokenizer::Tokenizer;
use std::path::Path;

const MODELS: [&str; 4] = ["llama-tiny", "gpt2-tiny", "t5-tiny", "flan-t5-tiny"];

fn model(name: &str) -> Model {
    load_model(&fixture_dir(name), &Device::Cpu).unwrap_or_else(|e| panic!("load {name}: {e}"))
}

/// The fixture adapter's prompt `[5, 32]`.
fn prompt(name: &str) -> Tensor {
    PeftAdapter::load(&fixture_dir(name).join("adapter"), &Device::Cpu)
        .unwrap()
        .prompt
}

/// Sources of different lengths; seq2seq inputs end with EOS as the task code makes them.
fn sources(m: &Model) -> Vec<Vec<u32>> {
    let info = m.backbone.info();
    let mut rows = vec![
        vec![17, 42, 99, 5],
        vec![200, 3],
        vec![64, 65, 66, 67, 68, 69],
        vec![11],
    ];
    for r in &mut rows {
        info.end_source(r);
    }
    rows
}

/// Log-probability of `target` given `source` and the prompt, by the training objective
/// (one example, no cache).
fn sequence_log_prob(m: &Model, p: Option<&Tensor>, source: &[u32], target: &[u32]) -> f64 {
    let n = p.map(|p| p.dim(0).unwrap()).unwrap_or(0);
    let ex = Example {
        source: source.to_vec(),
        target: target.to_vec(),
    };
    let batch = collate(&[ex], m.backbone.info(), n, &Device::Cpu).unwrap();
    let nll = target_nll(&m.backbone, p, &batch).unwrap();
    -(per_example_sums(&nll, &batch).unwrap()[0] as f64)
}

#[test]
fn one_beam_is_greedy() {
    for name in MODELS {
        let m = model(name);
        let p = prompt(name);
        for with_prompt in [true, false] {
            let pr = with_prompt.then_some(&p);
            let srcs = sources(&m);
            let opts = BeamOptions {
                beams: 1,
                max_new_tokens: 8,
                length_penalty: None,
                stop_at_eos: true,
            };
            let beams = beam_search(&m.backbone, pr, &srcs, &opts, &Device::Cpu).unwrap();
            for (i, src) in srcs.iter().enumerate() {
                let gen_opts = GenerateOptions {
                    max_new_tokens: 8,
                    stop_at_eos: true,
                };
                let g = greedy(
                    &m.backbone,
                    pr,
                    std::slice::from_ref(src),
                    &gen_opts,
                    &Device::Cpu,
                )
                .unwrap();
                assert_eq!(beams[i].len(), 1);
                assert_eq!(
                    beams[i][0].tokens, g.tokens[0],
                    "{name} prompt {with_prompt} source {i}"
                );
            }
        }
    }
}

#[test]
fn three_beams_score_at_least_greedy_by_independent_scoring() {
    let mut strictly_better = 0;
    for name in MODELS {
        let m = model(name);
        let p = prompt(name);
        let srcs = sources(&m);
        for penalty in [None, Some(1.0)] {
            let opts = BeamOptions {
                beams: 3,
                max_new_tokens: 6,
                length_penalty: penalty,
                stop_at_eos: true,
            };
            let beams = beam_search(&m.backbone, Some(&p), &srcs, &opts, &Device::Cpu).unwrap();
            for (i, src) in srcs.iter().enumerate() {
                let g = greedy(
                    &m.backbone,
                    Some(&p),
                    std::slice::from_ref(src),
                    &GenerateOptions {
                        max_new_tokens: 6,
                        stop_at_eos: true,
                    },
                    &Device::Cpu,
                )
                .unwrap();
                let greedy_lp = sequence_log_prob(&m, Some(&p), src, &g.tokens[0]);
                assert!(beams[i].len() <= 3 && !beams[i].is_empty());
                // Every hypothesis's bookkeeping (through the re-indexed KV cache) agrees with
                // scoring it from scratch.
                for h in &beams[i] {
                    let lp = sequence_log_prob(&m, Some(&p), src, &h.tokens);
                    assert!(
                        (lp - h.log_prob).abs() < 1e-3,
                        "{name} source {i}: beam says {} but scoring gives {lp}",
                        h.log_prob
                    );
                    if let Some(alpha) = penalty {
                        let expected = h.log_prob / (h.tokens.len() as f64).powf(alpha);
                        assert!((h.score - expected).abs() < 1e-9);
                    }
                }
                for w in beams[i].windows(2) {
                    assert!(w[0].score >= w[1].score, "hypotheses not sorted best first");
                }
                if penalty.is_none() {
                    let best = sequence_log_prob(&m, Some(&p), src, &beams[i][0].tokens);
                    assert!(
                        best >= greedy_lp - 1e-4,
                        "{name} source {i}: beam {best} < greedy {greedy_lp}"
                    );
                    if best > greedy_lp + 1e-3 {
                        strictly_better += 1;
                    }
                }
            }
        }
    }
    // The search is not just greedy in disguise.
    assert!(
        strictly_better > 0,
        "beam search never beat greedy on the fixtures"
    );
}

#[test]
fn ensemble_scores_equal_each_prompt_alone() {
    for name in MODELS {
        let m = model(name);
        let info = m.backbone.info().clone();
        let p0 = prompt(name);
        let p1 = (&p0 * 0.5).unwrap();
        let p2 = embedding_table(&m.backbone, &Device::Cpu)
            .unwrap()
            .narrow(0, 30, 5)
            .unwrap();
        let prompts = Tensor::stack(&[&p0, &p1, &p2], 0).unwrap(); // [3, 5, 32]
        let srcs = sources(&m);
        let eos = info.eos_token_ids[0];
        let with_eos = |mut v: Vec<u32>| {
            if info.is_encoder_decoder() {
                v.push(eos);
            }
            v
        };
        let label_sets = [
            vec![vec![7], vec![8], vec![120]],
            vec![
                with_eos(vec![7, 9]),
                with_eos(vec![8]),
                with_eos(vec![120, 121, 122]),
            ],
        ];
        for labels in &label_sets {
            // Everything in one batch, as the same rows alone.
            let ens = ensemble_label_log_likelihoods(
                &m.backbone,
                &prompts,
                &srcs,
                labels,
                1000,
                &Device::Cpu,
            )
            .unwrap();
            assert_eq!(ens.len(), srcs.len());
            for (e, p) in [&p0, &p1, &p2].into_iter().enumerate() {
                let alone =
                    label_log_likelihoods(&m.backbone, Some(p), &srcs, labels, 1000, &Device::Cpu)
                        .unwrap();
                for (k, row) in alone.iter().enumerate() {
                    assert_eq!(ens[k].len(), 3);
                    for (a, b) in row.iter().zip(&ens[k][e]) {
                        assert!(
                            (a - b).abs() < 1e-4,
                            "{name} prompt {e} input {k}: {a} vs {b}"
                        );
                    }
                }
            }
            // Small batches (whole groups of one input's rows) give the same numbers for T5
            // (right padding moves no position); decoder-only rows depend on their left
            // padding, which depends on the batch.
            if info.is_encoder_decoder() {
                let small = ensemble_label_log_likelihoods(
                    &m.backbone,
                    &prompts,
                    &srcs,
                    labels,
                    2,
                    &Device::Cpu,
                )
                .unwrap();
                for (a, b) in small
                    .iter()
                    .flatten()
                    .flatten()
                    .zip(ens.iter().flatten().flatten())
                {
                    assert!((a - b).abs() < 1e-4, "{name}: batch size changed a score");
                }
            }
        }
    }
}

#[test]
fn combination_rules_by_hand() {
    // 3 prompts x 3 labels.
    let s = vec![
        vec![-1.0, -2.0, -3.0],
        vec![-2.5, -0.5, -4.0],
        vec![-0.9, -3.0, -3.0],
    ];
    // votes: label 0 twice, label 1 once -> 0. means: [-1.4667, -1.8333, -3.3333] -> 0.
    assert_eq!(majority_vote(&s), 0);
    assert_eq!(mean_log_prob(&s), 0);
    // Votes and mean disagree: votes 0, 0, 1; label 1 is far better on average.
    let s = vec![vec![-1.0, -1.1], vec![-1.0, -1.2], vec![-9.0, -0.1]];
    assert_eq!(majority_vote(&s), 0);
    assert_eq!(mean_log_prob(&s), 1); // means -3.667 vs -0.8
                                      // A tie in votes (1 : 1) goes to the better mean.
    let s = vec![vec![-1.0, -2.0], vec![-5.0, -0.5]];
    assert_eq!(majority_vote(&s), 1); // means -3.0 vs -1.25
                                      // Full tie: the first label.
    let s = vec![vec![-1.0, -2.0], vec![-2.0, -1.0]];
    assert_eq!(majority_vote(&s), 0);
}

#[test]
fn prompt_of_token_embeddings_inspects_as_those_tokens() {
    for (name, tensor) in [
        ("llama-tiny", "model.embed_tokens.weight"),
        ("gpt2-tiny", "transformer.wte.weight"),
        ("t5-tiny", "shared.weight"),
    ] {
        let m = model(name);
        let weights = candle_core::safetensors::load(
            fixture_dir(name).join("model.safetensors"),
            &Device::Cpu,
        )
        .unwrap();
        let table = weights[tensor].to_dtype(DType::F32).unwrap(); // [256, 32]
        let ids = [7u32, 42, 200, 3];
        let rows: Vec<Tensor> = ids
            .iter()
            .map(|&i| table.get(i as usize).unwrap())
            .collect();
        let p = Tensor::stack(&rows, 0).unwrap(); // [4, 32]
                                                  // Scaled rows have the same direction.
        let p = p
            .broadcast_mul(&Tensor::new(&[[1f32], [2.0], [0.3], [5.0]], &Device::Cpu).unwrap())
            .unwrap();
        let model_table = embedding_table(&m.backbone, &Device::Cpu).unwrap();
        common::assert_close("embedding table", &model_table, &table, 0.0);
        let near = nearest_tokens(&p, &model_table, 3, None).unwrap();
        assert_eq!(near.len(), 4);
        for (pos, &id) in ids.iter().enumerate() {
            assert_eq!(near[pos].len(), 3);
            assert_eq!(near[pos][0].id, id, "{name} position {pos}");
            assert!(
                (near[pos][0].similarity - 1.0).abs() < 1e-5,
                "{}",
                near[pos][0].similarity
            );
            assert!(near[pos][1].similarity < 0.99);
            assert!(near[pos][1].similarity >= near[pos][2].similarity);
        }
    }
}

/// Single-token labels: the greedy first token restricted to the label set is the rank
/// classification winner, and when the unrestricted greedy token is a label, generation mode
/// reads that label back. (For seq2seq the label targets are scored without EOS, so both
/// decide on the first decoder step alone.)
#[test]
fn rank_classification_agrees_with_generation_on_single_token_labels() {
    for name in MODELS {
        let m = model(name);
        let p = prompt(name);
        let srcs = sources(&m);
        let info = m.backbone.info().clone();
        let opts = GenerateOptions {
            max_new_tokens: 3,
            stop_at_eos: true,
        };
        let g = greedy(&m.backbone, Some(&p), &srcs, &opts, &Device::Cpu).unwrap();
        let first: Vec<u32> = g.tokens.iter().map(|t| t[0]).collect();
        // A label set holding every input's greedy token, and one holding none of them.
        let mut with: Vec<u32> = first.clone();
        with.extend([9, 77, 150]);
        with.sort_unstable();
        with.dedup();
        let without: Vec<u32> = (20u32..40).filter(|t| !first.contains(t)).take(4).collect();
        for label_ids in [&with, &without] {
            let labels: Vec<Vec<u32>> = label_ids.iter().map(|&t| vec![t]).collect();
            let rank =
                label_log_likelihoods(&m.backbone, Some(&p), &srcs, &labels, 64, &Device::Cpu)
                    .unwrap();
            let step0 = g.step_logits[0].to_vec2::<f32>().unwrap(); // [B, V]
            for (i, scores) in rank.iter().enumerate() {
                let restricted: Vec<f32> =
                    label_ids.iter().map(|&t| step0[i][t as usize]).collect();
                assert_eq!(argmax(&restricted), argmax(scores), "{name} input {i}");
                if label_ids.contains(&first[i]) {
                    let from_generation =
                        label_of_tokens(&g.tokens[i], &labels, &info.eos_token_ids);
                    assert_eq!(from_generation, Some(argmax(scores)), "{name} input {i}");
                }
            }
        }
    }
}

#[test]
fn labels_read_back_from_generations() {
    let labels = vec![vec![5, 6], vec![5], vec![9, 1]];
    assert_eq!(label_of_tokens(&[5, 6, 7], &labels, &[1]), Some(0)); // longest prefix
    assert_eq!(label_of_tokens(&[5, 7], &labels, &[1]), Some(1));
    assert_eq!(label_of_tokens(&[9], &labels, &[1]), Some(2)); // trailing EOS ignored
    assert_eq!(label_of_tokens(&[7], &labels, &[1]), None);
    let names = vec![
        vec![" positive".to_string(), "positive".to_string()],
        vec![" negative".to_string(), "negative".to_string()],
        vec!["very negative".to_string()],
    ];
    assert_eq!(label_of_text(" Positive.", &names), Some(0));
    assert_eq!(label_of_text("negative\nReview: next", &names), Some(1));
    assert_eq!(label_of_text("Very negative!", &names), Some(2));
    assert_eq!(label_of_text("positively", &names), None);
    assert_eq!(label_of_text("", &names), None);
}

/// A word-level tokenizer: `w{i}` is token `i` (3 and up); 0 `[UNK]`, 1 `<s>`, 2 `</s>`.
fn word_tokenizer(dir: &Path) -> Tokenizer {
    let json = common::word_level::word_level_json(&[(0, "[UNK]"), (1, "<s>"), (2, "</s>")], 256);
    let path = dir.join("tokenizer.json");
    std::fs::write(&path, json).unwrap();
    Tokenizer::from_file(&path).unwrap()
}

fn word_task() -> ClassificationTask {
    let row = |text: &str, label: usize, line: usize| LabeledText {
        text: text.into(),
        label,
        line,
    };
    ClassificationTask {
        name: "words".into(),
        template: "w50 {text} w51".into(),
        labels: vec!["a".into(), "b".into()],
        verbalizer: vec![" w100".into(), " w200".into()],
        train: vec![
            row("w10 w11", 0, 1),
            row("w12", 1, 2),
            row("w13 w14 w15", 0, 3),
            row("w16", 1, 4),
        ],
        dev: vec![],
        test: vec![row("w20 w21", 1, 5), row("w22", 0, 6), row("w23 w24", 1, 7)],
    }
}

fn words(s: &str) -> Vec<u32> {
    s.split_whitespace()
        .map(|w| w[1..].parse().unwrap())
        .collect()
}

#[test]
fn k_shot_inputs_are_demonstrations_then_the_query() {
    let task = word_task();
    let order = draw(4, 2, 7).unwrap();
    assert_eq!(
        order,
        draw(4, 2, 7).unwrap(),
        "the draw depends on the seed only"
    );
    assert_eq!(order.len(), 2);
    assert_ne!(order[0], order[1]);
    assert!(draw(4, 5, 7).is_err());
    let k2 = k_shot_task(&task, 2, 7).unwrap();
    let demo = |i: usize| {
        format!(
            "w50 {} w51{}{SEPARATOR}",
            task.train[i].text, task.verbalizer[task.train[i].label]
        )
    };
    assert_eq!(
        k2.template,
        format!("{}{}w50 {{text}} w51", demo(order[0]), demo(order[1]))
    );
    assert_eq!(k_shot_task(&task, 0, 7).unwrap().template, task.template);
    assert_eq!(
        (k2.labels.clone(), k2.test.clone()),
        (task.labels.clone(), task.test.clone())
    );

    let pairs = vec![
        TextPair {
            input: "q1 ".into(),
            target: "a1".into(),
            line: 1,
        },
        TextPair {
            input: "q2 ".into(),
            target: "a2".into(),
            line: 2,
        },
    ];
    let test = vec![TextPair {
        input: "q3 ".into(),
        target: "a3".into(),
        line: 9,
    }];
    let out = k_shot_pairs(&pairs, &test, 1, 3).unwrap();
    let i = draw(2, 1, 3).unwrap()[0];
    assert_eq!(
        out[0].input,
        format!("{}{}{SEPARATOR}q3 ", pairs[i].input, pairs[i].target)
    );
    assert_eq!((out[0].target.as_str(), out[0].line), ("a3", 9));

    // The k-shot evaluation scores exactly these token sequences (no soft prompt).
    let dir = tempdir();
    let mut m = model("llama-tiny");
    m.tokenizer = Some(word_tokenizer(dir.path()));
    let eval = classify(
        &m,
        None,
        &k2,
        &task.test,
        Mode::Rank,
        &Decoding::default(),
        8,
    )
    .unwrap();
    let demo_ids: Vec<u32> = order
        .iter()
        .flat_map(|&i| {
            let mut v = words(&format!("w50 {} w51", task.train[i].text));
            v.push([100, 200][task.train[i].label]);
            v
        })
        .collect();
    let srcs: Vec<Vec<u32>> = task
        .test
        .iter()
        .map(|r| {
            let mut v = demo_ids.clone();
            v.extend(words(&format!("w50 {} w51", r.text)));
            v
        })
        .collect();
    let by_hand = label_log_likelihoods(
        &m.backbone,
        None,
        &srcs,
        &[vec![100], vec![200]],
        8,
        &Device::Cpu,
    )
    .unwrap();
    for (p, s) in eval.predictions.iter().zip(&by_hand) {
        assert_eq!(p.scores.as_ref().unwrap(), s);
        assert_eq!(p.prediction, Some(argmax(s)));
    }
    let right = eval
        .predictions
        .iter()
        .filter(|p| p.prediction == Some(p.gold))
        .count();
    assert!((eval.accuracy - right as f64 / 3.0).abs() < 1e-12);
    assert_eq!(eval.confusion.iter().flatten().sum::<usize>(), 3);

    // Generation mode on the same task: a generation is read back as a label or counted
    // unmatched, and with single-token labels a matched one is the rank winner whenever
    // the greedy first token is a label token.
    let gen = classify(
        &m,
        None,
        &k2,
        &task.test,
        Mode::Generate,
        &Decoding {
            beams: 1,
            max_new_tokens: 1,
            length_penalty: None,
        },
        8,
    )
    .unwrap();
    assert_eq!(gen.predictions.len(), 3);
    let matched = gen
        .predictions
        .iter()
        .filter(|p| p.prediction.is_some())
        .count();
    assert_eq!(matched + gen.unmatched, 3);
    for (g, r) in gen.predictions.iter().zip(&eval.predictions) {
        if g.prediction.is_some() {
            assert_eq!(g.prediction, r.prediction);
        }
    }
}
