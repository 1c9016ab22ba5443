//! llama.cpp's reference quantizers for the types of a Q4_K_M file (Q4_K, Q6_K and the
//! Q5_0 fallback), and llama.cpp's choice of type per tensor for Q4_K_M.
//!
//! Follows llama.cpp as vendored in the PyPI sdist `llama-cpp-python==0.3.36` (llama.cpp
//! 0.5.0-dev, ggml 0.25.3), statement for statement and in the same f32 arithmetic order:
//! - `ggml/src/ggml-quants.c`: `nearest_int`, `make_qx_quants` (rmse_type 1, no weights),
//!   `make_qkx2_quants`, `quantize_row_q4_K_ref`, `quantize_row_q6_K_ref`,
//!   `quantize_row_q5_0_ref` — what `llama-quantize` runs when no importance matrix is given;
//! - `ggml/src/ggml-impl.h`: `ggml_compute_fp32_to_fp16` (round to nearest even, NaN to
//!   0x7E00), used for every stored f16 scale;
//! - `src/llama-quant.cpp`: `llama_tensor_get_type_impl` and `tensor_type_fallback` for
//!   `LLAMA_FTYPE_MOSTLY_Q4_K_M` (see [`q4_k_m_types`]).
//!
//! ggml compiles these functions into ggml-base without `-march` flags, so on x86-64 no
//! multiply-add is fused and Rust's separate f32 operations give the same bits;
//! `scripts/gen_kquants_fixture.py` checks that byte for byte against the C code.
//! The block layouts (and the dequantizers) are in [`super::dequantize`].

use super::GgmlType;
use rayon::prelude::*;

/// Values per K-quant super-block (ggml's `QK_K`).
pub const QK_K: usize = 256;
/// Bytes of a Q4_K super-block: f16 d, f16 dmin, 12 bytes of 6-bit scales/mins, 128 of nibbles.
pub const Q4_K_BYTES: usize = 144;
/// Bytes of a Q6_K super-block: 128 bytes ql, 64 bytes qh, 16 int8 scales, f16 d.
pub const Q6_K_BYTES: usize = 210;
/// Values per Q5_0 block.
pub const QK5_0: usize = 32;
/// Bytes of a Q5_0 block: f16 d, u32 of fifth bits, 16 bytes of nibbles.
pub const Q5_0_BYTES: usize = 22;

/// ggml's `GROUP_MAX_EPS`: a group whose largest magnitude is below this is all zero.
const GROUP_MAX_EPS: f32 = 1e-15;

/// ggml's `ggml_compute_fp32_to_fp16`: round to nearest even, overflow to infinity,
/// NaN to 0x7E00 (keeping the sign).
pub fn fp32_to_fp16(f: f32) -> u16 {
    let scale_to_inf = f32::from_bits(0x7780_0000); // 0x1.0p+112
    let scale_to_zero = f32::from_bits(0x0880_0000); // 0x1.0p-110
    let mut base = (f.abs() * scale_to_inf) * scale_to_zero;
    let w = f.to_bits();
    let shl1_w = w.wrapping_add(w);
    let sign = w & 0x8000_0000;
    let bias = (shl1_w & 0xFF00_0000).max(0x7100_0000);
    base += f32::from_bits((bias >> 1) + 0x0780_0000);
    let bits = base.to_bits();
    let exp_bits = (bits >> 13) & 0x0000_7C00;
    let mantissa_bits = bits & 0x0000_0FFF;
    let nonsign = exp_bits + mantissa_bits;
    ((sign >> 16) | if shl1_w > 0xFF00_0000 { 0x7E00 } else { nonsign }) as u16
}

/// The f32 value of f16 bits (exact).
pub fn fp16_to_fp32(h: u16) -> f32 {
    half::f16::from_bits(h).to_f32()
}

/// ggml's `nearest_int`: round half to even through the 1.5·2^23 trick. Like the C code
/// (whose assert is compiled out), inputs beyond ±4194303 give wrapped values.
fn nearest_int(fval: f32) -> i32 {
    let val = fval + 12_582_912.0;
    (val.to_bits() as i32 & 0x007F_FFFF) - 0x0040_0000
}

/// ggml's `make_qx_quants` with `rmse_type = 1` and no importance weights (`qw = NULL`), the
/// only way `quantize_row_q6_K_ref` calls it: symmetric levels `L[i] + nmax` in `0..2·nmax`,
/// a weighted least-squares scale tried at 19 candidate inverse scales. Returns the scale.
fn make_qx_quants_rmse1(nmax: i32, x: &[f32], l_out: &mut [i8]) -> f32 {
    let (mut max, mut amax) = (0f32, 0f32);
    for &v in x {
        let ax = v.abs();
        if ax > amax {
            amax = ax;
            max = v;
        }
    }
    if amax < GROUP_MAX_EPS {
        l_out.iter_mut().for_each(|l| *l = 0);
        return 0.0;
    }
    let nm = nmax as f32;
    let level = |iscale: f32, v: f32| nearest_int(iscale * v).clamp(-nmax, nmax - 1);
    let sums = |iscale: f32| {
        let (mut sumlx, mut suml2) = (0f32, 0f32);
        for &v in x {
            let l = level(iscale, v) as f32;
            let w = v * v;
            sumlx += w * v * l;
            suml2 += w * l * l;
        }
        (sumlx, suml2)
    };
    let mut iscale = -nm / max;
    for (o, &v) in l_out.iter_mut().zip(x) {
        *o = (level(iscale, v) + nmax) as i8;
    }
    let (sumlx, suml2) = sums(iscale);
    let mut scale = if suml2 != 0.0 { sumlx / suml2 } else { 0.0 };
    let mut best = scale * sumlx;
    for is in -9i32..=9 {
        if is == 0 {
            continue;
        }
        iscale = -(nm + 0.1 * is as f32) / max;
        let (sumlx, suml2) = sums(iscale);
        if suml2 > 0.0 && sumlx * sumlx > best * suml2 {
            for (o, &v) in l_out.iter_mut().zip(x) {
                *o = (level(iscale, v) + nmax) as i8;
            }
            scale = sumlx / suml2;
            best = scale * sumlx;
        }
    }
    scale
}

/// ggml's `make_qkx2_quants` with `use_mad = false`: asymmetric levels `0..=nmax` with a
/// scale and a minimum (returned as `-min`, so positive when the group dips below zero),
/// refined by weighted least squares over `nstep + 1` candidate inverse scales.
/// Returns `(scale, the_min)`.
#[allow(clippy::too_many_arguments)]
fn make_qkx2_quants(
    nmax: i32,
    x: &[f32],
    weights: &[f32],
    l_out: &mut [u8],
    laux: &mut [u8],
    rmin: f32,
    rdelta: f32,
    nstep: i32,
) -> (f32, f32) {
    let n = x.len();
    let (mut min, mut max) = (x[0], x[0]);
    let mut sum_w = weights[0];
    let mut sum_x = sum_w * x[0];
    for i in 1..n {
        if x[i] < min {
            min = x[i];
        }
        if x[i] > max {
            max = x[i];
        }
        let w = weights[i];
        sum_w += w;
        sum_x += w * x[i];
    }
    if min > 0.0 {
        min = 0.0;
    }
    if max == min {
        l_out.iter_mut().for_each(|l| *l = 0);
        return (0.0, -min);
    }
    let nm = nmax as f32;
    let mut iscale = nm / (max - min);
    let mut scale = 1.0 / iscale;
    let mut best_error = 0f32;
    for i in 0..n {
        let l = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
        l_out[i] = l as u8;
        let diff = scale * l_out[i] as f32 + min - x[i];
        best_error += weights[i] * (diff * diff);
    }
    if nstep < 1 {
        return (scale, -min);
    }
    for is in 0..=nstep {
        iscale = (rmin + rdelta * is as f32 + nm) / (max - min);
        let (mut sum_l, mut sum_l2, mut sum_xl) = (0f32, 0f32, 0f32);
        for i in 0..n {
            let l = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
            laux[i] = l as u8;
            let (w, lf) = (weights[i], l as f32);
            sum_l += w * lf;
            sum_l2 += w * lf * lf;
            sum_xl += w * lf * x[i];
        }
        let d = sum_w * sum_l2 - sum_l * sum_l;
        if d > 0.0 {
            let mut this_scale = (sum_w * sum_xl - sum_x * sum_l) / d;
            let mut this_min = (sum_l2 * sum_x - sum_l * sum_xl) / d;
            if this_min > 0.0 {
                this_min = 0.0;
                this_scale = sum_xl / sum_l2;
            }
            let mut cur_error = 0f32;
            for i in 0..n {
                let diff = this_scale * laux[i] as f32 + this_min - x[i];
                cur_error += weights[i] * (diff * diff);
            }
            if cur_error < best_error {
                l_out[..n].copy_from_slice(&laux[..n]);
                best_error = cur_error;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    (scale, -min)
}

/// The 6-bit scale and minimum of sub-block `j` from a Q4_K block's 12 packed bytes
/// (ggml's `get_scale_min_k4`).
pub fn get_scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        ((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4))
    }
}

/// One Q4_K super-block of 256 values into 144 bytes (`quantize_row_q4_K_ref`'s loop body).
fn quantize_block_q4_k(x: &[f32], y: &mut [u8]) {
    let mut l = [0u8; QK_K];
    let mut laux = [0u8; 32];
    let mut weights = [0f32; 32];
    let (mut mins, mut scales) = ([0f32; QK_K / 32], [0f32; QK_K / 32]);
    let (mut max_scale, mut max_min) = (0f32, 0f32);
    for j in 0..QK_K / 32 {
        let xs = &x[32 * j..32 * j + 32];
        let mut sum_x2 = 0f32;
        for &v in xs {
            sum_x2 += v * v;
        }
        let av_x = (sum_x2 / 32.0).sqrt();
        for (w, &v) in weights.iter_mut().zip(xs) {
            *w = av_x + v.abs();
        }
        let (scale, min) = make_qkx2_quants(15, xs, &weights, &mut l[32 * j..32 * j + 32], &mut laux, -1.0, 0.1, 20);
        (scales[j], mins[j]) = (scale, min);
        if scale > max_scale {
            max_scale = scale;
        }
        if min > max_min {
            max_min = min;
        }
    }
    let inv_scale = if max_scale > 0.0 { 63.0 / max_scale } else { 0.0 };
    let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
    let sc = &mut y[4..16];
    for j in 0..QK_K / 32 {
        // C stores nearest_int's int into a uint8_t (wrapping) before MIN(63, ·).
        let ls = (nearest_int(inv_scale * scales[j]) as u8).min(63);
        let lm = (nearest_int(inv_min * mins[j]) as u8).min(63);
        if j < 4 {
            sc[j] = ls;
            sc[j + 4] = lm;
        } else {
            sc[j + 4] = (ls & 0xF) | ((lm & 0xF) << 4);
            sc[j - 4] |= (ls >> 4) << 6;
            sc[j] |= (lm >> 4) << 6;
        }
    }
    let d16 = fp32_to_fp16(max_scale / 63.0);
    let dmin16 = fp32_to_fp16(max_min / 63.0);
    y[0..2].copy_from_slice(&d16.to_le_bytes());
    y[2..4].copy_from_slice(&dmin16.to_le_bytes());
    for j in 0..QK_K / 32 {
        let (s, m) = get_scale_min_k4(j, &y[4..16]);
        let d = fp16_to_fp32(d16) * s as f32;
        if d == 0.0 {
            continue;
        }
        let dm = fp16_to_fp32(dmin16) * m as f32;
        for ii in 0..32 {
            l[32 * j + ii] = nearest_int((x[32 * j + ii] + dm) / d).clamp(0, 15) as u8;
        }
    }
    let q = &mut y[16..144];
    for (chunk, j) in (0..QK_K).step_by(64).enumerate() {
        for i in 0..32 {
            q[chunk * 32 + i] = l[j + i] | (l[j + i + 32] << 4);
        }
    }
}

/// One Q6_K super-block of 256 values into 210 bytes (`quantize_row_q6_K_ref`'s loop body).
fn quantize_block_q6_k(x: &[f32], y: &mut [u8]) {
    let mut l = [0i8; QK_K];
    let mut scales = [0f32; QK_K / 16];
    let (mut max_scale, mut max_abs_scale) = (0f32, 0f32);
    for ib in 0..QK_K / 16 {
        let scale = make_qx_quants_rmse1(32, &x[16 * ib..16 * ib + 16], &mut l[16 * ib..16 * ib + 16]);
        scales[ib] = scale;
        if scale.abs() > max_abs_scale {
            max_abs_scale = scale.abs();
            max_scale = scale;
        }
    }
    if max_abs_scale < GROUP_MAX_EPS {
        y.iter_mut().for_each(|b| *b = 0);
        y[208..210].copy_from_slice(&fp32_to_fp16(0.0).to_le_bytes());
        return;
    }
    let iscale = -128.0 / max_scale;
    let d16 = fp32_to_fp16(1.0 / iscale);
    y[208..210].copy_from_slice(&d16.to_le_bytes());
    for ib in 0..QK_K / 16 {
        // int -> int8_t as C stores it.
        y[192 + ib] = nearest_int(iscale * scales[ib]).min(127) as i8 as u8;
    }
    for j in 0..QK_K / 16 {
        let d = fp16_to_fp32(d16) * (y[192 + j] as i8) as f32;
        if d == 0.0 {
            continue;
        }
        for ii in 0..16 {
            l[16 * j + ii] = (nearest_int(x[16 * j + ii] / d).clamp(-32, 31) + 32) as i8;
        }
    }
    let l: [u8; QK_K] = l.map(|v| v as u8);
    let (ql, rest) = y.split_at_mut(128);
    let qh = &mut rest[..64];
    for (half, j) in (0..QK_K).step_by(128).enumerate() {
        let (ql, qh) = (&mut ql[half * 64..half * 64 + 64], &mut qh[half * 32..half * 32 + 32]);
        for i in 0..32 {
            let (q1, q2, q3, q4) = (l[j + i] & 0xF, l[j + i + 32] & 0xF, l[j + i + 64] & 0xF, l[j + i + 96] & 0xF);
            ql[i] = q1 | (q3 << 4);
            ql[i + 32] = q2 | (q4 << 4);
            qh[i] = (l[j + i] >> 4)
                | ((l[j + i + 32] >> 4) << 2)
                | ((l[j + i + 64] >> 4) << 4)
                | ((l[j + i + 96] >> 4) << 6);
        }
    }
}

/// One Q5_0 block of 32 values into 22 bytes (`quantize_row_q5_0_ref`'s loop body).
fn quantize_block_q5_0(x: &[f32], y: &mut [u8]) {
    let (mut amax, mut max) = (0f32, 0f32);
    for &v in x {
        if amax < v.abs() {
            amax = v.abs();
            max = v;
        }
    }
    let d = max / -16.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    y[0..2].copy_from_slice(&fp32_to_fp16(d).to_le_bytes());
    let mut qh = 0u32;
    for j in 0..QK5_0 / 2 {
        let x0 = x[j] * id;
        let x1 = x[QK5_0 / 2 + j] * id;
        // C: MIN(31, (int8_t)(x + 16.5f)), a truncating conversion.
        let xi0 = ((x0 + 16.5) as i8 as u8).min(31);
        let xi1 = ((x1 + 16.5) as i8 as u8).min(31);
        y[6 + j] = (xi0 & 0x0F) | ((xi1 & 0x0F) << 4);
        qh |= (((xi0 & 0x10) >> 4) as u32) << j;
        qh |= (((xi1 & 0x10) >> 4) as u32) << (j + QK5_0 / 2);
    }
    y[2..6].copy_from_slice(&qh.to_le_bytes());
}

fn quantize_blocks(values: &[f32], block: usize, bytes: usize, f: fn(&[f32], &mut [u8])) -> Vec<u8> {
    assert!(values.len().is_multiple_of(block), "{} values are not whole {block}-value blocks", values.len());
    let mut out = vec![0u8; values.len() / block * bytes];
    out.par_chunks_mut(bytes).zip(values.par_chunks(block)).for_each(|(y, x)| f(x, y));
    out
}

/// `quantize_row_q4_K_ref` over `values` (a multiple of 256 long): 144 bytes per 256 values.
pub fn quantize_q4_k(values: &[f32]) -> Vec<u8> {
    quantize_blocks(values, QK_K, Q4_K_BYTES, quantize_block_q4_k)
}

/// `quantize_row_q6_K_ref` over `values` (a multiple of 256 long): 210 bytes per 256 values.
pub fn quantize_q6_k(values: &[f32]) -> Vec<u8> {
    quantize_blocks(values, QK_K, Q6_K_BYTES, quantize_block_q6_k)
}

/// `quantize_row_q5_0_ref` over `values` (a multiple of 32 long): 22 bytes per 32 values.
pub fn quantize_q5_0(values: &[f32]) -> Vec<u8> {
    quantize_blocks(values, QK5_0, Q5_0_BYTES, quantize_block_q5_0)
}

/// A tensor as [`q4_k_m_types`] sees it, in file order.
#[derive(Debug, Clone)]
pub struct TensorSpec<'a> {
    /// The GGUF name (`blk.3.attn_v.weight`, `output.weight`, ...).
    pub name: &'a str,
    /// Row-major shape (the last dimension is ggml's `ne[0]`, the row length).
    pub shape: &'a [usize],
}

/// llama.cpp's `use_more_bits`: the first and last eighth of the layers and every third
/// layer between them get more bits.
fn use_more_bits(i_layer: i64, n_layers: i64) -> bool {
    i_layer < n_layers / 8 || i_layer >= 7 * n_layers / 8 || (i_layer - n_layers / 8) % 3 == 2
}

/// `tensor_type_fallback`: a K-quant whose row length is not a multiple of 256 becomes the
/// 32-block type llama.cpp names (Q4_K -> Q5_0, Q6_K -> Q8_0), and F16 when the row is not a
/// multiple of 32 either.
fn fallback(ty: GgmlType, ne0: usize) -> GgmlType {
    let block = |t: GgmlType| t.block_layout().map_or(1, |(b, _)| b as usize);
    let mut out = ty;
    if !ne0.is_multiple_of(block(ty)) {
        out = match ty {
            GgmlType::Q4_K => GgmlType::Q5_0,
            GgmlType::Q6_K => GgmlType::Q8_0,
            other => other,
        };
        if !ne0.is_multiple_of(block(out)) {
            out = GgmlType::F16;
        }
    }
    out
}

/// The type llama.cpp's `llama-quantize` gives each tensor of a dense (F16) GGUF for
/// `Q4_K_M` without an importance matrix or overrides, for the dense architectures tuner
/// writes (`llama`, `qwen2`, `qwen3`; no experts, not Falcon, not a 70B model):
/// - tensors with fewer than 2 dimensions, names not ending in `weight`, and `*_norm.weight`
///   are not quantized (F32 for 1-D, F16 otherwise, as the F16 source file has them);
/// - `output.weight` — and `token_embd.weight` when there is no `output.weight` (tied
///   embeddings) — Q6_K, or Q8_0 when its rows are not a multiple of 256;
/// - `attn_v.weight` Q6_K when `use_more_bits(i, n)` over the attn_v tensors in file order,
///   `ffn_down` Q6_K when `use_more_bits(i, n_layer)` over the ffn_down tensors in order;
/// - everything else Q4_K;
/// - then the shape fallback (Q4_K -> Q5_0, Q6_K -> Q8_0, -> F16 when rows are not a multiple
///   of 32).
pub fn q4_k_m_types(tensors: &[TensorSpec<'_>], n_layer: usize) -> Vec<GgmlType> {
    let tied = !tensors.iter().any(|t| t.name == "output.weight");
    let n_attention_wv = tensors.iter().filter(|t| t.name.contains("attn_v.weight")).count() as i64;
    let (mut i_attention_wv, mut i_ffn_down) = (0i64, 0i64);
    tensors
        .iter()
        .map(|t| {
            let quantizable = t.shape.len() >= 2 && t.name.ends_with("weight") && !t.name.contains("_norm.weight");
            if !quantizable {
                return if t.shape.len() < 2 { GgmlType::F32 } else { GgmlType::F16 };
            }
            let ne0 = t.shape[t.shape.len() - 1];
            let ty = if t.name == "output.weight" || (tied && t.name == "token_embd.weight") {
                if ne0.is_multiple_of(QK_K) {
                    GgmlType::Q6_K
                } else {
                    GgmlType::Q8_0
                }
            } else if t.name.contains("attn_v.weight") {
                let more = use_more_bits(i_attention_wv, n_attention_wv);
                i_attention_wv += 1;
                if more {
                    GgmlType::Q6_K
                } else {
                    GgmlType::Q4_K
                }
            } else if t.name.contains("ffn_down") {
                let more = use_more_bits(i_ffn_down, n_layer as i64);
                i_ffn_down += 1;
                if more {
                    GgmlType::Q6_K
                } else {
                    GgmlType::Q4_K
                }
            } else {
                GgmlType::Q4_K
            };
            fallback(ty, ne0)
        })
        .collect()
}

/// Quantize `values` (whole blocks) as Q4_K, Q6_K or Q5_0, the types [`q4_k_m_types`] returns
/// besides F32, F16 and Q8_0; `None` for other types.
pub fn quantize(ty: GgmlType, values: &[f32]) -> Option<Vec<u8>> {
    match ty {
        GgmlType::Q4_K => Some(quantize_q4_k(values)),
        GgmlType::Q6_K => Some(quantize_q6_k(values)),
        GgmlType::Q5_0 => Some(quantize_q5_0(values)),
        _ => None,
    }
}
