//! Recipe validation: every problem at once, each naming the file, the line and
//! the dotted key, and saying what is allowed (in the style of `just`'s errors).
//!
//! Pass 1 checks keys and value types against the serde structs themselves (the
//! field lists are read off the structs, so they cannot drift); pass 2 checks
//! ranges; pass 3 checks rules across keys and local files.

use super::diagnostic::struct_fields;
pub use super::diagnostic::{did_you_mean, section_keys, Diagnostic, Locations};
use super::schema::*;
use serde::Deserialize;
use std::path::Path;

/// Deserialize one section from a table holding a single key, so that a type
/// error is attributed to exactly that key.
fn check_type(section: &str, table: toml::Table) -> Result<(), String> {
    fn one<T: for<'de> Deserialize<'de>>(t: toml::Table) -> Result<(), String> {
        T::deserialize(toml::Value::Table(t)).map(|_| ()).map_err(|e| e.message().to_string())
    }
    match section {
        "run" => one::<RunSection>(table),
        "model" => one::<ModelSection>(table),
        "quantization" => one::<QuantizationSection>(table),
        "lora" => one::<LoraSection>(table),
        "prompt" => one::<PromptSection>(table),
        "dataset" => one::<DatasetSection>(table),
        "train" => one::<TrainSection>(table),
        "eval" => one::<EvalSection>(table),
        "export" => one::<ExportSection>(table),
        _ => Ok(()),
    }
}

/// Range rules for numeric keys and allowed words for free-form string keys.
/// A key listed here uses the rule's wording for type errors too.
#[derive(Clone, Copy)]
enum Rule {
    PositiveInt,
    NonNegativeInt,
    PositiveNumber,
    NonNegativeNumber,
    /// 0 ≤ x < 1.
    Dropout,
    /// 0 < x < 1.
    Ratio,
    /// 0 ≤ x ≤ 1.
    UnitInterval,
    /// A power of two in 16..=4096.
    BlockSize,
    /// A prompt template ([`crate::recipe::PromptTemplate::parse`] says what is wrong).
    Template,
    /// A split with an optional slice ([`crate::recipe::SplitSpec::parse`] says what is wrong).
    Split,
}

fn rule_for(key: &str) -> Option<Rule> {
    use Rule::*;
    Some(match key {
        "run.seed" => NonNegativeInt,
        "quantization.block_size" => BlockSize,
        "lora.r" => PositiveInt,
        "lora.alpha" => PositiveNumber,
        "lora.dropout" => Dropout,
        "dataset.eval_ratio" => Ratio,
        "dataset.max_samples" | "dataset.shard_rows" => PositiveInt,
        "train.max_seq_length"
        | "train.micro_batch_size"
        | "train.gradient_accumulation_steps"
        | "train.max_steps"
        | "train.logging_steps"
        | "train.save_steps"
        | "train.keep_checkpoints"
        | "train.pad_to_multiple_of"
        | "train.gpus"
        | "train.collective_timeout_s" => PositiveInt,
        "train.warmup_steps" | "train.memory_log_steps" => NonNegativeInt,
        "train.eval_steps" => NonNegativeInt,
        "train.warmup_ratio" => Dropout,
        "train.min_lr" => NonNegativeNumber,
        "train.min_lr_rate" => UnitInterval,
        "train.epochs" | "train.learning_rate" => PositiveNumber,
        "train.weight_decay" | "train.max_grad_norm" => NonNegativeNumber,
        "eval.max_samples" | "eval.max_loss_rows" => NonNegativeInt,
        "eval.max_new_tokens" | "eval.batch_size" => PositiveInt,
        "eval.temperature" => NonNegativeNumber,
        "export.max_merge_loss_delta" => NonNegativeNumber,
        "prompt.template" => Template,
        "dataset.split" | "dataset.eval_split" | "dataset.sources.split" => Split,
        "dataset.sources.weight" => PositiveNumber,
        _ => return None,
    })
}

/// How a TOML value reads in a message: strings quoted, numbers as written.
fn show(v: &toml::Value) -> String {
    match v {
        toml::Value::String(s) => format!("{s:?}"),
        toml::Value::Table(_) => "a table".into(),
        toml::Value::Array(a) if a.len() > 4 => "a list".into(),
        other => other.to_string(),
    }
}

fn quoted_list(words: &[&str]) -> String {
    words.iter().map(|w| format!("{w:?}")).collect::<Vec<_>>().join(", ")
}

/// Check `v` against `rule`; Err holds "expected …, found …".
fn apply_rule(rule: Rule, v: &toml::Value) -> Result<(), String> {
    use toml::Value as V;
    let num = match v {
        V::Integer(i) => Some(*i as f64),
        V::Float(f) if f.is_finite() => Some(*f),
        _ => None,
    };
    let (ok, expected) = match rule {
        Rule::Template => {
            return match v {
                V::String(s) => crate::recipe::PromptTemplate::parse(s).map(|_| ()),
                other => Err(format!("expected a template name or a format string, found {}", show(other))),
            }
        }
        Rule::Split => {
            return match v {
                V::String(s) => crate::recipe::SplitSpec::parse(s).map(|_| ()),
                other => {
                    Err(format!("expected a split name such as \"train\" or \"train[:10%]\", found {}", show(other)))
                }
            }
        }
        Rule::PositiveInt => (matches!(v, V::Integer(i) if *i > 0), "a positive integer".to_string()),
        Rule::NonNegativeInt => (matches!(v, V::Integer(i) if *i >= 0), "an integer ≥ 0".to_string()),
        Rule::PositiveNumber => (num.is_some_and(|x| x > 0.0), "a positive number".to_string()),
        Rule::NonNegativeNumber => (num.is_some_and(|x| x >= 0.0), "a number ≥ 0".to_string()),
        Rule::Dropout => (num.is_some_and(|x| (0.0..1.0).contains(&x)), "a number in [0, 1)".to_string()),
        Rule::Ratio => (num.is_some_and(|x| x > 0.0 && x < 1.0), "a number between 0 and 1".to_string()),
        Rule::UnitInterval => (num.is_some_and(|x| (0.0..=1.0).contains(&x)), "a number in [0, 1]".to_string()),
        Rule::BlockSize => (
            matches!(v, V::Integer(i) if *i >= 16 && *i <= 4096 && (*i as u64).is_power_of_two()),
            "a power of two from 16 to 4096 (bitsandbytes uses 64)".to_string(),
        ),
    };
    if ok {
        Ok(())
    } else {
        Err(format!("expected {expected}, found {}", show(v)))
    }
}

/// Turn serde's wording into "expected X, found Y".
fn humanize(serde_msg: &str, v: &toml::Value) -> String {
    if let Some(rest) = serde_msg.strip_prefix("unknown variant `") {
        // unknown variant `cosin`, expected one of `linear`, `cosine`, `constant`
        let found = rest.split('`').next().unwrap_or("");
        let variants: Vec<&str> = rest.split('`').skip(2).step_by(2).collect();
        let hint =
            did_you_mean(found, variants.iter().copied()).map(|w| format!("; did you mean {w:?}?")).unwrap_or_default();
        return format!("expected one of {}, found {found:?}{hint}", quoted_list(&variants));
    }
    let expected = serde_msg.rsplit(", expected ").next().unwrap_or(serde_msg);
    let expected = match expected {
        "f64" | "f32" => "a number",
        "u64" | "usize" | "u32" => "an integer ≥ 0",
        "i64" => "an integer",
        "a boolean" => "true or false",
        "a string" => "a string",
        "a sequence" => "a list",
        "data did not match any variant of untagged enum TargetModules" => {
            "a list of module names, \"all-linear\", or a regex"
        }
        other => other,
    };
    if serde_msg.starts_with("data did not match") {
        return format!("expected a list of module names, \"all-linear\", or a regex, found {}", show(v));
    }
    format!("expected {expected}, found {}", show(v))
}

/// Pass 1 and 2: unknown sections and keys, value types and ranges. Returns the dotted keys
/// (or section names) that were refused, so that the cross-key checks can still run on the rest.
pub fn check_keys(table: &toml::Table, file_loc: &str, locs: &Locations, out: &mut Vec<Diagnostic>) -> Vec<String> {
    let mut bad = vec![];
    let loc = |key: &str| locs.get(key).cloned().unwrap_or_else(|| file_loc.to_string());
    const SECTIONS: [&str; 9] =
        ["run", "model", "quantization", "lora", "prompt", "dataset", "train", "eval", "export"];
    for (section, value) in table {
        let Some(keys) = section_keys(section) else {
            let hint = did_you_mean(section, SECTIONS.iter().copied())
                .map(|s| format!("; did you mean [{s}]?"))
                .unwrap_or_else(|| format!("; sections are {}", SECTIONS.map(|s| format!("[{s}]")).join(" ")));
            let hint = super::aliases::hint("", section).unwrap_or(hint);
            let what = if value.is_table() {
                format!("unknown section [{section}]")
            } else {
                format!("unknown key `{section}` at the top level")
            };
            out.push(Diagnostic { location: loc(section), text: format!("{what}{hint}") });
            bad.push(section.to_string());
            continue;
        };
        let Some(body) = value.as_table() else {
            out.push(Diagnostic {
                location: loc(section),
                text: format!("{section}: expected a section [{section}], found {}", show(value)),
            });
            bad.push(section.to_string());
            continue;
        };
        for (key, v) in body {
            let dotted = format!("{section}.{key}");
            if !keys.contains(&key.as_str()) {
                let hint = super::aliases::hint(section, key)
                    .or_else(|| did_you_mean(key, keys.iter().copied()).map(|k| format!("; did you mean `{k}`?")))
                    .unwrap_or_else(|| format!("; allowed keys: {}", keys.join(", ")));
                out.push(Diagnostic {
                    location: loc(&dotted),
                    text: format!("unknown key `{key}` in [{section}]{hint}"),
                });
                bad.push(dotted);
                continue;
            }
            if dotted == "dataset.sources" {
                bad.extend(check_sources(v, &loc, out));
                continue;
            }
            let result = match rule_for(&dotted) {
                Some(rule) => apply_rule(rule, v),
                None => {
                    let mut one = toml::Table::new();
                    one.insert(key.clone(), v.clone());
                    check_type(section, one).map_err(|m| humanize(&m, v))
                }
            };
            if let Err(msg) = result {
                out.push(Diagnostic { location: loc(&dotted), text: format!("{dotted}: {msg}") });
                bad.push(dotted);
            }
        }
    }
    let train = table.get("train").and_then(toml::Value::as_table);
    if train.is_some_and(|t| t.contains_key("warmup_steps") && t.contains_key("warmup_ratio")) {
        out.push(Diagnostic {
            location: loc("train.warmup_ratio"),
            text: format!(
                "train.warmup_ratio: set either train.warmup_steps ({}) or train.warmup_ratio, not both",
                loc("train.warmup_steps")
            ),
        });
        bad.push("train.warmup_ratio".into());
    }
    bad
}

/// `[[dataset.sources]]`: each entry's keys and value types, located at the entry's lines.
/// Returns the refused keys (`dataset.sources[i].key`, or `dataset.sources` when it is no list of tables).
fn check_sources(v: &toml::Value, loc: &dyn Fn(&str) -> String, out: &mut Vec<Diagnostic>) -> Vec<String> {
    let mut bad = vec![];
    let Some(entries) = v.as_array().filter(|a| a.iter().all(toml::Value::is_table)) else {
        out.push(Diagnostic {
            location: loc("dataset.sources"),
            text: format!(
                "dataset.sources: expected [[dataset.sources]] tables (source, format, split, weight, …), found {}",
                show(v)
            ),
        });
        return vec!["dataset.sources".into()];
    };
    let keys = struct_fields::<crate::recipe::SourceEntry>();
    for (i, entry) in entries.iter().enumerate() {
        for (key, value) in entry.as_table().into_iter().flatten() {
            let dotted = format!("dataset.sources[{i}].{key}");
            let at = |k: &str| if k == dotted { loc(k) } else { loc(&format!("dataset.sources[{i}]")) };
            if !keys.contains(&key.as_str()) {
                let hint = did_you_mean(key, keys.iter().copied())
                    .map(|k| format!("; did you mean `{k}`?"))
                    .unwrap_or_else(|| format!("; allowed keys: {}", keys.join(", ")));
                let text = format!("unknown key `{key}` in [[dataset.sources]]{hint}");
                out.push(Diagnostic { location: at(&dotted), text });
                bad.push(dotted);
                continue;
            }
            let result = match rule_for(&format!("dataset.sources.{key}")) {
                Some(rule) => apply_rule(rule, value),
                None => {
                    let mut one = toml::Table::new();
                    one.insert(key.clone(), value.clone());
                    crate::recipe::SourceEntry::deserialize(toml::Value::Table(one))
                        .map(|_| ())
                        .map_err(|e| humanize(e.message(), value))
                }
            };
            if let Err(msg) = result {
                out.push(Diagnostic { location: at(&dotted), text: format!("{dotted}: {msg}") });
                bad.push(dotted);
            }
        }
    }
    bad
}

/// `[dataset]` rules across keys: one source or a mixture, weights on all entries or none, the
/// text field only with text rows, chat rows only with a chat template.
fn check_dataset_keys(r: &Recipe, err: &mut dyn FnMut(&str, String)) {
    use crate::recipe::{DataFormat, PromptTemplate};
    let d = &r.dataset;
    if !d.source.is_empty() && !d.sources.is_empty() {
        err("dataset.sources", "set either dataset.source or [[dataset.sources]] entries, not both".into());
    }
    if d.eval_split.is_some() && d.eval_source.is_empty() {
        err("dataset.eval_split", "applies to dataset.eval_source, which is not set (to hold rows of `source` out, use dataset.eval_ratio, or set eval_source to the same source)".into());
    }
    let weighted = d.sources.iter().filter(|s| s.weight.is_some()).count();
    if weighted > 0 && weighted < d.sources.len() {
        let i = d.sources.iter().position(|s| s.weight.is_none()).unwrap_or(0);
        err(&format!("dataset.sources[{i}].weight"), "missing; set a weight on every [[dataset.sources]] entry, or on none (then every row of every source is used once)".into());
    }
    // (key of the format, format, key of the text field, text field) of [dataset] and each entry.
    let mut formats =
        vec![("dataset.format".to_string(), d.format, "dataset.text_field".to_string(), d.text_field.clone())];
    for (i, s) in d.sources.iter().enumerate() {
        let own = |k: &str, set: bool| if set { format!("dataset.sources[{i}].{k}") } else { format!("dataset.{k}") };
        formats.push((
            own("format", s.format.is_some()),
            s.format.unwrap_or(d.format),
            own("text_field", s.text_field.is_some()),
            s.text_field.clone().or_else(|| d.text_field.clone()),
        ));
    }
    let mut chat_needed = None;
    for (fkey, format, tkey, text_field) in &formats {
        match (format, text_field.as_deref()) {
            (_, Some("")) => err(tkey, "expected a field name such as \"text\", found \"\"".into()),
            (DataFormat::Auto | DataFormat::Text, _) | (_, None) => {}
            (f, Some(_)) => err(tkey, format!("applies to plain-text rows; {fkey} = {:?} reads no text field (drop one of them, or set format = \"text\")", f.name())),
        }
        if format.is_chat() && chat_needed.is_none() {
            chat_needed = Some((fkey.clone(), *format));
        }
    }
    if let (Some((fkey, f)), PromptTemplate::Alpaca | PromptTemplate::Inline(_)) = (chat_needed, &r.prompt.template) {
        err("prompt.template", format!("{fkey} = {:?} rows are conversations; set prompt.template = \"chat\" (the tokenizer's chat template) or \"chatml\"", f.name()));
    }
}

/// The linear modules a LoRA adapter can target in a family (config.json's `model_type`).
pub fn family_linear_modules(model_type: &str) -> Option<&'static [&'static str]> {
    crate::model::family::by_model_type(model_type).map(|f| f.linears)
}

/// What a `source` string names.
#[derive(Debug, Clone, PartialEq)]
pub enum Source {
    Hub { repo: String },
    Local(std::path::PathBuf),
}

/// Classify a source string; local paths resolve against `dir` (the recipe's folder).
pub fn classify_source(s: &str, dir: &Path) -> Source {
    match s.strip_prefix("hf:") {
        Some(repo) => Source::Hub { repo: repo.to_string() },
        None => Source::Local(dir.join(s)),
    }
}

fn hub_repo_ok(repo: &str) -> bool {
    let parts: Vec<&str> = repo.split('/').collect();
    parts.len() == 2
        && parts.iter().all(|p| {
            !p.is_empty() && p.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) && !p.starts_with('.')
        })
}

/// Dataset file kinds the tokenize stage reads.
pub use crate::recipe::dataset::DATA_EXTENSIONS;

/// `[dataset]`: the sources exist and are dataset files, and the rules across its keys.
fn check_dataset(r: &Recipe, dir: &Path, err: &mut dyn FnMut(&str, String)) {
    let check_data = |key: &str, s: &str, err: &mut dyn FnMut(&str, String)| match classify_source(s, dir) {
        Source::Hub { repo } if !hub_repo_ok(&repo) => err(key, format!("expected `hf:ORG/NAME`, found {s:?}")),
        Source::Hub { .. } => {}
        Source::Local(p) if p.is_dir() => {}
        Source::Local(p) if p.is_file() => {
            if crate::recipe::data_file_kind(&p).is_none() {
                err(
                    key,
                    format!(
                        "{} has an unsupported extension; expected one of .{}",
                        p.display(),
                        DATA_EXTENSIONS.join(", .")
                    ),
                );
            }
        }
        Source::Local(p) => err(key, format!("{} does not exist", p.display())),
    };
    if r.dataset.source.is_empty() && r.dataset.sources.is_empty() {
        err(
            "dataset.source",
            "missing; set it to a local .jsonl/.json/.csv/.parquet/.arrow file or folder, or `hf:ORG/NAME` (or list several under [[dataset.sources]])".into(),
        );
    } else if !r.dataset.source.is_empty() {
        check_data("dataset.source", &r.dataset.source, err);
    }
    for (i, s) in r.dataset.sources.iter().enumerate() {
        let key = format!("dataset.sources[{i}].source");
        if s.source.is_empty() {
            err(&key, "missing; set it to a local dataset file or folder, or `hf:ORG/NAME`".into());
        } else {
            check_data(&key, &s.source, err);
        }
    }
    check_dataset_keys(r, err);
    if !r.dataset.eval_source.is_empty() {
        check_data("dataset.eval_source", &r.dataset.eval_source, err);
        if r.dataset.eval_ratio.is_some() {
            err("dataset.eval_ratio", "set either dataset.eval_source or dataset.eval_ratio, not both".into());
        }
    }
}

/// `model.source`: present, well-formed, existing; returns the model type it names, when it
/// can be read without loading (config.json, or the GGUF architecture).
fn check_model_source(r: &Recipe, dir: &Path, err: &mut dyn FnMut(&str, String)) -> Option<String> {
    let mut model_type: Option<String> = None;
    if r.model.source.is_empty() {
        err("model.source", "missing; set it to `hf:ORG/NAME`, a local HF folder or a .gguf file".into());
    } else {
        match classify_source(&r.model.source, dir) {
            Source::Hub { repo } if !hub_repo_ok(&repo) => {
                err("model.source", format!("expected `hf:ORG/NAME`, found {:?}", r.model.source))
            }
            Source::Hub { .. } => {}
            Source::Local(p) if p.extension().is_some_and(|e| e == "gguf") => {
                if !p.is_file() {
                    err(
                        "model.source",
                        format!(
                            "GGUF file {} does not exist (scripts/bootstrap fetches the quickstart model)",
                            p.display()
                        ),
                    );
                } else if let Ok(g) = crate::gguf::GgufFile::open(&p) {
                    model_type = g.architecture().map(str::to_string);
                }
            }
            Source::Local(p) => {
                if !p.is_dir() {
                    err("model.source", format!("{} is not a folder, a .gguf file or `hf:ORG/NAME`", p.display()));
                } else if !p.join("config.json").is_file() {
                    err("model.source", format!("{} has no config.json; expected an HF model folder", p.display()));
                } else if let Ok(cfg) = crate::util::read_json::<serde_json::Value>(&p.join("config.json")) {
                    model_type = cfg.get("model_type").and_then(|v| v.as_str()).map(str::to_string);
                }
            }
        }
    }
    model_type
}

/// Pass 3: rules across keys, and local files that must exist.
pub fn check_semantics(r: &Recipe, dir: &Path, loc: &dyn Fn(&str) -> String, out: &mut Vec<Diagnostic>) {
    let mut err = |key: &str, text: String| out.push(Diagnostic { location: loc(key), text: format!("{key}: {text}") });

    // [model]
    let model_type = check_model_source(r, dir, &mut err);

    // [lora]
    match &r.lora.target_modules {
        TargetModules::List(names) if names.is_empty() => {
            err("lora.target_modules", "expected at least one module name, or \"all-linear\"".into())
        }
        TargetModules::List(names) => {
            if let Some(mt) = &model_type {
                match family_linear_modules(mt) {
                    Some(known) => {
                        for n in names.iter().filter(|n| !known.contains(&n.as_str())) {
                            let hint = did_you_mean(n, known.iter().copied())
                                .map(|k| format!("did you mean `{k}`? "))
                                .unwrap_or_default();
                            err(
                                "lora.target_modules",
                                format!(
                                    "`{n}` is not a linear module of {mt} models; {hint}expected some of {}",
                                    known.join(", ")
                                ),
                            );
                        }
                    }
                    None => err(
                        "model.source",
                        format!("model type `{mt}` is not supported; supported: {}", crate::model::family::names()),
                    ),
                }
            }
        }
        TargetModules::Pattern(p) if p == "all-linear" => {}
        TargetModules::Pattern(p) => {
            if let Err(e) = regex::Regex::new(p) {
                err("lora.target_modules", format!("expected a list of names, \"all-linear\" or a valid regex: {e}"));
            }
        }
    }

    // [prompt] (the template itself was parsed with the types; here its slot)
    if let crate::recipe::PromptTemplate::Inline(t) = &r.prompt.template {
        if let Ok(parts) = crate::recipe::parse_format(t) {
            let slot = &r.prompt.output_field;
            let n = parts.iter().filter(|p| matches!(p, crate::recipe::Piece::Field(f) if f == slot)).count();
            if n != 1 {
                err("prompt.template", format!("a format string needs exactly one `{{{slot}}}` slot (where the response starts; see prompt.output_field), found {n}"));
            }
        }
    }

    // [dataset]
    check_dataset(r, dir, &mut err);

    // [train]
    if r.train.max_steps.is_none() && r.train.epochs.is_none() {
        err("train.max_steps", "missing; set train.max_steps (optimizer steps) or train.epochs".into());
    }
    if r.train.max_steps.is_some() && r.train.epochs.is_some() {
        err("train.epochs", "set either train.max_steps or train.epochs, not both".into());
    }
    check_min_lr(&r.train, &mut err);
    if let (true, crate::recipe::DeviceSpec::Cuda(Some(_))) = (r.train.gpus > 1, r.train.device) {
        let dev = r.train.device;
        err("train.device", format!("\"{dev}\" names one GPU, but train.gpus = {} starts one process per GPU (each on cuda:LOCAL_RANK); set train.device to \"auto\" or \"cuda\"", r.train.gpus));
    }
    if let Some(why) = crate::recipe::effective_batch_problem(&r.train, r.train.gpus as usize) {
        err("train.keep_effective_batch", why);
    }
}

/// `cosine_with_min_lr` needs its floor (exactly one of `min_lr`, `min_lr_rate`, as transformers
/// asks); the other schedules do not read either.
fn check_min_lr(t: &TrainSection, err: &mut dyn FnMut(&str, String)) {
    let cosine_min = t.lr_scheduler == LrScheduler::CosineWithMinLr;
    match (t.min_lr, t.min_lr_rate) {
        (Some(_), Some(_)) => err("train.min_lr", "set either train.min_lr or train.min_lr_rate, not both".into()),
        (None, None) if cosine_min => err(
            "train.lr_scheduler",
            "\"cosine_with_min_lr\" needs its floor: set train.min_lr_rate (a fraction of learning_rate) or train.min_lr".into(),
        ),
        (Some(m), None) if cosine_min && m > t.learning_rate => err(
            "train.min_lr",
            format!("the floor {m} is above train.learning_rate ({}); expected at most the learning rate", t.learning_rate),
        ),
        (Some(_), _) | (_, Some(_)) if !cosine_min => {
            let key = if t.min_lr.is_some() { "train.min_lr" } else { "train.min_lr_rate" };
            err(key, "only read by train.lr_scheduler = \"cosine_with_min_lr\"; set that or drop this key".into())
        }
        _ => {}
    }
}
