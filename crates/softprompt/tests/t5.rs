//! T5 backbone against the golden fixtures `t5-tiny` (T5 v1.0: relu, tied head with
//! d_model^-0.5 rescale) and `flan-t5-tiny` (T5 v1.1: gated-gelu, separate lm_head).
//! Every check is written once and run for both models (see `fixture_tests!` at the end).

mod common;

use candle_core::{DType, Device, Tensor, Var, D};
use common::*;
use softprompt::load::{load_model, Model, Weights};
use softprompt::model::t5::{self, T5};
use softprompt::model::{ops, Arch, Backbone, KvCache, LogitsAt, Seq2SeqLm};
use std::collections::HashMap;
use std::path::PathBuf;

/// Number of prompt rows in the fixtures.
const N: usize = 5;

struct Fixture {
    name: &'static str,
    model: Model,
    t: HashMap<String, Tensor>,
}

impl Fixture {
    fn load(name: &'static str) -> Self {
        let model = load_model(&fixture_dir(name), &Device::Cpu)
            .unwrap_or_else(|e| panic!("{name}: load failed: {e}"));
        Fixture {
            name,
            model,
            t: expected_tensors(name),
        }
    }

    fn lm(&self) -> &dyn Seq2SeqLm {
        match &self.model.backbone {
            Backbone::Seq2Seq(m) => m.as_ref(),
            Backbone::Causal(_) => panic!("{}: loaded as a causal model", self.name),
        }
    }

    fn get(&self, key: &str) -> &Tensor {
        self.t
            .get(key)
            .unwrap_or_else(|| panic!("{}: no `{key}` in expected.safetensors", self.name))
    }

    fn ids(&self, key: &str) -> Tensor {
        as_u32(self.get(key))
    }

    fn mask(&self, key: &str) -> Tensor {
        self.get(key).to_dtype(DType::F32).unwrap()
    }

    fn prompt(&self) -> Tensor {
        self.get("prompt").clone()
    }

    fn n_layers(&self) -> (usize, usize) {
        let cfg = expected_json(self.name);
        let enc = cfg["model_config"]["num_layers"].as_u64().unwrap() as usize;
        let dec = cfg["model_config"]["num_decoder_layers"].as_u64().unwrap() as usize;
        (enc, dec)
    }

    /// Encoder input with the prompt, PEFT style: `[P ; embed(ids)]`, mask `[1]*N + mask`.
    fn prompted(&self, prompt: &Tensor, ids: &Tensor, mask: &Tensor) -> (Tensor, Tensor) {
        prompted(self.lm(), prompt, ids, mask)
    }

    /// Decoder logits of the fixture batch with `prompt` (None: the plain model).
    fn batch_logits(&self, prompt: Option<&Tensor>, at: LogitsAt) -> Tensor {
        self.batch_logits_on(self.lm(), prompt, at)
    }

    fn batch_logits_on(&self, lm: &dyn Seq2SeqLm, prompt: Option<&Tensor>, at: LogitsAt) -> Tensor {
        let ids = self.ids("input_ids");
        let mask = self.mask("attention_mask");
        let (embeds, mask) = match prompt {
            Some(p) => prompted(lm, p, &ids, &mask),
            None => (lm.embed(&ids).unwrap(), mask),
        };
        let enc = lm.encode(&embeds, &mask).unwrap();
        lm.decode(&self.ids("decoder_input_ids"), &enc, &mask, None, at)
            .unwrap()
    }

    /// Mean cross-entropy over the labels != -100, computed from all logits `[B, T, V]`.
    fn loss(&self, prompt: &Tensor) -> Tensor {
        self.loss_on(self.lm(), prompt)
    }

    /// [`Fixture::loss`] on another model; the loss keeps the model's dtype.
    fn loss_on(&self, lm: &dyn Seq2SeqLm, prompt: &Tensor) -> Tensor {
        let logits = self.batch_logits_on(lm, Some(prompt), LogitsAt::All);
        let (b, t, v) = logits.dims3().unwrap();
        let labels: Vec<i64> = to_vec2_i64(self.get("labels")).concat();
        let targets: Vec<u32> = labels
            .iter()
            .map(|&l| if l < 0 { 0 } else { l as u32 })
            .collect();
        let keep: Vec<f32> = labels
            .iter()
            .map(|&l| if l == -100 { 0.0 } else { 1.0 })
            .collect();
        let count: f32 = keep.iter().sum();
        let targets = Tensor::from_vec(targets, (b * t, 1), &Device::Cpu).unwrap();
        let keep = Tensor::from_vec(keep, b * t, &Device::Cpu)
            .unwrap()
            .to_dtype(logits.dtype())
            .unwrap();
        let logp = ops::log_softmax_last_dim(&logits.reshape((b * t, v)).unwrap()).unwrap(); // [B*T, V]
        let nll = logp
            .gather(&targets, 1)
            .unwrap()
            .squeeze(1)
            .unwrap()
            .neg()
            .unwrap(); // [B*T]
        ((nll * keep).unwrap().sum_all().unwrap() / count as f64).unwrap()
    }

    /// The same loss with the head applied only at the label rows (`LogitsAt::Rows`).
    fn loss_rows(&self, prompt: &Tensor) -> Tensor {
        let labels: Vec<i64> = to_vec2_i64(self.get("labels")).concat();
        let rows: Vec<u32> = (0..labels.len() as u32)
            .filter(|&i| labels[i as usize] != -100)
            .collect();
        let targets: Vec<u32> = labels
            .iter()
            .filter(|&&l| l != -100)
            .map(|&l| l as u32)
            .collect();
        let m = rows.len();
        let rows = Tensor::from_vec(rows, m, &Device::Cpu).unwrap();
        let targets = Tensor::from_vec(targets, m, &Device::Cpu).unwrap();
        let logits = self.batch_logits(Some(prompt), LogitsAt::Rows(&rows)); // [M, V]
        assert_eq!(logits.dims(), [m, 256]);
        ops::token_nll(&logits, &targets)
            .unwrap()
            .mean_all()
            .unwrap()
    }
}

/// Encoder input with the prompt, PEFT style: `[P ; embed(ids)]`, mask `[1]*N + mask`.
fn prompted(lm: &dyn Seq2SeqLm, prompt: &Tensor, ids: &Tensor, mask: &Tensor) -> (Tensor, Tensor) {
    let b = ids.dim(0).unwrap();
    let (n, d) = prompt.dims2().unwrap();
    let p = prompt
        .unsqueeze(0)
        .unwrap()
        .broadcast_as((b, n, d))
        .unwrap(); // [B, N, D]
    let embeds = Tensor::cat(&[&p, &lm.embed(ids).unwrap()], 1).unwrap(); // [B, N+S, D]
    let ones = Tensor::ones((b, n), DType::F32, &Device::Cpu).unwrap();
    let mask = Tensor::cat(&[&ones, mask], 1).unwrap(); // [B, N+S]
    (embeds, mask)
}

/// The fixture model built from its weights converted to f64.
fn model_f64(name: &str) -> T5 {
    let dir = fixture_dir(name);
    let cfg: t5::Config =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let tensors =
        candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap();
    let tensors = tensors
        .into_iter()
        .map(|(k, v)| (k, v.to_dtype(DType::F64).unwrap()))
        .collect();
    T5::new(&cfg, &Weights::new(tensors, dir), name.to_string()).unwrap()
}

fn scalar(t: &Tensor) -> f32 {
    t.flatten_all()
        .unwrap()
        .get(0)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// `[0] + labels[:-1]`
fn shift_right(labels: &[u32]) -> Vec<u32> {
    std::iter::once(0)
        .chain(labels[..labels.len() - 1].iter().copied())
        .collect()
}

fn info(name: &'static str) {
    let fx = Fixture::load(name);
    let info = fx.lm().info();
    let (_, dec) = fx.n_layers();
    assert_eq!(info.arch, Arch::T5);
    assert_eq!(info.d_model, 32);
    assert_eq!(info.vocab_size, 256);
    assert_eq!(info.n_layers, dec);
    assert_eq!(info.max_positions, None);
    assert_eq!(info.eos_token_ids, vec![1]);
    assert_eq!(info.pad_token_id, Some(0));
    assert_eq!(info.decoder_start_token_id, Some(0));
    assert_eq!(info.name, name);
}

fn logits_no_prompt(name: &'static str) {
    let fx = Fixture::load(name);
    let logits = fx.batch_logits(None, LogitsAt::All);
    assert_close(
        &format!("{name} logits_no_prompt"),
        &logits,
        fx.get("logits_no_prompt"),
        TOL_LOGITS,
    );
}

fn logits_with_prompt(name: &'static str) {
    let fx = Fixture::load(name);
    let logits = fx.batch_logits(Some(&fx.prompt()), LogitsAt::All);
    assert_close(
        &format!("{name} logits"),
        &logits,
        fx.get("logits"),
        TOL_LOGITS,
    );
    // LogitsAt::Last is the last decoder position of every row.
    let last = fx.batch_logits(Some(&fx.prompt()), LogitsAt::Last);
    let expected_last = fx
        .get("logits")
        .narrow(1, 5, 1)
        .unwrap()
        .squeeze(1)
        .unwrap();
    assert_close(
        &format!("{name} logits at Last"),
        &last,
        &expected_last,
        TOL_LOGITS,
    );
}

fn hidden_states(name: &'static str) {
    let fx = Fixture::load(name);
    let (n_enc, n_dec) = fx.n_layers();
    let (embeds, mask) = fx.prompted(
        &fx.prompt(),
        &fx.ids("input_ids"),
        &fx.mask("attention_mask"),
    );
    let (enc, dec) = fx
        .lm()
        .hidden_states(&embeds, &mask, &fx.ids("decoder_input_ids"))
        .unwrap();
    assert_eq!(enc.len(), n_enc + 1);
    assert_eq!(dec.len(), n_dec + 1);
    let enc = Tensor::stack(&enc, 0).unwrap(); // [L+1, B, N+S, D]
    let dec = Tensor::stack(&dec, 0).unwrap(); // [L+1, B, T, D]
    assert_close(
        &format!("{name} encoder_hidden_states"),
        &enc,
        fx.get("encoder_hidden_states"),
        TOL_HIDDEN,
    );
    assert_close(
        &format!("{name} decoder_hidden_states"),
        &dec,
        fx.get("decoder_hidden_states"),
        TOL_HIDDEN,
    );
}

fn loss_and_grad(name: &'static str) {
    let fx = Fixture::load(name);
    let expected = scalar(fx.get("loss"));
    let json = expected_json(name);
    assert_eq!(json["results"]["n_loss_tokens"].as_u64(), Some(12));

    let no_prompt = {
        // The plain model's loss, from the label rows of its logits.
        let logits = fx.batch_logits(None, LogitsAt::All);
        let (b, t, v) = logits.dims3().unwrap();
        let labels: Vec<i64> = to_vec2_i64(fx.get("labels")).concat();
        let rows: Vec<u32> = (0..(b * t) as u32)
            .filter(|&i| labels[i as usize] != -100)
            .collect();
        let targets: Vec<u32> = labels
            .iter()
            .filter(|&&l| l != -100)
            .map(|&l| l as u32)
            .collect();
        let m = rows.len();
        let flat = logits.reshape((b * t, v)).unwrap();
        let picked = flat
            .index_select(&Tensor::from_vec(rows, m, &Device::Cpu).unwrap(), 0)
            .unwrap();
        let targets = Tensor::from_vec(targets, m, &Device::Cpu).unwrap();
        scalar(
            &ops::token_nll(&picked, &targets)
                .unwrap()
                .mean_all()
                .unwrap(),
        )
    };
    let d = (no_prompt - scalar(fx.get("loss_no_prompt"))).abs();
    assert!(d <= TOL_LOSS, "{name} loss_no_prompt: diff {d}");

    let prompt = Var::from_tensor(&fx.prompt()).unwrap();
    let loss = fx.loss(prompt.as_tensor());
    let d = (scalar(&loss) - expected).abs();
    assert!(
        d <= TOL_LOSS,
        "{name} loss {} vs {expected}: diff {d}",
        scalar(&loss)
    );

    let rows = fx.loss_rows(prompt.as_tensor());
    let d = (scalar(&rows) - expected).abs();
    assert!(
        d <= TOL_LOSS,
        "{name} loss via LogitsAt::Rows {} vs {expected}: diff {d}",
        scalar(&rows)
    );

    let expected_grad = fx.get("grad_prompt");
    let tol = TOL_GRAD_REL * max_abs(expected_grad);
    for (what, l) in [("all logits", &loss), ("LogitsAt::Rows", &rows)] {
        let grads = l.backward().unwrap();
        let g = grads
            .get(prompt.as_tensor())
            .unwrap_or_else(|| panic!("{name} ({what}): no gradient for the prompt"));
        assert_close(
            &format!("{name} grad_prompt ({what})"),
            g,
            expected_grad,
            tol,
        );
    }
}

fn generate(name: &'static str) {
    let fx = Fixture::load(name);
    let lm = fx.lm();
    let (embeds, mask) = fx.prompted(
        &fx.prompt(),
        &fx.ids("generate.input_ids"),
        &fx.mask("generate.attention_mask"),
    );
    let enc = lm.encode(&embeds, &mask).unwrap();
    let b = enc.dim(0).unwrap();
    let expected_tokens = to_vec2_i64(fx.get("generate.new_tokens"));
    let step_logits = fx.get("generate.step_logits"); // [6, B, V]
    let mut cache = KvCache::new(lm.info().n_layers);
    let start = lm.info().decoder_start_token_id.unwrap();
    let mut next = Tensor::from_vec(vec![start; b], (b, 1), &Device::Cpu).unwrap();
    let mut generated: Vec<Vec<i64>> = vec![Vec::new(); b];
    for step in 0..6 {
        let logits = lm
            .decode(&next, &enc, &mask, Some(&mut cache), LogitsAt::Last)
            .unwrap(); // [B, V]
        assert_eq!(cache.seq_len(), step + 1);
        assert!(
            cache.cross.iter().all(Option::is_some),
            "cross-attention keys not cached"
        );
        let expected = step_logits.get(step).unwrap();
        assert_close(
            &format!("{name} generate.step_logits[{step}]"),
            &logits,
            &expected,
            TOL_LOGITS,
        );
        let tokens = logits.argmax(D::Minus1).unwrap(); // [B] u32
        for (row, tok) in tokens.to_vec1::<u32>().unwrap().into_iter().enumerate() {
            generated[row].push(tok as i64);
        }
        next = tokens.unsqueeze(1).unwrap();
    }
    assert_eq!(generated, expected_tokens, "{name} generate.new_tokens");
}

fn unpadded(name: &'static str) {
    let fx = Fixture::load(name);
    let json = expected_json(name);
    let examples = json["batch"]["examples_unpadded"].as_array().unwrap();
    assert_eq!(examples.len(), 3);
    for (i, ex) in examples.iter().enumerate() {
        let to_ids = |v: &serde_json::Value| -> Vec<u32> {
            v.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as u32)
                .collect()
        };
        let input = to_ids(&ex["input_ids"]);
        let labels = to_ids(&ex["labels"]);
        let s = input.len();
        let ids = Tensor::from_vec(input, (1, s), &Device::Cpu).unwrap();
        let mask = Tensor::ones((1, s), DType::F32, &Device::Cpu).unwrap();
        let (embeds, mask) = fx.prompted(&fx.prompt(), &ids, &mask);
        let enc = fx.lm().encode(&embeds, &mask).unwrap();
        let dec = shift_right(&labels);
        let t = dec.len();
        let dec = Tensor::from_vec(dec, (1, t), &Device::Cpu).unwrap();
        let logits = fx
            .lm()
            .decode(&dec, &enc, &mask, None, LogitsAt::All)
            .unwrap();
        let logits = logits.squeeze(0).unwrap(); // [T_i, V]
        assert_close(
            &format!("{name} unpadded.{i}.logits"),
            &logits,
            fx.get(&format!("unpadded.{i}.logits")),
            TOL_LOGITS,
        );
    }
}

/// `prompt_embeddings` of an adapter folder, first `num_virtual_tokens` rows.
fn adapter_prompt(name: &str, folder: &str) -> (Tensor, serde_json::Value) {
    let dir = fixture_dir(name).join(folder);
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("adapter_config.json")).unwrap())
            .unwrap();
    let n = cfg["num_virtual_tokens"].as_u64().unwrap() as usize;
    let tensors =
        candle_core::safetensors::load(dir.join("adapter_model.safetensors"), &Device::Cpu)
            .unwrap();
    let table = tensors.get("prompt_embeddings").expect("prompt_embeddings");
    (table.narrow(0, 0, n).unwrap(), cfg)
}

fn adapters_agree(name: &'static str) {
    let fx = Fixture::load(name);
    let (full, cfg_full) = adapter_prompt(name, "adapter");
    let (enc_only, cfg_enc) = adapter_prompt(name, "adapter-encoder-only");
    assert_eq!(cfg_full["num_transformer_submodules"].as_u64(), Some(2));
    assert_eq!(cfg_enc["num_transformer_submodules"].as_u64(), Some(1));
    assert_eq!(full.dims(), [N, 32]);
    assert_eq!(enc_only.dims(), [N, 32]);
    assert_eq!(
        max_abs_diff(&full, &fx.prompt()),
        0.0,
        "{name}: adapter/ rows 0..N != prompt"
    );

    let mut results = Vec::new();
    for p in [&full, &enc_only] {
        let var = Var::from_tensor(p).unwrap();
        let logits = fx.batch_logits(Some(var.as_tensor()), LogitsAt::All);
        let loss = fx.loss(var.as_tensor());
        let grad = loss
            .backward()
            .unwrap()
            .get(var.as_tensor())
            .unwrap()
            .clone();
        assert_close(
            &format!("{name} logits from adapter"),
            &logits,
            fx.get("logits"),
            TOL_LOGITS,
        );
        results.push((logits, scalar(&loss), grad));
    }
    let (a, b) = (&results[0], &results[1]);
    assert_eq!(
        max_abs_diff(&a.0, &b.0),
        0.0,
        "{name}: adapters give different logits"
    );
    assert_eq!(a.1, b.1, "{name}: adapters give different losses");
    assert_eq!(
        max_abs_diff(&a.2, &b.2),
        0.0,
        "{name}: adapters give different gradients"
    );
}

/// Central differences of the loss against the backward pass on a few prompt entries. The
/// differences are taken on the same model run in f64 (an f32 loss is too noisy for them);
/// the f64 backward must match them closely, and the f32 backward within the fixture tolerance.
fn finite_differences(name: &'static str) {
    let fx = Fixture::load(name);
    let prompt = fx.prompt();
    let var = Var::from_tensor(&prompt).unwrap();
    let grad32 = fx
        .loss(var.as_tensor())
        .backward()
        .unwrap()
        .get(var.as_tensor())
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();

    let lm64 = model_f64(name);
    let prompt64 = prompt.to_dtype(DType::F64).unwrap();
    let var64 = Var::from_tensor(&prompt64).unwrap();
    let loss64 = fx.loss_on(&lm64, var64.as_tensor());
    assert!(
        (scalar(&loss64) - scalar(fx.get("loss"))).abs() <= TOL_LOSS,
        "{name}: f64 loss"
    );
    let grad64 = loss64
        .backward()
        .unwrap()
        .get(var64.as_tensor())
        .unwrap()
        .to_vec2::<f64>()
        .unwrap();
    let gmax = grad64.iter().flatten().fold(0f64, |m, g| m.max(g.abs()));

    // The three largest entries plus a spread of others.
    let mut entries: Vec<(usize, usize)> =
        (0..N).flat_map(|i| (0..32).map(move |j| (i, j))).collect();
    entries.sort_by(|a, b| grad64[b.0][b.1].abs().total_cmp(&grad64[a.0][a.1].abs()));
    let mut picked: Vec<(usize, usize)> = entries[..3].to_vec();
    for e in [(0, 0), (1, 7), (2, 19), (3, 30), (4, 12)] {
        if !picked.contains(&e) {
            picked.push(e);
        }
    }

    let base = prompt64.to_vec2::<f64>().unwrap();
    let h = 1e-5;
    for (i, j) in picked {
        let shifted = |delta: f64| {
            let mut p = base.clone();
            p[i][j] += delta;
            let p = Tensor::new(p, &Device::Cpu).unwrap();
            fx.loss_on(&lm64, &p).to_scalar::<f64>().unwrap()
        };
        let fd = (shifted(h) - shifted(-h)) / (2.0 * h);
        let g = grad64[i][j];
        let err = (fd - g).abs();
        let tol = 1e-6 * gmax;
        assert!(err <= tol, "{name} prompt[{i}][{j}]: f64 backward {g}, central difference {fd}, diff {err} > {tol}");
        let err32 = (fd - grad32[i][j] as f64).abs();
        let tol32 = TOL_GRAD_REL as f64 * gmax;
        assert!(err32 <= tol32, "{name} prompt[{i}][{j}]: f32 backward {}, central difference {fd}, diff {err32} > {tol32}", grad32[i][j]);
    }
}

/// A copy of the fixture folder's config + weights with `edit` applied to config.json.
fn broken_copy(
    name: &str,
    tag: &str,
    edit: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>),
) -> PathBuf {
    let src = fixture_dir(name);
    let dir = std::env::temp_dir().join(format!(
        "softprompt-t5-test-{}-{name}-{tag}",
        std::process::id()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(src.join("model.safetensors"), dir.join("model.safetensors")).unwrap();
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    edit(cfg.as_object_mut().unwrap());
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string_pretty(&cfg).unwrap(),
    )
    .unwrap();
    dir
}

fn load_error(dir: &PathBuf) -> String {
    let result = load_model(dir, &Device::Cpu);
    let _ = std::fs::remove_dir_all(dir);
    match result {
        Ok(_) => panic!("{}: loading a broken config succeeded", dir.display()),
        Err(e) => e.to_string(),
    }
}

fn bad_config(name: &'static str) {
    let dir = broken_copy(name, "no-d-model", |c| {
        c.remove("d_model");
    });
    let msg = load_error(&dir);
    assert!(
        msg.contains("config.json") && msg.contains("d_model"),
        "{name}: unclear error: {msg}"
    );

    let dir = broken_copy(name, "swish", |c| {
        c.insert("feed_forward_proj".into(), "swish-ish".into());
    });
    let msg = load_error(&dir);
    assert!(
        msg.contains("config.json")
            && msg.contains("feed_forward_proj")
            && msg.contains("swish-ish"),
        "{name}: unclear error: {msg}"
    );
}

fn bad_inputs(name: &'static str) {
    let fx = Fixture::load(name);
    let lm = fx.lm();
    let dev = Device::Cpu;
    // Token id past the vocabulary, wrong dtype, wrong rank.
    let big = Tensor::new(&[[3u32, 256]], &dev).unwrap();
    assert!(lm.embed(&big).is_err());
    assert!(lm.embed(&Tensor::new(&[[3i64, 4]], &dev).unwrap()).is_err());
    assert!(lm.embed(&Tensor::new(&[3u32, 4], &dev).unwrap()).is_err());
    // Encoder: wrong width, mask of the wrong shape.
    let ids = fx.ids("input_ids");
    let embeds = lm.embed(&ids).unwrap();
    let mask = fx.mask("attention_mask");
    assert!(lm
        .encode(&Tensor::zeros((3, 9, 31), DType::F32, &dev).unwrap(), &mask)
        .is_err());
    assert!(lm.encode(&embeds, &mask.narrow(1, 0, 8).unwrap()).is_err());
    // Decoder: batch mismatch, empty decoder input.
    let enc = lm.encode(&embeds, &mask).unwrap();
    let dec = fx.ids("decoder_input_ids");
    assert!(lm
        .decode(
            &dec.narrow(0, 0, 2).unwrap(),
            &enc,
            &mask,
            None,
            LogitsAt::All
        )
        .is_err());
    assert!(lm
        .decode(
            &dec.narrow(1, 0, 0).unwrap(),
            &enc,
            &mask,
            None,
            LogitsAt::All
        )
        .is_err());
    // A cache built for fewer layers is extended rather than indexed out of bounds.
    let mut cache = KvCache::new(0);
    let start = Tensor::zeros((3, 1), DType::U32, &dev).unwrap();
    assert!(lm
        .decode(&start, &enc, &mask, Some(&mut cache), LogitsAt::Last)
        .is_ok());
}

macro_rules! fixture_tests {
    ($module:ident, $fixture:literal) => {
        mod $module {
            #[test]
            fn info() {
                super::info($fixture)
            }
            #[test]
            fn logits_no_prompt() {
                super::logits_no_prompt($fixture)
            }
            #[test]
            fn logits_with_prompt() {
                super::logits_with_prompt($fixture)
            }
            #[test]
            fn hidden_states() {
                super::hidden_states($fixture)
            }
            #[test]
            fn loss_and_grad() {
                super::loss_and_grad($fixture)
            }
            #[test]
            fn generate() {
                super::generate($fixture)
            }
            #[test]
            fn unpadded() {
                super::unpadded($fixture)
            }
            #[test]
            fn adapters_agree() {
                super::adapters_agree($fixture)
            }
            #[test]
            fn finite_differences() {
                super::finite_differences($fixture)
            }
            #[test]
            fn bad_config() {
                super::bad_config($fixture)
            }
            #[test]
            fn bad_inputs() {
                super::bad_inputs($fixture)
            }
        }
    };
}

fixture_tests!(t5_tiny, "t5-tiny");
fixture_tests!(flan_t5_tiny, "flan-t5-tiny");
