//! What a kernel check records: a [`Row`] per case, the [`Checker`] each op's `check` adds its
//! cases to (timing the large ones when benchmarking), and the error, tolerance and timing
//! helpers. The ops (kernels/*.rs) import this; the runner (`check.rs`) imports the ops.

use tch::{Device, Kind, Tensor};

/// One kernel checked (and optionally timed).
#[derive(Debug, Clone)]
pub struct Row {
    /// Kernel and case, e.g. `rms_norm_fwd llama bf16 [4096×4096]`.
    pub name: String,
    /// Largest |kernel − reference| / max(1, max |reference|).
    pub err: f64,
    /// What `err` may be.
    pub tol: f64,
    /// Bytes read + written per call, when timed.
    pub bytes: f64,
    /// Median seconds per call, when timed.
    pub secs: Option<f64>,
}

impl Row {
    /// Whether the kernel matches its reference.
    pub fn ok(&self) -> bool {
        self.err <= self.tol
    }
}

pub fn rel_err(got: &Tensor, want: &Tensor) -> f64 {
    let (g, w) = (got.to_kind(Kind::Double), want.to_kind(Kind::Double));
    let scale = w.abs().max().double_value(&[]).max(1.0);
    (g - w).abs().max().double_value(&[]) / scale
}

pub fn tol(kind: Kind) -> f64 {
    match kind {
        Kind::Float => 2e-6,
        Kind::Half => 2e-3,
        _ => 1.6e-2,
    }
}

pub fn name(kind: Kind) -> &'static str {
    match kind {
        Kind::Float => "f32",
        Kind::Half => "f16",
        _ => "bf16",
    }
}

/// Seconds per call of `f`: the median over `iters` rounds of 10 back-to-back calls between
/// device synchronisations (so launch latency overlaps, as in a model), after a warm-up.
pub fn time(device: Device, iters: usize, mut f: impl FnMut()) -> f64 {
    let sync = || {
        if let Device::Cuda(i) = device {
            tch::Cuda::synchronize(i as i64);
        }
    };
    f();
    sync();
    let mut v: Vec<f64> = (0..iters)
        .map(|_| {
            let t = std::time::Instant::now();
            for _ in 0..10 {
                f();
            }
            sync();
            t.elapsed().as_secs_f64() / 10.0
        })
        .collect();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Collects the cases of a check run: each op file's `check` adds its own (beside the op and
/// its reference), timing the large ones when benchmarking.
pub struct Checker {
    pub device: Device,
    /// Timing rounds of each timed case (0: nothing is timed).
    pub iters: usize,
    pub rows: Vec<Row>,
}

impl Checker {
    /// A case, timed (when benchmarking) if `timed`.
    pub fn case(&mut self, timed: bool, name: String, err: f64, tol: f64, bytes: f64, f: &mut dyn FnMut()) {
        let secs = (timed && self.iters > 0).then(|| time(self.device, self.iters, f));
        self.rows.push(Row { name, err, tol, bytes, secs });
    }

    /// A case whose kernel call `f` is timed when benchmarking.
    pub fn timed(&mut self, name: String, err: f64, tol: f64, bytes: f64, f: &mut dyn FnMut()) {
        let secs = (self.iters > 0).then(|| time(self.device, self.iters, f));
        self.rows.push(Row { name, err, tol, bytes, secs });
    }
}
