// Host shim: libtorch's current CUDA stream for a device, so tuner's NVRTC kernels
// (src/kernels/mod.rs) queue behind and ahead of libtorch's own work in order. Not a kernel.
// Built by build.rs only when the libtorch in use has CUDA.
#include <c10/cuda/CUDAStream.h>

extern "C" void* tuner_cuda_current_stream(int device) {
  try {
    return static_cast<void*>(c10::cuda::getCurrentCUDAStream(static_cast<c10::DeviceIndex>(device)).stream());
  } catch (...) {
    return nullptr;
  }
}
