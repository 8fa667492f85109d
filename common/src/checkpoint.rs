//! Checkpoint directories on disk, the one format of every training run (a cluster job or
//! `eqim train-generator`): `step-NNNNNNNN/` under the job's checkpoint root holds the writer
//! rank's `state.safetensors`, the scheduler's `job.json` (cursor, generation, ledger) and,
//! written last, `manifest.json` with the size and SHA-256 of every file. A checkpoint counts
//! only when its manifest exists and every checksum verifies; resume takes the newest such one
//! and names every newer one it had to skip.
//!
//! The book-keeping order is [`begin`] (job.json, when a step is committed and a checkpoint is
//! due), the writer's state file, then [`complete`] (manifest last, then trimming).

use crate::files::{hash_file, write_atomic, FileError};
use crate::ledger::Ledger;
use crate::proto::{Cursor, Generation, WrittenFile};
use crate::schedule::ScheduleConfig;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

pub const MANIFEST_FILE: &str = "manifest.json";
pub const JOB_STATE_FILE: &str = "job.json";
pub const STATE_FILE: &str = "state.safetensors";
/// Checkpoints kept by default (older ones are deleted after a new manifest is written).
pub const DEFAULT_KEEP: usize = 3;

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a valid {what}: {message}")]
    Parse {
        path: PathBuf,
        what: &'static str,
        message: String,
    },
    #[error(transparent)]
    File(#[from] FileError),
    #[error("checkpoint {dir} is corrupt: {file} {problem}")]
    Corrupt {
        dir: PathBuf,
        file: String,
        problem: String,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CheckpointError + '_ {
    move |source| CheckpointError::Io {
        path: path.to_owned(),
        source,
    }
}

/// The coordinator's part of a checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobState {
    /// Position after the checkpoint's last committed step.
    pub cursor: Cursor,
    pub generation: Generation,
    pub ledger: Ledger,
    /// The data schedule the cursor and ledger refer to; a run resumed under another seed or
    /// dataset would take other samples (absent in checkpoints of eqim before it was recorded).
    #[serde(default)]
    pub schedule: Option<ScheduleConfig>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestEntry {
    /// Relative to the checkpoint directory.
    pub path: String,
    pub bytes: u64,
    pub sha256: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Committed steps the checkpoint contains (the step the job resumes at).
    pub step: u64,
    pub files: Vec<ManifestEntry>,
}

/// Directory name of the checkpoint after `steps` committed steps.
pub fn dir_name(steps: u64) -> String {
    format!("step-{steps:08}")
}

/// A [`WrittenFile`] for `dir/name`.
pub fn written_file(dir: &Path, name: &str) -> Result<WrittenFile, CheckpointError> {
    let (bytes, sha256) = hash_file(&dir.join(name))?;
    Ok(WrittenFile {
        path: name.to_owned(),
        bytes,
        sha256,
    })
}

/// Writes the coordinator's `job.json` into `dir`.
pub fn write_job_state(dir: &Path, state: &JobState) -> Result<(), CheckpointError> {
    let path = dir.join(JOB_STATE_FILE);
    let text = serde_json::to_vec(state).map_err(|e| CheckpointError::Parse {
        path: path.clone(),
        what: "job state",
        message: e.to_string(),
    })?;
    Ok(write_atomic(&path, &text)?)
}

pub fn read_job_state(dir: &Path) -> Result<JobState, CheckpointError> {
    let path = dir.join(JOB_STATE_FILE);
    let text = std::fs::read(&path).map_err(io(&path))?;
    serde_json::from_slice(&text).map_err(|e| CheckpointError::Parse {
        path,
        what: "job state",
        message: e.to_string(),
    })
}

/// Writes the manifest (last, atomically) over `files` of `dir`.
pub fn write_manifest(
    dir: &Path,
    step: u64,
    files: &[WrittenFile],
) -> Result<Manifest, CheckpointError> {
    let manifest = Manifest {
        step,
        files: files
            .iter()
            .map(|f| ManifestEntry {
                path: f.path.clone(),
                bytes: f.bytes,
                sha256: hex::encode(f.sha256),
            })
            .collect(),
    };
    let path = dir.join(MANIFEST_FILE);
    let text = serde_json::to_vec_pretty(&manifest).map_err(|e| CheckpointError::Parse {
        path: path.clone(),
        what: "manifest",
        message: e.to_string(),
    })?;
    write_atomic(&path, &text)?;
    Ok(manifest)
}

/// Reads `dir`'s manifest and checks the size and checksum of every file it lists.
pub fn verify(dir: &Path) -> Result<Manifest, CheckpointError> {
    let path = dir.join(MANIFEST_FILE);
    let text = std::fs::read(&path).map_err(|_| CheckpointError::Corrupt {
        dir: dir.to_owned(),
        file: MANIFEST_FILE.into(),
        problem: "is missing (the checkpoint was never completed)".into(),
    })?;
    let manifest: Manifest =
        serde_json::from_slice(&text).map_err(|e| CheckpointError::Corrupt {
            dir: dir.to_owned(),
            file: MANIFEST_FILE.into(),
            problem: format!("does not parse: {e}"),
        })?;
    for entry in &manifest.files {
        let corrupt = |problem: String| CheckpointError::Corrupt {
            dir: dir.to_owned(),
            file: entry.path.clone(),
            problem,
        };
        if entry.path.contains("..") || entry.path.starts_with('/') {
            return Err(corrupt("has a path outside the checkpoint".into()));
        }
        let (bytes, sha) = hash_file(&dir.join(&entry.path))
            .map_err(|e| corrupt(format!("cannot be read: {e}")))?;
        if bytes != entry.bytes {
            return Err(corrupt(format!(
                "has {bytes} bytes, the manifest says {} (truncated?)",
                entry.bytes
            )));
        }
        if hex::encode(sha) != entry.sha256 {
            return Err(corrupt("does not match its SHA-256 in the manifest".into()));
        }
    }
    Ok(manifest)
}

/// Writes the scheduler's part of the checkpoint after `steps` committed steps (`job.json`) and
/// returns the directory's name (for the writer's order) and path.
pub fn begin(
    root: &Path,
    steps: u64,
    job: &JobState,
) -> Result<(String, PathBuf), CheckpointError> {
    let name = dir_name(steps);
    let dir = root.join(&name);
    write_job_state(&dir, job)?;
    Ok((name, dir))
}

/// Completes the checkpoint in `dir` over the writer's `files` and the job state: writes the
/// manifest (last), then deletes all but the newest `keep` complete checkpoints under `root`.
/// The checkpoint is good once this returns `Ok`; the paths are the checkpoints trimmed.
pub fn complete(
    root: &Path,
    dir: &Path,
    steps: u64,
    mut files: Vec<WrittenFile>,
    keep: usize,
) -> Result<Vec<PathBuf>, CheckpointError> {
    files.push(written_file(dir, JOB_STATE_FILE)?);
    write_manifest(dir, steps, &files)?;
    trim(root, keep)
}

/// Where a job resumes: the newest verified checkpoint and its job state.
#[derive(Debug, Clone)]
pub struct ResumePoint {
    pub dir: PathBuf,
    pub manifest: Manifest,
    pub job: JobState,
}

/// The newest checkpoint under `root` that verifies and whose job state loads, and why every
/// newer one was skipped (empty `Ok(None)`: a fresh job).
pub fn resume_point(root: &Path) -> (Option<ResumePoint>, Vec<CheckpointError>) {
    let mut rejected = Vec::new();
    for dir in list(root) {
        let loaded = verify(&dir).and_then(|manifest| Ok((manifest, read_job_state(&dir)?)));
        match loaded {
            Ok((manifest, job)) => return (Some(ResumePoint { dir, manifest, job }), rejected),
            Err(e) => rejected.push(e),
        }
    }
    (None, rejected)
}

/// Checkpoint directories under `root`, newest first.
pub fn list(root: &Path) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(root)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.is_dir()
                && p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("step-"))
        })
        .collect();
    dirs.sort();
    dirs.reverse();
    dirs
}

/// The newest checkpoint whose manifest verifies, and the reasons every newer one was skipped.
pub fn latest_good(root: &Path) -> (Option<(PathBuf, Manifest)>, Vec<CheckpointError>) {
    let mut rejected = Vec::new();
    for dir in list(root) {
        match verify(&dir) {
            Ok(m) => return (Some((dir, m)), rejected),
            Err(e) => rejected.push(e),
        }
    }
    (None, rejected)
}

/// Deletes all but the newest `keep` complete checkpoints (and incomplete ones older than them).
pub fn trim(root: &Path, keep: usize) -> Result<Vec<PathBuf>, CheckpointError> {
    let mut complete = 0usize;
    let mut removed = Vec::new();
    for dir in list(root) {
        if complete >= keep {
            std::fs::remove_dir_all(&dir).map_err(io(&dir))?;
            removed.push(dir);
        } else if dir.join(MANIFEST_FILE).exists() {
            complete += 1;
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn make(root: &Path, steps: u64) -> PathBuf {
        let dir = root.join(dir_name(steps));
        write_atomic(&dir.join("a.bin"), &steps.to_le_bytes()).unwrap();
        let files = vec![written_file(&dir, "a.bin").unwrap()];
        write_manifest(&dir, steps, &files).unwrap();
        dir
    }

    #[test]
    fn a_corrupt_latest_checkpoint_is_named_and_the_previous_one_used() {
        let root = tempfile::tempdir().unwrap();
        make(root.path(), 10);
        let newest = make(root.path(), 20);
        std::fs::write(newest.join("a.bin"), b"garbage!").unwrap();
        let (good, rejected) = latest_good(root.path());
        assert_eq!(good.unwrap().1.step, 10);
        assert_eq!(rejected.len(), 1);
        let message = rejected[0].to_string();
        assert!(
            message.contains("step-00000020") && message.contains("a.bin"),
            "{message}"
        );
    }

    #[test]
    fn truncated_files_and_missing_manifests_are_rejected() {
        let root = tempfile::tempdir().unwrap();
        let dir = make(root.path(), 5);
        std::fs::write(dir.join("a.bin"), b"abc").unwrap();
        assert!(verify(&dir).unwrap_err().to_string().contains("truncated"));
        std::fs::remove_file(dir.join(MANIFEST_FILE)).unwrap();
        assert!(verify(&dir).unwrap_err().to_string().contains("missing"));
    }

    #[test]
    fn trim_keeps_the_newest_complete_checkpoints() {
        let root = tempfile::tempdir().unwrap();
        for s in [1, 2, 3, 4] {
            make(root.path(), s);
        }
        let removed = trim(root.path(), 2).unwrap();
        assert_eq!(removed.len(), 2);
        let left: Vec<u64> = list(root.path())
            .iter()
            .map(|d| verify(d).unwrap().step)
            .collect();
        assert_eq!(left, vec![4, 3]);
    }
}
