//! Where training batches come from: a [`BatchSource`] serves samples by index; which indices a
//! step takes is the data schedule's business (`eqim_common::schedule`, the same for one process
//! and for a cluster), so a source needs no loader state to resume.
//!
//! [`SyntheticLatents`] generates smooth per-class token patterns for tests and demos without a
//! tokenizer or a dataset; [`CachedLatents`] serves a latent cache written by
//! [`crate::data::LatentCacheWriter`], each row in a horizontal flip drawn per (seed, epoch, row).

use crate::data::LatentCache;
use anyhow::{ensure, Result};
use eqim_common::seed::{derive_seed, stream, SplitMix64};
use tch::{Device, Kind, Tensor};

/// One (micro-)batch: latents `[B, L, C]` (already scaled by `vae_norm`) and labels `[B]` (i64).
#[derive(Debug)]
pub struct Batch {
    pub latents: Tensor,
    pub labels: Tensor,
}

impl Batch {
    pub fn rows(&self) -> i64 {
        self.labels.size()[0]
    }

    pub fn to_device(&self, device: Device) -> Batch {
        Batch {
            latents: self.latents.to_device(device),
            labels: self.labels.to_device(device),
        }
    }

    /// Rows `start .. start + len`.
    pub fn narrow(&self, start: i64, len: i64) -> Batch {
        Batch {
            latents: self.latents.narrow(0, start, len),
            labels: self.labels.narrow(0, start, len),
        }
    }
}

/// A dataset of training samples addressed by index.
pub trait BatchSource {
    /// Number of samples.
    fn len(&self) -> u64;

    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The samples at `indices`, in that order, on the CPU, with the augmentation of `epoch`
    /// (a pure function of the source's seed, the epoch and the index).
    fn fetch(&mut self, epoch: u64, indices: &[u64]) -> Result<Batch>;
}

/// A latent cache (both flips of every image) as a batch source: each epoch draws every row's
/// flip with p = 0.5, the cached counterpart of the reference's `RandomHorizontalFlip`.
#[derive(Debug)]
pub struct CachedLatents {
    pub cache: LatentCache,
    pub seed: u64,
}

impl BatchSource for CachedLatents {
    fn len(&self) -> u64 {
        self.cache.len() as u64
    }

    fn fetch(&mut self, epoch: u64, indices: &[u64]) -> Result<Batch> {
        let rows: Vec<usize> = indices.iter().map(|&i| i as usize).collect();
        let flip_seed = derive_seed(self.seed, stream::LATENT_FLIPS, epoch);
        let (latents, labels) = self.cache.batch_for_seed(&rows, flip_seed)?;
        Ok(Batch { latents, labels })
    }
}

/// Smooth per-class patterns over the token and channel axes, plus a little per-sample noise:
/// sample `i` has label `i % classes`; everything is a function of (seed, i).
#[derive(Debug, Clone)]
pub struct SyntheticLatents {
    pub samples: u64,
    pub classes: i64,
    pub tokens: i64,
    pub channels: i64,
    /// Amplitude of the uniform per-element noise added to the class pattern.
    pub noise: f64,
    pub seed: u64,
}

impl SyntheticLatents {
    fn sample(&self, index: u64, out: &mut Vec<f32>) {
        let class = (index % self.classes as u64) as f64;
        let mut rng = SplitMix64::new(derive_seed(self.seed, index, 0));
        for j in 0..self.tokens {
            let pos = j as f64 / self.tokens as f64;
            for k in 0..self.channels {
                let freq = 1.0 + (class + k as f64) % 3.0;
                let phase = 0.7 * class + 0.3 * k as f64;
                let pattern = (std::f64::consts::TAU * freq * pos + phase).sin();
                let u = rng.unit_f64();
                out.push((pattern + self.noise * (2.0 * u - 1.0)) as f32);
            }
        }
    }
}

impl BatchSource for SyntheticLatents {
    fn len(&self) -> u64 {
        self.samples
    }

    fn fetch(&mut self, _epoch: u64, indices: &[u64]) -> Result<Batch> {
        let per = (self.tokens * self.channels) as usize;
        let mut data = Vec::with_capacity(indices.len() * per);
        let mut labels = Vec::with_capacity(indices.len());
        for &i in indices {
            ensure!(
                i < self.samples,
                "synthetic sample {i} out of range 0..{}",
                self.samples
            );
            self.sample(i, &mut data);
            labels.push((i % self.classes as u64) as i64);
        }
        let b = indices.len() as i64;
        Ok(Batch {
            latents: Tensor::from_slice(&data).reshape([b, self.tokens, self.channels]),
            labels: Tensor::from_slice(&labels).to_kind(Kind::Int64),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn synthetic_samples_are_deterministic_and_class_shaped() {
        let mut src = SyntheticLatents {
            samples: 20,
            classes: 4,
            tokens: 8,
            channels: 3,
            noise: 0.1,
            seed: 3,
        };
        let b = src.fetch(0, &[5, 1, 9]).unwrap();
        assert_eq!(b.latents.size(), vec![3, 8, 3]);
        assert_eq!(Vec::<i64>::try_from(&b.labels).unwrap(), vec![1, 1, 1]);
        let again = src.fetch(3, &[5]).unwrap();
        assert!(again.latents.get(0).equal(&b.latents.get(0)));
        // Same class, different noise: close but not equal.
        let d = (b.latents.get(0) - b.latents.get(1))
            .abs()
            .max()
            .double_value(&[]);
        assert!(d > 0.0 && d <= 0.2 + 1e-6, "{d}");
        assert!(src.fetch(0, &[20]).is_err());
    }
}
