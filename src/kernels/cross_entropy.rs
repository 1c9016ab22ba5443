//! Launcher and CPU reference of kernels/cross_entropy.cu: the summed cross-entropy of rows of
//! logits (with the optional final softcap) and its gradient with respect to the raw logits,
//! written over them in place, so the training loss needs no f32 logits, no log-softmax kept for
//! autograd and no separate softcap passes.
//!
//! Reference: torch's `cross_entropy(softcap(logits).float(), targets, reduction="sum")` and its
//! autograd backward (transformers' `ForCausalLMLoss`; the Gemma final softcap,
//! docs/model-math.md §1). The tests check [`reference`] against autograd and the kernel against
//! [`reference`].

use tch::{Kind, Tensor};

use super::checker::{name, rel_err, tol, Checker};
use super::{dtype_code, usable, Args, Kernels};

/// Per-row NLL `[R]` (f32) of `logits` `[R, V]` against `targets` `[R]` (negative: ignored, NLL 0)
/// with the final softcap `cap`, and the gradient of `scale · Σ NLL` with respect to the raw
/// logits in their dtype. With the kernels, the gradient is written over `logits` (returned as
/// the second tensor); else the reference computes it.
pub fn loss_and_grad(
    logits: Tensor,
    targets: &Tensor,
    cap: Option<f64>,
    scale: f64,
    kernels: Option<&Kernels>,
) -> (Tensor, Tensor) {
    // `usable` vets the logits (device, contiguity, float dtype); the int64 targets separately.
    let fits = logits.dim() == 2
        && !logits.requires_grad()
        && logits.size()[1] % 8 == 0
        && targets.size() == [logits.size()[0]]
        && targets.kind() == Kind::Int64
        && targets.device() == logits.device()
        && targets.is_contiguous();
    match usable(kernels, &[&logits]) {
        Some(k) if fits => {
            let nll =
                launch(k, &logits, targets, cap, scale).unwrap_or_else(|e| panic!("CUDA cross-entropy failed: {e:#}"));
            (nll, logits)
        }
        _ => reference(&logits, targets, cap, scale),
    }
}

/// Per-row NLL only (evaluation): the kernel with a zero scale (its gradient, zeros, overwrites
/// `logits`), or the reference's first half.
pub fn nll(logits: Tensor, targets: &Tensor, cap: Option<f64>, kernels: Option<&Kernels>) -> Tensor {
    match usable(kernels, &[&logits]) {
        Some(_) => loss_and_grad(logits, targets, cap, 0.0, kernels).0,
        None => reference_nll(&logits, targets, cap).0,
    }
}

/// The f32 NLL and what its gradient needs: `(nll, z, lse, t, keep)`.
fn reference_nll(logits: &Tensor, targets: &Tensor, cap: Option<f64>) -> (Tensor, Tensor, Tensor, Tensor, Tensor) {
    let x = logits.to_kind(Kind::Float);
    let z = match cap {
        Some(c) => (&x / c).tanh() * c,
        None => x,
    };
    let lse = z.logsumexp(&[-1i64][..], true);
    let live = targets.ge(0);
    let t = targets.where_self(&live, &targets.zeros_like()).unsqueeze(-1);
    let keep = live.to_kind(Kind::Float);
    let nll = (lse.squeeze_dim(-1) - z.gather(-1, &t, false).squeeze_dim(-1)) * &keep;
    (nll, z, lse, t, keep)
}

/// The reference in f32 (no graph): `(nll, grad)`, the gradient rounded once to the logits' dtype.
pub fn reference(logits: &Tensor, targets: &Tensor, cap: Option<f64>, scale: f64) -> (Tensor, Tensor) {
    let (nll, z, lse, t, keep) = reference_nll(logits, targets, cap);
    let onehot = z.zeros_like().scatter_value(-1, &t, 1.0);
    let mut g = (&z - &lse).exp() - onehot;
    if let Some(c) = cap {
        g *= 1.0 - (&z / c).square();
    }
    let grad = g * keep.unsqueeze(-1) * scale;
    (nll, grad.to_kind(logits.kind()))
}

fn launch(k: &Kernels, logits: &Tensor, targets: &Tensor, cap: Option<f64>, scale: f64) -> anyhow::Result<Tensor> {
    let (rows, v) = logits.size2()?;
    let nll = Tensor::empty([rows], (Kind::Float, logits.device()));
    let wide = logits.kind().elt_size_in_bytes() == 2 && (logits.data_ptr() as usize).is_multiple_of(16);
    let args = Args::default()
        .ptr(logits)
        .ptr(targets)
        .ptr(&nll)
        .i32(v)
        .f32(cap.unwrap_or(0.0))
        .f32(scale)
        .i32(dtype_code(logits.kind()).unwrap_or(0))
        .i32(wide as i64);
    k.launch("cross_entropy", rows as u32, 1024, args)?;
    Ok(nll)
}

/// The kernel against the reference ([`super::check`]): a chunk of E4B's loss (512 rows of its
/// 262,144-entry vocabulary, softcap 30) in bf16, timed; a small f32 one without a cap, with an
/// ignored row.
pub fn check(k: &Kernels, c: &mut Checker) {
    let device = c.device;
    for (kind, [rows, v], cap) in [(Kind::BFloat16, [512i64, 262144], Some(30.0)), (Kind::Float, [7, 1000], None)] {
        let logits = (Tensor::randn([rows, v], (Kind::Float, device)) * 4.0).to_kind(kind);
        let t = Tensor::randint(v, [rows], (Kind::Int64, device));
        let _ = t.get(1).fill_(-100);
        let scale = 1.0 / 300.0;
        let (nll_ref, grad_ref) = reference(&logits, &t, cap, scale);
        let nll = launch(k, &logits.copy(), &t, cap, scale).unwrap_or_else(|e| panic!("{e:#}"));
        let grad = logits.copy();
        let _ = launch(k, &grad, &t, cap, scale);
        // The gradient's scale is ~scale / V per entry: compare it relative to its own maximum.
        let gmax = grad_ref.abs().max().double_value(&[]).max(1e-30);
        let unit = |g: &Tensor| g.to_kind(Kind::Float) / gmax;
        let err = rel_err(&nll, &nll_ref).max(rel_err(&unit(&grad), &unit(&grad_ref)));
        let bytes = 3.0 * logits.numel() as f64 * kind.elt_size_in_bytes() as f64;
        let label = format!("cross_entropy{} {} [{rows}×{v}]", if cap.is_some() { " softcap" } else { "" }, name(kind));
        let work = logits.copy();
        c.case(kind == Kind::BFloat16, label, err, tol(kind), bytes, &mut || {
            let _ = launch(k, &work, &t, cap, scale);
        });
    }
}
