//! Training: optimisers, schedules, the loop, checkpoints.
pub mod checkpoint;
pub mod metrics;
pub mod model_tuning;
pub mod optim;
pub mod plot;
pub mod schedule;
pub mod trainer;

pub use trainer::{train, TrainConfig, TrainReport};
pub use model_tuning::{model_tuning, p_tuning, BaselineReport};
