//! Dequantization of ggml tensor data to f32: F32, F16, BF16, F64 and the block quants Q4_0,
//! Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K and Q6_K, following ggml's block definitions
//! (`ggml-common.h`) and reference dequantizers (`ggml-quants.c`, `dequantize_row_*`).

use super::types::GgmlType;
use anyhow::{anyhow, bail, Result};
use half::{bf16, f16};

/// The types [`GgufFile::tensor_f32`] can dequantize.
pub const SUPPORTED_TYPES: [GgmlType; 12] = [
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::BF16,
    GgmlType::F64,
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q8_0,
    GgmlType::Q4_K,
    GgmlType::Q5_K,
    GgmlType::Q6_K,
];

/// Whether [`dequantize`] handles `ty`.
pub fn can_dequantize(ty: GgmlType) -> bool {
    SUPPORTED_TYPES.contains(&ty)
}

/// The names of [`SUPPORTED_TYPES`], comma-separated.
pub fn supported_list() -> String {
    SUPPORTED_TYPES.iter().map(|t| t.name()).collect::<Vec<_>>().join(", ")
}

fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// Dequantize `n_elements` values of type `ty` from `data` (which must hold exactly
/// that many elements' blocks) into f32, in storage order.
pub fn dequantize(ty: GgmlType, data: &[u8], n_elements: usize) -> Result<Vec<f32>> {
    let (block, size) = ty.block_layout().ok_or_else(|| anyhow!("unknown GGUF tensor type {ty}"))?;
    let (block, size) = (block as usize, size as usize);
    if !n_elements.is_multiple_of(block) {
        bail!("{n_elements} elements of {ty} are not a whole number of {block}-element blocks");
    }
    let want = n_elements / block * size;
    if data.len() != want {
        bail!("{n_elements} elements of {ty} need {want} bytes, got {}", data.len());
    }
    let mut out = vec![0f32; n_elements];
    let blocks = data.chunks_exact(size).zip(out.chunks_exact_mut(block));
    match ty {
        GgmlType::F32 => blocks.for_each(|(b, y)| y[0] = f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
        GgmlType::F16 => blocks.for_each(|(b, y)| y[0] = f16_at(b, 0)),
        GgmlType::BF16 => blocks.for_each(|(b, y)| y[0] = bf16::from_le_bytes([b[0], b[1]]).to_f32()),
        GgmlType::F64 => blocks.for_each(|(b, y)| {
            let mut a = [0u8; 8];
            a.copy_from_slice(b);
            y[0] = f64::from_le_bytes(a) as f32
        }),
        GgmlType::Q4_0 => blocks.for_each(|(b, y)| deq_q4_0(b, y)),
        GgmlType::Q4_1 => blocks.for_each(|(b, y)| deq_q4_1(b, y)),
        GgmlType::Q5_0 => blocks.for_each(|(b, y)| deq_q5_0(b, y)),
        GgmlType::Q5_1 => blocks.for_each(|(b, y)| deq_q5_1(b, y)),
        GgmlType::Q8_0 => blocks.for_each(|(b, y)| deq_q8_0(b, y)),
        GgmlType::Q4_K => blocks.for_each(|(b, y)| deq_q4_k(b, y)),
        GgmlType::Q5_K => blocks.for_each(|(b, y)| deq_q5_k(b, y)),
        GgmlType::Q6_K => blocks.for_each(|(b, y)| deq_q6_k(b, y)),
        other => bail!("unsupported GGUF tensor type {other}; supported: {}", supported_list()),
    }
    Ok(out)
}

/// Q4_0 block (18 bytes): f16 `d`, 16 bytes of nibbles. Element `j` (j < 16) is the
/// low nibble of byte `j`, element `j + 16` its high nibble; value = (q - 8) * d.
fn deq_q4_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let qs = &b[2..18];
    for j in 0..16 {
        y[j] = ((qs[j] & 0x0F) as i32 - 8) as f32 * d;
        y[j + 16] = ((qs[j] >> 4) as i32 - 8) as f32 * d;
    }
}

/// Q4_1 block (20 bytes): f16 `d`, f16 `m`, 16 bytes of nibbles (layout as Q4_0);
/// value = q * d + m.
fn deq_q4_1(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let m = f16_at(b, 2);
    let qs = &b[4..20];
    for j in 0..16 {
        y[j] = (qs[j] & 0x0F) as f32 * d + m;
        y[j + 16] = (qs[j] >> 4) as f32 * d + m;
    }
}

/// Q5_0 block (22 bytes): f16 `d`, u32 `qh` (fifth bits: bit j for element j, bit
/// j + 16 for element j + 16), 16 bytes of nibbles; value = (q - 16) * d.
fn deq_q5_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
    let qs = &b[6..22];
    for j in 0..16 {
        let h0 = ((qh >> j) & 1) << 4;
        let h1 = ((qh >> (j + 16)) & 1) << 4;
        y[j] = (((qs[j] & 0x0F) as u32 | h0) as i32 - 16) as f32 * d;
        y[j + 16] = (((qs[j] >> 4) as u32 | h1) as i32 - 16) as f32 * d;
    }
}

/// Q5_1 block (24 bytes): f16 `d`, f16 `m`, u32 `qh`, 16 bytes of nibbles (layout as
/// Q5_0); value = q * d + m.
fn deq_q5_1(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let m = f16_at(b, 2);
    let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
    let qs = &b[8..24];
    for j in 0..16 {
        let h0 = ((qh >> j) & 1) << 4;
        let h1 = ((qh >> (j + 16)) & 1) << 4;
        y[j] = ((qs[j] & 0x0F) as u32 | h0) as f32 * d + m;
        y[j + 16] = ((qs[j] >> 4) as u32 | h1) as f32 * d + m;
    }
}

/// Q8_0 block (34 bytes): f16 `d`, 32 signed bytes; value = q * d.
fn deq_q8_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    for (j, &q) in b[2..34].iter().enumerate() {
        y[j] = (q as i8) as f32 * d;
    }
}

/// The 6-bit scale and minimum of sub-block `j` (0..8) from the 12 packed bytes of a
/// Q4_K / Q5_K super-block: sub-blocks 0..4 keep theirs in the low 6 bits of bytes
/// j and j + 4; sub-blocks 4..8 combine a nibble of byte j + 4 with the top two bits
/// of bytes j - 4 (scale) and j (minimum).
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        ((q[j + 4] & 0x0F) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4))
    }
}

/// Q4_K super-block (144 bytes): f16 `d`, f16 `dmin`, 12 bytes of packed scales and
/// minimums, 128 bytes of nibbles. Each 64-element chunk uses 32 bytes: low nibbles
/// for its first 32 elements (sub-block 2i), high nibbles for the next 32 (2i + 1);
/// value = d * scale * q - dmin * min.
fn deq_q4_k(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let dmin = f16_at(b, 2);
    let scales = &b[4..16];
    let qs = &b[16..144];
    for chunk in 0..4 {
        let q = &qs[chunk * 32..chunk * 32 + 32];
        let (sc1, m1) = scale_min_k4(2 * chunk, scales);
        let (sc2, m2) = scale_min_k4(2 * chunk + 1, scales);
        let (d1, min1) = (d * sc1 as f32, dmin * m1 as f32);
        let (d2, min2) = (d * sc2 as f32, dmin * m2 as f32);
        let out = &mut y[chunk * 64..chunk * 64 + 64];
        for l in 0..32 {
            out[l] = d1 * (q[l] & 0x0F) as f32 - min1;
            out[l + 32] = d2 * (q[l] >> 4) as f32 - min2;
        }
    }
}

/// Q5_K super-block (176 bytes): f16 `d`, f16 `dmin`, 12 bytes of scales and
/// minimums (as Q4_K), 32 bytes `qh` of fifth bits, 128 bytes of nibbles. In chunk i
/// the fifth bit of element l is bit 2i of qh[l] (first half) or bit 2i + 1 (second).
fn deq_q5_k(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let dmin = f16_at(b, 2);
    let scales = &b[4..16];
    let qh = &b[16..48];
    let qs = &b[48..176];
    for chunk in 0..4 {
        let q = &qs[chunk * 32..chunk * 32 + 32];
        let (sc1, m1) = scale_min_k4(2 * chunk, scales);
        let (sc2, m2) = scale_min_k4(2 * chunk + 1, scales);
        let (d1, min1) = (d * sc1 as f32, dmin * m1 as f32);
        let (d2, min2) = (d * sc2 as f32, dmin * m2 as f32);
        let (u1, u2) = (1u8 << (2 * chunk), 1u8 << (2 * chunk + 1));
        let out = &mut y[chunk * 64..chunk * 64 + 64];
        for l in 0..32 {
            let h1 = if qh[l] & u1 != 0 { 16 } else { 0 };
            let h2 = if qh[l] & u2 != 0 { 16 } else { 0 };
            out[l] = d1 * ((q[l] & 0x0F) + h1) as f32 - min1;
            out[l + 32] = d2 * ((q[l] >> 4) + h2) as f32 - min2;
        }
    }
}

/// Q6_K super-block (210 bytes): 128 bytes `ql` (low nibbles), 64 bytes `qh` (high
/// two bits), 16 signed 8-bit scales, f16 `d`. Two 128-element halves, each with 64
/// bytes of ql, 32 of qh and 8 scales; value = d * scale * (q - 32).
fn deq_q6_k(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 208);
    for half in 0..2 {
        let ql = &b[half * 64..half * 64 + 64];
        let qh = &b[128 + half * 32..128 + half * 32 + 32];
        let sc = &b[192 + half * 8..192 + half * 8 + 8];
        let out = &mut y[half * 128..half * 128 + 128];
        for l in 0..32 {
            let is = l / 16;
            let q1 = ((ql[l] & 0x0F) | ((qh[l] & 3) << 4)) as i32 - 32;
            let q2 = ((ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
            let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
            let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
            out[l] = d * (sc[is] as i8) as f32 * q1 as f32;
            out[l + 32] = d * (sc[is + 2] as i8) as f32 * q2 as f32;
            out[l + 64] = d * (sc[is + 4] as i8) as f32 * q3 as f32;
            out[l + 96] = d * (sc[is + 6] as i8) as f32 * q4 as f32;
        }
    }
}
