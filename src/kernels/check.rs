//! Checks every CUDA kernel against its CPU reference on the same device and inputs, and times
//! it against the card's copy bandwidth (its roofline: each kernel is memory-bound). Run by the
//! kernel tests on a GPU and by `tuner kernels`. Each op's cases live beside the op, in its
//! file's `check`; this file holds the runner, the error and timing helpers and the table.

use tch::{Device, Kind, Tensor};

use super::{dequant_4bit, glu, rms_norm, rope, varlen, Kernels};

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

/// Measured device copy bandwidth in bytes/s (read + write of a 1 GiB-ish tensor).
pub fn copy_bandwidth(device: Device) -> f64 {
    let src = Tensor::ones([256 << 20], (Kind::Float, device));
    let mut dst = src.empty_like();
    let s = time(device, 10, || {
        dst.copy_(&src);
    });
    2.0 * 4.0 * (256u64 << 20) as f64 / s
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
    /// A case whose kernel call `f` is timed when benchmarking.
    pub fn timed(&mut self, name: String, err: f64, tol: f64, bytes: f64, f: &mut dyn FnMut()) {
        let secs = (self.iters > 0).then(|| time(self.device, self.iters, f));
        self.rows.push(Row { name, err, tol, bytes, secs });
    }
}

/// Every kernel against its reference on `device` (a CUDA device `k` was compiled for).
/// `bench` also times the large cases. `seed` fixes the inputs.
pub fn run(k: &Kernels, device: Device, bench: bool, seed: i64) -> Vec<Row> {
    tch::manual_seed(seed);
    let mut c = Checker { device, iters: if bench { 20 } else { 0 }, rows: Vec::new() };
    dequant_4bit::check(k, &mut c);
    rms_norm::check(k, &mut c);
    rope::check(k, &mut c);
    glu::check(k, &mut c);
    varlen::check(&mut c);
    c.rows
}

/// The rows as a table; with timings, each kernel's bandwidth and its fraction of `copy_bw`.
pub fn table(rows: &[Row], copy_bw: Option<f64>) -> String {
    let mut s = String::new();
    if let Some(bw) = copy_bw {
        s.push_str(&format!("device copy bandwidth: {:.0} GB/s\n", bw / 1e9));
    }
    s.push_str(&format!(
        "{:<56} {:>10} {:>9} {:>4} {:>10} {:>9} {:>7}\n",
        "kernel", "err", "tol", "ok", "µs", "GB/s", "of copy"
    ));
    for r in rows {
        let (us, gbs, frac) = match r.secs {
            // Not memory-bound (attention): the time alone.
            Some(t) if r.bytes == 0.0 => (format!("{:.1}", t * 1e6), String::new(), String::new()),
            Some(t) => {
                let bw = r.bytes / t;
                (
                    format!("{:.1}", t * 1e6),
                    format!("{:.0}", bw / 1e9),
                    copy_bw.map_or(String::new(), |c| format!("{:.0}%", 100.0 * bw / c)),
                )
            }
            None => (String::new(), String::new(), String::new()),
        };
        s.push_str(&format!(
            "{:<56} {:>10.2e} {:>9.1e} {:>4} {:>10} {:>9} {:>7}\n",
            r.name,
            r.err,
            r.tol,
            if r.ok() { "yes" } else { "NO" },
            us,
            gbs,
            frac
        ));
    }
    s
}
