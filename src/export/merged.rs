//! `export/merged/`: LoRA folded into the base weights, saved as an HF model folder.
//!
//! For every adapted linear, `W' = W + scale · B·A` is computed in f32 from the
//! **dequantized** base as it was trained (a 4-bit base is dequantized first; the
//! merge never touches 4-bit codes; a dense base is read from its checkpoint), then
//! cast to the storage dtype (bf16, fp16 or fp32). Every other tensor is copied from
//! the base checkpoint under its own name and cast; a bnb-4bit one is dequantized.
//! `config.json` is the base's without `quantization_config`, with `torch_dtype` and
//! `dtype` set; tokenizer and generation files are copied.
//!
//! References: PEFT `tuners/lora/layer.py` (`Linear.get_delta_weight`: `B @ A * scaling`,
//! `merge`), transformers `modeling_utils.save_pretrained` (shards of at most
//! `max_shard_size`, named `model-00001-of-0000N.safetensors`, and
//! `model.safetensors.index.json` with `metadata.total_size` and `weight_map`), and the
//! safetensors format (`__metadata__: {"format": "pt"}`, which transformers checks).

use crate::model::{CausalLm, Linear, Weights};
use crate::quant::QuantTensor;
use crate::util;
use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

/// Largest shard transformers writes by default ("2GB" = 2·10⁹ bytes).
pub const MAX_SHARD_BYTES: u64 = 2_000_000_000;

/// The torch dtype name transformers writes in config.json for a kind.
pub fn dtype_name(kind: Kind) -> &'static str {
    match kind {
        Kind::BFloat16 => "bfloat16",
        Kind::Half => "float16",
        Kind::Double => "float64",
        _ => "float32",
    }
}

/// What [`write_merged`] wrote.
#[derive(Debug, Clone)]
pub struct MergeSummary {
    /// Tensors written.
    pub tensors: usize,
    /// Elements written.
    pub params: i64,
    /// Module paths whose LoRA was folded in.
    pub merged_modules: Vec<String>,
    /// Weight files, in order.
    pub shards: Vec<String>,
}

/// Order tensors as a checkpoint lists them: embeddings, then layer by layer (numerically), then the rest.
pub fn order_key(name: &str) -> (u8, u64, String) {
    if let Some(rest) = name.strip_prefix("model.layers.") {
        let (i, tail) = rest.split_once('.').unwrap_or((rest, ""));
        if let Ok(i) = i.parse::<u64>() {
            return (1, i, tail.to_string());
        }
    }
    let group = if name.contains("embed") { 0 } else { 2 };
    (group, 0, name.to_string())
}

/// `W + scale·B·A` in f32 for one linear: the base dequantized when it is 4-bit, else read
/// from the checkpoint (`name`) so that a dense base keeps its stored precision.
pub fn merged_weight(lin: &Linear, weights: &Weights, name: &str) -> Result<Tensor> {
    let _g = tch::no_grad_guard();
    let device = lin.device();
    let w = if lin.is_quantized() {
        lin.dense_weight(Kind::Float)
    } else {
        weights.get(name)?.to_device(device).to_kind(Kind::Float)
    };
    let want = lin.shape();
    if w.size() != want {
        bail!("`{name}` has shape {:?} in the checkpoint, but the model's linear is {want:?}", w.size());
    }
    Ok(match &lin.lora {
        Some(l) => {
            let delta = l.b.detach().to_kind(Kind::Float).matmul(&l.a.detach().to_kind(Kind::Float)) * l.scale;
            w + delta.to_device(device)
        }
        None => w,
    })
}

/// Merge the adapters of `model` (loaded from `base_dir`) and write the HF folder `out`.
pub fn write_merged(
    model: &dyn CausalLm,
    base_dir: &Path,
    out: &Path,
    store: Kind,
    max_shard_bytes: u64,
) -> Result<MergeSummary> {
    let mut weights = Weights::open(base_dir)?;
    weights.track("merge");
    let linears: HashMap<String, (String, &Linear)> =
        model.linears().into_iter().map(|(p, l)| (format!("{p}.weight"), (p, l))).collect();
    let names = weights.names();
    let bnb: HashSet<String> =
        names.iter().filter_map(|n| n.split_once(".weight.quant_state.").map(|(p, _)| p.to_string())).collect();
    let tied = model.config().tie_word_embeddings;
    let mut keep: Vec<String> = names
        .into_iter()
        .filter(|n| !n.ends_with("rotary_emb.inv_freq"))
        .filter(|n| !(tied && n == "lm_head.weight"))
        // bnb side tensors (`P.weight.absmax`, `P.weight.quant_state.…`) belong to `P.weight`.
        .filter(|n| !n.contains(".weight."))
        .collect();
    keep.sort_by_key(|n| order_key(n));
    let missing: Vec<&String> = linears.keys().filter(|k| !keep.contains(k)).collect();
    if !missing.is_empty() {
        bail!("the base checkpoint {} lacks linears the model has: {missing:?}", base_dir.display());
    }

    let mut writer = ShardWriter::new(out, max_shard_bytes);
    let mut merged_modules = Vec::new();
    let mut params = 0i64;
    for name in &keep {
        let t = if let Some((path, lin)) = linears.get(name) {
            if lin.lora.is_some() {
                merged_modules.push(path.clone());
            }
            merged_weight(lin, &weights, name)?
        } else if let Some(prefix) = name.strip_suffix(".weight").filter(|p| bnb.contains(*p)) {
            let get = |n: &str| weights.try_get(n).ok().flatten();
            QuantTensor::from_bnb(prefix, &get)?
                .with_context(|| format!("`{prefix}` has a quant_state but no readable 4-bit weight"))?
                .dequantize(Kind::Float)
        } else {
            weights.get(name)?
        };
        let t = if t.is_floating_point() { t.to_kind(store) } else { t };
        params += t.numel() as i64;
        writer.add(name, t.to_device(Device::Cpu).contiguous())?;
    }
    let tensors = keep.len();
    let shards = writer.finish()?;
    weights.finish();

    let mut cfg: Value = util::read_json(&base_dir.join("config.json"))?;
    let obj = cfg.as_object_mut().ok_or_else(|| anyhow!("{}/config.json is not an object", base_dir.display()))?;
    obj.remove("quantization_config");
    obj.insert("torch_dtype".into(), json!(dtype_name(store)));
    obj.insert("dtype".into(), json!(dtype_name(store)));
    util::write_json_atomic(&out.join("config.json"), &cfg)?;
    write_model_files(base_dir, out, &cfg)?;
    Ok(MergeSummary { tensors, params, merged_modules, shards })
}

/// Copy the tokenizer files; write `generation_config.json` from config.json when the base has none.
pub fn write_model_files(base_dir: &Path, out: &Path, cfg: &Value) -> Result<()> {
    let copied = copy_tokenizer_files(base_dir, out)?;
    if !copied.iter().any(|f| f == "generation_config.json") {
        let mut g = serde_json::Map::new();
        for k in ["bos_token_id", "eos_token_id", "pad_token_id"] {
            if let Some(v) = cfg.get(k).filter(|v| !v.is_null()) {
                g.insert(k.into(), v.clone());
            }
        }
        util::write_json_atomic(&out.join("generation_config.json"), &Value::Object(g))?;
    }
    Ok(())
}

/// The safetensors dtype of a kind.
fn st_dtype(kind: Kind) -> Result<safetensors::Dtype> {
    use safetensors::Dtype as D;
    Ok(match kind {
        Kind::BFloat16 => D::BF16,
        Kind::Half => D::F16,
        Kind::Float => D::F32,
        Kind::Double => D::F64,
        Kind::Uint8 => D::U8,
        Kind::Int8 => D::I8,
        Kind::Int16 => D::I16,
        Kind::Int => D::I32,
        Kind::Int64 => D::I64,
        Kind::Bool => D::BOOL,
        other => bail!("cannot store a tensor of kind {other:?} in safetensors"),
    })
}

/// The raw little-endian bytes of a contiguous CPU tensor.
pub fn tensor_bytes(t: &Tensor) -> Vec<u8> {
    let t = t.to_device(Device::Cpu).contiguous();
    let n = t.numel();
    let mut buf = vec![0u8; n * t.kind().elt_size_in_bytes()];
    t.copy_data_u8(&mut buf, n);
    buf
}

/// Write `tensors` as one safetensors file with `{"format": "pt"}` metadata.
pub fn write_safetensors(path: &Path, tensors: &[(String, Tensor)]) -> Result<()> {
    let mut data = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        let shape: Vec<usize> = t.size().iter().map(|&d| d as usize).collect();
        data.push((
            name.clone(),
            st_dtype(t.kind()).with_context(|| format!("tensor `{name}`"))?,
            shape,
            tensor_bytes(t),
        ));
    }
    let mut views = Vec::with_capacity(data.len());
    for (name, dtype, shape, bytes) in &data {
        let v = safetensors::tensor::TensorView::new(*dtype, shape.clone(), bytes)
            .map_err(|e| anyhow!("tensor `{name}`: {e}"))?;
        views.push((name.clone(), v));
    }
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize_to_file(views, Some(meta), path).map_err(|e| anyhow!("cannot write {}: {e}", path.display()))
}

/// Writes tensors into shards of at most `max` bytes (a larger tensor gets a shard of its
/// own), then names them as transformers does and writes the index when there are several.
pub struct ShardWriter {
    dir: PathBuf,
    max: u64,
    pending: Vec<(String, Tensor)>,
    pending_bytes: u64,
    parts: Vec<(PathBuf, Vec<String>)>,
    total: u64,
}

impl ShardWriter {
    /// Shards go into `dir`.
    pub fn new(dir: &Path, max: u64) -> ShardWriter {
        ShardWriter { dir: dir.to_path_buf(), max, pending: Vec::new(), pending_bytes: 0, parts: Vec::new(), total: 0 }
    }

    /// Add one tensor (CPU, contiguous).
    pub fn add(&mut self, name: &str, t: Tensor) -> Result<()> {
        let bytes = (t.numel() * t.kind().elt_size_in_bytes()) as u64;
        if !self.pending.is_empty() && self.pending_bytes + bytes > self.max {
            self.flush()?;
        }
        self.pending.push((name.to_string(), t));
        self.pending_bytes += bytes;
        self.total += bytes;
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let path = self.dir.join(format!(".part-{:05}.safetensors", self.parts.len() + 1));
        write_safetensors(&path, &self.pending)?;
        let names = self.pending.drain(..).map(|(n, _)| n).collect();
        self.parts.push((path, names));
        self.pending_bytes = 0;
        Ok(())
    }

    /// Write what is left; name the files; write the index if sharded. Returns the file names.
    pub fn finish(mut self) -> Result<Vec<String>> {
        self.flush()?;
        let n = self.parts.len();
        if n == 0 {
            bail!("no tensors to write into {}", self.dir.display());
        }
        if n == 1 {
            let dest = self.dir.join("model.safetensors");
            std::fs::rename(&self.parts[0].0, &dest)?;
            return Ok(vec!["model.safetensors".into()]);
        }
        let mut weight_map = BTreeMap::new();
        let mut files = Vec::with_capacity(n);
        for (i, (path, names)) in self.parts.iter().enumerate() {
            let file = format!("model-{:05}-of-{n:05}.safetensors", i + 1);
            std::fs::rename(path, self.dir.join(&file))?;
            for name in names {
                weight_map.insert(name.clone(), file.clone());
            }
            files.push(file);
        }
        let index = json!({ "metadata": { "total_size": self.total }, "weight_map": weight_map });
        util::write_json_atomic(&self.dir.join("model.safetensors.index.json"), &index)?;
        Ok(files)
    }
}

/// Copy the tokenizer and generation files of an HF folder that exist (never the weights or config).
pub fn copy_tokenizer_files(from: &Path, to: &Path) -> Result<Vec<String>> {
    const NAMES: [&str; 10] = [
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "added_tokens.json",
        "chat_template.jinja",
        "chat_template.json",
        "tokenizer.model",
        "vocab.json",
        "merges.txt",
        "generation_config.json",
    ];
    let mut copied = Vec::new();
    for n in NAMES {
        let src = from.join(n);
        if src.is_file() {
            std::fs::copy(&src, to.join(n)).with_context(|| format!("cannot copy {}", src.display()))?;
            copied.push(n.to_string());
        }
    }
    Ok(copied)
}
