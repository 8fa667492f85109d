//! The DINO discriminator: a frozen DINO ViT-S/16 whose patch+cls readouts (after the patch
//! embedding and after blocks 2, 5, 8, 11) feed five trainable heads of spectrally normalised
//! Conv1d + local BatchNorm + LeakyReLU(0.2), with a circular k=9 residual block.
//! Upstream: `tokenizer/modules/discriminator/dino_disc.py` (`DinoDisc`, `FrozenDINOSmallNoDrop`).
//!
//! The backbone lives in its own frozen VarStore (the reference keeps it out of the state_dict);
//! head variables spell the reference keys under the caller's path (`heads.{i}.0.0.weight_orig`,
//! `heads.{i}.1.fn.0.weight_u`, ...).

use anyhow::Result;
use std::path::Path;
use tch::{nn, Device, Kind, Tensor};

use super::nlayer_disc::leaky_relu_02;

/// `FrozenDINOSmallNoDrop` / `DinoDisc` hyper-parameters (reference defaults).
#[derive(Debug, Clone, PartialEq)]
pub struct DinoDiscConfig {
    pub depth: i64,
    pub key_depths: Vec<i64>,
    pub embed_dim: i64,
    pub num_heads: i64,
    pub mlp_ratio: f64,
    pub patch_size: i64,
    pub img_size: i64,
    pub norm_eps: f64,
    /// Kernel of the residual head block.
    pub ks: i64,
}

impl Default for DinoDiscConfig {
    fn default() -> Self {
        Self {
            depth: 12,
            key_depths: vec![2, 5, 8, 11],
            embed_dim: 384,
            num_heads: 6,
            mlp_ratio: 4.0,
            patch_size: 16,
            img_size: 224,
            norm_eps: 1e-6,
            ks: 9,
        }
    }
}

/// `SABlockNoDrop`: pre-norm attention + tanh-GELU MLP.
#[derive(Debug)]
struct SaBlock {
    norm1: nn::LayerNorm,
    qkv: nn::Linear,
    proj: nn::Linear,
    norm2: nn::LayerNorm,
    fc1: nn::Linear,
    fc2: nn::Linear,
    num_heads: i64,
}

impl SaBlock {
    fn new(p: nn::Path, cfg: &DinoDiscConfig) -> Self {
        let c = cfg.embed_dim;
        let ln = nn::LayerNormConfig {
            eps: cfg.norm_eps,
            ..Default::default()
        };
        let hidden = (c as f64 * cfg.mlp_ratio).round() as i64;
        Self {
            norm1: nn::layer_norm(&p / "norm1", vec![c], ln),
            qkv: nn::linear(&p / "attn" / "qkv", c, 3 * c, Default::default()),
            proj: nn::linear(&p / "attn" / "proj", c, c, Default::default()),
            norm2: nn::layer_norm(&p / "norm2", vec![c], ln),
            fc1: nn::linear(&p / "mlp" / "fc1", c, hidden, Default::default()),
            fc2: nn::linear(&p / "mlp" / "fc2", hidden, c, Default::default()),
            num_heads: cfg.num_heads,
        }
    }

    fn attention(&self, xs: &Tensor) -> Tensor {
        let (b, l, c) = xs.size3().expect("dino block: x must be [B, L, C]");
        let hd = c / self.num_heads;
        // [B, L, 3, H, hd] → [3, B, H, L, hd]
        let qkv = xs
            .apply(&self.qkv)
            .view([b, l, 3, self.num_heads, hd])
            .permute([2, 0, 3, 1, 4]);
        let (q, k, v) = (qkv.get(0), qkv.get(1), qkv.get(2));
        let attn = (q * (1.0 / (hd as f64).sqrt()))
            .matmul(&k.transpose(-2, -1))
            .softmax(-1, Kind::Float);
        attn.matmul(&v)
            .transpose(1, 2) // [B, L, H, hd]
            .reshape([b, l, c])
            .apply(&self.proj)
    }

    fn forward(&self, xs: &Tensor) -> Tensor {
        let xs = xs + self.attention(&xs.apply(&self.norm1));
        let h = xs
            .apply(&self.norm2)
            .apply(&self.fc1)
            .gelu("tanh")
            .apply(&self.fc2);
        xs + h
    }
}

/// `FrozenDINOSmallNoDrop`: returns the readouts `x[:, 1:] + x[:, :1]` as [B, C, L].
#[derive(Debug)]
pub struct FrozenDinoSmall {
    patch_embed: nn::Conv2D,
    cls_token: Tensor,
    pos_embed: Tensor,
    blocks: Vec<SaBlock>,
    cfg: DinoDiscConfig,
}

const IMAGENET_MEAN: [f64; 3] = [0.485, 0.456, 0.406];
const IMAGENET_STD: [f64; 3] = [0.229, 0.224, 0.225];

impl FrozenDinoSmall {
    pub fn new(p: nn::Path, cfg: &DinoDiscConfig) -> Self {
        let c = cfg.embed_dim;
        let patches = (cfg.img_size / cfg.patch_size).pow(2);
        let conv = nn::ConvConfig {
            stride: cfg.patch_size,
            ..Default::default()
        };
        let n_blocks = cfg
            .depth
            .max(1 + cfg.key_depths.iter().copied().max().unwrap_or(0));
        // `norm` exists in the checkpoint (and is loaded) but the discriminator never applies it.
        let _norm = nn::layer_norm(&p / "norm", vec![c], Default::default());
        Self {
            patch_embed: nn::conv2d(&p / "patch_embed" / "proj", 3, c, cfg.patch_size, conv),
            cls_token: p.zeros("cls_token", &[1, 1, c]),
            pos_embed: p.zeros("pos_embed", &[1, patches + 1, c]),
            blocks: (0..n_blocks)
                .map(|i| SaBlock::new(&p / "blocks" / i, cfg))
                .collect(),
            cfg: cfg.clone(),
        }
    }

    /// [-1, 1] images → ImageNet-normalised 224×224 (random 224 crop with p 0.5 when both sides
    /// exceed 224, else area-resize down / bicubic up).
    fn preprocess(&self, xs: &Tensor) -> Tensor {
        let dev = xs.device();
        let scale: Vec<f64> = IMAGENET_STD.iter().map(|s| 0.5 / s).collect();
        let shift: Vec<f64> = IMAGENET_MEAN
            .iter()
            .zip(IMAGENET_STD)
            .map(|(m, s)| (0.5 - m) / s)
            .collect();
        let scale = Tensor::from_slice(&scale)
            .to_kind(Kind::Float)
            .to_device(dev);
        let shift = Tensor::from_slice(&shift)
            .to_kind(Kind::Float)
            .to_device(dev);
        let xs = xs.to_kind(Kind::Float) * scale.view([1, 3, 1, 1]) + shift.view([1, 3, 1, 1]);
        let (_, _, h, w) = xs.size4().expect("dino: x must be [B, 3, H, W]");
        let s = self.cfg.img_size;
        if h > s && w > s && rand::random::<f64>() <= 0.5 {
            let top = rand::random::<u64>() % (h - s + 1) as u64;
            let left = rand::random::<u64>() % (w - s + 1) as u64;
            xs.narrow(2, top as i64, s).narrow(3, left as i64, s)
        } else if h > s {
            xs.adaptive_avg_pool2d([s, s])
        } else {
            xs.upsample_bicubic2d([s, s], false, None, None)
        }
    }

    /// The readouts after the patch embedding and after each key block, each [B, C, L].
    pub fn forward(&self, xs: &Tensor) -> Vec<Tensor> {
        let xs = self.preprocess(xs);
        let b = xs.size()[0];
        let tokens = xs.apply(&self.patch_embed).flatten(2, -1).transpose(1, 2); // [B, L, C]
        let mut x =
            Tensor::cat(&[self.cls_token.expand([b, -1, -1], false), tokens], 1) + &self.pos_embed;
        let readout =
            |x: &Tensor| (x.narrow(1, 1, x.size()[1] - 1) + x.narrow(1, 0, 1)).transpose(1, 2);
        let mut acts = vec![readout(&x)];
        for (i, block) in self.blocks.iter().enumerate() {
            x = block.forward(&x);
            if self.cfg.key_depths.contains(&(i as i64)) {
                acts.push(readout(&x));
            }
        }
        acts
    }
}

/// `F.normalize(x, dim=0, eps=1e-12)` for a vector.
fn normalize(v: &Tensor) -> Tensor {
    v / v.norm().clamp_min(1e-12)
}

/// `SpectralConv1d`: Conv1d whose weight is `weight_orig / σ`, σ from one power iteration per
/// training forward (buffers `weight_u` [out], `weight_v` [in·k]).
#[derive(Debug)]
pub struct SpectralConv1d {
    weight_orig: Tensor,
    bias: Tensor,
    weight_u: Tensor,
    weight_v: Tensor,
    padding: i64,
    circular: bool,
}

impl SpectralConv1d {
    fn new(p: nn::Path, c_in: i64, c_out: i64, k: i64, circular: bool) -> Self {
        let bound = 1.0 / ((c_in * k) as f64).sqrt();
        let weight_orig = p.var(
            "weight_orig",
            &[c_out, c_in, k],
            nn::Init::Kaiming {
                dist: nn::init::NormalOrUniform::Uniform,
                fan: nn::init::FanInOut::FanIn,
                non_linearity: nn::init::NonLinearity::ExplicitGain(1.0 / 3f64.sqrt()),
            },
        );
        let bias = p.var(
            "bias",
            &[c_out],
            nn::Init::Uniform {
                lo: -bound,
                up: bound,
            },
        );
        let mut weight_u = p.zeros_no_train("weight_u", &[c_out]);
        let mut weight_v = p.zeros_no_train("weight_v", &[c_in * k]);
        tch::no_grad(|| {
            weight_u.copy_(&normalize(&Tensor::randn(
                [c_out],
                (Kind::Float, p.device()),
            )));
            weight_v.copy_(&normalize(&Tensor::randn(
                [c_in * k],
                (Kind::Float, p.device()),
            )));
        });
        Self {
            weight_orig,
            bias,
            weight_u,
            weight_v,
            padding: k / 2,
            circular,
        }
    }

    /// The normalised weight; `train` runs one power iteration and updates u, v in place.
    pub fn weight(&self, train: bool) -> Tensor {
        let out = self.weight_orig.size()[0];
        let w_mat = self.weight_orig.reshape([out, -1]);
        if train {
            tch::no_grad(|| {
                let v = normalize(&w_mat.detach().transpose(0, 1).mv(&self.weight_u));
                let u = normalize(&w_mat.detach().mv(&v));
                self.weight_v.shallow_clone().copy_(&v);
                self.weight_u.shallow_clone().copy_(&u);
            });
        }
        // copies: a later forward's power iteration must not change what this graph saved
        let (u, v) = (self.weight_u.copy(), self.weight_v.copy());
        let sigma = u.dot(&w_mat.mv(&v));
        &self.weight_orig / sigma
    }

    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        let w = self.weight(train);
        let p = self.padding;
        let xs = if p > 0 && self.circular {
            xs.pad([p, p], "circular", None)
        } else if p > 0 {
            xs.constant_pad_nd([p, p])
        } else {
            xs.shallow_clone()
        };
        xs.conv1d(&w, Some(&self.bias), [1], [0], [1], 1)
    }
}

/// `BatchNormLocal`: batch statistics over groups of `virtual_bs` images (no running stats).
#[derive(Debug)]
pub struct BatchNormLocal {
    weight: Tensor,
    bias: Tensor,
    virtual_bs: i64,
    eps: f64,
}

impl BatchNormLocal {
    fn new(p: nn::Path, c: i64, eps: f64) -> Self {
        Self {
            weight: p.ones("weight", &[c]),
            bias: p.zeros("bias", &[c]),
            virtual_bs: 8,
            eps,
        }
    }

    pub fn forward(&self, xs: &Tensor) -> Tensor {
        let size = xs.size();
        let (b, c, l) = (size[0], size[1], size[2]);
        let groups = (b + self.virtual_bs - 1) / self.virtual_bs;
        let x = xs.to_kind(Kind::Float).view([groups, -1, c, l]);
        let dims = [1i64, 3].as_slice();
        let mean = x.mean_dim(dims, true, Kind::Float);
        let var = x.var_dim(dims, false, true);
        let x = (x - mean) / (var + self.eps).sqrt();
        let x = x * self.weight.view([1, c, 1]) + self.bias.view([1, c, 1]);
        x.view(size.as_slice())
    }
}

/// `make_block`: SpectralConv1d → BatchNormLocal → LeakyReLU(0.2).
#[derive(Debug)]
struct HeadBlock {
    conv: SpectralConv1d,
    norm: BatchNormLocal,
}

impl HeadBlock {
    fn new(p: nn::Path, c: i64, k: i64, eps: f64) -> Self {
        Self {
            conv: SpectralConv1d::new(&p / 0, c, c, k, true),
            norm: BatchNormLocal::new(&p / 1, c, eps),
        }
    }

    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        leaky_relu_02(&self.norm.forward(&self.conv.forward_t(xs, train)))
    }
}

/// One of the five heads: block(k1) → residual block(ks)·1/√2 → SpectralConv1d(C→1).
#[derive(Debug)]
struct DinoHead {
    block: HeadBlock,
    residual: HeadBlock,
    out: SpectralConv1d,
}

impl DinoHead {
    fn new(p: nn::Path, cfg: &DinoDiscConfig) -> Self {
        let c = cfg.embed_dim;
        Self {
            block: HeadBlock::new(&p / 0, c, 1, cfg.norm_eps),
            residual: HeadBlock::new(&p / 1 / "fn", c, cfg.ks, cfg.norm_eps),
            out: SpectralConv1d::new(&p / 2, c, 1, 1, false),
        }
    }

    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        let h = self.block.forward_t(xs, train);
        let h = (self.residual.forward_t(&h, train) + &h) * std::f64::consts::FRAC_1_SQRT_2;
        self.out.forward_t(&h, train)
    }
}

/// `DinoDisc`: logits [B, 5·L] for images in [-1, 1].
#[derive(Debug)]
pub struct DinoDisc {
    backbone: FrozenDinoSmall,
    /// Keeps the frozen backbone's variables alive and out of the trainable store.
    _backbone_vs: nn::VarStore,
    heads: Vec<DinoHead>,
}

impl DinoDisc {
    /// Heads under `p` (trainable); the backbone in its own frozen store on `p`'s device with
    /// the given weights (already loaded by the caller or random for tests).
    pub fn new(
        p: nn::Path,
        cfg: &DinoDiscConfig,
        backbone_vs: nn::VarStore,
        backbone: FrozenDinoSmall,
    ) -> Self {
        let heads = (0..=cfg.key_depths.len() as i64)
            .map(|i| DinoHead::new(&p / "heads" / i, cfg))
            .collect();
        Self {
            backbone,
            _backbone_vs: backbone_vs,
            heads,
        }
    }

    /// A backbone with random weights (tests) in a frozen store.
    pub fn random_backbone(
        cfg: &DinoDiscConfig,
        device: Device,
    ) -> (nn::VarStore, FrozenDinoSmall) {
        let mut vs = nn::VarStore::new(device);
        let backbone = FrozenDinoSmall::new(vs.root(), cfg);
        vs.freeze();
        (vs, backbone)
    }

    /// The DINO ViT-S/16 backbone from a safetensors file with the public checkpoint's keys;
    /// the key third of every `attn.qkv.bias` is zeroed as the reference does.
    pub fn load_backbone(
        path: &Path,
        cfg: &DinoDiscConfig,
        device: Device,
    ) -> Result<(nn::VarStore, FrozenDinoSmall)> {
        let mut vs = nn::VarStore::new(device);
        let backbone = FrozenDinoSmall::new(vs.root(), cfg);
        let mut tensors = super::weights::read_safetensors(path)?;
        let c = cfg.embed_dim;
        for (name, t) in tensors.iter_mut() {
            if name.ends_with(".attn.qkv.bias") {
                let _ = t.narrow(0, c, c).zero_(); // in place on the k third
            }
        }
        super::weights::load_strict(&vs, &tensors, &path.display().to_string(), |_| false)?;
        vs.freeze();
        Ok((vs, backbone))
    }

    pub fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        let b = xs.size()[0];
        let acts = self.backbone.forward(xs);
        let logits: Vec<Tensor> = self
            .heads
            .iter()
            .zip(&acts)
            .map(|(h, a)| h.forward_t(a, train).view([b, -1]))
            .collect();
        Tensor::cat(&logits, 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small_cfg() -> DinoDiscConfig {
        DinoDiscConfig {
            depth: 2,
            key_depths: vec![0, 1],
            embed_dim: 32,
            num_heads: 2,
            img_size: 32,
            patch_size: 16,
            ..Default::default()
        }
    }

    #[test]
    fn head_and_backbone_keys_spell_the_reference_names() {
        let cfg = DinoDiscConfig::default();
        let vs = nn::VarStore::new(Device::Cpu);
        let (bvs, backbone) = DinoDisc::random_backbone(&cfg, Device::Cpu);
        let _d = DinoDisc::new(vs.root() / "loss" / "discriminator", &cfg, bvs, backbone);
        let vars = vs.variables();
        for key in [
            "loss.discriminator.heads.0.0.0.weight_orig",
            "loss.discriminator.heads.0.0.0.weight_u",
            "loss.discriminator.heads.0.0.0.weight_v",
            "loss.discriminator.heads.0.0.1.weight",
            "loss.discriminator.heads.4.1.fn.0.weight_orig",
            "loss.discriminator.heads.4.2.bias",
        ] {
            assert!(vars.contains_key(key), "missing {key}");
        }
        assert_eq!(
            vars["loss.discriminator.heads.1.1.fn.0.weight_orig"].size(),
            vec![384, 384, 9]
        );
        assert_eq!(
            vars["loss.discriminator.heads.1.2.weight_orig"].size(),
            vec![1, 384, 1]
        );
        // backbone keys of dino_deitsmall16_pretrain.pth
        let bvs = nn::VarStore::new(Device::Cpu);
        let _b = FrozenDinoSmall::new(bvs.root(), &cfg);
        let bvars = bvs.variables();
        assert_eq!(bvars["pos_embed"].size(), vec![1, 197, 384]);
        assert_eq!(bvars["blocks.11.attn.qkv.weight"].size(), vec![1152, 384]);
        assert_eq!(bvars["blocks.0.mlp.fc1.weight"].size(), vec![1536, 384]);
        assert!(bvars.contains_key("norm.weight") && bvars.contains_key("patch_embed.proj.bias"));
    }

    #[test]
    fn batch_norm_local_normalises_groups_of_eight() {
        let vs = nn::VarStore::new(Device::Cpu);
        let bn = BatchNormLocal::new(vs.root(), 2, 1e-6);
        // B = 10 → 2 groups of 5 images
        let x = Tensor::randn([10, 2, 3], (Kind::Float, Device::Cpu));
        let y = bn.forward(&x);
        let xv = Vec::<f32>::try_from(x.flatten(0, -1)).expect("f32");
        let yv = Vec::<f32>::try_from(y.flatten(0, -1)).expect("f32");
        let at = |b: usize, c: usize, l: usize| b * 6 + c * 3 + l;
        for g in 0..2 {
            for c in 0..2 {
                let vals: Vec<f64> = (g * 5..g * 5 + 5)
                    .flat_map(|b| (0..3).map(move |l| (b, l)))
                    .map(|(b, l)| f64::from(xv[at(b, c, l)]))
                    .collect();
                let mean = vals.iter().sum::<f64>() / vals.len() as f64;
                let var = vals.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / vals.len() as f64;
                for b in g * 5..g * 5 + 5 {
                    for l in 0..3 {
                        let want = (f64::from(xv[at(b, c, l)]) - mean) / (var + 1e-6).sqrt();
                        assert!((f64::from(yv[at(b, c, l)]) - want).abs() < 1e-5);
                    }
                }
            }
        }
    }

    #[test]
    fn spectral_norm_power_iteration_converges_to_unit_spectral_norm() {
        let vs = nn::VarStore::new(Device::Cpu);
        let conv = SpectralConv1d::new(vs.root(), 4, 3, 3, true);
        let mut w = conv.weight(true);
        for _ in 0..50 {
            w = conv.weight(true);
        }
        let wm = w.reshape([3, -1]).to_kind(Kind::Double);
        // largest singular value = sqrt of the largest eigenvalue of W·Wᵀ
        let top = Tensor::linalg_eigvalsh(&wm.matmul(&wm.transpose(0, 1)), "L")
            .max()
            .double_value(&[])
            .sqrt();
        assert!((top - 1.0).abs() < 1e-4, "largest singular value {top}");
        // eval mode leaves u, v alone
        let u = conv.weight_u.copy();
        let _w = conv.weight(false);
        assert!(conv.weight_u.equal(&u));
    }

    #[test]
    fn logits_concatenate_all_heads_and_zeroed_key_bias_loads() {
        let cfg = small_cfg();
        let vs = nn::VarStore::new(Device::Cpu);
        let (bvs, backbone) = DinoDisc::random_backbone(&cfg, Device::Cpu);
        // save the random backbone, then load it back through the checkpoint path
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("dino.safetensors");
        super::super::weights::save_file(&bvs, &path).expect("save");
        let (lvs, loaded) = DinoDisc::load_backbone(&path, &cfg, Device::Cpu).expect("load");
        let bias = &lvs.variables()["blocks.0.attn.qkv.bias"];
        assert_eq!(
            bias.narrow(0, 32, 32)
                .abs()
                .sum(Kind::Float)
                .double_value(&[]),
            0.0
        );
        drop((bvs, backbone));
        let d = DinoDisc::new(vs.root(), &cfg, lvs, loaded);
        let x = (Tensor::rand([2, 3, 16, 24], (Kind::Float, Device::Cpu)) * 2 - 1)
            .set_requires_grad(true);
        let logits = d.forward_t(&x, true);
        // 3 readouts of 4 patches (32/16)², one logit each
        assert_eq!(logits.size(), vec![2, 3 * 4]);
        logits.mean(Kind::Float).backward();
        assert!(x.grad().defined());
    }
}
