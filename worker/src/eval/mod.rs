//! Evaluation: the FID Inception, feature moments and the Frechet distance, statistics files,
//! and what the `eqim fid-stats` / `eqim fid` commands run.

pub mod class_consistency;
pub mod fid;
pub mod inception;
pub use eqim_common::npz;
pub mod numpy_rng;
pub mod run;

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use tch::{Device, Tensor};

use crate::progress::{Activity, Progress};
use fid::{frechet_distance, inception_score, FeatureMoments, FidStats, FID_MIN_UNBIASED_IMAGES};
use inception::{
    default_inception_path, preprocess_images, read_rgb_image, Inception, INCEPTION_DIM,
};

/// Options shared by the FID commands.
#[derive(Debug, Clone)]
pub struct InceptionOptions {
    /// TorchScript Inception file [default: $EQIM_INCEPTION or
    /// ${EQIM_CACHE:-~/.cache/eqim}/inception/fid_inception_v3.pt, from scripts/fetch-inception].
    pub inception: Option<PathBuf>,
    /// Images per Inception forward.
    pub batch_size: usize,
    pub device: Device,
    /// Classifier for the Inception Score on top of pool3: an npz with `weight` [C, 2048], e.g.
    /// the 1008-class `fc.weight` of the standard pt_inception weights (`scripts/make-fidelity-fixture
    /// classifier PTH OUT.npz` extracts it). The IS then follows torch-fidelity's protocol.
    pub inception_classifier: Option<PathBuf>,
}

impl InceptionOptions {
    /// The Inception network (with the IS classifier when one is given) on `device`.
    pub fn load(&self) -> Result<Inception> {
        let device = self.device;
        let path = self
            .inception
            .clone()
            .unwrap_or_else(default_inception_path);
        let net = Inception::load(&path, device)?;
        match &self.inception_classifier {
            Some(file) => Ok(net.with_classifier(inception::read_classifier(file)?)?),
            None => Ok(net),
        }
    }
}

/// `eqim fid-stats DIR --out stats.npz`
#[derive(Debug, Clone)]
pub struct FidStatsOptions {
    /// Folder of images (png, jpg; read in name order).
    pub dir: PathBuf,
    /// Statistics file to write (npz with `mu` [2048], `sigma` [2048, 2048], float64).
    pub out: PathBuf,
    pub inception: InceptionOptions,
}

/// `eqim fid --images DIR --stats stats.npz`
#[derive(Debug, Clone)]
pub struct FidOptions {
    /// Folder of generated images.
    pub images: PathBuf,
    /// Reference statistics: an npz with `mu`, `sigma` (`eqim fid-stats`, pytorch-fid, ADM's
    /// reference batches) or torch-fidelity's cached `*-inception-v3-compat-stat-fid-2048.pt`.
    pub stats: PathBuf,
    /// Splits for the Inception Score (only when the Inception file has logits).
    pub is_splits: usize,
    pub inception: InceptionOptions,
}

/// The image files of a folder (png, jpg, jpeg; any case), sorted by name.
pub fn image_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let path = entry
            .with_context(|| format!("listing {}", dir.display()))?
            .path();
        let ext = path
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase);
        if matches!(ext.as_deref(), Some("png" | "jpg" | "jpeg")) {
            files.push(path);
        }
    }
    files.sort();
    anyhow::ensure!(
        !files.is_empty(),
        "{} holds no png/jpg images",
        dir.display()
    );
    Ok(files)
}

/// Features of a folder's images: f64 moments and, when the network has them, all logits.
pub struct FolderFeatures {
    pub moments: FeatureMoments,
    pub logits: Option<Tensor>,
    pub seconds: f64,
}

pub fn folder_features(net: &Inception, dir: &Path, batch_size: usize) -> Result<FolderFeatures> {
    folder_features_of(net, &image_files(dir)?, batch_size)
}

/// Features of the given image files, in order.
pub fn folder_features_of(
    net: &Inception,
    files: &[PathBuf],
    batch_size: usize,
) -> Result<FolderFeatures> {
    anyhow::ensure!(batch_size > 0, "--batch-size must be at least 1");
    let start = Instant::now();
    let mut progress = Progress::new(Activity::Evaluation, Some(files.len() as u64));
    progress.set_message("inception features");
    let mut moments = FeatureMoments::new(INCEPTION_DIM);
    let mut logits = Vec::new();
    for chunk in files.chunks(batch_size) {
        // Images may differ in size: resize each to 299 before batching.
        let batch = chunk
            .iter()
            .map(|path| {
                let image = read_rgb_image(path)?.unsqueeze(0);
                Ok(preprocess_images(&image, net.device())?)
            })
            .collect::<Result<Vec<_>>>()?;
        let (features, batch_logits) = net.forward_preprocessed(&Tensor::cat(&batch, 0))?;
        fid::add_feature_batch(&mut moments, &features)?;
        logits.extend(batch_logits.map(|l| l.to_device(Device::Cpu)));
        progress.inc(chunk.len() as u64);
    }
    progress.finish();
    let logits = (!logits.is_empty()).then(|| Tensor::cat(&logits, 0));
    Ok(FolderFeatures {
        moments,
        logits,
        seconds: start.elapsed().as_secs_f64(),
    })
}

pub fn warn_if_small(count: u64) {
    if count < FID_MIN_UNBIASED_IMAGES {
        tracing::warn!(
            images = count,
            "FID from fewer than {FID_MIN_UNBIASED_IMAGES} images is biased upwards (and sigma is rank-deficient); compare only numbers computed with the same N"
        );
    }
}

pub fn run_fid_stats(args: &FidStatsOptions) -> Result<()> {
    let net = args.inception.load()?;
    let features = folder_features(&net, &args.dir, args.inception.batch_size)?;
    warn_if_small(features.moments.count);
    let stats = features.moments.stats()?;
    stats
        .write(&args.out)
        .with_context(|| format!("writing {}", args.out.display()))?;
    println!(
        "wrote {} ({} images, {:.1} images/s)",
        args.out.display(),
        features.moments.count,
        features.moments.count as f64 / features.seconds
    );
    Ok(())
}

pub fn run_fid(args: &FidOptions) -> Result<()> {
    let reference = FidStats::read(&args.stats)?;
    let net = args.inception.load()?;
    let features = folder_features(&net, &args.images, args.inception.batch_size)?;
    warn_if_small(features.moments.count);
    let fid = frechet_distance(&features.moments.stats()?, &reference)?;
    println!("fid {fid:.4} ({} images)", features.moments.count);
    match features.logits {
        Some(logits) if logits.size()[0] >= args.is_splits as i64 => {
            let (mean, std) = inception_score(&logits, args.is_splits)?;
            println!("inception_score {mean:.4} +- {std:.4}");
        }
        Some(_) => println!("inception_score skipped: fewer images than --is-splits"),
        None => println!(
            "inception_score unavailable: the Inception file has no classifier logits (pass --inception-classifier)"
        ),
    }
    Ok(())
}
