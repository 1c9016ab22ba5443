//! Launcher and CPU reference of kernels/adamw_8bit.cu: one AdamW step over a flat f32 parameter
//! buffer whose moments are stored blockwise in 8 bits (bitsandbytes' 8-bit optimizers' state
//! layout: blocks of [`STATE_BLOCK`] values, a code per value into a sorted 256-entry [`Map`] and
//! an f32 absmax per block).
//!
//! Reference: [`reference`], the step as torch ops a chunk at a time (torch.optim.AdamW's update:
//! decoupled weight decay, bias-corrected moments; the moments dequantized before and
//! re-quantized to the nearest map entry after, as bitsandbytes' blockwise 8-bit AdamW does).
//! The kernel rounds every operation as libtorch's CUDA ops do: on an H200 it matches the
//! reference's codes and absmax exactly and its parameters within an ulp or two; the check
//! allows a few flipped codes all the same.

use anyhow::{bail, Result};
use tch::{Device, Kind, Tensor};

use super::checker::{rel_err, Checker, Row};
use super::{Args, Kernels};

/// Values per quantization block of an 8-bit state.
pub const STATE_BLOCK: i64 = 256;

/// Elements the reference updates at a time (2M, 8 MiB in f32): it bounds the temporaries (f32
/// moments dequantized from 8 bits, their int64 code indices, the update) whatever the buffer's
/// size (42M parameters on an 8B model would need ~1 GiB of them at once). A whole number of
/// [`STATE_BLOCK`]s, so every block is that of a single chunk.
const STEP_CHUNK: i64 = STATE_BLOCK * 8192;

/// A sorted 256-entry quantization map and the 255 midpoints between its neighbours, on a device.
pub struct Map {
    /// f32 `[256]`.
    pub values: Tensor,
    /// f32 `[255]`: `(values[i] + values[i + 1]) / 2`.
    pub mids: Tensor,
}

impl Map {
    /// The map of `values` (256 of them, ascending) on `device`.
    pub fn new(values: &[f32], device: Device) -> Map {
        assert_eq!(values.len(), 256, "an 8-bit map has 256 entries");
        let mids: Vec<f32> = values.windows(2).map(|w| (w[0] + w[1]) / 2.0).collect();
        Map { values: Tensor::from_slice(values).to_device(device), mids: Tensor::from_slice(&mids).to_device(device) }
    }

    /// `x` (a whole number of blocks, f32) as (u8 codes `[n]`, f32 absmax `[n / 256]`): each
    /// block scaled by its largest magnitude, each value to its nearest map entry.
    pub fn quantize(&self, x: &Tensor) -> (Tensor, Tensor) {
        let blocks = x.view([-1, STATE_BLOCK]);
        let absmax = blocks.abs().amax([1], true).clamp_min(1e-30);
        let normed = &blocks / &absmax;
        let codes = Tensor::bucketize(&normed.contiguous(), &self.mids, false, false).to_kind(Kind::Uint8);
        (codes.flatten(0, -1), absmax.flatten(0, -1))
    }

    /// The f32 values of `codes` scaled by their blocks' `absmax`.
    pub fn dequantize(&self, codes: &Tensor, absmax: &Tensor) -> Tensor {
        let vals = self.values.index_select(0, &codes.to_kind(Kind::Int64)).view([-1, STATE_BLOCK]);
        (vals * absmax.unsqueeze(1)).flatten(0, -1)
    }
}

/// One moment's storage: u8 codes `[n]` and f32 absmax `[n / 256]`.
pub struct Moment<'a> {
    pub codes: &'a Tensor,
    pub absmax: &'a Tensor,
}

impl Moment<'_> {
    /// Overwrite values `off..off + n` (whole blocks) with `codes` / `absmax`.
    fn set(&self, off: i64, n: i64, codes: &Tensor, absmax: &Tensor) {
        let (mut c, mut a) = (self.codes.narrow(0, off, n), self.absmax.narrow(0, off / STATE_BLOCK, n / STATE_BLOCK));
        c.copy_(codes);
        a.copy_(absmax);
    }
}

/// The moment stored in `codes` and `absmax`.
pub fn moment<'a>(codes: &'a Tensor, absmax: &'a Tensor) -> Moment<'a> {
    Moment { codes, absmax }
}

/// The step's hyper-parameters.
#[derive(Debug, Clone, Copy)]
pub struct Hyper {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Weight decay applied to these parameters (0: none).
    pub weight_decay: f64,
    /// 1-based step number (bias correction).
    pub step: u64,
}

impl Hyper {
    fn bias_corrections(&self) -> (f64, f64) {
        (1.0 - self.beta1.powi(self.step as i32), 1.0 - self.beta2.powi(self.step as i32))
    }
}

/// One step, in place: `p` and `g` f32 `[n]` (n a multiple of 256), the moments `m` (signed map)
/// and `v` (unsigned map). The kernel when [`usable`] finds it can run, else [`reference`].
pub fn step(p: &Tensor, g: &Tensor, m: Moment, v: Moment, maps: (&Map, &Map), h: Hyper, kernels: Option<&Kernels>) {
    match usable(p, g, &m, &v, maps, kernels) {
        Some(k) => cuda(p, g, m, v, maps, h, k).unwrap_or_else(|e| panic!("CUDA 8-bit AdamW failed: {e:#}")),
        None => reference(p, g, m, v, maps, h),
    }
}

/// `kernels`, when the kernel can step these buffers: all on its device, contiguous, f32 (the
/// codes u8).
pub fn usable<'a>(
    p: &Tensor,
    g: &Tensor,
    m: &Moment,
    v: &Moment,
    maps: (&Map, &Map),
    kernels: Option<&'a Kernels>,
) -> Option<&'a Kernels> {
    let all = [p, g, m.absmax, v.absmax, &maps.0.values, &maps.0.mids, &maps.1.values, &maps.1.mids];
    let codes_ok =
        [m.codes, v.codes].iter().all(|c| c.device() == p.device() && c.is_contiguous() && c.kind() == Kind::Uint8);
    super::usable(kernels, &all).filter(|_| codes_ok && all.iter().all(|t| t.kind() == Kind::Float))
}

/// The reference: torch ops over chunks of [`STEP_CHUNK`] values.
pub fn reference(p: &Tensor, g: &Tensor, m: Moment, v: Moment, maps: (&Map, &Map), h: Hyper) {
    let _guard = tch::no_grad_guard();
    let len = p.numel() as i64;
    for off in (0..len).step_by(STEP_CHUNK as usize) {
        let n = STEP_CHUNK.min(len - off);
        let g = g.narrow(0, off, n);
        let mut p = p.narrow(0, off, n);
        if h.weight_decay > 0.0 {
            let _ = p.g_mul_scalar_(1.0 - h.lr * h.weight_decay);
        }
        let blocks = |x: &Moment| (x.codes.narrow(0, off, n), x.absmax.narrow(0, off / STATE_BLOCK, n / STATE_BLOCK));
        let ((mc, ma), (vc, va)) = (blocks(&m), blocks(&v));
        let (mf, vf) = (maps.0.dequantize(&mc, &ma), maps.1.dequantize(&vc, &va));
        adam_update(&mut p, &g, &mf, &vf, h);
        let (c, a) = maps.0.quantize(&mf);
        m.set(off, n, &c, &a);
        let (c, a) = maps.1.quantize(&vf);
        v.set(off, n, &c, &a);
    }
}

/// The AdamW update of one chunk in place, after the weight decay: the moments `m` and `v` (f32)
/// take the gradient `g`, and `p` moves by the bias-corrected step (torch.optim.AdamW's order of
/// operations; the fp32-state optimizer, `train::optim`, runs it on its own moments).
pub fn adam_update(p: &mut Tensor, g: &Tensor, m: &Tensor, v: &Tensor, h: Hyper) {
    let (bc1, bc2) = h.bias_corrections();
    let (mut m, mut v) = (m.shallow_clone(), v.shallow_clone());
    let _ = m.g_mul_scalar_(h.beta1).g_add_(&(g * (1.0 - h.beta1)));
    let _ = v.g_mul_scalar_(h.beta2).g_add_(&(g.square() * (1.0 - h.beta2)));
    let denom = v.sqrt() / bc2.sqrt() + h.eps;
    let update = (&m / denom) * (h.lr / bc1);
    let _ = p.g_sub_(&update);
}

/// The kernel: one launch for the whole buffer.
pub fn cuda(p: &Tensor, g: &Tensor, m: Moment, v: Moment, maps: (&Map, &Map), h: Hyper, k: &Kernels) -> Result<()> {
    let n = p.numel() as i64;
    if n % STATE_BLOCK != 0 || g.numel() as i64 != n || m.codes.numel() as i64 != n || v.codes.numel() as i64 != n {
        bail!("8-bit AdamW buffers of {n} values: not a whole number of {STATE_BLOCK}-value blocks, or mismatched");
    }
    let (bc1, bc2) = h.bias_corrections();
    // libtorch's CUDA division by a CPU scalar multiplies by the scalar's f32 reciprocal.
    let inv_sqrt_bc2 = 1.0f32 / (bc2.sqrt() as f32);
    let nblocks = n / STATE_BLOCK;
    let args = Args::default()
        .ptr(p)
        .ptr(g)
        .ptr(m.codes)
        .ptr(m.absmax)
        .ptr(v.codes)
        .ptr(v.absmax)
        .ptr(&maps.0.values)
        .ptr(&maps.0.mids)
        .ptr(&maps.1.values)
        .ptr(&maps.1.mids)
        .i64(nblocks)
        .i32((h.weight_decay > 0.0) as i64)
        .f32(1.0 - h.lr * h.weight_decay)
        .f32(h.beta1)
        .f32(1.0 - h.beta1)
        .f32(h.beta2)
        .f32(1.0 - h.beta2)
        .f32(f64::from(inv_sqrt_bc2))
        .f32(h.eps)
        .f32(h.lr / bc1);
    let block = STATE_BLOCK as u32;
    let grid = (nblocks as u64).min(k.sm_count as u64 * 8).max(1) as u32;
    k.launch("adamw_8bit", grid, block, args)
}

/// The kernel against its reference ([`super::check`]): three steps from zero moments on a
/// buffer that is not a whole number of the reference's chunks, with and without weight decay;
/// parameters, codes and absmax compared after each.
pub fn check(k: &Kernels, c: &mut Checker) {
    let device = c.device;
    let maps = (Map::new(&crate::quant::state_map(true), device), Map::new(&crate::quant::state_map(false), device));
    let n = STEP_CHUNK + 37 * STATE_BLOCK;
    for wd in [0.01, 0.0] {
        let p0 = Tensor::randn([n], (Kind::Float, device)) * 0.02;
        let state = || {
            let z = Tensor::zeros([n], (Kind::Float, device));
            let (mc, ma) = maps.0.quantize(&z);
            let (vc, va) = maps.1.quantize(&z);
            (p0.copy(), mc, ma, vc, va)
        };
        let (pk, mck, mak, vck, vak) = state();
        let (pr, mcr, mar, vcr, var) = state();
        let (mut err_p, mut flipped, mut err_abs) = (0.0f64, 0.0f64, 0.0f64);
        for s in 1..=3u64 {
            let g = Tensor::randn([n], (Kind::Float, device)) * 1e-3;
            let h = Hyper { lr: 2e-4, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: wd, step: s };
            cuda(&pk, &g, moment(&mck, &mak), moment(&vck, &vak), (&maps.0, &maps.1), h, k)
                .expect("8-bit AdamW kernel");
            reference(&pr, &g, moment(&mcr, &mar), moment(&vcr, &var), (&maps.0, &maps.1), h);
            err_p = err_p.max(rel_err(&pk, &pr));
            let diff = mck.ne_tensor(&mcr).sum(Kind::Int64).int64_value(&[])
                + vck.ne_tensor(&vcr).sum(Kind::Int64).int64_value(&[]);
            flipped = flipped.max(diff as f64 / (2 * n) as f64);
            err_abs = err_abs.max(rel_err(&mak, &mar)).max(rel_err(&vak, &var));
        }
        let label = format!("adamw_8bit wd {wd} [{n}]");
        c.rows.push(Row { name: format!("{label} params"), err: err_p, tol: 1e-6, bytes: 0.0, secs: None });
        c.rows.push(Row { name: format!("{label} codes flipped"), err: flipped, tol: 1e-4, bytes: 0.0, secs: None });
        c.rows.push(Row { name: format!("{label} absmax"), err: err_abs, tol: 1e-6, bytes: 0.0, secs: None });
    }
    // Timed on an 8B adapter's size (42M values): p, g read; p written; codes and absmax both ways.
    let n = 42 * (1 << 20);
    let p = Tensor::randn([n], (Kind::Float, device)) * 0.02;
    let g = Tensor::randn([n], (Kind::Float, device)) * 1e-3;
    let (mc, ma) = maps.0.quantize(&g);
    let (vc, va) = maps.1.quantize(&g.square());
    let bytes = n as f64 * (4.0 + 4.0 + 4.0 + 2.0 * 2.0) + 4.0 * (n / STATE_BLOCK) as f64 * 4.0;
    let h = Hyper { lr: 2e-4, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01, step: 10 };
    c.timed(format!("adamw_8bit [{n}]"), 0.0, 0.0, bytes, &mut || {
        cuda(&p, &g, moment(&mc, &ma), moment(&vc, &va), (&maps.0, &maps.1), h, k).expect("8-bit AdamW kernel");
    });
    c.timed(format!("adamw_8bit reference (torch ops) [{n}]"), 0.0, 0.0, bytes, &mut || {
        reference(&p, &g, moment(&mc, &ma), moment(&vc, &va), (&maps.0, &maps.1), h);
    });
}
