//! The generator as a [`TrainModel`]: the reference's training forward (`model(x, labels)` in
//! train mode: label drop, RoPE shift, dropout, the 4x tiled diffusion batch, flow noise and t
//! drawn on the model's device). Latents from a cache of posterior means first go through
//! [`LatentPrep`]: the reference's `posterior.sample() * vae_norm`.

use super::rng;
use super::source::Batch;
use super::trainer::TrainModel;
use crate::model::generator::{EquivariantGenerativeModel, GeneratorConfig, Mode};
use anyhow::{Context, Result};
use tch::{nn, Device, Kind, Tensor};

/// The reference's latent sampling before the generator (§2.6, §3): per image
/// `s = clamp(randn() * std / 0.8, -std, std)`, `z = mean + s * randn(mean.shape)` (both on the
/// CPU generator), then `z * vae_norm`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LatentPrep {
    pub vae_norm: f64,
    /// The posterior's noise bound (2.5 in the reference); `None` for latents used as given.
    pub posterior_std: Option<f64>,
}

impl LatentPrep {
    /// Latents used exactly as the source gives them.
    pub const IDENTITY: LatentPrep = LatentPrep {
        vae_norm: 1.0,
        posterior_std: None,
    };

    pub fn apply(&self, mean: &Tensor) -> Tensor {
        let z = match self.posterior_std {
            Some(std) => {
                let b = mean.size()[0];
                let scale = (Tensor::randn([b], (Kind::Float, Device::Cpu)) * (std / 0.8))
                    .clamp(-std, std)
                    .to_device(mean.device());
                let noise =
                    Tensor::randn(mean.size(), (Kind::Float, Device::Cpu)).to_device(mean.device());
                let shape: Vec<i64> = std::iter::once(b)
                    .chain(std::iter::repeat_n(1, mean.dim() - 1))
                    .collect();
                mean + scale.view(shape.as_slice()) * noise
            }
            None => mean.shallow_clone(),
        };
        if self.vae_norm == 1.0 {
            z
        } else {
            z * self.vae_norm
        }
    }
}

pub struct GeneratorTrainModel {
    pub vs: nn::VarStore,
    pub model: EquivariantGenerativeModel,
    pub prep: LatentPrep,
}

impl GeneratorTrainModel {
    /// Builds the generator with the reference's initialisation, its draws seeded from `seed`
    /// (a stream of its own, [`rng::INIT_STEP`]).
    pub fn new(cfg: &GeneratorConfig, device: Device, seed: u64) -> Result<Self> {
        rng::seeded(seed, rng::INIT_STEP, 0, || {
            let vs = nn::VarStore::new(device);
            let model = EquivariantGenerativeModel::new(vs.root(), cfg)
                .context("building the generator")?;
            Ok(Self {
                vs,
                model,
                prep: LatentPrep::IDENTITY,
            })
        })
    }

    pub fn with_prep(mut self, prep: LatentPrep) -> Self {
        self.prep = prep;
        self
    }
}

impl TrainModel for GeneratorTrainModel {
    fn var_store(&self) -> &nn::VarStore {
        &self.vs
    }

    fn loss(&self, batch: &Batch) -> Result<Tensor> {
        let x = tch::no_grad(|| self.prep.apply(&batch.latents));
        let out = self
            .model
            .forward_loss(&x, &batch.labels, None, Mode::Train)?;
        Ok(out.loss)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn posterior_noise_has_one_bounded_scale_per_image() {
        let mean = Tensor::zeros([64, 4, 8], (Kind::Float, Device::Cpu));
        let prep = LatentPrep {
            vae_norm: 0.5,
            posterior_std: Some(2.5),
        };
        let z = prep.apply(&mean);
        // Per image: std of the noise = |s| * 0.5 <= 1.25; many images hit the bound.
        let per_image = z.flatten(1, -1).std_dim(1, true, false);
        let max = per_image.max().double_value(&[]);
        assert!(max < 1.25 * 1.6 && max > 0.5, "{max}");
        assert!(per_image.min().double_value(&[]) < max);
        let given = Tensor::ones([2, 3], (Kind::Float, Device::Cpu));
        assert!(LatentPrep::IDENTITY.apply(&given).equal(&given));
    }
}
