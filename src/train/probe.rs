//! `tuner grads`: one training step's LoRA gradients on chosen rows, through the same step as
//! `tuner run` ([`super::step::forward_backward`]: checkpointing, and on a GPU the CUDA kernels
//! and hand-written layer backward), with no optimizer step. It is how tuner's gradients are
//! held to HF + peft's (scripts/grad_parity.py) and how a non-finite gradient on a user's
//! checkpoint is reported: the output names where the first non-finite value appeared.
//!
//! Rows are `{"input_ids": [...], "labels": [...]}` (labels −100 where not trained, not shifted:
//! position t is trained to predict `labels[t+1]`, as in HF's `model(input_ids, labels=labels)`),
//! all in one micro-batch, right-padded; the loss is `Σ NLL / Σ trained tokens`.

use super::data::MicroBatch;
use super::step;
use crate::model::{self, CausalLm};
use anyhow::{bail, Context, Result};
use serde::Serialize;
use std::path::Path;
use tch::{Device, Kind, Tensor};

/// What `tuner grads` loads and runs.
pub struct GradsInputs<'a> {
    /// An HF folder (a `.gguf` is imported by the caller).
    pub model_dir: &'a Path,
    /// A PEFT adapter folder, loaded as stored (B may be non-zero).
    pub adapter: &'a Path,
    pub rows: Vec<(Vec<i64>, Vec<i64>)>,
    pub kind: Kind,
    pub device: Device,
    pub quantize: Option<(crate::quant::QuantType, i64, bool)>,
    /// `None`: the id training pads with ([`super::pad_id`]).
    pub pad_id: Option<i64>,
    pub checkpointing: bool,
    /// The CUDA kernels and hand-written backward (on a GPU).
    pub kernels: bool,
}

/// One step's result; the gradients go to a file, the rest to stdout as JSON.
#[derive(Debug, Serialize)]
pub struct GradReport {
    pub loss: f64,
    pub trained_tokens: i64,
    pub pad_id: i64,
    /// L2 norm over every LoRA gradient.
    pub grad_norm: f64,
    /// PEFT keys whose gradient holds NaN/inf.
    pub nonfinite: Vec<String>,
    /// Where the first non-finite value appeared, if any.
    pub anomaly: Option<String>,
    #[serde(skip)]
    pub grads: Vec<(String, Tensor)>,
}

/// Rows from a JSONL file of `{"input_ids", "labels"}`; errors name the line.
pub fn read_rows(path: &Path) -> Result<Vec<(Vec<i64>, Vec<i64>)>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut rows = vec![];
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let at = format!("{}:{}", path.display(), i + 1);
        #[derive(serde::Deserialize)]
        struct Row {
            input_ids: Vec<i64>,
            labels: Vec<i64>,
        }
        let r: Row = serde_json::from_str(line)
            .with_context(|| format!("{at}: expected {{\"input_ids\": [int, …], \"labels\": [int, …]}}"))?;
        if r.input_ids.len() != r.labels.len() || r.input_ids.is_empty() {
            bail!(
                "{at}: input_ids ({}) and labels ({}) must be non-empty and of the same length",
                r.input_ids.len(),
                r.labels.len()
            );
        }
        rows.push((r.input_ids, r.labels));
    }
    if rows.is_empty() {
        bail!("{}: no rows", path.display());
    }
    Ok(rows)
}

/// Load the model and adapter, run one step over the rows, return the gradients.
pub fn run(a: GradsInputs) -> Result<GradReport> {
    let tok = crate::data::tokenizer::Tok::load(a.model_dir)?;
    let pad_id = a.pad_id.unwrap_or_else(|| crate::model::open::pad_id(&tok));
    let mut m = model::load(
        a.model_dir,
        &model::LoadOptions { dtype: a.kind, device: a.device, quantize: a.quantize, cuda_kernels: a.kernels },
    )?;
    crate::model::open::apply_adapter(m.as_mut(), a.adapter)?;
    let vocab = m.config().vocab_size;
    if let Some(bad) = a.rows.iter().flat_map(|(ids, _)| ids).find(|&&x| x < 0 || x >= vocab) {
        bail!("token id {bad} is outside the model's vocabulary (0..{vocab})");
    }
    let mb = MicroBatch {
        input_ids: a.rows.iter().map(|r| r.0.clone()).collect(),
        labels: a.rows.iter().map(|r| r.1.clone()).collect(),
        seq_ids: None,
    };
    let o = step::StepOptions {
        checkpointing: a.checkpointing,
        pad_id,
        pad_multiple: 1,
        device: a.device,
        seed: 0,
        loss_scale: 1.0,
        hand_backward: a.device.is_cuda() && a.kernels,
        offload: false,
        profile: None,
        coalesce: None,
        detect_anomaly: true,
        op_census: None,
    };
    let res = step::forward_backward(m.as_ref(), &[mb], 0, &o);
    Ok(report(m.as_ref(), &res, pad_id))
}

fn report(m: &dyn CausalLm, res: &step::StepResult, pad_id: i64) -> GradReport {
    let mut grads = vec![];
    let mut nonfinite = vec![];
    let mut sq = 0.0;
    let params = m
        .linears()
        .into_iter()
        .filter_map(|(path, l)| l.lora.as_ref().map(|lo| (path, lo.a.shallow_clone(), lo.b.shallow_clone())));
    let params = params.flat_map(|(path, a, b)| {
        [(format!("base_model.model.{path}.lora_A.weight"), a), (format!("base_model.model.{path}.lora_B.weight"), b)]
    });
    for (key, p) in params {
        let g = p.grad();
        let g = if g.defined() {
            g.to_device(Device::Cpu).to_kind(Kind::Float)
        } else {
            p.zeros_like().to_device(Device::Cpu).to_kind(Kind::Float)
        };
        if g.isfinite().all().int64_value(&[]) == 0 {
            nonfinite.push(key.clone());
        } else {
            sq += g.square().sum(Kind::Double).double_value(&[]);
        }
        grads.push((key, g.contiguous()));
    }
    let grad_norm = if nonfinite.is_empty() { sq.sqrt() } else { f64::NAN };
    GradReport {
        loss: res.loss,
        trained_tokens: res.trained_tokens,
        pad_id,
        grad_norm,
        nonfinite,
        anomaly: res.anomaly.as_ref().map(|a| a.to_string()),
        grads,
    }
}

/// Write the gradients under their PEFT keys (a temp file, then renamed).
pub fn write(report: &GradReport, out: &Path) -> Result<()> {
    let tmp = out.with_extension("safetensors.tmp");
    Tensor::write_safetensors(&report.grads, &tmp).with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, out).with_context(|| format!("cannot write {}", out.display()))?;
    Ok(())
}
