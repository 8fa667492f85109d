//! Checks of worker messages against the job, as pure functions the job actors call before they
//! allocate, count or write anything (issue 21): an `Err` names what is wrong, and the caller
//! closes that peer's session with it as the reason. Nothing here panics on peer data.

use eqim_common::proto::{LeaseId, WorkerId, WrittenFile, MAX_FEATURE_ROWS_PER_FRAME};
use sha2::{Digest, Sha256};
use std::ops::Range;
use std::path::{Component, Path};

/// Why a worker's message was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidMessage {
    #[error("lease {lease:?} is not held by {worker}")]
    NotLeaseHolder { lease: LeaseId, worker: WorkerId },
    #[error("feature dimension {got} is not the job's {expected}")]
    FeatureDim { expected: u32, got: u32 },
    #[error("feature rows: {0}")]
    FeatureRows(String),
    #[error("feature indices {first}.. ({rows} rows) lie outside the lease's {lease:?}")]
    OutsideLease {
        first: u64,
        rows: u64,
        lease: Range<u64>,
    },
    #[error("checkpoint file {path:?}: {reason}")]
    CheckpointFile { path: String, reason: String },
}

/// The lease as the coordinator granted it.
pub struct LeaseView<'a> {
    pub id: LeaseId,
    pub holder: &'a WorkerId,
    pub indices: Range<u64>,
}

/// `EvalFeatures` from `sender`: the lease is the sender's, `dim` is the job's, the rows are a
/// non-empty whole number of at most `MAX_FEATURE_ROWS_PER_FRAME` rows, and their indices lie in
/// the lease (checked arithmetic). Returns the index range the rows cover.
pub fn eval_features(
    sender: &WorkerId,
    lease: &LeaseView<'_>,
    job_dim: u32,
    first_index: u64,
    dim: u32,
    rows: &[f32],
) -> Result<Range<u64>, InvalidMessage> {
    if lease.holder != sender {
        return Err(InvalidMessage::NotLeaseHolder {
            lease: lease.id,
            worker: sender.clone(),
        });
    }
    if dim != job_dim || dim == 0 {
        return Err(InvalidMessage::FeatureDim {
            expected: job_dim,
            got: dim,
        });
    }
    let dim = dim as usize;
    if rows.is_empty() || !rows.len().is_multiple_of(dim) {
        return Err(InvalidMessage::FeatureRows(format!(
            "{} values are not a non-empty multiple of the dimension {dim}",
            rows.len()
        )));
    }
    let n = rows.len() / dim;
    if n > MAX_FEATURE_ROWS_PER_FRAME {
        return Err(InvalidMessage::FeatureRows(format!(
            "{n} rows exceed {MAX_FEATURE_ROWS_PER_FRAME} per frame"
        )));
    }
    let n = n as u64;
    let outside = || InvalidMessage::OutsideLease {
        first: first_index,
        rows: n,
        lease: lease.indices.clone(),
    };
    let end = first_index.checked_add(n).ok_or_else(outside)?;
    if first_index < lease.indices.start || end > lease.indices.end {
        return Err(outside());
    }
    Ok(first_index..end)
}

/// A reported checkpoint file's name: relative, inside the step directory (no `..`, no root).
pub fn checkpoint_file_name(file: &WrittenFile) -> Result<(), InvalidMessage> {
    let bad = |reason: &str| InvalidMessage::CheckpointFile {
        path: file.path.clone(),
        reason: reason.into(),
    };
    let path = Path::new(&file.path);
    if file.path.is_empty() {
        return Err(bad("empty name"));
    }
    if !path.components().all(|c| matches!(c, Component::Normal(_))) {
        return Err(bad(
            "not a plain relative path inside the checkpoint directory",
        ));
    }
    Ok(())
}

/// A reported checkpoint file as written: its name passes [`checkpoint_file_name`], and the file
/// under `step_dir` has the reported size and SHA-256. Reads the file: call it off the actor.
pub fn checkpoint_file_on_disk(step_dir: &Path, file: &WrittenFile) -> Result<(), InvalidMessage> {
    checkpoint_file_name(file)?;
    let bad = |reason: String| InvalidMessage::CheckpointFile {
        path: file.path.clone(),
        reason,
    };
    let bytes = std::fs::read(step_dir.join(&file.path)).map_err(|e| bad(e.to_string()))?;
    if bytes.len() as u64 != file.bytes {
        return Err(bad(format!(
            "{} bytes on disk, {} reported",
            bytes.len(),
            file.bytes
        )));
    }
    let sha: [u8; 32] = Sha256::digest(&bytes).into();
    if sha != file.sha256 {
        return Err(bad("sha256 on disk differs from the reported one".into()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(holder: &WorkerId) -> LeaseView<'_> {
        LeaseView {
            id: LeaseId(1),
            holder,
            indices: 100..164,
        }
    }

    #[test]
    fn features_of_the_holder_with_the_jobs_dim_inside_the_lease_pass() {
        let w = WorkerId::from("w");
        let rows = vec![0.0; 2 * 4];
        assert_eq!(
            eval_features(&w, &lease(&w), 4, 162, 4, &rows),
            Ok(162..164)
        );
    }

    #[test]
    fn hostile_features_are_refused_with_a_reason() {
        let (w, other) = (WorkerId::from("w"), WorkerId::from("x"));
        let rows = vec![0.0; 4];
        let l = lease(&w);
        assert!(matches!(
            eval_features(&other, &l, 4, 100, 4, &rows),
            Err(InvalidMessage::NotLeaseHolder { .. })
        ));
        assert!(matches!(
            eval_features(&w, &l, 4, 100, 1 << 20, &[]),
            Err(InvalidMessage::FeatureDim { .. })
        ));
        assert!(matches!(
            eval_features(&w, &l, 4, 100, 4, &[]),
            Err(InvalidMessage::FeatureRows(_))
        ));
        assert!(matches!(
            eval_features(&w, &l, 4, u64::MAX, 4, &rows),
            Err(InvalidMessage::OutsideLease { .. })
        ));
        assert!(matches!(
            eval_features(&w, &l, 4, 164, 4, &rows),
            Err(InvalidMessage::OutsideLease { .. })
        ));
    }

    #[test]
    fn checkpoint_files_must_be_inside_the_step_directory_and_match_what_was_reported() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("model.safetensors"), b"abc").unwrap();
        let file = |path: &str, bytes: u64, data: &[u8]| WrittenFile {
            path: path.into(),
            bytes,
            sha256: Sha256::digest(data).into(),
        };
        assert_eq!(
            checkpoint_file_on_disk(dir.path(), &file("model.safetensors", 3, b"abc")),
            Ok(())
        );
        for name in ["../../../etc/passwd", "/abs", "", "a/../b"] {
            assert!(checkpoint_file_name(&file(name, 0, b"")).is_err(), "{name}");
        }
        assert!(
            checkpoint_file_on_disk(dir.path(), &file("model.safetensors", 4, b"abc")).is_err()
        );
        assert!(
            checkpoint_file_on_disk(dir.path(), &file("model.safetensors", 3, b"abd")).is_err()
        );
        assert!(checkpoint_file_on_disk(dir.path(), &file("missing", 3, b"abc")).is_err());
    }
}
