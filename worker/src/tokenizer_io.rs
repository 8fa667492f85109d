//! Tokenizer plumbing shared by the commands and the samplers: building a tokenizer with its
//! weights ([`TokenizerOptions`]), encoding image files into tokens, reading token files,
//! decoding tokens into PNGs, and the progressive token sets of `eqim explain-tokens`.

use crate::imageio::{self, Fit};
use crate::model::tokenizer::{EquivariantTokenizer, Parts, TokenizerConfig, WeightChoice};
use crate::model::weights::read_safetensors;
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use tch::{nn, Device, Kind, Tensor};

/// Key of the token tensor in the files `eqim encode` writes and `eqim decode` reads.
pub const TOKENS_KEY: &str = "tokens";

/// Which tokenizer to build and which weights to put in it.
#[derive(Debug, Clone)]
pub struct TokenizerOptions {
    /// Tokenizer config: the reference YAML (fields under model.params) or a fixture JSON;
    /// `None` is the released configuration.
    pub config: Option<PathBuf>,
    /// Weights: a safetensors file with the reference's key names.
    pub checkpoint: Option<PathBuf>,
    /// Which copy of the weights to use (default: EMA when the file has it).
    pub weights: Option<WeightChoice>,
    /// Random weights instead of a checkpoint (for tests and memory measurements).
    pub random_weights: bool,
    /// Seed of the random weights and of posterior sampling.
    pub seed: u64,
    pub device: Device,
}

/// A tokenizer with its weights; the VarStore must outlive the model's use.
pub struct LoadedTokenizer {
    pub vs: nn::VarStore,
    pub model: EquivariantTokenizer,
}

/// Builds the tokenizer the options describe and loads its weights.
pub fn load_tokenizer(args: &TokenizerOptions) -> Result<LoadedTokenizer> {
    load_tokenizer_parts(args, Parts::All)
}

/// [`load_tokenizer`] building only the given parts (decoding needs no encoder).
pub fn load_tokenizer_parts(args: &TokenizerOptions, parts: Parts) -> Result<LoadedTokenizer> {
    let cfg = match &args.config {
        Some(path) => TokenizerConfig::from_file(path)?,
        None => TokenizerConfig::full(),
    };
    let vs = nn::VarStore::new(args.device);
    let model = EquivariantTokenizer::with_parts(vs.root(), &cfg, parts);
    match (&args.checkpoint, args.random_weights) {
        (Some(path), _) => {
            if path.extension().is_some_and(|e| e == "ckpt" || e == "pth") {
                bail!(
                    "{} is a PyTorch pickle; convert it first: eqim convert-checkpoint {} OUT.safetensors",
                    path.display(),
                    path.display()
                );
            }
            let file = read_safetensors(path)?;
            let report =
                EquivariantTokenizer::load(&vs, &file, &path.display().to_string(), args.weights)?;
            tracing::info!(
                weights = ?report.choice,
                ignored_loss_keys = report.ignored_loss_keys.len(),
                "loaded tokenizer from {}",
                path.display()
            );
        }
        (None, true) => {
            crate::model::tokenizer::randomize(&vs, args.seed);
            tracing::warn!(seed = args.seed, "tokenizer has random weights");
        }
        (None, false) => {
            bail!("pass --checkpoint FILE.safetensors (or --random-weights for a test)")
        }
    }
    Ok(LoadedTokenizer { vs, model })
}

/// Encodes image files into one token tensor [N, L, C] on the CPU (posterior samples with
/// `sample`, else its mean); all images must give the same number of tokens.
pub fn encode_files(
    tok: &LoadedTokenizer,
    images: &[PathBuf],
    fit: Fit,
    sample: bool,
) -> Result<Tensor> {
    let _guard = tch::no_grad_guard();
    let dd = &tok.model.cfg.ddconfig;
    let mut all = Vec::with_capacity(images.len());
    for path in images {
        let x = imageio::load_for_tokenizer(
            path,
            dd.resolution as u32,
            dd.encoder_width_factor() as u32,
            fit,
        )?;
        let posterior = tok
            .model
            .encode(&x.unsqueeze(0).to_device(tok.vs.device()))
            .with_context(|| format!("encoding {}", path.display()))?;
        let z = if sample {
            posterior.sample()
        } else {
            posterior.mode()
        };
        if let Some(first) = all.first() {
            let first: &Tensor = first;
            if first.size() != z.size() {
                bail!(
                    "{} gives {} tokens, {} gives {}: encode images of different widths separately",
                    images[0].display(),
                    first.size()[1],
                    path.display(),
                    z.size()[1]
                );
            }
        }
        all.push(z.to_device(Device::Cpu));
    }
    Ok(Tensor::cat(&all, 0).contiguous())
}

/// Reads the token tensor of a file written by `eqim encode` (or any file with one tensor).
pub fn read_tokens(path: &Path) -> Result<Tensor> {
    let mut file = read_safetensors(path)?;
    let tokens = match file.remove(TOKENS_KEY) {
        Some(t) => t,
        None if file.len() == 1 => file.into_values().next().expect("one tensor"),
        None => bail!(
            "{} has no `{TOKENS_KEY}` tensor (keys: {})",
            path.display(),
            file.keys().cloned().collect::<Vec<_>>().join(", ")
        ),
    };
    Ok(match tokens.dim() {
        2 => tokens.unsqueeze(0),
        3 => tokens,
        _ => bail!(
            "{}: tokens must be [N, L, C] or [L, C], got {:?}",
            path.display(),
            tokens.size()
        ),
    }
    .to_kind(Kind::Float))
}

/// Decodes tokens [N, L, C] (divided by `latent_scale` first: 0.05493 for generator latents)
/// one image at a time and writes `out/{i:05}.png`. For `eqim decode` and the sampler.
pub fn decode_to_pngs(
    tok: &LoadedTokenizer,
    tokens: &Tensor,
    latent_scale: f64,
    out: &Path,
) -> Result<Vec<PathBuf>> {
    let _guard = tch::no_grad_guard();
    if !(latent_scale.is_finite() && latent_scale > 0.0) {
        bail!("the latent scale must be a positive number, got {latent_scale}");
    }
    let mut written = Vec::new();
    for i in 0..tokens.size()[0] {
        let z = (tokens.get(i).unsqueeze(0) / latent_scale).to_device(tok.vs.device());
        let image = tok
            .model
            .decode(&z)
            .with_context(|| format!("decoding image {i}"))?;
        let path = out.join(format!("{i:05}.png"));
        imageio::save_png(&image.get(0), &path)?;
        written.push(path);
    }
    tracing::info!(images = written.len(), "wrote {}", out.display());
    Ok(written)
}
/// The token sets `explain-tokens` decodes: for k = 0..=L, the first k tokens of `latent`
/// followed by `noise`'s tokens k..L. latent, noise: [1, L, C] -> [L+1, L, C].
pub fn progressive_tokens(latent: &Tensor, noise: &Tensor) -> Tensor {
    let l = latent.size()[1];
    let rows: Vec<Tensor> = (0..=l)
        .map(|k| Tensor::cat(&[latent.narrow(1, 0, k), noise.narrow(1, k, l - k)], 1))
        .collect();
    Tensor::cat(&rows, 0)
}

/// The reference's token_meaning notebook: for k = 0..=L, the image's first k tokens (a
/// posterior sample drawn with `seed`, or its mean with `mode`) followed by random ones,
/// decoded and stacked into one strip [3, (L+1) H, W] on the CPU.
pub fn explain_strip(
    tok: &LoadedTokenizer,
    image: &Path,
    fit: Fit,
    mode: bool,
    seed: u64,
) -> Result<Tensor> {
    let _guard = tch::no_grad_guard();
    let dd = &tok.model.cfg.ddconfig;
    let x = imageio::load_for_tokenizer(
        image,
        dd.resolution as u32,
        dd.encoder_width_factor() as u32,
        fit,
    )?;
    let device = tok.vs.device();
    tch::manual_seed(seed as i64);
    let posterior = tok.model.encode(&x.unsqueeze(0).to_device(device))?;
    let latent = if mode {
        posterior.mode()
    } else {
        posterior.sample()
    };
    let noise =
        Tensor::randn(latent.size().as_slice(), (Kind::Float, Device::Cpu)).to_device(device);
    let sets = progressive_tokens(&latent, &noise);
    let mut rows = Vec::new();
    for k in 0..sets.size()[0] {
        let image = tok.model.decode(&sets.narrow(0, k, 1))?;
        rows.push(image.get(0).to_device(Device::Cpu));
    }
    // Rows stacked along the height: [3, (L+1) H, W]
    Ok(Tensor::cat(&rows, 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn explain_tokens_rows_swap_in_image_tokens_one_at_a_time() {
        let latent = Tensor::arange(6, (Kind::Float, Device::Cpu)).view([1, 3, 2]) + 1.0;
        let noise = Tensor::zeros([1, 3, 2], (Kind::Float, Device::Cpu));
        let sets = progressive_tokens(&latent, &noise);
        assert_eq!(sets.size(), [4, 3, 2]);
        assert!(sets.get(0).equal(&noise.get(0)));
        assert!(sets.get(3).equal(&latent.get(0)));
        // Row 1: token 0 from the image, tokens 1 and 2 random.
        let row1 = Vec::<f32>::try_from(sets.get(1).flatten(0, -1)).unwrap();
        assert_eq!(row1, vec![1.0, 2.0, 0.0, 0.0, 0.0, 0.0]);
    }
}
