//! Evaluation: generation (and, to come, rank classification, metrics, ensembling).
pub mod generate;
