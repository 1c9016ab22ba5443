// Gemma 3n's sparse GeGLU: the Gaussian top-k cutoff on the gate followed by the gated
// tanh-GELU, per row of I gate values (I a multiple of 8):
//   μ = mean(g),  σ = sqrt(mean((g − μ)²)),  cut = μ + k·σ,  z = max(g − cut, 0),
//   a = gelu_tanh(z) (rounded to the dtype, as torch's op leaves it),  h = a · u;
// and its backward for upstream dh, with m = [g > cut], dz = dh · u · gelu_tanh'(z) and
// S = Σ_i m_i · dz_i over the row:
//   du = dh · a,  dg_i = m_i · dz_i − S · (1/I + k · (g_i − μ) / (I · σ))   (the σ term 0 when σ = 0).
// k is Φ⁻¹(sparsity) (transformers' `Gemma3nTextMLP._gaussian_topk`). The forward writes μ and σ
// (f32, [R, 2]) for the backward. f32 math, one rounding per output; one block per row, 8
// elements per thread per step (16-byte loads for 2-byte dtypes when `wide`).
// CPU reference: src/kernels/topk_glu.rs (`reference`, `backward_reference`), docs/model-math.md §1.

__device__ __forceinline__ float gelu_tanh(float g) {
  const float k = 0.7978845608028654f;  // sqrt(2/pi)
  return 0.5f * g * (1.0f + tanhf(k * (g + 0.044715f * g * g * g)));
}

__device__ __forceinline__ float gelu_tanh_grad(float g) {
  const float k = 0.7978845608028654f;
  const float t = tanhf(k * (g + 0.044715f * g * g * g));
  return 0.5f * (1.0f + t) + 0.5f * g * (1.0f - t * t) * k * (1.0f + 3.0f * 0.044715f * g * g);
}

// Elements i..i+7 (i a multiple of 8) as f32.
__device__ __forceinline__ void load8(const void* p, long long i, int dt, int wide, float* f) {
  if (wide) {
    unpack8(((const uint4*)p)[i / 8], f, dt);
  } else {
#pragma unroll
    for (int k = 0; k < 8; k++) f[k] = ld(p, i + k, dt);
  }
}

__device__ __forceinline__ void store8(void* p, long long i, int dt, int wide, const float* f) {
  if (wide) {
    ((uint4*)p)[i / 8] = pack8(f, dt);
  } else {
#pragma unroll
    for (int k = 0; k < 8; k++) st(p, i + k, f[k], dt);
  }
}

// μ and σ of row `row` (every thread gets both).
__device__ __forceinline__ void row_stats(const void* g, long long row, int cols, int dt, int wide, float* scratch,
                                          float* mean, float* std) {
  const long long base = row * cols;
  float sum = 0.0f;
  for (int j = threadIdx.x * 8; j < cols; j += blockDim.x * 8) {
    float v[8];
    load8(g, base + j, dt, wide, v);
#pragma unroll
    for (int k = 0; k < 8; k++) sum += v[k];
  }
  const float mu = block_sum(sum, scratch) / cols;
  float sq = 0.0f;
  for (int j = threadIdx.x * 8; j < cols; j += blockDim.x * 8) {
    float v[8];
    load8(g, base + j, dt, wide, v);
#pragma unroll
    for (int k = 0; k < 8; k++) sq += (v[k] - mu) * (v[k] - mu);
  }
  *mean = mu;
  *std = sqrtf(block_sum(sq, scratch) / cols);
}

extern "C" __global__ void topk_glu_fwd(const void* __restrict__ g, const void* __restrict__ u, void* __restrict__ h,
                                        float* __restrict__ stats, int cols, float k, int dt, int wide) {
  __shared__ float scratch[32];
  const long long row = blockIdx.x, base = row * cols;
  float mu, sigma;
  row_stats(g, row, cols, dt, wide, scratch, &mu, &sigma);
  if (threadIdx.x == 0) {
    stats[2 * row] = mu;
    stats[2 * row + 1] = sigma;
  }
  const float cut = mu + k * sigma;
  for (int j = threadIdx.x * 8; j < cols; j += blockDim.x * 8) {
    float gv[8], uv[8], hv[8];
    load8(g, base + j, dt, wide, gv);
    load8(u, base + j, dt, wide, uv);
#pragma unroll
    for (int e = 0; e < 8; e++) hv[e] = rnd(gelu_tanh(fmaxf(gv[e] - cut, 0.0f)), dt) * uv[e];
    store8(h, base + j, dt, wide, hv);
  }
}

extern "C" __global__ void topk_glu_bwd(const void* __restrict__ dh, const void* __restrict__ g,
                                        const void* __restrict__ u, const float* __restrict__ stats,
                                        void* __restrict__ dg, void* __restrict__ du, int cols, float k, int dt,
                                        int wide) {
  __shared__ float scratch[32];
  const long long row = blockIdx.x, base = row * cols;
  const float mu = stats[2 * row], sigma = stats[2 * row + 1], cut = mu + k * sigma;
  float s = 0.0f;
  for (int j = threadIdx.x * 8; j < cols; j += blockDim.x * 8) {
    float gv[8], uv[8], dv[8], duv[8];
    load8(g, base + j, dt, wide, gv);
    load8(u, base + j, dt, wide, uv);
    load8(dh, base + j, dt, wide, dv);
#pragma unroll
    for (int e = 0; e < 8; e++) {
      const float z = gv[e] - cut;
      duv[e] = dv[e] * rnd(gelu_tanh(fmaxf(z, 0.0f)), dt);
      if (z > 0.0f) s += dv[e] * uv[e] * gelu_tanh_grad(z);
    }
    store8(du, base + j, dt, wide, duv);
  }
  const float total = block_sum(s, scratch);
  const float per = total / cols, slope = sigma > 0.0f ? total * k / (cols * sigma) : 0.0f;
  for (int j = threadIdx.x * 8; j < cols; j += blockDim.x * 8) {
    float gv[8], uv[8], dv[8], dgv[8];
    load8(g, base + j, dt, wide, gv);
    load8(u, base + j, dt, wide, uv);
    load8(dh, base + j, dt, wide, dv);
#pragma unroll
    for (int e = 0; e < 8; e++) {
      const float z = gv[e] - cut;
      const float dz = z > 0.0f ? dv[e] * uv[e] * gelu_tanh_grad(z) : 0.0f;
      dgv[e] = dz - per - slope * (gv[e] - mu);
    }
    store8(dg, base + j, dt, wide, dgv);
  }
}

// The backward with each thread's part of the row held in registers, for the 16-byte path
// (2-byte dtypes, 16-byte aligned) and rows of at most TG_NG · 8 · blockDim values (E4B's 16384
// at 1024 threads): g, u and dh are read once rather than twice (433 → 264 µs for E4B's
// [4096 × 16384] on an H200). A thread's values are visited in the order the kernel above visits
// them: the same sums, up to how the compiler fuses a product into them. (A forward of the same
// kind, reading g once instead of three times, measured slower than the one above, 209 vs
// 190 µs: its later passes over g hit the cache, and was dropped.)
#define TG_NG 2

extern "C" __global__ void __launch_bounds__(1024)
    topk_glu_bwd_r(const void* __restrict__ dh, const void* __restrict__ g, const void* __restrict__ u,
                   const float* __restrict__ stats, void* __restrict__ dg, void* __restrict__ du, int cols, float k,
                   int dt) {
  __shared__ float scratch[32];
  const long long row = blockIdx.x, base = row * cols;
  const float mu = stats[2 * row], sigma = stats[2 * row + 1], cut = mu + k * sigma;
  uint4 graw[TG_NG];
  float dz[TG_NG][8];
  float s = 0.0f;
#pragma unroll
  for (int q = 0; q < TG_NG; q++) {
    const int j = (q * blockDim.x + threadIdx.x) * 8;
    if (j < cols) {
      float gv[8], uv[8], dv[8], duv[8];
      graw[q] = ((const uint4*)g)[(base + j) / 8];
      unpack8(graw[q], gv, dt);
      unpack8(((const uint4*)u)[(base + j) / 8], uv, dt);
      unpack8(((const uint4*)dh)[(base + j) / 8], dv, dt);
#pragma unroll
      for (int e = 0; e < 8; e++) {
        const float z = gv[e] - cut;
        duv[e] = dv[e] * rnd(gelu_tanh(fmaxf(z, 0.0f)), dt);
        dz[q][e] = z > 0.0f ? dv[e] * uv[e] * gelu_tanh_grad(z) : 0.0f;
        if (z > 0.0f) s += dz[q][e];
      }
      ((uint4*)du)[(base + j) / 8] = pack8(duv, dt);
    }
  }
  const float total = block_sum(s, scratch);
  const float per = total / cols, slope = sigma > 0.0f ? total * k / (cols * sigma) : 0.0f;
#pragma unroll
  for (int q = 0; q < TG_NG; q++) {
    const int j = (q * blockDim.x + threadIdx.x) * 8;
    if (j < cols) {
      float gv[8], dgv[8];
      unpack8(graw[q], gv, dt);
#pragma unroll
      for (int e = 0; e < 8; e++) dgv[e] = dz[q][e] - per - slope * (gv[e] - mu);
      ((uint4*)dg)[(base + j) / 8] = pack8(dgv, dt);
    }
  }
}
