//! Raw declarations of the C ABI in `worker/cpp/c10d_shim.cpp` (built by `worker/build.rs`).
//!
//! Every fallible function returns 0 on success and -1 on failure, in which case `*err` holds a
//! malloc'ed message to release with [`eqim_c10d_free_str`]. Handles are opaque boxes owned by
//! the caller and released with the matching `*_free`.

use std::ffi::{c_char, c_int, c_void};
use torch_sys::C_tensor;

extern "C" {
    pub(crate) fn eqim_c10d_free_str(s: *mut c_char);
    pub(crate) fn eqim_c10d_free_bytes(bytes: *mut u8);

    pub(crate) fn eqim_c10d_tcpstore_new(
        host: *const c_char,
        port: u16,
        is_server: c_int,
        timeout_ms: i64,
        out: *mut *mut c_void,
        err: *mut *mut c_char,
    ) -> c_int;
    pub(crate) fn eqim_c10d_prefixstore_new(
        prefix: *const c_char,
        base: *mut c_void,
        out: *mut *mut c_void,
        err: *mut *mut c_char,
    ) -> c_int;
    pub(crate) fn eqim_c10d_store_port(store: *mut c_void) -> u16;
    pub(crate) fn eqim_c10d_store_set(
        store: *mut c_void,
        key: *const c_char,
        value: *const u8,
        len: usize,
        err: *mut *mut c_char,
    ) -> c_int;
    pub(crate) fn eqim_c10d_store_get(
        store: *mut c_void,
        key: *const c_char,
        value_out: *mut *mut u8,
        len_out: *mut usize,
        err: *mut *mut c_char,
    ) -> c_int;
    pub(crate) fn eqim_c10d_store_add(
        store: *mut c_void,
        key: *const c_char,
        delta: i64,
        out: *mut i64,
        err: *mut *mut c_char,
    ) -> c_int;
    pub(crate) fn eqim_c10d_store_free(store: *mut c_void);

    pub(crate) fn eqim_c10d_gloo_new(
        store: *mut c_void,
        rank: c_int,
        world_size: c_int,
        device_kind: c_int,
        device_arg: *const c_char,
        timeout_ms: i64,
        threads: c_int,
        out: *mut *mut c_void,
        err: *mut *mut c_char,
    ) -> c_int;
    pub(crate) fn eqim_c10d_nccl_available() -> c_int;
    pub(crate) fn eqim_c10d_nccl_new(
        store: *mut c_void,
        rank: c_int,
        world_size: c_int,
        timeout_ms: i64,
        out: *mut *mut c_void,
        err: *mut *mut c_char,
    ) -> c_int;
    pub(crate) fn eqim_c10d_allreduce_sum(
        group: *mut c_void,
        tensor: *mut C_tensor,
        err: *mut *mut c_char,
    ) -> c_int;
    pub(crate) fn eqim_c10d_broadcast(
        group: *mut c_void,
        tensor: *mut C_tensor,
        root: c_int,
        err: *mut *mut c_char,
    ) -> c_int;
    pub(crate) fn eqim_c10d_barrier(group: *mut c_void, err: *mut *mut c_char) -> c_int;
    pub(crate) fn eqim_c10d_group_free(group: *mut c_void, err: *mut *mut c_char) -> c_int;

    pub(crate) fn eqim_c10d_reducer_new(
        group: *mut c_void,
        params: *const *mut C_tensor,
        n: usize,
        bucket_of: *const i64,
        offset_of: *const i64,
        bucket_numels: *const i64,
        n_buckets: usize,
        out: *mut *mut c_void,
        err: *mut *mut c_char,
    ) -> c_int;
    pub(crate) fn eqim_c10d_reducer_arm(
        reducer: *mut c_void,
        grads: *const *mut C_tensor,
        n: usize,
        err: *mut *mut c_char,
    ) -> c_int;
    pub(crate) fn eqim_c10d_reducer_disarm(reducer: *mut c_void, err: *mut *mut c_char) -> c_int;
    pub(crate) fn eqim_c10d_reducer_finish(
        reducer: *mut c_void,
        grads: *const *mut C_tensor,
        n: usize,
        launched_early: *mut i64,
        err: *mut *mut c_char,
    ) -> c_int;
    pub(crate) fn eqim_c10d_reducer_free(reducer: *mut c_void);

    // worker/cpp/precision_shim.cpp
    pub(crate) fn eqim_autocast_enter(
        device: c_int,
        dtype: c_int,
        prev_enabled: *mut c_int,
        prev_dtype: *mut c_int,
        err: *mut *mut c_char,
    ) -> c_int;
    pub(crate) fn eqim_autocast_exit(
        device: c_int,
        prev_enabled: c_int,
        prev_dtype: c_int,
        err: *mut *mut c_char,
    ) -> c_int;
    pub(crate) fn eqim_autocast_is_enabled(device: c_int) -> c_int;
    pub(crate) fn eqim_cuda_memory_stats(
        device: c_int,
        reset: c_int,
        allocated_peak: *mut i64,
        reserved_peak: *mut i64,
        allocated_now: *mut i64,
        err: *mut *mut c_char,
    ) -> c_int;
}
