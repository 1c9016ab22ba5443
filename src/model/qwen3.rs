//! Qwen3 (dense) decoder: Llama's layer with `q_norm` and `k_norm` (Llama RMSNorm over
//! head_dim, per head) applied after the projections and before RoPE; explicit `head_dim`;
//! no q/k/v bias unless `attention_bias`.
//!
//! Reference: transformers `models/qwen3/modeling_qwen3.py` (`Qwen3Attention`), arch-spec §3.

use anyhow::Result;
use tch::Tensor;

use super::blocks::{attend, Loader, Mask, RmsNorm, Rope};
use super::decoder::{Attention, Decoder};
use super::linear::Linear;
use super::{Config, LoadOptions, Weights};

/// `self_attn` with per-head q/k RMSNorm.
pub(crate) struct Qwen3Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    q_norm: RmsNorm,
    k_norm: RmsNorm,
    num_heads: i64,
    num_kv_heads: i64,
    head_dim: i64,
}

impl Qwen3Attention {
    /// Read `<prefix>.{q,k,v,o}_proj` and `<prefix>.{q,k}_norm`.
    pub fn load(l: &Loader, prefix: &str, cfg: &Config) -> Result<Qwen3Attention> {
        Ok(Qwen3Attention {
            q_proj: l.linear(&format!("{prefix}.q_proj"), cfg.qkv_bias)?,
            k_proj: l.linear(&format!("{prefix}.k_proj"), cfg.qkv_bias)?,
            v_proj: l.linear(&format!("{prefix}.v_proj"), cfg.qkv_bias)?,
            o_proj: l.linear(&format!("{prefix}.o_proj"), cfg.o_bias)?,
            q_norm: RmsNorm::load(l, &format!("{prefix}.q_norm"), cfg.rms_norm_eps)?,
            k_norm: RmsNorm::load(l, &format!("{prefix}.k_norm"), cfg.rms_norm_eps)?,
            num_heads: cfg.num_attention_heads,
            num_kv_heads: cfg.num_key_value_heads,
            head_dim: cfg.head_dim,
        })
    }
}

impl Attention for Qwen3Attention {
    fn forward(&self, x: &Tensor, rope: &Rope, mask: &Mask, train: bool) -> Tensor {
        let (q, k, v) = self.qkv(x, rope, train);
        self.out(&attend(&q, &k, &v, mask, self.scale()), train)
    }

    fn qkv(&self, x: &Tensor, rope: &Rope, train: bool) -> (Tensor, Tensor, Tensor) {
        let (b, t) = (x.size()[0], x.size()[1]);
        let heads = |y: Tensor, n: i64| y.view([b, t, n, self.head_dim]); // (B, T, n, d)
        let q = self.q_norm.forward(&heads(self.q_proj.forward(x, train), self.num_heads)).transpose(1, 2);
        let k = self.k_norm.forward(&heads(self.k_proj.forward(x, train), self.num_kv_heads)).transpose(1, 2);
        let v = heads(self.v_proj.forward(x, train), self.num_kv_heads).transpose(1, 2);
        (rope.apply(&q), rope.apply(&k), v)
    }

    fn out(&self, o: &Tensor, train: bool) -> Tensor {
        self.o_proj.forward(o, train)
    }

    fn scale(&self) -> f64 {
        (self.head_dim as f64).powf(-0.5)
    }

    fn linears(&self) -> Vec<(&'static str, &Linear)> {
        vec![("q_proj", &self.q_proj), ("k_proj", &self.k_proj), ("v_proj", &self.v_proj), ("o_proj", &self.o_proj)]
    }

    fn linears_mut(&mut self) -> Vec<(&'static str, &mut Linear)> {
        vec![
            ("q_proj", &mut self.q_proj),
            ("k_proj", &mut self.k_proj),
            ("v_proj", &mut self.v_proj),
            ("o_proj", &mut self.o_proj),
        ]
    }
}

/// Build a Qwen3 model (`model_type: qwen3`).
pub(crate) fn load(config: Config, weights: &Weights, opts: &LoadOptions) -> Result<Decoder<Qwen3Attention>> {
    Decoder::load(config, &Loader::new(weights, opts), Qwen3Attention::load)
}
