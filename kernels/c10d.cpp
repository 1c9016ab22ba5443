// Host shim: libtorch's own c10d (the engine under torch.distributed) for tuner's
// data parallel training (src/dist/). Not a kernel; it lives beside alloc_stats.cpp,
// the project's other C++. Built by build.rs only when libtorch has CUDA.
//
// - Stores (rendezvous, torchrun's): c10d::TCPStore on MASTER_ADDR:MASTER_PORT, rank 0
//   serving; or c10d::FileStore, a file in the run dir, for one host.
// - Process groups: c10d::ProcessGroupNCCL for CUDA tensors (NCCL exchanges its unique
//   id through the store) and c10d::ProcessGroupGloo for CPU tensors (what the CPU
//   tests use), both behind c10d::Backend's virtual collectives, with their timeouts.
// - Errors: every entry point catches, returns non-zero (or null) and hands back a
//   malloc'd message in *err, freed with tuner_c10d_free.
//
// Tensors come from tch: a `*mut C_tensor` is a `at::Tensor*` (torch-sys).
#include <torch/csrc/distributed/c10d/FileStore.hpp>
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>

#include <c10/cuda/CUDAFunctions.h>

#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

struct TunerStore {
  c10::intrusive_ptr<c10d::Store> store;
};

struct TunerGroup {
  c10::intrusive_ptr<c10d::Backend> backend;
};

static void set_err(char** err, const char* what) {
  if (err) *err = strdup(what);
}

#define TUNER_TRY(fail, body)                         \
  try {                                               \
    body                                              \
  } catch (const c10::Error& e) {                     \
    set_err(err, e.what_without_backtrace());         \
    return fail;                                      \
  } catch (const std::exception& e) {                 \
    set_err(err, e.what());                           \
    return fail;                                      \
  } catch (...) {                                     \
    set_err(err, "unknown C++ exception in c10d");    \
    return fail;                                      \
  }

extern "C" {

void tuner_c10d_free(void* p) { free(p); }

// is_server: this process serves the store (rank 0, unless torchrun's agent already does);
// every key is put under `prefix` (torchrun's restart attempt).
TunerStore* tuner_c10d_tcp_store(const char* host, int port, int is_server, int world, int64_t timeout_ms, const char* prefix, char** err) {
  TUNER_TRY(nullptr, {
    c10d::TCPStoreOptions o;
    o.port = static_cast<uint16_t>(port);
    o.isServer = is_server != 0;
    o.numWorkers = static_cast<size_t>(world);
    o.waitWorkers = true;
    o.timeout = std::chrono::milliseconds(timeout_ms);
    auto tcp = c10::make_intrusive<c10d::TCPStore>(std::string(host), o);
    return new TunerStore{c10::make_intrusive<c10d::PrefixStore>(std::string(prefix), tcp)};
  })
}

TunerStore* tuner_c10d_file_store(const char* path, int world, int64_t timeout_ms, char** err) {
  TUNER_TRY(nullptr, {
    auto s = c10::make_intrusive<c10d::FileStore>(std::string(path), world);
    s->setTimeout(std::chrono::milliseconds(timeout_ms));
    return new TunerStore{s};
  })
}

void tuner_c10d_store_free(TunerStore* s) { delete s; }

int tuner_c10d_store_set(TunerStore* s, const char* key, const uint8_t* data, size_t len, char** err) {
  TUNER_TRY(1, {
    s->store->set(std::string(key), std::vector<uint8_t>(data, data + len));
    return 0;
  })
}

// Waits up to timeout_ms for the key; *out is malloc'd (free with tuner_c10d_free).
int tuner_c10d_store_get(TunerStore* s, const char* key, int64_t timeout_ms, uint8_t** out, size_t* len, char** err) {
  TUNER_TRY(1, {
    std::string k(key);
    s->store->wait({k}, std::chrono::milliseconds(timeout_ms));
    auto v = s->store->get(k);
    *len = v.size();
    *out = static_cast<uint8_t*>(malloc(v.size() ? v.size() : 1));
    if (!v.empty()) memcpy(*out, v.data(), v.size());
    return 0;
  })
}

int tuner_c10d_store_check(TunerStore* s, const char* key, int* present, char** err) {
  TUNER_TRY(1, {
    *present = s->store->check({std::string(key)}) ? 1 : 0;
    return 0;
  })
}

int tuner_c10d_store_add(TunerStore* s, const char* key, int64_t delta, int64_t* value, char** err) {
  TUNER_TRY(1, {
    *value = s->store->add(std::string(key), delta);
    return 0;
  })
}

// Make `device` this process's current CUDA device (as torch.cuda.set_device(LOCAL_RANK)):
// anything that launches on the current device, and NCCL's communicator, use it.
int tuner_c10d_set_cuda_device(int device, char** err) {
  TUNER_TRY(1, {
    c10::cuda::set_device(static_cast<c10::DeviceIndex>(device));
    return 0;
  })
}

// nccl != 0: ProcessGroupNCCL (CUDA tensors), else ProcessGroupGloo (CPU tensors).
TunerGroup* tuner_c10d_group(TunerStore* s, int rank, int world, int nccl, int64_t timeout_ms, char** err) {
  TUNER_TRY(nullptr, {
    auto timeout = std::chrono::milliseconds(timeout_ms);
    auto store = c10::make_intrusive<c10d::PrefixStore>(nccl ? "tuner/nccl/" : "tuner/gloo/", s->store);
    c10::intrusive_ptr<c10d::Backend> b;
    if (nccl) {
      auto o = c10d::ProcessGroupNCCL::Options::create();
      o->timeout = timeout;
      b = c10::make_intrusive<c10d::ProcessGroupNCCL>(store, rank, world, o);
    } else {
      auto o = c10d::ProcessGroupGloo::Options::create_default(timeout);
      b = c10::make_intrusive<c10d::ProcessGroupGloo>(store, rank, world, o);
    }
    return new TunerGroup{b};
  })
}

void tuner_c10d_group_free(TunerGroup* g) {
  try {
    g->backend->shutdown();
  } catch (...) {
  }
  delete g;
}

// In-place sum of each tensor across ranks: one collective per tensor, all launched
// before the first wait. For NCCL, wait() orders the current stream after the collective.
int tuner_c10d_allreduce_sum(TunerGroup* g, at::Tensor** tensors, int n, char** err) {
  TUNER_TRY(1, {
    std::vector<c10::intrusive_ptr<c10d::Work>> works;
    std::vector<std::vector<at::Tensor>> bufs(n);
    for (int i = 0; i < n; i++) {
      bufs[i] = {*tensors[i]};
      works.push_back(g->backend->allreduce(bufs[i]));
    }
    for (auto& w : works) w->wait();
    return 0;
  })
}

int tuner_c10d_broadcast(TunerGroup* g, at::Tensor* t, int root, char** err) {
  TUNER_TRY(1, {
    std::vector<at::Tensor> v{*t};
    c10d::BroadcastOptions o;
    o.rootRank = root;
    g->backend->broadcast(v, o)->wait();
    return 0;
  })
}

}  // extern "C"
