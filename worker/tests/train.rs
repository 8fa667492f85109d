//! Exact resume of the training state. A test binary of its own: libtorch's generators are
//! process-global, and bitwise repeatability needs that no concurrent test draws from them.
//! Tests use one intra-op thread: they run in parallel, and OpenMP workers spinning on a busy
//! 2-core machine made a step 15x slower.

use anyhow::Result;
use eqim_worker::data::{DataError, LatentCacheWriter, LoaderConfig, SampleSource};
use eqim_worker::train::cli::{self, TrainGeneratorArgs};
use eqim_worker::train::generator::GeneratorTrainModel;
use eqim_worker::train::source::{BatchSource, EpochOrder, SyntheticLatents};
use eqim_worker::train::trainer::BatchPlan;
use eqim_worker::train::{
    rng, AdamWConfig, Batch, LrSchedule, ScheduleKind, TrainModel, TrainState, Trainer,
    TrainerConfig,
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

const PLAN: BatchPlan = BatchPlan {
    global_batch: 8,
    micro_batch: 4,
    device: Device::Cpu,
};

fn run(t: &mut Trainer<Mlp>, src: &mut SyntheticLatents, order: &mut EpochOrder, steps: u64) {
    for _ in 0..steps {
        t.step_from_source(src, order, &PLAN).unwrap();
    }
}

fn assert_same(a: &Trainer<Mlp>, b: &Trainer<Mlp>) {
    for (i, name) in a.params.names.iter().enumerate() {
        assert!(
            a.params.tensors[i].equal(&b.params.tensors[i]),
            "weights of {name} differ"
        );
        assert!(
            a.ema.shadow[i].equal(&b.ema.shadow[i]),
            "EMA of {name} differs"
        );
        let (ma, mb) = (&a.optimizer.exp_avg_sq[i], &b.optimizer.exp_avg_sq[i]);
        assert!(
            ma.as_ref().unwrap().equal(mb.as_ref().unwrap()),
            "moments of {name} differ"
        );
    }
    assert_eq!(a.progress, b.progress);
    assert_eq!(a.optimizer.steps, b.optimizer.steps);
}

#[test]
fn ten_steps_equal_five_saved_resumed_and_five_more() {
    let (mut src, mut order) = (source(), EpochOrder::new(5, 40));
    let mut straight = trainer();
    run(&mut straight, &mut src, &mut order, 10);
    assert_eq!(straight.progress.step, 10);
    assert_eq!(straight.progress.epoch, 2);

    let dir = tempfile::tempdir().unwrap();
    let state_dir = dir.path().join("state");
    let mut first = trainer();
    let mut order = EpochOrder::new(5, 40);
    run(&mut first, &mut src, &mut order, 5);
    TrainState::capture(&first, serde_json::json!({"note": "test"}))
        .write(&state_dir)
        .unwrap();
    // Something else draws from the generator in between: resume must not care.
    let _noise = rng::seeded(99, 0, 0, || {
        Tensor::randn([100], (Kind::Float, Device::Cpu))
    });
    drop(first);

    let mut resumed = trainer();
    let state = TrainState::read(&state_dir).unwrap();
    assert_eq!(state.extra["note"], "test");
    state.restore_into(&mut resumed).unwrap();
    assert_eq!(resumed.progress.step, 5);
    assert_eq!(resumed.progress.batch_in_epoch, 0);
    let mut order = EpochOrder::new(5, 40);
    run(&mut resumed, &mut src, &mut order, 5);
    assert_same(&straight, &resumed);

    // Training actually moved the weights.
    let fresh = trainer();
    assert!(!fresh.params.tensors[0].equal(&straight.params.tensors[0]));
}

#[test]
fn saving_over_a_state_replaces_it_and_corruption_is_named() {
    let (mut src, mut order) = (source(), EpochOrder::new(5, 40));
    let mut t = trainer();
    let dir = tempfile::tempdir().unwrap();
    let state_dir = dir.path().join("ckpt");
    run(&mut t, &mut src, &mut order, 2);
    TrainState::capture(&t, serde_json::Value::Null)
        .write(&state_dir)
        .unwrap();
    run(&mut t, &mut src, &mut order, 1);
    TrainState::capture(&t, serde_json::Value::Null)
        .write(&state_dir)
        .unwrap();
    assert_eq!(TrainState::read(&state_dir).unwrap().progress.step, 3);
    let leftovers: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert_eq!(leftovers.len(), 1, "temporary directories left behind");

    let ema = state_dir.join("ema.safetensors");
    let mut bytes = std::fs::read(&ema).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&ema, bytes).unwrap();
    let err = format!("{:#}", TrainState::read(&state_dir).unwrap_err());
    assert!(
        err.contains("ema.safetensors") && err.contains("corrupt"),
        "{err}"
    );
    let err = format!("{:#}", TrainState::read(dir.path()).unwrap_err());
    assert!(err.contains("state.json"), "{err}");
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
    let mut order = EpochOrder::new(5, 40);
    let whole = BatchPlan {
        micro_batch: 8,
        ..PLAN
    };
    for _ in 0..3 {
        let ra = a.step_from_source(&mut src, &mut order, &PLAN).unwrap();
        let rb = b.step_from_source(&mut src, &mut order, &whole).unwrap();
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
    let (mut src, mut order) = (latents(), EpochOrder::new(1, 64));
    let plan = BatchPlan {
        global_batch: 16,
        micro_batch: 16,
        device: Device::Cpu,
    };
    let losses: Vec<f64> = (0..48)
        .map(|_| {
            t.step_from_source(&mut src, &mut order, &plan)
                .unwrap()
                .loss
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

#[test]
fn generator_resume_is_bitwise_exact() {
    let plan = BatchPlan {
        global_batch: 8,
        micro_batch: 4,
        device: Device::Cpu,
    };
    let run = |t: &mut Trainer<GeneratorTrainModel>, order: &mut EpochOrder, n: u64| {
        let mut src = latents();
        for _ in 0..n {
            t.step_from_source(&mut src, order, &plan).unwrap();
        }
    };
    let mut straight = generator_trainer(1e-3, 4);
    run(&mut straight, &mut EpochOrder::new(4, 64), 6);

    let dir = tempfile::tempdir().unwrap();
    let mut first = generator_trainer(1e-3, 4);
    run(&mut first, &mut EpochOrder::new(4, 64), 3);
    TrainState::capture(&first, serde_json::Value::Null)
        .write(dir.path())
        .unwrap();
    drop(first);
    // A different init seed: everything must come from the saved state.
    let mut resumed = generator_trainer(1e-3, 4);
    let other = generator_trainer(1e-3, 5);
    assert!(!other.params.tensors[0].equal(&resumed.params.tensors[0]));
    TrainState::read(dir.path())
        .unwrap()
        .restore_into(&mut resumed)
        .unwrap();
    run(&mut resumed, &mut EpochOrder::new(4, 64), 3);
    for (i, name) in straight.params.names.iter().enumerate() {
        assert!(
            straight.params.tensors[i].equal(&resumed.params.tensors[i]),
            "weights of {name} differ"
        );
        assert!(
            straight.ema.shadow[i].equal(&resumed.ema.shadow[i]),
            "EMA of {name} differs"
        );
    }
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

fn cli_args(config: PathBuf, max_steps: u64) -> TrainGeneratorArgs {
    TrainGeneratorArgs {
        config,
        fresh: false,
        max_steps: Some(max_steps),
        no_progress: true,
    }
}

#[test]
fn train_generator_cli_resumes_to_the_same_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let data = "kind = \"synthetic\"\nsamples = 32";
    let interrupted = write_cli_config(dir.path(), "a", 16, data);
    let straight = write_cli_config(dir.path(), "b", 16, data);
    cli::run(&cli_args(interrupted.clone(), 3)).unwrap();
    cli::run(&cli_args(interrupted, 6)).unwrap();
    cli::run(&cli_args(straight, 6)).unwrap();
    for file in [
        "model.safetensors",
        "ema.safetensors",
        "optimizer.safetensors",
    ] {
        let a = std::fs::read(dir.path().join("out-a/checkpoint-last").join(file)).unwrap();
        let b = std::fs::read(dir.path().join("out-b/checkpoint-last").join(file)).unwrap();
        assert!(
            a == b,
            "{file} differs between the resumed and the straight run"
        );
    }
    let log = std::fs::read_to_string(dir.path().join("out-a/train_log.jsonl")).unwrap();
    let steps: Vec<u64> = log
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["step"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(steps, vec![1, 2, 3, 4, 5, 6]);
    // Resuming with another global batch would scramble the epoch: refused by name.
    let changed = std::fs::read_to_string(dir.path().join("a.toml"))
        .unwrap()
        .replace("batch = 8", "batch = 12");
    std::fs::write(dir.path().join("a.toml"), changed).unwrap();
    let err = cli::run(&cli_args(dir.path().join("a.toml"), 7)).unwrap_err();
    assert!(format!("{err:#}").contains("optim.batch = 8"), "{err:#}");
    let text = std::fs::read_to_string(dir.path().join("out-a/generator.json")).unwrap();
    let model: eqim_worker::model::generator::GeneratorConfig =
        serde_json::from_str(&text).unwrap();
    assert_eq!((model.encoder_embed_dim, model.class_num), (32, 4));
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
    cli::run(&cli_args(config, 4)).unwrap();
    let state = TrainState::read(&dir.path().join("out-c/checkpoint-last")).unwrap();
    assert_eq!(state.progress.step, 4);
    assert_eq!(state.progress.epoch, 1);

    // A cache that does not fit the model is refused by name.
    let wrong = write_cli_config(dir.path(), "d", 16, &data);
    let err = format!("{:#}", cli::run(&cli_args(wrong, 1)).unwrap_err());
    assert!(err.contains("vae_embed_dim") && err.contains("12"), "{err}");
}
