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

// The same rotation eight lanes at a time for the 2-byte dtypes (`dt` bf16 or fp16; d/2 a
// multiple of 8, every tensor 16-byte aligned): 16-byte loads and stores, and the thread's
// position found with 32-bit divisions (rows · d/16 < 2^32): the scalar kernel's 2-byte accesses
// and 64-bit divisions held it at ~38% of copy bandwidth. The same f32 expressions per element.
extern "C" __global__ void rope_x8(const void* x, void* y, const void* __restrict__ cos, const void* __restrict__ sin,
                                   long long bt, int heads, int d, float sign, int dt) {
  const unsigned int rows = (unsigned int)(bt * heads);
  const unsigned int h8 = (unsigned int)d >> 4;  // 8-lane groups per half
  const unsigned int total = rows * h8;
  const int half = d / 2;
  for (unsigned int idx = blockIdx.x * blockDim.x + threadIdx.x; idx < total; idx += gridDim.x * blockDim.x) {
    const unsigned int j = idx % h8, row = idx / h8, pos = row / (unsigned int)heads;
    const long long base = (long long)row * d + j * 8, tb = (long long)pos * d + j * 8;
    float c[8], s[8], x1[8], x2[8], o1[8], o2[8];
    unpack8(((const uint4*)cos)[tb / 8], c, dt);
    unpack8(((const uint4*)sin)[tb / 8], s, dt);
    unpack8(((const uint4*)x)[base / 8], x1, dt);
    unpack8(((const uint4*)x)[(base + half) / 8], x2, dt);
#pragma unroll
    for (int k = 0; k < 8; k++) {
      const float sk = sign * s[k];
      o1[k] = x1[k] * c[k] - x2[k] * sk;
      o2[k] = x2[k] * c[k] + x1[k] * sk;
    }
    ((uint4*)y)[base / 8] = pack8(o1, dt);
    ((uint4*)y)[(base + half) / 8] = pack8(o2, dt);
  }
}
