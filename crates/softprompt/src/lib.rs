//! softprompt: prompt tuning (Lester, Al-Rfou & Constant 2021) on frozen language models.
//!
//! The library is organised along the one path every feature walks:
//! [`load`] a frozen [`model`], tokenize with [`tokenizer`], prepend a [`prompt`], and run
//! forwards (scoring, generation) or backwards (training).

pub mod error;
pub mod load;
pub mod model;
pub mod prompt;
pub mod tokenizer;

pub use error::{Error, Result};
