//! GGUF reader: header, typed metadata, tensor infos and dequantization to f32.
//!
//! Follows the GGUF file-format specification (ggml's `docs/gguf.md`, versions 2
//! and 3, little-endian): the magic `GGUF`, a `u32` version, `u64` tensor and
//! metadata counts, the metadata key/value pairs, the tensor infos, then the
//! tensor data section, which starts at the next multiple of `general.alignment`
//! (default 32) and holds each tensor at its (aligned) offset. The quantized
//! block layouts (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K) follow ggml's
//! block definitions as used by llama.cpp.
//!
//! GGUF lists a tensor's dimensions innermost first (`ne[0]` is the length of a
//! row); [`TensorInfo::shape`] and [`GgufFile::tensor_f32`] return the row-major
//! (PyTorch) shape, i.e. the dimensions reversed.
//!
//! The file is memory-mapped; nothing but the header is read at [`GgufFile::open`].

use anyhow::{anyhow, bail, Context, Result};
use half::{bf16, f16};
use memmap2::Mmap;
use std::collections::HashMap;
use std::fmt;
use std::fs::File;
use std::path::{Path, PathBuf};

pub mod kquants;

/// The four bytes every GGUF file starts with.
pub const GGUF_MAGIC: [u8; 4] = *b"GGUF";

/// The data-section alignment used when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;

/// Nesting limit for arrays of arrays in metadata (a guard against corrupt files).
const MAX_ARRAY_DEPTH: usize = 8;

/// The type tag of a GGUF metadata value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GgufValueType {
    /// `UINT8` (0).
    U8,
    /// `INT8` (1).
    I8,
    /// `UINT16` (2).
    U16,
    /// `INT16` (3).
    I16,
    /// `UINT32` (4).
    U32,
    /// `INT32` (5).
    I32,
    /// `FLOAT32` (6).
    F32,
    /// `BOOL` (7).
    Bool,
    /// `STRING` (8).
    String,
    /// `ARRAY` (9).
    Array,
    /// `UINT64` (10).
    U64,
    /// `INT64` (11).
    I64,
    /// `FLOAT64` (12).
    F64,
}

impl GgufValueType {
    /// The type for its on-disk tag, if the tag is known.
    pub fn from_u32(tag: u32) -> Option<Self> {
        use GgufValueType::*;
        Some(match tag {
            0 => U8,
            1 => I8,
            2 => U16,
            3 => I16,
            4 => U32,
            5 => I32,
            6 => F32,
            7 => Bool,
            8 => String,
            9 => Array,
            10 => U64,
            11 => I64,
            12 => F64,
            _ => return None,
        })
    }

    /// The spec's name of the type (`UINT32`, `STRING`, ...).
    pub fn name(self) -> &'static str {
        use GgufValueType::*;
        match self {
            U8 => "UINT8",
            I8 => "INT8",
            U16 => "UINT16",
            I16 => "INT16",
            U32 => "UINT32",
            I32 => "INT32",
            F32 => "FLOAT32",
            Bool => "BOOL",
            String => "STRING",
            Array => "ARRAY",
            U64 => "UINT64",
            I64 => "INT64",
            F64 => "FLOAT64",
        }
    }

    /// The smallest number of bytes one value of this type takes on disk.
    fn min_size(self) -> u64 {
        use GgufValueType::*;
        match self {
            U8 | I8 | Bool => 1,
            U16 | I16 => 2,
            U32 | I32 | F32 => 4,
            U64 | I64 | F64 | String => 8,
            Array => 12,
        }
    }
}

impl fmt::Display for GgufValueType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A typed GGUF metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum GgufValue {
    /// `UINT8`.
    U8(u8),
    /// `INT8`.
    I8(i8),
    /// `UINT16`.
    U16(u16),
    /// `INT16`.
    I16(i16),
    /// `UINT32`.
    U32(u32),
    /// `INT32`.
    I32(i32),
    /// `FLOAT32`.
    F32(f32),
    /// `BOOL`.
    Bool(bool),
    /// `STRING` (UTF-8; invalid sequences are replaced, with a warning).
    String(String),
    /// `ARRAY`: the element type and the elements.
    Array(GgufArray),
    /// `UINT64`.
    U64(u64),
    /// `INT64`.
    I64(i64),
    /// `FLOAT64`.
    F64(f64),
}

/// A GGUF array value: every element has type `elem_type`.
#[derive(Debug, Clone, PartialEq)]
pub struct GgufArray {
    /// The declared element type (kept even when the array is empty).
    pub elem_type: GgufValueType,
    /// The elements, in file order.
    pub items: Vec<GgufValue>,
}

impl GgufValue {
    /// The value's type tag.
    pub fn value_type(&self) -> GgufValueType {
        match self {
            GgufValue::U8(_) => GgufValueType::U8,
            GgufValue::I8(_) => GgufValueType::I8,
            GgufValue::U16(_) => GgufValueType::U16,
            GgufValue::I16(_) => GgufValueType::I16,
            GgufValue::U32(_) => GgufValueType::U32,
            GgufValue::I32(_) => GgufValueType::I32,
            GgufValue::F32(_) => GgufValueType::F32,
            GgufValue::Bool(_) => GgufValueType::Bool,
            GgufValue::String(_) => GgufValueType::String,
            GgufValue::Array(_) => GgufValueType::Array,
            GgufValue::U64(_) => GgufValueType::U64,
            GgufValue::I64(_) => GgufValueType::I64,
            GgufValue::F64(_) => GgufValueType::F64,
        }
    }

    /// Any integer value that is non-negative, as `u64`.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            GgufValue::U8(v) => Some(v.into()),
            GgufValue::U16(v) => Some(v.into()),
            GgufValue::U32(v) => Some(v.into()),
            GgufValue::U64(v) => Some(v),
            GgufValue::I8(v) => u64::try_from(v).ok(),
            GgufValue::I16(v) => u64::try_from(v).ok(),
            GgufValue::I32(v) => u64::try_from(v).ok(),
            GgufValue::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// Any integer value that fits, as `i64`.
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            GgufValue::U8(v) => Some(v.into()),
            GgufValue::U16(v) => Some(v.into()),
            GgufValue::U32(v) => Some(v.into()),
            GgufValue::U64(v) => i64::try_from(v).ok(),
            GgufValue::I8(v) => Some(v.into()),
            GgufValue::I16(v) => Some(v.into()),
            GgufValue::I32(v) => Some(v.into()),
            GgufValue::I64(v) => Some(v),
            _ => None,
        }
    }

    /// A float, or an integer converted to `f64`.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            GgufValue::F32(v) => Some(v.into()),
            GgufValue::F64(v) => Some(v),
            _ => self.as_i64().map(|v| v as f64).or_else(|| self.as_u64().map(|v| v as f64)),
        }
    }

    /// The string, for a `STRING` value.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            GgufValue::String(s) => Some(s),
            _ => None,
        }
    }

    /// The flag, for a `BOOL` value.
    pub fn as_bool(&self) -> Option<bool> {
        match self {
            GgufValue::Bool(b) => Some(*b),
            _ => None,
        }
    }

    /// The elements, for an `ARRAY` value.
    pub fn as_array(&self) -> Option<&[GgufValue]> {
        match self {
            GgufValue::Array(a) => Some(&a.items),
            _ => None,
        }
    }
}

impl fmt::Display for GgufValue {
    /// A short human-readable form; arrays show their type, length and first elements.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GgufValue::U8(v) => write!(f, "{v}"),
            GgufValue::I8(v) => write!(f, "{v}"),
            GgufValue::U16(v) => write!(f, "{v}"),
            GgufValue::I16(v) => write!(f, "{v}"),
            GgufValue::U32(v) => write!(f, "{v}"),
            GgufValue::I32(v) => write!(f, "{v}"),
            GgufValue::F32(v) => write!(f, "{v}"),
            GgufValue::Bool(v) => write!(f, "{v}"),
            GgufValue::String(s) => write!(f, "{s:?}"),
            GgufValue::U64(v) => write!(f, "{v}"),
            GgufValue::I64(v) => write!(f, "{v}"),
            GgufValue::F64(v) => write!(f, "{v}"),
            GgufValue::Array(a) => {
                write!(f, "[{}; {}]", a.elem_type, a.items.len())?;
                for (i, item) in a.items.iter().take(4).enumerate() {
                    write!(f, "{}{item}", if i == 0 { " " } else { ", " })?;
                }
                if a.items.len() > 4 {
                    f.write_str(", ...")?;
                }
                Ok(())
            }
        }
    }
}

/// The metadata of a GGUF file: key/value pairs in file order, with lookup by key.
#[derive(Debug, Clone, Default)]
pub struct GgufMetadata {
    entries: Vec<(String, GgufValue)>,
    index: HashMap<String, usize>,
}

impl GgufMetadata {
    /// The value stored under `key`.
    pub fn get(&self, key: &str) -> Option<&GgufValue> {
        self.index.get(key).map(|&i| &self.entries[i].1)
    }

    /// Whether `key` is present.
    pub fn contains_key(&self, key: &str) -> bool {
        self.index.contains_key(key)
    }

    /// The pairs in file order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &GgufValue)> {
        self.entries.iter().map(|(k, v)| (k.as_str(), v))
    }

    /// The keys in file order.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.entries.iter().map(|(k, _)| k.as_str())
    }

    /// The number of pairs.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether there are no pairs.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn insert(&mut self, key: String, value: GgufValue) -> std::result::Result<(), String> {
        if self.index.contains_key(&key) {
            return Err(key);
        }
        self.index.insert(key.clone(), self.entries.len());
        self.entries.push((key, value));
        Ok(())
    }
}

/// A ggml tensor element type, as stored in a GGUF tensor info.
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GgmlType {
    /// 32-bit float.
    F32,
    /// IEEE half.
    F16,
    /// 32-element blocks: f16 scale, 4-bit quants offset by 8.
    Q4_0,
    /// 32-element blocks: f16 scale and minimum, 4-bit quants.
    Q4_1,
    /// 32-element blocks: f16 scale, 5-bit quants offset by 16.
    Q5_0,
    /// 32-element blocks: f16 scale and minimum, 5-bit quants.
    Q5_1,
    /// 32-element blocks: f16 scale, 8-bit quants.
    Q8_0,
    /// 32-element blocks: scale, sum, 8-bit quants (an intermediate type).
    Q8_1,
    /// K-quant, 2 bits.
    Q2_K,
    /// K-quant, 3 bits.
    Q3_K,
    /// K-quant, 4 bits: 256-element super-blocks of 8 sub-blocks with 6-bit scales and minimums.
    Q4_K,
    /// K-quant, 5 bits.
    Q5_K,
    /// K-quant, 6 bits.
    Q6_K,
    /// K-quant, 8 bits (an intermediate type).
    Q8_K,
    /// I-quant.
    IQ2_XXS,
    /// I-quant.
    IQ2_XS,
    /// I-quant.
    IQ3_XXS,
    /// I-quant.
    IQ1_S,
    /// I-quant.
    IQ4_NL,
    /// I-quant.
    IQ3_S,
    /// I-quant.
    IQ2_S,
    /// I-quant.
    IQ4_XS,
    /// 8-bit integer.
    I8,
    /// 16-bit integer.
    I16,
    /// 32-bit integer.
    I32,
    /// 64-bit integer.
    I64,
    /// 64-bit float.
    F64,
    /// I-quant.
    IQ1_M,
    /// bfloat16.
    BF16,
    /// Ternary quant.
    TQ1_0,
    /// Ternary quant.
    TQ2_0,
    /// Microscaling FP4.
    MXFP4,
    /// A tag this reader does not know.
    Unknown(u32),
}

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

impl GgmlType {
    /// The type for its on-disk tag (unknown tags become [`GgmlType::Unknown`]).
    pub fn from_u32(tag: u32) -> Self {
        use GgmlType::*;
        match tag {
            0 => F32,
            1 => F16,
            2 => Q4_0,
            3 => Q4_1,
            6 => Q5_0,
            7 => Q5_1,
            8 => Q8_0,
            9 => Q8_1,
            10 => Q2_K,
            11 => Q3_K,
            12 => Q4_K,
            13 => Q5_K,
            14 => Q6_K,
            15 => Q8_K,
            16 => IQ2_XXS,
            17 => IQ2_XS,
            18 => IQ3_XXS,
            19 => IQ1_S,
            20 => IQ4_NL,
            21 => IQ3_S,
            22 => IQ2_S,
            23 => IQ4_XS,
            24 => I8,
            25 => I16,
            26 => I32,
            27 => I64,
            28 => F64,
            29 => IQ1_M,
            30 => BF16,
            34 => TQ1_0,
            35 => TQ2_0,
            39 => MXFP4,
            other => Unknown(other),
        }
    }

    /// The on-disk tag.
    pub fn to_u32(self) -> u32 {
        use GgmlType::*;
        match self {
            F32 => 0,
            F16 => 1,
            Q4_0 => 2,
            Q4_1 => 3,
            Q5_0 => 6,
            Q5_1 => 7,
            Q8_0 => 8,
            Q8_1 => 9,
            Q2_K => 10,
            Q3_K => 11,
            Q4_K => 12,
            Q5_K => 13,
            Q6_K => 14,
            Q8_K => 15,
            IQ2_XXS => 16,
            IQ2_XS => 17,
            IQ3_XXS => 18,
            IQ1_S => 19,
            IQ4_NL => 20,
            IQ3_S => 21,
            IQ2_S => 22,
            IQ4_XS => 23,
            I8 => 24,
            I16 => 25,
            I32 => 26,
            I64 => 27,
            F64 => 28,
            IQ1_M => 29,
            BF16 => 30,
            TQ1_0 => 34,
            TQ2_0 => 35,
            MXFP4 => 39,
            Unknown(t) => t,
        }
    }

    /// `(elements per block, bytes per block)`, or `None` for an unknown tag.
    pub fn block_layout(self) -> Option<(u64, u64)> {
        use GgmlType::*;
        Some(match self {
            F32 | I32 => (1, 4),
            F16 | BF16 | I16 => (1, 2),
            F64 | I64 => (1, 8),
            I8 => (1, 1),
            Q4_0 => (32, 18),
            Q4_1 => (32, 20),
            Q5_0 => (32, 22),
            Q5_1 => (32, 24),
            Q8_0 => (32, 34),
            Q8_1 => (32, 36),
            IQ4_NL => (32, 18),
            MXFP4 => (32, 17),
            Q2_K => (256, 84),
            Q3_K => (256, 110),
            Q4_K => (256, 144),
            Q5_K => (256, 176),
            Q6_K => (256, 210),
            Q8_K => (256, 292),
            IQ2_XXS => (256, 66),
            IQ2_XS => (256, 74),
            IQ3_XXS => (256, 98),
            IQ1_S => (256, 50),
            IQ3_S => (256, 110),
            IQ2_S => (256, 82),
            IQ4_XS => (256, 136),
            IQ1_M => (256, 56),
            TQ1_0 => (256, 54),
            TQ2_0 => (256, 66),
            Unknown(_) => return None,
        })
    }

    /// Whether [`dequantize`] handles this type.
    pub fn can_dequantize(self) -> bool {
        SUPPORTED_TYPES.contains(&self)
    }

    /// The ggml name (`Q4_1`, `F16`, ...); unknown tags print as `type#N`.
    pub fn name(self) -> String {
        match self {
            GgmlType::Unknown(t) => format!("type#{t}"),
            other => format!("{other:?}"),
        }
    }
}

impl fmt::Display for GgmlType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name())
    }
}

/// One tensor's entry in the GGUF header.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    /// The tensor's GGUF name (`blk.0.attn_q.weight`).
    pub name: String,
    /// Dimensions as stored: innermost (row length) first.
    pub dims: Vec<u64>,
    /// Element type.
    pub ggml_type: GgmlType,
    /// Byte offset of the data, relative to the start of the data section.
    pub offset: u64,
}

impl TensorInfo {
    /// The row-major (PyTorch) shape: `dims` reversed.
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }

    /// The number of elements (1 for a tensor with no dimensions).
    pub fn n_elements(&self) -> u64 {
        self.dims.iter().product()
    }

    /// The size of the data in bytes, when the type is known and the row length
    /// is a whole number of blocks.
    pub fn n_bytes(&self) -> Option<u64> {
        let (block, size) = self.ggml_type.block_layout()?;
        let row = self.dims.first().copied().unwrap_or(1);
        if row % block != 0 {
            return None;
        }
        (self.n_elements() / block).checked_mul(size)
    }
}

/// An open, memory-mapped GGUF file.
pub struct GgufFile {
    path: PathBuf,
    mmap: Mmap,
    version: u32,
    metadata: GgufMetadata,
    tensors: Vec<TensorInfo>,
    tensor_index: HashMap<String, usize>,
    alignment: u64,
    data_offset: u64,
}

impl fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("metadata_entries", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .field("alignment", &self.alignment)
            .field("data_offset", &self.data_offset)
            .finish()
    }
}

/// A bounds-checked little-endian reader over the header bytes.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: u64) -> Result<&'a [u8]> {
        let left = (self.buf.len() - self.pos) as u64;
        if n > left {
            bail!(
                "unexpected end of file at byte {} (needed {n} more bytes, the file has {})",
                self.pos,
                self.buf.len()
            );
        }
        let n = n as usize;
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N]> {
        let s = self.take(N as u64)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn remaining(&self) -> u64 {
        (self.buf.len() - self.pos) as u64
    }

    fn u8(&mut self) -> Result<u8> {
        Ok(self.array::<1>()?[0])
    }
    fn u16(&mut self) -> Result<u16> {
        Ok(u16::from_le_bytes(self.array()?))
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array()?))
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    fn string(&mut self) -> Result<String> {
        let len = self.u64()?;
        let bytes = self.take(len)?;
        Ok(match std::str::from_utf8(bytes) {
            Ok(s) => s.to_string(),
            Err(_) => {
                log::warn!("GGUF string at byte {} is not valid UTF-8; invalid bytes replaced", self.pos);
                String::from_utf8_lossy(bytes).into_owned()
            }
        })
    }

    fn value(&mut self, ty: GgufValueType, depth: usize) -> Result<GgufValue> {
        Ok(match ty {
            GgufValueType::U8 => GgufValue::U8(self.u8()?),
            GgufValueType::I8 => GgufValue::I8(self.u8()? as i8),
            GgufValueType::U16 => GgufValue::U16(self.u16()?),
            GgufValueType::I16 => GgufValue::I16(self.u16()? as i16),
            GgufValueType::U32 => GgufValue::U32(self.u32()?),
            GgufValueType::I32 => GgufValue::I32(self.u32()? as i32),
            GgufValueType::F32 => GgufValue::F32(f32::from_bits(self.u32()?)),
            GgufValueType::U64 => GgufValue::U64(self.u64()?),
            GgufValueType::I64 => GgufValue::I64(self.u64()? as i64),
            GgufValueType::F64 => GgufValue::F64(f64::from_bits(self.u64()?)),
            GgufValueType::Bool => match self.u8()? {
                0 => GgufValue::Bool(false),
                1 => GgufValue::Bool(true),
                b => bail!("invalid BOOL byte {b} at byte {}", self.pos - 1),
            },
            GgufValueType::String => GgufValue::String(self.string()?),
            GgufValueType::Array => {
                if depth >= MAX_ARRAY_DEPTH {
                    bail!("arrays nested deeper than {MAX_ARRAY_DEPTH} levels");
                }
                let tag = self.u32()?;
                let elem_type = GgufValueType::from_u32(tag)
                    .ok_or_else(|| anyhow!("unknown array element type {tag} at byte {}", self.pos - 4))?;
                let count = self.u64()?;
                if count.saturating_mul(elem_type.min_size()) > self.remaining() {
                    bail!(
                        "array of {count} {elem_type} values at byte {} runs past the end of the file ({} bytes)",
                        self.pos,
                        self.buf.len()
                    );
                }
                let mut items = Vec::with_capacity(count as usize);
                for _ in 0..count {
                    items.push(self.value(elem_type, depth + 1)?);
                }
                GgufValue::Array(GgufArray { elem_type, items })
            }
        })
    }
}

impl GgufFile {
    /// Open and memory-map a GGUF (v2 or v3, little-endian) file and parse its header.
    ///
    /// Checks the magic, the version, every metadata value and tensor info, and
    /// that every tensor's data lies inside the file; errors name the file (and
    /// the key or tensor at fault).
    pub fn open(path: impl AsRef<Path>) -> Result<GgufFile> {
        let path = path.as_ref().to_path_buf();
        let file = File::open(&path).with_context(|| format!("cannot open GGUF file {}", path.display()))?;
        // SAFETY: the map is read-only and private to this struct; like every
        // mmap-based model loader we assume nobody truncates the file while it is open.
        let mmap = unsafe { Mmap::map(&file) }.with_context(|| format!("cannot memory-map {}", path.display()))?;
        Self::parse(path, mmap)
    }

    fn parse(path: PathBuf, mmap: Mmap) -> Result<GgufFile> {
        let shown = path.display().to_string();
        let mut r = Reader { buf: &mmap[..], pos: 0 };
        let magic: [u8; 4] =
            r.array().map_err(|_| anyhow!("{shown} is not a GGUF file: it is only {} bytes long", mmap.len()))?;
        if magic != GGUF_MAGIC {
            bail!("{shown} is not a GGUF file: bad magic {:?} (expected \"GGUF\")", String::from_utf8_lossy(&magic));
        }
        let version = r.u32().map_err(|e| anyhow!("truncated GGUF header in {shown}: {e}"))?;
        match version {
            2 | 3 => {}
            1 => bail!("{shown}: GGUF version 1 is not supported (only v2 and v3); re-convert the model with a current llama.cpp"),
            v if v.swap_bytes() == 2 || v.swap_bytes() == 3 => {
                bail!("{shown}: big-endian GGUF files are not supported")
            }
            v => bail!("{shown}: unsupported GGUF version {v} (only v2 and v3)"),
        }
        let tensor_count = r.u64().map_err(|e| anyhow!("truncated GGUF header in {shown}: {e}"))?;
        let kv_count = r.u64().map_err(|e| anyhow!("truncated GGUF header in {shown}: {e}"))?;

        let mut metadata = GgufMetadata::default();
        for i in 0..kv_count {
            let key = r
                .string()
                .map_err(|e| anyhow!("truncated or corrupt GGUF header in {shown}: metadata key #{i}: {e}"))?;
            let tag =
                r.u32().map_err(|e| anyhow!("truncated or corrupt GGUF header in {shown}: metadata `{key}`: {e}"))?;
            let ty = GgufValueType::from_u32(tag).ok_or_else(|| {
                anyhow!("corrupt GGUF header in {shown}: metadata `{key}` has unknown value type {tag}")
            })?;
            let value = r
                .value(ty, 0)
                .map_err(|e| anyhow!("truncated or corrupt GGUF header in {shown}: metadata `{key}`: {e}"))?;
            metadata
                .insert(key, value)
                .map_err(|k| anyhow!("corrupt GGUF header in {shown}: metadata key `{k}` appears twice"))?;
        }

        let alignment = match metadata.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(v) => match v.as_u64() {
                Some(a) if a > 0 => a,
                _ => bail!("{shown}: invalid general.alignment {v} (expected a positive integer)"),
            },
        };

        // Each tensor info takes at least 8 (name) + 4 + 4 + 8 bytes.
        if tensor_count.saturating_mul(24) > r.remaining() {
            bail!("truncated or corrupt GGUF header in {shown}: {tensor_count} tensor infos cannot fit in the file");
        }
        let mut tensors = Vec::with_capacity(tensor_count as usize);
        let mut tensor_index = HashMap::with_capacity(tensor_count as usize);
        for i in 0..tensor_count {
            let info = Self::read_tensor_info(&mut r).map_err(|e| {
                anyhow!(
                    "truncated or corrupt GGUF header in {shown}: tensor info #{i} (after {} tensors): {e}",
                    tensors.len()
                )
            })?;
            if tensor_index.insert(info.name.clone(), tensors.len()).is_some() {
                bail!("corrupt GGUF header in {shown}: tensor `{}` appears twice", info.name);
            }
            tensors.push(info);
        }

        let header_end = r.pos as u64;
        let data_offset = header_end.div_ceil(alignment) * alignment;
        let file_len = mmap.len() as u64;
        for t in &tensors {
            let Some((block, _)) = t.ggml_type.block_layout() else { continue };
            let row = t.dims.first().copied().unwrap_or(1);
            if row % block != 0 {
                bail!(
                    "corrupt GGUF header in {shown}: tensor `{}` of type {} has rows of {row} elements, not a multiple of its block size {block}",
                    t.name,
                    t.ggml_type
                );
            }
            let size = t
                .n_bytes()
                .ok_or_else(|| anyhow!("corrupt GGUF header in {shown}: tensor `{}` is too large", t.name))?;
            let end = data_offset.checked_add(t.offset).and_then(|s| s.checked_add(size));
            match end {
                Some(end) if end <= file_len => {}
                _ => bail!(
                    "truncated GGUF file {shown}: tensor `{}` needs bytes {}..{} but the file has only {file_len} bytes",
                    t.name,
                    data_offset.saturating_add(t.offset),
                    data_offset.saturating_add(t.offset).saturating_add(size)
                ),
            }
        }

        Ok(GgufFile { path, mmap, version, metadata, tensors, tensor_index, alignment, data_offset })
    }

    fn read_tensor_info(r: &mut Reader<'_>) -> Result<TensorInfo> {
        let name = r.string()?;
        let n_dims = r.u32().with_context(|| format!("tensor `{name}`"))?;
        if n_dims > 8 {
            bail!("tensor `{name}` claims {n_dims} dimensions (at most 8 are allowed)");
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        for _ in 0..n_dims {
            dims.push(r.u64().with_context(|| format!("tensor `{name}`"))?);
        }
        if dims.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d)).is_none() {
            bail!("tensor `{name}` has an impossible shape {dims:?}");
        }
        let ggml_type = GgmlType::from_u32(r.u32().with_context(|| format!("tensor `{name}`"))?);
        let offset = r.u64().with_context(|| format!("tensor `{name}`"))?;
        Ok(TensorInfo { name, dims, ggml_type, offset })
    }

    /// The file's path as given to [`GgufFile::open`].
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The GGUF version (2 or 3).
    pub fn version(&self) -> u32 {
        self.version
    }

    /// All metadata, in file order.
    pub fn metadata(&self) -> &GgufMetadata {
        &self.metadata
    }

    /// One metadata value.
    pub fn get(&self, key: &str) -> Option<&GgufValue> {
        self.metadata.get(key)
    }

    /// `general.architecture` (`llama`, `qwen2`, ...), when present.
    pub fn architecture(&self) -> Option<&str> {
        self.get("general.architecture").and_then(GgufValue::as_str)
    }

    /// The data-section alignment (`general.alignment`, default 32).
    pub fn alignment(&self) -> u64 {
        self.alignment
    }

    /// The absolute file offset where the tensor data section starts.
    pub fn data_offset(&self) -> u64 {
        self.data_offset
    }

    /// Tensor infos, in file order.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    /// The info of the tensor called `name`.
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensor_index.get(name).map(|&i| &self.tensors[i])
    }

    fn wrong_type(&self, key: &str, want: &str, got: &GgufValue) -> anyhow::Error {
        anyhow!("metadata `{key}` in {} is a {} ({got}), expected {want}", self.path.display(), got.value_type())
    }

    /// An integer metadata value as `u64`; `Ok(None)` when absent, an error when of another type.
    pub fn get_u64(&self, key: &str) -> Result<Option<u64>> {
        self.get(key).map(|v| v.as_u64().ok_or_else(|| self.wrong_type(key, "a non-negative integer", v))).transpose()
    }

    /// A numeric metadata value as `f64`; `Ok(None)` when absent, an error when of another type.
    pub fn get_f64(&self, key: &str) -> Result<Option<f64>> {
        self.get(key).map(|v| v.as_f64().ok_or_else(|| self.wrong_type(key, "a number", v))).transpose()
    }

    /// A string metadata value; `Ok(None)` when absent, an error when of another type.
    pub fn get_str(&self, key: &str) -> Result<Option<&str>> {
        self.get(key).map(|v| v.as_str().ok_or_else(|| self.wrong_type(key, "a string", v))).transpose()
    }

    /// A boolean metadata value; `Ok(None)` when absent, an error when of another type.
    pub fn get_bool(&self, key: &str) -> Result<Option<bool>> {
        self.get(key).map(|v| v.as_bool().ok_or_else(|| self.wrong_type(key, "a bool", v))).transpose()
    }

    /// An array metadata value; `Ok(None)` when absent, an error when of another type.
    pub fn get_array(&self, key: &str) -> Result<Option<&[GgufValue]>> {
        self.get(key).map(|v| v.as_array().ok_or_else(|| self.wrong_type(key, "an array", v))).transpose()
    }

    /// An integer metadata value that must be present.
    pub fn require_u64(&self, key: &str) -> Result<u64> {
        self.get_u64(key)?.ok_or_else(|| anyhow!("metadata `{key}` is missing from {}", self.path.display()))
    }

    /// A string metadata value that must be present.
    pub fn require_str(&self, key: &str) -> Result<&str> {
        self.get_str(key)?.ok_or_else(|| anyhow!("metadata `{key}` is missing from {}", self.path.display()))
    }

    fn info_or_err(&self, name: &str) -> Result<&TensorInfo> {
        self.tensor(name)
            .ok_or_else(|| anyhow!("no tensor `{name}` in {} ({} tensors)", self.path.display(), self.tensors.len()))
    }

    /// The raw (possibly quantized) bytes of the tensor called `name`.
    pub fn tensor_data(&self, name: &str) -> Result<&[u8]> {
        let info = self.info_or_err(name)?;
        let size = info.n_bytes().ok_or_else(|| {
            anyhow!(
                "tensor `{name}` in {} has type {}, whose size this reader does not know",
                self.path.display(),
                info.ggml_type
            )
        })?;
        // open() checked that the range lies inside the file.
        let start = (self.data_offset + info.offset) as usize;
        Ok(&self.mmap[start..start + size as usize])
    }

    /// The tensor called `name`, dequantized to f32, with its row-major (PyTorch) shape
    /// (GGUF's dimensions reversed).
    ///
    /// Supports the types in [`SUPPORTED_TYPES`]; others fail with an error that names
    /// the type, the tensor, the file and the supported types.
    pub fn tensor_f32(&self, name: &str) -> Result<(Vec<f32>, Vec<usize>)> {
        let info = self.info_or_err(name)?;
        if !info.ggml_type.can_dequantize() {
            bail!(
                "unsupported GGUF tensor type {} in `{name}` of {}; supported: {}",
                info.ggml_type,
                self.path.display(),
                supported_list()
            );
        }
        let data = self.tensor_data(name)?;
        let values = dequantize(info.ggml_type, data, info.n_elements() as usize)
            .with_context(|| format!("cannot dequantize `{name}` of {}", self.path.display()))?;
        Ok((values, info.shape()))
    }
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
