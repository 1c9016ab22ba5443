// Host shim: causal attention over packed documents (and padded or windowed rows) through
// libtorch's own FlashAttention-2 varlen entry, `at::_flash_attention_forward` with cumulative
// sequence lengths, which tch 0.24 does not bind. Not a kernel of ours: each document is attended
// on its own, so no FLOPs go across documents or into padding. The call goes through the
// dispatcher, so autograd records it (FlashAttentionBackward0 -> _flash_attention_backward).
// Its reference is the boolean-mask SDPA path (src/model/blocks.rs `attention_mask`); the check
// is in src/kernels/check.rs. Built by build.rs only when the libtorch in use has CUDA.
#include <ATen/ATen.h>
#include <ATen/ops/_flash_attention_forward.h>
#include <cstring>

// q [total, nh, d], k and v [total, nkv, d] (nh a multiple of nkv), one dtype (bf16 or f16), on
// the GPU; cu [docs + 1] int32 offsets of the documents into `total`; max_len the longest
// document. window_left < 0: causal over the whole document; else a query sees the keys at most
// window_left positions back (a sliding window of window_left + 1). Returns the output
// [total, nh, d] as a new heap tensor, or null with *err set (free with free()).
extern "C" at::Tensor* tuner_flash_varlen(const at::Tensor* q, const at::Tensor* k, const at::Tensor* v, const at::Tensor* cu,
                                          int64_t max_len, double scale, int64_t window_left, char** err) {
  try {
    std::optional<int64_t> left, right;
    if (window_left >= 0) {
      left = window_left;
      right = 0;
    }
    auto r = at::_flash_attention_forward(*q, *k, *v, *cu, *cu, max_len, max_len, 0.0, /*is_causal=*/true,
                                          /*return_debug_mask=*/false, scale, left, right);
    return new at::Tensor(std::get<0>(r));
  } catch (const std::exception& e) {
    *err = strdup(e.what());
    return nullptr;
  }
}
