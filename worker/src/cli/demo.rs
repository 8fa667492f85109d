//! The demo pipeline's commands: `eqim cache-latents`, `eqim contact-sheet` and
//! `eqim prepare-demo-data`.

use super::tokenizer::TokenizerArgs;
use crate::data::demo::PrepareDemoDataOptions;
use crate::demo::{CacheLatentsOptions, ContactSheetOptions};
use anyhow::Result;
use std::path::PathBuf;

#[derive(clap::Args, Debug, Clone)]
pub struct CacheLatentsArgs {
    /// Class-per-folder image tree (e.g. the output of scripts/fetch-demo-data).
    #[arg(long)]
    pub data: PathBuf,
    /// Output latent cache (safetensors).
    #[arg(long)]
    pub out: PathBuf,
    /// Image side the tokenizer expects (shorter side resized, then centre-cropped square).
    #[arg(long, default_value_t = 256)]
    pub size: u32,
    #[arg(long, default_value_t = 32)]
    pub batch: usize,
    #[command(flatten)]
    pub tokenizer: TokenizerArgs,
}

impl CacheLatentsArgs {
    /// The library's options, with the device parsed.
    pub fn options(self) -> Result<CacheLatentsOptions> {
        Ok(CacheLatentsOptions {
            data: self.data,
            out: self.out,
            size: self.size,
            batch: self.batch,
            tokenizer: self.tokenizer.options()?,
        })
    }
}

#[derive(clap::Args, Debug, Clone)]
pub struct ContactSheetArgs {
    /// Class-per-folder tree of real images; the first --per-row of each class form its row.
    #[arg(long)]
    pub real: Option<PathBuf>,
    /// One folder of samples per class (sorted by name, aligned with the real classes): each
    /// gives a row.
    #[arg(long, num_args = 1..)]
    pub samples: Vec<PathBuf>,
    /// Wide images (panoramas), one row each, after the class rows.
    #[arg(long, num_args = 1..)]
    pub wide: Vec<PathBuf>,
    #[arg(long, default_value_t = 8)]
    pub per_row: usize,
    #[arg(long, default_value_t = 3)]
    pub scale: u32,
    #[arg(long)]
    pub out: PathBuf,
}

impl From<ContactSheetArgs> for ContactSheetOptions {
    fn from(a: ContactSheetArgs) -> Self {
        Self {
            real: a.real,
            samples: a.samples,
            wide: a.wide,
            per_row: a.per_row,
            scale: a.scale,
            out: a.out,
        }
    }
}

#[derive(clap::Args, Debug)]
pub struct PrepareDemoDataArgs {
    /// The photo list and crop settings.
    #[arg(long, default_value = "configs/demo-data.toml")]
    pub config: PathBuf,
    /// Folder with one unpacked tree per package (`<source>/<package>/usr/...`) and its version in
    /// `<source>/<package>.version` (scripts/fetch-demo-data makes both).
    #[arg(long)]
    pub source: PathBuf,
    /// Output folder; replaced atomically.
    #[arg(long)]
    pub out: PathBuf,
    /// Crop side in pixels (overrides the config's crop_size).
    #[arg(long)]
    pub size: Option<u32>,
    /// Crops per photo (overrides the config's crops_per_photo).
    #[arg(long)]
    pub crops: Option<usize>,
}

impl From<PrepareDemoDataArgs> for PrepareDemoDataOptions {
    fn from(a: PrepareDemoDataArgs) -> Self {
        Self {
            config: a.config,
            source: a.source,
            out: a.out,
            size: a.size,
            crops: a.crops,
        }
    }
}

/// Runs `eqim cache-latents`.
pub fn cache_latents(args: CacheLatentsArgs) -> Result<()> {
    crate::demo::cache_latents(&args.options()?).map(drop)
}

/// Runs `eqim contact-sheet`.
pub fn contact_sheet(args: ContactSheetArgs) -> Result<()> {
    crate::demo::contact_sheet(&args.into())
}

/// Runs `eqim prepare-demo-data`.
pub fn prepare_demo_data(args: PrepareDemoDataArgs) -> Result<()> {
    crate::data::demo::run(&args.into())
}
