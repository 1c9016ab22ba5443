//! One optimizer step's forward and backward, written out.
//!
//! - The loss is the token cross-entropy over labels ≠ -100 (after the
//!   one-position shift), summed over every micro-batch of the accumulation and
//!   divided by the trained-token count of them all: a sum over tokens, never a
//!   mean of means (transformers' `num_items_in_batch` semantics).
//! - Layer-wise activation checkpointing: the forward keeps only each decoder
//!   layer's input (no graph); the backward recomputes one layer at a time with
//!   a graph and pushes the incoming gradient through it (`torch.autograd.backward(y, g)`,
//!   [`crate::kernels::autograd::backward`]), which also accumulates the LoRA gradients. On the
//!   CUDA fast path a family's own layer backward (`CausalLm::layer_backward`) replaces that
//!   pass: Llama's is hand-written (fused kernels, 4-bit weights dequantized again and freed,
//!   SDPA's own backward for the attention core); Gemma 3n's is autograd with the AltUp
//!   streams' gradients assembled by hand.
//! - Chunked cross-entropy: logits are built only for trained positions, a
//!   chunk at a time, and each chunk is backpropagated at once, so the full
//!   [tokens × vocab] fp32 logits never exist.
//! - Dropout is seeded per (step, micro-batch, layer), so the recomputation sees
//!   the same masks and a resumed run the same randomness.

use crate::kernels::cross_entropy;
use crate::kernels::op_census::{self, OpCensus};
use crate::model::{Batch, CausalLm};
use crate::train::data::MicroBatch;
use tch::{Device, Kind, Tensor};

/// How to run the step.
#[derive(Debug, Clone, Copy)]
pub struct StepOptions {
    pub checkpointing: bool,
    pub pad_id: i64,
    pub pad_multiple: usize,
    pub device: Device,
    /// Seed for dropout: mixed with step, micro-batch and layer.
    pub seed: u64,
    /// Multiply the loss by this before backward (fp16 loss scaling; 1 otherwise).
    pub loss_scale: f64,
    /// Use the model's hand-written layer backward where it has one (the CUDA fast path);
    /// autograd over the recomputed layer otherwise.
    pub hand_backward: bool,
    /// With checkpointing on CUDA: keep the layer inputs in pinned host memory
    /// ([`super::offload::Offloader`]).
    pub offload: bool,
    /// Record one layer's kernels with the CUDA profiler ([`ProfileWindow`]).
    pub profile: Option<ProfileWindow>,
    /// Run the rows of all the step's micro-batches as packed passes of at most this many
    /// tokens ([`coalesce`]); `None` runs each micro-batch as it is.
    pub coalesce: Option<usize>,
    /// Check every layer's output, the loss and every layer's gradients for non-finite values
    /// (one device synchronisation each) and report where the first one appeared
    /// ([`StepResult::anomaly`]).
    pub detect_anomaly: bool,
    /// With the step's phase timings (debug log): count the host's libtorch calls per phase and
    /// log the step's most frequent ops (`TUNER_OP_CENSUS=1`, [`OpCensus`]).
    pub op_census: Option<OpCensus>,
}

/// For kernel profiles: the CUDA profiler collects only while layer `layer` of the first
/// micro-batch of optimizer step `step` (counted from 1, as the logs do) runs, once in the
/// forward and once in the backward (recomputation included), so `ncu --profile-from-start off`
/// times just those kernels. Set by `TUNER_CUDA_PROFILE=STEP:LAYER` (a debugging aid, like
/// `RUST_LOG`; see docs/benchmarks.md).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ProfileWindow {
    pub step: u64,
    pub layer: usize,
}

impl ProfileWindow {
    /// Parse `STEP:LAYER`.
    pub fn parse(s: &str) -> Option<ProfileWindow> {
        let (a, b) = s.split_once(':')?;
        Some(ProfileWindow { step: a.trim().parse().ok()?, layer: b.trim().parse().ok()? })
    }

    fn covers(w: Option<ProfileWindow>, step: u64, micro: usize, layer: usize) -> bool {
        // `step` counts from 0 here; the window, like the logs ("step 2/60"), from 1.
        w.is_some_and(|w| w.step == step + 1 && w.layer == layer && micro == 0)
    }
}

/// What one step produced.
#[derive(Debug, Clone)]
pub struct StepResult {
    /// Summed NLL / trained tokens, over the whole accumulation.
    pub loss: f64,
    pub trained_tokens: i64,
    pub tokens: i64,
    /// With [`StepOptions::detect_anomaly`]: where the first non-finite value appeared.
    pub anomaly: Option<Anomaly>,
}

/// Where in a step a value first became non-finite.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// The token embeddings.
    Embed,
    /// A decoder layer's output in the forward pass.
    Forward,
    /// The final norm, logits or cross-entropy.
    Loss,
    /// The gradient of the loss into the last layer's output (through the final norm).
    LossBackward,
    /// A decoder layer's backward: its input gradient or its adapters' gradients.
    Backward,
}

/// The first non-finite value of a step ([`StepOptions::detect_anomaly`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Anomaly {
    pub phase: Phase,
    /// The pass (micro-batch) of the step, from 0.
    pub pass: usize,
    /// The decoder layer, where the phase has one.
    pub layer: Option<usize>,
    /// The adapted modules whose LoRA gradients are non-finite (backward), by module path.
    pub modules: Vec<String>,
}

impl std::fmt::Display for Anomaly {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let what = match self.phase {
            Phase::Embed => "the token embeddings".to_string(),
            Phase::Forward => format!("the forward output of layer {}", self.layer.unwrap_or(0)),
            Phase::Loss => "the loss (final norm, logits or cross-entropy)".to_string(),
            Phase::LossBackward => "the backward of the loss and the final norm".to_string(),
            Phase::Backward => match self.layer {
                Some(l) => format!("the backward of layer {l}"),
                None => "the backward".to_string(),
            },
        };
        write!(f, "{what}, pass {}", self.pass + 1)?;
        if !self.modules.is_empty() {
            let shown: Vec<&str> = self.modules.iter().take(4).map(String::as_str).collect();
            write!(
                f,
                " (non-finite LoRA gradients in {}{})",
                shown.join(", "),
                if self.modules.len() > 4 { format!(" and {} more", self.modules.len() - 4) } else { String::new() }
            )?;
        }
        Ok(())
    }
}

/// Whether every element of `t` is finite (one device synchronisation).
fn all_finite(t: &Tensor) -> bool {
    !t.defined() || t.isfinite().all().int64_value(&[]) != 0
}

/// The decoder layer of a module path (`….layers.N.…`).
fn layer_of(path: &str) -> Option<usize> {
    let rest = &path[path.find(".layers.")? + ".layers.".len()..];
    rest.split('.').next()?.parse().ok()
}

/// The adapted modules of layer `layer` (every layer for `None`) whose LoRA gradient holds a
/// non-finite value.
fn nonfinite_modules(model: &dyn CausalLm, layer: Option<usize>) -> Vec<String> {
    let mut out = vec![];
    for (path, lin) in model.linears() {
        let Some(lora) = &lin.lora else { continue };
        if layer.is_some() && layer_of(&path) != layer {
            continue;
        }
        if !all_finite(&lora.a.grad()) || !all_finite(&lora.b.grad()) {
            out.push(path);
        }
    }
    out
}

/// `train.coalesce` decided: the most tokens per packed pass when a step's micro-batches are
/// coalesced ([`coalesce`]), else `None`. "auto" is on where attention takes the varlen path
/// (CUDA, a 2-byte dtype, a head size flash supports, no attention softcap, which needs the
/// boolean mask and would attend across the whole pass), so the passes do no work across
/// documents or on padding. A pass holds at most `micro_batch_size × max_seq_length` tokens, the
/// micro-batch the memory plan sizes, so coalescing never raises the planned peak.
pub fn coalesce_budget(
    t: &crate::recipe::TrainSection,
    device: Device,
    kind: Kind,
    head_dim: i64,
    attn_softcap: bool,
) -> Option<usize> {
    use crate::recipe::Switch;
    let on = match t.coalesce {
        Switch::Off => false,
        Switch::On => true,
        Switch::Auto => !attn_softcap && crate::kernels::varlen::supports(device, kind, head_dim),
    };
    // One micro-batch of one row has nothing to coalesce.
    let several = t.micro_batch_size * t.gradient_accumulation_steps > 1;
    (on && several).then_some((t.micro_batch_size * t.max_seq_length) as usize)
}

/// The rows of a step's micro-batches as packed single-row passes of at most `budget` tokens,
/// in order: each original row is one or more documents (its own, or its packed ones), which
/// attend only to themselves (document ids), with positions restarting per document, and no
/// padding. The first token of a document after the first in a pass is not a target of the token
/// before it (label -100), as it was not across rows, so the trained tokens, and with them the
/// step's `Σ NLL / Σ trained tokens` and its gradients, are those of the micro-batches. A row
/// longer than `budget` gets a pass of its own.
pub fn coalesce(micro: &[MicroBatch], budget: usize) -> Vec<MicroBatch> {
    let mut out: Vec<MicroBatch> = vec![];
    let mut ids: Vec<i64> = vec![];
    let mut labels: Vec<i64> = vec![];
    let mut seq: Vec<i64> = vec![];
    let mut doc = -1i64;
    let flush = |ids: &mut Vec<i64>, labels: &mut Vec<i64>, seq: &mut Vec<i64>, out: &mut Vec<MicroBatch>| {
        if !ids.is_empty() {
            out.push(MicroBatch {
                input_ids: vec![std::mem::take(ids)],
                labels: vec![std::mem::take(labels)],
                seq_ids: Some(vec![std::mem::take(seq)]),
            });
        }
    };
    for mb in micro {
        for (r, row) in mb.input_ids.iter().enumerate() {
            if row.is_empty() {
                continue;
            }
            if !ids.is_empty() && ids.len() + row.len() > budget {
                flush(&mut ids, &mut labels, &mut seq, &mut out);
                doc = -1;
            }
            let docs = mb.seq_ids.as_ref().map(|s| &s[r]);
            for (c, (&x, &y)) in row.iter().zip(&mb.labels[r]).enumerate() {
                let starts = c == 0 || docs.is_some_and(|d| d[c] != d[c - 1]);
                if starts {
                    doc += 1;
                }
                ids.push(x);
                labels.push(if starts && !seq.is_empty() { -100 } else { y });
                seq.push(doc);
            }
        }
    }
    flush(&mut ids, &mut labels, &mut seq, &mut out);
    out
}

/// Logit rows per cross-entropy chunk. On a GPU the loss kernel (kernels/cross_entropy.cu)
/// holds one chunk of logits in the compute dtype (2 bytes) and writes their gradient over them:
/// ~384 MiB (768 rows of a 262k vocabulary, 1,536 of a 128k one), so each chunk's lm_head matmuls
/// are large and the weight is read a few times per pass, not dozens. On the CPU the f32
/// reference holds about three f32 chunks: ~64 MiB each.
pub fn ce_chunk_rows(vocab: i64, device: Device) -> i64 {
    let (budget, bytes): (i64, i64) = if device.is_cuda() { (384 << 20, 2) } else { (64 << 20, 4) };
    (budget / (bytes * vocab.max(1))).clamp(16, 8192)
}

fn layer_seed(seed: u64, step: u64, micro: usize, layer: usize) -> i64 {
    let mut m = crate::data::SplitMix64(
        seed ^ step.wrapping_mul(0xA24B_AED4_963E_E407) ^ ((micro as u64) << 32) ^ layer as u64,
    );
    (m.next_u64() >> 1) as i64
}

fn batch_of(mb: &MicroBatch, o: &StepOptions) -> (Batch, Tensor) {
    let (ids, labels, mask, seq) = mb.tensors(o.pad_id, o.pad_multiple, o.device);
    // Masks only where they change something, so unpadded single-document rows take the
    // attention kernels' plain causal path (no [T × T] mask is built).
    let t = ids.size()[1];
    let padded = mb.input_ids.iter().any(|r| r.len() as i64 != t);
    let several_docs = mb.seq_ids.as_ref().is_some_and(|s| s.iter().any(|r| r.windows(2).any(|w| w[0] != w[1])));
    let mask = padded.then_some(mask);
    let batch = match seq {
        Some(seq_ids) if several_docs => {
            let mut b = Batch::packed(ids, seq_ids);
            b.attention_mask = mask;
            b
        }
        _ => Batch::new(ids, mask),
    };
    (batch, labels)
}

/// (phase, host time to issue its work, wall time to its end on the device, peak so far,
/// libtorch calls and their host time with the op census).
type Lap = (&'static str, f64, f64, Option<i64>, Option<(u64, f64)>);

/// Wall time per phase of a step (forward, loss, backward), synchronising a CUDA device at each
/// lap, and on CUDA the allocator's peak so far after each (which phase first reaches the run's
/// peak); only when `tuner::train::step` logs at debug level (`RUST_LOG=tuner::train::step=debug`),
/// since the synchronisations cost throughput.
struct PhaseClock {
    on: bool,
    device: Device,
    last: std::time::Instant,
    laps: Vec<Lap>,
    /// The op census, and its totals at the last lap.
    census: Option<(OpCensus, (u64, f64))>,
}

impl PhaseClock {
    fn new(device: Device, census: Option<OpCensus>) -> PhaseClock {
        let on = log::log_enabled!(log::Level::Debug);
        let census = census.filter(|_| on);
        let mut c = PhaseClock { on, device, last: std::time::Instant::now(), laps: Vec::new(), census: None };
        c.sync();
        c.last = std::time::Instant::now();
        c.census = census.map(|census| {
            let _ = census.rows(true);
            (census, census.totals())
        });
        c
    }

    fn sync(&self) {
        if let (true, Device::Cuda(i)) = (self.on, self.device) {
            tch::Cuda::synchronize(i as i64);
        }
    }

    fn lap(&mut self, name: &'static str) {
        if !self.on {
            return;
        }
        // The time the host took to issue the phase's work, then the time until the device
        // finished it: when the two are close, the phase is bound by the host (launches,
        // dispatch), not by the GPU.
        let issued = self.last.elapsed().as_secs_f64();
        self.sync();
        let now = std::time::Instant::now();
        let peak = match self.device {
            Device::Cuda(i) => crate::device_mem::cuda(i).map(|m| m.peak_allocated),
            _ => None,
        };
        let ops = self.census.as_mut().map(|(census, at)| {
            let now = census.totals();
            let delta = (now.0 - at.0, now.1 - at.1);
            *at = now;
            delta
        });
        self.laps.push((name, issued, (now - self.last).as_secs_f64(), peak, ops));
        self.last = now;
    }

    fn report(&self) {
        if self.on && !self.laps.is_empty() {
            let parts: Vec<String> = self
                .laps
                .iter()
                .map(|(n, i, t, p, ops)| {
                    let ops = ops.map_or(String::new(), |(calls, secs)| {
                        format!("; {calls} libtorch calls, {:.1} ms of host time in them", secs * 1e3)
                    });
                    match p {
                        Some(p) => format!(
                            "{n} {:.1} ms (issued in {:.1} ms; peak so far {:.2} GiB{ops})",
                            t * 1e3,
                            i * 1e3,
                            *p as f64 / (1u64 << 30) as f64
                        ),
                        None if ops.is_empty() => format!("{n} {:.1} ms", t * 1e3),
                        None => format!("{n} {:.1} ms ({})", t * 1e3, &ops[2..]),
                    }
                })
                .collect();
            log::debug!("step phases: {}", parts.join(", "));
        }
    }

    /// With the op census: the step's most frequent libtorch calls, per pass.
    fn report_ops(&self, passes: usize) {
        if let Some((census, _)) = &self.census {
            log::debug!("step's libtorch calls:\n{}", op_census::table(&census.rows(false), 40, passes));
        }
    }
}

/// Flattened next-token targets (position t predicts labels[t+1]; the last position
/// predicts nothing) and the indices of the positions that are trained.
fn shifted_targets(labels: &Tensor) -> (Tensor, Tensor) {
    let (b, t) = labels.size2().unwrap_or((1, 1));
    let pad = Tensor::full([b, 1], -100, (Kind::Int64, labels.device()));
    let targets = Tensor::cat(&[labels.narrow(1, 1, t - 1), pad], 1).flatten(0, 1);
    let keep = targets.ne(-100).nonzero().squeeze_dim(1);
    (targets, keep)
}

/// Cross-entropy over the trained positions of `h_normed` `[B,T,H]` (graph root), chunked;
/// backpropagates `scale · Σ nll / denom` into `h_normed`. Returns the summed NLL (unscaled) as
/// f64.
///
/// The loss and its gradient do not go through autograd: per chunk, the logits `x·Wᵀ` (no
/// graph), the NLL and the gradient with respect to the raw logits (softcap included) from
/// [`cross_entropy::loss_and_grad`] (the kernel on a GPU, in place over the logits), then
/// `dx = dlogits·W`. Only `h_normed`'s own graph is differentiated, once, at the end. This relies
/// on every family's logits being `softcap(h·Wᵀ)` ([`CausalLm::logit_softcap`]), which
/// tests/train.rs holds for each family.
pub fn chunked_ce_backward(model: &dyn CausalLm, h_normed: &Tensor, labels: &Tensor, denom: f64, scale: f64) -> f64 {
    let (b, t, hdim) = h_normed.size3().unwrap_or((1, 1, 1));
    let (targets, keep) = shifted_targets(labels);
    let n = keep.size()[0];
    if n == 0 {
        return 0.0;
    }
    let flat = h_normed.detach().flatten(0, 1);
    let w = model.lm_head_weight();
    let (cap, kernels) = (model.logit_softcap(), model.kernels());
    let rows = ce_chunk_rows(w.size()[0], h_normed.device());
    let mut grad = flat.zeros_like();
    // Summed on the device: reading each chunk's loss back would stall the GPU queue per chunk.
    let mut total = Tensor::zeros([], (Kind::Double, h_normed.device()));
    let mut start = 0;
    tch::no_grad(|| {
        while start < n {
            let len = rows.min(n - start);
            let idx = keep.narrow(0, start, len);
            let logits = flat.index_select(0, &idx).linear::<Tensor>(&w, None);
            let (nll, dlogits) = cross_entropy::loss_and_grad(
                logits,
                &targets.index_select(0, &idx),
                cap,
                scale / denom,
                kernels.as_deref(),
            );
            total += nll.sum(Kind::Double);
            let _ = grad.index_copy_(0, &idx, &dlogits.matmul(&w).to_kind(grad.kind()));
            start += len;
        }
    });
    (h_normed * grad.view([b, t, hdim])).sum(Kind::Float).backward();
    total.double_value(&[])
}

/// Forward and backward over the micro-batches of one optimizer step (or, with
/// [`StepOptions::coalesce`], over their rows as packed passes); the LoRA gradients are
/// accumulated into the parameters' `.grad`.
pub fn forward_backward(model: &dyn CausalLm, micro: &[MicroBatch], step: u64, o: &StepOptions) -> StepResult {
    let coalesced;
    let passes = match o.coalesce {
        Some(budget) => {
            coalesced = coalesce(micro, budget);
            &coalesced[..]
        }
        None => micro,
    };
    let denom: i64 = passes.iter().map(MicroBatch::trained_tokens).sum();
    // Under GPU mixed precision the adapters compute in the compute dtype: make their compute
    // form once for all of the step's passes (A and B change only when the optimizer steps,
    // after this).
    let kind = model.lm_head_weight().kind();
    let _cast = (o.device.is_cuda() && matches!(kind, Kind::BFloat16 | Kind::Half))
        .then(|| crate::model::lora::cast_adapters(model, kind));
    let mut nll = 0.0;
    let mut anomaly: Option<Anomaly> = None;
    let mut clock = PhaseClock::new(o.device, o.op_census);
    for (m, mb) in passes.iter().enumerate() {
        let (batch, labels) = batch_of(mb, o);
        let pass = Pass { model, batch: &batch, labels: &labels, o, step, m, denom };
        nll += if o.checkpointing {
            checkpointed_pass(&pass, &mut clock, &mut anomaly)
        } else {
            plain_pass(&pass, &mut anomaly)
        };
    }
    clock.report();
    clock.report_ops(passes.len());
    StepResult {
        loss: nll / denom.max(1) as f64,
        trained_tokens: denom,
        tokens: passes.iter().map(MicroBatch::tokens).sum(),
        anomaly,
    }
}

/// One forward/backward pass of a step (a micro-batch, or a coalesced row of several).
struct Pass<'a> {
    model: &'a dyn CausalLm,
    batch: &'a Batch,
    labels: &'a Tensor,
    o: &'a StepOptions,
    step: u64,
    /// The pass's index in the step.
    m: usize,
    /// The step's trained tokens: the loss is Σ NLL / denom.
    denom: i64,
}

/// Record the first non-finite value of a step.
fn note(anomaly: &mut Option<Anomaly>, pass: usize, phase: Phase, layer: Option<usize>, modules: Vec<String>) {
    if anomaly.is_none() {
        *anomaly = Some(Anomaly { phase, pass, layer, modules });
    }
}

/// A pass with layer checkpointing: a no-grad forward keeping each layer's input (or offloading
/// it), the chunked loss, then each layer recomputed and backpropagated from the top, by the
/// hand-written backward where the family has one. Returns the pass's summed NLL.
fn checkpointed_pass(p: &Pass, clock: &mut PhaseClock, anomaly: &mut Option<Anomaly>) -> f64 {
    let Pass { model, batch, labels, o, step, m, denom } = *p;
    let n_layers = model.num_layers();
    let mut inputs = Vec::with_capacity(n_layers);
    let mut offload =
        o.offload.then(|| super::offload::Offloader::new(o.device, n_layers).expect("activation offload"));
    let h = {
        let _g = tch::no_grad_guard();
        let mut h = model.embed(batch);
        if o.detect_anomaly && !all_finite(&h) {
            note(anomaly, m, Phase::Embed, None, vec![]);
        }
        for l in 0..n_layers {
            match offload.as_mut() {
                Some(off) => off.store(l, &h),
                None => inputs.push(h.shallow_clone()),
            }
            tch::manual_seed(layer_seed(o.seed, step, m, l));
            let profiled = ProfileWindow::covers(o.profile, step, m, l);
            if profiled {
                crate::kernels::cuda_profiler(true);
            }
            h = model.layer(l, &h, batch, true);
            if profiled {
                crate::kernels::cuda_profiler(false);
            }
            if o.detect_anomaly && !all_finite(&h) {
                note(anomaly, m, Phase::Forward, Some(l), vec![]);
            }
        }
        h
    };
    clock.lap("forward");
    if let Some(off) = offload.as_mut() {
        off.prefetch(n_layers - 1);
    }
    let top = h.detach().set_requires_grad(true);
    let part = chunked_ce_backward(model, &model.norm(&top), labels, denom.max(1) as f64, o.loss_scale);
    clock.lap("loss");
    let mut grad = top.grad();
    if o.detect_anomaly && !part.is_finite() {
        note(anomaly, m, Phase::Loss, None, vec![]);
    } else if o.detect_anomaly && !all_finite(&grad) {
        note(anomaly, m, Phase::LossBackward, None, vec![]);
    }
    for l in (0..n_layers).rev() {
        let input = match offload.as_mut() {
            Some(off) => {
                let x = off.take(l);
                if l > 0 {
                    off.prefetch(l - 1);
                }
                x
            }
            None => std::mem::replace(&mut inputs[l], Tensor::new()),
        };
        tch::manual_seed(layer_seed(o.seed, step, m, l));
        let profiled = ProfileWindow::covers(o.profile, step, m, l);
        if profiled {
            crate::kernels::cuda_profiler(true);
        }
        let hand = if o.hand_backward { model.layer_backward(l, &input, batch, &grad) } else { None };
        match hand {
            Some(dx) => grad = dx,
            None => {
                let x = input.detach().set_requires_grad(l > 0);
                let y = model.layer(l, &x, batch, true);
                crate::kernels::autograd::backward(&[&y], &[&grad.to_kind(y.kind())])
                    .unwrap_or_else(|e| panic!("the backward of layer {l}: {e:#}"));
                if l > 0 {
                    grad = x.grad();
                }
            }
        }
        if profiled {
            crate::kernels::cuda_profiler(false);
        }
        if o.detect_anomaly {
            let modules = nonfinite_modules(model, Some(l));
            if !modules.is_empty() || (l > 0 && !all_finite(&grad)) {
                note(anomaly, m, Phase::Backward, Some(l), modules);
            }
        }
    }
    clock.lap("backward");
    part
}

/// A pass without checkpointing: one autograd graph over every layer. Returns its summed NLL.
fn plain_pass(p: &Pass, anomaly: &mut Option<Anomaly>) -> f64 {
    let Pass { model, batch, labels, o, step, m, denom } = *p;
    let n_layers = model.num_layers();
    let mut h = model.embed(batch);
    if o.detect_anomaly && !all_finite(&h) {
        note(anomaly, m, Phase::Embed, None, vec![]);
    }
    for l in 0..n_layers {
        tch::manual_seed(layer_seed(o.seed, step, m, l));
        h = model.layer(l, &h, batch, true);
        if o.detect_anomaly && !all_finite(&h) {
            note(anomaly, m, Phase::Forward, Some(l), vec![]);
        }
    }
    let part = chunked_ce_backward(model, &model.norm(&h), labels, denom.max(1) as f64, o.loss_scale);
    if o.detect_anomaly {
        if !part.is_finite() {
            note(anomaly, m, Phase::Loss, None, vec![]);
        }
        // One autograd pass over every layer: the modules, not the layer where it began.
        let modules = nonfinite_modules(model, None);
        if !modules.is_empty() {
            note(anomaly, m, Phase::Backward, None, modules);
        }
    }
    part
}

/// Summed NLL and trained-token count of a micro-batch, without gradients (for eval).
pub fn eval_nll(model: &dyn CausalLm, mb: &MicroBatch, o: &StepOptions) -> (f64, i64) {
    let _g = tch::no_grad_guard();
    let (batch, labels) = batch_of(mb, o);
    let mut h = model.embed(&batch);
    for l in 0..model.num_layers() {
        h = model.layer(l, &h, &batch, false);
    }
    let hn = model.norm(&h);
    let (targets, keep) = shifted_targets(&labels);
    let n = keep.size()[0];
    let flat = hn.flatten(0, 1);
    let w = model.lm_head_weight();
    let (cap, kernels) = (model.logit_softcap(), model.kernels());
    let rows = ce_chunk_rows(w.size()[0], flat.device());
    let mut total = Tensor::zeros([], (Kind::Double, flat.device()));
    let mut start = 0;
    while start < n {
        let len = rows.min(n - start);
        let idx = keep.narrow(0, start, len);
        let logits = flat.index_select(0, &idx).linear::<Tensor>(&w, None);
        let t = targets.index_select(0, &idx);
        total += cross_entropy::nll(logits, &t, cap, kernels.as_deref()).sum(Kind::Double);
        start += len;
    }
    (total.double_value(&[]), n)
}

/// Summed NLL and trained-token count over the eval examples, in shard order, batched;
/// with several processes, rank r takes batches r, r + world, … (`shard` = (rank, world)).
/// `bar` counts rows (each rank's batch stands for one batch per rank).
pub fn eval_loss(
    model: &dyn CausalLm,
    examples: &[crate::data::shards::Example],
    batch: usize,
    o: &StepOptions,
    shard: (usize, usize),
    bar: &crate::progress::Progress,
) -> (f64, i64) {
    let (mut nll, mut n) = (0.0, 0i64);
    for (_, chunk) in examples.chunks(batch.max(1)).enumerate().filter(|(k, _)| k % shard.1 == shard.0) {
        let mb = MicroBatch {
            input_ids: chunk.iter().map(|e| e.input_ids.iter().map(|x| *x as i64).collect()).collect(),
            labels: chunk.iter().map(|e| e.labels.iter().map(|x| *x as i64).collect()).collect(),
            seq_ids: None,
        };
        let (s, k) = eval_nll(model, &mb, o);
        nll += s;
        n += k;
        bar.inc((chunk.len() * shard.1) as u64);
    }
    (nll, n)
}
