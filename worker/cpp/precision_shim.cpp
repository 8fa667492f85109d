// eqim's C ABI over what tch 0.24 does not expose for mixed precision and GPU memory:
// - libtorch's autocast state per device type (tch's `autocast` only toggles CUDA autocast and
//   keeps its default dtype, float16; eqim needs bfloat16, on the CPU as well);
// - the CUDA caching allocator's peak-memory statistics (with EQIM_WITH_NCCL, i.e. the `cuda`
//   feature), the numbers torch.cuda.max_memory_allocated() reports.
//
// Conventions as in c10d_shim.cpp: 0 on success, -1 on failure with a malloc'ed message in *err
// (released with eqim_c10d_free_str); no C++ exception crosses this boundary.
#include "shim_guard.h"
#include <ATen/autocast_mode.h>

#ifdef EQIM_WITH_NCCL
#include <c10/cuda/CUDACachingAllocator.h>
#endif

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <stdexcept>

namespace {

using eqim_shim::guard;
using eqim_shim::set_err;

// 0: CPU, 1: CUDA (the only device types eqim runs on).
at::DeviceType device_type(int device) {
  switch (device) {
    case 0:
      return at::kCPU;
    case 1:
      return at::kCUDA;
    default:
      throw std::invalid_argument("autocast device must be 0 (CPU) or 1 (CUDA)");
  }
}

// 0: bfloat16, 1: float16.
at::ScalarType lower_dtype(int dtype) {
  switch (dtype) {
    case 0:
      return at::kBFloat16;
    case 1:
      return at::kHalf;
    default:
      throw std::invalid_argument("autocast dtype must be 0 (bfloat16) or 1 (float16)");
  }
}

int dtype_code(at::ScalarType t) {
  if (t == at::kBFloat16) return 0;
  if (t == at::kHalf) return 1;
  return 2;  // any other dtype: eqim_autocast_exit leaves the dtype as it finds it
}

}  // namespace

extern "C" {

// Enables autocast to `dtype` for `device` on this thread and enters one nesting level; the
// previous enabled flag and dtype code are written to *prev_enabled / *prev_dtype for
// eqim_autocast_exit.
int eqim_autocast_enter(int device, int dtype, int* prev_enabled, int* prev_dtype, char** err) {
  return guard(err, [&] {
    if (prev_enabled == nullptr || prev_dtype == nullptr) {
      throw std::invalid_argument("null out-pointer");
    }
    auto dev = device_type(device);
    auto want = lower_dtype(dtype);
    *prev_enabled = at::autocast::is_autocast_enabled(dev) ? 1 : 0;
    *prev_dtype = dtype_code(at::autocast::get_autocast_dtype(dev));
    at::autocast::set_autocast_dtype(dev, want);
    at::autocast::set_autocast_enabled(dev, true);
    at::autocast::increment_nesting();
  });
}

// Leaves one nesting level (clearing the cast cache when it was the outermost) and restores the
// state eqim_autocast_enter saved.
int eqim_autocast_exit(int device, int prev_enabled, int prev_dtype, char** err) {
  return guard(err, [&] {
    auto dev = device_type(device);
    if (at::autocast::decrement_nesting() == 0) {
      at::autocast::clear_cache();
    }
    at::autocast::set_autocast_enabled(dev, prev_enabled != 0);
    if (prev_dtype == 0 || prev_dtype == 1) {
      at::autocast::set_autocast_dtype(dev, lower_dtype(prev_dtype));
    }
  });
}

// Whether autocast is enabled for `device` on this thread (1/0), or -1 on a bad device.
int eqim_autocast_is_enabled(int device) {
  int out = -1;
  guard(nullptr, [&] { out = at::autocast::is_autocast_enabled(device_type(device)) ? 1 : 0; });
  return out;
}

// Peak and current bytes allocated / reserved by the CUDA caching allocator on `device`; with
// `reset` the peaks are reset afterwards. Fails in a build without the `cuda` feature.
int eqim_cuda_memory_stats(int device, int reset, int64_t* allocated_peak,
                           int64_t* reserved_peak, int64_t* allocated_now, char** err) {
  return guard(err, [&] {
    if (allocated_peak == nullptr || reserved_peak == nullptr || allocated_now == nullptr) {
      throw std::invalid_argument("null out-pointer");
    }
#ifdef EQIM_WITH_NCCL
    auto idx = static_cast<c10::DeviceIndex>(device);
    auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(idx);
    constexpr auto agg = static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE);
    *allocated_peak = stats.allocated_bytes[agg].peak;
    *reserved_peak = stats.reserved_bytes[agg].peak;
    *allocated_now = stats.allocated_bytes[agg].current;
    if (reset != 0) c10::cuda::CUDACachingAllocator::resetPeakStats(idx);
#else
    (void)device;
    (void)reset;
    throw std::runtime_error("CUDA memory statistics need a build with --features cuda");
#endif
  });
}

}  // extern "C"
