//! The sampling commands: `eqim sample` (images) and `eqim sample-tokens` (latent tokens).

use super::tokenizer::TokenizerArgs;
use crate::sample_images::SampleOptions;
use crate::sample_tokens::SampleTokensOptions;
use crate::sampling::CfgSchedule;
use anyhow::Result;
use std::path::PathBuf;

#[derive(Debug, clap::Args)]
pub struct SampleTokensArgs {
    /// Generator weights (safetensors with the reference's parameter names).
    #[arg(long)]
    pub weights: PathBuf,
    /// Generator config JSON (the reference constructor's arguments; a fixture JSON works).
    #[arg(long, conflicts_with = "preset")]
    pub config: Option<PathBuf>,
    /// Size preset instead of --config: small, base, large or huge (README settings).
    #[arg(long)]
    pub preset: Option<String>,
    /// Number of classes for --preset (1000 for ImageNet, 30 for Places).
    #[arg(long, default_value_t = 1000, requires = "preset")]
    pub class_num: i64,
    /// Comma-separated class labels, one image each.
    #[arg(long, value_delimiter = ',', conflicts_with = "num")]
    pub labels: Vec<i64>,
    /// Number of unconditional images (null class), when no --labels are given.
    #[arg(long)]
    pub num: Option<i64>,
    /// Tokens per image (16 for 256x256; more for wider images). Default: the config's token_num.
    #[arg(long)]
    pub length: Option<i64>,
    /// Guidance scale (1.0 = no guidance).
    #[arg(long, default_value_t = 1.0)]
    pub cfg: f64,
    /// linear (1 -> cfg over the tokens) or constant.
    #[arg(long, default_value = "linear")]
    pub cfg_schedule: CfgSchedule,
    /// Euler steps per token. Default: the config's num_sampling_steps.
    #[arg(long)]
    pub steps: Option<i64>,
    /// Seed of the CPU generator the per-token noise is drawn from.
    #[arg(long, default_value_t = 1)]
    pub seed: i64,
    /// Accepted and ignored, as in the reference.
    #[arg(long, default_value_t = 1.0)]
    pub temperature: f64,
    /// Recompute the full sequence per token (the reference's algorithm) instead of the KV cache.
    #[arg(long)]
    pub exact: bool,
    /// Tokens to continue (safetensors with `tokens` `[B, P, C]`).
    #[arg(long)]
    pub prefix: Option<PathBuf>,
    /// cpu, cuda, cuda:N or auto.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// fp32 or bf16 (autocast; default: the config's `precision`, else fp32).
    #[arg(long, value_enum)]
    pub precision: Option<crate::precision::Precision>,
    /// Output safetensors file.
    #[arg(long, short)]
    pub output: PathBuf,
}

impl SampleTokensArgs {
    /// The library's options, with `--device` parsed.
    pub fn options(self) -> Result<SampleTokensOptions> {
        Ok(SampleTokensOptions {
            weights: self.weights,
            config: self.config,
            preset: self.preset,
            class_num: self.class_num,
            labels: self.labels,
            num: self.num,
            length: self.length,
            cfg: self.cfg,
            cfg_schedule: self.cfg_schedule,
            steps: self.steps,
            seed: self.seed,
            temperature: self.temperature,
            exact: self.exact,
            prefix: self.prefix,
            device: crate::device::parse_device(&self.device)?,
            precision: self.precision,
            output: self.output,
        })
    }
}

#[derive(Debug, clap::Args)]
pub struct SampleArgs {
    /// Generator weights (safetensors with the reference's parameter names).
    #[arg(long)]
    pub generator_weights: PathBuf,
    /// Generator config JSON (the reference constructor's arguments).
    #[arg(long)]
    pub generator_config: PathBuf,
    /// Comma-separated class labels, one image each.
    #[arg(long, value_delimiter = ',', conflicts_with = "num")]
    pub labels: Vec<i64>,
    /// Number of unconditional images, when no --labels are given.
    #[arg(long)]
    pub num: Option<i64>,
    /// Tokens per image: 16 for the training width, 128 for an 8x panorama.
    #[arg(long)]
    pub length: Option<i64>,
    #[arg(long, default_value_t = 1.0)]
    pub cfg: f64,
    #[arg(long, default_value = "linear")]
    pub cfg_schedule: CfgSchedule,
    /// Euler steps per token (default: the config's num_sampling_steps).
    #[arg(long)]
    pub steps: Option<i64>,
    /// Seed of the per-token noise.
    #[arg(long, default_value_t = 1)]
    pub sample_seed: i64,
    /// The generator's latent scale (0.05493 for the released tokenizer; the demo prints its own).
    #[arg(long, default_value_t = 0.05493)]
    pub vae_norm: f64,
    /// Output folder: `tokens.safetensors` and `{i:05}.png`.
    #[arg(long)]
    pub out: PathBuf,
    /// fp32 or bf16 for the generator (default: its config's `precision`, else fp32).
    #[arg(long, value_enum)]
    pub precision: Option<crate::precision::Precision>,
    #[command(flatten)]
    pub tokenizer: TokenizerArgs,
}

impl SampleArgs {
    /// The library's options, with the device parsed.
    pub fn options(self) -> Result<SampleOptions> {
        Ok(SampleOptions {
            generator_weights: self.generator_weights,
            generator_config: self.generator_config,
            labels: self.labels,
            num: self.num,
            length: self.length,
            cfg: self.cfg,
            cfg_schedule: self.cfg_schedule,
            steps: self.steps,
            sample_seed: self.sample_seed,
            vae_norm: self.vae_norm,
            out: self.out,
            precision: self.precision,
            tokenizer: self.tokenizer.options()?,
        })
    }
}

/// Runs `eqim sample`.
pub fn sample(args: SampleArgs) -> Result<()> {
    crate::sample_images::run(args.options()?).map(drop)
}

/// Runs `eqim sample-tokens`.
pub fn sample_tokens(args: SampleTokensArgs) -> Result<()> {
    crate::sample_tokens::run(&args.options()?)
}
