//! What prompt tuning accepts: bad input is rejected before any work, a prompt without
//! gradient is an error, and the prompt placed after BOS is where the model reads it.

mod common;

use candle_core::{DType, Device, Tensor};
use common::*;
use softprompt::batch::{collate, Example};
use softprompt::load::Model;
use softprompt::model::{Backbone, CausalLm, LogitsAt, ModelInfo};
use softprompt::objective::mean_loss;
use softprompt::prompt::init::{init_prompt, Rng};
use softprompt::prompt::{prefix_after_bos, strip_leading_bos, PeftAdapter, PromptInit};
use softprompt::train::metrics;
use softprompt::train::schedule::Schedule;
use softprompt::train::trainer::config_hash;
use softprompt::train::{train, TrainConfig};
use std::path::PathBuf;

/// Each bad input is an error before anything is written.
#[test]
fn bad_input_is_rejected_before_training() {
    let dir = tempdir();
    let words = llama_with_words(dir.path());
    let gpt2 = fixture_model("gpt2-tiny"); // context 128
    let data = toy_data(4, 1, 2);
    type Edit = Box<dyn Fn(&mut TrainConfig)>;
    type Case<'a> = (&'static str, &'a Model, Vec<Example>, Option<Vec<Example>>, Edit);
    let cases: Vec<Case> = vec![
        (
            "training set is empty",
            &words,
            vec![],
            None,
            Box::new(|_| {}),
        ),
        (
            "dev set is empty",
            &words,
            data.clone(),
            Some(vec![]),
            Box::new(|_| {}),
        ),
        (
            "n_tokens",
            &words,
            data.clone(),
            None,
            Box::new(|c| c.n_tokens = 0),
        ),
        (
            "learning rate",
            &words,
            data.clone(),
            None,
            Box::new(|c| c.schedule = Schedule::constant(f64::NAN)),
        ),
        (
            "learning rate",
            &words,
            data.clone(),
            None,
            Box::new(|c| c.schedule = Schedule::constant(0.0)),
        ),
        (
            "learning rate",
            &words,
            data.clone(),
            None,
            Box::new(|c| c.schedule = Schedule::constant(-0.1)),
        ),
        (
            "tokenizes to no tokens",
            &words,
            data.clone(),
            None,
            Box::new(|c| c.init = PromptInit::ClassLabels(vec!["w7".into(), "".into()])),
        ),
        (
            "longer than the model's context of 128",
            &gpt2,
            vec![Example {
                source: vec![5; 20],
                target: vec![6; 9],
            }],
            None,
            Box::new(|c| c.n_tokens = 100),
        ),
        (
            "outside the model's vocabulary",
            &words,
            vec![Example {
                source: vec![5, 300],
                target: vec![6],
            }],
            None,
            Box::new(|_| {}),
        ),
        (
            "empty target",
            &words,
            vec![Example {
                source: vec![5],
                target: vec![],
            }],
            None,
            Box::new(|_| {}),
        ),
    ];
    for (want, m, train_set, dev, edit) in cases {
        let out = tempdir();
        let mut cfg = base_config(out.path());
        edit(&mut cfg);
        let err = train(m, &train_set, dev.as_deref(), &cfg)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(want),
            "expected an error about `{want}`, got: {err}"
        );
        assert!(
            std::fs::read_dir(out.path()).unwrap().next().is_none(),
            "{want}: files were written"
        );
    }
    // At the context limit exactly (100 + 28 = 128) training works.
    let out = tempdir();
    let mut cfg = base_config(out.path());
    cfg.n_tokens = 100;
    cfg.steps = 1;
    train(
        &gpt2,
        &[Example {
            source: vec![5; 20],
            target: vec![6; 8],
        }],
        None,
        &cfg,
    )
    .unwrap();
}

/// A backbone whose logits do not depend on its input: the prompt gets no gradient, which must
/// be an error rather than silent non-training.
struct Detached {
    info: ModelInfo,
}

impl CausalLm for Detached {
    fn info(&self) -> &ModelInfo {
        &self.info
    }
    fn embed(&self, ids: &Tensor) -> softprompt::Result<Tensor> {
        let (b, t) = ids.dims2()?;
        Ok(Tensor::zeros(
            (b, t, self.info.d_model),
            DType::F32,
            &Device::Cpu,
        )?)
    }
    fn forward(
        &self,
        _embeds: &Tensor,
        _mask: &Tensor,
        _cache: Option<&mut softprompt::model::KvCache>,
        at: LogitsAt,
    ) -> softprompt::Result<Tensor> {
        let LogitsAt::Rows(rows) = at else {
            panic!("training asks for label rows")
        };
        Ok(Tensor::zeros(
            (rows.dim(0)?, self.info.vocab_size),
            DType::F32,
            &Device::Cpu,
        )?)
    }
    fn hidden_states(&self, _: &Tensor, _: &Tensor) -> softprompt::Result<Vec<Tensor>> {
        unimplemented!()
    }
}

#[test]
fn a_prompt_without_gradient_is_an_error() {
    let info = fixture_model("llama-tiny").backbone.info().clone();
    let m = Model {
        backbone: Backbone::Causal(Box::new(Detached { info })),
        tokenizer: None,
        path: PathBuf::from("detached"),
        device: Device::Cpu,
    };
    let out = tempdir();
    let err = train(&m, &toy_data(4, 1, 2), None, &base_config(out.path())).unwrap_err();
    assert!(err.to_string().contains("no gradient"), "{err}");
}

/// Synthetic examples whose sources start with BOS (as a Llama tokenizer writes them), all of
/// one length so batches have no padding: `[BOS, a, b, c, class]` -> `[answer, EOS]`.
fn bos_data(n: usize, seed: u64, bos: u32, eos: u32) -> Vec<Example> {
    let mut rng = Rng::new(seed, 43);
    (0..n)
        .map(|_| {
            let class = rng.below(2) as usize;
            let mut source = vec![bos];
            source.extend((0..3).map(|_| 10 + rng.below(30) as u32));
            source.push([60, 70][class]);
            Example {
                source,
                target: vec![[100, 200][class], eos],
            }
        })
        .collect()
}

#[test]
fn prompt_after_bos_places_the_prompt_after_bos() {
    let m = fixture_model("llama-tiny");
    let bos = m.backbone.info().bos_token_id.expect("llama-tiny has a BOS");
    assert_eq!(bos, 1);
    let data = bos_data(8, 3, bos, eos(&m));
    let table = embedding_table("llama-tiny", "model.embed_tokens.weight");
    let bos_row = table.narrow(0, bos as usize, 1).unwrap(); // [1, D]

    // (a) One step over one batch of all examples: the reported loss is the loss of the
    // initial prompt P, which must be that of [embed(BOS); P; embed(X without BOS)].
    let dir = tempdir();
    let mut cfg = base_config(dir.path());
    cfg.init = PromptInit::RandomUniform { range: 0.5 };
    cfg.batch_size = data.len();
    cfg.steps = 1;
    cfg.prompt_after_bos = true;
    let p0 = init_prompt(&cfg.init, &m, cfg.n_tokens, cfg.seed).unwrap(); // [N, D]
    let report = train(&m, &data, None, &cfg).unwrap();
    let got = report.final_loss.unwrap();
    let stripped: Vec<Example> = data
        .iter()
        .map(|e| Example {
            source: e.source[1..].to_vec(),
            target: e.target.clone(),
        })
        .collect();
    let after = nll_by_hand(&m, &Tensor::cat(&[&bos_row, &p0], 0).unwrap(), &stripped);
    let before = nll_by_hand(&m, &p0, &data); // the default layout [P; embed(BOS); embed(X)]
    eprintln!("prompt after BOS: trainer {got}, by hand {after}; before BOS {before}");
    assert!(
        (got - after).abs() < 1e-5,
        "trainer {got} vs by hand {after}"
    );
    assert!(
        (before - after).abs() > 1e-3,
        "the layouts should differ ({before} vs {after})"
    );
    // The helper: [embed(BOS); P], gradient to P only.
    let var = candle_core::Var::from_tensor(&p0).unwrap();
    let prefix = prefix_after_bos(var.as_tensor(), &m.backbone).unwrap(); // [N+1, D]
    assert_eq!(prefix.dims(), &[cfg.n_tokens + 1, 32]);
    assert_close(
        "BOS row",
        &prefix.narrow(0, 0, 1).unwrap(),
        &bos_row,
        0.0,
    );
    assert_close("prompt rows", &prefix.narrow(0, 1, cfg.n_tokens).unwrap(), &p0, 0.0);
    let mut source = vec![bos, 5, bos];
    strip_leading_bos(&mut source, bos);
    assert_eq!(source, vec![5, bos]);
    strip_leading_bos(&mut source, bos);
    assert_eq!(source, vec![5, bos]);

    // (b) The gradient reaches P (through the prefix) and training lowers the loss.
    let batch = collate(&stripped, m.backbone.info(), cfg.n_tokens + 1, &Device::Cpu).unwrap();
    let loss = mean_loss(&m.backbone, Some(&prefix), &batch).unwrap();
    let grads = loss.backward().unwrap();
    let g = grads.get(var.as_tensor()).expect("the prompt gets a gradient");
    assert_eq!(g.dims(), &[cfg.n_tokens, 32]);
    assert!(max_abs(g) > 0.0, "the prompt gradient is zero");

    let dir2 = tempdir();
    let mut cfg2 = cfg.clone();
    cfg2.output = dir2.path().to_path_buf();
    cfg2.steps = 40;
    cfg2.checkpoint_every = 0;
    cfg2.schedule = Schedule::linear(0.3, 0, cfg2.steps);
    let report = train(&m, &data, None, &cfg2).unwrap();
    let rows = metrics::read(&dir2.path().join(metrics::FILE)).unwrap();
    let (first, last) = (rows.first().unwrap().loss, rows.last().unwrap().loss);
    eprintln!("prompt after BOS: loss {first} -> {last}");
    assert!((first - got).abs() < 1e-9, "same first step ({first} vs {got})");
    assert!(last < 0.5 * first, "loss {first} -> {last}");
    assert_eq!(report.prompt.dims(), &[cfg.n_tokens, 32]);

    // (c) task.json records the layout; the adapter holds P alone (N rows); without the
    // option the key is absent and the configuration hash differs.
    let task: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir2.path().join("task.json")).unwrap())
            .unwrap();
    assert_eq!(task["prompt_after_bos"], serde_json::json!(true));
    let adapter = PeftAdapter::load(dir2.path(), &Device::Cpu).unwrap();
    assert_eq!(adapter.config.num_virtual_tokens, cfg.n_tokens);
    let info = m.backbone.info();
    let mut plain = cfg.clone();
    plain.prompt_after_bos = false;
    assert_ne!(
        config_hash(&cfg, info, &data, None),
        config_hash(&plain, info, &data, None)
    );
    let dir3 = tempdir();
    plain.output = dir3.path().to_path_buf();
    train(&m, &data, None, &plain).unwrap();
    let task: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir3.path().join("task.json")).unwrap())
            .unwrap();
    assert!(task.get("prompt_after_bos").is_none());

    // An encoder-decoder model has no place "after BOS".
    let t5 = fixture_model("t5-tiny");
    let dir4 = tempdir();
    let mut cfg4 = base_config(dir4.path());
    cfg4.prompt_after_bos = true;
    let err = train(&t5, &toy_data(4, 1, eos(&t5)), None, &cfg4).unwrap_err();
    assert!(err.to_string().contains("BOS"), "{err}");
}
