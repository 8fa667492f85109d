//! One optimizer step of the reference's training loop, split at the gradient so that an
//! all-reduce and a step commit fit in between:
//! [`Trainer::accumulate`] (forward + backward of a micro-batch, gradients summed into a
//! [`GradAccumulator`]) then [`Trainer::apply`] (lr from the schedule at the current epoch
//! fraction, total grad norm and clipping, AdamW, EMA, progress).
//!
//! Data-parallel use: split the global batch into micro-batch slots `0..G`; each rank runs
//! `accumulate(acc, batch_k, k, rows_k / global_rows)` for its slots, calls
//! [`GradAccumulator::materialize_missing`], all-reduces the gradients with a plain sum (the
//! weights already make it the global mean), and calls [`Trainer::apply`] once the step is
//! committed. Because the random draws of slot `k` depend only on (seed, step, k), the result
//! does not depend on how slots are spread over ranks, up to the order of float sums.

use super::clip::{clip_grad_norm, total_grad_norm};
use super::ema::Ema;
use super::optim::{AdamW, AdamWConfig};
use super::params::NamedParams;
use super::progress::Progress;
use super::rng;
use super::schedule::LrSchedule;
use super::source::Batch;
use super::TrainError;
use anyhow::{Context, Result};
use tch::{nn, Tensor};

/// A model the trainer can optimise.
pub trait TrainModel {
    /// The variables to train (all trainable variables of this store).
    fn var_store(&self) -> &nn::VarStore;

    /// The mean loss of one micro-batch, a scalar with autograd history. Its random draws must
    /// come from libtorch's global generators (seeded by the trainer before the call).
    fn loss(&self, batch: &Batch) -> Result<Tensor>;
}

/// Hyperparameters of a training run (the optimizer's learning rate comes from `schedule`).
#[derive(Debug, Clone)]
pub struct TrainerConfig {
    pub optim: AdamWConfig,
    pub schedule: LrSchedule,
    /// `clip_grad_norm_` threshold; `None` measures the norm without clipping.
    pub clip_grad: Option<f64>,
    pub ema_rate: f64,
    /// Seed from which every random draw of the run is derived ([`rng`]).
    pub seed: u64,
}

/// Gradients of one optimizer step summed over its micro-batches, aligned with the parameters.
#[derive(Debug)]
pub struct GradAccumulator {
    /// `None` for a parameter that received no gradient (the optimizer skips it).
    pub grads: Vec<Option<Tensor>>,
    /// Sum of `weight * loss` over the micro-batches.
    pub loss: f64,
    /// Samples accumulated.
    pub rows: u64,
    /// Time spent in the forward passes (up to the loss value being read), for the metrics.
    pub forward_time: std::time::Duration,
}

impl GradAccumulator {
    pub fn new(num_params: usize) -> Self {
        Self {
            grads: (0..num_params).map(|_| None).collect(),
            loss: 0.0,
            rows: 0,
            forward_time: std::time::Duration::ZERO,
        }
    }

    /// Gives every parameter without a gradient a zero one. Data-parallel ranks need this before
    /// flattening gradients into all-reduce buckets (every rank must send the same layout); the
    /// optimizer then treats those parameters as having a zero gradient instead of skipping them,
    /// as PyTorch DDP does.
    pub fn materialize_missing(&mut self, params: &NamedParams) {
        for (grad, param) in self.grads.iter_mut().zip(&params.tensors) {
            if grad.is_none() {
                *grad = Some(param.detach().zeros_like());
            }
        }
    }
}

/// What one optimizer step did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepReport {
    /// The step just taken (0 for the first).
    pub step: u64,
    pub epoch: u64,
    /// Weighted mean loss of the step's micro-batches.
    pub loss: f64,
    /// Total gradient norm before clipping.
    pub grad_norm: f64,
    pub lr: f64,
    pub rows: u64,
}

pub struct Trainer<M: TrainModel> {
    pub model: M,
    pub params: NamedParams,
    pub optimizer: AdamW,
    pub ema: Ema,
    pub cfg: TrainerConfig,
    pub progress: Progress,
}

impl<M: TrainModel> Trainer<M> {
    /// Starts training `model` from its current weights (EMA = weights, empty moments, step 0).
    pub fn new(model: M, cfg: TrainerConfig) -> Result<Self> {
        let params = NamedParams::from_var_store(model.var_store())?;
        let optimizer = AdamW::new(&params, cfg.optim);
        let ema = Ema::new(&params, cfg.ema_rate);
        Ok(Self {
            model,
            params,
            optimizer,
            ema,
            cfg,
            progress: Progress::default(),
        })
    }

    pub fn accumulator(&self) -> GradAccumulator {
        GradAccumulator::new(self.params.len())
    }

    /// Forward and backward of micro-batch `slot` (its index in the step's global batch), with
    /// its loss weighted by `weight` (its share of the global batch, so that the summed
    /// gradients are those of the global mean loss). Returns the unweighted loss.
    pub fn accumulate(
        &self,
        acc: &mut GradAccumulator,
        batch: &Batch,
        slot: u64,
        weight: f64,
    ) -> Result<f64> {
        let step = self.progress.step;
        let forward_started = std::time::Instant::now();
        let loss = rng::seeded(self.cfg.seed, step, slot, || self.model.loss(batch))?;
        // Reading the value waits for the device, so the forward time is complete.
        let value = loss.double_value(&[]);
        acc.forward_time += forward_started.elapsed();
        if !value.is_finite() {
            return Err(TrainError::NonFiniteLoss { loss: value, step }.into());
        }
        // Multiplying by exactly 1 changes nothing, but skipping it keeps the single-batch
        // graph identical to the reference's.
        let scaled = if weight == 1.0 { loss } else { loss * weight };
        let grads = Tensor::f_run_backward(&[&scaled], &self.params.tensors, false, false)
            .context("backward pass")?;
        let _guard = tch::no_grad_guard();
        for (slot, grad) in acc.grads.iter_mut().zip(grads) {
            if !grad.defined() {
                continue;
            }
            match slot {
                Some(sum) => {
                    let _summed = sum.g_add_(&grad);
                }
                None => *slot = Some(grad),
            }
        }
        acc.loss += weight * value;
        acc.rows += batch.rows() as u64;
        Ok(value)
    }

    /// The learning rate of the next step, `steps_per_epoch` being the optimizer steps of an
    /// epoch (the schedule advances by epoch fraction, as the reference's per-iteration one).
    pub fn next_lr(&self, steps_per_epoch: u64) -> f64 {
        let epoch = LrSchedule::epoch_fraction(
            self.progress.epoch,
            self.progress.batch_in_epoch,
            steps_per_epoch,
        );
        self.cfg.schedule.lr_at(epoch)
    }

    /// Clips the accumulated gradients, steps the optimizer, updates the EMA and advances the
    /// progress by one step.
    pub fn apply(&mut self, acc: GradAccumulator, steps_per_epoch: u64) -> Result<StepReport> {
        let GradAccumulator {
            mut grads,
            loss,
            rows,
            ..
        } = acc;
        let lr = self.next_lr(steps_per_epoch);
        let grad_norm = match self.cfg.clip_grad {
            Some(max_norm) => clip_grad_norm(&mut grads, max_norm),
            None => total_grad_norm(&grads).map_or(0.0, |n| n.double_value(&[])),
        };
        self.optimizer.step(&self.params, &grads, lr)?;
        self.ema.update(&self.params);
        let report = StepReport {
            step: self.progress.step,
            epoch: self.progress.epoch,
            loss,
            grad_norm,
            lr,
            rows,
        };
        self.progress.advance(steps_per_epoch, rows);
        Ok(report)
    }

    /// One whole step on one process: `micro_batches` together form the global batch.
    pub fn train_step(
        &mut self,
        micro_batches: &[Batch],
        steps_per_epoch: u64,
    ) -> Result<StepReport> {
        let total: i64 = micro_batches.iter().map(Batch::rows).sum();
        let mut acc = self.accumulator();
        for (slot, batch) in micro_batches.iter().enumerate() {
            let weight = batch.rows() as f64 / total as f64;
            self.accumulate(&mut acc, batch, slot as u64, weight)?;
        }
        self.apply(acc, steps_per_epoch)
    }
}
