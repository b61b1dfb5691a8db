//! The five prompt initialisations (common tokens, sampled vocabulary, class labels, text,
//! random uniform or a file) make the prompts they document.

mod common;

use candle_core::Tensor;
use common::*;
use softprompt::prompt::init::{common_token_ids, init_prompt, COMMON_TOKENS};
use softprompt::prompt::PromptInit;
use softprompt::train::train;
use std::collections::HashSet;

/// The ids whose embedding rows (of `table`, `[V, D]`) equal the prompt's rows exactly.
fn row_ids(prompt: &Tensor, table: &Tensor) -> Vec<u32> {
    let rows = prompt.to_vec2::<f32>().unwrap();
    let table = table.to_vec2::<f32>().unwrap();
    rows.iter()
        .map(|r| {
            let hits: Vec<usize> = (0..table.len()).filter(|&i| &table[i] == r).collect();
            assert_eq!(
                hits.len(),
                1,
                "a prompt row is not exactly one embedding row"
            );
            hits[0] as u32
        })
        .collect()
}

#[test]
fn init_common_tokens_are_lowest_ordinary_ids() {
    let dir = tempdir();
    let m = fixture_model("llama-tiny"); // bos 1, eos = pad = 2
    let mut info = m.backbone.info().clone();
    let tok = word_tokenizer(dir.path(), 256);
    let ids = common_token_ids(&info, Some(&tok), 10);
    assert_eq!(
        ids,
        (5..15).collect::<Vec<u32>>(),
        "specials 0, 1, 2, 4 and byte piece 3 excluded"
    );
    // A vocabulary larger than 5,000: exactly the 5,000 lowest ordinary ids.
    info.vocab_size = 6000;
    let big = word_tokenizer(dir.path(), 6000);
    let ids = common_token_ids(&info, Some(&big), COMMON_TOKENS);
    assert_eq!(ids.len(), COMMON_TOKENS);
    assert_eq!(ids, (5..5005).collect::<Vec<u32>>());
    // Without a tokenizer only the model's special ids are known.
    let ids = common_token_ids(m.backbone.info(), None, 5);
    assert_eq!(ids, vec![0, 3, 4, 5, 6]);
}

#[test]
fn init_sampled_vocab_draws_distinct_common_ids() {
    let dir = tempdir();
    let m = llama_with_words(dir.path());
    let table = embedding_table("llama-tiny", "model.embed_tokens.weight");
    let p = init_prompt(&PromptInit::SampledVocab, &m, 50, 11).unwrap();
    assert_eq!(p.dims(), &[50, 32]);
    let ids = row_ids(&p, &table);
    let set: HashSet<u32> = ids.iter().copied().collect();
    assert_eq!(set.len(), 50, "ids drawn twice: {ids:?}");
    assert!(ids.iter().all(|i| (5..5000).contains(i)), "{ids:?}");
    // Deterministic in the seed, different across seeds.
    let again = init_prompt(&PromptInit::SampledVocab, &m, 50, 11).unwrap();
    assert_eq!(f32_bits(&p), f32_bits(&again));
    let other = init_prompt(&PromptInit::SampledVocab, &m, 50, 12).unwrap();
    assert_ne!(f32_bits(&p), f32_bits(&other));
    // More slots than ordinary tokens (251): every token once, then again.
    let many = row_ids(
        &init_prompt(&PromptInit::SampledVocab, &m, 300, 1).unwrap(),
        &table,
    );
    let first: HashSet<u32> = many[..251].iter().copied().collect();
    assert_eq!(first.len(), 251);
}

#[test]
fn init_class_labels_average_multi_token_labels() {
    let dir = tempdir();
    let m = llama_with_words(dir.path());
    let table = embedding_table("llama-tiny", "model.embed_tokens.weight");
    let init = PromptInit::ClassLabels(vec!["w10 w20".into(), "w30".into()]);
    let p = init_prompt(&init, &m, 5, 3).unwrap();
    assert_eq!(p.dims(), &[5, 32]);
    // By hand: the mean of rows 10 and 20, then row 30.
    let t = table.to_vec2::<f32>().unwrap();
    let rows = p.to_vec2::<f32>().unwrap();
    for d in 0..32 {
        let mean = (t[10][d] + t[20][d]) / 2.0;
        assert!(
            (rows[0][d] - mean).abs() <= 1e-7,
            "dim {d}: {} vs {mean}",
            rows[0][d]
        );
        assert_eq!(rows[1][d], t[30][d]);
    }
    // The other 3 slots: distinct sampled ordinary tokens, none of the labels'.
    let rest = row_ids(&p.narrow(0, 2, 3).unwrap(), &table);
    let set: HashSet<u32> = rest.iter().copied().collect();
    assert_eq!(set.len(), 3);
    assert!(
        rest.iter()
            .all(|i| ![0, 1, 2, 3, 4, 10, 20, 30].contains(i)),
        "{rest:?}"
    );

    // Errors: a label with no tokens, more labels than slots, no labels.
    let err = init_prompt(
        &PromptInit::ClassLabels(vec!["w5".into(), "  ".into()]),
        &m,
        5,
        0,
    )
    .unwrap_err();
    assert!(err.to_string().contains("tokenizes to no tokens"), "{err}");
    let err = init_prompt(
        &PromptInit::ClassLabels(vec!["w5".into(), "w6".into()]),
        &m,
        1,
        0,
    )
    .unwrap_err();
    assert!(err.to_string().contains("do not fit"), "{err}");
    assert!(init_prompt(&PromptInit::ClassLabels(vec![]), &m, 3, 0).is_err());
    // No tokenizer: a clear error.
    let bare = fixture_model("llama-tiny");
    let err = init_prompt(&init, &bare, 5, 0).unwrap_err();
    assert!(err.to_string().contains("tokenizer"), "{err}");
}

#[test]
fn init_text_repeats_and_truncates() {
    let dir = tempdir();
    let m = llama_with_words(dir.path());
    let table = embedding_table("llama-tiny", "model.embed_tokens.weight");
    let text = PromptInit::Text("w5 w6 w7".into());
    let p = init_prompt(&text, &m, 8, 0).unwrap();
    assert_eq!(row_ids(&p, &table), vec![5, 6, 7, 5, 6, 7, 5, 6]);
    let p = init_prompt(&text, &m, 2, 0).unwrap();
    assert_eq!(row_ids(&p, &table), vec![5, 6]);
    assert!(init_prompt(&PromptInit::Text(" ".into()), &m, 2, 0).is_err());
    assert_eq!(text.peft_name(), "TEXT");

    // The adapter records TEXT the way PEFT needs it (text and tokenizer).
    let out = tempdir();
    let mut cfg = base_config(out.path());
    cfg.init = text;
    cfg.steps = 1;
    train(&m, &toy_data(4, 1, 2), None, &cfg).unwrap();
    let conf: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.path().join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(conf["prompt_tuning_init"], "TEXT");
    assert_eq!(conf["prompt_tuning_init_text"], "w5 w6 w7");
    assert!(conf["tokenizer_name_or_path"].is_string());
}

#[test]
fn init_random_uniform_and_file() {
    let m = fixture_model("gpt2-tiny");
    let p = init_prompt(&PromptInit::RandomUniform { range: 0.5 }, &m, 20, 9).unwrap();
    let v: Vec<f32> = p.flatten_all().unwrap().to_vec1().unwrap();
    assert!(v.iter().all(|x| (-0.5..=0.5).contains(x)));
    let mean_abs = v.iter().map(|x| x.abs()).sum::<f32>() / v.len() as f32;
    assert!(
        (mean_abs - 0.25).abs() < 0.03,
        "mean |x| {mean_abs} (U[-0.5, 0.5] gives 0.25)"
    );
    let again = init_prompt(&PromptInit::RandomUniform { range: 0.5 }, &m, 20, 9).unwrap();
    assert_eq!(f32_bits(&p), f32_bits(&again));
    assert!(init_prompt(&PromptInit::RandomUniform { range: f64::NAN }, &m, 20, 9).is_err());

    // Prompt transfer from the fixture's adapter: its rows, checked against the model.
    let adapter = fixture_dir("gpt2-tiny").join("adapter");
    let p = init_prompt(&PromptInit::File(adapter.clone()), &m, 5, 0).unwrap();
    assert_eq!(
        f32_bits(&p),
        f32_bits(&expected_tensors("gpt2-tiny")["prompt"])
    );
    let err = init_prompt(&PromptInit::File(adapter), &m, 6, 0).unwrap_err();
    assert!(err.to_string().contains("num_virtual_tokens"), "{err}");
    // A seq2seq adapter does not fit a causal model.
    let t5 = fixture_dir("t5-tiny").join("adapter");
    assert!(init_prompt(&PromptInit::File(t5), &m, 5, 0).is_err());
}
