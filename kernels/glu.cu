// Gated MLP activation h = act(g) · u (SwiGLU: act = SiLU; GeGLU: act = tanh-approximated
// GELU), forward and backward; the backward recomputes act(g) from g instead of storing it.
// CPU reference: src/kernels/glu.rs (`forward_reference`, `backward_reference`), following
// transformers' `LlamaMLP` / `Gemma2MLP` (arch-spec §0–2). As torch does, act(g) is rounded
// to the dtype before the product; the backward is in f32 with one rounding per output:
//   du = dh · act(g),  dg = dh · u · act'(g).
#define ACT_SILU 0
#define ACT_GELU_TANH 1

__device__ __forceinline__ float act_fwd(float g, int act) {
  if (act == ACT_SILU) return g / (1.0f + expf(-g));
  const float k = 0.7978845608028654f;  // sqrt(2/pi)
  return 0.5f * g * (1.0f + tanhf(k * (g + 0.044715f * g * g * g)));
}

__device__ __forceinline__ float act_grad(float g, int act) {
  if (act == ACT_SILU) {
    const float s = 1.0f / (1.0f + expf(-g));
    return s * (1.0f + g * (1.0f - s));
  }
  const float k = 0.7978845608028654f;
  const float t = tanhf(k * (g + 0.044715f * g * g * g));
  return 0.5f * (1.0f + t) + 0.5f * g * (1.0f - t * t) * k * (1.0f + 3.0f * 0.044715f * g * g);
}

extern "C" __global__ void glu_fwd(const void* __restrict__ g, const void* __restrict__ u, void* __restrict__ h,
                                   long long n, int act, int dt) {
  const long long stride = (long long)gridDim.x * blockDim.x;
  for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
    const float a = rnd(act_fwd(ld(g, i, dt), act), dt);
    st(h, i, a * ld(u, i, dt), dt);
  }
}

extern "C" __global__ void glu_bwd(const void* __restrict__ dh, const void* __restrict__ g, const void* __restrict__ u,
                                   void* __restrict__ dg, void* __restrict__ du, long long n, int act, int dt) {
  const long long stride = (long long)gridDim.x * blockDim.x;
  for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
    const float gv = ld(g, i, dt), d = ld(dh, i, dt);
    st(du, i, d * rnd(act_fwd(gv, act), dt), dt);
    st(dg, i, d * ld(u, i, dt) * act_grad(gv, act), dt);
  }
}

// 8 values per thread with 16-byte loads and stores (prelude's unpack8/pack8), for 2-byte dtypes
// when n is a multiple of 8 and the tensors are 16-byte aligned (the launcher checks); the
// kernels above cover the rest.
extern "C" __global__ void glu_fwd_x8(const uint4* __restrict__ g, const uint4* __restrict__ u, uint4* __restrict__ h,
                                      long long n8, int act, int dt) {
  const long long stride = (long long)gridDim.x * blockDim.x;
  for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n8; i += stride) {
    float gf[8], uf[8], hf[8];
    unpack8(g[i], gf, dt);
    unpack8(u[i], uf, dt);
#pragma unroll
    for (int k = 0; k < 8; k++) hf[k] = rnd(act_fwd(gf[k], act), dt) * uf[k];
    h[i] = pack8(hf, dt);
  }
}

extern "C" __global__ void glu_bwd_x8(const uint4* __restrict__ dh, const uint4* __restrict__ g, const uint4* __restrict__ u,
                                      uint4* __restrict__ dg, uint4* __restrict__ du, long long n8, int act, int dt) {
  const long long stride = (long long)gridDim.x * blockDim.x;
  for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n8; i += stride) {
    float d[8], gf[8], uf[8], dgf[8], duf[8];
    unpack8(dh[i], d, dt);
    unpack8(g[i], gf, dt);
    unpack8(u[i], uf, dt);
#pragma unroll
    for (int k = 0; k < 8; k++) {
      duf[k] = d[k] * rnd(act_fwd(gf[k], act), dt);
      dgf[k] = d[k] * uf[k] * act_grad(gf[k], act);
    }
    dg[i] = pack8(dgf, dt);
    du[i] = pack8(duf, dt);
  }
}
