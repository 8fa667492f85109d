//! The control-plane protocol between workers and the coordinator: one message enum per
//! direction, encoded with bincode 2 (serde, standard config). Framing lives in
//! [`crate::framing`]; the message flow is described in `eqim_coordinator::net`.
//!
//! Every message about training carries the [`Generation`] it belongs to, so a fenced-out worker
//! (one that missed a membership change) is recognised by its stale generation and refused.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::fmt;
use std::ops::Range;
use std::time::Duration;

/// Bumped on any incompatible change of the messages below; checked in [`Hello`].
pub const PROTOCOL_VERSION: u32 = 5;

/// ALPN protocol id of the control plane, so a stray QUIC client of another protocol fails the
/// TLS handshake instead of sending us garbage.
pub const ALPN: &[u8] = b"eqim-control/1";

/// Identity of one c10d process group: a new generation is declared when the membership changes
/// or when the group of the current one broke (a failed collective), see
/// `eqim_coordinator::membership`.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct Generation(pub u64);

impl Generation {
    pub fn next(self) -> Self {
        Generation(self.0 + 1)
    }
}

impl fmt::Display for Generation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "g{}", self.0)
    }
}

/// A worker's self-chosen name (for example `host-pid`), unique among live workers. A worker
/// that reconnects with the same id replaces its old session.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct WorkerId(pub String);

impl fmt::Display for WorkerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<&str> for WorkerId {
    fn from(s: &str) -> Self {
        WorkerId(s.to_owned())
    }
}

/// Label of the TLS exporter secret ([RFC 8446 §7.5]) that binds a join proof to its connection.
///
/// [RFC 8446 §7.5]: https://www.rfc-editor.org/rfc/rfc8446#section-7.5
pub const JOIN_PROOF_EXPORTER_LABEL: &[u8] = b"EXPORTER-eqim-join-proof-v2";

/// Proof that a worker holds the job token, bound to the coordinator certificate it pinned and to
/// this very connection: SHA-256 over a domain tag, the token, the certificate fingerprint and
/// `channel_binding`, a secret both ends export from the connection's TLS session
/// (`eqim_common::net::tls::channel_binding`). The token never goes over the wire, a proof made
/// for one coordinator is useless against another, and a proof captured on one connection is
/// useless on any other.
pub fn join_proof(token: &str, cert_sha256: &[u8; 32], channel_binding: &[u8; 32]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"eqim-join-proof-v2\0");
    h.update(token.as_bytes());
    h.update([0u8]);
    h.update(cert_sha256);
    h.update(channel_binding);
    h.finalize().into()
}

/// Where a worker hosts its c10d TCPStore; rank 0 of a generation serves the rendezvous.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoreEndpoint {
    /// Host name or IP the other workers can reach. Empty means "the address the coordinator saw
    /// my connection come from".
    pub host: String,
    pub port: u16,
}

/// First message on the control stream of every connection.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Hello {
    pub protocol_version: u32,
    pub worker_id: WorkerId,
    /// [`join_proof`] of the job token, the pinned certificate fingerprint and the connection.
    pub token_proof: [u8; 32],
    pub store: StoreEndpoint,
    /// Free text for logs, for example `cpu x8` or `cuda:0 H200`.
    pub device: String,
}

/// What a worker is doing, reported with each heartbeat.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum WorkerPhase {
    /// Admitted, waiting for a generation to include it.
    Joining,
    /// Building the process group of a generation and receiving state from rank 0.
    Syncing,
    /// Running steps of its generation.
    Training,
    /// Leaving (SIGTERM): finishing or abandoning the current step.
    Draining,
}

impl WorkerPhase {
    pub fn is_joining(self) -> bool {
        matches!(self, WorkerPhase::Joining)
    }
    pub fn is_syncing(self) -> bool {
        matches!(self, WorkerPhase::Syncing)
    }
    pub fn is_training(self) -> bool {
        matches!(self, WorkerPhase::Training)
    }
    pub fn is_draining(self) -> bool {
        matches!(self, WorkerPhase::Draining)
    }
}

/// The rendezvous of one generation: a PrefixStore `prefix` over the TCPStore at host:port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rendezvous {
    pub store_host: String,
    pub store_port: u16,
    /// Unique per generation (`gen{g}`), so keys of a broken group never collide with the next.
    pub prefix: String,
}

/// The committed position of the job, where a generation starts training.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Cursor {
    /// Next step to run (number of committed steps so far).
    pub step: u64,
    pub epoch: u32,
    /// Position in the epoch's permutation of the next sample.
    pub offset: u64,
}

/// The sample indices one rank computes for one step.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assignment {
    pub generation: Generation,
    pub step: u64,
    pub epoch: u32,
    /// Micro-batches to accumulate before the all-reduce; may be empty for some ranks on the
    /// last, short step of an epoch (they then all-reduce zero gradients).
    pub micro_batches: Vec<Vec<u64>>,
    /// Number of samples of this step over all ranks. Ranks scale the sum of their per-sample
    /// losses by `1 / step_samples` and all-reduce with SUM, so the update equals the one of a
    /// single worker on the whole batch whatever the split.
    pub step_samples: u64,
}

/// A worker's report after the all-reduce of a step.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum VoteOutcome {
    /// The all-reduce returned on this rank; it holds the reduced gradients.
    Ok,
    /// The forward/backward or the collective failed on this rank.
    Failed { reason: String },
}

/// Why the coordinator aborted a step.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum AbortReason {
    /// A member voted failed.
    VoteFailed { worker: WorkerId, reason: String },
    /// A member of the generation died or left before everyone voted.
    MemberLost { worker: WorkerId },
    /// Not all votes arrived within the step timeout.
    Timeout,
}

/// Order to write a checkpoint of the state after the committed step.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointOrder {
    /// Rank that writes (the others keep training).
    pub writer_rank: u32,
    /// Directory name for this checkpoint, relative to the job's checkpoint directory.
    pub name: String,
}

/// How long a leaving worker that was the last holder of the training state has to write its
/// [`CoordinatorToWorker::CheckpointNow`]: the coordinator removes it after this even without
/// the report, and the worker exits after this even if the coordinator keeps it.
pub const JIT_CHECKPOINT_TIMEOUT: Duration = Duration::from_secs(20);

/// Identifier of an evaluation lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct LeaseId(pub u64);

/// One file a worker wrote, for the manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WrittenFile {
    pub path: String,
    pub bytes: u64,
    pub sha256: [u8; 32],
}

/// Feature rows per [`WorkerToCoordinator::EvalFeatures`] frame: 64 x 2048 f32 = 512 KiB, half
/// the frame limit.
pub const MAX_FEATURE_ROWS_PER_FRAME: usize = 64;

/// What an evaluation worker samples. Every worker of a job must send the same plan: the
/// coordinator adopts the first one it sees and refuses others, so a set never mixes settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EvalPlanInfo {
    pub num_images: u64,
    pub class_num: u64,
    pub base_seed: u64,
    /// Images sampled as one batch; leases are whole blocks of this many indices.
    pub batch_size: u64,
    /// Everything else that changes the pixels (weight hashes, model config, guidance, steps,
    /// length, latent scale, device kind), as a JSON object; it goes into the manifest.
    pub settings_json: String,
}

/// Why a connection was refused at the handshake.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Refusal {
    ProtocolVersion {
        expected: u32,
        got: u32,
    },
    BadToken,
    JobFull {
        max_workers: u32,
    },
    JobFinished,
    /// The worker advertises a loopback store address but connects from another host: its
    /// peers could not reach its TCPStore.
    LoopbackStore {
        store_host: String,
        peer: String,
    },
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::ProtocolVersion { expected, got } => write!(
                f,
                "protocol version {got} is not the coordinator's {expected}: run the same eqim version everywhere"
            ),
            Refusal::BadToken => f.write_str(
                "join token does not match this job: pass the job's token file (--token)",
            ),
            Refusal::JobFull { max_workers } => {
                write!(f, "the job already has its maximum of {max_workers} workers")
            }
            Refusal::JobFinished => f.write_str("the job has finished"),
            Refusal::LoopbackStore { store_host, peer } => write!(
                f,
                "this worker advertises its store at {store_host} (loopback) but connects from {peer}: \
                 start it with --host set to an address its peers can reach (or leave --host out \
                 to use the address of its route to the coordinator)"
            ),
        }
    }
}

/// Messages a worker sends to the coordinator.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum WorkerToCoordinator {
    /// First frame of a connection.
    Hello(Hello),
    /// Liveness, sent every heartbeat interval on the heartbeat stream.
    Heartbeat {
        generation: Generation,
        phase: WorkerPhase,
        /// Last step this worker applied.
        step: u64,
    },
    /// The c10d group of `generation` is built and the state broadcast from rank 0 is applied.
    GroupReady { generation: Generation },
    /// Result of the all-reduce of `step`.
    Vote {
        generation: Generation,
        step: u64,
        outcome: VoteOutcome,
    },
    /// Answer to [`CoordinatorToWorker::Probe`] (the client library sends it by itself).
    ProbeAck { nonce: u64 },
    /// The worker is leaving (SIGTERM). The coordinator removes it at once, unless it was the
    /// last holder of the training state with steps committed since the newest checkpoint: then
    /// it first orders [`CoordinatorToWorker::CheckpointNow`] and removes it on the report (or
    /// after [`JIT_CHECKPOINT_TIMEOUT`]). The worker keeps its session open until removed.
    Leaving {
        generation: Generation,
        reason: String,
    },
    /// Files of an ordered checkpoint are written and synced.
    CheckpointWritten {
        generation: Generation,
        step: u64,
        files: Vec<WrittenFile>,
    },
    /// Ask for up to `max_images` evaluation indices of the set described by `plan` (refused
    /// when it is not the job's plan).
    EvalLeaseRequest { plan: EvalPlanInfo, max_images: u64 },
    /// Still working on the lease (sent on progress, so a hung worker stops renewing); pushes
    /// its deadline.
    EvalLeaseRenew { lease: LeaseId },
    /// Inception features of the lease's images `first_index..`, [n, dim] row-major f32. Sent
    /// in pieces of at most [`MAX_FEATURE_ROWS_PER_FRAME`] rows before the completion; counted
    /// only if the lease completes.
    EvalFeatures {
        lease: LeaseId,
        first_index: u64,
        dim: u32,
        rows: Vec<f32>,
    },
    /// The lease's images are written and synced.
    EvalLeaseComplete {
        lease: LeaseId,
        files: Vec<WrittenFile>,
    },
}

/// Messages the coordinator sends to a worker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum CoordinatorToWorker {
    /// Answer to a valid [`Hello`]; the worker now waits for a [`CoordinatorToWorker::Welcome`].
    Admitted {
        /// Heartbeat period the coordinator expects, in milliseconds.
        heartbeat_interval_ms: u64,
    },
    /// Answer to an invalid [`Hello`]; the connection is closed after it.
    Refused { reason: Refusal },
    /// The worker is rank `rank` of `generation`: build the process group at `rendezvous`, take
    /// the state from rank 0 by broadcast, then send `GroupReady`. Training resumes at `resume`.
    Welcome {
        generation: Generation,
        rank: u32,
        world_size: u32,
        rendezvous: Rendezvous,
        resume: Cursor,
    },
    /// Compute this step (every rank of the generation gets its own share).
    Assign(Assignment),
    /// Every member voted ok: apply the update of `step`.
    Commit {
        generation: Generation,
        step: u64,
        checkpoint: Option<CheckpointOrder>,
    },
    /// Drop the gradients of `step`; weights stay at `step - 1`.
    Abort {
        generation: Generation,
        step: u64,
        reason: AbortReason,
    },
    /// Are you alive? Sent to every member after a failed vote, to tell a dead peer from a
    /// broken group without waiting for the heartbeat timeout.
    Probe { nonce: u64 },
    /// Too few workers to train; wait for a `Welcome`.
    Paused { reason: String },
    /// Evaluation indices to compute, until `deadline_ms` from now unless renewed; with
    /// `want_features`, send their Inception features before completing.
    EvalLeaseGrant {
        lease: LeaseId,
        indices: Range<u64>,
        deadline_ms: u64,
        want_features: bool,
    },
    /// This worker's evaluation plan is not the job's (different settings or weights).
    EvalRefused { reason: String },
    /// No evaluation work is left.
    EvalDone,
    /// Just-in-time checkpoint of a leaving worker that is the last holder of the state: write
    /// the state after `steps` committed steps into the checkpoint directory `name` now, wait
    /// until it is synced, report `CheckpointWritten`, then wait to be let go.
    CheckpointNow {
        generation: Generation,
        steps: u64,
        name: String,
    },
    /// The job is over; disconnect and exit.
    Finished { reason: String },
}

impl WorkerToCoordinator {
    /// Short name for logs and metric labels.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Hello(_) => "hello",
            Self::Heartbeat { .. } => "heartbeat",
            Self::GroupReady { .. } => "group_ready",
            Self::Vote { .. } => "vote",
            Self::ProbeAck { .. } => "probe_ack",
            Self::Leaving { .. } => "leaving",
            Self::CheckpointWritten { .. } => "checkpoint_written",
            Self::EvalLeaseRequest { .. } => "eval_lease_request",
            Self::EvalLeaseRenew { .. } => "eval_lease_renew",
            Self::EvalFeatures { .. } => "eval_features",
            Self::EvalLeaseComplete { .. } => "eval_lease_complete",
        }
    }
}

impl CoordinatorToWorker {
    /// Short name for logs and metric labels.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Admitted { .. } => "admitted",
            Self::Refused { .. } => "refused",
            Self::Welcome { .. } => "welcome",
            Self::Assign(_) => "assign",
            Self::Commit { .. } => "commit",
            Self::Abort { .. } => "abort",
            Self::Probe { .. } => "probe",
            Self::Paused { .. } => "paused",
            Self::EvalLeaseGrant { .. } => "eval_lease_grant",
            Self::EvalRefused { .. } => "eval_refused",
            Self::EvalDone => "eval_done",
            Self::CheckpointNow { .. } => "checkpoint_now",
            Self::Finished { .. } => "finished",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn join_proof_depends_on_token_certificate_and_connection() {
        let (cert_a, cert_b) = ([1u8; 32], [2u8; 32]);
        let (conn_a, conn_b) = ([3u8; 32], [4u8; 32]);
        let proof = join_proof("t", &cert_a, &conn_a);
        assert_eq!(proof, join_proof("t", &cert_a, &conn_a));
        assert_ne!(proof, join_proof("u", &cert_a, &conn_a));
        assert_ne!(proof, join_proof("t", &cert_b, &conn_a));
        assert_ne!(proof, join_proof("t", &cert_a, &conn_b));
    }

    #[test]
    fn generations_order_and_display() {
        let g = Generation(4);
        assert_eq!(g.next(), Generation(5));
        assert!(g < g.next());
        assert_eq!(g.to_string(), "g4");
    }
}
