//! Launcher and CPU reference of kernels/glu.cu: the gated activation `act(g) · u` of the MLP
//! (SwiGLU: SiLU; GeGLU: tanh-approximated GELU), forward and backward, the backward
//! recomputing `act(g)` from `g`.
//!
//! Reference: transformers `LlamaMLP` (`act_fn(gate_proj(x)) * up_proj(x)`, SiLU) and
//! `Gemma2MLP`/`Gemma3nTextMLP` (`gelu_pytorch_tanh`), docs/model-math.md §0–2. The backward is the
//! product rule with `silu' = σ(1 + g(1 − σ))` and the tanh-GELU derivative; the tests check
//! it against autograd.

use std::sync::Arc;

use anyhow::Result;
use tch::{Kind, Tensor};

use super::autograd;
use super::checker::{name, rel_err, tol, Checker, Row};
use super::{dtype_code, on_device, usable, Args, Kernels};

/// The activation on the gate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Act {
    /// SiLU (SwiGLU).
    Silu,
    /// GELU, tanh approximation (GeGLU).
    GeluTanh,
}

impl Act {
    fn code(self) -> i64 {
        match self {
            Act::Silu => 0,
            Act::GeluTanh => 1,
        }
    }

    /// `act(g)` with torch's ops (differentiable).
    pub fn apply(self, g: &Tensor) -> Tensor {
        match self {
            Act::Silu => g.silu(),
            Act::GeluTanh => g.gelu("tanh"),
        }
    }
}

/// `act(g) · u`: the kernel when it applies (with its backward as one autograd node when a
/// gradient is needed), else the reference.
pub fn forward(g: &Tensor, u: &Tensor, act: Act, kernels: Option<&Arc<Kernels>>) -> Tensor {
    let grad = g.requires_grad() || u.requires_grad();
    let k = kernels.map(|k| &**k);
    match (usable(k, &[g, u]), on_device(k, &[g, u])) {
        (Some(k), _) if same(g, u) && !grad => launch_forward(k, g, u, act),
        (_, Some(_)) if same(g, u) && grad && autograd::available() => fused(g, u, act, kernels),
        _ => forward_reference(g, u, act),
    }
}

/// The op as one autograd node: forward and backward by the kernels when `kernels` is given, by
/// the reference on any device when not (the CPU tests hold that node to autograd).
pub fn fused(g: &Tensor, u: &Tensor, act: Act, kernels: Option<&Arc<Kernels>>) -> Tensor {
    let (g, u) = (g.contiguous(), u.contiguous());
    let h = tch::no_grad(|| match kernels {
        Some(k) => launch_forward(k, &g, &u, act),
        None => forward_reference(&g, &u, act),
    });
    let (gd, ud, k) = (g.detach(), u.detach(), kernels.cloned());
    let backward: autograd::Backward = Box::new(move |grads| {
        let dh = grads[0].to_kind(gd.kind());
        let (dg, du) = backward(&dh, &gd, &ud, act, k.as_deref());
        Ok(vec![Some(dg), Some(du)])
    });
    autograd::attach("GatedActivation", &[&g, &u], &[&h], backward).unwrap_or_else(|e| panic!("GLU: {e:#}"));
    h
}

fn launch_forward(k: &Kernels, g: &Tensor, u: &Tensor, act: Act) -> Tensor {
    let h = g.empty_like();
    let n = g.numel() as i64;
    let dt = dtype_code(g.kind()).unwrap_or(0);
    let block = 256;
    let (name, items) = if wide(&[g, u, &h]) { ("glu_fwd_x8", n / 8) } else { ("glu_fwd", n) };
    let args = Args::default().ptr(g).ptr(u).ptr(&h).i64(items).i32(act.code()).i32(dt);
    k.launch(name, k.grid_for(items, block), block, args).unwrap_or_else(|e| panic!("CUDA GLU failed: {e:#}"));
    h
}

/// `(dg, du)` for upstream `dh`: the kernel when it applies, else the reference.
pub fn backward(dh: &Tensor, g: &Tensor, u: &Tensor, act: Act, kernels: Option<&Kernels>) -> (Tensor, Tensor) {
    let dh = dh.contiguous();
    match usable(kernels, &[&dh, g, u]) {
        Some(k) if same(g, u) && same(g, &dh) => {
            cuda_backward(&dh, g, u, act, k).unwrap_or_else(|e| panic!("CUDA GLU backward failed: {e:#}"))
        }
        _ => backward_reference(&dh, g, u, act),
    }
}

/// The reference forward (differentiable), as the model code writes it.
pub fn forward_reference(g: &Tensor, u: &Tensor, act: Act) -> Tensor {
    act.apply(g) * u
}

/// The reference backward in f32: `du = dh · act(g)` (act rounded to the dtype, as in the
/// forward), `dg = dh · u · act'(g)`.
pub fn backward_reference(dh: &Tensor, g: &Tensor, u: &Tensor, act: Act) -> (Tensor, Tensor) {
    let kind = g.kind();
    let gf = g.to_kind(Kind::Float);
    let a = act.apply(g).to_kind(Kind::Float);
    let d = dh.to_kind(Kind::Float);
    let grad: Tensor = match act {
        Act::Silu => {
            let s = gf.sigmoid();
            &s * (&gf * (1.0 - &s) + 1.0)
        }
        Act::GeluTanh => {
            let k = (2.0 / std::f64::consts::PI).sqrt();
            let t = ((&gf + gf.pow_tensor_scalar(3) * 0.044715) * k).tanh();
            (&t + 1.0) * 0.5 + &gf * 0.5 * (1.0 - t.square()) * k * (gf.square() * (3.0 * 0.044715) + 1.0)
        }
    };
    let du = (&d * a).to_kind(kind);
    let dg = (&d * u.to_kind(Kind::Float) * grad).to_kind(kind);
    (dg, du)
}

fn same(a: &Tensor, b: &Tensor) -> bool {
    a.size() == b.size() && a.kind() == b.kind()
}

fn cuda_backward(dh: &Tensor, g: &Tensor, u: &Tensor, act: Act, k: &Kernels) -> Result<(Tensor, Tensor)> {
    let (dg, du) = (g.empty_like(), u.empty_like());
    let n = g.numel() as i64;
    let (name, items) = if wide(&[dh, g, u, &dg, &du]) { ("glu_bwd_x8", n / 8) } else { ("glu_bwd", n) };
    let args = Args::default()
        .ptr(dh)
        .ptr(g)
        .ptr(u)
        .ptr(&dg)
        .ptr(&du)
        .i64(items)
        .i32(act.code())
        .i32(dtype_code(g.kind()).unwrap_or(0));
    let block = 256;
    k.launch(name, k.grid_for(items, block), block, args)?;
    Ok((dg, du))
}

/// Whether the 8-wide kernels apply: 2-byte elements, a multiple of 8 of them, 16-byte aligned.
fn wide(ts: &[&Tensor]) -> bool {
    ts.iter()
        .all(|t| t.kind().elt_size_in_bytes() == 2 && t.numel() % 8 == 0 && (t.data_ptr() as usize).is_multiple_of(16))
}

/// The kernel against its reference ([`super::check`]): Gated activations (SwiGLU, GeGLU), forward and backward: the 8-wide kernels and the scalar ones.
pub fn check(k: &Kernels, c: &mut Checker) {
    let device = c.device;
    // Gated activations, forward and backward.
    // The 8-wide kernels (bf16, a multiple of 8) and the scalar ones (odd sizes, f32).
    for (kind, shape) in [(Kind::BFloat16, [4096i64, 14336i64]), (Kind::BFloat16, [3, 333]), (Kind::Float, [16, 1001])]
    {
        for (act, label) in [(Act::Silu, "swiglu"), (Act::GeluTanh, "geglu")] {
            let g = (Tensor::randn(shape, (Kind::Float, device)) * 2.0).to_kind(kind);
            let u = Tensor::randn(shape, (Kind::Float, device)).to_kind(kind);
            let dh = Tensor::randn(shape, (Kind::Float, device)).to_kind(kind);
            let n = g.numel() as f64 * kind.elt_size_in_bytes() as f64;
            let h = launch_forward(k, &g, &u, act);
            let err = rel_err(&h, &forward_reference(&g, &u, act));
            let (dg, du) = backward(&dh, &g, &u, act, Some(k));
            let (dg_ref, du_ref) = backward_reference(&dh, &g, &u, act);
            let errb = rel_err(&dg, &dg_ref).max(rel_err(&du, &du_ref));
            let dims = format!("{:?}", shape);
            if shape[0] == 4096 {
                c.timed(format!("glu_fwd {label} {} {dims}", name(kind)), err, tol(kind), 3.0 * n, &mut || {
                    let _ = launch_forward(k, &g, &u, act);
                });
                c.timed(format!("glu_bwd {label} {} {dims}", name(kind)), errb, tol(kind), 5.0 * n, &mut || {
                    let _ = backward(&dh, &g, &u, act, Some(k));
                });
            } else {
                c.rows.push(Row {
                    name: format!("glu_fwd {label} {} {dims}", name(kind)),
                    err,
                    tol: tol(kind),
                    bytes: 3.0 * n,
                    secs: None,
                });
                c.rows.push(Row {
                    name: format!("glu_bwd {label} {} {dims}", name(kind)),
                    err: errb,
                    tol: tol(kind),
                    bytes: 5.0 * n,
                    secs: None,
                });
            }
        }
    }
}
