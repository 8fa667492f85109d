//! The image folder of tokenizer training: every PNG/JPEG under a directory, addressed by index
//! (the files sorted by path), resized so it covers `height × width` (bilinear), random-cropped
//! and flipped with p = 0.5, as the reference's `SmallestMaxSize → RandomCrop → HorizontalFlip`
//! (spec §2.12), in [-1, 1] NCHW. Which indices a step takes is the shared data schedule's
//! (`eqim_common::schedule`); the crop and flip of an image are drawn from the shared per-sample
//! seed streams (`crate::data::transform`), so a resumed run sees the same batches.

use crate::data::transform::{epoch_seed, SampleRng, STREAM_IMAGE_AUGMENT};
use anyhow::{bail, Context, Result};
use image::{imageops::FilterType, RgbImage};
use std::path::{Path, PathBuf};
use tch::{Kind, Tensor};

/// Lists PNG/JPEG files under `root`, recursively, sorted.
pub fn list_images(root: &Path) -> Result<Vec<PathBuf>> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
        for entry in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
            let path = entry?.path();
            if path.is_dir() {
                walk(&path, out)?;
            } else if let Some(ext) = path.extension().and_then(|e| e.to_str()) {
                if matches!(ext.to_ascii_lowercase().as_str(), "png" | "jpg" | "jpeg") {
                    out.push(path);
                }
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    walk(root, &mut out)?;
    out.sort();
    if out.is_empty() {
        bail!(
            "no PNG/JPEG images under {} (eqim.data.train_dir)",
            root.display()
        );
    }
    Ok(out)
}

/// Resizes `img` so it covers `height × width` with its aspect ratio kept.
fn cover(img: &RgbImage, height: u32, width: u32) -> RgbImage {
    let (w, h) = img.dimensions();
    let scale = (f64::from(height) / f64::from(h)).max(f64::from(width) / f64::from(w));
    let nw = ((f64::from(w) * scale).round() as u32).max(width);
    let nh = ((f64::from(h) * scale).round() as u32).max(height);
    if (nw, nh) == (w, h) {
        img.clone()
    } else {
        image::imageops::resize(img, nw, nh, FilterType::Triangle)
    }
}

/// RGB u8 image → [3, H, W] float in [-1, 1] (`x/127.5 − 1`).
pub fn to_tensor(img: &RgbImage) -> Tensor {
    let (w, h) = img.dimensions();
    Tensor::from_slice(img.as_raw())
        .view([i64::from(h), i64::from(w), 3])
        .permute([2, 0, 1])
        .to_kind(Kind::Float)
        / 127.5
        - 1.0
}

/// [3, H, W] in [-1, 1] → RGB u8 image (clamped).
pub fn to_image(t: &Tensor) -> Result<RgbImage> {
    let size = t.size();
    let [3, h, w] = size.as_slice() else {
        bail!("expected a [3, H, W] image tensor, got {size:?}");
    };
    let bytes = ((t.to_device(tch::Device::Cpu).to_kind(Kind::Float) + 1.0) * 127.5)
        .round()
        .clamp(0.0, 255.0)
        .to_kind(Kind::Uint8)
        .permute([1, 2, 0])
        .contiguous();
    let raw = Vec::<u8>::try_from(bytes.flatten(0, -1)).context("image tensor to bytes")?;
    RgbImage::from_raw(*w as u32, *h as u32, raw).context("image buffer size")
}

/// The images of a folder, cropped and flipped per (seed, epoch, index).
pub struct ImageBatches {
    paths: Vec<PathBuf>,
    height: u32,
    width: u32,
    seed: u64,
}

impl ImageBatches {
    pub fn new(root: &Path, height: i64, width: i64, seed: u64) -> Result<Self> {
        let paths = list_images(root)?;
        Ok(Self {
            paths,
            height: height as u32,
            width: width as u32,
            seed,
        })
    }

    pub fn len(&self) -> usize {
        self.paths.len()
    }

    pub fn is_empty(&self) -> bool {
        self.paths.is_empty()
    }

    /// Image `index`, random-cropped and flipped with the draws of `rng`, or centre-cropped.
    fn load(&self, index: usize, rng: Option<&mut SampleRng>) -> Result<Tensor> {
        let path = &self.paths[index];
        let img = image::open(path)
            .with_context(|| format!("decoding training image {}", path.display()))?
            .to_rgb8();
        let img = cover(&img, self.height, self.width);
        let (w, h) = img.dimensions();
        let (x0, y0, flip) = match rng {
            Some(rng) => (
                rng.below(u64::from(w - self.width + 1)) as u32,
                rng.below(u64::from(h - self.height + 1)) as u32,
                rng.coin(),
            ),
            None => ((w - self.width) / 2, (h - self.height) / 2, false),
        };
        let mut crop = image::imageops::crop_imm(&img, x0, y0, self.width, self.height).to_image();
        if flip {
            image::imageops::flip_horizontal_in_place(&mut crop);
        }
        Ok(to_tensor(&crop))
    }

    /// The training batch [B, 3, height, width] of the images `indices` in epoch `epoch`.
    pub fn batch(&self, epoch: u64, indices: &[u64]) -> Result<Tensor> {
        let seed = epoch_seed(self.seed, epoch);
        let items = indices
            .iter()
            .map(|&i| {
                let mut rng = SampleRng::new(seed, i, STREAM_IMAGE_AUGMENT);
                self.load(i as usize, Some(&mut rng))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Tensor::stack(&items, 0))
    }

    /// `n` images spread evenly over the sorted file list (so over the class folders),
    /// centre-cropped and unflipped (for the reconstruction sheet).
    pub fn fixed_batch(&self, n: usize) -> Result<Tensor> {
        let total = self.paths.len();
        let n = n.min(total);
        let items = (0..n)
            .map(|i| self.load(i * total / n, None))
            .collect::<Result<Vec<_>>>()?;
        Ok(Tensor::stack(&items, 0))
    }
}

/// Writes a grid: one row per tensor batch (each [B, 3, H, W] in [-1, 1]), 2-px white gaps.
pub fn write_sheet(rows: &[&Tensor], path: &Path) -> Result<()> {
    let size = rows
        .first()
        .context("reconstruction sheet needs at least one row")?
        .size();
    let [n, 3, h, w] = size.as_slice() else {
        bail!("sheet rows must be [B, 3, H, W], got {size:?}");
    };
    let gap = 2u32;
    let (n, h, w) = (*n as u32, *h as u32, *w as u32);
    let mut sheet = RgbImage::from_pixel(
        n * (w + gap) + gap,
        rows.len() as u32 * (h + gap) + gap,
        image::Rgb([255, 255, 255]),
    );
    for (r, row) in rows.iter().enumerate() {
        for i in 0..n {
            let tile = to_image(&row.get(i64::from(i)))?;
            image::imageops::replace(
                &mut sheet,
                &tile,
                i64::from(gap + i * (w + gap)),
                i64::from(gap + r as u32 * (h + gap)),
            );
        }
    }
    crate::imageio::write_png(&sheet, path)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folder_images_become_cropped_batches_in_range() {
        let dir = tempfile::tempdir().expect("tempdir");
        let sub = dir.path().join("class_a");
        std::fs::create_dir_all(&sub).expect("mkdir");
        for i in 0..3u8 {
            let img = RgbImage::from_fn(40 + u32::from(i) * 10, 30, |x, y| {
                image::Rgb([(x * 5) as u8, (y * 8) as u8, i * 80])
            });
            img.save(sub.join(format!("{i}.png"))).expect("save");
        }
        std::fs::write(dir.path().join("notes.txt"), "not an image").expect("write");
        let b = ImageBatches::new(dir.path(), 16, 24, 0).expect("open");
        assert_eq!(b.len(), 3);
        let x = b.batch(0, &[2, 0, 1, 2, 2]).expect("batch");
        assert_eq!(x.size(), vec![5, 3, 16, 24]);
        assert!(x.min().double_value(&[]) >= -1.0 && x.max().double_value(&[]) <= 1.0);
        // Crops and flips are functions of (seed, epoch, index): repeatable, and they vary.
        assert!(x.get(0).equal(&b.batch(0, &[2]).expect("again").get(0)));
        let epochs: Vec<Tensor> = (0..8)
            .map(|e| b.batch(e, &[2]).expect("epoch").get(0))
            .collect();
        assert!(
            epochs.iter().any(|t| !t.equal(&epochs[0])),
            "no augmentation across epochs"
        );
        let fixed = b.fixed_batch(2).expect("fixed");
        assert_eq!(fixed.size(), vec![2, 3, 16, 24]);
        // pixel round trip
        let img = to_image(&fixed.get(0)).expect("image");
        assert!(to_tensor(&img).allclose(&fixed.get(0), 0.0, 1e-6, false));
        let out = dir.path().join("sheet.png");
        write_sheet(&[&fixed, &fixed], &out).expect("sheet");
        let sheet = image::open(&out).expect("read sheet").to_rgb8();
        assert_eq!(sheet.dimensions(), (2 * 26 + 2, 2 * 18 + 2));
    }

    #[test]
    fn empty_folder_is_refused_by_name() {
        let dir = tempfile::tempdir().expect("tempdir");
        let err = format!(
            "{:#}",
            ImageBatches::new(dir.path(), 8, 8, 0).err().expect("error")
        );
        assert!(err.contains("eqim.data.train_dir"), "{err}");
    }
}
