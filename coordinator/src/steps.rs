//! The step scheduler: epochs, the data cursor, per-rank assignments with a fixed global batch,
//! step votes and the ledger, as plain data with explicit transitions.
//!
//! A step is opened for the roster of one generation; it commits only when every rank voted ok,
//! and aborts at the first failed vote, on a lost member or at the step timeout. Only a commit
//! advances the cursor and appends the step's samples to the ledger, so an aborted step is
//! re-run at the same position (re-split over whoever is left) and every epoch covers each
//! sample exactly once.

use eqim_common::ledger::{Ledger, LedgerEntry};
use eqim_common::proto::{AbortReason, Assignment, Cursor, Generation, VoteOutcome, WorkerId};
use eqim_common::schedule::{
    accumulation_steps, epoch_permutation, split_step, step_range, steps_per_epoch, SplitPlan,
};
use serde::{Deserialize, Serialize};
use std::time::{Duration, Instant};

/// The data schedule of a job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleConfig {
    /// Number of training samples; indices are `0..dataset_len`.
    pub dataset_len: u64,
    /// Samples per optimizer step over all ranks, kept fixed when the world size changes.
    pub global_batch: u64,
    /// Most samples one rank computes in one forward/backward; more are accumulated.
    pub micro_batch: u64,
    pub epochs: u32,
    /// Seed of the epoch permutations.
    pub seed: u64,
    /// Order a checkpoint after every this many committed steps (and after the last one).
    #[serde(default)]
    pub checkpoint_every_steps: Option<u64>,
}

impl ScheduleConfig {
    /// Returns the offending key and what is accepted.
    pub fn validate(&self) -> Result<(), (String, String)> {
        let positive = [
            ("dataset_len", self.dataset_len),
            ("global_batch", self.global_batch),
            ("micro_batch", self.micro_batch),
            ("epochs", u64::from(self.epochs)),
        ];
        for (key, value) in positive {
            if value == 0 {
                return Err((format!("schedule.{key}"), "must be at least 1".into()));
            }
        }
        if self.checkpoint_every_steps == Some(0) {
            return Err((
                "schedule.checkpoint_every_steps".into(),
                "must be at least 1, or left out for no periodic checkpoints".into(),
            ));
        }
        Ok(())
    }

    pub fn steps_per_epoch(&self) -> u64 {
        steps_per_epoch(self.dataset_len, self.global_batch)
    }

    pub fn total_steps(&self) -> u64 {
        self.steps_per_epoch() * u64::from(self.epochs)
    }
}

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
    /// The step's samples, in permutation order.
    pub samples: Vec<u64>,
    pub end_offset: u64,
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
    cfg: ScheduleConfig,
    cursor: Cursor,
    open: Option<OpenStep>,
    ledger: Ledger,
    /// Permutation of `cursor.epoch`, cached (a pure function of the seed and the epoch).
    permutation: Vec<u64>,
}

impl StepState {
    /// A fresh job at step 0.
    pub fn new(cfg: ScheduleConfig) -> Self {
        let ledger = Ledger::new(cfg.dataset_len);
        Self::resume(cfg, Cursor::default(), ledger)
    }

    /// A job resumed at `cursor` with the ledger saved in its checkpoint.
    pub fn resume(cfg: ScheduleConfig, cursor: Cursor, ledger: Ledger) -> Self {
        let permutation = epoch_permutation(cfg.seed, cursor.epoch, cfg.dataset_len);
        Self {
            cfg,
            cursor,
            open: None,
            ledger,
            permutation,
        }
    }

    pub fn cursor(&self) -> Cursor {
        self.cursor
    }

    pub fn ledger(&self) -> &Ledger {
        &self.ledger
    }

    pub fn open_step(&self) -> Option<&OpenStep> {
        self.open.as_ref()
    }

    pub fn is_finished(&self) -> bool {
        self.cursor.epoch >= self.cfg.epochs
    }

    /// Whether a checkpoint is due after committing `step`.
    pub fn checkpoint_due(&self, step: u64) -> bool {
        let last = step + 1 == self.cfg.total_steps();
        last || self
            .cfg
            .checkpoint_every_steps
            .and_then(|every| (step + 1).checked_rem(every))
            == Some(0)
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
        if self.is_finished() {
            return Err(StepError::Finished);
        }
        if roster.is_empty() {
            return Err(StepError::EmptyRoster);
        }
        let world_size = u32::try_from(roster.len()).expect("world size fits in u32");
        let step_in_epoch = self.cursor.offset / self.cfg.global_batch;
        let range = step_range(self.cfg.dataset_len, self.cfg.global_batch, step_in_epoch);
        let samples = self.permutation[range.start as usize..range.end as usize].to_vec();
        let accumulation =
            accumulation_steps(self.cfg.global_batch, self.cfg.micro_batch, world_size);
        let assignments = (0..world_size)
            .map(|rank| Assignment {
                generation,
                step: self.cursor.step,
                epoch: self.cursor.epoch,
                micro_batches: split_step(
                    &samples,
                    SplitPlan {
                        rank,
                        world_size,
                        accumulation,
                    },
                ),
                step_samples: samples.len() as u64,
            })
            .collect();
        self.open = Some(OpenStep {
            step: self.cursor.step,
            generation,
            epoch: self.cursor.epoch,
            samples,
            end_offset: range.end,
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
        self.ledger.record(LedgerEntry {
            step: open.step,
            epoch: open.epoch,
            generation: open.generation,
            indices: open.samples,
        });
        self.cursor.step += 1;
        self.cursor.offset = open.end_offset;
        if self.cursor.offset >= self.cfg.dataset_len {
            self.cursor.epoch += 1;
            self.cursor.offset = 0;
            if !self.is_finished() {
                self.permutation =
                    epoch_permutation(self.cfg.seed, self.cursor.epoch, self.cfg.dataset_len);
            }
        }
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
