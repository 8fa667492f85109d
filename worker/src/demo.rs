//! The demo pipeline's steps: `eqim cache-latents` (encode an image folder with a
//! tokenizer into a latent cache, and measure the latent scale the generator should use) and
//! `eqim contact-sheet` (real photos next to samples, one row per class, plus panoramas).

use crate::contact_sheet::{compose, read_rgb, write_png, SheetLayout, SheetRow};
use crate::data::{
    Augment, ImageDataset, ImageFolder, ImageTransform, LatentCacheWriter, TransformConfig,
};
use crate::tokenizer_io::{load_tokenizer, TokenizerOptions};
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tch::{Kind, Tensor};

#[derive(Debug, Clone)]
pub struct CacheLatentsOptions {
    /// Class-per-folder image tree (e.g. the output of scripts/fetch-demo-data).
    pub data: PathBuf,
    /// Output latent cache (safetensors).
    pub out: PathBuf,
    /// Image side the tokenizer expects (shorter side resized, then centre-cropped square).
    pub size: u32,
    pub batch: usize,
    pub tokenizer: TokenizerOptions,
}

/// What `cache-latents` measured: the generator's `vae_norm` should be `1 / latent_std`, as the
/// reference's 0.05493 is for the released tokenizer.
#[derive(Debug, Clone, Copy)]
pub struct LatentStats {
    pub rows: usize,
    pub latent_std: f64,
    pub suggested_vae_norm: f64,
}

pub fn cache_latents(args: &CacheLatentsOptions) -> Result<LatentStats> {
    let tok = load_tokenizer(&args.tokenizer)?;
    let folder = ImageFolder::open(&args.data)
        .with_context(|| format!("opening image folder {}", args.data.display()))?;
    let transform = ImageTransform::new(TransformConfig::square(args.size), Augment::Eval)?;
    let source = Arc::new(ImageDataset::new(folder, transform));
    let device = tok.vs.device();
    let encode = |images: &Tensor| -> Tensor {
        let _guard = tch::no_grad_guard();
        tok.model
            .encode(&images.to_device(device))
            .expect("cache-latents: images have the tokenizer's size (resized and cropped above)")
            .mode()
            .to_device(tch::Device::Cpu)
    };
    let summary = LatentCacheWriter::new(args.batch)
        .with_metadata("source", &args.data.display().to_string())
        .write(source, &args.out, encode)
        .with_context(|| format!("writing latent cache {}", args.out.display()))?;
    let cache = crate::data::LatentCache::open(&args.out)?;
    let rows: Vec<usize> = (0..cache.len()).collect();
    let (latents, _labels) = cache.batch(&rows, &vec![false; rows.len()])?;
    let latent_std = latents.to_kind(Kind::Double).std(true).double_value(&[]);
    if !(latent_std.is_finite() && latent_std > 0.0) {
        bail!(
            "latents in {} have std {latent_std}: the tokenizer output is degenerate",
            args.out.display()
        );
    }
    let stats = LatentStats {
        rows: cache.len(),
        latent_std,
        suggested_vae_norm: 1.0 / latent_std,
    };
    tracing::info!(?summary, "latent cache written");
    println!(
        "cached {} images (both flips) into {}; latent std {:.4}, vae_norm {:.5}",
        stats.rows,
        args.out.display(),
        stats.latent_std,
        stats.suggested_vae_norm
    );
    Ok(stats)
}

#[derive(Debug, Clone)]
pub struct ContactSheetOptions {
    /// Class-per-folder tree of real images; the first --per-row of each class form its row.
    pub real: Option<PathBuf>,
    /// One folder of samples per class (sorted by name, aligned with the real classes): each
    /// gives a row.
    pub samples: Vec<PathBuf>,
    /// Wide images (panoramas), one row each, after the class rows.
    pub wide: Vec<PathBuf>,
    pub per_row: usize,
    pub scale: u32,
    pub out: PathBuf,
}

fn first_pngs(dir: &Path, n: usize) -> Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("listing {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e.eq_ignore_ascii_case("png")))
        .collect();
    files.sort();
    files.truncate(n);
    Ok(files)
}

/// Builds the sheet: per class a row of real images then a row of samples, then the panoramas.
pub fn contact_sheet(args: &ContactSheetOptions) -> Result<()> {
    let read_all = |paths: Vec<PathBuf>| -> Result<Vec<image::RgbImage>> {
        paths.iter().map(|p| read_rgb(p)).collect()
    };
    let real_classes: Vec<PathBuf> = match &args.real {
        Some(root) => {
            let mut dirs: Vec<PathBuf> = std::fs::read_dir(root)
                .with_context(|| format!("listing {}", root.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.is_dir())
                .collect();
            dirs.sort();
            dirs
        }
        None => Vec::new(),
    };
    let mut rows = Vec::new();
    for i in 0..real_classes.len().max(args.samples.len()) {
        let mut first = true;
        if let Some(dir) = real_classes.get(i) {
            rows.push(SheetRow {
                images: read_all(first_pngs(dir, args.per_row)?)?,
                new_group: true,
            });
            first = false;
        }
        if let Some(dir) = args.samples.get(i) {
            rows.push(SheetRow {
                images: read_all(first_pngs(dir, args.per_row)?)?,
                new_group: first,
            });
        }
    }
    for w in &args.wide {
        rows.push(SheetRow {
            images: vec![read_rgb(w)?],
            new_group: true,
        });
    }
    if rows.is_empty() {
        bail!("nothing to put on the contact sheet: give --real, --samples or --wide");
    }
    let layout = SheetLayout {
        scale: args.scale,
        ..SheetLayout::default()
    };
    write_png(&compose(&rows, &layout), &args.out)?;
    println!("wrote {}", args.out.display());
    Ok(())
}
