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
use super::decoder::Decoder;
use super::llama::LlamaAttention;
use super::{gemma2, gemma3n, llama, CausalLm, Config, LoadOptions, Weights};

/// How a family is written as GGUF.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GgufArch {
    /// `general.architecture`.
    pub arch: &'static str,
    /// Whether q/k rows are permuted into llama.cpp's rotary layout (its `LlamaModel.permute`).
    pub permute_qk: bool,
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
    const LLAMA: ConfigRules = ConfigRules {
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
    const GEMMA2: ConfigRules = ConfigRules {
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
        gguf: Some(GgufArch { arch: "llama", permute_qk: true }),
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
        gguf: Some(GgufArch { arch: "llama", permute_qk: true }),
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
        gguf: Some(GgufArch { arch: "qwen2", permute_qk: false }),
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
        gguf: Some(GgufArch { arch: "qwen3", permute_qk: false }),
    },
    Family {
        // Llama's decoder with fused `qkv_proj` and `gate_up_proj` (read from the checkpoint's
        // keys) and a sliding window from the config.
        model_types: &["phi3"],
        config: ConfigRules { sliding_window: Window::Read, mlp_bias: false, ..ConfigRules::LLAMA },
        load: |c, w, o| Ok(Box::new(llama::load(c, w, o)?)),
        linears: &["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
        hand_backward: true,
        gguf: None,
    },
    Family {
        model_types: &["gemma2"],
        config: ConfigRules::GEMMA2,
        load: |c, w, o| Ok(Box::new(gemma2::load(c, w, o)?)),
        linears: DECODER_LINEARS,
        hand_backward: false,
        gguf: None,
    },
    Family {
        // Gemma 2's decoder with q/k norms (`gemma3` with a `text_config` is read through it).
        model_types: &["gemma3_text", "gemma3"],
        config: ConfigRules { rope_theta: 1e6, full_every: None, local_rope: true, ..ConfigRules::GEMMA2 },
        load: |c, w, o| Ok(Box::new(gemma2::Gemma::load(c, w, o, true)?)),
        linears: DECODER_LINEARS,
        hand_backward: false,
        gguf: None,
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
        gguf: None,
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
