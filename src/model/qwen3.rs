//! Qwen3 (dense) decoder: Llama's layer with `q_norm` and `k_norm` (Llama RMSNorm over
//! head_dim, per head) applied after the projections and before RoPE; explicit `head_dim`;
//! no q/k/v bias unless `attention_bias`.
//!
//! Reference: transformers `models/qwen3/modeling_qwen3.py` (`Qwen3Attention`), arch-spec §3.
//! Its hand-written backward is Llama's plus the two norms' backward (weights frozen).

use anyhow::Result;
use tch::Tensor;

use super::blocks::{attend, Loader, Mask, RmsNorm, Rope};
use super::decoder::{Attention, AttnSaved, Decoder};
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
        let q =
            rope.apply_bthd(self.q_norm.forward(&heads(self.q_proj.forward(x, train), self.num_heads))).transpose(1, 2);
        let k = rope
            .apply_bthd(self.k_norm.forward(&heads(self.k_proj.forward(x, train), self.num_kv_heads)))
            .transpose(1, 2);
        let v = heads(self.v_proj.forward(x, train), self.num_kv_heads).transpose(1, 2);
        (q, k, v)
    }

    fn forward_saving(&self, x: &Tensor, rope: &Rope, mask: &Mask) -> (Tensor, AttnSaved) {
        let (b, t) = (x.size()[0], x.size()[1]);
        let (q, zq) = self.q_proj.forward_saving(x);
        let (k, zk) = self.k_proj.forward_saving(x);
        let (v, zv) = self.v_proj.forward_saving(x);
        // The norms' inputs [B, T, n, d] and 1/rms are kept for their backward.
        let q = q.view([b, t, self.num_heads, self.head_dim]);
        let k = k.view([b, t, self.num_kv_heads, self.head_dim]);
        let (qn, rq) = self.q_norm.forward_with_rstd(&q);
        let (kn, rk) = self.k_norm.forward_with_rstd(&k);
        let ql = rope.apply_bthd(qn).transpose(1, 2).set_requires_grad(true);
        let kl = rope.apply_bthd(kn).transpose(1, 2).set_requires_grad(true);
        let vl = v.view([b, t, self.num_kv_heads, self.head_dim]).transpose(1, 2).set_requires_grad(true);
        let core = tch::with_grad(|| attend(&ql, &kl, &vl, mask, self.scale()));
        let (a, _) = self.o_proj.forward_saving(&core.detach());
        (a, AttnSaved { z: [zq, zk, zv], leaves: [ql, kl, vl], core, norm_inputs: Some([(q, rq), (k, rk)]) })
    }

    fn backward(&self, x: &Tensor, rope: &Rope, saved: AttnSaved, dy: &Tensor) -> Tensor {
        let (b, t) = (x.size()[0], x.size()[1]);
        let AttnSaved { z: [zq, zk, zv], leaves: [q, k, v], core, norm_inputs } = saved;
        let [(qi, rq), (ki, rk)] = norm_inputs.expect("Qwen3's forward_saving keeps the norms' inputs");
        let d_core = self.o_proj.backward(&core.detach(), None, dy);
        tch::with_grad(|| (core * d_core).sum(tch::Kind::Float).backward());
        // Leaf gradients [B, n, T, d] → [B, T, n, d], RoPE undone, through the norm, → [B, T, n·d].
        let dq = rope.backward_bthd(q.grad().transpose(1, 2).contiguous());
        let dq = self.q_norm.backward(&dq, &qi, &rq).reshape([b, t, self.num_heads * self.head_dim]);
        let dk = rope.backward_bthd(k.grad().transpose(1, 2).contiguous());
        let dk = self.k_norm.backward(&dk, &ki, &rk).reshape([b, t, self.num_kv_heads * self.head_dim]);
        let dv = v.grad().transpose(1, 2).reshape([b, t, self.num_kv_heads * self.head_dim]);
        drop((q, k, v, qi, ki));
        let dx = self.q_proj.backward(x, zq.as_ref(), &dq);
        let dx = self.k_proj.backward_into(x, zk.as_ref(), &dk, Some(dx));
        self.v_proj.backward_into(x, zv.as_ref(), &dv, Some(dx))
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
