//! `EquivariantTokenizerEncoder1D`: an LDM-style CNN whose final map is cut into columns, each
//! column one token, followed by a 1D conv across the tokens.
//! Upstream: https://github.com/drx-code/EquivariantModeling/blob/main/tokenizer/modules/diffusionmodules/model.py

use super::blocks::{conv1d_k3, conv3x3, nonlinearity_owned, normalize};
use super::blocks::{AttnBlock, DownsampleShuffleResidual, ResnetBlock};
use super::config::DdConfig;
use tch::nn::{self, Module};
use tch::Tensor;

/// One resolution level of the encoder (`down[i]`).
#[derive(Debug)]
pub struct DownLevel {
    pub block: Vec<ResnetBlock>,
    pub attn: Vec<AttnBlock>,
    pub downsample: Option<DownsampleShuffleResidual>,
}

/// `mid`: ResnetBlock, AttnBlock, ResnetBlock.
#[derive(Debug)]
pub struct Mid {
    pub block_1: ResnetBlock,
    pub attn_1: AttnBlock,
    pub block_2: ResnetBlock,
}

impl Mid {
    pub fn new(p: nn::Path, channels: i64) -> Self {
        Self {
            block_1: ResnetBlock::new(&p / "block_1", channels, channels),
            attn_1: AttnBlock::new(&p / "attn_1", channels),
            block_2: ResnetBlock::new(&p / "block_2", channels, channels),
        }
    }
}

impl Module for Mid {
    fn forward(&self, xs: &Tensor) -> Tensor {
        xs.apply(&self.block_1)
            .apply(&self.attn_1)
            .apply(&self.block_2)
    }
}

/// Runs a level's res blocks, each followed by its attention block when the level has them.
pub fn run_blocks(xs: &Tensor, block: &[ResnetBlock], attn: &[AttnBlock], n: usize) -> Tensor {
    let mut h = xs.shallow_clone();
    for (i, b) in block.iter().take(n).enumerate() {
        h = h.apply(b);
        if let Some(a) = attn.get(i) {
            h = h.apply(a);
        }
    }
    h
}

#[derive(Debug)]
pub struct EquivariantTokenizerEncoder1D {
    conv_in: nn::Conv2D,
    down: Vec<DownLevel>,
    mid: Mid,
    norm_out: nn::GroupNorm,
    conv_out: nn::Conv2D,
    encoder1d: nn::Conv1D,
    num_res_blocks: usize,
}

impl EquivariantTokenizerEncoder1D {
    pub fn new(p: nn::Path, cfg: &DdConfig) -> Self {
        let ch = cfg.ch;
        let n_levels = cfg.num_resolutions();
        let conv_in = conv3x3(&p / "conv_in", cfg.in_channels, ch);
        let mut curr_res = cfg.resolution;
        let mut block_in = ch;
        let mut down = Vec::with_capacity(n_levels);
        for i_level in 0..n_levels {
            let lp = &p / "down" / i_level as i64;
            let block_out = ch * cfg.ch_mult[i_level];
            let (mut block, mut attn) = (Vec::new(), Vec::new());
            for i_block in 0..cfg.num_res_blocks {
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
            let downsample = (i_level != n_levels - 1).then(|| {
                curr_res /= 2;
                let stride = cfg.encoder_stride(i_level);
                DownsampleShuffleResidual::new(&lp / "downsample", block_in, stride)
            });
            down.push(DownLevel {
                block,
                attn,
                downsample,
            });
        }
        let z_out = if cfg.double_enc {
            cfg.z_channels * 2
        } else {
            cfg.z_channels
        };
        let column_channels = z_out * curr_res;
        Self {
            conv_in,
            down,
            mid: Mid::new(&p / "mid", block_in),
            norm_out: normalize(&p / "norm_out", block_in),
            conv_out: conv3x3(&p / "conv_out", block_in, z_out),
            encoder1d: conv1d_k3(&p / "encoder1d", column_channels, column_channels),
            num_res_blocks: cfg.num_res_blocks as usize,
        }
    }

    /// [B, in_channels, resolution, W] -> column features [B, W / width factor, C * H_latent].
    /// Shapes are checked by the caller (`EquivariantTokenizer::encode`).
    pub fn forward(&self, xs: &Tensor) -> Tensor {
        let mut h = xs.apply(&self.conv_in);
        for level in &self.down {
            h = run_blocks(&h, &level.block, &level.attn, self.num_res_blocks);
            if let Some(ds) = &level.downsample {
                h = h.apply(ds);
            }
        }
        let h = nonlinearity_owned(h.apply(&self.mid).apply(&self.norm_out)).apply(&self.conv_out);
        // Columnisation: [B, C, H, W] -> [B, W, C, H] -> [B, W, C*H] (feature index c*H + y)
        let (b, c, hh, w) = h.size4().expect("encoder: conv_out gives [B, C, H, W]");
        let columns = h.permute([0, 3, 1, 2]).reshape([b, w, c * hh]);
        // Conv1d over tokens: [B, C*H, W] -> back to [B, W, C*H]
        columns
            .permute([0, 2, 1])
            .apply(&self.encoder1d)
            .permute([0, 2, 1])
    }
}
