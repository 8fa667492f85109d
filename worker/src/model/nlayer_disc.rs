//! The taming PatchGAN discriminator (`NLayerDiscriminator`, pix2pix style) with BatchNorm,
//! initialised as taming's `weights_init`. Needs no pretrained weights.
//! Upstream: `tokenizer/modules/discriminator/model.py`.
//!
//! Variables spell the reference keys: `main.{i}.weight` with `i` the `nn.Sequential` index.

use tch::{nn, nn::ModuleT, Tensor};

/// `NLayerDiscriminator(input_nc, ndf, n_layers)` hyper-parameters (reference defaults 3, 64, 3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NLayerDiscConfig {
    pub input_nc: i64,
    pub ndf: i64,
    pub n_layers: i64,
}

impl Default for NLayerDiscConfig {
    fn default() -> Self {
        Self {
            input_nc: 3,
            ndf: 64,
            n_layers: 3,
        }
    }
}

/// A 4×4 conv as taming builds it: weight N(0, 0.02) (`weights_init`), bias PyTorch's default
/// U(±1/√fan_in) (weights_init leaves conv biases alone).
fn conv4(p: nn::Path, c_in: i64, c_out: i64, stride: i64, bias: bool) -> nn::Conv2D {
    let bound = 1.0 / ((c_in * 16) as f64).sqrt();
    let cfg = nn::ConvConfig {
        stride,
        padding: 1,
        bias,
        ws_init: nn::Init::Randn {
            mean: 0.0,
            stdev: 0.02,
        },
        bs_init: nn::Init::Uniform {
            lo: -bound,
            up: bound,
        },
        ..Default::default()
    };
    nn::conv2d(p, c_in, c_out, 4, cfg)
}

/// BatchNorm2d initialised as `weights_init`: weight N(1, 0.02), bias 0.
fn batch_norm(p: nn::Path, c: i64) -> nn::BatchNorm {
    let cfg = nn::BatchNormConfig {
        ws_init: nn::Init::Randn {
            mean: 1.0,
            stdev: 0.02,
        },
        bs_init: nn::Init::Const(0.0),
        ..Default::default()
    };
    nn::batch_norm2d(p, c, cfg)
}

/// LeakyReLU(0.2); tch's `leaky_relu` has a fixed 0.01 slope. max(x, 0.2x) equals it for a slope < 1.
pub fn leaky_relu_02(xs: &Tensor) -> Tensor {
    xs.maximum(&(xs * 0.2))
}

/// `NLayerDiscriminator`: patch logits [B, 1, h, w] for images [B, input_nc, H, W].
#[derive(Debug)]
pub struct NLayerDiscriminator {
    main: nn::SequentialT,
}

impl NLayerDiscriminator {
    pub fn new(p: nn::Path, cfg: &NLayerDiscConfig) -> Self {
        let main_p = &p / "main";
        let ndf = cfg.ndf;
        let mut idx = 0i64;
        let mut main = nn::seq_t()
            .add(conv4(&main_p / idx, cfg.input_nc, ndf, 2, true))
            .add_fn(leaky_relu_02);
        idx += 2;
        let mut nf_mult = 1;
        // Each stage: conv (no bias, BatchNorm follows), BatchNorm, LeakyReLU.
        for n in 1..=cfg.n_layers {
            let nf_mult_prev = nf_mult;
            nf_mult = (1 << n).min(8);
            let stride = if n < cfg.n_layers { 2 } else { 1 };
            main = main
                .add(conv4(
                    &main_p / idx,
                    ndf * nf_mult_prev,
                    ndf * nf_mult,
                    stride,
                    false,
                ))
                .add(batch_norm(&main_p / (idx + 1), ndf * nf_mult))
                .add_fn(leaky_relu_02);
            idx += 3;
        }
        main = main.add(conv4(&main_p / idx, ndf * nf_mult, 1, 1, true));
        Self { main }
    }

    /// Patch logits; `train` selects BatchNorm batch statistics (and updates the running ones).
    pub fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        self.main.forward_t(xs, train)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    #[test]
    fn keys_and_shapes_match_taming_sequential_indices() {
        let vs = nn::VarStore::new(Device::Cpu);
        let _d = NLayerDiscriminator::new(vs.root(), &NLayerDiscConfig::default());
        let vars = vs.variables();
        let shape = |k: &str| vars[k].size();
        assert_eq!(shape("main.0.weight"), vec![64, 3, 4, 4]);
        assert_eq!(shape("main.0.bias"), vec![64]);
        assert_eq!(shape("main.2.weight"), vec![128, 64, 4, 4]);
        assert!(!vars.contains_key("main.2.bias"));
        assert_eq!(shape("main.3.weight"), vec![128]);
        assert_eq!(shape("main.3.running_var"), vec![128]);
        assert_eq!(shape("main.5.weight"), vec![256, 128, 4, 4]);
        assert_eq!(shape("main.8.weight"), vec![512, 256, 4, 4]);
        assert_eq!(shape("main.9.bias"), vec![512]);
        assert_eq!(shape("main.11.weight"), vec![1, 512, 4, 4]);
        assert_eq!(shape("main.11.bias"), vec![1]);
        // taming's weights_init: conv N(0, 0.02), BatchNorm weight N(1, 0.02), bias 0
        let w = &vars["main.8.weight"];
        assert!((w.std(true).double_value(&[]) - 0.02).abs() < 0.002);
        let bn = &vars["main.9.weight"];
        assert!((bn.mean(Kind::Float).double_value(&[]) - 1.0).abs() < 0.01);
        assert_eq!(
            vars["main.9.bias"].abs().sum(Kind::Float).double_value(&[]),
            0.0
        );
    }

    #[test]
    fn patch_logits_have_the_pix2pix_shape() {
        let vs = nn::VarStore::new(Device::Cpu);
        let cfg = NLayerDiscConfig {
            ndf: 8,
            ..Default::default()
        };
        let d = NLayerDiscriminator::new(vs.root(), &cfg);
        let x = Tensor::randn([2, 3, 32, 64], (Kind::Float, Device::Cpu));
        // 32 → 16 → 8 → 4 (stride 2), → 3 → 2 (k4 s1 p1)
        assert_eq!(d.forward_t(&x, true).size(), vec![2, 1, 2, 6]);
    }
}
