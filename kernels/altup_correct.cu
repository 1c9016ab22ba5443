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

// E4B's case, 16-byte loads: N = 4 streams, 2-byte dtype, H a multiple of 8 and 16-byte
// aligned rows (the launcher checks). Each thread takes 8 columns of all 4 streams; the dc
// partials are reduced per warp with shuffles, then across warps through shared memory once.
#define N4 4

extern "C" __global__ void altup_correct_fwd_x8(const uint4* __restrict__ pred, const uint4* __restrict__ out,
                                                const void* __restrict__ c, const uint4* __restrict__ g,
                                                uint4* __restrict__ y, int h8, int dt) {
  const long long row = blockIdx.x;
  float cf[N4];
#pragma unroll
  for (int p = 0; p < N4; p++) cf[p] = ld(c, row * N4 + p, dt);
  const long long base = row * N4 * h8, flat = row * h8;
  for (int j = threadIdx.x; j < h8; j += blockDim.x) {
    float p0[8], o[8], gv[8], e[8], w[8];
    unpack8(pred[base + j], p0, dt);
    unpack8(out[flat + j], o, dt);
    unpack8(g[flat + j], gv, dt);
#pragma unroll
    for (int k = 0; k < 8; k++) {
      e[k] = o[k] - p0[k];
      w[k] = p0[k] + cf[0] * e[k];
    }
    y[base + j] = pack8(w, dt);
#pragma unroll
    for (int p = 1; p < N4; p++) {
      float v[8];
      unpack8(pred[base + (long long)p * h8 + j], v, dt);
#pragma unroll
      for (int k = 0; k < 8; k++) v[k] = v[k] + cf[p] * e[k] + gv[k];
      y[base + (long long)p * h8 + j] = pack8(v, dt);
    }
  }
}

extern "C" __global__ void altup_correct_bwd_x8(const uint4* __restrict__ dy, const uint4* __restrict__ pred,
                                                const uint4* __restrict__ out, const void* __restrict__ c,
                                                uint4* __restrict__ dpred, uint4* __restrict__ dout,
                                                void* __restrict__ dc, uint4* __restrict__ dg, int h8, int dt) {
  __shared__ float partial[32][N4];
  const long long row = blockIdx.x;
  float cf[N4], acc[N4];
#pragma unroll
  for (int p = 0; p < N4; p++) {
    cf[p] = ld(c, row * N4 + p, dt);
    acc[p] = 0.0f;
  }
  const long long base = row * N4 * h8, flat = row * h8;
  for (int j = threadIdx.x; j < h8; j += blockDim.x) {
    float p0[8], o[8], e[8], de[8], dgv[8], d0[8];
    unpack8(pred[base + j], p0, dt);
    unpack8(out[flat + j], o, dt);
    unpack8(dy[base + j], d0, dt);
#pragma unroll
    for (int k = 0; k < 8; k++) {
      e[k] = o[k] - p0[k];
      de[k] = cf[0] * d0[k];
      dgv[k] = 0.0f;
      acc[0] += d0[k] * e[k];
    }
#pragma unroll
    for (int p = 1; p < N4; p++) {
      const uint4 raw = dy[base + (long long)p * h8 + j];
      float d[8];
      unpack8(raw, d, dt);
#pragma unroll
      for (int k = 0; k < 8; k++) {
        de[k] += cf[p] * d[k];
        dgv[k] += d[k];
        acc[p] += d[k] * e[k];
      }
      dpred[base + (long long)p * h8 + j] = raw;
    }
#pragma unroll
    for (int k = 0; k < 8; k++) d0[k] -= de[k];
    dpred[base + j] = pack8(d0, dt);
    dout[flat + j] = pack8(de, dt);
    dg[flat + j] = pack8(dgv, dt);
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
#pragma unroll
  for (int p = 0; p < N4; p++) {
    float x = acc[p];
    for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
    if (lane == 0) partial[warp][p] = x;
  }
  __syncthreads();
  if (threadIdx.x < N4) {
    float total = 0.0f;
    for (int w = 0; w < warps; w++) total += partial[w][threadIdx.x];
    st(dc, row * N4 + threadIdx.x, total, dt);
  }
}
