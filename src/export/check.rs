//! The merge quality gate: the merged model, loaded back from the files just
//! written, against base + adapter as trained, on the same examples.
//!
//! Both models score each example on its own (no padding, positions 0..T): the loss is
//! the token cross-entropy over the trained labels (≠ -100) after the one-position shift,
//! summed over all examples and divided by their trained-token count (the train stage's
//! normalisation), and the largest |logit difference| is taken over every position.
//! The stage fails when `merged − adapter` exceeds `[export] max_merge_loss_delta`.
//!
//! Reference: transformers `*ForCausalLM` loss (docs/model-math.md §0) and PEFT's promise that
//! `merge_and_unload()` gives the same outputs as the unmerged adapter.

use crate::data::shards::Example;
use crate::model::{Batch, CausalLm};
use crate::progress::{Progress, Unit};
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

/// Most examples the gate scores. A right merge differs from base + adapter by its bf16
/// rounding (loss delta ~1e-3 on the quickstart, with 16 or 64 examples alike); a wrong one
/// (a missed module, a wrong scale, a bad tensor name) undoes part of what training moved, which
/// on the quickstart is 2.9 → 0.4. 16 examples (~420 trained tokens there) show either; each
/// costs two full forwards, the bulk of export's time on a CPU.
pub const MAX_EXAMPLES: usize = 16;

/// What [`measure`] found.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Measure {
    /// Examples scored.
    pub examples: usize,
    /// Trained tokens scored.
    pub tokens: i64,
    /// Mean NLL of the reference (base + adapter).
    pub adapter_loss: f64,
    /// Mean NLL of the merged model.
    pub merged_loss: f64,
    /// Largest |logit difference| over every position of every example.
    pub max_abs_logit_diff: f64,
    /// Largest |logit| of the reference, to read the difference against.
    pub max_abs_logit: f64,
}

/// Score `reference` and `merged` on `examples`, one example at a time.
pub fn measure(reference: &dyn CausalLm, merged: &dyn CausalLm, examples: &[Example], device: Device) -> Measure {
    let _g = tch::no_grad_guard();
    let (mut nll_a, mut nll_m, mut tokens) = (0f64, 0f64, 0i64);
    let (mut max_diff, mut max_logit) = (0f64, 0f64);
    let bar = Progress::new(examples.len() as u64, "merge check", Unit::Items("examples"));
    for ex in examples {
        bar.inc(1);
        if ex.input_ids.len() < 2 {
            continue;
        }
        let ids: Vec<i64> = ex.input_ids.iter().map(|&x| x as i64).collect();
        let t = ids.len() as i64;
        let input = Tensor::from_slice(&ids).unsqueeze(0).to_device(device);
        let la = reference.forward(&Batch::new(input.shallow_clone(), None)).squeeze_dim(0).to_kind(Kind::Float);
        let lm = merged.forward(&Batch::new(input, None)).squeeze_dim(0).to_kind(Kind::Float);
        max_diff = max_diff.max((&la - &lm).abs().max().double_value(&[]));
        max_logit = max_logit.max(la.abs().max().double_value(&[]));
        let labels: Vec<i64> = ex.labels.iter().skip(1).map(|&x| x as i64).collect();
        let n = labels.iter().filter(|&&l| l != -100).count() as i64;
        if n == 0 {
            continue;
        }
        let target = Tensor::from_slice(&labels).to_device(device);
        let nll = |logits: &Tensor| {
            logits
                .narrow(0, 0, t - 1)
                .cross_entropy_loss::<Tensor>(&target, None, tch::Reduction::Sum, -100, 0.0)
                .to_kind(Kind::Double)
                .double_value(&[])
        };
        nll_a += nll(&la);
        nll_m += nll(&lm);
        tokens += n;
    }
    bar.finish();
    let mean = |s: f64| if tokens > 0 { s / tokens as f64 } else { 0.0 };
    Measure {
        examples: examples.len(),
        tokens,
        adapter_loss: mean(nll_a),
        merged_loss: mean(nll_m),
        max_abs_logit_diff: max_diff,
        max_abs_logit: max_logit,
    }
}

/// `export/merge_check.json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct MergeCheck {
    /// "eval" (the eval split) or "train" (its first examples, when there is no eval split).
    pub source: String,
    /// Examples scored.
    pub examples: usize,
    /// Trained tokens scored.
    pub tokens: i64,
    /// Mean NLL of base + adapter.
    pub adapter_loss: f64,
    /// Mean NLL of the merged model as written.
    pub merged_loss: f64,
    /// merged − adapter.
    pub loss_delta: f64,
    /// Largest |logit difference|.
    pub max_abs_logit_diff: f64,
    /// Largest |logit| of base + adapter.
    pub max_abs_logit: f64,
    /// The threshold from `[export] max_merge_loss_delta`.
    pub max_merge_loss_delta: f64,
    /// Whether `loss_delta ≤ max_merge_loss_delta`.
    pub passed: bool,
    /// Storage dtype of the merged weights.
    pub merged_dtype: String,
    /// Compute dtype both models ran in.
    pub compute_dtype: String,
    /// Device both models ran on.
    pub device: String,
    /// The export fingerprint this check belongs to.
    pub fingerprint: String,
}

impl MergeCheck {
    /// The record of a measurement against a threshold.
    pub fn new(
        m: Measure,
        source: &str,
        max_delta: f64,
        fp: &str,
        merged_dtype: &str,
        compute: Kind,
        device: Device,
    ) -> MergeCheck {
        let delta = m.merged_loss - m.adapter_loss;
        MergeCheck {
            source: source.into(),
            examples: m.examples,
            tokens: m.tokens,
            adapter_loss: m.adapter_loss,
            merged_loss: m.merged_loss,
            loss_delta: delta,
            max_abs_logit_diff: m.max_abs_logit_diff,
            max_abs_logit: m.max_abs_logit,
            max_merge_loss_delta: max_delta,
            passed: delta.is_finite() && delta <= max_delta,
            merged_dtype: merged_dtype.into(),
            compute_dtype: super::merged::dtype_name(compute).into(),
            device: format!("{device:?}"),
            fingerprint: fp.into(),
        }
    }
}

/// Err with a message naming both losses and the setting when the check failed.
pub fn enforce(c: &MergeCheck) -> Result<()> {
    if c.passed {
        return Ok(());
    }
    bail!(
        "merge check failed: the merged model's loss {:.6} exceeds base + adapter's {:.6} by {:.3e} on {} {} examples, \
         more than [export] max_merge_loss_delta = {} (max |Δlogit| {:.3e}); the merged weights do not reproduce the \
         adapter (see export/{}). Raise max_merge_loss_delta if this loss is acceptable, or export with merged_dtype = \"fp32\"",
        c.merged_loss,
        c.adapter_loss,
        c.loss_delta,
        c.examples,
        c.source,
        c.max_merge_loss_delta,
        c.max_abs_logit_diff,
        super::MERGE_CHECK_FILE
    )
}
