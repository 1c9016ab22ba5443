// Cross-entropy of one row of logits per target, with the optional final softcap, and its
// gradient written over the logits in place (the lm_head's backward reads it next):
//   z = c·tanh(x/c) (z = x without a cap),  lse = log Σ_v exp(z_v),  nll = lse − z_t,
//   dx_v = scale · (exp(z_v − lse) − [v = t]) · (1 − (z_v/c)²)   (the last factor 1 without a cap).
// A row whose target is negative (ignored) gets nll 0 and a zero gradient. x is [R, V] (V a
// multiple of 8 and rows 16-byte aligned for the 2-byte dtypes' 16-byte loads, which `wide`
// selects), t is [R] int64, nll is [R] f32. f32 math; one block per row: pass 1 an online
// max / sum of exponentials per thread, combined over the block; pass 2 the gradient.
// CPU reference: src/kernels/cross_entropy.rs (`reference`), which is torch's
// `cross_entropy(softcap(logits).float(), targets, reduction="sum")` and its autograd backward
// (transformers' `ForCausalLMLoss` on the Gemma 2/3/3n final softcap, docs/model-math.md §1).

#define CE_NEG_INF __int_as_float(0xff800000)

__device__ __forceinline__ float capped(float x, float cap) { return cap > 0.0f ? cap * tanhf(x / cap) : x; }

// (m, s) ⊕ (m2, s2) for running maxima m and sums s of exp(· − m).
__device__ __forceinline__ void lse_merge(float& m, float& s, float m2, float s2) {
  const float mx = fmaxf(m, m2);
  if (mx == CE_NEG_INF) return;
  s = s * expf(m - mx) + s2 * expf(m2 - mx);
  m = mx;
}

__device__ __forceinline__ void load8x(const void* p, long long i, int dt, int wide, float* f) {
  if (wide) {
    unpack8(((const uint4*)p)[i / 8], f, dt);
  } else {
#pragma unroll
    for (int k = 0; k < 8; k++) f[k] = ld(p, i + k, dt);
  }
}

extern "C" __global__ void cross_entropy(void* __restrict__ x, const long long* __restrict__ targets,
                                         float* __restrict__ nll, int v, float cap, float scale, int dt, int wide) {
  __shared__ float sm[32], ss[32];
  __shared__ float row_lse;
  const long long row = blockIdx.x, base = row * (long long)v;
  const long long t = targets[row];
  if (t < 0) {
    for (int j = threadIdx.x * 8; j < v; j += blockDim.x * 8) {
      float z[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      if (wide) ((uint4*)x)[(base + j) / 8] = pack8(z, dt);
      else for (int k = 0; k < 8; k++) st(x, base + j + k, 0.0f, dt);
    }
    if (threadIdx.x == 0) nll[row] = 0.0f;
    return;
  }
  const float zt = capped(ld(x, base + t, dt), cap);
  float m = CE_NEG_INF, s = 0.0f;
  for (int j = threadIdx.x * 8; j < v; j += blockDim.x * 8) {
    float f[8];
    load8x(x, base + j, dt, wide, f);
    float mx = CE_NEG_INF;
#pragma unroll
    for (int k = 0; k < 8; k++) {
      f[k] = capped(f[k], cap);
      mx = fmaxf(mx, f[k]);
    }
    float sum = 0.0f;
#pragma unroll
    for (int k = 0; k < 8; k++) sum += expf(f[k] - mx);
    lse_merge(m, s, mx, sum);
  }
  for (int o = 16; o > 0; o >>= 1) {
    const float m2 = __shfl_xor_sync(0xffffffffu, m, o), s2 = __shfl_xor_sync(0xffffffffu, s, o);
    lse_merge(m, s, m2, s2);
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  if (lane == 0) {
    sm[warp] = m;
    ss[warp] = s;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    float M = CE_NEG_INF, S = 0.0f;
    for (int w = 0; w < warps; w++) lse_merge(M, S, sm[w], ss[w]);
    row_lse = M + logf(S);
    nll[row] = row_lse - zt;
  }
  __syncthreads();
  const float lse = row_lse;
  for (int j = threadIdx.x * 8; j < v; j += blockDim.x * 8) {
    float f[8];
    load8x(x, base + j, dt, wide, f);
#pragma unroll
    for (int k = 0; k < 8; k++) {
      const float z = capped(f[k], cap);
      float g = expf(z - lse) - (j + k == t ? 1.0f : 0.0f);
      if (cap > 0.0f) g *= 1.0f - (z / cap) * (z / cap);
      f[k] = scale * g;
    }
    if (wide) ((uint4*)x)[(base + j) / 8] = pack8(f, dt);
    else for (int k = 0; k < 8; k++) st(x, base + j + k, f[k], dt);
  }
}
