//! The `general.*` and `{arch}.*` key/values a GGUF export writes for a model's hyper-parameters.
//!
//! Follows what llama.cpp's `convert_hf_to_gguf.py` writes (`TextModel.set_gguf_parameters` and
//! the `LlamaModel`, `Qwen2Model`, `Qwen3Model`, `Phi3MiniModel`, `Gemma2Model`, `Gemma3Model`
//! and `Gemma3NModel` classes), with key names from gguf-py's `constants.py` (`Keys.LLM`,
//! `Keys.Attention`, `Keys.Rope`; gguf 0.17.1, and llama.cpp's current gguf-py for the Gemma 3n
//! keys 0.17.1 predates). Value types are the ones `GGUFWriter` uses: UINT32 counts, FLOAT32
//! reals, INT32 arrays of integers, FLOAT32 arrays of reals, BOOL arrays of flags.
//!
//! Beyond the converter, the Gemma files carry `attention.sliding_window_pattern` (which layers
//! slide; llama.cpp fixes Gemma 2's and 3's pattern) and, when `query_pre_attn_scalar` differs
//! from the head size, `attention.scale` (llama.cpp infers Gemma's scale from the model size).
//! llama.cpp ignores both for those architectures; tuner's importer reads them back, so a round
//! trip keeps the model exact.

use super::arch::GgufArch;
use super::types::{GgufArray, GgufValue, GgufValueType};
use crate::model::{Config, RopeScaling};
use anyhow::{bail, Result};
use serde_json::Value;

/// Key/value pairs in the order written.
pub type Meta = Vec<(String, GgufValue)>;

fn u32v(v: i64) -> GgufValue {
    GgufValue::U32(v as u32)
}

fn array(elem_type: GgufValueType, items: Vec<GgufValue>) -> GgufValue {
    GgufValue::Array(GgufArray { elem_type, items })
}

/// The `{arch}.*` hyper-parameters of `cfg` (config.json parsed; `raw` as written).
pub fn arch_metadata(cfg: &Config, raw: &Value, arch: GgufArch) -> Result<Meta> {
    let k = |s: &str| format!("{arch}.{s}");
    let ffn = if arch == GgufArch::Gemma3n {
        array(GgufValueType::I32, cfg.intermediate_sizes.iter().map(|&v| GgufValue::I32(v as i32)).collect())
    } else {
        u32v(cfg.intermediate_size)
    };
    let mut m: Meta = vec![
        (k("vocab_size"), u32v(cfg.vocab_size)),
        (k("context_length"), u32v(cfg.max_position_embeddings)),
        (k("embedding_length"), u32v(cfg.hidden_size)),
        (k("block_count"), u32v(cfg.num_hidden_layers)),
        (k("feed_forward_length"), ffn),
        (k("attention.head_count"), u32v(cfg.num_attention_heads)),
        (k("attention.head_count_kv"), u32v(cfg.num_key_value_heads)),
        (k("rope.freq_base"), GgufValue::F32(cfg.rope_theta as f32)),
        (k("attention.layer_norm_rms_epsilon"), GgufValue::F32(cfg.rms_norm_eps as f32)),
        (k("rope.dimension_count"), u32v(cfg.head_dim)),
    ];
    if raw.get("head_dim").is_some_and(|v| !v.is_null()) || cfg.head_dim * cfg.num_attention_heads != cfg.hidden_size {
        m.push((k("attention.key_length"), u32v(cfg.head_dim)));
        m.push((k("attention.value_length"), u32v(cfg.head_dim)));
    }
    if let RopeScaling::Linear { factor } = cfg.rope_scaling {
        m.push((k("rope.scaling.type"), GgufValue::String("linear".into())));
        m.push((k("rope.scaling.factor"), GgufValue::F32(factor as f32)));
    }
    match arch {
        GgufArch::Phi3 => m.extend(phi3(cfg, raw, &k)),
        GgufArch::Gemma2 | GgufArch::Gemma3 | GgufArch::Gemma3n => m.extend(gemma(cfg, arch, &k)?),
        GgufArch::Llama | GgufArch::Qwen2 | GgufArch::Qwen3 => {}
    }
    Ok(m)
}

/// Phi-3: the original context length and the sliding window (0 for none, as the converter).
fn phi3(cfg: &Config, raw: &Value, k: &dyn Fn(&str) -> String) -> Meta {
    let mut m = Meta::new();
    if let Some(orig) = raw["original_max_position_embeddings"].as_i64() {
        m.push((k("rope.scaling.original_context_length"), u32v(orig)));
    }
    m.push((k("attention.sliding_window"), u32v(cfg.sliding_window.unwrap_or(0))));
    m
}

/// Gemma 2, 3 and 3n: soft-capping, the sliding window and which layers use it, the local rope
/// base, the attention scale; Gemma 3n's AltUp, per-layer input, KV sharing and sparsity.
fn gemma(cfg: &Config, arch: GgufArch, k: &dyn Fn(&str) -> String) -> Result<Meta> {
    let mut m = Meta::new();
    if let Some(c) = cfg.attn_logit_softcapping {
        if arch != GgufArch::Gemma2 {
            bail!("GGUF export: llama.cpp's {arch} has no attention logit soft-capping, but this model sets attn_logit_softcapping = {c}");
        }
        m.push((k("attn_logit_softcapping"), GgufValue::F32(c as f32)));
    }
    if let Some(c) = cfg.final_logit_softcapping {
        m.push((k("final_logit_softcapping"), GgufValue::F32(c as f32)));
    }
    if let Some(w) = cfg.sliding_window {
        m.push((k("attention.sliding_window"), u32v(w)));
    }
    let pattern = (0..cfg.num_hidden_layers as usize).map(|i| GgufValue::Bool(cfg.is_sliding(i))).collect();
    m.push((k("attention.sliding_window_pattern"), array(GgufValueType::Bool, pattern)));
    if let (GgufArch::Gemma3 | GgufArch::Gemma3n, Some(local)) = (arch, cfg.rope_local_theta) {
        m.push((k("rope.freq_base_swa"), GgufValue::F32(local as f32)));
    }
    if let Some(s) = cfg.query_pre_attn_scalar.filter(|s| *s != cfg.head_dim as f64) {
        m.push((k("attention.scale"), GgufValue::F32((1.0 / s.sqrt()) as f32)));
    }
    if let Some(g) = &cfg.gemma3n {
        m.push((k("altup.active_idx"), u32v(g.altup_active_idx)));
        m.push((k("altup.num_inputs"), u32v(g.altup_num_inputs)));
        m.push((k("embedding_length_per_layer_input"), u32v(g.hidden_size_per_layer_input)));
        m.push((k("attention.shared_kv_layers"), u32v(g.num_kv_shared_layers)));
        let scale = g.activation_sparsity_pattern.iter().map(|&p| GgufValue::F32(normal_quantile(p) as f32)).collect();
        m.push((k("activation_sparsity_scale"), array(GgufValueType::F32, scale)));
    }
    Ok(m)
}

/// The standard normal distribution's quantile function (inverse CDF): −∞ at 0, +∞ at 1.
/// Acklam's rational approximation (relative error below 1.2e-9), which the converter's
/// `torch.distributions.Normal(0, 1).icdf` matches to f32 precision.
#[allow(clippy::excessive_precision)] // Acklam's published coefficients, as published
pub fn normal_quantile(p: f64) -> f64 {
    const A: [f64; 6] = [
        -3.969683028665376e1,
        2.209460984245205e2,
        -2.759285104469687e2,
        1.383577518672690e2,
        -3.066479806614716e1,
        2.506628277459239,
    ];
    const B: [f64; 5] =
        [-5.447609879822406e1, 1.615858368580409e2, -1.556989798598866e2, 6.680131188771972e1, -1.328068155288572e1];
    const C: [f64; 6] = [
        -7.784894002430293e-3,
        -3.223964580411365e-1,
        -2.400758277161838,
        -2.549732539343734,
        4.374664141464968,
        2.938163982698783,
    ];
    const D: [f64; 4] = [7.784695709041462e-3, 3.224671290700398e-1, 2.445134137142996, 3.754408661907416];
    const LOW: f64 = 0.02425;
    if p <= 0.0 {
        return f64::NEG_INFINITY;
    }
    if p >= 1.0 {
        return f64::INFINITY;
    }
    let tail = |q: f64| {
        (((((C[0] * q + C[1]) * q + C[2]) * q + C[3]) * q + C[4]) * q + C[5])
            / ((((D[0] * q + D[1]) * q + D[2]) * q + D[3]) * q + 1.0)
    };
    if p < LOW {
        tail((-2.0 * p.ln()).sqrt())
    } else if p > 1.0 - LOW {
        -tail((-2.0 * (1.0 - p).ln()).sqrt())
    } else {
        let q = p - 0.5;
        let r = q * q;
        (((((A[0] * r + A[1]) * r + A[2]) * r + A[3]) * r + A[4]) * r + A[5]) * q
            / (((((B[0] * r + B[1]) * r + B[2]) * r + B[3]) * r + B[4]) * r + 1.0)
    }
}
