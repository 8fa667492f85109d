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
    /// Keys (live or EMA) of modules not built (see [`Parts`]).
    pub unbuilt_module_keys: usize,
    /// Training-loss keys (`loss.*`: LPIPS, discriminator, DINOv2 teacher), ignored.
    pub ignored_loss_keys: Vec<String>,
}

/// Which modules to build: decoding alone needs 28% of the weights' memory less.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parts {
    /// Everything in the checkpoint (parity checks, training).
    All,
    /// `post_quant_layer` and `decoder` only; `encode` and the semantic decoder are unavailable
    /// and the other modules' keys are skipped at load.
    DecoderOnly,
}

/// The encoder side: `encoder` and `quant_layer`.
#[derive(Debug)]
pub struct EncoderSide {
    pub encoder: EquivariantTokenizerEncoder1D,
    pub quant_layer: nn::Conv1D,
}

#[derive(Debug)]
pub struct EquivariantTokenizer {
    /// None when built with [`Parts::DecoderOnly`].
    pub encoder_side: Option<EncoderSide>,
    pub decoder: EquivariantTokenizerDecoder1D,
    /// None when built with [`Parts::DecoderOnly`].
    pub semantic_decoder: Option<EquivariantTokenizerSemanticDecoder1D>,
    pub post_quant_layer: nn::Conv1D,
    pub cfg: TokenizerConfig,
}

impl EquivariantTokenizer {
    pub fn new(p: nn::Path, cfg: &TokenizerConfig) -> Self {
        Self::with_parts(p, cfg, Parts::All)
    }

    pub fn with_parts(p: nn::Path, cfg: &TokenizerConfig, parts: Parts) -> Self {
        let all = parts == Parts::All;
        let encoder_side = all.then(|| EncoderSide {
            encoder: EquivariantTokenizerEncoder1D::new(&p / "encoder", &cfg.ddconfig),
            quant_layer: blocks::conv1d_k3(
                &p / "quant_layer",
                cfg.quant_in_channels(),
                cfg.embed_dim,
            ),
        });
        Self {
            encoder_side,
            decoder: EquivariantTokenizerDecoder1D::new(&p / "decoder", &cfg.ddconfig),
            semantic_decoder: all.then(|| {
                EquivariantTokenizerSemanticDecoder1D::new(
                    &p / "semantic_decoder",
                    &cfg.sematicconfig,
                )
            }),
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
        let Some(side) = &self.encoder_side else {
            return Err(TokenizerError::Config(
                "this tokenizer was built without its encoder (Parts::DecoderOnly)".into(),
            ));
        };
        let columns = side.encoder.forward(xs);
        // quant_layer on [B, C, L], back to [B, L, embed_dim]
        let moments = columns
            .permute([0, 2, 1])
            .apply(&side.quant_layer)
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
        let Some(semantic_decoder) = &self.semantic_decoder else {
            return Err(TokenizerError::Config(
                "this tokenizer was built without its semantic decoder (Parts::DecoderOnly)".into(),
            ));
        };
        let (image, semantic) = self.decoder.forward(&self.post_quant(zs), true);
        let semantic = semantic.expect("decoder: semantic map requested");
        Ok((image, semantic_decoder.forward(&semantic)))
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
        if choice == WeightChoice::Ema && !ema::has_ema(file) {
            return Err(TokenizerError::Config(format!(
                "{source_name} holds no EMA weights (ema_* keys); load the live ones (--weights live)"
            )));
        }
        let mut live_names: Vec<String> = vs.variables().into_keys().collect();
        live_names.sort();
        let (selected, not_selected) = ema::select(file, &live_names, choice);
        weights::load_strict(vs, &selected, source_name, |_| false)?;
        let mut report = LoadReport {
            choice,
            other_copy: 0,
            ema_bookkeeping: 0,
            unbuilt_module_keys: 0,
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
            let module = key.strip_prefix("ema_").unwrap_or(&key);
            let module = module.split('.').next().unwrap_or(module);
            let unbuilt = ema::EMA_MODULES.contains(&module)
                && !live_names
                    .iter()
                    .any(|n| n.starts_with(&format!("{module}.")));
            if is_other_copy {
                report.other_copy += 1;
            } else if unbuilt && !ema::is_ema_bookkeeping(&key) {
                report.unbuilt_module_keys += 1;
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

/// Fills every variable of `vs` with seeded random values that do not depend on the global torch
/// RNG (so parallel threads cannot disturb them): weights uniform in +-1/sqrt(fan_in) (PyTorch's
/// default conv bound), biases uniform in +-0.1, GroupNorm scales 1. For tests and measurements.
pub fn randomize(vs: &nn::VarStore, seed: u64) {
    use rand::{Rng, SeedableRng};
    use sha2::{Digest, Sha256};
    let _guard = tch::no_grad_guard();
    for (name, mut var) in vs.variables() {
        let digest = Sha256::digest(name.as_bytes());
        let name_hash = u64::from_le_bytes(digest[..8].try_into().expect("8 bytes of a sha256"));
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ name_hash);
        let size = var.size();
        let numel = var.numel();
        let values: Vec<f32> = if size.len() >= 2 {
            let bound = 1.0 / ((numel as f64 / size[0] as f64).sqrt()) as f32;
            (0..numel).map(|_| rng.gen_range(-bound..bound)).collect()
        } else if name.ends_with(".bias") {
            (0..numel).map(|_| rng.gen_range(-0.1f32..0.1)).collect()
        } else {
            vec![1.0; numel]
        };
        var.copy_(
            &Tensor::from_slice(&values)
                .view(size.as_slice())
                .to_device(var.device()),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    /// Three levels, the second downsampling only the height (len_down_scale 1), attention at 8,
    /// two res blocks, semantic map tapped after `mid`: a shape of the family the fixture lacks.
    fn odd_config() -> TokenizerConfig {
        let json = serde_json::json!({
            "ddconfig": {"ch": 32, "out_ch": 3, "ch_mult": [1, 2, 2], "num_res_blocks": 2,
                "attn_resolutions": [8], "in_channels": 3, "resolution": 16, "z_channels": 4,
                "len_down_scale": 1, "semantic_map": "mid", "double_enc": false},
            "sematicconfig": {"ch": 32, "out_ch": 96, "ch_mult": [2, 2], "num_res_blocks": 1,
                "attn_resolutions": [8], "in_channels": 3, "resolution": 16, "z_channels": 4,
                "downsample_scale": 1},
            "embed_dim": 6, "post_channels": 16, "std": 2.5, "use_ema": true
        });
        TokenizerConfig::from_json(&json).unwrap()
    }

    #[test]
    fn other_configs_encode_and_decode_any_width_and_name_the_expected_height() {
        let _guard = tch::no_grad_guard();
        let cfg = odd_config();
        assert_eq!(cfg.ddconfig.encoder_width_factor(), 2);
        assert_eq!(cfg.ddconfig.decoder_width_factor(), 2);
        let vs = nn::VarStore::new(Device::Cpu);
        let model = EquivariantTokenizer::new(vs.root(), &cfg);
        let vars = vs.variables();
        // Height-only resampling: conv to C/2 (encoder level 1), 2C (decoder level 2).
        assert_eq!(
            vars["encoder.down.1.downsample.conv.conv.weight"].size(),
            [32, 64, 3, 3]
        );
        assert_eq!(
            vars["decoder.up.2.upsample.conv.conv.weight"].size(),
            [128, 64, 3, 3]
        );
        assert_eq!(
            vars["decoder.up.2.block.2.conv1.weight"].size(),
            [64, 64, 3, 3]
        );
        assert!(vars.contains_key("encoder.down.1.attn.1.q.weight"));
        assert!(vars.contains_key("semantic_decoder.down.0.downsample.conv.conv.weight"));
        for width in [8, 14, 40] {
            let x = Tensor::rand([2, 3, 16, width], (Kind::Float, Device::Cpu)) * 2 - 1;
            let mean = model.encode(&x).unwrap().mode();
            assert_eq!(mean.size(), [2, width / 2, 6]);
            assert_eq!(model.decode(&mean).unwrap().size(), [2, 3, 16, width]);
            if width % 4 == 0 {
                // mid tap [B, 64, 4, L], one (2,2) downsample in the semantic decoder.
                let (image, semantic) = model.decode_with_semantic(&mean).unwrap();
                assert_eq!(image.size(), [2, 3, 16, width]);
                assert_eq!(semantic.size(), [2, 96, 2, width / 4]);
            }
        }
        let err = model
            .encode(&Tensor::zeros([1, 3, 32, 8], (Kind::Float, Device::Cpu)))
            .unwrap_err()
            .to_string();
        assert!(err.contains("expected height 16"), "{err}");
        let err = model
            .encode(&Tensor::zeros([1, 3, 16, 9], (Kind::Float, Device::Cpu)))
            .unwrap_err()
            .to_string();
        assert!(err.contains("multiple of 2"), "{err}");
        assert!(model
            .decode(&Tensor::zeros([1, 4, 5], (Kind::Float, Device::Cpu)))
            .is_err());
    }

    #[test]
    fn gradients_flow_through_encode_and_decode_when_autograd_is_on() {
        // The inference path multiplies and adds in place; with autograd it must not.
        let cfg = odd_config();
        let vs = nn::VarStore::new(Device::Cpu);
        let model = EquivariantTokenizer::new(vs.root(), &cfg);
        let x = Tensor::rand([1, 3, 16, 8], (Kind::Float, Device::Cpu)) * 2 - 1;
        let z = model.encode(&x).unwrap().mode();
        let loss = model.decode(&z).unwrap().square().mean(Kind::Float);
        loss.backward();
        let vars = vs.variables();
        for name in [
            "encoder.conv_in.weight",
            "decoder.up.0.block.0.conv1.weight",
            "decoder.up.2.upsample.conv.conv.weight",
        ] {
            let g = vars[name].grad();
            assert!(
                g.defined() && g.abs().sum(Kind::Float).double_value(&[]) > 0.0,
                "{name}"
            );
        }
    }

    #[test]
    fn full_config_has_the_reference_parameter_count() {
        let cfg = TokenizerConfig::full();
        cfg.validate().unwrap();
        // Parameter shapes only: a meta-free count from a VarStore with zero-initialised vars.
        let vs = nn::VarStore::new(Device::Cpu);
        let _model = EquivariantTokenizer::new(vs.root(), &cfg);
        let vars = vs.variables();
        let count = |prefix: &str| -> i64 {
            vars.iter()
                .filter(|(k, _)| k.starts_with(prefix))
                .map(|(_, v)| v.numel() as i64)
                .sum()
        };
        assert_eq!(count("encoder."), 86_050_816);
        assert_eq!(count("decoder."), 121_548_547);
        assert_eq!(count("semantic_decoder."), 67_663_360);
        assert_eq!(count("quant_layer."), 3_145_984);
        assert_eq!(count("post_quant_layer."), 3_149_824);
        assert_eq!(
            vars["decoder.up.4.upsample.conv.conv.weight"].size(),
            [2048, 512, 3, 3]
        );
        assert_eq!(
            vars["encoder.down.3.downsample.conv.conv.weight"].size(),
            [128, 512, 3, 3]
        );
        assert_eq!(cfg.ddconfig.encoder_width_factor(), 16);
    }

    #[test]
    fn ema_names_drop_the_dots_under_the_module_prefix() {
        assert_eq!(
            ema::ema_name("decoder.up.4.upsample.conv.conv.weight").as_deref(),
            Some("ema_decoder.up4upsampleconvconvweight")
        );
        assert_eq!(
            ema::ema_name("quant_layer.weight").as_deref(),
            Some("ema_quant_layer.weight")
        );
        assert_eq!(ema::ema_name("loss.logvar"), None);
        assert!(ema::is_ema_bookkeeping("ema_encoder.num_updates"));
        assert!(!ema::is_ema_bookkeeping("ema_encoder.conv_inweight"));
    }

    /// A checkpoint-like map: live weights, distinct EMA copies, bookkeeping and loss keys.
    fn checkpoint_of(vs: &nn::VarStore) -> BTreeMap<String, Tensor> {
        let mut file = BTreeMap::new();
        for (name, v) in vs.variables() {
            let ema = ema::ema_name(&name).unwrap();
            file.insert(ema, v.randn_like());
            file.insert(name, v.randn_like());
        }
        for m in ema::EMA_MODULES {
            file.insert(format!("ema_{m}.decay"), Tensor::from(0.99f32));
            file.insert(format!("ema_{m}.num_updates"), Tensor::from(7i32));
        }
        file.insert("loss.logvar".into(), Tensor::from(0f32));
        file
    }

    #[test]
    fn load_prefers_ema_reports_loss_keys_and_refuses_unknown_ones() {
        let cfg = odd_config();
        let vs = nn::VarStore::new(Device::Cpu);
        let _model = EquivariantTokenizer::new(vs.root(), &cfg);
        let n = vs.variables().len();
        let mut file = checkpoint_of(&vs);
        let report = EquivariantTokenizer::load(&vs, &file, "ckpt", None).unwrap();
        assert_eq!(report.choice, WeightChoice::Ema);
        assert_eq!(report.other_copy, n);
        assert_eq!(report.ema_bookkeeping, 10);
        assert_eq!(report.ignored_loss_keys, vec!["loss.logvar".to_string()]);
        let w = &vs.variables()["decoder.conv_in.weight"];
        assert!(w.equal(&file["ema_decoder.conv_inweight"]));

        let report =
            EquivariantTokenizer::load(&vs, &file, "ckpt", Some(WeightChoice::Live)).unwrap();
        assert_eq!(report.other_copy, n);
        assert!(vs.variables()["decoder.conv_in.weight"].equal(&file["decoder.conv_in.weight"]));

        let live_only: BTreeMap<String, Tensor> = file
            .iter()
            .filter(|(k, _)| !k.starts_with("ema_"))
            .map(|(k, v)| (k.clone(), v.shallow_clone()))
            .collect();
        let report = EquivariantTokenizer::load(&vs, &live_only, "live.st", None).unwrap();
        assert_eq!(report.choice, WeightChoice::Live);
        let err = EquivariantTokenizer::load(&vs, &live_only, "live.st", Some(WeightChoice::Ema))
            .unwrap_err();
        assert!(err.to_string().contains("--weights live"), "{err}");

        let dec_vs = nn::VarStore::new(Device::Cpu);
        let decoder_only =
            EquivariantTokenizer::with_parts(dec_vs.root(), &cfg, Parts::DecoderOnly);
        let report = EquivariantTokenizer::load(&dec_vs, &file, "ckpt", None).unwrap();
        assert_eq!(
            report.unbuilt_module_keys,
            2 * (n - dec_vs.variables().len())
        );
        assert!(
            dec_vs.variables()["decoder.conv_in.weight"].equal(&file["ema_decoder.conv_inweight"])
        );
        let z = Tensor::zeros([1, 3, 6], (Kind::Float, Device::Cpu));
        assert_eq!(decoder_only.decode(&z).unwrap().size(), [1, 3, 16, 6]);
        assert!(decoder_only
            .encode(&Tensor::zeros([1, 3, 16, 6], (Kind::Float, Device::Cpu)))
            .is_err());

        file.insert("model_ema.stray".into(), Tensor::from(1f32));
        let err = EquivariantTokenizer::load(&vs, &file, "ckpt", None).unwrap_err();
        assert!(err.to_string().contains("model_ema.stray"), "{err}");
        file.remove("model_ema.stray");
        file.remove("ema_encoder.conv_inweight");
        let err = EquivariantTokenizer::load(&vs, &file, "ckpt", None).unwrap_err();
        assert!(err.to_string().contains("encoder.conv_in.weight"), "{err}");
    }

    #[test]
    fn posterior_sample_scales_its_noise_per_image_and_clips_the_scale() {
        // Statistical, so that other tests drawing from the shared torch RNG cannot disturb it.
        let mean = Tensor::full([2000, 64, 4], 3.0, (Kind::Float, Device::Cpu));
        let post = GaussianDistribution::new(mean, 2.5);
        let noise = post.sample() - 3.0;
        // Per-image std estimate ~ |s_b| (256 values each, ~5% error).
        let per_image = noise.view([2000, 256]).std_dim(1, true, false);
        let max = per_image.max().double_value(&[]);
        assert!(
            max < 2.5 * 1.25 && max > 2.2,
            "largest per-image scale {max}"
        );
        // P(|N(0, 3.125^2)| > 2.2) = 0.48: the share of images at or near the clip.
        let at_clip = per_image.gt(2.2).to_kind(Kind::Float).mean(Kind::Float);
        let at_clip = at_clip.double_value(&[]);
        assert!(
            (0.40..0.56).contains(&at_clip),
            "share at the clip {at_clip}"
        );
        assert!(post.mode().equal(&post.mean));
        let fixed = post.sample_with_std(0.5) - 3.0;
        let s = fixed.std(true).double_value(&[]);
        assert!((s - 0.5).abs() < 0.01, "fixed std {s}");
    }
}
