//! The training step of the generator, by the reference recipe
//! (<https://github.com/drx-code/EquivariantModeling/blob/main/generator/engine_generator.py>):
//! AdamW with the reference's two parameter groups, total grad norm and clipping, EMA of the
//! weights, the per-iteration warm-up schedule and gradient accumulation. Every run drives it
//! through the runtime (`crate::runtime`: one rank for `eqim train-generator`, many in a
//! cluster), which owns the data order, checkpoints and resume.
//!
//! The step is split in two halves so that data-parallel training and step commits fit between
//! them: [`Trainer::accumulate`] runs forward and backward on micro-batches into a
//! [`GradAccumulator`] (gradients are owned here, never left in `.grad`), and
//! [`Trainer::apply`] clips, steps the optimizer, updates the EMA and advances the progress.
//! An all-reduce of the accumulated gradients goes between the two.
//!
//! Randomness: every random draw of a micro-batch (flow noise and t, label drop, RoPE shift,
//! dropout) comes from libtorch's global generators, re-seeded before each micro-batch with a
//! seed derived from (run seed, step, micro-batch slot); see [`rng`]. Nothing else is random, so
//! the state to save is the weights, EMA, optimizer moments and counters: no generator state.

pub mod clip;
pub mod ema;
pub mod generator;
pub mod optim;
pub mod params;
pub mod progress;
pub mod rng;
pub mod schedule;
pub mod setup;
pub mod source;
pub mod trainer;

pub use clip::{clip_grad_norm, total_grad_norm};
pub use ema::Ema;
pub use optim::{AdamW, AdamWConfig};
pub use params::NamedParams;
pub use progress::Progress;
pub use schedule::{LrSchedule, ScheduleKind};
pub use source::{Batch, BatchSource};
pub use trainer::{GradAccumulator, StepReport, TrainModel, Trainer, TrainerConfig};

/// Errors of the training core.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("trainable variable #{index} of the var store has no name (was it added twice?)")]
    UnnamedVariable { index: usize },
    #[error("gradient list has {got} entries but the model has {want} parameters")]
    GradCount { got: usize, want: usize },
    #[error("non-finite loss {loss} at step {step}: stopping (lower the lr or check the data)")]
    NonFiniteLoss { loss: f64, step: u64 },
    #[error("checkpoint {path}: {message}")]
    Checkpoint { path: String, message: String },
    #[error(transparent)]
    Torch(#[from] tch::TchError),
}
