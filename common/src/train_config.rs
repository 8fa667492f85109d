//! The generator training job's configuration (`eqim train-generator --config FILE`, TOML or
//! YAML). Libtorch-free so that a coordinator can read the same file to schedule data and
//! checkpoints. The `[model]` table is the reference constructor's arguments (by their Python
//! names) and/or a `preset`; the worker resolves it into its model config.

use crate::config::Validate;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GeneratorTrainConfig {
    /// Every random draw of the run (init, data order, per-step noise) derives from it.
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// Checkpoints (`checkpoint-last/`) and the step log (`train_log.jsonl`) go here.
    pub output_dir: PathBuf,
    /// `cpu`, `cuda`, `cuda:N` or `auto` (CUDA when available).
    #[serde(default = "default_device")]
    pub device: String,
    /// Intra-op CPU threads (default: libtorch's choice).
    #[serde(default)]
    pub threads: Option<u32>,
    /// `preset = "small" | "base" | "large" | "huge"` and/or constructor arguments by name.
    pub model: serde_json::Map<String, serde_json::Value>,
    pub data: DataConfig,
    #[serde(default)]
    pub optim: OptimConfig,
    pub run: RunConfig,
}

fn default_seed() -> u64 {
    1
}

fn default_device() -> String {
    "auto".into()
}

/// Where the (already `vae_norm`-scaled) latents come from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum DataConfig {
    /// Smooth per-class token patterns generated in code (tests, demos, benchmarks); the shape
    /// follows the model (`class_num`, `token_num`, `vae_embed_dim`).
    Synthetic {
        samples: u64,
        /// Amplitude of per-element noise on the class pattern.
        #[serde(default = "default_synthetic_noise")]
        noise: f64,
    },
    /// A latent cache file (`eqim` latent cache: both flips of every image). By default it is
    /// taken to hold the tokenizer's posterior means, and training applies the reference's
    /// `posterior.sample() * vae_norm`; for a cache of ready latents set `vae_norm = 1` and
    /// `posterior_std = 0`.
    LatentCache {
        path: PathBuf,
        #[serde(default = "default_vae_norm")]
        vae_norm: f64,
        /// Bound of the per-image posterior noise scale (2.5 in the reference); 0 disables.
        #[serde(default = "default_posterior_std")]
        posterior_std: f64,
    },
}

fn default_vae_norm() -> f64 {
    0.05493
}

fn default_posterior_std() -> f64 {
    2.5
}

fn default_synthetic_noise() -> f64 {
    0.1
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LrScheduleName {
    #[default]
    Constant,
    Cosine,
}

/// The reference's optimisation recipe; defaults are its values (README / Table 8).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OptimConfig {
    /// Samples per optimizer step (all workers together).
    pub batch: u64,
    /// Samples per forward/backward (gradient accumulation); default: `batch`.
    pub micro_batch: Option<u64>,
    /// Base lr: lr = blr * batch / 256.
    pub blr: f64,
    /// Linear warm-up from 0, in epochs (fractional steps count).
    pub warmup_epochs: f64,
    pub schedule: LrScheduleName,
    /// Floor of the cosine schedule.
    pub min_lr: f64,
    pub weight_decay: f64,
    pub betas: [f64; 2],
    pub eps: f64,
    /// Gradient clipping threshold; `0` disables clipping.
    pub clip_grad: f64,
    pub ema_rate: f64,
}

impl Default for OptimConfig {
    fn default() -> Self {
        Self {
            batch: 2048,
            micro_batch: None,
            blr: 1e-4,
            warmup_epochs: 100.0,
            schedule: LrScheduleName::Constant,
            min_lr: 0.0,
            weight_decay: 0.02,
            betas: [0.9, 0.95],
            eps: 1e-8,
            clip_grad: 3.0,
            ema_rate: 0.9999,
        }
    }
}

impl OptimConfig {
    pub fn micro_batch(&self) -> u64 {
        self.micro_batch.unwrap_or(self.batch)
    }

    /// `blr * batch / 256`.
    pub fn peak_lr(&self) -> f64 {
        self.blr * self.batch as f64 / 256.0
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    pub epochs: u64,
    /// Stop after this many optimizer steps in total (default: `epochs` worth).
    #[serde(default)]
    pub max_steps: Option<u64>,
    /// Write `checkpoint-last/` every this many steps (0: only at the end).
    #[serde(default)]
    pub checkpoint_every: u64,
    /// Log a line every this many steps.
    #[serde(default = "default_log_every")]
    pub log_every: u64,
}

fn default_log_every() -> u64 {
    10
}

impl Validate for GeneratorTrainConfig {
    fn validate(&self) -> Result<(), (String, String)> {
        self.validate_optim()?;
        if self.run.epochs == 0 {
            return bad("run.epochs", "must be at least 1".into());
        }
        if self.run.log_every == 0 {
            return bad("run.log_every", "must be at least 1".into());
        }
        self.validate_data()?;
        if let Err(e) = self.device.parse::<crate::device::DeviceSpec>() {
            return bad("device", e.to_string());
        }
        Ok(())
    }
}

/// A validation failure: the key and what is wrong with it.
fn bad(key: &str, msg: String) -> Result<(), (String, String)> {
    Err((key.to_string(), msg))
}

impl GeneratorTrainConfig {
    fn validate_optim(&self) -> Result<(), (String, String)> {
        let o = &self.optim;
        if o.batch == 0 {
            return bad("optim.batch", "must be at least 1".into());
        }
        let micro = o.micro_batch();
        if micro == 0 || !o.batch.is_multiple_of(micro) {
            return bad(
                "optim.micro_batch",
                format!("must divide optim.batch {} (got {micro})", o.batch),
            );
        }
        for (key, v) in [
            ("optim.betas[0]", o.betas[0]),
            ("optim.betas[1]", o.betas[1]),
        ] {
            if !(0.0..1.0).contains(&v) {
                return bad(key, format!("must be in [0, 1), got {v}"));
            }
        }
        if !(0.0..1.0).contains(&o.ema_rate) {
            return bad(
                "optim.ema_rate",
                format!("must be in [0, 1), got {}", o.ema_rate),
            );
        }
        for (key, v) in [
            ("optim.blr", o.blr),
            ("optim.eps", o.eps),
            ("optim.weight_decay", o.weight_decay),
            ("optim.clip_grad", o.clip_grad),
            ("optim.warmup_epochs", o.warmup_epochs),
            ("optim.min_lr", o.min_lr),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return bad(key, format!("must be a finite number >= 0, got {v}"));
            }
        }
        if o.schedule == LrScheduleName::Cosine && o.warmup_epochs >= self.run.epochs as f64 {
            return bad(
                "optim.warmup_epochs",
                "must be shorter than run.epochs for the cosine schedule".into(),
            );
        }
        Ok(())
    }

    fn validate_data(&self) -> Result<(), (String, String)> {
        let o = &self.optim;
        match &self.data {
            DataConfig::Synthetic { samples, noise } => {
                if *samples < o.batch {
                    return bad(
                        "data.samples",
                        format!("{samples} is fewer than one batch of {}", o.batch),
                    );
                }
                if !(noise.is_finite() && *noise >= 0.0) {
                    return bad("data.noise", format!("must be >= 0, got {noise}"));
                }
            }
            DataConfig::LatentCache {
                vae_norm,
                posterior_std,
                ..
            } => {
                if !(vae_norm.is_finite() && *vae_norm > 0.0) {
                    return bad("data.vae_norm", format!("must be > 0, got {vae_norm}"));
                }
                if !(posterior_std.is_finite() && *posterior_std >= 0.0) {
                    return bad(
                        "data.posterior_std",
                        format!("must be >= 0, got {posterior_std}"),
                    );
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::load_config;

    const TINY: &str = r#"
seed = 3
output_dir = "runs/t"
device = "cpu"

[model]
preset = "small"
class_num = 10

[data]
kind = "synthetic"
samples = 64

[optim]
batch = 16
micro_batch = 8
blr = 1e-3
warmup_epochs = 1.0

[run]
epochs = 2
checkpoint_every = 5
"#;

    fn load(text: &str) -> Result<GeneratorTrainConfig, String> {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(&p, text).unwrap();
        load_config(&p).map_err(|e| e.to_string())
    }

    #[test]
    fn a_tiny_config_loads_with_reference_defaults() {
        let c = load(TINY).unwrap();
        assert_eq!(c.seed, 3);
        assert_eq!(c.model["preset"], "small");
        assert_eq!(c.optim.micro_batch(), 8);
        assert_eq!(c.optim.betas, [0.9, 0.95]);
        assert_eq!(c.optim.ema_rate, 0.9999);
        assert_eq!(c.optim.clip_grad, 3.0);
        assert_eq!(c.optim.peak_lr(), 1e-3 * 16.0 / 256.0);
        assert_eq!(c.run.log_every, 10);
        assert_eq!(
            c.data,
            DataConfig::Synthetic {
                samples: 64,
                noise: 0.1
            }
        );
    }

    #[test]
    fn bad_values_name_their_key() {
        let e = load(&TINY.replace("micro_batch = 8", "micro_batch = 5")).unwrap_err();
        assert!(e.contains("optim.micro_batch"), "{e}");
        let e = load(&TINY.replace("samples = 64", "samples = 4")).unwrap_err();
        assert!(e.contains("data.samples"), "{e}");
        let e = load(&TINY.replace("device = \"cpu\"", "device = \"tpu\"")).unwrap_err();
        assert!(e.contains("device"), "{e}");
        let e = load(&TINY.replace("kind = \"synthetic\"", "kind = \"folder\"")).unwrap_err();
        assert!(e.contains("synthetic") && e.contains("latent-cache"), "{e}");
        let cache = TINY.replace(
            "kind = \"synthetic\"\nsamples = 64",
            "kind = \"latent-cache\"\npath = \"c.safetensors\"\nvae_norm = 0",
        );
        let e = load(&cache).unwrap_err();
        assert!(e.contains("data.vae_norm"), "{e}");
        let ok = load(&cache.replace("vae_norm = 0", "posterior_std = 0")).unwrap();
        assert_eq!(
            ok.data,
            DataConfig::LatentCache {
                path: "c.safetensors".into(),
                vae_norm: 0.05493,
                posterior_std: 0.0
            }
        );
        let e = load(&TINY.replace("blr = 1e-3", "blr = 1e-3\nlearning_rate = 1")).unwrap_err();
        assert!(e.contains("learning_rate"), "{e}");
    }
}
