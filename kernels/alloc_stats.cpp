// Host shim: reads libtorch's CUDA caching-allocator statistics (what
// torch.cuda.max_memory_allocated reports), which tch does not expose.
// Not a kernel; it lives here because it is the project's only C++ besides the
// .cu kernels. Built by build.rs only when the libtorch in use has CUDA.
//
// out[0] allocated bytes now, out[1] peak allocated, out[2] reserved now, out[3] peak reserved.
#include <c10/cuda/CUDACachingAllocator.h>
#include <cstdint>

extern "C" int tuner_cuda_mem_stats(int device, int64_t* out) {
  try {
    auto s = c10::cuda::CUDACachingAllocator::getDeviceStats(static_cast<c10::DeviceIndex>(device));
    const auto agg = static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE);
    out[0] = s.allocated_bytes[agg].current;
    out[1] = s.allocated_bytes[agg].peak;
    out[2] = s.reserved_bytes[agg].current;
    out[3] = s.reserved_bytes[agg].peak;
    return 0;
  } catch (...) {
    return -1;
  }
}

extern "C" int tuner_cuda_reset_peak(int device) {
  try {
    c10::cuda::CUDACachingAllocator::resetPeakStats(static_cast<c10::DeviceIndex>(device));
    return 0;
  } catch (...) {
    return -1;
  }
}
