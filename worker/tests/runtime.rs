//! End-to-end tests of the distributed runtime on loopback: an in-process coordinator and real
//! `eqim worker` processes training the synthetic MLP through c10d gloo. Each job is a few
//! seconds; the tests check weights (equivalence, identical replicas) and the data ledger.

use eqim_coordinator::actor::JobOutcome;
use eqim_coordinator::config::{CoordinatorConfig, Timeouts};
use eqim_coordinator::steps::ScheduleConfig;
use eqim_coordinator::Coordinator;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tch::Tensor;

/// Bound on one whole job in these tests.
const JOB_TIMEOUT: Duration = Duration::from_secs(90);

fn config(job_dir: &Path, workers: u32, schedule: ScheduleConfig) -> CoordinatorConfig {
    CoordinatorConfig {
        bind: "127.0.0.1:0".parse().unwrap(),
        job_dir: job_dir.to_owned(),
        expected_workers: workers,
        min_workers: 1,
        max_workers: 4,
        timeouts: Timeouts {
            heartbeat_interval: Duration::from_millis(100),
            heartbeat_timeout: Duration::from_millis(1500),
            quic_idle_timeout: Duration::from_millis(1500),
            handshake_timeout: Duration::from_secs(2),
            join_timeout: Duration::from_secs(20),
            rendezvous_timeout: Duration::from_secs(5),
            step_timeout: Duration::from_secs(10),
            probe_timeout: Duration::from_millis(300),
            decision_tick_interval: Duration::from_millis(5),
        },
        schedule,
    }
}

fn schedule(dataset_len: u64, global_batch: u64, micro_batch: u64) -> ScheduleConfig {
    ScheduleConfig {
        dataset_len,
        global_batch,
        micro_batch,
        epochs: 1,
        seed: 5,
        checkpoint_every_steps: None,
    }
}

struct Worker {
    name: String,
    child: Child,
    final_state: PathBuf,
}

fn spawn_worker(c: &Coordinator, dir: &Path, name: &str) -> Worker {
    let final_state = dir.join(format!("{name}.safetensors"));
    let log = std::fs::File::create(dir.join(format!("{name}.log"))).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_eqim"))
        .args(["worker", "--coordinator"])
        .arg(c.local_addr.to_string())
        .arg("--token")
        .arg(&c.token_path)
        .args(["--worker-id", name, "--threads", "1", "--connect-timeout", "20"])
        .args(["--collective-timeout", "5"])
        .arg("--final-state")
        .arg(&final_state)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawning eqim worker");
    Worker {
        name: name.to_owned(),
        child,
        final_state,
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

fn log_of(dir: &Path, name: &str) -> String {
    std::fs::read_to_string(dir.join(format!("{name}.log"))).unwrap_or_default()
}

async fn wait_for_step(c: &Coordinator, step: u64) {
    let start = Instant::now();
    while c.status().await.unwrap().cursor.step < step {
        assert!(start.elapsed() < JOB_TIMEOUT, "step {step} not reached");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn finish(c: Coordinator) -> JobOutcome {
    tokio::time::timeout(JOB_TIMEOUT, c.wait())
        .await
        .expect("job did not finish in time")
        .expect("coordinator")
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

fn assert_exact_ledger(outcome: &JobOutcome) {
    assert!(outcome.finished, "job stopped: {}", outcome.stop_reason);
    let coverage = outcome.ledger.summary();
    assert!(!coverage.is_empty());
    for epoch in coverage {
        assert!(epoch.is_exact(), "{epoch}");
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Runs one job with `n` workers and returns the final state of worker 0 and every worker's path.
fn run_job(dir: &Path, n: u32, schedule: ScheduleConfig) -> (JobOutcome, Vec<PathBuf>) {
    runtime().block_on(async {
        let c = Coordinator::start(config(&dir.join("job"), n, schedule))
            .await
            .unwrap();
        let mut workers: Vec<Worker> = (0..n)
            .map(|i| spawn_worker(&c, dir, &format!("w{i}")))
            .collect();
        let outcome = finish(c).await;
        for w in &mut workers {
            let status = wait_exit(w, Duration::from_secs(20));
            assert!(status.success(), "{}: {status}\n{}", w.name, log_of(dir, &w.name));
        }
        (outcome, workers.into_iter().map(|w| w.final_state).collect())
    })
}

#[test]
fn two_workers_match_one_worker_with_the_whole_batch() {
    let dir = tempfile::tempdir().unwrap();
    // 2 workers with 8 samples each per step vs 1 worker with 16: same samples, same updates.
    let (one, one_paths) = run_job(&dir.path().join("one"), 1, schedule(96, 16, 16));
    let (two, two_paths) = run_job(&dir.path().join("two"), 2, schedule(96, 16, 16));
    assert_exact_ledger(&one);
    assert_exact_ledger(&two);
    assert_eq!(one.cursor.step, 6);
    assert_eq!(two.cursor.step, 6);
    assert_eq!(one.ledger, {
        let mut l = two.ledger.clone();
        for e in &mut l.entries {
            e.generation = one.ledger.entries[0].generation;
        }
        l
    });
    let replicas = max_abs_diff(&two_paths[0], &two_paths[1]);
    assert_eq!(replicas, 0.0, "the two replicas differ");
    let diff = max_abs_diff(&one_paths[0], &two_paths[0]);
    eprintln!("equivalence: max |w(1 worker, batch 16) - w(2 workers, batch 8 each)| = {diff:e} after 6 steps");
    assert!(diff < 1e-5, "max difference {diff}");
    // The update is not a no-op: the weights moved from their initial values.
    let initial = dir.path().join("initial.safetensors");
    let mlp = eqim_worker::runtime::trainable::SyntheticMlp::new(0, 0.05);
    eqim_worker::runtime::trainer::save_state(&mlp, &initial).unwrap();
    assert!(max_abs_diff(&initial, &one_paths[0]) > 1e-3);
}
