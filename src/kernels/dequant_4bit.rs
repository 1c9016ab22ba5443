//! Launcher and CPU reference of kernels/dequant_4bit.cu: a bitsandbytes 4-bit weight (NF4 or
//! FP4, plain or double-quantized absmax) dequantized straight into the compute dtype.
//!
//! Reference: [`reference`] = `blockwise::dequantize_4bit` in f32, then a cast (bitsandbytes
//! `dequantize_4bit`, docs/model-math.md §4). The kernel does the same f32 products and one
//! round-to-nearest-even cast, so its output is bit-identical to the reference.

use anyhow::{bail, Result};
use tch::{Kind, Tensor};

use super::checker::{name, rel_err, Checker, Row};
use super::{dtype_code, Args, Kernels};
use crate::quant::QuantType;
use crate::quant::{Absmax, QuantTensor};

/// `q` as a dense tensor of `kind`, shaped like the original weight: the kernel when `kernels`
/// is given and handles the tensor, else [`reference`].
pub fn dequantize(q: &QuantTensor, kind: Kind, kernels: Option<&Kernels>) -> Tensor {
    match kernels {
        Some(k) if supported(q, kind, k) => {
            cuda(q, kind, k).unwrap_or_else(|e| panic!("CUDA 4-bit dequantize failed: {e:#}"))
        }
        _ => reference(q, kind),
    }
}

/// The CPU reference (also the fallback on any device).
pub fn reference(q: &QuantTensor, kind: Kind) -> Tensor {
    q.dequantize(kind)
}

fn supported(q: &QuantTensor, kind: Kind, k: &Kernels) -> bool {
    super::usable(Some(k), &[&q.quant_map]).is_some()
        && q.codes.device() == q.quant_map.device()
        && q.codes.is_contiguous()
        && (q.codes.data_ptr() as usize).is_multiple_of(4)
        && q.blocksize % 8 == 0
        && dtype_code(kind).is_some()
}

/// The kernel. Temporaries made here (f32 copies of the tables) may be freed right after the
/// launch is queued: libtorch's caching allocator hands their memory only to later work on the
/// same stream.
pub fn cuda(q: &QuantTensor, kind: Kind, k: &Kernels) -> Result<Tensor> {
    let Some(dt) = dtype_code(kind) else { bail!("no 4-bit dequantize kernel for {kind:?}") };
    let n = q.numel();
    let out = Tensor::empty(q.shape.as_slice(), (kind, q.device()));
    // The tables as f32 and contiguous: as stored, they already are, and then no libtorch call is
    // made (a no-op `to` still costs a dispatch; ~1.5k per E4B micro-batch).
    let f32c = |t: &Tensor| {
        if t.kind() == Kind::Float && t.is_contiguous() {
            t.shallow_clone()
        } else {
            t.to_kind(Kind::Float).contiguous()
        }
    };
    let table = f32c(&q.quant_map);
    // (plain absmax, nested codes, code table, nested absmax, nested blocksize, offset)
    let (plain, qcodes, code, nested, nested_bs, offset) = match &q.absmax {
        Absmax::Plain(a) => (Some(f32c(a)), None, None, None, 1, 0.0),
        Absmax::Nested { codes, code, absmax, offset, blocksize } => {
            (None, Some(codes.contiguous()), Some(f32c(code)), Some(f32c(absmax)), *blocksize, f64::from(*offset))
        }
    };
    let args = Args::default()
        .ptr(&q.codes)
        .i64(n)
        .i32(q.blocksize)
        .ptr_opt(plain.as_ref())
        .ptr_opt(qcodes.as_ref())
        .ptr_opt(code.as_ref())
        .ptr_opt(nested.as_ref())
        .i32(nested_bs)
        .f32(offset)
        .ptr(&table)
        .ptr(&out)
        .i32(dt);
    let block = 256;
    let groups = (n + 7) / 8;
    k.launch("dequant_4bit", k.grid_for(groups, block), block, args)?;
    Ok(out)
}

/// The kernel against its reference ([`super::check`]): 4-bit dequantize: bit-exact in every dtype, plain and double-quantized absmax, a tail.
pub fn check(k: &Kernels, c: &mut Checker) {
    let device = c.device;
    // 4-bit dequantize: bit-exact in every dtype, plain and double-quantized absmax, a tail.
    for (shape, double, big) in [
        ([14336i64, 4096i64], true, true),
        ([4096, 4096], false, false),
        ([7, 37], true, false),
        ([5, 24], false, false),
    ] {
        let w = Tensor::randn(shape, (Kind::Float, device)) * 0.02;
        let q = QuantTensor::quantize(&w, QuantType::Nf4, 64, double).expect("quantize");
        for kind in [Kind::BFloat16, Kind::Half, Kind::Float] {
            let got = cuda(&q, kind, k).expect("dequant kernel");
            let want = reference(&q, kind);
            let err = rel_err(&got, &want);
            let n = (shape[0] * shape[1]) as f64;
            let bytes = n / 2.0 + n * got.kind().elt_size_in_bytes() as f64;
            let label = format!("dequant_4bit nf4{} {} {:?}", if double { " dq" } else { "" }, name(kind), shape);
            if big && kind == Kind::BFloat16 {
                c.timed(label, err, 0.0, bytes, &mut || {
                    let _ = cuda(&q, kind, k);
                });
                c.timed(
                    format!("dequant_4bit reference (torch ops) {} {:?}", name(kind), shape),
                    0.0,
                    0.0,
                    bytes,
                    &mut || {
                        let _ = reference(&q, kind);
                    },
                );
            } else {
                c.rows.push(Row { name: label, err, tol: 0.0, bytes, secs: None });
            }
        }
    }
}
