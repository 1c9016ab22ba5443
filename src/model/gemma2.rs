//! Gemma 2 text decoder, whose layer also serves Gemma 3 (see `gemma3`): the (1 + w) RMSNorm
//! with the product taken before the downcast, the √hidden embedding scale rounded to the
//! compute dtype, GeGLU (tanh gelu), pre- and post-norms around both attention and MLP,
//! `query_pre_attn_scalar`, sliding and full layers per `layer_types`, attention-score
//! softcapping (written-out attention: SDPA cannot softcap) and final logit softcapping.
//!
//! Reference: transformers `models/gemma2/modeling_gemma2.py` (`Gemma2RMSNorm`, `Gemma2MLP`,
//! `Gemma2Attention`, `Gemma2DecoderLayer`, `Gemma2ForCausalLM`) and docs/model-math.md §0, §2.

use anyhow::{Context, Result};
use tch::{Device, Kind, Tensor};

use super::blocks::{attend, attend_eager, inv_freq, Loader, Mask, Rope};
use super::config::RopeScaling;
use super::kv_cache::{cached_attention_mask, KvCache};
use super::linear::Linear;
use super::{Batch, CausalLm, Config, LoadOptions, Weights};

/// Gemma RMSNorm: `(x_f32 · rsqrt(mean(x²) + eps) · (1 + w_f32)).to(D)`.
pub(crate) struct GemmaRmsNorm {
    /// `1 + weight`, f32.
    scale: Tensor,
    eps: f64,
    kernels: Option<std::sync::Arc<crate::kernels::Kernels>>,
}

impl GemmaRmsNorm {
    /// Read `<prefix>.weight`.
    pub fn load(l: &Loader, prefix: &str, eps: f64) -> Result<GemmaRmsNorm> {
        let name = format!("{prefix}.weight");
        let w = l.weights.get(&l.key(&name))?.to_device(l.opts.device).to_kind(Kind::Float);
        Ok(GemmaRmsNorm { scale: (w + 1.0).set_requires_grad(false), eps, kernels: l.kernels.clone() })
    }

    /// Normalize over the last dimension (the fused kernel when no gradient is needed on a GPU).
    pub fn forward(&self, x: &Tensor) -> Tensor {
        crate::kernels::rms_norm::forward(
            x,
            Some(&self.scale),
            self.eps,
            crate::kernels::rms_norm::Mode::Scale,
            self.kernels.as_deref(),
        )
    }
}

/// `down_proj(gelu_tanh(gate_proj(x)) · up_proj(x))`.
pub(crate) struct GegluMlp {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
}

impl GegluMlp {
    fn load(l: &Loader, prefix: &str) -> Result<GegluMlp> {
        Ok(GegluMlp {
            gate_proj: l.linear(&format!("{prefix}.gate_proj"), false)?,
            up_proj: l.linear(&format!("{prefix}.up_proj"), false)?,
            down_proj: l.linear(&format!("{prefix}.down_proj"), false)?,
        })
    }

    fn forward(&self, x: &Tensor, train: bool) -> Tensor {
        let g = self.gate_proj.forward(x, train);
        let u = self.up_proj.forward(x, train);
        let k = self.gate_proj.kernels.as_ref();
        self.down_proj.forward(&crate::kernels::glu::forward(&g, &u, crate::kernels::glu::Act::GeluTanh, k), train)
    }
}

/// `self_attn`: GQA with optional per-head q/k norms (Gemma 3), scale `query_pre_attn_scalar^-½`
/// and optional score softcapping (Gemma 2).
pub(crate) struct GemmaAttention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    q_norm: Option<GemmaRmsNorm>,
    k_norm: Option<GemmaRmsNorm>,
    num_heads: i64,
    num_kv_heads: i64,
    head_dim: i64,
    scale: f64,
    softcap: Option<f64>,
}

impl GemmaAttention {
    fn load(l: &Loader, prefix: &str, cfg: &Config, qk_norm: bool) -> Result<GemmaAttention> {
        let norm = |n: &str| GemmaRmsNorm::load(l, &format!("{prefix}.{n}"), cfg.rms_norm_eps);
        Ok(GemmaAttention {
            q_proj: l.linear(&format!("{prefix}.q_proj"), cfg.qkv_bias)?,
            k_proj: l.linear(&format!("{prefix}.k_proj"), cfg.qkv_bias)?,
            v_proj: l.linear(&format!("{prefix}.v_proj"), cfg.qkv_bias)?,
            o_proj: l.linear(&format!("{prefix}.o_proj"), cfg.o_bias)?,
            q_norm: if qk_norm { Some(norm("q_norm")?) } else { None },
            k_norm: if qk_norm { Some(norm("k_norm")?) } else { None },
            num_heads: cfg.num_attention_heads,
            num_kv_heads: cfg.num_key_value_heads,
            head_dim: cfg.head_dim,
            scale: cfg.query_pre_attn_scalar.unwrap_or(cfg.head_dim as f64).powf(-0.5),
            softcap: cfg.attn_logit_softcapping,
        })
    }

    /// q `[B, nh, T, d]`, k and v `[B, n_kv, T, d]`, norms and RoPE applied.
    fn qkv(&self, x: &Tensor, rope: &Rope, train: bool) -> (Tensor, Tensor, Tensor) {
        let (b, t) = (x.size()[0], x.size()[1]);
        let heads = |y: Tensor, n: i64, norm: &Option<GemmaRmsNorm>| {
            let y = y.view([b, t, n, self.head_dim]);
            let y = match norm {
                Some(nm) => nm.forward(&y),
                None => y,
            };
            y.transpose(1, 2)
        };
        let q = heads(self.q_proj.forward(x, train), self.num_heads, &self.q_norm);
        let k = heads(self.k_proj.forward(x, train), self.num_kv_heads, &self.k_norm);
        let v = heads(self.v_proj.forward(x, train), self.num_kv_heads, &None);
        (rope.apply(&q), rope.apply(&k), v)
    }

    fn forward(&self, x: &Tensor, rope: &Rope, mask: &Mask, train: bool) -> Tensor {
        let (q, k, v) = self.qkv(x, rope, train);
        let o = match self.softcap {
            None => attend(&q, &k, &v, mask, self.scale),
            Some(_) => {
                let (b, t) = (x.size()[0], x.size()[1]);
                let mask = mask.dense();
                let causal = mask.is_none().then(|| cached_attention_mask(None, b, t, t, None, x.device()));
                attend_eager(&q, &k, &v, mask.or(causal.as_ref()), self.scale, self.softcap)
            }
        };
        self.o_proj.forward(&o, train)
    }

    fn forward_cached(&self, x: &Tensor, rope: &Rope, mask: Option<&Tensor>, i: usize, cache: &mut KvCache) -> Tensor {
        let (q, k, v) = self.qkv(x, rope, false);
        let (k, v) = cache.append(i, &k, &v, 2);
        let (b, t) = (x.size()[0], x.size()[1]);
        let s = k.size()[2];
        let causal = (mask.is_none() && t > 1).then(|| cached_attention_mask(None, b, t, s, None, x.device()));
        let o = attend_eager(&q, &k, &v, mask.or(causal.as_ref()), self.scale, self.softcap);
        self.o_proj.forward(&o, false)
    }
}

/// `h += post_attention_layernorm(attn(input_layernorm(h)));
///  h += post_feedforward_layernorm(mlp(pre_feedforward_layernorm(h)))`.
pub(crate) struct GemmaLayer {
    self_attn: GemmaAttention,
    mlp: GegluMlp,
    input_layernorm: GemmaRmsNorm,
    post_attention_layernorm: GemmaRmsNorm,
    pre_feedforward_layernorm: GemmaRmsNorm,
    post_feedforward_layernorm: GemmaRmsNorm,
}

impl GemmaLayer {
    fn residual_mlp(&self, h: &Tensor, train: bool) -> Tensor {
        let m = self.mlp.forward(&self.pre_feedforward_layernorm.forward(h), train);
        h + self.post_feedforward_layernorm.forward(&m)
    }
}

/// Where the text decoder lives in a checkpoint: its module path (what PEFT and the merged
/// export name) and the key prefix it is stored under.
pub(crate) fn decoder_prefix(weights: &Weights) -> (&'static str, &'static str) {
    if weights.contains("model.language_model.embed_tokens.weight") {
        ("model.language_model", "model.language_model")
    } else if weights.contains("language_model.model.embed_tokens.weight") {
        ("model.language_model", "language_model.model")
    } else {
        ("model", "model")
    }
}

/// The Gemma 2 / Gemma 3 text decoder.
pub(crate) struct Gemma {
    config: Config,
    /// Module path of the decoder (`model`, or `model.language_model` in a multimodal checkpoint).
    prefix: String,
    embed_tokens: Tensor,
    layers: Vec<GemmaLayer>,
    norm: GemmaRmsNorm,
    lm_head: Option<Tensor>,
    /// RoPE of full-attention layers (`rope_theta` + `rope_scaling`).
    inv_freq: Tensor,
    /// RoPE of sliding layers (Gemma 3's local base, default type); Gemma 2 uses `inv_freq`.
    inv_freq_local: Tensor,
}

impl Gemma {
    /// Read every tensor; `qk_norm` adds Gemma 3's q/k norms.
    pub fn load(config: Config, weights: &Weights, opts: &LoadOptions, qk_norm: bool) -> Result<Gemma> {
        let (prefix, stored) = decoder_prefix(weights);
        let l = Loader::new(weights, opts).with_alias(prefix, stored);
        let eps = config.rms_norm_eps;
        let embed_tokens = l.dense(&format!("{prefix}.embed_tokens.weight"))?;
        let mut layers = Vec::with_capacity(config.num_hidden_layers as usize);
        for i in 0..config.num_hidden_layers {
            let p = format!("{prefix}.layers.{i}");
            let norm = |n: &str| GemmaRmsNorm::load(&l, &format!("{p}.{n}"), eps);
            let layer = (|| -> Result<GemmaLayer> {
                Ok(GemmaLayer {
                    self_attn: GemmaAttention::load(&l, &format!("{p}.self_attn"), &config, qk_norm)?,
                    mlp: GegluMlp::load(&l, &format!("{p}.mlp"))?,
                    input_layernorm: norm("input_layernorm")?,
                    post_attention_layernorm: norm("post_attention_layernorm")?,
                    pre_feedforward_layernorm: norm("pre_feedforward_layernorm")?,
                    post_feedforward_layernorm: norm("post_feedforward_layernorm")?,
                })
            })()
            .with_context(|| format!("cannot load layer `{p}`"))?;
            layers.push(layer);
        }
        let norm = GemmaRmsNorm::load(&l, &format!("{prefix}.norm"), eps)?;
        let lm_head = if config.tie_word_embeddings { None } else { Some(l.dense_weight("lm_head")?) };
        let inv = inv_freq(&config).to_device(opts.device);
        let inv_local = match config.rope_local_theta {
            Some(theta) => {
                let local = Config { rope_theta: theta, rope_scaling: RopeScaling::None, ..config.clone() };
                inv_freq(&local).to_device(opts.device)
            }
            None => inv.shallow_clone(),
        };
        Ok(Gemma {
            config,
            prefix: prefix.to_string(),
            embed_tokens,
            layers,
            norm,
            lm_head,
            inv_freq: inv,
            inv_freq_local: inv_local,
        })
    }

    fn rope(&self, i: usize, batch: &Batch, kind: Kind, device: Device) -> Rope {
        let sliding = self.config.is_sliding(i);
        batch.rope(if sliding { &self.inv_freq_local } else { &self.inv_freq }, kind, device)
    }

    fn window(&self, i: usize) -> Option<i64> {
        if self.config.is_sliding(i) {
            self.config.sliding_window
        } else {
            None
        }
    }
}

/// `x · (√hidden rounded to x's dtype)`: Gemma's embedding normalizer.
pub(crate) fn embed_scale(hidden: i64, kind: Kind) -> f64 {
    Tensor::from((hidden as f64).sqrt()).to_kind(kind).to_kind(Kind::Double).double_value(&[])
}

/// `tanh(x / c) · c` when capped.
pub(crate) fn softcap(x: Tensor, cap: Option<f64>) -> Tensor {
    match cap {
        Some(c) => (x / c).tanh() * c,
        None => x,
    }
}

impl CausalLm for Gemma {
    fn config(&self) -> &Config {
        &self.config
    }

    fn embed(&self, batch: &Batch) -> Tensor {
        let ids = batch.input_ids.to_device(self.embed_tokens.device());
        let e = Tensor::embedding(&self.embed_tokens, &ids, -1, false, false);
        let s = embed_scale(self.config.hidden_size, e.kind());
        e * s
    }

    fn num_layers(&self) -> usize {
        self.layers.len()
    }

    fn layer(&self, i: usize, h: &Tensor, batch: &Batch, train: bool) -> Tensor {
        let device = h.device();
        let rope = self.rope(i, batch, h.kind(), device);
        // Softcapped attention is written out over the boolean mask (flash cannot softcap).
        let varlen = self.config.attn_logit_softcapping.is_none();
        let mask = Mask::new(batch, self.window(i), device, h.kind(), self.config.head_dim, varlen);
        let layer = &self.layers[i];
        let a = layer.self_attn.forward(&layer.input_layernorm.forward(h), &rope, &mask, train);
        let h = h + layer.post_attention_layernorm.forward(&a);
        layer.residual_mlp(&h, train)
    }

    fn layer_cached(&self, i: usize, h: &Tensor, batch: &Batch, cache: &mut KvCache) -> Tensor {
        let device: Device = h.device();
        let (b, t) = (h.size()[0], h.size()[1]);
        let rope = self.rope(i, batch, h.kind(), device);
        let past = cache.len(i);
        let s = past + t;
        let window = self.window(i).filter(|&w| w < s);
        let plain = batch.attention_mask.is_none() && window.is_none() && (t == 1 || past == 0);
        let mask = (!plain).then(|| cached_attention_mask(batch.attention_mask.as_ref(), b, t, s, window, device));
        let layer = &self.layers[i];
        let a = layer.self_attn.forward_cached(&layer.input_layernorm.forward(h), &rope, mask.as_ref(), i, cache);
        let h = h + layer.post_attention_layernorm.forward(&a);
        layer.residual_mlp(&h, false)
    }

    fn norm(&self, h: &Tensor) -> Tensor {
        self.norm.forward(h)
    }

    fn kernels(&self) -> Option<std::sync::Arc<crate::kernels::Kernels>> {
        self.norm.kernels.clone()
    }

    fn lm_head_weight(&self) -> Tensor {
        self.lm_head.as_ref().unwrap_or(&self.embed_tokens).shallow_clone()
    }

    fn logits(&self, h_normed: &Tensor) -> Tensor {
        let l = h_normed.linear::<Tensor>(self.lm_head.as_ref().unwrap_or(&self.embed_tokens), None);
        softcap(l, self.config.final_logit_softcapping)
    }

    fn linears_mut(&mut self) -> Vec<(String, &mut Linear)> {
        let mut out = Vec::new();
        for (i, layer) in self.layers.iter_mut().enumerate() {
            let p = format!("{}.layers.{i}", self.prefix);
            let a = &mut layer.self_attn;
            let m = &mut layer.mlp;
            for (name, lin) in [
                ("self_attn.q_proj", &mut a.q_proj),
                ("self_attn.k_proj", &mut a.k_proj),
                ("self_attn.v_proj", &mut a.v_proj),
                ("self_attn.o_proj", &mut a.o_proj),
                ("mlp.gate_proj", &mut m.gate_proj),
                ("mlp.up_proj", &mut m.up_proj),
                ("mlp.down_proj", &mut m.down_proj),
            ] {
                out.push((format!("{p}.{name}"), lin));
            }
        }
        out
    }

    fn linears(&self) -> Vec<(String, &Linear)> {
        let mut out = Vec::new();
        for (i, layer) in self.layers.iter().enumerate() {
            let p = format!("{}.layers.{i}", self.prefix);
            let (a, m) = (&layer.self_attn, &layer.mlp);
            for (name, lin) in [
                ("self_attn.q_proj", &a.q_proj),
                ("self_attn.k_proj", &a.k_proj),
                ("self_attn.v_proj", &a.v_proj),
                ("self_attn.o_proj", &a.o_proj),
                ("mlp.gate_proj", &m.gate_proj),
                ("mlp.up_proj", &m.up_proj),
                ("mlp.down_proj", &m.down_proj),
            ] {
                out.push((format!("{p}.{name}"), lin));
            }
        }
        out
    }
}

/// Build a Gemma 2 model (`model_type: gemma2`).
pub(crate) fn load(config: Config, weights: &Weights, opts: &LoadOptions) -> Result<Gemma> {
    Gemma::load(config, weights, opts, false)
}
