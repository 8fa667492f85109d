//! The tokenizer's commands: `eqim encode`, `eqim decode`, `eqim explain-tokens`,
//! `eqim verify-tokenizer` (hidden) and `eqim convert-checkpoint`, and the tokenizer flags
//! ([`TokenizerArgs`]) the sampling and demo commands share.

use crate::imageio::{self, Fit};
use crate::model::tokenizer::{Parts, WeightChoice};
use crate::model::weights::write_safetensors_atomic;
use crate::tokenizer_io::{
    decode_to_pngs, encode_files, explain_strip, load_tokenizer, load_tokenizer_parts, read_tokens,
    TokenizerOptions, TOKENS_KEY,
};
use crate::verify::{self, FixtureFiles, VerifyOptions};
use anyhow::{bail, Context, Result};
use std::path::PathBuf;
use tch::Tensor;

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

impl TokenizerArgs {
    /// The library's options, with `--device` parsed.
    pub fn options(&self) -> Result<TokenizerOptions> {
        Ok(TokenizerOptions {
            config: self.config.clone(),
            checkpoint: self.checkpoint.clone(),
            weights: self.weights,
            random_weights: self.random_weights,
            seed: self.seed,
            device: crate::device::parse_device(&self.device)?,
        })
    }
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

#[derive(clap::Args, Debug, Clone)]
pub struct ConvertArgs {
    /// The checkpoint: tokenizer.ckpt (Lightning, `state_dict`) or a generator checkpoint
    /// (`model` / `model_ema`).
    pub input: PathBuf,
    /// The safetensors file to write.
    pub output: PathBuf,
    /// Generator checkpoints: convert `model_ema` (ema, what sampling uses) or `model` (live).
    #[arg(long, default_value = "ema", value_parser = ["ema", "live"])]
    pub generator_weights: String,
    /// Keep the `loss.*` keys of a Lightning checkpoint (dropped by default; loaders ignore them).
    #[arg(long)]
    pub keep_loss: bool,
}

fn fit_of(fit: bool) -> Fit {
    if fit {
        Fit::ResizeHeight
    } else {
        Fit::Exact
    }
}

/// `eqim encode`: images -> one tokens file.
pub fn encode(args: &EncodeArgs) -> Result<()> {
    let tok = load_tokenizer(&args.tokenizer.options()?)?;
    let tokens = encode_files(&tok, &args.images, fit_of(args.fit), args.sample)?;
    tracing::info!(shape = ?tokens.size(), "writing {}", args.out.display());
    write_safetensors_atomic(&[(TOKENS_KEY.to_owned(), tokens)], &args.out)
}

/// `eqim decode`: a tokens file -> PNGs, one image at a time to bound memory.
pub fn decode(args: &DecodeArgs) -> Result<Vec<PathBuf>> {
    let tok = load_tokenizer_parts(&args.tokenizer.options()?, Parts::DecoderOnly)?;
    let tokens = read_tokens(&args.tokens)?;
    decode_to_pngs(&tok, &tokens, args.latent_scale, &args.out)
        .with_context(|| format!("decoding {}", args.tokens.display()))
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

/// `eqim explain-tokens` (the reference's token_meaning notebook as a command): shows that each
/// token owns a column band of the image. Returns the strip [3, (L+1) H, W].
pub fn explain_tokens(args: &ExplainTokensArgs) -> Result<Tensor> {
    let tok = load_tokenizer(&args.tokenizer.options()?)?;
    let strip = explain_strip(
        &tok,
        &args.image,
        fit_of(args.fit),
        args.mode,
        args.tokenizer.seed,
    )?;
    imageio::save_png(&strip, &args.out)?;
    tracing::info!(shape = ?strip.size(), "wrote {}", args.out.display());
    Ok(strip)
}

/// `eqim convert-checkpoint IN OUT`: prints the converter's report (the ignored keys).
pub fn convert_checkpoint(args: &ConvertArgs) -> Result<()> {
    let report = crate::convert::run(&crate::convert::ConvertOptions {
        input: args.input.clone(),
        output: args.output.clone(),
        generator_weights: args.generator_weights.clone(),
        keep_loss: args.keep_loss,
    })?;
    eprint!("{report}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::verify::tokenizer::fixtures_dir;
    use std::path::Path;

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
        let tok = load_tokenizer(&tokenizer.options().unwrap()).unwrap();
        let x = imageio::load_image(&img_path).unwrap().unsqueeze(0);
        let want = tok.model.encode(&x).unwrap().mode();
        assert!(tokens.get(1).unsqueeze(0).equal(&want));
        let live = load_tokenizer(&TokenizerOptions {
            weights: Some(WeightChoice::Live),
            ..tokenizer.options().unwrap()
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
        let a = load_tokenizer(&TokenizerOptions {
            random_weights: true,
            ..load_args_for_errors().options().unwrap()
        })
        .unwrap();
        let b = load_tokenizer(&TokenizerOptions {
            random_weights: true,
            ..load_args_for_errors().options().unwrap()
        })
        .unwrap();
        let (va, vb) = (a.vs.variables(), b.vs.variables());
        assert!(va.iter().all(|(k, v)| v.equal(&vb[k])));
        let err = load_tokenizer(&load_args_for_errors().options().unwrap())
            .err()
            .unwrap();
        assert!(err.to_string().contains("--checkpoint"), "{err}");
    }

    #[test]
    fn explain_tokens_writes_one_row_per_token_count() {
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
