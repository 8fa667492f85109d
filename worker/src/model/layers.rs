//! Transformer building blocks of the generator: Linear/LayerNorm with the reference's exact ATen
//! ops, the window mask, RoPE, and `MaskedBlockRoPECrossAttn` (windowed self-attention over image
//! tokens, cross-attention to the class tokens, an MLP over all tokens).
//!
//! Upstream: <https://github.com/drx-code/EquivariantModeling/blob/main/generator/equ_modeling.py>
//! (timm 0.9.12 `Block`/`Attention`/`Mlp` semantics).

use tch::{nn, Device, Kind, Tensor};

/// `nn.Linear` with the reference's op: `at::linear` (one addmm for contiguous 2-D/3-D inputs),
/// which rounds differently from tch's `matmul + bias`.
#[derive(Debug)]
pub struct Linear {
    pub weight: Tensor,
    pub bias: Tensor,
}

impl Linear {
    /// Xavier-uniform weight and zero bias, as the reference's `_init_weights`.
    pub fn new(p: nn::Path, in_dim: i64, out_dim: i64) -> Self {
        let bound = (6.0 / (in_dim + out_dim) as f64).sqrt();
        Self::with_init(
            p,
            in_dim,
            out_dim,
            nn::Init::Uniform {
                lo: -bound,
                up: bound,
            },
        )
    }

    /// Zero weight and bias (the head's adaLN modulations and final linear start at zero).
    pub fn zeros(p: nn::Path, in_dim: i64, out_dim: i64) -> Self {
        Self::with_init(p, in_dim, out_dim, nn::Init::Const(0.0))
    }

    pub fn with_init(p: nn::Path, in_dim: i64, out_dim: i64, weight_init: nn::Init) -> Self {
        Self {
            weight: p.var("weight", &[out_dim, in_dim], weight_init),
            bias: p.var("bias", &[out_dim], nn::Init::Const(0.0)),
        }
    }
}

impl nn::Module for Linear {
    fn forward(&self, xs: &Tensor) -> Tensor {
        xs.linear(&self.weight, Some(&self.bias))
    }
}

/// `nn.LayerNorm` over the last dim with a per-module eps (1e-6 or 1e-5: see reference.md §8.3).
#[derive(Debug)]
pub struct LayerNorm {
    pub weight: Option<Tensor>,
    pub bias: Option<Tensor>,
    pub dim: i64,
    pub eps: f64,
}

impl LayerNorm {
    pub fn new(p: nn::Path, dim: i64, eps: f64) -> Self {
        Self {
            weight: Some(p.var("weight", &[dim], nn::Init::Const(1.0))),
            bias: Some(p.var("bias", &[dim], nn::Init::Const(0.0))),
            dim,
            eps,
        }
    }

    /// `elementwise_affine=False`: no parameters, no state_dict keys.
    pub fn no_affine(dim: i64, eps: f64) -> Self {
        Self {
            weight: None,
            bias: None,
            dim,
            eps,
        }
    }
}

impl nn::Module for LayerNorm {
    fn forward(&self, xs: &Tensor) -> Tensor {
        xs.layer_norm(
            [self.dim],
            self.weight.as_ref(),
            self.bias.as_ref(),
            self.eps,
            true,
        )
    }
}

/// timm `Mlp`: fc1 -> exact (erf) GELU -> dropout -> fc2 -> dropout.
#[derive(Debug)]
pub struct Mlp {
    pub fc1: Linear,
    pub fc2: Linear,
    pub drop: f64,
}

impl Mlp {
    pub fn new(p: nn::Path, dim: i64, hidden: i64, drop: f64) -> Self {
        Self {
            fc1: Linear::new(&p / "fc1", dim, hidden),
            fc2: Linear::new(&p / "fc2", hidden, dim),
            drop,
        }
    }

    pub fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        let h = xs
            .apply(&self.fc1)
            .gelu("none")
            .dropout(self.drop, train)
            .apply(&self.fc2);
        h.dropout(self.drop, train)
    }
}

/// The windowed causal mask over `len` image tokens: `mask[i, j]` is true (may attend) iff
/// `i - cond_length <= j <= i`; `cond_length == 0` means plain causal.
pub fn window_mask(len: i64, cond_length: i64, device: Device) -> Tensor {
    let ones = Tensor::ones([len, len], (Kind::Float, device));
    let causal = ones.triu(1).rsub_scalar(1.0);
    let mask = if cond_length > 0 {
        causal - ones.triu(-cond_length).rsub_scalar(1.0)
    } else {
        causal
    };
    mask.to_kind(Kind::Bool)
}

/// RoPE table `[len, head_dim/2, 2]` of (cos, sin) for positions `offset .. offset+len`, built on
/// the CPU in f32 with the reference's op order (arange -> div -> pow -> reciprocal, outer, polar),
/// then moved to `device`. `offset` is the training shift (0 in eval).
pub fn rope_table(len: i64, head_dim: i64, offset: i64, device: Device) -> Tensor {
    let exponents = Tensor::arange_start_step(0, head_dim, 2, (Kind::Int64, Device::Cpu))
        .narrow(0, 0, head_dim / 2)
        .to_kind(Kind::Float)
        / head_dim as f64;
    let freqs = Tensor::pow_scalar(10000i64, &exponents).reciprocal() * 1.0;
    let positions = Tensor::arange(len, (Kind::Int64, Device::Cpu)) + offset;
    let angles = positions.outer(&freqs); // [len, hd/2], f32
    let cis = Tensor::polar(&Tensor::ones_like(&angles), &angles);
    cis.view_as_real().contiguous().to_device(device)
}

/// Rotates interleaved pairs of `x` `[B, N, H, hd]` by the table `[N, hd/2, 2]`.
pub fn apply_rotary_emb(xs: &Tensor, table: &Tensor) -> Tensor {
    let (b, n, h, hd) = xs.size4().expect("rope: x must be [B, N, H, hd]");
    let pairs = xs.reshape([b, n, h, hd / 2, 2]); // [B, N, H, hd/2, 2]
    let cis = table.view([1, n, 1, hd / 2, 2]);
    let (x0, x1) = (pairs.select(4, 0), pairs.select(4, 1));
    let (cos, sin) = (cis.select(4, 0), cis.select(4, 1));
    let out0 = &x0 * &cos - &x1 * &sin;
    let out1 = &x1 * &cos + &x0 * &sin;
    Tensor::stack(&[out0, out1], -1).flatten(3, -1) // [B, N, H, hd]
}

/// Keys and values of a self-attention, `[B, H, N, hd]` each, as handed to SDPA.
pub struct KeyValue {
    pub k: Tensor,
    pub v: Tensor,
}

/// `MaskedAttentionRoPE` (cls_token_num 0): self-attention among image tokens with RoPE on q and k.
#[derive(Debug)]
pub struct MaskedAttentionRoPE {
    pub qkv: Linear,
    pub proj: Linear,
    pub num_heads: i64,
    pub attn_drop: f64,
    pub proj_drop: f64,
}

impl MaskedAttentionRoPE {
    pub fn new(p: nn::Path, dim: i64, num_heads: i64, attn_drop: f64, proj_drop: f64) -> Self {
        Self {
            qkv: Linear::new(&p / "qkv", dim, 3 * dim),
            proj: Linear::new(&p / "proj", dim, dim),
            num_heads,
            attn_drop,
            proj_drop,
        }
    }

    /// q, k (rotated) and v, `[B, H, N, hd]` each, with the reference's strides.
    pub fn qkv_rotated(&self, xs: &Tensor, rope: &Tensor) -> (Tensor, Tensor, Tensor) {
        let (b, n, c) = xs.size3().expect("attn: x must be [B, N, C]");
        let hd = c / self.num_heads;
        let qkv = xs
            .apply(&self.qkv)
            .reshape([b, n, 3, self.num_heads, hd])
            .permute([2, 0, 3, 1, 4]); // [3, B, H, N, hd]
        let (q, k, v) = (qkv.get(0), qkv.get(1), qkv.get(2));
        let q = apply_rotary_emb(&q.permute([0, 2, 1, 3]), rope).permute([0, 2, 1, 3]);
        let k = apply_rotary_emb(&k.permute([0, 2, 1, 3]), rope).permute([0, 2, 1, 3]);
        (q, k, v)
    }

    /// Attention of queries `q` `[B, H, Nq, hd]` over keys/values `[B, H, Nk, hd]`, then proj.
    pub fn attend(&self, q: &Tensor, kv: &KeyValue, mask: &Tensor, train: bool) -> Tensor {
        let (b, _, nq, hd) = q.size4().expect("attn: q must be [B, H, N, hd]");
        let dropout = if train { self.attn_drop } else { 0.0 };
        let out = Tensor::scaled_dot_product_attention(
            q,
            &kv.k,
            &kv.v,
            Some(mask.unsqueeze(0).unsqueeze(0)),
            dropout,
            false,
            None::<f64>,
            false,
        );
        let out = out.transpose(1, 2).reshape([b, nq, self.num_heads * hd]); // [B, N, C]
        out.apply(&self.proj).dropout(self.proj_drop, train)
    }

    pub fn forward_t(&self, xs: &Tensor, mask: &Tensor, rope: &Tensor, train: bool) -> Tensor {
        let (q, k, v) = self.qkv_rotated(xs, rope);
        self.attend(&q, &KeyValue { k, v }, mask, train)
    }
}

/// `MaskedAttentionCrossRoPE`: image tokens (queries, rotated) attend to the class tokens (keys and
/// values, not rotated: the logits depend on the query's absolute position). `qkv` is the D->D
/// query projection despite its name.
#[derive(Debug)]
pub struct MaskedAttentionCrossRoPE {
    pub qkv: Linear,
    pub proj: Linear,
    pub k: Linear,
    pub v: Linear,
    pub num_heads: i64,
    pub attn_drop: f64,
    pub proj_drop: f64,
}

impl MaskedAttentionCrossRoPE {
    pub fn new(p: nn::Path, dim: i64, num_heads: i64, attn_drop: f64, proj_drop: f64) -> Self {
        Self {
            qkv: Linear::new(&p / "qkv", dim, dim),
            proj: Linear::new(&p / "proj", dim, dim),
            k: Linear::new(&p / "k", dim, dim),
            v: Linear::new(&p / "v", dim, dim),
            num_heads,
            attn_drop,
            proj_drop,
        }
    }

    /// Keys and values of the (normed) class tokens `[B, NB, C]` -> `[B, H, NB, hd]` each.
    pub fn cond_kv(&self, cond: &Tensor) -> KeyValue {
        let (b, nb, c) = cond.size3().expect("attn2: cond must be [B, NB, C]");
        let heads = |t: Tensor| {
            t.reshape([b, nb, self.num_heads, c / self.num_heads])
                .permute([0, 2, 1, 3])
        };
        KeyValue {
            k: heads(cond.apply(&self.k)),
            v: heads(cond.apply(&self.v)),
        }
    }

    pub fn forward_t(&self, xs: &Tensor, kv: &KeyValue, rope: &Tensor, train: bool) -> Tensor {
        let (b, n, c) = xs.size3().expect("attn2: x must be [B, N, C]");
        let hd = c / self.num_heads;
        let q = xs
            .apply(&self.qkv)
            .reshape([b, n, self.num_heads, hd])
            .permute([0, 2, 1, 3]); // [B, H, N, hd]
        let q = apply_rotary_emb(&q.permute([0, 2, 1, 3]), rope).permute([0, 2, 1, 3]);
        let dropout = if train { self.attn_drop } else { 0.0 };
        let out = Tensor::scaled_dot_product_attention(
            &q,
            &kv.k,
            &kv.v,
            None::<Tensor>,
            dropout,
            false,
            None::<f64>,
            false,
        );
        let out = out.transpose(1, 2).reshape([b, n, c]); // [B, N, C]
        out.apply(&self.proj).dropout(self.proj_drop, train)
    }
}

/// Hyper-parameters shared by every block.
#[derive(Debug, Clone, Copy)]
pub struct BlockConfig {
    pub dim: i64,
    pub num_heads: i64,
    pub mlp_hidden: i64,
    pub buffer_size: i64,
    pub norm_eps: f64,
    pub attn_drop: f64,
    pub proj_drop: f64,
}

/// PyTorch's `nn.LayerNorm` default, used by the two cross-attention norms.
pub const CROSS_NORM_EPS: f64 = 1e-5;

/// `MaskedBlockRoPECrossAttn`: pre-norm self-attention and cross-attention on the image tokens,
/// then an MLP on all tokens (class tokens included).
#[derive(Debug)]
pub struct MaskedBlockRoPECrossAttn {
    pub norm1: LayerNorm,
    pub attn: MaskedAttentionRoPE,
    pub norm2: LayerNorm,
    pub mlp: Mlp,
    pub attn2: MaskedAttentionCrossRoPE,
    pub cross_norm: LayerNorm,
    pub cross_cond_norm: LayerNorm,
    pub buffer_size: i64,
}

impl MaskedBlockRoPECrossAttn {
    pub fn new(p: nn::Path, cfg: &BlockConfig) -> Self {
        let (d, h) = (cfg.dim, cfg.num_heads);
        Self {
            norm1: LayerNorm::new(&p / "norm1", d, cfg.norm_eps),
            attn: MaskedAttentionRoPE::new(&p / "attn", d, h, cfg.attn_drop, cfg.proj_drop),
            norm2: LayerNorm::new(&p / "norm2", d, cfg.norm_eps),
            mlp: Mlp::new(&p / "mlp", d, cfg.mlp_hidden, cfg.proj_drop),
            attn2: MaskedAttentionCrossRoPE::new(&p / "attn2", d, h, cfg.attn_drop, cfg.proj_drop),
            cross_norm: LayerNorm::new(&p / "cross_norm", d, CROSS_NORM_EPS),
            cross_cond_norm: LayerNorm::new(&p / "cross_cond_norm", d, CROSS_NORM_EPS),
            buffer_size: cfg.buffer_size,
        }
    }

    /// `xs`: `[B, NB + L, D]` (class tokens first). `mask` `[L, L]`, `rope` `[L, hd/2, 2]`.
    pub fn forward_t(&self, xs: &Tensor, mask: &Tensor, rope: &Tensor, train: bool) -> Tensor {
        let len = xs.size()[1] - self.buffer_size;
        let cond = xs.narrow(1, 0, self.buffer_size); // [B, NB, D]
        let img = xs.narrow(1, self.buffer_size, len); // [B, L, D]
        let a = self
            .attn
            .forward_t(&img.apply(&self.norm1), mask, rope, train);
        let img = img + a;
        let kv = self.attn2.cond_kv(&cond.apply(&self.cross_cond_norm));
        let a2 = self
            .attn2
            .forward_t(&img.apply(&self.cross_norm), &kv, rope, train);
        let img = img + a2;
        let h = Tensor::cat(&[cond, img], 1);
        let m = self.mlp.forward_t(&h.apply(&self.norm2), train);
        h + m
    }
}
