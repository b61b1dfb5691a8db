//! Shared helpers for tests: the golden fixtures (tests/fixtures, made by PyTorch +
//! transformers + PEFT, see tests/fixtures/README.md) and comparisons.
#![allow(dead_code)]

pub mod word_level;

use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::PathBuf;

/// `tests/fixtures/<name>`
pub fn fixture_dir(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// `expected.safetensors` of a fixture model, every tensor on the CPU.
pub fn expected_tensors(name: &str) -> HashMap<String, Tensor> {
    let path = fixture_dir(name).join("expected.safetensors");
    candle_core::safetensors::load(&path, &Device::Cpu).expect("fixture tensors")
}

/// `expected.json` of a fixture model.
pub fn expected_json(name: &str) -> serde_json::Value {
    let path = fixture_dir(name).join("expected.json");
    serde_json::from_str(&std::fs::read_to_string(path).expect("fixture json")).expect("json")
}

/// An int64 fixture tensor as u32 (ids) or as f32 (masks); `-100` entries stay -100 in the
/// i64 -> Vec conversion helpers below.
pub fn as_u32(t: &Tensor) -> Tensor {
    t.to_dtype(DType::I64)
        .unwrap()
        .to_dtype(DType::U32)
        .unwrap()
}

pub fn to_vec2_i64(t: &Tensor) -> Vec<Vec<i64>> {
    t.to_dtype(DType::I64).unwrap().to_vec2::<i64>().unwrap()
}

/// max |a - b| over all elements (shapes must match).
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shape mismatch");
    let a = a.to_dtype(DType::F32).unwrap().flatten_all().unwrap();
    let b = b.to_dtype(DType::F32).unwrap().flatten_all().unwrap();
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// max |t| over all elements.
pub fn max_abs(t: &Tensor) -> f32 {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .abs()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// Asserts max |a - b| <= tol with a readable message.
#[track_caller]
pub fn assert_close(what: &str, a: &Tensor, b: &Tensor, tol: f32) {
    let d = max_abs_diff(a, b);
    assert!(d <= tol, "{what}: max abs diff {d} > {tol}");
}

/// Suggested tolerances from tests/fixtures/README.md.
pub const TOL_LOGITS: f32 = 1e-4;
pub const TOL_HIDDEN: f32 = 2e-4;
pub const TOL_LOSS: f32 = 1e-5;
/// Relative to max |grad|.
pub const TOL_GRAD_REL: f32 = 1e-4;

/// A fresh temporary folder, removed when dropped.
pub fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir().expect("temporary folder")
}

/// Mean target-token NLL of `data` with no prompt (one batch).
pub fn mean_nll(m: &softprompt::load::Model, data: &[softprompt::batch::Example]) -> f64 {
    let batch = softprompt::batch::collate(data, m.backbone.info(), 0, &Device::Cpu).unwrap();
    softprompt::objective::target_nll(&m.backbone, None, &batch)
        .unwrap()
        .mean_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap() as f64
}
