//! softprompt: prompt tuning (Lester, Al-Rfou & Constant 2021) on frozen language models.
//!
//! The library is organised along the one path every feature walks:
//! [`load`] a frozen [`model`], tokenize with [`tokenizer`], prepend a [`prompt`], and run
//! forwards (scoring, generation) or backwards (training).

// No panics on user input: `unwrap`/`expect` are errors in library code (tests may use them).
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod batch;
pub mod chat;
pub mod decode;
pub mod error;
pub mod eval;
pub mod fetch;
pub mod fsutil;
pub(crate) mod kernels;
pub mod load;
pub mod model;
pub mod objective;
pub mod prompt;
pub mod recipe;
pub mod task;
pub mod tokenizer;
pub mod train;

pub use error::{Error, Result};

// The names most programs need, at the crate root; the modules hold the rest.
pub use load::{load_model, Model};
pub use model::{Arch, Backbone, CausalLm, Kernels, KvCache, LogitsAt, ModelInfo, Seq2SeqLm};
pub use prompt::{PeftAdapter, PromptInit, SoftPrompt};
pub use task::{TaskMeta, TextPair};
pub use tokenizer::Tokenizer;
pub use train::{train, SelectBy, TrainConfig, TrainReport};

/// The word-level tokenizer of the test fixtures, shared with the integration tests.
#[cfg(test)]
#[path = "../tests/common/word_level.rs"]
pub(crate) mod test_word_level;
