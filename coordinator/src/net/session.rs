//! One actor per admitted worker connection: it owns the control stream's writer, and a reader
//! task turns the control and heartbeat streams' frames into job messages. The job actor
//! spawn-links it, so the session's end (clean close, bad frame, lost connection) arrives there
//! as a supervision event and becomes a membership event.

use crate::job::PeerMsg;
use crate::membership::SessionKey;
use eqim_common::framing::{read_message_with, write_message, FrameError, FrameLimits};
use eqim_common::net::close_code;
use eqim_common::proto::{CoordinatorToWorker, WorkerId, WorkerToCoordinator};
use ractor::{Actor, ActorProcessingErr, ActorRef, DerivedActorRef};
use std::fmt;
use std::time::Duration;
use tokio::task::JoinHandle;
use tracing::{debug, info, Instrument};

/// How long a finishing session waits for the worker to close after `Finished`.
const FINISH_LINGER: Duration = Duration::from_secs(1);

pub struct SessionActor;

pub struct SessionArgs {
    pub worker: WorkerId,
    pub key: SessionKey,
    pub connection: quinn::Connection,
    pub control_send: quinn::SendStream,
    pub control_recv: quinn::RecvStream,
    pub job: DerivedActorRef<PeerMsg>,
    /// First message written (the handshake's answer).
    pub admitted: CoordinatorToWorker,
}

pub struct SessionState {
    worker: WorkerId,
    connection: quinn::Connection,
    control_send: quinn::SendStream,
    reader: JoinHandle<()>,
}

/// Why the coordinator closes a session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CloseReason {
    Finished,
    DeclaredDead,
    Replaced,
    Left,
    Shutdown,
    ProtocolError(String),
}

impl CloseReason {
    fn code(&self) -> u32 {
        match self {
            CloseReason::Finished => close_code::FINISHED,
            CloseReason::DeclaredDead => close_code::DECLARED_DEAD,
            CloseReason::Replaced => close_code::REPLACED,
            CloseReason::Left => close_code::LEFT,
            CloseReason::Shutdown => close_code::SHUTDOWN,
            CloseReason::ProtocolError(_) => close_code::PROTOCOL_ERROR,
        }
    }
}

impl fmt::Display for CloseReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CloseReason::Finished => f.write_str("job finished"),
            CloseReason::DeclaredDead => f.write_str("declared dead"),
            CloseReason::Replaced => f.write_str("replaced by a newer connection"),
            CloseReason::Left => f.write_str("worker left"),
            CloseReason::Shutdown => f.write_str("coordinator shutting down"),
            CloseReason::ProtocolError(e) => write!(f, "protocol error: {e}"),
        }
    }
}

pub enum SessionMsg {
    /// Write a message on the control stream.
    Send { msg: CoordinatorToWorker },
    /// Close the connection and stop.
    Close { reason: CloseReason },
}

/// How the reader side of a session ended.
#[derive(Debug, thiserror::Error)]
enum ReadEnd {
    #[error("worker closed the control stream")]
    ClosedByWorker,
    #[error("{0}")]
    Frame(#[from] FrameError),
    #[error("connection lost: {0}")]
    Connection(#[from] quinn::ConnectionError),
    #[error("job actor is gone")]
    JobGone,
}

/// Whether a session that stopped for `why` (its stop reason) was ended by the worker closing
/// its streams cleanly, as a worker that leaves does, rather than by a lost connection.
pub fn ended_by_worker(why: &str) -> bool {
    why == ReadEnd::ClosedByWorker.to_string()
}

impl Actor for SessionActor {
    type Msg = SessionMsg;
    type State = SessionState;
    type Arguments = SessionArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<SessionMsg>,
        args: SessionArgs,
    ) -> Result<SessionState, ActorProcessingErr> {
        let SessionArgs {
            worker,
            key,
            connection,
            mut control_send,
            control_recv,
            job,
            admitted,
        } = args;
        write_message(&mut control_send, &admitted).await?;
        let span =
            tracing::info_span!("peer", worker_id = %worker, remote = %connection.remote_address());
        let reader = tokio::spawn(
            read_loop(ReadLoop {
                worker: worker.clone(),
                key,
                connection: connection.clone(),
                control_recv,
                job,
                session: myself,
            })
            .instrument(span),
        );
        Ok(SessionState {
            worker,
            connection,
            control_send,
            reader,
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<SessionMsg>,
        msg: SessionMsg,
        state: &mut SessionState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            SessionMsg::Send { msg } => {
                debug!(worker_id = %state.worker, kind = msg.kind(), "send");
                if let Err(e) = write_message(&mut state.control_send, &msg).await {
                    info!(worker_id = %state.worker, cause = %e, "control write failed");
                    myself.stop(Some(format!("control write failed: {e}")));
                }
            }
            SessionMsg::Close { reason } => {
                if reason == CloseReason::Finished {
                    // Let the worker read `Finished` and close first; a close from our side
                    // could discard it in flight.
                    if let Err(e) = state.control_send.finish() {
                        debug!(cause = %e, "control stream already closed");
                    }
                    if tokio::time::timeout(FINISH_LINGER, state.connection.closed())
                        .await
                        .is_err()
                    {
                        debug!(worker_id = %state.worker, "worker did not close after Finished");
                    }
                }
                state
                    .connection
                    .close(reason.code().into(), reason.to_string().as_bytes());
                myself.stop(Some(reason.to_string()));
            }
        }
        Ok(())
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<SessionMsg>,
        state: &mut SessionState,
    ) -> Result<(), ActorProcessingErr> {
        state.reader.abort();
        if state.connection.close_reason().is_none() {
            state
                .connection
                .close(close_code::SHUTDOWN.into(), b"session stopped");
        }
        Ok(())
    }
}

struct ReadLoop {
    worker: WorkerId,
    key: SessionKey,
    connection: quinn::Connection,
    control_recv: quinn::RecvStream,
    job: DerivedActorRef<PeerMsg>,
    session: ActorRef<SessionMsg>,
}

/// Reads both streams until one ends, then closes the connection (with a reason the worker can
/// log) and stops the session.
async fn read_loop(mut r: ReadLoop) {
    let control = forward_stream(&r.worker, r.key, &mut r.control_recv, &r.job);
    let heartbeats = async {
        let mut recv = r.connection.accept_uni().await?;
        forward_stream(&r.worker, r.key, &mut recv, &r.job).await
    };
    let Err(end) = tokio::try_join!(control, heartbeats) else {
        unreachable!("forward_stream only returns errors");
    };
    info!(cause = %end, "session ended");
    if let ReadEnd::Frame(e) = &end {
        r.connection
            .close(close_code::PROTOCOL_ERROR.into(), e.to_string().as_bytes());
    }
    r.session.stop(Some(end.to_string()));
}

async fn forward_stream(
    worker: &WorkerId,
    key: SessionKey,
    recv: &mut quinn::RecvStream,
    job: &DerivedActorRef<PeerMsg>,
) -> Result<(), ReadEnd> {
    loop {
        // A frame that starts must finish within the frame timeout: a peer that stalls half-way
        // (while its heartbeats keep the connection alive) is dropped, buffer and all.
        let msg: WorkerToCoordinator =
            match read_message_with(recv, FrameLimits::authenticated()).await {
                Ok(Some(msg)) => msg,
                Ok(None) => return Err(ReadEnd::ClosedByWorker),
                Err(FrameError::Io(e)) => {
                    // A lost connection surfaces as an i/o error on the stream.
                    return Err(match e.downcast::<quinn::ReadError>() {
                        Ok(quinn::ReadError::ConnectionLost(c)) => ReadEnd::Connection(c),
                        Ok(other) => ReadEnd::Frame(FrameError::Io(std::io::Error::other(other))),
                        Err(e) => ReadEnd::Frame(FrameError::Io(e)),
                    });
                }
                Err(e) => return Err(ReadEnd::Frame(e)),
            };
        job.send_message(PeerMsg::FromWorker {
            worker: worker.clone(),
            session: key,
            msg,
        })
        .map_err(|_| ReadEnd::JobGone)?;
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn only_a_clean_close_by_the_worker_counts_as_ended_by_it() {
        assert!(super::ended_by_worker("worker closed the control stream"));
        assert!(!super::ended_by_worker("connection lost: timed out"));
    }
}
