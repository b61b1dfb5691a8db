//! Training: optimisers, schedules, the loop, checkpoints.
pub mod optim;
pub mod schedule;
