//! The training job actor: supervisor of the worker sessions and owner of the job's truth
//! (membership and steps, both plain state structs). It feeds events into them, asks
//! [`membership::decide`](crate::membership::decide) what to do on every event and tick, and
//! executes the decision by sending messages to sessions. The message flow is described in
//! [`crate::net`]; checkpoints and leaving workers are in [`super::training_checkpoints`].

use super::sessions::{refuse_later, SessionEnd, Sessions};
use super::{
    job_message_conversions, AdmittedConnection, ControlMsg, JobOutcome, JobStatus, PeerMsg,
    StopReason,
};
use crate::job_metrics::JobMetrics;
use crate::membership::{self, Action, MembershipConfig, MembershipState, Reason, SessionKey};
use crate::net::session::CloseReason;
use crate::steps::{StepState, VoteResult};
use eqim_common::coordinator_config::CoordinatorConfig;
use eqim_common::metrics_registry::CoordinatorMetrics;
use eqim_common::proto::{
    AbortReason, CoordinatorToWorker, Generation, Refusal, Rendezvous, VoteOutcome, WorkerId,
    WorkerToCoordinator, JIT_CHECKPOINT_TIMEOUT,
};
use ractor::{Actor, ActorProcessingErr, ActorRef, SupervisionEvent};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

pub(super) use super::training_checkpoints::{JitLeaver, PendingCheckpoint};

/// After `Finished`, how long to wait for sessions to close before stopping anyway.
const FINISH_GRACE: Duration = Duration::from_secs(3);

/// The training job actor (its config is the [`TrainingJobArgs`] it starts with).
pub struct TrainingJobActor;

pub struct TrainingJobArgs {
    pub cfg: Arc<CoordinatorConfig>,
    /// Receives the outcome when the job actor stops.
    pub done: oneshot::Sender<JobOutcome>,
    /// The coordinator's `/metrics` registry, when it serves one.
    pub metrics: Option<CoordinatorMetrics>,
}

pub enum TrainingMsg {
    /// An admitted connection or a worker's message.
    Peer(PeerMsg),
    /// Status or shutdown from the coordinator's handle.
    Control(ControlMsg),
    /// Periodic re-evaluation of timeouts.
    Tick,
}

job_message_conversions!(TrainingMsg);

pub struct TrainingState {
    pub(super) cfg: Arc<CoordinatorConfig>,
    membership_cfg: MembershipConfig,
    pub(super) membership: MembershipState,
    pub(super) steps: StepState,
    pub(super) metrics: JobMetrics,
    pub(super) sessions: Sessions,
    next_probe_nonce: u64,
    last_reason: Option<Reason>,
    aborted_steps: u64,
    finishing_since: Option<Instant>,
    /// Checkpoints ordered but not yet reported written, by committed steps.
    pub(super) pending_checkpoints: BTreeMap<u64, PendingCheckpoint>,
    /// Step count of the newest complete checkpoint (or the one resumed from): a leaving last
    /// holder of the state is checkpointed just in time when steps were committed since (and it
    /// is not writing a checkpoint of them already).
    pub(super) newest_complete_checkpoint: u64,
    /// A leaving worker kept until its just-in-time checkpoint is reported; while it is here,
    /// no step is opened and no generation formed.
    pub(super) jit_leaver: Option<JitLeaver>,
    /// Unique per coordinator start, so generation prefixes never reuse keys that workers' long-
    /// lived TCPStores still hold from before a coordinator restart.
    incarnation: u64,
    ticker: Option<JoinHandle<()>>,
    done: Option<oneshot::Sender<JobOutcome>>,
    stop_reason: StopReason,
}

impl Actor for TrainingJobActor {
    type Msg = TrainingMsg;
    type State = TrainingState;
    type Arguments = TrainingJobArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<TrainingMsg>,
        args: TrainingJobArgs,
    ) -> Result<TrainingState, ActorProcessingErr> {
        let ticker = myself.send_interval(args.cfg.timeouts.decision_tick_interval, || {
            TrainingMsg::Tick
        });
        let steps = crate::checkpoints::resume_steps(&args.cfg);
        Ok(TrainingState {
            membership_cfg: MembershipConfig::from_config(&args.cfg),
            metrics: JobMetrics::new(args.metrics, &args.cfg),
            membership: MembershipState::new(),
            newest_complete_checkpoint: steps.cursor().step,
            steps,
            pending_checkpoints: BTreeMap::new(),
            jit_leaver: None,
            incarnation: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or_default(),
            sessions: Sessions::new(args.cfg.timeouts.heartbeat_interval),
            cfg: args.cfg,
            next_probe_nonce: 0,
            last_reason: None,
            aborted_steps: 0,
            finishing_since: None,
            ticker: Some(ticker),
            done: Some(args.done),
            stop_reason: StopReason::Stopped,
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<TrainingMsg>,
        msg: TrainingMsg,
        state: &mut TrainingState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            TrainingMsg::Peer(PeerMsg::Admit { connection }) => {
                state.handle_admit(&myself, connection).await;
            }
            TrainingMsg::Peer(PeerMsg::FromWorker {
                worker,
                session,
                msg,
            }) => state.handle_worker(worker, session, msg),
            TrainingMsg::Tick => state.handle_tick(&myself),
            TrainingMsg::Control(ControlMsg::Status { reply }) => {
                if reply.send(state.status()).is_err() {
                    debug!("status requester went away");
                }
            }
            TrainingMsg::Control(ControlMsg::Shutdown { reason }) => {
                info!(%reason, "shutting down");
                state.sessions.close_all(CloseReason::Shutdown);
                state.stop(&myself, reason);
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        _myself: ActorRef<TrainingMsg>,
        event: SupervisionEvent,
        state: &mut TrainingState,
    ) -> Result<(), ActorProcessingErr> {
        if let Some(end) = state.sessions.ended(event) {
            state.handle_session_end(end);
        }
        Ok(())
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<TrainingMsg>,
        state: &mut TrainingState,
    ) -> Result<(), ActorProcessingErr> {
        if let Some(ticker) = state.ticker.take() {
            ticker.abort();
        }
        if let Some(done) = state.done.take() {
            let (recoveries, recovery_seconds) = state.metrics.recoveries();
            let outcome = JobOutcome {
                finished: state.membership.phase.is_finished(),
                eval: None,
                recoveries,
                recovery_seconds,
                stop_reason: state.stop_reason.clone(),
                cursor: state.steps.cursor(),
                generation: state.membership.generation,
                ledger: state.steps.ledger().clone(),
                aborted_steps: state.aborted_steps,
            };
            if done.send(outcome).is_err() {
                debug!("nobody waits for the job outcome");
            }
        }
        Ok(())
    }
}

impl TrainingState {
    fn stop(&mut self, myself: &ActorRef<TrainingMsg>, reason: StopReason) {
        myself.stop(Some(reason.to_string()));
        self.stop_reason = reason;
    }

    async fn handle_admit(&mut self, myself: &ActorRef<TrainingMsg>, c: AdmittedConnection) {
        let now = Instant::now();
        let worker = c.hello.worker_id.clone();
        let mut store = c.hello.store.clone();
        if store.host.is_empty() {
            store.host = c.remote.ip().to_string();
        }
        let key = self.sessions.next_key();
        let joined = self
            .membership
            .join(now, worker.clone(), key, store, &self.membership_cfg);
        let replaced = match joined {
            Ok(replaced) => replaced,
            Err(e) => {
                let reason = match e {
                    membership::MembershipError::JobFull { max_workers } => {
                        Refusal::JobFull { max_workers }
                    }
                    _ => Refusal::JobFinished,
                };
                info!(worker_id = %worker, %reason, "join refused");
                refuse_later(c, reason);
                return;
            }
        };
        if replaced.is_some() {
            self.metrics.worker_disconnected(now, &self.membership);
            self.sessions.remove(&worker, CloseReason::Replaced);
            self.abort_open_step_if_voter(&worker, member_lost(&worker));
        }
        if self.sessions.start(myself, key, c).await {
            self.metrics.worker_joined();
        } else {
            self.membership.remove(&worker, Some(key));
        }
        self.drive(now);
    }

    fn handle_worker(&mut self, worker: WorkerId, session: SessionKey, msg: WorkerToCoordinator) {
        let now = Instant::now();
        if !self.sessions.is_current(&worker, session) {
            debug!(worker_id = %worker, kind = msg.kind(), "message from a replaced session ignored");
            return;
        }
        match msg {
            WorkerToCoordinator::Heartbeat { .. } => {
                self.membership.heartbeat(now, &worker, session);
                return;
            }
            WorkerToCoordinator::GroupReady { generation } => {
                if let Err(e) = self.membership.group_ready(&worker, generation) {
                    warn!(worker_id = %worker, cause = %e, "ready report refused");
                }
            }
            WorkerToCoordinator::Vote {
                generation,
                step,
                outcome,
            } => self.handle_vote(now, &worker, generation, step, &outcome),
            WorkerToCoordinator::ProbeAck { nonce } => {
                self.membership.probe_ack(now, &worker, nonce);
            }
            WorkerToCoordinator::Leaving { generation, reason } => {
                info!(worker_id = %worker, %generation, %reason, "worker leaving");
                self.metrics.worker_left(now, &self.membership);
                self.handle_leaving(now, &worker);
            }
            WorkerToCoordinator::CheckpointWritten {
                generation,
                step,
                files,
            } => {
                info!(worker_id = %worker, %generation, step, files = files.len(), "checkpoint written");
                self.handle_checkpoint_written(&worker, step, files);
            }
            WorkerToCoordinator::EvalLeaseRequest { .. }
            | WorkerToCoordinator::EvalLeaseRenew { .. }
            | WorkerToCoordinator::EvalFeatures { .. }
            | WorkerToCoordinator::EvalLeaseComplete { .. } => {
                warn!(worker_id = %worker, kind = msg.kind(), "evaluation message in a training job (its coordinator config has no eval section); ignored");
            }
            WorkerToCoordinator::Hello(_) => {
                warn!(worker_id = %worker, "second hello on an admitted session");
                let reason = CloseReason::ProtocolError("hello after admission".into());
                self.sessions.close(&worker, reason);
            }
        }
        self.drive(now);
    }

    fn handle_vote(
        &mut self,
        now: Instant,
        worker: &WorkerId,
        generation: Generation,
        step: u64,
        outcome: &VoteOutcome,
    ) {
        if let Err(e) = self.membership.check_generation(worker, generation) {
            warn!(worker_id = %worker, cause = %e, "vote refused");
            return;
        }
        match self.steps.vote(worker, generation, step, outcome) {
            Ok(VoteResult::Pending { missing }) => {
                debug!(worker_id = %worker, step, missing, "vote");
            }
            Ok(VoteResult::Commit { generation, step }) => {
                self.membership.step_open = false;
                self.metrics.step_committed(now, &self.steps);
                let checkpoint = self.order_due_checkpoint(now, generation, step);
                debug!(%generation, step, "commit");
                self.broadcast_roster(CoordinatorToWorker::Commit {
                    generation,
                    step,
                    checkpoint,
                });
            }
            Ok(VoteResult::Abort {
                generation,
                step,
                reason,
            }) => {
                self.on_abort(generation, step, reason);
                self.start_probe(now);
            }
            Err(e) => warn!(worker_id = %worker, cause = %e, "vote refused"),
        }
    }

    fn handle_tick(&mut self, myself: &ActorRef<TrainingMsg>) {
        let now = Instant::now();
        if let Some(since) = self.finishing_since {
            if self.sessions.is_empty() || now.duration_since(since) >= FINISH_GRACE {
                self.stop(myself, StopReason::ScheduleComplete);
            }
            return;
        }
        let jit_expired = self
            .jit_leaver
            .as_ref()
            .is_some_and(|l| now.duration_since(l.since) >= JIT_CHECKPOINT_TIMEOUT);
        if jit_expired {
            if let Some(leaver) = self.jit_leaver.take() {
                warn!(worker_id = %leaver.worker, step = leaver.steps, timeout = ?JIT_CHECKPOINT_TIMEOUT, "just-in-time checkpoint not reported within JIT_CHECKPOINT_TIMEOUT; the worker is removed without it");
                self.pending_checkpoints.remove(&leaver.steps);
                self.remove_member(&leaver.worker, CloseReason::Left);
            }
        }
        if self.steps.timed_out(now, self.cfg.timeouts.step_timeout) {
            if let Some(VoteResult::Abort {
                generation,
                step,
                reason,
            }) = self.steps.abort(AbortReason::Timeout)
            {
                warn!(%generation, step, "step timed out");
                self.on_abort(generation, step, reason);
                self.start_probe(now);
            }
        }
        self.drive(now);
    }

    fn handle_session_end(&mut self, end: SessionEnd) {
        let SessionEnd { worker, key, why } = end;
        info!(worker_id = %worker, cause = %why, "session ended");
        if let Some(leaver) = self.jit_leaver.take_if(|l| l.worker == worker) {
            warn!(worker_id = %worker, step = leaver.steps, "the leaving worker's session ended before its just-in-time checkpoint was reported");
            self.pending_checkpoints.remove(&leaver.steps);
        }
        if self.membership.remove(&worker, Some(key)) {
            self.metrics
                .session_ended(Instant::now(), &why, &self.membership);
            self.abort_open_step_if_voter(&worker, member_lost(&worker));
        }
        self.drive(Instant::now());
    }

    /// Removes a member (dead or leaving), closes its session and aborts its open step.
    pub(super) fn remove_member(&mut self, worker: &WorkerId, reason: CloseReason) {
        self.sessions.remove(worker, reason);
        if self.membership.remove(worker, None) {
            self.abort_open_step_if_voter(worker, member_lost(worker));
        }
    }

    pub(super) fn abort_open_step_if_voter(&mut self, worker: &WorkerId, reason: AbortReason) {
        let is_voter = self
            .steps
            .open_step()
            .is_some_and(|o| o.voters.contains(worker));
        if !is_voter {
            return;
        }
        if let Some(VoteResult::Abort {
            generation,
            step,
            reason,
        }) = self.steps.abort(reason)
        {
            self.on_abort(generation, step, reason);
        }
    }

    fn on_abort(&mut self, generation: Generation, step: u64, reason: AbortReason) {
        info!(%generation, step, ?reason, "step aborted");
        self.aborted_steps += 1;
        self.metrics.step_aborted(Instant::now());
        self.membership.step_open = false;
        self.broadcast_roster(CoordinatorToWorker::Abort {
            generation,
            step,
            reason,
        });
    }

    fn start_probe(&mut self, now: Instant) {
        self.next_probe_nonce += 1;
        let nonce = self.next_probe_nonce;
        self.membership.start_probe(now, nonce);
        self.broadcast_members(CoordinatorToWorker::Probe { nonce });
    }

    /// Runs membership decisions until there is nothing left to do, then opens the next step
    /// when the generation is training.
    fn drive(&mut self, now: Instant) {
        if self.jit_leaver.is_some() {
            // Newcomers and the next step wait for the leaving holder's checkpoint.
            return;
        }
        // Each action changes the state so that the next decision differs; the bound only
        // guards against a bug turning that into a busy loop.
        for _ in 0..16 {
            let decision = membership::decide(now, &self.membership, &self.membership_cfg);
            if self.last_reason.as_ref() != Some(&decision.reason) {
                info!(decision = %decision, "membership");
                self.last_reason = Some(decision.reason.clone());
            }
            match decision.action {
                Action::Wait => break,
                Action::DeclareDead { workers } => {
                    for worker in workers {
                        warn!(worker_id = %worker, reason = %decision.reason, "declared dead");
                        let m = &self.membership;
                        let since = fault_onset(now, &decision.reason, m, &worker, &self.cfg);
                        self.metrics
                            .worker_declared_dead(since, &decision.reason, m);
                        self.remove_member(&worker, CloseReason::DeclaredDead);
                    }
                }
                Action::FormGeneration => self.form_generation(now),
                Action::StartTraining => {
                    self.membership.start_training();
                    info!(generation = %self.membership.generation, world_size = self.membership.roster.len(), "training");
                }
                Action::Pause => {
                    self.membership.pause();
                    self.broadcast_members(CoordinatorToWorker::Paused {
                        reason: decision.reason.to_string(),
                    });
                    break;
                }
            }
        }
        self.open_next_step(now);
    }

    fn form_generation(&mut self, now: Instant) {
        let roster = self.membership.form_generation(now).to_vec();
        let generation = self.membership.generation;
        let world_size = roster.len();
        self.metrics
            .generation_formed(generation, world_size, &self.steps);
        let Some(store) = roster
            .first()
            .and_then(|w| self.membership.members.get(w))
            .map(|m| m.store.clone())
        else {
            return;
        };
        let rendezvous = Rendezvous {
            store_host: store.host,
            store_port: store.port,
            prefix: format!("eqim/{}/gen{}", self.incarnation, generation.0),
        };
        info!(%generation, world_size = roster.len(), ?roster, "generation formed");
        let world_size = u32::try_from(roster.len()).expect("world size fits in u32");
        let resume = self.steps.cursor();
        for (rank, worker) in roster.iter().enumerate() {
            self.sessions.send(
                worker,
                CoordinatorToWorker::Welcome {
                    generation,
                    rank: rank as u32,
                    world_size,
                    rendezvous: rendezvous.clone(),
                    resume,
                },
            );
        }
    }

    fn open_next_step(&mut self, now: Instant) {
        if !self.membership.phase.is_training()
            || self.steps.open_step().is_some()
            || !self.membership.roster_is_current()
        {
            return;
        }
        if self.steps.is_finished() {
            // The last checkpoint completes before the workers are let go.
            if self.checkpoints_still_pending() {
                return;
            }
            self.finish(now);
            return;
        }
        let roster = self.membership.roster.clone();
        match self.steps.open(now, self.membership.generation, &roster) {
            Ok(assignments) => {
                self.membership.step_open = true;
                for (worker, assignment) in roster.iter().zip(assignments) {
                    self.sessions
                        .send(worker, CoordinatorToWorker::Assign(assignment));
                }
            }
            Err(e) => warn!(cause = %e, "cannot open a step"),
        }
    }

    fn finish(&mut self, now: Instant) {
        info!(cursor = ?self.steps.cursor(), aborted_steps = self.aborted_steps, "schedule complete");
        for coverage in self.steps.ledger().summary() {
            info!(%coverage, "ledger");
        }
        self.membership.finish();
        self.broadcast_members(CoordinatorToWorker::Finished {
            reason: StopReason::ScheduleComplete.to_string(),
        });
        self.sessions.close_all(CloseReason::Finished);
        self.finishing_since = Some(now);
    }

    pub(super) fn broadcast_roster(&self, msg: CoordinatorToWorker) {
        for worker in &self.membership.roster {
            self.sessions.send(worker, msg.clone());
        }
    }

    fn broadcast_members(&self, msg: CoordinatorToWorker) {
        for worker in self.membership.members.keys() {
            self.sessions.send(worker, msg.clone());
        }
    }

    fn status(&self) -> JobStatus {
        JobStatus {
            generation: self.membership.generation,
            phase: format!("{:?}", self.membership.phase),
            members: self.membership.members.keys().cloned().collect(),
            roster: self.membership.roster.clone(),
            cursor: self.steps.cursor(),
            coverage: self.steps.ledger().summary(),
            aborted_steps: self.aborted_steps,
        }
    }
}

pub(super) fn member_lost(worker: &WorkerId) -> AbortReason {
    AbortReason::MemberLost {
        worker: worker.clone(),
    }
}

/// When a death's effect began, which is where its recovery is timed from: for a heartbeat
/// timeout, the first heartbeat that did not arrive (the last one seen plus one interval), not
/// the moment the timeout expired; otherwise now (a failed vote already started the clock).
fn fault_onset(
    now: Instant,
    reason: &Reason,
    membership: &MembershipState,
    worker: &WorkerId,
    cfg: &CoordinatorConfig,
) -> Instant {
    match (reason, membership.members.get(worker)) {
        (Reason::HeartbeatTimeout, Some(member)) => {
            (member.last_heartbeat + cfg.timeouts.heartbeat_interval).min(now)
        }
        _ => now,
    }
}
