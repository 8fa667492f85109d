//! The worker's side of the control plane, without libtorch: connect with the job token and the
//! pinned certificate fingerprint, send and receive control messages, heartbeat on a stream of
//! its own, and answer liveness probes without bothering the training loop.
//!
//! ```no_run
//! # async fn demo(cfg: eqim_common::client::ClientConfig) -> Result<(), eqim_common::client::ClientError> {
//! use eqim_common::proto::CoordinatorToWorker;
//! let mut client = eqim_common::client::Client::connect(cfg).await?;
//! while let Some(msg) = client.recv().await {
//!     match msg {
//!         CoordinatorToWorker::Welcome { .. } => { /* build the group, then send GroupReady */ }
//!         CoordinatorToWorker::Assign(_) => { /* compute, all-reduce, then send Vote */ }
//!         CoordinatorToWorker::Finished { .. } => break,
//!         _ => {}
//!     }
//! }
//! # Ok(()) }
//! ```

use crate::config::{
    DEFAULT_HANDSHAKE_TIMEOUT, DEFAULT_HEARTBEAT_INTERVAL, DEFAULT_QUIC_IDLE_TIMEOUT,
};
use crate::framing::{read_message, write_message, FrameError};
use crate::net::close_code;
use crate::net::credentials::{ClientCredentials, SERVER_NAME};
use crate::net::tls::{channel_binding, client_config, TlsError, TransportTimeouts};
use crate::proto::{
    join_proof, CoordinatorToWorker, Generation, Hello, Refusal, StoreEndpoint, WorkerId,
    WorkerPhase, WorkerToCoordinator, PROTOCOL_VERSION,
};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch, Mutex};
use tokio::task::JoinHandle;
use tracing::{debug, info};

/// Messages buffered between the reader task and [`Client::recv`].
const INBOX_CAPACITY: usize = 256;
const RETRY_BACKOFF_START: Duration = Duration::from_millis(100);
const RETRY_BACKOFF_MAX: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot resolve coordinator address {addr}: {message}")]
    Resolve { addr: String, message: String },
    #[error("{0}")]
    Tls(#[from] TlsError),
    #[error("cannot open a local UDP socket: {0}")]
    Endpoint(std::io::Error),
    #[error("cannot connect to the coordinator: {0}")]
    Connect(#[from] quinn::ConnectError),
    #[error("connection to the coordinator failed: {0}")]
    Connection(#[from] quinn::ConnectionError),
    #[error("control stream: {0}")]
    Frame(#[from] FrameError),
    #[error("the coordinator refused this worker: {0}")]
    Refused(Refusal),
    #[error("no answer from the coordinator within {0:?}")]
    Timeout(Duration),
    #[error("the coordinator closed the connection during the handshake")]
    ClosedDuringHandshake,
    #[error("expected admitted or refused, got {0}")]
    Unexpected(&'static str),
    /// The job's token or certificate fingerprint could not be read (yet): a coordinator that is
    /// still starting may not have written them.
    #[error("job credentials: {0}")]
    Credentials(String),
}

impl ClientError {
    /// Whether trying again later can succeed (the coordinator may be starting or restarting).
    pub fn is_retryable(&self) -> bool {
        match self {
            ClientError::Resolve { .. }
            | ClientError::Timeout(_)
            | ClientError::ClosedDuringHandshake
            | ClientError::Frame(_)
            | ClientError::Credentials(_)
            | ClientError::Refused(Refusal::JobFull { .. }) => true,
            ClientError::Connection(e) => !matches!(
                e,
                quinn::ConnectionError::TransportError(_) | quinn::ConnectionError::VersionMismatch
            ),
            ClientError::Connect(_)
            | ClientError::Tls(_)
            | ClientError::Endpoint(_)
            | ClientError::Refused(_)
            | ClientError::Unexpected(_) => false,
        }
    }
}

/// How to reach and authenticate with the coordinator.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// `HOST:PORT` of the coordinator.
    pub coordinator: String,
    pub credentials: ClientCredentials,
    pub worker_id: WorkerId,
    /// The TCPStore this worker serves when it is rank 0.
    pub store: StoreEndpoint,
    /// Free text for the coordinator's logs.
    pub device: String,
    pub heartbeat_interval: Duration,
    pub quic_idle_timeout: Duration,
    pub handshake_timeout: Duration,
    /// Always [`PROTOCOL_VERSION`] except in tests of the version check.
    pub protocol_version: u32,
}

impl ClientConfig {
    pub fn new(
        coordinator: impl Into<String>,
        credentials: ClientCredentials,
        worker_id: WorkerId,
    ) -> Self {
        Self {
            coordinator: coordinator.into(),
            credentials,
            worker_id,
            store: StoreEndpoint {
                host: String::new(),
                port: 0,
            },
            device: String::new(),
            heartbeat_interval: DEFAULT_HEARTBEAT_INTERVAL,
            quic_idle_timeout: DEFAULT_QUIC_IDLE_TIMEOUT,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            protocol_version: PROTOCOL_VERSION,
        }
    }

    pub fn with_store(mut self, store: StoreEndpoint) -> Self {
        self.store = store;
        self
    }

    pub fn with_device(mut self, device: impl Into<String>) -> Self {
        self.device = device.into();
        self
    }

    /// Use the coordinator's heartbeat interval and idle timeout (the same config file).
    pub fn with_timeouts(
        mut self,
        heartbeat_interval: Duration,
        quic_idle_timeout: Duration,
    ) -> Self {
        self.heartbeat_interval = heartbeat_interval;
        self.quic_idle_timeout = quic_idle_timeout;
        self
    }

    #[doc(hidden)]
    pub fn with_protocol_version(mut self, version: u32) -> Self {
        self.protocol_version = version;
        self
    }
}

/// Opens an authenticated QUIC connection (certificate pinned) without any eqim handshake.
/// [`Client::connect`] builds on it; tools and tests use it to speak raw frames.
pub async fn connect_quic(
    cfg: &ClientConfig,
) -> Result<(quinn::Endpoint, quinn::Connection), ClientError> {
    let addr = resolve(&cfg.coordinator).await?;
    let bind: SocketAddr = if addr.is_ipv6() {
        "[::]:0".parse().expect("literal address")
    } else {
        "0.0.0.0:0".parse().expect("literal address")
    };
    let mut endpoint = quinn::Endpoint::client(bind).map_err(ClientError::Endpoint)?;
    endpoint.set_default_client_config(client_config(
        cfg.credentials.cert_sha256,
        &TransportTimeouts {
            keep_alive_interval: cfg.heartbeat_interval,
            idle_timeout: cfg.quic_idle_timeout,
        },
    )?);
    let connecting = endpoint.connect(addr, SERVER_NAME)?;
    let connection = tokio::time::timeout(cfg.handshake_timeout, connecting)
        .await
        .map_err(|_| ClientError::Timeout(cfg.handshake_timeout))??;
    Ok((endpoint, connection))
}

async fn resolve(addr: &str) -> Result<SocketAddr, ClientError> {
    let err = |message: String| ClientError::Resolve {
        addr: addr.to_owned(),
        message,
    };
    tokio::net::lookup_host(addr)
        .await
        .map_err(|e| err(e.to_string()))?
        .next()
        .ok_or_else(|| err("no address found".into()))
}

/// What heartbeats report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeartbeatStatus {
    pub generation: Generation,
    pub phase: WorkerPhase,
    pub step: u64,
}

/// Sends control messages; cheap to clone and usable from any task.
#[derive(Clone)]
pub struct ControlSender {
    send: Arc<Mutex<quinn::SendStream>>,
}

impl ControlSender {
    pub async fn send(&self, msg: &WorkerToCoordinator) -> Result<(), ClientError> {
        let mut send = self.send.lock().await;
        write_message(&mut *send, msg).await?;
        Ok(())
    }
}

/// A connected, admitted worker.
pub struct Client {
    endpoint: quinn::Endpoint,
    connection: quinn::Connection,
    sender: ControlSender,
    inbox: mpsc::Receiver<CoordinatorToWorker>,
    status: watch::Sender<HeartbeatStatus>,
    heartbeat: JoinHandle<()>,
    reader: JoinHandle<()>,
}

impl Client {
    /// Connects, says hello and waits for the coordinator's answer; then starts the heartbeat
    /// and reader tasks.
    pub async fn connect(cfg: ClientConfig) -> Result<Client, ClientError> {
        let (endpoint, connection) = connect_quic(&cfg).await?;
        let (mut send, mut recv) = connection.open_bi().await?;
        let hello = WorkerToCoordinator::Hello(Hello {
            protocol_version: cfg.protocol_version,
            worker_id: cfg.worker_id.clone(),
            token_proof: join_proof(
                &cfg.credentials.token,
                &cfg.credentials.cert_sha256,
                &channel_binding(&connection)?,
            ),
            store: cfg.store.clone(),
            device: cfg.device.clone(),
        });
        write_message(&mut send, &hello).await?;
        let answer = tokio::time::timeout(cfg.handshake_timeout, read_message(&mut recv))
            .await
            .map_err(|_| ClientError::Timeout(cfg.handshake_timeout))?;
        let heartbeat_interval = match answer {
            // Heartbeat at the coordinator's pace: its timeout is what counts.
            Ok(Some(CoordinatorToWorker::Admitted {
                heartbeat_interval_ms,
            })) if heartbeat_interval_ms > 0 => Duration::from_millis(heartbeat_interval_ms),
            Ok(Some(CoordinatorToWorker::Admitted { .. })) => cfg.heartbeat_interval,
            Ok(Some(CoordinatorToWorker::Refused { reason })) => {
                connection.close(close_code::REFUSED.into(), b"refused");
                return Err(ClientError::Refused(reason));
            }
            Ok(Some(other)) => return Err(ClientError::Unexpected(other.kind())),
            Ok(None) => return Err(ClientError::ClosedDuringHandshake),
            // A refusal may close the connection right behind its message.
            Err(e) => return Err(e.into()),
        };
        info!(worker_id = %cfg.worker_id, coordinator = %cfg.coordinator, "admitted");
        let sender = ControlSender {
            send: Arc::new(Mutex::new(send)),
        };
        let (status, status_rx) = watch::channel(HeartbeatStatus {
            generation: Generation(0),
            phase: WorkerPhase::Joining,
            step: 0,
        });
        let heartbeat = tokio::spawn(heartbeat_loop(
            connection.clone(),
            status_rx,
            heartbeat_interval,
        ));
        let (inbox_tx, inbox) = mpsc::channel(INBOX_CAPACITY);
        let reader = tokio::spawn(read_loop(recv, sender.clone(), inbox_tx));
        Ok(Client {
            endpoint,
            connection,
            sender,
            inbox,
            status,
            heartbeat,
            reader,
        })
    }

    /// Connects like [`Client::connect`], retrying with exponential backoff (100 ms to 2 s)
    /// while the coordinator is not up yet or unreachable, for at most `patience`. Refusals for
    /// a wrong token or version, a finished job and a certificate mismatch are final.
    pub async fn connect_with_retry(
        cfg: ClientConfig,
        patience: Duration,
    ) -> Result<Client, ClientError> {
        Self::connect_with_retry_from(|| Ok(cfg.clone()), patience).await
    }

    /// [`Client::connect_with_retry`] with the configuration made anew before every attempt by
    /// `config` (it re-reads credentials that may not exist yet; its errors are retried). The one
    /// connector of every client: cancel it by dropping the future (e.g. on SIGTERM). The
    /// deadline holds within an attempt too (a handshake in flight is cut at `patience`);
    /// `Duration::MAX` never gives up.
    pub async fn connect_with_retry_from(
        mut config: impl FnMut() -> Result<ClientConfig, ClientError>,
        patience: Duration,
    ) -> Result<Client, ClientError> {
        let started = tokio::time::Instant::now();
        let deadline = started.checked_add(patience);
        let mut backoff = RETRY_BACKOFF_START;
        loop {
            let attempt = match config() {
                Ok(cfg) => match deadline {
                    Some(deadline) => tokio::time::timeout_at(deadline, Client::connect(cfg))
                        .await
                        .unwrap_or(Err(ClientError::Timeout(patience))),
                    None => Client::connect(cfg).await,
                },
                Err(e) => Err(e),
            };
            match attempt {
                Ok(client) => return Ok(client),
                Err(e)
                    if e.is_retryable() && started.elapsed().saturating_add(backoff) < patience =>
                {
                    info!(cause = %e, retry_in = ?backoff, "coordinator not reachable yet");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(RETRY_BACKOFF_MAX);
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Next message from the coordinator; `None` once the connection ended (see
    /// [`Client::close_reason`]).
    pub async fn recv(&mut self) -> Option<CoordinatorToWorker> {
        self.inbox.recv().await
    }

    pub async fn send(&self, msg: &WorkerToCoordinator) -> Result<(), ClientError> {
        self.sender.send(msg).await
    }

    /// Hands the coordinator's messages to a reader of the caller's (an actor's pump task);
    /// afterwards [`Client::recv`] returns `None` at once. The channel ends with the connection.
    pub fn take_inbox(&mut self) -> mpsc::Receiver<CoordinatorToWorker> {
        let (_closed, empty) = mpsc::channel(1);
        std::mem::replace(&mut self.inbox, empty)
    }

    pub fn sender(&self) -> ControlSender {
        self.sender.clone()
    }

    /// What the next heartbeats report.
    pub fn set_status(&self, status: HeartbeatStatus) {
        self.status.send_replace(status);
    }

    /// Stops heartbeating while keeping the connection open (tests of the heartbeat timeout).
    pub fn stop_heartbeats(&self) {
        self.heartbeat.abort();
    }

    /// Why the connection ended, if it did.
    pub fn close_reason(&self) -> Option<quinn::ConnectionError> {
        self.connection.close_reason()
    }

    /// Says goodbye (`Leaving`), closes the connection and waits briefly for it to be sent.
    pub async fn leave(self, generation: Generation, reason: &str) -> Result<(), ClientError> {
        let msg = WorkerToCoordinator::Leaving {
            generation,
            reason: reason.to_owned(),
        };
        let sent = self.sender.send(&msg).await;
        self.close().await;
        sent
    }

    /// Closes the connection.
    pub async fn close(self) {
        self.heartbeat.abort();
        self.reader.abort();
        {
            let mut send = self.sender.send.lock().await;
            if let Err(e) = send.finish() {
                debug!(cause = %e, "control stream already closed");
            }
        }
        // Wait for the coordinator to see the stream's end before closing the connection,
        // bounded so a dead coordinator does not hold us.
        if tokio::time::timeout(Duration::from_millis(200), self.connection.closed())
            .await
            .is_err()
        {
            self.connection
                .close(close_code::LEFT.into(), b"worker closed");
        }
        self.endpoint
            .close(close_code::LEFT.into(), b"worker closed");
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.heartbeat.abort();
        self.reader.abort();
    }
}

async fn heartbeat_loop(
    connection: quinn::Connection,
    status: watch::Receiver<HeartbeatStatus>,
    interval: Duration,
) {
    let mut send = match connection.open_uni().await {
        Ok(send) => send,
        Err(e) => {
            debug!(cause = %e, "cannot open the heartbeat stream");
            return;
        }
    };
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let s = *status.borrow();
        let beat = WorkerToCoordinator::Heartbeat {
            generation: s.generation,
            phase: s.phase,
            step: s.step,
        };
        if let Err(e) = write_message(&mut send, &beat).await {
            debug!(cause = %e, "heartbeat stream ended");
            return;
        }
    }
}

async fn read_loop(
    mut recv: quinn::RecvStream,
    sender: ControlSender,
    inbox: mpsc::Sender<CoordinatorToWorker>,
) {
    loop {
        let msg = match read_message::<_, CoordinatorToWorker>(&mut recv).await {
            Ok(Some(msg)) => msg,
            Ok(None) => {
                debug!("coordinator closed the control stream");
                return;
            }
            Err(e) => {
                debug!(cause = %e, "control stream ended");
                return;
            }
        };
        if let CoordinatorToWorker::Probe { nonce } = msg {
            if let Err(e) = sender.send(&WorkerToCoordinator::ProbeAck { nonce }).await {
                debug!(cause = %e, "cannot answer a probe");
                return;
            }
            continue;
        }
        if inbox.send(msg).await.is_err() {
            return;
        }
    }
}
