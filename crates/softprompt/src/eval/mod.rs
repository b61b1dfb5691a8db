//! Evaluation: rank classification, greedy and beam generation, metrics, whole-split reports,
//! prompt ensembling, the prompt-design (k-shot) baseline and nearest-token inspection;
//! [`plan`], [`adapters`] and [`outcome`] are what `softprompt eval` runs.
pub mod adapters;
pub mod classify;
pub mod generate;
pub mod metrics;
pub mod beam;
pub mod ensemble;
pub mod inspect;
pub mod outcome;
pub mod plan;
pub mod prompt_design;
pub mod report;
