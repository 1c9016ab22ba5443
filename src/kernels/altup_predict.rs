//! Launcher and CPU reference of kernels/altup_predict.cu: Gemma 3n's AltUp prediction
//! `pred[p] = s[p] + Σ_q r[p, q]·s[q]` over the N streams of each token, forward and backward,
//! as one autograd node ([`super::autograd`]) when a gradient is needed. The node has two
//! outputs, `pred` and its active stream `pred[0]` as a contiguous tensor of its own, so that the
//! layer's readers of the active stream neither copy it out nor send autograd's full-size
//! zero-filled `select` gradient back: the kernel adds their gradient into stream 0.
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

/// `(pred, a)` for streams `s` `[.., N, H]` and per-token coefficients `r` `[.., N, N]`, in s's
/// dtype: `pred` `[.., N, H]` and its active stream `a = pred[.., 0, :]`. On a GPU with the
/// kernels, the kernel (`a` contiguous, both outputs of one node when a gradient is needed);
/// else the differentiable reference (`a` a view of `pred`).
pub fn forward(s: &Tensor, r: &Tensor, kernels: Option<&Arc<Kernels>>) -> (Tensor, Tensor) {
    let grad = s.requires_grad() || r.requires_grad();
    match on_device(kernels.map(|k| &**k), &[s, r]) {
        Some(_) if fits(s, r) && (!grad || autograd::available()) => fused(s, r, kernels),
        _ => {
            let pred = reference(s, r);
            let a = pred.select(-2, 0);
            (pred, a)
        }
    }
}

/// The op as one node with outputs `(pred, a)`: forward and backward by the kernels when
/// `kernels` is given, by the reference on any device when not (the CPU tests hold that node to
/// autograd).
pub fn fused(s: &Tensor, r: &Tensor, kernels: Option<&Arc<Kernels>>) -> (Tensor, Tensor) {
    let (s, r) = (s.contiguous(), r.contiguous());
    let (pred, a) = tch::no_grad(|| match kernels {
        Some(k) => launch_forward(k, &s, &r).unwrap_or_else(|e| panic!("CUDA AltUp predict failed: {e:#}")),
        None => {
            let pred = reference(&s, &r);
            let a = pred.select(-2, 0).contiguous();
            (pred, a)
        }
    });
    let (sd, rd, k) = (s.detach(), r.detach(), kernels.cloned());
    let backward: autograd::Backward = Box::new(move |grads| {
        let dp = grads[0].to_kind(sd.kind()).contiguous();
        let da = grads[1].to_kind(sd.kind()).contiguous();
        let (ds, dr) = match &k {
            Some(k) => launch_backward(k, &dp, Some(&da), &sd, &rd)?,
            None => backward_reference(&dp, Some(&da), &sd, &rd),
        };
        Ok(vec![Some(ds), Some(dr)])
    });
    autograd::attach("AltUpPredict", &[&s, &r], &[&pred, &a], backward)
        .unwrap_or_else(|e| panic!("AltUp predict: {e:#}"));
    (pred, a)
}

/// The reference (differentiable): `(s + Σ_q r[.., p, q]·s[.., q, :])` in f32, rounded once.
pub fn reference(s: &Tensor, r: &Tensor) -> Tensor {
    let sf = s.to_kind(Kind::Float);
    let mix = (r.to_kind(Kind::Float).unsqueeze(-1) * sf.unsqueeze(-3)).sum_dim_intlist(-2, false, Kind::Float);
    (sf + mix).to_kind(s.kind())
}

/// The reference backward in f32, one rounding per output: `(ds, dr)` for upstream `dp` and the
/// active stream's own upstream `da` (added to stream 0).
pub fn backward_reference(dp: &Tensor, da: Option<&Tensor>, s: &Tensor, r: &Tensor) -> (Tensor, Tensor) {
    let (mut d, sf, rf) = (dp.to_kind(Kind::Float), s.to_kind(Kind::Float), r.to_kind(Kind::Float));
    if let Some(da) = da {
        let n = d.size()[d.dim() - 2];
        let a = da.to_kind(Kind::Float).unsqueeze(-2);
        d = Tensor::cat(&[d.narrow(-2, 0, 1) + a, d.narrow(-2, 1, n - 1)], -2);
    }
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

fn launch_forward(k: &Kernels, s: &Tensor, r: &Tensor) -> Result<(Tensor, Tensor)> {
    let (rows, n, h) = dims(s);
    let out = s.empty_like();
    let a = s.select(-2, 0).empty_like();
    let dt = dtype_code(s.kind()).unwrap_or(0);
    let args = Args::default().ptr(s).ptr(r).ptr(&out).ptr(&a);
    if wide(n, h, &[s, &out, &a]) {
        k.launch("altup_predict_fwd_x8", rows as u32, 256, args.i32(h / 8).i32(dt))?;
    } else {
        k.launch("altup_predict_fwd", rows as u32, 256, args.i32(n).i32(h).i32(dt))?;
    }
    Ok((out, a))
}

fn launch_backward(k: &Kernels, dp: &Tensor, da: Option<&Tensor>, s: &Tensor, r: &Tensor) -> Result<(Tensor, Tensor)> {
    let a_size = s.select(-2, 0).size();
    if da.is_some_and(|da| da.size() != a_size || da.kind() != s.kind() || !da.is_contiguous()) {
        bail!("the active stream's gradient does not match the streams {:?} {:?}", s.size(), s.kind());
    }
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
    let args = Args::default().ptr(dp).ptr_opt(da).ptr(s).ptr(r).ptr(&ds).ptr(&dr);
    let mut aligned = vec![dp, s, &ds];
    aligned.extend(da);
    if wide(n, h, &aligned) {
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
        let da = Tensor::randn([rows, h], (Kind::Float, device)).to_kind(kind);
        let (got, a) = launch_forward(k, &s, &r).unwrap_or_else(|e| panic!("{e:#}"));
        let want = reference(&s, &r);
        let err = rel_err(&got, &want).max(rel_err(&a, &want.select(1, 0)));
        let mut errb = 0f64;
        for da in [None, Some(&da)] {
            let (ds, dr) = launch_backward(k, &dp, da, &s, &r).unwrap_or_else(|e| panic!("{e:#}"));
            let (ds_ref, dr_ref) = backward_reference(&dp, da, &s, &r);
            errb = errb.max(rel_err(&ds, &ds_ref)).max(rel_err(&dr, &dr_ref));
        }
        // Streams read and written, plus the active stream: (2 + 1/N) in the forward, (3 + 1/N)
        // in the backward (dp, s, da read; ds written).
        let bytes = s.numel() as f64 * kind.elt_size_in_bytes() as f64;
        let (fwd, bwd) = ((2.0 + 1.0 / n as f64) * bytes, (3.0 + 1.0 / n as f64) * bytes);
        let (dims, timed, t) = (format!("[{rows}×{n}×{h}]"), kind == Kind::BFloat16, tol(kind));
        c.case(timed, format!("altup_predict {} {dims}", name(kind)), err, t, fwd, &mut || {
            let _ = launch_forward(k, &s, &r);
        });
        c.case(timed, format!("altup_predict backward {} {dims}", name(kind)), errb, t, bwd, &mut || {
            let _ = launch_backward(k, &dp, Some(&da), &s, &r);
        });
    }
}
