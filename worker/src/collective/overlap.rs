//! Gradient all-reduce overlapped with backward, as PyTorch DDP's Reducer does: the gradients
//! are planned into buckets in reverse parameter order (gradients of the last layers are ready
//! first), a small first bucket and then [`super::ddp::DEFAULT_BUCKET_BYTES`] ones, and an
//! autograd hook on every parameter (in `worker/cpp/c10d_shim.cpp`) writes its gradient into its
//! bucket during the backward pass of the step's last micro-batch. A full bucket starts its async
//! all-reduce at once, strictly in bucket order, so every rank issues the same collectives in the
//! same order. [`GradientReducer::finish`] fills what no hook wrote, waits for all buckets and
//! copies the sums back into the caller's gradient tensors.
//!
//! Not armed, the same reducer is the non-overlapped path: [`GradientReducer::finish`] flattens
//! every gradient after backward and all-reduces the same buckets in the same order, so both
//! paths give bitwise the same sums (the test in `worker/tests/overlap.rs`).
//!
//! The hook sums `accumulated + new gradient` itself, the same addition the caller's gradient
//! accumulation does after backward, so arming before the last micro-batch of a step is exact
//! also with gradient accumulation.

use super::{call, ffi, CollectiveError, ProcessGroup, Result};
use std::ffi::c_void;
use std::ptr::{self, NonNull};
use tch::{Device, Kind, Tensor};
use torch_sys::C_tensor;

/// PyTorch DDP's first bucket (`dist._DEFAULT_FIRST_BUCKET_BYTES`): small, so the first
/// all-reduce starts early in backward.
pub const FIRST_BUCKET_BYTES: usize = 1024 * 1024;

/// Environment variable that turns the overlap off (`0`, `false` or `off`); on by default.
pub const OVERLAP_ENV: &str = "EQIM_OVERLAP_ALLREDUCE";

/// Whether the gradient all-reduce overlaps backward: on unless [`OVERLAP_ENV`] says `0`,
/// `false` or `off`.
pub fn overlap_enabled() -> bool {
    !matches!(
        std::env::var(OVERLAP_ENV)
            .unwrap_or_default()
            .trim()
            .to_ascii_lowercase()
            .as_str(),
        "0" | "false" | "off" | "no"
    )
}

/// Where each parameter's gradient goes: `bucket_of[i]` and `offset_of[i]` (elements into the
/// bucket), and the elements of each bucket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BucketPlan {
    pub bucket_of: Vec<i64>,
    pub offset_of: Vec<i64>,
    pub bucket_numels: Vec<i64>,
}

/// Plans buckets over tensors of `(numel, kind, device)`, visiting them in reverse order: the
/// first bucket holds at most `first_bytes`, later ones `bytes` (a larger tensor gets a bucket of
/// its own), and a bucket never mixes dtypes or devices.
pub fn plan_reverse(
    layout: &[(i64, Kind, Device)],
    first_bytes: usize,
    bytes: usize,
) -> BucketPlan {
    let n = layout.len();
    let mut plan = BucketPlan {
        bucket_of: vec![0; n],
        offset_of: vec![0; n],
        bucket_numels: Vec::new(),
    };
    let mut current: Option<(Kind, Device, usize)> = None;
    for (i, &(numel, kind, device)) in layout.iter().enumerate().rev() {
        let size = usize::try_from(numel).unwrap_or(0) * kind.elt_size_in_bytes();
        // The cap of the bucket being filled: `first_bytes` for bucket 0.
        let cap = if plan.bucket_numels.len() <= 1 {
            first_bytes
        } else {
            bytes
        };
        let fits = match current {
            Some((k, d, used)) => k == kind && d == device && used + size <= cap,
            None => false,
        };
        if !fits {
            plan.bucket_numels.push(0);
            current = Some((kind, device, 0));
        }
        let b = plan.bucket_numels.len() - 1;
        plan.bucket_of[i] = b as i64;
        plan.offset_of[i] = plan.bucket_numels[b];
        plan.bucket_numels[b] += numel;
        if let Some((_, _, used)) = &mut current {
            *used += size;
        }
    }
    plan
}

/// Shallow handles (same storage) whose `as_mut_ptr` the shim may write through.
fn handles(tensors: &[Tensor]) -> Vec<Tensor> {
    tensors.iter().map(Tensor::shallow_clone).collect()
}

fn pointers(handles: &mut [Tensor]) -> Vec<*mut C_tensor> {
    handles.iter_mut().map(Tensor::as_mut_ptr).collect()
}

/// Sums a model's gradients over a process group in buckets, overlapped with the backward pass
/// when armed ([`GradientReducer::arm`]), after it otherwise. Built once per process group.
pub struct GradientReducer {
    raw: NonNull<c_void>,
    params: usize,
    plan: BucketPlan,
}

// SAFETY: the box owns reference-counted libtorch objects and a mutex-guarded state; like
// ProcessGroup it is driven from one thread at a time (it is not Sync), and the hooks that run on
// autograd's threads take the state's mutex.
unsafe impl Send for GradientReducer {}

/// A reducer armed for one backward pass. Dropping it without [`GradientReducer::finish`]
/// disarms the hooks and waits for the all-reduces already started (the step is abandoned).
pub struct Armed<'a> {
    reducer: &'a GradientReducer,
}

impl Drop for Armed<'_> {
    fn drop(&mut self) {
        if let Err(e) = call("disarming the gradient reducer", |err| {
            // SAFETY: the reducer is live for 'a and `err` is a valid out-pointer.
            unsafe { ffi::eqim_c10d_reducer_disarm(self.reducer.raw.as_ptr(), err) }
        }) {
            tracing::warn!(cause = %e, "abandoned gradient all-reduce");
        }
    }
}

impl GradientReducer {
    /// Hooks `params` (leaf tensors that require grad, in the same order on every rank) and plans
    /// their buckets with DDP's sizes.
    pub fn new(group: &ProcessGroup, params: &[Tensor]) -> Result<Self> {
        Self::with_bucket_bytes(
            group,
            params,
            FIRST_BUCKET_BYTES,
            super::ddp::DEFAULT_BUCKET_BYTES,
        )
    }

    /// As [`GradientReducer::new`] with other bucket sizes.
    pub fn with_bucket_bytes(
        group: &ProcessGroup,
        params: &[Tensor],
        first_bytes: usize,
        bytes: usize,
    ) -> Result<Self> {
        const OP: &str = "creating the gradient reducer";
        if params.is_empty() {
            return Err(CollectiveError::InvalidArgument {
                op: OP,
                reason: "the model has no parameters to reduce".to_owned(),
            });
        }
        for (i, p) in params.iter().enumerate() {
            group.check_tensor(OP, p).map_err(|e| match e {
                CollectiveError::InvalidTensor { op, reason } => CollectiveError::InvalidTensor {
                    op,
                    reason: format!("parameter {i}: {reason}"),
                },
                other => other,
            })?;
        }
        let layout: Vec<(i64, Kind, Device)> = params
            .iter()
            .map(|p| (p.numel() as i64, p.kind(), p.device()))
            .collect();
        let plan = plan_reverse(&layout, first_bytes, bytes);
        let mut handles = handles(params);
        let ptrs = pointers(&mut handles);
        let mut out: *mut c_void = ptr::null_mut();
        call(OP, |err| {
            // SAFETY: the group is live; `ptrs` holds `params.len()` valid at::Tensor pointers
            // (kept alive by `handles` for the call); the plan's vectors have the lengths passed;
            // `out` and `err` are live locals.
            unsafe {
                ffi::eqim_c10d_reducer_new(
                    group.raw.as_ptr(),
                    ptrs.as_ptr(),
                    ptrs.len(),
                    plan.bucket_of.as_ptr(),
                    plan.offset_of.as_ptr(),
                    plan.bucket_numels.as_ptr(),
                    plan.bucket_numels.len(),
                    &mut out,
                    err,
                )
            }
        })?;
        let raw = NonNull::new(out).ok_or_else(|| CollectiveError::C10d {
            op: OP,
            message: "the shim returned success but no handle".to_owned(),
        })?;
        Ok(Self {
            raw,
            params: params.len(),
            plan,
        })
    }

    /// The bucket plan (bucket 0 is reduced first).
    pub fn plan(&self) -> &BucketPlan {
        &self.plan
    }

    fn check_len(&self, op: &'static str, grads: &[Tensor]) -> Result<()> {
        if grads.len() != self.params {
            return Err(CollectiveError::InvalidArgument {
                op,
                reason: format!(
                    "{} gradients for a reducer of {} parameters",
                    grads.len(),
                    self.params
                ),
            });
        }
        Ok(())
    }

    /// Arms the hooks for the next backward pass: `accumulated[i]` holds parameter i's gradient
    /// summed over the step's earlier micro-batches (zeros before the first), which the caller
    /// adds the new gradient to after backward, in place.
    pub fn arm(&self, accumulated: &[Tensor]) -> Result<Armed<'_>> {
        const OP: &str = "arming the gradient reducer";
        self.check_len(OP, accumulated)?;
        let mut handles = handles(accumulated);
        let ptrs = pointers(&mut handles);
        call(OP, |err| {
            // SAFETY: the reducer is live; `ptrs` holds valid tensor pointers kept alive by
            // `handles`; the shim checks their shapes and keeps its own references.
            unsafe { ffi::eqim_c10d_reducer_arm(self.raw.as_ptr(), ptrs.as_ptr(), ptrs.len(), err) }
        })?;
        Ok(Armed { reducer: self })
    }

    /// Replaces `grads` (the accumulated gradients, aligned with the parameters) by their sums
    /// over all ranks. With `armed`, the buckets the hooks completed are already on their way;
    /// without, every bucket is flattened and reduced now. Returns how many buckets started
    /// inside backward. On error the gradients may be partly reduced and must be dropped.
    pub fn finish(&self, armed: Option<Armed<'_>>, grads: &[Tensor]) -> Result<usize> {
        const OP: &str = "gradient all-reduce";
        if let Some(a) = armed {
            if !std::ptr::eq(a.reducer, self) {
                return Err(CollectiveError::InvalidArgument {
                    op: OP,
                    reason: "armed by another reducer".to_owned(),
                });
            }
            // finish() completes (or abandons) the step itself.
            std::mem::forget(a);
        }
        self.check_len(OP, grads)?;
        if let Some(i) = grads.iter().position(|g| !g.defined()) {
            return Err(CollectiveError::MissingGradient {
                name: format!("parameter {i}"),
            });
        }
        let mut handles = handles(grads);
        let ptrs = pointers(&mut handles);
        let mut early = 0i64;
        call(OP, |err| {
            // SAFETY: the reducer is live; `ptrs` holds valid tensor pointers kept alive by
            // `handles`, which the shim writes in place (same storage as `grads`).
            unsafe {
                ffi::eqim_c10d_reducer_finish(
                    self.raw.as_ptr(),
                    ptrs.as_ptr(),
                    ptrs.len(),
                    &mut early,
                    err,
                )
            }
        })?;
        Ok(usize::try_from(early).unwrap_or(0))
    }
}

impl Drop for GradientReducer {
    fn drop(&mut self) {
        // SAFETY: `self.raw` is the ReducerBox this value owns; freed once, here. The shim
        // removes its hooks from the parameters first.
        unsafe { ffi::eqim_c10d_reducer_free(self.raw.as_ptr()) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_run_from_the_last_parameter_with_a_small_first_one() {
        let f = |n| (n, Kind::Float, Device::Cpu);
        // 4-byte floats, caps of 40 bytes (bucket 0) and 80 bytes (the others), visited from the
        // last parameter: 6+4 floats fill bucket 0, 10+10 bucket 1, the 5 floats start bucket 2
        // and the double (another dtype) needs bucket 3.
        let layout = [
            (3, Kind::Double, Device::Cpu),
            f(5),
            f(10),
            f(10),
            f(4),
            f(6),
        ];
        let plan = plan_reverse(&layout, 40, 80);
        assert_eq!(plan.bucket_of, vec![3, 2, 1, 1, 0, 0]);
        assert_eq!(plan.offset_of, vec![0, 0, 10, 0, 6, 0]);
        assert_eq!(plan.bucket_numels, vec![10, 20, 5, 3]);
        // A tensor over the cap gets a bucket of its own.
        let plan = plan_reverse(&[f(4), f(100), f(4)], 40, 80);
        assert_eq!(plan.bucket_of, vec![2, 1, 0]);
    }

    #[test]
    fn the_overlap_switch_reads_the_environment() {
        // Only this test touches the variable.
        std::env::set_var(OVERLAP_ENV, "off");
        assert!(!overlap_enabled());
        std::env::set_var(OVERLAP_ENV, "1");
        assert!(overlap_enabled());
        std::env::remove_var(OVERLAP_ENV);
        assert!(overlap_enabled());
    }
}
