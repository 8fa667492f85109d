//! Tokenizer configuration, mirroring the reference YAML (`model.params` of
//! `configs/second_stage/tokenizer_config.yaml`) and the parity fixture JSON, which holds the same
//! fields at the top level.
//! Upstream: https://github.com/drx-code/EquivariantModeling/blob/main/configs/second_stage/tokenizer_config.yaml

use super::TokenizerError;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// `ddconfig`: the encoder and decoder (`EquivariantTokenizerEncoder1D/Decoder1D` arguments).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DdConfig {
    pub ch: i64,
    pub out_ch: i64,
    pub ch_mult: Vec<i64>,
    pub num_res_blocks: i64,
    pub attn_resolutions: Vec<i64>,
    pub in_channels: i64,
    pub resolution: i64,
    pub z_channels: i64,
    #[serde(default)]
    pub dropout: f64,
    /// Where the decoder taps the map fed to the semantic decoder: "base", "mid" or "res".
    #[serde(default = "default_semantic_map")]
    pub semantic_map: String,
    /// Decoder width if it differs from the encoder's `ch`.
    #[serde(default)]
    pub decoder_ch: Option<i64>,
    #[serde(default = "default_true")]
    pub resamp_with_conv: bool,
    /// Number of leading resolution levels that halve the width as well as the height. The
    /// reference's own defaults differ between encoder (1) and decoder (2) when the key is absent.
    #[serde(default)]
    pub len_down_scale: Option<i64>,
    #[serde(default)]
    pub double_enc: bool,
}

/// `sematicconfig` (sic): the semantic decoder (`EquivariantTokenizerSemanticDecoder1D`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SemanticConfig {
    pub ch: i64,
    pub out_ch: i64,
    pub ch_mult: Vec<i64>,
    pub num_res_blocks: i64,
    pub attn_resolutions: Vec<i64>,
    pub in_channels: i64,
    pub resolution: i64,
    pub z_channels: i64,
    #[serde(default)]
    pub dropout: f64,
    #[serde(default = "default_true")]
    pub resamp_with_conv: bool,
    #[serde(default)]
    pub downsample_scale: i64,
}

/// `EquivariantTokenizer` constructor arguments that shape the model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenizerConfig {
    pub ddconfig: DdConfig,
    pub sematicconfig: SemanticConfig,
    pub embed_dim: i64,
    #[serde(default = "default_post_channels")]
    pub post_channels: i64,
    #[serde(default = "default_std")]
    pub std: f64,
    #[serde(default = "default_true")]
    pub use_ema: bool,
    #[serde(default = "default_ema_decay")]
    pub ema_decay: f64,
}

fn default_semantic_map() -> String {
    "base".into()
}
fn default_true() -> bool {
    true
}
fn default_post_channels() -> i64 {
    4096
}
fn default_std() -> f64 {
    2.5
}
fn default_ema_decay() -> f64 {
    0.99
}

/// Height or width factor of one resampling level: (2,2) halves both, (2,1) only the height.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stride {
    Both,
    HeightOnly,
}

impl Stride {
    /// (height factor, width factor).
    pub fn factors(self) -> (i64, i64) {
        match self {
            Stride::Both => (2, 2),
            Stride::HeightOnly => (2, 1),
        }
    }
}

impl DdConfig {
    pub fn num_resolutions(&self) -> usize {
        self.ch_mult.len()
    }

    /// Stride of the encoder's downsample after level `i_level` (reference: `i_level <= len_down_scale - 1`).
    pub fn encoder_stride(&self, i_level: usize) -> Stride {
        let lds = self.len_down_scale.unwrap_or(1);
        if (i_level as i64) < lds {
            Stride::Both
        } else {
            Stride::HeightOnly
        }
    }

    /// Stride of the decoder's upsample at level `i_level` (reference: `i_level <= len_down_scale`).
    pub fn decoder_stride(&self, i_level: usize) -> Stride {
        let lds = self.len_down_scale.unwrap_or(2);
        if (i_level as i64) <= lds {
            Stride::Both
        } else {
            Stride::HeightOnly
        }
    }

    /// Height of the latent map (rows folded into each column token).
    pub fn latent_height(&self) -> i64 {
        self.resolution >> (self.num_resolutions() - 1)
    }

    /// Image pixels per encoder column token.
    pub fn encoder_width_factor(&self) -> i64 {
        (0..self.num_resolutions() - 1)
            .map(|i| self.encoder_stride(i).factors().1)
            .product()
    }

    /// Image pixels per decoded token.
    pub fn decoder_width_factor(&self) -> i64 {
        (1..self.num_resolutions())
            .map(|i| self.decoder_stride(i).factors().1)
            .product()
    }

    pub fn decoder_ch(&self) -> i64 {
        self.decoder_ch.unwrap_or(self.ch)
    }
}

impl TokenizerConfig {
    /// The released inference tokenizer (`configs/second_stage/tokenizer_config.yaml`, 281.6M
    /// parameters).
    pub fn full() -> Self {
        Self {
            ddconfig: DdConfig {
                ch: 128,
                out_ch: 3,
                ch_mult: vec![1, 1, 2, 4, 4],
                num_res_blocks: 2,
                attn_resolutions: vec![16],
                in_channels: 3,
                resolution: 256,
                z_channels: 256,
                dropout: 0.0,
                semantic_map: "res".into(),
                decoder_ch: None,
                resamp_with_conv: true,
                len_down_scale: Some(4),
                double_enc: false,
            },
            sematicconfig: SemanticConfig {
                ch: 64,
                out_ch: 768,
                ch_mult: vec![8, 12],
                num_res_blocks: 2,
                attn_resolutions: vec![],
                in_channels: 3,
                resolution: 256,
                z_channels: 256,
                dropout: 0.0,
                resamp_with_conv: true,
                downsample_scale: 0,
            },
            embed_dim: 256,
            post_channels: 4096,
            std: 2.5,
            use_ema: true,
            ema_decay: 0.99,
        }
    }

    /// Reads a config from the fixture JSON (fields at the top level) or the reference YAML
    /// (fields under `model.params`; JSON is YAML, so one parser reads both).
    pub fn from_value(value: serde_yaml::Value) -> Result<Self, TokenizerError> {
        let params = value
            .get("model")
            .and_then(|m| m.get("params"))
            .cloned()
            .unwrap_or(value);
        let cfg: Self =
            serde_yaml::from_value(params).map_err(|e| TokenizerError::Config(e.to_string()))?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn from_file(path: &Path) -> Result<Self, TokenizerError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| TokenizerError::Config(format!("reading {}: {e}", path.display())))?;
        let value: serde_yaml::Value = serde_yaml::from_str(&text)
            .map_err(|e| TokenizerError::Config(format!("parsing {}: {e}", path.display())))?;
        Self::from_value(value)
            .map_err(|e| TokenizerError::Config(format!("{}: {e}", path.display())))
    }

    pub fn from_json(json: &serde_json::Value) -> Result<Self, TokenizerError> {
        let value =
            serde_yaml::to_value(json).map_err(|e| TokenizerError::Config(e.to_string()))?;
        Self::from_value(value)
    }

    /// Channels of each column token before `quant_layer`.
    pub fn quant_in_channels(&self) -> i64 {
        if self.ddconfig.double_enc {
            self.post_channels * 2
        } else {
            self.post_channels
        }
    }

    /// Rejects configurations the reference would fail on later with an opaque shape error.
    pub fn validate(&self) -> Result<(), TokenizerError> {
        let dd = &self.ddconfig;
        let bad = |m: String| Err(TokenizerError::Config(m));
        if dd.ch_mult.is_empty() || self.sematicconfig.ch_mult.is_empty() {
            return bad("ch_mult must not be empty".into());
        }
        if dd.resolution % (1 << (dd.num_resolutions() - 1)) != 0 {
            return bad(format!(
                "ddconfig.resolution {} is not divisible by 2^(len(ch_mult)-1) = {}",
                dd.resolution,
                1 << (dd.num_resolutions() - 1)
            ));
        }
        let latent = dd.latent_height() * dd.z_channels;
        if latent != self.post_channels {
            return bad(format!(
                "post_channels {} must equal z_channels x latent height = {} x {} = {latent}",
                self.post_channels,
                dd.z_channels,
                dd.latent_height()
            ));
        }
        if !matches!(dd.semantic_map.as_str(), "base" | "mid" | "res") {
            return bad(format!(
                "ddconfig.semantic_map must be base, mid or res, not {:?}",
                dd.semantic_map
            ));
        }
        if dd.semantic_map == "res" && dd.num_resolutions() < 2 {
            return bad("semantic_map \"res\" needs at least two resolution levels".into());
        }
        let sc = &self.sematicconfig;
        if sc.out_ch % sc.ch != 0 {
            return bad(format!(
                "sematicconfig.out_ch {} must be a multiple of ch {}",
                sc.out_ch, sc.ch
            ));
        }
        let semantic_in = dd.decoder_ch() * dd.ch_mult[dd.num_resolutions() - 1];
        if sc.ch * sc.ch_mult[0] != semantic_in {
            return bad(format!(
                "sematicconfig.ch x ch_mult[0] = {} must equal the decoder's semantic map channels {semantic_in}",
                sc.ch * sc.ch_mult[0]
            ));
        }
        for (what, c) in [("ddconfig.ch", dd.ch), ("sematicconfig.ch", sc.ch)] {
            if c <= 0 {
                return bad(format!("{what} must be positive"));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The released inference config in the reference's YAML layout (values from
    /// shared/spec/reference.md section 2.1), with the keys the port does not use.
    const REFERENCE_LAYOUT: &str = "
model:
  base_learning_rate: 1.92e-4
  target: tokenizer.models.tokenizer.EquivariantTokenizer
  params:
    embed_dim: 256
    use_ema: true
    post_channels: 4096
    std: 2.5
    ckpt_path: pretrained_models/tokenizer.ckpt
    stage2: true
    ddconfig:
      double_enc: false
      z_channels: 256
      resolution: 256
      in_channels: 3
      out_ch: 3
      ch: 128
      ch_mult: [1, 1, 2, 4, 4]
      num_res_blocks: 2
      dropout: 0.0
      attn_resolutions: [16]
      len_down_scale: 4
      semantic_map: res
    sematicconfig:
      z_channels: 256
      resolution: 256
      in_channels: 3
      out_ch: 768
      ch: 64
      ch_mult: [8, 12]
      num_res_blocks: 2
      dropout: 0.0
      attn_resolutions: []
      downsample_scale: 0
    lossconfig:
      target: tokenizer.modules.losses.DummyLoss
";

    #[test]
    fn reference_yaml_layout_reads_as_the_full_preset() {
        let value: serde_yaml::Value = serde_yaml::from_str(REFERENCE_LAYOUT).unwrap();
        let cfg = TokenizerConfig::from_value(value).unwrap();
        assert_eq!(cfg, TokenizerConfig::full());
        assert_eq!(cfg.ddconfig.latent_height(), 16);
        assert_eq!(cfg.ddconfig.decoder_width_factor(), 16);
    }

    #[test]
    fn inconsistent_configs_are_refused_with_the_fix() {
        let mut cfg = TokenizerConfig::full();
        cfg.post_channels = 2048;
        let err = cfg.validate().unwrap_err().to_string();
        assert!(err.contains("post_channels 2048 must equal"), "{err}");
        let mut cfg = TokenizerConfig::full();
        cfg.sematicconfig.ch_mult = vec![4, 12];
        let err = cfg.validate().unwrap_err().to_string();
        assert!(err.contains("semantic map channels 512"), "{err}");
        let value: serde_yaml::Value =
            serde_yaml::from_str("model: {params: {embed_dim: 3}}").unwrap();
        let err = TokenizerConfig::from_value(value).unwrap_err().to_string();
        assert!(err.contains("ddconfig"), "{err}");
    }
}
