//! `config.json` of an imported GGUF model, per architecture: transformers' `LlamaForCausalLM`,
//! `Phi3ForCausalLM`, `Gemma2ForCausalLM`, `Gemma3ForCausalLM` (`gemma3_text`) and
//! `Gemma3nForCausalLM` (`gemma3n_text`) configs, from the `{arch}.*` keys llama.cpp's converter
//! writes (gguf-py `constants.py`) and, where llama.cpp fixes a value instead of storing it, the
//! value it fixes: Gemma's sliding-window pattern (every 2nd / 6th / 5th layer global for Gemma
//! 2 / 3 / 3n) unless `attention.sliding_window_pattern` says otherwise, the attention scale
//! `head_dim^-0.5` unless `attention.scale` says otherwise, the local rope base 10000 unless
//! `rope.freq_base_swa` says otherwise.

use super::arch::GgufArch;
use super::hparams::normal_quantile;

use super::read::{meta_float, meta_usize, GgufFile};
use anyhow::{anyhow, Result};
use serde_json::{json, Map, Value};

/// Hyper-parameters of a GGUF model, in HF terms (the keys every architecture shares).
#[derive(Debug, Clone, PartialEq)]
pub struct Params {
    /// The architecture.
    pub arch: GgufArch,
    /// `hidden_size` (`{arch}.embedding_length`).
    pub hidden_size: usize,
    /// `intermediate_size` (`{arch}.feed_forward_length`; the first layer's when per layer).
    pub intermediate_size: usize,
    /// The MLP width of each layer (Gemma 3n's array; else `intermediate_size` repeated).
    pub intermediate_sizes: Vec<usize>,
    /// `num_hidden_layers` (`{arch}.block_count`).
    pub num_hidden_layers: usize,
    /// `num_attention_heads` (`{arch}.attention.head_count`).
    pub num_attention_heads: usize,
    /// `num_key_value_heads` (`{arch}.attention.head_count_kv`, default: the head count).
    pub num_key_value_heads: usize,
    /// `head_dim` (`{arch}.attention.key_length`, default hidden / heads).
    pub head_dim: usize,
    /// `rms_norm_eps` (`{arch}.attention.layer_norm_rms_epsilon`).
    pub rms_norm_eps: f64,
    /// `rope_theta` (`{arch}.rope.freq_base`, default 10000).
    pub rope_theta: f64,
    /// `max_position_embeddings` (`{arch}.context_length`).
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

/// `config.json` for the model `g` holds.
pub fn config_json(g: &GgufFile, hp: &Params) -> Result<Value> {
    let mut c = match hp.arch {
        GgufArch::Phi3 => phi3(g, hp)?,
        GgufArch::Gemma2 | GgufArch::Gemma3 | GgufArch::Gemma3n => gemma(g, hp)?,
        _ => return llama_config_json(g, hp),
    };
    let id = |k: &str| g.get_u64(k);
    c.insert("bos_token_id".into(), json!(id("tokenizer.ggml.bos_token_id")?));
    c.insert("eos_token_id".into(), json!(id("tokenizer.ggml.eos_token_id")?));
    c.insert("pad_token_id".into(), json!(id("tokenizer.ggml.padding_token_id")?));
    c.insert("torch_dtype".into(), json!("float32"));
    Ok(Value::Object(c))
}

/// The fields every non-llama config shares.
fn common(hp: &Params, architecture: &str, model_type: &str) -> Map<String, Value> {
    let v = json!({
        "architectures": [architecture],
        "model_type": model_type,
        "hidden_size": hp.hidden_size,
        "intermediate_size": hp.intermediate_size,
        "num_hidden_layers": hp.num_hidden_layers,
        "num_attention_heads": hp.num_attention_heads,
        "num_key_value_heads": hp.num_key_value_heads,
        "head_dim": hp.head_dim,
        "rms_norm_eps": hp.rms_norm_eps,
        "rope_theta": hp.rope_theta,
        "rope_scaling": hp.rope_scaling,
        "max_position_embeddings": hp.max_position_embeddings,
        "vocab_size": hp.vocab_size,
        "tie_word_embeddings": hp.tie_word_embeddings,
        "attention_bias": hp.attention_bias,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "use_cache": true,
    });
    match v {
        Value::Object(m) => m,
        _ => Map::new(),
    }
}

/// Phi-3: fused projections need no config; the sliding window (0 = none) and the original context.
fn phi3(g: &GgufFile, hp: &Params) -> Result<Map<String, Value>> {
    let mut c = common(hp, "Phi3ForCausalLM", "phi3");
    c.insert("hidden_act".into(), json!("silu"));
    let window = meta_usize(g, "phi3.attention.sliding_window")?.filter(|w| *w > 0);
    c.insert("sliding_window".into(), json!(window));
    let orig = meta_usize(g, "phi3.rope.scaling.original_context_length")?;
    c.insert("original_max_position_embeddings".into(), json!(orig.unwrap_or(hp.max_position_embeddings)));
    Ok(c)
}

/// Which layers slide: `attention.sliding_window_pattern`, else llama.cpp's fixed period.
fn layer_types(g: &GgufFile, hp: &Params) -> Result<Vec<&'static str>> {
    let arch = hp.arch;
    let key = format!("{arch}.attention.sliding_window_pattern");
    let sliding: Vec<bool> = match g.get_array(&key)? {
        Some(a) => a
            .iter()
            .map(|v| v.as_bool().ok_or_else(|| anyhow!("{}: `{key}` holds a non-bool", g.path().display())))
            .collect::<Result<_>>()?,
        None => {
            let period = match arch {
                GgufArch::Gemma2 => 2,
                GgufArch::Gemma3n => 5,
                _ => 6,
            };
            (0..hp.num_hidden_layers).map(|i| (i + 1) % period != 0).collect()
        }
    };
    if sliding.len() != hp.num_hidden_layers {
        let shown = g.path().display();
        return Err(anyhow!("{shown}: `{key}` has {} entries for {} layers", sliding.len(), hp.num_hidden_layers));
    }
    Ok(sliding.into_iter().map(|s| if s { "sliding_attention" } else { "full_attention" }).collect())
}

/// `query_pre_attn_scalar` from `attention.scale` (`s^-0.5`), else the head size; a value within
/// 1e-4 of an integer is that integer (the scale was stored as f32).
fn query_pre_attn_scalar(g: &GgufFile, hp: &Params) -> Result<f64> {
    Ok(match meta_float(g, &format!("{}.attention.scale", hp.arch))? {
        Some(scale) if scale > 0.0 => {
            let s = 1.0 / (scale * scale);
            if (s - s.round()).abs() < 1e-4 * s {
                s.round()
            } else {
                s
            }
        }
        _ => hp.head_dim as f64,
    })
}

/// Gemma 2, 3 and 3n.
fn gemma(g: &GgufFile, hp: &Params) -> Result<Map<String, Value>> {
    let arch = hp.arch;
    let key = |k: &str| format!("{arch}.{k}");
    let (architecture, model_type) = match arch {
        GgufArch::Gemma2 => ("Gemma2ForCausalLM", "gemma2"),
        GgufArch::Gemma3 => ("Gemma3ForCausalLM", "gemma3_text"),
        _ => ("Gemma3nForCausalLM", "gemma3n_text"),
    };
    let mut c = common(hp, architecture, model_type);
    c.insert("hidden_activation".into(), json!("gelu_pytorch_tanh"));
    c.insert("sliding_window".into(), json!(meta_usize(g, &key("attention.sliding_window"))?));
    c.insert("layer_types".into(), json!(layer_types(g, hp)?));
    c.insert("final_logit_softcapping".into(), json!(meta_float(g, &key("final_logit_softcapping"))?));
    if arch == GgufArch::Gemma2 {
        c.insert("attn_logit_softcapping".into(), json!(meta_float(g, &key("attn_logit_softcapping"))?));
    } else {
        let local = meta_float(g, &key("rope.freq_base_swa"))?.unwrap_or(10000.0);
        c.insert("rope_local_base_freq".into(), json!(local));
    }
    if arch == GgufArch::Gemma3n {
        gemma3n(g, hp, &mut c)?;
    } else {
        c.insert("query_pre_attn_scalar".into(), json!(query_pre_attn_scalar(g, hp)?));
    }
    Ok(c)
}

/// Gemma 3n's AltUp, LAuReL, per-layer input, KV sharing and activation sparsity.
fn gemma3n(g: &GgufFile, hp: &Params, c: &mut Map<String, Value>) -> Result<()> {
    let shown = g.path().display();
    let need = |k: &str| {
        meta_usize(g, &format!("gemma3n.{k}"))?.ok_or_else(|| anyhow!("metadata `gemma3n.{k}` is missing from {shown}"))
    };
    let rows = |t: &str| {
        g.tensor(t).map(|i| i.shape()[0]).ok_or_else(|| anyhow!("{shown} has no `{t}` tensor, which gemma3n needs"))
    };
    c.insert("intermediate_size".into(), json!(hp.intermediate_sizes));
    c.insert("hidden_size_per_layer_input".into(), json!(need("embedding_length_per_layer_input")?));
    c.insert("vocab_size_per_layer_input".into(), json!(rows("per_layer_token_embd.weight")?));
    c.insert("num_kv_shared_layers".into(), json!(need("attention.shared_kv_layers")?));
    c.insert("altup_num_inputs".into(), json!(need("altup.num_inputs")?));
    c.insert("altup_active_idx".into(), json!(need("altup.active_idx")?));
    c.insert("altup_coef_clip".into(), json!(120.0));
    c.insert("altup_correct_scale".into(), json!(true));
    c.insert("laurel_rank".into(), json!(rows("blk.0.laurel_l.weight")?));
    let scales = g
        .get_array("gemma3n.activation_sparsity_scale")?
        .ok_or_else(|| anyhow!("metadata `gemma3n.activation_sparsity_scale` is missing from {shown}"))?;
    let pattern: Vec<f64> = scales
        .iter()
        .map(|v| {
            v.as_f64().map(normal_cdf).ok_or_else(|| anyhow!("{shown}: activation_sparsity_scale holds a non-number"))
        })
        .collect::<Result<_>>()?;
    c.insert("activation_sparsity_pattern".into(), json!(pattern));
    Ok(())
}

/// The standard normal CDF at `x` as the inverse of [`normal_quantile`] (bisection), rounded to
/// 6 decimals: the sparsity targets the converter turned into quantiles (0.95, 0.0, ...).
pub fn normal_cdf(x: f64) -> f64 {
    if x == f64::NEG_INFINITY {
        return 0.0;
    }
    if x == f64::INFINITY {
        return 1.0;
    }
    let (mut lo, mut hi) = (0.0f64, 1.0f64);
    for _ in 0..80 {
        let mid = 0.5 * (lo + hi);
        if normal_quantile(mid) < x {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    (0.5 * (lo + hi) * 1e6).round() / 1e6
}

/// `config.json` for `LlamaForCausalLM`.
fn llama_config_json(g: &GgufFile, hp: &Params) -> Result<Value> {
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
