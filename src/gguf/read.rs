//! GGUF reader: header, typed metadata, tensor infos, and tensors dequantized to f32.
//!
//! Follows the GGUF file-format specification (ggml's `docs/gguf.md`, versions 2 and 3,
//! little-endian): the magic `GGUF`, a `u32` version, `u64` tensor and metadata counts, the
//! metadata key/value pairs, the tensor infos, then the tensor data section, which starts at the
//! next multiple of `general.alignment` (default 32) and holds each tensor at its (aligned) offset.
//!
//! GGUF lists a tensor's dimensions innermost first (`ne[0]` is the length of a row);
//! [`TensorInfo::shape`] and [`GgufFile::tensor_f32`] return the row-major (PyTorch) shape, i.e.
//! the dimensions reversed.
//!
//! The file is memory-mapped; nothing but the header is read at [`GgufFile::open`].

use super::dequant::{dequantize, supported_list};
use super::types::{
    GgmlType, GgufArray, GgufMetadata, GgufValue, GgufValueType, TensorInfo, DEFAULT_ALIGNMENT, GGUF_MAGIC,
};
use anyhow::{anyhow, bail, Context, Result};
use memmap2::Mmap;
use std::collections::HashMap;
use std::fmt;
use std::fs::File;
use std::path::{Path, PathBuf};

/// Nesting limit for arrays of arrays in metadata (a guard against corrupt files).
const MAX_ARRAY_DEPTH: usize = 8;

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
        if !super::dequant::can_dequantize(info.ggml_type) {
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

/// A float metadata value; an f32 is widened through its shortest decimal form, so
/// that `1e-5f32` becomes `1e-5`, not `9.999999747378752e-6`.
pub(crate) fn meta_float(g: &GgufFile, key: &str) -> Result<Option<f64>> {
    match g.get(key) {
        Some(GgufValue::F32(v)) => Ok(Some(format!("{v}").parse::<f64>().unwrap_or(f64::from(*v)))),
        _ => g.get_f64(key),
    }
}

pub(crate) fn meta_usize(g: &GgufFile, key: &str) -> Result<Option<usize>> {
    g.get_u64(key)?
        .map(|v| {
            usize::try_from(v).map_err(|_| anyhow!("metadata `{key}` in {} is too large: {v}", g.path().display()))
        })
        .transpose()
}
