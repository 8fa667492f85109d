//! Tokenizer parity cases: `encode*` (image -> posterior mean) and `decode*` (tokens -> image and
//! semantic map), with the live weights or, for cases ending in `_ema`, the EMA shadows. The cases
//! are read from the io file, so fixtures of any configuration run unchanged.

use super::{max_abs_diff, CaseReport, FixtureFiles, VerifyOptions};
use crate::model::tokenizer::{ema, EquivariantTokenizer, TokenizerConfig, WeightChoice};
use crate::model::weights::read_safetensors;
use anyhow::{bail, Context, Result};
use std::collections::{BTreeMap, BTreeSet};
use tch::{nn, Device, Tensor};

/// A model built from the fixture config with one copy of the weights loaded.
struct Loaded {
    _vs: nn::VarStore,
    model: EquivariantTokenizer,
}

fn load(
    cfg: &TokenizerConfig,
    weights: &BTreeMap<String, Tensor>,
    source: &str,
    choice: WeightChoice,
    device: Device,
) -> Result<Loaded> {
    let vs = nn::VarStore::new(device);
    let model = EquivariantTokenizer::new(vs.root(), cfg);
    EquivariantTokenizer::load(&vs, weights, source, Some(choice))
        .with_context(|| format!("loading the {choice:?} weights of {source}"))?;
    Ok(Loaded { _vs: vs, model })
}

/// Keys of the fixture weights that neither the live nor the EMA load consumed (bookkeeping
/// scalars excluded). Empty for a fixture that matches the model.
pub fn unused_weight_keys(
    cfg: &TokenizerConfig,
    weights: &BTreeMap<String, Tensor>,
) -> Vec<String> {
    let vs = nn::VarStore::new(Device::Cpu);
    let _model = EquivariantTokenizer::new(vs.root(), cfg);
    let live: Vec<String> = vs.variables().into_keys().collect();
    let mut used: BTreeSet<String> = live.iter().cloned().collect();
    used.extend(live.iter().filter_map(|n| ema::ema_name(n)));
    weights
        .keys()
        .filter(|k| !used.contains(*k) && !ema::is_ema_bookkeeping(k))
        .cloned()
        .collect()
}

/// Runs every case found in the io file.
pub fn run_cases(
    files: &FixtureFiles,
    json: &serde_json::Value,
    opts: &VerifyOptions,
) -> Result<Vec<CaseReport>> {
    let _guard = tch::no_grad_guard();
    let cfg = TokenizerConfig::from_json(json)
        .with_context(|| format!("reading the tokenizer config in {}", files.json.display()))?;
    let weights = read_safetensors(&files.weights)?;
    let io = super::to_device(read_safetensors(&files.io)?, opts.device);
    let source = files.weights.display().to_string();
    let unused = unused_weight_keys(&cfg, &weights);
    if !unused.is_empty() {
        bail!(
            "{source}: {} keys are used by neither the live nor the EMA model: {}",
            unused.len(),
            unused.join(", ")
        );
    }
    let live = load(&cfg, &weights, &source, WeightChoice::Live, opts.device)?;
    let ema_model = if ema::has_ema(&weights) {
        Some(load(
            &cfg,
            &weights,
            &source,
            WeightChoice::Ema,
            opts.device,
        )?)
    } else {
        None
    };
    let cases: BTreeSet<&str> = io
        .keys()
        .filter_map(|k| k.split_once('.').map(|(c, _)| c))
        .collect();
    let mut reports = Vec::new();
    for case in cases {
        let model = if case.ends_with("_ema") {
            match &ema_model {
                Some(m) => &m.model,
                None => bail!("case {case} needs EMA weights, {source} has none"),
            }
        } else {
            &live.model
        };
        reports.push(run_case(case, model, &io, opts)?);
    }
    Ok(reports)
}

/// The input of a case: its own `<case>.<name>` or, for a variant such as `decode_ema`, the base
/// case's (`decode.<name>`).
fn case_input<'a>(io: &'a BTreeMap<String, Tensor>, case: &str, name: &str) -> Result<&'a Tensor> {
    let base = case.split('_').next().unwrap_or(case);
    io.get(&format!("{case}.{name}"))
        .or_else(|| io.get(&format!("{base}.{name}")))
        .with_context(|| format!("case {case}: no input {case}.{name} or {base}.{name}"))
}

fn run_case(
    case: &str,
    model: &EquivariantTokenizer,
    io: &BTreeMap<String, Tensor>,
    opts: &VerifyOptions,
) -> Result<CaseReport> {
    let mut outputs: Vec<(&str, Tensor)> = Vec::new();
    let input_name;
    if case.starts_with("encode") {
        input_name = "x";
        let x = case_input(io, case, input_name)?;
        let posterior = model.encode(x).with_context(|| format!("case {case}"))?;
        outputs.push(("mean", posterior.mode()));
    } else if case.starts_with("decode") {
        input_name = "z";
        let z = case_input(io, case, input_name)?;
        let wants_semantic = io.contains_key(&format!("{case}.semantic"));
        if wants_semantic {
            let (image, semantic) = model
                .decode_with_semantic(z)
                .with_context(|| format!("case {case}"))?;
            outputs.push(("image", image));
            outputs.push(("semantic", semantic));
        } else {
            let image = model.decode(z).with_context(|| format!("case {case}"))?;
            outputs.push(("image", image));
        }
    } else {
        bail!("unknown tokenizer case {case} (expected encode* or decode*)");
    }
    let mut worst = 0f64;
    let mut detail = Vec::new();
    let mut compared = 0;
    for (name, got) in &outputs {
        let Some(want) = io.get(&format!("{case}.{name}")) else {
            continue;
        };
        let err = max_abs_diff(got, want).with_context(|| format!("case {case}, {name}"))?;
        worst = worst.max(err);
        compared += 1;
        detail.push(format!("{name} {:?}: {err:.3e}", want.size()));
    }
    let known: BTreeSet<&str> = outputs.iter().map(|(n, _)| *n).collect();
    for key in io.keys() {
        if let Some(name) = key.strip_prefix(&format!("{case}.")) {
            if name != input_name && !known.contains(name) {
                bail!("case {case}: reference output {key} is not one this port computes");
            }
        }
    }
    if compared == 0 {
        bail!("case {case}: no reference outputs to compare");
    }
    Ok(CaseReport {
        case: case.to_owned(),
        max_abs_err: worst,
        tol: opts.tol,
        detail: detail.join(", "),
    })
}

/// Fixture folder for tests: `EQIM_FIXTURES`, else `<repo>/../shared/fixtures`.
#[cfg(test)]
pub(crate) fn fixtures_dir() -> std::path::PathBuf {
    std::env::var_os("EQIM_FIXTURES")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/fixtures")
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokenizer_tiny_matches_the_reference_at_1e_5() {
        let files = FixtureFiles::from_prefix(&fixtures_dir().join("tokenizer_tiny"))
            .expect("tokenizer_tiny fixture (set EQIM_FIXTURES to the fixtures folder)");
        let json = files.read_json().unwrap();
        let reports = run_cases(&files, &json, &VerifyOptions::new(1e-5)).unwrap();
        let names: Vec<&str> = reports.iter().map(|r| r.case.as_str()).collect();
        for want in [
            "decode",
            "decode_ema",
            "decode_wide",
            "encode",
            "encode_ema",
            "encode_wide",
        ] {
            assert!(names.contains(&want), "case {want} missing from {names:?}");
        }
        for r in &reports {
            eprintln!(
                "{}: max abs err {:.3e} ({})",
                r.case, r.max_abs_err, r.detail
            );
            assert!(
                r.passed(),
                "{}: {:.3e} > {:.0e} ({})",
                r.case,
                r.max_abs_err,
                r.tol,
                r.detail
            );
        }
    }

    #[test]
    fn live_weights_do_not_pass_the_ema_cases() {
        let _guard = tch::no_grad_guard();
        let files = FixtureFiles::from_prefix(&fixtures_dir().join("tokenizer_tiny"))
            .expect("tokenizer_tiny fixture (set EQIM_FIXTURES to the fixtures folder)");
        let cfg = TokenizerConfig::from_json(&files.read_json().unwrap()).unwrap();
        let weights = read_safetensors(&files.weights).unwrap();
        let io = read_safetensors(&files.io).unwrap();
        let live = load(&cfg, &weights, "fixture", WeightChoice::Live, Device::Cpu).unwrap();
        let opts = VerifyOptions::new(1e-5);
        for case in ["encode_ema", "decode_ema"] {
            let r = run_case(case, &live.model, &io, &opts).unwrap();
            assert!(!r.passed(), "{case} passed with the live weights: {r:?}");
        }
    }
}
