//! One training path: `eqim train-generator` is the 1-rank run of the runtime, so with the same
//! config and seed it and `eqim launch --workers 1` train the same samples in the same order and
//! end bitwise equal (weights, EMA, optimizer moments, ledger); either resumes the other's
//! checkpoints; and 2 workers x micro-batch 4 compute the same steps as 1 process accumulating
//! 2 x 4. The schedule crosses epoch boundaries with a short last step (44 samples in batches of
//! 8: five steps of 8 and one of 4 per epoch).

use eqim_common::coordinator_config::{CoordinatorConfig, Timeouts};
use eqim_common::schedule::ScheduleConfig;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;
use support::coordinator::CoordinatorProcess;
use tch::Tensor;

mod support;

const SEED: u64 = 7;
const SAMPLES: u64 = 44;
const EPOCHS: u32 = 5;
/// 6 steps per epoch (the sixth has 4 samples).
const STEPS: u64 = 30;

fn write_config(dir: &Path, name: &str, output_dir: &Path) -> PathBuf {
    let path = dir.join(format!("{name}.toml"));
    let text = format!(
        r#"seed = {SEED}
output_dir = "{out}"
device = "cpu"
threads = 1

[model]
encoder_embed_dim = 32
encoder_depth = 1
encoder_num_heads = 2
decoder_embed_dim = 32
decoder_depth = 1
decoder_num_heads = 2
vae_embed_dim = 8
token_num = 8
buffer_size = 4
cond_length = 3
class_num = 4
diffloss_d = 1
diffloss_w = 32
diffusion_batch_mul = 2
shift_num = 8

[data]
kind = "synthetic"
samples = {SAMPLES}
noise = 0.1

[optim]
batch = 8
micro_batch = 4
blr = 0.05
warmup_epochs = 1.0
schedule = "cosine"
ema_rate = 0.9

[run]
epochs = {EPOCHS}
checkpoint_every = 6
log_every = 1
"#,
        out = output_dir.display()
    );
    std::fs::write(&path, text).unwrap();
    path
}

fn eqim() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_eqim"));
    c.env("RUST_LOG", "warn").env("EQIM_NO_PROGRESS", "1");
    c
}

fn check(out: std::process::Output, what: &str) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success(),
        "{what} failed: {}\n{}\n{stderr}",
        out.status,
        String::from_utf8_lossy(&out.stdout)
    );
    stderr
}

fn train_generator(config: &Path, max_steps: Option<u64>) {
    let mut c = eqim();
    c.arg("train-generator").arg("--config").arg(config);
    if let Some(n) = max_steps {
        c.arg("--max-steps").arg(n.to_string());
    }
    check(c.output().unwrap(), "eqim train-generator");
}

/// `eqim launch --workers 1` of `config` with the schedule of the training config, `epochs` long.
fn launch_one(dir: &Path, job_dir: &Path, config: &Path, epochs: u32) {
    let yaml = dir.join(format!("launch-{epochs}.yaml"));
    std::fs::write(
        &yaml,
        format!(
            "bind: 127.0.0.1:0\njob_dir: {job}\nexpected_workers: 1\nmin_workers: 1\nmax_workers: 1\n\
             timeouts:\n  heartbeat_timeout: 3.0\n  quic_idle_timeout: 3.0\n  step_timeout: 60.0\n\
             schedule:\n  dataset_len: {SAMPLES}\n  global_batch: 8\n  micro_batch: 4\n  epochs: {epochs}\n  seed: {SEED}\n  checkpoint_every_steps: 6\n",
            job = job_dir.display()
        ),
    )
    .unwrap();
    let out = eqim()
        .arg("launch")
        .arg("--config")
        .arg(&yaml)
        .args(["--workers", "1", "--connect-timeout", "30"])
        .arg("--train-config")
        .arg(config)
        .output()
        .unwrap();
    check(out, "eqim launch --workers 1");
}

fn checkpoint(root: &Path, steps: u64) -> PathBuf {
    root.join("checkpoints")
        .join(eqim_common::checkpoint::dir_name(steps))
}

fn job_json(dir: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(dir.join("job.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// Same state bytes and the same cursor and ledger.
fn assert_same_run(a: &Path, b: &Path, what: &str) {
    eqim_common::checkpoint::verify(a).unwrap();
    eqim_common::checkpoint::verify(b).unwrap();
    let state = |d: &Path| std::fs::read(d.join("state.safetensors")).unwrap();
    assert!(state(a) == state(b), "{what}: the training states differ");
    let (ja, jb) = (job_json(a), job_json(b));
    assert_eq!(ja["cursor"], jb["cursor"], "{what}: cursors differ");
    assert_eq!(ja["ledger"], jb["ledger"], "{what}: ledgers differ");
}

#[test]
fn train_generator_and_launch_are_one_run_and_resume_each_other() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();

    // Straight runs from both entry points.
    let straight = d.join("straight");
    train_generator(&write_config(d, "straight", &straight), None);
    let end = checkpoint(&straight, STEPS);
    let job = job_json(&end);
    assert_eq!(job["cursor"]["step"], STEPS);
    assert_eq!(job["cursor"]["epoch"], EPOCHS);
    let ledger: eqim_common::ledger::Ledger =
        serde_json::from_value(job["ledger"].clone()).unwrap();
    let coverage = ledger.summary();
    assert_eq!(coverage.len(), EPOCHS as usize);
    assert!(coverage.iter().all(|c| c.is_exact()), "{coverage:?}");
    let short: Vec<usize> = ledger.entries.iter().map(|e| e.indices.len()).collect();
    assert_eq!(&short[..6], &[8, 8, 8, 8, 8, 4]);
    let launched = d.join("launched");
    launch_one(
        d,
        &launched,
        &write_config(d, "launched", &d.join("unused")),
        EPOCHS,
    );
    assert_same_run(
        &end,
        &checkpoint(&launched, STEPS),
        "train-generator vs launch",
    );

    // train-generator stops at 12 (mid-way, after an epoch boundary); launch resumes it.
    let tg_first = d.join("tg-first");
    let config = write_config(d, "tg-first", &tg_first);
    train_generator(&config, Some(12));
    assert!(!checkpoint(&tg_first, 18).exists());
    launch_one(d, &tg_first, &config, EPOCHS);
    assert_same_run(
        &end,
        &checkpoint(&tg_first, STEPS),
        "train-generator -> launch",
    );

    // launch runs 2 epochs (12 steps); train-generator resumes it.
    let launch_first = d.join("launch-first");
    let config = write_config(d, "launch-first", &launch_first);
    launch_one(d, &launch_first, &config, 2);
    assert!(checkpoint(&launch_first, 12).exists());
    train_generator(&config, None);
    assert_same_run(
        &end,
        &checkpoint(&launch_first, STEPS),
        "launch -> train-generator",
    );

    // Resuming under another seed would change the data order: refused by name.
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, text.replace("seed = 7", "seed = 8")).unwrap();
    let mut c = eqim();
    c.arg("train-generator").arg("--config").arg(&config);
    c.args(["--max-steps", "31"]);
    let out = c.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("seed = 7") && stderr.contains("--fresh"),
        "{stderr}"
    );
}

#[test]
fn an_old_single_process_checkpoint_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().join("out");
    std::fs::create_dir_all(out_dir.join("checkpoint-last")).unwrap();
    let config = write_config(dir.path(), "old", &out_dir);
    let out = eqim()
        .arg("train-generator")
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("checkpoint-last") && stderr.contains("--fresh"),
        "{stderr}"
    );
    // --fresh trains (and names the old directory in a warning).
    let out = eqim()
        .arg("train-generator")
        .arg("--config")
        .arg(&config)
        .args(["--fresh", "--max-steps", "2"])
        .output()
        .unwrap();
    let stderr = check(out, "train-generator --fresh");
    assert!(stderr.contains("checkpoint-last"), "{stderr}");
    assert!(checkpoint(&out_dir, 2).join("manifest.json").is_file());
}

/// (global mean loss per step) from JSON step logs of the ranks of one job.
fn step_losses(logs: &[PathBuf]) -> Vec<f64> {
    let mut per_step: std::collections::BTreeMap<u64, (f64, f64)> = Default::default();
    for log in logs {
        for line in std::fs::read_to_string(log).unwrap().lines() {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            let samples = v["samples"].as_f64().unwrap();
            let entry = per_step.entry(v["step"].as_u64().unwrap()).or_default();
            entry.0 += v["loss"].as_f64().unwrap() * samples;
            entry.1 += samples;
        }
    }
    per_step.values().map(|(sum, n)| sum / n).collect()
}

fn load(path: &Path) -> Vec<(String, Tensor)> {
    let mut named = Tensor::read_safetensors(path).unwrap();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    named
}

#[test]
fn two_workers_of_micro_batch_4_match_one_process_accumulating_two() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let one = d.join("one");
    let config = write_config(d, "one", &one);
    train_generator(&config, None);

    let job_dir = d.join("two");
    let logs: Vec<PathBuf> = (0..2).map(|i| d.join(format!("w{i}.jsonl"))).collect();
    {
        let cfg = CoordinatorConfig {
            bind: "127.0.0.1:0".parse().unwrap(),
            job_dir: job_dir.clone(),
            metrics_addr: None,
            expected_workers: 2,
            min_workers: 2,
            max_workers: 2,
            timeouts: Timeouts {
                heartbeat_interval: Duration::from_millis(100),
                heartbeat_timeout: Duration::from_millis(3000),
                quic_idle_timeout: Duration::from_millis(3000),
                handshake_timeout: Duration::from_secs(5),
                join_timeout: Duration::from_secs(30),
                rendezvous_timeout: Duration::from_secs(20),
                step_timeout: Duration::from_secs(60),
                probe_timeout: Duration::from_millis(300),
                decision_tick_interval: Duration::from_millis(5),
            },
            schedule: ScheduleConfig {
                dataset_len: SAMPLES,
                global_batch: 8,
                micro_batch: 4,
                epochs: EPOCHS,
                seed: SEED,
                checkpoint_every_steps: Some(6),
            },
            eval: None,
        };
        let c = CoordinatorProcess::start(&cfg);
        let mut children: Vec<_> = logs
            .iter()
            .enumerate()
            .map(|(i, log)| {
                eqim()
                    .args(["worker", "--coordinator"])
                    .arg(c.local_addr.to_string())
                    .arg("--token")
                    .arg(&c.token_path)
                    .args(["--worker-id", &format!("w{i}"), "--threads", "1"])
                    .args(["--connect-timeout", "30", "--collective-timeout", "20"])
                    .arg("--train-config")
                    .arg(&config)
                    .arg("--step-log")
                    .arg(log)
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .unwrap()
            })
            .collect();
        let outcome = c.finish(Duration::from_secs(180));
        assert!(outcome.finished, "{}", outcome.stop_reason);
        for child in &mut children {
            assert!(child.wait().unwrap().success());
        }
    }

    let single = step_losses(&[one.join("train_log.jsonl")]);
    let double = step_losses(&logs);
    assert_eq!(single.len(), STEPS as usize);
    assert_eq!(double.len(), STEPS as usize);
    let worst_loss = single
        .iter()
        .zip(&double)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);
    let (a, b) = (
        load(&checkpoint(&one, STEPS).join("state.safetensors")),
        load(&checkpoint(&job_dir, STEPS).join("state.safetensors")),
    );
    assert_eq!(a.len(), b.len());
    let worst_state = a
        .iter()
        .zip(&b)
        .filter(|((n, _), _)| n.starts_with("model.") || n.starts_with("ema."))
        .map(|((na, ta), (nb, tb))| {
            assert_eq!(na, nb);
            (ta - tb).abs().max().double_value(&[])
        })
        .fold(0.0, f64::max);
    eprintln!("1 process vs 2 workers: per-step loss {worst_loss:e}, weights/EMA {worst_state:e}");
    assert!(worst_loss <= 1e-6, "per-step losses differ by {worst_loss}");
    assert!(worst_state <= 1e-6, "weights differ by {worst_state}");
    // Both covered every sample once per epoch.
    let ledger = |root: &Path| job_json(&checkpoint(root, STEPS))["ledger"].clone();
    assert_eq!(
        ledger(&one)["entries"].as_array().unwrap().len(),
        STEPS as usize
    );
    let l1: Vec<serde_json::Value> = ledger(&one)["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["indices"].clone())
        .collect();
    let l2: Vec<serde_json::Value> = ledger(&job_dir)["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["indices"].clone())
        .collect();
    assert_eq!(l1, l2, "the two runs took different samples");
}
