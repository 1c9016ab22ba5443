//! Decoder-only language models on libtorch, built layer by layer so the trainer can
//! checkpoint activations per layer.
//!
//! Reference: HF transformers `modeling_{llama,mistral,qwen2,qwen3,gemma2,gemma3,gemma3n}.py`
//! (docs/model-math.md §0–3),
//! PEFT LoRA (§5), bitsandbytes 4-bit checkpoints (§4). Module paths and tensor names equal
//! the HF checkpoint keys (`model.layers.0.self_attn.q_proj`), so load, LoRA injection,
//! merge and export map name to name.
//!
//! Files: [`config`] (config.json), [`weights`] (safetensors), [`linear`] (dense/4-bit linear +
//! LoRA), `blocks` (norm, MLP, RoPE, masks, attention core), `decoder` (the shared model
//! skeleton), the family files (`llama` for Llama, Mistral, Qwen2 and Qwen3; `gemma2` for Gemma 2
//! and 3; `gemma3n`) registered in [`family`], [`lora`], [`kv_cache`] (the per-layer K/V cache for generation), and [`open`]
//! (opening a model: compute dtype, model folder, recipe load, PEFT adapters read and written).

pub mod config;
pub mod family;
pub mod kv_cache;
pub mod linear;
pub mod lora;
pub mod open;
pub mod weights;

pub(crate) mod blocks;
mod decoder;
mod gemma2;
mod gemma3n;
mod llama;

use std::path::Path;

use anyhow::{Context, Result};
use tch::{Device, Kind, Tensor};

pub use config::{Config, RopeScaling};
pub use kv_cache::KvCache;
pub use linear::{accumulate_grad, gemm_into, Linear, Lora, Weight};
pub use weights::Weights;

/// How a checkpoint is placed in memory.
#[derive(Debug, Clone, Copy)]
pub struct LoadOptions {
    /// Compute dtype: activations and every dense weight.
    pub dtype: Kind,
    /// Where the model lives.
    pub device: Device,
    /// Quantize the decoder linears (q,k,v,o,gate,up,down) at load: (type, blocksize, double quant).
    /// Embeddings, norms and lm_head stay dense. Pre-quantized (bnb) layers stay as stored.
    pub quantize: Option<(crate::quant::QuantType, i64, bool)>,
    /// Use the CUDA kernels of `kernels/` on a CUDA device (their reference paths otherwise).
    pub cuda_kernels: bool,
}

/// Position/mask information for one batch, built once and shared by all layers.
pub struct Batch {
    /// Token ids `[B, T]` i64.
    pub input_ids: Tensor,
    /// `[B, T]`, 1 for real tokens and 0 for padding (keys at 0 are never attended to).
    pub attention_mask: Option<Tensor>,
    /// RoPE positions `[B, T]` i64.
    pub position_ids: Tensor,
    /// `[B, T]` document id for packing: attention stays within a document.
    pub seq_ids: Option<Tensor>,
    /// Per-batch constants a family derives from the ids once and reuses in every layer (and
    /// in every recomputation under checkpointing): Gemma 3n's per-layer inputs `[B, T, L, P]`.
    pub per_layer_inputs: std::cell::OnceCell<Tensor>,
    /// The batch's documents for varlen attention, made on first use ([`Batch::segments`]).
    segments: std::cell::OnceCell<(Tensor, i64)>,
    /// RoPE tables made on first use ([`Batch::rope`]).
    rope: std::cell::RefCell<Vec<RopeTables>>,
}

impl Batch {
    /// A padded batch with positions `0..T` on every row (what HF's forward uses when no
    /// `position_ids` are given).
    pub fn new(input_ids: Tensor, attention_mask: Option<Tensor>) -> Batch {
        let (b, t) = input_ids.size2().unwrap_or((1, input_ids.size()[0]));
        let position_ids = Tensor::arange(t, (Kind::Int64, input_ids.device())).unsqueeze(0).expand([b, t], true);
        Batch::at(input_ids, attention_mask, position_ids)
    }

    /// A padded batch with explicit RoPE positions `[B, T]` (e.g. new tokens after a KV cache).
    pub fn at(input_ids: Tensor, attention_mask: Option<Tensor>, position_ids: Tensor) -> Batch {
        Batch {
            input_ids,
            attention_mask,
            position_ids,
            seq_ids: None,
            per_layer_inputs: Default::default(),
            segments: Default::default(),
            rope: Default::default(),
        }
    }

    /// A packed batch: `seq_ids` `[B, T]` gives each token its document (one id per document,
    /// not reused within a row); positions restart at 0 where the id changes. No padding mask:
    /// set `attention_mask` afterwards when the row is also padded.
    pub fn packed(input_ids: Tensor, seq_ids: Tensor) -> Batch {
        let t = input_ids.size()[input_ids.dim() - 1];
        let idx = Tensor::arange(t, (Kind::Int64, input_ids.device())).unsqueeze(0).expand_as(&seq_ids);
        let prev = seq_ids.roll([1], [1]);
        let starts = seq_ids.ne_tensor(&prev);
        let _ = starts.narrow(1, 0, 1).fill_(1);
        let start_idx = idx.where_self(&starts, &idx.zeros_like()).cummax(1).0;
        let position_ids = &idx - start_idx;
        Batch {
            input_ids,
            attention_mask: None,
            position_ids,
            seq_ids: Some(seq_ids),
            per_layer_inputs: Default::default(),
            segments: Default::default(),
            rope: Default::default(),
        }
    }

    /// RoPE's tables for this batch's positions and `inv_freq`, in `kind` on `device`: made once
    /// per (`inv_freq`, kind, device) and shared by every layer and recomputation. `inv_freq` is
    /// told by its storage (address and length), so Gemma's local and global frequencies, or two
    /// models run on one batch (the export's merge check runs the reference and the merged
    /// model), never share tables unless they share frequencies. Without
    /// it each layer and each recomputation copied the positions to the device and made the
    /// tables again, seven small kernels per pass.
    pub(crate) fn rope(&self, inv_freq: &Tensor, kind: Kind, device: Device) -> blocks::Rope {
        let freq = (inv_freq.data_ptr() as usize, inv_freq.numel());
        let hit = |r: &RopeTables| r.0 == freq && r.1 == kind && r.2 == device;
        if let Some((.., cos, sin)) = self.rope.borrow().iter().find(|r| hit(r)) {
            return blocks::Rope { cos: cos.shallow_clone(), sin: sin.shallow_clone(), kernels: None };
        }
        let r = blocks::Rope::new(inv_freq, &self.position_ids.to_device(device), kind);
        self.rope.borrow_mut().push((freq, kind, device, r.cos.shallow_clone(), r.sin.shallow_clone()));
        r
    }

    /// The documents of the batch for varlen attention ([`crate::kernels::varlen::segments`]):
    /// a token's key is its `seq_ids` document (0 without packing), or a padding key where
    /// `attention_mask` is 0, so padding is a document of its own that no real token sees.
    /// `cu_seqlens` (int32 on `device`) and the longest document; computed once per batch (one
    /// copy of the ids to the host), then shared by every layer and recomputation.
    pub fn segments(&self, device: Device) -> (Tensor, i64) {
        let (cu, longest) = self.segments.get_or_init(|| {
            let (b, t) = self.input_ids.size2().unwrap_or((1, self.input_ids.size()[0]));
            let host = |x: &Tensor| {
                Vec::<i64>::try_from(x.to_device(Device::Cpu).to_kind(Kind::Int64).reshape([-1])).unwrap_or_default()
            };
            let mut keys = self.seq_ids.as_ref().map_or_else(|| vec![0; (b * t) as usize], host);
            if let Some(m) = &self.attention_mask {
                for (k, m) in keys.iter_mut().zip(host(m)) {
                    if m == 0 {
                        *k = i64::MIN;
                    }
                }
            }
            let (cu, longest) = crate::kernels::varlen::segments(&keys, b as usize, t as usize);
            (Tensor::from_slice(&cu).to_device(device), longest)
        });
        (cu.shallow_clone(), *longest)
    }
}

/// One batch's RoPE tables: ((inv_freq's address, length), dtype, device, cos, sin).
type RopeTables = ((usize, usize), Kind, Device, Tensor, Tensor);

/// A causal LM, layer-wise.
pub trait CausalLm {
    /// The normalized config.
    fn config(&self) -> &Config;
    /// Token embeddings `[B, T, H]` in the compute dtype.
    fn embed(&self, batch: &Batch) -> Tensor;
    /// Decoder layer count.
    fn num_layers(&self) -> usize;
    /// Decoder layer `i`: `[B, T, H]` → `[B, T, H]`. `train` enables LoRA dropout.
    fn layer(&self, i: usize, h: &Tensor, batch: &Batch, train: bool) -> Tensor;
    /// The hand-written backward of [`CausalLm::layer`] in training for input `h` and upstream
    /// gradient `dy`: accumulates the adapters' gradients and returns `dh`, recomputing what it
    /// needs from `h`. `None` when the family has none or it does not apply (adapter dropout);
    /// the caller then differentiates [`CausalLm::layer`] with autograd.
    fn layer_backward(&self, _i: usize, _h: &Tensor, _batch: &Batch, _dy: &Tensor) -> Option<Tensor> {
        None
    }
    /// The final norm.
    fn norm(&self, h: &Tensor) -> Tensor;
    /// The output projection `[V, H]` (the embedding table when tied).
    fn lm_head_weight(&self) -> Tensor;
    /// `h·Wᵀ` `[B, T, V]` in the compute dtype (plus the final softcap, if the family has one).
    /// Must equal `softcap(h·lm_head_weightᵀ, logit_softcap)`: the training loss computes the
    /// logits and their gradient from those two (train/step.rs).
    fn logits(&self, h_normed: &Tensor) -> Tensor;
    /// The final logit softcap `c` (logits `c·tanh(l/c)`), if any.
    fn logit_softcap(&self) -> Option<f64> {
        self.config().final_logit_softcapping
    }
    /// The CUDA kernels this model was loaded with (`None` on a CPU or with them off).
    fn kernels(&self) -> Option<std::sync::Arc<crate::kernels::Kernels>> {
        None
    }
    /// Embed → layers → norm → logits, no dropout: `[B, T, V]`.
    fn forward(&self, batch: &Batch) -> Tensor {
        let mut h = self.embed(batch);
        for i in 0..self.num_layers() {
            h = self.layer(i, &h, batch, false);
        }
        self.logits(&self.norm(&h))
    }
    /// Decoder layer `i` for new tokens with a KV cache (inference: no dropout). `h` `[B, T, H]`
    /// holds the new tokens only; `batch.position_ids` `[B, T]` are their RoPE positions and
    /// `batch.attention_mask` `[B, S]` covers all cached + new keys (S = `cache.len(i)` + T; 0 on
    /// left padding; `None`: every key is real). Appends this layer's state for the new tokens to
    /// `cache`. Packing (`seq_ids`) is not supported here.
    ///
    /// The default recomputes the layer over all cached inputs (correct for any family, O(S) per
    /// token); the built-in families override it with a real K/V cache.
    fn layer_cached(&self, i: usize, h: &Tensor, batch: &Batch, cache: &mut KvCache) -> Tensor {
        let (b, t) = (h.size()[0], h.size()[1]);
        let device = h.device();
        let positions = batch.position_ids.to_device(device);
        let (h_all, pos_all) = cache.append(i, h, &positions, 1);
        let s = h_all.size()[1];
        let full = Batch::at(
            Tensor::zeros([b, s], (Kind::Int64, device)),
            batch.attention_mask.as_ref().map(Tensor::shallow_clone),
            pos_all,
        );
        self.layer(i, &h_all, &full, false).narrow(1, s - t, t)
    }
    /// Embed → layers with the cache ([`CausalLm::layer_cached`]) → norm → logits of the new
    /// tokens `[B, T, V]`.
    fn forward_cached(&self, batch: &Batch, cache: &mut KvCache) -> Tensor {
        let mut h = self.embed(batch);
        for i in 0..self.num_layers() {
            h = self.layer_cached(i, &h, batch, cache);
        }
        self.logits(&self.norm(&h))
    }
    /// Every linear by its HF module path (e.g. `model.layers.0.self_attn.q_proj`), in
    /// module order; lm_head is not among them.
    fn linears_mut(&mut self) -> Vec<(String, &mut Linear)>;
    /// Every linear by its HF module path, in module order.
    fn linears(&self) -> Vec<(String, &Linear)>;
}

/// Replace every 4-bit weight by its dequantized values in `kind`: the same numbers every
/// forward would compute, dequantized once (for inference passes that fit in memory).
pub fn dequantize_linears(model: &mut dyn CausalLm, kind: Kind) {
    for (_, lin) in model.linears_mut() {
        if let Weight::Quant(q) = &lin.weight {
            lin.weight = Weight::Dense(q.dequantize(kind));
        }
    }
}

/// Load an HF model folder (config.json + safetensors, dense or bnb-4bit).
pub fn load(dir: &Path, opts: &LoadOptions) -> Result<Box<dyn CausalLm>> {
    load_dir(dir, opts).with_context(|| format!("cannot load model {}", dir.display()))
}

fn load_dir(dir: &Path, opts: &LoadOptions) -> Result<Box<dyn CausalLm>> {
    let config = Config::from_dir(dir)?;
    let mut weights = Weights::open(dir)?;
    weights.track(&format!("load {}", dir.file_name().map(|n| n.to_string_lossy()).unwrap_or_default()));
    let Some(fam) = family::by_model_type(&config.model_type) else {
        anyhow::bail!("model type `{}` is not supported; supported: {}", config.model_type, family::names());
    };
    let model = (fam.load)(config, &weights, opts)?;
    // A multimodal checkpoint's other towers are not read by the text decoder.
    let (_, stored) = gemma2::decoder_prefix(&weights);
    let towers = weights
        .names()
        .into_iter()
        .filter(|n| !n.starts_with(&format!("{stored}.")) && !n.starts_with("lm_head.") && weights.ignore(n))
        .count();
    if towers > 0 {
        log::info!("{towers} tensors outside the text decoder (vision/audio towers) were skipped");
    }
    weights.finish();
    let tied = model.config().tie_word_embeddings;
    let expected_unused = |n: &str| n.ends_with("rotary_emb.inv_freq") || (tied && n == "lm_head.weight");
    let unused: Vec<String> = weights.unused().into_iter().filter(|n| !expected_unused(n)).collect();
    if !unused.is_empty() {
        log::warn!("{} tensors of {} were not used: {}", unused.len(), dir.display(), unused.join(", "));
    }
    Ok(model)
}
