//! The evaluation plan as pure functions of the image index (class label in the reference's
//! balanced order, noise seed, file name) and the lease table the coordinator uses to hand out
//! index ranges, so the sample set is the same whatever the cluster does.
//! Reference: `engine_generator.evaluate` in https://github.com/drx-code/EquivariantModeling

use std::collections::BTreeMap;
use std::ops::Range;
use std::time::{Duration, Instant};

/// How long a worker may hold an eval lease without renewing it.
pub const DEFAULT_EVAL_LEASE_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EvalPlanError {
    #[error("--num-images {num_images} must be a positive multiple of the {class_num} classes (the reference gives every class num_images / class_num images)")]
    Unbalanced { num_images: u64, class_num: u64 },
}

/// Which image gets which label and noise, independent of workers and batches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EvalPlan {
    pub num_images: u64,
    pub class_num: u64,
    pub base_seed: u64,
}

impl EvalPlan {
    pub fn new(num_images: u64, class_num: u64, base_seed: u64) -> Result<Self, EvalPlanError> {
        if num_images == 0 || class_num == 0 || !num_images.is_multiple_of(class_num) {
            return Err(EvalPlanError::Unbalanced {
                num_images,
                class_num,
            });
        }
        Ok(Self {
            num_images,
            class_num,
            base_seed,
        })
    }

    /// The reference's label list `[0]*k + [1]*k + ... + [C-1]*k`, k = num_images / class_num.
    pub fn label(&self, index: u64) -> u64 {
        index / (self.num_images / self.class_num)
    }

    /// The seed of image `index`'s noise generator: a splitmix64 mix of (base seed, index), kept
    /// in 0..2^63 because libtorch seeds are signed.
    pub fn noise_seed(&self, index: u64) -> i64 {
        let mixed = crate::seed::mix(crate::seed::mix(self.base_seed) ^ index);
        (mixed >> 1) as i64
    }

    /// `{index:05}.png`, as the reference names its samples.
    pub fn file_name(index: u64) -> String {
        format!("{index:05}.png")
    }
}

/// A lease handed to a worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EvalLease {
    pub id: u64,
    pub worker: String,
    pub indices: Range<u64>,
    pub deadline: Instant,
}

/// What became of a completion report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Completion {
    /// The indices are done; count the worker's feature sums.
    Accepted { indices: Range<u64> },
    /// The lease had expired or its worker was dropped and the indices went back to the pool:
    /// ignore the report (its PNGs are byte-identical to whatever the new holder writes).
    Stale,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum IndexState {
    Todo,
    Leased,
    Done,
}

/// Hands out contiguous index ranges with deadlines, takes back expired and dead workers'
/// ranges, and is finished when every index is done. Completions are all-or-nothing per lease,
/// so feature partial sums are counted exactly once per index.
#[derive(Debug)]
pub struct LeaseTable {
    states: Vec<IndexState>,
    leases: BTreeMap<u64, EvalLease>,
    next_id: u64,
    done: u64,
    lease_timeout: Duration,
    block: u64,
}

impl LeaseTable {
    pub fn new(num_images: u64, lease_timeout: Duration) -> Self {
        Self::with_blocks(num_images, 1, lease_timeout)
    }

    /// A table whose leases are whole blocks `[k * block, (k + 1) * block)` (the last one may be
    /// shorter): a worker samples a block as one batch, so the batch an image is computed in is
    /// fixed by its index, and so are its bytes, whichever worker gets it.
    pub fn with_blocks(num_images: u64, block: u64, lease_timeout: Duration) -> Self {
        Self {
            states: vec![IndexState::Todo; num_images as usize],
            leases: BTreeMap::new(),
            next_id: 1,
            done: 0,
            lease_timeout,
            block: block.max(1),
        }
    }

    pub fn block_size(&self) -> u64 {
        self.block
    }

    pub fn num_images(&self) -> u64 {
        self.states.len() as u64
    }

    /// Leases up to `max_images` consecutive unleased indices (the lowest first; whole blocks,
    /// at least one), or `None` when nothing is free right now (all done, or the rest is
    /// leased). Leases start on block boundaries because they are granted and returned whole.
    pub fn grant(&mut self, now: Instant, worker: &str, max_images: u64) -> Option<EvalLease> {
        self.expire(now);
        let start = self.states.iter().position(|s| *s == IndexState::Todo)?;
        let max_images = (max_images / self.block).max(1) * self.block;
        let len = self.states[start..]
            .iter()
            .take(max_images as usize)
            .take_while(|s| **s == IndexState::Todo)
            .count();
        for state in &mut self.states[start..start + len] {
            *state = IndexState::Leased;
        }
        let lease = EvalLease {
            id: self.next_id,
            worker: worker.to_string(),
            indices: start as u64..(start + len) as u64,
            deadline: now + self.lease_timeout,
        };
        self.next_id += 1;
        self.leases.insert(lease.id, lease.clone());
        Some(lease)
    }

    /// Pushes a live lease's deadline; `None` if it is no longer held.
    pub fn renew(&mut self, now: Instant, lease_id: u64) -> Option<Instant> {
        self.expire(now);
        let lease = self.leases.get_mut(&lease_id)?;
        lease.deadline = now + self.lease_timeout;
        Some(lease.deadline)
    }

    pub fn complete(&mut self, now: Instant, lease_id: u64) -> Completion {
        self.expire(now);
        let Some(lease) = self.leases.remove(&lease_id) else {
            return Completion::Stale;
        };
        for state in &mut self.states[lease.indices.start as usize..lease.indices.end as usize] {
            *state = IndexState::Done;
        }
        self.done += lease.indices.end - lease.indices.start;
        Completion::Accepted {
            indices: lease.indices,
        }
    }

    /// Returns a dead or departed worker's leases to the pool; the lease ids it returned.
    pub fn worker_lost(&mut self, worker: &str) -> Vec<u64> {
        let lost: Vec<u64> = self
            .leases
            .values()
            .filter(|l| l.worker == worker)
            .map(|l| l.id)
            .collect();
        for id in &lost {
            self.release(*id);
        }
        lost
    }

    /// Returns leases past their deadline to the pool; the lease ids it returned.
    pub fn expire(&mut self, now: Instant) -> Vec<u64> {
        let expired: Vec<u64> = self
            .leases
            .values()
            .filter(|l| l.deadline <= now)
            .map(|l| l.id)
            .collect();
        for id in &expired {
            self.release(*id);
        }
        expired
    }

    /// Marks `indices` done without a lease (restored from a saved completion); false, changing
    /// nothing, unless they are all in range and still to do.
    pub fn mark_done(&mut self, indices: Range<u64>) -> bool {
        let (start, end) = (indices.start as usize, indices.end as usize);
        if start >= end
            || end > self.states.len()
            || self.states[start..end]
                .iter()
                .any(|s| *s != IndexState::Todo)
        {
            return false;
        }
        for state in &mut self.states[start..end] {
            *state = IndexState::Done;
        }
        self.done += (end - start) as u64;
        true
    }

    /// Returns one lease to the pool (e.g. it completed without the data it owed).
    pub fn abandon(&mut self, lease_id: u64) {
        self.release(lease_id);
    }

    fn release(&mut self, lease_id: u64) {
        if let Some(lease) = self.leases.remove(&lease_id) {
            for state in &mut self.states[lease.indices.start as usize..lease.indices.end as usize]
            {
                *state = IndexState::Todo;
            }
        }
    }

    pub fn done_count(&self) -> u64 {
        self.done
    }

    pub fn is_finished(&self) -> bool {
        self.done == self.states.len() as u64
    }

    pub fn live_leases(&self) -> impl Iterator<Item = &EvalLease> {
        self.leases.values()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TIMEOUT: Duration = Duration::from_secs(10);

    #[test]
    fn labels_follow_the_reference_balanced_order() {
        let plan = EvalPlan::new(3000, 30, 1).expect("plan");
        assert_eq!(plan.label(0), 0);
        assert_eq!(plan.label(99), 0);
        assert_eq!(plan.label(100), 1);
        assert_eq!(plan.label(2999), 29);
        let counts = (0..3000).fold(vec![0; 30], |mut c, i| {
            c[plan.label(i) as usize] += 1;
            c
        });
        assert!(counts.iter().all(|&c| c == 100));
    }

    #[test]
    fn unbalanced_image_counts_are_refused_with_the_fix() {
        let err = EvalPlan::new(3001, 30, 1).expect_err("3001 % 30 != 0");
        assert!(
            err.to_string().contains("multiple of the 30 classes"),
            "{err}"
        );
        assert!(EvalPlan::new(0, 30, 1).is_err());
        assert!(EvalPlan::new(30, 0, 1).is_err());
    }

    #[test]
    fn noise_seeds_depend_on_base_seed_and_index_only() {
        let a = EvalPlan::new(64, 4, 1).expect("plan");
        let b = EvalPlan::new(128, 8, 1).expect("plan");
        let c = EvalPlan::new(64, 4, 2).expect("plan");
        let seeds: std::collections::BTreeSet<i64> = (0..64).map(|i| a.noise_seed(i)).collect();
        assert_eq!(seeds.len(), 64, "distinct per index");
        assert!(seeds.iter().all(|s| *s >= 0));
        assert_eq!(
            a.noise_seed(5),
            b.noise_seed(5),
            "same (seed, index), same noise"
        );
        assert_ne!(a.noise_seed(5), c.noise_seed(5));
    }

    #[test]
    fn file_names_are_five_digit_indices() {
        assert_eq!(EvalPlan::file_name(7), "00007.png");
        assert_eq!(EvalPlan::file_name(123456), "123456.png");
    }

    #[test]
    fn grants_cover_every_index_once_and_finish() {
        let now = Instant::now();
        let mut table = LeaseTable::new(10, TIMEOUT);
        let a = table.grant(now, "w1", 4).expect("lease");
        let b = table.grant(now, "w2", 4).expect("lease");
        let c = table.grant(now, "w1", 4).expect("lease");
        assert_eq!((a.indices.clone(), b.indices.clone()), (0..4, 4..8));
        assert_eq!(c.indices, 8..10);
        assert!(table.grant(now, "w3", 4).is_none(), "all leased");
        for lease in [&b, &a, &c] {
            assert!(!table.is_finished());
            assert_eq!(
                table.complete(now, lease.id),
                Completion::Accepted {
                    indices: lease.indices.clone()
                }
            );
        }
        assert!(table.is_finished());
        assert_eq!(table.done_count(), 10);
    }

    #[test]
    fn expired_leases_are_regranted_and_their_late_completion_is_stale() {
        let start = Instant::now();
        let mut table = LeaseTable::new(6, TIMEOUT);
        let slow = table.grant(start, "slow", 3).expect("lease");
        let fast = table.grant(start, "fast", 3).expect("lease");
        // The fast worker renews; the slow one does not.
        let later = start + TIMEOUT / 2;
        assert!(table.renew(later, fast.id).is_some());
        let after = start + TIMEOUT + Duration::from_millis(1);
        let again = table.grant(after, "fast", 8).expect("re-grant");
        assert_eq!(again.indices, 0..3, "the expired range comes back first");
        assert_eq!(table.complete(after, slow.id), Completion::Stale);
        assert!(table.renew(after, slow.id).is_none());
        assert!(matches!(
            table.complete(after, again.id),
            Completion::Accepted { .. }
        ));
        assert!(matches!(
            table.complete(after, fast.id),
            Completion::Accepted { .. }
        ));
        assert!(table.is_finished());
        assert_eq!(table.done_count(), 6, "no index counted twice");
    }

    #[test]
    fn a_lost_worker_returns_its_leases() {
        let now = Instant::now();
        let mut table = LeaseTable::new(8, TIMEOUT);
        let dead = table.grant(now, "dead", 2).expect("lease");
        let alive = table.grant(now, "alive", 2).expect("lease");
        let dead2 = table.grant(now, "dead", 2).expect("lease");
        let mut lost = table.worker_lost("dead");
        lost.sort();
        assert_eq!(lost, vec![dead.id, dead2.id]);
        assert_eq!(table.live_leases().count(), 1);
        // The freed holes are handed out lowest first, never merged across the live lease.
        assert_eq!(table.grant(now, "alive", 8).expect("lease").indices, 0..2);
        assert_eq!(table.grant(now, "alive", 8).expect("lease").indices, 4..8);
        assert_eq!(table.complete(now, dead.id), Completion::Stale);
        assert!(matches!(
            table.complete(now, alive.id),
            Completion::Accepted { .. }
        ));
    }

    #[test]
    fn block_tables_lease_whole_blocks_only() {
        let now = Instant::now();
        let mut table = LeaseTable::with_blocks(10, 4, TIMEOUT);
        // Asking for 5 gets one block of 4; asking for 1 still gets a whole block.
        let a = table.grant(now, "w1", 5).expect("lease");
        let b = table.grant(now, "w2", 1).expect("lease");
        let c = table.grant(now, "w1", 100).expect("lease");
        assert_eq!(
            (a.indices, b.indices.clone(), c.indices),
            (0..4, 4..8, 8..10)
        );
        table.worker_lost("w2");
        let again = table.grant(now, "w1", 8).expect("lease");
        assert_eq!(
            again.indices, b.indices,
            "a returned block comes back whole"
        );
    }
}
