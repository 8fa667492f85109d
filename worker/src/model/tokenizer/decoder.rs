//! `EquivariantTokenizerDecoder1D`: a 1D conv across tokens, rasterisation of each token back into
//! a column of the latent map, then an LDM-style upsampling CNN.
//! Upstream: https://github.com/drx-code/EquivariantModeling/blob/main/tokenizer/modules/diffusionmodules/model.py

use super::blocks::{conv1d_k3, conv3x3, nonlinearity_owned, normalize};
use super::blocks::{AttnBlock, ResnetBlock, UpsampleShuffleResidual};
use super::config::DdConfig;
use super::encoder::{run_blocks, Mid};
use tch::nn;
use tch::Tensor;

/// Where the decoder taps the map fed to the semantic decoder (`semantic_map`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SemanticTap {
    Base,
    Mid,
    Res,
}

/// One resolution level of the decoder (`up[i]`).
#[derive(Debug)]
pub struct UpLevel {
    pub block: Vec<ResnetBlock>,
    pub attn: Vec<AttnBlock>,
    pub upsample: Option<UpsampleShuffleResidual>,
}

#[derive(Debug)]
pub struct EquivariantTokenizerDecoder1D {
    decoder1d: nn::Conv1D,
    conv_in: nn::Conv2D,
    mid: Mid,
    /// Indexed by level (`up[0]` is the full-resolution level), run from the last to the first.
    up: Vec<UpLevel>,
    norm_out: nn::GroupNorm,
    conv_out: nn::Conv2D,
    z_channels: i64,
    semantic_tap: SemanticTap,
}

impl EquivariantTokenizerDecoder1D {
    pub fn new(p: nn::Path, cfg: &DdConfig) -> Self {
        let ch = cfg.decoder_ch();
        let n_levels = cfg.num_resolutions();
        let mut block_in = ch * cfg.ch_mult[n_levels - 1];
        let mut curr_res = cfg.latent_height();
        let conv_in = conv3x3(&p / "conv_in", cfg.z_channels, block_in);
        let mid = Mid::new(&p / "mid", block_in);
        let mut up: Vec<UpLevel> = Vec::with_capacity(n_levels);
        for i_level in (0..n_levels).rev() {
            let lp = &p / "up" / i_level as i64;
            let block_out = ch * cfg.ch_mult[i_level];
            let (mut block, mut attn) = (Vec::new(), Vec::new());
            for i_block in 0..=cfg.num_res_blocks {
                block.push(ResnetBlock::new(
                    &lp / "block" / i_block,
                    block_in,
                    block_out,
                ));
                block_in = block_out;
                if cfg.attn_resolutions.contains(&curr_res) {
                    attn.push(AttnBlock::new(&lp / "attn" / i_block, block_in));
                }
            }
            let upsample = (i_level != 0).then(|| {
                curr_res *= 2;
                let stride = cfg.decoder_stride(i_level);
                UpsampleShuffleResidual::new(&lp / "upsample", block_in, stride)
            });
            up.push(UpLevel {
                block,
                attn,
                upsample,
            });
        }
        up.reverse();
        let column_channels = cfg.latent_height() * cfg.z_channels;
        Self {
            decoder1d: conv1d_k3(&p / "decoder1d", column_channels, column_channels),
            conv_in,
            mid,
            up,
            norm_out: normalize(&p / "norm_out", block_in),
            conv_out: conv3x3(&p / "conv_out", block_in, cfg.out_ch),
            z_channels: cfg.z_channels,
            semantic_tap: match cfg.semantic_map.as_str() {
                "mid" => SemanticTap::Mid,
                "res" => SemanticTap::Res,
                _ => SemanticTap::Base,
            },
        }
    }

    /// Token features [B, L, C*H] -> the latent map [B, C, H, L] after `decoder1d` and `conv_in`.
    pub fn rasterize(&self, zs: &Tensor) -> Tensor {
        // Conv1d over tokens on [B, C*H, L], back to [B, L, C*H]
        let h = zs
            .permute([0, 2, 1])
            .apply(&self.decoder1d)
            .permute([0, 2, 1]);
        let (b, l, _) = h.size3().expect("decoder: z must be [B, L, C*H]");
        // [B, L, C, H] -> [B, C, H, L]
        h.reshape([b, l, self.z_channels, -1])
            .permute([0, 2, 3, 1])
            .apply(&self.conv_in)
    }

    /// Decodes [B, L, C*H] to (image [B, out_ch, H_img, W], semantic map). With `want_semantic`
    /// false the semantic map is not kept (None).
    pub fn forward(&self, zs: &Tensor, want_semantic: bool) -> (Tensor, Option<Tensor>) {
        let mut h = self.rasterize(zs);
        let mut semantic = None;
        let keep = |tap: SemanticTap, h: &Tensor, semantic: &mut Option<Tensor>| {
            if want_semantic && self.semantic_tap == tap {
                *semantic = Some(h.shallow_clone());
            }
        };
        keep(SemanticTap::Base, &h, &mut semantic);
        h = h.apply(&self.mid);
        keep(SemanticTap::Mid, &h, &mut semantic);
        let n_levels = self.up.len();
        for (i_level, level) in self.up.iter().enumerate().rev() {
            h = run_blocks(&h, &level.block, &level.attn, level.block.len());
            if let Some(us) = &level.upsample {
                if i_level == n_levels - 1 {
                    keep(SemanticTap::Res, &h, &mut semantic);
                }
                h = h.apply(us);
            }
        }
        let normed = h.apply(&self.norm_out);
        drop(h);
        let image = nonlinearity_owned(normed).apply(&self.conv_out);
        (image, semantic)
    }
}
