//! The reference's image transforms: resize the shorter side (bilinear, antialiased like PIL),
//! random or center crop, horizontal flip with p = 0.5, then `x / 255` normalised by (0.5, 0.5) to
//! [-1, 1] float CHW. Randomness comes from the (seed, sample index) pair only, so every worker
//! makes the same augmented sample for the same epoch seed and index.
//! Reference: torchvision `Resize(256)`, `RandomCrop(256)`, `RandomHorizontalFlip()`,
//! `ToTensor()`, `Normalize([0.5]*3, [0.5]*3)` in scripts/train_generator.py.

use eqim_common::seed::{finalize, mix, SplitMix64, GOLDEN_GAMMA};
use image::RgbImage;
use serde::{Deserialize, Serialize};

use super::resize::resize_fast;
use super::DataError;

/// The SplitMix64 stream (`eqim_common::seed`) of one sample, seeded from (seed, sample index,
/// stream). Portable and stable across crate versions, unlike `rand::StdRng`, which matters
/// because augmented samples must be reproducible across machines and releases.
#[derive(Clone, Debug)]
pub struct SampleRng(SplitMix64);

impl SampleRng {
    /// The stream for one sample; `stream` separates independent uses of the same pair (crop and
    /// flip of the image pipeline, the flip choice of the latent cache, demo crops).
    pub fn new(seed: u64, index: u64, stream: u64) -> Self {
        let key = finalize(seed ^ mix(index));
        Self(SplitMix64::new(finalize(
            key ^ stream.wrapping_mul(GOLDEN_GAMMA),
        )))
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0.next_u64()
    }

    /// Uniform integer in `0..n` (n > 0), by rejection so there is no modulo bias.
    pub fn below(&mut self, n: u64) -> u64 {
        self.0.below(n)
    }

    /// Uniform float in [0, 1) with 53 random bits.
    pub fn unit_f64(&mut self) -> f64 {
        self.0.unit_f64()
    }

    /// True with probability 1/2.
    pub fn coin(&mut self) -> bool {
        self.next_u64() >> 63 == 1
    }
}

/// The seed of one epoch, derived from the run's base seed, so that epochs differ and any worker
/// can recompute it.
pub fn epoch_seed(base_seed: u64, epoch: u64) -> u64 {
    finalize(base_seed ^ finalize(epoch ^ 0xE90C_E90C_E90C_E90C))
}

/// Stream ids of [`SampleRng::new`]; fixed forever, since changing one changes every sample.
pub(crate) const STREAM_IMAGE_AUGMENT: u64 = 1;
pub(crate) const STREAM_LATENT_FLIP: u64 = 2;
pub(crate) const STREAM_DEMO_CROPS: u64 = 3;

/// Sizes of the transform: the shorter side is resized to `resize`, then a `crop_height` x
/// `crop_width` window is cut (the reference trains at 256 / 256 x 256).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TransformConfig {
    pub resize: u32,
    pub crop_height: u32,
    pub crop_width: u32,
}

impl TransformConfig {
    /// The reference's square setting: resize the shorter side to `size`, crop `size` x `size`.
    pub fn square(size: u32) -> Self {
        Self {
            resize: size,
            crop_height: size,
            crop_width: size,
        }
    }

    pub fn validate(&self) -> Result<(), DataError> {
        if self.resize == 0 || self.crop_height == 0 || self.crop_width == 0 {
            return Err(DataError::Transform(format!(
                "resize {} and crop {}x{} must all be positive",
                self.resize, self.crop_height, self.crop_width
            )));
        }
        if self.crop_height > self.resize || self.crop_width > self.resize {
            // After the shorter side is resized to `resize`, only a crop up to that size always fits.
            return Err(DataError::Transform(format!(
                "crop {}x{} is larger than the resized shorter side {}; set resize >= both crop sides",
                self.crop_height, self.crop_width, self.resize
            )));
        }
        Ok(())
    }
}

/// Training (random crop + flip) or evaluation (center crop, no flip) behaviour.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Augment {
    Train,
    Eval,
}

/// Where the crop window sits in the resized image and whether the sample is mirrored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CropParams {
    pub top: u32,
    pub left: u32,
    pub flip: bool,
}

#[derive(Clone, Copy, Debug)]
pub struct ImageTransform {
    config: TransformConfig,
    augment: Augment,
}

impl ImageTransform {
    pub fn new(config: TransformConfig, augment: Augment) -> Result<Self, DataError> {
        config.validate()?;
        Ok(Self { config, augment })
    }

    pub fn config(&self) -> TransformConfig {
        self.config
    }

    pub fn augment(&self) -> Augment {
        self.augment
    }

    /// [3, crop_height, crop_width].
    pub fn output_shape(&self) -> [usize; 3] {
        [
            3,
            self.config.crop_height as usize,
            self.config.crop_width as usize,
        ]
    }

    pub fn output_len(&self) -> usize {
        let [c, h, w] = self.output_shape();
        c * h * w
    }

    /// torchvision's `Resize(int)` output size: shorter side to `resize`, the longer one scaled
    /// and truncated as Python's `int()` does.
    pub fn resized_size(&self, width: u32, height: u32) -> (u32, u32) {
        let target = self.config.resize as u64;
        let (w, h) = (width as u64, height as u64);
        if w <= h {
            (target as u32, (target * h / w) as u32)
        } else {
            ((target * w / h) as u32, target as u32)
        }
    }

    /// The crop and flip for one sample of a resized image of `width` x `height`.
    pub fn params(&self, width: u32, height: u32, seed: u64, index: u64) -> CropParams {
        let (ch, cw) = (self.config.crop_height, self.config.crop_width);
        match self.augment {
            Augment::Train => {
                // Same draw order as torchvision: crop row, crop column, then the flip.
                let mut rng = SampleRng::new(seed, index, STREAM_IMAGE_AUGMENT);
                let top = rng.below((height - ch + 1) as u64) as u32;
                let left = rng.below((width - cw + 1) as u64) as u32;
                CropParams {
                    top,
                    left,
                    flip: rng.coin(),
                }
            }
            Augment::Eval => CropParams {
                top: center_offset(height, ch),
                left: center_offset(width, cw),
                flip: false,
            },
        }
    }

    /// Transforms one decoded image into `out` (length [`Self::output_len`]) as CHW floats in
    /// [-1, 1].
    pub fn apply(&self, image: &RgbImage, seed: u64, index: u64, out: &mut [f32]) {
        assert_eq!(out.len(), self.output_len(), "transform output buffer size");
        let (rw, rh) = self.resized_size(image.width(), image.height());
        let resized;
        let source = if (rw, rh) == image.dimensions() {
            image
        } else {
            // Pillow's antialiased bilinear (the resize torchvision's `Resize` runs), SIMD.
            resized = resize_fast(image, rw, rh);
            &resized
        };
        let params = self.params(rw, rh, seed, index);
        write_chw(
            source,
            params,
            self.config.crop_height,
            self.config.crop_width,
            out,
        );
    }
}

/// torchvision's CenterCrop offset: `int(round((size - crop) / 2))`, Python rounding half to even.
fn center_offset(size: u32, crop: u32) -> u32 {
    let excess = size - crop;
    let half = excess / 2;
    if excess % 2 == 1 && half % 2 == 1 {
        half + 1
    } else {
        half
    }
}

/// Crops, optionally mirrors and normalises in one pass: `(x / 255 - 0.5) / 0.5`, the same float
/// operations as `ToTensor` then `Normalize(0.5, 0.5)`.
fn write_chw(image: &RgbImage, p: CropParams, crop_h: u32, crop_w: u32, out: &mut [f32]) {
    let (h, w) = (crop_h as usize, crop_w as usize);
    let plane = h * w;
    let raw = image.as_raw();
    let stride = image.width() as usize * 3;
    for y in 0..h {
        let row_start = (p.top as usize + y) * stride + p.left as usize * 3;
        let row = &raw[row_start..row_start + w * 3];
        for x in 0..w {
            let sx = if p.flip { w - 1 - x } else { x };
            let dst = y * w + x;
            for c in 0..3 {
                let v = row[sx * 3 + c] as f32 / 255.0;
                out[c * plane + dst] = (v - 0.5) / 0.5;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn center_offset_rounds_half_to_even_like_python() {
        assert_eq!(center_offset(256, 256), 0);
        assert_eq!(center_offset(341, 256), 42); // round(42.5) = 42
        assert_eq!(center_offset(343, 256), 44); // round(43.5) = 44
        assert_eq!(center_offset(300, 256), 22);
    }

    #[test]
    fn resized_size_truncates_the_long_side() {
        let t = ImageTransform::new(TransformConfig::square(256), Augment::Eval).expect("valid");
        assert_eq!(t.resized_size(500, 375), (341, 256));
        assert_eq!(t.resized_size(375, 500), (256, 341));
        assert_eq!(t.resized_size(256, 256), (256, 256));
    }

    #[test]
    fn sample_rng_below_stays_in_range_and_varies() {
        let mut rng = SampleRng::new(7, 3, 0);
        let draws: Vec<u64> = (0..200).map(|_| rng.below(5)).collect();
        assert!(draws.iter().all(|&d| d < 5));
        for v in 0..5 {
            assert!(draws.contains(&v), "value {v} never drawn");
        }
    }

    #[test]
    fn crop_larger_than_resize_is_rejected() {
        let cfg = TransformConfig {
            resize: 32,
            crop_height: 32,
            crop_width: 64,
        };
        let err = ImageTransform::new(cfg, Augment::Train).expect_err("must fail");
        assert!(err
            .to_string()
            .contains("larger than the resized shorter side"));
    }
}
