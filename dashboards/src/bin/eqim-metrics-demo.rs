//! `eqim-metrics-demo`: test tooling for the observability stack, used by `scripts/check-prometheus`.
//! `serve` exposes every metric of one role with changing, clearly synthetic values (no training
//! happens; `check-prometheus --synthetic`); `check` asks a running Prometheus whether every
//! series and every panel expression of the dashboards has samples and, with `--phase training`
//! (a real training job), whether each metric moved as `eqim_dashboards::expectations` says it must.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use eqim_common::metrics as names;
use eqim_common::metrics_http::MetricsServer;
use eqim_common::metrics_registry::{CoordinatorMetrics, WorkerMetrics};
use eqim_dashboards::expectations::TrainingExpectation;
use eqim_dashboards::{
    dashboard_files, load_dashboard, metrics_markdown_table, substitute_variables,
    variable_query_expr,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// How often `serve` changes the values (and how often `check` polls Prometheus).
const TICK_INTERVAL: Duration = Duration::from_millis(250);

#[derive(Parser)]
#[command(
    name = "eqim-metrics-demo",
    about = "Test tooling for eqim's metrics: serve synthetic values for every metric, or check a Prometheus against the dashboards"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Which source `check` is pointed at.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Phase {
    /// `serve`'s synthetic exporters: existence and samples only.
    Synthetic,
    /// A real training job: also, each metric moved as `eqim_dashboards::expectations` requires.
    Training,
    /// The same job after one worker was killed: deaths and recoveries moved.
    Recovery,
    /// A real evaluation job (`eqim eval`): its progress metrics moved.
    Evaluation,
}

#[derive(Clone, Copy, ValueEnum)]
enum DemoRole {
    Coordinator,
    Worker,
}

#[derive(Subcommand)]
enum Command {
    /// Serve /metrics for one role with synthetic, changing values (NOT a training job).
    Serve {
        #[arg(long, value_enum)]
        role: DemoRole,
        /// The `job` label.
        #[arg(long, default_value = "demo")]
        job: String,
        /// The `worker` label (workers only).
        #[arg(long, default_value = "w0")]
        worker: String,
        /// Address to listen on; port 0 picks a free one.
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: SocketAddr,
        /// Write the bound address here (atomically) once serving.
        #[arg(long)]
        addr_file: Option<PathBuf>,
        /// Stop after this many seconds.
        #[arg(long, default_value_t = 60)]
        duration_s: u64,
    },
    /// Print the metric table (name, type, labels, roles, help) as Markdown.
    Table,
    /// Poll Prometheus until every dashboard series and panel expression has samples.
    Check {
        /// Prometheus base URL, loopback HTTP only (e.g. http://127.0.0.1:9090).
        #[arg(long)]
        prometheus: String,
        /// Folder with the Grafana dashboards.
        #[arg(long, default_value = "dashboards")]
        dashboards: PathBuf,
        /// Only series with this `job` label count.
        #[arg(long, default_value = "demo")]
        job: String,
        /// Give up after this many seconds.
        #[arg(long, default_value_t = 40)]
        timeout_s: u64,
        #[arg(long, value_enum, default_value = "synthetic")]
        phase: Phase,
        /// Why there is no NVIDIA GPU to check the GPU metrics on (e.g. "nvidia-smi not
        /// found"); without it, a training check requires the GPU metrics to move.
        #[arg(long, value_name = "REASON")]
        no_gpu: Option<String>,
        /// Stop polling early (and fail) once this file exists: the job being checked ended.
        #[arg(long, value_name = "FILE")]
        give_up_when: Option<PathBuf>,
    },
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match Cli::parse().command {
        Command::Serve {
            role,
            job,
            worker,
            listen,
            addr_file,
            duration_s,
        } => {
            let serve = ServeArgs {
                listen,
                addr_file,
                duration: Duration::from_secs(duration_s),
            };
            match role {
                DemoRole::Coordinator => serve_coordinator(&job, serve).await,
                DemoRole::Worker => serve_worker(&job, &worker, serve).await,
            }
        }
        Command::Table => {
            print!("{}", metrics_markdown_table());
            Ok(())
        }
        Command::Check {
            prometheus,
            dashboards,
            job,
            timeout_s,
            phase,
            no_gpu,
            give_up_when,
        } => {
            let probes = match phase {
                Phase::Synthetic => probes(&dashboards, &job)?,
                Phase::Training => {
                    let mut all = probes(&dashboards, &job)?;
                    all.extend(training_probes(&job, no_gpu.as_deref()));
                    all
                }
                Phase::Recovery => moved_probes(
                    &job,
                    "recovery",
                    TrainingExpectation::MovesAfterLoss,
                    "after a worker was lost",
                ),
                Phase::Evaluation => moved_probes(
                    &job,
                    "evaluation",
                    TrainingExpectation::EvalPhase,
                    "during the evaluation",
                ),
            };
            check(
                &prometheus,
                probes,
                Duration::from_secs(timeout_s),
                give_up_when.as_deref(),
            )
            .await
        }
    }
}

struct ServeArgs {
    listen: SocketAddr,
    addr_file: Option<PathBuf>,
    duration: Duration,
}

async fn start_server(
    args: &ServeArgs,
    metrics: std::sync::Arc<eqim_common::metrics_registry::EqimMetrics>,
) -> Result<MetricsServer> {
    let server = MetricsServer::start(args.listen, metrics).await?;
    if let Some(path) = &args.addr_file {
        eqim_common::files::write_atomic(path, server.local_addr().to_string().as_bytes())?;
    }
    Ok(server)
}

/// A deterministic wobble in [0, 1) so values change between scrapes without a random source.
fn wobble(tick: u64, salt: u64) -> f64 {
    let x = tick
        .wrapping_mul(2654435761)
        .wrapping_add(salt.wrapping_mul(40503))
        % 1000;
    x as f64 / 1000.0
}

async fn serve_worker(job: &str, worker: &str, args: ServeArgs) -> Result<()> {
    let m = WorkerMetrics::new(job, worker)?;
    let server = start_server(&args, m.all.clone()).await?;
    let salt = worker.bytes().map(u64::from).sum::<u64>();
    let started = Instant::now();
    let mut interval = tokio::time::interval(TICK_INTERVAL);
    let mut tick = 0u64;
    let batch = 32.0;
    m.gpu_memory_total.set(80e9);
    while started.elapsed() < args.duration {
        interval.tick().await;
        tick += 1;
        let phases = [0.002, 0.020, 0.040, 0.010, 0.004];
        let mut step = 0.0;
        for (phase, base) in names::STEP_PHASES.iter().zip(phases) {
            let secs = base * (1.0 + wobble(tick, salt + step as u64));
            step += secs;
            m.step_phase_duration
                .with_label_values(&[*phase])
                .observe(secs);
        }
        m.step_duration.observe(step);
        m.steps.inc();
        m.committed_step_seconds.inc_by(step * 0.9);
        m.images.inc_by(batch);
        m.images_per_second.set(batch / step);
        m.train_step.set(tick as f64);
        m.train_loss
            .set(1.0 / (1.0 + tick as f64 / 20.0) + 0.05 * wobble(tick, salt));
        m.learning_rate.set(1e-4 * (tick as f64 / 10.0).min(1.0));
        m.grad_norm.set(0.5 + wobble(tick, salt + 1));
        m.ema_lag_steps.set((tick % 2) as f64);
        if tick.rem_euclid(7) == 0 {
            m.data_errors.inc();
        }
        if tick.rem_euclid(8) == 0 {
            m.checkpoint_duration.observe(1.5 + wobble(tick, salt));
            m.checkpoint_size.set(2.5e8);
        }
        m.eval_images.inc_by(4.0);
        m.gpu_memory_used.set(40e9 + 1e9 * wobble(tick, salt));
        m.gpu_utilization.set(0.6 + 0.3 * wobble(tick, salt + 2));
    }
    server.shutdown().await;
    Ok(())
}

async fn serve_coordinator(job: &str, args: ServeArgs) -> Result<()> {
    let m = CoordinatorMetrics::new(job)?;
    let server = start_server(&args, m.all.clone()).await?;
    let started = Instant::now();
    let mut interval = tokio::time::interval(TICK_INTERVAL);
    let mut tick = 0u64;
    let epoch_samples = 1000.0;
    m.epoch_samples.set(epoch_samples);
    m.eval_images_target.set(500.0);
    m.membership_size.set(2.0);
    m.membership_generation.set(1.0);
    m.worker_joins.inc_by(2.0);
    while started.elapsed() < args.duration {
        interval.tick().await;
        tick += 1;
        // A scripted membership story: one worker dies at tick 8, a replacement joins at 12.
        if tick == 8 {
            m.worker_deaths
                .with_label_values(&[names::DEATH_HEARTBEAT_TIMEOUT])
                .inc();
            m.membership_size.set(1.0);
            m.membership_generation.inc();
        }
        if tick == 12 {
            m.worker_joins.inc();
            m.membership_size.set(2.0);
            m.membership_generation.inc();
            m.recoveries.inc();
            m.recovery_duration
                .observe(4.0 * TICK_INTERVAL.as_secs_f64());
        }
        m.committed_step.set(tick as f64);
        let consumed = (tick as f64 * 64.0) % epoch_samples;
        m.epoch.set(((tick as f64 * 64.0) / epoch_samples).floor());
        m.epoch_samples_consumed.set(consumed);
        if tick.rem_euclid(8) == 0 {
            m.checkpoints.inc();
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .context("system clock before 1970")?;
            m.last_good_checkpoint_timestamp.set(now.as_secs_f64());
        }
        m.eval_images_completed.set((tick as f64 * 8.0).min(500.0));
    }
    server.shutdown().await;
    Ok(())
}

/// What Prometheus must answer, with a label for the failure report.
struct Probe {
    what: String,
    query: String,
    /// Each returned sample must be at least this (for `count_over_time` of a series).
    min_value: Option<f64>,
    kind: ProbeKind,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum ProbeKind {
    /// A series a dashboard uses has samples.
    Series,
    /// A panel or variable expression returns samples.
    Expression,
    /// A metric moved off its starting value during the job (training phase).
    Moved,
}

fn probes(dashboards: &Path, job: &str) -> Result<Vec<Probe>> {
    let mut series = BTreeMap::new();
    let mut out = Vec::new();
    for file in dashboard_files(dashboards)? {
        let board = load_dashboard(&file)?;
        for name in board.series_names() {
            series.insert(name, board.title.clone());
        }
        for q in &board.queries {
            let expr = if q.is_variable {
                variable_query_expr(&q.expr)
            } else {
                q.expr.clone()
            };
            if expr.is_empty() {
                continue;
            }
            out.push(Probe {
                what: format!("{} / {}", board.title, q.location),
                query: substitute_variables(&expr, "20s"),
                min_value: None,
                kind: ProbeKind::Expression,
            });
        }
    }
    for (name, title) in series {
        out.insert(
            0,
            Probe {
                what: format!("series {name} (used by {title})"),
                query: format!("count_over_time({name}{{job=\"{job}\"}}[5m])"),
                min_value: Some(2.0),
                kind: ProbeKind::Series,
            },
        );
    }
    Ok(out)
}

/// The training phase's probes (each metric that must move did), after printing how every
/// metric of the table is covered: moved, rightly at its start, skipped for want of a GPU, or
/// left to the evaluation phase.
fn training_probes(job: &str, no_gpu: Option<&str>) -> Vec<Probe> {
    use eqim_dashboards::expectations::{
        moved_query, training_expectation, TrainingExpectation as E,
    };
    let mut probes = Vec::new();
    let (mut at_start, mut skipped, mut eval) = (Vec::new(), Vec::new(), Vec::new());
    let mut after_loss = Vec::new();
    for desc in names::METRICS {
        let expectation = training_expectation(desc.name);
        let must_move = match expectation {
            Some(E::Moves) => true,
            Some(E::NeedsGpu) => match no_gpu {
                None => true,
                Some(why) => {
                    skipped.push(format!("{} ({why})", desc.name));
                    false
                }
            },
            Some(E::StaysAtStart(why)) => {
                at_start.push(format!("{} ({why})", desc.name));
                false
            }
            Some(E::EvalPhase) => {
                eval.push(desc.name);
                false
            }
            Some(E::MovesAfterLoss) => {
                after_loss.push(desc.name);
                false
            }
            // The unit tests keep the table classified; an unclassified metric must still move.
            None => true,
        };
        if must_move {
            probes.push(Probe {
                what: format!("{} moved off its starting value during the job", desc.name),
                query: moved_query(desc, job, "10m"),
                min_value: None,
                kind: ProbeKind::Moved,
            });
        }
    }
    println!(
        "training phase: {} metrics must move during the job",
        probes.len()
    );
    println!(
        "  exist, and rightly stay at their starting value in a short healthy job: {}",
        at_start.join(", ")
    );
    println!(
        "  exist; must move once a worker is lost (recovery phase): {}",
        after_loss.join(", ")
    );
    if !skipped.is_empty() {
        println!(
            "  SKIPPED, exist but not required to move: {}",
            skipped.join(", ")
        );
    }
    println!(
        "  exist; must move during an evaluation (evaluation phase): {}",
        eval.join(", ")
    );
    probes
}

/// The probes of a phase after the training one: every metric with `expectation` moved `when`
/// (printed with the phase's name).
fn moved_probes(
    job: &str,
    phase: &str,
    expectation: eqim_dashboards::expectations::TrainingExpectation,
    when: &str,
) -> Vec<Probe> {
    use eqim_dashboards::expectations::{moved_query, training_expectation};
    let metrics: Vec<_> = names::METRICS
        .iter()
        .filter(|d| training_expectation(d.name) == Some(expectation))
        .collect();
    println!(
        "{phase} phase: {} metrics must move {when}: {}",
        metrics.len(),
        metrics
            .iter()
            .map(|d| d.name)
            .collect::<Vec<_>>()
            .join(", ")
    );
    metrics
        .into_iter()
        .map(|desc| Probe {
            what: format!("{} moved {when}", desc.name),
            query: moved_query(desc, job, "10m"),
            min_value: None,
            kind: ProbeKind::Moved,
        })
        .collect()
}

async fn check(
    prometheus: &str,
    probes: Vec<Probe>,
    timeout: Duration,
    give_up_when: Option<&Path>,
) -> Result<()> {
    let base = prometheus
        .strip_prefix("http://")
        .context("--prometheus must be an http:// URL")?
        .trim_end_matches('/');
    let addr: SocketAddr = base
        .parse()
        .with_context(|| format!("--prometheus must be http://IP:PORT, got {prometheus}"))?;
    let started = Instant::now();
    loop {
        let mut failures = Vec::new();
        for p in &probes {
            if let Err(e) = run_probe(addr, p).await {
                failures.push(format!("{}: {e:#}\n    query: {}", p.what, p.query));
            }
        }
        if failures.is_empty() {
            let count = |kind| probes.iter().filter(|p| p.kind == kind).count();
            println!(
                "prometheus check: all {} probes pass ({} series have samples, {} panel and variable expressions return samples, {} metrics moved) after {:.1} s",
                probes.len(),
                count(ProbeKind::Series),
                count(ProbeKind::Expression),
                count(ProbeKind::Moved),
                started.elapsed().as_secs_f64()
            );
            return Ok(());
        }
        let source_gone = give_up_when.filter(|p| p.exists());
        if let Some(marker) = source_gone {
            bail!(
                "the checked job ended ({} exists) before every probe passed; {} of {} still fail:\n  {}",
                marker.display(),
                failures.len(),
                probes.len(),
                failures.join("\n  ")
            );
        }
        if started.elapsed() > timeout {
            bail!(
                "after {} s, {} of {} probes still fail:\n  {}",
                timeout.as_secs(),
                failures.len(),
                probes.len(),
                failures.join("\n  ")
            );
        }
        tokio::time::sleep(TICK_INTERVAL * 4).await;
    }
}

async fn run_probe(addr: SocketAddr, probe: &Probe) -> Result<()> {
    let body = http_get(
        addr,
        &format!("/api/v1/query?query={}", url_encode(&probe.query)),
    )
    .await?;
    let json: serde_json::Value =
        serde_json::from_str(&body).with_context(|| format!("non-JSON answer: {body}"))?;
    if json["status"] != "success" {
        bail!("query failed: {}", json["error"]);
    }
    let result = json["data"]["result"]
        .as_array()
        .context("answer has no data.result array")?;
    if result.is_empty() {
        bail!("no samples");
    }
    if let Some(min) = probe.min_value {
        for sample in result {
            let value: f64 = sample["value"][1]
                .as_str()
                .and_then(|v| v.parse().ok())
                .context("sample without a value")?;
            if value < min {
                bail!("only {value} samples so far (need {min})");
            }
        }
    }
    Ok(())
}

/// HTTP/1.0 so the answer is never chunked; the server closes the connection at the end.
async fn http_get(addr: SocketAddr, path: &str) -> Result<String> {
    let mut stream =
        tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpStream::connect(addr))
            .await
            .context("connecting to Prometheus timed out")?
            .with_context(|| format!("connecting to Prometheus at {addr}"))?;
    let request =
        format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\nAccept: application/json\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut response = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut response))
        .await
        .context("Prometheus did not answer within 10 s")??;
    let response = String::from_utf8_lossy(&response);
    let (head, body) = response
        .split_once("\r\n\r\n")
        .context("malformed HTTP answer")?;
    let status = head.lines().next().unwrap_or_default();
    if !(status.contains(" 200 ") || status.contains(" 400 ") || status.contains(" 422 ")) {
        bail!("HTTP answer `{status}`: {body}");
    }
    Ok(body.to_string())
}

fn url_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}
