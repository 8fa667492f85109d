//! `eqim verify-reference PREFIX`: runs the cases of a parity fixture (`PREFIX.json`,
//! `PREFIX.weights.safetensors`, `PREFIX.io.safetensors`) made by the reference PyTorch code and
//! reports the max absolute error of each. The model kind is read from the JSON: a `ddconfig` key
//! means a tokenizer, `encoder_embed_dim` a generator.

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

/// Options shared by every model kind.
#[derive(Debug, Clone)]
pub struct VerifyOptions {
    /// Largest max-abs error a case may have.
    pub tol: f64,
    /// Where the model and the fixture's inputs go (the reference outputs were made on the CPU).
    pub device: tch::Device,
}

impl VerifyOptions {
    /// On the CPU.
    pub fn new(tol: f64) -> Self {
        Self {
            tol,
            device: tch::Device::Cpu,
        }
    }

    pub fn with_device(mut self, device: tch::Device) -> Self {
        self.device = device;
        self
    }
}

/// `tensors` moved to `device` (for running a fixture's inputs where the model is).
pub fn to_device(
    tensors: std::collections::BTreeMap<String, tch::Tensor>,
    device: tch::Device,
) -> std::collections::BTreeMap<String, tch::Tensor> {
    if device == tch::Device::Cpu {
        return tensors;
    }
    tensors
        .into_iter()
        .map(|(k, v)| (k, v.to_device(device)))
        .collect()
}

/// The outcome of one fixture case (for tensors with several outputs, the worst of them).
#[derive(Debug, Clone)]
pub struct CaseReport {
    pub case: String,
    pub max_abs_err: f64,
    /// Tolerance this case was held to (some cases, e.g. training, use their own).
    pub tol: f64,
    pub detail: String,
}

impl CaseReport {
    pub fn passed(&self) -> bool {
        self.max_abs_err.is_finite() && self.max_abs_err <= self.tol
    }
}

/// The three files of a fixture.
#[derive(Debug, Clone)]
pub struct FixtureFiles {
    pub json: PathBuf,
    pub weights: PathBuf,
    pub io: PathBuf,
}

impl FixtureFiles {
    pub fn from_prefix(prefix: &Path) -> Result<Self> {
        let p = prefix.to_string_lossy();
        let files = Self {
            json: PathBuf::from(format!("{p}.json")),
            weights: PathBuf::from(format!("{p}.weights.safetensors")),
            io: PathBuf::from(format!("{p}.io.safetensors")),
        };
        for f in [&files.json, &files.weights, &files.io] {
            if !f.exists() {
                bail!(
                    "fixture file {} not found (PREFIX must name PREFIX.json, PREFIX.weights.safetensors and PREFIX.io.safetensors)",
                    f.display()
                );
            }
        }
        Ok(files)
    }

    pub fn read_json(&self) -> Result<serde_json::Value> {
        let text = std::fs::read_to_string(&self.json)
            .with_context(|| format!("reading {}", self.json.display()))?;
        serde_json::from_str(&text).with_context(|| format!("parsing {}", self.json.display()))
    }
}

/// Max absolute difference of two tensors of the same shape, in f64.
pub fn max_abs_diff(a: &tch::Tensor, b: &tch::Tensor) -> Result<f64> {
    if a.size() != b.size() {
        bail!(
            "shape mismatch: got {:?}, reference {:?}",
            a.size(),
            b.size()
        );
    }
    let d = (a.to_kind(tch::Kind::Double) - b.to_kind(tch::Kind::Double)).abs();
    Ok(if d.numel() == 0 {
        0.0
    } else {
        d.max().double_value(&[])
    })
}

pub mod generator;
pub mod tokenizer;
pub mod train;

/// Runs every case of the fixture at `prefix`, choosing the model kind from its JSON.
pub fn run(prefix: &Path, opts: &VerifyOptions) -> Result<Vec<CaseReport>> {
    let files = FixtureFiles::from_prefix(prefix)?;
    let json = files.read_json()?;
    if json.get("encoder_embed_dim").is_some() {
        generator::run_cases(&files, &json, opts)
    } else if json.get("ddconfig").is_some() {
        tokenizer::run_cases(&files, &json, opts)
    } else {
        bail!(
            "{} has neither `encoder_embed_dim` (generator) nor `ddconfig` (tokenizer): not a fixture JSON",
            files.json.display()
        )
    }
}

/// `eqim verify-reference`: prints one line per case and fails if any case fails.
pub fn run_cli(prefix: &Path, tol: f64, device: tch::Device) -> Result<()> {
    if device != tch::Device::Cpu && !tch::Cuda::is_available() {
        bail!("--device {device:?}: no CUDA device is available to this libtorch (eqim doctor says why)");
    }
    let reports = run(prefix, &VerifyOptions::new(tol).with_device(device))?;
    if reports.is_empty() {
        bail!("{}: the io file holds no cases", prefix.display());
    }
    let mut failed = Vec::new();
    for r in &reports {
        let verdict = if r.passed() { "ok" } else { "FAIL" };
        println!(
            "{:<16} max abs err {:>10.3e}  (tol {:.0e})  {verdict}  {}",
            r.case, r.max_abs_err, r.tol, r.detail
        );
        if !r.passed() {
            failed.push(r.case.as_str());
        }
    }
    if !failed.is_empty() {
        bail!("{} case(s) failed: {}", failed.len(), failed.join(", "));
    }
    Ok(())
}
