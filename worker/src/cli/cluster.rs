//! The cluster commands' flags and glue: `eqim worker`, `eqim launch`, `eqim ledger`, and
//! `eqim coordinator` (which runs the `eqim-coordinator` binary). The runtime takes the plain
//! configs these resolve to ([`AgentConfig`], [`LaunchConfig`]).

use crate::runtime::agent::{advertised_host, AgentConfig};
use crate::runtime::launch_cmd::LaunchConfig;
use anyhow::{Context, Result};
use eqim_common::proto::WorkerId;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, Clone, clap::Args)]
pub struct WorkerArgs {
    /// `HOST:PORT` of the coordinator's control plane.
    #[arg(long, value_name = "HOST:PORT")]
    pub coordinator: String,
    /// The job's token file (the coordinator writes it into its job directory).
    #[arg(long, value_name = "FILE")]
    pub token: PathBuf,
    /// SHA-256 of the coordinator's certificate (64 hex digits); by default read from
    /// `coordinator-cert.sha256` next to the token file.
    #[arg(long, value_name = "HEX")]
    pub fingerprint: Option<String>,
    /// Name of this worker, unique in the job (default `worker-PID`).
    #[arg(long)]
    pub worker_id: Option<String>,
    /// Address of this machine that other workers can reach (TCPStore and gloo); default: the
    /// address this machine's traffic to the coordinator leaves from.
    #[arg(long, value_name = "IP")]
    pub host: Option<String>,
    /// Network interface for gloo's connections (e.g. eth0); default: `GLOO_SOCKET_IFNAME`, else
    /// the interface of `--host`.
    #[arg(long, value_name = "IFNAME")]
    pub gloo_interface: Option<String>,
    /// Give up when the coordinator cannot be reached for this long at start (seconds).
    #[arg(long, default_value_t = 60.0)]
    pub connect_timeout: f64,
    /// Once this worker was in the job, give up when the coordinator stays unreachable for this
    /// long (seconds); default: never (keep retrying with capped backoff: a coordinator may be
    /// restarted, a partition may heal).
    #[arg(long, value_name = "SECONDS")]
    pub give_up_after: Option<f64>,
    /// Bound on every collective and store wait (seconds): a hung peer is detected after it.
    #[arg(long, default_value_t = 10.0)]
    pub collective_timeout: f64,
    /// The job's checkpoint directory, shared with the coordinator (default: `checkpoints`
    /// next to the token file, i.e. in the coordinator's job directory).
    #[arg(long, value_name = "DIR")]
    pub checkpoint_dir: Option<PathBuf>,
    /// Write the final training state (safetensors) here when the job ends.
    #[arg(long, value_name = "FILE")]
    pub final_state: Option<PathBuf>,
    /// Serve this worker's Prometheus `/metrics` here (e.g. `127.0.0.1:9101`).
    #[arg(long, value_name = "HOST:PORT")]
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// Intra-op threads for libtorch (default: libtorch's choice).
    #[arg(long)]
    pub threads: Option<i32>,
    /// Seed of the initial weights (identical on every worker).
    #[arg(long, default_value_t = 0)]
    pub seed: i64,
    /// Learning rate of the synthetic model's SGD.
    #[arg(long, default_value_t = 0.05)]
    pub lr: f64,
    /// Train the generator described by this training config (`eqim train-generator`'s TOML,
    /// e.g. configs/demo-generator.toml) instead of the synthetic model.
    #[arg(long, value_name = "FILE")]
    pub train_config: Option<PathBuf>,
    /// Device of the generator, overriding the training config's `device` (cpu, cuda:N, auto).
    #[arg(long)]
    pub device: Option<String>,
    /// Where rank 0 writes the trained generator at the end of the job (EMA and live weights
    /// plus generator.json); default: `generator` next to the token file (the job directory).
    #[arg(long, value_name = "DIR")]
    pub export_dir: Option<PathBuf>,
    /// Append a JSON line per committed step (this rank's mean loss and sample count, lr, grad
    /// norm) to this file, as `eqim train-generator` writes train_log.jsonl.
    #[arg(long, value_name = "FILE")]
    pub step_log: Option<PathBuf>,
}

fn secs(flag: &str, value: f64) -> Result<Duration> {
    Duration::try_from_secs_f64(value)
        .ok()
        .filter(|d| !d.is_zero())
        .with_context(|| format!("--{flag} must be a positive number of seconds, got {value}"))
}

impl WorkerArgs {
    /// The resolved config of these flags.
    pub fn into_config(self) -> Result<AgentConfig> {
        let host = match self.host {
            Some(host) => host,
            None => advertised_host(&self.coordinator)?,
        };
        Ok(AgentConfig {
            host,
            gloo_interface: self
                .gloo_interface
                .or_else(|| std::env::var("GLOO_SOCKET_IFNAME").ok())
                .filter(|name| !name.is_empty()),
            connect_timeout: secs("connect-timeout", self.connect_timeout)?,
            give_up_after: self
                .give_up_after
                .map(|s| secs("give-up-after", s))
                .transpose()?,
            collective_timeout: secs("collective-timeout", self.collective_timeout)?,
            worker_id: WorkerId(
                self.worker_id
                    .unwrap_or_else(|| format!("worker-{}", std::process::id())),
            ),
            coordinator: self.coordinator,
            token: self.token,
            fingerprint: self.fingerprint,
            checkpoint_dir: self.checkpoint_dir,
            final_state: self.final_state,
            metrics_addr: self.metrics_addr,
            threads: self.threads,
            seed: self.seed,
            lr: self.lr,
            train_config: self.train_config,
            device: self.device,
            export_dir: self.export_dir,
            step_log: self.step_log,
        })
    }
}

#[derive(Debug, Clone, clap::Args)]
pub struct LaunchArgs {
    /// Coordinator config (YAML or TOML), e.g. configs/coordinator-demo.yaml.
    #[arg(long, value_name = "FILE")]
    pub config: PathBuf,
    /// Number of local worker processes.
    #[arg(long, default_value_t = 2)]
    pub workers: u32,
    /// Directory for each worker's final state (`worker-I.safetensors`).
    #[arg(long, value_name = "DIR")]
    pub final_state_dir: Option<PathBuf>,
    /// Serve Prometheus `/metrics` on 127.0.0.1: the coordinator at this port, worker i at
    /// this port + 1 + i (9400 matches configs/prometheus.yml).
    #[arg(long, value_name = "PORT")]
    pub metrics_base_port: Option<u16>,
    /// Train the generator of this training config (e.g. configs/demo-generator.toml) instead
    /// of the synthetic model; its data must have `schedule.dataset_len` rows and its
    /// `optim.batch` must equal `schedule.global_batch`.
    #[arg(long, value_name = "FILE")]
    pub train_config: Option<PathBuf>,
    /// Where the trained generator is written at the end (default: JOB_DIR/generator).
    #[arg(long, value_name = "DIR")]
    pub export_dir: Option<PathBuf>,
    /// Extra seconds each worker waits for the coordinator.
    #[arg(long, default_value_t = 60.0)]
    pub connect_timeout: f64,
    /// With a coordinator config that has an `eval:` section, the workers are `eqim eval-worker`s
    /// and these arguments (after `--`) are their plan flags, e.g.
    /// `-- --weights G.safetensors --config generator.json --tokenizer-checkpoint T.safetensors
    /// --num-images 3000 --cfg 7.0 --out DIR`.
    #[arg(last = true, value_name = "EVAL_WORKER_ARGS")]
    pub eval_worker_args: Vec<std::ffi::OsString>,
}

impl From<LaunchArgs> for LaunchConfig {
    fn from(a: LaunchArgs) -> Self {
        LaunchConfig {
            config: a.config,
            workers: a.workers,
            final_state_dir: a.final_state_dir,
            metrics_base_port: a.metrics_base_port,
            train_config: a.train_config,
            export_dir: a.export_dir,
            connect_timeout: a.connect_timeout,
            eval_worker_args: a.eval_worker_args,
        }
    }
}

#[derive(Debug, Clone, clap::Args)]
pub struct LedgerArgs {
    /// A job's checkpoint root (`<job_dir>/checkpoints`) or one checkpoint directory in it.
    pub checkpoint_dir: PathBuf,
}

/// `eqim ledger`: prints the report.
pub fn ledger(args: LedgerArgs) -> Result<()> {
    for line in crate::runtime::ledger_cmd::report(&args.checkpoint_dir)? {
        println!("{line}");
    }
    Ok(())
}
