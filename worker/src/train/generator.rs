//! The generator as a [`TrainModel`]: the reference's training forward (`model(x, labels)` in
//! train mode: label drop, RoPE shift, dropout, the 4x tiled diffusion batch, flow noise and t
//! drawn on the model's device), on latents already scaled by `vae_norm`.

use super::rng;
use super::source::Batch;
use super::trainer::TrainModel;
use crate::model::generator::{EquivariantGenerativeModel, GeneratorConfig, Mode};
use anyhow::{Context, Result};
use tch::{nn, Device, Tensor};

pub struct GeneratorTrainModel {
    pub vs: nn::VarStore,
    pub model: EquivariantGenerativeModel,
}

impl GeneratorTrainModel {
    /// Builds the generator with the reference's initialisation, its draws seeded from `seed`
    /// (a stream of its own, [`rng::INIT_STEP`]).
    pub fn new(cfg: &GeneratorConfig, device: Device, seed: u64) -> Result<Self> {
        rng::seeded(seed, rng::INIT_STEP, 0, || {
            let vs = nn::VarStore::new(device);
            let model = EquivariantGenerativeModel::new(vs.root(), cfg)
                .context("building the generator")?;
            Ok(Self { vs, model })
        })
    }
}

impl TrainModel for GeneratorTrainModel {
    fn var_store(&self) -> &nn::VarStore {
        &self.vs
    }

    fn loss(&self, batch: &Batch) -> Result<Tensor> {
        let out = self
            .model
            .forward_loss(&batch.latents, &batch.labels, None, Mode::Train)?;
        Ok(out.loss)
    }
}
