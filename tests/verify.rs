//! Expectation files: --write-expected records a run, --verify and `tuner verify`
//! accept the same results and report drift with exit code 1.

use crate::common::*;
use serde_json::Value;

#[test]
fn expected_results_are_recorded_verified_and_drift_is_reported() {
    let d = tmp();
    let r = train_recipe(d.path(), "");
    let rs = r.to_str().unwrap();
    let (code, _, err) = run(&["run", rs, "--until", "train", "--write-expected"]);
    assert_eq!(code, 0, "{err}");
    let exp_path = d.path().join("recipe.expected.json");
    let exp: Value = serde_json::from_str(&std::fs::read_to_string(&exp_path).unwrap()).unwrap();
    assert_eq!(exp["device"], "cpu");
    assert_eq!(exp["adapter_sha256"].as_str().unwrap().len(), 64);
    assert_eq!(exp["train_steps"], 6);

    // The same run verifies, through `run --verify` and `tuner verify RUN_DIR`.
    let (code, _, err) = run(&["run", rs, "--until", "train", "--verify"]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("reproduces"), "{err}");
    let rd = d.path().join("runs/t");
    let (code, _, err) = run(&["verify", rd.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");

    // An expectation recorded without overrides is not compared with a `--set` variant.
    let (code, _, err) = run(&["run", rs, "--until", "train", "--verify", "--set", "train.learning_rate=1e-3"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("was recorded with --set []") && err.contains("--expected FILE"), "{err}");

    // A CI-sized variant gets its own file (--expected) that records its overrides; `tuner
    // verify` reads them back from the run dir.
    let var = d.path().join("variant.expected.json");
    let vs = var.to_str().unwrap();
    let (code, _, err) = run(&[
        "run",
        rs,
        "--until",
        "train",
        "--write-expected",
        "--expected",
        vs,
        "--set",
        "train.learning_rate=1e-3",
    ]);
    assert_eq!(code, 0, "{err}");
    let v: Value = serde_json::from_str(&std::fs::read_to_string(&var).unwrap()).unwrap();
    assert_eq!(v["set"], serde_json::json!(["train.learning_rate=1e-3"]));
    assert_ne!(v["adapter_sha256"], exp["adapter_sha256"], "the variant trains differently");
    let (code, _, err) = run(&["verify", rd.to_str().unwrap(), "--expected", vs]);
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = run(&["verify", rd.to_str().unwrap()]);
    assert_eq!(code, 1, "the run dir now holds the variant: {err}");

    // A silently changed training result fails until it is deliberately re-recorded.
    let mut tampered = exp.clone();
    tampered["adapter_sha256"] = Value::from("0".repeat(64));
    tampered["train_final_loss"] = Value::from(exp["train_final_loss"].as_f64().unwrap() * 1.5);
    std::fs::write(&exp_path, tampered.to_string()).unwrap();
    let (code, _, err) = run(&["run", rs, "--until", "train", "--verify"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("does not reproduce") && err.contains("adapter_sha256: expected"), "{err}");
    assert!(err.contains("train_final_loss: expected"), "{err}");
    std::fs::write(&exp_path, exp.to_string()).unwrap();

    // A different training run from a fresh, identical recipe reproduces bit for bit.
    let d2 = tmp();
    let r2 = train_recipe(d2.path(), "");
    std::fs::copy(&exp_path, d2.path().join("recipe.expected.json")).unwrap();
    let (code, _, err) = run(&["run", r2.to_str().unwrap(), "--until", "train", "--verify"]);
    assert_eq!(code, 0, "{err}");
}

/// A file recorded on another kind of CPU (other `cpu_kernels`, or none recorded) is compared
/// with the cross-CPU tolerance: the adapter's bits are not, losses within 1e-5 relative.
#[test]
fn another_kind_of_cpu_is_held_to_the_cross_cpu_tolerance() {
    use tuner::verify::{compare, cpu_kernels};
    let here = cpu_kernels();
    assert!(here.ends_with("threads"), "{here}");
    let run = |sha: &str, loss: f64| serde_json::json!({"device": "cpu", "cpu_kernels": here, "adapter_sha256": sha, "train_final_loss": loss, "eval": {"before": {"eval_loss": loss}, "after": {"json_fields": 0.5}}});
    let mut recorded = run("a", 0.4542462405);
    assert!(compare(&recorded, &run("a", 0.4542462405)).is_empty());
    // The same kind of CPU: bit for bit.
    let drift = compare(&recorded, &run("b", 0.4542473811));
    assert!(
        drift.iter().any(|d| d.starts_with("adapter_sha256"))
            && drift.iter().any(|d| d.starts_with("train_final_loss")),
        "{drift:?}"
    );
    // Another kind (or an older file without the field): 2.5e-6 relative passes, 1e-4 does not.
    for other in [Value::from("avx2 fma; 2 threads"), Value::Null] {
        recorded["cpu_kernels"] = other;
        assert!(compare(&recorded, &run("b", 0.4542473811)).is_empty());
        let drift = compare(&recorded, &run("b", 0.4542462405 * 1.0001));
        assert_eq!(drift.len(), 2, "{drift:?}");
    }
}
