// 4-bit (NF4/FP4) blockwise dequantization, bitsandbytes layout, straight into the compute
// dtype. CPU reference: src/quant/blockwise.rs `dequantize_4bit` (then a cast), wrapped in
// src/kernels/dequant_4bit.rs; bitsandbytes `kDequantizeBlockwise` semantics (arch-spec §4):
//   w[e] = table[nibble(e)] · absmax[e / blocksize]   in f32, then rounded to the dtype,
// nibble(e): byte e/2, high nibble for even e. With double quantization
//   absmax[j] = code[qabsmax[j]] · nested_absmax[j / nested_blocksize] + offset.
//
// Each thread turns 4 packed bytes into 8 values (one 16-byte store in bf16/fp16); blocksize
// must be a multiple of 8 (bitsandbytes' are 32…4096), so the 8 values share one absmax. Both
// blocksizes are powers of two, passed as shifts: a 64-bit division per group cost more issue
// slots than the rest of the group's work (the kernel ran at 45% of copy bandwidth with them).
// Two entry points: `dequant_4bit`, flat and grid-stride (any length, a partial last group), and
// `dequant_4bit_rows`, one grid row per weight row, writing each row at a row stride `ld` of the
// output (a row's width a multiple of 8): so a weight can be dequantized into part of a wider
// buffer (the LoRA adapter's B beside it, src/model/linear.rs) without a copy.

__device__ __forceinline__ float block_absmax(long long j, const float* absmax, const unsigned char* qabsmax,
                                              const float* code, const float* nested_absmax, int nested_shift,
                                              float offset) {
  if (qabsmax == nullptr) return absmax[j];
  // _rn: no fused multiply-add, so the result equals the reference's separate f32 ops bit for bit.
  return __fadd_rn(__fmul_rn(code[qabsmax[j]], nested_absmax[j >> nested_shift]), offset);
}

// The 8 values of full group g (bytes 4g..4g+3, all below n) scaled by `scale`, stored.
__device__ __forceinline__ void dequant_group(unsigned int packed, float scale, const float* lut, void* out,
                                              long long e0, int dt) {
  float v[8];
#pragma unroll
  for (int k = 0; k < 4; k++) {
    const unsigned int byte = (packed >> (8 * k)) & 0xffu;
    v[2 * k] = lut[byte >> 4] * scale;
    v[2 * k + 1] = lut[byte & 15u] * scale;
  }
  if (dt == DT_F32) {
    float4* o = (float4*)((float*)out + e0);
    o[0] = make_float4(v[0], v[1], v[2], v[3]);
    o[1] = make_float4(v[4], v[5], v[6], v[7]);
  } else {
    *(uint4*)((unsigned short*)out + e0) = pack8(v, dt);
  }
}

// The last, partial group (fewer than 8 values from e0 to n), one value at a time.
__device__ __forceinline__ void dequant_tail(const unsigned char* codes, long long e0, long long n, float scale,
                                             const float* lut, void* out, int dt) {
  for (long long e = e0; e < n; e++) {
    const unsigned int byte = codes[e / 2];
    const unsigned int nib = (e & 1) ? (byte & 15u) : (byte >> 4);
    st(out, e, lut[nib] * scale, dt);
  }
}

// The 16-entry code table into shared memory (every thread of the block waits for it).
__device__ __forceinline__ void stage_table(const float* table, float* lut) {
  if (threadIdx.x < 16) lut[threadIdx.x] = table[threadIdx.x];
  __syncthreads();
}

extern "C" __global__ void dequant_4bit(const unsigned char* __restrict__ codes, long long n, int bs_shift,
                                        const float* __restrict__ absmax, const unsigned char* __restrict__ qabsmax,
                                        const float* __restrict__ code, const float* __restrict__ nested_absmax,
                                        int nested_shift, float offset, const float* __restrict__ table,
                                        void* __restrict__ out, int dt) {
  __shared__ float lut[16];
  stage_table(table, lut);
  const long long groups = (n + 7) >> 3;  // 8 values = 4 bytes each
  const long long stride = (long long)gridDim.x * blockDim.x;
  for (long long g = (long long)blockIdx.x * blockDim.x + threadIdx.x; g < groups; g += stride) {
    const long long e0 = g << 3;
    const float scale = block_absmax(e0 >> bs_shift, absmax, qabsmax, code, nested_absmax, nested_shift, offset);
    if (e0 + 8 <= n) {
      dequant_group(((const unsigned int*)codes)[g], scale, lut, out, e0, dt);  // bytes 4g..4g+3, little endian
    } else {
      dequant_tail(codes, e0, n, scale, lut, out, dt);
    }
  }
}

// Row blockIdx.y of a [rows, cols] weight (cols a multiple of 8) into out[row · ld + col]. Each
// thread takes up to ROW_GROUPS groups of its row, blockDim.x groups apart (each warp's loads and
// stores stay contiguous), and issues all of their loads before its first store: with one group
// per thread, each thread had a single 4-byte load in flight and the kernel stalled on it.
#define ROW_GROUPS 4
extern "C" __global__ void dequant_4bit_rows(const unsigned char* __restrict__ codes, int cols, long long ld,
                                             int bs_shift, const float* __restrict__ absmax,
                                             const unsigned char* __restrict__ qabsmax,
                                             const float* __restrict__ code, const float* __restrict__ nested_absmax,
                                             int nested_shift, float offset, const float* __restrict__ table,
                                             void* __restrict__ out, int dt) {
  __shared__ float lut[16];
  stage_table(table, lut);
  const int groups = cols >> 3;  // of this row
  const long long row = blockIdx.y;
  const long long first = row * groups;  // the row's first group in the whole weight
  const int g0 = blockIdx.x * blockDim.x * ROW_GROUPS + threadIdx.x;
  unsigned int packed[ROW_GROUPS];
  float scale[ROW_GROUPS];
#pragma unroll
  for (int k = 0; k < ROW_GROUPS; k++) {
    const int g = g0 + k * blockDim.x;
    if (g < groups) {
      packed[k] = ((const unsigned int*)codes)[first + g];  // bytes 4g..4g+3 of the row, little endian
      scale[k] = block_absmax(((first + g) << 3) >> bs_shift, absmax, qabsmax, code, nested_absmax, nested_shift,
                              offset);
    }
  }
#pragma unroll
  for (int k = 0; k < ROW_GROUPS; k++) {
    const int g = g0 + k * blockDim.x;
    if (g < groups) dequant_group(packed[k], scale[k], lut, out, row * ld + ((long long)g << 3), dt);
  }
}
