//! The two job actors and what they share. A coordinator runs exactly one: a
//! [`TrainingJob`](training::TrainingJobActor) (membership generations, steps, checkpoints) or an
//! [`EvalJob`](evaluation::EvalJobActor) (image leases, no generations), picked by the config's
//! `eval:` section in [`crate::Coordinator::start`]. Both take the same [`PeerMsg`]s from the
//! listener and the sessions and the same [`ControlMsg`]s from the coordinator's handle, keep
//! their sessions in a [`sessions::Sessions`] book, and report a [`JobOutcome`] with a typed
//! [`StopReason`] when they stop.

pub mod evaluation;
pub mod sessions;
pub mod training;
mod training_checkpoints;

use crate::eval::EvalOutcome;
use crate::membership::SessionKey;
use eqim_common::ledger::{EpochCoverage, Ledger};
use eqim_common::proto::{Cursor, Generation, Hello, WorkerId, WorkerToCoordinator};
use ractor::RpcReplyPort;
use std::fmt;
use std::net::SocketAddr;

/// What the network side tells a job actor: an admitted connection, or a worker's message.
pub enum PeerMsg {
    /// A connection passed the handshake (version and token); admit it (or refuse it).
    Admit { connection: AdmittedConnection },
    /// A message read from a session's control or heartbeat stream.
    FromWorker {
        worker: WorkerId,
        session: SessionKey,
        msg: WorkerToCoordinator,
    },
}

/// What the coordinator's handle asks of a job actor.
pub enum ControlMsg {
    /// Report the current state.
    Status { reply: RpcReplyPort<JobStatus> },
    /// Stop the job (Ctrl-C or the caller's shutdown): close every session.
    Shutdown { reason: StopReason },
}

/// A connection that passed the handshake, handed to the job actor for admission.
pub struct AdmittedConnection {
    pub hello: Hello,
    pub remote: SocketAddr,
    pub connection: quinn::Connection,
    pub control_send: quinn::SendStream,
    pub control_recv: quinn::RecvStream,
}

/// Why a job actor stopped. `Display` is what the summary line and `outcome.json` say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopReason {
    /// The actor stopped without a recorded reason (it should not happen).
    Stopped,
    /// Every step of the schedule committed and the workers were let go.
    ScheduleComplete,
    /// Every image was generated and the FID and manifest written.
    EvalComplete,
    /// The evaluation's images were generated but its results could not be finished.
    EvalFailed(String),
    /// Ctrl-C (SIGINT) at the coordinator.
    Interrupted,
    /// The coordinator's caller shut the job down, for this reason.
    Shutdown(String),
}

impl StopReason {
    /// True when the job did all it was asked to.
    pub fn is_complete(&self) -> bool {
        matches!(
            self,
            StopReason::ScheduleComplete | StopReason::EvalComplete
        )
    }
}

impl fmt::Display for StopReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StopReason::Stopped => f.write_str("stopped"),
            StopReason::ScheduleComplete => f.write_str("schedule complete"),
            StopReason::EvalComplete => f.write_str("evaluation complete"),
            StopReason::EvalFailed(cause) => write!(f, "evaluation failed: {cause}"),
            StopReason::Interrupted => f.write_str("interrupted (Ctrl-C)"),
            StopReason::Shutdown(reason) => f.write_str(reason),
        }
    }
}

/// What a job did, reported when the job actor stops.
#[derive(Debug, Clone)]
pub struct JobOutcome {
    pub finished: bool,
    pub stop_reason: StopReason,
    pub cursor: Cursor,
    pub generation: Generation,
    pub ledger: Ledger,
    pub aborted_steps: u64,
    /// What an evaluation job produced (absent for training jobs and unfinished evaluations).
    pub eval: Option<EvalOutcome>,
    /// Failures training recovered from (a step committed after them) and their total time.
    pub recoveries: u64,
    pub recovery_seconds: f64,
}

impl JobOutcome {
    /// What `<job_dir>/outcome.json` says of this job.
    pub fn record(&self) -> eqim_common::outcome::JobOutcomeRecord {
        eqim_common::outcome::JobOutcomeRecord {
            finished: self.finished,
            stop_reason: self.stop_reason.to_string(),
            cursor: self.cursor,
            generation: self.generation.0,
            coverage: self.ledger.summary(),
            ledger: self.ledger.clone(),
            aborted_steps: self.aborted_steps,
            recoveries: self.recoveries,
            recovery_seconds: self.recovery_seconds,
            eval: self
                .eval
                .as_ref()
                .map(|e| eqim_common::outcome::EvalOutcomeRecord {
                    images: e.images,
                    seconds: e.seconds,
                    fid: e.fid,
                    manifest: e.manifest.clone(),
                }),
        }
    }
}

/// A snapshot for tests and status pages.
#[derive(Debug, Clone)]
pub struct JobStatus {
    pub generation: Generation,
    pub phase: String,
    pub members: Vec<WorkerId>,
    pub roster: Vec<WorkerId>,
    pub cursor: Cursor,
    pub coverage: Vec<EpochCoverage>,
    pub aborted_steps: u64,
}

/// Implements the conversions ractor's derived refs need, so the listener and sessions hold a
/// `DerivedActorRef<PeerMsg>` and the coordinator a `DerivedActorRef<ControlMsg>` whichever job
/// actor runs.
macro_rules! job_message_conversions {
    ($msg:ident) => {
        impl From<$crate::job::PeerMsg> for $msg {
            fn from(msg: $crate::job::PeerMsg) -> Self {
                $msg::Peer(msg)
            }
        }
        impl TryFrom<$msg> for $crate::job::PeerMsg {
            type Error = $msg;
            fn try_from(msg: $msg) -> Result<Self, $msg> {
                match msg {
                    $msg::Peer(msg) => Ok(msg),
                    other => Err(other),
                }
            }
        }
        impl From<$crate::job::ControlMsg> for $msg {
            fn from(msg: $crate::job::ControlMsg) -> Self {
                $msg::Control(msg)
            }
        }
        impl TryFrom<$msg> for $crate::job::ControlMsg {
            type Error = $msg;
            fn try_from(msg: $msg) -> Result<Self, $msg> {
                match msg {
                    $msg::Control(msg) => Ok(msg),
                    other => Err(other),
                }
            }
        }
    };
}
pub(crate) use job_message_conversions;

#[cfg(test)]
mod tests {
    use super::StopReason;

    #[test]
    fn stop_reasons_read_as_the_summary_line_always_said() {
        assert_eq!(
            StopReason::ScheduleComplete.to_string(),
            "schedule complete"
        );
        assert_eq!(StopReason::EvalComplete.to_string(), "evaluation complete");
        assert_eq!(
            StopReason::EvalFailed("disk full".into()).to_string(),
            "evaluation failed: disk full"
        );
        assert_eq!(StopReason::Interrupted.to_string(), "interrupted (Ctrl-C)");
        assert_eq!(StopReason::Shutdown("test".into()).to_string(), "test");
    }

    #[test]
    fn only_a_completed_schedule_or_evaluation_is_complete() {
        assert!(StopReason::ScheduleComplete.is_complete());
        assert!(StopReason::EvalComplete.is_complete());
        for other in [
            StopReason::Stopped,
            StopReason::EvalFailed("x".into()),
            StopReason::Interrupted,
            StopReason::Shutdown("x".into()),
        ] {
            assert!(!other.is_complete(), "{other}");
        }
    }
}
