//! The training state that checkpoints carry: weights, EMA, AdamW moments and step counts, and
//! the progress (step, epoch, position in the epoch, samples seen). Random draws are derived from
//! (seed, step, slot) ([`super::rng`]), so the seed and the step are all the RNG state there is.
//!
//! [`TrainState::capture`] copies everything to host memory (the only cost to the training
//! thread); [`TrainState::write`] persists it to a directory:
//!
//! | file | content |
//! | --- | --- |
//! | `model.safetensors` | every variable of the model's var store, by state_dict name |
//! | `ema.safetensors` | EMA of every trainable parameter, same names |
//! | `optimizer.safetensors` | `exp_avg.<name>`, `exp_avg_sq.<name>` of parameters that have moments |
//! | `state.json` | format, progress, seed, optimizer settings and per-parameter step counts, sha256 of the three files, caller metadata |
//!
//! The directory is written under a temporary name, every file synced, then renamed into place,
//! so a crash leaves either the previous state or the new one.

use super::optim::AdamWConfig;
use super::trainer::{TrainModel, Trainer};
use super::TrainError;
use crate::model::weights::{self, write_safetensors_atomic};
use anyhow::{bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use tch::Tensor;

pub const STATE_FORMAT: &str = "eqim-train-state";
pub const STATE_VERSION: u32 = 1;
const MODEL_FILE: &str = "model.safetensors";
const EMA_FILE: &str = "ema.safetensors";
const OPTIMIZER_FILE: &str = "optimizer.safetensors";
const STATE_FILE: &str = "state.json";

/// Where training stands.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    /// Optimizer steps taken.
    pub step: u64,
    pub epoch: u64,
    /// Steps of `epoch` already taken (the next step's index in the epoch).
    pub batch_in_epoch: u64,
    pub samples_seen: u64,
}

impl Progress {
    pub fn advance(&mut self, steps_per_epoch: u64, rows: u64) {
        self.step += 1;
        self.samples_seen += rows;
        self.batch_in_epoch += 1;
        if self.batch_in_epoch >= steps_per_epoch {
            self.epoch += 1;
            self.batch_in_epoch = 0;
        }
    }
}

/// `state.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StateMeta {
    format: String,
    version: u32,
    progress: Progress,
    seed: u64,
    /// How random draws are made; informative.
    rng: String,
    ema_rate: f64,
    optimizer: AdamWConfig,
    /// Trainable parameter names in `named_parameters` order, with their optimizer step counts.
    params: Vec<(String, u64)>,
    /// sha256 (hex) of each tensor file.
    sha256: BTreeMap<String, String>,
    extra: serde_json::Value,
}

/// A host-memory copy of a trainer's state.
#[derive(Debug)]
pub struct TrainState {
    pub progress: Progress,
    pub seed: u64,
    pub ema_rate: f64,
    pub optimizer: AdamWConfig,
    /// Trainable parameter names and their optimizer step counts, in parameter order.
    pub params: Vec<(String, u64)>,
    /// Every variable of the model's var store.
    pub model: Vec<(String, Tensor)>,
    pub ema: Vec<(String, Tensor)>,
    pub moments: Vec<(String, Tensor)>,
    /// Caller metadata stored alongside (e.g. the run's config).
    pub extra: serde_json::Value,
}

fn sorted_cpu(map: std::collections::HashMap<String, Tensor>) -> Vec<(String, Tensor)> {
    let mut v: Vec<(String, Tensor)> = map
        .into_iter()
        .map(|(k, t)| (k, t.detach().to_device(tch::Device::Cpu).copy()))
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

fn sha256_file(path: &Path) -> Result<String> {
    let mut file =
        std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut hasher = Sha256::new();
    std::io::copy(&mut file, &mut hasher).with_context(|| format!("reading {}", path.display()))?;
    Ok(hex::encode(hasher.finalize()))
}

fn checkpoint_err(dir: &Path, message: impl Into<String>) -> TrainError {
    TrainError::Checkpoint {
        path: dir.display().to_string(),
        message: message.into(),
    }
}

impl TrainState {
    /// Copies the trainer's state to host memory.
    pub fn capture<M: TrainModel>(trainer: &Trainer<M>, extra: serde_json::Value) -> Self {
        let names = &trainer.params.names;
        Self {
            progress: trainer.progress,
            seed: trainer.cfg.seed,
            ema_rate: trainer.ema.rate,
            optimizer: trainer.optimizer.cfg,
            params: names
                .iter()
                .cloned()
                .zip(trainer.optimizer.steps.iter().copied())
                .collect(),
            model: sorted_cpu(trainer.model.var_store().variables()),
            ema: trainer.ema.to_named_cpu(names),
            moments: trainer.optimizer.named_moments(names),
            extra,
        }
    }

    /// Loads this state into a trainer built for the same model (names and shapes must match).
    /// The trainer keeps its own hyperparameters; differing ones are logged.
    pub fn restore_into<M: TrainModel>(&self, trainer: &mut Trainer<M>) -> Result<()> {
        let names = &trainer.params.names;
        let saved: Vec<&String> = self.params.iter().map(|(n, _)| n).collect();
        if saved.len() != names.len() || saved.iter().zip(names).any(|(a, b)| *a != b) {
            bail!(
                "the saved state's parameters ({} names) differ from the model's ({} names): \
                 is the model config the one this state was trained with?",
                saved.len(),
                names.len()
            );
        }
        let model: BTreeMap<String, Tensor> = self
            .model
            .iter()
            .map(|(n, t)| (n.clone(), t.shallow_clone()))
            .collect();
        weights::load_strict(trainer.model.var_store(), &model, "training state", |_| {
            false
        })?;
        let ema: BTreeMap<&str, &Tensor> = self.ema.iter().map(|(n, t)| (n.as_str(), t)).collect();
        let moments: BTreeMap<&str, &Tensor> =
            self.moments.iter().map(|(n, t)| (n.as_str(), t)).collect();
        let _guard = tch::no_grad_guard();
        for (i, name) in names.iter().enumerate() {
            let param = &trainer.params.tensors[i];
            let src = ema
                .get(name.as_str())
                .with_context(|| format!("training state has no EMA for {name}"))?;
            ensure!(
                src.size() == param.size(),
                "EMA of {name} has shape {:?}, the model {:?}",
                src.size(),
                param.size()
            );
            trainer.ema.shadow[i] = src.to_device(param.device()).to_kind(param.kind()).copy();
            let steps = self.params[i].1;
            trainer.optimizer.steps[i] = steps;
            let m = moments.get(format!("exp_avg.{name}").as_str());
            let v = moments.get(format!("exp_avg_sq.{name}").as_str());
            match (m, v, steps) {
                (None, None, 0) => {
                    trainer.optimizer.exp_avg[i] = None;
                    trainer.optimizer.exp_avg_sq[i] = None;
                }
                (Some(m), Some(v), s) if s > 0 => {
                    ensure!(
                        m.size() == param.size() && v.size() == param.size(),
                        "optimizer moments of {name} do not have the parameter's shape {:?}",
                        param.size()
                    );
                    trainer.optimizer.exp_avg[i] = Some(m.to_device(param.device()).copy());
                    trainer.optimizer.exp_avg_sq[i] = Some(v.to_device(param.device()).copy());
                }
                _ => bail!("optimizer state of {name} is inconsistent ({steps} steps, moments present: {}/{})", m.is_some(), v.is_some()),
            }
        }
        if trainer.optimizer.cfg != self.optimizer || trainer.ema.rate != self.ema_rate {
            tracing::warn!(
                saved = ?self.optimizer, saved_ema_rate = self.ema_rate,
                "optimizer settings differ from the saved state's; using the configured ones"
            );
        }
        if trainer.cfg.seed != self.seed {
            tracing::warn!(
                saved = self.seed,
                configured = trainer.cfg.seed,
                "seed differs from the saved state's; using the configured one"
            );
        }
        trainer.progress = self.progress;
        Ok(())
    }

    /// Writes the state to `dir` atomically (replacing an existing state there).
    pub fn write(&self, dir: &Path) -> Result<()> {
        let parent = dir
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let name = dir
            .file_name()
            .with_context(|| format!("{} has no directory name", dir.display()))?
            .to_string_lossy()
            .into_owned();
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
        let tmp = parent.join(format!(".{name}.tmp-{}", std::process::id()));
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp)
                .with_context(|| format!("removing stale {}", tmp.display()))?;
        }
        std::fs::create_dir(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        let mut sha256 = BTreeMap::new();
        for (file, tensors) in [
            (MODEL_FILE, &self.model),
            (EMA_FILE, &self.ema),
            (OPTIMIZER_FILE, &self.moments),
        ] {
            let path = tmp.join(file);
            write_safetensors_atomic(tensors, &path)?;
            sha256.insert(file.to_string(), sha256_file(&path)?);
        }
        let meta = StateMeta {
            format: STATE_FORMAT.into(),
            version: STATE_VERSION,
            progress: self.progress,
            seed: self.seed,
            rng: "libtorch global generators seeded per micro-batch with derive_seed(seed, step, slot)".into(),
            ema_rate: self.ema_rate,
            optimizer: self.optimizer,
            params: self.params.clone(),
            sha256,
            extra: self.extra.clone(),
        };
        let json_path = tmp.join(STATE_FILE);
        let text = serde_json::to_string_pretty(&meta).context("serialising state.json")?;
        std::fs::write(&json_path, text)
            .and_then(|()| std::fs::File::open(&json_path)?.sync_all())
            .with_context(|| format!("writing {}", json_path.display()))?;
        replace_dir(&tmp, dir)
    }

    /// Reads a state written by [`TrainState::write`], verifying every file's checksum.
    pub fn read(dir: &Path) -> Result<Self> {
        let json_path = dir.join(STATE_FILE);
        let text = std::fs::read_to_string(&json_path).map_err(|e| {
            checkpoint_err(dir, format!("cannot read {STATE_FILE}: {e} (not a training state directory, or an interrupted write)"))
        })?;
        let meta: StateMeta = serde_json::from_str(&text)
            .map_err(|e| checkpoint_err(dir, format!("{STATE_FILE} is malformed: {e}")))?;
        if meta.format != STATE_FORMAT || meta.version != STATE_VERSION {
            return Err(checkpoint_err(
                dir,
                format!(
                    "format {} v{} is not {STATE_FORMAT} v{STATE_VERSION}",
                    meta.format, meta.version
                ),
            )
            .into());
        }
        let mut files = Vec::new();
        for file in [MODEL_FILE, EMA_FILE, OPTIMIZER_FILE] {
            let path = dir.join(file);
            let want = meta.sha256.get(file).ok_or_else(|| {
                checkpoint_err(dir, format!("{STATE_FILE} lists no sha256 for {file}"))
            })?;
            let got =
                sha256_file(&path).map_err(|e| checkpoint_err(dir, format!("{file}: {e:#}")))?;
            if &got != want {
                return Err(checkpoint_err(
                    dir,
                    format!("{file} is corrupt or truncated (sha256 {got}, expected {want})"),
                )
                .into());
            }
            files.push(
                Tensor::read_safetensors(&path)
                    .with_context(|| format!("reading {}", path.display()))?,
            );
        }
        let moments = files.pop().expect("three files read");
        let ema = files.pop().expect("three files read");
        let model = files.pop().expect("three files read");
        Ok(Self {
            progress: meta.progress,
            seed: meta.seed,
            ema_rate: meta.ema_rate,
            optimizer: meta.optimizer,
            params: meta.params,
            model,
            ema,
            moments,
            extra: meta.extra,
        })
    }
}

/// Moves the finished directory `tmp` to `dir`, keeping the old `dir` until the new one is in.
fn replace_dir(tmp: &Path, dir: &Path) -> Result<()> {
    let sync_parent = || {
        if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
            if let Ok(d) = std::fs::File::open(parent) {
                // Best effort: persisting renames needs the directory synced; not every
                // filesystem allows it.
                let _ignored = d.sync_all();
            }
        }
    };
    if dir.exists() {
        let old: PathBuf = tmp.with_extension("old");
        if old.exists() {
            std::fs::remove_dir_all(&old).with_context(|| format!("removing {}", old.display()))?;
        }
        std::fs::rename(dir, &old)
            .with_context(|| format!("moving the previous {} aside", dir.display()))?;
        std::fs::rename(tmp, dir)
            .with_context(|| format!("renaming {} to {}", tmp.display(), dir.display()))?;
        sync_parent();
        std::fs::remove_dir_all(&old).with_context(|| format!("removing {}", old.display()))?;
    } else {
        std::fs::rename(tmp, dir)
            .with_context(|| format!("renaming {} to {}", tmp.display(), dir.display()))?;
        sync_parent();
    }
    Ok(())
}
