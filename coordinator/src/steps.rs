//! The step scheduler: step votes over the data schedule of `eqim_common::schedule` (epochs, the
//! data cursor, per-rank assignments with a fixed global batch, the ledger), as plain data with
//! explicit transitions.
//!
//! A step is opened for the roster of one generation; it commits only when every rank voted ok,
//! and aborts at the first failed vote, on a lost member or at the step timeout. Only a commit
//! advances the cursor and appends the step's samples to the ledger, so an aborted step is
//! re-run at the same position (re-split over whoever is left) and every epoch covers each
//! sample exactly once.

use eqim_common::ledger::Ledger;
use eqim_common::proto::{AbortReason, Assignment, Cursor, Generation, VoteOutcome, WorkerId};
pub use eqim_common::schedule::ScheduleConfig;
use eqim_common::schedule::{DataSchedule, StepSamples};
use std::time::{Duration, Instant};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StepError {
    #[error("step {step} is still open")]
    AlreadyOpen { step: u64 },
    #[error("the schedule is complete")]
    Finished,
    #[error("a step needs at least one rank")]
    EmptyRoster,
    #[error("vote for step {got} of {got_generation}, but the open step is {open}")]
    NotTheOpenStep {
        got: u64,
        got_generation: Generation,
        open: String,
    },
    #[error("worker {worker} is not a rank of the open step")]
    NotAVoter { worker: WorkerId },
}

/// A step whose assignments are out.
#[derive(Debug, Clone)]
pub struct OpenStep {
    pub step: u64,
    pub generation: Generation,
    pub epoch: u32,
    /// The step's samples, committed as they are when every rank voted ok.
    pub samples: StepSamples,
    /// `voters[r]` is rank r.
    pub voters: Vec<WorkerId>,
    pub votes_ok: Vec<WorkerId>,
    pub opened_at: Instant,
}

/// What a vote led to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VoteResult {
    /// Waiting for `missing` more votes.
    Pending { missing: usize },
    /// Every rank voted ok: the step is in the ledger and the cursor moved.
    Commit { generation: Generation, step: u64 },
    /// A rank failed: nothing was consumed.
    Abort {
        generation: Generation,
        step: u64,
        reason: AbortReason,
    },
}

/// The scheduler, owned by the job actor.
#[derive(Debug, Clone)]
pub struct StepState {
    schedule: DataSchedule,
    open: Option<OpenStep>,
}

impl StepState {
    /// A fresh job at step 0.
    pub fn new(cfg: ScheduleConfig) -> Self {
        Self {
            schedule: DataSchedule::new(cfg),
            open: None,
        }
    }

    /// A job resumed at `cursor` with the ledger saved in its checkpoint.
    pub fn resume(cfg: ScheduleConfig, cursor: Cursor, ledger: Ledger) -> Self {
        Self {
            schedule: DataSchedule::resume(cfg, cursor, ledger),
            open: None,
        }
    }

    pub fn cursor(&self) -> Cursor {
        self.schedule.cursor()
    }

    pub fn ledger(&self) -> &Ledger {
        self.schedule.ledger()
    }

    pub fn schedule_config(&self) -> &ScheduleConfig {
        self.schedule.config()
    }

    pub fn open_step(&self) -> Option<&OpenStep> {
        self.open.as_ref()
    }

    pub fn is_finished(&self) -> bool {
        self.schedule.is_finished()
    }

    /// Whether a checkpoint is due after committing `step`.
    pub fn checkpoint_due(&self, step: u64) -> bool {
        self.schedule.checkpoint_due(step)
    }

    /// Opens the step at the cursor for the ranks `roster` of `generation`, and returns each
    /// rank's assignment (index = rank).
    pub fn open(
        &mut self,
        now: Instant,
        generation: Generation,
        roster: &[WorkerId],
    ) -> Result<Vec<Assignment>, StepError> {
        if let Some(open) = &self.open {
            return Err(StepError::AlreadyOpen { step: open.step });
        }
        let Some(samples) = self.schedule.next_step() else {
            return Err(StepError::Finished);
        };
        if roster.is_empty() {
            return Err(StepError::EmptyRoster);
        }
        let world_size = u32::try_from(roster.len()).expect("world size fits in u32");
        let assignments = self.schedule.assignments(&samples, generation, world_size);
        self.open = Some(OpenStep {
            step: samples.step,
            generation,
            epoch: samples.epoch,
            samples,
            voters: roster.to_vec(),
            votes_ok: Vec::new(),
            opened_at: now,
        });
        Ok(assignments)
    }

    /// Records `worker`'s vote on the open step.
    pub fn vote(
        &mut self,
        worker: &WorkerId,
        generation: Generation,
        step: u64,
        outcome: &VoteOutcome,
    ) -> Result<VoteResult, StepError> {
        let Some(open) = self.open.as_mut() else {
            return Err(StepError::NotTheOpenStep {
                got: step,
                got_generation: generation,
                open: "none".into(),
            });
        };
        if open.step != step || open.generation != generation {
            return Err(StepError::NotTheOpenStep {
                got: step,
                got_generation: generation,
                open: format!("step {} of {}", open.step, open.generation),
            });
        }
        if !open.voters.contains(worker) {
            return Err(StepError::NotAVoter {
                worker: worker.clone(),
            });
        }
        match outcome {
            VoteOutcome::Failed { reason } => Ok(self
                .abort(AbortReason::VoteFailed {
                    worker: worker.clone(),
                    reason: reason.clone(),
                })
                .expect("a step is open")),
            VoteOutcome::Ok => {
                if !open.votes_ok.contains(worker) {
                    open.votes_ok.push(worker.clone());
                }
                let missing = open.voters.len() - open.votes_ok.len();
                if missing > 0 {
                    return Ok(VoteResult::Pending { missing });
                }
                Ok(self.commit())
            }
        }
    }

    fn commit(&mut self) -> VoteResult {
        let open = self.open.take().expect("commit needs an open step");
        self.schedule.commit(open.samples, open.generation);
        VoteResult::Commit {
            generation: open.generation,
            step: open.step,
        }
    }

    /// Aborts the open step, if any; the cursor and the ledger do not move.
    pub fn abort(&mut self, reason: AbortReason) -> Option<VoteResult> {
        let open = self.open.take()?;
        Some(VoteResult::Abort {
            generation: open.generation,
            step: open.step,
            reason,
        })
    }

    /// Whether the open step has waited longer than `step_timeout` for its votes.
    pub fn timed_out(&self, now: Instant, step_timeout: Duration) -> bool {
        self.open
            .as_ref()
            .is_some_and(|o| now.saturating_duration_since(o.opened_at) >= step_timeout)
    }
}

#[cfg(test)]
mod tests;
