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
use images::ImageBatches;
use trainer::{Teachers, TokenizerTrainer};

/// `eqim train-tokenizer` arguments.
#[derive(Debug, Clone, clap::Args)]
pub struct TrainTokenizerArgs {
    /// Training config: the reference tokenizer YAML layout plus an `eqim:` section.
    #[arg(long)]
    pub config: PathBuf,
    /// Override `eqim.train.max_steps`.
    #[arg(long)]
    pub max_steps: Option<i64>,
    /// Override `eqim.train.precision` (fp32 or bf16).
    #[arg(long, value_enum)]
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

fn pick_device(name: Option<&str>) -> Result<Device> {
    Ok(match name {
        None => Device::cuda_if_available(),
        Some("cpu") => Device::Cpu,
        Some("cuda") => Device::Cuda(0),
        Some(other) => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(i)) => Device::Cuda(i),
            _ => bail!("eqim.train.device is {other:?}: use cpu, cuda or cuda:N"),
        },
    })
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
                 scratch (resume uses eqim.train.out_dir/last.safetensors); remove ckpt_path or \
                 set stage2: true"
            );
        }
        trainer.init_stage2_from(&ckpt)?;
    }
    Ok(trainer)
}

pub fn run(args: &TrainTokenizerArgs) -> Result<()> {
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
    let last = out_dir.join("last.safetensors");
    if t.resume && last.is_file() {
        trainer.resume(&last)?;
        tracing::info!(step = trainer.global_step, path = %last.display(), "resumed");
    }
    let mut batches =
        ImageBatches::new(&expand_home(&d.train_dir), d.height, d.width, t.seed as u64)?;
    tracing::info!(
        images = batches.len(),
        device = ?device,
        stage2 = trainer.stage2,
        "training the tokenizer"
    );
    let sheet_inputs = batches.fixed_batch(t.sheet_images.max(1) as usize)?;
    let l1 = |trainer: &TokenizerTrainer| -> Result<(tch::Tensor, f64)> {
        let rec = trainer
            .reconstruct_mode(&sheet_inputs)?
            .to_device(Device::Cpu);
        let l1 = (&rec - &sheet_inputs)
            .abs()
            .mean(tch::Kind::Float)
            .double_value(&[]);
        Ok((rec, l1))
    };
    let (before, l1_before) = l1(&trainer)?;
    let started = Instant::now();
    let batch_size = cfg.data.params.batch_size as usize;
    let first_step = trainer.global_step;
    while trainer.global_step < t.max_steps {
        let x = batches.next_batch(batch_size)?;
        let log = trainer.train_step(&x)?;
        let step = trainer.global_step;
        if t.log_every > 0 && (step % t.log_every == 0 || step == t.max_steps) {
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
        if t.checkpoint_every > 0 && step % t.checkpoint_every == 0 && step < t.max_steps {
            trainer.save_checkpoint(&last)?;
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    trainer.save_checkpoint(&last)?;
    let model_path = out_dir.join("tokenizer.safetensors");
    trainer.save_model(&model_path)?;
    let (after, l1_after) = l1(&trainer)?;
    let after_ema = trainer
        .reconstruct_ema(&sheet_inputs)?
        .to_device(Device::Cpu);
    let l1_ema = (&after_ema - &sheet_inputs)
        .abs()
        .mean(tch::Kind::Float)
        .double_value(&[]);
    let sheet = out_dir.join("reconstructions.png");
    images::write_sheet(&[&sheet_inputs, &before, &after, &after_ema], &sheet)?;
    println!(
        "trained steps {first_step}..{} in {elapsed:.1} s; reconstruction L1 (posterior mean, {} \
         sheet images, [-1,1] scale): {l1_before:.4} -> {l1_after:.4} (EMA weights {l1_ema:.4})",
        trainer.global_step,
        sheet_inputs.size()[0],
    );
    println!(
        "wrote {} (training state), {} (model + EMA), {} (rows: input, before, after, after with EMA weights)",
        last.display(),
        model_path.display(),
        sheet.display()
    );
    Ok(())
}
