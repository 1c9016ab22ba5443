//! Provenance (`tuner-export.json`) and the README model card of every exported folder.
//!
//! `tuner-export.json` records the export fingerprint (which chains the whole run's
//! recipe), the fetch and train stages' fingerprints and artifact hashes, the base
//! model's file hashes, the settings, the tuner and libtorch versions, and the sha256 of
//! every other file in the folder. The README follows the Hub model-card convention (a
//! YAML header with `base_model`, `library_name`, `tags`), then base model, data,
//! settings, the evaluate stage's before/after table when `<run>/evaluate/report.json`
//! exists, the merge check, and how to load the folder.

use super::check::MergeCheck;
use super::PROVENANCE_FILE;
use crate::recipe::{QuantMethod, Recipe};
use crate::util;
use anyhow::Result;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

/// What an exported folder holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// PEFT LoRA adapter.
    Adapter,
    /// Merged HF model.
    Merged,
    /// Merged HF model re-quantized to bnb NF4.
    Nf4,
    /// GGUF files (+ Modelfile).
    Gguf,
}

impl Format {
    /// The `format` field of `tuner-export.json`.
    pub fn id(self) -> &'static str {
        match self {
            Format::Adapter => "peft-lora-adapter",
            Format::Merged => "hf-merged",
            Format::Nf4 => "hf-bnb-nf4",
            Format::Gguf => "gguf",
        }
    }

    fn title(self) -> &'static str {
        match self {
            Format::Adapter => "LoRA adapter (PEFT)",
            Format::Merged => "merged model (Hugging Face safetensors)",
            Format::Nf4 => "merged model, 4-bit NF4 (bitsandbytes)",
            Format::Gguf => "merged model, GGUF (llama.cpp / Ollama)",
        }
    }
}

/// What the cards and `tuner-export.json` say about the run, gathered from the run folder by
/// the export stage.
#[derive(Debug, Clone, Default)]
pub struct RunFacts {
    /// How the card names the base: the hub repo, else the recipe's source.
    pub base_name: String,
    /// The hub commit of the base, for hub sources.
    pub commit: Option<String>,
    /// `model_type` of the base.
    pub model_type: String,
    /// sha256 of the base model's files.
    pub base_files: BTreeMap<String, String>,
    /// `{"fingerprint", "artifacts": {path: sha256}}` of the fetch and train stages.
    pub fetch: Value,
    pub train: Value,
    /// The dataset files and their hashes, when known.
    pub dataset: Option<Value>,
    /// Examples and tokens per split ("train", "eval") of the tokenized data.
    pub splits: Vec<(String, u64, u64)>,
    /// The evaluate stage's report, when it ran.
    pub eval_report: Option<Value>,
}

/// The run-wide part of `tuner-export.json`, collected once per export.
#[derive(Debug, Clone)]
pub struct Provenance {
    /// The JSON object (without `format` and `files`).
    pub value: Value,
}

impl Provenance {
    /// The fingerprints, hashes, settings and versions of a run.
    pub fn new(r: &Recipe, fp: &str, facts: &RunFacts) -> Provenance {
        let value = json!({
            "recipe_fingerprint": fp,
            "run_name": r.run.name,
            "tuner_version": env!("CARGO_PKG_VERSION"),
            "libtorch_version": crate::util::libtorch_version(),
            "base_model": {
                "source": r.model.source,
                "revision": r.model.revision,
                "commit": facts.commit,
                "model_type": facts.model_type,
                "files": facts.base_files,
            },
            "inputs": {
                "fetch": facts.fetch,
                "train": facts.train,
                "dataset": facts.dataset,
            },
            "settings": {
                "model": r.model,
                "quantization": r.quantization,
                "lora": r.lora,
                "prompt": r.prompt,
                "train": r.train,
                "seed": r.run.seed,
                "export": r.export,
            },
        });
        Provenance { value }
    }
}

/// Write `README.md`, then `tuner-export.json` with the sha256 of every other file of `folder`.
pub fn finish(folder: &Path, format: Format, prov: &Provenance, readme: &str) -> Result<()> {
    util::write_atomic(&folder.join("README.md"), readme.as_bytes())?;
    let mut files = BTreeMap::new();
    for f in super::files_under(folder, folder)? {
        let name = f.to_string_lossy().into_owned();
        if name != PROVENANCE_FILE {
            files.insert(name, util::sha256_file(&folder.join(&f))?);
        }
    }
    let mut v = prov.value.clone();
    if let Some(o) = v.as_object_mut() {
        o.insert("format".into(), json!(format.id()));
        o.insert("files".into(), json!(files));
    }
    util::write_json_atomic(&folder.join(PROVENANCE_FILE), &v)
}

fn num(v: &Value) -> Option<String> {
    v.as_f64().map(|x| if x.fract() == 0.0 && x.abs() < 1e12 { format!("{x:.0}") } else { format!("{x:.4}") })
}

/// The before/after table of the evaluate stage's report.
fn eval_table(report: &Value) -> Option<String> {
    let flat = |v: &Value| -> BTreeMap<String, String> {
        let mut out = BTreeMap::new();
        fn walk(prefix: &str, v: &Value, out: &mut BTreeMap<String, String>) {
            match v {
                Value::Object(o) => o.iter().for_each(|(k, x)| {
                    walk(&if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") }, x, out)
                }),
                x => {
                    if let Some(s) = num(x) {
                        out.insert(prefix.to_string(), s);
                    }
                }
            }
        }
        walk("", v, &mut out);
        out
    };
    let (before, after) = (flat(&report["before"]), flat(&report["after"]));
    let mut s = String::new();
    if before.is_empty() && after.is_empty() {
        let all = flat(report);
        if all.is_empty() {
            return None;
        }
        s.push_str("| metric | value |\n| --- | --- |\n");
        for (k, v) in all {
            let _ = writeln!(s, "| {k} | {v} |");
        }
        return Some(s);
    }
    s.push_str("| metric | base | fine-tuned |\n| --- | --- | --- |\n");
    let keys: std::collections::BTreeSet<&String> = before.keys().chain(after.keys()).collect();
    for k in keys {
        let b = before.get(k).map(String::as_str).unwrap_or("");
        let a = after.get(k).map(String::as_str).unwrap_or("");
        let _ = writeln!(s, "| {k} | {b} | {a} |");
    }
    Some(s)
}

fn usage(format: Format, base: &str) -> String {
    match format {
        Format::Adapter => format!(
            "```python\nfrom transformers import AutoModelForCausalLM\nfrom peft import PeftModel\n\n\
             base = AutoModelForCausalLM.from_pretrained(\"{base}\")\nmodel = PeftModel.from_pretrained(base, \"path/to/this/folder\")\n```\n"
        ),
        Format::Merged => "```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n\
             model = AutoModelForCausalLM.from_pretrained(\"path/to/this/folder\")\n\
             tokenizer = AutoTokenizer.from_pretrained(\"path/to/this/folder\")\n```\n"
            .into(),
        Format::Nf4 => "Needs `bitsandbytes`.\n\n```python\nfrom transformers import AutoModelForCausalLM\n\n\
             model = AutoModelForCausalLM.from_pretrained(\"path/to/this/folder\", device_map=\"auto\")\n```\n"
            .into(),
        Format::Gguf => "```sh\nllama-cli -m model-q8_0.gguf -cnv      # llama.cpp (or model-f16.gguf)\nollama create my-model -f Modelfile    # Ollama (when a Modelfile is here)\n```\n"
            .into(),
    }
}

/// The card's settings section.
fn settings_table(r: &Recipe, format: Format) -> String {
    let qlora = r.quantization.method != QuantMethod::None;
    let mut s = String::new();
    s.push_str("\n## Settings\n\n| setting | value |\n| --- | --- |\n");
    let targets = serde_json::to_string(&r.lora.target_modules).unwrap_or_default();
    let steps = match (r.train.max_steps, r.train.epochs) {
        (Some(n), _) => format!("{n} steps"),
        (None, Some(e)) => format!("{e} epochs"),
        (None, None) => "?".into(),
    };
    let rows: Vec<(&str, String)> = vec![
        ("LoRA r / alpha / dropout", format!("{} / {} / {}", r.lora.r, r.lora.alpha, r.lora.dropout)),
        ("target modules", targets),
        ("rsLoRA", r.lora.use_rslora.to_string()),
        (
            "base quantization",
            if qlora {
                format!(
                    "{:?}, block {}, double quant {}",
                    r.quantization.method, r.quantization.block_size, r.quantization.double_quant
                )
                .to_lowercase()
            } else {
                "none".into()
            },
        ),
        ("training length", steps),
        (
            "learning rate / schedule / warmup",
            format!("{} / {:?} / {}", r.train.learning_rate, r.train.lr_scheduler, r.train.warmup_steps),
        ),
        (
            "batch (micro × accumulation)",
            format!("{} × {}", r.train.micro_batch_size, r.train.gradient_accumulation_steps),
        ),
        ("max sequence length", r.train.max_seq_length.to_string()),
        ("optimizer", format!("{:?}", r.train.optimizer)),
        ("seed", r.run.seed.to_string()),
    ];
    for (k, v) in rows {
        let _ = writeln!(s, "| {k} | {} |", v.replace('|', "\\|"));
    }
    if format != Format::Adapter {
        let _ = writeln!(
            s,
            "| merged dtype | {} |",
            if format == Format::Merged { r.export.merged_dtype.name() } else { "bf16 + NF4/GGUF" }
        );
    }
    s
}

/// The README model card of one exported folder.
pub fn readme(r: &Recipe, facts: &RunFacts, format: Format, check: Option<&MergeCheck>) -> String {
    let base = &facts.base_name;
    let library = match format {
        Format::Adapter => "peft",
        Format::Merged | Format::Nf4 => "transformers",
        Format::Gguf => "gguf",
    };
    let qlora = r.quantization.method != QuantMethod::None;
    let mut s = String::from("---\n");
    if r.model.source.starts_with("hf:") {
        let _ = writeln!(s, "base_model: {base}");
    }
    let _ = writeln!(s, "library_name: {library}");
    let _ = writeln!(s, "tags:\n- tuner\n- lora{}", if qlora { "\n- qlora" } else { "" });
    s.push_str("---\n\n");
    let _ = writeln!(s, "# {}: {}\n", if r.run.name.is_empty() { "model" } else { &r.run.name }, format.title());
    let _ = writeln!(
        s,
        "Fine-tuned from `{base}` with {} by tuner {}.\n",
        if qlora { "QLoRA (LoRA on a 4-bit base)" } else { "LoRA" },
        env!("CARGO_PKG_VERSION")
    );
    s.push_str("## Usage\n\n");
    s.push_str(&usage(format, base));

    s.push_str("\n## Base model\n\n| | |\n| --- | --- |\n");
    let _ = writeln!(s, "| source | `{}` |", r.model.source);
    if let Some(c) = &facts.commit {
        let _ = writeln!(s, "| commit | `{c}` |");
    }
    let _ = writeln!(s, "| architecture | {} |", facts.model_type);

    s.push_str("\n## Data\n\n");
    let _ = writeln!(s, "- dataset: `{}`", r.dataset.source);
    if !r.dataset.eval_source.is_empty() {
        let _ = writeln!(s, "- eval set: `{}`", r.dataset.eval_source);
    }
    for (split, rows, tokens) in &facts.splits {
        let _ = writeln!(s, "- {split}: {rows} examples, {tokens} tokens");
    }
    let _ = writeln!(s, "- prompt format: {:?}", r.prompt.template.as_str());

    s.push_str(&settings_table(r, format));

    if let Some(t) = facts.eval_report.as_ref().and_then(eval_table) {
        s.push_str("\n## Evaluation\n\nFrom the run's evaluate stage (`evaluate/report.json`).\n\n");
        s.push_str(&t);
    }
    if let (Some(c), true) = (check, format != Format::Adapter) {
        s.push_str("\n## Merge check\n\n");
        let _ = writeln!(
            s,
            "The merged weights, loaded back, against base + adapter on {} {} examples ({} tokens, {} on {}):\n",
            c.examples, c.source, c.tokens, c.compute_dtype, c.device
        );
        s.push_str("| adapter loss | merged loss | delta | max abs logit diff | allowed delta |\n| --- | --- | --- | --- | --- |\n");
        let _ = writeln!(
            s,
            "| {:.6} | {:.6} | {:.2e} | {:.2e} | {} |",
            c.adapter_loss, c.merged_loss, c.loss_delta, c.max_abs_logit_diff, c.max_merge_loss_delta
        );
    }
    s.push_str("\n## Provenance\n\n");
    let _ = writeln!(
        s,
        "tuner {}, libtorch {}. `{PROVENANCE_FILE}` holds the recipe fingerprint, the hashes of the base model, data \
         and adapter this was built from, the full settings, and the sha256 of every file here.",
        env!("CARGO_PKG_VERSION"),
        crate::util::libtorch_version()
    );
    s
}
