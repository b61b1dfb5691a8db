//! The kernels against the composite (candle-primitive) ops they replace. The fused
//! sub-blocks are checked against the composite layers in `model::layers::tests`.

mod elementwise;
mod frozen_matmul;

use candle_core::Tensor;

pub(crate) fn max_abs(t: &Tensor) -> f32 {
    t.abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap()
}

/// `max |got - want| <= rel * max |want|`.
pub(crate) fn assert_rel(what: &str, got: &Tensor, want: &Tensor, rel: f32) {
    assert_eq!(got.dims(), want.dims(), "{what}: shapes");
    let diff = max_abs(&(got - want).unwrap());
    let scale = max_abs(want).max(1e-6);
    assert!(
        diff <= rel * scale,
        "{what}: max abs diff {diff:e} > {rel:e} * max |ref| {scale:e}"
    );
}

/// `max |got - want| <= tol`.
pub(crate) fn assert_close(what: &str, got: &Tensor, want: &Tensor, tol: f32) {
    assert_eq!(got.dims(), want.dims(), "{what}: shapes");
    let d = max_abs(&(got - want).unwrap());
    assert!(d <= tol, "{what}: max abs diff {d} > {tol}");
}
