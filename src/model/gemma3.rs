//! Gemma 3 text decoder: Gemma 2's layer (see `gemma2`) with per-head q/k norms ((1 + w),
//! after the projections, before RoPE), sliding layers on the local RoPE base
//! (`rope_local_base_freq`, default type) and full layers on `rope_theta` with `rope_scaling`
//! (linear ×8 on 4B+), `layer_types` or `sliding_window_pattern`, and no softcaps unless the
//! config sets them. Reads `Gemma3ForCausalLM` (`model.*`) and the text tower of
//! `Gemma3ForConditionalGeneration` (`model.language_model.*` or `language_model.model.*`).
//!
//! Reference: transformers `models/gemma3/modeling_gemma3.py` (`Gemma3Attention`,
//! `Gemma3DecoderLayer`, `Gemma3TextModel`), arch-spec §2.

use anyhow::Result;

use super::gemma2::Gemma;
use super::{Config, LoadOptions, Weights};

/// Build a Gemma 3 text model (`model_type: gemma3_text`, or `gemma3` with a `text_config`).
pub(crate) fn load(config: Config, weights: &Weights, opts: &LoadOptions) -> Result<Gemma> {
    Gemma::load(config, weights, opts, true)
}
