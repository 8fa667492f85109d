//! Randomness of training, derived rather than stored: before each micro-batch, libtorch's global
//! generators (CPU and every CUDA device, through `torch::manual_seed`) are seeded with
//! `derive_seed(run seed, step, slot)` (`eqim_common::seed`), where `slot` is the dataset index of
//! the micro-batch's first sample. Every draw of that micro-batch (flow noise and t, label drop, RoPE shift,
//! dropout) is then a function of those three numbers alone, so
//! - resuming at step k needs no generator state, only k;
//! - the draws do not depend on which worker ran a slot, so a world-size change (elastic
//!   training with a fixed global batch) does not change them.
//!
//! The generators are process-global: two trainers in one process must not interleave steps.
//! [`seeded`] holds a process-wide lock for the duration of a micro-batch so that our own
//! threads cannot; other code that draws from libtorch's generators concurrently still can.

use std::sync::Mutex;

pub use eqim_common::seed::derive_seed;

/// The `step` of the stream that initialises model weights (no optimizer step reaches it).
pub const INIT_STEP: u64 = eqim_common::seed::stream::INIT;

static GLOBAL_GENERATOR: Mutex<()> = Mutex::new(());

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
