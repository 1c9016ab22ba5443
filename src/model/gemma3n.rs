//! Gemma 3n text decoder (`Gemma3nForCausalLM` as `model.*`, or the text tower of
//! `Gemma3nForConditionalGeneration` as `model.language_model.*`): per-layer embeddings (PLE)
//! and their projection, AltUp with N streams (predict, correct, router, final collapse),
//! LAuReL, q/k norms and a weightless v norm with attention scale 1, KV sharing in the last
//! `num_kv_shared_layers` layers, Gaussian top-k activation sparsity, per-layer MLP widths,
//! final softcap, and RMSNorms that multiply by w (not 1 + w).
//!
//! Reference: transformers 5.17 `models/gemma3n/modeling_gemma3n.py` (`Gemma3nRMSNorm`,
//! `Gemma3nTextAltUp`, `Gemma3nTextLaurelBlock`, `Gemma3nTextMLP`, `Gemma3nTextAttention`,
//! `Gemma3nTextDecoderLayer`, `Gemma3nTextModel`) and docs/model-math.md §1.
//!
//! Layout between layers. The trainer checkpoints one tensor per layer boundary, so the
//! decoder state is one tensor `[B, T, N·H (+ carried K/V)]`: the N AltUp streams side by side,
//! followed, once the producer layers have run, by the K and V (post-norm, post-RoPE,
//! `[B, T, n_kv·d]` each) that the KV-shared layers read. Carrying them in the state lets the
//! gradient of a shared layer flow back into its producer through the ordinary layer-by-layer
//! backward. Generation keeps only the streams and reads the producer's [`KvCache`] instead.
//!
//! Memory. The per-layer embedding table `[vocab_per_layer, L·P]` (4.7 GB in bf16 for E4B)
//! stays in host memory whatever the device, read in place from the memory-mapped checkpoint
//! when stored in the compute dtype (no copy, pages loaded as rows are used): each batch
//! gathers its rows there and moves only those (`[B, T, L·P]`), once per batch
//! ([`Batch::per_layer_inputs`]).
//!
//! Training on CUDA. The AltUp predict/correct, first-prediction and sparse-GeGLU kernels run as
//! autograd nodes with their own backward (src/kernels/), adapted linears as one node each
//! (`Linear::forward_node`), and the layer backward ([`CausalLm::layer_backward`]) is autograd
//! over the layer with its input's parts as separate leaves, their gradients assembled here.

use anyhow::{bail, Context, Result};
use tch::{Device, Kind, Tensor};

use super::blocks::{attend, inv_freq, Loader, Mask, Rope};
use super::config::{Gemma3nConfig, RopeScaling};
use super::gemma2::{decoder_prefix, embed_scale, softcap};
use super::kv_cache::{cached_attention_mask, KvCache};
use super::linear::Linear;
use super::{Batch, CausalLm, Config, LoadOptions, Weights};
use crate::kernels::{altup_correct, altup_first, altup_predict, autograd, glu, topk_glu, Kernels};
use std::sync::Arc;

/// Gemma 3n RMSNorm: `(x_f32 · rsqrt(mean(x²) + eps) · w_f32).to(D)`; no weight for v_norm.
struct Norm {
    /// `weight`, f32; `None` for the scale-free variant.
    weight: Option<Tensor>,
    /// `weight` in the compute dtype when that holds it exactly (checkpoints stored in it do),
    /// for libtorch's fused RMSNorm under autograd; `None` otherwise or without a weight.
    weight_compute: Option<Tensor>,
    eps: f64,
    kernels: Option<std::sync::Arc<crate::kernels::Kernels>>,
}

impl Norm {
    fn load(l: &Loader, prefix: &str, eps: f64) -> Result<Norm> {
        let name = format!("{prefix}.weight");
        let w = l.weights.get(&l.key(&name))?.to_device(l.opts.device).to_kind(Kind::Float).set_requires_grad(false);
        let dtype = l.opts.dtype;
        let weight_compute =
            (dtype != Kind::Float).then(|| w.to_kind(dtype)).filter(|low| low.to_kind(Kind::Float).equal(&w));
        Ok(Norm { weight: Some(w), weight_compute, eps, kernels: l.kernels.clone() })
    }

    /// A scale-free norm (v_norm).
    fn plain(l: &Loader, eps: f64) -> Norm {
        Norm { weight: None, weight_compute: None, eps, kernels: l.kernels.clone() }
    }

    /// With a graph on a GPU with the kernels on (the checkpointed recomputation), libtorch's
    /// fused RMSNorm and its backward when the scale is exact in x's dtype; else
    /// [`crate::kernels::rms_norm::forward`] (the kernel without a graph, the reference with one).
    fn forward(&self, x: &Tensor) -> Tensor {
        use crate::kernels::rms_norm::{forward, forward_fused, Mode};
        let fused_ok = match (&self.weight, &self.weight_compute) {
            (None, _) => true,
            (Some(_), Some(wc)) => wc.kind() == x.kind(),
            (Some(_), None) => false,
        };
        if x.requires_grad() && fused_ok && self.kernels.is_some() && x.device().is_cuda() {
            return forward_fused(x, self.weight_compute.as_ref(), self.eps);
        }
        forward(x, self.weight.as_ref(), self.eps, Mode::Scale, self.kernels.as_deref())
    }
}

/// `x` rescaled to the root-mean-square `target` `[.., 1]`: `x · target / √max(mean(x²), 1e-5)`,
/// in x's dtype (the AltUp stream initialisation and collapse).
fn to_magnitude(x: &Tensor, target: &Tensor) -> Tensor {
    let m = x.square().mean_dim(-1, true, x.kind()).clamp_min(1e-5).sqrt();
    x * target / m
}

/// `sqrt(mean(x²))` over the last dimension, in x's dtype, with gradient 0 (not NaN) where the
/// mean is 0. HF writes `mean(x²) ** 0.5`, whose derivative at 0 is `0 · ∞ = NaN`; HF never
/// reaches it, since its padding queries attend to the real tokens, but here a padding position
/// attends only to padding (varlen, packed rows), and where the checkpoint's embedding row at
/// the pad id is zero (transformers' `padding_idx` init) its streams stay exactly zero through
/// every layer: the final collapse then differentiated `sqrt` at 0, and the NaN reached every
/// LoRA gradient through the padding positions. The value is unchanged: `sqrt(v)` for `v > 0`,
/// and 0 at 0.
fn magnitude(x: &Tensor) -> Tensor {
    let v = x.square().mean_dim(-1, true, x.kind());
    let live = v.gt(0.0);
    let safe = v.where_self(&live, &v.ones_like()).sqrt();
    safe.where_self(&live, &v.zeros_like())
}

/// `self_attn`. Shared layers have no k/v projections: they read a producer's K/V.
struct Attention {
    q_proj: Linear,
    /// `None` on KV-shared layers.
    k_proj: Option<Linear>,
    v_proj: Option<Linear>,
    o_proj: Linear,
    q_norm: Norm,
    k_norm: Option<Norm>,
    v_norm: Norm,
    num_heads: i64,
    num_kv_heads: i64,
    head_dim: i64,
}

impl Attention {
    /// q `[B, nh, T, d]` with q_norm and RoPE.
    fn q(&self, x: &Tensor, rope: &Rope, train: bool) -> Tensor {
        let (b, t) = (x.size()[0], x.size()[1]);
        let q = self.q_norm.forward(&self.q_proj.forward(x, train).view([b, t, self.num_heads, self.head_dim]));
        rope.apply_bthd(q).transpose(1, 2)
    }

    /// This layer's own k and v `[B, n_kv, T, d]` (k normed and rotated, v scale-free normed).
    fn kv(&self, x: &Tensor, rope: &Rope, train: bool) -> (Tensor, Tensor) {
        let (b, t) = (x.size()[0], x.size()[1]);
        let (k_proj, v_proj, k_norm) = match (&self.k_proj, &self.v_proj, &self.k_norm) {
            (Some(k), Some(v), Some(n)) => (k, v, n),
            _ => unreachable!("kv() is only called on layers that compute their own K/V"),
        };
        let k = k_norm.forward(&k_proj.forward(x, train).view([b, t, self.num_kv_heads, self.head_dim]));
        let v = self.v_norm.forward(&v_proj.forward(x, train).view([b, t, self.num_kv_heads, self.head_dim]));
        (rope.apply_bthd(k).transpose(1, 2), v.transpose(1, 2))
    }
}

/// `mlp` with per-layer width and optional Gaussian top-k sparsity on the gate.
struct Mlp {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
    /// `activation_sparsity_pattern[i]`.
    sparsity: f64,
}

impl Mlp {
    fn forward(&self, x: &Tensor, train: bool) -> Tensor {
        let g = self.gate_proj.forward(x, train);
        let u = self.up_proj.forward(x, train);
        let kernels = self.gate_proj.kernels.as_ref();
        let a = if self.sparsity > 0.0 {
            topk_glu::forward(&g, &u, std_multiplier(self.sparsity, g.kind()), kernels)
        } else {
            glu::forward(&g, &u, glu::Act::GeluTanh, kernels)
        };
        self.down_proj.forward(&a, train)
    }
}

/// Φ⁻¹(sparsity) computed in f32 as `torch.distributions.Normal(0, 1).icdf` does, rounded to
/// `kind` (bf16: 0.95 → 1.6484375), as a host scalar (no device round trip).
fn std_multiplier(sparsity: f64, kind: Kind) -> f64 {
    let p = Tensor::from(sparsity as f32);
    ((p * 2.0 - 1.0).erfinv() * std::f64::consts::SQRT_2).to_kind(kind).to_kind(Kind::Double).double_value(&[])
}

/// `altup`: the router and the prediction/correction coefficients.
struct AltUp {
    /// `correct_output_scale` `[H]` (no `.weight` suffix in the checkpoint).
    correct_output_scale: Tensor,
    /// `correction_coefs.weight` `[N, N]`, clamped to ±`altup_coef_clip`.
    correction_coefs: Tensor,
    /// `prediction_coefs.weight` `[N², N]`, clamped to ±`altup_coef_clip`.
    prediction_coefs: Tensor,
    /// `modality_router.weight` `[N, H]`.
    modality_router: Tensor,
    router_norm: Norm,
    /// `hidden_size^-1`.
    router_scale: f64,
}

impl AltUp {
    /// `tanh(router(router_norm(x) / H))` computed in f32, in x's dtype: `[B, T, N]`.
    fn modalities(&self, x: &Tensor) -> Tensor {
        let r = (self.router_norm.forward(x) * self.router_scale).linear::<Tensor>(&self.modality_router, None);
        r.to_kind(Kind::Float).tanh().to_kind(x.kind())
    }
}

/// `laurel`: `x + post_laurel_norm(linear_right(linear_left(x)))`.
struct Laurel {
    linear_left: Linear,
    linear_right: Linear,
    post_laurel_norm: Norm,
}

struct Layer {
    self_attn: Attention,
    mlp: Mlp,
    input_layernorm: Norm,
    post_attention_layernorm: Norm,
    pre_feedforward_layernorm: Norm,
    post_feedforward_layernorm: Norm,
    altup: AltUp,
    laurel: Laurel,
    per_layer_input_gate: Linear,
    per_layer_projection: Linear,
    post_per_layer_input_norm: Norm,
}

/// How a layer takes part in KV sharing.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Kv {
    /// Computes its own K/V, shared with nobody.
    Own,
    /// Computes its own K/V and appends them to the carried state as slot `n`.
    Produce(usize),
    /// Reads slot `n` of the carried state (training) / layer `producer`'s cache (generation).
    Share { slot: usize, producer: usize },
}

/// The Gemma 3n text decoder.
pub(crate) struct Gemma3n {
    config: Config,
    g: Gemma3nConfig,
    prefix: String,
    embed_tokens: Tensor,
    /// `[vocab_per_layer, L·P]` in host memory: read in place from the mapped checkpoint when it
    /// is stored in the compute dtype, else a copy (`table_map` keeps the mapping alive).
    embed_tokens_per_layer: Tensor,
    _table_map: Option<super::weights::MappedTensor>,
    per_layer_model_projection: Linear,
    per_layer_projection_norm: Norm,
    altup_projections: Vec<Linear>,
    altup_unembed_projections: Vec<Linear>,
    layers: Vec<Layer>,
    kv: Vec<Kv>,
    norm: Norm,
    inv_freq: Tensor,
    inv_freq_local: Tensor,
    /// The CUDA kernels (RoPE, AltUp), when on a GPU with them on.
    kernels: Option<Arc<Kernels>>,
}

/// Which layers produce and which share K/V (docs/model-math.md §1.6): a shared layer of a type reads
/// the last non-shared layer of that type.
fn kv_roles(sliding: &[bool], num_shared: usize) -> Result<Vec<Kv>> {
    let n = sliding.len();
    let first = n - num_shared;
    let mut roles = vec![Kv::Own; n];
    if num_shared == 0 {
        return Ok(roles);
    }
    let mut slots: Vec<(usize, bool)> = vec![]; // (producer, its type), in layer order
    for i in first..n {
        let producer = (0..first).rev().find(|&j| sliding[j] == sliding[i]).with_context(|| {
            format!(
                "layer {i} shares K/V but no earlier layer of its type ({}) computes them",
                if sliding[i] { "sliding" } else { "full" }
            )
        })?;
        if !slots.iter().any(|&(p, _)| p == producer) {
            slots.push((producer, sliding[i]));
        }
    }
    slots.sort();
    for (slot, &(p, _)) in slots.iter().enumerate() {
        roles[p] = Kv::Produce(slot);
    }
    for i in first..n {
        let producer = (0..first).rev().find(|&j| sliding[j] == sliding[i]).expect("checked above");
        let slot = slots.iter().position(|&(p, _)| p == producer).expect("registered above");
        roles[i] = Kv::Share { slot, producer };
    }
    Ok(roles)
}

impl Layer {
    /// Layer `i` under `p` (`…layers.{i}`); a layer that shares another's KV (`shared`) has no
    /// k/v projections or k norm.
    fn load(l: &Loader, config: &Config, g: &Gemma3nConfig, p: &str, shared: bool, i: usize) -> Result<Layer> {
        let eps = config.rms_norm_eps;
        let a = format!("{p}.self_attn");
        let norm = |n: &str| Norm::load(l, &format!("{p}.{n}"), eps);
        let coefs = |name: &str| -> Result<Tensor> {
            let w = l.dense_weight(name)?;
            Ok(match g.altup_coef_clip {
                Some(c) => w.clamp(-c, c),
                None => w,
            })
        };
        Ok(Layer {
            self_attn: Attention {
                q_proj: l.linear(&format!("{a}.q_proj"), false)?,
                k_proj: if shared { None } else { Some(l.linear(&format!("{a}.k_proj"), false)?) },
                v_proj: if shared { None } else { Some(l.linear(&format!("{a}.v_proj"), false)?) },
                o_proj: l.linear(&format!("{a}.o_proj"), false)?,
                q_norm: Norm::load(l, &format!("{a}.q_norm"), eps)?,
                k_norm: if shared { None } else { Some(Norm::load(l, &format!("{a}.k_norm"), eps)?) },
                v_norm: Norm::plain(l, eps),
                num_heads: config.num_attention_heads,
                num_kv_heads: config.num_key_value_heads,
                head_dim: config.head_dim,
            },
            mlp: Mlp {
                gate_proj: l.linear(&format!("{p}.mlp.gate_proj"), false)?,
                up_proj: l.linear(&format!("{p}.mlp.up_proj"), false)?,
                down_proj: l.linear(&format!("{p}.mlp.down_proj"), false)?,
                sparsity: g.activation_sparsity_pattern[i],
            },
            input_layernorm: norm("input_layernorm")?,
            post_attention_layernorm: norm("post_attention_layernorm")?,
            pre_feedforward_layernorm: norm("pre_feedforward_layernorm")?,
            post_feedforward_layernorm: norm("post_feedforward_layernorm")?,
            altup: AltUp {
                correct_output_scale: l.dense(&format!("{p}.altup.correct_output_scale"))?,
                correction_coefs: coefs(&format!("{p}.altup.correction_coefs"))?,
                prediction_coefs: coefs(&format!("{p}.altup.prediction_coefs"))?,
                modality_router: l.dense_weight(&format!("{p}.altup.modality_router"))?,
                router_norm: norm("altup.router_norm")?,
                router_scale: 1.0 / config.hidden_size as f64,
            },
            laurel: Laurel {
                linear_left: l.frozen_linear(&format!("{p}.laurel.linear_left"))?,
                linear_right: l.frozen_linear(&format!("{p}.laurel.linear_right"))?,
                post_laurel_norm: norm("laurel.post_laurel_norm")?,
            },
            per_layer_input_gate: l.frozen_linear(&format!("{p}.per_layer_input_gate"))?,
            per_layer_projection: l.frozen_linear(&format!("{p}.per_layer_projection"))?,
            post_per_layer_input_norm: norm("post_per_layer_input_norm")?,
        })
    }
}

impl Gemma3n {
    fn load(config: Config, weights: &Weights, opts: &LoadOptions) -> Result<Gemma3n> {
        let g = config.gemma3n.clone().context("a gemma3n_text config without its Gemma 3n fields")?;
        let (prefix, stored) = decoder_prefix(weights);
        let l = Loader::new(weights, opts).with_alias(prefix, stored);
        let eps = config.rms_norm_eps;
        let n_layers = config.num_hidden_layers as usize;
        let p_in = g.hidden_size_per_layer_input;
        let kv = kv_roles(&config.layer_sliding, g.num_kv_shared_layers as usize)?;

        let embed_tokens = l.dense(&format!("{prefix}.embed_tokens.weight"))?;
        // The per-layer table stays on the host in the compute dtype.
        let ple_name = l.key(&format!("{prefix}.embed_tokens_per_layer.weight"));
        let table_map = weights.mapped(&ple_name, opts.dtype);
        let embed_tokens_per_layer = match &table_map {
            Some(m) => m.tensor.shallow_clone(),
            None => weights.get(&ple_name)?.to_kind(opts.dtype),
        }
        .set_requires_grad(false);
        let want = [g.vocab_size_per_layer_input, config.num_hidden_layers * p_in];
        if embed_tokens_per_layer.size() != want {
            bail!("`{ple_name}` has shape {:?}, expected {:?} (vocab_size_per_layer_input, num_hidden_layers · hidden_size_per_layer_input)", embed_tokens_per_layer.size(), want);
        }
        let names = weights.names();
        let mut layers = Vec::with_capacity(n_layers);
        for (i, role) in kv.iter().enumerate().take(n_layers) {
            let p = format!("{prefix}.layers.{i}");
            let a = format!("{p}.self_attn");
            let shared = matches!(role, Kv::Share { .. });
            if shared {
                // transformers ≥ 5 never builds them; Google's release ships them unused.
                for n in ["k_proj", "v_proj", "k_norm"] {
                    let stored = l.key(&format!("{a}.{n}."));
                    for key in names.iter().filter(|k| k.starts_with(&stored)) {
                        weights.ignore(key);
                    }
                }
            }
            let layer =
                Layer::load(&l, &config, &g, &p, shared, i).with_context(|| format!("cannot load layer `{p}`"))?;
            layers.push(layer);
        }
        let projections = |name: &str| -> Result<Vec<Linear>> {
            (0..g.altup_num_inputs - 1).map(|k| l.frozen_linear(&format!("{prefix}.{name}.{k}"))).collect()
        };
        let inv = inv_freq(&config).to_device(opts.device);
        let local = Config {
            rope_theta: config.rope_local_theta.unwrap_or(config.rope_theta),
            rope_scaling: RopeScaling::None,
            ..config.clone()
        };
        let inv_local = inv_freq(&local).to_device(opts.device);
        Ok(Gemma3n {
            per_layer_model_projection: l.frozen_linear(&format!("{prefix}.per_layer_model_projection"))?,
            per_layer_projection_norm: Norm::load(&l, &format!("{prefix}.per_layer_projection_norm"), eps)?,
            altup_projections: projections("altup_projections")?,
            altup_unembed_projections: projections("altup_unembed_projections")?,
            norm: Norm::load(&l, &format!("{prefix}.norm"), eps)?,
            prefix: prefix.to_string(),
            embed_tokens,
            embed_tokens_per_layer,
            _table_map: table_map,
            layers,
            kv,
            inv_freq: inv,
            inv_freq_local: inv_local,
            kernels: l.kernels.clone(),
            config,
            g,
        })
    }

    fn streams(&self) -> i64 {
        self.g.altup_num_inputs
    }

    fn sliding(&self, i: usize) -> bool {
        self.config.layer_sliding.get(i).copied().unwrap_or(false)
    }

    fn rope(&self, i: usize, batch: &Batch, kind: Kind, device: Device) -> Rope {
        let sliding = self.sliding(i);
        batch
            .rope(if sliding { &self.inv_freq_local } else { &self.inv_freq }, kind, device)
            .with_kernels(self.kernels.clone())
    }

    fn window(&self, i: usize) -> Option<i64> {
        if self.sliding(i) {
            self.config.sliding_window
        } else {
            None
        }
    }

    /// The scaled token embedding `[B, T, H]` (the AltUp stream 0 and the PLE projection input).
    fn scaled_embedding(&self, ids: &Tensor) -> Tensor {
        let ids = ids.to_device(self.embed_tokens.device());
        let e = Tensor::embedding(&self.embed_tokens, &ids, -1, false, false);
        let s = embed_scale(self.config.hidden_size, e.kind());
        e * s
    }

    /// `per_layer_inputs` `[B, T, L, P]` on `device` (`Gemma3nTextModel.get_per_layer_inputs` +
    /// `project_per_layer_inputs`): the host-side table rows of the batch's ids (ids outside the
    /// table read row 0, as the multimodal model maps them), plus the projection of the scaled
    /// embedding.
    fn compute_per_layer_inputs(&self, ids: &Tensor, device: Device) -> Tensor {
        let (b, t) = (ids.size()[0], ids.size()[1]);
        let (l, p) = (self.config.num_hidden_layers, self.g.hidden_size_per_layer_input);
        let kind = self.embed_tokens.kind();
        let host_ids = ids.to_device(self.embed_tokens_per_layer.device());
        let in_table = host_ids.ge(0).logical_and(&host_ids.lt(self.g.vocab_size_per_layer_input));
        let host_ids = host_ids.where_self(&in_table, &host_ids.zeros_like());
        let rows = Tensor::embedding(&self.embed_tokens_per_layer, &host_ids, -1, false, false).to_device(device);
        let ple = rows * embed_scale(p, kind);
        let e = self.scaled_embedding(ids).to_device(device);
        let scale_proj = Tensor::from((self.config.hidden_size as f64).powf(-0.5) as f32)
            .to_kind(kind)
            .to_kind(Kind::Double)
            .double_value(&[]);
        let proj = self.per_layer_model_projection.forward(&e, false) * scale_proj;
        let proj = self.per_layer_projection_norm.forward(&proj.view([b, t, l, p]));
        let rsqrt2 = Tensor::from(2.0f32).rsqrt().to_kind(kind).to_kind(Kind::Double).double_value(&[]);
        (proj + ple.view([b, t, l, p])) * rsqrt2
    }

    fn per_layer_input(&self, batch: &Batch, i: usize, device: Device) -> Tensor {
        batch
            .per_layer_inputs
            .get_or_init(|| self.compute_per_layer_inputs(&batch.input_ids, device))
            .select(2, i as i64)
    }

    /// [`CausalLm::layer`] on its input's parts: the streams `[B, T, N, H]`, their stream 0
    /// `active` and the carried K/V `[B, T, ·]`. Returns the layer's output `[B, T, N·H + ·]`.
    fn layer_parts(
        &self,
        i: usize,
        streams: &Tensor,
        active: &Tensor,
        carry: &Tensor,
        batch: &Batch,
        train: bool,
    ) -> Tensor {
        let device = streams.device();
        let (b, t, n, hd) = streams.size4().unwrap_or_default();
        let rope = self.rope(i, batch, streams.kind(), device);
        let mask = Mask::new(batch, self.window(i), device, streams.kind(), self.config.head_dim, true);
        let per_layer = self.per_layer_input(batch, i, device);
        let attn = &self.layers[i].self_attn;
        let kvw = self.config.num_key_value_heads * self.config.head_dim;
        let mut produced: Option<Tensor> = None;
        let new_streams = self.layer_streams(i, streams, active, &per_layer, train, |x| {
            let q = attn.q(x, &rope, train);
            let (k, v) = match self.kv[i] {
                Kv::Share { slot, .. } => {
                    let s = carry.narrow(2, slot as i64 * 2 * kvw, 2 * kvw);
                    let heads = |y: Tensor| y.view([b, t, attn.num_kv_heads, attn.head_dim]).transpose(1, 2);
                    (heads(s.narrow(2, 0, kvw)), heads(s.narrow(2, kvw, kvw)))
                }
                _ => attn.kv(x, &rope, train),
            };
            if let Kv::Produce(_) = self.kv[i] {
                let flat = |y: &Tensor| y.transpose(1, 2).reshape([b, t, kvw]);
                produced = Some(Tensor::cat(&[flat(&k), flat(&v)], 2));
            }
            attn.o_proj.forward(&attend(&q, &k, &v, &mask, 1.0), train)
        });
        let streams_out = new_streams.view([b, t, n * hd]);
        if carry.size()[2] == 0 && produced.is_none() {
            // Before the first KV producer nothing is carried: no copy through `cat`.
            return streams_out;
        }
        let mut parts = vec![streams_out, carry.shallow_clone()];
        if let Some(p) = produced {
            parts.push(p);
        }
        Tensor::cat(&parts, 2)
    }

    /// One decoder layer on the streams `[B, T, N, H]` whose stream 0 is `active` (the same
    /// values: a view, or in [`CausalLm::layer_backward`] a leaf of its own); `attn` runs
    /// self-attention on the normed active stream. Returns the new streams.
    fn layer_streams(
        &self,
        i: usize,
        streams: &Tensor,
        active: &Tensor,
        per_layer: &Tensor,
        train: bool,
        attn: impl FnOnce(&Tensor) -> Tensor,
    ) -> Tensor {
        let layer = &self.layers[i];
        let (b, t, n, _) = streams.size4().unwrap_or_default();
        let kernels = self.kernels.as_ref();
        // AltUp predict: pred[p] = S[p] + Σ_q R[p, q]·S[q]; `a` = pred[0], the active stream.
        let m = layer.altup.modalities(active);
        let r = m.linear::<Tensor>(&layer.altup.prediction_coefs, None).view([b, t, n, n]);
        let (pred, a) = altup_predict::forward(streams, &r, kernels);
        let an = layer.input_layernorm.forward(&a);
        let lz = &layer.laurel;
        let laurel =
            &an + lz.post_laurel_norm.forward(&lz.linear_right.forward(&lz.linear_left.forward(&an, train), train));
        let att = layer.post_attention_layernorm.forward(&attn(&an));
        let x = (&a + att + laurel) / std::f64::consts::SQRT_2;
        let f = layer
            .post_feedforward_layernorm
            .forward(&layer.mlp.forward(&layer.pre_feedforward_layernorm.forward(&x), train));
        let out = &x + f;
        // AltUp correct: C[p] = pred[p] + (coef[p] + 1)·(out − pred[0]); the per-layer input's
        // projection g, gated by the corrected active stream, goes to streams 1..N.
        let c = layer.altup.modalities(&out).linear::<Tensor>(&layer.altup.correction_coefs, None) + 1.0;
        let scale = self.g.altup_correct_scale.then_some(&layer.altup.correct_output_scale);
        let first = altup_first::forward(&a, &out, &c, scale, kernels);
        let gate =
            glu::forward(&layer.per_layer_input_gate.forward(&first, train), per_layer, glu::Act::GeluTanh, kernels);
        let g = layer.post_per_layer_input_norm.forward(&layer.per_layer_projection.forward(&gate, train));
        altup_correct::forward(&pred, &out, &c, &g, kernels)
    }
}

impl CausalLm for Gemma3n {
    fn config(&self) -> &Config {
        &self.config
    }

    /// The N AltUp streams side by side `[B, T, N·H]`: the scaled embedding and its N − 1
    /// projections rescaled to its magnitude.
    fn embed(&self, batch: &Batch) -> Tensor {
        let e = self.scaled_embedding(&batch.input_ids);
        let target = magnitude(&e);
        let mut streams = vec![e.shallow_clone()];
        for proj in &self.altup_projections {
            streams.push(to_magnitude(&proj.forward(&e, false), &target));
        }
        Tensor::cat(&streams, 2)
    }

    fn num_layers(&self) -> usize {
        self.layers.len()
    }

    fn layer(&self, i: usize, h: &Tensor, batch: &Batch, train: bool) -> Tensor {
        let (b, t, c) = h.size3().unwrap_or_default();
        let (n, hd) = (self.streams(), self.config.hidden_size);
        let streams = h.narrow(2, 0, n * hd).view([b, t, n, hd]);
        let carry = h.narrow(2, n * hd, c - n * hd);
        self.layer_parts(i, &streams, &streams.select(2, 0), &carry, batch, train)
    }

    /// Autograd through [`Self::layer_parts`] with the input's parts as leaves of their own (the
    /// streams, their stream 0 and the carried K/V), whose gradients are then put together here:
    /// the active stream's added into stream 0 of the streams' (which AltUp predict's backward
    /// writes whole), the carry's placed beside them. Through `h`'s `narrow`s and `select`,
    /// autograd would instead zero-fill a full-width gradient per view and add them up, about
    /// 0.3 ms per E4B layer on the H200 (docs/benchmarks.md). Used on CUDA (`hand_backward`);
    /// tests/gemma.rs holds it to plain autograd on the CPU.
    fn layer_backward(&self, i: usize, h: &Tensor, batch: &Batch, dy: &Tensor) -> Option<Tensor> {
        if !autograd::available() {
            return None;
        }
        let (b, t, c) = h.size3().ok()?;
        let (n, hd) = (self.streams(), self.config.hidden_size);
        let x = h.detach();
        let streams = x.narrow(2, 0, n * hd).view([b, t, n, hd]).detach().set_requires_grad(true);
        let active = streams.select(2, 0).detach().set_requires_grad(true);
        let width = c - n * hd;
        let carry = x.narrow(2, n * hd, width).detach().set_requires_grad(width > 0);
        let y = self.layer_parts(i, &streams, &active, &carry, batch, true);
        autograd::backward(&[&y], &[&dy.to_kind(y.kind())]).unwrap_or_else(|e| panic!("layer {i}: {e:#}"));
        let grad_or_zeros = |leaf: &Tensor| {
            let g = leaf.grad();
            if g.defined() {
                g
            } else {
                leaf.zeros_like()
            }
        };
        let ds = grad_or_zeros(&streams).contiguous();
        let _ = ds.select(2, 0).g_add_(&grad_or_zeros(&active));
        let ds = ds.view([b, t, n * hd]);
        Some(if width > 0 { Tensor::cat(&[ds, grad_or_zeros(&carry)], 2) } else { ds })
    }

    fn layer_cached(&self, i: usize, h: &Tensor, batch: &Batch, cache: &mut KvCache) -> Tensor {
        let device = h.device();
        let (b, t, _) = h.size3().unwrap_or_default();
        let (n, hd) = (self.streams(), self.config.hidden_size);
        let streams = h.narrow(2, 0, n * hd).view([b, t, n, hd]);
        let rope = self.rope(i, batch, h.kind(), device);
        let per_layer = self.per_layer_input(batch, i, device);
        let attn = &self.layers[i].self_attn;
        let owner = match self.kv[i] {
            Kv::Share { producer, .. } => producer,
            _ => i,
        };
        let new_streams = self.layer_streams(i, &streams, &streams.select(2, 0), &per_layer, false, |x| {
            let q = attn.q(x, &rope, false);
            let (k, v) = match self.kv[i] {
                Kv::Share { producer, .. } => {
                    let (k, v) = cache.get(producer).expect("the producer layer ran before its sharers");
                    (k.shallow_clone(), v.shallow_clone())
                }
                _ => {
                    let (k, v) = attn.kv(x, &rope, false);
                    cache.append(i, &k, &v, 2)
                }
            };
            let s = cache.len(owner);
            let window = self.window(i).filter(|&w| w < s);
            let plain = batch.attention_mask.is_none() && window.is_none() && (t == 1 || s == t);
            let mask = (!plain).then(|| cached_attention_mask(batch.attention_mask.as_ref(), b, t, s, window, device));
            let o = if plain && t > 1 {
                attend(&q, &k, &v, &Mask::Causal, 1.0)
            } else {
                super::blocks::attend_kv(&q, &k, &v, mask.as_ref(), false, 1.0)
            };
            attn.o_proj.forward(&o, false)
        });
        new_streams.view([b, t, n * hd])
    }

    /// AltUp collapse (streams k ≥ 1 unembedded and rescaled to stream 0's magnitude, then
    /// averaged) and the final norm: `[B, T, H]`.
    fn norm(&self, h: &Tensor) -> Tensor {
        let (b, t, _) = h.size3().unwrap_or_default();
        let (n, hd) = (self.streams(), self.config.hidden_size);
        let streams = h.narrow(2, 0, n * hd).view([b, t, n, hd]);
        let s0 = streams.select(2, 0);
        let target = magnitude(&s0);
        let mut parts = vec![s0.shallow_clone()];
        for (k, proj) in self.altup_unembed_projections.iter().enumerate() {
            parts.push(to_magnitude(&proj.forward(&streams.select(2, k as i64 + 1), false), &target));
        }
        let mean = Tensor::stack(&parts, 0).mean_dim(0, false, h.kind());
        self.norm.forward(&mean)
    }

    fn kernels(&self) -> Option<std::sync::Arc<crate::kernels::Kernels>> {
        self.kernels.clone()
    }

    fn lm_head_weight(&self) -> Tensor {
        self.embed_tokens.shallow_clone()
    }

    fn logits(&self, h_normed: &Tensor) -> Tensor {
        softcap(h_normed.linear::<Tensor>(&self.embed_tokens, None), self.config.final_logit_softcapping)
    }

    fn linears_mut(&mut self) -> Vec<(String, &mut Linear)> {
        let mut out = Vec::new();
        for (i, layer) in self.layers.iter_mut().enumerate() {
            let p = format!("{}.layers.{i}", self.prefix);
            let a = &mut layer.self_attn;
            out.push((format!("{p}.self_attn.q_proj"), &mut a.q_proj));
            if let Some(k) = a.k_proj.as_mut() {
                out.push((format!("{p}.self_attn.k_proj"), k));
            }
            if let Some(v) = a.v_proj.as_mut() {
                out.push((format!("{p}.self_attn.v_proj"), v));
            }
            out.push((format!("{p}.self_attn.o_proj"), &mut a.o_proj));
            let m = &mut layer.mlp;
            out.push((format!("{p}.mlp.gate_proj"), &mut m.gate_proj));
            out.push((format!("{p}.mlp.up_proj"), &mut m.up_proj));
            out.push((format!("{p}.mlp.down_proj"), &mut m.down_proj));
        }
        out
    }

    fn linears(&self) -> Vec<(String, &Linear)> {
        let mut out = Vec::new();
        for (i, layer) in self.layers.iter().enumerate() {
            let p = format!("{}.layers.{i}", self.prefix);
            let a = &layer.self_attn;
            out.push((format!("{p}.self_attn.q_proj"), &a.q_proj));
            if let Some(k) = a.k_proj.as_ref() {
                out.push((format!("{p}.self_attn.k_proj"), k));
            }
            if let Some(v) = a.v_proj.as_ref() {
                out.push((format!("{p}.self_attn.v_proj"), v));
            }
            out.push((format!("{p}.self_attn.o_proj"), &a.o_proj));
            let m = &layer.mlp;
            out.push((format!("{p}.mlp.gate_proj"), &m.gate_proj));
            out.push((format!("{p}.mlp.up_proj"), &m.up_proj));
            out.push((format!("{p}.mlp.down_proj"), &m.down_proj));
        }
        out
    }
}

/// Build a Gemma 3n text model (`model_type: gemma3n_text`, or `gemma3n` with a `text_config`).
pub(crate) fn load(config: Config, weights: &Weights, opts: &LoadOptions) -> Result<Gemma3n> {
    Gemma3n::load(config, weights, opts)
}
