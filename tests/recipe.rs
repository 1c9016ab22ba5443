//! Recipe validation: every message checked by its text, exit codes, overrides,
//! and the committed recipes.

use crate::common::*;
use std::path::Path;

/// Write `body` as `x.toml` in a temp dir next to a tiny model and dataset, and validate it.
fn validate(body: &str, extra_args: &[&str]) -> (i32, String) {
    let d = tmp();
    tiny_model(&d.path().join("model"));
    std::fs::write(d.path().join("data.jsonl"), "{\"instruction\":\"a\",\"output\":\"b\"}\n").unwrap();
    let p = d.path().join("x.toml");
    std::fs::write(&p, body).unwrap();
    let mut args = vec!["validate", p.to_str().unwrap()];
    args.extend_from_slice(extra_args);
    let (code, _out, err) = run(&args);
    (code, err.replace(&format!("{}/", d.path().display()), ""))
}

const GOOD: &str = r#"[model]
source = "model"

[dataset]
source = "data.jsonl"

[train]
max_steps = 10
"#;

#[test]
fn a_minimal_recipe_is_valid() {
    let (code, err) = validate(GOOD, &[]);
    assert_eq!(code, 0, "{err}");
}

#[test]
fn wrong_type_names_file_line_and_key() {
    let body = GOOD.replace("max_steps = 10", "max_steps = 10\nlearning_rate = \"fast\"");
    let (code, err) = validate(&body, &[]);
    assert_eq!(code, 2);
    assert!(err.contains("x.toml:9: train.learning_rate: expected a positive number, found \"fast\""), "{err}");
}

#[test]
fn unknown_key_suggests_the_closest() {
    let body = GOOD.replace("max_steps = 10", "max_steps = 10\nlearning_rat = 0.1");
    let (code, err) = validate(&body, &[]);
    assert_eq!(code, 2);
    assert!(err.contains("x.toml:9: unknown key `learning_rat` in [train]; did you mean `learning_rate`?"), "{err}");
}

#[test]
fn unknown_section_suggests_the_closest() {
    let (code, err) = validate(&format!("{GOOD}\n[traing]\nx = 1\n"), &[]);
    assert_eq!(code, 2);
    assert!(err.contains("x.toml:10: unknown section [traing]; did you mean [train]?"), "{err}");
}

#[test]
fn every_problem_is_reported_at_once() {
    let body = r#"[model]
source = "no-such-dir"

[lora]
r = 0
dropout = 1.5
target_modules = ["q_proj", "qq_proj"]

[train]
lr_scheduler = "cosin"
optimizer = "sgd"
micro_batch_size = -2
gradient_checkpointing = "yes"
"#;
    let (code, err) = validate(body, &[]);
    assert_eq!(code, 2);
    for want in [
        "x.toml:5: lora.r: expected a positive integer, found 0",
        "x.toml:6: lora.dropout: expected a number in [0, 1), found 1.5",
        "x.toml:10: train.lr_scheduler: expected one of \"linear\", \"cosine\", \"constant\", \"constant_with_warmup\", \"cosine_with_min_lr\", found \"cosin\"; did you mean \"cosine\"?",
        "x.toml:11: train.optimizer: expected one of \"adamw\", \"adamw_8bit\", \"adamw_torch\", \"adamw_torch_fused\", \"adamw_bnb_8bit\", \"paged_adamw_8bit\", \"paged_adamw_32bit\", found \"sgd\"",
        "x.toml:12: train.micro_batch_size: expected a positive integer, found -2",
        "x.toml:13: train.gradient_checkpointing: expected true or false, found \"yes\"",
        // The cross-key and file checks run too, on the keys that passed.
        "x.toml:2: model.source: no-such-dir is not a folder, a .gguf file or `hf:ORG/NAME`",
        "dataset.source: missing; set it to a local .jsonl/.json/.csv/.parquet/.arrow file or folder, or `hf:ORG/NAME`",
        "train.max_steps: missing; set train.max_steps (optimizer steps) or train.epochs",
    ] {
        assert!(err.contains(want), "missing {want:?} in:\n{err}");
    }
    assert!(err.contains("invalid recipe (9 problems)"), "{err}");
    // Nothing is said twice about a refused key (lora.r's default would pass the cross-key checks).
    assert_eq!(err.matches("lora.r:").count(), 1, "{err}");
}

#[test]
fn cross_key_and_file_checks_run_after_types() {
    let body = r#"[model]
source = "no-such-dir"

[lora]
target_modules = ["q_proj", "qq_proj"]

[prompt]
template = "alpacca"

[dataset]
source = "missing.jsonl"
eval_source = "data.jsonl"
eval_ratio = 0.1
"#;
    let (code, err) = validate(body, &[]);
    assert_eq!(code, 2);
    for want in [
        "x.toml:2: model.source: no-such-dir is not a folder, a .gguf file or `hf:ORG/NAME`",
        "x.toml:8: prompt.template: expected \"alpaca\", \"chatml\", \"chat\" or a format string with {field} slots, found \"alpacca\"; did you mean \"alpaca\"?",
        "x.toml:11: dataset.source: missing.jsonl does not exist",
        "x.toml:13: dataset.eval_ratio: set either dataset.eval_source or dataset.eval_ratio, not both",
        "train.max_steps: missing; set train.max_steps (optimizer steps) or train.epochs",
    ] {
        assert!(err.contains(want), "missing {want:?} in:\n{err}");
    }
}

#[test]
fn target_modules_are_checked_against_the_family() {
    let body = GOOD.replace("[train]", "[lora]\ntarget_modules = [\"q_proj\", \"qq_proj\"]\n\n[train]");
    let (code, err) = validate(&body, &[]);
    assert_eq!(code, 2);
    assert!(
        err.contains("x.toml:8: lora.target_modules: `qq_proj` is not a linear module of llama models; did you mean `q_proj`? expected some of q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj"),
        "{err}"
    );
    let ok = GOOD.replace("[train]", "[lora]\ntarget_modules = \"all-linear\"\n\n[train]");
    assert_eq!(validate(&ok, &[]).0, 0);
    let bad_regex = GOOD.replace("[train]", "[lora]\ntarget_modules = \"(q|k\"\n\n[train]");
    let (code, err) = validate(&bad_regex, &[]);
    assert_eq!(code, 2);
    assert!(err.contains("lora.target_modules: expected a list of names, \"all-linear\" or a valid regex"), "{err}");
}

#[test]
fn inline_template_needs_exactly_one_output_slot() {
    let body = GOOD.replace("[train]", "[prompt]\ntemplate = \"### 指令\\n{instruction}\\n### 回答\\n\"\n\n[train]");
    let (code, err) = validate(&body, &[]);
    assert_eq!(code, 2);
    assert!(err.contains("x.toml:8: prompt.template: a format string needs exactly one `{output}` slot"), "{err}");
    let ok =
        GOOD.replace("[train]", "[prompt]\ntemplate = \"### 指令\\n{instruction}\\n### 回答\\n{output}\"\n\n[train]");
    assert_eq!(validate(&ok, &[]).0, 0);
}

#[test]
fn set_overrides_any_key_and_is_validated() {
    let (code, err) =
        validate(GOOD, &["--set", "train.max_steps=0", "--set", "lora.alpha=16", "--set", "train.bogus=1"]);
    assert_eq!(code, 2);
    assert!(err.contains("--set train.max_steps: train.max_steps: expected a positive integer, found 0"), "{err}");
    assert!(err.contains("--set train.bogus: unknown key `bogus` in [train]"), "{err}");
    assert!(!err.contains("lora.alpha"), "{err}");
    let (code, err) = validate(GOOD, &["--set", "train.max_steps"]);
    assert_eq!(code, 2);
    assert!(err.contains("--set train.max_steps: expected SECTION.KEY=VALUE"), "{err}");
}

#[test]
fn toml_syntax_errors_name_the_line() {
    let (code, err) = validate("[model]\nsource = \"x\"\n[train\n", &[]);
    assert_eq!(code, 2);
    assert!(err.contains("x.toml:3: invalid TOML"), "{err}");
    let (code, err) = validate("[model]\nsource = \"x\"\n[train]\nmax_steps = 3\nlr = 1\nmax_steps = 4\n", &[]);
    assert_eq!(code, 2);
    assert!(err.contains("x.toml:6: invalid TOML: duplicate key `train.max_steps` (first set on line 4)"), "{err}");
}

#[test]
fn a_missing_recipe_file_is_a_usage_error() {
    let (code, _, err) = run(&["validate", "/no/such/recipe.toml"]);
    assert_eq!(code, 2);
    assert!(err.contains("cannot read recipe /no/such/recipe.toml"), "{err}");
}

#[test]
fn bad_command_line_is_exit_code_2() {
    assert_eq!(run(&["run"]).0, 2);
    assert_eq!(run(&["frobnicate"]).0, 2);
}

#[test]
fn the_committed_recipes_validate_without_network() {
    for r in ["recipes/alpaca.toml", "recipes/gemma3n-alpaca.toml"] {
        let p = repo().join(r);
        let (code, out, err) = run(&["validate", p.to_str().unwrap()]);
        assert_eq!(code, 0, "{r}: {out}{err}");
    }
}

#[test]
fn resolved_recipe_fills_every_default() {
    let loaded =
        tuner::recipe::load(&repo().join("recipes/gemma3n-alpaca.toml"), &["train.max_steps=7".into()]).unwrap();
    let r = &loaded.recipe;
    assert_eq!(r.train.max_steps, Some(7));
    assert_eq!(r.train.micro_batch_size, 2);
    assert_eq!(r.train.gradient_accumulation_steps, 4);
    assert_eq!(r.lora.r, 16);
    assert_eq!(r.lora.alpha, 32.0);
    assert_eq!(r.model.source, "hf:unsloth/gemma-3n-e4b-it-bnb-4bit");
    let text = loaded.resolved_toml();
    assert!(text.contains("max_grad_norm = 1.0"), "{text}");
    assert!(text.contains("[quantization]"), "{text}");
    // The resolved recipe is itself a valid recipe that loads to the same structs.
    let d = tmp();
    let p = d.path().join("resolved.toml");
    std::fs::write(&p, &text).unwrap();
    let again = tuner::recipe::load(Path::new(&p), &[]).unwrap();
    assert_eq!(again.recipe, loaded.recipe);
}

#[test]
fn typed_settings_name_their_key_and_the_accepted_values() {
    // Settings that are serde enums (or a parsed device) report a bad value with every accepted
    // one and a suggestion, at their key; a good value round-trips into the resolved recipe.
    let sets = [
        "train.device=\"gpu\"",
        "train.offload_activations=\"maybe\"",
        "lora.bias=\"all\"",
        "eval.metrics=[\"exact_mach\"]",
        "export.merged_dtype=\"fp8\"",
        "export.gguf=[\"q4_k\"]",
    ];
    let args: Vec<&str> = sets.iter().flat_map(|s| ["--set", *s]).collect();
    let (code, err) = validate(GOOD, &args);
    assert_eq!(code, 2, "{err}");
    for want in [
        "train.device: expected \"auto\", \"cpu\", \"cuda\" or \"cuda:N\", found \"gpu\"",
        "train.offload_activations: expected one of \"auto\", \"on\", \"off\", found \"maybe\"",
        "lora.bias: expected one of \"none\", found \"all\"",
        "eval.metrics: expected one of \"exact_match\", \"json_fields\", found \"exact_mach\"; did you mean \"exact_match\"?",
        "export.merged_dtype: expected one of \"bf16\", \"fp16\", \"fp32\", found \"fp8\"; did you mean \"fp16\"?",
        "export.gguf: expected one of \"f16\", \"q8_0\", \"q4_k_m\", found \"q4_k\"; did you mean \"q8_0\"?",
    ] {
        assert!(err.contains(want), "missing {want:?} in:\n{err}");
    }
    let good = ["train.device=\"cuda:1\"", "export.gguf=[\"f16\", \"q8_0\"]", "eval.metrics=[\"json_fields\"]"];
    let d = tmp();
    tiny_model(&d.path().join("model"));
    std::fs::write(d.path().join("data.jsonl"), "{\"instruction\":\"a\",\"output\":\"b\"}\n").unwrap();
    std::fs::write(d.path().join("x.toml"), GOOD).unwrap();
    let r = tuner::recipe::load(&d.path().join("x.toml"), &good.map(String::from)).unwrap().recipe;
    assert_eq!(r.train.device, tuner::recipe::DeviceSpec::Cuda(Some(1)));
    assert_eq!(r.train.device.to_string(), "cuda:1");
    assert_eq!(r.export.gguf, [tuner::recipe::GgufType::F16, tuner::recipe::GgufType::Q8_0]);
    assert_eq!(
        toml::to_string(&r.train).unwrap().lines().find(|l| l.starts_with("device")),
        Some("device = \"cuda:1\"")
    );
}

// ---- other tools' key names (recipe/aliases.rs) ----

/// Load `body` (hub sources, so nothing is read from disk) from `x.toml`; the loaded recipe or the
/// error text with the temp folder cut out.
fn load_body(body: &str, sets: &[&str]) -> Result<tuner::recipe::Loaded, String> {
    let d = tmp();
    let p = d.path().join("x.toml");
    std::fs::write(&p, body).unwrap();
    let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
    tuner::recipe::load(&p, &sets).map_err(|e| format!("{e:#}").replace(&format!("{}/", d.path().display()), ""))
}

const HUB: &str = "[model]\nsource = \"hf:org/m\"\n\n[dataset]\nsource = \"hf:org/d\"\n";

#[test]
fn peft_trl_and_transformers_names_read_as_tuner_keys() {
    use tuner::recipe::{Dtype, LrScheduler, Optimizer, QuantMethod};
    let body = format!(
        "{HUB}\n[lora]\nlora_r = 8\nlora_alpha = 64\nlora_dropout = 0.1\nlora_target_modules = [\"q_proj\"]\n\n\
         [quantization]\nload_in_4bit = true\nbnb_4bit_quant_type = \"fp4\"\nbnb_4bit_use_double_quant = false\nbnb_4bit_compute_dtype = \"bfloat16\"\n\n\
         [train]\nper_device_train_batch_size = 3\nnum_train_epochs = 2\noptim = \"paged_adamw_8bit\"\n\
         lr_scheduler_type = \"cosine_with_min_lr\"\nmin_lr_rate = 0.1\nwarmup_ratio = 0.05\nbf16 = true\nfp16 = false\n\
         seed = 7\nmax_length = 512\nsave_total_limit = 4\nper_device_eval_batch_size = 16\n"
    );
    let l = load_body(&body, &[]).unwrap();
    let r = &l.recipe;
    assert_eq!((r.lora.r, r.lora.alpha, r.lora.dropout), (8, 64.0, 0.1));
    assert_eq!(r.lora.target_modules, tuner::recipe::TargetModules::List(vec!["q_proj".into()]));
    assert_eq!((r.quantization.method, r.quantization.double_quant), (QuantMethod::Fp4, false));
    assert_eq!(r.model.dtype, Dtype::Bf16); // bf16 and bnb_4bit_compute_dtype agree
    let t = &r.train;
    assert_eq!((t.micro_batch_size, t.epochs, t.max_seq_length, t.keep_checkpoints), (3, Some(2.0), 512, 4));
    assert_eq!(
        (t.optimizer, t.lr_scheduler, t.min_lr_rate, t.warmup_ratio),
        (Optimizer::Adamw8bit, LrScheduler::CosineWithMinLr, Some(0.1), Some(0.05))
    );
    assert_eq!((r.run.seed, r.eval.batch_size), (7, 16));
    // recipe.resolved.toml holds tuner's keys only.
    let resolved = l.resolved_toml();
    for theirs in ["lora_alpha", "per_device_train_batch_size", "optim ", "paged", "bnb_4bit", "num_train_epochs"] {
        assert!(!resolved.contains(theirs), "{theirs} in\n{resolved}");
    }
    for ours in [
        "alpha = 64.0",
        "micro_batch_size = 3",
        "optimizer = \"adamw_8bit\"",
        "lr_scheduler = \"cosine_with_min_lr\"",
        "method = \"fp4\"",
        "epochs = 2.0",
    ] {
        assert!(resolved.contains(ours), "{ours} not in\n{resolved}");
    }
    // The paged optimizer's difference is said, at its line.
    let w: Vec<String> = l.warnings.iter().map(|w| w.to_string()).collect();
    assert!(w.iter().any(|w| w.contains("x.toml:22: train.optimizer = \"paged_adamw_8bit\" runs as adamw_8bit, without paging")), "{w:?}");
}

#[test]
fn an_alias_and_its_tuner_key_together_are_a_located_error() {
    let err =
        load_body(&format!("{HUB}\n[lora]\nalpha = 16\nlora_alpha = 32\n\n[train]\nmax_steps = 1\n"), &[]).unwrap_err();
    assert!(
        err.contains("x.toml:9: lora.lora_alpha: `lora_alpha` (peft's name for `lora.alpha`) and `lora.alpha` (x.toml:8) are both set; keep one"),
        "{err}"
    );
    // Two aliases of one key that disagree.
    let err = load_body(
        &format!(
            "{HUB}\n[train]\nmax_steps = 1\nbf16 = true\n\n[quantization]\nbnb_4bit_compute_dtype = \"float16\"\n"
        ),
        &[],
    )
    .unwrap_err();
    assert!(err.contains("x.toml:9: train.bf16: `bf16` (transformers' name for `model.dtype`) sets model.dtype = \"bf16\", but `quantization.bnb_4bit_compute_dtype` (x.toml:12) sets it to \"fp16\"; keep one"), "{err}");
}

#[test]
fn an_alias_in_another_section_points_to_its_own() {
    let err = load_body(&format!("{HUB}\n[train]\nmax_steps = 1\nlora_alpha = 16\n"), &[]).unwrap_err();
    assert!(
        err.contains("x.toml:9: unknown key `lora_alpha` in [train]; `lora_alpha` (peft's name for `lora.alpha`) is read in [lora]: move it there"),
        "{err}"
    );
    let err = load_body(&format!("lora_alpha = 16\n{HUB}\n[train]\nmax_steps = 1\n"), &[]).unwrap_err();
    assert!(err.contains("x.toml:1: unknown key `lora_alpha` at the top level; `lora_alpha` (peft's name for `lora.alpha`) is read in [lora]: move it there"), "{err}");
    // A tuner key in the wrong section, and a near miss of an alias.
    let err =
        load_body(&format!("{HUB}\n[lora]\nlearning_rate = 1e-4\nlora_alpah = 8\n\n[train]\nmax_steps = 1\n"), &[])
            .unwrap_err();
    assert!(
        err.contains(
            "x.toml:8: unknown key `learning_rate` in [lora]; `learning_rate` is a key of [train]: move it there"
        ),
        "{err}"
    );
    assert!(
        err.contains(
            "x.toml:9: unknown key `lora_alpah` in [lora]; did you mean `lora_alpha` (peft's name for `lora.alpha`)?"
        ),
        "{err}"
    );
    // --set takes the aliases too.
    let l = load_body(&format!("{HUB}\n[train]\nmax_steps = 1\n"), &["lora.lora_alpha=8", "train.optim=adamw_torch"])
        .unwrap();
    assert_eq!((l.recipe.lora.alpha, l.recipe.train.optimizer), (8.0, tuner::recipe::Optimizer::Adamw));
}

#[test]
fn alias_values_that_say_nothing_or_contradict_are_errors() {
    let err = load_body(&format!("{HUB}\n[train]\nmax_steps = 1\nbf16 = false\n"), &[]).unwrap_err();
    assert!(
        err.contains("x.toml:9: train.bf16: `bf16 = false` does not say which dtype to use; set model.dtype"),
        "{err}"
    );
    let err = load_body(
        &format!(
            "{HUB}\n[train]\nmax_steps = 1\n[quantization]\nload_in_4bit = false\nbnb_4bit_quant_type = \"nf4\"\n"
        ),
        &[],
    )
    .unwrap_err();
    assert!(
        err.contains("quantization.load_in_4bit: `load_in_4bit = false` and `bnb_4bit_quant_type` disagree"),
        "{err}"
    );
    let l = load_body(
        &format!("{HUB}\n[train]\nmax_steps = 1\nfp16 = true\nbf16 = false\n[quantization]\nload_in_4bit = false\n"),
        &[],
    )
    .unwrap();
    assert_eq!(
        (l.recipe.model.dtype, l.recipe.quantization.method),
        (tuner::recipe::Dtype::Fp16, tuner::recipe::QuantMethod::None)
    );
}

#[test]
fn optimizer_and_scheduler_names_of_other_tools() {
    use tuner::recipe::{LrScheduler, Optimizer};
    for (name, want) in [
        ("adamw_torch", Optimizer::Adamw),
        ("adamw_torch_fused", Optimizer::Adamw),
        ("paged_adamw_32bit", Optimizer::Adamw),
        ("adamw_bnb_8bit", Optimizer::Adamw8bit),
        ("paged_adamw_8bit", Optimizer::Adamw8bit),
        ("adamw_8bit", Optimizer::Adamw8bit),
    ] {
        let l = load_body(&format!("{HUB}\n[train]\nmax_steps = 1\noptimizer = \"{name}\"\n"), &[]).unwrap();
        assert_eq!(l.recipe.train.optimizer, want, "{name}");
        assert_eq!(l.warnings.iter().any(|w| w.text.contains("without paging")), name.starts_with("paged"), "{name}");
    }
    let err = load_body(&format!("{HUB}\n[train]\nmax_steps = 1\noptimizer = \"lion_8bit\"\n"), &[]).unwrap_err();
    assert!(err.contains("x.toml:9: train.optimizer: expected one of \"adamw\", \"adamw_8bit\", \"adamw_torch\", \"adamw_torch_fused\", \"adamw_bnb_8bit\", \"paged_adamw_8bit\", \"paged_adamw_32bit\", found \"lion_8bit\""), "{err}");
    let l =
        load_body(&format!("{HUB}\n[train]\nmax_steps = 1\nlr_scheduler = \"constant_with_warmup\"\n"), &[]).unwrap();
    assert_eq!(l.recipe.train.lr_scheduler, LrScheduler::Constant);
    assert!(l.resolved_toml().contains("lr_scheduler = \"constant\""));
}

#[test]
fn min_lr_and_warmup_ratio_rules() {
    let err =
        load_body(&format!("{HUB}\n[train]\nmax_steps = 1\nlr_scheduler = \"cosine_with_min_lr\"\n"), &[]).unwrap_err();
    assert!(
        err.contains("x.toml:9: train.lr_scheduler: \"cosine_with_min_lr\" needs its floor: set train.min_lr_rate"),
        "{err}"
    );
    let err = load_body(&format!("{HUB}\n[train]\nmax_steps = 1\nmin_lr = 1e-5\n"), &[]).unwrap_err();
    assert!(err.contains("x.toml:9: train.min_lr: only read by train.lr_scheduler = \"cosine_with_min_lr\""), "{err}");
    let err = load_body(
        &format!(
            "{HUB}\n[train]\nmax_steps = 1\nlr_scheduler = \"cosine_with_min_lr\"\nmin_lr = 1e-5\nmin_lr_rate = 0.1\n"
        ),
        &[],
    )
    .unwrap_err();
    assert!(err.contains("train.min_lr: set either train.min_lr or train.min_lr_rate, not both"), "{err}");
    let err = load_body(
        &format!("{HUB}\n[train]\nmax_steps = 1\nlr_scheduler = \"cosine_with_min_lr\"\nmin_lr_rate = 1.5\n"),
        &[],
    )
    .unwrap_err();
    assert!(err.contains("x.toml:10: train.min_lr_rate: expected a number in [0, 1], found 1.5"), "{err}");
    let err =
        load_body(&format!("{HUB}\n[train]\nmax_steps = 1\nwarmup_steps = 3\nwarmup_ratio = 0.1\n"), &[]).unwrap_err();
    assert!(
        err.contains(
            "x.toml:10: train.warmup_ratio: set either train.warmup_steps (x.toml:9) or train.warmup_ratio, not both"
        ),
        "{err}"
    );
    let err = load_body(&format!("{HUB}\n[train]\nmax_steps = 1\nwarmup_ratio = 1.0\n"), &[]).unwrap_err();
    assert!(err.contains("train.warmup_ratio: expected a number in [0, 1), found 1.0"), "{err}");
    // Left out, the new keys stay out of the resolved recipe (and so out of fingerprints).
    let l = load_body(&format!("{HUB}\n[train]\nmax_steps = 1\n"), &[]).unwrap();
    let resolved = l.resolved_toml();
    assert!(!resolved.contains("warmup_ratio") && !resolved.contains("min_lr"), "{resolved}");
}
