//! PyTorch's own c10d collectives from Rust: TCPStore and PrefixStore rendezvous, gloo (CPU) and
//! NCCL (GPU, `cuda` feature) process groups, and in-place all-reduce, broadcast and barrier on
//! tch tensors. This is the data plane of the distributed design (see
//! shared/spec/architecture.md); the coordinator decides ranks and generations, this module only
//! moves tensors.
//!
//! Every `unsafe` of the worker lives in this module: `ffi` declares the C ABI of
//! `worker/cpp/c10d_shim.cpp`, and the types here check their arguments before each call. The shim
//! catches every C++ exception and returns it as a message, which becomes a [`CollectiveError`].
//!
//! Failure behaviour (gloo, measured by the tests in `worker/tests/collective.rs`): when a peer
//! dies, survivors' collectives fail within milliseconds; when a peer hangs, they fail at the
//! group timeout. Afterwards drop the group and build a new one over a fresh
//! [`Store::prefixed`] (or a new store if the store's host died).

#![deny(unsafe_op_in_unsafe_fn, clippy::undocumented_unsafe_blocks)]

pub mod autocast;
pub mod bench;
pub mod ddp;
mod ffi;
pub mod overlap;

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::ptr::{self, NonNull};
use std::time::Duration;
use tch::{Device, Kind, Tensor};

/// What can go wrong in the data plane.
#[derive(Debug, thiserror::Error)]
pub enum CollectiveError {
    /// c10d raised an exception (peer gone, timeout, rendezvous failure, ...).
    #[error("c10d {op} failed: {message}")]
    C10d { op: &'static str, message: String },
    /// The tensor handed to a collective is not one the backend can work on in place.
    #[error("{op}: unsuitable tensor: {reason}")]
    InvalidTensor { op: &'static str, reason: String },
    /// A rank, size, timeout or name that c10d cannot take.
    #[error("{op}: invalid argument: {reason}")]
    InvalidArgument { op: &'static str, reason: String },
    /// A libtorch operation around a collective (flattening, copying back) failed.
    #[error("{op}: {source}")]
    Torch {
        op: &'static str,
        #[source]
        source: tch::TchError,
    },
    /// Data-parallel training needs every rank to produce a gradient for every parameter.
    #[error(
        "parameter `{name}` has no gradient on this rank; every rank must compute gradients for \
         the same parameters (run backward before syncing, and avoid unused parameters)"
    )]
    MissingGradient { name: String },
}

pub type Result<T, E = CollectiveError> = std::result::Result<T, E>;

/// Ends the process at once with `code`, without running atexit handlers or C++ static
/// destructors: for leaving while another thread may still be inside libtorch or gloo (a
/// collective, an optimizer step), where destroying their globals under it crashes. Flush what
/// must be seen first; nothing else is cleaned up.
pub fn exit_without_destructors(code: i32) -> ! {
    // SAFETY: _exit only ends the process; it touches no Rust or C++ state.
    unsafe { libc::_exit(code) }
}

/// Takes ownership of a message the shim allocated and frees it.
fn take_message(err: *mut c_char) -> String {
    if err.is_null() {
        return "unknown error (the shim returned no message)".to_owned();
    }
    // SAFETY: a non-null `err` was set by the shim to a NUL-terminated string from strdup, which
    // nobody else references; it is read once here and freed right after.
    let message = unsafe { CStr::from_ptr(err) }
        .to_string_lossy()
        .into_owned();
    // SAFETY: `err` came from the shim's malloc (strdup) and is freed exactly once.
    unsafe { ffi::eqim_c10d_free_str(err) };
    message
}

/// Runs one shim call that reports failure through an error-message out-parameter.
fn call(op: &'static str, body: impl FnOnce(*mut *mut c_char) -> c_int) -> Result<()> {
    let mut err: *mut c_char = ptr::null_mut();
    if body(&mut err) == 0 {
        return Ok(());
    }
    Err(CollectiveError::C10d {
        op,
        message: take_message(err),
    })
}

fn c_string(op: &'static str, what: &str, value: &str) -> Result<CString> {
    CString::new(value).map_err(|_| CollectiveError::InvalidArgument {
        op,
        reason: format!("{what} {value:?} contains a NUL byte"),
    })
}

fn timeout_ms(op: &'static str, timeout: Duration) -> Result<i64> {
    let ms = i64::try_from(timeout.as_millis()).unwrap_or(i64::MAX);
    if ms <= 0 {
        return Err(CollectiveError::InvalidArgument {
            op,
            reason: format!("timeout must be at least 1 ms, got {timeout:?}"),
        });
    }
    Ok(ms)
}

fn to_c_int(op: &'static str, what: &str, value: usize) -> Result<c_int> {
    c_int::try_from(value).map_err(|_| CollectiveError::InvalidArgument {
        op,
        reason: format!("{what} {value} does not fit a C int"),
    })
}

/// A c10d key-value store: a TCPStore (hosted here or reached over TCP) or a PrefixStore view of
/// one. Process groups rendezvous through it.
pub struct Store {
    raw: NonNull<c_void>,
    port: u16,
}

// SAFETY: the box owns an intrusive_ptr to a c10d::Store; c10d stores serialise their socket
// operations internally and carry no thread affinity, so moving the handle to another thread is
// sound. Store is deliberately not Sync: callers share it by building prefixed views instead.
unsafe impl Send for Store {}

impl Store {
    fn tcp(host: &str, port: u16, is_server: bool, timeout: Duration) -> Result<Self> {
        let op = if is_server {
            "hosting TCPStore"
        } else {
            "connecting to TCPStore"
        };
        let host_c = c_string(op, "host", host)?;
        let ms = timeout_ms(op, timeout)?;
        let mut out: *mut c_void = ptr::null_mut();
        call(op, |err| {
            // SAFETY: `host_c` is a valid NUL-terminated string alive for the call, and `out` and
            // `err` point to live locals the shim writes once.
            unsafe {
                ffi::eqim_c10d_tcpstore_new(
                    host_c.as_ptr(),
                    port,
                    c_int::from(is_server),
                    ms,
                    &mut out,
                    err,
                )
            }
        })
        .map_err(|e| with_context(e, format!("{host}:{port}")))?;
        Self::from_raw(op, out)
    }

    fn from_raw(op: &'static str, raw: *mut c_void) -> Result<Self> {
        let raw = NonNull::new(raw).ok_or_else(|| CollectiveError::C10d {
            op,
            message: "the shim returned success but no handle".to_owned(),
        })?;
        // SAFETY: `raw` is a live StoreBox just returned by the shim.
        let port = unsafe { ffi::eqim_c10d_store_port(raw.as_ptr()) };
        Ok(Self { raw, port })
    }

    /// Hosts a TCPStore server on `port` (0 picks a free port, see [`Store::port`]) and connects
    /// to it through `host` (an address of this machine). `timeout` bounds every store wait,
    /// including the rendezvous of process groups built on it.
    pub fn host(host: &str, port: u16, timeout: Duration) -> Result<Self> {
        Self::tcp(host, port, true, timeout)
    }

    /// Connects to a TCPStore hosted at `host:port`, retrying until `timeout`.
    pub fn connect(host: &str, port: u16, timeout: Duration) -> Result<Self> {
        Self::tcp(host, port, false, timeout)
    }

    /// The TCP port of the store (the bound one when hosted on port 0); 0 for a prefixed view.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// A view of this store whose keys all live under `prefix`, e.g. `gen3` for membership
    /// generation 3, so a new process group never sees an old group's keys.
    pub fn prefixed(&self, prefix: &str) -> Result<Self> {
        const OP: &str = "creating PrefixStore";
        let prefix_c = c_string(OP, "prefix", prefix)?;
        let mut out: *mut c_void = ptr::null_mut();
        call(OP, |err| {
            // SAFETY: `self.raw` is a live StoreBox owned by `self`; the string, `out` and `err`
            // are valid for the call.
            unsafe {
                ffi::eqim_c10d_prefixstore_new(prefix_c.as_ptr(), self.raw.as_ptr(), &mut out, err)
            }
        })?;
        Self::from_raw(OP, out)
    }

    /// Sets `key` to `value`.
    pub fn set(&self, key: &str, value: &[u8]) -> Result<()> {
        const OP: &str = "store set";
        let key_c = c_string(OP, "key", key)?;
        call(OP, |err| {
            // SAFETY: the store is live, the key is NUL-terminated, and `value` is a valid slice
            // of `value.len()` bytes for the duration of the call (the shim copies it).
            unsafe {
                ffi::eqim_c10d_store_set(
                    self.raw.as_ptr(),
                    key_c.as_ptr(),
                    value.as_ptr(),
                    value.len(),
                    err,
                )
            }
        })
    }

    /// Gets `key`, waiting for it up to the store's timeout.
    pub fn get(&self, key: &str) -> Result<Vec<u8>> {
        const OP: &str = "store get";
        let key_c = c_string(OP, "key", key)?;
        let mut bytes: *mut u8 = ptr::null_mut();
        let mut len = 0usize;
        call(OP, |err| {
            // SAFETY: the store is live, the key is NUL-terminated, and the out-pointers are live
            // locals.
            unsafe {
                ffi::eqim_c10d_store_get(
                    self.raw.as_ptr(),
                    key_c.as_ptr(),
                    &mut bytes,
                    &mut len,
                    err,
                )
            }
        })?;
        if bytes.is_null() {
            return Ok(Vec::new());
        }
        // SAFETY: on success the shim set `bytes` to a malloc'ed buffer of `len` initialised
        // bytes that only we reference.
        let value = unsafe { std::slice::from_raw_parts(bytes, len) }.to_vec();
        // SAFETY: `bytes` came from the shim's malloc and is freed exactly once.
        unsafe { ffi::eqim_c10d_free_bytes(bytes) };
        Ok(value)
    }

    /// Atomically adds `delta` to the integer at `key` (missing counts as 0) and returns the sum.
    pub fn add(&self, key: &str, delta: i64) -> Result<i64> {
        const OP: &str = "store add";
        let key_c = c_string(OP, "key", key)?;
        let mut sum = 0i64;
        call(OP, |err| {
            // SAFETY: the store is live, the key is NUL-terminated, `sum` and `err` are live.
            unsafe {
                ffi::eqim_c10d_store_add(self.raw.as_ptr(), key_c.as_ptr(), delta, &mut sum, err)
            }
        })?;
        Ok(sum)
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        // SAFETY: `self.raw` is the StoreBox this value owns; it is freed once, here. Process
        // groups built on it hold their own reference to the C++ store.
        unsafe { ffi::eqim_c10d_store_free(self.raw.as_ptr()) };
    }
}

fn with_context(e: CollectiveError, context: String) -> CollectiveError {
    match e {
        CollectiveError::C10d { op, message } => CollectiveError::C10d {
            op,
            message: format!("{context}: {message}"),
        },
        other => other,
    }
}

/// Which network device gloo binds its pairs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GlooDevice {
    /// gloo's default: the address this host's name resolves to, else loopback.
    Default,
    /// The address a hostname or IP resolves to (e.g. "127.0.0.1" for a local cluster).
    Hostname(String),
    /// A network interface by name (e.g. "eth0"), as `GLOO_SOCKET_IFNAME` does in Python.
    Interface(String),
}

impl GlooDevice {
    /// `GLOO_SOCKET_IFNAME` if set (as Python's torch.distributed reads it), else the default.
    pub fn from_env() -> Self {
        match std::env::var("GLOO_SOCKET_IFNAME") {
            Ok(name) if !name.is_empty() => Self::Interface(name),
            _ => Self::Default,
        }
    }

    /// `GLOO_SOCKET_IFNAME` if set (`eqim worker --gloo-interface` sets it), else the address
    /// this worker advertises to its peers: gloo then binds where the TCPStore does.
    pub fn for_host(host: &str) -> Self {
        match Self::from_env() {
            Self::Default => Self::Hostname(host.to_owned()),
            interface => interface,
        }
    }
}

/// The collective backend of a process group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backend {
    /// ProcessGroupGloo: CPU tensors.
    Gloo { device: GlooDevice, threads: usize },
    /// ProcessGroupNCCL: CUDA tensors; needs a build with the `cuda` feature.
    Nccl,
}

/// How to build a [`ProcessGroup`]. The timeout is mandatory: c10d's default is 30 minutes.
#[derive(Debug, Clone)]
pub struct GroupOptions {
    pub rank: usize,
    pub world_size: usize,
    /// Bounds each collective: a hung peer makes the others fail after this long.
    pub timeout: Duration,
    pub backend: Backend,
}

/// Environment variable choosing the backend of training groups: `gloo` (the default) or `nccl`.
pub const BACKEND_ENV: &str = "EQIM_COLLECTIVE_BACKEND";

/// gloo's default number of worker threads per group (as in c10d).
pub const DEFAULT_GLOO_THREADS: usize = 2;

impl GroupOptions {
    /// A gloo group on the device named by `GLOO_SOCKET_IFNAME`, else gloo's default device.
    pub fn gloo(rank: usize, world_size: usize, timeout: Duration) -> Self {
        Self {
            rank,
            world_size,
            timeout,
            backend: Backend::Gloo {
                device: GlooDevice::from_env(),
                threads: DEFAULT_GLOO_THREADS,
            },
        }
    }

    /// An NCCL group (one CUDA device per rank).
    pub fn nccl(rank: usize, world_size: usize, timeout: Duration) -> Self {
        Self {
            rank,
            world_size,
            timeout,
            backend: Backend::Nccl,
        }
    }

    /// The options of a training generation's group: gloo bound to `host`, or NCCL when the
    /// environment variable [`BACKEND_ENV`] is `nccl` (every rank's model on its own CUDA device).
    pub fn for_training(
        rank: usize,
        world_size: usize,
        timeout: Duration,
        host: &str,
    ) -> Result<Self> {
        match std::env::var(BACKEND_ENV).unwrap_or_default().trim() {
            "" | "gloo" => {
                Ok(Self::gloo(rank, world_size, timeout)
                    .with_gloo_device(GlooDevice::for_host(host)))
            }
            "nccl" => Ok(Self::nccl(rank, world_size, timeout)),
            other => Err(CollectiveError::InvalidArgument {
                op: "choosing the training backend",
                reason: format!("{BACKEND_ENV}={other:?}: use gloo or nccl"),
            }),
        }
    }

    /// Binds gloo to `device` (no effect on NCCL).
    pub fn with_gloo_device(mut self, device: GlooDevice) -> Self {
        if let Backend::Gloo { device: d, .. } = &mut self.backend {
            *d = device;
        }
        self
    }

    /// Sets gloo's worker thread count (no effect on NCCL).
    pub fn with_gloo_threads(mut self, threads: usize) -> Self {
        if let Backend::Gloo { threads: t, .. } = &mut self.backend {
            *t = threads;
        }
        self
    }
}

/// Whether this build carries ProcessGroupNCCL (the `cuda` feature).
pub fn nccl_compiled_in() -> bool {
    // SAFETY: a constant query without arguments.
    unsafe { ffi::eqim_c10d_nccl_available() != 0 }
}

/// A c10d process group: `world_size` processes that run the same collectives in the same order.
/// Dropping it destroys the group (after any collective in flight finished or timed out).
pub struct ProcessGroup {
    raw: NonNull<c_void>,
    rank: usize,
    world_size: usize,
    timeout: Duration,
    is_nccl: bool,
}

// SAFETY: the box owns an intrusive_ptr to a c10d::Backend, which may be driven from any thread.
// ProcessGroup is not Sync, so collectives are issued from one thread at a time, in order, which
// c10d requires of every rank anyway.
unsafe impl Send for ProcessGroup {}

impl ProcessGroup {
    /// Joins a gloo group of `world_size` ranks as `rank`, rendezvousing through `store`. Blocks
    /// until every rank joined or `timeout` passed; `timeout` also bounds every collective.
    pub fn new(store: &Store, rank: usize, world_size: usize, timeout: Duration) -> Result<Self> {
        Self::with_options(store, &GroupOptions::gloo(rank, world_size, timeout))
    }

    /// Joins a group described by `options`.
    pub fn with_options(store: &Store, options: &GroupOptions) -> Result<Self> {
        const OP: &str = "creating process group";
        if options.world_size == 0 || options.rank >= options.world_size {
            return Err(CollectiveError::InvalidArgument {
                op: OP,
                reason: format!(
                    "rank {} is not in a world of size {}",
                    options.rank, options.world_size
                ),
            });
        }
        let rank = to_c_int(OP, "rank", options.rank)?;
        let world = to_c_int(OP, "world size", options.world_size)?;
        let ms = timeout_ms(OP, options.timeout)?;
        let mut out: *mut c_void = ptr::null_mut();
        let is_nccl = matches!(options.backend, Backend::Nccl);
        match &options.backend {
            Backend::Gloo { device, threads } => {
                let threads = to_c_int(OP, "gloo threads", *threads)?;
                let (kind, arg) = match device {
                    GlooDevice::Default => (0, String::new()),
                    GlooDevice::Hostname(h) => (1, h.clone()),
                    GlooDevice::Interface(i) => (2, i.clone()),
                };
                let arg_c = c_string(OP, "gloo device", &arg)?;
                call(OP, |err| {
                    // SAFETY: the store is live (borrowed for the call); the string, `out` and
                    // `err` are valid; rank and world were range-checked above.
                    unsafe {
                        ffi::eqim_c10d_gloo_new(
                            store.raw.as_ptr(),
                            rank,
                            world,
                            kind,
                            arg_c.as_ptr(),
                            ms,
                            threads,
                            &mut out,
                            err,
                        )
                    }
                })?;
            }
            Backend::Nccl => {
                if !nccl_compiled_in() {
                    return Err(CollectiveError::InvalidArgument {
                        op: OP,
                        reason: "this eqim was built without NCCL; rebuild with --features cuda"
                            .to_owned(),
                    });
                }
                call(OP, |err| {
                    // SAFETY: as for gloo: live store, valid out-pointers, checked rank/world.
                    unsafe {
                        ffi::eqim_c10d_nccl_new(store.raw.as_ptr(), rank, world, ms, &mut out, err)
                    }
                })?;
            }
        }
        let raw = NonNull::new(out).ok_or_else(|| CollectiveError::C10d {
            op: OP,
            message: "the shim returned success but no handle".to_owned(),
        })?;
        Ok(Self {
            raw,
            rank: options.rank,
            world_size: options.world_size,
            timeout: options.timeout,
            is_nccl,
        })
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn world_size(&self) -> usize {
        self.world_size
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Checks what c10d needs to work on `tensor` in place, so a bad tensor is a Rust error and
    /// not undefined behaviour or an obscure C++ exception.
    fn check_tensor(&self, op: &'static str, tensor: &Tensor) -> Result<()> {
        let bad = |reason: String| Err(CollectiveError::InvalidTensor { op, reason });
        if !tensor.defined() {
            return bad("the tensor is undefined".to_owned());
        }
        let device = tensor.device();
        match (self.is_nccl, device) {
            // ProcessGroupGloo also takes CUDA tensors (it stages them through host memory).
            (false, Device::Cpu | Device::Cuda(_)) | (true, Device::Cuda(_)) => {}
            (false, other) => {
                return bad(format!("gloo works on CPU or CUDA tensors, got {other:?}"))
            }
            (true, other) => return bad(format!("NCCL works on CUDA tensors, got {other:?}")),
        }
        if tensor.is_sparse() {
            return bad("sparse tensors are not supported".to_owned());
        }
        if !tensor.is_contiguous() {
            return bad("the tensor is not contiguous (call .contiguous() on a copy)".to_owned());
        }
        let kind = tensor.kind();
        if !matches!(
            kind,
            Kind::Float
                | Kind::Double
                | Kind::Half
                | Kind::BFloat16
                | Kind::Int
                | Kind::Int64
                | Kind::Int8
                | Kind::Uint8
        ) {
            return bad(format!("dtype {kind:?} is not supported"));
        }
        if tensor.numel() == 0 {
            return bad("the tensor is empty".to_owned());
        }
        Ok(())
    }

    /// Sums `tensor` over all ranks, in place: afterwards every rank holds the same sum.
    pub fn allreduce_sum(&self, tensor: &mut Tensor) -> Result<()> {
        const OP: &str = "allreduce";
        self.check_tensor(OP, tensor)?;
        let t = tensor.as_mut_ptr();
        call(OP, |err| {
            // SAFETY: the group is live; `t` is the at::Tensor* of a defined, dense, contiguous
            // tensor on the backend's device, exclusively borrowed for the (blocking) call.
            unsafe { ffi::eqim_c10d_allreduce_sum(self.raw.as_ptr(), t, err) }
        })
    }

    /// Copies `root`'s `tensor` into every other rank's `tensor`, in place. All ranks must pass
    /// tensors of the same shape and dtype.
    pub fn broadcast(&self, tensor: &mut Tensor, root: usize) -> Result<()> {
        const OP: &str = "broadcast";
        self.check_tensor(OP, tensor)?;
        if root >= self.world_size {
            return Err(CollectiveError::InvalidArgument {
                op: OP,
                reason: format!("root {root} is not in a world of size {}", self.world_size),
            });
        }
        let root = to_c_int(OP, "root", root)?;
        let t = tensor.as_mut_ptr();
        call(OP, |err| {
            // SAFETY: as in allreduce_sum; `root` was checked to be a rank of this group.
            unsafe { ffi::eqim_c10d_broadcast(self.raw.as_ptr(), t, root, err) }
        })
    }

    /// Returns once every rank reached the barrier (or fails at the group timeout).
    pub fn barrier(&self) -> Result<()> {
        call("barrier", |err| {
            // SAFETY: the group is live and `err` is a valid out-pointer.
            unsafe { ffi::eqim_c10d_barrier(self.raw.as_ptr(), err) }
        })
    }

    /// Destroys the group and reports any error doing so (dropping does the same silently,
    /// logging the error).
    pub fn destroy(self) -> Result<()> {
        let raw = self.raw;
        std::mem::forget(self);
        Self::free(raw)
    }

    fn free(raw: NonNull<c_void>) -> Result<()> {
        call("destroying process group", |err| {
            // SAFETY: `raw` is the GroupBox owned by the ProcessGroup being consumed; it is freed
            // exactly once (destroy forgets the value, Drop runs only otherwise).
            unsafe { ffi::eqim_c10d_group_free(raw.as_ptr(), err) }
        })
    }
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        if let Err(e) = Self::free(self.raw) {
            tracing::warn!(cause = %e, rank = self.rank, "process group destroyed with an error");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loopback_group(timeout: Duration) -> (Store, ProcessGroup) {
        let store = Store::host("127.0.0.1", 0, timeout).expect("host a store on loopback");
        assert_ne!(store.port(), 0, "hosting on port 0 reports the bound port");
        let options = GroupOptions::gloo(0, 1, timeout)
            .with_gloo_device(GlooDevice::Hostname("127.0.0.1".into()));
        let group = ProcessGroup::with_options(&store, &options).expect("world of one");
        (store, group)
    }

    #[test]
    fn world_of_one_allreduce_and_broadcast_keep_values() {
        let (_store, group) = loopback_group(Duration::from_secs(10));
        let mut t = Tensor::arange(6, (Kind::Float, Device::Cpu));
        group.allreduce_sum(&mut t).expect("allreduce");
        group.broadcast(&mut t, 0).expect("broadcast");
        group.barrier().expect("barrier");
        let expected = Tensor::arange(6, (Kind::Float, Device::Cpu));
        assert!(t.equal(&expected));
        group.destroy().expect("destroy");
    }

    #[test]
    fn unsuitable_tensors_and_roots_are_rejected_before_the_call() {
        let (_store, group) = loopback_group(Duration::from_secs(10));
        let mut strided = Tensor::zeros([4, 4], (Kind::Float, Device::Cpu)).tr();
        let err = group.allreduce_sum(&mut strided).unwrap_err();
        assert!(err.to_string().contains("not contiguous"), "{err}");
        let mut flags = Tensor::zeros([4], (Kind::Bool, Device::Cpu));
        let err = group.allreduce_sum(&mut flags).unwrap_err();
        assert!(err.to_string().contains("dtype"), "{err}");
        let mut empty = Tensor::zeros([0], (Kind::Float, Device::Cpu));
        assert!(group.allreduce_sum(&mut empty).is_err());
        let mut t = Tensor::zeros([4], (Kind::Float, Device::Cpu));
        let err = group.broadcast(&mut t, 1).unwrap_err();
        assert!(err.to_string().contains("root 1"), "{err}");
    }

    #[test]
    fn store_round_trips_values_and_prefixes_isolate_keys() {
        let store = Store::host("127.0.0.1", 0, Duration::from_secs(5)).expect("host");
        let client =
            Store::connect("127.0.0.1", store.port(), Duration::from_secs(5)).expect("connect");
        client.set("k", b"value").expect("set");
        assert_eq!(store.get("k").expect("get"), b"value");
        assert_eq!(store.add("n", 2).expect("add"), 2);
        assert_eq!(client.add("n", 3).expect("add"), 5);
        let gen1 = client.prefixed("gen1").expect("prefix");
        assert_eq!(
            gen1.add("n", 1).expect("add"),
            1,
            "a prefix sees its own keys only"
        );
    }

    #[test]
    fn a_c10d_exception_comes_back_as_an_error() {
        // Nothing listens on the port a closed listener had: TCPStore's connect throws after its
        // timeout, and that must surface as an Err naming the address, not an abort.
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            l.local_addr().expect("addr").port()
        };
        let err = Store::connect("127.0.0.1", port, Duration::from_millis(300))
            .err()
            .expect("connecting to a closed port fails");
        let text = err.to_string();
        assert!(text.contains(&format!("127.0.0.1:{port}")), "{text}");
    }

    #[test]
    fn forming_a_group_with_a_missing_rank_fails_at_the_group_timeout() {
        // The store allows 30 s; the group's own 1 s timeout must bound the rendezvous, so a rank
        // that dies while a generation forms cannot stall the survivors for long.
        let store = Store::host("127.0.0.1", 0, Duration::from_secs(30)).expect("host");
        let timeout = Duration::from_secs(1);
        let options = GroupOptions::gloo(0, 2, timeout)
            .with_gloo_device(GlooDevice::Hostname("127.0.0.1".into()));
        let start = std::time::Instant::now();
        let err = ProcessGroup::with_options(&store, &options)
            .err()
            .expect("rank 1 never joins");
        let took = start.elapsed();
        assert!(took < Duration::from_secs(10), "took {took:?}: {err}");
        assert!(
            took >= Duration::from_millis(900),
            "failed early ({took:?}): {err}"
        );
    }

    #[test]
    fn zero_timeouts_are_refused() {
        let err = Store::host("127.0.0.1", 0, Duration::ZERO)
            .err()
            .expect("refused");
        assert!(err.to_string().contains("timeout"), "{err}");
    }
}
