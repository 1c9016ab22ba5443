//! `tuner plan` / `--dry-run`: the memory estimate against the peak RSS that a
//! real run measures, on the quickstart model (SmolLM2-135M, NF4, LoRA r=16).

use crate::common::*;
use serde_json::Value;

#[test]
fn the_memory_plan_is_within_20_percent_of_measured_peak_rss() {
    let d = tmp();
    let recipe = repo().join("recipes/alpaca.toml");
    let rd = d.path().join("run");
    let sets = ["--set", "train.max_steps=1", "--set", "train.gradient_accumulation_steps=1"];
    let mut args = vec!["plan", recipe.to_str().unwrap(), "--json", "--run-dir", rd.to_str().unwrap()];
    args.extend_from_slice(&sets);
    let (code, out, err) = run(&args);
    assert_eq!(code, 0, "{err}");
    let plan: Value = serde_json::from_str(&out).unwrap();
    let estimate = plan["total_bytes"].as_f64().unwrap();
    let components: Vec<&str> = plan["items"].as_array().unwrap().iter().map(|i| i["component"].as_str().unwrap()).collect();
    for c in ["base decoder linears", "LoRA weights (fp32)", "optimizer state", "checkpointed layer inputs", "cross-entropy chunk"] {
        assert!(components.contains(&c), "{c} missing from {components:?}");
    }

    let mut args = vec!["run", recipe.to_str().unwrap(), "--until", "train", "--run-dir", rd.to_str().unwrap()];
    args.extend_from_slice(&sets);
    let (code, _, err) = run(&args);
    assert_eq!(code, 0, "{err}");
    let m: Value = serde_json::from_str(std::fs::read_to_string(rd.join("train/metrics.jsonl")).unwrap().lines().last().unwrap()).unwrap();
    let measured = m["peak_mem_bytes"].as_f64().unwrap();
    let off = (estimate - measured).abs() / measured;
    assert!(off < 0.2, "plan {:.3} GiB vs measured peak RSS {:.3} GiB ({:.0}% off)", estimate / 1073741824.0, measured / 1073741824.0, off * 100.0);

    // --dry-run prints the same plan and loads nothing.
    let (code, _, err) = run(&["run", recipe.to_str().unwrap(), "--dry-run", "--run-dir", d.path().join("dry").to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("expected peak") && err.contains("checkpointed layer inputs"), "{err}");
    assert!(!d.path().join("dry/fetch").exists());
}
