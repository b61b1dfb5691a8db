//! Training: one step loop (`step_loop`) of which prompt tuning ([`trainer`]), P-tuning
//! ([`p_tuning()`]) and model tuning ([`model_tuning()`]) are configurations, and what they share:
//! the run's configuration (`config`), data checks and order (`data`), dev evaluation
//! (`dev_eval`), identity (`run_id`), state and checkpoints ([`checkpoint`], `run_state`),
//! metrics, plot and exports (`export`); optimisers and schedules; data-parallel ranks
//! ([`parallel`], engines [`mpi`](self) and `nccl` behind their features).
mod baseline;
pub mod checkpoint;
mod config;
mod data;
mod dev_eval;
mod export;
pub mod metrics;
pub mod model_tuning;
#[cfg(feature = "mpi")]
pub mod mpi;
#[cfg(feature = "nccl")]
pub mod nccl;
pub mod optim;
mod p_tuning;
pub mod parallel;
pub(crate) mod plot;
mod run_id;
mod run_state;
pub mod schedule;
mod step_loop;
pub mod trainer;

pub use config::{SelectBy, TrainConfig};
pub use parallel::{Collective, Parallel};
pub use model_tuning::{model_tuning, p_tuning, BaselineReport};
pub use trainer::{train, TrainReport};
