//! Launcher and CPU reference of kernels/altup_predict.cu: Gemma 3n's AltUp prediction
//! `pred[p] = s[p] + Σ_q r[p, q]·s[q]` over the N streams of each token, forward and backward,
//! as one autograd node ([`super::autograd`]) when a gradient is needed.
//!
//! Reference: transformers `Gemma3nTextAltUp.predict` (a per-token `[H, N] × [N, N]` matmul plus
//! the residual; docs/model-math.md §1), computed here in f32 with one rounding of the sum where
//! HF rounds the product and the sum. Backward: `ds = dp + rᵀ·dp`, `dr = dp·sᵀ` per token; the
//! tests check the reference backward against autograd and the kernels against the reference.

use std::sync::Arc;

use anyhow::{bail, Result};
use tch::{Kind, Tensor};

use super::autograd;
use super::checker::{name, rel_err, tol, Checker};
use super::{dtype_code, on_device, Args, Kernels};

/// Most streams the kernels take (Gemma 3n has 4).
pub const MAX_STREAMS: i64 = 4;

/// `pred` for streams `s` `[.., N, H]` and per-token coefficients `r` `[.., N, N]`, in s's dtype:
/// on a GPU with the kernels, the kernel (with its backward as one node when a gradient is
/// needed); else the differentiable reference.
pub fn forward(s: &Tensor, r: &Tensor, kernels: Option<&Arc<Kernels>>) -> Tensor {
    let grad = s.requires_grad() || r.requires_grad();
    match on_device(kernels.map(|k| &**k), &[s, r]) {
        Some(_) if fits(s, r) && (!grad || autograd::available()) => fused(s, r, kernels),
        _ => reference(s, r),
    }
}

/// The op as one node: forward and backward by the kernels when `kernels` is given, by the
/// reference on any device when not (the CPU tests hold that node to autograd).
pub fn fused(s: &Tensor, r: &Tensor, kernels: Option<&Arc<Kernels>>) -> Tensor {
    let (s, r) = (s.contiguous(), r.contiguous());
    let out = tch::no_grad(|| match kernels {
        Some(k) => launch_forward(k, &s, &r).unwrap_or_else(|e| panic!("CUDA AltUp predict failed: {e:#}")),
        None => reference(&s, &r),
    });
    let (sd, rd, k) = (s.detach(), r.detach(), kernels.cloned());
    let backward: autograd::Backward = Box::new(move |grads| {
        let dp = grads[0].to_kind(sd.kind()).contiguous();
        let (ds, dr) = match &k {
            Some(k) => launch_backward(k, &dp, &sd, &rd)?,
            None => backward_reference(&dp, &sd, &rd),
        };
        Ok(vec![Some(ds), Some(dr)])
    });
    autograd::attach("AltUpPredict", &[&s, &r], &[&out], backward).unwrap_or_else(|e| panic!("AltUp predict: {e:#}"));
    out
}

/// The reference (differentiable): `(s + Σ_q r[.., p, q]·s[.., q, :])` in f32, rounded once.
pub fn reference(s: &Tensor, r: &Tensor) -> Tensor {
    let sf = s.to_kind(Kind::Float);
    let mix = (r.to_kind(Kind::Float).unsqueeze(-1) * sf.unsqueeze(-3)).sum_dim_intlist(-2, false, Kind::Float);
    (sf + mix).to_kind(s.kind())
}

/// The reference backward in f32, one rounding per output: `(ds, dr)` for upstream `dp`.
pub fn backward_reference(dp: &Tensor, s: &Tensor, r: &Tensor) -> (Tensor, Tensor) {
    let (d, sf, rf) = (dp.to_kind(Kind::Float), s.to_kind(Kind::Float), r.to_kind(Kind::Float));
    let ds = &d + rf.transpose(-1, -2).matmul(&d);
    let dr = d.matmul(&sf.transpose(-1, -2));
    (ds.to_kind(s.kind()), dr.to_kind(r.kind()))
}

/// Shapes the kernels take: `s` `[.., N, H]`, `r` `[.., N, N]` with the same leading dims,
/// N ≤ [`MAX_STREAMS`], one dtype.
fn fits(s: &Tensor, r: &Tensor) -> bool {
    let (ss, rs) = (s.size(), r.size());
    if ss.len() < 2 || rs.len() != ss.len() || s.kind() != r.kind() {
        return false;
    }
    let n = ss[ss.len() - 2];
    n <= MAX_STREAMS && rs[rs.len() - 1] == n && rs[rs.len() - 2] == n && ss[..ss.len() - 2] == rs[..rs.len() - 2]
}

/// Tokens, streams and width of `s` `[.., N, H]`.
fn dims(s: &Tensor) -> (i64, i64, i64) {
    let sz = s.size();
    let (n, h) = (sz[sz.len() - 2], sz[sz.len() - 1]);
    (s.numel() as i64 / (n * h).max(1), n, h)
}

/// Whether the 16-byte kernels apply: 4 streams, 2-byte elements, H a multiple of 8, every
/// `[R, N, H]` / `[R, H]` tensor 16-byte aligned.
pub(crate) fn wide(n: i64, h: i64, ts: &[&Tensor]) -> bool {
    n == 4
        && h % 8 == 0
        && ts.iter().all(|t| t.kind().elt_size_in_bytes() == 2 && (t.data_ptr() as usize).is_multiple_of(16))
}

fn launch_forward(k: &Kernels, s: &Tensor, r: &Tensor) -> Result<Tensor> {
    let (rows, n, h) = dims(s);
    let out = s.empty_like();
    let dt = dtype_code(s.kind()).unwrap_or(0);
    if wide(n, h, &[s, &out]) {
        let args = Args::default().ptr(s).ptr(r).ptr(&out).i32(h / 8).i32(dt);
        k.launch("altup_predict_fwd_x8", rows as u32, 256, args)?;
    } else {
        let args = Args::default().ptr(s).ptr(r).ptr(&out).i32(n).i32(h).i32(dt);
        k.launch("altup_predict_fwd", rows as u32, 256, args)?;
    }
    Ok(out)
}

fn launch_backward(k: &Kernels, dp: &Tensor, s: &Tensor, r: &Tensor) -> Result<(Tensor, Tensor)> {
    if dp.size() != s.size() || dp.kind() != s.kind() {
        bail!(
            "upstream gradient {:?} {:?} does not match the streams {:?} {:?}",
            dp.size(),
            dp.kind(),
            s.size(),
            s.kind()
        );
    }
    let (rows, n, h) = dims(s);
    let (ds, dr) = (s.empty_like(), r.empty_like());
    let dt = dtype_code(s.kind()).unwrap_or(0);
    let args = Args::default().ptr(dp).ptr(s).ptr(r).ptr(&ds).ptr(&dr);
    if wide(n, h, &[dp, s, &ds]) {
        k.launch("altup_predict_bwd_x8", rows as u32, 256, args.i32(h / 8).i32(dt))?;
    } else {
        k.launch("altup_predict_bwd", rows as u32, 256, args.i32(n).i32(h).i32(dt))?;
    }
    Ok((ds, dr))
}

/// The kernels against the reference ([`super::check`]): E4B's shape in bf16 (timed) and a
/// small f32 one with 3 streams and an odd width.
pub fn check(k: &Kernels, c: &mut Checker) {
    let device = c.device;
    for (kind, [rows, n, h]) in [(Kind::BFloat16, [4096i64, 4, 2048]), (Kind::Float, [37, 3, 301])] {
        let s = Tensor::randn([rows, n, h], (Kind::Float, device)).to_kind(kind);
        let r = (Tensor::randn([rows, n, n], (Kind::Float, device)) * 0.5).to_kind(kind);
        let dp = Tensor::randn([rows, n, h], (Kind::Float, device)).to_kind(kind);
        let got = launch_forward(k, &s, &r).unwrap_or_else(|e| panic!("{e:#}"));
        let err = rel_err(&got, &reference(&s, &r));
        let (ds, dr) = launch_backward(k, &dp, &s, &r).unwrap_or_else(|e| panic!("{e:#}"));
        let (ds_ref, dr_ref) = backward_reference(&dp, &s, &r);
        let errb = rel_err(&ds, &ds_ref).max(rel_err(&dr, &dr_ref));
        let bytes = 2.0 * s.numel() as f64 * kind.elt_size_in_bytes() as f64;
        let (dims, timed, t) = (format!("[{rows}×{n}×{h}]"), kind == Kind::BFloat16, tol(kind));
        c.case(timed, format!("altup_predict {} {dims}", name(kind)), err, t, bytes, &mut || {
            let _ = launch_forward(k, &s, &r);
        });
        c.case(timed, format!("altup_predict backward {} {dims}", name(kind)), errb, t, 1.5 * bytes, &mut || {
            let _ = launch_backward(k, &dp, &s, &r);
        });
    }
}
