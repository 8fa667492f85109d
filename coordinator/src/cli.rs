//! Command-line options of the coordinator, shared by `eqim-coordinator` and `eqim coordinator`:
//! a config file, flags, or a config file with flags overriding it.

use crate::steps::ScheduleConfig;
use anyhow::{bail, Context, Result};
use eqim_common::config::{load_config, Validate};
use eqim_common::coordinator_config::{CoordinatorConfig, Timeouts, DEFAULT_PORT};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, Clone, clap::Args)]
pub struct CoordinatorArgs {
    /// Coordinator config file (YAML or TOML); flags below override its values.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Address to listen on (UDP, QUIC).
    #[arg(long, value_name = "IP")]
    pub bind: Option<IpAddr>,
    /// Port to listen on (0 picks a free one).
    #[arg(long)]
    pub port: Option<u16>,
    /// Directory of the job token and certificate (created if missing); give workers its
    /// `token` and `coordinator-cert.sha256` files.
    #[arg(long, value_name = "DIR")]
    pub job_dir: Option<PathBuf>,
    /// Workers to wait for before the first step.
    #[arg(long)]
    pub workers: Option<u32>,
    /// Never train with fewer workers (pause instead).
    #[arg(long)]
    pub min_workers: Option<u32>,
    /// Refuse workers beyond this many.
    #[arg(long)]
    pub max_workers: Option<u32>,
    #[arg(long, value_name = "MS")]
    pub heartbeat_interval_ms: Option<u64>,
    /// A worker silent this long is declared dead.
    #[arg(long, value_name = "MS")]
    pub heartbeat_timeout_ms: Option<u64>,
    /// QUIC idle timeout; defaults to the heartbeat timeout.
    #[arg(long, value_name = "MS")]
    pub quic_idle_timeout_ms: Option<u64>,
    /// Number of training samples.
    #[arg(long)]
    pub dataset_len: Option<u64>,
    /// Samples per step over all workers (kept fixed as workers come and go).
    #[arg(long)]
    pub global_batch: Option<u64>,
    /// Most samples per worker and forward pass (default: the global batch).
    #[arg(long)]
    pub micro_batch: Option<u64>,
    #[arg(long)]
    pub epochs: Option<u32>,
    #[arg(long)]
    pub seed: Option<u64>,
    /// Order a checkpoint every this many steps.
    #[arg(long)]
    pub checkpoint_every_steps: Option<u64>,
    /// Serve Prometheus `/metrics` over HTTP on this address (e.g. 127.0.0.1:9400; port 0 picks
    /// a free one).
    #[arg(long, value_name = "IP:PORT")]
    pub metrics_addr: Option<SocketAddr>,
}

fn ms(v: Option<u64>) -> Option<Duration> {
    v.map(Duration::from_millis)
}

impl CoordinatorArgs {
    /// The config file (if any) with the flags applied, validated.
    pub fn into_config(self) -> Result<CoordinatorConfig> {
        let mut cfg = match &self.config {
            Some(path) => load_config::<CoordinatorConfig>(path)?,
            None => self.config_from_flags()?,
        };
        let a = self;
        if let Some(ip) = a.bind {
            cfg.bind.set_ip(ip);
        }
        if let Some(port) = a.port {
            cfg.bind.set_port(port);
        }
        if let Some(dir) = a.job_dir {
            cfg.job_dir = dir;
        }
        if let Some(n) = a.workers {
            cfg.expected_workers = n;
            cfg.max_workers = cfg.max_workers.max(n);
        }
        if let Some(n) = a.min_workers {
            cfg.min_workers = n;
        }
        if let Some(n) = a.max_workers {
            cfg.max_workers = n;
        }
        let t = &mut cfg.timeouts;
        if let Some(d) = ms(a.heartbeat_interval_ms) {
            t.heartbeat_interval = d;
        }
        if let Some(d) = ms(a.heartbeat_timeout_ms) {
            t.heartbeat_timeout = d;
            if a.quic_idle_timeout_ms.is_none() {
                t.quic_idle_timeout = d;
            }
        }
        if let Some(d) = ms(a.quic_idle_timeout_ms) {
            t.quic_idle_timeout = d;
        }
        let s = &mut cfg.schedule;
        if let Some(n) = a.dataset_len {
            s.dataset_len = n;
        }
        if let Some(n) = a.global_batch {
            s.global_batch = n;
        }
        if let Some(n) = a.micro_batch {
            s.micro_batch = n;
        }
        if let Some(n) = a.epochs {
            s.epochs = n;
        }
        if let Some(n) = a.seed {
            s.seed = n;
        }
        if a.checkpoint_every_steps.is_some() {
            s.checkpoint_every_steps = a.checkpoint_every_steps;
        }
        if a.metrics_addr.is_some() {
            cfg.metrics_addr = a.metrics_addr;
        }
        if let Err((key, message)) = cfg.validate() {
            bail!("coordinator config: `{key}` {message}");
        }
        Ok(cfg)
    }

    fn config_from_flags(&self) -> Result<CoordinatorConfig> {
        let (Some(dataset_len), Some(global_batch)) = (self.dataset_len, self.global_batch) else {
            bail!("without --config, --dataset-len and --global-batch are required");
        };
        let workers = self.workers.unwrap_or(1);
        Ok(CoordinatorConfig {
            bind: SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), DEFAULT_PORT),
            job_dir: PathBuf::from("eqim-job"),
            metrics_addr: None,
            expected_workers: workers,
            min_workers: 1,
            max_workers: workers,
            timeouts: Timeouts::default(),
            schedule: ScheduleConfig {
                dataset_len,
                global_batch,
                micro_batch: global_batch,
                epochs: 1,
                seed: 0,
                checkpoint_every_steps: None,
            },
            eval: None,
        })
    }
}

/// Runs the coordinator on its own tokio runtime until the job ends or Ctrl-C.
pub fn run(args: CoordinatorArgs) -> Result<()> {
    let cfg = args.into_config()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    let started = std::time::Instant::now();
    let global_batch = cfg.schedule.global_batch;
    let checkpoint_root = cfg.checkpoint_root();
    let job_dir = cfg.job_dir.clone();
    let outcome = runtime.block_on(crate::run(cfg))?;
    outcome
        .record()
        .write(&job_dir)
        .context("writing the job outcome")?;
    if let Some(eval) = &outcome.eval {
        let fid = eval
            .fid
            .map_or("not computed (no eval.fid_stats)".into(), |f| {
                format!("{f:.4}")
            });
        println!(
            "evaluation: {} images in {:.1} s, fid {fid}, manifest {}",
            eval.images,
            eval.seconds,
            eval.manifest.display()
        );
        return Ok(());
    }
    for coverage in outcome.ledger.summary() {
        println!("{coverage}");
    }
    println!(
        "{}",
        job_summary(
            &outcome,
            global_batch,
            started.elapsed().as_secs_f64(),
            &checkpoint_root
        )
    );
    if !outcome.finished {
        bail!(
            "job stopped before the end of its schedule: {}",
            outcome.stop_reason
        );
    }
    Ok(())
}

/// One line for the end of a training job: steps, throughput, recoveries, the newest good
/// checkpoint.
fn job_summary(
    outcome: &crate::job::JobOutcome,
    global_batch: u64,
    seconds: f64,
    checkpoint_root: &std::path::Path,
) -> String {
    let steps = outcome.cursor.step;
    let samples = steps * global_batch;
    let checkpoint = match eqim_common::checkpoint::latest_good(checkpoint_root).0 {
        Some((dir, manifest)) => format!(
            "newest checkpoint {} ({} steps, manifest verified)",
            dir.display(),
            manifest.step
        ),
        None => format!("no checkpoint in {}", checkpoint_root.display()),
    };
    format!(
        "job summary: {}; {steps} steps, {samples} samples in {seconds:.1} s ({:.1} samples/s, start-up included); generation {}; {} recoveries ({:.2} s in all); {} aborted steps; {checkpoint}",
        outcome.stop_reason,
        samples as f64 / seconds.max(1e-9),
        outcome.generation,
        outcome.recoveries,
        outcome.recovery_seconds,
        outcome.aborted_steps,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: CoordinatorArgs,
    }

    fn parse(argv: &[&str]) -> Result<CoordinatorConfig> {
        Cli::try_parse_from(std::iter::once("x").chain(argv.iter().copied()))
            .unwrap()
            .args
            .into_config()
    }

    #[test]
    fn the_job_summary_names_steps_throughput_recoveries_and_the_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let outcome = crate::job::JobOutcome {
            finished: true,
            stop_reason: crate::job::StopReason::ScheduleComplete,
            cursor: eqim_common::proto::Cursor {
                step: 40,
                epoch: 1,
                offset: 0,
            },
            generation: eqim_common::proto::Generation(3),
            ledger: eqim_common::ledger::Ledger::new(8),
            aborted_steps: 2,
            eval: None,
            recoveries: 2,
            recovery_seconds: 1.5,
        };
        let line = job_summary(&outcome, 8, 4.0, dir.path());
        assert!(
            line.starts_with("job summary: schedule complete; 40 steps"),
            "{line}"
        );
        assert!(
            line.contains("40 steps, 320 samples in 4.0 s (80.0 samples/s"),
            "{line}"
        );
        assert!(
            line.contains("generation g3; 2 recoveries (1.50 s in all); 2 aborted steps"),
            "{line}"
        );
        assert!(line.contains("no checkpoint in"), "{line}");
    }

    #[test]
    fn flags_alone_make_a_config() {
        let cfg = parse(&[
            "--dataset-len",
            "100",
            "--global-batch",
            "8",
            "--workers",
            "3",
            "--port",
            "0",
            "--heartbeat-timeout-ms",
            "2000",
        ])
        .unwrap();
        assert_eq!(cfg.expected_workers, 3);
        assert_eq!(cfg.max_workers, 3);
        assert_eq!(cfg.bind.port(), 0);
        assert_eq!(cfg.timeouts.quic_idle_timeout, Duration::from_secs(2));
        assert_eq!(cfg.metrics_addr, None);
    }

    #[test]
    fn the_metrics_flag_overrides_the_config_file() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../configs/coordinator-demo.yaml"
        );
        let cfg = parse(&["--config", path, "--metrics-addr", "127.0.0.1:0"]).unwrap();
        assert_eq!(cfg.metrics_addr, Some("127.0.0.1:0".parse().unwrap()));
        let err = Cli::try_parse_from(["x", "--metrics-addr", "9400"]).err();
        assert!(err.is_some(), "a bare port is not an address");
    }

    #[test]
    fn missing_schedule_flags_and_bad_timeouts_are_explained() {
        let err = parse(&["--workers", "2"]).unwrap_err().to_string();
        assert!(err.contains("--dataset-len"), "{err}");
        let err = parse(&[
            "--dataset-len",
            "10",
            "--global-batch",
            "2",
            "--heartbeat-interval-ms",
            "5000",
        ])
        .unwrap_err()
        .to_string();
        assert!(err.contains("quic_idle_timeout"), "{err}");
    }
}
