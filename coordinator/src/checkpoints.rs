//! The coordinator's side of checkpoints, on the book-keeping of `eqim_common::checkpoint`: at a
//! committed step it writes its own part (`job.json`: cursor, generation, ledger) and orders the
//! writer rank to save the training state; when the rank reports its files it writes the manifest
//! last and trims old checkpoints. At start it resumes from the newest checkpoint that verifies.

use crate::steps::StepState;
use eqim_common::checkpoint::{self, JobState, DEFAULT_KEEP};
use eqim_common::coordinator_config::CoordinatorConfig;
use eqim_common::proto::{Generation, WrittenFile};
use std::path::{Path, PathBuf};
use tracing::{error, info, warn};

/// The step state to start from: the newest good checkpoint's cursor and ledger, or a fresh job.
pub fn resume_steps(cfg: &CoordinatorConfig) -> StepState {
    let root = cfg.checkpoint_root();
    let (good, rejected) = checkpoint::resume_point(&root);
    for reason in &rejected {
        warn!("skipping checkpoint: {reason}");
    }
    match good {
        Some(point) => {
            info!(dir = %point.dir.display(), step = point.manifest.step, epoch = point.job.cursor.epoch, "resuming from checkpoint");
            StepState::resume(cfg.schedule.clone(), point.job.cursor, point.job.ledger)
        }
        None => {
            if !rejected.is_empty() {
                warn!(root = %root.display(), "no checkpoint verifies; starting the job from step 0");
            }
            StepState::new(cfg.schedule.clone())
        }
    }
}

/// Writes the coordinator's part of the checkpoint after `steps` committed steps; returns the
/// directory's name (for the order) and path, or `None` (logged) when it cannot be written.
pub fn order(
    root: &Path,
    steps: u64,
    generation: Generation,
    state: &StepState,
) -> Option<(String, PathBuf)> {
    let job = JobState {
        cursor: state.cursor(),
        generation,
        ledger: state.ledger().clone(),
        schedule: Some(state.schedule_config().clone()),
    };
    match checkpoint::begin(root, steps, &job) {
        Ok(ordered) => Some(ordered),
        Err(e) => {
            error!(cause = %e, "cannot write the checkpoint's job state; checkpoint skipped");
            None
        }
    }
}

/// Writes the manifest over the worker's files and the job state, then trims old checkpoints.
/// Returns whether the manifest was written, i.e. the checkpoint is good (failures are logged).
pub fn complete(dir: &Path, steps: u64, files: Vec<WrittenFile>, root: PathBuf) -> bool {
    match checkpoint::complete(&root, dir, steps, files, DEFAULT_KEEP) {
        Ok(removed) => {
            for old in removed {
                info!(dir = %old.display(), "old checkpoint removed");
            }
            true
        }
        Err(e) => {
            error!(cause = %e, "cannot complete the checkpoint");
            dir.join(checkpoint::MANIFEST_FILE).exists()
        }
    }
}
