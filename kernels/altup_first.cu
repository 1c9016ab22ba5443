// Gemma 3n's first prediction: the corrected active stream, scaled, that the per-layer input
// gate reads,
//   v[h] = a[h] + c[0] · (out[h] − a[h])   (rounded to the dtype),   y[h] = v[h] · scale[h],
// (y = v when `scale` is null: checkpoints without `altup_correct_scale`), and its backward for
// upstream dy, with dv = dy · scale (rounded, as autograd's product backward leaves it):
//   da = dv − c[0] · dv,   dout = c[0] · dv,   dc[0] = Σ_h dv[h] · (out[h] − a[h]),  dc[p>0] = 0.
// a = pred[0] (altup_predict.cu's second output), out, y, dy, da, dout are [R, H]; c, dc are
// [R, N] (the correction coefficients plus one); scale is [H]. f32 math, a rounding where HF
// rounds (v, the scaled product) and one per output. One block per token, the dc sum a block
// reduction. Elementwise loads: the op moves 3–5 token rows, a sixth of AltUp correct's traffic.
// CPU reference: src/kernels/altup_first.rs (`reference`, `backward_reference`), following
// transformers' `Gemma3nTextDecoderLayer.forward` (`first_prediction = corrected[0]`, then
// `altup.scale_corrected_output`; docs/model-math.md §1).

extern "C" __global__ void altup_first_fwd(const void* __restrict__ a, const void* __restrict__ out,
                                           const void* __restrict__ c, const void* __restrict__ scale,
                                           void* __restrict__ y, int n, int h, int dt) {
  const long long row = blockIdx.x, flat = row * h;
  const float c0 = ld(c, row * n, dt);
  for (int j = threadIdx.x; j < h; j += blockDim.x) {
    const float av = ld(a, flat + j, dt);
    float v = rnd(av + c0 * (ld(out, flat + j, dt) - av), dt);
    if (scale != nullptr) v *= ld(scale, j, dt);
    st(y, flat + j, v, dt);
  }
}

extern "C" __global__ void altup_first_bwd(const void* __restrict__ dy, const void* __restrict__ a,
                                           const void* __restrict__ out, const void* __restrict__ c,
                                           const void* __restrict__ scale, void* __restrict__ da,
                                           void* __restrict__ dout, void* __restrict__ dc, int n, int h, int dt) {
  __shared__ float scratch[32];
  const long long row = blockIdx.x, flat = row * h;
  const float c0 = ld(c, row * n, dt);
  float acc = 0.0f;
  for (int j = threadIdx.x; j < h; j += blockDim.x) {
    float dv = ld(dy, flat + j, dt);
    if (scale != nullptr) dv = rnd(dv * ld(scale, j, dt), dt);
    const float av = ld(a, flat + j, dt);
    acc += dv * (ld(out, flat + j, dt) - av);
    st(da, flat + j, dv - c0 * dv, dt);
    st(dout, flat + j, c0 * dv, dt);
  }
  const float total = block_sum(acc, scratch);
  if (threadIdx.x < n) st(dc, row * n + threadIdx.x, threadIdx.x == 0 ? total : 0.0f, dt);
}
