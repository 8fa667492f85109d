//! A training run on one process as the only rank of a cluster job: what the coordinator does for
//! a cluster (the data schedule, step commits, the ledger, checkpoint orders and manifests,
//! resume) done in-process around the same training thread ([`Trainer`]) that `eqim worker`
//! drives, with no QUIC, no TCPStore and no gloo. `eqim train-generator` is this; so a run here
//! and `eqim launch --workers 1` with the same config and seed train the same samples in the same
//! order and end with the same weights, EMA and ledger, and either resumes the other's
//! checkpoints.

use super::trainable::Trainable;
use super::trainer::{Command, Event, Flow, Trainer, TrainerConfig};
use anyhow::{bail, Context, Result};
use eqim_common::checkpoint::{self, JobState, DEFAULT_KEEP};
use eqim_common::proto::{CheckpointOrder, Generation, VoteOutcome};
use eqim_common::schedule::{DataSchedule, ScheduleConfig};
use std::path::{Path, PathBuf};
use tokio::sync::mpsc::UnboundedReceiver;
use tracing::{info, warn};

/// The generation of a local run: the first one, as a coordinator's first formation.
const LOCAL_GENERATION: Generation = Generation(1);

/// Settings of a local run.
pub struct LocalRun {
    pub schedule: ScheduleConfig,
    /// Stop after this many committed steps in total (a checkpoint is written there), before the
    /// schedule's end.
    pub max_steps: Option<u64>,
    /// Settings of the training thread; its `checkpoint_root` is where the run's checkpoints go.
    pub trainer: TrainerConfig,
}

/// What a local run did.
#[derive(Debug, Clone)]
pub struct LocalSummary {
    /// Committed steps in total (counting those before a resume).
    pub steps: u64,
    /// Steps this process ran.
    pub steps_run: u64,
    /// The checkpoint the run resumed from, if any.
    pub resumed_from: Option<PathBuf>,
    /// The newest complete checkpoint at the end.
    pub last_checkpoint: Option<PathBuf>,
    pub ledger: eqim_common::ledger::Ledger,
}

/// The schedule to start from: the newest verified checkpoint under `root` or step 0.
fn resume(root: &Path, cfg: &ScheduleConfig) -> Result<(DataSchedule, Option<PathBuf>)> {
    let (point, rejected) = checkpoint::resume_point(root);
    for reason in &rejected {
        warn!("skipping checkpoint: {reason}");
    }
    let Some(point) = point else {
        if !rejected.is_empty() {
            warn!(root = %root.display(), "no checkpoint verifies; starting from step 0");
        }
        return Ok((DataSchedule::new(cfg.clone()), None));
    };
    let saved_seed = point.job.schedule.as_ref().map_or(cfg.seed, |s| s.seed);
    let mismatch = if point.job.ledger.dataset_len != cfg.dataset_len {
        Some(format!(
            "was trained on {} samples but the data now has {}",
            point.job.ledger.dataset_len, cfg.dataset_len
        ))
    } else if saved_seed != cfg.seed {
        Some(format!(
            "was trained with seed = {saved_seed} but the config says seed = {}",
            cfg.seed
        ))
    } else {
        None
    };
    if let Some(what) = mismatch {
        bail!(
            "checkpoint {} {what}: resuming would change the data order; restore the config, or start over with --fresh",
            point.dir.display()
        );
    }
    info!(dir = %point.dir.display(), step = point.manifest.step, epoch = point.job.cursor.epoch, "resuming from checkpoint");
    let schedule = DataSchedule::resume(cfg.clone(), point.job.cursor, point.job.ledger);
    Ok((schedule, Some(point.dir)))
}

/// Runs `model` to the end of the schedule (or `max_steps`) as the only rank.
pub fn run<T: Trainable>(model: T, run: LocalRun) -> Result<LocalSummary> {
    let root = run.trainer.checkpoint_root.clone();
    let (mut schedule, resumed_from) = resume(&root, &run.schedule)?;
    let (events_tx, mut events) = tokio::sync::mpsc::unbounded_channel();
    let mut trainer = Trainer::alone(run.trainer, model, events_tx)?;
    let start = schedule.cursor();
    let mut book = CheckpointBook::new(root);
    trainer.handle(Command::JoinAlone {
        generation: LOCAL_GENERATION,
        resume: start,
    })?;
    match book.next_answer(&mut events)? {
        Some(Event::GroupReady { .. }) => {}
        _ => bail!(
            "the training thread could not start at step {} (see the error above)",
            start.step
        ),
    }
    let stop_at = run.max_steps.unwrap_or(u64::MAX);
    while let Some(samples) = schedule.next_step().filter(|s| s.step < stop_at) {
        let step = samples.step;
        let assignment = schedule
            .assignments(&samples, LOCAL_GENERATION, 1)
            .remove(0);
        trainer.handle(Command::Step(assignment))?;
        match book.next_answer(&mut events)? {
            Some(Event::Vote {
                outcome: VoteOutcome::Ok,
                ..
            }) => {}
            Some(Event::Vote {
                outcome: VoteOutcome::Failed { reason },
                ..
            }) => bail!("step {step} failed: {reason}"),
            other => bail!("step {step}: no vote from the training thread ({other:?})"),
        }
        schedule.commit(samples, LOCAL_GENERATION);
        let order = if schedule.checkpoint_due(step) || step + 1 == stop_at {
            Some(book.order(step + 1, &schedule)?)
        } else {
            None
        };
        trainer.handle(Command::Commit {
            generation: LOCAL_GENERATION,
            step,
            checkpoint: order,
        })?;
    }
    if trainer.handle(Command::Finish)? != Flow::Finished {
        bail!("the training thread did not finish");
    }
    // Finish waited for every checkpoint writer: all reports are in the channel.
    book.next_answer(&mut events)?;
    let steps = schedule.cursor().step;
    Ok(LocalSummary {
        steps,
        steps_run: steps - start.step,
        resumed_from,
        last_checkpoint: book.last_complete,
        ledger: schedule.ledger().clone(),
    })
}

/// The checkpoints of a local run: ordered at a committed step (job state first), completed
/// (manifest last) when the training thread reports the state file written.
struct CheckpointBook {
    root: PathBuf,
    last_complete: Option<PathBuf>,
}

impl CheckpointBook {
    fn new(root: PathBuf) -> Self {
        Self {
            root,
            last_complete: None,
        }
    }

    fn order(&mut self, steps: u64, schedule: &DataSchedule) -> Result<CheckpointOrder> {
        let job = JobState {
            cursor: schedule.cursor(),
            generation: LOCAL_GENERATION,
            ledger: schedule.ledger().clone(),
            schedule: Some(schedule.config().clone()),
        };
        let (name, _dir) = checkpoint::begin(&self.root, steps, &job).with_context(|| {
            format!("writing the job state of the checkpoint after {steps} steps")
        })?;
        Ok(CheckpointOrder {
            writer_rank: 0,
            name,
        })
    }

    /// Reads the training thread's events in order, completing the checkpoints it reports
    /// (background writers report at any time), up to the answer to the last command (group
    /// ready or a vote); `None` when no answer is waiting. The thread runs commands synchronously
    /// in [`Trainer::handle`], so an answer is in the channel when `handle` returns.
    fn next_answer(&mut self, events: &mut UnboundedReceiver<Event>) -> Result<Option<Event>> {
        while let Ok(event) = events.try_recv() {
            match event {
                Event::CheckpointWritten { steps, files, .. } => {
                    let dir = self.root.join(checkpoint::dir_name(steps));
                    let removed =
                        checkpoint::complete(&self.root, &dir, steps, files, DEFAULT_KEEP)
                            .with_context(|| {
                                format!("completing the checkpoint {}", dir.display())
                            })?;
                    for old in removed {
                        info!(dir = %old.display(), "old checkpoint removed");
                    }
                    self.last_complete = Some(dir);
                }
                Event::CheckpointFailed { reason } => bail!("checkpoint not written: {reason}"),
                answer @ (Event::GroupReady { .. } | Event::Vote { .. }) => {
                    return Ok(Some(answer))
                }
                Event::Applied { .. } | Event::Finished => {}
            }
        }
        Ok(None)
    }
}
