//! The `train` case of a generator training fixture (`generator_train_tiny`): the reference's
//! training steps (loss in eval mode with the given flow noise and t -> backward -> total grad
//! norm -> `clip_grad_norm_` -> AdamW with the two parameter groups -> EMA) run through
//! [`crate::train::Trainer`], compared step by step.
//!
//! Tolerances (fixtures README): loss, grad norm, step-0 gradients, final weights and EMA at
//! 1e-5 (or the tighter `--tol`); where `train.small_grad.<param>` is 1 Adam divides a
//! rounding-level gradient by its own magnitude, so those elements of the final weights and EMA
//! may differ by up to 2 x steps x lr.

use super::generator::load_model_on;
use super::{max_abs_diff, CaseReport, FixtureFiles, VerifyOptions};
use crate::model::generator::{EquivariantGenerativeModel, Mode};
use crate::model::weights;
use crate::train::{
    AdamWConfig, Batch, LrSchedule, ScheduleKind, TrainModel, Trainer, TrainerConfig,
};
use anyhow::{bail, ensure, Context, Result};
use std::cell::RefCell;
use std::collections::{BTreeMap, VecDeque};
use tch::{nn, Kind, Tensor};

/// The README's tolerance for every compared quantity except small-gradient elements.
const TRAIN_TOL: f64 = 1e-5;

/// The generator with the fixture's flow noise and t queued per step, in eval mode.
struct FixtureModel {
    vs: nn::VarStore,
    model: EquivariantGenerativeModel,
    flow: RefCell<VecDeque<(Tensor, Tensor)>>,
}

impl TrainModel for FixtureModel {
    fn var_store(&self) -> &nn::VarStore {
        &self.vs
    }

    fn loss(&self, batch: &Batch) -> Result<Tensor> {
        let (noise, t_raw) = self
            .flow
            .borrow_mut()
            .pop_front()
            .context("more loss evaluations than the fixture has steps")?;
        let out = self.model.forward_loss(
            &batch.latents,
            &batch.labels,
            Some((&noise, &t_raw)),
            Mode::Eval,
        )?;
        Ok(out.loss)
    }
}

/// `train.hparams`: [lr, weight_decay, beta1, beta2, eps, clip, ema_rate].
struct Hparams {
    lr: f64,
    optim: AdamWConfig,
    clip: f64,
    ema_rate: f64,
}

fn hparams(io: &BTreeMap<String, Tensor>) -> Result<Hparams> {
    let t = io
        .get("train.hparams")
        .context("io file has no train.hparams")?;
    let v = Vec::<f64>::try_from(&t.to_kind(Kind::Double)).context("reading train.hparams")?;
    let [lr, weight_decay, beta1, beta2, eps, clip, ema_rate] = v[..] else {
        bail!("train.hparams has {} values, expected 7", v.len());
    };
    Ok(Hparams {
        lr,
        optim: AdamWConfig {
            beta1,
            beta2,
            eps,
            weight_decay,
        },
        clip,
        ema_rate,
    })
}

fn get<'a>(io: &'a BTreeMap<String, Tensor>, key: &str) -> Result<&'a Tensor> {
    io.get(key)
        .with_context(|| format!("io file has no tensor {key}"))
}

/// Max abs error of `got` vs `want` separately over elements where `mask` is 0 and where it is 1.
fn masked_errors(got: &Tensor, want: &Tensor, mask: &Tensor) -> Result<(f64, f64)> {
    ensure!(
        got.size() == want.size() && mask.size() == want.size(),
        "shape mismatch: got {:?}, reference {:?}, mask {:?}",
        got.size(),
        want.size(),
        mask.size()
    );
    let diff = (got.to_kind(Kind::Double) - want.to_kind(Kind::Double)).abs();
    let small = mask.to_kind(Kind::Double).ne(0.0);
    let max_where = |m: &Tensor| {
        let d = diff.masked_select(m);
        if d.numel() == 0 {
            0.0
        } else {
            d.max().double_value(&[])
        }
    };
    Ok((max_where(&small.logical_not()), max_where(&small)))
}

/// Runs the `train` case; returns one report per compared quantity.
pub fn run_case(
    files: &FixtureFiles,
    json: &serde_json::Value,
    opts: &VerifyOptions,
) -> Result<Vec<CaseReport>> {
    tch::with_grad(|| run_case_with_grad(files, json, opts))
}

fn run_case_with_grad(
    files: &FixtureFiles,
    json: &serde_json::Value,
    opts: &VerifyOptions,
) -> Result<Vec<CaseReport>> {
    let io = super::to_device(weights::read_safetensors(&files.io)?, opts.device);
    let hp = hparams(&io)?;
    let steps = fixture_steps(files, json, &io)?;
    let mut trainer = fixture_trainer(files, json, opts, &io, &hp, steps)?;
    let tol = opts.tol.min(TRAIN_TOL);
    let small_tol = 2.0 * steps as f64 * hp.lr;
    let mut reports = Vec::new();
    let mut push = |case: String, err: f64, tol: f64, detail: String| {
        reports.push(CaseReport {
            case,
            max_abs_err: err,
            tol,
            detail,
        })
    };

    for s in 0..steps {
        let batch = Batch {
            latents: get(&io, &format!("train.step{s}.x0"))?.shallow_clone(),
            labels: get(&io, &format!("train.step{s}.labels"))?.shallow_clone(),
        };
        let mut acc = trainer.accumulator();
        trainer.accumulate(&mut acc, &batch, 0, 1.0)?;
        if s == 0 {
            let (worst, worst_name) = step0_gradient_error(&io, &trainer.params.names, &acc.grads)?;
            push(
                "train.step0.grads".into(),
                worst,
                tol,
                format!("worst: {worst_name}"),
            );
        }
        let report = trainer.apply(acc, 1)?;
        for (what, got) in [("loss", report.loss), ("grad_norm", report.grad_norm)] {
            let want = get(&io, &format!("train.step{s}.{what}"))?.double_value(&[]);
            push(
                format!("train.step{s}.{what}"),
                (got - want).abs(),
                tol,
                format!("{got:.6} vs {want:.6}"),
            );
        }
    }

    for (what, tensors) in [
        ("final", &trainer.params.tensors),
        ("ema", &trainer.ema.shadow),
    ] {
        let (regular, small) = final_errors(&io, what, &trainer.params.names, tensors)?;
        push(
            format!("train.{what}"),
            regular.0,
            tol,
            format!("worst: {}", regular.1),
        );
        push(
            format!("train.{what}.small_grad"),
            small.0,
            small_tol,
            format!(
                "elements with a rounding-level gradient; worst: {}",
                small.1
            ),
        );
    }
    Ok(reports)
}

/// The trainer of the fixture: its model and weights, fed the fixture's flow noise and t per
/// step, with the fixture's optimizer, constant lr, clipping and EMA rate.
fn fixture_trainer(
    files: &FixtureFiles,
    json: &serde_json::Value,
    opts: &VerifyOptions,
    io: &BTreeMap<String, Tensor>,
    hp: &Hparams,
    steps: usize,
) -> Result<Trainer<FixtureModel>> {
    let (vs, model) = load_model_on(files, json, opts.device)?;
    let mut flow = VecDeque::new();
    for s in 0..steps {
        let noise = get(io, &format!("train.step{s}.noise"))?.shallow_clone();
        let t_raw = get(io, &format!("train.step{s}.t_raw"))?.shallow_clone();
        flow.push_back((noise, t_raw));
    }
    let fixture_model = FixtureModel {
        vs,
        model,
        flow: RefCell::new(flow),
    };
    let cfg = TrainerConfig {
        optim: hp.optim,
        schedule: LrSchedule {
            lr: hp.lr,
            warmup_epochs: 0.0,
            kind: ScheduleKind::Constant,
            min_lr: hp.lr,
            epochs: 1.0,
        },
        clip_grad: Some(hp.clip),
        ema_rate: hp.ema_rate,
        seed: 0,
    };
    Trainer::new(fixture_model, cfg)
}

/// The worst error (and its parameter) of the final `what` ("final" or "ema") tensors against
/// the fixture: over the regular elements, and over those with a rounding-level gradient.
fn final_errors(
    io: &BTreeMap<String, Tensor>,
    what: &str,
    names: &[String],
    tensors: &[Tensor],
) -> Result<((f64, String), (f64, String))> {
    let (mut regular, mut small) = ((0f64, String::new()), (0f64, String::new()));
    for (name, got) in names.iter().zip(tensors.iter()) {
        let want = get(io, &format!("train.{what}.{name}"))?;
        let mask = get(io, &format!("train.small_grad.{name}"))?;
        let (r, s) =
            masked_errors(got, want, mask).with_context(|| format!("train.{what}.{name}"))?;
        if r > regular.0 {
            regular = (r, name.clone());
        }
        if s > small.0 {
            small = (s, name.clone());
        }
    }
    Ok((regular, small))
}

/// The worst error of the first step's gradients against the fixture, and its parameter.
fn step0_gradient_error(
    io: &BTreeMap<String, Tensor>,
    names: &[String],
    grads: &[Option<Tensor>],
) -> Result<(f64, String)> {
    let (mut worst, mut worst_name) = (0f64, String::new());
    for (name, grad) in names.iter().zip(grads) {
        let want = get(io, &format!("train.step0.grad.{name}"))?;
        let got = grad
            .as_ref()
            .map_or_else(|| want.zeros_like(), |g| g.detach());
        let e = max_abs_diff(&got, want).with_context(|| format!("gradient of {name}"))?;
        if e > worst {
            (worst, worst_name) = (e, name.clone());
        }
    }
    Ok((worst, worst_name))
}

/// How many training steps the fixture recorded (and its JSON agrees).
fn fixture_steps(
    files: &FixtureFiles,
    json: &serde_json::Value,
    io: &BTreeMap<String, Tensor>,
) -> Result<usize> {
    let steps = (0..)
        .take_while(|s| io.contains_key(&format!("train.step{s}.x0")))
        .count();
    ensure!(steps > 0, "io file has no train.step0.x0");
    if let Some(n) = json.pointer("/train/steps").and_then(|v| v.as_u64()) {
        ensure!(
            n as usize == steps,
            "{} says train.steps {n}, the io file has {steps} steps",
            files.json.display()
        );
    }
    Ok(steps)
}
