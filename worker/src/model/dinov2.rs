//! The semantic alignment teacher: DINOv2 ViT-B/14 (`dinov2_vitb14`, head removed), returning the
//! normalised patch tokens (`forward_features(x)["x_norm_patchtokens"]`) as [B, C, h·w].
//! Upstream: `tokenizer/modules/encoder_utils.py` (`load_encoders`), `contperceptual.py`
//! (`preprocess_raw_image`), facebookresearch/dinov2 `vision_transformer.py` (LayerScale blocks).
//!
//! The reference resamples the 37×37 position grid to 16×16 (timm `resample_abs_pos_embed`,
//! bicubic with antialias) and feeds 224-px inputs, so each 14-px patch lines up with one cell of
//! the decoder's 16×16 semantic map. eqim generalises this to any semantic map of h×w cells:
//! the image is resized to 14h × 14w and the grid resampled to h × w (the reference's case is
//! h = w = 16). Variables spell the public checkpoint's keys.

use anyhow::Result;
use std::path::Path;
use tch::{nn, Device, Kind, Tensor};

/// DINOv2 ViT hyper-parameters (ViT-B/14 by default).
#[derive(Debug, Clone, PartialEq)]
pub struct Dinov2Config {
    pub embed_dim: i64,
    pub depth: i64,
    pub num_heads: i64,
    pub mlp_ratio: f64,
    pub patch_size: i64,
    /// Side of the checkpoint's position grid (518 px / 14 = 37).
    pub pos_grid: i64,
}

impl Default for Dinov2Config {
    fn default() -> Self {
        Self {
            embed_dim: 768,
            depth: 12,
            num_heads: 12,
            mlp_ratio: 4.0,
            patch_size: 14,
            pos_grid: 37,
        }
    }
}

/// A DINOv2 block: pre-norm attention and exact-GELU MLP, each scaled by a LayerScale `gamma`.
#[derive(Debug)]
struct Block {
    norm1: nn::LayerNorm,
    qkv: nn::Linear,
    proj: nn::Linear,
    ls1: Tensor,
    norm2: nn::LayerNorm,
    fc1: nn::Linear,
    fc2: nn::Linear,
    ls2: Tensor,
    num_heads: i64,
}

impl Block {
    fn new(p: nn::Path, cfg: &Dinov2Config) -> Self {
        let c = cfg.embed_dim;
        let ln = nn::LayerNormConfig {
            eps: 1e-6,
            ..Default::default()
        };
        let hidden = (c as f64 * cfg.mlp_ratio) as i64;
        Self {
            norm1: nn::layer_norm(&p / "norm1", vec![c], ln),
            qkv: nn::linear(&p / "attn" / "qkv", c, 3 * c, Default::default()),
            proj: nn::linear(&p / "attn" / "proj", c, c, Default::default()),
            ls1: (&p / "ls1").ones("gamma", &[c]),
            norm2: nn::layer_norm(&p / "norm2", vec![c], ln),
            fc1: nn::linear(&p / "mlp" / "fc1", c, hidden, Default::default()),
            fc2: nn::linear(&p / "mlp" / "fc2", hidden, c, Default::default()),
            ls2: (&p / "ls2").ones("gamma", &[c]),
            num_heads: cfg.num_heads,
        }
    }

    fn forward(&self, xs: &Tensor) -> Tensor {
        let (b, l, c) = xs.size3().expect("dinov2 block: x must be [B, L, C]");
        let hd = c / self.num_heads;
        // [B, L, 3, H, hd] → [3, B, H, L, hd]
        let qkv = xs
            .apply(&self.norm1)
            .apply(&self.qkv)
            .view([b, l, 3, self.num_heads, hd])
            .permute([2, 0, 3, 1, 4]);
        let (q, k, v) = (qkv.get(0), qkv.get(1), qkv.get(2));
        let attn = (q * (1.0 / (hd as f64).sqrt()))
            .matmul(&k.transpose(-2, -1))
            .softmax(-1, Kind::Float);
        let attn_out = attn
            .matmul(&v)
            .transpose(1, 2) // [B, L, H, hd]
            .reshape([b, l, c])
            .apply(&self.proj);
        let xs = xs + attn_out * &self.ls1;
        let mlp = xs
            .apply(&self.norm2)
            .apply(&self.fc1)
            .gelu("none")
            .apply(&self.fc2);
        &xs + mlp * &self.ls2
    }
}

/// The frozen teacher.
#[derive(Debug)]
pub struct Dinov2Teacher {
    patch_embed: nn::Conv2D,
    cls_token: Tensor,
    pos_embed: Tensor,
    blocks: Vec<Block>,
    norm: nn::LayerNorm,
    cfg: Dinov2Config,
    /// Keeps the frozen variables alive.
    _vs: nn::VarStore,
}

const IMAGENET_MEAN: [f64; 3] = [0.485, 0.456, 0.406];
const IMAGENET_STD: [f64; 3] = [0.229, 0.224, 0.225];

impl Dinov2Teacher {
    /// A teacher with random weights in a frozen store (tests).
    pub fn random(cfg: &Dinov2Config, device: Device) -> Self {
        let mut vs = nn::VarStore::new(device);
        let mut t = Self::build(vs.root(), cfg);
        tch::no_grad(|| {
            for (_, mut v) in vs.variables() {
                let r = Tensor::randn_like(&v) * 0.02;
                v.copy_(&r);
            }
        });
        vs.freeze();
        t._vs = vs;
        t
    }

    /// The teacher from a safetensors file with the public checkpoint's keys (`mask_token` is
    /// unused and ignored).
    pub fn load(path: &Path, cfg: &Dinov2Config, device: Device) -> Result<Self> {
        let mut vs = nn::VarStore::new(device);
        let mut t = Self::build(vs.root(), cfg);
        let tensors = super::weights::read_safetensors(path)?;
        super::weights::load_strict(&vs, &tensors, &path.display().to_string(), |k| {
            k == "mask_token"
        })?;
        vs.freeze();
        t._vs = vs;
        Ok(t)
    }

    fn build(p: nn::Path, cfg: &Dinov2Config) -> Self {
        let c = cfg.embed_dim;
        let conv = nn::ConvConfig {
            stride: cfg.patch_size,
            ..Default::default()
        };
        let ln = nn::LayerNormConfig {
            eps: 1e-6,
            ..Default::default()
        };
        Self {
            patch_embed: nn::conv2d(&p / "patch_embed" / "proj", 3, c, cfg.patch_size, conv),
            cls_token: p.zeros("cls_token", &[1, 1, c]),
            pos_embed: p.zeros("pos_embed", &[1, 1 + cfg.pos_grid * cfg.pos_grid, c]),
            blocks: (0..cfg.depth)
                .map(|i| Block::new(&p / "blocks" / i, cfg))
                .collect(),
            norm: nn::layer_norm(&p / "norm", vec![c], ln),
            cfg: cfg.clone(),
            _vs: nn::VarStore::new(Device::Cpu),
        }
    }

    /// timm `resample_abs_pos_embed`: the grid part resized bicubically with antialias to
    /// `h × w`, the cls entry kept: [1, 1 + h·w, C].
    pub fn resampled_pos_embed(&self, h: i64, w: i64) -> Tensor {
        let (g, c) = (self.cfg.pos_grid, self.cfg.embed_dim);
        let cls = self.pos_embed.narrow(1, 0, 1);
        if (h, w) == (g, g) {
            return self.pos_embed.shallow_clone();
        }
        let grid = self
            .pos_embed
            .narrow(1, 1, g * g)
            .reshape([1, g, g, c])
            .permute([0, 3, 1, 2]) // [1, C, g, g]
            .internal_upsample_bicubic2d_aa([h, w], false, None, None)
            .permute([0, 2, 3, 1])
            .reshape([1, h * w, c]);
        Tensor::cat(&[cls, grid], 1)
    }

    /// `preprocess_raw_image(x, "dinov2")` then `x_norm_patchtokens`, transposed: [B, C, h·w]
    /// for a semantic map of `h × w` cells.
    pub fn patch_features(&self, xs: &Tensor, h: i64, w: i64) -> Tensor {
        let _guard = tch::no_grad_guard();
        let dev = xs.device();
        let mean = Tensor::from_slice(&IMAGENET_MEAN)
            .to_kind(Kind::Float)
            .to_device(dev);
        let std = Tensor::from_slice(&IMAGENET_STD)
            .to_kind(Kind::Float)
            .to_device(dev);
        let x = ((xs.to_kind(Kind::Float) + 1.0) / 2.0 - mean.view([1, 3, 1, 1]))
            / std.view([1, 3, 1, 1]);
        let ps = self.cfg.patch_size;
        let x = x.upsample_bicubic2d([h * ps, w * ps], false, None, None);
        let b = x.size()[0];
        let tokens = x.apply(&self.patch_embed).flatten(2, -1).transpose(1, 2); // [B, h·w, C]
        let mut x = Tensor::cat(&[self.cls_token.expand([b, -1, -1], false), tokens], 1)
            + self.resampled_pos_embed(h, w);
        for block in &self.blocks {
            x = block.forward(&x);
        }
        let x = x.apply(&self.norm);
        x.narrow(1, 1, h * w).transpose(1, 2) // [B, C, h·w]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> Dinov2Config {
        Dinov2Config {
            embed_dim: 16,
            depth: 2,
            num_heads: 2,
            pos_grid: 5,
            ..Default::default()
        }
    }

    #[test]
    fn keys_match_the_public_checkpoint() {
        let cfg = Dinov2Config::default();
        let vs = nn::VarStore::new(Device::Cpu);
        let _t = Dinov2Teacher::build(vs.root(), &cfg);
        let vars = vs.variables();
        assert_eq!(vars["pos_embed"].size(), vec![1, 1370, 768]);
        assert_eq!(vars["patch_embed.proj.weight"].size(), vec![768, 3, 14, 14]);
        assert_eq!(vars["blocks.11.ls2.gamma"].size(), vec![768]);
        assert_eq!(vars["blocks.0.mlp.fc1.weight"].size(), vec![3072, 768]);
        assert!(vars.contains_key("norm.bias") && vars.contains_key("cls_token"));
    }

    #[test]
    fn features_have_one_token_per_semantic_cell_and_pos_grid_is_resampled() {
        let t = Dinov2Teacher::random(&tiny(), Device::Cpu);
        let x = Tensor::rand([2, 3, 32, 48], (Kind::Float, Device::Cpu)) * 2 - 1;
        let f = t.patch_features(&x, 4, 6);
        assert_eq!(f.size(), vec![2, 16, 24]);
        // at the checkpoint's own grid size nothing changes; a constant grid stays constant
        assert!(t.resampled_pos_embed(5, 5).equal(&t.pos_embed));
        let mut pe = t.pos_embed.shallow_clone();
        tch::no_grad(|| {
            let _ = pe.fill_(0.5); // in place
        });
        let r = t.resampled_pos_embed(3, 2);
        assert_eq!(r.size(), vec![1, 7, 16]);
        assert!((r - 0.5).abs().max().double_value(&[]) < 1e-5);
    }
}
