//! `tuner plan RECIPE` (also `tuner run --dry-run`): a memory estimate made
//! before anything is allocated, per component, so an out-of-memory failure can
//! be seen coming. It reads only the model's shape (config.json, or the GGUF
//! header) and the recipe.
//!
//! Counted: base weights (4-bit codes and absmax for quantized linears, the
//! compute dtype for embeddings, norms and lm_head), LoRA weights, their
//! gradients and optimizer states, the per-layer inputs kept by activation
//! checkpointing (or every layer's activations without it), the working set of
//! one layer during recompute and backward (attention scores included), one
//! dequantized weight, the cross-entropy chunk, and the runtime itself. For Gemma 3n also the
//! AltUp/LAuReL/per-layer-input weights, the N-stream layer inputs (plus the carried shared K/V),
//! the per-batch per-layer inputs, and the per-layer embedding table, which stays in host
//! memory (listed apart from a GPU's total), as do offloaded layer inputs. On a GPU the layer
//! working set depends on the backward (hand-written or autograd); its factor is fitted to the
//! allocator peaks measured on an H200 (docs/benchmarks.md), which tests/plan.rs checks.

use crate::recipe::{QuantMethod, Recipe, Switch};
use crate::train::optim::AdamW;
use anyhow::{bail, Result};
use serde::Serialize;
use std::path::Path;

/// The dimensions the estimate needs.
#[derive(Debug, Clone, Serialize)]
pub struct Shape {
    pub layers: i64,
    pub hidden: i64,
    pub intermediate: i64,
    pub heads: i64,
    pub kv_heads: i64,
    pub head_dim: i64,
    pub vocab: i64,
    pub tied: bool,
    /// AltUp streams carried between layers (Gemma 3n: 4; else 1).
    #[serde(default)]
    pub streams: i64,
    /// Gemma 3n: (vocab_size_per_layer_input, hidden_size_per_layer_input, laurel_rank, KV-shared layers).
    #[serde(default)]
    pub gemma3n: Option<(i64, i64, i64, i64)>,
    /// Attention scores are written out (Gemma 2's softcap), even where SDPA's fused kernels exist.
    #[serde(default)]
    pub eager_attention: bool,
    /// The family has a hand-written layer backward (Llama, Mistral, Qwen2, Qwen3), which the
    /// CUDA fast path uses instead of autograd.
    #[serde(default)]
    pub hand_backward: bool,
    /// q/k/v and gate/up are fused linears (`qkv_proj`, `gate_up_proj`: Phi-3).
    #[serde(default)]
    pub fused: bool,
}

impl Shape {
    /// From an HF folder's config.json.
    pub fn from_dir(dir: &Path) -> Result<Shape> {
        let c = crate::model::Config::from_dir(dir)?;
        let family = crate::model::family::by_model_type(&c.model_type);
        Ok(Shape {
            layers: c.num_hidden_layers,
            hidden: c.hidden_size,
            intermediate: c.intermediate_size,
            heads: c.num_attention_heads,
            kv_heads: c.num_key_value_heads,
            head_dim: c.head_dim,
            vocab: c.vocab_size,
            tied: c.tie_word_embeddings,
            streams: c.gemma3n.as_ref().map_or(1, |g| g.altup_num_inputs),
            gemma3n: c.gemma3n.as_ref().map(|g| {
                (g.vocab_size_per_layer_input, g.hidden_size_per_layer_input, g.laurel_rank, g.num_kv_shared_layers)
            }),
            eager_attention: c.attn_logit_softcapping.is_some(),
            hand_backward: family.is_some_and(|f| f.hand_backward),
            fused: family.is_some_and(|f| f.linears.contains(&"qkv_proj")),
        })
    }

    /// From a GGUF file's header.
    pub fn from_gguf(path: &Path) -> Result<Shape> {
        let g = crate::gguf::GgufFile::open(path)?;
        let p = crate::gguf::import::file_params(&g)?;
        Ok(Shape {
            layers: p.num_hidden_layers as i64,
            hidden: p.hidden_size as i64,
            intermediate: p.intermediate_size as i64,
            heads: p.num_attention_heads as i64,
            kv_heads: p.num_key_value_heads as i64,
            head_dim: p.head_dim as i64,
            vocab: p.vocab_size as i64,
            tied: p.tie_word_embeddings,
            streams: 1,
            gemma3n: None,
            eager_attention: false,
            hand_backward: true,
            fused: false,
        })
    }

    /// (name, in, out) of each decoder linear of one layer.
    pub fn linears(&self) -> Vec<(&'static str, i64, i64)> {
        let (h, i, q, kv) = (self.hidden, self.intermediate, self.heads * self.head_dim, self.kv_heads * self.head_dim);
        if self.fused {
            return vec![
                ("qkv_proj", h, q + 2 * kv),
                ("o_proj", q, h),
                ("gate_up_proj", h, 2 * i),
                ("down_proj", i, h),
            ];
        }
        vec![
            ("q_proj", h, q),
            ("k_proj", h, kv),
            ("v_proj", h, kv),
            ("o_proj", q, h),
            ("gate_proj", h, i),
            ("up_proj", h, i),
            ("down_proj", i, h),
        ]
    }
}

/// One line of the estimate.
#[derive(Debug, Clone, Serialize)]
pub struct Item {
    pub component: String,
    pub bytes: u64,
    pub note: String,
}

/// The estimate. Loading and training peak at different times: the expected
/// peak is the larger of the two sums.
#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    pub device: String,
    pub shape: Shape,
    /// Resident while training.
    pub items: Vec<Item>,
    /// Resident only while loading (on top of the runtime and the base weights).
    pub load_items: Vec<Item>,
    /// In host memory while the model trains on a GPU (not part of the GPU total).
    pub host_items: Vec<Item>,
    pub train_bytes: u64,
    pub load_bytes: u64,
    /// max(train, load): the expected peak.
    pub total_bytes: u64,
    /// `train.coalesce` decided: the step's rows run as packed passes of at most this many
    /// tokens (`None`: micro-batch by micro-batch).
    pub coalesce_tokens: Option<u64>,
    /// `train.offload_activations` decided ([`auto_offload`] for "auto"): the checkpointed layer
    /// inputs live in pinned host memory.
    pub offload_activations: bool,
}

/// `train.offload_activations = "auto"`: offload the checkpointed layer inputs wherever that is
/// possible (CUDA with gradient checkpointing) and they take at most half of the host memory
/// available now. On the H200 it cost 0.5% of tokens/s on the Llama-3.1-8B shape at 2048 × 2 and
/// took its peak from 7.52 to 6.61 GiB (docs/benchmarks.md), so it is on by default.
pub fn auto_offload(offloaded_bytes: u64, host_available: Option<u64>) -> bool {
    host_available.is_some_and(|a| offloaded_bytes.saturating_mul(2) <= a)
}

fn dtype_bytes(k: tch::Kind) -> i64 {
    match k {
        tch::Kind::Float => 4,
        _ => 2,
    }
}

/// Resident bytes of this process now (the runtime baseline on CPU).
fn current_rss() -> u64 {
    crate::device_mem::rss_bytes().1
}

/// The estimate's context: the recipe, the model's shape and the batch.
struct Ctx<'a> {
    r: &'a Recipe,
    s: &'a Shape,
    device: tch::Device,
    /// Bytes per element of the compute dtype.
    dt: i64,
    b: i64,
    seq: i64,
    tokens: i64,
}

/// Items on the device (or in RAM on the CPU) and in pinned host memory.
#[derive(Default)]
struct Items {
    items: Vec<Item>,
    host: Vec<Item>,
}

impl Items {
    fn add(&mut self, c: &str, bytes: i64, note: String) {
        self.items.push(Item { component: c.into(), bytes: bytes.max(0) as u64, note });
    }
}

/// The shape of `model` (an HF folder or a `.gguf` file) and the bytes of its checkpoint files.
fn model_shape(model: &Path) -> Result<(Shape, u64)> {
    if model.extension().is_some_and(|e| e == "gguf") {
        let s = Shape::from_gguf(model)?;
        // The import writes f32 safetensors.
        let params = s.layers * s.linears().iter().map(|(_, i, o)| i * o).sum::<i64>()
            + s.vocab * s.hidden * if s.tied { 1 } else { 2 };
        return Ok((s, 4 * params as u64));
    }
    let bytes = std::fs::read_dir(model)
        .map(|rd| {
            rd.flatten()
                .filter(|e| e.path().extension().is_some_and(|x| x == "safetensors"))
                // fs::metadata follows the symlinks of a hub cache snapshot.
                .filter_map(|e| std::fs::metadata(e.path()).ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0);
    Ok((Shape::from_dir(model)?, bytes))
}

/// Build the estimate for a recipe whose base model is `model`: an HF folder or a `.gguf` file
/// (for a hub source, the folder the fetch stage downloaded: `stages::fetch::model_path`).
pub fn estimate(r: &Recipe, model: &Path) -> Result<Plan> {
    let (shape, file_bytes) = model_shape(model)?;
    let device = r.train.device.resolve();
    let dt = dtype_bytes(crate::model::open::compute_kind(r.model.dtype, device));
    let (b, seq) = (r.train.micro_batch_size as i64, r.train.max_seq_length as i64);
    let c = Ctx { r, s: &shape, device, dt, b, seq, tokens: b * seq };
    let mut out = Items::default();
    weights(&c, &mut out);
    adapters(&c, &mut out);
    let (coalesce_tokens, offload_activations) = activations(&c, &mut out);
    let widest = shape.linears().iter().map(|(_, i, o)| i * o).max().unwrap_or(0);
    transients(&c, widest, &mut out);
    let Items { items, host: host_items } = out;
    // Loading: the checkpoint is memory-mapped and every page is read once; with
    // quantize-at-load one dense tensor at a time is copied out and quantized.
    let mut load_items = vec![Item {
        component: "checkpoint files (memory-mapped)".into(),
        bytes: file_bytes,
        note: "read once while loading".into(),
    }];
    if !matches!(r.quantization.method, QuantMethod::None) {
        load_items.push(Item {
            component: "one dense weight being quantized".into(),
            bytes: (3 * widest * 4) as u64,
            note: "transient".into(),
        });
    }
    let train_bytes: u64 = items.iter().map(|i| i.bytes).sum();
    let resident_at_load: u64 = items
        .iter()
        .filter(|i| {
            i.component.starts_with("base")
                || i.component.starts_with("embeddings")
                || i.component.starts_with("runtime")
                || i.component.starts_with("CUDA")
        })
        .map(|i| i.bytes)
        .sum();
    let load_bytes = resident_at_load + load_items.iter().map(|i| i.bytes).sum::<u64>();
    if train_bytes == 0 {
        bail!("empty estimate");
    }
    Ok(Plan {
        device: format!("{device:?}"),
        shape,
        items,
        load_items,
        host_items,
        train_bytes,
        load_bytes,
        total_bytes: train_bytes.max(load_bytes),
        coalesce_tokens,
        offload_activations,
    })
}

/// Base weights: the linears (4-bit or dense), embeddings, norms, Gemma 3n's extras.
fn weights(c: &Ctx, out: &mut Items) {
    let Ctx { r, s, device, dt, b, seq, tokens } = *c;
    // Base weights.
    let linear_params: i64 = s.linears().iter().map(|(_, i, o)| i * o).sum::<i64>() * s.layers;
    let bs = r.quantization.block_size as i64;
    let (lin_bytes, lin_note) = match r.quantization.method {
        QuantMethod::None => (linear_params * dt, format!("{linear_params} params in {dt}-byte floats")),
        _ => {
            let blocks = linear_params / bs;
            let absmax = if r.quantization.double_quant { blocks + 4 * (blocks / 256 + 1) } else { 4 * blocks };
            (linear_params / 2 + absmax, format!("{linear_params} params in 4 bits + absmax"))
        }
    };
    out.add("base decoder linears", lin_bytes, lin_note);
    let emb = s.vocab * s.hidden * dt * if s.tied { 1 } else { 2 };
    out.add("embeddings + lm_head", emb, if s.tied { "tied".into() } else { "untied".into() });
    out.add("norms", (2 * s.layers + 1) * s.hidden * dt, String::new());
    if let Some((vp, p, rank, _)) = s.gemma3n {
        let n = s.streams;
        let extras = 2 * (n - 1) * s.hidden * s.hidden
            + s.hidden * s.layers * p
            + s.layers * (2 * s.hidden * rank + 2 * s.hidden * p + n * n * n + s.hidden * n + 6 * s.hidden);
        out.add("Gemma 3n AltUp, LAuReL, per-layer projections", extras * dt, format!("{extras} params, dense"));
        out.add(
            "per-layer inputs of a batch",
            tokens * s.layers * p * dt * 2,
            format!("{b}×{seq}×{}×{p}: table rows + projection", s.layers),
        );
        let table = Item {
            component: "per-layer embedding table".into(),
            bytes: (vp * s.layers * p * dt) as u64,
            note: format!("{vp} × {} in host memory, rows gathered per batch", s.layers * p),
        };
        if device.is_cuda() {
            out.host.push(table);
        } else {
            out.add(&table.component, table.bytes as i64, table.note);
        }
    }
}

/// LoRA weights, their gradients and the optimizer state.
fn adapters(c: &Ctx, out: &mut Items) {
    let (r, s, t) = (c.r, c.s, &c.r.train);
    // Adapters, gradients, optimizer.
    let spec = crate::train::lora_spec(r);
    let targets: Vec<(i64, i64)> = s
        .linears()
        .iter()
        .filter(|(n, _, _)| match &spec.targets {
            crate::model::lora::Targets::Names(v) => v.iter().any(|x| x == n),
            _ => true,
        })
        .map(|(_, i, o)| (*i, *o))
        .collect();
    let rank = r.lora.r as i64;
    let lora_params: i64 = targets.iter().map(|(i, o)| rank * (i + o)).sum::<i64>() * s.layers;
    out.add("LoRA weights (fp32)", 4 * lora_params, format!("{lora_params} params"));
    out.add("LoRA gradients (fp32)", 4 * lora_params, String::new());
    let opt: i64 = targets
        .iter()
        .map(|(i, o)| AdamW::state_bytes(rank * i, t.optimizer) + AdamW::state_bytes(rank * o, t.optimizer))
        .sum::<i64>()
        * s.layers;
    out.add("optimizer state", opt, format!("{:?}", t.optimizer).to_lowercase());
}

/// Activations: checkpointed layer inputs, one layer's working set, or everything without
/// checkpointing. Returns the coalesced pass's token budget, if any, and whether the layer inputs
/// are offloaded.
fn activations(c: &Ctx, out: &mut Items) -> (Option<u64>, bool) {
    let Ctx { r, s, device, dt, b, seq, tokens } = *c;
    let t = &r.train;
    // Activations.
    let q = s.heads * s.head_dim;
    let kv = s.kv_heads * s.head_dim;
    // Scores and probabilities in f32, where they exist: on a GPU SDPA's fused kernels keep only
    // per-row statistics, unless the family writes attention out (a softcap).
    let kind = crate::model::open::compute_kind(r.model.dtype, device);
    let coalesce_tokens =
        crate::train::step::coalesce_budget(t, device, kind, s.head_dim, s.eager_attention).map(|n| n as u64);
    // A coalesced pass is one row of up to b·seq tokens: its scores, where written out, are
    // (b·seq)², not b·seq².
    let scores = if device.is_cuda() && !s.eager_attention {
        0
    } else if coalesce_tokens.is_some() {
        s.heads * tokens * tokens * 4 * 2
    } else {
        b * s.heads * seq * seq * 4 * 2
    };
    let width = s.streams.max(1) * s.hidden;
    let layer_ws = tokens * dt * (4 * width + 2 * q + 4 * kv + 4 * s.intermediate) + scores;
    // Gemma 3n carries the producers' K and V (two layer types) past them to the shared layers.
    let carried = s.gemma3n.map_or(0, |(_, _, _, shared)| (shared + 2) * tokens * 4 * kv * dt);
    // The CUDA fast path's hand-written backward frees each intermediate once used, where autograd
    // keeps the recomputed graph's activations beside their gradients: 1.35 against 2 layer
    // working sets, fitted to the Llama-3.1-8B allocator peaks measured on the H200 at 4k, 32k and
    // 131k tokens (docs/benchmarks.md; tests/plan.rs holds the estimate to them).
    let hand = device.is_cuda() && t.cuda_kernels && s.hand_backward && r.lora.dropout == 0.0;
    // Offloaded layer inputs live in pinned host memory; the GPU holds the one in use and the one
    // prefetched.
    let inputs = s.layers * tokens * width * dt;
    let offload = device.is_cuda()
        && t.gradient_checkpointing
        && match t.offload_activations {
            Switch::On => true,
            Switch::Off => false,
            Switch::Auto => auto_offload((inputs + carried) as u64, crate::device_mem::host_available_bytes()),
        };
    if t.gradient_checkpointing {
        if offload {
            // Gemma 3n's inputs also carry up to two producers' K and V.
            let carry_width = if s.gemma3n.is_some() { 4 * kv } else { 0 };
            out.add(
                "checkpointed layer inputs",
                2 * tokens * (width + carry_width) * dt,
                format!("2 of {} layers × {b}×{seq}×{width} on the GPU, the rest offloaded", s.layers),
            );
            out.host.push(Item {
                component: "checkpointed layer inputs (offloaded)".into(),
                bytes: (inputs + carried) as u64,
                note: "pinned host memory".into(),
            });
        } else {
            out.add("checkpointed layer inputs", inputs + carried, format!("{} layers × {b}×{seq}×{width}", s.layers));
        }
        if hand {
            out.add(
                "one layer, recompute + backward",
                layer_ws * 27 / 20,
                "hand-written backward: intermediates freed as used".into(),
            );
        } else {
            out.add("one layer, recompute + backward", 2 * layer_ws, "activations and their gradients".into());
        }
    } else {
        out.add("all layer activations", s.layers * layer_ws + layer_ws + carried, "no checkpointing".into());
    }
    (coalesce_tokens, offload)
}

/// The dequantized weight, the cross-entropy chunk and the runtime.
fn transients(c: &Ctx, widest: i64, out: &mut Items) {
    let Ctx { s, device, dt, tokens, .. } = *c;
    out.add("dequantized weight (transient)", 2 * widest * dt, "largest linear, forward and backward".into());
    let rows = crate::train::step::ce_chunk_rows(s.vocab, device).min(tokens);
    // A GPU chunk is one logits tensor in the compute dtype, its gradient written over it
    // (kernels/cross_entropy.cu); the CPU reference holds about three in fp32.
    let (chunk, how) =
        if device.is_cuda() { (rows * s.vocab * dt, "compute dtype") } else { (3 * rows * s.vocab * 4, "fp32") };
    out.add(
        "cross-entropy chunk",
        chunk + 2 * tokens * s.hidden * dt,
        format!("{rows} rows × {} vocab in {how}", s.vocab),
    );
    if device.is_cuda() {
        out.add("CUDA context (outside the allocator)", 600 << 20, "typical; not in allocator statistics".into());
    } else {
        out.add("runtime (libtorch, tokenizer, measured)", current_rss() as i64, "resident now, before loading".into());
    }
}

/// The estimate as a table.
pub fn render(p: &Plan) -> String {
    let gib = |b: u64| b as f64 / 1073741824.0;
    let mut s = format!(
        "memory plan on {} ({} layers, hidden {}, vocab {}):\n",
        p.device, p.shape.layers, p.shape.hidden, p.shape.vocab
    );
    for i in &p.items {
        s.push_str(&format!("  {:<40} {:>9.3} GiB  {}\n", i.component, gib(i.bytes), i.note));
    }
    s.push_str(&format!("  {:<40} {:>9.3} GiB\n", "while training", gib(p.train_bytes)));
    for i in &p.load_items {
        s.push_str(&format!("  {:<40} {:>9.3} GiB  {}\n", format!("load: {}", i.component), gib(i.bytes), i.note));
    }
    s.push_str(&format!(
        "  {:<40} {:>9.3} GiB  (runtime + base weights + the above)\n",
        "while loading",
        gib(p.load_bytes)
    ));
    s.push_str(&format!("  {:<40} {:>9.3} GiB\n", "expected peak", gib(p.total_bytes)));
    for i in &p.host_items {
        s.push_str(&format!("  {:<40} {:>9.3} GiB  {}\n", format!("host: {}", i.component), gib(i.bytes), i.note));
    }
    match p.coalesce_tokens {
        Some(n) => s.push_str(&format!(
            "  a step's micro-batches run as packed varlen passes of up to {n} tokens (train.coalesce)\n"
        )),
        None => s.push_str("  a step's micro-batches run one by one (train.coalesce)\n"),
    }
    s
}
