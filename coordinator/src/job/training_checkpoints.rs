//! The training job's checkpoint book: checkpoints ordered with a commit and reported written,
//! and a leaving last holder of the state kept for a just-in-time checkpoint.

use super::training::{member_lost, TrainingState};
use crate::jit_checkpoint::{needs_jit_checkpoint, JitDecision};
use crate::net::session::CloseReason;
use eqim_common::proto::{CheckpointOrder, CoordinatorToWorker, Generation, WorkerId, WrittenFile};
use std::path::PathBuf;
use std::time::Instant;
use tracing::{debug, info, warn};

/// A checkpoint ordered and not yet reported written.
pub struct PendingCheckpoint {
    pub dir: PathBuf,
    pub since: Instant,
    /// The member ordered to write the state.
    pub writer: Option<WorkerId>,
}

/// A worker that announced it is leaving and is kept for a just-in-time checkpoint.
pub struct JitLeaver {
    pub worker: WorkerId,
    /// The checkpoint awaited: after this many committed steps.
    pub steps: u64,
    pub since: Instant,
}

impl TrainingState {
    /// With the commit of `step`: the checkpoint order when one is due after it.
    pub(super) fn order_due_checkpoint(
        &mut self,
        now: Instant,
        generation: Generation,
        step: u64,
    ) -> Option<CheckpointOrder> {
        if !self.steps.checkpoint_due(step) {
            return None;
        }
        let root = self.cfg.checkpoint_root();
        let (name, dir) = crate::checkpoints::order(&root, step + 1, generation, &self.steps)?;
        let pending = PendingCheckpoint {
            dir,
            since: now,
            writer: self.membership.roster.first().cloned(),
        };
        self.pending_checkpoints.insert(step + 1, pending);
        Some(CheckpointOrder {
            writer_rank: 0,
            name,
        })
    }

    pub(super) fn handle_checkpoint_written(
        &mut self,
        worker: &WorkerId,
        step: u64,
        files: Vec<WrittenFile>,
    ) {
        match self.pending_checkpoints.remove(&step) {
            Some(PendingCheckpoint { dir, since, .. }) => {
                let root = self.cfg.checkpoint_root();
                if crate::checkpoints::complete(&dir, step, files, root) {
                    self.metrics.checkpoint_completed();
                    self.newest_complete_checkpoint = self.newest_complete_checkpoint.max(step);
                }
                info!(dir = %dir.display(), ms = since.elapsed().as_millis() as u64, "checkpoint complete");
            }
            None => warn!(step, "report of a checkpoint that was not ordered; ignored"),
        }
        let released = self
            .jit_leaver
            .as_ref()
            .is_some_and(|l| &l.worker == worker && l.steps == step);
        if released {
            if let Some(leaver) = self.jit_leaver.take() {
                info!(worker_id = %worker, step, ms = leaver.since.elapsed().as_millis() as u64, "just-in-time checkpoint complete; the worker may leave");
            }
            self.remove_member(worker, CloseReason::Left);
        }
    }

    /// At the end of the schedule: true while a checkpoint is still awaited (the last one
    /// completes before the workers are let go); those past the step timeout are given up.
    pub(super) fn checkpoints_still_pending(&mut self) -> bool {
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
        !self.pending_checkpoints.is_empty()
    }

    /// A worker announced it is leaving: remove it now, or, when it is the last holder of the
    /// training state and steps were committed since the newest checkpoint, abort the open step
    /// and order a just-in-time checkpoint of the committed state first.
    pub(super) fn handle_leaving(&mut self, now: Instant, worker: &WorkerId) {
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
        self.abort_open_step_if_voter(worker, member_lost(worker));
        if order {
            if !self.order_jit_checkpoint(now, worker, steps) {
                self.remove_member(worker, CloseReason::Left);
                return;
            }
        } else {
            info!(worker_id = %worker, steps, "last holder of the state leaving; waiting for its checkpoint in progress");
        }
        self.jit_leaver = Some(JitLeaver {
            worker: worker.clone(),
            steps,
            since: now,
        });
    }

    /// Orders the leaving last holder to checkpoint `steps` committed steps; false if no
    /// checkpoint could be ordered.
    fn order_jit_checkpoint(&mut self, now: Instant, worker: &WorkerId, steps: u64) -> bool {
        let generation = self.membership.generation;
        let root = self.cfg.checkpoint_root();
        let Some((name, dir)) = crate::checkpoints::order(&root, steps, generation, &self.steps)
        else {
            return false;
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
        self.sessions.send(worker, order);
        true
    }
}
