//! One tokenizer training run: the autoencoder step then the discriminator step per batch (as
//! Lightning 1.4 runs two optimizers), EMA after each batch, stage 2, checkpoints.
//! Upstream: `tokenizer/models/tokenizer.py` (`training_step`, `configure_optimizers`,
//! `on_train_batch_end`, `init_from_ckpt`), `tokenizer/modules/losses/contperceptual.py`.

use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;
use std::path::Path;
use tch::{nn, Device, Kind, Tensor};

use super::config::{LossParams, TrainTokenizerConfig};
use super::losses;
use super::optim::{warm_up_decay_multiplier, Adam, AdamConfig, LitEma, WarmUpDecayConfig};
use crate::model::diffaug::DiffAug;
use crate::model::dino_disc::{DinoDisc, DinoDiscConfig, FrozenDinoSmall};
use crate::model::dinov2::Dinov2Teacher;
use crate::model::lpips::Lpips;
use crate::model::nlayer_disc::{NLayerDiscConfig, NLayerDiscriminator};
use crate::model::tokenizer::config::TokenizerConfig;
use crate::model::tokenizer::ema::EMA_MODULES;
use crate::model::tokenizer::{EquivariantTokenizer, WeightChoice};
use crate::model::weights;
use crate::precision::{self, Precision};

/// The decoder's last layer, whose gradients set the adaptive GAN weight (`get_last_layer`).
pub const LAST_LAYER: &str = "decoder.conv_out.weight";

/// Modules the stage-2 autoencoder optimizer steps (and whose EMA it updates: decoder and
/// post_quant_layer; the semantic decoder is optimized but its EMA is frozen, as the reference).
const STAGE2_TRAINED: [&str; 3] = ["decoder", "semantic_decoder", "post_quant_layer"];
const STAGE2_EMA: [&str; 2] = ["decoder", "post_quant_layer"];

/// The GAN discriminator (`disc_type`).
pub enum Discriminator {
    /// taming's PatchGAN on raw images.
    PatchGan(NLayerDiscriminator),
    /// DINO ViT-S heads on DiffAug-augmented images.
    Dino { disc: Box<DinoDisc>, aug: DiffAug },
}

impl Discriminator {
    /// Logits for images in [-1, 1] (augmented first for the DINO discriminator, a fresh draw
    /// per call as the reference).
    pub fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        match self {
            Self::PatchGan(d) => d.forward_t(xs, train),
            Self::Dino { disc, aug } => disc.forward_t(&aug.aug(xs), train),
        }
    }
}

/// The DINO discriminator's backbone: its config, its frozen store and the backbone.
pub type DinoTeacher = (DinoDiscConfig, nn::VarStore, FrozenDinoSmall);

/// The frozen pretrained networks a config's losses use (loaded by the caller).
#[derive(Default)]
pub struct Teachers {
    pub lpips: Option<Lpips>,
    /// For `disc_type: dino`: the backbone's config, its frozen store and the backbone.
    pub dino: Option<DinoTeacher>,
    /// For `semantic_loss_w > 0`: the DINOv2 teacher.
    pub dinov2: Option<Dinov2Teacher>,
}

/// Everything the loss needs besides the autoencoder.
pub struct LossNetworks {
    pub params: LossParams,
    pub lpips: Option<Lpips>,
    pub dinov2: Option<Dinov2Teacher>,
    /// `loss.discriminator.*`
    pub disc_vs: nn::VarStore,
    pub discriminator: Discriminator,
}

/// What one batch did, for logs and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StepLog {
    pub global_step: i64,
    /// Mean |x − x̂| per element (the reference logs `rec_loss` mean; this is its L1 part).
    pub l1: f64,
    pub nll: f64,
    pub kl: f64,
    pub g_loss: f64,
    pub d_weight: f64,
    pub disc_loss: f64,
    pub semantic: f64,
    pub lr: f64,
}

/// The training state: autoencoder, its EMAs, the loss networks and both optimizers.
pub struct TokenizerTrainer {
    pub device: Device,
    pub tok_cfg: TokenizerConfig,
    pub vs: nn::VarStore,
    pub model: EquivariantTokenizer,
    pub loss: LossNetworks,
    pub opt_ae: Adam,
    pub opt_disc: Adam,
    /// (module name, its EMA), all five modules; `ema_modules` says which are updated.
    pub emas: Vec<(String, LitEma)>,
    pub ema_modules: Vec<String>,
    pub base_lr: f64,
    pub schedule: Option<WarmUpDecayConfig>,
    pub stage2: bool,
    pub global_step: i64,
    /// `eqim.train.precision`: bf16 runs the forwards under autocast.
    pub precision: Precision,
}

/// Trainable variables of `vs` under `module.`, named relative to the module.
fn module_params(vs: &nn::VarStore, module: &str) -> Vec<(String, Tensor)> {
    let prefix = format!("{module}.");
    let mut out: Vec<(String, Tensor)> = vs
        .variables()
        .into_iter()
        .filter_map(|(k, v)| k.strip_prefix(&prefix).map(|rest| (rest.to_owned(), v)))
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

fn named_with_prefix(module: &str, params: Vec<(String, Tensor)>) -> Vec<(String, Tensor)> {
    params
        .into_iter()
        .map(|(k, v)| (format!("{module}.{k}"), v))
        .collect()
}

/// The adversarial loss's discriminator under `loss.discriminator`: DINO ViT-S/16 features with
/// DiffAug (`disc_type: dino`), else the PatchGAN.
fn build_discriminator(
    disc_vs: &nn::VarStore,
    lp: &LossParams,
    dino: Option<DinoTeacher>,
) -> Result<Discriminator> {
    let disc_path = disc_vs.root() / "loss" / "discriminator";
    Ok(match (lp.disc_type.as_str(), dino) {
        ("dino", Some((dino_cfg, backbone_vs, backbone))) => Discriminator::Dino {
            disc: Box::new(DinoDisc::new(disc_path, &dino_cfg, backbone_vs, backbone)),
            aug: DiffAug::default(),
        },
        ("dino", None) => {
            bail!("disc_type: dino needs the DINO ViT-S/16 backbone (eqim.weights.dino_vits16)")
        }
        _ => Discriminator::PatchGan(NLayerDiscriminator::new(
            disc_path,
            &NLayerDiscConfig {
                input_nc: lp.disc_in_channels,
                ndf: lp.disc_ndf,
                n_layers: lp.disc_num_layers,
            },
        )),
    })
}

/// The autoencoder parameters the stage trains, by module. In stage 2 the encoder and
/// quant_layer are frozen: without gradients they cost no backward pass and stay bitwise
/// unchanged.
fn trained_params(vs: &nn::VarStore, stage2: bool) -> Vec<(String, Tensor)> {
    let trained: Vec<&str> = if stage2 {
        STAGE2_TRAINED.to_vec()
    } else {
        vec![
            "encoder",
            "decoder",
            "semantic_decoder",
            "quant_layer",
            "post_quant_layer",
        ]
    };
    let mut params = Vec::new();
    for m in &trained {
        params.extend(named_with_prefix(m, module_params(vs, m)));
    }
    if stage2 {
        for (name, v) in vs.variables() {
            if name.starts_with("encoder.") || name.starts_with("quant_layer.") {
                let _ = v.set_requires_grad(false); // in place; returns an alias
            }
        }
    }
    params
}

/// A store's trainable variables, sorted by name (the optimizer's order).
fn sorted_trainable(vs: &nn::VarStore) -> Vec<(String, Tensor)> {
    let mut v: Vec<(String, Tensor)> = vs
        .variables()
        .into_iter()
        .filter(|(_, t)| t.requires_grad())
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

impl TokenizerTrainer {
    /// Builds the model, the loss networks and the optimizers. For stage 2, `init` holds the
    /// stage-1 checkpoint: its EMA weights become the live weights (`init_from_ckpt`).
    pub fn new(
        tok_cfg: &TokenizerConfig,
        cfg: &TrainTokenizerConfig,
        teachers: Teachers,
        device: Device,
    ) -> Result<Self> {
        let lp = cfg.model.params.lossconfig.params.clone();
        if lp.semantic_loss_w > 0.0 && teachers.dinov2.is_none() {
            bail!("semantic_loss_w > 0 needs the DINOv2 teacher (eqim.weights.dinov2_vitb14)");
        }
        let vs = nn::VarStore::new(device);
        let model = EquivariantTokenizer::new(vs.root(), tok_cfg);
        let disc_vs = nn::VarStore::new(device);
        let discriminator = build_discriminator(&disc_vs, &lp, teachers.dino)?;
        let stage2 = cfg.model.params.stage2;
        let emas = EMA_MODULES
            .iter()
            .map(|m| {
                (
                    (*m).to_owned(),
                    LitEma::new(module_params(&vs, m), cfg.model.params.ema_decay),
                )
            })
            .collect();
        let ema_modules: Vec<String> = if !cfg.model.params.use_ema {
            Vec::new()
        } else if stage2 {
            STAGE2_EMA.iter().map(|s| (*s).to_owned()).collect()
        } else {
            EMA_MODULES.iter().map(|s| (*s).to_owned()).collect()
        };
        let opt_ae = Adam::new(trained_params(&vs, stage2), AdamConfig::tokenizer());
        let opt_disc = Adam::new(sorted_trainable(&disc_vs), AdamConfig::tokenizer());
        Ok(Self {
            device,
            tok_cfg: tok_cfg.clone(),
            vs,
            model,
            loss: LossNetworks {
                params: lp,
                lpips: teachers.lpips,
                dinov2: teachers.dinov2,
                disc_vs,
                discriminator,
            },
            opt_ae,
            opt_disc,
            emas,
            ema_modules,
            base_lr: cfg.model.base_learning_rate,
            schedule: cfg.schedule(),
            stage2,
            global_step: 0,
            precision: cfg.eqim.train.precision,
        })
    }

    /// 1 or 2.
    pub fn stage(&self) -> i64 {
        if self.stage2 {
            2
        } else {
            1
        }
    }

    /// The autoencoder LR at the current step (the schedule drives opt_ae only).
    pub fn ae_lr(&self) -> f64 {
        match &self.schedule {
            Some(s) => self.base_lr * warm_up_decay_multiplier(self.global_step, s),
            None => self.base_lr,
        }
    }

    fn last_layer(&self) -> Result<Tensor> {
        self.vs
            .variables()
            .remove(LAST_LAYER)
            .with_context(|| format!("the tokenizer has no {LAST_LAYER}"))
    }

    fn set_disc_trainable(&mut self, on: bool) {
        // freeze/unfreeze touch only trainable variables, not the BatchNorm running stats
        if on {
            self.loss.disc_vs.unfreeze();
        } else {
            self.loss.disc_vs.freeze();
        }
    }

    /// Encode, sample the posterior, decode: (x̂, posterior mean).
    fn reconstruct(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let posterior = self.model.encode(x)?;
        let z = posterior.sample();
        let xrec = self.model.decode(&z)?;
        Ok((xrec, posterior.mean))
    }

    /// The training forward: reconstruction (from a posterior sample) and posterior mean in
    /// float32, and the semantic decoder's output when `semantic` (the reference always runs
    /// it; here it runs only when its loss counts).
    fn autoencode(&self, x: &Tensor, semantic: bool) -> Result<(Tensor, Tensor, Option<Tensor>)> {
        let posterior = self.model.encode(x)?;
        let z = posterior.sample();
        let mean = precision::to_fp32(&posterior.mean);
        let (xrec, semantic_out) = match (&self.loss.dinov2, semantic) {
            (Some(_), true) => {
                let (image, semantic) = self.model.decode_with_semantic(&z)?;
                (image, Some(semantic))
            }
            _ => (self.model.decode(&z)?, None),
        };
        Ok((precision::to_fp32(&xrec), mean, semantic_out))
    }

    /// One batch: the autoencoder step, then the discriminator step, then the EMAs.
    pub fn train_step(&mut self, x: &Tensor) -> Result<StepLog> {
        let x = x.to_device(self.device).to_kind(Kind::Float);
        let step = self.global_step;
        let lp = self.loss.params.clone();
        let mut log = StepLog {
            global_step: step,
            lr: self.ae_lr(),
            ..Default::default()
        };
        let disc_factor = losses::adopt_weight(lp.disc_factor, step, lp.disc_start);

        let semantic_factor =
            losses::adopt_weight(lp.semantic_loss_w, step, lp.semantic_iter_start);

        // optimizer_idx 0: the autoencoder (Lightning freezes the other optimizer's params)
        self.set_disc_trainable(false);
        // bf16: the forwards run under autocast; the losses are reduced in float32 and the
        // backward and optimizer steps run after the guard is dropped.
        let autocast = precision::enter(self.precision, self.device);
        let (xrec, mean, semantic_out) = self.autoencode(&x, semantic_factor > 0.0)?;
        let p_loss = self
            .loss
            .lpips
            .as_ref()
            .map(|l| precision::to_fp32(&l.forward_t(&x, &xrec, true)));
        let nll = losses::nll_loss(
            &x,
            &xrec,
            p_loss.as_ref().map(|p| (p, lp.perceptual_weight)),
        );
        let kl = losses::kl_loss(&mean);
        let mut total = &nll + &kl * lp.kl_weight;
        if let (Some(teacher), Some(out)) = (&self.loss.dinov2, &semantic_out) {
            let (_, _, h, w) = out
                .size4()
                .context("semantic decoder output must be [B, C, h, w]")?;
            let features = teacher.patch_features(&x, h, w);
            let semantic = precision::to_fp32(&losses::semantic_loss(out, &features));
            log.semantic = semantic.double_value(&[]);
            total += semantic * semantic_factor;
        }
        if disc_factor > 0.0 {
            let logits_fake = precision::to_fp32(&self.loss.discriminator.forward_t(&xrec, true));
            let g_loss = losses::generator_hinge_loss(&logits_fake);
            let d_weight =
                losses::adaptive_weight(&nll, &g_loss, &self.last_layer()?, lp.disc_weight);
            total += &g_loss * (d_weight * disc_factor);
            log.g_loss = g_loss.double_value(&[]);
            log.d_weight = d_weight;
        }
        drop(autocast);
        self.opt_ae.zero_grad();
        total.backward();
        self.opt_ae.step(log.lr);
        log.l1 = (&x - &xrec).abs().mean(Kind::Float).double_value(&[]);
        log.nll = nll.double_value(&[]);
        log.kl = kl.double_value(&[]);
        drop((total, nll, kl, xrec, p_loss, semantic_out));

        // optimizer_idx 1: the discriminator, on a fresh forward pass as Lightning runs it
        self.set_disc_trainable(true);
        log.disc_loss = self.discriminator_step(&x, disc_factor)?;

        // on_train_batch_end
        for (name, ema) in &mut self.emas {
            if self.ema_modules.contains(name) {
                ema.update();
            }
        }
        self.global_step += 1;
        Ok(log)
    }

    /// optimizer_idx 1: the discriminator on a fresh forward pass (as Lightning runs it); its
    /// loss, 0 while the discriminator is not yet on.
    fn discriminator_step(&mut self, x: &Tensor, disc_factor: f64) -> Result<f64> {
        let lp = &self.loss.params;
        if disc_factor <= 0.0 {
            // The reference backpropagates 0·d_loss: an Adam step with zero gradients.
            self.opt_disc.step_zero_gradients(self.base_lr);
            return Ok(0.0);
        }
        let autocast = precision::enter(self.precision, self.device);
        let xrec = tch::no_grad(|| self.reconstruct(x))?.0;
        let logits_real = precision::to_fp32(&self.loss.discriminator.forward_t(x, true));
        let logits_fake = precision::to_fp32(&self.loss.discriminator.forward_t(&xrec, true));
        drop(autocast);
        let d_loss = match lp.disc_loss.as_str() {
            "vanilla" => losses::vanilla_d_loss(&logits_real, &logits_fake),
            _ => losses::hinge_d_loss(&logits_real, &logits_fake),
        } * disc_factor;
        self.opt_disc.zero_grad();
        d_loss.backward();
        self.opt_disc.step(self.base_lr);
        Ok(d_loss.double_value(&[]))
    }

    /// Reconstructions with the posterior mean (no noise) under `no_grad`.
    pub fn reconstruct_mode(&self, x: &Tensor) -> Result<Tensor> {
        let _guard = tch::no_grad_guard();
        let x = x.to_device(self.device).to_kind(Kind::Float);
        let mean = self.model.encode(&x)?.mode();
        Ok(self.model.decode(&mean)?)
    }

    /// Like [`TokenizerTrainer::reconstruct_mode`] with the EMA weights swapped in (the weights
    /// inference uses); the live weights are restored afterwards.
    pub fn reconstruct_ema(&self, x: &Tensor) -> Result<Tensor> {
        let _guard = tch::no_grad_guard();
        let live: Vec<(Tensor, Tensor)> = self
            .vs
            .variables()
            .into_values()
            .map(|v| {
                let saved = v.copy();
                (v, saved)
            })
            .collect();
        for (_, ema) in &self.emas {
            ema.copy_to_live();
        }
        let out = self.reconstruct_mode(x);
        for (mut v, saved) in live {
            v.copy_(&saved);
        }
        out
    }

    /// Model weights (live + EMA) and the discriminator, loadable by `EquivariantTokenizer::load`.
    pub fn model_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out: Vec<(String, Tensor)> = self
            .vs
            .variables()
            .into_iter()
            .chain(self.loss.disc_vs.variables())
            .map(|(k, v)| (k, v.detach().copy()))
            .collect();
        for (name, ema) in &self.emas {
            out.extend(ema.state_tensors(&format!("ema_{name}")));
        }
        out
    }

    /// The full training state: model, EMAs, discriminator, both optimizers, the step.
    pub fn checkpoint_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out = self.model_tensors();
        out.extend(self.opt_ae.state_tensors("optimizer_ae"));
        out.extend(self.opt_disc.state_tensors("optimizer_disc"));
        out.push(("global_step".into(), Tensor::from(self.global_step)));
        out.push(("stage".into(), Tensor::from(self.stage())));
        out
    }

    /// Writes the training state to `path` atomically (CPU tensors, sorted names).
    pub fn save_checkpoint(&self, path: &Path) -> Result<()> {
        let mut named: Vec<(String, Tensor)> = self
            .checkpoint_tensors()
            .into_iter()
            .map(|(k, v)| (k, v.to_device(Device::Cpu).contiguous()))
            .collect();
        named.sort_by(|a, b| a.0.cmp(&b.0));
        weights::write_safetensors_atomic(&named, path)
    }

    /// Writes the model (live + EMA + discriminator) without optimizer state.
    pub fn save_model(&self, path: &Path) -> Result<()> {
        let mut named: Vec<(String, Tensor)> = self
            .model_tensors()
            .into_iter()
            .map(|(k, v)| (k, v.to_device(Device::Cpu).contiguous()))
            .collect();
        named.sort_by(|a, b| a.0.cmp(&b.0));
        weights::write_safetensors_atomic(&named, path)
    }

    /// Resumes from a checkpoint written by [`TokenizerTrainer::save_checkpoint`].
    pub fn resume(&mut self, path: &Path) -> Result<()> {
        let file = weights::read_safetensors(path)?;
        let source = path.display().to_string();
        let stage = file.get("stage").map(|t| t.int64_value(&[]));
        if stage != Some(self.stage()) {
            bail!(
                "{source} is a stage-{} checkpoint but this config trains stage {}: give this \
                 run its own eqim.train.out_dir (or set eqim.train.resume: false)",
                stage.map_or("?".to_owned(), |s| s.to_string()),
                self.stage()
            );
        }
        let live = select_prefixed(&file, |k| {
            !k.starts_with("ema_")
                && !k.starts_with("optimizer_")
                && !k.starts_with("loss.")
                && k != "global_step"
                && k != "stage"
        });
        weights::load_strict(&self.vs, &live, &source, |_| false)?;
        let disc = select_prefixed(&file, |k| k.starts_with("loss.discriminator."));
        weights::load_strict(&self.loss.disc_vs, &disc, &source, |_| false)?;
        for (name, ema) in &mut self.emas {
            ema.load_state(&format!("ema_{name}"), &file)
                .with_context(|| format!("resuming from {source}"))?;
        }
        self.opt_ae
            .load_state("optimizer_ae", &file)
            .with_context(|| format!("resuming from {source}"))?;
        self.opt_disc
            .load_state("optimizer_disc", &file)
            .with_context(|| format!("resuming from {source}"))?;
        let Some(step) = file.get("global_step") else {
            bail!("{source} has no global_step: not a train-tokenizer checkpoint");
        };
        self.global_step = step.int64_value(&[]);
        Ok(())
    }

    /// Stage 2's `init_from_ckpt`: every live module takes its stage-1 EMA weights, the EMAs
    /// (and their update counts) continue from the checkpoint; the discriminator is restored.
    pub fn init_stage2_from(&mut self, path: &Path) -> Result<()> {
        let file = weights::read_safetensors(path)?;
        let source = path.display().to_string();
        let model_keys = select_prefixed(&file, |k| {
            !k.starts_with("optimizer_") && k != "global_step" && k != "stage"
        });
        EquivariantTokenizer::load(&self.vs, &model_keys, &source, Some(WeightChoice::Ema))
            .with_context(|| format!("stage 2: loading the stage-1 EMA weights from {source}"))?;
        for (name, ema) in &mut self.emas {
            ema.load_state(&format!("ema_{name}"), &file)
                .with_context(|| format!("stage 2: EMA state from {source}"))?;
        }
        let disc = select_prefixed(&file, |k| k.starts_with("loss.discriminator."));
        if !disc.is_empty() {
            weights::load_strict(&self.loss.disc_vs, &disc, &source, |_| false)?;
        }
        Ok(())
    }
}

fn select_prefixed(
    file: &BTreeMap<String, Tensor>,
    keep: impl Fn(&str) -> bool,
) -> BTreeMap<String, Tensor> {
    file.iter()
        .filter(|(k, _)| keep(k))
        .map(|(k, v)| (k.clone(), v.shallow_clone()))
        .collect()
}
