//! Tensors of an HF model folder: one `model.safetensors`, or shards listed by
//! `model.safetensors.index.json` (`weight_map`: name → file).
//!
//! Reference: the safetensors format (8-byte header length, JSON header, raw
//! little-endian data) as read by `transformers.modeling_utils`. Files are memory-mapped
//! and a tensor is copied out only when asked for, so loading peaks at about one
//! tensor above the final model size; [`Weights::mapped`] lends a tensor that reads the
//! mapped file itself (no copy; for large host-side tables). bitsandbytes U8 tensors come
//! back as they are.

use std::cell::RefCell;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use memmap2::Mmap;
use safetensors::tensor::{Dtype, TensorInfo};
use safetensors::SafeTensors;
use tch::{Kind, Tensor};

use crate::progress::{Progress, Unit};

/// One mapped safetensors file.
struct Shard {
    path: PathBuf,
    map: Arc<Mmap>,
    data_start: usize,
}

/// A tensor that reads a memory-mapped checkpoint file in place; the mapping lives as long as
/// this value. Read-only: the pages are mapped without write access.
pub struct MappedTensor {
    /// The tensor over the mapped bytes (CPU).
    pub tensor: Tensor,
    _map: Arc<Mmap>,
}

/// The tensors of a model folder, by checkpoint name.
pub struct Weights {
    dir: PathBuf,
    shards: Vec<Shard>,
    index: HashMap<String, (usize, TensorInfo)>,
    used: RefCell<HashSet<String>>,
    /// Bytes read so far, when [`Weights::track`] asked for progress.
    progress: Progress,
}

impl Weights {
    /// Map the safetensors of `dir` (sharded when `model.safetensors.index.json` exists).
    pub fn open(dir: &Path) -> Result<Weights> {
        let index_path = dir.join("model.safetensors.index.json");
        let files: Vec<PathBuf> = if index_path.exists() {
            let text = std::fs::read_to_string(&index_path)
                .with_context(|| format!("cannot read {}", index_path.display()))?;
            let json: serde_json::Value =
                serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", index_path.display()))?;
            let map = json
                .get("weight_map")
                .and_then(|m| m.as_object())
                .with_context(|| format!("{} has no `weight_map`", index_path.display()))?;
            let names: BTreeSet<&str> = map.values().filter_map(|v| v.as_str()).collect();
            names.into_iter().map(|f| dir.join(f)).collect()
        } else if dir.join("model.safetensors").exists() {
            vec![dir.join("model.safetensors")]
        } else {
            bail!("no model.safetensors or model.safetensors.index.json in {}", dir.display());
        };
        let mut shards = Vec::new();
        let mut index = HashMap::new();
        for path in files {
            let file = std::fs::File::open(&path).with_context(|| format!("cannot open {}", path.display()))?;
            // SAFETY: the file is only read; a concurrent writer would corrupt values, not memory safety of the map.
            let map = unsafe { Mmap::map(&file) }.with_context(|| format!("cannot map {}", path.display()))?;
            let (header_len, meta) = SafeTensors::read_metadata(&map)
                .map_err(|e| anyhow::anyhow!("{}: not a safetensors file: {e}", path.display()))?;
            for (name, info) in meta.tensors() {
                index.insert(name, (shards.len(), info.clone()));
            }
            shards.push(Shard { path, map: Arc::new(map), data_start: 8 + header_len });
        }
        Ok(Weights {
            dir: dir.to_path_buf(),
            shards,
            index,
            used: RefCell::new(HashSet::new()),
            progress: Progress::hidden(),
        })
    }

    /// Report progress over the checkpoint's bytes as tensors are read (`what`: e.g. "load");
    /// [`Weights::finish`] ends it. Tensors that are never read (other towers) are not waited for.
    pub fn track(&mut self, what: &str) {
        let total: usize = self.index.values().map(|(_, info)| info.data_offsets.1 - info.data_offsets.0).sum();
        self.progress = Progress::new(total as u64, what, Unit::Bytes);
    }

    /// End the progress started by [`Weights::track`].
    pub fn finish(&self) {
        self.progress.finish();
    }

    /// Record that `name` was read.
    fn mark_used(&self, name: &str, info: &TensorInfo) {
        if self.used.borrow_mut().insert(name.to_string()) {
            self.progress.inc((info.data_offsets.1 - info.data_offsets.0) as u64);
        }
    }

    /// The folder these weights come from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Whether the checkpoint holds `name`.
    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    /// Every tensor name, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.index.keys().cloned().collect();
        names.sort();
        names
    }

    /// The tensor `name` on the CPU in its stored dtype; an error names it and the folder when absent.
    pub fn get(&self, name: &str) -> Result<Tensor> {
        self.try_get(name)?.with_context(|| format!("cannot find tensor `{name}` in {}", self.dir.display()))
    }

    /// The tensor `name`, or `None` when the checkpoint has no such tensor.
    pub fn try_get(&self, name: &str) -> Result<Option<Tensor>> {
        let Some((shard, info)) = self.index.get(name) else { return Ok(None) };
        let shard = &self.shards[*shard];
        let kind = torch_kind(info.dtype).with_context(|| {
            format!("tensor `{name}` in {} has unsupported dtype {}", shard.path.display(), info.dtype)
        })?;
        let (start, end) = info.data_offsets;
        let bytes = shard
            .map
            .get(shard.data_start + start..shard.data_start + end)
            .with_context(|| format!("tensor `{name}` lies outside {}", shard.path.display()))?;
        let shape: Vec<i64> = info.shape.iter().map(|&d| d as i64).collect();
        let t = Tensor::f_from_data_size(bytes, &shape, kind)
            .with_context(|| format!("cannot read tensor `{name}` from {}", shard.path.display()))?;
        self.mark_used(name, info);
        Ok(Some(t))
    }

    /// The tensor `name` read in place from the mapped file (no copy), when it is stored as
    /// `kind` and suitably aligned; `None` otherwise (then use [`Weights::get`]).
    pub fn mapped(&self, name: &str, kind: Kind) -> Option<MappedTensor> {
        let (shard, info) = self.index.get(name)?;
        let shard = &self.shards[*shard];
        if torch_kind(info.dtype) != Some(kind) {
            return None;
        }
        let (start, end) = info.data_offsets;
        let bytes = shard.map.get(shard.data_start + start..shard.data_start + end)?;
        let elem = kind.elt_size_in_bytes();
        let shape: Vec<i64> = info.shape.iter().map(|&d| d as i64).collect();
        if !(bytes.as_ptr() as usize).is_multiple_of(elem)
            || shape.iter().product::<i64>() as usize * elem != bytes.len()
        {
            return None;
        }
        // SAFETY: the bytes stay mapped while `_map` lives (the Arc is held next to the tensor),
        // they hold `shape` elements of `kind` (checked above), and nothing writes through it.
        let tensor = unsafe { Tensor::from_blob(bytes.as_ptr(), &shape, &[], kind, tch::Device::Cpu) };
        self.mark_used(name, info);
        Some(MappedTensor { tensor, _map: shard.map.clone() })
    }

    /// Mark `name` as deliberately not read (e.g. a tower the text decoder does not use, or
    /// weights the family recomputes); returns whether the checkpoint holds it.
    pub fn ignore(&self, name: &str) -> bool {
        let held = self.index.contains_key(name);
        if held {
            self.used.borrow_mut().insert(name.to_string());
        }
        held
    }

    /// Names never read through [`Weights::get`]/[`Weights::try_get`], sorted.
    pub fn unused(&self) -> Vec<String> {
        let used = self.used.borrow();
        let mut names: Vec<String> = self.index.keys().filter(|n| !used.contains(*n)).cloned().collect();
        names.sort();
        names
    }

    /// Every tensor of the folder, by name, on the CPU in its stored dtype.
    pub fn load_all(dir: &Path) -> Result<HashMap<String, Tensor>> {
        let w = Weights::open(dir)?;
        w.names().into_iter().map(|n| Ok((n.clone(), w.get(&n)?))).collect()
    }
}

/// safetensors dtype → libtorch kind.
fn torch_kind(dtype: Dtype) -> Option<Kind> {
    Some(match dtype {
        Dtype::BOOL => Kind::Bool,
        Dtype::U8 => Kind::Uint8,
        Dtype::I8 => Kind::Int8,
        Dtype::I16 => Kind::Int16,
        Dtype::I32 => Kind::Int,
        Dtype::I64 => Kind::Int64,
        Dtype::F16 => Kind::Half,
        Dtype::BF16 => Kind::BFloat16,
        Dtype::F32 => Kind::Float,
        Dtype::F64 => Kind::Double,
        _ => return None,
    })
}
