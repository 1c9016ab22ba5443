//! Blockwise 4-bit and 8-bit (nested absmax) quantization math on tch tensors, so it
//! runs unchanged on CPU and CUDA.
//!
//! Reference: docs/model-math.md §4.3 and bitsandbytes 0.50.2 as it runs on the CPU (the path the
//! fixtures come from):
//! - 4-bit, `backends/default/ops.py::quantize_4bit`: absmax per block in f32; full blocks
//!   are scaled by `x · (1/max(absmax, 1e-38))`, a partial last block by
//!   `x / max(absmax, 1e-38)` (and its stored absmax is the clamped one); clamp to
//!   [−1, 1]; `bucketize` on the f32 midpoints of the sorted table (a value on a midpoint
//!   goes to the lower code); an odd count is padded with a scaled 0.0 before packing.
//! - 8-bit nested absmax, `functional.quantize_4bit` + `csrc/cpu_ops.cpp::quantize_cpu`
//!   (native, not the PyTorch reference): `offset = mean(absmax)` (torch's CPU mean, whose
//!   last bit depends on libtorch's thread count past ~300k blocks), `v = absmax − offset`,
//!   per 256-block `a = max|v|`, `s = clamp(v · (1/a), −1, 1)`,
//!   `i = trunc(f32(fma((s + 1)·0.5, 65535, 0.5)))`, code = `blockwise_lut[i]`; a block
//!   with `a = 0` gets code 0. The fused multiply-add is reproduced exactly in f64.
//! - Dequantize: `table[code] · absmax` in f32; nested absmax is
//!   `(code8[q] · nested_absmax) + offset`, two separately rounded f32 operations.

use tch::{Device, Kind, Tensor};

use super::tables::{blockwise_lut, sorted_midpoints, FP4_ORDER, NF4_ORDER};
use super::QuantType;

/// The f32 clamp bitsandbytes applies to absmax before taking its reciprocal.
const ABSMAX_FLOOR: f64 = 1e-38;

/// Number of `blocksize` blocks covering `n` elements.
pub(crate) fn num_blocks(n: i64, blocksize: i64) -> i64 {
    (n + blocksize - 1) / blocksize
}

/// 4-bit codes of a flat f32 tensor `x` `[n]`: returns (packed codes u8 `[(n+1)/2]`,
/// absmax f32 `[ceil(n/blocksize)]`), byte-identical to bnb's CPU `quantize_4bit`.
pub(crate) fn quantize_4bit(x: &Tensor, quant_type: QuantType, blocksize: i64) -> (Tensor, Tensor) {
    let device = x.device();
    let n = x.size()[0];
    let rem = n % blocksize;
    let full = n - rem;
    let blocks = full / blocksize;

    let mut scaled_parts = Vec::with_capacity(2);
    let mut absmax_parts = Vec::with_capacity(2);
    if blocks > 0 {
        // (blocks, blocksize)
        let a = x.narrow(0, 0, full).view([blocks, blocksize]);
        let absmax = a.abs().amax([1].as_slice(), false);
        let inv = absmax.clamp_min(ABSMAX_FLOOR).reciprocal();
        scaled_parts.push((a * inv.unsqueeze(1)).clamp(-1.0, 1.0).view([-1]));
        absmax_parts.push(absmax);
    }
    if rem > 0 {
        let tail = x.narrow(0, full, rem);
        let am = tail.abs().max().clamp_min(ABSMAX_FLOOR);
        scaled_parts.push((&tail / &am).clamp(-1.0, 1.0));
        absmax_parts.push(am.unsqueeze(0));
    }
    let mut scaled = if scaled_parts.len() == 1 { scaled_parts.remove(0) } else { Tensor::cat(&scaled_parts, 0) };
    let absmax = if absmax_parts.len() == 1 { absmax_parts.remove(0) } else { Tensor::cat(&absmax_parts, 0) };
    if n % 2 == 1 {
        scaled = scaled.constant_pad_nd([0, 1].as_slice());
    }

    let order = match quant_type {
        QuantType::Nf4 => NF4_ORDER,
        QuantType::Fp4 => FP4_ORDER,
    };
    let bounds = Tensor::from_slice(&sorted_midpoints(&quant_type.table(), &order)).to_device(device);
    // Rank among the sorted table values: the number of midpoints strictly below s.
    let rank = scaled.bucketize(&bounds, true, false);
    let order_t = Tensor::from_slice(&order).to_device(device);
    let q = order_t.index_select(0, &rank);
    (pack_nibbles(&q), absmax)
}

/// Packs u8 codes (< 16, even length) two per byte, the first in the high nibble.
fn pack_nibbles(q: &Tensor) -> Tensor {
    let pairs = q.view([-1, 2]);
    pairs.select(1, 0) * 16 + pairs.select(1, 1)
}

/// Double quantization of a 4-bit absmax vector f32 `[nb]` with the 8-bit `code` map:
/// returns (codes u8 `[nb]`, nested absmax f32 `[ceil(nb/blocksize)]`, offset).
pub(crate) fn quantize_nested(absmax: &Tensor, code: &[f32; 256], blocksize: i64) -> (Tensor, Tensor, f32) {
    let device = absmax.device();
    // The mean is taken on the CPU whatever the device: CUDA sums in another order and its
    // last bit can differ, which would change the nested absmax and every dequantized value.
    let offset = absmax.to_device(Device::Cpu).mean(None::<Kind>).double_value(&[]) as f32;
    let v = absmax - f64::from(offset);
    let nb = v.size()[0];
    let nb2 = num_blocks(nb, blocksize);
    // Zero padding changes no block maximum; the padded codes are dropped below.
    let vb = v.constant_pad_nd([0, nb2 * blocksize - nb].as_slice()).view([nb2, blocksize]);
    let a2 = vb.abs().amax([1].as_slice(), false);
    let zero = a2.eq(0.0);
    let inv = a2.masked_fill(&zero, 1.0).reciprocal();
    let s = (vb * inv.unsqueeze(1)).clamp(-1.0, 1.0);
    let h = (s + 1.0) * 0.5;
    // f32(fma(h, 65535, 0.5)): h is a multiple of 2^-25 below 1, so h·65535 + 0.5 is exact in f64.
    let t = (h.to_kind(Kind::Double) * 65535.0 + 0.5).to_kind(Kind::Float);
    let idx = t.to_kind(Kind::Int64).view([-1]);
    let lut = Tensor::from_slice(&blockwise_lut(code)).to_device(device);
    let q = lut.index_select(0, &idx).view([nb2, blocksize]).masked_fill(&zero.unsqueeze(1), 0i64);
    let codes = q.view([-1]).narrow(0, 0, nb).contiguous();
    (codes, a2, offset)
}

/// Multiplies flat values `[n]` by the absmax of their block: `vals[i] · absmax[i / blocksize]`.
pub(crate) fn scale_by_block(vals: &Tensor, absmax: &Tensor, blocksize: i64) -> Tensor {
    let n = vals.size()[0];
    let nb = absmax.size()[0];
    let padded = nb * blocksize;
    if padded == n {
        (vals.view([nb, blocksize]) * absmax.unsqueeze(1)).view([-1])
    } else {
        let v = vals.constant_pad_nd([0, padded - n].as_slice()).view([nb, blocksize]);
        (v * absmax.unsqueeze(1)).view([-1]).narrow(0, 0, n)
    }
}

/// Effective f32 absmax of a nested state: `code[q_j] · nested_absmax[j / blocksize] + offset`.
pub(crate) fn dequantize_nested(
    codes: &Tensor,
    code: &Tensor,
    nested_absmax: &Tensor,
    offset: f32,
    blocksize: i64,
) -> Tensor {
    let vals = code.index_select(0, &codes.to_kind(Kind::Int));
    scale_by_block(&vals, nested_absmax, blocksize) + f64::from(offset)
}

/// Dequantizes packed 4-bit codes `[(n+1)/2]` to f32 `[n]` with a 16-entry f32 `quant_map`.
pub(crate) fn dequantize_4bit(codes: &Tensor, quant_map: &Tensor, absmax: &Tensor, blocksize: i64, n: i64) -> Tensor {
    // pair_table[b] = (map[b >> 4], map[b & 15]): one gather per byte yields both elements.
    let device = quant_map.device();
    // Built on the device: a host-to-device copy here would stall the GPU queue on every use.
    let bytes = Tensor::arange(256, (Kind::Int64, device));
    let hi = bytes.divide_scalar_mode(16, "floor");
    let lo = bytes.remainder(16);
    let pair_table = Tensor::stack(&[quant_map.index_select(0, &hi), quant_map.index_select(0, &lo)], 1);
    let vals = pair_table.index_select(0, &codes.to_kind(Kind::Int)).view([-1]);
    let vals = if vals.size()[0] == n { vals } else { vals.narrow(0, 0, n) };
    scale_by_block(&vals, absmax, blocksize)
}
