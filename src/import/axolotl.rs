//! Axolotl YAML → tuner recipe. Follows Axolotl's config schema
//! (`src/axolotl/utils/schemas/{config,training,peft,datasets}.py`, 2025); keys the config leaves
//! out take Axolotl's defaults where tuner's differ: micro_batch_size 1,
//! gradient_accumulation_steps 1, num_epochs 1, sequence_len 512, lr_scheduler cosine,
//! optimizer adamw_torch_fused, weight_decay 0, gradient_checkpointing off, no quantization,
//! train_on_inputs false.
//!
//! Dataset types carried over: `alpaca`, `chat_template` (OpenAI-style `messages` with `role`
//! and `content`), `sharegpt` and `completion` (plain text); the others are listed as not
//! carried over.

use super::{is_unset, num, report_rest, set_optimizer, set_output_dir, set_scheduler, short, source, uint, Draft};
use serde_json::{Map, Value};

/// Import an Axolotl config.
pub fn import(m: &Map<String, Value>) -> Draft {
    let mut d = Draft::default();
    let mut used: Vec<&str> = vec![];
    model(&mut d, m, &mut used);
    lora(&mut d, m, &mut used);
    data(&mut d, m, &mut used);
    train(&mut d, m, &mut used);
    report_rest(&mut d, m, &used, &reason);
    d
}

fn get<'a>(m: &'a Map<String, Value>, used: &mut Vec<&'static str>, key: &'static str) -> Option<&'a Value> {
    used.push(key);
    m.get(key).filter(|v| !v.is_null())
}

/// `base_model`, the dtype and the 4-bit base.
fn model(d: &mut Draft, m: &Map<String, Value>, used: &mut Vec<&'static str>) {
    if let Some(s) = get(m, used, "base_model").and_then(Value::as_str) {
        d.set("model.source", source(s));
    }
    if let Some(r) = get(m, used, "revision_of_model").and_then(Value::as_str) {
        d.set("model.revision", r);
    }
    let bf16 = get(m, used, "bf16");
    let fp16 = get(m, used, "fp16").and_then(Value::as_bool);
    match (bf16, fp16) {
        (Some(Value::String(s)), _) if s == "auto" => d.set("model.dtype", "auto"),
        (Some(Value::Bool(true)), _) => d.set("model.dtype", "bf16"),
        (_, Some(true)) => d.set("model.dtype", "fp16"),
        (Some(Value::Bool(false)), _) => d.set("model.dtype", "fp32"),
        _ => d.note("bf16/fp16 not set: model.dtype = \"auto\" (bf16 where the device has it, else fp32)"),
    }
    let four = get(m, used, "load_in_4bit").and_then(Value::as_bool).unwrap_or(false);
    let eight = get(m, used, "load_in_8bit").and_then(Value::as_bool).unwrap_or(false);
    let kwargs = get(m, used, "bnb_config_kwargs").and_then(Value::as_object);
    if four {
        let q = kwargs.and_then(|k| k.get("bnb_4bit_quant_type")).and_then(Value::as_str).unwrap_or("nf4");
        d.set("quantization.method", if q == "fp4" { "fp4" } else { "nf4" });
        let dq = kwargs.and_then(|k| k.get("bnb_4bit_use_double_quant")).and_then(Value::as_bool).unwrap_or(true);
        d.set("quantization.double_quant", dq);
    } else {
        d.set("quantization.method", "none");
        if eight {
            d.drop_key("load_in_8bit", "tuner has no 8-bit base weights; imported unquantized (quantization.method = \"none\"); load_in_4bit gives QLoRA");
        }
    }
}

/// `adapter`, `lora_*`.
fn lora(d: &mut Draft, m: &Map<String, Value>, used: &mut Vec<&'static str>) {
    match get(m, used, "adapter").and_then(Value::as_str) {
        Some("lora" | "qlora") => {}
        Some(other) => d.drop_key("adapter", format!("{other:?}: tuner trains LoRA adapters (imported as LoRA)")),
        None => d.drop_key(
            "adapter",
            "not set, so Axolotl would fine-tune every weight; tuner trains LoRA adapters (imported as LoRA)",
        ),
    }
    if let Some(r) = get(m, used, "lora_r").and_then(uint) {
        d.set("lora.r", r as i64);
    }
    if let Some(a) = get(m, used, "lora_alpha").and_then(num) {
        d.set("lora.alpha", a);
    }
    d.set("lora.dropout", get(m, used, "lora_dropout").and_then(num).unwrap_or(0.0));
    let linear = get(m, used, "lora_target_linear").and_then(Value::as_bool).unwrap_or(false);
    let modules = get(m, used, "lora_target_modules");
    if linear {
        d.set("lora.target_modules", "all-linear");
    } else if let Some(list) = modules.and_then(Value::as_array) {
        let names: Vec<String> = list.iter().filter_map(Value::as_str).map(str::to_string).collect();
        d.set("lora.target_modules", names);
    } else if let Some(s) = modules.and_then(Value::as_str) {
        d.set("lora.target_modules", s);
    }
    if let Some(b) = get(m, used, "peft_use_rslora").and_then(Value::as_bool) {
        d.set("lora.use_rslora", b);
    }
}

/// `datasets` (the first), `val_set_size`, `chat_template`, `train_on_inputs`.
fn data(d: &mut Draft, m: &Map<String, Value>, used: &mut Vec<&'static str>) {
    let sets = get(m, used, "datasets").and_then(Value::as_array).cloned().unwrap_or_default();
    let chat_template = get(m, used, "chat_template").and_then(Value::as_str).map(str::to_string);
    for (i, extra) in sets.iter().enumerate().skip(1) {
        d.drop_key(
            &format!("datasets[{i}]"),
            format!(
                "tuner reads one dataset (was {}); add it to a mixture by hand ([[dataset.sources]] with a weight)",
                short(extra)
            ),
        );
    }
    if let Some(ds) = sets.first().and_then(Value::as_object) {
        dataset(d, ds, chat_template.as_deref());
    }
    let responses_only = !get(m, used, "train_on_inputs").and_then(Value::as_bool).unwrap_or(false);
    d.set("prompt.train_on_responses_only", responses_only);
    match get(m, used, "val_set_size").and_then(num) {
        Some(x) if x > 0.0 && x < 1.0 => d.set("dataset.eval_ratio", x),
        Some(x) if x >= 1.0 => {
            d.drop_key("val_set_size", format!("{x} rows: tuner holds out a fraction (dataset.eval_ratio)"))
        }
        _ => {}
    }
}

/// One entry of `datasets`.
fn dataset(d: &mut Draft, ds: &Map<String, Value>, chat_template: Option<&str>) {
    let files = ds.get("data_files").and_then(|f| f.as_str().or_else(|| f.get(0).and_then(Value::as_str)));
    if let Some(p) = files.or_else(|| ds.get("path").and_then(Value::as_str)) {
        d.set("dataset.source", if files.is_some() { p.to_string() } else { source(p) });
    }
    if let Some(s) = ds.get("split").and_then(Value::as_str) {
        d.set("dataset.split", s);
    }
    if let Some(s) = ds.get("name").and_then(Value::as_str) {
        d.set("dataset.config", s);
    }
    let mut known = vec!["path", "data_files", "split", "name", "type", "ds_type"];
    match ds.get("type").and_then(Value::as_str) {
        Some("alpaca") => d.set("prompt.template", "alpaca"),
        Some("chat_template") => {
            known.extend(["field_messages", "message_field_role", "message_field_content", "roles"]);
            chat(d, ds, chat_template);
        }
        // Axolotl's legacy ShareGPT type: `conversations` of {from, value}, through the chat template.
        Some("sharegpt") => {
            d.set("dataset.format", "sharegpt");
            d.set("prompt.template", if chat_template == Some("chatml") { "chatml" } else { "chat" });
        }
        // Raw text, trained whole; the column is `field` (default "text").
        Some("completion") => {
            known.push("field");
            d.set("dataset.format", "text");
            d.set("dataset.text_field", ds.get("field").and_then(Value::as_str).unwrap_or("text"));
        }
        Some(other) => d.drop_key(
            "datasets[0].type",
            format!("{other:?}: tuner reads alpaca, chat messages (`chat_template`), ShareGPT and plain text (`completion`) rows"),
        ),
        None => d.drop_key("datasets[0].type", "not set; tuner's default prompt.template = \"alpaca\" stands"),
    }
    for (k, v) in ds.iter().filter(|(k, v)| !known.contains(&k.as_str()) && !is_unset(v)) {
        d.drop_key(&format!("datasets[0].{k}"), format!("no tuner counterpart (was {})", short(v)));
    }
}

/// A `chat_template` dataset: OpenAI-style messages.
fn chat(d: &mut Draft, ds: &Map<String, Value>, chat_template: Option<&str>) {
    match chat_template {
        Some("chatml") => d.set("prompt.template", "chatml"),
        None | Some("tokenizer_default") => d.set("prompt.template", "chat"),
        Some(name) => {
            d.set("prompt.template", "chat");
            d.note(format!("chat_template = {name:?}: tuner applies the tokenizer's own chat template (prompt.template = \"chat\")"));
        }
    }
    if let Some(f) = ds.get("field_messages").and_then(Value::as_str) {
        d.set("prompt.messages_field", f);
    }
    for (k, want) in [("message_field_role", "role"), ("message_field_content", "content")] {
        if let Some(f) = ds.get(k).and_then(Value::as_str).filter(|f| *f != want) {
            d.drop_key(&format!("datasets[0].{k}"), format!("{f:?}: tuner reads each message's `{want}`"));
        }
    }
    if let Some(roles) = ds.get("roles").and_then(Value::as_object) {
        let identity = roles.iter().all(|(k, v)| v.as_array().is_some_and(|a| a.len() == 1 && a[0] == k.as_str()));
        if !identity {
            d.drop_key(
                "datasets[0].roles",
                format!("tuner reads the roles as written (was {})", short(&Value::Object(roles.clone()))),
            );
        }
    }
}

/// The training loop.
fn train(d: &mut Draft, m: &Map<String, Value>, used: &mut Vec<&'static str>) {
    d.set("train.max_seq_length", get(m, used, "sequence_len").and_then(uint).unwrap_or(512) as i64);
    d.set("train.micro_batch_size", get(m, used, "micro_batch_size").and_then(uint).unwrap_or(1) as i64);
    d.set(
        "train.gradient_accumulation_steps",
        get(m, used, "gradient_accumulation_steps").and_then(uint).unwrap_or(1) as i64,
    );
    let epochs = get(m, used, "num_epochs").and_then(num);
    match get(m, used, "max_steps").and_then(uint).filter(|s| *s > 0) {
        Some(s) => {
            d.set("train.max_steps", s as i64);
            if let Some(e) = epochs {
                d.drop_key("num_epochs", format!("{e}: max_steps takes precedence, as in transformers"));
            }
        }
        None => d.set("train.epochs", epochs.unwrap_or(1.0)),
    }
    if let Some(lr) = get(m, used, "learning_rate").and_then(num) {
        d.set("train.learning_rate", lr);
    }
    let warmup_steps = get(m, used, "warmup_steps").and_then(uint);
    let warmup_ratio = get(m, used, "warmup_ratio").and_then(num);
    match (warmup_steps, warmup_ratio) {
        (Some(s), _) => d.set("train.warmup_steps", s as i64),
        (None, Some(r)) => d.set("train.warmup_ratio", r),
        (None, None) => {
            d.note("no warmup_steps/warmup_ratio: Axolotl picks a default warmup; tuner's warmup_steps = 5 stands")
        }
    }
    if let (Some(s), Some(r)) = (warmup_steps, warmup_ratio) {
        d.drop_key("warmup_ratio", format!("{r}: warmup_steps ({s}) takes precedence"));
    }
    let sched = get(m, used, "lr_scheduler").and_then(Value::as_str).unwrap_or("cosine").to_string();
    set_scheduler(d, "lr_scheduler", &sched);
    if let Some(r) = get(m, used, "cosine_min_lr_ratio").and_then(num) {
        if sched == "cosine" {
            // Axolotl's cosine with a floor: the same formula as transformers' cosine_with_min_lr.
            d.set("train.lr_scheduler", "cosine_with_min_lr");
            d.set("train.min_lr_rate", r);
        } else {
            d.drop_key("cosine_min_lr_ratio", format!("{r}: only read with lr_scheduler = cosine"));
        }
    }
    let opt = get(m, used, "optimizer").and_then(Value::as_str).unwrap_or("adamw_torch_fused").to_string();
    set_optimizer(d, "optimizer", &opt);
    d.set("train.weight_decay", get(m, used, "weight_decay").and_then(num).unwrap_or(0.0));
    if let Some(g) = get(m, used, "max_grad_norm").and_then(num) {
        d.set("train.max_grad_norm", g);
    }
    match get(m, used, "gradient_checkpointing") {
        Some(Value::Bool(b)) => d.set("train.gradient_checkpointing", *b),
        Some(other) => {
            d.set("train.gradient_checkpointing", true);
            d.drop_key(
                "gradient_checkpointing",
                format!(
                    "{}: tuner checkpoints each layer in device memory (train.offload_activations offloads)",
                    short(other)
                ),
            );
        }
        None => d.set("train.gradient_checkpointing", false),
    }
    d.set("train.packing", get(m, used, "sample_packing").and_then(Value::as_bool).unwrap_or(false));
    for (theirs, ours) in [
        ("logging_steps", "train.logging_steps"),
        ("save_steps", "train.save_steps"),
        ("save_total_limit", "train.keep_checkpoints"),
    ] {
        if let Some(n) = get(m, used, theirs).and_then(uint).filter(|n| *n > 0) {
            d.set(ours, n as i64);
        }
    }
    if let Some(s) = get(m, used, "seed").and_then(uint) {
        d.set("run.seed", s as i64);
    }
    if let Some(o) = get(m, used, "output_dir").and_then(Value::as_str) {
        set_output_dir(d, o);
    }
    for k in ["eval_max_new_tokens", "eval_table_max_new_tokens"] {
        if let Some(n) = get(m, used, k).and_then(uint).filter(|n| *n > 0) {
            d.set("eval.max_new_tokens", n as i64);
        }
    }
}

/// Why an Axolotl key with no tuner counterpart is left behind.
fn reason(key: &str) -> Option<&'static str> {
    Some(match key {
        "base_model_config" | "tokenizer_config" => "tuner reads the config and tokenizer from model.source",
        "model_type" | "is_mistral_derived_model" | "is_llama_derived_model" | "is_qwen_derived_model" => {
            "tuner reads the architecture from the model's config.json"
        }
        "tokenizer_type" => "tuner reads the model's own tokenizer.json",
        "trust_remote_code" => "tuner runs its own implementation of each supported family",
        "dataset_prepared_path" => "tuner keeps the tokenized shards in the run folder",
        "flash_attention" | "xformers_attention" | "sdp_attention" | "s2_attention" => {
            "tuner picks its attention path itself (packed varlen passes on CUDA: train.coalesce)"
        }
        "pad_to_sequence_len" => "tuner pads each batch to its longest row (train.pad_to_multiple_of)",
        "special_tokens" | "tokens" => "tuner uses the tokenizer's own special tokens",
        "evals_per_epoch" | "eval_steps" | "eval_strategy" | "eval_table_size" | "eval_sample_packing" => {
            "tuner evaluates once, after training (the evaluate stage)"
        }
        "saves_per_epoch" | "save_strategy" | "save_first_step" => {
            "tuner saves a checkpoint every train.save_steps steps"
        }
        "tf32" => "tuner leaves TF32 to libtorch's default",
        "group_by_length" => "tuner does not group rows by length",
        "lora_model_dir" => "tuner starts the adapters afresh",
        "lora_modules_to_save" => "tuner trains LoRA adapters only (no full embed_tokens/lm_head)",
        "lora_fan_in_fan_out" => "tuner's LoRA layout is peft's default",
        "deepspeed" | "fsdp" | "fsdp_config" | "fsdp_version" => "tuner trains data-parallel only (train.gpus)",
        "early_stopping_patience" => "tuner trains the set number of steps",
        "resume_from_checkpoint" | "auto_resume_from_checkpoints" => {
            "tuner resumes from the run folder's checkpoints itself"
        }
        "hub_model_id" | "hub_strategy" | "push_dataset_to_hub" | "hf_use_auth_token" => "tuner does not upload",
        "strict" | "debug" | "local_rank" => "an Axolotl runtime switch",
        k if k.starts_with("wandb_") || k.starts_with("mlflow_") || k.starts_with("comet_") => {
            "tuner logs to metrics.jsonl and loss.png in the run folder"
        }
        _ => return None,
    })
}
