// Rotary position embedding of q or k laid out [B, T, heads, d] (contiguous), from x into y (the
// same tensor for in place), with cos/sin tables [B, T, d] built from position ids (so packed
// rows restart their positions). Forward: x·cos + rotate_half(x)·sin; backward: the same with −sin (the
// transpose of the rotation), since both halves of the tables are equal.
// CPU reference: src/kernels/rope.rs (`reference`), which is transformers'
// `apply_rotary_pos_emb` (docs/model-math.md §0); f32 math, one rounding per output.

extern "C" __global__ void rope(const void* x, void* y, const void* __restrict__ cos, const void* __restrict__ sin,
                                long long bt, int heads, int d, float sign, int dt) {
  const int half = d / 2;
  const long long total = bt * heads * half;
  const long long stride = (long long)gridDim.x * blockDim.x;
  for (long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x; idx < total; idx += stride) {
    const int i = idx % half;
    const long long row = idx / half;  // (b·T + t)·heads + head
    const long long pos = row / heads;  // b·T + t
    const long long base = row * d;
    const float c = ld(cos, pos * d + i, dt);
    const float s = sign * ld(sin, pos * d + i, dt);
    const float x1 = ld(x, base + i, dt), x2 = ld(x, base + i + half, dt);
    st(y, base + i, x1 * c - x2 * s, dt);
    st(y, base + i + half, x2 * c + x1 * s, dt);
  }
}
