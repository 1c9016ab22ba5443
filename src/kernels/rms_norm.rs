//! Launcher and CPU reference of kernels/rms_norm.cu: RMSNorm over the last dimension,
//! forward (optionally returning the per-row 1/rms for the backward) and the backward for a
//! frozen weight.
//!
//! Reference: transformers `LlamaRMSNorm` (`w · (x_f32 · rsqrt(mean(x²) + eps)).to(D)`),
//! `Gemma2RMSNorm` / `Gemma3nRMSNorm` (`(x_f32 · rsqrt(…) · s_f32).to(D)` with s = 1 + w or
//! w) and the weightless norm, docs/model-math.md §0–2. The backward is the derivative of those
//! formulas with the weight held fixed; the tests check it against autograd.

use anyhow::Result;
use tch::{Kind, Tensor};

use super::checker::{name, rel_err, tol, Checker};
use super::{dtype_code, usable, Args, Kernels};

/// How the weight enters (the kernel's `mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Llama: `w · round(xn)`, w in the compute dtype.
    Llama,
    /// Gemma: `round(xn · s)`, s an f32 scale (`1 + w`, or Gemma 3n's `w`).
    Scale,
    /// No weight: `round(xn)`.
    Plain,
}

impl Mode {
    fn code(self) -> i64 {
        match self {
            Mode::Llama => 0,
            Mode::Scale => 1,
            Mode::Plain => 2,
        }
    }
}

/// The normalized `x`: the kernel when it applies and no gradient is needed (a strided `x`, such
/// as one AltUp stream of Gemma 3n, is made contiguous for it first: one copy instead of the
/// reference's eight passes), else the reference.
pub fn forward(x: &Tensor, w: Option<&Tensor>, eps: f64, mode: Mode, kernels: Option<&Kernels>) -> Tensor {
    let grad = x.requires_grad() || w.is_some_and(Tensor::requires_grad);
    if !grad {
        let strided = !x.is_contiguous() && kernels.is_some() && x.device().is_cuda();
        let xc = if strided { x.contiguous() } else { x.shallow_clone() };
        if let Some(k) = kernel_for(&xc, w, kernels) {
            return cuda_forward(&xc, w, eps, mode, false, k).0;
        }
    }
    forward_reference(x, w, eps, mode)
}

/// [`Mode::Scale`] / [`Mode::Plain`] through libtorch's own fused RMSNorm (`at::rms_norm`, which
/// on CUDA runs one kernel forward and one backward, with its autograd formula), for the
/// recomputation with a graph, where [`forward`] would differentiate the reference's eight ops.
/// `s` must already be in `x`'s dtype (libtorch falls back to its composite path otherwise) and
/// hold the scale exactly, so this computes `round(x_f32 · rsqrt(mean(x²) + eps) · s)` like the
/// reference; the tests compare the two, values and gradients.
pub fn forward_fused(x: &Tensor, s: Option<&Tensor>, eps: f64) -> Tensor {
    let d = *x.size().last().unwrap_or(&1);
    x.rms_norm([d].as_slice(), s, eps)
}

/// The normalized `x` and f32 `1/rms` per row `[rows]` (for [`backward`]); no graph.
pub fn forward_with_rstd(
    x: &Tensor,
    w: Option<&Tensor>,
    eps: f64,
    mode: Mode,
    kernels: Option<&Kernels>,
) -> (Tensor, Tensor) {
    match kernel_for(x, w, kernels) {
        Some(k) => {
            let (y, r) = cuda_forward(x, w, eps, mode, true, k);
            (y, r.expect("rstd requested"))
        }
        None => tch::no_grad(|| (forward_reference(x, w, eps, mode), rstd_reference(x, eps))),
    }
}

/// `dx` for upstream `dy`, the input `x` and its `rstd` from [`forward_with_rstd`] (weight frozen).
pub fn backward(
    dy: &Tensor,
    x: &Tensor,
    w: Option<&Tensor>,
    rstd: &Tensor,
    mode: Mode,
    kernels: Option<&Kernels>,
) -> Tensor {
    let dy = dy.contiguous();
    match kernel_for(x, w, kernels).filter(|_| dy.kind() == x.kind() && dy.device() == x.device()) {
        Some(k) => {
            cuda_backward(&dy, x, w, rstd, mode, k).unwrap_or_else(|e| panic!("CUDA RMSNorm backward failed: {e:#}"))
        }
        None => backward_reference(&dy, x, w, rstd, mode),
    }
}

/// The reference forward (differentiable).
pub fn forward_reference(x: &Tensor, w: Option<&Tensor>, eps: f64, mode: Mode) -> Tensor {
    let xf = x.to_kind(Kind::Float);
    let var = xf.square().mean_dim(-1, true, Kind::Float);
    let xn = xf * (var + eps).rsqrt();
    match (mode, w) {
        (Mode::Llama, Some(w)) => w * xn.to_kind(x.kind()),
        (Mode::Scale, Some(s)) => (xn * s.to_kind(Kind::Float)).to_kind(x.kind()),
        _ => xn.to_kind(x.kind()),
    }
}

/// Reference `1/rms` per row, f32 `[rows]`.
pub fn rstd_reference(x: &Tensor, eps: f64) -> Tensor {
    let h = *x.size().last().unwrap_or(&1);
    let xf = x.to_kind(Kind::Float).reshape([-1, h]);
    (xf.square().mean_dim(-1, false, Kind::Float) + eps).rsqrt()
}

/// Reference backward: `dx = rstd · (dxn − xn · mean(dxn · xn))`, `dxn = dy · s`, in f32.
pub fn backward_reference(dy: &Tensor, x: &Tensor, w: Option<&Tensor>, rstd: &Tensor, mode: Mode) -> Tensor {
    let h = *x.size().last().unwrap_or(&1);
    let r = rstd.to_kind(Kind::Float).reshape([-1, 1]);
    let xn = x.to_kind(Kind::Float).reshape([-1, h]) * &r;
    // Not in place: for an f32 `dy`, `to_kind` and `reshape` alias the caller's tensor.
    let dy = dy.to_kind(Kind::Float).reshape([-1, h]);
    let dxn = match (mode, w) {
        (Mode::Llama | Mode::Scale, Some(w)) => dy * w.to_kind(Kind::Float),
        _ => dy,
    };
    let mean = (&dxn * &xn).mean_dim(-1, true, Kind::Float);
    (r * (dxn - xn * mean)).to_kind(x.kind()).view(x.size().as_slice())
}

fn kernel_for<'a>(x: &Tensor, w: Option<&Tensor>, kernels: Option<&'a Kernels>) -> Option<&'a Kernels> {
    let k = usable(kernels, &[x])?;
    match w {
        Some(w) => usable(Some(k), &[w]).filter(|_| w.dim() == 1 && w.size()[0] == *x.size().last().unwrap_or(&0)),
        None => Some(k),
    }
}

fn block_for(h: i64) -> u32 {
    match h {
        ..=256 => 64,
        257..=1024 => 128,
        1025..=4096 => 256,
        _ => 512,
    }
}

/// The scalar entry points (`rms_norm_fwd` / `rms_norm_bwd`) where the default takes the 8-wide
/// ones (`rms_norm_fwd_x8` / `rms_norm_bwd_x8`: 16-byte loads, 1.7× and 2.3× faster on an H200
/// at 4096², `tuner kernels --bench`): the forward with 1/rms, or `None` where the 8-wide entries
/// do not apply (a 4-byte dtype, a width not a multiple of 8, rows not 16-byte aligned: the
/// default is already scalar there) or no kernel is usable. For the checks and timings.
pub fn forward_with_rstd_scalar(
    x: &Tensor,
    w: Option<&Tensor>,
    eps: f64,
    mode: Mode,
    kernels: Option<&Kernels>,
) -> Option<(Tensor, Tensor)> {
    let k = kernel_for(x, w, kernels).filter(|_| wide(&[x]))?;
    let (y, r) = cuda_launch_forward(x, w, eps, mode, true, k, false);
    Some((y, r.expect("rstd requested")))
}

/// [`backward`] through `rms_norm_bwd`, or `None` as for [`forward_with_rstd_scalar`].
pub fn backward_scalar(
    dy: &Tensor,
    x: &Tensor,
    w: Option<&Tensor>,
    rstd: &Tensor,
    mode: Mode,
    kernels: Option<&Kernels>,
) -> Option<Tensor> {
    let dy = dy.contiguous();
    let k = kernel_for(x, w, kernels).filter(|_| wide(&[x, &dy]) && dy.kind() == x.kind())?;
    Some(
        cuda_launch_backward(&dy, x, w, rstd, mode, k, false)
            .unwrap_or_else(|e| panic!("CUDA RMSNorm backward failed: {e:#}")),
    )
}

/// 2-byte elements, a row width that is a multiple of 8 and 16-byte aligned data.
fn wide(ts: &[&Tensor]) -> bool {
    ts.iter().all(|t| {
        t.kind().elt_size_in_bytes() == 2
            && t.size().last().is_some_and(|h| h % 8 == 0)
            && (t.data_ptr() as usize).is_multiple_of(16)
    })
}

/// The forward through the 8-wide entry where it applies, the scalar one otherwise.
fn cuda_forward(
    x: &Tensor,
    w: Option<&Tensor>,
    eps: f64,
    mode: Mode,
    want_rstd: bool,
    k: &Kernels,
) -> (Tensor, Option<Tensor>) {
    cuda_launch_forward(x, w, eps, mode, want_rstd, k, wide(&[x]))
}

/// The forward through `rms_norm_fwd`, or `rms_norm_fwd_x8` (8 values per load) when `x8`.
fn cuda_launch_forward(
    x: &Tensor,
    w: Option<&Tensor>,
    eps: f64,
    mode: Mode,
    want_rstd: bool,
    k: &Kernels,
    x8: bool,
) -> (Tensor, Option<Tensor>) {
    let h = *x.size().last().unwrap_or(&1);
    let rows = x.numel() as i64 / h.max(1);
    let y = x.empty_like();
    let rstd = want_rstd.then(|| Tensor::empty([rows], (Kind::Float, x.device())));
    let mode = if w.is_none() { Mode::Plain } else { mode };
    let wdt = w.and_then(|w| dtype_code(w.kind())).unwrap_or(0);
    let args = Args::default()
        .ptr(x)
        .ptr_opt(w)
        .ptr(&y)
        .ptr_opt(rstd.as_ref())
        .i32(h)
        .f32(eps)
        .i32(mode.code())
        .i32(dtype_code(x.kind()).unwrap_or(0))
        .i32(wdt);
    if rows > 0 {
        let (entry, block) = if x8 { ("rms_norm_fwd_x8", block_for(h / 8)) } else { ("rms_norm_fwd", block_for(h)) };
        k.launch(entry, rows as u32, block, args).unwrap_or_else(|e| panic!("CUDA RMSNorm failed: {e:#}"));
    }
    (y, rstd)
}

/// The backward through the 8-wide entry where it applies, the scalar one otherwise.
fn cuda_backward(
    dy: &Tensor,
    x: &Tensor,
    w: Option<&Tensor>,
    rstd: &Tensor,
    mode: Mode,
    k: &Kernels,
) -> Result<Tensor> {
    cuda_launch_backward(dy, x, w, rstd, mode, k, wide(&[x, dy]))
}

/// The backward through `rms_norm_bwd`, or `rms_norm_bwd_x8` when `x8`.
fn cuda_launch_backward(
    dy: &Tensor,
    x: &Tensor,
    w: Option<&Tensor>,
    rstd: &Tensor,
    mode: Mode,
    k: &Kernels,
    x8: bool,
) -> Result<Tensor> {
    let h = *x.size().last().unwrap_or(&1);
    let rows = x.numel() as i64 / h.max(1);
    let dx = x.empty_like();
    let mode = if w.is_none() { Mode::Plain } else { mode };
    let rstd = rstd.to_kind(Kind::Float).contiguous();
    let wdt = w.and_then(|w| dtype_code(w.kind())).unwrap_or(0);
    let args = Args::default()
        .ptr(dy)
        .ptr(x)
        .ptr_opt(w)
        .ptr(&rstd)
        .ptr(&dx)
        .i32(h)
        .i32(mode.code())
        .i32(dtype_code(x.kind()).unwrap_or(0))
        .i32(wdt);
    if rows > 0 {
        let (entry, block) = if x8 { ("rms_norm_bwd_x8", block_for(h / 8)) } else { ("rms_norm_bwd", block_for(h)) };
        k.launch(entry, rows as u32, block, args)?;
    }
    Ok(dx)
}

/// The kernel against its reference ([`super::check`]): RMSNorm forward and backward, each mode and dtype, the 8-wide and scalar entry points.
pub fn check(k: &Kernels, c: &mut Checker) {
    let device = c.device;
    for kind in [Kind::BFloat16, Kind::Float, Kind::Half] {
        for (mode, label) in [(Mode::Llama, "llama"), (Mode::Scale, "scale"), (Mode::Plain, "plain")] {
            let (rows_n, h) = if kind == Kind::BFloat16 && mode == Mode::Llama { (4096, 4096) } else { (64, 1000) };
            let x = (Tensor::randn([rows_n, h], (Kind::Float, device)) * 3.0).to_kind(kind);
            let w = match mode {
                Mode::Llama => Some((Tensor::rand([h], (Kind::Float, device)) + 0.5).to_kind(kind)),
                Mode::Scale => Some(Tensor::rand([h], (Kind::Float, device)) + 0.5),
                Mode::Plain => None,
            };
            let (w, eps, tl) = (w.as_ref(), 1e-6, tol(kind));
            let (y, rstd) = forward_with_rstd(&x, w, eps, mode, Some(k));
            let y_ref = forward_reference(&x, w, eps, mode);
            let io = (2 * rows_n * h) as f64 * kind.elt_size_in_bytes() as f64;
            let big = rows_n == 4096;
            let case = |what: &str| format!("rms_norm_{what} {label} {} [{rows_n}×{h}]", name(kind));
            c.case(big, case("fwd"), rel_err(&y, &y_ref), tl, io, &mut || {
                let _ = forward(&x, w, eps, mode, Some(k));
            });
            let r_ref = rstd_reference(&x, eps);
            // The 8-wide entry sums in another order: 1/rms agrees to f32 rounding of a long sum.
            let rstd_name = format!("rms_norm_fwd rstd {label} {}", name(kind));
            c.case(false, rstd_name, rel_err(&rstd, &r_ref), 1e-5, 0.0, &mut || {});
            let dy = Tensor::randn([rows_n, h], (Kind::Float, device)).to_kind(kind);
            let dx_ref = backward_reference(&dy, &x, w, &r_ref, mode);
            // The default takes the 8-wide entry points where they apply (2-byte dtypes; 1000 is a
            // multiple of 8 too); there the scalar ones are checked and timed beside them.
            if let Some((y8, r8)) = forward_with_rstd_scalar(&x, w, eps, mode, Some(k)) {
                let rstd_name = format!("rms_norm_fwd scalar rstd {label} {}", name(kind));
                c.case(false, rstd_name, rel_err(&r8, &r_ref), 2e-6, 0.0, &mut || {});
                c.case(big, case("fwd scalar"), rel_err(&y8, &y_ref), tl, io, &mut || {
                    let _ = forward_with_rstd_scalar(&x, w, eps, mode, Some(k));
                });
                let dx8 = backward_scalar(&dy, &x, w, &r8, mode, Some(k)).expect("applies to x and dy alike");
                c.case(big, case("bwd scalar"), rel_err(&dx8, &dx_ref), tl, 1.5 * io, &mut || {
                    let _ = backward_scalar(&dy, &x, w, &r8, mode, Some(k));
                });
            }
            let dx = backward(&dy, &x, w, &rstd, mode, Some(k));
            c.case(big, case("bwd"), rel_err(&dx, &dx_ref), tl, 1.5 * io, &mut || {
                let _ = backward(&dy, &x, w, &rstd, mode, Some(k));
            });
        }
    }
}
