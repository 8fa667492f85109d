//! The equivariant 1D tokenizer (`EquivariantTokenizer`): an image of height `resolution` and any
//! width (a multiple of the downsampling factor) becomes one token per latent column; a wider image
//! gives more tokens. Inference only (no loss, no discriminator).
//! Upstream: https://github.com/drx-code/EquivariantModeling/blob/main/tokenizer/models/tokenizer.py

pub mod blocks;
pub mod config;
pub mod decoder;
pub mod distributions;
pub mod ema;
pub mod encoder;
pub mod semantic_decoder;

pub use config::{DdConfig, SemanticConfig, TokenizerConfig};
pub use decoder::EquivariantTokenizerDecoder1D;
pub use distributions::GaussianDistribution;
pub use ema::WeightChoice;
pub use encoder::EquivariantTokenizerEncoder1D;
pub use semantic_decoder::EquivariantTokenizerSemanticDecoder1D;

use crate::model::weights::{self, WeightsError};
use std::collections::BTreeMap;
use tch::nn::{self, Module};
use tch::Tensor;

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("tokenizer config: {0}")]
    Config(String),
    #[error("tokenizer input: {0}")]
    Shape(String),
    #[error(transparent)]
    Weights(#[from] WeightsError),
    #[error("weights from {source_name}: unknown keys that are neither tokenizer weights, their EMA copies nor loss.*: {keys}")]
    UnknownKeys { source_name: String, keys: String },
}

/// What a load took from the file and what it left.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadReport {
    pub choice: WeightChoice,
    /// Keys of the copy not chosen (live when loading EMA and vice versa).
    pub other_copy: usize,
    /// `ema_*.decay` / `ema_*.num_updates`.
    pub ema_bookkeeping: usize,
    /// Training-loss keys (`loss.*`: LPIPS, discriminator, DINOv2 teacher), ignored.
    pub ignored_loss_keys: Vec<String>,
}

#[derive(Debug)]
pub struct EquivariantTokenizer {
    pub encoder: EquivariantTokenizerEncoder1D,
    pub decoder: EquivariantTokenizerDecoder1D,
    pub semantic_decoder: EquivariantTokenizerSemanticDecoder1D,
    pub quant_layer: nn::Conv1D,
    pub post_quant_layer: nn::Conv1D,
    pub cfg: TokenizerConfig,
}

impl EquivariantTokenizer {
    pub fn new(p: nn::Path, cfg: &TokenizerConfig) -> Self {
        Self {
            encoder: EquivariantTokenizerEncoder1D::new(&p / "encoder", &cfg.ddconfig),
            decoder: EquivariantTokenizerDecoder1D::new(&p / "decoder", &cfg.ddconfig),
            semantic_decoder: EquivariantTokenizerSemanticDecoder1D::new(
                &p / "semantic_decoder",
                &cfg.sematicconfig,
            ),
            quant_layer: blocks::conv1d_k3(
                &p / "quant_layer",
                cfg.quant_in_channels(),
                cfg.embed_dim,
            ),
            post_quant_layer: blocks::conv1d_k3(
                &p / "post_quant_layer",
                cfg.embed_dim,
                cfg.post_channels,
            ),
            cfg: cfg.clone(),
        }
    }

    /// Number of tokens an image `width` pixels wide gives, or an error naming the valid widths.
    pub fn tokens_for_width(&self, width: i64) -> Result<i64, TokenizerError> {
        let factor = self.cfg.ddconfig.encoder_width_factor();
        if width % factor != 0 || width / factor < 2 {
            return Err(TokenizerError::Shape(format!(
                "image width {width} must be a multiple of {factor} and at least {}",
                2 * factor
            )));
        }
        Ok(width / factor)
    }

    /// Image [B, in_channels, resolution, W] in [-1, 1] -> posterior over [B, W/f, embed_dim].
    pub fn encode(&self, xs: &Tensor) -> Result<GaussianDistribution, TokenizerError> {
        let dd = &self.cfg.ddconfig;
        let size = xs.size();
        let [_, c, h, w] = size.as_slice() else {
            return Err(TokenizerError::Shape(format!(
                "image batch must be [B, C, H, W], got {size:?}"
            )));
        };
        if *c != dd.in_channels {
            return Err(TokenizerError::Shape(format!(
                "image has {c} channels, the tokenizer expects {}",
                dd.in_channels
            )));
        }
        if *h != dd.resolution {
            return Err(TokenizerError::Shape(format!(
                "image height {h} does not match the tokenizer: expected height {} (resize or crop \
                 the image to {} rows; the width may be any multiple of {})",
                dd.resolution,
                dd.resolution,
                dd.encoder_width_factor()
            )));
        }
        self.tokens_for_width(*w)?;
        let columns = self.encoder.forward(xs);
        // quant_layer on [B, C, L], back to [B, L, embed_dim]
        let moments = columns
            .permute([0, 2, 1])
            .apply(&self.quant_layer)
            .permute([0, 2, 1]);
        Ok(GaussianDistribution::new(moments, self.cfg.std))
    }

    fn check_tokens(&self, zs: &Tensor) -> Result<(), TokenizerError> {
        let size = zs.size();
        match size.as_slice() {
            [_, l, c] if *c == self.cfg.embed_dim && *l >= 2 => Ok(()),
            _ => Err(TokenizerError::Shape(format!(
                "tokens must be [B, L >= 2, {}], got {size:?}",
                self.cfg.embed_dim
            ))),
        }
    }

    /// Token features after `post_quant_layer`: [B, L, embed_dim] -> [B, L, post_channels].
    fn post_quant(&self, zs: &Tensor) -> Tensor {
        zs.permute([0, 2, 1])
            .apply(&self.post_quant_layer)
            .permute([0, 2, 1])
    }

    /// Tokens [B, L, embed_dim] -> image [B, out_ch, resolution, L * f]. Skips the semantic
    /// decoder, whose output the reference's `decode` computes and discards at inference.
    pub fn decode(&self, zs: &Tensor) -> Result<Tensor, TokenizerError> {
        self.check_tokens(zs)?;
        Ok(self.decoder.forward(&self.post_quant(zs), false).0)
    }

    /// The reference's `decode`: (image, semantic decoder output).
    pub fn decode_with_semantic(&self, zs: &Tensor) -> Result<(Tensor, Tensor), TokenizerError> {
        self.check_tokens(zs)?;
        let (image, semantic) = self.decoder.forward(&self.post_quant(zs), true);
        let semantic = semantic.expect("decoder: semantic map requested");
        Ok((image, self.semantic_decoder.forward(&semantic)))
    }

    /// Loads weights from named tensors (a converted checkpoint or a fixture): the EMA copy when
    /// `choice` is None and the file has one, else the live one. Every parameter must be present;
    /// `loss.*` keys are ignored (and reported); any other unused key is refused.
    pub fn load(
        vs: &nn::VarStore,
        file: &BTreeMap<String, Tensor>,
        source_name: &str,
        choice: Option<WeightChoice>,
    ) -> Result<LoadReport, TokenizerError> {
        let choice = choice.unwrap_or(if ema::has_ema(file) {
            WeightChoice::Ema
        } else {
            WeightChoice::Live
        });
        let mut live_names: Vec<String> = vs.variables().into_keys().collect();
        live_names.sort();
        let (selected, not_selected) = ema::select(file, &live_names, choice);
        weights::load_strict(vs, &selected, source_name, |_| false)?;
        let mut report = LoadReport {
            choice,
            other_copy: 0,
            ema_bookkeeping: 0,
            ignored_loss_keys: Vec::new(),
        };
        let mut unknown = Vec::new();
        for key in not_selected {
            let is_other_copy = match choice {
                WeightChoice::Ema => live_names.binary_search(&key).is_ok(),
                WeightChoice::Live => live_names
                    .iter()
                    .any(|n| ema::ema_name(n).as_deref() == Some(key.as_str())),
            };
            if is_other_copy {
                report.other_copy += 1;
            } else if ema::is_ema_bookkeeping(&key) {
                report.ema_bookkeeping += 1;
            } else if key.starts_with("loss.") {
                report.ignored_loss_keys.push(key);
            } else {
                unknown.push(key);
            }
        }
        if !unknown.is_empty() {
            return Err(TokenizerError::UnknownKeys {
                source_name: source_name.to_owned(),
                keys: unknown.join(", "),
            });
        }
        Ok(report)
    }
}
