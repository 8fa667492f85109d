//! `EquivariantTokenizerSemanticDecoder1D`: maps a decoder feature map to DINOv2-sized features for
//! the training loss. Each level builds `num_res_blocks + 1` ResnetBlocks but runs only
//! `num_res_blocks` (the last is dead weight in the checkpoint; built so that loading is strict).
//! Upstream: https://github.com/drx-code/EquivariantModeling/blob/main/tokenizer/modules/diffusionmodules/model.py

use super::blocks::{conv3x3, nonlinearity_owned, normalize};
use super::blocks::{AttnBlock, DownsampleShuffleResidual, ResnetBlock};
use super::config::{SemanticConfig, Stride};
use super::encoder::{run_blocks, DownLevel};
use tch::nn::{self, Module};
use tch::Tensor;

#[derive(Debug)]
pub struct EquivariantTokenizerSemanticDecoder1D {
    down: Vec<DownLevel>,
    norm_out: nn::GroupNorm,
    conv_out: nn::Conv2D,
    num_res_blocks: usize,
}

impl EquivariantTokenizerSemanticDecoder1D {
    pub fn new(p: nn::Path, cfg: &SemanticConfig) -> Self {
        let n_levels = cfg.ch_mult.len();
        // out_ch_mult = ch_mult + (out_ch // ch,)
        let mut out_ch_mult = cfg.ch_mult.clone();
        out_ch_mult.push(cfg.out_ch / cfg.ch);
        let mut curr_res = cfg.resolution >> (n_levels - 1);
        let mut block_in = cfg.ch * cfg.ch_mult[0];
        let mut down = Vec::with_capacity(n_levels);
        for i_level in 0..n_levels {
            let lp = &p / "down" / i_level as i64;
            block_in = cfg.ch * cfg.ch_mult[i_level];
            let block_out = cfg.ch * out_ch_mult[i_level + 1];
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
            let downsample = ((i_level as i64) < cfg.downsample_scale).then(|| {
                curr_res /= 2;
                DownsampleShuffleResidual::new(&lp / "downsample", block_in, Stride::Both)
            });
            down.push(DownLevel {
                block,
                attn,
                downsample,
            });
        }
        Self {
            down,
            norm_out: normalize(&p / "norm_out", block_in),
            conv_out: conv3x3(&p / "conv_out", block_in, cfg.out_ch),
            num_res_blocks: cfg.num_res_blocks as usize,
        }
    }
}

impl Module for EquivariantTokenizerSemanticDecoder1D {
    fn forward(&self, xs: &Tensor) -> Tensor {
        let mut h = xs.shallow_clone();
        for level in &self.down {
            h = run_blocks(&h, &level.block, &level.attn, self.num_res_blocks);
            if let Some(ds) = &level.downsample {
                h = h.apply(ds);
            }
        }
        nonlinearity_owned(h.apply(&self.norm_out)).apply(&self.conv_out)
    }
}
