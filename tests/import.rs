//! `tuner import`: the configs of tests/fixtures/import (Axolotl's and TRL's own examples, see the
//! README there) become recipes that tuner's recipe loader accepts, with the mapped values and
//! the keys left behind asserted one by one.

use crate::common::*;
use std::path::{Path, PathBuf};
use tuner::import::{import, render, Tool};
use tuner::recipe::{Dtype, LrScheduler, Optimizer, QuantMethod, TargetModules};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/import").join(name)
}

/// Import a fixture, write the recipe into `dir`, load it back (with `overrides`); the loaded
/// recipe, the keys left behind (sorted) and the TOML text.
fn import_and_load(dir: &Path, name: &str, overrides: &[&str]) -> (tuner::recipe::Recipe, Vec<String>, String, Tool) {
    let (tool, draft) = import(&fixture(name), None).unwrap();
    let text = render(&draft, name, tool);
    let out = dir.join(format!("{name}.toml"));
    std::fs::write(&out, &text).unwrap();
    let sets: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
    let loaded = tuner::recipe::load(&out, &sets).unwrap_or_else(|e| panic!("{name}: {e:#}\n{text}"));
    let mut dropped: Vec<String> = draft.dropped.iter().map(|(k, _)| k.clone()).collect();
    dropped.sort();
    (loaded.recipe, dropped, text, tool)
}

fn all_linear(t: &TargetModules) -> bool {
    matches!(t, TargetModules::Pattern(p) if p == "all-linear")
}

#[test]
fn axolotl_llama3_qlora_imports() {
    let d = tmp();
    let (r, dropped, text, tool) = import_and_load(d.path(), "axolotl-llama3-qlora.yml", &[]);
    assert_eq!(tool, Tool::Axolotl);
    assert_eq!(r.model.source, "hf:NousResearch/Meta-Llama-3-8B");
    assert_eq!(r.model.dtype, Dtype::Auto); // bf16: auto
    assert_eq!((r.quantization.method, r.quantization.double_quant), (QuantMethod::Nf4, true));
    assert_eq!((r.lora.r, r.lora.alpha, r.lora.dropout), (32, 16.0, 0.05));
    assert!(all_linear(&r.lora.target_modules));
    assert_eq!(r.dataset.source, "hf:tatsu-lab/alpaca");
    assert_eq!(r.dataset.eval_ratio, None); // val_set_size: 0
    assert_eq!(r.prompt.template.to_string(), "alpaca");
    assert!(r.prompt.train_on_responses_only);
    let t = &r.train;
    assert_eq!((t.max_seq_length, t.micro_batch_size, t.gradient_accumulation_steps), (4096, 2, 4));
    assert_eq!((t.epochs, t.max_steps), (Some(4.0), None));
    assert_eq!((t.learning_rate, t.warmup_steps, t.weight_decay), (2e-4, 10, 0.0));
    assert_eq!((t.lr_scheduler, t.optimizer), (LrScheduler::Cosine, Optimizer::Adamw)); // paged_adamw_32bit
    assert!(t.packing && t.gradient_checkpointing);
    assert_eq!(t.logging_steps, 1);
    assert_eq!((r.run.output_dir.as_str(), r.run.name.as_str()), ("./outputs", "qlora-out"));
    assert_eq!(
        dropped,
        [
            "evals_per_epoch",
            "flash_attention",
            "model_type",
            "pad_to_sequence_len",
            "saves_per_epoch",
            "special_tokens",
            "tokenizer_type"
        ]
    );
    assert!(text.contains("#   flash_attention: tuner picks its attention path itself"), "{text}");
    assert!(text.contains("optimizer = \"paged_adamw_32bit\" runs as adamw (fp32 states), without paging"), "{text}");
}

#[test]
fn axolotl_llama3_lora_8b_imports() {
    let d = tmp();
    let (r, dropped, text, _) = import_and_load(d.path(), "axolotl-llama3-lora-8b.yml", &[]);
    // load_in_8bit has no tuner counterpart: unquantized LoRA.
    assert_eq!(r.quantization.method, QuantMethod::None);
    assert_eq!(r.dataset.source, "hf:mhenrichsen/alpaca_2k_test");
    assert_eq!(r.dataset.eval_ratio, Some(0.05));
    assert_eq!(r.train.optimizer, Optimizer::Adamw8bit); // adamw_bnb_8bit
    assert_eq!(r.train.warmup_ratio, Some(0.1));
    assert!(!text.contains("warmup_steps"), "{text}");
    assert_eq!((r.train.epochs, r.lora.r, r.lora.alpha), (Some(4.0), 32, 16.0));
    assert_eq!(
        dropped,
        [
            "evals_per_epoch",
            "flash_attention",
            "load_in_8bit",
            "lora_modules_to_save",
            "model_type",
            "saves_per_epoch",
            "special_tokens",
            "tokenizer_type"
        ]
    );
    assert!(text.contains("#   load_in_8bit: tuner has no 8-bit base weights"), "{text}");
}

#[test]
fn axolotl_mistral_qlora_imports() {
    let d = tmp();
    let (r, dropped, _, _) = import_and_load(d.path(), "axolotl-mistral-qlora.yml", &[]);
    assert_eq!(r.model.source, "hf:mistralai/Mistral-7B-v0.1");
    assert_eq!((r.model.dtype, r.quantization.method), (Dtype::Bf16, QuantMethod::Nf4));
    // lora_target_linear covers the listed modules.
    assert!(all_linear(&r.lora.target_modules));
    assert_eq!((r.train.max_seq_length, r.train.epochs, r.train.warmup_steps), (8192, Some(1.0), 10));
    assert_eq!(r.dataset.eval_ratio, Some(0.01));
    assert_eq!(r.eval.max_new_tokens, 128);
    assert_eq!((r.run.output_dir.as_str(), r.run.name.as_str()), (".", "qlora-out"));
    assert_eq!(
        dropped,
        [
            "base_model_config",
            "dataset_prepared_path",
            "eval_steps",
            "eval_table_size",
            "flash_attention",
            "is_mistral_derived_model",
            "model_type",
            "pad_to_sequence_len",
            "special_tokens",
            "tokenizer_type"
        ]
    );
}

#[test]
fn axolotl_chat_template_dataset_imports_as_chat_messages() {
    let d = tmp();
    let (r, dropped, text, _) = import_and_load(d.path(), "axolotl-llama3-instruct-lora-8b.yml", &[]);
    assert_eq!(r.dataset.source, "hf:fozziethebeat/alpaca_messages_2k_test");
    assert_eq!(r.prompt.template.to_string(), "chat");
    assert_eq!(r.prompt.messages_field, "messages");
    assert!(r.prompt.train_on_responses_only);
    assert!(!r.train.packing);
    assert!(text.contains("chat_template = \"llama3\": tuner applies the tokenizer's own chat template"), "{text}");
    // role/content and the identity role map carry over; nothing about the dataset is left behind.
    assert!(!dropped.iter().any(|k| k.starts_with("datasets")), "{dropped:?}");
    assert!(dropped.contains(&"load_in_8bit".to_string()));
}

#[test]
fn axolotl_dataset_types_tuner_lacks_are_listed() {
    let d = tmp();
    let cfg = d.path().join("a.yml");
    std::fs::write(
        &cfg,
        "base_model: org/m\nadapter: lora\nlora_r: 8\nlearning_rate: 1e-4\ndatasets:\n  - path: org/chats\n    type: input_output\n  - path: org/more\n    type: alpaca\n",
    )
    .unwrap();
    let (_, draft) = import(&cfg, None).unwrap();
    let why: std::collections::BTreeMap<_, _> = draft.dropped.iter().cloned().collect();
    assert!(why["datasets[0].type"].starts_with("\"input_output\": tuner reads alpaca, chat messages"), "{why:?}");
    assert!(why["datasets[1]"].starts_with("tuner reads one dataset"), "{why:?}");
    assert_eq!(draft.get("dataset.source").and_then(|v| v.as_str()), Some("hf:org/chats"));
    // Axolotl's defaults where tuner's differ.
    assert_eq!(draft.get("train.micro_batch_size").and_then(|v| v.as_integer()), Some(1));
    assert_eq!(draft.get("train.max_seq_length").and_then(|v| v.as_integer()), Some(512));
    assert_eq!(draft.get("train.lr_scheduler").and_then(|v| v.as_str()), Some("cosine"));
    assert_eq!(draft.get("train.optimizer").and_then(|v| v.as_str()), Some("adamw")); // adamw_torch_fused
    assert_eq!(draft.get("train.learning_rate").and_then(|v| v.as_float()), Some(1e-4));
    // "1e-4" read as a number
}

#[test]
fn axolotl_sharegpt_and_completion_datasets_map_to_dataset_formats() {
    let d = tmp();
    for (ty, extra, format, template) in
        [("sharegpt", "", "sharegpt", Some("chat")), ("completion", "    field: body\n", "text", None)]
    {
        let cfg = d.path().join(format!("{ty}.yml"));
        let text = format!("base_model: org/m\nadapter: lora\ndatasets:\n  - path: org/data\n    type: {ty}\n{extra}");
        std::fs::write(&cfg, text).unwrap();
        let (_, draft) = import(&cfg, None).unwrap();
        assert!(!draft.dropped.iter().any(|(k, _)| k.starts_with("datasets")), "{:?}", draft.dropped);
        assert_eq!(draft.get("dataset.format").and_then(|v| v.as_str()), Some(format));
        assert_eq!(draft.get("prompt.template").and_then(|v| v.as_str()), template);
        if ty == "completion" {
            assert_eq!(draft.get("dataset.text_field").and_then(|v| v.as_str()), Some("body"));
        }
    }
}

#[test]
fn trl_sft_lora_example_imports() {
    let d = tmp();
    let (r, dropped, _, tool) = import_and_load(d.path(), "trl-sft-lora.json", &[]);
    assert_eq!(tool, Tool::Trl);
    assert_eq!(r.model.source, "hf:Qwen/Qwen2-0.5B");
    assert_eq!((r.model.dtype, r.quantization.method), (Dtype::Bf16, QuantMethod::None)); // SFTConfig: bf16
    assert_eq!((r.lora.r, r.lora.alpha, r.lora.dropout), (32, 16.0, 0.05)); // ModelConfig's dropout
    assert_eq!(r.dataset.source, "hf:trl-lib/Capybara");
    assert_eq!(r.prompt.template.to_string(), "chat");
    assert!(!r.prompt.train_on_responses_only); // assistant_only_loss defaults to false
    let t = &r.train;
    assert_eq!((t.micro_batch_size, t.gradient_accumulation_steps, t.max_seq_length), (2, 8, 1024));
    assert_eq!((t.epochs, t.learning_rate, t.warmup_steps), (Some(1.0), 2e-4, 0));
    assert_eq!((t.lr_scheduler, t.optimizer), (LrScheduler::Linear, Optimizer::Adamw));
    assert!(t.packing && t.gradient_checkpointing);
    assert_eq!((t.logging_steps, t.save_steps, r.run.seed), (10, 500, 42));
    assert_eq!(r.run.name, "Qwen2-0.5B-SFT");
    assert_eq!(dropped, ["eos_token", "eval_steps", "eval_strategy", "push_to_hub"]);
}

#[test]
fn trl_cli_example_imports_and_lists_the_missing_peft() {
    let d = tmp();
    let (r, dropped, text, _) = import_and_load(d.path(), "trl-cli-example.yaml", &[]);
    assert_eq!((r.model.source.as_str(), r.dataset.source.as_str()), ("hf:Qwen/Qwen2.5-0.5B", "hf:stanfordnlp/imdb"));
    assert_eq!((r.train.learning_rate, r.train.lr_scheduler), (1e-4, LrScheduler::Cosine));
    assert_eq!(r.train.epochs, Some(3.0)); // TrainingArguments' default
    assert_eq!(dropped, ["report_to", "use_peft"]);
    assert!(text.contains("#   use_peft: not set, so TRL would fine-tune every weight"), "{text}");
}

#[test]
fn transformers_training_arguments_import_with_min_lr_schedule_and_paged_optimizer() {
    let d = tmp();
    let (r, dropped, text, tool) =
        import_and_load(d.path(), "transformers-qlora.json", &["model.source=hf:org/m", "dataset.source=hf:org/d"]);
    assert_eq!(tool, Tool::Trl);
    let t = &r.train;
    assert_eq!((t.micro_batch_size, t.gradient_accumulation_steps, r.eval.batch_size), (4, 2, 8));
    assert_eq!((t.epochs, t.learning_rate, t.weight_decay), (Some(2.0), 1e-4, 0.01));
    assert_eq!((t.lr_scheduler, t.min_lr_rate, t.min_lr), (LrScheduler::CosineWithMinLr, Some(0.1), None));
    assert_eq!(t.warmup_ratio, Some(0.03));
    assert_eq!(t.optimizer, Optimizer::Adamw8bit); // paged_adamw_8bit
    assert!(!t.gradient_checkpointing); // TrainingArguments' default
    assert_eq!((t.logging_steps, t.save_steps, t.keep_checkpoints, r.run.seed), (5, 200, 3, 1234));
    assert_eq!(t.max_seq_length, 2048); // not in TrainingArguments: tuner's default
    assert_eq!(r.model.dtype, Dtype::Bf16);
    assert_eq!((r.quantization.method, r.quantization.double_quant), (QuantMethod::Nf4, true));
    assert_eq!((r.lora.r, r.lora.alpha, r.lora.dropout), (16, 32.0, 0.1));
    assert_eq!(
        r.lora.target_modules,
        TargetModules::List(vec!["q_proj".into(), "k_proj".into(), "v_proj".into(), "o_proj".into()])
    );
    assert_eq!((r.run.output_dir.as_str(), r.run.name.as_str()), ("runs", "llama-qlora"));
    assert_eq!(dropped, ["report_to"]);
    assert!(text.contains("optim = \"paged_adamw_8bit\" runs as adamw_8bit, without paging"), "{text}");
    assert!(text.contains("no dataset_name: set dataset.source before running"), "{text}");
}

#[test]
fn import_command_writes_atomically_refuses_to_overwrite_and_the_result_validates() {
    let d = tmp();
    let out = d.path().join("recipes/q.toml");
    std::fs::create_dir_all(out.parent().unwrap()).unwrap();
    let src = fixture("axolotl-llama3-lora-8b.yml");
    let (code, stdout, err) = run(&["import", src.to_str().unwrap(), "-o", out.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(stdout.is_empty(), "{stdout}");
    assert!(err.contains("not carried over: load_in_8bit: tuner has no 8-bit base weights"), "{err}");
    assert!(err.contains("(Axolotl config, 8 key(s) not carried over)"), "{err}");
    assert!(!err.contains("needs editing"), "{err}");
    let text = std::fs::read_to_string(&out).unwrap();
    assert!(text.starts_with("# Imported by `tuner import` from "), "{text}");
    assert!(
        text.contains("\n[lora]\nalpha = 16.0\ndropout = 0.05\nr = 32\ntarget_modules = \"all-linear\"\n"),
        "{text}"
    );
    let leftovers: Vec<_> = std::fs::read_dir(out.parent().unwrap()).unwrap().flatten().collect();
    assert_eq!(leftovers.len(), 1, "a temp file stayed behind");
    let (code, _, err) = run(&["import", src.to_str().unwrap(), "-o", out.to_str().unwrap()]);
    assert_eq!(code, 2);
    assert!(err.contains("exists; pass --force to replace it"), "{err}");
    let (code, _, err) = run(&["import", src.to_str().unwrap(), "-o", out.to_str().unwrap(), "--force"]);
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = run(&["validate", out.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
}

#[test]
fn import_errors_name_the_file() {
    let d = tmp();
    let odd = d.path().join("odd.yml");
    std::fs::write(&odd, "foo: 1\n").unwrap();
    let (code, _, err) = run(&["import", odd.to_str().unwrap()]);
    assert_eq!(code, 2);
    assert!(err.contains("odd.yml: cannot tell which tool this config is for"), "{err}");
    assert!(err.contains("pass --from axolotl or --from trl"), "{err}");
    let bad = d.path().join("bad.yml");
    std::fs::write(&bad, "base_model: a/b\ndatasets: [\n").unwrap();
    let (code, _, err) = run(&["import", bad.to_str().unwrap()]);
    assert_eq!(code, 2);
    assert!(err.contains("bad.yml:") && err.contains("invalid YAML"), "{err}");
    let list = d.path().join("list.json");
    std::fs::write(&list, "[1, 2]").unwrap();
    let (code, _, err) = run(&["import", list.to_str().unwrap(), "--from", "trl"]);
    assert_eq!(code, 2);
    assert!(err.contains("list.json: expected a mapping of settings at the top level"), "{err}");
}
