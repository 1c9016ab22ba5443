//! Import a GGUF model into a Hugging Face-layout folder that the rest of tuner
//! (and transformers) can load: `config.json`, `model.safetensors` (F32),
//! `tokenizer.json`, `tokenizer_config.json` and `generation_config.json`.
//!
//! It undoes, for the `llama` architecture, what llama.cpp's HF→GGUF converter
//! (`convert_hf_to_gguf.py`) does: the tensor renaming (`blk.N.attn_q` ↔
//! `model.layers.N.self_attn.q_proj`, ...), the row permutation of the Q and K
//! projections (llama.cpp interleaves the two rotary halves of each head; we apply
//! `w.reshape(n_head, rows/n_head/2, 2, cols).swapaxes(1, 2).reshape(rows, cols)`),
//! the `{arch}.*` hyper-parameter keys and the `tokenizer.ggml.*` vocabulary keys
//! (GGUF spec, "Standardized key-value pairs"). The output follows transformers'
//! `LlamaForCausalLM` config and the `tokenizers` library's `tokenizer.json` format.
//!
//! Every file is written atomically (temp name in `out_dir`, then rename), and
//! `config.json` is written last, so a folder with a `config.json` is complete.

use crate::gguf::{GgufFile, GgufValue, TensorInfo};
use crate::progress::{Progress, Unit};
use crate::util::{temp_path, write_atomic, write_json_atomic};
use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Map, Value};
use std::fs;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::str::FromStr;

/// The GGUF architectures [`import_gguf`] converts.
pub const SUPPORTED_ARCHITECTURES: [&str; 1] = ["llama"];

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

/// Hyper-parameters of a llama-architecture GGUF, in HF terms.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaParams {
    /// `hidden_size` (`llama.embedding_length`).
    pub hidden_size: usize,
    /// `intermediate_size` (`llama.feed_forward_length`).
    pub intermediate_size: usize,
    /// `num_hidden_layers` (`llama.block_count`).
    pub num_hidden_layers: usize,
    /// `num_attention_heads` (`llama.attention.head_count`).
    pub num_attention_heads: usize,
    /// `num_key_value_heads` (`llama.attention.head_count_kv`, default: the head count).
    pub num_key_value_heads: usize,
    /// `head_dim` (`llama.attention.key_length`, default hidden / heads).
    pub head_dim: usize,
    /// `rms_norm_eps` (`llama.attention.layer_norm_rms_epsilon`).
    pub rms_norm_eps: f64,
    /// `rope_theta` (`llama.rope.freq_base`, default 10000).
    pub rope_theta: f64,
    /// `max_position_embeddings` (`llama.context_length`).
    pub max_position_embeddings: usize,
    /// `vocab_size`: rows of `token_embd.weight`.
    pub vocab_size: usize,
    /// `tie_word_embeddings`: true when the file has no `output.weight`.
    pub tie_word_embeddings: bool,
    /// `attention_bias`: the file has q/k/v/o biases.
    pub attention_bias: bool,
    /// `mlp_bias`: the file has gate/up/down biases.
    pub mlp_bias: bool,
    /// `rope_scaling` (`null`, or `{"rope_type": "linear", "factor": F}`).
    pub rope_scaling: Value,
}

/// Convert the GGUF file `gguf` into an HF-layout folder `out_dir` (created if
/// needed; files already there with the same names are replaced).
///
/// Only the `llama` architecture with a `gpt2` (byte-level BPE) tokenizer is
/// supported; anything else is refused, by name, before anything is written.
pub fn import_gguf(gguf: &Path, out_dir: &Path) -> Result<ImportSummary> {
    let g = GgufFile::open(gguf)?;
    let shown = gguf.display();
    let arch = g
        .get_str("general.architecture")?
        .ok_or_else(|| anyhow!("{shown} has no general.architecture; cannot tell which model it holds"))?
        .to_string();
    if !SUPPORTED_ARCHITECTURES.contains(&arch.as_str()) {
        bail!(
            "{shown}: GGUF architecture `{arch}` is not supported by the importer; supported: {}",
            SUPPORTED_ARCHITECTURES.join(", ")
        );
    }

    // Everything that can be refused is checked before the first write.
    let hp = llama_params(&g)?;
    let plan = tensor_plan(&g, &hp)?;
    let tokenizer = tokenizer_json(&g)?;
    let tokenizer_config = tokenizer_config_json(&g, &hp)?;
    let generation_config = generation_config_json(&g)?;
    let config = llama_config_json(&g, &hp)?;

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

    log::info!("imported {shown} ({arch}, {} tensors, {params} parameters) into {}", plan.len(), out_dir.display());
    Ok(ImportSummary { architecture: arch, tensors: plan.len(), params, files })
}

/// A float metadata value; an f32 is widened through its shortest decimal form, so
/// that `1e-5f32` becomes `1e-5`, not `9.999999747378752e-6`.
fn meta_float(g: &GgufFile, key: &str) -> Result<Option<f64>> {
    match g.get(key) {
        Some(GgufValue::F32(v)) => Ok(Some(format!("{v}").parse::<f64>().unwrap_or(f64::from(*v)))),
        _ => g.get_f64(key),
    }
}

fn meta_usize(g: &GgufFile, key: &str) -> Result<Option<usize>> {
    g.get_u64(key)?
        .map(|v| {
            usize::try_from(v).map_err(|_| anyhow!("metadata `{key}` in {} is too large: {v}", g.path().display()))
        })
        .transpose()
}

fn require_usize(g: &GgufFile, key: &str) -> Result<usize> {
    meta_usize(g, key)?.ok_or_else(|| anyhow!("metadata `{key}` is missing from {}", g.path().display()))
}

/// Read the llama hyper-parameters of `g` and check them against its tensors.
pub fn llama_params(g: &GgufFile) -> Result<LlamaParams> {
    let shown = g.path().display();
    let arch = g.require_str("general.architecture")?;
    let key = |k: &str| format!("{arch}.{k}");

    if let Some(n) = g.get_u64(&key("expert_count"))? {
        if n > 0 {
            bail!("{shown} is a mixture-of-experts model ({n} experts); the importer handles dense llama models only");
        }
    }
    let hidden_size = require_usize(g, &key("embedding_length"))?;
    let intermediate_size = match g.get(&key("feed_forward_length")) {
        Some(GgufValue::Array(_)) => {
            bail!("{shown}: per-layer feed_forward_length is not supported (the HF llama config has one intermediate_size)")
        }
        _ => require_usize(g, &key("feed_forward_length"))?,
    };
    let num_hidden_layers = require_usize(g, &key("block_count"))?;
    let num_attention_heads = require_usize(g, &key("attention.head_count"))?;
    let num_key_value_heads = meta_usize(g, &key("attention.head_count_kv"))?.unwrap_or(num_attention_heads);
    if num_attention_heads == 0 || num_key_value_heads == 0 || num_attention_heads % num_key_value_heads != 0 {
        bail!(
            "{shown}: {num_attention_heads} attention heads cannot be shared by {num_key_value_heads} key/value heads"
        );
    }
    let head_dim = match meta_usize(g, &key("attention.key_length"))? {
        Some(d) => d,
        None if hidden_size % num_attention_heads == 0 => hidden_size / num_attention_heads,
        None => bail!("{shown}: hidden size {hidden_size} is not a multiple of {num_attention_heads} heads"),
    };
    if let Some(v) = meta_usize(g, &key("attention.value_length"))? {
        if v != head_dim {
            bail!("{shown}: value head size {v} differs from key head size {head_dim}; HF llama needs them equal");
        }
    }
    if let Some(r) = meta_usize(g, &key("rope.dimension_count"))? {
        if r != head_dim {
            bail!("{shown}: rotary dimension {r} differs from the head size {head_dim} (partial rotary is not llama)");
        }
    }
    if head_dim % 2 != 0 {
        bail!("{shown}: head size {head_dim} is odd; rotary embeddings need an even head size");
    }
    let rms_norm_eps = meta_float(g, &key("attention.layer_norm_rms_epsilon"))?
        .ok_or_else(|| anyhow!("metadata `{}` is missing from {shown}", key("attention.layer_norm_rms_epsilon")))?;
    let rope_theta = meta_float(g, &key("rope.freq_base"))?.unwrap_or(10000.0);
    let max_position_embeddings = require_usize(g, &key("context_length"))?;

    let rope_scaling = match g.get_str(&key("rope.scaling.type"))? {
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

    Ok(LlamaParams {
        hidden_size,
        intermediate_size,
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

/// The HF llama name of a GGUF tensor name (`blk.3.attn_q.weight` →
/// `model.layers.3.self_attn.q_proj.weight`), or `None` when it has none.
pub fn hf_llama_name(gguf_name: &str) -> Option<String> {
    match gguf_name {
        "token_embd.weight" => return Some("model.embed_tokens.weight".into()),
        "output_norm.weight" => return Some("model.norm.weight".into()),
        "output.weight" => return Some("lm_head.weight".into()),
        _ => {}
    }
    let rest = gguf_name.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    if layer.is_empty() || !layer.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let (part, suffix) = rest.rsplit_once('.')?;
    if suffix != "weight" && suffix != "bias" {
        return None;
    }
    let module = match part {
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        "attn_norm" if suffix == "weight" => "input_layernorm",
        "ffn_norm" if suffix == "weight" => "post_attention_layernorm",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{module}.{suffix}"))
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

/// One tensor to write: where it comes from, its HF name and shape, and whether
/// (with how many heads) its rows must be un-permuted.
#[derive(Debug, Clone)]
struct Planned<'a> {
    hf_name: String,
    info: &'a TensorInfo,
    shape: Vec<usize>,
    unpermute_heads: Option<usize>,
    order: (usize, usize, usize),
}

fn expected_shape(module: &str, hp: &LlamaParams) -> Option<Vec<usize>> {
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

/// Map, check and order every tensor of `g`; errors name the file and the tensor.
fn tensor_plan<'a>(g: &'a GgufFile, hp: &LlamaParams) -> Result<Vec<Planned<'a>>> {
    let shown = g.path().display();
    let mut plan = Vec::with_capacity(g.tensors().len());
    for info in g.tensors() {
        let hf_name = hf_llama_name(&info.name).ok_or_else(|| {
            anyhow!(
                "{shown}: tensor `{}` has no counterpart in an HF llama model; the importer cannot place it",
                info.name
            )
        })?;
        if !info.ggml_type.can_dequantize() {
            bail!(
                "unsupported GGUF tensor type {} in `{}` of {shown}; supported: {}",
                info.ggml_type,
                info.name,
                crate::gguf::supported_list()
            );
        }
        let shape = info.shape();
        let (expected, order, unpermute_heads) = match hf_name.as_str() {
            "model.embed_tokens.weight" | "lm_head.weight" => {
                let group = if hf_name == "lm_head.weight" { 3 } else { 0 };
                (vec![hp.vocab_size, hp.hidden_size], (group, 0, 0), None)
            }
            "model.norm.weight" => (vec![hp.hidden_size], (2, 0, 0), None),
            _ => {
                // model.layers.N.MODULE
                let rest = hf_name.strip_prefix("model.layers.").unwrap_or(&hf_name);
                let (layer, module) = rest.split_once('.').unwrap_or((rest, ""));
                let layer: usize = layer.parse().map_err(|_| anyhow!("{shown}: bad layer index in `{}`", info.name))?;
                if layer >= hp.num_hidden_layers {
                    bail!(
                        "{shown}: tensor `{}` is for layer {layer}, but the model has {} layers",
                        info.name,
                        hp.num_hidden_layers
                    );
                }
                let slot = LAYER_ORDER.iter().position(|m| *m == module).unwrap_or(LAYER_ORDER.len());
                let expected = expected_shape(module, hp)
                    .ok_or_else(|| anyhow!("{shown}: tensor `{}` has no HF llama counterpart", info.name))?;
                let heads = match module {
                    "self_attn.q_proj.weight" | "self_attn.q_proj.bias" => Some(hp.num_attention_heads),
                    "self_attn.k_proj.weight" | "self_attn.k_proj.bias" => Some(hp.num_key_value_heads),
                    _ => None,
                };
                (expected, (1, layer, slot), heads)
            }
        };
        if shape != expected {
            bail!("{shown}: tensor `{}` has shape {shape:?}, expected {expected:?} for `{hf_name}`", info.name);
        }
        plan.push(Planned { hf_name, info, shape, unpermute_heads, order });
    }

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
    plan.sort_by_key(|p| p.order);
    Ok(plan)
}

/// Undo llama.cpp's Q/K row permutation of a row-major `[rows, cols]` matrix (or a
/// bias, with `cols = 1`): the numpy expression
/// `w.reshape(n_head, rows // n_head // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)`.
///
/// Within each head, GGUF row `2 i + j` becomes HF row `j * half + i`.
pub fn unpermute_rows(w: &[f32], rows: usize, n_head: usize) -> Result<Vec<f32>> {
    if rows == 0 || n_head == 0 || !rows.is_multiple_of(2 * n_head) || !w.len().is_multiple_of(rows) {
        bail!("cannot un-permute {} values as {rows} rows over {n_head} heads", w.len());
    }
    let cols = w.len() / rows;
    let per_head = rows / n_head;
    let half = per_head / 2;
    let mut out = vec![0f32; w.len()];
    for h in 0..n_head {
        for i in 0..half {
            for j in 0..2 {
                let src = h * per_head + 2 * i + j;
                let dst = h * per_head + j * half + i;
                out[dst * cols..(dst + 1) * cols].copy_from_slice(&w[src * cols..(src + 1) * cols]);
            }
        }
    }
    Ok(out)
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
        let n = p.info.n_elements();
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
        let (mut values, _) = g.tensor_f32(&p.info.name)?;
        if let Some(heads) = p.unpermute_heads {
            values = unpermute_rows(&values, p.shape[0], heads)
                .with_context(|| format!("`{}` of {}", p.info.name, g.path().display()))?;
        }
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

/// `config.json` for `LlamaForCausalLM`.
fn llama_config_json(g: &GgufFile, hp: &LlamaParams) -> Result<Value> {
    let id = |k: &str| g.get_u64(k);
    Ok(json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hp.hidden_size,
        "intermediate_size": hp.intermediate_size,
        "num_hidden_layers": hp.num_hidden_layers,
        "num_attention_heads": hp.num_attention_heads,
        "num_key_value_heads": hp.num_key_value_heads,
        "head_dim": hp.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": hp.rms_norm_eps,
        "rope_theta": hp.rope_theta,
        "rope_scaling": hp.rope_scaling,
        "max_position_embeddings": hp.max_position_embeddings,
        "vocab_size": hp.vocab_size,
        "tie_word_embeddings": hp.tie_word_embeddings,
        "attention_bias": hp.attention_bias,
        "attention_dropout": 0.0,
        "mlp_bias": hp.mlp_bias,
        "initializer_range": 0.02,
        "pretraining_tp": 1,
        "use_cache": true,
        "bos_token_id": id("tokenizer.ggml.bos_token_id")?,
        "eos_token_id": id("tokenizer.ggml.eos_token_id")?,
        "pad_token_id": id("tokenizer.ggml.padding_token_id")?,
        "torch_dtype": "float32",
    }))
}

/// The vocabulary strings (`tokenizer.ggml.tokens`).
fn vocab_tokens(g: &GgufFile) -> Result<Vec<&str>> {
    let shown = g.path().display();
    let tokens = g
        .get_array("tokenizer.ggml.tokens")?
        .ok_or_else(|| anyhow!("{shown} has no tokenizer.ggml.tokens; cannot build a tokenizer"))?;
    tokens
        .iter()
        .enumerate()
        .map(|(i, t)| t.as_str().ok_or_else(|| anyhow!("{shown}: tokenizer.ggml.tokens[{i}] is not a string")))
        .collect()
}

/// The content of the token whose id is stored under metadata `key`, if any.
fn special_token<'t>(g: &GgufFile, tokens: &[&'t str], key: &str) -> Result<Option<&'t str>> {
    match g.get_u64(key)? {
        None => Ok(None),
        Some(id) => tokens.get(id as usize).copied().map(Some).ok_or_else(|| {
            anyhow!("{}: {key} = {id} is outside the vocabulary ({} tokens)", g.path().display(), tokens.len())
        }),
    }
}

/// Build `tokenizer.json` (the `tokenizers` library format) from the
/// `tokenizer.ggml.*` metadata of a `gpt2` (byte-level BPE) GGUF tokenizer, and
/// check that it loads with `tokenizers::Tokenizer`.
pub fn tokenizer_json(g: &GgufFile) -> Result<Value> {
    let shown = g.path().display();
    match g.get_str("tokenizer.ggml.model")? {
        Some("gpt2") => {}
        Some("llama") => bail!(
            "{shown}: its tokenizer is SentencePiece-style (tokenizer.ggml.model = llama), which the importer does not rebuild yet; only gpt2 (byte-level BPE) tokenizers are supported"
        ),
        Some(other) => bail!("{shown}: tokenizer model `{other}` is not supported; only gpt2 (byte-level BPE) tokenizers are"),
        None => bail!("{shown} has no tokenizer.ggml.model; cannot build a tokenizer"),
    }
    let tokens = vocab_tokens(g)?;
    let types: Vec<i64> = match g.get_array("tokenizer.ggml.token_type")? {
        None => vec![1; tokens.len()],
        Some(a) => a
            .iter()
            .enumerate()
            .map(|(i, v)| {
                v.as_i64().ok_or_else(|| anyhow!("{shown}: tokenizer.ggml.token_type[{i}] is not an integer"))
            })
            .collect::<Result<_>>()?,
    };
    if types.len() != tokens.len() {
        bail!("{shown}: {} token types for {} tokens", types.len(), tokens.len());
    }
    let merges_raw = g
        .get_array("tokenizer.ggml.merges")?
        .ok_or_else(|| anyhow!("{shown} has no tokenizer.ggml.merges; a gpt2 tokenizer needs them"))?;

    let mut vocab = Map::with_capacity(tokens.len());
    let mut added = Vec::new();
    let mut duplicates = 0usize;
    for (id, (tok, ty)) in tokens.iter().zip(&types).enumerate() {
        if vocab.contains_key(*tok) {
            duplicates += 1;
            continue;
        }
        vocab.insert(tok.to_string(), json!(id));
        // GGUF token types: 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte.
        if *ty == 3 || *ty == 4 {
            added.push(json!({
                "id": id, "content": tok, "single_word": false, "lstrip": false, "rstrip": false,
                "normalized": false, "special": *ty == 3,
            }));
        }
    }
    if duplicates > 0 {
        log::warn!("{shown}: {duplicates} duplicate token string(s) in the vocabulary; kept the first id of each");
    }

    let mut merges = Vec::with_capacity(merges_raw.len());
    for (i, m) in merges_raw.iter().enumerate() {
        let m = m.as_str().ok_or_else(|| anyhow!("{shown}: tokenizer.ggml.merges[{i}] is not a string"))?;
        match m.split_once(' ') {
            Some((a, b)) if !a.is_empty() && !b.is_empty() && !b.contains(' ') => merges.push(json!([a, b])),
            _ => bail!("{shown}: tokenizer.ggml.merges[{i}] = {m:?} is not two tokens separated by one space"),
        }
    }

    let add_prefix_space = g.get_bool("tokenizer.ggml.add_space_prefix")?.unwrap_or(false);
    let byte_level = json!({
        "type": "ByteLevel", "add_prefix_space": add_prefix_space, "trim_offsets": true, "use_regex": true
    });
    let pre = g.get_str("tokenizer.ggml.pre")?;
    let pre_tokenizer = match pre {
        Some("smollm") => json!({
            "type": "Sequence",
            "pretokenizers": [{ "type": "Digits", "individual_digits": true }, byte_level],
        }),
        Some("gpt-2") => byte_level,
        other => {
            log::warn!(
                "{shown}: no exact pre-tokenizer for tokenizer.ggml.pre = {}; using GPT-2 byte-level splitting, which may split some texts differently from llama.cpp",
                other.unwrap_or("(absent)")
            );
            byte_level
        }
    };

    let add_bos = g.get_bool("tokenizer.ggml.add_bos_token")?.unwrap_or(false);
    let add_eos = g.get_bool("tokenizer.ggml.add_eos_token")?.unwrap_or(false);
    let bos = special_token(g, &tokens, "tokenizer.ggml.bos_token_id")?;
    let eos = special_token(g, &tokens, "tokenizer.ggml.eos_token_id")?;
    let mut special_tokens = Map::new();
    let mut single = Vec::new();
    let mut pair = Vec::new();
    let piece = |tok: &str, type_id: u32| json!({ "SpecialToken": { "id": tok, "type_id": type_id } });
    let wrap = |seq: &str, type_id: u32, out: &mut Vec<Value>| -> Result<()> {
        if add_bos {
            let b = bos.ok_or_else(|| anyhow!("{shown}: add_bos_token is set but there is no bos_token_id"))?;
            out.push(piece(b, type_id));
        }
        out.push(json!({ "Sequence": { "id": seq, "type_id": type_id } }));
        if add_eos {
            let e = eos.ok_or_else(|| anyhow!("{shown}: add_eos_token is set but there is no eos_token_id"))?;
            out.push(piece(e, type_id));
        }
        Ok(())
    };
    wrap("A", 0, &mut single)?;
    wrap("A", 0, &mut pair)?;
    wrap("B", 1, &mut pair)?;
    for (flag, key, tok) in
        [(add_bos, "tokenizer.ggml.bos_token_id", bos), (add_eos, "tokenizer.ggml.eos_token_id", eos)]
    {
        if let (true, Some(id), Some(tok)) = (flag, g.get_u64(key)?, tok) {
            special_tokens.insert(tok.to_string(), json!({ "id": tok, "ids": [id], "tokens": [tok] }));
        }
    }

    let tokenizer = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": {
            "type": "TemplateProcessing", "single": single, "pair": pair, "special_tokens": special_tokens,
        },
        "decoder": { "type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true },
        "model": {
            "type": "BPE",
            "dropout": null,
            "unk_token": null,
            "continuing_subword_prefix": null,
            "end_of_word_suffix": null,
            "fuse_unk": false,
            "byte_fallback": false,
            "ignore_merges": false,
            "vocab": vocab,
            "merges": merges,
        },
    });

    let text = serde_json::to_string(&tokenizer)?;
    let loaded = tokenizers::Tokenizer::from_str(&text)
        .map_err(|e| anyhow!("{shown}: the tokenizer.json rebuilt from its metadata does not load: {e}"))?;
    let expected = tokens.len() - duplicates;
    if loaded.get_vocab_size(true) != expected {
        bail!("{shown}: the rebuilt tokenizer has {} tokens, expected {expected}", loaded.get_vocab_size(true));
    }
    Ok(tokenizer)
}

/// `tokenizer_config.json`: special tokens, chat template, BOS flag, max length.
fn tokenizer_config_json(g: &GgufFile, hp: &LlamaParams) -> Result<Value> {
    let tokens = vocab_tokens(g)?;
    Ok(json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": special_token(g, &tokens, "tokenizer.ggml.bos_token_id")?,
        "eos_token": special_token(g, &tokens, "tokenizer.ggml.eos_token_id")?,
        "pad_token": special_token(g, &tokens, "tokenizer.ggml.padding_token_id")?,
        "unk_token": special_token(g, &tokens, "tokenizer.ggml.unknown_token_id")?,
        "add_bos_token": g.get_bool("tokenizer.ggml.add_bos_token")?.unwrap_or(false),
        "add_eos_token": g.get_bool("tokenizer.ggml.add_eos_token")?.unwrap_or(false),
        "chat_template": g.get_str("tokenizer.chat_template")?,
        "clean_up_tokenization_spaces": false,
        "model_max_length": hp.max_position_embeddings,
    }))
}

/// `generation_config.json`: BOS, EOS (plus end-of-turn when it differs) and pad ids.
fn generation_config_json(g: &GgufFile) -> Result<Value> {
    let eos = g.get_u64("tokenizer.ggml.eos_token_id")?;
    let eot = g.get_u64("tokenizer.ggml.eot_token_id")?;
    let eos_value = match (eos, eot) {
        (Some(e), Some(t)) if e != t => json!([e, t]),
        (Some(e), _) => json!(e),
        (None, Some(t)) => json!(t),
        (None, None) => Value::Null,
    };
    let mut m = Map::new();
    m.insert("bos_token_id".into(), json!(g.get_u64("tokenizer.ggml.bos_token_id")?));
    m.insert("eos_token_id".into(), eos_value);
    if let Some(p) = g.get_u64("tokenizer.ggml.padding_token_id")? {
        m.insert("pad_token_id".into(), json!(p));
    }
    Ok(Value::Object(m))
}
