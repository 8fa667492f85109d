//! Safe wrappers over `worker/cpp/precision_shim.cpp`: libtorch's per-device autocast state
//! (tch 0.24's `tch::autocast` only toggles CUDA autocast at its default dtype, float16, and
//! cannot reach the CPU's) and the CUDA caching allocator's peak-memory statistics. They live
//! here because every `unsafe` of the worker does; [`crate::precision`] is the API to use.

use super::{call, ffi, CollectiveError, Result};
use std::ffi::c_int;
use std::marker::PhantomData;
use tch::Device;

/// The reduced dtype autocast runs eligible ops (matmuls, linear, convolutions) in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LowPrecision {
    BFloat16,
    Float16,
}

fn device_code(op: &'static str, device: Device) -> Result<c_int> {
    match device {
        Device::Cpu => Ok(0),
        Device::Cuda(_) => Ok(1),
        other => Err(CollectiveError::InvalidArgument {
            op,
            reason: format!("autocast runs on cpu or cuda, not {other:?}"),
        }),
    }
}

/// Autocast enabled for one device type on this thread until dropped; the previous state (enabled
/// flag and dtype) comes back on drop, and leaving the outermost level clears the cast cache.
/// Autocast state is thread-local in libtorch, so the guard cannot be sent to another thread.
#[must_use = "autocast ends when the guard is dropped"]
pub struct AutocastGuard {
    device: c_int,
    prev_enabled: c_int,
    prev_dtype: c_int,
    _not_send: PhantomData<*const ()>,
}

impl AutocastGuard {
    /// Enables autocast to `dtype` for the device type of `device` (every CUDA device at once,
    /// as in PyTorch).
    pub fn enter(device: Device, dtype: LowPrecision) -> Result<Self> {
        const OP: &str = "entering autocast";
        let code = device_code(OP, device)?;
        let dtype_code: c_int = match dtype {
            LowPrecision::BFloat16 => 0,
            LowPrecision::Float16 => 1,
        };
        let (mut prev_enabled, mut prev_dtype): (c_int, c_int) = (0, 0);
        call(OP, |err| {
            // SAFETY: the out-pointers are valid locals; the codes were range-checked above.
            unsafe {
                ffi::eqim_autocast_enter(code, dtype_code, &mut prev_enabled, &mut prev_dtype, err)
            }
        })?;
        Ok(Self {
            device: code,
            prev_enabled,
            prev_dtype,
            _not_send: PhantomData,
        })
    }
}

impl Drop for AutocastGuard {
    fn drop(&mut self) {
        let restored = call("leaving autocast", |err| {
            // SAFETY: the values are the ones eqim_autocast_enter returned for this device.
            unsafe { ffi::eqim_autocast_exit(self.device, self.prev_enabled, self.prev_dtype, err) }
        });
        if let Err(e) = restored {
            // Only a bad device code can fail here, and `enter` checked it; log rather than panic
            // in a destructor.
            tracing::error!(cause = %e, "restoring the autocast state failed");
        }
    }
}

/// Whether autocast is enabled for the device type of `device` on this thread.
pub fn autocast_enabled(device: Device) -> bool {
    let Ok(code) = device_code("querying autocast", device) else {
        return false;
    };
    // SAFETY: a query of thread-local state with a checked device code.
    unsafe { ffi::eqim_autocast_is_enabled(code) == 1 }
}

/// Bytes of the CUDA caching allocator on one device (torch.cuda.max_memory_allocated() etc.).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct CudaMemoryStats {
    pub allocated_peak: i64,
    pub reserved_peak: i64,
    pub allocated_now: i64,
}

/// The caching allocator's statistics of CUDA device `index`; `reset_peak` resets the peaks
/// afterwards. An error in a build without the `cuda` feature.
pub fn cuda_memory_stats(index: usize, reset_peak: bool) -> Result<CudaMemoryStats> {
    const OP: &str = "reading CUDA memory statistics";
    let device = super::to_c_int(OP, "device index", index)?;
    let mut s = CudaMemoryStats {
        allocated_peak: 0,
        reserved_peak: 0,
        allocated_now: 0,
    };
    call(OP, |err| {
        // SAFETY: the out-pointers are fields of a live local; the index fits a c_int.
        unsafe {
            ffi::eqim_cuda_memory_stats(
                device,
                c_int::from(reset_peak),
                &mut s.allocated_peak,
                &mut s.reserved_peak,
                &mut s.allocated_now,
                err,
            )
        }
    })?;
    Ok(s)
}
