//! LPIPS perceptual distance (VGG16 variant) as the tokenizer loss uses it: ImageNet scaling layer,
//! the five VGG16 ReLU feature maps, channel-normalised squared differences, 1×1 linear heads,
//! spatial average, sum over layers.
//! Upstream: `tokenizer/modules/losses/lpips.py` (a stripped copy of richzhang/PerceptualSimilarity).
//!
//! Variable names spell the reference state_dict (`net.slice1.0.weight`, `lin0.model.1.weight`), so
//! the VGG16 backbone file (converted from torchvision by `scripts/convert-teacher-weights`) and the
//! shipped linear heads load by name. Everything here is frozen: no variable requires grad.

use anyhow::{Context, Result};
use std::path::Path;
use tch::{nn, nn::Module, Tensor};

/// VGG16 output channels of the five feature maps (relu1_2 … relu5_3).
pub const LPIPS_CHANNELS: [i64; 5] = [64, 128, 256, 512, 512];

/// `ScalingLayer`: maps [-1, 1] images to the VGG input statistics.
const SHIFT: [f64; 3] = [-0.030, -0.088, -0.188];
const SCALE: [f64; 3] = [0.458, 0.448, 0.450];

/// `(x - shift) / scale` per RGB channel, on [B, 3, H, W].
pub fn scaling_layer(x: &Tensor) -> Tensor {
    let opts = (x.kind(), x.device());
    let shift = Tensor::from_slice(&SHIFT).to_kind(opts.0).to_device(opts.1);
    let scale = Tensor::from_slice(&SCALE).to_kind(opts.0).to_device(opts.1);
    (x - shift.view([1, 3, 1, 1])) / scale.view([1, 3, 1, 1])
}

/// `normalize_tensor`: divide by the channel L2 norm (+1e-10, outside the sqrt).
pub fn normalize_tensor(x: &Tensor) -> Tensor {
    let norm = x.square().sum_dim_intlist(1, true, None).sqrt();
    x / (norm + 1e-10)
}

/// One torchvision VGG16 `features` slice: the conv indices it holds and whether it starts with
/// the 2×2 max-pool that closes the previous stage.
struct SliceSpec {
    conv_indices: &'static [i64],
    pool_first: bool,
}

/// torchvision `vgg16().features` split as in LPIPS' `vgg16` (slices end at relu1_2 … relu5_3).
const SLICES: [SliceSpec; 5] = [
    SliceSpec {
        conv_indices: &[0, 2],
        pool_first: false,
    },
    SliceSpec {
        conv_indices: &[5, 7],
        pool_first: true,
    },
    SliceSpec {
        conv_indices: &[10, 12, 14],
        pool_first: true,
    },
    SliceSpec {
        conv_indices: &[17, 19, 21],
        pool_first: true,
    },
    SliceSpec {
        conv_indices: &[24, 26, 28],
        pool_first: true,
    },
];

/// LPIPS' `vgg16`: five slices of 3×3 convs (padding 1) + ReLU, returning each slice's output.
#[derive(Debug)]
pub struct Vgg16 {
    slices: Vec<(bool, Vec<nn::Conv2D>)>,
}

impl Vgg16 {
    pub fn new(p: nn::Path) -> Self {
        let mut in_ch = 3;
        let slices = SLICES
            .iter()
            .zip(LPIPS_CHANNELS)
            .enumerate()
            .map(|(k, (spec, out_ch))| {
                let sp = &p / format!("slice{}", k + 1);
                let convs = spec
                    .conv_indices
                    .iter()
                    .map(|&i| {
                        let conv_cfg = nn::ConvConfig {
                            padding: 1,
                            ..Default::default()
                        };
                        let c = nn::conv2d(&sp / i, in_ch, out_ch, 3, conv_cfg);
                        in_ch = out_ch;
                        c
                    })
                    .collect();
                (spec.pool_first, convs)
            })
            .collect();
        Self { slices }
    }

    /// The five feature maps relu1_2, relu2_2, relu3_3, relu4_3, relu5_3.
    pub fn forward(&self, xs: &Tensor) -> Vec<Tensor> {
        let mut h = xs.shallow_clone();
        let mut outs = Vec::with_capacity(5);
        for (pool_first, convs) in &self.slices {
            if *pool_first {
                h = h.max_pool2d([2, 2], [2, 2], [0, 0], [1, 1], false);
            }
            for c in convs {
                h = c.forward(&h).relu();
            }
            outs.push(h.shallow_clone());
        }
        outs
    }
}

/// `LPIPS`: frozen VGG16 backbone plus the five linear calibration heads.
#[derive(Debug)]
pub struct Lpips {
    net: Vgg16,
    /// `lin{k}.model.1.weight`, [1, C_k, 1, 1] (index 0 of `model` is the Dropout).
    lins: Vec<Tensor>,
}

impl Lpips {
    pub fn new(p: nn::Path) -> Self {
        let net = Vgg16::new(&p / "net");
        let lins = LPIPS_CHANNELS
            .iter()
            .enumerate()
            .map(|(k, &c)| {
                (&p / format!("lin{k}") / "model" / 1).var(
                    "weight",
                    &[1, c, 1, 1],
                    nn::Init::Const(0.),
                )
            })
            .collect();
        Self { net, lins }
    }

    /// Builds LPIPS in a frozen VarStore filled from the backbone file (keys `net.*`) and the heads
    /// file (keys `lin*`); every key of the model must be present in exactly one of them.
    pub fn load(vgg16_path: &Path, linear_path: &Path, device: tch::Device) -> Result<Self> {
        let mut vs = nn::VarStore::new(device);
        let lpips = Self::new(vs.root());
        let mut tensors = crate::model::weights::read_safetensors(vgg16_path)
            .context("loading the VGG16 backbone for LPIPS")?;
        tensors.extend(
            crate::model::weights::read_safetensors(linear_path)
                .context("loading the LPIPS linear heads")?,
        );
        let source = format!("{} + {}", vgg16_path.display(), linear_path.display());
        crate::model::weights::load_strict(&vs, &tensors, &source, |_| false)?;
        vs.freeze();
        Ok(lpips)
    }

    /// The backbone's feature maps for one image batch in [-1, 1].
    pub fn features(&self, x: &Tensor) -> Vec<Tensor> {
        self.net.forward(&scaling_layer(x))
    }

    /// LPIPS(x, y) per image, [B, 1, 1, 1]. `train` applies the heads' Dropout(0.5) to the squared
    /// differences, as the reference does while Lightning keeps the loss module in train mode.
    pub fn forward_t(&self, x: &Tensor, y: &Tensor, train: bool) -> Tensor {
        let f0 = self.features(x);
        let f1 = self.features(y);
        lpips_from_features(&f0, &f1, &self.lins, train)
    }
}

/// The LPIPS head on given feature maps: Σ_k mean_{h,w} lin_k((n(f0_k) − n(f1_k))²), [B, 1, 1, 1].
pub fn lpips_from_features(
    feats0: &[Tensor],
    feats1: &[Tensor],
    lins: &[Tensor],
    train: bool,
) -> Tensor {
    let per_layer = feats0.iter().zip(feats1).zip(lins).map(|((a, b), w)| {
        let diff = (normalize_tensor(a) - normalize_tensor(b)).square();
        let diff = diff.dropout(0.5, train);
        diff.conv2d(w, None::<Tensor>, [1, 1], [0, 0], [1, 1], 1)
            .mean_dim([2i64, 3].as_slice(), true, None)
    });
    per_layer
        .reduce(|acc, t| acc + t)
        .expect("lpips: at least one feature layer")
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    /// LPIPS head by explicit loops over [B, C, H, W] values.
    fn head_by_loops(f0: &[Vec<f64>], f1: &[Vec<f64>], w: &[f64], c: usize, hw: usize) -> f64 {
        // f0[c][p]: one image, channel c, position p
        let mut total = 0.0;
        for p in 0..hw {
            let n0: f64 = (0..c).map(|k| f0[k][p] * f0[k][p]).sum::<f64>().sqrt();
            let n1: f64 = (0..c).map(|k| f1[k][p] * f1[k][p]).sum::<f64>().sqrt();
            let mut s = 0.0;
            for k in 0..c {
                let d = f0[k][p] / (n0 + 1e-10) - f1[k][p] / (n1 + 1e-10);
                s += w[k] * d * d;
            }
            total += s;
        }
        total / hw as f64
    }

    #[test]
    fn lpips_head_matches_explicit_loops() {
        tch::manual_seed(3);
        let (c, h, wd) = (3usize, 2usize, 2usize);
        let mut expected = 0.0;
        let mut feats0 = Vec::new();
        let mut feats1 = Vec::new();
        let mut lins = Vec::new();
        for _layer in 0..2 {
            let a = Tensor::randn(
                [1, c as i64, h as i64, wd as i64],
                (Kind::Double, Device::Cpu),
            );
            let b = Tensor::randn(
                [1, c as i64, h as i64, wd as i64],
                (Kind::Double, Device::Cpu),
            );
            let w = Tensor::rand([1, c as i64, 1, 1], (Kind::Double, Device::Cpu));
            let to_vec = |t: &Tensor| -> Vec<Vec<f64>> {
                (0..c as i64)
                    .map(|k| Vec::<f64>::try_from(t.get(0).get(k).flatten(0, -1)).expect("f64"))
                    .collect()
            };
            let wv = Vec::<f64>::try_from(w.flatten(0, -1)).expect("f64");
            expected += head_by_loops(&to_vec(&a), &to_vec(&b), &wv, c, h * wd);
            feats0.push(a);
            feats1.push(b);
            lins.push(w);
        }
        let got = lpips_from_features(&feats0, &feats1, &lins, false);
        assert_eq!(got.size(), vec![1, 1, 1, 1]);
        let got = got.double_value(&[0, 0, 0, 0]);
        assert!((got - expected).abs() < 1e-12, "{got} vs {expected}");
    }

    #[test]
    fn scaling_layer_uses_imagenet_shift_and_scale() {
        let x = Tensor::from_slice(&[0.5f32, 0.5, 0.5]).view([1, 3, 1, 1]);
        let y = Vec::<f32>::try_from(scaling_layer(&x).flatten(0, -1)).expect("f32");
        for i in 0..3 {
            let want = (0.5 - SHIFT[i]) / SCALE[i];
            assert!((y[i] as f64 - want).abs() < 1e-6);
        }
    }

    #[test]
    fn vgg_keys_spell_the_reference_state_dict() {
        let vs = nn::VarStore::new(Device::Cpu);
        let _lpips = Lpips::new(vs.root());
        let vars = vs.variables();
        for key in [
            "net.slice1.0.weight",
            "net.slice1.2.bias",
            "net.slice2.5.weight",
            "net.slice3.14.weight",
            "net.slice4.21.bias",
            "net.slice5.28.weight",
            "lin0.model.1.weight",
            "lin4.model.1.weight",
        ] {
            assert!(vars.contains_key(key), "missing {key}");
        }
        // 13 convs × (weight, bias) + 5 heads
        assert_eq!(vars.len(), 13 * 2 + 5);
        assert_eq!(vars["net.slice5.28.weight"].size(), vec![512, 512, 3, 3]);
    }

    #[test]
    fn lpips_of_identical_images_is_zero_and_positive_otherwise() {
        tch::manual_seed(0);
        let vs = nn::VarStore::new(Device::Cpu);
        let lpips = Lpips::new(vs.root());
        tch::no_grad(|| {
            for (name, mut v) in vs.variables() {
                // positive heads (as the calibrated ones are), He-scaled convs
                let fan_in: i64 = v.size().iter().skip(1).product();
                let init = if name.starts_with("lin") {
                    Tensor::rand_like(&v)
                } else {
                    Tensor::randn_like(&v) * (2.0 / fan_in.max(1) as f64).sqrt()
                };
                v.copy_(&init);
            }
        });
        let x = Tensor::rand([2, 3, 16, 16], (Kind::Float, Device::Cpu)) * 2 - 1;
        let y = Tensor::rand([2, 3, 16, 16], (Kind::Float, Device::Cpu)) * 2 - 1;
        let same = lpips.forward_t(&x, &x, false);
        assert_eq!(same.size(), vec![2, 1, 1, 1]);
        assert_eq!(same.abs().max().double_value(&[]), 0.0);
        let diff = lpips.forward_t(&x, &y, false);
        assert!(diff.min().double_value(&[]) > 0.0);
    }

    #[test]
    fn shipped_linear_heads_load_when_present() {
        let heads = Path::new("/work/shared/data/lpips_vgg_linear.safetensors");
        if !heads.exists() {
            eprintln!("skipping: {} not present", heads.display());
            return;
        }
        let t = crate::model::weights::read_safetensors(heads).expect("heads file");
        for (k, c) in LPIPS_CHANNELS.iter().enumerate() {
            assert_eq!(
                t[&format!("lin{k}.model.1.weight")].size(),
                vec![1, *c, 1, 1]
            );
        }
    }
}
