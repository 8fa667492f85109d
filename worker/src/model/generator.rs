//! The autoregressive generator `EquivariantGenerativeModel`: class tokens (buffer) plus image
//! column tokens through windowed-causal RoPE blocks with cross-attention to the class tokens, and
//! the per-token rectified-flow head. Parameter paths equal the reference state_dict.
//!
//! Upstream: <https://github.com/drx-code/EquivariantModeling/blob/main/generator/equ_modeling.py>

use super::flow_head::{DiffLoss, FlowHeadConfig, FlowLoss};
use super::layers::{
    rope_table, window_mask, BlockConfig, LayerNorm, Linear, MaskedBlockRoPECrossAttn,
};
use crate::precision::{self, Precision};
use serde::{Deserialize, Deserializer, Serialize};
use tch::{nn, Device, Kind, Tensor};

/// Shape errors of the generator's entry points.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{what}: expected shape {expected}, got {got:?}")]
    Shape {
        what: &'static str,
        expected: String,
        got: Vec<i64>,
    },
    #[error("invalid generator config: {0}")]
    Config(String),
}

fn deserialize_steps<'de, D: Deserializer<'de>>(d: D) -> Result<i64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Steps {
        Int(i64),
        Text(String),
    }
    match Steps::deserialize(d)? {
        Steps::Int(n) => Ok(n),
        Steps::Text(s) => s.trim().parse().map_err(|_| {
            serde::de::Error::custom(format!("num_sampling_steps {s:?} is not an integer"))
        }),
    }
}

/// The reference constructor's arguments, by their Python names (the fixture JSON's keys).
///
/// Missing fields take the constructor's defaults, except `norm_eps`: the constructor's
/// `norm_layer` is passed as `partial(nn.LayerNorm, eps=1e-6)` by every preset, so 1e-6 is the
/// default here (the bare constructor default, 1e-5, is never used by the reference scripts).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct GeneratorConfig {
    /// Unused by the model (kept for round-tripping the reference's arguments).
    pub img_size: i64,
    /// Training sequence length; no parameter depends on it.
    pub token_num: i64,
    pub encoder_embed_dim: i64,
    pub encoder_depth: i64,
    pub encoder_num_heads: i64,
    /// Only the condition width of the flow head.
    pub decoder_embed_dim: i64,
    /// Added to `encoder_depth`: all blocks live in `encoder_blocks`.
    pub decoder_depth: i64,
    /// Unused by the reference.
    pub decoder_num_heads: i64,
    pub mlp_ratio: f64,
    /// eps of `norm1`, `norm2` and `encoder_norm` (the `norm_layer` argument).
    pub norm_eps: f64,
    pub vae_embed_dim: i64,
    pub label_drop_prob: f64,
    pub class_num: i64,
    pub attn_dropout: f64,
    pub proj_dropout: f64,
    pub buffer_size: i64,
    pub diffloss_d: i64,
    pub diffloss_w: i64,
    /// Euler steps per token at sampling (a string in the reference, `int()`-ed).
    #[serde(deserialize_with = "deserialize_steps")]
    pub num_sampling_steps: i64,
    pub diffusion_batch_mul: i64,
    /// Activation checkpointing in the reference; eqim refuses `true` (see [`Self::validate`]).
    pub grad_checkpointing: bool,
    /// Window ω: each image token attends to itself and the `cond_length` previous ones.
    pub cond_length: i64,
    /// RoPE training shift range 0..shift_num-1 (None: `token_num`).
    pub shift_num: Option<i64>,
    /// eqim's, not a reference argument: the precision of the forward passes in training and
    /// sampling (`bf16`: autocast, see [`crate::precision`]); weights stay float32.
    pub precision: Precision,
}

impl Default for GeneratorConfig {
    /// The reference constructor's defaults (with `norm_eps` 1e-6, see the type's docs).
    fn default() -> Self {
        Self {
            img_size: 256,
            token_num: 128,
            encoder_embed_dim: 1024,
            encoder_depth: 16,
            encoder_num_heads: 16,
            decoder_embed_dim: 1024,
            decoder_depth: 16,
            decoder_num_heads: 16,
            mlp_ratio: 4.0,
            norm_eps: 1e-6,
            vae_embed_dim: 16,
            label_drop_prob: 0.1,
            class_num: 1000,
            attn_dropout: 0.1,
            proj_dropout: 0.1,
            buffer_size: 64,
            diffloss_d: 3,
            diffloss_w: 1024,
            num_sampling_steps: 100,
            diffusion_batch_mul: 4,
            grad_checkpointing: false,
            cond_length: 0,
            shift_num: Some(16),
            precision: Precision::Fp32,
        }
    }
}

impl GeneratorConfig {
    /// The README's training settings for a size: vae_embed_dim 256, token_num 16, buffer 16,
    /// cond_length 3, diffloss_d 12, 1000 classes. Widths from `small_model` .. `huge_model` in
    /// <https://github.com/drx-code/EquivariantModeling/blob/main/generator/equ_modeling.py> and
    /// the README's `--diffloss_w`.
    pub fn preset(name: &str) -> Result<Self, ModelError> {
        let (dim, depth, heads, w) = match name {
            "small" | "small_model" => (512, 8, 8, 960),
            "base" | "base_model" => (768, 12, 12, 1024),
            "large" | "large_model" => (1024, 16, 16, 1280),
            "huge" | "huge_model" => (1280, 20, 16, 1536),
            other => {
                return Err(ModelError::Config(format!(
                    "unknown preset {other:?} (use small, base, large or huge)"
                )))
            }
        };
        Ok(Self {
            token_num: 16,
            encoder_embed_dim: dim,
            encoder_depth: depth,
            encoder_num_heads: heads,
            decoder_embed_dim: dim,
            decoder_depth: depth,
            decoder_num_heads: heads,
            vae_embed_dim: 256,
            buffer_size: 16,
            diffloss_d: 12,
            diffloss_w: w,
            cond_length: 3,
            ..Self::default()
        })
    }

    pub fn small() -> Self {
        Self::preset("small").expect("known preset")
    }
    pub fn base() -> Self {
        Self::preset("base").expect("known preset")
    }
    pub fn large() -> Self {
        Self::preset("large").expect("known preset")
    }
    pub fn huge() -> Self {
        Self::preset("huge").expect("known preset")
    }

    /// Total number of blocks (`encoder_depth + decoder_depth`).
    pub fn num_blocks(&self) -> i64 {
        self.encoder_depth + self.decoder_depth
    }

    pub fn head_dim(&self) -> i64 {
        self.encoder_embed_dim / self.encoder_num_heads
    }

    pub fn mlp_hidden(&self) -> i64 {
        (self.encoder_embed_dim as f64 * self.mlp_ratio) as i64
    }

    pub fn shift_range(&self) -> i64 {
        self.shift_num.unwrap_or(self.token_num)
    }

    /// Checks what the reference would fail on later (or silently get wrong).
    pub fn validate(&self) -> Result<(), ModelError> {
        let err = |m: String| Err(ModelError::Config(m));
        let d = self.encoder_embed_dim;
        if d <= 0 || self.encoder_num_heads <= 0 || d % self.encoder_num_heads != 0 {
            return err(format!(
                "encoder_embed_dim {d} must be a positive multiple of encoder_num_heads {}",
                self.encoder_num_heads
            ));
        }
        if self.head_dim() % 2 != 0 {
            return err(format!(
                "head dim {} must be even for RoPE",
                self.head_dim()
            ));
        }
        if self.decoder_embed_dim != d {
            return err(format!(
                "decoder_embed_dim {} (the flow head's condition width) must equal encoder_embed_dim {d}",
                self.decoder_embed_dim
            ));
        }
        for (name, v) in [
            ("buffer_size", self.buffer_size),
            ("class_num", self.class_num),
            ("vae_embed_dim", self.vae_embed_dim),
            ("diffloss_w", self.diffloss_w),
            ("diffusion_batch_mul", self.diffusion_batch_mul),
            ("num_sampling_steps", self.num_sampling_steps),
        ] {
            if v <= 0 {
                return err(format!("{name} must be positive, got {v}"));
            }
        }
        if self.cond_length < 0 || self.diffloss_d < 0 || self.num_blocks() < 0 {
            return err("cond_length, diffloss_d and depths must be >= 0".into());
        }
        if self.grad_checkpointing {
            return err(GRAD_CHECKPOINTING_REFUSED.to_owned());
        }
        if self.training_shift_invalid() {
            return err(format!(
                "shift_num must be >= 1, got {}",
                self.shift_range()
            ));
        }
        Ok(())
    }

    fn training_shift_invalid(&self) -> bool {
        self.shift_range() < 1
    }

    pub fn block_config(&self) -> BlockConfig {
        BlockConfig {
            dim: self.encoder_embed_dim,
            num_heads: self.encoder_num_heads,
            mlp_hidden: self.mlp_hidden(),
            buffer_size: self.buffer_size,
            norm_eps: self.norm_eps,
            attn_drop: self.attn_dropout,
            proj_drop: self.proj_dropout,
        }
    }

    pub fn head_config(&self) -> FlowHeadConfig {
        FlowHeadConfig {
            in_channels: self.vae_embed_dim,
            model_channels: self.diffloss_w,
            z_channels: self.decoder_embed_dim,
            num_res_blocks: self.diffloss_d,
        }
    }

    /// Number of trainable parameters, from the shapes alone (reference.md §1.3).
    pub fn parameter_count(&self) -> i64 {
        let (d, w, c) = (self.encoder_embed_dim, self.diffloss_w, self.vae_embed_dim);
        let hidden = self.mlp_hidden();
        let linear = |i: i64, o: i64| i * o + o;
        let block = 2 * 2 * d // norm1, norm2
            + linear(d, 3 * d)
            + linear(d, d)
            + linear(d, hidden)
            + linear(hidden, d)
            + 4 * linear(d, d) // attn2.qkv/proj/k/v
            + 2 * 2 * d; // cross norms
        let res_block = 2 * w + 2 * linear(w, w) + linear(w, 3 * w);
        let head = linear(super::flow_head::FREQUENCY_EMBEDDING_SIZE, w)
            + linear(w, w)
            + linear(self.decoder_embed_dim, w)
            + linear(c, w)
            + self.diffloss_d * res_block
            + linear(w, c)
            + linear(w, 2 * w);
        let other = d // fake_latent
            + self.buffer_size * d
            + self.class_num * d
            + linear(c, d)
            + 2 * d // z_proj_ln
            + 2 * d; // encoder_norm
        other + self.num_blocks() * block + head
    }
}

/// Why `grad_checkpointing: true` is refused rather than ignored.
pub const GRAD_CHECKPOINTING_REFUSED: &str = "grad_checkpointing: true is not supported: tch 0.24 \
    cannot recompute activations in backward (it has no torch.utils.checkpoint and cannot define \
    a custom autograd Function), and eqim will not accept the setting and ignore it; set \
    grad_checkpointing to false, and use precision bf16 or a smaller micro-batch (optim.micro_batch) \
    to save memory (eqim plan-memory shows what fits)";

/// How a training forward is randomised (all draws on tch's CPU generator, as the reference).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// No dropout, no label drop, RoPE shift 0.
    Eval,
    /// Dropout, label drop and a random RoPE shift in 0..shift_num.
    Train,
}

impl Mode {
    pub fn is_train(self) -> bool {
        self == Mode::Train
    }
}

/// `EquivariantGenerativeModel`.
#[derive(Debug)]
pub struct EquivariantGenerativeModel {
    pub cfg: GeneratorConfig,
    pub fake_latent: Tensor,
    pub encoder_pos_embed_learned: Tensor,
    pub class_emb: Tensor,
    pub z_proj: Linear,
    pub z_proj_ln: LayerNorm,
    pub encoder_blocks: Vec<MaskedBlockRoPECrossAttn>,
    pub encoder_norm: LayerNorm,
    pub diffloss: DiffLoss,
}

impl EquivariantGenerativeModel {
    /// Builds the model under `p` with the reference's initialisation (§1.12).
    pub fn new(p: nn::Path, cfg: &GeneratorConfig) -> Result<Self, ModelError> {
        cfg.validate()?;
        let d = cfg.encoder_embed_dim;
        let normal = || nn::Init::Randn {
            mean: 0.0,
            stdev: 0.02,
        };
        let block_cfg = cfg.block_config();
        Ok(Self {
            cfg: cfg.clone(),
            fake_latent: p.var("fake_latent", &[1, d], normal()),
            encoder_pos_embed_learned: p.var(
                "encoder_pos_embed_learned",
                &[1, cfg.buffer_size, d],
                normal(),
            ),
            class_emb: (&p / "class_emb").var("weight", &[cfg.class_num, d], normal()),
            z_proj: Linear::new(&p / "z_proj", cfg.vae_embed_dim, d),
            z_proj_ln: LayerNorm::new(&p / "z_proj_ln", d, 1e-6),
            encoder_blocks: (0..cfg.num_blocks())
                .map(|i| MaskedBlockRoPECrossAttn::new(&p / "encoder_blocks" / i, &block_cfg))
                .collect(),
            encoder_norm: LayerNorm::new(&p / "encoder_norm", d, cfg.norm_eps),
            diffloss: DiffLoss::new(&p / "diffloss", &cfg.head_config()),
        })
    }

    pub fn device(&self) -> Device {
        self.fake_latent.device()
    }

    /// `class_emb(labels)` `[B, D]`; labels must lie in `0..class_num`.
    pub fn class_embedding(&self, labels: &Tensor) -> Result<Tensor, ModelError> {
        let bad = labels.lt(0).logical_or(&labels.ge(self.cfg.class_num));
        if labels.dim() != 1 || bad.any().int64_value(&[]) != 0 {
            return Err(ModelError::Shape {
                what: "labels",
                expected: format!("[B] integers in 0..{}", self.cfg.class_num),
                got: labels.size(),
            });
        }
        Ok(Tensor::embedding(
            &self.class_emb,
            &labels.to_device(self.device()),
            -1,
            false,
            false,
        ))
    }

    /// The null-class embedding repeated for `batch` rows, `[B, D]`.
    pub fn fake_class_embedding(&self, batch: i64) -> Tensor {
        self.fake_latent.repeat([batch, 1])
    }

    /// Label drop (training): each row's class embedding is replaced by `fake_latent` with
    /// probability `label_drop_prob`, drawn as `rand(B)` on the CPU generator.
    fn drop_labels(&self, class_embedding: &Tensor) -> Tensor {
        let b = class_embedding.size()[0];
        let drop = Tensor::rand([b], (Kind::Float, Device::Cpu))
            .lt(self.cfg.label_drop_prob)
            .unsqueeze(-1)
            .to_device(self.device())
            .to_kind(class_embedding.kind()); // [B, 1]
        &drop * &self.fake_latent + drop.rsub_scalar(1.0) * class_embedding
    }

    /// The sequence after the input projection: `[B, NB + L, D]`, class tokens first, LayerNormed.
    pub fn embed_sequence(&self, tokens: &Tensor, class_embedding: &Tensor) -> Tensor {
        let x = tokens.apply(&self.z_proj); // [B, L, D]
        let buffer = class_embedding.unsqueeze(1) + &self.encoder_pos_embed_learned; // [B, NB, D]
        Tensor::cat(&[buffer, x], 1).apply(&self.z_proj_ln)
    }

    fn check_tokens(&self, tokens: &Tensor) -> Result<(i64, i64), ModelError> {
        match tokens.size().as_slice() {
            &[b, l, c] if c == self.cfg.vae_embed_dim && l > 0 && b > 0 => Ok((b, l)),
            _ => Err(ModelError::Shape {
                what: "tokens",
                expected: format!("[B, L, {}]", self.cfg.vae_embed_dim),
                got: tokens.size(),
            }),
        }
    }

    /// `forward_encoder`: tokens `[B, L, C]` and class embeddings `[B, D]` -> `[B, L, D]`, where
    /// row j conditions the prediction of token j (row 0 is the last class token).
    pub fn forward_encoder(
        &self,
        tokens: &Tensor,
        class_embedding: &Tensor,
        mode: Mode,
    ) -> Result<Tensor, ModelError> {
        precision::autocast(self.cfg.precision, self.device(), || {
            self.forward_encoder_autocast(tokens, class_embedding, mode)
        })
    }

    /// [`Self::forward_encoder`] inside the caller's autocast region.
    fn forward_encoder_autocast(
        &self,
        tokens: &Tensor,
        class_embedding: &Tensor,
        mode: Mode,
    ) -> Result<Tensor, ModelError> {
        let (b, len) = self.check_tokens(tokens)?;
        if class_embedding.size() != [b, self.cfg.encoder_embed_dim] {
            return Err(ModelError::Shape {
                what: "class_embedding",
                expected: format!("[{b}, {}]", self.cfg.encoder_embed_dim),
                got: class_embedding.size(),
            });
        }
        let train = mode.is_train();
        let ce = if train {
            self.drop_labels(class_embedding)
        } else {
            class_embedding.shallow_clone()
        };
        let mut h = self.embed_sequence(tokens, &ce);
        let mask = window_mask(len, self.cfg.cond_length, self.device());
        let shift = if train {
            Tensor::randint(self.cfg.shift_range(), [1], (Kind::Int64, Device::Cpu))
                .int64_value(&[0])
        } else {
            0
        };
        let rope = rope_table(len, self.cfg.head_dim(), shift, self.device());
        for block in &self.encoder_blocks {
            h = block.forward_t(&h, &mask, &rope, train);
        }
        let h = h.apply(&self.encoder_norm);
        Ok(h.narrow(1, self.cfg.buffer_size - 1, len)) // [B, L, D]
    }

    /// The training loss (`forward` + `forward_loss`): latents `x0` `[B, L, C]`, labels `[B]`.
    /// `noise` `[R, C]` and `t_raw` `[R, 1]` (R = diffusion_batch_mul * B * L rows, whole-batch
    /// copies) may be given for parity; otherwise they are drawn on the model's device.
    /// In bf16 the forward runs under autocast and the returned tensors are float32.
    pub fn forward_loss(
        &self,
        x0: &Tensor,
        labels: &Tensor,
        flow_noise: Option<(&Tensor, &Tensor)>,
        mode: Mode,
    ) -> Result<FlowLoss, ModelError> {
        let out = precision::autocast(self.cfg.precision, self.device(), || {
            self.forward_loss_autocast(x0, labels, flow_noise, mode)
        })?;
        if self.cfg.precision.is_fp32() {
            return Ok(out);
        }
        Ok(FlowLoss {
            t: precision::to_fp32(&out.t),
            z_t: precision::to_fp32(&out.z_t),
            pred: precision::to_fp32(&out.pred),
            loss: precision::to_fp32(&out.loss),
        })
    }

    fn forward_loss_autocast(
        &self,
        x0: &Tensor,
        labels: &Tensor,
        flow_noise: Option<(&Tensor, &Tensor)>,
        mode: Mode,
    ) -> Result<FlowLoss, ModelError> {
        let (b, len) = self.check_tokens(x0)?;
        let gt = x0.detach();
        let ce = self.class_embedding(labels)?;
        let z = self.forward_encoder_autocast(x0, &ce, mode)?;
        let mul = self.cfg.diffusion_batch_mul;
        let rows = mul * b * len;
        let target = gt.reshape([b * len, -1]).repeat([mul, 1]); // [R, C]
        let z = z.reshape([b * len, -1]).repeat([mul, 1]); // [R, D]
        let c = self.cfg.vae_embed_dim;
        let (noise, t_raw) = match flow_noise {
            Some((n, t)) => {
                if n.size() != [rows, c] || t.size() != [rows, 1] {
                    return Err(ModelError::Shape {
                        what: "flow noise / t",
                        expected: format!("[{rows}, {c}] and [{rows}, 1]"),
                        got: [n.size(), t.size()].concat(),
                    });
                }
                (n.to_device(self.device()), t.to_device(self.device()))
            }
            None => (
                Tensor::randn([rows, c], (Kind::Float, self.device())),
                Tensor::rand([rows, 1], (Kind::Float, self.device())),
            ),
        };
        Ok(self.diffloss.forward(&target, &z, &noise, &t_raw))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preset_parameter_counts_match_the_reference() {
        let counts = [
            ("small", 127_311_488),
            ("base", 295_586_560),
            ("large", 644_496_128),
            ("huge", 1_203_206_912),
        ];
        for (name, want) in counts {
            let cfg = GeneratorConfig::preset(name).unwrap();
            assert_eq!(cfg.parameter_count(), want, "{name}");
        }
        let mut places = GeneratorConfig::large();
        places.class_num = 30;
        assert_eq!(places.parameter_count(), 643_502_848);
    }

    fn tiny() -> GeneratorConfig {
        let text = r#"{"attn_dropout":0.1,"buffer_size":16,"class_num":10,"cond_length":3,
            "decoder_depth":1,"decoder_embed_dim":64,"decoder_num_heads":4,"diffloss_d":2,
            "diffloss_w":64,"diffusion_batch_mul":4,"encoder_depth":1,"encoder_embed_dim":64,
            "encoder_num_heads":4,"grad_checkpointing":false,"img_size":256,"label_drop_prob":0.1,
            "norm_eps":1e-06,"num_sampling_steps":"8","parameter_count":213904,
            "proj_dropout":0.1,"shift_num":16,"token_num":16,"vae_embed_dim":16}"#;
        serde_json::from_str(text).unwrap()
    }

    #[test]
    fn formula_count_equals_the_real_module_tree() {
        let cfg = tiny();
        assert_eq!(cfg.num_sampling_steps, 8);
        let vs = nn::VarStore::new(Device::Cpu);
        let _model = EquivariantGenerativeModel::new(vs.root(), &cfg).unwrap();
        let real: i64 = vs
            .trainable_variables()
            .iter()
            .map(|t| t.numel() as i64)
            .sum();
        assert_eq!(real, 213_904);
        assert_eq!(cfg.parameter_count(), real);
        // 9 top-level + 24 per block + head (4 fixed pairs + 8 per res block + 2 final pairs).
        assert_eq!(vs.variables().len(), 9 + 24 * 2 + (4 * 2 + 8 * 2 + 4));
    }

    #[test]
    fn window_mask_allows_self_and_cond_length_previous_tokens() {
        let m = window_mask(6, 3, Device::Cpu);
        for i in 0..6i64 {
            for j in 0..6i64 {
                let want = j <= i && j >= i - 3;
                assert_eq!(m.int64_value(&[i, j]) != 0, want, "({i},{j})");
            }
        }
        let causal = window_mask(4, 0, Device::Cpu);
        assert_eq!(causal.sum(Kind::Int64).int64_value(&[]), 10);
    }

    #[test]
    fn train_mode_draws_a_shift_and_eval_mode_is_deterministic() {
        let cfg = tiny();
        let vs = nn::VarStore::new(Device::Cpu);
        let model = EquivariantGenerativeModel::new(vs.root(), &cfg).unwrap();
        let tokens = Tensor::randn([2, 5, 16], (Kind::Float, Device::Cpu));
        let ce = model
            .class_embedding(&Tensor::from_slice(&[1i64, 3]))
            .unwrap();
        let a = model.forward_encoder(&tokens, &ce, Mode::Eval).unwrap();
        let b = model.forward_encoder(&tokens, &ce, Mode::Eval).unwrap();
        assert!(a.equal(&b));
        let _g = tch::no_grad_guard();
        let t = model.forward_encoder(&tokens, &ce, Mode::Train).unwrap();
        assert_eq!(t.size(), vec![2, 5, 64]);
        assert!(model
            .class_embedding(&Tensor::from_slice(&[10i64]))
            .is_err());
    }
}
