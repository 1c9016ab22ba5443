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

use std::sync::{Arc, Mutex};

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
    /// The adapter's compute form `(scale·A, B)` in the compute dtype, made once for the passes
    /// of one optimizer step while a [`super::lora::CastAdapters`] holds it (A and B do not
    /// change until the optimizer steps). The graph-free paths (the checkpointed forward, the
    /// LoRA node, the hand-written backward) read it instead of casting and scaling in every pass:
    /// ~6 launches per adapted linear per micro-batch, ~1.5k for E4B. Never used where autograd
    /// records the cast.
    pub cast: Mutex<Option<(Tensor, Tensor)>>,
}

impl Lora {
    /// An adapter without a held cast.
    pub fn new(a: Tensor, b: Tensor, scale: f64, dropout: f64) -> Lora {
        Lora { a, b, scale, dropout, cast: Mutex::new(None) }
    }

    /// The compute form `(scale·A, B)` in `kind`, without a graph: `scale·A` in f32, then cast.
    pub fn compute_form(&self, kind: Kind) -> (Tensor, Tensor) {
        tch::no_grad(|| ((&self.a * self.scale).to_kind(kind), cast(&self.b, kind).detach()))
    }

    /// [`Lora::compute_form`], the held one when there is one of that dtype.
    fn in_kind(&self, kind: Kind) -> (Tensor, Tensor) {
        if let Some((sa, b)) = self.cast.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
            if sa.kind() == kind {
                return (sa.shallow_clone(), b.shallow_clone());
            }
        }
        self.compute_form(kind)
    }
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
    /// adapter's scaled rank-r activation `zs = s·x·Aᵀ` (in the adapter's compute dtype) for
    /// [`Linear::backward`].
    pub fn forward_saving(&self, x: &Tensor) -> (Tensor, Option<Tensor>) {
        let (y, adapter, _) = self.forward_parts(x, false);
        (y, adapter.map(|(z, _, _)| z))
    }

    /// Without a graph: `(y, (zs, s·A, B), W)`, the output, with an adapter its scaled rank-r
    /// activation `zs = x·(s·A)ᵀ` and its compute form ([`Lora::compute_form`]), and the
    /// dequantized base weight when `keep_w` (else dropped after its GEMM). The scale rides on A,
    /// so neither pass multiplies a `[tokens, r]` activation by it.
    ///
    /// Where the output is wider than the input (gate/up), the adapter's output is added inside
    /// the base GEMM: `y = [x | zs]·[W | B]ᵀ`, with W dequantized into the first columns of a
    /// buffer that holds B in its last r ([`Spare::B`]). Adding `zs·Bᵀ` into y afterwards
    /// reads and writes the whole `[tokens, out]` output once more (~100 µs per E4B gate or up
    /// projection and pass); the concatenation copies the narrower `[tokens, in]` input instead.
    /// Where the input is the wider (down_proj), the weight gets r spare rows for the backward
    /// ([`Spare::Room`], [`lora_grads`]).
    #[allow(clippy::type_complexity)]
    fn forward_parts(&self, x: &Tensor, keep_w: bool) -> (Tensor, Option<(Tensor, Tensor, Tensor)>, Option<DenseW>) {
        tch::no_grad(|| {
            let kind = x.kind();
            let bias = self.bias.as_ref().map(|b| cast(b, kind));
            let Some(lora) = &self.lora else {
                let w = self.dense_weight(kind);
                let y = x.linear(&w, bias.as_ref());
                return (y, None, keep_w.then(|| DenseW::plain(w)));
            };
            let ak = self.adapter_kind(kind, x.device());
            let (sa, b) = lora.in_kind(ak);
            let [out_f, in_f] = self.shape();
            let r = sa.size()[0];
            if ak == kind && out_f > in_f {
                if let Some(wb) = self.weight_with_spare(kind, Spare::B(b.shallow_clone())) {
                    let x2 = x.reshape([-1, in_f]);
                    let zs = x2.mm(&sa.tr());
                    let y = Tensor::cat(&[&x2, &zs], 1).linear(&wb.buf, bias.as_ref());
                    let mut shape = x.size();
                    *shape.last_mut().expect("x has a feature dimension") = out_f;
                    return (y.view(shape.as_slice()), Some((zs, sa, b)), keep_w.then_some(wb));
                }
            }
            let spare = if ak == kind && keep_w && in_f > out_f { Spare::Room(r) } else { Spare::None };
            let w = self.weight_with_spare(kind, spare).unwrap_or_else(|| DenseW::plain(self.dense_weight(kind)));
            let y = x.linear(&w.w, bias.as_ref());
            let w = keep_w.then_some(w);
            let zs = cast(x, ak).linear::<Tensor>(&sa, None);
            let y = if ak == kind {
                add_lora_out(y, &zs, &b, 1.0)
            } else {
                (y.to_kind(ak) + zs.linear::<Tensor>(&b, None)).to_kind(kind)
            };
            (y, Some((zs, sa, b)), w)
        })
    }

    /// The 4-bit base weight dequantized by the kernel into a buffer with `spare` room beside
    /// it; `None` when there is nothing spare to make, or the weight is dense, or the kernel
    /// cannot (then the caller takes the plain path).
    fn weight_with_spare(&self, kind: Kind, spare: Spare) -> Option<DenseW> {
        let Weight::Quant(q) = &self.weight else { return None };
        if self.kernels.is_none() || !q.device().is_cuda() {
            return None;
        }
        let [out_f, in_f] = self.shape();
        let opts = (kind, q.device());
        match spare {
            Spare::None => None,
            Spare::B(b) => {
                let r = b.size()[1];
                // r a multiple of 8 keeps the buffer's rows 16-byte aligned for the GEMM.
                if r % 8 != 0 || b.kind() != kind {
                    return None;
                }
                let buf = Tensor::empty([out_f, in_f + r], opts);
                let w = buf.narrow(1, 0, in_f);
                dequant_4bit::into(q, &w, self.kernels.as_deref())?;
                buf.narrow(1, in_f, r).copy_(&b);
                Some(DenseW { w, buf })
            }
            Spare::Room(r) => {
                let buf = Tensor::empty([out_f + r, in_f], opts);
                let w = buf.narrow(0, 0, out_f);
                dequant_4bit::into(q, &w, self.kernels.as_deref())?;
                Some(DenseW { w, buf })
            }
        }
    }

    /// [`Linear::forward`] (no adapter dropout) as one autograd node over `x`, `A` and `B`: the
    /// values of [`Linear::forward_saving`], and as backward [`lora_grads`] with the base weight
    /// the forward dequantized (kept until the backward, as autograd keeps it for its matmul).
    /// Used under autograd on a GPU; the tests hold it to autograd on the CPU.
    pub fn forward_node(&self, x: &Tensor) -> Tensor {
        let lora = self.lora.as_ref().expect("forward_node: a linear with an adapter");
        // The adapter in its compute form (bf16/fp16 under GPU mixed precision: its GEMMs and
        // casts of x and dy stay in that dtype), as the forward used it; its gradients are added
        // into the parameters' own (f32). Under `no_grad` no node is attached and all is dropped
        // here.
        let (y, (zs, sa, b), w) = match self.forward_parts(x, true) {
            (y, Some(adapter), Some(w)) => (y, adapter, w),
            _ => unreachable!("an adapted linear gives zs, s·A and B, and W when asked"),
        };
        let (pa, pb) = (lora.a.shallow_clone(), lora.b.shallow_clone());
        let (xd, scale, need_dx) = (x.detach(), lora.scale, x.requires_grad());
        // The backward adds dA and dB into A's and B's gradients itself, so once those exist and
        // x carries the node, A and B need no edges (autograd would visit their accumulation
        // nodes for nothing, ~500 visits per E4B micro-batch).
        let adds_itself = |p: &Tensor| !p.requires_grad() || p.grad().defined();
        let edges = if need_dx && adds_itself(&lora.a) && adds_itself(&lora.b) { 1 } else { 3 };
        let backward: crate::kernels::autograd::Backward = Box::new(move |grads| {
            tch::no_grad(|| {
                let (ga, gb) = (pa.grad(), pb.grad());
                let into = (pa.requires_grad() && pb.requires_grad()).then_some((&ga, &gb));
                let (dx, da, db) = lora_grads(&xd, Some(&zs), &grads[0], w, &sa, &b, scale, None, need_dx, into);
                let mut out =
                    vec![dx, da.and_then(|g| add_into_grad(&pa, &g)), db.and_then(|g| add_into_grad(&pb, &g))];
                out.truncate(edges);
                Ok(out)
            })
        });
        let inputs = [x, &lora.a, &lora.b];
        crate::kernels::autograd::attach("LoraLinear", &inputs[..edges], &[&y], backward)
            .unwrap_or_else(|e| panic!("LoRA linear: {e:#}"));
        y
    }

    /// The hand-written backward of [`Linear::forward`] (no adapter dropout) for input `x` and
    /// upstream `dy`: returns `dx = dy·W + s·(dy·B)·A`, and adds `dB = s·dyᵀ·z` and
    /// `dA = s·(dy·B)ᵀ·x` to the adapter's gradients. `W` is dequantized again here and freed on
    /// return (nothing of it is kept from the forward); `zs = s·x·Aᵀ` comes from
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
            let Some(lora) = &self.lora else {
                return base_dx(dy, &self.dense_weight(x.kind()), acc).view(x.size().as_slice());
            };
            let ak = self.adapter_kind(x.kind(), x.device());
            let [out_f, in_f] = self.shape();
            let spare = if ak == x.kind() && in_f > out_f { Spare::Room(lora.a.size()[0]) } else { Spare::None };
            let w =
                self.weight_with_spare(x.kind(), spare).unwrap_or_else(|| DenseW::plain(self.dense_weight(x.kind())));
            let (sa, b) = lora.in_kind(ak);
            let (ga, gb) = (lora.a.grad(), lora.b.grad());
            let (dx, da, db) = lora_grads(x, z, dy, w, &sa, &b, lora.scale, acc, true, Some((&ga, &gb)));
            if let Some(da) = da {
                accumulate_grad(&lora.a, &da);
            }
            if let Some(db) = db {
                accumulate_grad(&lora.b, &db);
            }
            dx.expect("dx was asked for")
        })
    }
}

/// `g += m1·m2` as one GEMM that accumulates into `g`, a parameter's f32 gradient, from
/// bf16/fp16 operands (libtorch's `addmm` with an f32 output, on CUDA): no product is written in
/// the compute dtype, cast and added. Returns `None` when done; otherwise (no gradient yet, other
/// dtypes, a CPU) the product `m1·m2`, for the caller to add.
pub fn gemm_into(g: Option<&Tensor>, m1: &Tensor, m2: &Tensor) -> Option<Tensor> {
    let fits = |g: &&Tensor| {
        g.defined()
            && g.device().is_cuda()
            && g.kind() == Kind::Float
            && matches!(m1.kind(), Kind::BFloat16 | Kind::Half)
            && g.is_contiguous()
            && g.size() == [m1.size()[0], m2.size()[1]]
    };
    match g.filter(fits) {
        Some(g) if g.f_addmm_dtype_out(g, m1, m2, Kind::Float).is_ok() => None,
        _ => Some(m1.mm(m2)),
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

/// A dequantized base weight `w` `[out, in]` as a pass holds it: a view of `buf`, which may have
/// room beside it (see [`Linear::forward_parts`]).
pub struct DenseW {
    /// `[out, in]`.
    pub w: Tensor,
    /// The buffer `w` is a view of: `w` itself, or `[out, in + r]` with the adapter's B in the
    /// last r columns, or `[out + r, in]` with r free rows after W's.
    buf: Tensor,
}

impl DenseW {
    fn plain(w: Tensor) -> DenseW {
        DenseW { buf: w.shallow_clone(), w }
    }

    /// Rows of the buffer after W's (r spare rows, or 0).
    fn spare_rows(&self) -> i64 {
        self.buf.size()[0] - self.w.size()[0]
    }

    /// Columns of the buffer after W's (the adapter's B, or 0).
    fn b_cols(&self) -> i64 {
        self.buf.size()[1] - self.w.size()[1]
    }
}

/// What [`Linear::weight_with_spare`] leaves beside the weight.
enum Spare {
    None,
    /// The adapter's B `[out, r]` in r extra columns.
    B(Tensor),
    /// r extra rows.
    Room(i64),
}

/// The backward of an adapted linear (no dropout) for input `x` `[.., in]`, upstream `dy`
/// `[.., out]`, the base weight `w` `[out, in]` in x's dtype and the adapter's compute form
/// `sa = s·A` `[r, in]`, `b` `[out, r]` ([`Lora::compute_form`]): `(dx, dA, dB)` with
/// `dx = acc + dy·W + (dy·B)·(s·A)` (when `need_dx`; the sums inside the GEMMs, so no `[.., in]`
/// temporary is written and read again; `w` is dropped after its GEMM, before the rank-r
/// products), `dB = dyᵀ·zs` and `dA = s·(dy·B)ᵀ·x` in the adapter's compute dtype, for the
/// scaled activation `zs = x·(s·A)ᵀ`, recomputed when not given. With `into`, the parameters'
/// current gradients (f32), dA and dB are added into them by their GEMMs where libtorch can
/// ([`gemm_into`]) and come back `None`; otherwise they come back for the caller to add. Without
/// a graph (the caller's `no_grad`).
///
/// When `w` has r spare rows ([`DenseW`], down_proj: `in` wider than `out`), `dx` is one GEMM,
/// `[dy | dz]·[W ; s·A]`: the adapter's part is not added into the wide `[.., in]` output by a
/// second GEMM that reads and writes it again (~100 µs per E4B down_proj backward). When B sits
/// beside W (gate/up, without `acc`), `dz = dy·B` comes out of the base GEMM as its last r
/// columns (~35 µs per E4B gate or up projection).
#[allow(clippy::too_many_arguments)]
pub fn lora_grads(
    x: &Tensor,
    zs: Option<&Tensor>,
    dy: &Tensor,
    w: DenseW,
    sa: &Tensor,
    b: &Tensor,
    scale: f64,
    acc: Option<Tensor>,
    need_dx: bool,
    into: Option<(&Tensor, &Tensor)>,
) -> (Option<Tensor>, Option<Tensor>, Option<Tensor>) {
    let (kind, ak) = (x.kind(), sa.kind());
    let (out_f, in_f) = (w.w.size()[0], w.w.size()[1]);
    let r = sa.size()[0];
    let dy2 = cast(dy, kind).reshape([-1, out_f]);
    let dya = cast(&dy2, ak);
    let stacked = need_dx && w.spare_rows() == r && ak == kind;
    // With B beside W (gate/up), `dy·[W | B] = [dy·W | dz]`: dz comes out of the base GEMM
    // instead of reading the wide dy once more.
    let beside = need_dx && acc.is_none() && w.b_cols() == r && ak == kind;
    let wide = beside.then(|| dy2.mm(&w.buf));
    let dz = match &wide {
        Some(o) => o.narrow(1, in_f, r),
        None => dya.mm(b), // [N, r], without the scale
    };
    let base = need_dx.then(|| {
        if let Some(o) = &wide {
            o.narrow(1, 0, in_f)
        } else if stacked {
            w.buf.narrow(0, out_f, r).copy_(sa);
            base_dx(&Tensor::cat(&[&dy2, &dz], 1), &w.buf, acc)
        } else {
            base_dx(&dy2, &w.w, acc)
        }
    });
    drop(w);
    let x2 = cast(x, ak).reshape([-1, in_f]);
    let zs2 = match zs {
        Some(zs) => cast(zs, ak).reshape([-1, r]),
        None => x2.mm(&sa.tr()),
    };
    let (ga, gb) = into.unzip();
    let db = gemm_into(gb, &dya.tr(), &zs2); // [out, r]
    let da = gemm_into(ga, &(&dz * scale).tr(), &x2); // [r, in]
    let dx = base.map(|mut dx| {
        if stacked {
            // The adapter's part is already in.
        } else if ak == kind {
            let _ = dx.addmm_(&dz, sa);
        } else {
            dx = (dx.to_kind(ak) + dz.mm(sa)).to_kind(kind);
        }
        // (Columns of the wider product: made contiguous for the ops downstream.)
        if beside {
            dx = dx.contiguous();
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
    // (With scale 1, as for the compute form's already scaled activation, z itself: a view of
    // it requires grad exactly when z does.)
    let zs = if scale == 1.0 { z.reshape([-1, r]) } else { z.reshape([-1, r]) * scale };
    let bt = b.tr();
    let mut y2 = y.reshape([-1, out]);
    if y2.requires_grad() || zs.requires_grad() {
        y2.addmm(&zs, &bt).view(shape.as_slice())
    } else {
        let _ = y2.addmm_(&zs, &bt);
        y2.view(shape.as_slice())
    }
}

/// For a node's backward: `p.grad += g` in place (one add that casts `g` as it reads it) and
/// `None`, or, while `p` has no gradient yet, `g` in `p`'s dtype for autograd to accumulate
/// (autograd drops it when `p` needs none). Adding here saves autograd's cast and its
/// accumulation node per adapter and pass.
fn add_into_grad(p: &Tensor, g: &Tensor) -> Option<Tensor> {
    let mut cur = p.grad();
    if cur.defined() && p.requires_grad() {
        cur += g;
        None
    } else {
        Some(g.to_kind(p.kind()))
    }
}

/// `p.grad += g` (in `p`'s dtype). The first time, when `p` has no gradient yet, autograd
/// allocates it through a one-op graph; afterwards it is an in-place add that casts `g` as it
/// reads it (the optimizer zeroes gradients in place, so they stay allocated).
pub fn accumulate_grad(p: &Tensor, g: &Tensor) {
    let mut cur = p.grad();
    if cur.defined() {
        tch::no_grad(|| {
            cur += g;
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
