// Gemma 3n AltUp predict: the N streams of one token mixed by that token's coefficients,
//   pred[p, h] = s[p, h] + Σ_q r[p, q] · s[q, h]      (p, q < N ≤ 4, h < H),
// and its backward for upstream dp:
//   ds[q, h] = dp[q, h] + Σ_p r[p, q] · dp[p, h],     dr[p, q] = Σ_h dp[p, h] · s[q, h].
// s, pred, dp, ds are [R, N, H]; r, dr are [R, N, N] (R = tokens). f32 math, one rounding per
// output. One block per token; the dr sums are block reductions.
// CPU reference: src/kernels/altup_predict.rs (`reference`, `backward_reference`), following
// transformers' `Gemma3nTextAltUp.predict` (docs/model-math.md §1).
#define ALTUP_MAX_N 4

extern "C" __global__ void altup_predict_fwd(const void* __restrict__ s, const void* __restrict__ r,
                                             void* __restrict__ pred, int n, int h, int dt) {
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
    }
  }
}

extern "C" __global__ void altup_predict_bwd(const void* __restrict__ dp, const void* __restrict__ s,
                                             const void* __restrict__ r, void* __restrict__ ds, void* __restrict__ dr,
                                             int n, int h, int dt) {
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
