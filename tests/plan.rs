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

/// Gemma 3n: the per-layer embedding table is host memory on a GPU (listed apart from the GPU
/// total) and part of the total on the CPU; the AltUp streams widen the checkpointed inputs.
#[test]
fn the_gemma3n_plan_keeps_the_per_layer_table_on_the_host() {
    let d = tmp();
    let model = fixture_model("gemma3n", &d.path().join("model"));
    let r = tiny_recipe(d.path(), &model, &repo().join("datasets/chat/train.jsonl"), "micro_batch_size = 2\n");
    let plan = |device: &str| -> Value {
        let (code, out, err) = run(&["plan", r.to_str().unwrap(), "--json", "--set", &format!("train.device=\"{device}\"")]);
        assert_eq!(code, 0, "{err}");
        serde_json::from_str(&out).unwrap()
    };
    let item = |p: &Value, list: &str, name: &str| p[list].as_array().unwrap().iter().find(|i| i["component"] == name).map(|i| i["bytes"].as_u64().unwrap());
    let table = "per-layer embedding table";
    let cpu = plan("cpu");
    assert_eq!(item(&cpu, "items", table), Some(320 * 6 * 16 * 4), "fp32 on the CPU, in the total");
    assert!(cpu["host_items"].as_array().unwrap().is_empty());
    // 6 layers × 2×1024 tokens × 4 streams × 64 wide × 4 bytes, plus the carried K/V.
    assert!(item(&cpu, "items", "checkpointed layer inputs").unwrap() > 6 * 2 * 1024 * 4 * 64 * 4, "{cpu}");
    assert!(item(&cpu, "items", "Gemma 3n AltUp, LAuReL, per-layer projections").unwrap() > 0);
    let gpu = plan("cuda");
    assert_eq!(item(&gpu, "host_items", table), Some(320 * 6 * 16 * 2), "bf16 in host memory");
    assert_eq!(item(&gpu, "items", table), None, "not counted against the GPU");
}
