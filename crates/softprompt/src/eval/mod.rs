//! Evaluation: generation (and, to come, rank classification, metrics, ensembling).
pub mod classify;
pub mod generate;
pub mod metrics;
