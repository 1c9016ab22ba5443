//! Llama (1/2/3.x) decoder: GQA self-attention with RoPE (default, linear or llama3
//! scaling), SiLU MLP, Llama RMSNorm. Its attention block also serves Mistral (sliding
//! window, from the config) and Qwen2 (q/k/v bias, from the config).
//!
//! Reference: transformers `models/llama/modeling_llama.py` (`LlamaAttention`,
//! eager path) and arch-spec §0, §3.

use anyhow::Result;
use tch::Tensor;

use super::blocks::{attend, Loader, Mask, Rope};
use super::decoder::{Attention, AttnSaved, Decoder};
use super::linear::Linear;
use super::{Config, LoadOptions, Weights};

/// `self_attn`: q/k/v/o projections, biases as the config says.
pub(crate) struct LlamaAttention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    num_heads: i64,
    num_kv_heads: i64,
    head_dim: i64,
}

impl LlamaAttention {
    /// Read `<prefix>.{q,k,v,o}_proj`.
    pub fn load(l: &Loader, prefix: &str, cfg: &Config) -> Result<LlamaAttention> {
        Ok(LlamaAttention {
            q_proj: l.linear(&format!("{prefix}.q_proj"), cfg.qkv_bias)?,
            k_proj: l.linear(&format!("{prefix}.k_proj"), cfg.qkv_bias)?,
            v_proj: l.linear(&format!("{prefix}.v_proj"), cfg.qkv_bias)?,
            o_proj: l.linear(&format!("{prefix}.o_proj"), cfg.o_bias)?,
            num_heads: cfg.num_attention_heads,
            num_kv_heads: cfg.num_key_value_heads,
            head_dim: cfg.head_dim,
        })
    }
}

impl Attention for LlamaAttention {
    fn forward(&self, x: &Tensor, rope: &Rope, mask: &Mask, train: bool) -> Tensor {
        let (q, k, v) = self.qkv(x, rope, train);
        self.out(&attend(&q, &k, &v, mask, self.scale()), train)
    }

    fn qkv(&self, x: &Tensor, rope: &Rope, train: bool) -> (Tensor, Tensor, Tensor) {
        let (b, t) = (x.size()[0], x.size()[1]);
        let heads = |y: Tensor, n: i64| y.view([b, t, n, self.head_dim]).transpose(1, 2); // (B, n, T, d)
        let q =
            rope.apply_bthd(self.q_proj.forward(x, train).view([b, t, self.num_heads, self.head_dim])).transpose(1, 2);
        let k = rope
            .apply_bthd(self.k_proj.forward(x, train).view([b, t, self.num_kv_heads, self.head_dim]))
            .transpose(1, 2);
        let v = heads(self.v_proj.forward(x, train), self.num_kv_heads);
        (q, k, v)
    }

    fn out(&self, o: &Tensor, train: bool) -> Tensor {
        self.o_proj.forward(o, train)
    }

    fn forward_saving(&self, x: &Tensor, rope: &Rope, mask: &Mask) -> (Tensor, AttnSaved) {
        let (b, t) = (x.size()[0], x.size()[1]);
        let (q, zq) = self.q_proj.forward_saving(x);
        let (k, zk) = self.k_proj.forward_saving(x);
        let (v, zv) = self.v_proj.forward_saving(x);
        // RoPE in the projections' [B, T, n, d] layout (in place with the kernel), then leaves.
        let q = rope.apply_bthd(q.view([b, t, self.num_heads, self.head_dim])).transpose(1, 2).set_requires_grad(true);
        let k =
            rope.apply_bthd(k.view([b, t, self.num_kv_heads, self.head_dim])).transpose(1, 2).set_requires_grad(true);
        let v = v.view([b, t, self.num_kv_heads, self.head_dim]).transpose(1, 2).set_requires_grad(true);
        let core = tch::with_grad(|| attend(&q, &k, &v, mask, self.scale()));
        let (a, _) = self.o_proj.forward_saving(&core.detach());
        (a, AttnSaved { z: [zq, zk, zv], leaves: [q, k, v], core, norm_inputs: None })
    }

    fn backward(&self, x: &Tensor, rope: &Rope, saved: AttnSaved, dy: &Tensor) -> Tensor {
        let (b, t) = (x.size()[0], x.size()[1]);
        let AttnSaved { z: [zq, zk, zv], leaves: [q, k, v], core, .. } = saved;
        let d_core = self.o_proj.backward(&core.detach(), None, dy);
        tch::with_grad(|| (core * d_core).sum(tch::Kind::Float).backward());
        // Leaf gradients [B, n, T, d] → [B, T, n, d], RoPE undone, → [B, T, n·d].
        let back = |g: Tensor, n: i64, rotate: bool| {
            let g = g.transpose(1, 2).contiguous();
            let g = if rotate { rope.backward_bthd(g) } else { g };
            g.reshape([b, t, n * self.head_dim])
        };
        let dq = back(q.grad(), self.num_heads, true);
        let dk = back(k.grad(), self.num_kv_heads, true);
        let dv = back(v.grad(), self.num_kv_heads, false);
        drop((q, k, v));
        let dx = self.q_proj.backward(x, zq.as_ref(), &dq);
        let dx = self.k_proj.backward_into(x, zk.as_ref(), &dk, Some(dx));
        self.v_proj.backward_into(x, zv.as_ref(), &dv, Some(dx))
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

/// Build a Llama model (`model_type: llama`).
pub(crate) fn load(config: Config, weights: &Weights, opts: &LoadOptions) -> Result<Decoder<LlamaAttention>> {
    Decoder::load(config, &Loader::new(weights, opts), LlamaAttention::load)
}
