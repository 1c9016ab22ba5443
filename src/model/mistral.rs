//! Mistral decoder: Llama's architecture; when `sliding_window` is non-null (v0.1: 4096)
//! every layer attends only to keys with `kv > q − W` (the mask in `blocks`), and there is
//! no attention bias. Everything else, including the attention block, is Llama's.
//!
//! Reference: transformers `models/mistral/modeling_mistral.py`, arch-spec §3.

use anyhow::Result;

use super::blocks::Loader;
use super::decoder::Decoder;
use super::llama::LlamaAttention;
use super::{Config, LoadOptions, Weights};

/// Build a Mistral model (`model_type: mistral`); the window comes from `config.sliding_window`.
pub(crate) fn load(config: Config, weights: &Weights, opts: &LoadOptions) -> Result<Decoder<LlamaAttention>> {
    Decoder::load(config, &Loader::new(weights, opts), LlamaAttention::load)
}
