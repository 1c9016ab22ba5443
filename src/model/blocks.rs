//! Blocks that are identical in Llama, Mistral, Qwen2 and Qwen3: the Llama RMSNorm, the
//! SiLU-gated MLP, RoPE (default, linear, llama3), the attention mask and the attention
//! core, plus the loader that turns checkpoint tensors into them.
//!
//! Reference: transformers `modeling_llama.py` (`LlamaRMSNorm`, `LlamaMLP`,
//! `LlamaRotaryEmbedding`, `apply_rotary_pos_emb`, `repeat_kv`), `modeling_rope_utils.py`
//! (`_compute_default_rope_parameters`, `_compute_linear_scaling_rope_parameters`,
//! `_compute_llama3_parameters`) and `masking_utils.py` (docs/model-math.md §0, §3).

use std::collections::HashSet;
use std::f64::consts::PI;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use tch::{Device, Kind, Tensor};

use super::config::{Config, RopeScaling};
use super::linear::{Linear, Weight};
use super::{Batch, LoadOptions, Weights};
use crate::kernels::{glu, rms_norm, rope, Kernels};
use crate::quant::QuantTensor;

/// Reads checkpoint tensors into the compute dtype and device of [`LoadOptions`].
pub(crate) struct Loader<'a> {
    /// The checkpoint.
    pub weights: &'a Weights,
    /// Target dtype, device and load-time quantization.
    pub opts: &'a LoadOptions,
    /// Module paths stored bnb-4bit (those with `<path>.weight.quant_state.*`), as checkpoint keys.
    bnb: HashSet<String>,
    /// `(module prefix, checkpoint prefix)`: names starting with the first are read from keys
    /// starting with the second (e.g. `model.language_model.` from `language_model.model.`).
    alias: Option<(String, String)>,
    /// The CUDA kernels the loaded blocks use (`None`: reference paths).
    pub kernels: Option<Arc<Kernels>>,
}

impl<'a> Loader<'a> {
    /// A loader over `weights`; finds the bnb-quantized modules by their quant_state keys.
    pub fn new(weights: &'a Weights, opts: &'a LoadOptions) -> Loader<'a> {
        let bnb = weights
            .names()
            .iter()
            .filter_map(|n| n.split_once(".weight.quant_state.").map(|(p, _)| p.to_string()))
            .collect();
        Loader { weights, opts, bnb, alias: None, kernels: Kernels::for_device(opts.device, opts.cuda_kernels) }
    }

    /// Read module paths under `module` from checkpoint keys under `checkpoint` instead.
    pub fn with_alias(mut self, module: &str, checkpoint: &str) -> Loader<'a> {
        if module != checkpoint {
            self.alias = Some((module.to_string(), checkpoint.to_string()));
        }
        self
    }

    /// The checkpoint key of module path `name`.
    pub fn key(&self, name: &str) -> String {
        match &self.alias {
            Some((m, c)) if name.starts_with(m.as_str()) => format!("{c}{}", &name[m.len()..]),
            _ => name.to_string(),
        }
    }

    /// Whether the checkpoint holds module `<prefix>` (its `.weight`, dense or bnb-4bit).
    pub fn has(&self, prefix: &str) -> bool {
        self.weights.contains(&self.key(&format!("{prefix}.weight")))
    }

    /// Whether `<prefix>.weight` is stored bnb-4bit.
    pub fn is_bnb(&self, prefix: &str) -> bool {
        self.bnb.contains(&self.key(prefix))
    }

    /// A frozen dense tensor in the compute dtype on the target device.
    pub fn dense(&self, name: &str) -> Result<Tensor> {
        let t = self.weights.get(&self.key(name))?;
        Ok(t.to_device(self.opts.device).to_kind(self.opts.dtype).set_requires_grad(false))
    }

    /// A 4-bit weight from its bnb tensors, on the target device.
    fn bnb_weight(&self, prefix: &str) -> Result<QuantTensor> {
        let get = |n: &str| self.weights.try_get(n).ok().flatten();
        let q = QuantTensor::from_bnb(&self.key(prefix), &get)
            .with_context(|| format!("cannot read the bnb-4bit weight of `{prefix}`"))?
            .with_context(|| format!("`{prefix}` has a quant_state but no readable bnb-4bit weight"))?;
        Ok(q.to_device(self.opts.device))
    }

    /// A dense `[out, in]` weight for `<prefix>.weight`, dequantized when stored 4-bit.
    pub fn dense_weight(&self, prefix: &str) -> Result<Tensor> {
        if self.is_bnb(prefix) {
            return Ok(self.bnb_weight(prefix)?.dequantize(self.opts.dtype));
        }
        self.dense(&format!("{prefix}.weight"))
    }

    /// A frozen linear that is never a LoRA target: bnb-4bit when stored so, else dense in the
    /// compute dtype (never quantized at load).
    pub fn frozen_linear(&self, prefix: &str) -> Result<Linear> {
        let weight = if self.is_bnb(prefix) {
            Weight::Quant(self.bnb_weight(prefix)?)
        } else {
            Weight::Dense(self.dense(&format!("{prefix}.weight"))?)
        };
        Ok(Linear { weight, bias: None, lora: None, kernels: self.kernels.clone() })
    }

    /// A decoder linear: bnb-4bit when stored so; else dense, quantized now when
    /// `opts.quantize` asks for it. `bias` reads `<prefix>.bias`.
    pub fn linear(&self, prefix: &str, bias: bool) -> Result<Linear> {
        let weight = if self.is_bnb(prefix) {
            Weight::Quant(self.bnb_weight(prefix)?)
        } else {
            let w = self.dense(&format!("{prefix}.weight"))?;
            if w.dim() != 2 {
                bail!("`{prefix}.weight` has shape {:?}, expected [out, in]", w.size());
            }
            match self.opts.quantize {
                Some((qt, blocksize, double)) => Weight::Quant(
                    QuantTensor::quantize(&w, qt, blocksize, double)
                        .with_context(|| format!("cannot quantize `{prefix}.weight`"))?,
                ),
                None => Weight::Dense(w),
            }
        };
        let bias = if bias { Some(self.dense(&format!("{prefix}.bias"))?) } else { None };
        Ok(Linear { weight, bias, lora: None, kernels: self.kernels.clone() })
    }
}

/// Llama RMSNorm: `w · (x_f32 · rsqrt(mean(x²) + eps)).to(D)` (downcast before the weight).
pub(crate) struct RmsNorm {
    /// `weight` `[H]` in the compute dtype.
    pub weight: Tensor,
    /// `rms_norm_eps`.
    pub eps: f64,
    /// CUDA kernels (kernels/rms_norm.cu) when loaded on a GPU.
    pub kernels: Option<Arc<Kernels>>,
}

impl RmsNorm {
    /// Read `<prefix>.weight`.
    pub fn load(l: &Loader, prefix: &str, eps: f64) -> Result<RmsNorm> {
        Ok(RmsNorm { weight: l.dense(&format!("{prefix}.weight"))?, eps, kernels: l.kernels.clone() })
    }

    /// Normalize over the last dimension (the fused kernel when no gradient is needed on a GPU).
    pub fn forward(&self, x: &Tensor) -> Tensor {
        rms_norm::forward(x, Some(&self.weight), self.eps, rms_norm::Mode::Llama, self.kernels.as_deref())
    }

    /// The output and f32 `1/rms` per row, for [`RmsNorm::backward`]; no graph.
    pub fn forward_with_rstd(&self, x: &Tensor) -> (Tensor, Tensor) {
        rms_norm::forward_with_rstd(x, Some(&self.weight), self.eps, rms_norm::Mode::Llama, self.kernels.as_deref())
    }

    /// `dx` for upstream `dy` (the weight is frozen).
    pub fn backward(&self, dy: &Tensor, x: &Tensor, rstd: &Tensor) -> Tensor {
        rms_norm::backward(dy, x, Some(&self.weight), rstd, rms_norm::Mode::Llama, self.kernels.as_deref())
    }
}

/// `down_proj(silu(gate) · up)`, with gate and up from `gate_proj` and `up_proj`, or from one
/// fused `gate_up_proj` whose first half of rows is gate and second half up (Phi-3's
/// `Phi3MLP`: `gate, up = gate_up_proj(x).chunk(2, -1)`). Which one is read from the checkpoint.
pub(crate) struct Mlp {
    gate_up: GateUp,
    /// `mlp.down_proj`.
    pub down_proj: Linear,
}

enum GateUp {
    Split { gate_proj: Linear, up_proj: Linear },
    Fused { gate_up_proj: Linear },
}

impl Mlp {
    /// Read `<prefix>.{gate,up,down}_proj`, or `<prefix>.{gate_up,down}_proj` when the
    /// checkpoint holds a fused `gate_up_proj`.
    pub fn load(l: &Loader, prefix: &str, bias: bool) -> Result<Mlp> {
        let gate_up = if l.has(&format!("{prefix}.gate_up_proj")) {
            GateUp::Fused { gate_up_proj: l.linear(&format!("{prefix}.gate_up_proj"), bias)? }
        } else {
            GateUp::Split {
                gate_proj: l.linear(&format!("{prefix}.gate_proj"), bias)?,
                up_proj: l.linear(&format!("{prefix}.up_proj"), bias)?,
            }
        };
        Ok(Mlp { gate_up, down_proj: l.linear(&format!("{prefix}.down_proj"), bias)? })
    }

    fn kernels(&self) -> Option<&Kernels> {
        self.down_proj.kernels.as_deref()
    }

    /// `[B, T, H]` → `[B, T, H]`.
    pub fn forward(&self, x: &Tensor, train: bool) -> Tensor {
        let (g, u) = match &self.gate_up {
            GateUp::Split { gate_proj, up_proj } => (gate_proj.forward(x, train), up_proj.forward(x, train)),
            GateUp::Fused { gate_up_proj } => halves(gate_up_proj.forward(x, train)),
        };
        self.down_proj.forward(&glu::forward(&g, &u, glu::Act::Silu, self.down_proj.kernels.as_ref()), train)
    }

    /// The hand-written backward of [`Mlp::forward`] (no LoRA dropout): recomputes the forward
    /// without a graph from the input `x`, accumulates the adapters' gradients and returns `dx`.
    pub fn backward(&self, x: &Tensor, dy: &Tensor) -> Tensor {
        let k = self.kernels();
        match &self.gate_up {
            GateUp::Split { gate_proj, up_proj } => {
                let (g, g_saved) = gate_proj.forward_saving(x);
                let (u, u_saved) = up_proj.forward_saving(x);
                let act = glu::forward(&g, &u, glu::Act::Silu, self.down_proj.kernels.as_ref());
                let d_act = self.down_proj.backward(&act, None, dy);
                drop(act);
                let (dg, du) = glu::backward(&d_act, &g, &u, glu::Act::Silu, k);
                drop((g, u, d_act));
                let dx = gate_proj.backward(x, g_saved.as_ref(), &dg);
                up_proj.backward_into(x, u_saved.as_ref(), &du, Some(dx))
            }
            GateUp::Fused { gate_up_proj } => {
                let (gu, saved) = gate_up_proj.forward_saving(x);
                let (g, u) = halves(gu);
                let act = glu::forward(&g, &u, glu::Act::Silu, self.down_proj.kernels.as_ref());
                let d_act = self.down_proj.backward(&act, None, dy);
                drop(act);
                let (dg, du) = glu::backward(&d_act, &g, &u, glu::Act::Silu, k);
                drop((g, u, d_act));
                gate_up_proj.backward(x, saved.as_ref(), &Tensor::cat(&[dg, du], -1))
            }
        }
    }

    /// The linears by leaf name, in module order.
    pub fn linears(&self) -> Vec<(&'static str, &Linear)> {
        match &self.gate_up {
            GateUp::Split { gate_proj, up_proj } => {
                vec![("gate_proj", gate_proj), ("up_proj", up_proj), ("down_proj", &self.down_proj)]
            }
            GateUp::Fused { gate_up_proj } => vec![("gate_up_proj", gate_up_proj), ("down_proj", &self.down_proj)],
        }
    }

    /// The linears by leaf name, in module order, mutably.
    pub fn linears_mut(&mut self) -> Vec<(&'static str, &mut Linear)> {
        match &mut self.gate_up {
            GateUp::Split { gate_proj, up_proj } => {
                vec![("gate_proj", gate_proj), ("up_proj", up_proj), ("down_proj", &mut self.down_proj)]
            }
            GateUp::Fused { gate_up_proj } => {
                vec![("gate_up_proj", gate_up_proj), ("down_proj", &mut self.down_proj)]
            }
        }
    }
}

/// The two halves of the last dimension (contiguous: the GLU kernel reads them as flat rows).
fn halves(y: Tensor) -> (Tensor, Tensor) {
    let n = y.size()[y.dim() - 1] / 2;
    (y.narrow(-1, 0, n).contiguous(), y.narrow(-1, n, n).contiguous())
}

/// RoPE inverse frequencies, f32 `[head_dim/2]` on the CPU, rescaled per `rope_scaling`.
pub(crate) fn inv_freq(cfg: &Config) -> Tensor {
    let d = cfg.head_dim;
    let exponent = Tensor::arange_start_step(0, d, 2, (Kind::Int64, Device::Cpu)).to_kind(Kind::Float) / d as f64;
    let inv = Tensor::pow_scalar(cfg.rope_theta, &exponent).reciprocal();
    match cfg.rope_scaling {
        RopeScaling::None => inv,
        RopeScaling::Linear { factor } => inv / factor,
        RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings: orig } => {
            let low_wavelen = orig / low_freq_factor;
            let high_wavelen = orig / high_freq_factor;
            let wavelen = inv.reciprocal() * (2.0 * PI);
            let low = wavelen.gt(low_wavelen);
            let scaled = (&inv / factor).where_self(&low, &inv);
            let smooth = ((wavelen.reciprocal() * orig) - low_freq_factor) / (high_freq_factor - low_freq_factor);
            let smoothed = (smooth.ones_like() - &smooth) * &scaled / factor + &smooth * &scaled;
            let medium = wavelen.lt(high_wavelen).logical_not().logical_and(&low.logical_not());
            smoothed.where_self(&medium, &scaled)
        }
    }
}

/// cos and sin `[B, T, head_dim]` in the compute dtype.
pub(crate) struct Rope {
    /// `cos(pos · inv_freq)` duplicated over both halves.
    pub cos: Tensor,
    /// `sin(pos · inv_freq)` duplicated over both halves.
    pub sin: Tensor,
    /// CUDA kernels (kernels/rope.cu) for [`Rope::apply_bthd`].
    pub kernels: Option<Arc<Kernels>>,
}

impl Rope {
    /// Tables for `position_ids` `[B, T]`, computed in f32 then cast to `kind` (as HF).
    pub fn new(inv_freq: &Tensor, position_ids: &Tensor, kind: Kind) -> Rope {
        let inv = inv_freq.to_device(position_ids.device());
        let freqs = position_ids.to_kind(Kind::Float).unsqueeze(-1) * inv; // (B, T, d/2)
        let emb = Tensor::cat(&[&freqs, &freqs], -1);
        Rope { cos: emb.cos().to_kind(kind), sin: emb.sin().to_kind(kind), kernels: None }
    }

    /// These tables, applied with `kernels` where they can be.
    pub fn with_kernels(mut self, kernels: Option<Arc<Kernels>>) -> Rope {
        self.kernels = kernels;
        self
    }

    /// RoPE on `x` `[B, T, heads, d]` (the projection's own layout; no transposes): the fused
    /// kernel, in place, when `x` needs no gradient on a GPU, else [`Rope::apply`]'s math.
    pub fn apply_bthd(&self, x: Tensor) -> Tensor {
        rope::apply(x, &self.cos, &self.sin, false, self.kernels.as_ref())
    }

    /// The backward of [`Rope::apply_bthd`] for upstream `dy` `[B, T, heads, d]` (in place on it
    /// with the kernel).
    pub fn backward_bthd(&self, dy: Tensor) -> Tensor {
        rope::apply(dy.contiguous(), &self.cos, &self.sin, true, self.kernels.as_ref())
    }

    /// `x·cos + rotate_half(x)·sin` for `x` `[B, heads, T, d]`.
    pub fn apply(&self, x: &Tensor) -> Tensor {
        let half = x.size()[3] / 2;
        let rotated = Tensor::cat(&[-x.narrow(3, half, half), x.narrow(3, 0, half)], 3);
        x * self.cos.unsqueeze(1) + rotated * self.sin.unsqueeze(1)
    }
}

/// Boolean mask `[B, 1, T, T]` (true = attend): causal, `kv > q − window` when sliding,
/// keys with `attention_mask == 0` hidden, tokens of other documents (`seq_ids`) hidden.
/// A query row left with no key (a left-padded query) keeps its diagonal so softmax has no
/// NaN; such outputs are don't-care (HF's eager path spreads them uniformly instead).
/// `None` when the mask is purely causal (no padding mask, no packing, no window shorter than
/// T), so attention can take SDPA's `is_causal` fast path.
pub(crate) fn attention_mask(batch: &Batch, window: Option<i64>, device: Device) -> Option<Tensor> {
    let (b, t) = batch.input_ids.size2().unwrap_or((1, batch.input_ids.size()[0]));
    let window = window.filter(|&w| w < t);
    if batch.attention_mask.is_none() && batch.seq_ids.is_none() && window.is_none() {
        return None;
    }
    let idx = Tensor::arange(t, (Kind::Int64, device));
    let q = idx.unsqueeze(1);
    let k = idx.unsqueeze(0);
    let mut allowed = k.le_tensor(&q);
    if let Some(w) = window {
        allowed = allowed.logical_and(&k.gt_tensor(&(&q - w)));
    }
    let mut allowed = allowed.unsqueeze(0).expand([b, t, t], true);
    if let Some(m) = &batch.attention_mask {
        allowed = allowed.logical_and(&m.to_device(device).ne(0).unsqueeze(1));
    }
    if let Some(s) = &batch.seq_ids {
        let s = s.to_device(device);
        allowed = allowed.logical_and(&s.unsqueeze(2).eq_tensor(&s.unsqueeze(1)));
    }
    let empty = allowed.any_dim(-1, true).logical_not(); // (B, T, 1)
    Some(allowed.logical_or(&q.eq_tensor(&k).unsqueeze(0).logical_and(&empty)).unsqueeze(1))
}

/// How one layer's attention over a batch is masked in a full (uncached) forward.
pub(crate) enum Mask {
    /// Plain causal: SDPA's `is_causal` path.
    Causal,
    /// A boolean mask `[B, 1, T, T]` from [`attention_mask`] (true = attend).
    Dense(Tensor),
    /// The same attention as the boolean mask, as varlen flash attention over the batch's
    /// documents ([`Batch::segments`]), with the layer's sliding window inside the kernel.
    Varlen { cu_seqlens: Tensor, max_len: i64, window: Option<i64> },
}

impl Mask {
    /// The mask of a layer with sliding `window` over `batch`, for q/k/v of `kind` and
    /// `head_dim` on `device`: causal when nothing needs masking; varlen flash where the GPU
    /// path takes it (packed, padded or windowed rows; `varlen` false keeps the boolean mask for
    /// blocks that need one, such as softcapped attention); else the boolean mask.
    pub fn new(batch: &Batch, window: Option<i64>, device: Device, kind: Kind, head_dim: i64, varlen: bool) -> Mask {
        let t = batch.input_ids.size()[batch.input_ids.dim() - 1];
        let window = window.filter(|&w| w < t);
        let masked = batch.attention_mask.is_some() || batch.seq_ids.is_some() || window.is_some();
        if masked && varlen && crate::kernels::varlen::supports(device, kind, head_dim) {
            let (cu_seqlens, max_len) = batch.segments(device);
            return Mask::Varlen { cu_seqlens, max_len, window };
        }
        match attention_mask(batch, window, device) {
            Some(m) => Mask::Dense(m),
            None => Mask::Causal,
        }
    }

    /// The boolean mask (`None`: causal), for blocks that asked for no varlen.
    pub fn dense(&self) -> Option<&Tensor> {
        match self {
            Mask::Causal => None,
            Mask::Dense(m) => Some(m),
            Mask::Varlen { .. } => unreachable!("a varlen mask where a boolean one was asked for"),
        }
    }
}

/// Scaled dot-product attention: q `[B, nh, T, d]`, k/v `[B, nkv, T, d]` (GQA: query head h
/// reads kv head h / (nh/nkv)) under `mask`; returns `[B, T, nh·d]`.
pub(crate) fn attend(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Mask, scale: f64) -> Tensor {
    match mask {
        Mask::Causal => attend_kv(q, k, v, None, true, scale),
        Mask::Dense(m) => attend_kv(q, k, v, Some(m), false, scale),
        Mask::Varlen { cu_seqlens, max_len, window } => {
            crate::kernels::varlen::attend(q, k, v, cu_seqlens, *max_len, scale, *window)
        }
    }
}

/// Attention of a few new queries over a KV cache, written out as HF's eager path does
/// (`softmax(q·kᵀ·scale + mask)` in f32, then `·v`): q `[B, nh, T, d]`, k/v `[B, nkv, S, d]`
/// read in place by each group of nh/nkv query heads (no repeat), `mask` `[B, 1, T, S]`
/// (true = attend, `None`: all keys). Returns `[B, T, nh·d]`. Used for decoding steps, where
/// S grows by one per call: fused SDPA backends that plan per shape (cuDNN) would re-plan
/// every step.
///
/// `softcap` (Gemma 2's `attn_logit_softcapping`) bounds the scores to `tanh(s/c)·c` before the
/// mask, as HF's eager path does; SDPA has no such step, so softcapped families always come here.
pub(crate) fn attend_eager(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    scale: f64,
    softcap: Option<f64>,
) -> Tensor {
    let (b, nh, t, d) = q.size4().unwrap_or_default();
    let (nkv, s) = (k.size()[1], k.size()[2]);
    let g = nh / nkv;
    let qg = q.reshape([b, nkv, g * t, d]); // query head h = kv head h / g, row (h % g)·T + t
    let mut scores = qg.matmul(&k.transpose(-1, -2)).to_kind(Kind::Float) * scale; // (B, nkv, g·T, S)
    if let Some(c) = softcap {
        scores = (scores / c).tanh() * c;
    }
    if let Some(m) = mask {
        let hidden = m.logical_not().unsqueeze(2); // (B, 1, 1, T, S)
        scores = scores.view([b, nkv, g, t, s]).masked_fill(&hidden, f64::NEG_INFINITY).view([b, nkv, g * t, s]);
    }
    let p = scores.softmax(-1, Kind::Float).to_kind(q.kind());
    let o = p.matmul(v).view([b, nh, t, d]);
    o.transpose(1, 2).reshape([b, t, nh * d])
}

/// [`attend`] over S keys that may outnumber the T queries (a KV cache): k/v `[B, nkv, S, d]`,
/// `mask` `[B, 1, T, S]` (true = attend); with no mask, `causal` picks causal (S = T) or all keys.
pub(crate) fn attend_kv(q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>, causal: bool, scale: f64) -> Tensor {
    let (b, nh, t, d) = q.size4().unwrap_or_default();
    let (nkv, s) = (k.size()[1], k.size()[2]);
    let repeat = |x: &Tensor| {
        if nkv == nh {
            x.shallow_clone()
        } else {
            x.unsqueeze(2).expand([b, nkv, nh / nkv, s, d], true).reshape([b, nh, s, d])
        }
    };
    let o = Tensor::scaled_dot_product_attention(
        q,
        &repeat(k),
        &repeat(v),
        mask,
        0.0,
        causal && mask.is_none(),
        scale,
        false,
    );
    o.transpose(1, 2).reshape([b, t, nh * d])
}
