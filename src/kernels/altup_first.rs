//! Launcher and CPU reference of kernels/altup_first.cu: Gemma 3n's first prediction, the
//! corrected active stream scaled by `correct_output_scale`,
//! `y = round(a + c[0]·(out − a)) · scale`, forward and backward, as one autograd node
//! ([`super::autograd`]) when a gradient is needed. `a` is the active stream of AltUp's
//! prediction ([`super::altup_predict::forward`]'s second output), so the node's gradient for it
//! is one token row wide and never a zero-filled `[.., N, H]` slice.
//!
//! Reference: transformers `Gemma3nTextDecoderLayer.forward` (`first_prediction =
//! corrected_predictions[0]`, `altup.scale_corrected_output`; docs/model-math.md §1): stream 0 of
//! [`super::altup_correct::reference`], computed here in f32 and rounded where HF rounds (the
//! correction, then the product). The tests check the reference backward against autograd and
//! the kernels against the reference.

use std::sync::Arc;

use anyhow::{bail, Result};
use tch::{Kind, Tensor};

use super::autograd;
use super::checker::{name, rel_err, tol, Checker};
use super::{dtype_code, on_device, Args, Kernels};

/// `y` `[.., H]` for the active prediction `a` `[.., H]`, the layer output `out` `[.., H]`, the
/// coefficients `c` `[.., N]` (only `c[.., 0]` is read) and the optional `scale` `[H]`, in a's
/// dtype: on a GPU with the kernels, the kernel (with its backward as one node when a gradient
/// is needed); else the differentiable reference.
pub fn forward(a: &Tensor, out: &Tensor, c: &Tensor, scale: Option<&Tensor>, kernels: Option<&Arc<Kernels>>) -> Tensor {
    let mut ins = vec![a, out, c];
    ins.extend(scale);
    let grad = ins.iter().any(|t| t.requires_grad());
    match on_device(kernels.map(|k| &**k), &ins) {
        Some(_) if fits(a, out, c, scale) && (!grad || autograd::available()) => fused(a, out, c, scale, kernels),
        _ => reference(a, out, c, scale),
    }
}

/// The op as one node: forward and backward by the kernels when `kernels` is given, by the
/// reference on any device when not (the CPU tests hold that node to autograd). `scale` gets no
/// gradient (a frozen weight).
pub fn fused(a: &Tensor, out: &Tensor, c: &Tensor, scale: Option<&Tensor>, kernels: Option<&Arc<Kernels>>) -> Tensor {
    let (a, out, c) = (a.contiguous(), out.contiguous(), c.contiguous());
    let scale = scale.map(|s| s.detach().contiguous());
    let y = tch::no_grad(|| match kernels {
        Some(k) => launch_forward(k, &a, &out, &c, scale.as_ref())
            .unwrap_or_else(|e| panic!("CUDA AltUp first prediction failed: {e:#}")),
        None => reference(&a, &out, &c, scale.as_ref()),
    });
    let (ad, od, cd, k) = (a.detach(), out.detach(), c.detach(), kernels.cloned());
    let sd = scale.as_ref().map(|s| s.shallow_clone());
    let backward: autograd::Backward = Box::new(move |grads| {
        let dy = grads[0].to_kind(ad.kind()).contiguous();
        let (da, dout, dc) = match &k {
            Some(k) => launch_backward(k, &dy, &ad, &od, &cd, sd.as_ref())?,
            None => backward_reference(&dy, &ad, &od, &cd, sd.as_ref()),
        };
        Ok(vec![Some(da), Some(dout), Some(dc)])
    });
    autograd::attach("AltUpFirst", &[&a, &out, &c], &[&y], backward)
        .unwrap_or_else(|e| panic!("AltUp first prediction: {e:#}"));
    y
}

/// The reference (differentiable): `a + c[0]·(out − a)` in f32 rounded to a's dtype, times
/// `scale` in that dtype.
pub fn reference(a: &Tensor, out: &Tensor, c: &Tensor, scale: Option<&Tensor>) -> Tensor {
    let af = a.to_kind(Kind::Float);
    let c0 = c.select(-1, 0).to_kind(Kind::Float).unsqueeze(-1);
    let v = (&af + c0 * (out.to_kind(Kind::Float) - &af)).to_kind(a.kind());
    match scale {
        Some(s) => v * s,
        None => v,
    }
}

/// The reference backward in f32, one rounding per output (and the product's, as autograd
/// rounds it): `(da, dout, dc)` for `dy`, `dc` zero past column 0.
pub fn backward_reference(
    dy: &Tensor,
    a: &Tensor,
    out: &Tensor,
    c: &Tensor,
    scale: Option<&Tensor>,
) -> (Tensor, Tensor, Tensor) {
    let dv = match scale {
        Some(s) => dy * s,
        None => dy.shallow_clone(),
    }
    .to_kind(Kind::Float);
    let af = a.to_kind(Kind::Float);
    let c0 = c.select(-1, 0).to_kind(Kind::Float).unsqueeze(-1);
    let e = out.to_kind(Kind::Float) - &af;
    let da = &dv - &c0 * &dv;
    let dout = &c0 * &dv;
    let dc0 = (&dv * e).sum_dim_intlist(-1, true, Kind::Float);
    let n = c.size()[c.dim() - 1];
    let rest = dc0.zeros_like().expand([&dc0.size()[..dc0.dim() - 1], &[n - 1]].concat(), false);
    let dc = Tensor::cat(&[dc0, rest], -1);
    (da.to_kind(a.kind()), dout.to_kind(out.kind()), dc.to_kind(c.kind()))
}

/// Shapes the kernels take: `a`, `out` `[.., H]`, `c` `[.., N]` with the same leading dims,
/// 1 ≤ N ≤ 32, `scale` `[H]`, one dtype.
fn fits(a: &Tensor, out: &Tensor, c: &Tensor, scale: Option<&Tensor>) -> bool {
    let (sa, sc) = (a.size(), c.size());
    let h = sa.last().copied().unwrap_or(0);
    let n = sc.last().copied().unwrap_or(0);
    !sa.is_empty()
        && out.size() == sa
        && sc.len() == sa.len()
        && sc[..sc.len() - 1] == sa[..sa.len() - 1]
        && (1..=32).contains(&n)
        && [out, c].iter().all(|t| t.kind() == a.kind())
        && scale.is_none_or(|s| s.size() == [h] && s.kind() == a.kind())
}

/// Tokens and width of `a` `[.., H]`, streams of `c` `[.., N]`.
fn dims(a: &Tensor, c: &Tensor) -> (i64, i64, i64) {
    let h = a.size().last().copied().unwrap_or(1);
    (a.numel() as i64 / h.max(1), c.size().last().copied().unwrap_or(1), h)
}

fn launch_forward(k: &Kernels, a: &Tensor, out: &Tensor, c: &Tensor, scale: Option<&Tensor>) -> Result<Tensor> {
    let (rows, n, h) = dims(a, c);
    let y = a.empty_like();
    let dt = dtype_code(a.kind()).unwrap_or(0);
    let args = Args::default().ptr(a).ptr(out).ptr(c).ptr_opt(scale).ptr(&y).i32(n).i32(h).i32(dt);
    k.launch("altup_first_fwd", rows as u32, 256, args)?;
    Ok(y)
}

fn launch_backward(
    k: &Kernels,
    dy: &Tensor,
    a: &Tensor,
    out: &Tensor,
    c: &Tensor,
    scale: Option<&Tensor>,
) -> Result<(Tensor, Tensor, Tensor)> {
    if dy.size() != a.size() || dy.kind() != a.kind() {
        bail!(
            "upstream gradient {:?} {:?} does not match the stream {:?} {:?}",
            dy.size(),
            dy.kind(),
            a.size(),
            a.kind()
        );
    }
    let (rows, n, h) = dims(a, c);
    let (da, dout, dc) = (a.empty_like(), out.empty_like(), c.empty_like());
    let dt = dtype_code(a.kind()).unwrap_or(0);
    let args = Args::default().ptr(dy).ptr(a).ptr(out).ptr(c).ptr_opt(scale).ptr(&da).ptr(&dout).ptr(&dc);
    k.launch("altup_first_bwd", rows as u32, 256, args.i32(n).i32(h).i32(dt))?;
    Ok((da, dout, dc))
}

/// The kernels against the reference ([`super::check`]): E4B's shape in bf16 with a scale
/// (timed) and a small f32 one with 3 streams, an odd width and no scale.
pub fn check(k: &Kernels, c: &mut Checker) {
    let device = c.device;
    for (kind, [rows, n, h], scaled) in [(Kind::BFloat16, [4096i64, 4, 2048], true), (Kind::Float, [37, 3, 301], false)]
    {
        let randn = |shape: &[i64]| Tensor::randn(shape, (Kind::Float, device)).to_kind(kind);
        let (a, out, coef, dy) = (randn(&[rows, h]), randn(&[rows, h]), randn(&[rows, n]), randn(&[rows, h]));
        let scale = scaled.then(|| randn(&[h]));
        let y = launch_forward(k, &a, &out, &coef, scale.as_ref()).unwrap_or_else(|e| panic!("{e:#}"));
        let err = rel_err(&y, &reference(&a, &out, &coef, scale.as_ref()));
        let got = launch_backward(k, &dy, &a, &out, &coef, scale.as_ref()).unwrap_or_else(|e| panic!("{e:#}"));
        let want = backward_reference(&dy, &a, &out, &coef, scale.as_ref());
        let errb = rel_err(&got.0, &want.0).max(rel_err(&got.1, &want.1)).max(rel_err(&got.2, &want.2));
        let bytes = a.numel() as f64 * kind.elt_size_in_bytes() as f64;
        let (dims, timed, t) = (format!("[{rows}×{h}]"), kind == Kind::BFloat16, tol(kind));
        c.case(timed, format!("altup_first {} {dims}", name(kind)), err, t, 3.0 * bytes, &mut || {
            let _ = launch_forward(k, &a, &out, &coef, scale.as_ref());
        });
        c.case(timed, format!("altup_first backward {} {dims}", name(kind)), errb, t, 5.0 * bytes, &mut || {
            let _ = launch_backward(k, &dy, &a, &out, &coef, scale.as_ref());
        });
    }
}
