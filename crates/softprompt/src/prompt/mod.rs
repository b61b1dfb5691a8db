//! Soft prompts: the trainable `[N, D]` matrix prepended to the input embeddings.
pub mod peft;
