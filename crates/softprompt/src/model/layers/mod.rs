//! Owned layers, built once at load time from the weights and run with the model's
//! [`Kernels`](crate::kernels::Kernels) policy. Each layer is the one place that picks how it
//! runs: a fused kernel of [`crate::kernels`] where it applies, the composite ops of
//! [`super::ops`] (the readable reference) otherwise, and the KV cache path when decoding.

mod attention;
mod embedding;
mod feed_forward;
mod linear;
mod norm;

#[cfg(test)]
mod tests;

pub use attention::{
    Attention, AttentionContext, AttentionOptions, HeadNorms, Rotary, SlidingContext,
};
pub use embedding::{Embedding, LmHead};
pub use feed_forward::{FeedForward, FfnInner};
pub use linear::Linear;
pub use norm::Norm;
