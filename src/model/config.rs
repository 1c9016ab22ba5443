//! HF `config.json` → a normalized [`Config`] for the decoder families we run.
//!
//! Reference: transformers `configuration_{llama,mistral,qwen2,qwen3}.py` and
//! `modeling_rope_utils.py` (arch-spec §3). Field names equal the config.json keys.
//! Both the classic layout (`rope_theta` + `rope_scaling`) and the transformers-5
//! layout (`rope_parameters: {rope_theta, rope_type, …}`) are read.

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::Deserialize;
use serde_json::Value;

/// Model families this module can build, by their `model_type`.
pub const SUPPORTED: [&str; 4] = ["llama", "mistral", "qwen2", "qwen3"];

/// How RoPE frequencies are rescaled (`rope_scaling.rope_type`).
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// Plain RoPE (`null` or `rope_type: "default"`).
    None,
    /// `inv_freq /= factor`.
    Linear { factor: f64 },
    /// Llama 3.1 frequency-dependent rescaling (`_compute_llama3_parameters`).
    Llama3 { factor: f64, low_freq_factor: f64, high_freq_factor: f64, original_max_position_embeddings: f64 },
}

/// `quantization_config` of a pre-quantized (bitsandbytes) checkpoint.
#[derive(Debug, Clone, Deserialize)]
pub struct QuantizationConfig {
    /// `"bitsandbytes"` for the checkpoints we read.
    #[serde(default)]
    pub quant_method: Option<String>,
    /// True for 4-bit checkpoints.
    #[serde(default)]
    pub load_in_4bit: bool,
    /// `"nf4"` or `"fp4"`.
    #[serde(default)]
    pub bnb_4bit_quant_type: Option<String>,
    /// Whether absmax is itself quantized.
    #[serde(default)]
    pub bnb_4bit_use_double_quant: bool,
    /// Compute dtype the checkpoint was saved for (e.g. `"bfloat16"`).
    #[serde(default)]
    pub bnb_4bit_compute_dtype: Option<String>,
    /// Module names left unquantized.
    #[serde(default)]
    pub llm_int8_skip_modules: Option<Vec<String>>,
}

/// The normalized architecture description every family builds from.
#[derive(Debug, Clone)]
pub struct Config {
    /// `model_type`, one of [`SUPPORTED`].
    pub model_type: String,
    /// Residual width.
    pub hidden_size: i64,
    /// Decoder layers.
    pub num_hidden_layers: i64,
    /// Query heads.
    pub num_attention_heads: i64,
    /// Key/value heads (GQA); equals `num_attention_heads` when absent.
    pub num_key_value_heads: i64,
    /// Per-head width: explicit `head_dim` when present, else hidden/heads.
    pub head_dim: i64,
    /// MLP width.
    pub intermediate_size: i64,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// RoPE base.
    pub rope_theta: f64,
    /// RoPE rescaling.
    pub rope_scaling: RopeScaling,
    /// Sliding-window size applied to every layer (Mistral), `None` for full attention.
    pub sliding_window: Option<i64>,
    /// `lm_head` shares `embed_tokens.weight`.
    pub tie_word_embeddings: bool,
    /// q/k/v projections carry a bias (Qwen2 always; Llama/Qwen3 when `attention_bias`).
    pub qkv_bias: bool,
    /// o_proj carries a bias (Llama/Qwen3 `attention_bias`).
    pub o_bias: bool,
    /// gate/up/down carry a bias (Llama `mlp_bias`).
    pub mlp_bias: bool,
    /// Vocabulary size (rows of the embedding).
    pub vocab_size: i64,
    /// Beginning-of-sequence token.
    pub bos_token_id: Option<i64>,
    /// End-of-sequence token(s).
    pub eos_token_ids: Vec<i64>,
    /// Padding token.
    pub pad_token_id: Option<i64>,
    /// Context length the model was trained for.
    pub max_position_embeddings: i64,
    /// Present for pre-quantized checkpoints.
    pub quantization_config: Option<QuantizationConfig>,
}

#[derive(Deserialize)]
struct Raw {
    hidden_size: i64,
    num_hidden_layers: i64,
    num_attention_heads: i64,
    num_key_value_heads: Option<i64>,
    head_dim: Option<i64>,
    intermediate_size: i64,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    rope_scaling: Option<Value>,
    rope_parameters: Option<Value>,
    sliding_window: Option<i64>,
    use_sliding_window: Option<bool>,
    tie_word_embeddings: Option<bool>,
    attention_bias: Option<bool>,
    mlp_bias: Option<bool>,
    hidden_act: Option<String>,
    vocab_size: i64,
    bos_token_id: Option<i64>,
    eos_token_id: Option<Value>,
    pad_token_id: Option<i64>,
    max_position_embeddings: Option<i64>,
    quantization_config: Option<QuantizationConfig>,
}

impl Config {
    /// Read and normalize `<dir>/config.json`.
    pub fn from_dir(dir: &Path) -> Result<Config> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
        Config::from_json(&text).with_context(|| format!("invalid model config {}", path.display()))
    }

    /// Normalize the text of a config.json.
    pub fn from_json(text: &str) -> Result<Config> {
        let value: Value = serde_json::from_str(text).context("config.json is not valid JSON")?;
        let model_type = value.get("model_type").and_then(Value::as_str).unwrap_or("").to_string();
        if !SUPPORTED.contains(&model_type.as_str()) {
            bail!("model type `{model_type}` is not supported; supported: {}", SUPPORTED.join(", "));
        }
        let raw: Raw = serde_json::from_value(value).context("config.json misses a required field")?;
        let family = model_type.clone();
        let t = family.as_str();
        let act = raw.hidden_act.as_deref().unwrap_or("silu");
        if act != "silu" {
            bail!("hidden_act `{act}` is not supported for {t} (expected `silu`)");
        }
        if raw.num_attention_heads <= 0 || (raw.head_dim.is_none() && raw.hidden_size % raw.num_attention_heads != 0) {
            bail!(
                "hidden_size {} is not divisible by num_attention_heads {}",
                raw.hidden_size,
                raw.num_attention_heads
            );
        }
        let num_key_value_heads = raw.num_key_value_heads.unwrap_or(raw.num_attention_heads);
        if num_key_value_heads <= 0 || raw.num_attention_heads % num_key_value_heads != 0 {
            bail!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {num_key_value_heads}",
                raw.num_attention_heads
            );
        }
        let rope_params = raw.rope_parameters.as_ref().filter(|v| v.is_object());
        let rope_theta = raw
            .rope_theta
            .or_else(|| rope_params.and_then(|p| p.get("rope_theta")).and_then(Value::as_f64))
            .unwrap_or(if t == "qwen2" || t == "qwen3" { 1e6 } else { 1e4 });
        let rope_scaling = parse_rope_scaling(raw.rope_scaling.as_ref().or(rope_params))?;
        let sliding_window = match t {
            "mistral" => raw.sliding_window,
            "qwen2" | "qwen3" if raw.use_sliding_window == Some(true) => {
                bail!("use_sliding_window = true is not supported for {t}")
            }
            _ => None,
        };
        let attention_bias = raw.attention_bias.unwrap_or(false);
        let (qkv_bias, o_bias) = match t {
            "qwen2" => (true, false),
            "mistral" => (false, false),
            _ => (attention_bias, attention_bias),
        };
        let eos_token_ids = match &raw.eos_token_id {
            None | Some(Value::Null) => vec![],
            Some(Value::Array(items)) => items.iter().filter_map(Value::as_i64).collect(),
            Some(v) => v.as_i64().into_iter().collect(),
        };
        Ok(Config {
            model_type,
            hidden_size: raw.hidden_size,
            num_hidden_layers: raw.num_hidden_layers,
            num_attention_heads: raw.num_attention_heads,
            num_key_value_heads,
            head_dim: raw.head_dim.unwrap_or(raw.hidden_size / raw.num_attention_heads),
            intermediate_size: raw.intermediate_size,
            rms_norm_eps: raw.rms_norm_eps.unwrap_or(if t == "qwen2" || t == "qwen3" { 1e-6 } else { 1e-5 }),
            rope_theta,
            rope_scaling,
            sliding_window,
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(false),
            qkv_bias,
            o_bias,
            mlp_bias: t == "llama" && raw.mlp_bias.unwrap_or(false),
            vocab_size: raw.vocab_size,
            bos_token_id: raw.bos_token_id,
            eos_token_ids,
            pad_token_id: raw.pad_token_id,
            max_position_embeddings: raw.max_position_embeddings.unwrap_or(2048),
            quantization_config: raw.quantization_config,
        })
    }

    /// True when the checkpoint carries bitsandbytes 4-bit weights.
    pub fn is_bnb_4bit(&self) -> bool {
        self.quantization_config.as_ref().is_some_and(|q| q.load_in_4bit)
    }
}

/// `rope_scaling` (or `rope_parameters`) → [`RopeScaling`]; unknown types are refused by name.
fn parse_rope_scaling(v: Option<&Value>) -> Result<RopeScaling> {
    let Some(v) = v.filter(|v| !v.is_null()) else { return Ok(RopeScaling::None) };
    let kind = v.get("rope_type").or_else(|| v.get("type")).and_then(Value::as_str).unwrap_or("default");
    let num = |key: &str| -> Result<f64> {
        v.get(key)
            .and_then(Value::as_f64)
            .with_context(|| format!("rope_scaling.{key} is missing for rope type `{kind}`"))
    };
    if let Some(f) = v.get("attention_factor").and_then(Value::as_f64) {
        if f != 1.0 {
            bail!("rope_scaling.attention_factor {f} is not supported");
        }
    }
    Ok(match kind {
        "default" => RopeScaling::None,
        "linear" => RopeScaling::Linear { factor: num("factor")? },
        "llama3" => RopeScaling::Llama3 {
            factor: num("factor")?,
            low_freq_factor: num("low_freq_factor")?,
            high_freq_factor: num("high_freq_factor")?,
            original_max_position_embeddings: num("original_max_position_embeddings")?,
        },
        other => bail!("rope type `{other}` is not supported; supported: default, linear, llama3"),
    })
}
