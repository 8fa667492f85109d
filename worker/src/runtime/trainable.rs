//! What the distributed runtime needs from a model: accumulate gradients over assigned samples,
//! apply an update only when the coordinator commits the step, and expose the full training state
//! (weights and optimizer moments) so a newcomer can be synchronised by broadcast. The synthetic
//! MLP here lets the whole protocol be tested in seconds; the generator plugs in as another impl.

use anyhow::{Context, Result};
use tch::nn::{self, Module, VarStore};
use tch::{Device, Kind, Tensor};

/// A model plus optimizer as the runtime drives it, one step at a time.
pub trait Trainable {
    /// The accumulated gradients, in the same order on every rank: all-reduced in place
    /// (summed) between [`Trainable::accumulate_grads`] and [`Trainable::apply_step`]. A model
    /// that keeps gradients in its own accumulator returns those tensors.
    fn gradients(&self) -> Vec<Tensor>;
    /// The leaf tensors whose gradients [`Trainable::gradients`] returns, aligned with them: the
    /// data-parallel all-reduce hooks them to reduce gradient buckets while backward still runs.
    /// Empty (the default) reduces after backward.
    fn parameters(&self) -> Vec<Tensor> {
        Vec::new()
    }
    /// Sets every gradient to zero (defining it if needed), so a rank with no samples in a step
    /// still all-reduces well-formed zeros.
    fn zero_grads(&mut self) -> Result<()>;
    /// Called before the micro-batches of each step with the step's position, for models whose
    /// random draws or learning rate depend on it.
    fn begin_step(&mut self, _step: u64, _epoch: u64) -> Result<()> {
        Ok(())
    }
    /// Forward and backward over one micro-batch of sample `indices`, adding the gradient of
    /// `sum(per-sample loss) / step_samples` to the accumulated gradients. Returns the summed loss.
    fn accumulate_grads(&mut self, indices: &[u64], step_samples: u64) -> Result<f64>;
    /// Applies the (all-reduced) gradients: one optimizer step.
    fn apply_step(&mut self) -> Result<()>;
    /// Every tensor of the training state (weights, optimizer moments), named, in a fixed order
    /// that is identical on every rank. Broadcast to newcomers and saved in checkpoints.
    fn state_tensors(&self) -> Vec<(String, Tensor)>;
    /// Writes the trained model for use outside training (e.g. sampling) into `dir`, at the end
    /// of the job on the writer rank; returns the files written. Models with no such form write
    /// nothing.
    fn export(&self, _dir: &std::path::Path) -> Result<Vec<std::path::PathBuf>> {
        Ok(Vec::new())
    }
    /// Learning rate, gradient norm and EMA lag of the last [`Trainable::apply_step`], for the
    /// metrics; `None` before the first update or for a model that cannot tell.
    fn last_update(&self) -> Option<crate::metrics::UpdateReport> {
        None
    }
    /// Time spent in [`Trainable::accumulate_grads`] since the last call that was not the
    /// forward/backward pass: reading and preparing data, and the forward pass when the model
    /// times it apart from the backward. Zero for what the model does not time.
    fn take_phase_times(&mut self) -> PhaseTimes {
        PhaseTimes::default()
    }
}

/// Parts of [`Trainable::accumulate_grads`] a model timed (see [`Trainable::take_phase_times`]).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct PhaseTimes {
    pub data_wait: std::time::Duration,
    pub forward: std::time::Duration,
}

/// A small multi-layer perceptron regressing a fixed teacher function on synthetic samples, with
/// SGD + momentum. Sample `i` is a pure function of `i`, so every process sees the same data.
pub struct SyntheticMlp {
    vs: VarStore,
    net: nn::Sequential,
    momentum: Vec<(String, Tensor)>,
    lr: f64,
    beta: f64,
    /// Gradient norm of the last update (`None` before the first).
    last_grad_norm: Option<f64>,
    phase_times: PhaseTimes,
}

/// Input features of a synthetic sample.
pub const SYNTHETIC_FEATURES: i64 = 8;
const HIDDEN: i64 = 32;

/// Features of sample `index`, uniform in [-1, 1).
pub fn synthetic_features(index: u64) -> Vec<f32> {
    (0..SYNTHETIC_FEATURES as u64)
        .map(|j| {
            let bits = eqim_common::seed::mix(index.wrapping_mul(1_000_003).wrapping_add(j)) >> 40;
            (bits as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// The teacher: a fixed smooth function of the features.
fn synthetic_target(features: &[f32]) -> f32 {
    let weighted: f32 = features
        .iter()
        .enumerate()
        .map(|(j, x)| x * (j as f32 + 1.0) / SYNTHETIC_FEATURES as f32)
        .sum();
    weighted.sin() + 0.5 * features[0] * features[1]
}

impl SyntheticMlp {
    /// Builds the model with weights drawn from `seed` (identical on every rank).
    pub fn new(seed: i64, lr: f64) -> Self {
        tch::manual_seed(seed);
        let vs = VarStore::new(Device::Cpu);
        let root = vs.root();
        let net = nn::seq()
            .add(nn::linear(
                &root / "fc1",
                SYNTHETIC_FEATURES,
                HIDDEN,
                Default::default(),
            ))
            .add_fn(|x| x.tanh())
            .add(nn::linear(&root / "fc2", HIDDEN, 1, Default::default()));
        let momentum = sorted_vars(&vs)
            .into_iter()
            .map(|(name, t)| (format!("momentum.{name}"), t.zeros_like()))
            .collect();
        Self {
            vs,
            net,
            momentum,
            lr,
            beta: 0.9,
            last_grad_norm: None,
            phase_times: PhaseTimes::default(),
        }
    }

    fn batch(indices: &[u64]) -> (Tensor, Tensor) {
        let mut xs = Vec::with_capacity(indices.len() * SYNTHETIC_FEATURES as usize);
        let mut ys = Vec::with_capacity(indices.len());
        for &i in indices {
            let f = synthetic_features(i);
            ys.push(synthetic_target(&f));
            xs.extend(f);
        }
        let n = indices.len() as i64;
        (
            Tensor::from_slice(&xs).view([n, SYNTHETIC_FEATURES]),
            Tensor::from_slice(&ys).view([n, 1]),
        )
    }
}

fn sorted_vars(vs: &VarStore) -> Vec<(String, Tensor)> {
    let mut named: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    named
}

impl Trainable for SyntheticMlp {
    fn parameters(&self) -> Vec<Tensor> {
        sorted_vars(&self.vs).into_iter().map(|(_, v)| v).collect()
    }

    fn gradients(&self) -> Vec<Tensor> {
        sorted_vars(&self.vs)
            .into_iter()
            .map(|(_, var)| var.grad())
            .collect()
    }

    fn zero_grads(&mut self) -> Result<()> {
        for (name, var) in sorted_vars(&self.vs) {
            let mut grad = var.grad();
            if grad.defined() {
                let _ = grad
                    .f_zero_()
                    .with_context(|| format!("zeroing the gradient of {name}"))?;
            } else {
                // A zero-weighted backward defines the gradient as zeros of the right shape.
                (&var * 0.0).sum(Kind::Float).backward();
            }
        }
        Ok(())
    }

    fn accumulate_grads(&mut self, indices: &[u64], step_samples: u64) -> Result<f64> {
        if indices.is_empty() {
            return Ok(0.0);
        }
        anyhow::ensure!(step_samples > 0, "a step with samples has step_samples 0");
        let started = std::time::Instant::now();
        let (x, y) = Self::batch(indices);
        let data_ready = std::time::Instant::now();
        let per_sample = (self.net.forward(&x) - y).square().sum_dim_intlist(
            [1i64].as_slice(),
            false,
            Kind::Float,
        );
        let loss_sum = per_sample.sum(Kind::Float);
        // CPU tensors: the forward has run when the call returns.
        self.phase_times.data_wait += data_ready - started;
        self.phase_times.forward += data_ready.elapsed();
        (&loss_sum / step_samples as f64).backward();
        loss_sum.f_double_value(&[]).context("reading the loss")
    }

    fn apply_step(&mut self) -> Result<()> {
        let _no_grad = tch::no_grad_guard();
        let mut squared_norm = 0.0;
        for ((name, mut var), (_, m)) in sorted_vars(&self.vs).into_iter().zip(&self.momentum) {
            let grad = var.grad();
            anyhow::ensure!(
                grad.defined(),
                "no gradient for {name} at the optimizer step"
            );
            squared_norm += grad
                .square()
                .sum(Kind::Double)
                .f_double_value(&[])
                .with_context(|| format!("reading the gradient norm of {name}"))?;
            let mut m = m.shallow_clone();
            let _ = m.f_mul_scalar_(self.beta)?.f_add_(&grad)?;
            let _ = var.f_sub_(&(&m * self.lr))?;
        }
        self.last_grad_norm = Some(squared_norm.sqrt());
        Ok(())
    }

    fn last_update(&self) -> Option<crate::metrics::UpdateReport> {
        self.last_grad_norm
            .map(|grad_norm| crate::metrics::UpdateReport {
                learning_rate: self.lr,
                grad_norm,
                // Plain SGD with momentum: there are no EMA weights to lag.
                ema_lag_steps: None,
            })
    }

    fn take_phase_times(&mut self) -> PhaseTimes {
        std::mem::take(&mut self.phase_times)
    }

    fn state_tensors(&self) -> Vec<(String, Tensor)> {
        let mut state = sorted_vars(&self.vs);
        state.extend(
            self.momentum
                .iter()
                .map(|(n, t)| (n.clone(), t.shallow_clone())),
        );
        state
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn synthetic_samples_are_functions_of_the_index() {
        assert_eq!(synthetic_features(7), synthetic_features(7));
        assert_ne!(synthetic_features(7), synthetic_features(8));
        assert!(synthetic_features(3)
            .iter()
            .all(|x| (-1.0..1.0).contains(x)));
    }

    /// `SyntheticMlp::new` seeds libtorch's global generator: tests that build models in
    /// parallel would draw each other's weights.
    static MODEL_INIT: std::sync::Mutex<()> = std::sync::Mutex::new(());

    fn model(seed: i64, lr: f64) -> SyntheticMlp {
        let _one_at_a_time = MODEL_INIT.lock().unwrap_or_else(|e| e.into_inner());
        SyntheticMlp::new(seed, lr)
    }

    #[test]
    fn an_update_reports_the_lr_and_the_norm_of_the_gradient_it_applied() {
        let mut m = model(2, 0.05);
        assert_eq!(m.last_update(), None);
        m.zero_grads().expect("zero");
        m.accumulate_grads(&[0, 1, 2], 3).expect("grads");
        let expected = m
            .gradients()
            .iter()
            .map(|g| g.square().sum(Kind::Double).double_value(&[]))
            .sum::<f64>()
            .sqrt();
        let times = m.take_phase_times();
        assert!(times.forward > std::time::Duration::ZERO);
        assert_eq!(m.take_phase_times(), PhaseTimes::default(), "taken once");
        m.apply_step().expect("step");
        let update = m.last_update().expect("an update happened");
        assert_eq!(update.learning_rate, 0.05);
        assert!(expected > 0.0 && (update.grad_norm - expected).abs() < 1e-9 * expected.max(1.0));
        assert_eq!(update.ema_lag_steps, None);
    }

    #[test]
    fn accumulation_over_micro_batches_equals_one_batch() {
        let mut a = model(1, 0.1);
        let mut b = model(1, 0.1);
        a.zero_grads().expect("zero");
        b.zero_grads().expect("zero");
        a.accumulate_grads(&[0, 1, 2, 3], 4).expect("a");
        b.accumulate_grads(&[0, 1], 4).expect("b1");
        b.accumulate_grads(&[2, 3], 4).expect("b2");
        a.apply_step().expect("step a");
        b.apply_step().expect("step b");
        for ((name, ta), (_, tb)) in a.state_tensors().iter().zip(b.state_tensors()) {
            let diff = (ta - tb).abs().max().double_value(&[]);
            assert!(diff < 1e-6, "{name} differs by {diff}");
        }
    }
}
