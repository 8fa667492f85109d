//! The generator as a [`Trainable`] for the distributed runtime: the single-process recipe of
//! [`crate::train`] (reference AdamW groups, clipping, EMA, lr schedule, latent prep) driven one
//! coordinator step at a time.
//!
//! Gradients live in a [`GradAccumulator`] whose every entry is materialised (zeros) before the
//! first micro-batch, so each rank hands the bucketed all-reduce the same layout. Optimizer
//! moments are created up front as zeros (what AdamW would create lazily), so the state layout
//! is fixed from step 0 and a newcomer can receive it by broadcast. The step counters (for the lr
//! schedule and the AdamW bias corrections) come from the coordinator's assignment, not from
//! state, so nothing but tensors needs to travel.
//!
//! Randomness: each micro-batch is seeded with `derive_seed(seed, step, first sample index)`.
//! The schedule splits a step into the same contiguous micro-batches whatever the world size
//! whenever `global_batch` is a multiple of `world_size * micro_batch` (2 ranks x micro-batch 4
//! and 1 rank accumulating 2 x 4 compute the same micro-batches), and then the draws, and so the
//! update, do not depend on which rank ran which micro-batch, up to the order of float sums.

use super::trainable::Trainable;
use crate::device::parse_device;
use crate::train::generator::GeneratorTrainModel;
use crate::train::setup::{batch_source, resolve_model, trainer_config, GENERATOR_JSON};
use crate::train::source::BatchSource;
use crate::train::{GradAccumulator, Progress, Trainer};
use anyhow::{ensure, Context, Result};
use eqim_common::config::load_config;
use eqim_common::train_config::GeneratorTrainConfig;
use std::path::{Path, PathBuf};
use tch::{Device, Tensor};
use tracing::info;

/// File names of the exported weights (for `eqim sample-tokens --weights`).
pub const EXPORT_EMA: &str = "generator-ema.safetensors";
pub const EXPORT_LIVE: &str = "generator.safetensors";

/// Command-line values that replace those of a training config.
#[derive(Debug, Clone, Default)]
pub struct ConfigOverrides {
    /// `device` (cpu, cuda, cuda:N, auto).
    pub device: Option<String>,
    /// `[model] precision`.
    pub precision: Option<crate::precision::Precision>,
}

pub struct GeneratorTrainable {
    trainer: Trainer<GeneratorTrainModel>,
    source: Box<dyn BatchSource>,
    model_cfg: crate::model::generator::GeneratorConfig,
    device: Device,
    /// Samples per optimizer step the config was written for (`optim.batch`).
    global_batch: u64,
    /// Steps of an epoch as the coordinator counts them (the short last step included).
    steps_per_epoch: u64,
    acc: GradAccumulator,
    /// Step and epoch of the step being computed (from the assignment).
    step: u64,
    epoch: u64,
    config_path: PathBuf,
    /// What the last update reported, for the metrics.
    last_update: Option<crate::metrics::UpdateReport>,
    phase_times: super::trainable::PhaseTimes,
}

impl GeneratorTrainable {
    /// Builds the generator, its optimizer state and the data source from a training config
    /// (`eqim train-generator`'s format). The overrides replace the config's `device` and
    /// `[model] precision`.
    pub fn from_config_file(path: &Path, overrides: &ConfigOverrides) -> Result<Self> {
        let cfg: GeneratorTrainConfig = load_config(path)
            .with_context(|| format!("reading the training config {}", path.display()))?;
        // The config's thread count holds for every process that trains it, so a run is
        // bitwise reproducible whichever entry point starts it.
        if let Some(n) = cfg.threads {
            tch::set_num_threads(n as i32);
        }
        let mut model_cfg =
            resolve_model(&cfg.model).with_context(|| format!("config file {}", path.display()))?;
        if let Some(precision) = overrides.precision {
            model_cfg.precision = precision;
        }
        let device = parse_device(overrides.device.as_deref().unwrap_or(&cfg.device))?;
        let (source, prep) = batch_source(&cfg, &model_cfg)
            .with_context(|| format!("the [data] of {}", path.display()))?;
        let model = GeneratorTrainModel::new(&model_cfg, device, cfg.seed)?.with_prep(prep);
        let mut trainer = Trainer::new(model, trainer_config(&cfg))?;
        {
            let _no_grad = tch::no_grad_guard();
            let opt = &mut trainer.optimizer;
            for (i, param) in trainer.params.tensors.iter().enumerate() {
                opt.exp_avg[i] = Some(param.detach().zeros_like());
                opt.exp_avg_sq[i] = Some(param.detach().zeros_like());
            }
        }
        let global_batch = cfg.optim.batch;
        ensure!(global_batch > 0, "optim.batch must be at least 1");
        let steps_per_epoch = eqim_common::schedule::steps_per_epoch(source.len(), global_batch);
        let acc = trainer.accumulator();
        Ok(Self {
            trainer,
            source,
            model_cfg,
            device,
            global_batch,
            steps_per_epoch,
            acc,
            step: 0,
            epoch: 0,
            config_path: path.to_owned(),
            last_update: None,
            phase_times: Default::default(),
        })
    }

    /// Samples the data source holds (the coordinator's `dataset_len` must equal it).
    pub fn dataset_len(&self) -> u64 {
        self.source.len()
    }

    /// Trainable parameters of the generator.
    pub fn parameter_count(&self) -> usize {
        self.trainer.params.numel()
    }

    /// The device the generator trains on.
    pub fn device(&self) -> Device {
        self.device
    }

    pub fn model_config(&self) -> &crate::model::generator::GeneratorConfig {
        &self.model_cfg
    }
}

impl Trainable for GeneratorTrainable {
    fn parameters(&self) -> Vec<Tensor> {
        self.trainer
            .params
            .tensors
            .iter()
            .map(Tensor::shallow_clone)
            .collect()
    }

    fn gradients(&self) -> Vec<Tensor> {
        self.acc
            .grads
            .iter()
            .map(|g| g.as_ref().map_or_else(Tensor::new, Tensor::shallow_clone))
            .collect()
    }

    fn zero_grads(&mut self) -> Result<()> {
        self.acc = self.trainer.accumulator();
        self.acc.materialize_missing(&self.trainer.params);
        Ok(())
    }

    fn begin_step(&mut self, step: u64, epoch: u64) -> Result<()> {
        self.step = step;
        self.epoch = epoch;
        Ok(())
    }

    fn accumulate_grads(&mut self, indices: &[u64], step_samples: u64) -> Result<f64> {
        let Some(&first) = indices.first() else {
            return Ok(0.0);
        };
        ensure!(step_samples > 0, "a step with samples has step_samples 0");
        ensure!(
            step_samples <= self.global_batch,
            "the coordinator's step has {step_samples} samples but {} sets optim.batch = {}: make schedule.global_batch equal to optim.batch",
            self.config_path.display(),
            self.global_batch
        );
        let len = self.source.len();
        if let Some(&bad) = indices.iter().find(|&&i| i >= len) {
            anyhow::bail!(
                "sample {bad} assigned but the data of {} has {len} rows: make the coordinator's schedule.dataset_len equal to {len}",
                self.config_path.display()
            );
        }
        let fetching = std::time::Instant::now();
        let batch = self
            .source
            .fetch(self.epoch, indices)?
            .to_device(self.device);
        // The trainer times its forward passes in the accumulator (see take_phase_times).
        self.phase_times.data_wait += fetching.elapsed();
        let rows = batch.rows();
        // The trainer seeds the micro-batch from its progress step and the slot.
        self.trainer.progress.step = self.step;
        let weight = rows as f64 / step_samples as f64;
        let mean = self
            .trainer
            .accumulate(&mut self.acc, &batch, first, weight)?;
        Ok(mean * rows as f64)
    }

    fn apply_step(&mut self) -> Result<()> {
        let batch_in_epoch = self
            .step
            .saturating_sub(self.epoch * self.steps_per_epoch)
            .min(self.steps_per_epoch.saturating_sub(1));
        self.trainer.progress = Progress {
            step: self.step,
            epoch: self.epoch,
            batch_in_epoch,
            samples_seen: 0,
        };
        // Every parameter gets a (possibly zero) gradient every step, so each one has taken
        // exactly `step` AdamW steps before this one.
        for count in &mut self.trainer.optimizer.steps {
            *count = self.step;
        }
        let acc = std::mem::replace(&mut self.acc, self.trainer.accumulator());
        let report = self.trainer.apply(acc, self.steps_per_epoch)?;
        info!(
            step = report.step,
            epoch = report.epoch,
            loss = report.loss,
            lr = report.lr,
            grad_norm = report.grad_norm,
            "generator step"
        );
        self.last_update = Some(crate::metrics::UpdateReport {
            learning_rate: report.lr,
            grad_norm: report.grad_norm,
            // `Trainer::apply` updates the EMA in every step, right after the optimizer.
            ema_lag_steps: Some(0),
        });
        Ok(())
    }

    fn last_update(&self) -> Option<crate::metrics::UpdateReport> {
        self.last_update
    }

    fn take_phase_times(&mut self) -> super::trainable::PhaseTimes {
        let mut times = std::mem::take(&mut self.phase_times);
        times.forward = std::mem::take(&mut self.acc.forward_time);
        times
    }

    fn state_tensors(&self) -> Vec<(String, Tensor)> {
        let t = &self.trainer;
        let names = &t.params.names;
        let mut state: Vec<(String, Tensor)> = names
            .iter()
            .zip(&t.params.tensors)
            .map(|(n, p)| (format!("model.{n}"), p.shallow_clone()))
            .collect();
        state.extend(
            names
                .iter()
                .zip(&t.ema.shadow)
                .map(|(n, e)| (format!("ema.{n}"), e.shallow_clone())),
        );
        for (prefix, moments) in [
            ("exp_avg", &t.optimizer.exp_avg),
            ("exp_avg_sq", &t.optimizer.exp_avg_sq),
        ] {
            state.extend(names.iter().zip(moments).map(|(n, m)| {
                (
                    format!("{prefix}.{n}"),
                    m.as_ref()
                        .expect("moments are created in from_config_file")
                        .shallow_clone(),
                )
            }));
        }
        state
    }

    fn export(&self, dir: &Path) -> Result<Vec<PathBuf>> {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating the export directory {}", dir.display()))?;
        let names = &self.trainer.params.names;
        let ema = dir.join(EXPORT_EMA);
        crate::model::weights::write_safetensors_atomic(
            &self.trainer.ema.to_named_cpu(names),
            &ema,
        )
        .with_context(|| format!("writing {}", ema.display()))?;
        let live = dir.join(EXPORT_LIVE);
        crate::model::weights::write_safetensors_atomic(&self.trainer.params.to_named_cpu(), &live)
            .with_context(|| format!("writing {}", live.display()))?;
        let json = dir.join(GENERATOR_JSON);
        eqim_common::files::write_json_atomic(&json, &self.model_cfg)?;
        Ok(vec![ema, live, json])
    }
}
