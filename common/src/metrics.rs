//! Prometheus metric names, shared by the coordinator, the workers and the dashboards' tests.
//! Conventions (prometheus.io/docs/practices/naming): prefix `eqim_`, base units (seconds,
//! bytes, ratios), counters end in `_total`, durations are `_seconds` histograms.
//!
//! [`METRICS`] is the one table of every metric eqim exports: name, type, help text, variable
//! labels (with their complete, bounded value sets) and the roles that export it. The coordinator
//! builds its `prometheus::Registry` from this table, and the dashboard tests check every PromQL
//! expression against it, so a metric cannot be renamed in code without a test failing.
//!
//! # Where metrics are served: every process serves its own `/metrics`
//!
//! The coordinator serves `/metrics` over HTTP, and so does **each worker, on its own port**.
//! We chose that over workers reporting summaries to the coordinator over QUIC because:
//! - it is the ordinary Prometheus model (one target per process), so histograms keep their full
//!   buckets, `rate()` and `histogram_quantile()` work unchanged, and nothing is re-aggregated;
//! - a worker's metrics stay visible while the coordinator or the control plane is the thing that
//!   is broken, which is exactly when someone opens the dashboard;
//! - it adds nothing to the wire protocol and nothing to the coordinator's hot path;
//! - on a local cluster the ports are `base + local index` (see `configs/prometheus.yml`); on a
//!   real cluster each worker is a pod or host that Prometheus discovers (Kubernetes pod
//!   discovery or `file_sd_configs`), with the same port everywhere.
//!
//! The cost is that Prometheus must find the workers; elastic membership means targets come and
//! go, which service discovery already handles (a dead worker is simply a target that is down).
//!
//! # Labels
//! Every series carries the constant labels [`LABEL_ROLE`] (`coordinator` or `worker`) and
//! [`LABEL_JOB`] (the eqim job name); worker series also carry [`LABEL_WORKER`] (the worker id).
//! Because Prometheus attaches its own `job` label (the scrape job's name), scrape configs set
//! `honor_labels: true` so the eqim job name wins; without it the eqim name lands in
//! `exported_job` and the dashboards still work, grouping by scrape job instead.
//! Variable labels (`phase`, `reason`, `version`) take only the values listed in the table, and
//! every listed value is created at registration, so each series exists (at zero) from the start.

use std::fmt;
use std::time::Duration;

/// Prefix of every eqim metric name.
pub const NAMESPACE: &str = "eqim";

/// The `job` label of every series when nothing else names the job.
pub const DEFAULT_JOB_LABEL: &str = "eqim";

/// Port of the coordinator's `/metrics` endpoint.
pub const DEFAULT_COORDINATOR_METRICS_PORT: u16 = 9400;
/// Worker `i` on a host serves `/metrics` on this port + `i` (`configs/prometheus.yml` lists them).
pub const DEFAULT_WORKER_METRICS_BASE_PORT: u16 = 9401;
/// How long a `/metrics` client may take to send its request before the connection is dropped.
pub const DEFAULT_METRICS_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Constant label: which kind of process exported the series (`coordinator` or `worker`).
pub const LABEL_ROLE: &str = "role";
/// Constant label: the eqim job name (from the job config).
pub const LABEL_JOB: &str = "job";
/// Constant label on worker series: the worker id.
pub const LABEL_WORKER: &str = "worker";
/// Variable label of [`STEP_PHASE_DURATION_SECONDS`].
pub const LABEL_PHASE: &str = "phase";
/// Variable label of [`WORKER_DEATHS_TOTAL`].
pub const LABEL_REASON: &str = "reason";
/// Variable label of [`BUILD_INFO`]: the crate version (one value per binary).
pub const LABEL_VERSION: &str = "version";

/// Values of [`LABEL_PHASE`]: the parts of one training step, in order.
pub const PHASE_DATA_WAIT: &str = "data_wait";
pub const PHASE_FORWARD: &str = "forward";
pub const PHASE_BACKWARD: &str = "backward";
pub const PHASE_ALLREDUCE: &str = "allreduce";
pub const PHASE_OPTIMIZER: &str = "optimizer";
pub const STEP_PHASES: &[&str] = &[
    PHASE_DATA_WAIT,
    PHASE_FORWARD,
    PHASE_BACKWARD,
    PHASE_ALLREDUCE,
    PHASE_OPTIMIZER,
];

/// Values of [`LABEL_REASON`]: why the coordinator removed a worker from the membership.
/// Silent for longer than the heartbeat timeout.
pub const DEATH_HEARTBEAT_TIMEOUT: &str = "heartbeat_timeout";
/// Its connection ended (or a new connection under the same worker id replaced it).
pub const DEATH_DISCONNECTED: &str = "disconnected";
/// A step failed or timed out and it did not answer the liveness probe that followed.
pub const DEATH_STEP_FAILED: &str = "step_failed";
/// It did not report its process group ready within the rendezvous timeout.
pub const DEATH_RENDEZVOUS_TIMEOUT: &str = "rendezvous_timeout";
/// It said it was leaving (a clean shutdown of the worker, e.g. SIGTERM).
pub const DEATH_LEFT: &str = "left";
pub const DEATH_REASONS: &[&str] = &[
    DEATH_HEARTBEAT_TIMEOUT,
    DEATH_DISCONNECTED,
    DEATH_STEP_FAILED,
    DEATH_RENDEZVOUS_TIMEOUT,
    DEATH_LEFT,
];

// ---- Both roles -------------------------------------------------------------------------------
pub const BUILD_INFO: &str = "eqim_build_info";
pub const PROCESS_RESIDENT_MEMORY_BYTES: &str = "eqim_process_resident_memory_bytes";

// ---- Worker: training steps -------------------------------------------------------------------
pub const STEP_DURATION_SECONDS: &str = "eqim_step_duration_seconds";
pub const STEP_PHASE_DURATION_SECONDS: &str = "eqim_step_phase_duration_seconds";
pub const STEPS_TOTAL: &str = "eqim_steps_total";
pub const COMMITTED_STEP_SECONDS_TOTAL: &str = "eqim_committed_step_seconds_total";
pub const IMAGES_TOTAL: &str = "eqim_images_total";
pub const IMAGES_PER_SECOND: &str = "eqim_images_per_second";
pub const TRAIN_STEP: &str = "eqim_train_step";
pub const TRAIN_LOSS: &str = "eqim_train_loss";
pub const LEARNING_RATE: &str = "eqim_learning_rate";
pub const GRAD_NORM: &str = "eqim_grad_norm";
pub const EMA_LAG_STEPS: &str = "eqim_ema_lag_steps";
pub const DATA_ERRORS_TOTAL: &str = "eqim_data_errors_total";
/// The data loader's count of unreadable image files it skipped is exported as [`DATA_ERRORS_TOTAL`].
pub const DATA_UNREADABLE_FILES_TOTAL: &str = DATA_ERRORS_TOTAL;

// ---- Worker: checkpoints, evaluation, device ---------------------------------------------------
pub const CHECKPOINT_DURATION_SECONDS: &str = "eqim_checkpoint_duration_seconds";
pub const CHECKPOINT_SIZE_BYTES: &str = "eqim_checkpoint_size_bytes";
pub const EVAL_IMAGES_TOTAL: &str = "eqim_eval_images_total";
pub const GPU_MEMORY_USED_BYTES: &str = "eqim_gpu_memory_used_bytes";
pub const GPU_MEMORY_TOTAL_BYTES: &str = "eqim_gpu_memory_total_bytes";
pub const GPU_UTILIZATION_RATIO: &str = "eqim_gpu_utilization_ratio";

// ---- Coordinator: membership and recovery ------------------------------------------------------
pub const MEMBERSHIP_SIZE: &str = "eqim_membership_size";
pub const MEMBERSHIP_GENERATION: &str = "eqim_membership_generation";
pub const WORKER_JOINS_TOTAL: &str = "eqim_worker_joins_total";
pub const WORKER_DEATHS_TOTAL: &str = "eqim_worker_deaths_total";
pub const RECOVERIES_TOTAL: &str = "eqim_recoveries_total";
pub const RECOVERY_DURATION_SECONDS: &str = "eqim_recovery_duration_seconds";

// ---- Coordinator: progress, data, checkpoints, evaluation --------------------------------------
pub const COMMITTED_STEP: &str = "eqim_committed_step";
pub const EPOCH: &str = "eqim_epoch";
pub const EPOCH_SAMPLES_CONSUMED: &str = "eqim_epoch_samples_consumed";
pub const EPOCH_SAMPLES: &str = "eqim_epoch_samples";
pub const CHECKPOINTS_TOTAL: &str = "eqim_checkpoints_total";
pub const LAST_GOOD_CHECKPOINT_TIMESTAMP_SECONDS: &str =
    "eqim_last_good_checkpoint_timestamp_seconds";
pub const EVAL_IMAGES_COMPLETED: &str = "eqim_eval_images_completed";
pub const EVAL_IMAGES_TARGET: &str = "eqim_eval_images_target";

/// Prometheus metric type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricKind {
    Counter,
    Gauge,
    Histogram,
}

impl MetricKind {
    /// The type name used in the text exposition format's `# TYPE` line.
    pub fn as_str(self) -> &'static str {
        match self {
            MetricKind::Counter => "counter",
            MetricKind::Gauge => "gauge",
            MetricKind::Histogram => "histogram",
        }
    }
}

/// Which process exports a metric; also the value of the [`LABEL_ROLE`] label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    Coordinator,
    Worker,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Coordinator => "coordinator",
            Role::Worker => "worker",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A variable label and every value it may take. An empty `values` means the value is fixed by
/// the process at start (only [`LABEL_VERSION`]), so it is still bounded.
#[derive(Debug, Clone, Copy)]
pub struct LabelDesc {
    pub name: &'static str,
    pub values: &'static [&'static str],
}

/// One row of the metric table.
#[derive(Debug, Clone, Copy)]
pub struct MetricDesc {
    pub name: &'static str,
    pub kind: MetricKind,
    pub help: &'static str,
    /// Variable labels, beyond the constant `role`, `job` and `worker`.
    pub labels: &'static [LabelDesc],
    pub roles: &'static [Role],
    /// Upper bounds of the histogram buckets (empty for counters and gauges).
    pub buckets: &'static [f64],
}

impl MetricDesc {
    /// Whether `role` exports this metric.
    pub fn exported_by(&self, role: Role) -> bool {
        self.roles.contains(&role)
    }

    /// The names of the series Prometheus stores for this metric: the name itself, or for a
    /// histogram its `_bucket`, `_sum` and `_count` series.
    pub fn series_names(&self) -> Vec<String> {
        match self.kind {
            MetricKind::Histogram => HISTOGRAM_SUFFIXES
                .iter()
                .map(|s| format!("{}{s}", self.name))
                .collect(),
            _ => vec![self.name.to_string()],
        }
    }
}

/// Suffixes of the series a histogram is stored as.
pub const HISTOGRAM_SUFFIXES: &[&str] = &["_bucket", "_sum", "_count"];

const BOTH: &[Role] = &[Role::Coordinator, Role::Worker];
const WORKER: &[Role] = &[Role::Worker];
const COORDINATOR: &[Role] = &[Role::Coordinator];
const NO_LABELS: &[LabelDesc] = &[];
const NO_BUCKETS: &[f64] = &[];

/// A whole step: 10 ms to ~82 s, doubling.
const STEP_BUCKETS: &[f64] = &[
    0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92,
];
/// One part of a step: 1 ms to ~66 s, doubling.
const PHASE_BUCKETS: &[f64] = &[
    0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.256, 0.512, 1.024, 2.048, 4.096,
    8.192, 16.384, 32.768, 65.536,
];
/// Recovery from a membership change: 0.5 s to ~17 min.
const RECOVERY_BUCKETS: &[f64] = &[
    0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0,
];
/// Writing a checkpoint: 0.1 s to ~7 min.
const CHECKPOINT_BUCKETS: &[f64] = &[
    0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 6.4, 12.8, 25.6, 51.2, 102.4, 204.8, 409.6,
];

const fn counter(name: &'static str, help: &'static str, roles: &'static [Role]) -> MetricDesc {
    MetricDesc {
        name,
        kind: MetricKind::Counter,
        help,
        labels: NO_LABELS,
        roles,
        buckets: NO_BUCKETS,
    }
}

const fn gauge(name: &'static str, help: &'static str, roles: &'static [Role]) -> MetricDesc {
    MetricDesc {
        name,
        kind: MetricKind::Gauge,
        help,
        labels: NO_LABELS,
        roles,
        buckets: NO_BUCKETS,
    }
}

const fn histogram(
    name: &'static str,
    help: &'static str,
    roles: &'static [Role],
    buckets: &'static [f64],
) -> MetricDesc {
    MetricDesc {
        name,
        kind: MetricKind::Histogram,
        help,
        labels: NO_LABELS,
        roles,
        buckets,
    }
}

const fn with_labels(desc: MetricDesc, labels: &'static [LabelDesc]) -> MetricDesc {
    MetricDesc { labels, ..desc }
}

/// Every metric eqim exports.
pub const METRICS: &[MetricDesc] = &[
    with_labels(
        gauge(
            BUILD_INFO,
            "Always 1; the version label says which eqim build is running.",
            BOTH,
        ),
        &[LabelDesc {
            name: LABEL_VERSION,
            values: &[],
        }],
    ),
    gauge(
        PROCESS_RESIDENT_MEMORY_BYTES,
        "Resident set size of this process (VmRSS from /proc/self/status), read on each scrape.",
        BOTH,
    ),
    // Worker: training steps.
    histogram(
        STEP_DURATION_SECONDS,
        "Wall time of one committed training step on this worker: data, forward, backward and all-reduce, plus the optimizer update applied at the commit.",
        WORKER,
        STEP_BUCKETS,
    ),
    with_labels(
        histogram(
            STEP_PHASE_DURATION_SECONDS,
            "Wall time of one part of a training step (data wait, forward, backward, all-reduce, optimizer).",
            WORKER,
            PHASE_BUCKETS,
        ),
        &[LabelDesc {
            name: LABEL_PHASE,
            values: STEP_PHASES,
        }],
    ),
    counter(
        STEPS_TOTAL,
        "Training steps this worker ran, whether or not the coordinator committed them.",
        WORKER,
    ),
    counter(
        COMMITTED_STEP_SECONDS_TOTAL,
        "Seconds this worker spent in steps the coordinator committed; its rate is the goodput (useful fraction of wall time).",
        WORKER,
    ),
    counter(
        IMAGES_TOTAL,
        "Training images this worker pushed through forward and backward.",
        WORKER,
    ),
    gauge(
        IMAGES_PER_SECOND,
        "Training throughput of this worker over its recent steps, in images per second.",
        WORKER,
    ),
    gauge(
        TRAIN_STEP,
        "Global step of this worker's model (the number of optimizer updates it holds).",
        WORKER,
    ),
    gauge(
        TRAIN_LOSS,
        "Training loss of this worker's last step (its local batch, before averaging).",
        WORKER,
    ),
    gauge(
        LEARNING_RATE,
        "Learning rate used by the last optimizer update.",
        WORKER,
    ),
    gauge(
        GRAD_NORM,
        "Global L2 norm of the averaged gradients at the last step, before clipping.",
        WORKER,
    ),
    gauge(
        EMA_LAG_STEPS,
        "Steps the EMA weights trail the live weights (0 when the EMA is updated every step).",
        WORKER,
    ),
    counter(
        DATA_ERRORS_TOTAL,
        "Training samples skipped because they could not be read or decoded.",
        WORKER,
    ),
    // Worker: checkpoints, evaluation, device.
    histogram(
        CHECKPOINT_DURATION_SECONDS,
        "Wall time to write one checkpoint (serialize, fsync, rename), on the writer worker.",
        WORKER,
        CHECKPOINT_BUCKETS,
    ),
    gauge(
        CHECKPOINT_SIZE_BYTES,
        "Size on disk of the last checkpoint this worker wrote.",
        WORKER,
    ),
    counter(
        EVAL_IMAGES_TOTAL,
        "Images this worker generated for evaluation.",
        WORKER,
    ),
    gauge(
        GPU_MEMORY_USED_BYTES,
        "Device memory in use on this worker's GPU (0 on a CPU-only worker).",
        WORKER,
    ),
    gauge(
        GPU_MEMORY_TOTAL_BYTES,
        "Device memory of this worker's GPU (0 on a CPU-only worker).",
        WORKER,
    ),
    gauge(
        GPU_UTILIZATION_RATIO,
        "Fraction of the last sample period in which this worker's GPU ran a kernel, 0 to 1.",
        WORKER,
    ),
    // Coordinator: membership and recovery.
    gauge(
        MEMBERSHIP_SIZE,
        "Workers in the current membership generation.",
        COORDINATOR,
    ),
    gauge(
        MEMBERSHIP_GENERATION,
        "Current membership generation; it goes up by one on every membership change.",
        COORDINATOR,
    ),
    counter(
        WORKER_JOINS_TOTAL,
        "Workers admitted into the membership.",
        COORDINATOR,
    ),
    with_labels(
        counter(
            WORKER_DEATHS_TOTAL,
            "Workers removed from the membership, by reason.",
            COORDINATOR,
        ),
        &[LabelDesc {
            name: LABEL_REASON,
            values: DEATH_REASONS,
        }],
    ),
    counter(
        RECOVERIES_TOTAL,
        "Recoveries completed: a step committed again after a failure (an aborted step or a lost worker).",
        COORDINATOR,
    ),
    histogram(
        RECOVERY_DURATION_SECONDS,
        "Time from a failure (an aborted step or a lost worker) to the next committed step.",
        COORDINATOR,
        RECOVERY_BUCKETS,
    ),
    // Coordinator: progress, data, checkpoints, evaluation.
    gauge(
        COMMITTED_STEP,
        "Steps the coordinator has committed (the index of the next step); a worker's eqim_train_step reaches it once it applies the last one.",
        COORDINATOR,
    ),
    gauge(EPOCH, "Current data epoch (0-based).", COORDINATOR),
    gauge(
        EPOCH_SAMPLES_CONSUMED,
        "Samples of the current epoch handed out to workers and committed.",
        COORDINATOR,
    ),
    gauge(
        EPOCH_SAMPLES,
        "Samples in one epoch of the training data set.",
        COORDINATOR,
    ),
    counter(
        CHECKPOINTS_TOTAL,
        "Checkpoints committed (written, verified and recorded in the manifest).",
        COORDINATOR,
    ),
    gauge(
        LAST_GOOD_CHECKPOINT_TIMESTAMP_SECONDS,
        "Unix time of the last committed checkpoint (0 before the first); age = time() - this.",
        COORDINATOR,
    ),
    gauge(
        EVAL_IMAGES_COMPLETED,
        "Evaluation images generated and accepted so far in the current evaluation.",
        COORDINATOR,
    ),
    gauge(
        EVAL_IMAGES_TARGET,
        "Evaluation images the current evaluation needs (0 when none is running).",
        COORDINATOR,
    ),
];

/// The table row of metric `name`.
pub fn describe(name: &str) -> Option<&'static MetricDesc> {
    METRICS.iter().find(|m| m.name == name)
}

/// The metrics that `role` exports.
pub fn for_role(role: Role) -> impl Iterator<Item = &'static MetricDesc> {
    METRICS.iter().filter(move |m| m.exported_by(role))
}

/// The table row of a series name as it appears in PromQL or in the exposition format: a
/// metric name, or a histogram's `_bucket`/`_sum`/`_count` series.
pub fn resolve_series(series: &str) -> Option<&'static MetricDesc> {
    if let Some(desc) = describe(series) {
        if desc.kind != MetricKind::Histogram {
            return Some(desc);
        }
    }
    HISTOGRAM_SUFFIXES.iter().find_map(|suffix| {
        let base = series.strip_suffix(suffix)?;
        describe(base).filter(|d| d.kind == MetricKind::Histogram)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn is_snake_identifier(s: &str) -> bool {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
            && !s.starts_with(|c: char| c.is_ascii_digit())
    }

    #[test]
    fn every_name_follows_prometheus_conventions() {
        for m in METRICS {
            assert!(is_snake_identifier(m.name), "{} is not snake_case", m.name);
            assert!(
                m.name.starts_with(&format!("{NAMESPACE}_")),
                "{} lacks the eqim_ prefix",
                m.name
            );
            match m.kind {
                MetricKind::Counter => {
                    assert!(
                        m.name.ends_with("_total"),
                        "counter {} needs _total",
                        m.name
                    )
                }
                MetricKind::Gauge => {
                    assert!(
                        !m.name.ends_with("_total"),
                        "gauge {} ends in _total",
                        m.name
                    )
                }
                MetricKind::Histogram => assert!(
                    m.name.ends_with("_seconds") || m.name.ends_with("_bytes"),
                    "histogram {} is not in a base unit",
                    m.name
                ),
            }
            for unit in ["_ms", "_milliseconds", "_kb", "_mb", "_gb", "_percent"] {
                assert!(!m.name.contains(unit), "{} is not in base units", m.name);
            }
            assert!(!m.help.is_empty(), "{} has no help text", m.name);
            assert!(!m.roles.is_empty(), "{} has no role", m.name);
        }
    }

    #[test]
    fn names_are_unique_and_no_name_shadows_a_histogram_series() {
        for (i, a) in METRICS.iter().enumerate() {
            for b in &METRICS[i + 1..] {
                assert_ne!(a.name, b.name, "duplicate metric");
            }
            if a.kind == MetricKind::Histogram {
                for series in a.series_names() {
                    assert!(
                        describe(&series).is_none(),
                        "{series} is both a metric and a series of histogram {}",
                        a.name
                    );
                }
            }
        }
    }

    #[test]
    fn histogram_buckets_are_increasing_and_only_histograms_have_them() {
        for m in METRICS {
            if m.kind == MetricKind::Histogram {
                assert!(m.buckets.len() >= 5, "{} has too few buckets", m.name);
                assert!(
                    m.buckets.windows(2).all(|w| w[0] < w[1]) && m.buckets[0] > 0.0,
                    "{} buckets must be positive and increasing",
                    m.name
                );
            } else {
                assert!(m.buckets.is_empty(), "{} is not a histogram", m.name);
            }
        }
    }

    #[test]
    fn variable_labels_are_bounded_and_do_not_clash_with_constant_ones() {
        for m in METRICS {
            // The coordinator's registry pre-creates the value set of one label, not products.
            assert!(
                m.labels.len() <= 1,
                "{} has several variable labels",
                m.name
            );
            for label in m.labels {
                assert!(is_snake_identifier(label.name));
                assert!(
                    ![LABEL_ROLE, LABEL_JOB, LABEL_WORKER, "le", "instance"].contains(&label.name),
                    "{} redefines the reserved label {}",
                    m.name,
                    label.name
                );
                assert!(
                    !label.values.is_empty() || label.name == LABEL_VERSION,
                    "{}'s label {} lists no values, so it is not bounded",
                    m.name,
                    label.name
                );
                assert!(label.values.len() <= 16, "{} label too wide", m.name);
            }
        }
    }

    #[test]
    fn resolve_series_maps_histogram_suffixes_only_for_histograms() {
        assert_eq!(
            resolve_series("eqim_step_duration_seconds_bucket").map(|m| m.name),
            Some(STEP_DURATION_SECONDS)
        );
        assert_eq!(
            resolve_series("eqim_step_duration_seconds_count").map(|m| m.name),
            Some(STEP_DURATION_SECONDS)
        );
        assert_eq!(resolve_series(TRAIN_LOSS).map(|m| m.name), Some(TRAIN_LOSS));
        // A histogram is only stored as its three series, never under its bare name.
        assert!(resolve_series(STEP_DURATION_SECONDS).is_none());
        assert!(resolve_series("eqim_train_loss_sum").is_none());
        assert!(resolve_series("eqim_no_such_metric").is_none());
    }

    #[test]
    fn each_role_exports_the_metrics_its_dashboards_need() {
        let worker: Vec<_> = for_role(Role::Worker).map(|m| m.name).collect();
        let coordinator: Vec<_> = for_role(Role::Coordinator).map(|m| m.name).collect();
        assert!(worker.contains(&STEP_DURATION_SECONDS));
        assert!(!worker.contains(&MEMBERSHIP_SIZE));
        assert!(coordinator.contains(&MEMBERSHIP_GENERATION));
        assert!(coordinator.contains(&PROCESS_RESIDENT_MEMORY_BYTES));
        assert!(worker.contains(&PROCESS_RESIDENT_MEMORY_BYTES));
    }
}
