//! From a training config to a run: the `[model]` table, the trainer and data settings, the
//! data schedule, and the single-process run of `eqim train-generator --config FILE`, which
//! trains the generator on one process, as the only rank of the runtime's training path ([`crate::runtime::local`]): the coordinator's data schedule (one
//! epoch order, a short last step), the worker's step, accumulation, clipping, EMA, checkpoints
//! (`OUTPUT_DIR/checkpoints/step-NNNNNNNN/` with `job.json` and the sha256 manifest), resume,
//! ledger, metrics (`--metrics-addr`) and progress display, plus a JSON line every
//! `run.log_every` steps in `OUTPUT_DIR/train_log.jsonl`. At the end `OUTPUT_DIR` holds the
//! exported `generator-ema.safetensors`, `generator.safetensors` and `generator.json` (for
//! `eqim sample-tokens --weights W --config generator.json`). A run whose output directory holds
//! a verified checkpoint resumes from the newest one exactly.

use super::generator::LatentPrep;
use super::source::{BatchSource, CachedLatents, SyntheticLatents};
use super::trainer::TrainerConfig;
use super::{AdamWConfig, LrSchedule, ScheduleKind};
use crate::data::LatentCache;
use crate::model::generator::GeneratorConfig;
use crate::runtime::generator_trainable::GeneratorTrainable;
use crate::runtime::local::{self, LocalRun};
use anyhow::{bail, Context, Result};
use eqim_common::config::load_config;
use eqim_common::schedule::ScheduleConfig;
use eqim_common::train_config::{DataConfig, GeneratorTrainConfig, LrScheduleName};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tracing::{info, warn};

/// Where a run's checkpoints go inside `output_dir`.
pub const CHECKPOINTS_DIR: &str = "checkpoints";
/// The single-process state directory of eqim before the one training path; refused by name.
pub const OLD_CHECKPOINT_DIR: &str = "checkpoint-last";

/// What `eqim train-generator` runs.
#[derive(Debug, Clone)]
pub struct TrainGeneratorOptions {
    /// Training config (TOML or YAML), e.g. configs/generator-tiny.toml.
    pub config: PathBuf,
    /// Start from scratch: delete OUTPUT_DIR/checkpoints first (otherwise the newest verified
    /// checkpoint there is resumed).
    pub fresh: bool,
    /// Stop after this many steps in total (overrides run.max_steps).
    pub max_steps: Option<u64>,
    /// Hide the progress bar (log lines only).
    pub no_progress: bool,
    /// Compute precision of the forward and backward passes, overriding `[model] precision`
    /// (weights, optimizer, EMA, loss and gradient norm stay fp32).
    pub precision: Option<crate::precision::Precision>,
    /// Serve Prometheus `/metrics` here (e.g. `127.0.0.1:9101`), as `eqim worker` does.
    pub metrics_addr: Option<std::net::SocketAddr>,
}

/// The `[model]` table as a generator config: a `preset` (or the constructor defaults) with the
/// given constructor arguments on top. Unknown keys are refused by name.
pub fn resolve_model(
    table: &serde_json::Map<String, serde_json::Value>,
) -> Result<GeneratorConfig> {
    let base = match table.get("preset") {
        Some(serde_json::Value::String(name)) => {
            GeneratorConfig::preset(name).context("model.preset")?
        }
        Some(other) => bail!("model.preset must be a string, got {other}"),
        None => GeneratorConfig::default(),
    };
    let serde_json::Value::Object(mut fields) =
        serde_json::to_value(&base).context("serialising the generator config")?
    else {
        bail!("generator config did not serialise to a table");
    };
    for (key, value) in table.iter().filter(|(k, _)| *k != "preset") {
        if !fields.contains_key(key) {
            let mut known: Vec<&String> = fields.keys().collect();
            known.sort();
            bail!("model.{key} is not a generator argument (known: preset, {known:?})");
        }
        fields.insert(key.clone(), value.clone());
    }
    let cfg: GeneratorConfig = serde_json::from_value(serde_json::Value::Object(fields))
        .context("reading the [model] table")?;
    cfg.validate().context("the [model] table")?;
    Ok(cfg)
}

pub fn trainer_config(cfg: &GeneratorTrainConfig) -> TrainerConfig {
    let o = &cfg.optim;
    TrainerConfig {
        optim: AdamWConfig {
            beta1: o.betas[0],
            beta2: o.betas[1],
            eps: o.eps,
            weight_decay: o.weight_decay,
        },
        schedule: LrSchedule {
            lr: o.peak_lr(),
            warmup_epochs: o.warmup_epochs,
            kind: match o.schedule {
                LrScheduleName::Constant => ScheduleKind::Constant,
                LrScheduleName::Cosine => ScheduleKind::Cosine,
            },
            min_lr: o.min_lr,
            epochs: cfg.run.epochs as f64,
        },
        clip_grad: (o.clip_grad > 0.0).then_some(o.clip_grad),
        ema_rate: o.ema_rate,
        seed: cfg.seed,
    }
}

/// The configured data as a batch source, and how its latents are prepared for the generator.
/// A latent cache must fit the model: token channels = `vae_embed_dim`, labels < `class_num`.
pub fn batch_source(
    cfg: &GeneratorTrainConfig,
    model: &GeneratorConfig,
) -> Result<(Box<dyn BatchSource>, LatentPrep)> {
    Ok(match &cfg.data {
        DataConfig::Synthetic { samples, noise } => (
            Box::new(SyntheticLatents {
                samples: *samples,
                classes: model.class_num,
                tokens: model.token_num,
                channels: model.vae_embed_dim,
                noise: *noise,
                seed: cfg.seed,
            }),
            LatentPrep::IDENTITY,
        ),
        DataConfig::LatentCache {
            path,
            vae_norm,
            posterior_std,
        } => {
            let cache = LatentCache::open(path)?;
            if cache.channels() as i64 != model.vae_embed_dim {
                bail!(
                    "latent cache {} has {} channels per token but model.vae_embed_dim is {}",
                    path.display(),
                    cache.channels(),
                    model.vae_embed_dim
                );
            }
            if let Some(&bad) = cache
                .labels()
                .iter()
                .find(|&&l| l < 0 || l >= model.class_num)
            {
                bail!(
                    "latent cache {} has label {bad}, outside model.class_num {}: set class_num to the dataset's class count",
                    path.display(),
                    model.class_num
                );
            }
            if (cache.len() as u64) < cfg.optim.batch {
                bail!(
                    "latent cache {} has {} rows, fewer than one batch of {}",
                    path.display(),
                    cache.len(),
                    cfg.optim.batch
                );
            }
            let prep = LatentPrep {
                vae_norm: *vae_norm,
                posterior_std: (*posterior_std > 0.0).then_some(*posterior_std),
            };
            let source = CachedLatents {
                cache,
                seed: cfg.seed,
            };
            (Box::new(source), prep)
        }
    })
}

/// The resolved generator config, for `eqim sample-tokens --config` with the checkpoint's
/// `ema.safetensors` or `model.safetensors`.
pub const GENERATOR_JSON: &str = "generator.json";

/// The data schedule of a training config: the same one a coordinator gets from
/// `schedule:` when `dataset_len`, `global_batch`, `micro_batch`, `epochs` and `seed` are set to
/// these values.
pub fn schedule_of(cfg: &GeneratorTrainConfig, dataset_len: u64) -> ScheduleConfig {
    ScheduleConfig {
        dataset_len,
        global_batch: cfg.optim.batch,
        micro_batch: cfg.optim.micro_batch(),
        epochs: cfg.run.epochs as u32,
        seed: cfg.seed,
        checkpoint_every_steps: (cfg.run.checkpoint_every > 0).then_some(cfg.run.checkpoint_every),
    }
}

/// A directory from before the one training path is never silently ignored: refused with what
/// to do, or (with `--fresh`) named in a warning.
fn check_old_state(output_dir: &Path, fresh: bool) -> Result<()> {
    let old = output_dir.join(OLD_CHECKPOINT_DIR);
    if !old.exists() {
        return Ok(());
    }
    if fresh {
        warn!(dir = %old.display(), "ignoring a checkpoint of an older eqim train-generator (--fresh)");
        return Ok(());
    }
    bail!(
        "{} is a checkpoint of an older eqim train-generator, which this version cannot resume: \
         it trained on another data order and has no job state or manifest. Start over with \
         --fresh (it is left in place, unused), or move it away; its EMA weights \
         (ema.safetensors in it) still load in eqim sample-tokens",
        old.display()
    )
}

/// Runs `eqim train-generator`.
pub fn run(args: &TrainGeneratorOptions) -> Result<()> {
    let cfg: GeneratorTrainConfig = load_config(&args.config)?;
    if args.no_progress {
        std::env::set_var(crate::progress::NO_PROGRESS_ENV, "1");
    }
    std::fs::create_dir_all(&cfg.output_dir)
        .with_context(|| format!("creating output_dir {}", cfg.output_dir.display()))?;
    check_old_state(&cfg.output_dir, args.fresh)?;
    let checkpoint_root = cfg.output_dir.join(CHECKPOINTS_DIR);
    if args.fresh && checkpoint_root.exists() {
        std::fs::remove_dir_all(&checkpoint_root)
            .with_context(|| format!("removing {} (--fresh)", checkpoint_root.display()))?;
    }
    let overrides = crate::runtime::generator_trainable::ConfigOverrides {
        device: None,
        precision: args.precision,
    };
    let model = GeneratorTrainable::from_config_file(&args.config, &overrides)?;
    let schedule = schedule_of(&cfg, model.dataset_len());
    schedule
        .validate()
        .map_err(|(key, what)| anyhow::anyhow!("{}: {key} {what}", args.config.display()))?;
    let max_steps = args.max_steps.or(cfg.run.max_steps);
    let total = max_steps.map_or(schedule.total_steps(), |m| m.min(schedule.total_steps()));
    info!(
        params = model.parameter_count(),
        device = ?model.device(),
        samples = model.dataset_len(),
        steps_per_epoch = schedule.steps_per_epoch(),
        total_steps = total,
        batch = schedule.global_batch,
        micro_batch = schedule.micro_batch,
        peak_lr = cfg.optim.peak_lr(),
        "training the generator"
    );
    let (metrics, _metrics_server) =
        crate::metrics::worker_metrics("train-generator", args.metrics_addr)?;
    let trainer = crate::runtime::trainer::TrainerConfig {
        host: "127.0.0.1".into(),
        collective_timeout: Duration::from_secs(10),
        final_state: None,
        checkpoint_root,
        metrics: Some(metrics),
        export_dir: Some(cfg.output_dir.clone()),
        progress_total: Some(total),
        step_log: Some(crate::runtime::trainer::StepLogConfig {
            path: cfg.output_dir.join("train_log.jsonl"),
            every: cfg.run.log_every,
        }),
    };
    let summary = local::run(
        model,
        LocalRun {
            schedule,
            max_steps,
            trainer,
        },
    )?;
    for coverage in summary.ledger.summary() {
        info!("ledger {coverage}");
    }
    info!(
        steps = summary.steps,
        run_now = summary.steps_run,
        resumed_from = ?summary.resumed_from,
        checkpoint = ?summary.last_checkpoint,
        "training finished"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(json: serde_json::Value) -> serde_json::Map<String, serde_json::Value> {
        json.as_object().unwrap().clone()
    }

    #[test]
    fn presets_take_overrides_and_unknown_keys_are_named() {
        let cfg = resolve_model(&table(
            serde_json::json!({"preset": "large", "class_num": 30}),
        ))
        .unwrap();
        assert_eq!(cfg.encoder_embed_dim, 1024);
        assert_eq!(cfg.class_num, 30);
        let err = resolve_model(&table(
            serde_json::json!({"preset": "large", "clas_num": 30}),
        ))
        .unwrap_err();
        assert!(format!("{err:#}").contains("model.clas_num"), "{err:#}");
        let err = resolve_model(&table(serde_json::json!({"preset": "giant"}))).unwrap_err();
        assert!(format!("{err:#}").contains("giant"), "{err:#}");
        let err = resolve_model(&table(serde_json::json!({"encoder_num_heads": 7}))).unwrap_err();
        assert!(format!("{err:#}").contains("encoder_num_heads"), "{err:#}");
    }
}
