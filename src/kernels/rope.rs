//! Launcher and CPU reference of kernels/rope.cu: rotary embedding of q or k laid out
//! `[B, T, heads, d]`, with cos/sin tables `[B, T, d]` (built from position ids, so packed
//! documents restart their positions).
//!
//! Reference: transformers `apply_rotary_pos_emb` (`x·cos + rotate_half(x)·sin`,
//! docs/model-math.md §0). The backward is the transposed rotation (`sin` → `−sin`), valid because both halves of
//! the tables are equal; the tests check it against autograd.

use std::sync::Arc;

use anyhow::Result;
use tch::{Kind, Tensor};

use super::autograd;
use super::checker::{name, rel_err, tol, Checker, Row};
use super::{dtype_code, on_device, usable, Args, Kernels};

/// `x·cos + rotate_half(x)·sin` for `x` `[B, T, heads, d]`; with `inverse`, the backward
/// (`x·cos − rotate_half(x)·sin`). On a GPU with the kernels: in place on `x`'s storage when `x`
/// is contiguous and needs no gradient, else out of place as one autograd node whose backward is
/// the inverse rotation; otherwise the reference. Returns the result either way.
pub fn apply(x: Tensor, cos: &Tensor, sin: &Tensor, inverse: bool, kernels: Option<&Arc<Kernels>>) -> Tensor {
    let shapes_ok = x.dim() == 4
        && cos.size() == [x.size()[0], x.size()[1], x.size()[3]]
        && cos.size() == sin.size()
        && cos.kind() == x.kind()
        && sin.kind() == x.kind();
    match on_device(kernels.map(|k| &**k), &[&x, cos, sin]) {
        Some(k) if shapes_ok && !x.requires_grad() && usable(Some(k), &[&x, cos, sin]).is_some() => {
            launch(k, &x, &x, cos, sin, inverse).unwrap_or_else(|e| panic!("CUDA RoPE failed: {e:#}"));
            x
        }
        Some(_) if shapes_ok && x.requires_grad() && autograd::available() => fused(&x, cos, sin, inverse, kernels),
        _ => reference(&x, cos, sin, inverse),
    }
}

/// The rotation as one autograd node (out of place): by the kernel when `kernels` is given, by
/// the reference on any device when not (the CPU tests hold that node to autograd).
pub fn fused(x: &Tensor, cos: &Tensor, sin: &Tensor, inverse: bool, kernels: Option<&Arc<Kernels>>) -> Tensor {
    let (x, cos, sin) = (x.contiguous(), &cos.contiguous(), &sin.contiguous());
    let rotate = |x: &Tensor, inverse: bool, k: Option<&Kernels>| -> Result<Tensor> {
        Ok(match k {
            Some(k) => {
                let y = x.empty_like();
                launch(k, x, &y, cos, sin, inverse)?;
                y
            }
            None => reference(x, cos, sin, inverse),
        })
    };
    let y = tch::no_grad(|| rotate(&x, inverse, kernels.map(|k| &**k)))
        .unwrap_or_else(|e| panic!("CUDA RoPE failed: {e:#}"));
    let (c, s, k) = (cos.detach(), sin.detach(), kernels.cloned());
    let backward: autograd::Backward = Box::new(move |grads| {
        let dy = grads[0].to_kind(c.kind()).contiguous();
        let dx = match &k {
            Some(k) => {
                let dx = dy.empty_like();
                launch(k, &dy, &dx, &c, &s, !inverse)?;
                dx
            }
            None => reference(&dy, &c, &s, !inverse),
        };
        Ok(vec![Some(dx)])
    });
    autograd::attach("RotaryEmbedding", &[&x], &[&y], backward).unwrap_or_else(|e| panic!("RoPE: {e:#}"));
    y
}

/// The kernel from `x` into `y` (the same tensor for in place), both `[B, T, heads, d]` contiguous.
fn launch(k: &Kernels, x: &Tensor, y: &Tensor, cos: &Tensor, sin: &Tensor, inverse: bool) -> Result<()> {
    let (b, t, heads, d) = x.size4()?;
    let args = Args::default()
        .ptr(x)
        .ptr(y)
        .ptr(cos)
        .ptr(sin)
        .i64(b * t)
        .i32(heads)
        .i32(d)
        .f32(if inverse { -1.0 } else { 1.0 })
        .i32(dtype_code(x.kind()).unwrap_or(0));
    let block = 256;
    let aligned = [x, y, cos, sin].iter().all(|t| (t.data_ptr() as usize).is_multiple_of(16));
    let wide = x.kind() != Kind::Float && (d / 2) % 8 == 0 && aligned && b * t * heads * (d / 16) < (1 << 31);
    if wide {
        k.launch("rope_x8", k.grid_for(b * t * heads * (d / 16), block), block, args)
    } else {
        k.launch("rope", k.grid_for(b * t * heads * (d / 2), block), block, args)
    }
}

/// The reference (differentiable): `x·cos ± rotate_half(x)·sin`, x `[B, T, heads, d]`.
pub fn reference(x: &Tensor, cos: &Tensor, sin: &Tensor, inverse: bool) -> Tensor {
    let half = x.size()[3] / 2;
    let rotated = Tensor::cat(&[-x.narrow(3, half, half), x.narrow(3, 0, half)], 3);
    let (c, s) = (cos.unsqueeze(2), sin.unsqueeze(2));
    if inverse {
        x * c - rotated * s
    } else {
        x * c + rotated * s
    }
}

/// The kernel against its reference ([`super::check`]): RoPE forward and inverse on [B, T, heads, d] with per-row positions (a packed row).
pub fn check(k: &Kernels, c: &mut Checker) {
    let device = c.device;
    // RoPE forward and inverse on [B, T, heads, d] with per-row positions (a packed row).
    // bf16: the 8-lane kernel (Llama's and Gemma 3n's head widths); f32: the scalar one.
    for (kind, (b, t, heads, d)) in
        [(Kind::BFloat16, (2, 2048, 32, 128)), (Kind::BFloat16, (1, 45, 8, 256)), (Kind::Float, (2, 33, 4, 64))]
    {
        let x = Tensor::randn([b, t, heads, d], (Kind::Float, device)).to_kind(kind);
        let pos = Tensor::cat(
            &[Tensor::arange(t / 2, (Kind::Int64, device)), Tensor::arange(t - t / 2, (Kind::Int64, device))],
            0,
        )
        .unsqueeze(0)
        .repeat([b, 1]);
        let inv = Tensor::arange_start_step(0, d, 2, (Kind::Float, device)).divide_scalar(d as f64);
        let inv = Tensor::pow_scalar(10000.0, &inv).reciprocal();
        let freqs = pos.to_kind(Kind::Float).unsqueeze(-1) * inv;
        let emb = Tensor::cat(&[&freqs, &freqs], -1);
        let (cos, sin) = (emb.cos().to_kind(kind), emb.sin().to_kind(kind));
        for inverse in [false, true] {
            let got = x.copy();
            launch(k, &got, &got, &cos, &sin, inverse).unwrap_or_else(|e| panic!("{e:#}"));
            let want = reference(&x, &cos, &sin, inverse);
            let label = format!("rope{} {} [{b}×{t}×{heads}×{d}]", if inverse { " backward" } else { "" }, name(kind));
            let io = 2.0 * x.numel() as f64 * kind.elt_size_in_bytes() as f64;
            let y = x.copy();
            if kind == Kind::BFloat16 && !inverse && d == 128 {
                c.timed(label, rel_err(&got, &want), tol(kind), io, &mut || {
                    let _ = launch(k, &y, &y, &cos, &sin, inverse);
                });
            } else {
                c.rows.push(Row { name: label, err: rel_err(&got, &want), tol: tol(kind), bytes: io, secs: None });
            }
        }
    }
}
