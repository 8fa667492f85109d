// eqim's C ABI over PyTorch's own c10d collectives: TCPStore, PrefixStore, ProcessGroupGloo and
// (with EQIM_WITH_NCCL) ProcessGroupNCCL, as exported by libtorch_cpu.so / libtorch_cuda.so.
//
// Conventions, relied on by worker/src/collective/ffi.rs:
// - every function returns 0 on success and -1 on failure; on failure *err receives a message
//   allocated with malloc, to be released with eqim_c10d_free_str;
// - no C++ exception ever crosses this boundary: every body runs inside guard();
// - objects are opaque boxes owned by the caller and released with the matching *_free.
#include "shim_guard.h"
#include <torch/csrc/distributed/c10d/Backend.hpp>
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#include <torch/csrc/distributed/c10d/Work.hpp>

#ifdef EQIM_WITH_NCCL
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif

#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

namespace {

struct StoreBox {
  c10::intrusive_ptr<c10d::Store> store;
  // The TCP port of the store (the bound one when hosting on port 0); 0 for a PrefixStore.
  uint16_t port;
};

struct GroupBox {
  c10::intrusive_ptr<c10d::Backend> backend;
  // NCCL's Work::wait() only orders CUDA streams; with a timeout it blocks the CPU until the
  // collective finished or failed, which is what callers of this shim expect. Gloo enforces its
  // own context timeout, so its waits use none.
  bool blocking_wait_with_timeout;
  std::chrono::milliseconds timeout;
};

using eqim_shim::guard;
using eqim_shim::set_err;

void wait_work(GroupBox* group, const c10::intrusive_ptr<c10d::Work>& work) {
  if (group->blocking_wait_with_timeout) {
    work->wait(group->timeout);
  } else {
    work->wait();
  }
}

GroupBox* as_group(void* group) {
  if (group == nullptr) throw std::invalid_argument("process group handle is null");
  return static_cast<GroupBox*>(group);
}

StoreBox* as_store(void* store) {
  if (store == nullptr) throw std::invalid_argument("store handle is null");
  return static_cast<StoreBox*>(store);
}

at::Tensor& as_tensor(at::Tensor* tensor) {
  if (tensor == nullptr || !tensor->defined()) throw std::invalid_argument("tensor is undefined");
  return *tensor;
}

}  // namespace

extern "C" {

void eqim_c10d_free_str(char* s) { free(s); }

int eqim_c10d_tcpstore_new(const char* host, uint16_t port, int is_server, int64_t timeout_ms,
                           void** out, char** err) {
  return guard(err, [&] {
    *out = nullptr;
    c10d::TCPStoreOptions opts;
    opts.port = port;
    opts.isServer = is_server != 0;
    // Membership is the coordinator's business: the server never waits for a fixed count.
    opts.numWorkers = std::nullopt;
    opts.waitWorkers = false;
    opts.timeout = std::chrono::milliseconds(timeout_ms);
    auto store = c10::make_intrusive<c10d::TCPStore>(std::string(host), opts);
    uint16_t bound = store->getPort();
    *out = new StoreBox{c10::static_intrusive_pointer_cast<c10d::Store>(store), bound};
  });
}

int eqim_c10d_prefixstore_new(const char* prefix, void* base, void** out, char** err) {
  return guard(err, [&] {
    *out = nullptr;
    auto inner = as_store(base)->store;
    auto store = c10::make_intrusive<c10d::PrefixStore>(std::string(prefix), inner);
    *out = new StoreBox{c10::static_intrusive_pointer_cast<c10d::Store>(store), 0};
  });
}

uint16_t eqim_c10d_store_port(void* store) {
  return store == nullptr ? 0 : static_cast<StoreBox*>(store)->port;
}

int eqim_c10d_store_set(void* store, const char* key, const uint8_t* value, size_t len,
                        char** err) {
  return guard(err, [&] {
    std::vector<uint8_t> bytes(value, value + len);
    as_store(store)->store->set(std::string(key), bytes);
  });
}

// Blocks until the key exists or the store's timeout passes. *value_out is malloc'ed.
int eqim_c10d_store_get(void* store, const char* key, uint8_t** value_out, size_t* len_out,
                        char** err) {
  return guard(err, [&] {
    *value_out = nullptr;
    *len_out = 0;
    std::vector<uint8_t> bytes = as_store(store)->store->get(std::string(key));
    auto* buf = static_cast<uint8_t*>(malloc(bytes.empty() ? 1 : bytes.size()));
    if (buf == nullptr) throw std::bad_alloc();
    if (!bytes.empty()) memcpy(buf, bytes.data(), bytes.size());
    *value_out = buf;
    *len_out = bytes.size();
  });
}

void eqim_c10d_free_bytes(uint8_t* bytes) { free(bytes); }

int eqim_c10d_store_add(void* store, const char* key, int64_t delta, int64_t* out, char** err) {
  return guard(err, [&] { *out = as_store(store)->store->add(std::string(key), delta); });
}

void eqim_c10d_store_free(void* store) {
  // Deleting a TCPStore closes sockets and (for the host) stops its server thread; a destructor
  // that throws must not unwind into Rust.
  (void)guard(nullptr, [&] { delete static_cast<StoreBox*>(store); });
}

// device_kind: 0 = gloo's default device (this host's name), 1 = bind to `device_arg` as a
// hostname or address, 2 = bind to the network interface named `device_arg`.
int eqim_c10d_gloo_new(void* store, int rank, int world_size, int device_kind,
                       const char* device_arg, int64_t timeout_ms, int threads, void** out,
                       char** err) {
  return guard(err, [&] {
    *out = nullptr;
    auto inner = as_store(store)->store;
    auto opts = c10d::ProcessGroupGloo::Options::create(std::chrono::milliseconds(timeout_ms));
    switch (device_kind) {
      case 0:
        opts->devices.push_back(c10d::ProcessGroupGloo::createDefaultDevice());
        break;
      case 1:
        opts->devices.push_back(
            c10d::ProcessGroupGloo::createDeviceForHostname(std::string(device_arg)));
        break;
      case 2:
        opts->devices.push_back(
            c10d::ProcessGroupGloo::createDeviceForInterface(std::string(device_arg)));
        break;
      default:
        throw std::invalid_argument("unknown gloo device kind");
    }
    if (threads > 0) opts->threads = threads;
    auto pg = c10::make_intrusive<c10d::ProcessGroupGloo>(inner, rank, world_size, opts);
    *out = new GroupBox{c10::static_intrusive_pointer_cast<c10d::Backend>(pg), false,
                        std::chrono::milliseconds(timeout_ms)};
  });
}

int eqim_c10d_nccl_available(void) {
#ifdef EQIM_WITH_NCCL
  return 1;
#else
  return 0;
#endif
}

int eqim_c10d_nccl_new(void* store, int rank, int world_size, int64_t timeout_ms, void** out,
                       char** err) {
  return guard(err, [&] {
    *out = nullptr;
#ifdef EQIM_WITH_NCCL
    auto inner = as_store(store)->store;
    auto opts = c10d::ProcessGroupNCCL::Options::create();
    opts->timeout = std::chrono::milliseconds(timeout_ms);
    auto pg = c10::make_intrusive<c10d::ProcessGroupNCCL>(inner, rank, world_size, opts);
    *out = new GroupBox{c10::static_intrusive_pointer_cast<c10d::Backend>(pg), true,
                        std::chrono::milliseconds(timeout_ms)};
#else
    (void)store;
    (void)rank;
    (void)world_size;
    (void)timeout_ms;
    throw std::runtime_error("eqim was built without NCCL: rebuild with --features cuda");
#endif
  });
}

// `tensor` is torch-sys's C_tensor, i.e. an at::Tensor*.
int eqim_c10d_allreduce_sum(void* group, at::Tensor* tensor, char** err) {
  return guard(err, [&] {
    GroupBox* g = as_group(group);
    std::vector<at::Tensor> tensors{as_tensor(tensor)};
    c10d::AllreduceOptions opts;
    opts.reduceOp = c10d::ReduceOp::SUM;
    wait_work(g, g->backend->allreduce(tensors, opts));
  });
}

int eqim_c10d_broadcast(void* group, at::Tensor* tensor, int root, char** err) {
  return guard(err, [&] {
    GroupBox* g = as_group(group);
    std::vector<at::Tensor> tensors{as_tensor(tensor)};
    c10d::BroadcastOptions opts;
    opts.rootRank = root;
    opts.rootTensor = 0;
    wait_work(g, g->backend->broadcast(tensors, opts));
  });
}

int eqim_c10d_barrier(void* group, char** err) {
  return guard(err, [&] {
    GroupBox* g = as_group(group);
    c10d::BarrierOptions opts;
    opts.timeout = g->timeout;
    wait_work(g, g->backend->barrier(opts));
  });
}

// Shuts the backend down and frees it. Gloo's destructor joins its worker threads, which return
// once their collective finished or hit the group timeout.
int eqim_c10d_group_free(void* group, char** err) {
  if (group == nullptr) return 0;
  auto* g = static_cast<GroupBox*>(group);
  int rc = guard(err, [&] { g->backend->shutdown(); });
  int rc_delete = guard(rc == 0 ? err : nullptr, [&] { delete g; });
  return rc != 0 ? rc : rc_delete;
}

}  // extern "C"
