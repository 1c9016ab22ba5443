//! Reproducing committed recipes: an expectation file beside a recipe
//! (`recipes/alpaca.expected.json`) holds a finished run's key results — the
//! final adapter's sha256, eval loss and task metrics before/after, and the
//! versions and device they hold for. `tuner run RECIPE --write-expected`
//! records it; `tuner run RECIPE --verify` and `tuner verify RUN_DIR` compare a
//! run with it: on the same kind of CPU (the instruction sets libtorch's kernels dispatch on,
//! and the thread count; recorded as `cpu_kernels`) the adapter must be bit-identical and the
//! metrics equal; on another kind of CPU the losses must agree to 1e-5 relative (other kernels
//! round differently, ~1e-7) and the task metrics within the file's tolerance; on a GPU the
//! metrics must agree within the tolerances stored in the file. A file may be recorded for a
//! `--set` variant of the recipe (e.g. a CI-sized evaluation): it stores those overrides, and a
//! run with other overrides is refused rather than compared.

use crate::util;
use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

/// The expectation file of a recipe: `<dir>/<stem>.expected.json`.
pub fn expected_path(recipe: &Path) -> PathBuf {
    let stem = recipe.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    recipe.with_file_name(format!("{stem}.expected.json"))
}

/// The CPU features that decide which kernels libtorch (ATen, oneDNN, MKL) runs, and the
/// thread count (which decides how reductions are split): runs agree bit for bit only where
/// these are equal. E.g. `avx2 avx512_bf16 avx512_fp16 avx512bw avx512f … fma; 2 threads`.
pub fn cpu_kernels() -> String {
    const FLAGS: &[&str] = &[
        "avx",
        "avx2",
        "fma",
        "f16c",
        "avx_vnni",
        "avx512f",
        "avx512bw",
        "avx512cd",
        "avx512dq",
        "avx512vl",
        "avx512_vnni",
        "avx512_bf16",
        "avx512_fp16",
        "amx_tile",
        "amx_bf16",
        "amx_int8",
        "asimd",
        "sve",
    ];
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let have: std::collections::BTreeSet<&str> = info
        .lines()
        .filter(|l| l.starts_with("flags") || l.starts_with("Features"))
        .flat_map(|l| l.split_whitespace())
        .filter(|f| FLAGS.contains(f))
        .collect();
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    format!("{}; {threads} threads", have.into_iter().collect::<Vec<_>>().join(" "))
}

/// The key results of a finished run.
pub fn results(run_dir: &Path, device: &str) -> Result<Value> {
    let adapter = run_dir.join("train/adapter/adapter_model.safetensors");
    if !adapter.is_file() {
        bail!("{} has no trained adapter; run the recipe first", run_dir.display());
    }
    let metrics = std::fs::read_to_string(run_dir.join("train/metrics.jsonl")).unwrap_or_default();
    let last: Value = metrics.lines().last().and_then(|l| serde_json::from_str(l).ok()).unwrap_or(Value::Null);
    let report: Value = util::read_json(&run_dir.join("evaluate/report.json")).unwrap_or(Value::Null);
    Ok(json!({
        "tuner_version": env!("CARGO_PKG_VERSION"),
        "libtorch_version": crate::util::libtorch_version(),
        "device": device,
        "cpu_kernels": if device == "cpu" { json!(cpu_kernels()) } else { Value::Null },
        "adapter_sha256": util::sha256_file(&adapter)?,
        "train_steps": last["step"],
        "train_final_loss": last["loss"],
        "eval": { "before": report["before"], "after": report["after"] },
    }))
}

/// Write the expectation file `path` for a finished run made with the `--set` overrides `set`
/// (atomically), with default tolerances.
pub fn write_expected(path: &Path, set: &[String], run_dir: &Path, device: &str) -> Result<()> {
    let mut v = results(run_dir, device)?;
    v["set"] = json!(set);
    v["tolerance"] = json!({
        "cpu": "on the same cpu_kernels: adapter bit-identical, metrics equal; on another CPU: losses within 1e-5 relative, task metrics within absolute_metric",
        "relative_loss": 0.02,
        "absolute_metric": 0.05,
    });
    util::write_json_atomic(path, &v)
}

fn num(v: &Value) -> Option<f64> {
    v.as_f64()
}

/// Compare a finished run with the expectation file; returns the drifts (empty: it reproduces).
pub fn compare(expected: &Value, got: &Value) -> Vec<String> {
    let mut drift = vec![];
    let cpu = got["device"] == "cpu" && expected["device"] == "cpu";
    // Bit-exact only where the same kernels ran (see `cpu_kernels`).
    let exact = cpu && !expected["cpu_kernels"].is_null() && expected["cpu_kernels"] == got["cpu_kernels"];
    for k in ["tuner_version", "libtorch_version"] {
        if expected[k] != got[k] {
            drift.push(format!(
                "{k}: expected {}, found {} (re-record with --write-expected if this is deliberate)",
                expected[k], got[k]
            ));
        }
    }
    if exact && expected["adapter_sha256"] != got["adapter_sha256"] {
        drift.push(format!("adapter_sha256: expected {}, found {}", expected["adapter_sha256"], got["adapter_sha256"]));
    }
    let rel = num(&expected["tolerance"]["relative_loss"]).unwrap_or(0.02);
    let abs = num(&expected["tolerance"]["absolute_metric"]).unwrap_or(0.05);
    let mut check = |name: String, e: &Value, g: &Value, is_loss: bool| {
        let (Some(e), Some(g)) = (num(e), num(g)) else {
            if !e.is_null() && e != g {
                drift.push(format!("{name}: expected {e}, found {g}"));
            }
            return;
        };
        let ok = match (exact, cpu, is_loss) {
            (true, _, _) => (e - g).abs() <= 1e-9 * e.abs().max(1.0),
            (false, true, true) => (e - g).abs() <= 1e-5 * e.abs(),
            (false, _, true) => (e - g).abs() <= rel * e.abs(),
            (false, _, false) => (e - g).abs() <= abs,
        };
        if !ok {
            drift.push(format!("{name}: expected {e}, found {g}"));
        }
    };
    check("train_final_loss".into(), &expected["train_final_loss"], &got["train_final_loss"], true);
    for phase in ["before", "after"] {
        if let Some(m) = expected["eval"][phase].as_object() {
            for (k, v) in m {
                let is_loss = k == "eval_loss" || k == "perplexity";
                check(format!("eval.{phase}.{k}"), v, &got["eval"][phase][k], is_loss);
            }
        }
    }
    drift
}

/// Verify a run made with the `--set` overrides `set` against the expectation file `path`;
/// Err lists every drift.
pub fn verify(path: &Path, set: &[String], run_dir: &Path, device: &str) -> Result<()> {
    let expected: Value = util::read_json(path).with_context(|| {
        format!("cannot read the expectation file {}; record one with --write-expected", path.display())
    })?;
    let want: Vec<String> = expected["set"]
        .as_array()
        .map(|a| a.iter().filter_map(|s| s.as_str().map(String::from)).collect())
        .unwrap_or_default();
    if want != set {
        bail!(
            "{} was recorded with --set {:?} but this run used --set {:?}; run with the same overrides, or pass the matching --expected FILE",
            path.display(),
            want,
            set
        );
    }
    let got = results(run_dir, device)?;
    let drift = compare(&expected, &got);
    if drift.is_empty() {
        let how = match (&expected["cpu_kernels"], &got["cpu_kernels"]) {
            (Value::String(e), Value::String(g)) if e == g => "bit for bit".to_string(),
            (e, Value::String(g)) => format!(
                "within the cross-CPU tolerance: it was recorded on another kind of CPU ({}), this one is `{g}`, so the adapter's bits are not compared",
                e.as_str().unwrap_or("not recorded")
            ),
            _ => "within the file's tolerances".to_string(),
        };
        eprintln!("verify: {} reproduces {} {how}", run_dir.display(), path.display());
        return Ok(());
    }
    bail!("the run does not reproduce {}:\n  {}", path.display(), drift.join("\n  "))
}
