//! End-to-end tests of the distributed runtime on loopback: a real `eqim-coordinator` process and
//! real `eqim worker` processes training the synthetic MLP through c10d gloo. Each job is a few
//! seconds; the tests check weights (equivalence, identical replicas) and the data ledger.

use eqim_common::coordinator_config::{CoordinatorConfig, Timeouts};
use eqim_common::outcome::JobOutcomeRecord;
use eqim_common::schedule::ScheduleConfig;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use support::coordinator::{assert_exact_ledger, CoordinatorProcess};
use tch::Tensor;

mod support;

/// Bound on one whole job in these tests.
const JOB_TIMEOUT: Duration = Duration::from_secs(90);

fn config(job_dir: &Path, workers: u32, schedule: ScheduleConfig) -> CoordinatorConfig {
    CoordinatorConfig {
        bind: "127.0.0.1:0".parse().unwrap(),
        job_dir: job_dir.to_owned(),
        metrics_addr: None,
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
        eval: None,
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

fn spawn_worker(c: &CoordinatorProcess, dir: &Path, name: &str) -> Worker {
    let final_state = dir.join(format!("{name}.safetensors"));
    let log = std::fs::File::create(dir.join(format!("{name}.log"))).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_eqim"))
        .args(["worker", "--coordinator"])
        .arg(c.local_addr.to_string())
        .arg("--token")
        .arg(&c.token_path)
        .args([
            "--worker-id",
            name,
            "--threads",
            "1",
            "--connect-timeout",
            "20",
        ])
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

/// Runs one job with `n` workers and returns the final state of worker 0 and every worker's path.
fn run_job(dir: &Path, n: u32, schedule: ScheduleConfig) -> (JobOutcomeRecord, Vec<PathBuf>) {
    {
        let c = CoordinatorProcess::start(&config(&dir.join("job"), n, schedule));
        let mut workers: Vec<Worker> = (0..n)
            .map(|i| spawn_worker(&c, dir, &format!("w{i}")))
            .collect();
        let outcome = c.finish(JOB_TIMEOUT);
        for w in &mut workers {
            let status = wait_exit(w, Duration::from_secs(20));
            assert!(
                status.success(),
                "{}: {status}\n{}",
                w.name,
                log_of(dir, &w.name)
            );
        }
        (
            outcome,
            workers.into_iter().map(|w| w.final_state).collect(),
        )
    }
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

fn signal(w: &Worker, sig: nix::sys::signal::Signal) {
    let pid = nix::unistd::Pid::from_raw(w.child.id() as i32);
    nix::sys::signal::kill(pid, sig).unwrap();
}

#[test]
fn kill_9_of_one_of_three_workers_loses_no_sample_and_survivors_continue() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    {
        let c = CoordinatorProcess::start(&config(&dir.join("job"), 3, schedule(480, 6, 6)));
        let mut workers: Vec<Worker> = (0..3)
            .map(|i| spawn_worker(&c, dir, &format!("w{i}")))
            .collect();
        c.wait_for_step(15, JOB_TIMEOUT);
        let before = c.status();
        signal(&workers[1], nix::sys::signal::Signal::SIGKILL);
        let killed_at = Instant::now();
        // The survivors go on from their in-memory state in a new generation.
        c.wait_for_step(before.step + 5, JOB_TIMEOUT);
        let recovery = killed_at.elapsed();
        let after = c.status();
        assert!(after.generation > before.generation);
        assert_eq!(after.world_size, 2, "{after:?}");
        eprintln!(
            "kill -9 at step {}: 5 more steps committed {recovery:?} later in generation {}",
            before.step, after.generation
        );
        let outcome = c.finish(JOB_TIMEOUT);
        assert_exact_ledger(&outcome);
        assert_eq!(outcome.cursor.step, 80);
        for i in [0, 2] {
            let status = wait_exit(&mut workers[i], Duration::from_secs(20));
            assert!(
                status.success(),
                "w{i}: {status}\n{}",
                log_of(dir, &format!("w{i}"))
            );
            // Survivors were never restarted: one process, one "admitted" line each.
            assert_eq!(log_of(dir, &format!("w{i}")).matches("admitted").count(), 1);
        }
        let _ = wait_exit(&mut workers[1], Duration::from_secs(5));
        assert_eq!(
            max_abs_diff(&workers[0].final_state, &workers[2].final_state),
            0.0
        );
    }
}

#[test]
fn a_late_worker_receives_the_state_and_trains() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    {
        let c = CoordinatorProcess::start(&config(&dir.join("job"), 2, schedule(720, 6, 6)));
        let mut workers: Vec<Worker> = (0..2)
            .map(|i| spawn_worker(&c, dir, &format!("w{i}")))
            .collect();
        c.wait_for_step(10, JOB_TIMEOUT);
        let joined_at_step = c.status().step;
        workers.push(spawn_worker(&c, dir, "late"));
        c.wait_until("the late worker in the roster", JOB_TIMEOUT, |s| {
            s.world_size == 3
        });
        let outcome = c.finish(JOB_TIMEOUT);
        assert_exact_ledger(&outcome);
        assert_eq!(outcome.cursor.step, 120);
        for w in &mut workers {
            let status = wait_exit(w, Duration::from_secs(20));
            assert!(
                status.success(),
                "{}: {status}\n{}",
                w.name,
                log_of(dir, &w.name)
            );
        }
        let late_log = log_of(dir, "late");
        assert!(late_log.contains("group ready"), "{late_log}");
        assert!(late_log.contains("step applied"), "{late_log}");
        eprintln!("late worker joined after step {joined_at_step}");
        // Its weights equal the others': it took the state by broadcast, then trained in step.
        assert_eq!(
            max_abs_diff(&workers[0].final_state, &workers[2].final_state),
            0.0
        );
        assert_eq!(
            max_abs_diff(&workers[1].final_state, &workers[2].final_state),
            0.0
        );
    }
}

#[test]
fn sigterm_makes_a_worker_leave_promptly_and_the_job_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    {
        let c = CoordinatorProcess::start(&config(&dir.join("job"), 3, schedule(240, 6, 6)));
        let mut workers: Vec<Worker> = (0..3)
            .map(|i| spawn_worker(&c, dir, &format!("w{i}")))
            .collect();
        c.wait_for_step(10, JOB_TIMEOUT);
        signal(&workers[2], nix::sys::signal::Signal::SIGTERM);
        let sent = Instant::now();
        let status = wait_exit(&mut workers[2], Duration::from_secs(5));
        let took = sent.elapsed();
        assert!(status.success(), "{status}\n{}", log_of(dir, "w2"));
        eprintln!("SIGTERM to exit: {took:?}");
        let outcome = c.finish(JOB_TIMEOUT);
        assert_exact_ledger(&outcome);
        for w in workers.iter_mut().take(2) {
            let status = wait_exit(w, Duration::from_secs(20));
            assert!(
                status.success(),
                "{}: {status}\n{}",
                w.name,
                log_of(dir, &w.name)
            );
        }
        assert!(log_of(dir, "w2").contains("leaving the job"));
    }
}

fn wait_for_file(path: &Path) {
    let start = Instant::now();
    while !path.exists() {
        assert!(
            start.elapsed() < JOB_TIMEOUT,
            "{} never appeared",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn checkpointed(dataset_len: u64) -> ScheduleConfig {
    ScheduleConfig {
        checkpoint_every_steps: Some(10),
        ..schedule(dataset_len, 6, 6)
    }
}

#[test]
fn checkpoints_resume_bitwise_after_kills_a_corrupt_checkpoint_and_a_coordinator_restart() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    // Reference: the same job, uninterrupted.
    let (clean, clean_paths) = run_job(&dir.join("clean"), 2, checkpointed(240));
    assert_exact_ledger(&clean);
    assert_eq!(clean.cursor.step, 40);

    // 1. Kill every worker and the coordinator after the step-20 checkpoint, corrupt it, resume.
    let crashed = dir.join("crashed");
    let job = crashed.join("job");
    let root = job.join("checkpoints");
    {
        let c = CoordinatorProcess::start(&config(&job, 2, checkpointed(240)));
        let mut workers: Vec<Worker> = (0..2)
            .map(|i| spawn_worker(&c, &crashed, &format!("w{i}")))
            .collect();
        wait_for_file(&root.join("step-00000020").join("manifest.json"));
        for w in &mut workers {
            signal(w, nix::sys::signal::Signal::SIGKILL);
            let _ = wait_exit(w, Duration::from_secs(5));
        }
        c.shutdown();
    }
    let state = root.join("step-00000020").join("state.safetensors");
    let mut bytes = std::fs::read(&state).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    std::fs::write(&state, bytes).unwrap();
    let lines = eqim_worker::runtime::ledger_cmd::report(&root).unwrap();
    assert!(
        lines[0].contains("step-00000020") && lines[0].contains("SHA-256"),
        "{lines:?}"
    );
    assert!(lines[1].contains("step-00000010"), "{lines:?}");
    let (resumed, resumed_paths) = run_job(&crashed, 2, checkpointed(240));
    assert_exact_ledger(&resumed);
    assert_eq!(resumed.cursor.step, 40);
    assert!(log_of(&crashed, "w0").contains("step-00000010"));
    for (a, b) in clean_paths.iter().zip(&resumed_paths) {
        assert_eq!(
            max_abs_diff(a, b),
            0.0,
            "resume from step 10 is not bitwise"
        );
    }
    let lines = eqim_worker::runtime::ledger_cmd::report(&root).unwrap();
    assert!(
        lines.iter().any(|l| l.contains("each sample exactly once")),
        "{lines:?}"
    );

    // 2. Restart only the coordinator: the workers keep running, reconnect and reload step 10.
    let restarted = dir.join("restarted");
    let job = restarted.join("job");
    {
        let c = CoordinatorProcess::start(&config(&job, 2, checkpointed(240)));
        let mut workers: Vec<Worker> = (0..2)
            .map(|i| spawn_worker(&c, &restarted, &format!("w{i}")))
            .collect();
        wait_for_file(&job.join("checkpoints/step-00000010/manifest.json"));
        // A restart is a new process on the same address; the workers reconnect to it.
        let c = c.restart();
        let outcome = c.finish(JOB_TIMEOUT);
        assert_exact_ledger(&outcome);
        assert_eq!(outcome.cursor.step, 40);
        for (w, clean) in workers.iter_mut().zip(&clean_paths) {
            let status = wait_exit(w, Duration::from_secs(20));
            assert!(
                status.success(),
                "{}: {status}\n{}",
                w.name,
                log_of(&restarted, &w.name)
            );
            assert!(log_of(&restarted, &w.name).contains("reconnecting"));
            assert_eq!(max_abs_diff(clean, &w.final_state), 0.0);
        }
    }
}

#[test]
fn sigterm_of_the_last_worker_takes_a_just_in_time_checkpoint_that_resumes_bitwise() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    // No periodic checkpoint: only the last commit (step 200) would order one.
    let no_periodic = || ScheduleConfig {
        checkpoint_every_steps: Some(1000),
        ..schedule(1200, 6, 6)
    };
    let (clean, clean_paths) = run_job(&dir.join("clean"), 1, no_periodic());
    assert_exact_ledger(&clean);
    assert_eq!(clean.cursor.step, 200);

    // The only worker gets SIGTERM mid-job: it must checkpoint the committed steps before going.
    let preempted = dir.join("preempted");
    let job = preempted.join("job");
    let root = job.join("checkpoints");
    let (committed, took) = {
        let c = CoordinatorProcess::start(&config(&job, 1, no_periodic()));
        let mut w = spawn_worker(&c, &preempted, "w0");
        c.wait_for_step(20, JOB_TIMEOUT);
        signal(&w, nix::sys::signal::Signal::SIGTERM);
        let sent = Instant::now();
        let status = wait_exit(&mut w, Duration::from_secs(10));
        let took = sent.elapsed();
        assert!(status.success(), "{status}\n{}", log_of(&preempted, "w0"));
        let after = c.status();
        // The coordinator took it out of the membership at once (it said it was leaving).
        assert!(c.log_text().contains("worker leaving"), "{}", c.log_text());
        c.shutdown();
        (after.step, took)
    };
    assert!((20..200).contains(&committed), "committed {committed}");
    let log = log_of(&preempted, "w0");
    assert!(log.contains("just-in-time checkpoint written"), "{log}");
    let checkpoints: Vec<String> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    let name = eqim_common::checkpoint::dir_name(committed);
    assert_eq!(checkpoints, vec![name.clone()]);
    let manifest = eqim_common::checkpoint::verify(&root.join(&name)).unwrap();
    assert_eq!(manifest.step, committed);
    eprintln!("SIGTERM of the last worker after {committed} committed steps: checkpoint {name} written, exit {took:?} after the signal");

    // A fresh coordinator and worker resume from it and end where the clean run ended.
    let (resumed, resumed_paths) = run_job(&preempted, 1, no_periodic());
    assert_exact_ledger(&resumed);
    assert_eq!(resumed.cursor.step, 200);
    let log = log_of(&preempted, "w0");
    assert!(
        log.contains("state loaded from checkpoint") && log.contains(&name),
        "{log}"
    );
    assert_eq!(
        max_abs_diff(&clean_paths[0], &resumed_paths[0]),
        0.0,
        "resume from the just-in-time checkpoint is not bitwise"
    );
}
