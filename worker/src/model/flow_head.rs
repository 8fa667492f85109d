//! The per-token rectified-flow head (`DiffLoss` / `SimpleMLPAdaLN`): a DiT-style AdaLN MLP that
//! predicts the velocity of a noisy token given the transformer output, plus the rectified-flow
//! training target (t = 0 is data, t = 1 is noise).
//!
//! Upstream: <https://github.com/drx-code/EquivariantModeling/blob/main/generator/diffloss.py> and
//! `diffusion/flows.py` (`RectifiedFlow.get_train_tuple`).

use super::layers::{LayerNorm, Linear};
use tch::{nn, Device, Kind, Tensor};

/// Width of the sinusoidal timestep features.
pub const FREQUENCY_EMBEDDING_SIZE: i64 = 256;
/// The lower clamp of the training t: `t * (1 - eps) + eps`.
pub const TRAIN_T_EPS: f64 = 1e-5;

/// Frequencies of the timestep embedding, `exp(-ln(10000) * arange(half) / half)`, computed on the
/// CPU in f32 in the reference's op order and moved to `device`.
pub fn timestep_frequencies(dim: i64, device: Device) -> Tensor {
    let half = dim / 2;
    let ar = Tensor::arange(half, (Kind::Float, Device::Cpu));
    ((ar * -(10000f64.ln())) / half as f64)
        .exp()
        .to_device(device)
}

/// Sinusoidal embedding of `t` `[N]` (in [0, 1], unscaled), **cos first**: `[N, 2 * half]`.
pub fn timestep_embedding(t: &Tensor, freqs: &Tensor) -> Tensor {
    let args = t.unsqueeze(1).to_kind(Kind::Float) * freqs.unsqueeze(0); // [N, half]
    Tensor::cat(&[args.cos(), args.sin()], -1)
}

fn silu_linear(xs: &Tensor, linear: &Linear) -> Tensor {
    xs.silu().apply(linear)
}

/// `TimestepEmbedder`: sinusoidal features -> Linear -> SiLU -> Linear.
#[derive(Debug)]
pub struct TimestepEmbedder {
    pub mlp0: Linear,
    pub mlp2: Linear,
    pub freqs: Tensor,
}

impl TimestepEmbedder {
    pub fn new(p: nn::Path, hidden: i64) -> Self {
        let normal = || nn::Init::Randn {
            mean: 0.0,
            stdev: 0.02,
        };
        let mlp = &p / "mlp";
        Self {
            mlp0: Linear::with_init(&mlp / 0, FREQUENCY_EMBEDDING_SIZE, hidden, normal()),
            mlp2: Linear::with_init(&mlp / 2, hidden, hidden, normal()),
            freqs: timestep_frequencies(FREQUENCY_EMBEDDING_SIZE, p.device()),
        }
    }

    pub fn forward(&self, t: &Tensor) -> Tensor {
        let emb = timestep_embedding(t, &self.freqs);
        silu_linear(&emb.apply(&self.mlp0), &self.mlp2)
    }
}

/// `ResBlock`: AdaLN-modulated MLP with a gated residual.
#[derive(Debug)]
pub struct ResBlock {
    pub in_ln: LayerNorm,
    pub mlp0: Linear,
    pub mlp2: Linear,
    pub ada_ln_modulation: Linear,
}

impl ResBlock {
    pub fn new(p: nn::Path, channels: i64) -> Self {
        Self {
            in_ln: LayerNorm::new(&p / "in_ln", channels, 1e-6),
            mlp0: Linear::new(&p / "mlp" / 0, channels, channels),
            mlp2: Linear::new(&p / "mlp" / 2, channels, channels),
            ada_ln_modulation: Linear::zeros(&p / "adaLN_modulation" / 1, channels, 3 * channels),
        }
    }

    pub fn forward(&self, xs: &Tensor, y: &Tensor) -> Tensor {
        let mods = silu_linear(y, &self.ada_ln_modulation).chunk(3, -1); // 3 x [N, W]
        let (shift, scale, gate) = (&mods[0], &mods[1], &mods[2]);
        let h = xs.apply(&self.in_ln) * (scale + 1.0) + shift;
        let h = silu_linear(&h.apply(&self.mlp0), &self.mlp2);
        xs + gate * h
    }
}

/// `FinalLayer`: non-affine LayerNorm, AdaLN shift/scale, Linear to the token channels.
#[derive(Debug)]
pub struct FinalLayer {
    pub norm_final: LayerNorm,
    pub linear: Linear,
    pub ada_ln_modulation: Linear,
}

impl FinalLayer {
    pub fn new(p: nn::Path, channels: i64, out_channels: i64) -> Self {
        Self {
            norm_final: LayerNorm::no_affine(channels, 1e-6),
            linear: Linear::zeros(&p / "linear", channels, out_channels),
            ada_ln_modulation: Linear::zeros(&p / "adaLN_modulation" / 1, channels, 2 * channels),
        }
    }

    pub fn forward(&self, xs: &Tensor, y: &Tensor) -> Tensor {
        let mods = silu_linear(y, &self.ada_ln_modulation).chunk(2, -1); // 2 x [N, W]
        let h = xs.apply(&self.norm_final) * (&mods[1] + 1.0) + &mods[0];
        h.apply(&self.linear)
    }
}

/// Shape of the head.
#[derive(Debug, Clone, Copy)]
pub struct FlowHeadConfig {
    /// Token channels (in and out).
    pub in_channels: i64,
    /// Width W.
    pub model_channels: i64,
    /// Condition width (the transformer's D).
    pub z_channels: i64,
    /// Number of res blocks.
    pub num_res_blocks: i64,
}

/// `SimpleMLPAdaLN`: velocity `v(x, t | c)` for `x` `[N, C]`, `t` `[N]`, `c` `[N, D]`.
#[derive(Debug)]
pub struct SimpleMLPAdaLN {
    pub time_embed: TimestepEmbedder,
    pub cond_embed: Linear,
    pub input_proj: Linear,
    pub res_blocks: Vec<ResBlock>,
    pub final_layer: FinalLayer,
    pub in_channels: i64,
}

impl SimpleMLPAdaLN {
    pub fn new(p: nn::Path, cfg: &FlowHeadConfig) -> Self {
        let w = cfg.model_channels;
        Self {
            time_embed: TimestepEmbedder::new(&p / "time_embed", w),
            cond_embed: Linear::new(&p / "cond_embed", cfg.z_channels, w),
            input_proj: Linear::new(&p / "input_proj", cfg.in_channels, w),
            res_blocks: (0..cfg.num_res_blocks)
                .map(|j| ResBlock::new(&p / "res_blocks" / j, w))
                .collect(),
            final_layer: FinalLayer::new(&p / "final_layer", w, cfg.in_channels),
            in_channels: cfg.in_channels,
        }
    }

    pub fn forward(&self, xs: &Tensor, t: &Tensor, c: &Tensor) -> Tensor {
        let y = self.time_embed.forward(t) + c.apply(&self.cond_embed);
        self.forward_with_embedding(xs, &y)
    }

    /// The head after the condition `y = time_embed(t) + cond_embed(c)` is formed.
    pub fn forward_with_embedding(&self, xs: &Tensor, y: &Tensor) -> Tensor {
        let mut h = xs.apply(&self.input_proj);
        for block in &self.res_blocks {
            h = block.forward(&h, y);
        }
        self.final_layer.forward(&h, y)
    }

    /// Classifier-free guidance: rows `[cond; uncond]` share the first half of `xs`; returns
    /// `v = v_u + scale * (v_c - v_u)` for both halves.
    pub fn forward_with_cfg(&self, xs: &Tensor, t: &Tensor, c: &Tensor, cfg_scale: f64) -> Tensor {
        let half = xs.narrow(0, 0, xs.size()[0] / 2);
        let combined = Tensor::cat(&[&half, &half], 0);
        let out = self.forward(&combined, t, c);
        combine_cfg(&out, cfg_scale)
    }
}

/// `[v_c; v_u]` -> `[v; v]` with `v = v_u + scale * (v_c - v_u)` (sub, mul, add as the reference).
pub fn combine_cfg(out: &Tensor, cfg_scale: f64) -> Tensor {
    let halves = out.split(out.size()[0] / 2, 0);
    let (cond, uncond) = (&halves[0], &halves[1]);
    let v = uncond + (cond - uncond) * cfg_scale;
    Tensor::cat(&[&v, &v], 0)
}

/// The training tuple of one rectified-flow loss evaluation (rows are the tiled batch).
#[derive(Debug)]
pub struct FlowLoss {
    /// `t` after the clamp, `[N, 1]`.
    pub t: Tensor,
    /// `t * noise + (1 - t) * x0`, `[N, C]`.
    pub z_t: Tensor,
    /// Predicted velocity, `[N, C]`.
    pub pred: Tensor,
    /// Mean over channels then rows of `(noise - x0 - pred)^2`, a scalar.
    pub loss: Tensor,
}

/// `DiffLoss`: owns the head (`diffloss.net.*`); the rectified-flow objects add no parameters.
#[derive(Debug)]
pub struct DiffLoss {
    pub net: SimpleMLPAdaLN,
}

impl DiffLoss {
    pub fn new(p: nn::Path, cfg: &FlowHeadConfig) -> Self {
        Self {
            net: SimpleMLPAdaLN::new(&p / "net", cfg),
        }
    }

    /// Rectified-flow loss for targets `x0` `[N, C]` and conditions `z` `[N, D]`, with the given
    /// `noise` `[N, C]` and raw `t` `[N, 1]` in [0, 1) (before the 1e-5 clamp).
    pub fn forward(&self, x0: &Tensor, z: &Tensor, noise: &Tensor, t_raw: &Tensor) -> FlowLoss {
        let t = t_raw * (1.0 - TRAIN_T_EPS) + TRAIN_T_EPS;
        let z_t = &t * noise + t.rsub_scalar(1.0) * x0;
        let target = noise - x0;
        let pred = self.net.forward(&z_t, &t.squeeze(), z);
        let loss = (target - &pred)
            .square()
            .mean_dim(-1, false, Kind::Float)
            .mean(Kind::Float);
        FlowLoss { t, z_t, pred, loss }
    }
}

/// AdaLN modulations of one block for a batch of conditions: `shift`, `1 + scale`, `gate`.
#[derive(Debug)]
pub struct Modulation {
    pub shift: Tensor,
    pub scale_plus_one: Tensor,
    pub gate: Option<Tensor>,
}

/// The head's modulations for every Euler step of one token, computed in one GEMM per block.
///
/// The modulations depend only on `y = time_embed(t) + cond_embed(c)`, never on the noisy token,
/// so all steps' modulations can be formed before the ODE runs: each adaLN weight is read once
/// per token instead of once per step (60 % of the head's FLOPs, all of them memory-bound at the
/// few rows a sampler has). Numerically this is the head up to GEMM rounding (not bit-exact).
#[derive(Debug)]
pub struct PlannedModulations {
    /// Per res block, tensors `[S, R, W]`.
    blocks: Vec<Modulation>,
    final_layer: Modulation,
}

impl SimpleMLPAdaLN {
    /// Time embeddings of the given `t` values `[S]` -> `[S, W]`.
    pub fn time_embeddings(&self, t: &Tensor) -> Tensor {
        self.time_embed.forward(t)
    }

    /// Modulations for conditions `y` `[S, R, W]` (S steps of R rows).
    pub fn plan(&self, y: &Tensor) -> PlannedModulations {
        let sy = y.silu();
        let split = |linear: &Linear, parts: i64| {
            let m = sy.apply(linear).chunk(parts, -1);
            Modulation {
                shift: m[0].shallow_clone(),
                scale_plus_one: &m[1] + 1.0,
                gate: m.get(2).map(Tensor::shallow_clone),
            }
        };
        PlannedModulations {
            blocks: self
                .res_blocks
                .iter()
                .map(|b| split(&b.ada_ln_modulation, 3))
                .collect(),
            final_layer: split(&self.final_layer.ada_ln_modulation, 2),
        }
    }

    /// The head at step `s` of a plan: `xs` `[R, C]` -> velocity `[R, C]`.
    pub fn forward_planned(&self, xs: &Tensor, plan: &PlannedModulations, s: i64) -> Tensor {
        let mut h = xs.apply(&self.input_proj);
        for (block, m) in self.res_blocks.iter().zip(&plan.blocks) {
            let gate = m.gate.as_ref().expect("res block modulations have a gate");
            let a = h.apply(&block.in_ln) * m.scale_plus_one.get(s) + m.shift.get(s);
            let a = a.apply(&block.mlp0).silu().apply(&block.mlp2);
            h += gate.get(s) * a;
        }
        let f = &plan.final_layer;
        let h = h.apply(&self.final_layer.norm_final) * f.scale_plus_one.get(s) + f.shift.get(s);
        h.apply(&self.final_layer.linear)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(t: &Tensor, want: &[f64]) {
        let got = Vec::<f64>::try_from(t.to_kind(Kind::Double)).unwrap();
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 2e-6, "{got:?} vs {want:?}");
        }
    }

    #[test]
    fn timestep_embedding_is_cos_first_and_unscaled() {
        // Golden values from PyTorch 2.11 (reference formula, t in [0, 1] as is).
        let freqs = timestep_frequencies(FREQUENCY_EMBEDDING_SIZE, Device::Cpu);
        let emb = timestep_embedding(&Tensor::from_slice(&[0.25f32, 1.0]), &freqs);
        assert_eq!(emb.size(), vec![2, 256]);
        let idx = Tensor::from_slice(&[0i64, 1, 64, 127, 128, 129, 200, 255]);
        let pick = |row: i64| emb.get(row).index_select(0, &idx);
        close(
            &pick(0),
            &[
                0.968912, 0.97306, 0.999997, 1.0, 0.247404, 0.23055, 0.001406, 2.7e-05,
            ],
        );
        close(
            &pick(1),
            &[
                0.540302, 0.597375, 0.99995, 1.0, 0.841471, 0.801962, 0.005623, 0.000107,
            ],
        );
    }

    #[test]
    fn rope_table_holds_cos_sin_pairs_per_position() {
        let table = crate::model::layers::rope_table(5, 8, 0, Device::Cpu);
        assert_eq!(table.size(), vec![5, 4, 2]);
        close(
            &table.get(3).flatten(0, -1),
            &[
                -0.989992, 0.14112, 0.955337, 0.29552, 0.99955, 0.029995, 0.999996, 0.003,
            ],
        );
        // A training shift moves every position: row 3 + 1 is row 4 of the unshifted table.
        let shifted = crate::model::layers::rope_table(5, 8, 1, Device::Cpu);
        close(
            &shifted.get(3).flatten(0, -1),
            &[
                -0.653644, -0.756802, 0.921061, 0.389418, 0.9992, 0.039989, 0.999992, 0.004,
            ],
        );
    }
}
