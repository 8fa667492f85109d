//! The accept loop: every incoming connection gets its own handshake task, which reads `Hello`
//! within the handshake timeout, checks the protocol version and the join proof, and either
//! refuses the connection or hands it to the job actor for admission. A misbehaving client only
//! ever costs its own task.
//!
//! Before a peer is authenticated it gets little: a stateless retry proves its source address,
//! at most [`HandshakeLimits::max_total`] handshakes run at once and at most
//! [`HandshakeLimits::max_per_ip`] from one address (the rest are refused at once), the QUIC
//! windows are the pre-authentication ones of `eqim_common::net::tls`, the `Hello` frame is at
//! most `MAX_HELLO_FRAME_BYTES`, and refusals are logged at most once per
//! [`REFUSAL_LOG_INTERVAL`] with a count of those suppressed.

use crate::job::{AdmittedConnection, PeerMsg};
use eqim_common::framing::{
    read_message_with, write_message, FrameError, FrameLimits, MAX_HELLO_FRAME_BYTES,
};
use eqim_common::net::close_code;
use eqim_common::net::tls::{channel_binding, grant_admitted_limits};
use eqim_common::proto::{
    join_proof, CoordinatorToWorker, Hello, Refusal, WorkerToCoordinator, PROTOCOL_VERSION,
};
use ractor::DerivedActorRef;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tracing::{debug, info, warn, Instrument};

/// Refusals (and failed handshakes) are logged at most this often; the log line says how many
/// were suppressed since the last one.
pub const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// What the handshake needs to know.
pub struct Admission {
    pub token: String,
    pub cert_sha256: [u8; 32],
    pub handshake_timeout: Duration,
}

/// Caps on connections that have not authenticated yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HandshakeLimits {
    /// Handshakes in progress over all addresses.
    pub max_total: usize,
    /// Handshakes in progress from one IP address. Generous, because one host may run many
    /// workers (one per GPU) and they all reconnect together after a coordinator restart.
    pub max_per_ip: usize,
}

impl Default for HandshakeLimits {
    fn default() -> Self {
        Self {
            max_total: 256,
            max_per_ip: 64,
        }
    }
}

/// Counts of handshakes in progress; a [`HandshakeSlot`] holds one until dropped.
#[derive(Debug)]
pub struct HandshakeSlots {
    limits: HandshakeLimits,
    state: Mutex<SlotCounts>,
}

#[derive(Debug, Default)]
struct SlotCounts {
    total: usize,
    per_ip: HashMap<IpAddr, usize>,
}

/// One handshake in progress; dropping it frees the slot.
#[derive(Debug)]
pub struct HandshakeSlot {
    slots: Arc<HandshakeSlots>,
    ip: IpAddr,
}

impl HandshakeSlots {
    pub fn new(limits: HandshakeLimits) -> Arc<Self> {
        Arc::new(Self {
            limits,
            state: Mutex::new(SlotCounts::default()),
        })
    }

    /// A slot for a handshake from `ip`, or the limit that is reached.
    pub fn try_acquire(self: &Arc<Self>, ip: IpAddr) -> Result<HandshakeSlot, &'static str> {
        let mut counts = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if counts.total >= self.limits.max_total {
            return Err("too many handshakes in progress");
        }
        let from_ip = counts.per_ip.entry(ip).or_insert(0);
        if *from_ip >= self.limits.max_per_ip {
            return Err("too many handshakes in progress from this address");
        }
        *from_ip += 1;
        counts.total += 1;
        Ok(HandshakeSlot {
            slots: self.clone(),
            ip,
        })
    }

    /// Handshakes in progress (all addresses, this one).
    pub fn in_progress(&self, ip: IpAddr) -> (usize, usize) {
        let counts = self.state.lock().unwrap_or_else(|e| e.into_inner());
        (counts.total, counts.per_ip.get(&ip).copied().unwrap_or(0))
    }
}

impl Drop for HandshakeSlot {
    fn drop(&mut self) {
        let mut counts = self.slots.state.lock().unwrap_or_else(|e| e.into_inner());
        counts.total = counts.total.saturating_sub(1);
        if let Some(n) = counts.per_ip.get_mut(&self.ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                counts.per_ip.remove(&self.ip);
            }
        }
    }
}

/// At most one log line per interval; counts what it held back.
#[derive(Debug)]
pub struct LogLimiter {
    interval: Duration,
    last: Option<Instant>,
    suppressed: u64,
}

impl LogLimiter {
    pub fn new(interval: Duration) -> Self {
        Self {
            interval,
            last: None,
            suppressed: 0,
        }
    }

    /// `Some(n)` when an event at `now` is to be logged (`n` events were suppressed since the
    /// last line), `None` when it is to be counted only.
    pub fn admit(&mut self, now: Instant) -> Option<u64> {
        match self.last {
            Some(last) if now.saturating_duration_since(last) < self.interval => {
                self.suppressed += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.suppressed))
            }
        }
    }
}

/// The accept loop's shared refusal log.
#[derive(Debug)]
struct RefusalLog(Mutex<LogLimiter>);

impl RefusalLog {
    fn note(&self, remote: SocketAddr, cause: &dyn std::fmt::Display) {
        let admitted = self
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .admit(Instant::now());
        if let Some(suppressed) = admitted {
            info!(%remote, %cause, suppressed, "connection refused");
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum HandshakeError {
    #[error("connection failed: {0}")]
    Connection(#[from] quinn::ConnectionError),
    #[error("no Hello within {0:?}")]
    Timeout(Duration),
    #[error("reading Hello: {0}")]
    Frame(#[from] FrameError),
    #[error("connection closed before Hello")]
    Closed,
    #[error("first message was {0}, not hello")]
    NotHello(&'static str),
    #[error("refused: {0}")]
    Refused(Refusal),
}

/// Accepts connections until the endpoint is closed.
pub async fn accept_loop(
    endpoint: quinn::Endpoint,
    admission: Arc<Admission>,
    job: DerivedActorRef<PeerMsg>,
) {
    let slots = HandshakeSlots::new(HandshakeLimits::default());
    let refusals = Arc::new(RefusalLog(Mutex::new(LogLimiter::new(
        REFUSAL_LOG_INTERVAL,
    ))));
    while let Some(incoming) = endpoint.accept().await {
        let remote = incoming.remote_address();
        if !incoming.remote_address_validated() && incoming.may_retry() {
            // A stateless retry: the peer must echo a token from its address before we keep any
            // state for it, so the per-address caps below cannot be dodged by spoofing.
            if let Err(e) = incoming.retry() {
                debug!(%remote, cause = %e, "retry not possible; dropping the attempt");
                e.into_incoming().ignore();
            }
            continue;
        }
        let slot = match slots.try_acquire(remote.ip()) {
            Ok(slot) => slot,
            Err(cause) => {
                incoming.refuse();
                refusals.note(remote, &cause);
                continue;
            }
        };
        let admission = admission.clone();
        let job = job.clone();
        let refusals = refusals.clone();
        tokio::spawn(
            async move {
                if let Err(e) = handshake(incoming, remote, &admission, job).await {
                    refusals.note(remote, &e);
                }
                drop(slot);
            }
            .instrument(tracing::info_span!("handshake", %remote)),
        );
    }
    debug!("endpoint closed, accept loop ends");
}

/// The handshake's first part, all within the handshake timeout: the QUIC/TLS handshake, the
/// control stream, and a small `Hello` frame.
async fn receive_hello(
    incoming: quinn::Incoming,
    deadline: Duration,
) -> Result<
    (
        quinn::Connection,
        quinn::SendStream,
        quinn::RecvStream,
        Option<WorkerToCoordinator>,
    ),
    HandshakeError,
> {
    let limits = FrameLimits::default()
        .with_max_bytes(MAX_HELLO_FRAME_BYTES)
        .with_frame_timeout(deadline);
    let connection = tokio::time::timeout(deadline, incoming)
        .await
        .map_err(|_| HandshakeError::Timeout(deadline))??;
    let stream = tokio::time::timeout(deadline, async {
        let (send, mut recv) = connection.accept_bi().await?;
        let hello: Option<WorkerToCoordinator> = read_message_with(&mut recv, limits).await?;
        Ok::<_, HandshakeError>((send, recv, hello))
    })
    .await;
    match stream {
        Ok(Ok((send, recv, hello))) => Ok((connection, send, recv, hello)),
        Ok(Err(e)) => {
            connection.close(close_code::PROTOCOL_ERROR.into(), e.to_string().as_bytes());
            Err(e)
        }
        Err(_) => {
            connection.close(close_code::PROTOCOL_ERROR.into(), b"no hello in time");
            Err(HandshakeError::Timeout(deadline))
        }
    }
}

async fn handshake(
    incoming: quinn::Incoming,
    remote: SocketAddr,
    admission: &Admission,
    job: DerivedActorRef<PeerMsg>,
) -> Result<(), HandshakeError> {
    let (connection, mut send, recv, hello) =
        receive_hello(incoming, admission.handshake_timeout).await?;
    let hello = match hello {
        Some(WorkerToCoordinator::Hello(hello)) => hello,
        Some(other) => {
            connection.close(close_code::PROTOCOL_ERROR.into(), b"expected hello");
            return Err(HandshakeError::NotHello(other.kind()));
        }
        None => return Err(HandshakeError::Closed),
    };
    // No exporter secret means no way to check the proof: refuse like a wrong token.
    let binding = channel_binding(&connection).ok();
    if let Err(reason) =
        check_hello(&hello, admission, binding.as_ref()).and_then(|()| check_store(&hello, remote))
    {
        refuse(&connection, &mut send, reason.clone()).await;
        return Err(HandshakeError::Refused(reason));
    }
    grant_admitted_limits(&connection);
    // Admission beyond version and token (job full, job finished) is the membership's call.
    if job
        .send_message(PeerMsg::Admit {
            connection: AdmittedConnection {
                hello,
                remote,
                connection: connection.clone(),
                control_send: send,
                control_recv: recv,
            },
        })
        .is_err()
    {
        warn!("job actor is gone; closing the connection");
        connection.close(close_code::SHUTDOWN.into(), b"coordinator shutting down");
    }
    Ok(())
}

/// A worker on another host that advertises a loopback store address would leave its peers
/// waiting out the rendezvous timeout: refuse it at once, naming the fix.
pub fn check_store(hello: &Hello, remote: SocketAddr) -> Result<(), Refusal> {
    let loopback = match hello.store.host.parse::<std::net::IpAddr>() {
        Ok(ip) => ip.is_loopback(),
        Err(_) => hello.store.host == "localhost",
    };
    if loopback && !remote.ip().is_loopback() {
        return Err(Refusal::LoopbackStore {
            store_host: hello.store.host.clone(),
            peer: remote.ip().to_string(),
        });
    }
    Ok(())
}

/// Checks the version and the join proof, which must be bound to this connection
/// (`channel_binding`, `None` when it could not be exported).
fn check_hello(
    hello: &Hello,
    admission: &Admission,
    channel_binding: Option<&[u8; 32]>,
) -> Result<(), Refusal> {
    if hello.protocol_version != PROTOCOL_VERSION {
        return Err(Refusal::ProtocolVersion {
            expected: PROTOCOL_VERSION,
            got: hello.protocol_version,
        });
    }
    let Some(channel_binding) = channel_binding else {
        return Err(Refusal::BadToken);
    };
    let expected = join_proof(&admission.token, &admission.cert_sha256, channel_binding);
    // Constant-time comparison: timing must not reveal how much of a guessed proof matched.
    let diff = expected
        .iter()
        .zip(hello.token_proof.iter())
        .fold(0u8, |acc, (a, b)| acc | (a ^ b));
    if diff != 0 {
        return Err(Refusal::BadToken);
    }
    Ok(())
}

/// Tells the client why, then closes. Also used by the job actor for membership refusals.
pub async fn refuse(connection: &quinn::Connection, send: &mut quinn::SendStream, reason: Refusal) {
    let msg = CoordinatorToWorker::Refused {
        reason: reason.clone(),
    };
    if let Err(e) = write_message(send, &msg).await {
        debug!(cause = %e, "could not send the refusal");
    }
    if let Err(e) = send.finish() {
        debug!(cause = %e, "could not finish the refused stream");
    }
    // Give the refusal a moment to arrive before the close discards it.
    if tokio::time::timeout(Duration::from_millis(500), connection.closed())
        .await
        .is_err()
    {
        debug!("client did not close after refusal");
    }
    connection.close(close_code::REFUSED.into(), reason.to_string().as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, last])
    }

    #[test]
    fn handshake_slots_cap_per_address_and_in_total_and_free_on_drop() {
        let slots = HandshakeSlots::new(HandshakeLimits {
            max_total: 3,
            max_per_ip: 2,
        });
        let a1 = slots.try_acquire(ip(1)).unwrap();
        let _a2 = slots.try_acquire(ip(1)).unwrap();
        let err = slots.try_acquire(ip(1)).unwrap_err();
        assert!(err.contains("from this address"), "{err}");
        let _b1 = slots.try_acquire(ip(2)).unwrap();
        let err = slots.try_acquire(ip(3)).unwrap_err();
        assert_eq!(err, "too many handshakes in progress");
        drop(a1);
        assert_eq!(slots.in_progress(ip(1)), (2, 1));
        let _c1 = slots.try_acquire(ip(3)).unwrap();
        assert_eq!(slots.in_progress(ip(3)), (3, 1));
    }

    #[test]
    fn log_limiter_logs_once_per_interval_and_counts_the_rest() {
        let start = Instant::now();
        let mut log = LogLimiter::new(Duration::from_secs(10));
        assert_eq!(log.admit(start), Some(0));
        for i in 1..=5 {
            assert_eq!(log.admit(start + Duration::from_secs(i)), None);
        }
        assert_eq!(log.admit(start + Duration::from_secs(10)), Some(5));
        assert_eq!(log.admit(start + Duration::from_secs(11)), None);
        assert_eq!(log.admit(start + Duration::from_secs(25)), Some(1));
    }
}

#[cfg(test)]
mod store_tests {
    use super::check_store;
    use eqim_common::proto::{Hello, Refusal, StoreEndpoint, WorkerId, PROTOCOL_VERSION};

    fn hello(store_host: &str) -> Hello {
        Hello {
            protocol_version: PROTOCOL_VERSION,
            worker_id: WorkerId("w".into()),
            token_proof: [0; 32],
            store: StoreEndpoint {
                host: store_host.into(),
                port: 1,
            },
            device: String::new(),
        }
    }

    #[test]
    fn a_loopback_store_is_refused_only_from_another_host() {
        let local = "127.0.0.1:5000".parse().unwrap();
        let remote = "10.77.0.3:5000".parse().unwrap();
        assert_eq!(check_store(&hello("127.0.0.1"), local), Ok(()));
        assert_eq!(check_store(&hello("10.77.0.3"), remote), Ok(()));
        let refusal = check_store(&hello("127.0.0.1"), remote).unwrap_err();
        assert!(matches!(refusal, Refusal::LoopbackStore { .. }));
        assert!(refusal.to_string().contains("--host"), "{refusal}");
        assert!(check_store(&hello("localhost"), remote).is_err());
    }
}
