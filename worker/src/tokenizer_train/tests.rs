//! End-to-end tests of tokenizer training on a tiny tokenizer and generated images.

use super::config::TrainTokenizerConfig;
use super::trainer::TokenizerTrainer;
use super::*;
use crate::model::tokenizer::config::TokenizerConfig;
use tch::{Kind, Tensor};

/// A tiny tokenizer (16-px images, 8 tokens of 8 channels) with L1 + KL + PatchGAN.
fn tiny_yaml(disc_start: i64, extra_params: &str) -> String {
    format!(
        r#"
model:
  base_learning_rate: 2.0e-3
  params:
    embed_dim: 8
    post_channels: 64
    std: 2.5
{extra_params}
    ddconfig: {{double_enc: false, z_channels: 8, resolution: 16, in_channels: 3, out_ch: 3, ch: 32,
               ch_mult: [1, 2], num_res_blocks: 1, dropout: 0.0, attn_resolutions: [],
               len_down_scale: 1, semantic_map: res}}
    sematicconfig: {{z_channels: 8, resolution: 16, in_channels: 3, out_ch: 96, ch: 32,
                    ch_mult: [2, 3], num_res_blocks: 1, dropout: 0.0, attn_resolutions: [],
                    downsample_scale: 0}}
    lossconfig:
      target: tokenizer.modules.losses.contperceptual.LPIPSWithDiscriminator
      params: {{disc_start: {disc_start}, kl_weight: 0.01, disc_weight: 0.5, disc_type: patchgan,
               disc_ndf: 8, disc_num_layers: 2, perceptual_weight: 0.0, semantic_loss_w: 0.0}}
data: {{params: {{batch_size: 4}}}}
eqim:
  data: {{train_dir: /unused, height: 16, width: 16}}
  train: {{max_steps: 10, out_dir: /unused}}
"#
    )
}

fn configs(yaml: &str) -> (TrainTokenizerConfig, TokenizerConfig) {
    let cfg = TrainTokenizerConfig::from_yaml(yaml, "test config").expect("train config");
    let value: serde_yaml::Value = serde_yaml::from_str(yaml).expect("yaml");
    let tok = TokenizerConfig::from_value(value).expect("tokenizer config");
    (cfg, tok)
}

/// Smooth colour gradients in [-1, 1]: [n, 3, 16, 16].
fn generated_images(n: i64) -> Tensor {
    let coords = Tensor::linspace(-1.0, 1.0, 16, (Kind::Float, tch::Device::Cpu));
    let yy = coords.view([1, 1, 16, 1]);
    let xx = coords.view([1, 1, 1, 16]);
    let a = Tensor::rand([n, 3, 1, 1], (Kind::Float, tch::Device::Cpu)) - 0.5;
    let b = Tensor::rand([n, 3, 1, 1], (Kind::Float, tch::Device::Cpu)) - 0.5;
    let c = Tensor::rand([n, 3, 1, 1], (Kind::Float, tch::Device::Cpu)) - 0.5;
    (a + b * xx + c * yy).clamp(-1.0, 1.0)
}

/// One intra-op thread: the suite runs tests in parallel on shared cores.
fn setup(seed: i64) {
    tch::set_num_threads(1);
    tch::manual_seed(seed);
}

fn l1(trainer: &TokenizerTrainer, x: &Tensor) -> f64 {
    let rec = trainer.reconstruct_mode(x).expect("reconstruct");
    (rec - x).abs().mean(Kind::Float).double_value(&[])
}

fn snapshot(trainer: &TokenizerTrainer, prefixes: &[&str]) -> Vec<(String, Tensor)> {
    let mut v: Vec<(String, Tensor)> = trainer
        .vs
        .variables()
        .into_iter()
        .filter(|(k, _)| prefixes.iter().any(|p| k.starts_with(p)))
        .map(|(k, t)| (k, t.detach().copy()))
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

#[test]
fn short_run_on_generated_images_lowers_reconstruction_loss() {
    setup(1);
    let (cfg, tok) = configs(&tiny_yaml(15, ""));
    let mut trainer = build_trainer(&cfg, &tok, tch::Device::Cpu).expect("trainer");
    let images = generated_images(8);
    let before = l1(&trainer, &images);
    let mut last_log = None;
    for step in 0..20 {
        let idx = Tensor::from_slice(&[
            (step * 4) % 8,
            (step * 4 + 1) % 8,
            (step * 4 + 2) % 8,
            (step * 4 + 3) % 8,
        ]);
        last_log = Some(
            trainer
                .train_step(&images.index_select(0, &idx))
                .expect("step"),
        );
    }
    let after = l1(&trainer, &images);
    // the EMA reconstruction swaps weights in and restores the live ones
    let live_before = snapshot(&trainer, &["decoder."]);
    let _ema_rec = trainer.reconstruct_ema(&images).expect("ema reconstruct");
    let live_after = snapshot(&trainer, &["decoder."]);
    assert!(live_before
        .iter()
        .zip(&live_after)
        .all(|((_, a), (_, b))| a.equal(b)));
    assert_eq!(l1(&trainer, &images), after);
    eprintln!("L1 {before:.4} -> {after:.4}");
    assert!(after < 0.6 * before, "L1 {before:.4} -> {after:.4}");
    let log = last_log.expect("ran");
    // past disc_start: the GAN term and its adaptive weight are active
    assert_eq!(log.global_step, 19);
    assert!(log.d_weight > 0.0 && log.disc_loss > 0.0, "{log:?}");
    // every module's EMA was updated 20 times
    assert!(trainer.emas.iter().all(|(_, e)| e.num_updates == 20));
}

#[test]
fn stage2_trains_the_decoder_and_leaves_the_encoder_bitwise_untouched() {
    setup(2);
    let dir = tempfile::tempdir().expect("tempdir");
    let (cfg1, tok) = configs(&tiny_yaml(1, ""));
    let mut stage1 = build_trainer(&cfg1, &tok, tch::Device::Cpu).expect("stage 1");
    let images = generated_images(4);
    for _ in 0..3 {
        stage1.train_step(&images).expect("step");
    }
    let ckpt = dir.path().join("stage1.safetensors");
    stage1.save_checkpoint(&ckpt).expect("save");
    let stage1_ema: Vec<(String, Tensor)> = stage1
        .emas
        .iter()
        .find(|(n, _)| n == "encoder")
        .expect("encoder ema")
        .1
        .shadows()
        .map(|(n, t)| (n.to_owned(), t.copy()))
        .collect();

    let extra = format!("    stage2: true\n    ckpt_path: {}", ckpt.display());
    let (cfg2, tok2) = configs(&tiny_yaml(1, &extra));
    let mut stage2 = build_trainer(&cfg2, &tok2, tch::Device::Cpu).expect("stage 2");
    // init_from_ckpt: the live encoder is the stage-1 EMA
    for (name, shadow) in &stage1_ema {
        let live = &stage2.vs.variables()[&format!("encoder.{name}")];
        assert!(live.equal(shadow), "encoder.{name} is not the stage-1 EMA");
    }
    let frozen = snapshot(&stage2, &["encoder.", "quant_layer."]);
    let trained = snapshot(&stage2, &["decoder.", "post_quant_layer."]);
    for _ in 0..3 {
        stage2.train_step(&images).expect("step");
    }
    for (name, before) in &frozen {
        assert!(
            stage2.vs.variables()[name].equal(before),
            "{name} changed in stage 2"
        );
    }
    let changed = trained
        .iter()
        .filter(|(name, before)| !stage2.vs.variables()[name].equal(before))
        .count();
    assert!(
        changed > trained.len() / 2,
        "{changed} of {} decoder tensors changed",
        trained.len()
    );
    // only the decoder and post_quant_layer EMAs advance (3 stage-1 updates + 3)
    for (name, ema) in &stage2.emas {
        let want = if name == "decoder" || name == "post_quant_layer" {
            6
        } else {
            3
        };
        assert_eq!(ema.num_updates, want, "ema_{name}");
    }
    assert!(!stage2
        .opt_ae
        .param_names()
        .any(|n| n.starts_with("encoder.")));
}

#[test]
fn checkpoints_resume_the_full_training_state() {
    setup(3);
    let dir = tempfile::tempdir().expect("tempdir");
    let (cfg, tok) = configs(&tiny_yaml(1, ""));
    let mut a = build_trainer(&cfg, &tok, tch::Device::Cpu).expect("trainer");
    let images = generated_images(4);
    for _ in 0..2 {
        a.train_step(&images).expect("step");
    }
    let path = dir.path().join("last.safetensors");
    a.save_checkpoint(&path).expect("save");
    let mut b = build_trainer(&cfg, &tok, tch::Device::Cpu).expect("trainer");
    b.resume(&path).expect("resume");
    // a stage-2 run refuses to resume a stage-1 training state
    let extra = format!("    stage2: true\n    ckpt_path: {}", path.display());
    let (cfg2, tok2) = configs(&tiny_yaml(1, &extra));
    let mut c = build_trainer(&cfg2, &tok2, tch::Device::Cpu).expect("stage 2");
    let err = format!("{:#}", c.resume(&path).expect_err("refused"));
    assert!(
        err.contains("stage-1 checkpoint") && err.contains("out_dir"),
        "{err}"
    );
    assert_eq!(b.global_step, 2);
    let sa: std::collections::BTreeMap<String, Tensor> =
        a.checkpoint_tensors().into_iter().collect();
    let sb: std::collections::BTreeMap<String, Tensor> =
        b.checkpoint_tensors().into_iter().collect();
    assert_eq!(sa.keys().collect::<Vec<_>>(), sb.keys().collect::<Vec<_>>());
    for (k, v) in &sa {
        assert!(v.equal(&sb[k]), "{k} differs after resume");
    }
    // the model part loads with the tokenizer's own loader (EMA weights by default)
    let vs = tch::nn::VarStore::new(tch::Device::Cpu);
    let _model = crate::model::tokenizer::EquivariantTokenizer::new(vs.root(), &tok);
    let model_file = dir.path().join("tokenizer.safetensors");
    a.save_model(&model_file).expect("save model");
    let file = crate::model::weights::read_safetensors(&model_file).expect("read");
    crate::model::tokenizer::EquivariantTokenizer::load(&vs, &file, "test", None).expect("load");
}

#[test]
fn dino_discriminator_with_diffaug_trains_with_a_random_backbone() {
    setup(4);
    let yaml = tiny_yaml(0, "").replace("disc_type: patchgan", "disc_type: dino");
    let (cfg, tok) = configs(&yaml);
    let dino_cfg = crate::model::dino_disc::DinoDiscConfig {
        depth: 2,
        key_depths: vec![0, 1],
        embed_dim: 32,
        num_heads: 2,
        img_size: 32,
        ..Default::default()
    };
    let (bvs, backbone) =
        crate::model::dino_disc::DinoDisc::random_backbone(&dino_cfg, tch::Device::Cpu);
    let teachers = trainer::Teachers {
        lpips: None,
        dino: Some((dino_cfg, bvs, backbone)),
        dinov2: None,
    };
    let mut trainer =
        TokenizerTrainer::new(&tok, &cfg, teachers, tch::Device::Cpu).expect("trainer");
    let heads_before: Vec<(String, Tensor)> = trainer
        .loss
        .disc_vs
        .variables()
        .into_iter()
        .map(|(k, v)| (k, v.copy()))
        .collect();
    let images = generated_images(4);
    let log = trainer.train_step(&images).expect("step");
    assert!(log.d_weight > 0.0 && log.disc_loss > 0.0, "{log:?}");
    let moved = heads_before
        .iter()
        .filter(|(k, v)| {
            k.ends_with("weight_orig") && !trainer.loss.disc_vs.variables()[k].equal(v)
        })
        .count();
    assert!(moved > 0, "the discriminator step moved no head weight");
    // the config route refuses a missing backbone file by name
    let err = format!(
        "{:#}",
        build_trainer(&cfg, &tok, tch::Device::Cpu)
            .err()
            .expect("refused")
    );
    assert!(
        err.contains("dino_vits16") && err.contains("disc_type: patchgan"),
        "{err}"
    );
}

#[test]
fn semantic_alignment_trains_the_semantic_decoder_against_a_random_teacher() {
    setup(5);
    let yaml = tiny_yaml(100, "").replace(
        "semantic_loss_w: 0.0",
        "semantic_loss_w: 5.0, semantic_iter_start: 1",
    );
    let (cfg, tok) = configs(&yaml);
    let teacher_cfg = crate::model::dinov2::Dinov2Config {
        embed_dim: 96,
        depth: 1,
        num_heads: 2,
        pos_grid: 4,
        ..Default::default()
    };
    let teachers = trainer::Teachers {
        dinov2: Some(crate::model::dinov2::Dinov2Teacher::random(
            &teacher_cfg,
            tch::Device::Cpu,
        )),
        ..Default::default()
    };
    let mut trainer =
        TokenizerTrainer::new(&tok, &cfg, teachers, tch::Device::Cpu).expect("trainer");
    let sem_before = snapshot(&trainer, &["semantic_decoder."]);
    let images = generated_images(4);
    // step 0: before semantic_iter_start, the semantic decoder gets no gradient
    let log0 = trainer.train_step(&images).expect("step 0");
    assert_eq!(log0.semantic, 0.0);
    assert!(snapshot(&trainer, &["semantic_decoder."])
        .iter()
        .zip(&sem_before)
        .all(|((_, a), (_, b))| a.equal(b)));
    let log1 = trainer.train_step(&images).expect("step 1");
    assert!(log1.semantic > 0.0, "{log1:?}");
    let moved = snapshot(&trainer, &["semantic_decoder."])
        .iter()
        .zip(&sem_before)
        .filter(|((_, a), (_, b))| !a.equal(b))
        .count();
    assert!(moved > 0, "the semantic decoder did not train");
}

#[test]
fn bf16_autocast_trains_with_float32_weights_and_lowers_reconstruction_loss() {
    setup(1);
    let yaml = tiny_yaml(15, "").replace(
        "train: {max_steps: 10, out_dir: /unused}",
        "train: {max_steps: 10, out_dir: /unused, precision: bf16}",
    );
    let (cfg, tok) = configs(&yaml);
    assert_eq!(cfg.eqim.train.precision, crate::precision::Precision::Bf16);
    let mut trainer = build_trainer(&cfg, &tok, tch::Device::Cpu).expect("trainer");
    let images = generated_images(8);
    let before = l1(&trainer, &images);
    let mut last_log = None;
    for step in 0..20 {
        let idx = Tensor::from_slice(&[
            (step * 4) % 8,
            (step * 4 + 1) % 8,
            (step * 4 + 2) % 8,
            (step * 4 + 3) % 8,
        ]);
        last_log = Some(
            trainer
                .train_step(&images.index_select(0, &idx))
                .expect("step"),
        );
    }
    let after = l1(&trainer, &images);
    eprintln!("bf16: L1 {before:.4} -> {after:.4}");
    assert!(after < 0.6 * before, "L1 {before:.4} -> {after:.4}");
    let log = last_log.expect("ran");
    assert!(log.nll.is_finite() && log.disc_loss > 0.0, "{log:?}");
    for (name, t) in trainer.vs.variables() {
        assert_eq!(t.kind(), Kind::Float, "{name} stays float32");
    }
}

#[test]
fn grad_checkpointing_true_is_refused_for_the_tokenizer() {
    let yaml = tiny_yaml(15, "").replace(
        "train: {max_steps: 10, out_dir: /unused}",
        "train: {max_steps: 10, out_dir: /unused, grad_checkpointing: true}",
    );
    let err = format!(
        "{:#}",
        TrainTokenizerConfig::from_yaml(&yaml, "test config").unwrap_err()
    );
    assert!(
        err.contains("eqim.train.grad_checkpointing: true is not supported"),
        "{err}"
    );
    assert!(err.contains("recompute"), "{err}");
}
