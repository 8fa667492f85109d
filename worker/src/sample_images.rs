//! `eqim sample`: generator tokens -> latent scaling -> tokenizer decoder -> PNGs, in one command
//! (the composition of `eqim sample-tokens` and `eqim decode --latent-scale`).

use crate::model::tokenizer::Parts;
use crate::sample_tokens::{self, SampleTokensArgs};
use crate::sampling::CfgSchedule;
use crate::tokenizer_cli::{decode_to_pngs, load_tokenizer_parts, read_tokens, TokenizerArgs};
use anyhow::{Context, Result};
use std::path::PathBuf;

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

pub fn run(args: SampleArgs) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let tokens_path = args.out.join("tokens.safetensors");
    sample_tokens::run(&SampleTokensArgs {
        weights: args.generator_weights,
        config: Some(args.generator_config),
        preset: None,
        class_num: 1000,
        labels: args.labels,
        num: args.num,
        length: args.length,
        cfg: args.cfg,
        cfg_schedule: args.cfg_schedule,
        steps: args.steps,
        seed: args.sample_seed,
        temperature: 1.0,
        exact: false,
        prefix: None,
        device: args.tokenizer.device.clone(),
        precision: args.precision,
        output: tokens_path.clone(),
    })?;
    let tokens = read_tokens(&tokens_path)?;
    let tok = load_tokenizer_parts(&args.tokenizer, Parts::DecoderOnly)?;
    decode_to_pngs(&tok, &tokens, args.vae_norm, &args.out)
}
