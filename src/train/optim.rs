//! Optimizers for the adapter weights: AdamW with fp32 states (torch.optim.AdamW
//! semantics: decoupled weight decay, bias-corrected moments), and 8-bit AdamW
//! whose two moments are stored blockwise-quantized, bitsandbytes-style: blocks
//! of 256 values, an f32 absmax per block, and 8-bit codes into a signed dynamic
//! map (first moment) or an unsigned one (second moment). Tensors smaller than
//! 4096 elements keep fp32 states, as bitsandbytes does (`min_8bit_size`).
//!
//! Other tools' optimizer names (`recipe::OPTIMIZER_NAMES`) run one of these two: transformers'
//! `adamw_torch` and `adamw_torch_fused` run [`Optimizer::Adamw`] (the same update as
//! torch.optim.AdamW; "fused" is how torch launches it, here each group's flat buffers are
//! updated a chunk at a time); `adamw_bnb_8bit` runs [`Optimizer::Adamw8bit`]. The paged ones
//! (`paged_adamw_8bit`, `paged_adamw_32bit`) run the same update without paging: bitsandbytes
//! keeps their states in CUDA unified memory that moves to the host under memory pressure; here
//! the states stay in device memory (an adapter's states are small: 2 × 4 bytes per trainable
//! parameter in fp32, about 2 bytes in 8 bits), and `recipe::load` says so in a warning.

use std::sync::Arc;

use crate::kernels::adamw_8bit::{self, moment, Hyper, Map};
use crate::kernels::Kernels;
use crate::quant::state_map;
use crate::recipe::Optimizer;
use anyhow::{bail, Result};
use tch::{Kind, Tensor};

pub use crate::kernels::adamw_8bit::STATE_BLOCK;

/// Elements of an fp32-state group's flat buffers one step updates at a time (2M, 8 MiB in f32):
/// it bounds the step's temporaries whatever the group's size.
const STEP_CHUNK: i64 = STATE_BLOCK * 8192;

/// Smaller tensors keep fp32 states.
pub const MIN_8BIT_SIZE: i64 = 4096;

/// One moment stored in 8 bits.
struct Q8 {
    codes: Tensor,  // u8 [nblocks * 256]
    absmax: Tensor, // f32 [nblocks]
}

impl Q8 {
    fn of(q: (Tensor, Tensor)) -> Q8 {
        Q8 { codes: q.0, absmax: q.1 }
    }
}

enum State {
    Fp32 { m: Tensor, v: Tensor },
    Int8 { m: Q8, v: Q8 },
}

/// Hyper-parameters shared by every parameter.
#[derive(Debug, Clone, Copy)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 }
    }
}

/// Parameters that share a state kind and a weight-decay flag, stepped together: their values,
/// gradients and moments live in flat f32 buffers, each parameter a view of a segment padded to
/// a whole number of [`STATE_BLOCK`]s. So one step is a handful of kernels over the buffers
/// rather than a few dozen per parameter (hundreds of adapters on an 8B model), and, because the
/// segments keep each parameter's 8-bit blocks, the arithmetic is exactly the per-parameter one.
struct Group {
    /// Indices into `AdamW::params`.
    members: Vec<usize>,
    /// Start of each member's segment.
    offsets: Vec<i64>,
    /// f32 `[len]`: the parameters' storage.
    p: Tensor,
    /// f32 `[len]`: the gradients' storage, once [`AdamW::flatten_grads`] has moved them there.
    g: Tensor,
    decay: bool,
    state: State,
}

/// AdamW over a fixed list of parameters (fp32 leaf tensors with gradients).
pub struct AdamW {
    params: Vec<Tensor>,
    groups: Vec<Group>,
    cfg: AdamWConfig,
    /// Optimizer steps taken.
    pub step: u64,
    /// The 8-bit states' maps (signed for m, unsigned for v), with 8-bit states.
    maps: Option<(Map, Map)>,
    /// The CUDA kernels, when the parameters are on a GPU that has them (the 8-bit step in one
    /// launch per group).
    kernels: Option<Arc<Kernels>>,
}

fn padded(n: i64) -> i64 {
    (n + STATE_BLOCK - 1) / STATE_BLOCK * STATE_BLOCK
}

impl AdamW {
    /// A new optimizer; `kind` picks fp32 or 8-bit states. The parameters' storage moves into the
    /// optimizer's flat buffers (their values are kept; every other handle on them, such as the
    /// model's adapters, sees the same tensors).
    pub fn new(mut params: Vec<Tensor>, kind: Optimizer, cfg: AdamWConfig) -> AdamW {
        let device = params.first().map(|p| p.device()).unwrap_or(tch::Device::Cpu);
        let eight = kind == Optimizer::Adamw8bit;
        let maps = eight.then(|| (Map::new(&state_map(true), device), Map::new(&state_map(false), device)));
        let mut keys: Vec<(bool, bool)> = Vec::new(); // (8-bit state, weight decay), in first-seen order
        let mut members: Vec<Vec<usize>> = Vec::new();
        for (i, p) in params.iter().enumerate() {
            let key = (eight && p.numel() as i64 >= MIN_8BIT_SIZE, p.dim() >= 2);
            match keys.iter().position(|k| *k == key) {
                Some(j) => members[j].push(i),
                None => {
                    keys.push(key);
                    members.push(vec![i]);
                }
            }
        }
        let mut groups = Vec::new();
        for ((int8, decay), idx) in keys.into_iter().zip(members) {
            let mut offsets = Vec::with_capacity(idx.len());
            let mut len = 0;
            for &i in &idx {
                offsets.push(len);
                len += padded(params[i].numel() as i64);
            }
            let p = Tensor::zeros([len], (Kind::Float, device));
            tch::no_grad(|| {
                for (&i, &off) in idx.iter().zip(&offsets) {
                    let n = params[i].numel() as i64;
                    let view = p.narrow(0, off, n).view(params[i].size().as_slice());
                    view.shallow_clone().copy_(&params[i].to_kind(Kind::Float));
                    params[i].set_data(&view);
                }
            });
            let z = Tensor::zeros([len], (Kind::Float, device));
            let state = match &maps {
                Some((s, u)) if int8 => State::Int8 { m: Q8::of(s.quantize(&z)), v: Q8::of(u.quantize(&z)) },
                _ => State::Fp32 { m: z.copy(), v: z.copy() },
            };
            groups.push(Group { members: idx, offsets, p, g: z, decay, state });
        }
        AdamW { params, groups, cfg, step: 0, maps, kernels: None }
    }

    /// Step the 8-bit states with the CUDA kernel (kernels/adamw_8bit.cu) where `kernels` is
    /// given and the buffers are on its device; otherwise, and by default, with torch ops.
    pub fn with_kernels(mut self, kernels: Option<Arc<Kernels>>) -> AdamW {
        self.kernels = kernels;
        self
    }

    /// Move every gradient into its group's flat buffer (a no-op once done: autograd and the
    /// hand-written backward then accumulate in place there). A parameter without a gradient
    /// yet counts as a zero gradient.
    fn flatten_grads(&mut self) {
        let _guard = tch::no_grad_guard();
        for grp in &self.groups {
            let base = grp.g.data_ptr() as usize;
            for (&i, &off) in grp.members.iter().zip(&grp.offsets) {
                let p = &self.params[i];
                // Already there (every step after the first): checked without making a view,
                // since this runs a few times per step over hundreds of adapters.
                let cur = p.grad();
                if cur.defined() && cur.data_ptr() as usize == base + 4 * off as usize {
                    continue;
                }
                let n = p.numel() as i64;
                let view = grp.g.narrow(0, off, n).view(p.size().as_slice());
                if !p.grad().defined() {
                    crate::model::accumulate_grad(p, &view.zeros_like());
                }
                let mut g = p.grad();
                if g.data_ptr() != view.data_ptr() {
                    view.shallow_clone().copy_(&g);
                    g.set_data(&view);
                }
            }
        }
    }

    /// Zero every gradient (the flat buffers, in place).
    pub fn zero_grad(&mut self) {
        self.flatten_grads();
        for grp in &mut self.groups {
            let _ = grp.g.zero_();
        }
    }

    /// The global L2 norm of the gradients (one reduction per group's flat buffer; the padding
    /// between segments holds zeros).
    pub fn grad_norm(&mut self) -> f64 {
        self.flatten_grads();
        let _guard = tch::no_grad_guard();
        let sq: Vec<Tensor> = self.groups.iter().map(|grp| grp.g.dot(&grp.g)).collect();
        if sq.is_empty() {
            return 0.0;
        }
        Tensor::stack(&sq, 0).sum(Kind::Float).sqrt().double_value(&[])
    }

    /// Scale the gradients down to `max_norm` when their norm `norm` ([`AdamW::grad_norm`]) is
    /// above it (0 = no clipping).
    pub fn clip_grads(&mut self, norm: f64, max_norm: f64) {
        if max_norm > 0.0 && norm > max_norm {
            self.scale_grads(max_norm / (norm + 1e-6));
        }
    }

    /// Multiply every gradient by `f` (fp16 loss-scale removal).
    pub fn scale_grads(&mut self, f: f64) {
        self.flatten_grads();
        let _guard = tch::no_grad_guard();
        for grp in &mut self.groups {
            let _ = grp.g.g_mul_scalar_(f);
        }
    }

    /// One AdamW step at learning rate `lr`.
    pub fn step(&mut self, lr: f64) {
        self.flatten_grads();
        let _guard = tch::no_grad_guard();
        self.step += 1;
        let c = self.cfg;
        for grp in &mut self.groups {
            let h = Hyper {
                lr,
                beta1: c.beta1,
                beta2: c.beta2,
                eps: c.eps,
                weight_decay: if grp.decay { c.weight_decay } else { 0.0 },
                step: self.step,
            };
            match (&grp.state, &self.maps) {
                (State::Int8 { m, v }, Some((sm, um))) => adamw_8bit::step(
                    &grp.p,
                    &grp.g,
                    moment(&m.codes, &m.absmax),
                    moment(&v.codes, &v.absmax),
                    (sm, um),
                    h,
                    self.kernels.as_deref(),
                ),
                (State::Fp32 { m, v }, _) => fp32_step(&grp.p, &grp.g, m, v, h),
                (State::Int8 { .. }, None) => unreachable!("8-bit states are made with their maps"),
            }
        }
    }

    /// How many groups [`AdamW::step`] steps with the CUDA kernel (the 8-bit ones, on a GPU with
    /// the kernels).
    pub fn kernel_groups(&self) -> usize {
        let Some((sm, um)) = &self.maps else { return 0 };
        let on = |grp: &Group| match &grp.state {
            State::Int8 { m, v } => {
                let (m, v) = (moment(&m.codes, &m.absmax), moment(&v.codes, &v.absmax));
                adamw_8bit::usable(&grp.p, &grp.g, &m, &v, (sm, um), self.kernels.as_deref()).is_some()
            }
            State::Fp32 { .. } => false,
        };
        self.groups.iter().filter(|g| on(g)).count()
    }

    /// Each parameter's index, group and segment offset, in parameter order.
    fn segments(&self) -> Vec<(usize, &Group, i64)> {
        let mut out: Vec<(usize, &Group, i64)> = self
            .groups
            .iter()
            .flat_map(|g| g.members.iter().zip(&g.offsets).map(move |(&i, &off)| (i, g, off)))
            .collect();
        out.sort_by_key(|(i, _, _)| *i);
        out
    }

    /// The optimizer state as named tensors, for checkpoints (per parameter: views of the flat
    /// buffers, the layout a per-parameter optimizer would save).
    pub fn state_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out = vec![];
        for (i, grp, off) in self.segments() {
            let n = self.params[i].numel() as i64;
            match &grp.state {
                State::Fp32 { m, v } => {
                    out.push((format!("{i}.m"), m.narrow(0, off, n).view(self.params[i].size().as_slice())));
                    out.push((format!("{i}.v"), v.narrow(0, off, n).view(self.params[i].size().as_slice())));
                }
                State::Int8 { m, v } => {
                    let (len, nb) = (padded(n), padded(n) / STATE_BLOCK);
                    out.push((format!("{i}.m.codes"), m.codes.narrow(0, off, len)));
                    out.push((format!("{i}.m.absmax"), m.absmax.narrow(0, off / STATE_BLOCK, nb)));
                    out.push((format!("{i}.v.codes"), v.codes.narrow(0, off, len)));
                    out.push((format!("{i}.v.absmax"), v.absmax.narrow(0, off / STATE_BLOCK, nb)));
                }
            }
        }
        out
    }

    /// Restore a state saved by [`AdamW::state_tensors`] (same parameters, same kind).
    pub fn load_state(&mut self, tensors: &[(String, Tensor)], step: u64) -> Result<()> {
        let get = |name: String, want: &Tensor| -> Result<Tensor> {
            match tensors.iter().find(|(n, _)| *n == name) {
                Some((_, t)) if t.size() == want.size() => Ok(t.shallow_clone()),
                Some((_, t)) => bail!("optimizer state `{name}` has shape {:?}, expected {:?}", t.size(), want.size()),
                None => bail!("optimizer state `{name}` is missing from the checkpoint"),
            }
        };
        tch::no_grad(|| -> Result<()> {
            for (name, mut dst) in self.state_tensors() {
                let src = get(name, &dst)?;
                dst.copy_(&src.to_device(dst.device()));
            }
            Ok(())
        })?;
        self.step = step;
        Ok(())
    }

    /// Bytes of optimizer state (for memory plans).
    pub fn state_bytes(numel: i64, kind: Optimizer) -> i64 {
        if kind == Optimizer::Adamw8bit && numel >= MIN_8BIT_SIZE {
            2 * (numel + 4 * ((numel + STATE_BLOCK - 1) / STATE_BLOCK))
        } else {
            8 * numel
        }
    }
}

/// AdamW with fp32 moments, in place, a chunk of [`STEP_CHUNK`] values at a time (torch ops:
/// [`adamw_8bit::adam_update`] on the moments themselves, without the 8-bit round trip).
fn fp32_step(p: &Tensor, g: &Tensor, m: &Tensor, v: &Tensor, h: Hyper) {
    let len = g.numel() as i64;
    for off in (0..len).step_by(STEP_CHUNK as usize) {
        let n = STEP_CHUNK.min(len - off);
        let mut p = p.narrow(0, off, n);
        if h.weight_decay > 0.0 {
            let _ = p.g_mul_scalar_(1.0 - h.lr * h.weight_decay);
        }
        adamw_8bit::adam_update(&mut p, &g.narrow(0, off, n), &m.narrow(0, off, n), &v.narrow(0, off, n), h);
    }
}
