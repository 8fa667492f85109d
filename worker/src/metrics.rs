//! A worker's Prometheus metrics: its own `/metrics` endpoint (see `eqim_common::metrics` for why
//! every worker serves one), a step timer that splits a step into its phases, a recorder that
//! writes a finished step into the metrics, and a GPU sampler (memory, utilisation) via
//! `nvidia-smi`. Nothing here runs tch operations (only its `Device` type), so it is safe inside
//! async tasks.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use eqim_common::metrics as names;
pub use eqim_common::metrics_http::MetricsServer;
pub use eqim_common::metrics_registry::WorkerMetrics;

/// How often the GPU sampler runs `nvidia-smi` (it takes ~20-50 ms, so not on every scrape).
pub const DEFAULT_GPU_SAMPLE_INTERVAL: Duration = Duration::from_secs(5);
/// Weight of the newest step in the smoothed images/s (about the last 10 steps).
const THROUGHPUT_SMOOTHING: f64 = 0.1;

/// The parts of a training step, in the order they happen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepPhase {
    DataWait,
    Forward,
    Backward,
    AllReduce,
    Optimizer,
}

impl StepPhase {
    pub const ALL: [StepPhase; 5] = [
        StepPhase::DataWait,
        StepPhase::Forward,
        StepPhase::Backward,
        StepPhase::AllReduce,
        StepPhase::Optimizer,
    ];

    /// The `phase` label value.
    pub fn label(self) -> &'static str {
        match self {
            StepPhase::DataWait => names::PHASE_DATA_WAIT,
            StepPhase::Forward => names::PHASE_FORWARD,
            StepPhase::Backward => names::PHASE_BACKWARD,
            StepPhase::AllReduce => names::PHASE_ALLREDUCE,
            StepPhase::Optimizer => names::PHASE_OPTIMIZER,
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Times one step: call [`StepTimer::end_phase`] as each phase ends, then [`StepTimer::finish`].
#[derive(Debug)]
pub struct StepTimer {
    started: Instant,
    last_mark: Instant,
    phases: [Duration; 5],
}

impl StepTimer {
    pub fn start() -> Self {
        Self::start_at(Instant::now())
    }

    pub fn start_at(now: Instant) -> Self {
        Self {
            started: now,
            last_mark: now,
            phases: [Duration::ZERO; 5],
        }
    }

    /// Attributes the time since the previous mark (or the start) to `phase`.
    pub fn end_phase(&mut self, phase: StepPhase) {
        self.end_phase_at(phase, Instant::now());
    }

    pub fn end_phase_at(&mut self, phase: StepPhase, now: Instant) {
        self.phases[phase.index()] += now.saturating_duration_since(self.last_mark);
        self.last_mark = now;
    }

    /// Moves up to `amount` of the time attributed to `from` over to `to`: for work a model
    /// timed inside a phase (reading its data inside the forward/backward call).
    pub fn reattribute(&mut self, from: StepPhase, to: StepPhase, amount: Duration) {
        let moved = amount.min(self.phases[from.index()]);
        self.phases[from.index()] -= moved;
        self.phases[to.index()] += moved;
    }

    pub fn finish(self) -> StepTiming {
        self.finish_at(Instant::now())
    }

    pub fn finish_at(self, now: Instant) -> StepTiming {
        StepTiming {
            total: now.saturating_duration_since(self.started),
            phases: self.phases,
        }
    }
}

/// Durations of one finished step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepTiming {
    pub total: Duration,
    phases: [Duration; 5],
}

impl StepTiming {
    pub fn phase(&self, phase: StepPhase) -> Duration {
        self.phases[phase.index()]
    }
}

/// What the training loop knows when it has computed (not yet applied) a step.
#[derive(Debug, Clone, Copy)]
pub struct StepReport {
    /// Data wait, forward, backward and all-reduce; the optimizer runs at the commit.
    pub timing: StepTiming,
    /// Images this worker processed in the step (its local batch).
    pub images: u64,
    /// Optimizer updates the model holds while computing this step (the step's index).
    pub global_step: u64,
    pub loss: f64,
}

/// What an optimizer update reported (models that cannot tell report nothing).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct UpdateReport {
    pub learning_rate: f64,
    /// Global L2 norm of the averaged gradients, before clipping.
    pub grad_norm: f64,
    /// Steps the EMA weights trail the live weights; `None` for a model without EMA.
    pub ema_lag_steps: Option<u64>,
}

/// A committed step, as applied by this worker.
#[derive(Debug, Clone, Copy)]
pub struct CommitReport {
    /// Compute time of the step (its [`StepReport::timing`] total).
    pub step_time: Duration,
    /// Time of the optimizer update applied at the commit.
    pub optimizer_time: Duration,
    /// Optimizer updates the model holds after this one.
    pub updates_held: u64,
    pub update: Option<UpdateReport>,
}

/// Writes finished steps, commits and checkpoints into a worker's metrics.
pub struct StepRecorder {
    metrics: WorkerMetrics,
    smoothed_images_per_second: Option<f64>,
}

impl StepRecorder {
    pub fn new(metrics: WorkerMetrics) -> Self {
        Self {
            metrics,
            smoothed_images_per_second: None,
        }
    }

    pub fn metrics(&self) -> &WorkerMetrics {
        &self.metrics
    }

    /// The smoothed throughput, as exported in `eqim_images_per_second`.
    pub fn images_per_second(&self) -> f64 {
        self.smoothed_images_per_second.unwrap_or(0.0)
    }

    /// A computed step: throughput, loss and every phase but the optimizer's (timed at commit).
    pub fn record_step(&mut self, report: &StepReport) {
        let m = &self.metrics;
        let total = report.timing.total.as_secs_f64();
        for phase in StepPhase::ALL {
            if phase == StepPhase::Optimizer {
                continue;
            }
            m.step_phase_duration
                .with_label_values(&[phase.label()])
                .observe(report.timing.phase(phase).as_secs_f64());
        }
        m.steps.inc();
        m.images.inc_by(report.images as f64);
        if total > 0.0 {
            let rate = report.images as f64 / total;
            let smoothed = match self.smoothed_images_per_second {
                Some(prev) => prev + THROUGHPUT_SMOOTHING * (rate - prev),
                None => rate,
            };
            self.smoothed_images_per_second = Some(smoothed);
            m.images_per_second.set(smoothed);
        }
        m.train_step.set(report.global_step as f64);
        m.train_loss.set(report.loss);
    }

    /// The coordinator committed a step and this worker applied it: the whole step's time
    /// (compute and optimizer) counts as useful (goodput), and the update's figures are set.
    pub fn record_commit(&self, c: &CommitReport) {
        let m = &self.metrics;
        let whole = (c.step_time + c.optimizer_time).as_secs_f64();
        m.committed_step_seconds.inc_by(whole);
        m.step_duration.observe(whole);
        m.step_phase_duration
            .with_label_values(&[StepPhase::Optimizer.label()])
            .observe(c.optimizer_time.as_secs_f64());
        m.train_step.set(c.updates_held as f64);
        if let Some(u) = c.update {
            m.learning_rate.set(u.learning_rate);
            m.grad_norm.set(u.grad_norm);
            if let Some(lag) = u.ema_lag_steps {
                m.ema_lag_steps.set(lag as f64);
            }
        }
    }

    /// Adds the data errors counted since the last call: `total` is a process-wide running
    /// count (e.g. the data loader's unreadable files); `seen` remembers the last value.
    pub fn record_data_errors_total(&self, total: u64, seen: &mut u64) {
        if total > *seen {
            self.metrics.data_errors.inc_by((total - *seen) as f64);
        }
        *seen = (*seen).max(total);
    }

    pub fn record_checkpoint(&self, write_time: Duration, size_bytes: u64) {
        record_checkpoint(&self.metrics, write_time, size_bytes);
    }

    pub fn record_data_error(&self) {
        self.metrics.data_errors.inc();
    }

    pub fn record_eval_images(&self, images: u64) {
        self.metrics.eval_images.inc_by(images as f64);
    }
}

/// A checkpoint this worker wrote, from a checkpoint writer thread.
pub fn record_checkpoint(metrics: &WorkerMetrics, write_time: Duration, size_bytes: u64) {
    metrics
        .checkpoint_duration
        .observe(write_time.as_secs_f64());
    metrics.checkpoint_size.set(size_bytes as f64);
}

/// The metrics of a worker process named `worker_id`, served on `/metrics` at `addr` when given
/// (the server stops when the returned handle is dropped).
pub fn worker_metrics(
    worker_id: &str,
    addr: Option<SocketAddr>,
) -> Result<(WorkerMetrics, Option<MetricsThread>)> {
    let metrics = WorkerMetrics::new(eqim_common::metrics::DEFAULT_JOB_LABEL, worker_id)
        .context("creating the worker's metrics")?;
    let server = match addr {
        Some(addr) => {
            let server = MetricsThread::start(addr, &metrics)
                .with_context(|| format!("serving /metrics on {addr}"))?;
            tracing::info!(addr = %server.local_addr(), "serving /metrics");
            Some(server)
        }
        None => None,
    };
    Ok((metrics, server))
}

/// A `/metrics` server on its own thread and single-threaded tokio runtime, for code paths that
/// are not async (a single-process `eqim train`). Stops when dropped.
pub struct MetricsThread {
    local_addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl MetricsThread {
    pub fn start(addr: SocketAddr, metrics: &WorkerMetrics) -> Result<Self> {
        let all = metrics.all.clone();
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("eqim-metrics".into())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(err) => {
                        // The receiver is waiting for exactly this answer.
                        let _ = addr_tx.send(Err(anyhow::Error::from(err)));
                        return;
                    }
                };
                runtime.block_on(async move {
                    match MetricsServer::start(addr, all).await {
                        Ok(server) => {
                            // If start() gave up waiting, nobody needs the address.
                            let _ = addr_tx.send(Ok(server.local_addr()));
                            // Either a stop request or the handle being dropped ends serving.
                            let _ = stop_rx.await;
                            server.shutdown().await;
                        }
                        Err(err) => {
                            let _ = addr_tx.send(Err(err.into()));
                        }
                    }
                });
            })
            .context("spawning the /metrics thread")?;
        let local_addr = addr_rx
            .recv()
            .context("the /metrics thread ended before it started serving")??;
        Ok(Self {
            local_addr,
            stop: Some(stop_tx),
            thread: Some(thread),
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }
}

impl Drop for MetricsThread {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            // The thread may already be gone; then there is nothing to stop.
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                tracing::warn!("/metrics thread panicked");
            }
        }
    }
}

/// One reading of a GPU.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GpuReading {
    pub memory_used_bytes: u64,
    pub memory_total_bytes: u64,
    /// 0 to 1.
    pub utilization: f64,
}

/// Parses one line of `nvidia-smi --query-gpu=memory.used,memory.total,utilization.gpu
/// --format=csv,noheader,nounits` (MiB, MiB, percent).
pub fn parse_nvidia_smi_line(line: &str) -> Option<GpuReading> {
    let fields: Vec<&str> = line.split(',').map(str::trim).collect();
    let [used, total, util] = fields.as_slice() else {
        return None;
    };
    let mib = 1024 * 1024;
    Some(GpuReading {
        memory_used_bytes: used.parse::<u64>().ok()? * mib,
        memory_total_bytes: total.parse::<u64>().ok()? * mib,
        utilization: util.parse::<f64>().ok()? / 100.0,
    })
}

/// The `nvidia-smi --id` of CUDA device `ordinal`: the ordinal-th entry of
/// `CUDA_VISIBLE_DEVICES` when that lists plain indices, else the ordinal itself.
pub fn nvidia_smi_index(ordinal: usize, cuda_visible_devices: Option<&str>) -> usize {
    cuda_visible_devices
        .and_then(|list| list.split(',').nth(ordinal))
        .and_then(|entry| entry.trim().parse().ok())
        .unwrap_or(ordinal)
}

/// Reads GPU `index` with `nvidia-smi`; `None` when there is no NVIDIA driver or GPU.
pub fn read_gpu(index: usize) -> Option<GpuReading> {
    let out = std::process::Command::new("nvidia-smi")
        .args([
            "--query-gpu=memory.used,memory.total,utilization.gpu",
            "--format=csv,noheader,nounits",
            &format!("--id={index}"),
        ])
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    parse_nvidia_smi_line(String::from_utf8_lossy(&out.stdout).lines().next()?)
}

/// Samples GPU `index` into the metrics every `interval` on a background thread, until dropped.
/// Returns `None` (and leaves the GPU gauges at 0) when `nvidia-smi` cannot read that GPU.
pub struct GpuSampler {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl GpuSampler {
    /// Samples the GPU behind a tch device (`cuda:N`, through `CUDA_VISIBLE_DEVICES` when set)
    /// every [`DEFAULT_GPU_SAMPLE_INTERVAL`]; `None` for the CPU or when `nvidia-smi` cannot read
    /// it (logged), leaving the GPU gauges at 0.
    pub fn for_device(metrics: &WorkerMetrics, device: tch::Device) -> Option<Self> {
        let tch::Device::Cuda(ordinal) = device else {
            return None;
        };
        let visible = std::env::var("CUDA_VISIBLE_DEVICES").ok();
        let index = nvidia_smi_index(ordinal, visible.as_deref());
        let sampler = Self::start(metrics, index, DEFAULT_GPU_SAMPLE_INTERVAL);
        match &sampler {
            Some(_) => tracing::info!(gpu = index, "sampling GPU memory and utilisation"),
            None => tracing::warn!(
                gpu = index,
                "nvidia-smi cannot read this GPU; the GPU metrics stay 0"
            ),
        }
        sampler
    }

    pub fn start(metrics: &WorkerMetrics, index: usize, interval: Duration) -> Option<Self> {
        let first = read_gpu(index)?;
        let metrics = metrics.clone();
        let write = move |m: &WorkerMetrics, r: GpuReading| {
            m.gpu_memory_used.set(r.memory_used_bytes as f64);
            m.gpu_memory_total.set(r.memory_total_bytes as f64);
            m.gpu_utilization.set(r.utilization);
        };
        write(&metrics, first);
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::Builder::new()
            .name("eqim-gpu-sampler".into())
            .spawn(move || {
                let tick = Duration::from_millis(100).min(interval);
                let mut last = Instant::now();
                while !stopped.load(Ordering::Relaxed) {
                    std::thread::sleep(tick);
                    if last.elapsed() >= interval {
                        last = Instant::now();
                        if let Some(r) = read_gpu(index) {
                            write(&metrics, r);
                        }
                    }
                }
            })
            .ok()?;
        Some(Self {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for GpuSampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                tracing::warn!("GPU sampler thread panicked");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn step_timer_attributes_each_interval_to_the_phase_that_ended() {
        let t0 = Instant::now();
        let mut timer = StepTimer::start_at(t0);
        timer.end_phase_at(StepPhase::DataWait, t0 + ms(5));
        timer.end_phase_at(StepPhase::Forward, t0 + ms(25));
        timer.end_phase_at(StepPhase::Backward, t0 + ms(65));
        timer.end_phase_at(StepPhase::AllReduce, t0 + ms(75));
        timer.end_phase_at(StepPhase::Optimizer, t0 + ms(80));
        let timing = timer.finish_at(t0 + ms(81));
        assert_eq!(timing.total, ms(81));
        assert_eq!(timing.phase(StepPhase::DataWait), ms(5));
        assert_eq!(timing.phase(StepPhase::Forward), ms(20));
        assert_eq!(timing.phase(StepPhase::Backward), ms(40));
        assert_eq!(timing.phase(StepPhase::AllReduce), ms(10));
        assert_eq!(timing.phase(StepPhase::Optimizer), ms(5));
    }

    #[test]
    fn reattributing_moves_time_between_phases_but_never_more_than_there_is() {
        let t0 = Instant::now();
        let mut timer = StepTimer::start_at(t0);
        timer.end_phase_at(StepPhase::Backward, t0 + ms(50));
        timer.reattribute(StepPhase::Backward, StepPhase::DataWait, ms(20));
        timer.reattribute(StepPhase::Forward, StepPhase::DataWait, ms(20));
        let timing = timer.finish_at(t0 + ms(50));
        assert_eq!(timing.phase(StepPhase::Backward), ms(30));
        assert_eq!(timing.phase(StepPhase::DataWait), ms(20));
        assert_eq!(timing.phase(StepPhase::Forward), ms(0));
        assert_eq!(timing.total, ms(50));
    }

    #[test]
    fn phase_labels_are_the_table_values_in_order() {
        let labels: Vec<_> = StepPhase::ALL.iter().map(|p| p.label()).collect();
        assert_eq!(labels, names::STEP_PHASES);
    }

    #[test]
    fn recorder_writes_a_step_and_smooths_throughput() {
        let metrics = WorkerMetrics::new("t", "w1").expect("registry");
        let mut rec = StepRecorder::new(metrics.clone());
        let t0 = Instant::now();
        let mut timer = StepTimer::start_at(t0);
        timer.end_phase_at(StepPhase::Forward, t0 + ms(100));
        let report = StepReport {
            timing: timer.finish_at(t0 + ms(500)),
            images: 50,
            global_step: 7,
            loss: 0.5,
        };
        rec.record_step(&report);
        assert_eq!(rec.images_per_second(), 100.0);
        let slower = StepReport {
            timing: StepTimer::start_at(t0).finish_at(t0 + ms(1000)),
            ..report
        };
        rec.record_step(&slower);
        // 100 + 0.1 * (50 - 100)
        assert!((rec.images_per_second() - 95.0).abs() < 1e-9);
        assert_eq!(metrics.train_step.get(), 7.0);
        let optimizer = || {
            metrics
                .step_phase_duration
                .with_label_values(&[names::PHASE_OPTIMIZER])
        };
        assert_eq!(optimizer().get_sample_count(), 0, "timed at the commit");
        assert_eq!(metrics.step_duration.get_sample_count(), 0);
        rec.record_commit(&CommitReport {
            step_time: ms(500),
            optimizer_time: ms(20),
            updates_held: 8,
            update: Some(UpdateReport {
                learning_rate: 1e-4,
                grad_norm: 2.0,
                ema_lag_steps: Some(0),
            }),
        });
        rec.record_checkpoint(ms(1500), 4096);
        assert_eq!(metrics.steps.get(), 2.0);
        assert_eq!(metrics.images.get(), 100.0);
        assert_eq!(metrics.train_step.get(), 8.0);
        assert_eq!(metrics.learning_rate.get(), 1e-4);
        assert_eq!(metrics.grad_norm.get(), 2.0);
        assert_eq!(metrics.step_duration.get_sample_count(), 1);
        assert!((metrics.step_duration.get_sample_sum() - 0.52).abs() < 1e-9);
        assert!((optimizer().get_sample_sum() - 0.02).abs() < 1e-9);
        let forward = metrics
            .step_phase_duration
            .with_label_values(&[names::PHASE_FORWARD]);
        assert!((forward.get_sample_sum() - 0.1).abs() < 1e-9);
        assert!((metrics.committed_step_seconds.get() - 0.52).abs() < 1e-9);
        assert_eq!(metrics.checkpoint_size.get(), 4096.0);
        let mut seen = 0;
        rec.record_data_errors_total(3, &mut seen);
        rec.record_data_errors_total(3, &mut seen);
        rec.record_data_errors_total(5, &mut seen);
        assert_eq!(metrics.data_errors.get(), 5.0);
    }

    #[test]
    fn cuda_ordinals_map_through_cuda_visible_devices() {
        assert_eq!(nvidia_smi_index(0, None), 0);
        assert_eq!(nvidia_smi_index(1, Some("3,5")), 5);
        assert_eq!(
            nvidia_smi_index(0, Some("GPU-1234")),
            0,
            "UUIDs: keep the ordinal"
        );
        assert_eq!(nvidia_smi_index(2, Some("3")), 2);
    }

    #[test]
    fn nvidia_smi_lines_parse_into_bytes_and_ratios() {
        assert_eq!(
            parse_nvidia_smi_line("1024, 143771, 37"),
            Some(GpuReading {
                memory_used_bytes: 1024 * 1024 * 1024,
                memory_total_bytes: 143771 * 1024 * 1024,
                utilization: 0.37,
            })
        );
        assert_eq!(parse_nvidia_smi_line("[N/A], 143771, 0"), None);
        assert_eq!(parse_nvidia_smi_line("1, 2"), None);
    }

    #[test]
    fn metrics_thread_serves_and_stops() {
        use std::io::{Read, Write};
        let metrics = WorkerMetrics::new("t", "w2").expect("registry");
        metrics.train_loss.set(1.25);
        let server =
            MetricsThread::start("127.0.0.1:0".parse().expect("addr"), &metrics).expect("starts");
        let addr = server.local_addr();
        let mut conn = std::net::TcpStream::connect(addr).expect("connect");
        conn.write_all(b"GET /metrics HTTP/1.1\r\n\r\n")
            .expect("send");
        let mut text = String::new();
        conn.read_to_string(&mut text).expect("read");
        assert!(text.starts_with("HTTP/1.1 200"));
        assert!(text.contains("eqim_train_loss{"));
        assert!(text.contains("worker=\"w2\""));
        drop(server);
        assert!(std::net::TcpStream::connect(addr).is_err());
    }
}
