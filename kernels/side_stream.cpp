// Host shim for activation offload (src/train/offload.rs): pinned host tensors, and copies on a
// side stream that start after the current stream's work so far and do not block it, each
// returning an event the current stream waits on before the copy's result is used. Not a kernel.
// Follows PyTorch's own pattern for such copies (a stream from the pool, events, recordStream so
// the caching allocator does not hand the memory out again before the copy is done).
// Built by build.rs only when the libtorch in use has CUDA.
#include <ATen/ATen.h>
#include <c10/core/Event.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAStream.h>

// A new pinned host tensor shaped and typed like `like`, or null.
extern "C" at::Tensor* tuner_empty_pinned_like(const at::Tensor* like) {
  try {
    return new at::Tensor(at::empty(like->sizes(), like->options().device(at::kCPU).pinned_memory(true)));
  } catch (...) {
    return nullptr;
  }
}

// A new device tensor on `device` shaped and typed like `like`, or null.
extern "C" at::Tensor* tuner_empty_device_like(const at::Tensor* like, int device) {
  try {
    return new at::Tensor(at::empty(like->sizes(), like->options().device(at::Device(at::kCUDA, device))));
  } catch (...) {
    return nullptr;
  }
}

// dst ← src on a side stream of `device`, after the current stream's queued work; returns an
// event recorded when the copy is done (free it with tuner_event_free), or null.
extern "C" void* tuner_copy_on_side_stream(at::Tensor* dst, const at::Tensor* src, int device) {
  try {
    const auto dev = static_cast<c10::DeviceIndex>(device);
    auto main = c10::cuda::getCurrentCUDAStream(dev);
    auto side = c10::cuda::getStreamFromPool(false, dev);
    c10::Event ready(c10::DeviceType::CUDA);
    ready.record(main.unwrap());
    ready.block(side.unwrap());
    // The copy is queued on the side stream (made current for it, then restored).
    c10::cuda::setCurrentCUDAStream(side);
    try {
      dst->copy_(*src, /*non_blocking=*/true);
    } catch (...) {
      c10::cuda::setCurrentCUDAStream(main);
      throw;
    }
    c10::cuda::setCurrentCUDAStream(main);
    for (const at::Tensor* t : {static_cast<const at::Tensor*>(dst), src}) {
      if (t->is_cuda()) c10::cuda::CUDACachingAllocator::recordStream(t->storage().data_ptr(), side);
    }
    auto* done = new c10::Event(c10::DeviceType::CUDA);
    done->record(side.unwrap());
    return done;
  } catch (...) {
    return nullptr;
  }
}

// The current stream of `device` waits for `event` (without blocking the host).
extern "C" int tuner_event_wait(void* event, int device) {
  try {
    static_cast<c10::Event*>(event)->block(c10::cuda::getCurrentCUDAStream(static_cast<c10::DeviceIndex>(device)).unwrap());
    return 0;
  } catch (...) {
    return -1;
  }
}

extern "C" void tuner_event_free(void* event) { delete static_cast<c10::Event*>(event); }
