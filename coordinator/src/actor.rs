//! The job actor: supervisor of the worker sessions and owner of the job's truth (membership and
//! steps, both plain state structs). It feeds events into them, asks
//! [`membership::decide`](crate::membership::decide) what to do on every event and tick, and
//! executes the decision by sending messages to sessions. The message flow is described in
//! [`crate::net`].

use crate::eval::{EvalOutcome, EvalState, Outgoing};
use crate::jit_checkpoint::{needs_jit_checkpoint, JitDecision};
use crate::membership::{self, Action, MembershipConfig, MembershipState, Reason, SessionKey};
use crate::net::listener::refuse;
use crate::net::session::{CloseReason, SessionActor, SessionArgs, SessionMsg};
use crate::steps::{StepState, VoteResult};
use eqim_common::coordinator_config::CoordinatorConfig;
use eqim_common::ledger::{EpochCoverage, Ledger};
use eqim_common::proto::{
    AbortReason, CheckpointOrder, CoordinatorToWorker, Cursor, Generation, Hello, Refusal,
    Rendezvous, VoteOutcome, WorkerId, WorkerToCoordinator, JIT_CHECKPOINT_TIMEOUT,
};
use ractor::{Actor, ActorId, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

/// After `Finished`, how long to wait for sessions to close before stopping anyway.
const FINISH_GRACE: Duration = Duration::from_secs(3);

pub struct JobActor;

pub struct JobArgs {
    pub cfg: Arc<CoordinatorConfig>,
    /// Receives the outcome when the job actor stops.
    pub done: oneshot::Sender<JobOutcome>,
    /// The coordinator's `/metrics` registry, when it serves one.
    pub metrics: Option<eqim_common::metrics_registry::CoordinatorMetrics>,
}

/// What a job did, reported when the job actor stops.
#[derive(Debug, Clone)]
pub struct JobOutcome {
    pub finished: bool,
    pub stop_reason: String,
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

pub enum JobMsg {
    /// A connection passed the handshake (version and token); admit it as a member.
    Admit {
        hello: Hello,
        remote: SocketAddr,
        connection: quinn::Connection,
        control_send: quinn::SendStream,
        control_recv: quinn::RecvStream,
    },
    /// A message read from a session's control or heartbeat stream.
    FromWorker {
        worker: WorkerId,
        session: SessionKey,
        msg: WorkerToCoordinator,
    },
    /// Periodic re-evaluation of timeouts.
    Tick,
    /// Report the current state.
    Status { reply: RpcReplyPort<JobStatus> },
    /// Stop the job (Ctrl-C): close every session.
    Shutdown { reason: String },
    /// The evaluation's FID and manifest are computed and written (off the actor's thread).
    EvalFinished {
        outcome: Result<EvalOutcome, String>,
    },
}

/// A checkpoint ordered and not yet reported written.
struct PendingCheckpoint {
    dir: std::path::PathBuf,
    since: Instant,
    /// The member ordered to write the state.
    writer: Option<WorkerId>,
}

/// A worker that announced it is leaving and is kept for a just-in-time checkpoint.
struct JitLeaver {
    worker: WorkerId,
    /// The checkpoint awaited: after this many committed steps.
    steps: u64,
    since: Instant,
}

struct SessionEntry {
    key: SessionKey,
    actor: ActorRef<SessionMsg>,
}

pub struct JobState {
    cfg: Arc<CoordinatorConfig>,
    membership_cfg: MembershipConfig,
    membership: MembershipState,
    steps: StepState,
    metrics: crate::job_metrics::JobMetrics,
    sessions: BTreeMap<WorkerId, SessionEntry>,
    /// Which worker and connection each session actor serves, for supervision events.
    session_owners: BTreeMap<ActorId, (WorkerId, SessionKey)>,
    next_session: u64,
    next_probe_nonce: u64,
    last_reason: Option<Reason>,
    aborted_steps: u64,
    finishing_since: Option<Instant>,
    /// Checkpoints ordered but not yet reported written: committed steps -> (directory, since).
    pending_checkpoints: BTreeMap<u64, PendingCheckpoint>,
    /// Step count of the newest complete checkpoint (or the one resumed from): a leaving last
    /// holder of the state is checkpointed just in time when steps were committed since (and it
    /// is not writing a checkpoint of them already).
    newest_complete_checkpoint: u64,
    /// A leaving worker kept until its just-in-time checkpoint is reported; while it is here,
    /// no step is opened and no generation formed.
    jit_leaver: Option<JitLeaver>,
    /// Unique per coordinator start, so generation prefixes never reuse keys that workers' long-
    /// lived TCPStores still hold from before a coordinator restart.
    incarnation: u64,
    ticker: Option<JoinHandle<()>>,
    done: Option<oneshot::Sender<JobOutcome>>,
    stop_reason: String,
    /// Present in an evaluation job (config `eval:`), which has no membership generations and
    /// no steps: workers lease image indices instead.
    eval: Option<EvalState>,
    eval_finishing: bool,
    eval_outcome: Option<EvalOutcome>,
}

impl Actor for JobActor {
    type Msg = JobMsg;
    type State = JobState;
    type Arguments = JobArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<JobMsg>,
        args: JobArgs,
    ) -> Result<JobState, ActorProcessingErr> {
        let ticker =
            myself.send_interval(args.cfg.timeouts.decision_tick_interval, || JobMsg::Tick);
        let eval = args
            .cfg
            .eval
            .clone()
            .map(|e| EvalState::new(e, &args.cfg.job_dir));
        let steps = crate::checkpoints::resume_steps(&args.cfg);
        Ok(JobState {
            membership_cfg: MembershipConfig::from_config(&args.cfg),
            metrics: crate::job_metrics::JobMetrics::new(args.metrics, &args.cfg),
            membership: MembershipState::new(),
            newest_complete_checkpoint: steps.cursor().step,
            steps,
            pending_checkpoints: BTreeMap::new(),
            jit_leaver: None,
            incarnation: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or_default(),
            cfg: args.cfg,
            sessions: BTreeMap::new(),
            session_owners: BTreeMap::new(),
            next_session: 0,
            next_probe_nonce: 0,
            last_reason: None,
            aborted_steps: 0,
            finishing_since: None,
            ticker: Some(ticker),
            done: Some(args.done),
            stop_reason: "stopped".into(),
            eval,
            eval_finishing: false,
            eval_outcome: None,
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<JobMsg>,
        msg: JobMsg,
        state: &mut JobState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            JobMsg::Admit {
                hello,
                remote,
                connection,
                control_send,
                control_recv,
            } => {
                let conn = AdmittedConnection {
                    hello,
                    remote,
                    connection,
                    control_send,
                    control_recv,
                };
                if state.eval.is_some() {
                    state.admit_eval_worker(&myself, conn).await;
                } else {
                    state.handle_admit(&myself, conn).await;
                }
            }
            JobMsg::FromWorker {
                worker,
                session,
                msg,
            } => state.handle_worker(worker, session, msg),
            JobMsg::Tick if state.eval.is_some() => state.eval_tick(&myself),
            JobMsg::Tick => state.handle_tick(&myself),
            JobMsg::EvalFinished { outcome } => {
                match outcome {
                    Ok(outcome) => {
                        info!(images = outcome.images, seconds = outcome.seconds, fid = ?outcome.fid, manifest = %outcome.manifest.display(), "evaluation complete");
                        state.eval_outcome = Some(outcome);
                        state.stop_reason = "evaluation complete".into();
                    }
                    Err(e) => {
                        warn!(cause = %e, "evaluation could not be finished");
                        state.stop_reason = format!("evaluation failed: {e}");
                    }
                }
                let reason = state.stop_reason.clone();
                myself.stop(Some(reason));
            }
            JobMsg::Status { reply } => {
                if reply.send(state.status()).is_err() {
                    debug!("status requester went away");
                }
            }
            JobMsg::Shutdown { reason } => {
                info!(%reason, "shutting down");
                for entry in state.sessions.values() {
                    close_session(entry, CloseReason::Shutdown);
                }
                state.stop_reason = reason.clone();
                myself.stop(Some(reason));
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        _myself: ActorRef<JobMsg>,
        event: SupervisionEvent,
        state: &mut JobState,
    ) -> Result<(), ActorProcessingErr> {
        let (cell, why) = match event {
            SupervisionEvent::ActorTerminated(cell, _, reason) => {
                (cell, reason.unwrap_or_else(|| "stopped".into()))
            }
            SupervisionEvent::ActorFailed(cell, err) => (cell, format!("failed: {err}")),
            _ => return Ok(()),
        };
        if let Some((worker, key)) = state.session_owners.remove(&cell.get_id()) {
            state.handle_session_end(worker, key, &why);
        }
        Ok(())
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<JobMsg>,
        state: &mut JobState,
    ) -> Result<(), ActorProcessingErr> {
        if let Some(ticker) = state.ticker.take() {
            ticker.abort();
        }
        if let Some(done) = state.done.take() {
            let outcome = JobOutcome {
                finished: state.membership.phase.is_finished() || state.eval_outcome.is_some(),
                eval: state.eval_outcome.take(),
                recoveries: state.metrics.recoveries().0,
                recovery_seconds: state.metrics.recoveries().1,
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

struct AdmittedConnection {
    hello: Hello,
    remote: SocketAddr,
    connection: quinn::Connection,
    control_send: quinn::SendStream,
    control_recv: quinn::RecvStream,
}

fn close_session(entry: &SessionEntry, reason: CloseReason) {
    if entry.actor.cast(SessionMsg::Close { reason }).is_err() {
        debug!("session already stopped");
    }
}

impl JobState {
    async fn handle_admit(&mut self, myself: &ActorRef<JobMsg>, mut c: AdmittedConnection) {
        let now = Instant::now();
        let worker = c.hello.worker_id.clone();
        let mut store = c.hello.store.clone();
        if store.host.is_empty() {
            store.host = c.remote.ip().to_string();
        }
        self.next_session += 1;
        let key = SessionKey(self.next_session);
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
                tokio::spawn(async move {
                    refuse(&c.connection, &mut c.control_send, reason).await;
                });
                return;
            }
        };
        if replaced.is_some() {
            self.metrics.worker_disconnected(now, &self.membership);
            if let Some(old) = self.sessions.remove(&worker) {
                close_session(&old, CloseReason::Replaced);
            }
            self.abort_open_step_if_voter(
                &worker,
                AbortReason::MemberLost {
                    worker: worker.clone(),
                },
            );
        }
        if self.start_session(myself, key, c).await {
            self.metrics.worker_joined();
        } else {
            self.membership.remove(&worker, Some(key));
        }
        self.drive(now);
    }

    /// Spawns the session actor of an admitted connection (linked, so its end comes back as a
    /// supervision event) and registers it; false if it did not start.
    async fn start_session(
        &mut self,
        myself: &ActorRef<JobMsg>,
        key: SessionKey,
        c: AdmittedConnection,
    ) -> bool {
        let worker = c.hello.worker_id.clone();
        let args = SessionArgs {
            worker: worker.clone(),
            key,
            connection: c.connection,
            control_send: c.control_send,
            control_recv: c.control_recv,
            job: myself.clone(),
            admitted: CoordinatorToWorker::Admitted {
                heartbeat_interval_ms: self.cfg.timeouts.heartbeat_interval.as_millis() as u64,
            },
        };
        match Actor::spawn_linked(None, SessionActor, args, myself.get_cell()).await {
            Ok((actor, _handle)) => {
                info!(worker_id = %worker, remote = %c.remote, device = %c.hello.device, "worker admitted");
                self.session_owners
                    .insert(actor.get_id(), (worker.clone(), key));
                self.sessions.insert(worker, SessionEntry { key, actor });
                true
            }
            Err(e) => {
                warn!(worker_id = %worker, cause = %e, "session did not start");
                false
            }
        }
    }

    fn handle_worker(&mut self, worker: WorkerId, session: SessionKey, msg: WorkerToCoordinator) {
        let now = Instant::now();
        let current = self.sessions.get(&worker).is_some_and(|s| s.key == session);
        if !current {
            debug!(worker_id = %worker, kind = msg.kind(), "message from a replaced session ignored");
            return;
        }
        if self.eval.is_some() {
            self.handle_eval_message(now, worker, msg);
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
                match self.pending_checkpoints.remove(&step) {
                    Some(PendingCheckpoint { dir, since, .. }) => {
                        let root = self.cfg.checkpoint_root();
                        if crate::checkpoints::complete(&dir, step, files, root) {
                            self.metrics.checkpoint_completed();
                            self.newest_complete_checkpoint =
                                self.newest_complete_checkpoint.max(step);
                        }
                        info!(dir = %dir.display(), ms = since.elapsed().as_millis() as u64, "checkpoint complete");
                    }
                    None => warn!(step, "report of a checkpoint that was not ordered; ignored"),
                }
                let released = self
                    .jit_leaver
                    .as_ref()
                    .is_some_and(|l| l.worker == worker && l.steps == step);
                if released {
                    if let Some(leaver) = self.jit_leaver.take() {
                        info!(worker_id = %worker, step, ms = leaver.since.elapsed().as_millis() as u64, "just-in-time checkpoint complete; the worker may leave");
                    }
                    self.remove_member(&worker, CloseReason::Left);
                }
            }
            WorkerToCoordinator::EvalLeaseRequest { .. }
            | WorkerToCoordinator::EvalLeaseRenew { .. }
            | WorkerToCoordinator::EvalFeatures { .. }
            | WorkerToCoordinator::EvalLeaseComplete { .. } => {
                warn!(worker_id = %worker, kind = msg.kind(), "evaluation message in a training job (its coordinator config has no eval section); ignored");
            }
            WorkerToCoordinator::Hello(_) => {
                warn!(worker_id = %worker, "second hello on an admitted session");
                if let Some(entry) = self.sessions.get(&worker) {
                    close_session(
                        entry,
                        CloseReason::ProtocolError("hello after admission".into()),
                    );
                }
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
                let checkpoint = self
                    .steps
                    .checkpoint_due(step)
                    .then(|| {
                        crate::checkpoints::order(
                            &self.cfg.checkpoint_root(),
                            step + 1,
                            generation,
                            &self.steps,
                        )
                    })
                    .flatten()
                    .map(|(name, dir)| {
                        let pending = PendingCheckpoint {
                            dir,
                            since: now,
                            writer: self.membership.roster.first().cloned(),
                        };
                        self.pending_checkpoints.insert(step + 1, pending);
                        CheckpointOrder {
                            writer_rank: 0,
                            name,
                        }
                    });
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

    fn handle_tick(&mut self, myself: &ActorRef<JobMsg>) {
        let now = Instant::now();
        if let Some(since) = self.finishing_since {
            if self.sessions.is_empty() || now.duration_since(since) >= FINISH_GRACE {
                self.stop_reason = "schedule complete".into();
                myself.stop(Some("schedule complete".into()));
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

    fn handle_session_end(&mut self, worker: WorkerId, key: SessionKey, why: &str) {
        let current = self.sessions.get(&worker).is_some_and(|s| s.key == key);
        if !current {
            return;
        }
        info!(worker_id = %worker, cause = %why, "session ended");
        self.sessions.remove(&worker);
        if let Some(leaver) = self.jit_leaver.take_if(|l| l.worker == worker) {
            warn!(worker_id = %worker, step = leaver.steps, "the leaving worker's session ended before its just-in-time checkpoint was reported");
            self.pending_checkpoints.remove(&leaver.steps);
        }
        if let Some(eval) = self.eval.as_mut() {
            let out = eval.on_worker_lost(Instant::now(), &worker);
            self.send_all(out);
            return;
        }
        if self.membership.remove(&worker, Some(key)) {
            self.metrics
                .session_ended(Instant::now(), why, &self.membership);
            self.abort_open_step_if_voter(
                &worker,
                AbortReason::MemberLost {
                    worker: worker.clone(),
                },
            );
        }
        self.drive(Instant::now());
    }

    /// A worker announced it is leaving: remove it now, or, when it is the last holder of the
    /// training state and steps were committed since the newest checkpoint, abort the open step
    /// and order a just-in-time checkpoint of the committed state first.
    fn handle_leaving(&mut self, now: Instant, worker: &WorkerId) {
        if self.jit_leaver.is_some() {
            // Only the last holder is ever kept, and it is the only member left to leave.
            self.remove_member(worker, CloseReason::Left);
            return;
        }
        let committed = self.steps.cursor().step;
        // A checkpoint the leaver itself is writing will be finished (and reported) before it
        // goes; one ordered from a member already gone never will.
        let writing = self
            .pending_checkpoints
            .iter()
            .filter(|(_, p)| p.writer.as_ref() == Some(worker))
            .map(|(steps, _)| *steps)
            .max();
        let newest = self
            .newest_complete_checkpoint
            .max(writing.unwrap_or_default());
        let decision = needs_jit_checkpoint(
            worker,
            &self.membership,
            committed,
            newest,
            writing == Some(newest),
        );
        let (steps, order) = match decision {
            JitDecision::RemoveNow(why) => {
                debug!(worker_id = %worker, %why, "no just-in-time checkpoint");
                self.remove_member(worker, CloseReason::Left);
                return;
            }
            JitDecision::AwaitPending { steps } => (steps, false),
            JitDecision::Order { steps } => (steps, true),
        };
        // The checkpoint is of committed steps only: the open step is dropped everywhere, so
        // that no late vote commits a step the checkpoint would miss.
        self.abort_open_step_if_voter(
            worker,
            AbortReason::MemberLost {
                worker: worker.clone(),
            },
        );
        if order {
            let generation = self.membership.generation;
            let root = self.cfg.checkpoint_root();
            let Some((name, dir)) =
                crate::checkpoints::order(&root, steps, generation, &self.steps)
            else {
                self.remove_member(worker, CloseReason::Left);
                return;
            };
            info!(worker_id = %worker, steps, dir = %dir.display(), "last holder of the state leaving; just-in-time checkpoint ordered");
            let pending = PendingCheckpoint {
                dir,
                since: now,
                writer: Some(worker.clone()),
            };
            self.pending_checkpoints.insert(steps, pending);
            let order = CoordinatorToWorker::CheckpointNow {
                generation,
                steps,
                name,
            };
            self.send(worker, order);
        } else {
            info!(worker_id = %worker, steps, "last holder of the state leaving; waiting for its checkpoint in progress");
        }
        self.jit_leaver = Some(JitLeaver {
            worker: worker.clone(),
            steps,
            since: now,
        });
    }

    /// Removes a member (dead or leaving), closes its session and aborts its open step.
    fn remove_member(&mut self, worker: &WorkerId, reason: CloseReason) {
        if let Some(entry) = self.sessions.remove(worker) {
            close_session(&entry, reason);
        }
        if self.membership.remove(worker, None) {
            self.abort_open_step_if_voter(
                worker,
                AbortReason::MemberLost {
                    worker: worker.clone(),
                },
            );
        }
    }

    fn abort_open_step_if_voter(&mut self, worker: &WorkerId, reason: AbortReason) {
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
                        self.metrics.worker_declared_dead(now, &decision.reason, m);
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
            self.send(
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
            let timeout = self.cfg.timeouts.step_timeout;
            self.pending_checkpoints.retain(|step, pending| {
                let waiting = pending.since.elapsed() < timeout;
                if !waiting {
                    warn!(
                        step,
                        "checkpoint not reported within the step timeout; given up"
                    );
                }
                waiting
            });
            if !self.pending_checkpoints.is_empty() {
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
                    self.send(worker, CoordinatorToWorker::Assign(assignment));
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
            reason: "schedule complete".into(),
        });
        for entry in self.sessions.values() {
            close_session(entry, CloseReason::Finished);
        }
        self.finishing_since = Some(now);
    }

    fn send(&self, worker: &WorkerId, msg: CoordinatorToWorker) {
        if let Some(entry) = self.sessions.get(worker) {
            if entry.actor.cast(SessionMsg::Send { msg }).is_err() {
                // Its end arrives as a supervision event and is handled there.
                debug!(worker_id = %worker, "session already stopped");
            }
        }
    }

    fn broadcast_roster(&self, msg: CoordinatorToWorker) {
        for worker in &self.membership.roster {
            self.send(worker, msg.clone());
        }
    }

    fn broadcast_members(&self, msg: CoordinatorToWorker) {
        for worker in self.membership.members.keys() {
            self.send(worker, msg.clone());
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

/// Evaluation jobs: sessions without membership generations; the messages are lease traffic.
impl JobState {
    async fn admit_eval_worker(&mut self, myself: &ActorRef<JobMsg>, mut c: AdmittedConnection) {
        let worker = c.hello.worker_id.clone();
        let refusal = if self.eval_finishing {
            Some(Refusal::JobFinished)
        } else if !self.sessions.contains_key(&worker)
            && self.sessions.len() >= self.cfg.max_workers as usize
        {
            Some(Refusal::JobFull {
                max_workers: self.cfg.max_workers,
            })
        } else {
            None
        };
        if let Some(reason) = refusal {
            info!(worker_id = %worker, %reason, "eval worker refused");
            tokio::spawn(async move {
                refuse(&c.connection, &mut c.control_send, reason).await;
            });
            return;
        }
        if let Some(old) = self.sessions.remove(&worker) {
            // A reconnect under the same name: the old session's leases go back first.
            close_session(&old, CloseReason::Replaced);
            if let Some(eval) = self.eval.as_mut() {
                let out = eval.on_worker_lost(Instant::now(), &worker);
                self.send_all(out);
            }
        }
        self.next_session += 1;
        let key = SessionKey(self.next_session);
        if self.start_session(myself, key, c).await {
            self.metrics.worker_joined();
        }
    }

    fn handle_eval_message(&mut self, now: Instant, worker: WorkerId, msg: WorkerToCoordinator) {
        let Some(eval) = self.eval.as_mut() else {
            return;
        };
        let out = match msg {
            // Liveness is the QUIC idle timeout (a dead process) and the lease timeout (a hung
            // one: leases are renewed on progress only).
            WorkerToCoordinator::Heartbeat { .. } | WorkerToCoordinator::ProbeAck { .. } => return,
            WorkerToCoordinator::EvalLeaseRequest { plan, max_images } => {
                eval.on_request(now, &worker, plan, max_images)
            }
            WorkerToCoordinator::EvalLeaseRenew { lease } => {
                eval.on_renew(now, &worker, lease);
                return;
            }
            WorkerToCoordinator::EvalFeatures {
                lease,
                first_index,
                dim,
                rows,
            } => {
                if let Err(e) = eval.on_features(&worker, lease, first_index, dim, rows) {
                    warn!(worker_id = %worker, cause = %e, "bad eval features; closing the session");
                    if let Some(entry) = self.sessions.get(&worker) {
                        close_session(entry, CloseReason::ProtocolError(e));
                    }
                }
                return;
            }
            WorkerToCoordinator::EvalLeaseComplete { lease, files } => {
                eval.on_complete(now, &worker, lease, files)
            }
            WorkerToCoordinator::Leaving { reason, .. } => {
                info!(worker_id = %worker, %reason, "eval worker leaving");
                if let Some(entry) = self.sessions.remove(&worker) {
                    close_session(&entry, CloseReason::Left);
                }
                eval.on_worker_lost(now, &worker)
            }
            other => {
                warn!(worker_id = %worker, kind = other.kind(), "not an evaluation message; ignored");
                return;
            }
        };
        self.send_all(out);
    }

    fn eval_tick(&mut self, myself: &ActorRef<JobMsg>) {
        let Some(eval) = self.eval.as_mut() else {
            return;
        };
        let out = eval.on_tick(Instant::now());
        self.send_all(out);
        if self.eval_finishing || !self.eval.as_ref().is_some_and(EvalState::is_finished) {
            return;
        }
        self.eval_finishing = true;
        for worker in self.sessions.keys() {
            self.send(worker, CoordinatorToWorker::EvalDone);
        }
        for entry in self.sessions.values() {
            close_session(entry, CloseReason::Finished);
        }
        let results = match self.eval.as_mut().map(|e| e.take_results(Instant::now())) {
            Some(Ok(results)) => results,
            Some(Err(e)) => {
                warn!(cause = %e, "evaluation could not be finished");
                return;
            }
            None => return,
        };
        let myself = myself.clone();
        tokio::spawn(async move {
            let result = tokio::task::spawn_blocking(move || results.finish())
                .await
                .map_err(|e| format!("the finishing task failed: {e}"))
                .and_then(|r| r.map_err(|e| e.to_string()));
            if myself
                .cast(JobMsg::EvalFinished { outcome: result })
                .is_err()
            {
                debug!("job actor stopped before the evaluation finished");
            }
        });
    }

    /// Sends an evaluation step's messages and publishes the progress it made.
    fn send_all(&self, out: Vec<Outgoing>) {
        for (worker, msg) in out {
            self.send(&worker, msg);
        }
        if let Some(eval) = &self.eval {
            let (done, total) = eval.progress();
            self.metrics.set_eval_progress(done, total);
        }
    }
}
