// Prelude prepended to every kernel source before NVRTC compiles it (src/kernels/mod.rs):
// element loads and stores for the three compute dtypes, converted through f32.
// Conversions round to nearest even, as c10's BFloat16/Half casts do, so a kernel whose f32
// math equals the reference's produces the reference's bits.
//
// Dtype codes (DT_*): 0 = float32, 1 = bfloat16, 2 = float16.
#define DT_F32 0
#define DT_BF16 1
#define DT_F16 2

__device__ __forceinline__ float bf16_to_f32(unsigned short v) { return __uint_as_float(((unsigned int)v) << 16); }

__device__ __forceinline__ unsigned short f32_to_bf16(float f) {
  unsigned int u = __float_as_uint(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;  // NaN, as c10 writes it
  u += 0x7fffu + ((u >> 16) & 1u);
  return (unsigned short)(u >> 16);
}

__device__ __forceinline__ float f16_to_f32(unsigned short h) {
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
  return f;
}

__device__ __forceinline__ unsigned short f32_to_f16(float f) {
  unsigned short h;
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
  return h;
}

// Element i of a tensor of dtype dt, as f32.
__device__ __forceinline__ float ld(const void* p, long long i, int dt) {
  if (dt == DT_BF16) return bf16_to_f32(((const unsigned short*)p)[i]);
  if (dt == DT_F16) return f16_to_f32(((const unsigned short*)p)[i]);
  return ((const float*)p)[i];
}

// Store v into element i of a tensor of dtype dt (rounded to nearest even).
__device__ __forceinline__ void st(void* p, long long i, float v, int dt) {
  if (dt == DT_BF16) ((unsigned short*)p)[i] = f32_to_bf16(v);
  else if (dt == DT_F16) ((unsigned short*)p)[i] = f32_to_f16(v);
  else ((float*)p)[i] = v;
}

// v rounded to dtype dt and back (what a torch op producing a dt tensor leaves).
__device__ __forceinline__ float rnd(float v, int dt) {
  if (dt == DT_BF16) return bf16_to_f32(f32_to_bf16(v));
  if (dt == DT_F16) return f16_to_f32(f32_to_f16(v));
  return v;
}

// Eight 2-byte elements (bf16 or fp16 per dt) of one 16-byte word, as f32, and back (rounded).
__device__ __forceinline__ void unpack8(uint4 v, float* f, int dt) {
  const unsigned int w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int k = 0; k < 4; k++) {
    const unsigned short lo = w[k] & 0xffffu, hi = w[k] >> 16;
    f[2 * k] = dt == DT_BF16 ? bf16_to_f32(lo) : f16_to_f32(lo);
    f[2 * k + 1] = dt == DT_BF16 ? bf16_to_f32(hi) : f16_to_f32(hi);
  }
}

__device__ __forceinline__ uint4 pack8(const float* f, int dt) {
  unsigned int w[4];
#pragma unroll
  for (int k = 0; k < 4; k++) {
#if __CUDA_ARCH__ >= 800
    // One conversion instruction per pair: round to nearest even as the scalar conversions
    // above do, for every finite value (a NaN comes out as the canonical 0x7fff rather than
    // c10's payload; still a NaN). Fewer issue slots than the integer rounding, which bounded
    // the memory-bound kernels' rates.
    if (dt == DT_BF16) {
      asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(w[k]) : "f"(f[2 * k + 1]), "f"(f[2 * k]));
    } else {
      asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(w[k]) : "f"(f[2 * k + 1]), "f"(f[2 * k]));
    }
#else
    const unsigned short lo = dt == DT_BF16 ? f32_to_bf16(f[2 * k]) : f32_to_f16(f[2 * k]);
    const unsigned short hi = dt == DT_BF16 ? f32_to_bf16(f[2 * k + 1]) : f32_to_f16(f[2 * k + 1]);
    w[k] = (unsigned int)lo | ((unsigned int)hi << 16);
#endif
  }
  return make_uint4(w[0], w[1], w[2], w[3]);
}

// Sum of v over the thread block (blockDim.x a multiple of 32, at most 1024); every thread
// gets the total. `scratch` holds 32 floats of shared memory.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  const int warps = blockDim.x >> 5;
  v = lane < warps ? scratch[lane] : 0.0f;
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
