//! Images in and out of the tokenizer: files to [-1, 1] float tensors, and tensors to PNG with the
//! reference's rounding (`(x+1)/2*255`, clip to [0, 255], round half to even, uint8 RGB).

use anyhow::{bail, Context, Result};
use image::imageops::FilterType;
use std::path::Path;
use tch::{Device, Kind, Tensor};

/// How to make an image fit a tokenizer of height `height` whose widths are multiples of `width_multiple`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fit {
    /// Take the image as it is; a wrong size is an error naming the expected one.
    Exact,
    /// Resize so the height is `height` (keeping the aspect ratio), then centre-crop the width
    /// down to a multiple of `width_multiple`.
    ResizeHeight,
}

/// Reads an image file as RGB [3, H, W] float32 in [-1, 1] (`x / 127.5 - 1`, as the reference's
/// data pipeline).
pub fn load_image(path: &Path) -> Result<Tensor> {
    let img = image::open(path)
        .with_context(|| format!("reading image {}", path.display()))?
        .to_rgb8();
    Ok(rgb_to_tensor(&img))
}

/// [3, H, W] float32 in [-1, 1] from an RGB8 buffer.
pub fn rgb_to_tensor(img: &image::RgbImage) -> Tensor {
    let (w, h) = (img.width() as i64, img.height() as i64);
    // HWC bytes -> [3, H, W]
    Tensor::from_slice(img.as_raw())
        .view([h, w, 3])
        .permute([2, 0, 1])
        .to_kind(Kind::Float)
        / 127.5
        - 1.0
}

/// Loads an image and makes it `height` rows tall with a width that is a multiple of
/// `width_multiple`, as `fit` says.
pub fn load_for_tokenizer(
    path: &Path,
    height: u32,
    width_multiple: u32,
    fit: Fit,
) -> Result<Tensor> {
    let img = image::open(path)
        .with_context(|| format!("reading image {}", path.display()))?
        .to_rgb8();
    let img = match fit {
        Fit::Exact => {
            if img.height() != height || img.width() % width_multiple != 0 {
                bail!(
                    "image {} is {}x{} (WxH); the tokenizer needs height {height} and a width that \
                     is a multiple of {width_multiple} (pass --fit to resize and crop)",
                    path.display(),
                    img.width(),
                    img.height()
                );
            }
            img
        }
        Fit::ResizeHeight => {
            let scaled_w = ((img.width() as f64) * (height as f64) / (img.height() as f64))
                .round()
                .max(1.0) as u32;
            let resized = image::imageops::resize(&img, scaled_w, height, FilterType::Triangle);
            let crop_w = scaled_w / width_multiple * width_multiple;
            if crop_w < 2 * width_multiple {
                bail!(
                    "image {} is too narrow: resized to height {height} it is {scaled_w} px wide, \
                     the tokenizer needs at least {}",
                    path.display(),
                    2 * width_multiple
                );
            }
            let x0 = (scaled_w - crop_w) / 2;
            image::imageops::crop_imm(&resized, x0, 0, crop_w, height).to_image()
        }
    };
    Ok(rgb_to_tensor(&img))
}

/// The reference's conversion of an image in [-1, 1] to bytes: [3, H, W] -> RGB8.
pub fn tensor_to_rgb(xs: &Tensor) -> Result<image::RgbImage> {
    let size = xs.size();
    let [3, h, w] = size.as_slice() else {
        bail!("image tensor must be [3, H, W], got {size:?}");
    };
    // (x+1)/2 in float32, *255, clip, round half to even (torch.round = np.round), then HWC bytes.
    let bytes = ((xs.to_device(Device::Cpu).to_kind(Kind::Float) + 1.0) / 2.0 * 255.0)
        .clamp(0.0, 255.0)
        .round()
        .to_kind(Kind::Uint8)
        .permute([1, 2, 0])
        .contiguous();
    let data = Vec::<u8>::try_from(bytes.flatten(0, -1)).context("copying image bytes")?;
    image::RgbImage::from_raw(*w as u32, *h as u32, data).context("image buffer size")
}

/// Writes [3, H, W] in [-1, 1] as a PNG, atomically (temp file, fsync, rename).
pub fn save_png(xs: &Tensor, path: &Path) -> Result<()> {
    write_png(&tensor_to_rgb(xs)?, path)
}

/// Writes an RGB image as a PNG, atomically (temp file, fsync, rename).
pub fn write_png(img: &image::RgbImage, path: &Path) -> Result<()> {
    eqim_common::files::write_atomic_with(path, |tmp| {
        img.save_with_format(tmp, image::ImageFormat::Png)
            .with_context(|| format!("writing {}", tmp.display()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounding_is_half_to_even_and_clipped() {
        // The primitive: torch.round is half-to-even like np.round.
        let r = Tensor::from_slice(&[0.5f32, 1.5, 2.5, 126.5]).round();
        assert_eq!(Vec::<f32>::try_from(r).unwrap(), vec![0.0, 2.0, 2.0, 126.0]);
        // x = 0 maps to exactly 127.5 -> 128; out-of-range values clip; x = 1 - 1/255 -> 254.5-ish.
        let xs = Tensor::from_slice(&[0.0f32, -3.0, 3.0, -1.0, 1.0, 0.2]).view([3, 1, 2]);
        let img = tensor_to_rgb(&xs).unwrap();
        // HWC order: pixel 0 = channels (0.0, 3.0, 1.0), pixel 1 = (-3.0, -1.0, 0.2)
        assert_eq!(img.as_raw().clone(), vec![128u8, 255, 255, 0, 0, 153]);
    }

    #[test]
    fn png_round_trip_is_exact_on_byte_values() {
        let dir = tempfile::tempdir().unwrap();
        let bytes: Vec<u8> = (0..3 * 4 * 6).map(|i| (i * 7 % 256) as u8).collect();
        let img = image::RgbImage::from_raw(6, 4, bytes.clone()).unwrap();
        let t = rgb_to_tensor(&img);
        assert_eq!(t.size(), [3, 4, 6]);
        let path = dir.path().join("a.png");
        save_png(&t, &path).unwrap();
        let back = load_image(&path).unwrap();
        assert!(back.allclose(&t, 0.0, 1e-6, false));
        let err = load_for_tokenizer(&path, 8, 2, Fit::Exact).unwrap_err();
        assert!(format!("{err:#}").contains("needs height 8"), "{err:#}");
        let fitted = load_for_tokenizer(&path, 8, 4, Fit::ResizeHeight).unwrap();
        assert_eq!(fitted.size(), [3, 8, 12]);
    }
}
