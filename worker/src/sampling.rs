//! Autoregressive sampling of latent tokens: one token per step, each drawn by integrating the
//! flow head's ODE with Euler steps from t = 1 (noise) to t = 0 (data), with classifier-free
//! guidance (linear ramp or constant).
//!
//! Two samplers give the same tokens: [`sample_exact`] recomputes the full sequence every step as
//! the reference does (`sample_tokens` in
//! <https://github.com/drx-code/EquivariantModeling/blob/main/generator/equ_modeling.py>), which
//! is what parity means; [`sample_cached`] keeps a per-layer key/value cache of the attention
//! window and the class tokens' cross-attention keys/values, so a token costs the same at any
//! position. `temperature` is accepted and ignored, as in the reference (it only names the
//! reference's output folder).

use crate::model::flow_head::{combine_cfg, SimpleMLPAdaLN};
use crate::model::generator::{EquivariantGenerativeModel, Mode, ModelError};
use crate::model::layers::{rope_table, KeyValue, MaskedBlockRoPECrossAttn};
use tch::{Device, Kind, Tensor};

/// How the guidance scale evolves over the tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CfgSchedule {
    /// `1 + (cfg - 1) * (step + 1) / num_iter` (Muse): weak guidance for the first tokens.
    Linear,
    /// `cfg` for every token.
    Constant,
}

impl std::str::FromStr for CfgSchedule {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "linear" => Ok(Self::Linear),
            "constant" => Ok(Self::Constant),
            other => Err(format!(
                "unknown cfg schedule {other:?} (use linear or constant)"
            )),
        }
    }
}

/// The guidance scale for AR step `step` of `num_iter`, computed in f64 like the reference.
pub fn cfg_scale_at(schedule: CfgSchedule, cfg: f64, step: i64, num_iter: i64) -> f64 {
    match schedule {
        CfgSchedule::Linear => 1.0 + (cfg - 1.0) * (step as f64 + 1.0) / num_iter as f64,
        CfgSchedule::Constant => cfg,
    }
}

/// Where the initial noise of each token comes from (`[B, C]` per AR step).
pub trait NoiseSource {
    fn next_noise(&mut self, batch: i64, channels: i64) -> anyhow::Result<Tensor>;
}

/// Serialises seeding + drawing on tch's process-wide CPU generator, so that two samplers in one
/// process (e.g. parallel tests) do not interleave their streams.
static CPU_RNG: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// The seeded default: `manual_seed(seed)`, then one `randn(B, C)` per generated token on tch's
/// CPU generator, in order, as the reference draws them (all drawn up front, under a lock).
pub fn seeded_noise(seed: i64, tokens: i64, batch: i64, channels: i64) -> FixedNoise {
    let _lock = CPU_RNG
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    tch::manual_seed(seed);
    let draws: Vec<Tensor> = (0..tokens)
        .map(|_| Tensor::randn([batch, channels], (Kind::Float, Device::Cpu)))
        .collect();
    let noise = if draws.is_empty() {
        Tensor::zeros([0, batch, channels], (Kind::Float, Device::Cpu))
    } else {
        Tensor::stack(&draws, 0)
    };
    FixedNoise::new(noise)
}

/// Replays given noise: `[steps, B, C]`, one slice per generated token (parity tests).
pub struct FixedNoise {
    noise: Tensor,
    next: i64,
}

impl Clone for FixedNoise {
    /// A deep copy that replays the same noise from the same position.
    fn clone(&self) -> Self {
        Self {
            noise: self.noise.copy(),
            next: self.next,
        }
    }
}

impl FixedNoise {
    pub fn new(noise: Tensor) -> Self {
        Self { noise, next: 0 }
    }

    /// The whole noise tensor `[steps, B, C]` (to put several images' noise side by side).
    pub fn into_tensor(self) -> Tensor {
        self.noise
    }
}

impl NoiseSource for FixedNoise {
    fn next_noise(&mut self, batch: i64, channels: i64) -> anyhow::Result<Tensor> {
        let size = self.noise.size();
        if size.len() != 3 || size[1] != batch || size[2] != channels || self.next >= size[0] {
            anyhow::bail!(
                "given noise has shape {size:?}; token {} needs [>{}, {batch}, {channels}]",
                self.next,
                self.next
            );
        }
        let out = self.noise.get(self.next);
        self.next += 1;
        Ok(out)
    }
}

/// What to sample.
#[derive(Debug)]
pub struct SampleSpec<'a> {
    pub batch: i64,
    /// Class labels `[B]`; `None` samples unconditionally with the null class (`fake_latent`).
    pub labels: Option<&'a Tensor>,
    /// Tokens `[B, P, C]` to continue (`gt_latents` in the reference).
    pub prefix: Option<&'a Tensor>,
    /// Total tokens, prefix included.
    pub num_iter: i64,
    pub cfg: f64,
    pub cfg_schedule: CfgSchedule,
    /// Euler steps per token.
    pub num_steps: i64,
    /// Accepted and ignored, as in the reference.
    pub temperature: f64,
}

impl SampleSpec<'_> {
    fn guided(&self) -> bool {
        self.cfg != 1.0
    }

    fn prefix_len(&self, model: &EquivariantGenerativeModel) -> Result<i64, ModelError> {
        let c = model.cfg.vae_embed_dim;
        let Some(prefix) = self.prefix else {
            return Ok(0);
        };
        match prefix.size().as_slice() {
            &[b, p, ch] if b == self.batch && ch == c && p <= self.num_iter => Ok(p),
            _ => Err(ModelError::Shape {
                what: "prefix tokens",
                expected: format!("[{}, P <= {}, {c}]", self.batch, self.num_iter),
                got: prefix.size(),
            }),
        }
    }
}

/// Euler integration of `dz/dt = v(z, t)` from t = 1 to 0 in `n` steps: `t_i = i/n` (f32,
/// `ones * i / n`), `z += v * (-1/n)`; the model is never evaluated at t = 0.
pub fn euler_generative(
    velocity: &mut dyn FnMut(&Tensor, &Tensor, i64) -> Tensor,
    z1: &Tensor,
    n: i64,
) -> Tensor {
    let dt = -1.0 / n as f64;
    let rows = z1.size()[0];
    let mut z = z1.copy();
    for i in (1..=n).rev() {
        let t = Tensor::ones([rows, 1], (Kind::Float, z1.device())) * i as f64 / n as f64;
        let v = velocity(&z, &t.squeeze_dim(1), i);
        z += v * dt;
    }
    z
}

/// Draws one token per row from the head given conditions `z` (`[2B, D]` with guidance,
/// `[B, D]` without) and the noise `[B, C]`; returns `[B, C]`.
fn sample_head_exact(
    head: &SimpleMLPAdaLN,
    z: &Tensor,
    noise: &Tensor,
    cfg: f64,
    n: i64,
) -> Tensor {
    if cfg != 1.0 {
        let z1 = Tensor::cat(&[noise, noise], 0);
        let mut v = |x: &Tensor, t: &Tensor, _i: i64| head.forward_with_cfg(x, t, z, cfg);
        let out = euler_generative(&mut v, &z1, n);
        out.narrow(0, 0, noise.size()[0])
    } else {
        let mut v = |x: &Tensor, t: &Tensor, _i: i64| head.forward(x, t, z);
        euler_generative(&mut v, noise, n)
    }
}

/// Class embeddings of the batch (`[2B, D]`, conditional rows first, with guidance).
fn class_rows(model: &EquivariantGenerativeModel, spec: &SampleSpec) -> anyhow::Result<Tensor> {
    let ce = match spec.labels {
        Some(labels) => {
            if labels.size() != [spec.batch] {
                anyhow::bail!(
                    "labels have shape {:?}, expected [{}]",
                    labels.size(),
                    spec.batch
                );
            }
            model.class_embedding(labels)?
        }
        None => model.fake_class_embedding(spec.batch),
    };
    Ok(if spec.guided() {
        Tensor::cat(&[ce, model.fake_class_embedding(spec.batch)], 0)
    } else {
        ce
    })
}

fn initial_tokens(
    model: &EquivariantGenerativeModel,
    spec: &SampleSpec,
) -> anyhow::Result<(Tensor, i64)> {
    let p = spec.prefix_len(model)?;
    let c = model.cfg.vae_embed_dim;
    let tokens = Tensor::zeros(
        [spec.batch, spec.num_iter, c],
        (Kind::Float, model.device()),
    );
    if let Some(prefix) = spec.prefix {
        tokens
            .narrow(1, 0, p)
            .copy_(&prefix.to_device(model.device()).to_kind(Kind::Float));
    }
    Ok((tokens, p))
}

/// The reference's sampler: the full sequence is recomputed for every token. Returns `[B, L, C]`.
/// `on_token` is called after each generated token (for progress bars).
/// In bf16 ([`GeneratorConfig::precision`](crate::model::generator::GeneratorConfig)) the
/// forwards run under autocast; the Euler state and the returned tokens stay float32.
pub fn sample_exact(
    model: &EquivariantGenerativeModel,
    spec: &SampleSpec,
    noise: &mut dyn NoiseSource,
    on_token: &mut dyn FnMut(i64),
) -> anyhow::Result<Tensor> {
    let _guard = tch::no_grad_guard();
    crate::precision::autocast(model.cfg.precision, model.device(), || {
        sample_exact_autocast(model, spec, noise, on_token)
    })
}

fn sample_exact_autocast(
    model: &EquivariantGenerativeModel,
    spec: &SampleSpec,
    noise: &mut dyn NoiseSource,
    on_token: &mut dyn FnMut(i64),
) -> anyhow::Result<Tensor> {
    let (mut tokens, start) = initial_tokens(model, spec)?;
    let ce = class_rows(model, spec)?;
    let c = model.cfg.vae_embed_dim;
    for step in start..spec.num_iter {
        let seq = if spec.guided() {
            Tensor::cat(&[&tokens, &tokens], 0)
        } else {
            tokens.shallow_clone()
        };
        let h = model.forward_encoder(&seq, &ce, Mode::Eval)?;
        let z = h.select(1, step); // [R, D]
        let cfg_iter = cfg_scale_at(spec.cfg_schedule, spec.cfg, step, spec.num_iter);
        let eps = noise.next_noise(spec.batch, c)?.to_device(model.device());
        let token = sample_head_exact(&model.diffloss.net, &z, &eps, cfg_iter, spec.num_steps);
        let next = tokens.copy();
        next.select(1, step).copy_(&token);
        tokens = next;
        on_token(step);
    }
    Ok(tokens)
}

/// `[B, L, C]` -> `[B, C, 1, L]`, the layout the reference hands to the tokenizer's decoder.
pub fn decoder_layout(tokens: &Tensor) -> Tensor {
    tokens.permute([0, 2, 1]).unsqueeze(2)
}

/// Per-layer state of the fast sampler: the self-attention keys/values of the last
/// `cond_length + 1` image tokens and the class tokens' cross-attention keys/values.
pub struct KvCache {
    layers: Vec<LayerCache>,
    /// Window length (keys a query may see, itself included); `None` for full causal attention.
    window: Option<i64>,
    /// RoPE table for every position that will be fed.
    rope: Tensor,
    /// Image tokens fed so far.
    fed: i64,
    /// Output row 0: the normed last class token, `[R, D]`.
    first_row: Tensor,
}

struct LayerCache {
    self_kv: Option<KeyValue>,
    cross_kv: KeyValue,
}

impl KvCache {
    /// Runs the class tokens through every layer (they only see their own MLPs) and keeps each
    /// layer's cross-attention keys/values. `ce`: `[R, D]`; positions up to `max_len` are usable.
    pub fn new(model: &EquivariantGenerativeModel, ce: &Tensor, max_len: i64) -> Self {
        let nb = model.cfg.buffer_size;
        let empty = Tensor::zeros(
            [ce.size()[0], 0, model.cfg.vae_embed_dim],
            (Kind::Float, model.device()),
        );
        let mut cond = model.embed_sequence(&empty, ce); // [R, NB, D]
        let mut layers = Vec::with_capacity(model.encoder_blocks.len());
        for block in &model.encoder_blocks {
            let cross_kv = block.attn2.cond_kv(&cond.apply(&block.cross_cond_norm));
            layers.push(LayerCache {
                self_kv: None,
                cross_kv,
            });
            cond = &cond + block.mlp.forward_t(&cond.apply(&block.norm2), false);
        }
        let first_row = cond.select(1, nb - 1).apply(&model.encoder_norm);
        let cl = model.cfg.cond_length;
        Self {
            layers,
            window: (cl > 0).then_some(cl + 1),
            rope: rope_table(max_len.max(1), model.cfg.head_dim(), 0, model.device()),
            fed: 0,
            first_row,
        }
    }

    /// Keys held per layer (at most `cond_length + 1` for a windowed model, whatever the length).
    pub fn cached_keys(&self) -> i64 {
        self.layers
            .iter()
            .filter_map(|l| l.self_kv.as_ref().map(|kv| kv.k.size()[2]))
            .max()
            .unwrap_or(0)
    }

    /// Image tokens fed so far.
    pub fn fed(&self) -> i64 {
        self.fed
    }

    /// Output row 0 (the condition of the first token), `[R, D]`.
    pub fn first_row(&self) -> &Tensor {
        &self.first_row
    }

    /// Feeds image token `fed` (`[R, C]`) through every layer; returns output row `fed + 1`
    /// (the condition for the next token), `[R, D]`.
    pub fn feed(&mut self, model: &EquivariantGenerativeModel, token: &Tensor) -> Tensor {
        let pos = self.fed;
        let rope = self.rope.narrow(0, pos, 1); // [1, hd/2, 2]
        let mut x = token
            .unsqueeze(1)
            .apply(&model.z_proj)
            .apply(&model.z_proj_ln); // [R, 1, D]
        for (block, cache) in model.encoder_blocks.iter().zip(self.layers.iter_mut()) {
            x = feed_block(block, cache, &x, &rope, self.window);
        }
        self.fed += 1;
        x.apply(&model.encoder_norm).squeeze_dim(1)
    }
}

fn feed_block(
    block: &MaskedBlockRoPECrossAttn,
    cache: &mut LayerCache,
    x: &Tensor,
    rope: &Tensor,
    window: Option<i64>,
) -> Tensor {
    let (q, k, v) = block.attn.qkv_rotated(&x.apply(&block.norm1), rope);
    let (k, v) = match cache.self_kv.take() {
        Some(prev) => {
            let (k, v) = (Tensor::cat(&[prev.k, k], 2), Tensor::cat(&[prev.v, v], 2));
            match window {
                Some(w) if k.size()[2] > w => {
                    let n = k.size()[2];
                    (k.narrow(2, n - w, w), v.narrow(2, n - w, w))
                }
                _ => (k, v),
            }
        }
        None => (k, v.contiguous()),
    };
    let kv = KeyValue { k, v };
    let keys = kv.k.size()[2];
    let mask = Tensor::ones([1, keys], (Kind::Bool, x.device()));
    let x = x + block.attn.attend(&q, &kv, &mask, false);
    cache.self_kv = Some(kv);
    let x = &x
        + block
            .attn2
            .forward_t(&x.apply(&block.cross_norm), &cache.cross_kv, rope, false);
    &x + block.mlp.forward_t(&x.apply(&block.norm2), false)
}

/// Precomputed pieces of the head that do not depend on the noisy token: the time embedding of
/// every Euler step (the same for all tokens), `[N, 1, W]` with row `i - 1` for `t = i / N`.
struct HeadPlan {
    time_emb: Tensor,
}

impl HeadPlan {
    fn new(head: &SimpleMLPAdaLN, n: i64, device: Device) -> Self {
        let i = Tensor::arange_start(1, n + 1, (Kind::Float, device));
        let t = i / n as f64;
        Self {
            time_emb: head.time_embeddings(&t).unsqueeze(1),
        }
    }

    /// One token per row from conditions `z` `[R, D]` and noise `[B, C]` -> `[B, C]`.
    fn sample(
        &self,
        head: &SimpleMLPAdaLN,
        z: &Tensor,
        noise: &Tensor,
        cfg: f64,
        n: i64,
    ) -> Tensor {
        let cond = z.apply(&head.cond_embed).unsqueeze(0); // [1, R, W], the same for all steps
        let plan = head.plan(&(&self.time_emb + cond)); // [N, R, W] per modulation
        let b = noise.size()[0];
        let guided = cfg != 1.0;
        let z1 = if guided {
            Tensor::cat(&[noise, noise], 0)
        } else {
            noise.shallow_clone()
        };
        let mut v = |x: &Tensor, _t: &Tensor, i: i64| {
            let out = head.forward_planned(x, &plan, i - 1);
            if guided {
                combine_cfg(&out, cfg)
            } else {
                out
            }
        };
        euler_generative(&mut v, &z1, n).narrow(0, 0, b)
    }
}

/// The KV-cached sampler: the same tokens as [`sample_exact`] (to float tolerance), at a cost per
/// token that does not grow with the sequence length. Returns `[B, L, C]` (float32; bf16 as in
/// [`sample_exact`]).
pub fn sample_cached(
    model: &EquivariantGenerativeModel,
    spec: &SampleSpec,
    noise: &mut dyn NoiseSource,
    on_token: &mut dyn FnMut(i64),
) -> anyhow::Result<Tensor> {
    let _guard = tch::no_grad_guard();
    crate::precision::autocast(model.cfg.precision, model.device(), || {
        sample_cached_autocast(model, spec, noise, on_token)
    })
}

fn sample_cached_autocast(
    model: &EquivariantGenerativeModel,
    spec: &SampleSpec,
    noise: &mut dyn NoiseSource,
    on_token: &mut dyn FnMut(i64),
) -> anyhow::Result<Tensor> {
    let (tokens, start) = initial_tokens(model, spec)?;
    let ce = class_rows(model, spec)?;
    let c = model.cfg.vae_embed_dim;
    let head = &model.diffloss.net;
    let plan = HeadPlan::new(head, spec.num_steps, model.device());
    let mut cache = KvCache::new(model, &ce, spec.num_iter);
    let rows = |t: &Tensor| {
        if spec.guided() {
            Tensor::cat(&[t, t], 0)
        } else {
            t.shallow_clone()
        }
    };
    let mut z = cache.first_row.shallow_clone();
    for j in 0..start {
        z = cache.feed(model, &rows(&tokens.select(1, j)));
    }
    for step in start..spec.num_iter {
        let cfg_iter = cfg_scale_at(spec.cfg_schedule, spec.cfg, step, spec.num_iter);
        let eps = noise.next_noise(spec.batch, c)?.to_device(model.device());
        let token = plan.sample(head, &z, &eps, cfg_iter, spec.num_steps);
        tokens.select(1, step).copy_(&token);
        if step + 1 < spec.num_iter {
            z = cache.feed(model, &rows(&token));
        }
        on_token(step);
    }
    Ok(tokens)
}
