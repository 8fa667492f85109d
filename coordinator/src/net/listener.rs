//! The accept loop: every incoming connection gets its own handshake task, which reads `Hello`
//! within the handshake timeout, checks the protocol version and the join proof, and either
//! refuses the connection or hands it to the job actor for admission. A misbehaving client only
//! ever costs its own task.

use crate::job::{AdmittedConnection, PeerMsg};
use eqim_common::framing::{read_message, write_message, FrameError};
use eqim_common::net::close_code;
use eqim_common::proto::{
    join_proof, CoordinatorToWorker, Hello, Refusal, WorkerToCoordinator, PROTOCOL_VERSION,
};
use ractor::DerivedActorRef;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tracing::{debug, info, warn, Instrument};

/// What the handshake needs to know.
pub struct Admission {
    pub token: String,
    pub cert_sha256: [u8; 32],
    pub handshake_timeout: Duration,
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
    while let Some(incoming) = endpoint.accept().await {
        let remote = incoming.remote_address();
        let admission = admission.clone();
        let job = job.clone();
        tokio::spawn(
            async move {
                if let Err(e) = handshake(incoming, remote, &admission, job).await {
                    info!(cause = %e, "connection refused");
                }
            }
            .instrument(tracing::info_span!("handshake", %remote)),
        );
    }
    debug!("endpoint closed, accept loop ends");
}

async fn handshake(
    incoming: quinn::Incoming,
    remote: SocketAddr,
    admission: &Admission,
    job: DerivedActorRef<PeerMsg>,
) -> Result<(), HandshakeError> {
    let deadline = admission.handshake_timeout;
    let connection = incoming.await?;
    let (mut send, recv, hello) = match tokio::time::timeout(deadline, async {
        let (send, mut recv) = connection.accept_bi().await?;
        let hello: Option<WorkerToCoordinator> = read_message(&mut recv).await?;
        Ok::<_, HandshakeError>((send, recv, hello))
    })
    .await
    {
        Ok(Ok(parts)) => parts,
        Ok(Err(e)) => {
            connection.close(close_code::PROTOCOL_ERROR.into(), e.to_string().as_bytes());
            return Err(e);
        }
        Err(_) => {
            connection.close(close_code::PROTOCOL_ERROR.into(), b"no hello in time");
            return Err(HandshakeError::Timeout(deadline));
        }
    };
    let hello = match hello {
        Some(WorkerToCoordinator::Hello(hello)) => hello,
        Some(other) => {
            connection.close(close_code::PROTOCOL_ERROR.into(), b"expected hello");
            return Err(HandshakeError::NotHello(other.kind()));
        }
        None => return Err(HandshakeError::Closed),
    };
    if let Err(reason) = check_hello(&hello, admission).and_then(|()| check_store(&hello, remote)) {
        refuse(&connection, &mut send, reason.clone()).await;
        return Err(HandshakeError::Refused(reason));
    }
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

fn check_hello(hello: &Hello, admission: &Admission) -> Result<(), Refusal> {
    if hello.protocol_version != PROTOCOL_VERSION {
        return Err(Refusal::ProtocolVersion {
            expected: PROTOCOL_VERSION,
            got: hello.protocol_version,
        });
    }
    let expected = join_proof(&admission.token, &admission.cert_sha256);
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
