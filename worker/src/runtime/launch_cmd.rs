//! `eqim launch`: a local cluster on this machine — one coordinator process and N worker
//! processes (threads divided among them), logs streamed with a prefix, all stopped together on
//! Ctrl-C or when the coordinator ends the job.

use crate::launch::{run_cluster, stop_on_signals, threads_per_process, ProcessSpec};
use anyhow::{bail, Context, Result};
use eqim_common::config::load_config;
use eqim_common::coordinator_config::CoordinatorConfig;
use std::path::PathBuf;
use std::process::Command;

/// A free UDP port on loopback for the coordinator's QUIC endpoint.
/// A UDP port that was free a moment ago (the coordinator binds it next).
pub fn free_udp_port() -> Result<u16> {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").context("finding a free UDP port")?;
    Ok(socket
        .local_addr()
        .context("reading the bound port")?
        .port())
}

/// The `/metrics` port of the coordinator (`worker` None) or of local worker `i` under
/// `--metrics-base-port base`: the coordinator at `base`, worker i at `base + 1 + i`.
pub fn metrics_port(base: u16, worker: Option<u32>) -> Result<u16> {
    let offset = worker.map_or(0, |i| 1 + u64::from(i));
    u16::try_from(u64::from(base) + offset).with_context(|| {
        format!("--metrics-base-port {base} leaves no port for worker {worker:?} (above 65535)")
    })
}

/// Refuses a training config whose data or batch does not match the coordinator's schedule,
/// naming both files and both numbers.
pub fn check_train_config(
    path: &std::path::Path,
    coordinator_config: &str,
    schedule: &eqim_common::schedule::ScheduleConfig,
) -> Result<()> {
    use eqim_common::train_config::{DataConfig, GeneratorTrainConfig};
    let train: GeneratorTrainConfig = eqim_common::config::load_config(path)
        .with_context(|| format!("reading the training config {}", path.display()))?;
    let rows = match &train.data {
        DataConfig::LatentCache { path: cache, .. } => crate::data::LatentCache::open(cache)
            .with_context(|| {
                format!(
                    "opening the latent cache {} named by {}",
                    cache.display(),
                    path.display()
                )
            })?
            .len() as u64,
        DataConfig::Synthetic { samples, .. } => *samples,
    };
    if rows != schedule.dataset_len {
        bail!(
            "{coordinator_config} sets schedule.dataset_len = {} but the data of {} has {rows} rows: set schedule.dataset_len to {rows}",
            schedule.dataset_len,
            path.display()
        );
    }
    if train.optim.batch != schedule.global_batch {
        bail!(
            "{coordinator_config} sets schedule.global_batch = {} but {} sets optim.batch = {}: make them equal (the lr and its schedule follow optim.batch)",
            schedule.global_batch,
            path.display(),
            train.optim.batch
        );
    }
    let single = crate::train::setup::schedule_of(&train, rows);
    if (schedule.seed, schedule.micro_batch) != (single.seed, single.micro_batch) {
        tracing::warn!(
            "{coordinator_config} sets schedule.seed = {} and micro_batch = {}, {} sets seed = {} \
             and optim.micro_batch = {}: this job takes other samples per step than \
             `eqim train-generator` with that config (set them equal for the same run)",
            schedule.seed,
            schedule.micro_batch,
            path.display(),
            single.seed,
            single.micro_batch
        );
    }
    Ok(())
}

/// What a local cluster is run with (`eqim launch`'s flags).
#[derive(Debug, Clone)]
pub struct LaunchConfig {
    /// The coordinator config file.
    pub config: PathBuf,
    pub workers: u32,
    pub final_state_dir: Option<PathBuf>,
    pub metrics_base_port: Option<u16>,
    pub train_config: Option<PathBuf>,
    pub export_dir: Option<PathBuf>,
    /// Seconds each worker waits for the coordinator.
    pub connect_timeout: f64,
    /// Plan flags of eval workers (evaluation jobs only).
    pub eval_worker_args: Vec<std::ffi::OsString>,
}

pub fn run(cfg: &LaunchConfig) -> Result<()> {
    launch(cfg, &|_| Vec::new()).map(|_| ())
}

/// The coordinator config of a launch, checked against the launch's other inputs; true for an
/// evaluation job.
fn checked_job(args: &LaunchConfig) -> Result<(CoordinatorConfig, bool)> {
    if args.workers == 0 {
        bail!("--workers must be at least 1");
    }
    let config = args.config.display().to_string();
    let cfg: CoordinatorConfig = load_config(&args.config)
        .with_context(|| format!("loading the coordinator config {config}"))?;
    if let Some(path) = &args.train_config {
        check_train_config(path, &config, &cfg.schedule)?;
    }
    let eval_job = cfg.eval.is_some();
    match (eval_job, args.eval_worker_args.is_empty()) {
        (true, true) => bail!(
            "{config} is an evaluation job (it has an eval: section): give the eval workers' plan flags after `--` (see `eqim eval-worker --help`), or use `eqim eval`"
        ),
        (false, false) => bail!(
            "arguments after `--` are for eval workers, but {config} has no eval: section"
        ),
        _ => {}
    }
    if eval_job && args.train_config.is_some() {
        bail!("--train-config is for training jobs; {config} is an evaluation job");
    }
    Ok((cfg, eval_job))
}

fn coordinator_spec(args: &LaunchConfig, port: u16) -> Result<ProcessSpec> {
    let mut coordinator = super::coordinator_process::coordinator_command()?;
    coordinator
        .arg("--config")
        .arg(&args.config)
        .args(["--workers", &args.workers.to_string()])
        .args(["--port", &port.to_string()]);
    if let Some(base) = args.metrics_base_port {
        coordinator
            .arg("--metrics-addr")
            .arg(format!("127.0.0.1:{}", metrics_port(base, None)?));
    }
    Ok(ProcessSpec {
        name: "coordinator".into(),
        command: coordinator,
        ends_job: true,
        required: true,
        worker: false,
    })
}

/// Local worker `i`'s process: `eqim worker` (or `eval-worker`) with this launch's flags.
struct WorkerSpec<'a> {
    args: &'a LaunchConfig,
    exe: &'a std::path::Path,
    token: &'a std::path::Path,
    port: u16,
    threads: usize,
    eval_job: bool,
}

impl WorkerSpec<'_> {
    fn spec(&self, i: u32, extra: Vec<std::ffi::OsString>) -> Result<ProcessSpec> {
        let args = self.args;
        let mut worker = Command::new(self.exe);
        worker
            .arg(if self.eval_job {
                "eval-worker"
            } else {
                "worker"
            })
            .arg("--coordinator")
            .arg(format!("127.0.0.1:{}", self.port))
            .arg("--token")
            .arg(self.token)
            .arg("--worker-id")
            .arg(format!("worker-{i}"))
            .arg("--connect-timeout")
            .arg(args.connect_timeout.to_string());
        if !self.eval_job {
            // Eval workers keep their own default (1 thread: bytes independent of the count).
            worker.arg("--threads").arg(self.threads.to_string());
        }
        if let Some(base) = args.metrics_base_port {
            worker
                .arg("--metrics-addr")
                .arg(format!("127.0.0.1:{}", metrics_port(base, Some(i))?));
        }
        if let Some(path) = &args.train_config {
            worker.arg("--train-config").arg(path);
        }
        if let Some(dir) = &args.export_dir {
            worker.arg("--export-dir").arg(dir);
        }
        if let Some(dir) = &args.final_state_dir {
            worker
                .arg("--final-state")
                .arg(dir.join(format!("worker-{i}.safetensors")));
        }
        worker.args(&args.eval_worker_args).args(extra);
        Ok(ProcessSpec {
            name: format!("worker-{i}"),
            command: worker,
            ends_job: false,
            // A lost worker is the runtime's business: the others carry on.
            required: false,
            worker: true,
        })
    }
}

/// Runs the local cluster to its end; `extra_worker_args(i)` are appended to worker i's command
/// line (test hooks). Fails unless the coordinator finished the job.
pub fn launch(
    args: &LaunchConfig,
    extra_worker_args: &dyn Fn(u32) -> Vec<std::ffi::OsString>,
) -> Result<crate::launch::ClusterOutcome> {
    let (cfg, eval_job) = checked_job(args)?;
    let port = match cfg.bind.port() {
        0 => free_udp_port()?,
        p => p,
    };
    let exe = std::env::current_exe().context("locating the eqim executable")?;
    let threads = threads_per_process(args.workers as usize);
    let token = cfg.job_dir.join("token");
    let workers = WorkerSpec {
        args,
        exe: &exe,
        token: &token,
        port,
        threads,
        eval_job,
    };
    let mut specs = vec![coordinator_spec(args, port)?];
    for i in 0..args.workers {
        specs.push(workers.spec(i, extra_worker_args(i))?);
    }
    tracing::info!(
        workers = args.workers,
        threads,
        port,
        "launching a local cluster"
    );
    let stop = stop_on_signals()?;
    let outcome = run_cluster(specs, stop, crate::launch::DEFAULT_SHUTDOWN_GRACE)?;
    if outcome.interrupted {
        bail!("interrupted; every process was stopped");
    }
    match outcome.status_of("coordinator") {
        Some(s) if s.success() => Ok(outcome),
        other => bail!("the coordinator did not finish the job: {other:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::{launch, metrics_port, LaunchConfig};

    fn args(config: std::path::PathBuf, eval_worker_args: &[&str]) -> LaunchConfig {
        LaunchConfig {
            config,
            workers: 1,
            final_state_dir: None,
            metrics_base_port: None,
            train_config: None,
            export_dir: None,
            connect_timeout: 1.0,
            eval_worker_args: eval_worker_args.iter().map(|a| a.into()).collect(),
        }
    }

    #[test]
    fn eval_worker_arguments_go_with_evaluation_jobs_only() {
        let dir = tempfile::tempdir().unwrap();
        let eval = dir.path().join("eval.yaml");
        std::fs::write(
            &eval,
            "bind: 127.0.0.1:0\njob_dir: job\nexpected_workers: 1\nmin_workers: 1\nmax_workers: 1\neval:\n  num_images: 10\n",
        )
        .unwrap();
        let train = dir.path().join("train.yaml");
        std::fs::write(
            &train,
            "bind: 127.0.0.1:0\njob_dir: job\nexpected_workers: 1\nmin_workers: 1\nmax_workers: 1\n\
             schedule:\n  dataset_len: 8\n  global_batch: 4\n  micro_batch: 4\n  epochs: 1\n  seed: 0\n",
        )
        .unwrap();
        let err = launch(&args(eval, &[]), &|_| Vec::new())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("after `--`") && err.contains("eqim eval"),
            "{err}"
        );
        let err = launch(&args(train, &["--weights", "w"]), &|_| Vec::new())
            .unwrap_err()
            .to_string();
        assert!(err.contains("no eval: section"), "{err}");
    }

    #[test]
    fn metrics_ports_put_the_coordinator_at_the_base_and_workers_after_it() {
        assert_eq!(metrics_port(9400, None).unwrap(), 9400);
        assert_eq!(metrics_port(9400, Some(0)).unwrap(), 9401);
        assert_eq!(metrics_port(9400, Some(7)).unwrap(), 9408);
        let err = metrics_port(65535, Some(0)).unwrap_err().to_string();
        assert!(err.contains("--metrics-base-port 65535"), "{err}");
    }
}
