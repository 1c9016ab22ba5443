//! The model families, registered in one place: the config.json `model_type`s each reads, how it
//! loads, the linear modules a LoRA adapter can target, whether it has a hand-written backward
//! (the GPU training path), and the GGUF architecture it exports to. The loader
//! ([`super::load`]), config parsing, recipe validation, `tuner plan` and the GGUF export ask
//! this table instead of keeping their own lists.
//!
//! Families that share a block point at it: Mistral, Qwen2, Qwen3 and Phi-3 are Llama's decoder
//! (`llama.rs`; sliding window, q/k/v bias and head_dim come from the config, Qwen3 adds its
//! q/k norms, Phi-3's fused projections are read as stored), Gemma 3 is Gemma 2's (`gemma2.rs`, with q/k norms). References: transformers
//! `models/<family>/modeling_<family>.py`, llama.cpp `convert_hf_to_gguf.py` for the GGUF names.

use anyhow::Result;

use super::blocks::Loader;
use super::config::{AttentionBias, ConfigRules, Window};
use super::decoder::Decoder;
use super::llama::LlamaAttention;
use super::{gemma2, gemma3n, llama, CausalLm, Config, LoadOptions, Weights};
use anyhow::{bail, Context};
use serde_json::Value;
use std::path::Path;

/// The llama.cpp architecture a family is written as (and imported from); what each one means is
/// in `gguf/arch.rs`.
pub use crate::gguf::GgufArch;

/// One model family.
pub struct Family {
    /// The `model_type`s of config.json it reads; the first is its name. A multimodal Gemma
    /// checkpoint's top-level type (`gemma3`, `gemma3n`) is listed after its text decoder's:
    /// types after the first are read through their `text_config`.
    pub model_types: &'static [&'static str],
    /// How its config.json is read.
    pub config: ConfigRules,
    /// Build the model from a normalised config and the checkpoint's tensors.
    pub load: fn(Config, &Weights, &LoadOptions) -> Result<Box<dyn CausalLm>>,
    /// The linear modules a LoRA adapter can target (`lora.target_modules`).
    pub linears: &'static [&'static str],
    /// Whether training on CUDA takes the hand-written layer backward.
    pub hand_backward: bool,
    /// GGUF export, when supported.
    pub gguf: Option<GgufArch>,
}

impl Family {
    /// The family's name (its first `model_type`).
    pub fn name(&self) -> &'static str {
        self.model_types[0]
    }
}

const DECODER_LINEARS: &[&str] = &["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];

/// Every family tuner builds.
pub static FAMILIES: [Family; 8] = [
    Family {
        model_types: &["llama"],
        config: ConfigRules::LLAMA,
        load: |c, w, o| Ok(Box::new(llama::load(c, w, o)?)),
        linears: DECODER_LINEARS,
        hand_backward: true,
        gguf: Some(GgufArch::Llama),
    },
    Family {
        // Llama's decoder; the window comes from `config.sliding_window`.
        model_types: &["mistral"],
        config: ConfigRules {
            sliding_window: Window::Read,
            attention_bias: AttentionBias::Fixed { qkv: false, o: false },
            mlp_bias: false,
            ..ConfigRules::LLAMA
        },
        load: |c, w, o| Ok(Box::new(llama::load(c, w, o)?)),
        linears: DECODER_LINEARS,
        hand_backward: true,
        gguf: Some(GgufArch::Llama),
    },
    Family {
        // Llama's decoder with q/k/v bias (from the config).
        model_types: &["qwen2"],
        config: ConfigRules {
            rope_theta: 1e6,
            rms_norm_eps: 1e-6,
            sliding_window: Window::Refused,
            attention_bias: AttentionBias::Fixed { qkv: true, o: false },
            mlp_bias: false,
            ..ConfigRules::LLAMA
        },
        load: |c, w, o| Ok(Box::new(llama::load(c, w, o)?)),
        linears: DECODER_LINEARS,
        hand_backward: true,
        gguf: Some(GgufArch::Qwen2),
    },
    Family {
        // Llama's decoder with per-head q/k RMSNorm before RoPE and an explicit head_dim.
        model_types: &["qwen3"],
        config: ConfigRules {
            rope_theta: 1e6,
            rms_norm_eps: 1e-6,
            sliding_window: Window::Refused,
            mlp_bias: false,
            ..ConfigRules::LLAMA
        },
        load: |c, w, o| Ok(Box::new(Decoder::load(c, &Loader::new(w, o), LlamaAttention::load_qk_norm)?)),
        linears: DECODER_LINEARS,
        hand_backward: true,
        gguf: Some(GgufArch::Qwen3),
    },
    Family {
        // Llama's decoder with fused `qkv_proj` and `gate_up_proj` (read from the checkpoint's
        // keys) and a sliding window from the config.
        model_types: &["phi3"],
        config: ConfigRules { sliding_window: Window::Read, mlp_bias: false, ..ConfigRules::LLAMA },
        load: |c, w, o| Ok(Box::new(llama::load(c, w, o)?)),
        linears: &["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
        hand_backward: true,
        gguf: Some(GgufArch::Phi3),
    },
    Family {
        model_types: &["gemma2"],
        config: ConfigRules::GEMMA2,
        load: |c, w, o| Ok(Box::new(gemma2::load(c, w, o)?)),
        linears: DECODER_LINEARS,
        hand_backward: false,
        gguf: Some(GgufArch::Gemma2),
    },
    Family {
        // Gemma 2's decoder with q/k norms (`gemma3` with a `text_config` is read through it).
        model_types: &["gemma3_text", "gemma3"],
        config: ConfigRules { rope_theta: 1e6, full_every: None, local_rope: true, ..ConfigRules::GEMMA2 },
        load: |c, w, o| Ok(Box::new(gemma2::Gemma::load(c, w, o, true)?)),
        linears: DECODER_LINEARS,
        hand_backward: false,
        gguf: Some(GgufArch::Gemma3),
    },
    Family {
        model_types: &["gemma3n_text", "gemma3n"],
        config: ConfigRules {
            rope_theta: 1e6,
            full_every: Some(5),
            local_rope: true,
            attn_softcap: false,
            query_pre_attn_scalar: false,
            ..ConfigRules::GEMMA2
        },
        load: |c, w, o| Ok(Box::new(gemma3n::load(c, w, o)?)),
        linears: DECODER_LINEARS,
        hand_backward: false,
        gguf: Some(GgufArch::Gemma3n),
    },
];

/// The family that reads config.json's `model_type`, if any.
pub fn by_model_type(model_type: &str) -> Option<&'static Family> {
    FAMILIES.iter().find(|f| f.model_types.contains(&model_type))
}

/// The families' names, for messages: "llama, mistral, …".
pub fn names() -> String {
    FAMILIES.iter().map(Family::name).collect::<Vec<_>>().join(", ")
}

/// The families that export to GGUF, for messages.
pub fn gguf_names() -> String {
    FAMILIES.iter().filter(|f| f.gguf.is_some()).map(Family::name).collect::<Vec<_>>().join(", ")
}

impl Config {
    /// Read and normalize `<dir>/config.json`.
    pub fn from_dir(dir: &Path) -> Result<Config> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
        Config::from_json(&text).with_context(|| format!("invalid model config {}", path.display()))
    }

    /// Normalize the text of a config.json by its family's rules ([`ConfigRules`]).
    pub fn from_json(text: &str) -> Result<Config> {
        let mut value: Value = serde_json::from_str(text).context("config.json is not valid JSON")?;
        let model_type = value.get("model_type").and_then(Value::as_str).unwrap_or("").to_string();
        let Some(family) = by_model_type(&model_type) else {
            bail!("model type `{model_type}` is not supported; supported: {}", names());
        };
        // Multimodal Gemma 3 / 3n: the decoder is described by `text_config`.
        if model_type != family.name() {
            value = text_config(&value, &model_type, family.name())?;
        }
        Config::from_value(value, family.name().to_string(), family.config)
    }
}

/// The decoder's config of a multimodal checkpoint (`text_config`), with the top-level keys it
/// inherits and `model_type` set to the text decoder's.
fn text_config(value: &Value, model_type: &str, decoder_type: &str) -> Result<Value> {
    let mut tc = value.get("text_config").cloned().filter(Value::is_object).with_context(|| {
        format!("model type `{model_type}` needs a `text_config` object (the text decoder's config)")
    })?;
    let top = value.as_object().cloned().unwrap_or_default();
    let obj = tc.as_object_mut().expect("checked above");
    for key in ["quantization_config", "eos_token_id", "bos_token_id", "pad_token_id", "tie_word_embeddings"] {
        if let Some(v) = top.get(key) {
            obj.entry(key).or_insert_with(|| v.clone());
        }
    }
    obj.insert("model_type".into(), Value::from(decoder_type));
    Ok(tc)
}
