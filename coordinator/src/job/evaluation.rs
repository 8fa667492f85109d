//! The evaluation job actor: sessions without membership generations or steps; workers lease
//! image indices from the [`EvalState`] book, and when every image is in, the FID and manifest
//! are computed off the actor's thread and the job stops.

use super::sessions::{refuse_later, SessionEnd, Sessions};
use super::{
    job_message_conversions, AdmittedConnection, ControlMsg, JobOutcome, JobStatus, PeerMsg,
    StopReason,
};
use crate::eval::{EvalOutcome, EvalState, Outgoing};
use crate::job_metrics::JobMetrics;
use crate::membership::SessionKey;
use crate::net::session::CloseReason;
use eqim_common::coordinator_config::{CoordinatorConfig, EvalServing};
use eqim_common::ledger::Ledger;
use eqim_common::metrics_registry::CoordinatorMetrics;
use eqim_common::proto::{
    CoordinatorToWorker, Cursor, Generation, Refusal, WorkerId, WorkerToCoordinator,
};
use ractor::{Actor, ActorProcessingErr, ActorRef, SupervisionEvent};
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

/// The evaluation job actor (its config is the [`EvalJobArgs`] it starts with).
pub struct EvalJobActor;

pub struct EvalJobArgs {
    pub cfg: Arc<CoordinatorConfig>,
    /// The config's `eval:` section.
    pub eval: EvalServing,
    /// Receives the outcome when the job actor stops.
    pub done: oneshot::Sender<JobOutcome>,
    /// The coordinator's `/metrics` registry, when it serves one.
    pub metrics: Option<CoordinatorMetrics>,
}

pub enum EvalMsg {
    /// An admitted connection or a worker's message.
    Peer(PeerMsg),
    /// Status or shutdown from the coordinator's handle.
    Control(ControlMsg),
    /// Periodic re-evaluation of lease timeouts and of whether every image is in.
    Tick,
    /// The evaluation's FID and manifest are computed and written (off the actor's thread).
    Finished {
        outcome: Result<EvalOutcome, String>,
    },
}

job_message_conversions!(EvalMsg);

pub struct EvalJobState {
    cfg: Arc<CoordinatorConfig>,
    leases: EvalState,
    metrics: JobMetrics,
    sessions: Sessions,
    /// Every image is in: no worker is admitted any more, the results are being finished.
    finishing: bool,
    outcome: Option<EvalOutcome>,
    ticker: Option<JoinHandle<()>>,
    done: Option<oneshot::Sender<JobOutcome>>,
    stop_reason: StopReason,
}

impl Actor for EvalJobActor {
    type Msg = EvalMsg;
    type State = EvalJobState;
    type Arguments = EvalJobArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<EvalMsg>,
        args: EvalJobArgs,
    ) -> Result<EvalJobState, ActorProcessingErr> {
        let ticker =
            myself.send_interval(args.cfg.timeouts.decision_tick_interval, || EvalMsg::Tick);
        Ok(EvalJobState {
            leases: EvalState::new(args.eval, &args.cfg.job_dir),
            metrics: JobMetrics::new(args.metrics, &args.cfg),
            sessions: Sessions::new(args.cfg.timeouts.heartbeat_interval),
            cfg: args.cfg,
            finishing: false,
            outcome: None,
            ticker: Some(ticker),
            done: Some(args.done),
            stop_reason: StopReason::Stopped,
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<EvalMsg>,
        msg: EvalMsg,
        state: &mut EvalJobState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            EvalMsg::Peer(PeerMsg::Admit { connection }) => {
                state.handle_admit(&myself, connection).await;
            }
            EvalMsg::Peer(PeerMsg::FromWorker {
                worker,
                session,
                msg,
            }) => state.handle_worker(worker, session, msg),
            EvalMsg::Tick => state.handle_tick(&myself),
            EvalMsg::Finished { outcome } => state.handle_finished(&myself, outcome),
            EvalMsg::Control(ControlMsg::Status { reply }) => {
                if reply.send(state.status()).is_err() {
                    debug!("status requester went away");
                }
            }
            EvalMsg::Control(ControlMsg::Shutdown { reason }) => {
                info!(%reason, "shutting down");
                state.sessions.close_all(CloseReason::Shutdown);
                state.stop(&myself, reason);
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        _myself: ActorRef<EvalMsg>,
        event: SupervisionEvent,
        state: &mut EvalJobState,
    ) -> Result<(), ActorProcessingErr> {
        if let Some(SessionEnd { worker, why, .. }) = state.sessions.ended(event) {
            info!(worker_id = %worker, cause = %why, "session ended");
            let out = state.leases.on_worker_lost(Instant::now(), &worker);
            state.send_all(out);
        }
        Ok(())
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<EvalMsg>,
        state: &mut EvalJobState,
    ) -> Result<(), ActorProcessingErr> {
        if let Some(ticker) = state.ticker.take() {
            ticker.abort();
        }
        if let Some(done) = state.done.take() {
            let (recoveries, recovery_seconds) = state.metrics.recoveries();
            let outcome = JobOutcome {
                finished: state.outcome.is_some(),
                eval: state.outcome.take(),
                recoveries,
                recovery_seconds,
                stop_reason: state.stop_reason.clone(),
                cursor: Cursor::default(),
                generation: Generation::default(),
                ledger: Ledger::default(),
                aborted_steps: 0,
            };
            if done.send(outcome).is_err() {
                debug!("nobody waits for the job outcome");
            }
        }
        Ok(())
    }
}

impl EvalJobState {
    fn stop(&mut self, myself: &ActorRef<EvalMsg>, reason: StopReason) {
        myself.stop(Some(reason.to_string()));
        self.stop_reason = reason;
    }

    async fn handle_admit(&mut self, myself: &ActorRef<EvalMsg>, c: AdmittedConnection) {
        let worker = c.hello.worker_id.clone();
        let refusal = if self.finishing {
            Some(Refusal::JobFinished)
        } else if !self.sessions.contains(&worker)
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
            refuse_later(c, reason);
            return;
        }
        if self.sessions.remove(&worker, CloseReason::Replaced) {
            // A reconnect under the same name: the old session's leases go back first.
            let out = self.leases.on_worker_lost(Instant::now(), &worker);
            self.send_all(out);
        }
        let key = self.sessions.next_key();
        if self.sessions.start(myself, key, c).await {
            self.metrics.worker_joined();
        }
    }

    fn handle_worker(&mut self, worker: WorkerId, session: SessionKey, msg: WorkerToCoordinator) {
        let now = Instant::now();
        if !self.sessions.is_current(&worker, session) {
            debug!(worker_id = %worker, kind = msg.kind(), "message from a replaced session ignored");
            return;
        }
        let out = match msg {
            // Liveness is the QUIC idle timeout (a dead process) and the lease timeout (a hung
            // one: leases are renewed on progress only).
            WorkerToCoordinator::Heartbeat { .. } | WorkerToCoordinator::ProbeAck { .. } => return,
            WorkerToCoordinator::EvalLeaseRequest { plan, max_images } => {
                self.leases.on_request(now, &worker, plan, max_images)
            }
            WorkerToCoordinator::EvalLeaseRenew { lease } => {
                self.leases.on_renew(now, &worker, lease);
                return;
            }
            WorkerToCoordinator::EvalFeatures {
                lease,
                first_index,
                dim,
                rows,
            } => {
                let stored = self
                    .leases
                    .on_features(&worker, lease, first_index, dim, rows);
                if let Err(e) = stored {
                    warn!(worker_id = %worker, cause = %e, "bad eval features; closing the session");
                    self.sessions.close(&worker, CloseReason::ProtocolError(e));
                }
                return;
            }
            WorkerToCoordinator::EvalLeaseComplete { lease, files } => {
                self.leases.on_complete(now, &worker, lease, files)
            }
            WorkerToCoordinator::Leaving { reason, .. } => {
                info!(worker_id = %worker, %reason, "eval worker leaving");
                self.sessions.remove(&worker, CloseReason::Left);
                self.leases.on_worker_lost(now, &worker)
            }
            other => {
                warn!(worker_id = %worker, kind = other.kind(), "not an evaluation message; ignored");
                return;
            }
        };
        self.send_all(out);
    }

    fn handle_tick(&mut self, myself: &ActorRef<EvalMsg>) {
        let out = self.leases.on_tick(Instant::now());
        self.send_all(out);
        if self.finishing || !self.leases.is_finished() {
            return;
        }
        self.finishing = true;
        for worker in self.sessions.workers() {
            self.sessions.send(worker, CoordinatorToWorker::EvalDone);
        }
        self.sessions.close_all(CloseReason::Finished);
        let results = match self.leases.take_results(Instant::now()) {
            Ok(results) => results,
            Err(e) => {
                warn!(cause = %e, "evaluation could not be finished");
                return;
            }
        };
        let myself = myself.clone();
        tokio::spawn(async move {
            let result = tokio::task::spawn_blocking(move || results.finish())
                .await
                .map_err(|e| format!("the finishing task failed: {e}"))
                .and_then(|r| r.map_err(|e| e.to_string()));
            if myself.cast(EvalMsg::Finished { outcome: result }).is_err() {
                debug!("job actor stopped before the evaluation finished");
            }
        });
    }

    fn handle_finished(
        &mut self,
        myself: &ActorRef<EvalMsg>,
        outcome: Result<EvalOutcome, String>,
    ) {
        let reason = match outcome {
            Ok(outcome) => {
                info!(images = outcome.images, seconds = outcome.seconds, fid = ?outcome.fid, manifest = %outcome.manifest.display(), "evaluation complete");
                self.outcome = Some(outcome);
                StopReason::EvalComplete
            }
            Err(e) => {
                warn!(cause = %e, "evaluation could not be finished");
                StopReason::EvalFailed(e)
            }
        };
        self.stop(myself, reason);
    }

    /// Sends an evaluation step's messages and publishes the progress it made.
    fn send_all(&self, out: Vec<Outgoing>) {
        for (worker, msg) in out {
            self.sessions.send(&worker, msg);
        }
        let (done, total) = self.leases.progress();
        self.metrics.set_eval_progress(done, total);
    }

    fn status(&self) -> JobStatus {
        JobStatus {
            generation: Generation::default(),
            phase: if self.finishing {
                "Finishing".into()
            } else {
                "Evaluating".into()
            },
            members: self.sessions.workers().cloned().collect(),
            roster: Vec::new(),
            cursor: Cursor::default(),
            coverage: Vec::new(),
            aborted_steps: 0,
        }
    }
}
