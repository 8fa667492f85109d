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
}

/// A small multi-layer perceptron regressing a fixed teacher function on synthetic samples, with
/// SGD + momentum. Sample `i` is a pure function of `i`, so every process sees the same data.
pub struct SyntheticMlp {
    vs: VarStore,
    net: nn::Sequential,
    momentum: Vec<(String, Tensor)>,
    lr: f64,
    beta: f64,
}

/// Input features of a synthetic sample.
pub const SYNTHETIC_FEATURES: i64 = 8;
const HIDDEN: i64 = 32;

/// splitmix64: a well-mixed, seedless hash so sample features depend only on the index.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Features of sample `index`, uniform in [-1, 1).
pub fn synthetic_features(index: u64) -> Vec<f32> {
    (0..SYNTHETIC_FEATURES as u64)
        .map(|j| {
            let bits = mix(index.wrapping_mul(1_000_003).wrapping_add(j)) >> 40;
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
        let (x, y) = Self::batch(indices);
        let per_sample = (self.net.forward(&x) - y).square().sum_dim_intlist(
            [1i64].as_slice(),
            false,
            Kind::Float,
        );
        let loss_sum = per_sample.sum(Kind::Float);
        (&loss_sum / step_samples as f64).backward();
        loss_sum.f_double_value(&[]).context("reading the loss")
    }

    fn apply_step(&mut self) -> Result<()> {
        let _no_grad = tch::no_grad_guard();
        for ((name, mut var), (_, m)) in sorted_vars(&self.vs).into_iter().zip(&self.momentum) {
            let grad = var.grad();
            anyhow::ensure!(
                grad.defined(),
                "no gradient for {name} at the optimizer step"
            );
            let mut m = m.shallow_clone();
            let _ = m.f_mul_scalar_(self.beta)?.f_add_(&grad)?;
            let _ = var.f_sub_(&(&m * self.lr))?;
        }
        Ok(())
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

    #[test]
    fn accumulation_over_micro_batches_equals_one_batch() {
        let mut a = SyntheticMlp::new(1, 0.1);
        let mut b = SyntheticMlp::new(1, 0.1);
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
