//! Launcher and CPU reference of kernels/altup_correct.cu: Gemma 3n's AltUp correction with the
//! per-layer input added to the non-active streams,
//! `y[p] = pred[p] + c[p]·(out − pred[0]) + [p > 0]·g`, forward and backward, as one autograd
//! node ([`super::autograd`]) when a gradient is needed.
//!
//! Reference: transformers `Gemma3nTextAltUp.correct` (`c` is `correction_coefs(modalities) + 1`)
//! and `Gemma3nTextDecoderLayer.forward`'s `corrected_predictions[1:] += first_prediction`
//! (docs/model-math.md §1), computed here in f32 with one rounding per output where HF rounds each
//! step. The tests check the reference backward against autograd and the kernels against the
//! reference.

use std::sync::Arc;

use anyhow::{bail, Result};
use tch::{Kind, Tensor};

use super::altup_predict::{wide, MAX_STREAMS};
use super::autograd;
use super::checker::{name, rel_err, tol, Checker};
use super::{dtype_code, on_device, Args, Kernels};

/// `y` `[.., N, H]` for the predictions `pred` `[.., N, H]`, the layer output `out` `[.., H]`,
/// the coefficients `c` `[.., N]` and the per-layer term `g` `[.., H]`, in pred's dtype: on a GPU
/// with the kernels, the kernel (with its backward as one node when a gradient is needed); else
/// the differentiable reference.
pub fn forward(pred: &Tensor, out: &Tensor, c: &Tensor, g: &Tensor, kernels: Option<&Arc<Kernels>>) -> Tensor {
    let ins = [pred, out, c, g];
    let grad = ins.iter().any(|t| t.requires_grad());
    match on_device(kernels.map(|k| &**k), &ins) {
        Some(_) if fits(pred, out, c, g) && (!grad || autograd::available()) => fused(pred, out, c, g, kernels),
        _ => reference(pred, out, c, g),
    }
}

/// The op as one node: forward and backward by the kernels when `kernels` is given, by the
/// reference on any device when not (the CPU tests hold that node to autograd).
pub fn fused(pred: &Tensor, out: &Tensor, c: &Tensor, g: &Tensor, kernels: Option<&Arc<Kernels>>) -> Tensor {
    let (pred, out, c, g) = (pred.contiguous(), out.contiguous(), c.contiguous(), g.contiguous());
    let y = tch::no_grad(|| match kernels {
        Some(k) => {
            launch_forward(k, &pred, &out, &c, &g).unwrap_or_else(|e| panic!("CUDA AltUp correct failed: {e:#}"))
        }
        None => reference(&pred, &out, &c, &g),
    });
    let (pd, od, cd, k) = (pred.detach(), out.detach(), c.detach(), kernels.cloned());
    let backward: autograd::Backward = Box::new(move |grads| {
        let dy = grads[0].to_kind(pd.kind()).contiguous();
        let (dpred, dout, dc, dg) = match &k {
            Some(k) => launch_backward(k, &dy, &pd, &od, &cd)?,
            None => backward_reference(&dy, &pd, &od, &cd),
        };
        Ok(vec![Some(dpred), Some(dout), Some(dc), Some(dg)])
    });
    autograd::attach("AltUpCorrect", &[&pred, &out, &c, &g], &[&y], backward)
        .unwrap_or_else(|e| panic!("AltUp correct: {e:#}"));
    y
}

/// The reference (differentiable): `pred + c·(out − pred[0]) + [p > 0]·g` in f32, rounded once.
pub fn reference(pred: &Tensor, out: &Tensor, c: &Tensor, g: &Tensor) -> Tensor {
    let n = pred.size()[pred.dim() - 2];
    let pf = pred.to_kind(Kind::Float);
    let e = out.to_kind(Kind::Float) - pf.select(-2, 0);
    let mask: Vec<f32> = (0..n).map(|p| if p > 0 { 1.0 } else { 0.0 }).collect();
    let not_first = Tensor::from_slice(&mask).view([n, 1]).to_device(pred.device());
    let y =
        &pf + c.to_kind(Kind::Float).unsqueeze(-1) * e.unsqueeze(-2) + not_first * g.to_kind(Kind::Float).unsqueeze(-2);
    y.to_kind(pred.kind())
}

/// The reference backward in f32, one rounding per output: `(dpred, dout, dc, dg)` for `dy`.
pub fn backward_reference(dy: &Tensor, pred: &Tensor, out: &Tensor, c: &Tensor) -> (Tensor, Tensor, Tensor, Tensor) {
    let n = pred.size()[pred.dim() - 2];
    let d = dy.to_kind(Kind::Float);
    let e = out.to_kind(Kind::Float) - pred.select(-2, 0).to_kind(Kind::Float);
    let de = (&d * c.to_kind(Kind::Float).unsqueeze(-1)).sum_dim_intlist(-2, false, Kind::Float);
    let dc = (&d * e.unsqueeze(-2)).sum_dim_intlist(-1, false, Kind::Float);
    let dg = d.narrow(-2, 1, n - 1).sum_dim_intlist(-2, false, Kind::Float);
    let dpred = Tensor::cat(&[(d.select(-2, 0) - &de).unsqueeze(-2), d.narrow(-2, 1, n - 1)], -2);
    let kind = pred.kind();
    (dpred.to_kind(kind), de.to_kind(out.kind()), dc.to_kind(c.kind()), dg.to_kind(kind))
}

/// Shapes the kernels take: pred `[.., N, H]`, out and g `[.., H]`, c `[.., N]`, the same leading
/// dims, 2 ≤ N ≤ [`MAX_STREAMS`], one dtype.
fn fits(pred: &Tensor, out: &Tensor, c: &Tensor, g: &Tensor) -> bool {
    let ps = pred.size();
    if ps.len() < 2 || [out, c, g].iter().any(|t| t.kind() != pred.kind()) {
        return false;
    }
    let (lead, n, h) = (&ps[..ps.len() - 2], ps[ps.len() - 2], ps[ps.len() - 1]);
    let with = |last: i64| [lead, &[last]].concat();
    (2..=MAX_STREAMS).contains(&n) && out.size() == with(h) && g.size() == with(h) && c.size() == with(n)
}

/// Tokens, streams and width of `pred` `[.., N, H]`.
fn dims(pred: &Tensor) -> (i64, i64, i64) {
    let sz = pred.size();
    let (n, h) = (sz[sz.len() - 2], sz[sz.len() - 1]);
    (pred.numel() as i64 / (n * h).max(1), n, h)
}

fn launch_forward(k: &Kernels, pred: &Tensor, out: &Tensor, c: &Tensor, g: &Tensor) -> Result<Tensor> {
    let (rows, n, h) = dims(pred);
    let y = pred.empty_like();
    let dt = dtype_code(pred.kind()).unwrap_or(0);
    let args = Args::default().ptr(pred).ptr(out).ptr(c).ptr(g).ptr(&y);
    if wide(n, h, &[pred, out, g, &y]) {
        k.launch("altup_correct_fwd_x8", rows as u32, 256, args.i32(h / 8).i32(dt))?;
    } else {
        k.launch("altup_correct_fwd", rows as u32, 256, args.i32(n).i32(h).i32(dt))?;
    }
    Ok(y)
}

fn launch_backward(
    k: &Kernels,
    dy: &Tensor,
    pred: &Tensor,
    out: &Tensor,
    c: &Tensor,
) -> Result<(Tensor, Tensor, Tensor, Tensor)> {
    if dy.size() != pred.size() || dy.kind() != pred.kind() {
        bail!(
            "upstream gradient {:?} {:?} does not match the streams {:?} {:?}",
            dy.size(),
            dy.kind(),
            pred.size(),
            pred.kind()
        );
    }
    let (rows, n, h) = dims(pred);
    let (dpred, dout, dc, dg) = (pred.empty_like(), out.empty_like(), c.empty_like(), out.empty_like());
    let dt = dtype_code(pred.kind()).unwrap_or(0);
    let args = Args::default().ptr(dy).ptr(pred).ptr(out).ptr(c).ptr(&dpred).ptr(&dout).ptr(&dc).ptr(&dg);
    if wide(n, h, &[dy, pred, out, &dpred, &dout, &dg]) {
        k.launch("altup_correct_bwd_x8", rows as u32, 256, args.i32(h / 8).i32(dt))?;
    } else {
        k.launch("altup_correct_bwd", rows as u32, 256, args.i32(n).i32(h).i32(dt))?;
    }
    Ok((dpred, dout, dc, dg))
}

/// The kernels against the reference ([`super::check`]): E4B's shape in bf16 (timed) and a
/// small f32 one with 3 streams and an odd width.
pub fn check(k: &Kernels, c: &mut Checker) {
    let device = c.device;
    for (kind, [rows, n, h]) in [(Kind::BFloat16, [4096i64, 4, 2048]), (Kind::Float, [37, 3, 301])] {
        let randn = |shape: &[i64]| Tensor::randn(shape, (Kind::Float, device)).to_kind(kind);
        let (pred, out, coef, g, dy) =
            (randn(&[rows, n, h]), randn(&[rows, h]), randn(&[rows, n]), randn(&[rows, h]), randn(&[rows, n, h]));
        let y = launch_forward(k, &pred, &out, &coef, &g).unwrap_or_else(|e| panic!("{e:#}"));
        let err = rel_err(&y, &reference(&pred, &out, &coef, &g));
        let got = launch_backward(k, &dy, &pred, &out, &coef).unwrap_or_else(|e| panic!("{e:#}"));
        let want = backward_reference(&dy, &pred, &out, &coef);
        let errb = [(&got.0, &want.0), (&got.1, &want.1), (&got.2, &want.2), (&got.3, &want.3)]
            .iter()
            .map(|(a, b)| rel_err(a, b))
            .fold(0.0, f64::max);
        let bytes = 2.5 * pred.numel() as f64 * kind.elt_size_in_bytes() as f64;
        let (dims, timed, t) = (format!("[{rows}×{n}×{h}]"), kind == Kind::BFloat16, tol(kind));
        c.case(timed, format!("altup_correct {} {dims}", name(kind)), err, t, bytes, &mut || {
            let _ = launch_forward(k, &pred, &out, &coef, &g);
        });
        c.case(timed, format!("altup_correct backward {} {dims}", name(kind)), errb, t, 1.5 * bytes, &mut || {
            let _ = launch_backward(k, &dy, &pred, &out, &coef);
        });
    }
}
