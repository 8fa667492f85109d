//! `GaussianDistribution`: the posterior with a fixed (not learned) std. The encoder predicts only
//! the mean; `sample` adds isotropic noise with a random per-image scale.
//! Upstream: https://github.com/drx-code/EquivariantModeling/blob/main/tokenizer/modules/distributions/distributions.py

use tch::{Device, Kind, Tensor};

#[derive(Debug)]
pub struct GaussianDistribution {
    pub mean: Tensor,
    pub std: f64,
}

impl GaussianDistribution {
    pub fn new(mean: Tensor, std: f64) -> Self {
        Self { mean, std }
    }

    pub fn mode(&self) -> Tensor {
        self.mean.shallow_clone()
    }

    /// The reference's `sample()`: per image `s = clamp(randn * std/0.8, -std, std)`, then
    /// `mean + s * randn(mean.shape)`. Both draws come from the CPU generator (seed it with
    /// `tch::manual_seed`) in this order, then move to the mean's device, as the reference does.
    pub fn sample(&self) -> Tensor {
        let size = self.mean.size();
        let scale = (Tensor::randn([size[0]], (Kind::Float, Device::Cpu)) * (self.std / 0.8))
            .clamp(-self.std, self.std);
        let mut shape = vec![size[0]];
        shape.resize(size.len(), 1);
        let noise = Tensor::randn(size.as_slice(), (Kind::Float, Device::Cpu));
        let device = self.mean.device();
        &self.mean + scale.view(shape.as_slice()).to_device(device) * noise.to_device(device)
    }

    /// `sample(sampling_std=s)`: a fixed noise scale for every image.
    pub fn sample_with_std(&self, sampling_std: f64) -> Tensor {
        let noise = Tensor::randn(self.mean.size().as_slice(), (Kind::Float, Device::Cpu));
        &self.mean + noise.to_device(self.mean.device()) * sampling_std
    }

    /// KL to N(0, 1) without the constant variance term: 0.5 * sum of mean^2 per image.
    pub fn kl(&self) -> Tensor {
        self.mean
            .pow_tensor_scalar(2)
            .sum_dim_intlist([1i64, 2].as_slice(), false, Kind::Float)
            * 0.5
    }
}
