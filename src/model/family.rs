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

/// The llama.cpp architecture a family is written as (and imported from); what each one means is
/// in `gguf/arch.rs`.
pub use crate::gguf::GgufArch;

/// One model family.
pub struct Family {
    /// The `model_type`s of config.json it reads; the first is its name. A multimodal Gemma
    /// checkpoint's top-level type (`gemma3`, `gemma3n`) is listed after its text decoder's.
    pub model_types: &'static [&'static str],
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
        load: |c, w, o| Ok(Box::new(llama::load(c, w, o)?)),
        linears: DECODER_LINEARS,
        hand_backward: true,
        gguf: Some(GgufArch::Llama),
    },
    Family {
        // Llama's decoder; the window comes from `config.sliding_window`.
        model_types: &["mistral"],
        load: |c, w, o| Ok(Box::new(llama::load(c, w, o)?)),
        linears: DECODER_LINEARS,
        hand_backward: true,
        gguf: Some(GgufArch::Llama),
    },
    Family {
        // Llama's decoder with q/k/v bias (from the config).
        model_types: &["qwen2"],
        load: |c, w, o| Ok(Box::new(llama::load(c, w, o)?)),
        linears: DECODER_LINEARS,
        hand_backward: true,
        gguf: Some(GgufArch::Qwen2),
    },
    Family {
        // Llama's decoder with per-head q/k RMSNorm before RoPE and an explicit head_dim.
        model_types: &["qwen3"],
        load: |c, w, o| Ok(Box::new(Decoder::load(c, &Loader::new(w, o), LlamaAttention::load_qk_norm)?)),
        linears: DECODER_LINEARS,
        hand_backward: true,
        gguf: Some(GgufArch::Qwen3),
    },
    Family {
        // Llama's decoder with fused `qkv_proj` and `gate_up_proj` (read from the checkpoint's
        // keys) and a sliding window from the config.
        model_types: &["phi3"],
        load: |c, w, o| Ok(Box::new(llama::load(c, w, o)?)),
        linears: &["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
        hand_backward: true,
        gguf: Some(GgufArch::Phi3),
    },
    Family {
        model_types: &["gemma2"],
        load: |c, w, o| Ok(Box::new(gemma2::load(c, w, o)?)),
        linears: DECODER_LINEARS,
        hand_backward: false,
        gguf: Some(GgufArch::Gemma2),
    },
    Family {
        // Gemma 2's decoder with q/k norms (`gemma3` with a `text_config` is read through it).
        model_types: &["gemma3_text", "gemma3"],
        load: |c, w, o| Ok(Box::new(gemma2::Gemma::load(c, w, o, true)?)),
        linears: DECODER_LINEARS,
        hand_backward: false,
        gguf: Some(GgufArch::Gemma3),
    },
    Family {
        model_types: &["gemma3n_text", "gemma3n"],
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
