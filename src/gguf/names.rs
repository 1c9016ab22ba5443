//! The one two-way table between Hugging Face tensor names and llama.cpp's GGUF tensor names,
//! used by the exporter (HF → GGUF) and the importer (GGUF → HF).
//!
//! Follows gguf-py's `constants.py` (`TENSOR_NAMES`, `MODEL_TENSORS`) and `tensor_mapping.py`
//! (`TensorNameMap`), including its per-architecture choice for `post_attention_layernorm`
//! (`ffn_norm` for Llama-style layers, `post_attention_norm` for Gemma's four-norm layers), and
//! `convert_hf_to_gguf.py`'s Gemma 3n handling: `altup.correct_output_scale` gains a `.weight`,
//! and the per-stream `altup_projections.{i}` / `altup_unembed_projections.{i}` are stacked into
//! one 3-D tensor each. A multimodal checkpoint's text decoder (`model.language_model.…`) is
//! named as the text-only one.

use super::arch::GgufArch;

/// Top-level tensors: (HF module, GGUF name), without the `.weight` / `.bias` suffix.
const GLOBAL: &[(&str, &str)] =
    &[("model.embed_tokens", "token_embd"), ("model.norm", "output_norm"), ("lm_head", "output")];

/// Gemma 3n's top-level tensors.
const GLOBAL_GEMMA3N: &[(&str, &str)] = &[
    ("model.embed_tokens_per_layer", "per_layer_token_embd"),
    ("model.per_layer_model_projection", "per_layer_model_proj"),
    ("model.per_layer_projection_norm", "per_layer_proj_norm"),
];

/// Gemma 3n's stacked tensors: HF `PREFIX.{i}.weight` for each stream i ↔ one GGUF tensor.
const STACKED_GEMMA3N: &[(&str, &str)] =
    &[("model.altup_projections", "altup_proj"), ("model.altup_unembed_projections", "altup_unembd_proj")];

/// Per-layer tensors every architecture shares: (module under `model.layers.N.`, part under `blk.N.`).
const LAYER: &[(&str, &str)] = &[
    ("input_layernorm", "attn_norm"),
    ("self_attn.q_proj", "attn_q"),
    ("self_attn.k_proj", "attn_k"),
    ("self_attn.v_proj", "attn_v"),
    ("self_attn.o_proj", "attn_output"),
    ("self_attn.q_norm", "attn_q_norm"),
    ("self_attn.k_norm", "attn_k_norm"),
    ("mlp.gate_proj", "ffn_gate"),
    ("mlp.down_proj", "ffn_down"),
];

/// The unfused up projection (every architecture but Phi-3).
const LAYER_UP: &[(&str, &str)] = &[("mlp.up_proj", "ffn_up")];

/// Phi-3's fused projections (llama.cpp splits them in its graph).
const LAYER_FUSED: &[(&str, &str)] = &[("self_attn.qkv_proj", "attn_qkv"), ("mlp.gate_up_proj", "ffn_up")];

/// Llama-style layers: the norm after attention is the FFN's input norm.
const LAYER_PRE_NORM: &[(&str, &str)] = &[("post_attention_layernorm", "ffn_norm")];

/// Gemma's four-norm layers.
const LAYER_SANDWICH: &[(&str, &str)] = &[
    ("post_attention_layernorm", "post_attention_norm"),
    ("pre_feedforward_layernorm", "ffn_norm"),
    ("post_feedforward_layernorm", "post_ffw_norm"),
];

/// Gemma 3n's per-layer extras: per-layer input, AltUp, LAuReL.
const LAYER_GEMMA3N: &[(&str, &str)] = &[
    ("per_layer_input_gate", "inp_gate"),
    ("per_layer_projection", "proj"),
    ("post_per_layer_input_norm", "post_norm"),
    ("altup.correction_coefs", "altup_correct_coef"),
    ("altup.correct_output_scale", "altup_correct_scale"),
    ("altup.prediction_coefs", "altup_predict_coef"),
    ("altup.modality_router", "altup_router"),
    ("altup.router_norm", "altup_router_norm"),
    ("laurel.linear_left", "laurel_l"),
    ("laurel.linear_right", "laurel_r"),
    ("laurel.post_laurel_norm", "laurel_post_norm"),
];

/// HF parameters stored without a `.weight` suffix (the GGUF name has one).
const BARE: &[&str] = &["altup.correct_output_scale"];

/// Prefixes under which a multimodal checkpoint keeps its text decoder, as `model.`.
const TEXT_PREFIXES: &[&str] = &["model.language_model.", "language_model.model."];

/// Prefixes of the vision and audio towers of a multimodal checkpoint (not exported).
const NON_TEXT_PREFIXES: &[&str] = &[
    "model.vision_tower.",
    "model.audio_tower.",
    "model.embed_vision.",
    "model.embed_audio.",
    "model.multi_modal_projector.",
    "multi_modal_projector.",
    "vision_tower.",
    "audio_tower.",
    "embed_vision.",
    "embed_audio.",
];

/// Where an HF tensor goes in a GGUF file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GgufTarget {
    /// The GGUF tensor name (`blk.3.attn_q.weight`).
    pub name: String,
    /// For a stacked tensor, the HF tensor's index along the new first dimension.
    pub stack_index: Option<usize>,
}

/// Where a GGUF tensor comes from in an HF checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HfSource {
    /// One HF tensor of this name.
    One(String),
    /// `PREFIX.{i}.weight` for each index i of the GGUF tensor's first dimension.
    Stacked(&'static str),
}

/// The HF ↔ GGUF name table of one architecture.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Names {
    arch: GgufArch,
}

impl Names {
    /// The table of `arch`.
    pub fn of(arch: GgufArch) -> Names {
        Names { arch }
    }

    fn global(&self) -> impl Iterator<Item = &'static (&'static str, &'static str)> {
        let extra = if self.arch == GgufArch::Gemma3n { GLOBAL_GEMMA3N } else { &[] };
        GLOBAL.iter().chain(extra)
    }

    fn stacked(&self) -> &'static [(&'static str, &'static str)] {
        if self.arch == GgufArch::Gemma3n {
            STACKED_GEMMA3N
        } else {
            &[]
        }
    }

    fn layer(&self) -> impl Iterator<Item = &'static (&'static str, &'static str)> {
        let up = if self.arch == GgufArch::Phi3 { LAYER_FUSED } else { LAYER_UP };
        let norms = if self.arch.sandwich_norms() { LAYER_SANDWICH } else { LAYER_PRE_NORM };
        let extra = if self.arch == GgufArch::Gemma3n { LAYER_GEMMA3N } else { &[] };
        LAYER.iter().chain(up).chain(norms).chain(extra)
    }

    /// The GGUF name of an HF tensor name, or `None` when llama.cpp has none for it.
    pub fn to_gguf(&self, hf: &str) -> Option<GgufTarget> {
        let hf = text_name(hf);
        let one = |name: String| Some(GgufTarget { name, stack_index: None });
        for (prefix, gguf) in self.stacked() {
            let Some(rest) = hf.strip_prefix(prefix).and_then(|r| r.strip_prefix('.')) else { continue };
            let index = rest.strip_suffix(".weight")?.parse::<usize>().ok()?;
            return Some(GgufTarget { name: format!("{gguf}.weight"), stack_index: Some(index) });
        }
        if let Some(rest) = hf.strip_prefix("model.layers.") {
            let (layer, param) = rest.split_once('.')?;
            layer.parse::<u64>().ok()?;
            let (module, suffix) = split_suffix(param)?;
            let part = self.layer().find(|(h, _)| *h == module)?.1;
            return one(format!("blk.{layer}.{part}.{suffix}"));
        }
        let (module, suffix) = split_suffix(&hf)?;
        let gguf = self.global().find(|(h, _)| *h == module)?.1;
        one(format!("{gguf}.{suffix}"))
    }

    /// The HF name(s) of a GGUF tensor name, or `None` when it has no HF counterpart.
    pub fn to_hf(&self, gguf: &str) -> Option<HfSource> {
        let (part, suffix) = gguf.rsplit_once('.')?;
        if suffix != "weight" && suffix != "bias" {
            return None;
        }
        if suffix == "weight" {
            if let Some((prefix, _)) = self.stacked().iter().find(|(_, g)| *g == part) {
                return Some(HfSource::Stacked(prefix));
            }
        }
        let hf_param = |module: &str| {
            if BARE.contains(&module) {
                (suffix == "weight").then(|| module.to_string())
            } else {
                Some(format!("{module}.{suffix}"))
            }
        };
        if let Some(rest) = part.strip_prefix("blk.") {
            let (layer, part) = rest.split_once('.')?;
            if layer.is_empty() || !layer.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            let module = self.layer().find(|(_, g)| *g == part)?.0;
            return Some(HfSource::One(format!("model.layers.{layer}.{}", hf_param(module)?)));
        }
        let module = self.global().find(|(_, g)| *g == part)?.0;
        Some(HfSource::One(hf_param(module)?))
    }
}

/// `module.weight` → (`module`, `weight`); a bare parameter (no suffix) → (`name`, `weight`);
/// `None` for anything else.
fn split_suffix(param: &str) -> Option<(&str, &str)> {
    if BARE.contains(&param) {
        return Some((param, "weight"));
    }
    param.rsplit_once('.').filter(|(_, suffix)| *suffix == "weight" || *suffix == "bias")
}

/// An HF tensor name with a multimodal checkpoint's text-decoder prefix replaced by `model.`.
pub fn text_name(hf: &str) -> String {
    for p in TEXT_PREFIXES {
        if let Some(rest) = hf.strip_prefix(p) {
            return format!("model.{rest}");
        }
    }
    hf.to_string()
}

/// Whether an HF tensor belongs to a multimodal checkpoint's vision or audio side (GGUF export
/// writes the text model only).
pub fn is_non_text(hf: &str) -> bool {
    NON_TEXT_PREFIXES.iter().any(|p| hf.starts_with(p))
}
