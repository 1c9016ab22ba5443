//! Optimizers for the adapter weights: AdamW with fp32 states (torch.optim.AdamW
//! semantics: decoupled weight decay, bias-corrected moments), and 8-bit AdamW
//! whose two moments are stored blockwise-quantized, bitsandbytes-style: blocks
//! of 256 values, an f32 absmax per block, and 8-bit codes into a signed dynamic
//! map (first moment) or an unsigned one (second moment). Tensors smaller than
//! 4096 elements keep fp32 states, as bitsandbytes does (`min_8bit_size`).

use crate::recipe::Optimizer;
use anyhow::{bail, Result};
use tch::{Kind, Tensor};

/// Values per quantization block of an 8-bit state.
pub const STATE_BLOCK: i64 = 256;
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
        let items = if signed { (1usize << (i + non_sign_bits - max_exp)) + 1 } else { (1usize << (i + non_sign_bits - max_exp + 1)) + 1 };
        let bounds: Vec<f32> = (0..items).map(|k| 0.1 + 0.9 * k as f32 / (items - 1) as f32).collect();
        let scale = 10f32.powi(i as i32 - (max_exp as i32 - 1));
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
        let vals = self.map.index_select(0, &q.codes.to_kind(Kind::Int64)).view([-1, STATE_BLOCK]) * q.absmax.unsqueeze(1);
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

/// AdamW over a fixed list of parameters (fp32 leaf tensors with gradients).
pub struct AdamW {
    params: Vec<Tensor>,
    /// Whether each parameter gets weight decay (matrices yes; biases and norms no).
    decay: Vec<bool>,
    states: Vec<State>,
    cfg: AdamWConfig,
    /// Optimizer steps taken.
    pub step: u64,
    signed: Option<Tables>,
    unsigned: Option<Tables>,
}

impl AdamW {
    /// A new optimizer; `kind` picks fp32 or 8-bit states.
    pub fn new(params: Vec<Tensor>, kind: Optimizer, cfg: AdamWConfig) -> AdamW {
        let device = params.first().map(|p| p.device()).unwrap_or(tch::Device::Cpu);
        let eight = kind == Optimizer::Adamw8bit;
        let (signed, unsigned) = if eight { (Some(Tables::new(true, device)), Some(Tables::new(false, device))) } else { (None, None) };
        let states = params
            .iter()
            .map(|p| {
                let z = p.zeros_like().to_kind(Kind::Float);
                match (&signed, &unsigned) {
                    (Some(s), Some(u)) if p.numel() as i64 >= MIN_8BIT_SIZE => State::Int8 { m: s.quantize(&z), v: u.quantize(&z) },
                    _ => State::Fp32 { m: z.copy(), v: z },
                }
            })
            .collect();
        let decay = params.iter().map(|p| p.dim() >= 2).collect();
        AdamW { params, decay, states, cfg, step: 0, signed, unsigned }
    }

    /// Zero every gradient.
    pub fn zero_grad(&mut self) {
        for p in &mut self.params {
            let mut g = p.grad();
            if g.defined() {
                let _ = g.zero_();
            }
        }
    }

    /// The global L2 norm of the gradients; scaled down to `max_norm` when above it (0 = no clipping).
    pub fn clip_grad_norm(&mut self, max_norm: f64) -> f64 {
        let _guard = tch::no_grad_guard();
        let sq: Vec<Tensor> = self.params.iter().map(|p| p.grad()).filter(|g| g.defined()).map(|g| g.to_kind(Kind::Float).square().sum(Kind::Float)).collect();
        if sq.is_empty() {
            return 0.0;
        }
        let total = Tensor::stack(&sq, 0).sum(Kind::Float).sqrt().double_value(&[]);
        if max_norm > 0.0 && total > max_norm {
            let coef = max_norm / (total + 1e-6);
            for p in &self.params {
                let mut g = p.grad();
                if g.defined() {
                    let _ = g.g_mul_scalar_(coef);
                }
            }
        }
        total
    }

    /// Multiply every gradient by `f` (fp16 loss-scale removal).
    pub fn scale_grads(&mut self, f: f64) {
        let _guard = tch::no_grad_guard();
        for p in &self.params {
            let mut g = p.grad();
            if g.defined() {
                let _ = g.g_mul_scalar_(f);
            }
        }
    }

    /// One AdamW step at learning rate `lr`.
    pub fn step(&mut self, lr: f64) {
        let _guard = tch::no_grad_guard();
        self.step += 1;
        let c = self.cfg;
        let bc1 = 1.0 - c.beta1.powi(self.step as i32);
        let bc2 = 1.0 - c.beta2.powi(self.step as i32);
        for ((p, state), decay) in self.params.iter_mut().zip(self.states.iter_mut()).zip(&self.decay) {
            let g = p.grad();
            if !g.defined() {
                continue;
            }
            let g = g.to_kind(Kind::Float);
            if *decay && c.weight_decay > 0.0 {
                let _ = p.g_mul_scalar_(1.0 - lr * c.weight_decay);
            }
            let shape = p.size();
            let (mut m, mut v) = match state {
                State::Fp32 { m, v } => (m.shallow_clone(), v.shallow_clone()),
                State::Int8 { m, v } => {
                    (self.signed.as_ref().map(|t| t.dequantize(m, &shape)).unwrap_or_else(|| g.zeros_like()), self.unsigned.as_ref().map(|t| t.dequantize(v, &shape)).unwrap_or_else(|| g.zeros_like()))
                }
            };
            let _ = m.g_mul_scalar_(c.beta1).g_add_(&(&g * (1.0 - c.beta1)));
            let _ = v.g_mul_scalar_(c.beta2).g_add_(&(g.square() * (1.0 - c.beta2)));
            let denom = v.sqrt() / bc2.sqrt() + c.eps;
            let update = (&m / denom) * (lr / bc1);
            let _ = p.g_sub_(&update.to_kind(p.kind()));
            if let State::Int8 { m: qm, v: qv } = state {
                if let (Some(s), Some(u)) = (&self.signed, &self.unsigned) {
                    *qm = s.quantize(&m);
                    *qv = u.quantize(&v);
                }
            }
        }
    }

    /// The optimizer state as named tensors, for checkpoints.
    pub fn state_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out = vec![];
        for (i, s) in self.states.iter().enumerate() {
            match s {
                State::Fp32 { m, v } => {
                    out.push((format!("{i}.m"), m.shallow_clone()));
                    out.push((format!("{i}.v"), v.shallow_clone()));
                }
                State::Int8 { m, v } => {
                    out.push((format!("{i}.m.codes"), m.codes.shallow_clone()));
                    out.push((format!("{i}.m.absmax"), m.absmax.shallow_clone()));
                    out.push((format!("{i}.v.codes"), v.codes.shallow_clone()));
                    out.push((format!("{i}.v.absmax"), v.absmax.shallow_clone()));
                }
            }
        }
        out
    }

    /// Restore a state saved by [`AdamW::state_tensors`] (same parameters, same kind).
    pub fn load_state(&mut self, tensors: &[(String, Tensor)], step: u64) -> Result<()> {
        let get = |name: String| -> Result<Tensor> {
            match tensors.iter().find(|(n, _)| *n == name) {
                Some((_, t)) => Ok(t.shallow_clone()),
                None => bail!("optimizer state `{name}` is missing from the checkpoint"),
            }
        };
        let device = self.params.first().map(|p| p.device()).unwrap_or(tch::Device::Cpu);
        for (i, s) in self.states.iter_mut().enumerate() {
            match s {
                State::Fp32 { m, v } => {
                    m.copy_(&get(format!("{i}.m"))?.to_device(device));
                    v.copy_(&get(format!("{i}.v"))?.to_device(device));
                }
                State::Int8 { m, v } => {
                    m.codes = get(format!("{i}.m.codes"))?.to_device(device);
                    m.absmax = get(format!("{i}.m.absmax"))?.to_device(device);
                    v.codes = get(format!("{i}.v.codes"))?.to_device(device);
                    v.absmax = get(format!("{i}.v.absmax"))?.to_device(device);
                }
            }
        }
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
