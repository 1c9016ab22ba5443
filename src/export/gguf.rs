//! `export/gguf/`: GGUF v3 files of the merged model for llama.cpp and Ollama.
//!
//! Follows the GGUF specification (ggml `docs/gguf.md`: magic, version 3, tensor and
//! key/value counts, typed key/values, tensor infos with dimensions innermost first,
//! data aligned to `general.alignment` = 32) and what llama.cpp's
//! `convert_hf_to_gguf.py` writes for `LlamaForCausalLM` / `MistralForCausalLM`
//! (architecture `llama`), `Qwen2ForCausalLM` (`qwen2`) and `Qwen3ForCausalLM` (`qwen3`):
//! - tensor names `token_embd`, `blk.N.attn_q`, …, `output_norm`, `output`;
//! - for `llama` only, the rows of Q and K (weights and biases) permuted per head so
//!   that the two rotary halves interleave: `w.reshape(n_head, 2, rows/n_head/2, cols)
//!   .swapaxes(1, 2)` (K with the KV head count) — the inverse of
//!   [`crate::gguf_import::unpermute_rows`];
//! - Llama-3 rope scaling as the `rope_freqs.weight` tensor of per-frequency divisors,
//!   linear scaling as `rope.scaling.type`/`rope.scaling.factor`;
//! - 1-D tensors (norms, biases) in F32; 2-D ones in F16, or Q8_0 (ggml
//!   `quantize_row_q8_0_ref`: per 32 values `d = max|x|/127` stored as f16, `q = round(x/d)`),
//!   falling back to F16 when a row is not a multiple of 32 long, as the converter does;
//!   or llama.cpp's Q4_K_M mix, typed and quantized as `llama-quantize … Q4_K_M` does
//!   ([`crate::gguf::kquants`], llama.cpp as vendored in llama-cpp-python 0.3.36), from the
//!   merged weights as stored (llama-quantize starts from an F16 file's values: with
//!   `merged_dtype = "fp16"` the two are the same);
//! - the byte-level BPE vocabulary (`tokenizer.ggml.model = "gpt2"`): tokens, token types
//!   (normal 1, control 3, user-defined 4, unused 5 for `[PADn]` fillers up to the
//!   embedding's row count), merges, special token ids, add_bos/add_eos, the
//!   pre-tokenizer name llama.cpp uses for the split regex, and `tokenizer.chat_template`.
//!
//! Other families, and tokenizers that are not byte-level BPE, are refused by name.

use crate::gguf::{kquants, GgmlType, GgufArray, GgufFile, GgufValue, GgufValueType};
use crate::model::family::GgufArch;
use crate::model::{Config, RopeScaling, Weights};
use crate::progress::{Progress, Unit};
use crate::util;
use anyhow::{anyhow, bail, Context, Result};
use rayon::prelude::*;
use serde_json::Value;
use std::collections::{BTreeMap, HashMap};
use std::io::{BufWriter, Write};
use std::path::Path;
use tch::Kind;

/// Data alignment (the GGUF default; `general.alignment` is not written).
pub const ALIGNMENT: u64 = 32;

/// Values per Q8_0 block.
pub const Q8_0_BLOCK: usize = 32;

/// The GGUF file types tuner writes.
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
}

/// How a model family is written.
#[derive(Debug, Clone, PartialEq)]
pub struct Support {
    /// `general.architecture`.
    pub arch: &'static str,
    /// Whether Q/K rows are permuted (the `llama` architecture).
    pub permute_qk: bool,
    /// `tokenizer.ggml.pre`.
    pub pre: &'static str,
}

/// Check that `model_dir` (an HF folder) can be written as GGUF; errors say why not.
pub fn check_supported(model_dir: &Path) -> Result<Support> {
    let raw: Value = util::read_json(&model_dir.join("config.json"))?;
    let model_type = raw["model_type"].as_str().unwrap_or("unknown");
    let Some(GgufArch { arch, permute_qk }) = crate::model::family::by_model_type(model_type).and_then(|f| f.gguf)
    else {
        bail!(
            "GGUF export supports {} models; this model is `{model_type}`. \
             Export the merged model (`[export] merged = true`) and convert it with llama.cpp's convert_hf_to_gguf.py",
            crate::model::family::gguf_names()
        )
    };
    let cfg = Config::from_dir(model_dir)?;
    match (&cfg.rope_scaling, arch) {
        (RopeScaling::None, _) | (RopeScaling::Linear { .. }, "llama") | (RopeScaling::Llama3 { .. }, "llama") => {}
        (other, _) => bail!("GGUF export: rope scaling {other:?} is not supported for {}", cfg.model_type),
    }
    if cfg.model_type == "mistral" {
        if let Some(w) = cfg.sliding_window {
            log::warn!(
                "llama.cpp runs Mistral as `llama` without its sliding window ({w}); outputs differ beyond {w} tokens"
            );
        }
    }
    let tok: Value = util::read_json(&model_dir.join("tokenizer.json"))?;
    let pre = pre_tokenizer_name(&tok)?;
    Ok(Support { arch, permute_qk, pre })
}

/// The llama.cpp pre-tokenizer name for a tokenizer.json's pre-tokenizer; an error
/// for byte-level BPE splits llama.cpp would apply differently and for non-BPE tokenizers.
pub fn pre_tokenizer_name(tok: &Value) -> Result<&'static str> {
    const LLAMA3: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    const QWEN2: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    let model = &tok["model"];
    if model["type"].as_str() != Some("BPE") {
        bail!(
            "GGUF export writes byte-level BPE (gpt2-style) tokenizers only; this tokenizer.json has a `{}` model",
            model["type"].as_str().unwrap_or("unknown")
        );
    }
    if model["byte_fallback"].as_bool() == Some(true) {
        bail!("GGUF export: this is a SentencePiece-style BPE tokenizer (byte_fallback); only byte-level BPE tokenizers are written");
    }
    let pre = &tok["pre_tokenizer"];
    let byte_level =
        |v: &Value, regex: bool| v["type"] == "ByteLevel" && v["use_regex"].as_bool().unwrap_or(true) == regex;
    let name = match pre["type"].as_str() {
        Some("ByteLevel") if byte_level(pre, true) => Some("gpt-2"),
        Some("Sequence") => {
            let parts = pre["pretokenizers"].as_array().map(Vec::as_slice).unwrap_or(&[]);
            match parts {
                [d, b] if d["type"] == "Digits" && d["individual_digits"] == true && byte_level(b, true) => {
                    Some("smollm")
                }
                [s, b] if s["type"] == "Split" && byte_level(b, false) => match s["pattern"]["Regex"].as_str() {
                    Some(LLAMA3) => Some("llama-bpe"),
                    Some(QWEN2) => Some("qwen2"),
                    _ => None,
                },
                _ => None,
            }
        }
        _ => None,
    };
    name.ok_or_else(|| {
        anyhow!(
            "GGUF export: the tokenizer's pre-tokenizer ({}) is not one tuner can name for llama.cpp \
             (known: GPT-2 byte-level, SmolLM digits + byte-level, the Llama 3 and Qwen2 regex splits); \
             refusing rather than writing a GGUF that splits text differently",
            serde_json::to_string(pre).unwrap_or_default()
        )
    })
}

/// The GGUF name of an HF tensor name, or `None` when it has none.
pub fn gguf_name(hf: &str) -> Option<String> {
    match hf {
        "model.embed_tokens.weight" => return Some("token_embd.weight".into()),
        "model.norm.weight" => return Some("output_norm.weight".into()),
        "lm_head.weight" => return Some("output.weight".into()),
        _ => {}
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    layer.parse::<u64>().ok()?;
    let (module, suffix) = rest.rsplit_once('.')?;
    if suffix != "weight" && suffix != "bias" {
        return None;
    }
    let part = match module {
        "input_layernorm" => "attn_norm",
        "post_attention_layernorm" => "ffn_norm",
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "self_attn.q_norm" => "attn_q_norm",
        "self_attn.k_norm" => "attn_k_norm",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        _ => return None,
    };
    Some(format!("blk.{layer}.{part}.{suffix}"))
}

/// Permute the rows of a row-major `[rows, cols]` matrix (or a bias, `cols = 1`) the way
/// llama.cpp's converter does for Q and K: within each head, HF row `j·half + i` becomes
/// GGUF row `2i + j`.
pub fn permute_rows(w: &[f32], rows: usize, n_head: usize) -> Result<Vec<f32>> {
    if rows == 0 || n_head == 0 || !rows.is_multiple_of(2 * n_head) || !w.len().is_multiple_of(rows) {
        bail!("cannot permute {} values as {rows} rows over {n_head} heads", w.len());
    }
    let cols = w.len() / rows;
    let per_head = rows / n_head;
    let half = per_head / 2;
    let mut out = vec![0f32; w.len()];
    for h in 0..n_head {
        for i in 0..half {
            for j in 0..2 {
                let src = h * per_head + j * half + i;
                let dst = h * per_head + 2 * i + j;
                out[dst * cols..(dst + 1) * cols].copy_from_slice(&w[src * cols..(src + 1) * cols]);
            }
        }
    }
    Ok(out)
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

/// llama.cpp's `rope_freqs` for Llama-3 scaling: the divisor of each of the `dim/2` frequencies
/// (1 for high frequencies, `factor` for low ones, smoothly in between).
pub fn llama3_rope_factors(theta: f64, dim: i64, factor: f64, low: f64, high: f64, orig: f64) -> Vec<f32> {
    let (low_wavelen, high_wavelen) = (orig / low, orig / high);
    (0..dim / 2)
        .map(|i| {
            let freq = 1.0 / theta.powf((2 * i) as f64 / dim as f64);
            let wavelen = 2.0 * std::f64::consts::PI / freq;
            if wavelen < high_wavelen {
                1.0
            } else if wavelen > low_wavelen {
                factor as f32
            } else {
                let smooth = (orig / wavelen - low) / (high - low);
                (1.0 / ((1.0 - smooth) / factor + smooth)) as f32
            }
        })
        .collect()
}

/// Shapes of every tensor of an HF folder, from the safetensors headers (no data read).
pub fn tensor_shapes(dir: &Path) -> Result<BTreeMap<String, Vec<usize>>> {
    use std::io::Read;
    let index = dir.join("model.safetensors.index.json");
    let files: Vec<String> = if index.is_file() {
        let idx: Value = util::read_json(&index)?;
        let mut f: Vec<String> = idx["weight_map"]
            .as_object()
            .with_context(|| format!("{}: no weight_map", index.display()))?
            .values()
            .filter_map(|v| v.as_str().map(str::to_string))
            .collect();
        f.sort();
        f.dedup();
        f
    } else {
        vec!["model.safetensors".into()]
    };
    let mut out = BTreeMap::new();
    for f in files {
        let p = dir.join(&f);
        let mut file = std::fs::File::open(&p).with_context(|| format!("cannot open {}", p.display()))?;
        let mut n = [0u8; 8];
        file.read_exact(&mut n).with_context(|| format!("{}: truncated", p.display()))?;
        let mut h = vec![0u8; u64::from_le_bytes(n).min(100 << 20) as usize];
        file.read_exact(&mut h).with_context(|| format!("{}: truncated header", p.display()))?;
        let header: serde_json::Map<String, Value> =
            serde_json::from_slice(&h).with_context(|| format!("{}: header is not JSON", p.display()))?;
        for (k, v) in header {
            if k == "__metadata__" {
                continue;
            }
            let shape = v["shape"].as_array().with_context(|| format!("{}: `{k}` has no shape", p.display()))?;
            out.insert(k, shape.iter().map(|d| d.as_u64().unwrap_or(0) as usize).collect());
        }
    }
    Ok(out)
}

/// A tensor to write.
struct Planned {
    gguf: String,
    /// Where the values come from: an HF tensor, or values computed here (rope_freqs).
    source: Source,
    /// Row-major shape.
    shape: Vec<usize>,
    ty: GgmlType,
    permute_heads: Option<usize>,
    offset: u64,
}

enum Source {
    Hf(String),
    Values(Vec<f32>),
}

fn n_bytes(ty: GgmlType, n: usize) -> u64 {
    let (block, bytes) = ty.block_layout().expect("tuner writes known types only");
    n as u64 / block * bytes
}

fn align(x: u64) -> u64 {
    x.div_ceil(ALIGNMENT) * ALIGNMENT
}

/// What [`write_gguf`] wrote.
#[derive(Debug, Clone)]
pub struct GgufSummary {
    /// Tensors written.
    pub tensors: usize,
    /// Tensor count per ggml type name.
    pub types: BTreeMap<String, usize>,
    /// Tensors written as F16 in a Q8_0 file because their rows are not a multiple of 32, and
    /// those of a Q4_K_M file written other than as Q4_K/Q6_K because of their row length.
    pub f16_fallback: Vec<String>,
}

fn string_array(items: Vec<String>) -> GgufValue {
    GgufValue::Array(GgufArray {
        elem_type: GgufValueType::String,
        items: items.into_iter().map(GgufValue::String).collect(),
    })
}

/// The key/values of the model (architecture, hyper-parameters, tokenizer).
fn metadata(dir: &Path, support: &Support, ty: GgufType, name: &str) -> Result<Vec<(String, GgufValue)>> {
    let cfg = Config::from_dir(dir)?;
    let raw: Value = util::read_json(&dir.join("config.json"))?;
    let arch = support.arch;
    let k = |s: &str| format!("{arch}.{s}");
    let u = |v: i64| GgufValue::U32(v as u32);
    let mut m: Vec<(String, GgufValue)> = vec![
        ("general.architecture".into(), GgufValue::String(arch.into())),
        ("general.type".into(), GgufValue::String("model".into())),
        ("general.name".into(), GgufValue::String(name.into())),
        ("general.file_type".into(), GgufValue::U32(ty.file_type())),
        ("general.quantization_version".into(), GgufValue::U32(2)),
        (k("vocab_size"), u(cfg.vocab_size)),
        (k("context_length"), u(cfg.max_position_embeddings)),
        (k("embedding_length"), u(cfg.hidden_size)),
        (k("block_count"), u(cfg.num_hidden_layers)),
        (k("feed_forward_length"), u(cfg.intermediate_size)),
        (k("attention.head_count"), u(cfg.num_attention_heads)),
        (k("attention.head_count_kv"), u(cfg.num_key_value_heads)),
        (k("rope.freq_base"), GgufValue::F32(cfg.rope_theta as f32)),
        (k("attention.layer_norm_rms_epsilon"), GgufValue::F32(cfg.rms_norm_eps as f32)),
        (k("rope.dimension_count"), u(cfg.head_dim)),
    ];
    if raw.get("head_dim").is_some_and(|v| !v.is_null()) || cfg.head_dim * cfg.num_attention_heads != cfg.hidden_size {
        m.push((k("attention.key_length"), u(cfg.head_dim)));
        m.push((k("attention.value_length"), u(cfg.head_dim)));
    }
    if let RopeScaling::Linear { factor } = cfg.rope_scaling {
        m.push((k("rope.scaling.type"), GgufValue::String("linear".into())));
        m.push((k("rope.scaling.factor"), GgufValue::F32(factor as f32)));
    }
    m.extend(tokenizer_metadata(dir, cfg.vocab_size as usize, support.pre)?);
    Ok(m)
}

/// The content of a special-token entry of tokenizer_config.json (a string or `{content}`).
fn token_content(v: &Value) -> Option<&str> {
    match v {
        Value::String(s) => Some(s),
        Value::Object(o) => o.get("content").and_then(Value::as_str),
        _ => None,
    }
}

/// Whether an added token that is not marked special looks like a control token
/// (llama.cpp's `does_token_look_special`).
fn looks_special(t: &str) -> bool {
    ["<pad>", "<mask>", "<2mass>", "[@BOS@]"].contains(&t)
        || (t.starts_with("<|") && t.ends_with("|>"))
        || (t.starts_with("<｜") && t.ends_with("｜>"))
        || (t.starts_with("<unused") && t.ends_with('>'))
}

/// The chat template of an HF folder: tokenizer_config.json's (a string, or the `default`
/// of a list of named templates), else `chat_template.jinja`.
pub fn chat_template(dir: &Path) -> Option<String> {
    let tc: Value = util::read_json(&dir.join("tokenizer_config.json")).ok()?;
    match &tc["chat_template"] {
        Value::String(s) => return Some(s.clone()),
        Value::Array(list) => {
            let pick = list.iter().find(|t| t["name"] == "default").or_else(|| list.first());
            if let Some(s) = pick.and_then(|t| t["template"].as_str()) {
                return Some(s.to_string());
            }
        }
        _ => {}
    }
    std::fs::read_to_string(dir.join("chat_template.jinja")).ok()
}

/// `tokenizer.*` key/values of a byte-level BPE tokenizer.json, padded to `vocab_size` tokens.
pub fn tokenizer_metadata(dir: &Path, vocab_size: usize, pre: &str) -> Result<Vec<(String, GgufValue)>> {
    let tok: Value = util::read_json(&dir.join("tokenizer.json"))?;
    let tc: Value = util::read_json(&dir.join("tokenizer_config.json")).unwrap_or(Value::Null);
    let cfg: Value = util::read_json(&dir.join("config.json")).unwrap_or(Value::Null);
    let shown = dir.join("tokenizer.json");
    let shown = shown.display();
    let vocab = tok["model"]["vocab"].as_object().with_context(|| format!("{shown}: no model.vocab"))?;
    let mut tokens: Vec<Option<String>> = vec![None; vocab_size];
    let mut types = vec![5i32; vocab_size];
    let mut ids: HashMap<String, u32> = HashMap::new();
    let mut place = |t: &str, id: u64, ty: i32| -> Result<()> {
        let slot = tokens.get_mut(id as usize).ok_or_else(|| {
            anyhow!("{shown}: token {t:?} has id {id}, beyond the model's {vocab_size} embedding rows")
        })?;
        *slot = Some(t.to_string());
        types[id as usize] = ty;
        ids.insert(t.to_string(), id as u32);
        Ok(())
    };
    for (t, id) in vocab {
        place(t, id.as_u64().with_context(|| format!("{shown}: bad id for {t:?}"))?, 1)?;
    }
    for a in tok["added_tokens"].as_array().map(Vec::as_slice).unwrap_or(&[]) {
        let (Some(t), Some(id)) = (a["content"].as_str(), a["id"].as_u64()) else { continue };
        let ty = if a["special"].as_bool() == Some(true) || looks_special(t) { 3 } else { 4 };
        place(t, id, ty)?;
    }
    let tokens: Vec<String> =
        tokens.into_iter().enumerate().map(|(i, t)| t.unwrap_or_else(|| format!("[PAD{i}]"))).collect();
    let merges: Vec<String> = tok["model"]["merges"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or(&[])
        .iter()
        .map(|m| match m {
            Value::String(s) => Ok(s.clone()),
            Value::Array(p) if p.len() == 2 => {
                Ok(format!("{} {}", p[0].as_str().unwrap_or(""), p[1].as_str().unwrap_or("")))
            }
            other => Err(anyhow!("{shown}: merge {other} is neither \"a b\" nor [a, b]")),
        })
        .collect::<Result<_>>()?;

    // Special tokens: tokenizer_config.json's, else config.json's ids (llama.cpp's SpecialVocab order).
    let special = |key: &str, cfg_key: &str| -> Option<u32> {
        token_content(&tc[key]).and_then(|c| ids.get(c).copied()).or_else(|| match &cfg[cfg_key] {
            Value::Array(a) => a.first().and_then(Value::as_u64).map(|x| x as u32),
            v => v.as_u64().map(|x| x as u32),
        })
    };
    let bos = special("bos_token", "bos_token_id");
    let eos = special("eos_token", "eos_token_id");
    let pad = special("pad_token", "pad_token_id");
    let unk = token_content(&tc["unk_token"]).and_then(|c| ids.get(c).copied());

    // add_bos/add_eos: what the tokenizer.json post-processor does (what tuner trained with),
    // else tokenizer_config.json's flags.
    let template = {
        let pp = &tok["post_processor"];
        if pp["type"] == "TemplateProcessing" {
            Some(pp.clone())
        } else {
            pp["processors"].as_array().and_then(|ps| ps.iter().find(|p| p["type"] == "TemplateProcessing").cloned())
        }
    };
    let special_id_of = |piece: &Value| piece["SpecialToken"]["id"].as_str().and_then(|c| ids.get(c).copied());
    let (add_bos, add_eos) = match &template {
        Some(t) => {
            let single = t["single"].as_array().map(Vec::as_slice).unwrap_or(&[]);
            let first = single.first().and_then(special_id_of);
            let last = single.last().and_then(special_id_of);
            (first.is_some() && first == bos, last.is_some() && last == eos)
        }
        None => (tc["add_bos_token"].as_bool().unwrap_or(false), tc["add_eos_token"].as_bool().unwrap_or(false)),
    };
    let prefix_space = |v: &Value| v["type"] == "ByteLevel" && v["add_prefix_space"] == true;
    let pre_tok = &tok["pre_tokenizer"];
    let add_space_prefix =
        prefix_space(pre_tok) || pre_tok["pretokenizers"].as_array().is_some_and(|ps| ps.iter().any(prefix_space));

    let mut m: Vec<(String, GgufValue)> = vec![
        ("tokenizer.ggml.model".into(), GgufValue::String("gpt2".into())),
        ("tokenizer.ggml.pre".into(), GgufValue::String(pre.into())),
        ("tokenizer.ggml.tokens".into(), string_array(tokens)),
        (
            "tokenizer.ggml.token_type".into(),
            GgufValue::Array(GgufArray {
                elem_type: GgufValueType::I32,
                items: types.into_iter().map(GgufValue::I32).collect(),
            }),
        ),
        ("tokenizer.ggml.merges".into(), string_array(merges)),
    ];
    for (key, id) in [
        ("tokenizer.ggml.bos_token_id", bos),
        ("tokenizer.ggml.eos_token_id", eos),
        ("tokenizer.ggml.unknown_token_id", unk),
        ("tokenizer.ggml.padding_token_id", pad),
    ] {
        if let Some(id) = id {
            m.push((key.into(), GgufValue::U32(id)));
        }
    }
    m.push(("tokenizer.ggml.add_bos_token".into(), GgufValue::Bool(add_bos)));
    m.push(("tokenizer.ggml.add_eos_token".into(), GgufValue::Bool(add_eos)));
    if add_space_prefix {
        m.push(("tokenizer.ggml.add_space_prefix".into(), GgufValue::Bool(true)));
    }
    if let Some(t) = chat_template(dir) {
        m.push(("tokenizer.chat_template".into(), GgufValue::String(t)));
    }
    Ok(m)
}

fn value_tag(t: GgufValueType) -> u32 {
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

/// Retype the planned tensors of a Q4_K_M file as llama.cpp does ([`kquants::q4_k_m_types`]);
/// tensors whose K-quant fell back for their row length are added to `fallback`.
fn q4_k_m_plan(plan: &mut [Planned], n_layer: usize, fallback: &mut Vec<String>) {
    let specs: Vec<kquants::TensorSpec> =
        plan.iter().map(|p| kquants::TensorSpec { name: &p.gguf, shape: &p.shape }).collect();
    let types = kquants::q4_k_m_types(&specs, n_layer);
    for (p, t) in plan.iter_mut().zip(types) {
        if p.shape.len() >= 2 && !matches!(t, GgmlType::Q4_K | GgmlType::Q6_K) {
            fallback.push(p.gguf.clone());
        }
        p.ty = t;
    }
}

/// Write the HF folder `dir` (dense safetensors, e.g. `export/merged/`) as the GGUF file `out`.
pub fn write_gguf(dir: &Path, out: &Path, ty: GgufType, name: &str) -> Result<GgufSummary> {
    let support = check_supported(dir)?;
    let cfg = Config::from_dir(dir)?;
    let meta = metadata(dir, &support, ty, name)?;
    let shapes = tensor_shapes(dir)?;

    let mut plan: Vec<Planned> = Vec::new();
    let mut f16_fallback = Vec::new();
    if let RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings } =
        cfg.rope_scaling
    {
        let v = llama3_rope_factors(
            cfg.rope_theta,
            cfg.head_dim,
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        );
        plan.push(Planned {
            gguf: "rope_freqs.weight".into(),
            shape: vec![v.len()],
            source: Source::Values(v),
            ty: GgmlType::F32,
            permute_heads: None,
            offset: 0,
        });
    }
    let mut names: Vec<&String> = shapes.keys().collect();
    names.sort_by_key(|n| super::merged::order_key(n));
    for hf in names {
        if hf.ends_with("rotary_emb.inv_freq") || (cfg.tie_word_embeddings && hf == "lm_head.weight") {
            continue;
        }
        let gguf = gguf_name(hf)
            .ok_or_else(|| anyhow!("GGUF export: tensor `{hf}` has no llama.cpp name for {}", support.arch))?;
        let shape = shapes[hf].clone();
        let tensor_ty = if shape.len() < 2 {
            GgmlType::F32
        } else {
            match ty {
                GgufType::F16 | GgufType::Q4KM => GgmlType::F16,
                GgufType::Q8_0 if shape[shape.len() - 1].is_multiple_of(Q8_0_BLOCK) => GgmlType::Q8_0,
                GgufType::Q8_0 => {
                    f16_fallback.push(gguf.clone());
                    GgmlType::F16
                }
            }
        };
        let permute_heads = match (support.permute_qk, gguf.split('.').nth(2)) {
            (true, Some("attn_q")) => Some(cfg.num_attention_heads as usize),
            (true, Some("attn_k")) => Some(cfg.num_key_value_heads as usize),
            _ => None,
        };
        plan.push(Planned { gguf, source: Source::Hf(hf.clone()), shape, ty: tensor_ty, permute_heads, offset: 0 });
    }
    if ty == GgufType::Q4KM {
        q4_k_m_plan(&mut plan, cfg.num_hidden_layers as usize, &mut f16_fallback);
    }

    // Header: counts, key/values, tensor infos (offsets relative to the aligned data start).
    let mut header = Vec::with_capacity(1 << 20);
    header.extend_from_slice(&crate::gguf::GGUF_MAGIC);
    header.extend_from_slice(&3u32.to_le_bytes());
    header.extend_from_slice(&(plan.len() as u64).to_le_bytes());
    header.extend_from_slice(&(meta.len() as u64).to_le_bytes());
    for (key, v) in &meta {
        put_str(&mut header, key);
        header.extend_from_slice(&value_tag(v.value_type()).to_le_bytes());
        put_value(&mut header, v);
    }
    let mut offset = 0u64;
    for p in &mut plan {
        p.offset = offset;
        put_str(&mut header, &p.gguf);
        header.extend_from_slice(&(p.shape.len() as u32).to_le_bytes());
        for d in p.shape.iter().rev() {
            header.extend_from_slice(&(*d as u64).to_le_bytes());
        }
        header.extend_from_slice(&p.ty.to_u32().to_le_bytes());
        header.extend_from_slice(&p.offset.to_le_bytes());
        offset = align(offset + n_bytes(p.ty, p.shape.iter().product()));
    }
    header.resize(align(header.len() as u64) as usize, 0);

    let weights = Weights::open(dir)?;
    let file = std::fs::File::create(out).with_context(|| format!("cannot create {}", out.display()))?;
    let mut w = BufWriter::with_capacity(8 << 20, file);
    let io = |e: std::io::Error| anyhow!("cannot write {}: {e}", out.display());
    w.write_all(&header).map_err(io)?;
    let mut pos = 0u64;
    let mut types: BTreeMap<String, usize> = BTreeMap::new();
    let bar = Progress::new(offset, &format!("write gguf {}", ty.name()), Unit::Bytes);
    for p in &plan {
        let values: Vec<f32> = match &p.source {
            Source::Values(v) => v.clone(),
            Source::Hf(hf) => {
                let t = weights.get(hf)?.to_kind(Kind::Float).contiguous().view([-1]);
                let v = Vec::<f32>::try_from(&t).map_err(|e| anyhow!("cannot read `{hf}`: {e}"))?;
                match p.permute_heads {
                    Some(heads) => permute_rows(&v, p.shape[0], heads).with_context(|| format!("`{hf}`"))?,
                    None => v,
                }
            }
        };
        let bytes: Vec<u8> = match p.ty {
            GgmlType::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            GgmlType::F16 => values.iter().flat_map(|v| half::f16::from_f32(*v).to_bits().to_le_bytes()).collect(),
            GgmlType::Q8_0 => quantize_q8_0(&values),
            other => kquants::quantize(other, &values).expect("q4_k_m_plan picks types kquants writes"),
        };
        debug_assert_eq!(pos, p.offset);
        w.write_all(&bytes).map_err(io)?;
        let end = align(pos + bytes.len() as u64);
        w.write_all(&vec![0u8; (end - pos - bytes.len() as u64) as usize]).map_err(io)?;
        bar.inc(end - pos);
        pos = end;
        *types.entry(p.ty.name()).or_default() += 1;
    }
    bar.finish();
    let file = w.into_inner().map_err(|e| io(e.into_error()))?;
    file.sync_all().map_err(io)?;
    drop(file);

    // Read it back with tuner's own reader before calling it done.
    let g = GgufFile::open(out)
        .with_context(|| format!("the GGUF file just written ({}) does not read back", out.display()))?;
    if g.tensors().len() != plan.len() || g.metadata().len() != meta.len() {
        bail!(
            "{} reads back with {} tensors and {} keys, expected {} and {}",
            out.display(),
            g.tensors().len(),
            g.metadata().len(),
            plan.len(),
            meta.len()
        );
    }
    Ok(GgufSummary { tensors: plan.len(), types, f16_fallback })
}
