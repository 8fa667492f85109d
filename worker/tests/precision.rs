//! bf16 autocast on the CPU with the tiny generator fixtures: the step-0 loss within 1 % of fp32,
//! 50 bf16 training steps that lower the loss with float32 weights, optimizer state and EMA, and
//! bf16 sampling against fp32 sampling on the same noise (the max error is printed, and bounded).
//! Also: `grad_checkpointing: true` is refused, never accepted and ignored.

use eqim_worker::model::generator::{EquivariantGenerativeModel, GeneratorConfig, Mode};
use eqim_worker::model::weights;
use eqim_worker::precision::Precision;
use eqim_worker::sampling::{sample_cached, sample_exact, CfgSchedule, FixedNoise, SampleSpec};
use eqim_worker::train::{
    AdamWConfig, Batch, LrSchedule, ScheduleKind, TrainModel, Trainer, TrainerConfig,
};
use eqim_worker::verify::{generator::load_model, max_abs_diff, FixtureFiles};
use std::collections::BTreeMap;
use std::path::PathBuf;
use tch::{nn, Kind, Tensor};

/// The shared fixtures: `$EQIM_FIXTURES`, else `<repo>/../shared/fixtures`.
fn fixtures() -> PathBuf {
    std::env::var_os("EQIM_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../../shared/fixtures"
            ))
        })
}

fn fixture(
    name: &str,
) -> (
    nn::VarStore,
    EquivariantGenerativeModel,
    BTreeMap<String, Tensor>,
) {
    let files = FixtureFiles::from_prefix(&fixtures().join(name)).expect("fixture files");
    let json = files.read_json().expect("fixture json");
    let (vs, model) = load_model(&files, &json).expect("loading the fixture model");
    let io = weights::read_safetensors(&files.io).expect("fixture io");
    (vs, model, io)
}

fn get<'a>(io: &'a BTreeMap<String, Tensor>, key: &str) -> &'a Tensor {
    io.get(key)
        .unwrap_or_else(|| panic!("fixture io has no {key}"))
}

/// The fixture's step-0 loss (eval mode, the fixture's flow noise and t) in `precision`.
fn fixed_loss(
    model: &mut EquivariantGenerativeModel,
    io: &BTreeMap<String, Tensor>,
    precision: Precision,
) -> f64 {
    model.cfg.precision = precision;
    let _g = tch::no_grad_guard();
    let out = model
        .forward_loss(
            get(io, "train.step0.x0"),
            get(io, "train.step0.labels"),
            Some((get(io, "train.step0.noise"), get(io, "train.step0.t_raw"))),
            Mode::Eval,
        )
        .expect("loss");
    assert_eq!(
        out.loss.kind(),
        Kind::Float,
        "the loss leaves autocast as float32"
    );
    assert_eq!(out.pred.kind(), Kind::Float);
    out.loss.double_value(&[])
}

#[test]
fn bf16_step0_loss_is_within_one_percent_of_fp32() {
    tch::set_num_threads(1);
    let (_vs, mut model, io) = fixture("generator_train_tiny");
    let fp32 = fixed_loss(&mut model, &io, Precision::Fp32);
    let reference = get(&io, "train.step0.loss").double_value(&[]);
    assert!(
        (fp32 - reference).abs() < 1e-5,
        "fp32 {fp32} vs reference {reference}"
    );
    let bf16 = fixed_loss(&mut model, &io, Precision::Bf16);
    let rel = (bf16 - fp32).abs() / fp32;
    println!("step-0 loss: fp32 {fp32:.6}, bf16 {bf16:.6}, relative difference {rel:.2e}");
    assert!(
        rel < 0.01,
        "bf16 loss {bf16} is {rel:.3} away from fp32 {fp32}"
    );
    // bf16 really ran: the matmuls rounded to 8 mantissa bits change the loss.
    assert!(
        rel > 1e-7,
        "bf16 loss equals fp32 exactly: autocast did not engage"
    );
}

/// The fixture model trained in train mode (dropout, label drop, random flow noise and t).
struct Model {
    vs: nn::VarStore,
    model: EquivariantGenerativeModel,
}

impl TrainModel for Model {
    fn var_store(&self) -> &nn::VarStore {
        &self.vs
    }

    fn loss(&self, batch: &Batch) -> anyhow::Result<Tensor> {
        let out = self
            .model
            .forward_loss(&batch.latents, &batch.labels, None, Mode::Train)?;
        Ok(out.loss)
    }
}

#[test]
fn fifty_bf16_steps_lower_the_loss_with_fp32_master_state() {
    tch::set_num_threads(1);
    let (vs, mut model, io) = fixture("generator_train_tiny");
    let before = fixed_loss(&mut model, &io, Precision::Bf16);
    let batch = || Batch {
        latents: Tensor::cat(&[get(&io, "train.step0.x0"), get(&io, "train.step1.x0")], 0),
        labels: Tensor::cat(
            &[
                get(&io, "train.step0.labels"),
                get(&io, "train.step1.labels"),
            ],
            0,
        ),
    };
    let cfg = TrainerConfig {
        optim: AdamWConfig::default(),
        schedule: LrSchedule {
            lr: 1e-3,
            warmup_epochs: 0.0,
            kind: ScheduleKind::Constant,
            min_lr: 1e-3,
            epochs: 1.0,
        },
        clip_grad: Some(3.0),
        ema_rate: 0.9,
        seed: 7,
    };
    let mut trainer = Trainer::new(Model { vs, model }, cfg).expect("trainer");
    let mut losses = Vec::new();
    for _ in 0..50 {
        let r = trainer.train_step(&[batch()], 1000).expect("bf16 step");
        assert!(r.loss.is_finite() && r.grad_norm.is_finite(), "{r:?}");
        losses.push(r.loss);
    }
    for (what, tensors) in [
        ("weights", &trainer.params.tensors),
        ("EMA", &trainer.ema.shadow),
    ] {
        for t in tensors.iter() {
            assert_eq!(
                t.kind(),
                Kind::Float,
                "{what} stay float32 in bf16 training"
            );
        }
    }
    let after = fixed_loss(&mut trainer.model.model, &io, Precision::Bf16);
    let first: f64 = losses[..10].iter().sum::<f64>() / 10.0;
    let last: f64 = losses[40..].iter().sum::<f64>() / 10.0;
    println!(
        "bf16 training: fixed-noise loss {before:.4} -> {after:.4}; train loss mean of steps \
         0-9 {first:.4}, 40-49 {last:.4}"
    );
    assert!(after < 0.8 * before, "fixed-noise loss {before} -> {after}");
    assert!(last < first, "train loss {first} -> {last}");
}

fn sample_tokens(
    model: &mut EquivariantGenerativeModel,
    io: &BTreeMap<String, Tensor>,
    precision: Precision,
    cached: bool,
) -> Tensor {
    model.cfg.precision = precision;
    let labels = get(io, "sample.labels");
    let want = get(io, "sample.tokens");
    let spec = SampleSpec {
        batch: labels.size()[0],
        labels: Some(labels),
        prefix: None,
        num_iter: want.size()[1],
        cfg: get(io, "sample.cfg").double_value(&[]),
        cfg_schedule: CfgSchedule::Linear,
        num_steps: get(io, "sample.steps").int64_value(&[]),
        temperature: 1.0,
    };
    let mut noise = FixedNoise::new(get(io, "sample.step_noise").shallow_clone());
    let sampler = if cached { sample_cached } else { sample_exact };
    let tokens = sampler(model, &spec, &mut noise, &mut |_| {}).expect("sampling");
    assert_eq!(tokens.kind(), Kind::Float, "sampled tokens are float32");
    tokens
}

#[test]
fn bf16_sampling_stays_close_to_fp32_on_the_same_noise() {
    tch::set_num_threads(1);
    let (_vs, mut model, io) = fixture("generator_tiny");
    let want = get(&io, "sample.tokens");
    let scale = want.abs().max().double_value(&[]);
    for cached in [false, true] {
        let fp32 = sample_tokens(&mut model, &io, Precision::Fp32, cached);
        assert!(max_abs_diff(&fp32, want).unwrap() < 1e-4);
        let bf16 = sample_tokens(&mut model, &io, Precision::Bf16, cached);
        let err = max_abs_diff(&bf16, &fp32).unwrap();
        let mean_err = (&bf16 - &fp32).abs().mean(Kind::Float).double_value(&[]);
        println!(
            "sampling ({}): bf16 vs fp32 on the same noise: max abs error {err:.4e}, mean \
             {mean_err:.4e}, max |token| {scale:.3}",
            if cached { "kv-cached" } else { "exact" }
        );
        assert!(
            err > 0.0,
            "bf16 sampling equals fp32 exactly: autocast did not engage"
        );
        assert!(
            err < 0.05 * scale,
            "bf16 error {err} against token scale {scale}"
        );
    }
}

#[test]
fn grad_checkpointing_true_is_refused_with_the_reason() {
    let mut cfg: GeneratorConfig = serde_json::from_str(r#"{"grad_checkpointing": true}"#).unwrap();
    let err = cfg.validate().unwrap_err().to_string();
    assert!(err.contains("grad_checkpointing"), "{err}");
    assert!(err.contains("recompute"), "the error says why: {err}");
    let vs = nn::VarStore::new(tch::Device::Cpu);
    assert!(EquivariantGenerativeModel::new(vs.root(), &cfg).is_err());
    cfg.grad_checkpointing = false;
    assert!(cfg.validate().is_ok());
    // Through a train-generator [model] table too.
    let mut table = serde_json::Map::new();
    table.insert("preset".into(), "small".into());
    table.insert("grad_checkpointing".into(), true.into());
    let err = format!(
        "{:#}",
        eqim_worker::train::setup::resolve_model(&table).unwrap_err()
    );
    assert!(
        err.contains("grad_checkpointing: true is not supported"),
        "{err}"
    );
}

#[test]
fn precision_is_a_model_config_key() {
    let mut table = serde_json::Map::new();
    table.insert("preset".into(), "small".into());
    table.insert("precision".into(), "bf16".into());
    let cfg = eqim_worker::train::setup::resolve_model(&table).unwrap();
    assert_eq!(cfg.precision, Precision::Bf16);
    table.insert("precision".into(), "fp16".into());
    let err = format!(
        "{:#}",
        eqim_worker::train::setup::resolve_model(&table).unwrap_err()
    );
    assert!(err.contains("fp16"), "{err}");
}
