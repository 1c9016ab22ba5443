// Host shim, a debugging aid (`TUNER_OP_CENSUS=1`, like TUNER_CUDA_PROFILE): counts the ops
// libtorch runs on the host and the host time spent in them, through RecordFunction, the hook
// torch.profiler uses. Not a kernel. Built by build.rs with kernels/custom_op.cpp (libtorch's
// headers only). Read by src/kernels/op_census.rs.
//
// Every op the dispatcher runs (scope FUNCTION: `aten::mm`, `aten::_to_copy`, ...) and every
// autograd node the engine runs (scope BACKWARD_FUNCTION: `MmBackward0`, a Rust node's name) is
// tallied by name: calls and inclusive host nanoseconds. An op is "top-level" when no other
// recorded op encloses it on its thread: those are the calls the program (or the autograd
// engine) issues itself, each paying the dispatcher, the allocator and the launch; their count
// and time add up without double counting. Time outside them on the issuing thread is the
// program's own (tch's wrappers, the Rust code).
//
// The callbacks are plain function pointers (RecordFunction's interface), so the tally is
// process-wide: one census per process, started once and never removed. The callbacks cost
// about a microsecond per op while it runs; timings taken with it on are a little slower.
#include <ATen/record_function.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

namespace {

struct Tally {
  uint64_t calls = 0;
  uint64_t top = 0;  // calls that were top-level
  uint64_t ns = 0;   // inclusive host time
};

struct Census {
  std::mutex mutex;
  std::unordered_map<std::string, Tally> ops;
  uint64_t top_calls = 0;
  uint64_t top_ns = 0;
};

Census* census = nullptr;  // made once by tuner_census_start, never freed
std::once_flag started;
thread_local int depth = 0;

struct Ctx : public at::ObserverContext {
  std::chrono::steady_clock::time_point t0;
  bool top = false;
};

std::unique_ptr<at::ObserverContext> on_start(const at::RecordFunction&) {
  auto ctx = std::make_unique<Ctx>();
  ctx->top = depth == 0;
  depth++;
  ctx->t0 = std::chrono::steady_clock::now();
  return ctx;
}

void on_end(const at::RecordFunction& fn, at::ObserverContext* base) {
  const auto t1 = std::chrono::steady_clock::now();
  depth--;
  auto* ctx = static_cast<Ctx*>(base);
  const uint64_t ns = std::chrono::duration_cast<std::chrono::nanoseconds>(t1 - ctx->t0).count();
  std::lock_guard<std::mutex> lock(census->mutex);
  Tally& t = census->ops[fn.name()];
  t.calls++;
  t.ns += ns;
  if (ctx->top) {
    t.top++;
    census->top_calls++;
    census->top_ns += ns;
  }
}

}  // namespace

// Install the callbacks (once per process; later calls do nothing). Returns 0, or -1 with the
// message in err.
extern "C" int tuner_census_start(char* err, int err_len) {
  try {
    std::call_once(started, [] {
      census = new Census();
      at::addGlobalCallback(at::RecordFunctionCallback(on_start, on_end)
                                .needsInputs(false)
                                .scopes({at::RecordScope::FUNCTION, at::RecordScope::BACKWARD_FUNCTION}));
    });
    return 0;
  } catch (const std::exception& e) {
    snprintf(err, err_len, "%s", e.what());
    return -1;
  }
}

// Top-level calls and their host nanoseconds so far (zeros before the census starts).
extern "C" void tuner_census_totals(uint64_t* calls, uint64_t* ns) {
  *calls = 0;
  *ns = 0;
  if (census == nullptr) return;
  std::lock_guard<std::mutex> lock(census->mutex);
  *calls = census->top_calls;
  *ns = census->top_ns;
}

// Rust callback receiving one row of the tally: name, calls, top-level calls, inclusive ns.
typedef void (*tuner_census_row_fn)(void* sink, const char* name, uint64_t calls, uint64_t top, uint64_t ns);

// Hand every row to `row` (in no particular order) and, with `reset`, start the tally afresh.
extern "C" void tuner_census_rows(void* sink, tuner_census_row_fn row, int reset) {
  if (census == nullptr) return;
  std::vector<std::pair<std::string, Tally>> rows;
  {
    std::lock_guard<std::mutex> lock(census->mutex);
    rows.assign(census->ops.begin(), census->ops.end());
    if (reset) {
      census->ops.clear();
    }
  }
  for (const auto& [name, t] : rows) row(sink, name.c_str(), t.calls, t.top, t.ns);
}
