//! The one linear layer every decoder uses: a frozen base weight (dense or 4-bit),
//! an optional bias and an optional LoRA adapter.
//!
//! Reference: PEFT `tuners/lora/layer.py::Linear.forward` (arch-spec §5):
//! `y = base(x) + (dropout(x)·Aᵀ·Bᵀ)·scaling`, with x cast to the adapter dtype (f32)
//! and the sum cast back to the base output dtype (on a GPU in bf16/fp16 the adapter matmuls
//! run in the compute dtype instead, as under autocast); bitsandbytes `Linear4bit.forward`
//! (dequantize, then a plain matmul).

use tch::{Device, Kind, Tensor};

use crate::quant::QuantTensor;

/// A frozen base weight `[out, in]`.
pub enum Weight {
    /// A plain tensor in the compute dtype.
    Dense(Tensor),
    /// A 4-bit tensor, dequantized on the fly for each forward.
    Quant(QuantTensor),
}

/// A LoRA adapter: `Δy = (dropout(x)·Aᵀ·Bᵀ)·scale`.
pub struct Lora {
    /// `lora_A.weight`, f32 `[r, in]`, requires grad.
    pub a: Tensor,
    /// `lora_B.weight`, f32 `[out, r]`, requires grad.
    pub b: Tensor,
    /// `lora_alpha / r`, or `lora_alpha / √r` with rsLoRA.
    pub scale: f64,
    /// Dropout probability on the adapter input (training only).
    pub dropout: f64,
}

/// `y = x·Wᵀ (+ b) (+ LoRA)`.
pub struct Linear {
    /// Frozen base weight `[out, in]`.
    pub weight: Weight,
    /// Frozen bias `[out]`.
    pub bias: Option<Tensor>,
    /// Trainable adapter, when attached.
    pub lora: Option<Lora>,
}

impl Linear {
    /// A dense linear without adapter.
    pub fn dense(weight: Tensor, bias: Option<Tensor>) -> Linear {
        Linear { weight: Weight::Dense(weight), bias, lora: None }
    }

    /// y = x·Wᵀ (+b) + (dropout(x)·Aᵀ·Bᵀ)·scale. W is dequantized into x's dtype and dropped
    /// right after use; the adapter runs in f32 and the sum is cast to the base output dtype
    /// (PEFT semantics). `train` enables the adapter dropout.
    pub fn forward(&self, x: &Tensor, train: bool) -> Tensor {
        let kind = x.kind();
        let bias = self.bias.as_ref().map(|b| cast(b, kind));
        let y = match &self.weight {
            Weight::Dense(w) => x.linear(&cast(w, kind), bias.as_ref()),
            Weight::Quant(q) => {
                let w = q.dequantize(kind);
                x.linear(&w, bias.as_ref())
            }
        };
        let Some(lora) = &self.lora else { return y };
        if matches!(kind, Kind::BFloat16 | Kind::Half) && x.device().is_cuda() {
            // Mixed precision on a GPU, as under autocast (HF Trainer with bf16/fp16): the adapter
            // matmuls run in the compute dtype; A and B and their gradients stay f32.
            let xa = if train && lora.dropout > 0.0 { x.dropout(lora.dropout, true) } else { x.shallow_clone() };
            let delta = xa.linear::<Tensor>(&lora.a.to_kind(kind), None).linear::<Tensor>(&lora.b.to_kind(kind), None) * lora.scale;
            return y + delta;
        }
        let mut xa = x.to_kind(lora.a.kind());
        if train && lora.dropout > 0.0 {
            xa = xa.dropout(lora.dropout, true);
        }
        let delta = xa.linear::<Tensor>(&lora.a, None).linear::<Tensor>(&lora.b, None) * lora.scale;
        if y.kind() == delta.kind() {
            y + delta
        } else {
            (y.to_kind(delta.kind()) + delta).to_kind(y.kind())
        }
    }

    /// Input width (`in`).
    pub fn in_features(&self) -> i64 {
        self.shape()[1]
    }

    /// Output width (`out`).
    pub fn out_features(&self) -> i64 {
        self.shape()[0]
    }

    /// `[out, in]` of the base weight.
    pub fn shape(&self) -> [i64; 2] {
        match &self.weight {
            Weight::Dense(w) => {
                let s = w.size();
                [s[0], s[1]]
            }
            Weight::Quant(q) => [q.shape[0], q.shape[1]],
        }
    }

    /// Device of the base weight.
    pub fn device(&self) -> Device {
        match &self.weight {
            Weight::Dense(w) => w.device(),
            Weight::Quant(q) => q.device(),
        }
    }

    /// Whether the base weight is 4-bit.
    pub fn is_quantized(&self) -> bool {
        matches!(self.weight, Weight::Quant(_))
    }

    /// The base weight as a dense `[out, in]` tensor of `kind` (dequantized when 4-bit).
    pub fn dense_weight(&self, kind: Kind) -> Tensor {
        match &self.weight {
            Weight::Dense(w) => w.to_kind(kind),
            Weight::Quant(q) => q.dequantize(kind),
        }
    }
}

/// `t` in `kind`, without a copy when it already is.
fn cast(t: &Tensor, kind: Kind) -> Tensor {
    if t.kind() == kind {
        t.shallow_clone()
    } else {
        t.to_kind(kind)
    }
}
