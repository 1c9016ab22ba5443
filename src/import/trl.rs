//! TRL `SFTConfig` / transformers `TrainingArguments` config → tuner recipe: the flat JSON or YAML
//! that `HfArgumentParser.parse_json_file` and `trl sft --config` read, with TRL's
//! `ModelConfig` (model, LoRA, 4-bit) and `ScriptArguments` (dataset) keys beside the training
//! arguments. Keys left out take TRL 1.x `SFTConfig`'s defaults when the config names any TRL key
//! (learning_rate 2e-5, logging_steps 10, gradient_checkpointing on, bf16 unless fp16,
//! max_length 1024), else transformers 5.x `TrainingArguments`' (learning_rate 5e-5,
//! logging_steps 500, gradient_checkpointing off, fp32); both: per_device_train_batch_size 8,
//! gradient_accumulation_steps 1, num_train_epochs 3, warmup 0, weight_decay 0, linear schedule,
//! optim adamw_torch_fused, seed 42. LoRA: TRL `ModelConfig`'s defaults (r 16, alpha 32,
//! dropout 0.05), or peft `LoraConfig`'s (r 8, alpha 8, dropout 0) without TRL keys; no
//! quantization unless `load_in_4bit` (then nf4 unless `bnb_4bit_quant_type`, nested
//! quantization only when asked).

use super::{num, report_rest, set_optimizer, set_output_dir, set_scheduler, short, source, torch_dtype, uint, Draft};
use serde_json::{Map, Value};

/// Keys only TRL's parser knows: their presence selects TRL's defaults over transformers'.
const TRL_KEYS: [&str; 10] = [
    "model_name_or_path",
    "dataset_name",
    "use_peft",
    "max_length",
    "max_seq_length",
    "packing",
    "assistant_only_loss",
    "completion_only_loss",
    "dataset_text_field",
    "lora_r",
];

/// Import a TRL / transformers config.
pub fn import(m: &Map<String, Value>) -> Draft {
    let mut d = Draft::default();
    let mut used: Vec<&str> = vec![];
    let trl = TRL_KEYS.iter().any(|k| m.contains_key(*k));
    model(&mut d, m, &mut used, trl);
    lora(&mut d, m, &mut used, trl);
    data(&mut d, m, &mut used);
    train(&mut d, m, &mut used, trl);
    schedule(&mut d, m, &mut used);
    report_rest(&mut d, m, &used, &reason);
    d
}

fn get<'a>(m: &'a Map<String, Value>, used: &mut Vec<&'static str>, key: &'static str) -> Option<&'a Value> {
    used.push(key);
    m.get(key).filter(|v| !v.is_null())
}

/// The model, its dtype and the 4-bit base.
fn model(d: &mut Draft, m: &Map<String, Value>, used: &mut Vec<&'static str>, trl: bool) {
    if let Some(s) = get(m, used, "model_name_or_path").and_then(Value::as_str) {
        d.set("model.source", source(s));
    }
    if let Some(s) = get(m, used, "model_revision").and_then(Value::as_str) {
        d.set("model.revision", s);
    }
    let bf16 = get(m, used, "bf16").and_then(Value::as_bool);
    let fp16 = get(m, used, "fp16").and_then(Value::as_bool).unwrap_or(false);
    let named = get(m, used, "dtype").or_else(|| get(m, used, "torch_dtype")).and_then(Value::as_str);
    let compute = get(m, used, "bnb_4bit_compute_dtype").and_then(Value::as_str);
    let dtype = match (named.and_then(torch_dtype), bf16, fp16) {
        (Some(t), _, _) if t != "auto" => t,
        (_, Some(true), _) => "bf16",
        (_, _, true) => "fp16",
        // SFTConfig: bf16 unless fp16; TrainingArguments: fp32.
        (_, None, false) if trl => "bf16",
        _ => compute.and_then(torch_dtype).unwrap_or("fp32"),
    };
    d.set("model.dtype", dtype);
    let four = get(m, used, "load_in_4bit").and_then(Value::as_bool).unwrap_or(false);
    let quant = get(m, used, "bnb_4bit_quant_type").and_then(Value::as_str).unwrap_or("nf4");
    let nested = get(m, used, "use_bnb_nested_quant")
        .or_else(|| get(m, used, "bnb_4bit_use_double_quant"))
        .and_then(Value::as_bool)
        .unwrap_or(false);
    if four {
        d.set("quantization.method", if quant == "fp4" { "fp4" } else { "nf4" });
        d.set("quantization.double_quant", nested);
    } else {
        d.set("quantization.method", "none");
    }
    if get(m, used, "load_in_8bit").and_then(Value::as_bool) == Some(true) {
        d.drop_key("load_in_8bit", "tuner has no 8-bit base weights; imported unquantized (load_in_4bit gives QLoRA)");
    }
}

/// TRL `ModelConfig`'s LoRA keys (peft's `r` / `target_modules` also read).
fn lora(d: &mut Draft, m: &Map<String, Value>, used: &mut Vec<&'static str>, trl: bool) {
    let peft = get(m, used, "use_peft").and_then(Value::as_bool).unwrap_or(false);
    const LORA_KEYS: [&str; 6] = ["lora_r", "r", "lora_alpha", "lora_dropout", "lora_target_modules", "target_modules"];
    let has_lora = LORA_KEYS.iter().any(|k| m.contains_key(*k));
    if !peft && trl {
        d.drop_key(
            "use_peft",
            "not set, so TRL would fine-tune every weight; tuner trains LoRA adapters (imported as LoRA)",
        );
    } else if !peft && !has_lora {
        d.note("no LoRA settings: peft LoraConfig's defaults (r 8, lora_alpha 8, dropout 0) are written");
    }
    // TRL's ModelConfig defaults, or peft LoraConfig's for a plain transformers config.
    let (r0, alpha0, dropout0) = if trl { (16, 32.0, 0.05) } else { (8, 8.0, 0.0) };
    let r = get(m, used, "lora_r").or_else(|| get(m, used, "r")).and_then(uint).unwrap_or(r0);
    d.set("lora.r", r as i64);
    d.set("lora.alpha", get(m, used, "lora_alpha").and_then(num).unwrap_or(alpha0));
    d.set("lora.dropout", get(m, used, "lora_dropout").and_then(num).unwrap_or(dropout0));
    match get(m, used, "lora_target_modules").or_else(|| get(m, used, "target_modules")) {
        Some(Value::Array(list)) if list.len() == 1 && list[0] == "all-linear" => d.set("lora.target_modules", "all-linear"),
        Some(Value::Array(list)) => {
            d.set("lora.target_modules", list.iter().filter_map(Value::as_str).map(str::to_string).collect::<Vec<_>>())
        }
        Some(Value::String(s)) => d.set("lora.target_modules", s.as_str()),
        _ => d.note("no lora_target_modules: peft picks per architecture (q_proj and v_proj on Llama-style models); tuner's default, all seven projections, is used"),
    }
    if let Some(b) = get(m, used, "use_rslora").and_then(Value::as_bool) {
        d.set("lora.use_rslora", b);
    }
}

/// TRL `ScriptArguments`' dataset keys and the loss masking.
fn data(d: &mut Draft, m: &Map<String, Value>, used: &mut Vec<&'static str>) {
    match get(m, used, "dataset_name").and_then(Value::as_str) {
        Some(s) => d.set("dataset.source", source(s)),
        None => d.note("no dataset_name: set dataset.source before running"),
    }
    if let Some(s) = get(m, used, "dataset_config").and_then(Value::as_str) {
        d.set("dataset.config", s);
    }
    if let Some(s) = get(m, used, "dataset_train_split").and_then(Value::as_str) {
        d.set("dataset.split", s);
    }
    if let Some(f) = get(m, used, "dataset_text_field").and_then(Value::as_str).filter(|f| *f != "text") {
        d.set("dataset.text_field", f);
        d.note(format!("dataset_text_field = {f:?}: dataset.text_field, so rows are read as plain text trained whole; remove it for a `messages` dataset"));
    }
    d.set("prompt.template", "chat");
    d.note("the dataset's format is not in the config: prompt.template = \"chat\" (a `messages` column, as TRL's conversational datasets); use \"alpaca\" for instruction/input/output rows");
    let assistant_only = get(m, used, "assistant_only_loss").and_then(Value::as_bool).unwrap_or(false);
    d.set("prompt.train_on_responses_only", assistant_only);
    if get(m, used, "completion_only_loss").and_then(Value::as_bool) == Some(true) && !assistant_only {
        d.set("prompt.train_on_responses_only", true);
    }
    // eval_strategy itself is reported with the keys left behind.
    let eval = m.get("eval_strategy").and_then(Value::as_str).is_some_and(|s| s != "no");
    if let Some(s) = get(m, used, "dataset_test_split").and_then(Value::as_str).filter(|_| eval) {
        d.drop_key(
            "dataset_test_split",
            format!("{s:?}: tuner's eval set is a fraction (dataset.eval_ratio) or a file (dataset.eval_source)"),
        );
    }
}

/// Batching, length, steps, optimizer and bookkeeping.
fn train(d: &mut Draft, m: &Map<String, Value>, used: &mut Vec<&'static str>, trl: bool) {
    let len = get(m, used, "max_length").or_else(|| get(m, used, "max_seq_length")).and_then(uint);
    match (len, trl) {
        (Some(n), _) => d.set("train.max_seq_length", n as i64),
        (None, true) => d.set("train.max_seq_length", 1024),
        (None, false) => {}
    }
    d.set("train.micro_batch_size", get(m, used, "per_device_train_batch_size").and_then(uint).unwrap_or(8) as i64);
    d.set(
        "train.gradient_accumulation_steps",
        get(m, used, "gradient_accumulation_steps").and_then(uint).unwrap_or(1) as i64,
    );
    let epochs = get(m, used, "num_train_epochs").and_then(num);
    match get(m, used, "max_steps").and_then(num).filter(|s| *s > 0.0) {
        Some(s) => {
            d.set("train.max_steps", s as i64);
            if let Some(e) = epochs {
                d.drop_key("num_train_epochs", format!("{e}: max_steps takes precedence"));
            }
        }
        None => d.set("train.epochs", epochs.unwrap_or(3.0)),
    }
    let default_lr = if trl { 2e-5 } else { 5e-5 };
    d.set("train.learning_rate", get(m, used, "learning_rate").and_then(num).unwrap_or(default_lr));
    d.set("train.weight_decay", get(m, used, "weight_decay").and_then(num).unwrap_or(0.0));
    d.set("train.max_grad_norm", get(m, used, "max_grad_norm").and_then(num).unwrap_or(1.0));
    let optim = get(m, used, "optim").and_then(Value::as_str).unwrap_or("adamw_torch_fused").to_string();
    set_optimizer(d, "optim", &optim);
    let gc = get(m, used, "gradient_checkpointing").and_then(Value::as_bool).unwrap_or(trl);
    d.set("train.gradient_checkpointing", gc);
    d.set("train.packing", get(m, used, "packing").and_then(Value::as_bool).unwrap_or(false));
    let logging = get(m, used, "logging_steps").and_then(uint).unwrap_or(if trl { 10 } else { 500 });
    d.set("train.logging_steps", logging.max(1) as i64);
    d.set("train.save_steps", get(m, used, "save_steps").and_then(uint).unwrap_or(500).max(1) as i64);
    if let Some(n) = get(m, used, "save_total_limit").and_then(uint).filter(|n| *n > 0) {
        d.set("train.keep_checkpoints", n as i64);
    }
    d.set("run.seed", get(m, used, "seed").and_then(uint).unwrap_or(42) as i64);
    if let Some(o) = get(m, used, "output_dir").and_then(Value::as_str) {
        set_output_dir(d, o);
    }
    if let Some(n) = get(m, used, "run_name").and_then(Value::as_str) {
        d.set("run.name", n);
    }
    if let Some(n) = get(m, used, "per_device_eval_batch_size").and_then(uint).filter(|n| *n > 0) {
        d.set("eval.batch_size", n as i64);
    }
}

/// Warmup and the learning-rate schedule (with `lr_scheduler_kwargs`' floor).
fn schedule(d: &mut Draft, m: &Map<String, Value>, used: &mut Vec<&'static str>) {
    // transformers 5 reads a warmup_steps below 1 as a ratio; 4.x had warmup_ratio.
    let steps = get(m, used, "warmup_steps").and_then(num).unwrap_or(0.0);
    let ratio = get(m, used, "warmup_ratio").and_then(num).filter(|r| *r > 0.0);
    match (steps, ratio) {
        (s, _) if s >= 1.0 => {
            d.set("train.warmup_steps", s as i64);
            if let Some(r) = ratio {
                d.drop_key("warmup_ratio", format!("{r}: warmup_steps takes precedence, as in transformers"));
            }
        }
        (s, _) if s > 0.0 => d.set("train.warmup_ratio", s),
        (_, Some(r)) => d.set("train.warmup_ratio", r),
        _ => d.set("train.warmup_steps", 0),
    }
    let name = get(m, used, "lr_scheduler_type").and_then(Value::as_str).unwrap_or("linear").to_string();
    set_scheduler(d, "lr_scheduler_type", &name);
    let Some(kwargs) = get(m, used, "lr_scheduler_kwargs").and_then(Value::as_object) else { return };
    for (k, v) in kwargs {
        match (k.as_str(), num(v)) {
            ("min_lr", Some(x)) if name == "cosine_with_min_lr" => d.set("train.min_lr", x),
            ("min_lr_rate", Some(x)) if name == "cosine_with_min_lr" => d.set("train.min_lr_rate", x),
            // Half a cosine wave, tuner's only shape.
            ("num_cycles", Some(x)) if x == 0.5 && name.starts_with("cosine") => {}
            _ => d.drop_key(
                &format!("lr_scheduler_kwargs.{k}"),
                format!("not read by tuner's {name} schedule (was {})", short(v)),
            ),
        }
    }
}

/// Why a TRL / transformers key with no tuner counterpart is left behind.
fn reason(key: &str) -> Option<&'static str> {
    Some(match key {
        "report_to" | "logging_dir" | "logging_first_step" | "logging_strategy" => {
            "tuner logs to metrics.jsonl and loss.png in the run folder"
        }
        "push_to_hub" | "hub_model_id" | "hub_strategy" | "hub_token" | "hub_private_repo" => "tuner does not upload",
        "eos_token" | "pad_token" | "chat_template_path" => {
            "tuner uses the tokenizer's own special tokens and template"
        }
        "eval_steps" | "eval_strategy" | "load_best_model_at_end" | "metric_for_best_model" => {
            "tuner evaluates once, after training (the evaluate stage)"
        }
        "save_strategy" | "overwrite_output_dir" => {
            "tuner saves a checkpoint every train.save_steps steps into the run folder"
        }
        "attn_implementation" | "use_liger_kernel" | "padding_free" | "torch_compile" | "tf32" => {
            "tuner picks its kernels and attention path itself (train.cuda_kernels, train.coalesce)"
        }
        "deepspeed" | "fsdp" | "fsdp_config" | "ddp_find_unused_parameters" => {
            "tuner trains data-parallel only (train.gpus)"
        }
        "dataset_num_proc" | "dataloader_num_workers" | "remove_unused_columns" | "dataset_kwargs" => {
            "tuner's tokenize stage has its own threads (`tuner run --threads`)"
        }
        "trust_remote_code" => "tuner runs its own implementation of each supported family",
        "do_train" | "do_eval" | "resume_from_checkpoint" => {
            "tuner runs the stages in order and resumes from the run folder"
        }
        "lora_task_type" | "task_type" | "bias" | "lora_modules_to_save" => {
            "tuner trains causal-LM LoRA adapters without biases or extra modules"
        }
        "adam_beta1" | "adam_beta2" | "adam_epsilon" => {
            "tuner's AdamW uses betas (0.9, 0.999) and eps 1e-8 (transformers' defaults)"
        }
        _ => return None,
    })
}
