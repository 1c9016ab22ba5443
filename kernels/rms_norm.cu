// Fused RMSNorm over the last dimension, forward and backward (for a frozen weight: the
// backward gives dx only). One thread block per row; sums in f32.
// CPU reference: src/kernels/rms_norm.rs (`forward_reference`, `backward_reference`), which
// follow transformers' `LlamaRMSNorm` / `Gemma2RMSNorm` / `Gemma3nRMSNorm` (arch-spec §0–2).
//
// Modes (how the weight enters), xn = x · rstd in f32, rstd = rsqrt(mean(x²) + eps):
//   0  Llama:   y = w · round(xn)        (downcast before the weight, product rounded again)
//   1  f32 scale (Gemma's 1 + w, Gemma 3n's w, kept in f32):  y = round(xn · s)
//   2  no weight (Gemma 3n's v_norm):                         y = round(xn)
// Backward (the weight frozen; Llama's inner rounding taken as exact):
//   dxn = dy · s,  dx = rstd · (dxn − xn · mean(dxn · xn)).

extern "C" __global__ void rms_norm_fwd(const void* __restrict__ x, const void* __restrict__ w, void* __restrict__ y,
                                        float* __restrict__ rstd_out, int h, float eps, int mode, int dt, int wdt) {
  __shared__ float scratch[32];
  const long long row = blockIdx.x;
  const void* xr = (const char*)x + row * h * (dt == DT_F32 ? 4 : 2);
  void* yr = (char*)y + row * h * (dt == DT_F32 ? 4 : 2);
  float ss = 0.0f;
  for (int i = threadIdx.x; i < h; i += blockDim.x) {
    const float v = ld(xr, i, dt);
    ss += v * v;
  }
  // sqrt then divide (both correctly rounded), as torch computes rsqrt on the CPU.
  const float r = 1.0f / sqrtf(block_sum(ss, scratch) / (float)h + eps);
  for (int i = threadIdx.x; i < h; i += blockDim.x) {
    const float xn = ld(xr, i, dt) * r;
    float out;
    if (mode == 0) out = ld(w, i, wdt) * rnd(xn, dt);
    else if (mode == 1) out = xn * ld(w, i, wdt);
    else out = xn;
    st(yr, i, out, dt);
  }
  if (rstd_out != nullptr && threadIdx.x == 0) rstd_out[row] = r;
}

extern "C" __global__ void rms_norm_bwd(const void* __restrict__ dy, const void* __restrict__ x, const void* __restrict__ w,
                                        const float* __restrict__ rstd, void* __restrict__ dx, int h, int mode, int dt,
                                        int wdt) {
  __shared__ float scratch[32];
  const long long row = blockIdx.x;
  const long long off = row * h;
  const float r = rstd[row];
  float dot = 0.0f;
  for (int i = threadIdx.x; i < h; i += blockDim.x) {
    const float s = mode == 2 ? 1.0f : ld(w, i, wdt);
    dot += ld(dy, off + i, dt) * s * ld(x, off + i, dt) * r;
  }
  const float mean = block_sum(dot, scratch) / (float)h;
  for (int i = threadIdx.x; i < h; i += blockDim.x) {
    const float s = mode == 2 ? 1.0f : ld(w, i, wdt);
    const float xn = ld(x, off + i, dt) * r;
    st(dx, off + i, r * (ld(dy, off + i, dt) * s - xn * mean), dt);
  }
}

// 8 values per thread and load (16-byte loads and stores, prelude's unpack8/pack8), for 2-byte
// dtypes when h is a multiple of 8 and the rows are 16-byte aligned (the launcher checks). The
// arithmetic is the kernels' above except the order in which the f32 sums are accumulated.
// `tuner kernels --bench` checks and times them beside the scalar ones; not yet the default.
extern "C" __global__ void rms_norm_fwd_x8(const uint4* __restrict__ x, const void* __restrict__ w, uint4* __restrict__ y,
                                           float* __restrict__ rstd_out, int h, float eps, int mode, int dt, int wdt) {
  __shared__ float scratch[32];
  const int h8 = h / 8;
  const long long row = blockIdx.x;
  const uint4* xr = x + row * h8;
  uint4* yr = y + row * h8;
  float ss = 0.0f;
  for (int i = threadIdx.x; i < h8; i += blockDim.x) {
    float v[8];
    unpack8(xr[i], v, dt);
#pragma unroll
    for (int k = 0; k < 8; k++) ss += v[k] * v[k];
  }
  const float r = 1.0f / sqrtf(block_sum(ss, scratch) / (float)h + eps);
  for (int i = threadIdx.x; i < h8; i += blockDim.x) {
    float v[8], o[8];
    unpack8(xr[i], v, dt);
#pragma unroll
    for (int k = 0; k < 8; k++) {
      const float xn = v[k] * r;
      const int j = 8 * i + k;
      if (mode == 0) o[k] = ld(w, j, wdt) * rnd(xn, dt);
      else if (mode == 1) o[k] = xn * ld(w, j, wdt);
      else o[k] = xn;
    }
    yr[i] = pack8(o, dt);
  }
  if (rstd_out != nullptr && threadIdx.x == 0) rstd_out[row] = r;
}

extern "C" __global__ void rms_norm_bwd_x8(const uint4* __restrict__ dy, const uint4* __restrict__ x, const void* __restrict__ w,
                                           const float* __restrict__ rstd, uint4* __restrict__ dx, int h, int mode, int dt,
                                           int wdt) {
  __shared__ float scratch[32];
  const int h8 = h / 8;
  const long long off = (long long)blockIdx.x * h8;
  const float r = rstd[blockIdx.x];
  float dot = 0.0f;
  for (int i = threadIdx.x; i < h8; i += blockDim.x) {
    float d[8], v[8];
    unpack8(dy[off + i], d, dt);
    unpack8(x[off + i], v, dt);
#pragma unroll
    for (int k = 0; k < 8; k++) {
      const float s = mode == 2 ? 1.0f : ld(w, 8 * i + k, wdt);
      dot += d[k] * s * v[k] * r;
    }
  }
  const float mean = block_sum(dot, scratch) / (float)h;
  for (int i = threadIdx.x; i < h8; i += blockDim.x) {
    float d[8], v[8], o[8];
    unpack8(dy[off + i], d, dt);
    unpack8(x[off + i], v, dt);
#pragma unroll
    for (int k = 0; k < 8; k++) {
      const float s = mode == 2 ? 1.0f : ld(w, 8 * i + k, wdt);
      o[k] = r * (d[k] * s - v[k] * r * mean);
    }
    dx[off + i] = pack8(o, dt);
  }
}
