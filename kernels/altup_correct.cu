// Gemma 3n AltUp correct with the per-layer input added to the non-active streams:
//   y[p, h] = pred[p, h] + c[p] · (out[h] − pred[0, h]) + [p > 0] · g[h],
// and its backward for upstream dy, with e = out − pred[0] and de[h] = Σ_p c[p] · dy[p, h]:
//   dpred[p, h] = dy[p, h] − [p = 0] · de[h],  dout = de,  dg[h] = Σ_{p>0} dy[p, h],
//   dc[p] = Σ_h dy[p, h] · e[h].
// pred, y, dy, dpred are [R, N, H]; out, g, dout, dg are [R, H]; c, dc are [R, N] (R = tokens;
// c is the correction coefficient plus one). f32 math, one rounding per output. One block per
// token; the dc sums are block reductions.
// CPU reference: src/kernels/altup_correct.rs (`reference`, `backward_reference`), following
// transformers' `Gemma3nTextAltUp.correct` and the decoder layer's per-layer-input add
// (docs/model-math.md §1).
#define ALTUP_MAX_N 4

extern "C" __global__ void altup_correct_fwd(const void* __restrict__ pred, const void* __restrict__ out,
                                             const void* __restrict__ c, const void* __restrict__ g,
                                             void* __restrict__ y, int n, int h, int dt) {
  const long long row = blockIdx.x;
  float cf[ALTUP_MAX_N];
  for (int p = 0; p < n; p++) cf[p] = ld(c, row * n + p, dt);
  const long long base = row * n * h, flat = row * h;
  for (int j = threadIdx.x; j < h; j += blockDim.x) {
    const float p0 = ld(pred, base + j, dt);
    const float e = ld(out, flat + j, dt) - p0;
    const float gv = ld(g, flat + j, dt);
    st(y, base + j, p0 + cf[0] * e, dt);
    for (int p = 1; p < n; p++) {
      const long long i = base + (long long)p * h + j;
      st(y, i, ld(pred, i, dt) + cf[p] * e + gv, dt);
    }
  }
}

extern "C" __global__ void altup_correct_bwd(const void* __restrict__ dy, const void* __restrict__ pred,
                                             const void* __restrict__ out, const void* __restrict__ c,
                                             void* __restrict__ dpred, void* __restrict__ dout,
                                             void* __restrict__ dc, void* __restrict__ dg, int n, int h, int dt) {
  __shared__ float scratch[32];
  const long long row = blockIdx.x;
  float cf[ALTUP_MAX_N], acc[ALTUP_MAX_N];
  for (int p = 0; p < n; p++) {
    cf[p] = ld(c, row * n + p, dt);
    acc[p] = 0.0f;
  }
  const long long base = row * n * h, flat = row * h;
  for (int j = threadIdx.x; j < h; j += blockDim.x) {
    const float e = ld(out, flat + j, dt) - ld(pred, base + j, dt);
    float de = 0.0f, dgv = 0.0f;
    for (int p = 0; p < n; p++) {
      const long long i = base + (long long)p * h + j;
      const float d = ld(dy, i, dt);
      de += cf[p] * d;
      acc[p] += d * e;
      if (p > 0) {
        dgv += d;
        st(dpred, i, d, dt);
      }
    }
    st(dpred, base + j, ld(dy, base + j, dt) - de, dt);
    st(dout, flat + j, de, dt);
    st(dg, flat + j, dgv, dt);
  }
  for (int p = 0; p < n; p++) {
    const float total = block_sum(acc[p], scratch);
    if (threadIdx.x == 0) st(dc, row * n + p, total, dt);
  }
}
