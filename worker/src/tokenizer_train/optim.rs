//! Optimisation pieces of tokenizer training: Adam(β1 0.5, β2 0.9) over named parameters, the
//! warm-up + step-decay LR multiplier as a pure function of the step, and `LitEma`.
//! Upstream: `tokenizer/models/tokenizer.py` (`configure_optimizers`), `tokenizer/lr_scheduler.py`
//! (`LambdaWarmUpDecayScheduler`), `tokenizer/ema.py` (`LitEma`).

use anyhow::{bail, Result};
use serde::Deserialize;
use std::collections::BTreeMap;
use tch::{Kind, Tensor};

/// Adam hyper-parameters (no weight decay, as the reference).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
}

impl AdamConfig {
    /// The tokenizer's `Adam(..., betas=(0.5, 0.9))` with torch's default eps.
    pub fn tokenizer() -> Self {
        Self {
            beta1: 0.5,
            beta2: 0.9,
            eps: 1e-8,
        }
    }
}

/// Per-parameter Adam state, as torch keeps it.
#[derive(Debug)]
struct AdamSlot {
    name: String,
    param: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    step: i64,
}

/// `torch.optim.Adam` (non-fused, no amsgrad, no weight decay) over named parameters. A parameter
/// without a gradient is skipped, as torch skips `grad is None`.
#[derive(Debug)]
pub struct Adam {
    cfg: AdamConfig,
    slots: Vec<AdamSlot>,
}

impl Adam {
    pub fn new(params: Vec<(String, Tensor)>, cfg: AdamConfig) -> Self {
        let slots = params
            .into_iter()
            .map(|(name, param)| AdamSlot {
                exp_avg: param.zeros_like().detach(),
                exp_avg_sq: param.zeros_like().detach(),
                name,
                param,
                step: 0,
            })
            .collect();
        Self { cfg, slots }
    }

    pub fn param_names(&self) -> impl Iterator<Item = &str> {
        self.slots.iter().map(|s| s.name.as_str())
    }

    pub fn zero_grad(&mut self) {
        for s in &mut self.slots {
            let mut g = s.param.grad();
            if g.defined() {
                let _zeroed = g.zero_();
            }
        }
    }

    /// One Adam step at learning rate `lr` with the gradients now in `.grad()`.
    pub fn step(&mut self, lr: f64) {
        let _guard = tch::no_grad_guard();
        let cfg = self.cfg;
        for s in &mut self.slots {
            let grad = s.param.grad();
            if !grad.defined() {
                continue;
            }
            s.step += 1;
            let _ = s.exp_avg.lerp_(&grad, 1.0 - cfg.beta1); // in place; the returned alias is unused
            s.exp_avg_sq *= cfg.beta2;
            let _ = s.exp_avg_sq.addcmul_(&grad, &(&grad * (1.0 - cfg.beta2))); // in place
            let bias_correction1 = 1.0 - cfg.beta1.powi(s.step as i32);
            let bias_correction2 = 1.0 - cfg.beta2.powi(s.step as i32);
            let step_size = lr / bias_correction1;
            let denom = s.exp_avg_sq.sqrt() / bias_correction2.sqrt() + cfg.eps;
            let update = &s.exp_avg / denom * step_size;
            s.param -= update;
        }
    }

    /// An Adam step in which every gradient is zero (the reference's `0 · d_loss` backward before
    /// the discriminator starts): the moments decay and the step counts advance.
    pub fn step_zero_gradients(&mut self, lr: f64) {
        let _guard = tch::no_grad_guard();
        let cfg = self.cfg;
        for s in &mut self.slots {
            s.step += 1;
            s.exp_avg *= cfg.beta1;
            s.exp_avg_sq *= cfg.beta2;
            let bias_correction1 = 1.0 - cfg.beta1.powi(s.step as i32);
            let bias_correction2 = 1.0 - cfg.beta2.powi(s.step as i32);
            let denom = s.exp_avg_sq.sqrt() / bias_correction2.sqrt() + cfg.eps;
            let update = &s.exp_avg / denom * (lr / bias_correction1);
            s.param -= update;
        }
    }

    /// The state as named tensors under `prefix` (`{prefix}.exp_avg.{param}`, `.exp_avg_sq.`,
    /// `.step.` as an int64 scalar), for checkpoints.
    pub fn state_tensors(&self, prefix: &str) -> Vec<(String, Tensor)> {
        let mut out = Vec::with_capacity(self.slots.len() * 3);
        for s in &self.slots {
            out.push((format!("{prefix}.exp_avg.{}", s.name), s.exp_avg.copy()));
            out.push((
                format!("{prefix}.exp_avg_sq.{}", s.name),
                s.exp_avg_sq.copy(),
            ));
            out.push((format!("{prefix}.step.{}", s.name), Tensor::from(s.step)));
        }
        out
    }

    /// Restores the state written by [`Adam::state_tensors`]; every parameter must be present.
    pub fn load_state(&mut self, prefix: &str, tensors: &BTreeMap<String, Tensor>) -> Result<()> {
        let _guard = tch::no_grad_guard();
        for s in &mut self.slots {
            let get = |what: &str| -> Result<&Tensor> {
                let key = format!("{prefix}.{what}.{}", s.name);
                match tensors.get(&key) {
                    Some(t) => Ok(t),
                    None => bail!("checkpoint has no optimizer state {key}"),
                }
            };
            let m = get("exp_avg")?;
            let v = get("exp_avg_sq")?;
            if m.size() != s.param.size() || v.size() != s.param.size() {
                bail!(
                    "optimizer state for {} has shape {:?}, the parameter {:?}",
                    s.name,
                    m.size(),
                    s.param.size()
                );
            }
            s.exp_avg.copy_(&m.to_device(s.param.device()));
            s.exp_avg_sq.copy_(&v.to_device(s.param.device()));
            s.step = get("step")?.int64_value(&[]);
        }
        Ok(())
    }
}

/// `LambdaWarmUpDecayScheduler` parameters (reference YAML names).
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
pub struct WarmUpDecayConfig {
    pub warm_up_steps: i64,
    pub lr_max: f64,
    pub lr_min: f64,
    pub lr_start: f64,
    #[serde(default = "default_decay")]
    pub decay: f64,
    #[serde(default = "default_interval")]
    pub interval: i64,
}

fn default_decay() -> f64 {
    0.8
}
fn default_interval() -> i64 {
    10000
}

/// The LR multiplier at step `n`: linear warm-up `lr_start → lr_max` over `warm_up_steps`, then
/// the last warm-up value (reached at n = warm−1, as the reference's stateful scheduler keeps it),
/// multiplied by `decay` (floored at `lr_min`) at every n > warm with (n − warm) % interval == 0.
/// A pure function of `n`, so a resumed run gets the same multiplier as an uninterrupted one
/// (the reference loses its state on resume: spec §8.10).
pub fn warm_up_decay_multiplier(n: i64, cfg: &WarmUpDecayConfig) -> f64 {
    let warm = cfg.warm_up_steps;
    let ramp = |k: i64| (cfg.lr_max - cfg.lr_start) / warm as f64 * k as f64 + cfg.lr_start;
    if n < warm {
        return ramp(n);
    }
    let mut lr = if warm > 0 {
        ramp(warm - 1)
    } else {
        cfg.lr_start
    };
    let decays = if cfg.interval > 0 {
        (n - warm) / cfg.interval
    } else {
        0
    };
    for _ in 0..decays {
        lr = (lr * cfg.decay).max(cfg.lr_min);
    }
    lr
}

/// `LitEma` over one module: shadow copies keyed by the parameter name with dots removed,
/// decay `min(decay, (1 + n)/(10 + n))` with n the number of updates so far (after increment).
#[derive(Debug)]
pub struct LitEma {
    pub decay: f64,
    pub num_updates: i32,
    /// (live parameter name relative to the module, live tensor, shadow)
    shadows: Vec<(String, Tensor, Tensor)>,
}

impl LitEma {
    /// `params`: the module's parameters, named relative to the module (e.g. `conv_in.weight`).
    pub fn new(params: Vec<(String, Tensor)>, decay: f64) -> Self {
        let shadows = params
            .into_iter()
            .map(|(name, p)| {
                let shadow = p.detach().copy();
                (name, p, shadow)
            })
            .collect();
        Self {
            decay,
            num_updates: 0,
            shadows,
        }
    }

    /// The decay the next update will use.
    pub fn next_decay(&self) -> f64 {
        let n = f64::from(self.num_updates + 1);
        self.decay.min((1.0 + n) / (10.0 + n))
    }

    /// `LitEma.forward(model)`: shadow −= (1 − decay)·(shadow − param).
    pub fn update(&mut self) {
        let decay = self.next_decay();
        self.num_updates += 1;
        let _guard = tch::no_grad_guard();
        for (_, p, shadow) in &mut self.shadows {
            let delta = (&*shadow - &*p) * (1.0 - decay);
            *shadow -= delta;
        }
    }

    /// `copy_to`: overwrites the live parameters with the shadows.
    pub fn copy_to_live(&self) {
        let _guard = tch::no_grad_guard();
        for (_, p, shadow) in &self.shadows {
            let mut p = p.shallow_clone();
            p.copy_(shadow);
        }
    }

    /// The buffers as `LitEma` names them under `prefix` (e.g. `ema_decoder`): `{prefix}.{name
    /// without dots}`, plus `{prefix}.decay` (f32) and `{prefix}.num_updates` (i32).
    pub fn state_tensors(&self, prefix: &str) -> Vec<(String, Tensor)> {
        let mut out: Vec<(String, Tensor)> = self
            .shadows
            .iter()
            .map(|(name, _, s)| (format!("{prefix}.{}", name.replace('.', "")), s.copy()))
            .collect();
        out.push((
            format!("{prefix}.decay"),
            Tensor::from(self.decay as f32).to_kind(Kind::Float),
        ));
        out.push((
            format!("{prefix}.num_updates"),
            Tensor::from(self.num_updates),
        ));
        out
    }

    /// Restores shadows and counters from [`LitEma::state_tensors`] names.
    pub fn load_state(&mut self, prefix: &str, tensors: &BTreeMap<String, Tensor>) -> Result<()> {
        let _guard = tch::no_grad_guard();
        for (name, _, shadow) in &mut self.shadows {
            let key = format!("{prefix}.{}", name.replace('.', ""));
            let Some(t) = tensors.get(&key) else {
                bail!("checkpoint has no EMA buffer {key}");
            };
            if t.size() != shadow.size() {
                bail!(
                    "EMA buffer {key} has shape {:?}, the model {:?}",
                    t.size(),
                    shadow.size()
                );
            }
            shadow.copy_(&t.to_device(shadow.device()));
        }
        let Some(n) = tensors.get(&format!("{prefix}.num_updates")) else {
            bail!("checkpoint has no {prefix}.num_updates");
        };
        self.num_updates = n.int64_value(&[]) as i32;
        Ok(())
    }

    /// (name, shadow) pairs, for tests and sheets.
    pub fn shadows(&self) -> impl Iterator<Item = (&str, &Tensor)> {
        self.shadows.iter().map(|(n, _, s)| (n.as_str(), s))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    fn reference_cfg() -> WarmUpDecayConfig {
        WarmUpDecayConfig {
            warm_up_steps: 3000,
            lr_max: 1.0,
            lr_min: 0.0,
            lr_start: 0.0,
            decay: 0.2,
            interval: 30000,
        }
    }

    /// The reference's stateful scheduler, run from step 0 without interruption.
    fn stateful_reference(cfg: &WarmUpDecayConfig, upto: i64) -> Vec<f64> {
        let mut last = cfg.lr_start;
        let mut out = Vec::new();
        for n in 0..=upto {
            let lr = if n < cfg.warm_up_steps {
                last = (cfg.lr_max - cfg.lr_start) / cfg.warm_up_steps as f64 * n as f64
                    + cfg.lr_start;
                last
            } else if (n - cfg.warm_up_steps) % cfg.interval == 0 && n > cfg.warm_up_steps {
                last = (last * cfg.decay).max(cfg.lr_min);
                last
            } else {
                last
            };
            out.push(lr);
        }
        out
    }

    #[test]
    fn schedule_equals_the_uninterrupted_reference_at_every_step() {
        let cfg = reference_cfg();
        let want = stateful_reference(&cfg, 100_000);
        for (n, w) in want.iter().enumerate() {
            assert_eq!(warm_up_decay_multiplier(n as i64, &cfg), *w, "step {n}");
        }
        assert_eq!(warm_up_decay_multiplier(0, &cfg), 0.0);
        assert_eq!(warm_up_decay_multiplier(1500, &cfg), 0.5);
        assert!((warm_up_decay_multiplier(32999, &cfg) - 2999.0 / 3000.0).abs() < 1e-15);
        assert!((warm_up_decay_multiplier(33000, &cfg) - 0.2 * 2999.0 / 3000.0).abs() < 1e-15);
        // no resume bug: the value at a step does not depend on what was computed before
        assert_eq!(
            warm_up_decay_multiplier(70_000, &cfg),
            want[70_000],
            "pure function"
        );
    }

    #[test]
    fn adam_matches_hand_computed_steps() {
        let p = Tensor::from_slice(&[1.0f64, -2.0]).set_requires_grad(true);
        let mut opt = Adam::new(
            vec![("p".into(), p.shallow_clone())],
            AdamConfig::tokenizer(),
        );
        // two steps with gradients g1 = [0.5, -1], g2 = [1, 2]
        let grads = [[0.5, -1.0], [1.0, 2.0]];
        let (b1, b2, eps, lr) = (0.5f64, 0.9f64, 1e-8, 0.1);
        let mut want = [1.0f64, -2.0];
        let (mut m, mut v) = ([0.0f64; 2], [0.0f64; 2]);
        for (t, g) in grads.iter().enumerate() {
            let t = t as i32 + 1;
            opt.zero_grad();
            let loss = (&p * Tensor::from_slice(g)).sum(Kind::Double);
            loss.backward();
            opt.step(lr);
            for i in 0..2 {
                m[i] = b1 * m[i] + (1.0 - b1) * g[i];
                v[i] = b2 * v[i] + (1.0 - b2) * g[i] * g[i];
                let mhat = m[i] / (1.0 - b1.powi(t));
                let denom = (v[i] / (1.0 - b2.powi(t))).sqrt() + eps;
                want[i] -= lr * mhat / denom;
            }
        }
        let got = Vec::<f64>::try_from(&p).expect("f64");
        for i in 0..2 {
            assert!((got[i] - want[i]).abs() < 1e-12, "{got:?} vs {want:?}");
        }
        // state round trip
        let state: BTreeMap<String, Tensor> = opt.state_tensors("opt").into_iter().collect();
        assert_eq!(state["opt.step.p"].int64_value(&[]), 2);
        let q = Tensor::from_slice(&[0.0f64, 0.0]).set_requires_grad(true);
        let mut opt2 = Adam::new(vec![("p".into(), q)], AdamConfig::tokenizer());
        opt2.load_state("opt", &state).expect("load");
        assert!(opt2.slots[0].exp_avg.equal(&opt.slots[0].exp_avg));
        assert_eq!(opt2.slots[0].step, 2);
    }

    #[test]
    fn zero_gradient_steps_equal_steps_with_zero_gradients() {
        let p = Tensor::from_slice(&[1.0f64, -2.0]).set_requires_grad(true);
        let q = p.detach().copy().set_requires_grad(true);
        let mut a = Adam::new(
            vec![("p".into(), p.shallow_clone())],
            AdamConfig::tokenizer(),
        );
        let mut b = Adam::new(
            vec![("p".into(), q.shallow_clone())],
            AdamConfig::tokenizer(),
        );
        for (opt, t) in [(&mut a, &p), (&mut b, &q)] {
            opt.zero_grad();
            (t * Tensor::from_slice(&[0.3f64, 0.7]))
                .sum(Kind::Double)
                .backward();
            opt.step(0.1);
        }
        a.zero_grad();
        (&p * 0.0).sum(Kind::Double).backward();
        a.step(0.1);
        b.step_zero_gradients(0.1);
        assert!(p.allclose(&q, 0.0, 1e-15, false));
        assert_eq!(a.slots[0].step, b.slots[0].step);
    }

    #[test]
    fn adam_skips_parameters_without_gradients() {
        let p = Tensor::from_slice(&[1.0f32]).set_requires_grad(true);
        let mut opt = Adam::new(
            vec![("p".into(), p.shallow_clone())],
            AdamConfig::tokenizer(),
        );
        opt.step(1.0);
        assert_eq!(p.double_value(&[0]), 1.0);
        assert_eq!(opt.slots[0].step, 0);
    }

    #[test]
    fn lit_ema_warms_up_then_uses_the_configured_decay() {
        let p = Tensor::zeros([1], (Kind::Double, Device::Cpu));
        let mut ema = LitEma::new(vec![("a.b".into(), p.shallow_clone())], 0.99);
        let mut live = p.shallow_clone();
        let mut shadow = 0.0f64;
        for n in 1..=200 {
            let _ = live.fill_(n as f64);
            ema.update();
            let d = 0.99f64.min((1.0 + n as f64) / (10.0 + n as f64));
            shadow -= (1.0 - d) * (shadow - n as f64);
        }
        let got = ema
            .shadows()
            .next()
            .expect("one shadow")
            .1
            .double_value(&[0]);
        assert!((got - shadow).abs() < 1e-9, "{got} vs {shadow}");
        assert_eq!(ema.num_updates, 200);
        // still warming up at 201 updates: (1 + 201)/(10 + 201) < 0.99 until n = 890
        assert_eq!(ema.next_decay(), 202.0 / 211.0);
        ema.num_updates = 900;
        assert_eq!(ema.next_decay(), 0.99);
        let names: Vec<String> = ema
            .state_tensors("ema_x")
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        assert_eq!(names, ["ema_x.ab", "ema_x.decay", "ema_x.num_updates"]);
        ema.copy_to_live();
        assert_eq!(p.double_value(&[0]), got);
    }
}
