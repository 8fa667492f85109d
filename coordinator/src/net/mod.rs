//! The coordinator's side of the QUIC control plane: the listener (handshake and admission) and
//! one session per worker connection. TLS, credentials and close codes are shared with the
//! client and live in [`eqim_common::net`].
//!
//! # Message flow
//!
//! Messages are [`eqim_common::proto`] enums framed by [`eqim_common::framing`]. Each worker
//! connection carries one long-lived bidirectional **control stream** (opened by the worker) and
//! one unidirectional **heartbeat stream** (worker to coordinator), so heartbeats never wait
//! behind a large control frame.
//!
//! ```text
//! worker                                   coordinator
//!   | QUIC + TLS 1.3 (worker pins the certificate's SHA-256)
//!   |-- Hello{version, worker_id, join_proof, store} -->|  version and proof checked in the
//!   |<------------- Admitted | Refused{reason} ---------|  accept loop; Refused closes the link
//!   |== Heartbeat{generation, phase, step} every heartbeat_interval (heartbeat stream) ==>
//!   |                                                   |  enough workers: generation g formed
//!   |<-- Welcome{g, rank, world_size, rendezvous, resume cursor}
//!   |   build the c10d group (PrefixStore "eqim/{incarnation}/gen{g}" on rank 0's TCPStore),
//!   |   rank 0 broadcasts weights/optimizer/EMA/RNG
//!   |-- GroupReady{g} ------------------------------->|  all ranks ready: training starts
//!   |                  per step s:
//!   |<-- Assign{g, s, epoch, micro_batches, step_samples}
//!   |   forward/backward over the micro-batches, all-reduce (SUM of loss/step_samples)
//!   |-- Vote{g, s, Ok | Failed} ---------------------->|
//!   |<-- Commit{g, s, checkpoint?}  (every rank voted Ok: apply the update; cursor advances)
//!   |<-- Abort{g, s, reason}        (a failed vote, a lost member or the step timeout:
//!   |                                drop the gradients; nothing was consumed)
//!   |<-- Assign{g, s+1, ...} ...
//! ```
//!
//! **Generation changes.** When a worker joins (at the next step boundary), leaves, dies (missed
//! heartbeats, connection lost, or no answer to a probe) or the group breaks, the coordinator
//! aborts the open step if needed and sends a new `Welcome{g+1, ...}` to every member: workers
//! destroy the old group and build the new one. After a failed vote the coordinator first sends
//! `Probe{nonce}` to every member (the client library answers `ProbeAck` by itself); members
//! that do not answer within the probe timeout are declared dead, which detects a killed peer
//! far sooner than the heartbeat timeout. Messages carrying an old generation are refused
//! (fencing). With fewer than `min_workers` members the coordinator sends `Paused` and waits.
//!
//! **Leaving.** On SIGTERM a worker sends `Leaving{g, reason}` and closes the connection; the
//! coordinator removes it at once (aborting the open step) and forms g+1 with the others.
//! At the end of the schedule the coordinator sends `Finished` and closes every connection.

pub mod listener;
pub mod session;
