//! `tuner plan` / `--dry-run`: the memory estimate against the peak RSS that a
//! real run measures, on the quickstart model (SmolLM2-135M, NF4, LoRA r=16).

use crate::common::*;
use serde_json::Value;

#[test]
fn the_memory_plan_is_within_20_percent_of_measured_peak_rss() {
    let d = tmp();
    let recipe = repo().join("recipes/alpaca.toml");
    let rd = d.path().join("run");
    // The quickstart trains without checkpointing on the CPU; the plan's checkpointed accounting
    // is what this holds to a measurement.
    let sets = [
        "--set",
        "train.max_steps=1",
        "--set",
        "train.gradient_accumulation_steps=1",
        "--set",
        "train.gradient_checkpointing=true",
    ];
    let mut args = vec!["plan", recipe.to_str().unwrap(), "--json", "--run-dir", rd.to_str().unwrap()];
    args.extend_from_slice(&sets);
    let (code, out, err) = run(&args);
    assert_eq!(code, 0, "{err}");
    let plan: Value = serde_json::from_str(&out).unwrap();
    let estimate = plan["total_bytes"].as_f64().unwrap();
    let components: Vec<&str> =
        plan["items"].as_array().unwrap().iter().map(|i| i["component"].as_str().unwrap()).collect();
    for c in [
        "base decoder linears",
        "LoRA weights (fp32)",
        "optimizer state",
        "checkpointed layer inputs",
        "cross-entropy chunk",
    ] {
        assert!(components.contains(&c), "{c} missing from {components:?}");
    }

    let mut args = vec!["run", recipe.to_str().unwrap(), "--until", "train", "--run-dir", rd.to_str().unwrap()];
    args.extend_from_slice(&sets);
    let (code, _, err) = run(&args);
    assert_eq!(code, 0, "{err}");
    let m: Value =
        serde_json::from_str(std::fs::read_to_string(rd.join("train/metrics.jsonl")).unwrap().lines().last().unwrap())
            .unwrap();
    let measured = m["peak_mem_bytes"].as_f64().unwrap();
    let off = (estimate - measured).abs() / measured;
    assert!(
        off < 0.2,
        "plan {:.3} GiB vs measured peak RSS {:.3} GiB ({:.0}% off)",
        estimate / 1073741824.0,
        measured / 1073741824.0,
        off * 100.0
    );

    // --dry-run prints the same plan and loads nothing.
    let (code, _, err) =
        run(&["run", recipe.to_str().unwrap(), "--dry-run", "--run-dir", d.path().join("dry").to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("expected peak")
            && err.contains("all layer activations")
            && err.contains("micro-batches run one by one"),
        "{err}"
    );
    assert!(!d.path().join("dry/fetch").exists());
}

/// Gemma 3n: the per-layer embedding table is host memory on a GPU (listed apart from the GPU
/// total) and part of the total on the CPU; the AltUp streams widen the checkpointed inputs.
#[test]
fn the_gemma3n_plan_keeps_the_per_layer_table_on_the_host() {
    let d = tmp();
    let model = fixture_model("gemma3n", &d.path().join("model"));
    let r = tiny_recipe(d.path(), &model, &repo().join("datasets/chat/train.jsonl"), "micro_batch_size = 2\n");
    let plan_with = |device: &str, offload: &str| -> Value {
        let (code, out, err) = run(&[
            "plan",
            r.to_str().unwrap(),
            "--json",
            "--set",
            &format!("train.device=\"{device}\""),
            "--set",
            &format!("train.offload_activations=\"{offload}\""),
        ]);
        assert_eq!(code, 0, "{err}");
        serde_json::from_str(&out).unwrap()
    };
    let plan = |device: &str| plan_with(device, "auto");
    let item = |p: &Value, list: &str, name: &str| {
        p[list].as_array().unwrap().iter().find(|i| i["component"] == name).map(|i| i["bytes"].as_u64().unwrap())
    };
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
    // 6 layers × 2×1024 tokens × 4 streams × 64 wide × 2 bytes, plus the K/V carried for the
    // 3 shared layers: (3 + 2) × 2048 × 4 × 32 × 2.
    let inputs = 6 * 2048 * 256 * 2 + 5 * 2048 * 4 * 32 * 2;
    // "auto" (the default) offloads them wherever the host has room: a few MiB here.
    assert_eq!(gpu["offload_activations"], true, "{gpu}");
    assert_eq!(item(&gpu, "host_items", "checkpointed layer inputs (offloaded)"), Some(inputs));
    assert_eq!(cpu["offload_activations"], false, "never on the CPU");
    assert!(
        tuner::plan::auto_offload(1 << 30, Some(2 << 30)) && !tuner::plan::auto_offload(1 << 30, Some((2 << 30) - 1))
    );
    assert!(!tuner::plan::auto_offload(1, None), "unknown host memory: not offloaded");
    // Off: all of them on the GPU.
    let kept = plan_with("cuda", "off");
    assert_eq!(item(&kept, "items", "checkpointed layer inputs"), Some(inputs));
    assert_eq!(kept["offload_activations"], false);
    // Offloaded: all of them in host memory, the two in use (with the widest carry) on the GPU.
    let off = plan_with("cuda", "on");
    assert_eq!(item(&off, "host_items", "checkpointed layer inputs (offloaded)"), Some(inputs));
    assert_eq!(item(&off, "items", "checkpointed layer inputs"), Some(2 * 2048 * (256 + 4 * 32) * 2));
}

/// The GPU estimate from a shape's config.json alone, against the CUDA allocator peaks measured
/// on the H200 with the race's settings (docs/benchmarks.md; NF4 + double
/// quant, LoRA r16 on the seven projections, 8-bit AdamW, bf16, gradient checkpointing): within
/// 12% either way, including a 131k-token row with the layer inputs offloaded.
#[test]
fn the_gpu_plan_is_within_12_percent_of_the_allocator_peaks_measured_on_an_h200() {
    let d = tmp();
    // (shape, sequence, micro-batch, offload_activations, measured allocator peak in GiB)
    let cases = [
        ("llama-1b", 2048, 2, "off", 2.45),
        ("llama-8b", 2048, 2, "off", 7.52),
        ("llama-8b", 2048, 2, "on", 6.61),
        ("llama-8b", 32768, 1, "off", 21.67),
        ("llama-8b", 131072, 1, "on", 35.87),
        ("gemma3n-e4b", 2048, 2, "off", 7.43),
    ];
    for (i, (shape, seq, batch, offload, measured)) in cases.into_iter().enumerate() {
        let model = repo().join("tests/fixtures/plan").join(shape);
        let recipe = d.path().join(format!("r{i}.toml"));
        std::fs::write(
            &recipe,
            format!(
                r#"[run]
name = "plan-{shape}"
[model]
source = "{}"
dtype = "bf16"
[quantization]
method = "nf4"
double_quant = true
block_size = 64
[lora]
r = 16
alpha = 32
dropout = 0.0
target_modules = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
[dataset]
source = "{}"
[train]
device = "cuda"
max_seq_length = {seq}
micro_batch_size = {batch}
packing = true
optimizer = "adamw_8bit"
gradient_checkpointing = true
offload_activations = "{offload}"
max_steps = 2
"#,
                model.display(),
                repo().join("datasets/chat/train.jsonl").display()
            ),
        )
        .unwrap();
        let (code, out, err) = run(&[
            "plan",
            recipe.to_str().unwrap(),
            "--json",
            "--run-dir",
            d.path().join(format!("run{i}")).to_str().unwrap(),
        ]);
        assert_eq!(code, 0, "{shape}: {err}");
        let plan: Value = serde_json::from_str(&out).unwrap();
        // The allocator's peak leaves out the CUDA context, which the plan lists on its own line.
        let context: u64 = plan["items"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|i| i["component"].as_str().unwrap().starts_with("CUDA context"))
            .map(|i| i["bytes"].as_u64().unwrap())
            .sum();
        assert!(context > 0, "{shape}: no CUDA context line in {plan}");
        let estimate = (plan["total_bytes"].as_u64().unwrap() - context) as f64 / (1u64 << 30) as f64;
        let off = (estimate - measured) / measured;
        assert!(off.abs() < 0.12, "{shape} seq {seq} × {batch}, offload {offload}: plan {estimate:.2} GiB vs measured {measured:.2} GiB ({:+.0}%)", off * 100.0);
        if offload == "on" {
            let host = plan["host_items"].as_array().unwrap();
            assert!(
                host.iter().any(|i| i["component"] == "checkpointed layer inputs (offloaded)"
                    && i["bytes"].as_u64().unwrap() == 32 * seq * batch * 4096 * 2),
                "{plan}"
            );
        }
    }
}
