//! The model skeleton shared by Llama, Mistral, Qwen2 and Qwen3: embedding, pre-norm
//! decoder layers (attention + SiLU MLP), final norm and a tied or separate lm_head.
//! Families differ only in their attention block, which they supply.
//!
//! Reference: transformers `modeling_llama.py` (`LlamaDecoderLayer`, `LlamaModel`,
//! `LlamaForCausalLM`), arch-spec §3 (tying).

use anyhow::{Context, Result};
use tch::Tensor;

use super::blocks::{attention_mask, inv_freq, Loader, Mlp, RmsNorm, Rope};
use super::linear::Linear;
use super::{Batch, CausalLm, Config};

/// A family's self-attention block.
pub(crate) trait Attention {
    /// `[B, T, H]` → `[B, T, H]` given the RoPE tables and the boolean mask `[B, 1, T, T]`
    /// (`None`: plain causal).
    fn forward(&self, x: &Tensor, rope: &Rope, mask: Option<&Tensor>, train: bool) -> Tensor;
    /// Its linears by leaf name, in module order.
    fn linears(&self) -> Vec<(&'static str, &Linear)>;
    /// Its linears by leaf name, in module order, mutably.
    fn linears_mut(&mut self) -> Vec<(&'static str, &mut Linear)>;
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
    fn forward(&self, h: &Tensor, rope: &Rope, mask: Option<&Tensor>, train: bool) -> Tensor {
        let a = self.self_attn.forward(&self.input_layernorm.forward(h), rope, mask, train);
        let h = h + a;
        let m = self.mlp.forward(&self.post_attention_layernorm.forward(&h), train);
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
        let inv_freq = inv_freq(&config);
        Ok(Decoder { config, embed_tokens, layers, norm, lm_head, inv_freq })
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
        let rope = Rope::new(&self.inv_freq, &batch.position_ids.to_device(device), h.kind());
        let mask = attention_mask(batch, self.config.sliding_window, device);
        self.layers[i].forward(h, &rope, mask.as_ref(), train)
    }

    fn norm(&self, h: &Tensor) -> Tensor {
        self.norm.forward(h)
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
