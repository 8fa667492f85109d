//! `eqim train-generator --config FILE`: trains the generator on one process by the reference
//! recipe, with a progress bar, a log line every `run.log_every` steps (loss, lr, grad norm,
//! images/s, also appended to `OUTPUT_DIR/train_log.jsonl`) and `OUTPUT_DIR/checkpoint-last/`
//! written every `run.checkpoint_every` steps and at the end; `OUTPUT_DIR/generator.json` is the
//! resolved model config (for `eqim sample-tokens --config`). A run whose output directory holds
//! a checkpoint resumes from it exactly (same weights as an uninterrupted run on the CPU).

use super::generator::{GeneratorTrainModel, LatentPrep};
use super::source::{steps_per_epoch, BatchSource, CachedLatents, EpochOrder, SyntheticLatents};
use super::trainer::{BatchPlan, StepReport, Trainer, TrainerConfig};
use super::{AdamWConfig, LrSchedule, ScheduleKind, TrainState};
use crate::data::LatentCache;
use crate::model::generator::GeneratorConfig;
use anyhow::{bail, Context, Result};
use eqim_common::config::load_config;
use eqim_common::train_config::{DataConfig, GeneratorTrainConfig, LrScheduleName};
use indicatif::{ProgressBar, ProgressStyle};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;
use tch::Device;
use tracing::info;

/// Name of the resumable state directory inside `output_dir`.
pub const CHECKPOINT_DIR: &str = "checkpoint-last";

/// Command-line options of `eqim train-generator`.
#[derive(Debug, Clone, clap::Args)]
pub struct TrainGeneratorArgs {
    /// Training config (TOML or YAML), e.g. configs/generator-tiny.toml.
    #[arg(long)]
    pub config: PathBuf,
    /// Start from scratch even if OUTPUT_DIR/checkpoint-last exists (it is overwritten).
    #[arg(long)]
    pub fresh: bool,
    /// Stop after this many steps in total (overrides run.max_steps).
    #[arg(long)]
    pub max_steps: Option<u64>,
    /// Hide the progress bar (log lines only).
    #[arg(long)]
    pub no_progress: bool,
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

pub fn parse_device(name: &str) -> Result<Device> {
    Ok(match name {
        "cpu" => Device::Cpu,
        "auto" => Device::cuda_if_available(),
        "cuda" => Device::Cuda(0),
        other => match other.strip_prefix("cuda:").and_then(|n| n.parse().ok()) {
            Some(n) => Device::Cuda(n),
            None => bail!("device {other:?}: use cpu, cuda, cuda:N or auto"),
        },
    })
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

pub fn write_json_atomic(path: &Path, value: &impl serde::Serialize) -> Result<()> {
    let text = serde_json::to_string_pretty(value).context("serialising JSON")?;
    let tmp = path.with_extension(format!("json.tmp-{}", std::process::id()));
    std::fs::write(&tmp, text)
        .and_then(|()| std::fs::File::open(&tmp)?.sync_all())
        .and_then(|()| std::fs::rename(&tmp, path))
        .with_context(|| format!("writing {}", path.display()))
}

/// Appends one JSON line per logged step.
struct StepLog {
    file: std::fs::File,
}

impl StepLog {
    fn open(dir: &Path) -> Result<Self> {
        let path = dir.join("train_log.jsonl");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        Ok(Self { file })
    }

    fn write(&mut self, r: &StepReport, images_per_sec: f64) -> Result<()> {
        let line = serde_json::json!({
            "step": r.step + 1, "epoch": r.epoch, "loss": r.loss, "lr": r.lr,
            "grad_norm": r.grad_norm, "images_per_sec": images_per_sec,
        });
        writeln!(self.file, "{line}").context("writing train_log.jsonl")
    }
}

fn save(trainer: &Trainer<GeneratorTrainModel>, cfg: &GeneratorTrainConfig) -> Result<PathBuf> {
    let dir = cfg.output_dir.join(CHECKPOINT_DIR);
    let extra = serde_json::json!({
        "config": cfg,
        "generator": trainer.model.model.cfg,
    });
    TrainState::capture(trainer, extra)
        .write(&dir)
        .with_context(|| format!("saving the training state to {}", dir.display()))?;
    Ok(dir)
}

/// Everything a run needs, resumed from `checkpoint-last/` when present.
struct Job {
    cfg: GeneratorTrainConfig,
    trainer: Trainer<GeneratorTrainModel>,
    source: Box<dyn BatchSource>,
    order: EpochOrder,
    plan: BatchPlan,
    /// Steps to reach (in total, counting those of earlier runs).
    total: u64,
}

fn prepare(args: &TrainGeneratorArgs) -> Result<Job> {
    let cfg: GeneratorTrainConfig = load_config(&args.config)?;
    let model_cfg = resolve_model(&cfg.model)
        .with_context(|| format!("config file {}", args.config.display()))?;
    if let Some(n) = cfg.threads {
        tch::set_num_threads(n as i32);
    }
    let device = parse_device(&cfg.device)?;
    std::fs::create_dir_all(&cfg.output_dir)
        .with_context(|| format!("creating output_dir {}", cfg.output_dir.display()))?;
    write_json_atomic(&cfg.output_dir.join(GENERATOR_JSON), &model_cfg)?;
    let (source, prep) = batch_source(&cfg, &model_cfg)?;
    let model = GeneratorTrainModel::new(&model_cfg, device, cfg.seed)?.with_prep(prep);
    let mut trainer = Trainer::new(model, trainer_config(&cfg))?;
    let state_dir = cfg.output_dir.join(CHECKPOINT_DIR);
    if state_dir.exists() && !args.fresh {
        TrainState::read(&state_dir)
            .and_then(|s| {
                check_resumable(&s.extra, &cfg)?;
                s.restore_into(&mut trainer)
            })
            .with_context(|| {
                format!(
                    "resuming from {} (pass --fresh to start over)",
                    state_dir.display()
                )
            })?;
        info!(step = trainer.progress.step, epoch = trainer.progress.epoch, dir = %state_dir.display(), "resumed");
    }
    let plan = BatchPlan {
        global_batch: cfg.optim.batch,
        micro_batch: cfg.optim.micro_batch(),
        device,
    };
    let per_epoch = steps_per_epoch(source.len(), plan.global_batch);
    let total = args
        .max_steps
        .or(cfg.run.max_steps)
        .unwrap_or(u64::MAX)
        .min(cfg.run.epochs.saturating_mul(per_epoch));
    let order = EpochOrder::new(cfg.seed, source.len());
    Ok(Job {
        cfg,
        trainer,
        source,
        order,
        plan,
        total,
    })
}

/// A run resumes where it stopped only if the data order is the same: the seed, the global
/// batch and the data must be those the checkpoint was trained with.
fn check_resumable(extra: &serde_json::Value, cfg: &GeneratorTrainConfig) -> Result<()> {
    let now = serde_json::to_value(cfg).context("serialising the config")?;
    for key in ["/seed", "/optim/batch", "/data"] {
        let saved = extra.pointer(&format!("/config{key}"));
        let wanted = now.pointer(key);
        if saved != wanted {
            bail!(
                "the checkpoint was trained with {} = {}, the config says {}: the data order would change",
                key.trim_start_matches('/').replace('/', "."),
                saved.map_or("(absent)".into(), |v| v.to_string()),
                wanted.map_or("(absent)".into(), |v| v.to_string()),
            );
        }
    }
    Ok(())
}

fn progress_bar(total: u64, hidden: bool, position: u64) -> ProgressBar {
    let bar = if hidden {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(total)
    };
    bar.set_style(
        ProgressStyle::with_template(
            "{elapsed_precise} [{bar:30}] step {pos}/{len} {msg} (eta {eta})",
        )
        .expect("valid progress template")
        .progress_chars("=> "),
    );
    bar.set_position(position.min(total));
    bar
}

/// Runs `eqim train-generator`.
pub fn run(args: &TrainGeneratorArgs) -> Result<()> {
    let Job {
        cfg,
        mut trainer,
        mut source,
        mut order,
        plan,
        total,
    } = prepare(args)?;
    info!(
        params = trainer.params.numel(),
        device = ?plan.device,
        steps_per_epoch = steps_per_epoch(source.len(), plan.global_batch),
        total_steps = total,
        batch = plan.global_batch,
        micro_batch = plan.micro_batch,
        peak_lr = cfg.optim.peak_lr(),
        "training the generator"
    );
    let bar = progress_bar(total, args.no_progress, trainer.progress.step);
    let mut log = StepLog::open(&cfg.output_dir)?;
    let mut window = (Instant::now(), 0u64);
    while trainer.progress.step < total {
        let report = trainer.step_from_source(source.as_mut(), &mut order, &plan)?;
        window.1 += report.rows;
        let done = report.step + 1;
        bar.set_position(done);
        bar.set_message(format!(
            "loss {:.4} lr {:.2e} gnorm {:.3}",
            report.loss, report.lr, report.grad_norm
        ));
        if done % cfg.run.log_every == 0 || done == total {
            let images_per_sec = window.1 as f64 / window.0.elapsed().as_secs_f64();
            window = (Instant::now(), 0);
            log.write(&report, images_per_sec)?;
            bar.suspend(|| {
                info!(
                    step = done,
                    epoch = report.epoch,
                    loss = format!("{:.5}", report.loss),
                    lr = format!("{:.3e}", report.lr),
                    grad_norm = format!("{:.4}", report.grad_norm),
                    images_per_sec = format!("{images_per_sec:.1}"),
                    "step"
                )
            });
        }
        let every = cfg.run.checkpoint_every;
        if every > 0 && done % every == 0 && done < total {
            let dir = save(&trainer, &cfg)?;
            bar.suspend(|| info!(step = done, dir = %dir.display(), "checkpoint written"));
        }
    }
    bar.finish_and_clear();
    let dir = save(&trainer, &cfg)?;
    info!(step = trainer.progress.step, dir = %dir.display(), "training finished; state saved");
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
