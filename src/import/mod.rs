//! `tuner import`: another tool's training config becomes a tuner recipe. An Axolotl YAML
//! ([`axolotl`]) or a TRL `SFTConfig` / transformers `TrainingArguments` config, JSON or YAML, as
//! `HfArgumentParser` and `trl sft --config` read them ([`trl`]). Each importer fills a [`Draft`]
//! with tuner's canonical keys; whatever it could not carry over is listed with the reason, and
//! [`render`] writes both lists as comments at the top of the TOML.
//!
//! Keys the config leaves out take that tool's default, written out where it differs from tuner's
//! (each importer's header names the version whose defaults it follows).

pub mod axolotl;
pub mod trl;

use anyhow::{Context, Result};
use serde_json::Value;
use std::path::Path;

/// Which tool wrote the config.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Tool {
    /// An Axolotl YAML config.
    Axolotl,
    /// A TRL `SFTConfig` / transformers `TrainingArguments` config (JSON or YAML), with TRL's
    /// `ModelConfig` / `ScriptArguments` keys for the model, LoRA and dataset.
    Trl,
}

impl Tool {
    pub fn name(self) -> &'static str {
        match self {
            Tool::Axolotl => "Axolotl",
            Tool::Trl => "TRL/transformers",
        }
    }
}

/// A recipe in the making.
#[derive(Debug, Default)]
pub struct Draft {
    /// `section → key → value`, tuner's canonical keys.
    pub sections: toml::Table,
    /// What could not be carried over: (their key, why).
    pub dropped: Vec<(String, String)>,
    /// Choices the importer made that the reader should know.
    pub notes: Vec<String>,
}

impl Draft {
    /// Set a dotted tuner key.
    pub fn set(&mut self, key: &str, v: impl Into<toml::Value>) {
        let (section, k) = key.split_once('.').expect("a dotted key");
        let t = self.sections.entry(section).or_insert_with(|| toml::Value::Table(Default::default()));
        if let Some(t) = t.as_table_mut() {
            t.insert(k.to_string(), v.into());
        }
    }

    /// The value set for a dotted tuner key.
    pub fn get(&self, key: &str) -> Option<&toml::Value> {
        let (section, k) = key.split_once('.')?;
        self.sections.get(section)?.get(k)
    }

    pub fn drop_key(&mut self, key: &str, why: impl Into<String>) {
        self.dropped.push((key.to_string(), why.into()));
    }

    pub fn note(&mut self, text: impl Into<String>) {
        self.notes.push(text.into());
    }
}

/// Read a config file: JSON, or YAML (a superset); the top level must be a mapping.
pub fn read_config(path: &Path) -> Result<serde_json::Map<String, Value>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let is_json = path.extension().is_some_and(|e| e == "json");
    let v: Value = if is_json {
        serde_json::from_str(&text)
            .map_err(|e| anyhow::anyhow!("{}:{}: invalid JSON: {e}", path.display(), e.line()))?
    } else {
        serde_yaml_ng::from_str(&text).map_err(|e| {
            let line = e.location().map(|l| format!(":{}", l.line())).unwrap_or_default();
            anyhow::anyhow!("{}{line}: invalid YAML: {e}", path.display())
        })?
    };
    match v {
        Value::Object(m) => Ok(m),
        other => anyhow::bail!("{}: expected a mapping of settings at the top level, found {other}", path.display()),
    }
}

/// Which tool a config is for: Axolotl names `base_model` and `datasets`; TRL and transformers
/// name `model_name_or_path`, `per_device_train_batch_size`, `num_train_epochs`, ….
pub fn detect(map: &serde_json::Map<String, Value>) -> Option<Tool> {
    const AXOLOTL: [&str; 5] = ["base_model", "datasets", "micro_batch_size", "num_epochs", "sequence_len"];
    const TRL: [&str; 6] =
        ["model_name_or_path", "dataset_name", "per_device_train_batch_size", "num_train_epochs", "optim", "use_peft"];
    let count = |keys: &[&str]| keys.iter().filter(|k| map.contains_key(**k)).count();
    match (count(&AXOLOTL), count(&TRL)) {
        (0, 0) => None,
        (a, t) if a >= t => Some(Tool::Axolotl),
        _ => Some(Tool::Trl),
    }
}

/// Import the config at `path` (as `tool`, or as [`detect`] says).
pub fn import(path: &Path, tool: Option<Tool>) -> Result<(Tool, Draft)> {
    let map = read_config(path)?;
    let tool = match tool.or_else(|| detect(&map)) {
        Some(t) => t,
        None => anyhow::bail!(
            "{}: cannot tell which tool this config is for (no `base_model`/`datasets` nor `model_name_or_path`/`per_device_train_batch_size`); pass --from axolotl or --from trl",
            path.display()
        ),
    };
    let draft = match tool {
        Tool::Axolotl => axolotl::import(&map),
        Tool::Trl => trl::import(&map),
    };
    Ok((tool, draft))
}

/// The order sections are written in (the README's).
const SECTION_ORDER: [&str; 9] =
    ["run", "model", "quantization", "lora", "prompt", "dataset", "train", "eval", "export"];

/// The recipe as TOML, with what was not carried over and the notes as comments on top.
pub fn render(draft: &Draft, source: &str, tool: Tool) -> String {
    let mut out = format!("# Imported by `tuner import` from {source} ({} config).\n", tool.name());
    if !draft.dropped.is_empty() {
        out.push_str("#\n# Not carried over:\n");
        for (k, why) in &draft.dropped {
            out.push_str(&format!("#   {k}: {why}\n"));
        }
    }
    if !draft.notes.is_empty() {
        out.push_str("#\n# Notes:\n");
        for n in &draft.notes {
            out.push_str(&format!("#   {n}\n"));
        }
    }
    for name in SECTION_ORDER {
        let Some(t) = draft.sections.get(name).and_then(toml::Value::as_table) else { continue };
        out.push_str(&format!("\n[{name}]\n"));
        out.push_str(&toml::to_string(t).unwrap_or_default());
    }
    out
}

// ---- helpers both importers use ----

/// A number, or a string holding one (Axolotl reads `learning_rate: "2e-4"` so).
pub(crate) fn num(v: &Value) -> Option<f64> {
    v.as_f64().or_else(|| v.as_str().and_then(|s| s.trim().parse().ok()))
}

/// A whole number ≥ 0.
pub(crate) fn uint(v: &Value) -> Option<u64> {
    v.as_u64().or_else(|| num(v).filter(|x| x.fract() == 0.0 && *x >= 0.0).map(|x| x as u64))
}

/// Unset or off: null, false, "", [] or {} (such keys are not reported as left behind).
pub(crate) fn is_unset(v: &Value) -> bool {
    match v {
        Value::Null | Value::Bool(false) => true,
        Value::String(s) => s.is_empty(),
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
        Value::Number(_) | Value::Bool(true) => false,
    }
}

/// A model or dataset named in a config: a local path as written, else a hub repo `hf:ORG/NAME`.
pub(crate) fn source(s: &str) -> String {
    // A file name ends in a data or model extension; a hub name may hold dots (`Qwen2-0.5B`).
    const FILES: [&str; 7] = ["json", "jsonl", "csv", "parquet", "arrow", "gguf", "gz"];
    let file = Path::new(s).extension().is_some_and(|e| FILES.contains(&e.to_string_lossy().as_ref()));
    let local = s.starts_with('/') || s.starts_with('.') || s.starts_with('~') || file;
    if local || s.split('/').count() != 2 {
        s.to_string()
    } else {
        format!("hf:{s}")
    }
}

/// An output folder `a/b/name` → `run.output_dir = "a/b"`, `run.name = "name"`.
pub(crate) fn set_output_dir(d: &mut Draft, dir: &str) {
    let p = Path::new(dir.trim_end_matches('/'));
    if let Some(name) = p.file_name().map(|n| n.to_string_lossy().into_owned()) {
        d.set("run.name", name);
        let parent = p.parent().map(|x| x.to_string_lossy().into_owned()).unwrap_or_default();
        d.set("run.output_dir", if parent.is_empty() { ".".to_string() } else { parent });
    }
}

/// `optimizer`/`optim`: tuner's optimizer for the name, with the note when it is not the same.
pub(crate) fn set_optimizer(d: &mut Draft, key: &str, name: &str) {
    match crate::recipe::Optimizer::from_name(name) {
        Some((o, note)) => {
            d.set("train.optimizer", o.name());
            if let Some(note) = note {
                d.note(format!("{key} = {name:?} {note}"));
            }
        }
        None => d.drop_key(
            key,
            format!("{name:?} has no tuner counterpart; tuner's optimizers are adamw and adamw_8bit (imported as adamw_8bit)"),
        ),
    }
}

/// A learning-rate schedule name (transformers' `SchedulerType`) → `train.lr_scheduler`.
pub(crate) fn set_scheduler(d: &mut Draft, key: &str, name: &str) {
    let tuner = match name {
        "linear" => "linear",
        "cosine" => "cosine",
        "cosine_with_min_lr" => "cosine_with_min_lr",
        "constant_with_warmup" => "constant",
        "constant" => {
            // transformers' "constant" has no warmup at all.
            d.set("train.warmup_steps", 0);
            d.note(format!(
                "{key} = \"constant\" (no warmup in transformers): imported as constant with warmup_steps = 0"
            ));
            "constant"
        }
        other => {
            d.drop_key(
                key,
                format!("{other:?} has no tuner counterpart; tuner has linear, cosine, cosine_with_min_lr and constant (imported as linear)"),
            );
            "linear"
        }
    };
    d.set("train.lr_scheduler", tuner);
}

/// A torch dtype name → `model.dtype`, or None.
pub(crate) fn torch_dtype(s: &str) -> Option<&'static str> {
    match s {
        "bfloat16" | "bf16" => Some("bf16"),
        "float16" | "fp16" | "half" => Some("fp16"),
        "float32" | "fp32" | "float" => Some("fp32"),
        "auto" => Some("auto"),
        _ => None,
    }
}

/// Report every key of `map` not in `used` and not unset: with `reason(key)`, or as unknown.
pub(crate) fn report_rest(
    d: &mut Draft,
    map: &serde_json::Map<String, Value>,
    used: &[&str],
    reason: &dyn Fn(&str) -> Option<&'static str>,
) {
    for (k, v) in map {
        if used.contains(&k.as_str()) || is_unset(v) {
            continue;
        }
        let why = reason(k).unwrap_or("tuner has no such setting");
        d.drop_key(k, format!("{why} (was {})", short(v)));
    }
}

/// A value as it reads in a note: JSON, cut at 60 characters.
pub(crate) fn short(v: &Value) -> String {
    let s = v.to_string();
    if s.chars().count() > 60 {
        format!("{}…", s.chars().take(60).collect::<String>())
    } else {
        s
    }
}
