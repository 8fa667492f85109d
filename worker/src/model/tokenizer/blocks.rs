//! Building blocks of the tokenizer CNNs: GroupNorm, swish, reflect-padded convs, ResnetBlock,
//! AttnBlock and the pixel-(un)shuffle residual resamplers.
//! Upstream: https://github.com/drx-code/EquivariantModeling/blob/main/tokenizer/modules/diffusionmodules/model.py

use super::config::Stride;
use tch::nn::{self, Module};
use tch::Tensor;

/// `x * sigmoid(x)`, two ops as the reference writes it (not the fused silu kernel).
pub fn nonlinearity(xs: &Tensor) -> Tensor {
    xs * xs.sigmoid()
}

/// [`nonlinearity`] that consumes its input: without autograd it multiplies in place, so a
/// full-size activation is freed one op earlier (bitwise equal: the product is commutative).
pub fn nonlinearity_owned(mut xs: Tensor) -> Tensor {
    if xs.requires_grad() {
        return nonlinearity(&xs);
    }
    let gate = xs.sigmoid();
    xs *= &gate;
    xs
}

/// `a + b` that reuses `a`'s memory when no gradient flows (bitwise equal to `b + a`).
pub fn add_owned(mut a: Tensor, b: &Tensor) -> Tensor {
    if a.requires_grad() || b.requires_grad() || a.size() != b.size() {
        return &a + b;
    }
    a += b;
    a
}

/// `Normalize(C)`: GroupNorm with 32 groups, eps 1e-6, affine.
pub fn normalize(p: nn::Path, channels: i64) -> nn::GroupNorm {
    let cfg = nn::GroupNormConfig {
        eps: 1e-6,
        ..Default::default()
    };
    nn::group_norm(p, 32, channels, cfg)
}

/// Conv2d k3, padding 1 in reflect mode (`padding_mode="reflect"`).
pub fn conv3x3(p: nn::Path, in_ch: i64, out_ch: i64) -> nn::Conv2D {
    let cfg = nn::ConvConfig {
        padding: 1,
        padding_mode: nn::PaddingMode::Reflect,
        ..Default::default()
    };
    nn::conv2d(p, in_ch, out_ch, 3, cfg)
}

/// Conv2d k1 (reflect padding of 0 is no padding).
pub fn conv1x1(p: nn::Path, in_ch: i64, out_ch: i64) -> nn::Conv2D {
    nn::conv2d(p, in_ch, out_ch, 1, Default::default())
}

/// Conv1d k3, padding 1 in reflect mode, over the token axis of [B, C, L].
pub fn conv1d_k3(p: nn::Path, in_ch: i64, out_ch: i64) -> nn::Conv1D {
    let cfg = nn::ConvConfig {
        padding: 1,
        padding_mode: nn::PaddingMode::Reflect,
        ..Default::default()
    };
    nn::conv1d(p, in_ch, out_ch, 3, cfg)
}

/// `ResnetBlock` without timestep embedding and without dropout (inference; dropout is 0.0 in
/// every released config).
#[derive(Debug)]
pub struct ResnetBlock {
    norm1: nn::GroupNorm,
    conv1: nn::Conv2D,
    norm2: nn::GroupNorm,
    conv2: nn::Conv2D,
    nin_shortcut: Option<nn::Conv2D>,
}

impl ResnetBlock {
    pub fn new(p: nn::Path, in_ch: i64, out_ch: i64) -> Self {
        Self {
            norm1: normalize(&p / "norm1", in_ch),
            conv1: conv3x3(&p / "conv1", in_ch, out_ch),
            norm2: normalize(&p / "norm2", out_ch),
            conv2: conv3x3(&p / "conv2", out_ch, out_ch),
            nin_shortcut: (in_ch != out_ch).then(|| conv1x1(&p / "nin_shortcut", in_ch, out_ch)),
        }
    }
}

impl Module for ResnetBlock {
    fn forward(&self, xs: &Tensor) -> Tensor {
        // One full-size temporary at a time besides the input (long panoramas decode at 16 L px).
        let h = nonlinearity_owned(xs.apply(&self.norm1)).apply(&self.conv1);
        let normed = h.apply(&self.norm2);
        drop(h);
        let h = nonlinearity_owned(normed).apply(&self.conv2);
        match &self.nin_shortcut {
            Some(nin) => add_owned(h, &xs.apply(nin)),
            None => add_owned(h, xs),
        }
    }
}

/// `AttnBlock`: single-head self-attention over all h*w positions, scale applied after the matmul.
#[derive(Debug)]
pub struct AttnBlock {
    norm: nn::GroupNorm,
    q: nn::Conv2D,
    k: nn::Conv2D,
    v: nn::Conv2D,
    proj_out: nn::Conv2D,
}

impl AttnBlock {
    pub fn new(p: nn::Path, channels: i64) -> Self {
        Self {
            norm: normalize(&p / "norm", channels),
            q: conv1x1(&p / "q", channels, channels),
            k: conv1x1(&p / "k", channels, channels),
            v: conv1x1(&p / "v", channels, channels),
            proj_out: conv1x1(&p / "proj_out", channels, channels),
        }
    }
}

impl Module for AttnBlock {
    fn forward(&self, xs: &Tensor) -> Tensor {
        let hn = xs.apply(&self.norm);
        let (b, c, h, w) = hn.size4().expect("AttnBlock: x must be [B, C, H, W]");
        // q: [B, C, HW] -> [B, HW, C]; k, v: [B, C, HW]
        let q = hn.apply(&self.q).reshape([b, c, h * w]).permute([0, 2, 1]);
        let k = hn.apply(&self.k).reshape([b, c, h * w]);
        let v = hn.apply(&self.v).reshape([b, c, h * w]);
        // weights [B, HW(query), HW(key)]
        let weights = (q.bmm(&k) * (c as f64).powf(-0.5)).softmax(2, tch::Kind::Float);
        drop((q, k));
        // [B, C, HW(query)] -> [B, C, H, W]
        let out = v.bmm(&weights.permute([0, 2, 1])).reshape([b, c, h, w]);
        xs + out.apply(&self.proj_out)
    }
}

/// `PixelUnshuffle` of the reference: [B, C, H, W] -> [B, C*fh*fw, H/fh, W/fw], channel order
/// c*fh*fw + dy*fw + dx (equal to `F.pixel_unshuffle` for (2,2)).
pub fn pixel_unshuffle(xs: &Tensor, stride: Stride) -> Tensor {
    let (fh, fw) = stride.factors();
    let (b, c, h, w) = xs.size4().expect("pixel_unshuffle: x must be [B, C, H, W]");
    // [B, C, H/fh, fh, W/fw, fw] -> [B, C, fh, fw, H/fh, W/fw]
    xs.view([b, c, h / fh, fh, w / fw, fw])
        .permute([0, 1, 3, 5, 2, 4])
        .reshape([b, c * fh * fw, h / fh, w / fw])
}

/// `PixelShuffle` of the reference, the inverse of [`pixel_unshuffle`].
pub fn pixel_shuffle(xs: &Tensor, stride: Stride) -> Tensor {
    let (fh, fw) = stride.factors();
    let (b, c, h, w) = xs.size4().expect("pixel_shuffle: x must be [B, C, H, W]");
    let c_out = c / (fh * fw);
    // [B, C/(fh fw), fh, fw, H, W] -> [B, C/(fh fw), H, fh, W, fw]
    xs.view([b, c_out, fh, fw, h, w])
        .permute([0, 1, 4, 2, 5, 3])
        .reshape([b, c_out, h * fh, w * fw])
}

/// `DownsampleShuffle`: conv to C/(fh fw) channels, then pixel-unshuffle.
#[derive(Debug)]
pub struct DownsampleShuffle {
    conv: nn::Conv2D,
    stride: Stride,
}

/// `DownsampleShuffleResidual`: the shuffled conv plus the average of each pixel group.
#[derive(Debug)]
pub struct DownsampleShuffleResidual {
    conv: DownsampleShuffle,
}

impl DownsampleShuffleResidual {
    pub fn new(p: nn::Path, channels: i64, stride: Stride) -> Self {
        let (fh, fw) = stride.factors();
        let conv = DownsampleShuffle {
            conv: conv3x3(&p / "conv" / "conv", channels, channels / (fh * fw)),
            stride,
        };
        Self { conv }
    }
}

impl Module for DownsampleShuffleResidual {
    fn forward(&self, xs: &Tensor) -> Tensor {
        let stride = self.conv.stride;
        let res = pixel_unshuffle(&xs.apply(&self.conv.conv), stride);
        let shuffled = pixel_unshuffle(xs, stride);
        let (b, c, h, w) = shuffled.size4().expect("downsample: [B, C, H, W]");
        let groups = stride.factors().0 * stride.factors().1;
        // [B, C, groups, H, W] -> mean over the pixel group
        let skip =
            shuffled
                .view([b, c / groups, groups, h, w])
                .mean_dim(2, false, tch::Kind::Float);
        res + skip
    }
}

/// `UpsampleShuffle`: conv to C*fh*fw channels, then pixel-shuffle.
#[derive(Debug)]
pub struct UpsampleShuffle {
    conv: nn::Conv2D,
    stride: Stride,
}

/// `UpsampleShuffleResidual`: the shuffled conv plus a nearest-neighbour upsample.
#[derive(Debug)]
pub struct UpsampleShuffleResidual {
    conv: UpsampleShuffle,
}

impl UpsampleShuffleResidual {
    pub fn new(p: nn::Path, channels: i64, stride: Stride) -> Self {
        let (fh, fw) = stride.factors();
        let conv = UpsampleShuffle {
            conv: conv3x3(&p / "conv" / "conv", channels, channels * fh * fw),
            stride,
        };
        Self { conv }
    }
}

impl Module for UpsampleShuffleResidual {
    fn forward(&self, xs: &Tensor) -> Tensor {
        let stride = self.conv.stride;
        let res = pixel_shuffle(&xs.apply(&self.conv.conv), stride);
        // repeat_interleave(fh*fw, dim=1) then pixel_shuffle is a nearest-neighbour upsample; the
        // values are copies, so the direct op is exact and needs one full-size tensor less.
        let (fh, fw) = stride.factors();
        let (_, _, h, w) = xs.size4().expect("upsample: x must be [B, C, H, W]");
        let skip = xs.upsample_nearest2d([h * fh, w * fw], Some(fh as f64), Some(fw as f64));
        add_owned(res, &skip)
    }
}
