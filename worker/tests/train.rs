//! The training step (accumulation, missing gradients, seeded draws, learning) and
//! `eqim train-generator` on a latent cache. A test binary of its own: libtorch's generators are
//! process-global, and bitwise repeatability needs that no concurrent test draws from them.
//! Resume and the equality of the entry points are tested in one_path.rs.
//! Tests use one intra-op thread: they run in parallel, and OpenMP workers spinning on a busy
//! 2-core machine made a step 15x slower.

use anyhow::Result;
use eqim_common::schedule::epoch_permutation;
use eqim_worker::data::{DataError, LatentCacheWriter, LoaderConfig, SampleSource};
use eqim_worker::train::generator::GeneratorTrainModel;
use eqim_worker::train::setup::{self, TrainGeneratorOptions};
use eqim_worker::train::source::{BatchSource, SyntheticLatents};
use eqim_worker::train::{
    rng, AdamWConfig, Batch, LrSchedule, ScheduleKind, TrainModel, Trainer, TrainerConfig,
};
use std::path::PathBuf;
use tch::{nn, nn::Module, Device, Kind, Tensor};

/// A small classifier with dropout and an input-noise draw, so that a step uses the generator.
struct Mlp {
    vs: nn::VarStore,
    fc1: nn::Linear,
    fc2: nn::Linear,
    norm: nn::LayerNorm,
}

impl Mlp {
    fn new(seed: u64, inputs: i64, classes: i64) -> Self {
        // Under the generator lock: tests of this binary run on parallel threads.
        rng::seeded(seed, 0, 0, || {
            let vs = nn::VarStore::new(Device::Cpu);
            let p = vs.root();
            let fc1 = nn::linear(&p / "fc1", inputs, 32, Default::default());
            let norm = nn::layer_norm(&p / "norm", vec![32], Default::default());
            let fc2 = nn::linear(&p / "fc2", 32, classes, Default::default());
            Self { vs, fc1, fc2, norm }
        })
    }
}

impl TrainModel for Mlp {
    fn var_store(&self) -> &nn::VarStore {
        &self.vs
    }

    fn loss(&self, batch: &Batch) -> Result<Tensor> {
        let x = batch.latents.flatten(1, -1);
        let x = &x + Tensor::randn_like(&x) * 0.05;
        let h = self
            .norm
            .forward(&self.fc1.forward(&x).relu())
            .dropout(0.2, true);
        Ok(self.fc2.forward(&h).cross_entropy_for_logits(&batch.labels))
    }
}

fn source() -> SyntheticLatents {
    SyntheticLatents {
        samples: 40,
        classes: 4,
        tokens: 4,
        channels: 3,
        noise: 0.3,
        seed: 11,
    }
}

fn trainer() -> Trainer<Mlp> {
    tch::set_num_threads(1);
    let cfg = TrainerConfig {
        optim: AdamWConfig::default(),
        schedule: LrSchedule {
            lr: 3e-3,
            warmup_epochs: 1.0,
            kind: ScheduleKind::Cosine,
            min_lr: 1e-4,
            epochs: 4.0,
        },
        clip_grad: Some(0.5),
        ema_rate: 0.9,
        seed: 5,
    };
    Trainer::new(Mlp::new(3, 12, 4), cfg).unwrap()
}

#[test]
fn accumulating_micro_batches_matches_one_big_batch() {
    // Without random draws, 2 x 4 accumulated equals 8 at once up to float rounding.
    struct Plain(Mlp);
    impl TrainModel for Plain {
        fn var_store(&self) -> &nn::VarStore {
            &self.0.vs
        }
        fn loss(&self, batch: &Batch) -> Result<Tensor> {
            let x = batch.latents.flatten(1, -1);
            let h = self.0.norm.forward(&self.0.fc1.forward(&x).relu());
            Ok(self
                .0
                .fc2
                .forward(&h)
                .cross_entropy_for_logits(&batch.labels))
        }
    }
    let cfg = trainer().cfg.clone();
    let mut a = Trainer::new(Plain(Mlp::new(3, 12, 4)), cfg.clone()).unwrap();
    let mut b = Trainer::new(Plain(Mlp::new(3, 12, 4)), cfg).unwrap();
    let mut src = source();
    let order = epoch_permutation(5, 0, 40);
    for step in 0..3 {
        let batch = src.fetch(0, &order[step * 8..(step + 1) * 8]).unwrap();
        let ra = a
            .train_step(&[batch.narrow(0, 4), batch.narrow(4, 4)], 5)
            .unwrap();
        let rb = b.train_step(&[batch], 5).unwrap();
        assert!((ra.loss - rb.loss).abs() < 1e-6);
        assert!((ra.grad_norm - rb.grad_norm).abs() < 1e-5);
    }
    for (x, y) in a.params.tensors.iter().zip(&b.params.tensors) {
        let d = (x - y).abs().max().double_value(&[]);
        assert!(d < 1e-5, "{d}");
    }
}

#[test]
fn missing_gradients_can_be_materialized_as_zeros() {
    struct Partial(Mlp);
    impl TrainModel for Partial {
        fn var_store(&self) -> &nn::VarStore {
            &self.0.vs
        }
        // fc2 and norm take no part: their gradients stay undefined.
        fn loss(&self, batch: &Batch) -> Result<Tensor> {
            Ok(self
                .0
                .fc1
                .forward(&batch.latents.flatten(1, -1))
                .square()
                .mean(Kind::Float))
        }
    }
    let t = Trainer::new(Partial(Mlp::new(3, 12, 4)), trainer().cfg.clone()).unwrap();
    let batch = source().fetch(0, &[0, 1, 2, 3]).unwrap();
    let mut acc = t.accumulator();
    t.accumulate(&mut acc, &batch, 0, 1.0).unwrap();
    for (name, grad) in t.params.names.iter().zip(&acc.grads) {
        assert_eq!(grad.is_some(), name.starts_with("fc1."), "{name}");
    }
    acc.materialize_missing(&t.params);
    let i = t
        .params
        .names
        .iter()
        .position(|n| n == "fc2.weight")
        .unwrap();
    let fc2 = acc.grads[i].as_ref().unwrap();
    assert_eq!(fc2.size(), t.params.tensors[i].size());
    assert_eq!(fc2.abs().sum(Kind::Float).double_value(&[]), 0.0);
}

#[test]
fn seeded_sections_repeat_their_draws() {
    let draw = || Tensor::randn([4], (Kind::Float, Device::Cpu));
    let x = rng::seeded(1, 5, 0, draw);
    let y = rng::seeded(1, 5, 0, draw);
    let z = rng::seeded(1, 5, 1, draw);
    assert!(x.equal(&y));
    assert!(!x.equal(&z));
}

fn tiny_generator() -> eqim_worker::model::generator::GeneratorConfig {
    // generator_train_tiny's shape with 8-token sequences and 4 classes.
    serde_json::from_value(serde_json::json!({
        "encoder_embed_dim": 64, "encoder_depth": 1, "encoder_num_heads": 4,
        "decoder_embed_dim": 64, "decoder_depth": 1, "decoder_num_heads": 4,
        "vae_embed_dim": 16, "token_num": 8, "buffer_size": 16, "cond_length": 3,
        "class_num": 4, "diffloss_d": 2, "diffloss_w": 64, "diffusion_batch_mul": 4,
        "num_sampling_steps": "8", "shift_num": 16
    }))
    .unwrap()
}

fn generator_trainer(lr: f64, seed: u64) -> Trainer<GeneratorTrainModel> {
    tch::set_num_threads(1);
    let model = GeneratorTrainModel::new(&tiny_generator(), Device::Cpu, seed).unwrap();
    let cfg = TrainerConfig {
        optim: AdamWConfig::default(),
        schedule: LrSchedule {
            lr,
            warmup_epochs: 0.25,
            kind: ScheduleKind::Constant,
            min_lr: 0.0,
            epochs: 100.0,
        },
        clip_grad: Some(3.0),
        ema_rate: 0.99,
        seed,
    };
    Trainer::new(model, cfg).unwrap()
}

fn latents() -> SyntheticLatents {
    SyntheticLatents {
        samples: 64,
        classes: 4,
        tokens: 8,
        channels: 16,
        noise: 0.1,
        seed: 2,
    }
}

#[test]
fn the_tiny_generator_learns_smooth_class_patterns() {
    let mut t = generator_trainer(2e-3, 1);
    let mut src = latents();
    // 4 steps of 16 per epoch, in each epoch's seeded order.
    let losses: Vec<f64> = (0..48u64)
        .map(|step| {
            let order = epoch_permutation(1, (step / 4) as u32, 64);
            let at = (step % 4) as usize * 16;
            let batch = src.fetch(step / 4, &order[at..at + 16]).unwrap();
            t.train_step(&[batch], 4).unwrap().loss
        })
        .collect();
    let mean = |s: &[f64]| s.iter().sum::<f64>() / s.len() as f64;
    let (first, last) = (mean(&losses[..8]), mean(&losses[40..]));
    println!("loss: first 8 steps {first:.4}, last 8 steps {last:.4}");
    assert!(
        last < 0.7 * first,
        "loss did not fall: {first:.4} -> {last:.4}"
    );
    assert_eq!(t.progress.epoch, 12);
}

const CLI_CONFIG: &str = r#"
seed = 7
output_dir = "OUT"
device = "cpu"
threads = 1

[model]
encoder_embed_dim = 32
encoder_depth = 1
encoder_num_heads = 2
decoder_embed_dim = 32
decoder_depth = 0
vae_embed_dim = CHANNELS
token_num = 8
buffer_size = 4
cond_length = 3
class_num = 4
diffloss_d = 1
diffloss_w = 32

[data]
DATA

[optim]
batch = 8
micro_batch = 4
blr = 0.05
warmup_epochs = 0.5

[run]
epochs = 100
checkpoint_every = 2
log_every = 1
"#;

fn write_cli_config(dir: &std::path::Path, name: &str, channels: i64, data: &str) -> PathBuf {
    let out = dir.join(format!("out-{name}"));
    let text = CLI_CONFIG
        .replace("OUT", &out.display().to_string())
        .replace("CHANNELS", &channels.to_string())
        .replace("DATA", data);
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, text).unwrap();
    path
}

fn cli_args(config: PathBuf, max_steps: u64) -> TrainGeneratorOptions {
    TrainGeneratorOptions {
        config,
        fresh: false,
        max_steps: Some(max_steps),
        no_progress: true,
        precision: None,
        metrics_addr: None,
    }
}

/// Images whose columns carry the class: 3 x 16 x 32, class = index % 4.
struct ClassImages;

impl SampleSource for ClassImages {
    fn len(&self) -> usize {
        24
    }

    fn image_shape(&self) -> [usize; 3] {
        [3, 16, 32]
    }

    fn load_into(&self, index: usize, _seed: u64, out: &mut [f32]) -> Result<i64, DataError> {
        let class = (index % 4) as i64;
        for (i, v) in out.iter_mut().enumerate() {
            let (c, x) = (i / (16 * 32), i % 32);
            *v = ((x as f32 / 8.0 + class as f32 + c as f32 * 0.3 + index as f32 * 0.01).sin())
                .clamp(-1.0, 1.0);
        }
        Ok(class)
    }
}

#[test]
fn train_generator_cli_trains_from_a_latent_cache() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("latents.safetensors");
    // 4x4 average pooling: [B, 3, 16, 32] -> 8 column tokens of 3 * 4 = 12 channels.
    let encode = |images: &Tensor| {
        let pooled = images.avg_pool2d([4, 4], [4, 4], [0, 0], false, true, None::<i64>);
        let (b, c, h, w) = pooled.size4().unwrap();
        pooled.permute([0, 3, 1, 2]).reshape([b, w, c * h])
    };
    LatentCacheWriter::new(8)
        .with_loader(LoaderConfig::with_seed(0).with_threads(1))
        .write(std::sync::Arc::new(ClassImages), &cache, encode)
        .unwrap();
    let data = format!(
        "kind = \"latent-cache\"\npath = \"{}\"\nvae_norm = 1.0",
        cache.display()
    );
    let config = write_cli_config(dir.path(), "c", 12, &data);
    setup::run(&cli_args(config, 4)).unwrap();
    // 24 rows in batches of 8: the fourth step is the first of epoch 1.
    let checkpoint = dir.path().join("out-c/checkpoints/step-00000004");
    eqim_common::checkpoint::verify(&checkpoint).unwrap();
    let job = eqim_common::checkpoint::read_job_state(&checkpoint).unwrap();
    assert_eq!((job.cursor.step, job.cursor.epoch), (4, 1));
    assert!(job.ledger.summary()[0].is_exact());
    for file in [
        "generator-ema.safetensors",
        "generator.safetensors",
        "generator.json",
    ] {
        assert!(
            dir.path().join("out-c").join(file).is_file(),
            "{file} not exported"
        );
    }

    // A cache that does not fit the model is refused by name.
    let wrong = write_cli_config(dir.path(), "d", 16, &data);
    let err = format!("{:#}", setup::run(&cli_args(wrong, 1)).unwrap_err());
    assert!(err.contains("vae_embed_dim") && err.contains("12"), "{err}");
}
