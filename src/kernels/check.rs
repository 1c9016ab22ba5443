//! Checks every CUDA kernel against its CPU reference on the same device and inputs, and times
//! it against the card's copy bandwidth (its roofline: each kernel is memory-bound). Run by the
//! kernel tests on a GPU and by `tuner kernels`. Each op's cases live beside the op, in its
//! file's `check`; this file holds the runner, the error and timing helpers and the table.

use tch::{Device, Kind, Tensor};

use super::checker::{name, rel_err, time, tol, Checker, Row};
use super::{
    adamw_8bit, altup_correct, altup_first, altup_predict, cross_entropy, dequant_4bit, glu, rms_norm, rope, topk_glu,
    varlen, Kernels,
};

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
    let mut c = Checker { device, iters: if bench { 20 } else { 0 }, rows: Vec::new() };
    dequant_4bit::check(k, &mut c);
    rms_norm::check(k, &mut c);
    rope::check(k, &mut c);
    glu::check(k, &mut c);
    topk_glu::check(k, &mut c);
    altup_predict::check(k, &mut c);
    altup_correct::check(k, &mut c);
    altup_first::check(k, &mut c);
    cross_entropy::check(k, &mut c);
    adamw_8bit::check(k, &mut c);
    varlen_check(&mut c);
    c.rows
}

// Varlen attention's reference is the model's own masked SDPA (model/blocks.rs), so its check
// sits here, in the runner, rather than in kernels/varlen.rs: the model calls that kernel, and a
// kernel file that imported the model would close an import circle.
/// Varlen flash attention (libtorch's, through kernels/flash_varlen.cpp) against its reference,
/// SDPA under the boolean mask the model would otherwise build: packed documents, a padded row,
/// GQA, a sliding window; the output at real tokens and the q/k/v gradients for an upstream
/// gradient that is zero at padding (as the loss's is). Timed forward + backward, both paths.
pub fn varlen_check(c: &mut Checker) {
    let (device, iters) = (c.device, c.iters);
    use crate::model::blocks::{attend_kv, attention_mask};
    use crate::model::Batch;
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
        c.rows.push(Row {
            name: format!("varlen_attn {label} {dims}"),
            err: rel_err(&o1, &o0),
            tol,
            bytes: 0.0,
            secs: None,
        });
        c.rows.push(Row {
            name: format!("varlen_attn bwd {label} {dims} (µs: fwd+bwd)"),
            err: errb,
            tol,
            bytes: 0.0,
            secs: secs(&flash),
        });
        if let Some(s) = secs(&sdpa) {
            c.rows.push(Row {
                name: format!("  reference (mask SDPA) fwd+bwd {label}"),
                err: 0.0,
                tol: 0.0,
                bytes: 0.0,
                secs: Some(s),
            });
        }
    }
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
