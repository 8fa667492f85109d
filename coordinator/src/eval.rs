//! Evaluation jobs: the coordinator leases whole batches of image indices to eval workers,
//! takes them back from dead, departed or stalled workers, counts every index's Inception
//! features exactly once, and at the end writes the manifest and the FID. Plain state, no
//! network: the job actor feeds it events and sends the messages it returns, so every rule here
//! is tested without a connection.

use eqim_common::coordinator_config::EvalServing;
use eqim_common::eval_plan::{Completion, EvalPlan, LeaseTable};
use eqim_common::fid::{frechet_distance, FeatureMoments, FidStats, FID_MIN_UNBIASED_IMAGES};
use eqim_common::proto::{CoordinatorToWorker, EvalPlanInfo, LeaseId, WorkerId, WrittenFile};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;
use tracing::{info, warn};

/// A message for one worker.
pub type Outgoing = (WorkerId, CoordinatorToWorker);

/// What an evaluation job produced.
#[derive(Debug, Clone, PartialEq)]
pub struct EvalOutcome {
    pub images: u64,
    pub seconds: f64,
    /// Against `eval.fid_stats`, from every image's features.
    pub fid: Option<f64>,
    pub manifest: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum EvalFinishError {
    #[error("evaluation is not finished: {done} of {total} images")]
    NotFinished { done: u64, total: u64 },
    #[error("features cover {have} of {total} images")]
    MissingFeatures { have: u64, total: u64 },
    #[error("FID: {0}")]
    Fid(#[from] eqim_common::fid::FidError),
    #[error("writing {path}: {source}")]
    Write {
        path: String,
        source: eqim_common::files::FileError,
    },
}

/// Where the coordinator keeps a set's progress, inside its output folder, so that a restarted
/// coordinator continues the set instead of starting again.
const STATE_DIR: &str = ".eval-state";
const PLAN_FILE: &str = "plan.json";

/// A completed lease as saved on disk (bincode), written before the completion counts.
#[derive(Debug, Serialize, Deserialize)]
struct LeaseRecord {
    start: u64,
    end: u64,
    files: Vec<WrittenFile>,
    dim: u32,
    /// Inception features of start..end, row-major (empty without FID).
    rows: Vec<f32>,
}

/// Features received for a live lease, waiting for its completion.
#[derive(Debug, Default)]
struct PendingFeatures {
    /// first index -> rows
    pieces: BTreeMap<u64, Vec<f32>>,
    rows: u64,
}

/// The coordinator's side of one evaluation job.
#[derive(Debug)]
pub struct EvalState {
    cfg: EvalServing,
    out_dir: PathBuf,
    /// The first worker's plan, which every later worker must match.
    plan: Option<EvalPlanInfo>,
    table: Option<LeaseTable>,
    /// Lease id -> holder, for checking who sends what.
    holders: BTreeMap<u64, WorkerId>,
    pending: BTreeMap<u64, PendingFeatures>,
    moments: Option<FeatureMoments>,
    files: BTreeMap<u64, WrittenFile>,
    /// Workers that asked for work while everything left was leased: served when a lease comes
    /// back (dead worker, timeout) or told that the job is done.
    waiting: BTreeMap<WorkerId, u64>,
    started: Option<Instant>,
}

impl EvalState {
    /// A new evaluation, or the continuation of the one whose progress is saved in the output
    /// folder (the plan and every completed lease).
    pub fn new(cfg: EvalServing, job_dir: &Path) -> Self {
        let out_dir = cfg.out.clone().unwrap_or_else(|| job_dir.join("eval"));
        let mut state = Self {
            cfg,
            out_dir,
            plan: None,
            table: None,
            holders: BTreeMap::new(),
            pending: BTreeMap::new(),
            moments: None,
            files: BTreeMap::new(),
            waiting: BTreeMap::new(),
            started: None,
        };
        state.restore();
        state
    }

    fn state_dir(&self) -> PathBuf {
        self.out_dir.join(STATE_DIR)
    }

    fn adopt(&mut self, plan: EvalPlanInfo) {
        self.table = Some(LeaseTable::with_blocks(
            plan.num_images,
            plan.batch_size,
            self.cfg.lease_timeout,
        ));
        self.plan = Some(plan);
    }

    /// Loads saved progress. A record that does not read back (a crash mid-write leaves only a
    /// temp file, but a disk may still corrupt one) is skipped: its images are simply redone.
    fn restore(&mut self) {
        let dir = self.state_dir();
        let plan_path = dir.join(PLAN_FILE);
        let Ok(text) = std::fs::read_to_string(&plan_path) else {
            return;
        };
        let plan: EvalPlanInfo = match serde_json::from_str(&text) {
            Ok(plan) => plan,
            Err(e) => {
                warn!(path = %plan_path.display(), cause = %e, "saved evaluation plan unreadable; starting the set again");
                return;
            }
        };
        if plan.num_images != self.cfg.num_images {
            warn!(path = %plan_path.display(), saved = plan.num_images, config = self.cfg.num_images, "saved evaluation is of another size; starting the set again");
            return;
        }
        self.adopt(plan);
        let mut names: Vec<PathBuf> = std::fs::read_dir(&dir)
            .map(|entries| {
                entries
                    .filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| p.extension().is_some_and(|x| x == "bin"))
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        let mut restored = 0u64;
        for path in names {
            let record = std::fs::read(&path).ok().and_then(|bytes| {
                bincode::serde::decode_from_slice::<LeaseRecord, _>(
                    &bytes,
                    bincode::config::standard(),
                )
                .ok()
                .map(|(r, _)| r)
            });
            match record.map(|r| self.apply_record(r)) {
                Some(Ok(n)) => restored += n,
                Some(Err(why)) => {
                    warn!(path = %path.display(), %why, "saved lease not used; its images will be redone")
                }
                None => {
                    warn!(path = %path.display(), "saved lease unreadable; its images will be redone")
                }
            }
        }
        let (done, total) = self.progress();
        info!(dir = %dir.display(), restored, done, total, "evaluation progress restored");
    }

    fn apply_record(&mut self, r: LeaseRecord) -> Result<u64, String> {
        let n = r.end.saturating_sub(r.start);
        let dim = r.dim as usize;
        let want_features = self.cfg.fid_stats.is_some();
        if want_features && (dim == 0 || r.rows.len() != n as usize * dim) {
            return Err(format!("{} feature values for {n} images", r.rows.len()));
        }
        if let Some(m) = &self.moments {
            if want_features && m.dim != dim {
                return Err(format!("feature dimension {dim}, the set's is {}", m.dim));
            }
        }
        let table = self.table.as_mut().ok_or("no plan")?;
        if !table.mark_done(r.start..r.end) {
            return Err(format!(
                "indices {}..{} overlap or exceed the set",
                r.start, r.end
            ));
        }
        if want_features {
            self.moments
                .get_or_insert_with(|| FeatureMoments::new(dim))
                .add_rows(&r.rows)
                .map_err(|e| e.to_string())?;
        }
        for file in r.files {
            if let Some(i) = image_index(&file) {
                self.files.insert(i, file);
            }
        }
        Ok(n)
    }

    /// Saves a completed lease before it counts (temp file, fsync, rename).
    fn save_record(&self, record: &LeaseRecord) -> std::io::Result<()> {
        let bytes = bincode::serde::encode_to_vec(record, bincode::config::standard())
            .map_err(std::io::Error::other)?;
        let name = format!("done-{:010}-{:010}.bin", record.start, record.end);
        eqim_common::files::write_atomic(&self.state_dir().join(name), &bytes)
            .map_err(|e| std::io::Error::new(e.source.kind(), e.to_string()))
    }

    /// (images done, images in the set)
    pub fn progress(&self) -> (u64, u64) {
        let done = self.table.as_ref().map_or(0, LeaseTable::done_count);
        (done, self.cfg.num_images)
    }

    pub fn is_finished(&self) -> bool {
        self.table.as_ref().is_some_and(LeaseTable::is_finished)
    }

    /// Why `plan` cannot join this job, if it cannot.
    fn check_plan(&self, plan: &EvalPlanInfo) -> Option<String> {
        if let Some(job) = &self.plan {
            if job == plan {
                return None;
            }
            let mut differences = Vec::new();
            for (what, a, b) in [
                ("num_images", job.num_images, plan.num_images),
                ("class_num", job.class_num, plan.class_num),
                ("seed", job.base_seed, plan.base_seed),
                ("batch_size", job.batch_size, plan.batch_size),
            ] {
                if a != b {
                    differences.push(format!("{what} {b} (job: {a})"));
                }
            }
            if job.settings_json != plan.settings_json {
                differences.push(format!(
                    "settings {} (job: {})",
                    plan.settings_json, job.settings_json
                ));
            }
            return Some(format!(
                "this worker's evaluation plan differs from the job's: {}; start every eval worker with the same arguments (the job's plan is saved in {}: delete that folder, or use another output folder, to sample a new set)",
                differences.join(", "),
                self.state_dir().display()
            ));
        }
        if plan.num_images != self.cfg.num_images {
            return Some(format!(
                "this worker plans {} images but the coordinator's eval.num_images is {}: pass --num-images {}",
                plan.num_images, self.cfg.num_images, self.cfg.num_images
            ));
        }
        if let Err(e) = EvalPlan::new(plan.num_images, plan.class_num, plan.base_seed) {
            return Some(e.to_string());
        }
        if plan.batch_size == 0 {
            return Some("batch size 0: pass --batch-size of at least 1".into());
        }
        None
    }

    /// A worker asks for up to `max_images` indices.
    pub fn on_request(
        &mut self,
        now: Instant,
        worker: &WorkerId,
        plan: EvalPlanInfo,
        max_images: u64,
    ) -> Vec<Outgoing> {
        if let Some(reason) = self.check_plan(&plan) {
            warn!(worker_id = %worker, %reason, "eval worker refused");
            return vec![(worker.clone(), CoordinatorToWorker::EvalRefused { reason })];
        }
        if self.plan.is_none() {
            info!(num_images = plan.num_images, batch_size = plan.batch_size, settings = %plan.settings_json, "evaluation plan adopted");
            let path = self.state_dir().join(PLAN_FILE);
            let json = serde_json::to_vec_pretty(&plan).expect("the plan serializes");
            if let Err(e) = eqim_common::files::write_atomic(&path, &json) {
                warn!(path = %path.display(), cause = %e, "cannot save the evaluation plan; a restarted coordinator would start the set again");
            }
            self.adopt(plan);
        }
        self.started.get_or_insert(now);
        let max_images = max_images.min(self.cfg.lease_images);
        self.waiting.insert(worker.clone(), max_images);
        self.serve_waiting(now)
    }

    /// Grants to every waiting worker while work is free; `EvalDone` to all of them once
    /// everything is done.
    fn serve_waiting(&mut self, now: Instant) -> Vec<Outgoing> {
        let mut out = Vec::new();
        let Some(table) = self.table.as_mut() else {
            return out;
        };
        if table.is_finished() {
            for (worker, _) in std::mem::take(&mut self.waiting) {
                out.push((worker, CoordinatorToWorker::EvalDone));
            }
            return out;
        }
        let want_features = self.cfg.fid_stats.is_some();
        let deadline_ms = self.cfg.lease_timeout.as_millis() as u64;
        for (worker, max_images) in std::mem::take(&mut self.waiting) {
            match table.grant(now, &worker.0, max_images) {
                Some(lease) => {
                    self.holders.insert(lease.id, worker.clone());
                    out.push((
                        worker,
                        CoordinatorToWorker::EvalLeaseGrant {
                            lease: LeaseId(lease.id),
                            indices: lease.indices,
                            deadline_ms,
                            want_features,
                        },
                    ));
                }
                None => {
                    self.waiting.insert(worker, max_images);
                }
            }
        }
        out
    }

    fn held_by(&self, lease: LeaseId, worker: &WorkerId) -> bool {
        self.holders.get(&lease.0) == Some(worker)
    }

    pub fn on_renew(&mut self, now: Instant, worker: &WorkerId, lease: LeaseId) {
        let renewed = self.held_by(lease, worker)
            && self
                .table
                .as_mut()
                .and_then(|t| t.renew(now, lease.0))
                .is_some();
        if !renewed {
            // It expired and went to someone else; the worker learns at completion.
            info!(worker_id = %worker, lease = lease.0, "renewal of a lease no longer held");
        }
    }

    /// Features for part of a lease. Checked against the lease and kept until it completes.
    pub fn on_features(
        &mut self,
        worker: &WorkerId,
        lease: LeaseId,
        first_index: u64,
        dim: u32,
        rows: Vec<f32>,
    ) -> Result<(), String> {
        if !self.held_by(lease, worker) {
            return Err(format!(
                "features for lease {} not held by {worker}",
                lease.0
            ));
        }
        let dim = dim as usize;
        if dim == 0 || !rows.len().is_multiple_of(dim) {
            return Err(format!("{} values are not rows of {dim}", rows.len()));
        }
        if let Some(m) = &self.moments {
            if m.dim != dim {
                return Err(format!("feature dimension {dim}, the job's is {}", m.dim));
            }
        }
        let indices = self
            .table
            .as_ref()
            .and_then(|t| t.live_leases().find(|l| l.id == lease.0))
            .map(|l| l.indices.clone())
            .ok_or_else(|| format!("lease {} is not live", lease.0))?;
        let n = (rows.len() / dim) as u64;
        if first_index < indices.start || first_index + n > indices.end {
            return Err(format!(
                "rows {first_index}..{} outside lease {} ({indices:?})",
                first_index + n,
                lease.0
            ));
        }
        self.moments.get_or_insert_with(|| FeatureMoments::new(dim));
        let pending = self.pending.entry(lease.0).or_default();
        if let Some(old) = pending.pieces.insert(first_index, rows) {
            pending.rows -= (old.len() / dim) as u64;
        }
        pending.rows += n;
        Ok(())
    }

    /// A lease is done: its files are recorded and its features counted, or, when features
    /// are missing, the lease goes back to the pool. Returns grants/`EvalDone` for waiting
    /// workers.
    pub fn on_complete(
        &mut self,
        now: Instant,
        worker: &WorkerId,
        lease: LeaseId,
        files: Vec<WrittenFile>,
    ) -> Vec<Outgoing> {
        if !self.held_by(lease, worker) {
            warn!(worker_id = %worker, lease = lease.0, "late completion of a lease given to another worker; ignored");
            self.pending.remove(&lease.0);
            return self.serve_waiting(now);
        }
        self.holders.remove(&lease.0);
        let pending = self.pending.remove(&lease.0).unwrap_or_default();
        let Some(table) = self.table.as_mut() else {
            return Vec::new();
        };
        let indices = table
            .live_leases()
            .find(|l| l.id == lease.0)
            .map(|l| l.indices.clone());
        let expected = indices.as_ref().map_or(0, |r| r.end - r.start);
        if self.cfg.fid_stats.is_some() && indices.is_some() && pending.rows != expected {
            warn!(worker_id = %worker, lease = lease.0, rows = pending.rows, expected, "lease completed without all its features; handed out again");
            table.abandon(lease.0);
            return self.serve_waiting(now);
        }
        if let Some(range) = &indices {
            let record = LeaseRecord {
                start: range.start,
                end: range.end,
                files: files
                    .iter()
                    .filter(|f| image_index(f).is_some_and(|i| range.contains(&i)))
                    .cloned()
                    .collect(),
                dim: self.moments.as_ref().map_or(0, |m| m.dim as u32),
                rows: pending.pieces.values().flatten().copied().collect(),
            };
            if let Err(e) = self.save_record(&record) {
                warn!(cause = %e, lease = lease.0, "cannot save the completed lease; a restarted coordinator would redo it");
            }
        }
        let Some(table) = self.table.as_mut() else {
            return Vec::new();
        };
        match table.complete(now, lease.0) {
            Completion::Accepted { indices } => {
                if let Some(m) = self.moments.as_mut() {
                    for rows in pending.pieces.values() {
                        m.add_rows(rows)
                            .expect("feature rows were checked against the dimension");
                    }
                }
                for file in files {
                    match image_index(&file) {
                        Some(i) if indices.contains(&i) => {
                            self.files.insert(i, file);
                        }
                        _ => {
                            warn!(worker_id = %worker, file = %file.path, "reported file is not an image of its lease")
                        }
                    }
                }
                let (done, total) = self.progress();
                info!(worker_id = %worker, lease = lease.0, ?indices, done, total, "eval lease complete");
            }
            Completion::Stale => {
                warn!(worker_id = %worker, lease = lease.0, "completion of an expired lease; ignored");
            }
        }
        self.serve_waiting(now)
    }

    /// A worker's session ended: its leases and unfinished features go back.
    pub fn on_worker_lost(&mut self, now: Instant, worker: &WorkerId) -> Vec<Outgoing> {
        self.waiting.remove(worker);
        if let Some(table) = self.table.as_mut() {
            for id in table.worker_lost(&worker.0) {
                warn!(worker_id = %worker, lease = id, "lease of a lost worker handed out again");
                self.pending.remove(&id);
                self.holders.remove(&id);
            }
        }
        self.serve_waiting(now)
    }

    /// Returns stalled leases (no renewal within the lease timeout) to the pool.
    pub fn on_tick(&mut self, now: Instant) -> Vec<Outgoing> {
        if let Some(table) = self.table.as_mut() {
            for id in table.expire(now) {
                warn!(lease = id, "eval lease timed out; handed out again");
                self.pending.remove(&id);
                self.holders.remove(&id);
            }
        }
        self.serve_waiting(now)
    }

    /// Takes what the finishing step needs out of a finished evaluation; the state stays
    /// finished (late requests get `EvalDone`).
    pub fn take_results(&mut self, now: Instant) -> Result<EvalResults, EvalFinishError> {
        let (done, total) = self.progress();
        let (Some(plan), true) = (self.plan.clone(), self.is_finished()) else {
            return Err(EvalFinishError::NotFinished { done, total });
        };
        Ok(EvalResults {
            cfg: self.cfg.clone(),
            out_dir: self.out_dir.clone(),
            plan,
            moments: self.moments.take(),
            files: std::mem::take(&mut self.files),
            seconds: self
                .started
                .map_or(0.0, |s| now.duration_since(s).as_secs_f64()),
        })
    }
}

/// A finished evaluation's data, for the (slow) finishing step.
#[derive(Debug)]
pub struct EvalResults {
    cfg: EvalServing,
    out_dir: PathBuf,
    plan: EvalPlanInfo,
    moments: Option<FeatureMoments>,
    files: BTreeMap<u64, WrittenFile>,
    seconds: f64,
}

impl EvalResults {
    /// Computes the FID (if asked) and writes `manifest.json` atomically. Slow for 2048-dim
    /// features (two eigendecompositions): run it off the actor's thread.
    pub fn finish(self) -> Result<EvalOutcome, EvalFinishError> {
        let plan = &self.plan;
        let total = plan.num_images;
        let seconds = self.seconds;
        let mut fid = None;
        let mut reference_sha256 = None;
        if let Some(stats_path) = &self.cfg.fid_stats {
            let moments = self.moments.as_ref().filter(|m| m.count == total).ok_or(
                EvalFinishError::MissingFeatures {
                    have: self.moments.as_ref().map_or(0, |m| m.count),
                    total,
                },
            )?;
            if moments.count < FID_MIN_UNBIASED_IMAGES {
                warn!(
                    images = moments.count,
                    "FID from fewer than {FID_MIN_UNBIASED_IMAGES} images is biased upwards; compare only numbers computed with the same N"
                );
            }
            let started = Instant::now();
            let reference = FidStats::read(stats_path)?;
            let distance = frechet_distance(&moments.stats()?, &reference)?;
            info!(
                fid = distance,
                images = moments.count,
                seconds = started.elapsed().as_secs_f64(),
                "FID computed"
            );
            fid = Some(distance);
            reference_sha256 = std::fs::read(stats_path)
                .ok()
                .map(|b| hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&b)));
        }
        let layout = EvalPlan::new(plan.num_images, plan.class_num, plan.base_seed)
            .expect("the plan was checked when adopted");
        let images: Vec<serde_json::Value> = (0..plan.num_images)
            .map(|i| {
                let file = self.files.get(&i);
                serde_json::json!({
                    "index": i,
                    "file": EvalPlan::file_name(i),
                    "label": layout.label(i),
                    "noise_seed": layout.noise_seed(i),
                    "sha256": file.map(|f| hex::encode(f.sha256)),
                    "bytes": file.map(|f| f.bytes),
                })
            })
            .collect();
        let settings: serde_json::Value = serde_json::from_str(&plan.settings_json)
            .unwrap_or_else(|_| serde_json::Value::String(plan.settings_json.clone()));
        let manifest = serde_json::json!({
            "num_images": plan.num_images,
            "class_num": plan.class_num,
            "base_seed": plan.base_seed,
            "batch_size": plan.batch_size,
            "settings": settings,
            "seconds": seconds,
            "fid": fid,
            "fid_images": fid.map(|_| total),
            "fid_stats": self.cfg.fid_stats.as_ref().map(|p| p.display().to_string()),
            "fid_stats_sha256": reference_sha256,
            "noise": "image i: manual_seed(noise_seed(i)), then randn(1, vae_embed_dim) per token; labels in the reference's balanced order",
            "images": images,
        });
        let path = self.out_dir.join("manifest.json");
        eqim_common::files::write_atomic(
            &path,
            &serde_json::to_vec_pretty(&manifest).expect("json values serialize"),
        )
        .map_err(|source| EvalFinishError::Write {
            path: path.display().to_string(),
            source,
        })?;
        Ok(EvalOutcome {
            images: total,
            seconds,
            fid,
            manifest: path,
        })
    }
}

/// The index of an image file named `{i:05}.png`.
fn image_index(file: &WrittenFile) -> Option<u64> {
    Path::new(&file.path)
        .file_stem()
        .and_then(|s| s.to_str())
        .and_then(|s| s.parse::<u64>().ok())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const TIMEOUT: Duration = Duration::from_secs(10);

    fn cfg(num_images: u64, fid_stats: Option<PathBuf>) -> EvalServing {
        EvalServing {
            num_images,
            lease_images: 4,
            lease_timeout: TIMEOUT,
            fid_stats,
            out: None,
        }
    }

    #[test]
    fn a_restarted_coordinator_continues_the_set_from_its_saved_leases() {
        let now = Instant::now();
        let dir = tempfile::tempdir().unwrap();
        let points: Vec<f32> = vec![0.0, 1.0, 2.0, 0.5, -1.0, 0.0, 1.0, 3.0];
        let mut reference = FeatureMoments::new(2);
        reference.add_rows(&points).unwrap();
        let stats = dir.path().join("ref.npz");
        reference.stats().unwrap().write(&stats).unwrap();
        let mut first = EvalState::new(cfg(4, Some(stats.clone())), dir.path());
        let (a, ia) = grant(&first.on_request(now, &w("a"), plan(4, 2), 2), "a");
        first
            .on_features(&w("a"), a, 0, 2, points[..4].to_vec())
            .unwrap();
        first.on_complete(now, &w("a"), a, files(ia));
        // A lease granted but not completed before the "crash" is not saved.
        grant(&first.on_request(now, &w("b"), plan(4, 2), 2), "b");
        drop(first);

        let mut second = EvalState::new(cfg(4, Some(stats.clone())), dir.path());
        assert_eq!(second.progress(), (2, 4), "the completed lease is restored");
        let mut other = plan(4, 2);
        other.base_seed = 9;
        match &second.on_request(now, &w("c"), other, 2)[..] {
            [(_, CoordinatorToWorker::EvalRefused { reason })] => {
                assert!(reason.contains(".eval-state"), "{reason}")
            }
            other => panic!("{other:?}"),
        }
        let (b, ib) = grant(&second.on_request(now, &w("c"), plan(4, 2), 2), "c");
        assert_eq!(ib, 2..4, "only the missing block is handed out");
        second
            .on_features(&w("c"), b, 2, 2, points[4..].to_vec())
            .unwrap();
        second.on_complete(now, &w("c"), b, files(ib));
        let outcome = second.take_results(now).unwrap().finish().unwrap();
        assert!(
            outcome.fid.expect("fid").abs() < 1e-9,
            "restored features count"
        );
        let manifest: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&outcome.manifest).unwrap()).unwrap();
        assert_eq!(manifest["images"][0]["sha256"], hex::encode([0u8; 32]));

        // A damaged record is skipped (its images are redone), not trusted.
        let state = dir.path().join("eval").join(STATE_DIR);
        let record = std::fs::read_dir(&state)
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| p.extension().is_some_and(|x| x == "bin"))
            .expect("a record");
        std::fs::write(&record, b"garbage").unwrap();
        let third = EvalState::new(cfg(4, Some(stats)), dir.path());
        assert_eq!(third.progress(), (2, 4));
    }

    fn plan(num_images: u64, batch_size: u64) -> EvalPlanInfo {
        EvalPlanInfo {
            num_images,
            class_num: 2,
            base_seed: 1,
            batch_size,
            settings_json: r#"{"cfg":3.0}"#.into(),
        }
    }

    fn w(name: &str) -> WorkerId {
        WorkerId(name.into())
    }

    fn grant(out: &[Outgoing], worker: &str) -> (LeaseId, std::ops::Range<u64>) {
        out.iter()
            .find_map(|(to, msg)| match msg {
                CoordinatorToWorker::EvalLeaseGrant { lease, indices, .. } if to.0 == worker => {
                    Some((*lease, indices.clone()))
                }
                _ => None,
            })
            .unwrap_or_else(|| panic!("no grant for {worker} in {out:?}"))
    }

    fn file(index: u64) -> WrittenFile {
        WrittenFile {
            path: EvalPlan::file_name(index),
            bytes: 10 + index,
            sha256: [index as u8; 32],
        }
    }

    fn files(indices: std::ops::Range<u64>) -> Vec<WrittenFile> {
        indices.map(file).collect()
    }

    #[test]
    fn leases_are_whole_batches_and_a_waiting_worker_gets_a_dead_workers_lease() {
        let now = Instant::now();
        let dir = tempfile::tempdir().unwrap();
        let mut eval = EvalState::new(cfg(8, None), dir.path());
        // Batch 3: blocks 0..3, 3..6, 6..8; lease_images 4 rounds down to one block.
        let (a, ia) = grant(&eval.on_request(now, &w("a"), plan(8, 3), 16), "a");
        let (_b, ib) = grant(&eval.on_request(now, &w("b"), plan(8, 3), 16), "b");
        let (_c, ic) = grant(&eval.on_request(now, &w("c"), plan(8, 3), 16), "c");
        assert_eq!((ia, ib.clone(), ic), (0..3, 3..6, 6..8));
        // Everything is leased: d waits, then gets b's block when b dies.
        assert!(eval.on_request(now, &w("d"), plan(8, 3), 16).is_empty());
        let out = eval.on_worker_lost(now, &w("b"));
        assert_eq!(grant(&out, "d").1, ib);
        // a completes; nothing is finished until every block is done.
        let out = eval.on_complete(now, &w("a"), a, files(0..3));
        assert!(out.is_empty());
        assert_eq!(eval.progress(), (3, 8));
        assert!(!eval.is_finished());
    }

    #[test]
    fn a_different_plan_is_refused_with_what_differs() {
        let now = Instant::now();
        let dir = tempfile::tempdir().unwrap();
        let mut eval = EvalState::new(cfg(8, None), dir.path());
        let out = eval.on_request(now, &w("a"), plan(6, 2), 4);
        match &out[..] {
            [(_, CoordinatorToWorker::EvalRefused { reason })] => {
                assert!(reason.contains("--num-images 8"), "{reason}")
            }
            other => panic!("{other:?}"),
        }
        grant(&eval.on_request(now, &w("a"), plan(8, 2), 4), "a");
        let mut other = plan(8, 2);
        other.settings_json = r#"{"cfg":7.0}"#.into();
        match &eval.on_request(now, &w("b"), other, 4)[..] {
            [(_, CoordinatorToWorker::EvalRefused { reason })] => {
                assert!(
                    reason.contains("cfg\":7.0") && reason.contains("job:"),
                    "{reason}"
                )
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn stalled_leases_expire_and_late_completions_do_not_count() {
        let start = Instant::now();
        let dir = tempfile::tempdir().unwrap();
        let mut eval = EvalState::new(cfg(4, None), dir.path());
        let (slow, range) = grant(&eval.on_request(start, &w("slow"), plan(4, 4), 4), "slow");
        assert!(eval.on_request(start, &w("fast"), plan(4, 4), 4).is_empty());
        let later = start + TIMEOUT + Duration::from_millis(1);
        let (fast, again) = grant(&eval.on_tick(later), "fast");
        assert_eq!(again, range);
        eval.on_complete(later, &w("slow"), slow, files(0..4));
        assert_eq!(eval.progress(), (0, 4), "stale completion ignored");
        let out = eval.on_complete(later, &w("fast"), fast, files(0..4));
        assert!(out.is_empty());
        assert!(eval.is_finished());
        // The next request is answered with EvalDone.
        let out = eval.on_request(later, &w("slow"), plan(4, 4), 4);
        assert!(matches!(&out[..], [(_, CoordinatorToWorker::EvalDone)]));
    }

    #[test]
    fn features_are_counted_once_and_a_lease_without_them_is_redone() {
        let now = Instant::now();
        let dir = tempfile::tempdir().unwrap();
        // Reference: the same 4 two-dimensional points, so the FID must come out 0.
        let points: Vec<f32> = vec![0.0, 1.0, 2.0, 0.5, -1.0, 0.0, 1.0, 3.0];
        let mut reference = FeatureMoments::new(2);
        reference.add_rows(&points).unwrap();
        let stats = dir.path().join("ref.npz");
        reference.stats().unwrap().write(&stats).unwrap();
        let mut eval = EvalState::new(cfg(4, Some(stats)), dir.path());
        let (a, ia) = grant(&eval.on_request(now, &w("a"), plan(4, 2), 2), "a");
        let (b, ib) = grant(&eval.on_request(now, &w("b"), plan(4, 2), 2), "b");
        assert_eq!((ia.clone(), ib.clone()), (0..2, 2..4));
        // Wrong holder, ragged rows and rows outside the lease are refused.
        assert!(eval
            .on_features(&w("b"), a, 0, 2, points[..4].to_vec())
            .is_err());
        assert!(eval
            .on_features(&w("a"), a, 0, 2, points[..3].to_vec())
            .is_err());
        assert!(eval
            .on_features(&w("a"), a, 1, 2, points[..4].to_vec())
            .is_err());
        eval.on_features(&w("a"), a, 0, 2, points[..4].to_vec())
            .unwrap();
        // b completes without its features: its block goes back and a gets it next.
        eval.on_complete(now, &w("b"), b, files(ib.clone()));
        assert_eq!(eval.progress(), (0, 4));
        eval.on_complete(now, &w("a"), a, files(ia));
        let (a2, again) = grant(&eval.on_request(now, &w("a"), plan(4, 2), 2), "a");
        assert_eq!(again, ib);
        eval.on_features(&w("a"), a2, 2, 2, points[4..6].to_vec())
            .unwrap();
        eval.on_features(&w("a"), a2, 3, 2, points[6..].to_vec())
            .unwrap();
        eval.on_complete(now, &w("a"), a2, files(again));
        assert!(eval.is_finished());
        let outcome = eval.take_results(now).unwrap().finish().unwrap();
        let fid = outcome.fid.expect("fid");
        assert!(fid.abs() < 1e-9, "{fid}");
        let manifest: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&outcome.manifest).unwrap()).unwrap();
        assert_eq!(manifest["images"][3]["label"], 1);
        assert_eq!(manifest["images"][3]["sha256"], hex::encode([3u8; 32]));
        assert_eq!(manifest["settings"]["cfg"], 3.0);
        assert_eq!(manifest["fid_images"], 4);
    }
}
