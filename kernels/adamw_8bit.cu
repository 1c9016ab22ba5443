// One 8-bit AdamW step over a group's flat f32 buffers, in one launch: parameters p, gradients g,
// and the two moments stored blockwise in 8 bits (blocks of 256 values: a code per value into a
// sorted 256-entry map, signed for m and unsigned for v, and an f32 absmax per block), as
// bitsandbytes' blockwise 8-bit optimizers store them. Per value, in f32:
//   m = smap[mq]·mabs,  v = umap[vq]·vabs                         (the stored moments)
//   p = p·decay                                                    (decoupled weight decay, when on)
//   m = m·b1 + g·(1−b1),  v = v·b2 + (g·g)·(1−b2)
//   p = p − (m / (√v · inv_sqrt_bc2 + eps)) · step_size           (step_size = lr / (1 − b1^t))
// then per block: mabs = max(max|m|, 1e-30), mq = the first i with smids[i] ≥ m / mabs (the
// nearest map entry; smids are the 255 midpoints of smap), and likewise for v.
// CPU reference: src/kernels/adamw_8bit.rs (`reference`), the same step as torch ops a chunk at a
// time. Every product, sum, quotient and square root is rounded once, in the reference's order
// (the _rn intrinsics: no fused multiply-adds), and a division by a scalar is a product with its
// f32 reciprocal, as libtorch's CUDA division by a CPU scalar is. On an H200 the two agree on
// every code and absmax and within 7.5e-9 on parameters of ~0.02 (an ulp or two of some updates).
// A non-finite moment is not guarded here: the trainer stops before stepping on a
// non-finite gradient norm.
//
// One thread per value: blockDim.x must be 256 (one state block per loop turn of a CUDA block);
// the grid strides over the state blocks. The four tables are staged in shared memory once.

#define ADAM_BLOCK 256

// The largest of the block's 256 values of x (all threads get it). `red` holds 8 floats.
__device__ __forceinline__ float block_max256(float x, float* red) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) red[warp] = x;
  __syncthreads();
  float r = red[0];
#pragma unroll
  for (int w = 1; w < ADAM_BLOCK / 32; w++) r = fmaxf(r, red[w]);
  return r;
}

// The number of the 255 sorted midpoints below x: the code of the map entry nearest x
// (torch.bucketize(x, mids, right=False)).
__device__ __forceinline__ unsigned int nearest_code(float x, const float* mids) {
  unsigned int lo = 0, hi = 255;
  while (lo < hi) {
    const unsigned int mid = (lo + hi) >> 1;
    if (mids[mid] < x) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}

extern "C" __global__ void adamw_8bit(float* __restrict__ p, const float* __restrict__ g,
                                      unsigned char* __restrict__ mq, float* __restrict__ mabs,
                                      unsigned char* __restrict__ vq, float* __restrict__ vabs,
                                      const float* __restrict__ smap, const float* __restrict__ smids,
                                      const float* __restrict__ umap, const float* __restrict__ umids,
                                      long long nblocks, int do_decay, float decay, float b1, float omb1, float b2,
                                      float omb2, float inv_sqrt_bc2, float eps, float step_size) {
  __shared__ float s_smap[256], s_umap[256], s_smids[256], s_umids[256];
  __shared__ float red_m[8], red_v[8];
  const int t = threadIdx.x;
  s_smap[t] = smap[t];
  s_umap[t] = umap[t];
  s_smids[t] = t < 255 ? smids[t] : 0.0f;
  s_umids[t] = t < 255 ? umids[t] : 0.0f;
  __syncthreads();
  for (long long b = blockIdx.x; b < nblocks; b += gridDim.x) {
    const long long e = b * ADAM_BLOCK + t;
    const float gv = g[e];
    float pv = p[e];
    float m = __fmul_rn(s_smap[mq[e]], mabs[b]);
    float v = __fmul_rn(s_umap[vq[e]], vabs[b]);
    if (do_decay) pv = __fmul_rn(pv, decay);
    m = __fadd_rn(__fmul_rn(m, b1), __fmul_rn(gv, omb1));
    v = __fadd_rn(__fmul_rn(v, b2), __fmul_rn(__fmul_rn(gv, gv), omb2));
    const float denom = __fadd_rn(__fmul_rn(__fsqrt_rn(v), inv_sqrt_bc2), eps);
    p[e] = __fsub_rn(pv, __fmul_rn(__fdiv_rn(m, denom), step_size));
    const float am = fmaxf(block_max256(fabsf(m), red_m), 1e-30f);
    const float av = fmaxf(block_max256(fabsf(v), red_v), 1e-30f);
    mq[e] = (unsigned char)nearest_code(__fdiv_rn(m, am), s_smids);
    vq[e] = (unsigned char)nearest_code(__fdiv_rn(v, av), s_umids);
    if (t == 0) {
      mabs[b] = am;
      vabs[b] = av;
    }
    __syncthreads();  // red_m / red_v are read by every thread before the next turn writes them
  }
}
