//! Builds a process's `prometheus::Registry` from the metric table in `eqim_common::metrics`, and
//! hands out typed handles for the coordinator ([`CoordinatorMetrics`]) and the workers
//! ([`WorkerMetrics`]). Every metric of the role is registered with all its label values, so each
//! series is exported (at zero) from the first scrape on. See `eqim_common::metrics` for why each
//! process serves its own `/metrics`.

use std::collections::HashMap;
use std::sync::Arc;

use crate::metrics::{self as names, MetricDesc, MetricKind, Role};
use prometheus::core::Collector;
use prometheus::{
    Counter, CounterVec, Encoder, Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, Opts,
    Registry, TextEncoder,
};

/// Errors building or encoding a metrics registry.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("the job name for metric labels is empty; set a job name in the job config")]
    EmptyJob,
    #[error("a worker's metrics need its worker id as the `worker` label, and none was given")]
    MissingWorkerId,
    #[error("metric {name} is not exported by the {role} (see eqim_common::metrics::METRICS)")]
    NotExported { name: &'static str, role: Role },
    #[error("metric {name} is registered as another type or label set than the one asked for")]
    WrongShape { name: &'static str },
    #[error("prometheus registry: {0}")]
    Prometheus(#[from] prometheus::Error),
    #[error("the text encoder produced invalid UTF-8: {0}")]
    Utf8(#[from] std::string::FromUtf8Error),
}

/// A registered metric, by shape.
#[derive(Clone)]
enum Handle {
    Counter(Counter),
    CounterVec(CounterVec),
    Gauge(Gauge),
    GaugeVec(GaugeVec),
    Histogram(Histogram),
    HistogramVec(HistogramVec),
}

/// Who this process is, for the constant labels of every series.
#[derive(Debug, Clone)]
pub struct MetricsIdentity {
    pub role: Role,
    pub job: String,
    /// The worker id; required for [`Role::Worker`], ignored for the coordinator.
    pub worker: Option<String>,
}

impl MetricsIdentity {
    pub fn coordinator(job: &str) -> Self {
        Self {
            role: Role::Coordinator,
            job: job.to_string(),
            worker: None,
        }
    }

    pub fn worker(job: &str, worker_id: &str) -> Self {
        Self {
            role: Role::Worker,
            job: job.to_string(),
            worker: Some(worker_id.to_string()),
        }
    }
}

/// All metrics of one process, registered in their own registry.
pub struct EqimMetrics {
    registry: Registry,
    identity: MetricsIdentity,
    handles: HashMap<&'static str, Handle>,
    resident_memory: Gauge,
}

impl EqimMetrics {
    /// Registers every metric of `identity.role` from the table.
    pub fn new(identity: MetricsIdentity) -> Result<Self, MetricsError> {
        if identity.job.trim().is_empty() {
            return Err(MetricsError::EmptyJob);
        }
        let mut const_labels = HashMap::from([
            (names::LABEL_ROLE.to_string(), identity.role.to_string()),
            (names::LABEL_JOB.to_string(), identity.job.clone()),
        ]);
        if identity.role == Role::Worker {
            let worker = identity
                .worker
                .as_deref()
                .filter(|w| !w.trim().is_empty())
                .ok_or(MetricsError::MissingWorkerId)?;
            const_labels.insert(names::LABEL_WORKER.to_string(), worker.to_string());
        }
        let registry = Registry::new_custom(None, Some(const_labels))?;
        let mut handles = HashMap::new();
        for desc in names::for_role(identity.role) {
            let handle = register(&registry, desc)?;
            handles.insert(desc.name, handle);
        }
        let Some(Handle::Gauge(resident_memory)) =
            handles.get(names::PROCESS_RESIDENT_MEMORY_BYTES)
        else {
            return Err(MetricsError::WrongShape {
                name: names::PROCESS_RESIDENT_MEMORY_BYTES,
            });
        };
        let metrics = Self {
            resident_memory: resident_memory.clone(),
            registry,
            identity,
            handles,
        };
        metrics
            .gauge_vec(names::BUILD_INFO)?
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1.0);
        metrics.refresh_process_metrics();
        Ok(metrics)
    }

    pub fn identity(&self) -> &MetricsIdentity {
        &self.identity
    }

    /// The registry, for callers that add their own collectors.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Reads the values that are sampled rather than pushed (process memory); called on scrape.
    pub fn refresh_process_metrics(&self) {
        if let Some(rss) = read_resident_memory_bytes() {
            self.resident_memory.set(rss as f64);
        }
    }

    /// The current values in Prometheus' text exposition format (version 0.0.4).
    pub fn encode_text(&self) -> Result<String, MetricsError> {
        self.refresh_process_metrics();
        let mut buf = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut buf)?;
        Ok(String::from_utf8(buf)?)
    }

    fn handle(&self, name: &'static str) -> Result<&Handle, MetricsError> {
        self.handles.get(name).ok_or(MetricsError::NotExported {
            name,
            role: self.identity.role,
        })
    }

    pub fn counter(&self, name: &'static str) -> Result<Counter, MetricsError> {
        match self.handle(name)? {
            Handle::Counter(c) => Ok(c.clone()),
            _ => Err(MetricsError::WrongShape { name }),
        }
    }

    pub fn counter_vec(&self, name: &'static str) -> Result<CounterVec, MetricsError> {
        match self.handle(name)? {
            Handle::CounterVec(c) => Ok(c.clone()),
            _ => Err(MetricsError::WrongShape { name }),
        }
    }

    pub fn gauge(&self, name: &'static str) -> Result<Gauge, MetricsError> {
        match self.handle(name)? {
            Handle::Gauge(g) => Ok(g.clone()),
            _ => Err(MetricsError::WrongShape { name }),
        }
    }

    pub fn gauge_vec(&self, name: &'static str) -> Result<GaugeVec, MetricsError> {
        match self.handle(name)? {
            Handle::GaugeVec(g) => Ok(g.clone()),
            _ => Err(MetricsError::WrongShape { name }),
        }
    }

    pub fn histogram(&self, name: &'static str) -> Result<Histogram, MetricsError> {
        match self.handle(name)? {
            Handle::Histogram(h) => Ok(h.clone()),
            _ => Err(MetricsError::WrongShape { name }),
        }
    }

    pub fn histogram_vec(&self, name: &'static str) -> Result<HistogramVec, MetricsError> {
        match self.handle(name)? {
            Handle::HistogramVec(h) => Ok(h.clone()),
            _ => Err(MetricsError::WrongShape { name }),
        }
    }
}

/// Registers one table row, creating every listed label value so its series exist from the start.
fn register(registry: &Registry, desc: &MetricDesc) -> Result<Handle, MetricsError> {
    let label_names: Vec<&str> = desc.labels.iter().map(|l| l.name).collect();
    let handle = match (desc.kind, label_names.is_empty()) {
        (MetricKind::Counter, true) => Handle::Counter(Counter::with_opts(opts(desc))?),
        (MetricKind::Counter, false) => {
            Handle::CounterVec(CounterVec::new(opts(desc), &label_names)?)
        }
        (MetricKind::Gauge, true) => Handle::Gauge(Gauge::with_opts(opts(desc))?),
        (MetricKind::Gauge, false) => Handle::GaugeVec(GaugeVec::new(opts(desc), &label_names)?),
        (MetricKind::Histogram, true) => {
            Handle::Histogram(Histogram::with_opts(histogram_opts(desc))?)
        }
        (MetricKind::Histogram, false) => {
            Handle::HistogramVec(HistogramVec::new(histogram_opts(desc), &label_names)?)
        }
    };
    let collector: Box<dyn Collector> = match &handle {
        Handle::Counter(c) => Box::new(c.clone()),
        Handle::CounterVec(c) => Box::new(c.clone()),
        Handle::Gauge(g) => Box::new(g.clone()),
        Handle::GaugeVec(g) => Box::new(g.clone()),
        Handle::Histogram(h) => Box::new(h.clone()),
        Handle::HistogramVec(h) => Box::new(h.clone()),
    };
    registry.register(collector)?;
    // Only single-label metrics are in the table today; a second label would need the product.
    if let [label] = desc.labels {
        for value in label.values {
            match &handle {
                Handle::CounterVec(c) => drop(c.with_label_values(&[*value])),
                Handle::GaugeVec(g) => drop(g.with_label_values(&[*value])),
                Handle::HistogramVec(h) => drop(h.with_label_values(&[*value])),
                _ => {}
            }
        }
    }
    Ok(handle)
}

fn opts(desc: &MetricDesc) -> Opts {
    Opts::new(desc.name, desc.help)
}

fn histogram_opts(desc: &MetricDesc) -> HistogramOpts {
    HistogramOpts::new(desc.name, desc.help).buckets(desc.buckets.to_vec())
}

/// The process's resident set size, from `VmRSS` in `/proc/self/status` (Linux only).
pub fn read_resident_memory_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    parse_vm_rss_bytes(&status)
}

/// Parses the `VmRSS:  1234 kB` line of a `/proc/<pid>/status` file into bytes.
pub fn parse_vm_rss_bytes(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let mut fields = line["VmRSS:".len()..].split_whitespace();
    let value: u64 = fields.next()?.parse().ok()?;
    match fields.next() {
        Some("kB") => Some(value * 1024),
        _ => None,
    }
}

/// Typed handles to the coordinator's metrics.
#[derive(Clone)]
pub struct CoordinatorMetrics {
    pub all: Arc<EqimMetrics>,
    pub membership_size: Gauge,
    pub membership_generation: Gauge,
    pub worker_joins: Counter,
    /// Label: one of `eqim_common::metrics::DEATH_REASONS`.
    pub worker_deaths: CounterVec,
    pub recoveries: Counter,
    pub recovery_duration: Histogram,
    pub committed_step: Gauge,
    pub epoch: Gauge,
    pub epoch_samples_consumed: Gauge,
    pub epoch_samples: Gauge,
    pub checkpoints: Counter,
    pub last_good_checkpoint_timestamp: Gauge,
    pub eval_images_completed: Gauge,
    pub eval_images_target: Gauge,
}

impl CoordinatorMetrics {
    pub fn new(job: &str) -> Result<Self, MetricsError> {
        let all = EqimMetrics::new(MetricsIdentity::coordinator(job))?;
        Ok(Self {
            membership_size: all.gauge(names::MEMBERSHIP_SIZE)?,
            membership_generation: all.gauge(names::MEMBERSHIP_GENERATION)?,
            worker_joins: all.counter(names::WORKER_JOINS_TOTAL)?,
            worker_deaths: all.counter_vec(names::WORKER_DEATHS_TOTAL)?,
            recoveries: all.counter(names::RECOVERIES_TOTAL)?,
            recovery_duration: all.histogram(names::RECOVERY_DURATION_SECONDS)?,
            committed_step: all.gauge(names::COMMITTED_STEP)?,
            epoch: all.gauge(names::EPOCH)?,
            epoch_samples_consumed: all.gauge(names::EPOCH_SAMPLES_CONSUMED)?,
            epoch_samples: all.gauge(names::EPOCH_SAMPLES)?,
            checkpoints: all.counter(names::CHECKPOINTS_TOTAL)?,
            last_good_checkpoint_timestamp: all
                .gauge(names::LAST_GOOD_CHECKPOINT_TIMESTAMP_SECONDS)?,
            eval_images_completed: all.gauge(names::EVAL_IMAGES_COMPLETED)?,
            eval_images_target: all.gauge(names::EVAL_IMAGES_TARGET)?,
            all: Arc::new(all),
        })
    }
}

/// Typed handles to a worker's metrics.
#[derive(Clone)]
pub struct WorkerMetrics {
    pub all: Arc<EqimMetrics>,
    pub step_duration: Histogram,
    /// Label: one of `eqim_common::metrics::STEP_PHASES`.
    pub step_phase_duration: HistogramVec,
    pub steps: Counter,
    pub committed_step_seconds: Counter,
    pub images: Counter,
    pub images_per_second: Gauge,
    pub train_step: Gauge,
    pub train_loss: Gauge,
    pub learning_rate: Gauge,
    pub grad_norm: Gauge,
    pub ema_lag_steps: Gauge,
    pub data_errors: Counter,
    pub checkpoint_duration: Histogram,
    pub checkpoint_size: Gauge,
    pub eval_images: Counter,
    pub gpu_memory_used: Gauge,
    pub gpu_memory_total: Gauge,
    pub gpu_utilization: Gauge,
}

impl WorkerMetrics {
    pub fn new(job: &str, worker_id: &str) -> Result<Self, MetricsError> {
        let all = EqimMetrics::new(MetricsIdentity::worker(job, worker_id))?;
        Ok(Self {
            step_duration: all.histogram(names::STEP_DURATION_SECONDS)?,
            step_phase_duration: all.histogram_vec(names::STEP_PHASE_DURATION_SECONDS)?,
            steps: all.counter(names::STEPS_TOTAL)?,
            committed_step_seconds: all.counter(names::COMMITTED_STEP_SECONDS_TOTAL)?,
            images: all.counter(names::IMAGES_TOTAL)?,
            images_per_second: all.gauge(names::IMAGES_PER_SECOND)?,
            train_step: all.gauge(names::TRAIN_STEP)?,
            train_loss: all.gauge(names::TRAIN_LOSS)?,
            learning_rate: all.gauge(names::LEARNING_RATE)?,
            grad_norm: all.gauge(names::GRAD_NORM)?,
            ema_lag_steps: all.gauge(names::EMA_LAG_STEPS)?,
            data_errors: all.counter(names::DATA_ERRORS_TOTAL)?,
            checkpoint_duration: all.histogram(names::CHECKPOINT_DURATION_SECONDS)?,
            checkpoint_size: all.gauge(names::CHECKPOINT_SIZE_BYTES)?,
            eval_images: all.counter(names::EVAL_IMAGES_TOTAL)?,
            gpu_memory_used: all.gauge(names::GPU_MEMORY_USED_BYTES)?,
            gpu_memory_total: all.gauge(names::GPU_MEMORY_TOTAL_BYTES)?,
            gpu_utilization: all.gauge(names::GPU_UTILIZATION_RATIO)?,
            all: Arc::new(all),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_rss_is_parsed_in_bytes() {
        let status = "Name:\teqim\nVmPeak:\t  9000 kB\nVmRSS:\t  1234 kB\nThreads:\t4\n";
        assert_eq!(parse_vm_rss_bytes(status), Some(1234 * 1024));
        assert_eq!(parse_vm_rss_bytes("Name:\teqim\n"), None);
        assert_eq!(parse_vm_rss_bytes("VmRSS:\t12 MB\n"), None);
    }

    #[test]
    fn this_process_has_a_resident_set() {
        let rss = read_resident_memory_bytes().expect("/proc/self/status has VmRSS on Linux");
        assert!(rss > 1024 * 1024, "implausible RSS {rss}");
    }

    #[test]
    fn a_worker_registry_needs_a_worker_id_and_a_job() {
        assert!(matches!(
            EqimMetrics::new(MetricsIdentity {
                role: Role::Worker,
                job: "j".into(),
                worker: None
            }),
            Err(MetricsError::MissingWorkerId)
        ));
        assert!(matches!(
            EqimMetrics::new(MetricsIdentity::coordinator(" ")),
            Err(MetricsError::EmptyJob)
        ));
    }

    #[test]
    fn each_role_registers_exactly_its_table_rows_with_constant_labels() {
        for (role, metrics) in [
            (
                Role::Coordinator,
                EqimMetrics::new(MetricsIdentity::coordinator("demo")),
            ),
            (
                Role::Worker,
                EqimMetrics::new(MetricsIdentity::worker("demo", "w3")),
            ),
        ] {
            let metrics = metrics.expect("registry builds");
            let families = metrics.registry().gather();
            let mut got: Vec<&str> = families.iter().map(|f| f.name()).collect();
            let mut want: Vec<&str> = names::for_role(role).map(|m| m.name).collect();
            got.sort_unstable();
            want.sort_unstable();
            assert_eq!(got, want, "{role}");
            for family in &families {
                for metric in family.get_metric() {
                    let labels: HashMap<&str, &str> = metric
                        .get_label()
                        .iter()
                        .map(|l| (l.name(), l.value()))
                        .collect();
                    assert_eq!(labels.get("role"), Some(&role.as_str()));
                    assert_eq!(labels.get("job"), Some(&"demo"));
                    let worker = labels.get("worker").copied();
                    assert_eq!(worker, (role == Role::Worker).then_some("w3"));
                }
            }
        }
    }

    /// The value of the sample `name` whose labels include all of `labels`, in any order.
    fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        text.lines().find_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (n, rest) = series.split_once('{')?;
            let pairs: Vec<&str> = rest.strip_suffix('}')?.split(',').collect();
            let all = labels
                .iter()
                .all(|(k, v)| pairs.contains(&format!("{k}=\"{v}\"").as_str()));
            (n == name && all).then(|| value.parse().ok())?
        })
    }

    #[test]
    fn labelled_metrics_export_every_listed_value_before_first_use() {
        let metrics = WorkerMetrics::new("demo", "w0").expect("registry builds");
        let text = metrics.all.encode_text().expect("encodes");
        for phase in names::STEP_PHASES {
            let count = sample(
                &text,
                "eqim_step_phase_duration_seconds_count",
                &[("phase", phase), ("job", "demo")],
            );
            assert_eq!(count, Some(0.0), "phase {phase} missing:\n{text}");
        }
        let coordinator = CoordinatorMetrics::new("demo").expect("registry builds");
        let text = coordinator.all.encode_text().expect("encodes");
        for reason in names::DEATH_REASONS {
            let deaths = sample(&text, names::WORKER_DEATHS_TOTAL, &[("reason", reason)]);
            assert_eq!(deaths, Some(0.0), "{reason}");
        }
    }

    #[test]
    fn typed_handles_write_the_registered_series() {
        let metrics = WorkerMetrics::new("demo", "w0").expect("registry builds");
        metrics.train_loss.set(0.25);
        metrics.steps.inc_by(3.0);
        metrics
            .step_phase_duration
            .with_label_values(&[names::PHASE_FORWARD])
            .observe(0.003);
        let text = metrics.all.encode_text().expect("encodes");
        let me = [("job", "demo"), ("role", "worker"), ("worker", "w0")];
        assert_eq!(sample(&text, names::TRAIN_LOSS, &me), Some(0.25));
        assert_eq!(sample(&text, names::STEPS_TOTAL, &me), Some(3.0));
        let bucket = |le| {
            sample(
                &text,
                "eqim_step_phase_duration_seconds_bucket",
                &[("phase", "forward"), ("worker", "w0"), ("le", le)],
            )
        };
        assert_eq!(bucket("0.002"), Some(0.0));
        assert_eq!(bucket("0.004"), Some(1.0));
        assert!(matches!(
            metrics.all.gauge(names::MEMBERSHIP_SIZE),
            Err(MetricsError::NotExported { .. })
        ));
        assert!(matches!(
            metrics.all.gauge(names::STEPS_TOTAL),
            Err(MetricsError::WrongShape { .. })
        ));
    }
}
