//! Tokenizer training (`eqim train-tokenizer`): the reference's `LPIPSWithDiscriminator` losses,
//! two Adam optimizers stepped alternately per batch, the warm-up + step-decay schedule, `LitEma`,
//! and stage 2 (decoder fine-tuning).
//! Upstream: `tokenizer/models/tokenizer.py`, `tokenizer/modules/losses/contperceptual.py`.

pub mod config;
pub mod images;
pub mod losses;
pub mod optim;
pub mod trainer;

#[cfg(test)]
mod tests;

use anyhow::{bail, Context, Result};
use std::path::PathBuf;
use std::time::Instant;
use tch::Device;

use crate::model::dino_disc::{DinoDisc, DinoDiscConfig};
use crate::model::dinov2::{Dinov2Config, Dinov2Teacher};
use crate::model::lpips::Lpips;
use crate::model::tokenizer::config::TokenizerConfig;
use config::{expand_home, TrainTokenizerConfig};
use eqim_common::checkpoint::{self, JobState};
use eqim_common::proto::Generation;
use eqim_common::schedule::{DataSchedule, ScheduleConfig};
use images::ImageBatches;
use trainer::{Teachers, TokenizerTrainer};

/// `eqim train-tokenizer` arguments.
#[derive(Debug, Clone)]
pub struct TrainTokenizerOptions {
    /// Training config: the reference tokenizer YAML layout plus an `eqim:` section.
    pub config: PathBuf,
    /// Override `eqim.train.max_steps`.
    pub max_steps: Option<i64>,
    /// Override `eqim.train.precision` (fp32 or bf16).
    pub precision: Option<crate::precision::Precision>,
}

/// Losses the config may ask for that eqim does not compute yet, refused with the flag to change.
fn check_supported(cfg: &TrainTokenizerConfig, tok_cfg: &TokenizerConfig) -> Result<()> {
    let lp = &cfg.model.params.lossconfig.params;
    let teacher_dim = Dinov2Config::default().embed_dim;
    if lp.semantic_loss_w > 0.0 && tok_cfg.sematicconfig.out_ch != teacher_dim {
        bail!(
            "semantic_loss_w > 0 aligns the semantic decoder with DINOv2 ViT-B/14 features of \
             {teacher_dim} channels, but model.params.sematicconfig.out_ch is {}; set it to \
             {teacher_dim} or set model.params.lossconfig.params.semantic_loss_w: 0",
            tok_cfg.sematicconfig.out_ch
        );
    }
    Ok(())
}

/// The generation recorded in a tokenizer run's checkpoints (one process, one generation).
const TOKENIZER_GENERATION: Generation = Generation(1);

/// The shared data schedule over the training images: epochs of the seeded permutation in steps
/// of `batch` images (the last step of an epoch is short), enough epochs for `max_steps`.
fn tokenizer_schedule(images: u64, batch: u64, max_steps: i64, seed: i64) -> ScheduleConfig {
    let per_epoch = eqim_common::schedule::steps_per_epoch(images, batch.max(1)).max(1);
    let epochs = (max_steps.max(1) as u64).div_ceil(per_epoch);
    ScheduleConfig {
        dataset_len: images,
        global_batch: batch,
        micro_batch: batch,
        epochs: u32::try_from(epochs).unwrap_or(u32::MAX),
        seed: seed as u64,
        checkpoint_every_steps: None,
    }
}

/// Resumes the newest verified checkpoint under `root` (weights, optimizers, EMA, step and the
/// data cursor), or starts at step 0. A `last.safetensors` of eqim's earlier tokenizer trainer
/// (no data cursor) is refused by name.
fn resume_tokenizer(
    trainer: &mut TokenizerTrainer,
    out_dir: &std::path::Path,
    root: &std::path::Path,
    cfg: ScheduleConfig,
) -> Result<DataSchedule> {
    let (point, rejected) = checkpoint::resume_point(root);
    for reason in &rejected {
        tracing::warn!("skipping checkpoint: {reason}");
    }
    let Some(point) = point else {
        let old = out_dir.join("last.safetensors");
        if old.is_file() {
            bail!(
                "{} is a training state of an older eqim train-tokenizer, which this version \
                 cannot resume (it has no data cursor); set eqim.train.resume: false to start \
                 over, or move it away",
                old.display()
            );
        }
        return Ok(DataSchedule::new(cfg));
    };
    if point.job.schedule.as_ref().map(|s| (s.dataset_len, s.seed))
        != Some((cfg.dataset_len, cfg.seed))
    {
        bail!(
            "checkpoint {} was written for another image folder or seed (its schedule: {:?}); \
             resuming would change the data order: give this run its own eqim.train.out_dir",
            point.dir.display(),
            point.job.schedule
        );
    }
    trainer.resume(&point.dir.join(checkpoint::STATE_FILE))?;
    if trainer.global_step as u64 != point.job.cursor.step {
        bail!(
            "checkpoint {} holds step {} but its cursor says {}: the checkpoint is inconsistent",
            point.dir.display(),
            trainer.global_step,
            point.job.cursor.step
        );
    }
    tracing::info!(step = trainer.global_step, dir = %point.dir.display(), "resumed");
    Ok(DataSchedule::resume(
        cfg,
        point.job.cursor,
        point.job.ledger,
    ))
}

/// Writes the checkpoint after the committed steps of `schedule`: job state, the training state,
/// then the manifest (the shared layout of `eqim_common::checkpoint`). Returns its directory.
fn save_tokenizer_checkpoint(
    trainer: &TokenizerTrainer,
    root: &std::path::Path,
    schedule: &DataSchedule,
) -> Result<std::path::PathBuf> {
    let steps = schedule.cursor().step;
    let job = JobState {
        cursor: schedule.cursor(),
        generation: TOKENIZER_GENERATION,
        ledger: schedule.ledger().clone(),
        schedule: Some(schedule.config().clone()),
    };
    let (_, dir) = checkpoint::begin(root, steps, &job)?;
    trainer.save_checkpoint(&dir.join(checkpoint::STATE_FILE))?;
    let state = checkpoint::written_file(&dir, checkpoint::STATE_FILE)?;
    checkpoint::complete(root, &dir, steps, vec![state], checkpoint::DEFAULT_KEEP)?;
    Ok(dir)
}

fn pick_device(name: Option<&str>) -> Result<Device> {
    crate::device::parse_device(name.unwrap_or("auto")).context("eqim.train.device")
}

/// Builds the trainer for a parsed config: teacher weights checked and loaded, stage-2 init.
pub fn build_trainer(
    cfg: &TrainTokenizerConfig,
    tok_cfg: &TokenizerConfig,
    device: Device,
) -> Result<TokenizerTrainer> {
    check_supported(cfg, tok_cfg)?;
    let required = cfg.required_weights()?;
    let lpips = match &required.lpips {
        Some((vgg, heads)) => Some(Lpips::load(vgg, heads, device)?),
        None => None,
    };
    let dino = match &required.dino {
        Some(path) => {
            let dino_cfg = DinoDiscConfig::default();
            let (vs, backbone) = DinoDisc::load_backbone(path, &dino_cfg, device)
                .context("loading the DINO discriminator backbone (eqim.weights.dino_vits16)")?;
            Some((dino_cfg, vs, backbone))
        }
        None => None,
    };
    let dinov2 = match &required.dinov2 {
        Some(path) => Some(
            Dinov2Teacher::load(path, &Dinov2Config::default(), device)
                .context("loading the DINOv2 teacher (eqim.weights.dinov2_vitb14)")?,
        ),
        None => None,
    };
    let teachers = Teachers {
        lpips,
        dino,
        dinov2,
    };
    let mut trainer = TokenizerTrainer::new(tok_cfg, cfg, teachers, device)?;
    if let Some(ckpt) = &cfg.model.params.ckpt_path {
        let ckpt = expand_home(ckpt);
        if !cfg.model.params.stage2 {
            bail!(
                "model.params.ckpt_path is set but stage2 is false: eqim starts stage 1 from \
                 scratch (resume uses the newest checkpoint in eqim.train.out_dir/checkpoints); remove ckpt_path or \
                 set stage2: true"
            );
        }
        trainer.init_stage2_from(&ckpt)?;
    }
    Ok(trainer)
}

/// The training config with the options' overrides, and the tokenizer architecture in it.
fn load_configs(args: &TrainTokenizerOptions) -> Result<(TrainTokenizerConfig, TokenizerConfig)> {
    let mut cfg = TrainTokenizerConfig::from_file(&args.config)?;
    if let Some(p) = args.precision {
        cfg.eqim.train.precision = p;
    }
    if let Some(n) = args.max_steps {
        cfg.eqim.train.max_steps = n;
    }
    let text = std::fs::read_to_string(&args.config)
        .with_context(|| format!("reading {}", args.config.display()))?;
    let value: serde_yaml::Value = serde_yaml::from_str(&text)
        .with_context(|| format!("parsing {}", args.config.display()))?;
    let tok_cfg = TokenizerConfig::from_value(value)
        .with_context(|| format!("tokenizer architecture in {}", args.config.display()))?;
    Ok((cfg, tok_cfg))
}

/// Mean absolute difference of two image batches on the [-1, 1] scale.
fn mean_l1(a: &tch::Tensor, b: &tch::Tensor) -> f64 {
    (a - b).abs().mean(tch::Kind::Float).double_value(&[])
}

fn log_step(step: i64, log: &trainer::StepLog) {
    tracing::info!(
        step,
        l1 = format!("{:.4}", log.l1),
        nll = format!("{:.2}", log.nll),
        kl = format!("{:.2}", log.kl),
        g_loss = format!("{:.4}", log.g_loss),
        d_weight = format!("{:.4}", log.d_weight),
        disc_loss = format!("{:.4}", log.disc_loss),
        lr = format!("{:.3e}", log.lr),
        "step"
    );
}

/// Trains until `max_steps`, logging and checkpointing on the way.
fn train_steps(
    trainer: &mut TokenizerTrainer,
    schedule: &mut DataSchedule,
    batches: &ImageBatches,
    t: &config::TrainLoopConfig,
    root: &std::path::Path,
) -> Result<()> {
    while trainer.global_step < t.max_steps {
        let samples = schedule
            .next_step()
            .context("the data schedule ended before eqim.train.max_steps")?;
        let x = batches.batch(u64::from(samples.epoch), &samples.samples)?;
        let log = trainer.train_step(&x)?;
        schedule.commit(samples, TOKENIZER_GENERATION);
        let step = trainer.global_step;
        if t.log_every > 0 && (step % t.log_every == 0 || step == t.max_steps) {
            log_step(step, &log);
        }
        if t.checkpoint_every > 0 && step % t.checkpoint_every == 0 && step < t.max_steps {
            save_tokenizer_checkpoint(trainer, root, schedule)?;
        }
    }
    Ok(())
}

/// Trains a tokenizer as the config says (resuming when `eqim.train.resume`), then writes the
/// last checkpoint, `tokenizer.safetensors` and a reconstruction sheet into `eqim.train.out_dir`.
pub fn run(args: &TrainTokenizerOptions) -> Result<()> {
    let (cfg, tok_cfg) = load_configs(args)?;
    let t = cfg.eqim.train.clone();
    let d = cfg.eqim.data.clone();
    let device = pick_device(t.device.as_deref())?;
    if let Some(n) = t.threads {
        tch::set_num_threads(n);
    }
    tch::manual_seed(t.seed);
    let mut trainer = build_trainer(&cfg, &tok_cfg, device)?;

    let out_dir = expand_home(&t.out_dir);
    std::fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let batches = ImageBatches::new(&expand_home(&d.train_dir), d.height, d.width, t.seed as u64)?;
    let batch_size = cfg.data.params.batch_size as u64;
    let schedule_cfg = tokenizer_schedule(batches.len() as u64, batch_size, t.max_steps, t.seed);
    let root = out_dir.join("checkpoints");
    let mut schedule = if t.resume {
        resume_tokenizer(&mut trainer, &out_dir, &root, schedule_cfg)?
    } else {
        DataSchedule::new(schedule_cfg)
    };
    tracing::info!(
        images = batches.len(),
        device = ?device,
        stage2 = trainer.stage2,
        "training the tokenizer"
    );
    let sheet_inputs = batches.fixed_batch(t.sheet_images.max(1) as usize)?;
    let before = trainer
        .reconstruct_mode(&sheet_inputs)?
        .to_device(Device::Cpu);
    let started = Instant::now();
    let first_step = trainer.global_step;
    train_steps(&mut trainer, &mut schedule, &batches, &t, &root)?;
    let elapsed = started.elapsed().as_secs_f64();
    let last = save_tokenizer_checkpoint(&trainer, &root, &schedule)?;
    let model_path = out_dir.join("tokenizer.safetensors");
    trainer.save_model(&model_path)?;
    let after = trainer
        .reconstruct_mode(&sheet_inputs)?
        .to_device(Device::Cpu);
    let after_ema = trainer
        .reconstruct_ema(&sheet_inputs)?
        .to_device(Device::Cpu);
    let sheet = out_dir.join("reconstructions.png");
    images::write_sheet(&[&sheet_inputs, &before, &after, &after_ema], &sheet)?;
    println!(
        "trained steps {first_step}..{} in {elapsed:.1} s; reconstruction L1 (posterior mean, {} \
         sheet images, [-1,1] scale): {:.4} -> {:.4} (EMA weights {:.4})",
        trainer.global_step,
        sheet_inputs.size()[0],
        mean_l1(&before, &sheet_inputs),
        mean_l1(&after, &sheet_inputs),
        mean_l1(&after_ema, &sheet_inputs),
    );
    println!(
        "wrote {} (training checkpoint), {} (model + EMA), {} (rows: input, before, after, after with EMA weights)",
        last.display(),
        model_path.display(),
        sheet.display()
    );
    Ok(())
}
