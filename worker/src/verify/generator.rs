//! Parity cases of a generator fixture (`encoder`, `encoder_uncond`, `encoder_long`, `head`,
//! `head_cfg`, `loss`, `sample`): each runs the tch model on the fixture's inputs and compares with
//! the reference's outputs.

use super::{max_abs_diff, CaseReport, FixtureFiles, VerifyOptions};
use crate::model::generator::{EquivariantGenerativeModel, GeneratorConfig, Mode};
use crate::model::weights;
use crate::sampling::{self, CfgSchedule, FixedNoise, SampleSpec};
use anyhow::{bail, Context, Result};
use std::collections::{BTreeMap, BTreeSet};
use tch::{nn, Device, Tensor};

/// Io-file prefixes whose cases are run by another module (the training loop's `train.*`).
/// Such a case is reported as failed by this module until that module is wired in here.
pub const TRAIN_CASE: &str = "train";

/// The io tensors of one fixture, looked up by `case.name` with a fallback case for shared
/// inputs (e.g. `encoder_uncond` reuses `encoder.tokens`).
struct Io<'a> {
    tensors: &'a BTreeMap<String, Tensor>,
    case: &'a str,
}

impl Io<'_> {
    fn get(&self, name: &str) -> Result<&Tensor> {
        self.get_or(name, &[])
    }

    fn get_or(&self, name: &str, fallback_cases: &[&str]) -> Result<&Tensor> {
        std::iter::once(self.case)
            .chain(fallback_cases.iter().copied())
            .find_map(|c| self.tensors.get(&format!("{c}.{name}")))
            .with_context(|| {
                format!(
                    "io file has no tensor {}.{name} (nor in cases {fallback_cases:?})",
                    self.case
                )
            })
    }
}

/// Builds the model described by a fixture JSON and loads its weights strictly.
pub fn load_model(
    files: &FixtureFiles,
    json: &serde_json::Value,
) -> Result<(nn::VarStore, EquivariantGenerativeModel)> {
    load_model_on(files, json, Device::Cpu)
}

/// [`load_model`] with the weights on `device`.
pub fn load_model_on(
    files: &FixtureFiles,
    json: &serde_json::Value,
    device: Device,
) -> Result<(nn::VarStore, EquivariantGenerativeModel)> {
    let cfg: GeneratorConfig = serde_json::from_value(json.clone())
        .with_context(|| format!("reading the generator config in {}", files.json.display()))?;
    let vs = nn::VarStore::new(device);
    let model = EquivariantGenerativeModel::new(vs.root(), &cfg)
        .with_context(|| format!("building the generator from {}", files.json.display()))?;
    let real: i64 = vs
        .trainable_variables()
        .iter()
        .map(|t| t.numel() as i64)
        .sum();
    if let Some(want) = json.get("parameter_count").and_then(|v| v.as_i64()) {
        if want != real || want != cfg.parameter_count() {
            bail!(
                "{} says parameter_count {want}, the model built from it has {real} (formula {})",
                files.json.display(),
                cfg.parameter_count()
            );
        }
    }
    weights::load_file_strict(&vs, &files.weights)?;
    Ok((vs, model))
}

/// Runs every case of a generator fixture.
pub fn run_cases(
    files: &FixtureFiles,
    json: &serde_json::Value,
    opts: &VerifyOptions,
) -> Result<Vec<CaseReport>> {
    let (_vs, model) = load_model_on(files, json, opts.device)?;
    let io = super::to_device(weights::read_safetensors(&files.io)?, opts.device);
    let cases: BTreeSet<&str> = io
        .keys()
        .map(|k| k.split('.').next().unwrap_or(k.as_str()))
        .collect();
    let _guard = tch::no_grad_guard();
    let mut reports = Vec::new();
    for case in cases {
        let io = Io { tensors: &io, case };
        let result = match case {
            "encoder" => encoder_case(&model, &io, Some(&[])),
            "encoder_uncond" => encoder_case(&model, &io, None),
            "encoder_long" => encoder_case(&model, &io, Some(&["encoder"])),
            "head" => head_case(&model, &io),
            "head_cfg" => head_cfg_case(&model, &io),
            "loss" => loss_case(&model, &io),
            "sample" => {
                let exact = sample_case(&model, &io, false)?;
                let cached = sample_case(&model, &io, true)?;
                reports.push(report(case, exact, opts.tol));
                reports.push(report("sample_cached", cached, opts.tol.max(1e-4)));
                continue;
            }
            TRAIN_CASE => {
                reports.extend(super::train::run_case(files, json, opts).context("case train")?);
                continue;
            }
            _ => Ok((f64::NAN, format!("unknown case {case:?}"))),
        };
        let (err, detail) = result.with_context(|| format!("case {case}"))?;
        reports.push(report(case, (err, detail), opts.tol));
    }
    Ok(reports)
}

fn report(case: &str, (max_abs_err, detail): (f64, String), tol: f64) -> CaseReport {
    CaseReport {
        case: case.to_owned(),
        max_abs_err,
        tol,
        detail,
    }
}

/// Worst error over named outputs, with a per-output breakdown.
fn worst(pairs: &[(&str, Tensor, &Tensor)]) -> Result<(f64, String)> {
    let mut max = 0f64;
    let mut parts = Vec::new();
    for (name, got, want) in pairs {
        let e = max_abs_diff(got, want).with_context(|| format!("output {name}"))?;
        max = max.max(e);
        parts.push(format!("{name} {e:.2e}"));
    }
    Ok((max, parts.join(", ")))
}

/// `labels_from`: `None` = unconditional (fake_latent); `Some(fallbacks)` = labels of this case
/// or of the fallback cases.
fn encoder_case(
    model: &EquivariantGenerativeModel,
    io: &Io,
    labels_from: Option<&[&str]>,
) -> Result<(f64, String)> {
    let tokens = io.get_or("tokens", &["encoder"])?;
    let ce = match labels_from {
        Some(fallback) => model.class_embedding(io.get_or("labels", fallback)?)?,
        None => model.fake_class_embedding(tokens.size()[0]),
    };
    let out = model.forward_encoder(tokens, &ce, Mode::Eval)?;
    worst(&[("out", out, io.get("out")?)])
}

fn head_case(model: &EquivariantGenerativeModel, io: &Io) -> Result<(f64, String)> {
    let out = model
        .diffloss
        .net
        .forward(io.get("x")?, io.get("t")?, io.get("c")?);
    worst(&[("out", out, io.get("out")?)])
}

fn head_cfg_case(model: &EquivariantGenerativeModel, io: &Io) -> Result<(f64, String)> {
    let scale = io.get("scale")?.double_value(&[]);
    let out = model.diffloss.net.forward_with_cfg(
        io.get("x")?,
        io.get_or("t", &["head"])?,
        io.get_or("c", &["head"])?,
        scale,
    );
    worst(&[("out", out, io.get("out")?)])
}

fn loss_case(model: &EquivariantGenerativeModel, io: &Io) -> Result<(f64, String)> {
    let flow = (io.get("noise")?, io.get("t_raw")?);
    let loss = model.forward_loss(io.get("x0")?, io.get("labels")?, Some(flow), Mode::Eval)?;
    worst(&[
        ("t", loss.t, io.get("t")?),
        ("z_t", loss.z_t, io.get("z_t")?),
        ("pred", loss.pred, io.get("pred")?),
        ("value", loss.loss, io.get("value")?),
    ])
}

fn sample_case(model: &EquivariantGenerativeModel, io: &Io, cached: bool) -> Result<(f64, String)> {
    let labels = io.get("labels")?;
    let step_noise = io.get("step_noise")?;
    let want = io.get("tokens")?;
    let num_steps = match io.get("steps") {
        Ok(t) => t.int64_value(&[]),
        Err(_) => model.cfg.num_sampling_steps,
    };
    let spec = SampleSpec {
        batch: labels.size()[0],
        labels: Some(labels),
        prefix: None,
        num_iter: want.size()[1],
        cfg: io.get("cfg")?.double_value(&[]),
        cfg_schedule: CfgSchedule::Linear,
        num_steps,
        temperature: 1.0,
    };
    let mut noise = FixedNoise::new(step_noise.shallow_clone());
    let sampler = if cached {
        sampling::sample_cached
    } else {
        sampling::sample_exact
    };
    let tokens = sampler(model, &spec, &mut noise, &mut |_| {})?;
    let layout = sampling::decoder_layout(&tokens);
    let mut pairs = vec![("tokens", tokens, want)];
    if let Ok(want_layout) = io.get("decoder_layout") {
        pairs.push(("decoder_layout", layout, want_layout));
    }
    worst(&pairs)
}
