//! Frozen 4-bit weights in the bitsandbytes layout (NF4 / FP4, blockwise absmax,
//! optional double quantization of the absmax), computed with tch tensor ops so the same
//! code runs on CPU and CUDA.
//!
//! Reference: docs/model-math.md §4 (bitsandbytes 4-bit format and safetensors keys) and
//! `shared/reference/bnb_dynamic_map_f32.txt`. Quantization reproduces bitsandbytes
//! 0.50.2 on the CPU byte for byte (codes, absmax, nested absmax, offset); the details of
//! that path are in [`blockwise`]. Checkpoint I/O (`from_bnb` / `to_bnb`) lives in [`bnb`].
//!
//! Layout of a quantized weight W of `n` elements, flattened row-major:
//! - `codes` u8 `[(n+1)/2]`: element 2j in the high nibble of byte j, 2j+1 in the low one;
//! - `absmax` per block of `blocksize` consecutive elements (blocks may span rows), plain
//!   f32 or 8-bit double-quantized ([`Absmax::Nested`]);
//! - `w_i = quant_map[code_i] · absmax_{i / blocksize}` in f32, then cast.

mod blockwise;
mod bnb;
mod tables;

use anyhow::{bail, Result};
use tch::{Device, Kind, Tensor};

pub use tables::{dynamic_map, state_map, FP4_TABLE, NF4_TABLE};

/// The block sizes bitsandbytes' `quantize_4bit` accepts.
pub const BLOCKSIZES: [i64; 8] = [32, 64, 128, 256, 512, 1024, 2048, 4096];

/// Block size of the nested (double) quantization of absmax, as bitsandbytes uses.
pub const NESTED_BLOCKSIZE: i64 = 256;

/// The 4-bit code table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QuantType {
    /// NormalFloat4 ([`NF4_TABLE`]).
    Nf4,
    /// 4-bit float, e2m1 ([`FP4_TABLE`]).
    Fp4,
}

impl QuantType {
    /// The name bitsandbytes uses (`"nf4"` / `"fp4"`).
    pub fn name(self) -> &'static str {
        match self {
            QuantType::Nf4 => "nf4",
            QuantType::Fp4 => "fp4",
        }
    }

    /// Parses `"nf4"` / `"fp4"` (any case).
    pub fn from_name(name: &str) -> Option<QuantType> {
        match name.to_ascii_lowercase().as_str() {
            "nf4" => Some(QuantType::Nf4),
            "fp4" => Some(QuantType::Fp4),
            _ => None,
        }
    }

    /// The 16-entry code table.
    pub fn table(self) -> [f32; 16] {
        match self {
            QuantType::Nf4 => NF4_TABLE,
            QuantType::Fp4 => FP4_TABLE,
        }
    }
}

/// A frozen 4-bit weight in bitsandbytes layout (byte-identical to bnb's quantize_4bit).
pub struct QuantTensor {
    /// NF4 or FP4.
    pub quant_type: QuantType,
    /// Shape of the original weight (`[out, in]` for a linear).
    pub shape: Vec<i64>,
    /// Elements per absmax block (64 by default).
    pub blocksize: i64,
    /// Original dtype, and the default dequantization dtype.
    pub dtype: Kind,
    /// u8 `[(n+1)/2]`, packed codes, first element in the HIGH nibble.
    pub codes: Tensor,
    /// Per-block absmax, plain or double-quantized.
    pub absmax: Absmax,
    /// f32 `[16]`, the table the codes index (NF4_TABLE / FP4_TABLE unless a checkpoint says otherwise).
    pub quant_map: Tensor,
}

/// Per-block absmax of a [`QuantTensor`].
pub enum Absmax {
    /// f32 `[nblocks]`.
    Plain(Tensor),
    /// Double quantization: `absmax_j = code[codes[j]] · absmax[j / blocksize] + offset`.
    Nested {
        /// u8 `[nblocks]`, indices into `code`.
        codes: Tensor,
        /// f32 `[256]`, the signed dynamic map ([`dynamic_map`]).
        code: Tensor,
        /// f32 `[ceil(nblocks / blocksize)]`, absmax of each nested block.
        absmax: Tensor,
        /// Mean of the raw absmax, subtracted before the 8-bit quantization.
        offset: f32,
        /// Nested block size (256).
        blocksize: i64,
    },
}

impl Absmax {
    /// A copy sharing storage (tch tensors are reference-counted handles).
    pub fn shallow_clone(&self) -> Absmax {
        match self {
            Absmax::Plain(t) => Absmax::Plain(t.shallow_clone()),
            Absmax::Nested { codes, code, absmax, offset, blocksize } => Absmax::Nested {
                codes: codes.shallow_clone(),
                code: code.shallow_clone(),
                absmax: absmax.shallow_clone(),
                offset: *offset,
                blocksize: *blocksize,
            },
        }
    }

    /// The effective per-block absmax, f32 `[nblocks]` (dequantized when nested).
    pub fn values(&self) -> Tensor {
        match self {
            Absmax::Plain(t) => t.to_kind(Kind::Float),
            Absmax::Nested { codes, code, absmax, offset, blocksize } => {
                blockwise::dequantize_nested(codes, code, absmax, *offset, *blocksize)
            }
        }
    }

    fn to_device(&self, device: Device) -> Absmax {
        match self {
            Absmax::Plain(t) => Absmax::Plain(t.to_device(device)),
            Absmax::Nested { codes, code, absmax, offset, blocksize } => Absmax::Nested {
                codes: codes.to_device(device),
                code: code.to_device(device),
                absmax: absmax.to_device(device),
                offset: *offset,
                blocksize: *blocksize,
            },
        }
    }

    fn nbytes(&self) -> i64 {
        match self {
            Absmax::Plain(t) => tensor_bytes(t),
            Absmax::Nested { codes, code, absmax, .. } => {
                tensor_bytes(codes) + tensor_bytes(code) + tensor_bytes(absmax)
            }
        }
    }
}

fn tensor_bytes(t: &Tensor) -> i64 {
    t.numel() as i64 * t.kind().elt_size_in_bytes() as i64
}

impl QuantTensor {
    /// Quantize a weight (any float dtype, any device) like bitsandbytes.functional.quantize_4bit
    /// (`compress_statistics = double_quant`, `quant_storage = uint8`). The result lives on
    /// `w`'s device; on the CPU it is byte-identical to bitsandbytes 0.50.2.
    pub fn quantize(w: &Tensor, quant_type: QuantType, blocksize: i64, double_quant: bool) -> Result<QuantTensor> {
        let dtype = w.kind();
        if !matches!(dtype, Kind::Float | Kind::BFloat16 | Kind::Half | Kind::Double) {
            bail!("cannot quantize a tensor of kind {dtype:?}: expected a float tensor");
        }
        if !BLOCKSIZES.contains(&blocksize) {
            bail!("invalid 4-bit blocksize {blocksize}: bitsandbytes accepts {BLOCKSIZES:?}");
        }
        let n = w.numel() as i64;
        if n == 0 {
            bail!("cannot quantize an empty tensor (shape {:?})", w.size());
        }
        let x = w.detach().to_kind(Kind::Float).reshape([-1]).contiguous();
        let (codes, absmax) = blockwise::quantize_4bit(&x, quant_type, blocksize);
        let absmax = if double_quant {
            let map = dynamic_map();
            let (qcodes, nested, offset) = blockwise::quantize_nested(&absmax, &map, NESTED_BLOCKSIZE);
            Absmax::Nested {
                codes: qcodes,
                code: Tensor::from_slice(&map).to_device(x.device()),
                absmax: nested,
                offset,
                blocksize: NESTED_BLOCKSIZE,
            }
        } else {
            Absmax::Plain(absmax)
        };
        Ok(QuantTensor {
            quant_type,
            shape: w.size(),
            blocksize,
            dtype,
            codes,
            absmax,
            quant_map: Tensor::from_slice(&quant_type.table()).to_device(x.device()),
        })
    }

    /// Number of elements of the original weight.
    pub fn numel(&self) -> i64 {
        self.shape.iter().product()
    }

    /// Dequantize to `kind` on the tensor's device, shaped like the original weight. Done in f32 then cast (as bnb does).
    pub fn dequantize(&self, kind: Kind) -> Tensor {
        let absmax = self.absmax.values();
        let w = blockwise::dequantize_4bit(&self.codes, &self.quant_map, &absmax, self.blocksize, self.numel());
        w.to_kind(kind).view(self.shape.as_slice())
    }

    /// Build from a transformers-saved bnb-4bit state dict: `prefix` is e.g. "model.layers.0.self_attn.q_proj";
    /// `get(name)` returns a tensor from the checkpoint if present. Returns Ok(None) when `<prefix>.weight.quant_state.bitsandbytes__nf4`/`__fp4` is absent (i.e. the layer is not quantized).
    /// Parses the quant_state JSON leniently (keys: quant_type, blocksize, dtype, shape, nested_blocksize, nested_dtype, nested_offset); handles `weight` stored as U8 [(n+1)/2, 1] (or other quant_storage dtypes viewed as bytes).
    /// The tensors stay on the device `get` returns them on.
    pub fn from_bnb(prefix: &str, get: &dyn Fn(&str) -> Option<Tensor>) -> Result<Option<QuantTensor>> {
        bnb::from_bnb(prefix, get)
    }

    /// The tensors to save in bnb layout, with their full names under `prefix` (weight, weight.absmax, weight.quant_map, weight.nested_absmax, weight.nested_quant_map, weight.quant_state.bitsandbytes__nf4 as U8 bytes of the JSON with python json.dumps default separators and key order as bitsandbytes writes it, docs/model-math.md §4.2).
    /// The tensors are contiguous CPU copies, ready for a safetensors writer.
    pub fn to_bnb(&self, prefix: &str) -> Vec<(String, Tensor)> {
        bnb::to_bnb(self, prefix)
    }

    /// A copy of every tensor on `device`.
    pub fn to_device(&self, device: Device) -> QuantTensor {
        QuantTensor {
            quant_type: self.quant_type,
            shape: self.shape.clone(),
            blocksize: self.blocksize,
            dtype: self.dtype,
            codes: self.codes.to_device(device),
            absmax: self.absmax.to_device(device),
            quant_map: self.quant_map.to_device(device),
        }
    }

    /// A copy sharing storage with `self`.
    pub fn shallow_clone(&self) -> QuantTensor {
        QuantTensor {
            quant_type: self.quant_type,
            shape: self.shape.clone(),
            blocksize: self.blocksize,
            dtype: self.dtype,
            codes: self.codes.shallow_clone(),
            absmax: self.absmax.shallow_clone(),
            quant_map: self.quant_map.shallow_clone(),
        }
    }

    /// The device the codes live on.
    pub fn device(&self) -> Device {
        self.codes.device()
    }

    /// Bytes held (codes + absmax + tables), for memory estimates.
    pub fn nbytes(&self) -> i64 {
        tensor_bytes(&self.codes) + self.absmax.nbytes() + tensor_bytes(&self.quant_map)
    }
}

impl std::fmt::Debug for QuantTensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QuantTensor")
            .field("quant_type", &self.quant_type)
            .field("shape", &self.shape)
            .field("blocksize", &self.blocksize)
            .field("dtype", &self.dtype)
            .field("nested", &matches!(self.absmax, Absmax::Nested { .. }))
            .field("device", &self.device())
            .finish()
    }
}
