//! Causal attention over packed documents, padded rows and sliding windows on the GPU, through
//! libtorch's FlashAttention-2 varlen entry (`at::_flash_attention_forward` with cumulative
//! sequence lengths, called by kernels/flash_varlen.cpp since tch does not bind it). Each
//! document, a run of equal segment keys within a row, is attended on its own, so no work goes
//! across documents or into padding; autograd differentiates it with flash's own backward.
//!
//! Its reference is the boolean-mask SDPA path (`model::blocks::attention_mask`, one `[T × T]`
//! mask per row); `check.rs` compares the two, outputs and gradients, on the GPU.

use tch::{Device, Kind, Tensor};

/// Whether q/k/v of `kind` with `head_dim` on `device` can take the varlen path in this build:
/// CUDA, a 2-byte float dtype, a head size flash supports.
pub fn supports(device: Device, kind: Kind, head_dim: i64) -> bool {
    cfg!(tuner_cuda_shim)
        && device.is_cuda()
        && matches!(kind, Kind::BFloat16 | Kind::Half)
        && head_dim % 8 == 0
        && head_dim <= 256
}

/// Documents of a `[B, T]` batch from each token's segment key (row-major): a document is a
/// maximal run of equal keys within one row, so rows never join. Returns the offsets of the
/// documents into the B·T flattened tokens (`cu_seqlens`, first 0, last B·T) and the longest.
pub fn segments(keys: &[i64], b: usize, t: usize) -> (Vec<i32>, i64) {
    assert_eq!(keys.len(), b * t, "segment keys are not [B, T]");
    let mut cu = vec![0i32];
    let mut longest = 0i64;
    for r in 0..b {
        let row = &keys[r * t..(r + 1) * t];
        let mut start = 0;
        for c in 1..=t {
            if c == t || row[c] != row[c - 1] {
                longest = longest.max((c - start) as i64);
                cu.push((r * t + c) as i32);
                start = c;
            }
        }
    }
    (cu, longest)
}

/// Attention of q `[B, nh, T, d]` over k/v `[B, nkv, T, d]` (nh a multiple of nkv), each
/// document of `cu_seqlens` (int32 on the device, from [`segments`]) causal and alone, a query
/// seeing `window` keys at most (itself included) when given. Returns `[B, T, nh·d]`, the
/// layout [`crate::model`]'s attention blocks hand to `o_proj`.
pub fn attend(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    cu_seqlens: &Tensor,
    max_len: i64,
    scale: f64,
    window: Option<i64>,
) -> Tensor {
    let (b, nh, t, d) = q.size4().expect("q is [B, nh, T, d]");
    let nkv = k.size()[1];
    // [B, n, T, d] → [B·T, n, d]: free when the tensor was made as [B, T, n, d] and transposed.
    let tokens = |x: &Tensor, n: i64| x.transpose(1, 2).reshape([b * t, n, d]);
    let (q, k, v) = (tokens(q, nh), tokens(k, nkv), tokens(v, nkv));
    let o = flash(&q, &k, &v, cu_seqlens, max_len, scale, window.map_or(-1, |w| w - 1));
    o.view([b, t, nh * d])
}

#[cfg(tuner_cuda_shim)]
extern "C" {
    fn tuner_flash_varlen(
        q: *const std::ffi::c_void,
        k: *const std::ffi::c_void,
        v: *const std::ffi::c_void,
        cu: *const std::ffi::c_void,
        max_len: i64,
        scale: f64,
        window_left: i64,
        err: *mut *mut std::ffi::c_char,
    ) -> *mut std::ffi::c_void;
}

#[cfg(tuner_cuda_shim)]
#[allow(clippy::too_many_arguments)]
fn flash(q: &Tensor, k: &Tensor, v: &Tensor, cu: &Tensor, max_len: i64, scale: f64, window_left: i64) -> Tensor {
    use std::ffi::c_void;
    let mut err: *mut std::ffi::c_char = std::ptr::null_mut();
    // SAFETY: live tensors; the shim catches every C++ exception and returns a new heap
    // at::Tensor (owned by the returned Tensor) or null with a malloc'd message.
    let p = unsafe {
        tuner_flash_varlen(
            q.as_ptr() as *const c_void,
            k.as_ptr() as *const c_void,
            v.as_ptr() as *const c_void,
            cu.as_ptr() as *const c_void,
            max_len,
            scale,
            window_left,
            &mut err,
        )
    };
    if p.is_null() {
        // SAFETY: a NUL-terminated string from strdup, freed here.
        let msg = unsafe {
            let m = std::ffi::CStr::from_ptr(err).to_string_lossy().into_owned();
            libc::free(err as *mut c_void);
            m
        };
        // As tch's own ops do for a libtorch error: an invariant of the caller broke
        // (`supports` was checked), not the user's input.
        panic!("varlen flash attention failed: {msg}");
    }
    // SAFETY: `p` is a new heap at::Tensor whose ownership passes to the Tensor.
    unsafe { Tensor::from_ptr(p as *mut _) }
}

#[cfg(not(tuner_cuda_shim))]
fn flash(_q: &Tensor, _k: &Tensor, _v: &Tensor, _cu: &Tensor, _max_len: i64, _scale: f64, _window_left: i64) -> Tensor {
    unreachable!("`supports` is false without the CUDA shim")
}
