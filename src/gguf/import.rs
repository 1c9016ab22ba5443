//! Import a GGUF model into a Hugging Face-layout folder that the rest of tuner (and
//! transformers) can load: `config.json`, `model.safetensors` (F32), `tokenizer.json`,
//! `tokenizer_config.json` and `generation_config.json`.
//!
//! It undoes what llama.cpp's HF→GGUF converter (`convert_hf_to_gguf.py`) does, for the
//! architectures in [`SUPPORTED_ARCHITECTURES`]: the tensor renaming (the two-way table in
//! [`super::names`]), for `llama` the row permutation of the Q and K projections
//! ([`unpermute_rows`]: `w.reshape(n_head, rows/n_head/2, 2, cols).swapaxes(1, 2)`), Gemma 2/3's
//! `1 + w` norm weights, Gemma 3n's stacked AltUp projections, the `{arch}.*` hyper-parameter
//! keys (config.json per [`super::hf_config`]) and the `tokenizer.ggml.*` vocabulary keys
//! ([`super::tokenizer`], [`super::spm_vocab`]; GGUF spec, "Standardized key-value pairs").
//!
//! Every file is written atomically (temp name in `out_dir`, then rename), and `config.json` is
//! written last, so a folder with a `config.json` is complete.

pub use super::arch::unpermute_rows;
use super::arch::GgufArch;
use super::hf_config::config_json;
use super::names::{HfSource, Names};
use super::read::{meta_float, meta_usize, GgufFile};
use super::tokenizer::{generation_config_json, tokenizer_config_json, tokenizer_json};
use super::types::{GgufValue, TensorInfo};
use crate::progress::{Progress, Unit};
use crate::util::{temp_path, write_atomic, write_json_atomic};
use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Map, Value};
use std::fs;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

/// The GGUF architectures [`import_gguf`] converts.
pub const SUPPORTED_ARCHITECTURES: [GgufArch; 5] =
    [GgufArch::Llama, GgufArch::Phi3, GgufArch::Gemma2, GgufArch::Gemma3, GgufArch::Gemma3n];

/// What [`import_gguf`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportSummary {
    /// The GGUF `general.architecture` (`llama`).
    pub architecture: String,
    /// Number of tensors written to `model.safetensors`.
    pub tensors: usize,
    /// Total number of parameters (elements) written.
    pub params: u64,
    /// The files written, in the order they were written.
    pub files: Vec<PathBuf>,
}

pub use super::hf_config::Params;

/// Convert the GGUF file `gguf` into an HF-layout folder `out_dir` (created if needed; files
/// already there with the same names are replaced).
///
/// Only the architectures in [`SUPPORTED_ARCHITECTURES`] with a `gpt2` (byte-level BPE) or
/// `llama` (SentencePiece) tokenizer are supported; anything else is refused, by name, before
/// anything is written.
pub fn import_gguf(gguf: &Path, out_dir: &Path) -> Result<ImportSummary> {
    let g = GgufFile::open(gguf)?;
    let shown = gguf.display();
    let name = g
        .get_str("general.architecture")?
        .ok_or_else(|| anyhow!("{shown} has no general.architecture; cannot tell which model it holds"))?
        .to_string();
    let Some(arch) = GgufArch::from_name(&name).filter(|a| SUPPORTED_ARCHITECTURES.contains(a)) else {
        bail!(
            "{shown}: GGUF architecture `{name}` is not supported by the importer; supported: {}",
            SUPPORTED_ARCHITECTURES.map(GgufArch::name).join(", ")
        );
    };

    // Everything that can be refused is checked before the first write.
    let hp = params(&g, arch)?;
    let plan = tensor_plan(&g, &hp)?;
    let tokenizer = tokenizer_json(&g)?;
    let tokenizer_config = tokenizer_config_json(&g, hp.max_position_embeddings)?;
    let generation_config = generation_config_json(&g)?;
    let config = config_json(&g, &hp)?;

    fs::create_dir_all(out_dir).with_context(|| format!("cannot create folder {}", out_dir.display()))?;
    let mut files = Vec::new();

    let path = out_dir.join("tokenizer.json");
    write_atomic(&path, &serde_json::to_vec(&tokenizer)?)?;
    files.push(path);
    for (name, value) in [("tokenizer_config.json", &tokenizer_config), ("generation_config.json", &generation_config)]
    {
        let path = out_dir.join(name);
        write_json_atomic(&path, value)?;
        files.push(path);
    }

    let path = out_dir.join("model.safetensors");
    let params = write_safetensors(&g, &plan, &path)?;
    files.push(path);

    let path = out_dir.join("config.json");
    write_json_atomic(&path, &config)?;
    files.push(path);

    log::info!("imported {shown} ({name}, {} tensors, {params} parameters) into {}", plan.len(), out_dir.display());
    Ok(ImportSummary { architecture: name, tensors: plan.len(), params, files })
}

pub(crate) fn require_usize(g: &GgufFile, key: &str) -> Result<usize> {
    meta_usize(g, key)?.ok_or_else(|| anyhow!("metadata `{key}` is missing from {}", g.path().display()))
}

/// `{arch}.feed_forward_length`: one width, or (Gemma 3n) one per layer.
fn ffn_lengths(g: &GgufFile, arch: GgufArch, key: &str, layers: usize) -> Result<Vec<usize>> {
    let shown = g.path().display();
    match g.get(key) {
        Some(GgufValue::Array(a)) if arch == GgufArch::Gemma3n => {
            let v: Vec<usize> = a
                .items
                .iter()
                .map(|x| x.as_u64().map(|v| v as usize).ok_or_else(|| anyhow!("{shown}: `{key}` holds a non-integer")))
                .collect::<Result<_>>()?;
            if v.len() != layers {
                bail!("{shown}: `{key}` has {} entries for {layers} layers", v.len());
            }
            Ok(v)
        }
        Some(GgufValue::Array(_)) => {
            bail!("{shown}: per-layer feed_forward_length is not supported for {arch} (its HF config has one intermediate_size)")
        }
        _ => Ok(vec![require_usize(g, key)?; layers]),
    }
}

/// The attention shape: heads, key/value heads, head size; checked against each other.
fn attention_shape(g: &GgufFile, key: &dyn Fn(&str) -> String, hidden_size: usize) -> Result<(usize, usize, usize)> {
    let shown = g.path().display();
    let num_attention_heads = require_usize(g, &key("attention.head_count"))?;
    let num_key_value_heads = meta_usize(g, &key("attention.head_count_kv"))?.unwrap_or(num_attention_heads);
    if num_attention_heads == 0 || num_key_value_heads == 0 || num_attention_heads % num_key_value_heads != 0 {
        bail!(
            "{shown}: {num_attention_heads} attention heads cannot be shared by {num_key_value_heads} key/value heads"
        );
    }
    let head_dim = match meta_usize(g, &key("attention.key_length"))? {
        Some(d) => d,
        None if hidden_size.is_multiple_of(num_attention_heads) => hidden_size / num_attention_heads,
        None => bail!("{shown}: hidden size {hidden_size} is not a multiple of {num_attention_heads} heads"),
    };
    if let Some(v) = meta_usize(g, &key("attention.value_length"))? {
        if v != head_dim {
            bail!("{shown}: value head size {v} differs from key head size {head_dim}; HF needs them equal");
        }
    }
    if let Some(r) = meta_usize(g, &key("rope.dimension_count"))? {
        if r != head_dim {
            bail!(
                "{shown}: rotary dimension {r} differs from the head size {head_dim} (partial rotary is not supported)"
            );
        }
    }
    if head_dim % 2 != 0 {
        bail!("{shown}: head size {head_dim} is odd; rotary embeddings need an even head size");
    }
    Ok((num_attention_heads, num_key_value_heads, head_dim))
}

/// `{arch}.rope.scaling.*` as HF's `rope_scaling`; refuses `rope_freqs` (Llama 3.1 factors).
fn rope_scaling(g: &GgufFile, key: &dyn Fn(&str) -> String) -> Result<Value> {
    let shown = g.path().display();
    let scaling = match g.get_str(&key("rope.scaling.type"))? {
        None | Some("none") => Value::Null,
        Some("linear") => {
            let factor = meta_float(g, &key("rope.scaling.factor"))?
                .ok_or_else(|| anyhow!("{shown}: linear rope scaling without `{}`", key("rope.scaling.factor")))?;
            json!({ "rope_type": "linear", "factor": factor })
        }
        Some(other) => bail!("{shown}: rope scaling `{other}` is not supported by the importer (only none and linear)"),
    };
    if g.tensor("rope_freqs.weight").is_some() {
        bail!("{shown} has rope frequency factors (`rope_freqs.weight`, llama-3.1-style rope scaling), which the importer does not support");
    }
    Ok(scaling)
}

/// The hyper-parameters of `g` under its own `general.architecture` (any architecture tuner
/// knows, importable or not; `tuner plan` sizes a model from them).
pub fn file_params(g: &GgufFile) -> Result<Params> {
    let name = g.require_str("general.architecture")?;
    let arch = GgufArch::from_name(name)
        .ok_or_else(|| anyhow!("{}: GGUF architecture `{name}` is not one tuner knows", g.path().display()))?;
    params(g, arch)
}

/// Read the hyper-parameters of `g` and check them against its tensors.
pub fn params(g: &GgufFile, arch: GgufArch) -> Result<Params> {
    let shown = g.path().display();
    let key = |k: &str| format!("{arch}.{k}");
    if let Some(n) = g.get_u64(&key("expert_count"))? {
        if n > 0 {
            bail!("{shown} is a mixture-of-experts model ({n} experts); the importer handles dense models only");
        }
    }
    let hidden_size = require_usize(g, &key("embedding_length"))?;
    let num_hidden_layers = require_usize(g, &key("block_count"))?;
    let intermediate_sizes = ffn_lengths(g, arch, &key("feed_forward_length"), num_hidden_layers)?;
    let (num_attention_heads, num_key_value_heads, head_dim) = attention_shape(g, &key, hidden_size)?;
    let rms_norm_eps = meta_float(g, &key("attention.layer_norm_rms_epsilon"))?
        .ok_or_else(|| anyhow!("metadata `{}` is missing from {shown}", key("attention.layer_norm_rms_epsilon")))?;
    let rope_theta = meta_float(g, &key("rope.freq_base"))?.unwrap_or(10000.0);
    let max_position_embeddings = require_usize(g, &key("context_length"))?;
    let rope_scaling = rope_scaling(g, &key)?;

    let embd = g.tensor("token_embd.weight").ok_or_else(|| anyhow!("{shown} has no `token_embd.weight` tensor"))?;
    let embd_shape = embd.shape();
    if embd_shape.len() != 2 || embd_shape[1] != hidden_size {
        bail!("{shown}: `token_embd.weight` has shape {embd_shape:?}, expected [vocab, {hidden_size}]");
    }
    let vocab_size = embd_shape[0];
    if let Some(v) = meta_usize(g, &key("vocab_size"))? {
        if v != vocab_size {
            bail!("{shown}: {} says {v} but `token_embd.weight` has {vocab_size} rows", key("vocab_size"));
        }
    }

    let has = |suffix: &str| g.tensors().iter().any(|t| t.name.starts_with("blk.") && t.name.ends_with(suffix));
    let attention_bias = ["attn_q.bias", "attn_k.bias", "attn_v.bias", "attn_output.bias"].iter().any(|s| has(s));
    let mlp_bias = ["ffn_gate.bias", "ffn_up.bias", "ffn_down.bias"].iter().any(|s| has(s));
    Ok(Params {
        arch,
        hidden_size,
        intermediate_size: intermediate_sizes.first().copied().unwrap_or(0),
        intermediate_sizes,
        num_hidden_layers,
        num_attention_heads,
        num_key_value_heads,
        head_dim,
        rms_norm_eps,
        rope_theta,
        max_position_embeddings,
        vocab_size,
        tie_word_embeddings: g.tensor("output.weight").is_none(),
        attention_bias,
        mlp_bias,
        rope_scaling,
    })
}

/// Module order inside one decoder layer of the written file.
const LAYER_ORDER: [&str; 16] = [
    "self_attn.q_proj.weight",
    "self_attn.q_proj.bias",
    "self_attn.k_proj.weight",
    "self_attn.k_proj.bias",
    "self_attn.v_proj.weight",
    "self_attn.v_proj.bias",
    "self_attn.o_proj.weight",
    "self_attn.o_proj.bias",
    "mlp.gate_proj.weight",
    "mlp.gate_proj.bias",
    "mlp.up_proj.weight",
    "mlp.up_proj.bias",
    "mlp.down_proj.weight",
    "mlp.down_proj.bias",
    "input_layernorm.weight",
    "post_attention_layernorm.weight",
];

/// One tensor to write: where it comes from, its HF name and shape, and how its values are
/// restored (rows un-permuted over this many heads, a slice of a stacked tensor, a norm shift).
#[derive(Debug, Clone)]
struct Planned<'a> {
    hf_name: String,
    info: &'a TensorInfo,
    shape: Vec<usize>,
    unpermute_heads: Option<usize>,
    slice: Option<usize>,
    shift: f32,
    order: Order,
}

fn expected_shape(module: &str, hp: &Params) -> Option<Vec<usize>> {
    let (h, i) = (hp.hidden_size, hp.intermediate_size);
    let q = hp.num_attention_heads * hp.head_dim;
    let kv = hp.num_key_value_heads * hp.head_dim;
    Some(match module {
        "self_attn.q_proj.weight" => vec![q, h],
        "self_attn.k_proj.weight" | "self_attn.v_proj.weight" => vec![kv, h],
        "self_attn.o_proj.weight" => vec![h, q],
        "mlp.gate_proj.weight" | "mlp.up_proj.weight" => vec![i, h],
        "mlp.down_proj.weight" => vec![h, i],
        "self_attn.q_proj.bias" => vec![q],
        "self_attn.k_proj.bias" | "self_attn.v_proj.bias" => vec![kv],
        "self_attn.o_proj.bias" | "mlp.down_proj.bias" => vec![h],
        "mlp.gate_proj.bias" | "mlp.up_proj.bias" => vec![i],
        "input_layernorm.weight" | "post_attention_layernorm.weight" => vec![h],
        _ => return None,
    })
}

/// An HF tensor a GGUF tensor becomes: name, shape, index of its slice of a stacked tensor.
type HfTarget = (String, Vec<usize>, Option<usize>);

/// Where a tensor goes in the written file: group (embeddings, layers, the rest, head), layer,
/// slot in [`LAYER_ORDER`], name.
type Order = (usize, usize, usize, String);

/// The HF tensors a GGUF tensor becomes: (name, shape, slice index) — one, or one per slice of
/// a stacked tensor.
fn hf_targets(names: &Names, info: &TensorInfo, shown: &str) -> Result<Vec<HfTarget>> {
    let shape = info.shape();
    match names.to_hf(&info.name) {
        Some(HfSource::One(hf)) => Ok(vec![(hf, shape, None)]),
        Some(HfSource::Stacked(prefix)) if shape.len() >= 2 => {
            Ok((0..shape[0]).map(|i| (format!("{prefix}.{i}.weight"), shape[1..].to_vec(), Some(i))).collect())
        }
        _ => bail!("{shown}: tensor `{}` has no counterpart in an HF model; the importer cannot place it", info.name),
    }
}

/// Where a tensor goes in the written file: (group, layer, slot, name), with its expected shape
/// for a llama layer.
fn placement(hf: &str, hp: &Params, shown: &str) -> Result<(Order, Option<Vec<usize>>)> {
    let Some(rest) = hf.strip_prefix("model.layers.") else {
        let group = match hf {
            "model.embed_tokens.weight" => 0,
            "lm_head.weight" => 3,
            _ => 2,
        };
        let expected = match (hp.arch, hf) {
            (GgufArch::Llama, "model.embed_tokens.weight" | "lm_head.weight") => {
                Some(vec![hp.vocab_size, hp.hidden_size])
            }
            (GgufArch::Llama, "model.norm.weight") => Some(vec![hp.hidden_size]),
            _ => None,
        };
        return Ok(((group, 0, 0, hf.to_string()), expected));
    };
    let (layer, module) = rest.split_once('.').unwrap_or((rest, ""));
    let layer: usize = layer.parse().map_err(|_| anyhow!("{shown}: bad layer index in `{hf}`"))?;
    if layer >= hp.num_hidden_layers {
        bail!("{shown}: tensor `{hf}` is for layer {layer}, but the model has {} layers", hp.num_hidden_layers);
    }
    let slot = LAYER_ORDER.iter().position(|m| *m == module).unwrap_or(LAYER_ORDER.len());
    let expected = match hp.arch {
        GgufArch::Llama => Some(
            expected_shape(module, hp).ok_or_else(|| anyhow!("{shown}: tensor `{hf}` has no HF llama counterpart"))?,
        ),
        _ => None,
    };
    Ok(((1, layer, slot, module.to_string()), expected))
}

/// Map, check and order every tensor of `g`; errors name the file and the tensor.
fn tensor_plan<'a>(g: &'a GgufFile, hp: &Params) -> Result<Vec<Planned<'a>>> {
    let shown = g.path().display().to_string();
    let names = Names::of(hp.arch);
    let mut plan = Vec::with_capacity(g.tensors().len());
    for info in g.tensors() {
        if !super::dequant::can_dequantize(info.ggml_type) {
            bail!(
                "unsupported GGUF tensor type {} in `{}` of {shown}; supported: {}",
                info.ggml_type,
                info.name,
                super::dequant::supported_list()
            );
        }
        for (hf_name, shape, slice) in hf_targets(&names, info, &shown)? {
            let (order, expected) = placement(&hf_name, hp, &shown)?;
            if let Some(expected) = expected.filter(|e| *e != shape) {
                bail!("{shown}: tensor `{}` has shape {shape:?}, expected {expected:?} for `{hf_name}`", info.name);
            }
            let heads = match (hp.arch.permute_qk(), order.3.as_str()) {
                (true, "self_attn.q_proj.weight" | "self_attn.q_proj.bias") => Some(hp.num_attention_heads),
                (true, "self_attn.k_proj.weight" | "self_attn.k_proj.bias") => Some(hp.num_key_value_heads),
                _ => None,
            };
            let shift = if hf_name.ends_with("norm.weight") { hp.arch.norm_shift() } else { 0.0 };
            plan.push(Planned { hf_name, info, shape, unpermute_heads: heads, slice, shift, order });
        }
    }
    if hp.arch == GgufArch::Llama {
        check_complete(&plan, hp, &shown)?;
    }
    plan.sort_by(|a, b| a.order.cmp(&b.order));
    Ok(plan)
}

/// A llama model's file must hold every tensor the HF model needs.
fn check_complete(plan: &[Planned<'_>], hp: &Params, shown: &str) -> Result<()> {
    let mut missing = Vec::new();
    let names: std::collections::HashSet<&str> = plan.iter().map(|p| p.hf_name.as_str()).collect();
    for top in ["model.embed_tokens.weight", "model.norm.weight"] {
        if !names.contains(top) {
            missing.push(top.to_string());
        }
    }
    for layer in 0..hp.num_hidden_layers {
        for module in LAYER_ORDER {
            let is_attn_bias = module.starts_with("self_attn.") && module.ends_with(".bias");
            let is_mlp_bias = module.starts_with("mlp.") && module.ends_with(".bias");
            let needed =
                (!is_attn_bias && !is_mlp_bias) || (is_attn_bias && hp.attention_bias) || (is_mlp_bias && hp.mlp_bias);
            let name = format!("model.layers.{layer}.{module}");
            if needed && !names.contains(name.as_str()) {
                missing.push(name);
            }
        }
    }
    if !missing.is_empty() {
        let shown_missing: Vec<_> = missing.iter().take(6).cloned().collect();
        bail!(
            "{shown} lacks {} tensor(s) a llama model needs: {}{}",
            missing.len(),
            shown_missing.join(", "),
            if missing.len() > 6 { ", ..." } else { "" }
        );
    }
    Ok(())
}

/// The HF values of one planned tensor.
fn hf_values(g: &GgufFile, p: &Planned<'_>) -> Result<Vec<f32>> {
    let (mut values, _) = g.tensor_f32(&p.info.name)?;
    if let Some(i) = p.slice {
        let n: usize = p.shape.iter().product();
        values = values[i * n..(i + 1) * n].to_vec();
    }
    if let Some(heads) = p.unpermute_heads {
        values = unpermute_rows(&values, p.shape[0], heads)
            .with_context(|| format!("`{}` of {}", p.info.name, g.path().display()))?;
    }
    if p.shift != 0.0 {
        values.iter_mut().for_each(|v| *v -= p.shift);
    }
    Ok(values)
}

/// Removes a temp file unless disarmed (on every early return of a failed write).
struct TempFile {
    path: PathBuf,
    keep: bool,
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.keep {
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// Write `plan` as an F32 safetensors file at `dest`, one tensor in memory at a
/// time, through a temp file that is checked and then renamed. Returns the
/// number of parameters written.
fn write_safetensors(g: &GgufFile, plan: &[Planned<'_>], dest: &Path) -> Result<u64> {
    let mut header = Map::new();
    header.insert("__metadata__".into(), json!({ "format": "pt" }));
    let mut offset = 0u64;
    let mut params = 0u64;
    for p in plan {
        let n = p.shape.iter().product::<usize>() as u64;
        let end = offset + 4 * n;
        header.insert(p.hf_name.clone(), json!({ "dtype": "F32", "shape": p.shape, "data_offsets": [offset, end] }));
        offset = end;
        params += n;
    }
    let mut header = serde_json::to_vec(&Value::Object(header))?;
    // The data must start 8-aligned: pad the JSON with spaces, as the format allows.
    while header.len() % 8 != 0 {
        header.push(b' ');
    }

    let tmp = TempFile { path: temp_path(dest), keep: false };
    let file = fs::File::create(&tmp.path).with_context(|| format!("cannot create {}", tmp.path.display()))?;
    let mut w = BufWriter::with_capacity(8 << 20, file);
    let io = |e: std::io::Error| anyhow!("cannot write {}: {e}", tmp.path.display());
    w.write_all(&(header.len() as u64).to_le_bytes()).map_err(io)?;
    w.write_all(&header).map_err(io)?;
    let mut buf = vec![0u8; 1 << 16];
    let bar = Progress::new(offset, "import gguf", Unit::Bytes);
    for p in plan {
        let values = hf_values(g, p)?;
        for chunk in values.chunks(buf.len() / 4) {
            for (dst, v) in buf.chunks_exact_mut(4).zip(chunk) {
                dst.copy_from_slice(&v.to_le_bytes());
            }
            w.write_all(&buf[..chunk.len() * 4]).map_err(io)?;
        }
        bar.inc(4 * values.len() as u64);
    }
    bar.finish();
    let file = w.into_inner().map_err(|e| io(e.into_error()))?;
    file.sync_all().map_err(io)?;
    drop(file);

    // Check what was written with the safetensors crate before it replaces anything.
    let check = fs::File::open(&tmp.path).with_context(|| format!("cannot reopen {}", tmp.path.display()))?;
    // SAFETY: a read-only map of a file only this function writes.
    let map = unsafe { memmap2::Mmap::map(&check) }.with_context(|| format!("cannot map {}", tmp.path.display()))?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(&map)
        .map_err(|e| anyhow!("the safetensors file just written ({}) does not read back: {e}", tmp.path.display()))?;
    if meta.tensors().len() != plan.len() {
        bail!("{} reads back with {} tensors, expected {}", tmp.path.display(), meta.tensors().len(), plan.len());
    }
    drop(map);

    fs::rename(&tmp.path, dest)
        .with_context(|| format!("cannot rename {} to {}", tmp.path.display(), dest.display()))?;
    let mut tmp = tmp;
    tmp.keep = true;
    Ok(params)
}
