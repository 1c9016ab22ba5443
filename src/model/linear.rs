//! The one linear layer every decoder uses: a frozen base weight (dense or 4-bit),
//! an optional bias and an optional LoRA adapter.
//!
//! Reference: PEFT `tuners/lora/layer.py::Linear.forward` (docs/model-math.md §5):
//! `y = base(x) + (dropout(x)·Aᵀ·Bᵀ)·scaling`, with x cast to the adapter dtype (f32)
//! and the sum cast back to the base output dtype (on a GPU in bf16/fp16 the adapter matmuls
//! run in the compute dtype instead, as under autocast); bitsandbytes `Linear4bit.forward`
//! (dequantize, then a plain matmul).

use std::sync::Arc;

use tch::{Device, Kind, Tensor};

use crate::kernels::{dequant_4bit, Kernels};
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
    /// CUDA kernels (4-bit dequantize) when loaded on a GPU.
    pub kernels: Option<Arc<Kernels>>,
}

impl Linear {
    /// A dense linear without adapter.
    pub fn dense(weight: Tensor, bias: Option<Tensor>) -> Linear {
        Linear { weight: Weight::Dense(weight), bias, lora: None, kernels: None }
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
                let w = dequant_4bit::dequantize(q, kind, self.kernels.as_deref());
                x.linear(&w, bias.as_ref())
            }
        };
        let Some(lora) = &self.lora else { return y };
        if matches!(kind, Kind::BFloat16 | Kind::Half) && x.device().is_cuda() {
            // Mixed precision on a GPU, as under autocast (HF Trainer with bf16/fp16): the adapter
            // matmuls run in the compute dtype; A and B and their gradients stay f32.
            let xa = if train && lora.dropout > 0.0 { x.dropout(lora.dropout, true) } else { x.shallow_clone() };
            let z = xa.linear::<Tensor>(&lora.a.to_kind(kind), None);
            return add_lora_out(y, &z, &lora.b.to_kind(kind), lora.scale);
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
            Weight::Quant(q) => dequant_4bit::dequantize(q, kind, self.kernels.as_deref()),
        }
    }

    /// The dtype the adapter computes in for input dtype `kind` on `device` (see `forward`):
    /// the compute dtype under GPU mixed precision, the adapter's own (f32) otherwise.
    fn adapter_kind(&self, kind: Kind, device: Device) -> Kind {
        match &self.lora {
            Some(_) if matches!(kind, Kind::BFloat16 | Kind::Half) && device.is_cuda() => kind,
            Some(l) => l.a.kind(),
            None => kind,
        }
    }

    /// [`Linear::forward`] without a graph and without adapter dropout, also returning the
    /// adapter's rank-r activation `z = x·Aᵀ` (in the adapter's compute dtype) for
    /// [`Linear::backward`].
    pub fn forward_saving(&self, x: &Tensor) -> (Tensor, Option<Tensor>) {
        tch::no_grad(|| {
            let kind = x.kind();
            let bias = self.bias.as_ref().map(|b| cast(b, kind));
            let y = x.linear(&self.dense_weight(kind), bias.as_ref());
            let Some(lora) = &self.lora else { return (y, None) };
            let ak = self.adapter_kind(kind, x.device());
            let z = cast(x, ak).linear::<Tensor>(&cast(&lora.a, ak), None);
            let y = if ak == kind {
                add_lora_out(y, &z, &cast(&lora.b, ak), lora.scale)
            } else {
                let delta = z.linear::<Tensor>(&cast(&lora.b, ak), None) * lora.scale;
                (y.to_kind(ak) + delta).to_kind(kind)
            };
            (y, Some(z))
        })
    }

    /// The hand-written backward of [`Linear::forward`] (no adapter dropout) for input `x` and
    /// upstream `dy`: returns `dx = dy·W + s·(dy·B)·A`, and adds `dB = s·dyᵀ·z` and
    /// `dA = s·(dy·B)ᵀ·x` to the adapter's gradients. `W` is dequantized again here and freed on
    /// return (nothing of it is kept from the forward); `z = x·Aᵀ` comes from
    /// [`Linear::forward_saving`] or is recomputed. Checked against autograd by the tests.
    pub fn backward(&self, x: &Tensor, z: Option<&Tensor>, dy: &Tensor) -> Tensor {
        self.backward_into(x, z, dy, None)
    }

    /// [`Linear::backward`] added to `acc` (another linear's `dx` for the same `x`, as when
    /// q/k/v or gate/up read one input): `acc + dy·W + s·(dy·B)·A`. The sums happen inside the
    /// matmuls (GEMMs accumulating into `dx`), so no `[.., in]` or `[.., out]` temporary is
    /// written and read again; the scale is applied to the rank-r products.
    pub fn backward_into(&self, x: &Tensor, z: Option<&Tensor>, dy: &Tensor, acc: Option<Tensor>) -> Tensor {
        tch::no_grad(|| {
            let kind = x.kind();
            let [out_f, in_f] = self.shape();
            let dy2 = cast(dy, kind).reshape([-1, out_f]);
            let w = self.dense_weight(kind);
            let mut dx = match acc {
                Some(a) => {
                    let mut a = cast(&a, kind).reshape([-1, in_f]);
                    let _ = a.addmm_(&dy2, &w);
                    a
                }
                None => dy2.mm(&w),
            };
            drop(w);
            if let Some(lora) = &self.lora {
                let ak = self.adapter_kind(kind, x.device());
                let r = lora.a.size()[0];
                let (a, b) = (cast(&lora.a, ak), cast(&lora.b, ak));
                let x2 = cast(x, ak).reshape([-1, in_f]);
                let z2 = match z {
                    Some(z) => z.reshape([-1, r]),
                    None => x2.mm(&a.tr()),
                };
                let dy2 = cast(&dy2, ak);
                let dz = dy2.mm(&b) * lora.scale; // [N, r]
                let db = dy2.tr().mm(&z2) * lora.scale; // [out, r]
                let da = dz.tr().mm(&x2); // [r, in]
                accumulate_grad(&lora.a, &da);
                accumulate_grad(&lora.b, &db);
                if ak == kind {
                    let _ = dx.addmm_(&dz, &a);
                } else {
                    dx = (dx.to_kind(ak) + dz.mm(&a)).to_kind(kind);
                }
            }
            dx.view(x.size().as_slice())
        })
    }
}

/// `y + s·(z·Bᵀ)` for the base output `y` `[.., out]`, the adapter's rank-r activation `z`
/// `[.., r]` and `B` `[out, r]`, all of one dtype, as one GEMM that accumulates into `y` (the
/// scale goes on the rank-r `z`): no `[.., out]` temporary is written, scaled and added. Without
/// a graph to record (no grad, as in checkpointed forwards) it runs in place on `y`, which it
/// owns, so `y` is read and written once; with one, out of place, and autograd differentiates it.
/// `y` must be fresh from the caller (computed in the current grad mode).
pub fn add_lora_out(y: Tensor, z: &Tensor, b: &Tensor, scale: f64) -> Tensor {
    let (out, r) = (b.size()[0], b.size()[1]);
    let shape = y.size();
    // `zs` is computed here and `y` by the caller just before, both in the current grad mode,
    // so they require grad exactly when autograd records (a view would not tell: it inherits
    // `requires_grad` even under no_grad). A and B train together, so B needs no check of its own.
    let zs = z.reshape([-1, r]) * scale;
    let bt = b.tr();
    let mut y2 = y.reshape([-1, out]);
    if y2.requires_grad() || zs.requires_grad() {
        y2.addmm(&zs, &bt).view(shape.as_slice())
    } else {
        let _ = y2.addmm_(&zs, &bt);
        y2.view(shape.as_slice())
    }
}

/// `p.grad += g` (in `p`'s dtype). The first time, when `p` has no gradient yet, autograd
/// allocates it through a one-op graph; afterwards it is an in-place add (the optimizer zeroes
/// gradients in place, so they stay allocated).
pub fn accumulate_grad(p: &Tensor, g: &Tensor) {
    let mut cur = p.grad();
    if cur.defined() {
        tch::no_grad(|| {
            cur += g.to_kind(cur.kind());
        });
    } else {
        tch::with_grad(|| (p * g.to_kind(p.kind()).detach()).sum(Kind::Float).backward());
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
