//! The record a coordinator leaves at the end of a job, `<job_dir>/outcome.json`: whether the
//! schedule finished and why it stopped, the final cursor and generation, per-epoch coverage
//! of the ledger, recoveries, and an evaluation's result. Scripts, CI and the worker's end-to-end
//! tests read it instead of parsing log lines; written atomically.

use crate::files::{write_json_atomic, JsonFileError};
use crate::ledger::{EpochCoverage, Ledger};
use crate::proto::Cursor;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Its file name inside the job directory.
pub const OUTCOME_FILE: &str = "outcome.json";

/// How a job ended, as `<job_dir>/outcome.json` says.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobOutcomeRecord {
    /// The schedule (or the evaluation) completed.
    pub finished: bool,
    /// Why the job stopped, as the summary line prints it.
    pub stop_reason: String,
    pub cursor: Cursor,
    pub generation: u64,
    /// Per epoch: how many samples committed steps took once, twice, more or never.
    pub coverage: Vec<EpochCoverage>,
    /// Which samples each committed step took (`coverage` is its summary).
    pub ledger: Ledger,
    pub aborted_steps: u64,
    pub recoveries: u64,
    pub recovery_seconds: f64,
    /// What an evaluation job produced (absent for training jobs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval: Option<EvalOutcomeRecord>,
}

/// The result of a finished evaluation job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalOutcomeRecord {
    pub images: u64,
    pub seconds: f64,
    pub fid: Option<f64>,
    pub manifest: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum OutcomeError {
    #[error(
        "reading the job outcome {path}: {source} (the coordinator writes it when the job ends)"
    )]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a job outcome: {source}")]
    Parse {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error(transparent)]
    Write(#[from] JsonFileError),
}

impl JobOutcomeRecord {
    /// Every epoch's samples were each taken exactly once.
    pub fn ledger_exact(&self) -> bool {
        !self.coverage.is_empty() && self.coverage.iter().all(|c| c.is_exact())
    }

    pub fn write(&self, job_dir: &Path) -> Result<(), OutcomeError> {
        Ok(write_json_atomic(&job_dir.join(OUTCOME_FILE), self)?)
    }

    pub fn read(job_dir: &Path) -> Result<Self, OutcomeError> {
        let path = job_dir.join(OUTCOME_FILE);
        let text = std::fs::read_to_string(&path).map_err(|source| OutcomeError::Read {
            path: path.clone(),
            source,
        })?;
        serde_json::from_str(&text).map_err(|source| OutcomeError::Parse { path, source })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_outcome_round_trips_and_judges_its_ledger() {
        let dir = tempfile::tempdir().unwrap();
        let mut record = JobOutcomeRecord {
            finished: true,
            stop_reason: "schedule complete".into(),
            cursor: Cursor {
                step: 4,
                epoch: 1,
                offset: 0,
            },
            generation: 2,
            coverage: vec![EpochCoverage {
                epoch: 0,
                once: 8,
                twice: 0,
                more: 0,
                never: 0,
            }],
            ledger: Ledger::new(8),
            aborted_steps: 1,
            recoveries: 0,
            recovery_seconds: 0.0,
            eval: None,
        };
        record.write(dir.path()).unwrap();
        let back = JobOutcomeRecord::read(dir.path()).unwrap();
        assert_eq!(back, record);
        assert!(back.ledger_exact());
        record.coverage[0].twice = 1;
        assert!(!record.ledger_exact());
        std::fs::write(dir.path().join(OUTCOME_FILE), "{").unwrap();
        let err = JobOutcomeRecord::read(dir.path()).unwrap_err().to_string();
        assert!(err.contains("is not a job outcome"), "{err}");
    }
}
