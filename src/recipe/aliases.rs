//! Other tools' key names, read as tuner's: peft's `LoraConfig`, transformers'
//! `TrainingArguments` and `BitsAndBytesConfig`, TRL's `SFTConfig` / `ModelConfig` and Axolotl's
//! YAML keys. [`ALIASES`] is the one table: which name, in which section, sets which tuner key and
//! how its value converts. `recipe::load` calls [`resolve`] on the raw TOML before any check, so
//! the rest of tuner (and `recipe.resolved.toml`) only sees the canonical keys; an alias given
//! together with its canonical key, or two aliases that disagree, is a located error.
//! `validate` asks [`hint`] what an unknown key means (an alias written in another section, a key
//! of another section, or a near miss of an alias).

use super::diagnostic::{did_you_mean, section_keys, Diagnostic, Locations};
use toml::Value;

/// How an alias's value becomes the tuner key's value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Convert {
    /// The same value.
    Same,
    /// transformers' `bf16` / `fp16` flags: `true` sets `model.dtype` to this; `false` is only
    /// read next to the other flag set to `true`.
    DtypeFlag(&'static str),
    /// A torch dtype name (`"bfloat16"`, `"float16"`, `"float32"`) → `model.dtype`.
    TorchDtype,
    /// `load_in_4bit`: `true` → `"nf4"` (unless `bnb_4bit_quant_type` says which), `false` → `"none"`.
    LoadIn4bit,
    /// `bnb_4bit_quant_type`: `"nf4"` or `"fp4"`.
    QuantType,
}

/// One other tool's name for a tuner key.
#[derive(Debug, Clone, Copy)]
pub struct Alias {
    /// The name as the other tool spells it.
    pub name: &'static str,
    /// The recipe section it is read in (where that tool's users would write it).
    pub section: &'static str,
    /// The tuner key it sets, dotted.
    pub key: &'static str,
    /// Whose name it is.
    pub from: &'static str,
    pub convert: Convert,
}

const fn a(name: &'static str, section: &'static str, key: &'static str, from: &'static str) -> Alias {
    Alias { name, section, key, from, convert: Convert::Same }
}

const fn c(
    name: &'static str,
    section: &'static str,
    key: &'static str,
    from: &'static str,
    convert: Convert,
) -> Alias {
    Alias { name, section, key, from, convert }
}

/// Every alias. Names that tuner already spells the same way (`learning_rate`, `warmup_steps`,
/// `warmup_ratio`, `max_steps`, `r`, `target_modules`, …) need no entry.
pub const ALIASES: &[Alias] = &[
    a("lora_alpha", "lora", "lora.alpha", "peft"),
    a("lora_dropout", "lora", "lora.dropout", "peft"),
    a("lora_r", "lora", "lora.r", "TRL/Axolotl"),
    a("lora_target_modules", "lora", "lora.target_modules", "TRL/Axolotl"),
    a("per_device_train_batch_size", "train", "train.micro_batch_size", "transformers"),
    a("num_train_epochs", "train", "train.epochs", "transformers"),
    a("num_epochs", "train", "train.epochs", "Axolotl"),
    a("optim", "train", "train.optimizer", "transformers"),
    a("lr_scheduler_type", "train", "train.lr_scheduler", "transformers"),
    a("max_length", "train", "train.max_seq_length", "TRL"),
    a("sequence_len", "train", "train.max_seq_length", "Axolotl"),
    a("sample_packing", "train", "train.packing", "Axolotl"),
    a("save_total_limit", "train", "train.keep_checkpoints", "transformers"),
    a("seed", "train", "run.seed", "transformers"),
    a("per_device_eval_batch_size", "train", "eval.batch_size", "transformers"),
    c("bf16", "train", "model.dtype", "transformers", Convert::DtypeFlag("bf16")),
    c("fp16", "train", "model.dtype", "transformers", Convert::DtypeFlag("fp16")),
    c("load_in_4bit", "quantization", "quantization.method", "transformers", Convert::LoadIn4bit),
    c("bnb_4bit_quant_type", "quantization", "quantization.method", "transformers", Convert::QuantType),
    a("bnb_4bit_use_double_quant", "quantization", "quantization.double_quant", "transformers"),
    c("bnb_4bit_compute_dtype", "quantization", "model.dtype", "transformers", Convert::TorchDtype),
];

/// The alias `name`, wherever it is read.
pub fn lookup(name: &str) -> Option<&'static Alias> {
    ALIASES.iter().find(|a| a.name == name)
}

/// `lora_alpha` (peft's name for `lora.alpha`)
fn describe(a: &Alias) -> String {
    let whose = if a.from.ends_with('s') { format!("{}'", a.from) } else { format!("{}'s", a.from) };
    format!("`{}` ({whose} name for `{}`)", a.name, a.key)
}

/// An alias's value as the tuner key's value; Ok(None) when it sets nothing by itself.
fn convert(a: &Alias, v: &Value, section: &toml::Table) -> Result<Option<Value>, String> {
    let s = |x: &str| Ok(Some(Value::String(x.to_string())));
    match a.convert {
        Convert::Same => Ok(Some(v.clone())),
        Convert::DtypeFlag(dtype) => {
            let other = if dtype == "bf16" { "fp16" } else { "bf16" };
            match (v.as_bool(), section.get(other).and_then(Value::as_bool)) {
                (None, _) => Err(format!("expected true or false, found {v}")),
                (Some(true), Some(true)) => Err(format!("`bf16` and `fp16` are both true; set model.dtype = \"{dtype}\" or \"{other}\"")),
                (Some(true), _) => s(dtype),
                (Some(false), Some(true)) => Ok(None),
                (Some(false), _) => Err(format!(
                    "`{} = false` does not say which dtype to use; set model.dtype (\"auto\", \"bf16\", \"fp16\" or \"fp32\")",
                    a.name
                )),
            }
        }
        Convert::TorchDtype => match v.as_str() {
            Some("bfloat16" | "bf16") => s("bf16"),
            Some("float16" | "fp16" | "half") => s("fp16"),
            Some("float32" | "fp32" | "float") => s("fp32"),
            _ => Err(format!("expected \"bfloat16\", \"float16\" or \"float32\", found {v}")),
        },
        Convert::LoadIn4bit => match (v.as_bool(), section.contains_key("bnb_4bit_quant_type")) {
            (None, _) => Err(format!("expected true or false, found {v}")),
            (Some(true), true) => Ok(None),
            (Some(true), false) => s("nf4"),
            (Some(false), true) => {
                Err("`load_in_4bit = false` and `bnb_4bit_quant_type` disagree; drop one (false: quantization.method = \"none\")".into())
            }
            (Some(false), false) => s("none"),
        },
        Convert::QuantType => match v.as_str() {
            Some(q @ ("nf4" | "fp4")) => s(q),
            _ => Err(format!("expected \"nf4\" or \"fp4\", found {v}")),
        },
    }
}

/// Replace every alias written in its own section by the tuner key it names (in whichever section
/// that is), carrying its location over. Problems go to `out`; the alias is dropped either way.
pub fn resolve(table: &mut toml::Table, locs: &mut Locations, out: &mut Vec<Diagnostic>) {
    let loc = |locs: &Locations, key: &str| locs.get(key).cloned().unwrap_or_default();
    // (tuner key, value, the alias's dotted name)
    let mut found: Vec<(&'static Alias, Option<Value>, String)> = vec![];
    for (section, body) in table.iter_mut() {
        let (Some(keys), Some(body)) = (section_keys(section), body.as_table_mut()) else { continue };
        let names: Vec<String> = body.keys().filter(|k| !keys.contains(&k.as_str())).cloned().collect();
        for name in names {
            let Some(a) = lookup(&name).filter(|a| a.section == section) else { continue };
            let dotted = format!("{section}.{name}");
            match convert(a, &body[name.as_str()], body) {
                Ok(v) => found.push((a, v, dotted)),
                Err(msg) => out.push(Diagnostic { location: loc(locs, &dotted), text: format!("{dotted}: {msg}") }),
            }
        }
        body.retain(|k, _| keys.contains(&k) || lookup(k).is_none_or(|a| a.section != section));
    }
    let mut set_by: Vec<(&str, Value, String)> = vec![];
    for (a, v, dotted) in found {
        let Some(v) = v else { continue };
        let (s, k) = a.key.split_once('.').unwrap_or(("", a.key));
        let sect = table.entry(s.to_string()).or_insert_with(|| Value::Table(Default::default()));
        let Some(sect) = sect.as_table_mut() else { continue };
        let here = loc(locs, &dotted);
        if let Some((_, prev, by)) = set_by.iter().find(|(key, _, _)| *key == a.key) {
            if *prev != v {
                let text = format!(
                    "{dotted}: {} sets {} = {v}, but `{by}` ({}) sets it to {prev}; keep one",
                    describe(a),
                    a.key,
                    loc(locs, by)
                );
                out.push(Diagnostic { location: here, text });
            }
            continue;
        }
        if sect.contains_key(k) {
            let text = format!(
                "{dotted}: {} and `{}` ({}) are both set; keep one (tuner writes `{}`)",
                describe(a),
                a.key,
                loc(locs, a.key),
                a.key
            );
            out.push(Diagnostic { location: here, text });
            continue;
        }
        sect.insert(k.to_string(), v.clone());
        locs.insert(a.key.to_string(), here);
        set_by.push((a.key, v, dotted));
    }
}

/// What an unknown key `key` in `section` ("" at the top level) may mean, as a message tail
/// ("; …"): an alias written outside its section, a key of another section, or a near miss of an
/// alias of this section.
pub fn hint(section: &str, key: &str) -> Option<String> {
    const SECTIONS: [&str; 9] =
        ["run", "model", "quantization", "lora", "prompt", "dataset", "train", "eval", "export"];
    let owners: Vec<String> = SECTIONS
        .iter()
        .filter(|s| **s != section && section_keys(s).is_some_and(|keys| keys.contains(&key)))
        .map(|s| format!("[{s}]"))
        .collect();
    if !owners.is_empty() {
        return Some(format!("; `{key}` is a key of {}: move it there", owners.join(" and ")));
    }
    if let Some(a) = lookup(key).filter(|a| a.section != section) {
        return Some(format!("; {} is read in [{}]: move it there", describe(a), a.section));
    }
    let near = did_you_mean(key, ALIASES.iter().filter(|a| a.section == section).map(|a| a.name))?;
    lookup(near).map(|a| format!("; did you mean {}?", describe(a)))
}

/// Notes on values that run as something close to, but not the same as, what the named tool
/// runs (`train.optimizer = "paged_adamw_8bit"`), located; read before the table is deserialized.
pub fn value_notes(table: &toml::Table, loc: &dyn Fn(&str) -> String) -> Vec<Diagnostic> {
    let mut notes = vec![];
    let optimizer = table.get("train").and_then(|t| t.get("optimizer")).and_then(Value::as_str);
    if let Some((_, Some(note))) = optimizer.and_then(crate::recipe::Optimizer::from_name) {
        let name = optimizer.unwrap_or_default();
        notes.push(Diagnostic { location: loc("train.optimizer"), text: format!("train.optimizer = {name:?} {note}") });
    }
    notes
}
