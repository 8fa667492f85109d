//! AdamW as `torch.optim.AdamW` computes it on the CPU (its single-tensor path), per parameter:
//! `p *= 1 - lr*wd` (only where wd != 0), `m.lerp_(g, 1-b1)`, `v = v*b2 + (1-b2)*g*g`,
//! `denom = sqrt(v) / sqrt(1 - b2^t) + eps`, `p += (-lr / (1 - b1^t)) * m / denom`, with the
//! scalar factors computed in f64 like Python floats. Each parameter keeps its own step count
//! and its moments are created on its first gradient; a parameter without a gradient is skipped.
//! Weight decay per parameter follows the reference's groups by name ([`super::params::decays`]).

use super::params::{decays, NamedParams};
use super::TrainError;
use serde::{Deserialize, Serialize};
use tch::Tensor;

/// AdamW hyperparameters other than the learning rate (which the schedule sets every step).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Applied to the decayed group only.
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    /// The reference's generator optimizer: betas (0.9, 0.95), eps 1e-8, weight decay 0.02.
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.02,
        }
    }
}

/// Per-parameter AdamW state, aligned with [`NamedParams`].
#[derive(Debug)]
pub struct AdamW {
    pub cfg: AdamWConfig,
    /// Weight decay of each parameter (0 for the no-decay group).
    pub weight_decay: Vec<f64>,
    /// First moments; `None` until the parameter's first gradient.
    pub exp_avg: Vec<Option<Tensor>>,
    /// Second moments; `None` until the parameter's first gradient.
    pub exp_avg_sq: Vec<Option<Tensor>>,
    /// Optimizer steps taken by each parameter (PyTorch keeps one count per parameter).
    pub steps: Vec<u64>,
}

impl AdamW {
    pub fn new(params: &NamedParams, cfg: AdamWConfig) -> Self {
        let n = params.len();
        let weight_decay = params
            .names
            .iter()
            .zip(&params.tensors)
            .map(|(name, t)| {
                if decays(name, &t.size()) {
                    cfg.weight_decay
                } else {
                    0.0
                }
            })
            .collect();
        Self {
            cfg,
            weight_decay,
            exp_avg: (0..n).map(|_| None).collect(),
            exp_avg_sq: (0..n).map(|_| None).collect(),
            steps: vec![0; n],
        }
    }

    /// One optimizer step at learning rate `lr`; `grads[i]` belongs to `params.tensors[i]`.
    pub fn step(
        &mut self,
        params: &NamedParams,
        grads: &[Option<Tensor>],
        lr: f64,
    ) -> Result<(), TrainError> {
        if grads.len() != params.len() || self.steps.len() != params.len() {
            return Err(TrainError::GradCount {
                got: grads.len(),
                want: params.len(),
            });
        }
        let _guard = tch::no_grad_guard();
        let AdamWConfig {
            beta1, beta2, eps, ..
        } = self.cfg;
        for (i, (param, grad)) in params.tensors.iter().zip(grads).enumerate() {
            let Some(grad) = grad else { continue };
            let mut param = param.shallow_clone();
            let exp_avg = self.exp_avg[i].get_or_insert_with(|| param.zeros_like());
            let exp_avg_sq = self.exp_avg_sq[i].get_or_insert_with(|| param.zeros_like());
            self.steps[i] += 1;
            let step = self.steps[i] as f64;
            let wd = self.weight_decay[i];
            if wd != 0.0 {
                let _decayed = param.g_mul_scalar_(1.0 - lr * wd);
            }
            let _m = exp_avg.lerp_(grad, 1.0 - beta1);
            // addcmul_(g, g, value=1-b2) computes self + (value*g)*g.
            let _v = exp_avg_sq.g_mul_scalar_(beta2);
            let _v = exp_avg_sq.g_add_(&(grad * (1.0 - beta2) * grad));
            let bias_correction1 = 1.0 - beta1.powf(step);
            let bias_correction2 = 1.0 - beta2.powf(step);
            let step_size = lr / bias_correction1;
            let denom = (exp_avg_sq.sqrt() / bias_correction2.sqrt()) + eps;
            // addcdiv_(m, denom, value=-step_size) computes self + (value*m)/denom.
            let _p = param.g_add_(&((&*exp_avg * -step_size) / denom));
        }
        Ok(())
    }

    /// Moments as named CPU tensors (`exp_avg.<name>`, `exp_avg_sq.<name>`) for saving.
    pub fn named_moments(&self, names: &[String]) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        for (i, name) in names.iter().enumerate() {
            if let (Some(m), Some(v)) = (&self.exp_avg[i], &self.exp_avg_sq[i]) {
                out.push((
                    format!("exp_avg.{name}"),
                    m.to_device(tch::Device::Cpu).copy(),
                ));
                out.push((
                    format!("exp_avg_sq.{name}"),
                    v.to_device(tch::Device::Cpu).copy(),
                ));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{nn, Device, Kind};

    /// AdamW written out in f64 scalars, the way the PyTorch docs state the algorithm.
    fn scalar_adamw(p: f64, grads: &[f64], lr: f64, wd: f64, c: &AdamWConfig) -> f64 {
        let (mut p, mut m, mut v) = (p, 0.0, 0.0);
        for (t, g) in grads.iter().enumerate() {
            let t = (t + 1) as f64;
            p *= 1.0 - lr * wd;
            m = c.beta1 * m + (1.0 - c.beta1) * g;
            v = c.beta2 * v + (1.0 - c.beta2) * g * g;
            let m_hat = m / (1.0 - c.beta1.powf(t));
            let v_hat = v / (1.0 - c.beta2.powf(t));
            p -= lr * m_hat / (v_hat.sqrt() + c.eps);
        }
        p
    }

    #[test]
    fn matches_the_algorithm_and_skips_parameters_without_gradients() {
        let vs = nn::VarStore::new(Device::Cpu);
        let root = vs.root();
        let w = (&root / "lin").var("weight", &[1, 2], nn::Init::Const(0.5));
        let b = (&root / "lin").var("bias", &[1], nn::Init::Const(-0.25));
        let unused = root.var("unused", &[2, 2], nn::Init::Const(1.0));
        let params = NamedParams::from_var_store(&vs).unwrap();
        let cfg = AdamWConfig::default();
        let mut opt = AdamW::new(&params, cfg);
        assert_eq!(opt.weight_decay, vec![0.02, 0.0, 0.02]);
        let lr = 0.01;
        let gw = [[0.3, -2.0], [0.1, 0.5], [-1.5, 0.02]];
        for g in &gw {
            let grads = vec![
                Some(Tensor::from_slice(&[g[0] as f32, g[1] as f32]).reshape([1, 2])),
                Some(Tensor::from_slice(&[g[1] as f32])),
                None,
            ];
            opt.step(&params, &grads, lr).unwrap();
        }
        let want0 = scalar_adamw(0.5, &gw.map(|g| g[0]), lr, 0.02, &cfg);
        let want1 = scalar_adamw(0.5, &gw.map(|g| g[1]), lr, 0.02, &cfg);
        let wantb = scalar_adamw(-0.25, &gw.map(|g| g[1]), lr, 0.0, &cfg);
        let got = w.to_kind(Kind::Double);
        assert!((got.double_value(&[0, 0]) - want0).abs() < 1e-6);
        assert!((got.double_value(&[0, 1]) - want1).abs() < 1e-6);
        assert!((b.double_value(&[0]) - wantb).abs() < 1e-6);
        assert!(unused.equal(&Tensor::ones([2, 2], (Kind::Float, Device::Cpu))));
        assert_eq!(opt.steps, vec![3, 3, 0]);
        assert_eq!(opt.named_moments(&params.names).len(), 4);
    }
}
