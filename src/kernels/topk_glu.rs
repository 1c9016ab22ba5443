//! Launcher and CPU reference of kernels/topk_glu.cu: Gemma 3n's sparse GeGLU, the Gaussian
//! top-k cutoff on the gate (`relu(g − mean − k·std)` per row) followed by `gelu_tanh(·)·u`,
//! forward and backward, as one autograd node ([`super::autograd`]) when a gradient is needed.
//!
//! Reference: transformers `Gemma3nTextMLP._gaussian_topk` and `forward` (docs/model-math.md
//! §1), computed here in f32 (the statistics and the cutoff) where HF rounds the cutoff to the
//! dtype; the GELU output is rounded before the product, as torch's ops leave it. Backward:
//! the product and GELU derivatives as in kernels/glu.cu, and through the cutoff
//! `dg_i = m_i·dz_i − S·(1/I + k·(g_i − μ)/(I·σ))` with `S = Σ m·dz`; the tests check the
//! reference backward against autograd and the kernels against the reference.

use std::sync::Arc;

use anyhow::{bail, Result};
use tch::{Kind, Tensor};

use super::autograd;
use super::checker::{name, rel_err, tol, Checker};
use super::{dtype_code, on_device, Args, Kernels};

/// `gelu_tanh(relu(g − μ − k·σ))·u` per row of `g`, `u` `[.., I]` (μ, σ over the last dim,
/// σ without Bessel's correction), in g's dtype: on a GPU with the kernels, the kernel (with its
/// backward as one node when a gradient is needed); else the differentiable reference.
pub fn forward(g: &Tensor, u: &Tensor, k: f64, kernels: Option<&Arc<Kernels>>) -> Tensor {
    let grad = g.requires_grad() || u.requires_grad();
    match on_device(kernels.map(|k| &**k), &[g, u]) {
        Some(_) if fits(g, u) && (!grad || autograd::available()) => fused(g, u, k, kernels),
        _ => reference(g, u, k),
    }
}

/// The op as one node: forward and backward by the kernels when `kernels` is given, by the
/// reference on any device when not (the CPU tests hold that node to autograd).
pub fn fused(g: &Tensor, u: &Tensor, k: f64, kernels: Option<&Arc<Kernels>>) -> Tensor {
    let (g, u) = (g.contiguous(), u.contiguous());
    let (h, stats) = tch::no_grad(|| match kernels {
        Some(kn) => launch_forward(kn, &g, &u, k).unwrap_or_else(|e| panic!("CUDA sparse GeGLU failed: {e:#}")),
        None => (reference(&g, &u, k), stats_reference(&g)),
    });
    let (gd, ud, kn) = (g.detach(), u.detach(), kernels.cloned());
    let backward: autograd::Backward = Box::new(move |grads| {
        let dh = grads[0].to_kind(gd.kind()).contiguous();
        let (dg, du) = match &kn {
            Some(kn) => launch_backward(kn, &dh, &gd, &ud, &stats, k)?,
            None => backward_reference(&dh, &gd, &ud, &stats, k),
        };
        Ok(vec![Some(dg), Some(du)])
    });
    autograd::attach("SparseGeGlu", &[&g, &u], &[&h], backward).unwrap_or_else(|e| panic!("sparse GeGLU: {e:#}"));
    h
}

/// The reference (differentiable).
pub fn reference(g: &Tensor, u: &Tensor, k: f64) -> Tensor {
    let gf = g.to_kind(Kind::Float);
    let (std, mean) = gf.std_mean_correction(&[-1i64][..], 0, true);
    let z = (&gf - (mean + std * k)).relu();
    let a = z.gelu("tanh").to_kind(g.kind()).to_kind(Kind::Float);
    (a * u.to_kind(Kind::Float)).to_kind(g.kind())
}

/// μ and σ of each row, f32 `[.., 2]` (what the forward kernel keeps for the backward).
pub fn stats_reference(g: &Tensor) -> Tensor {
    let (std, mean) = g.to_kind(Kind::Float).std_mean_correction(&[-1i64][..], 0, true);
    Tensor::cat(&[mean, std], -1)
}

/// The reference backward in f32, one rounding per output: `(dg, du)` for upstream `dh`, with
/// the forward's row statistics `stats` `[.., 2]`.
pub fn backward_reference(dh: &Tensor, g: &Tensor, u: &Tensor, stats: &Tensor, k: f64) -> (Tensor, Tensor) {
    let (d, gf, uf) = (dh.to_kind(Kind::Float), g.to_kind(Kind::Float), u.to_kind(Kind::Float));
    let cols = g.size()[g.dim() - 1] as f64;
    let (mean, std) = (stats.narrow(-1, 0, 1), stats.narrow(-1, 1, 1));
    let z = &gf - (&mean + &std * k);
    let live = z.gt(0.0).to_kind(Kind::Float);
    let zr = z.relu();
    let a = zr.gelu("tanh").to_kind(g.kind()).to_kind(Kind::Float);
    let du = (&d * a).to_kind(u.kind());
    let c = (2.0 / std::f64::consts::PI).sqrt();
    let t = ((&zr + zr.pow_tensor_scalar(3) * 0.044715) * c).tanh();
    let gelu_grad = (&t + 1.0) * 0.5 + &zr * 0.5 * (1.0 - t.square()) * c * (zr.square() * (3.0 * 0.044715) + 1.0);
    let dz: Tensor = &d * &uf * gelu_grad * live;
    let s = dz.sum_dim_intlist(-1, true, Kind::Float);
    let safe = std.clamp_min(f32::MIN_POSITIVE as f64);
    let slope = (&s * k / (&safe * cols)) * std.gt(0.0).to_kind(Kind::Float);
    let dg = &dz - &s / cols - slope * (&gf - &mean);
    (dg.to_kind(g.kind()), du)
}

/// Shapes the kernels take: g and u of one shape and dtype, rows a multiple of 8 wide.
fn fits(g: &Tensor, u: &Tensor) -> bool {
    g.size() == u.size() && g.kind() == u.kind() && g.dim() >= 1 && g.size()[g.dim() - 1] % 8 == 0
}

/// Rows and columns of `g` `[.., I]`.
fn dims(g: &Tensor) -> (i64, i64) {
    let cols = g.size()[g.dim() - 1];
    (g.numel() as i64 / cols.max(1), cols)
}

/// The widest row the register-resident backward takes (`TG_NG` · 8 values per thread at 1024
/// threads, kernels/topk_glu.cu).
const REGISTER_COLS: i64 = 2 * 8 * 1024;

/// Whether the 16-byte loads apply: 2-byte elements, 16-byte aligned.
fn wide(ts: &[&Tensor]) -> bool {
    ts.iter().all(|t| t.kind().elt_size_in_bytes() == 2 && (t.data_ptr() as usize).is_multiple_of(16))
}

fn launch_forward(kn: &Kernels, g: &Tensor, u: &Tensor, k: f64) -> Result<(Tensor, Tensor)> {
    let (rows, cols) = dims(g);
    let h = g.empty_like();
    let mut lead = g.size();
    *lead.last_mut().expect("at least one dim") = 2;
    let stats = Tensor::empty(lead, (Kind::Float, g.device()));
    let w = wide(&[g, u, &h]);
    let args = Args::default().ptr(g).ptr(u).ptr(&h).ptr(&stats).i32(cols).f32(k);
    let dt = dtype_code(g.kind()).unwrap_or(0);
    kn.launch("topk_glu_fwd", rows as u32, 1024, args.i32(dt).i32(w as i64))?;
    Ok((h, stats))
}

fn launch_backward(
    kn: &Kernels,
    dh: &Tensor,
    g: &Tensor,
    u: &Tensor,
    stats: &Tensor,
    k: f64,
) -> Result<(Tensor, Tensor)> {
    if dh.size() != g.size() || dh.kind() != g.kind() {
        bail!(
            "upstream gradient {:?} {:?} does not match the gate {:?} {:?}",
            dh.size(),
            dh.kind(),
            g.size(),
            g.kind()
        );
    }
    let (rows, cols) = dims(g);
    let (dg, du) = (g.empty_like(), u.empty_like());
    let w = wide(&[dh, g, u, &dg, &du]);
    let args = Args::default().ptr(dh).ptr(g).ptr(u).ptr(stats).ptr(&dg).ptr(&du).i32(cols).f32(k);
    let dt = dtype_code(g.kind()).unwrap_or(0);
    if w && cols <= REGISTER_COLS {
        kn.launch("topk_glu_bwd_r", rows as u32, 1024, args.i32(dt))?;
    } else {
        kn.launch("topk_glu_bwd", rows as u32, 1024, args.i32(dt).i32(w as i64))?;
    }
    Ok((dg, du))
}

/// The kernels against the reference ([`super::check`]): E4B's MLP shape in bf16 (timed), and
/// a small f32 one; k = Φ⁻¹(0.95) as E4B's sparse layers use.
pub fn check(kn: &Kernels, c: &mut Checker) {
    let device = c.device;
    let k = 1.6484375;
    // bf16 rows of up to 16384 take the register-resident backward, wider ones and f32 the other.
    for (kind, [rows, cols]) in [
        (Kind::BFloat16, [4096i64, 16384]),
        (Kind::BFloat16, [7, 20480]),
        (Kind::BFloat16, [5, 1000]),
        (Kind::Float, [19, 328]),
    ] {
        let randn = || Tensor::randn([rows, cols], (Kind::Float, device)).to_kind(kind);
        let (g, u, dh) = (randn(), randn(), randn());
        let (h, stats) = launch_forward(kn, &g, &u, k).unwrap_or_else(|e| panic!("{e:#}"));
        let err = rel_err(&h, &reference(&g, &u, k)).max(rel_err(&stats, &stats_reference(&g)));
        let (dg, du) = launch_backward(kn, &dh, &g, &u, &stats, k).unwrap_or_else(|e| panic!("{e:#}"));
        let (dg_ref, du_ref) = backward_reference(&dh, &g, &u, &stats_reference(&g), k);
        let errb = rel_err(&dg, &dg_ref).max(rel_err(&du, &du_ref));
        let bytes = g.numel() as f64 * kind.elt_size_in_bytes() as f64;
        let (dims, timed, t) = (format!("[{rows}×{cols}]"), rows == 4096, tol(kind));
        c.case(timed, format!("sparse_geglu {} {dims}", name(kind)), err, t, 3.0 * bytes, &mut || {
            let _ = launch_forward(kn, &g, &u, k);
        });
        c.case(timed, format!("sparse_geglu backward {} {dims}", name(kind)), errb, t, 5.0 * bytes, &mut || {
            let _ = launch_backward(kn, &dh, &g, &u, &stats, k);
        });
    }
}
