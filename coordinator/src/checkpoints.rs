//! The coordinator's side of checkpoints: at a committed step it writes its own part (`job.json`:
//! cursor, generation, ledger) into the checkpoint directory and orders the writer rank to save
//! the training state; when the rank reports its files it writes the manifest last and trims old
//! checkpoints. At start it resumes from the newest checkpoint whose checksums verify.

use crate::config::CoordinatorConfig;
use crate::steps::StepState;
use eqim_common::checkpoint::{self, JobState, DEFAULT_KEEP};
use eqim_common::proto::{Generation, WrittenFile};
use std::path::{Path, PathBuf};
use tracing::{error, info, warn};

impl CoordinatorConfig {
    /// Where checkpoints live: `<job_dir>/checkpoints`.
    pub fn checkpoint_root(&self) -> PathBuf {
        self.job_dir.join("checkpoints")
    }
}

/// The step state to start from: the newest good checkpoint's cursor and ledger, or a fresh job.
pub fn resume_steps(cfg: &CoordinatorConfig) -> StepState {
    let root = cfg.checkpoint_root();
    let (good, rejected) = checkpoint::latest_good(&root);
    for reason in &rejected {
        warn!("skipping checkpoint: {reason}");
    }
    let Some((dir, manifest)) = good else {
        if !rejected.is_empty() {
            warn!(root = %root.display(), "no checkpoint verifies; starting the job from step 0");
        }
        return StepState::new(cfg.schedule.clone());
    };
    match checkpoint::read_job_state(&dir) {
        Ok(state) => {
            info!(dir = %dir.display(), step = manifest.step, epoch = state.cursor.epoch, "resuming from checkpoint");
            StepState::resume(cfg.schedule.clone(), state.cursor, state.ledger)
        }
        Err(e) => {
            error!(cause = %e, "the verified checkpoint's job state does not load; starting from step 0");
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
    let name = checkpoint::dir_name(steps);
    let dir = root.join(&name);
    let job = JobState {
        cursor: state.cursor(),
        generation,
        ledger: state.ledger().clone(),
    };
    match checkpoint::write_job_state(&dir, &job) {
        Ok(()) => Some((name, dir)),
        Err(e) => {
            error!(cause = %e, "cannot write the checkpoint's job state; checkpoint skipped");
            None
        }
    }
}

/// Writes the manifest over the worker's files and the job state, then trims old checkpoints.
/// Returns whether the manifest was written, i.e. the checkpoint is good (failures are logged).
pub fn complete(dir: &Path, steps: u64, mut files: Vec<WrittenFile>, root: PathBuf) -> bool {
    let written = checkpoint::written_file(dir, checkpoint::JOB_STATE_FILE).and_then(|job| {
        files.push(job);
        checkpoint::write_manifest(dir, steps, &files)
    });
    if let Err(e) = written {
        error!(cause = %e, "cannot complete the checkpoint");
        return false;
    }
    // The checkpoint is good once its manifest is written; trimming old ones is housekeeping.
    match checkpoint::trim(&root, DEFAULT_KEEP) {
        Ok(removed) => {
            for old in removed {
                info!(dir = %old.display(), "old checkpoint removed");
            }
        }
        Err(e) => error!(cause = %e, "cannot remove old checkpoints"),
    }
    true
}
