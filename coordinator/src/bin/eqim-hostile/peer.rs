//! Raw control-plane peers for `eqim-hostile`: an authenticated connection that speaks frames by
//! hand, a heartbeat pump, the legitimate join and the `/metrics` scrape that each attack runs
//! meanwhile, and how a connection ended.

use anyhow::{bail, Context, Result};
use eqim_common::client::{connect_quic, Client, ClientConfig};
use eqim_common::framing::{read_message, write_message};
use eqim_common::net::tls::channel_binding;
use eqim_common::proto::{
    join_proof, CoordinatorToWorker, Generation, Hello, WorkerId, WorkerPhase, WorkerToCoordinator,
    PROTOCOL_VERSION,
};
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// How long a "meanwhile" check may take before it counts as failed.
const CHECK_TIMEOUT: Duration = Duration::from_secs(5);
pub const HEARTBEAT_PERIOD: Duration = Duration::from_millis(200);

/// An open QUIC connection with its control stream, not yet past the eqim handshake.
pub struct RawPeer {
    /// Kept so the connection's socket lives as long as the peer.
    _endpoint: quinn::Endpoint,
    pub connection: quinn::Connection,
    pub send: quinn::SendStream,
    pub recv: quinn::RecvStream,
}

impl RawPeer {
    pub async fn connect(cfg: &ClientConfig) -> Result<Self> {
        let (endpoint, connection) = connect_quic(cfg).await.context("QUIC connect")?;
        let (send, recv) = connection
            .open_bi()
            .await
            .context("opening the control stream")?;
        Ok(Self {
            _endpoint: endpoint,
            connection,
            send,
            recv,
        })
    }

    /// The proof this connection would send: bound to it by the TLS exporter.
    pub fn proof(&self, cfg: &ClientConfig) -> Result<[u8; 32]> {
        let binding = channel_binding(&self.connection)?;
        Ok(join_proof(
            &cfg.credentials.token,
            &cfg.credentials.cert_sha256,
            &binding,
        ))
    }

    /// Sends a `Hello` with `proof` and returns the coordinator's answer.
    pub async fn hello(
        &mut self,
        id: &str,
        proof: [u8; 32],
    ) -> Result<Option<CoordinatorToWorker>> {
        let hello = WorkerToCoordinator::Hello(Hello {
            protocol_version: PROTOCOL_VERSION,
            worker_id: WorkerId::from(id),
            token_proof: proof,
            store: eqim_common::proto::StoreEndpoint {
                host: "127.0.0.1".into(),
                port: 1,
            },
            device: "hostile".into(),
        });
        write_message(&mut self.send, &hello).await?;
        match tokio::time::timeout(CHECK_TIMEOUT, read_message(&mut self.recv)).await {
            Ok(Ok(answer)) => Ok(answer),
            Ok(Err(e)) => Err(e.into()),
            Err(_) => bail!("no answer to hello within {CHECK_TIMEOUT:?}"),
        }
    }

    /// Connects and authenticates properly; the peer is then a member.
    pub async fn admitted(cfg: &ClientConfig, id: &str) -> Result<Self> {
        let mut peer = Self::connect(cfg).await?;
        let proof = peer.proof(cfg)?;
        match peer.hello(id, proof).await? {
            Some(CoordinatorToWorker::Admitted { .. }) => Ok(peer),
            other => bail!("expected admitted, got {other:?}"),
        }
    }
}

/// Heartbeats on a stream of their own until aborted, so the peer is not declared dead.
pub fn heartbeats(connection: quinn::Connection) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let Ok(mut send) = connection.open_uni().await else {
            return;
        };
        loop {
            let beat = WorkerToCoordinator::Heartbeat {
                generation: Generation(0),
                phase: WorkerPhase::Joining,
                step: 0,
            };
            if write_message(&mut send, &beat).await.is_err() {
                return;
            }
            tokio::time::sleep(HEARTBEAT_PERIOD).await;
        }
    })
}

/// Waits up to `limit` for the connection to end; returns how (one word, for the report), and
/// when.
pub async fn ended(connection: &quinn::Connection, limit: Duration) -> (String, Option<Duration>) {
    let started = Instant::now();
    let how = match tokio::time::timeout(limit, connection.closed()).await {
        Ok(quinn::ConnectionError::ApplicationClosed(close)) => format!(
            "closed(code={},reason={})",
            close.error_code,
            String::from_utf8_lossy(&close.reason)
        ),
        Ok(other) => format!("ended({other})"),
        Err(_) => return ("open".into(), None),
    };
    (one_word(&how), Some(started.elapsed()))
}

/// `text` with its whitespace turned into underscores, so a report line splits on spaces.
pub fn one_word(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join("_")
}

/// What a legitimate worker and a Prometheus scrape saw while an attack ran.
pub struct Meanwhile {
    pub join: Result<Duration>,
    pub metrics: Option<bool>,
}

impl Meanwhile {
    pub async fn check(cfg: &ClientConfig, id: &str, metrics: Option<SocketAddr>) -> Self {
        let join = legit_join(cfg, id).await;
        let metrics = match metrics {
            Some(addr) => Some(scrape(addr).await.is_ok()),
            None => None,
        };
        Self { join, metrics }
    }

    pub fn fields(&self) -> String {
        let join = match &self.join {
            Ok(took) => format!("join=admitted join_ms={:.1}", took.as_secs_f64() * 1e3),
            Err(e) => format!("join=failed join_error={}", one_word(&format!("{e:#}"))),
        };
        let metrics = match self.metrics {
            Some(true) => "metrics=ok",
            Some(false) => "metrics=failed",
            None => "metrics=not_asked",
        };
        format!("{join} {metrics}")
    }
}

/// Time from the first packet to `Admitted` of a normal client, which then leaves.
async fn legit_join(cfg: &ClientConfig, id: &str) -> Result<Duration> {
    let cfg = ClientConfig {
        worker_id: WorkerId::from(id),
        ..cfg.clone()
    };
    let started = Instant::now();
    let client = tokio::time::timeout(CHECK_TIMEOUT, Client::connect(cfg))
        .await
        .context("no admission within 5 s")??;
    let took = started.elapsed();
    client.close().await;
    Ok(took)
}

/// `GET /metrics` over HTTP/1.0; succeeds on a 200 with a body.
async fn scrape(addr: SocketAddr) -> Result<()> {
    let fetch = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        stream
            .write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
            .await?;
        let mut body = Vec::new();
        stream.take(4 << 20).read_to_end(&mut body).await?;
        Ok::<_, std::io::Error>(body)
    };
    let body = tokio::time::timeout(CHECK_TIMEOUT, fetch)
        .await
        .context("no /metrics answer within 5 s")??;
    if !body.starts_with(b"HTTP/1.1 200") && !body.starts_with(b"HTTP/1.0 200") {
        bail!(
            "/metrics answered {:?}",
            String::from_utf8_lossy(&body[..body.len().min(40)])
        );
    }
    Ok(())
}
