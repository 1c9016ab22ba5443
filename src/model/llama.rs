//! Llama (1/2/3.x) decoder: GQA self-attention with RoPE (default, linear or llama3
//! scaling), SiLU MLP, Llama RMSNorm. Its attention block also serves Mistral (sliding
//! window, from the config), Qwen2 (q/k/v bias, from the config) and Qwen3 (per-head q/k
//! RMSNorm before RoPE, explicit head_dim); `model/family.rs` registers all four.
//!
//! Reference: transformers `models/llama/modeling_llama.py` (`LlamaAttention`, eager path),
//! `models/qwen3/modeling_qwen3.py` (`Qwen3Attention`), docs/model-math.md §0, §3. The hand-written
//! backward undoes o_proj, the attention core (autograd on the leaves), RoPE, the q/k norms
//! (weights frozen) and the projections.

use anyhow::Result;
use tch::Tensor;

use super::blocks::{attend, Loader, Mask, RmsNorm, Rope};
use super::decoder::{Attention, AttnSaved, Decoder};
use super::linear::Linear;
use super::{Config, LoadOptions, Weights};

/// `self_attn`: q/k/v/o projections, biases as the config says; Qwen3 adds `q_norm` and
/// `k_norm` (RMSNorm over head_dim, per head) after the projections and before RoPE.
pub(crate) struct LlamaAttention {
    qkv: Qkv,
    o_proj: Linear,
    q_norm: Option<RmsNorm>,
    k_norm: Option<RmsNorm>,
    num_heads: i64,
    num_kv_heads: i64,
    head_dim: i64,
}

impl LlamaAttention {
    /// Read `<prefix>.{q,k,v,o}_proj`.
    pub fn load(l: &Loader, prefix: &str, cfg: &Config) -> Result<LlamaAttention> {
        LlamaAttention::load_with(l, prefix, cfg, false)
    }

    /// Read `<prefix>.{q,k,v,o}_proj` and `<prefix>.{q,k}_norm` (Qwen3).
    pub fn load_qk_norm(l: &Loader, prefix: &str, cfg: &Config) -> Result<LlamaAttention> {
        LlamaAttention::load_with(l, prefix, cfg, true)
    }

    fn load_with(l: &Loader, prefix: &str, cfg: &Config, qk_norm: bool) -> Result<LlamaAttention> {
        let norm = |n: &str| -> Result<Option<RmsNorm>> {
            Ok(if qk_norm { Some(RmsNorm::load(l, &format!("{prefix}.{n}"), cfg.rms_norm_eps)?) } else { None })
        };
        let qkv = if l.has(&format!("{prefix}.qkv_proj")) {
            Qkv::Fused { qkv_proj: l.linear(&format!("{prefix}.qkv_proj"), cfg.qkv_bias)? }
        } else {
            Qkv::Split {
                q_proj: l.linear(&format!("{prefix}.q_proj"), cfg.qkv_bias)?,
                k_proj: l.linear(&format!("{prefix}.k_proj"), cfg.qkv_bias)?,
                v_proj: l.linear(&format!("{prefix}.v_proj"), cfg.qkv_bias)?,
            }
        };
        Ok(LlamaAttention {
            qkv,
            o_proj: l.linear(&format!("{prefix}.o_proj"), cfg.o_bias)?,
            q_norm: norm("q_norm")?,
            k_norm: norm("k_norm")?,
            num_heads: cfg.num_attention_heads,
            num_kv_heads: cfg.num_key_value_heads,
            head_dim: cfg.head_dim,
        })
    }
}

/// The q, k, v projections: three linears, or Phi-3's one `qkv_proj` whose rows are q's
/// (heads · head_dim), then k's and v's (kv_heads · head_dim each).
#[allow(clippy::large_enum_variant)] // one per layer; boxing the split case buys nothing
enum Qkv {
    Split { q_proj: Linear, k_proj: Linear, v_proj: Linear },
    Fused { qkv_proj: Linear },
}

impl LlamaAttention {
    /// The fused output's q, k and v column widths.
    fn widths(&self) -> [i64; 3] {
        let kv = self.num_kv_heads * self.head_dim;
        [self.num_heads * self.head_dim, kv, kv]
    }

    /// q, k, v `[B, T, n·d]`.
    fn project(&self, x: &Tensor, train: bool) -> (Tensor, Tensor, Tensor) {
        match &self.qkv {
            Qkv::Split { q_proj, k_proj, v_proj } => {
                (q_proj.forward(x, train), k_proj.forward(x, train), v_proj.forward(x, train))
            }
            Qkv::Fused { qkv_proj } => self.split(qkv_proj.forward(x, train)),
        }
    }

    /// [`LlamaAttention::project`] keeping each adapter's rank-r activation for the backward.
    fn project_saving(&self, x: &Tensor) -> ((Tensor, Tensor, Tensor), [Option<Tensor>; 3]) {
        match &self.qkv {
            Qkv::Split { q_proj, k_proj, v_proj } => {
                let (q, zq) = q_proj.forward_saving(x);
                let (k, zk) = k_proj.forward_saving(x);
                let (v, zv) = v_proj.forward_saving(x);
                ((q, k, v), [zq, zk, zv])
            }
            Qkv::Fused { qkv_proj } => {
                let (y, z) = qkv_proj.forward_saving(x);
                (self.split(y), [z, None, None])
            }
        }
    }

    /// The projections' backward from dq, dk, dv `[B, T, n·d]`: accumulates the adapters'
    /// gradients and returns dx.
    fn project_backward(&self, x: &Tensor, z: [Option<Tensor>; 3], dq: &Tensor, dk: &Tensor, dv: &Tensor) -> Tensor {
        let [zq, zk, zv] = z;
        match &self.qkv {
            Qkv::Split { q_proj, k_proj, v_proj } => {
                let dx = q_proj.backward(x, zq.as_ref(), dq);
                let dx = k_proj.backward_into(x, zk.as_ref(), dk, Some(dx));
                v_proj.backward_into(x, zv.as_ref(), dv, Some(dx))
            }
            Qkv::Fused { qkv_proj } => qkv_proj.backward(x, zq.as_ref(), &Tensor::cat(&[dq, dk, dv], -1)),
        }
    }

    /// A fused output `[B, T, (nh + 2·nkv)·d]` as contiguous q, k, v.
    fn split(&self, y: Tensor) -> (Tensor, Tensor, Tensor) {
        let [wq, wk, wv] = self.widths();
        (y.narrow(-1, 0, wq).contiguous(), y.narrow(-1, wq, wk).contiguous(), y.narrow(-1, wq + wk, wv).contiguous())
    }
}

/// `y` through `norm` when there is one.
fn maybe_norm(y: Tensor, norm: &Option<RmsNorm>) -> Tensor {
    match norm {
        Some(n) => n.forward(&y),
        None => y,
    }
}

impl Attention for LlamaAttention {
    fn forward(&self, x: &Tensor, rope: &Rope, mask: &Mask, train: bool) -> Tensor {
        let (q, k, v) = self.qkv(x, rope, train);
        self.out(&attend(&q, &k, &v, mask, self.scale()), train)
    }

    fn qkv(&self, x: &Tensor, rope: &Rope, train: bool) -> (Tensor, Tensor, Tensor) {
        let (b, t) = (x.size()[0], x.size()[1]);
        let heads = |y: Tensor, n: i64| y.view([b, t, n, self.head_dim]); // (B, T, n, d)
        let (q, k, v) = self.project(x, train);
        let q = rope.apply_bthd(maybe_norm(heads(q, self.num_heads), &self.q_norm));
        let k = rope.apply_bthd(maybe_norm(heads(k, self.num_kv_heads), &self.k_norm));
        let v = heads(v, self.num_kv_heads);
        (q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    }

    fn out(&self, o: &Tensor, train: bool) -> Tensor {
        self.o_proj.forward(o, train)
    }

    fn forward_saving(&self, x: &Tensor, rope: &Rope, mask: &Mask) -> (Tensor, AttnSaved) {
        let (b, t) = (x.size()[0], x.size()[1]);
        let ((q, k, v), z) = self.project_saving(x);
        let q = q.view([b, t, self.num_heads, self.head_dim]);
        let k = k.view([b, t, self.num_kv_heads, self.head_dim]);
        // With q/k norms their inputs [B, T, n, d] and 1/rms are kept for their backward.
        let (q, k, norm_inputs) = match (&self.q_norm, &self.k_norm) {
            (Some(qn), Some(kn)) => {
                let (q_out, rq) = qn.forward_with_rstd(&q);
                let (k_out, rk) = kn.forward_with_rstd(&k);
                (q_out, k_out, Some([(q, rq), (k, rk)]))
            }
            _ => (q, k, None),
        };
        // RoPE in the projections' [B, T, n, d] layout (in place with the kernel), then leaves.
        let q = rope.apply_bthd(q).transpose(1, 2).set_requires_grad(true);
        let k = rope.apply_bthd(k).transpose(1, 2).set_requires_grad(true);
        let v = v.view([b, t, self.num_kv_heads, self.head_dim]).transpose(1, 2).set_requires_grad(true);
        let core = tch::with_grad(|| attend(&q, &k, &v, mask, self.scale()));
        let (a, _) = self.o_proj.forward_saving(&core.detach());
        (a, AttnSaved { z, leaves: [q, k, v], core, norm_inputs })
    }

    fn backward(&self, x: &Tensor, rope: &Rope, saved: AttnSaved, dy: &Tensor) -> Tensor {
        let (b, t) = (x.size()[0], x.size()[1]);
        let AttnSaved { z, leaves: [q, k, v], core, norm_inputs } = saved;
        let d_core = self.o_proj.backward(&core.detach(), None, dy);
        tch::with_grad(|| (core * d_core).sum(tch::Kind::Float).backward());
        // Leaf gradients [B, n, T, d] → [B, T, n, d], RoPE undone, through the norms, → [B, T, n·d].
        let dq = rope.backward_bthd(q.grad().transpose(1, 2).contiguous());
        let dk = rope.backward_bthd(k.grad().transpose(1, 2).contiguous());
        let (dq, dk) = match (norm_inputs, &self.q_norm, &self.k_norm) {
            (Some([(qi, rq), (ki, rk)]), Some(qn), Some(kn)) => {
                (qn.backward(&dq, &qi, &rq), kn.backward(&dk, &ki, &rk))
            }
            _ => (dq, dk),
        };
        let dq = dq.reshape([b, t, self.num_heads * self.head_dim]);
        let dk = dk.reshape([b, t, self.num_kv_heads * self.head_dim]);
        let dv = v.grad().transpose(1, 2).contiguous().reshape([b, t, self.num_kv_heads * self.head_dim]);
        drop((q, k, v));
        self.project_backward(x, z, &dq, &dk, &dv)
    }

    fn scale(&self) -> f64 {
        (self.head_dim as f64).powf(-0.5)
    }

    fn linears(&self) -> Vec<(&'static str, &Linear)> {
        match &self.qkv {
            Qkv::Split { q_proj, k_proj, v_proj } => {
                vec![("q_proj", q_proj), ("k_proj", k_proj), ("v_proj", v_proj), ("o_proj", &self.o_proj)]
            }
            Qkv::Fused { qkv_proj } => vec![("qkv_proj", qkv_proj), ("o_proj", &self.o_proj)],
        }
    }

    fn linears_mut(&mut self) -> Vec<(&'static str, &mut Linear)> {
        match &mut self.qkv {
            Qkv::Split { q_proj, k_proj, v_proj } => {
                vec![("q_proj", q_proj), ("k_proj", k_proj), ("v_proj", v_proj), ("o_proj", &mut self.o_proj)]
            }
            Qkv::Fused { qkv_proj } => vec![("qkv_proj", qkv_proj), ("o_proj", &mut self.o_proj)],
        }
    }
}

/// Build a Llama model (`model_type: llama`).
pub(crate) fn load(config: Config, weights: &Weights, opts: &LoadOptions) -> Result<Decoder<LlamaAttention>> {
    Decoder::load(config, &Loader::new(weights, opts), LlamaAttention::load)
}
