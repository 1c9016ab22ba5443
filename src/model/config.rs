//! HF `config.json` → a normalized [`Config`] for the decoder families we run.
//!
//! Reference: transformers `configuration_{llama,mistral,qwen2,qwen3,gemma2,gemma3,gemma3n}.py`
//! and `modeling_rope_utils.py` (docs/model-math.md §1–3). Field names equal the config.json keys.
//! Both the classic layout (`rope_theta` + `rope_scaling`, Gemma's `rope_local_base_freq`) and
//! the transformers-5 layout (`rope_parameters: {rope_theta, rope_type, …}`, or one such table
//! per layer type) are read. A multimodal Gemma 3 / 3n config is read through its `text_config`.

use anyhow::{bail, Context, Result};
use serde::Deserialize;
use serde_json::Value;

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
    /// `model_type`, a name of [`super::family::FAMILIES`].
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
    /// `hidden_act` / `hidden_activation`: `silu` or `gelu_pytorch_tanh`.
    pub hidden_act: String,
    /// Per layer: true for a sliding-window layer (`layer_types`); empty for the families whose
    /// window (if any) applies to every layer.
    pub layer_sliding: Vec<bool>,
    /// RoPE base of sliding layers (`rope_local_base_freq`, or `rope_parameters.sliding_attention`);
    /// their rope type is the default one.
    pub rope_local_theta: Option<f64>,
    /// Gemma 2 `attn_logit_softcapping`: scores become `tanh(s/c)·c`.
    pub attn_logit_softcapping: Option<f64>,
    /// Gemma `final_logit_softcapping`: logits become `tanh(l/c)·c`.
    pub final_logit_softcapping: Option<f64>,
    /// Gemma 2/3 `query_pre_attn_scalar`: attention scale `s^-0.5`.
    pub query_pre_attn_scalar: Option<f64>,
    /// MLP width per layer (Gemma 3n may give a list; else `intermediate_size` repeated).
    pub intermediate_sizes: Vec<i64>,
    /// Gemma 3n's extra fields.
    pub gemma3n: Option<Gemma3nConfig>,
}

/// The Gemma 3n text fields (docs/model-math.md §1.1).
#[derive(Debug, Clone, Deserialize)]
pub struct Gemma3nConfig {
    /// Width of one layer's per-layer input (P, 256 for E4B).
    pub hidden_size_per_layer_input: i64,
    /// Rows of `embed_tokens_per_layer`.
    pub vocab_size_per_layer_input: i64,
    /// The last this-many layers reuse an earlier layer's K/V.
    pub num_kv_shared_layers: i64,
    /// Per layer: the Gaussian top-k sparsity target of the MLP gate (0 = off).
    pub activation_sparsity_pattern: Vec<f64>,
    /// AltUp streams (4).
    pub altup_num_inputs: i64,
    /// The stream the layer computes on (0).
    pub altup_active_idx: i64,
    /// Clamp of the AltUp coefficient weights.
    pub altup_coef_clip: Option<f64>,
    /// Scale the corrected active stream by `correct_output_scale`.
    pub altup_correct_scale: bool,
    /// LAuReL rank.
    pub laurel_rank: i64,
}

#[derive(Deserialize)]
struct Raw {
    hidden_size: i64,
    num_hidden_layers: i64,
    num_attention_heads: i64,
    num_key_value_heads: Option<i64>,
    head_dim: Option<i64>,
    intermediate_size: Value,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    rope_scaling: Option<Value>,
    rope_parameters: Option<Value>,
    sliding_window: Option<i64>,
    use_sliding_window: Option<bool>,
    partial_rotary_factor: Option<f64>,
    tie_word_embeddings: Option<bool>,
    attention_bias: Option<bool>,
    mlp_bias: Option<bool>,
    hidden_act: Option<String>,
    hidden_activation: Option<String>,
    layer_types: Option<Vec<String>>,
    sliding_window_pattern: Option<i64>,
    rope_local_base_freq: Option<f64>,
    attn_logit_softcapping: Option<f64>,
    final_logit_softcapping: Option<f64>,
    query_pre_attn_scalar: Option<f64>,
    vocab_size: i64,
    bos_token_id: Option<i64>,
    eos_token_id: Option<Value>,
    pad_token_id: Option<i64>,
    max_position_embeddings: Option<i64>,
    quantization_config: Option<QuantizationConfig>,
}

/// How `sliding_window` in config.json is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Window {
    /// Not part of the family's config class: ignored.
    Ignored,
    /// Read when present (Mistral, Phi-3, Gemma).
    Read,
    /// Qwen's `use_sliding_window = true`: refused (transformers' Qwen2/3 attention ignores it too).
    Refused,
}

/// The biases of q/k/v and o.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttentionBias {
    /// From `attention_bias` (false when absent), for all four.
    FromConfig,
    /// Fixed by the family's modeling code.
    Fixed { qkv: bool, o: bool },
}

/// How a family's config.json is read where transformers' config classes differ.
#[derive(Debug, Clone, Copy)]
pub struct ConfigRules {
    /// Gemma's conventions: `hidden_activation` (gelu_pytorch_tanh) rather than `hidden_act`
    /// (silu), tied embeddings by default, sliding and full layers (`layer_types`).
    pub gemma: bool,
    /// `rope_theta` when the config has none.
    pub rope_theta: f64,
    /// `rms_norm_eps` when the config has none.
    pub rms_norm_eps: f64,
    pub sliding_window: Window,
    /// Without `layer_types`, every n-th layer is full attention (None: `sliding_window_pattern`,
    /// default 6).
    pub full_every: Option<i64>,
    /// Sliding layers have their own RoPE theta (`rope_local_base_freq`, default 1e4).
    pub local_rope: bool,
    pub attention_bias: AttentionBias,
    /// Reads `mlp_bias`.
    pub mlp_bias: bool,
    /// Reads `attn_logit_softcapping`.
    pub attn_softcap: bool,
    /// Reads `final_logit_softcapping`.
    pub final_softcap: bool,
    /// Reads `query_pre_attn_scalar` (default 256).
    pub query_pre_attn_scalar: bool,
}

impl ConfigRules {
    /// Llama's config: what the Llama-shaped families change.
    pub const LLAMA: ConfigRules = ConfigRules {
        gemma: false,
        rope_theta: 1e4,
        rms_norm_eps: 1e-5,
        sliding_window: Window::Ignored,
        full_every: None,
        local_rope: false,
        attention_bias: AttentionBias::FromConfig,
        mlp_bias: true,
        attn_softcap: false,
        final_softcap: false,
        query_pre_attn_scalar: false,
    };
    /// Gemma 2's config: what Gemma 3 and 3n change.
    pub const GEMMA2: ConfigRules = ConfigRules {
        gemma: true,
        rope_theta: 1e4,
        rms_norm_eps: 1e-6,
        sliding_window: Window::Read,
        full_every: Some(2),
        local_rope: false,
        attention_bias: AttentionBias::FromConfig,
        mlp_bias: false,
        attn_softcap: true,
        final_softcap: true,
        query_pre_attn_scalar: true,
    };
}

/// Gemma's sliding (true) and full (false) layers: `layer_types`, else the family's pattern.
fn layer_sliding(raw: &Raw, rules: ConfigRules, n: i64) -> Result<Vec<bool>> {
    Ok(match &raw.layer_types {
        Some(types) => {
            if types.len() as i64 != n {
                bail!("layer_types has {} entries but num_hidden_layers is {n}", types.len());
            }
            types
                .iter()
                .map(|s| match s.as_str() {
                    "sliding_attention" => Ok(true),
                    "full_attention" => Ok(false),
                    other => {
                        bail!("layer_types: `{other}` is not supported (expected sliding_attention or full_attention)")
                    }
                })
                .collect::<Result<_>>()?
        }
        None => {
            let pattern = rules.full_every.unwrap_or(raw.sliding_window_pattern.unwrap_or(6));
            (0..n).map(|i| (i + 1) % pattern != 0).collect()
        }
    })
}

/// `intermediate_size`: one integer for every layer, or a list of one per layer.
fn intermediate_sizes(v: &Value, n: i64) -> Result<Vec<i64>> {
    Ok(match v {
        Value::Array(items) => {
            let v: Vec<i64> = items.iter().filter_map(Value::as_i64).collect();
            if v.len() != items.len() || v.len() as i64 != n {
                bail!("intermediate_size is a list of {} entries; expected {n} integers (one per layer)", items.len());
            }
            v
        }
        v => vec![v.as_i64().context("intermediate_size must be an integer or a list of integers")?; n as usize],
    })
}

/// What tuner's Gemma 3n supports of its config.
fn check_gemma3n(g: &Gemma3nConfig, n: i64) -> Result<()> {
    if g.activation_sparsity_pattern.len() as i64 != n {
        bail!("activation_sparsity_pattern has {} entries; expected {n}", g.activation_sparsity_pattern.len());
    }
    if g.altup_num_inputs < 2 || g.altup_active_idx != 0 {
        bail!(
            "altup_num_inputs {} / altup_active_idx {}: only ≥ 2 streams with active index 0 are supported",
            g.altup_num_inputs,
            g.altup_active_idx
        );
    }
    if g.num_kv_shared_layers < 0 || g.num_kv_shared_layers >= n {
        bail!("num_kv_shared_layers {} must be below num_hidden_layers {n}", g.num_kv_shared_layers);
    }
    Ok(())
}

/// RoPE: the theta and scaling of full-attention layers, and the local theta of sliding layers
/// (Gemma 3 / 3n), from the classic keys or transformers 5's `rope_parameters`.
fn rope(raw: &Raw, rules: ConfigRules) -> Result<(f64, RopeScaling, Option<f64>)> {
    let rope_params = raw.rope_parameters.as_ref().filter(|v| v.is_object());
    // transformers 5 may give one rope table per layer type.
    let per_type = rope_params.filter(|p| p.get("full_attention").is_some() || p.get("sliding_attention").is_some());
    let full_params = match per_type {
        Some(p) => p.get("full_attention").filter(|v| v.is_object()),
        None => rope_params,
    };
    let rope_theta = raw
        .rope_theta
        .or_else(|| full_params.and_then(|p| p.get("rope_theta")).and_then(Value::as_f64))
        .unwrap_or(rules.rope_theta);
    let rope_scaling = parse_rope_scaling(raw.rope_scaling.as_ref().filter(|v| !v.is_null()).or(full_params))?;
    let rope_local_theta = if rules.local_rope {
        let local = per_type.and_then(|p| p.get("sliding_attention")).filter(|v| v.is_object());
        if let Some(l) = local {
            if parse_rope_scaling(Some(l))? != RopeScaling::None {
                bail!("rope_parameters.sliding_attention: only the default rope type is supported on sliding layers");
            }
        }
        Some(
            raw.rope_local_base_freq
                .or_else(|| local.and_then(|l| l.get("rope_theta")).and_then(Value::as_f64))
                .unwrap_or(1e4),
        )
    } else {
        None
    };
    Ok((rope_theta, rope_scaling, rope_local_theta))
}

/// Head counts that divide, and full-width RoPE; returns the KV head count.
fn check_heads(raw: &Raw) -> Result<i64> {
    if raw.num_attention_heads <= 0 || (raw.head_dim.is_none() && raw.hidden_size % raw.num_attention_heads != 0) {
        bail!("hidden_size {} is not divisible by num_attention_heads {}", raw.hidden_size, raw.num_attention_heads);
    }
    let num_key_value_heads = raw.num_key_value_heads.unwrap_or(raw.num_attention_heads);
    if num_key_value_heads <= 0 || raw.num_attention_heads % num_key_value_heads != 0 {
        bail!(
            "num_attention_heads {} is not a multiple of num_key_value_heads {num_key_value_heads}",
            raw.num_attention_heads
        );
    }
    if let Some(f) = raw.partial_rotary_factor.filter(|&f| f != 1.0) {
        bail!("partial_rotary_factor {f} is not supported (RoPE on part of each head, as in Phi-4-mini); only 1.0");
    }
    Ok(num_key_value_heads)
}

impl Config {
    /// Normalize a decoder's config.json (`value`, its `model_type` already the family's, the
    /// decoder's own config for a multimodal checkpoint) by its family's `rules`. Entry points:
    /// `Config::from_dir` and `Config::from_json` in `family.rs`, which find the family.
    pub(crate) fn from_value(value: Value, model_type: String, rules: ConfigRules) -> Result<Config> {
        let gemma3n: Option<Gemma3nConfig> = if model_type == "gemma3n_text" {
            Some(serde_json::from_value(value.clone()).context("config.json misses a Gemma 3n field")?)
        } else {
            None
        };
        let raw: Raw = serde_json::from_value(value).context("config.json misses a required field")?;
        let t = model_type.as_str();
        let gemma = rules.gemma;
        // Gemma reads `hidden_activation` (its `hidden_act` is a legacy field HF ignores).
        let act = if gemma {
            raw.hidden_activation.as_deref().unwrap_or("gelu_pytorch_tanh")
        } else {
            raw.hidden_act.as_deref().unwrap_or("silu")
        };
        let want = if gemma { "gelu_pytorch_tanh" } else { "silu" };
        if act != want {
            bail!("hidden_act `{act}` is not supported for {t} (expected `{want}`)");
        }
        let num_key_value_heads = check_heads(&raw)?;
        let n = raw.num_hidden_layers;
        let (rope_theta, rope_scaling, rope_local_theta) = rope(&raw, rules)?;
        let sliding_window = match rules.sliding_window {
            Window::Read => raw.sliding_window,
            Window::Refused if raw.use_sliding_window == Some(true) => {
                bail!("use_sliding_window = true is not supported for {t}")
            }
            Window::Refused | Window::Ignored => None,
        };
        let layer_sliding = if gemma { layer_sliding(&raw, rules, n)? } else { vec![] };
        let intermediate_sizes = intermediate_sizes(&raw.intermediate_size, n)?;
        if let Some(g) = &gemma3n {
            check_gemma3n(g, n)?;
        }
        let attention_bias = raw.attention_bias.unwrap_or(false);
        let (qkv_bias, o_bias) = match rules.attention_bias {
            AttentionBias::Fixed { qkv, o } => (qkv, o),
            AttentionBias::FromConfig => (attention_bias, attention_bias),
        };
        let eos_token_ids = match &raw.eos_token_id {
            None | Some(Value::Null) => vec![],
            Some(Value::Array(items)) => items.iter().filter_map(Value::as_i64).collect(),
            Some(v) => v.as_i64().into_iter().collect(),
        };
        let attn_softcap = raw.attn_logit_softcapping.filter(|_| rules.attn_softcap);
        let final_softcap = raw.final_logit_softcapping.filter(|_| rules.final_softcap);
        Ok(Config {
            model_type,
            hidden_size: raw.hidden_size,
            num_hidden_layers: n,
            num_attention_heads: raw.num_attention_heads,
            num_key_value_heads,
            head_dim: raw.head_dim.unwrap_or(raw.hidden_size / raw.num_attention_heads),
            intermediate_size: intermediate_sizes.iter().copied().max().unwrap_or(0),
            rms_norm_eps: raw.rms_norm_eps.unwrap_or(rules.rms_norm_eps),
            rope_theta,
            rope_scaling,
            sliding_window,
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(gemma),
            qkv_bias,
            o_bias,
            mlp_bias: rules.mlp_bias && raw.mlp_bias.unwrap_or(false),
            vocab_size: raw.vocab_size,
            bos_token_id: raw.bos_token_id,
            eos_token_ids,
            pad_token_id: raw.pad_token_id,
            max_position_embeddings: raw.max_position_embeddings.unwrap_or(2048),
            quantization_config: raw.quantization_config,
            hidden_act: act.to_string(),
            layer_sliding,
            rope_local_theta,
            attn_logit_softcapping: attn_softcap,
            final_logit_softcapping: final_softcap,
            query_pre_attn_scalar: rules.query_pre_attn_scalar.then(|| raw.query_pre_attn_scalar.unwrap_or(256.0)),
            intermediate_sizes,
            gemma3n,
        })
    }

    /// Whether layer `i` attends through a sliding window (per `layer_types`, or every layer
    /// when the family's window is global).
    pub fn is_sliding(&self, i: usize) -> bool {
        match self.layer_sliding.get(i) {
            Some(&s) => s && self.sliding_window.is_some(),
            None => self.sliding_window.is_some(),
        }
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
