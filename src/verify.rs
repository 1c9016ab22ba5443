//! Reproducing committed recipes: an expectation file beside a recipe
//! (`recipes/alpaca.expected.json`) holds a finished run's key results — the
//! final adapter's sha256, eval loss and task metrics before/after, and the
//! versions and device they hold for. `tuner run RECIPE --write-expected`
//! records it; `tuner run RECIPE --verify` and `tuner verify RUN_DIR` compare a
//! run with it: on the CPU the adapter must be bit-identical, elsewhere the
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
        "libtorch_version": crate::pipeline::libtorch_version(),
        "device": device,
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
        "cpu": "adapter bit-identical; metrics equal",
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
    let exact = got["device"] == "cpu" && expected["device"] == "cpu";
    for k in ["tuner_version", "libtorch_version"] {
        if expected[k] != got[k] {
            drift.push(format!("{k}: expected {}, found {} (re-record with --write-expected if this is deliberate)", expected[k], got[k]));
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
        let ok = if exact { (e - g).abs() <= 1e-9 * e.abs().max(1.0) } else if is_loss { (e - g).abs() <= rel * e.abs() } else { (e - g).abs() <= abs };
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
    let expected: Value = util::read_json(path)
        .with_context(|| format!("cannot read the expectation file {}; record one with --write-expected", path.display()))?;
    let want: Vec<String> = expected["set"].as_array().map(|a| a.iter().filter_map(|s| s.as_str().map(String::from)).collect()).unwrap_or_default();
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
        eprintln!("verify: {} reproduces {}", run_dir.display(), path.display());
        return Ok(());
    }
    bail!("the run does not reproduce {}:\n  {}", path.display(), drift.join("\n  "))
}
