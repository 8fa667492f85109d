//! `eqim worker`: the worker agent. A tokio task speaks the QUIC control plane (through
//! `eqim_common::client`) and forwards the coordinator's orders to a dedicated training
//! thread over a channel; the thread's results (group ready, votes) go back the same way.
//! Workers may start before the coordinator: connecting is retried with backoff until
//! `--connect-timeout`, and a lost coordinator is reconnected to under the same bound.

use super::generator_trainable::GeneratorTrainable;
use super::trainable::{SyntheticMlp, Trainable};
use super::trainer::{Command, Event, Trainer, TrainerConfig};
use anyhow::{bail, Context, Result};
use eqim_common::client::{Client, ClientConfig, ClientError, HeartbeatStatus};
use eqim_common::net::credentials::{parse_fingerprint, ClientCredentials};
use eqim_common::proto::{
    CoordinatorToWorker, Generation, StoreEndpoint, WorkerId, WorkerPhase, WorkerToCoordinator,
    JIT_CHECKPOINT_TIMEOUT,
};
use std::path::PathBuf;
use std::sync::mpsc;
use std::time::Duration;
use tokio::sync::mpsc::UnboundedReceiver;
use tracing::{info, warn};

/// How long the training thread gets to write its final state at the end of the job.
const FINISH_TIMEOUT: Duration = Duration::from_secs(60);

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
    /// Address of this machine that other workers can reach (TCPStore and gloo).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Give up when the coordinator cannot be reached for this long (seconds).
    #[arg(long, default_value_t = 60.0)]
    pub connect_timeout: f64,
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

/// Reads the token, waiting for the file while the coordinator may still be creating it.
fn load_credentials(args: &WorkerArgs) -> Result<ClientCredentials> {
    credentials_from(&args.token, args.fingerprint.as_deref())
}

/// The job's credentials from a token file and, optionally, a certificate fingerprint given
/// on the command line (otherwise `coordinator-cert.sha256` next to the token).
pub fn credentials_from(
    token: &std::path::Path,
    fingerprint: Option<&str>,
) -> Result<ClientCredentials> {
    match fingerprint {
        Some(hex_text) => {
            let cert_sha256 = parse_fingerprint(hex_text.trim())
                .map_err(|m| anyhow::anyhow!("--fingerprint: {m}"))?;
            let token = std::fs::read_to_string(token)
                .with_context(|| format!("reading the token file {}", token.display()))?
                .trim()
                .to_owned();
            Ok(ClientCredentials { token, cert_sha256 })
        }
        None => ClientCredentials::from_token_file(token).with_context(|| {
            format!(
                "reading the token {} and the coordinator-cert.sha256 next to it (or pass --fingerprint)",
                token.display()
            )
        }),
    }
}

/// Runs a worker until the job finishes, SIGTERM, or the coordinator stays unreachable.
pub fn run(args: WorkerArgs) -> Result<()> {
    let connect_timeout = secs("connect-timeout", args.connect_timeout)?;
    let collective_timeout = secs("collective-timeout", args.collective_timeout)?;
    if let Some(threads) = args.threads {
        tch::set_num_threads(threads);
    }
    let worker_id = WorkerId(
        args.worker_id
            .clone()
            .unwrap_or_else(|| format!("worker-{}", std::process::id())),
    );
    let (metrics, _metrics_server) =
        crate::metrics::worker_metrics(&worker_id.0, args.metrics_addr)?;
    let (event_tx, event_rx) = tokio::sync::mpsc::unbounded_channel();
    let (command_tx, command_rx) = mpsc::channel::<Command>();
    let (port_tx, port_rx) = mpsc::channel::<Result<u16>>();
    let job_dir = args
        .token
        .parent()
        .unwrap_or(std::path::Path::new("."))
        .to_owned();
    let trainer_cfg = TrainerConfig {
        export_dir: args.train_config.as_ref().map(|_| {
            args.export_dir
                .clone()
                .unwrap_or_else(|| job_dir.join("generator"))
        }),
        host: args.host.clone(),
        collective_timeout,
        final_state: args.final_state.clone(),
        metrics: Some(metrics),
        checkpoint_root: args
            .checkpoint_dir
            .clone()
            .unwrap_or_else(|| job_dir.join("checkpoints")),
        progress_total: None,
        step_log: args
            .step_log
            .clone()
            .map(|path| super::trainer::StepLogConfig { path, every: 1 }),
    };
    let gpu_metrics = trainer_cfg.metrics.clone();
    let seed = args.seed;
    let lr = args.lr;
    let train_config = args.train_config.clone();
    let device = args.device.clone();
    let training = std::thread::Builder::new()
        .name("training".into())
        .spawn(move || -> Result<()> {
            match train_config {
                Some(path) => {
                    let model = GeneratorTrainable::from_config_file(
                        &path,
                        &super::generator_trainable::ConfigOverrides {
                            device: device.clone(),
                            precision: None,
                        },
                    );
                    match model {
                        Ok(model) => {
                            info!(config = %path.display(), samples = model.dataset_len(), "training the generator");
                            // GPU memory and utilisation for /metrics while training on a GPU.
                            let _gpu = gpu_metrics.as_ref().and_then(|m| {
                                crate::metrics::GpuSampler::for_device(m, model.device())
                            });
                            run_training(trainer_cfg, model, event_tx, &port_tx, command_rx)
                        }
                        Err(e) => {
                            let _ignored = port_tx.send(Err(anyhow::anyhow!("{e:#}")));
                            Err(e)
                        }
                    }
                }
                None => run_training(
                    trainer_cfg,
                    SyntheticMlp::new(seed, lr),
                    event_tx,
                    &port_tx,
                    command_rx,
                ),
            }
        })
        .context("spawning the training thread")?;
    let store_port = port_rx
        .recv()
        .context("the training thread ended before hosting its store")??;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    let store = StoreEndpoint {
        host: args.host.clone(),
        port: store_port,
    };
    let ended = runtime.block_on(agent(
        &args,
        worker_id,
        store,
        connect_timeout,
        command_tx,
        event_rx,
    ))?;
    match ended {
        Ended::Finished => match training.join() {
            Ok(result) => result,
            Err(_) => bail!("the training thread panicked"),
        },
        // The training thread may still be inside libtorch or gloo (a collective, an optimizer
        // step): a normal exit would run libtorch's static destructors under it (a SIGSEGV at
        // exit was seen in CI). Everything that must survive is already written and synced (a
        // just-in-time checkpoint is reported only once on disk), so leave without destructors.
        Ended::Terminated => {
            use std::io::Write;
            let _ignored = std::io::stdout().flush();
            let _ignored = std::io::stderr().flush();
            crate::collective::exit_without_destructors(0)
        }
    }
}

/// Hosts the store, reports its port (or the error) to the agent, then obeys commands.
fn run_training<T: Trainable>(
    cfg: TrainerConfig,
    model: T,
    events: tokio::sync::mpsc::UnboundedSender<Event>,
    port_tx: &mpsc::Sender<Result<u16>>,
    commands: mpsc::Receiver<Command>,
) -> Result<()> {
    let trainer = match Trainer::new(cfg, model, events) {
        Ok(t) => t,
        Err(e) => {
            let _ignored = port_tx.send(Err(anyhow::anyhow!("{e:#}")));
            return Err(e);
        }
    };
    let _ignored = port_tx.send(Ok(trainer.store_port()));
    trainer.run(commands)
}

enum Ended {
    Finished,
    Terminated,
}

enum SessionEnd {
    Finished,
    Lost,
    Terminated,
}

/// Connects with the one retrying connector, re-reading the credentials on every attempt (the
/// coordinator may not have written them yet); `None` on SIGTERM while connecting.
async fn connect_with_retry(
    args: &WorkerArgs,
    worker_id: &WorkerId,
    store: &StoreEndpoint,
    timeout: Duration,
    sigterm: &mut tokio::signal::unix::Signal,
) -> Result<Option<Client>> {
    let config = || {
        let credentials =
            load_credentials(args).map_err(|e| ClientError::Credentials(format!("{e:#}")))?;
        Ok(
            ClientConfig::new(args.coordinator.clone(), credentials, worker_id.clone())
                .with_store(store.clone())
                .with_device(format!("cpu x{}", tch::get_num_threads())),
        )
    };
    tokio::select! {
        connected = Client::connect_with_retry_from(config, timeout) => match connected {
            Ok(client) => Ok(Some(client)),
            Err(ClientError::Refused(reason)) => bail!(
                "the coordinator at {} refused this worker: {reason}",
                args.coordinator
            ),
            Err(e) => Err(e).with_context(|| {
                format!(
                    "cannot reach the coordinator at {} within --connect-timeout {timeout:?}",
                    args.coordinator
                )
            }),
        },
        _ = sigterm.recv() => Ok(None),
    }
}

async fn agent(
    args: &WorkerArgs,
    worker_id: WorkerId,
    store: StoreEndpoint,
    connect_timeout: Duration,
    commands: mpsc::Sender<Command>,
    mut events: UnboundedReceiver<Event>,
) -> Result<Ended> {
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("listening for SIGTERM")?;
    let mut status = HeartbeatStatus {
        generation: Generation(0),
        phase: WorkerPhase::Joining,
        step: 0,
    };
    loop {
        let Some(mut client) =
            connect_with_retry(args, &worker_id, &store, connect_timeout, &mut sigterm).await?
        else {
            info!("SIGTERM while connecting; exiting");
            return Ok(Ended::Terminated);
        };
        status.phase = WorkerPhase::Joining;
        client.set_status(status);
        match session(
            &mut client,
            &commands,
            &mut events,
            &mut sigterm,
            &mut status,
        )
        .await?
        {
            SessionEnd::Finished => {
                client.close().await;
                return Ok(Ended::Finished);
            }
            SessionEnd::Terminated => {
                info!(generation = %status.generation, "SIGTERM: leaving the job");
                leave(client, status.generation, &commands, &mut events).await;
                return Ok(Ended::Terminated);
            }
            SessionEnd::Lost => {
                warn!(reason = ?client.close_reason(), "lost the coordinator; reconnecting");
                drop(client);
            }
        }
    }
}

/// Says `Leaving` and keeps the session until the coordinator lets go (closes it), for at most
/// [`JIT_CHECKPOINT_TIMEOUT`]: when this worker was the last holder of the training state, the
/// coordinator first orders a just-in-time checkpoint, which the training thread writes and
/// syncs before it is reported. Commits and aborts still in flight go to the training thread so
/// that its state is the committed one; votes of the abandoned step are not sent.
async fn leave(
    mut client: Client,
    generation: Generation,
    commands: &mpsc::Sender<Command>,
    events: &mut UnboundedReceiver<Event>,
) {
    let leaving = WorkerToCoordinator::Leaving {
        generation,
        reason: "SIGTERM".into(),
    };
    if let Err(e) = client.send(&leaving).await {
        warn!(cause = %e, "could not say goodbye to the coordinator");
        client.close().await;
        return;
    }
    let deadline = tokio::time::Instant::now() + JIT_CHECKPOINT_TIMEOUT;
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(deadline) => {
                warn!(timeout = ?JIT_CHECKPOINT_TIMEOUT, "the coordinator did not let this worker go within JIT_CHECKPOINT_TIMEOUT; leaving anyway");
                break;
            }
            msg = client.recv() => {
                let command = match msg {
                    None | Some(CoordinatorToWorker::Finished { .. }) => break,
                    Some(CoordinatorToWorker::CheckpointNow { generation, steps, name }) => {
                        info!(%generation, steps, %name, "just-in-time checkpoint ordered");
                        Command::CheckpointNow { generation, steps, name }
                    }
                    Some(CoordinatorToWorker::Commit { generation, step, checkpoint }) => {
                        Command::Commit { generation, step, checkpoint }
                    }
                    Some(CoordinatorToWorker::Abort { generation, step, .. }) => {
                        Command::Abort { generation, step }
                    }
                    Some(other) => {
                        tracing::debug!(kind = other.kind(), "ignored while leaving");
                        continue;
                    }
                };
                if forward(commands, command).is_err() {
                    warn!("the training thread stopped while leaving");
                    break;
                }
            }
            event = events.recv() => match event {
                None => break,
                Some(Event::CheckpointWritten { generation, steps, files }) => {
                    let written = WorkerToCoordinator::CheckpointWritten { generation, step: steps, files };
                    if client.send(&written).await.is_err() {
                        warn!(steps, "could not report the checkpoint; the coordinator is gone");
                        break;
                    }
                }
                Some(Event::CheckpointFailed { reason }) => {
                    warn!(%reason, "just-in-time checkpoint not written");
                    break;
                }
                Some(_) => {}
            },
        }
    }
    client.close().await;
}

fn forward(commands: &mpsc::Sender<Command>, command: Command) -> Result<()> {
    commands
        .send(command)
        .map_err(|_| anyhow::anyhow!("the training thread stopped (see its error above)"))
}

async fn session(
    client: &mut Client,
    commands: &mpsc::Sender<Command>,
    events: &mut UnboundedReceiver<Event>,
    sigterm: &mut tokio::signal::unix::Signal,
    status: &mut HeartbeatStatus,
) -> Result<SessionEnd> {
    loop {
        tokio::select! {
            msg = client.recv() => {
                let Some(msg) = msg else { return Ok(SessionEnd::Lost) };
                match msg {
                    CoordinatorToWorker::Welcome { generation, rank, world_size, rendezvous, resume } => {
                        info!(%generation, rank, world_size, step = resume.step, "welcome");
                        *status = HeartbeatStatus { generation, phase: WorkerPhase::Syncing, step: resume.step };
                        client.set_status(*status);
                        forward(commands, Command::Join { generation, rank, world_size, rendezvous, resume })?;
                    }
                    CoordinatorToWorker::Assign(assignment) => forward(commands, Command::Step(assignment))?,
                    CoordinatorToWorker::Commit { generation, step, checkpoint } => {
                        forward(commands, Command::Commit { generation, step, checkpoint })?;
                    }
                    CoordinatorToWorker::Abort { generation, step, reason } => {
                        info!(%generation, step, ?reason, "step aborted");
                        forward(commands, Command::Abort { generation, step })?;
                    }
                    CoordinatorToWorker::Paused { reason } => info!(%reason, "paused"),
                    CoordinatorToWorker::Finished { reason } => {
                        info!(%reason, "job finished");
                        forward(commands, Command::Finish)?;
                        let wait = async {
                            while let Some(event) = events.recv().await {
                                if matches!(event, Event::Finished) {
                                    return true;
                                }
                            }
                            false
                        };
                        match tokio::time::timeout(FINISH_TIMEOUT, wait).await {
                            Ok(true) => return Ok(SessionEnd::Finished),
                            Ok(false) => bail!("the training thread stopped before finishing"),
                            Err(_) => bail!("the training thread did not finish within {FINISH_TIMEOUT:?}"),
                        }
                    }
                    other => tracing::debug!(kind = other.kind(), "ignored message"),
                }
            }
            event = events.recv() => {
                let Some(event) = event else {
                    bail!("the training thread stopped (see its error above)");
                };
                match event {
                    Event::GroupReady { generation } => {
                        status.phase = WorkerPhase::Training;
                        client.set_status(*status);
                        if client.send(&WorkerToCoordinator::GroupReady { generation }).await.is_err() { return Ok(SessionEnd::Lost); }
                    }
                    Event::Vote { generation, step, outcome, .. } => {
                        if client.send(&WorkerToCoordinator::Vote { generation, step, outcome }).await.is_err() { return Ok(SessionEnd::Lost); }
                    }
                    Event::Applied { step } => {
                        status.step = step + 1;
                        client.set_status(*status);
                        if step % 10 == 0 {
                            info!(step, "step applied");
                        }
                    }
                    Event::CheckpointWritten { generation, steps, files } => {
                        if client.send(&WorkerToCoordinator::CheckpointWritten { generation, step: steps, files }).await.is_err() { return Ok(SessionEnd::Lost); }
                    }
                    Event::CheckpointFailed { reason } => warn!(%reason, "checkpoint not written"),
                    Event::Finished => return Ok(SessionEnd::Finished),
                }
            }
            _ = sigterm.recv() => {
                status.phase = WorkerPhase::Draining;
                return Ok(SessionEnd::Terminated);
            }
        }
    }
}
