// eqim's C ABI over PyTorch's own c10d collectives: TCPStore, PrefixStore, ProcessGroupGloo and
// (with EQIM_WITH_NCCL) ProcessGroupNCCL, as exported by libtorch_cpu.so / libtorch_cuda.so, and a
// gradient reducer that all-reduces gradient buckets while backward still runs (autograd hooks on
// the parameters launch a bucket's async all-reduce once all its gradients are in).
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
#include <memory>
#include <mutex>
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

// --- Gradient reducer: bucketed all-reduce overlapped with backward -------------------------------
//
// Parameter i's gradient lands in bucket bucket_of[i] at offset offset_of[i] of that bucket's flat
// buffer. While armed for a backward pass, a hook on each parameter writes `prev[i] + grad` (prev:
// the gradient accumulated by earlier micro-batches, the very sum the caller computes after
// backward) into its slot; when a bucket's last slot is written, every bucket from the next one not
// yet launched up to the first incomplete one gets its async all-reduce, so all ranks issue the same
// collectives in the same order whatever order their gradients become ready in. finish() fills
// slots no hook wrote from the caller's gradients, launches the rest in order, waits for every
// all-reduce and copies the sums back.
namespace {

struct ReducerState {
  std::mutex mu;
  c10::intrusive_ptr<c10d::Backend> backend;
  bool blocking_wait_with_timeout;
  std::chrono::milliseconds timeout;
  std::vector<at::Tensor> buffers;
  std::vector<int64_t> bucket_of;
  // slots[i]: parameter i's view into its bucket's buffer, shaped like the parameter.
  std::vector<at::Tensor> slots;
  std::vector<int64_t> slot_count;  // parameters per bucket
  // Per step:
  bool armed = false;
  std::vector<at::Tensor> prev;
  std::vector<char> filled;
  std::vector<int64_t> missing;  // per bucket: slots not written yet
  std::vector<c10::intrusive_ptr<c10d::Work>> works;
  size_t next_launch = 0;
  int64_t launched_in_backward = 0;
  std::string hook_error;

  void reset_step() {
    armed = false;
    prev.assign(slots.size(), at::Tensor());
    filled.assign(slots.size(), 0);
    missing = slot_count;
    works.assign(buffers.size(), c10::intrusive_ptr<c10d::Work>());
    next_launch = 0;
    hook_error.clear();
  }

  void launch_ready() {
    while (next_launch < buffers.size() && missing[next_launch] == 0) {
      std::vector<at::Tensor> tensors{buffers[next_launch]};
      c10d::AllreduceOptions opts;
      opts.reduceOp = c10d::ReduceOp::SUM;
      works[next_launch] = backend->allreduce(tensors, opts);
      ++next_launch;
    }
  }

  void wait(const c10::intrusive_ptr<c10d::Work>& work) const {
    if (blocking_wait_with_timeout) {
      work->wait(timeout);
    } else {
      work->wait();
    }
  }

  // Waits for launched all-reduces, keeping the first error; used when a step is abandoned.
  void drain() {
    for (auto& work : works) {
      if (!work) continue;
      try {
        wait(work);
      } catch (...) {
      }
      work.reset();
    }
  }

  void on_grad(size_t i, const at::Tensor& g) {
    std::lock_guard<std::mutex> lock(mu);
    if (!armed || filled[i] || !hook_error.empty()) return;
    try {
      at::NoGradGuard no_grad;
      if (prev[i].defined()) {
        at::add_out(slots[i], prev[i], g);
      } else {
        slots[i].copy_(g);
      }
      filled[i] = 1;
      size_t before = next_launch;
      if (--missing[bucket_of[i]] == 0) launch_ready();
      launched_in_backward += static_cast<int64_t>(next_launch - before);
    } catch (const c10::Error& e) {
      hook_error = e.what_without_backtrace();
    } catch (const std::exception& e) {
      hook_error = e.what();
    }
  }
};

struct ReducerBox {
  std::shared_ptr<ReducerState> state;
  std::vector<at::Tensor> params;
  std::vector<unsigned> hooks;
};

ReducerBox* as_reducer(void* reducer) {
  if (reducer == nullptr) throw std::invalid_argument("reducer handle is null");
  return static_cast<ReducerBox*>(reducer);
}

void check_grads(const ReducerState& s, at::Tensor** grads, size_t n) {
  if (n != s.slots.size()) {
    throw std::invalid_argument("the reducer has " + std::to_string(s.slots.size()) +
                                " parameters, but " + std::to_string(n) + " gradients were passed");
  }
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& g = as_tensor(grads[i]);
    if (g.sizes() != s.slots[i].sizes() || g.scalar_type() != s.slots[i].scalar_type() ||
        g.device() != s.slots[i].device()) {
      throw std::invalid_argument("gradient " + std::to_string(i) +
                                  " does not match its parameter's shape, dtype or device");
    }
  }
}

}  // namespace

extern "C" {

// params[i] must be leaf tensors that require grad; bucket_of/offset_of have n entries,
// bucket_numels n_buckets. Each bucket's dtype and device are those of its first parameter.
int eqim_c10d_reducer_new(void* group, at::Tensor** params, size_t n, const int64_t* bucket_of,
                          const int64_t* offset_of, const int64_t* bucket_numels,
                          size_t n_buckets, void** out, char** err) {
  return guard(err, [&] {
    *out = nullptr;
    GroupBox* g = as_group(group);
    auto state = std::make_shared<ReducerState>();
    state->backend = g->backend;
    state->blocking_wait_with_timeout = g->blocking_wait_with_timeout;
    state->timeout = g->timeout;
    state->buffers.resize(n_buckets);
    state->slot_count.assign(n_buckets, 0);
    auto box = std::make_unique<ReducerBox>();
    for (size_t i = 0; i < n; ++i) {
      const at::Tensor& p = as_tensor(params[i]);
      if (!p.requires_grad() || !p.is_leaf()) {
        throw std::invalid_argument("parameter " + std::to_string(i) +
                                    " is not a leaf tensor that requires grad");
      }
      int64_t b = bucket_of[i];
      if (b < 0 || static_cast<size_t>(b) >= n_buckets) throw std::invalid_argument("bad bucket");
      if (!state->buffers[b].defined()) {
        state->buffers[b] = at::zeros({bucket_numels[b]}, p.options().requires_grad(false));
      }
      const at::Tensor& buf = state->buffers[b];
      if (buf.scalar_type() != p.scalar_type() || buf.device() != p.device() ||
          offset_of[i] < 0 || offset_of[i] + p.numel() > buf.numel()) {
        throw std::invalid_argument("parameter " + std::to_string(i) +
                                    " does not fit its bucket (dtype, device or size)");
      }
      state->slots.push_back(buf.narrow(0, offset_of[i], p.numel()).view(p.sizes()));
      state->bucket_of.push_back(b);
      state->slot_count[b] += 1;
      box->params.push_back(p);
    }
    for (size_t b = 0; b < n_buckets; ++b) {
      if (!state->buffers[b].defined()) throw std::invalid_argument("an empty bucket");
    }
    state->reset_step();
    box->state = state;
    for (size_t i = 0; i < n; ++i) {
      std::weak_ptr<ReducerState> weak = state;
      box->hooks.push_back(box->params[i].register_hook([weak, i](const at::Tensor& grad) {
        if (auto s = weak.lock()) s->on_grad(i, grad);
      }));
    }
    *out = box.release();
  });
}

// Arms the hooks for the next backward pass; grads[i] holds what earlier micro-batches of this
// step accumulated for parameter i (summed with the new gradient in the hook).
int eqim_c10d_reducer_arm(void* reducer, at::Tensor** grads, size_t n, char** err) {
  return guard(err, [&] {
    ReducerState& s = *as_reducer(reducer)->state;
    std::lock_guard<std::mutex> lock(s.mu);
    check_grads(s, grads, n);
    s.drain();
    s.reset_step();
    for (size_t i = 0; i < n; ++i) s.prev[i] = *grads[i];
    s.launched_in_backward = 0;
    s.armed = true;
  });
}

// Drops the step: no more hooks act, launched all-reduces are waited for (errors ignored).
int eqim_c10d_reducer_disarm(void* reducer, char** err) {
  return guard(err, [&] {
    ReducerState& s = *as_reducer(reducer)->state;
    std::lock_guard<std::mutex> lock(s.mu);
    s.drain();
    s.reset_step();
  });
}

// Completes the step (armed or not): grads[i] become the sums over all ranks. *launched_early
// receives the number of buckets whose all-reduce started inside backward.
int eqim_c10d_reducer_finish(void* reducer, at::Tensor** grads, size_t n,
                             int64_t* launched_early, char** err) {
  return guard(err, [&] {
    ReducerState& s = *as_reducer(reducer)->state;
    std::lock_guard<std::mutex> lock(s.mu);
    *launched_early = s.armed ? s.launched_in_backward : 0;
    struct Reset {
      ReducerState& s;
      ~Reset() {
        s.drain();
        s.reset_step();
      }
    } reset{s};
    s.armed = false;
    if (!s.hook_error.empty()) throw std::runtime_error("gradient hook: " + s.hook_error);
    check_grads(s, grads, n);
    at::NoGradGuard no_grad;
    for (size_t i = 0; i < n; ++i) {
      if (s.filled[i]) continue;
      s.slots[i].copy_(*grads[i]);
      s.filled[i] = 1;
      --s.missing[s.bucket_of[i]];
    }
    s.launch_ready();
    for (auto& work : s.works) {
      s.wait(work);
      work.reset();
    }
    for (size_t i = 0; i < n; ++i) grads[i]->copy_(s.slots[i]);
  });
}

void eqim_c10d_reducer_free(void* reducer) {
  (void)guard(nullptr, [&] {
    auto* box = static_cast<ReducerBox*>(reducer);
    if (box == nullptr) return;
    for (size_t i = 0; i < box->params.size(); ++i) box->params[i].remove_hook(box->hooks[i]);
    {
      std::lock_guard<std::mutex> lock(box->state->mu);
      box->state->drain();
    }
    delete box;
  });
}

}  // extern "C"
