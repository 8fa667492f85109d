//! The tokenizer's commands: `eqim encode`, `eqim decode`, `eqim verify-tokenizer` (until the
//! shared `verify-reference` dispatcher lands) and `eqim explain-tokens`.

use crate::imageio::{self, Fit};
use crate::model::tokenizer::{EquivariantTokenizer, Parts, TokenizerConfig, WeightChoice};
use crate::model::weights::{read_safetensors, write_safetensors_atomic};
use crate::verify::{self, FixtureFiles, VerifyOptions};
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use tch::{nn, Device, Kind, Tensor};

/// Key of the token tensor in the files `eqim encode` writes and `eqim decode` reads.
pub const TOKENS_KEY: &str = "tokens";

/// Which tokenizer to build and which weights to put in it.
#[derive(clap::Args, Debug, Clone)]
pub struct TokenizerArgs {
    /// Tokenizer config: the reference YAML (fields under model.params) or a fixture JSON.
    /// Default: the released configuration (configs/second_stage/tokenizer_config.yaml).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Weights: a safetensors file with the reference's key names (`eqim convert-checkpoint`
    /// turns the released tokenizer.ckpt into one).
    #[arg(long)]
    pub checkpoint: Option<PathBuf>,
    /// Which copy of the weights to use: ema or live (default: EMA when the file has it).
    #[arg(long)]
    pub weights: Option<WeightChoice>,
    /// Use random weights instead of a checkpoint (for tests and memory measurements).
    #[arg(long, conflicts_with = "checkpoint")]
    pub random_weights: bool,
    /// Seed of the random weights and of posterior sampling.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// cpu, cuda, cuda:N or auto (CUDA when available).
    #[arg(long, default_value = "auto")]
    pub device: String,
}

#[derive(clap::Args, Debug, Clone)]
pub struct EncodeArgs {
    /// Images to encode; all must give the same number of tokens.
    #[arg(required = true)]
    pub images: Vec<PathBuf>,
    /// Output safetensors file; key `tokens` holds [N, L, embed_dim] (tokenizer scale, not
    /// multiplied by vae_norm).
    #[arg(long)]
    pub out: PathBuf,
    /// Resize each image to the tokenizer's height and centre-crop its width to a multiple of
    /// the downsampling factor (default: refuse images of another size).
    #[arg(long)]
    pub fit: bool,
    /// Draw from the posterior (as the generator's training does) instead of taking its mean.
    #[arg(long)]
    pub sample: bool,
    #[command(flatten)]
    pub tokenizer: TokenizerArgs,
}

#[derive(clap::Args, Debug, Clone)]
pub struct DecodeArgs {
    /// Safetensors file with `tokens` [N, L, embed_dim] or [L, embed_dim].
    pub tokens: PathBuf,
    /// Output folder; image i is written as `{i:05}.png`.
    #[arg(long)]
    pub out: PathBuf,
    /// Divide the tokens by this before decoding: 0.05493 (vae_norm) for generator latents,
    /// 1 for tokens from `eqim encode`.
    #[arg(long, default_value_t = 1.0)]
    pub latent_scale: f64,
    #[command(flatten)]
    pub tokenizer: TokenizerArgs,
}

#[derive(clap::Args, Debug, Clone)]
pub struct VerifyTokenizerArgs {
    /// Fixture prefix: PREFIX.json, PREFIX.weights.safetensors, PREFIX.io.safetensors.
    pub prefix: PathBuf,
    /// Largest max-abs error a case may have.
    #[arg(long, default_value_t = 1e-5)]
    pub tol: f64,
}

/// Parses `cpu`, `cuda`, `cuda:N` or `auto` (one parser for every command).
pub use crate::device::parse_device;

/// A tokenizer with its weights; the VarStore must outlive the model's use.
pub struct LoadedTokenizer {
    pub vs: nn::VarStore,
    pub model: EquivariantTokenizer,
}

/// Builds the tokenizer the arguments describe and loads its weights.
pub fn load_tokenizer(args: &TokenizerArgs) -> Result<LoadedTokenizer> {
    load_tokenizer_parts(args, Parts::All)
}

/// [`load_tokenizer`] building only the given parts (decoding needs no encoder).
pub fn load_tokenizer_parts(args: &TokenizerArgs, parts: Parts) -> Result<LoadedTokenizer> {
    let cfg = match &args.config {
        Some(path) => TokenizerConfig::from_file(path)?,
        None => TokenizerConfig::full(),
    };
    let device = parse_device(&args.device)?;
    let vs = nn::VarStore::new(device);
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

/// `eqim encode`: images -> one tokens file.
pub fn encode(args: &EncodeArgs) -> Result<()> {
    let _guard = tch::no_grad_guard();
    let tok = load_tokenizer(&args.tokenizer)?;
    let dd = &tok.model.cfg.ddconfig;
    let fit = if args.fit {
        Fit::ResizeHeight
    } else {
        Fit::Exact
    };
    let mut all = Vec::with_capacity(args.images.len());
    for path in &args.images {
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
        let z = if args.sample {
            posterior.sample()
        } else {
            posterior.mode()
        };
        if let Some(first) = all.first() {
            let first: &Tensor = first;
            if first.size() != z.size() {
                bail!(
                    "{} gives {} tokens, {} gives {}: encode images of different widths separately",
                    args.images[0].display(),
                    first.size()[1],
                    path.display(),
                    z.size()[1]
                );
            }
        }
        all.push(z.to_device(Device::Cpu));
    }
    let tokens = Tensor::cat(&all, 0).contiguous();
    tracing::info!(shape = ?tokens.size(), "writing {}", args.out.display());
    write_safetensors_atomic(&[(TOKENS_KEY.to_owned(), tokens)], &args.out)
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

/// `eqim decode`: a tokens file -> PNGs, one image at a time to bound memory.
pub fn decode(args: &DecodeArgs) -> Result<Vec<PathBuf>> {
    let _guard = tch::no_grad_guard();
    let tok = load_tokenizer_parts(&args.tokenizer, Parts::DecoderOnly)?;
    let tokens = read_tokens(&args.tokens)?;
    decode_to_pngs(&tok, &tokens, args.latent_scale, &args.out)
        .with_context(|| format!("decoding {}", args.tokens.display()))
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

/// `eqim verify-tokenizer PREFIX`: prints each case's max error; fails if any is over `--tol`.
pub fn verify_tokenizer(args: &VerifyTokenizerArgs) -> Result<()> {
    let files = FixtureFiles::from_prefix(&args.prefix)?;
    let json = files.read_json()?;
    let reports = verify::tokenizer::run_cases(&files, &json, &VerifyOptions::new(args.tol))?;
    let mut failed = 0;
    for r in &reports {
        let verdict = if r.passed() { "ok" } else { "FAIL" };
        println!(
            "{:<14} {verdict:<4} max abs err {:.3e} (tol {:.0e}): {}",
            r.case, r.max_abs_err, r.tol, r.detail
        );
        failed += usize::from(!r.passed());
    }
    if failed > 0 {
        bail!(
            "{failed} of {} tokenizer cases over tolerance",
            reports.len()
        );
    }
    Ok(())
}

#[derive(clap::Args, Debug, Clone)]
pub struct ExplainTokensArgs {
    /// The image to explain.
    pub image: PathBuf,
    /// Output PNG: L+1 rows, row k decoded from the image's first k tokens and random tokens
    /// after them.
    #[arg(long)]
    pub out: PathBuf,
    /// Resize and crop the image to fit the tokenizer (default: refuse other sizes).
    #[arg(long)]
    pub fit: bool,
    /// Use the posterior mean instead of a posterior sample (the reference notebook samples).
    #[arg(long)]
    pub mode: bool,
    #[command(flatten)]
    pub tokenizer: TokenizerArgs,
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

/// `eqim explain-tokens` (the reference's token_meaning notebook as a command): shows that each
/// token owns a column band of the image. Returns the strip [3, (L+1) H, W].
pub fn explain_tokens(args: &ExplainTokensArgs) -> Result<Tensor> {
    let _guard = tch::no_grad_guard();
    let tok = load_tokenizer(&args.tokenizer)?;
    let dd = &tok.model.cfg.ddconfig;
    let fit = if args.fit {
        Fit::ResizeHeight
    } else {
        Fit::Exact
    };
    let x = imageio::load_for_tokenizer(
        &args.image,
        dd.resolution as u32,
        dd.encoder_width_factor() as u32,
        fit,
    )?;
    let device = tok.vs.device();
    tch::manual_seed(args.tokenizer.seed as i64);
    let posterior = tok.model.encode(&x.unsqueeze(0).to_device(device))?;
    let latent = if args.mode {
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
    let strip = Tensor::cat(&rows, 1);
    imageio::save_png(&strip, &args.out)?;
    tracing::info!(rows = rows.len(), "wrote {}", args.out.display());
    Ok(strip)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::verify::tokenizer::fixtures_dir;

    /// A `width`x32 image with smooth gradients and a hard edge, written as PNG.
    fn write_test_image(path: &Path, width: u32) {
        let img = image::RgbImage::from_fn(width, 32, |x, y| {
            let edge = if x > width * 2 / 3 { 200 } else { 30 };
            image::Rgb([(x * 4) as u8, (y * 8) as u8, edge])
        });
        img.save(path).unwrap();
    }

    #[test]
    fn image_to_tokens_to_png_through_the_cli_functions() {
        let _guard = tch::no_grad_guard();
        let dir = tempfile::tempdir().unwrap();
        let img_path = dir.path().join("in.png");
        write_test_image(&img_path, 64);
        let fixture = fixtures_dir();
        let tokenizer = TokenizerArgs {
            config: Some(fixture.join("tokenizer_tiny.json")),
            checkpoint: Some(fixture.join("tokenizer_tiny.weights.safetensors")),
            weights: None,
            random_weights: false,
            seed: 0,
            device: "cpu".into(),
        };
        let tokens_path = dir.path().join("tokens.safetensors");
        encode(&EncodeArgs {
            images: vec![img_path.clone(), img_path.clone()],
            out: tokens_path.clone(),
            fit: false,
            sample: false,
            tokenizer: tokenizer.clone(),
        })
        .unwrap();
        let tokens = read_tokens(&tokens_path).unwrap();
        assert_eq!(tokens.size(), [2, 32, 16]);

        // The same computation by hand, with the EMA weights the CLI picks by default.
        let tok = load_tokenizer(&tokenizer).unwrap();
        let x = imageio::load_image(&img_path).unwrap().unsqueeze(0);
        let want = tok.model.encode(&x).unwrap().mode();
        assert!(tokens.get(1).unsqueeze(0).equal(&want));
        let live = load_tokenizer(&TokenizerArgs {
            weights: Some(WeightChoice::Live),
            ..tokenizer.clone()
        })
        .unwrap();
        assert!(!live.model.encode(&x).unwrap().mode().equal(&want));

        let out_dir = dir.path().join("out");
        let written = decode(&DecodeArgs {
            tokens: tokens_path,
            out: out_dir.clone(),
            latent_scale: 1.0,
            tokenizer: tokenizer.clone(),
        })
        .unwrap();
        assert_eq!(
            written,
            vec![out_dir.join("00000.png"), out_dir.join("00001.png")]
        );
        let png = image::open(&written[0]).unwrap().to_rgb8();
        assert_eq!((png.width(), png.height()), (64, 32));
        let want_png = imageio::tensor_to_rgb(&tok.model.decode(&want).unwrap().get(0)).unwrap();
        assert_eq!(png, want_png);

        // Generator latents are tokens x vae_norm; --latent-scale undoes it.
        let scaled_path = dir.path().join("scaled.safetensors");
        write_safetensors_atomic(&[(TOKENS_KEY.to_owned(), &tokens * 0.05493)], &scaled_path)
            .unwrap();
        let scaled_out = dir.path().join("scaled");
        let written = decode(&DecodeArgs {
            tokens: scaled_path,
            out: scaled_out,
            latent_scale: 0.05493,
            tokenizer: tokenizer.clone(),
        })
        .unwrap();
        let png = image::open(&written[1]).unwrap().to_rgb8();
        let diff = png
            .as_raw()
            .iter()
            .zip(want_png.as_raw())
            .map(|(a, b)| a.abs_diff(*b))
            .max()
            .unwrap();
        assert!(diff <= 1, "rescaled tokens decode differently: {diff}");

        let err = encode(&EncodeArgs {
            images: vec![fixture.join("../fixtures/README.md")],
            out: dir.path().join("x.safetensors"),
            fit: false,
            sample: false,
            tokenizer: TokenizerArgs {
                checkpoint: None,
                random_weights: true,
                ..load_args_for_errors()
            },
        })
        .unwrap_err();
        assert!(format!("{err:#}").contains("README.md"), "{err:#}");
    }

    fn load_args_for_errors() -> TokenizerArgs {
        TokenizerArgs {
            config: Some(fixtures_dir().join("tokenizer_tiny.json")),
            checkpoint: None,
            weights: None,
            random_weights: false,
            seed: 1,
            device: "cpu".into(),
        }
    }

    #[test]
    fn random_weights_are_seeded_and_a_missing_checkpoint_is_refused() {
        let a = load_tokenizer(&TokenizerArgs {
            random_weights: true,
            ..load_args_for_errors()
        })
        .unwrap();
        let b = load_tokenizer(&TokenizerArgs {
            random_weights: true,
            ..load_args_for_errors()
        })
        .unwrap();
        let (va, vb) = (a.vs.variables(), b.vs.variables());
        assert!(va.iter().all(|(k, v)| v.equal(&vb[k])));
        let err = load_tokenizer(&load_args_for_errors()).err().unwrap();
        assert!(err.to_string().contains("--checkpoint"), "{err}");
    }

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

        let dir = tempfile::tempdir().unwrap();
        let img_path = dir.path().join("in.png");
        write_test_image(&img_path, 8);
        let out = dir.path().join("strip.png");
        let strip = explain_tokens(&ExplainTokensArgs {
            image: img_path,
            out: out.clone(),
            fit: false,
            mode: true,
            tokenizer: TokenizerArgs {
                random_weights: true,
                ..load_args_for_errors()
            },
        })
        .unwrap();
        // 8 px wide -> 4 tokens -> 5 rows of 32 px.
        assert_eq!(strip.size(), [3, 5 * 32, 8]);
        let png = image::open(&out).unwrap().to_rgb8();
        assert_eq!((png.width(), png.height()), (8, 5 * 32));
    }
}
