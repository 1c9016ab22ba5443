//! Qwen2 / Qwen2.5 decoder: Llama's architecture with a bias on q_proj, k_proj and v_proj
//! (none on o_proj), RMSNorm eps 1e-6 and rope_theta 1e6 by default. The config sets
//! `qkv_bias`, so Llama's attention block reads the biases; bnb checkpoints store them
//! unquantized as `*.bias`. `use_sliding_window = true` is refused at config time.
//!
//! Reference: transformers `models/qwen2/modeling_qwen2.py`, arch-spec §3.

use anyhow::Result;

use super::blocks::Loader;
use super::decoder::Decoder;
use super::llama::LlamaAttention;
use super::{Config, LoadOptions, Weights};

/// Build a Qwen2 model (`model_type: qwen2`).
pub(crate) fn load(config: Config, weights: &Weights, opts: &LoadOptions) -> Result<Decoder<LlamaAttention>> {
    debug_assert!(config.qkv_bias && !config.o_bias);
    Decoder::load(config, &Loader::new(weights, opts), LlamaAttention::load)
}
