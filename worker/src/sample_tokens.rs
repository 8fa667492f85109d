//! Sampling latent tokens with a generator checkpoint into a safetensors file (`tokens`
//! `[B, L, C]`, `labels` `[B]`): what `eqim sample-tokens` runs and `eqim sample` decodes.

use crate::model::generator::{EquivariantGenerativeModel, GeneratorConfig};
use crate::model::weights;
use crate::sampling::{self, seeded_noise, CfgSchedule, SampleSpec};
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::time::Instant;
use tch::{nn, Device, Kind, Tensor};

/// What to sample, with which model, into which file.
#[derive(Debug)]
pub struct SampleTokensOptions {
    /// Generator weights (safetensors with the reference's parameter names).
    pub weights: PathBuf,
    /// Generator config JSON (the reference constructor's arguments; a fixture JSON works).
    pub config: Option<PathBuf>,
    /// Size preset instead of --config: small, base, large or huge (README settings).
    pub preset: Option<String>,
    /// Number of classes for --preset (1000 for ImageNet, 30 for Places).
    pub class_num: i64,
    /// Comma-separated class labels, one image each.
    pub labels: Vec<i64>,
    /// Number of unconditional images (null class), when no --labels are given.
    pub num: Option<i64>,
    /// Tokens per image (16 for 256x256; more for wider images). Default: the config's token_num.
    pub length: Option<i64>,
    /// Guidance scale (1.0 = no guidance).
    pub cfg: f64,
    /// linear (1 -> cfg over the tokens) or constant.
    pub cfg_schedule: CfgSchedule,
    /// Euler steps per token. Default: the config's num_sampling_steps.
    pub steps: Option<i64>,
    /// Seed of the CPU generator the per-token noise is drawn from.
    pub seed: i64,
    /// Accepted and ignored, as in the reference.
    pub temperature: f64,
    /// Recompute the full sequence per token (the reference's algorithm) instead of the KV cache.
    pub exact: bool,
    /// Tokens to continue (safetensors with `tokens` `[B, P, C]`).
    pub prefix: Option<PathBuf>,
    pub device: Device,
    /// fp32 or bf16 (autocast; default: the config's `precision`, else fp32).
    pub precision: Option<crate::precision::Precision>,
    /// Output safetensors file.
    pub output: PathBuf,
}

fn read_config(args: &SampleTokensOptions) -> Result<GeneratorConfig> {
    match (&args.config, &args.preset) {
        (Some(path), _) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading config {}", path.display()))?;
            serde_json::from_str(&text)
                .with_context(|| format!("parsing generator config {}", path.display()))
        }
        (None, Some(name)) => {
            let mut cfg = GeneratorConfig::preset(name)?;
            cfg.class_num = args.class_num;
            Ok(cfg)
        }
        (None, None) => bail!("give the model's shape with --config FILE.json or --preset NAME"),
    }
}

fn read_prefix(path: &Path) -> Result<Tensor> {
    let mut tensors = weights::read_safetensors(path)?;
    tensors
        .remove("tokens")
        .with_context(|| format!("{} has no `tokens` tensor", path.display()))
}

/// Samples the tokens and writes them to `args.output`.
pub fn run(args: &SampleTokensOptions) -> Result<()> {
    let mut cfg = read_config(args)?;
    if let Some(p) = args.precision {
        cfg.precision = p;
    }
    let mut vs = nn::VarStore::new(args.device);
    let model = EquivariantGenerativeModel::new(vs.root(), &cfg)?;
    weights::load_file_strict(&vs, &args.weights)?;
    vs.freeze();
    let labels = (!args.labels.is_empty()).then(|| Tensor::from_slice(&args.labels));
    let batch = match (&labels, args.num) {
        (Some(l), _) => l.size()[0],
        (None, Some(n)) if n > 0 => n,
        (None, Some(n)) => bail!("--num must be positive, got {n}"),
        (None, None) => bail!("give --labels 1,2,3 or --num N (unconditional)"),
    };
    let prefix = args.prefix.as_deref().map(read_prefix).transpose()?;
    let spec = SampleSpec {
        batch,
        labels: labels.as_ref(),
        prefix: prefix.as_ref(),
        num_iter: args.length.unwrap_or(cfg.token_num),
        cfg: args.cfg,
        cfg_schedule: args.cfg_schedule,
        num_steps: args.steps.unwrap_or(cfg.num_sampling_steps),
        temperature: args.temperature,
    };
    if spec.num_iter <= 0 || spec.num_steps <= 0 {
        bail!("--length and --steps must be positive");
    }
    let p = prefix.as_ref().map_or(0, |t| t.size()[1]);
    let mut noise = seeded_noise(args.seed, spec.num_iter - p, batch, cfg.vae_embed_dim);
    let bar = indicatif::ProgressBar::new((spec.num_iter - p).max(0) as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} tokens {elapsed} eta {eta}")
            .context("progress bar template")?,
    );
    let start = Instant::now();
    let mut tick = |_step: i64| bar.inc(1);
    let tokens = if args.exact {
        sampling::sample_exact(&model, &spec, &mut noise, &mut tick)?
    } else {
        sampling::sample_cached(&model, &spec, &mut noise, &mut tick)?
    };
    bar.finish();
    let seconds = start.elapsed().as_secs_f64();
    // -1 marks unconditional rows.
    let labels_out = match &labels {
        Some(l) => l.shallow_clone(),
        None => Tensor::full([batch], -1, (Kind::Int64, Device::Cpu)),
    };
    weights::write_safetensors_atomic(
        &[
            ("tokens".to_owned(), tokens.to_device(Device::Cpu)),
            ("labels".to_owned(), labels_out),
        ],
        &args.output,
    )?;
    println!(
        "wrote {} tokens x {} images to {} in {seconds:.2} s ({:.3} s/image, {})",
        spec.num_iter,
        batch,
        args.output.display(),
        seconds / batch as f64,
        if args.exact { "exact" } else { "kv-cached" }
    );
    Ok(())
}
