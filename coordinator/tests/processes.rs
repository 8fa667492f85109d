//! The coordinator with real worker processes (`eqim-sim-worker`): a worker killed with SIGKILL
//! is declared dead within the heartbeat timeout and training goes on; a worker sent SIGTERM
//! leaves at once.

use eqim_common::coordinator_config::{CoordinatorConfig, Timeouts};
use eqim_common::schedule::ScheduleConfig;
use eqim_coordinator::Coordinator;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(1);

fn config(job_dir: &std::path::Path) -> CoordinatorConfig {
    CoordinatorConfig {
        bind: "127.0.0.1:0".parse().unwrap(),
        job_dir: job_dir.to_owned(),
        metrics_addr: None,
        expected_workers: 3,
        min_workers: 1,
        max_workers: 3,
        timeouts: Timeouts {
            heartbeat_interval: Duration::from_millis(200),
            heartbeat_timeout: HEARTBEAT_TIMEOUT,
            quic_idle_timeout: HEARTBEAT_TIMEOUT,
            ..Timeouts::default()
        },
        schedule: ScheduleConfig {
            dataset_len: 1_000_000,
            global_batch: 4,
            micro_batch: 4,
            epochs: 1,
            seed: 1,
            checkpoint_every_steps: None,
        },
        eval: None,
    }
}

/// Kills the child on drop, so a failing test leaves no process behind.
struct Worker(Child);

impl Drop for Worker {
    fn drop(&mut self) {
        // Already dead in most tests; an error here only means that.
        if self.0.kill().is_ok() {
            self.0.wait().ok();
        }
    }
}

fn spawn_worker(c: &Coordinator, id: &str) -> Worker {
    let child = Command::new(env!("CARGO_BIN_EXE_eqim-sim-worker"))
        .args(["--coordinator", &c.local_addr.to_string()])
        .arg("--token")
        .arg(&c.token_path)
        .args(["--id", id, "--step-ms", "10"])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .expect("starting eqim-sim-worker");
    Worker(child)
}

/// Polls the coordinator's status until `done` or `limit`; returns the time it took.
async fn wait_for(
    c: &Coordinator,
    limit: Duration,
    what: &str,
    done: impl Fn(&eqim_coordinator::job::JobStatus) -> bool,
) -> Duration {
    let started = Instant::now();
    loop {
        let status = c.status().await.unwrap();
        if done(&status) {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < limit,
            "{what} within {limit:?}: {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_and_terminated_worker_processes_leave_the_job_and_the_rest_trains_on() {
    let dir = tempfile::tempdir().unwrap();
    let c = Coordinator::start(config(dir.path())).await.unwrap();
    let mut a = spawn_worker(&c, "a");
    let _b = spawn_worker(&c, "b");
    let mut victim = spawn_worker(&c, "victim");
    wait_for(&c, Duration::from_secs(20), "3 workers training", |s| {
        s.roster.len() == 3 && s.cursor.step >= 5
    })
    .await;

    let before = c.status().await.unwrap();
    victim.0.kill().unwrap(); // SIGKILL
    victim.0.wait().unwrap();
    let detected = wait_for(
        &c,
        Duration::from_secs(5),
        "the killed worker removed",
        |s| s.members.len() == 2 && s.generation > before.generation,
    )
    .await;
    eprintln!("SIGKILL to new generation: {detected:?} (heartbeat timeout {HEARTBEAT_TIMEOUT:?})");
    assert!(detected <= HEARTBEAT_TIMEOUT + Duration::from_millis(500));
    let step = c.status().await.unwrap().cursor.step;
    wait_for(&c, Duration::from_secs(5), "survivors train on", |s| {
        s.cursor.step >= step + 5
    })
    .await;

    let before = c.status().await.unwrap();
    // The shell's builtin kill: no unsafe libc call here, and no dependency on procps.
    let term = Command::new("sh")
        .args(["-c", &format!("kill -TERM {}", a.0.id())])
        .status()
        .unwrap();
    assert!(term.success());
    let left = wait_for(
        &c,
        Duration::from_secs(5),
        "the terminated worker removed",
        |s| s.members.len() == 1 && s.generation > before.generation,
    )
    .await;
    eprintln!("SIGTERM to new generation: {left:?}");
    assert!(
        left < HEARTBEAT_TIMEOUT,
        "a leave needs no timeout: {left:?}"
    );
    assert!(a.0.wait().unwrap().success(), "SIGTERM exits cleanly");

    let outcome = c.shutdown("test over").await.unwrap();
    let coverage = outcome.ledger.summary();
    assert_eq!(coverage[0].twice + coverage[0].more, 0, "no sample twice");
}
