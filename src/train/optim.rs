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

use crate::recipe::Optimizer;
use anyhow::{bail, Result};
use tch::{Kind, Tensor};

/// Values per quantization block of an 8-bit state.
pub const STATE_BLOCK: i64 = 256;

/// Elements of a group's flat buffers one optimizer step updates at a time (2M, 8 MiB in f32):
/// it bounds the step's temporaries (f32 moments dequantized from 8 bits, their int64 code
/// indices, the update) whatever the adapter's size (42M parameters on an 8B model would need
/// ~1 GiB of them at once). A whole number of [`STATE_BLOCK`]s, so the 8-bit blocks, and every
/// value, are those of a single pass.
const STEP_CHUNK: i64 = STATE_BLOCK * 8192;

/// Smaller tensors keep fp32 states.
pub const MIN_8BIT_SIZE: i64 = 4096;

/// The 256-entry dynamic map: signed for the first moment, unsigned for the second.
/// Built like bitsandbytes' `create_dynamic_map(signed, 7, 8)`: for each decade
/// 10^(i-6), i < 7, the midpoints of a linspace(0.1, 1) grid of 2^i (signed, both
/// signs) or 2^(i+1) (unsigned) steps, plus 0 and 1: 256 values either way.
pub fn dynamic_map(signed: bool) -> Vec<f32> {
    let non_sign_bits = 7;
    let max_exp = 7;
    let mut data: Vec<f32> = vec![];
    for i in 0..max_exp {
        let items = if signed {
            (1usize << (i + non_sign_bits - max_exp)) + 1
        } else {
            (1usize << (i + non_sign_bits - max_exp + 1)) + 1
        };
        let bounds: Vec<f32> = (0..items).map(|k| 0.1 + 0.9 * k as f32 / (items - 1) as f32).collect();
        let scale = 10f32.powi(i - (max_exp - 1));
        for w in bounds.windows(2) {
            let m = (w[0] + w[1]) / 2.0;
            data.push(scale * m);
            if signed {
                data.push(-scale * m);
            }
        }
    }
    data.push(0.0);
    data.push(1.0);
    while data.len() < 256 {
        data.push(0.0);
    }
    data.sort_by(|a, b| a.total_cmp(b));
    data
}

/// One moment stored in 8 bits.
struct Q8 {
    codes: Tensor,  // u8 [nblocks * 256]
    absmax: Tensor, // f32 [nblocks]
}

impl Q8 {
    /// Elements `off..off + n` (whole blocks) as views of this moment's buffers.
    fn chunk(&self, off: i64, n: i64) -> Q8 {
        Q8 { codes: self.codes.narrow(0, off, n), absmax: self.absmax.narrow(0, off / STATE_BLOCK, n / STATE_BLOCK) }
    }

    /// Overwrite these (view) buffers with `q`'s values.
    fn set(&self, q: &Q8) {
        let (mut codes, mut absmax) = (self.codes.shallow_clone(), self.absmax.shallow_clone());
        codes.copy_(&q.codes);
        absmax.copy_(&q.absmax);
    }
}

struct Tables {
    map: Tensor,  // f32 [256]
    mids: Tensor, // f32 [255], midpoints between sorted entries
}

impl Tables {
    fn new(signed: bool, device: tch::Device) -> Tables {
        let m = dynamic_map(signed);
        let mids: Vec<f32> = m.windows(2).map(|w| (w[0] + w[1]) / 2.0).collect();
        Tables { map: Tensor::from_slice(&m).to_device(device), mids: Tensor::from_slice(&mids).to_device(device) }
    }

    fn quantize(&self, x: &Tensor) -> Q8 {
        let n = x.numel() as i64;
        let nb = (n + STATE_BLOCK - 1) / STATE_BLOCK;
        let flat = x.flatten(0, -1).constant_pad_nd([0, nb * STATE_BLOCK - n]).view([nb, STATE_BLOCK]);
        let absmax = flat.abs().amax([1], true).clamp_min(1e-30);
        let normed = &flat / &absmax;
        let codes = Tensor::bucketize(&normed.contiguous(), &self.mids, false, false).to_kind(Kind::Uint8);
        Q8 { codes: codes.flatten(0, -1), absmax: absmax.flatten(0, -1) }
    }

    fn dequantize(&self, q: &Q8, shape: &[i64]) -> Tensor {
        let n: i64 = shape.iter().product();
        let vals =
            self.map.index_select(0, &q.codes.to_kind(Kind::Int64)).view([-1, STATE_BLOCK]) * q.absmax.unsqueeze(1);
        vals.flatten(0, -1).narrow(0, 0, n).view(shape)
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
    signed: Option<Tables>,
    unsigned: Option<Tables>,
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
        let (signed, unsigned) =
            if eight { (Some(Tables::new(true, device)), Some(Tables::new(false, device))) } else { (None, None) };
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
            let state = match (&signed, &unsigned) {
                (Some(s), Some(u)) if int8 => State::Int8 { m: s.quantize(&z), v: u.quantize(&z) },
                _ => State::Fp32 { m: z.copy(), v: z.copy() },
            };
            groups.push(Group { members: idx, offsets, p, g: z, decay, state });
        }
        AdamW { params, groups, cfg, step: 0, signed, unsigned }
    }

    /// Move every gradient into its group's flat buffer (a no-op once done: autograd and the
    /// hand-written backward then accumulate in place there). A parameter without a gradient
    /// yet counts as a zero gradient.
    fn flatten_grads(&mut self) {
        let _guard = tch::no_grad_guard();
        for grp in &self.groups {
            for (&i, &off) in grp.members.iter().zip(&grp.offsets) {
                let p = &self.params[i];
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

    /// The global L2 norm of the gradients; scaled down to `max_norm` when above it (0 = no clipping).
    pub fn clip_grad_norm(&mut self, max_norm: f64) -> f64 {
        self.flatten_grads();
        let _guard = tch::no_grad_guard();
        // Per parameter, then summed: the same reduction order as a per-tensor loop.
        let sq: Vec<Tensor> = self
            .params
            .iter()
            .map(|p| p.grad())
            .filter(|g| g.defined())
            .map(|g| g.to_kind(Kind::Float).square().sum(Kind::Float))
            .collect();
        if sq.is_empty() {
            return 0.0;
        }
        let total = Tensor::stack(&sq, 0).sum(Kind::Float).sqrt().double_value(&[]);
        if max_norm > 0.0 && total > max_norm {
            let coef = max_norm / (total + 1e-6);
            for grp in &mut self.groups {
                let _ = grp.g.g_mul_scalar_(coef);
            }
        }
        total
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
        let bc1 = 1.0 - c.beta1.powi(self.step as i32);
        let bc2 = 1.0 - c.beta2.powi(self.step as i32);
        for grp in &mut self.groups {
            let len = grp.g.numel() as i64;
            for off in (0..len).step_by(STEP_CHUNK as usize) {
                let n = STEP_CHUNK.min(len - off);
                let g = grp.g.narrow(0, off, n);
                let mut p = grp.p.narrow(0, off, n);
                if grp.decay && c.weight_decay > 0.0 {
                    let _ = p.g_mul_scalar_(1.0 - lr * c.weight_decay);
                }
                let (mut m, mut v) = match &grp.state {
                    State::Fp32 { m, v } => (m.narrow(0, off, n), v.narrow(0, off, n)),
                    State::Int8 { m, v } => (
                        self.signed
                            .as_ref()
                            .map(|t| t.dequantize(&m.chunk(off, n), &[n]))
                            .unwrap_or_else(|| g.zeros_like()),
                        self.unsigned
                            .as_ref()
                            .map(|t| t.dequantize(&v.chunk(off, n), &[n]))
                            .unwrap_or_else(|| g.zeros_like()),
                    ),
                };
                let _ = m.g_mul_scalar_(c.beta1).g_add_(&(&g * (1.0 - c.beta1)));
                let _ = v.g_mul_scalar_(c.beta2).g_add_(&(g.square() * (1.0 - c.beta2)));
                let denom = v.sqrt() / bc2.sqrt() + c.eps;
                let update = (&m / denom) * (lr / bc1);
                let _ = p.g_sub_(&update);
                if let State::Int8 { m: qm, v: qv } = &grp.state {
                    if let (Some(s), Some(u)) = (&self.signed, &self.unsigned) {
                        qm.chunk(off, n).set(&s.quantize(&m));
                        qv.chunk(off, n).set(&u.quantize(&v));
                    }
                }
            }
        }
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
