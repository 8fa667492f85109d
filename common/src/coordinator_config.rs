//! The coordinator's configuration: where it listens, where the job's credentials live, how many
//! workers, every timeout, and the data schedule. Loaded from YAML/TOML (durations in seconds)
//! or built from flags.

use crate::config::{
    duration_secs, Validate, DEFAULT_DECISION_TICK_INTERVAL, DEFAULT_HANDSHAKE_TIMEOUT,
    DEFAULT_HEARTBEAT_INTERVAL, DEFAULT_HEARTBEAT_TIMEOUT, DEFAULT_JOIN_TIMEOUT,
    DEFAULT_PROBE_TIMEOUT, DEFAULT_QUIC_IDLE_TIMEOUT, DEFAULT_RENDEZVOUS_TIMEOUT,
    DEFAULT_STEP_TIMEOUT,
};
use crate::schedule::ScheduleConfig;
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Default control-plane port.
pub const DEFAULT_PORT: u16 = 29400;

/// Timeouts and periods of the control plane.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Timeouts {
    /// How often workers heartbeat; also the QUIC keep-alive period.
    #[serde(with = "duration_secs")]
    pub heartbeat_interval: Duration,
    /// A worker silent for this long is declared dead.
    #[serde(with = "duration_secs")]
    pub heartbeat_timeout: Duration,
    /// QUIC idle timeout; must lie in (heartbeat_interval, heartbeat_timeout].
    #[serde(with = "duration_secs")]
    pub quic_idle_timeout: Duration,
    #[serde(with = "duration_secs")]
    pub handshake_timeout: Duration,
    #[serde(with = "duration_secs")]
    pub join_timeout: Duration,
    #[serde(with = "duration_secs")]
    pub rendezvous_timeout: Duration,
    #[serde(with = "duration_secs")]
    pub step_timeout: Duration,
    #[serde(with = "duration_secs")]
    pub probe_timeout: Duration,
    #[serde(with = "duration_secs")]
    pub decision_tick_interval: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            heartbeat_interval: DEFAULT_HEARTBEAT_INTERVAL,
            heartbeat_timeout: DEFAULT_HEARTBEAT_TIMEOUT,
            quic_idle_timeout: DEFAULT_QUIC_IDLE_TIMEOUT,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            join_timeout: DEFAULT_JOIN_TIMEOUT,
            rendezvous_timeout: DEFAULT_RENDEZVOUS_TIMEOUT,
            step_timeout: DEFAULT_STEP_TIMEOUT,
            probe_timeout: DEFAULT_PROBE_TIMEOUT,
            decision_tick_interval: DEFAULT_DECISION_TICK_INTERVAL,
        }
    }
}

impl Timeouts {
    /// Returns the offending key and what is accepted.
    pub fn validate(&self) -> Result<(), (String, String)> {
        let t = self;
        if t.heartbeat_interval.is_zero() {
            return Err((
                "timeouts.heartbeat_interval".into(),
                "must be more than 0 seconds".into(),
            ));
        }
        // Keep-alives at the heartbeat interval keep a live connection open only if they come
        // more often than the idle timeout; and the idle timeout must not outlast the heartbeat
        // timeout, or a dead peer's connection would linger after we declared it dead.
        if !(t.heartbeat_interval < t.quic_idle_timeout
            && t.quic_idle_timeout <= t.heartbeat_timeout)
        {
            return Err((
                "timeouts.quic_idle_timeout".into(),
                format!(
                    "must satisfy heartbeat_interval ({:?}) < quic_idle_timeout ({:?}) <= heartbeat_timeout ({:?})",
                    t.heartbeat_interval, t.quic_idle_timeout, t.heartbeat_timeout
                ),
            ));
        }
        for (key, value) in [
            ("handshake_timeout", t.handshake_timeout),
            ("rendezvous_timeout", t.rendezvous_timeout),
            ("step_timeout", t.step_timeout),
            ("probe_timeout", t.probe_timeout),
            ("decision_tick_interval", t.decision_tick_interval),
        ] {
            if value.is_zero() {
                return Err((
                    format!("timeouts.{key}"),
                    "must be more than 0 seconds".into(),
                ));
            }
        }
        Ok(())
    }
}

/// Everything the coordinator needs to run a job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CoordinatorConfig {
    /// Address of the QUIC control plane (`0.0.0.0:29400`; port 0 picks a free one).
    pub bind: SocketAddr,
    /// Directory of the job's credentials: `token`, the coordinator's certificate and key, and
    /// `coordinator-cert.sha256`. Created (with a fresh token and certificate) if missing, reused
    /// on restart so workers can reconnect.
    pub job_dir: PathBuf,
    /// Serve Prometheus `/metrics` over HTTP here (e.g. `127.0.0.1:9400`; port 0 picks a free
    /// one). Left out: no `/metrics`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics_addr: Option<SocketAddr>,
    pub expected_workers: u32,
    pub min_workers: u32,
    pub max_workers: u32,
    #[serde(default)]
    pub timeouts: Timeouts,
    /// The training schedule; absent (and ignored) in an evaluation job.
    #[serde(default = "no_schedule")]
    pub schedule: ScheduleConfig,
    /// Makes this an evaluation job: lease image indices to `eqim eval-worker`s instead of
    /// training.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval: Option<EvalServing>,
}

/// An evaluation job has no training schedule; this one-sample placeholder keeps the step
/// state well-formed and is never opened.
fn no_schedule() -> ScheduleConfig {
    ScheduleConfig {
        dataset_len: 1,
        global_batch: 1,
        micro_batch: 1,
        epochs: 1,
        seed: 0,
        checkpoint_every_steps: None,
    }
}

/// How long an eval worker may hold a lease without progress before it is handed to another.
pub const DEFAULT_EVAL_LEASE_TIMEOUT: Duration = crate::eval_plan::DEFAULT_EVAL_LEASE_TIMEOUT;

/// The `eval:` section of a coordinator config: which set to sample and where the results go.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalServing {
    /// Images in the set (workers must plan the same number).
    pub num_images: u64,
    /// Most images per lease (rounded to whole batches of the workers' batch size).
    #[serde(default = "default_lease_images")]
    pub lease_images: u64,
    #[serde(with = "duration_secs", default = "default_lease_timeout")]
    pub lease_timeout: Duration,
    /// Reference statistics (npz `mu`, `sigma`): workers send Inception features and the
    /// coordinator computes the FID against these.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fid_stats: Option<PathBuf>,
    /// Where `manifest.json` goes [default: `<job_dir>/eval`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub out: Option<PathBuf>,
}

fn default_lease_images() -> u64 {
    32
}

fn default_lease_timeout() -> Duration {
    DEFAULT_EVAL_LEASE_TIMEOUT
}

impl EvalServing {
    pub fn validate(&self) -> Result<(), (String, String)> {
        if self.num_images == 0 {
            return Err(("eval.num_images".into(), "must be at least 1".into()));
        }
        if self.lease_images == 0 {
            return Err(("eval.lease_images".into(), "must be at least 1".into()));
        }
        if self.lease_timeout.is_zero() {
            return Err((
                "eval.lease_timeout".into(),
                "must be more than 0 seconds".into(),
            ));
        }
        if let Some(path) = &self.fid_stats {
            if !path.is_file() {
                return Err((
                    "eval.fid_stats".into(),
                    format!(
                        "{} is not a file: give an npz with mu and sigma (e.g. from `eqim fid-stats DIR`)",
                        path.display()
                    ),
                ));
            }
        }
        Ok(())
    }
}

impl CoordinatorConfig {
    /// Where checkpoints live: `<job_dir>/checkpoints`.
    pub fn checkpoint_root(&self) -> PathBuf {
        self.job_dir.join("checkpoints")
    }
}

impl Validate for CoordinatorConfig {
    fn validate(&self) -> Result<(), (String, String)> {
        if self.min_workers == 0 {
            return Err(("min_workers".into(), "must be at least 1".into()));
        }
        if !(self.min_workers <= self.expected_workers && self.expected_workers <= self.max_workers)
        {
            return Err((
                "expected_workers".into(),
                format!(
                    "must satisfy min_workers ({}) <= expected_workers ({}) <= max_workers ({})",
                    self.min_workers, self.expected_workers, self.max_workers
                ),
            ));
        }
        self.timeouts.validate()?;
        match &self.eval {
            Some(eval) => eval.validate(),
            None => self.schedule.validate(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::load_config;
    use std::path::Path;

    #[test]
    fn a_yaml_config_loads_with_default_timeouts() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.yaml");
        std::fs::write(
            &path,
            "bind: 127.0.0.1:0\njob_dir: job\nexpected_workers: 2\nmin_workers: 1\nmax_workers: 4\n\
             timeouts:\n  heartbeat_timeout: 2.5\n  quic_idle_timeout: 2.0\n\
             schedule:\n  dataset_len: 100\n  global_batch: 8\n  micro_batch: 4\n  epochs: 1\n  seed: 3\n",
        )
        .unwrap();
        let cfg: CoordinatorConfig = load_config(&path).unwrap();
        assert_eq!(cfg.timeouts.heartbeat_timeout, Duration::from_millis(2500));
        assert_eq!(cfg.timeouts.heartbeat_interval, DEFAULT_HEARTBEAT_INTERVAL);
        assert_eq!(cfg.max_workers, 4);
    }

    #[test]
    fn the_demo_config_loads_and_validates() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/coordinator-demo.yaml");
        let cfg: CoordinatorConfig = load_config(&path).unwrap();
        assert_eq!(
            cfg.timeouts,
            Timeouts::default(),
            "the demo spells out the defaults"
        );
        assert_eq!(cfg.schedule.checkpoint_every_steps, Some(20));
        assert_eq!(
            cfg.metrics_addr,
            Some(SocketAddr::from(([127, 0, 0, 1], 9400))),
            "the demo serves /metrics on the documented port"
        );
    }

    #[test]
    fn an_eval_config_needs_no_schedule_and_checks_its_stats_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("e.yaml");
        std::fs::write(
            &path,
            "bind: 127.0.0.1:0\njob_dir: job\nexpected_workers: 1\nmin_workers: 1\nmax_workers: 4\n\
             eval:\n  num_images: 20\n  lease_timeout: 5\n",
        )
        .unwrap();
        let cfg: CoordinatorConfig = load_config(&path).unwrap();
        let eval = cfg.eval.clone().expect("eval section");
        assert_eq!(
            (eval.num_images, eval.lease_images, eval.lease_timeout),
            (20, 32, Duration::from_secs(5))
        );
        std::fs::write(
            &path,
            "bind: 127.0.0.1:0\njob_dir: job\nexpected_workers: 1\nmin_workers: 1\nmax_workers: 4\n\
             eval:\n  num_images: 20\n  fid_stats: /nonexistent/ref.npz\n",
        )
        .unwrap();
        let err = format!("{:#}", load_config::<CoordinatorConfig>(&path).unwrap_err());
        assert!(
            err.contains("eval.fid_stats") && err.contains("eqim fid-stats"),
            "{err}"
        );
    }

    #[test]
    fn the_eval_example_config_loads_as_an_evaluation_job() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/eval-coordinator.yaml");
        let cfg: CoordinatorConfig = load_config(&path).unwrap();
        let eval = cfg.eval.expect("eval section");
        assert_eq!((eval.num_images, eval.lease_images), (3000, 128));
        assert_eq!(eval.lease_timeout, Duration::from_secs(600));
    }

    #[test]
    fn an_idle_timeout_beyond_the_heartbeat_timeout_is_refused() {
        let t = Timeouts {
            quic_idle_timeout: DEFAULT_HEARTBEAT_TIMEOUT + Duration::from_secs(1),
            ..Timeouts::default()
        };
        let (key, msg) = t.validate().unwrap_err();
        assert_eq!(key, "timeouts.quic_idle_timeout");
        assert!(msg.contains("heartbeat_interval"), "{msg}");
        let t = Timeouts {
            quic_idle_timeout: DEFAULT_HEARTBEAT_INTERVAL,
            ..Timeouts::default()
        };
        assert!(
            t.validate().is_err(),
            "idle timeout must exceed the keep-alive period"
        );
        assert!(Timeouts::default().validate().is_ok());
    }
}
