// Gemma 3n AltUp predict: the N streams of one token mixed by that token's coefficients,
//   pred[p, h] = s[p, h] + Σ_q r[p, q] · s[q, h]      (p, q < N ≤ 4, h < H),
// with the active stream a = pred[0] also written as its own [R, H] tensor when `a` is not null
// (the layer reads it contiguous: input norm, residual, AltUp's first prediction), and its
// backward for upstream dp and the active stream's own upstream da (null: none), d = dp + [p = 0]·da:
//   ds[q, h] = d[q, h] + Σ_p r[p, q] · d[p, h],       dr[p, q] = Σ_h d[p, h] · s[q, h].
// s, pred, dp, ds are [R, N, H]; a, da are [R, H]; r, dr are [R, N, N] (R = tokens). f32 math,
// one rounding per output. One block per token; the dr sums are block reductions.
// CPU reference: src/kernels/altup_predict.rs (`reference`, `backward_reference`), following
// transformers' `Gemma3nTextAltUp.predict` (docs/model-math.md §1).
#define ALTUP_MAX_N 4

extern "C" __global__ void altup_predict_fwd(const void* __restrict__ s, const void* __restrict__ r,
                                             void* __restrict__ pred, void* __restrict__ a, int n, int h, int dt) {
  const long long row = blockIdx.x;
  float c[ALTUP_MAX_N][ALTUP_MAX_N];
  for (int p = 0; p < n; p++)
    for (int q = 0; q < n; q++) c[p][q] = ld(r, row * n * n + p * n + q, dt);
  const long long base = row * n * h;
  for (int j = threadIdx.x; j < h; j += blockDim.x) {
    float v[ALTUP_MAX_N];
    for (int q = 0; q < n; q++) v[q] = ld(s, base + (long long)q * h + j, dt);
    for (int p = 0; p < n; p++) {
      float acc = v[p];
      for (int q = 0; q < n; q++) acc += c[p][q] * v[q];
      st(pred, base + (long long)p * h + j, acc, dt);
      if (p == 0 && a != nullptr) st(a, row * h + j, acc, dt);
    }
  }
}

extern "C" __global__ void altup_predict_bwd(const void* __restrict__ dp, const void* __restrict__ da,
                                             const void* __restrict__ s, const void* __restrict__ r,
                                             void* __restrict__ ds, void* __restrict__ dr, int n, int h, int dt) {
  __shared__ float scratch[32];
  const long long row = blockIdx.x;
  float c[ALTUP_MAX_N][ALTUP_MAX_N], acc[ALTUP_MAX_N][ALTUP_MAX_N];
  for (int p = 0; p < n; p++)
    for (int q = 0; q < n; q++) {
      c[p][q] = ld(r, row * n * n + p * n + q, dt);
      acc[p][q] = 0.0f;
    }
  const long long base = row * n * h;
  for (int j = threadIdx.x; j < h; j += blockDim.x) {
    float d[ALTUP_MAX_N], v[ALTUP_MAX_N];
    for (int q = 0; q < n; q++) {
      d[q] = ld(dp, base + (long long)q * h + j, dt);
      v[q] = ld(s, base + (long long)q * h + j, dt);
    }
    if (da != nullptr) d[0] += ld(da, row * h + j, dt);
    for (int q = 0; q < n; q++) {
      float g = d[q];
      for (int p = 0; p < n; p++) g += c[p][q] * d[p];
      st(ds, base + (long long)q * h + j, g, dt);
    }
    for (int p = 0; p < n; p++)
      for (int q = 0; q < n; q++) acc[p][q] += d[p] * v[q];
  }
  for (int p = 0; p < n; p++)
    for (int q = 0; q < n; q++) {
      const float total = block_sum(acc[p][q], scratch);
      if (threadIdx.x == 0) st(dr, row * n * n + p * n + q, total, dt);
    }
}

// E4B's case, 16-byte loads: N = 4 streams, 2-byte dtype, H a multiple of 8 and 16-byte
// aligned rows (the launcher checks). Each thread takes 8 columns of all 4 streams; the dr
// partials are reduced per warp with shuffles, then across warps through shared memory once.
#define N4 4

extern "C" __global__ void altup_predict_fwd_x8(const uint4* __restrict__ s, const void* __restrict__ r,
                                                uint4* __restrict__ pred, uint4* __restrict__ a, int h8, int dt) {
  const long long row = blockIdx.x;
  float c[N4][N4];
#pragma unroll
  for (int p = 0; p < N4; p++)
#pragma unroll
    for (int q = 0; q < N4; q++) c[p][q] = ld(r, row * N4 * N4 + p * N4 + q, dt);
  const long long base = row * N4 * h8;
  for (int j = threadIdx.x; j < h8; j += blockDim.x) {
    float v[N4][8];
#pragma unroll
    for (int q = 0; q < N4; q++) unpack8(s[base + (long long)q * h8 + j], v[q], dt);
#pragma unroll
    for (int p = 0; p < N4; p++) {
      float o[8];
#pragma unroll
      for (int e = 0; e < 8; e++) {
        float acc = v[p][e];
#pragma unroll
        for (int q = 0; q < N4; q++) acc += c[p][q] * v[q][e];
        o[e] = acc;
      }
      const uint4 packed = pack8(o, dt);
      pred[base + (long long)p * h8 + j] = packed;
      if (p == 0 && a != nullptr) a[row * h8 + j] = packed;
    }
  }
}

extern "C" __global__ void altup_predict_bwd_x8(const uint4* __restrict__ dp, const uint4* __restrict__ da,
                                                const uint4* __restrict__ s, const void* __restrict__ r,
                                                uint4* __restrict__ ds, void* __restrict__ dr, int h8, int dt) {
  __shared__ float partial[32][N4 * N4];
  const long long row = blockIdx.x;
  float c[N4][N4], acc[N4][N4];
#pragma unroll
  for (int p = 0; p < N4; p++)
#pragma unroll
    for (int q = 0; q < N4; q++) {
      c[p][q] = ld(r, row * N4 * N4 + p * N4 + q, dt);
      acc[p][q] = 0.0f;
    }
  const long long base = row * N4 * h8;
  for (int j = threadIdx.x; j < h8; j += blockDim.x) {
    float d[N4][8], v[N4][8];
#pragma unroll
    for (int q = 0; q < N4; q++) {
      unpack8(dp[base + (long long)q * h8 + j], d[q], dt);
      unpack8(s[base + (long long)q * h8 + j], v[q], dt);
    }
    if (da != nullptr) {
      float x[8];
      unpack8(da[row * h8 + j], x, dt);
#pragma unroll
      for (int e = 0; e < 8; e++) d[0][e] += x[e];
    }
#pragma unroll
    for (int q = 0; q < N4; q++) {
      float g[8];
#pragma unroll
      for (int e = 0; e < 8; e++) {
        float t = d[q][e];
#pragma unroll
        for (int p = 0; p < N4; p++) t += c[p][q] * d[p][e];
        g[e] = t;
      }
      ds[base + (long long)q * h8 + j] = pack8(g, dt);
    }
#pragma unroll
    for (int p = 0; p < N4; p++)
#pragma unroll
      for (int q = 0; q < N4; q++)
#pragma unroll
        for (int e = 0; e < 8; e++) acc[p][q] += d[p][e] * v[q][e];
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
#pragma unroll
  for (int p = 0; p < N4; p++)
#pragma unroll
    for (int q = 0; q < N4; q++) {
      float x = acc[p][q];
      for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
      if (lane == 0) partial[warp][p * N4 + q] = x;
    }
  __syncthreads();
  if (threadIdx.x < N4 * N4) {
    float total = 0.0f;
    for (int w = 0; w < warps; w++) total += partial[w][threadIdx.x];
    st(dr, row * N4 * N4 + threadIdx.x, total, dt);
  }
}
