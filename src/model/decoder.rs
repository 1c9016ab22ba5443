//! The model skeleton shared by Llama, Mistral, Qwen2 and Qwen3: embedding, pre-norm
//! decoder layers (attention + SiLU MLP), final norm and a tied or separate lm_head.
//! Families differ only in their attention block, which they supply. Generation runs the same
//! layers incrementally over a [`KvCache`].
//!
//! Reference: transformers `modeling_llama.py` (`LlamaDecoderLayer`, `LlamaModel`,
//! `LlamaForCausalLM`), docs/model-math.md §3 (tying); `cache_utils.py` (`DynamicCache.update`).

use anyhow::{Context, Result};
use tch::Tensor;

use super::blocks::{attend_eager, attend_kv, inv_freq, Loader, Mask, Mlp, RmsNorm, Rope};
use super::kv_cache::{cached_attention_mask, KvCache};
use super::linear::Linear;
use super::{Batch, CausalLm, Config};

/// Largest attention score matrix (elements, f32) the cached path computes written out
/// (64 MiB); larger prefills go through SDPA.
const EAGER_MAX_SCORES: i64 = 1 << 24;

/// A family's self-attention block.
pub(crate) trait Attention {
    /// `[B, T, H]` → `[B, T, H]` given the RoPE tables and the layer's mask.
    fn forward(&self, x: &Tensor, rope: &Rope, mask: &Mask, train: bool) -> Tensor;
    /// The projections with RoPE applied: q `[B, nh, T, d]`, k and v `[B, n_kv, T, d]`.
    fn qkv(&self, x: &Tensor, rope: &Rope, train: bool) -> (Tensor, Tensor, Tensor);
    /// `o_proj` of the attention output `[B, T, nh·d]`.
    fn out(&self, o: &Tensor, train: bool) -> Tensor;
    /// The softmax scale.
    fn scale(&self) -> f64;
    /// Attention for new tokens over layer `i`'s cached keys/values plus their own (appended to
    /// `cache`); `mask` `[B, 1, T, S]` from [`cached_attention_mask`], `None` when every key is
    /// visible to every new query (causal prefill with an empty cache, or one new token).
    fn forward_cached(&self, x: &Tensor, rope: &Rope, mask: Option<&Tensor>, i: usize, cache: &mut KvCache) -> Tensor {
        let (q, k, v) = self.qkv(x, rope, false);
        let (k, v) = cache.append(i, &k, &v, 2); // (B, n_kv, S, d)
        let (b, nh, t, _) = q.size4().unwrap_or_default();
        let s = k.size()[2];
        // Written-out attention unless the score matrix is large: S changes on every call here,
        // and a fused SDPA backend that plans per shape (cuDNN, bf16 on Hopper) would re-plan
        // each time (~50 ms per call on an H200).
        let o = if t == 1 || b * nh * t * s <= EAGER_MAX_SCORES {
            let causal = (mask.is_none() && t > 1).then(|| cached_attention_mask(None, b, t, s, None, x.device()));
            attend_eager(&q, &k, &v, mask.or(causal.as_ref()), self.scale(), None)
        } else {
            attend_kv(&q, &k, &v, mask, t > 1, self.scale())
        };
        self.out(&o, false)
    }
    /// [`Attention::forward`] for the hand-written backward (training, no adapter dropout):
    /// the output and what [`Attention::backward`] needs.
    fn forward_saving(&self, x: &Tensor, rope: &Rope, mask: &Mask) -> (Tensor, AttnSaved);
    /// The hand-written backward for input `x` and upstream `dy`: accumulates the adapters'
    /// gradients and returns `dx`.
    fn backward(&self, x: &Tensor, rope: &Rope, saved: AttnSaved, dy: &Tensor) -> Tensor;
    /// Its linears by leaf name, in module order.
    fn linears(&self) -> Vec<(&'static str, &Linear)>;
    /// Its linears by leaf name, in module order, mutably.
    fn linears_mut(&mut self) -> Vec<(&'static str, &mut Linear)>;
}

/// What a hand-written attention backward keeps from its forward.
pub(crate) struct AttnSaved {
    /// The q, k, v projections' rank-r adapter activations ([`Linear::forward_saving`]).
    pub z: [Option<Tensor>; 3],
    /// Post-RoPE q `[B, nh, T, d]`, k and v `[B, n_kv, T, d]`: autograd leaves.
    pub leaves: [Tensor; 3],
    /// The attention core's output `[B, T, nh·d]`, with a graph back to `leaves` (SDPA's own
    /// backward differentiates it).
    pub core: Tensor,
    /// Families with q/k norms (Qwen3): each norm's input `[B, T, n, d]` and its 1/rms.
    pub norm_inputs: Option<[(Tensor, Tensor); 2]>,
}

/// One pre-norm decoder layer: `h += attn(norm(h)); h += mlp(norm(h))`.
pub(crate) struct DecoderLayer<A> {
    /// `self_attn`.
    pub self_attn: A,
    /// `mlp`.
    pub mlp: Mlp,
    /// `input_layernorm`.
    pub input_layernorm: RmsNorm,
    /// `post_attention_layernorm`.
    pub post_attention_layernorm: RmsNorm,
}

impl<A: Attention> DecoderLayer<A> {
    fn forward(&self, h: &Tensor, rope: &Rope, mask: &Mask, train: bool) -> Tensor {
        let a = self.self_attn.forward(&self.input_layernorm.forward(h), rope, mask, train);
        let h = h + a;
        let m = self.mlp.forward(&self.post_attention_layernorm.forward(&h), train);
        h + m
    }

    /// The hand-written backward of [`DecoderLayer::forward`] for input `h` and upstream `dy`
    /// (fused kernels on a GPU): recomputes what it needs from `h`, accumulates the adapters'
    /// gradients, returns `dh`.
    pub fn backward(&self, h: &Tensor, rope: &Rope, mask: &Mask, dy: &Tensor) -> Tensor {
        let (ln1, ln2) = (&self.input_layernorm, &self.post_attention_layernorm);
        let (n1, rstd1) = ln1.forward_with_rstd(h);
        let (a, saved) = self.self_attn.forward_saving(&n1, rope, mask);
        let h2 = h + &a;
        drop(a);
        let (n2, rstd2) = ln2.forward_with_rstd(&h2);
        let dn2 = self.mlp.backward(&n2, dy);
        drop(n2);
        let dh2 = dy + ln2.backward(&dn2, &h2, &rstd2);
        drop((dn2, h2));
        let dn1 = self.self_attn.backward(&n1, rope, saved, &dh2);
        drop(n1);
        &dh2 + ln1.backward(&dn1, h, &rstd1)
    }

    fn forward_cached(&self, h: &Tensor, rope: &Rope, mask: Option<&Tensor>, i: usize, cache: &mut KvCache) -> Tensor {
        let a = self.self_attn.forward_cached(&self.input_layernorm.forward(h), rope, mask, i, cache);
        let h = h + a;
        let m = self.mlp.forward(&self.post_attention_layernorm.forward(&h), false);
        h + m
    }
}

/// `model.embed_tokens`, `model.layers.*`, `model.norm`, `lm_head`.
pub(crate) struct Decoder<A> {
    config: Config,
    embed_tokens: Tensor,
    layers: Vec<DecoderLayer<A>>,
    norm: RmsNorm,
    /// `None` when tied to `embed_tokens`.
    lm_head: Option<Tensor>,
    inv_freq: Tensor,
    kernels: Option<std::sync::Arc<crate::kernels::Kernels>>,
}

impl<A: Attention> Decoder<A> {
    /// Read every tensor; `attention(loader, "model.layers.i.self_attn", config)` builds a
    /// layer's attention block.
    pub fn load(
        config: Config,
        l: &Loader,
        attention: impl Fn(&Loader, &str, &Config) -> Result<A>,
    ) -> Result<Decoder<A>> {
        let eps = config.rms_norm_eps;
        let embed_tokens = l.dense("model.embed_tokens.weight")?;
        let mut layers = Vec::with_capacity(config.num_hidden_layers as usize);
        for i in 0..config.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let layer = (|| -> Result<DecoderLayer<A>> {
                Ok(DecoderLayer {
                    self_attn: attention(l, &format!("{p}.self_attn"), &config)?,
                    mlp: Mlp::load(l, &format!("{p}.mlp"), config.mlp_bias)?,
                    input_layernorm: RmsNorm::load(l, &format!("{p}.input_layernorm"), eps)?,
                    post_attention_layernorm: RmsNorm::load(l, &format!("{p}.post_attention_layernorm"), eps)?,
                })
            })()
            .with_context(|| format!("cannot load layer `{p}`"))?;
            layers.push(layer);
        }
        let norm = RmsNorm::load(l, "model.norm", eps)?;
        let lm_head = if config.tie_word_embeddings { None } else { Some(l.dense_weight("lm_head")?) };
        let inv_freq = inv_freq(&config).to_device(l.opts.device);
        Ok(Decoder { config, embed_tokens, layers, norm, lm_head, inv_freq, kernels: l.kernels.clone() })
    }
}

impl<A: Attention> CausalLm for Decoder<A> {
    fn config(&self) -> &Config {
        &self.config
    }

    fn embed(&self, batch: &Batch) -> Tensor {
        let ids = batch.input_ids.to_device(self.embed_tokens.device());
        Tensor::embedding(&self.embed_tokens, &ids, -1, false, false)
    }

    fn num_layers(&self) -> usize {
        self.layers.len()
    }

    fn layer(&self, i: usize, h: &Tensor, batch: &Batch, train: bool) -> Tensor {
        let device = h.device();
        let rope = batch.rope(&self.inv_freq, h.kind(), device).with_kernels(self.kernels.clone());
        let mask = Mask::new(batch, self.config.sliding_window, device, h.kind(), self.config.head_dim, true);
        self.layers[i].forward(h, &rope, &mask, train)
    }

    fn layer_backward(&self, i: usize, h: &Tensor, batch: &Batch, dy: &Tensor) -> Option<Tensor> {
        let layer = &self.layers[i];
        let lins = layer.self_attn.linears().into_iter().chain(layer.mlp.linears());
        if lins.into_iter().any(|(_, l)| l.lora.as_ref().is_some_and(|a| a.dropout > 0.0)) {
            return None;
        }
        let device = h.device();
        let rope = batch.rope(&self.inv_freq, h.kind(), device).with_kernels(self.kernels.clone());
        let mask = Mask::new(batch, self.config.sliding_window, device, h.kind(), self.config.head_dim, true);
        Some(layer.backward(h, &rope, &mask, dy))
    }

    fn layer_cached(&self, i: usize, h: &Tensor, batch: &Batch, cache: &mut KvCache) -> Tensor {
        let device = h.device();
        let (b, t) = (h.size()[0], h.size()[1]);
        let rope = batch.rope(&self.inv_freq, h.kind(), device).with_kernels(self.kernels.clone());
        let past = cache.len(i);
        let s = past + t;
        let window = self.config.sliding_window.filter(|&w| w < s);
        // No padding and no window: one new token sees every key, a first chunk is plainly causal.
        let plain = batch.attention_mask.is_none() && window.is_none() && (t == 1 || past == 0);
        let mask = (!plain).then(|| cached_attention_mask(batch.attention_mask.as_ref(), b, t, s, window, device));
        self.layers[i].forward_cached(h, &rope, mask.as_ref(), i, cache)
    }

    fn norm(&self, h: &Tensor) -> Tensor {
        self.norm.forward(h)
    }

    fn kernels(&self) -> Option<std::sync::Arc<crate::kernels::Kernels>> {
        self.kernels.clone()
    }

    fn lm_head_weight(&self) -> Tensor {
        self.lm_head.as_ref().unwrap_or(&self.embed_tokens).shallow_clone()
    }

    fn logits(&self, h_normed: &Tensor) -> Tensor {
        h_normed.linear::<Tensor>(self.lm_head.as_ref().unwrap_or(&self.embed_tokens), None)
    }

    fn linears_mut(&mut self) -> Vec<(String, &mut Linear)> {
        let mut out = Vec::new();
        for (i, layer) in self.layers.iter_mut().enumerate() {
            for (name, lin) in layer.self_attn.linears_mut() {
                out.push((format!("model.layers.{i}.self_attn.{name}"), lin));
            }
            for (name, lin) in layer.mlp.linears_mut() {
                out.push((format!("model.layers.{i}.mlp.{name}"), lin));
            }
        }
        out
    }

    fn linears(&self) -> Vec<(String, &Linear)> {
        let mut out = Vec::new();
        for (i, layer) in self.layers.iter().enumerate() {
            for (name, lin) in layer.self_attn.linears() {
                out.push((format!("model.layers.{i}.self_attn.{name}"), lin));
            }
            for (name, lin) in layer.mlp.linears() {
                out.push((format!("model.layers.{i}.mlp.{name}"), lin));
            }
        }
        out
    }
}
