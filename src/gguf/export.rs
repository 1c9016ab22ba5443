//! GGUF export: an HF folder (dense safetensors, e.g. `export/merged/`) written as one GGUF v3
//! file for llama.cpp and Ollama, for every family the registry gives a GGUF architecture
//! (`model/family.rs`): `llama` (Llama, Mistral), `qwen2`, `qwen3`, `phi3`, `gemma2`, `gemma3`
//! and `gemma3n` (the text model; a multimodal checkpoint's vision and audio towers are left out).
//!
//! Follows what llama.cpp's `convert_hf_to_gguf.py` writes:
//! - tensor names from the two-way table in [`super::names`];
//! - for `llama` only, the rows of Q and K (weights and biases) permuted per head so that the two
//!   rotary halves interleave ([`super::arch::permute_rows`]);
//! - Gemma 2 and 3's RMSNorm weights stored as `1 + w` ([`GgufArch::norm_shift`]); Gemma 3n's
//!   `altup_projections.{i}` / `altup_unembed_projections.{i}` stacked into one 3-D tensor each,
//!   and its per-layer token embedding padded with zero rows to the vocabulary size, as the
//!   converter does (it also truncates Gemma 3's embedding to the tokenizer's length; tuner keeps
//!   every row and names the extra ones `[PADn]`, so the file holds the model as trained);
//! - Llama-3 rope scaling as the `rope_freqs.weight` tensor of per-frequency divisors, linear
//!   scaling as `rope.scaling.type`/`rope.scaling.factor`; the hyper-parameters in
//!   [`super::hparams`], the vocabulary in [`super::tokenizer`] (byte-level BPE, `gpt2`) or
//!   [`super::spm_vocab`] (SentencePiece, `llama`: when the folder has `tokenizer.model`, as the
//!   converter's `set_vocab` prefers it, or a byte-fallback BPE `tokenizer.json`);
//! - tensor types per [`GgufType::tensor_type`], or for `q4_k_m` llama.cpp's Q4_K_M mix as
//!   `llama-quantize` chooses it ([`super::kquants::q4_k_m_types`], llama.cpp as vendored in
//!   llama-cpp-python 0.3.36), quantized from the merged weights as stored (llama-quantize
//!   starts from an F16 file's values: with `merged_dtype = "fp16"` the two are the same);
//!   encoded by [`super::write`].
//!
//! Other families, and tokenizers that are neither byte-level BPE nor SentencePiece, are
//! refused by name.

pub use super::arch::permute_rows;
use super::arch::GgufArch;
use super::hparams::{arch_metadata, Meta};
use super::names::{is_non_text, Names};
use super::read::GgufFile;
use super::spm_vocab::SpmSource;
use super::tokenizer::{pre_tokenizer_name, tokenizer_metadata};
use super::types::{GgmlType, GgufValue};
use super::write::{write_file, TensorOut};
use crate::model::{Config, RopeScaling, Weights};
use crate::util;
use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;
use tch::Kind;

pub use super::write::{quantize_q8_0, GgufType, ALIGNMENT, Q8_0_BLOCK};

/// How a model is written.
#[derive(Debug, Clone, PartialEq)]
pub struct Support {
    /// The architecture.
    pub arch: GgufArch,
    /// The vocabulary.
    pub vocab: Vocab,
}

/// How the vocabulary is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Vocab {
    /// Byte-level BPE (`tokenizer.ggml.model = gpt2`) with this `tokenizer.ggml.pre`.
    Gpt2 {
        /// `tokenizer.ggml.pre`.
        pre: &'static str,
    },
    /// SentencePiece (`tokenizer.ggml.model = llama`) from this source.
    SentencePiece(SpmSource),
}

/// Check that `model_dir` (an HF folder) can be written as GGUF; errors say why not.
pub fn check_supported(model_dir: &Path) -> Result<Support> {
    let raw: Value = util::read_json(&model_dir.join("config.json"))?;
    let model_type = raw["model_type"].as_str().unwrap_or("unknown");
    let Some(arch) = crate::model::family::by_model_type(model_type).and_then(|f| f.gguf) else {
        bail!(
            "GGUF export supports {} models; this model is `{model_type}`. \
             Export the merged model (`[export] merged = true`) and convert it with llama.cpp's convert_hf_to_gguf.py",
            crate::model::family::gguf_names()
        )
    };
    let cfg = Config::from_dir(model_dir)?;
    match (&cfg.rope_scaling, arch) {
        (RopeScaling::None, _)
        | (RopeScaling::Linear { .. }, GgufArch::Llama | GgufArch::Gemma3)
        | (RopeScaling::Llama3 { .. }, GgufArch::Llama) => {}
        (other, _) => bail!("GGUF export: rope scaling {other:?} is not supported for {}", cfg.model_type),
    }
    if cfg.model_type == "mistral" {
        if let Some(w) = cfg.sliding_window {
            log::warn!(
                "llama.cpp runs Mistral as `llama` without its sliding window ({w}); outputs differ beyond {w} tokens"
            );
        }
    }
    if let Some(g) = cfg.gemma3n.as_ref().filter(|g| g.altup_num_inputs != 4) {
        bail!("GGUF export: llama.cpp's gemma3n takes 4 AltUp streams; this model has {}", g.altup_num_inputs);
    }
    warn_fixed_pattern(&cfg, arch);
    let tok_path = model_dir.join("tokenizer.json");
    let has_model = model_dir.join("tokenizer.model").is_file();
    let tok: Value = if has_model && !tok_path.is_file() { Value::Null } else { util::read_json(&tok_path)? };
    let vocab = match super::spm_vocab::source(model_dir, &tok)? {
        Some(source) => Vocab::SentencePiece(source),
        None => Vocab::Gpt2 { pre: pre_tokenizer_name(&tok)? },
    };
    Ok(Support { arch, vocab })
}

/// llama.cpp fixes which Gemma 2 / 3 layers slide (every 2nd / every 6th is global): say so when
/// the model's `layer_types` differ.
fn warn_fixed_pattern(cfg: &Config, arch: GgufArch) {
    let period = match arch {
        GgufArch::Gemma2 => 2,
        GgufArch::Gemma3 => 6,
        _ => return,
    };
    let differs = (0..cfg.num_hidden_layers as usize).any(|i| cfg.is_sliding(i) != ((i + 1) % period != 0));
    if differs && cfg.sliding_window.is_some() {
        log::warn!(
            "llama.cpp runs {arch} with every {period}th layer global; this model's layer_types differ, so llama.cpp's \
             outputs differ beyond the sliding window (tuner's own import reads the written pattern)"
        );
    }
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

/// The key/values of the model: general, hyper-parameters, tokenizer.
fn metadata(dir: &Path, support: &Support, ty: GgufType, name: &str) -> Result<Meta> {
    let cfg = Config::from_dir(dir)?;
    let raw: Value = util::read_json(&dir.join("config.json"))?;
    let mut m: Meta = vec![
        ("general.architecture".into(), GgufValue::String(support.arch.name().into())),
        ("general.type".into(), GgufValue::String("model".into())),
        ("general.name".into(), GgufValue::String(name.into())),
        ("general.file_type".into(), GgufValue::U32(ty.file_type())),
        ("general.quantization_version".into(), GgufValue::U32(2)),
    ];
    m.extend(arch_metadata(&cfg, &raw, support.arch)?);
    let rows = cfg.vocab_size as usize;
    m.extend(match support.vocab {
        Vocab::Gpt2 { pre } => tokenizer_metadata(dir, rows, pre)?,
        Vocab::SentencePiece(source) => super::spm_vocab::metadata(dir, rows, support.arch, source)?,
    });
    Ok(m)
}

/// What [`write_gguf`] wrote.
#[derive(Debug, Clone)]
pub struct GgufSummary {
    /// Tensors written.
    pub tensors: usize,
    /// Tensor count per ggml type name.
    pub types: BTreeMap<String, usize>,
    /// Matrices written other than as the file type intends (F16 in a Q8_0 file, Q5_0/Q8_0/F16
    /// in a Q4_K_M one) because their rows are not whole blocks.
    pub f16_fallback: Vec<String>,
}

/// Where a tensor's values come from.
enum Source {
    /// HF tensors: one, or several stacked along a new first dimension.
    Hf(Vec<String>),
    /// Values computed here (rope_freqs).
    Values(Vec<f32>),
}

/// A tensor to write and how to produce its values.
struct Planned {
    out: TensorOut,
    source: Source,
    /// Q/K rows permuted over this many heads.
    permute_heads: Option<usize>,
    /// Added to every value (Gemma's norm convention).
    shift: f32,
}

/// The GGUF tensors of the HF folder `dir`, in checkpoint order, each with its source.
fn plan(dir: &Path, cfg: &Config, arch: GgufArch, ty: GgufType) -> Result<Vec<Planned>> {
    let shapes = tensor_shapes(dir)?;
    let names = Names::of(arch);
    let mut plan: Vec<Planned> = Vec::new();
    if let RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings } =
        cfg.rope_scaling
    {
        let (theta, dim) = (cfg.rope_theta, cfg.head_dim);
        let v = llama3_rope_factors(
            theta,
            dim,
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        );
        let out = TensorOut { name: "rope_freqs.weight".into(), shape: vec![v.len()], ty: GgmlType::F32 };
        plan.push(Planned { out, source: Source::Values(v), permute_heads: None, shift: 0.0 });
    }
    let mut hf_names: Vec<&String> = shapes.keys().collect();
    hf_names.sort_by_key(|n| crate::export::merged::order_key(n));
    let mut index: BTreeMap<String, usize> = BTreeMap::new();
    for hf in hf_names {
        if hf.ends_with("rotary_emb.inv_freq") || (cfg.tie_word_embeddings && hf.ends_with("lm_head.weight")) {
            continue;
        }
        if is_non_text(hf) {
            log::info!("GGUF export: `{hf}` belongs to the vision/audio side; only the text model is written");
            continue;
        }
        let target =
            names.to_gguf(hf).ok_or_else(|| anyhow!("GGUF export: tensor `{hf}` has no llama.cpp name for {arch}"))?;
        let mut shape = shapes[hf].clone();
        if let Some(i) = target.stack_index {
            // One GGUF tensor per stack: its slices in index order.
            let slot = *index.entry(target.name.clone()).or_insert_with(|| {
                let out = TensorOut { name: target.name.clone(), shape: vec![0], ty: GgmlType::F32 };
                plan.push(Planned { out, source: Source::Hf(vec![]), permute_heads: None, shift: 0.0 });
                plan.len() - 1
            });
            let Source::Hf(parts) = &mut plan[slot].source else { unreachable!("stacks read HF tensors") };
            if parts.len() != i {
                bail!("GGUF export: `{hf}` is out of order in its stack `{}`", target.name);
            }
            parts.push(hf.clone());
            shape.insert(0, parts.len());
            plan[slot].out.shape = shape.clone();
            plan[slot].out.ty = ty.tensor_type(&target.name, &shape);
            continue;
        }
        if arch == GgufArch::Gemma3n && target.name.ends_with("token_embd.weight") {
            // The converter pads both token embeddings to the vocabulary with zero rows.
            shape[0] = shape[0].max(cfg.vocab_size as usize);
        }
        let permute_heads = match (arch.permute_qk(), target.name.split('.').nth(2)) {
            (true, Some("attn_q")) => Some(cfg.num_attention_heads as usize),
            (true, Some("attn_k")) => Some(cfg.num_key_value_heads as usize),
            _ => None,
        };
        let shift = if hf.ends_with("norm.weight") { arch.norm_shift() } else { 0.0 };
        let tensor_ty = ty.tensor_type(&target.name, &shape);
        let out = TensorOut { name: target.name, ty: tensor_ty, shape };
        plan.push(Planned { out, source: Source::Hf(vec![hf.clone()]), permute_heads, shift });
    }
    Ok(plan)
}

/// The f32 values of one planned tensor, transformed as llama.cpp stores them.
fn values(p: &Planned, weights: &Weights) -> Result<Vec<f32>> {
    let mut v = match &p.source {
        Source::Values(v) => v.clone(),
        Source::Hf(parts) => {
            let mut v = Vec::new();
            for hf in parts {
                let t = weights.get(hf)?.to_kind(Kind::Float).contiguous().view([-1]);
                v.extend(Vec::<f32>::try_from(&t).map_err(|e| anyhow!("cannot read `{hf}`: {e}"))?);
            }
            v
        }
    };
    if let Some(heads) = p.permute_heads {
        v = permute_rows(&v, p.out.shape[0], heads).with_context(|| format!("`{}`", p.out.name))?;
    }
    if p.shift != 0.0 {
        v.iter_mut().for_each(|x| *x += p.shift);
    }
    let n: usize = p.out.shape.iter().product();
    if v.len() < n && p.out.name.ends_with("token_embd.weight") {
        v.resize(n, 0.0);
    }
    Ok(v)
}

/// Retype the planned tensors of a Q4_K_M file as llama.cpp's `llama-quantize` does
/// ([`super::kquants::q4_k_m_types`]: it needs the whole list, for tied embeddings and the
/// `attn_v` / `ffn_down` layers that get more bits).
fn q4_k_m_plan(plan: &mut [Planned], n_layer: usize) {
    let specs: Vec<super::kquants::TensorSpec> =
        plan.iter().map(|p| super::kquants::TensorSpec { name: &p.out.name, shape: &p.out.shape }).collect();
    let types = super::kquants::q4_k_m_types(&specs, n_layer);
    for (p, t) in plan.iter_mut().zip(types) {
        p.out.ty = t;
    }
}

/// Write the HF folder `dir` (dense safetensors, e.g. `export/merged/`) as the GGUF file `out`.
pub fn write_gguf(dir: &Path, out: &Path, ty: GgufType, name: &str) -> Result<GgufSummary> {
    let support = check_supported(dir)?;
    let cfg = Config::from_dir(dir)?;
    let meta = metadata(dir, &support, ty, name)?;
    let mut plan = plan(dir, &cfg, support.arch, ty)?;
    if ty == GgufType::Q4KM {
        q4_k_m_plan(&mut plan, cfg.num_hidden_layers as usize);
    }
    let f16_fallback =
        plan.iter().filter(|p| p.out.shape.len() >= 2 && !ty.intended(p.out.ty)).map(|p| p.out.name.clone()).collect();
    let tensors: Vec<TensorOut> = plan.iter().map(|p| p.out.clone()).collect();
    let weights = Weights::open(dir)?;
    let types = write_file(out, &meta, &tensors, &format!("write gguf {}", ty.name()), |i| values(&plan[i], &weights))?;

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
