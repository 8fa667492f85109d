//! `eqim bench-loader` (hidden): images/s the data pipeline decodes and augments (train
//! transform: resize shorter side, random crop, flip, [-1, 1] CHW floats), on one core and with
//! the threaded loader. scripts/bench-loader runs it next to a PIL stand-in for torchvision.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use image::RgbImage;
use serde::Serialize;

use super::folder::{decode_rgb, ImageDataset, ImageFolder};
use super::loader::{load_batch, BatchLoader, LoaderConfig, SampleSource};
use super::resize::resize_fast;
use super::transform::{Augment, ImageTransform, SampleRng, TransformConfig};

#[derive(Debug)]
pub struct BenchLoaderOptions {
    /// A class-per-folder image tree to read.
    pub images: PathBuf,
    /// First write this many synthetic 500x375 JPEGs (ImageNet's typical size) into --images,
    /// if it has no images yet.
    pub generate: usize,
    /// Output side (the reference trains at 256).
    pub size: u32,
    pub batch: usize,
    /// Loader threads for the multi-threaded pass (default: all cores but one).
    pub threads: Option<usize>,
}

#[derive(Serialize)]
struct BenchReport {
    images: usize,
    size: u32,
    decode_only_images_per_s: f64,
    decode_resize_images_per_s: f64,
    single_thread_images_per_s: f64,
    loader_threads: usize,
    loader_images_per_s: f64,
    loader_images_per_s_per_thread: f64,
}

pub fn run(args: &BenchLoaderOptions) -> Result<()> {
    if args.generate > 0 && !has_entries(&args.images) {
        generate_jpegs(&args.images, args.generate)?;
    }
    let folder = ImageFolder::open(&args.images)
        .with_context(|| format!("opening benchmark images {}", args.images.display()))?;
    let transform = ImageTransform::new(TransformConfig::square(args.size), Augment::Train)?;
    let dataset: Arc<dyn SampleSource> = Arc::new(ImageDataset::new(folder, transform));
    let indices: Vec<usize> = (0..dataset.len()).collect();

    // Warm the page cache so both passes measure decoding, not the disk.
    load_batch(&*dataset, 0, &indices, 0);
    let (decode_only, decode_resize) = stage_rates(&folder_paths(&args.images)?, &transform)?;
    let start = Instant::now();
    for (position, chunk) in indices.chunks(args.batch.max(1)).enumerate() {
        load_batch(&*dataset, position, chunk, 1);
    }
    let single = indices.len() as f64 / start.elapsed().as_secs_f64();

    let mut config = LoaderConfig::with_seed(2);
    if let Some(t) = args.threads {
        config = config.with_threads(t);
    }
    let start = Instant::now();
    let mut seen = 0;
    for batch in BatchLoader::from_indices(dataset.clone(), &indices, args.batch, &config) {
        seen += batch?.len();
    }
    let threaded = seen as f64 / start.elapsed().as_secs_f64();
    let report = BenchReport {
        images: indices.len(),
        size: args.size,
        decode_only_images_per_s: decode_only,
        decode_resize_images_per_s: decode_resize,
        single_thread_images_per_s: single,
        loader_threads: config.num_threads,
        loader_images_per_s: threaded,
        loader_images_per_s_per_thread: threaded / config.num_threads as f64,
    };
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

fn folder_paths(root: &Path) -> Result<Vec<PathBuf>> {
    let folder = ImageFolder::open(root)?;
    Ok((0..folder.len())
        .map(|i| folder.path(i).to_path_buf())
        .collect())
}

/// Images/s of decoding alone and of decoding plus the shorter-side resize, on this thread.
fn stage_rates(paths: &[PathBuf], transform: &ImageTransform) -> Result<(f64, f64)> {
    let start = Instant::now();
    for p in paths {
        decode_rgb(p)?;
    }
    let decode = paths.len() as f64 / start.elapsed().as_secs_f64();
    let start = Instant::now();
    for p in paths {
        let img = decode_rgb(p)?;
        let (w, h) = transform.resized_size(img.width(), img.height());
        std::hint::black_box(resize_fast(&img, w, h));
    }
    Ok((decode, paths.len() as f64 / start.elapsed().as_secs_f64()))
}

fn has_entries(dir: &Path) -> bool {
    std::fs::read_dir(dir).is_ok_and(|mut d| d.next().is_some())
}

/// Smooth colour fields plus grain, so the JPEGs carry photo-like entropy (flat images would
/// decode unrealistically fast).
fn generate_jpegs(dir: &Path, count: usize) -> Result<()> {
    for i in 0..count {
        let class_dir = dir.join(format!("class{:02}", i % 10));
        std::fs::create_dir_all(&class_dir)
            .with_context(|| format!("creating {}", class_dir.display()))?;
        let mut rng = SampleRng::new(99, i as u64, 0);
        let (fx, fy, phase) = (
            1.0 + rng.unit_f64() * 6.0,
            1.0 + rng.unit_f64() * 6.0,
            rng.unit_f64() * std::f64::consts::TAU,
        );
        let img = RgbImage::from_fn(500, 375, |x, y| {
            let (u, v) = (x as f64 / 500.0, y as f64 / 375.0);
            let base = [
                (u * fx * 3.1 + phase).sin(),
                (v * fy * 3.1 + phase).cos(),
                ((u + v) * (fx + fy) + phase).sin(),
            ];
            let grain = (rng.next_u64() % 41) as f64 - 20.0;
            image::Rgb(base.map(|b| (128.0 + 90.0 * b + grain).clamp(0.0, 255.0) as u8))
        });
        let path = class_dir.join(format!("{i:05}.jpg"));
        img.save_with_format(&path, image::ImageFormat::Jpeg)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}
