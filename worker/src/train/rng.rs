//! Randomness of training, derived rather than stored: before each micro-batch, libtorch's global
//! generators (CPU and every CUDA device, through `torch::manual_seed`) are seeded with
//! `derive_seed(run seed, step, slot)`, where `slot` is the micro-batch's index within the global
//! batch of the step. Every draw of that micro-batch (flow noise and t, label drop, RoPE shift,
//! dropout) is then a function of those three numbers alone, so
//! - resuming at step k needs no generator state, only k;
//! - the draws do not depend on which worker ran a slot, so a world-size change (elastic
//!   training with a fixed global batch) does not change them.
//!
//! The generators are process-global: two trainers in one process must not interleave steps.
//! [`seeded`] holds a process-wide lock for the duration of a micro-batch so that our own
//! threads cannot; other code that draws from libtorch's generators concurrently still can.

use std::sync::Mutex;

/// The `step` of the stream that initialises model weights (no optimizer step reaches it).
pub const INIT_STEP: u64 = u64::MAX;

static GLOBAL_GENERATOR: Mutex<()> = Mutex::new(());

/// splitmix64: a bijective 64-bit mixer with good avalanche, enough to decorrelate seeds.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The seed of micro-batch `slot` of optimizer step `step` in a run seeded with `seed`.
/// Kept below 2^63 so that it is a valid non-negative `i64` for libtorch.
pub fn derive_seed(seed: u64, step: u64, slot: u64) -> u64 {
    mix(mix(mix(seed) ^ step) ^ slot) >> 1
}

/// Runs `f` with libtorch's global generators seeded by `derive_seed(seed, step, slot)`,
/// holding the process-wide generator lock.
pub fn seeded<T>(seed: u64, step: u64, slot: u64, f: impl FnOnce() -> T) -> T {
    // A panic in another seeded section leaves no broken invariant behind: the lock guards
    // only the generators' use, which the next manual_seed resets.
    let _lock = GLOBAL_GENERATOR
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    tch::manual_seed(derive_seed(seed, step, slot) as i64);
    f()
}

#[cfg(test)]
mod tests {
    use super::*;

    // That `seeded` repeats draws exactly is tested in worker/tests/train_resume.rs, a test
    // binary of its own where no concurrent test draws from the global generator.
    #[test]
    fn seeds_differ_by_step_and_slot_and_repeat_exactly() {
        let a = derive_seed(1, 5, 0);
        assert_eq!(a, derive_seed(1, 5, 0));
        assert_ne!(a, derive_seed(1, 5, 1));
        assert_ne!(a, derive_seed(1, 6, 0));
        assert_ne!(a, derive_seed(2, 5, 0));
        assert_ne!(derive_seed(0, 1, 0), derive_seed(0, 0, 1));
        assert!(a < 1 << 63);
    }
}
