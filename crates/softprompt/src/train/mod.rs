//! Training: one step loop ([`step_loop`]) of which prompt tuning ([`trainer`]), P-tuning
//! ([`p_tuning`]) and model tuning ([`model_tuning`]) are configurations; the run's
//! configuration, data, dev evaluation, identity, checkpoints, metrics, plot and exports;
//! optimisers and schedules.
pub mod checkpoint;
pub mod config;
pub mod data;
pub mod dev_eval;
pub mod export;
pub mod metrics;
pub mod model_tuning;
pub mod optim;
pub mod p_tuning;
pub mod plot;
pub(crate) mod run_id;
pub(crate) mod run_state;
pub mod schedule;
pub(crate) mod step_loop;
pub mod trainer;

pub use config::{SelectBy, TrainConfig};
pub use model_tuning::{model_tuning, BaselineReport};
pub use p_tuning::p_tuning;
pub use trainer::{train, TrainReport};
