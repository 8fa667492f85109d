//! `eqim bench-step` (hidden; `scripts/gpu-check` runs it): times the generator's training step
//! (forward + backward alone, then the whole [`Trainer`] step: AdamW, clipping, EMA) and KV-cached
//! sampling for a preset on one device in one precision, with the peak memory of the step (the
//! CUDA caching allocator's peaks, or the process's peak RSS on the CPU) and, for bf16, the max
//! difference of the sampled tokens from fp32 sampling on the same weights and noise.
//! Weights are random (`randn * 0.02`): timing does not depend on their values.

use crate::collective::autocast::cuda_memory_stats;
use crate::model::generator::{GeneratorConfig, Mode};
use crate::precision::Precision;
use crate::sampling::{sample_cached, seeded_noise, CfgSchedule, SampleSpec};
use crate::train::generator::GeneratorTrainModel;
use crate::train::{AdamWConfig, Batch, LrSchedule, ScheduleKind, Trainer, TrainerConfig};
use anyhow::{ensure, Context, Result};
use std::time::Instant;
use tch::{Device, Kind, Tensor};

/// What to measure.
#[derive(Debug, Clone)]
pub struct BenchStepOptions {
    /// The model (its `precision` is the one measured).
    pub model: GeneratorConfig,
    /// A name for the report (the preset's).
    pub model_name: String,
    pub batch: i64,
    pub device: Device,
    /// Timed steps (and forward + backward passes) after `warmup` untimed ones.
    pub steps: usize,
    pub warmup: usize,
    /// Images per sampling batch; 0 skips sampling.
    pub sample_batch: i64,
    /// Euler steps per token when sampling.
    pub sample_steps: i64,
    pub seed: u64,
}

/// The measurements, as `scripts/gpu-check` stores them.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BenchStepReport {
    pub model: String,
    pub precision: Precision,
    pub device: String,
    pub parameters: i64,
    pub batch: i64,
    pub tokens: i64,
    /// Median seconds of forward + backward (the PyTorch baseline's workload).
    pub fwd_bwd_seconds: f64,
    pub fwd_bwd_images_per_second: f64,
    /// Median seconds of a whole optimizer step.
    pub step_seconds: f64,
    pub step_images_per_second: f64,
    pub loss_first: f64,
    pub loss_last: f64,
    /// CUDA: the caching allocator's peak bytes over the timed steps.
    pub peak_allocated_bytes: Option<i64>,
    pub peak_reserved_bytes: Option<i64>,
    /// CPU: the process's peak RSS (VmHWM) over the timed steps.
    pub peak_rss_bytes: Option<u64>,
    pub sample_batch: i64,
    pub sample_steps: i64,
    pub sample_images_per_second: Option<f64>,
    /// bf16 only: max |tokens(bf16) - tokens(fp32)| on the same weights and noise.
    pub sample_max_abs_diff_vs_fp32: Option<f64>,
    /// bf16 only: the same over max |tokens(fp32)|.
    pub sample_rel_diff_vs_fp32: Option<f64>,
}

fn sync(device: Device) {
    if let Device::Cuda(index) = device {
        tch::Cuda::synchronize(index as i64);
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Resets the process's peak RSS (VmHWM) to its current RSS (Linux `clear_refs` value 5).
pub fn reset_peak_rss() -> Result<()> {
    std::fs::write("/proc/self/clear_refs", "5").context("resetting the peak RSS via /proc")
}

/// The process's peak RSS in bytes (VmHWM of /proc/self/status).
pub fn peak_rss_bytes() -> Result<u64> {
    status_kib("VmHWM:").map(|k| k * 1024)
}

/// The process's current RSS in bytes (VmRSS).
pub fn rss_bytes() -> Result<u64> {
    status_kib("VmRSS:").map(|k| k * 1024)
}

fn status_kib(key: &str) -> Result<u64> {
    let status = std::fs::read_to_string("/proc/self/status").context("reading /proc")?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .with_context(|| format!("no {key} line in /proc/self/status"))
}

fn trainer_config(seed: u64) -> TrainerConfig {
    TrainerConfig {
        optim: AdamWConfig::default(),
        schedule: LrSchedule {
            lr: 1e-4,
            warmup_epochs: 0.0,
            kind: ScheduleKind::Constant,
            min_lr: 1e-4,
            epochs: 1.0,
        },
        clip_grad: Some(3.0),
        ema_rate: 0.9999,
        seed,
    }
}

/// A batch of random latents with labels 0, 1, ... mod the class count.
fn random_batch(opts: &BenchStepOptions) -> Batch {
    let (cfg, device) = (&opts.model, opts.device);
    Batch {
        latents: Tensor::randn(
            [opts.batch, cfg.token_num, cfg.vae_embed_dim],
            (Kind::Float, device),
        ),
        labels: Tensor::arange(opts.batch, (Kind::Int64, device)).remainder(cfg.class_num),
    }
}

/// Forward + backward only, gradients dropped (what the PyTorch baseline times): the timed
/// passes' seconds.
fn time_fwd_bwd(
    trainer: &mut Trainer<GeneratorTrainModel>,
    opts: &BenchStepOptions,
) -> Result<Vec<f64>> {
    let mut fwd_bwd = Vec::new();
    for i in 0..opts.warmup + opts.steps {
        let b = random_batch(opts);
        sync(opts.device);
        let start = Instant::now();
        let out = trainer
            .model
            .model
            .forward_loss(&b.latents, &b.labels, None, Mode::Train)?;
        let grads = Tensor::f_run_backward(&[&out.loss], &trainer.params.tensors, false, false)
            .context("backward pass")?;
        sync(opts.device);
        drop(grads);
        if i >= opts.warmup {
            fwd_bwd.push(start.elapsed().as_secs_f64());
        }
    }
    Ok(fwd_bwd)
}

/// Whole optimizer steps, with the peak memory over the timed ones (the optimizer state is
/// allocated by then).
struct StepTimes {
    seconds: Vec<f64>,
    losses: Vec<f64>,
    peak_allocated: Option<i64>,
    peak_reserved: Option<i64>,
    peak_rss: Option<u64>,
}

fn time_steps(
    trainer: &mut Trainer<GeneratorTrainModel>,
    opts: &BenchStepOptions,
) -> Result<StepTimes> {
    let device = opts.device;
    let (mut seconds, mut losses) = (Vec::new(), Vec::new());
    for i in 0..opts.warmup + opts.steps {
        if i == opts.warmup {
            match device {
                Device::Cuda(index) => {
                    cuda_memory_stats(index, true)?;
                }
                _ => reset_peak_rss()?,
            }
        }
        let b = random_batch(opts);
        sync(device);
        let start = Instant::now();
        let report = trainer.train_step(&[b], 1_000_000)?;
        sync(device);
        if i >= opts.warmup {
            seconds.push(start.elapsed().as_secs_f64());
            losses.push(report.loss);
        }
    }
    let (peak_allocated, peak_reserved, peak_rss) = match device {
        Device::Cuda(index) => {
            let s = cuda_memory_stats(index, false)?;
            (Some(s.allocated_peak), Some(s.reserved_peak), None)
        }
        _ => (None, None, Some(peak_rss_bytes()?)),
    };
    Ok(StepTimes {
        seconds,
        losses,
        peak_allocated,
        peak_reserved,
        peak_rss,
    })
}

/// KV-cached sampling: images/s, and in bf16 the max abs and relative difference from fp32.
fn time_sampling(
    model: &mut crate::model::generator::EquivariantGenerativeModel,
    opts: &BenchStepOptions,
) -> Result<(f64, Option<f64>, Option<f64>)> {
    let (cfg, device, tokens) = (&opts.model, opts.device, opts.model.token_num);
    let labels = Tensor::arange(opts.sample_batch, (Kind::Int64, device)).remainder(cfg.class_num);
    let spec = SampleSpec {
        batch: opts.sample_batch,
        labels: Some(&labels),
        prefix: None,
        num_iter: tokens,
        cfg: 4.0,
        cfg_schedule: CfgSchedule::Linear,
        num_steps: opts.sample_steps,
        temperature: 1.0,
    };
    let sample = |model: &crate::model::generator::EquivariantGenerativeModel| {
        let mut noise = seeded_noise(1, tokens, opts.sample_batch, cfg.vae_embed_dim);
        sync(device);
        let start = Instant::now();
        let out = sample_cached(model, &spec, &mut noise, &mut |_| {});
        sync(device);
        out.map(|t| (t, start.elapsed().as_secs_f64()))
    };
    let _warm = sample(model)?;
    let (tokens_here, seconds) = sample(model)?;
    let ips = opts.sample_batch as f64 / seconds;
    if cfg.precision.is_fp32() {
        return Ok((ips, None, None));
    }
    model.cfg.precision = Precision::Fp32;
    let (reference, _) = sample(model)?;
    model.cfg.precision = cfg.precision;
    let diff = crate::verify::max_abs_diff(&tokens_here, &reference)?;
    let scale = reference.abs().max().double_value(&[]);
    Ok((ips, Some(diff), Some(diff / scale.max(f64::MIN_POSITIVE))))
}

/// Builds the model with random weights and measures it.
pub fn run(opts: &BenchStepOptions) -> Result<BenchStepReport> {
    ensure!(opts.batch >= 1, "--batch must be at least 1");
    ensure!(opts.steps >= 1, "--steps must be at least 1");
    let cfg = &opts.model;
    let device = opts.device;
    let train_model = GeneratorTrainModel::new(cfg, device, opts.seed)?;
    tch::manual_seed(opts.seed as i64);
    tch::no_grad(|| {
        for (_, mut v) in train_model.vs.variables() {
            let r = Tensor::randn(v.size(), (Kind::Float, device)) * 0.02;
            v.copy_(&r);
        }
    });
    let mut trainer = Trainer::new(train_model, trainer_config(opts.seed))?;
    let tokens = cfg.token_num;
    let fwd_bwd = time_fwd_bwd(&mut trainer, opts)?;
    let steps = time_steps(&mut trainer, opts)?;
    let (step_times, losses) = (steps.seconds, steps.losses);
    let (peak_allocated, peak_reserved, peak_rss) =
        (steps.peak_allocated, steps.peak_reserved, steps.peak_rss);
    let (sample_ips, max_diff, rel_diff) = if opts.sample_batch > 0 {
        let (ips, max, rel) = time_sampling(&mut trainer.model.model, opts)?;
        (Some(ips), max, rel)
    } else {
        (None, None, None)
    };

    let fwd_bwd_seconds = median(fwd_bwd);
    let step_seconds = median(step_times);
    Ok(BenchStepReport {
        model: opts.model_name.clone(),
        precision: cfg.precision,
        device: format!("{device:?}"),
        parameters: cfg.parameter_count(),
        batch: opts.batch,
        tokens,
        fwd_bwd_seconds,
        fwd_bwd_images_per_second: opts.batch as f64 / fwd_bwd_seconds,
        step_seconds,
        step_images_per_second: opts.batch as f64 / step_seconds,
        loss_first: losses.first().copied().unwrap_or(f64::NAN),
        loss_last: losses.last().copied().unwrap_or(f64::NAN),
        peak_allocated_bytes: peak_allocated,
        peak_reserved_bytes: peak_reserved,
        peak_rss_bytes: peak_rss,
        sample_batch: opts.sample_batch,
        sample_steps: opts.sample_steps,
        sample_images_per_second: sample_ips,
        sample_max_abs_diff_vs_fp32: max_diff,
        sample_rel_diff_vs_fp32: rel_diff,
    })
}
