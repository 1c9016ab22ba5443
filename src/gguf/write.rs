//! GGUF writer: the file types tuner writes ([`GgufType`]: which ggml type each tensor gets),
//! the f32 → ggml encoders, and the v3 file layout.
//!
//! Follows the GGUF specification (ggml `docs/gguf.md`: magic, version 3, tensor and key/value
//! counts, typed key/values, tensor infos with dimensions innermost first, data aligned to
//! `general.alignment` = 32, not written as it is the default) and ggml's reference quantizer for
//! Q8_0 (`quantize_row_q8_0_ref`: per 32 values `d = max|x|/127` stored as f16, `q = round(x/d)`).
//! What a new file type needs is in one place each: its names and tensor types in the
//! [`GgufType`] methods, its encoder in [`encode`].

use super::types::{GgmlType, GgufValue, GgufValueType, GGUF_MAGIC};
use crate::progress::{Progress, Unit};
use anyhow::{anyhow, bail, Context, Result};
use rayon::prelude::*;
use std::collections::BTreeMap;
use std::io::{BufWriter, Write};
use std::path::Path;

/// Data alignment (the GGUF default; `general.alignment` is not written).
pub const ALIGNMENT: u64 = 32;

/// Values per Q8_0 block.
pub const Q8_0_BLOCK: usize = 32;

/// The GGUF file types tuner writes (`export.gguf`).
pub use crate::recipe::GgufType;

impl GgufType {
    /// The recipe name (`f16`, `q8_0`, `q4_k_m`).
    pub fn name(self) -> &'static str {
        match self {
            GgufType::F16 => "f16",
            GgufType::Q8_0 => "q8_0",
            GgufType::Q4KM => "q4_k_m",
        }
    }

    /// `model-<name>.gguf`.
    pub fn file_name(self) -> String {
        format!("model-{}.gguf", self.name())
    }

    /// `general.file_type` (llama.cpp's `LLAMA_FTYPE_MOSTLY_F16` = 1, `MOSTLY_Q8_0` = 7,
    /// `MOSTLY_Q4_K_M` = 15).
    pub fn file_type(self) -> u32 {
        match self {
            GgufType::F16 => 1,
            GgufType::Q8_0 => 7,
            GgufType::Q4KM => 15,
        }
    }

    /// The ggml type of the file's weight matrices (Q4_K_M: most of them; the export retypes
    /// the whole list with [`super::kquants::q4_k_m_types`], which needs every tensor's name).
    pub fn ggml_type(self) -> GgmlType {
        match self {
            GgufType::F16 => GgmlType::F16,
            GgufType::Q8_0 => GgmlType::Q8_0,
            GgufType::Q4KM => GgmlType::Q4_K,
        }
    }

    /// Whether a matrix of ggml type `t` in a file of this type is as the type intends (not a
    /// fallback for its row length).
    pub fn intended(self, t: GgmlType) -> bool {
        match self {
            GgufType::Q4KM => matches!(t, GgmlType::Q4_K | GgmlType::Q6_K),
            other => t == other.ggml_type(),
        }
    }

    /// The ggml type of the tensor `name` (its GGUF name, for file types that pick per tensor)
    /// of row-major `shape` in a file of this type: 1-D tensors (norms, biases) stay F32; the
    /// rest take the file's type, or F16 when a row is not a whole number of that type's blocks
    /// (as llama.cpp's converter falls back).
    pub fn tensor_type(self, name: &str, shape: &[usize]) -> GgmlType {
        let _ = name; // F16 and Q8_0 treat every matrix alike
        if shape.len() < 2 {
            return GgmlType::F32;
        }
        let want = self.ggml_type();
        let block = want.block_layout().map_or(1, |(b, _)| b as usize);
        if shape[shape.len() - 1].is_multiple_of(block) {
            want
        } else {
            GgmlType::F16
        }
    }
}

/// `values` (f32, storage order) encoded as `ty`.
pub fn encode(ty: GgmlType, values: &[f32]) -> Result<Vec<u8>> {
    Ok(match ty {
        GgmlType::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        GgmlType::F16 => values.iter().flat_map(|v| half::f16::from_f32(*v).to_bits().to_le_bytes()).collect(),
        GgmlType::Q8_0 if values.len().is_multiple_of(Q8_0_BLOCK) => quantize_q8_0(values),
        other => match super::kquants::quantize(other, values) {
            Some(bytes) => bytes,
            None => bail!("tuner does not write {other} tensors ({} values)", values.len()),
        },
    })
}

/// Q8_0 blocks of `values` (a multiple of 32 long): per block the f16 scale `d = max|x|/127`
/// (little-endian), then 32 signed bytes `round(x/d)`, rounding half away from zero.
pub fn quantize_q8_0(values: &[f32]) -> Vec<u8> {
    let mut out = vec![0u8; values.len() / Q8_0_BLOCK * 34];
    out.par_chunks_mut(34).zip(values.par_chunks(Q8_0_BLOCK)).for_each(|(o, x)| {
        let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        o[..2].copy_from_slice(&half::f16::from_f32(d).to_bits().to_le_bytes());
        for (q, v) in o[2..].iter_mut().zip(x) {
            *q = (v * id).round() as i8 as u8;
        }
    });
    out
}

/// The on-disk tag of a metadata value type.
pub fn value_tag(t: GgufValueType) -> u32 {
    use GgufValueType::*;
    match t {
        U8 => 0,
        I8 => 1,
        U16 => 2,
        I16 => 3,
        U32 => 4,
        I32 => 5,
        F32 => 6,
        Bool => 7,
        String => 8,
        Array => 9,
        U64 => 10,
        I64 => 11,
        F64 => 12,
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn put_value(out: &mut Vec<u8>, v: &GgufValue) {
    match v {
        GgufValue::U8(x) => out.push(*x),
        GgufValue::I8(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::Bool(x) => out.push(u8::from(*x)),
        GgufValue::String(s) => put_str(out, s),
        GgufValue::Array(a) => {
            out.extend_from_slice(&value_tag(a.elem_type).to_le_bytes());
            out.extend_from_slice(&(a.items.len() as u64).to_le_bytes());
            for item in &a.items {
                put_value(out, item);
            }
        }
        GgufValue::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
    }
}

fn align(x: u64) -> u64 {
    x.div_ceil(ALIGNMENT) * ALIGNMENT
}

/// One tensor of a file to write.
#[derive(Debug, Clone)]
pub struct TensorOut {
    /// GGUF name.
    pub name: String,
    /// Row-major shape (written innermost first).
    pub shape: Vec<usize>,
    /// Element type.
    pub ty: GgmlType,
}

impl TensorOut {
    fn n_bytes(&self) -> Result<u64> {
        let n: usize = self.shape.iter().product();
        let (block, size) = self.ty.block_layout().ok_or_else(|| anyhow!("unknown type {}", self.ty))?;
        if !(n as u64).is_multiple_of(block) {
            bail!("`{}`: {n} values of {} are not whole blocks", self.name, self.ty);
        }
        Ok(n as u64 / block * size)
    }
}

/// The header: counts, key/values, tensor infos (offsets relative to the aligned data start),
/// padded to the alignment; and the data section's size.
fn header(meta: &[(String, GgufValue)], tensors: &[TensorOut]) -> Result<(Vec<u8>, u64)> {
    let mut h = Vec::with_capacity(1 << 20);
    h.extend_from_slice(&GGUF_MAGIC);
    h.extend_from_slice(&3u32.to_le_bytes());
    h.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    h.extend_from_slice(&(meta.len() as u64).to_le_bytes());
    for (key, v) in meta {
        put_str(&mut h, key);
        h.extend_from_slice(&value_tag(v.value_type()).to_le_bytes());
        put_value(&mut h, v);
    }
    let mut offset = 0u64;
    for t in tensors {
        put_str(&mut h, &t.name);
        h.extend_from_slice(&(t.shape.len() as u32).to_le_bytes());
        for d in t.shape.iter().rev() {
            h.extend_from_slice(&(*d as u64).to_le_bytes());
        }
        h.extend_from_slice(&t.ty.to_u32().to_le_bytes());
        h.extend_from_slice(&offset.to_le_bytes());
        offset = align(offset + t.n_bytes()?);
    }
    h.resize(align(h.len() as u64) as usize, 0);
    Ok((h, offset))
}

/// Write a GGUF v3 file at `out`: `meta`, then `tensors` in order, the values of tensor `i`
/// given by `values(i)` (f32, row-major) and encoded as its type. Returns the tensor count per
/// ggml type name.
pub fn write_file(
    out: &Path,
    meta: &[(String, GgufValue)],
    tensors: &[TensorOut],
    label: &str,
    mut values: impl FnMut(usize) -> Result<Vec<f32>>,
) -> Result<BTreeMap<String, usize>> {
    let (head, data_len) = header(meta, tensors)?;
    let file = std::fs::File::create(out).with_context(|| format!("cannot create {}", out.display()))?;
    let mut w = BufWriter::with_capacity(8 << 20, file);
    let io = |e: std::io::Error| anyhow!("cannot write {}: {e}", out.display());
    w.write_all(&head).map_err(io)?;
    let mut pos = 0u64;
    let mut types: BTreeMap<String, usize> = BTreeMap::new();
    let bar = Progress::new(data_len, label, Unit::Bytes);
    for (i, t) in tensors.iter().enumerate() {
        let v = values(i)?;
        let n: usize = t.shape.iter().product();
        if v.len() != n {
            bail!("`{}`: {} values for shape {:?}", t.name, v.len(), t.shape);
        }
        let bytes = encode(t.ty, &v).with_context(|| format!("`{}`", t.name))?;
        w.write_all(&bytes).map_err(io)?;
        let end = align(pos + bytes.len() as u64);
        w.write_all(&vec![0u8; (end - pos - bytes.len() as u64) as usize]).map_err(io)?;
        bar.inc(end - pos);
        pos = end;
        *types.entry(t.ty.name()).or_default() += 1;
    }
    bar.finish();
    let file = w.into_inner().map_err(|e| io(e.into_error()))?;
    file.sync_all().map_err(io)?;
    Ok(types)
}
