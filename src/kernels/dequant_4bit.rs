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
    let nested_pow2 = match &q.absmax {
        Absmax::Plain(_) => true,
        Absmax::Nested { blocksize, .. } => pow2_shift(*blocksize).is_some(),
    };
    super::usable(Some(k), &[&q.quant_map]).is_some()
        && q.codes.device() == q.quant_map.device()
        && q.codes.is_contiguous()
        && (q.codes.data_ptr() as usize).is_multiple_of(4)
        && q.blocksize % 8 == 0
        && pow2_shift(q.blocksize).is_some()
        && nested_pow2
        && dtype_code(kind).is_some()
}

/// log2 of `n` when it is a power of two (bitsandbytes' blocksizes all are).
fn pow2_shift(n: i64) -> Option<i64> {
    (n > 0 && (n & (n - 1)) == 0).then(|| n.trailing_zeros() as i64)
}

/// The kernel. Temporaries made here (f32 copies of the tables) may be freed right after the
/// launch is queued: libtorch's caching allocator hands their memory only to later work on the
/// same stream.
pub fn cuda(q: &QuantTensor, kind: Kind, k: &Kernels) -> Result<Tensor> {
    let out = Tensor::empty(q.shape.as_slice(), (kind, q.device()));
    launch(q, &out, k)?;
    Ok(out)
}

/// `q` dequantized into `out`, a `[rows, cols]` view of `q`'s shape whose rows may be spaced
/// wider than `cols` (a row stride ≥ cols, unit column stride: e.g. the first `cols` columns of a
/// wider buffer), in `out`'s dtype. `None` when the kernel cannot (then nothing is written).
pub fn into(q: &QuantTensor, out: &Tensor, kernels: Option<&Kernels>) -> Option<()> {
    let k = kernels.filter(|k| supported(q, out.kind(), k))?;
    let fits = out.device() == q.device() && out.size() == q.shape && q.shape.len() == 2 && out.stride()[1] == 1;
    (fits && (out.is_contiguous() || q.shape[1] % 8 == 0)).then(|| {
        launch(q, out, k).unwrap_or_else(|e| panic!("CUDA 4-bit dequantize failed: {e:#}"));
    })
}

fn launch(q: &QuantTensor, out: &Tensor, k: &Kernels) -> Result<()> {
    let kind = out.kind();
    let Some(dt) = dtype_code(kind) else { bail!("no 4-bit dequantize kernel for {kind:?}") };
    let Some(bs_shift) = pow2_shift(q.blocksize) else { bail!("blocksize {} is not a power of two", q.blocksize) };
    let n = q.numel();
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
    // (plain absmax, nested codes, code table, nested absmax, nested blocksize's shift, offset)
    let (plain, qcodes, code, nested, nested_shift, offset) = match &q.absmax {
        Absmax::Plain(a) => (Some(f32c(a)), None, None, None, 0, 0.0),
        Absmax::Nested { codes, code, absmax, offset, blocksize } => {
            let Some(sh) = pow2_shift(*blocksize) else { bail!("nested blocksize {blocksize} is not a power of two") };
            (None, Some(codes.contiguous()), Some(f32c(code)), Some(f32c(absmax)), sh, f64::from(*offset))
        }
    };
    let tables = |a: Args| {
        a.i32(bs_shift)
            .ptr_opt(plain.as_ref())
            .ptr_opt(qcodes.as_ref())
            .ptr_opt(code.as_ref())
            .ptr_opt(nested.as_ref())
            .i32(nested_shift)
            .f32(offset)
            .ptr(&table)
            .ptr(out)
            .i32(dt)
    };
    let block = 256u32;
    let (rows, cols) = match q.shape.as_slice() {
        [r, c] => (*r, *c),
        _ => (1, n),
    };
    if cols % 8 == 0 && (1..=65535).contains(&rows) && q.shape.len() == 2 {
        // One grid row per weight row, at the output's row stride.
        let args = tables(Args::default().ptr(&q.codes).i32(cols).i64(out.stride()[0]));
        // ROW_GROUPS (kernels/dequant_4bit.cu) groups of 8 values per thread.
        let per_block = block as i64 * 4;
        let per_row = ((cols / 8 + per_block - 1) / per_block) as u32;
        k.launch_2d("dequant_4bit_rows", (per_row, rows as u32), block, args)
    } else if out.is_contiguous() {
        let args = tables(Args::default().ptr(&q.codes).i64(n));
        k.launch("dequant_4bit", k.grid_for((n + 7) / 8, block), block, args)
    } else {
        bail!("a strided 4-bit dequantize needs a 2-D weight of at most 65535 rows whose width is a multiple of 8")
    }
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
        // Into the first columns of a wider buffer (the rows kernel at a row stride), where the
        // width allows: the same bits, and the spare columns untouched.
        if shape[1] % 8 == 0 {
            let buf = Tensor::full([shape[0], shape[1] + 16], 7.0, (Kind::BFloat16, device));
            let wrote = into(&q, &buf.narrow(1, 0, shape[1]), Some(k)).is_some();
            let spare_kept = buf.narrow(1, shape[1], 16).eq(7.0).all().int64_value(&[]) == 1;
            let err = if wrote && spare_kept {
                rel_err(&buf.narrow(1, 0, shape[1]), &reference(&q, Kind::BFloat16))
            } else {
                f64::INFINITY
            };
            let label = format!("dequant_4bit into a wider buffer{} bf16 {:?}", if double { " dq" } else { "" }, shape);
            c.rows.push(Row { name: label, err, tol: 0.0, bytes: 0.0, secs: None });
        }
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
