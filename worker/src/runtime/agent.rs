//! `eqim worker`: a worker process. It starts the dedicated training thread (every blocking tch
//! and c10d call), then runs the agent actor ([`super::agent_actor::WorkerAgent`]) that speaks
//! the QUIC control plane and orders the thread. Workers may start before the coordinator:
//! connecting is retried with backoff until the connect timeout, and a lost coordinator is
//! reconnected to under the same bound.

use super::agent_actor::{AgentArgs, Ended, WorkerAgent};
use super::generator_trainable::GeneratorTrainable;
use super::trainable::{SyntheticMlp, Trainable};
use super::trainer::{Command, Event, Trainer, TrainerConfig};
use anyhow::{bail, Context, Result};
use eqim_common::client::{ClientConfig, ClientError};
use eqim_common::net::credentials::{parse_fingerprint, ClientCredentials};
use eqim_common::proto::{StoreEndpoint, WorkerId};
use std::path::PathBuf;
use std::sync::mpsc;
use std::time::Duration;
use tracing::info;

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

/// What a worker process is run with (`eqim worker`'s flags, resolved).
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// `HOST:PORT` of the coordinator's control plane.
    pub coordinator: String,
    /// The job's token file; its directory is the job directory.
    pub token: PathBuf,
    /// The coordinator certificate's SHA-256 (hex), else read next to the token.
    pub fingerprint: Option<String>,
    pub worker_id: WorkerId,
    /// This machine's address for the TCPStore and gloo.
    pub host: String,
    /// gloo's interface, when not the one of `host`.
    pub gloo_interface: Option<String>,
    pub connect_timeout: Duration,
    /// After the first admission; `None`: never give up.
    pub give_up_after: Option<Duration>,
    pub collective_timeout: Duration,
    pub checkpoint_dir: Option<PathBuf>,
    pub final_state: Option<PathBuf>,
    pub metrics_addr: Option<std::net::SocketAddr>,
    pub threads: Option<i32>,
    /// Seed and learning rate of the synthetic model.
    pub seed: i64,
    pub lr: f64,
    /// The generator's training config; the synthetic model without one.
    pub train_config: Option<PathBuf>,
    pub device: Option<String>,
    pub export_dir: Option<PathBuf>,
    pub step_log: Option<PathBuf>,
}

impl AgentConfig {
    fn job_dir(&self) -> PathBuf {
        self.token
            .parent()
            .unwrap_or(std::path::Path::new("."))
            .to_owned()
    }

    fn trainer_config(
        &self,
        metrics: eqim_common::metrics_registry::WorkerMetrics,
    ) -> TrainerConfig {
        let job_dir = self.job_dir();
        TrainerConfig {
            export_dir: self.train_config.as_ref().map(|_| {
                self.export_dir
                    .clone()
                    .unwrap_or_else(|| job_dir.join("generator"))
            }),
            host: self.host.clone(),
            collective_timeout: self.collective_timeout,
            final_state: self.final_state.clone(),
            metrics: Some(metrics),
            checkpoint_root: self
                .checkpoint_dir
                .clone()
                .unwrap_or_else(|| job_dir.join("checkpoints")),
            progress_total: None,
            step_log: self
                .step_log
                .clone()
                .map(|path| super::trainer::StepLogConfig { path, every: 1 }),
        }
    }

    /// A fresh client config per connection attempt: the token is re-read each time (the
    /// coordinator may not have written it yet).
    fn client_config(&self, store: StoreEndpoint) -> super::agent_actor::ConfigSource {
        let (coordinator, token, fingerprint) = (
            self.coordinator.clone(),
            self.token.clone(),
            self.fingerprint.clone(),
        );
        let worker_id = self.worker_id.clone();
        Box::new(move || {
            let credentials = credentials_from(&token, fingerprint.as_deref())
                .map_err(|e| ClientError::Credentials(format!("{e:#}")))?;
            Ok(
                ClientConfig::new(coordinator.clone(), credentials, worker_id.clone())
                    .with_store(store.clone())
                    .with_device(format!("cpu x{}", tch::get_num_threads())),
            )
        })
    }
}

/// Starts the training thread: the generator of the training config, or the synthetic model.
/// It hosts the store first and reports the port (or its error) on `port_tx`.
fn spawn_training(
    cfg: &AgentConfig,
    trainer_cfg: TrainerConfig,
    events: tokio::sync::mpsc::UnboundedSender<Event>,
    port_tx: mpsc::Sender<Result<u16>>,
    commands: mpsc::Receiver<Command>,
) -> Result<std::thread::JoinHandle<Result<()>>> {
    let (seed, lr) = (cfg.seed, cfg.lr);
    let train_config = cfg.train_config.clone();
    let device = cfg.device.clone();
    let gpu_metrics = trainer_cfg.metrics.clone();
    std::thread::Builder::new()
        .name("training".into())
        .spawn(move || -> Result<()> {
            let Some(path) = train_config else {
                let model = SyntheticMlp::new(seed, lr);
                return run_training(trainer_cfg, model, events, &port_tx, commands);
            };
            let overrides = super::generator_trainable::ConfigOverrides {
                device,
                precision: None,
            };
            match GeneratorTrainable::from_config_file(&path, &overrides) {
                Ok(model) => {
                    info!(config = %path.display(), samples = model.dataset_len(), "training the generator");
                    // GPU memory and utilisation for /metrics while training on a GPU.
                    let _gpu = gpu_metrics.as_ref().and_then(|m| {
                        crate::metrics::GpuSampler::for_device(m, model.device())
                    });
                    run_training(trainer_cfg, model, events, &port_tx, commands)
                }
                Err(e) => {
                    let _ignored = port_tx.send(Err(anyhow::anyhow!("{e:#}")));
                    Err(e)
                }
            }
        })
        .context("spawning the training thread")
}

/// The address this machine's packets to `coordinator` (`HOST:PORT`) leave from: what other
/// workers can reach us at when they can reach the coordinator. A UDP `connect` only asks the
/// kernel for the route; nothing is sent.
pub fn advertised_host(coordinator: &str) -> Result<String> {
    use std::net::ToSocketAddrs;
    let target = coordinator
        .to_socket_addrs()
        .with_context(|| {
            format!(
                "resolving --coordinator {coordinator} (or give this worker's address with --host)"
            )
        })?
        .next()
        .with_context(|| format!("--coordinator {coordinator} resolves to no address"))?;
    let unspecified: std::net::SocketAddr = if target.is_ipv4() {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let socket = std::net::UdpSocket::bind(unspecified).context("opening a UDP socket")?;
    socket.connect(target).with_context(|| {
        format!(
            "no route to the coordinator at {target} (or give this worker's address with --host)"
        )
    })?;
    Ok(socket
        .local_addr()
        .context("reading the route's source address")?
        .ip()
        .to_string())
}

/// Runs a worker until the job finishes, SIGTERM, or the coordinator stays unreachable.
pub fn run(cfg: AgentConfig) -> Result<()> {
    if let Some(name) = &cfg.gloo_interface {
        // gloo reads the interface when a group is created (`GlooDevice::for_host`); set it before
        // any thread starts.
        std::env::set_var("GLOO_SOCKET_IFNAME", name);
    }
    info!(host = %cfg.host, gloo_interface = ?cfg.gloo_interface, "advertising this worker's address to its peers");
    if let Some(threads) = cfg.threads {
        tch::set_num_threads(threads);
    }
    let (metrics, _metrics_server) =
        crate::metrics::worker_metrics(&cfg.worker_id.0, cfg.metrics_addr)?;
    let (event_tx, event_rx) = tokio::sync::mpsc::unbounded_channel();
    let (command_tx, command_rx) = mpsc::channel::<Command>();
    let (port_tx, port_rx) = mpsc::channel::<Result<u16>>();
    let trainer_cfg = cfg.trainer_config(metrics);
    let training = spawn_training(&cfg, trainer_cfg, event_tx, port_tx, command_rx)?;
    let store_port = port_rx
        .recv()
        .context("the training thread ended before hosting its store")??;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    let store = StoreEndpoint {
        host: cfg.host.clone(),
        port: store_port,
    };
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    let args = AgentArgs {
        coordinator: cfg.coordinator.clone(),
        client_config: cfg.client_config(store),
        connect_timeout: cfg.connect_timeout,
        give_up_after: cfg.give_up_after,
        commands: command_tx,
        events: event_rx,
        done: done_tx,
    };
    let ended = runtime.block_on(async {
        let (_agent, handle) = ractor::Actor::spawn(None, WorkerAgent, args)
            .await
            .context("starting the worker agent")?;
        let ended = done_rx
            .await
            .context("the worker agent stopped without a result")?;
        let _ignored = handle.await;
        ended
    })?;
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

#[cfg(test)]
mod tests {
    use super::advertised_host;

    #[test]
    fn the_advertised_host_is_the_route_source_towards_the_coordinator() {
        // Loopback routes from loopback.
        assert_eq!(advertised_host("127.0.0.1:29400").unwrap(), "127.0.0.1");
        let err = advertised_host("no-such-host.invalid:29400").unwrap_err();
        assert!(format!("{err:#}").contains("--host"), "{err:#}");
    }
}
