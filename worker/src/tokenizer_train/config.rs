//! The `eqim train-tokenizer` config: the reference YAML layout (`model.base_learning_rate`,
//! `model.params.{ddconfig, sematicconfig, lossconfig, scheduler_config, stage2, ckpt_path}`,
//! `data.params.batch_size`) plus eqim's own `eqim:` section (teacher weight files, the image
//! folder, step counts, output directory).
//! Upstream: `configs/first_stage/tokenizer_config.yaml`, `tokenizer_config_stage2.yaml`.

use anyhow::{bail, Context, Result};
use serde::Deserialize;
use std::path::{Path, PathBuf};

use super::optim::WarmUpDecayConfig;

/// The whole file.
#[derive(Debug, Clone, Deserialize)]
pub struct TrainTokenizerConfig {
    pub model: ModelSection,
    #[serde(default)]
    pub data: DataSection,
    pub eqim: EqimSection,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ModelSection {
    /// Absolute learning rate (the reference does not scale it: `--scale_lr` defaults False).
    pub base_learning_rate: f64,
    pub params: ModelParams,
}

/// `model.params` fields that training reads; the architecture fields (`ddconfig`,
/// `sematicconfig`, `embed_dim`, ...) are read by the tokenizer's own config from the same YAML.
#[derive(Debug, Clone, Deserialize)]
pub struct ModelParams {
    #[serde(default = "default_true")]
    pub use_ema: bool,
    #[serde(default = "default_ema_decay")]
    pub ema_decay: f64,
    #[serde(default)]
    pub stage2: bool,
    /// Stage-1 checkpoint to start from (eqim safetensors checkpoint); required for stage 2.
    #[serde(default)]
    pub ckpt_path: Option<PathBuf>,
    pub lossconfig: LossSection,
    #[serde(default)]
    pub scheduler_config: Option<SchedulerSection>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct LossSection {
    #[serde(default)]
    pub target: Option<String>,
    pub params: LossParams,
}

/// `LPIPSWithDiscriminator.__init__` arguments; defaults are the Python signature's.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct LossParams {
    pub disc_start: i64,
    #[serde(default)]
    pub logvar_init: f64,
    #[serde(default = "one")]
    pub kl_weight: f64,
    /// Parsed but unused, as in the reference (its forward never applies it).
    #[serde(default = "one")]
    pub pixelloss_weight: f64,
    #[serde(default = "three")]
    pub disc_num_layers: i64,
    #[serde(default = "three")]
    pub disc_in_channels: i64,
    #[serde(default = "one")]
    pub disc_factor: f64,
    #[serde(default = "one")]
    pub disc_weight: f64,
    #[serde(default)]
    pub semantic_iter_start: i64,
    #[serde(default = "one")]
    pub perceptual_weight: f64,
    #[serde(default)]
    pub use_actnorm: bool,
    #[serde(default)]
    pub disc_conditional: bool,
    #[serde(default = "sixty_four")]
    pub disc_ndf: i64,
    #[serde(default = "one")]
    pub semantic_loss_w: f64,
    #[serde(default = "patchgan")]
    pub disc_type: String,
    #[serde(default = "hinge")]
    pub disc_loss: String,
}

#[derive(Debug, Clone, Deserialize)]
pub struct SchedulerSection {
    #[serde(default)]
    pub target: Option<String>,
    pub params: WarmUpDecayConfig,
}

/// `data.params` (only the batch size is used; the dataset classes are replaced by
/// `eqim.data`).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct DataSection {
    #[serde(default)]
    pub params: DataParams,
}

#[derive(Debug, Clone, Deserialize)]
pub struct DataParams {
    #[serde(default = "default_batch_size")]
    pub batch_size: i64,
}

impl Default for DataParams {
    fn default() -> Self {
        Self {
            batch_size: default_batch_size(),
        }
    }
}

/// eqim's own keys.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EqimSection {
    #[serde(default)]
    pub weights: TeacherWeights,
    pub data: ImageFolderConfig,
    pub train: TrainLoopConfig,
}

/// User-supplied pretrained networks, converted to safetensors by
/// `scripts/convert-teacher-weights`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TeacherWeights {
    /// torchvision VGG16 features as LPIPS names them (`net.slice1.0.weight`, ...).
    pub vgg16: Option<PathBuf>,
    /// The LPIPS linear heads (`lin0.model.1.weight`, ...); shipped with eqim's data files.
    pub lpips_linear: Option<PathBuf>,
    /// DINO ViT-S/16 (`dino_deitsmall16_pretrain.pth` keys) for `disc_type: dino`.
    pub dino_vits16: Option<PathBuf>,
    /// DINOv2 ViT-B/14 for the semantic alignment loss.
    pub dinov2_vitb14: Option<PathBuf>,
}

/// Training images: every PNG/JPEG under `train_dir` (recursively), resized so the short side
/// is `height` (bilinear) and cropped to `height × width` (random crop + horizontal flip).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageFolderConfig {
    pub train_dir: PathBuf,
    pub height: i64,
    pub width: i64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainLoopConfig {
    pub max_steps: i64,
    pub out_dir: PathBuf,
    #[serde(default = "default_seed")]
    pub seed: i64,
    #[serde(default = "default_log_every")]
    pub log_every: i64,
    /// Steps between checkpoints (and always at the end); 0 = only at the end.
    #[serde(default)]
    pub checkpoint_every: i64,
    /// "cpu", "cuda" or "cuda:N"; default: cuda when available.
    #[serde(default)]
    pub device: Option<String>,
    /// libtorch intra-op threads (default: libtorch's choice, one per core).
    #[serde(default)]
    pub threads: Option<i32>,
    /// Images in the before/after reconstruction sheet.
    #[serde(default = "default_sheet_images")]
    pub sheet_images: i64,
    /// Resume from the newest verified checkpoint in `out_dir/checkpoints` when there is one.
    #[serde(default = "default_true")]
    pub resume: bool,
    /// `fp32` or `bf16` (autocast around float32 weights, optimizer state and EMA).
    #[serde(default)]
    pub precision: crate::precision::Precision,
    /// Activation checkpointing: refused when true (tch cannot recompute in backward).
    #[serde(default)]
    pub grad_checkpointing: bool,
}

fn default_true() -> bool {
    true
}
fn default_ema_decay() -> f64 {
    0.99
}
fn one() -> f64 {
    1.0
}
fn three() -> i64 {
    3
}
fn sixty_four() -> i64 {
    64
}
fn patchgan() -> String {
    "patchgan".into()
}
fn hinge() -> String {
    "hinge".into()
}
fn default_batch_size() -> i64 {
    12
}
fn default_seed() -> i64 {
    23
}
fn default_log_every() -> i64 {
    50
}
fn default_sheet_images() -> i64 {
    8
}

/// Expands a leading `~/` and `$HOME` in config paths.
pub fn expand_home(path: &Path) -> PathBuf {
    let s = path.to_string_lossy();
    let home = std::env::var("HOME").unwrap_or_default();
    if let Some(rest) = s.strip_prefix("~/") {
        return Path::new(&home).join(rest);
    }
    PathBuf::from(s.replace("$HOME", &home))
}

impl TrainTokenizerConfig {
    pub fn from_yaml(text: &str, source: &str) -> Result<Self> {
        let cfg: Self = serde_yaml::from_str(text)
            .with_context(|| format!("parsing the train-tokenizer config {source}"))?;
        cfg.validate()
            .with_context(|| format!("checking {source}"))?;
        Ok(cfg)
    }

    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading config {}", path.display()))?;
        Self::from_yaml(&text, &path.display().to_string())
    }

    fn validate(&self) -> Result<()> {
        let lp = &self.model.params.lossconfig.params;
        if lp.disc_loss != "hinge" && lp.disc_loss != "vanilla" {
            bail!(
                "model.params.lossconfig.params.disc_loss is {:?}: use \"hinge\" or \"vanilla\"",
                lp.disc_loss
            );
        }
        if lp.disc_type != "patchgan" && lp.disc_type != "dino" {
            bail!(
                "model.params.lossconfig.params.disc_type is {:?}: use \"patchgan\" or \"dino\"",
                lp.disc_type
            );
        }
        if lp.disc_conditional {
            bail!("model.params.lossconfig.params.disc_conditional: true is not supported (the reference never uses it); set it to false");
        }
        if lp.use_actnorm {
            bail!("model.params.lossconfig.params.use_actnorm: true is not supported; set it to false (BatchNorm, the reference default)");
        }
        if lp.logvar_init != 0.0 {
            bail!("model.params.lossconfig.params.logvar_init must be 0: logvar is in no optimizer, eqim keeps it at 0");
        }
        if self.model.params.stage2 && self.model.params.ckpt_path.is_none() {
            bail!("model.params.stage2 is true but model.params.ckpt_path is not set: stage 2 fine-tunes a stage-1 checkpoint");
        }
        let t = &self.eqim.train;
        if t.grad_checkpointing {
            bail!(
                "eqim.train.{}",
                crate::model::generator::GRAD_CHECKPOINTING_REFUSED
            );
        }
        if t.max_steps <= 0 || self.data.params.batch_size <= 0 {
            bail!("eqim.train.max_steps and data.params.batch_size must be positive");
        }
        let d = &self.eqim.data;
        if d.height <= 0 || d.width <= 0 {
            bail!("eqim.data.height and eqim.data.width must be positive");
        }
        Ok(())
    }

    /// The teacher weight files this config needs, checked to exist. A missing one is refused
    /// with its name and the config flag that turns its loss off.
    pub fn required_weights(&self) -> Result<RequiredWeights> {
        let lp = &self.model.params.lossconfig.params;
        let w = &self.eqim.weights;
        let need = |path: &Option<PathBuf>, key: &str, what: &str, disable: &str| {
            let Some(p) = path else {
                bail!(
                    "{what} needs eqim.weights.{key} (a safetensors file made by \
                     scripts/convert-teacher-weights); to train without it set {disable}"
                );
            };
            let p = expand_home(p);
            if !p.is_file() {
                bail!(
                    "{what} needs {} (eqim.weights.{key}), which does not exist; convert it \
                     with scripts/convert-teacher-weights, or set {disable}",
                    p.display()
                );
            }
            Ok(p)
        };
        let lpips = if lp.perceptual_weight > 0.0 {
            let disable = "model.params.lossconfig.params.perceptual_weight: 0";
            Some((
                need(&w.vgg16, "vgg16", "the LPIPS loss", disable)?,
                need(&w.lpips_linear, "lpips_linear", "the LPIPS loss", disable)?,
            ))
        } else {
            None
        };
        let dino = if lp.disc_type == "dino" {
            Some(need(
                &w.dino_vits16,
                "dino_vits16",
                "the DINO discriminator (disc_type: dino)",
                "model.params.lossconfig.params.disc_type: patchgan",
            )?)
        } else {
            None
        };
        let dinov2 = if lp.semantic_loss_w > 0.0 {
            Some(need(
                &w.dinov2_vitb14,
                "dinov2_vitb14",
                "the semantic alignment loss",
                "model.params.lossconfig.params.semantic_loss_w: 0",
            )?)
        } else {
            None
        };
        Ok(RequiredWeights {
            lpips,
            dino,
            dinov2,
        })
    }

    pub fn schedule(&self) -> Option<WarmUpDecayConfig> {
        self.model
            .params
            .scheduler_config
            .as_ref()
            .map(|s| s.params)
    }
}

/// Existing weight files for the losses the config turns on.
#[derive(Debug, Clone, PartialEq)]
pub struct RequiredWeights {
    /// (VGG16 backbone, LPIPS heads)
    pub lpips: Option<(PathBuf, PathBuf)>,
    pub dino: Option<PathBuf>,
    pub dinov2: Option<PathBuf>,
}

#[cfg(test)]
mod tests {
    use super::*;

    const REFERENCE_LIKE: &str = r#"
model:
  base_learning_rate: 1.92e-4
  target: tokenizer.models.tokenizer.EquivariantTokenizer
  params:
    embed_dim: 256
    use_ema: true
    post_channels: 4096
    std: 2.5
    ddconfig: {ch: 128}
    sematicconfig: {ch: 64}
    lossconfig:
      target: tokenizer.modules.losses.contperceptual.LPIPSWithDiscriminator
      params:
        disc_conditional: false
        disc_in_channels: 3
        disc_start: 5001
        kl_weight: 0.01
        disc_weight: 0.5
        disc_type: dino
        semantic_loss_w: 5.0
        semantic_iter_start: 20001
    scheduler_config:
      target: tokenizer.lr_scheduler.LambdaWarmUpDecayScheduler
      params: {lr_max: 1.0, lr_min: 0.0, lr_start: 0.0, warm_up_steps: 3000, interval: 30000, decay: 0.2}
data:
  target: scripts.train_tokenizer.DataModuleFromConfig
  params: {batch_size: 12, num_workers: 24}
eqim:
  weights: {vgg16: /nonexistent/vgg16.safetensors}
  data: {train_dir: /tmp/images, height: 256, width: 256}
  train: {max_steps: 10, out_dir: /tmp/out}
"#;

    #[test]
    fn reference_layout_parses_with_python_defaults() {
        let cfg = TrainTokenizerConfig::from_yaml(REFERENCE_LIKE, "test").expect("parses");
        let lp = &cfg.model.params.lossconfig.params;
        assert_eq!(lp.disc_start, 5001);
        assert_eq!(lp.perceptual_weight, 1.0);
        assert_eq!(lp.pixelloss_weight, 1.0);
        assert_eq!(lp.disc_factor, 1.0);
        assert_eq!(lp.disc_ndf, 64);
        assert_eq!(lp.disc_loss, "hinge");
        assert_eq!(cfg.model.params.ema_decay, 0.99);
        assert_eq!(cfg.data.params.batch_size, 12);
        assert_eq!(cfg.schedule().expect("scheduler").warm_up_steps, 3000);
    }

    #[test]
    fn missing_teacher_weights_are_refused_with_file_and_flag() {
        let cfg = TrainTokenizerConfig::from_yaml(REFERENCE_LIKE, "test").expect("parses");
        let err = format!("{:#}", cfg.required_weights().unwrap_err());
        assert!(err.contains("/nonexistent/vgg16.safetensors"), "{err}");
        assert!(err.contains("perceptual_weight: 0"), "{err}");

        let no_lpips = REFERENCE_LIKE.replace(
            "disc_conditional: false",
            "disc_conditional: false\n        perceptual_weight: 0.0",
        );
        let cfg = TrainTokenizerConfig::from_yaml(&no_lpips, "test").expect("parses");
        let err = format!("{:#}", cfg.required_weights().unwrap_err());
        assert!(err.contains("eqim.weights.dino_vits16"), "{err}");
        assert!(err.contains("disc_type: patchgan"), "{err}");

        let plain = no_lpips
            .replace("disc_type: dino", "disc_type: patchgan")
            .replace("semantic_loss_w: 5.0", "semantic_loss_w: 0.0");
        let cfg = TrainTokenizerConfig::from_yaml(&plain, "test").expect("parses");
        let req = cfg.required_weights().expect("nothing needed");
        assert_eq!(
            req,
            RequiredWeights {
                lpips: None,
                dino: None,
                dinov2: None
            }
        );
        let semantic = no_lpips.replace("disc_type: dino", "disc_type: patchgan");
        let cfg = TrainTokenizerConfig::from_yaml(&semantic, "test").expect("parses");
        let err = format!("{:#}", cfg.required_weights().unwrap_err());
        assert!(err.contains("semantic_loss_w: 0"), "{err}");
    }

    #[test]
    fn unknown_eqim_keys_and_bad_values_are_refused() {
        let typo = REFERENCE_LIKE.replace("max_steps: 10", "max_step: 10");
        assert!(TrainTokenizerConfig::from_yaml(&typo, "test").is_err());
        let bad = REFERENCE_LIKE.replace("disc_type: dino", "disc_type: stylegan");
        let err = format!(
            "{:#}",
            TrainTokenizerConfig::from_yaml(&bad, "test").unwrap_err()
        );
        assert!(err.contains("disc_type"), "{err}");
    }
}
