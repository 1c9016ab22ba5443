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
        "x.toml:10: train.lr_scheduler: expected one of \"linear\", \"cosine\", \"constant\", found \"cosin\"; did you mean \"cosine\"?",
        "x.toml:11: train.optimizer: expected one of \"adamw\", \"adamw_8bit\", found \"sgd\"",
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
