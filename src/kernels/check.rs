//! Checks every CUDA kernel against its CPU reference on the same device and inputs, and times
//! it against the card's copy bandwidth (its roofline: each kernel is memory-bound). Run by the
//! kernel tests on a GPU and by `tuner kernels`.

use tch::{Device, Kind, Tensor};

use super::{dequant_4bit, glu, rms_norm, rope, varlen, Kernels};
use crate::quant::{QuantTensor, QuantType};

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

fn rel_err(got: &Tensor, want: &Tensor) -> f64 {
    let (g, w) = (got.to_kind(Kind::Double), want.to_kind(Kind::Double));
    let scale = w.abs().max().double_value(&[]).max(1.0);
    (g - w).abs().max().double_value(&[]) / scale
}

fn tol(kind: Kind) -> f64 {
    match kind {
        Kind::Float => 2e-6,
        Kind::Half => 2e-3,
        _ => 1.6e-2,
    }
}

fn name(kind: Kind) -> &'static str {
    match kind {
        Kind::Float => "f32",
        Kind::Half => "f16",
        _ => "bf16",
    }
}

/// Seconds per call of `f`: the median over `iters` rounds of 10 back-to-back calls between
/// device synchronisations (so launch latency overlaps, as in a model), after a warm-up.
fn time(device: Device, iters: usize, mut f: impl FnMut()) -> f64 {
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

/// Every kernel against its reference on `device` (a CUDA device `k` was compiled for).
/// `bench` also times the large cases. `seed` fixes the inputs.
pub fn run(k: &Kernels, device: Device, bench: bool, seed: i64) -> Vec<Row> {
    tch::manual_seed(seed);
    let mut rows = Vec::new();
    let iters = if bench { 20 } else { 0 };
    let timed = |rows: &mut Vec<Row>, name: String, err: f64, tol: f64, bytes: f64, f: &mut dyn FnMut()| {
        let secs = (iters > 0).then(|| time(device, iters, f));
        rows.push(Row { name, err, tol, bytes, secs });
    };

    // 4-bit dequantize: bit-exact in every dtype, plain and double-quantized absmax, a tail.
    for (shape, double, big) in [
        ([14336i64, 4096i64], true, true),
        ([4096, 4096], false, false),
        ([7, 37], true, false),
        ([5, 24], false, false),
    ] {
        let w = Tensor::randn(shape, (Kind::Float, device)) * 0.02;
        let q = QuantTensor::quantize(&w, QuantType::Nf4, 64, double).expect("quantize");
        for kind in [Kind::BFloat16, Kind::Half, Kind::Float] {
            let got = dequant_4bit::cuda(&q, kind, k).expect("dequant kernel");
            let want = dequant_4bit::reference(&q, kind);
            let err = rel_err(&got, &want);
            let n = (shape[0] * shape[1]) as f64;
            let bytes = n / 2.0 + n * got.kind().elt_size_in_bytes() as f64;
            let label = format!("dequant_4bit nf4{} {} {:?}", if double { " dq" } else { "" }, name(kind), shape);
            if big && kind == Kind::BFloat16 {
                timed(&mut rows, label, err, 0.0, bytes, &mut || {
                    let _ = dequant_4bit::cuda(&q, kind, k);
                });
                timed(
                    &mut rows,
                    format!("dequant_4bit reference (torch ops) {} {:?}", name(kind), shape),
                    0.0,
                    0.0,
                    bytes,
                    &mut || {
                        let _ = dequant_4bit::reference(&q, kind);
                    },
                );
            } else {
                rows.push(Row { name: label, err, tol: 0.0, bytes, secs: None });
            }
        }
    }

    // RMSNorm forward and backward, each mode and dtype.
    for kind in [Kind::BFloat16, Kind::Float, Kind::Half] {
        for (mode, label) in
            [(rms_norm::Mode::Llama, "llama"), (rms_norm::Mode::Scale, "scale"), (rms_norm::Mode::Plain, "plain")]
        {
            let (rows_n, h) =
                if kind == Kind::BFloat16 && mode == rms_norm::Mode::Llama { (4096, 4096) } else { (64, 1000) };
            let x = (Tensor::randn([rows_n, h], (Kind::Float, device)) * 3.0).to_kind(kind);
            let w = match mode {
                rms_norm::Mode::Llama => Some((Tensor::rand([h], (Kind::Float, device)) + 0.5).to_kind(kind)),
                rms_norm::Mode::Scale => Some(Tensor::rand([h], (Kind::Float, device)) + 0.5),
                rms_norm::Mode::Plain => None,
            };
            let eps = 1e-6;
            let (y, rstd) = rms_norm::forward_with_rstd(&x, w.as_ref(), eps, mode, Some(k));
            let y_ref = rms_norm::forward_reference(&x, w.as_ref(), eps, mode);
            let io = (2 * rows_n * h) as f64 * kind.elt_size_in_bytes() as f64;
            let big = rows_n == 4096;
            let mut f = || {
                let _ = rms_norm::forward(&x, w.as_ref(), eps, mode, Some(k));
            };
            if big {
                timed(
                    &mut rows,
                    format!("rms_norm_fwd {label} {} [{rows_n}×{h}]", name(kind)),
                    rel_err(&y, &y_ref),
                    tol(kind),
                    io,
                    &mut f,
                );
            } else {
                rows.push(Row {
                    name: format!("rms_norm_fwd {label} {} [{rows_n}×{h}]", name(kind)),
                    err: rel_err(&y, &y_ref),
                    tol: tol(kind),
                    bytes: io,
                    secs: None,
                });
            }
            let r_ref = rms_norm::rstd_reference(&x, eps);
            // The 8-wide entry sums in another order: 1/rms agrees to f32 rounding of a long sum.
            rows.push(Row {
                name: format!("rms_norm_fwd rstd {label} {}", name(kind)),
                err: rel_err(&rstd, &r_ref),
                tol: 1e-5,
                bytes: 0.0,
                secs: None,
            });
            let dy = Tensor::randn([rows_n, h], (Kind::Float, device)).to_kind(kind);
            // The default takes the 8-wide entry points where they apply (2-byte dtypes; 1000 is a
            // multiple of 8 too); there the scalar ones are checked and timed beside them.
            if let Some((y8, r8)) = rms_norm::forward_with_rstd_scalar(&x, w.as_ref(), eps, mode, Some(k)) {
                let label8 = format!("rms_norm_fwd scalar {label} {} [{rows_n}×{h}]", name(kind));
                let err = rel_err(&y8, &y_ref);
                rows.push(Row {
                    name: format!("rms_norm_fwd scalar rstd {label} {}", name(kind)),
                    err: rel_err(&r8, &r_ref),
                    tol: 2e-6,
                    bytes: 0.0,
                    secs: None,
                });
                let mut f = || {
                    let _ = rms_norm::forward_with_rstd_scalar(&x, w.as_ref(), eps, mode, Some(k));
                };
                if big {
                    timed(&mut rows, label8, err, tol(kind), io, &mut f);
                } else {
                    rows.push(Row { name: label8, err, tol: tol(kind), bytes: io, secs: None });
                }
                let dx8 = rms_norm::backward_scalar(&dy, &x, w.as_ref(), &r8, mode, Some(k))
                    .expect("applies to x and dy alike");
                let dx_ref = rms_norm::backward_reference(&dy, &x, w.as_ref(), &r_ref, mode);
                let label8 = format!("rms_norm_bwd scalar {label} {} [{rows_n}×{h}]", name(kind));
                let mut f = || {
                    let _ = rms_norm::backward_scalar(&dy, &x, w.as_ref(), &r8, mode, Some(k));
                };
                if big {
                    timed(&mut rows, label8, rel_err(&dx8, &dx_ref), tol(kind), 1.5 * io, &mut f);
                } else {
                    rows.push(Row {
                        name: label8,
                        err: rel_err(&dx8, &dx_ref),
                        tol: tol(kind),
                        bytes: 1.5 * io,
                        secs: None,
                    });
                }
            }
            let dx = rms_norm::backward(&dy, &x, w.as_ref(), &rstd, mode, Some(k));
            let dx_ref = rms_norm::backward_reference(&dy, &x, w.as_ref(), &r_ref, mode);
            let err = rel_err(&dx, &dx_ref);
            let mut f = || {
                let _ = rms_norm::backward(&dy, &x, w.as_ref(), &rstd, mode, Some(k));
            };
            if big {
                timed(
                    &mut rows,
                    format!("rms_norm_bwd {label} {} [{rows_n}×{h}]", name(kind)),
                    err,
                    tol(kind),
                    1.5 * io,
                    &mut f,
                );
            } else {
                rows.push(Row {
                    name: format!("rms_norm_bwd {label} {} [{rows_n}×{h}]", name(kind)),
                    err,
                    tol: tol(kind),
                    bytes: 1.5 * io,
                    secs: None,
                });
            }
        }
    }

    // RoPE forward and inverse on [B, T, heads, d] with per-row positions (a packed row).
    for kind in [Kind::BFloat16, Kind::Float] {
        let (b, t, heads, d) = if kind == Kind::BFloat16 { (2, 2048, 32, 128) } else { (2, 33, 4, 64) };
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
            let got = rope::apply(x.copy(), &cos, &sin, inverse, Some(k));
            let want = rope::reference(&x, &cos, &sin, inverse);
            let label = format!("rope{} {} [{b}×{t}×{heads}×{d}]", if inverse { " backward" } else { "" }, name(kind));
            let io = 2.0 * x.numel() as f64 * kind.elt_size_in_bytes() as f64;
            let mut y = x.copy();
            if kind == Kind::BFloat16 && !inverse {
                timed(&mut rows, label, rel_err(&got, &want), tol(kind), io, &mut || {
                    y = rope::apply(y.shallow_clone(), &cos, &sin, inverse, Some(k));
                });
            } else {
                rows.push(Row { name: label, err: rel_err(&got, &want), tol: tol(kind), bytes: io, secs: None });
            }
        }
    }

    // Gated activations, forward and backward.
    // The 8-wide kernels (bf16, a multiple of 8) and the scalar ones (odd sizes, f32).
    for (kind, shape) in [(Kind::BFloat16, [4096i64, 14336i64]), (Kind::BFloat16, [3, 333]), (Kind::Float, [16, 1001])]
    {
        for (act, label) in [(glu::Act::Silu, "swiglu"), (glu::Act::GeluTanh, "geglu")] {
            let g = (Tensor::randn(shape, (Kind::Float, device)) * 2.0).to_kind(kind);
            let u = Tensor::randn(shape, (Kind::Float, device)).to_kind(kind);
            let dh = Tensor::randn(shape, (Kind::Float, device)).to_kind(kind);
            let n = g.numel() as f64 * kind.elt_size_in_bytes() as f64;
            let h = glu::forward(&g, &u, act, Some(k));
            let err = rel_err(&h, &glu::forward_reference(&g, &u, act));
            let (dg, du) = glu::backward(&dh, &g, &u, act, Some(k));
            let (dg_ref, du_ref) = glu::backward_reference(&dh, &g, &u, act);
            let errb = rel_err(&dg, &dg_ref).max(rel_err(&du, &du_ref));
            let dims = format!("{:?}", shape);
            if shape[0] == 4096 {
                timed(
                    &mut rows,
                    format!("glu_fwd {label} {} {dims}", name(kind)),
                    err,
                    tol(kind),
                    3.0 * n,
                    &mut || {
                        let _ = glu::forward(&g, &u, act, Some(k));
                    },
                );
                timed(
                    &mut rows,
                    format!("glu_bwd {label} {} {dims}", name(kind)),
                    errb,
                    tol(kind),
                    5.0 * n,
                    &mut || {
                        let _ = glu::backward(&dh, &g, &u, act, Some(k));
                    },
                );
            } else {
                rows.push(Row {
                    name: format!("glu_fwd {label} {} {dims}", name(kind)),
                    err,
                    tol: tol(kind),
                    bytes: 3.0 * n,
                    secs: None,
                });
                rows.push(Row {
                    name: format!("glu_bwd {label} {} {dims}", name(kind)),
                    err: errb,
                    tol: tol(kind),
                    bytes: 5.0 * n,
                    secs: None,
                });
            }
        }
    }
    rows.extend(varlen_rows(device, iters));
    rows
}

/// Varlen flash attention (libtorch's, through kernels/flash_varlen.cpp) against its reference,
/// SDPA under the boolean mask the model would otherwise build: packed documents, a padded row,
/// GQA, a sliding window; the output at real tokens and the q/k/v gradients for an upstream
/// gradient that is zero at padding (as the loss's is). Timed forward + backward, both paths.
fn varlen_rows(device: Device, iters: usize) -> Vec<Row> {
    use crate::model::blocks::{attend_kv, attention_mask};
    use crate::model::Batch;
    let mut rows = Vec::new();
    // (label, kind, [nh, nkv, d], each row's document lengths (the rest of T is padding), T, window)
    type Case = (&'static str, Kind, [i64; 3], Vec<Vec<i64>>, i64, Option<i64>);
    let cases: [Case; 3] = [
        ("packed+padded gqa", Kind::BFloat16, [32, 8, 128], vec![vec![300, 700, 1048], vec![1900]], 2048, None),
        ("window 256 padded", Kind::Half, [8, 4, 256], vec![vec![1024], vec![924]], 1024, Some(256)),
        ("packed small", Kind::BFloat16, [4, 2, 64], vec![vec![5, 20, 12]], 37, None),
    ];
    for (label, kind, [nh, nkv, d], docs, t, window) in cases {
        if !varlen::supports(device, kind, d) {
            continue;
        }
        let b = docs.len() as i64;
        let (mut seq, mut real) = (Vec::new(), Vec::new());
        for row in &docs {
            let used: i64 = row.iter().sum();
            for (i, &n) in row.iter().enumerate() {
                seq.extend(std::iter::repeat_n(i as i64, n as usize));
            }
            seq.extend(std::iter::repeat_n(-1i64, (t - used) as usize));
            real.extend((0..t).map(|c| (c < used) as i64));
        }
        let seq = Tensor::from_slice(&seq).view([b, t]).to_device(device);
        let real = Tensor::from_slice(&real).view([b, t]).to_device(device);
        let mut batch = Batch::packed(Tensor::zeros([b, t], (Kind::Int64, device)), seq);
        batch.attention_mask = Some(real.shallow_clone());
        let dense = attention_mask(&batch, window, device).expect("a packed batch has a mask");
        let (cu, max_len) = batch.segments(device);
        let scale = (d as f64).powf(-0.5);
        // Leaves made as [B, T, n, d] and transposed, as the attention blocks make them.
        let leaf = |n: i64| {
            Tensor::randn([b, t, n, d], (Kind::Float, device)).to_kind(kind).transpose(1, 2).set_requires_grad(true)
        };
        let (q, k, v) = (leaf(nh), leaf(nkv), leaf(nkv));
        let keep = real.to_kind(kind).unsqueeze(-1); // [B, T, 1]
        let dy = Tensor::randn([b, t, nh * d], (Kind::Float, device)).to_kind(kind) * &keep;
        let run = |f: &dyn Fn() -> Tensor| {
            for x in [&q, &k, &v] {
                let mut g = x.grad();
                if g.defined() {
                    let _ = g.zero_();
                }
            }
            let o = tch::with_grad(f);
            tch::with_grad(|| (&o * &dy).sum(Kind::Float).backward());
            (o.detach() * &keep, q.grad().copy(), k.grad().copy(), v.grad().copy())
        };
        let flash = || varlen::attend(&q, &k, &v, &cu, max_len, scale, window);
        let sdpa = || attend_kv(&q, &k, &v, Some(&dense), false, scale);
        let (o1, dq1, dk1, dv1) = run(&flash);
        let (o0, dq0, dk0, dv0) = run(&sdpa);
        let dims = format!("{} [{b}×{t}, {nh}/{nkv} heads × {d}]", name(kind));
        let tol = tol(kind);
        let errb = rel_err(&dq1, &dq0).max(rel_err(&dk1, &dk0)).max(rel_err(&dv1, &dv0));
        let secs = |f: &dyn Fn() -> Tensor| {
            (iters > 0 && t >= 1024).then(|| {
                time(device, iters, || {
                    let o = tch::with_grad(f);
                    tch::with_grad(|| (&o * &dy).sum(Kind::Float).backward());
                })
            })
        };
        rows.push(Row {
            name: format!("varlen_attn {label} {dims}"),
            err: rel_err(&o1, &o0),
            tol,
            bytes: 0.0,
            secs: None,
        });
        rows.push(Row {
            name: format!("varlen_attn bwd {label} {dims} (µs: fwd+bwd)"),
            err: errb,
            tol,
            bytes: 0.0,
            secs: secs(&flash),
        });
        if let Some(s) = secs(&sdpa) {
            rows.push(Row {
                name: format!("  reference (mask SDPA) fwd+bwd {label}"),
                err: 0.0,
                tol: 0.0,
                bytes: 0.0,
                secs: Some(s),
            });
        }
    }
    rows
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
