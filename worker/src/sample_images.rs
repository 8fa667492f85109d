//! Sampling images (`eqim sample`): generator tokens -> latent scaling -> tokenizer decoder ->
//! PNGs, the composition of `eqim sample-tokens` and `eqim decode --latent-scale`.

use crate::model::tokenizer::Parts;
use crate::sample_tokens::{self, SampleTokensOptions};
use crate::sampling::CfgSchedule;
use crate::tokenizer_io::{decode_to_pngs, load_tokenizer_parts, read_tokens, TokenizerOptions};
use anyhow::{Context, Result};
use std::path::PathBuf;

/// What `eqim sample` samples and decodes.
#[derive(Debug)]
pub struct SampleOptions {
    /// Generator weights (safetensors with the reference's parameter names).
    pub generator_weights: PathBuf,
    /// Generator config JSON (the reference constructor's arguments).
    pub generator_config: PathBuf,
    /// Comma-separated class labels, one image each.
    pub labels: Vec<i64>,
    /// Number of unconditional images, when no --labels are given.
    pub num: Option<i64>,
    /// Tokens per image: 16 for the training width, 128 for an 8x panorama.
    pub length: Option<i64>,
    pub cfg: f64,
    pub cfg_schedule: CfgSchedule,
    /// Euler steps per token (default: the config's num_sampling_steps).
    pub steps: Option<i64>,
    /// Seed of the per-token noise.
    pub sample_seed: i64,
    /// The generator's latent scale (0.05493 for the released tokenizer; the demo prints its own).
    pub vae_norm: f64,
    /// Output folder: `tokens.safetensors` and `{i:05}.png`.
    pub out: PathBuf,
    /// fp32 or bf16 for the generator (default: its config's `precision`, else fp32).
    pub precision: Option<crate::precision::Precision>,
    pub tokenizer: TokenizerOptions,
}

/// Samples, decodes and writes `out/{i:05}.png` (and `out/tokens.safetensors`).
pub fn run(args: SampleOptions) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let tokens_path = args.out.join("tokens.safetensors");
    sample_tokens::run(&SampleTokensOptions {
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
        device: args.tokenizer.device,
        precision: args.precision,
        output: tokens_path.clone(),
    })?;
    let tokens = read_tokens(&tokens_path)?;
    let tok = load_tokenizer_parts(&args.tokenizer, Parts::DecoderOnly)?;
    decode_to_pngs(&tok, &tokens, args.vae_norm, &args.out)
}
