//! `eqim plan-memory`: the memory of one generator training step, from the config alone:
//! parameters, gradients, AdamW moments and EMA (all float32), bf16 autocast's cached weight
//! copies, and the activations autograd keeps for backward per micro-batch; the peak of a step and
//! the largest micro-batch that fits a device.
//!
//! The activation count follows the saved tensors of the forward code op by op
//! (`model/layers.rs`, `model/flow_head.rs`; see [`activation_elements_per_sample`]), in train mode
//! (dropout masks included). The peak: the float32 state (weights, AdamW moments, EMA: 16 bytes
//! per parameter) plus the larger of the activations (alive at the end of the forward) and the
//! gradients (4 bytes per parameter, alive at the end of the backward, when the activations are
//! freed); gradients appear as activations are freed, so the two do not add up.
//! Checked against the measured peak RSS on the CPU (`eqim plan-memory --measure N`,
//! `worker/tests/plan_memory.rs`, BENCHMARKS.md) and against CUDA's peak allocation by
//! `scripts/gpu-check`.

use crate::model::generator::GeneratorConfig;
use crate::precision::Precision;

/// Fraction of a device's memory the planner lets a step use; the rest is for the CUDA context,
/// cuBLAS/cuDNN workspaces and the caching allocator's fragmentation.
pub const DEVICE_MEMORY_USABLE_FRACTION: f64 = 0.9;

/// bf16 activations relative to float32: linear/matmul outputs and the bf16 copies of their
/// inputs take 2 bytes, normalisations, residual sums and the loss stay float32. An estimate,
/// measured on a GPU by `scripts/gpu-check` (the CPU test checks float32 only).
pub const BF16_ACTIVATION_FACTOR: f64 = 0.6;

/// What to plan for.
#[derive(Debug, Clone)]
pub struct PlanRequest {
    pub model: GeneratorConfig,
    /// Samples per forward/backward.
    pub micro_batch: u64,
    pub precision: Precision,
    /// Device memory in bytes, for the largest micro-batch that fits.
    pub device_memory: Option<u64>,
}

/// Bytes of each part of a training step.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct MemoryPlan {
    pub parameters: i64,
    pub micro_batch: u64,
    pub precision: Precision,
    pub weights_bytes: u64,
    pub gradients_bytes: u64,
    pub adamw_bytes: u64,
    pub ema_bytes: u64,
    /// bf16: autocast's cached bf16 copies of the weights during the forward.
    pub autocast_cache_bytes: u64,
    pub activations_per_sample_bytes: u64,
    pub activations_bytes: u64,
    /// Weights + AdamW + EMA + autocast cache + max(activations, gradients).
    pub peak_bytes: u64,
    pub device_memory_bytes: Option<u64>,
    /// Whether `peak_bytes` fits [`DEVICE_MEMORY_USABLE_FRACTION`] of the device.
    pub fits: Option<bool>,
    /// The largest micro-batch whose peak fits; 0 if not even the state fits.
    pub largest_micro_batch: Option<u64>,
}

/// Float elements autograd saves per training sample, by the forward code:
///
/// Per transformer block (per sample; `L` image tokens, `NB` class tokens, `N = NB + L`, width D):
/// - self-attention on the image tokens: norm1 output, the qkv output (kept alive through the
///   RoPE views), the rotated q and k, the attention's scaled q/k and output, the head-merge copy,
///   the dropout mask (1 byte per element) and output: 19.5 L·D together with the cross-attention
///   on the image tokens (cross_norm input and output, q, rotated q, scaled q, output, merge copy,
///   dropout) and the residual sums;
/// - cross-attention on the class tokens: cross_cond_norm output, k and v, scaled k: 4 NB·D;
/// - the MLP on all N tokens: the concatenated input, norm2 output, fc1 output (4D), GELU
///   output (4D), dropout mask (1 byte per 4D element) and output (4D), fc2 dropout mask and
///   output, and the block output: 17.25 N·D.
///
/// Around the blocks: z_proj output, the concatenated and normed sequence, encoder_norm output and
/// the narrowed copy: (2L + 3N)·D. The flow head runs on `R = diffusion_batch_mul · L` rows of
/// width W: per residual block 11 W (silu(y), the 3W adaLN output kept alive by the gate view,
/// 1 + scale, in_ln output, the modulated input, mlp0 output, its SiLU, mlp2 output, the block
/// output); outside them 10 W (input_proj, time MLP, cond_embed, y, final layer), the repeated
/// condition D, the frequency embedding 256 and 6 C of targets, noise and loss terms.
pub fn activation_elements_per_sample(cfg: &GeneratorConfig) -> f64 {
    let l = cfg.token_num as f64;
    let nb = cfg.buffer_size as f64;
    let n = nb + l;
    let d = cfg.encoder_embed_dim as f64;
    let hidden_ratio = cfg.mlp_hidden() as f64 / d;
    // The MLP's 4D terms scale with the hidden width: 1 + 1 + 3.25·(hidden/D) + 1.25 + 1 over N·D.
    let mlp = 1.0 + 1.0 + 3.25 * hidden_ratio + 1.25 + 1.0;
    let block = (19.5 * l + 4.0 * nb + mlp * n) * d;
    let encoder = cfg.num_blocks() as f64 * block + (2.0 * l + 3.0 * n) * d;
    let rows = cfg.diffusion_batch_mul as f64 * l;
    let w = cfg.diffloss_w as f64;
    let c = cfg.vae_embed_dim as f64;
    let head = rows * (cfg.diffloss_d as f64 * 11.0 * w + 10.0 * w + d + 256.0 + 6.0 * c);
    encoder + head
}

fn bytes_per_sample(cfg: &GeneratorConfig, precision: Precision) -> u64 {
    let fp32 = activation_elements_per_sample(cfg) * 4.0;
    let bytes = match precision {
        Precision::Fp32 => fp32,
        Precision::Bf16 => fp32 * BF16_ACTIVATION_FACTOR,
    };
    bytes.round() as u64
}

/// The plan of `req`.
pub fn plan(req: &PlanRequest) -> MemoryPlan {
    let cfg = &req.model;
    let p = cfg.parameter_count().max(0) as u64;
    let weights = 4 * p;
    let gradients = 4 * p;
    let adamw = 8 * p;
    let ema = 4 * p;
    let autocast_cache = match req.precision {
        Precision::Fp32 => 0,
        Precision::Bf16 => 2 * p,
    };
    let per_sample = bytes_per_sample(cfg, req.precision);
    let state = weights + adamw + ema + autocast_cache;
    let peak_at = |batch: u64| state + (per_sample * batch).max(gradients);
    let activations = per_sample * req.micro_batch;
    let peak = peak_at(req.micro_batch);
    let (fits, largest) = match req.device_memory {
        Some(mem) => {
            let usable = (mem as f64 * DEVICE_MEMORY_USABLE_FRACTION) as u64;
            let largest = if state + gradients > usable || per_sample == 0 {
                0
            } else {
                (usable - state) / per_sample
            };
            (Some(peak <= usable), Some(largest))
        }
        None => (None, None),
    };
    MemoryPlan {
        parameters: cfg.parameter_count(),
        micro_batch: req.micro_batch,
        precision: req.precision,
        weights_bytes: weights,
        gradients_bytes: gradients,
        adamw_bytes: adamw,
        ema_bytes: ema,
        autocast_cache_bytes: autocast_cache,
        activations_per_sample_bytes: per_sample,
        activations_bytes: activations,
        peak_bytes: peak,
        device_memory_bytes: req.device_memory,
        fits,
        largest_micro_batch: largest,
    }
}

fn gib(bytes: u64) -> String {
    let g = bytes as f64 / (1u64 << 30) as f64;
    if g >= 1.0 {
        format!("{g:.2} GiB")
    } else {
        format!("{:.1} MiB", bytes as f64 / (1u64 << 20) as f64)
    }
}

/// The plan as the table `eqim plan-memory` prints.
pub fn render(name: &str, plan: &MemoryPlan) -> String {
    let mut out = format!(
        "{name}: {} parameters, micro-batch {}, {}\n",
        plan.parameters, plan.micro_batch, plan.precision
    );
    let rows = [
        ("weights (fp32)", plan.weights_bytes),
        ("gradients (fp32)", plan.gradients_bytes),
        ("AdamW moments (fp32)", plan.adamw_bytes),
        ("EMA (fp32)", plan.ema_bytes),
        ("autocast weight cache (bf16)", plan.autocast_cache_bytes),
        ("activations per sample", plan.activations_per_sample_bytes),
        ("activations of the micro-batch", plan.activations_bytes),
        ("peak of a step", plan.peak_bytes),
    ];
    for (what, bytes) in rows {
        out.push_str(&format!("  {what:<32} {:>12}\n", gib(bytes)));
    }
    if let (Some(mem), Some(fits), Some(largest)) = (
        plan.device_memory_bytes,
        plan.fits,
        plan.largest_micro_batch,
    ) {
        out.push_str(&format!(
            "  device memory {} ({:.0} % usable): micro-batch {} {}; largest micro-batch that fits: {largest}\n",
            gib(mem),
            DEVICE_MEMORY_USABLE_FRACTION * 100.0,
            plan.micro_batch,
            if fits { "fits" } else { "does NOT fit" },
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(model: GeneratorConfig, micro_batch: u64, precision: Precision) -> PlanRequest {
        PlanRequest {
            model,
            micro_batch,
            precision,
            device_memory: Some(80 << 30),
        }
    }

    #[test]
    fn state_is_twenty_bytes_per_parameter_in_fp32() {
        let p = plan(&request(GeneratorConfig::base(), 1, Precision::Fp32));
        let n = 295_586_560u64;
        assert_eq!(p.parameters as u64, n);
        assert_eq!(
            p.weights_bytes + p.gradients_bytes + p.adamw_bytes + p.ema_bytes,
            20 * n
        );
        assert_eq!(p.autocast_cache_bytes, 0);
    }

    #[test]
    fn activations_grow_linearly_and_bf16_needs_less() {
        let a = plan(&request(GeneratorConfig::small(), 8, Precision::Fp32));
        let b = plan(&request(GeneratorConfig::small(), 16, Precision::Fp32));
        assert_eq!(b.activations_bytes, 2 * a.activations_bytes);
        let h = plan(&request(GeneratorConfig::small(), 16, Precision::Bf16));
        assert!(h.activations_bytes < b.activations_bytes);
        assert_eq!(h.autocast_cache_bytes, 2 * h.parameters as u64);
    }

    #[test]
    fn largest_micro_batch_fits_and_one_more_does_not() {
        for (cfg, precision) in [
            (GeneratorConfig::base(), Precision::Fp32),
            (GeneratorConfig::large(), Precision::Bf16),
            (GeneratorConfig::huge(), Precision::Fp32),
        ] {
            let p = plan(&request(cfg.clone(), 1, precision));
            let largest = p.largest_micro_batch.unwrap();
            assert!(largest > 0);
            assert_eq!(
                plan(&request(cfg.clone(), largest, precision)).fits,
                Some(true)
            );
            assert_eq!(
                plan(&request(cfg, largest + 1, precision)).fits,
                Some(false)
            );
        }
    }

    #[test]
    fn a_device_smaller_than_the_state_fits_no_batch() {
        let mut r = request(GeneratorConfig::huge(), 1, Precision::Fp32);
        r.device_memory = Some(8 << 30); // 1.2B parameters need 24 GB of state alone
        let p = plan(&r);
        assert_eq!(p.largest_micro_batch, Some(0));
        assert_eq!(p.fits, Some(false));
    }
}
