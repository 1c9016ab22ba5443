// Host shim: libtorch's current CUDA stream for a device, so tuner's NVRTC kernels
// (src/kernels/mod.rs) queue behind and ahead of libtorch's own work in order. Not a kernel.
// Built by build.rs only when the libtorch in use has CUDA.
#include <c10/cuda/CUDAStream.h>

// Writes the stream handle to *out (null is a valid handle: the legacy default stream of any
// device); returns 0, or -1 when libtorch refuses (no such device).
extern "C" int tuner_cuda_current_stream(int device, void** out) {
  try {
    *out = static_cast<void*>(c10::cuda::getCurrentCUDAStream(static_cast<c10::DeviceIndex>(device)).stream());
    return 0;
  } catch (...) {
    return -1;
  }
}
