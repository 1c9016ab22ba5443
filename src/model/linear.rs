//! The one linear layer every decoder uses: a frozen base weight (dense or 4-bit),
//! an optional bias and an optional LoRA adapter.
//!
//! Reference: PEFT `tuners/lora/layer.py::Linear.forward` (docs/model-math.md §5):
//! `y = base(x) + (dropout(x)·Aᵀ·Bᵀ)·scaling`, with x cast to the adapter dtype (f32)
//! and the sum cast back to the base output dtype (on a GPU in bf16/fp16 the adapter matmuls
//! run in the compute dtype instead, as under autocast); bitsandbytes `Linear4bit.forward`
//! (dequantize, then a plain matmul).
//!
//! Under autograd on a GPU (Gemma 3n's checkpointed recomputation) an adapted linear is one
//! autograd node ([`Linear::forward_node`], [`crate::kernels::autograd`]) whose backward is the
//! hand-written one of the CUDA fast path ([`lora_grads`]): `dx = dy·W + s·(dy·B)·A` summed
//! inside the GEMMs, where autograd would write the base and adapter parts of `dx` apart and
//! add them (a `[tokens, in]` pass, 16384 wide for E4B's down_proj).

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
        if let Some(lora) = &self.lora {
            // (Under `no_grad` too, as in the checkpointed forward: the node then is not attached,
            // and the work is the plain path's.)
            let records = x.requires_grad() || lora.a.requires_grad() || lora.b.requires_grad();
            if records
                && !(train && lora.dropout > 0.0)
                && matches!(kind, Kind::BFloat16 | Kind::Half)
                && x.device().is_cuda()
                && self.kernels.is_some()
                && crate::kernels::autograd::available()
            {
                return self.forward_node(x);
            }
        }
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
        let (y, adapter, _) = self.forward_parts(x, false);
        (y, adapter.map(|(z, _, _)| z))
    }

    /// Without a graph: `(y, (z, A, B), W)`, the output, with an adapter its rank-r activation
    /// and A and B in its compute dtype, and the dequantized base weight when `keep_w` (else
    /// dropped after its GEMM).
    #[allow(clippy::type_complexity)]
    fn forward_parts(&self, x: &Tensor, keep_w: bool) -> (Tensor, Option<(Tensor, Tensor, Tensor)>, Option<Tensor>) {
        tch::no_grad(|| {
            let kind = x.kind();
            let bias = self.bias.as_ref().map(|b| cast(b, kind));
            let w = self.dense_weight(kind);
            let y = x.linear(&w, bias.as_ref());
            let w = keep_w.then_some(w);
            let Some(lora) = &self.lora else { return (y, None, w) };
            let ak = self.adapter_kind(kind, x.device());
            let (a, b) = (cast(&lora.a, ak).detach(), cast(&lora.b, ak).detach());
            let z = cast(x, ak).linear::<Tensor>(&a, None);
            let y = if ak == kind {
                add_lora_out(y, &z, &b, lora.scale)
            } else {
                let delta = z.linear::<Tensor>(&b, None) * lora.scale;
                (y.to_kind(ak) + delta).to_kind(kind)
            };
            (y, Some((z, a, b)), w)
        })
    }

    /// [`Linear::forward`] (no adapter dropout) as one autograd node over `x`, `A` and `B`: the
    /// values of [`Linear::forward_saving`], and as backward [`lora_grads`] with the base weight
    /// the forward dequantized (kept until the backward, as autograd keeps it for its matmul).
    /// Used under autograd on a GPU; the tests hold it to autograd on the CPU.
    pub fn forward_node(&self, x: &Tensor) -> Tensor {
        let lora = self.lora.as_ref().expect("forward_node: a linear with an adapter");
        // The adapter in its compute dtype (bf16/fp16 under GPU mixed precision: its GEMMs and
        // casts of x and dy stay in that dtype), as the forward cast it; its gradients go back
        // in the parameters' dtype. Under `no_grad` no node is attached and all is dropped here.
        let (y, (z, a, b), w) = match self.forward_parts(x, true) {
            (y, Some(adapter), Some(w)) => (y, adapter, w),
            _ => unreachable!("an adapted linear gives z, A and B, and W when asked"),
        };
        let (a_kind, b_kind) = (lora.a.kind(), lora.b.kind());
        let (xd, scale, need_dx) = (x.detach(), lora.scale, x.requires_grad());
        let backward: crate::kernels::autograd::Backward = Box::new(move |grads| {
            let (dx, da, db) = tch::no_grad(|| lora_grads(&xd, Some(&z), &grads[0], w, &a, &b, scale, None, need_dx));
            Ok(vec![dx, Some(da.to_kind(a_kind)), Some(db.to_kind(b_kind))])
        });
        crate::kernels::autograd::attach("LoraLinear", &[x, &lora.a, &lora.b], &[&y], backward)
            .unwrap_or_else(|e| panic!("LoRA linear: {e:#}"));
        y
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
            let w = self.dense_weight(x.kind());
            let Some(lora) = &self.lora else {
                return base_dx(dy, &w, acc).view(x.size().as_slice());
            };
            let ak = self.adapter_kind(x.kind(), x.device());
            let (a, b) = (cast(&lora.a, ak), cast(&lora.b, ak));
            let (dx, da, db) = lora_grads(x, z, dy, w, &a, &b, lora.scale, acc, true);
            accumulate_grad(&lora.a, &da);
            accumulate_grad(&lora.b, &db);
            dx.expect("dx was asked for")
        })
    }
}

/// The base weight's part of `dx`, `acc + dy·W` `[N, in]` (the sum inside the GEMM, in place on
/// `acc`), in W's dtype, for `dy` `[.., out]`.
fn base_dx(dy: &Tensor, w: &Tensor, acc: Option<Tensor>) -> Tensor {
    let (kind, out_f, in_f) = (w.kind(), w.size()[0], w.size()[1]);
    let dy2 = cast(dy, kind).reshape([-1, out_f]);
    match acc {
        Some(acc) => {
            let mut acc = cast(&acc, kind).reshape([-1, in_f]);
            let _ = acc.addmm_(&dy2, w);
            acc
        }
        None => dy2.mm(w),
    }
}

/// The backward of an adapted linear (no dropout) for input `x` `[.., in]`, upstream `dy`
/// `[.., out]`, the base weight `w` `[out, in]` in x's dtype and the adapter `a` `[r, in]`, `b`
/// `[out, r]` in its compute dtype: `(dx, dA, dB)` with `dx = acc + dy·W + s·(dy·B)·A` (when
/// `need_dx`; the sums inside the GEMMs, so no `[.., in]` temporary is written and read again;
/// `w` is dropped after its GEMM, before the rank-r products),
/// `dB = s·dyᵀ·z` and `dA = s·(dy·B)ᵀ·x` in the adapter's compute dtype. `z = x·Aᵀ` is
/// recomputed when not given. Without a graph (the caller's `no_grad`).
#[allow(clippy::too_many_arguments)]
pub fn lora_grads(
    x: &Tensor,
    z: Option<&Tensor>,
    dy: &Tensor,
    w: Tensor,
    a: &Tensor,
    b: &Tensor,
    scale: f64,
    acc: Option<Tensor>,
    need_dx: bool,
) -> (Option<Tensor>, Tensor, Tensor) {
    let (kind, ak) = (x.kind(), a.kind());
    let (out_f, in_f) = (w.size()[0], w.size()[1]);
    let r = a.size()[0];
    let dy2 = cast(dy, kind).reshape([-1, out_f]);
    let base = need_dx.then(|| base_dx(&dy2, &w, acc));
    drop(w);
    let x2 = cast(x, ak).reshape([-1, in_f]);
    let z2 = match z {
        Some(z) => cast(z, ak).reshape([-1, r]),
        None => x2.mm(&a.tr()),
    };
    let dya = cast(&dy2, ak);
    let dz = dya.mm(b) * scale; // [N, r]
    let db = dya.tr().mm(&z2) * scale; // [out, r]
    let da = dz.tr().mm(&x2); // [r, in]
    let dx = base.map(|mut dx| {
        if ak == kind {
            let _ = dx.addmm_(&dz, a);
        } else {
            dx = (dx.to_kind(ak) + dz.mm(a)).to_kind(kind);
        }
        dx.view(x.size().as_slice())
    });
    (dx, da, db)
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
