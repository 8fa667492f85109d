//! The distributed runtime training the real generator from a latent cache: an in-process
//! coordinator and real `eqim worker --train-config` processes (gloo on loopback). Two workers
//! must end with identical weights, match one worker with the same global batch, log finite
//! losses, and rank 0 must export weights that `eqim sample-tokens` can load.

use eqim_common::coordinator_config::{CoordinatorConfig, Timeouts};
use eqim_common::outcome::JobOutcomeRecord;
use eqim_common::schedule::ScheduleConfig;
use eqim_worker::data::{DataError, LatentCacheWriter, LoaderConfig, SampleSource};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use support::coordinator::CoordinatorProcess;
use tch::Tensor;

mod support;

const JOB_TIMEOUT: Duration = Duration::from_secs(120);
const ROWS: u64 = 24;

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

/// Writes a latent cache (24 images, each row holding both flips of 8 tokens x 12 channels) and a
/// training config for a tiny generator on it.
fn write_inputs(dir: &Path) -> PathBuf {
    tch::set_num_threads(1);
    let cache = dir.join("latents.safetensors");
    // 4x4 average pooling: [B, 3, 16, 32] -> 8 column tokens of 3 * 4 = 12 channels.
    let encode = |images: &Tensor| {
        let pooled = images.avg_pool2d([4, 4], [4, 4], [0, 0], false, true, None::<i64>);
        let (b, c, h, w) = pooled.size4().unwrap();
        pooled.permute([0, 3, 1, 2]).reshape([b, w, c * h])
    };
    LatentCacheWriter::new(4)
        .with_loader(LoaderConfig::with_seed(0).with_threads(1))
        .write(std::sync::Arc::new(ClassImages), &cache, encode)
        .unwrap();
    let config = dir.join("generator.toml");
    std::fs::write(
        &config,
        format!(
            r#"seed = 3
output_dir = "{out}"
device = "cpu"

[model]
encoder_embed_dim = 32
encoder_depth = 1
encoder_num_heads = 4
decoder_embed_dim = 32
decoder_depth = 1
decoder_num_heads = 4
vae_embed_dim = 12
token_num = 8
buffer_size = 16
cond_length = 3
class_num = 4
diffloss_d = 2
diffloss_w = 32
diffusion_batch_mul = 4
num_sampling_steps = "4"
shift_num = 8

[data]
kind = "latent-cache"
path = "{cache}"
vae_norm = 0.5

[optim]
batch = 8
blr = 0.05
warmup_epochs = 0.5
ema_rate = 0.9

[run]
epochs = 1
"#,
            out = dir.join("unused").display(),
            cache = cache.display()
        ),
    )
    .unwrap();
    config
}

fn coordinator_config(job_dir: &Path, workers: u32) -> CoordinatorConfig {
    CoordinatorConfig {
        bind: "127.0.0.1:0".parse().unwrap(),
        job_dir: job_dir.to_owned(),
        metrics_addr: None,
        expected_workers: workers,
        min_workers: workers,
        max_workers: 4,
        timeouts: Timeouts {
            heartbeat_interval: Duration::from_millis(100),
            heartbeat_timeout: Duration::from_millis(3000),
            quic_idle_timeout: Duration::from_millis(3000),
            handshake_timeout: Duration::from_secs(5),
            join_timeout: Duration::from_secs(30),
            rendezvous_timeout: Duration::from_secs(10),
            step_timeout: Duration::from_secs(30),
            probe_timeout: Duration::from_millis(300),
            decision_tick_interval: Duration::from_millis(5),
        },
        // 24 rows in batches of 8 over micro-batches of 4: 3 steps, with every rank's
        // micro-batches the same contiguous groups of 4 for 1 and 2 workers.
        schedule: ScheduleConfig {
            dataset_len: ROWS,
            global_batch: 8,
            micro_batch: 4,
            epochs: 1,
            seed: 5,
            checkpoint_every_steps: None,
        },
        eval: None,
    }
}

struct Worker {
    name: String,
    child: Child,
    final_state: PathBuf,
    log: PathBuf,
}

fn spawn_worker(c: &CoordinatorProcess, dir: &Path, config: &Path, name: &str) -> Worker {
    let final_state = dir.join(format!("{name}.safetensors"));
    let log = dir.join(format!("{name}.log"));
    let child = Command::new(env!("CARGO_BIN_EXE_eqim"))
        .args(["worker", "--coordinator"])
        .arg(c.local_addr.to_string())
        .arg("--token")
        .arg(&c.token_path)
        .args(["--worker-id", name, "--threads", "1"])
        .args(["--connect-timeout", "30", "--collective-timeout", "20"])
        .arg("--train-config")
        .arg(config)
        .arg("--export-dir")
        .arg(dir.join("export"))
        .arg("--final-state")
        .arg(&final_state)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("spawning eqim worker");
    Worker {
        name: name.to_owned(),
        child,
        final_state,
        log,
    }
}

fn wait_exit(w: &mut Worker, timeout: Duration) -> std::process::ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(status) = w.child.try_wait().unwrap() {
            return status;
        }
        if start.elapsed() > timeout {
            let _ = w.child.kill();
            panic!("{} did not exit within {timeout:?}", w.name);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn run_job(dir: &Path, config: &Path, n: u32) -> (JobOutcomeRecord, Vec<Worker>) {
    std::fs::create_dir_all(dir).unwrap();
    {
        let c = CoordinatorProcess::start(&coordinator_config(&dir.join("job"), n));
        let mut workers: Vec<Worker> = (0..n)
            .map(|i| spawn_worker(&c, dir, config, &format!("w{i}")))
            .collect();
        let outcome = c.finish(JOB_TIMEOUT);
        for w in &mut workers {
            let status = wait_exit(w, Duration::from_secs(30));
            let log = std::fs::read_to_string(&w.log).unwrap_or_default();
            assert!(status.success(), "{}: {status}\n{log}", w.name);
        }
        (outcome, workers)
    }
}

fn load(path: &Path) -> Vec<(String, Tensor)> {
    let mut named = Tensor::read_safetensors(path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    named.sort_by(|a, b| a.0.cmp(&b.0));
    named
}

fn max_abs_diff(a: &Path, b: &Path) -> f64 {
    let (a, b) = (load(a), load(b));
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(&b)
        .map(|((na, ta), (nb, tb))| {
            assert_eq!(na, nb);
            (ta - tb).abs().max().double_value(&[])
        })
        .fold(0.0, f64::max)
}

/// The `loss=` values of the worker's "generator step" log lines.
fn logged_losses(log: &Path) -> Vec<f64> {
    let text = std::fs::read_to_string(log).unwrap();
    // A log written to a file carries no colour sequences (tracing's ANSI is off off-terminal).
    assert!(
        !text.contains('\x1b'),
        "{}: ESC byte in a log written to a file",
        log.display()
    );
    text.lines()
        .filter(|l| l.contains("generator step"))
        .map(|l| {
            let field = l
                .split_whitespace()
                .find_map(|w| w.strip_prefix("loss="))
                .unwrap_or_else(|| panic!("no loss in {l}"));
            field.parse().unwrap_or_else(|_| panic!("loss {field:?}"))
        })
        .collect()
}

#[test]
fn two_workers_train_the_generator_like_one() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_inputs(dir.path());
    let (two, two_workers) = run_job(&dir.path().join("two"), &config, 2);
    assert!(two.finished, "job stopped: {}", two.stop_reason);
    assert_eq!(two.cursor.step, 3);

    // Identical replicas, and weights that moved from the initialisation.
    let (a, b) = (&two_workers[0].final_state, &two_workers[1].final_state);
    assert_eq!(max_abs_diff(a, b), 0.0, "the two replicas differ");
    let state = load(a);
    // The weights moved: with EMA rate 0.9 the live weights and their average differ.
    let tensor = |name: &str| &state.iter().find(|(n, _)| n == name).unwrap().1;
    let moved = state
        .iter()
        .filter_map(|(n, t)| {
            n.strip_prefix("model.")
                .map(|rest| (t, tensor(&format!("ema.{rest}"))))
        })
        .map(|(live, ema)| (live - ema).abs().max().double_value(&[]))
        .fold(0.0, f64::max);
    assert!(
        moved > 1e-6,
        "training did not change the weights ({moved})"
    );
    assert!(state.iter().any(|(n, _)| n.starts_with("exp_avg_sq.")));
    for (name, t) in &state {
        assert!(
            t.isfinite().all().int64_value(&[]) == 1,
            "{name} is not finite"
        );
    }
    for w in &two_workers {
        let losses = logged_losses(&w.log);
        assert_eq!(
            losses.len(),
            3,
            "{}: one logged step per committed step",
            w.name
        );
        assert!(
            losses.iter().all(|l| l.is_finite() && *l > 0.0),
            "{losses:?}"
        );
    }

    // Rank 0 exported weights and the model config that sampling reads.
    let export = dir.path().join("two/export");
    let ema = export.join("generator-ema.safetensors");
    let json: eqim_worker::model::generator::GeneratorConfig =
        serde_json::from_str(&std::fs::read_to_string(export.join("generator.json")).unwrap())
            .unwrap();
    assert_eq!(
        (json.token_num, json.vae_embed_dim, json.class_num),
        (8, 12, 4)
    );
    let vs = tch::nn::VarStore::new(tch::Device::Cpu);
    let _model =
        eqim_worker::model::generator::EquivariantGenerativeModel::new(vs.root(), &json).unwrap();
    eqim_worker::model::weights::load_file_strict(&vs, &ema).unwrap();
    let live = load(&export.join("generator.safetensors"));
    let from_state: Vec<(String, Tensor)> = state
        .iter()
        .filter_map(|(n, t)| n.strip_prefix("model.").map(|n| (n.to_owned(), t.copy())))
        .collect();
    assert_eq!(live.len(), from_state.len());

    // One worker with the whole global batch makes the same updates, up to float sums.
    let (one, one_workers) = run_job(&dir.path().join("one"), &config, 1);
    assert!(one.finished, "job stopped: {}", one.stop_reason);
    let diff = max_abs_diff(&one_workers[0].final_state, a);
    eprintln!("1 worker vs 2 workers: max abs state difference {diff:e}");
    assert!(diff < 1e-4, "1 worker vs 2 workers differ by {diff}");
}

#[test]
fn launch_trains_the_generator_and_checks_the_schedule() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_inputs(dir.path());
    let yaml = |dataset_len: u64| {
        format!(
            "bind: 127.0.0.1:0\njob_dir: {job}\nexpected_workers: 2\nmin_workers: 2\nmax_workers: 2\n\
             timeouts:\n  heartbeat_timeout: 3.0\n  quic_idle_timeout: 3.0\n  step_timeout: 30.0\n\
             schedule:\n  dataset_len: {dataset_len}\n  global_batch: 8\n  micro_batch: 4\n  epochs: 1\n  seed: 0\n",
            job = dir.path().join("job").display()
        )
    };
    let launch = |coordinator: &Path| {
        Command::new(env!("CARGO_BIN_EXE_eqim"))
            .arg("launch")
            .arg("--config")
            .arg(coordinator)
            .args(["--workers", "2", "--connect-timeout", "30"])
            .arg("--train-config")
            .arg(&config)
            .env("RUST_LOG", "info")
            .output()
            .expect("running eqim launch")
    };

    // A schedule that does not cover the cache is refused before anything starts.
    let wrong = dir.path().join("wrong.yaml");
    std::fs::write(&wrong, yaml(ROWS + 1)).unwrap();
    let out = launch(&wrong);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("dataset_len = 25") && stderr.contains("has 24 rows"),
        "{stderr}"
    );

    let right = dir.path().join("right.yaml");
    std::fs::write(&right, yaml(ROWS)).unwrap();
    let out = launch(&right);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let export = dir.path().join("job/generator");
    assert!(stdout.contains("generator-ema.safetensors"), "{stdout}");
    // Redirected output (pipes here) of the launcher, coordinator and workers has no colour.
    let stderr = String::from_utf8_lossy(&out.stderr);
    let all = format!("{stdout}{stderr}");
    assert!(all.contains(" INFO "), "no INFO lines to check:\n{all}");
    assert!(
        !all.contains('\x1b'),
        "ESC byte in redirected output:\n{all}"
    );
    for file in [
        "generator-ema.safetensors",
        "generator.safetensors",
        "generator.json",
    ] {
        assert!(export.join(file).is_file(), "{file} missing");
    }
    // The exported weights sample with `eqim sample-tokens`.
    let tokens = dir.path().join("tokens.safetensors");
    let sampled = Command::new(env!("CARGO_BIN_EXE_eqim"))
        .arg("sample-tokens")
        .arg("--weights")
        .arg(export.join("generator-ema.safetensors"))
        .arg("--config")
        .arg(export.join("generator.json"))
        .args(["--labels", "0,3", "--steps", "2", "--output"])
        .arg(&tokens)
        .env("RUST_LOG", "warn")
        .output()
        .expect("running eqim sample-tokens");
    assert!(
        sampled.status.success(),
        "{}",
        String::from_utf8_lossy(&sampled.stderr)
    );
    let named = load(&tokens);
    let (_, t) = named.iter().find(|(n, _)| n == "tokens").expect("tokens");
    assert_eq!(t.size(), vec![2, 8, 12]);
}

#[test]
fn the_demo_configs_parse() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let train: eqim_common::train_config::GeneratorTrainConfig =
        eqim_common::config::load_config(&root.join("configs/demo-generator.toml")).unwrap();
    let model = eqim_worker::train::setup::resolve_model(&train.model).unwrap();
    assert_eq!(
        (model.token_num, model.vae_embed_dim, model.class_num),
        (16, 16, 5)
    );
    let coordinator: CoordinatorConfig =
        eqim_common::config::load_config(&root.join("configs/demo-launch.yaml")).unwrap();
    assert_eq!(coordinator.schedule.global_batch, train.optim.batch);
}
