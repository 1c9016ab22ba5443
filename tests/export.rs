//! The export stage: merged weights equal base + adapter (tuner and transformers agree),
//! the PEFT adapter and NF4 folder load in transformers/peft/bitsandbytes, GGUF files read
//! back through tuner's importer (and gguf-py) with the same logits and tokenizer, the
//! merge gate, provenance, the Ollama Modelfile, and the stage run from the CLI.
//!
//! Two runs are trained once per test process (CLI, `--until train`) and copied per test:
//! `Qlora` trains the `llama` fixture (llama3 rope, untied) on an NF4 base (the recipe
//! default); `Tied` trains `llama-tied` (tied embeddings, explicit head_dim, plain rope)
//! on a dense base. The export functions are called directly on the copies; one test
//! runs the stage through `tuner run --from export`.

use crate::common::*;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, OnceLock};
use tch::{Device, Kind, Tensor};
use tuner::export::GateExamples;
use tuner::export::{self, check, gguf as xgguf, merged};
use tuner::gguf::names::Names;
use tuner::gguf::{GgmlType, GgufArch, GgufFile};
use tuner::model::{self, Batch, CausalLm, LoadOptions};
use tuner::pipeline::{RunContext, Stage};
use tuner::stages::export::Export;

const FP: &str = "test-export-fingerprint";

#[derive(Clone, Copy, PartialEq)]
enum Base {
    Qlora,
    Tied,
}

fn copy_tree(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap().flatten() {
        let (from, to) = (e.path(), dst.join(e.file_name()));
        if from.is_dir() {
            copy_tree(&from, &to);
        } else if e.file_name() != ".lock" {
            std::fs::copy(&from, &to).unwrap();
        }
    }
}

/// A trained run (recipe.toml, model/, runs/t/ up to train), made once per process.
fn trained(base: Base) -> &'static Path {
    static QLORA: OnceLock<PathBuf> = OnceLock::new();
    static TIED: OnceLock<PathBuf> = OnceLock::new();
    let (cell, name) = match base {
        Base::Qlora => (&QLORA, "qlora"),
        Base::Tied => (&TIED, "tied"),
    };
    cell.get_or_init(|| {
        let tmp = Path::new(env!("CARGO_TARGET_TMPDIR"));
        std::fs::create_dir_all(tmp).unwrap();
        // Folders of test processes that are gone.
        for e in std::fs::read_dir(tmp).unwrap().flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            if let Some(pid) = n.strip_prefix("export-").and_then(|r| r.split('-').next()) {
                if !Path::new("/proc").join(pid).exists() {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
        let root = tmp.join(format!("export-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let recipe = train_recipe(&root, "");
        if base == Base::Tied {
            fixture_model("llama-tied", &root.join("model"));
            let mut text = std::fs::read_to_string(&recipe).unwrap();
            text.push_str("\n[quantization]\nmethod = \"none\"\n");
            std::fs::write(&recipe, text).unwrap();
        }
        let (code, _, err) = run(&["run", recipe.to_str().unwrap(), "--until", "train"]);
        assert_eq!(code, 0, "{err}");
        root
    })
}

/// A private copy of a trained run.
fn fresh(base: Base) -> tempfile::TempDir {
    let d = tmp();
    copy_tree(trained(base), d.path());
    d
}

fn context(root: &Path, sets: &[&str]) -> RunContext {
    let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
    RunContext {
        recipe: tuner::recipe::load(&root.join("recipe.toml"), &sets).expect("recipe loads"),
        run_dir: root.join("runs/t"),
        threads: 1,
        interrupted: Arc::new(AtomicBool::new(false)),
        hub: tuner::hub::HubConfig::new(root.join(".hub")),
        dist: None,
    }
}

/// Run the export functions on a run, as the stage does.
fn export_run(root: &Path, sets: &[&str]) -> (RunContext, anyhow::Result<Vec<PathBuf>>) {
    let ctx = context(root, sets);
    let dir = ctx.stage_dir("export");
    std::fs::create_dir_all(&dir).unwrap();
    let r = Export.run(&ctx, &dir, FP);
    (ctx, r)
}

fn load(dir: &Path) -> Box<dyn CausalLm> {
    model::load(dir, &LoadOptions { dtype: Kind::Float, device: Device::Cpu, quantize: None, cuda_kernels: true })
        .unwrap()
}

/// Two rows of 12 fixture tokens (the second ends in pad tokens, scored as tokens).
fn ids() -> Tensor {
    let t = Tensor::read_safetensors(repo().join("tests/fixtures/models/llama/reference.safetensors")).unwrap();
    t.into_iter().find(|(n, _)| n == "input_ids").unwrap().1
}

fn logits(m: &dyn CausalLm, ids: &Tensor) -> Tensor {
    tch::no_grad(|| m.forward(&Batch::new(ids.shallow_clone(), None)).to_kind(Kind::Float))
}

/// max|a − b| / max|b|.
fn rel(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[]) / b.abs().max().double_value(&[])
}

fn json(p: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))).unwrap()
}

fn tensor<'a>(ts: &'a [(String, Tensor)], name: &str) -> &'a Tensor {
    &ts.iter().find(|(n, _)| n == name).unwrap_or_else(|| panic!("no `{name}` from check_export.py")).1
}

fn ids_json(ids: &Tensor) -> String {
    let rows: Vec<Vec<i64>> = (0..ids.size()[0]).map(|i| Vec::<i64>::try_from(&ids.get(i)).unwrap()).collect();
    serde_json::to_string(&rows).unwrap()
}

#[test]
fn qlora_export_merges_exactly_and_loads_in_transformers_peft_and_bitsandbytes() {
    let d = fresh(Base::Qlora);
    let root = d.path();
    std::fs::create_dir_all(root.join("runs/t/evaluate")).unwrap();
    std::fs::write(
        root.join("runs/t/evaluate/report.json"),
        r#"{"before": {"eval_loss": 2.5}, "after": {"eval_loss": 1.25}}"#,
    )
    .unwrap();
    let (ctx, files) = export_run(root, &["export.merged_dtype=\"fp32\"", "export.nf4=true"]);
    let files = files.unwrap();
    let ex = ctx.stage_dir("export");

    // Artifacts: every file of every folder, relative, plus the merge check.
    for f in [
        "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors",
        "adapter/README.md",
        "adapter/tuner-export.json",
        "merged/config.json",
        "merged/model.safetensors",
        "merged/tokenizer.json",
        "merged/tokenizer_config.json",
        "merged/generation_config.json",
        "merged/README.md",
        "merged/tuner-export.json",
        "nf4/config.json",
        "nf4/model.safetensors",
        "nf4/tuner-export.json",
        "merge_check.json",
    ] {
        assert!(files.contains(&PathBuf::from(f)), "{f} not among the artifacts {files:?}");
        assert!(ex.join(f).is_file(), "{f} missing");
    }
    assert!(files.iter().all(|f| f.is_relative() && ex.join(f).is_file()));
    assert!(!ex.join("merged.tmp").exists() && !ex.join(".merged-work").exists());

    // The merged model (fp32) equals the model as trained: dequantized NF4 base + adapter.
    let ids = ids();
    let trained_model = export::load_trained(
        &ctx.recipe.recipe,
        &root.join("model"),
        &ctx.stage_dir("train").join("adapter"),
        Device::Cpu,
    )
    .unwrap();
    let want = logits(trained_model.as_ref(), &ids);
    let merged_model = load(&ex.join("merged"));
    let got = logits(merged_model.as_ref(), &ids);
    let merge_err = rel(&got, &want);
    let nf4_base = tuner::model::open::load_for_recipe(&root.join("model"), &ctx.recipe.recipe, Device::Cpu).unwrap();
    let adapter_effect = rel(&logits(nf4_base.as_ref(), &ids), &want);
    eprintln!("qlora fp32 merge: rel logit error {merge_err:.2e}, adapter effect {adapter_effect:.2e}");
    assert!(merge_err <= 1e-5, "merged vs base+adapter: {merge_err:e}");
    assert!(
        adapter_effect > 1e-3 && adapter_effect > 1000.0 * merge_err,
        "the adapter changes logits by only {adapter_effect:e}"
    );

    let cfg = json(&ex.join("merged/config.json"));
    assert!(cfg.get("quantization_config").is_none());
    assert_eq!(cfg["torch_dtype"], "float32");
    assert_eq!(cfg["dtype"], "float32");
    assert_eq!(cfg["rope_scaling"], json(&root.join("model/config.json"))["rope_scaling"]);

    // The gate passed, and says so with numbers.
    let mc = json(&ex.join("merge_check.json"));
    eprintln!("merge_check.json: {mc}");
    assert_eq!(mc["passed"], true);
    assert_eq!(mc["source"], "eval");
    assert!(mc["examples"].as_u64().unwrap() > 0 && mc["tokens"].as_i64().unwrap() > 0);
    assert!(mc["loss_delta"].as_f64().unwrap().abs() < 1e-5, "{mc}");
    assert!(mc["max_abs_logit_diff"].as_f64().unwrap() < 1e-3, "{mc}");
    assert_eq!(mc["fingerprint"], FP);

    // Provenance and model cards.
    let train_manifest = json(&root.join("runs/t/train/manifest.json"));
    for folder in ["adapter", "merged", "nf4"] {
        let p = json(&ex.join(folder).join("tuner-export.json"));
        for k in [
            "recipe_fingerprint",
            "format",
            "tuner_version",
            "libtorch_version",
            "base_model",
            "inputs",
            "settings",
            "files",
        ] {
            assert!(p.get(k).is_some(), "{folder}/tuner-export.json lacks {k}");
        }
        assert_eq!(p["recipe_fingerprint"], FP);
        assert_eq!(p["inputs"]["train"]["fingerprint"], train_manifest["fingerprint"]);
        assert!(p["inputs"]["fetch"]["fingerprint"].is_string());
        assert!(p["base_model"]["files"]["model.safetensors"].is_string());
        let listed = p["files"].as_object().unwrap();
        assert!(listed.contains_key("README.md"));
        for (name, sha) in listed {
            assert_eq!(
                sha.as_str().unwrap(),
                tuner::util::sha256_file(&ex.join(folder).join(name)).unwrap(),
                "{folder}/{name}"
            );
        }
        let readme = std::fs::read_to_string(ex.join(folder).join("README.md")).unwrap();
        assert!(
            readme.contains("## Settings") && readme.contains("| LoRA r / alpha / dropout | 4 / 8 / 0 |"),
            "{readme}"
        );
        assert!(readme.contains("| eval_loss | 2.5000 | 1.2500 |"), "{readme}");
    }
    let p = json(&ex.join("adapter/tuner-export.json"));
    assert_eq!(p["format"], "peft-lora-adapter");
    assert_eq!(
        p["inputs"]["train"]["artifacts"]["adapter/adapter_model.safetensors"].as_str().unwrap(),
        tuner::util::sha256_file(&ex.join("adapter/adapter_model.safetensors")).unwrap(),
        "the exported adapter is the trained one"
    );
    assert!(std::fs::read_to_string(ex.join("adapter/README.md")).unwrap().contains("PeftModel.from_pretrained"));
    assert!(std::fs::read_to_string(ex.join("merged/README.md")).unwrap().contains("## Merge check"));

    // NF4: bnb layout per decoder linear, dense bf16 elsewhere, transformers' quantization_config.
    let ncfg = json(&ex.join("nf4/config.json"));
    assert_eq!(ncfg["quantization_config"]["bnb_4bit_quant_type"], "nf4");
    assert_eq!(ncfg["quantization_config"]["bnb_4bit_use_double_quant"], true);
    let nf4_model = load(&ex.join("nf4"));
    assert_eq!(nf4_model.linears().len(), 14);
    assert!(nf4_model.linears().iter().all(|(_, l)| l.is_quantized()));
    let nf4_err = rel(&logits(nf4_model.as_ref(), &ids), &want);
    eprintln!("nf4 re-quantized: rel logit error vs base+adapter {nf4_err:.2e}");
    assert!(nf4_err < 0.1, "{nf4_err}");

    // transformers + peft + bitsandbytes.
    let args: Vec<String> = vec![
        "--base".into(),
        root.join("model").display().to_string(),
        "--adapter".into(),
        ex.join("adapter").display().to_string(),
        "--merged".into(),
        ex.join("merged").display().to_string(),
        "--nf4".into(),
        ex.join("nf4").display().to_string(),
        "--ids".into(),
        ids_json(&ids),
    ];
    let (report, ts) = check_script(&args);
    eprintln!("check_export.py: {}", serde_json::to_string(&report["nf4"]["forward_error"]).unwrap());
    assert_eq!(report["peft"]["lora_modules"], 14, "{report}");
    // PEFT on the dense base = tuner's dense base + the same adapter.
    let mut dense = load(&root.join("model"));
    tuner::model::open::apply_adapter(dense.as_mut(), &ex.join("adapter")).unwrap();
    let peft_err = rel(tensor(&ts, "peft_logits"), &logits(dense.as_ref(), &ids));
    let hf_merged_err = rel(tensor(&ts, "merged_logits"), &got);
    eprintln!("HF: peft vs tuner {peft_err:.2e}; merged folder vs tuner {hf_merged_err:.2e}");
    assert!(peft_err <= 1e-4, "{peft_err}");
    assert!(hf_merged_err <= 1e-4, "{hf_merged_err}");
    for part in ["merged", "nf4"] {
        for k in ["missing_keys", "unexpected_keys", "mismatched_keys"] {
            let v = &report[part][k];
            assert!(v.is_null() || v.as_array().is_some_and(|a| a.is_empty()), "{part} {k}: {v}");
        }
    }
    let q = report["nf4"]["quantized"].as_object().unwrap();
    assert_eq!(q.len(), 14, "{q:?}");
    for (path, lin) in nf4_model.linears() {
        let info = &q[&path];
        assert_eq!(
            (info["quant_type"].as_str(), info["blocksize"].as_i64(), info["nested"].as_bool()),
            (Some("nf4"), Some(64), Some(true))
        );
        assert_eq!(info["dtype"], "bfloat16");
        // Values come out in bf16 (the declared dtype): tuner's f32 values rounded the same way.
        let ours = lin.dense_weight(Kind::Float).to_kind(Kind::BFloat16).to_kind(Kind::Float);
        let by_format = (tensor(&ts, &format!("nf4_manual.{path}")) - &ours).abs().max().double_value(&[]);
        assert_eq!(
            by_format, 0.0,
            "{path}: the weight bnb loaded dequantizes (by the format) to other values than tuner's"
        );
        let by_bnb = (tensor(&ts, &format!("nf4_dequant.{path}")) - &ours).abs().max().double_value(&[]);
        if lin.in_features() % 64 == 0 {
            assert_eq!(by_bnb, 0.0, "{path}: bitsandbytes' dequantize_4bit differs from tuner's by {by_bnb}");
        } else {
            // bitsandbytes 0.50.2's CPU dequantize_4bit mishandles blocks that span rows (its own
            // quantize → dequantize round trip fails the same way); recorded, not asserted.
            eprintln!(
                "{path} [{}x{}]: bnb CPU dequantize_4bit off by {by_bnb} (known CPU defect)",
                lin.out_features(),
                lin.in_features()
            );
        }
    }
    assert_eq!(report["nf4"]["dense_dtypes"], serde_json::json!(["bfloat16"]));
    if report["nf4"]["forward_error"].is_null() {
        let e = rel(tensor(&ts, "nf4_logits"), &logits(nf4_model.as_ref(), &ids));
        eprintln!("HF nf4 forward (bf16 compute) vs tuner: {e:.2e}");
        assert!(e < 5e-2, "{e}");
    }
}

#[test]
fn bf16_merge_is_within_bf16_rounding_and_shards_load() {
    let d = fresh(Base::Qlora);
    let root = d.path();
    let (ctx, files) = export_run(root, &["export.adapter=false"]);
    let files = files.unwrap();
    let ex = ctx.stage_dir("export");
    assert!(!ex.join("adapter").exists() && !files.iter().any(|f| f.starts_with("adapter")));
    assert_eq!(json(&ex.join("merged/config.json"))["torch_dtype"], "bfloat16");
    let w = tuner::model::Weights::open(&ex.join("merged")).unwrap();
    assert_eq!(w.get("model.layers.0.self_attn.q_proj.weight").unwrap().kind(), Kind::BFloat16);
    let ids = ids();
    let trained_model = export::load_trained(
        &ctx.recipe.recipe,
        &root.join("model"),
        &ctx.stage_dir("train").join("adapter"),
        Device::Cpu,
    )
    .unwrap();
    let want = logits(trained_model.as_ref(), &ids);

    // The bf16 folder is exactly the f32 merge rounded to bf16 (every tensor, bit for bit) ...
    let f32_dir = tmp();
    merged::write_merged(
        trained_model.as_ref(),
        &root.join("model"),
        f32_dir.path(),
        Kind::Float,
        merged::MAX_SHARD_BYTES,
    )
    .unwrap();
    let w32 = tuner::model::Weights::open(f32_dir.path()).unwrap();
    assert_eq!(w.names(), w32.names());
    for n in w.names() {
        let (a, b) = (w.get(&n).unwrap(), w32.get(&n).unwrap().to_kind(Kind::BFloat16));
        assert!(a.equal(&b), "{n} is not the rounded f32 merge");
    }
    // ... so its logit error is bf16 rounding of the weights. On this fixture (random std-0.2
    // weights) rounding the untouched base to bf16 moves the logits by about as much.
    let e = rel(&logits(load(&ex.join("merged")).as_ref(), &ids), &want);
    let rounded_base = tmp();
    let wb = tuner::model::Weights::open(&root.join("model")).unwrap();
    let ts: Vec<(String, Tensor)> = wb
        .names()
        .into_iter()
        .map(|n| {
            let t = wb.get(&n).unwrap().to_kind(Kind::BFloat16);
            (n, t)
        })
        .collect();
    merged::write_safetensors(&rounded_base.path().join("model.safetensors"), &ts).unwrap();
    std::fs::copy(root.join("model/config.json"), rounded_base.path().join("config.json")).unwrap();
    let base_logits = logits(load(&root.join("model")).as_ref(), &ids);
    let e_base = rel(&logits(load(rounded_base.path()).as_ref(), &ids), &base_logits);
    let mc = json(&ex.join("merge_check.json"));
    eprintln!("bf16 merge: rel logit error {e:.2e} (rounding the base alone to bf16: {e_base:.2e}); gate {mc}");
    assert!(e <= 2.0 * e_base.max(1e-3) && e <= 2e-2, "{e} vs {e_base}");
    assert!(mc["passed"] == true && mc["loss_delta"].as_f64().unwrap().abs() < 5e-3, "{mc}");

    // Sharded: several files + index, the same tensors.
    let out = tmp();
    let s = merged::write_merged(trained_model.as_ref(), &root.join("model"), out.path(), Kind::Float, 60_000).unwrap();
    assert!(s.shards.len() > 3, "{:?}", s.shards);
    assert_eq!(s.merged_modules.len(), 14);
    assert_eq!(s.shards[0], format!("model-00001-of-{:05}.safetensors", s.shards.len()));
    let index = json(&out.path().join("model.safetensors.index.json"));
    assert_eq!(index["weight_map"].as_object().unwrap().len(), s.tensors);
    let total: u64 = s.shards.iter().map(|f| std::fs::metadata(out.path().join(f)).unwrap().len()).sum();
    assert!(index["metadata"]["total_size"].as_u64().unwrap() <= total);
    for f in &s.shards {
        assert!(std::fs::metadata(out.path().join(f)).unwrap().len() < 60_000 + 40_000, "{f} too large");
    }
    let e = rel(&logits(load(out.path()).as_ref(), &ids), &want);
    assert!(e <= 1e-5, "{e}");
}

/// Values of a GGUF tensor with its HF row order restored.
fn gguf_values(g: &GgufFile, name: &str, heads: Option<usize>) -> Vec<f32> {
    let (v, shape) = g.tensor_f32(name).unwrap();
    match heads {
        Some(h) => tuner::gguf::import::unpermute_rows(&v, shape[0], h).unwrap(),
        None => v,
    }
}

#[test]
fn gguf_round_trips_through_the_importer_with_logits_and_tokenizer() {
    let d = fresh(Base::Tied);
    let root = d.path();
    let (ctx, files) = export_run(
        root,
        &[
            "export.merged_dtype=\"fp32\"",
            "export.gguf=[\"f16\", \"q8_0\"]",
            "export.ollama=true",
            "export.adapter=false",
        ],
    );
    let files = files.unwrap();
    let ex = ctx.stage_dir("export");
    for f in
        ["gguf/model-f16.gguf", "gguf/model-q8_0.gguf", "gguf/Modelfile", "gguf/README.md", "gguf/tuner-export.json"]
    {
        assert!(files.contains(&PathBuf::from(f)), "{f} not in {files:?}");
    }
    let ids = ids();
    let merged_model = load(&ex.join("merged"));
    let want = logits(merged_model.as_ref(), &ids);
    let base_tok = tokenizers::Tokenizer::from_file(root.join("model/tokenizer.json")).unwrap();
    let texts =
        ["The quick brown fox, 42 times.", "<|im_start|>user\nhi there<|im_end|>\n", "  spaces\tand\nnewlines  "];
    let mut errs = vec![];
    for (t, bound) in [(xgguf::GgufType::F16, 1e-2), (xgguf::GgufType::Q8_0, 3e-2)] {
        let path = ex.join("gguf").join(t.file_name());
        let g = GgufFile::open(&path).unwrap();
        assert_eq!(g.version(), 3);
        assert_eq!(g.get_str("general.architecture").unwrap(), Some("llama"));
        assert_eq!(g.get_u64("general.file_type").unwrap(), Some(t.file_type() as u64));
        assert_eq!(g.get_u64("llama.attention.key_length").unwrap(), Some(16), "explicit head_dim 16 != 48/4");
        assert_eq!(g.get_str("tokenizer.ggml.pre").unwrap(), Some("gpt-2"));
        assert!(g.tensor("output.weight").is_none(), "tied: no output.weight");
        let types = g.get_array("tokenizer.ggml.token_type").unwrap().unwrap();
        assert_eq!(types.len(), 320);
        assert_eq!(types[299].as_i64(), Some(3), "<|begin_of_text|> is a control token");
        assert_eq!(types[310].as_i64(), Some(5), "ids past the tokenizer are unused fillers");
        let ty = |n: &str| g.tensor(n).unwrap().ggml_type;
        assert_eq!(ty("blk.0.attn_norm.weight"), GgmlType::F32);
        if t == xgguf::GgufType::Q8_0 {
            assert_eq!(ty("blk.0.attn_output.weight"), GgmlType::Q8_0, "rows of 64 quantize");
            assert_eq!(ty("blk.0.attn_q.weight"), GgmlType::F16, "rows of 48 fall back to F16");
        } else {
            assert_eq!(ty("blk.0.attn_q.weight"), GgmlType::F16);
        }

        let imported = tmp();
        tuner::gguf::import::import_gguf(&path, imported.path()).unwrap();
        let e = rel(&logits(load(imported.path()).as_ref(), &ids), &want);
        errs.push((t.name(), e));
        assert!(e <= bound, "{}: rel logit error {e:e} > {bound:e}", t.name());

        let tok = tokenizers::Tokenizer::from_file(imported.path().join("tokenizer.json")).unwrap();
        for text in texts {
            assert_eq!(
                tok.encode(text, true).unwrap().get_ids(),
                base_tok.encode(text, true).unwrap().get_ids(),
                "{text:?} tokenizes differently after the round trip"
            );
        }
        let tc = json(&imported.path().join("tokenizer_config.json"));
        let base_tc = json(&root.join("model/tokenizer_config.json"));
        // The trained prompt format (the recipe's inline template), not the base's chat template.
        let trained_tpl = export::chat_template::for_prompt(&ctx.recipe.recipe.prompt).unwrap();
        assert_eq!(tc["chat_template"].as_str(), Some(trained_tpl.as_str()));
        assert_eq!(
            (tc["bos_token"].clone(), tc["eos_token"].clone()),
            (base_tc["bos_token"].clone(), base_tc["eos_token"].clone())
        );
        assert_eq!(tc["add_bos_token"], true);
    }
    eprintln!("GGUF → import → logits vs merged: {errs:?}");

    let mf = std::fs::read_to_string(ex.join("gguf/Modelfile")).unwrap();
    eprintln!("{mf}");
    assert!(mf.contains("\nFROM ./model-q8_0.gguf\n"), "{mf}");
    assert!(mf.contains("TEMPLATE \"\"\"{{ .Prompt }}\n{{ .Response }}\"\"\""), "the recipe's inline format: {mf}");
    assert!(mf.contains("PARAMETER stop \"<|endoftext|>\""), "{mf}");

    // gguf-py reads the same tensors, types and values.
    let (report, ts) = check_script(&[
        "--gguf".into(),
        ex.join("gguf/model-f16.gguf").display().to_string(),
        "--gguf".into(),
        ex.join("gguf/model-q8_0.gguf").display().to_string(),
    ]);
    for (i, t) in ["f16", "q8_0"].iter().enumerate() {
        let g = GgufFile::open(ex.join("gguf").join(format!("model-{t}.gguf"))).unwrap();
        let listed = report["gguf"][i]["tensors"].as_array().unwrap();
        assert_eq!(listed.len(), g.tensors().len());
        for info in listed {
            let name = info["name"].as_str().unwrap();
            let ours = g.tensor(name).unwrap();
            assert_eq!(info["type"].as_str().unwrap(), ours.ggml_type.name(), "{name}");
            let (v, shape) = g.tensor_f32(name).unwrap();
            let theirs = tensor(&ts, &format!("gguf{i}.{name}"));
            assert_eq!(theirs.size(), shape.iter().map(|&d| d as i64).collect::<Vec<_>>(), "{name}");
            let diff = (theirs - Tensor::from_slice(&v).view(theirs.size().as_slice())).abs().max().double_value(&[]);
            assert_eq!(diff, 0.0, "{t} {name}: gguf-py dequantizes to other values");
        }
        let meta = &report["gguf"][i]["metadata"];
        assert_eq!(meta["general.architecture"], "llama");
        assert_eq!(meta["tokenizer.ggml.model"], "gpt2");
        assert_eq!(meta["tokenizer.ggml.bos_token_id"], 299);
        assert_eq!(meta["tokenizer.ggml.eos_token_id"], 296);
    }

    // A second run with the same fingerprint keeps the finished folders.
    let before = std::fs::metadata(ex.join("gguf/model-q8_0.gguf")).unwrap().modified().unwrap();
    let again = Export.run(&ctx, &ex, FP).unwrap();
    assert_eq!(again, files);
    assert_eq!(std::fs::metadata(ex.join("gguf/model-q8_0.gguf")).unwrap().modified().unwrap(), before);
    assert!(!ex.join(".merged-work").exists());
}

fn llama3_factors(cfg: &Value, dim: usize) -> Vec<f64> {
    let rs = &cfg["rope_scaling"];
    let (theta, factor) = (cfg["rope_theta"].as_f64().unwrap(), rs["factor"].as_f64().unwrap());
    let (low, high, orig) = (
        rs["low_freq_factor"].as_f64().unwrap(),
        rs["high_freq_factor"].as_f64().unwrap(),
        rs["original_max_position_embeddings"].as_f64().unwrap(),
    );
    (0..dim / 2)
        .map(|i| {
            // HF's `_compute_llama3_parameters` as a ratio inv_freq / inv_freq_llama.
            let inv = 1.0 / theta.powf(2.0 * i as f64 / dim as f64);
            let wl = 2.0 * std::f64::consts::PI / inv;
            let scaled = if wl > orig / low { inv / factor } else { inv };
            let s = (orig / wl - low) / (high - low);
            let smoothed = (1.0 - s) * scaled / factor + s * scaled;
            let out = if wl >= orig / high && wl <= orig / low { smoothed } else { scaled };
            inv / out
        })
        .collect()
}

#[test]
fn gguf_of_a_llama3_rope_model_keeps_tensors_rope_factors_and_tokenizer() {
    let d = fresh(Base::Qlora);
    let root = d.path();
    let (ctx, files) = export_run(root, &["export.gguf=[\"f16\"]", "export.merged=false", "export.adapter=false"]);
    let files = files.unwrap();
    let ex = ctx.stage_dir("export");
    assert!(!ex.join("merged").exists() && !ex.join(".merged-work").exists(), "the merge work folder is removed");
    assert!(files.contains(&PathBuf::from("gguf/model-f16.gguf")) && !files.iter().any(|f| f.starts_with("merged")));
    assert!(!ex.join("gguf/Modelfile").exists());
    let g = GgufFile::open(ex.join("gguf/model-f16.gguf")).unwrap();
    let cfg = json(&root.join("model/config.json"));

    // rope_freqs: the divisors HF's llama3 rope applies.
    let (f, shape) = g.tensor_f32("rope_freqs.weight").unwrap();
    assert_eq!(shape, [8]);
    for (i, (got, want)) in f.iter().zip(llama3_factors(&cfg, 16)).enumerate() {
        assert!((*got as f64 - want).abs() <= 1e-5 * want, "rope factor {i}: {got} vs {want}");
    }
    // Every merged tensor, in F16 (F32 for norms), un-permuted for Q and K.
    let trained_model = export::load_trained(
        &ctx.recipe.recipe,
        &root.join("model"),
        &ctx.stage_dir("train").join("adapter"),
        Device::Cpu,
    )
    .unwrap();
    let src = tmp();
    merged::write_merged(
        trained_model.as_ref(),
        &root.join("model"),
        src.path(),
        Kind::BFloat16,
        merged::MAX_SHARD_BYTES,
    )
    .unwrap();
    let w = tuner::model::Weights::open(src.path()).unwrap();
    let mut n = 0;
    for hf in w.names() {
        let name = Names::of(GgufArch::Llama).to_gguf(&hf).unwrap().name;
        let heads = match name.split('.').nth(2) {
            Some("attn_q") => Some(4),
            Some("attn_k") => Some(2),
            _ => None,
        };
        let got = gguf_values(&g, &name, heads);
        let t = w.get(&hf).unwrap();
        let want = if t.dim() == 2 { t.to_kind(Kind::Half) } else { t }.to_kind(Kind::Float).view([-1]);
        assert_eq!(Vec::<f32>::try_from(&want).unwrap(), got, "{hf} ↔ {name}");
        n += 1;
    }
    assert_eq!(n + 1, g.tensors().len(), "every tensor plus rope_freqs");
    assert!(g.tensor("output.weight").is_some(), "untied lm_head");
    assert_eq!(g.get_bool("tokenizer.ggml.add_bos_token").unwrap(), Some(true));
    assert_eq!(g.get_u64("tokenizer.ggml.padding_token_id").unwrap(), Some(296));
    let trained_tpl = export::chat_template::for_prompt(&ctx.recipe.recipe.prompt).unwrap();
    assert_eq!(g.get_str("tokenizer.chat_template").unwrap(), Some(trained_tpl.as_str()));
    let merges = g.get_array("tokenizer.ggml.merges").unwrap().unwrap();
    assert_eq!(merges[0].as_str(), Some("Ġ t"));
    assert_eq!(g.get_u64("llama.rope.dimension_count").unwrap(), Some(16));
    assert!(g.get("llama.rope.scaling.type").is_none());
}

#[test]
fn gguf_writes_qwen2_qwen3_and_mistral_and_refuses_other_families() {
    for (family, arch, permuted) in [("qwen2", "qwen2", false), ("qwen3", "qwen3", false), ("mistral", "llama", true)] {
        let names = Names::of(GgufArch::from_name(arch).unwrap());
        let dir = repo().join("tests/fixtures/models").join(family);
        let out = tmp();
        let path = out.path().join("m.gguf");
        xgguf::write_gguf(&dir, &path, xgguf::GgufType::F16, family).unwrap();
        let g = GgufFile::open(&path).unwrap();
        assert_eq!(g.get_str("general.architecture").unwrap(), Some(arch), "{family}");
        let cfg = tuner::model::Config::from_dir(&dir).unwrap();
        let w = tuner::model::Weights::open(&dir).unwrap();
        for hf in w.names() {
            if cfg.tie_word_embeddings && hf == "lm_head.weight" {
                continue;
            }
            let name = names.to_gguf(&hf).unwrap_or_else(|| panic!("{family}: {hf}")).name;
            let heads = match (permuted, name.split('.').nth(2)) {
                (true, Some("attn_q")) => Some(cfg.num_attention_heads as usize),
                (true, Some("attn_k")) => Some(cfg.num_key_value_heads as usize),
                _ => None,
            };
            let t = w.get(&hf).unwrap();
            let want = if t.dim() == 2 { t.to_kind(Kind::Half) } else { t }.to_kind(Kind::Float).view([-1]);
            assert_eq!(Vec::<f32>::try_from(&want).unwrap(), gguf_values(&g, &name, heads), "{family}: {hf}");
        }
        if family == "qwen2" {
            assert!(g.tensor("blk.0.attn_q.bias").is_some());
        }
        if family == "qwen3" {
            assert!(g.tensor("blk.1.attn_k_norm.weight").is_some());
            assert_eq!(g.get_u64("qwen3.attention.key_length").unwrap(), Some(16));
        }
    }
    let other = tmp();
    std::fs::write(other.path().join("config.json"), r#"{"model_type": "falcon"}"#).unwrap();
    let msg = format!("{:#}", xgguf::check_supported(other.path()).unwrap_err());
    assert!(
        msg.contains("`falcon`")
            && msg.contains(
                "GGUF export supports llama, mistral, qwen2, qwen3, phi3, gemma2, gemma3_text, gemma3n_text models"
            ),
        "{msg}"
    );

    // Tokenizers llama.cpp would split differently are refused by name.
    let mut tok = json(&repo().join("tests/fixtures/models/llama/tokenizer.json"));
    tok["pre_tokenizer"] = serde_json::json!({"type": "Whitespace"});
    assert!(format!("{:#}", tuner::gguf::tokenizer::pre_tokenizer_name(&tok).unwrap_err()).contains("Whitespace"));
    tok["model"]["type"] = "Unigram".into();
    assert!(format!("{:#}", tuner::gguf::tokenizer::pre_tokenizer_name(&tok).unwrap_err()).contains("Unigram"));
}

#[test]
fn q8_0_blocks_and_qk_permutation_follow_ggml() {
    let x: Vec<f32> = (0..64).map(|i| (i as f32 - 20.5) * 0.37).collect();
    let b = xgguf::quantize_q8_0(&x);
    assert_eq!(b.len(), 68);
    // Block 0: max |x| = 20.5·0.37 → d = that / 127 in f16; q = round(x / d); block 1: 42.5·0.37.
    for (blk, amax) in [(0, 20.5f32 * 0.37), (1, 42.5 * 0.37)] {
        let o = 34 * blk;
        let d = half::f16::from_le_bytes([b[o], b[o + 1]]).to_f32();
        assert_eq!(d, half::f16::from_f32(amax / 127.0).to_f32());
        let id = 127.0 / amax;
        for j in 0..32 {
            assert_eq!(b[o + 2 + j] as i8, (x[32 * blk + j] * id).round() as i8, "block {blk} value {j}");
        }
    }
    assert_eq!(b[2] as i8, -127);
    assert_eq!(b[34 + 2 + 31] as i8, 127);
    let back = tuner::gguf::dequantize(GgmlType::Q8_0, &b, 64).unwrap();
    for (i, (a, v)) in x.iter().zip(&back).enumerate() {
        let amax = if i < 32 { 20.5 * 0.37 } else { 42.5 * 0.37 };
        assert!((a - v).abs() <= 0.5 * amax / 127.0 + 1e-2, "{a} vs {v}");
    }
    assert_eq!(xgguf::quantize_q8_0(&[0.0; 32])[2..], [0u8; 32]);

    // permute is the inverse of the importer's unpermute, per head.
    let w: Vec<f32> = (0..8 * 3).map(|i| i as f32).collect();
    let p = xgguf::permute_rows(&w, 8, 2).unwrap();
    assert_eq!(&p[..12], &[0., 1., 2., 6., 7., 8., 3., 4., 5., 9., 10., 11.], "rows 0,2,1,3 of head 0");
    assert_eq!(tuner::gguf::import::unpermute_rows(&p, 8, 2).unwrap(), w);
    assert!(xgguf::permute_rows(&w, 8, 3).is_err());
}

#[test]
fn merge_gate_rejects_a_merge_that_changes_the_loss() {
    let d = fresh(Base::Qlora);
    let root = d.path();
    let ctx = context(root, &[]);
    let GateExamples { examples, split: source } = tuner::stages::export::gate_examples(&ctx).unwrap();
    assert_eq!(source, "eval");
    let trained_model = export::load_trained(
        &ctx.recipe.recipe,
        &root.join("model"),
        &ctx.stage_dir("train").join("adapter"),
        Device::Cpu,
    )
    .unwrap();
    let base = tuner::model::open::load_for_recipe(&root.join("model"), &ctx.recipe.recipe, Device::Cpu).unwrap();
    // A "merge" that dropped the adapter: whichever way the loss moved, score it as the merged side.
    let m = check::measure(trained_model.as_ref(), base.as_ref(), &examples, Device::Cpu);
    let m = if m.merged_loss > m.adapter_loss {
        m
    } else {
        check::measure(base.as_ref(), trained_model.as_ref(), &examples, Device::Cpu)
    };
    let delta = m.merged_loss - m.adapter_loss;
    eprintln!("adapter dropped: loss delta {delta:.4e}, max |Δlogit| {:.3e}", m.max_abs_logit_diff);
    assert!(delta > 1e-5 && m.max_abs_logit_diff > 1e-3, "{m:?}");
    let rec = check::MergeCheck::new(m, source, delta / 2.0, FP, "bf16", Kind::Float, Device::Cpu);
    assert!(!rec.passed);
    let msg = format!("{:#}", check::enforce(&rec).unwrap_err());
    assert!(msg.contains("merge check failed") && msg.contains("max_merge_loss_delta"), "{msg}");
    let ok = check::MergeCheck::new(m, source, delta * 2.0, FP, "bf16", Kind::Float, Device::Cpu);
    assert!(ok.passed && check::enforce(&ok).is_ok());
    // The same model on both sides measures exactly zero.
    let same = check::measure(trained_model.as_ref(), trained_model.as_ref(), &examples, Device::Cpu);
    assert_eq!((same.merged_loss - same.adapter_loss, same.max_abs_logit_diff), (0.0, 0.0));

    // A negative threshold is not a valid recipe; ollama without GGUF is refused before any work.
    let err =
        tuner::recipe::load(&root.join("recipe.toml"), &["export.max_merge_loss_delta=-1".to_string()]).unwrap_err();
    assert!(format!("{err:#}").contains("max_merge_loss_delta"), "{err:#}");
    let (_, r) = export_run(root, &["export.ollama=true"]);
    let msg = format!("{:#}", r.unwrap_err());
    assert!(msg.contains("ollama") && msg.contains("gguf"), "{msg}");
    assert!(!root.join("runs/t/export/merged").exists());
}

/// Mark the evaluate stage complete for the current recipe, so that `--from export` can run
/// before the evaluate stage exists (and keeps working after: it is skipped as up to date).
fn fake_evaluate(root: &Path) {
    let ctx = context(root, &[]);
    let stages = tuner::stages::all();
    let train_fp = json(&root.join("runs/t/train/manifest.json"))["fingerprint"].as_str().unwrap().to_string();
    let eval = &stages[3];
    assert_eq!(eval.name(), "evaluate");
    let inputs = eval.inputs(&ctx).unwrap();
    let manifest = serde_json::json!({
        "stage": "evaluate", "format_version": tuner::pipeline::run_dir::FORMAT_VERSION,
        "fingerprint": tuner::pipeline::fingerprint("evaluate", &inputs, Some(&train_fp)),
        "inputs": inputs, "artifacts": [], "finished_unix": 0, "tuner_version": "test",
    });
    std::fs::create_dir_all(root.join("runs/t/evaluate")).unwrap();
    std::fs::write(root.join("runs/t/evaluate/manifest.json"), manifest.to_string()).unwrap();
}

#[test]
fn export_stage_runs_from_the_cli() {
    let d = fresh(Base::Qlora);
    let root = d.path();
    let mut text = std::fs::read_to_string(root.join("recipe.toml")).unwrap();
    text.push_str("\n[export]\ngguf = [\"q8_0\"]\nollama = true\n");
    std::fs::write(root.join("recipe.toml"), text).unwrap();
    fake_evaluate(root);
    let recipe = root.join("recipe.toml");
    let (code, _, err) = run(&["run", recipe.to_str().unwrap(), "--from", "export"]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("train: up to date, skipped") && err.contains("export: done"), "{err}");
    let m = json(&root.join("runs/t/export/manifest.json"));
    let paths: Vec<&str> = m["artifacts"].as_array().unwrap().iter().map(|a| a["path"].as_str().unwrap()).collect();
    for p in [
        "adapter/adapter_model.safetensors",
        "merged/model.safetensors",
        "gguf/model-q8_0.gguf",
        "gguf/Modelfile",
        "merge_check.json",
    ] {
        assert!(paths.contains(&p), "{p} not in {paths:?}");
    }
    assert_eq!(m["inputs"]["export"]["gguf"], serde_json::json!(["q8_0"]));
    let prov = json(&root.join("runs/t/export/gguf/tuner-export.json"));
    assert_eq!(prov["recipe_fingerprint"], m["fingerprint"]);
    let lock = json(&root.join("runs/t/tuner.lock.json"));
    assert_eq!(lock["stages"]["export"]["merge_check"]["passed"], true);
    // Nothing changed: the stage is skipped; a changed [export] runs it again.
    let (code, _, err) = run(&["run", recipe.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("export: up to date, skipped"), "{err}");
    let (code, _, err) = run(&["run", recipe.to_str().unwrap(), "--set", "export.ollama=false"]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("export: inputs changed") && !root.join("runs/t/export/gguf/Modelfile").exists(), "{err}");
}

/// The whole pipeline in one command. Enable once the evaluate stage exists (until then
/// `tuner run` stops at evaluate as incomplete).
#[test]
fn full_pipeline_through_export() {
    let d = tmp();
    let r = train_recipe(d.path(), "");
    let mut text = std::fs::read_to_string(&r).unwrap();
    text.push_str("\n[export]\ngguf = [\"f16\"]\n");
    std::fs::write(&r, text).unwrap();
    let (code, _, err) = run(&["run", r.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    for f in [
        "adapter/adapter_model.safetensors",
        "merged/model.safetensors",
        "gguf/model-f16.gguf",
        "merge_check.json",
        "manifest.json",
    ] {
        assert!(d.path().join("runs/t/export").join(f).is_file(), "{f}");
    }
    let readme = std::fs::read_to_string(d.path().join("runs/t/export/merged/README.md")).unwrap();
    assert!(readme.contains("## Evaluation"), "the evaluate report reaches the model card: {readme}");
}

#[test]
fn phi3_trains_merges_and_requantizes_its_fused_linears() {
    // Phi-3 through the whole pipeline: LoRA on the fused qkv_proj and gate_up_proj under their
    // checkpoint names, the merge gate, and the NF4 re-quantization of the fused weights.
    let d = tmp();
    let r = train_recipe(d.path(), "");
    std::fs::remove_dir_all(d.path().join("model")).unwrap();
    fixture_model("phi3", &d.path().join("model"));
    let targets = "target_modules = [\"qkv_proj\", \"o_proj\", \"gate_up_proj\", \"down_proj\"]";
    let text = std::fs::read_to_string(&r).unwrap().replace("alpha = 8", &format!("alpha = 8\n{targets}"));
    std::fs::write(&r, format!("{text}\n[export]\nmerged = true\nmerged_dtype = \"fp32\"\nnf4 = true\n")).unwrap();

    // Llama's names are refused for Phi-3, naming the ones it has.
    let (code, _, err) = run(&["validate", r.to_str().unwrap(), "--set", "lora.target_modules=[\"q_proj\"]"]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("`q_proj` is not a linear module of phi3 models; did you mean `o_proj`? expected some of qkv_proj, o_proj, gate_up_proj, down_proj"),
        "{err}"
    );

    let (code, _, err) = run(&["run", r.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    let rd = d.path().join("runs/t");
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(rd.join("train/adapter/adapter_config.json")).unwrap()).unwrap();
    assert_eq!(cfg["target_modules"], serde_json::json!(["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]));
    let adapter = Tensor::read_safetensors(rd.join("train/adapter/adapter_model.safetensors")).unwrap();
    assert_eq!(adapter.len(), 2 * 4 * 2, "A and B for 4 modules in 2 layers");
    let b = |n: &str| adapter.iter().find(|(k, _)| k == n).unwrap_or_else(|| panic!("no {n}")).1.size();
    // q 4×16 + k and v 2×16 each = 128 rows; gate and up 96 each = 192 rows.
    assert_eq!(b("base_model.model.model.layers.0.self_attn.qkv_proj.lora_B.weight"), [128, 4]);
    assert_eq!(b("base_model.model.model.layers.1.mlp.gate_up_proj.lora_B.weight"), [192, 4]);
    let mc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(rd.join("export/merge_check.json")).unwrap()).unwrap();
    assert_eq!(mc["passed"], true, "{mc}");
    assert!(mc["loss_delta"].as_f64().unwrap().abs() < 1e-4, "fp32 merge: {mc}");
    // The merged folder loads back as Phi-3 and the NF4 one holds the fused weights quantized.
    let merged = load(&rd.join("export/merged"));
    assert!(merged.linears().iter().any(|(n, _)| n == "model.layers.1.self_attn.qkv_proj"));
    let nf4 = Tensor::read_safetensors(rd.join("export/nf4/model.safetensors")).unwrap();
    for key in ["model.layers.0.self_attn.qkv_proj.weight.absmax", "model.layers.0.mlp.gate_up_proj.weight.absmax"] {
        assert!(nf4.iter().any(|(n, _)| n == key), "{key} missing");
    }
}

/// The conversations the chat-template tests render: (instruction, response) rows with quotes,
/// braces, backslashes, Jinja-looking text, a newline and non-ASCII.
const CHAT_ROWS: [(&str, &str); 3] = [
    ("Name three colors.", "Red, green, blue."),
    ("Say \"hi\" {x} {{ y }} {% z %} \\ é 😀\nthen stop", "hi"),
    ("", " "),
];

fn row(instruction: &str, output: &str) -> serde_json::Map<String, Value> {
    serde_json::json!({"instruction": instruction, "output": output}).as_object().unwrap().clone()
}

fn messages(user: &str, assistant: Option<&str>) -> Vec<tuner::data::template::Message> {
    let m = |role: &str, content: &str| tuner::data::template::Message { role: role.into(), content: content.into() };
    let mut v = vec![m("user", user)];
    v.extend(assistant.map(|a| m("assistant", a)));
    v
}

/// What tuner trains on for a row: (prompt, prompt + response + EOS when `add_eos`).
fn trained_text(p: &tuner::recipe::PromptSection, instruction: &str, output: &str, eos: &str) -> (String, String) {
    let r = tuner::data::template::Renderer::new(p, None, "<s>", eos).unwrap();
    let segs = r.render(&row(instruction, output)).unwrap();
    let full: String = segs.iter().map(|s| s.text.as_str()).collect();
    let (prompt, _) = r.prompt_text(&row(instruction, output)).unwrap();
    let eos = if p.add_eos && !r.is_chat() { eos } else { "" };
    (prompt, format!("{full}{eos}"))
}

#[test]
fn chat_template_of_each_prompt_format_renders_what_tuner_trains_on() {
    use tuner::data::template::Renderer;
    use tuner::recipe::{PromptSection, PromptTemplate};
    for (tpl, add_eos) in [
        ("alpaca", true),
        ("alpaca", false),
        ("### 指令\n{instruction}\n### 回答\n{output}", true),
        ("Q: {instruction}{input}\nA: {output}\n--", true),
        ("chatml", true),
    ] {
        let p = PromptSection { template: PromptTemplate::parse(tpl).unwrap(), add_eos, ..Default::default() };
        let jinja = export::chat_template::for_prompt(&p).unwrap();
        for (ins, out) in CHAT_ROWS {
            let (prompt, full) = trained_text(&p, ins, out, "</s>");
            let got = Renderer::apply_chat_template(&jinja, &messages(ins, None), true, "<s>", "</s>").unwrap();
            assert_eq!(got, prompt, "{tpl}: the generation prompt for {ins:?}");
            let got = Renderer::apply_chat_template(&jinja, &messages(ins, Some(out)), false, "<s>", "</s>").unwrap();
            // ChatML's trained text ends at <|im_end|>; the template adds the turn's newline.
            let want = if tpl == "chatml" { format!("{full}\n") } else { full };
            assert_eq!(got, want, "{tpl}: the conversation {ins:?} → {out:?}");
        }
    }
    // "chat" keeps the base model's own template.
    let p = PromptSection { template: PromptTemplate::Chat, ..Default::default() };
    assert!(export::chat_template::for_prompt(&p).is_none());
}

#[test]
fn alpaca_export_carries_the_trained_prompt_as_chat_template() {
    let d = fresh(Base::Tied);
    let root = d.path();
    let (ctx, files) = export_run(
        root,
        &["prompt.template=\"alpaca\"", "export.merged_dtype=\"fp32\"", "export.gguf=[\"f16\"]", "export.nf4=true"],
    );
    files.unwrap();
    let ex = ctx.stage_dir("export");
    let merged_dir = ex.join("merged");
    let tok = tuner::data::tokenizer::Tok::load(&merged_dir).unwrap();
    let p = &ctx.recipe.recipe.prompt;
    let want: Vec<(String, String)> = CHAT_ROWS.iter().map(|(i, o)| trained_text(p, i, o, &tok.eos_token)).collect();
    assert!(want[0].0.starts_with("Below is an instruction") && want[0].0.ends_with("### Response:\n"));

    // (a) transformers renders the merged folder's template as tuner trains.
    let cases = tmp();
    let case_file = cases.path().join("cases.json");
    let mut list = vec![];
    for (ins, out) in CHAT_ROWS {
        list.push(serde_json::json!({"messages": [{"role": "user", "content": ins}], "add_generation_prompt": true}));
        list.push(serde_json::json!({"messages": [{"role": "user", "content": ins}, {"role": "assistant", "content": out}], "add_generation_prompt": false}));
    }
    std::fs::write(&case_file, serde_json::to_string(&list).unwrap()).unwrap();
    for folder in ["merged", "nf4", "adapter"] {
        let o = std::process::Command::new(python())
            .arg(repo().join("scripts/chat_template_check.py"))
            .arg(ex.join(folder))
            .arg(&case_file)
            .env("TRANSFORMERS_VERBOSITY", "error")
            .env("HF_HUB_OFFLINE", "1")
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&o.stdout);
        assert!(o.status.success(), "chat_template_check.py failed:\n{stdout}\n{}", String::from_utf8_lossy(&o.stderr));
        let got: Vec<String> = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
        let flat: Vec<String> = want.iter().flat_map(|(a, b)| [a.clone(), b.clone()]).collect();
        assert_eq!(got, flat, "{folder}/: transformers' apply_chat_template");
        assert!(!ex.join(folder).join("chat_template.jinja").exists());
    }
    assert!(ex.join("adapter/tokenizer.json").is_file() && ex.join("adapter/adapter_model.safetensors").is_file());

    // (b) tuner's own chat path on the merged folder.
    let args = tuner::model::open::ModelArgs {
        model: merged_dir.clone(),
        adapter: None,
        dtype: tuner::recipe::Dtype::Fp32,
        device: "cpu".parse().unwrap(),
    };
    let g = tuner::generate::Generator::load(&args, &root.join(".gen-cache")).unwrap();
    for ((ins, _), (prompt, _)) in CHAT_ROWS.iter().zip(&want) {
        assert_eq!(&g.chat_prompt(&messages(ins, None)).unwrap(), prompt);
    }

    // (c) the GGUF metadata carries the same template.
    let gf = GgufFile::open(ex.join("gguf/model-f16.gguf")).unwrap();
    let tc = json(&merged_dir.join("tokenizer_config.json"));
    assert_eq!(gf.get_str("tokenizer.chat_template").unwrap(), tc["chat_template"].as_str());
    assert!(tc["chat_template"].as_str().unwrap().contains("### Instruction:"));
}
